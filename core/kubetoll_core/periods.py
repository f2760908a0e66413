"""Calendar periods (day, month) in a budget's timezone, and an injectable clock."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (wall clock: periods are calendar periods)."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()


class FakeClock:
    """For tests: time moves only when told to."""

    def __init__(self, start: float) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True, slots=True)
class Period:
    kind: str  # "day" | "month"
    id: str  # "2026-11-22" | "2026-11"
    start: float  # epoch seconds
    end: float


class PeriodCalculator:
    """Answers "which day/month is it in this timezone" and caches it until it ends.

    The cache matters: zone arithmetic costs microseconds per call and every
    request asks for two periods per budget.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], Period] = {}

    def period(self, kind: str, tz: str, now: float) -> Period:
        cached = self._cache.get((kind, tz))
        if cached is not None and cached.start <= now < cached.end:
            return cached
        p = compute_period(kind, tz, now)
        self._cache[(kind, tz)] = p
        return p


def compute_period(kind: str, tz: str, now: float) -> Period:
    zone = ZoneInfo(tz)
    local = datetime.fromtimestamp(now, zone)
    if kind == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        # Add a calendar day in local time, then normalise: DST days are 23 or 25 hours.
        nxt = (start + timedelta(days=1)).replace(tzinfo=None)
        end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone)
        pid = start.strftime("%Y-%m-%d")
    elif kind == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        y, m = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        end = datetime(y, m, 1, tzinfo=zone)
        pid = start.strftime("%Y-%m")
    else:
        raise ValueError(f"unknown period kind {kind!r}")
    return Period(kind, pid, start.timestamp(), end.timestamp())
