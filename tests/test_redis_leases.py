"""Leased quotas on a real Redis: several stores on one budget, expiry, flushing, the ledger, key TTLs."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kubetoll_core.enums import OnExhausted
from kubetoll_core.ledger_stream import period_totals, read_ledger
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import BudgetStoreSettings
from kubetoll_core.spend_record import SpendRecord
from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
from kubetoll_sidecar.budgets.store import Exhausted, Hold, Meter
from kubetoll_sidecar.ledger_redis import RedisLedger

# These tests are not about timeouts: a generous one keeps a loaded machine from looking like
# a Redis outage (tests/test_redis_faults.py uses the 50 ms default on purpose).
SLOW_OK_MS = 1000.0

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOW = time.time()
DAY_END = NOW + 6 * 3600
MONTH_END = NOW + 20 * 86400


def window(
    limit: float, key: str = "b:cap:usd:2026-11", end: float = MONTH_END, fail_open: bool = True, unit: str = "usd"
) -> Meter:
    budget = key.split(":", 1)[0]
    return Meter(
        key=key,
        kind="window",
        unit=unit,
        limit=limit,
        budget=budget,
        level="cap",
        label=key,
        on_exhausted=OnExhausted.reject,
        period_end=end,
        fail_open=fail_open,
    )


def tpm(limit: float, key: str = "b:tier:free:t:acme:tpm") -> Meter:
    return Meter(
        key=key,
        kind="bucket",
        unit="tokens",
        limit=limit,
        budget="b",
        level="tier:free",
        label=key,
        on_exhausted=OnExhausted.reject,
        refill_per_second=limit / 60.0,
    )


def make(url: str, ns: str, sid: str, **kw) -> RedisBudgetStore:
    return RedisBudgetStore.connect(
        BudgetStoreSettings(url=url, timeout_ms=SLOW_OK_MS), ns, "/nonexistent", sidecar_id=sid, **kw
    )


async def spend_loop(
    store: RedisBudgetStore, holds: list[Hold], actual, stop_after_rejects: int = 30
) -> tuple[int, int]:
    admitted = rejected = 0
    last_admit = time.monotonic()
    # Until refused for a while: a sliver another sidecar gives back may still fit.
    while rejected < stop_after_rejects or time.monotonic() - last_admit < 0.6:
        try:
            res = await store.reserve(holds, time.time())
        except Exhausted:
            rejected += 1
            await asyncio.sleep(0.005)
            continue
        admitted += 1
        last_admit = time.monotonic()
        await asyncio.sleep(0)
        store.settle(res, {h.meter.key: actual(h.amount) for h in holds}, time.time())
    return admitted, rejected


async def test_two_sidecars_on_one_budget_never_overspend(redis_url, ns, r):
    m = window(2.0)
    a, b = make(redis_url, ns, "a"), make(redis_url, ns, "b")
    await a.start()
    await b.start()
    rnd = random.Random(7)
    results = await asyncio.gather(
        *(spend_loop(s, [Hold(m, 0.01)], lambda x: x * rnd.uniform(0.5, 1.0)) for s in (a, b, a, b))
    )
    await a.close()
    await b.close()
    (t,) = await period_totals(r, ns)
    assert t.leased_units == 0  # every lease went back on close
    assert t.spent_units <= t.limit_units  # settling at or below the estimate: no overshoot at all
    # And the budget was used, not stranded in leases: what is left is less than a few holds.
    assert t.limit_units - t.spent_units < 0.2 * t.limit_units
    assert sum(x for x, _ in results) > 200


async def test_spending_exactly_the_estimate_reaches_the_limit_exactly(redis_url, ns, r):
    m = window(1.0)
    stores = [make(redis_url, ns, f"s{i}") for i in range(3)]
    for s in stores:
        await s.start()
    admitted = await asyncio.gather(*(spend_loop(s, [Hold(m, 0.01)], lambda x: x) for s in stores))
    for s in stores:
        await s.close()
    (t,) = await period_totals(r, ns)
    assert sum(a for a, _ in admitted) == 100
    assert t.spent_units == t.limit_units


async def test_token_bucket_shared_by_two_sidecars(redis_url, ns, r):
    m = tpm(600.0)  # 10 tokens/s refill
    a, b = make(redis_url, ns, "a"), make(redis_url, ns, "b")
    await a.start()
    await b.start()
    t0 = time.monotonic()
    got = await asyncio.gather(*(spend_loop(s, [Hold(m, 10.0)], lambda x: x, stop_after_rejects=10) for s in (a, b)))
    elapsed = time.monotonic() - t0
    await a.close()
    await b.close()
    admitted = sum(x for x, _ in got)
    # capacity 600 plus what refilled while they ran: never more
    assert admitted * 10 <= 600 + 10 * elapsed + 1
    assert admitted >= 55


async def test_lease_follows_own_rate_and_returns_when_idle(redis_url, ns, r):
    m = window(1000.0)
    s = make(redis_url, ns, "a", lease_seconds=0.5)
    await s.start()
    for _ in range(200):
        res = await s.reserve([Hold(m, 0.01)], time.time())
        s.settle(res, {m.key: 0.01}, time.time())
        await asyncio.sleep(0.002)
    st = s.lease_of(m.key)
    # it holds more than one request's worth (no round trip per request) ...
    assert st.lease > 3 * 10_000_000
    # ... but far less than the budget
    assert st.lease < 0.01 * st.limit
    await asyncio.sleep(2.5)  # idle for more than 2 x lease_seconds, plus a scan
    assert s.lease_of(m.key).lease == 0
    h = await r.hgetall(RedisKeys(ns).meter(m.budget, m.key).state)
    assert int(h["leased"]) == 0
    await s.close()


async def test_leases_shrink_near_the_limit(redis_url, ns):
    m = window(1.0)
    stores = [make(redis_url, ns, f"s{i}") for i in range(4)]
    for s in stores:
        await s.start()
    # Each takes a lease; with 4 holders none may take more than frac * remaining / holders (or one request).
    for s in stores:
        res = await s.reserve([Hold(m, 0.1)], time.time())
        s.settle(res, {m.key: 0.1}, time.time())
    leases = [s.lease_of(m.key).lease for s in stores]
    assert sum(leases) <= 1_000_000_000
    assert leases[-1] <= max(0.5 * (1_000_000_000 - sum(leases[:-1])), 100_000_000)
    for s in stores:
        await s.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    sys.path[:0] = [{root!r} + "/sidecar"]
    from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
    from kubetoll_sidecar.budgets.store import Hold, Meter
    from kubetoll_core.router_config import BudgetStoreSettings
    from kubetoll_core.enums import OnExhausted

    async def main():
        m = Meter(key="b:cap:usd:2026-11", kind="window", unit="usd", limit=10.0, budget="b", level="cap",
                  label="b", on_exhausted=OnExhausted.reject, period_end={end!r})
        settings = BudgetStoreSettings(url={url!r}, timeout_ms=1000)
        s = RedisBudgetStore.connect(settings, {ns!r}, "/nonexistent", sidecar_id="doomed", lease_ttl=1.0)
        await s.start()
        done = await s.reserve([Hold(m, 1.0)], time.time())
        s.settle(done, {{m.key: 0.75}}, time.time())
        await s.reserve([Hold(m, 2.0)], time.time())  # in flight when the process dies
        await asyncio.sleep(0.4)  # the 0.75 is flushed by now
        print("ready", s.lease_of(m.key).lease, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_killed_sidecar_loses_only_its_lease(redis_url, ns, r):
    m = window(10.0)
    code = CHILD.format(root=ROOT, url=redis_url, ns=ns, end=MONTH_END)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20)
        assert line.startswith("ready"), line
        keys = RedisKeys(ns).meter(m.budget, m.key)
        h = await r.hgetall(keys.state)
        assert int(h["spent"]) == 750_000_000
        assert int(h["L:doomed"]) >= 2_000_000_000  # the reservation in flight is covered by its lease
        child.send_signal(signal.SIGKILL)
        child.wait(5)
    finally:
        if child.poll() is None:
            child.kill()
    await asyncio.sleep(1.2)  # the lease expires (Redis time); the next script touching the meter drops it
    s = make(redis_url, ns, "survivor")
    await s.start()
    await s.reserve([Hold(m, 9.25)], time.time())  # everything not spent is available again
    h = await r.hgetall(RedisKeys(ns).meter(m.budget, m.key).state)
    assert "L:doomed" not in h
    assert int(h["spent"]) == 750_000_000
    assert await r.zscore(RedisKeys(ns).meter(m.budget, m.key).holders, "doomed") is None
    await s.close()


async def test_ledger_and_period_totals_agree_exactly(redis_url, ns, r):
    cap = window(1e6, "b:cap:usd:2026-11")
    day = window(1e6, "b:cap:usd:2026-11-22", end=DAY_END)
    tenants = ["acme", "globex", "initech"]
    tier = {t: window(1e6, f"b:tier:free:t:{t}:usd:2026-11") for t in tenants}
    stores = [make(redis_url, ns, f"s{i}", flush_interval=0.02, batch_records=64) for i in range(2)]
    ledgers = [RedisLedger(s, s.client) for s in stores]
    for s in stores:
        await s.start()
    rnd = random.Random(3)

    async def request(i: int):
        s, led = stores[i % 2], ledgers[i % 2]
        t = tenants[i % 3]
        res = await s.reserve([Hold(cap, 0.05), Hold(day, 0.05), Hold(tier[t], 0.05)], time.time())
        await asyncio.sleep(rnd.random() * 0.01)
        cost = rnd.uniform(0.0, 0.05)
        s.settle(res, {cap.key: cost, day.key: cost, tier[t].key: cost}, time.time())
        led.append(
            SpendRecord(
                time=time.time(),
                namespace=ns,
                route="chat",
                backend="gpt",
                tenant=t,
                tier="free",
                prompt_tokens=10,
                completion_tokens=5,
                cached_tokens=0,
                cost_usd=cost,
                request_id=str(i),
            )
        )

    await asyncio.gather(*(request(i) for i in range(1500)))
    for s in stores:
        await s.close()
    records = await read_ledger(r, ns, since=NOW - 60)
    assert len(records) == 1500
    assert len(list(ledgers[0].records())) == 750  # this process's own, no I/O
    assert len({x.request_id for x in records}) == 1500
    totals = {t.meter: t for t in await period_totals(r, ns)}
    nusd = lambda c: round(c * 1e9)  # noqa: E731
    ledger_total = sum(nusd(x.cost_usd) for x in records)
    assert totals["cap:usd:2026-11"].spent_units == ledger_total
    assert totals["cap:usd:2026-11-22"].spent_units == ledger_total
    for t in tenants:
        assert totals[f"tier:free:t:{t}:usd:2026-11"].spent_units == sum(
            nusd(x.cost_usd) for x in records if x.tenant == t
        )
    # the exact integers are in the stream too
    raw = await r.xrange(RedisKeys(ns).ledger(), count=1)
    assert int(raw[0][1]["cost_nusd"]) == nusd(float(raw[0][1]["cost_usd"]))


async def test_period_keys_expire_on_their_own(redis_url, ns, r):
    day, month = window(10.0, "b:cap:usd:2026-11-22", end=DAY_END), window(10.0, "b:cap:usd:2026-11")
    bucket = tpm(600.0)
    s = make(redis_url, ns, "a")
    await s.start()
    res = await s.reserve([Hold(day, 1.0), Hold(month, 1.0), Hold(bucket, 60.0)], time.time())
    s.settle(res, {day.key: 1.0, month.key: 1.0, bucket.key: 60.0}, time.time())
    await s.close()
    keys = RedisKeys(ns)
    now_ms = time.time() * 1000
    for m, retention_days in ((day, 35), (month, 400)):
        expected = m.period_end * 1000 + retention_days * 86_400_000 - now_ms
        for k in (keys.meter(m.budget, m.key).state,):
            assert await r.pttl(k) == pytest.approx(expected, abs=5000)
    # a bucket lives until it would be full again, plus a grace
    assert 0 < await r.pttl(keys.meter(bucket.budget, bucket.key).state) <= (60 / 10 + 2 * 10 + 60 + 5) * 1000
    assert await r.pttl(keys.meter_index("b")) > 400 * 86_400_000
    assert 0 < await r.pttl(keys.sidecar(keys.ns_tag, "a")) <= 7 * 86_400_000
    members = await r.zrange(keys.meter_index("b"), 0, -1)
    assert set(members) == {"cap:usd:2026-11-22", "cap:usd:2026-11", "tier:free:t:acme:tpm"}


async def test_ledger_trims_records_older_than_retention(redis_url, ns, r):
    key = RedisKeys(ns).ledger()
    old = int((time.time() - 3 * 86400) * 1000)
    for i in range(450):  # several stream nodes' worth, so approximate trimming can drop whole nodes
        await r.xadd(key, {"time": "0", "cost_usd": "0"}, id=f"{old}-{i + 1}")
    s = RedisBudgetStore.connect(
        BudgetStoreSettings(url=redis_url, ledger_retention_days=1, timeout_ms=SLOW_OK_MS),
        ns,
        "/nonexistent",
        sidecar_id="a",
    )
    await s.start()
    RedisLedger(s, s.client).append(
        SpendRecord(
            time=time.time(),
            namespace=ns,
            route="r",
            backend="x",
            tenant="t",
            tier="free",
            prompt_tokens=1,
            completion_tokens=1,
            cached_tokens=0,
            cost_usd=0.001,
        )
    )
    await s.close()
    entries = await r.xrange(key)
    assert len(entries) < 451 - 100
    assert entries[-1][1]["cost_usd"] == "0.001"


async def test_redis_commands_per_request_stay_below_a_tenth(redis_url, ns):
    cap, tenant_day, tokens = window(1e6), window(1e6, "b:tier:free:t:acme:usd:2026-11-22", end=DAY_END), tpm(6e8)
    s = make(redis_url, ns, "a")
    led = RedisLedger(s, s.client)
    await s.start()
    calls0 = s.counters.redis_calls
    n = 20_000
    for i in range(n):
        res = await s.reserve([Hold(cap, 0.002), Hold(tenant_day, 0.002), Hold(tokens, 500.0)], time.time())
        s.settle(res, {cap.key: 0.001, tenant_day.key: 0.001, tokens.key: 300.0}, time.time())
        led.append(
            SpendRecord(
                time=time.time(),
                namespace=ns,
                route="r",
                backend="x",
                tenant="acme",
                tier="free",
                prompt_tokens=200,
                completion_tokens=100,
                cached_tokens=0,
                cost_usd=0.001,
            )
        )
        if i % 50 == 0:
            await asyncio.sleep(0.001)  # spread over time like real traffic, letting the flusher run
    per_request = (s.counters.redis_calls - calls0) / n
    await s.close()
    assert per_request <= 0.1, per_request
    assert s.stats()["buffered_records"] == 0


async def test_thousands_of_tenant_meters_are_synced_in_bounded_calls(redis_url, ns, r):
    meters = [window(1.0, f"b:tier:free:t:tenant{i}:usd:2026-11") for i in range(2500)]
    # 2,500 first leases at once take one long sync; on a loaded CI machine that can pass
    # 1 s, which would turn this test about batching into one about outages.
    settings = BudgetStoreSettings(url=redis_url, timeout_ms=10_000.0)
    s = RedisBudgetStore.connect(settings, ns, "/nonexistent", sidecar_id="a")
    await s.start()

    async def one(m: Meter) -> None:
        res = await s.reserve([Hold(m, 0.1)], time.time())
        s.settle(res, {m.key: 0.05}, time.time())

    await asyncio.gather(*(one(m) for m in meters))
    await s.close()
    totals = await period_totals(r, ns, "b")
    assert len(totals) == 2500
    assert {t.spent_units for t in totals} == {50_000_000}
    assert {t.leased_units for t in totals} == {0}
