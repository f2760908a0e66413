"""Redis going away, stalling, coming back and coming back empty: each with a real redis-server we own.

Timing assertions here are correctness bounds (no call may wait on Redis longer
than timeout_ms, plus slack for a loaded test machine), not benchmarks.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time

import pytest
from redis.asyncio import Redis

from kubetoll_core.enums import OnExhausted
from kubetoll_core.ledger_stream import period_totals, read_ledger
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import BudgetStoreSettings
from kubetoll_core.spend_record import SpendRecord
from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
from kubetoll_sidecar.budgets.store import Exhausted, Hold, Meter, Reservation, StoreUnavailable
from kubetoll_sidecar.ledger_redis import RedisLedger
from support.redis_server import PersistentRedis, RedisProcess

TIMEOUT_MS = 50
SLACK = 0.15  # seconds: scheduling noise on a busy CI machine, far below any real hang
HANG = 3.0  # seconds: a bound for calls that must not wait on Redis at all (so only a hang exceeds it)
END = time.time() + 20 * 86400


def window(limit: float, key: str, fail_open: bool) -> Meter:
    return Meter(
        key=key,
        kind="window",
        unit="usd",
        limit=limit,
        budget=key.split(":", 1)[0],
        level="cap",
        label=key,
        on_exhausted=OnExhausted.reject,
        period_end=END,
        fail_open=fail_open,
    )


OPEN = window(100.0, "open:cap:usd:2026-11", fail_open=True)
CLOSED = window(100.0, "closed:cap:usd:2026-11", fail_open=False)


@pytest.fixture
def redis_proc():
    p = RedisProcess().start()
    yield p
    if p.proc is not None and p.proc.poll() is None:
        p.resume()  # in case a test failed while it was paused
    p.stop()


def make(url: str, ns: str, sid: str = "a", **kw) -> RedisBudgetStore:
    kw.setdefault("io_timeout", 0.3)
    return RedisBudgetStore.connect(
        BudgetStoreSettings(url=url, timeout_ms=TIMEOUT_MS), ns, "/nonexistent", sidecar_id=sid, **kw
    )


def record(ns: str, cost: float, i: int) -> SpendRecord:
    return SpendRecord(
        time=time.time(),
        namespace=ns,
        route="r",
        backend="x",
        tenant="t",
        tier="free",
        prompt_tokens=1,
        completion_tokens=1,
        cached_tokens=0,
        cost_usd=cost,
        request_id=str(i),
    )


async def timed(coro):
    t0 = time.monotonic()
    try:
        return await coro, time.monotonic() - t0
    except Exception as exc:
        return exc, time.monotonic() - t0


async def warm(store: RedisBudgetStore, meter: Meter, n: int = 20, amount: float = 0.5) -> float:
    spent = 0.0
    for _ in range(n):
        res = await store.reserve([Hold(meter, amount)], time.time())
        store.settle(res, {meter.key: amount}, time.time())
        spent += amount
    return spent


async def drained(store: RedisBudgetStore, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = store.stats()
        if store.available and st["buffered_records"] == 0 and st["buffered_spend_meters"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"buffered spend not written: {store.stats()}")


async def exercise_outage(store: RedisBudgetStore, ledger: RedisLedger, ns: str) -> dict:
    """Spend through an outage; return what was admitted and the call durations."""
    st_open = store.lease_of(OPEN.key)
    lease_free = st_open.free(time.monotonic(), degraded=True)
    allowance = store.fail_open_allowance(st_open, time.monotonic())
    admitted_units = 0
    settled = 0.0
    durations = []
    unavailable_open = False
    for i in range(400):
        res, dt = await timed(store.reserve([Hold(OPEN, 0.25)], time.time()))
        durations.append(dt)
        if isinstance(res, StoreUnavailable):
            unavailable_open = True
            break
        assert not isinstance(res, Exception), res
        admitted_units += 250_000_000
        store.settle(res, {OPEN.key: 0.2}, time.time())
        ledger.append(record(ns, 0.2, i))
        settled += 0.2
    closed_errors = []
    for _ in range(5):  # far more than any lease it holds
        res, dt = await timed(store.reserve([Hold(CLOSED, 40.0)], time.time()))
        durations.append(dt)
        closed_errors.append(res)
    return dict(
        lease_free=lease_free,
        allowance=allowance,
        admitted_units=admitted_units,
        settled=settled,
        durations=durations,
        unavailable_open=unavailable_open,
        closed_errors=closed_errors,
    )


def check_outage(out: dict) -> None:
    assert max(out["durations"]) <= TIMEOUT_MS / 1000 + SLACK, max(out["durations"])
    # failOpen: the unspent lease plus the allowance, and then no more
    assert out["unavailable_open"]
    settled_units = round(out["settled"] * 1e9)
    assert settled_units <= out["lease_free"] + out["allowance"]
    assert out["admitted_units"] >= out["lease_free"] - 250_000_000
    # failClosed: StoreUnavailable, never a hang, never an admit beyond its lease
    assert all(isinstance(e, StoreUnavailable) for e in out["closed_errors"]), out["closed_errors"]


async def test_redis_killed_fail_open_serves_within_bound_fail_closed_raises(redis_proc, ns):
    store = make(redis_proc.url, ns)
    ledger = RedisLedger(store, store.client)
    await store.start()
    await warm(store, OPEN)
    await warm(store, CLOSED)
    redis_proc.stop()
    out = await exercise_outage(store, ledger, ns)
    check_outage(out)
    st = store.stats()
    assert st["available"] == 0.0 and st["unavailable_total"] >= 1
    assert st["buffered_records"] == round(out["settled"] / 0.2)
    assert st["buffered_spend_meters"] >= 1
    # settle never waits on Redis
    res = await store.reserve([Hold(OPEN, 0.0)], time.time())
    assert not inspect.iscoroutinefunction(store.settle)  # nothing in it can wait on Redis
    t0 = time.monotonic()
    store.settle(res, {OPEN.key: 0.0}, time.time())
    assert time.monotonic() - t0 < 0.05
    t0 = time.monotonic()
    await store.close(timeout=0.5)
    assert time.monotonic() - t0 < 0.5 + HANG  # close gives up on the unreachable Redis at its timeout


async def test_redis_stalled_by_sigstop_then_back_writes_buffered_spend_once(redis_proc, ns):
    store = make(redis_proc.url, ns, flush_interval=0.05)
    ledger = RedisLedger(store, store.client)
    await store.start()
    spent = await warm(store, OPEN) + 0.0
    for i in range(10):
        ledger.append(record(ns, 0.5, 1000 + i))
    await drained(store)
    redis_proc.pause()
    try:
        out = await exercise_outage(store, ledger, ns)
        check_outage(out)
        await asyncio.sleep(0.6)  # let the flusher's calls time out against the stalled server, then retry
        assert store.stats()["buffered_spend_meters"] >= 1
    finally:
        redis_proc.resume()
    # Calls that timed out were still queued in the stalled server and ran when it resumed;
    # the retries carry the same batch numbers, so nothing is counted twice.
    await drained(store)
    await store.close()
    r = Redis.from_url(redis_proc.url, decode_responses=True)
    try:
        totals = {t.meter: t for t in await period_totals(r, ns, "open")}
        expected = round((spent + out["settled"]) * 1e9)
        assert totals["cap:usd:2026-11"].spent_units == expected
        records = await read_ledger(r, ns)
        assert len(records) == 10 + int(round(out["settled"] / 0.2))
        assert len({x.request_id for x in records}) == len(records)
    finally:
        await r.aclose()


async def test_redis_killed_and_back_with_its_data_writes_buffered_spend_once(ns):
    proc = PersistentRedis().start()
    try:
        store = make(proc.url, ns, flush_interval=0.05)
        ledger = RedisLedger(store, store.client)
        await store.start()
        spent = await warm(store, OPEN)
        await drained(store)
        proc.stop()
        out = await exercise_outage(store, ledger, ns)
        check_outage(out)
        proc.restart_keeping_data()
        await drained(store)
        assert store.counters.history_lost_total == 0  # same data, same epoch
        await store.close()
        r = Redis.from_url(proc.url, decode_responses=True)
        try:
            (t,) = await period_totals(r, ns, "open")
            assert t.spent_units == round((spent + out["settled"]) * 1e9)
            assert t.leased_units == 0
            assert len(await read_ledger(r, ns)) == int(round(out["settled"] / 0.2))
        finally:
            await r.aclose()
    finally:
        proc.stop()


async def test_redis_restarted_empty_counts_lost_history_and_reregisters_leases(redis_proc, ns, caplog):
    store = make(redis_proc.url, ns, flush_interval=0.05)
    await store.start()
    await warm(store, OPEN)
    in_flight = await store.reserve([Hold(OPEN, 3.0)], time.time())  # outstanding across the restart
    await drained(store)
    with caplog.at_level(logging.WARNING, logger="kubetoll.budgets.redis"):
        redis_proc.restart_empty()
        deadline = time.monotonic() + 8
        while store.counters.history_lost_total == 0 and time.monotonic() < deadline:
            # any activity (or the periodic renewal) reaches the new server
            res = await store.reserve([Hold(OPEN, 0.1)], time.time())
            store.settle(res, {OPEN.key: 0.1}, time.time())
            await asyncio.sleep(0.05)
        await drained(store)
        await asyncio.sleep(0.2)
    assert store.counters.history_lost_total == 1
    lost_lines = [r for r in caplog.records if "lost the budget history" in r.getMessage()]
    assert len(lost_lines) == 1
    r = Redis.from_url(redis_proc.url, decode_responses=True)
    try:
        h = await r.hgetall(RedisKeys(ns).meter(OPEN.budget, OPEN.key).state)
        # the reservation still in flight is leased again in the new Redis
        assert int(h["L:a"]) >= 3_000_000_000
        store.settle(in_flight, {OPEN.key: 2.0}, time.time())
        await store.close()
        h = await r.hgetall(RedisKeys(ns).meter(OPEN.budget, OPEN.key).state)
        assert int(h["leased"]) == 0
        assert int(h["spent"]) >= 2_000_000_000
    finally:
        await r.aclose()


async def test_redis_down_at_start_then_up(ns):
    proc = RedisProcess()
    store = make(f"redis://127.0.0.1:{proc.port}/0", ns, flush_interval=0.05)
    t0 = time.monotonic()
    await store.start()
    assert time.monotonic() - t0 < HANG  # start does not wait for a Redis that is not there
    res, dt = await timed(store.reserve([Hold(OPEN, 0.5)], time.time()))
    assert dt <= TIMEOUT_MS / 1000 + SLACK
    assert not isinstance(res, Exception)  # failOpen: on the allowance (1% of 100 USD)
    store.settle(res, {OPEN.key: 0.4}, time.time())
    exc, dt = await timed(store.reserve([Hold(CLOSED, 0.5)], time.time()))
    assert isinstance(exc, StoreUnavailable) and dt <= TIMEOUT_MS / 1000 + SLACK
    exc, _ = await timed(store.reserve([Hold(OPEN, 5.0)], time.time()))
    assert isinstance(exc, StoreUnavailable)  # beyond the allowance
    proc.start()
    try:
        await drained(store)
        res = await store.reserve([Hold(CLOSED, 0.5)], time.time())  # Redis answers again
        store.settle(res, {CLOSED.key: 0.5}, time.time())
        await store.close()
        r = Redis.from_url(proc.url, decode_responses=True)
        try:
            totals = {t.budget: t for t in await period_totals(r, ns)}
            assert totals["open"].spent_units == 400_000_000
            assert totals["closed"].spent_units == 500_000_000
        finally:
            await r.aclose()
    finally:
        proc.stop()


async def test_fail_closed_serves_from_a_valid_lease_while_redis_is_away(redis_proc, ns):
    store = make(redis_proc.url, ns)
    await store.start()
    await warm(store, CLOSED, n=30, amount=0.5)
    await asyncio.sleep(0.3)  # the lease is topped up in the background
    free = store.lease_of(CLOSED.key).free(time.monotonic())
    assert free >= 500_000_000
    redis_proc.pause()
    try:
        reserving = store.reserve([Hold(CLOSED, 0.5)], time.time())
        with pytest.raises(StopIteration) as done:
            reserving.send(None)  # answered without suspending once: from the lease, no round trip
        assert isinstance(done.value.value, Reservation)
        exc, dt = await timed(store.reserve([Hold(CLOSED, 90.0)], time.time()))
        assert isinstance(exc, (StoreUnavailable, Exhausted)) and dt <= TIMEOUT_MS / 1000 + SLACK
    finally:
        redis_proc.resume()
    await store.close()
