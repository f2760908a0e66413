"""The forwarder's HTTP/1.1 client: keep-alive pools to the upstreams, on asyncio protocols.

Why not aiohttp's `ClientSession` on this path: every call there builds a `ClientRequest`
(URL object, header normalisation), a `ClientResponse` with its own `StreamReader`, a
timeout handle and a connection wrapper, and writes the head through the generic writer.
In the sidecar's profile that was the largest single block after the API side (see
docs/performance.md). An LLM call needs a small part of HTTP: one request whose body is
in hand, one response read whole or streamed. This module does that part, on one
`asyncio.Protocol` per connection (uvloop's transports and TLS when uvloop runs the loop):

- HTTP/1.1 with keep-alive; at most `max_connections` open across all hosts (a request
  beyond waits, within its total timeout); idle connections closed after
  `keepalive_seconds`; a pooled connection the server had closed is retried once;
- TLS with a verified default context and SNI;
- bodies framed by Content-Length, chunked, or by the server's close; 1xx skipped;
  gzip and deflate decoded (and asked for, as aiohttp did);
- not done, on purpose: redirects (an LLM API answers; a 3xx goes back as it is),
  proxies from the environment (the `ClientSession` did not read them either), cookies,
  HTTP/2, `Expect: 100-continue`.

Parsing is pulled by the reader: `data_received` only appends to the connection's buffer
and wakes a waiting reader, so a response whose head and body arrive in one segment is
parsed without a second wake-up. Errors never carry request header values (credentials).
aiohttp stays for every call off the hot path (embeddings, verifiers, batches).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import zlib
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

_MAX_HEAD = 64 * 1024  # a response head larger than this is refused, not buffered
_HIGH_WATER = 256 * 1024  # stop reading the socket while this much is buffered unread
# A stream that said it is complete may still owe its body's end (chunked's last chunk, often
# its own segment or TLS record): waited for this long, and this many bytes, off the caller's path.
_TAIL_SECONDS = 1.0
_TAIL_BYTES = 64 * 1024
_URL_CACHE_SIZE = 1024
_NO_BODY_STATUS = frozenset({204, 304})
_BAD_HEADER_CHARS = ("\r", "\n", "\x00")


class UpstreamConnectionError(ConnectionError):
    """The upstream could not be reached, or closed or broke the connection before the response was whole."""


class UpstreamProtocolError(UpstreamConnectionError):
    """The upstream's bytes are not a valid HTTP/1.x response."""


class _Stale(Exception):
    """A reused connection closed before any byte of the response: safe to retry on a new one."""


@dataclass(frozen=True, slots=True)
class CallTimeout:
    """Seconds, None for no limit. `total` spans the whole call, the body's last byte included."""

    total: float | None = None
    connect: float | None = None  # DNS, TCP and TLS
    read: float | None = None  # each wait for bytes from the server


_NO_TIMEOUT = CallTimeout()
_default_ssl: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    # aiohttp builds a verified `ssl.create_default_context()` when it is imported, and the
    # sidecar imports aiohttp for its server anyway: that one serves here too, so the process
    # holds one copy of the CA store (~2.3 MiB, ~36 ms of CPU to load), not two. Where it is
    # not there (another aiohttp), one is built on first https use.
    global _default_ssl
    if _default_ssl is None:
        from aiohttp import connector

        shared = getattr(connector, "_SSL_CONTEXT_VERIFIED", None)
        _default_ssl = shared if isinstance(shared, ssl.SSLContext) else ssl.create_default_context()
    return _default_ssl


@dataclass(frozen=True, slots=True)
class _Target:
    key: tuple[bool, str, int]  # (tls, host, port): the pool a request goes to
    path: str  # path and query, as sent on the request line
    host_header: str
    auth: str | None  # Basic credentials from the URL's userinfo


def _parse_url(url: str) -> _Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("upstream URL must be http:// or https:// with a host")
    tls = scheme == "https"
    default_port = 443 if tls else 80
    port = parts.port or default_port
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default_port else f"{shown}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if not path.isascii():
        path = quote(path, safe="/%:@!$&'()*+,;=?-._~")
    auth = None
    if parts.username is not None:
        userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(userinfo.encode()).decode()
    return _Target((tls, host, port), path, host_header, auth)


class _Conn(asyncio.Protocol):
    """One connection: a byte buffer the response reader pulls from."""

    __slots__ = (
        "client",
        "key",
        "transport",
        "buf",
        "eof",
        "error",
        "closed",
        "uses",
        "idle_since",
        "_waiter",
        "_paused",
    )

    def __init__(self, client: UpstreamClient, key: tuple[bool, str, int]) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.closed = False
        self.uses = 0
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # one small request a call: Nagle would hold its last segment
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._discard()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # used by the reader
    async def wait(self, deadline: float | None) -> None:
        """Until more bytes or the end arrive, or `deadline` (loop time) passes (TimeoutError)."""
        loop = self.client.loop
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        fut = loop.create_future()
        self._waiter = fut
        timer = loop.call_at(deadline, _expire, fut) if deadline is not None else None
        try:
            await fut
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def consumed(self) -> None:
        if self._paused and len(self.buf) < _HIGH_WATER // 4 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def close(self, abort: bool = True) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        self._discard()

    def _discard(self) -> None:
        if not self.closed:
            self.closed = True
            self.client._forget(self)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class UpstreamResponse:
    """A response whose head is in; its body read whole (`read`) or as it arrives (`readany`)."""

    __slots__ = (
        "status",
        "reason",
        "headers",
        "content_length",
        "_conn",
        "_deadline",
        "_read",
        "_mode",
        "_left",
        "_chunk_state",
        "_decoder",
        "_keep_alive",
        "_done",
        "_released",
    )

    def __init__(self, conn: _Conn, deadline: float | None, read: float | None) -> None:
        self._conn = conn
        self._deadline = deadline
        self._read = read
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.content_length: int | None = None
        self._mode = "none"  # "length", "chunked", "close" or "none"
        self._left = 0  # bytes left: of the body ("length") or of the current chunk ("chunked")
        self._chunk_state = "size"  # "size", "data", "crlf", "trailers"
        self._decoder: Any = None
        self._keep_alive = False
        self._done = False
        self._released = False

    def _wait_until(self) -> float | None:
        if self._read is None:
            return self._deadline
        until = self._conn.client.loop.time() + self._read
        return until if self._deadline is None else min(until, self._deadline)

    async def _receive(self) -> None:
        conn = self._conn
        if conn.eof:
            raise self._cut("the upstream closed the connection before the response was complete")
        if self._deadline is not None and self._conn.client.loop.time() >= self._deadline:
            raise TimeoutError("the upstream call's total timeout passed")
        await conn.wait(self._wait_until())

    def _cut(self, message: str) -> UpstreamConnectionError:
        err = self._conn.error
        detail = f" ({type(err).__name__})" if err is not None else ""
        return UpstreamConnectionError(message + detail)

    # ---------------------------------------------------------------- head
    async def _read_head(self, method: str, reused: bool) -> None:
        conn = self._conn
        while True:
            buf = conn.buf
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head, cut = bytes(buf[:end]), end + 4
            else:
                end = buf.find(b"\n\n")  # bare LF line endings, as lenient parsers accept
                head, cut = (bytes(buf[:end]), end + 2) if end >= 0 else (b"", -1)
            if cut > _MAX_HEAD or (cut < 0 and len(buf) > _MAX_HEAD):
                raise UpstreamProtocolError(f"response head larger than {_MAX_HEAD} bytes")
            if cut < 0:
                if conn.eof and not buf and reused:
                    raise _Stale()
                await self._receive()
                continue
            del buf[:cut]
            self._parse_head(head)
            if 100 <= self.status < 200 and self.status != 101:
                continue  # 100 Continue, 103 Early Hints: the real head follows
            break
        self._frame(method)

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise UpstreamProtocolError("the upstream's answer is not an HTTP/1.x response")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t" or name[0] in " \t":
                raise UpstreamProtocolError("malformed header line in the upstream's response")
            headers.add(name, value.strip(" \t"))
        self.status = int(code)
        self.reason = reason
        self.headers = CIMultiDictProxy(headers)
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self._keep_alive = "keep-alive" in connection
        else:
            self._keep_alive = "close" not in connection

    def _frame(self, method: str) -> None:
        h = self.headers
        if method == "HEAD" or self.status in _NO_BODY_STATUS or self.status < 200:
            self._mode, self._done = "none", True
            return
        te = h.get("transfer-encoding")
        lengths = h.getall("content-length", [])
        if te is not None and te.lower().rsplit(",", 1)[-1].strip() == "chunked":
            self._mode = "chunked"
            if lengths:
                self._keep_alive = False  # both framings: a smuggling shape; never reuse the connection
        elif lengths:
            values = {v.strip() for v in lengths}
            if len(values) != 1 or not (v := values.pop()).isdigit():
                raise UpstreamProtocolError("invalid Content-Length in the upstream's response")
            self.content_length = self._left = int(v)
            self._mode = "length"
            self._done = self._left == 0
        else:
            self._mode = "close"
            self._keep_alive = False
        coding = h.get("content-encoding", "").strip().lower()
        if coding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._decoder = _DeflateDecoder()

    # ---------------------------------------------------------------- body
    async def read(self) -> bytes:
        """The whole body, decoded; the connection then goes back to the pool."""
        conn = self._conn
        if self._mode == "length" and self._decoder is None and len(conn.buf) >= self._left and not self._done:
            body = bytes(conn.buf[: self._left])  # the usual case: all of it came with the head
            del conn.buf[: self._left]
            self._left, self._done = 0, True
            self.release()
            return body
        parts = []
        while True:
            piece = await self.readany()
            if not piece:
                break
            parts.append(piece)
        self.release()
        return b"".join(parts)

    async def readany(self) -> bytes:
        """The next decoded piece of the body as it arrives; b"" once it is all read."""
        while True:
            if self._done:
                return self._flush_decoder()
            raw = self._take()
            if raw:
                self._conn.consumed()
                if self._decoder is None:
                    return raw
                try:
                    out = self._decoder.decompress(raw)
                except zlib.error as exc:
                    raise UpstreamProtocolError("the upstream's compressed body is corrupt") from exc
                if out:
                    return bytes(out)
                continue
            if self._done:
                continue
            if self._mode == "close" and self._conn.eof:
                self._done = True
                continue
            await self._receive()

    def _flush_decoder(self) -> bytes:
        d, self._decoder = self._decoder, None
        if d is None:
            return b""
        try:
            return bytes(d.flush())
        except zlib.error as exc:
            raise UpstreamProtocolError("the upstream's compressed body is corrupt") from exc

    def _take(self) -> bytes:
        """What the buffer holds of the body now, framing removed (maybe b"")."""
        buf = self._conn.buf
        if self._mode == "length":
            n = min(len(buf), self._left)
            out = bytes(buf[:n])
            del buf[:n]
            self._left -= n
            self._done = self._left == 0
            return out
        if self._mode == "close":
            out = bytes(buf)
            buf.clear()
            return out
        return self._take_chunked(buf)

    def _take_chunked(self, buf: bytearray) -> bytes:
        out = bytearray()
        while True:
            state = self._chunk_state
            if state == "data":
                n = min(len(buf), self._left)
                if not n:
                    break
                out += buf[:n]
                del buf[:n]
                self._left -= n
                if self._left == 0:
                    self._chunk_state = "crlf"
                continue
            line_end = buf.find(b"\n")
            if line_end < 0:
                if len(buf) > _MAX_HEAD:
                    raise UpstreamProtocolError("chunk size line or trailer too long")
                break
            line = bytes(buf[:line_end]).rstrip(b"\r")
            del buf[: line_end + 1]
            if state == "crlf":
                if line:
                    raise UpstreamProtocolError("malformed chunked body from the upstream")
                self._chunk_state = "size"
            elif state == "size":
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise UpstreamProtocolError("malformed chunk size from the upstream") from None
                if size < 0:
                    raise UpstreamProtocolError("malformed chunk size from the upstream")
                if size == 0:
                    self._chunk_state = "trailers"
                else:
                    self._left, self._chunk_state = size, "data"
            elif not line:  # trailers: an empty line ends the body
                self._done = True
                break
        return bytes(out)

    # ---------------------------------------------------------------- end
    def release(self) -> None:
        """Done with the response: its connection back to the pool if the body was read whole, else closed.

        What is left of the body and already received is read past first: a stream whose caller
        stopped at its last event usually has the framing's end (chunked's `0\r\n\r\n`) in the
        buffer, and its connection is then reused rather than opened again (a TLS handshake, for
        a hosted API)."""
        if self._released:
            return
        self._released = True
        if not self._done and self._keep_alive and self._mode != "close":
            try:
                self._take()  # takes all the buffer holds of the body, its framing's end included
            except UpstreamProtocolError:
                pass  # closed below
        self._pool_or_close()

    def _pool_or_close(self) -> None:
        """The connection back to the pool when the body was read whole and nothing follows it."""
        conn = self._conn
        if self._done and self._keep_alive and not conn.closed and not conn.buf and not conn.eof:
            conn.client._release(conn)
        else:
            conn.close()

    def release_when_done(self) -> None:
        """Done with a stream whose last event has come: its connection back to the pool once
        the body's end arrives too.

        The end (chunked's `0\r\n\r\n`) often comes in a segment of its own just after the
        last event; `release` would close the connection then, and the next call would open a
        new one (for a hosted API, a TLS handshake in its time to first token). So when the end
        is not in the buffer yet it is waited for in the background, up to `_TAIL_SECONDS` and
        `_TAIL_BYTES`; the caller does not wait. Anything else than the end, or nothing in time,
        closes the connection, as `release` does."""
        if self._released:
            return
        if not self._done and self._keep_alive and self._mode == "chunked":
            try:
                self._take()
            except UpstreamProtocolError:
                self.close()
                return
            if not self._done and not self._conn.eof:
                self._released = True
                self._conn.client._keep(self._await_tail())
                return
        self.release()

    async def _await_tail(self) -> None:
        conn = self._conn
        until = conn.client.loop.time() + _TAIL_SECONDS
        left = _TAIL_BYTES
        try:
            while True:
                # What came since the caller let go is in the buffer, with no one woken for it: read first.
                left -= len(self._take())
                if self._done or left < 0 or conn.eof or conn.closed:
                    break
                await conn.wait(until)
        except (TimeoutError, UpstreamProtocolError):
            pass
        self._pool_or_close()

    def close(self) -> None:
        """Close the connection now (an abandoned stream, a cancelled call)."""
        self._released = True
        self._conn.close()


class _DeflateDecoder:
    """HTTP "deflate": meant as zlib-wrapped, sent raw by some servers; the first two bytes tell which."""

    __slots__ = ("_d", "_head")

    def __init__(self) -> None:
        self._d: Any = None
        self._head = b""

    def decompress(self, data: bytes) -> bytes:
        if self._d is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            cmf, flg = self._head[0], self._head[1]
            wrapped = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0  # RFC 1950's header check
            self._d = zlib.decompressobj() if wrapped else zlib.decompressobj(-zlib.MAX_WBITS)
            data, self._head = self._head, b""
        out: bytes = self._d.decompress(data)
        return out

    def flush(self) -> bytes:
        if self._d is None:
            if self._head:
                raise zlib.error("truncated deflate body")
            return b""
        out: bytes = self._d.flush()
        return out


class UpstreamClient:
    """Keep-alive pools for one backend's upstream calls (every host it calls: endpoint and replicas)."""

    def __init__(
        self,
        max_connections: int = 100,
        keepalive_seconds: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max = max_connections
        self._keepalive = keepalive_seconds
        self._ssl = ssl_context
        self._idle: dict[tuple[bool, str, int], list[_Conn]] = {}
        self._open = 0  # connections open or being opened
        self._conns: set[_Conn] = set()  # every open one, in use or idle
        self._waiters: list[asyncio.Future[None]] = []
        self._targets: dict[str, _Target] = {}
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tails: set[asyncio.Task[None]] = set()  # streams' ends awaited (release_when_done)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout: CallTimeout = _NO_TIMEOUT,
    ) -> UpstreamResponse:
        """Send one request; return once the response's status line and headers are in."""
        if self._closed:
            raise RuntimeError("the upstream client is closed")
        target = self._targets.get(url)
        if target is None:
            target = _parse_url(url)
            if len(self._targets) >= _URL_CACHE_SIZE:
                self._targets.clear()
            self._targets[url] = target
        head = _request_head(method, target, headers, len(body))
        data = head + body if len(body) < 65536 else None
        loop = self.loop
        deadline = loop.time() + timeout.total if timeout.total is not None else None
        for attempt in (0, 1):
            conn = await self._acquire(target.key, deadline, timeout.connect, fresh=attempt > 0)
            reused = conn.uses > 0
            conn.uses += 1
            transport = conn.transport
            assert transport is not None
            if data is not None:
                transport.write(data)
            else:
                transport.writelines((head, body))
            resp = UpstreamResponse(conn, deadline, timeout.read)
            try:
                await resp._read_head(method, reused)
            except _Stale:
                conn.close()
                if attempt == 0:
                    continue
                raise UpstreamConnectionError("the upstream closed the connection before answering") from None
            except BaseException:
                conn.close()
                raise
            return resp
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close every connection; the client takes no more requests."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for c in list(self._conns):  # a response still being read included: it fails as a cut connection
            c.close(abort=False)
        for t in list(self._tails):  # a stream's end awaited: its connection is closed just above
            t.cancel()
        self._idle.clear()
        for w in self._waiters:
            if not w.done():
                w.set_exception(RuntimeError("the upstream client is closed"))
        self._waiters.clear()

    # ---------------------------------------------------------------- the pool
    async def _acquire(
        self, key: tuple[bool, str, int], deadline: float | None, connect: float | None, fresh: bool = False
    ) -> _Conn:
        """A connection to `key`: an idle one unless `fresh` (a retry after a stale one: the
        others pooled with it may be as dead, after an upstream restart), else a new one."""
        loop = self.loop
        while True:
            idle = None if fresh else self._idle.get(key)
            now = loop.time()
            while idle:
                conn = idle.pop()  # the most recently used: the least likely to have been closed by the server
                if not conn.closed and not conn.eof and now - conn.idle_since < self._keepalive:
                    return conn
                conn.close(abort=False)
            if self._open < self._max:
                return await self._connect(key, deadline, connect)
            victim = next((c for conns in self._idle.values() for c in conns), None)
            if victim is not None:  # at the limit with an idle connection (another host, or stale-suspect): make room
                victim.close(abort=False)
                continue
            if deadline is not None and now >= deadline:
                raise TimeoutError("no upstream connection free within the total timeout")
            waiter = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_at(deadline, _expire, waiter) if deadline is not None else None
            try:
                await waiter
            except TimeoutError:
                raise TimeoutError("no upstream connection free within the total timeout") from None
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_waiter()  # woken, then cancelled: the free place goes to the next in line
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if self._closed:
                raise RuntimeError("the upstream client is closed")

    async def _connect(self, key: tuple[bool, str, int], deadline: float | None, connect: float | None) -> _Conn:
        tls, host, port = key
        loop = self.loop
        limit = connect
        if deadline is not None:
            left = max(deadline - loop.time(), 0.0)
            limit = left if limit is None else min(limit, left)
        self._open += 1
        conn = _Conn(self, key)
        self._conns.add(conn)
        try:
            async with asyncio.timeout(limit):
                if tls:
                    await loop.create_connection(
                        lambda: conn, host, port, ssl=self._ssl or _default_ssl_context(), server_hostname=host
                    )
                else:
                    await loop.create_connection(lambda: conn, host, port)
        except BaseException as exc:
            if not conn.closed:  # never made, so never counted down by connection_lost
                conn.closed = True
                self._open -= 1
                self._conns.discard(conn)
                self._wake_waiter()
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"connecting to {host}:{port} took longer than {limit:g}s") from None
            if isinstance(exc, ssl.SSLError):
                reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or type(exc).__name__
                raise UpstreamConnectionError(f"TLS to {host}:{port} failed: {reason}") from None
            if isinstance(exc, OSError):
                why = exc.strerror or type(exc).__name__
                raise UpstreamConnectionError(f"cannot connect to {host}:{port}: {why}") from None
            raise
        return conn

    def _keep(self, tail: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(tail)
        self._tails.add(task)
        task.add_done_callback(self._tails.discard)

    def _release(self, conn: _Conn) -> None:
        if self._closed:
            conn.close(abort=False)
            return
        conn.idle_since = self.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self._keepalive, self._sweep_idle)
        self._wake_waiter()

    def _forget(self, conn: _Conn) -> None:
        """A connection closed (by either side): its place in the pool is free."""
        self._open -= 1
        self._conns.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        while self._waiters:
            w = self._waiters.pop(0)
            if not w.done():
                w.set_result(None)
                return

    def _sweep_idle(self) -> None:
        self._sweep = None
        now = self.loop.time()
        for conns in list(self._idle.values()):
            for c in [c for c in conns if now - c.idle_since >= self._keepalive]:
                c.close(abort=False)
        if self.idle_connections:
            self._sweep = self.loop.call_later(self._keepalive, self._sweep_idle)


def _request_head(method: str, target: _Target, headers: Mapping[str, str] | None, length: int) -> bytes:
    host = target.host_header
    lines = [""]
    has_accept = has_encoding = has_auth = False
    if headers:
        for name, value in headers.items():
            for ch in _BAD_HEADER_CHARS:
                if ch in name or ch in value:
                    raise ValueError(f"header {name.strip()[:40]!r} holds a line break or NUL")
            low = name.lower()
            if low == "content-length" or low == "transfer-encoding":
                continue  # the client frames the request itself
            if low == "host":
                host = value  # an ingress in front of a model server may route by it
                continue
            if low == "accept":
                has_accept = True
            elif low == "accept-encoding":
                has_encoding = True
            elif low == "authorization":
                has_auth = True
            lines.append(f"{name}: {value}\r\n")
    if not has_accept:
        lines.append("Accept: */*\r\n")
    if not has_encoding:
        lines.append("Accept-Encoding: gzip, deflate\r\n")
    if target.auth is not None and not has_auth:
        lines.append(f"Authorization: {target.auth}\r\n")
    if length or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"Content-Length: {length}\r\n")
    lines.append("\r\n")
    lines[0] = f"{method} {target.path} HTTP/1.1\r\nHost: {host}\r\n"
    return "".join(lines).encode("utf-8")
