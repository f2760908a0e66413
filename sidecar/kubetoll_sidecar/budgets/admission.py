"""Which meters a request falls under, and the admit decision (pipeline stages 5 and 7).

A budget with a `workloadSelector` applies only in pods whose labels match it
(the downward-API labels file): elsewhere it contributes no meters and its kill
switch refuses nothing. The pods it selects build the same meter keys, so with
Redis they share its meters.

Levels, from the widest: each budget covering the route has a namespace cap
(USD and tokens per day and month, shared by every tenant) and, for the
request's tier, the tenant's own limits (tokens/min and requests/min buckets,
USD per day and month). Every level is checked and reserved before the call and
settled after it.

When a level is exhausted its `onExhausted` decides: reject (429 with
Retry-After), downgrade (serve from the route's downgrade backends, counting the
spend), or allow (serve and count the overage). A request that needs more of a
rejecting level than its whole limit could not be admitted even in an empty
period: `NeverFits` (a 400 naming the level), not a 429 whose Retry-After would
only send the client back to be refused again.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kubetoll_core.burn_rate import BurnRates
from kubetoll_core.enums import FailMode, OnExhausted
from kubetoll_core.meters import cap_meter_name, session_meter_name, tier_meter_name
from kubetoll_core.periods import PeriodCalculator
from kubetoll_core.router_config import Budget, RouterConfig

from .store import BudgetStore, Exhausted, Hold, Meter, MeterState, Reservation


@dataclass(slots=True)
class MeterSet:
    """The meters one request falls under, grouped by what they count."""

    requests: list[Meter] = field(default_factory=list)  # requests/min buckets (stage 5)
    tokens: list[Meter] = field(default_factory=list)  # tokens/min buckets, token caps
    usd: list[Meter] = field(default_factory=list)  # USD caps
    # The calendar periods these meters were built for: the set is reused inside them.
    valid_from: float = float("-inf")
    valid_until: float = float("inf")
    _windows: list[Meter] | None = None

    def windows(self) -> list[Meter]:
        if self._windows is None:
            self._windows = [m for m in self.tokens + self.usd if m.kind == "window"]
        return self._windows

    def all(self) -> list[Meter]:
        return self.requests + self.tokens + self.usd


@dataclass(slots=True)
class Admitted:
    reservation: Reservation
    downgrade: bool  # an exhausted level said "downgrade"
    overage: list[str]  # labels of levels served past their limit ("allow" or "downgrade")


class Rejected(Exception):
    def __init__(self, exhausted: Exhausted, reason: str) -> None:
        self.exhausted = exhausted
        self.reason = reason  # metric label: "requests_per_minute", "tokens_per_minute", "usd", "tokens"
        super().__init__(str(exhausted))

    @property
    def retry_after(self) -> float:
        ra = self.exhausted.retry_after
        return 60.0 if ra is None else ra


class RespondExhausted(Exception):
    """A spent limit whose onExhausted is respond: the request gets the budget's exhaustedResponse."""

    def __init__(self, exhausted: Exhausted) -> None:
        self.exhausted = exhausted
        super().__init__(str(exhausted))


class NoDowngradeBackends(Exception):
    def __init__(self, exhausted: Exhausted) -> None:
        self.exhausted = exhausted
        super().__init__(f"{exhausted}; its onExhausted is downgrade but the route has no downgrade backends")


class NeverFits(Exception):
    """A hold larger than its meter's whole limit, on a level whose onExhausted is reject."""

    def __init__(self, hold: Hold) -> None:
        self.meter = m = hold.meter
        self.needed = hold.amount
        if m.unit == "usd":
            need = f"an estimated ${hold.amount:.6g} (its prompt and output reservation at the dearest backend)"
            allows = f"${m.limit:.6g}"
        else:
            what = "its prompt plus max_tokens" if m.unit == "tokens" else m.unit
            need = f"{hold.amount:g} {m.unit} ({what})"
            allows = f"{m.limit:g} {m.unit}"
        super().__init__(
            f"this request needs {need} of budget level `{m.label}`, which allows {allows} in all: "
            "it could not be admitted even with nothing spent. Lower max_tokens (or shorten the prompt)."
        )


class BudgetMeters:
    """Builds meter sets from the config. One per loaded config.

    A (route, tenant, tier) gets the same MeterSet, the same Meter objects, until
    one of its calendar periods ends: building them costs more than the rest of
    admission, and a store can keep per-meter state keyed on the object. The
    sets are read-only to their users. The memo is bounded; past the bound it
    starts over (a burst of new tenants costs a rebuild each, nothing more).
    """

    MAX_MEMO = 10_000  # a few KB each; a tenant past it costs a rebuild (microseconds), not memory

    def __init__(self, config: RouterConfig, pod_labels: Mapping[str, str] | None = None) -> None:
        # The budgets this pod is under: those without a workloadSelector, and those whose selector matches.
        self.budgets: tuple[Budget, ...] = tuple(b for b in config.budgets if b.applies_to(pod_labels or {}))
        # Linear in routes + budgets (a namespace may hold thousands of each), in config order.
        self._budgets_by_route: dict[str, list[Budget]] = {r.name: [] for r in config.routes}
        for b in self.budgets:
            for name in dict.fromkeys(b.routes) if b.routes else self._budgets_by_route:
                if name in self._budgets_by_route:
                    self._budgets_by_route[name].append(b)
        self._periods = PeriodCalculator()
        self._memo: dict[tuple[str, str, str, str, str], MeterSet] = {}
        # The namespace caps' meters are the same for every tenant: one object each, whichever sets hold it
        # (a tenant's set then costs its own tier meters only). Cleared with the memo.
        self._cap_meters: dict[tuple[str, str, str], Meter] = {}
        # A tier's limits and refill rates, as the floats its tenants' meters hold: one object each, not
        # one a tenant (with the interned labels, ~350 bytes of a new tenant's ~2 KB).
        self._numbers: dict[float, float] = {}
        # The tag keys some budget selects on (tagSelector): only they make two requests' meters differ.
        self._selector_keys = tuple(sorted({k for b in self.budgets for k in b.tag_selector or {}}))
        # Tiers with per-session limits: only there does the session make two requests' meters differ.
        self._session_tiers = frozenset(name for b in self.budgets for name, t in b.tiers.items() if t.per_session)
        # Tiers whose sessions end when idle (sessionIdleSeconds): the shortest, where budgets differ.
        self._session_idle: dict[str, int] = {}
        for b in self.budgets:
            for name, t in b.tiers.items():
                idle = t.session_idle_seconds
                if idle is not None:  # only beside a per-session limit (the models refuse it alone)
                    self._session_idle[name] = min(idle, self._session_idle.get(name, idle))

    def _number(self, value: float) -> float:
        return self._numbers.setdefault(value, float(value))

    def session_idle_seconds(self, tier: str) -> int | None:
        """How long a session of `tier` may be idle before it starts afresh (None: it lasts the day)."""
        return self._session_idle.get(tier)

    def for_request(
        self,
        route: str,
        tenant: str,
        tier: str,
        now: float,
        tags: Mapping[str, str] | None = None,
        session: str = "",
    ) -> MeterSet:
        selected = ""
        if tags and self._selector_keys:
            selected = ",".join(f"{k}={tags.get(k, '')}" for k in self._selector_keys)
        session = session if tier in self._session_tiers else ""
        key = (route, tenant, tier, selected, session)
        ms = self._memo.get(key)
        if ms is not None and ms.valid_from <= now < ms.valid_until:
            return ms
        ms = self._build(route, tenant, tier, now, tags or {}, session)
        if len(self._memo) >= self.MAX_MEMO:
            self._memo.clear()
            self._cap_meters.clear()
        self._memo[key] = ms
        return ms

    def _build(self, route: str, tenant: str, tier: str, now: float, tags: Mapping[str, str], session: str) -> MeterSet:
        ms = MeterSet()
        for b in self._budgets_by_route.get(route, ()):
            if not b.selects(tags):
                continue  # a budget for other tags (tagSelector)
            day = self._periods.period("day", b.timezone, now)
            month = self._periods.period("month", b.timezone, now)
            ms.valid_from = max(ms.valid_from, day.start, month.start)
            ms.valid_until = min(ms.valid_until, day.end, month.end)
            cap, on = b.cap, b.cap_on_exhausted
            base = b.name
            fo = b.fail_mode is FailMode.fail_open
            for unit, limit, period, target in (
                ("usd", cap.usd_per_day, day, ms.usd),
                ("usd", cap.usd_per_month, month, ms.usd),
                ("tokens", cap.tokens_per_day, day, ms.tokens),
                ("tokens", cap.tokens_per_month, month, ms.tokens),
            ):
                if limit is not None:
                    shared = (b.name, unit, period.id)
                    meter = self._cap_meters.get(shared)
                    if meter is None:
                        meter = self._cap_meters[shared] = Meter(
                            key=f"{base}:{cap_meter_name(unit, period.id)}",
                            kind="window",
                            unit=unit,
                            limit=float(limit),
                            budget=b.name,
                            level="cap",
                            label=f"{base}/cap/{unit}-{period.kind}",
                            on_exhausted=on,
                            period_end=period.end,
                            fail_open=fo,
                        )
                    target.append(meter)
            t = b.tiers.get(tier)
            if t is None:
                continue
            # The level and the labels are the same for every tenant of the tier: one string each, not one a
            # tenant (the memo holds up to MAX_MEMO meter sets; ~240 bytes a tenant).
            lvl = sys.intern(f"tier:{tier}")
            if t.requests_per_minute is not None:
                ms.requests.append(
                    Meter(
                        key=f"{base}:{tier_meter_name(tier, tenant, 'rpm')}",
                        kind="bucket",
                        unit="requests",
                        limit=self._number(t.requests_per_minute),
                        budget=b.name,
                        level=lvl,
                        label=sys.intern(f"{base}/{lvl}/requests-per-minute"),
                        on_exhausted=t.on_exhausted,
                        refill_per_second=self._number(t.requests_per_minute / 60.0),
                        fail_open=fo,
                    )
                )
            if t.tokens_per_minute is not None:
                ms.tokens.append(
                    Meter(
                        key=f"{base}:{tier_meter_name(tier, tenant, 'tpm')}",
                        kind="bucket",
                        unit="tokens",
                        limit=self._number(t.tokens_per_minute),
                        budget=b.name,
                        level=lvl,
                        label=sys.intern(f"{base}/{lvl}/tokens-per-minute"),
                        on_exhausted=t.on_exhausted,
                        refill_per_second=self._number(t.tokens_per_minute / 60.0),
                        fail_open=fo,
                    )
                )
            if session:
                # Per session (usdPerSession, tokensPerSession), within the budget's calendar day.
                for unit, limit, target in (
                    ("usd", t.usd_per_session, ms.usd),
                    ("tokens", t.tokens_per_session, ms.tokens),
                ):
                    if limit is not None:
                        target.append(
                            Meter(
                                key=f"{base}:{session_meter_name(tier, session, f'{unit}:{day.id}')}",
                                kind="window",
                                unit=unit,
                                limit=self._number(limit),
                                budget=b.name,
                                level=lvl,
                                label=sys.intern(f"{base}/{lvl}/{unit}-per-session"),
                                on_exhausted=t.on_exhausted,
                                period_end=day.end,
                                fail_open=fo,
                            )
                        )
            for limit, period in ((t.usd_per_day, day), (t.usd_per_month, month)):
                if limit is not None:
                    ms.usd.append(
                        Meter(
                            key=f"{base}:{tier_meter_name(tier, tenant, f'usd:{period.id}')}",
                            kind="window",
                            unit="usd",
                            limit=self._number(limit),
                            budget=b.name,
                            level=lvl,
                            label=sys.intern(f"{base}/{lvl}/usd-{period.kind}"),
                            on_exhausted=t.on_exhausted,
                            period_end=period.end,
                            fail_open=fo,
                        )
                    )
        return ms


def _reason(m: Meter) -> str:
    if m.kind == "bucket":
        return "requests_per_minute" if m.unit == "requests" else "tokens_per_minute"
    return f"{m.unit}_{'cap' if m.level == 'cap' else 'tier'}"


async def reserve_with_policy(store: BudgetStore, holds: Sequence[Hold], now: float, can_downgrade: bool) -> Admitted:
    """Reserve all holds; an exhausted level applies its onExhausted and we try again.

    Raises NeverFits first when a rejecting level could never hold its share (see the module doc).

    At most one retry per hold: each pass turns one more hold into an unenforced one.
    """
    holds = list(holds)
    for h in holds:
        if h.enforce and h.amount > h.meter.limit and h.meter.on_exhausted is OnExhausted.reject:
            raise NeverFits(h)
    downgrade = False
    overage: list[str] = []
    for _ in range(len(holds) + 1):
        try:
            res = await store.reserve(holds, now)
            return Admitted(res, downgrade, overage)
        except Exhausted as exc:
            policy = exc.meter.on_exhausted
            if policy is OnExhausted.reject:
                raise Rejected(exc, _reason(exc.meter)) from None
            if policy is OnExhausted.respond:
                raise RespondExhausted(exc) from None
            if policy is OnExhausted.downgrade:
                if not can_downgrade:
                    raise NoDowngradeBackends(exc) from None
                downgrade = True
            overage.append(exc.meter.label)
            holds = [Hold(h.meter, h.amount, False) if h.meter.key == exc.meter.key else h for h in holds]
    raise AssertionError("unreachable: every hold was relaxed")


def percent_used(store: BudgetStore, meters: Sequence[Meter], now: float) -> float:
    """The highest use, in percent, over the calendar windows (what downgrade atPercent compares to)."""
    worst = 0.0
    for m in meters:
        if m.kind == "window":
            worst = max(worst, store.snapshot(m, now).percent)
    return worst


def burn_exhausts(store: BudgetStore, meters: Sequence[Meter], now: float, rates: BurnRates, window: float) -> bool:
    """Whether a namespace cap of `meters`, at its spend rate over `window` seconds, runs out before its
    period ends (downgrade.burnRate). Each call is a reading of the caps' spend for `rates`."""
    burning = False
    for m in meters:
        if m.kind != "window" or m.level != "cap":
            continue  # per-tenant tier meters would need a tracker per tenant: the cap is what the team pays
        st = store.snapshot(m, now)
        tracker = rates.observe(m.key, now, st.used, window)
        burning = burning or tracker.exhausts_before(now, st.used, st.limit, m.period_end)
    return burning


def tightest(store: BudgetStore, meters: Sequence[Meter], now: float) -> tuple[Meter, MeterState] | None:
    """The level with the smallest remaining fraction, for the x-kubetoll-budget-remaining header."""
    best: tuple[Meter, MeterState] | None = None
    best_frac = 2.0
    for m in meters:
        st = store.snapshot(m, now)
        frac = st.remaining / st.limit if st.limit > 0 else 0.0
        if frac < best_frac:
            best, best_frac = (m, st), frac
    return best
