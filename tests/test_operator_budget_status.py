"""TokenBudget and CachePolicy status from the sidecars' spend in Redis (the operator's spend reporter).

Spend is written the way a sidecar writes it: `BudgetMeters` built from the
RouterConfig the operator compiled (read back from its ConfigMap), a real
`RedisBudgetStore` reserving and settling against those meters (ledger records
riding on its flushes) and `close()` to flush. The operator runs against kmock's
emulator (fixtures from tests/conftest.py and support/kopf_env.py) with a private redis-server and a
spend interval of 0.1 s. The arithmetic itself (`spend.budget_report`) is tested
without a cluster at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from kubetoll_core.burn_rate import BurnRates
from kubetoll_core.ledger_stream import MeterTotal, read_ledger, read_ledger_page
from kubetoll_core.meters import cap_meter_name, parse_meter_name, tier_meter_name
from kubetoll_core.periods import compute_period
from kubetoll_core.redis_connect import RedisCredentials, password_from_env
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import Budget, BudgetStoreSettings, RouterConfig
from kubetoll_core.spend_record import SpendRecord
from kubetoll_operator import spend
from kubetoll_sidecar.budgets.admission import BudgetMeters
from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
from kubetoll_sidecar.budgets.store import Hold
from support.harness import RunningSidecar, wait_until
from support.kopf_env import LOCAL_BACKEND, NS, Kubectl, condition, eventually, route_to_local, stop_operator
from support.log_events import log_events
from support.redis_server import RedisProcess

INTERVAL = 0.1
NO_TIER = "pro"  # a tier the budget does not define: the request falls under the namespace cap only

BACKEND = LOCAL_BACKEND
ROUTE = route_to_local(cachePolicy="faq")
OTHER_ROUTE = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "ModelRoute",
    "metadata": {"name": "other"},
    "spec": {"rules": [{"backends": ["local"]}]},
}
CACHE = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "CachePolicy",
    "metadata": {"name": "faq"},
    "spec": {"exact": {"enabled": True}},
}
BUDGET = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "TokenBudget",
    "metadata": {"name": "team"},
    "spec": {
        "cap": {"usdPerMonth": 10, "tokensPerDay": 1000000},
        "tenant": {"header": "x-tenant"},
        "tiers": [{"name": "free", "usdPerDay": 1}],
        "alertThresholds": [50, 75, 90, 100],
    },
}


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    proc = RedisProcess().start()
    yield proc
    proc.stop()


@pytest.fixture
async def cluster(kubectl: Kubectl) -> AsyncIterator[Kubectl]:
    for doc in (BACKEND, ROUTE, OTHER_ROUTE, CACHE, BUDGET):
        await kubectl.apply(doc)
    yield kubectl


async def compiled_config(kubectl: Kubectl) -> RouterConfig:
    async def written() -> RouterConfig:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        config = RouterConfig.model_validate_json(cm["data"]["router.json"])
        assert [b.name for b in config.budgets] == ["team"] and config.cache_policies
        return config

    return await eventually(written)


async def spend_like_a_sidecar(
    redis_url: str,
    config: RouterConfig,
    usd: float,
    *,
    tenant: str = "acme",
    tier: str = "free",
    records: list[SpendRecord] = (),
) -> None:
    """Reserve and settle `usd` on every USD meter of one request, as the sidecar's admit and settle stages do.

    Each call is a new sidecar process (its own sidecar id: Redis refuses a reused id's restarted sequence).
    """
    meters = BudgetMeters(config).for_request("chat", tenant, tier, time.time())
    store = RedisBudgetStore.connect(
        BudgetStoreSettings(url=redis_url, timeout_ms=1000), config.namespace, "/nonexistent"
    )
    await store.start()
    try:
        now = time.time()
        holds = [Hold(m, usd, enforce=False) for m in meters.usd]  # onExhausted allow: counted past a limit
        reservation = await store.reserve(holds, now)
        store.settle(reservation, {m.key: usd for m in meters.usd}, now)
        for r in records:
            store.add_record(r)
    finally:
        await store.close()


def record(route: str, cache_hit: str = "", avoided: float = 0.0, cost: float = 0.0) -> SpendRecord:
    return SpendRecord(
        time=time.time(),
        namespace=NS,
        route=route,
        backend="" if cache_hit else "local",
        tenant="acme",
        tier="free",
        prompt_tokens=0,
        completion_tokens=0,
        cached_tokens=0,
        cost_usd=cost,
        cache_hit=cache_hit,
        avoided_usd=avoided,
    )


async def threshold_events(kubectl: Kubectl) -> list[dict[str, Any]]:
    return sorted(
        (
            e
            for e in await kubectl.list("Event")
            if e["reason"] == "BudgetThresholdCrossed" and e["involvedObject"]["name"] == "team"
        ),
        key=lambda e: int(e["message"].split("reached the ")[1].split("%")[0]),
    )


async def test_spend_written_by_a_sidecar_shows_in_the_budget_status(
    cluster: Kubectl, start_operator: Any, redis: RedisProcess
) -> None:
    await start_operator(redis_url=redis.url, spend_interval_seconds=INTERVAL)
    config = await compiled_config(cluster)
    assert config.budget_store.url == redis.url

    # Before any spend: the cap with nothing spent, the period from the budget's timezone.
    month = compute_period("month", "UTC", time.time())

    day = compute_period("day", "UTC", time.time())

    async def zero() -> None:
        s = (await cluster.get("TokenBudget", "team"))["status"]
        # Nothing spent anywhere: a tie, which goes to the day before the month.
        assert s["binding"] == "cap/tokens-day"
        assert (s["spent"], s["limit"], s["remaining"], s["unit"], s["percent"]) == (
            0.0,
            1000000.0,
            1000000.0,
            "tokens",
            0.0,
        )
        assert s["periodStart"] == spend.rfc3339(day.start) and s["periodEnd"] == spend.rfc3339(day.end)
        assert {(m["window"], m["periodEnd"]) for m in s["meters"] if m["level"] == "cap"} == {
            ("day", spend.rfc3339(day.end)),
            ("month", spend.rfc3339(month.end)),
        }
        assert s["tenantsOverBudget"] == []
        assert condition({"status": s}, "SpendKnown")["status"] == "True"

    await eventually(zero)

    await spend_like_a_sidecar(redis.url, config, 2.0, tenant="acme")
    await spend_like_a_sidecar(redis.url, config, 0.25, tenant="beta")

    async def shown() -> dict[str, Any]:
        tb = await cluster.get("TokenBudget", "team")
        s = tb["status"]
        # The binding meter is acme's tier limit (2 of its 1 USD/day), not the month cap at 22.5%.
        assert s["binding"] == "tier:free/usd-day (acme)" and s["refusing"] is False
        assert (s["spent"], s["limit"], s["remaining"], s["unit"], s["percent"]) == (2.0, 1.0, 0.0, "USD", 200.0)
        assert s["display"] == {"spent": "2", "percent": "200"}
        assert s["tenantsOverBudget"] == ["acme"]  # beta spent 0.25
        rows = {(m["level"], m["unit"], m["window"]): m for m in s["meters"]}
        cap = rows[("cap", "USD", "month")]
        assert (cap["spent"], cap["limit"], cap["remaining"], cap["percent"], cap["period"]) == (
            2.25,
            10.0,
            7.75,
            22.5,
            month.id,
        )
        assert rows[("cap", "tokens", "day")]["spent"] == 0.0 and rows[("cap", "tokens", "day")]["limit"] == 1000000.0
        tier = rows[("tier:free", "USD", "day")]
        assert (tier["limit"], tier["spent"], tier["tenants"], tier["tenantsOver"], tier["maxPercent"]) == (
            1.0,
            2.25,
            2,
            1,
            200.0,
        )
        assert condition(tb, "SpendKnown")["reason"] == "SpendRead"
        below = condition(tb, "ThresholdReached")
        assert below["status"] == "False" and below["reason"] == "BelowThresholds"
        # The compile's conditions are still there, next to the reporter's.
        assert condition(tb, "Ready")["status"] == "True" and condition(tb, "TenancyAccepted")["status"] == "True"
        return tb

    tb = await eventually(shown)

    async def tenant_event() -> None:  # no cap threshold reached; acme's tier limit is spent: its 100% Event
        events = await threshold_events(cluster)
        assert [e["message"].split(": ")[0] for e in events] == [
            "tier:free USD per day limit of tenant acme reached the 100% alert threshold"
        ]
        assert events[0]["type"] == "Warning" and "2 of 1 USD spent (200%)" in events[0]["message"]

    await eventually(tenant_event)

    # A recompile (spec change) keeps the reporter's conditions; the reporter keeps the compile's.
    await cluster.patch("TokenBudget", "team", {"spec": {"failMode": "failClosed"}})

    async def both_kept() -> None:
        t = await cluster.get("TokenBudget", "team")
        assert [c["type"] for c in t["status"]["conditions"]] == [
            "Ready",
            "ResolvedRefs",
            "TenancyAccepted",
            "SpendKnown",
            "ThresholdReached",
        ]
        cm = json.loads((await cluster.get("ConfigMap", "kubetoll-router"))["data"]["router.json"])
        assert cm["budgets"][0]["failMode"] == "failClosed"

    await eventually(both_kept)
    assert (
        condition(await cluster.get("TokenBudget", "team"), "SpendKnown")["lastTransitionTime"]
        == condition(tb, "SpendKnown")["lastTransitionTime"]
    )


async def test_each_threshold_posts_one_event_per_period_across_restarts(
    cluster: Kubectl, start_operator: Any, redis: RedisProcess
) -> None:
    memo = await start_operator(redis_url=redis.url, spend_interval_seconds=INTERVAL)
    config = await compiled_config(cluster)

    await spend_like_a_sidecar(redis.url, config, 5.5, tier=NO_TIER)  # 55%: crosses 50

    async def fifty() -> None:
        events = await threshold_events(cluster)
        assert len(events) == 1
        e = events[0]
        assert (
            e["type"] == "Normal" and e["involvedObject"]["kind"] == "TokenBudget" and "uid" in e["involvedObject"]
        )  # kmock assigns no uids
        assert "USD per month cap reached the 50% alert threshold: 5.5 of 10 USD spent (55%)" in e["message"]
        tb = await cluster.get("TokenBudget", "team")
        reached = condition(tb, "ThresholdReached")
        assert reached["status"] == "True" and reached["reason"] == "ThresholdCrossed" and "50%" in reached["message"]

    await eventually(fifty)

    await spend_like_a_sidecar(redis.url, config, 2.5, tier=NO_TIER)  # 80%: crosses 75

    async def seventy_five() -> None:
        events = await threshold_events(cluster)
        assert [("50%" in e["message"], "75%" in e["message"]) for e in events] == [(True, False), (False, True)]
        assert events[1]["type"] == "Normal"
        assert "75%" in condition(await cluster.get("TokenBudget", "team"), "ThresholdReached")["message"]

    await eventually(seventy_five)

    # More spend under the next threshold: no Event.
    await spend_like_a_sidecar(redis.url, config, 0.5, tier=NO_TIER)  # 85%

    async def at_85() -> None:
        assert (await cluster.get("TokenBudget", "team"))["status"]["percent"] == 85.0

    await eventually(at_85)
    reports = memo.reconciler.reporter.spend_reports
    await eventually(lambda: _more_reports(memo, reports + 5))
    assert len(await threshold_events(cluster)) == 2

    # A restarted operator (empty memory) finds the marks in Redis: no duplicates.
    await stop_operator(memo)
    memo = await start_operator(redis_url=redis.url, spend_interval_seconds=INTERVAL)
    await eventually(lambda: _more_reports(memo, 5))
    assert len(await threshold_events(cluster)) == 2

    # 95%: 90 is a Warning. A second operator at the same time (a peer that was not paused) posts nothing more.
    other = await start_operator(redis_url=redis.url, spend_interval_seconds=INTERVAL)
    await spend_like_a_sidecar(redis.url, config, 1.0, tier=NO_TIER)

    async def ninety() -> None:
        events = await threshold_events(cluster)
        assert len(events) == 3 and events[2]["type"] == "Warning" and "90%" in events[2]["message"]

    await eventually(ninety)
    mine, theirs = memo.reconciler.reporter.spend_reports + 5, other.reconciler.reporter.spend_reports + 5
    await eventually(lambda: _more_reports(memo, mine))
    await eventually(lambda: _more_reports(other, theirs))
    assert len(await threshold_events(cluster)) == 3
    assert await redis_keys_matching(redis, f"kt:{{{NS}:team}}:alert:*") == sorted(
        f"kt:{{{NS}:team}}:alert:{cap_meter_name('usd', compute_period('month', 'UTC', time.time()).id)}:{t}"
        for t in (50, 75, 90)
    )


async def _more_reports(memo: Any, at_least: int) -> None:
    assert memo.reconciler.reporter.spend_reports >= at_least


async def redis_keys_matching(redis: RedisProcess, pattern: str) -> list[str]:
    from redis.asyncio import Redis

    client = Redis.from_url(redis.url, decode_responses=True)
    try:
        return sorted(await client.keys(pattern))
    finally:
        await client.aclose()


async def test_redis_down_sets_a_condition_and_keeps_the_last_reading(
    cluster: Kubectl, start_operator: Any, redis: RedisProcess
) -> None:
    memo = await start_operator(redis_url=redis.url, spend_interval_seconds=INTERVAL, redis_timeout_seconds=0.5)
    config = await compiled_config(cluster)
    await spend_like_a_sidecar(redis.url, config, 3.0, tier=NO_TIER)

    async def read() -> None:
        assert (await cluster.get("TokenBudget", "team"))["status"]["spent"] == 3.0

    await eventually(read)

    redis.stop()

    async def unavailable() -> dict[str, Any]:
        tb = await cluster.get("TokenBudget", "team")
        known = condition(tb, "SpendKnown")
        assert known["status"] == "False" and known["reason"] == "RedisUnavailable"
        assert "redis://" not in known["message"] and "127.0.0.1" not in known["message"]
        assert tb["status"]["spent"] == 3.0 and tb["status"]["percent"] == 30.0  # the last reading stays
        assert condition(tb, "ThresholdReached")["reason"] == "BelowThresholds"  # so does the last verdict
        assert condition(tb, "Ready")["status"] == "True"
        return tb

    await eventually(unavailable)
    # Still ticking (each reading bounded), still compiling.
    reports = memo.reconciler.reporter.spend_reports
    await eventually(lambda: _more_reports(memo, reports + 3))
    await cluster.patch("ModelBackend", "local", {"spec": {"maxConnections": 7}})

    async def recompiled() -> None:
        cm = json.loads((await cluster.get("ConfigMap", "kubetoll-router"))["data"]["router.json"])
        assert cm["backends"][0]["maxConnections"] == 7

    await eventually(recompiled)

    # Back, but empty (no persistence): the reading resumes from what Redis has.
    redis.start()

    async def back() -> None:
        tb = await cluster.get("TokenBudget", "team")
        assert condition(tb, "SpendKnown")["status"] == "True" and tb["status"]["spent"] == 0.0

    await eventually(back)


async def test_cache_policy_counts_todays_hits_from_the_ledger(
    cluster: Kubectl, start_operator: Any, redis: RedisProcess
) -> None:
    await start_operator(redis_url=redis.url, spend_interval_seconds=INTERVAL)
    config = await compiled_config(cluster)
    records = [
        record("chat", "exact", avoided=0.002),
        record("chat", "semantic", avoided=0.003),
        record("chat", cost=0.01),  # a miss: not a hit
        record("other", "exact", avoided=1.0),  # another route, not naming the policy
    ]
    await spend_like_a_sidecar(redis.url, config, 0.01, records=records)
    day = compute_period("day", "UTC", time.time())

    async def counted() -> None:
        s = (await cluster.get("CachePolicy", "faq"))["status"]
        assert (s["hits"], s["savedUSD"], s["countersSince"]) == (2, 0.005, spend.rfc3339(day.start))
        assert "savedTokens" not in s and "entries" not in s
        assert condition({"status": s}, "Ready")["status"] == "True"

    await eventually(counted)

    # Read on from the cursor: later hits add up, earlier ones are not counted twice.
    await spend_like_a_sidecar(redis.url, config, 0.01, records=[record("chat", "exact", avoided=0.001)])

    async def more() -> None:
        s = (await cluster.get("CachePolicy", "faq"))["status"]
        assert (s["hits"], s["savedUSD"]) == (3, 0.006)

    await eventually(more)


async def test_no_shared_store_limits_from_the_spec_and_spend_per_pod(cluster: Kubectl, start_operator: Any) -> None:
    memo = await start_operator(spend_interval_seconds=INTERVAL)
    config = await compiled_config(cluster)
    assert config.budget_store.url is None
    day = compute_period("day", "UTC", time.time())

    async def per_pod() -> dict[str, Any]:
        tb = await cluster.get("TokenBudget", "team")
        s = tb["status"]
        # LIMIT from the spec (the first limit set: tokens per day), the period it resets, spend unknown.
        assert (s["binding"], s["limit"], s["unit"]) == ("cap/tokens-day", 1000000.0, "tokens")
        assert s["periodEnd"] == spend.rfc3339(day.end)
        assert s["display"] == {"spent": "per pod", "percent": "unknown"}
        assert "spent" not in s and "percent" not in s and "remaining" not in s
        assert [(m["level"], m["unit"], m["window"], m["limit"]) for m in s["meters"]] == [
            ("cap", "tokens", "day", 1000000.0),
            ("cap", "USD", "month", 10.0),
            ("tier:free", "USD", "day", 1.0),
        ]
        known = condition(tb, "SpendKnown")
        assert (known["status"], known["reason"]) == ("False", "NoSharedStore") and "per pod" in known["message"]
        assert condition(tb, "ThresholdReached")["reason"] == "NoSharedStore"
        assert condition(tb, "Ready")["status"] == "True"
        return tb

    tb = await eventually(per_pod)
    assert printed_columns(tb) == {
        "Binding": "cap/tokens-day",
        "Spent": "per pod",
        "Limit": 1000000.0,
        "Percent": "unknown",
        "Resets": spend.rfc3339(day.end),
        "Unit": "tokens",
        "Ready": "True",
    }
    assert memo.reconciler.reporter.redis is None  # nothing to read: no Redis client at all

    # A spec edit shows at once: the limit is the spec's.
    await cluster.patch("TokenBudget", "team", {"spec": {"cap": {"tokensPerDay": 5000}}})

    async def edited() -> None:
        assert (await cluster.get("TokenBudget", "team"))["status"]["limit"] == 5000.0

    await eventually(edited)


def printed_columns(obj: dict[str, Any]) -> dict[str, Any]:
    """What `kubectl get tokenbudgets` prints from the CRD's printer columns (status columns; Age aside)."""
    from kubetoll_operator import crdgen

    crd = crdgen.all_crds()["kubetoll.dev_tokenbudgets.yaml"]
    out: dict[str, Any] = {}
    for col in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        path = col["jsonPath"]
        if path == '.status.conditions[?(@.type=="Ready")].status':
            out[col["name"]] = condition(obj, "Ready")["status"]
        elif path.startswith(".status."):
            value: Any = obj["status"]
            for part in path.split(".")[2:]:
                value = (value or {}).get(part)
            out[col["name"]] = value
    assert all(v not in (None, "") for v in out.values()), f"empty columns: {out}"
    return out


# --------------------------------------------------------------------------- the kill switch after Redis lost it


async def test_kill_switches_are_written_back_from_the_spec_after_redis_lost_them(
    kubectl: Kubectl, start_operator: Any, redis: RedisProcess
) -> None:
    from redis.asyncio import Redis

    from kubetoll_core.kill_switch import set_suspended

    suspended = {**BUDGET, "spec": {**BUDGET["spec"], "suspended": True}}
    running = {**BUDGET, "metadata": {"name": "open"}, "spec": {"cap": {"usdPerDay": 5}}}
    for doc in (BACKEND, ROUTE, OTHER_ROUTE, CACHE, suspended, running):
        await kubectl.apply(doc)
    keys = RedisKeys(NS)
    client = Redis.from_url(redis.url, decode_responses=True)
    pubsub = client.pubsub()
    try:
        with log_events("kubetoll.operator", logging.WARNING) as events:
            memo = await start_operator(redis_url=redis.url, spend_interval_seconds=INTERVAL)

            async def switches() -> None:
                assert await client.exists(keys.suspended("team")) == 1
                assert await client.get(keys.suspension_known("team")) == "1"
                assert await client.get(keys.suspension_known("open")) == "1"
                assert await client.exists(keys.suspended("open")) == 0

            # Never switched before: the first pass writes both.
            await eventually(switches)
            events.wait_for("kill switch written from spec.suspended for open (not suspended), team (suspended)")

            await pubsub.subscribe(keys.channel())
            assert (await pubsub.get_message(timeout=10))["type"] == "subscribe"
            await client.flushall()  # Redis restarted empty
            passes = memo.reconciler.reporter.spend_reports
            # Pass `passes + 1` started after the flush; by the start of the next one it has run whole.
            await eventually(lambda: _more_reports(memo, passes + 2))
            await switches()
            events.wait_for("kill switch written from spec.suspended for open (not suspended), team (suspended)")
            published = []
            while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)) is not None:
                published.append(json.loads(message["data"]))
            assert {"budget": "team", "suspended": True} in published
            assert {"budget": "open", "suspended": False} in published

            # A switch Redis knows is left as it is: `kubetoll budget suspend` ran ahead of the spec.
            await set_suspended(client, NS, "open", True)
            passes, logged = memo.reconciler.reporter.spend_reports, len(events.records)
            await eventually(lambda: _more_reports(memo, passes + 2))
            assert await client.exists(keys.suspended("open")) == 1
            assert not [r.getMessage() for r in events.records[logged:] if "kill switch" in r.getMessage()]
    finally:
        await pubsub.aclose()
        await client.aclose()


# --------------------------------------------------------------------------- refusals through a real sidecar


@pytest.fixture
async def upstream() -> AsyncIterator[Any]:
    """The backend the operator's config names (openai-compatible, no API key), simulated."""
    from kubetoll_tools.simulator import SimSettings, SimulatedUpstream

    async with SimulatedUpstream(SimSettings()) as s:
        yield s


def sidecar_config(config: RouterConfig, sim_url: str) -> dict[str, Any]:
    """The operator's compiled config as a pod's sidecar reads it, its backend pointed at the simulator.

    The ports are RunningSidecar's: it binds port 0 and writes what it got into the config.
    """
    raw = json.loads(config.model_dump_json(by_alias=True, exclude_none=True))
    for b in raw["backends"]:
        b["endpoint"] = sim_url + "/v1"
    # Two shared cores under a parallel test run: a 50 ms Redis bound would turn a slow reply into a 503.
    raw["budgetStore"]["timeoutMs"] = 1000
    return raw


async def started_sidecar(start_sidecar: Any, config: dict[str, Any]) -> RunningSidecar:
    """A pod's sidecar, once its first sync with the shared store is done (its requests then wait on no sync)."""
    sc = await start_sidecar(config)
    await wait_until(lambda: sc.sidecar.store.available, timeout=10)
    return sc


async def chat(sidecar: RunningSidecar, tenant: str, max_tokens: int) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            sidecar.url + "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens},
            headers={"x-tenant": tenant, "x-kubetoll-tier": "free"},
        ) as resp:
            body = await resp.json()
            assert resp.status in (200, 429), body
            if resp.status == 429:
                assert body["error"]["code"] == "budget_exhausted", body
            return resp.status


async def refusal_records(redis: RedisProcess) -> list[SpendRecord]:
    from redis.asyncio import Redis

    client = Redis.from_url(redis.url, decode_responses=True)
    try:
        records, _, _ = await read_ledger_page(client, NS, "0-0", 10_000)
        # Spend readers (reports, /v1/kubetoll/spend) never see them.
        assert not any(r.refusal for r in await read_ledger(client, NS))
        return [r for r in records if r.refusal]
    finally:
        await client.aclose()


async def budget_with(cluster: Kubectl, spec: dict[str, Any], check: Any) -> RouterConfig:
    await cluster.patch("TokenBudget", "team", {"spec": spec})

    async def patched() -> RouterConfig:
        config = await compiled_config(cluster)
        assert check(config.budgets[0])
        return config

    return await eventually(patched)


async def test_a_daily_cap_refusing_is_the_binding_meter_while_the_month_is_low(
    cluster: Kubectl, start_operator: Any, redis: RedisProcess, upstream: Any, start_sidecar: Any
) -> None:
    await start_operator(redis_url=redis.url, spend_interval_seconds=INTERVAL)
    await compiled_config(cluster)
    config = await budget_with(
        cluster,
        {"cap": {"usdPerDay": 0.02, "usdPerMonth": 1, "tokensPerDay": None}},
        lambda b: b.cap.usd_per_day == 0.02 and b.cap.tokens_per_day is None,
    )
    await spend_like_a_sidecar(redis.url, config, 0.0199, tier=NO_TIER)  # 99.5% of the day, 1.99% of the month

    # The pod's sidecar: 0.0001 USD left today, and a request reserves about 0.002 (1000 output tokens at 2/MTok).
    sidecar = await started_sidecar(start_sidecar, sidecar_config(config, upstream.url))
    statuses = [await chat(sidecar, "acme", 1000) for _ in range(20)]
    assert statuses == [429] * 20

    day = compute_period("day", "UTC", time.time())

    async def refusing() -> dict[str, Any]:
        tb = await cluster.get("TokenBudget", "team")
        s = tb["status"]
        assert (s["binding"], s["refusing"]) == ("cap/usd-day", True)
        assert (s["spent"], s["limit"], s["percent"], s["unit"]) == (0.0199, 0.02, 99.5, "USD")
        assert s["periodEnd"] == spend.rfc3339(day.end)
        rows = {(m["level"], m["window"]): m for m in s["meters"]}
        assert rows[("cap", "month")]["percent"] == 1.99 and rows[("cap", "month")]["refusing"] is False
        assert rows[("cap", "day")]["refusing"] is True
        reached = condition(tb, "ThresholdReached")
        assert reached["status"] == "True" and "100%" in reached["message"]
        return tb

    tb = await eventually(refusing)
    assert printed_columns(tb) == {
        "Binding": "cap/usd-day",
        "Spent": "0.0199",
        "Limit": 0.02,
        "Percent": "99.5 (refusing)",
        "Resets": spend.rfc3339(day.end),
        "Unit": "USD",
        "Ready": "True",
    }

    async def hundred() -> None:
        events = {int(e["message"].split("reached the ")[1].split("%")[0]): e for e in await threshold_events(cluster)}
        assert sorted(events) == [50, 75, 90, 100]  # the day cap; the month is below 50
        assert events[100]["type"] == "Warning"
        assert events[100]["message"].startswith(
            "USD per day cap reached the 100% alert threshold: admission refuses requests on it"
        )
        assert "0.0199 of 0.02 USD spent (99.5%)" in events[100]["message"]

    await eventually(hundred)

    # One refusal record per meter per second from a sidecar, naming the budget and the meter.
    records = await refusal_records(redis)
    assert 1 <= len(records) <= 3
    assert {(r.refused_budget, r.refused_meter, r.outcome) for r in records} == {
        ("team", cap_meter_name("usd", day.id), "rejected")
    }


async def test_a_refused_tenant_is_over_budget_before_its_spend_reaches_the_limit(
    cluster: Kubectl, start_operator: Any, redis: RedisProcess, upstream: Any, start_sidecar: Any
) -> None:
    await start_operator(redis_url=redis.url, spend_interval_seconds=INTERVAL)
    await compiled_config(cluster)
    config = await budget_with(
        cluster,
        {"tiers": [{"name": "free", "usdPerDay": 0.01}]},
        lambda b: b.tiers["free"].usd_per_day == 0.01,
    )
    await spend_like_a_sidecar(redis.url, config, 0.0099, tenant="acme")  # 99% of acme's tier limit
    await spend_like_a_sidecar(redis.url, config, 0.005, tenant="beta")  # 50%: not over

    sidecar = await started_sidecar(start_sidecar, sidecar_config(config, upstream.url))
    # Small requests still fit in what acme has left; large ones do not: refused 16 of 20 times.
    statuses = [await chat(sidecar, "acme", 4) for _ in range(4)] + [
        await chat(sidecar, "acme", 1000) for _ in range(16)
    ]
    assert statuses == [200] * 4 + [429] * 16

    async def over() -> dict[str, Any]:
        tb = await cluster.get("TokenBudget", "team")
        s = tb["status"]
        assert s["tenantsOverBudget"] == ["acme"]
        assert (s["binding"], s["refusing"]) == ("tier:free/usd-day (acme)", True)
        assert s["spent"] < s["limit"] == 0.01  # refused, though its spend is below the limit
        tier = next(m for m in s["meters"] if m["level"] == "tier:free")
        assert (tier["tenants"], tier["tenantsOver"], tier["refusing"]) == (2, 1, True)
        return tb

    await eventually(over)

    async def hundred() -> None:
        events = await threshold_events(cluster)
        assert len(events) == 1
        assert events[0]["message"].startswith(
            "tier:free USD per day limit of tenant acme reached the 100% alert threshold: "
            "admission refuses requests on it"
        )

    await eventually(hundred)
    records = await refusal_records(redis)
    assert {(r.refused_budget, r.refused_meter, r.tenant) for r in records} == {
        ("team", tier_meter_name("free", "acme", f"usd:{compute_period('day', 'UTC', time.time()).id}"), "acme")
    }


# --------------------------------------------------------------------------- the arithmetic, without a cluster


def budget(**spec: Any) -> Budget:
    return Budget.model_validate({"name": "b", **spec})


def total(meter: str, spent: float, limit: float, unit: str = "usd") -> MeterTotal:
    scale = 1_000_000_000 if unit == "usd" else 1000
    return MeterTotal(
        budget="b",
        meter=meter,
        kind="window",
        unit=unit,
        label="",
        scale=scale,
        limit_units=round(limit * scale),
        spent_units=round(spent * scale),
        leased_units=0,
        period=meter.rsplit(":", 1)[1],
        period_end=0.0,
    )


NOW = 1_795_000_000.0  # 2026-11-18 (UTC)
DAY = compute_period("day", "UTC", NOW)
MONTH = compute_period("month", "UTC", NOW)


def test_binding_meter_is_the_one_closest_to_refusing() -> None:
    b = budget(cap={"usdPerDay": 2, "tokensPerMonth": 5000, "usdPerMonth": 50}, tiers={"free": {"usdPerDay": 1}})
    day_usd, month_usd = cap_meter_name("usd", DAY.id), cap_meter_name("usd", MONTH.id)
    acme = tier_meter_name("free", "acme", f"usd:{DAY.id}")
    # The highest percent: the month cap at 25% beats the day cap at 10% and acme at 20%.
    totals = [total(month_usd, 12.5, 50), total(day_usd, 0.2, 2), total(acme, 0.2, 1)]
    r = spend.budget_report(b, totals, [50], NOW, 10)
    assert (r.status["binding"], r.status["spent"], r.status["limit"], r.status["percent"]) == (
        "cap/usd-month",
        12.5,
        50.0,
        25.0,
    )
    assert r.status["refusing"] is False and r.status["display"] == {"spent": "12.5", "percent": "25"}
    assert [c.meter for c in r.caps] == [day_usd, month_usd, cap_meter_name("tokens", MONTH.id)]
    # A refusal on the day cap (at 10%: one big request) makes it the binding meter.
    r = spend.budget_report(b, totals, [50, 100], NOW, 10, refused={day_usd: NOW - 5})
    assert (r.status["binding"], r.status["refusing"], r.status["percent"]) == ("cap/usd-day", True, 10.0)
    assert r.status["display"]["percent"] == "10 (refusing)"
    assert [(c.meter, t) for c, t in r.alerts([50, 100])] == [(day_usd, 100)]  # 10% spent: only the 100% one
    # Spent at or over a limit beats a higher percent below one; a tenant's tier limit counts.
    over = [total(month_usd, 45, 50), total(acme, 1.0, 1)]
    r = spend.budget_report(b, over, [50], NOW, 10)
    assert (r.status["binding"], r.status["percent"], r.status["tenantsOverBudget"]) == (
        "tier:free/usd-day (acme)",
        100.0,
        ["acme"],
    )
    # Refusing beats spent over the limit (onExhausted allow spends past it without refusing).
    r = spend.budget_report(b, [*over, total(day_usd, 1.9, 2)], [50], NOW, 10, refused={day_usd: NOW})
    assert r.status["binding"] == "cap/usd-day"
    # Nothing spent: a tie, to the cap, the day, USD.
    assert spend.budget_report(b, [], [50], NOW, 10).status["binding"] == "cap/usd-day"
    only_tokens = spend.budget_report(budget(cap={"tokensPerDay": 100, "tokensPerMonth": 1000}), [], [50], NOW, 10)
    assert only_tokens.status["binding"] == "cap/tokens-day" and only_tokens.status["unit"] == "tokens"
    assert only_tokens.status["limit"] == 100.0 and only_tokens.status["periodEnd"] == spend.rfc3339(DAY.end)
    no_cap = spend.budget_report(budget(tiers={"free": {"usdPerDay": 1}}), [], [50], NOW, 10)
    assert no_cap.status["spent"] is None and no_cap.status["binding"] is None and no_cap.threshold["reason"] == "NoCap"


def test_a_tenant_refused_below_its_limit_is_over_budget() -> None:
    b = budget(tiers={"free": {"usdPerDay": 0.01}})
    acme, beta = (tier_meter_name("free", t, f"usd:{DAY.id}") for t in ("acme", "beta"))
    totals = [total(acme, 0.0099, 0.01), total(beta, 0.005, 0.01)]
    assert spend.budget_report(b, totals, [100], NOW, 10).status["tenantsOverBudget"] == []
    gamma = tier_meter_name("free", "gamma", f"usd:{DAY.id}")  # refused with nothing spent yet: no total
    r = spend.budget_report(b, totals, [100], NOW, 10, refused={acme: NOW - 1, gamma: NOW - 2})
    assert r.status["tenantsOverBudget"] == ["acme", "gamma"]
    tier = r.status["meters"][0]
    assert (tier["tenants"], tier["tenantsOver"], tier["refusing"]) == (3, 2, True)
    assert [(m.tenant, t) for m, t in r.alerts([100])] == [("acme", 100), ("gamma", 100)]
    assert r.alerts([50, 90]) == []  # the tenants' Event is the 100% one
    assert "admission refuses requests on it" in r.over[0].alert_message(100)


def test_refusal_log_keeps_the_last_refusal_per_meter_within_the_window() -> None:
    log = spend.RefusalLog(window=60)

    def refusal(t: float, meter: str, budget: str = "b") -> SpendRecord:
        return SpendRecord(
            time=t, namespace="n", route="chat", backend="", tenant="a", tier="free", prompt_tokens=0,
            completion_tokens=0, cached_tokens=0, cost_usd=0.0, outcome="rejected", refused_budget=budget,
            refused_meter=meter,
        )  # fmt: skip

    spend_only = SpendRecord(
        time=NOW, namespace="n", route="chat", backend="x", tenant="a", tier="", prompt_tokens=1,
        completion_tokens=1, cached_tokens=0, cost_usd=0.1,
    )  # fmt: skip
    log.add([refusal(NOW - 100, "cap:usd:d"), refusal(NOW - 10, "cap:usd:d"), refusal(NOW - 30, "cap:usd:d")])
    log.add([refusal(NOW - 90, "cap:usd:m"), refusal(NOW - 5, "cap:usd:d", budget="other"), spend_only])
    assert log.recent("b", NOW) == {"cap:usd:d": NOW - 10}  # the month's refusal is too old
    assert log.recent("other", NOW) == {"cap:usd:d": NOW - 5}
    log.prune(NOW + 55)
    assert log.last == {"other": {"cap:usd:d": NOW - 5}}


def test_local_report_without_a_shared_store() -> None:
    b = budget(cap={"usdPerMonth": 50, "usdPerDay": 2}, tiers={"free": {"usdPerDay": 1}}, timezone="Europe/Berlin")
    s = spend.local_budget_report(b, NOW)
    assert (s["binding"], s["limit"], s["unit"], s["display"]) == (
        "cap/usd-day",
        2.0,
        "USD",
        {"spent": "per pod", "percent": "unknown"},
    )
    assert s["spent"] is None and s["percent"] is None and s["tenantsOverBudget"] is None  # cleared if set before
    assert s["periodEnd"] == spend.rfc3339(compute_period("day", "Europe/Berlin", NOW).end, "Europe/Berlin")
    assert [(m["level"], m["window"], m["limit"]) for m in s["meters"]] == [
        ("cap", "day", 2.0),
        ("cap", "month", 50.0),
        ("tier:free", "day", 1.0),
    ]
    tiers_only = spend.local_budget_report(budget(tiers={"free": {"usdPerMonth": 3}}), NOW)
    assert (tiers_only["binding"], tiers_only["limit"]) == ("tier:free/usd-month", 3.0)
    assert spend.local_budget_report(budget(), NOW)["binding"] is None


def test_refusal_records_keep_the_codec_backward_compatible() -> None:
    from kubetoll_core.spend_record import decode_record, encode_record

    spent = record("chat", cost=0.01)
    fields = encode_record(spent, "sc-1")
    assert "refused_budget" not in fields and "refused_meter" not in fields  # spend entries as before
    pairs = dict(zip(fields[::2], fields[1::2]))
    assert decode_record(pairs) == spent and not decode_record(pairs).refusal
    refused = SpendRecord(
        time=NOW, namespace=NS, route="chat", backend="", tenant="acme", tier="free", prompt_tokens=0,
        completion_tokens=0, cached_tokens=0, cost_usd=0.0, outcome="rejected", refused_budget="team",
        refused_meter=cap_meter_name("usd", DAY.id),
    )  # fmt: skip
    fields = encode_record(refused, "sc-1")
    back = decode_record(dict(zip(fields[::2], fields[1::2])))
    assert back == refused and back.refusal


def test_the_sidecar_samples_refusals_per_meter() -> None:
    from kubetoll_sidecar.budgets.refusals import RefusalSampler

    s = RefusalSampler(interval=1.0)
    assert [s.due("b:cap:usd:d", NOW + dt) for dt in (0, 0.2, 0.9, 1.0, 1.5, 2.1)] == [
        True,
        False,
        False,
        True,
        False,
        True,
    ]
    assert s.due("b:cap:usd:m", NOW + 0.1)  # each meter on its own
    assert s.due("b:cap:usd:d", NOW - 10)  # a clock stepped back does not silence a meter


def test_period_times_are_in_the_budgets_timezone() -> None:
    r = spend.budget_report(budget(cap={"usdPerMonth": 5}, timezone="Europe/Berlin"), [], [50], NOW, 10)
    assert (
        r.status["periodStart"] == "2026-11-01T00:00:00+01:00" and r.status["periodEnd"] == "2026-12-01T00:00:00+01:00"
    )


def test_thresholds_use_exact_amounts_and_a_new_period_starts_over() -> None:
    b = budget(cap={"usdPerMonth": 10, "usdPerDay": 1})
    totals = [total(cap_meter_name("usd", MONTH.id), 5.0, 10), total(cap_meter_name("usd", DAY.id), 0.899999999, 1)]
    r = spend.budget_report(b, totals, [50, 75, 90, 100], NOW, 10)
    assert [(c.window, t) for c, t in r.alerts([50, 75, 90, 100])] == [("day", 50), ("day", 75), ("month", 50)]
    assert r.threshold["reason"] == "ThresholdCrossed" and "USD per day cap reached the 75%" in r.threshold["message"]
    assert spend.alert_event_type(75) == "Normal" and spend.alert_event_type(90) == "Warning"
    # Next month: the meters of this month are not its meters; nothing crossed, nothing spent.
    later = spend.budget_report(b, totals, [50], MONTH.end + 3600, 10)
    assert later.alerts([50]) == [] and later.status["spent"] == 0.0 and later.threshold["reason"] == "BelowThresholds"
    # The alert mark is named after the meter, hence after its period.
    keys = RedisKeys("team-a")
    assert keys.alert_posted("b", r.caps[0].meter, 50) != keys.alert_posted("b", later.caps[0].meter, 50)


def test_tenants_over_budget_top_n_by_percent() -> None:
    b = budget(tiers={"free": {"usdPerDay": 1}, "pro": {"usdPerMonth": 100}})
    totals = [
        total(tier_meter_name("free", "a", f"usd:{DAY.id}"), 1.5, 1),
        total(tier_meter_name("free", "b:with:colons", f"usd:{DAY.id}"), 3.0, 1),
        total(tier_meter_name("free", "c", f"usd:{DAY.id}"), 0.5, 1),
        total(tier_meter_name("free", "old", "usd:2020-01-01"), 9.0, 1),  # another day
        total(tier_meter_name("pro", "d", f"usd:{MONTH.id}"), 100.0, 100),
    ]
    r = spend.budget_report(b, totals, [50], NOW, 2)
    assert r.status["tenantsOverBudget"] == ["b:with:colons", "a"]
    assert spend.budget_report(b, totals, [50], NOW, 10).status["tenantsOverBudget"] == ["b:with:colons", "a", "d"]
    free = next(m for m in r.status["meters"] if m["level"] == "tier:free")
    assert (free["tenants"], free["tenantsOver"], free["spent"], free["maxPercent"]) == (3, 2, 5.0, 300.0)


def test_meter_names_round_trip() -> None:
    assert parse_meter_name(cap_meter_name("tokens", "2026-11-22")) == parse_meter_name("cap:tokens:2026-11-22")
    n = parse_meter_name(tier_meter_name("free", "user:42@x", "usd:2026-11"))
    assert (n.level, n.tier, n.tenant, n.unit, n.period) == ("tier:free", "free", "user:42@x", "usd", "2026-11")
    n = parse_meter_name(tier_meter_name("free", "a:b", "tpm"))
    assert (n.tenant, n.unit, n.period) == ("a:b", "tpm", "")
    assert parse_meter_name("something:else") is None
    # The sidecar's meters are built from the same functions.
    config = RouterConfig.model_validate(
        {
            "namespace": "team-a",
            "backends": [
                {
                    "name": "x",
                    "provider": "openai-compatible",
                    "model": "m",
                    "endpoint": "http://x/v1",
                    "pricing": {"inputPerMTok": 1, "outputPerMTok": 1},
                }
            ],
            "routes": [{"name": "chat", "rules": [{"backends": ["x"]}]}],
            "budgets": [
                {"name": "b", "cap": {"usdPerDay": 1}, "tiers": {"free": {"usdPerDay": 1, "tokensPerMinute": 5}}}
            ],
        }
    )
    ms = BudgetMeters(config).for_request("chat", "t:1", "free", NOW)
    assert sorted(m.key for m in ms.all()) == sorted(
        [
            "b:" + cap_meter_name("usd", DAY.id),
            "b:" + tier_meter_name("free", "t:1", f"usd:{DAY.id}"),
            "b:" + tier_meter_name("free", "t:1", "tpm"),
        ]
    )


def test_cache_counter_window_and_policy_routes() -> None:
    c = spend.CacheCounter()
    c.roll(NOW)
    assert c.cursor == f"{int(DAY.start * 1000) - 300_000 - 1}-{2**64 - 1}"
    c.add(
        [
            SpendRecord(
                time=NOW,
                namespace="n",
                route="chat",
                backend="",
                tenant="",
                tier="",
                prompt_tokens=0,
                completion_tokens=0,
                cached_tokens=0,
                cost_usd=0,
                cache_hit="exact",
                avoided_usd=0.1,
            ),
            SpendRecord(
                time=DAY.start - 1,
                namespace="n",
                route="chat",
                backend="",
                tenant="",
                tier="",
                prompt_tokens=0,
                completion_tokens=0,
                cached_tokens=0,
                cost_usd=0,
                cache_hit="exact",
                avoided_usd=5,
            ),
        ]
    )
    assert c.status(["chat", "x"]) == {"hits": 1, "savedUSD": 0.1, "countersSince": spend.rfc3339(DAY.start)}
    c.roll(DAY.end + 1)
    assert c.status(["chat"])["hits"] == 0


def test_operator_credentials_are_read_per_connection(tmp_path: Any) -> None:
    pw = tmp_path / "password"
    pw.write_text("s3cret\n")
    creds = RedisCredentials(None, pw, None)
    assert creds.configured and creds.get_credentials() == ("s3cret",)
    pw.write_text("rotated")
    assert creds.get_credentials() == ("rotated",)
    assert RedisCredentials(None, None, "from-env").get_credentials() == ("from-env",)
    assert not RedisCredentials(None, None, None).configured
    assert password_from_env({"KUBETOLL_REDIS_PASSWORD": "x"}) == "x" and password_from_env({}) is None
    from kubetoll_operator.handlers import OperatorOptions

    assert "from-env" not in repr(OperatorOptions(redis_password="from-env"))


def test_projected_exhaustion_follows_the_spend_rate_across_passes() -> None:
    """The reporter feeds each cap's spend to a rate tracker on every pass: once it has seen a quarter of
    an hour, the status says when the cap runs out at that pace, if before the period ends."""
    b = budget(cap={"usdPerDay": 100, "usdPerMonth": 10_000})
    day_usd, month_usd = cap_meter_name("usd", DAY.id), cap_meter_name("usd", MONTH.id)
    rates = BurnRates()
    start = DAY.start + 3600  # 01:00
    spent = 0.0
    r = None
    for minute in range(0, 21):
        now = start + minute * 60
        spent = minute * 0.5  # $30 an hour: the $100 day cap runs out at about 04:20
        r = spend.budget_report(
            b, [total(day_usd, spent, 100), total(month_usd, spent, 10_000)], [50], now, 10, rates=rates
        )
        if minute < 15:  # under a quarter of the window: no projection yet
            assert r.status["projectedExhaustion"] is None, minute
    assert r is not None
    expected = start + 20 * 60 + (100 - spent) / (0.5 / 60)
    day_row, month_row = r.status["meters"][0], r.status["meters"][1]
    assert day_row["projectedExhaustion"] == r.status["projectedExhaustion"]
    got = dt.datetime.fromisoformat(day_row["projectedExhaustion"].replace("Z", "+00:00")).timestamp()
    assert expected <= got < expected + 60  # to the minute
    # The month cap would run out in two weeks, within its month only if the month is long enough.
    month_left = MONTH.end - (start + 20 * 60)
    assert (month_row["projectedExhaustion"] is None) == ((10_000 - spent) / (0.5 / 60) >= month_left)
    # No spend for a while: the rate falls, and a cap that lasts its period has no projection.
    later = start + 20 * 60 + 2 * 3600
    r = spend.budget_report(
        b, [total(day_usd, spent, 100), total(month_usd, spent, 10_000)], [50], later, 10, rates=rates
    )
    assert r.status["projectedExhaustion"] is None
    # Without trackers (a caller that does not follow rates) the field is not set at all.
    assert "projectedExhaustion" not in spend.budget_report(b, [total(day_usd, 1, 100)], [50], later, 10).status
