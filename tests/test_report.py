"""`kubetoll report`: spend from a running sidecar's ledger equals what the requests cost."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
from collections import defaultdict
from datetime import UTC, datetime

import aiohttp
import pytest

from kubetoll_core.spend_record import SpendRecord
from kubetoll_tools import report, spend
from kubetoll_tools import tool_commands as commands
from kubetoll_tools.estimate import catalog_price
from support.harness import base_config


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetoll")
    commands.register(parser.add_subparsers())
    return parser.parse_args(["report", *argv])


def _config(sim_url: str) -> dict:
    cheap = {
        "name": "cheap",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "endpoint": sim_url + "/v1",
        "credentials": {"env": "KT_TEST_OPENAI_KEY"},
        "timeouts": {"connect": 1, "firstToken": 2, "total": 5},
    }
    cfg = base_config(sim_url)
    cfg["backends"].append(cheap)
    cfg["routes"] = [
        {
            "name": "chat",
            "rules": [{"match": {"tiers": ["premium"]}, "backends": ["primary"]}, {"backends": ["cheap"]}],
        },
        {"name": "summaries", "rules": [{"backends": ["primary"]}]},
    ]
    cfg["budgets"] = [{"name": "b", "tiers": {"free": {"usdPerDay": 100}, "premium": {"usdPerDay": 100}}}]
    cfg["tenancy"] = {"defaultTier": "free"}
    return cfg


REQUESTS = [
    # (tenant, tier, route, question, stream)
    ("acme", "premium", "chat", "How do I reset my password?", False),
    ("acme", "premium", "chat", "Where is my parcel?", False),
    ("acme", "premium", "summaries", "Summarize: the parcel arrived late and damaged.", False),
    ("bob", "free", "chat", "How do I reset my password?", False),
    ("bob", "free", "chat", "How do I reset my password?", False),
    (
        "carol",
        "free",
        "summaries",
        "Summarize: customer asks for a refund of shipping costs on a very long order history.",
        False,
    ),
    ("carol", "free", "chat", "Do you ship to Canada?", True),
]


async def _send_all(url: str) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    by_tenant: dict[str, float] = defaultdict(float)
    by_route: dict[str, float] = defaultdict(float)
    by_backend: dict[str, float] = defaultdict(float)
    async with aiohttp.ClientSession() as s:
        for tenant, tier, route, q, stream in REQUESTS:
            body = {"model": route, "messages": [{"role": "user", "content": q}], "stream": stream}
            headers = {"x-kubetoll-tenant": tenant, "x-kubetoll-tier": tier}
            async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                text = await r.text()
                backend = r.headers["x-kubetoll-backend"]
                if stream:
                    # A streamed answer's cost comes last, in an SSE comment (the headers went first).
                    line = next(x for x in text.splitlines() if x.startswith(": kubetoll cost_usd="))
                    cost = float(line.split("=")[1].split()[0])
                else:
                    cost = float(r.headers["x-kubetoll-cost-usd"])
            by_tenant[tenant] += cost
            by_route[route] += cost
            by_backend[backend] += cost
    return by_tenant, by_route, by_backend


async def test_report_totals_equal_what_requests_cost(sim, start_sidecar) -> None:
    sc = await start_sidecar(_config(sim.url))
    by_tenant, by_route, by_backend = await _send_all(sc.url)
    args = _args("--sidecar", sc.url, "--since", "1h", "--format", "json")
    rep = await report.build_report(args, datetime.now(UTC).timestamp())
    s = rep["summary"]
    assert rep["namespace"] == "test"
    assert s["totals"]["requests"] == len(REQUESTS)
    # Headers carry 9 decimals, so each request may differ by half a nano-dollar.
    tol = len(REQUESTS) * 1e-9
    assert s["totals"]["cost_usd"] == pytest.approx(sum(by_tenant.values()), abs=tol)
    assert {g["key"]: g["cost_usd"] for g in s["by_tenant"]} == pytest.approx(dict(by_tenant), abs=tol)
    assert {g["key"]: g["cost_usd"] for g in s["by_route"]} == pytest.approx(dict(by_route), abs=tol)
    assert {g["key"]: g["cost_usd"] for g in s["by_backend"]} == pytest.approx(dict(by_backend), abs=tol)
    assert {g["key"]: g["requests"] for g in s["by_tier"]} == {"premium": 3, "free": 4}
    assert {g["key"]: g["requests"] for g in s["by_tenant"]} == {"acme": 3, "bob": 2, "carol": 2}
    assert s["top_spenders"][0]["key"] == "acme"  # premium on gpt-4o: the dearest
    tenant = {g["key"]: g for g in s["by_tenant"]}
    assert tenant["bob"]["cost_per_request_usd"] == pytest.approx(by_tenant["bob"] / 2, abs=tol)
    assert tenant["acme"]["tiers"] == ["premium"]

    # Savings against gpt-4o: acme's requests all ran on gpt-4o (routing saved nothing there);
    # the free tier ran on gpt-4o-mini. Nothing was cached or downgraded.
    sav = s["savings"]
    assert sav["cache_usd"] == 0 and sav["downgrade_usd"] == 0
    assert sav["saved_usd"] == pytest.approx(sav["routing_usd"])
    assert sav["actual_usd"] == pytest.approx(s["totals"]["cost_usd"])
    assert sav["baseline_usd"] > sav["actual_usd"]

    # A window that ends before the requests holds none of them.
    rep = await report.build_report(
        _args("--sidecar", sc.url, "--since", "2h", "--until", "1h"), datetime.now(UTC).timestamp()
    )
    assert rep["summary"]["totals"]["requests"] == 0

    # The command itself: table, JSON and CSV.
    out, err = io.StringIO(), io.StringIO()
    assert (
        await asyncio.to_thread(report.run, _args("--sidecar", sc.url, "--since", "today", "--format", "csv"), out, err)
        == 0
    ), err.getvalue()
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    tenants = {r["key"]: float(r["cost_usd"]) for r in rows if r["dimension"] == "tenant"}
    assert tenants == pytest.approx(dict(by_tenant), abs=tol)
    assert {r["key"] for r in rows if r["dimension"] == "route"} == {"chat", "summaries"}
    assert any(r["dimension"] == "savings" and r["key"] == "routing" for r in rows)
    out = io.StringIO()
    assert await asyncio.to_thread(report.run, _args("--sidecar", sc.url, "--top", "2"), out, io.StringIO()) == 0
    text = out.getvalue()
    assert "Top spenders (2 of 3 tenants)" in text and "acme" in text and "By route" in text and "By tier" in text
    out = io.StringIO()
    assert (
        await asyncio.to_thread(
            report.run, _args("--sidecar", sc.url, "--format", "json", "--baseline", "none"), out, io.StringIO()
        )
        == 0
    )
    assert json.loads(out.getvalue())["summary"]["savings"] is None


def test_unreachable_sidecar_and_bad_periods() -> None:
    err = io.StringIO()
    assert report.run(_args("--sidecar", "http://127.0.0.1:9"), io.StringIO(), err) == 2
    assert "cannot reach the sidecar" in err.getvalue()
    err = io.StringIO()
    assert report.run(_args("--since", "last tuesday"), io.StringIO(), err) == 2
    assert "--since 'last tuesday'" in err.getvalue()
    err = io.StringIO()
    assert report.run(_args("--since", "1h", "--until", "2h"), io.StringIO(), err) == 2
    assert "is not after --since" in err.getvalue()


async def test_report_from_the_redis_ledger(tmp_path, sim, redis_url) -> None:
    """Records written through a sidecar whose ledger is the namespace's Redis stream."""
    if report.redis_reader() is None:
        pytest.skip("this build has no Redis ledger")
    import uuid

    from aiohttp import web

    from kubetoll_core.router_config import BudgetStoreSettings
    from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
    from kubetoll_sidecar.config_loader import load_config
    from kubetoll_sidecar.ledger_redis import RedisLedger
    from kubetoll_sidecar.server import Sidecar

    ns = f"rep{uuid.uuid4().hex[:8]}"
    cfg = _config(sim.url)
    cfg["namespace"] = ns
    path = tmp_path / "router.json"
    path.write_text(json.dumps(cfg))
    store = RedisBudgetStore.connect(BudgetStoreSettings(url=redis_url), ns, str(tmp_path), flush_interval=0.05)
    await store.start()
    sidecar = Sidecar(load_config(str(path)), store=store, ledger=RedisLedger(store, store.client), watch=False)
    await sidecar.start()
    runner = web.AppRunner(sidecar.api_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", cfg["server"]["port"]).start()
    try:
        by_tenant, by_route, _ = await _send_all(f"http://127.0.0.1:{cfg['server']['port']}")
    finally:
        await runner.cleanup()
        await sidecar.close()  # flushes the buffered records to the stream
    args = _args("--redis-url", redis_url, "--namespace", ns, "--since", "1h", "--format", "json")
    rep = await report.build_report(args, datetime.now(UTC).timestamp())
    s = rep["summary"]
    tol = len(REQUESTS) * 1e-9
    assert rep["source"].startswith("Redis ledger")
    assert s["totals"]["requests"] == len(REQUESTS)
    assert {g["key"]: g["cost_usd"] for g in s["by_tenant"]} == pytest.approx(dict(by_tenant), abs=tol)
    assert {g["key"]: g["cost_usd"] for g in s["by_route"]} == pytest.approx(dict(by_route), abs=tol)
    # Another namespace's stream is another ledger.
    rep = await report.build_report(
        _args("--redis-url", redis_url, "--namespace", ns + "x", "--since", "1h"), datetime.now(UTC).timestamp()
    )
    assert rep["summary"]["totals"]["requests"] == 0


def test_redis_arguments_and_unreachable_redis() -> None:
    err = io.StringIO()
    assert report.run(_args("--redis-url", "redis://127.0.0.1:6379"), io.StringIO(), err) == 2
    assert "--namespace" in err.getvalue()
    if report.redis_reader() is None:
        err = io.StringIO()
        assert report.run(_args("--redis-url", "redis://127.0.0.1:9", "--namespace", "demo"), io.StringIO(), err) == 2
        assert "not available" in err.getvalue()
        return
    err = io.StringIO()
    assert report.run(_args("--redis-url", "redis://127.0.0.1:9/0", "--namespace", "demo"), io.StringIO(), err) == 2
    assert "cannot read the ledger from Redis" in err.getvalue()
    err = io.StringIO()
    assert (
        report.run(_args("--redis-url", "redis://user:pw@127.0.0.1:9/0", "--namespace", "demo"), io.StringIO(), err)
        == 2
    )
    assert "credentials" in err.getvalue()
    err = io.StringIO()
    assert (
        report.run(_args("--redis-url", "redis://127.0.0.1:9/0", "--namespace", "Not_A_Name"), io.StringIO(), err) == 2
    )
    assert "namespace" in err.getvalue()


def test_parse_when() -> None:
    tz = UTC
    now = datetime(2026, 11, 22, 15, 30, tzinfo=tz).timestamp()
    assert report.parse_when("today", now, tz) == datetime(2026, 11, 22, tzinfo=tz).timestamp()
    assert report.parse_when("yesterday", now, tz) == datetime(2026, 11, 21, tzinfo=tz).timestamp()
    assert report.parse_when("this-month", now, tz) == datetime(2026, 11, 1, tzinfo=tz).timestamp()
    assert report.parse_when("last-month", now, tz) == datetime(2026, 10, 1, tzinfo=tz).timestamp()
    assert report.parse_when("24h", now, tz) == now - 86400
    assert report.parse_when("90m", now, tz) == now - 5400
    assert report.parse_when("2026-11-01", now, tz) == datetime(2026, 11, 1, tzinfo=tz).timestamp()
    assert report.parse_when("2026-11-01T09:30Z", now, tz) == datetime(2026, 11, 1, 9, 30, tzinfo=tz).timestamp()
    assert report.parse_when("1763800000", now, tz) == 1763800000.0
    with pytest.raises(report.ReportError):
        report.parse_when("soon", now, tz)


def test_savings_split_adds_up() -> None:
    price = catalog_price("gpt-4o")
    recs = [
        SpendRecord(1.0, "n", "chat", "flagship", "a", "premium", 100, 50, 0, price.estimate(100, 50)),
        SpendRecord(2.0, "n", "chat", "cheap", "b", "free", 100, 50, 0, 0.00004),
        SpendRecord(3.0, "n", "chat", "gpu", "a", "premium", 100, 50, 0, 0.00002, downgraded=True),
        SpendRecord(4.0, "n", "chat", "", "b", "free", 100, 50, 0, 0.0, cache_hit="exact", avoided_usd=0.00004),
    ]
    s = spend.savings(recs, price, "gpt-4o")
    base = price.estimate(100, 50)
    assert s.baseline_usd == pytest.approx(4 * base)
    assert s.cache_usd == pytest.approx(0.00004)
    assert s.downgrade_usd == pytest.approx(base - 0.00002)
    assert s.routing_usd == pytest.approx(
        (base - 0.00004) + (base - 0.00004)
    )  # cheap, and the cache hit's routing share
    assert s.cache_usd + s.routing_usd + s.downgrade_usd == pytest.approx(s.saved_usd)
    groups = {g.key: g for g in spend.group_by(recs, "backend")}
    assert groups[spend.CACHE_BACKEND].cache_hits == 1
