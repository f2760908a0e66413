"""Fault scenarios against real redis-server and sidecar processes: what the clients saw, what the ledger holds.

Each scenario starts its own redis-server (benchsupport.redis_server) and its own
sidecar processes (`python -m kubetoll_tools.cli sidecar --config ...`, one
config, port pair and state dir each: benchsupport.fleet), all on one simulated
OpenAI upstream (kubetoll_tools.simulator, its own process). Closed-loop aiohttp
clients in this process send chat requests, each with its own `x-request-id`,
to every sidecar; then the scenario injects its fault, keeps the load on, stops
every sidecar (SIGTERM: drain, leases back, spend flushed) and reads the Redis
ledger stream with the project's reader (`kubetoll_core.ledger_stream.read_ledger`).

 1 redis_kill_empty   Redis SIGKILLed half-way through a USD budget and restarted empty; one budget
                      failOpen, one failClosed, driven until every sidecar refuses
 2 redis_kill_aof     the same, Redis restarted from its append-only file (--appendfsync always)
 3 redis_stop         Redis SIGSTOPped for a few seconds, then SIGCONT
 4 cold_start         Redis (AOF) down before 4 sidecars start (budgetStore.expectedSidecars = 4,
                      server.stateDir one each), on a USD budget and a tokens/min bucket a previous
                      sidecar had spent; then again with the 4 SIGTERMed and restarted on their state
                      dirs during the outage. Each field is written only if this tree's RouterConfig has it
 5 exhaustion20       20 sidecars driven to exhaustion on a USD budget and a tokens/min bucket
 6 kill_switch        the kill switch by pub/sub, by the poll alone, and held through an empty Redis
                      restart; time from the switch to the first 403 on every sidecar
 7 upstream_storms    the primary backend answers every request 429 (Retry-After), 500, or hangs
                      past its first-token timeout; a fallback backend serves
 8 sidecar_signals    one sidecar SIGKILLed and one SIGTERMed mid-load on a small budget (both then
                      restarted on their state dirs); then, on another budget, one SIGTERMed during a
                      Redis outage and restarted on its state dir once Redis is back (from its AOF)

Figures, per row:
- requests sent (a refused connection, to a sidecar that is down, is not one), hung (no answer within
  the client timeout, 10 s), 2xx/4xx/5xx, and connections dropped mid-request (notes);
- spend lost: the cost the sidecar's `x-kubetoll-cost-usd` header told for 2xx answers, minus what the
  ledger holds for those request ids (records before an empty Redis restart are read, under CLIENT
  PAUSE WRITE, just before the SIGKILL, and count as held). A SIGKILLed sidecar may lose the spend it
  settled in its last flush interval (docs/redis-layout.md: about 100 ms); the notes split it out;
- double-counted: request ids with more than one ledger record, or more ledger spend than was told;
- overshoot: (ledger spend - limit) / limit for a USD budget (negative: left unspent), the ledger of
  every Redis life counted (an empty restart starts the totals from zero: the spend before it was still
  spent); the notes add what clients were told for spend the ledger lost. For a tokens/min bucket: the
  tokens served (2xx usage) beyond capacity + refill x the run window, as % of capacity.

It never passes or fails: it prints the table and one line comparing it with the targets.

    .venv/bin/python bench/faults.py [--quick] [--only NAME]... [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import resource
import signal
import statistics
import sys
import time
import traceback
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchsupport as bs
from benchsupport.fleet import Sidecar, scrape_all, start_all, stop_all, wait_ready, zone_at_midday
from benchsupport.redis_server import RedisServer
from kubetoll_core.kill_switch import set_suspended
from kubetoll_core.ledger_stream import read_ledger
from kubetoll_core.meters import scale_of, to_units
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import BudgetStoreSettings, RouterConfig, ServerSettings
from kubetoll_core.spend_record import SpendRecord

# What the pipeline sets on a served answer (pipeline.Pipeline._headers): its cost, the fallbacks taken.
COST_HEADER = "x-kubetoll-cost-usd"
FALLBACKS_HEADER = "x-kubetoll-fallbacks"
REQUEST_ID_HEADER = "x-request-id"  # the app's id, echoed and written to the ledger record
TENANT_HEADER = "x-kubetoll-tenant"  # benchsupport.write_config's tenancy
CLIENT_TIMEOUT = 10.0  # an answer later than this is a hung request
SIGKILL_WINDOW = 0.1  # docs/redis-layout.md: spend settled but not flushed (flush_interval) dies with the process
MAX_TOKENS = 64  # the output reservation; the simulator answers 16 tokens
USD = scale_of("usd")

TARGET_OVERSHOOT_PCT = 1.0
TARGET_SWITCH_S = 2.0
TARGET_SWITCH_PUBSUB_S = 0.1

HUNG, BROKEN = -1, 0  # Answer.status for a client timeout and for a connection dropped mid-request
STREAK = 16  # a sidecar refuses a route: its last STREAK answers were 429 with a refusal code ...
QUIET = 0.6  # ... and it served nothing for this long (longer than the store's 0.25 s negative cache)
REFUSAL_CODES = ("budget_exhausted", "rate_limit_exceeded")
NOISY = 0.10  # other processes' CPU, in cores, above which the run is flagged


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Params:
    quick: bool
    outage: float  # seconds Redis is away
    usd_limit: float  # a USD budget driven to exhaustion (about 1.9e-5 USD a request)
    tpm: int  # a tokens/min bucket's capacity (about 76 tokens a request)
    deadline: float  # the longest wait for every sidecar to refuse
    tail: float  # load between two events of a scenario
    concurrency: int  # clients per sidecar and route
    log_level: str

    @staticmethod
    def of(quick: bool, log_level: str) -> Params:
        if quick:
            return Params(True, 2.0, 0.012, 30_000, 25.0, 1.5, 2, log_level)
        return Params(False, 5.0, 0.08, 120_000, 90.0, 4.0, 3, log_level)


# --------------------------------------------------------------------------- config


def wire(model: Any, name: str) -> str | None:
    """The camelCase name of a RouterConfig field as this tree defines it, or None if it has no such field."""
    f = model.model_fields.get(name)
    if f is None:
        return None
    return str(f.alias or name)


def pubsub_setting() -> tuple[str, bool] | None:
    """The budgetStore field that turns the kill-switch subscription off, and its 'off' value, if there is one."""
    for name, f in BudgetStoreSettings.model_fields.items():
        if "pubsub" in name.replace("_", "") and f.annotation in (bool, "bool"):
            return str(f.alias or name), name.startswith(("no_", "disable"))
    return None


def route(name: str, backends: Sequence[str] = ("sim",)) -> dict[str, Any]:
    return {"name": name, "rules": [{"name": "default", "backends": list(backends)}], "maxOutputTokens": 512}


def usd_budget(name: str, limit: float, fail_mode: str = "failOpen") -> dict[str, Any]:
    """A namespace cap of `limit` USD a day on route `name` (the route and the budget share the name)."""
    return {
        "name": name,
        "routes": [name],
        "cap": {"usdPerDay": limit},
        "capOnExhausted": "reject",
        "failMode": fail_mode,
        "timezone": zone_at_midday(time.time()),
    }


def tpm_budget(name: str, tokens_per_minute: int, fail_mode: str = "failOpen") -> dict[str, Any]:
    """A tokens/min bucket for each tenant of tier `standard` (every request here is tenant `bench` on it)."""
    return {
        "name": name,
        "routes": [name],
        "tiers": {"standard": {"tokensPerMinute": tokens_per_minute, "onExhausted": "reject"}},
        "failMode": fail_mode,
        "timezone": zone_at_midday(time.time()),
    }


def sim_backend(name: str, upstream_port: int, fault: str | None = None, first_token_s: float | None = None) -> dict:
    """A backend on the simulator; `fault` is sent as `x-sim-fault` on every request (the simulator obeys it)."""
    b: dict[str, Any] = {
        "name": name,
        "provider": "openai",
        "model": bs.UPSTREAM_MODEL,
        "endpoint": f"http://127.0.0.1:{upstream_port}/v1",
        # Short enough that a failing primary is retried during the run, as a storm would be.
        "circuitBreaker": {"failureThreshold": 5, "cooldownSeconds": 2},
    }
    if fault:
        b["headers"] = {"x-sim-fault": fault}
    if first_token_s is not None:
        b["timeouts"] = {"connect": 1, "firstToken": first_token_s, "total": 30}
    return b


@dataclass
class Spec:
    routes: list[dict[str, Any]]
    budgets: list[dict[str, Any]]
    backends: list[dict[str, Any]] = field(default_factory=list)  # besides benchsupport's `sim`


NOTES: list[str] = []  # what this tree lacks that a scenario wanted (printed once under the table)


def note_once(text: str) -> None:
    if text not in NOTES:
        NOTES.append(text)


def make_sidecar(
    d: Path,
    upstream_port: int,
    namespace: str,
    redis_url: str,
    spec: Spec,
    *,
    expected_sidecars: int | None = None,
    store_extra: dict[str, Any] | None = None,
) -> Sidecar:
    """One sidecar's directory: router.json (benchsupport's, with this spec's routes and budgets), state dir, log."""
    d.mkdir(parents=True)
    api, met = bs.listen_port(), bs.listen_port()
    cfg = json.loads(bs.write_config(d, upstream_port, api, met).read_text())
    cfg["namespace"] = namespace
    server = cfg["server"]
    server["drainSeconds"] = 5
    state_field = wire(ServerSettings, "state_dir")
    if state_field:
        (d / "state").mkdir()
        server[state_field] = str(d / "state")
    else:
        note_once("this tree's ServerSettings has no state_dir: sidecars run without a state dir")
    store: dict[str, Any] = {"url": redis_url, "timeoutMs": 50}
    if expected_sidecars is not None:
        expected_field = wire(BudgetStoreSettings, "expected_sidecars")
        if expected_field:
            store[expected_field] = expected_sidecars
        else:
            note_once("this tree's BudgetStoreSettings has no expected_sidecars: cold starts run without it")
    store.update(store_extra or {})
    cfg["budgetStore"] = store
    cfg["backends"] = [b for b in cfg["backends"] if b["name"] == "sim"] + spec.backends
    cfg["routes"] = spec.routes
    cfg["budgets"] = spec.budgets
    RouterConfig.model_validate(cfg)  # a config this tree refuses fails here, with pydantic's message
    path = d / "router.json"
    path.write_text(json.dumps(cfg, indent=2))
    return Sidecar(path, api, met, d / "sidecar.log")


# --------------------------------------------------------------------------- load


@dataclass(slots=True)
class Answer:
    rid: str
    sidecar: int
    route: str
    phase: str
    t0: float  # monotonic, request sent
    t1: float  # monotonic, answer read (or gave up)
    status: int  # HTTP status, HUNG or BROKEN
    code: str | None  # the OpenAI error code of a non-2xx
    cost_nusd: int | None  # what the cost header told (2xx)
    tokens: int  # usage.total_tokens of a 2xx
    fallbacks: int

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Load:
    """Closed-loop clients: `concurrency` per (sidecar, route), each sending one request after the other."""

    def __init__(self, sidecars: Sequence[Sidecar], tag: str) -> None:
        import aiohttp

        self.sidecars = sidecars
        self.tag = tag
        self.timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        self.answers: list[Answer] = []
        self.refused = 0  # connections refused: nothing sent (the sidecar is down or restarting)
        self.phase = "run"
        self.told: dict[str, int] = defaultdict(int)  # route -> nano-USD told so far
        self._streak: dict[tuple[int, str], int] = defaultdict(int)
        self._last_ok: dict[tuple[int, str], float] = {}
        self._groups: dict[int, tuple[asyncio.Event, list[asyncio.Task[None]]]] = {}
        self._gids = itertools.count(1)
        self._ids = itertools.count(1)
        self._session: Any = None
        self._lags: list[tuple[float, float]] = []  # (when, how late a 10 ms sleep woke): this loop's own lag
        self._lag_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Load:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), skip_auto_headers=("User-Agent",)
        )
        self._lag_task = asyncio.create_task(self._watch_lag())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        await self._session.close()

    async def _watch_lag(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            self._lags.append((t, time.monotonic() - t - 0.01))

    def max_lag(self, t0: float, t1: float) -> float:
        """The longest this process's event loop was late between t0 and t1: the timings' own error."""
        return max((lag for t, lag in self._lags if t0 <= t <= t1), default=0.0)

    def start(
        self, routes: Iterable[str], which: Iterable[int] | None = None, concurrency: int = 2, pace: float = 0.0
    ) -> int:
        """Start clients on `routes` of the sidecars `which` (all by default); returns the group to stop.

        `pace`: a client sends at most one request per `pace` seconds (0: back to back).
        """
        stop = asyncio.Event()
        now = time.monotonic()
        tasks = []
        for i in list(range(len(self.sidecars)) if which is None else which):
            for r in routes:
                self._last_ok[(i, r)] = now
                self._streak[(i, r)] = 0
                tasks += [asyncio.create_task(self._worker(i, r, stop, pace)) for _ in range(concurrency)]
        gid = next(self._gids)
        self._groups[gid] = (stop, tasks)
        return gid

    async def stop(self, gid: int | None = None) -> None:
        """Stop a group (all by default); requests in flight finish first."""
        for g in [gid] if gid is not None else list(self._groups):
            stop, tasks = self._groups.pop(g)
            stop.set()
            await asyncio.gather(*tasks)

    async def _worker(self, i: int, route_name: str, stop: asyncio.Event, pace: float) -> None:
        import aiohttp
        import orjson

        url = f"http://127.0.0.1:{self.sidecars[i].api_port}/v1/chat/completions"
        body = bs.chat_body(route_name, max_tokens=MAX_TOKENS)
        key = (i, route_name)
        while not stop.is_set():
            rid = f"{self.tag}-{next(self._ids)}"
            headers = {"Content-Type": "application/json", TENANT_HEADER: bs.TENANT, REQUEST_ID_HEADER: rid}
            phase, t0 = self.phase, time.monotonic()
            code: str | None = None
            cost: int | None = None
            tokens = fallbacks = 0
            try:
                async with self._session.post(url, data=body, headers=headers, timeout=self.timeout) as r:
                    data = await r.read()
                    status = r.status
                    if 200 <= status < 300:
                        told = r.headers.get(COST_HEADER)
                        cost = to_units(float(told), USD) if told is not None else None
                        fallbacks = int(r.headers.get(FALLBACKS_HEADER, "0") or 0)
                        tokens = int(((orjson.loads(data) or {}).get("usage") or {}).get("total_tokens") or 0)
                    elif data.startswith(b"{"):
                        code = ((orjson.loads(data) or {}).get("error") or {}).get("code")
            except TimeoutError:
                status = HUNG
            except aiohttp.ClientConnectorError:
                self.refused += 1
                await asyncio.sleep(0.1)
                continue
            except (aiohttp.ClientError, OSError, ValueError):
                status = BROKEN
            t1 = time.monotonic()
            self.answers.append(Answer(rid, i, route_name, phase, t0, t1, status, code, cost, tokens, fallbacks))
            wait = pace - (t1 - t0)
            if 200 <= status < 300:
                self.told[route_name] += cost or 0
                self._streak[key] = 0
                self._last_ok[key] = t1
            else:
                self._streak[key] = self._streak[key] + 1 if status == 429 and code in REFUSAL_CODES else 0
                # A refused client backs off a little, as a real one would, so refusals do not eat the cores.
                wait = max(wait, 0.02 if status in (403, 429) else 0.05)
            if wait > 0:
                await asyncio.sleep(wait)

    async def wait_told(self, targets: dict[str, float], deadline: float) -> bool:
        """Until the cost told on each route reaches its USD target (or `deadline` seconds pass)."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if all(self.told[r] >= to_units(usd, USD) for r, usd in targets.items()):
                return True
            await asyncio.sleep(0.02)
        return False

    def refusing(self, routes: Iterable[str], which: Iterable[int]) -> bool:
        now = time.monotonic()
        return all(
            self._streak[(i, r)] >= STREAK and now - self._last_ok.get((i, r), now) >= QUIET
            for i in which
            for r in routes
        )

    async def wait_refusing(self, routes: Sequence[str], which: Sequence[int], deadline: float) -> float | None:
        """Until every sidecar in `which` refuses every route in `routes`: seconds waited, None at the deadline."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline:
            if self.refusing(routes, which):
                return time.monotonic() - t0
            await asyncio.sleep(0.05)
        return None


# --------------------------------------------------------------------------- accounting


@dataclass
class Row:
    name: str
    sent: int = 0
    hung: int = 0
    s2: int = 0
    s4: int = 0
    s5: int = 0
    lost: str = "-"
    double: str = "-"
    overshoot: str = "-"
    notes: list[str] = field(default_factory=list)
    # for the targets line
    overshoot_pct: float | None = None
    lost_beyond_usd: float = 0.0  # spend lost outside the documented SIGKILL window
    switch_s: float | None = None  # kill switch: slowest sidecar's first refusal (inf: one never refused)
    pubsub: bool = False


def count(row: Row, answers: Sequence[Answer]) -> None:
    row.sent = len(answers)
    row.hung = sum(a.status == HUNG for a in answers)
    row.s2 = sum(a.ok for a in answers)
    row.s4 = sum(400 <= a.status < 500 for a in answers)
    row.s5 = sum(a.status >= 500 for a in answers)
    broken = sum(a.status == BROKEN for a in answers)
    if broken:
        row.notes.append(f"{broken} connections dropped mid-request")


def tally(answers: Iterable[Answer]) -> str:
    """What the answers were, most frequent first: "283 2xx, 179 503 budget_store_unavailable"."""
    by: dict[str, int] = defaultdict(int)
    for a in answers:
        if a.ok:
            by["2xx"] += 1
        elif a.status == HUNG:
            by["hung"] += 1
        elif a.status == BROKEN:
            by["dropped"] += 1
        else:
            by[f"{a.status} {a.code or '-'}"] += 1
    return ", ".join(f"{n} {k}" for k, n in sorted(by.items(), key=lambda kv: -kv[1])) or "nothing"


def codes(answers: Iterable[Answer]) -> str:
    """The 5xx answers by status and error code."""
    return tally(a for a in answers if a.status >= 500)


def usd(nusd: float) -> str:
    return f"${nusd / USD:.6f}"


def ledger_by_id(records: Iterable[SpendRecord], routes: Iterable[str]) -> dict[str, list[int]]:
    wanted = set(routes)
    out: dict[str, list[int]] = defaultdict(list)
    for r in records:
        if r.route in wanted:
            out[r.request_id].append(to_units(r.cost_usd, USD))
    return out


def account(
    row: Row,
    answers: Sequence[Answer],
    records: Sequence[SpendRecord],
    routes: Iterable[str],
    *,
    window_ok: Callable[[Answer], bool] | None = None,
) -> tuple[int, int]:
    """Fill spend lost and double-counted; returns (ledger spend on the routes, spend told or recorded).

    `window_ok`: answers whose lost spend is within the documented SIGKILL window.
    """
    by_id = ledger_by_id(records, routes)
    sent = {a.rid for a in answers}
    told = {a.rid: (a.cost_nusd or 0, a) for a in answers if a.ok}
    lost = lost_n = lost_window = 0
    for rid, (c, a) in told.items():
        missing = c - sum(by_id.get(rid, ()))
        if missing > 0:
            lost += missing
            lost_n += 1
            if window_ok is not None and window_ok(a):
                lost_window += missing
    row.lost = f"{usd(lost)} ({lost_n})" if lost else "0"
    row.lost_beyond_usd = (lost - lost_window) / USD
    if lost_window:
        row.notes.append(f"lost within the {SIGKILL_WINDOW * 1000:.0f} ms SIGKILL window: {usd(lost_window)}")
    dups = sum(len(v) > 1 for rid, v in by_id.items() if rid in sent)
    told_total = sum(c for c, _ in told.values())
    ledger_told = sum(sum(by_id.get(rid, ())) for rid in told)
    excess = max(ledger_told - told_total, 0)
    row.double = "0" if not dups and not excess else f"{dups} ids" + (f", +{usd(excess)}" if excess else "")
    # Records of requests this row sent whose client saw no 2xx (dropped, timed out): spent, never told.
    untold = {rid: sum(v) for rid, v in by_id.items() if rid in sent and rid not in told}
    if untold:
        row.notes.append(
            f"{len(untold)} ledger records ({usd(sum(untold.values()))}) for requests whose client saw no 2xx"
        )
    ledger_total = sum(sum(v) for v in by_id.values())  # the budget's spend: every record on its routes
    served = sum(max(c, sum(by_id.get(rid, ()))) for rid, (c, _) in told.items()) + sum(untold.values())
    return ledger_total, served


def usd_overshoot(row: Row, limit: float, ledger_total: int, served: int) -> None:
    lim = to_units(limit, USD)
    pct = 100.0 * (ledger_total - lim) / lim
    row.overshoot_pct = pct
    row.overshoot = f"{pct:+.2f}%"
    served_pct = 100.0 * (served - lim) / lim
    if abs(served_pct - pct) >= 0.05:
        row.notes.append(f"counting spend the ledger lost: {served_pct:+.2f}%")


def tpm_overshoot(row: Row, answers: Sequence[Answer], capacity: int) -> None:
    if not answers:
        return
    t0, t1 = min(a.t0 for a in answers), max(a.t1 for a in answers)
    served = sum(a.tokens for a in answers if a.ok)
    allowed = capacity + capacity / 60.0 * (t1 - t0)
    pct = 100.0 * (served - allowed) / capacity
    row.overshoot_pct = pct
    row.overshoot = f"{pct:+.2f}%"
    row.notes.append(f"{served:,} tokens served in {t1 - t0:.1f} s, {allowed:,.0f} allowed")


def phase_counts(answers: Sequence[Answer], phase: str) -> str:
    return tally(a for a in answers if a.phase == phase)


def of_routes(answers: Sequence[Answer], *routes: str) -> list[Answer]:
    return [a for a in answers if a.route in routes]


# --------------------------------------------------------------------------- one scenario's processes


class Run:
    """One scenario's Redis, sidecars and load, and the ledger records of Redis lives that ended empty."""

    def __init__(self, name: str, p: Params, tmp: Path, upstream_port: int, redis: RedisServer) -> None:
        self.ns = f"f{uuid.uuid4().hex[:10]}"  # a namespace of its own: its ledger holds this run's records only
        self.name, self.p, self.upstream_port, self.redis = name, p, upstream_port, redis
        self.tmp = tmp / f"{name}-{self.ns}"
        self.sidecars: list[Sidecar] = []
        self.earlier: list[SpendRecord] = []  # the ledger before Redis restarted empty

    def add(self, n: int, spec: Spec, **kw: Any) -> list[int]:
        """Configs for n more sidecars; returns their indexes."""
        first = len(self.sidecars)
        for i in range(first, first + n):
            self.sidecars.append(
                make_sidecar(self.tmp / f"sidecar-{i:02d}", self.upstream_port, self.ns, self.redis.url, spec, **kw)
            )
        return list(range(first, first + n))

    async def start(self, which: Sequence[int]) -> float:
        t0 = time.monotonic()
        await asyncio.to_thread(start_all, [self.sidecars[i] for i in which], self.p.log_level)
        return time.monotonic() - t0

    async def restart(self, which: Sequence[int]) -> float:
        """Start these (stopped) sidecars again on their configs and state dirs; seconds until all are ready."""
        t0 = time.monotonic()
        scs = [self.sidecars[i] for i in which]
        for sc in scs:
            sc.spawn(self.p.log_level)
        await asyncio.to_thread(wait_ready, scs)
        return time.monotonic() - t0

    async def terminate(self, which: Sequence[int]) -> None:
        await asyncio.to_thread(stop_all, [self.sidecars[i] for i in which])

    async def stop_everything(self) -> None:
        await asyncio.to_thread(stop_all, self.sidecars)

    def client(self) -> Any:
        from redis.asyncio import Redis

        return Redis.from_url(self.redis.url, decode_responses=True)

    async def kill_redis(self, *, coming_back_empty: bool) -> None:
        """SIGKILL Redis. If it will come back empty, its ledger is read first with writes paused
        (CLIENT PAUSE WRITE holds every sidecar's script), so no record lands between the read and the kill."""
        if coming_back_empty:
            c = self.client()
            try:
                await c.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
                self.earlier.extend(await read_ledger(c, self.ns))
            finally:
                await c.aclose()
        self.redis.kill()

    async def ledger(self) -> list[SpendRecord]:
        """Every record: the earlier lives' and the current Redis's (read after every sidecar has stopped)."""
        c = self.client()
        try:
            return self.earlier + await read_ledger(c, self.ns)
        finally:
            await c.aclose()

    def stats(self) -> dict[str, float]:
        try:
            return scrape_all(self.sidecars)
        except OSError:
            return {}


Scenario = Callable[[Params, Path, int], Awaitable[list[Row]]]


def refusing_note(waited: float | None, deadline: float, since: str = "the last event") -> str:
    if waited is None:
        return f"NOT every sidecar refusing {deadline:g} s after {since}"
    return f"every sidecar refusing {waited:.1f} s after {since}"


# --------------------------------------------------------------------------- 1-3: Redis faults


async def _redis_fault(p: Params, tmp: Path, up: int, kind: str) -> list[Row]:
    """Redis killed (restarted empty or from AOF) or stopped half-way through the budgets, under load."""
    routes = ["fo", "fc"] if kind == "empty" else ["fo"]
    spec = Spec(
        [route(r) for r in routes],
        [usd_budget(r, p.usd_limit, "failOpen" if r == "fo" else "failClosed") for r in routes],
    )
    with RedisServer(appendonly=kind == "aof") as redis:
        run = Run(f"redis-{kind}", p, tmp, up, redis)
        every = run.add(4, spec)
        try:
            await run.start(every)
            async with Load(run.sidecars, run.name) as load:
                load.start(routes, concurrency=p.concurrency)
                await load.wait_told({r: p.usd_limit / 2 for r in routes}, p.deadline)
                load.phase = "outage"
                if kind == "stop":
                    redis.pause()
                else:
                    await run.kill_redis(coming_back_empty=kind == "empty")
                await asyncio.sleep(p.outage)
                if kind == "stop":
                    redis.resume()
                else:
                    await asyncio.to_thread(redis.restart, empty=kind == "empty")
                load.phase = "after"
                waited = await load.wait_refusing(routes, every, p.deadline)
                stats = run.stats()
            await run.stop_everything()
            records = await run.ledger()
        finally:
            await run.stop_everything()
    rows = []
    label = {
        "empty": "1 Redis SIGKILL, restart empty",
        "aof": "2 Redis SIGKILL, restart from AOF",
        "stop": f"3 Redis SIGSTOP {p.outage:g} s, SIGCONT",
    }[kind]
    for r in routes:
        mode = "failOpen" if r == "fo" else "failClosed"
        row = Row(f"{label} ({mode})" if len(routes) > 1 else label)
        ans = of_routes(load.answers, r)
        count(row, ans)
        total, served = account(row, ans, records, [r])
        usd_overshoot(row, p.usd_limit, total, served)
        out = "stopped" if kind == "stop" else "down"
        row.notes.append(f"while Redis {out} ({p.outage:g} s): {phase_counts(ans, 'outage')}")
        if kind == "empty":
            before = sum(to_units(x.cost_usd, USD) for x in run.earlier if x.route == r)
            after = sum(to_units(x.cost_usd, USD) for x in records[len(run.earlier) :] if x.route == r)
            row.notes.append(
                f"ledger before the kill {usd(before)} (gone with Redis's data), after the restart "
                f"{100 * after / to_units(p.usd_limit, USD):.1f}% of the limit"
            )
        row.notes.append(refusing_note(waited, p.deadline, "Redis came back"))
        rows.append(row)
    if stats:
        dup = stats.get("duplicate_batches_total", 0)
        lost_h = stats.get("history_lost_total", 0)
        rows[-1].notes.append(f"store counters: {dup:.0f} duplicate batches skipped, {lost_h:.0f} history losses seen")
    return rows


async def redis_kill_empty(p: Params, tmp: Path, up: int) -> list[Row]:
    return await _redis_fault(p, tmp, up, "empty")


async def redis_kill_aof(p: Params, tmp: Path, up: int) -> list[Row]:
    return await _redis_fault(p, tmp, up, "aof")


async def redis_stop(p: Params, tmp: Path, up: int) -> list[Row]:
    return await _redis_fault(p, tmp, up, "stop")


# --------------------------------------------------------------------------- 4: cold start during an outage


async def _cold_start(p: Params, tmp: Path, up: int, restart_round: bool) -> list[Row]:
    """A previous sidecar spends both budgets; Redis dies; 4 sidecars start without it (and, with
    `restart_round`, are SIGTERMed and started again on their state dirs); Redis comes back from its AOF."""
    spec = Spec([route("usd"), route("tpm")], [usd_budget("usd", p.usd_limit), tpm_budget("tpm", p.tpm)])
    n = 4
    with RedisServer(appendonly=True) as redis:
        run = Run("cold-restart" if restart_round else "cold", p, tmp, up, redis)
        (prev,) = run.add(1, spec)
        fleet = run.add(n, spec, expected_sidecars=n)
        notes: list[str] = []
        try:
            await run.start([prev])
            async with Load(run.sidecars, run.name) as load:
                load.phase = "before"
                g = load.start(["usd", "tpm"], [prev], concurrency=p.concurrency * 2)
                waited = await load.wait_refusing(["usd"], [prev], p.deadline)
                await load.stop(g)
                await run.terminate([prev])
                if waited is None:
                    notes.append("the previous sidecar did not exhaust the USD budget in time")
                await run.kill_redis(coming_back_empty=False)
                load.phase = "outage"
                took = await run.start(fleet)
                notes.append(f"{n} sidecars started with Redis down in {took:.1f} s")
                load.start(["usd", "tpm"], fleet, concurrency=p.concurrency)
                await asyncio.sleep(p.outage)
                if restart_round:
                    load.phase = "restarted"
                    await run.terminate(fleet)
                    took = await run.restart(fleet)
                    notes.append(f"SIGTERMed and restarted on their state dirs during the outage ({took:.1f} s)")
                    await asyncio.sleep(p.outage)
                await asyncio.to_thread(redis.restart, empty=False)
                load.phase = "after"
                refused = await load.wait_refusing(["usd"], fleet, p.deadline)
            await run.stop_everything()
            records = await run.ledger()
        finally:
            await run.stop_everything()
    rows = []
    tag = "cold start + restart round" if restart_round else "cold start"
    phases = ["outage", "restarted"] if restart_round else ["outage"]
    for r, unit in (("usd", "USD"), ("tpm", "tokens/min")):
        row = Row(f"4 {tag}, {n} sidecars ({unit})")
        ans = of_routes(load.answers, r)
        count(row, ans)
        total, served = account(row, ans, records, [r])
        if r == "usd":
            usd_overshoot(row, p.usd_limit, total, served)
        else:
            tpm_overshoot(row, ans, p.tpm)
        for ph in phases:
            row.notes.append(f"{ph}: {phase_counts(ans, ph)}")
        row.notes += notes
        if r == "usd":
            row.notes.append(refusing_note(refused, p.deadline, "Redis returned"))
        rows.append(row)
    return rows


async def cold_start(p: Params, tmp: Path, up: int) -> list[Row]:
    return await _cold_start(p, tmp, up, False) + await _cold_start(p, tmp, up, True)


# --------------------------------------------------------------------------- 5: 20 sidecars to exhaustion


async def exhaustion20(p: Params, tmp: Path, up: int) -> list[Row]:
    n = 20
    spec = Spec([route("usd"), route("tpm")], [usd_budget("usd", p.usd_limit), tpm_budget("tpm", p.tpm)])
    with RedisServer() as redis:
        run = Run("exhaust20", p, tmp, up, redis)
        fleet = run.add(n, spec)
        try:
            took = await run.start(fleet)
            async with Load(run.sidecars, run.name) as load:
                load.start(["usd", "tpm"], concurrency=1)
                waited = await load.wait_refusing(["usd"], fleet, p.deadline)
                stats = run.stats()
            await run.stop_everything()
            records = await run.ledger()
        finally:
            await run.stop_everything()
    rows = []
    for r, unit in (("usd", "USD"), ("tpm", "tokens/min")):
        row = Row(f"5 {n} sidecars to exhaustion ({unit})")
        ans = of_routes(load.answers, r)
        count(row, ans)
        total, served = account(row, ans, records, [r])
        if r == "usd":
            usd_overshoot(row, p.usd_limit, total, served)
            row.notes.append(refusing_note(waited, p.deadline, "the start"))
            if stats:
                row.notes.append(
                    f"{stats.get('degraded_decisions_total', 0):.0f} reserves decided without Redis, "
                    f"{stats.get('contention_rejections_total', 0):.0f} contention 503s"
                )
        else:
            tpm_overshoot(row, ans, p.tpm)
        if row.s5:
            row.notes.append(f"5xx: {codes(ans)}")
        row.notes.append(f"{n} sidecars started in {took:.0f} s")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- 6: kill switch


def first_refusals(answers: Sequence[Answer], which: Iterable[int], t_switch: float) -> dict[int, float | None]:
    """Per sidecar: seconds from the switch to its first 403 budget_suspended answer (None: none came)."""
    out: dict[int, float | None] = {i: None for i in which}
    for a in answers:
        if a.sidecar in out and a.status == 403 and a.code == "budget_suspended" and a.t1 >= t_switch:
            t = a.t1 - t_switch
            cur = out[a.sidecar]
            out[a.sidecar] = t if cur is None else min(cur, t)
    return out


def probe_gap(answers: Sequence[Answer], which: Iterable[int], t_switch: float) -> float:
    """Median time between two requests to one sidecar on the route in the second before the switch:
    the figure's resolution (a sidecar that knew at once refuses the next request it gets)."""
    gaps = []
    for i in which:
        n = sum(1 for a in answers if a.sidecar == i and t_switch - 1.0 <= a.t0 < t_switch)
        if n:
            gaps.append(1.0 / n)
    return statistics.median(gaps) if gaps else float("nan")


async def wait_switched(load: Load, r: str, which: Sequence[int], t_switch: float, limit: float) -> None:
    while time.monotonic() - t_switch < limit:
        if all(v is not None for v in first_refusals(of_routes(load.answers, r), which, t_switch).values()):
            return
        await asyncio.sleep(0.02)


def switch_row(name: str, ans: Sequence[Answer], which: Sequence[int], t_switch: float, how: str) -> Row:
    row = Row(name)
    count(row, ans)
    firsts = first_refusals(ans, which, t_switch)
    got = [v for v in firsts.values() if v is not None]
    row.switch_s = max(got) if len(got) == len(firsts) else float("inf")
    late = sum(
        1 for a in ans if a.ok and firsts.get(a.sidecar) is not None and a.t0 > t_switch + (firsts[a.sidecar] or 0)
    )
    desc = f"{how}; first 403 after the switch: slowest sidecar {1000 * row.switch_s:.0f} ms" if got else how
    if got:
        desc += f", median {1000 * statistics.median(got):.0f} ms over {len(got)} sidecars"
    if len(got) < len(firsts):
        desc += f"; {len(firsts) - len(got)} of {len(firsts)} sidecars never refused"
    row.notes.append(desc)
    row.notes.append(f"resolution ~{1000 * probe_gap(ans, which, t_switch):.0f} ms (requests per sidecar)")
    row.notes.append(f"{late} 2xx sent after a sidecar's first refusal")
    return row


async def kill_switch(p: Params, tmp: Path, up: int) -> list[Row]:
    big = 1000.0  # never reached: only the switch refuses
    spec = Spec([route("k1"), route("k2"), route("ctl")], [usd_budget(b, big) for b in ("k1", "k2", "ctl")])
    setting = pubsub_setting()
    # Paced clients (one request per PACE s per sidecar and route, the figure's resolution), so the
    # switch is timed on a machine that has cores to spare, not behind a saturated event loop.
    pace = 0.025
    with RedisServer() as redis:
        run = Run("killswitch", p, tmp, up, redis)
        if setting is not None:
            sub = run.add(2, spec)
            poll = run.add(2, spec, store_extra={setting[0]: setting[1]})
            poll_how = f"sidecars with budgetStore.{setting[0]}={json.dumps(setting[1])}, kubetoll's set_suspended"
        else:
            sub = poll = run.add(4, spec)
            poll_how = (
                "no pub/sub setting in BudgetStoreSettings: the flag SET without PUBLISH (as redis-cli does), "
                "seen by the poll or the next sync script"
            )
        every = sorted(set(sub) | set(poll))
        try:
            await run.start(every)
            c = run.client()
            try:
                async with Load(run.sidecars, run.name) as load:
                    load.start(["ctl"], concurrency=1, pace=4 * pace)
                    g = load.start(["k1"], sub, concurrency=1, pace=pace)
                    await asyncio.sleep(p.tail)
                    load.phase = "pubsub"
                    t_pub = time.monotonic()
                    await set_suspended(c, run.ns, "k1", True)
                    await wait_switched(load, "k1", sub, t_pub, 5.0)
                    lag_pub = load.max_lag(t_pub - 1.0, time.monotonic())
                    await load.stop(g)
                    g = load.start(["k2"], poll, concurrency=1, pace=pace)
                    await asyncio.sleep(p.tail)
                    load.phase = "poll"
                    t_poll = time.monotonic()
                    if setting is not None:
                        await set_suspended(c, run.ns, "k2", True)
                    else:
                        keys = RedisKeys(run.ns)
                        pipe = c.pipeline(transaction=True)
                        pipe.set(keys.suspended("k2"), str(int(time.time())))
                        pipe.set(keys.suspension_known("k2"), "1")
                        await pipe.execute()
                    await wait_switched(load, "k2", poll, t_poll, 5.0)
                    lag_poll = load.max_lag(t_poll - 1.0, time.monotonic())
                    load.start(["k1"], sub, concurrency=1, pace=pace)
                    await asyncio.sleep(0.5)
                    load.phase = "outage"
                    await run.kill_redis(coming_back_empty=True)
                    await asyncio.sleep(min(p.outage, 1.0))
                    await asyncio.to_thread(redis.restart, empty=True)
                    t_back = time.monotonic()
                    load.phase = "after"
                    await asyncio.sleep(2 * p.tail)
            finally:
                await c.aclose()
            await run.stop_everything()
            records = await run.ledger()
        finally:
            await run.stop_everything()
    a1 = [a for a in of_routes(load.answers, "k1") if a.sidecar in sub]
    a2 = [a for a in of_routes(load.answers, "k2") if a.sidecar in poll]
    row1 = switch_row("6 kill switch: pub/sub", a1, sub, t_pub, "kubetoll's set_suspended (SET + PUBLISH)")
    row1.pubsub = True
    row2 = switch_row("6 kill switch: poll only", a2, poll, t_poll, poll_how)
    for row, ans, r, lag in ((row1, a1, "k1", lag_pub), (row2, a2, "k2", lag_poll)):
        account(row, ans, records, [r])
        row.notes.append(f"this client's event loop lagged up to {1000 * lag:.0f} ms meanwhile")
    after = [a for a in of_routes(load.answers, "k1", "k2") if a.t0 >= t_back]
    row3 = Row("6 kill switch: empty Redis restart")
    count(row3, after)
    account(row3, after, records, ["k1", "k2"])
    ctl = [a for a in of_routes(load.answers, "ctl") if a.t0 >= t_back]
    first_ok = min((a.t1 - t_back for a in ctl if a.ok), default=None)
    row3.notes.append(
        f"both budgets suspended, Redis SIGKILLed and restarted empty: {sum(a.ok for a in after)} 2xx on them in "
        f"{2 * p.tail:g} s after the restart"
    )
    row3.notes.append(
        f"control budget: {sum(a.ok for a in ctl)} 2xx"
        + (f", the first {1000 * first_ok:.0f} ms after Redis returned" if first_ok is not None else "")
    )
    row3.switch_s = 0.0 if not any(a.ok for a in after) else float("inf")
    return [row1, row2, row3]


# --------------------------------------------------------------------------- 7: upstream storms


async def upstream_storms(p: Params, tmp: Path, up: int) -> list[Row]:
    storms = {
        "s429": ("429 storm (Retry-After 1 s)", sim_backend("p429", up, "429;retry-after=1")),
        "s5xx": ("500 storm", sim_backend("p5xx", up, "500")),
        "shang": ("hang storm (first token > 1 s)", sim_backend("phang", up, "slow;delay=30", first_token_s=1.0)),
    }
    spec = Spec(
        [route(r, [b["name"], "sim"]) for r, (_, b) in storms.items()],
        [usd_budget(r, p.usd_limit) for r in storms],
        [b for _, b in storms.values()],
    )
    with RedisServer() as redis:
        run = Run("storms", p, tmp, up, redis)
        every = run.add(4, spec)
        try:
            await run.start(every)
            async with Load(run.sidecars, run.name) as load:
                load.start(list(storms), concurrency=p.concurrency)
                waited = await load.wait_refusing(list(storms), every, p.deadline)
            await run.stop_everything()
            records = await run.ledger()
        finally:
            await run.stop_everything()
    rows = []
    for r, (label, _) in storms.items():
        row = Row(f"7 upstream {label}, fallback")
        ans = of_routes(load.answers, r)
        count(row, ans)
        total, served = account(row, ans, records, [r])
        usd_overshoot(row, p.usd_limit, total, served)
        fb = sum(1 for a in ans if a.ok and a.fallbacks)
        row.notes.append(f"{fb} of {sum(a.ok for a in ans)} 2xx served by the fallback")
        if row.s5:
            row.notes.append(f"5xx: {codes(ans)}")
        row.notes.append(refusing_note(waited, p.deadline, "the start"))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- 8: sidecars killed and stopped


async def sidecar_signals(p: Params, tmp: Path, up: int) -> list[Row]:
    """(a) one sidecar SIGKILLed and one SIGTERMed mid-load on a small budget, the others spend it to its
    end; both restarted on their state dirs; (b) on another budget, one SIGTERMed during a Redis outage
    and restarted on its state dir once Redis is back (from its AOF): its buffered spend must reach Redis."""
    spec = Spec([route("r"), route("big")], [usd_budget("r", p.usd_limit), usd_budget("big", 1000.0)])
    with RedisServer(appendonly=True) as redis:
        run = Run("signals", p, tmp, up, redis)
        every = run.add(4, spec)
        try:
            await run.start(every)
            async with Load(run.sidecars, run.name) as load:
                g = load.start(["r"], concurrency=p.concurrency)
                await load.wait_told({"r": 0.4 * p.usd_limit}, p.deadline)
                t_kill = time.monotonic()
                run.sidecars[0].send(signal.SIGKILL)
                run.sidecars[1].send(signal.SIGTERM)
                waited = await load.wait_refusing(["r"], every[2:], p.deadline)
                await load.stop(g)
                await run.terminate([0, 1])  # reaps the SIGKILLed one, waits for the SIGTERMed one's exit
                await run.restart([0, 1])

                load.start(["big"], concurrency=p.concurrency)
                await asyncio.sleep(p.tail)
                load.phase = "outage"
                t_out = time.monotonic()
                await run.kill_redis(coming_back_empty=False)
                await asyncio.sleep(p.outage / 2)
                t_term = time.monotonic()
                await run.terminate([1])
                term_took = time.monotonic() - t_term
                await asyncio.sleep(p.outage / 2)
                await asyncio.to_thread(redis.restart, empty=False)
                load.phase = "after"
                back_took = await run.restart([1])
                await asyncio.sleep(p.tail)
            await run.stop_everything()
            records = await run.ledger()
        finally:
            await run.stop_everything()

    row_a = Row("8 sidecar SIGKILL + another SIGTERM mid-load")
    ans = of_routes(load.answers, "r")
    count(row_a, ans)

    def in_window(a: Answer) -> bool:
        return a.sidecar == 0 and t_kill - SIGKILL_WINDOW <= a.t1 <= t_kill

    total, served = account(row_a, ans, records, ["r"], window_ok=in_window)
    by_id = ledger_by_id(records, ["r"])
    ages = [t_kill - a.t1 for a in ans if a.sidecar == 0 and a.ok and sum(by_id.get(a.rid, ())) < (a.cost_nusd or 0)]
    if ages:
        row_a.notes.append(
            f"the SIGKILLed sidecar's lost answers went out {1000 * min(ages):.0f}-{1000 * max(ages):.0f} ms "
            "before the SIGKILL"
        )
    usd_overshoot(row_a, p.usd_limit, total, served)
    row_a.notes.append(
        f"{100 * total / to_units(p.usd_limit, USD):.1f}% of the limit in the ledger (a SIGKILLed sidecar's lease "
        "comes back only when it expires)"
    )
    row_a.notes.append(refusing_note(waited, p.deadline, "the signals"))

    row_b = Row("8 sidecar SIGTERM during a Redis outage, restarted")
    ans = of_routes(load.answers, "big")
    count(row_b, ans)
    account(row_b, ans, records, ["big"])
    by_id = ledger_by_id(records, ["big"])
    outage_1 = [a for a in ans if a.sidecar == 1 and a.ok and t_out <= a.t0 <= t_term]
    told_1 = sum(a.cost_nusd or 0 for a in outage_1)
    kept_1 = sum(min(sum(by_id.get(a.rid, ())), a.cost_nusd or 0) for a in outage_1)
    row_b.notes.append(
        f"the SIGTERMed sidecar served {len(outage_1)} 2xx ({usd(told_1)}) in the outage before its SIGTERM; "
        f"in the ledger after its restart: {usd(kept_1)}"
    )
    row_b.notes.append(f"its shutdown took {term_took:.1f} s, its restart {back_took:.1f} s")
    return [row_a, row_b]


# --------------------------------------------------------------------------- table


SCENARIOS: dict[str, Scenario] = {
    "redis_kill_empty": redis_kill_empty,
    "redis_kill_aof": redis_kill_aof,
    "redis_stop": redis_stop,
    "cold_start": cold_start,
    "exhaustion20": exhaustion20,
    "kill_switch": kill_switch,
    "upstream_storms": upstream_storms,
    "sidecar_signals": sidecar_signals,
}


def print_table(rows: Sequence[Row]) -> None:
    head = ["scenario", "sent", "hung", "2xx/4xx/5xx", "spend lost", "double-counted", "overshoot", "notes"]
    cells = [
        [r.name, f"{r.sent:,}", str(r.hung), f"{r.s2}/{r.s4}/{r.s5}", r.lost, r.double, r.overshoot, "; ".join(r.notes)]
        for r in rows
    ]
    widths = [max(len(head[i]), *(len(c[i]) for c in cells)) for i in range(len(head) - 1)]
    right = {1, 2, 3, 6}

    def line(c: Sequence[str]) -> str:
        parts = [c[i].rjust(widths[i]) if i in right else c[i].ljust(widths[i]) for i in range(len(widths))]
        return "  ".join(parts + [c[-1]])

    print(line(head))
    print(line(["-" * w for w in widths] + ["-----"]))
    for c in cells:
        print(line(c))


def targets_line(rows: Sequence[Row]) -> str:
    def verdict(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    over = [(r.overshoot_pct, r.name) for r in rows if r.overshoot_pct is not None]
    parts = []
    if over:
        worst, name = max(over)
        parts.append(
            f"overshoot <= {TARGET_OVERSHOOT_PCT:g}% of the limit in every scenario: worst {worst:+.2f}% ({name}), "
            f"{sum(o > TARGET_OVERSHOOT_PCT for o, _ in over)} of {len(over)} rows over "
            f"({verdict(worst <= TARGET_OVERSHOOT_PCT)})"
        )
    hung = sum(r.hung for r in rows)
    parts.append(f"0 requests hung: {hung} ({verdict(hung == 0)})")
    lost = [(r.lost_beyond_usd, r.name) for r in rows if r.lost_beyond_usd > 0]
    parts.append(
        f"0 spend lost outside the {SIGKILL_WINDOW * 1000:.0f} ms SIGKILL window: "
        + (
            f"${sum(v for v, _ in lost):.6f} in {len(lost)} rows ({', '.join(n for _, n in lost)}) (MISSES)"
            if lost
            else "$0 (meets)"
        )
    )
    sw = [r.switch_s for r in rows if r.switch_s is not None]
    pub = [r.switch_s for r in rows if r.pubsub and r.switch_s is not None]
    if sw:
        worst_sw = max(sw)
        parts.append(
            f"kill switch <= {TARGET_SWITCH_S:g} s by every path: worst "
            + (
                "never (a sidecar did not refuse, or served after a restart)"
                if worst_sw == float("inf")
                else f"{worst_sw:.2f} s"
            )
            + f" ({verdict(worst_sw <= TARGET_SWITCH_S)})"
        )
    if pub:
        parts.append(
            f"<= {TARGET_SWITCH_PUBSUB_S * 1000:.0f} ms with pub/sub: {1000 * max(pub):.0f} ms "
            f"({verdict(max(pub) <= TARGET_SWITCH_PUBSUB_S)})"
        )
    return "Targets: " + "; ".join(parts) + "."


def own_cpu_seconds() -> float:
    """CPU of this process and of every child it has reaped (each sidecar, Redis and the upstream once stopped)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


async def run_all(names: Sequence[str], p: Params, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    up_port = bs.listen_port()
    upstream = bs.start_upstream(up_port, None, tmp / "upstream.log")
    try:
        for k, name in enumerate(names, 1):
            t0 = time.monotonic()
            print(f"[{k}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
            try:
                got = await SCENARIOS[name](p, tmp, up_port)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                got = [
                    Row(
                        f"{name}: FAILED",
                        notes=[f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"],
                    )
                ]
            rows += got
            print(f"[{k}/{len(names)}] {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        bs.stop(upstream)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short outages, small budgets: the table in ~3 minutes")
    ap.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this scenario (repeatable; a name or its number): {', '.join(SCENARIOS)}",
    )
    ap.add_argument("--workdir", type=Path, help="keep configs, state dirs and logs here (default: a temp dir)")
    ap.add_argument("--log-level", default="WARNING", help="the sidecars' log level (WARNING: no access lines)")
    args = ap.parse_args()
    names = list(SCENARIOS)
    if args.only:
        chosen = []
        for o in args.only:
            if o.isdigit() and 1 <= int(o) <= len(names):
                chosen.append(names[int(o) - 1])
            elif o in SCENARIOS:
                chosen.append(o)
            else:
                ap.error(f"unknown scenario {o!r}; one of {', '.join(SCENARIOS)}")
        names = chosen
    p = Params.of(args.quick, args.log_level)

    print("kubetoll: fault scenarios, real redis-server and sidecar processes, one simulated upstream")
    for line in bs.machine_lines():
        print(line)
    print(
        f"mode:    {'quick' if p.quick else 'full'}: Redis outages {p.outage:g} s, USD budgets ${p.usd_limit:g}/day, "
        f"tokens/min buckets {p.tpm:,}, {p.concurrency} clients per sidecar and route, client timeout "
        f"{CLIENT_TIMEOUT:g} s; nothing pinned (every process shares the cores)"
    )
    t0 = time.monotonic()
    busy0, own0 = bs.core_busy_seconds(), own_cpu_seconds()
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            rows = runner.run(run_all(names, p, args.workdir))
        else:
            with bs.tempdir() as tmp:
                rows = runner.run(run_all(names, p, tmp))
    wall = time.monotonic() - t0
    busy1, own1 = bs.core_busy_seconds(), own_cpu_seconds()
    other = max(sum(busy1.values()) - sum(busy0.values()) - (own1 - own0), 0.0) / wall if busy1 else None
    print()
    print_table(rows)
    for n in NOTES:
        print(f"note: {n}")
    noise = ""
    if other is not None:
        flag = " (NOISY: the timings are not this benchmark's alone)" if other > NOISY else ""
        noise = f"; other processes (not this benchmark's) used {other:.0%} of a core meanwhile{flag}"
    print(f"Run took {wall:.0f} s{noise}.")
    print(targets_line(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
