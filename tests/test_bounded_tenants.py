"""Per-tenant state is bounded, and evicting a tenant's meter never gives back its spend.

Through a running sidecar with the in-memory store bounded at 100 meters: a
tenant spends most of its daily allowance, 300 new tenants push its window out
of the table, and it is still refused when it comes back; the table stays
bounded and the eviction shows in the store's metric.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from kubetoll_sidecar.budgets.spill import SpendSpill
from support.harness import base_config


def budget_store_stat(text: str, stat: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'kubetoll_budget_store{{stat="{stat}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no kubetoll_budget_store stat {stat!r} in /metrics")


async def test_an_evicted_tenant_comes_back_charged(sim: Any, start_sidecar: Any) -> None:
    cfg = base_config(sim.url)
    cfg["budgetStore"] = {"maxMeters": 100}
    cfg["tenancy"] = {"defaultTier": "free"}
    cfg["budgets"] = [{"name": "b", "tiers": {"free": {"usdPerDay": 0.002}}}]
    sc = await start_sidecar(cfg)
    client = sc.openai()

    async def ask(tenant: str) -> None:
        await client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=16,
            extra_headers={"x-kubetoll-tenant": tenant},
        )

    # alice spends until refused: her window is at its limit.
    served = 0
    with pytest.raises(openai.RateLimitError):
        for _ in range(200):
            await ask("alice")
            served += 1
    assert served > 0
    # 300 other tenants push her window out of the table.
    for i in range(300):
        await ask(f"tenant-{i}")
    store = sc.sidecar.store
    stats = store.stats()
    assert stats["evicted_windows"] > 0 and stats["meters"] <= 100
    assert "b:tier:free:t:alice:usd" not in " ".join(store._windows)  # she was evicted
    # Back, she is still refused: her spend came back with her.
    with pytest.raises(openai.RateLimitError):
        await ask("alice")
    async with aiohttp.ClientSession() as http, http.get(sc.ops_url + "/metrics") as resp:
        text = await resp.text()
    assert budget_store_stat(text, "evicted_windows") == stats["evicted_windows"]


def test_the_spill_never_undercounts() -> None:
    spill = SpendSpill()
    truth = {f"b:tier:free:t:{i}:usd:2026-12-02": (i % 97) * 0.001 for i in range(50_000)}
    for key, spent in truth.items():
        spill.add(key, 1000.0, spent)
    over = [spill.estimate(k, 1000.0) - v for k, v in truth.items()]
    assert min(over) >= -1e-12  # never below the truth
    total = sum(truth.values())
    assert sum(over) / len(over) < 0.01 * total / 100  # collisions add little on average
    assert spill.estimate("never-seen", 1000.0) >= 0 and spill.estimate("x", 2000.0) == 0.0
    spill.forget_ended(1000.0)
    assert len(spill) == 0


async def test_the_redis_store_forgets_idle_tenant_states_past_its_bound(redis_url: str, ns: str) -> None:
    import time

    from kubetoll_core.enums import OnExhausted
    from kubetoll_core.router_config import BudgetStoreSettings
    from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
    from kubetoll_sidecar.budgets.store import Hold, Meter

    def tenant_window(i: int) -> Meter:
        key = f"b:tier:free:t:tenant-{i}:usd:2026-12-02"
        return Meter(
            key=key,
            kind="window",
            unit="usd",
            limit=1.0,
            budget="b",
            level="tier:free",
            label=key,
            on_exhausted=OnExhausted.reject,
            period_end=time.time() + 3600,
        )

    store = RedisBudgetStore.connect(
        BudgetStoreSettings(url=redis_url, timeout_ms=1000, maxMeters=100),
        ns,
        "/nonexistent",
        sidecar_id="a",
        lease_seconds=0.2,
    )
    await store.start()
    try:
        for i in range(300):
            m = tenant_window(i)
            res = await store.reserve([Hold(m, 0.01)], time.time())
            store.settle(res, {m.key: 0.01}, time.time())
        # Leases come back once idle (2 x lease_seconds); then the table is cut back under its bound.
        deadline = time.monotonic() + 20
        while store.stats()["meters_tracked"] > 100:
            assert time.monotonic() < deadline, store.stats()
            await asyncio.sleep(0.1)
        assert store.stats()["evicted_meters"] > 0
        # A forgotten tenant's spend is Redis's: its next reservation sees what it spent.
        m = tenant_window(0)
        res = await store.reserve([Hold(m, 0.5)], time.time())
        store.settle(res, {m.key: 0.5}, time.time())
        assert store.snapshot(m, time.time()).used >= 0.51 - 1e-9
    finally:
        await store.close()


def test_the_namespace_caps_meters_are_one_object_for_every_tenant() -> None:
    """A new tenant's meter set holds its own tier meters only; the caps' meters (the same for all) are shared,
    so the memo grows by the tenant's part alone, and the store sees one object per cap meter."""
    import tracemalloc

    from kubetoll_core.router_config import RouterConfig
    from kubetoll_sidecar.budgets.admission import BudgetMeters

    cfg = base_config("http://127.0.0.1:1")
    cfg["budgets"] = [
        {
            "name": "b",
            "cap": {"usdPerDay": 5, "usdPerMonth": 50, "tokensPerDay": 10**7},
            "tiers": {"free": {"usdPerDay": 1, "tokensPerMinute": 1000, "requestsPerMinute": 30}},
        }
    ]
    meters = BudgetMeters(RouterConfig.model_validate(cfg))
    now = 1_795_000_000.0
    a, b = (meters.for_request("chat", t, "free", now) for t in ("alice", "bob"))
    caps = [m for m in a.all() if m.level == "cap"]
    assert len(caps) == 3 and all(any(m is c for m in b.all()) for c in caps)
    assert [m.key for m in a.all() if m.level != "cap"] != [m.key for m in b.all() if m.level != "cap"]
    # A tier meter's level, label, limit and refill rate are the same for every tenant: one object each.
    tier_a, tier_b = ([m for m in x.all() if m.level != "cap"] for x in (a, b))
    assert tier_a and all(
        x.label is y.label and x.level is y.level and x.limit is y.limit and x.refill_per_second is y.refill_per_second
        for x, y in zip(tier_a, tier_b)
    )
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(2000):
        meters.for_request("chat", f"tenant-{i}", "free", now)
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    print(f"BudgetMeters memo: {grown / 2000:.0f} B a tenant")  # printed, not asserted (it is the interpreter's)
