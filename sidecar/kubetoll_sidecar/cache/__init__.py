"""Response caching: exact and semantic, shared by the sidecars of a namespace through Redis.

The pipeline uses `CacheStage` (stage 6, lookup; stage 10, store); see
`stage.py` for how entries are shared and invalidated, `verify.py` for the
strict check behind a semantic hit, `verifiers.py` for the rerank and judge
verifiers, `semantic_health.py` for how a lost backend degrades the semantic
tier visibly, and docs/caching.md for the whole story.
"""

from .embeddings import EmbeddingFailed, EmbedFn, embedder_for_backend, http_embedder
from .replay import CacheHit, StreamAssembler
from .stage import CACHE_CONTROL_HEADER, CacheLookup, CacheStage, EmbeddingCharge, LookupCharge, uncacheable_reason
from .verifiers import ModelVerifier, VerifierFailed, verifier_for_policy

__all__ = [
    "CACHE_CONTROL_HEADER",
    "CacheHit",
    "CacheLookup",
    "CacheStage",
    "EmbedFn",
    "EmbeddingCharge",
    "EmbeddingFailed",
    "LookupCharge",
    "ModelVerifier",
    "StreamAssembler",
    "embedder_for_backend",
    "http_embedder",
    "VerifierFailed",
    "uncacheable_reason",
    "verifier_for_policy",
]
