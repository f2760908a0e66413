"""A bare aiohttp pass-through proxy: the reference the sidecar is measured against.

An aiohttp `web` server on 127.0.0.1 and a keep-alive `ClientSession` to the
upstream, on uvloop, and nothing else: no parsing, budgets, metrics or logs. The
sidecar's server half is the same; its upstream half has been its own HTTP/1.1
client since 2026-12-03 (upstream_client.py), which costs less than ClientSession,
so the sidecar's cost above this proxy is an upper bound of its pipeline's.

    python bare_proxy.py UPSTREAM_PORT LISTEN_PORT
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web


async def serve(upstream_port: int, port: int) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=60), skip_auto_headers=("User-Agent",)
    )
    base = f"http://127.0.0.1:{upstream_port}"

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with session.post(base + request.path, data=body, headers={"content-type": "application/json"}) as r:
            data = await r.read()
            return web.Response(body=data, status=r.status, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    await asyncio.Event().wait()


def main() -> None:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(int(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    main()
