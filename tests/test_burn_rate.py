"""Burn-aware downgrade (`downgrade.burnRate`): the spend-rate arithmetic, and a sidecar on an injected
clock that downgrades when the cap would run out before the day ends, not when the pace is slow,
and never for a tier the policy leaves out."""

from __future__ import annotations

import datetime as dt

import pytest

from kubetoll_core.burn_rate import SAMPLES_PER_WINDOW, BurnRate, BurnRates
from kubetoll_core.periods import FakeClock, compute_period
from test_budgets import budget_config, post

T0 = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC).timestamp()  # 14 h before the UTC day ends


# --------------------------------------------------------------------------- the arithmetic


def test_rate_is_the_window_average_once_enough_history_is_seen():
    b = BurnRate(window=3600)
    b.observe(0, 0)
    assert b.rate(0) is None
    b.observe(600, 10)  # 10 minutes: under a quarter of the window
    assert b.rate(600) is None
    b.observe(900, 15)
    assert b.rate(900) == pytest.approx(15 / 900)
    # Past the window, the oldest readings stop counting: a burst an hour ago is forgotten.
    for t in range(960, 7200, 60):
        b.observe(t, 15 + (t - 900) * 0.001)
    assert b.rate(7140) == pytest.approx(0.001, rel=0.05)
    assert len(b.points) <= SAMPLES_PER_WINDOW + 2


def test_exhaustion_time_and_the_period_end():
    b = BurnRate(window=3600)
    b.observe(0, 0)
    b.observe(1800, 18)  # 0.01 a second
    assert b.exhaustion(1800, 18, 100) == pytest.approx(1800 + 82 / 0.01)
    assert b.exhausts_before(1800, 18, 100, period_end=10_001)
    assert not b.exhausts_before(1800, 18, 100, period_end=9_999)
    assert b.exhaustion(1800, 100, 100) == 1800  # already there
    flat = BurnRate(window=3600)
    flat.observe(0, 5)
    flat.observe(1800, 5)
    assert flat.exhaustion(1800, 5, 100) is None  # not spending: never


def test_falling_spend_and_stale_readings_reset_the_estimate():
    b = BurnRate(window=3600)
    b.observe(0, 50)
    b.observe(1800, 60)
    b.observe(1900, 10)  # the store lost its data: start again
    assert b.rate(1900) is None and list(b.points) == [(1900, 10)]
    b.observe(2900, 20)
    assert b.rate(2900) == pytest.approx(0.01)
    assert b.rate(2900 + 3601) is None  # nothing read for a whole window
    b.observe(100, 99)  # out of order: ignored
    b.observe(float("nan"), 1)
    assert b.points[-1] == (2900, 20)
    with pytest.raises(ValueError):
        BurnRate(window=0)


def test_trackers_are_per_meter_bounded_and_pruned():
    rates = BurnRates(window=600, max_meters=3)
    for i in range(5):
        rates.observe(f"m{i}", 100.0 + i, 1.0)
    assert len(rates) == 3  # the least recently read went first
    rates.prune(100.0 + 4 + 2 * 600 + 1)
    assert len(rates) == 0


# --------------------------------------------------------------------------- through a sidecar

DOWNGRADE = {"atPercent": 95, "backends": ["gpu"], "burnRate": {"windowMinutes": 60}}


def burning_config(sim, burn=None, tiers=None):
    budget = {"name": "b", "cap": {"tokensPerDay": 2000}, "capOnExhausted": "allow"}
    if tiers:
        budget["tiers"] = tiers
    return budget_config(
        sim,
        budget,
        tenancy={"defaultTier": "free"} if tiers else None,
        downgrade={**DOWNGRADE, "burnRate": burn or DOWNGRADE["burnRate"]},
    )


async def play(sc, clock, n, every, headers=None):
    backends = []
    for _ in range(n):
        status, h, _ = await post(sc, headers, max_tokens=16)
        assert status == 200
        backends.append(h["x-kubetoll-backend"])
        clock.advance(every)
    return backends


async def test_a_pace_that_would_exhaust_the_cap_today_downgrades(sim, start_sidecar):
    clock = FakeClock(T0)
    sc = await start_sidecar(burning_config(sim), clock=clock)
    # ~25 tokens a minute: 2,000 tokens last about 80 minutes, and the day has 14 hours left.
    backends = await play(sc, clock, 30, 60)
    first = backends.index("gpu")
    # Not before a quarter of the window (15 minutes) was seen; then every request.
    assert 15 <= first <= 17 and set(backends[first:]) == {"gpu"}
    spent = sum(r.prompt_tokens + r.completion_tokens for r in sc.sidecar.ledger.records())
    assert spent < 0.95 * 2000  # atPercent alone would still serve from primary
    assert sc.sidecar.metrics.downgrades.labels("chat", "burn_rate")._value.get() == 30 - first
    assert sc.sidecar.metrics.downgrades.labels("chat", "at_percent")._value.get() == 0


async def test_a_pace_the_cap_can_carry_to_the_end_of_the_day_does_not(sim, start_sidecar):
    clock = FakeClock(T0)
    sc = await start_sidecar(burning_config(sim), clock=clock)
    # ~25 tokens every 30 minutes: 2,000 would last about 40 hours.
    backends = await play(sc, clock, 12, 1800)
    assert set(backends) == {"primary"}
    assert clock.time() < compute_period("day", "UTC", T0).end  # still the same day


async def test_a_tier_left_out_of_burn_rate_keeps_its_backends(sim, start_sidecar):
    clock = FakeClock(T0)
    tiers = {"free": {"requestsPerMinute": 1000}, "premium": {"requestsPerMinute": 1000}}
    sc = await start_sidecar(burning_config(sim, {"windowMinutes": 60, "tiers": ["free"]}, tiers), clock=clock)
    free, premium = {"x-kubetoll-tenant": "f"}, {"x-kubetoll-tenant": "p", "x-kubetoll-tier": "premium"}
    got = {"free": [], "premium": []}
    for _ in range(25):
        for name, h in (("free", free), ("premium", premium)):
            status, headers, _ = await post(sc, h, max_tokens=16)
            assert status == 200
            got[name].append(headers["x-kubetoll-backend"])
        clock.advance(60)
    assert got["free"][-1] == "gpu"
    assert set(got["premium"]) == {"primary"}  # the cap burns just as fast, but premium is not cut back
