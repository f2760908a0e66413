"""Whether each policy's semantic tier can serve, per part (the embedding call, the verifier call).

Each semantic policy has a circuit breaker on its embedding backend and, with a
rerank or judge verifier, one on its verifier backend (`circuit.CircuitBreaker`:
`semantic.circuitBreaker.failureThreshold` consecutive failures open it for
`cooldownSeconds`, then one probe call goes through; success closes it). While
a part's circuit is open, or the sidecar has no client for its backend at all,
the part is **degraded**: the semantic tier of that policy misses (the exact
tier is unaffected) and nobody waits on the backend.

Losing the semantic tier is made visible three ways, all on transitions rather
than per request: `kubetoll_cache_semantic_degraded{policy,part}` is 1 while
degraded; one WARNING when a part degrades and one INFO when it recovers; and a
`DegradedReport` for the operator (kubetoll_core.cache_health), which
`CacheStage.sync_once` writes into Redis when `due` lists it, so the
CachePolicy's `Degraded` condition says which backend is lost.

Breakers are keyed by policy and part and survive config reloads (a reload does
not forget that a backend is down), unless the part's backend changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kubetoll_core.cache_health import EMBEDDING, REFRESH_SECONDS, TTL_SECONDS, VERIFIER, DegradedReport

from ..circuit import CLOSED, OPEN, CircuitBreaker
from .metrics import CacheMetrics

log = logging.getLogger("kubetoll.cache")

__all__ = ["EMBEDDING", "VERIFIER", "PartSpec", "HealthUpdate", "SemanticHealth"]

_WHAT = {EMBEDDING: "embedding backend", VERIFIER: "verifier backend"}


@dataclass(frozen=True, slots=True)
class PartSpec:
    """What a config load says about one part of one policy."""

    policy: str
    part: str  # EMBEDDING or VERIFIER
    backend: str
    failure_threshold: int
    cooldown_seconds: float
    missing: str = ""  # why there is no client for the backend ("" when there is one)


@dataclass(frozen=True, slots=True)
class HealthUpdate:
    """One write for Redis: a report while degraded, None to clear the part."""

    policy: str
    part: str
    report: DegradedReport | None


@dataclass(slots=True)
class _Part:
    spec: PartSpec
    breaker: CircuitBreaker
    degraded: bool = False
    since: float = 0.0  # wall clock: when it became degraded
    last_error: str = ""
    published_at: float | None = None  # wall clock of the last write of the current state; None: due now
    pending_clear: bool = False  # a recovery not yet written (the report is in Redis)
    in_redis: bool = False


@dataclass(slots=True)
class SemanticHealth:
    metrics: CacheMetrics
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    cooldown_override: dict[str, float] = field(default_factory=dict)  # part -> seconds (tests, benchmarks)
    _parts: dict[tuple[str, str], _Part] = field(default_factory=dict)
    _retired: list[tuple[str, str]] = field(default_factory=list)  # removed parts whose report is still in Redis

    # ------------------------------------------------------------------ configuration

    def configure(self, specs: Iterable[PartSpec]) -> None:
        """The parts of this config; parts no longer wanted are dropped (and cleared in Redis)."""
        wanted = {(s.policy, s.part): s for s in specs}
        for key, gone in list(self._parts.items()):
            if key not in wanted or wanted[key].backend != gone.spec.backend:
                del self._parts[key]
                if gone.in_redis:
                    self._retired.append(key)
                try:
                    self.metrics.semantic_degraded.remove(*key)
                except KeyError:
                    pass
        for key, spec in wanted.items():
            cooldown = self.cooldown_override.get(spec.part, spec.cooldown_seconds)
            part = self._parts.get(key)
            if part is None:
                part = _Part(spec, CircuitBreaker(spec.failure_threshold, cooldown, self.monotonic))
                self._parts[key] = part
            else:
                part.spec = spec
                part.breaker.threshold, part.breaker.cooldown = spec.failure_threshold, cooldown
            self._update(part)

    def retire_all(self) -> None:
        """At shutdown: every report this sidecar has in Redis is to be cleared."""
        for key, part in self._parts.items():
            if part.in_redis:
                self._retired.append(key)
        self._parts.clear()

    # ------------------------------------------------------------------ the request path

    def blocked(self, policy: str, part: str) -> bool:
        """True while a call would not be let through (open circuit, or no client); takes no probe."""
        p = self._parts.get((policy, part))
        if p is None:
            return False
        return bool(p.spec.missing) or p.breaker.state == OPEN

    def allow(self, policy: str, part: str) -> bool:
        """May a call go now? Half-open, only the first caller gets through (the probe)."""
        p = self._parts.get((policy, part))
        if p is None:
            return True
        if p.spec.missing:
            return False
        return p.breaker.allow()

    def success(self, policy: str, part: str) -> None:
        p = self._parts.get((policy, part))
        if p is not None:
            p.breaker.success()
            self._update(p)

    def failure(self, policy: str, part: str, why: str) -> None:
        p = self._parts.get((policy, part))
        if p is not None:
            p.last_error = why
            p.breaker.failure(why)
            self._update(p)

    def release(self, policy: str, part: str) -> None:
        """A call that ended without a verdict (cancelled): let the next caller probe."""
        p = self._parts.get((policy, part))
        if p is not None:
            p.breaker.release_probe()

    def degraded(self, policy: str, part: str) -> bool:
        p = self._parts.get((policy, part))
        return p is not None and p.degraded

    def reason(self, policy: str, part: str) -> str:
        p = self._parts.get((policy, part))
        if p is None or not p.degraded:
            return ""
        return p.spec.missing or p.breaker.reason or p.last_error

    # ------------------------------------------------------------------ the report for the operator

    def due(self) -> list[HealthUpdate]:
        """What should be written to Redis now: transitions not written yet, reports due for a refresh."""
        now = self.wall()
        out = [HealthUpdate(policy, part, None) for policy, part in self._retired]
        for (policy, part_name), p in self._parts.items():
            if p.degraded:
                if p.published_at is None or now - p.published_at >= REFRESH_SECONDS:
                    report = DegradedReport(
                        part_name, p.spec.backend, self.reason(policy, part_name), p.since, now + TTL_SECONDS
                    )
                    out.append(HealthUpdate(policy, part_name, report))
            elif p.pending_clear:
                out.append(HealthUpdate(policy, part_name, None))
        return out

    def written(self, updates: Iterable[HealthUpdate]) -> None:
        """`updates` (from `due`) are in Redis now."""
        now = self.wall()
        done = {(u.policy, u.part) for u in updates}
        self._retired = [k for k in self._retired if k not in done]
        for u in updates:
            p = self._parts.get((u.policy, u.part))
            if p is None:
                continue
            if u.report is None:
                p.pending_clear, p.in_redis = False, False
            elif p.degraded:
                p.published_at, p.in_redis = now, True

    # ------------------------------------------------------------------ transitions

    def _update(self, p: _Part) -> None:
        degraded = bool(p.spec.missing) or p.breaker.state != CLOSED
        policy, part = p.spec.policy, p.spec.part
        self.metrics.semantic_degraded.labels(policy, part).set(1 if degraded else 0)
        if degraded == p.degraded:
            return
        p.degraded = degraded
        if degraded:
            p.since, p.published_at, p.pending_clear = self.wall(), None, False
            if p.spec.missing:
                log.warning(
                    "cache policy %s: semantic tier degraded: %s; its semantic lookups miss", policy, p.spec.missing
                )
            else:
                log.warning(
                    "cache policy %s: semantic tier degraded: %s %s is unavailable (%s); semantic lookups miss "
                    "until a probe call, in %.0fs, succeeds",
                    policy,
                    _WHAT[part],
                    p.spec.backend,
                    p.breaker.reason,
                    p.breaker.retry_in(),
                )
        else:
            p.pending_clear = True  # its report may be in Redis (an HDEL of an absent field is harmless)
            p.published_at = None
            log.info(
                "cache policy %s: semantic tier recovered: %s %s answers again", policy, _WHAT[part], p.spec.backend
            )
