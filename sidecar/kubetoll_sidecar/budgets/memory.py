"""In-memory BudgetStore: one process, exact, no I/O.

Each method runs to completion without awaiting, so on one event loop every
reserve and settle is atomic.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from .store import Exhausted, Hold, Meter, MeterState, Reservation


class InMemoryBudgetStore:
    kind = "memory"
    available = True
    PRUNE_EVERY = 4096  # operations between sweeps of ended periods and full buckets

    def __init__(self) -> None:
        self._windows: dict[str, list[float]] = {}  # key -> [spent, reserved, period_end]
        self._buckets: dict[str, list[float]] = {}  # key -> [level, last_refill_time]
        self._ids = itertools.count(1)
        self._ops = 0

    # -- meters

    def _bucket_level(self, m: Meter, now: float) -> list[float]:
        b = self._buckets.get(m.key)
        if b is None:
            b = self._buckets[m.key] = [m.limit, now]
        elif now > b[1]:
            b[0] = min(m.limit, b[0] + (now - b[1]) * m.refill_per_second)
            b[1] = now
        return b

    def _window(self, m: Meter) -> list[float]:
        w = self._windows.get(m.key)
        if w is None:
            w = self._windows[m.key] = [0.0, 0.0, m.period_end]
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
            w = self._window(m)
            available = m.limit - w[0] - w[1]
            if h.amount > available:
                raise Exhausted(m, h.amount, available, max(m.period_end - now, 0.0))

    # -- BudgetStore

    async def reserve(self, holds: Sequence[Hold], now: float) -> Reservation:
        for h in holds:
            if h.enforce:
                self._check(h, now)
        for h in holds:
            if h.meter.kind == "bucket":
                self._bucket_level(h.meter, now)[0] -= h.amount
            else:
                self._window(h.meter)[1] += h.amount
        self._maybe_prune(now)
        return Reservation(id=str(next(self._ids)), holds=list(holds))

    async def settle(self, reservation: Reservation, actual: Mapping[str, float], now: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        for h in reservation.holds:
            m = h.meter
            amount = actual.get(m.key, 0.0)
            if m.kind == "bucket":
                # Give back what was over-reserved, or take the excess: the bucket may go
                # negative, which delays the tenant's next requests (debt, as Envoy does).
                self._bucket_level(m, now)[0] += h.amount - amount
            else:
                w = self._window(m)
                w[1] = max(w[1] - h.amount, 0.0)
                w[0] += amount

    def snapshot(self, meter: Meter, now: float) -> MeterState:
        if meter.kind == "bucket":
            b = self._buckets.get(meter.key)
            level = meter.limit if b is None else min(meter.limit, b[0] + max(now - b[1], 0) * meter.refill_per_second)
            return MeterState(used=meter.limit - level, limit=meter.limit)
        w = self._windows.get(meter.key)
        return MeterState(used=0.0 if w is None else w[0] + w[1], limit=meter.limit)

    def is_suspended(self, budget: str) -> bool:
        return False  # in memory, only the config's `suspended` field can suspend a budget

    def stats(self) -> dict[str, float]:
        return {}

    def watch_budgets(self, budgets: Sequence[str]) -> None:
        return None  # no kill switch outside the config

    def spent(self, meter_key: str) -> float:
        """Settled spend on a window meter (tests and reports)."""
        w = self._windows.get(meter_key)
        return 0.0 if w is None else w[0]

    async def close(self) -> None:
        return None

    def _maybe_prune(self, now: float) -> None:
        self._ops += 1
        if self._ops % self.PRUNE_EVERY:
            return
        # A window whose period ended, with nothing reserved, can never matter again.
        for key in [k for k, w in self._windows.items() if w[2] <= now and w[1] <= 0]:
            del self._windows[key]
        # A bucket idle long enough to have refilled from empty is indistinguishable from a new one.
        for key in [k for k, b in self._buckets.items() if b[0] >= 0 and now - b[1] > 120]:
            del self._buckets[key]
