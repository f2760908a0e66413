"""The spend reporter's arithmetic: TokenBudget and CachePolicy status from the sidecars' Redis state.

Plain functions and small value objects, no Kubernetes calls (handlers.py reads
Redis on a timer per namespace, then writes what these functions return).

* `budget_report`: a budget's window meters (`ledger_redis.period_totals`) in
  their current calendar periods, turned into the status fields, the
  `ThresholdReached` condition and the alert thresholds crossed.
* `CacheCounter`: cache hits and avoided USD per route since the start of the
  current UTC day, read once per ledger entry through a cursor.

The headline of a TokenBudget status (spent, limit, remaining, unit, percent,
period) is its namespace cap of the longest period that is set, USD before
tokens (usd/month, tokens/month, usd/day, tokens/day): the figure a platform team
budgets with, and one that stays put while spend moves; `meters` lists every
level. Amounts come from Redis's exact integers (`MeterTotal`): spent is settled
spend, leases are not spend (docs/redis-layout.md).
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from kubetoll_core.ledger_stream import MeterTotal, ledger_start_id
from kubetoll_core.meters import cap_meter_name, parse_meter_name, scale_of, to_units
from kubetoll_core.periods import Period, compute_period
from kubetoll_core.router_config import Budget, RouterConfig
from kubetoll_core.spend_record import SpendRecord

# Conditions the spend reporter owns; the compile owns the others. Each writer keeps the other's.
SPEND_KNOWN = "SpendKnown"
THRESHOLD_REACHED = "ThresholdReached"
SPEND_CONDITIONS = (SPEND_KNOWN, THRESHOLD_REACHED)
# Status fields the reporter writes (and clears when a budget no longer has a cap).
BUDGET_FIELDS = (
    "spent",
    "limit",
    "remaining",
    "unit",
    "percent",
    "periodStart",
    "periodEnd",
    "tenantsOverBudget",
    "meters",
)
CACHE_FIELDS = ("hits", "savedUSD", "countersSince")

HEADLINE_ORDER = (("month", "usd"), ("month", "tokens"), ("day", "usd"), ("day", "tokens"))
UNIT_NAMES = {"usd": "USD", "tokens": "tokens"}
WARNING_FROM = 90  # thresholds at or above this post a Warning Event, lower ones a Normal one
USD_SCALE = scale_of("usd")


def rfc3339(ts: float, tz: str = "UTC") -> str:
    """An instant in the budget's timezone (its local midnight reads as such), Z for UTC."""
    text = datetime.datetime.fromtimestamp(ts, ZoneInfo(tz)).isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _amount(units: int, scale: int, unit: str) -> float:
    return round(units / scale, 6 if unit == "usd" else 3)


def _percent(spent_units: int, limit_units: int) -> float:
    return round(100.0 * spent_units / limit_units, 2) if limit_units > 0 else 100.0


@dataclass(frozen=True, slots=True)
class CapReading:
    """One namespace cap limit in its current period."""

    meter: str  # the meter's name within the budget, e.g. "cap:usd:2026-11"
    unit: str  # "usd" | "tokens"
    window: str  # "day" | "month"
    period: Period
    timezone: str
    scale: int
    limit_units: int
    spent_units: int

    @property
    def spent(self) -> float:
        return _amount(self.spent_units, self.scale, self.unit)

    @property
    def limit(self) -> float:
        return _amount(self.limit_units, self.scale, self.unit)

    @property
    def remaining(self) -> float:
        return _amount(max(self.limit_units - self.spent_units, 0), self.scale, self.unit)

    @property
    def percent(self) -> float:
        return _percent(self.spent_units, self.limit_units)

    @property
    def title(self) -> str:
        return f"{UNIT_NAMES[self.unit]} per {self.window} cap"

    def crossed(self, thresholds: Iterable[int]) -> list[int]:
        """The thresholds spend has reached, lowest first.

        Integer arithmetic: 50% of 10 USD is reached at exactly 5.
        """
        if self.limit_units <= 0:
            return []
        return sorted(t for t in set(thresholds) if self.spent_units * 100 >= t * self.limit_units)

    def alert_message(self, threshold: int) -> str:
        unit = UNIT_NAMES[self.unit]
        return (
            f"{self.title} reached the {threshold}% alert threshold: {self.spent:g} of {self.limit:g} {unit} spent "
            f"({self.percent:g}%) in period {self.period.id} (ends {rfc3339(self.period.end, self.timezone)})"
        )

    def row(self) -> dict[str, Any]:
        return {
            "level": "cap",
            "unit": UNIT_NAMES[self.unit],
            "window": self.window,
            "period": self.period.id,
            "periodStart": rfc3339(self.period.start, self.timezone),
            "periodEnd": rfc3339(self.period.end, self.timezone),
            "limit": self.limit,
            "spent": self.spent,
            "remaining": self.remaining,
            "percent": self.percent,
        }


@dataclass(frozen=True)
class BudgetReport:
    caps: list[CapReading]
    status: dict[str, Any]  # the spend fields (None clears a field)
    threshold: dict[str, Any]  # the ThresholdReached condition (without lastTransitionTime)

    def alerts(self, thresholds: Iterable[int]) -> list[tuple[CapReading, int]]:
        return [(cap, t) for cap in self.caps for t in cap.crossed(thresholds)]


def condition(type_: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message}


def spend_known(ok: bool, detail: str = "") -> dict[str, Any]:
    if ok:
        return condition(SPEND_KNOWN, True, "SpendRead", "spend read from the budget store (Redis)")
    return condition(
        SPEND_KNOWN,
        False,
        "RedisUnavailable",
        f"cannot read spend from the budget store (Redis): {detail}; the spend fields show the last reading",
    )


def budget_report(
    budget: Budget, totals: Sequence[MeterTotal], thresholds: Sequence[int], now: float, top_n: int
) -> BudgetReport:
    """Status fields for one budget from its window meters as Redis holds them."""
    by_name = {t.meter: t for t in totals if t.budget == budget.name and t.kind == "window"}
    tz = budget.timezone
    periods = {kind: compute_period(kind, tz, now) for kind in ("day", "month")}

    caps: list[CapReading] = []
    limits = {
        ("day", "usd"): budget.cap.usd_per_day,
        ("month", "usd"): budget.cap.usd_per_month,
        ("day", "tokens"): budget.cap.tokens_per_day,
        ("month", "tokens"): budget.cap.tokens_per_month,
    }
    for window, unit in HEADLINE_ORDER:
        limit = limits[(window, unit)]
        if limit is None:
            continue
        period = periods[window]
        name = cap_meter_name(unit, period.id)
        t = by_name.get(name)
        if t is not None:  # what the sidecars enforce (they write their config's limit on every sync)
            scale, limit_units, spent_units = t.scale, t.limit_units, t.spent_units
        else:  # nothing spent this period yet
            scale = scale_of(unit)
            limit_units, spent_units = to_units(float(limit), scale), 0
        caps.append(CapReading(name, unit, window, period, tz, scale, limit_units, spent_units))

    rows = [c.row() for c in caps]
    over: dict[str, float] = {}
    for tier_name, tier in sorted(budget.tiers.items()):
        for window, limit in (("day", tier.usd_per_day), ("month", tier.usd_per_month)):
            if limit is None:
                continue
            period = periods[window]
            spent = tenants = n_over = 0
            worst = 0.0
            for t in by_name.values():
                n = parse_meter_name(t.meter)
                if n is None or n.tier != tier_name or n.unit != "usd" or n.period != period.id:
                    continue
                pct = _percent(t.spent_units, t.limit_units)
                spent += t.spent_units if t.scale == USD_SCALE else round(t.spent_units * USD_SCALE / max(t.scale, 1))
                tenants += 1
                worst = max(worst, pct)
                if t.limit_units > 0 and t.spent_units >= t.limit_units:
                    n_over += 1
                    over[n.tenant] = max(over.get(n.tenant, 0.0), pct)
            rows.append(
                {
                    "level": f"tier:{tier_name}",
                    "unit": "USD",
                    "window": window,
                    "period": period.id,
                    "periodStart": rfc3339(period.start, tz),
                    "periodEnd": rfc3339(period.end, tz),
                    "limit": round(float(limit), 6),
                    "spent": _amount(spent, USD_SCALE, "usd"),
                    "tenants": tenants,
                    "tenantsOver": n_over,
                    "maxPercent": round(worst, 2),
                }
            )

    status: dict[str, Any] = {
        "tenantsOverBudget": [name for name, _ in sorted(over.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]],
        "meters": rows,
    }
    head = caps[0] if caps else None
    status.update(
        {
            "spent": head.spent if head else None,
            "limit": head.limit if head else None,
            "remaining": head.remaining if head else None,
            "unit": UNIT_NAMES[head.unit] if head else None,
            "percent": head.percent if head else None,
            "periodStart": rfc3339(head.period.start, tz) if head else None,
            "periodEnd": rfc3339(head.period.end, tz) if head else None,
        }
    )
    return BudgetReport(caps, status, threshold_condition(caps, thresholds))


def threshold_condition(caps: Sequence[CapReading], thresholds: Sequence[int]) -> dict[str, Any]:
    if not caps:
        return condition(
            THRESHOLD_REACHED, False, "NoCap", "alert thresholds apply to the namespace cap; this budget sets none"
        )
    if not thresholds:
        return condition(THRESHOLD_REACHED, False, "NoThresholds", "spec.alertThresholds is empty")
    best: tuple[int, CapReading] | None = None
    for cap in caps:  # headline order: a tie goes to the headline cap
        crossed = cap.crossed(thresholds)
        if crossed and (best is None or crossed[-1] > best[0]):
            best = (crossed[-1], cap)
    if best is None:
        listed = ", ".join(f"{t}%" for t in sorted(set(thresholds)))
        return condition(
            THRESHOLD_REACHED,
            False,
            "BelowThresholds",
            f"no cap has reached an alert threshold ({listed}) in its current period",
        )
    t, cap = best
    return condition(THRESHOLD_REACHED, True, "ThresholdCrossed", cap.alert_message(t))


def alert_event_type(threshold: int) -> str:
    return "Warning" if threshold >= WARNING_FROM else "Normal"


# --------------------------------------------------------------------------- cache counters


@dataclass
class CacheCounter:
    """Cache hits and avoided USD per route in the current UTC day, from the ledger stream.

    The reporter reads the stream forward from a cursor, so each entry is read once a
    day (a full re-read every few seconds would cost as much as the day's traffic). A
    new day resets the counts and the cursor; so does an operator restart, which reads
    the day from its start again.
    """

    day: str = ""
    start: float = 0.0
    end: float = 0.0
    cursor: str = "0-0"
    hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    avoided_nusd: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def roll(self, now: float) -> None:
        if self.start <= now < self.end:
            return
        p = compute_period("day", "UTC", now)
        self.day, self.start, self.end = p.id, p.start, p.end
        self.cursor = ledger_start_id(p.start)
        self.hits = defaultdict(int)
        self.avoided_nusd = defaultdict(int)

    def add(self, records: Iterable[SpendRecord]) -> None:
        for r in records:
            if r.cache_hit and self.start <= r.time < self.end:
                self.hits[r.route] += 1
                self.avoided_nusd[r.route] += to_units(r.avoided_usd, USD_SCALE)

    def status(self, routes: Iterable[str]) -> dict[str, Any]:
        routes = list(routes)
        return {
            "hits": sum(self.hits.get(r, 0) for r in routes),
            "savedUSD": _amount(sum(self.avoided_nusd.get(r, 0) for r in routes), USD_SCALE, "usd"),
            "countersSince": rfc3339(self.start),
        }


def policy_routes(config: RouterConfig) -> dict[str, list[str]]:
    """Cache policy name → the routes (model names) naming it in this config."""
    out: dict[str, list[str]] = defaultdict(list)
    for r in config.routes:
        if r.cache_policy:
            out[r.cache_policy].append(r.name)
    return out
