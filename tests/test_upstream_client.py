"""The sidecar's own HTTP/1.1 client for upstream calls, against a server scripted byte by byte.

What goes on the wire (request bytes, Host, Content-Length, Accept-Encoding, no
User-Agent), every body framing (Content-Length, chunked with extensions and
trailers, close-delimited, none for HEAD/204/304), decoding of gzip and deflate,
streaming that really streams, keep-alive reuse and its limits, the retry of a
stale pooled connection, the pool bound, each timeout, truncated and malformed
responses, header injection, TLS, and that credentials never reach an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trustme

from kubetoll_sidecar import upstream_client
from kubetoll_sidecar.upstream_client import (
    CallTimeout,
    UpstreamClient,
    UpstreamConnectionError,
    UpstreamProtocolError,
    UpstreamResponse,
)
from support.ports import refusing_port
from support.raw_http_server import Conn, Handler, RawServer, Request, chunk, response

T = TypeVar("T")

SECRET = "sk-secret-123"
CHUNKED = [("Transfer-Encoding", "chunked")]


async def bounded(aw: Awaitable[T], limit: float = 1.5) -> T:
    """`await aw`, failing the test if it hangs; a TimeoutError raised by the client passes through."""
    try:
        async with asyncio.timeout(limit) as cm:
            return await aw
    except TimeoutError:
        if cm.expired():
            raise AssertionError(f"no result within {limit}s") from None
        raise


def keep_alive(answer: Callable[[Request], bytes]) -> Handler:
    """Answer every request on the connection with `answer(request)` until the client closes it."""

    async def handler(conn: Conn) -> None:
        while req := await conn.read_request():
            await conn.send(answer(req))

    return handler


def ok(body: bytes = b"ok") -> Handler:
    return keep_alive(lambda _req: response(body=body))


async def never_answer(conn: Conn) -> None:
    await conn.read_request()
    await conn.read_until_eof()


async def wait_for_state(predicate: Callable[[], bool], limit: float = 1.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "the expected state was not reached"
        await asyncio.sleep(0.005)


async def read_by_pieces(resp: UpstreamResponse) -> list[bytes]:
    pieces = []
    while piece := await bounded(resp.readany()):
        pieces.append(piece)
    return pieces


async def get(client: UpstreamClient, url: str, **kw: Any) -> bytes:
    resp = await bounded(client.request("GET", url, **kw))
    return await bounded(resp.read())


@pytest.fixture
async def cleanup() -> AsyncIterator[contextlib.AsyncExitStack]:
    """What a test started (servers, clients), stopped at its end, the last started first."""
    async with contextlib.AsyncExitStack() as stack:
        yield stack


@pytest.fixture
def serve(cleanup: contextlib.AsyncExitStack) -> Callable[..., Awaitable[RawServer]]:
    async def _serve(handler: Handler, **kw: Any) -> RawServer:
        server = await RawServer(handler, **kw).start()
        cleanup.push_async_callback(server.stop)
        return server

    return _serve


@pytest.fixture
def make_client(cleanup: contextlib.AsyncExitStack) -> Callable[..., UpstreamClient]:
    def _make(**kw: Any) -> UpstreamClient:
        c = UpstreamClient(**kw)
        cleanup.push_async_callback(c.close)
        return c

    return _make


@pytest.fixture
def client(make_client: Callable[..., UpstreamClient]) -> UpstreamClient:
    return make_client()


# --------------------------------------------------------------------------- the request on the wire


async def test_content_length_body_and_the_exact_request_sent(serve: Any, client: UpstreamClient) -> None:
    headers = [("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    server = await serve(keep_alive(lambda _req: response(201, b"hello world", headers, reason="Created Fine")))
    path = "/v1/chat/completions?stream=false&q=a%20b"
    resp = await bounded(
        client.request(
            "POST",
            server.url(path),
            body=b'{"model":"m"}',
            headers={"Authorization": "Bearer k", "X-Trace-Id": "abc", "Content-Type": "application/json"},
        )
    )
    assert (resp.status, resp.reason, resp.content_length) == (201, "Created Fine", 11)
    assert resp.headers.get("content-type") == "text/plain"
    assert resp.headers.getall("SET-COOKIE") == ["a=1", "b=2"]
    assert await bounded(resp.read()) == b"hello world"

    [req] = server.requests
    assert req.raw.startswith(f"POST {path} HTTP/1.1\r\n".encode())
    assert req.header("Host") == f"127.0.0.1:{server.port}"
    assert req.header("Content-Length") == "13"
    assert req.header("Accept-Encoding") == "gzip, deflate"
    assert req.header("Authorization") == "Bearer k"
    assert req.header("Content-Type") == "application/json"
    assert req.header("User-Agent") is None
    assert b"\r\nX-Trace-Id: abc\r\n" in req.raw  # the caller's spelling, not a normalised one
    assert req.body == b'{"model":"m"}'
    # Accept: */* and Connection: keep-alive are tolerated (aiohttp sent the first); nothing else is added.
    names = {k.lower() for k, _ in req.headers} - {"connection", "accept"}
    assert names == {"host", "content-length", "accept-encoding", "authorization", "x-trace-id", "content-type"}
    assert req.header("Connection") in (None, "keep-alive")
    assert req.header("Accept") in (None, "*/*")


async def test_empty_post_sends_length_zero_and_callers_accept_encoding_and_agent_win(
    serve: Any, client: UpstreamClient
) -> None:
    server = await serve(ok())
    resp = await bounded(
        client.request("POST", server.url("/x"), headers={"Accept-Encoding": "identity", "User-Agent": "me/1"})
    )
    await bounded(resp.read())
    [req] = server.requests
    assert req.header("Content-Length") == "0"
    assert req.header("Accept-Encoding") == "identity"
    assert req.header("User-Agent") == "me/1"
    assert req.body == b""


# --------------------------------------------------------------------------- body framings


async def test_chunked_body_streams_each_chunk_as_it_arrives(serve: Any, client: UpstreamClient) -> None:
    pieces = [b"first piece ", b"second ", b"third"]
    written = asyncio.Event()
    consumed = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(response(headers=CHUNKED, length=False))
        for i, piece in enumerate(pieces):
            await conn.send(chunk(piece, ext=';name="v"' if i == 1 else ""))
            written.set()
            # The next chunk only once the client has taken this one: a client that buffers
            # the body before handing it over never gets past the first.
            await consumed.wait()
            consumed.clear()
        await conn.send(b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")
        await keep_alive(lambda _req: response(body=b"again"))(conn)

    server = await serve(handler)
    resp = await bounded(client.request("GET", server.url()))
    assert resp.status == 200 and resp.content_length is None
    for piece in pieces:
        got = b""
        while len(got) < len(piece):
            got += await bounded(resp.readany(), 1.0)
        assert got == piece
        consumed.set()
    assert await bounded(resp.readany()) == b""
    resp.release()
    # The trailer was consumed: the same connection carries the next request.
    assert await get(client, server.url()) == b"again"
    assert server.accepted == 1


async def test_chunked_response_split_at_every_awkward_point(serve: Any, client: UpstreamClient) -> None:
    body = b"A" * 26 + b"-" + b"z" * 300
    raw = (
        response(headers=CHUNKED, length=False)
        + b"1A;ext=1;quoted=\"a b\"\r\n" + body[:26] + b"\r\n"
        + chunk(body[26:27])
        + f"{300:X}\r\n".encode() + body[27:] + b"\r\n"
        + b"0;last\r\nX-Trailer: t\r\n\r\n"
    )  # fmt: skip
    pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send_pieces(pieces, gap=0.001)
        await keep_alive(lambda _req: response(body=b"next"))(conn)

    server = await serve(handler)
    assert await get(client, server.url()) == body
    assert await get(client, server.url()) == b"next"
    assert server.accepted == 1


async def test_close_delimited_body_is_read_to_eof_and_the_connection_not_reused(
    serve: Any, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        if await conn.read_request():
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            await conn.send_pieces([b"no length, ", b"ends at close"])
            conn.close()

    server = await serve(handler)
    resp = await bounded(client.request("GET", server.url()))
    assert resp.content_length is None
    assert await bounded(resp.read()) == b"no length, ends at close"
    assert (client.open_connections, client.idle_connections) == (0, 0)
    assert await get(client, server.url()) == b"no length, ends at close"
    assert server.accepted == 2


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_no_body_for_head_204_304_even_with_a_content_length(
    serve: Any, client: UpstreamClient, method: str, status: int
) -> None:
    async def handler(conn: Conn) -> None:
        while req := await conn.read_request():
            if req.target == "/empty":
                # The length of the body a GET would get: RFC 9110 allows it here, and no body follows.
                length = [] if status == 204 else [("Content-Length", "50")]
                await conn.send(response(status, headers=length, length=False))
            else:
                await conn.send(response(body=b"after"))

    server = await serve(handler)
    resp = await bounded(client.request(method, server.url("/empty"), timeout=CallTimeout(read=0.5)))
    assert resp.status == status
    assert await bounded(resp.read()) == b""
    # Had the client waited for 50 bytes, the next response would be read as that body.
    assert await get(client, server.url("/next")) == b"after"
    assert server.accepted == 1


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


# name: (the Content-Encoding header, the compressor). Some servers send "deflate" without the zlib wrapper.
ENCODINGS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "gzip": ("gzip", gzip.compress),
    "deflate": ("deflate", zlib.compress),
    "raw deflate": ("deflate", raw_deflate),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("via", ["read", "readany"])
async def test_gzip_and_deflate_are_decoded(serve: Any, client: UpstreamClient, encoding: str, via: str) -> None:
    header, compress = ENCODINGS[encoding]
    payload = b"".join(f"line {i}: the quick brown fox\n".encode() for i in range(500))
    compressed = compress(payload)
    third = len(compressed) // 3
    parts = [compressed[:third], compressed[third : 2 * third], compressed[2 * third :]]

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        if via == "read":
            await conn.send(response(body=compressed, headers=[("Content-Encoding", header)]))
        else:
            await conn.send(response(headers=[("Content-Encoding", header), *CHUNKED], length=False))
            await conn.send_pieces([chunk(p) for p in parts] + [b"0\r\n\r\n"])

    server = await serve(handler)
    resp = await bounded(client.request("GET", server.url()))
    if via == "read":
        assert await bounded(resp.read()) == payload
    else:
        assert b"".join(await read_by_pieces(resp)) == payload


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_compressed_stream_whose_first_piece_is_one_byte(
    serve: Any, client: UpstreamClient, encoding: str
) -> None:
    header, compress = ENCODINGS[encoding]
    payload = b"data: " + b"token " * 300 + b"\n\n"
    compressed = compress(payload)
    parts = [compressed[:1], compressed[1:20], compressed[20:]]  # a server flushing its compressor early

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(response(headers=[("Content-Encoding", header), *CHUNKED], length=False))
        await conn.send_pieces([chunk(p) for p in parts] + [b"0\r\n\r\n"], gap=0.01)

    server = await serve(handler)
    resp = await bounded(client.request("GET", server.url()))
    assert b"".join(await read_by_pieces(resp)) == payload


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_larger_than_the_socket_buffers_arrives_whole(
    serve: Any, client: UpstreamClient, framing: str
) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: the client has to stop and resume reading the socket
    if framing == "content-length":
        raw = response(body=body)
    else:
        raw = (
            response(headers=CHUNKED, length=False)
            + b"".join(chunk(body[i : i + 100_000]) for i in range(0, len(body), 100_000))
            + b"0\r\n\r\n"
        )
    server = await serve(keep_alive(lambda _req: raw))
    assert await get(client, server.url()) == body
    resp = await bounded(client.request("GET", server.url()))
    assert b"".join(await read_by_pieces(resp)) == body
    resp.release()
    assert server.accepted == 1


async def test_a_large_request_body_is_sent_whole(serve: Any, client: UpstreamClient) -> None:
    body = bytes(range(256)) * 1024
    server = await serve(keep_alive(lambda req: response(body=str(len(req.body)).encode())))
    resp = await bounded(client.request("POST", server.url(), body=body))
    assert await bounded(resp.read()) == str(len(body)).encode()
    [req] = server.requests
    assert req.body == body and req.header("Content-Length") == str(len(body))


async def test_interim_100_continue_is_skipped(serve: Any, client: UpstreamClient) -> None:
    server = await serve(keep_alive(lambda _req: b"HTTP/1.1 100 Continue\r\n\r\n" + response(body=b"real")))
    resp = await bounded(client.request("POST", server.url(), body=b"x"))
    assert resp.status == 200
    assert await bounded(resp.read()) == b"real"


async def test_an_http_1_0_response_without_keep_alive_is_not_reused(serve: Any, client: UpstreamClient) -> None:
    # The server would answer a second request on it: only the client's choice decides reuse.
    server = await serve(keep_alive(lambda _req: b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold"))
    assert await get(client, server.url()) == b"old"
    assert client.open_connections == 0
    assert await get(client, server.url()) == b"old"
    assert server.accepted == 2


# --------------------------------------------------------------------------- keep-alive and the pool


async def test_keep_alive_reuses_one_connection_until_the_server_says_close(serve: Any, client: UpstreamClient) -> None:
    def answer(req: Request) -> bytes:
        extra = [("Connection", "close")] if req.target == "/close" else []
        return response(body=req.target.encode(), headers=extra)

    # The server keeps the connection open even after `Connection: close`, so a client that
    # reused it anyway would be seen (one accept instead of two).
    server = await serve(keep_alive(answer))
    for i in range(5):
        assert await get(client, server.url(f"/{i}")) == f"/{i}".encode()
    assert server.accepted == 1
    assert (client.open_connections, client.idle_connections) == (1, 1)

    assert await get(client, server.url("/close")) == b"/close"
    assert server.accepted == 1
    assert client.open_connections == 0
    assert await get(client, server.url("/after")) == b"/after"
    assert server.accepted == 2


async def test_a_pooled_connection_the_server_closed_while_idle_is_replaced(serve: Any, client: UpstreamClient) -> None:
    async def one_per_connection(conn: Conn) -> None:
        if await conn.read_request():
            await conn.send(response(body=b"fresh"))
        conn.close()

    server = await serve(one_per_connection)
    assert await get(client, server.url()) == b"fresh"
    await wait_for_state(lambda: server.open_now == 0)
    await asyncio.sleep(0.02)  # the FIN reaches the client's socket
    assert await get(client, server.url()) == b"fresh"
    assert server.accepted == 2


@pytest.mark.parametrize("how", ["eof", "reset"])
async def test_a_reused_connection_closed_before_any_response_byte_is_retried_once(
    serve: Any, client: UpstreamClient, how: str
) -> None:
    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.read_request()
            await conn.send(response(body=b"first"))
            # The race a pooled connection loses: the server times it out just as it is reused.
            await conn.read_request()
            conn.reset() if how == "reset" else conn.close()
            return
        await keep_alive(lambda req: response(body=b"retried:" + req.body))(conn)

    server = await serve(handler)
    assert await get(client, server.url()) == b"first"
    resp = await bounded(client.request("POST", server.url(), body=b"payload"))
    assert await bounded(resp.read()) == b"retried:payload"
    assert server.accepted == 2
    assert [len(c.requests) for c in server.connections] == [2, 1]


async def test_the_stale_connection_retry_happens_once_and_a_fresh_connection_is_not_retried(
    serve: Any, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.read_request()
            await conn.send(response(body=b"first"))
        await conn.read_request()
        conn.close()

    server = await serve(handler)
    assert await get(client, server.url()) == b"first"
    with pytest.raises(UpstreamConnectionError):
        await bounded(client.request("GET", server.url()))
    assert server.accepted == 2
    with pytest.raises(UpstreamConnectionError):
        await bounded(client.request("GET", server.url()))
    assert server.accepted == 3


async def test_the_retry_uses_a_new_connection_even_with_another_stale_one_pooled(
    serve: Any, client: UpstreamClient
) -> None:
    both_open = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if conn.index >= 2:
            return await ok(b"new")(conn)
        await conn.read_request()
        if conn.index == 1:
            both_open.set()
        await both_open.wait()  # two connections in the pool, not one reused twice
        await conn.send(response(body=b"pooled"))
        # An upstream restart: every pooled connection dies as it is reused.
        await conn.read_request()
        conn.close()

    server = await serve(handler)
    assert list(await bounded(asyncio.gather(get(client, server.url()), get(client, server.url())))) == [b"pooled"] * 2
    assert client.idle_connections == 2
    assert await get(client, server.url()) == b"new"
    assert server.accepted == 3


def held(release: asyncio.Event) -> Handler:
    async def handler(conn: Conn) -> None:
        while await conn.read_request():
            await release.wait()
            await conn.send(response(body=b"done"))

    return handler


async def test_the_pool_opens_at_most_max_connections_and_queued_requests_all_finish(
    serve: Any, make_client: Any
) -> None:
    release = asyncio.Event()
    server = await serve(held(release))
    client = make_client(max_connections=2)
    calls = [asyncio.create_task(get(client, server.url(f"/{i}"))) for i in range(4)]
    await wait_for_state(lambda: server.open_now == 2)
    await asyncio.sleep(0.05)  # room for a third connection, were the bound not kept
    assert (server.accepted, client.open_connections) == (2, 2)
    assert not any(c.done() for c in calls)
    release.set()
    assert await bounded(asyncio.gather(*calls)) == [b"done"] * 4
    assert server.max_open == 2
    assert server.accepted == 2  # the queued requests got the released keep-alive connections


async def test_a_request_waiting_for_a_connection_times_out_at_the_total_deadline(serve: Any, make_client: Any) -> None:
    release = asyncio.Event()
    busy, other = await serve(held(release)), await serve(ok())
    client = make_client(max_connections=1)
    first = asyncio.create_task(get(client, busy.url()))
    await wait_for_state(lambda: busy.open_now == 1)
    # The bound is across hosts: a request for another server waits too.
    for url in (busy.url(), other.url()):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await bounded(client.request("GET", url, timeout=CallTimeout(total=0.3)))
        assert 0.25 <= time.monotonic() - started < 0.8
    assert (busy.accepted, other.accepted) == (1, 0)
    release.set()
    assert await bounded(first) == b"done"


async def test_an_idle_connection_to_one_host_makes_room_for_another(serve: Any, make_client: Any) -> None:
    first, second = await serve(ok(b"one")), await serve(ok(b"two"))
    client = make_client(max_connections=1)
    assert await get(client, first.url()) == b"one"
    assert await get(client, second.url(), timeout=CallTimeout(total=0.5)) == b"two"
    assert client.open_connections == 1
    await wait_for_state(lambda: first.open_now == 0)


async def test_idle_connections_close_after_keepalive_seconds(serve: Any, make_client: Any) -> None:
    server = await serve(ok())
    client = make_client(keepalive_seconds=0.1)
    assert await get(client, server.url()) == b"ok"
    assert client.idle_connections == 1
    await wait_for_state(lambda: server.open_now == 0)  # closed by the client, while idle
    assert (client.open_connections, client.idle_connections) == (0, 0)
    assert await get(client, server.url()) == b"ok"
    assert server.accepted == 2


async def test_a_response_released_before_its_end_closes_its_connection(serve: Any, client: UpstreamClient) -> None:
    sent_head = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(response(body=b"x" * 1000)[:-500])  # the head and half the body
        sent_head.set()
        await conn.read_until_eof()

    server = await serve(handler)
    resp = await bounded(client.request("GET", server.url()))
    await bounded(sent_head.wait())
    resp.release()  # the rest has not arrived: the connection cannot be reused
    assert client.open_connections == 0


async def test_a_stream_released_at_its_last_event_goes_back_to_the_pool(serve: Any, client: UpstreamClient) -> None:
    # An SSE reader stops at `data: [DONE]`; the chunked terminator has arrived by the time it
    # gives the response up, and release reads past it, so the next call reuses the connection
    # (for a hosted API: no new TLS handshake).
    events = [b"data: {}\n\n", b"data: [DONE]\n\n"]
    read_done, sent_end = asyncio.Event(), asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(response(headers=CHUNKED, length=False) + b"".join(chunk(e) for e in events))
        await read_done.wait()
        await conn.send(b"0\r\n\r\n")
        sent_end.set()
        await keep_alive(lambda _req: response(body=b"again"))(conn)

    server = await serve(handler)
    resp = await bounded(client.request("GET", server.url()))
    got = b""
    while b"[DONE]" not in got:
        got += await bounded(resp.readany())
    read_done.set()
    await bounded(sent_end.wait())
    await asyncio.sleep(0.05)  # the terminator reaches the client's buffer, unread
    resp.release()
    assert (client.open_connections, client.idle_connections) == (1, 1)
    assert await get(client, server.url()) == b"again"
    assert server.accepted == 1


def stream_then(end: Callable[[Conn], Awaitable[None]], sent: asyncio.Event) -> Handler:
    """A chunked SSE stream whose last event is sent at once and whose body's end is up to `end`."""
    events = [b"data: {}\n\n", b"data: [DONE]\n\n"]

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(response(headers=CHUNKED, length=False) + b"".join(chunk(e) for e in events))
        sent.set()
        await end(conn)

    return handler


async def read_to_done(resp: UpstreamResponse) -> None:
    got = b""
    while b"[DONE]" not in got:
        got += await bounded(resp.readany())


async def test_a_stream_whose_end_comes_after_its_last_event_is_pooled_once_it_arrives(
    serve: Any, client: UpstreamClient
) -> None:
    # The end comes 50 ms after the last event, when the caller has long given the stream up:
    # release would close the connection (the next call: a new one, a TLS handshake for a hosted
    # API); release_when_done waits for the end in the background and pools the connection.
    async def late_end(conn: Conn) -> None:
        await asyncio.sleep(0.05)
        await conn.send(b"0\r\n\r\n")
        await keep_alive(lambda _req: response(body=b"again"))(conn)

    sent = asyncio.Event()
    server = await serve(stream_then(late_end, sent))
    resp = await bounded(client.request("GET", server.url()))
    await read_to_done(resp)
    resp.release_when_done()  # returns at once: nothing waits for the end
    assert (client.open_connections, client.idle_connections) == (1, 0)
    await wait_for_state(lambda: client.idle_connections == 1)
    assert await get(client, server.url()) == b"again"
    assert server.accepted == 1


async def test_a_stream_end_that_arrives_before_the_wait_begins_is_not_missed(
    serve: Any, client: UpstreamClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The end lands in the buffer after release_when_done looked and before its background wait
    # starts: nothing wakes a reader for bytes already there, so the wait must read first, or the
    # connection sits out the whole grace period (and, with others like it, the pool's limit).
    monkeypatch.setattr(upstream_client, "_TAIL_SECONDS", 30.0)
    sent = asyncio.Event()
    server = await serve(stream_then(lambda conn: conn.read_until_eof(), sent))
    resp = await bounded(client.request("GET", server.url()))
    await read_to_done(resp)
    resp.release_when_done()
    resp._conn.data_received(b"0\r\n\r\n")  # as the protocol would, before the wait runs
    await wait_for_state(lambda: client.idle_connections == 1, limit=0.5)


@pytest.mark.parametrize("then", ["nothing", "more data", "close"])
async def test_a_stream_whose_end_does_not_come_is_closed_not_pooled(
    serve: Any, client: UpstreamClient, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    monkeypatch.setattr(upstream_client, "_TAIL_SECONDS", 0.2)
    monkeypatch.setattr(upstream_client, "_TAIL_BYTES", 1000)

    async def no_end(conn: Conn) -> None:
        if then == "more data":  # a server that keeps sending after it said it was done
            for _ in range(20):
                await conn.send(chunk(b"x" * 100))
        if then != "close":
            await conn.read_until_eof()

    sent = asyncio.Event()
    server = await serve(stream_then(no_end, sent))
    resp = await bounded(client.request("GET", server.url()))
    await read_to_done(resp)
    resp.release_when_done()
    await wait_for_state(lambda: client.open_connections == 0)
    assert client.idle_connections == 0
    assert server.accepted == 1


async def test_client_close_ends_a_stream_end_still_awaited(serve: Any, make_client: Any) -> None:
    client = make_client()
    sent = asyncio.Event()
    server = await serve(stream_then(lambda conn: conn.read_until_eof(), sent))
    resp = await bounded(client.request("GET", server.url()))
    await read_to_done(resp)
    resp.release_when_done()
    await bounded(client.close())
    assert client.open_connections == 0
    await wait_for_state(lambda: not client._tails)  # the waiting task ended, not left pending


async def test_connection_counts_and_close(serve: Any, client: UpstreamClient) -> None:
    server = await serve(ok(b"counted"))
    resp = await bounded(client.request("GET", server.url()))
    assert (client.open_connections, client.idle_connections) == (1, 0)
    assert await bounded(resp.read()) == b"counted"
    resp.release()
    assert (client.open_connections, client.idle_connections) == (1, 1)

    resp = await bounded(client.request("GET", server.url()))
    assert await bounded(resp.readany()) == b"counted"
    assert await bounded(resp.readany()) == b""
    resp.release()
    assert (client.open_connections, client.idle_connections) == (1, 1)
    assert server.accepted == 1

    await client.close()
    assert client.closed
    assert (client.open_connections, client.idle_connections) == (0, 0)
    await wait_for_state(lambda: server.open_now == 0)  # the socket really was closed
    with pytest.raises(RuntimeError):
        await bounded(client.request("GET", server.url()))


async def test_client_close_also_closes_connections_in_use(serve: Any, client: UpstreamClient) -> None:
    server = await serve(keep_alive(lambda _req: response(headers=CHUNKED, length=False) + chunk(b"streaming")))
    resp = await bounded(client.request("GET", server.url()))
    assert await bounded(resp.readany()) == b"streaming"
    await client.close()
    assert client.open_connections == 0
    await wait_for_state(lambda: server.open_now == 0)


async def test_a_cancelled_call_frees_its_connection_and_its_place_in_line(serve: Any, make_client: Any) -> None:
    server = await serve(never_answer)
    client = make_client(max_connections=1)
    waiting_for_head = asyncio.create_task(client.request("GET", server.url()))
    await wait_for_state(lambda: len(server.requests) == 1)
    waiting_for_place = asyncio.create_task(client.request("GET", server.url()))
    await asyncio.sleep(0.02)
    waiting_for_place.cancel()
    waiting_for_head.cancel()
    for task in (waiting_for_place, waiting_for_head):
        with pytest.raises(asyncio.CancelledError):
            await bounded(task)
    assert client.open_connections == 0
    await wait_for_state(lambda: server.open_now == 0)
    # The one place is free again: a call gets it rather than waiting for ever.
    other = await serve(ok(b"free"))
    assert await get(client, other.url(), timeout=CallTimeout(total=0.5)) == b"free"


async def test_response_close_drops_the_connection(serve: Any, client: UpstreamClient) -> None:
    server = await serve(ok())
    resp = await bounded(client.request("GET", server.url()))
    resp.close()
    assert client.open_connections == 0
    await wait_for_state(lambda: server.open_now == 0)


# --------------------------------------------------------------------------- timeouts


async def test_read_timeout_when_the_server_never_answers(serve: Any, client: UpstreamClient) -> None:
    server = await serve(never_answer)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await bounded(client.request("GET", server.url(), timeout=CallTimeout(read=0.2)))
    assert 0.15 <= time.monotonic() - started < 0.8


async def test_total_deadline_while_waiting_for_the_head(serve: Any, client: UpstreamClient) -> None:
    server = await serve(never_answer)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await bounded(client.request("GET", server.url(), timeout=CallTimeout(total=0.3)))
    assert 0.25 <= time.monotonic() - started < 0.8
    assert client.open_connections == 0


async def test_read_timeout_between_two_streamed_chunks(serve: Any, client: UpstreamClient) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(response(headers=CHUNKED, length=False) + chunk(b"one"))
        await asyncio.Event().wait()

    server = await serve(handler)
    resp = await bounded(client.request("GET", server.url(), timeout=CallTimeout(read=0.2)))
    assert await bounded(resp.readany()) == b"one"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await bounded(resp.readany())
    assert 0.15 <= time.monotonic() - started < 0.8


@pytest.mark.parametrize("via", ["read", "readany"])
async def test_total_deadline_cuts_a_slow_body(serve: Any, client: UpstreamClient, via: str) -> None:
    async def trickle(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(response(headers=[("Content-Length", "1000")], length=False))
        for _ in range(100):  # each piece well inside the read timeout; the whole far past the total
            await conn.send(b"x" * 10)
            await asyncio.sleep(0.05)

    server = await serve(trickle)
    started = time.monotonic()
    resp = await bounded(client.request("GET", server.url(), timeout=CallTimeout(total=0.4, read=1.0)))
    with pytest.raises(TimeoutError):
        if via == "read":
            await bounded(resp.read())
        else:
            await read_by_pieces(resp)
    assert 0.35 <= time.monotonic() - started < 0.9


async def test_connect_timeout_when_the_accept_queue_is_full(client: UpstreamClient) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepted: once one connection fills the queue, SYNs are dropped
    port = listener.getsockname()[1]
    _, filler = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await bounded(client.request("GET", f"http://127.0.0.1:{port}/", timeout=CallTimeout(connect=0.2)))
        assert 0.15 <= time.monotonic() - started < 0.8
    finally:
        filler.close()
        listener.close()


async def test_connect_timeout_covers_a_stalled_tls_handshake(serve: Any, client: UpstreamClient) -> None:
    async def silent(conn: Conn) -> None:  # accepts TCP, never says a TLS word
        await asyncio.Event().wait()

    server = await serve(silent)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await bounded(
            client.request("GET", f"https://127.0.0.1:{server.port}/", timeout=CallTimeout(connect=0.2, read=5))
        )
    assert 0.15 <= time.monotonic() - started < 0.8


async def test_connect_timeout_to_a_non_routable_address(client: UpstreamClient) -> None:
    started = time.monotonic()
    try:
        resp = await bounded(client.request("GET", "http://10.255.255.1:81/", timeout=CallTimeout(connect=0.2)))
    except TimeoutError:
        assert time.monotonic() - started < 0.8
        return
    except OSError as exc:
        pytest.skip(f"no route to a non-routable address here, so no timeout to see: {exc!r}")
    resp.close()
    pytest.skip("this sandbox answers connections to 10.255.255.1 (a proxy): no timeout to see")


# --------------------------------------------------------------------------- truncated and malformed responses


TRUNCATED = {
    "content-length": response(headers=[("Content-Length", "100")], length=False) + b"0123456789",
    "chunked": response(headers=CHUNKED, length=False) + chunk(b"0123456789") + b"14\r\nhalf",
}


@pytest.mark.parametrize("framing", TRUNCATED)
@pytest.mark.parametrize("via", ["read", "readany"])
async def test_a_body_cut_short_by_the_server_is_an_error(
    serve: Any, client: UpstreamClient, framing: str, via: str
) -> None:
    async def handler(conn: Conn) -> None:
        if conn.index > 0:
            return await ok(b"whole")(conn)
        await conn.read_request()
        await conn.send(TRUNCATED[framing])
        await asyncio.sleep(0.02)
        conn.close()

    server = await serve(handler)
    resp = await bounded(client.request("GET", server.url()))
    with pytest.raises(UpstreamConnectionError):
        if via == "read":
            await bounded(resp.read())
        else:
            await read_by_pieces(resp)
    resp.release()
    assert client.open_connections == 0
    assert await get(client, server.url()) == b"whole"
    assert server.accepted == 2


async def test_connection_refused_is_a_connection_error_at_once(client: UpstreamClient) -> None:
    with refusing_port() as port:
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            await bounded(client.request("GET", f"http://127.0.0.1:{port}/"))
        assert time.monotonic() - started < 0.5


BAD_HEADS = {
    "not http": b"HELLO\r\n\r\n",
    "status not a number": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "header without a colon": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nNoColonHere\r\n\r\n",
    "200 KB of headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-Pad-%05d: %s\r\n" % (i, b"v" * 90) for i in range(2000))
    + b"Content-Length: 0\r\n\r\n",
    "one 200 KB header": b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 200_000 + b"\r\nContent-Length: 0\r\n\r\n",
    # Past the client's own 64 KiB bound, and small enough to arrive in one read from the socket.
    "one 100 KB header": b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("head", BAD_HEADS, ids=list(BAD_HEADS))
async def test_a_response_that_is_not_http_is_a_protocol_error(serve: Any, client: UpstreamClient, head: str) -> None:
    # The oversized heads end properly: a client with no bound on the head would accept them.
    server = await serve(keep_alive(lambda _req: BAD_HEADS[head]))
    with pytest.raises(UpstreamProtocolError) as caught:
        await bounded(client.request("GET", server.url()))
    assert isinstance(caught.value, UpstreamConnectionError) and isinstance(caught.value, OSError)
    assert client.open_connections == 0


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Note": "a\r\nX-Injected: 1"},
        {"X-Note": "a\nb"},
        {"X-Note": "a\rb"},
        {"X-Note": "a\0b"},
        {"X-Bad\r\nX-Injected": "1"},
        {"X-Bad\0": "1"},
    ],
    ids=["crlf value", "lf value", "cr value", "nul value", "crlf name", "nul name"],
)
async def test_a_header_with_cr_lf_or_nul_is_refused_before_anything_is_sent(
    serve: Any, client: UpstreamClient, headers: dict[str, str]
) -> None:
    async def record(conn: Conn) -> None:
        await conn.read_until_eof()

    server = await serve(record)
    with pytest.raises(ValueError):
        await bounded(client.request("POST", server.url(), body=b"x", headers=headers))
    await asyncio.sleep(0.05)  # bytes sent would have arrived by now
    assert server.received == b""


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_https_with_a_trusted_ca(
    serve: Any, make_client: Any, ca: trustme.CA, tls_server_context: ssl.SSLContext, host: str
) -> None:
    server = await serve(ok(b"over tls"), ssl_context=tls_server_context)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    client = make_client(ssl_context=trusting)
    assert await get(client, server.url("/v1/models", host=host)) == b"over tls"
    assert await get(client, server.url("/v1/models", host=host)) == b"over tls"
    assert server.accepted == 1
    [first, _] = server.requests
    assert first.header("Host") == f"{host}:{server.port}"


async def test_https_with_an_untrusted_certificate_fails_without_leaking_headers(
    serve: Any, client: UpstreamClient, tls_server_context: ssl.SSLContext
) -> None:
    server = await serve(ok(), ssl_context=tls_server_context)
    with pytest.raises((UpstreamConnectionError, ssl.SSLError)) as caught:
        await bounded(
            client.request("GET", server.url(host="localhost"), headers={"Authorization": f"Bearer {SECRET}"})
        )
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)
    assert server.requests == []


# --------------------------------------------------------------------------- credentials


async def test_credentials_are_in_no_error(serve: Any, client: UpstreamClient) -> None:
    secret_headers = {"Authorization": f"Bearer {SECRET}", "X-Api-Key": SECRET}
    garbage = await serve(keep_alive(lambda _req: b"HELLO\r\n\r\n"))
    with refusing_port() as port:
        for url in (f"http://127.0.0.1:{port}/", garbage.url()):
            with pytest.raises(ConnectionError) as caught:
                await bounded(client.request("POST", url, body=b"{}", headers=secret_headers))
            assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)
    with pytest.raises(ValueError) as refused:
        await bounded(client.request("GET", garbage.url(), headers={**secret_headers, "X-Bad": f"{SECRET}\r\n"}))
    assert SECRET not in str(refused.value) and SECRET not in repr(refused.value)
