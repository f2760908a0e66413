"""A circuit breaker per backend.

Closed: calls pass. `failure_threshold` consecutive failures open it for
`cooldown_seconds`; a provider's Retry-After opens it for that long at once (it
told us when to come back), never longer than the backend's
`maxRetryAfterSeconds` (the forwarder cuts it, `retry_after.py` reads it).
After the cool-down one probe call is let through (half-open): success closes
the circuit, failure opens it again.

What counts (`counts_against_backend`): only failures that say the backend is
unwell for everyone: 5xx, timeouts, connection errors, 429 (the provider is
rate-limiting this sidecar's key; with a Retry-After it pauses the backend that
long, without one it counts toward the threshold like a 5xx) and an account out
of credit (402, insufficient_quota). A request the upstream refused as the
caller's own (400, 401, 403, 404, 413, 422, a prompt too long, in a response or
inside a stream) never counts: one caller's bad requests must not open the
circuit for every other caller. Such an answer neither counts nor closes: a
half-open probe that gets one leaves the circuit as it was for the next caller.

Breakers outlive config reloads (keyed by backend name and endpoint), so a
reload does not forget that a provider is down.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from kubetoll_core.enums import FailureClass
from kubetoll_core.router_config import Backend

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

# Failure classes that say something about the backend's health.
HEALTH_FAILURES = frozenset(
    {
        FailureClass.server_error,
        FailureClass.timeout,
        FailureClass.connection_error,
        FailureClass.rate_limited,
        FailureClass.budget_exhausted,
    }
)
# The 4xx statuses that are about the backend or the account, not the request.
_BACKEND_4XX = frozenset({402, 408, 429})


def counts_against_backend(failure: FailureClass | None, status: int) -> bool:
    """Does this failed attempt count toward opening the backend's circuit? (See the module doc.)"""
    if failure not in HEALTH_FAILURES:
        return False
    if 400 <= status < 500 and status not in _BACKEND_4XX:
        # A 4xx whose body reads like a server error is still the answer to this request.
        # The one exception: Anthropic says "credit balance is too low" with a 400.
        return failure is FailureClass.budget_exhausted
    return True


class CircuitBreaker:
    __slots__ = ("threshold", "cooldown", "failures", "open_until", "probing", "_now", "reason")

    def __init__(self, threshold: int, cooldown: float, now: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0
        self.probing = False
        self.reason = ""
        self._now = now

    @property
    def state(self) -> str:
        if self.open_until == 0.0:
            return CLOSED
        return OPEN if self._now() < self.open_until or self.probing else HALF_OPEN

    def allow(self) -> bool:
        """May a call go now? In half-open, only the first caller gets through (the probe)."""
        if self.open_until == 0.0:
            return True
        if self._now() < self.open_until or self.probing:
            return False
        self.probing = True
        return True

    def retry_in(self) -> float:
        return max(self.open_until - self._now(), 0.0)

    def success(self) -> None:
        self.failures = 0
        self.open_until = 0.0
        self.probing = False
        self.reason = ""

    def failure(self, reason: str, retry_after: float | None = None) -> None:
        self.failures += 1
        self.probing = False
        if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
            self.open_until = max(self.open_until, self._now() + retry_after)
            self.reason = f"{reason}, Retry-After {retry_after:g}s"
        elif self.failures >= self.threshold or self.open_until:
            # Past the threshold, or a failed probe: open (again) for the cool-down.
            self.open_until = self._now() + self.cooldown
            self.reason = f"{self.failures} consecutive failures, last: {reason}"

    def release_probe(self) -> None:
        """A probe that ended without a verdict (client went away): let another try."""
        self.probing = False


class BreakerRegistry:
    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._now = now

    def get(self, backend: Backend) -> CircuitBreaker:
        key = (backend.name, backend.endpoint)
        b = self._breakers.get(key)
        cb = backend.circuit_breaker
        if b is None:
            b = self._breakers[key] = CircuitBreaker(cb.failure_threshold, cb.cooldown_seconds, self._now)
        else:
            b.threshold, b.cooldown = cb.failure_threshold, cb.cooldown_seconds
        return b

    def items(self) -> list[tuple[str, CircuitBreaker]]:
        return [(name, b) for (name, _), b in self._breakers.items()]
