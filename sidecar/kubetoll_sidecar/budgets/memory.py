"""In-memory BudgetStore: one process, exact, no I/O.

Each method runs to completion without awaiting, so on one event loop every
reserve and settle is atomic.

Bounded: tenant ids are the caller's to choose, so the tables of meters are
capped at `max_meters`. Past it, ended windows and buckets that have refilled
(both indistinguishable from new ones) go first; then the oldest windows with
nothing reserved, whose settled spend moves into `SpendSpill` so the tenant
comes back charged at least what it spent. Buckets still refilling are kept
(they are per-minute state, forgotten two minutes after their last use), so
the tables may pass the bound while more tenants than it are active within two
minutes; `stats()` says how many meters are held and how many windows spilled.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from kubetoll_core.router_config import BudgetStoreSettings

from .spill import SpendSpill
from .store import Exhausted, Hold, Meter, MeterState, Reservation

DEFAULT_MAX_METERS = 100_000


class InMemoryBudgetStore:
    kind = "memory"
    available = True
    PRUNE_EVERY = 4096  # operations between sweeps of ended periods and full buckets

    def __init__(self, max_meters: int = DEFAULT_MAX_METERS) -> None:
        self._windows: dict[str, list[float]] = {}  # key -> [spent, reserved, period_end]
        self._buckets: dict[str, list[float]] = {}  # key -> [level, last_refill_time]
        self._ids = itertools.count(1)
        self._ops = 0
        self.max_meters = max_meters
        self._spill = SpendSpill()
        self._evicted_windows = 0

    # -- meters

    def _bucket_level(self, m: Meter, now: float) -> list[float]:
        b = self._buckets.get(m.key)
        if b is None:
            self._make_room(now)
            b = self._buckets[m.key] = [m.limit, now]
        elif now > b[1]:
            b[0] = min(m.limit, b[0] + (now - b[1]) * m.refill_per_second)
            b[1] = now
        return b

    def _window(self, m: Meter, now: float) -> list[float]:
        w = self._windows.get(m.key)
        if w is None:
            self._make_room(now)
            # An evicted window comes back with (at least) what it had spent.
            w = self._windows[m.key] = [self._spill.estimate(m.key, m.period_end), 0.0, m.period_end]
        return w

    def _check(self, h: Hold, now: float) -> None:
        m = h.meter
        if m.kind == "bucket":
            level = self._bucket_level(m, now)[0]
            if h.amount > level:
                if h.amount > m.limit or m.refill_per_second <= 0:
                    retry = None
                else:
                    retry = (h.amount - level) / m.refill_per_second
                raise Exhausted(m, h.amount, level, retry)
        else:
            w = self._window(m, now)
            available = m.limit - w[0] - w[1]
            if h.amount > available:
                raise Exhausted(m, h.amount, available, max(m.period_end - now, 0.0))

    # -- BudgetStore

    async def reserve(self, holds: Sequence[Hold], now: float) -> Reservation:
        # One table lookup a hold (this runs twice a request): every enforced hold is checked
        # against the cell just looked up, then all are taken, so nothing is taken unless all fit.
        cells: list[list[float]] = []
        made = False
        for h in holds:
            m = h.meter
            if m.kind == "bucket":
                cell = self._buckets.get(m.key)
                if cell is None:
                    cell, made = self._bucket_level(m, now), True
                elif now > cell[1]:
                    cell[0] = min(m.limit, cell[0] + (now - cell[1]) * m.refill_per_second)
                    cell[1] = now
                if h.enforce and h.amount > cell[0]:
                    self._check(h, now)  # raises Exhausted, with its retry time
            else:
                cell = self._windows.get(m.key)
                if cell is None:
                    cell, made = self._window(m, now), True
                if h.enforce and h.amount > m.limit - cell[0] - cell[1]:
                    self._check(h, now)
            cells.append(cell)
        if made:
            # Making room for a new meter may have evicted a cell looked up before it: look them up again.
            cells = [
                self._bucket_level(h.meter, now) if h.meter.kind == "bucket" else self._window(h.meter, now)
                for h in holds
            ]
        for h, cell in zip(holds, cells):
            if h.meter.kind == "bucket":
                cell[0] -= h.amount
            else:
                cell[1] += h.amount
        self._maybe_prune(now)
        return Reservation(id=str(next(self._ids)), holds=list(holds))

    def settle(self, reservation: Reservation, actual: Mapping[str, float], now: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        buckets, windows = self._buckets, self._windows
        for h in reservation.holds:
            m = h.meter
            amount = actual.get(m.key, 0.0)
            if m.kind == "bucket":
                # Give back what was over-reserved, or take the excess: the bucket may go
                # negative, which delays the tenant's next requests (debt, as Envoy does).
                b = buckets.get(m.key)
                if b is None or now > b[1]:
                    b = self._bucket_level(m, now)
                b[0] += h.amount - amount
            else:
                w = windows.get(m.key)
                if w is None:
                    w = self._window(m, now)
                w[1] = max(w[1] - h.amount, 0.0)
                w[0] += amount

    def snapshot(self, meter: Meter, now: float) -> MeterState:
        if meter.kind == "bucket":
            b = self._buckets.get(meter.key)
            level = meter.limit if b is None else min(meter.limit, b[0] + max(now - b[1], 0) * meter.refill_per_second)
            return MeterState(used=meter.limit - level, limit=meter.limit)
        w = self._windows.get(meter.key)
        used = self._spill.estimate(meter.key, meter.period_end) if w is None else w[0] + w[1]
        return MeterState(used=used, limit=meter.limit)

    def is_suspended(self, budget: str) -> bool:
        return False  # in memory, only the config's `suspended` field can suspend a budget

    def stats(self) -> dict[str, float]:
        return {
            "meters": float(len(self._windows) + len(self._buckets)),
            "max_meters": float(self.max_meters),
            "evicted_windows": float(self._evicted_windows),
            "spill_periods": float(len(self._spill)),
        }

    def watch_budgets(self, budgets: Sequence[str]) -> None:
        return None  # no kill switch outside the config

    def apply_settings(self, settings: BudgetStoreSettings) -> None:
        return None  # nothing shared: the sidecar count does not matter in one process

    def spent(self, meter_key: str) -> float:
        """Settled spend on a window meter (tests and reports)."""
        w = self._windows.get(meter_key)
        return 0.0 if w is None else w[0]

    async def close(self, timeout: float = 2.0) -> None:
        return None  # nothing shared to give back or write

    def _maybe_prune(self, now: float) -> None:
        self._ops += 1
        if self._ops % self.PRUNE_EVERY:
            return
        self._prune(now)

    def _prune(self, now: float) -> None:
        # A window whose period ended, with nothing reserved, can never matter again.
        for key in [k for k, w in self._windows.items() if w[2] <= now and w[1] <= 0]:
            del self._windows[key]
        # A bucket idle long enough to have refilled from empty (they refill per minute)
        # is indistinguishable from a new one.
        for key in [k for k, b in self._buckets.items() if b[0] >= 0 and now - b[1] > 120]:
            del self._buckets[key]
        self._spill.forget_ended(now)

    def _make_room(self, now: float) -> None:
        """Keep the tables under max_meters before adding one (see the module docstring).

        Works in batches (a tenth of the bound at a time), so a flood of new tenants
        costs amortised constant time per meter, not a scan each.
        """
        if len(self._windows) + len(self._buckets) < self.max_meters:
            return
        self._prune(now)
        target = self.max_meters - max(self.max_meters // 10, 1)
        excess = len(self._windows) + len(self._buckets) - target
        if excess <= 0:
            return
        # Tenant windows, oldest first (dicts keep insertion order), none with a reservation
        # open; the namespace caps are a handful and stay.
        victims = []
        for key, w in self._windows.items():
            if w[1] <= 0 and key.partition(":")[2].startswith("tier:"):
                victims.append(key)
                if len(victims) >= excess:
                    break
        for key in victims:
            spent, _, period_end = self._windows.pop(key)
            self._spill.add(key, period_end, spent)
            self._evicted_windows += 1
