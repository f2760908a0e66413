"""Slow and stalled clients against a running sidecar: nothing is held for ever.

A connection that never finishes its request head is closed after the header
timeout; a body that stops arriving gets 408 after the body timeout and frees
its buffers; each port holds a bounded number of connections; under a flood of
half-sent requests on the metrics port the probes still answer and the API is
untouched.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from support.harness import base_config, wait_until


def fast_timeouts(sim_url: str, **server: Any) -> dict[str, Any]:
    cfg = base_config(sim_url)
    cfg["server"].update({"headerTimeoutSeconds": 0.5, "bodyTimeoutSeconds": 0.5, **server})
    return cfg


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    # A bound on a hang, not a speed measurement: without the timeout this never returns.
    return await asyncio.wait_for(reader.read(), timeout=10)


async def test_a_slow_header_sender_is_disconnected(sim: Any, start_sidecar: Any) -> None:
    sc = await start_sidecar(fast_timeouts(sim.url))
    for port in (sc.config["server"]["port"], sc.config["server"]["metricsPort"]):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await writer.drain()
        assert await closed_by_server(reader) == b""
        writer.close()


async def test_a_stalled_body_gets_408_and_frees_its_request(sim: Any, start_sidecar: Any) -> None:
    sc = await start_sidecar(fast_timeouts(sim.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.config["server"]["port"])
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4000000\r\n\r\n" + b'{"model": "chat", "messages": [' + b" " * 65536
    )
    await writer.drain()
    answer = await closed_by_server(reader)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    writer.close()
    await wait_until(lambda: sc.sidecar.pipeline.in_flight == 0)
    # A chunked body that never ends is the same.
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.config["server"]["port"])
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\n'
    )
    await writer.drain()
    assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 408")
    writer.close()


async def test_probes_and_api_answer_under_a_flood_of_half_sent_requests(sim: Any, start_sidecar: Any) -> None:
    sc = await start_sidecar(fast_timeouts(sim.url, headerTimeoutSeconds=60, metricsMaxConnections=8, maxConnections=8))
    flood = []
    for _ in range(40):  # five times the bound, each holding a half-sent request
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.config["server"]["metricsPort"])
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        flood.append(writer)
    await asyncio.gather(*(w.drain() for w in flood))
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(sc.ops_url + path) as resp:
                assert resp.status == 200
        client = sc.openai()
        answer = await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
    # The API port refuses past its bound instead of evicting (a stream must not be cut).
    api_flood = []
    for _ in range(8):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.config["server"]["port"])
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        api_flood.append((reader, writer))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.config["server"]["port"])
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await closed_by_server(reader) == b""
    for w in flood + [w for _, w in api_flood] + [writer]:
        w.close()
