"""Sidecar processes sharing Redis-backed budgets: throughput vs in-memory, Redis commands per request, overshoot.

Starts a private redis-server (or uses REDIS_URL), one simulated upstream (its own
process) and two sets of --sidecars sidecar processes (`python -m
kubetoll_tools.cli sidecar --config <temp>/router.json`, budgets and metrics on):
one with `budgetStore.url` (the Redis store, one namespace), one without (the
in-memory store), the same config otherwise. Then:

 (a) steady state, route `chat`, whose six meters (namespace cap and tenant tier,
     as in sidecar_latency.py) are never exhausted: load on every sidecar of a set
     at once (wrk: one process, one thread per sidecar, --concurrency connections
     each; else an aiohttp generator in this process), --rounds segments of
     --duration s per set, alternating in-memory and Redis so drift hits both.
     Prints requests/s both ways and their ratio, the sidecars' CPU per request,
     and Redis commands per request: the delta of the sidecars' own
     `kubetoll_budget_store{stat="redis_calls"}` gauges (a script call is one
     command) over the requests they counted, cross-checked with Redis's INFO
     commandstats (evalsha calls: one per sync script);
 (b) overshoot, route `small`, covered only by one small USD budget (--budget,
     usdPerDay, capOnExhausted reject, --fail-mode): aiohttp load spread over
     every Redis-store sidecar until each answers 429 budget_exhausted; SIGTERM
     (each returns its leases and flushes its spend); then the budget's settled
     spend in Redis (`ledger_redis.period_totals`) against its limit.

Every process shares the machine (nothing is pinned): with 20 sidecars on 2 cores
the absolute rates say little; the Redis / in-memory ratio is the figure.
Prints figures next to the performance targets (README, "Performance"); never asserts.

    .venv/bin/python bench/redis_sidecars.py [--sidecars 20] [--duration 5] [--rounds 2] [--budget 0.1]
    REDIS_URL=redis://127.0.0.1:6379/15 ...   (default: a private redis-server on a free port)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchsupport as bs
from benchsupport.fleet import Sidecar, scrape_all, start_all, stop_all, zone_at_midday
from benchsupport.redis_server import start_redis

TARGET_RATIO = 0.8
TARGET_CALLS = 0.1
TARGET_OVERSHOOT_PCT = 1.0
SMALL_ROUTE = "small"
SMALL_BUDGET = "small"
NOISY = 0.10  # other processes' share of a core above which the figures are flagged
STREAK = 16  # (b) a sidecar refuses: its last STREAK answers were 429 budget_exhausted ...
QUIET = 0.6  # ... and it admitted nothing for this long (longer than the store's 0.25 s negative cache)


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


# --------------------------------------------------------------------------- sidecar sets


@dataclass
class SidecarSet:
    name: str
    sidecars: list[Sidecar] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.sidecars if s.proc is not None]

    @property
    def ports(self) -> list[int]:
        return [s.api_port for s in self.sidecars]


def sidecar_config(
    directory: Path, upstream_port: int, namespace: str, redis_url: str | None, args: argparse.Namespace
) -> tuple[Path, int, int]:
    """benchsupport's config (route `chat`, never-exhausted budgets), plus route `small` under one small budget."""
    api_port, metrics_port = bs.listen_port(), bs.listen_port()
    path = bs.write_config(directory, upstream_port, api_port, metrics_port)
    cfg = json.loads(path.read_text())
    cfg["namespace"] = namespace
    if redis_url:
        cfg["budgetStore"] = {"url": redis_url, "timeoutMs": args.timeout_ms}
    cfg["routes"].append(
        {"name": SMALL_ROUTE, "rules": [{"name": "default", "backends": ["sim"]}], "maxOutputTokens": 512}
    )
    cfg["budgets"].append(
        {
            "name": SMALL_BUDGET,
            "routes": [SMALL_ROUTE],
            "cap": {"usdPerDay": args.budget},
            "capOnExhausted": "reject",
            "failMode": args.fail_mode,
            "timezone": zone_at_midday(time.time()),
        }
    )
    path.write_text(json.dumps(cfg, indent=2))
    return path, api_port, metrics_port


def start_set(
    name: str, n: int, tmp: Path, upstream_port: int, namespace: str, redis_url: str | None, args: argparse.Namespace
) -> SidecarSet:
    """n sidecars started at once (benchsupport.fleet.start_all), ready when each /readyz answers 200."""
    out = SidecarSet(name)
    for i in range(n):
        d = tmp / f"{name}-{i:02d}"
        d.mkdir()
        path, api, met = sidecar_config(d, upstream_port, namespace, redis_url, args)
        out.sidecars.append(Sidecar(path, api, met, d / "sidecar.log"))
    start_all(out.sidecars, args.log_level)  # stops them all if one fails to start
    return out


def stop_set(s: SidecarSet) -> None:
    """SIGTERM to every sidecar of the set at once (each drains, returns leases, flushes), then wait for each."""
    stop_all(s.sidecars)


def evalsha_calls(redis_url: str) -> int:
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        stats = r.info("commandstats")
    finally:
        r.close()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def redis_pid(redis_url: str) -> int | None:
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        return int(r.info("server")["process_id"])
    except Exception:
        return None
    finally:
        r.close()


# --------------------------------------------------------------------------- load generators


@dataclass
class Load:
    requests: int
    seconds: float
    errors: int


def wrk_multi(
    ports: list[int], body: bytes, headers: dict[str, str], concurrency: int, duration: float, workdir: Path
) -> Load:
    """One wrk process, one thread per sidecar (its `setup` gives each thread its own address)."""
    script = workdir / "multi.lua"
    hdrs = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in {"Content-Type": "application/json", **headers}.items())
    script.write_text(
        "local ports = {" + ",".join(str(p) for p in ports) + "}\n"
        "local n = 0\n"
        "function setup(thread)\n"
        "  n = n + 1\n"
        "  thread.addr = wrk.lookup('127.0.0.1', tostring(ports[(n - 1) % #ports + 1]))[1]\n"
        "end\n"
        f'wrk.method = "POST"\nwrk.body = [==[{body.decode()}]==]\n{hdrs}'
    )
    cmd = [
        bs.wrk_path() or "wrk",
        f"-t{len(ports)}",
        f"-c{len(ports) * concurrency}",
        f"-d{max(1, round(duration))}s",
        "-s",
        str(script),
        f"http://127.0.0.1:{ports[0]}/v1/chat/completions",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not total:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    secs = float(total.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total.group(3)]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return Load(int(total.group(1)), secs, errors)


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


async def _aiohttp_multi(
    ports: list[int], body: bytes, headers: dict[str, str], concurrency: int, duration: float
) -> Load:
    import aiohttp

    hdrs = {"Content-Type": "application/json", **headers}
    n = errors = 0
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), skip_auto_headers=("User-Agent",)
    ) as session:
        start = time.perf_counter()
        deadline = start + duration

        async def worker(port: int) -> None:
            nonlocal n, errors
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            while time.perf_counter() < deadline:
                try:
                    async with session.post(url, data=body, headers=hdrs) as r:
                        await r.read()
                        errors += r.status >= 300
                except aiohttp.ClientError:
                    errors += 1
                n += 1

        await asyncio.gather(*(worker(p) for p in ports for _ in range(concurrency)))
        return Load(n, time.perf_counter() - start, errors)


def aiohttp_multi(ports: list[int], body: bytes, headers: dict[str, str], concurrency: int, duration: float) -> Load:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(_aiohttp_multi(ports, body, headers, concurrency, duration))


@dataclass
class Exhaust:
    ok: int = 0
    exhausted: int = 0
    unavailable: int = 0
    other: int = 0
    timeouts: int = 0
    all_refusing: bool = False
    seconds: float = 0.0


async def _exhaust(
    ports: list[int], body: bytes, headers: dict[str, str], concurrency: int, deadline_s: float
) -> Exhaust:
    """Load on every sidecar until each refuses (429 budget_exhausted, nothing admitted for QUIET s)."""
    import aiohttp

    res = Exhaust()
    hdrs = {"Content-Type": "application/json", **headers}
    streak = [0] * len(ports)
    last_ok = [time.monotonic()] * len(ports)
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), skip_auto_headers=("User-Agent",)
    ) as session:

        async def worker(i: int) -> None:
            url = f"http://127.0.0.1:{ports[i]}/v1/chat/completions"
            while not stop.is_set():
                try:
                    async with session.post(url, data=body, headers=hdrs, timeout=timeout) as r:
                        data = await r.read()
                        if r.status == 200:
                            res.ok += 1
                            streak[i], last_ok[i] = 0, time.monotonic()
                            continue
                        code = (json.loads(data).get("error") or {}).get("code") if data.startswith(b"{") else None
                        if r.status == 429 and code == "budget_exhausted":
                            res.exhausted += 1
                            streak[i] += 1
                            continue
                        if r.status == 503 and code == "budget_store_unavailable":
                            res.unavailable += 1
                        else:
                            res.other += 1
                        streak[i] = 0
                except TimeoutError:
                    res.timeouts += 1
                except aiohttp.ClientError:
                    res.other += 1

        t0 = time.monotonic()
        tasks = [asyncio.create_task(worker(i)) for i in range(len(ports)) for _ in range(concurrency)]
        while time.monotonic() - t0 < deadline_s:
            now = time.monotonic()
            if all(s >= STREAK and now - t >= QUIET for s, t in zip(streak, last_ok)):
                res.all_refusing = True
                break
            await asyncio.sleep(0.05)
        res.seconds = time.monotonic() - t0
        stop.set()
        await asyncio.gather(*tasks)
    return res


def exhaust(ports: list[int], body: bytes, headers: dict[str, str], concurrency: int, deadline_s: float) -> Exhaust:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(_exhaust(ports, body, headers, concurrency, deadline_s))


async def _totals(redis_url: str, namespace: str, budget: str):
    from redis.asyncio import Redis

    from kubetoll_core.ledger_stream import period_totals

    r = Redis.from_url(redis_url, decode_responses=True)
    try:
        return [t for t in await period_totals(r, namespace, budget) if t.unit == "usd"]
    finally:
        await r.aclose()


# --------------------------------------------------------------------------- measurement


@dataclass
class Segment:
    ok: float
    seconds: float
    sidecar_cpu: float
    redis_cpu: float
    upstream_cpu: float
    redis_calls: float
    evalsha: int
    errors: int
    window: float  # seconds between the two scrapes the counter deltas come from
    other_share: float | None  # CPU other processes (not this benchmark's) used meanwhile, in cores


def segment(s: SidecarSet, load, redis_url: str | None, rpid: int | None, upid: int, all_pids: list[int]) -> Segment:
    t0 = time.monotonic()
    before = scrape_all(s.sidecars)
    ev0 = evalsha_calls(redis_url) if redis_url else 0
    cores = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    machine = bs.CpuMeter(all_pids + [upid, os.getpid()] + ([rpid] if rpid else []), cores)
    cpu = bs.CpuMeter(s.pids, None)
    r0 = bs.process_cpu_seconds(rpid) if rpid else 0.0
    u0 = bs.process_cpu_seconds(upid)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has exited
    res: Load = load(s.ports)
    used, _, _ = cpu.stop()
    _, wall, other = machine.stop()
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r1 = bs.process_cpu_seconds(rpid) if rpid else 0.0
    u1 = bs.process_cpu_seconds(upid)
    if other is not None:
        other = max(other - (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime), 0.0)
    time.sleep(0.3)  # the spend of the last requests is flushed (flush_interval 0.1 s): count its script too
    after = scrape_all(s.sidecars)
    ev1 = evalsha_calls(redis_url) if redis_url else 0
    return Segment(
        ok=after["ok"] - before["ok"],
        seconds=res.seconds,
        sidecar_cpu=used,
        redis_cpu=r1 - r0,
        upstream_cpu=u1 - u0,
        redis_calls=after.get("redis_calls", 0.0) - before.get("redis_calls", 0.0),
        evalsha=ev1 - ev0,
        errors=res.errors,
        window=time.monotonic() - t0,
        other_share=(other / wall) if other is not None and wall > 0 else None,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sidecars", type=int, default=20, help="sidecar processes per set (default 20)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent requests per sidecar (default 8)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per (a) segment (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="(a) segments per store, alternating (default 2)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured load per set before (a) (default 1 s)")
    ap.add_argument(
        "--budget",
        type=float,
        default=0.1,
        help="(b) the small budget, USD per day (default 0.1: about 5,000 requests)",
    )
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=64,
        help="max_tokens of each request: the output reservation; the simulator answers 16 tokens (default 64)",
    )
    ap.add_argument(
        "--fail-mode",
        choices=("failOpen", "failClosed"),
        default="failOpen",
        help="(b) the budget's failMode (default failOpen, the config default)",
    )
    ap.add_argument(
        "--timeout-ms", type=float, default=50.0, help="budgetStore.timeoutMs (default 50, the config default)"
    )
    ap.add_argument(
        "--load-tool",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="(a)'s load generator; auto: wrk when installed",
    )
    ap.add_argument(
        "--log-level",
        default="INFO",
        help="the sidecars' log level (INFO, the default, writes one access line a request)",
    )
    args = ap.parse_args()

    tool = args.load_tool
    if tool == "auto":
        tool = "wrk" if bs.wrk_path() else "aiohttp"
    if tool == "wrk" and not bs.wrk_path():
        print("wrk is not installed; using the aiohttp load generator")
        tool = "aiohttp"
    n, conc = args.sidecars, args.concurrency
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    print(f"kubetoll: {n} sidecar processes sharing Redis-backed budgets")
    for line in bs.machine_lines():
        print(line)
    print(
        f"placement: nothing pinned: {n} sidecars, the simulated upstream, redis-server and the load generator share "
        f"{cores} cores; absolute rates are shared-core figures, the Redis / in-memory ratio is the meaningful one"
    )
    headers = {"x-kubetoll-tenant": bs.TENANT}
    body_chat = bs.chat_body(bs.ROUTE, max_tokens=args.max_tokens)
    body_small = bs.chat_body(SMALL_ROUTE, max_tokens=args.max_tokens)
    if tool == "wrk":
        tool_desc = f"wrk: one process, {n} threads (one per sidecar), {conc} keep-alive connections each"

        def load(ports: list[int], secs: float) -> Load:
            return wrk_multi(ports, body_chat, headers, conc, secs, tmp)
    else:
        tool_desc = f"aiohttp in this process, {conc} keep-alive connections per sidecar (Python: heavier than wrk)"

        def load(ports: list[int], secs: float) -> Load:
            return aiohttp_multi(ports, body_chat, headers, conc, secs)

    redis_url, redis_proc = start_redis()
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    upstream = None
    sets: list[SidecarSet] = []
    t_start = time.monotonic()
    try:
        with bs.tempdir() as tmp:
            up_port = bs.free_port()
            upstream = bs.start_upstream(up_port, None, tmp / "upstream.log")
            red = start_set("redis", n, tmp, up_port, namespace, redis_url, args)
            sets.append(red)
            mem = start_set("memory", n, tmp, up_port, namespace, None, args)
            sets.append(mem)
            rpid = redis_pid(redis_url) if redis_proc is not None else None
            print(
                f"sidecars:  2 sets of {n} started in {time.monotonic() - t_start:.0f} s: `redis` (budgetStore.url, "
                f"timeoutMs {args.timeout_ms:g}, namespace {namespace}) and `memory` (no budgetStore.url); "
                f"log level {args.log_level}"
            )
            print("upstream:  kubetoll_tools.simulator.run, one process (no added latency, recording off)")
            print(
                f"request:   POST /v1/chat/completions, system + user message, max_tokens {args.max_tokens}, "
                "16 completion tokens back"
            )
            print()

            # (a) steady state
            print(
                f"(a) steady state, route `{bs.ROUTE}` (6 meters a request: namespace cap and tenant tier, never "
                f"exhausted); {tool_desc}; {args.rounds} x {args.duration:g} s per store, alternating, after "
                f"{args.warmup:g} s warm-up each"
            )
            for s in (mem, red):
                load(s.ports, args.warmup)
            segs: dict[str, list[Segment]] = {"memory": [], "redis": []}
            for _ in range(args.rounds):
                for s, url, pid in ((mem, None, None), (red, redis_url, rpid)):
                    segs[s.name].append(
                        segment(
                            s, lambda ports: load(ports, args.duration), url, pid, upstream.pid, red.pids + mem.pids
                        )
                    )

            def rate(name: str) -> float:
                return sum(x.ok for x in segs[name]) / sum(x.seconds for x in segs[name])

            def cpu_us(name: str, attr: str) -> float:
                return 1e6 * sum(getattr(x, attr) for x in segs[name]) / max(sum(x.ok for x in segs[name]), 1)

            for name, label in (("memory", "in-memory store"), ("redis", "Redis store")):
                per = ", ".join(
                    f"{x.ok / x.seconds:,.0f} ({1e6 * x.sidecar_cpu / max(x.ok, 1):,.0f} us)" for x in segs[name]
                )
                errs = sum(x.errors for x in segs[name])
                extra = f"; redis-server {cpu_us(name, 'redis_cpu'):.1f} us" if name == "redis" and rpid else ""
                print(
                    f"    {label:16s} {rate(name):8,.0f} req/s through {n} sidecars (segments, with the sidecars' CPU "
                    f"a request: {per}){f'  ({errs} non-2xx/errors)' if errs else ''}"
                )
                print(
                    f"    {'':16s} CPU per request: sidecars {cpu_us(name, 'sidecar_cpu'):.0f} us, upstream "
                    f"{cpu_us(name, 'upstream_cpu'):.0f} us{extra}"
                )
            shares = {k: [x.other_share for x in v if x.other_share is not None] for k, v in segs.items()}
            if any(shares.values()):
                worst = max(x for v in shares.values() for x in v)
                note = " (NOISY: rerun on a quiet machine)" if worst > NOISY else ""
                print(
                    "    other processes (not this benchmark's) used "
                    + "; ".join(f"{k} segments {', '.join(f'{x:.0%}' for x in v)}" for k, v in shares.items())
                    + f" of a core{note}"
                )
            ratio = rate("redis") / rate("memory")
            cpu_ratio = cpu_us("memory", "sidecar_cpu") / cpu_us("redis", "sidecar_cpu")
            print(
                f"    ratio Redis / in-memory: {ratio:.2f} of the requests/s   target >= {TARGET_RATIO} "
                f"({verdict(ratio >= TARGET_RATIO)}); by the sidecars' CPU per request: {cpu_ratio:.2f}"
            )
            ok_r = sum(x.ok for x in segs["redis"])
            calls = sum(x.redis_calls for x in segs["redis"])
            ev = sum(x.evalsha for x in segs["redis"])
            per_req = calls / max(ok_r, 1)
            print(
                f"    Redis commands per request: {per_req:.4f} ({calls:,.0f} commands / {ok_r:,.0f} requests, "
                'the sidecars\' kubetoll_budget_store{stat="redis_calls"} deltas)   '
                f"target <= {TARGET_CALLS} ({verdict(per_req <= TARGET_CALLS)})"
            )
            print(
                f"    cross-check, Redis INFO commandstats: {ev:,} evalsha (sync scripts) = {ev / max(ok_r, 1):.4f} "
                "per request; the rest is the kill-switch poll (one MGET a second per sidecar)"
            )
            win = sum(x.window for x in segs["redis"])
            print(
                f"    per sidecar: {ok_r / win / n:,.0f} req/s and {calls / win / n:.1f} Redis commands/s. A sidecar "
                "with traffic syncs about every 0.1 s (flush_interval) to write its spend, plus lease top-ups, and "
                "polls the kill switch once a second, so the commands per request fall as each sidecar's own rate "
                f"rises (here {n} share {cores} cores)"
            )
            print()
            stop_set(mem)

            # (b) overshoot
            before = scrape_all(red.sidecars)
            ex = exhaust(red.ports, body_small, headers, conc, 120.0)
            after = scrape_all(red.sidecars)
            stop_set(red)
            totals = asyncio.run(_totals(redis_url, namespace, SMALL_BUDGET))
            print(
                f"(b) overshoot, route `{SMALL_ROUTE}`: one ${args.budget:g}/day budget (capOnExhausted reject, "
                f"{args.fail_mode}), aiohttp load on all {n} Redis-store sidecars ({conc} each) until every one "
                "answers 429 budget_exhausted, then SIGTERM"
            )
            if not totals:
                print("    no meter of the budget in Redis (nothing was admitted?)")
            for t in totals:
                over = max(t.spent_units - t.limit_units, 0) / t.limit_units * 100
                print(
                    f"    spent            ${t.spent:.6f} of ${t.limit:g} ({t.percent:.3f}% used), "
                    f"{t.leased:g} still leased after shutdown"
                )
                print(
                    f"    overshoot        {over:.4f}% of the budget   target <= {TARGET_OVERSHOOT_PCT:g}% "
                    f"({verdict(over <= TARGET_OVERSHOOT_PCT)})"
                )
            state = "every sidecar refusing" if ex.all_refusing else "NOT every sidecar refusing at the deadline"
            print(
                f"    requests         {ex.ok:,} admitted, {ex.exhausted:,} refused 429 budget_exhausted, "
                f"{ex.unavailable} 503 budget_store_unavailable, {ex.other} other, {ex.timeouts} timed out; "
                f"{ex.seconds:.1f} s to {state}"
            )
            d = {
                k: after.get(k, 0.0) - before.get(k, 0.0)
                for k in ("degraded_decisions_total", "fail_open_allowance_used_total", "unavailable_total")
            }
            print(
                f"    store counters   {d['degraded_decisions_total']:.0f} reserves decided locally (no lease within "
                "timeoutMs: Redis slow on a loaded machine, or its grant taken by other requests first), "
                f"{d['fail_open_allowance_used_total']:.0f} failOpen allowance grants, "
                f"{d['unavailable_total']:.0f} outages seen"
            )
            print()
            print(
                f'Targets (README, "Performance"): Redis-backed >= {TARGET_RATIO:.0%} '
                f"of in-memory throughput, Redis calls per request <= {TARGET_CALLS}; "
                f"overshoot with 20 sidecar processes on one budget <= {TARGET_OVERSHOOT_PCT:g}%."
            )
            print(
                f"{n} sidecars share {cores} cores with the upstream, Redis and the load generator: read the ratio, "
                f"not the absolute rates. Run took {time.monotonic() - t_start:.0f} s."
            )
    finally:
        for s in sets:
            stop_set(s)
        bs.stop(upstream)
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
