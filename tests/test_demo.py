"""`kubetoll demo` end to end, headless: its report's numbers are the ledger's."""

from __future__ import annotations

import asyncio
import io
from collections import defaultdict
from pathlib import Path

import pytest

from kubetoll_core.prices import resolve_price
from kubetoll_core.router_config import RouterConfig
from kubetoll_core.spend_record import NOT_REQUEST_OUTCOMES, OUTCOME_REPORTED
from kubetoll_tools import report_html, traffic
from kubetoll_tools.demo import DemoOptions, adapt_config, choose_config, pick_route, run_demo
from kubetoll_tools.spend import CACHE_BACKEND


def test_demo_headless_report_matches_ledger(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    out = io.StringIO()
    result = asyncio.run(
        run_demo(DemoOptions(duration=5, live=False, report=str(path), config_source="embedded", seed=3), out=out)
    )
    text = out.getvalue()
    assert "config: embedded demo config" in text
    assert f"report     {path}" in text
    assert "baseline" in text and "saved" in text

    page = path.read_text()
    data = report_html.extract_data(page)
    records = result.records
    assert len(records) > 10
    total = sum(r.cost_usd for r in records)
    s = data["summary"]
    assert s["totals"]["requests"] == sum(1 for r in records if r.outcome not in NOT_REQUEST_OUTCOMES)
    assert s["totals"]["cost_usd"] == pytest.approx(total, rel=1e-12)
    assert s["totals"]["prompt_tokens"] == sum(r.prompt_tokens for r in records)
    assert s["totals"]["completion_tokens"] == sum(r.completion_tokens for r in records)

    by_tenant: dict[str, float] = defaultdict(float)
    by_backend: dict[str, float] = defaultdict(float)
    for r in records:
        by_tenant[r.tenant] += r.cost_usd
        by_backend[r.backend or CACHE_BACKEND] += r.cost_usd  # cache hits group apart
    assert {g["key"]: g["cost_usd"] for g in s["by_tenant"]} == pytest.approx(dict(by_tenant), rel=1e-12)
    assert {g["key"]: g["cost_usd"] for g in s["by_backend"]} == pytest.approx(dict(by_backend), rel=1e-12)
    # The chart's buckets hold every record once.
    series = data["timeline"]["series"]
    assert {k: sum(v) for k, v in series.items()} == pytest.approx(dict(by_backend), rel=1e-9)
    # Baseline: every record's tokens at the flagship's prices, recomputed here from the config.
    cfg = RouterConfig.model_validate(choose_config(DemoOptions(config_source="embedded")).data)
    flagship = resolve_price(cfg.backend("flagship"))
    sav = s["savings"]
    assert data["meta"]["baseline_backend"] == "flagship"
    assert sav["baseline_usd"] == pytest.approx(
        sum(flagship.estimate(r.prompt_tokens, r.completion_tokens) for r in records), rel=1e-12
    )
    assert sav["actual_usd"] == pytest.approx(total, rel=1e-12)
    assert sav["cache_usd"] + sav["routing_usd"] + sav["downgrade_usd"] == pytest.approx(sav["saved_usd"], rel=1e-9)
    assert sav["cache_usd"] == pytest.approx(sum(r.avoided_usd for r in records if r.cache_hit))
    assert sav["downgrade_usd"] == pytest.approx(
        sum(
            flagship.estimate(r.prompt_tokens, r.completion_tokens) - r.cost_usd
            for r in records
            if r.downgraded and not r.cache_hit
        )
    )
    # Tenants that sent traffic all show, with the ledger's numbers.
    tenants = {t["key"]: t for t in data["tenants"]}
    for name, cost in by_tenant.items():
        assert tenants[name]["cost_usd"] == pytest.approx(cost, rel=1e-12)
    # What the clients saw agrees with the ledger: every 200 is one record, with the same cost.
    client = {r.request.request_id: r for r in result.stats.results if r.status == 200}
    assert {r.request_id for r in records} == set(client)
    for rec in records:
        if rec.outcome == OUTCOME_REPORTED:  # the outcome header of a conversation's last turn: no spend
            assert rec.cost_usd == 0 and rec.session and rec.business_outcome in ("resolved", "escalated")
            continue
        assert client[rec.request_id].cost_usd == pytest.approx(rec.cost_usd, abs=1e-9)
        if not rec.cache_hit:
            assert client[rec.request_id].backend == rec.backend

    # Self-contained: no scripts or styles from anywhere, the numbers in the page.
    assert "<svg" in page and "<link" not in page and "<img" not in page and "@import" not in page
    assert "<script src" not in page and "http://" not in page and "https://" not in page
    assert report_html.DATA_ID in page


def test_plan_is_seeded() -> None:
    a = traffic.plan(11, 30, 8)
    b = traffic.plan(11, 30, 8)
    c = traffic.plan(12, 30, 8)
    assert [(r.at, r.tenant, r.messages, r.stream) for r in a] == [(r.at, r.tenant, r.messages, r.stream) for r in b]
    assert [r.request_id for r in a] == [r.request_id for r in b]
    assert [(r.tenant, r.messages) for r in a] != [(r.tenant, r.messages) for r in c]
    kinds = {r.kind for r in a}
    assert kinds == {"faq", "paraphrase", "unique", "long"}
    assert {r.tier for r in a} == {"free", "premium"}
    assert sum(1 for r in a if r.kind == "faq") > len(a) / 3  # repeats dominate, as on a support bot


def test_examples_compile_into_a_demo_config(tmp_path: Path) -> None:
    pytest.importorskip("kubetoll_operator.compiler")
    repo_examples = Path(__file__).resolve().parents[1] / "examples"
    choice = choose_config(DemoOptions(config_source="auto", examples_dir=str(repo_examples)))
    if choice.source != "examples":
        pytest.skip(f"examples do not compile right now: {choice.notes}")
    endpoints = {b["name"]: f"http://127.0.0.1:{9000 + i}/v1" for i, b in enumerate(choice.data["backends"])}
    cfg = RouterConfig.model_validate(adapt_config(choice.data, endpoints, 17400, 17401, 0.01, tmp_path))
    assert all(b.endpoint.startswith("http://127.0.0.1:") for b in cfg.backends)
    assert all(b.credentials is None or b.credentials.env == "KUBETOLL_DEMO_API_KEY" for b in cfg.backends)
    assert cfg.budget_store.url is None
    for b in cfg.backends:
        resolve_price(b)
    assert pick_route(cfg) in {r.name for r in cfg.routes}
    original = RouterConfig.model_validate(choice.data)
    for old, new in zip(original.budgets, cfg.budgets):
        if old.cap.usd_per_day:
            assert new.cap.usd_per_day == pytest.approx(old.cap.usd_per_day * 0.01)


def test_embedded_config_is_used_when_examples_are_missing(tmp_path: Path) -> None:
    choice = choose_config(DemoOptions(config_source="auto", examples_dir=str(tmp_path / "nowhere")))
    assert choice.source == "embedded"
    assert choice.notes and "examples not used" in choice.notes[0]
    RouterConfig.model_validate(choice.data)


def test_live_view_renders() -> None:
    from collections import Counter

    from rich.console import Console

    from kubetoll_tools.live_view import BackendRow, Snapshot, TenantRow, render

    snap = Snapshot(
        elapsed=12.5,
        duration=60,
        source="embedded demo config",
        route="support-bot",
        planned=446,
        sent=90,
        in_flight=4,
        done=86,
        total_spend=0.1234,
        tenants=[
            TenantRow("acme-corp", "premium", 30, 0, 0, 2, 0.09, 72.0),
            TenantRow("bulk-importer", "free", 20, 5, 0, 0, 0.01, 100.0),
        ],
        backends=[BackendRow("flagship", "gpt-4o", 31, 0.1, 3, "open"), BackendRow("cheap", "gpt-4o-mini", 40, 0.02)],
        fallbacks=Counter({("flagship", "rateLimited"): 3}),
        rejections=Counter({("usd_tier",): 5}),
        downgrades=Counter({("at_percent",): 2}),
        cache_configured=False,
        cache_hits=0,
        ledger_records=71,
        avoided_usd=0.0,
        repeats=12,
        repeat_spend=0.02,
    )
    console = Console(record=True, width=120, color_system=None)
    console.print(render(snap))
    text = console.export_text()
    for needle in (
        "acme-corp",
        "72.0%",
        "flagship rateLimited ×3",
        "usd_tier ×5",
        "at_percent ×2",
        "caching not configured",
        "open",
        "$0.1234",
    ):
        assert needle in text, needle
    assert len(text.splitlines()) <= 30  # fits a terminal


def test_the_examples_demo_shows_a_cascade_and_a_spill_over(tmp_path: Path) -> None:
    """With examples/ (spend-less/: a cascade route, a spill-over route), part of the traffic goes to each:
    cascaded requests escalate when the cheap step runs out of max_tokens, and while the simulated vLLM
    replicas' queues are deep the spill-over route sends its requests to the hosted backend."""
    pytest.importorskip("kubetoll_operator.compiler")
    repo_examples = Path(__file__).resolve().parents[1] / "examples"
    path = tmp_path / "report.html"
    out = io.StringIO()
    opts = DemoOptions(
        duration=12, live=False, report=str(path), config_source="examples", examples_dir=str(repo_examples), seed=5
    )
    result = asyncio.run(run_demo(opts, out=out))
    events = result.data["events"]
    cascade = events["cascade"]
    assert cascade is not None and cascade["cascaded"] > 0 and 0 < cascade["escalated"] < cascade["cascaded"]
    spilled = [r for r in result.records if r.spillover]
    assert spilled and events["spillovers"] == {"llama-vllm-pool": len(spilled)}
    assert {r.route for r in spilled} == {"chat-local-first"} and all(r.backend == "gpt-4o-mini" for r in spilled)
    # Outside the busy stretch the in-cluster pool answered.
    assert any(r.route == "chat-local-first" and r.backend == "llama-vllm-pool" for r in result.records)
    text = out.getvalue()
    assert "cascade    " in text and "spill-over llama-vllm-pool" in text
    html = path.read_text()
    assert "spill-over" in html and "llama-vllm-pool: every replica" in html and "cascaded; saved" in html
    # Cost per feature and per resolved conversation, from the tags, sessions and outcomes the traffic sent.
    attr = result.data["attribution"]
    features = {g["key"]: g for g in attr["by_feature"]}
    assert {"faq", "extraction"} <= set(features)
    assert sum(g["cost_usd"] for g in features.values()) == pytest.approx(sum(r.cost_usd for r in result.records))
    outcomes = {o["outcome"]: o for o in attr["outcomes"]}
    reported = [r for r in result.records if r.outcome == "outcome_reported"]
    assert outcomes["resolved"]["count"] == sum(r.business_outcome == "resolved" for r in reported) > 0
    resolved = {r.session for r in reported if r.business_outcome == "resolved"}
    spend = sum(r.cost_usd for r in result.records if r.session in resolved)
    assert outcomes["resolved"]["cost_per_outcome_usd"] == pytest.approx(spend / outcomes["resolved"]["count"])
    assert "Cost per feature and per outcome" in html and "features   " in text and "outcomes   " in text
