"""`kubetoll demo`: the whole story offline, in a minute.

1. A RouterConfig: the repository's `examples/` custom resources compiled as
   `kubetoll run` compiles them, when the operator package is there and they
   compile; otherwise the one embedded in this package (`demo_router.yaml`).
2. One simulated provider per backend (`SimulatedUpstream`), each with a
   realistic pace for its class (a hosted flagship, a cheap hosted model, an
   in-cluster GPU server) and occasional 429 bursts, so fallbacks happen.
3. The real sidecar (`Sidecar` + `serve`) on 127.0.0.1, in this process.
4. Seeded support-bot traffic from free and premium tenants through its HTTP API
   (`traffic.py`), with a live view of what the sidecar records (`live_view.py`).
5. At the end, an HTML spend report built from the sidecar's ledger
   (`report_html.py`), and the headline numbers on the terminal.

Ctrl-C stops sending, lets requests in flight finish, and still writes the report.
A second Ctrl-C abandons the requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from kubetoll_core.prices import PricingError, ResolvedPrice, resolve_price
from kubetoll_core.router_config import Backend, RouterConfig
from kubetoll_core.spend_record import SpendRecord
from kubetoll_sidecar.config_loader import load_config
from kubetoll_sidecar.routing import CompiledRoute, RouteContext
from kubetoll_sidecar.server import Sidecar, serve
from kubetoll_tools.simulator import RateLimitBurst, SimSettings, SimulatedUpstream

from . import experiment_report, live_view, report_html, spend, traffic

EMBEDDED_CONFIG = Path(__file__).with_name("demo_router.yaml")
DEMO_KEY_ENV = "KUBETOLL_DEMO_API_KEY"
# examples/ is sized for a real day; a demo minute needs budgets that run out in it.
EXAMPLES_BUDGET_SCALE = 0.01
DEFAULT_REPORT = "kubetoll-demo-report.html"


class DemoError(Exception):
    """The demo cannot run (exit status 2); the message says why."""


@dataclass
class DemoOptions:
    duration: float = 60.0
    seed: int = 7
    rate: float = 8.0  # requests per second over all tenants
    concurrency: int = 32
    live: bool = True
    report: str = DEFAULT_REPORT
    config_source: str = "auto"  # auto | examples | embedded
    examples_dir: str | None = None
    budget_scale: float | None = None  # None: 1 for the embedded config, EXAMPLES_BUDGET_SCALE for examples
    baseline: str | None = None  # backend name; None: what a premium request is routed to first
    drain_seconds: float = 15.0
    verbose: bool = False


@dataclass
class ConfigChoice:
    data: dict[str, Any]  # RouterConfig JSON (camelCase), before the demo's adaptations
    source: str  # "examples" | "embedded"
    label: str  # one line for humans
    notes: list[str] = field(default_factory=list)


@dataclass
class DemoResult:
    records: list[SpendRecord]
    report_path: Path
    data: dict[str, Any]
    config: ConfigChoice
    stats: traffic.TrafficStats
    interrupted: bool
    summary_text: str


# --------------------------------------------------------------------------- config


def _repo_examples() -> list[Path]:
    here = Path(__file__).resolve()
    found = [Path.cwd() / "examples"]
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file():
            found.append(parent / "examples")
            break
    return found


def compile_examples(directory: Path) -> tuple[dict[str, Any] | None, str]:
    """The examples compiled as `kubetoll run` does (env credentials), or None and why not."""
    try:
        from kubetoll_operator.compiler import compile_namespace
        from kubetoll_operator.manifests import load
    except ImportError as exc:
        return None, f"the operator package is not available ({exc})"
    try:
        docs, errors = load([str(directory)])
        if errors:
            return None, f"{errors[0]}"
        objs = [d.obj for d in docs if str(d.obj.get("apiVersion", "")).startswith("kubetoll.dev/")]
        if not objs:
            return None, f"{directory} holds no kubetoll.dev resources"
        result = compile_namespace("default", objs, credential_mode="env")
    except Exception as exc:  # the compiler is someone else's moving target: never let it break the demo
        return None, f"compiling {directory} failed: {type(exc).__name__}: {exc}"
    if result.config is None or not result.ok:
        first = next((str(p) for p in result.problems if p.severity == "error"), "no config produced")
        return None, f"{directory} does not compile: {first}"
    data = json.loads(result.config_json)
    if not data.get("routes"):
        return None, f"{directory} compiles to no routes"
    try:
        for b in result.config.backends:
            resolve_price(b)
    except PricingError as exc:
        return None, str(exc)
    kinds = Counter(str(o.get("kind")) for o in objs)
    what = ", ".join(f"{n} {k}s" if n != 1 else f"1 {k}" for k, n in sorted(kinds.items()))
    return data, f"compiled from {directory} ({what})"


def choose_config(opts: DemoOptions) -> ConfigChoice:
    notes: list[str] = []
    if opts.config_source in ("auto", "examples"):
        dirs = [Path(opts.examples_dir)] if opts.examples_dir else _repo_examples()
        why = "no examples/ directory found"
        for d in dirs:
            if not d.is_dir():
                continue
            data, why = compile_examples(d)
            if data is not None:
                return ConfigChoice(data, "examples", why, notes)
            break
        if opts.config_source == "examples":
            raise DemoError(f"cannot use the examples: {why}")
        notes.append(f"examples not used: {why}")
    data = yaml.safe_load(EMBEDDED_CONFIG.read_text())
    return ConfigChoice(data, "embedded", f"embedded demo config ({EMBEDDED_CONFIG.name})", notes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scale_usd(d: dict[str, Any], scale: float) -> None:
    for k in ("usdPerDay", "usdPerMonth"):
        if d.get(k) is not None:
            d[k] = d[k] * scale


def adapt_config(
    data: dict[str, Any], endpoints: dict[str, str], port: int, metrics_port: int, scale: float, workdir: Path
) -> dict[str, Any]:
    """The config as the demo serves it: every backend on its simulator, free local ports, memory budgets."""
    cfg = copy.deepcopy(data)
    server = dict(cfg.get("server") or {})
    server.update(
        host="127.0.0.1",
        port=port,
        metricsHost="127.0.0.1",
        metricsPort=metrics_port,
        drainSeconds=5,
        credentialsDir=str(workdir),
        podLabelsFile=str(workdir / "no-pod-labels"),
    )
    cfg["server"] = server
    cfg.pop("budgetStore", None)  # in memory: no Redis in the demo
    for b in cfg.get("backends", []):
        b["endpoint"] = endpoints[b["name"]]
        if b.get("credentials"):
            b["credentials"] = {"env": DEMO_KEY_ENV}
    if scale != 1.0:
        for budget in cfg.get("budgets", []):
            _scale_usd(budget.setdefault("cap", {}), scale)
            for tier in (budget.get("tiers") or {}).values():
                _scale_usd(tier, scale)
    cfg["revision"] = "kubetoll-demo"
    return cfg


# --------------------------------------------------------------------------- simulated providers


def sim_profile(backend: Backend, price: ResolvedPrice, seed: int) -> tuple[str, SimSettings]:
    """How a backend's simulator behaves, by what kind of backend it is."""
    out_per_mtok = price.base.output * 1_000_000
    if backend.pricing.gpu_hourly_usd is not None:
        kind = "in-cluster GPU"
        s = SimSettings(latency_ms=40, first_token_ms=90, chunk_interval_ms=8, completion_tokens=200, seed=seed)
    elif "embedding" in backend.model:
        kind = "embeddings"
        s = SimSettings(latency_ms=60, seed=seed)
    elif out_per_mtok >= 8:
        kind = "hosted flagship"
        s = SimSettings(
            latency_ms=350,
            first_token_ms=250,
            chunk_interval_ms=30,
            completion_tokens=220,
            seed=seed,
            rate_limit_burst=RateLimitBurst(every_s=17 + 3 * (seed % 3), duration_s=2.5),
            error_rate=0.005,
        )
    elif out_per_mtok >= 2:
        kind = "hosted"
        s = SimSettings(
            latency_ms=400, first_token_ms=300, chunk_interval_ms=20, completion_tokens=240, seed=seed, error_rate=0.01
        )
    else:
        kind = "hosted, cheap"
        s = SimSettings(
            latency_ms=220,
            first_token_ms=150,
            chunk_interval_ms=12,
            completion_tokens=180,
            seed=seed,
            rate_limit_burst=RateLimitBurst(every_s=23, duration_s=2.0),
            error_rate=0.01,
        )
    s.tokens_per_chunk = 4
    return kind, s


# The demo's replicas of an in-cluster backend that reads load metrics, and when they are busy.
REPLICAS = 2
BUSY_FROM, BUSY_UNTIL = 0.40, 0.70  # of the run: every replica's queue deeper than the route's spillover.queueDepth
# Shares of the traffic sent to the routes that show a cascade and a spill-over (when the config has them).
CASCADE_SHARE, SPILLOVER_SHARE = 0.10, 0.20


def side_routes(config: RouterConfig, main: str) -> tuple[traffic.SideRoute, ...]:
    """Traffic for a route with a cascade (asked for extraction, half with a max_tokens the cheap step runs out
    of) and for a route with spill-over, besides the main route."""
    out: list[traffic.SideRoute] = []
    for r in config.routes:
        if r.name == main:
            continue
        cascaded = [rule for rule in r.rules if rule.cascade is not None and rule.match.header is not None]
        if cascaded and not any(s.kind == "extract" for s in out):
            h = cascaded[0].match.header
            assert h is not None
            headers = ((h.name, h.value),) if h.value else ()
            out.append(traffic.SideRoute(r.name, CASCADE_SHARE, "extract", headers, (24, 400)))
        elif r.spillover is not None and not any(s.kind == "chat" for s in out):
            out.append(traffic.SideRoute(r.name, SPILLOVER_SHARE, "chat"))
    return tuple(out)


async def start_replicas(
    cfg: dict[str, Any], backends: list[Backend], prices: dict[str, ResolvedPrice], seed: int
) -> dict[str, list[SimulatedUpstream]]:
    """Simulated replicas for each backend that reads load metrics, written into the config as the operator
    writes the EndpointSlices' ready replicas."""
    out: dict[str, list[SimulatedUpstream]] = {}
    by_name = {b["name"]: b for b in cfg.get("backends", [])}
    for i, b in enumerate(backends):
        if b.load_metrics is None or b.name not in by_name:
            continue
        sims = []
        for j in range(REPLICAS):
            _, settings = sim_profile(b, prices[b.name], seed * 131 + i * 7 + j)
            sim = SimulatedUpstream(settings)
            await sim.start()
            sim.load_metrics.format = b.load_metrics.format.value
            sims.append(sim)
        by_name[b.name]["replicas"] = [{"url": s.url + "/v1", "name": f"{b.name}-{j}"} for j, s in enumerate(sims)]
        out[b.name] = sims
    return out


async def replica_load(replicas: dict[str, list[SimulatedUpstream]], duration: float, stop: asyncio.Event) -> None:
    """The replicas' queues: shallow, then every one deep for a stretch of the run (requests spill to the next
    backend of the chain), then shallow again."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not stop.is_set():
        f = (loop.time() - t0) / duration
        busy = BUSY_FROM <= f < BUSY_UNTIL
        for sims in replicas.values():
            for j, sim in enumerate(sims):
                sim.load_metrics.set(waiting=40 + j if busy else j, running=8, kv_cache=0.95 if busy else 0.3 + 0.2 * j)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


def sim_endpoint(backend: dict[str, Any], sim: SimulatedUpstream) -> str:
    if backend.get("provider") == "azure-openai":
        return sim.url
    return sim.url + "/v1"


# --------------------------------------------------------------------------- helpers


def pick_route(config: RouterConfig) -> str:
    """The route the traffic asks for: one a budget with tiers covers, preferring one with a tier rule."""
    budgeted = []
    for r in config.routes:
        if any(b.covers(r.name) and b.tiers for b in config.budgets):
            budgeted.append(r)
    candidates = budgeted or list(config.routes)
    if not candidates:
        raise DemoError("the config has no routes")
    with_tiers = [r for r in candidates if any(rule.match.tiers for rule in r.rules)]
    return (with_tiers or candidates)[0].name


def default_baseline(config: RouterConfig, route: str) -> str:
    """The flagship: the first backend a premium (else default-tier) request is routed to."""
    cr = CompiledRoute(next(r for r in config.routes if r.name == route))
    for tier in ("premium", config.tenancy.default_tier):
        rule = cr.select(RouteContext(200, "baseline", tier, {}, lambda: ""))
        if rule is not None and rule.backends:  # a rule with an experiment split names its backends per arm
            return rule.backends[0]
    return cr.all_backends[0]


def price_text(backend: Backend, price: ResolvedPrice) -> str:
    r = price.per_mtok()
    if price.source == "gpu-shadow":
        p = backend.pricing
        return f"GPU ${p.gpu_hourly_usd:g}/h at {p.tokens_per_second:g} tok/s = ${r['inputPerMTok']:.3f}/MTok"
    return f"${r['inputPerMTok']:g} in / ${r['outputPerMTok']:g} out per MTok"


def effective_tier(config: RouterConfig, tier: str) -> str:
    known = {name for b in config.budgets for name in b.tiers}
    return tier if tier in known else config.tenancy.default_tier


async def _wait_ready(ops_url: str, serve_task: asyncio.Task[None], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            if serve_task.done():
                serve_task.result()  # raises what stopped it
                raise DemoError("the sidecar stopped before it was ready")
            try:
                async with session.get(ops_url + "/readyz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.05)
    raise DemoError(f"the sidecar did not become ready within {timeout:g}s")


# --------------------------------------------------------------------------- the run


async def run_demo(opts: DemoOptions, console: Any = None, out: Any = None) -> DemoResult:
    """Runs the demo and returns what happened; `out` gets the text lines, `console` the live view."""
    # The sidecar's log lines would tear the live view; quiet them for the run only.
    quiet = logging.getLogger("kubetoll")
    level = quiet.level
    if not opts.verbose:
        quiet.setLevel(logging.ERROR)
    try:
        return await _run_demo(opts, console, out or sys.stdout)
    finally:
        quiet.setLevel(level)


async def _run_demo(opts: DemoOptions, console: Any, out: Any) -> DemoResult:
    if opts.duration <= 0:
        raise DemoError("--duration must be positive")
    if opts.rate <= 0 or opts.concurrency < 1:
        raise DemoError("--rate must be positive and --concurrency at least 1")
    choice = choose_config(opts)
    scale = (
        opts.budget_scale
        if opts.budget_scale is not None
        else (EXAMPLES_BUDGET_SCALE if choice.source == "examples" else 1.0)
    )
    if scale != 1.0:
        choice.notes.append(f"USD budgets scaled ×{scale:g} so a day's story fits in the run")
    try:
        base_cfg = RouterConfig.model_validate(choice.data)
        prices = {b.name: resolve_price(b) for b in base_cfg.backends}
    except (ValueError, PricingError) as exc:
        raise DemoError(f"the {choice.source} config is not usable: {exc}") from None
    os.environ.setdefault(DEMO_KEY_ENV, "sk-demo-offline-key")

    sims: dict[str, tuple[str, SimulatedUpstream]] = {}
    replicas: dict[str, list[SimulatedUpstream]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="kubetoll-demo-"))
    loop = asyncio.get_running_loop()
    installed_signals: list[signal.Signals] = []
    sidecar: Sidecar | None = None
    serve_task: asyncio.Task[None] | None = None
    stop_sidecar = asyncio.Event()
    stats = traffic.TrafficStats()
    traffic_stop = asyncio.Event()
    interrupts = 0
    try:
        for i, b in enumerate(base_cfg.backends):
            kind, settings = sim_profile(b, prices[b.name], opts.seed * 101 + i)
            sim = SimulatedUpstream(settings)
            await sim.start()
            sims[b.name] = (kind, sim)
        endpoints = {b["name"]: sim_endpoint(b, sims[b["name"]][1]) for b in choice.data["backends"]}
        port, metrics_port = free_port(), free_port()
        cfg_data = adapt_config(choice.data, endpoints, port, metrics_port, scale, workdir)
        replicas = await start_replicas(cfg_data, base_cfg.backends, prices, opts.seed)
        path = workdir / "router.json"
        path.write_text(json.dumps(cfg_data, indent=2))
        sidecar = Sidecar(load_config(str(path)), watch=False)
        serve_task = asyncio.create_task(serve(sidecar, "127.0.0.1", port, metrics_port, stop_sidecar))
        await _wait_ready(f"http://127.0.0.1:{metrics_port}", serve_task)

        # serve() set SIGINT/SIGTERM to stop the sidecar; the demo wants to stop the traffic first.
        def on_signal() -> None:
            nonlocal interrupts
            interrupts += 1
            traffic_stop.set()
            if interrupts > 1 and traffic_task is not None:
                traffic_task.cancel()

        traffic_task: asyncio.Task[None] | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal)
                installed_signals.append(sig)
            except (NotImplementedError, RuntimeError):
                pass

        config = sidecar.config
        route = pick_route(config)
        baseline = opts.baseline or default_baseline(config, route)
        if baseline not in prices:
            raise DemoError(f"--baseline {baseline}: no such backend (backends: {', '.join(prices)})")
        tiers = {p.name: effective_tier(config, p.tier) for p in traffic.DEFAULT_TENANTS}
        sides = side_routes(config, route)
        plan = traffic.side_routes(traffic.plan(opts.seed, opts.duration, opts.rate), sides, opts.seed)
        plan = traffic.conversations(plan, opts.seed)
        tenancy = (config.tenancy.header, config.tenancy.tier_header)

        print(f"kubetoll demo: config: {choice.label}", file=out)
        for note in choice.notes:
            print(f"  note: {note}", file=out)
        print(
            f"  sidecar http://127.0.0.1:{port}/v1 (metrics :{metrics_port}); "
            + "; ".join(f"{name}: {kind} sim" for name, (kind, _) in sims.items()),
            file=out,
        )
        print(
            f"  {len(plan)} requests planned over {opts.duration:g}s to route {route} (seed {opts.seed}); "
            "Ctrl-C stops early",
            file=out,
        )
        for side in sides:
            what = "a cascade" if side.kind == "extract" else "spill-over when its replicas are busy"
            print(f"  {side.share:.0%} of them to route {side.route} ({what})", file=out)
        out.flush()

        started = time.monotonic()
        t0 = time.time()
        load_task = asyncio.create_task(replica_load(replicas, opts.duration, traffic_stop)) if replicas else None
        traffic_task = asyncio.create_task(
            traffic.run_traffic(
                f"http://127.0.0.1:{port}",
                route,
                tenancy,
                plan,
                stats,
                traffic_stop,
                concurrency=opts.concurrency,
                drain_seconds=opts.drain_seconds,
            )
        )

        def snap() -> live_view.Snapshot:
            assert sidecar is not None
            return live_view.take_snapshot(
                sidecar,
                stats,
                route=route,
                source=choice.label,
                started=started,
                duration=opts.duration,
                tiers=tiers,
                stopping=traffic_stop.is_set(),
            )

        if opts.live:
            try:
                from rich.live import Live
            except ImportError:
                print("  note: the live view needs the `rich` package; showing progress lines instead", file=out)
                opts.live = False
        if opts.live:
            with Live(live_view.render(snap()), console=console, refresh_per_second=4, transient=False) as live:
                while not traffic_task.done():
                    await asyncio.wait({traffic_task}, timeout=0.25)
                    live.update(live_view.render(snap()))
        else:
            next_line = 10.0
            while not traffic_task.done():
                await asyncio.wait({traffic_task}, timeout=0.5)
                if time.monotonic() - started >= next_line and not traffic_task.done():
                    print(live_view.headless_line(snap()), file=out)
                    out.flush()
                    next_line += 10.0
        with contextlib.suppress(asyncio.CancelledError):
            await traffic_task
        traffic_stop.set()
        if load_task is not None:
            await load_task
        t1 = time.time()
        final = snap()
    finally:
        for sig in installed_signals:
            loop.remove_signal_handler(sig)
        if serve_task is not None:
            stop_sidecar.set()
            with contextlib.suppress(Exception):
                await serve_task
        for _, sim in sims.values():
            await sim.stop()
        for replica_sims in replicas.values():
            for sim in replica_sims:
                await sim.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    assert sidecar is not None
    records = sorted(sidecar.ledger.records(), key=lambda r: r.time)
    interrupted = stats.interrupted or interrupts > 0
    backends_info = [
        {
            "name": b.name,
            "model": b.model,
            "provider": b.provider.value,
            "price": price_text(b, prices[b.name]),
            "price_source": prices[b.name].source,
            "simulated_as": sims[b.name][0],
        }
        for b in config.backends
    ]
    by_tenant = {g.key: g for g in spend.group_by(records, "tenant")}
    tenants_info = []
    for t in final.tenants:
        g = by_tenant.get(t.name) or spend.Group(t.name)
        row = g.as_dict()
        row.update(tier=t.tier, rejected=t.rejected, failed=t.failed, budget_percent=t.budget_percent)
        tenants_info.append(row)
    events = {
        "rejections": {r: v for (r,), v in final.rejections.items()},
        "fallbacks": {f"{b}: {r}": v for (b, r), v in final.fallbacks.items() if r != "spillover"},
        "downgrades": {r: v for (r,), v in final.downgrades.items()},
        # From the ledger: requests a busy in-cluster backend spilled (by backend), and the cascades.
        "spillovers": dict(Counter(b for r in records for b in r.spillover.split(",") if b)),
        "cascade": experiment_report.cascade_summary(records),
    }
    attribution = {
        "by_feature": [g.as_dict() for g in spend.group_by_tag(records, "feature")],
        "outcomes": spend.outcome_costs(records),
    }
    rep = traffic.repeat_analysis(records, stats.by_request_id)
    cache = {
        "configured": final.cache_configured,
        "hits": final.cache_hits,
        "hit_rate": final.cache_hit_rate,
        "avoided_usd": final.avoided_usd,
        **rep,
    }
    bprice = prices[baseline]
    bmodel = config.backend(baseline).model
    blabel = baseline if baseline == bmodel else f"{baseline} ({bmodel})"
    meta = {
        "generated_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "duration_s": t1 - t0,
        "planned_duration_s": opts.duration,
        "seed": opts.seed,
        "rate": opts.rate,
        "route": route,
        "namespace": config.namespace,
        "config_source": choice.label,
        "config_kind": choice.source,
        "notes": choice.notes,
        "requests_planned": len(plan),
        "requests_sent": stats.sent,
        "responses": dict(Counter(str(r.status) for r in stats.results)),
        "interrupted": interrupted,
        "baseline_backend": baseline,
        "baseline_price": price_text(config.backend(baseline), bprice),
        "run_started": t0,
        "run_ended": t1,
    }
    data = report_html.build_report_data(
        records,
        baseline=bprice,
        baseline_label=blabel,
        t0=t0,
        t1=t1,
        meta=meta,
        backends=backends_info,
        tenants=tenants_info,
        events=events,
        cache=cache,
    )
    data["attribution"] = attribution
    report_path = await asyncio.to_thread(write_report, opts.report, data)
    text = summary_text(data, stats, report_path)
    print(text, file=out)
    out.flush()
    return DemoResult(records, report_path, data, choice, stats, interrupted, text)


def write_report(path: str, data: dict[str, Any]) -> Path:
    """Render the report page and write it to `path` (its directory made if need be); returns the resolved path."""
    report_path = Path(path).expanduser().resolve()
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report_html.render_html(data), encoding="utf-8")
    return report_path


def summary_text(data: dict[str, Any], stats: traffic.TrafficStats, report_path: Path) -> str:
    fmt = spend.fmt_usd
    meta, summ, ev, cache = data["meta"], data["summary"], data["events"], data["cache"]
    tot, sav = summ["totals"], summ["savings"]
    codes = Counter(r.error_code for r in stats.results if r.status == 429)
    failed = sum(1 for r in stats.results if r.status not in (200, 429))
    served = sum(1 for r in stats.results if r.status == 200)
    rej = sum(codes.values())
    fb = ev["fallbacks"]
    lines = [
        f"kubetoll demo: {'stopped early after' if meta['interrupted'] else 'done after'} {meta['duration_s']:.1f}s "
        f"of traffic (config: {meta['config_kind']}, seed {meta['seed']})",
        f"  requests   {meta['requests_sent']} sent · {served} served · {rej} rejected"
        + (f" ({', '.join(f'{k} {v}' for k, v in codes.most_common())})" if codes else "")
        + f" · {failed} failed",
        f"  spend      {fmt(tot['cost_usd'])} over {tot['requests']} billed requests "
        f"({fmt(tot['cost_per_request_usd'])}/request)",
        f"  baseline   {fmt(sav['baseline_usd'])} had every request gone to {sav['baseline']}",
        f"  saved      {fmt(sav['saved_usd'])} ({sav['saved_percent']:.1f}%): routing {fmt(sav['routing_usd'])} · "
        f"downgrade {fmt(sav['downgrade_usd'])} · cache {fmt(sav['cache_usd'])}",
        f"  fallbacks  {int(sum(fb.values()))}"
        + (f" ({', '.join(f'{k} ×{int(v)}' for k, v in sorted(fb.items(), key=lambda kv: -kv[1])[:4])})" if fb else "")
        + f" · downgraded {tot['downgraded']} requests",
    ]
    if cache["hits"]:
        lines.append(
            f"  cache      {cache['hits']} hits ({100 * cache['hit_rate']:.1f}%), avoided {fmt(cache['avoided_usd'])}"
        )
    else:
        lines.append(
            f"  cache      {'no hits' if cache['configured'] else 'not configured'}; {cache['exact_repeats']} exact "
            f"repeats cost {fmt(cache['exact_repeat_usd'])}, "
            f"{cache['paraphrases']} paraphrases {fmt(cache['paraphrase_usd'])}"
        )
    if ev.get("cascade"):
        lines.append("  cascade    " + experiment_report.cascade_line(ev["cascade"]))
    if ev.get("spillovers"):
        spilled = ", ".join(f"{b} ×{n}" for b, n in sorted(ev["spillovers"].items()))
        lines.append(f"  spill-over {spilled}: requests sent on while every replica's queue was deep")
    attr = data.get("attribution") or {}
    features = [g for g in attr.get("by_feature", []) if g["key"] != "(untagged)"]
    if features:
        lines.append("  features   " + " · ".join(f"{g['key']} {fmt(g['cost_usd'])}" for g in features[:5]))
    if attr.get("outcomes"):
        per = " · ".join(
            f"{o['outcome']} ×{o['count']} at {fmt(o['cost_per_outcome_usd'])} each" for o in attr["outcomes"]
        )
        lines.append(f"  outcomes   {per} (the conversation's spend per outcome)")
    top = summ["top_spenders"][:3]
    if top:
        lines.append("  top        " + ", ".join(f"{g['key']} {fmt(g['cost_usd'])}" for g in top))
    lines.append(f"  report     {report_path}")
    return "\n".join(lines)
