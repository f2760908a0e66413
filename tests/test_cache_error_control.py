"""Error-rate control of the semantic cache: a simulated stream whose truth is known.

Each simulated request has a nearest cached question with a similarity and a
truth (the cached answer fits, or not). Similarities of right and wrong
matches come from two overlapping distributions; the strict check passes 90%
of right matches and 35% of wrong ones. The controller sees only what the
cache would: the similarity and the strict check's verdict, then, for the
requests it sends upstream, whether the cached answer would have been right.
The oracle is the best static threshold, computed from a million draws of the
same truth: the lowest one whose served error rate is within target.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from kubetoll_core.usage import Usage
from kubetoll_sidecar.cache.answer_match import (
    answers_match,
    cosine,
    embedding_similarity,
    normalize_answer,
    numbers_in,
)
from kubetoll_sidecar.cache.error_control import (
    BELOW_MIN,
    EXPLORE,
    HIT,
    LABEL,
    REJECTED,
    Decision,
    ErrorRateController,
    _newton,
    wilson_interval,
)

MIN, MAX = 0.5, 0.99
Sampler = Callable[[np.random.Generator, int], np.ndarray]


def beta(a: float, b: float) -> Sampler:
    return lambda rng, n: rng.beta(a, b, n)


def log_distance(mean: float, sd: float) -> Sampler:
    """1 - a log-normal distance (capped so the cosine stays in [-1, 1])."""
    return lambda rng, n: 1.0 - np.minimum(np.exp(rng.normal(mean, sd, n)), 1.5)


# (right matches, wrong matches)
BETA = (beta(40, 2), beta(10, 3))
LOGNORMAL = (log_distance(-3.0, 0.6), log_distance(-1.6, 0.5))
LOGNORMAL_CLOSER = (log_distance(-3.0, 0.6), log_distance(-2.2, 0.5))  # wrong matches drift closer
SCENARIOS = {"beta": BETA, "lognormal": LOGNORMAL, "lognormal_closer": LOGNORMAL_CLOSER}


def draw(rng: np.random.Generator, n: int, scenario: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    right_s, wrong_s = SCENARIOS[scenario]
    right = rng.random(n) < 0.5
    s = np.where(right, right_s(rng, n), wrong_s(rng, n))
    passed = np.where(right, rng.random(n) < 0.9, rng.random(n) < 0.35)
    return s, right, passed


@functools.cache
def oracle(scenario: str, target: float) -> tuple[float, float]:
    """(threshold, hit rate among candidates) of the best static threshold on the controller's grid."""
    s, right, passed = draw(np.random.default_rng(12345), 1_000_000, scenario)
    keep = passed & (s >= MIN)
    s, right = s[keep], right[keep]
    order = np.argsort(-s)
    s, right = s[order], right[order]
    error_above = np.cumsum(~right) / np.arange(1, s.size + 1)
    best = None
    for t in np.linspace(MIN, MAX, round((MAX - MIN) / 0.005) + 1)[::-1]:
        k = int(np.searchsorted(-s, -t, side="right"))
        if k and error_above[k - 1] > target:
            break
        best = t
    assert best is not None, "no feasible static threshold: not a scenario for this test"
    k = int(np.searchsorted(-s, -best, side="right"))
    return float(best), k / s.size


@dataclass
class Run:
    candidates: int = 0  # passed the strict check, at or above MIN
    served: int = 0
    wrong: int = 0
    served_after: int = 0  # from `after` on
    wrong_after: int = 0
    thresholds: list[float | None] = field(default_factory=list)  # every 1,000 requests
    rates: list[float] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.wrong / max(self.served, 1)

    @property
    def hit_rate(self) -> float:
        return self.served / max(self.candidates, 1)


def play(policy: Any, s: np.ndarray, right: np.ndarray, passed: np.ndarray, after: int = 0) -> Run:
    run = Run()
    for i in range(s.size):
        d = policy.decide(float(s[i]), bool(passed[i]))
        if passed[i] and s[i] >= MIN:
            run.candidates += 1
        if d.serve:
            run.served += 1
            run.wrong += not right[i]
            if i >= after:
                run.served_after += 1
                run.wrong_after += not right[i]
        elif d.explore:
            policy.observe(d, bool(right[i]))
        if i % 1000 == 999:
            run.thresholds.append(getattr(policy, "threshold", None))
            run.rates.append(getattr(policy, "exploration_rate", 0.0))
    return run


def within_target(wrong: int, served: int, target: float) -> bool:
    """At most what a policy whose true error rate is the target shows, plus two binomial standard deviations."""
    return wrong <= target * served + 2.0 * math.sqrt(target * served)


# For steady traffic: evidence kept four times longer (docs/caching.md, "Error-rate control").
LONG_MEMORY = (("half_life", 20_000), ("memory", 80_000), ("label_window", 8192), ("explore_window", 4096))
SETTINGS: dict[tuple[str, float], tuple[tuple[str, int], ...]] = {("beta", 0.01): LONG_MEMORY}


@functools.cache
def controlled(scenario: str, target: float, seed: int = 1, n: int = 20_000) -> Run:
    s, right, passed = draw(np.random.default_rng(seed), n, scenario)
    settings = dict(SETTINGS.get((scenario, target), ()))
    ctl = ErrorRateController(target, MIN, MAX, rng=random.Random(seed), **settings)
    return play(ctl, s, right, passed)


class AlwaysServe:
    """A broken controller: every candidate above the minimum is served."""

    threshold = MIN
    exploration_rate = 0.0

    def decide(self, similarity: float, verifier_passed: bool = True) -> Decision:
        ok = verifier_passed and similarity >= MIN
        return Decision(ok, False, HIT if ok else REJECTED, similarity)

    def observe(self, decision: Decision, correct: bool) -> None:
        raise AssertionError("never asked to explore")


class Fixed(AlwaysServe):
    """A controller that never adapts: a static threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def decide(self, similarity: float, verifier_passed: bool = True) -> Decision:
        ok = verifier_passed and similarity >= self.threshold
        return Decision(ok, False, HIT if ok else REJECTED, similarity)


# --------------------------------------------------------------------------- the simulated stream

# Lower bounds of the hit rate as a fraction of the oracle's. At 1% on the Beta
# stream the threshold needs many labels from where hits are rare, and stays
# well above the oracle's (hence the long memory there).
MIN_SHARE_OF_ORACLE = {("beta", 0.01): 0.25, ("beta", 0.05): 0.75, ("lognormal", 0.01): 0.65, ("lognormal", 0.05): 0.8}


@pytest.mark.parametrize("scenario", ["beta", "lognormal"])
@pytest.mark.parametrize("target", [0.01, 0.05])
def test_served_error_rate_stays_within_target(scenario, target):
    run = controlled(scenario, target)
    assert run.served > 0
    assert within_target(run.wrong, run.served, target), (
        f"{run.wrong} wrong of {run.served} served = {run.error_rate:.4f} against a target of {target}"
    )
    _, oracle_hits = oracle(scenario, target)
    assert run.hit_rate >= MIN_SHARE_OF_ORACLE[scenario, target] * oracle_hits, (
        f"hit rate {run.hit_rate:.3f}, the oracle's {oracle_hits:.3f}"
    )


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_threshold_converges_near_the_best_static_one(target):
    run = controlled("lognormal", target)
    best, _ = oracle("lognormal", target)
    late = [t for t in run.thresholds[-5:] if t is not None]
    assert len(late) >= 4, run.thresholds
    assert best - 0.01 <= float(np.median(late)) <= best + 0.03, (best, run.thresholds)


def test_exploration_decays_and_stays_above_the_floor():
    run = controlled("lognormal", 0.05)
    early, late = run.rates[0], run.rates[-1]
    assert early >= 0.1
    assert late <= early / 3
    assert min(run.rates) >= 0.01


def test_exploration_reaches_its_floor_with_plenty_of_evidence():
    ctl = ErrorRateController(0.05, MIN, MAX, explore_floor=0.02, explore_half=5, rng=random.Random(3))
    rng = random.Random(4)
    for _ in range(30_000):
        s = rng.uniform(0.9, 1.0)
        d = ctl.decide(s)
        if d.explore:
            ctl.observe(d, True)
    assert ctl.threshold is not None and ctl.threshold <= 0.9
    assert ctl.exploration_rate == pytest.approx(0.02)
    explored = ctl.decisions[EXPLORE] / (ctl.decisions[EXPLORE] + ctl.decisions[HIT])
    assert 0.015 < explored < 0.06  # from 0.5 down to the floor over the run


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_drift_tightens_the_threshold_again(target):
    n, half = 40_000, 20_000
    rng = np.random.default_rng(7)
    s, right, passed = draw(rng, n, "lognormal")
    s2, right2, passed2 = draw(rng, n, "lognormal_closer")
    s[half:], right[half:], passed[half:] = s2[half:], right2[half:], passed2[half:]
    ctl = ErrorRateController(target, MIN, MAX, rng=random.Random(7))
    settle = 4_000  # requests the controller needs to see the shift (docs/caching.md)
    run = play(ctl, s, right, passed, after=half + settle)
    before = [t for t in run.thresholds[15:20] if t is not None]
    after = [t for t in run.thresholds[-5:] if t is not None]
    new_best, _ = oracle("lognormal_closer", target)
    assert before and after
    assert min(after) >= max(before) + 0.02, run.thresholds
    assert float(np.median(after)) >= new_best - 0.01, (new_best, run.thresholds)
    assert run.served_after > 0
    assert within_target(run.wrong_after, run.served_after, target), (run.wrong_after, run.served_after)


def test_an_unreachable_target_serves_nothing():
    # One cached answer in ten is wrong at every similarity: no threshold reaches 1%.
    rng = np.random.default_rng(11)
    s = rng.beta(30, 3, 20_000)
    right = rng.random(20_000) < 0.9
    ctl = ErrorRateController(0.01, MIN, MAX, rng=random.Random(11))
    run = play(ctl, s, right, np.ones(20_000, dtype=bool))
    assert run.served == 0
    assert ctl.threshold is None
    assert ctl.decisions[LABEL] > 19_000  # every candidate was compared instead


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_the_guard_bounds_a_wrong_model(target):
    """With a model that believes every answer is right, the labels alone keep the error near target."""
    s, right, passed = draw(np.random.default_rng(5), 20_000, "lognormal")

    def blind(ctl: ErrorRateController) -> ErrorRateController:
        ctl._bound_scan = lambda counts, mean_s, labels: (ctl.min_threshold, (0.0, 0.0))  # type: ignore[method-assign]
        return ctl

    guarded = play(blind(ErrorRateController(target, MIN, MAX, rng=random.Random(5))), s, right, passed)
    unguarded = play(
        blind(ErrorRateController(target, MIN, MAX, guard_min_samples=math.inf, rng=random.Random(5))),
        s,
        right,
        passed,
    )
    assert unguarded.error_rate > 0.2  # what the blind model alone serves
    # The guard only acts on a demonstrated excess (Bonferroni over the grid): a backstop, not the bound.
    assert guarded.error_rate <= 4 * target, guarded.error_rate


def test_the_checks_fail_for_a_broken_controller():
    """The assertions above have teeth: always serving fails the error check, never adapting the hit-rate check."""
    s, right, passed = draw(np.random.default_rng(1), 20_000, "lognormal")
    always = play(AlwaysServe(), s, right, passed)
    assert not within_target(always.wrong, always.served, 0.01)
    stuck = play(Fixed(MAX), s, right, passed)
    _, oracle_hits = oracle("lognormal", 0.01)
    assert within_target(stuck.wrong, stuck.served, 0.01)
    assert stuck.hit_rate < MIN_SHARE_OF_ORACLE["lognormal", 0.01] * oracle_hits
    never_fits = ErrorRateController(0.01, MIN, MAX, rng=random.Random(1))
    never_fits.refit = lambda: None  # type: ignore[method-assign]
    assert play(never_fits, s, right, passed).served == 0


def test_model_tail_is_close_to_the_truth_on_beta_similarities():
    """The three-term model fitted to many labels estimates the served error within 20% (docs/caching.md)."""
    s, right, passed = draw(np.random.default_rng(2), 400_000, "beta")
    keep = passed & (s >= MIN)
    s, y = s[keep], right[keep].astype(np.float64)
    ctl = ErrorRateController(0.01, MIN, MAX)
    beta_, _ = _newton(ctl._features(s), y, np.zeros(3))
    p = 1.0 / (1.0 + np.exp(-(ctl._features(s) @ beta_)))
    for t in (0.9, 0.93, 0.96):
        truth = 1.0 - y[s >= t].mean()
        estimate = 1.0 - p[s >= t].mean()
        assert estimate == pytest.approx(truth, rel=0.2), (t, truth, estimate)


# --------------------------------------------------------------------------- the controller's API


def test_constructor_rejects_bad_settings():
    for kwargs in (
        {"target_error_rate": 0.0},
        {"target_error_rate": 0.6},
        {"min_threshold": 0.9, "max_threshold": 0.8},
        {"max_threshold": 1.2},
        {"delta": 0.0},
        {"explore_floor": 0.6},
        {"label_rate": 0.0},
        {"label_window": 0},
        {"refit_every": 1.5},
        {"guard_min_samples": 0.0},
    ):
        args: dict[str, Any] = {"target_error_rate": 0.01, "min_threshold": MIN, "max_threshold": MAX, **kwargs}
        with pytest.raises(ValueError):
            ErrorRateController(**args)


def test_decide_kinds_and_bad_input():
    ctl = ErrorRateController(0.05, MIN, MAX, rng=random.Random(0))
    assert ctl.decide(0.3).kind == BELOW_MIN
    rejected = ctl.decide(0.97, verifier_passed=False)
    assert rejected.kind == REJECTED and not rejected.serve and not rejected.explore
    assert ctl._traffic_n == 0  # neither counts as traffic the threshold could serve
    d = ctl.decide(0.97)
    assert d.kind == LABEL and d.explore and not d.serve and d.propensity == 1.0  # closed until fitted
    for bad in (float("nan"), 1.5, -2.0):
        with pytest.raises(ValueError):
            ctl.decide(bad)


def test_closed_until_enough_labels_then_serves():
    ctl = ErrorRateController(0.05, MIN, MAX, min_samples=100, rng=random.Random(0))
    rng = random.Random(1)
    for i in range(99):
        d = ctl.decide(rng.uniform(0.5, 1.0))
        ctl.observe(d, d.similarity > 0.8)
        assert ctl.threshold is None, i
    for _ in range(200):
        d = ctl.decide(rng.uniform(0.5, 1.0))
        if d.explore:
            ctl.observe(d, d.similarity > 0.8)
    assert ctl.threshold is not None and 0.8 <= ctl.threshold <= 0.9
    assert ctl.decide(0.99).kind in (HIT, EXPLORE)


def test_observe_rejects_a_decision_that_asked_for_nothing():
    ctl = ErrorRateController(0.05, MIN, MAX)
    with pytest.raises(ValueError):
        ctl.observe(ctl.decide(0.2), True)
    with pytest.raises(ValueError):
        ctl.observe(Decision(True, False, HIT, 0.99), True)


def test_fit_stays_finite_on_separable_labels():
    # All right above 0.9, all wrong below: plain Newton diverges on this.
    ctl = ErrorRateController(0.01, MIN, MAX, rng=random.Random(0))
    rng = random.Random(2)
    for _ in range(3_000):
        d = ctl.decide(rng.uniform(0.5, 1.0))
        if d.explore:
            ctl.observe(d, d.similarity >= 0.9)
    assert np.all(np.isfinite(ctl._beta)) and np.all(np.abs(ctl._beta) < 1e3)
    assert ctl.threshold is not None and 0.9 <= ctl.threshold <= 0.95


def test_state_round_trips_through_json():
    s, right, passed = draw(np.random.default_rng(3), 6_000, "lognormal")
    ctl = ErrorRateController(0.05, MIN, MAX, rng=random.Random(3))
    play(ctl, s, right, passed)
    state = json.loads(json.dumps(ctl.to_dict()))
    copy = ErrorRateController.from_dict(state, rng=random.Random(9))
    ctl.refit()
    assert copy.threshold == ctl.threshold
    assert copy.snapshot().samples == ctl.snapshot().samples
    assert copy.decisions == ctl.decisions
    assert copy.config() == ctl.config()
    # and it goes on deciding the same way
    ctl._rng.seed(9)
    probe = [0.6, 0.85, 0.9, 0.93, 0.97, 0.99]
    assert [copy.decide(x).kind for x in probe] == [ctl.decide(x).kind for x in probe]


def test_from_dict_rejects_malformed_state():
    good = ErrorRateController(0.05, MIN, MAX).to_dict()
    for bad in (
        {},
        {**good, "version": 99},
        {**good, "labeled": [[0.9, 2, 1.0, 0]]},
        {**good, "explored": [[0.9, 1, 0.0, 0]]},
        {**good, "beta": [1.0]},
        {k: v for k, v in good.items() if k != "traffic"},
        {**good, "config": {**good["config"], "target_error_rate": 2.0}},
    ):
        with pytest.raises(ValueError):
            ErrorRateController.from_dict(bad)


def test_snapshot_reports_error_estimate_and_status():
    run_ctl = ErrorRateController(0.05, MIN, MAX, rng=random.Random(1))
    s, right, passed = draw(np.random.default_rng(1), 8_000, "lognormal")
    play(run_ctl, s, right, passed)
    snap = run_ctl.snapshot()
    assert snap.explored > 0 and snap.estimated_error_rate is not None
    assert snap.estimated_error_rate == snap.explored_wrong / snap.explored
    assert snap.error_rate_low is not None and snap.error_rate_high is not None
    assert snap.error_rate_low <= snap.estimated_error_rate <= snap.error_rate_high
    assert snap.threshold_error is not None and snap.threshold_error_upper is not None
    assert snap.threshold_error_upper <= 0.05
    assert snap.threshold == run_ctl.threshold
    assert snap.verified_correct + snap.verified_wrong == run_ctl.decisions[EXPLORE] + run_ctl.decisions[LABEL]
    status = snap.to_status()
    json.dumps(status)
    assert set(status) >= {"targetErrorRate", "threshold", "explorationRate", "estimatedErrorRate", "samples"}


def test_wilson_interval():
    low, high = wilson_interval(0, 100, 1.96)
    assert low == 0.0 and 0.03 < high < 0.04
    low, high = wilson_interval(50, 100, 1.96)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 0, 1.96) == (0.0, 1.0)


def test_decide_is_cheap():
    ctl = controlled_ctl()
    xs = [0.5 + i / 40_000 for i in range(20_000)]  # across the whole range: misses, hits, explorations
    start = time.perf_counter()
    for x in xs:
        ctl.decide(x)
    per_call = (time.perf_counter() - start) / len(xs)
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} µs per decide"


def controlled_ctl() -> ErrorRateController:
    s, right, passed = draw(np.random.default_rng(1), 5_000, "lognormal")
    ctl = ErrorRateController(0.05, MIN, MAX, rng=random.Random(1))
    play(ctl, s, right, passed)
    assert ctl.threshold is not None
    return ctl


# --------------------------------------------------------------------------- answer comparison


def test_normalize_answer():
    assert normalize_answer("  Hello,   World!! ") == "hello world"
    assert normalize_answer("ＡＢＣ １２３") == "abc 123"  # full-width forms (NFKC)
    assert normalize_answer("Straße") == normalize_answer("STRASSE")  # casefold
    assert normalize_answer("ﬁle") == "file"  # ligature
    assert normalize_answer("Yes.\n\nIt ships — in 2 days.") == "yes it ships in 2 days"


def test_numbers_in():
    assert numbers_in("It costs $1,000.50.") == numbers_in("it costs 1000.5 dollars")
    assert numbers_in("3.0 items") == numbers_in("3 items")
    assert numbers_in("v1.5.3") != numbers_in("v1.5.4")
    assert numbers_in("code 0045") != numbers_in("code 045")
    assert numbers_in("INV-2023") == numbers_in("INV 2023")  # a hyphen is not a minus
    assert numbers_in("it is -5 degrees") != numbers_in("it is 5 degrees")
    assert numbers_in("３ items") == numbers_in("3 items")


async def test_whitespace_case_and_unicode_differences_match():
    r = await answers_match("Your order ships in 2 days.", "  your ORDER ships in 2 days ")
    assert r.match and r.reason == "equal"
    r = await answers_match("Ｒｅｆｕｎｄｓ　ｔａｋｅ　５ ｄａｙｓ", "Refunds take 5 days.")
    assert r.match and r.reason == "equal"
    assert (await answers_match("", "   ")).match


async def test_numbers_differ_is_final():
    async def similar(a: str, b: str) -> float:
        return 0.999

    async def yes(a: str, b: str) -> bool:
        return True

    r = await answers_match(
        "The Pro plan costs $49 a month.", "The Pro plan costs $94 a month.", similarity=similar, judge=yes
    )
    assert not r.match and r.reason == "numbers_differ"


async def test_without_a_callback_different_text_is_different():
    r = await answers_match("You can return it within a month.", "Returns are accepted for 30 days.")
    assert not r.match and r.reason == "numbers_differ"  # "30" in one only
    r = await answers_match("You can return it within a month.", "Returns are accepted for a month.")
    assert not r.match and r.reason == "different" and r.conclusive
    r = await answers_match("Yes.", "")
    assert not r.match and r.reason == "empty"


async def test_similarity_then_judge():
    calls: list[str] = []

    def sim(value: float) -> Any:
        async def similarity(a: str, b: str) -> float:
            calls.append("sim")
            return value

        return similarity

    async def judge(a: str, b: str) -> bool:
        calls.append("judge")
        return True

    a, b = "You can return it within a month.", "Returns are accepted for a month."
    r = await answers_match(a, b, similarity=sim(0.95), judge=judge)
    assert r.match and r.reason == "similar" and r.similarity == 0.95 and calls == ["sim"]
    calls.clear()
    r = await answers_match(a, b, similarity=sim(0.5))
    assert not r.match and r.reason == "not_similar"
    r = await answers_match(a, b, similarity=sim(0.5), judge=judge)
    assert r.match and r.reason == "judge_same" and calls == ["sim", "sim", "judge"]


async def test_a_failing_callback_is_inconclusive():
    async def broken_sim(a: str, b: str) -> float:
        raise RuntimeError("embedding backend down")

    async def nan_sim(a: str, b: str) -> float:
        return float("nan")

    async def broken_judge(a: str, b: str) -> bool:
        raise TimeoutError

    a, b = "It is blue.", "It is navy."
    for kwargs in ({"similarity": broken_sim}, {"similarity": nan_sim}, {"judge": broken_judge}):
        r = await answers_match(a, b, **kwargs)
        assert not r.match and not r.conclusive


async def test_answers_match_rejects_bad_input():
    with pytest.raises(TypeError):
        await answers_match(None, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await answers_match("a", "b", min_similarity=2.0)


async def test_embedding_similarity_embeds_both_answers_once_and_reports_the_charge():
    seen: list[list[str]] = []
    charges: list[tuple[Any, float]] = []

    async def embed(texts: list[str]) -> Any:
        seen.append(texts)
        return [[1.0, 0.0], [0.6, 0.8]], Usage(prompt_tokens=7), 0.0001

    similarity = embedding_similarity(embed, lambda usage, cost: charges.append((usage, cost)))
    assert await similarity("a", "b") == pytest.approx(0.6)
    assert seen == [["a", "b"]]
    assert charges == [(Usage(prompt_tokens=7), 0.0001)]


def test_cosine():
    assert cosine([1.0, 0.0], [0.0, 2.0]) == 0.0
    with pytest.raises(ValueError):
        cosine([1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        cosine([0.0, 0.0], [1.0, 0.0])
