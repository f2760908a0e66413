"""Pipeline stage 6, cache lookup (and the cache store of stage 10).

`CacheStage` answers a request from cache when its route's cache policy
allows: first the exact tier (in-process LRU, then Redis), then the semantic
tier (embed the question, search the local index, check the candidates
strictly, have the policy's verifier confirm the top one, fetch the answer). On
a miss it keeps what it computed (the key, the embedding) in the returned
`CacheLookup`, and `store(lookup, ...)` files the answer under it once the model
has given one.

Sharing across the sidecars of a namespace goes through Redis:

* answers live in Redis under `kt:cache:{<ns>}:<policy>:<gen>:e:<hash>` with the
  policy's TTL; every sidecar reads them, and keeps the ones it served in its
  own LRU;
* each semantic insert is also appended to a Redis stream
  (`...:<gen>:log`: id, partition, vector, signature, expiry). Every sidecar
  reads the stream incrementally (`XREAD` from its last id, every
  `sync_interval`), so a question answered by one pod is a semantic hit on all
  of them within about that interval; a sidecar that starts (or sees a new
  generation) reads the stream from its start. Expiry reaches the local index
  by the expiry time carried with each entry (expired rows are skipped by the
  search and swept out), and an answer evicted or flushed from Redis is found
  missing on the hit's fetch, dropped from the index, and the lookup goes on
  as a miss.

The generation is a hash of the policy's settings plus an admin epoch
(`kt:cache:{<ns>}:<policy>:epoch`, read every `epoch_interval`): changing the
policy or bumping the epoch (`flush_policy`, `kubetoll cache flush`) makes every
older entry unreachable at once, locally and in Redis.

Redis is never waited on for more than `redis_timeout` on the request path;
after a failure the stage runs on local state alone for a second before trying
again (`RedisGuard`). An embedding or verifier backend that fails or is slow
(past the policy's `embeddingTimeoutMs` / `verifier.timeoutMs`) makes the
semantic tier a miss, never an error; enough failures in a row open that part's
circuit (`semantic_health.py`), and the tier is then visibly degraded: a
gauge, one log line, and a report in Redis the operator turns into the
CachePolicy's `Degraded` condition.

The verification step is `_confirm`: the one place that decides whether the top
candidate (the most similar one whose answer is still stored and, when the
rules run, that passes them) is served. Only that candidate is put to a rerank
or judge verifier, whose scores are cached per pair of questions (locally and
in Redis) and billed like the embedding call (`CacheLookup.charges`).

Time comes from two clocks given to `CacheStage` (the real ones by default; a
test passes fakes to expire a TTL or a cool-down without sleeping): `wall`
(epoch seconds: entry creation and expiry, shared with other sidecars through
Redis) and `monotonic` (intervals and cool-downs local to this process).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from kubetoll_core.cache_health import EMBEDDING, VERIFIER
from kubetoll_core.redis_keys import RedisKeys, check_sidecar_id
from kubetoll_core.router_config import CachePolicy, RouterConfig
from kubetoll_core.spend_record import CACHE_EMBEDDING_OUTCOME, CACHE_VERIFIER_OUTCOME, SpendRecord

from .. import inbound
from ..providers.base import Usage
from . import keys
from .answer_match import answer_text, answers_match, embedding_similarity
from .embeddings import EmbedFn
from .lru import ByteLRU
from .metrics import CacheMetrics
from .redis_guard import RedisGuard, RedisUnavailable
from .replay import CacheHit, Entry, is_complete, usage_dict
from .semantic_health import PartSpec, SemanticHealth
from .verifiers import MAX_TEXT_CHARS, ModelVerifier

if TYPE_CHECKING:  # numpy, the index, error control and the strict check's word lists (verify.py,
    # ~2 MiB and ~24 ms) load on first semantic use, not with the stage
    import numpy as np
    from redis.asyncio import Redis, RedisCluster

    from .error_control import Decision, ErrorRateController
    from .semantic import Candidate, SemanticIndex
    from .verify import Signature

log = logging.getLogger("kubetoll.cache")

CACHE_CONTROL_HEADER = "x-kubetoll-cache-control"
CACHEABLE_ENDPOINTS = ("chat", "completions", "responses", "messages")


@dataclass(frozen=True, slots=True)
class LookupCharge:
    """A call a semantic lookup made (the embedding, the verifier): bill it like any call."""

    backend: str
    usage: Usage
    cost_usd: float
    seconds: float


EmbeddingCharge = LookupCharge  # its name from before verifier calls were billed too


@dataclass(slots=True)
class CacheLookup:
    """What stage 6 found, and what stage 10 needs to store the answer on a miss."""

    status: str  # "hit", "miss", "bypass", "uncacheable", "off"
    hit: CacheHit | None = None
    embedding: LookupCharge | None = None
    verification: LookupCharge | None = None  # the rerank or judge call, when one was made
    reason: str = ""  # why uncacheable, why a semantic candidate was turned down, or why the tier could not look
    # Bills a call made after the lookup (error control's answer comparison) against this request's
    # budgets and in the ledger, like `charges`; set by the pipeline.
    bill_later: Callable[[str, LookupCharge], Awaitable[None]] | None = None
    # -- private to the stage
    _rt: _PolicyRuntime | None = None
    _route: str = ""
    _endpoint: str = ""
    _key: str = ""
    _gen: str = ""
    _storable: bool = False
    _partition: str = ""
    _vector: np.ndarray | None = None
    _signature: Signature | None = None
    _question: str = ""  # the embedded text: stored with a semantic entry for model verifiers
    # Error control asked for the fresh answer to be compared with this candidate's (explore or label).
    _probe: Decision | None = None
    _probe_entry: Entry | None = None
    _probe_control: ErrorRateController | None = None

    @property
    def charges(self) -> list[tuple[str, LookupCharge]]:
        """(ledger outcome, charge) of each call this lookup made, to bill."""
        out = []
        if self.embedding is not None:
            out.append((CACHE_EMBEDDING_OUTCOME, self.embedding))
        if self.verification is not None:
            out.append((CACHE_VERIFIER_OUTCOME, self.verification))
        return out

    @property
    def lookup_cost_usd(self) -> float:
        """What the lookup's own calls cost (in the request's `x-kubetoll-cost-usd`)."""
        return sum(c.cost_usd for _, c in self.charges)

    @property
    def header_value(self) -> str:
        """For the `x-kubetoll-cache` response header."""
        if self.hit is not None:
            return f"hit-{self.hit.kind}"
        return self.status

    @property
    def should_store(self) -> bool:
        """True when the answer to this request should be offered to `store` (a miss that may be stored)."""
        return self.status == "miss" and self._storable

    @property
    def compares(self) -> bool:
        """True when error control waits for the upstream answer to this miss to compare it."""
        return self._probe is not None

    @property
    def wants_answer(self) -> bool:
        """True when the upstream answer to this request should be offered to `store` (to keep or compare)."""
        return self.should_store or self._probe is not None


_OFF = CacheLookup("off")


@dataclass(slots=True)
class _PolicyRuntime:
    policy: CachePolicy
    settings_hash: str
    lru: ByteLRU
    embed: EmbedFn | None = None
    verifier: ModelVerifier | None = None
    epoch: int | None = None  # None until read from Redis
    epoch_retry_at: float = 0.0
    index: SemanticIndex | None = None  # built on first use (numpy is only needed then)
    cursor: str = "0-0"  # last stream id applied to the index
    # Stored questions and cached verifier scores, for a model verifier: bounded apart from the entries.
    verify_lru: ByteLRU = field(default_factory=lambda: ByteLRU(0))
    stats: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0})
    control: ErrorRateController | None = None  # semantic.targetErrorRate: built on first use

    def ensure_control(self) -> ErrorRateController | None:
        """The policy's error-rate controller (None without targetErrorRate): learned in this sidecar."""
        s = self.policy.semantic
        if s.target_error_rate is None or not s.enabled:
            return None
        if self.control is None:
            from .error_control import ErrorRateController

            # semantic.threshold is the floor (the index returns nothing below it); the controller
            # may ask for anything up to a verbatim repeat.
            self.control = ErrorRateController(s.target_error_rate, min(s.threshold, CONTROL_MAX_FLOOR), 1.0)
        return self.control

    def control_matches(self, policy: CachePolicy) -> bool:
        """Whether what the controller learned still holds for `policy` (same target and floor)."""
        c = self.control
        s = policy.semantic
        return (
            c is not None
            and s.target_error_rate == c.target
            and min(s.threshold, CONTROL_MAX_FLOOR) == c.min_threshold
            and s.embedding_backend == self.policy.semantic.embedding_backend
        )

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def gen(self) -> str:
        return keys.generation(self.settings_hash, self.epoch if self.epoch is not None else 0)

    @property
    def semantic_on(self) -> bool:
        return self.policy.semantic.enabled

    @property
    def entry_ttl(self) -> int:
        p = self.policy
        ttls = [p.exact.ttl_seconds] if p.exact.enabled else []
        if p.semantic.enabled:
            ttls.append(p.semantic.ttl_seconds)
        return max(ttls, default=p.exact.ttl_seconds)

    def ensure_index(self) -> SemanticIndex:
        if self.index is None:
            from .semantic import SemanticIndex

            self.index = SemanticIndex(self.policy.semantic.max_entries)
        return self.index

    def set_epoch(self, epoch: int, metrics: CacheMetrics) -> None:
        if epoch == self.epoch:
            return
        had_state = len(self.lru) or (self.index is not None and len(self.index))
        if self.epoch is not None or had_state:
            # Entries of another epoch (or of an epoch never known) must not be served.
            self.lru.clear()
            self.verify_lru.clear()
            if self.index is not None:
                self.index.clear()
            if self.epoch is not None:
                metrics.flushes.labels(self.name, "epoch_bumped").inc()
                log.info("cache policy %s: epoch %s -> %s, local entries dropped", self.name, self.epoch, epoch)
        self.epoch = epoch
        self.cursor = "0-0"  # read the new generation's inserts from the start


# Settings that decide only what is served, never what is stored: changing them keeps the entries
# (a stricter verifier re-checks old entries; a timeout or circuit setting changes nothing stored).
_SERVING_ONLY = {
    "verifier": None,
    "embedding_timeout_ms": None,
    "circuit_breaker": None,
    "target_error_rate": None,
    "answer_similarity": None,
}
# How often a sidecar tells the operator what its error-rate controllers learned (cache_health.ControlReport).
CONTROL_REPORT_SECONDS = 20.0
# Error control needs room to learn above semantic.threshold: a floor nearer 1 than this is capped.
CONTROL_MAX_FLOOR = 0.995
VERIFY_LRU_SHARE = 16  # the questions and verdicts get localMaxBytes / 16 more (at least 1 MiB)


def policy_hash(policy: CachePolicy) -> str:
    stored_as = policy.model_copy(update={"semantic": policy.semantic.model_copy(update=_SERVING_ONLY)})
    return keys.digest(
        keys.canonical_json({"settings": keys.policy_settings_hash(stored_as), "verify": keys.VERIFY_VERSION}), 6
    )


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout * 1000:.0f} ms"
    return f"{type(exc).__name__}: {exc}"


def _header(headers: Mapping[str, str] | None, name: str) -> str:
    if not headers:
        return ""
    v = headers.get(name)
    if v is None and isinstance(headers, dict):
        for k, val in headers.items():
            if k.lower() == name:
                return str(val)
        return ""
    return str(v or "")


def uncacheable_reason(policy: CachePolicy, endpoint: str, body: Mapping[str, Any]) -> str:
    """Why this request may not be answered from (or stored in) the cache; "" when it may."""
    if not (policy.exact.enabled or policy.semantic.enabled):
        return "disabled"
    if endpoint not in CACHEABLE_ENDPOINTS:
        return "endpoint"
    adapter = inbound.adapter_for(endpoint)
    reason = adapter.uncacheable_reason(body) if adapter is not None else ""
    if reason:
        return reason  # e.g. a Responses API request on server-side state
    t = body.get("temperature")
    if t is None:
        t = 1.0  # OpenAI's default
    if not isinstance(t, (int, float)) or isinstance(t, bool) or t > policy.cacheable.max_temperature:
        return "temperature"
    if (body.get("tools") or body.get("functions")) and not policy.cacheable.allow_tools:
        return "tools"
    return ""


class CacheStage:
    def __init__(
        self,
        namespace: str,
        redis: Redis | RedisCluster | None,
        registry: CollectorRegistry | None = None,
        *,
        redis_timeout: float = 0.020,
        background_timeout: float = 0.5,
        sync_interval: float = 0.2,
        epoch_interval: float = 1.0,
        embed_timeout: float | None = None,
        embed_cooldown: float | None = None,
        redis_cooldown: float = 1.0,
        metrics: CacheMetrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        instance: str | None = None,
    ) -> None:
        """`embed_timeout` and `embed_cooldown` (seconds) override every policy's `embeddingTimeoutMs` and
        the embedding circuit's `cooldownSeconds` (benchmarks, tests); None: the policy's. `instance` names
        this sidecar in the reports the operator reads (the pod name; default a random id)."""
        if redis is not None and redis.get_encoder().decode_responses:
            raise ValueError("CacheStage needs a Redis client with decode_responses=False (it stores binary vectors)")
        self.namespace = namespace
        self.metrics = metrics or CacheMetrics(registry)
        self._monotonic = monotonic
        self._wall = wall
        self.guard = RedisGuard(
            redis,
            redis_timeout,
            redis_cooldown,
            on_error=lambda op, why: self.metrics.redis_errors.labels(op, why).inc(),
            monotonic=monotonic,
        )
        self.background_timeout = background_timeout
        self.sync_interval = sync_interval
        self.epoch_interval = epoch_interval
        self.embed_timeout = embed_timeout
        cooldowns = {EMBEDDING: embed_cooldown} if embed_cooldown is not None else {}
        self.health = SemanticHealth(self.metrics, monotonic, wall, cooldowns)
        try:
            self.instance = check_sidecar_id(instance) if instance else uuid.uuid4().hex[:12]
        except ValueError:
            self.instance = uuid.uuid4().hex[:12]
        try:
            self._health_keys: RedisKeys | None = RedisKeys(namespace)
        except ValueError:  # not a namespace name (a hand-written config): no reports to the operator
            self._health_keys = None
        self._policies: dict[str, _PolicyRuntime] = {}
        self._sync_task: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()
        self._next_epoch_check = 0.0
        self._next_sweep = 0.0
        self._next_control_report = 0.0
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def configure(
        self,
        config: RouterConfig,
        embedders: Mapping[str, EmbedFn] | None = None,
        verifiers: Mapping[str, ModelVerifier] | None = None,
    ) -> None:
        """Apply a config load. A policy whose stored-entry settings are unchanged keeps its
        local entries; a changed one starts empty under a new generation.

        `embedders` maps embedding backend names to their EmbedFn, `verifiers` policy names to
        their rerank or judge verifier (`verifiers.verifier_for_policy`)."""
        if config.namespace != self.namespace:
            log.warning(
                "cache: config namespace %s differs from the stage's %s; keys stay in %s",
                config.namespace,
                self.namespace,
                self.namespace,
            )
        embedders = embedders or {}
        verifiers = verifiers or {}
        new: dict[str, _PolicyRuntime] = {}
        parts: list[PartSpec] = []
        for p in config.cache_policies:
            h = policy_hash(p)
            s = p.semantic
            embed = embedders.get(s.embedding_backend) if s.enabled and s.embedding_backend else None
            v = s.verifier_settings
            verifier = verifiers.get(p.name) if s.enabled and v.uses_model else None
            if s.enabled:
                c = s.circuit
                backend = s.embedding_backend or ""
                missing = "" if embed is not None else f"no embedder for backend {backend or '(none)'}"
                parts.append(PartSpec(p.name, EMBEDDING, backend, c.failure_threshold, c.cooldown_seconds, missing))
                if v.uses_model:
                    backend = v.backend or ""
                    missing = "" if verifier is not None else f"no {v.kind.value} verifier for backend {backend}"
                    parts.append(PartSpec(p.name, VERIFIER, backend, c.failure_threshold, c.cooldown_seconds, missing))
            # Kept only for a model verifier; a verifier turned on later keeps the entries (not the
            # generation's business) and reads the questions from Redis until its own are stored.
            verify_bytes = max(p.local_max_bytes // VERIFY_LRU_SHARE, 1 << 20) if s.enabled and v.uses_model else 0
            old = self._policies.get(p.name)
            if old is not None and old.settings_hash == h:
                if not old.control_matches(p):  # a new target or floor: learn again (also drops it when unset)
                    old.control = None
                old.policy, old.embed, old.verifier = p, embed, verifier
                old.verify_lru.max_bytes = verify_bytes
                if not verify_bytes:
                    old.verify_lru.clear()
                new[p.name] = old
                continue
            if old is not None:
                self.metrics.flushes.labels(p.name, "policy_changed").inc()
                log.info("cache policy %s changed: new generation %s, old entries no longer served", p.name, h)
            lru = ByteLRU(p.local_max_bytes)
            new[p.name] = _PolicyRuntime(p, h, lru, embed, verifier, verify_lru=ByteLRU(verify_bytes))
        self._policies = new
        self.health.configure(parts)
        self._next_epoch_check = 0.0

    async def start(self) -> None:
        """Starts the background sync (epochs, semantic inserts). Lookups start it too if needed."""
        if self._sync_task is None and self.guard.client is not None and not self._closed:
            self._sync_task = asyncio.create_task(self._sync_loop(), name="kubetoll-cache-sync")

    async def close(self) -> None:
        """Waits (briefly) for stores in flight, then stops the sync task."""
        self._closed = True
        await self.drain(1.0)
        # This sidecar's reports of a degraded tier leave with it (else they count until their TTL).
        self.health.retire_all()
        try:
            await asyncio.wait_for(self._publish_health(), self.background_timeout)
            await self._retire_control_reports()
        except (TimeoutError, Exception):
            pass
        if self._sync_task is not None:
            self._sync_task.cancel()
            try:
                await self._sync_task
            except (asyncio.CancelledError, Exception):
                pass
            self._sync_task = None

    async def drain(self, timeout: float = 1.0) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout)

    def policy_names(self) -> list[str]:
        return sorted(self._policies)

    # ------------------------------------------------------------------ lookup

    async def lookup(
        self,
        policy: str | None,
        route: str,
        tenant: str,
        endpoint: str,
        body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
        *,
        semantic: bool = True,
        arm: str = "",
    ) -> CacheLookup:
        """Stage 6. `body` is the request as it goes upstream (`ParsedRequest.upstream_body`).

        Never raises for Redis or embedding trouble (those are misses). Pass
        `semantic=False` to skip the paid embedding call (e.g. for a tenant over budget).
        `arm` (`experiment/arm`, under an experiment) partitions the entries by arm.
        """
        rt = self._policies.get(policy) if policy else None
        if rt is None:
            return _OFF
        started = time.perf_counter()
        control = _header(headers, CACHE_CONTROL_HEADER).lower()
        m = self.metrics
        if "no-cache" in control:
            m.lookups.labels(route, rt.name, "bypass").inc()
            return CacheLookup("bypass", reason="no-cache")
        reason = uncacheable_reason(rt.policy, endpoint, body)
        if reason:
            m.lookups.labels(route, rt.name, "uncacheable").inc()
            return CacheLookup("uncacheable", reason=reason)
        if self._sync_task is None and self.guard.client is not None and not self._closed:
            await self.start()
        await self._ensure_epoch(rt)
        normalized = keys.normalize_request(body)
        scope = keys.scope_value(rt.policy, tenant, arm)
        h = keys.exact_key(endpoint, route, scope, normalized)
        lk = CacheLookup(
            "miss", _rt=rt, _route=route, _endpoint=endpoint, _key=h, _gen=rt.gen, _storable="no-store" not in control
        )
        now = self._wall()
        p = rt.policy
        if p.exact.enabled:
            entry = await self._fetch(rt, h, now, p.exact.ttl_seconds)
            if entry is not None:
                return self._hit(rt, lk, CacheHit("exact", rt.name, entry, wall=self._wall), started)
        if p.semantic.enabled and semantic:
            split = keys.semantic_split(endpoint, route, scope, normalized, p.semantic.embed)
            if split is not None:
                hit = await self._semantic(rt, lk, split, now)
                if hit is not None:
                    return self._hit(rt, lk, hit, started)
        rt.stats["misses"] += 1
        m.lookups.labels(route, rt.name, "miss").inc()
        m.lookup_seconds.labels(rt.name, "miss").observe(time.perf_counter() - started)
        return lk

    def _hit(self, rt: _PolicyRuntime, lk: CacheLookup, hit: CacheHit, started: float) -> CacheLookup:
        route, m = lk._route, self.metrics
        lk.status, lk.hit = "hit", hit
        rt.stats["hits"] += 1
        m.lookups.labels(route, rt.name, f"hit_{hit.kind}").inc()
        u = hit.avoided_usage
        m.avoided_tokens.labels(route, rt.name, "input").inc(u.prompt_tokens)
        m.avoided_tokens.labels(route, rt.name, "output").inc(u.completion_tokens)
        m.avoided_usd.labels(route, rt.name, hit.kind).inc(hit.avoided_usd)
        if hit.kind == "semantic":
            m.semantic_similarity.labels(rt.name).observe(hit.similarity)
        m.lookup_seconds.labels(rt.name, f"hit_{hit.kind}").observe(time.perf_counter() - started)
        return lk

    async def _fetch(self, rt: _PolicyRuntime, h: str, now: float, max_age: float) -> Entry | None:
        """The entry stored under `h`, local LRU first, then Redis; None if absent or too old."""
        raw = rt.lru.get(h, now)
        if raw is None and rt.epoch is not None and self.guard.available:
            key = keys.entry_key(self.namespace, rt.name, rt.gen, h)
            try:
                raw = await self.guard.call("get", lambda c: c.get(key))
            except RedisUnavailable:
                raw = None
            if raw is not None:
                try:
                    created = Entry.loads(raw).created
                except (ValueError, KeyError, TypeError):
                    return None
                rt.lru.put(h, raw, created + rt.entry_ttl)
        if raw is None:
            return None
        try:
            entry = Entry.loads(raw)
        except (ValueError, KeyError, TypeError):
            rt.lru.discard(h)
            return None
        if now - entry.created > max_age:
            return None
        return entry

    async def _semantic(
        self, rt: _PolicyRuntime, lk: CacheLookup, split: keys.SemanticSplit, now: float
    ) -> CacheHit | None:
        s = rt.policy.semantic
        v = s.verifier_settings
        if v.uses_model and self.health.blocked(rt.name, VERIFIER):
            # Nothing could be confirmed: no embedding call either (it would be spent for nothing).
            lk.reason = "verifier_unavailable"
            self.metrics.verifier_calls.labels(rt.name, v.kind.value, "skipped").inc()
            return None
        vec = await self._embed(rt, lk, split.text)
        if vec is None:
            return None
        from .verify import signature

        sig = signature(split.text)
        lk._partition, lk._vector, lk._signature, lk._question = split.partition, vec, sig, split.text
        candidates = await self._search(rt.ensure_index(), split.partition, vec, s.threshold, now)
        top = await self._top_candidate(rt, lk, sig, candidates, now)
        if top is None:
            return None
        cand, entry = top
        if not await self._confirm(rt, lk, split.text, cand):
            return None
        ctl = rt.ensure_control()
        if ctl is not None:
            d = ctl.decide(cand.similarity)
            self.metrics.control_decisions.labels(rt.name, d.kind).inc()
            if not d.serve:
                # Explored or below the learned threshold: a miss; its upstream answer teaches the controller.
                if d.explore:
                    lk._probe, lk._probe_entry, lk._probe_control = d, entry, ctl
                lk.reason = "error_control_explore" if d.kind == "explore" else "below_learned_threshold"
                return None
        return CacheHit("semantic", rt.name, entry, cand.similarity, wall=self._wall)

    async def _top_candidate(
        self, rt: _PolicyRuntime, lk: CacheLookup, sig: Signature, candidates: list[Candidate], now: float
    ) -> tuple[Candidate, Entry] | None:
        """The most similar candidate whose answer is still stored and, when the rules run, that passes them.

        The rules are free and can only turn a candidate down, so they filter every candidate;
        a model verifier is then asked about this one only (`_confirm`).
        """
        from .verify import disagreement

        s = rt.policy.semantic
        rules = s.verifier_settings.runs_rules
        index = rt.ensure_index()
        for cand in candidates:
            if rules:
                why = disagreement(sig, cand.signature)
                if why is not None:
                    lk.reason = why
                    self.metrics.semantic_rejections.labels(lk._route, rt.name, why).inc()
                    continue
            entry = await self._fetch(rt, cand.entry_id, now, s.ttl_seconds)
            if entry is None:
                if not self.guard.available and cand.entry_id not in rt.lru:
                    continue  # cannot tell whether it is gone: keep it, try the next
                index.remove(cand.entry_id)
                continue
            return cand, entry
        return None

    async def _confirm(self, rt: _PolicyRuntime, lk: CacheLookup, question: str, cand: Candidate) -> bool:
        """Whether the top candidate is served: the verification step after the search and the rules.

        True for kinds rules and none (the rules already ran in `_top_candidate`). For rerank and
        judge: the score for this pair of questions (cached, or one call to the verifier, billed in
        `lk.verification`) against the verifier's threshold. A cached score needs no call, so it
        serves even if the verifier's circuit opened meanwhile. Anything short of a usable score
        (no client, an open circuit, a failed call, the stored question gone) is a miss, never a hit.
        """
        v = rt.policy.semantic.verifier_settings
        if not v.uses_model:
            return True
        m, kind = self.metrics, v.kind.value
        verifier = rt.verifier
        if verifier is None:  # (degraded from the config load on: `_semantic` stops before the embedding)
            lk.reason = "verifier_unavailable"
            m.verifier_calls.labels(rt.name, kind, "skipped").inc()
            return False
        stored = await self._question(rt, cand.entry_id)
        if stored is None:
            lk.reason = "question_missing"
            m.verifier_calls.labels(rt.name, kind, "no_question").inc()
            return False
        if len(question) > MAX_TEXT_CHARS or len(stored) > MAX_TEXT_CHARS:
            lk.reason = "too_long"
            m.verifier_calls.labels(rt.name, kind, "too_long").inc()
            return False
        pair = keys.digest(keys.canonical_json([verifier.identity, question, stored]))
        score = await self._cached_score(rt, pair)
        if score is not None:
            m.verifier_calls.labels(rt.name, kind, "cached").inc()
        else:
            score = await self._call_verifier(rt, lk, verifier, question, stored, v.timeout_ms / 1000.0)
            if score is None:
                return False
            self._remember_score(rt, pair, score)
        if verifier.accepts(score):
            return True
        lk.reason = kind
        m.semantic_rejections.labels(lk._route, rt.name, kind).inc()
        return False

    async def _call_verifier(
        self, rt: _PolicyRuntime, lk: CacheLookup, verifier: ModelVerifier, question: str, stored: str, timeout: float
    ) -> float | None:
        m, kind = self.metrics, verifier.kind.value
        if not self.health.allow(rt.name, VERIFIER):
            lk.reason = "verifier_unavailable"
            m.verifier_calls.labels(rt.name, kind, "skipped").inc()
            return None
        t0 = time.perf_counter()
        try:
            judgement = await asyncio.wait_for(verifier.score(question, stored), timeout)
        except asyncio.CancelledError:
            self.health.release(rt.name, VERIFIER)
            raise
        except Exception as exc:  # the backend's failure (or an answer without a usable score) is a miss
            why = _describe(exc, timeout)
            self.health.failure(rt.name, VERIFIER, why)
            m.verifier_calls.labels(rt.name, kind, "failed").inc()
            lk.reason = "verifier_failed"
            log.debug("cache policy %s: %s verifier failed: %s", rt.name, kind, why)
            return None
        self.health.success(rt.name, VERIFIER)
        m.verifier_calls.labels(rt.name, kind, "ok").inc()
        m.verifier_usd.labels(rt.name).inc(judgement.cost_usd)
        lk.verification = LookupCharge(
            verifier.backend, judgement.usage, float(judgement.cost_usd), time.perf_counter() - t0
        )
        return judgement.score

    async def _read_through(self, rt: _PolicyRuntime, local: str, op: str, key: Callable[[], str]) -> bytes | None:
        """A verifier's stored text (`local` in this sidecar's LRU, else `key()` in Redis, then kept here)."""
        now = self._wall()
        raw = rt.verify_lru.get(local, now)
        if raw is None and rt.epoch is not None and self.guard.available:
            k = key()
            try:
                raw = await self.guard.call(op, lambda c: c.get(k))
            except RedisUnavailable:
                raw = None
            if raw is not None:
                raw = bytes(raw)
                rt.verify_lru.put(local, raw, now + rt.policy.semantic.ttl_seconds)
        return None if raw is None else bytes(raw)

    async def _question(self, rt: _PolicyRuntime, h: str) -> str | None:
        """The question stored with entry `h`: this sidecar's copy, else Redis's."""
        raw = await self._read_through(
            rt, "q:" + h, "question", lambda: keys.question_key(self.namespace, rt.name, rt.gen, h)
        )
        if raw is None:
            return None
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None

    async def _cached_score(self, rt: _PolicyRuntime, pair: str) -> float | None:
        raw = await self._read_through(
            rt, "v:" + pair, "verdict", lambda: keys.verdict_key(self.namespace, rt.name, rt.gen, pair)
        )
        if raw is None:
            return None
        try:
            score = float(raw.decode())
        except (UnicodeDecodeError, ValueError):
            return None
        return score if math.isfinite(score) else None

    def _remember_score(self, rt: _PolicyRuntime, pair: str, score: float) -> None:
        """Keep the score here and share it through Redis (in the background: never on the request path)."""
        raw = repr(float(score)).encode()
        ttl = rt.policy.semantic.ttl_seconds
        rt.verify_lru.put("v:" + pair, raw, self._wall() + ttl)
        if rt.epoch is None or not self.guard.available or self._closed:
            return
        key = keys.verdict_key(self.namespace, rt.name, rt.gen, pair)

        async def write() -> None:
            try:
                await self.guard.call("verdict", lambda c: c.set(key, raw, ex=ttl), timeout=self.background_timeout)
            except RedisUnavailable:
                pass

        task = asyncio.get_running_loop().create_task(write())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    @staticmethod
    async def _search(
        index: SemanticIndex, partition: str, vec: np.ndarray, threshold: float, now: float
    ) -> list[Candidate]:
        if not index.needs_offload(partition):
            return index.search(partition, vec, threshold, now)
        plan = index.search_plan(partition, vec)
        if plan is None:
            return []
        rows = await asyncio.get_running_loop().run_in_executor(None, plan.top_rows, vec, now, 4)
        return index.rescore(partition, rows, vec, threshold, now)

    async def _embed(self, rt: _PolicyRuntime, lk: CacheLookup, text: str) -> np.ndarray | None:
        m = self.metrics
        if rt.embed is None or not self.health.allow(rt.name, EMBEDDING):
            m.embedding_calls.labels(rt.name, "skipped").inc()
            lk.reason = "embedding_unavailable"
            return None
        timeout = self.embed_timeout if self.embed_timeout is not None else rt.policy.semantic.embedding_timeout
        t0 = time.perf_counter()
        try:
            vectors, usage, cost = await asyncio.wait_for(rt.embed([text]), timeout)
            from .semantic import SemanticIndex

            vec = SemanticIndex.normalise(vectors[0])
            if vec is None:
                raise ValueError("empty or zero vector")
        except asyncio.CancelledError:
            self.health.release(rt.name, EMBEDDING)
            raise
        except Exception as exc:  # the backend's failure is a miss, whatever it is
            why = _describe(exc, timeout)
            self.health.failure(rt.name, EMBEDDING, why)
            m.embedding_calls.labels(rt.name, "failed").inc()
            lk.reason = "embedding_failed"
            # Per request at DEBUG only: the transition to degraded is the WARNING (semantic_health.py).
            log.debug("cache policy %s: embedding failed: %s", rt.name, why)
            return None
        self.health.success(rt.name, EMBEDDING)
        m.embedding_calls.labels(rt.name, "ok").inc()
        m.embedding_usd.labels(rt.name).inc(cost)
        lk.embedding = LookupCharge(
            rt.policy.semantic.embedding_backend or "", usage, float(cost), time.perf_counter() - t0
        )
        return vec

    async def _ensure_epoch(self, rt: _PolicyRuntime) -> None:
        if rt.epoch is not None or not self.guard.available or self._monotonic() < rt.epoch_retry_at:
            return
        key = keys.epoch_key(self.namespace, rt.name)
        try:
            v = await self.guard.call("epoch", lambda c: c.get(key))
        except RedisUnavailable:
            rt.epoch_retry_at = self._monotonic() + 1.0
            return
        rt.set_epoch(int(v or 0), self.metrics)

    # ------------------------------------------------------------------ store

    def store_soon(self, lookup: CacheLookup, response_body: Any, usage: Usage | None, cost_usd: float) -> None:
        """Fire-and-forget `store`: never blocks or fails the response."""
        if not lookup.wants_answer or self._closed:
            return
        task = asyncio.get_running_loop().create_task(self.store(lookup, response_body, usage, cost_usd))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def store(self, lookup: CacheLookup, response_body: Any, usage: Usage | None, cost_usd: float) -> bool:
        """Files a complete answer under the lookup's key (and its question in the semantic index)."""
        rt: _PolicyRuntime | None = lookup._rt
        if rt is None or lookup.status != "miss":
            return False
        if lookup.compares:
            try:
                await self._learn(rt, lookup, response_body)
            except Exception:  # learning must never break the store (or the response)
                log.exception("cache policy %s: answer comparison failed", rt.name)
        m = self.metrics
        if not lookup._storable:
            m.stores.labels(lookup._route, rt.name, "no_store").inc()
            return False
        if not is_complete(lookup._endpoint, response_body):
            m.stores.labels(lookup._route, rt.name, "incomplete").inc()
            return False
        if self._policies.get(rt.name) is not rt or rt.gen != lookup._gen:
            return False  # the policy changed or was flushed since the lookup
        try:
            return await self._store(rt, lookup, response_body, usage, cost_usd)
        except Exception:  # a store must never break anything
            log.exception("cache policy %s: store failed", rt.name)
            return False

    async def _store(
        self,
        rt: _PolicyRuntime,
        lookup: CacheLookup,
        response_body: dict[str, Any],
        usage: Usage | None,
        cost_usd: float,
    ) -> bool:
        m = self.metrics
        now = self._wall()
        body = dict(response_body)
        if usage is None:
            u = body.get("usage") or {}
            usage = Usage(
                int(u.get("prompt_tokens") or 0),
                int(u.get("completion_tokens") or 0),
                int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            )
        elif not body.get("usage"):
            body["usage"] = usage_dict(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        entry = Entry(
            lookup._endpoint,
            body,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            float(cost_usd),
            now,
        )
        raw = entry.dumps()
        ttl = rt.entry_ttl
        h = lookup._key
        rt.lru.put(h, raw, now + ttl)
        p = rt.policy
        # The question's vector and signature: both set when the lookup embedded it and the policy is semantic.
        vector, sig = (lookup._vector, lookup._signature) if p.semantic.enabled else (None, None)
        sem_expires = now + p.semantic.ttl_seconds
        # The question goes with a semantic entry (a rerank or judge verifier compares it; turned on
        # later, it finds the questions of the entries already stored). Too long to verify: not kept.
        question = lookup._question.encode() if vector is not None and len(lookup._question) <= MAX_TEXT_CHARS else b""
        if vector is not None and sig is not None:
            rt.ensure_index().add(h, lookup._partition, vector, sig, sem_expires)
            if question:
                rt.verify_lru.put("q:" + h, question, sem_expires)
        if rt.epoch is None or not self.guard.available:
            m.stores.labels(
                lookup._route, rt.name, "redis_unavailable" if self.guard.client is not None else "stored"
            ).inc()
            return True
        ek = keys.entry_key(self.namespace, rt.name, rt.gen, h)
        lk = keys.log_key(self.namespace, rt.name, rt.gen)
        qk = keys.question_key(self.namespace, rt.name, rt.gen, h)

        async def write(c: Any) -> Any:
            pipe = c.pipeline(transaction=False)
            pipe.set(ek, raw, ex=ttl)
            if vector is not None and sig is not None:
                fields = {
                    "h": h,
                    "p": lookup._partition,
                    "v": vector.tobytes(),
                    "s": sig.to_json(),
                    "x": repr(sem_expires),
                }
                pipe.xadd(lk, fields, maxlen=p.semantic.max_entries, approximate=True)
                pipe.expire(lk, p.semantic.ttl_seconds + 60)
                if question:
                    pipe.set(qk, question, ex=p.semantic.ttl_seconds)
            return await pipe.execute()

        try:
            await self.guard.call("store", write, timeout=self.background_timeout)
        except RedisUnavailable:
            m.stores.labels(lookup._route, rt.name, "redis_unavailable").inc()
            return True
        m.stores.labels(lookup._route, rt.name, "stored").inc()
        return True

    async def _learn(self, rt: _PolicyRuntime, lookup: CacheLookup, response_body: Any) -> None:
        """Error control: compare the fresh answer with the candidate's cached one and report the verdict.

        The answers are compared by text, then numbers, then (when the embedding backend is up) the
        cosine of their embeddings, a call billed like the lookup's own (`bill_later`). An unreadable
        answer or a failed embedding call is inconclusive: nothing is reported rather than a guess.
        """
        d, cached, ctl = lookup._probe, lookup._probe_entry, lookup._probe_control
        lookup._probe = lookup._probe_entry = lookup._probe_control = None
        if d is None or cached is None or ctl is None or rt.control is not ctl:
            return  # the policy was reconfigured since the lookup: its controller starts afresh
        m = self.metrics
        fresh = answer_text(lookup._endpoint, response_body) if is_complete(lookup._endpoint, response_body) else None
        old = answer_text(cached.endpoint, cached.body)
        if fresh is None or old is None:
            m.control_comparisons.labels(rt.name, "unreadable").inc()
            return
        s = rt.policy.semantic
        charges: list[LookupCharge] = []
        similarity = None
        if rt.embed is not None and self.health.allow(rt.name, EMBEDDING):
            embed = rt.embed
            timeout = self.embed_timeout if self.embed_timeout is not None else s.embedding_timeout
            t0 = time.perf_counter()

            async def timed(texts: list[str]) -> Any:
                try:
                    out = await asyncio.wait_for(embed(texts), timeout)
                except asyncio.CancelledError:
                    self.health.release(rt.name, EMBEDDING)
                    raise
                except Exception as exc:
                    self.health.failure(rt.name, EMBEDDING, _describe(exc, timeout))
                    m.embedding_calls.labels(rt.name, "failed").inc()
                    raise
                self.health.success(rt.name, EMBEDDING)
                m.embedding_calls.labels(rt.name, "ok").inc()
                return out

            def charge(usage: Any, cost: float) -> None:
                m.embedding_usd.labels(rt.name).inc(cost)
                charges.append(LookupCharge(s.embedding_backend or "", usage, float(cost), time.perf_counter() - t0))

            similarity = embedding_similarity(timed, charge)
        result = await answers_match(fresh, old, similarity=similarity, min_similarity=s.answer_match_similarity)
        if lookup.bill_later is not None:
            for c in charges:
                await lookup.bill_later(CACHE_EMBEDDING_OUTCOME, c)
        m.control_comparisons.labels(rt.name, result.reason).inc()
        if result.conclusive:
            ctl.observe(d, result.match)
            self._publish_control(rt)

    def _publish_control(self, rt: _PolicyRuntime) -> None:
        ctl, m = rt.control, self.metrics
        if ctl is None:
            return
        snap = ctl.snapshot()
        nan = float("nan")
        m.control_threshold.labels(rt.name).set(snap.threshold if snap.threshold is not None else nan)
        est = snap.estimated_error_rate
        m.control_error_rate.labels(rt.name).set(est if est is not None else nan)
        m.control_exploration_rate.labels(rt.name).set(snap.exploration_rate)
        m.control_target.labels(rt.name).set(snap.target_error_rate)

    # ------------------------------------------------------------------ background sync

    async def _sync_loop(self) -> None:
        while not self._closed:
            more = False
            try:
                more = await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cache sync failed")
            if not more:
                await asyncio.sleep(self.sync_interval)

    async def sync_once(self) -> bool:
        """One round: epochs (when due), then new semantic inserts. True when a stream had more to read."""
        now_m = self._monotonic()
        rts = list(self._policies.values())
        self._publish_gauges(rts)
        if not self.guard.available:
            return False
        await self._publish_health()
        if now_m >= self._next_control_report and await self._publish_control_reports(rts):
            self._next_control_report = now_m + CONTROL_REPORT_SECONDS
        if not rts:
            return False
        if now_m >= self._next_epoch_check:
            ekeys = [keys.epoch_key(self.namespace, rt.name) for rt in rts]
            try:
                vals = await self.guard.call("epoch", lambda c: c.mget(ekeys), timeout=self.background_timeout)
            except RedisUnavailable:
                return False
            for rt, v in zip(rts, vals):
                rt.set_epoch(int(v or 0), self.metrics)
            self._next_epoch_check = now_m + self.epoch_interval
        now = self._wall()
        if now_m >= self._next_sweep:
            for rt in rts:
                if rt.index is not None:
                    rt.index.sweep(now)
            self._next_sweep = now_m + 10.0
        sem = [rt for rt in rts if rt.semantic_on and rt.epoch is not None]
        if not sem:
            return False
        streams = {keys.log_key(self.namespace, rt.name, rt.gen): rt for rt in sem}
        cursors = {k: rt.cursor for k, rt in streams.items()}
        batch = 1000
        try:
            res = await self.guard.call(
                "sync", lambda c: c.xread(cursors, count=batch), timeout=self.background_timeout
            )
        except RedisUnavailable:
            return False
        more = False
        for stream_key, records in res or ():
            sk = stream_key.decode() if isinstance(stream_key, bytes) else stream_key
            srt = streams.get(sk)
            if srt is None or keys.log_key(self.namespace, srt.name, srt.gen) != sk:
                continue  # the generation changed while we read
            index = srt.ensure_index()
            for rid, fields in records:
                self._apply(index, fields, now)
                srt.cursor = rid.decode() if isinstance(rid, bytes) else rid
            more = more or len(records) >= batch
        return more

    async def _publish_health(self) -> None:
        """Write the semantic tier's transitions (and the refreshes of degraded parts) for the operator."""
        updates = self.health.due()
        hk = self._health_keys
        if not updates or hk is None or not self.guard.available:
            return
        from kubetoll_core.cache_health import TTL_SECONDS, report_field

        async def write(c: Any) -> Any:
            pipe = c.pipeline(transaction=False)
            for u in updates:
                key, name = hk.cache_health(u.policy), report_field(u.part, self.instance)
                if u.report is None:
                    pipe.hdel(key, name)
                else:
                    pipe.hset(key, name, u.report.to_json())
                    pipe.expire(key, int(TTL_SECONDS) + 1)
            return await pipe.execute()

        try:
            await self.guard.call("health", write, timeout=self.background_timeout)
        except (RedisUnavailable, ValueError):  # ValueError: a policy name no key can hold
            return
        self.health.written(updates)

    async def _publish_control_reports(self, rts: list[_PolicyRuntime]) -> bool:
        """Each error-rate controller's state, for the CachePolicy's status (kubetoll_core.cache_health).
        True when reports were written (the next are due in CONTROL_REPORT_SECONDS)."""
        hk = self._health_keys
        live = [rt for rt in rts if rt.control is not None]
        if hk is None or not live or not self.guard.available:
            return False
        from kubetoll_core.cache_health import TTL_SECONDS, ControlReport

        until = self._wall() + TTL_SECONDS
        reports = []
        for rt in live:
            assert rt.control is not None
            snap = rt.control.snapshot()
            counts = {
                "explored": snap.explored,
                "exploredWrong": snap.explored_wrong,
                "samples": snap.samples,
                "served": int(snap.decisions.get("hit", 0)),
                "verifiedCorrect": snap.verified_correct,
                "verifiedWrong": snap.verified_wrong,
            }
            report = ControlReport(snap.target_error_rate, snap.threshold, snap.exploration_rate, counts, until)
            reports.append((hk.cache_control(rt.name), report.to_json()))

        async def write(c: Any) -> Any:
            pipe = c.pipeline(transaction=False)
            for key, raw in reports:
                pipe.hset(key, self.instance, raw)
                pipe.expire(key, int(TTL_SECONDS) + 1)
            return await pipe.execute()

        try:
            await self.guard.call("control", write, timeout=self.background_timeout)
        except RedisUnavailable:
            return False
        return True

    async def _retire_control_reports(self) -> None:
        hk = self._health_keys
        names = [rt.name for rt in self._policies.values() if rt.control is not None]
        if hk is None or not names or not self.guard.available:
            return

        async def write(c: Any) -> Any:
            pipe = c.pipeline(transaction=False)
            for name in names:
                pipe.hdel(hk.cache_control(name), self.instance)
            return await pipe.execute()

        try:
            await self.guard.call("control", write, timeout=self.background_timeout)
        except RedisUnavailable:
            return

    @staticmethod
    def _apply(index: SemanticIndex, fields: Mapping[Any, Any], now: float) -> None:
        import numpy as np

        from .verify import Signature

        def f(name: str) -> Any:
            return fields.get(name.encode(), fields.get(name))

        try:
            expires = float(f("x"))
            if expires <= now:
                return
            h = f("h")
            h = h.decode() if isinstance(h, bytes) else h
            if h in index:
                return
            part = f("p")
            part = part.decode() if isinstance(part, bytes) else part
            vec = np.frombuffer(f("v"), dtype=np.float32).copy()
            sig = bytes(f("s"))
            Signature.from_json(sig)  # refuse a record this version cannot read
        except (TypeError, ValueError, AttributeError):
            return  # a record this sidecar cannot read: skip it
        index.add(h, part, vec, sig, expires)

    def _publish_gauges(self, rts: list[_PolicyRuntime]) -> None:
        m = self.metrics
        for rt in rts:
            m.local_entries.labels(rt.name, "lru").set(len(rt.lru))
            m.local_bytes.labels(rt.name, "lru").set(rt.lru.bytes)
            if rt.index is not None:
                m.local_entries.labels(rt.name, "semantic_index").set(len(rt.index))
                m.local_bytes.labels(rt.name, "semantic_index").set(rt.index.nbytes)
            if rt.control is not None:
                self._publish_control(rt)

    # ------------------------------------------------------------------ ledger

    @staticmethod
    def spend_record(
        lookup: CacheLookup,
        *,
        time_: float,
        namespace: str,
        tenant: str,
        tier: str,
        request_id: str,
        workload: str = "",
    ) -> SpendRecord | None:
        """The ledger record of a cache hit: no backend, no tokens billed, zero cost, the savings."""
        hit = lookup.hit
        if hit is None:
            return None
        return SpendRecord(
            time=time_,
            namespace=namespace,
            route=lookup._route,
            backend="",
            tenant=tenant,
            tier=tier,
            prompt_tokens=0,
            completion_tokens=0,
            cached_tokens=0,
            cost_usd=0.0,
            cache_hit=hit.kind,
            avoided_usd=hit.avoided_usd,
            outcome="ok",
            request_id=request_id,
            workload=workload,
        )

    @staticmethod
    def embedding_record(
        lookup: CacheLookup,
        *,
        time_: float,
        namespace: str,
        tenant: str,
        tier: str,
        request_id: str,
        workload: str = "",
    ) -> SpendRecord | None:
        """The ledger record of the embedding call a semantic lookup made (hit or miss)."""
        if lookup.embedding is None:
            return None
        return CacheStage.charge_record(
            lookup,
            lookup.embedding,
            CACHE_EMBEDDING_OUTCOME,
            time_=time_,
            namespace=namespace,
            tenant=tenant,
            tier=tier,
            request_id=request_id,
            workload=workload,
        )

    @staticmethod
    def charge_record(
        lookup: CacheLookup,
        charge: LookupCharge,
        outcome: str,
        *,
        time_: float,
        namespace: str,
        tenant: str,
        tier: str,
        request_id: str,
        workload: str = "",
        model: str = "",
    ) -> SpendRecord:
        """The ledger record of one call a semantic lookup made (`lookup.charges`): the embedding
        (outcome cache_embedding) or the verifier (cache_verifier); spend, not a request."""
        e = charge
        return SpendRecord(
            time=time_,
            namespace=namespace,
            route=lookup._route,
            backend=e.backend,
            model=model,
            tenant=tenant,
            tier=tier,
            prompt_tokens=e.usage.prompt_tokens,
            completion_tokens=e.usage.completion_tokens,
            cached_tokens=0,
            cost_usd=e.cost_usd,
            outcome=outcome,
            request_id=request_id,
            workload=workload,
        )
