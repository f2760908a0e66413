"""The API port's connections: a plain JSON POST straight to its handler, anything else to aiohttp.

aiohttp's server costs a request its protocol's parser callbacks and message queue,
a `RawRequestMessage`, a `StreamReader` for the body, a `BaseRequest` with its
URL object, and a handler task started from the connection's own loop task: about
40 µs of CPU a request on the bench's machine above a protocol that takes a
complete request off its buffer (docs/performance.md). The API's traffic is
small POSTs to a handful of fixed paths whose body is in hand within a
millisecond, so this protocol recognises that case itself and hands every other
byte to aiohttp:

- taken here: `POST <path> HTTP/1.1` to one of the given paths (no query), a head
  of at most `MAX_HEAD` bytes whose lines are all plain `name: value` fields,
  exactly one `Content-Length` within the body limit, and no `Transfer-Encoding`,
  `Expect`, `Upgrade` or `Content-Encoding`; `Connection` only `keep-alive` or
  `close`. Its handler runs once the head is in, with the body whole when it came
  with the head (the usual case) or as an aiohttp `StreamReader` (below);
- everything else (another method or path, chunked or encoded bodies, `Expect`,
  HTTP/1.0, a head this does not recognise, malformed bytes) is handed to
  aiohttp's own protocol for this connection: the bytes received so far (from the
  first byte of that request) are fed to a fresh `RequestHandler`, which serves the
  connection from then on, with its errors, limits and timers;
- the handler is the one aiohttp would run (the route's handler inside the app's
  middlewares, as `hot_routes.py` composes them), given a `LeanRequest` with the
  parts of aiohttp's request the API handlers read; a stream is written by aiohttp's
  own response and writer classes, and a whole JSON answer by a short path that sets
  the fields aiohttp sets, in its order, and serialises them with aiohttp's own
  serializer, so the bytes are aiohttp's either way (`tests/test_lean_http.py`
  compares them);
- one request at a time, in order (pipelined requests wait in the buffer); a
  connection idle, or with a partial head, for `header_timeout` seconds is closed
  (aiohttp's keep-alive timer does the same). A body still arriving when its head is
  in is fed to an aiohttp `StreamReader` while the handler runs, as aiohttp does, so
  the pipeline's body deadline (408) and a client leaving mid-upload (a counted
  disconnect) work the same on both protocols.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

# Two aiohttp internals the whole-answer path writes with (aiohttp's own head serializer and its
# cached Date value). An aiohttp without them gets its own protocol for every connection
# (`unavailable`, which server.listen reads) rather than a sidecar that does not start.
try:
    from aiohttp.helpers import rfc822_formatted_time
    from aiohttp.http_writer import _serialize_headers

    unavailable: str | None = None
except ImportError as _exc:  # pragma: no cover - depends on the aiohttp release
    unavailable = f"aiohttp lacks {_exc.name or _exc}"

log = logging.getLogger("kubetoll.sidecar")

MAX_HEAD = 8190  # aiohttp's line limit: a longer head is aiohttp's to judge
_READER_LIMIT = 2**16  # an upload's StreamReader pauses the socket past twice this unread
# Pipelined bytes held behind the request in flight before the socket is paused: each request
# taken moves the rest of the buffer down, so it stays small (the kernel holds the rest).
_HOLD_BYTES = 2**16
_MAX_FIELDS = 100
_END = b"\r\n\r\n"
_REQUEST_START = b"POST /"
# A header line this protocol takes, after the CRLF before it: a token, a colon, a value of
# visible characters, spaces, tabs and obs-text (decoded), up to the next CRLF or the head's end.
# Anything else (obs-fold, control bytes, a bare LF) goes to aiohttp.
# (Greedy, so a valid line is matched without backtracking; a value ending in a space or tab is
# aiohttp's to strip.)
_FIELDS = re.compile(r"\r\n([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)(?=\r\n|\Z)")
_HANDED_OFF_FIELDS = frozenset({"transfer-encoding", "expect", "upgrade", "content-encoding"})

Handler = Callable[[Any], Awaitable[web.StreamResponse]]
Route = tuple[Any, Handler]  # (the route's match info, its handler in the app's middlewares)


class _Body:
    """The request body, whole: the part of aiohttp's `StreamReader` the API's body reader uses."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def is_eof(self) -> bool:
        return True

    def at_eof(self) -> bool:
        return not self._data

    def read_nowait(self, n: int = -1) -> bytes:
        data = self._data
        if n < 0 or n >= len(data):
            self._data = b""
            return data
        self._data = data[n:]
        return data[:n]

    async def read(self, n: int = -1) -> bytes:
        return self.read_nowait(n)


class LeanRequest:
    """What the API's handlers, middlewares and aiohttp's response classes read of a request."""

    __slots__ = (
        "app",
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "match_info",
        "path",
        "transport",
        "_conn",
        "_writer",
    )

    method = "POST"
    version = HttpVersion11

    def __init__(
        self,
        conn: LeanConnection,
        app: web.Application,
        path: str,
        headers: CIMultiDictProxy[str],
        content: _Body | StreamReader,
        content_length: int,
        keep_alive: bool,
        match_info: Any,
    ) -> None:
        self._conn = conn
        self._writer: StreamWriter | None = None
        self.app = app
        self.path = path
        self.headers = headers
        self.content = content
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.match_info = match_info
        self.transport = conn.transport

    @property
    def _payload_writer(self) -> StreamWriter:
        if self._writer is None:
            self._writer = StreamWriter(self._conn, self._conn._loop)
        return self._writer

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # What aiohttp's Request does before a response's head goes out: the app's signal
        # (the drain marks the request answered there and closes the connection while draining).
        await self.app.on_response_prepare.send(self, response)  # type: ignore[arg-type]  # the parts it reads

    def __repr__(self) -> str:
        return f"<LeanRequest POST {self.path}>"


class LeanAPI:
    """The protocol factory's shared part: the routes, the aiohttp server to hand off to, the limits."""

    def __init__(
        self,
        app: web.Application,
        routes: dict[str, Route],
        aiohttp_protocol: Callable[[], asyncio.Protocol],
        *,
        header_timeout: float,
        body_limit: Callable[[], int],
    ) -> None:
        self.app = app
        self.routes = {path.encode("ascii"): (path, route) for path, route in routes.items()}
        self.aiohttp_protocol = aiohttp_protocol
        self.header_timeout = header_timeout
        self.body_limit = body_limit
        self.handed_off = 0  # connections given to aiohttp (a test and a bench read it)

    def __call__(self) -> LeanConnection:
        return LeanConnection(self)


class LeanConnection(BaseProtocol):
    """One API connection: requests taken off its buffer, in order, until it is handed to aiohttp."""

    __slots__ = ("_api", "_aio", "_buf", "_busy", "_closing", "_held", "_idle_since", "_task", "_timer", "_upload")

    def __init__(self, api: LeanAPI) -> None:
        super().__init__(asyncio.get_running_loop())
        self._api = api
        self._aio: asyncio.Protocol | None = None  # aiohttp's protocol, once handed off
        self._buf = bytearray()
        self._busy = False  # a request of this connection is in its handler or being written
        self._closing = False  # close once the request in flight is answered
        self._held = False  # reading paused: pipelined bytes piled up behind the request in flight
        self._idle_since = 0.0
        # The body of the request in flight still arriving: its reader, and how many bytes are to come.
        self._upload: tuple[StreamReader, int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None  # the request in flight (held: the loop keeps tasks weakly)

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # uvloop's transports are not asyncio.Transport subclasses
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._aio is not None:
            self._aio.data_received(data)
            return
        if self._upload is not None:
            reader, left = self._upload
            if len(data) < left:
                reader.feed_data(data)
                self._upload = (reader, left - len(data))
                return
            reader.feed_data(data[:left])
            reader.feed_eof()
            self._upload = None
            data = data[left:]  # a pipelined request behind the body
            if not data:
                return
        self._buf += data
        if not self._busy:
            self._take()

    def eof_received(self) -> bool | None:
        if self._aio is not None:
            return self._aio.eof_received()
        return None  # the transport closes; a request in flight finds it closed when it writes

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._upload is not None:
            # What aiohttp sets on the body of a request whose client left: its handler counts a disconnect.
            self._upload[0].set_exception(ConnectionResetError("Connection lost"))
            self._upload = None
        if self._aio is not None:
            self._aio.connection_lost(exc)  # type: ignore[arg-type]
            return
        super().connection_lost(exc)  # wakes a writer waiting to drain

    def pause_reading(self) -> None:
        # An upload's StreamReader holding more than it may: stop reading the socket until it is read.
        self._reading_paused = True
        self._pause_socket()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        if not self._held:
            self._resume_socket()

    def _pause_socket(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def _resume_socket(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self._aio is not None:
            self._aio.pause_writing()
        else:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._aio is not None:
            self._aio.resume_writing()
        else:
            super().resume_writing()

    # ------------------------------------------------------------------ requests

    def close_idle(self) -> None:
        """At shutdown: close now if no request is in flight, else after its answer (aiohttp closes its own)."""
        if self._aio is not None or self.transport is None:
            return
        if self._busy:
            self._closing = True
        else:
            self.transport.close()

    def _take(self) -> None:
        """Start the next request in the buffer if it is whole; hand off what this does not take."""
        buf = self._buf
        end = buf.find(_END, 0, MAX_HEAD + 4)
        if end < 0:
            prefix = bytes(buf[:6])
            if (
                len(buf) > MAX_HEAD + 4
                or not _REQUEST_START.startswith(prefix)
                or buf.count(b"\n") != buf.count(b"\r\n")
            ):
                self._hand_off()  # not a POST, a bare LF, or no head within the limit: aiohttp answers now
            return
        taken = self._parse_head(bytes(buf[:end]))
        if taken is None:
            self._hand_off()
            return
        path, route, headers, length, keep_alive = taken
        start = end + 4
        content: _Body | StreamReader
        if len(buf) >= start + length:
            content = _Body(bytes(buf[start : start + length]))
            del buf[: start + length]
        else:
            # The body is still arriving: the handler starts now and reads it as it comes, under its
            # own deadline, as it would on aiohttp's protocol.
            content = StreamReader(self, _READER_LIMIT, loop=self._loop)
            if len(buf) > start:
                content.feed_data(bytes(buf[start:]))
            self._upload = (content, start + length - len(buf))
            buf.clear()
        self._busy = True
        if len(buf) > _HOLD_BYTES:
            self._held = True  # a client that pipelines without reading: stop taking its bytes
            self._pause_socket()
        info, handler = route
        request = LeanRequest(self, self._api.app, path, headers, content, length, keep_alive, info)
        self._task = self._loop.create_task(self._serve(request, handler))

    def _parse_head(self, head: bytes) -> tuple[str, Route, CIMultiDictProxy[str], int, bool] | None:
        first = head.find(b"\r\n")
        parts = (head if first < 0 else head[:first]).split(b" ")
        if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
            return None
        known = self._api.routes.get(parts[1])
        if known is None:
            return None
        fields: list[tuple[str, str]] = []
        if first >= 0:
            # aiohttp's parser decodes names and values this way; one pass over the head's fields,
            # each line matched whole (a line that does not match leaves the counts unequal).
            text = head.decode("utf-8", "surrogateescape")
            fields = _FIELDS.findall(text, first)
            if len(fields) != head.count(b"\r\n") or len(fields) > _MAX_FIELDS:
                return None
        length = -1
        keep_alive = True
        for name, value in fields:
            if value[-1:] in (" ", "\t"):
                return None
            lowered = name.lower()
            if lowered in _HANDED_OFF_FIELDS:
                return None
            if lowered == "content-length":
                if length >= 0 or not (value.isascii() and value.isdigit()):
                    return None
                length = int(value)
            elif lowered == "connection":
                value = value.lower()
                if value == "close":
                    keep_alive = False
                elif value != "keep-alive":
                    return None
        if length < 0 or length > self._api.body_limit():
            return None  # no length (aiohttp answers what that means), or aiohttp's reader answers 413
        path, route = known
        return path, route, CIMultiDictProxy(CIMultiDict(fields)), length, keep_alive

    async def _serve(self, request: LeanRequest, handler: Handler) -> None:
        try:
            resp = await handler(request)
        except asyncio.CancelledError:
            self._close()  # the drain cut an answer already under way: as aiohttp, the connection ends
            raise
        except Exception:
            # The error middleware answers every exception; one past it is a bug, answered as aiohttp does.
            log.exception("unhandled error in the API handler for %s", request.path)
            resp = web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
            resp.force_close()
        try:
            keep_alive = await self._write_plain(request, resp)
            if keep_alive is None:  # a stream, or what only aiohttp's writer writes
                await resp.prepare(request)  # type: ignore[arg-type]  # the parts of a Request it reads
                await resp.write_eof()
                keep_alive = bool(resp.keep_alive)
            elif self._paused:
                await self._drain_helper()  # a client reading slowly: its answer out before the next
        except ConnectionError:
            self._close()  # the client went away
            return
        except Exception:
            log.exception("failed to write the answer to %s", request.path)
            self._close()  # part of it may be out: the connection cannot carry another
            return
        if not keep_alive or self._closing or self.transport is None or self._upload is not None:
            # (an answer given before its body was all in: the rest of it cannot be told from a next request)
            self._close()
            return
        self._busy = False
        self._task = None
        if self._held:
            self._held = False
            if not self._reading_paused:
                self._resume_socket()
        self._arm()
        if self._buf:
            self._take()

    async def _write_plain(self, request: LeanRequest, resp: web.StreamResponse) -> bool | None:
        """A whole `Response` with a bytes body, written as aiohttp writes it, in one `write`.

        What aiohttp's `Response.prepare` and `write_eof` do for it, in their order (length, type,
        date, server and connection fields, then the app's prepare signal, then the head through
        aiohttp's own serializer, which refuses control characters), without its writer objects.
        Returns whether the connection stays open, or None for anything else (a stream, a payload,
        compression, cookies, a status without a body), which aiohttp's classes write.
        """
        if type(resp) is not web.Response:
            return None
        body = resp.body
        if (
            resp.prepared
            or type(body) is not bytes
            or resp.chunked
            or resp.compression
            or getattr(resp, "_cookies", None)
            or resp.status < 200
            or resp.status in (204, 304)
        ):
            return None
        headers = resp.headers
        if hdrs.CONTENT_LENGTH not in headers:
            headers[hdrs.CONTENT_LENGTH] = str(len(body))
        if body:
            headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
        if hdrs.DATE not in headers:
            headers[hdrs.DATE] = rfc822_formatted_time()
        headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
        keep_alive = request.keep_alive if resp.keep_alive is None else resp.keep_alive
        if hdrs.CONNECTION not in headers and not keep_alive:
            headers[hdrs.CONNECTION] = "close"
        await request._prepare_hook(resp)
        head = _serialize_headers(f"HTTP/1.1 {resp.status} {resp.reason}", headers)
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Connection lost")
        transport.write(head + body)
        return keep_alive and resp.keep_alive is not False  # the signal may have closed it (the drain)

    # ------------------------------------------------------------------ hand-off, timer, close

    def _hand_off(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        aio = self._aio = self._api.aiohttp_protocol()
        self._api.handed_off += 1
        aio.connection_made(transport)
        if self._paused:
            aio.pause_writing()
        data, self._buf = bytes(self._buf), bytearray()
        if data:
            aio.data_received(data)

    def _arm(self) -> None:
        self._idle_since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._idle_since + self._api.header_timeout, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._aio is not None or self.transport is None or self._busy:
            return  # the answer re-arms it
        due = self._idle_since + self._api.header_timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._on_timer)
        else:
            self.transport.close()  # idle, or a head not sent in time

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
