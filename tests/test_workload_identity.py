"""Workload identity: who spends is known, not claimed.

The injector gives the sidecar its pod's namespace, name and ServiceAccount (downward
API) and the workload it derived at admission (`KUBETOLL_WORKLOAD`,
tests/test_webhook_injection.py checks that side). Here: the sidecar reads and checks
them, every ledger record it writes carries the workload (spend, streams, cache hits,
refusals; in Redis, through a real redis-server), so do the access log and the metrics,
and `kubetoll report --by workload` sums spend per workload.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import logging
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetoll_core.ledger_stream import iter_ledger, read_ledger
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.spend_record import SpendRecord, decode_record, encode_record, encode_record_checked
from kubetoll_sidecar.workload import WorkloadIdentity
from kubetoll_tools import report
from kubetoll_tools import tool_commands as commands
from support.harness import RunningSidecar, base_config

SEARCH_API = {
    "KUBETOLL_POD_NAMESPACE": "shop",
    "KUBETOLL_POD_NAME": "search-api-7d9c6b5f4-x2x9q",
    "KUBETOLL_POD_SERVICE_ACCOUNT": "search",
    "KUBETOLL_WORKLOAD": "Deployment/search-api",
}
IDENTITY_VARS = (*SEARCH_API, "HOSTNAME")


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Exactly `env` for the identity variables (a sidecar reads them when it is made)."""
    for name in IDENTITY_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


# --------------------------------------------------------------------------- reading the environment


def test_the_identity_comes_from_the_injected_environment() -> None:
    assert WorkloadIdentity.from_env(SEARCH_API) == WorkloadIdentity(
        "shop", "search-api-7d9c6b5f4-x2x9q", "search", "Deployment/search-api"
    )
    # Outside a pod (`kubetoll run`): the pod name is the host name, the rest unknown.
    assert WorkloadIdentity.from_env({"HOSTNAME": "laptop-7"}) == WorkloadIdentity(pod="laptop-7")
    assert WorkloadIdentity.from_env({}) == WorkloadIdentity()
    # The downward API's name wins over HOSTNAME (a pod's spec.hostname may differ from its name).
    assert WorkloadIdentity.from_env({"HOSTNAME": "h", "KUBETOLL_POD_NAME": "p"}).pod == "p"


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("KUBETOLL_WORKLOAD", "Deployment/search-api\nkubetoll_cost_usd_total 1e9", "not Kind/name"),
        ("KUBETOLL_WORKLOAD", "orders", "not Kind/name"),
        ("KUBETOLL_WORKLOAD", "Deployment/", "not Kind/name"),
        ("KUBETOLL_WORKLOAD", "Deployment/a b", "not Kind/name"),
        ("KUBETOLL_WORKLOAD", "Deployment/" + "x" * 243, "longer than 253 characters"),
        ("KUBETOLL_POD_NAME", "pod\r\nname", "not a plain name"),
        ("KUBETOLL_POD_NAMESPACE", "n" * 254, "longer than 253 characters"),
        ("KUBETOLL_POD_SERVICE_ACCOUNT", 'sa",workload="x', "not a plain name"),
    ],
)
def test_a_value_that_cannot_go_into_records_and_labels_is_dropped_with_a_warning(
    name: str, value: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kubetoll.sidecar")
    identity = WorkloadIdentity.from_env({**SEARCH_API, name: value})
    field = {
        "KUBETOLL_WORKLOAD": "workload",
        "KUBETOLL_POD_NAME": "pod",
        "KUBETOLL_POD_NAMESPACE": "namespace",
        "KUBETOLL_POD_SERVICE_ACCOUNT": "service_account",
    }[name]
    # That one is left out; the others are as given.
    assert identity == replace(WorkloadIdentity.from_env(SEARCH_API), **{field: ""})
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert name in warning and why in warning
    assert value not in warning  # not echoed: it may be long, or hold a line break


# --------------------------------------------------------------------------- the ledger codec


def record(**kw: Any) -> SpendRecord:
    base: dict[str, Any] = dict(
        time=1_790_000_000.5,
        namespace="shop",
        route="chat",
        backend="primary",
        tenant="acme",
        tier="free",
        prompt_tokens=12,
        completion_tokens=34,
        cached_tokens=0,
        cost_usd=0.000123,
        request_id="req-1",
    )
    return SpendRecord(**{**base, **kw})


def test_the_workload_round_trips_through_the_ledger_codec() -> None:
    r = record(workload="CronJob/nightly-report")
    fields, defects = encode_record_checked(r, "sc-1")
    assert defects == ()
    entry = dict(zip(fields[::2], fields[1::2]))
    assert entry["workload"] == "CronJob/nightly-report"
    assert decode_record(entry) == r
    # Without one the entry is as before (no empty field), and an entry written before the
    # field existed decodes as "no workload".
    old = dict(zip(*[iter(encode_record(record(), "sc-1"))] * 2))
    assert "workload" not in old
    assert decode_record(old).workload == "" and decode_record(old) == record()
    # The codec's defect check covers it like every other text field.
    fields, defects = encode_record_checked(record(workload="Deployment/a\udcff"), "sc-1")
    assert defects == ("workload",)
    assert dict(zip(fields[::2], fields[1::2]))["workload"] == "Deployment/a\\udcff"


# --------------------------------------------------------------------------- a running sidecar


async def chat(session: aiohttp.ClientSession, url: str, content: str, **extra: Any) -> tuple[int, float, str]:
    """(status, the cost the sidecar reported, the error code or "")."""
    body = {"model": "chat", "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}
    async with session.post(url + "/v1/chat/completions", json=body, headers={"x-kubetoll-tenant": "acme"}) as r:
        text = await r.text()
        if r.status != 200:
            return r.status, 0.0, json.loads(text)["error"]["code"] or ""
        if extra.get("stream"):
            # A stream's cost comes last, in an SSE comment (the headers went first).
            line = next(x for x in text.splitlines() if x.startswith(": kubetoll cost_usd="))
            return r.status, float(line.split("=")[1].split()[0]), ""
        return r.status, float(r.headers["x-kubetoll-cost-usd"]), ""


def redis_config(sim_url: str, redis_url: str, ns: str, state_dir: Path, **extra: Any) -> dict[str, Any]:
    state_dir.mkdir(parents=True, exist_ok=True)
    cfg = base_config(sim_url, namespace=ns, budgetStore={"url": redis_url, "timeoutMs": 1000}, **extra)
    cfg["server"]["stateDir"] = str(state_dir)
    return cfg


async def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name → [(labels, value)] from a sidecar's /metrics."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((sample.labels, sample.value))
    return out


async def test_a_sidecar_attributes_all_its_spend_to_its_workload(
    sim: Any, redis_url: str, r: Any, ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    use_env(monkeypatch, {**SEARCH_API, "KUBETOLL_POD_NAMESPACE": ns})
    caplog.set_level(logging.INFO, logger="kubetoll.access")
    cfg = redis_config(
        sim.url,
        redis_url,
        ns,
        tmp_path / "state",
        cachePolicies=[{"name": "faq", "scope": "namespace", "exact": {"enabled": True, "ttlSeconds": 600}}],
        # Small enough that a few answers use it up: the next request is refused on the cap.
        budgets=[{"name": "b", "routes": ["chat"], "cap": {"usdPerDay": 0.002}, "capOnExhausted": "reject"}],
    )
    cfg["routes"][0]["cachePolicy"] = "faq"
    sc = await RunningSidecar(tmp_path, cfg).start()
    costs: list[float] = []
    try:
        async with aiohttp.ClientSession() as s:
            status, cost, _ = await chat(s, sc.url, "How do I reset my password?", max_tokens=40)
            assert status == 200
            costs.append(cost)
            assert sc.sidecar is not None and sc.sidecar.cache is not None
            await sc.sidecar.cache.drain()  # the cache store is fire-and-forget
            status, cost, _ = await chat(s, sc.url, "How do I reset my password?", max_tokens=40)  # a hit
            assert status == 200 and cost == 0
            status, cost, _ = await chat(s, sc.url, "Where is my parcel?", max_tokens=40, stream=True)
            assert status == 200
            costs.append(cost)
            for i in range(40):  # until the cap refuses: each answer spends about a tenth of it
                status, cost, code = await chat(s, sc.url, f"Question number {i}?", max_tokens=40)
                costs.append(cost)
                if status == 429:
                    assert code == "budget_exhausted"
                    break
            else:
                raise AssertionError("the cap never refused")
        metrics = await scrape(sc.ops_url)
    finally:
        await sc.stop()  # writes the buffered records to the stream

    # Who this sidecar is, for a join on the pod (and the namespace and workload).
    assert metrics["kubetoll_sidecar_info"] == [
        (
            {
                "namespace": ns,
                "pod": "search-api-7d9c6b5f4-x2x9q",
                "service_account": "search",
                "workload": "Deployment/search-api",
            },
            1.0,
        )
    ]
    spend = metrics["kubetoll_cost_usd_total"]
    assert spend and {labels["workload"] for labels, _ in spend} == {"Deployment/search-api"}
    assert sum(v for _, v in spend) == pytest.approx(sum(costs), abs=len(costs) * 1e-9)

    # Every record in the namespace's Redis ledger: the billed answers, the stream, the cache hit, the refusal.
    records = [rec async for rec in iter_ledger(r, ns, refusals=True)]
    assert {rec.workload for rec in records} == {"Deployment/search-api"}
    assert any(rec.cache_hit == "exact" for rec in records)
    assert any(rec.refusal and rec.refused_meter.startswith("cap:usd:") for rec in records)
    spent = [rec for rec in records if not rec.refusal]
    assert sum(rec.cost_usd for rec in spent) == pytest.approx(sum(costs), abs=len(costs) * 1e-9)
    # The stream entries themselves carry the field (what other readers of the stream see).
    entries = await r.xrange(RedisKeys(ns).ledger())
    assert entries and all(fields["workload"] == "Deployment/search-api" for _, fields in entries)

    # And the access line of every request.
    access = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "kubetoll.access"]
    assert len(access) == 3 + len(costs) - 2
    assert {line["workload"] for line in access} == {"Deployment/search-api"}


async def test_a_sidecar_outside_a_pod_records_no_workload(
    sim: Any, monkeypatch: pytest.MonkeyPatch, start_sidecar: Any
) -> None:
    use_env(monkeypatch, {"HOSTNAME": "laptop-7"})
    sc = await start_sidecar(base_config(sim.url))
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, sc.url, "hello"))[0] == 200
    (rec,) = list(sc.sidecar.ledger.records())
    assert rec.workload == ""
    # The config's namespace stands in for the missing KUBETOLL_POD_NAMESPACE.
    assert (await scrape(sc.ops_url))["kubetoll_sidecar_info"] == [
        ({"namespace": "test", "pod": "laptop-7", "service_account": "", "workload": ""}, 1.0)
    ]


# --------------------------------------------------------------------------- kubetoll report --by workload


def report_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetoll")
    commands.register(parser.add_subparsers())
    return parser.parse_args(["report", *argv])


async def test_report_by_workload_sums_each_workloads_spend(
    sim: Any, redis_url: str, r: Any, ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three sidecars of one namespace: two injected ones with their workloads, one without (`kubetoll run`)."""
    workloads = {"search": "Deployment/search-api", "nightly": "CronJob/nightly-report", "run": ""}
    spent: dict[str, float] = defaultdict(float)
    for i, (who, workload) in enumerate(workloads.items()):
        use_env(monkeypatch, {"KUBETOLL_POD_NAMESPACE": ns, "KUBETOLL_WORKLOAD": workload} if workload else {})
        (tmp_path / who).mkdir()
        sc = await RunningSidecar(
            tmp_path / who, redis_config(sim.url, redis_url, ns, tmp_path / who / "state")
        ).start()
        try:
            async with aiohttp.ClientSession() as s:
                for n in range(i + 1):
                    status, cost, _ = await chat(s, sc.url, f"{who} asks question {n}")
                    assert status == 200
                    spent[workload or "(unknown)"] += cost
        finally:
            await sc.stop()
    assert len(await read_ledger(r, ns)) == 6

    args = report_args("--redis-url", redis_url, "--namespace", ns, "--since", "1h", "--by", "workload")
    rep = await report.build_report(args, time.time())
    by_workload = {g["key"]: (g["requests"], g["cost_usd"]) for g in rep["summary"]["by_workload"]}
    assert {k: n for k, (n, _) in by_workload.items()} == {
        "Deployment/search-api": 1,
        "CronJob/nightly-report": 2,
        "(unknown)": 3,
    }
    assert {k: c for k, (_, c) in by_workload.items()} == pytest.approx(dict(spent), abs=6e-9)
    assert rep["by"] == ["workload"]

    # The table shows the workload table only; CSV has its rows only.
    out, err = io.StringIO(), io.StringIO()
    assert await asyncio.to_thread(report.run, args, out, err) == 0, err.getvalue()
    text = out.getvalue()
    assert "By workload" in text and "Top spenders" not in text and "By route" not in text
    for key in spent:
        assert key in text
    args = report_args(
        "--redis-url", redis_url, "--namespace", ns, "--since", "1h", "--by", "workload,route", "--format", "csv"
    )
    out = io.StringIO()
    assert await asyncio.to_thread(report.run, args, out, io.StringIO()) == 0
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    # A pivot: one row per (workload, route), a column for each.
    assert {(row["workload"], row["route"]) for row in rows} == {(w, "chat") for w in spent}
    assert {row["workload"]: float(row["cost_usd"]) for row in rows} == pytest.approx(dict(spent), abs=6e-9)
    # By default every dimension is there, workload last.
    args = report_args("--redis-url", redis_url, "--namespace", ns, "--since", "1h")
    out = io.StringIO()
    assert await asyncio.to_thread(report.run, args, out, io.StringIO()) == 0
    text = out.getvalue()
    assert text.index("Top spenders") < text.index("By route") < text.index("By tier") < text.index("By workload")


def test_report_by_refuses_an_unknown_dimension() -> None:
    err = io.StringIO()
    # Any other lowercase name is a tag key (`--by workload,team`); this one cannot be.
    assert report.run(report_args("--by", "workload,Team!"), io.StringIO(), err) == 2
    assert "--by 'Team!'" in err.getvalue() and "workload" in err.getvalue()
