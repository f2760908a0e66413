"""Error-rate control for the semantic cache: serve a near match only where it is right often enough.

`semantic.targetErrorRate` (say 0.01) asks that at most that fraction of the
semantic hits a policy serves be wrong answers. A fixed similarity threshold
cannot promise that: how similar two questions must be for one answer to fit
both depends on the embedding model, the traffic and the strict check, and it
drifts. `ErrorRateController` learns the threshold online, after vCache
("verified semantic caching", Schroeder et al., 2025). docs/caching.md, "Error-rate
control", has the measurements.

* Labels. A candidate that is not served goes upstream as a miss, and the
  fresh answer is compared with the cached one (`answer_match.py`); `observe`
  records (similarity, correct). Two kinds: a would-be hit picked for
  exploration (costs one upstream call; the client gets the fresh answer, as in
  vCache, so exploring never serves a wrong answer), and a candidate below the
  threshold (its upstream call happens anyway: only the comparison costs).
  Each label weighs 2^(-age / half_life), age in candidates since its
  decision, and is dropped after `memory` candidates: after a drift the new
  labels outweigh the old within a few thousand requests.
* Model. P(correct | s) = sigmoid(b . [1, u, v]), u = (s - min) / (1 - min),
  v = -log(1 - s + 0.001) scaled to 0..1 on [min, 1]: vCache's sigmoid in s
  plus a log-distance term, because the similarity of a correct match piles up
  against 1, and a sigmoid in s alone misjudges that tail by large factors in
  either direction (docs/caching.md has the figures; the three-term model is
  within 5-16% of the truth on Beta-distributed similarities, which a test
  checks). Weighted MAP fit by damped Newton, with a Gaussian prior (sd 30)
  and two pseudo-labels (wrong at min, right at 1) keeping it finite on
  separable data.
* Served error. With F the similarities of the recent candidates (the last
  `traffic_window` that passed the strict check, in `grid_step` buckets), a
  threshold t serves every bucket j at or above it, so its error rate is
  E(t) = sum_j F_j (1 - p_j) / sum_j F_j. Two upper confidence bounds, each
  at delta / 2 (so together they hold with 1 - delta), and the lower is used:
  - the model's, by the delta method on the coefficients (covariance = inverse
    Hessian), on the logit scale so it stays in (0, 1):
    sigmoid(logit E + z * se(E) / (E (1 - E))), z = the 1 - delta/2 quantile;
  - the labels' own: the labels at or above t, weighted by age / the
    probability they were sampled with, Wilson upper bound at Kish's effective
    count. It takes over where the model extrapolates (every label right, a
    coefficient the labels cannot pin down).
* Threshold. Grid points are tested from the top down, from the highest one
  whose bound is within target, and the threshold is the last one passed
  before the first failure (a fixed-sequence test below the start). Grid
  points above the start fail for lack of evidence (few labels up there), and
  their error does not add to E(t) below: E is an average over what is
  served. None ("closed": no semantic hit) when no grid point passes, and
  while fewer than `min_samples` labels are in memory.
* Guard. The model can be wrong in shape (a similarity band where wrong
  answers bunch up). A grid point whose labels' Wilson lower bound is above
  target (z at delta / GUARD_TESTS: it is tested at every point on every
  refit; with `guard_min_samples` effective labels) is demonstrably too
  permissive: nothing at or below the highest such point is served, and above
  it a threshold needs labels of its own. The threshold is the higher of the
  bound's and the guard's.
* Exploration. A would-be hit is explored with probability
  r = max(floor, explore_max * half / (half + n)), n = the age-weighted count
  of explorations: high while there is little evidence, decaying, never below
  the floor, so a drift that only shows among served hits is seen. When the
  explored hits were wrong more often than the target, r is scaled up by that
  ratio: the model and the evidence disagree, and only labels from the served
  region settle it.

vCache keeps a model per cached entry; here there is one per policy. An entry
must be explored several times before its own model says anything (vCache
explores each entry at least six times), while most entries of a 20,000-entry
FAQ cache are hit a few times in their TTL: per entry, little would ever be
served, and sharing the state would cost a Redis write per request. Per policy,
every label informs one threshold, and the traffic histogram accounts for
where in similarity the hits actually fall.

`decide` is a comparison, one random draw and a ring-buffer write (2-4 µs);
`observe` refits every `refit_every` labels (numpy, 1.5-3 ms with the default
windows, so about 0.15 ms a report).
The controller is not thread-safe: it lives on the sidecar's event loop. Its
whole state is plain data (`to_dict` / `from_dict`), so sidecars could pool
labels through Redis.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

STATE_VERSION = 1

# Decision kinds. Only "hit" serves; "explore" and "label" ask for a comparison.
HIT = "hit"  # serve the cached answer
EXPLORE = "explore"  # would have been a hit: answer from upstream, compare, observe
LABEL = "label"  # below the threshold, a miss anyway: compare the upstream answer, observe
MISS = "miss"  # below the threshold, not sampled for comparison
REJECTED = "rejected"  # the strict check turned the candidate down: never served, not learned from
BELOW_MIN = "below_min"  # below min_threshold: never a candidate
KINDS = (HIT, EXPLORE, LABEL, MISS, REJECTED, BELOW_MIN)

# The guard's multiple-testing correction. Its ~100 tests (one per grid point)
# are nested sums of the same labels, so far fewer are independent: with 100 a
# blind model reached 4x the target before the guard stopped it, with 10 it
# stays at 1.5-3x, and the guard raised no false closures in stationary streams.
GUARD_TESTS = 10
_N_FEATURES = 3
_DIST_FLOOR = 1e-3  # of 1 - s in the log-distance feature: s = 1.0 (a verbatim repeat) stays finite
_PRIOR_SD = 30.0  # of b0 and b1 (u runs 0..1): weak, only keeps separable data finite
_NEWTON_MAX = 25
_NEWTON_TOL = 1e-7


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one semantic candidate.

    `serve`: answer from the cache. `explore`: do not serve; send the request
    upstream, compare the fresh answer with the candidate's cached one, and
    pass this decision to `observe` with the result. Neither: a plain miss.
    """

    serve: bool
    explore: bool
    kind: str
    similarity: float
    # Probability that a candidate like this one was sent for comparison (the
    # label's weight is its inverse); 0 when it was not.
    propensity: float = 0.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The controller's state for metrics and the CachePolicy status."""

    target_error_rate: float
    delta: float
    threshold: float | None  # None: closed, no semantic hit is served
    bound_threshold: float | None  # the lowest the upper bound certifies
    guard_threshold: float | None
    exploration_rate: float
    samples: int  # labels in memory (explored + below-threshold)
    explored: int  # explorations in memory
    explored_wrong: int
    estimated_error_rate: float | None  # explored_wrong / explored; None before any exploration
    error_rate_low: float | None  # Wilson interval of it at z = z(1 - delta)
    error_rate_high: float | None
    threshold_error: float | None  # the model's E(threshold)
    threshold_error_upper: float | None  # the certified upper bound on it (model's or labels', the lower)
    decisions: Mapping[str, int]  # since start, by kind
    verified_correct: int  # comparisons reported to observe, since start
    verified_wrong: int

    def to_status(self) -> dict[str, Any]:
        """camelCase, JSON-ready (rates rounded), for a status subresource."""

        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return {
            "targetErrorRate": self.target_error_rate,
            "threshold": r(self.threshold),
            "explorationRate": r(self.exploration_rate),
            "estimatedErrorRate": r(self.estimated_error_rate),
            "errorRateInterval": [r(self.error_rate_low), r(self.error_rate_high)],
            "thresholdError": r(self.threshold_error),
            "thresholdErrorUpper": r(self.threshold_error_upper),
            "samples": self.samples,
            "explored": self.explored,
            "exploredWrong": self.explored_wrong,
            "verifiedCorrect": self.verified_correct,
            "verifiedWrong": self.verified_wrong,
        }


def wilson_interval(wrong: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion wrong / n (n may be an effective, non-integer count)."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(wrong / n, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _wilson(p: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """`wilson_interval` over arrays of proportions and (effective) counts; (0, 1) where n is 0."""
    n = np.maximum(n, 1e-12)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return np.maximum(centre - half, 0.0), np.minimum(centre + half, 1.0)


@dataclass(frozen=True, slots=True)
class _LabelBounds:
    n_eff: np.ndarray  # per grid point: effective number of labels at or above it
    low: np.ndarray  # Wilson lower bound of E(t), z(1 - delta): the guard's
    high: np.ndarray  # Wilson upper bound of E(t), z(1 - delta/2): the certifying one


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)))


def _penalised_nll(x: np.ndarray, t: np.ndarray, w: np.ndarray, beta: np.ndarray) -> float:
    eta = x @ beta
    # log(1 + e^eta) - t * eta, computed without overflow
    return float(np.sum(w * (np.logaddexp(0.0, eta) - t * eta)) + 0.5 * float(beta @ beta) / _PRIOR_SD**2)


def _newton(
    x: np.ndarray, t: np.ndarray, start: np.ndarray, w: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """MAP logistic regression (Gaussian prior, sd _PRIOR_SD; rows weighted by w): coefficients and covariance.

    Damped Newton: a step that does not lower the penalised negative
    log-likelihood is halved (plain Newton overshoots on nearly separable
    labels and diverges). The objective is strictly convex, so this converges
    from any start; warm starts make it two or three steps.
    """
    w = np.ones(x.shape[0]) if w is None else w
    prior = np.eye(x.shape[1]) / _PRIOR_SD**2
    beta = start.astype(np.float64).copy()
    f = _penalised_nll(x, t, w, beta)
    for _ in range(_NEWTON_MAX):
        p = _sigmoid(x @ beta)
        hessian = (x * (w * p * (1.0 - p))[:, None]).T @ x + prior
        step = np.linalg.solve(hessian, x.T @ (w * (t - p)) - prior @ beta)
        scale = 1.0
        while True:
            cand = beta + scale * step
            f_cand = _penalised_nll(x, t, w, cand)
            if f_cand <= f or scale < 1e-4:
                break
            scale *= 0.5
        converged = float(np.max(np.abs(cand - beta))) < _NEWTON_TOL
        beta, f = cand, f_cand
        if converged:
            break
    p = _sigmoid(x @ beta)
    hessian = (x * (w * p * (1.0 - p))[:, None]).T @ x + prior
    return beta, np.linalg.inv(hessian)


class _LabelRing:
    """The last `size` labels as rows (similarity, correct 0/1, propensity, sequence number of the decision)."""

    __slots__ = ("n", "rows")

    def __init__(self, size: int) -> None:
        self.rows = np.zeros((size, 4), dtype=np.float64)
        self.n = 0  # labels ever appended

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])

    def append(self, similarity: float, correct: int, propensity: float, seq: int) -> None:
        self.rows[self.n % self.size] = (similarity, correct, propensity, seq)
        self.n += 1

    def ordered(self) -> np.ndarray:
        """The rows held, oldest first."""
        if self.n <= self.size:
            return self.rows[: self.n]
        return np.roll(self.rows, -(self.n % self.size), axis=0)

    def live(self, oldest_seq: int) -> np.ndarray:
        """The rows held whose decision is not older than `oldest_seq`."""
        rows = self.rows[: min(self.n, self.size)]
        return rows[rows[:, 3] >= oldest_seq]


class ErrorRateController:
    """Keeps one semantic cache policy's served error rate under `target_error_rate`.

    `min_threshold` is the lowest similarity that may ever be served (the
    policy's `semantic.threshold`: the index returns nothing below it);
    `max_threshold` the highest the controller will ask for before it closes
    the policy to semantic hits altogether. The rest (the module docstring
    says how each is used):

    * `delta`: the bound on the threshold's error holds with probability 1 - delta.
    * `grid_step`: thresholds tried, every `grid_step` from min to max.
    * `explore_max`, `explore_floor`, `explore_half`: the exploration schedule.
    * `label_rate`: the fraction of below-threshold candidates compared (lower
      it when the comparison is paid for, e.g. a judge).
    * `label_window`, `explore_window`: labels kept of each kind; `memory` and
      `half_life`: how long (in candidates) a label counts, and how fast it
      fades. Longer for steady traffic (more hits at a 1% target), shorter to
      follow drift faster (docs/caching.md has both).
    * `traffic_window`: recent candidates whose similarities make F.
    * `refit_every`: reports between refits; `min_samples`: labels needed to
      serve at all; `guard_min_samples`: effective labels before the guard may
      fail a threshold (math.inf turns the guard off).
    * `rng`: the source of the exploration draws (seed it in tests).
    """

    def __init__(
        self,
        target_error_rate: float,
        min_threshold: float,
        max_threshold: float,
        *,
        delta: float = 0.05,
        grid_step: float = 0.005,
        explore_max: float = 0.5,
        explore_floor: float = 0.01,
        explore_half: int = 20,
        label_rate: float = 1.0,
        label_window: int = 2048,
        explore_window: int = 1024,
        traffic_window: int = 8192,
        memory: int = 20000,
        half_life: int = 5000,
        refit_every: int = 16,
        min_samples: int = 100,
        guard_min_samples: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 < target_error_rate < 0.5:
            raise ValueError(f"target_error_rate must be in (0, 0.5), got {target_error_rate!r}")
        if not -1.0 <= min_threshold < max_threshold <= 1.0:
            raise ValueError(
                f"need -1 <= min_threshold < max_threshold <= 1, got {min_threshold!r} and {max_threshold!r}"
            )
        if not 0.0 < delta < 0.5:
            raise ValueError(f"delta must be in (0, 0.5), got {delta!r}")
        if not 0.0 < grid_step <= max_threshold - min_threshold:
            raise ValueError(f"grid_step must be in (0, max_threshold - min_threshold], got {grid_step!r}")
        if not 0.0 < explore_floor <= explore_max <= 1.0:
            raise ValueError(f"need 0 < explore_floor <= explore_max <= 1, got {explore_floor!r}, {explore_max!r}")
        if not 0.0 < label_rate <= 1.0:
            raise ValueError(f"label_rate must be in (0, 1], got {label_rate!r}")
        if not guard_min_samples > 0:  # also NaN; math.inf turns the guard off
            raise ValueError(f"guard_min_samples must be positive, got {guard_min_samples!r}")
        for name, v in (
            ("explore_half", explore_half),
            ("label_window", label_window),
            ("explore_window", explore_window),
            ("traffic_window", traffic_window),
            ("memory", memory),
            ("half_life", half_life),
            ("refit_every", refit_every),
            ("min_samples", min_samples),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.target = float(target_error_rate)
        self.min_threshold = float(min_threshold)
        self.max_threshold = float(max_threshold)
        self.delta = float(delta)
        self.z = NormalDist().inv_cdf(1.0 - delta)
        # The threshold is certified by the lower of two upper bounds (the model's
        # and the labels'), each at delta / 2, so the pair holds with 1 - delta.
        self.z_half = NormalDist().inv_cdf(1.0 - delta / 2)
        self.explore_max, self.explore_floor, self.explore_half = explore_max, explore_floor, explore_half
        self.label_rate = label_rate
        self.memory, self.refit_every, self.min_samples = memory, refit_every, min_samples
        self.half_life = half_life
        self.guard_min_samples = guard_min_samples
        self._rng = rng or random.Random()
        self._random = self._rng.random
        k = max(1, round((self.max_threshold - self.min_threshold) / grid_step))
        self.grid = np.linspace(self.min_threshold, self.max_threshold, k + 1)
        # The guard tests every grid point at every refit: the correction keeps its
        # false alarms (each one a stretch of needless misses) rare.
        self.z_guard = NormalDist().inv_cdf(1.0 - delta / GUARD_TESTS)
        self._step = (self.max_threshold - self.min_threshold) / k
        self._span = 1.0 - self.min_threshold
        # Each label: (similarity, correct 0/1, propensity, sequence number of its decision).
        self._explored = _LabelRing(explore_window)  # would-be hits sent upstream
        self._labeled = _LabelRing(label_window)  # candidates below the threshold
        self._traffic = np.zeros(traffic_window, dtype=np.float64)
        self._traffic_n = 0  # candidates written so far (the ring holds the last traffic_window)
        self._seq = 0  # candidates at or above min_threshold that passed the strict check
        self._since_fit = 0
        self._v0 = -math.log(1.0 - self.min_threshold + _DIST_FLOOR)
        self._v_span = -math.log(_DIST_FLOOR) - self._v0
        self._beta = np.zeros(_N_FEATURES)
        self._cov = np.eye(_N_FEATURES) * _PRIOR_SD**2
        self._threshold: float | None = None  # closed until the first fit
        self._bound_threshold: float | None = None
        self._guard_threshold: float | None = None
        self._threshold_error: tuple[float, float] | None = None
        self._explore_rate = explore_max
        self.decisions: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.verified = {"correct": 0, "wrong": 0}

    # ------------------------------------------------------------------ the request path

    @property
    def threshold(self) -> float | None:
        """The similarity at or above which a candidate is served; None: no semantic hit."""
        return self._threshold

    @property
    def exploration_rate(self) -> float:
        return self._explore_rate

    def decide(self, similarity: float, verifier_passed: bool = True) -> Decision:
        """What to do with the best candidate of one lookup (the one that would be served).

        `verifier_passed`: the strict check's verdict (True when the policy does
        not verify). O(1): no fitting happens here.
        """
        s = float(similarity)
        if not -1.000001 <= s <= 1.000001:  # also NaN
            raise ValueError(f"similarity must be a cosine in [-1, 1], got {similarity!r}")
        if s < self.min_threshold:
            return self._count(Decision(False, False, BELOW_MIN, s))
        if not verifier_passed:
            return self._count(Decision(False, False, REJECTED, s))
        self._seq += 1
        self._traffic[self._traffic_n % self._traffic.shape[0]] = s
        self._traffic_n += 1
        t = self._threshold
        if t is not None and s >= t:
            r = self._explore_rate
            if self._random() < r:
                return self._count(Decision(False, True, EXPLORE, s, r))
            return self._count(Decision(True, False, HIT, s))
        if self.label_rate >= 1.0 or self._random() < self.label_rate:
            return self._count(Decision(False, True, LABEL, s, self.label_rate))
        return self._count(Decision(False, False, MISS, s))

    def _count(self, d: Decision) -> Decision:
        self.decisions[d.kind] += 1
        return d

    def observe(self, decision: Decision, correct: bool) -> None:
        """Report the comparison of the fresh answer with the cached one for an `explore` decision.

        `correct`: the cached answer would have been right. Refits every
        `refit_every` reports.
        """
        if not decision.explore or decision.kind not in (EXPLORE, LABEL):
            raise ValueError(f"observe takes a decision that asked for a comparison, got kind {decision.kind!r}")
        if not 0.0 < decision.propensity <= 1.0:
            raise ValueError(f"decision propensity must be in (0, 1], got {decision.propensity!r}")
        y = 1 if correct else 0
        self.verified["correct" if y else "wrong"] += 1
        ring = self._explored if decision.kind == EXPLORE else self._labeled
        ring.append(decision.similarity, y, decision.propensity, self._seq)
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self.refit()

    # ------------------------------------------------------------------ fitting

    def _live(self) -> tuple[np.ndarray, np.ndarray]:
        """Explored and below-threshold labels within `memory` candidates of now."""
        oldest = self._seq - self.memory
        return self._explored.live(oldest), self._labeled.live(oldest)

    def refit(self) -> None:
        """Refit the model and recompute the threshold and the exploration rate now."""
        self._since_fit = 0
        explored, labeled = self._live()
        # Evidence fades with age (half-life `half_life` candidates), so after a
        # drift the new labels outweigh the old ones within a few thousand requests.
        age_e = 0.5 ** ((self._seq - explored[:, 3]) / self.half_life)
        n_explored = float(np.sum(age_e))
        rate = self.explore_max * self.explore_half / (self.explore_half + n_explored)
        if n_explored > 0:
            # The served hits measured wrong more often than the target: the model
            # and the evidence disagree, and settling it takes labels from the
            # served region, so explore more (in proportion to the excess).
            observed = float(np.sum(age_e * (explored[:, 1] == 0))) / n_explored
            if observed > self.target:
                rate *= observed / self.target
        self._explore_rate = min(self.explore_max, max(self.explore_floor, rate))
        data = np.concatenate([explored, labeled])
        if data.shape[0] < self.min_samples:
            # Too little evidence in memory (at the start, or after a long spell
            # without comparisons): serve nothing until there is enough.
            self._threshold = self._bound_threshold = self._guard_threshold = None
            self._threshold_error = None
            return
        s, y, prop = data[:, 0], data[:, 1], data[:, 2]
        age = 0.5 ** ((self._seq - data[:, 3]) / self.half_life)
        self._fit(s, y, age)
        labels = self._label_bounds(s, y, age / prop)
        counts, mean_s = self._traffic_buckets()
        self._bound_threshold, self._threshold_error = self._bound_scan(counts, mean_s, labels)
        self._guard_threshold = self._guard_scan(labels)
        if self._bound_threshold is None or self._guard_threshold is None:
            self._threshold = None
        else:
            self._threshold = max(self._bound_threshold, self._guard_threshold)

    def _fit(self, s: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        # Two pseudo-labels, a wrong answer at min_threshold and a right one at
        # 1.0: with few labels the model leans cautious.
        x = self._features(np.concatenate([s, [self.min_threshold, 1.0]]))
        t = np.concatenate([y, [0.0, 1.0]])
        start = self._beta if np.all(np.isfinite(self._beta)) else np.zeros(_N_FEATURES)
        self._beta, self._cov = _newton(x, t, start, np.concatenate([w, [1.0, 1.0]]))

    def _features(self, s: np.ndarray) -> np.ndarray:
        """Design matrix [1, u, v]: u linear in similarity, v in log distance -log(1 - s), both scaled to 0..1."""
        u = (s - self.min_threshold) / self._span
        v = (-np.log(np.maximum(1.0 - s, 0.0) + _DIST_FLOOR) - self._v0) / self._v_span
        return np.stack([np.ones_like(s), u, v], axis=-1)

    def _bucket(self, s: np.ndarray) -> np.ndarray:
        k = self.grid.shape[0] - 1
        idx = np.floor((s - self.min_threshold) / self._step + 1e-9).astype(np.int64)
        return np.clip(idx, 0, k)

    def _traffic_buckets(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidates per grid bucket and their mean similarity (bucket j: [grid[j], grid[j+1]); the last, up to 1)."""
        n = min(self._traffic_n, self._traffic.shape[0])
        s = self._traffic[:n]
        idx = self._bucket(s)
        size = self.grid.shape[0]
        counts = np.bincount(idx, minlength=size).astype(np.float64)
        sums = np.bincount(idx, weights=s, minlength=size)
        return counts, np.where(counts > 0, sums / np.maximum(counts, 1.0), self.grid)

    def _label_bounds(self, s: np.ndarray, y: np.ndarray, w: np.ndarray) -> _LabelBounds:
        """Model-free estimates of E(t) at every grid point: the labels at or above it, weighted by 1 / propensity."""
        idx = self._bucket(s)
        size = self.grid.shape[0]
        W = np.cumsum(np.bincount(idx, weights=w, minlength=size)[::-1])[::-1]
        R = np.cumsum(np.bincount(idx, weights=w * (1.0 - y), minlength=size)[::-1])[::-1]
        Q = np.cumsum(np.bincount(idx, weights=w * w, minlength=size)[::-1])[::-1]
        n_eff = np.where(Q > 0, W * W / np.maximum(Q, 1e-300), 0.0)  # Kish's effective sample size
        p = np.where(W > 0, R / np.maximum(W, 1e-300), 0.0)
        low, _ = _wilson(p, n_eff, self.z_guard)
        _, high = _wilson(p, n_eff, self.z_half)
        return _LabelBounds(n_eff, low, np.where(n_eff > 0, high, 1.0))

    def _bound_scan(
        self, counts: np.ndarray, mean_s: np.ndarray, labels: _LabelBounds
    ) -> tuple[float | None, tuple[float, float] | None]:
        """The lowest threshold whose upper bound on E(t) is within target, with the model's E and the bound there."""
        beta, cov = self._beta, self._cov
        x = self._features(mean_s)
        p = _sigmoid(x @ beta)
        # Suffix sums from the top bucket down: what a threshold at grid[k] serves.
        c = np.cumsum(counts[::-1])[::-1]
        err = np.cumsum((counts * (1.0 - p))[::-1])[::-1]
        # dE/dbeta = -sum_j F_j p_j (1 - p_j) x_j / C
        g = np.cumsum((x * (counts * p * (1.0 - p))[:, None])[::-1], axis=0)[::-1]
        safe_c = np.maximum(c, 1e-300)
        e = np.where(c > 0, err / safe_c, 0.0)
        d = -g / safe_c[:, None]
        var_e = np.einsum("ki,ij,kj->k", d, cov, d)
        e_c = np.clip(e, 1e-12, 1 - 1e-12)
        z = self.z_half
        ucb = _sigmoid(np.log(e_c / (1 - e_c)) + z * np.sqrt(np.maximum(var_e, 0.0)) / (e_c * (1 - e_c)))
        # A grid point with no traffic at or above it: the pointwise bound at the point itself.
        xg = self._features(self.grid)
        eta = xg @ beta
        var_eta = np.einsum("ki,ij,kj->k", xg, cov, xg)
        point_ucb = _sigmoid(-eta + z * np.sqrt(np.maximum(var_eta, 0.0)))
        ucb = np.where(c > 0, ucb, point_ucb)
        # The labels' own bound where it is tighter: the model extrapolates, and a
        # coefficient the labels cannot pin down (all of them right, say) widens its band.
        ucb = np.minimum(ucb, labels.high)
        k = self._scan(ucb <= self.target)
        if k is None:
            return None, None
        est = float(e[k]) if c[k] > 0 else float(_sigmoid(-eta[k]))
        return float(self.grid[k]), (est, float(ucb[k]))

    def _guard_scan(self, labels: _LabelBounds) -> float | None:
        """The lowest threshold the labels do not contradict (None: they contradict all).

        A grid point fails when the labels at or above it have a Wilson lower
        bound above target (with `guard_min_samples` effective samples). Nothing
        at or below the highest failure is allowed; above it, a threshold needs
        evidence of its own (enough samples; its lower bound is then within
        target), since a shape the model missed may go on above the failure.
        """
        enough = labels.n_eff >= self.guard_min_samples
        failed = np.flatnonzero(enough & (labels.low > self.target))
        if failed.size == 0:
            return float(self.grid[0])
        top = int(failed[-1]) + 1
        above = np.flatnonzero(enough[top:])
        return None if above.size == 0 else float(self.grid[top + int(above[0])])

    @staticmethod
    def _scan(ok: np.ndarray) -> int | None:
        """The lowest index reached going down from the highest ok index while every index is ok; None if none is."""
        good = np.flatnonzero(ok)
        if good.size == 0:
            return None
        top = int(good[-1])
        bad_below = np.flatnonzero(~ok[:top])
        return 0 if bad_below.size == 0 else int(bad_below[-1]) + 1

    # ------------------------------------------------------------------ reporting and state

    def snapshot(self) -> Snapshot:
        live_explored, live_labeled = self._live()
        explored = int(live_explored.shape[0])
        wrong = int(np.sum(live_explored[:, 1] == 0))
        est: float | None = None
        low: float | None = None
        high: float | None = None
        if explored:
            est = wrong / explored
            low, high = wilson_interval(wrong, explored, self.z)
        me = self._threshold_error
        return Snapshot(
            target_error_rate=self.target,
            delta=self.delta,
            threshold=self._threshold,
            bound_threshold=self._bound_threshold,
            guard_threshold=self._guard_threshold,
            exploration_rate=self._explore_rate,
            samples=explored + int(live_labeled.shape[0]),
            explored=explored,
            explored_wrong=wrong,
            estimated_error_rate=est,
            error_rate_low=low,
            error_rate_high=high,
            threshold_error=me[0] if me else None,
            threshold_error_upper=me[1] if me else None,
            decisions=dict(self.decisions),
            verified_correct=self.verified["correct"],
            verified_wrong=self.verified["wrong"],
        )

    def config(self) -> dict[str, Any]:
        return {
            "target_error_rate": self.target,
            "min_threshold": self.min_threshold,
            "max_threshold": self.max_threshold,
            "delta": self.delta,
            "grid_step": self._step,
            "explore_max": self.explore_max,
            "explore_floor": self.explore_floor,
            "explore_half": self.explore_half,
            "label_rate": self.label_rate,
            "label_window": self._labeled.size,
            "explore_window": self._explored.size,
            "traffic_window": int(self._traffic.shape[0]),
            "memory": self.memory,
            "half_life": self.half_life,
            "refit_every": self.refit_every,
            "min_samples": self.min_samples,
            "guard_min_samples": self.guard_min_samples,
        }

    def to_dict(self) -> dict[str, Any]:
        """The whole state as JSON-ready data (labels, recent traffic, counters, the fit)."""
        n = min(self._traffic_n, self._traffic.shape[0])
        start = self._traffic_n % self._traffic.shape[0] if self._traffic_n > self._traffic.shape[0] else 0
        traffic = np.roll(self._traffic, -start)[:n]  # oldest first
        return {
            "version": STATE_VERSION,
            "config": self.config(),
            "seq": self._seq,
            "explored": [[float(r[0]), int(r[1]), float(r[2]), int(r[3])] for r in self._explored.ordered()],
            "labeled": [[float(r[0]), int(r[1]), float(r[2]), int(r[3])] for r in self._labeled.ordered()],
            "traffic": [float(v) for v in traffic],
            "beta": [float(v) for v in self._beta],
            "decisions": dict(self.decisions),
            "verified": dict(self.verified),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, rng: random.Random | None = None) -> ErrorRateController:
        """Rebuild a controller from `to_dict` output (and refit it). Raises ValueError on malformed data."""
        if not isinstance(data, Mapping) or data.get("version") != STATE_VERSION:
            raise ValueError(f"not an error-control state of version {STATE_VERSION}")
        try:
            cfg = dict(data["config"])
            ctl = cls(cfg.pop("target_error_rate"), cfg.pop("min_threshold"), cfg.pop("max_threshold"), rng=rng, **cfg)
            ctl._seq = int(data["seq"])
            for key, buf in (("explored", ctl._explored), ("labeled", ctl._labeled)):
                for row in data[key]:
                    s, y, prop, seq = (float(row[0]), int(row[1]), float(row[2]), int(row[3]))
                    if not (-1.000001 <= s <= 1.000001 and y in (0, 1) and 0.0 < prop <= 1.0):
                        raise ValueError(f"bad label {row!r}")
                    buf.append(s, y, prop, seq)
            for v in data["traffic"]:
                ctl._traffic[ctl._traffic_n % ctl._traffic.shape[0]] = float(v)
                ctl._traffic_n += 1
            beta = [float(v) for v in data["beta"]]
            if len(beta) != _N_FEATURES or not all(math.isfinite(b) for b in beta):
                raise ValueError(f"bad coefficients {beta!r}")
            ctl._beta = np.array(beta)
            for kind, count in dict(data["decisions"]).items():
                if kind in ctl.decisions:
                    ctl.decisions[kind] = int(count)
            ctl.verified = {"correct": int(data["verified"]["correct"]), "wrong": int(data["verified"]["wrong"])}
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"malformed error-control state: {e!r}") from None
        ctl.refit()
        return ctl
