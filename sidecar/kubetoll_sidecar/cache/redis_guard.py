"""Redis calls with a time bound and a cool-down, so the cache never holds a request up.

Every call on the request path waits at most `timeout` (20 ms by default). A
call that times out or fails marks Redis down for `cooldown` seconds, during
which the cache does not try it at all (a miss costs nothing then, instead of
20 ms per request); the first call after the cool-down probes it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

log = logging.getLogger("kubetoll.cache")

T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis is absent, down, or did not answer in time: treat as a miss."""


class RedisGuard:
    def __init__(
        self,
        client: Any | None,
        timeout: float = 0.020,
        cooldown: float = 1.0,
        on_error: Callable[[str, str], None] | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`monotonic` is the clock the cool-down runs on (a test passes a fake one)."""
        self.client = client
        self.timeout = timeout
        self.cooldown = cooldown
        self._down_until = 0.0
        self._on_error = on_error
        self._monotonic = monotonic
        self.last_error = ""

    @property
    def available(self) -> bool:
        return self.client is not None and self._monotonic() >= self._down_until

    async def call(self, op: str, fn: Callable[[Any], Awaitable[T]], timeout: float | None = None) -> T:
        """`fn(client)` within the bound; raises RedisUnavailable (never hangs, never raises Redis errors)."""
        if not self.available:
            raise RedisUnavailable(self.last_error or "no Redis")
        try:
            return await asyncio.wait_for(fn(self.client), timeout or self.timeout)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self._mark_down(op, "timeout")
            raise RedisUnavailable(f"{op}: no answer within {(timeout or self.timeout) * 1000:.0f} ms") from None
        except Exception as exc:  # redis.ConnectionError, ResponseError, OSError...
            self._mark_down(op, type(exc).__name__)
            raise RedisUnavailable(f"{op}: {type(exc).__name__}: {exc}") from None

    def _mark_down(self, op: str, reason: str) -> None:
        now = self._monotonic()
        if now >= self._down_until:
            log.warning(
                "cache: Redis %s failed (%s); serving without the shared cache for %.1fs", op, reason, self.cooldown
            )
        self._down_until = now + self.cooldown
        self.last_error = f"{op}: {reason}"
        if self._on_error:
            self._on_error(op, reason)
