"""The kill switch: a Redis flag every sidecar of the namespace obeys within 2 s, lifted as fast."""

from __future__ import annotations

import asyncio
import time

import pytest

from kubetoll_core.enums import OnExhausted
from kubetoll_core.kill_switch import get_suspended, set_suspended
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import BudgetStoreSettings
from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
from kubetoll_sidecar.budgets.store import Hold, Meter, Suspended
from support.harness import wait_until

# These tests are not about timeouts: a generous one keeps a loaded machine from looking like
# a Redis outage (tests/test_redis_faults.py uses the 50 ms default on purpose).
SLOW_OK_MS = 1000.0

END = time.time() + 20 * 86400


def meter(budget: str = "b") -> Meter:
    return Meter(
        key=f"{budget}:cap:usd:2026-11",
        kind="window",
        unit="usd",
        limit=100.0,
        budget=budget,
        level="cap",
        label=budget,
        on_exhausted=OnExhausted.reject,
        period_end=END,
    )


async def until(pred, limit: float = 30.0) -> None:
    """Wait for `pred`; `limit` bounds a hang (the poll and pub/sub take well under a second), not a speed claim."""
    await wait_until(pred, timeout=limit, interval=0.01)


async def use(store: RedisBudgetStore, m: Meter) -> None:
    res = await store.reserve([Hold(m, 1.0)], time.time())
    store.settle(res, {m.key: 1.0}, time.time())


@pytest.mark.parametrize("pubsub", [True, False], ids=["pubsub", "poll-only"])
async def test_suspend_and_lift_seen_by_another_sidecar_within_2s(redis_url, ns, r, pubsub):
    m = meter()
    a = RedisBudgetStore.connect(
        BudgetStoreSettings(url=redis_url, timeout_ms=SLOW_OK_MS), ns, "/x", sidecar_id="a", pubsub=pubsub
    )
    b = RedisBudgetStore.connect(
        BudgetStoreSettings(url=redis_url, timeout_ms=SLOW_OK_MS), ns, "/x", sidecar_id="b", pubsub=pubsub
    )
    await a.start()
    await b.start()
    await use(a, m)
    await use(b, m)
    await asyncio.sleep(0.1)  # the poll and subscription are up
    assert not b.is_suspended("b")

    await set_suspended(r, ns, "b", True)
    assert await get_suspended(r, ns, "b")
    await until(lambda: a.is_suspended("b") and b.is_suspended("b"))
    with pytest.raises(Suspended):
        await b.reserve([Hold(m, 1.0)], time.time())
    # outstanding leases go back to the pool
    key = RedisKeys(ns).meter(m.budget, m.key).state

    async def leased() -> int:
        return int((await r.hgetall(key)).get("leased", 0))

    deadline = time.monotonic() + 30  # a hang bound
    while await leased() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await leased() == 0

    await set_suspended(r, ns, "b", False)
    await until(lambda: not a.is_suspended("b") and not b.is_suspended("b"))
    await use(b, m)
    await a.close()
    await b.close()


async def test_flag_set_by_hand_is_caught_by_the_poll(redis_url, ns, r):
    m = meter()
    a = RedisBudgetStore.connect(BudgetStoreSettings(url=redis_url, timeout_ms=SLOW_OK_MS), ns, "/x", sidecar_id="a")
    await a.start()
    await use(a, m)
    await r.set(RedisKeys(ns).suspended("b"), "1")  # no pub/sub message
    await until(lambda: a.is_suspended("b"))
    # The flag gone with nothing saying so (as after an empty Redis restart) lifts nothing...
    await r.delete(RedisKeys(ns).suspended("b"))
    poll = a.counters.redis_calls
    await until(lambda: a.counters.redis_calls >= poll + 2)  # a poll or a sync has read it since
    assert a.is_suspended("b")
    # ...the switch written as cleared (what `kubetoll budget resume` and the operator do) does.
    await r.set(RedisKeys(ns).suspension_known("b"), "1")
    await until(lambda: not a.is_suspended("b"))
    await a.close()


async def test_budget_suspended_before_the_sidecar_ever_saw_it(redis_url, ns, r):
    await set_suspended(r, ns, "fresh", True)
    a = RedisBudgetStore.connect(
        BudgetStoreSettings(url=redis_url, timeout_ms=SLOW_OK_MS), ns, "/x", sidecar_id="a", pubsub=False
    )
    await a.start()
    with pytest.raises(Suspended):
        await a.reserve([Hold(meter("fresh"), 1.0)], time.time())  # the lease script says so
    assert a.is_suspended("fresh")
    other = meter("other")
    await use(a, other)  # other budgets are untouched
    await a.close()


async def test_watched_budget_is_known_suspended_before_any_request(redis_url, ns, r):
    await set_suspended(r, ns, "w", True)
    a = RedisBudgetStore.connect(
        BudgetStoreSettings(url=redis_url, timeout_ms=SLOW_OK_MS), ns, "/x", sidecar_id="a", pubsub=False
    )
    a.watch_budgets(["w"])
    await a.start()
    await until(lambda: a.is_suspended("w"))
    assert await r.sismember(RedisKeys(ns).budgets_index(), "w")
    await a.close()
