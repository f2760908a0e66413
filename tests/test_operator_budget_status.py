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

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from kubetoll_core.ledger_stream import MeterTotal
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
from support.kopf_env import NS, Kubectl, condition, eventually, stop_operator
from support.redis_server import RedisProcess

INTERVAL = 0.1

BACKEND = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "ModelBackend",
    "metadata": {"name": "local"},
    "spec": {
        "provider": "openai-compatible",
        "model": "m",
        "endpoint": "http://llm:8000/v1",
        "pricing": {"inputPerMTok": 1, "outputPerMTok": 2},
    },
}
ROUTE = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "ModelRoute",
    "metadata": {"name": "chat"},
    "spec": {"rules": [{"backends": ["local"]}], "cachePolicy": "faq"},
}
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
        await store.settle(reservation, {m.key: usd for m in meters.usd}, now)
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

    async def zero() -> None:
        s = (await cluster.get("TokenBudget", "team"))["status"]
        assert (s["spent"], s["limit"], s["remaining"], s["unit"], s["percent"]) == (0.0, 10.0, 10.0, "USD", 0.0)
        assert s["periodStart"] == spend.rfc3339(month.start) and s["periodEnd"] == spend.rfc3339(month.end)
        assert s["tenantsOverBudget"] == []
        assert condition({"status": s}, "SpendKnown")["status"] == "True"

    await eventually(zero)

    await spend_like_a_sidecar(redis.url, config, 2.0, tenant="acme")
    await spend_like_a_sidecar(redis.url, config, 0.25, tenant="beta")

    async def shown() -> dict[str, Any]:
        tb = await cluster.get("TokenBudget", "team")
        s = tb["status"]
        assert (s["spent"], s["limit"], s["remaining"], s["unit"], s["percent"]) == (2.25, 10.0, 7.75, "USD", 22.5)
        assert s["tenantsOverBudget"] == ["acme"]  # 2 of its 1 USD/day; beta spent 0.25
        rows = {(m["level"], m["unit"], m["window"]): m for m in s["meters"]}
        assert rows[("cap", "USD", "month")]["spent"] == 2.25 and rows[("cap", "USD", "month")]["period"] == month.id
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
    assert await threshold_events(cluster) == []

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

    await spend_like_a_sidecar(redis.url, config, 5.5)  # 55%: crosses 50

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

    await spend_like_a_sidecar(redis.url, config, 2.5)  # 80%: crosses 75

    async def seventy_five() -> None:
        events = await threshold_events(cluster)
        assert [("50%" in e["message"], "75%" in e["message"]) for e in events] == [(True, False), (False, True)]
        assert events[1]["type"] == "Normal"
        assert "75%" in condition(await cluster.get("TokenBudget", "team"), "ThresholdReached")["message"]

    await eventually(seventy_five)

    # More spend under the next threshold: no Event.
    await spend_like_a_sidecar(redis.url, config, 0.5)  # 85%

    async def at_85() -> None:
        assert (await cluster.get("TokenBudget", "team"))["status"]["percent"] == 85.0

    await eventually(at_85)
    reports = memo.reconciler.spend_reports
    await eventually(lambda: _more_reports(memo, reports + 5))
    assert len(await threshold_events(cluster)) == 2

    # A restarted operator (empty memory) finds the marks in Redis: no duplicates.
    await stop_operator(memo)
    memo = await start_operator(redis_url=redis.url, spend_interval_seconds=INTERVAL)
    await eventually(lambda: _more_reports(memo, 5))
    assert len(await threshold_events(cluster)) == 2

    # 95%: 90 is a Warning. A second operator at the same time (a peer that was not paused) posts nothing more.
    other = await start_operator(redis_url=redis.url, spend_interval_seconds=INTERVAL)
    await spend_like_a_sidecar(redis.url, config, 1.0)

    async def ninety() -> None:
        events = await threshold_events(cluster)
        assert len(events) == 3 and events[2]["type"] == "Warning" and "90%" in events[2]["message"]

    await eventually(ninety)
    mine, theirs = memo.reconciler.spend_reports + 5, other.reconciler.spend_reports + 5
    await eventually(lambda: _more_reports(memo, mine))
    await eventually(lambda: _more_reports(other, theirs))
    assert len(await threshold_events(cluster)) == 3
    assert await redis_keys_matching(redis, f"kt:{{{NS}:team}}:alert:*") == sorted(
        f"kt:{{{NS}:team}}:alert:{cap_meter_name('usd', compute_period('month', 'UTC', time.time()).id)}:{t}"
        for t in (50, 75, 90)
    )


async def _more_reports(memo: Any, at_least: int) -> None:
    assert memo.reconciler.spend_reports >= at_least


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
    await spend_like_a_sidecar(redis.url, config, 3.0)

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
    reports = memo.reconciler.spend_reports
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


async def test_no_redis_url_no_reporter(cluster: Kubectl, start_operator: Any) -> None:
    memo = await start_operator(spend_interval_seconds=INTERVAL)
    await compiled_config(cluster)

    async def compiled() -> None:
        tb = await cluster.get("TokenBudget", "team")
        assert condition(tb, "Ready")["status"] == "True"

    await eventually(compiled)
    await asyncio.sleep(3 * INTERVAL)
    tb = await cluster.get("TokenBudget", "team")
    assert "spent" not in tb["status"] and {c["type"] for c in tb["status"]["conditions"]} == {
        "Ready",
        "ResolvedRefs",
        "TenancyAccepted",
    }
    assert memo.reconciler.reporters == {} and memo.reconciler.spend_reports == 0


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


def test_headline_is_the_longest_period_usd_before_tokens() -> None:
    b = budget(cap={"usdPerDay": 2, "tokensPerMonth": 5000, "usdPerMonth": 50})
    r = spend.budget_report(b, [total(cap_meter_name("usd", MONTH.id), 12.5, 50)], [50], NOW, 10)
    assert (r.status["spent"], r.status["limit"], r.status["unit"], r.status["percent"]) == (12.5, 50.0, "USD", 25.0)
    assert [c.meter for c in r.caps] == [
        cap_meter_name("usd", MONTH.id),
        cap_meter_name("tokens", MONTH.id),
        cap_meter_name("usd", DAY.id),
    ]
    only_tokens = spend.budget_report(budget(cap={"tokensPerDay": 100, "tokensPerMonth": 1000}), [], [50], NOW, 10)
    assert only_tokens.status["unit"] == "tokens" and only_tokens.status["limit"] == 1000.0
    assert only_tokens.status["periodEnd"] == spend.rfc3339(MONTH.end)
    no_cap = spend.budget_report(budget(tiers={"free": {"usdPerDay": 1}}), [], [50], NOW, 10)
    assert no_cap.status["spent"] is None and no_cap.threshold["reason"] == "NoCap"


def test_period_times_are_in_the_budgets_timezone() -> None:
    r = spend.budget_report(budget(cap={"usdPerMonth": 5}, timezone="Europe/Berlin"), [], [50], NOW, 10)
    assert (
        r.status["periodStart"] == "2026-11-01T00:00:00+01:00" and r.status["periodEnd"] == "2026-12-01T00:00:00+01:00"
    )


def test_thresholds_use_exact_amounts_and_a_new_period_starts_over() -> None:
    b = budget(cap={"usdPerMonth": 10, "usdPerDay": 1})
    totals = [total(cap_meter_name("usd", MONTH.id), 5.0, 10), total(cap_meter_name("usd", DAY.id), 0.899999999, 1)]
    r = spend.budget_report(b, totals, [50, 75, 90, 100], NOW, 10)
    assert [(c.window, t) for c, t in r.alerts([50, 75, 90, 100])] == [("month", 50), ("day", 50), ("day", 75)]
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
