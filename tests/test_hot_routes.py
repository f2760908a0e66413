"""hot_routes.py: the API's POST paths taken past the router, with what aiohttp's own dispatch gives."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kubetoll_sidecar.hot_routes import HotRoutes
from kubetoll_sidecar.server import LEAN_PATHS
from support.harness import base_config


def _app(events: list[str]) -> web.Application:
    @web.middleware
    async def outer(request: web.Request, handler: Any) -> web.StreamResponse:
        events.append("outer")
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.json_response({"error": "not found"}, status=404)

    @web.middleware
    async def inner(request: web.Request, handler: Any) -> web.StreamResponse:
        events.append("inner")
        return await handler(request)

    async def post(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return web.json_response(
            {
                "route": request.match_info.route.resource.canonical,  # type: ignore[union-attr]
                "same_app": request.app is app,
                "name": request.match_info.get("name"),
                "echo": body,
            }
        )

    async def named(request: web.Request) -> web.StreamResponse:
        return web.json_response({"name": request.match_info["name"]})

    async def expect(request: web.Request) -> None:
        events.append("expect")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        events.append("prepare")
        response.headers["X-Prepared"] = "1"

    app = web.Application(middlewares=[outer, inner])
    app.router.add_post("/v1/hot", post, expect_handler=expect)
    app.router.add_get("/v1/hot", post)
    app.router.add_post("/v1/items/{name}", named)
    app.on_response_prepare.append(on_prepare)
    return app


class _Served:
    def __init__(self, hot: bool) -> None:
        self.hot = hot
        self.events: list[str] = []
        self.fallback_calls = 0

    async def __aenter__(self) -> _Served:
        self.runner = web.AppRunner(_app(self.events), access_log=None)
        await self.runner.setup()
        if self.hot:
            routes = HotRoutes.install(self.runner)
            assert routes is not None
            inner = routes._fallback

            async def counting(request: web.BaseRequest) -> web.StreamResponse:
                self.fallback_calls += 1
                return await inner(request)

            routes._fallback = counting
            self.routes = routes
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


REQUESTS: list[tuple[str, str, dict[str, str]]] = [
    ("POST", "/v1/hot", {}),  # the hot path
    ("POST", "/v1/hot", {"Expect": "100-continue"}),  # its expect handler: via the app
    ("GET", "/v1/hot", {}),
    ("POST", "/v1/items/a", {}),  # a variable path: the router's
    ("POST", "/v1/hot/", {}),  # not the same path
    ("POST", "/v1/nope", {}),
    ("PUT", "/v1/hot", {}),  # 405
]


async def _answers(served: _Served) -> list[tuple[int, bytes, str | None, list[str]]]:
    out = []
    async with aiohttp.ClientSession() as session:
        for method, path, headers in REQUESTS:
            served.events.clear()
            async with session.request(method, served.url + path, json={"q": 1}, headers=headers) as resp:
                out.append((resp.status, await resp.read(), resp.headers.get("X-Prepared"), list(served.events)))
    return out


async def test_every_request_is_answered_as_aiohttps_own_dispatch_answers_it() -> None:
    async with _Served(hot=False) as plain, _Served(hot=True) as hot:
        expected = await _answers(plain)
        got = await _answers(hot)
        assert hot.routes.paths == ["/v1/hot"]
    assert got == expected
    status, body, prepared, events = got[0]
    assert (status, prepared, events) == (200, "1", ["outer", "inner", "prepare"])
    assert json.loads(body) == {"route": "/v1/hot", "same_app": True, "name": None, "echo": {"q": 1}}
    assert got[1][3] == ["expect", "outer", "inner", "prepare"]
    assert [a[0] for a in got[2:]] == [200, 200, 404, 404, 405]


async def test_only_plain_posts_without_expect_skip_the_application() -> None:
    async with _Served(hot=True) as hot:
        await _answers(hot)
        assert hot.fallback_calls == len(REQUESTS) - 1  # all but the first


async def test_an_aiohttp_that_keeps_match_info_elsewhere_gets_the_router_for_everything(monkeypatch) -> None:
    monkeypatch.setattr(web.Request, "ATTRS", web.Request.ATTRS - {"_match_info"})
    runner = web.AppRunner(_app([]), access_log=None)
    await runner.setup()
    try:
        fallback = runner.server.request_handler  # type: ignore[union-attr]
        assert HotRoutes.install(runner) is None
        assert runner.server.request_handler is fallback  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def test_it_needs_a_set_up_runner_and_new_style_middlewares() -> None:
    with pytest.raises(RuntimeError, match="set up"):
        HotRoutes.install(web.AppRunner(web.Application()))
    with pytest.raises(RuntimeError, match="frozen"):
        HotRoutes(web.Application(), HotRoutes.__call__)  # type: ignore[arg-type]


async def test_the_sidecar_takes_its_api_posts_direct(sim: Any, start_sidecar: Any) -> None:
    sc = await start_sidecar(base_config(sim.url))
    api = sc._runners[0]
    routes = api.server.request_handler
    assert isinstance(routes, HotRoutes)
    # every path the API port's own protocol takes (lean_http.py) is one of them: it asks for each at start
    assert set(LEAN_PATHS) <= set(routes.paths)
    assert "/v1/chat/completions" in LEAN_PATHS and "/v1/messages" in LEAN_PATHS
    async with aiohttp.ClientSession() as session:
        async with session.post(
            sc.url + "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Kubetoll-Tenant": "t1"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers.get("X-Kubetoll-Cost-Usd") is not None
