"""The aiohttp runners and listeners both ports are served by: slow clients and broken HTTP.

Slow clients. A connection that has not sent a whole request head within
`server.headerTimeoutSeconds` is closed (aiohttp's keep-alive timer covers a
connection with no complete request, so one setting bounds both a slow header
sender and an idle keep-alive connection); the body has its own deadline in the
pipeline. Each port holds at most its configured number of connections: one
more is closed at once, so a flood of half-sent requests cannot take the file
descriptors the other port, the probes and the upstream pools need.

aiohttp logs a request it cannot parse (bare LF line endings, a bad status
line, an oversized header) at ERROR with a traceback whose message holds the
raw bytes it received: the `Authorization` header and the prompt included,
whatever `logPrompts` says. The sidecar's HTTP server logger never passes an
exception's text on: it writes one WARNING line with the peer and the kind of
error, at most once a second (the rest are counted into the next line), so a
client that floods malformed requests cannot flood the log either.

Shutdown. A runner's own wait for handlers at cleanup is a short backstop
(`SHUTDOWN_BACKSTOP_SECONDS`); the SIGTERM drain is drain.py's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Self

from aiohttp import web

_SUPPRESS_SECONDS = 1.0


class QuietServerLogger(logging.Logger):
    """A logger for aiohttp's RequestHandler that never logs a request's bytes."""

    def __init__(self, name: str = "kubetoll.http") -> None:
        super().__init__(name)
        self.parent = logging.getLogger("kubetoll")
        self._last = 0.0
        self._suppressed = 0

    def _summary(self, msg: object, args: tuple[Any, ...], exc_info: Any) -> str:
        # aiohttp's messages are fixed strings with the peer address as the one argument.
        text = str(msg) % args if args else str(msg)
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if exc is not None:
            status = getattr(exc, "status", None) or getattr(exc, "code", None)
            text += f": {type(exc).__name__}" + (f" ({status})" if isinstance(status, int) else "")
        return text

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        now = time.monotonic()
        if now - self._last < _SUPPRESS_SECONDS:
            self._suppressed += 1
            return
        more = f" (and {self._suppressed} more since the last)" if self._suppressed else ""
        self._last, self._suppressed = now, 0
        self.warning("malformed or failed HTTP request: %s%s", self._summary(msg, args, exc_info), more)

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.exception(msg, *args, exc_info=kwargs.get("exc_info"))

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(logging.DEBUG):
            super().debug("%s", self._summary(msg, args, kwargs.get("exc_info")))


_SERVER_LOGGER = QuietServerLogger()


# How long a runner's cleanup waits for a handler still running. aiohttp applies it twice per
# connection (RequestHandler.shutdown waits this long, cancels the handler, waits this long
# again), so it is not the drain: the drain (drain.py) waits for and cuts requests itself and
# cleans the runner up after, when only what arrived in the last instant can still be running.
SHUTDOWN_BACKSTOP_SECONDS = 0.25


def app_runner(app: web.Application, *, header_timeout: float = 15.0, **kwargs: Any) -> web.AppRunner:
    """An AppRunner with the sidecar's settings: no aiohttp access log, the quiet server logger."""
    return web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        logger=_SERVER_LOGGER,
        keepalive_timeout=header_timeout,
        # After an early answer (413, 408) aiohttp reads and drops the rest of the body
        # so the client sees the answer; a stalled client must not hold that for 10 s.
        lingering_time=2.0,
        shutdown_timeout=SHUTDOWN_BACKSTOP_SECONDS,
        **kwargs,
    )


class _Bounded(asyncio.Protocol):
    """Passes everything to aiohttp's protocol, counting connections for the listener."""

    __slots__ = ("_inner", "_site", "_transport")

    def __init__(self, inner: asyncio.Protocol, site: BoundedTCPSite) -> None:
        self._inner = inner
        self._site = site
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._site.admit(self):
            _abort(transport)  # before aiohttp sees it: no handler, no buffers
            return
        self._transport = transport
        self._inner.connection_made(transport)

    def abort(self) -> None:
        if self._transport is not None:
            _abort(self._transport)

    def close_idle(self) -> None:
        close_idle = getattr(self._inner, "close_idle", None)
        if close_idle is not None and self._transport is not None:
            close_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._transport = None
            self._site.release(self)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._transport is not None else None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _abort(transport: asyncio.BaseTransport) -> None:
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()


class BoundedTCPSite(web.BaseSite):
    """A TCP listener that holds at most `max_connections` connections.

    At the bound, a new connection is refused (the API port: an answer being
    streamed must not be cut for a newcomer), or, with `evict_oldest`, the
    oldest connection is closed to make room (the metrics and probe port, whose
    answers all take milliseconds: a kubelet probe still gets in while a flood
    of slow senders holds every slot).
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        evict_oldest: bool = False,
        reuse_address: bool = True,
        protocol: Callable[[], asyncio.Protocol] | None = None,
    ) -> None:
        super().__init__(runner)
        self._protocol = protocol  # a connection's protocol; by default the runner's aiohttp server
        self._host, self._port = host, port
        self._reuse_address = reuse_address
        self.max_connections = max_connections
        self.evict_oldest = evict_oldest
        self.refused_connections = 0
        self.evicted_connections = 0
        self._open: dict[_Bounded, None] = {}  # insertion order: oldest first
        self._listener: asyncio.Server | None = None

    @property
    def protocol(self) -> Callable[[], asyncio.Protocol] | None:
        """The protocol factory given, or None for the runner's aiohttp server."""
        return self._protocol

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def admit(self, conn: _Bounded) -> bool:
        if len(self._open) >= self.max_connections:
            if not self.evict_oldest:
                self.refused_connections += 1
                return False
            oldest = next(iter(self._open))
            del self._open[oldest]
            self.evicted_connections += 1
            oldest.abort()
        self._open[conn] = None
        return True

    def release(self, conn: _Bounded) -> None:
        self._open.pop(conn, None)

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one the system gave for port 0)."""
        if self._listener is not None and self._listener.sockets:
            return int(self._listener.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        protocol = self._protocol or server
        self._listener = await asyncio.get_running_loop().create_server(
            lambda: _Bounded(protocol(), self),
            self._host,
            self._port,
            reuse_address=self._reuse_address,
            backlog=128,
        )
        self._server = self._listener  # BaseSite.stop closes it

    async def stop(self) -> None:
        await super().stop()
        # aiohttp's server shutdown (after this) closes the connections its protocol serves; a
        # connection of another protocol (lean_http.py) closes when idle, or after its answer.
        for conn in list(self._open):
            conn.close_idle()


class LocalServer:
    """An aiohttp app of a subclass's `app()` on 127.0.0.1, for test, bench and simulator servers.

    Port 0 (the default) takes any free port; `port` holds the one bound once started.
    Usable as `async with Server(...) as s:`.
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        raise NotImplementedError

    async def start(self) -> Self:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
