"""Experiments: a rule's traffic split between arms by weight, each caller kept on its arm.

Through a running sidecar with the official `openai` SDK against simulated
upstreams: a 90/10 split sends each tenant to the arm the hash of (experiment,
tenant) names, every time, and `kubetoll report --experiment` gives per-arm figures
(requests, cost per request, latency, error rate) equal to what the ledger holds,
failed requests included; `stickyBy: session` keys on the session header and
`none` draws each request; an arm may be a cascade, and the report gives its
escalation rate. Then the assignment on its own (the same in every sidecar; moving
weight moves only the callers in between), the compiler's handling of arms, and
the example (examples/spend-less/).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from kubetoll_core.parts import Split
from kubetoll_core.spend_record import SPEND_ONLY_OUTCOMES, SpendRecord
from kubetoll_operator.compiler import compile_namespace
from kubetoll_sidecar.experiments import SESSION_HEADER, CompiledSplit
from kubetoll_tools import report
from kubetoll_tools import tool_commands as commands
from kubetoll_tools.experiment_report import percentile, wilson
from kubetoll_tools.simulator import Fault
from support.harness import RunningSidecar, base_config
from test_operator_crds import api_server_errors, examples, model_errors

EXPERIMENT = "mini-vs-4o"
HELLO = [{"role": "user", "content": "Where is my parcel?"}]


def backend(name: str, sim: Any, model: str, inp: float, out: float) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "model": model,
        "endpoint": sim.url + "/v1",
        "credentials": {"env": "KT_TEST_OPENAI_KEY"},
        "pricing": {"inputPerMTok": inp, "outputPerMTok": out},
        "timeouts": {"connect": 1, "firstToken": 2, "total": 5},
    }


def split_config(sim: Any, sim2: Any, arms: list[dict[str, Any]], sticky_by: str = "tenant") -> dict[str, Any]:
    cfg = base_config(sim.url)
    cfg["backends"] = [backend("mini", sim, "gpt-4o-mini", 0.15, 0.6), backend("gpt4o", sim2, "gpt-4o", 2.5, 10.0)]
    split = {"experiment": EXPERIMENT, "stickyBy": sticky_by, "arms": arms}
    cfg["routes"] = [{"name": "chat", "rules": [{"split": split}]}]
    return cfg


ARMS_90_10 = [
    {"name": "control", "weight": 90, "backends": ["gpt4o"]},
    {"name": "mini", "weight": 10, "backends": ["mini"]},
]


def predicted(arms: list[dict[str, Any]], tenant: str, headers: dict[str, str] | None = None, **kw: Any) -> str:
    split = CompiledSplit(Split.model_validate({"experiment": EXPERIMENT, "arms": arms, **kw}))
    return split.choose(tenant, headers or {}).arm


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetoll")
    commands.register(parser.add_subparsers())
    return parser.parse_args(["report", *argv])


async def experiment_report(sc: RunningSidecar, fmt: str = "json") -> Any:
    """`kubetoll report --sidecar URL --experiment mini-vs-4o --format FMT`, as it prints."""
    args = _args("--sidecar", sc.url, "--experiment", EXPERIMENT, "--format", fmt)
    text = report.format_experiment(await report.build_report(args, time.time()), fmt)
    return json.loads(text) if fmt == "json" else text


def ledger(sc: RunningSidecar) -> list[SpendRecord]:
    assert sc.sidecar is not None
    return [r for r in sc.sidecar.ledger.records() if not r.refusal]


async def post(session: aiohttp.ClientSession, sc: RunningSidecar, tenant: str, **headers: str) -> tuple[int, str]:
    async with session.post(
        sc.url + "/v1/chat/completions",
        json={"model": "chat", "messages": HELLO},
        headers={"x-kubetoll-tenant": tenant, **headers},
    ) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-kubetoll-arm", "")


# --------------------------------------------------------------------------- a 90/10 split


async def test_a_90_10_split_stays_sticky_and_the_report_equals_the_ledger(sim, sim2, start_sidecar):
    sc = await start_sidecar(split_config(sim, sim2, ARMS_90_10))
    tenants = [f"tenant-{i:03d}" for i in range(60)]
    expected = {t: predicted(ARMS_90_10, t) for t in tenants}
    minis = [t for t in tenants if expected[t] == "mini"]
    # The weights take effect (a fixed hash of fixed names: this share is the same every run).
    assert 2 <= len(minis) <= 12
    sim.enqueue_fault(Fault(status=500))  # the first two requests of the mini arm fail
    sim.enqueue_fault(Fault(status=500))
    seen: dict[str, set[str]] = defaultdict(set)
    statuses: dict[str, list[int]] = defaultdict(list)
    client = sc.openai()
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            for t in tenants:
                if t == tenants[0]:  # one tenant through the SDK, the rest with plain HTTP (faster)
                    raw = await client.chat.completions.with_raw_response.create(
                        model="chat", messages=HELLO, extra_headers={"x-kubetoll-tenant": t}
                    )
                    status, arm = raw.status_code, raw.headers["x-kubetoll-arm"]
                    assert raw.headers["x-kubetoll-experiment"] == EXPERIMENT
                else:
                    status, arm = await post(session, sc, t)
                seen[t].add(arm)
                statuses[arm].append(status)
    assert {t: arms for t, arms in seen.items()} == {t: {expected[t]} for t in tenants}  # sticky, as predicted
    assert statuses["mini"].count(502) == 2 and set(statuses["control"]) == {200}

    recs = ledger(sc)
    assert all(r.experiment == EXPERIMENT and r.arm in ("control", "mini") for r in recs)
    assert {r.tenant for r in recs if r.arm == "mini"} == set(minis)
    failed = [r for r in recs if r.outcome == "all_backends_failed"]
    assert len(failed) == 2 and all(r.arm == "mini" and r.cost_usd == 0 and r.backend == "mini" for r in failed)

    rep = await experiment_report(sc)
    arms = {a["arm"]: a for a in rep["experiment"]["arms"]}
    assert set(arms) == {"control", "mini"}
    for name, a in arms.items():
        mine = [r for r in recs if r.arm == name and r.outcome not in SPEND_ONLY_OUTCOMES]
        ok = sorted(r.latency_ms for r in mine if r.outcome == "ok")
        errors = sum(r.outcome == "all_backends_failed" for r in mine)
        assert a["requests"] == len(mine) == 3 * sum(expected[t] == name for t in tenants)
        assert a["cost_usd"] == pytest.approx(math.fsum(r.cost_usd for r in mine))
        assert a["cost_per_request_usd"] == pytest.approx(a["cost_usd"] / len(mine))
        assert a["latency_p50_ms"] == pytest.approx(percentile(ok, 50))
        assert a["latency_p95_ms"] == pytest.approx(percentile(ok, 95))
        assert a["errors"] == errors and a["error_rate"] == pytest.approx(errors / len(mine))
        assert a["error_rate_ci95"] == pytest.approx(list(wilson(errors, len(mine))))
        low, high = a["cost_per_request_ci95"]
        assert low <= a["cost_per_request_usd"] <= high
        assert a["cascade"] is None
    # The dearer arm costs more per request, and the cheap arm's interval lies below the control's.
    assert arms["mini"]["cost_per_request_ci95"][1] < arms["control"]["cost_per_request_ci95"][0]
    assert all(a["outcomes"] == [] for a in arms.values())

    # Outcomes reported for some requests: each arm's share and cost per outcome, from the ledger.
    resolved = {
        "control": [r for r in recs if r.arm == "control"][:2],
        "mini": [r for r in recs if r.arm == "mini"][:1],
    }
    async with aiohttp.ClientSession() as http:
        for rs in resolved.values():
            for r in rs:
                async with http.post(
                    sc.url + "/kubetoll/v1/outcomes", json={"request_id": r.request_id, "outcome": "resolved"}
                ) as resp:
                    assert resp.status == 201
    rep = await experiment_report(sc)
    for a in rep["experiment"]["arms"]:
        (o,) = a["outcomes"]
        n = a["requests"]
        assert (o["outcome"], o["outcomes"], o["conversations"]) == ("resolved", len(resolved[a["arm"]]), n)
        assert o["rate"] == pytest.approx(len(resolved[a["arm"]]) / n)
        assert o["rate_ci95"] == pytest.approx(list(wilson(len(resolved[a["arm"]]), n)))
        assert o["cost_per_outcome_usd"] == pytest.approx(a["cost_usd"] / len(resolved[a["arm"]]))

    table = await experiment_report(sc, "table")
    assert "Experiment mini-vs-4o" in table and "control" in table and "arm control: resolved in" in table
    rows = list(csv_rows(await experiment_report(sc, "csv")))
    assert [r["arm"] for r in rows] == [a["arm"] for a in rep["experiment"]["arms"]]
    assert int(rows[0]["requests"]) == rep["experiment"]["arms"][0]["requests"]


def csv_rows(text: str) -> Any:
    import csv

    return csv.DictReader(io.StringIO(text))


async def test_an_arm_is_served_only_its_own_cached_answers_and_its_hits_are_in_its_figures(sim, sim2, start_sidecar):
    arms = [
        {"name": "control", "weight": 50, "backends": ["gpt4o"]},
        {"name": "mini", "weight": 50, "backends": ["mini"]},
    ]
    cfg = split_config(sim, sim2, arms)
    cfg["cachePolicies"] = [{"name": "faq", "scope": "namespace", "exact": {"enabled": True, "ttlSeconds": 600}}]
    cfg["routes"][0]["cachePolicy"] = "faq"
    sc = await start_sidecar(cfg)
    tenants = [f"tenant-{i:03d}" for i in range(40)]
    control = [t for t in tenants if predicted(arms, t) == "control"][:2]
    mini = next(t for t in tenants if predicted(arms, t) == "mini")

    async def ask(tenant: str) -> tuple[str, str, str]:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                sc.url + "/v1/chat/completions",
                json={"model": "chat", "messages": HELLO, "temperature": 0},
                headers={"x-kubetoll-tenant": tenant},
            ) as resp:
                assert resp.status == 200, await resp.text()
                h = resp.headers
                return h["x-kubetoll-arm"], h.get("x-kubetoll-cache", ""), h.get("x-kubetoll-backend", "")

    assert await ask(control[0]) == ("control", "miss", "gpt4o")
    assert sc.sidecar is not None and sc.sidecar.cache is not None
    await sc.sidecar.cache.drain()  # the store is fire-and-forget
    # The other arm asks the same question of the same namespace-wide policy: its own backend answers.
    assert await ask(mini) == ("mini", "miss", "mini")
    await sc.sidecar.cache.drain()
    # A second caller of the control arm is served the control arm's answer.
    arm, cache, _ = await ask(control[1])
    assert (arm, cache) == ("control", "hit-exact")
    hit = next(r for r in ledger(sc) if r.cache_hit)
    assert (hit.experiment, hit.arm, hit.cost_usd, hit.tenant) == (EXPERIMENT, "control", 0.0, control[1])
    assert hit.avoided_usd > 0
    assert len(sim.requests) == 1 and len(sim2.requests) == 1  # one call per arm


async def test_sticky_by_session_and_by_nothing(sim, sim2, start_sidecar):
    arms = [{"name": "a", "weight": 1, "backends": ["gpt4o"]}, {"name": "b", "weight": 1, "backends": ["mini"]}]
    sc = await start_sidecar(split_config(sim, sim2, arms, "session"))
    async with aiohttp.ClientSession() as session:
        for i in range(12):
            want = predicted(arms, "same-tenant", {SESSION_HEADER: f"s{i}"}, stickyBy="session")
            for _ in range(2):
                assert (await post(session, sc, "same-tenant", **{SESSION_HEADER: f"s{i}"}))[1] == want
        # No session header: the tenant decides.
        want = predicted(arms, "same-tenant", stickyBy="session")
        assert {(await post(session, sc, "same-tenant"))[1] for _ in range(3)} == {want}
    by_session = {predicted(arms, "same-tenant", {SESSION_HEADER: f"s{i}"}, stickyBy="session") for i in range(12)}
    assert by_session == {"a", "b"}  # one tenant's sessions spread over both arms

    sc2 = await start_sidecar(split_config(sim, sim2, arms, "none"))
    async with aiohttp.ClientSession() as session:
        got = {(await post(session, sc2, "same-tenant"))[1] for _ in range(40)}
    assert got == {"a", "b"}  # each request drawn on its own (all 40 alike: odds 2**-39)


async def test_an_arm_may_be_a_cascade_and_the_report_gives_its_escalation_rate(sim, sim2, start_sidecar):
    arms = [
        {"name": "always-4o", "weight": 1, "backends": ["gpt4o"]},
        {"name": "cascade", "weight": 1, "backends": ["gpt4o"], "cascade": {"steps": [{"backends": ["mini"]}]}},
    ]
    sc = await start_sidecar(split_config(sim, sim2, arms))
    tenants = [f"t{i}" for i in range(16)]
    cascaded = [t for t in tenants if predicted(arms, t) == "cascade"]
    assert cascaded
    async with aiohttp.ClientSession() as session:
        # One request escalates and its last step fails: an error, and an escalation all the same.
        sim.enqueue_fault(Fault(kind="answer_refusal"))
        sim2.enqueue_fault(Fault(status=500))
        assert (await post(session, sc, cascaded[0]))[0] == 502
        sim.enqueue_fault(Fault(kind="answer_refusal"))  # the next one escalates and is answered
        for t in tenants:
            assert (await post(session, sc, t))[0] == 200
    requests = len(cascaded) + 1
    rep = await experiment_report(sc)
    arms_out = {a["arm"]: a for a in rep["experiment"]["arms"]}
    c = arms_out["cascade"]["cascade"]
    assert arms_out["always-4o"]["cascade"] is None and arms_out["always-4o"]["errors"] == 0
    assert arms_out["cascade"]["requests"] == requests and arms_out["cascade"]["errors"] == 1
    assert (c["cascaded"], c["escalated"]) == (requests, 2)
    assert c["escalation_rate"] == pytest.approx(2 / requests)
    recs = ledger(sc)
    escalated = [r for r in recs if r.escalation == "refusal"]
    assert len(escalated) == 2 and all(r.arm == "cascade" and r.experiment == EXPERIMENT for r in escalated)
    (failed,) = [r for r in recs if r.outcome == "all_backends_failed"]
    assert (failed.cascade, failed.cascade_step, failed.cost_usd) == ("escalated", 1, 0.0)
    # Cost per request counts the escalated attempt with its request.
    mine = [r for r in recs if r.arm == "cascade"]
    assert arms_out["cascade"]["cost_per_request_usd"] == pytest.approx(math.fsum(r.cost_usd for r in mine) / requests)
    assert c["saved_usd"] == pytest.approx(c["baseline_usd"] - math.fsum(r.cost_usd for r in mine))
    assert c["saved_usd"] > 0


# --------------------------------------------------------------------------- the assignment


def test_assignment_is_the_same_everywhere_and_moving_weight_moves_only_the_callers_between():
    tenants = [f"user-{i}" for i in range(2000)]
    split = Split.model_validate({"experiment": EXPERIMENT, "arms": ARMS_90_10})
    one, other = CompiledSplit(split), CompiledSplit(split)  # two sidecars, no shared state
    at_90 = {t: one.choose(t, {}).arm for t in tenants}
    assert at_90 == {t: other.choose(t, {}).arm for t in tenants}
    share = sum(a == "mini" for a in at_90.values()) / len(tenants)
    assert abs(share - 0.10) < 0.025  # 2000 draws: sd 0.0067
    at_80 = {t: predicted([{**ARMS_90_10[0], "weight": 80}, {**ARMS_90_10[1], "weight": 20}], t) for t in tenants}
    assert all(at_80[t] == "mini" for t in tenants if at_90[t] == "mini")  # nobody leaves the arm that grew
    moved = sum(at_90[t] != at_80[t] for t in tenants) / len(tenants)
    assert abs(moved - 0.10) < 0.025
    # A different experiment name reshuffles: an experiment's callers are not the last one's.
    renamed = CompiledSplit(Split.model_validate({"experiment": "other", "arms": ARMS_90_10}))
    assert sum(renamed.choose(t, {}).arm != at_90[t] for t in tenants) > 100
    # An arm of weight 0 gets nobody.
    paused = CompiledSplit(
        Split.model_validate({"experiment": EXPERIMENT, "arms": [ARMS_90_10[0], {**ARMS_90_10[1], "weight": 0}]})
    )
    assert {paused.choose(t, {}).arm for t in tenants} == {"control"}


def test_the_compiler_drops_arms_that_resolve_nothing():
    def mb(name: str) -> dict[str, Any]:
        return {
            "apiVersion": "kubetoll.dev/v1alpha1",
            "kind": "ModelBackend",
            "metadata": {"name": name},
            "spec": {
                "provider": "openai-compatible",
                "model": name,
                "endpoint": "http://llm.example:8000/v1",
                "pricing": {"inputPerMTok": 1, "outputPerMTok": 2},
            },
        }

    def route(arms: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "kubetoll.dev/v1alpha1",
            "kind": "ModelRoute",
            "metadata": {"name": "chat"},
            "spec": {"rules": [{"split": {"experiment": EXPERIMENT, "arms": arms}}, {"backends": ["big"]}]},
        }

    arms = [
        {"name": "a", "weight": 9, "backends": ["big"]},
        {"name": "b", "weight": 1, "backends": ["gone"]},
        {"name": "c", "weight": 1, "backends": ["small"], "cascade": {"steps": [{"backends": ["gone"]}]}},
    ]
    result = compile_namespace("ns", [mb("big"), mb("small"), route(arms)])
    assert result.ok
    split = result.config.routes[0].rules[0].split
    assert split is not None and [a.name for a in split.arms] == ["a", "c"] and split.arms[1].cascade is None
    problems = {(p.reason, p.field) for p in result.problems}
    assert ("ArmDropped", "spec.rules[0].split.arms[1].backends") in problems
    assert ("CascadeDropped", "spec.rules[0].split.arms[2].cascade") in problems
    assert result.outcomes[("ModelRoute", "chat")].details["backends"] == ["big", "small"]

    # Only a weight-0 arm left: the rule is skipped, the next one serves.
    arms = [{"name": "a", "weight": 0, "backends": ["big"]}, {"name": "b", "weight": 1, "backends": ["gone"]}]
    result = compile_namespace("ns", [mb("big"), mb("small"), route(arms)])
    (rule,) = result.config.routes[0].rules
    assert rule.backends == ["big"] and "RuleSkipped" in {p.reason for p in result.problems}


def test_the_example_validates_and_compiles_with_the_other_examples():
    """examples/spend-less/route.yaml: what the API server and the compiler say, beside examples/*.yaml."""
    path = Path(__file__).resolve().parent.parent / "examples" / "spend-less" / "route.yaml"
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert api_server_errors(doc) == [] and model_errors(doc) == []
    result = compile_namespace("team-a", [*examples(), doc])
    assert result.ok and result.problems == [], result.problems
    support = next(r for r in result.config.routes if r.name == "support")
    extraction, default = support.rules
    assert extraction.cascade is not None and extraction.cascade.streams.value == "buffer"
    assert default.split is not None and [a.weight for a in default.split.arms] == [90, 10]
