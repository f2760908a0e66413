"""A TCP server scripted byte by byte, for testing an HTTP client's side of the wire.

Each accepted connection runs the test's `handler(conn)`. `conn.read_request()` parses one
request (head and Content-Length body) and records it; `conn.send()` writes exactly the
bytes given. The server counts the connections it accepted and how many were open at
once, so tests can see pooling and reuse from the server's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        assert len(found) <= 1, f"{name} sent {len(found)} times: {found}"
        return found[0] if found else None


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    index: int
    received: bytearray = field(default_factory=bytearray)
    requests: list[Request] = field(default_factory=list)

    async def read_request(self) -> Request | None:
        """The next request, or None when the client closed (or reset) the connection first."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError):
                self.received += exc.partial
            return None
        self.received += head
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        length = sum(int(v) for k, v in headers if k.lower() == "content-length")
        body = await self.reader.readexactly(length) if length else b""
        self.received += body
        req = Request(method, target, version, headers, body, head + body)
        self.requests.append(req)
        return req

    async def read_until_eof(self) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await self.reader.read(65536):
                self.received += chunk

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_pieces(self, pieces: list[bytes], gap: float = 0.002) -> None:
        """Each piece its own write, with a pause, so the client sees them arrive apart."""
        for piece in pieces:
            await self.send(piece)
            await asyncio.sleep(gap)

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Close with an RST instead of a FIN (SO_LINGER 0)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Conn], Awaitable[None]]


def response(
    status: int = 200,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    reason: str = "OK",
    length: bool = True,
) -> bytes:
    """A whole HTTP/1.1 response; `length=False` leaves Content-Length for the caller to frame."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk(data: bytes, ext: str = "") -> bytes:
    return f"{len(data):x}{ext}\r\n".encode() + data + b"\r\n"


class RawServer:
    def __init__(self, handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._ssl = ssl_context
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections: list[Conn] = []
        self.open_now = 0
        self.max_open = 0
        self.port = 0

    @property
    def accepted(self) -> int:
        return len(self.connections)

    @property
    def requests(self) -> list[Request]:
        return [r for c in self.connections for r in c.requests]

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.received) for c in self.connections)

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        scheme = "https" if self._ssl else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for c in self.connections:
            c.writer.close()

    async def __aenter__(self) -> RawServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer, len(self.connections))
        self.connections.append(conn)
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away mid-script: what the test checks is on the client's side
        except asyncio.CancelledError:
            # Only stop() cancels a handler (one parked on an event for ever). Ending the task
            # normally keeps asyncio.streams from logging the cancellation as an error.
            pass
        finally:
            self._tasks.discard(task)
            self.open_now -= 1
            writer.close()
