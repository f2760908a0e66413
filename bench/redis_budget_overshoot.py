"""Redis-backed budgets under contention: overshoot, Redis commands per request, throughput.

N OS processes, each with its own RedisBudgetStore (its own sidecar id, its own
leases), run reserve/settle loops on one small budget until it is spent. Then
the budget's total in Redis is compared with its limit. A second part compares
one process's reserve/settle rate on the in-memory and the Redis store.

Prints figures; asserts nothing (benchmarks never pass or fail).

    .venv/bin/python bench/redis_budget_overshoot.py --procs 20 --budget 20 --hold 0.001
    REDIS_URL=redis://127.0.0.1:6379/15 ...   (default: a private redis-server on a free port)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, d) for d in ("core", "sidecar", "operator", "tools")]
sys.path.insert(0, os.path.join(ROOT, "bench"))

from benchsupport.redis_server import start_redis  # noqa: E402
from kubetoll_core.enums import OnExhausted  # noqa: E402
from kubetoll_core.router_config import BudgetStoreSettings  # noqa: E402
from kubetoll_sidecar.budgets.memory import InMemoryBudgetStore  # noqa: E402
from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore  # noqa: E402
from kubetoll_sidecar.budgets.store import Exhausted, Hold, Meter, StoreUnavailable  # noqa: E402

END = time.time() + 20 * 86400


def meters(limit: float) -> list[Meter]:
    cap = Meter(
        key="b:cap:usd:2026-11",
        kind="window",
        unit="usd",
        limit=limit,
        budget="b",
        level="cap",
        label="b/cap/usd-month",
        on_exhausted=OnExhausted.reject,
        period_end=END,
    )
    tenant = Meter(
        key="b:tier:pro:t:acme:usd:2026-11-22",
        kind="window",
        unit="usd",
        limit=limit * 10,
        budget="b",
        level="tier:pro",
        label="b/tier:pro/usd-day",
        on_exhausted=OnExhausted.reject,
        period_end=END,
    )
    tpm = Meter(
        key="b:tier:pro:t:acme:tpm",
        kind="bucket",
        unit="tokens",
        limit=1e12,
        budget="b",
        level="tier:pro",
        label="b/tier:pro/tokens-per-minute",
        on_exhausted=OnExhausted.reject,
        refill_per_second=1e12 / 60,
    )
    return [cap, tenant, tpm]


def actual_of(mode: str, rnd: random.Random):
    if mode == "exact":
        return lambda x: x
    if mode == "over":  # estimates a little low now and then: the memory store overshoots as much
        return lambda x: x * rnd.uniform(0.8, 1.1)
    return lambda x: x * rnd.uniform(0.5, 1.0)


async def loop(store, ms: list[Meter], hold: float, actual, stop_after: int, deadline: float) -> dict:
    holds = [Hold(ms[0], hold), Hold(ms[1], hold), Hold(ms[2], 500.0)]
    admitted = rejected = unavailable = 0
    streak = 0
    while streak < stop_after and time.monotonic() < deadline:
        try:
            res = await store.reserve(holds, time.time())
        except Exhausted:
            rejected += 1
            streak += 1
            await asyncio.sleep(0.002)
            continue
        except StoreUnavailable:
            unavailable += 1
            await asyncio.sleep(0.002)
            continue
        streak = 0
        admitted += 1
        a = actual(hold)
        await store.settle(res, {ms[0].key: a, ms[1].key: a, ms[2].key: 300.0}, time.time())
        if admitted % 64 == 0:
            await asyncio.sleep(0)  # let the flusher run, as a server's event loop would
    return dict(admitted=admitted, rejected=rejected, unavailable=unavailable)


def worker(url: str, ns: str, i: int, limit: float, hold: float, mode: str, start: mp.Event, out: mp.Queue) -> None:
    async def main():
        settings = BudgetStoreSettings(url=url, timeout_ms=50)
        s = RedisBudgetStore.connect(settings, ns, "/nonexistent", sidecar_id=f"bench-{i}")
        await s.start()
        start.wait()
        t0 = time.monotonic()
        r = await loop(s, meters(limit), hold, actual_of(mode, random.Random(i)), 200, t0 + 120)
        elapsed = time.monotonic() - t0
        await s.close()
        st = s.stats()
        r.update(
            elapsed=elapsed,
            redis_calls=st["redis_calls"],
            degraded=st["degraded_decisions_total"],
            unavailable_total=st["unavailable_total"],
        )
        out.put(r)

    asyncio.run(main())


async def totals(url: str, ns: str):
    from redis.asyncio import Redis

    from kubetoll_core.ledger_stream import period_totals

    r = Redis.from_url(url, decode_responses=True)
    try:
        return {t.meter: t for t in await period_totals(r, ns)}
    finally:
        await r.aclose()


async def throughput(url: str, n: int) -> tuple[float, float, float]:
    ms = meters(1e9)
    actual = actual_of("random", random.Random(1))

    async def run(store) -> float:
        holds = [Hold(ms[0], 0.001), Hold(ms[1], 0.001), Hold(ms[2], 500.0)]
        t0 = time.perf_counter()
        for i in range(n):
            res = await store.reserve(holds, time.time())
            a = actual(0.001)
            await store.settle(res, {ms[0].key: a, ms[1].key: a, ms[2].key: 300.0}, time.time())
            if i % 64 == 0:
                await asyncio.sleep(0)
        return n / (time.perf_counter() - t0)

    mem = await run(InMemoryBudgetStore())
    ns = f"tp{uuid.uuid4().hex[:8]}"
    s = RedisBudgetStore.connect(BudgetStoreSettings(url=url), ns, "/nonexistent", sidecar_id="tp")
    await s.start()
    await run(s)  # warm up leases and rates
    calls0 = s.counters.redis_calls
    red = await run(s)
    per_req = (s.counters.redis_calls - calls0) / n
    await s.close()
    return mem, red, per_req


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=20)
    ap.add_argument("--budget", type=float, default=20.0, help="USD limit of the shared cap")
    ap.add_argument("--hold", type=float, default=0.001, help="USD reserved per request")
    ap.add_argument(
        "--actual",
        choices=["random", "exact", "over"],
        default="random",
        help="settled amount: 0.5-1.0x the estimate (random), the estimate, or 0.8-1.1x (over)",
    )
    ap.add_argument("--throughput-n", type=int, default=50_000)
    args = ap.parse_args()

    url, proc = start_redis()
    try:
        ns = f"bench{uuid.uuid4().hex[:8]}"
        ctx = mp.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        ps = [
            ctx.Process(target=worker, args=(url, ns, i, args.budget, args.hold, args.actual, start, out))
            for i in range(args.procs)
        ]
        for p in ps:
            p.start()
        time.sleep(1.0 + 0.1 * args.procs)  # every store started and connected
        t0 = time.monotonic()
        start.set()
        results = [out.get(timeout=300) for _ in ps]
        wall = time.monotonic() - t0
        for p in ps:
            p.join(30)
        t = asyncio.run(totals(url, ns))["cap:usd:2026-11"]
        admitted = sum(r["admitted"] for r in results)
        ops = admitted + sum(r["rejected"] + r["unavailable"] for r in results)
        calls = sum(r["redis_calls"] for r in results)
        print(
            f"{args.procs} processes, one ${args.budget:g} budget, ${args.hold:g} per request, settled: {args.actual}"
        )
        print(f"  spent            ${t.spent:.6f} of ${t.limit:g} ({100 * t.spent / t.limit:.3f}% used)")
        print(f"  overshoot        {max(t.spent - t.limit, 0) / t.limit * 100:.4f}% of the budget")
        print(f"  still leased     ${t.leased:.6f} (after every store closed)")
        print(f"  admitted         {admitted} requests ({admitted / wall:,.0f}/s across all processes, {wall:.2f}s)")
        print(
            f"  rejected         {sum(r['rejected'] for r in results)}, unavailable "
            f"{sum(r['unavailable'] for r in results)}, degraded decisions {sum(r['degraded'] for r in results)}"
        )
        print(
            f"  Redis commands   {calls} = {calls / max(admitted, 1):.4f} per admitted request, "
            f"{calls / max(ops, 1):.4f} per reserve call"
        )
    finally:
        if proc is not None:
            proc.kill()

    url, proc = start_redis()
    try:
        mem, red, per_req = asyncio.run(throughput(url, args.throughput_n))
        print(f"one process, 3 meters per request, {args.throughput_n} reserve+settle, no contention:")
        print(f"  in-memory store  {mem:,.0f} requests/s")
        print(
            f"  Redis store      {red:,.0f} requests/s ({100 * red / mem:.0f}% of in-memory), "
            f"{per_req:.4f} Redis commands per request"
        )
    finally:
        if proc is not None:
            proc.kill()


if __name__ == "__main__":
    main()
