"""The Redis store gives the in-memory store's answers for one process.

Each test runs against both stores (same calls, same expectations), so the
reference semantics in `budgets/memory.py` are the specification.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from kubetoll_core.enums import OnExhausted
from kubetoll_core.ledger_stream import period_totals
from kubetoll_core.router_config import BudgetStoreSettings
from kubetoll_sidecar.budgets.admission import Rejected, reserve_with_policy
from kubetoll_sidecar.budgets.memory import InMemoryBudgetStore
from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
from kubetoll_sidecar.budgets.store import Exhausted, Hold, Meter

# These tests are not about timeouts: a generous one keeps a loaded machine from looking like
# a Redis outage (tests/test_redis_faults.py uses the 50 ms default on purpose).
SLOW_OK_MS = 1000.0

NOW = time.time()
PERIOD_END = NOW + 3 * 86400


def window(
    limit: float, name: str = "cap:usd:2026-11", budget: str = "b", on=OnExhausted.reject, unit: str = "usd"
) -> Meter:
    return Meter(
        key=f"{budget}:{name}",
        kind="window",
        unit=unit,
        limit=limit,
        budget=budget,
        level="cap",
        label=f"{budget}/{name}",
        on_exhausted=on,
        period_end=PERIOD_END,
    )


def bucket(limit: float, refill: float = 0.001, name: str = "tier:free:t:acme:tpm", budget: str = "b") -> Meter:
    return Meter(
        key=f"{budget}:{name}",
        kind="bucket",
        unit="tokens",
        limit=limit,
        budget=budget,
        level="tier:free",
        label=f"{budget}/{name}",
        on_exhausted=OnExhausted.reject,
        refill_per_second=refill,
    )


@pytest.fixture(params=["memory", "redis"])
async def store(request, redis_url):
    if request.param == "memory":
        yield InMemoryBudgetStore()
        return
    s = RedisBudgetStore.connect(
        BudgetStoreSettings(url=redis_url, timeout_ms=SLOW_OK_MS),
        f"t{uuid.uuid4().hex[:10]}",
        "/nonexistent",
        sidecar_id="sem",
    )
    await s.start()
    yield s
    await s.close()


async def test_window_reserve_within_and_beyond_limit(store):
    m = window(10.0)
    await store.reserve([Hold(m, 4.0)], NOW)
    assert store.snapshot(m, NOW).used == pytest.approx(4.0)
    with pytest.raises(Exhausted) as ei:
        await store.reserve([Hold(m, 7.0)], NOW)
    assert ei.value.meter is m
    assert ei.value.needed == 7.0
    assert ei.value.available == pytest.approx(6.0)
    assert ei.value.retry_after == pytest.approx(PERIOD_END - NOW)
    await store.reserve([Hold(m, 6.0)], NOW)  # exactly what is left
    assert store.snapshot(m, NOW).used == pytest.approx(10.0)
    with pytest.raises(Exhausted):
        await store.reserve([Hold(m, 0.000001)], NOW)


async def test_all_or_nothing(store):
    a, b = window(10.0, "cap:usd:2026-11"), window(1.0, "cap:tokens:2026-11", unit="tokens")
    with pytest.raises(Exhausted) as ei:
        await store.reserve([Hold(a, 5.0), Hold(b, 2.0)], NOW)
    assert ei.value.meter is b
    assert store.snapshot(a, NOW).used == 0.0
    assert store.snapshot(b, NOW).used == 0.0


async def test_first_failing_hold_in_order_is_reported(store):
    a, b = window(1.0, "cap:usd:2026-11"), window(1.0, "cap:usd:2026-11-22")
    with pytest.raises(Exhausted) as ei:
        await store.reserve([Hold(a, 2.0), Hold(b, 2.0)], NOW)
    assert ei.value.meter is a


async def test_settle_replaces_the_estimate_once(store):
    m = window(10.0)
    res = await store.reserve([Hold(m, 4.0)], NOW)
    store.settle(res, {m.key: 2.5}, NOW)
    assert store.snapshot(m, NOW).used == pytest.approx(2.5)
    store.settle(res, {m.key: 2.5}, NOW)  # settling twice changes nothing
    assert store.snapshot(m, NOW).used == pytest.approx(2.5)
    res = await store.reserve([Hold(m, 1.0)], NOW)
    store.settle(res, {}, NOW)  # missing -> 0
    assert store.snapshot(m, NOW).used == pytest.approx(2.5)


async def test_settle_above_the_estimate_counts_the_overage(store):
    m = window(10.0)
    res = await store.reserve([Hold(m, 1.0)], NOW)
    store.settle(res, {m.key: 3.0}, NOW)
    assert store.snapshot(m, NOW).used == pytest.approx(3.0)


async def test_unenforced_hold_counts_past_the_limit(store):
    m = window(10.0)
    await store.reserve([Hold(m, 8.0)], NOW)
    await store.reserve([Hold(m, 5.0, enforce=False)], NOW)
    assert store.snapshot(m, NOW).used == pytest.approx(13.0)
    with pytest.raises(Exhausted) as ei:
        await store.reserve([Hold(m, 0.5)], NOW)
    assert ei.value.available == pytest.approx(-3.0)


async def test_bucket_take_give_back_and_retry_after(store):
    m = bucket(10.0, refill=0.001)
    res = await store.reserve([Hold(m, 10.0)], NOW)
    assert store.snapshot(m, NOW).used == pytest.approx(10.0, abs=0.01)
    with pytest.raises(Exhausted) as ei:
        await store.reserve([Hold(m, 1.0)], NOW)
    assert ei.value.retry_after == pytest.approx(1000.0, rel=0.02)
    store.settle(res, {m.key: 4.0}, NOW)  # 6 unused tokens go back
    assert store.snapshot(m, NOW).used == pytest.approx(4.0, abs=0.01)
    await store.reserve([Hold(m, 6.0)], NOW)
    with pytest.raises(Exhausted):
        await store.reserve([Hold(m, 1.0)], NOW)


async def test_bucket_hold_larger_than_capacity_never_fits(store):
    m = bucket(10.0, refill=1.0)
    with pytest.raises(Exhausted) as ei:
        await store.reserve([Hold(m, 11.0)], NOW)
    assert ei.value.retry_after is None


async def test_unknown_meter_snapshot_is_empty(store):
    m = window(5.0)
    st = store.snapshot(m, NOW)
    assert (st.used, st.limit, st.remaining) == (0.0, 5.0, 5.0)


async def test_reserve_with_policy_allow_and_reject(store):
    allow = window(1.0, "cap:usd:2026-11", on=OnExhausted.allow)
    reject = window(100.0, "tier:free:t:acme:usd:2026-11", on=OnExhausted.reject)
    adm = await reserve_with_policy(store, [Hold(allow, 2.0), Hold(reject, 2.0)], NOW, can_downgrade=False)
    assert adm.overage == [allow.label]
    assert store.snapshot(allow, NOW).used == pytest.approx(2.0)
    with pytest.raises(Rejected):
        await reserve_with_policy(store, [Hold(reject, 99.0)], NOW, can_downgrade=False)


async def test_many_small_settles_sum_exactly(store):
    m = window(100.0)
    for i in range(300):
        res = await store.reserve([Hold(m, 0.01)], NOW)
        store.settle(res, {m.key: 0.001 + (i % 7) * 0.0001}, NOW)
    expected = sum(0.001 + (i % 7) * 0.0001 for i in range(300))
    assert store.snapshot(m, NOW).used == pytest.approx(expected, abs=1e-9)
    if isinstance(store, RedisBudgetStore):
        await store.close()  # flush, then read Redis's own total
        (total,) = await _totals(store)
        assert total.spent_units == sum(round((0.001 + (i % 7) * 0.0001) * 1e9) for i in range(300))
        assert total.leased_units == 0


async def _totals(store: RedisBudgetStore):
    from redis.asyncio import Redis

    r = Redis.from_url(store.settings.url, decode_responses=True)
    try:
        return await period_totals(r, store.namespace)
    finally:
        await r.aclose()


async def test_concurrent_reserves_never_pass_the_limit(store):
    m = window(5.0)
    admitted = 0

    async def one():
        nonlocal admitted
        try:
            await store.reserve([Hold(m, 0.25)], NOW)
            admitted += 1
        except Exhausted:
            pass

    await asyncio.gather(*(one() for _ in range(40)))
    assert admitted == 20
    assert store.snapshot(m, NOW).used == pytest.approx(5.0)
