"""Experiments and cascades in the spend ledger: per-arm figures with 95% intervals, and cascade savings.

`kubetoll report --experiment NAME` reads the records of one experiment (the ones
whose `experiment` is NAME; docs/routing.md, "Experiments") and gives, per arm:

* requests: the arm's request records (a cascade step that escalated, abandoned
  fan-out calls and cache lookups are spend, not requests);
* cost per request: every record of the arm's requests added up per request (the
  steps a cascade escalated from included), its mean with a Student t 95% interval;
* latency p50 and p95 (ms, arrival to the answer's end) over the requests answered
  (`ok`);
* error rate: requests that failed upstream (`all_backends_failed`,
  `upstream_error`) or whose stream was cut (`cut_stream`), with a Wilson 95% interval;
* escalation rate, for an arm with a cascade: escalated requests over cascaded ones,
  with a Wilson 95% interval; and the cascade's savings against always calling its
  last step.

* outcomes, per outcome name the app reported (`POST /kubetoll/v1/outcomes`,
  `x-kubetoll-outcome`; docs/attribution.md): how many of the arm's conversations
  reported it (a conversation is a session; a request without one is its own), that
  share with a Wilson 95% interval, and the arm's spend per outcome (cost per
  resolution). An outcome record belongs to the arm whose request carried its session
  or its request id.

`cascade_summary` gives the same cascade figures over any records, for the plain
report: requests cascaded, escalated, and what always using each cascade's last
step would have cost (`cascade_baseline_usd`, an estimate for the answers a cheaper
step gave: their tokens at the last step's first backend's prices).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from kubetoll_core.spend_record import NOT_REQUEST_OUTCOMES, OUTCOME_REPORTED, SPEND_ONLY_OUTCOMES, SpendRecord

from .estimate import text_table
from .spend import fmt_usd

ERROR_OUTCOMES = frozenset({"all_backends_failed", "upstream_error", "cut_stream"})
Z95 = 1.959963984540054
# Student t, two-sided 95%, by degrees of freedom (1-30); past 30 the Cornish-Fisher series below.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


# --------------------------------------------------------------------------- intervals


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a rate k/n (None without trials)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t95(df: int) -> float:
    """The two-sided 95% Student t quantile for `df` degrees of freedom (df >= 1)."""
    if df <= len(_T95):
        return _T95[df - 1]
    z = Z95  # Abramowitz & Stegun 26.7.5: within 1e-4 of the exact value past 30 degrees of freedom
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_interval(values: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """The mean, and its Student t 95% interval (None with fewer than two values)."""
    n = len(values)
    if n == 0:
        return 0.0, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t95(n - 1) * math.sqrt(var / n)
    return mean, (mean - half, mean + half)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    at = (len(s) - 1) * q / 100
    lo = math.floor(at)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (at - lo)


# --------------------------------------------------------------------------- per request


def _requests(records: Iterable[SpendRecord]) -> list[tuple[SpendRecord, float]]:
    """Each request record with what the whole request cost (its spend-only records added by request id)."""
    recs = list(records)
    extra: dict[str, float] = defaultdict(float)
    for r in recs:
        if r.outcome in SPEND_ONLY_OUTCOMES and r.request_id:
            extra[r.request_id] += r.cost_usd
    return [
        (r, r.cost_usd + (extra.get(r.request_id, 0.0) if r.request_id else 0.0))
        for r in recs
        if r.outcome not in NOT_REQUEST_OUTCOMES
    ]


def _cascade_figures(requests: list[tuple[SpendRecord, float]]) -> dict[str, Any]:
    cascaded = [(r, cost) for r, cost in requests if r.cascade]
    escalated = sum(1 for r, _ in cascaded if r.cascade == "escalated")
    baseline = math.fsum(r.cascade_baseline_usd for r, _ in cascaded)
    actual = math.fsum(cost for _, cost in cascaded)
    return {
        "cascaded": len(cascaded),
        "escalated": escalated,
        "escalation_rate": escalated / len(cascaded) if cascaded else None,
        "escalation_rate_ci95": wilson(escalated, len(cascaded)),
        "baseline_usd": baseline,
        "actual_usd": actual,
        "saved_usd": baseline - actual,
        "saved_percent": 100 * (baseline - actual) / baseline if baseline > 0 else None,
    }


def cascade_summary(records: Iterable[SpendRecord]) -> dict[str, Any] | None:
    """Cascade figures over every cascaded request in `records`; None when there is none."""
    figures = _cascade_figures(_requests(records))
    return figures if figures["cascaded"] else None


def arm_figures(arm: str, records: Sequence[SpendRecord]) -> dict[str, Any]:
    requests = _requests(records)
    n = len(requests)
    costs = [cost for _, cost in requests]
    mean, ci = mean_interval(costs)
    latencies = [r.latency_ms for r, _ in requests if r.outcome == "ok" and r.latency_ms > 0]
    errors = sum(1 for r, _ in requests if r.outcome in ERROR_OUTCOMES)
    cascade = _cascade_figures(requests)
    return {
        "arm": arm,
        "requests": n,
        "cost_usd": math.fsum(r.cost_usd for r in records),
        "cost_per_request_usd": mean,
        "cost_per_request_ci95": ci,
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p95_ms": percentile(latencies, 95),
        "errors": errors,
        "error_rate": errors / n if n else None,
        "error_rate_ci95": wilson(errors, n),
        "cascade": cascade if cascade["cascaded"] else None,
    }


def outcome_figures(records: Sequence[SpendRecord], outcomes: Sequence[SpendRecord]) -> list[dict[str, Any]]:
    """Per outcome name: the conversations of `records` (one arm's) that reported it, their share with a
    Wilson 95% interval, and the arm's spend per outcome."""
    requests = [r for r, _ in _requests(records)]
    units = {r.session or f"request:{r.request_id}" for r in requests}
    by_session = {r.session for r in requests if r.session}
    by_request = {r.request_id: r.session or f"request:{r.request_id}" for r in requests if r.request_id}
    reported: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for o in outcomes:
        unit = o.session if o.session in by_session else by_request.get(o.request_id)
        if unit is None:
            continue  # another arm's (or no experiment's) conversation
        reported[o.business_outcome].add(unit)
        counts[o.business_outcome] += 1
    spend = math.fsum(r.cost_usd for r in records)
    return [
        {
            "outcome": name,
            "outcomes": counts[name],
            "conversations": len(units),
            "rate": len(reported[name]) / len(units) if units else None,
            "rate_ci95": wilson(len(reported[name]), len(units)),
            "cost_per_outcome_usd": spend / counts[name],
        }
        for name in sorted(reported)
    ]


def experiment_summary(records: Iterable[SpendRecord], experiment: str) -> dict[str, Any]:
    """Per-arm figures of one experiment, arms in order of their first record."""
    arms: dict[str, list[SpendRecord]] = {}
    outcomes: list[SpendRecord] = []
    for r in records:
        if r.experiment == experiment:
            arms.setdefault(r.arm, []).append(r)
        elif r.outcome == OUTCOME_REPORTED:
            outcomes.append(r)
    figures = []
    for arm, recs in arms.items():
        f = arm_figures(arm, recs)
        f["outcomes"] = outcome_figures(recs, outcomes)
        figures.append(f)
    return {"experiment": experiment, "arms": figures}


# --------------------------------------------------------------------------- output


def _ci(ci: tuple[float, float] | None, fmt: Any) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci is not None else "–"


def _pct(v: float | None) -> str:
    return f"{100 * v:.1f}%" if v is not None else "–"


def _ms(v: float | None) -> str:
    return f"{v:,.0f}" if v is not None else "–"


def format_experiment(summary: dict[str, Any]) -> str:
    rows = []
    for a in summary["arms"]:
        c = a["cascade"]
        rows.append(
            [
                a["arm"] or "(none)",
                str(a["requests"]),
                fmt_usd(a["cost_usd"]),
                fmt_usd(a["cost_per_request_usd"]),
                _ci(a["cost_per_request_ci95"], fmt_usd),
                _ms(a["latency_p50_ms"]),
                _ms(a["latency_p95_ms"]),
                _pct(a["error_rate"]),
                _ci(a["error_rate_ci95"], _pct),
                _pct(c["escalation_rate"]) if c else "–",
                _ci(c["escalation_rate_ci95"], _pct) if c else "–",
            ]
        )
    headers = [
        "arm",
        "requests",
        "spend",
        "per request",
        "95% CI",
        "p50 ms",
        "p95 ms",
        "errors",
        "95% CI",
        "escalated",
        "95% CI",
    ]
    if not rows:
        return f"Experiment {summary['experiment']}: no records in this period"
    lines = [f"Experiment {summary['experiment']}", text_table(headers, rows, set(range(1, 11)))]
    for a in summary["arms"]:
        c = a["cascade"]
        if c:
            lines.append(f"arm {a['arm']}: " + cascade_line(c))
    for a in summary["arms"]:
        for o in a.get("outcomes") or ():
            lines.append(
                f"arm {a['arm']}: {o['outcome']} in {_pct(o['rate'])} {_ci(o['rate_ci95'], _pct)} of "
                f"{o['conversations']} conversations; {fmt_usd(o['cost_per_outcome_usd'])} per {o['outcome']}"
            )
    if not any(a.get("outcomes") for a in summary["arms"]):
        lines.append("(no outcomes reported for this experiment's conversations)")
    return "\n".join(lines)


def cascade_line(c: dict[str, Any]) -> str:
    saved = f" ({c['saved_percent']:.1f}%)" if c["saved_percent"] is not None else ""
    return (
        f"{c['cascaded']} requests cascaded, {c['escalated']} escalated ({_pct(c['escalation_rate'])}); "
        f"saved {fmt_usd(c['saved_usd'])}{saved} against always the last step ({fmt_usd(c['baseline_usd'])})"
    )
