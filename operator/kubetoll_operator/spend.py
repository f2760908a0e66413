"""The spend reporter's arithmetic: TokenBudget and CachePolicy status from the sidecars' Redis state.

Plain functions and small value objects, no Kubernetes calls (spend_reporter.py reads
Redis on a timer per namespace, then writes what these functions return).

* `budget_report`: a budget's window meters (`ledger_stream.period_totals`) in
  their current calendar periods and the refusals admission recorded on them
  (`RefusalLog`), turned into the status fields, the `ThresholdReached`
  condition and the alerts due.
* `local_budget_report`: the same status without a shared store (limits and
  periods from the spec; spend is per pod and unknown here).
* `CacheCounter`: cache hits and avoided USD per route since the start of the
  current UTC day, read once per ledger entry through a cursor.

The headline of a TokenBudget status (binding, spent, limit, remaining, unit,
percent, period) is its **binding meter**: of every cap limit and every tenant's
tier limit in its current period, the one closest to refusing. A meter that is
refusing (admission recorded a refusal on it within `REFUSAL_WINDOW` seconds)
comes first, then one whose spend reached the limit, then the highest percent
spent; a tie goes to the cap, the day and USD first. `meters` lists every level. Amounts come from
Redis's exact integers (`MeterTotal`): spent is settled spend, leases are not
spend (docs/redis-layout.md).
"""

from __future__ import annotations

import datetime
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from kubetoll_core.burn_rate import BurnRates
from kubetoll_core.ledger_stream import MeterTotal, ledger_start_id
from kubetoll_core.meters import cap_meter_name, parse_meter_name, scale_of, to_units
from kubetoll_core.periods import Period, compute_period
from kubetoll_core.router_config import Budget, RouterConfig
from kubetoll_core.spend_record import SpendRecord

from .cache_health import DEGRADED

# Conditions the spend reporter owns; the compile owns the others. Each writer keeps the other's.
SPEND_KNOWN = "SpendKnown"
THRESHOLD_REACHED = "ThresholdReached"
# Degraded is a CachePolicy's (cache_health.py), written on the same pass.
SPEND_CONDITIONS = (SPEND_KNOWN, THRESHOLD_REACHED, DEGRADED)
# Status fields the reporter writes (and clears when a budget no longer has a limit).
BUDGET_FIELDS = (
    "binding",
    "refusing",
    "spent",
    "limit",
    "remaining",
    "unit",
    "percent",
    "periodStart",
    "periodEnd",
    "display",
    "tenantsOverBudget",
    "meters",
)
CACHE_FIELDS = ("hits", "savedUSD", "countersSince")

# The order of a budget's cap limits: ties for the binding meter go to the earlier one.
CAP_ORDER = (("day", "usd"), ("day", "tokens"), ("month", "usd"), ("month", "tokens"))
UNIT_NAMES = {"usd": "USD", "tokens": "tokens"}
WARNING_FROM = 90  # thresholds at or above this post a Warning Event, lower ones a Normal one
USD_SCALE = scale_of("usd")
# A meter refused on within this many seconds counts as refusing (the sidecars record at
# most one refusal per meter per second each, so a meter that keeps refusing stays fresh).
REFUSAL_WINDOW = 60.0
# What the spend columns print without a shared store (spend is counted per pod).
PER_POD = "per pod"
UNKNOWN = "unknown"


def rfc3339(ts: float, tz: str = "UTC") -> str:
    """An instant in the budget's timezone (its local midnight reads as such), Z for UTC."""
    text = datetime.datetime.fromtimestamp(ts, ZoneInfo(tz)).isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _amount(units: int, scale: int, unit: str) -> float:
    return round(units / scale, 6 if unit == "usd" else 3)


def _percent(spent_units: int, limit_units: int) -> float:
    return round(100.0 * spent_units / limit_units, 2) if limit_units > 0 else 100.0


def _text(x: float) -> str:
    """A figure as a column prints it: no exponent, no trailing zeros."""
    return f"{x:.6f}".rstrip("0").rstrip(".") or "0"


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One limit of a budget in its current period: a namespace cap, or one tenant's tier limit."""

    meter: str  # the meter's name within the budget, e.g. "cap:usd:2026-11" or "tier:free:t:acme:usd:2026-11-22"
    level: str  # "cap" | "tier:<name>"
    tenant: str  # "" for the cap
    unit: str  # "usd" | "tokens"
    window: str  # "day" | "month"
    period: Period
    timezone: str
    scale: int
    limit_units: int
    spent_units: int
    refused_at: float | None = None  # the last refusal admission recorded on it, if within the refusal window

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
    def refusing(self) -> bool:
        return self.refused_at is not None

    @property
    def exhausted(self) -> bool:
        """Admission refuses on it, or spend has reached the limit."""
        return self.refusing or self.spent_units >= self.limit_units

    @property
    def binding(self) -> str:
        """The name the status and its printer column give it: cap/usd-day, tier:free/usd-month (acme)."""
        name = f"{self.level}/{self.unit}-{self.window}"
        return f"{name} ({self.tenant})" if self.tenant else name

    @property
    def title(self) -> str:
        what = f"{UNIT_NAMES[self.unit]} per {self.window}"
        if self.level == "cap":
            return f"{what} cap"
        return f"{self.level} {what} limit of tenant {self.tenant}"

    def crossed(self, thresholds: Iterable[int]) -> list[int]:
        """The thresholds reached, lowest first; 100 as soon as admission refuses on the meter.

        Integer arithmetic: 50% of 10 USD is reached at exactly 5.
        """
        if self.limit_units <= 0:
            return []
        wanted = set(thresholds)
        out = {t for t in wanted if self.spent_units * 100 >= t * self.limit_units}
        if self.refusing and 100 in wanted:
            out.add(100)
        return sorted(out)

    def alert_message(self, threshold: int) -> str:
        unit = UNIT_NAMES[self.unit]
        spent = f"{self.spent:g} of {self.limit:g} {unit} spent ({self.percent:g}%)"
        if threshold == 100 and self.refusing and self.spent_units < self.limit_units:
            spent = f"admission refuses requests on it (a request's reservation no longer fits), {spent}"
        return (
            f"{self.title} reached the {threshold}% alert threshold: {spent} "
            f"in period {self.period.id} (ends {rfc3339(self.period.end, self.timezone)})"
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
            "refusing": self.refusing,
        }


@dataclass
class RefusalLog:
    """When admission last refused on each meter, from the ledger's refusal records.

    Fed from the reporter's ledger cursor (each entry once); `recent` is what
    `budget_report` takes. Entries older than the window are dropped.
    """

    window: float = REFUSAL_WINDOW
    last: dict[str, dict[str, float]] = field(default_factory=dict)  # budget -> meter name -> time

    def add(self, records: Iterable[SpendRecord]) -> None:
        for r in records:
            if r.refusal and r.refused_budget:
                meters = self.last.setdefault(r.refused_budget, {})
                if r.time > meters.get(r.refused_meter, 0.0):
                    meters[r.refused_meter] = r.time

    def recent(self, budget: str, now: float) -> dict[str, float]:
        since = now - self.window
        return {m: t for m, t in self.last.get(budget, {}).items() if t >= since}

    def prune(self, now: float) -> None:
        since = now - self.window
        self.last = {
            b: kept for b, meters in self.last.items() if (kept := {m: t for m, t in meters.items() if t >= since})
        }


@dataclass(frozen=True)
class BudgetReport:
    caps: list[MeterReading]
    tenants: list[MeterReading]  # the tenants' tier limits with spend or a refusal this period
    status: dict[str, Any]  # the spend fields (None clears a field)
    threshold: dict[str, Any]  # the ThresholdReached condition (without lastTransitionTime)
    over: list[MeterReading] = field(default_factory=list)  # exhausted tier limits of tenantsOverBudget

    @property
    def binding(self) -> MeterReading | None:
        return binding_meter([*self.caps, *self.tenants])

    def alerts(self, thresholds: Iterable[int]) -> list[tuple[MeterReading, int]]:
        """Every cap threshold reached, and 100 for each tenant listed in tenantsOverBudget."""
        thresholds = list(thresholds)
        out = [(cap, t) for cap in self.caps for t in cap.crossed(thresholds)]
        if 100 in thresholds:
            out += [(m, 100) for m in self.over]
        return out


def binding_meter(readings: Sequence[MeterReading]) -> MeterReading | None:
    """The reading closest to refusing: refusing, then exhausted, then the highest percent; ties to the earlier one.

    Refusing before exhausted: a limit spent past with onExhausted allow or downgrade
    does not refuse. Percent compared exactly (cross-multiplied integers).
    """
    best: MeterReading | None = None
    for m in readings:
        if best is None or (m.refusing, m.exhausted, m.spent_units * best.limit_units) > (
            best.refusing,
            best.exhausted,
            best.spent_units * m.limit_units,
        ):
            best = m
    return best


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


NO_SHARED_STORE_CONDITIONS = (
    condition(
        SPEND_KNOWN,
        False,
        "NoSharedStore",
        "no shared budget store (the operator runs without --redis-url, chart redis.url): each sidecar counts "
        "spend in its own memory, per pod, so every pod may spend up to the limit and the operator cannot read "
        "what was spent; limit and period come from the spec",
    ),
    condition(
        THRESHOLD_REACHED,
        False,
        "NoSharedStore",
        "alert thresholds need a shared budget store (Redis): spend is counted per pod",
    ),
)


def _cap_limits(budget: Budget) -> dict[tuple[str, str], float | int | None]:
    return {
        ("day", "usd"): budget.cap.usd_per_day,
        ("month", "usd"): budget.cap.usd_per_month,
        ("day", "tokens"): budget.cap.tokens_per_day,
        ("month", "tokens"): budget.cap.tokens_per_month,
    }


def _tier_limits(budget: Budget) -> list[tuple[str, str, float]]:
    """(tier, window, USD limit) of every tier limit that is set, in tier name order."""
    out = []
    for tier_name, tier in sorted(budget.tiers.items()):
        for window, limit in (("day", tier.usd_per_day), ("month", tier.usd_per_month)):
            if limit is not None:
                out.append((tier_name, window, float(limit)))
    return out


def _headline(head: MeterReading | None) -> dict[str, Any]:
    if head is None:
        return {k: None for k in ("binding", "refusing", "spent", "limit", "remaining", "unit", "percent")} | {
            "periodStart": None,
            "periodEnd": None,
            "display": None,
        }
    percent = _text(head.percent) + (" (refusing)" if head.refusing else "")
    return {
        "binding": head.binding,
        "refusing": head.refusing,
        "spent": head.spent,
        "limit": head.limit,
        "remaining": head.remaining,
        "unit": UNIT_NAMES[head.unit],
        "percent": head.percent,
        "periodStart": rfc3339(head.period.start, head.timezone),
        "periodEnd": rfc3339(head.period.end, head.timezone),
        "display": {"spent": _text(head.spent), "percent": percent},
    }


def budget_report(
    budget: Budget,
    totals: Sequence[MeterTotal],
    thresholds: Sequence[int],
    now: float,
    top_n: int,
    refused: Mapping[str, float] | None = None,
    rates: BurnRates | None = None,
) -> BudgetReport:
    """Status fields for one budget from its window meters as Redis holds them.

    `refused`: meter name -> the last refusal recorded on it within the refusal window
    (`RefusalLog.recent`). `rates`: this namespace's spend-rate trackers, fed a reading of each
    cap on every pass, for `projectedExhaustion`.
    """
    refused = refused or {}
    by_name = {t.meter: t for t in totals if t.budget == budget.name and t.kind == "window"}
    tz = budget.timezone
    periods = {kind: compute_period(kind, tz, now) for kind in ("day", "month")}

    caps: list[MeterReading] = []
    limits = _cap_limits(budget)
    for window, unit in CAP_ORDER:
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
        caps.append(
            MeterReading(name, "cap", "", unit, window, period, tz, scale, limit_units, spent_units, refused.get(name))
        )

    rows = [c.row() for c in caps]
    projected: list[float] = []
    if rates is not None:
        for c, row in zip(caps, rows, strict=True):
            tracker = rates.observe(f"{budget.name}/{c.meter}", now, float(c.spent_units))
            at = tracker.exhaustion(now, float(c.spent_units), float(c.limit_units))
            # Only a projection inside the period means anything: the meter resets at its end.
            if at is not None and at < c.period.end:
                at = math.ceil(at / 60.0) * 60.0  # to the minute: a projection is not more precise than that
                row["projectedExhaustion"] = rfc3339(at, tz)
                projected.append(at)
            else:
                row["projectedExhaustion"] = None
    tenants: list[MeterReading] = []
    for tier_name, window, limit in _tier_limits(budget):
        period = periods[window]
        level = f"tier:{tier_name}"
        mine: dict[str, MeterReading] = {}
        for t in by_name.values():
            n = parse_meter_name(t.meter)
            if n is None or n.tier != tier_name or n.unit != "usd" or n.period != period.id:
                continue
            mine[n.tenant] = MeterReading(
                t.meter, level, n.tenant, "usd", window, period, tz, t.scale, t.limit_units, t.spent_units,
                refused.get(t.meter),
            )  # fmt: skip
        for name, at in refused.items():  # refused before the meter had any total (nothing spent yet)
            n = parse_meter_name(name)
            if n is None or n.tier != tier_name or n.unit != "usd" or n.period != period.id or n.tenant in mine:
                continue
            mine[n.tenant] = MeterReading(
                name, level, n.tenant, "usd", window, period, tz, USD_SCALE, to_units(limit, USD_SCALE), 0, at
            )
        spent = sum(m.spent_units if m.scale == USD_SCALE else round(m.spent_units * USD_SCALE / max(m.scale, 1))
                    for m in mine.values())  # fmt: skip
        over = [m for m in mine.values() if m.exhausted]
        rows.append(
            {
                "level": level,
                "unit": "USD",
                "window": window,
                "period": period.id,
                "periodStart": rfc3339(period.start, tz),
                "periodEnd": rfc3339(period.end, tz),
                "limit": round(limit, 6),
                "spent": _amount(spent, USD_SCALE, "usd"),
                "tenants": len(mine),
                "tenantsOver": len(over),
                "maxPercent": round(max((m.percent for m in mine.values()), default=0.0), 2),
                "refusing": any(m.refusing for m in mine.values()),
            }
        )
        tenants.extend(sorted(mine.values(), key=lambda m: m.tenant))

    # A tenant's worst exhausted tier limit ranks it: refusing first, then percent.
    worst: dict[str, MeterReading] = {}
    for m in tenants:
        if m.exhausted:
            w = worst.get(m.tenant)
            if w is None or (m.refusing, m.percent) > (w.refusing, w.percent):
                worst[m.tenant] = m
    ranked = sorted(worst.values(), key=lambda m: (-m.percent, m.tenant))[:top_n]
    status: dict[str, Any] = {"tenantsOverBudget": [m.tenant for m in ranked], "meters": rows}
    status.update(_headline(binding_meter([*caps, *tenants])))
    if rates is not None:
        status["projectedExhaustion"] = rfc3339(min(projected), tz) if projected else None
    return BudgetReport(caps, tenants, status, threshold_condition(caps, thresholds), ranked)


def local_budget_report(budget: Budget, now: float) -> dict[str, Any]:
    """The status fields without a shared store: limits and periods from the spec, spend unknown (per pod).

    The binding meter is the first limit set (cap day before month, USD before
    tokens, then the tiers): with nothing known of spend, the one that would refuse
    first at an even rate of spend is not known either.
    """
    tz = budget.timezone
    periods = {kind: compute_period(kind, tz, now) for kind in ("day", "month")}
    rows: list[dict[str, Any]] = []
    limits = _cap_limits(budget)
    for window, unit in CAP_ORDER:
        limit = limits[(window, unit)]
        if limit is not None:
            rows.append(_limit_row("cap", UNIT_NAMES[unit], window, periods[window], tz, float(limit)))
    for tier_name, window, limit in _tier_limits(budget):
        rows.append(_limit_row(f"tier:{tier_name}", "USD", window, periods[window], tz, limit))
    status: dict[str, Any] = dict.fromkeys(("refusing", "spent", "remaining", "percent", "tenantsOverBudget"))
    status["meters"] = rows
    if not rows:
        return status | _headline(None)
    head = rows[0]
    unit = "usd" if head["unit"] == "USD" else "tokens"
    return status | {
        "binding": f"{head['level']}/{unit}-{head['window']}",
        "limit": head["limit"],
        "unit": head["unit"],
        "periodStart": head["periodStart"],
        "periodEnd": head["periodEnd"],
        "display": {"spent": PER_POD, "percent": UNKNOWN},
    }


def _limit_row(level: str, unit: str, window: str, period: Period, tz: str, limit: float) -> dict[str, Any]:
    return {
        "level": level,
        "unit": unit,
        "window": window,
        "period": period.id,
        "periodStart": rfc3339(period.start, tz),
        "periodEnd": rfc3339(period.end, tz),
        "limit": round(limit, 6 if unit == "USD" else 3),
    }


def threshold_condition(caps: Sequence[MeterReading], thresholds: Sequence[int]) -> dict[str, Any]:
    if not caps:
        return condition(
            THRESHOLD_REACHED, False, "NoCap", "alert thresholds apply to the namespace cap; this budget sets none"
        )
    if not thresholds:
        return condition(THRESHOLD_REACHED, False, "NoThresholds", "spec.alertThresholds is empty")
    best: tuple[int, MeterReading] | None = None
    for cap in caps:  # cap order: a tie goes to the earlier cap
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
