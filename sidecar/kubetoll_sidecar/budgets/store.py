"""The BudgetStore interface: atomic reserve and settle over meters.

A *meter* is one limited quantity at one level: the namespace cap's USD this
month, a tenant tier's tokens per minute, and so on. Two kinds:

- window: a calendar period's total (`spent + reserved <= limit`), reset by the
  period changing (the period id is part of the key);
- bucket: a token bucket of `limit` capacity refilled at `refill_per_second`
  (tokens/min, requests/min).

A request reserves an estimate on every meter it falls under, all or nothing,
before the call; after it, `settle` replaces each estimate with the actual amount.
A reservation never settled (the process died) must not count as spend: the
in-memory store loses it with the process; the Redis store lets it expire with
the lease it was taken from.

Implementations: `memory.InMemoryBudgetStore` (one process; `kubetoll run`, the
demo, tests) and the Redis store (shared by every sidecar of a namespace, leasing
slices of each meter so a request needs no Redis round trip).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kubetoll_core.enums import OnExhausted
from kubetoll_core.router_config import BudgetStoreSettings


@dataclass(frozen=True, slots=True)
class Meter:
    key: str  # unique within the namespace; includes the period id for windows
    kind: str  # "window" | "bucket"
    unit: str  # "usd" | "tokens" | "requests"
    limit: float  # window: per period; bucket: capacity
    budget: str
    level: str  # "cap" or "tier:<name>", plus the tenant for tier meters in `key`
    label: str  # human scope for errors and headers, e.g. "support/tier:free/usd-day"
    on_exhausted: OnExhausted
    refill_per_second: float = 0.0  # bucket only
    period_end: float = 0.0  # window only (epoch seconds)
    fail_open: bool = True  # when the shared store is unreachable: serve on a local allowance


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 3x, and a request makes several
class Hold:
    meter: Meter
    amount: float
    enforce: bool = True  # False: count it even past the limit (onExhausted allow/downgrade)


@dataclass(slots=True)
class Reservation:
    """What `reserve` took. A store may return a subclass carrying its own bookkeeping."""

    id: str
    holds: list[Hold]
    settled: bool = False


@dataclass(slots=True)  # not frozen, as Hold
class MeterState:
    used: float  # spent + reserved (windows); limit - level (buckets)
    limit: float

    @property
    def remaining(self) -> float:
        return self.limit - self.used

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.limit if self.limit > 0 else 100.0


class Exhausted(Exception):
    """A hold did not fit. `retry_after` is when it would fit again, if ever."""

    def __init__(self, meter: Meter, needed: float, available: float, retry_after: float | None) -> None:
        self.meter = meter
        self.needed = needed
        self.available = available
        self.retry_after = retry_after
        super().__init__(f"{meter.label}: needs {needed:g} {meter.unit}, {max(available, 0):g} left")


class StoreUnavailable(Exception):
    """The shared store cannot answer in time and a failClosed meter needed it (503)."""


class Suspended(Exception):
    """A budget's kill switch is on (403)."""

    def __init__(self, budget: str) -> None:
        self.budget = budget
        super().__init__(f"budget {budget} is suspended by an administrator")


class BudgetStore(Protocol):
    kind: str  # "memory" or "redis": what /readyz and the metrics say is in use

    @property
    def available(self) -> bool:
        """The shared store answers (always True in memory). Not a readiness condition: failOpen
        and failClosed decide per budget while it is away."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters and gauges for the metrics (`kubetoll_budget_store{stat=...}`); empty in memory."""
        ...

    def watch_budgets(self, budgets: Sequence[str]) -> None:
        """The budgets of the config in force: their kill switches are watched before any request touches them."""
        ...

    def apply_settings(self, settings: BudgetStoreSettings) -> None:
        """A reloaded config's budgetStore: apply what can change without a restart (the rest waits for one)."""
        ...

    async def reserve(self, holds: Sequence[Hold], now: float) -> Reservation:
        """All holds or none. Raises Exhausted for the first enforced hold that does not fit."""
        ...

    def settle(self, reservation: Reservation, actual: Mapping[str, float], now: float) -> None:
        """Replace each hold's estimate by the actual amount (meter key -> amount; missing -> 0).

        Synchronous in every store: settlement is local (the Redis store flushes spend in
        batches), so a cancelled request (the client gone, the drain's cut) cannot be
        interrupted between its answer and its settlement, and no task is needed to shield it."""
        ...

    def snapshot(self, meter: Meter, now: float) -> MeterState:
        """What this process knows of a meter now, without I/O (for percent and headers)."""
        ...

    def is_suspended(self, budget: str) -> bool:
        """The kill switch as last seen in the store (the config's `suspended` is checked by the caller)."""
        ...

    async def close(self, timeout: float = 2.0) -> None:
        """Give back what is held and write what is buffered, within `timeout` seconds (the drain's rest)."""
        ...
