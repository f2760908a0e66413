"""Where evicted window meters keep their spend: a count-min sketch per period.

The in-memory store holds one window per (budget, tenant, period). Tenant ids
are chosen by callers, so that table must be bounded; but evicting a window
must not hand its tenant a fresh allowance. An evicted window's settled spend
goes into a count-min sketch for its period, and a window created again for the
same key starts from the sketch's estimate. A count-min sketch never
underestimates: a returning tenant is charged at least what it spent, possibly
a little more when keys collide (at most about e/width of the period's evicted
spend, in expectation well below). For a budget that is the safe direction.

Memory is fixed: depth x width doubles per period that has evictions (4 x 16,384
x 8 B = 512 KiB), allocated on the first eviction and dropped when its period ends.
"""

from __future__ import annotations

from array import array

DEPTH = 4
WIDTH = 16_384


class _Sketch:
    __slots__ = ("cells",)

    def __init__(self) -> None:
        self.cells = array("d", bytes(8 * DEPTH * WIDTH))

    @staticmethod
    def _slots(key: str) -> list[int]:
        # One hash per row, from the process's salted string hash: stable for this
        # process, which is as long as the sketch lives.
        return [row * WIDTH + hash((row, key)) % WIDTH for row in range(DEPTH)]

    def add(self, key: str, amount: float) -> None:
        for i in self._slots(key):
            self.cells[i] += amount

    def estimate(self, key: str) -> float:
        return min(self.cells[i] for i in self._slots(key))


class SpendSpill:
    """Evicted spend per window key, kept per period end, never under the truth."""

    def __init__(self) -> None:
        self._by_period: dict[float, _Sketch] = {}

    def __len__(self) -> int:
        return len(self._by_period)

    def add(self, key: str, period_end: float, amount: float) -> None:
        if amount <= 0:
            return
        sketch = self._by_period.get(period_end)
        if sketch is None:
            sketch = self._by_period[period_end] = _Sketch()
        sketch.add(key, amount)

    def estimate(self, key: str, period_end: float) -> float:
        sketch = self._by_period.get(period_end)
        return 0.0 if sketch is None else sketch.estimate(key)

    def forget_ended(self, now: float) -> None:
        for end in [e for e in self._by_period if e <= now]:
            del self._by_period[end]
