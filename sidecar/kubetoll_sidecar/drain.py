"""The API's SIGTERM drain: `server.drainSeconds` split into phases, 503 for new requests, the cut at the deadline.

`serve()` (server.py) runs it. From SIGTERM, with d = `server.drainSeconds`,
close_reserve = min(2 s, d/4) and cut_grace = min(0.5 s, d/8):

    0 ............ handlers_until ........ cut_until ............ d
    requests in     the ones still         stragglers aborted,   the budget store
    flight run      running are cut        the API port closed   and ledger close

- From SIGTERM the API port stays open. Every new request, on a new or a
  kept-alive connection, is answered 503 `draining` in OpenAI's error format
  with Retry-After and `Connection: close`, and every response of a request in
  flight that has not sent its headers yet carries `Connection: close`: the
  client reconnects elsewhere.
- Requests in flight have until handlers_until = d - close_reserve - cut_grace.
  When the last one is done the drain moves on at once.
- At handlers_until the ones still in their handler are cut (their task is
  cancelled): a stream ends with an error event in OpenAI's streaming shape,
  code `draining`, and is billed for what was sent (stream_relay.py); a request
  that has sent nothing yet gets 503 `draining`; one that has sent part of its
  answer has its connection closed.
- At cut_until (= d - close_reserve) a cut request still writing (to a client
  that does not read) has its connection aborted; idle keep-alive connections
  and the API listener are closed.
- What is left until d, at least close_reserve, goes to `Sidecar.close`: the
  budget store returns its leases and writes buffered spend. drainSeconds 0 cuts
  at once and still gives the cut `MIN_CUT_SECONDS` and the close
  `MIN_CLOSE_SECONDS`.

aiohttp's own shutdown is not a drain: `BaseRunner.cleanup` closes the listener
and every idle connection, then `RequestHandler.shutdown(shutdown_timeout)`
waits up to `shutdown_timeout` for a connection's handler, cancels it and waits
up to `shutdown_timeout` again, so a runner built with `drainSeconds` took up to
twice that. The runners get a short backstop instead (`http_server.app_runner`),
and their cleanup runs only once this drain is done.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import hdrs, web

from . import inbound
from .errors import ApiError

CLOSE_RESERVE_MAX_SECONDS = 2.0  # the Redis store's close bound: return leases, write buffered spend
CUT_GRACE_MAX_SECONDS = 0.5  # a cut request writes one event and settles in memory
MIN_CUT_SECONDS = 0.05  # even with drainSeconds 0 a cut stream gets to write its error event ...
MIN_CLOSE_SECONDS = 0.25  # ... and the budget store to write what was spent
RETRY_AFTER_SECONDS = 1  # the client is to reconnect (to another pod), not to wait for this one

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class DrainBudget:
    """The drain's instants on the event loop's clock (seconds)."""

    started: float
    handlers_until: float  # requests in flight run until here, then are cut
    cut_until: float  # cut requests end their answer until here, then their connections are aborted
    deadline: float  # SIGTERM + drainSeconds: `Sidecar.close` gets what is left until here

    @classmethod
    def starting(cls, now: float, drain_seconds: float) -> DrainBudget:
        close_reserve = min(CLOSE_RESERVE_MAX_SECONDS, drain_seconds / 4)
        cut_grace = min(CUT_GRACE_MAX_SECONDS, drain_seconds / 8)
        deadline = now + drain_seconds
        return cls(now, deadline - close_reserve - cut_grace, deadline - close_reserve, deadline)

    def close_seconds(self, now: float) -> float:
        """The bound for `Sidecar.close` at `now`: the rest of the budget, at least `MIN_CLOSE_SECONDS`."""
        return max(self.deadline - now, MIN_CLOSE_SECONDS)


def draining_error() -> ApiError:
    return ApiError(
        503,
        "the kubetoll sidecar is shutting down; retry on a new connection",
        "service_unavailable",
        "draining",
        retry_after=RETRY_AFTER_SECONDS,
        headers={hdrs.CONNECTION: "close"},
    )


def draining_response(path: str = "") -> web.Response:
    """The 503 for a request that arrives while draining, in the format of the API its path belongs to."""
    resp = inbound.error_response(inbound.endpoint_for_path(path), draining_error())
    resp.force_close()  # aiohttp closes the connection after it (the header alone would not)
    return resp


# What a stream cut at the drain deadline ends with: the error shape the SDKs raise mid-stream
# (an inbound API's stream gets the same message in its own error event: stream_relay.py).
DRAIN_CUT_MESSAGE = (
    "the kubetoll sidecar is shutting down: this stream was cut at its drain deadline (server.drainSeconds)"
)


@dataclass(eq=False)
class _InFlight:
    transport: asyncio.Transport | None  # kept: aiohttp forgets it once it starts closing the connection
    prepared: bool = False  # its response's headers are going out: too late for a 503
    cut: bool = False  # the drain cancelled it
    resumed: bool = False  # a handler took the cut and went on to end its answer


# The handler task's own request, for the stream relay and the pipeline to tell the
# drain's cut from another cancel (a context variable: each aiohttp handler runs in a task of its own).
_current: contextvars.ContextVar[_InFlight | None] = contextvars.ContextVar("kubetoll_in_flight", default=None)


def cut_by_drain() -> bool:
    """Was the request this task serves cut at the drain deadline?"""
    entry = _current.get()
    return entry is not None and entry.cut


def resume_if_cut() -> bool:
    """In a handler that caught CancelledError: True if it was the drain's cut, which is then withdrawn.

    The handler goes on to end its answer (a stream's error event, its spend) within the cut grace.
    """
    entry = _current.get()
    if entry is None or not entry.cut or entry.resumed:
        return False
    entry.resumed = True
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


class Drain:
    """The API app's requests in flight; once begun, new requests get 503 and the rest are cut at the deadline."""

    def __init__(self) -> None:
        self.active = False
        self._running: dict[asyncio.Task[object], _InFlight] = {}  # in their handler now
        self._at_start: dict[asyncio.Task[object], _InFlight] = {}  # in flight when the drain began
        self.finished = 0  # of those, done without a cut
        self.cut = 0
        self.refused = 0  # new requests answered 503 draining

    def install(self, app: web.Application) -> None:
        """Put the drain in front of `app`'s handlers (before `app` is frozen)."""
        app.middlewares.insert(0, self._middleware)
        app.on_response_prepare.append(self._on_response_prepare)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.active:
            self.refused += 1
            return draining_response(request.path)
        task = asyncio.current_task()
        assert task is not None
        entry = _InFlight(request.transport)
        self._running[task] = entry
        token = _current.set(entry)
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if not entry.cut or entry.resumed or entry.prepared:
                raise  # not ours to answer, or part of the answer is out: aiohttp closes the connection
            entry.resumed = True
            task.uncancel()
            return draining_response(request.path)
        finally:
            _current.reset(token)
            del self._running[task]

    async def _on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        entry = _current.get()
        if entry is not None:
            entry.prepared = True
        if self.active:
            # aiohttp chose the Connection header before this hook; the flag makes it close the connection after.
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"

    def begin(self) -> int:
        """Start refusing new requests; returns how many are in flight."""
        self.active = True
        self._at_start = dict(self._running)
        return len(self._at_start)

    async def run(self, budget: DrainBudget, api: web.BaseRunner) -> None:
        """Wait for the requests in flight until `handlers_until`, cut the rest, then shut the API runner down."""
        loop = asyncio.get_running_loop()
        pending = await _wait(self._at_start, budget.handlers_until - loop.time())
        for task in pending:
            entry = self._running.get(task)
            if entry is not None:  # still in its handler (not just writing a finished answer)
                entry.cut = True
                self.cut += 1
                task.cancel()
        pending = await _wait(pending, max(budget.cut_until - loop.time(), MIN_CUT_SECONDS))
        for task in pending:  # still writing to a client that does not read: nothing else would end it
            transport = self._at_start[task].transport
            if transport is not None:
                transport.abort()
        self.finished = len(self._at_start) - self.cut
        # Nothing of ours runs any more: this closes the listener and the idle keep-alive connections,
        # and waits (the runner's short shutdown_timeout) for the aborted ones to unwind.
        await api.cleanup()


async def _wait(tasks: Iterable[asyncio.Task[object]], timeout: float) -> set[asyncio.Task[object]]:
    """The tasks not done after `timeout` seconds (at once if it is not positive)."""
    todo = {t for t in tasks if not t.done()}
    if not todo or timeout <= 0:
        return todo
    _, pending = await asyncio.wait(todo, timeout=timeout)
    return pending
