"""`kubetoll report --by`: a pivot over a Redis ledger whose every cell equals a sum over the records written."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from kubetoll_core.router_config import BudgetStoreSettings
from kubetoll_core.spend_record import CACHE_EMBEDDING_OUTCOME, OUTCOME_REPORTED, SpendRecord
from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
from kubetoll_sidecar.ledger_redis import RedisLedger
from kubetoll_tools import report
from kubetoll_tools import tool_commands as commands

# 23:30 UTC: already the next day in Berlin, so `day` depends on --tz.
T0 = datetime(2026, 11, 18, 23, 30, tzinfo=UTC).timestamp()
HOUR = 3600.0


def _rec(i: int, **kw) -> SpendRecord:
    fields = dict(
        time=T0,
        namespace="shop",
        route="chat",
        backend="cheap",
        tenant="acme",
        tier="premium",
        prompt_tokens=100 + 10 * i,
        completion_tokens=20 + i,
        cached_tokens=0,
        cost_usd=0.0001 * (i + 1),
        request_id=f"req-{i}",
        model="gpt-4o-mini",
    )
    return SpendRecord(**{**fields, **kw})


def ledger_records(ns: str) -> list[SpendRecord]:
    """A period's ledger: tags, sessions, outcomes, models, cache hits and three days."""
    recs = [
        _rec(0, tags="feature=search,team=growth", session="s1", workload="Deployment/search-api"),
        _rec(1, tags="feature=search,team=growth", session="s1", time=T0 + HOUR, workload="Deployment/search-api"),
        _rec(2, tags="feature=search", backend="gpu", model="llama", session="s2", tenant="bob", tier="free"),
        _rec(3, tags="feature=support,team=care", route="summaries", session="s2", tenant="bob", tier="free"),
        _rec(4, tags="feature=support", session="s3", time=T0 - 24 * HOUR, downgraded=True, backend="gpu"),
        _rec(5, backend="", model="", cost_usd=0.0, cache_hit="exact", avoided_usd=0.0004, session="s3"),
        _rec(6, tags="feature=search", request_id="solo", time=T0 + 2 * HOUR),
        _rec(7, backend="embed", model="text-embedding-3-small", outcome=CACHE_EMBEDDING_OUTCOME, cost_usd=1e-6),
        _rec(8, backend="cheap", model="", tenant="carol", tier="free", cached_tokens=50),  # an older sidecar
        _rec(9, tags="feature=search,team=growth", session="s4", time=T0 - 24 * HOUR, cost_usd=0.002),
        # Outcome records: s1 resolved; s2 resolved and escalated; the request "solo" converted.
        _rec(10, backend="", model="", cost_usd=0.0, prompt_tokens=0, completion_tokens=0, outcome=OUTCOME_REPORTED,
             business_outcome="resolved", session="s1", request_id=""),
        _rec(11, backend="", model="", cost_usd=0.0, prompt_tokens=0, completion_tokens=0, outcome=OUTCOME_REPORTED,
             business_outcome="resolved", session="s2", request_id="", tenant="bob", tier="free"),
        _rec(12, backend="", model="", cost_usd=0.0, prompt_tokens=0, completion_tokens=0, outcome=OUTCOME_REPORTED,
             business_outcome="escalated", session="s2", request_id="", tenant="bob", tier="free"),
        _rec(13, backend="", model="", cost_usd=0.0, prompt_tokens=0, completion_tokens=0, outcome=OUTCOME_REPORTED,
             business_outcome="converted", request_id="solo"),
    ]  # fmt: skip
    return [SpendRecord(**{**r.to_dict(), "namespace": ns}) for r in recs]


async def write_ledger(redis_url: str, ns: str, records: list[SpendRecord]) -> None:
    """Records written as a sidecar writes them: the Redis budget store's flusher and its Lua script."""
    store = RedisBudgetStore.connect(
        BudgetStoreSettings(url=redis_url), ns, "/nonexistent", sidecar_id=f"sc-{uuid.uuid4().hex[:8]}"
    )
    ledger = RedisLedger(store, store.client)
    await store.start()
    for r in records:
        ledger.append(r)
    await store.close(timeout=10)


def report_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetoll")
    commands.register(parser.add_subparsers())
    return parser.parse_args(["report", *argv])


def window(redis_url: str, ns: str) -> tuple[str, ...]:
    return ("--redis-url", redis_url, "--namespace", ns, "--since", str(T0 - 3 * 86400), "--until", str(T0 + 86400))


async def run_report(*argv: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    assert await asyncio.to_thread(report.run, report_args(*argv), out, err) == 0, err.getvalue()
    return out.getvalue()


@pytest.fixture
async def ledger(redis_url):
    if report.redis_reader() is None:
        pytest.skip("this build has no Redis ledger")
    ns = f"pv{uuid.uuid4().hex[:8]}"
    recs = ledger_records(ns)
    await write_ledger(redis_url, ns, recs)
    return redis_url, ns, recs


# ----------------------------------------------------------------- the expected pivot, computed independently


def _outcome_key(recs: list[SpendRecord]) -> Callable[[SpendRecord], str]:
    per_session: dict[str, set[str]] = defaultdict(set)
    per_request: dict[str, set[str]] = defaultdict(set)
    for r in recs:
        if r.business_outcome:
            (per_session[r.session] if r.session else per_request[r.request_id]).add(r.business_outcome)
    return lambda r: (
        "+".join(sorted(per_session.get(r.session, set()) | per_request.get(r.request_id, set()))) or ("(none)")
    )


def _tag(r: SpendRecord, key: str) -> str:
    pairs = dict(p.split("=", 1) for p in r.tags.split(",")) if r.tags else {}
    return pairs.get(key, "(untagged)")


def expected(recs: list[SpendRecord], dims: list[str], tz=UTC) -> dict[tuple[str, ...], dict]:
    outcome = _outcome_key(recs)
    fixed = {
        "tenant": lambda r: r.tenant,
        "route": lambda r: r.route,
        "backend": lambda r: r.backend or "(cache)",
        "model": lambda r: r.model if r.model else ("(unknown)" if r.backend else "(cache)"),
        "tier": lambda r: r.tier,
        "workload": lambda r: r.workload or "(unknown)",
        "session": lambda r: r.session or "(none)",
        "outcome": outcome,
        "day": lambda r: datetime.fromtimestamp(r.time, tz).strftime("%Y-%m-%d"),
    }
    cells: dict[tuple[str, ...], dict] = {}
    for r in recs:
        key = tuple(fixed[d](r) if d in fixed else _tag(r, d.removeprefix("tag:")) for d in dims)
        c = cells.setdefault(key, {"requests": 0, "cost_usd": 0.0, "prompt_tokens": 0, "completion_tokens": 0,
                                   "cache_hits": 0, "downgraded": 0, "sessions": set(), "session_cost": 0.0})  # fmt: skip
        c["requests"] += r.outcome not in (OUTCOME_REPORTED, CACHE_EMBEDDING_OUTCOME)
        c["cost_usd"] += r.cost_usd
        c["prompt_tokens"] += r.prompt_tokens
        c["completion_tokens"] += r.completion_tokens
        c["cache_hits"] += bool(r.cache_hit)
        c["downgraded"] += r.downgraded
        if r.session:
            c["sessions"].add(r.session)
            c["session_cost"] += r.cost_usd
    return cells


FIXED = ("tenant", "route", "backend", "model", "tier", "workload", "session", "outcome", "day")


def labels(dims: list[str]) -> list[str]:
    """Column labels: a tag's key, "tag:KEY" only for a key named like a fixed dimension."""
    return [d[4:] if d.startswith("tag:") and d[4:] not in FIXED else d for d in dims]


def assert_pivot_equals_ledger(pivot: dict, recs: list[SpendRecord], dims: list[str], tz=UTC) -> None:
    want = expected(recs, dims, tz)
    assert pivot["by"] == labels(dims)
    assert pivot["total_rows"] == len(want) == len(pivot["rows"])
    got = {tuple(row["keys"][d] for d in labels(dims)): row for row in pivot["rows"]}
    assert set(got) == set(want)
    for key, cell in want.items():
        row = got[key]
        for field in ("requests", "prompt_tokens", "completion_tokens", "cache_hits", "downgraded"):
            assert row[field] == cell[field], (key, field)
        assert row["cost_usd"] == pytest.approx(cell["cost_usd"], abs=1e-12), key
        assert row["sessions"] == len(cell["sessions"]), key
        if cell["sessions"]:
            assert row["cost_per_session_usd"] == pytest.approx(cell["session_cost"] / len(cell["sessions"]))
        else:
            assert row["cost_per_session_usd"] is None
    costs = [row["cost_usd"] for row in pivot["rows"]]
    assert costs == sorted(costs, reverse=True)  # dearest first
    assert sum(costs) == pytest.approx(sum(r.cost_usd for r in recs), abs=1e-12)


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "by",
    [
        "feature,model",
        "tenant,route,backend,model,tier,workload,session,outcome,day,feature,team",
        "outcome",
        "session",
        "tag:team,day",
        "model,tag:tenant",
    ],
)
async def test_every_pivot_cell_equals_the_ledger(ledger, by) -> None:
    redis_url, ns, recs = ledger
    rep = json.loads(await run_report(*window(redis_url, ns), "--by", by, "--format", "json", "--tz", "UTC"))
    dims = by.split(",")
    assert rep["by"] == labels(dims)
    assert_pivot_equals_ledger(rep["pivot"], recs, dims)
    assert rep["pivot"]["omitted"] is None  # JSON: every row unless --top is given


async def test_day_is_the_date_in_the_timezone_asked_for(ledger) -> None:
    redis_url, ns, recs = ledger
    for tz in ("UTC", "Europe/Berlin", "America/New_York"):
        rep = json.loads(await run_report(*window(redis_url, ns), "--by", "day", "--format", "json", "--tz", tz))
        assert_pivot_equals_ledger(rep["pivot"], recs, ["day"], ZoneInfo(tz))
    berlin = json.loads(await run_report(*window(redis_url, ns), "--by", "day", "--format", "json", "--tz", "Europe/Berlin"))  # fmt: skip
    # 23:30 UTC on the 18th is 00:30 on the 19th in Berlin.
    assert {row["keys"]["day"] for row in berlin["pivot"]["rows"]} == {"2026-11-18", "2026-11-19"}


async def test_outcome_rows_and_cost_per_outcome(ledger) -> None:
    redis_url, ns, recs = ledger
    rep = json.loads(await run_report(*window(redis_url, ns), "--by", "outcome", "--format", "json"))
    rows = {row["keys"]["outcome"]: row for row in rep["pivot"]["rows"]}
    # s1 reported resolved; s2 resolved and escalated (its records count once, under both names);
    # the request "solo" converted; everything else reported nothing.
    assert set(rows) == {"resolved", "escalated+resolved", "converted", "(none)"}
    s1 = sum(r.cost_usd for r in recs if r.session == "s1")
    assert rows["resolved"]["cost_usd"] == pytest.approx(s1)
    assert rows["resolved"]["sessions"] == 1 and rows["resolved"]["cost_per_session_usd"] == pytest.approx(s1)
    assert rows["converted"]["cost_usd"] == pytest.approx(sum(r.cost_usd for r in recs if r.request_id == "solo"))
    # Cost per outcome name (spend.outcome_costs): resolved by two conversations, s1's and s2's spend.
    per = {o["outcome"]: o for o in rep["summary"]["outcomes"]}
    s2 = sum(r.cost_usd for r in recs if r.session == "s2")
    assert per["resolved"]["count"] == 2 and per["resolved"]["spend_usd"] == pytest.approx(s1 + s2)
    assert per["resolved"]["cost_per_outcome_usd"] == pytest.approx((s1 + s2) / 2)
    totals = rep["summary"]["totals"]
    in_sessions = [r for r in recs if r.session]
    assert totals["sessions"] == 4
    assert totals["cost_per_session_usd"] == pytest.approx(sum(r.cost_usd for r in in_sessions) / 4)

    text = await run_report(*window(redis_url, ns), "--by", "outcome")
    assert "By outcome" in text and "Cost per outcome" in text and "escalated+resolved" in text
    assert "4 sessions" in text
    # The default tables show the outcome section too.
    assert "Cost per outcome" in await run_report(*window(redis_url, ns))


async def test_top_limits_rows_and_the_rest_still_adds_up(ledger) -> None:
    redis_url, ns, recs = ledger
    total = sum(r.cost_usd for r in recs)
    full = json.loads(await run_report(*window(redis_url, ns), "--by", "session,model", "--format", "json"))["pivot"]
    rep = json.loads(await run_report(*window(redis_url, ns), "--by", "session,model", "--format", "json", "--top", "2"))  # fmt: skip
    p = rep["pivot"]
    assert p["rows"] == full["rows"][:2] and p["total_rows"] == full["total_rows"] > 2
    assert p["omitted"]["rows"] == full["total_rows"] - 2
    assert p["omitted"]["cost_usd"] == pytest.approx(sum(row["cost_usd"] for row in full["rows"][2:]))
    assert p["omitted"]["requests"] == sum(row["requests"] for row in full["rows"][2:])
    assert sum(row["cost_usd"] for row in p["rows"]) + p["omitted"]["cost_usd"] == pytest.approx(total)

    text = await run_report(*window(redis_url, ns), "--by", "session,model", "--top", "2")
    assert f"By session × model (top 2 of {p['total_rows']} rows)" in text
    assert f"… and {p['omitted']['rows']} more rows: {p['omitted']['requests']} requests" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("session"))
    assert lines[header].split()[:3] == ["session", "model", "requests"]
    end = next(i for i, line in enumerate(lines) if line.startswith("…"))
    assert end == header + 2 + 2  # the header, its rule, two rows, then the line for the rest

    rows = list(csv.DictReader(io.StringIO(await run_report(*window(redis_url, ns), "--by", "session,model", "--format", "csv", "--top", "2"))))  # fmt: skip
    assert len(rows) == 3 and rows[-1]["session"] == f"(other {p['omitted']['rows']} rows)"
    assert sum(float(row["cost_usd"]) for row in rows) == pytest.approx(total)

    # A table shows 10 rows unless told; JSON and CSV every row.
    assert full["total_rows"] > 10
    text = await run_report(*window(redis_url, ns), "--by", "session,model")
    assert f"(top 10 of {full['total_rows']} rows)" in text and f"… and {full['total_rows'] - 10} more rows" in text
    rows = list(csv.DictReader(io.StringIO(await run_report(*window(redis_url, ns), "--by", "session,model", "--format", "csv"))))  # fmt: skip
    assert len(rows) == full["total_rows"]


async def test_a_tag_no_record_carries_is_pointed_out(ledger) -> None:
    redis_url, ns, _ = ledger
    text = await run_report(*window(redis_url, ns), "--by", "feture")
    assert "note: no record in the period carries the tag 'feture'" in text and "(untagged)" in text
    rep = json.loads(await run_report(*window(redis_url, ns), "--by", "feture,feature", "--format", "json"))
    assert rep["pivot"]["missing_tags"] == ["feture"]


async def test_csv_and_json_shapes(ledger) -> None:
    redis_url, ns, recs = ledger
    rep = json.loads(await run_report(*window(redis_url, ns), "--by", "feature,tenant", "--format", "json"))
    assert set(rep) >= {"namespace", "source", "since", "until", "by", "summary", "pivot"}
    assert set(rep["pivot"]) == {"by", "rows", "total_rows", "omitted", "missing_tags"}
    row = rep["pivot"]["rows"][0]
    assert set(row["keys"]) == {"feature", "tenant"}
    assert {"requests", "cost_usd", "cost_per_request_usd", "cache_hits", "avoided_usd", "downgraded", "sessions",
            "cost_per_session_usd"} <= set(row)  # fmt: skip

    text = await run_report(*window(redis_url, ns), "--by", "feature,tenant", "--format", "csv")
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames[:4] == ["feature", "tenant", "requests", "prompt_tokens"]
    assert reader.fieldnames[-2:] == ["sessions", "cost_per_session_usd"]
    rows = list(reader)
    assert [(r["feature"], r["tenant"]) for r in rows] == [
        (x["keys"]["feature"], x["keys"]["tenant"]) for x in rep["pivot"]["rows"]
    ]
    for r, x in zip(rows, rep["pivot"]["rows"]):
        assert float(r["cost_usd"]) == x["cost_usd"] and int(r["requests"]) == x["requests"]

    # Without --by: the JSON has no pivot and the CSV keeps its per-dimension rows.
    rep = json.loads(await run_report(*window(redis_url, ns), "--format", "json"))
    assert rep["pivot"] is None and rep["by"] == list(report.DIMENSIONS)
    rows = list(csv.DictReader(io.StringIO(await run_report(*window(redis_url, ns), "--format", "csv"))))
    assert {r["dimension"] for r in rows} == {"total", "tenant", "route", "backend", "tier", "workload", "savings"}


async def test_one_dimension_looks_like_the_old_table(ledger) -> None:
    redis_url, ns, recs = ledger
    text = await run_report(*window(redis_url, ns), "--by", "tenant")
    assert "Top spenders (3 of 3 tenants)" in text and "By route" not in text
    text = await run_report(*window(redis_url, ns), "--by", "route")
    assert "By route" in text and "Top spenders" not in text
    header = next(line for line in text.splitlines() if line.lstrip().startswith("route"))
    assert header.split()[:4] == ["route", "requests", "input", "tok"]


def test_unknown_dimension_is_refused_before_reading_anything() -> None:
    for by, shown in (("tenant,Not A Key", "'Not A Key'"), ("tag:", "'tag:'"), ("model,9lives", "'9lives'")):
        err = io.StringIO()
        # The sidecar address answers nothing: the error must come from --by, before any read.
        assert report.run(report_args("--sidecar", "http://127.0.0.1:9", "--by", by), io.StringIO(), err) == 2
        assert f"--by {shown}" in err.getvalue() and "tenant, route, backend, model" in err.getvalue(), err.getvalue()
    err = io.StringIO()
    assert report.run(report_args("--sidecar", "http://127.0.0.1:9", "--top", "0"), io.StringIO(), err) == 2
    assert "--top must be at least 1" in err.getvalue()


async def test_html_format_through_the_cli_carries_the_ledgers_figures(ledger) -> None:
    """`kubetoll report --format html` end to end: the page's embedded figures are the ledger's."""
    from kubetoll_tools.report_html import extract_data

    redis_url, ns, recs = ledger
    page = await run_report(*window(redis_url, ns), "--format", "html", "--tz", "UTC")
    assert page.lstrip().lower().startswith("<!doctype html>")
    data = extract_data(page)
    assert data["meta"]["namespace"] == ns and data["meta"]["tz"] == "UTC"
    assert data["meta"]["source"].startswith("Redis ledger at ")
    total = sum(r.cost_usd for r in recs)
    assert data["summary"]["totals"]["cost_usd"] == pytest.approx(total)
    assert "feature" in " ".join(data["dimensions"])  # the tag key's chart
