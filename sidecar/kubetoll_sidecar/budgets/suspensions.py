"""The budget kill switch as this sidecar sees it: the flags in Redis, watched two ways.

Pub/sub brings a change within milliseconds; a poll of every watched budget's
flag each `poll_interval` is the backstop (a message published while the
subscription was down is lost). The sync script also returns each budget's
flag, so any sync updates it too. `kubetoll_core.kill_switch` sets the flag.

A flag read is one of three: suspended, known not suspended (the `known` key
is there), or unknown (neither key: Redis restarted empty or lost the keys).
Unknown changes nothing here: a suspension this sidecar knew holds until the
switch is written again (`kubetoll budget`, or the operator putting every flag
back from the TokenBudgets), so an empty Redis restart never lifts one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson

from kubetoll_core.redis_keys import RedisKeys, check_name

log = logging.getLogger("kubetoll.budgets.redis")


class SuspensionWatcher:
    def __init__(
        self,
        client: Any,
        keys: RedisKeys,
        *,
        cluster: bool,
        io_timeout: float,
        poll_interval: float,
        on_suspended: Callable[[str], None],
        count_call: Callable[[int], None],
    ) -> None:
        self._client = client
        self._keys = keys
        self._cluster = cluster
        self._io_timeout = io_timeout
        self.poll_interval = poll_interval
        self._on_suspended = on_suspended  # the store gives back what it leased under the budget
        self._count = count_call
        self.watched: set[str] = set()
        self.suspended: set[str] = set()
        self.kept: set[str] = set()  # suspended here while Redis does not know the switch

    def set_local(self, budget: str, on: bool | None) -> None:
        """`on` None: Redis does not know (the flag may be lost): keep what this sidecar knew."""
        if on is None:
            if budget in self.suspended and budget not in self.kept:
                self.kept.add(budget)
                log.warning(
                    "budget %s: Redis no longer knows its kill switch (restarted empty?); keeping it suspended "
                    "until the switch is written again",
                    budget,
                )
            return
        self.kept.discard(budget)
        if on and budget not in self.suspended:
            self.suspended.add(budget)
            log.warning("budget %s suspended (kill switch in Redis): admitting nothing under it", budget)
            self._on_suspended(budget)
        elif not on and budget in self.suspended:
            self.suspended.discard(budget)
            log.warning("budget %s no longer suspended", budget)

    async def poll_once(self) -> None:
        budgets = sorted(self.watched | self.suspended)
        if not budgets:
            return
        keys = [k for b in budgets for k in (self._keys.suspended(b), self._keys.suspension_known(b))]
        if self._cluster:
            self._count(len(keys))
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
            values = await bounded(pipe.execute(), self._io_timeout)
        else:
            self._count(1)
            values = await bounded(self._client.mget(keys), self._io_timeout)
        for i, b in enumerate(budgets):
            flag, known = values[2 * i], values[2 * i + 1]
            self.set_local(b, True if flag is not None else (False if known is not None else None))

    async def poll_forever(self, closing: Callable[[], bool]) -> None:
        # Imported here, not with the module: batches.py imports `cancelling`, and a
        # sidecar without a Redis store would load the client library (~6 MB) for it.
        from redis.exceptions import RedisError

        while not closing() and not cancelling():
            try:
                await self.poll_once()
            except (TimeoutError, RedisError, OSError) as exc:
                log.debug("suspension poll failed: %r", exc)
            except Exception:
                log.exception("suspension poll failed unexpectedly")
            await asyncio.sleep(self.poll_interval)

    async def listen_forever(self, closing: Callable[[], bool]) -> None:
        backoff = 0.1
        channel = self._keys.channel()
        while not closing() and not cancelling():
            ps = None
            try:
                ps = self._client.pubsub()
                self._count(1)
                await bounded(ps.subscribe(channel), self._io_timeout)
                backoff = 0.1
                await self.poll_once()  # whatever was published while we were not subscribed
                while not closing() and not cancelling():
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg and msg.get("type") == "message":
                        self.on_event(msg.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnect on anything: this task must not die
                log.debug("kill-switch subscription lost: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if ps is not None:
                    with contextlib.suppress(Exception):
                        await ps.aclose()

    def on_event(self, data: Any) -> None:
        try:
            ev = orjson.loads(data)
            budget = check_name("budget", ev["budget"])
            on = bool(ev["suspended"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed kill-switch message")
            return
        self.set_local(budget, on)


def cancelling() -> bool:
    """A cancel was requested (a library may have swallowed the CancelledError): a loop must end."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def bounded(aw: Any, timeout: float) -> Any:
    """Await `aw` for at most `timeout` seconds (TimeoutError past it)."""
    async with asyncio.timeout(timeout):
        return await aw
