"""lean_http.py: the API port's own protocol answers what aiohttp answers, and hands it the rest."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
from aiohttp import web

from kubetoll_sidecar.hot_routes import HotRoutes
from kubetoll_sidecar.http_server import BoundedTCPSite
from kubetoll_sidecar.lean_http import MAX_HEAD, LeanAPI, _Body
from support.harness import base_config, wait_until

LIMIT = 4096


def _app(seen: list[str]) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def post(request: web.Request) -> web.StreamResponse:
        seen.append(type(request).__name__)
        raw = await request.content.read()
        body = json.loads(raw)
        if body.get("fail") == "handled":
            raise ValueError("bad field")
        if body.get("fail") == "bug":
            raise KeyError("past every middleware")
        if body.get("stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(b"data: %d\n\n" % i)
            await resp.write_eof()
            return resp
        if body.get("big"):
            return web.Response(body=b"x" * body["big"], content_type="application/octet-stream")
        if body.get("close"):
            resp = web.json_response({"closing": True})
            resp.force_close()
            return resp
        return web.json_response(
            {"echo": body, "ua": request.headers.get("User-Agent"), "length": request.content_length},
            headers={"X-Echo": "1"},
        )

    async def get(request: web.Request) -> web.StreamResponse:
        seen.append(type(request).__name__)
        return web.json_response({"get": True})

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Prepared"] = "1"

    app = web.Application(middlewares=[errors])
    app.router.add_post("/v1/hot", post)
    app.router.add_get("/v1/hot", get)
    app.on_response_prepare.append(on_prepare)
    return app


class _Served:
    """The test app on a BoundedTCPSite: with the lean protocol in front, or aiohttp's alone."""

    def __init__(self, lean: bool, header_timeout: float = 5.0) -> None:
        self.lean_on = lean
        self.header_timeout = header_timeout
        self.seen: list[str] = []

    async def __aenter__(self) -> _Served:
        self.runner = web.AppRunner(_app(self.seen), access_log=None, keepalive_timeout=self.header_timeout)
        await self.runner.setup()
        protocol = None
        if self.lean_on:
            hot = HotRoutes.install(self.runner)
            assert hot is not None and self.runner.server is not None
            protocol = self.lean = LeanAPI(
                self.runner.app,
                {"/v1/hot": hot.route("/v1/hot")},
                self.runner.server,
                header_timeout=self.header_timeout,
                body_limit=lambda: LIMIT,
            )
        self.site = BoundedTCPSite(self.runner, "127.0.0.1", 0, max_connections=16, protocol=protocol)
        await self.site.start()
        self.port = self.site.port
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    async def exchange(self, *chunks: bytes, pause: float = 0.0, read_for: float = 0.3) -> bytes:
        """Send the chunks (pausing between them) and read until the server closes or goes quiet."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            for i, chunk in enumerate(chunks):
                if i and pause:
                    await asyncio.sleep(pause)
                writer.write(chunk)
                await writer.drain()
            out = b""
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), read_for)
                except TimeoutError:
                    return out
                if not data:
                    return out + b"<closed>"
                out += data
        finally:
            writer.close()


def _post(body: bytes | dict[str, Any], *extra: str, path: str = "/v1/hot") -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", f"Content-Length: {len(raw)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


def _normal(answer: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]+\r\n", b"Date: -\r\n", answer)


CASES: dict[str, list[bytes]] = {
    "plain": [_post({"q": 1})],
    "pipelined": [_post({"q": 1}) + _post({"q": 2}) + _post({"q": 3})],
    "body in a later segment": [_post({"q": 1})[:-5], _post({"q": 1})[-5:]],
    "body in three segments": [
        _post({"q": "y" * 3000})[:-2000],
        _post({"q": "y" * 3000})[-2000:-1000],
        _post({"q": "y" * 3000})[-1000:],
    ],
    "head in pieces": [_post({"q": 1})[:7], _post({"q": 1})[7:30], _post({"q": 1})[30:]],
    "handled error": [_post({"fail": "handled"})],
    "stream": [_post({"stream": True})],
    "connection close": [_post({"q": 1}, "Connection: close")],
    "forced close": [_post({"close": True}) + _post({"q": 2})],
    "keep-alive field": [_post({"q": 1}, "Connection: keep-alive")],
    "utf-8 and odd spacing": [
        _post({"q": 1}).replace(b"Host: x", "Host:x\r\nUser-Agent: \tsdk ünï/1\r\nX-Empty:".encode(), 1)
    ],
    "trailing whitespace": [_post({"q": 1}).replace(b"Host: x", b"Host: x\r\nUser-Agent: sdk/1 \t", 1)],
    "latin-1 byte in a value": [_post({"q": 1}).replace(b"Host: x", b"Host: x\r\nUser-Agent: caf\xe9", 1)],
    "then a GET, then a POST": [_post({"q": 1}) + b"GET /v1/hot HTTP/1.1\r\nHost: x\r\n\r\n" + _post({"q": 2})],
    "chunked": [b'POST /v1/hot HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{"q": 1}\r\n0\r\n\r\n'],
    "expect": [_post({"q": 1}, "Expect: 100-continue")],
    "query string": [_post({"q": 1}, path="/v1/hot?x=1")],
    "other path": [_post({"q": 1}, path="/v1/cold")],
    "HTTP/1.0": [_post({"q": 1}).replace(b"HTTP/1.1", b"HTTP/1.0", 1)],
    "bare LF": [_post({"q": 1}).replace(b"\r\nHost", b"\nHost", 1)],
    "two lengths": [_post({"q": 1}, "Content-Length: 8")],
    "bad length": [_post({"q": 1}).replace(b"Content-Length: 8", b"Content-Length: +8", 1)],
    "control byte in a value": [_post({"q": 1}, "X-Bad: a\x01b")],
    "obs-fold": [_post({"q": 1}, "X-Fold: a\r\n b")],
    "over the body limit": [_post({"q": "x" * LIMIT})],
    "garbage": [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40],
    "long head": [_post({"q": 1}, "X-Long: " + "a" * (MAX_HEAD + 10))],
}
TAKEN = {
    "plain",
    "body in three segments",
    "pipelined",
    "body in a later segment",
    "head in pieces",
    "handled error",
    "stream",
    "connection close",
    "forced close",
    "keep-alive field",
    "utf-8 and odd spacing",
    "latin-1 byte in a value",
}


async def test_every_case_gets_aiohttps_bytes_and_only_plain_posts_are_taken() -> None:
    async with _Served(lean=False) as plain, _Served(lean=True) as lean:
        for name, chunks in CASES.items():
            plain.seen.clear()
            lean.seen.clear()
            before = lean.lean.handed_off
            expected = await plain.exchange(*chunks, pause=0.05)
            got = await lean.exchange(*chunks, pause=0.05)
            assert _normal(got) == _normal(expected), name
            assert expected, name
            handed_off = lean.lean.handed_off - before
            if name in TAKEN:
                assert handed_off == 0 and set(lean.seen) <= {"LeanRequest"}, name
            else:
                assert handed_off == 1, name
            if name == "then a GET, then a POST":
                # the first POST here, the GET and everything after on aiohttp's protocol
                assert lean.seen == ["LeanRequest", "Request", "Request"]


async def test_pipelined_answers_come_back_in_order_with_the_right_bodies() -> None:
    async with _Served(lean=True) as lean:
        got = await lean.exchange(_post({"q": 1}) + _post({"q": 2}) + _post({"q": 3}))
    bodies = [json.loads(b) for b in re.findall(rb"\r\n\r\n(\{.*?\})(?=HTTP/1.1|$)", got)]
    assert [b["echo"]["q"] for b in bodies] == [1, 2, 3]
    assert got.count(b"HTTP/1.1 200 OK") == 3 and got.count(b"X-Prepared: 1") == 3


async def test_a_bug_past_the_middlewares_gets_a_500_and_the_connection_closes() -> None:
    async with _Served(lean=True) as lean:
        got = await lean.exchange(_post({"fail": "bug"}) + _post({"q": 2}))
    assert got.startswith(b"HTTP/1.1 500 Internal Server Error")
    assert got.endswith(b"<closed>") and got.count(b"HTTP/1.1") == 1


async def test_idle_and_slow_connections_are_closed_in_time_and_slow_bodies_read_as_they_come() -> None:
    async with _Served(lean=True, header_timeout=0.5) as lean:
        assert await lean.exchange(b"", read_for=1.5) == b"<closed>"  # idle
        assert await lean.exchange(b"POST /v1/hot HTTP/1.1\r\nHost:", read_for=1.5) == b"<closed>"  # a head not sent
        # a whole head, the body slower than the header timeout: the handler reads it as it comes
        raw = _post({"q": "slow"})
        got = await lean.exchange(raw[:-9], raw[-9:-4], raw[-4:], pause=0.4, read_for=0.3)
        assert b"200 OK" in got and b'"slow"' in got
        assert lean.lean.handed_off == 0 and lean.seen[-1] == "LeanRequest"
        # after an answer the idle timer runs again from the answer
        got = await lean.exchange(_post({"q": 1}), read_for=1.5)
        assert got.count(b"200 OK") == 1 and got.endswith(b"<closed>")


async def test_shutdown_closes_idle_lean_connections_and_lets_one_in_flight_finish() -> None:
    served = _Served(lean=True)
    await served.__aenter__()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(_post({"q": 1}))
    await writer.drain()
    first = await asyncio.wait_for(reader.read(65536), 2)
    assert b"200 OK" in first
    await served.runner.cleanup()
    assert await asyncio.wait_for(reader.read(65536), 2) == b""  # closed by the site's stop
    writer.close()


async def test_a_draining_sidecar_closes_lean_connections_after_the_answer(sim: Any, start_sidecar: Any) -> None:
    sc = await start_sidecar(base_config(sim.url))
    site = next(s for s in sc._runners[0].sites if isinstance(s, BoundedTCPSite))
    assert isinstance(site.protocol, LeanAPI)
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    port = int(sc.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_post(body, path="/v1/chat/completions"))
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 5)
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"x-kubetoll-cost-usd" in answer.lower()
    assert site.protocol.handed_off == 0
    sc.sidecar.drain.begin()
    writer.write(_post(body, path="/v1/chat/completions"))
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 5)
    assert answer.startswith(b"HTTP/1.1 503") and b"Connection: close" in answer
    assert await asyncio.wait_for(reader.read(65536), 5) == b""
    writer.close()


async def test_the_sidecar_serves_its_json_posts_on_the_lean_protocol(sim: Any, start_sidecar: Any) -> None:
    sc = await start_sidecar(base_config(sim.url))
    site = next(s for s in sc._runners[0].sites if isinstance(s, BoundedTCPSite))
    lean = site.protocol
    assert isinstance(lean, LeanAPI)
    assert set(lean.routes) >= {b"/v1/chat/completions", b"/v1/messages", b"/v1/responses", b"/kubetoll/v1/outcomes"}
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            async with session.post(
                sc.url + "/v1/chat/completions",
                json={"model": "chat", "stream": stream, "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Kubetoll-Tenant": "t1"},
            ) as resp:
                text = await resp.text()
                assert resp.status == 200, text
                assert ("[DONE]" in text) is stream
        async with session.get(sc.url + "/v1/models") as resp:  # a GET: aiohttp's on this connection
            assert resp.status == 200
    assert lean.handed_off == 1


def test_the_request_body_reads_once_like_a_whole_stream_reader() -> None:
    body = _Body(b"abcdef")
    assert body.is_eof() and not body.at_eof()
    assert body.read_nowait(2) == b"ab" and body.read_nowait() == b"cdef" and body.read_nowait() == b""
    assert body.at_eof()


async def test_a_client_leaving_mid_upload_is_counted_as_a_disconnect(sim: Any, start_sidecar: Any) -> None:
    # The handler is reading the body as it comes; the client's leaving fails that read, as on aiohttp.
    sc = await start_sidecar(base_config(sim.url))
    port = int(sc.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100000\r\n\r\n{"model": "chat", "messages": ['
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    metrics = sc.sidecar.metrics.requests

    def disconnects() -> float:
        return sum(
            s.value
            for m in metrics.collect()
            for s in m.samples
            if s.name.endswith("_total") and s.labels.get("outcome") == "client_disconnected"
        )

    await wait_until(lambda: disconnects() == 1)


async def test_a_bare_lf_head_is_aiohttps_to_answer_at_once() -> None:
    # No CRLF CRLF ever comes: waiting for one would hold the connection until the header timeout.
    async with _Served(lean=True) as lean:
        got = await lean.exchange(b"POST /v1/hot HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}", read_for=2.0)
    assert got.startswith(b"HTTP/1.") and b" 400 " in got.split(b"\r\n", 1)[0]
    assert lean.lean.handed_off == 1


async def test_a_large_answer_to_a_slow_reader_arrives_whole_before_the_next_pipelined_one() -> None:
    size = 8 * 1024 * 1024  # well past the transport's write buffer: writing pauses, the answer waits
    async with _Served(lean=True) as lean:
        reader, writer = await asyncio.open_connection("127.0.0.1", lean.port)
        writer.write(_post({"big": size}) + _post({"q": 2}))
        await writer.drain()
        await asyncio.sleep(0.3)  # not reading: the server's writes back up
        got = b""
        while got.count(b"HTTP/1.1 200 OK") < 2 or not got.endswith(b"}"):
            data = await asyncio.wait_for(reader.read(1 << 20), 5)
            assert data, got[-200:]
            got += data
        writer.close()
    first, second = got.split(b"HTTP/1.1 200 OK")[1:]
    assert first.count(b"x") == size and b'"q": 2' in second


async def test_an_aiohttp_without_the_internals_it_writes_with_gets_aiohttp_for_everything(
    sim: Any, start_sidecar: Any, monkeypatch: Any
) -> None:
    from kubetoll_sidecar import lean_http

    monkeypatch.setattr(lean_http, "unavailable", "aiohttp lacks _serialize_headers")
    sc = await start_sidecar(base_config(sim.url))
    site = next(s for s in sc._runners[0].sites if isinstance(s, BoundedTCPSite))
    assert site.protocol is None
    async with aiohttp.ClientSession() as session:
        async with session.post(
            sc.url + "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        ) as resp:
            assert resp.status == 200, await resp.text()


async def test_a_flood_of_pipelined_requests_is_answered_in_order_with_a_small_buffer() -> None:
    n = 2000  # ~400 KB of requests in one write: more than the held buffer, so reading pauses and resumes
    async with _Served(lean=True) as lean:
        reader, writer = await asyncio.open_connection("127.0.0.1", lean.port)
        writer.write(b"".join(_post({"q": i}) for i in range(n)))
        await writer.drain()
        got = b""
        while got.count(b"HTTP/1.1 200 OK") < n or not got.endswith(b"}"):
            data = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert data, got[-200:]
            got += data
        writer.close()
    qs = [json.loads(b)["echo"]["q"] for b in re.findall(rb"\r\n\r\n(\{.*?\})(?=HTTP/1.1|$)", got)]
    assert qs == list(range(n))
    assert lean.lean.handed_off == 0
