"""Response caching: exact and semantic, shared by the sidecars of a namespace through Redis.

The pipeline uses `CacheStage` (stage 6, lookup; stage 10, store); see
`stage.py` for how entries are shared and invalidated, `verify.py` for the
strict check behind a semantic hit, and docs/caching.md for the whole story.
"""

from .embeddings import EmbeddingFailed, EmbedFn, embedder_for_backend, http_embedder
from .replay import CacheHit, StreamAssembler
from .stage import CACHE_CONTROL_HEADER, CacheLookup, CacheStage, EmbeddingCharge, uncacheable_reason

__all__ = [
    "CACHE_CONTROL_HEADER",
    "CacheHit",
    "CacheLookup",
    "CacheStage",
    "EmbedFn",
    "EmbeddingCharge",
    "EmbeddingFailed",
    "StreamAssembler",
    "embedder_for_backend",
    "http_embedder",
    "uncacheable_reason",
]
