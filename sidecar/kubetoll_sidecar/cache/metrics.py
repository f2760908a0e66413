"""The cache's Prometheus metrics. Labels: route and policy (never the tenant)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SIMILARITY_BUCKETS = (0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0)
_LOOKUP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.lookups = Counter(
            "kubetoll_cache_lookups",
            "Cache lookups by result: hit_exact, hit_semantic, miss, bypass (no-cache header), uncacheable.",
            ["route", "policy", "result"],
            registry=r,
        )
        self.avoided_tokens = Counter(
            "kubetoll_cache_avoided_tokens",
            "Tokens not sent to a model because the cache answered, by type (input, output).",
            ["route", "policy", "type"],
            registry=r,
        )
        self.avoided_usd = Counter(
            "kubetoll_cache_avoided_usd",
            "USD not spent because the cache answered (the original answer's cost).",
            ["route", "policy", "kind"],
            registry=r,
        )
        self.stores = Counter(
            "kubetoll_cache_stores",
            "Answers offered to the cache, by result: stored, incomplete, no_store, redis_unavailable.",
            ["route", "policy", "result"],
            registry=r,
        )
        self.semantic_rejections = Counter(
            "kubetoll_cache_semantic_rejections",
            "Semantic candidates above the threshold turned down, by why: what the strict check found different, "
            "or the verifier (rerank, judge) saying no.",
            ["route", "policy", "reason"],
            registry=r,
        )
        self.semantic_similarity = Histogram(
            "kubetoll_cache_semantic_hit_similarity",
            "Cosine similarity of the questions of served semantic hits.",
            ["policy"],
            buckets=_SIMILARITY_BUCKETS,
            registry=r,
        )
        self.embedding_calls = Counter(
            "kubetoll_cache_embedding_calls",
            "Embedding calls made for semantic lookups, by result (ok, failed, skipped).",
            ["policy", "result"],
            registry=r,
        )
        self.embedding_usd = Counter(
            "kubetoll_cache_embedding_usd",
            "USD spent on embedding calls for semantic lookups.",
            ["policy"],
            registry=r,
        )
        self.verifier_calls = Counter(
            "kubetoll_cache_verifier_calls",
            "Model verifier (rerank, judge) decisions on semantic candidates, by result: ok (the backend answered), "
            "cached (a score stored for the same pair), failed (error, timeout, unreadable answer), skipped (circuit "
            "open or no client), no_question (the stored question is gone), too_long.",
            ["policy", "kind", "result"],
            registry=r,
        )
        self.verifier_usd = Counter(
            "kubetoll_cache_verifier_usd",
            "USD spent on verifier calls for semantic lookups.",
            ["policy"],
            registry=r,
        )
        self.semantic_degraded = Gauge(
            "kubetoll_cache_semantic_degraded",
            "1 while a policy's semantic tier misses because a part is unavailable (its circuit is open, or the "
            "sidecar has no client for its backend), by part (embedding, verifier); 0 when it serves.",
            ["policy", "part"],
            registry=r,
        )
        self.redis_errors = Counter(
            "kubetoll_cache_redis_errors",
            "Redis calls that failed or timed out (the cache then runs without Redis for a while).",
            ["op", "reason"],
            registry=r,
        )
        self.lookup_seconds = Histogram(
            "kubetoll_cache_lookup_seconds",
            "Time a cache lookup adds, by result (embedding call included).",
            ["policy", "result"],
            buckets=_LOOKUP_BUCKETS,
            registry=r,
        )
        self.local_entries = Gauge(
            "kubetoll_cache_local_entries",
            "Entries held in this sidecar, by tier (lru, semantic_index).",
            ["policy", "tier"],
            registry=r,
        )
        self.local_bytes = Gauge(
            "kubetoll_cache_local_bytes",
            "Bytes held in this sidecar, by tier (lru, semantic_index).",
            ["policy", "tier"],
            registry=r,
        )
        self.flushes = Counter(
            "kubetoll_cache_invalidations",
            "Local cache state dropped, by why (policy_changed, epoch_bumped).",
            ["policy", "reason"],
            registry=r,
        )
        # Error-rate control (semantic.targetErrorRate; cache/error_control.py)
        self.control_decisions = Counter(
            "kubetoll_cache_error_control_decisions",
            "Semantic candidates that passed the verifier, by what error-rate control did: hit (served), explore "
            "(a would-be hit sent upstream and compared), label (below the learned threshold, compared), miss.",
            ["policy", "decision"],
            registry=r,
        )
        self.control_comparisons = Counter(
            "kubetoll_cache_error_control_comparisons",
            "Fresh answers compared with the cached one, by verdict: equal, similar, judge_same (the cached answer "
            "was right); numbers_differ, empty, not_similar, different (it was wrong); similarity_failed, "
            "unreadable (inconclusive, not learned from).",
            ["policy", "verdict"],
            registry=r,
        )
        self.control_threshold = Gauge(
            "kubetoll_cache_error_control_threshold",
            "The similarity at or above which error-rate control serves a semantic hit; NaN while closed (not "
            "enough compared answers yet, or no threshold meets the target).",
            ["policy"],
            registry=r,
        )
        self.control_error_rate = Gauge(
            "kubetoll_cache_error_control_estimated_error_rate",
            "Share of explored would-be hits whose cached answer was wrong (recent, in this sidecar); NaN before any.",
            ["policy"],
            registry=r,
        )
        self.control_target = Gauge(
            "kubetoll_cache_error_control_target_error_rate",
            "The policy's semantic.targetErrorRate (for alerts comparing the estimate with it).",
            ["policy"],
            registry=r,
        )
        self.control_exploration_rate = Gauge(
            "kubetoll_cache_error_control_exploration_rate",
            "Probability that a would-be semantic hit is explored (answered upstream and compared) instead of served.",
            ["policy"],
            registry=r,
        )
