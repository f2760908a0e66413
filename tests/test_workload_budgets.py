"""Budgets scoped to workloads (`workloadSelector`), through running sidecars with different pod labels.

"The search-api Deployment may spend $50 a day": a budget with a workload selector
applies in the sidecars whose pod's labels (the downward-API file,
`server.podLabelsFile`) match it and nowhere else. It refuses only that workload's
requests, its kill switch stops only that workload, and with Redis every selected
sidecar counts into the same meters while the other pods' spend never reaches them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kubetoll_core.ledger_stream import period_totals
from kubetoll_core.periods import FakeClock
from support.harness import RunningSidecar
from test_budgets import T0, budget_config, post

SEARCH_API = {
    "matchLabels": {"app": "search-api"},
    "matchExpressions": [{"key": "track", "operator": "NotIn", "values": ["canary"]}],
}


def labels_file(directory: Path, **labels: str) -> str:
    """The downward API's labels file: one key="value" per line."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "labels"
    path.write_text("".join(f'{k}="{v}"\n' for k, v in labels.items()))
    return str(path)


def for_pod(cfg: dict[str, Any], directory: Path, **labels: str) -> dict[str, Any]:
    """The same router config as another pod's sidecar would read it: only its labels file differs."""
    cfg = copy.deepcopy(cfg)
    cfg["server"] = {**cfg["server"], "podLabelsFile": labels_file(directory, **labels), "stateDir": str(directory)}
    return cfg


async def start_pods(
    tmp_path: Path, cfg: dict[str, Any], pods: dict[str, dict[str, str]], **kw: Any
) -> dict[str, RunningSidecar]:
    """One sidecar per pod, each in a directory of its own (its config file, labels file and state)."""
    out = {}
    for name, labels in pods.items():
        sc = RunningSidecar(tmp_path / name, for_pod(cfg, tmp_path / name, **labels), **kw)
        out[name] = sc
        await sc.start()
    return out


async def stop_pods(pods: dict[str, RunningSidecar]) -> None:
    for sc in pods.values():
        await sc.stop()


async def statuses(sc: RunningSidecar, n: int = 12, tenant: str = "t") -> list[int]:
    return [(await post(sc, {"x-kubetoll-tenant": tenant}))[0] for _ in range(n)]


async def test_a_workload_scoped_budget_refuses_only_the_matching_pod(tmp_path: Path, sim: Any) -> None:
    budget = {"name": "search-api", "workloadSelector": SEARCH_API, "tiers": {"default": {"requestsPerMinute": 5}}}
    cfg = budget_config(sim, budget, gpu=False)
    pods = await start_pods(
        tmp_path,
        cfg,
        {
            "search": {"app": "search-api", "pod-template-hash": "7d9f"},
            "canary": {"app": "search-api", "track": "canary"},
            "web": {"app": "web"},
        },
        clock=FakeClock(T0),
    )
    try:
        assert (await statuses(pods["search"])).count(200) == 5
        status, _, body = await post(pods["search"], {"x-kubetoll-tenant": "t"})
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        # The other pods' sidecars ignore the budget: no limit, and no budget in their headers.
        for other in ("canary", "web"):
            assert await statuses(pods[other]) == [200] * 12
            _, headers, _ = await post(pods[other], {"x-kubetoll-tenant": "t"})
            assert "x-kubetoll-budget-remaining" not in headers
        _, headers, _ = await post(pods["search"], {"x-kubetoll-tenant": "someone-else"})
        assert "scope=search-api/" in headers["x-kubetoll-budget-remaining"]
    finally:
        await stop_pods(pods)


async def test_a_workload_scoped_kill_switch_stops_only_that_workload(tmp_path: Path, sim: Any) -> None:
    budget = {"name": "search-api", "workloadSelector": SEARCH_API, "suspended": True}
    pods = await start_pods(
        tmp_path, budget_config(sim, budget, gpu=False), {"search": {"app": "search-api"}, "web": {"app": "web"}}
    )
    try:
        status, _, body = await post(pods["search"], {"x-kubetoll-tenant": "t"})
        assert status == 403 and body["error"]["code"] == "budget_suspended"
        assert (await post(pods["web"], {"x-kubetoll-tenant": "t"}))[0] == 200
    finally:
        await stop_pods(pods)


async def test_the_selected_sidecars_share_the_budgets_meters_in_redis(
    tmp_path: Path, sim: Any, redis_url: str, r: Any, ns: str
) -> None:
    scoped = {"name": "search-api", "workloadSelector": SEARCH_API, "cap": {"usdPerDay": 50}}
    everyone = {"name": "everyone", "cap": {"usdPerDay": 500}}
    cfg = budget_config(sim, scoped, gpu=False)
    cfg["budgets"].append(everyone)
    cfg["namespace"] = ns
    cfg["budgetStore"] = {"url": redis_url, "timeoutMs": 1000}
    pods = await start_pods(
        tmp_path, cfg, {"search-1": {"app": "search-api"}, "search-2": {"app": "search-api"}, "web": {"app": "web"}}
    )
    cost: dict[str, float] = {}
    try:
        for name, n in (("search-1", 3), ("search-2", 2), ("web", 4)):
            cost[name] = 0.0
            for _ in range(n):
                status, headers, _ = await post(pods[name], {"x-kubetoll-tenant": "t"}, max_tokens=16)
                assert status == 200
                cost[name] += float(headers["x-kubetoll-cost-usd"])
    finally:
        await stop_pods(pods)  # returns the leases and writes the buffered spend

    async def cap_spent(budget: str) -> float:
        (meter,) = [m for m in await period_totals(r, ns, budget) if m.meter.startswith("cap:usd:")]
        assert meter.leased_units == 0
        return meter.spent

    assert cost["web"] > 0
    # Both search-api pods' spend, and nothing of web's, is in the scoped budget's one meter.
    assert await cap_spent("search-api") == pytest.approx(cost["search-1"] + cost["search-2"], abs=1e-8)
    assert await cap_spent("everyone") == pytest.approx(sum(cost.values()), abs=1e-8)
