"""RedisBudgetStore: budgets shared by every sidecar of a namespace, with leased quotas.

The model is Google's Doorman and Envoy's rate-limit quota service: a sidecar
leases a slice of each meter's remaining amount and spends it locally, so
`reserve` and `settle` need no Redis round trip while the lease lasts. A
background task (one at a time, never on a request's path unless the lease ran
out) does everything else in one Lua script per call (`redis_scripts.SYNC`):
it writes settled spend (period totals and ledger records together, so they
agree exactly), renews, grows, shrinks or returns leases, and reads the kill
switch.

The parts: `leases` (what this sidecar holds of each meter, pure arithmetic),
`redis_sync` (the spend buffer, batches and the script call), `suspensions`
(the kill switch, watched by pub/sub and a poll) and `StoreCounters` (what
`stats()` reports). This module decides when to sync and what a reserve does.

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
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    RedisError,
    ResponseError,
)

from kubetoll_core.periods import Clock, SystemClock
from kubetoll_core.redis_connect import RedisCredentials, connect_redis, default_sidecar_id, is_cluster
from kubetoll_core.redis_keys import (
    BUCKET_IDLE_GRACE_MS,
    INDEX_TTL_S,
    RedisKeys,
    check_name,
    check_sidecar_id,
    period_of,
    window_expire_at,
)
from kubetoll_core.router_config import BudgetStoreSettings
from kubetoll_core.spend_record import SpendRecord, encode_record, encode_record_checked

from ..record_ring import RecordRing
from .journal import JOURNAL_INTERVAL, LeftJournal, StateDir
from .leases import Lease
from .redis_sync import MAX_METERS_PER_CALL, Batch, SpendBuffer, SyncCall, SyncScript
from .store import Hold, Meter, MeterState, Reservation, StoreUnavailable, Suspended
from .suspensions import SuspensionWatcher, bounded, cancelling

log = logging.getLogger("kubetoll.budgets.redis")

_INF = float("inf")
# After an outage, how long Redis keeps back what the sidecars not yet heard from may have
# spent of their failOpen allowances (`owe` in the SYNC script): each retries within its
# backoff (at most 1 s) plus the I/O timeout, so one that has not called by then is gone.
OWE_HORIZON_MS = 5_000
_SIDECAR_KEY_TTL_MS = 7 * 86_400_000  # how long Redis remembers a sidecar's last flush batch


@dataclass(slots=True)
class StoreCounters:
    """Counters of the Redis store; each field is a `stats()` entry (and a `kubetoll_budget_store` sample)."""

    redis_calls: int = 0  # commands sent (a script call is one)
    redis_errors: int = 0
    reserves: int = 0
    syncs: int = 0
    buffered_records_peak: int = 0
    dropped_records: int = 0
    quarantined_records: int = 0  # records the codec had to alter: sent to the quarantine stream, not the ledger
    dropped_spend_batches: int = 0
    history_lost_total: int = 0
    duplicate_batches_total: int = 0  # flushes Redis had already applied (a retry after a lost reply)
    unavailable_total: int = 0  # times the store found Redis unreachable or too slow
    degraded_decisions_total: int = 0  # reserves decided without Redis
    fail_open_allowance_used_total: int = 0
    contention_rejections_total: int = 0  # Redis answered, but no lease came free in time
    slow_decisions_total: int = 0  # reserves decided without Redis because it had not answered in time
    evicted_meters: int = 0  # local meter states forgotten early because the table passed budgetStore.maxMeters
    replayed_batches_total: int = 0  # flush batches of a stopped process replayed from its journal
    replayed_records_total: int = 0
    replay_duplicates_total: int = 0  # ...of them, ones Redis had applied already (the writer got them through)


@dataclass(slots=True)
class LeasedReservation(Reservation):
    """A reservation taken from this sidecar's leases: the amounts in each meter's units, and the leases."""

    units: tuple[int, ...] = ()
    leases: tuple[Lease, ...] = ()


class RedisBudgetStore:
    """The Redis `BudgetStore`.

    Build it on a client (`connect` builds one it owns), `await start()`, share it,
    and `await close()` on shutdown.
    """

    kind = "redis"

    def __init__(
        self,
        client: Any,
        settings: BudgetStoreSettings,
        namespace: str,
        sidecar_id: str | None = None,
        clock: Clock | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        own_client: bool = False,
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
        state_dir: str | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.keys = RedisKeys(namespace)
        self.namespace = namespace
        self.sidecar_id = check_sidecar_id(sidecar_id or default_sidecar_id())
        self._clock = clock or SystemClock()
        self._mono = monotonic
        self._timeout = settings.timeout_ms / 1000.0
        self._io_timeout = io_timeout if io_timeout is not None else max(0.5, 5 * self._timeout)
        self._own_client = own_client
        self._cluster = is_cluster(client)
        self._ledger_retention_ms = settings.ledger_retention_days * 86_400_000
        self.lease_ttl = lease_ttl
        self.lease_seconds = lease_seconds
        self.lease_fraction = lease_fraction
        self.flush_interval = flush_interval
        self.fail_open_fraction = fail_open_fraction
        self._use_pubsub = pubsub
        self._negative_cache = negative_cache

        self.counters = StoreCounters()
        self._script = SyncScript(client, self._count_call)
        self._buffer = SpendBuffer(batch_records, max_buffered_records)
        self._suspensions = SuspensionWatcher(
            client,
            self.keys,
            cluster=self._cluster,
            io_timeout=self._io_timeout,
            poll_interval=suspend_poll_interval,
            on_suspended=self._give_back_leases_of,
            count_call=self._count_calls,
        )
        self._leases: dict[str, Lease] = {}
        self._dirty: set[str] = set()
        self._unindexed: set[str] = set()
        self._budget_holders: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._recent = RecordRing(10_000)  # for /kubetoll/v1/spend's view of this sidecar, held compressed
        self._last_quarantine_log = -_INF
        self._epochs: dict[str, str] = {}

        # On local disk (journal.py): spend Redis has not confirmed, and the allowance used.
        self._disk = StateDir.open(state_dir, self.sidecar_id)
        self._left: list[LeftJournal] = self._disk.left_journals() if self._disk else []
        kept = self._disk.read_allowances() if self._disk else {}
        self._adopted: dict[str, dict[str, Any]] = dict(kept.get("meters") or {})
        self._adopted_outage: float | None = kept.get("outage_since")  # wall clock
        self._journal_at = -_INF
        self._journaled = -1  # SpendBuffer.changes when the journal was last written
        self._journal_on_disk = False
        self._allowance_dirty = False
        self._allowance_at = -_INF
        self._last_disk_error_log = -_INF

        self._healthy = True
        self._unavailable_why = ""
        self._rtt = 0.0  # EWMA of a whole sync's round trip (seconds)
        self._last_reply = -_INF  # monotonic: the last sync every call of which succeeded
        self.expected_sidecars = settings.expected_sidecars
        self._degraded_since = 0.0
        self._last_outage_log = -_INF
        self._last_refusal_log = -_INF
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
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closing = False
        self._closed = False

    @classmethod
    def connect(
        cls, settings: BudgetStoreSettings, namespace: str, credentials_dir: str, **kwargs: Any
    ) -> RedisBudgetStore:
        """A store with a client of its own for `settings.url` (closed with the store)."""
        # connect_redis applies the same io_timeout default as the store (5 x timeout_ms, at least 0.5 s).
        client = connect_redis(
            settings, RedisCredentials.for_store(settings, credentials_dir), io_timeout=kwargs.get("io_timeout")
        )
        return cls(client, settings, namespace, own_client=True, **kwargs)

    # ------------------------------------------------------------------ counting

    def _count_call(self) -> None:
        self.counters.redis_calls += 1

    def _count_calls(self, n: int) -> None:
        self.counters.redis_calls += n

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
            await bounded(self._script.load(), self._io_timeout)
            if self._left:
                # Before the first sync grants anything: a bucket the stopped process drew on
                # must not be handed out full again and only then charged.
                await self._replay_left()
            # A first sync (epoch, budget index) and warm connections for the flusher, the
            # poller and the subscription (which holds one), so no request pays for
            # connecting: a TLS handshake alone can take longer than timeout_ms.
            self._count_calls(3)
            ok, *pings = await asyncio.gather(
                self._sync(self._io_timeout),
                *(bounded(self.client.ping(), self._io_timeout) for _ in range(3)),
                return_exceptions=True,  # the sync must be over before the flusher starts
            )
            for r in (ok, *pings):
                if isinstance(r, BaseException):
                    raise r
            if not ok:
                raise ConnectionError("the first sync failed")
        except (TimeoutError, RedisError, OSError) as exc:
            self._mark_unavailable(f"at start: {self._describe(exc)}")
            if self._adopted_outage is not None:
                # The outage the previous process of this pod saw goes on: a bucket's share of
                # the refill counts from when it began, not from this start.
                began = self._mono() - max(self._clock.time() - float(self._adopted_outage), 0.0)
                self._degraded_since = min(self._degraded_since, began)
        self._start_tasks()

    def _start_tasks(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._started = True
        closing = self._is_closing
        self._tasks.append(asyncio.create_task(self._worker(), name="kubetoll-budget-sync"))
        self._tasks.append(asyncio.create_task(self._suspensions.poll_forever(closing), name="kubetoll-budget-poll"))
        if self._use_pubsub:
            self._tasks.append(
                asyncio.create_task(self._suspensions.listen_forever(closing), name="kubetoll-budget-events")
            )

    def _is_closing(self) -> bool:
        return self._closing

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
        buf = self._buffer
        if worker is not None or buf.pending():
            deadline = self._mono() + timeout
            for _ in range(1 + buf.max_buffered_records // max(buf.batch_records, 1)):
                left = deadline - self._mono()
                if left <= 0 or not await self._sync(min(left, self._io_timeout), final=True):
                    break
                if not (buf.pending() or self._dirty):
                    break
        if buf.pending():
            self._keep_at_close()
        elif self._journal_on_disk and self._disk is not None:
            self._drop_journal()
        if self._allowance_dirty and self._disk is not None:
            self._write_disk(self._disk.write_allowances, self._allowance_doc())
        self._closed = True
        if self._own_client:
            with contextlib.suppress(Exception):
                await self.client.aclose()

    # ------------------------------------------------------------------ BudgetStore

    async def reserve(self, holds: Sequence[Hold], now: float) -> Reservation:
        if not self._started:
            self._start_tasks()  # start() was not awaited: no warm-up, no wait beyond timeout_ms either
        if self._closing:
            raise StoreUnavailable("the budget store is shutting down")
        suspended = self._suspensions.suspended
        for h in holds:
            if h.meter.budget in suspended:
                raise Suspended(h.meter.budget)
        self.counters.reserves += 1
        mono = self._mono()
        leases = self._leases
        sts: list[Lease] = []
        amts: list[int] = []
        fits = self._healthy
        for h in holds:
            m = h.meter
            st = leases.get(m.key)
            if st is None or st.meter is not m:
                st = self._state(m, mono)
            amt = st.units(h.amount)
            sts.append(st)
            amts.append(amt)
            if fits and h.enforce and amt > st.free(mono):
                fits = False
        if fits:  # the common case: every hold fits this sidecar's leases, no I/O
            return self._commit(holds, sts, amts, mono)
        started = mono
        deadline = mono + self._wait_for(holds, sts)
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
                if st.known_exhausted(amt, free, mono, self._negative_cache):
                    if not missing:  # the first hold in order that does not fit decides, as in memory
                        raise self._exhausted(h, st, free, now, mono)
                    continue
                missing.append(i)
            if not missing:
                return self._commit(holds, sts, amts, mono)
            if mono >= deadline:
                return self._out_of_time(holds, sts, amts, missing, now, mono, started)
            # Not enough lease: one round trip for every meter short of it, and for every
            # request waiting on the same meter (their needs add up).
            for i in missing:
                st = sts[i]
                st.need_min = min(st.need_min, amts[i]) if st.need else amts[i]
                st.need += amts[i]
                st.max_hold = max(st.max_hold, amts[i])
                self._dirty.add(st.meter.key)
            await self._await_sync(deadline - mono)
            mono = self._mono()
            for h in holds:
                if h.meter.budget in suspended:
                    raise Suspended(h.meter.budget)

    def _wait_for(self, holds: Sequence[Hold], sts: list[Lease]) -> float:
        """How long a request may wait for a lease.

        `timeout_ms`, or three recent round trips when Redis is answering slower than
        that (a loaded node); a meter's first lease may take up to the I/O timeout
        (a cold connection, a TLS handshake). Never longer than the I/O timeout, after
        which the sync itself gives up and the store counts Redis as away.
        """
        wait = max(self._timeout, 3.0 * self._rtt)
        if any(h.enforce and st.g_seen == -_INF for h, st in zip(holds, sts)):
            wait = self._io_timeout
        return min(wait, self._io_timeout)

    def _out_of_time(
        self,
        holds: Sequence[Hold],
        sts: list[Lease],
        amts: list[int],
        missing: list[int],
        now: float,
        mono: float,
        started: float,
    ) -> Reservation:
        waited_ms = (mono - started) * 1000.0
        label = holds[missing[0]].meter.label
        if self._last_reply > started:
            # Redis answered, but what it granted went to other requests first and this one
            # is out of time. Not an outage, so no failOpen allowance: with Redis answering,
            # enforced holds never take a meter past its limit. The client retries shortly.
            self.counters.contention_rejections_total += 1
            raise StoreUnavailable(
                f"{label}: Redis answered, but no share of the budget came free within {waited_ms:.0f} ms "
                "(other sidecars or requests hold the rest of it); retry shortly"
            )
        # No answer yet: Redis is slow or going away (the sync in flight finds out within
        # the I/O timeout). This request is decided as in an outage, without calling one.
        self.counters.slow_decisions_total += 1
        why = f"Redis has not answered within {waited_ms:.0f} ms"
        if self._rtt > 0:
            why += f" (recent round trips: {self._rtt * 1000.0:.0f} ms)"
        return self._reserve_degraded(holds, sts, amts, now, mono, why=why, since=started)

    def settle(self, reservation: Reservation, actual: Mapping[str, float], now: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        if isinstance(reservation, LeasedReservation):
            sts, amts = reservation.leases, reservation.units
        else:  # not one of ours (or built by hand): look the meters up
            mono = self._mono()
            sts = tuple(self._leases.get(h.meter.key) or self._state(h.meter, mono) for h in reservation.holds)
            amts = tuple(st.units(h.amount) for h, st in zip(reservation.holds, sts))
        leases = self._leases
        mono = self._mono()
        for h, st, amt in zip(reservation.holds, sts, amts):
            if leases.get(h.meter.key) is not st:  # forgotten while idle: track it again
                leases[h.meter.key] = st
            st.reserved -= amt
            a = actual.get(h.meter.key)
            if a and a > 0:
                u = st.units(a)
                st.unflushed += u
                self._buffer.add_spend(h.meter.key, u, mono)

    def snapshot(self, meter: Meter, now: float) -> MeterState:
        st = self._leases.get(meter.key)
        if st is None:
            return MeterState(used=0.0, limit=meter.limit)
        mono = self._mono()
        if st.bucket:
            level = st.free(mono, not self._healthy) + max(st.room(mono), 0)
            return MeterState(used=meter.limit - level / st.scale, limit=meter.limit)
        others = max(st.g_leased - st.lease, 0)
        used = st.g_total + others + st.reserved + st.unflushed
        return MeterState(used=used / st.scale, limit=meter.limit)

    def is_suspended(self, budget: str) -> bool:
        return budget in self._suspensions.suspended

    def watch_budgets(self, budgets: Sequence[str]) -> None:
        for b in budgets:
            self._add_budget(check_name("budget", b))

    def apply_settings(self, settings: BudgetStoreSettings) -> None:
        """What a reloaded config may change in a running store: the operator's sidecar count."""
        self.expected_sidecars = settings.expected_sidecars

    @property
    def available(self) -> bool:
        return self._healthy

    def stats(self) -> dict[str, float]:
        buf = self._buffer
        self.counters.buffered_records_peak = buf.records_peak
        return {
            **asdict(self.counters),
            "leases_active": sum(1 for s in self._leases.values() if s.lease > 0),
            "meters_tracked": len(self._leases),
            "buffered_records": buf.buffered_records,
            "buffered_spend_meters": buf.buffered_meters,
            "available": 1.0 if self._healthy else 0.0,
            "suspended_budgets": len(self._suspensions.suspended),
        }

    # ------------------------------------------------------------------ the ledger rides along

    def add_record(self, record: SpendRecord) -> None:
        """Queue a ledger record; it is written with the next flush (RedisLedger.append lands here).

        A record the codec had to alter (docs/redis-layout.md, "The codec, and quarantine") is
        quarantined: written with the same flush to the quarantine stream, with a
        `defects` field, and counted. Its spend still counts in the meters.
        """
        fields, defects = encode_record_checked(record, self.sidecar_id)
        if defects:
            self._quarantine(fields, defects)
            return
        self._recent.append(record)
        if self._closed or not self._buffer.add_record(fields, self._mono()):
            self.counters.dropped_records += 1
            return
        if self._buffer.open_full and self._wake is not None:
            self._wake.set()

    def add_refusal(self, record: SpendRecord) -> None:
        """Queue a refusal record (RedisLedger.append_refusal): not among the recent spend records.

        Only while the buffer is less than half full: spend records share it, and a
        refusal lost costs nothing the next one (a second later) does not say again.
        """
        if self._closed or self._buffer.buffered_records * 2 >= self._buffer.max_buffered_records:
            return
        self._buffer.add_record(encode_record(record, self.sidecar_id), self._mono())

    def _quarantine(self, fields: list[str], defects: tuple[str, ...]) -> None:
        self.counters.quarantined_records += 1
        mono = self._mono()
        if mono - self._last_quarantine_log >= 60.0:  # a bug upstream could make every record odd
            self._last_quarantine_log = mono
            log.warning(
                "a spend record with fields the ledger cannot hold as given (%s) goes to the quarantine stream "
                "%s (%d so far)",
                ", ".join(defects),
                self.keys.ledger_quarantine(),
                self.counters.quarantined_records,
            )
        if self._closed or not self._buffer.add_record([*fields, "defects", ",".join(defects)], mono, quarantine=True):
            self.counters.dropped_records += 1

    def recent_records(self, since: float = 0.0, until: float | None = None) -> list[SpendRecord]:
        return list(self._recent.records(since, until))

    def lease_of(self, meter_key: str) -> Lease | None:
        """What this sidecar holds of one meter (for tests and diagnostics)."""
        return self._leases.get(meter_key)

    # ------------------------------------------------------------------ reserve helpers

    def _state(self, m: Meter, mono: float) -> Lease:
        st = self._leases.get(m.key)
        if st is None:
            st = Lease.new(m, self.keys.meter(m.budget, m.key), mono)
            self._leases[m.key] = st
            self._add_budget(m.budget)
            kept = self._adopted.pop(m.key, None) if self._adopted else None
            if kept is not None:  # what an earlier process of this pod used of its allowance
                st.allowance_used = max(int(kept.get("used", 0)), 0)
            if not self._healthy:
                self._outage_to_report(m.key, st)
        elif st.meter is not m:
            st.track(m)
        return st

    def _add_budget(self, budget: str) -> None:
        watched = self._suspensions.watched
        if budget not in watched:
            watched.add(budget)
            self._unindexed.add(budget)

    def _exhausted(self, h: Hold, st: Lease, free: int, now: float, mono: float) -> Exception:
        if free > 0 and st.lease > 0:
            # This sidecar holds a sliver no request of its own can use: give it back now,
            # another sidecar's request may fit in it.
            st.release = True
            self._dirty.add(h.meter.key)
            self._want_topup()
        return st.exhausted(h, free, now, mono)

    def _want_topup(self) -> None:
        if not self._topup:
            self._topup = True
            if self._wake is not None:
                self._wake.set()

    def _commit(self, holds: Sequence[Hold], sts: list[Lease], amts: list[int], mono: float) -> Reservation:
        for st, amt in zip(sts, amts):
            if st.reserve(amt, mono):
                self._dirty.add(st.meter.key)
                self._want_topup()
        return LeasedReservation(id=str(next(self._ids)), holds=list(holds), units=tuple(amts), leases=tuple(sts))

    def _reserve_degraded(
        self,
        holds: Sequence[Hold],
        sts: list[Lease],
        amts: list[int],
        now: float,
        mono: float,
        *,
        why: str | None = None,
        since: float | None = None,
    ) -> Reservation:
        """Redis is not answering: serve from leases, then from the failOpen allowance.

        `why` says what happened (default: the outage's cause); `since` is when this lack
        of answers began, for a bucket's share of the refill (default: the outage's start).
        """
        why = why or f"Redis is not answering ({self._unavailable_why})"
        self.counters.degraded_decisions_total += 1
        grants: list[tuple[Lease, int]] = []
        for i, h in enumerate(holds):
            if not h.enforce:
                continue
            st, amt = sts[i], amts[i]
            free = st.free(mono, degraded=True)
            if amt <= free:
                continue
            if amt > st.limit:
                raise self._exhausted(h, st, free, now, mono)
            if not h.meter.fail_open:
                raise StoreUnavailable(f"{h.meter.label}: {why}, and the budget is failClosed; retry shortly")
            # `free` below zero is spend settled above its estimate since the outage began:
            # the allowance pays for it too, or a stream of requests that each use more than
            # they reserved would spend past the allowance unseen.
            short = amt - free
            if st.allowance_used + short > self.fail_open_allowance(st, mono, since):
                raise StoreUnavailable(f"{h.meter.label}: {why}, and this sidecar's failOpen allowance is used up")
            grants.append((st, short))
        for st, short in grants:
            st.extra += short
            st.allowance_used += short
            self.counters.fail_open_allowance_used_total += 1
        if grants and self._disk is not None:
            self._allowance_dirty = True  # on disk within flush_interval, for the next process of this pod
        return self._commit(holds, sts, amts, mono)

    def fail_open_allowance(self, st: Lease, mono: float, since: float | None = None) -> int:
        """What this sidecar may spend of a failOpen meter past its lease while Redis is away.

        Shared by the sidecars last seen holding the budget, or, when this sidecar has
        seen fewer (it never reached Redis), by as many as the operator counted.
        """
        start = self._degraded_since if since is None else since
        return st.fail_open_allowance(self._holders_for(st), self.fail_open_fraction, start, mono)

    def _holders_for(self, st: Lease) -> int:
        """How many sidecars share a meter's failOpen allowance: the most seen holding it or
        its budget, or as many as the operator counted when this sidecar has seen fewer."""
        return max(st.g_holders, self._budget_holders.get(st.meter.budget, 0), self.expected_sidecars, 1)

    async def _await_sync(self, timeout: float) -> bool:
        """Wait for the next sync (at most `timeout`). A wait running out is not an outage:
        only a sync that fails (an error, or no reply within the I/O timeout) says Redis is away."""
        assert self._wake is not None
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake.set()
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                return await asyncio.shield(fut)
        except TimeoutError:
            return False

    # ------------------------------------------------------------------ health

    def _describe(self, exc: BaseException | None) -> str:
        """What a failed sync says, for the log and for the 503s that follow.

        A refusal by Redis itself (NOPERM, a wrong password) does not pass with time:
        it is logged at ERROR, with what to check, once a minute while it lasts.
        """
        if exc is None:
            return "a sync call failed"
        if isinstance(exc, TimeoutError):
            return f"no reply within {self._io_timeout * 1000.0:.0f} ms"
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (NoPermissionError, AuthenticationError, AuthenticationWrongNumberOfArgsError)) or (
            isinstance(exc, ResponseError) and str(exc).startswith(("NOPERM", "WRONGPASS", "NOAUTH"))
        ):
            mono = self._mono()
            if mono - self._last_refusal_log >= 60.0:
                self._last_refusal_log = mono
                log.error(
                    "Redis refuses the budget store's commands (%s): check the namespace's Redis user and its ACL "
                    '(docs/redis-layout.md, "ACL") and budgetStore.usernameFile/passwordFile',
                    text,
                )
            return f"Redis refuses this sidecar's credentials ({text})"
        return text

    def _mark_unavailable(self, why: str) -> None:
        self._unavailable_why = why
        if self._healthy:
            mono = self._mono()
            self._healthy = False
            self.counters.unavailable_total += 1
            self._degraded_since = mono
            # A bucket's allowance is its share of capacity plus refill since this outage
            # began, so what an earlier outage used does not count against it.
            for key, st in self._leases.items():
                if st.bucket:
                    st.allowance_used = 0
                self._outage_to_report(key, st)
            self._backoff = 0.05
            self._retry_at = mono + self._backoff
            # One line per outage, and at most one every 10 s when Redis flaps.
            self._logged_outage = mono - self._last_outage_log >= 10.0
            if self._logged_outage:
                self._last_outage_log = mono
                log.warning("Redis budget store unavailable (%s); failOpen budgets serve on local allowances", why)

    def _outage_to_report(self, key: str, st: Lease) -> None:
        """A failOpen meter held through an outage goes in the first call back, with what this
        sidecar and the others may have spent of their allowances. The others retry on their own
        backoff: without it, the first sidecar back would be leased room they already spent,
        which is what took a tokens/min bucket 3% past its bound on a cold start."""
        if st.meter.fail_open:
            st.outage_unreported = True
            self._dirty.add(key)

    def _mark_available(self) -> None:
        if not self._healthy:
            self._healthy = True
            if self._logged_outage:
                log.warning("Redis budget store available again after %.1fs", self._mono() - self._degraded_since)

    def _fail_waiters(self) -> None:
        for f in self._waiters:
            if not f.done():
                f.set_result(False)
        self._waiters.clear()

    # ------------------------------------------------------------------ on local disk (journal.py)

    def _write_disk(self, write: Callable[[dict[str, Any]], None], doc: dict[str, Any]) -> bool:
        try:
            write(doc)
            return True
        except OSError as exc:
            mono = self._mono()
            if mono - self._last_disk_error_log >= 60.0:
                self._last_disk_error_log = mono
                log.warning("cannot write to the state directory (%s): %s", type(exc).__name__, exc)
            return False

    async def _keep_on_disk(self, mono: float) -> None:
        """The allowance file within flush_interval of a grant; while Redis is away, the journal
        at most once per JOURNAL_INTERVAL (whenever the buffer changed)."""
        disk = self._disk
        if disk is None:
            return
        if self._allowance_dirty and mono - self._allowance_at >= self.flush_interval:
            self._allowance_dirty = False
            self._allowance_at = mono
            await asyncio.to_thread(self._write_disk, disk.write_allowances, self._allowance_doc())
        buf = self._buffer
        if (
            not self._healthy
            and buf.pending()
            and buf.changes != self._journaled
            and mono - self._journal_at >= JOURNAL_INTERVAL
        ):
            changes, doc = buf.changes, self._journal_doc()
            self._journal_at = mono
            if await asyncio.to_thread(self._write_disk, disk.write_journal, doc):
                self._journaled = changes
                self._journal_on_disk = True

    def _keep_at_close(self) -> None:
        buf = self._buffer
        if self._disk is not None and self._write_disk(self._disk.write_journal, self._journal_doc()):
            self._journal_on_disk = True
            log.warning(
                "budget store closing with spend not written to Redis (%d ledger records): kept in %s; the next "
                "start of this pod writes it once Redis answers",
                buf.buffered_records,
                self._disk.journal_path,
            )
            return
        self.counters.dropped_spend_batches += 1
        log.warning(
            "budget store closing with spend not written to Redis (%d ledger records) and no state directory "
            "to keep it in: it is lost",
            buf.buffered_records,
        )

    def _drop_journal(self) -> None:
        assert self._disk is not None
        try:
            self._disk.drop_journal()
            self._journal_on_disk = False
            self._journaled = -1
        except OSError as exc:
            log.warning("cannot remove %s: %s", self._disk.journal_path, exc)

    def _journal_doc(self) -> dict[str, Any]:
        batches = self._buffer.unwritten(self._home)
        meters: dict[str, dict[str, Any]] = {}
        for b in batches:
            for k in b.deltas:
                st = self._leases.get(k)
                if st is not None and k not in meters:
                    meters[k] = self._meter_fields(st)
        return {
            "namespace": self.namespace,
            "written": self._clock.time(),
            "meters": meters,
            "batches": [
                {
                    "no": b.no,
                    "deltas": b.deltas,
                    "records": b.records,
                    "quarantined": b.quarantined,
                    "homes": sorted(b.homes),
                }
                for b in batches
            ],
        }

    def _allowance_doc(self) -> dict[str, Any]:
        wall, mono = self._clock.time(), self._mono()
        meters = {k: v for k, v in self._adopted.items() if v.get("bucket") or float(v.get("end", 0)) >= wall}
        for k, st in self._leases.items():
            if st.allowance_used > 0 and (st.bucket or st.meter.period_end >= wall):
                meters[k] = {"used": st.allowance_used, "bucket": st.bucket, "end": st.meter.period_end}
        doc: dict[str, Any] = {"written": wall, "meters": meters}
        if not self._healthy:
            doc["outage_since"] = wall - (mono - self._degraded_since)
        return doc

    async def _replay_left(self) -> None:
        """Write the spend stopped processes of this pod left in their journals, batch by batch.

        Each batch goes under its writer's sidecar id with seq 0, so Redis applies it only
        if that writer never got the same batch number through (a later batch of the
        writer holds what the journal's batch holds, and more). Tried before any sync
        (at start, and by the worker whenever a retry is due): spend comes first, so a
        bucket is charged before it grants anything.
        """
        assert self._disk is not None
        while self._left and not self._closing:
            j = self._left[0]
            if j.namespace != self.namespace:
                log.warning(
                    "journal %s is for namespace %s, not %s: left as it is", j.path, j.namespace, self.namespace
                )
                self._left.pop(0)
                continue
            if not j.batches:
                self._left.pop(0)
                try:
                    j.path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("cannot remove %s: %s", j.path, exc)
                continue
            b = j.batches[0]
            calls = self._replay_calls(j, b)
            results = await asyncio.gather(
                *(self._call(c, 0, self._io_timeout, sid=j.sidecar_id) for c in calls), return_exceptions=True
            )
            for c, res in zip(calls, results):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                if isinstance(res, BaseException):
                    self.counters.redis_errors += 1
                    log.debug("journal replay to %s failed: %r", c.home, res)
                    return  # the next sync finds out whether Redis is away; replay resumes after it
                if res[0] == "dup":
                    self.counters.replay_duplicates_total += 1
                if c.home in b["homes"]:
                    b["homes"].remove(c.home)
            j.batches.pop(0)
            self.counters.replayed_batches_total += 1
            self.counters.replayed_records_total += len(b.get("records") or [])
            if not j.batches:
                log.info("spend a stopped process (%s) left in %s is written to Redis", j.sidecar_id, j.path.name)

    def _replay_calls(self, j: LeftJournal, b: dict[str, Any]) -> list[SyncCall]:
        calls: dict[str, SyncCall] = {}
        homes = set(b.get("homes") or ())
        no = int(b["no"])

        def call_for(home: str) -> SyncCall:
            c = calls.get(home)
            if c is None:
                c = calls[home] = SyncCall(home)
                c.key(self.keys.sidecar(home, j.sidecar_id))
                c.key(self.keys.epoch(home))
                c.batch = no
            return c

        for key, d in (b.get("deltas") or {}).items():
            fields = j.meters.get(key)
            if fields is None or not d:
                continue
            budget = str(fields["b"])
            home = self._home(budget)
            if home not in homes:
                continue  # that slot confirmed this batch before the writer stopped
            c = call_for(home)
            mk = self.keys.meter(budget, key)
            c.meters.append(
                {
                    "h": c.key(mk.state),
                    "x": c.key(mk.holders),
                    "ix": c.key(self.keys.meter_index(budget)),
                    **fields,
                    "d": int(d),
                    "floor": 0,  # the writer is gone: whatever it leased goes back
                    "need": 0,
                    "nmin": 0,
                    "want": 0,
                }
            )
        ns = self._home(None)
        if ns in homes and (b.get("records") or b.get("quarantined")):
            c = call_for(ns)
            c.records = [list(r) for r in b.get("records") or []]
            c.quarantined = [list(r) for r in b.get("quarantined") or []]
        for home in homes:
            call_for(home)  # a slot with nothing left to send still confirms the batch
        # The budgets go into the namespace's index (where readers find their meters), even if
        # that slot confirmed the batch already: a dup batch still adds them.
        call_for(ns).new_budgets = sorted({str(f["b"]) for f in j.meters.values()})
        return list(calls.values())

    # ------------------------------------------------------------------ kill switch

    def _give_back_leases_of(self, budget: str) -> None:
        """A budget was suspended: return what is leased under it at the next sync, which runs now."""
        for k, st in self._leases.items():
            if st.meter.budget == budget and st.lease:
                self._dirty.add(k)
        self._sync_requested = True
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ background

    async def _worker(self) -> None:
        assert self._wake is not None
        while not self._closing and not cancelling():
            delay = self._next_delay()
            if delay > 0 and not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            self._wake.clear()
            mono = self._mono()
            try:
                await self._keep_on_disk(mono)
                if self._left and (self._healthy or mono >= self._retry_at):
                    await self._replay_left()
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
                self._retry_at = self._mono() + self._backoff

    def _next_delay(self) -> float:
        mono = self._mono()
        if self._waiters:
            return 0.0
        t = mono + 0.25
        if self._allowance_dirty:
            t = min(t, max(self._allowance_at + self.flush_interval, mono + 0.001))
        if not self._healthy:
            t = min(t, self._retry_at)
        else:
            if self._buffer.open_since is not None:
                t = min(t, self._buffer.open_since + self.flush_interval)
            t = min(t, self._next_renew, self._next_scan)
        return max(t - mono, 0.0)

    def _due(self, mono: float) -> bool:
        if not self._healthy:
            if mono >= self._retry_at:
                return True
            self._fail_waiters()
            return False
        buf = self._buffer
        if self._waiters or buf.frozen is not None or self._reregister or self._sync_requested or self._unindexed:
            return True
        if buf.open_full:
            return True
        if buf.open_since is not None and mono - buf.open_since >= self.flush_interval:
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
        # Tenant ids are the caller's: past budgetStore.maxMeters, a state with nothing
        # leased, nothing in flight and nothing to flush is forgotten however recent (its
        # spend is in Redis already), oldest first, until a tenth of the bound is free.
        overflow = len(self._leases) - self.settings.max_meters
        if overflow > 0:
            overflow += self.settings.max_meters // 10
        for key, st in list(self._leases.items()):
            period_over = not st.bucket and st.meter.period_end < wall
            forgettable = st.lease == 0 and st.idle() and (st.allowance_used == 0 or period_over)
            if forgettable and (mono - st.last_used > 600 or (overflow > 0 and key not in self._dirty)):
                if mono - st.last_used <= 600:
                    overflow -= 1
                    self.counters.evicted_meters += 1
                del self._leases[key]
                self._dirty.discard(key)
                continue
            idle_lease = mono - st.last_used > 2 * self.lease_seconds
            if st.lease > 0 and (idle_lease or (not st.bucket and st.meter.period_end <= wall)):
                self._dirty.add(key)
                want = True
        return want

    def _choose(self, mono: float, final: bool) -> list[Lease]:
        keys = set(self._dirty)
        self._dirty.clear()
        frozen = self._buffer.frozen
        if frozen is not None:
            keys.update(frozen.deltas)
        renew = mono >= self._next_renew
        if self._reregister or final or renew:
            for k, st in self._leases.items():
                renewing = renew and st.deadline - mono < self.lease_ttl / 2
                if st.lease or st.reserved or st.unflushed or st.extra or renewing:
                    keys.add(k)
        # Bounded work per script (Redis runs it alone): the frozen batch's meters first (their
        # spend must go with it), then meters requests wait on, then the rest; the rest of the
        # rest goes in the next call, right after.
        first = frozen.deltas.keys() if frozen is not None else set()
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

    async def _sync(self, timeout: float, final: bool = False) -> bool:
        """One round trip per home slot. True when every call succeeded."""
        mono = self._mono()
        frozen = self._buffer.freeze(mono, self._home)
        waiters, self._waiters = self._waiters, []
        self._topup = False
        self._sync_requested = False
        reregister, self._reregister = self._reregister, False
        chosen = self._choose(mono, final or reregister)
        calls = self._build_calls(chosen, frozen, mono, final)
        seq = next(self._seq)
        sent = self._mono()
        try:
            results = await asyncio.gather(*(self._call(c, seq, timeout) for c in calls), return_exceptions=True)
        except BaseException:
            for f in waiters:
                if not f.done():
                    f.set_result(False)
            raise
        self.counters.syncs += 1
        self._last_sync = self._mono()
        all_ok = True
        failure: BaseException | None = None
        for c, res in zip(calls, results):
            if isinstance(res, BaseException):
                all_ok = False
                failure = failure or res
                self.counters.redis_errors += 1
                if isinstance(res, asyncio.CancelledError):
                    raise res
                for st, _ in c.leases:
                    self._dirty.add(st.meter.key)
                log.debug("budget sync to %s failed: %r", c.home, res)
                continue
            self._apply(c, res, sent)
        if self._buffer.release_if_done() and self._buffer.has_open() and self._wake is not None:
            self._wake.set()
        if all_ok and self._journal_on_disk and not self._buffer.pending():
            self._drop_journal()
        if all_ok:
            rtt = self._last_sync - sent
            self._rtt = rtt if self._rtt == 0.0 else 0.8 * self._rtt + 0.2 * rtt
            self._last_reply = self._last_sync
            self._mark_available()
            self._next_renew = min(
                (s.deadline - self.lease_ttl / 2 for s in self._leases.values() if s.lease > 0), default=_INF
            )
        else:
            self._mark_unavailable(self._describe(failure))
        for f in waiters:
            if not f.done():
                f.set_result(all_ok)
        return all_ok

    def _build_calls(self, chosen: list[Lease], frozen: Batch | None, mono: float, final: bool) -> list[SyncCall]:
        wall = self._clock.time()
        calls: dict[str, SyncCall] = {}
        sid = self.sidecar_id

        def call_for(home: str) -> SyncCall:
            c = calls.get(home)
            if c is None:
                c = calls[home] = SyncCall(home)
                c.key(self.keys.sidecar(home, sid))
                c.key(self.keys.epoch(home))
                if frozen is not None and home in frozen.homes:
                    c.batch = frozen.no
            return c

        if frozen is not None:
            for home in frozen.homes:
                call_for(home)
            if (frozen.records or frozen.quarantined) and self._home(None) in frozen.homes:
                ns_call = call_for(self._home(None))
                ns_call.records, ns_call.quarantined = frozen.records, frozen.quarantined
        suspended = self._suspensions.suspended
        for st in chosen:
            m = st.meter
            c = call_for(self._home(m.budget))
            d = frozen.deltas.get(m.key, 0) if frozen is not None and c.batch else 0
            st.update_rate(mono, self.lease_seconds)
            floor = max(st.reserved + st.unflushed - d, 0)
            target = st.target
            if final or m.budget in suspended or st.release or (not st.bucket and m.period_end <= wall):
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
                **self._meter_fields(st),
                "d": d,
                "floor": floor,
                "need": need,
                "nmin": nmin,
                "want": max(want, need),
            }
            if st.outage_unreported:
                share = self.fail_open_allowance(st, mono)
                entry["po"] = [share, share * (self._holders_for(st) - 1)]
            if not st.bucket and st.g_seen != -_INF:
                # What this sidecar last saw of the window: the total spent, and what the others
                # held leased, counted as spent (their spend since is unknown here; a lease is what
                # they could spend unasked). The script uses it only if Redis lost the history this
                # reading came from (the call's `ek_known` is not the current epoch): so the very
                # first call after an empty restart already carries it, before any lease is granted.
                entry["seed"] = st.g_total + max(st.g_leased - st.lease, 0)
            c.meters.append(entry)
            c.leases.append((st, d))
        if self._unindexed or not calls:
            # New budgets go into the namespace's budget index; with nothing else to do the
            # call is a probe, which also tells whether Redis lost its data.
            call_for(self._home(None)).new_budgets = sorted(self._unindexed)
        for c in calls.values():
            c.budget_entries = [
                [
                    b,
                    c.key(self.keys.suspended(b)),
                    c.key(self.keys.meter_index(b)),
                    c.key(self.keys.suspension_known(b)),
                    1 if b in suspended else 0,  # held here (e.g. kept through a Redis restart): no lease
                ]
                for b in c.budgets
            ]
        return list(calls.values())

    @staticmethod
    def _meter_fields(st: Lease) -> dict[str, Any]:
        """What the script needs to know of a meter besides its keys (also kept in the journal)."""
        m = st.meter
        f: dict[str, Any] = {
            "kind": m.kind,
            "unit": m.unit,
            "label": m.label,
            "b": m.budget,
            "k": st.keys.suffix,
            "scale": st.scale,
            "limit": st.limit,
        }
        if st.bucket:
            f["refill"] = m.refill_per_second * st.scale / 1000.0
        else:
            f["refill"] = 0
            f["pend"] = int(m.period_end * 1000)
            f["period"] = period_of(m.key)[1]
            f["exp"] = int(window_expire_at(m.key, m.period_end) * 1000)
        return f

    async def _call(self, c: SyncCall, seq: int, timeout: float, sid: str | None = None) -> list[Any]:
        payload: dict[str, Any] = {
            "sid": sid or self.sidecar_id,
            "seq": seq,
            "batch": c.batch,
            "sk": 1,
            "ek": 2,
            "sk_ttl": _SIDECAR_KEY_TTL_MS,
            "epoch_new": f"{int(self._clock.time() * 1000)}-{os.urandom(4).hex()}",
            "budgets": c.budget_entries,
            "meters": c.meters,
            "ttl": int(self.lease_ttl * 1000),
            "frac": self.lease_fraction,
            "ix_ttl": INDEX_TTL_S * 1000,
            "grace": BUCKET_IDLE_GRACE_MS,
            "owe_ms": OWE_HORIZON_MS,
            "lk": 0,
            "recs": [],
            "qk": 0,
            "qrecs": [],
            "keep_ms": self._ledger_retention_ms,
            # The epoch this sidecar's readings (and the seeds in this call) come from.
            "ek_known": "" if sid else self._epochs.get(c.home, ""),
        }
        if c.records and c.batch:
            payload["lk"] = c.key(self.keys.ledger())
            payload["recs"] = c.records
        if c.quarantined and c.batch:
            payload["qk"] = c.key(self.keys.ledger_quarantine())
            payload["qrecs"] = c.quarantined
        if c.home == self.keys.ns_tag:
            payload["bi"] = c.key(self.keys.budgets_index())
            payload["new_budgets"] = c.new_budgets
        body = orjson.dumps(payload)
        async with asyncio.timeout(timeout):
            return await self._script.call(c.keys, body)

    def _apply(self, c: SyncCall, res: list[Any], sent: float) -> None:
        status, epoch, _now_ms, susp, out = res
        if status == "dup":
            self.counters.duplicate_batches_total += 1
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
            self.counters.history_lost_total += 1
            self._reregister = True
            if c.home == self._home(None):  # the namespace's budget index went too: readers find meters by it
                self._unindexed.update(self._suspensions.watched)
            log.warning(
                "Redis lost the budget history of %s (epoch %s -> %s, e.g. restarted empty): re-registering this "
                "sidecar's leases and the spend it last saw on each window",
                c.home,
                known,
                epoch,
            )
        for (b, *_), flag in zip(c.budget_entries, susp):
            f = int(flag)
            self._suspensions.set_local(b, None if f < 0 else bool(f))
        mono = self._mono()
        deadline = sent + self.lease_ttl * 0.8
        for (st, d), row in zip(c.leases, out):
            lease, total, leased, holders = (int(v) for v in row)
            st.granted(lease, total, leased, holders, deadline, mono)
            st.outage_unreported = False  # told (a failed call keeps it for the retry)
            if holders > self._budget_holders.get(st.meter.budget, 0):
                self._budget_holders[st.meter.budget] = holders
            if c.batch and d:
                st.unflushed -= d
        if c.batch:
            self._buffer.confirmed(c.home, c.batch)
        self._unindexed.difference_update(c.new_budgets)
