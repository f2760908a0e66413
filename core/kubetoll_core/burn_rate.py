"""How fast a budget's cap is being spent, and when it would run out at that pace.

Both planes need the same answer: the sidecar downgrades a route when the cap
would be exhausted before its period ends (`downgrade.burnRate`), and the
operator shows the projected exhaustion time in the TokenBudget's status.

The rate is a moving average over a sliding window: the spend at the newest
reading minus the spend at the oldest one still in the window, divided by the
time between them. Readings are kept at most every window / SAMPLES_PER_WINDOW
seconds, so a tracker holds about that many points whatever the traffic. A
window average, not an exponential one, because it is the figure a person
checks by hand ("$30 in the last hour") and a burst older than the window stops
counting at a known time.

A tracker follows one meter in one period (the meter's key carries the period
id); a new period is a new key, and its tracker starts empty. No projection is
made before the readings span `min_history` seconds (a fraction of the window),
so one expensive request right after start-up is not read as a trend.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

SAMPLES_PER_WINDOW = 60
DEFAULT_WINDOW_SECONDS = 3600.0
# A projection needs readings spanning this share of the window.
MIN_HISTORY_SHARE = 0.25


@dataclass(slots=True)
class BurnRate:
    """The spend rate of one meter over the last `window` seconds (units of the meter per second)."""

    window: float = DEFAULT_WINDOW_SECONDS
    points: deque[tuple[float, float]] = field(default_factory=deque)  # (time, spent), oldest first

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window) and self.window > 0):
            raise ValueError(f"window must be a positive number of seconds, got {self.window!r}")

    @property
    def min_history(self) -> float:
        return self.window * MIN_HISTORY_SHARE

    def observe(self, now: float, spent: float) -> None:
        """Record the meter's spend at `now` (readings out of order or not finite are ignored)."""
        if not (math.isfinite(now) and math.isfinite(spent)):
            return
        pts = self.points
        if pts and now < pts[-1][0]:
            return
        if pts and spent < pts[-1][1]:
            # Spend fell (a refund, a Redis that lost its data): the old readings no longer describe it.
            pts.clear()
        if len(pts) >= 2 and now - pts[-2][0] < self.window / SAMPLES_PER_WINDOW:
            pts[-1] = (now, spent)  # too close to the last kept point: move the newest one instead
        else:
            pts.append((now, spent))
        # Keep one point at or before the window's start as the anchor of the average.
        while len(pts) >= 2 and pts[1][0] <= now - self.window:
            pts.popleft()

    def rate(self, now: float) -> float | None:
        """Spend per second over the window; None until the readings span `min_history`."""
        pts = self.points
        if len(pts) < 2:
            return None
        t0, s0 = pts[0]
        t1, s1 = pts[-1]
        if t1 - t0 < self.min_history or now - t1 > self.window:
            return None  # too little history, or nothing read for a whole window
        return max(0.0, (s1 - s0) / (t1 - t0))

    def exhaustion(self, now: float, spent: float, limit: float) -> float | None:
        """When the meter reaches `limit` at the current rate (epoch seconds); `now` if already there;
        None when it is not spending or the rate is not known yet."""
        if spent >= limit:
            return now
        r = self.rate(now)
        if r is None or r <= 0:
            return None
        return now + (limit - spent) / r

    def exhausts_before(self, now: float, spent: float, limit: float, period_end: float) -> bool:
        """True when, at the current rate, the limit is reached before `period_end`."""
        at = self.exhaustion(now, spent, limit)
        return at is not None and at < period_end


class BurnRates:
    """A `BurnRate` per meter key, dropping the trackers of meters not read for two windows."""

    def __init__(self, window: float = DEFAULT_WINDOW_SECONDS, max_meters: int = 4096) -> None:
        self.window = window
        self.max_meters = max_meters
        self._by_key: dict[str, BurnRate] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str, window: float | None = None) -> BurnRate:
        w = window or self.window
        tracker = self._by_key.get(key)
        if tracker is None or tracker.window != w:
            if len(self._by_key) >= self.max_meters:
                self._evict()
            tracker = self._by_key[key] = BurnRate(w)
        return tracker

    def observe(self, key: str, now: float, spent: float, window: float | None = None) -> BurnRate:
        tracker = self.get(key, window)
        tracker.observe(now, spent)
        return tracker

    def prune(self, now: float) -> None:
        """Forget meters with no reading for two windows (a period that ended, a budget removed)."""
        stale = [k for k, t in self._by_key.items() if not t.points or now - t.points[-1][0] > 2 * t.window]
        for k in stale:
            del self._by_key[k]

    def _evict(self) -> None:
        oldest = min(self._by_key, key=lambda k: self._by_key[k].points[-1][0] if self._by_key[k].points else -1.0)
        del self._by_key[oldest]
