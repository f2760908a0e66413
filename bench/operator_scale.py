"""The operator at scale: compile time, config size, reaction time, and one spend reading.

One generated namespace: 200 ModelRoutes (3-5 rules each: long-context, tier,
header and keyword matches, a default; 2-3 backends per rule; a third with a
budget downgrade, a quarter with a cache policy), 50 ModelBackends (hosted
OpenAI, Anthropic and Azure OpenAI with catalogue or override prices, in-cluster
GPU servers behind Services, one embeddings model), 20 TokenBudgets (10 routes
each, a USD day and month cap and a token month cap, three tiers) and 5
CachePolicies (two of them semantic).

(a) `compile_namespace` on those objects: median and p95 over `--compiles` runs,
    and the RouterConfig's canonical JSON size (raw and gzipped: a ConfigMap holds
    at most 1 MiB).
(b) `kubetoll operator --standalone` in its own process against kmock's
    Kubernetes emulator (in this process): once the first config is written and
    the statuses settled, `--changes` times a route is patched through the API
    and the time until a watch on ConfigMaps delivers the new config is measured.
    The operator's 0.2 s debounce is part of it, as in a cluster; so is the
    emulator's own time per request, which grows with the objects it holds
    (printed, so the figure can be read for a real API server).
(c) With a redis-server on PATH (or REDIS_URL): `--tenants` tenants spend on every
    budget through a real RedisBudgetStore, then one spend reading of the
    namespace as the operator's reporter does it (`period_totals` per budget plus
    `spend.budget_report`): median over 10 readings, and the meters read.

Prints figures; asserts nothing (benchmarks never pass or fail).

    .venv/bin/python bench/operator_scale.py
    .venv/bin/python bench/operator_scale.py --routes 400 --changes 50
    .venv/bin/python bench/operator_scale.py --no-redis
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("core", "sidecar", "operator", "tools", "tests")]

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from kubetoll_core.router_config import BudgetStoreSettings  # noqa: E402
from kubetoll_operator.compiler import compile_namespace  # noqa: E402

NS = "bench"
API = "kubetoll.dev/v1alpha1"
PLURALS = {
    "ModelBackend": "modelbackends",
    "ModelRoute": "modelroutes",
    "TokenBudget": "tokenbudgets",
    "CachePolicy": "cachepolicies",
}
SECRETS = {
    "openai-credentials": {"api-key": "sk-bench"},
    "anthropic-credentials": {"api-key": "sk-ant-bench"},
    "azure-credentials": {"api-key": "az-bench"},
}


# --------------------------------------------------------------------------- the namespace


def obj(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}


def generate(n_routes: int = 200, n_backends: int = 50, n_budgets: int = 20, n_cache: int = 5) -> list[dict[str, Any]]:
    backends: list[dict[str, Any]] = []
    timeouts = {"connect": 3, "firstToken": 30, "total": 120}
    for i in range(n_backends - 1):
        kind = i % 5
        name = f"backend-{i:02d}"
        if kind == 0:
            spec = {
                "provider": "openai",
                "model": ("gpt-4o", "gpt-4o-mini")[i % 2],
                "endpoint": "https://api.openai.com/v1",
                "credentials": {"secretRef": {"name": "openai-credentials", "key": "api-key"}},
                "limits": {"contextWindow": 128000, "maxOutputTokens": 16384},
            }
        elif kind == 1:
            spec = {
                "provider": "anthropic",
                "model": "claude-sonnet-4-5",
                "endpoint": "https://api.anthropic.com/v1",
                "credentials": {"secretRef": {"name": "anthropic-credentials", "key": "api-key"}},
                "limits": {"contextWindow": 200000, "maxOutputTokens": 8192},
            }
        elif kind == 2:
            spec = {
                "provider": "azure-openai",
                "model": "gpt-4o",
                "endpoint": f"https://res-{i}.openai.azure.com/openai",
                "azure": {"deployment": f"dep-{i}"},
                "credentials": {"secretRef": {"name": "azure-credentials", "key": "api-key"}},
                "pricing": {"inputPerMTok": 2.5, "outputPerMTok": 10},
            }
        else:
            spec = {
                "provider": "openai-compatible",
                "model": f"meta-llama/Llama-3.1-{8 if kind == 3 else 70}B-Instruct",
                "serviceRef": {"name": f"vllm-{i}", "port": 8000},
                "pricing": {"gpuHourlyUSD": 2.5 + i / 10, "tokensPerSecond": 2500},
                "limits": {"contextWindow": 32768},
                "headers": {"x-request-source": "kubetoll"},
                "maxConnections": 50,
            }
        backends.append(obj("ModelBackend", name, {**spec, "timeouts": timeouts}))
    backends.append(
        obj(
            "ModelBackend",
            "embeddings",
            {
                "provider": "openai",
                "model": "text-embedding-3-small",
                "endpoint": "https://api.openai.com/v1",
                "credentials": {"secretRef": {"name": "openai-credentials", "key": "api-key"}},
                "pricing": {"inputPerMTok": 0.02, "outputPerMTok": 0},
            },
        )
    )
    names = [b["metadata"]["name"] for b in backends[:-1]]

    def chain(seed: int, n: int) -> list[str]:
        return [names[(seed * 7 + k * 11) % len(names)] for k in range(n)]

    cache = []
    for i in range(n_cache):
        spec: dict[str, Any] = {
            "exact": {"enabled": True, "ttlSeconds": 3600},
            "scope": "tenant" if i % 2 else "namespace",
        }
        if i < 2:
            spec["semantic"] = {"enabled": True, "embeddingBackend": "embeddings", "threshold": 0.9}
        cache.append(obj("CachePolicy", f"cache-{i}", spec))

    routes = []
    for i in range(n_routes):
        rules: list[dict[str, Any]] = [
            {"name": "long-context", "match": {"minPromptTokens": 32000}, "backends": chain(i, 2)},
            {"name": "premium", "match": {"tiers": ["premium"]}, "backends": chain(i + 1, 3)},
        ]
        if i % 2:
            rules.append(
                {
                    "name": "team-header",
                    "match": {"header": {"name": "x-team", "value": f"team-{i % 7}"}},
                    "backends": chain(i + 2, 2),
                }
            )
        if i % 3:
            rules.append(
                {
                    "name": "code",
                    "match": {"keywords": ["python", "stack trace", "compile"]},
                    "backends": chain(i + 3, 2),
                }
            )
        rules.append({"name": "default", "backends": chain(i + 4, 3)})
        spec = {
            "modelName": f"app-{i:03d}",
            "rules": rules,
            "fallbackOn": ["rateLimited", "serverError", "timeout"],
            "maxOutputTokens": 2048,
        }
        if i % 3 == 0:
            spec["downgrade"] = {"atPercent": 80, "backends": chain(i + 5, 1)}
        if i % 4 == 0:
            spec["cachePolicy"] = f"cache-{i % n_cache}"
        routes.append(obj("ModelRoute", f"route-{i:03d}", spec))

    budgets = []
    per = max(n_routes // n_budgets, 1)
    tenant = {"header": "x-tenant", "tierHeader": "x-tier", "defaultTier": "free"}
    for i in range(n_budgets):
        budgets.append(
            obj(
                "TokenBudget",
                f"budget-{i:02d}",
                {
                    "routes": [f"route-{k:03d}" for k in range(i * per, min((i + 1) * per, n_routes))],
                    "cap": {"usdPerDay": 100 + i, "usdPerMonth": 2000 + 10 * i, "tokensPerMonth": 500_000_000},
                    "tenant": tenant,
                    "tiers": [
                        {"name": "free", "tokensPerMinute": 20000, "requestsPerMinute": 20, "usdPerDay": 1},
                        {
                            "name": "standard",
                            "tokensPerMinute": 100000,
                            "requestsPerMinute": 120,
                            "usdPerDay": 10,
                            "onExhausted": "downgrade",
                        },
                        {"name": "premium", "tokensPerMinute": 400000, "usdPerMonth": 500, "onExhausted": "allow"},
                    ],
                },
            )
        )
    return backends + cache + routes + budgets


def secret_data() -> dict[str, dict[str, str]]:
    return {name: {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()} for name, keys in SECRETS.items()}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


# --------------------------------------------------------------------------- (a) compile


def bench_compile(resources: list[dict[str, Any]], runs: int, redis_url: str) -> None:
    secrets = secret_data()
    store = BudgetStoreSettings(url=redis_url)
    times = []
    result = None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = compile_namespace(NS, resources, secrets=secrets, budget_store=store)
        times.append(time.perf_counter() - t0)
    assert result is not None
    counts = {k: sum(1 for r in resources if r["kind"] == k) for k in PLURALS}
    errors = [p for p in result.problems if p.severity == "error"]
    raw = result.config_json.encode()
    print(
        f"(a) compile_namespace: {counts['ModelRoute']} routes, {counts['ModelBackend']} backends, "
        f"{counts['TokenBudget']} budgets, {counts['CachePolicy']} cache policies"
    )
    print(
        f"    problems: {len(errors)} errors, {len(result.problems) - len(errors)} "
        f"warnings{' (' + '; '.join(map(str, errors[:3])) + ')' if errors else ''}"
    )
    c = result.config
    print(
        f"    in the config: {len(c.routes)} routes, {len(c.backends)} backends, {len(c.budgets)} budgets, "
        f"{len(c.cache_policies)} cache policies"
    )
    print(
        f"    compile time over {runs} runs: median {statistics.median(times) * 1000:.1f} ms, p95 "
        f"{pct(times, 95) * 1000:.1f} ms, min {min(times) * 1000:.1f} ms"
    )
    print(
        f"    RouterConfig JSON: {len(raw) / 1024:.1f} KiB canonical "
        f"({len(gzip.compress(raw)) / 1024:.1f} KiB gzipped); ConfigMap limit 1024 KiB"
    )


# --------------------------------------------------------------------------- (b) reaction time


def register_resources(emulator: Any) -> None:
    from kmock._internal.references import ResourceInfo, resource

    verbs = ["get", "list", "watch", "create", "update", "patch", "delete"]
    for kind, plural in PLURALS.items():
        emulator.resources[resource("kubetoll.dev", "v1alpha1", plural)] = ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True, verbs=verbs, subresources=["status"]
        )
    for kind, plural in {
        "ConfigMap": "configmaps",
        "Secret": "secrets",
        "Event": "events",
        "Namespace": "namespaces",
        "Pod": "pods",
    }.items():
        emulator.resources[resource("", "v1", plural)] = ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=kind != "Namespace", verbs=verbs
        )
    emulator.resources[resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")] = ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=verbs
    )


def path_of(kind: str, name: str | None = None) -> str:
    if kind in PLURALS:
        base = f"/apis/kubetoll.dev/v1alpha1/namespaces/{NS}/{PLURALS[kind]}"
    else:
        base = f"/api/v1/namespaces/{NS}/{kind.lower()}s"  # ConfigMap, Secret
    return f"{base}/{name}" if name else base


async def bench_reaction(resources: list[dict[str, Any]], changes: int, debounce: float) -> None:
    import kmock
    from kmock._internal import apps

    async with kmock.KubernetesEmulator() as emulator, apps.Server(emulator):
        register_resources(emulator)
        tmp = Path(tempfile.mkdtemp(prefix="kt-bench-operator-"))
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": str(emulator.url).rstrip("/")}}],
            "users": [{"name": "bench", "user": {"token": "bench-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "bench"}}],
            "current-context": "kmock",
        }
        (tmp / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        async with aiohttp.ClientSession(base_url=str(emulator.url)) as http:
            for name, keys in SECRETS.items():
                body = {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": NS},
                    "stringData": keys,
                }
                async with http.post(path_of("Secret"), json=body) as r:
                    assert r.status < 300, await r.text()
            t_apply = time.perf_counter()
            for doc in resources:
                async with http.post(path_of(doc["kind"]), json=doc) as r:
                    assert r.status < 300, await r.text()
            apply_s = time.perf_counter() - t_apply

            # The ConfigMap's versions as the operator writes them, from a watch (polling would load the emulator).
            seen: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()

            async def watch() -> None:
                url = path_of("ConfigMap") + "?watch=true"
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=None)) as r:
                    async for line in r.content:
                        if line.strip():
                            event = json.loads(line)
                            cm = event.get("object") or {}
                            if (
                                cm.get("metadata", {}).get("name") == "kubetoll-router"
                                and event.get("type") != "DELETED"
                            ):
                                await seen.put((time.perf_counter(), json.loads(cm["data"]["router.json"])))

            watcher = asyncio.create_task(watch())

            async def wait_for(pred: Any, timeout: float = 120.0) -> float:
                deadline = time.perf_counter() + timeout
                while True:
                    at, config = await asyncio.wait_for(seen.get(), max(deadline - time.perf_counter(), 0.001))
                    if pred(config):
                        return at

            # The real `kubetoll operator`, in its own process as in a cluster (standalone: no peering).
            env = {
                **os.environ,
                "KUBECONFIG": str(tmp / "kubeconfig"),
                "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("core", "sidecar", "operator", "tools")),
            }
            log_path = tmp / "operator.log"
            t_start = time.perf_counter()
            with await asyncio.to_thread(log_path.open, "w") as log_file:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    "import sys; from kubetoll_tools.cli import main; sys.exit(main())",
                    "operator",
                    "--standalone",
                    "--liveness",
                    "",
                    env=env,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                )
            try:
                first = await wait_for(
                    lambda c: len(c["routes"]) == sum(1 for r in resources if r["kind"] == "ModelRoute")
                )
                print(
                    f"(b) `kubetoll operator` on kmock: {len(resources)} objects applied in {apply_s:.1f} s; "
                    f"first config written {first - t_start:.1f} s after the operator process started"
                )
                # Let the first compile's statuses go out (each comes back as a watch event; none recompiles).
                quiet_since, count = time.perf_counter(), len(emulator._requests)
                while time.perf_counter() - quiet_since < 1.0:
                    await asyncio.sleep(0.25)
                    if len(emulator._requests) != count:
                        quiet_since, count = time.perf_counter(), len(emulator._requests)
                t0 = time.perf_counter()
                for _ in range(10):
                    async with http.get(path_of("Secret", "openai-credentials")) as r:
                        await r.read()
                per_request = (time.perf_counter() - t0) / 10

                route = next(r for r in resources if r["kind"] == "ModelRoute")
                name, model = route["metadata"]["name"], route["spec"]["modelName"]
                times, calls = [], []
                for i in range(changes):
                    value = 1000 + i
                    before = len(emulator._requests)
                    t0 = time.perf_counter()
                    patch = {"spec": {"maxOutputTokens": value}}
                    async with http.patch(
                        path_of("ModelRoute", name),
                        data=json.dumps(patch),
                        headers={"Content-Type": "application/merge-patch+json"},
                    ) as r:
                        assert r.status < 300, await r.text()
                    done = await wait_for(
                        lambda c, v=value: (
                            next(x for x in c["routes"] if x["name"] == model).get("maxOutputTokens") == v
                        )
                    )
                    times.append(done - t0)
                    await asyncio.sleep(0.3)  # its status write and the watch events settle
                    calls.append(len(emulator._requests) - before - 1)
                med = statistics.median(times)
                print(
                    f"    change -> ConfigMap written, {changes} route patches: median {med * 1000:.0f} ms, p95 "
                    f"{pct(times, 95) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
                )
                # The operator's own figures: its log line per compile says how long the compile and the whole
                # reconcile took.
                import re

                logged = [
                    tuple(map(float, m))
                    for m in re.findall(
                        r"compiled \d+ resources in (\d+) ms \((\d+) ms with the API calls\)", log_path.read_text()
                    )
                ]
                logged = logged[-changes:]
                n_calls = statistics.median(calls)
                print(
                    f"    of which: the debounce ({debounce * 1000:.0f} ms), the compile, and {n_calls:.0f} API "
                    "requests a change (reads of the referenced Secrets, the credentials Secret and the ConfigMap; the "
                    f"ConfigMap patch), each {per_request * 1000:.0f} ms on this emulator holding "
                    f"{len(resources) + len(SECRETS)} objects (kmock scans them all per request)"
                )
                if logged:
                    compile_med = statistics.median(c for c, _ in logged)
                    print(
                        f"    inside the operator (its log line per compile): compile median {compile_med:.0f} ms, "
                        f"reconcile with its API calls median {statistics.median(r for _, r in logged):.0f} ms; the "
                        "rest is the debounce and the watch events (the patch reaching kopf, the ConfigMap reaching "
                        "this watch)"
                    )
                    print(
                        f"    estimate on a real API server (~5 ms a request): {debounce * 1000:.0f} + "
                        f"{compile_med:.0f} + {n_calls:.0f} x 5 = ~{debounce * 1000 + compile_med + n_calls * 5:.0f} "
                        "ms from a change to the ConfigMap"
                    )
            finally:
                watcher.cancel()
                if proc.returncode is None:  # (asyncio's terminate() raises once the process is gone)
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 30)  # the emulator on this loop keeps answering meanwhile
                    except TimeoutError:
                        proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- (c) one spend reading


async def bench_spend(resources: list[dict[str, Any]], redis_url: str, tenants: int) -> None:
    from redis.asyncio import Redis

    from kubetoll_core.ledger_stream import period_totals
    from kubetoll_core.redis_keys import RETENTION_AFTER_PERIOD
    from kubetoll_operator import spend
    from kubetoll_sidecar.budgets.admission import BudgetMeters
    from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
    from kubetoll_sidecar.budgets.store import Hold

    result = compile_namespace(NS, resources, secrets=secret_data(), budget_store=BudgetStoreSettings(url=redis_url))
    config = result.config
    assert config is not None
    meters = BudgetMeters(config)
    first_route = {b.name: b.routes[0] for b in config.budgets}
    store = RedisBudgetStore.connect(BudgetStoreSettings(url=redis_url, timeout_ms=1000), NS, "/nonexistent")
    await store.start()
    t0 = time.perf_counter()
    now = time.time()
    tiers = ("free", "standard", "premium")
    for b in config.budgets:
        for t in range(tenants):
            ms = meters.for_request(first_route[b.name], f"tenant-{t}", tiers[t % 3], now)
            windows = [m for m in ms.usd + ms.tokens if m.kind == "window"]
            res = await store.reserve([Hold(m, 0.5 if m.unit == "usd" else 1000, enforce=False) for m in windows], now)
            await store.settle(res, {m.key: (0.5 if m.unit == "usd" else 1000) for m in windows}, now)
    await store.close(timeout=30)
    write_s = time.perf_counter() - t0

    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        readings, n_meters = [], 0
        for _ in range(10):
            t1 = time.perf_counter()
            now = time.time()
            n_meters = 0
            for b in config.budgets:
                totals = await period_totals(client, NS, b.name, min_expiry=now + RETENTION_AFTER_PERIOD["day"])
                n_meters += len(totals)
                spend.budget_report(b, totals, [50, 75, 90, 100], now, 10)
            readings.append(time.perf_counter() - t1)
    finally:
        await client.aclose()
    print(
        f"(c) spend reading, {len(config.budgets)} budgets x {tenants} tenants ({write_s:.1f} s to write through a "
        f"RedisBudgetStore): {n_meters} window meters read; median {statistics.median(readings) * 1000:.1f} ms, p95 "
        f"{pct(readings, 95) * 1000:.1f} ms per reading of the namespace "
        f"({statistics.median(readings) / max(n_meters, 1) * 1e6:.0f} µs a meter)"
    )


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--routes", type=int, default=200)
    ap.add_argument("--backends", type=int, default=50)
    ap.add_argument("--budgets", type=int, default=20)
    ap.add_argument("--cache-policies", type=int, default=5)
    ap.add_argument("--compiles", type=int, default=30, help="compile runs for (a) (default 30)")
    ap.add_argument("--changes", type=int, default=20, help="route patches timed in (b) (default 20)")
    ap.add_argument("--tenants", type=int, default=200, help="tenants per budget in (c) (default 200)")
    ap.add_argument("--no-redis", action="store_true", help="skip (c)")
    args = ap.parse_args()

    resources = generate(args.routes, args.backends, args.budgets, args.cache_policies)
    print(f"operator scale bench, python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    bench_compile(resources, args.compiles, "redis://redis.bench.svc:6379/0")
    asyncio.run(bench_reaction(resources, args.changes, 0.2))

    if args.no_redis:
        return
    url = os.environ.get("REDIS_URL")
    proc = None
    if not url:
        if shutil.which("redis-server") is None:
            print("(c) skipped: no redis-server on PATH and no REDIS_URL")
            return
        from support.redis_server import RedisProcess

        proc = RedisProcess().start()
        url = proc.url
    try:
        asyncio.run(bench_spend(resources, url, args.tenants))
    finally:
        if proc is not None:
            proc.stop()


if __name__ == "__main__":
    main()
