"""What one sidecar holds of each shared meter, and the arithmetic on it.

A `Lease` is one meter as this sidecar sees it: the slice Redis granted, what
requests have reserved and settled against it, the failOpen allowance spent
while Redis was away, and what the last reply said about everyone else. Amounts
are integers in the meter's scale (`kubetoll_core.meters`).

Pure: no I/O and no clock of its own. Every method that needs the time takes
the monotonic reading from its caller, so the store decides what "now" is and
tests drive it without sleeping.

Lease sizing (docs/redis-layout.md states the overshoot bound): a sidecar wants
about `lease_seconds` of its own recent consumption (an EWMA of what it
reserved), and at least two of its largest recent holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubetoll_core.meters import scale_of, to_units
from kubetoll_core.redis_keys import MeterKeys

from .store import Exhausted, Hold, Meter

_INF = float("inf")


@dataclass(slots=True)
class Lease:
    meter: Meter
    keys: MeterKeys
    scale: int
    limit: int
    bucket: bool
    lease: int = 0  # granted by Redis (last reply)
    deadline: float = -_INF  # monotonic: not spent past this while Redis answers
    cap_in_flight: int | None = None  # a call that may shrink the lease is out: spend at most this
    reserved: int = 0
    unflushed: int = 0  # settled, not yet confirmed written (open batch and the batch in flight)
    extra: int = 0  # failOpen allowance spent that Redis does not know of yet
    allowance_used: int = 0
    # Held through an outage and not yet told to Redis: the first call back says what this
    # sidecar and the others may have spent of their failOpen allowances (the script's `owe`).
    outage_unreported: bool = False
    # last reply
    g_total: int = 0  # window: spent; bucket: level outside every lease
    g_leased: int = 0
    g_holders: int = 0
    g_seen: float = -_INF  # monotonic
    # sizing
    rate: float = 0.0  # units per second, EWMA of what was reserved
    consumed: int = 0
    rate_at: float = 0.0
    max_hold: int = 0
    target: int = 0
    need: int = 0  # what waiting reserves need, summed
    need_min: int = 0  # the smallest of them
    release: bool = False  # a request found the meter exhausted: give unused lease back
    last_used: float = 0.0

    @classmethod
    def new(cls, meter: Meter, keys: MeterKeys, mono: float) -> Lease:
        scale = scale_of(meter.unit)
        return cls(
            meter, keys, scale, to_units(meter.limit, scale), meter.kind == "bucket", rate_at=mono, last_used=mono
        )

    def track(self, meter: Meter) -> None:
        """A new Meter object for the same key (admission builds them per period).

        The config may have moved its limit.
        """
        if meter.limit != self.meter.limit:
            self.limit = to_units(meter.limit, self.scale)
        self.meter = meter

    def units(self, amount: float) -> int:
        return int(round(amount * self.scale))

    # ------------------------------------------------------------------ what can be spent

    def usable_lease(self, mono: float, degraded: bool) -> int:
        lease = self.lease if self.cap_in_flight is None else min(self.lease, self.cap_in_flight)
        if mono >= self.deadline and not (degraded and self.meter.fail_open):
            return 0
        return lease

    def free(self, mono: float, degraded: bool = False) -> int:
        return self.usable_lease(mono, degraded) + self.extra - self.reserved - self.unflushed

    def room(self, mono: float) -> int:
        """Unleased amount in Redis, as of the last reply (buckets: plus refill since)."""
        if not self.bucket:
            return self.limit - self.g_total - self.g_leased
        if self.g_seen == -_INF:
            return self.limit
        refill = self.meter.refill_per_second * self.scale * max(mono - self.g_seen, 0.0)
        return int(min(self.limit - self.g_leased, self.g_total + refill))

    def known_exhausted(self, amt: int, free: int, mono: float, negative_cache: float) -> bool:
        """The last reply (fresh enough) says this hold cannot fit, so asking Redis again would not help."""
        if amt > self.limit:
            return True  # larger than the whole meter: never fits
        return mono - self.g_seen < negative_cache and amt > free + max(self.room(mono), 0)

    def exhausted(self, hold: Hold, free: int, now: float, mono: float) -> Exhausted:
        """The error for a hold that does not fit, with when it would fit again (if ever)."""
        m = hold.meter
        available = (free + max(self.room(mono), 0)) / self.scale
        if m.kind == "bucket":
            if hold.amount > m.limit or m.refill_per_second <= 0:
                retry: float | None = None
            else:
                retry = max(hold.amount - available, 0.0) / m.refill_per_second
            return Exhausted(m, hold.amount, available, retry)
        return Exhausted(m, hold.amount, available, max(m.period_end - now, 0.0))

    # ------------------------------------------------------------------ use

    def reserve(self, amt: int, mono: float) -> bool:
        """Count a reservation. True when the lease has fallen below half of what this sidecar wants
        and Redis has room: a top-up should go out in the background, before a request has to wait."""
        self.reserved += amt
        self.consumed += amt
        self.last_used = mono
        if amt > self.max_hold:
            self.max_hold = amt
        return (self.lease + self.extra - self.reserved - self.unflushed) * 2 < self.target and self.room(mono) > 0

    def update_rate(self, mono: float, lease_seconds: float) -> None:
        dt = mono - self.rate_at
        if dt >= 0.05:
            inst = self.consumed / dt
            alpha = 1.0 - math.exp(-dt / 1.0)
            self.rate += alpha * (inst - self.rate)
            self.consumed = 0
            self.rate_at = mono
        self.target = int(max(self.rate * lease_seconds, 2 * self.max_hold))

    def granted(self, lease: int, total: int, leased: int, holders: int, deadline: float, mono: float) -> None:
        """What a sync reply said of this meter."""
        self.lease = lease
        self.cap_in_flight = None
        self.extra = 0
        self.deadline = deadline
        self.g_total, self.g_leased, self.g_holders, self.g_seen = total, leased, holders, mono

    def idle(self) -> bool:
        return self.reserved == 0 and self.unflushed == 0 and self.extra == 0

    # ------------------------------------------------------------------ Redis away

    def fail_open_allowance(self, holders: int, fraction: float, degraded_since: float, mono: float) -> int:
        """What this sidecar may spend past its lease while Redis does not answer.

        A window: `fraction` of the limit, divided among the sidecars last seen holding
        the budget. A bucket: the same fraction of its capacity plus a fair share of the
        refill since the outage began. Not of the whole capacity: nobody knows how full
        the bucket was when Redis went away, and granting it full again is what let four
        cold sidecars serve nearly twice a tokens/min limit.
        """
        holders = max(holders, 1)
        if self.bucket:
            refill = self.meter.refill_per_second * self.scale * max(mono - degraded_since, 0.0)
            return int((fraction * self.limit + refill) / holders)
        return math.ceil(fraction * self.limit / holders)
