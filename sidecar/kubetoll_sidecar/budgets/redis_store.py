"""RedisBudgetStore: budgets shared by every sidecar of a namespace, with leased quotas.

The model is Google's Doorman and Envoy's rate-limit quota service: a sidecar
leases a slice of each meter's remaining amount and spends it locally, so
`reserve` and `settle` need no Redis round trip while the lease lasts. A
background task (one at a time, never on a request's path unless the lease ran
out) does everything else in one Lua script per call (`redis_scripts.SYNC`):
it writes settled spend (period totals and ledger records together, so they
agree exactly), renews, grows, shrinks or returns leases, and reads the kill
switch.

Lease sizing (docs/redis-layout.md states the overshoot bound):

- this sidecar wants about `lease_seconds` of its own recent consumption
  (EWMA of what it reserved), and at least two of its largest recent holds;
- the script grants at most `frac * unleased / holders` more at a time (more
  only when a waiting request needs it and it is there), so leases shrink as a
  meter nears its limit and are shared among the sidecars using it;
- `spent + sum(leases) <= limit` holds in Redis for every grant; a sidecar
  only reserves within its lease, so with Redis answering the limit is never
  passed by enforced holds (settling above the estimate aside).

Failure: no request waits on Redis longer than `timeout_ms`. While Redis does not
answer, failClosed meters serve only from a lease still valid and raise
`StoreUnavailable` beyond it; failOpen meters also spend the rest of their lease
and then a small allowance per meter and period (`fail_open_fraction` of the
limit divided by the leaseholders last seen; for buckets a fair share of the
refill). Settled spend is buffered (bounded) and written when Redis returns,
exactly once: each flush batch has a number remembered in Redis per sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import NoScriptError, RedisError

from kubetoll_core.meters import scale_of, to_units
from kubetoll_core.periods import Clock, SystemClock
from kubetoll_core.redis_connect import connect_redis, default_sidecar_id, is_cluster
from kubetoll_core.redis_keys import (
    BUCKET_IDLE_GRACE_MS,
    INDEX_TTL_S,
    MeterKeys,
    RedisKeys,
    check_name,
    check_sidecar_id,
    period_of,
    window_expire_at,
)
from kubetoll_core.router_config import BudgetStoreSettings
from kubetoll_core.spend_record import SpendRecord, encode_record

from .redis_scripts import SYNC
from .store import Exhausted, Hold, Meter, MeterState, Reservation, StoreUnavailable, Suspended

log = logging.getLogger("kubetoll.budgets.redis")

_INF = float("inf")
_SIDECAR_KEY_TTL_MS = 7 * 86_400_000  # how long Redis remembers a sidecar's last flush batch
MAX_METERS_PER_CALL = 500  # a script runs alone in Redis: keep each one short


@dataclass(slots=True)
class _Lease:
    """One meter as this sidecar sees it. Amounts are integers in the meter's scale."""

    meter: Meter
    keys: MeterKeys
    scale: int
    limit: int
    bucket: bool
    lease: int = 0  # granted by Redis (last reply)
    deadline: float = -_INF  # monotonic: not spent past this while Redis answers
    cap_in_flight: int | None = None  # a call that may shrink the lease is out: spend at most this
    reserved: int = 0
    unflushed: int = 0  # settled, not yet confirmed written (open batch and the batch in flight)
    extra: int = 0  # failOpen allowance spent that Redis does not know of yet
    allowance_used: int = 0
    # last reply
    g_total: int = 0  # window: spent; bucket: level outside every lease
    g_leased: int = 0
    g_holders: int = 0
    g_seen: float = -_INF  # monotonic
    # sizing
    rate: float = 0.0  # units per second, EWMA of what was reserved
    consumed: int = 0
    rate_at: float = 0.0
    max_hold: int = 0
    target: int = 0
    need: int = 0  # what waiting reserves need, summed
    need_min: int = 0  # the smallest of them
    release: bool = False  # a request found the meter exhausted: give unused lease back
    last_used: float = 0.0

    def usable_lease(self, mono: float, degraded: bool) -> int:
        lease = self.lease if self.cap_in_flight is None else min(self.lease, self.cap_in_flight)
        if mono >= self.deadline and not (degraded and self.meter.fail_open):
            return 0
        return lease

    def free(self, mono: float, degraded: bool = False) -> int:
        return self.usable_lease(mono, degraded) + self.extra - self.reserved - self.unflushed

    def room(self, mono: float) -> int:
        """Unleased amount in Redis, as of the last reply (buckets: plus refill since)."""
        if not self.bucket:
            return self.limit - self.g_total - self.g_leased
        if self.g_seen == -_INF:
            return self.limit
        refill = self.meter.refill_per_second * self.scale * max(mono - self.g_seen, 0.0)
        return int(min(self.limit - self.g_leased, self.g_total + refill))


@dataclass(slots=True)
class _Batch:
    no: int
    deltas: dict[str, int]
    records: list[list[str]]
    homes: set[str]  # home tags whose part is not confirmed yet


@dataclass(slots=True)
class _Call:
    home: str
    keys: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    meters: list[dict[str, Any]] = field(default_factory=list)
    leases: list[tuple[_Lease, int]] = field(default_factory=list)  # (state, delta applied in this call)
    budgets: list[str] = field(default_factory=list)
    budget_entries: list[list[Any]] = field(default_factory=list)
    batch: int = 0
    records: list[list[str]] = field(default_factory=list)
    new_budgets: list[str] = field(default_factory=list)

    def key(self, k: str) -> int:
        i = self.index.get(k)
        if i is None:
            self.keys.append(k)
            i = self.index[k] = len(self.keys)
        return i


class RedisBudgetStore:
    """The Redis `BudgetStore`. Build it, `await start()`, share it; `await close()` on shutdown."""

    def __init__(
        self,
        settings: BudgetStoreSettings,
        namespace: str,
        credentials_dir: str,
        sidecar_id: str | None = None,
        clock: Clock | None = None,
        *,
        client: Any = None,
        lease_ttl: float = 10.0,
        lease_seconds: float = 2.0,
        lease_fraction: float = 0.5,
        flush_interval: float = 0.1,
        batch_records: int = 500,
        max_buffered_records: int = 100_000,
        fail_open_fraction: float = 0.01,
        suspend_poll_interval: float = 1.0,
        pubsub: bool = True,
        negative_cache: float = 0.25,
        io_timeout: float | None = None,
    ) -> None:
        self.settings = settings
        self.keys = RedisKeys(namespace)
        self.namespace = namespace
        self.sidecar_id = check_sidecar_id(sidecar_id or default_sidecar_id())
        self._clock = clock or SystemClock()
        self._timeout = settings.timeout_ms / 1000.0
        self._io_timeout = io_timeout if io_timeout is not None else max(0.5, 5 * self._timeout)
        self._own_client = client is None
        self._client = (
            client if client is not None else connect_redis(settings, credentials_dir, io_timeout=self._io_timeout)
        )
        self._cluster = is_cluster(self._client)
        self._ledger_retention_ms = settings.ledger_retention_days * 86_400_000
        self.lease_ttl = lease_ttl
        self.lease_seconds = lease_seconds
        self.lease_fraction = lease_fraction
        self.flush_interval = flush_interval
        self.batch_records = batch_records
        self.max_buffered_records = max_buffered_records
        self.fail_open_fraction = fail_open_fraction
        self.suspend_poll_interval = suspend_poll_interval
        self._use_pubsub = pubsub
        self._negative_cache = negative_cache

        self._leases: dict[str, _Lease] = {}
        self._dirty: set[str] = set()
        self._budgets: set[str] = set()
        self._unindexed: set[str] = set()
        self._suspended: set[str] = set()
        self._budget_holders: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._batch_no = 0
        self._open_deltas: dict[str, int] = {}
        self._open_records: deque[list[str]] = deque()
        self._open_since: float | None = None
        self._frozen: _Batch | None = None
        self._recent: deque[SpendRecord] = deque(maxlen=10_000)
        self._epochs: dict[str, str] = {}
        self._sha: str | None = None

        self._healthy = True
        self._degraded_since = 0.0
        self._last_outage_log = -_INF
        self._logged_outage = False
        self._retry_at = 0.0
        self._backoff = 0.05
        self._reregister = False
        self._topup = False
        self._sync_requested = False
        self._last_sync = -_INF
        self._next_renew = _INF
        self._next_scan = 0.0
        self._waiters: list[asyncio.Future[bool]] = []
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._started = False
        self._closing = False
        self._closed = False

        # counters and gauges (the sidecar turns stats() into metrics)
        self.redis_calls = 0  # commands sent (a script call is one)
        self.redis_errors = 0
        self.reserves = 0
        self.syncs = 0
        self.buffered_records_peak = 0
        self.dropped_records = 0
        self.dropped_spend_batches = 0
        self.history_lost_total = 0
        self.duplicate_batches_total = 0  # flushes Redis had already applied (a retry after a lost reply)
        self.unavailable_total = 0  # times the store found Redis unreachable or too slow
        self.degraded_decisions_total = 0  # reserves decided without Redis
        self.fail_open_allowance_used_total = 0
        self.contention_rejections_total = 0  # Redis answered, but no lease came free in time

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the script, take a first look at Redis and warm connections (at most `io_timeout`), start the tasks.

        Redis being away is not an error: the store starts unavailable and keeps trying.
        """
        if self._started:
            return
        self._started = True
        self._wake = asyncio.Event()
        try:
            await _bounded(self._load_script(), self._io_timeout)
            # A first sync (epoch, budget index) and warm connections for the flusher, the
            # poller and the subscription (which holds one), so no request pays for
            # connecting: a TLS handshake alone can take longer than timeout_ms.
            self.redis_calls += 3
            ok, *pings = await asyncio.gather(
                self._sync(self._io_timeout),
                *(_bounded(self._client.ping(), self._io_timeout) for _ in range(3)),
                return_exceptions=True,  # the sync must be over before the flusher starts
            )
            for r in (ok, *pings):
                if isinstance(r, BaseException):
                    raise r
            if not ok:
                raise ConnectionError("the first sync failed")
        except (TimeoutError, RedisError, OSError) as exc:
            self._mark_unavailable(f"at start: {type(exc).__name__}: {exc}")
        self._start_tasks()

    def _start_tasks(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._started = True
        self._tasks.append(asyncio.create_task(self._worker(), name="kubetoll-budget-sync"))
        self._tasks.append(asyncio.create_task(self._poller(), name="kubetoll-budget-poll"))
        if self._use_pubsub:
            self._tasks.append(asyncio.create_task(self._listener(), name="kubetoll-budget-events"))

    async def close(self, timeout: float = 2.0) -> None:
        """Return leases and write buffered spend (bounded by `timeout`), then stop."""
        if self._closed:
            return
        self._closing = True
        worker = self._tasks[0] if self._tasks else None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        self._fail_waiters()
        if worker is not None or self._open_deltas or self._open_records or self._frozen:
            deadline = time.monotonic() + timeout
            for _ in range(1 + self.max_buffered_records // max(self.batch_records, 1)):
                left = deadline - time.monotonic()
                if left <= 0 or not await self._sync(min(left, self._io_timeout), final=True):
                    break
                if not (self._frozen or self._open_deltas or self._open_records or self._dirty):
                    break
        lost = len(self._open_records) + (len(self._frozen.records) if self._frozen else 0)
        if self._open_deltas or self._frozen:
            self.dropped_spend_batches += 1
            log.warning("budget store closing with spend not written to Redis (%d ledger records)", lost)
        self._closed = True
        if self._own_client:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    # ------------------------------------------------------------------ BudgetStore

    async def reserve(self, holds: Sequence[Hold], now: float) -> Reservation:
        if not self._started:
            self._start_tasks()  # start() was not awaited: no warm-up, no wait beyond timeout_ms either
        if self._closing:
            raise StoreUnavailable("the budget store is shutting down")
        for h in holds:
            if h.meter.budget in self._suspended:
                raise Suspended(h.meter.budget)
        self.reserves += 1
        mono = time.monotonic()
        leases = self._leases
        sts: list[_Lease] = []
        amts: list[int] = []
        fits = self._healthy
        for h in holds:
            m = h.meter
            st = leases.get(m.key)
            if st is None or st.meter is not m:
                st = self._state(m, mono)
            amt = int(round(h.amount * st.scale))
            sts.append(st)
            amts.append(amt)
            if fits and h.enforce and amt > st.free(mono):
                fits = False
        if fits:  # the common case: every hold fits this sidecar's leases, no I/O
            return self._commit(holds, sts, amts, mono)
        deadline = mono + self._timeout
        waited = False
        while True:
            if not self._healthy:
                return self._reserve_degraded(holds, sts, amts, now, mono)
            missing: list[int] = []
            for i, h in enumerate(holds):
                if not h.enforce:
                    continue
                st, amt = sts[i], amts[i]
                free = st.free(mono)
                if amt <= free:
                    continue
                if self._known_exhausted(st, amt, free, mono):
                    if not missing:  # the first hold in order that does not fit decides, as in memory
                        raise self._exhausted(h, st, amt, free, now, mono)
                    continue
                missing.append(i)
            if not missing:
                return self._commit(holds, sts, amts, mono)
            if mono >= deadline:
                # Redis answers, but what it granted went to other requests first and this one
                # is out of time. Not an outage, so no failOpen allowance: with Redis answering,
                # enforced holds never take a meter past its limit. The client retries shortly.
                self.contention_rejections_total += 1
                label = holds[missing[0]].meter.label if missing else holds[0].meter.label
                raise StoreUnavailable(
                    f"{label}: no share of the budget came free within {self.settings.timeout_ms:g} ms "
                    "(other sidecars hold the rest of it); retry shortly"
                )
            # Not enough lease: one round trip for every meter short of it, and for every
            # request waiting on the same meter (their needs add up).
            for i in missing:
                st = sts[i]
                st.need_min = min(st.need_min, amts[i]) if st.need else amts[i]
                st.need += amts[i]
                st.max_hold = max(st.max_hold, amts[i])
                self._dirty.add(st.meter.key)
            await self._await_sync(deadline - mono, first=not waited)
            waited = True
            mono = time.monotonic()
            for h in holds:
                if h.meter.budget in self._suspended:
                    raise Suspended(h.meter.budget)

    async def settle(self, reservation: Reservation, actual: Mapping[str, float], now: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        extra = reservation.extra
        amts = extra.get("units")
        sts = extra.get("states")
        if amts is None or sts is None:  # not one of ours (or built by hand): look the meters up
            mono = time.monotonic()
            sts = [self._leases.get(h.meter.key) or self._state(h.meter, mono) for h in reservation.holds]
            amts = [to_units(h.amount, st.scale) for h, st in zip(reservation.holds, sts)]
        deltas = self._open_deltas
        leases = self._leases
        for h, st, amt in zip(reservation.holds, sts, amts):
            if leases.get(h.meter.key) is not st:  # forgotten while idle: track it again
                leases[h.meter.key] = st
            st.reserved -= amt
            a = actual.get(h.meter.key)
            if a and a > 0:
                u = int(round(a * st.scale))
                st.unflushed += u
                key = h.meter.key
                deltas[key] = deltas.get(key, 0) + u
                if self._open_since is None:
                    self._open_since = time.monotonic()

    def snapshot(self, meter: Meter, now: float) -> MeterState:
        st = self._leases.get(meter.key)
        if st is None:
            return MeterState(used=0.0, limit=meter.limit)
        mono = time.monotonic()
        if st.bucket:
            level = st.free(mono, not self._healthy) + max(st.room(mono), 0)
            return MeterState(used=meter.limit - level / st.scale, limit=meter.limit)
        others = max(st.g_leased - st.lease, 0)
        used = st.g_total + others + st.reserved + st.unflushed
        return MeterState(used=used / st.scale, limit=meter.limit)

    def is_suspended(self, budget: str) -> bool:
        return budget in self._suspended

    # ------------------------------------------------------------------ extras

    def watch_budgets(self, budgets: Sequence[str]) -> None:
        """Budgets whose kill switch to poll before any request touched them (the sidecar passes its config's)."""
        for b in budgets:
            self._add_budget(check_name("budget", b))

    def add_record(self, record: SpendRecord) -> None:
        """Queue a ledger record; it is written with the next flush (RedisLedger.append lands here)."""
        self._recent.append(record)
        if (
            self._closed
            or len(self._open_records) + (len(self._frozen.records) if self._frozen else 0) >= self.max_buffered_records
        ):
            self.dropped_records += 1
            return
        self._open_records.append(encode_record(record, self.sidecar_id))
        if self._open_since is None:
            self._open_since = time.monotonic()
        n = len(self._open_records)
        if n > self.buffered_records_peak:
            self.buffered_records_peak = n
        if n >= self.batch_records and self._wake is not None:
            self._wake.set()

    def recent_records(self, since: float = 0.0, until: float | None = None) -> list[SpendRecord]:
        return [r for r in list(self._recent) if r.time >= since and (until is None or r.time < until)]

    @property
    def available(self) -> bool:
        return self._healthy

    def stats(self) -> dict[str, float]:
        frozen = len(self._frozen.records) if self._frozen else 0
        return {
            "redis_calls": self.redis_calls,
            "redis_errors": self.redis_errors,
            "reserves": self.reserves,
            "syncs": self.syncs,
            "leases_active": sum(1 for s in self._leases.values() if s.lease > 0),
            "meters_tracked": len(self._leases),
            "buffered_records": len(self._open_records) + frozen,
            "buffered_spend_meters": len(self._open_deltas) + (len(self._frozen.deltas) if self._frozen else 0),
            "dropped_records": self.dropped_records,
            "dropped_spend_batches": self.dropped_spend_batches,
            "history_lost_total": self.history_lost_total,
            "duplicate_batches_total": self.duplicate_batches_total,
            "unavailable_total": self.unavailable_total,
            "degraded_decisions_total": self.degraded_decisions_total,
            "fail_open_allowance_used_total": self.fail_open_allowance_used_total,
            "contention_rejections_total": self.contention_rejections_total,
            "available": 1.0 if self._healthy else 0.0,
            "suspended_budgets": len(self._suspended),
        }

    # ------------------------------------------------------------------ reserve helpers

    def _state(self, m: Meter, mono: float) -> _Lease:
        st = self._leases.get(m.key)
        if st is None:
            scale = scale_of(m.unit)
            st = _Lease(
                m,
                self.keys.meter(m.budget, m.key),
                scale,
                to_units(m.limit, scale),
                m.kind == "bucket",
                rate_at=mono,
                last_used=mono,
            )
            self._leases[m.key] = st
            if m.budget not in self._budgets:
                self._add_budget(m.budget)
        elif st.meter is not m:
            # A new Meter object per request (admission builds them); the config may have changed its limit.
            if m.limit != st.meter.limit:
                st.limit = to_units(m.limit, st.scale)
            st.meter = m
        return st

    def _add_budget(self, budget: str) -> None:
        if budget not in self._budgets:
            self._budgets.add(budget)
            self._unindexed.add(budget)

    def _known_exhausted(self, st: _Lease, amt: int, free: int, mono: float) -> bool:
        if amt > st.limit:
            return True  # larger than the whole meter: never fits
        return mono - st.g_seen < self._negative_cache and amt > free + max(st.room(mono), 0)

    def _exhausted(self, h: Hold, st: _Lease, amt: int, free: int, now: float, mono: float) -> Exhausted:
        m = h.meter
        if free > 0 and st.lease > 0:
            # This sidecar holds a sliver no request of its own can use: give it back now,
            # another sidecar's request may fit in it.
            st.release = True
            self._dirty.add(m.key)
            if not self._topup:
                self._topup = True
                if self._wake is not None:
                    self._wake.set()
        available = (free + max(st.room(mono), 0)) / st.scale
        if m.kind == "bucket":
            if h.amount > m.limit or m.refill_per_second <= 0:
                retry: float | None = None
            else:
                retry = max(h.amount - available, 0.0) / m.refill_per_second
            return Exhausted(m, h.amount, available, retry)
        return Exhausted(m, h.amount, available, max(m.period_end - now, 0.0))

    def _commit(self, holds: Sequence[Hold], sts: list[_Lease], amts: list[int], mono: float) -> Reservation:
        for st, amt in zip(sts, amts):
            st.reserved += amt
            st.consumed += amt
            st.last_used = mono
            if amt > st.max_hold:
                st.max_hold = amt
            # Below half the lease this sidecar wants: top it up in the background, before
            # a request has to wait for it (unless Redis said nothing is left).
            if (st.lease + st.extra - st.reserved - st.unflushed) * 2 < st.target and st.room(mono) > 0:
                self._dirty.add(st.meter.key)
                if not self._topup:
                    self._topup = True
                    if self._wake is not None:
                        self._wake.set()
        return Reservation(id=str(next(self._ids)), holds=list(holds), extra={"units": amts, "states": sts})

    def _reserve_degraded(
        self, holds: Sequence[Hold], sts: list[_Lease], amts: list[int], now: float, mono: float
    ) -> Reservation:
        """Redis is not answering: serve from leases, then from the failOpen allowance."""
        self.degraded_decisions_total += 1
        grants: list[tuple[_Lease, int]] = []
        for i, h in enumerate(holds):
            if not h.enforce:
                continue
            st, amt = sts[i], amts[i]
            free = st.free(mono, degraded=True)
            if amt <= free:
                continue
            if amt > st.limit:
                raise self._exhausted(h, st, amt, free, now, mono)
            if not h.meter.fail_open:
                raise StoreUnavailable(f"{h.meter.label}: Redis is not answering and the budget is failClosed")
            short = amt - max(free, 0)
            if st.allowance_used + short > self._allowance(st, mono):
                raise StoreUnavailable(f"{h.meter.label}: Redis is not answering and the failOpen allowance is used up")
            grants.append((st, short))
        for st, short in grants:
            st.extra += short
            st.allowance_used += short
            self.fail_open_allowance_used_total += 1
        return self._commit(holds, sts, amts, mono)

    def _allowance(self, st: _Lease, mono: float) -> int:
        holders = max(st.g_holders, self._budget_holders.get(st.meter.budget, 0), 1)
        if st.bucket:
            # A fair share of the bucket: its capacity and refill divided among the sidecars last seen.
            refill = st.meter.refill_per_second * st.scale * max(mono - self._degraded_since, 0.0)
            return int((st.limit + refill) / holders)
        return math.ceil(self.fail_open_fraction * st.limit / holders)

    async def _await_sync(self, timeout: float, first: bool) -> bool:
        assert self._wake is not None
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake.set()
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                return await asyncio.shield(fut)
        except TimeoutError:
            if first:  # a whole timeout_ms without an answer; a later, shorter wait proves nothing
                self._mark_unavailable(f"no answer within {self.settings.timeout_ms:g} ms")
            return False

    # ------------------------------------------------------------------ health

    def _mark_unavailable(self, why: str) -> None:
        if self._healthy:
            mono = time.monotonic()
            self._healthy = False
            self.unavailable_total += 1
            self._degraded_since = mono
            # A bucket's allowance is its share of capacity plus refill since this outage
            # began, so what an earlier outage used does not count against it.
            for st in self._leases.values():
                if st.bucket:
                    st.allowance_used = 0
            self._backoff = 0.05
            self._retry_at = mono + self._backoff
            # One line per outage, and at most one every 10 s when Redis flaps.
            self._logged_outage = mono - self._last_outage_log >= 10.0
            if self._logged_outage:
                self._last_outage_log = mono
                log.warning("Redis budget store unavailable (%s); failOpen budgets serve on local allowances", why)

    def _mark_available(self) -> None:
        if not self._healthy:
            self._healthy = True
            if self._logged_outage:
                log.warning("Redis budget store available again after %.1fs", time.monotonic() - self._degraded_since)

    def _fail_waiters(self) -> None:
        for f in self._waiters:
            if not f.done():
                f.set_result(False)
        self._waiters.clear()

    # ------------------------------------------------------------------ background

    async def _worker(self) -> None:
        assert self._wake is not None
        while not self._closing and not _cancelling():
            delay = self._next_delay()
            if delay > 0 and not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            self._wake.clear()
            mono = time.monotonic()
            try:
                if not self._due(mono):
                    continue
                ok = await self._sync(self._io_timeout)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the flusher for good
                log.exception("budget sync failed unexpectedly")
                self._mark_unavailable("internal error")
                ok = False
            if not ok:
                self._backoff = min(self._backoff * 2, 1.0)
                self._retry_at = time.monotonic() + self._backoff

    def _next_delay(self) -> float:
        mono = time.monotonic()
        if self._waiters:
            return 0.0
        t = mono + 0.25
        if not self._healthy:
            t = min(t, self._retry_at)
        else:
            if self._open_since is not None:
                t = min(t, self._open_since + self.flush_interval)
            t = min(t, self._next_renew, self._next_scan)
        return max(t - mono, 0.0)

    def _due(self, mono: float) -> bool:
        if not self._healthy:
            if mono >= self._retry_at:
                return True
            self._fail_waiters()
            return False
        if self._waiters or self._frozen is not None or self._reregister or self._sync_requested or self._unindexed:
            return True
        if len(self._open_records) >= self.batch_records:
            return True
        if self._open_since is not None and mono - self._open_since >= self.flush_interval:
            return True
        if self._topup and mono - self._last_sync >= 0.01:
            return True
        if mono >= self._next_renew:
            return True
        if mono >= self._next_scan:
            self._next_scan = mono + 1.0
            return self._scan(mono)
        return False

    def _scan(self, mono: float) -> bool:
        """Once a second: leases to return (idle, period over), states to forget. True if a sync is wanted."""
        want = False
        wall = self._clock.time()
        for key, st in list(self._leases.items()):
            idle = st.reserved == 0 and st.unflushed == 0 and st.extra == 0
            if (
                st.lease == 0
                and idle
                and mono - st.last_used > 600
                and (st.allowance_used == 0 or (not st.bucket and st.meter.period_end < wall))
            ):
                del self._leases[key]
                self._dirty.discard(key)
                continue
            if st.lease > 0 and (
                mono - st.last_used > 2 * self.lease_seconds or (not st.bucket and st.meter.period_end <= wall)
            ):
                self._dirty.add(key)
                want = True
        return want

    def _choose(self, mono: float, final: bool) -> list[_Lease]:
        keys = set(self._dirty)
        self._dirty.clear()
        if self._frozen is not None:
            keys.update(self._frozen.deltas)
        renew = mono >= self._next_renew
        if self._reregister or final or renew:
            for k, st in self._leases.items():
                if (
                    st.lease
                    or st.reserved
                    or st.unflushed
                    or st.extra
                    or (renew and st.deadline - mono < self.lease_ttl / 2)
                ):
                    keys.add(k)
        # Bounded work per script (Redis runs it alone): the frozen batch's meters first (their
        # spend must go with it), then meters requests wait on, then the rest; the rest of the
        # rest goes in the next call, right after.
        first = self._frozen.deltas.keys() if self._frozen is not None else ()
        out = [self._leases[k] for k in first if k in self._leases]
        rest = [self._leases[k] for k in keys.difference(first) if k in self._leases]
        rest.sort(key=lambda st: st.need == 0)
        room = max(MAX_METERS_PER_CALL - len(out), 0)
        if len(rest) > room:
            self._dirty.update(st.meter.key for st in rest[room:])
            self._sync_requested = True
            rest = rest[:room]
        return out + rest

    def _home(self, budget: str | None) -> str:
        if budget is None or not self._cluster:
            return self.keys.ns_tag
        return self.keys.budget_tag(budget)

    def _freeze(self, mono: float) -> None:
        if self._frozen is not None or not (self._open_deltas or self._open_records):
            return
        self._batch_no += 1
        recs = [self._open_records.popleft() for _ in range(min(self.batch_records, len(self._open_records)))]
        deltas = self._open_deltas
        self._open_deltas = {}
        if len(deltas) > MAX_METERS_PER_CALL:
            keep = list(deltas)[MAX_METERS_PER_CALL:]
            self._open_deltas = {k: deltas.pop(k) for k in keep}
        homes = {self._home(k.split(":", 1)[0]) for k in deltas}  # a meter key starts with its budget
        if recs:
            homes.add(self._home(None))
        self._frozen = _Batch(self._batch_no, deltas, recs, homes)
        self._open_since = mono if self._open_records or self._open_deltas else None

    def _update_rate(self, st: _Lease, mono: float) -> None:
        dt = mono - st.rate_at
        if dt >= 0.05:
            inst = st.consumed / dt
            alpha = 1.0 - math.exp(-dt / 1.0)
            st.rate += alpha * (inst - st.rate)
            st.consumed = 0
            st.rate_at = mono
        st.target = int(max(st.rate * self.lease_seconds, 2 * st.max_hold))

    async def _sync(self, timeout: float, final: bool = False) -> bool:
        """One round trip per home slot. True when every call succeeded."""
        mono = time.monotonic()
        self._freeze(mono)
        waiters, self._waiters = self._waiters, []
        self._topup = False
        self._sync_requested = False
        reregister, self._reregister = self._reregister, False
        chosen = self._choose(mono, final or reregister)
        wall = self._clock.time()
        frozen = self._frozen
        calls: dict[str, _Call] = {}

        def call_for(home: str) -> _Call:
            c = calls.get(home)
            if c is None:
                c = calls[home] = _Call(home)
                c.key(self.keys.sidecar(home, self.sidecar_id))
                c.key(self.keys.epoch(home))
                if frozen is not None and home in frozen.homes:
                    c.batch = frozen.no
            return c

        if frozen is not None:
            for home in frozen.homes:
                call_for(home)
            if frozen.records and self._home(None) in frozen.homes:
                call_for(self._home(None)).records = frozen.records
        for st in chosen:
            m = st.meter
            home = self._home(m.budget)
            c = call_for(home)
            d = frozen.deltas.get(m.key, 0) if frozen is not None and c.batch else 0
            self._update_rate(st, mono)
            floor = max(st.reserved + st.unflushed - d, 0)
            target = st.target
            if final or m.budget in self._suspended or st.release or (not st.bucket and m.period_end <= wall):
                target = 0
            if mono - st.last_used > 2 * self.lease_seconds:
                target = 0  # idle: give it back
            want = floor + target
            need = floor + st.need if st.need else 0
            nmin = floor + st.need_min if st.need else 0
            st.release = False
            st.need = st.need_min = 0
            if want < st.lease:
                st.cap_in_flight = want  # the lease shrinks: do not spend what is being returned
            if m.budget not in c.budgets:
                c.budgets.append(m.budget)
            entry: dict[str, Any] = {
                "h": c.key(st.keys.state),
                "x": c.key(st.keys.holders),
                "ix": c.key(self.keys.meter_index(m.budget)),
                "kind": m.kind,
                "unit": m.unit,
                "label": m.label,
                "b": m.budget,
                "k": st.keys.suffix,
                "scale": st.scale,
                "limit": st.limit,
                "d": d,
                "floor": floor,
                "need": need,
                "nmin": nmin,
                "want": max(want, need),
            }
            if st.bucket:
                entry["refill"] = m.refill_per_second * st.scale / 1000.0
            else:
                entry["refill"] = 0
                entry["pend"] = int(m.period_end * 1000)
                entry["period"] = period_of(m.key)[1]
                entry["exp"] = int(window_expire_at(m.key, m.period_end) * 1000)
            c.meters.append(entry)
            c.leases.append((st, d))
        if self._unindexed or not calls:
            # New budgets go into the namespace's budget index; with nothing else to do the
            # call is a probe, which also tells whether Redis lost its data.
            call_for(self._home(None)).new_budgets = sorted(self._unindexed)
        for c in calls.values():
            c.budget_entries = [[b, c.key(self.keys.suspended(b)), c.key(self.keys.meter_index(b))] for b in c.budgets]

        seq = next(self._seq)
        sent = time.monotonic()
        try:
            results = await asyncio.gather(
                *(self._call(c, seq, timeout) for c in calls.values()), return_exceptions=True
            )
        except BaseException:
            for f in waiters:
                if not f.done():
                    f.set_result(False)
            raise
        self.syncs += 1
        self._last_sync = time.monotonic()
        all_ok = True
        for c, res in zip(calls.values(), results):
            if isinstance(res, BaseException):
                all_ok = False
                self.redis_errors += 1
                if isinstance(res, asyncio.CancelledError):
                    raise res
                for st, _ in c.leases:
                    self._dirty.add(st.meter.key)
                log.debug("budget sync to %s failed: %r", c.home, res)
                continue
            self._apply(c, res, sent, frozen)
        if frozen is not None and not frozen.homes:
            self._frozen = None
            if (self._open_records or self._open_deltas) and self._wake is not None:
                self._wake.set()
        if all_ok:
            self._mark_available()
            self._next_renew = min(
                (s.deadline - self.lease_ttl / 2 for s in self._leases.values() if s.lease > 0), default=_INF
            )
        else:
            self._mark_unavailable("a sync call failed")
        for f in waiters:
            if not f.done():
                f.set_result(all_ok)
        return all_ok

    async def _call(self, c: _Call, seq: int, timeout: float) -> list:
        payload: dict[str, Any] = {
            "sid": self.sidecar_id,
            "seq": seq,
            "batch": c.batch,
            "sk": 1,
            "ek": 2,
            "sk_ttl": _SIDECAR_KEY_TTL_MS,
            "epoch_new": f"{int(time.time() * 1000)}-{os.urandom(4).hex()}",
            "budgets": c.budget_entries,
            "meters": c.meters,
            "ttl": int(self.lease_ttl * 1000),
            "frac": self.lease_fraction,
            "ix_ttl": INDEX_TTL_S * 1000,
            "grace": BUCKET_IDLE_GRACE_MS,
            "lk": 0,
            "recs": [],
            "keep_ms": self._ledger_retention_ms,
        }
        if c.records and c.batch:
            payload["lk"] = c.key(self.keys.ledger())
            payload["recs"] = c.records
        if c.home == self.keys.ns_tag:
            payload["bi"] = c.key(self.keys.budgets_index())
            payload["new_budgets"] = c.new_budgets
        body = orjson.dumps(payload)
        async with asyncio.timeout(timeout):
            return await self._evalsha(c.keys, body)

    async def _load_script(self) -> None:
        self.redis_calls += 1
        self._sha = await self._client.script_load(SYNC)

    async def _evalsha(self, keys: list[str], body: bytes) -> list:
        if self._sha is None:
            await self._load_script()
        self.redis_calls += 1
        try:
            return await self._client.evalsha(self._sha, len(keys), *keys, body)
        except NoScriptError:
            # Redis restarted (or SCRIPT FLUSH): load it again.
            await self._load_script()
            self.redis_calls += 1
            return await self._client.evalsha(self._sha, len(keys), *keys, body)

    def _apply(self, c: _Call, res: list, sent: float, frozen: _Batch | None) -> None:
        status, epoch, _now_ms, susp, out = res
        if status == "dup":
            self.duplicate_batches_total += 1
        if status == "stale":
            log.error(
                "budget sync for %s was refused as stale: is another process using sidecar id %s?",
                c.home,
                self.sidecar_id,
            )
            return
        known = self._epochs.get(c.home)
        if known is None:
            self._epochs[c.home] = epoch
        elif known != epoch:
            self._epochs[c.home] = epoch
            self.history_lost_total += 1
            self._reregister = True
            log.warning(
                "Redis lost the budget history of %s (epoch %s -> %s, e.g. restarted empty): totals restart from zero; re-registering this sidecar's leases",
                c.home,
                known,
                epoch,
            )
        for (b, *_), flag in zip(c.budget_entries, susp):
            self._set_suspended_local(b, bool(int(flag)))
        mono = time.monotonic()
        deadline = sent + self.lease_ttl * 0.8
        for (st, d), row in zip(c.leases, out):
            lease, total, leased, holders = (int(v) for v in row)
            st.lease = lease
            st.cap_in_flight = None
            st.extra = 0
            st.deadline = deadline
            st.g_total, st.g_leased, st.g_holders, st.g_seen = total, leased, holders, mono
            if holders > self._budget_holders.get(st.meter.budget, 0):
                self._budget_holders[st.meter.budget] = holders
            if c.batch and d:
                st.unflushed -= d
        if frozen is not None and c.batch == frozen.no:
            frozen.homes.discard(c.home)
        self._unindexed.difference_update(c.new_budgets)

    # ------------------------------------------------------------------ kill switch

    def _set_suspended_local(self, budget: str, on: bool) -> None:
        if on and budget not in self._suspended:
            self._suspended.add(budget)
            log.warning("budget %s suspended (kill switch in Redis): admitting nothing under it", budget)
            # Give back what is leased under it.
            for k, st in self._leases.items():
                if st.meter.budget == budget and st.lease:
                    self._dirty.add(k)
            self._sync_requested = True
            if self._wake is not None:
                self._wake.set()
        elif not on and budget in self._suspended:
            self._suspended.discard(budget)
            log.warning("budget %s no longer suspended", budget)

    async def _poller(self) -> None:
        """The backstop for pub/sub (a message sent while our subscription was down is lost)."""
        while not self._closing and not _cancelling():
            try:
                await self._poll_once()
            except (TimeoutError, RedisError, OSError) as exc:
                log.debug("suspension poll failed: %r", exc)
            except Exception:
                log.exception("suspension poll failed unexpectedly")
            await asyncio.sleep(self.suspend_poll_interval)

    async def _poll_once(self) -> None:
        budgets = sorted(self._budgets | self._suspended)
        if not budgets:
            return
        keys = [self.keys.suspended(b) for b in budgets]
        if self._cluster:
            self.redis_calls += len(keys)
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
            values = await _bounded(pipe.execute(), self._io_timeout)
        else:
            self.redis_calls += 1
            values = await _bounded(self._client.mget(keys), self._io_timeout)
        for b, v in zip(budgets, values):
            self._set_suspended_local(b, v is not None)

    async def _listener(self) -> None:
        backoff = 0.1
        channel = self.keys.channel()
        while not self._closing and not _cancelling():
            ps = None
            try:
                ps = self._client.pubsub()
                self.redis_calls += 1
                await _bounded(ps.subscribe(channel), self._io_timeout)
                backoff = 0.1
                await self._poll_once()  # whatever was published while we were not subscribed
                while not self._closing and not _cancelling():
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg and msg.get("type") == "message":
                        self._on_event(msg.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnect on anything: this task must not die
                log.debug("kill-switch subscription lost: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if ps is not None:
                    with contextlib.suppress(Exception):
                        await ps.aclose()

    def _on_event(self, data: Any) -> None:
        try:
            ev = orjson.loads(data)
            budget = check_name("budget", ev["budget"])
            on = bool(ev["suspended"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed kill-switch message")
            return
        self._set_suspended_local(budget, on)


def _cancelling() -> bool:
    """A cancel was requested (a library may have swallowed the CancelledError): a loop must end."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _bounded(aw: Any, timeout: float) -> Any:
    async with asyncio.timeout(timeout):
        return await aw
