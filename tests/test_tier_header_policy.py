"""The tier a request counts under, through a running sidecar: assigned tiers, and what the tier header may do.

A free-tier tenant limited to 5 requests a minute used to get all 12 of 12 through by
sending `x-kubetoll-tier: premium`. With the platform team's tenant → tier map
(`tenancy.tenantTiers`) the header is capped by default: it may choose the tenant's
assigned tier or one below it, never one above. `ignored` does not read it; `trusted`
is the old behaviour. Each request's tier and how it was decided are in the access log.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from kubetoll_core.periods import FakeClock
from test_budgets import T0, budget_config, post

BUDGET = {
    "name": "b",
    "tiers": {"free": {"requestsPerMinute": 5}, "premium": {"requestsPerMinute": 600}},
}


def tiered(sim: Any, **tenancy: Any) -> dict[str, Any]:
    return budget_config(sim, BUDGET, tenancy={"defaultTier": "free", **tenancy}, gpu=False)


async def passed(sc: Any, tenant: str, tier: str | None, n: int = 12) -> int:
    headers = {"x-kubetoll-tenant": tenant}
    if tier is not None:
        headers["x-kubetoll-tier"] = tier
    statuses = [(await post(sc, headers))[0] for _ in range(n)]
    assert set(statuses) <= {200, 429}, statuses
    return statuses.count(200)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "kubetoll.access"]


async def test_a_forged_tier_header_is_capped_by_the_assigned_tier(
    sim: Any, start_sidecar: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kubetoll.access")
    # The policy is not set: a map makes it capped.
    cfg = tiered(sim, tenantTiers={"acme": "premium"})
    sc = await start_sidecar(cfg, clock=FakeClock(T0))
    # Not in the map: assigned the default tier, free, whatever the header says.
    assert await passed(sc, "freeloader", "premium") == 5
    # Assigned premium: the header is not needed ...
    assert await passed(sc, "acme", None) == 12
    lines = access_lines(caplog)
    assert {(x["tier"], x["tier_source"]) for x in lines[:12]} == {("free", "capped")}
    assert {(x["tier"], x["tier_source"]) for x in lines[12:24]} == {("premium", "assigned")}
    # ... and without tierOrder it may choose only the assigned tier or the default tier (free's own bucket).
    assert await passed(sc, "acme", "free") == 5
    assert {(x["tier"], x["tier_source"]) for x in access_lines(caplog)[24:]} == {("free", "header")}


async def test_with_a_tier_order_the_header_may_choose_a_lower_tier_only(
    sim: Any, start_sidecar: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kubetoll.access")
    budget = {
        "name": "b",
        "tiers": {
            "free": {"requestsPerMinute": 5},
            "standard": {"requestsPerMinute": 8},
            "premium": {"requestsPerMinute": 600},
        },
    }
    tenancy = {
        "defaultTier": "free",
        "tierOrder": ["free", "standard", "premium"],
        "tenantTiers": {"acme": "premium", "globex": "standard"},
    }
    sc = await start_sidecar(budget_config(sim, budget, tenancy=tenancy, gpu=False), clock=FakeClock(T0))
    assert await passed(sc, "acme", "standard") == 8  # below its premium: its choice
    assert await passed(sc, "globex", "premium") == 8  # above its standard: capped to it
    assert await passed(sc, "globex-2", "gold") == 5  # no such tier: the default
    sources = [(x["tier"], x["tier_source"]) for x in access_lines(caplog)]
    assert set(sources[:12]) == {("standard", "header")}
    assert set(sources[12:24]) == {("standard", "capped")}
    assert set(sources[24:]) == {("free", "capped")}


async def test_ignored_reads_no_tier_header(sim: Any, start_sidecar: Any) -> None:
    cfg = tiered(sim, tenantTiers={"acme": "premium"}, tierHeaderPolicy="ignored")
    sc = await start_sidecar(cfg, clock=FakeClock(T0))
    assert await passed(sc, "freeloader", "premium") == 5
    # Not even downwards: an assigned premium tenant stays premium.
    assert await passed(sc, "acme", "free") == 12


async def test_trusted_is_the_old_behaviour(sim: Any, start_sidecar: Any) -> None:
    cfg = tiered(sim, tenantTiers={"acme": "premium"}, tierHeaderPolicy="trusted")
    sc = await start_sidecar(cfg, clock=FakeClock(T0))
    assert await passed(sc, "freeloader", "premium") == 12
    # Without a header, the assigned tier.
    assert await passed(sc, "acme", None) == 12
    assert await passed(sc, "acme", "free") == 5


async def test_without_a_map_the_header_still_names_the_tier(sim: Any, start_sidecar: Any) -> None:
    # What a config compiled before tenant tiers existed does: trusted, and an unknown tier is the default.
    sc = await start_sidecar(tiered(sim), clock=FakeClock(T0))
    assert await passed(sc, "anyone", "premium") == 12
    assert await passed(sc, "someone", "gold") == 5
