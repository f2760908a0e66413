"""Tenants, tiers and budgets (in memory): reject, downgrade, allow; buckets; calendar resets."""

from __future__ import annotations

import datetime as dt

import aiohttp
import openai
import pytest

from kubetoll_core.periods import FakeClock, compute_period
from support.harness import base_config

# 2026-11-22 10:00 UTC
T0 = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC).timestamp()


def budget_config(sim, budget, tenancy=None, downgrade=None, gpu=True):
    cfg = base_config(sim.url)
    if gpu:
        cfg["backends"].append(
            {
                "name": "gpu",
                "provider": "openai-compatible",
                "model": "llama-3.1-8b",
                "endpoint": sim.url + "/v1",
                "credentials": {"env": "KT_TEST_OPENAI_KEY"},
                "pricing": {"gpuHourlyUSD": 0.36, "tokensPerSecond": 1000},
            }
        )
    route = {"name": "chat", "rules": [{"backends": ["primary"]}]}
    if downgrade:
        route["downgrade"] = downgrade
    cfg["routes"] = [route]
    cfg["budgets"] = [budget]
    if tenancy:
        cfg["tenancy"] = tenancy
    return cfg


async def post(sc, headers=None, **body):
    payload = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], **body}
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/chat/completions", json=payload, headers=headers or {}) as r:
            return r.status, dict(r.headers), await r.json()


async def test_requests_per_minute_rejects_with_retry_after_and_refills(sim, start_sidecar):
    clock = FakeClock(T0)
    cfg = budget_config(sim, {"name": "b", "tiers": {"default": {"requestsPerMinute": 2}}})
    sc = await start_sidecar(cfg, clock=clock)
    h = {"x-kubetoll-tenant": "alice"}
    assert (await post(sc, h))[0] == 200
    assert (await post(sc, h))[0] == 200
    status, headers, body = await post(sc, h)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert headers["Retry-After"] == "30"  # one request refills in 60/2 s
    # Another tenant has its own bucket.
    assert (await post(sc, {"x-kubetoll-tenant": "bob"}))[0] == 200
    clock.advance(30)
    assert (await post(sc, h))[0] == 200
    assert not any(r.body is None for r in sim.requests)


async def test_sdk_raises_rate_limit_error_on_budget_429(sim, start_sidecar):
    cfg = budget_config(sim, {"name": "b", "tiers": {"default": {"requestsPerMinute": 1}}})
    sc = await start_sidecar(cfg, clock=FakeClock(T0))
    client = sc.openai()
    await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], user="u1")
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], user="u1")


async def test_tokens_per_minute_reservation_and_settlement(sim, start_sidecar):
    clock = FakeClock(T0)
    cfg = budget_config(sim, {"name": "b", "tiers": {"default": {"tokensPerMinute": 100}}})
    sc = await start_sidecar(cfg, clock=clock)
    # The reservation is prompt + max_tokens: 200 cannot fit a 100-token bucket at all,
    # so waiting would not help: a 400 that says so (tests/test_upstream_errors.py has the rest).
    status, headers, body = await post(sc, max_tokens=200)
    assert status == 400 and "tokens-per-minute" in body["error"]["message"]
    # A small request fits, and settles at its actual usage (well under its reservation).
    status, headers, _ = await post(sc, max_tokens=20)
    assert status == 200
    remaining = float(headers["x-kubetoll-budget-remaining"].split()[0])
    rec = list(sc.sidecar.ledger.records())[-1]
    # Settled before the headers are written: the header shows actual use, not the reservation.
    assert rec.prompt_tokens + rec.completion_tokens < rec.prompt_tokens + 20
    assert remaining == pytest.approx(100 - (rec.prompt_tokens + rec.completion_tokens), abs=0.01)
    state = sc.sidecar.store.snapshot(
        sc.sidecar.state.meters.for_request("chat", "anonymous", "default", clock.time()).tokens[0], clock.time()
    )
    assert state.used == pytest.approx(rec.prompt_tokens + rec.completion_tokens)


async def test_usd_cap_rejects_until_the_day_resets_in_its_timezone(sim, start_sidecar):
    clock = FakeClock(T0)
    # A tiny daily cap: one gpt-4o call (~$0.0002) fits, the next reservation does not.
    budget = {"name": "b", "timezone": "America/New_York", "cap": {"usdPerDay": 0.0003}}
    sc = await start_sidecar(budget_config(sim, budget, gpu=False), clock=clock)
    assert (await post(sc, max_tokens=16))[0] == 200
    status, headers, body = await post(sc, max_tokens=16)
    assert status == 429 and body["error"]["code"] == "budget_exhausted"
    # Retry-After points at the next local midnight in New York (05:00 UTC on the 23rd).
    ny_midnight = compute_period("day", "America/New_York", clock.time()).end
    assert int(headers["Retry-After"]) == pytest.approx(ny_midnight - clock.time(), abs=1)
    clock.now = ny_midnight + 1
    assert (await post(sc, max_tokens=16))[0] == 200


async def test_month_period_resets(sim, start_sidecar):
    clock = FakeClock(dt.datetime(2026, 11, 30, 23, 0, tzinfo=dt.UTC).timestamp())
    budget = {"name": "b", "cap": {"tokensPerMonth": 60}}
    sc = await start_sidecar(budget_config(sim, budget, gpu=False), clock=clock)
    assert (await post(sc, max_tokens=16))[0] == 200
    assert (await post(sc, max_tokens=40))[0] == 429
    clock.advance(3600)  # December
    assert (await post(sc, max_tokens=40))[0] == 200


async def test_on_exhausted_downgrade_serves_from_the_cheaper_backends(sim, start_sidecar):
    budget = {"name": "b", "tiers": {"default": {"requestsPerMinute": 1, "onExhausted": "downgrade"}}}
    cfg = budget_config(sim, budget, downgrade={"atPercent": 100, "backends": ["gpu"]})
    sc = await start_sidecar(cfg, clock=FakeClock(T0))
    status, headers, _ = await post(sc)
    assert status == 200 and headers["x-kubetoll-backend"] == "primary"
    status, headers, _ = await post(sc)
    assert status == 200 and headers["x-kubetoll-backend"] == "gpu" and headers["x-kubetoll-downgraded"] == "true"
    assert sim.requests[-1].body["model"] == "llama-3.1-8b"


async def test_downgrade_without_downgrade_backends_rejects_clearly(sim, start_sidecar):
    budget = {"name": "b", "tiers": {"default": {"requestsPerMinute": 1, "onExhausted": "downgrade"}}}
    sc = await start_sidecar(budget_config(sim, budget), clock=FakeClock(T0))
    await post(sc)
    status, _, body = await post(sc)
    assert status == 429 and "no downgrade backends" in body["error"]["message"]


async def test_on_exhausted_allow_serves_and_counts_the_overage(sim, start_sidecar):
    clock = FakeClock(T0)
    budget = {"name": "b", "cap": {"usdPerDay": 0.0001}, "capOnExhausted": "allow"}
    sc = await start_sidecar(budget_config(sim, budget, gpu=False), clock=clock)
    for _ in range(3):
        assert (await post(sc, max_tokens=16))[0] == 200
    meter = sc.sidecar.state.meters.for_request("chat", "x", "default", clock.time()).usd[0]
    spent = sc.sidecar.store.spent(meter.key)
    assert spent > 0.0001  # served past the cap and counted
    assert spent == pytest.approx(sum(r.cost_usd for r in sc.sidecar.ledger.records()))


async def test_downgrade_at_percent(sim, start_sidecar):
    clock = FakeClock(T0)
    budget = {"name": "b", "cap": {"tokensPerDay": 200}, "capOnExhausted": "allow"}
    cfg = budget_config(sim, budget, downgrade={"atPercent": 50, "backends": ["gpu"]})
    sc = await start_sidecar(cfg, clock=clock)
    backends = []
    for _ in range(6):
        status, headers, _ = await post(sc, max_tokens=16)
        assert status == 200
        backends.append(headers["x-kubetoll-backend"])
    # Each call uses ~25 tokens: the first ones go to primary, then at >= 50% of 200 to gpu.
    assert backends[0] == "primary" and backends[-1] == "gpu"
    assert backends == sorted(backends, key=lambda b: b == "gpu")
    assert sc.sidecar.metrics.downgrades.labels("chat", "at_percent")._value.get() >= 1


async def test_tenant_tiers_from_headers_and_unknown_tier_falls_back(sim, start_sidecar):
    budget = {"name": "b", "tiers": {"free": {"requestsPerMinute": 1}, "premium": {"requestsPerMinute": 100}}}
    cfg = budget_config(sim, budget, tenancy={"defaultTier": "free"})
    sc = await start_sidecar(cfg, clock=FakeClock(T0))
    for _ in range(3):
        assert (await post(sc, {"x-kubetoll-tenant": "p", "x-kubetoll-tier": "premium"}))[0] == 200
    assert (await post(sc, {"x-kubetoll-tenant": "f", "x-kubetoll-tier": "gold"}))[0] == 200
    # "gold" is not a tier: the tenant is on the default (free) tier and its 1 rpm.
    assert (await post(sc, {"x-kubetoll-tenant": "f", "x-kubetoll-tier": "gold"}))[0] == 429


async def test_tenant_required(sim, start_sidecar):
    cfg = budget_config(sim, {"name": "b"}, tenancy={"required": True})
    sc = await start_sidecar(cfg)
    status, _, body = await post(sc)
    assert status == 400 and body["error"]["code"] == "tenant_required"
    assert (await post(sc, user="someone"))[0] == 200


async def test_suspended_budget_is_403(sim, start_sidecar):
    sc = await start_sidecar(budget_config(sim, {"name": "b", "suspended": True}))
    status, _, body = await post(sc)
    assert status == 403 and body["error"]["code"] == "budget_suspended"
    assert not sim.requests


async def test_failed_call_releases_its_reservation(sim, start_sidecar):
    from kubetoll_tools.simulator import Fault

    clock = FakeClock(T0)
    sc = await start_sidecar(budget_config(sim, {"name": "b", "cap": {"tokensPerDay": 1000}}, gpu=False), clock=clock)
    sim.enqueue_fault(Fault(status=500))
    assert (await post(sc, max_tokens=100))[0] == 502
    meter = sc.sidecar.state.meters.for_request("chat", "x", "default", clock.time()).tokens[0]
    assert sc.sidecar.store.snapshot(meter, clock.time()).used == 0


def test_dst_days_are_23_and_25_hours():
    spring = dt.datetime(2026, 3, 29, 12, tzinfo=dt.UTC).timestamp()  # Europe DST starts
    p = compute_period("day", "Europe/Berlin", spring)
    assert p.end - p.start == 23 * 3600 and p.id == "2026-03-29"
    autumn = dt.datetime(2026, 10, 25, 12, tzinfo=dt.UTC).timestamp()
    assert (
        compute_period("day", "Europe/Berlin", autumn).end - compute_period("day", "Europe/Berlin", autumn).start
        == 25 * 3600
    )
    m = compute_period("month", "UTC", dt.datetime(2026, 12, 31, 23, tzinfo=dt.UTC).timestamp())
    assert m.id == "2026-12" and dt.datetime.fromtimestamp(m.end, dt.UTC) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)


async def test_client_that_goes_away_is_billed_what_the_provider_did_and_no_more(sim, start_sidecar):
    """The upstream call runs to its end (the provider bills it): spend settles at its actual usage,
    the reservation (prompt + max_tokens) does not linger, and the ledger has the record."""
    import asyncio

    from kubetoll_tools.simulator import Fault
    from support.harness import wait_until

    clock = FakeClock(T0)
    sc = await start_sidecar(budget_config(sim, {"name": "b", "cap": {"tokensPerDay": 10_000}}, gpu=False), clock=clock)
    meter = sc.sidecar.state.meters.for_request("chat", "x", "default", clock.time()).tokens[0]
    sim.enqueue_fault(Fault(kind="slow_first_token", delay=1.0))
    task = asyncio.create_task(post(sc, max_tokens=100))
    await wait_until(lambda: sc.sidecar.store.snapshot(meter, clock.time()).used > 100)  # reserved
    task.cancel()  # the client disconnects while the upstream is still thinking
    await wait_until(lambda: list(sc.sidecar.ledger.records()), timeout=3)
    (rec,) = sc.sidecar.ledger.records()
    assert sc.sidecar.store.snapshot(meter, clock.time()).used == rec.prompt_tokens + rec.completion_tokens < 100
