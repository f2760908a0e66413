"""The load of an in-cluster backend's replicas, read from their Prometheus metrics, and the choice among them.

The operator writes a backend's ready replicas into the RouterConfig (`Backend.replicas`,
from the Service's EndpointSlices). With `loadMetrics` set, this module reads each
replica's `/metrics` (the path and interval from `loadMetrics`) and keeps, per
replica, the gauges that say how loaded it is:

* vllm: `vllm:num_requests_waiting`, `vllm:num_requests_running`,
  `vllm:gpu_cache_usage_perc` (vLLM v1 calls it `vllm:kv_cache_usage_perc`);
* tgi: `tgi_queue_size`, `tgi_batch_current_size`;
* sglang: `sglang:num_queue_reqs`, `sglang:num_running_reqs`, `sglang:token_usage`.

A gauge with several series (one per model or engine) is summed (the cache usage:
its largest). The forwarder asks `pick` for the replica an attempt goes to: the
replicas whose load is known first (with a spill-over depth, those not deeper than
it), the shortest waiting queue, then the lowest KV cache usage, then the fewest
requests this sidecar has in flight there; ties are taken in turn. A replica whose
last good read is older than `staleAfterSeconds` (unreachable, or answering what does
not parse) counts as unknown: still used, after the known healthy ones, by requests in
flight. A replica a call could not connect to, or that timed out, goes after all the
others for `staleAfterSeconds` (5 s without loadMetrics). `all_deeper_than` is the
spill-over test (docs/routing.md): true only when every replica's load is known and
each waiting queue is deeper than the route's `spillover.queueDepth`.

Time is the injected monotonic clock: a replica is read again when `intervalSeconds`
have passed on it, and a test that holds the clock still decides every read itself
with `poll_once`. A read that started before another one of the same replica and
ends after it is dropped, so a slow answer never overwrites a newer one.

Only the text format's sample lines are read, each name compared first, so a page of
histograms costs a scan; a page over `MAX_METRICS_BYTES` is not read at all.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from kubetoll_core.enums import LoadMetricsFormat
from kubetoll_core.router_config import Backend

from .metrics import Metrics

log = logging.getLogger("kubetoll.replicas")

MAX_METRICS_BYTES = 8 * 1024 * 1024
# Without loadMetrics: how long a replica that failed to connect or timed out goes last.
FAILED_HOLD_SECONDS = 5.0
# Gauge names per format: (waiting, running, kv cache usage 0..1). Several names: any that is present.
GAUGES: dict[LoadMetricsFormat, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    LoadMetricsFormat.vllm: (
        ("vllm:num_requests_waiting",),
        ("vllm:num_requests_running",),
        ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    ),
    LoadMetricsFormat.tgi: (("tgi_queue_size",), ("tgi_batch_current_size",), ()),
    LoadMetricsFormat.sglang: (("sglang:num_queue_reqs",), ("sglang:num_running_reqs",), ("sglang:token_usage",)),
}


@dataclass(frozen=True, slots=True)
class Load:
    """One good read of a replica's gauges (None: the page had no such gauge)."""

    waiting: float | None
    running: float | None
    kv_cache: float | None
    at: float  # monotonic time of the read


def parse_load(text: str, fmt: LoadMetricsFormat, at: float) -> Load:
    """The load gauges of one Prometheus text page. Raises ValueError when it has none of them."""
    names = GAUGES[fmt]
    wanted = {n: i for i, group in enumerate(names) for n in group}
    prefixes = tuple(wanted)
    sums: list[float | None] = [None, None, None]
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith(prefixes):
            continue  # comments (# HELP, # TYPE) and every other metric
        brace = line.find("{")
        if brace >= 0:
            name = line[:brace]
            close = line.rfind("}")
            rest = line[close + 1 :].split() if close > brace else []
        else:
            parts = line.split()
            name, rest = parts[0], parts[1:]
        slot = wanted.get(name)
        if slot is None or not rest:
            continue  # a longer name with a wanted prefix (vllm:num_requests_waiting_by_reason, say)
        try:
            value = float(rest[0])
        except ValueError:
            continue
        if not math.isfinite(value) or value < 0:
            continue
        current = sums[slot]
        if slot == 2:  # a usage ratio: the fullest engine is the one that queues
            sums[slot] = value if current is None else max(current, value)
        else:
            sums[slot] = value if current is None else current + value
    if all(v is None for v in sums):
        raise ValueError(f"no {fmt.value} load gauges in the page")
    return Load(sums[0], sums[1], sums[2], at)


@dataclass(slots=True)
class Replica:
    """One replica of one backend: its address, its last good read, what this sidecar has in flight there."""

    backend: str
    name: str
    url: str  # the API base URL
    metrics_url: str
    load: Load | None = None
    in_flight: int = 0
    last_poll: float | None = None  # monotonic start of the last read begun
    failed_at: float | None = None  # monotonic time a call to it last failed to connect or timed out
    _started: int = 0  # the sequence number of the read that gave `load`
    _view: tuple[Backend, Backend] | None = field(default=None, repr=False)

    def backend_view(self, b: Backend) -> Backend:
        """`b` with this replica's URL as its endpoint (what the translator builds the request on)."""
        view = self._view
        if view is None or view[0] is not b:
            view = self._view = (b, b.model_copy(update={"endpoint": self.url}))
        return view[1]


def metrics_url(replica_url: str, path: str) -> str:
    parts = urlsplit(replica_url)
    return f"{parts.scheme}://{parts.netloc}{path}"


class ReplicaLoads:
    """Every backend's replicas and their load; one instance per sidecar, configured at each config load."""

    def __init__(self, metrics: Metrics | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.monotonic = monotonic
        self._backends: dict[str, Backend] = {}
        self._replicas: dict[str, list[Replica]] = {}
        self._turn: dict[str, itertools.count[int]] = {}
        self._seq = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ configuration

    def configure(self, backends: Iterable[Backend]) -> None:
        """Take a config's backends: replicas kept across reloads keep their load; the others are dropped."""
        new: dict[str, list[Replica]] = {}
        configs: dict[str, Backend] = {}
        for b in backends:
            if not b.replicas:
                continue
            configs[b.name] = b
            old = {r.url: r for r in self._replicas.get(b.name, ())}
            path = b.load_metrics.path if b.load_metrics is not None else "/metrics"
            kept = []
            for rep in b.replicas:
                r = old.get(rep.url)
                if r is None or r.name != rep.name:
                    r = Replica(b.name, rep.name, rep.url, metrics_url(rep.url, path))
                else:
                    r.metrics_url = metrics_url(rep.url, path)
                kept.append(r)
            new[b.name] = kept
        if self.metrics is not None:
            live = {(r.backend, r.name) for rs in new.values() for r in rs}
            for rs in self._replicas.values():
                for r in rs:
                    if (r.backend, r.name) not in live:
                        self.metrics.forget_replica(r.backend, r.name)
        self._backends, self._replicas = configs, new
        self._turn = {name: self._turn.get(name) or itertools.count() for name in new}

    def replicas(self, backend: str) -> list[Replica]:
        return list(self._replicas.get(backend, ()))

    def _polled(self) -> list[tuple[Backend, Replica]]:
        out: list[tuple[Backend, Replica]] = []
        for name, rs in self._replicas.items():
            b = self._backends[name]
            if b.load_metrics is not None and b.load_metrics.format is not LoadMetricsFormat.none:
                out.extend((b, r) for r in rs)
        return out

    # ------------------------------------------------------------------ reading

    async def poll_once(self, *, only_due: bool = False) -> None:
        """Read every polled replica once (with `only_due`, those whose interval has passed), at once."""
        now = self.monotonic()
        due = [
            (b, r)
            for b, r in self._polled()
            if not only_due
            or r.last_poll is None
            or now - r.last_poll >= (b.load_metrics.interval_seconds if b.load_metrics else 1.0)
        ]
        if due:
            await asyncio.gather(*(self._read(b, r) for b, r in due))

    async def _read(self, b: Backend, r: Replica) -> None:
        lm = b.load_metrics
        assert lm is not None
        seq = next(self._seq)
        r.last_poll = self.monotonic()
        session = self._session_get()
        try:
            timeout = aiohttp.ClientTimeout(total=lm.timeout_seconds)
            async with session.get(r.metrics_url, timeout=timeout, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                if (resp.content_length or 0) > MAX_METRICS_BYTES:
                    raise ValueError("metrics page too large")
                body = await resp.content.read(MAX_METRICS_BYTES + 1)
                if len(body) > MAX_METRICS_BYTES:
                    raise ValueError("metrics page too large")
            load = parse_load(body.decode("utf-8", "replace"), lm.format, self.monotonic())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            # Kept as last read: it goes stale after staleAfterSeconds and then counts as unknown.
            log.debug("replica %s of backend %s: metrics not read (%s)", r.name, r.backend, type(exc).__name__)
            return
        if seq < r._started:
            return  # a newer read already answered
        r.load, r._started = load, seq
        if self.metrics is not None and load.waiting is not None:
            self.metrics.replica_queue_depth.labels(r.backend, r.name).set(load.waiting)

    def _session_get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Its own small pool: a slow metrics page never takes a connection a request needs.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def start(self, tick: float = 0.1) -> None:
        """Read the due replicas every `tick` seconds of the event loop, until `close`."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(tick), name="kubetoll-replica-load")

    async def _loop(self, tick: float) -> None:
        while True:
            try:
                await self.poll_once(only_due=True)
            except Exception:  # a bug in one read must not end the reads of every backend
                log.exception("reading replica load failed")
            # Nothing to read (no backend with replicas and loadMetrics): a slower beat until a reload adds one.
            await asyncio.sleep(tick if self._polled() else 1.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ choosing

    def fresh(self, b: Backend, r: Replica) -> Load | None:
        """The replica's load if it is known: read, and not older than staleAfterSeconds."""
        lm = b.load_metrics
        if r.load is None or lm is None or lm.format is LoadMetricsFormat.none:
            return None
        if self.monotonic() - r.load.at > lm.stale_after_seconds:
            return None
        return r.load

    def mark_failed(self, r: Replica) -> None:
        """A call to `r` could not connect or timed out: it goes last for a while (its pod may be gone
        before the operator's next EndpointSlice update takes it out of the config)."""
        r.failed_at = self.monotonic()

    def _key(self, b: Backend, r: Replica, depth: int | None) -> tuple[int, float, float, int]:
        if r.failed_at is not None:
            hold = b.load_metrics.stale_after_seconds if b.load_metrics is not None else FAILED_HOLD_SECONDS
            if self.monotonic() - r.failed_at < hold:
                return (3, 0.0, 0.0, r.in_flight)
            r.failed_at = None
        load = self.fresh(b, r)
        if load is None:
            return (1, 0.0, 0.0, r.in_flight)  # unknown: after every known healthy replica
        waiting = load.waiting or 0.0
        # Deeper than the route's spill-over depth: known to be slow, so after the unknown ones.
        rank = 2 if depth is not None and waiting > depth else 0
        return (rank, waiting, load.kv_cache or 0.0, r.in_flight)

    def pick(self, b: Backend, depth: int | None = None) -> Replica | None:
        """The replica an attempt on `b` goes to (None: `b` has none; its endpoint is called). `depth`: the
        route's spillover.queueDepth, past which a known replica ranks after the unknown ones."""
        rs = self._replicas.get(b.name)
        if not rs:
            return None
        keys = [self._key(b, r, depth) for r in rs]
        best = min(keys)
        ties = [r for r, k in zip(rs, keys, strict=True) if k == best]
        return ties[next(self._turn[b.name]) % len(ties)]

    def all_deeper_than(self, b: Backend, depth: int) -> bool:
        """Whether every replica of `b` is known to have more than `depth` requests waiting."""
        rs = self._replicas.get(b.name)
        if not rs:
            return False
        for r in rs:
            load = self.fresh(b, r)
            if load is None or load.waiting is None or load.waiting <= depth:
                return False
        return True
