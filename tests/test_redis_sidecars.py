"""Ten sidecar processes on one Redis-backed USD budget, driven until every one refuses.

Real parts end to end: `python -m kubetoll_tools.cli sidecar` OS processes, a
private redis-server, one simulated OpenAI upstream (in this process) and
concurrent HTTP clients. Every sidecar has the same namespace, the same
`budgetStore.url` and one small `usdPerDay` cap on the one route, so they
share one meter through leased quotas (docs/redis-layout.md). Traffic runs
until every sidecar answers 429 `budget_exhausted`; then SIGTERM makes each
return its leases and flush its spend. The checks:

 (a) the settled spend in Redis stays within the limit plus the overshoot bound
     documented in docs/redis-layout.md ("The overshoot bound"), computed from
     this run's parameters and records;
 (b) the ledger stream sums exactly (nano-USD) to the meter's settled spend;
 (c) the `x-kubetoll-cost-usd` headers of the 200s sum exactly to the ledger,
     one ledger record per 200 and no other (no spend lost, none counted twice);
 (d) no request hung: each had a client timeout and every one completed.

`failMode: failClosed` on purpose: the documented bound then has no Redis-outage
term (a failClosed sidecar that cannot reach Redis spends only a lease still
valid in Redis, never a local allowance nor a lease past its expiry), so the
bound asserted is exact rather than "about 1%". `budgetStore.timeoutMs` is 1 s
(as in test_redis_leases.py): this test is about sharing, not timeouts, and on
a loaded 2-core machine a 50 ms wait could look like an outage (a 503, which
the test would tolerate but which would spend nothing).

Nothing here asserts on timings; times only bound loops (docs/architecture.md, "Checks").
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from kubetoll_core.ledger_stream import period_totals, read_ledger
from kubetoll_core.meters import scale_of, to_units
from kubetoll_sidecar import tokens
from support.harness import base_config
from support.redis_server import RedisProcess

ROOT = Path(__file__).resolve().parents[1]

N_SIDECARS = 10
PER_SIDECAR = 8  # concurrent requests on each sidecar
NAMESPACE = "team-shared"
BUDGET = "shared"
MODEL = "gpt-4o"
# Explicit prices (USD per million tokens): every amount is a whole number of nano-USD.
PRICE_IN, PRICE_OUT = 10.0, 30.0
MAX_TOKENS = 32  # the simulator answers 16 tokens, so each request settles at about half its reservation
MESSAGES = [{"role": "user", "content": "How far away is the moon, roughly?"}]
# About 6e-4 USD settled per request: a few hundred requests spend it.
LIMIT_USD = 0.2
NANO = scale_of("usd")

CLIENT_TIMEOUT = 15.0  # per request; above the backend's total timeout, so only a hang reaches it
STREAK = 2 * PER_SIDECAR  # "every sidecar refuses": its last STREAK answers were 429 budget_exhausted ...
QUIET = 0.6  # ... and it admitted nothing for this long (longer than the store's 0.25 s negative cache)
TRAFFIC_DEADLINE = 25.0  # loop bound only


def zone_at_midday(now: float) -> str:
    """A fixed-offset zone where it is about noon now, so the day's budget period cannot end mid-test."""
    hour = time.gmtime(now).tm_hour
    offset = 12 - hour  # -11 .. +12
    if offset == 0:
        return "Etc/UTC"
    # POSIX sign convention: Etc/GMT-3 is UTC+3.
    return f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


def ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def listen_port(taken: set[int]) -> int:
    """A free port below the kernel's ephemeral range.

    `bind(0)` (support.harness.free_port) hands out a port from the ephemeral range, where
    every outgoing connection also takes its local port: with ten sidecars starting at once,
    each opening Redis connections, and this test polling them, such a port can be taken
    between the choice and the sidecar's bind (seen: a sidecar exiting 1, "cannot listen").
    """
    lo = ephemeral_range()[0]
    low = 10000 if lo > 11000 else 1024
    for _ in range(2000):
        port = random.randint(low, lo - 1)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


@dataclass
class SidecarTally:
    ok: int = 0
    exhausted: int = 0
    store_unavailable: int = 0
    streak: int = 0  # consecutive 429 budget_exhausted
    last_ok: float = 0.0
    costs_nusd: list[int] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # other statuses, client errors, timeouts
    timeouts: int = 0
    started: int = 0
    finished: int = 0

    def refusing(self, now: float) -> bool:
        return self.streak >= STREAK and now - self.last_ok >= QUIET


@pytest.fixture
def redis_server():
    proc = RedisProcess().start()
    try:
        yield proc
    finally:
        proc.stop()


def sidecar_config(sim_url: str, redis_url: str, zone: str, ports: set[int]) -> dict:
    cfg = base_config(
        sim_url,
        namespace=NAMESPACE,
        budgetStore={"url": redis_url, "timeoutMs": 1000},
        budgets=[
            {
                "name": BUDGET,
                "routes": ["chat"],
                "cap": {"usdPerDay": LIMIT_USD},
                "capOnExhausted": "reject",
                "failMode": "failClosed",
                "timezone": zone,
            }
        ],
    )
    cfg["server"].update(port=listen_port(ports), metricsPort=listen_port(ports), metricsHost="127.0.0.1")
    backend = cfg["backends"][0]
    backend["model"] = MODEL
    backend["pricing"] = {"inputPerMTok": PRICE_IN, "outputPerMTok": PRICE_OUT}
    # Generous upstream timeouts: a slow, loaded machine must not turn into 504s.
    backend["timeouts"] = {"connect": 5, "firstToken": 10, "total": 10}
    return cfg


async def wait_ready(
    session: aiohttp.ClientSession, procs: list[subprocess.Popen], cfgs: list[dict], logs: list[Path]
) -> None:
    deadline = time.monotonic() + 90
    pending = set(range(len(cfgs)))
    while pending:
        for i in sorted(pending):
            if procs[i].poll() is not None:
                raise AssertionError(f"sidecar {i} exited with {procs[i].returncode}:\n{logs[i].read_text()[-3000:]}")
            try:
                async with session.get(f"http://127.0.0.1:{cfgs[i]['server']['metricsPort']}/readyz") as r:
                    if r.status == 200:
                        pending.discard(i)
            except aiohttp.ClientError:
                pass
        if pending:
            assert time.monotonic() < deadline, f"sidecars {sorted(pending)} not ready"
            await asyncio.sleep(0.1)


async def drive(session: aiohttp.ClientSession, urls: list[str]) -> tuple[list[SidecarTally], bool]:
    """PER_SIDECAR workers per sidecar, each sending one request after another, until every sidecar refuses.

    Returns the tallies and whether every sidecar was refusing when the traffic stopped.
    """
    tallies = [SidecarTally() for _ in urls]
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    body = json.dumps({"model": "chat", "messages": MESSAGES, "max_tokens": MAX_TOKENS})
    headers = {"content-type": "application/json", "x-kubetoll-tenant": "acme"}

    async def worker(i: int) -> None:
        t, url = tallies[i], urls[i] + "/v1/chat/completions"
        while not stop.is_set():
            t.started += 1
            try:
                async with session.post(url, data=body, headers=headers, timeout=timeout) as r:
                    data = await r.read()
                    if r.status == 200:
                        t.ok += 1
                        t.streak = 0
                        t.last_ok = time.monotonic()
                        # The header is the cost to 9 decimals: exact nano-USD.
                        t.costs_nusd.append(int(Decimal(r.headers["x-kubetoll-cost-usd"]) * NANO))
                        t.request_ids.append(r.headers["x-request-id"])
                    else:
                        try:
                            code = (json.loads(data).get("error") or {}).get("code")
                        except (ValueError, AttributeError):
                            code = None
                        if r.status == 429 and code == "budget_exhausted" and r.headers.get("retry-after"):
                            t.exhausted += 1
                            t.streak += 1
                        elif r.status == 503 and code == "budget_store_unavailable":
                            t.store_unavailable += 1  # allowed (failClosed), spends nothing
                            t.streak = 0
                        else:
                            t.unexpected.append(f"HTTP {r.status}: {data[:200]!r}")
                            t.streak = 0
            except TimeoutError:
                t.timeouts += 1
            except aiohttp.ClientError as exc:
                t.unexpected.append(repr(exc))
            t.finished += 1

    workers = [asyncio.create_task(worker(i)) for i in range(len(urls)) for _ in range(PER_SIDECAR)]
    deadline = time.monotonic() + TRAFFIC_DEADLINE
    all_refusing = False
    while time.monotonic() < deadline:
        now = time.monotonic()
        if all(t.refusing(now) for t in tallies):
            all_refusing = True
            break
        if any(t.unexpected or t.timeouts for t in tallies):
            break  # reported below
        await asyncio.sleep(0.05)
    stop.set()
    # (d) every request ends: each has a client timeout, so the workers finish within it.
    done, not_done = await asyncio.wait(workers, timeout=CLIENT_TIMEOUT + 10)
    for w in not_done:
        w.cancel()
    assert not not_done, f"{len(not_done)} client workers still waiting on a request"
    for w in done:
        w.result()
    return tallies, all_refusing


async def test_ten_sidecars_share_one_budget_to_its_end(sim, redis_server, tmp_path):
    zone = zone_at_midday(time.time())
    cfgs, procs, logs = [], [], []
    ports: set[int] = set()
    env = {**os.environ, "PYTHONPATH": "sidecar:operator"}
    try:
        for i in range(N_SIDECARS):
            cfg = sidecar_config(sim.url, redis_server.url, zone, ports)
            path = tmp_path / f"router-{i}.json"
            path.write_text(json.dumps(cfg))
            log = tmp_path / f"sidecar-{i}.log"
            with log.open("wb") as err:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "kubetoll_tools.cli",
                            "sidecar",
                            "--config",
                            str(path),
                            "--log-level",
                            "WARNING",
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                )
            cfgs.append(cfg)
            logs.append(log)
        urls = [f"http://127.0.0.1:{c['server']['port']}" for c in cfgs]
        connector = aiohttp.TCPConnector(limit=N_SIDECARS * PER_SIDECAR + 10)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, procs, cfgs, logs)
            tallies, all_refusing = await drive(session, urls)

        unexpected = [(i, u) for i, t in enumerate(tallies) for u in t.unexpected[:3]]
        assert not unexpected, f"unexpected answers: {unexpected}"
        # (d) no request hung: every one answered within its client timeout.
        assert sum(t.timeouts for t in tallies) == 0, [t.timeouts for t in tallies]
        assert all(t.started == t.finished for t in tallies)
        assert all_refusing, "not every sidecar came to refuse: " + ", ".join(
            f"#{i} ok={t.ok} 429={t.exhausted} streak={t.streak}" for i, t in enumerate(tallies)
        )
        assert all(t.exhausted > 0 for t in tallies)

        # SIGTERM: each drains, returns its leases and writes its buffered spend, and exits 0.
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for i, p in enumerate(procs):
            rc = await asyncio.to_thread(p.wait, 20)
            assert rc == 0, f"sidecar {i} exited with {rc}:\n{logs[i].read_text()[-3000:]}"
        for i, log in enumerate(logs):
            text = log.read_text()
            assert "spend not written" not in text and "Traceback" not in text, f"sidecar {i}:\n{text[-3000:]}"

        client = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            meters = [m for m in await period_totals(client, NAMESPACE, BUDGET) if m.unit == "usd"]
            records = await read_ledger(client, NAMESPACE)
        finally:
            await client.aclose()
        assert len(meters) == 1, meters
        meter = meters[0]
        limit_units = to_units(LIMIT_USD, NANO)
        assert meter.limit_units == limit_units and meter.scale == NANO
        assert meter.leased_units == 0, "a sidecar kept a lease after a clean shutdown"

        # The reservation of every request, as the sidecar computes it: its prompt estimate plus
        # max_tokens, at the backend's prices (one backend, so the chain's dearest is it).
        est_units = to_units((tokens.count_chat(MESSAGES, MODEL) * PRICE_IN + MAX_TOKENS * PRICE_OUT) / 1e6, NANO)
        rec_units = [to_units(r.cost_usd, NANO) for r in records]

        # (a) docs/redis-layout.md, "The overshoot bound": with Redis answering, enforced holds never
        # take a meter past its limit (every grant keeps spent + leases <= limit in Redis, and a
        # sidecar reserves only inside its lease). Spend passes the limit only by
        #   (1) settlements above their reserved estimate: sum of max(0, settled - estimate);
        #   (2) unenforced holds (onExhausted allow/downgrade): none, capOnExhausted is reject;
        #   (3) spending while Redis is unreachable (failOpen leases past expiry and allowance):
        #       none with failClosed, which spends only a lease still valid in Redis.
        # Here (1) comes to 0 (MAX_TOKENS covers the simulator's 16-token answer), but it is
        # computed from the records, not assumed.
        over_estimate = sum(max(0, u - est_units) for u in rec_units)
        bound_units = over_estimate + 0 + 0
        assert meter.spent_units <= limit_units + bound_units, (
            f"spent {meter.spent_units} nUSD > limit {limit_units} + bound {bound_units} "
            f"(over by {meter.spent_units - limit_units - bound_units} nUSD)"
        )
        # The budget was really used up, not refused for some other reason: when every sidecar
        # refuses, what no one spent is less than one reservation per sidecar plus one in Redis.
        assert limit_units - meter.spent_units < (N_SIDECARS + 1) * est_units, (
            meter.spent_units,
            limit_units,
            est_units,
        )

        print(
            f"\n{N_SIDECARS} sidecars: {sum(t.ok for t in tallies)} admitted, "
            f"{sum(t.exhausted for t in tallies)} refused (429), {sum(t.store_unavailable for t in tallies)} 503; "
            f"spent {meter.spent_units} of {limit_units} nUSD ({100 * meter.spent_units / limit_units:.3f}%), "
            f"bound {limit_units + bound_units}, reservation {est_units}"
        )

        # (b) the ledger stream and the meter agree exactly (integer nano-USD).
        ledger_units = sum(rec_units)
        assert ledger_units == meter.spent_units

        # (c) what the clients were told they spent is what was recorded, one record per 200.
        ok_units = sum(sum(t.costs_nusd) for t in tallies)
        ok_ids = [rid for t in tallies for rid in t.request_ids]
        assert len(records) == len(ok_ids) == sum(t.ok for t in tallies)
        assert sorted(r.request_id for r in records) == sorted(ok_ids)
        assert len(set(ok_ids)) == len(ok_ids)
        assert ok_units == ledger_units
        assert all(r.namespace == NAMESPACE and r.route == "chat" and r.outcome == "ok" for r in records)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
