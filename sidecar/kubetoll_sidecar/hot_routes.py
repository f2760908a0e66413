"""A direct way in for the API's POST routes, past aiohttp's router.

For every request, aiohttp's `Application` resolves the path through its router
(a coroutine per candidate resource, a match-info object built, bound to the
app and frozen) and looks its middleware chain up in an LRU cache keyed on the
handler and the app tuple. The API's traffic is POSTs to a handful of fixed
paths (`/v1/chat/completions`, `/v1/messages`, ...), all known when the app is
frozen, so this resolves them once: per POST path, the route's match info (built
and frozen the way the router builds it) and its handler already wrapped in the
app's middlewares (drain, then errors). A request is a dictionary lookup on the
same key the router uses (`rel_url.path_safe`) away from its handler.

Everything else goes through the application unchanged: other methods and
paths (GETs, 404 and 405 in the API's error format), and any request with an
`Expect` header, whose expect handler (`100 Continue` or an early 413) the
application runs before the handler. A request taken here sees the same
`match_info`, `app` and response-prepare signal (the drain's hook) as one the
router resolved, which tests/test_hot_routes.py checks against aiohttp itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import PlainResource, UrlMappingMatchInfo

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

log = logging.getLogger("kubetoll.sidecar")


class HotRoutes:
    """The request handler of an API runner's server: fixed POST paths direct, the rest via the app."""

    def __init__(self, app: web.Application, fallback: Handler) -> None:
        if not app.frozen:
            raise RuntimeError("HotRoutes needs the frozen app (after runner.setup())")
        if any(getattr(m, "__middleware_version__", None) != 1 for m in app.middlewares):
            raise RuntimeError("HotRoutes composes new-style middlewares (@web.middleware) only")
        self._fallback = fallback
        self._post: dict[str, tuple[UrlMappingMatchInfo, Handler]] = {}
        for resource in app.router.resources():
            if not isinstance(resource, PlainResource):
                continue  # a path with variables: the router's job
            for route in resource:
                if route.method != hdrs.METH_POST:
                    continue
                info = UrlMappingMatchInfo({}, route)
                info.add_app(app)
                info.freeze()
                handler: Any = route.handler
                # The order aiohttp builds the chain in (Application._prepare_middleware): the first
                # middleware listed is the outermost.
                for middleware in reversed(app.middlewares):
                    handler = partial(middleware, handler=handler)
                self._post.setdefault(resource.canonical, (info, handler))

    @property
    def paths(self) -> list[str]:
        return sorted(self._post)

    def route(self, path: str) -> tuple[UrlMappingMatchInfo, Handler]:
        """A POST path's match info and its handler inside the app's middlewares (lean_http.py calls it)."""
        return self._post[path]

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == hdrs.METH_POST and hdrs.EXPECT not in request.headers:
            hot = self._post.get(request.rel_url.path_safe)
            if hot is not None:
                info, handler = hot
                request._match_info = info  # type: ignore[attr-defined]  # what Application._handle sets
                return await handler(request)
        return await self._fallback(request)

    @classmethod
    def install(cls, runner: web.AppRunner) -> HotRoutes | None:
        """Route `runner`'s server through a HotRoutes of its app (after `setup()`, before a connection).

        None, and the application dispatches everything as before, on an aiohttp whose Request no
        longer keeps its match info where this sets it (`Request.ATTRS` lists what aiohttp sets)."""
        server = runner.server
        if server is None:
            raise RuntimeError("HotRoutes.install needs a runner that has been set up")
        if "_match_info" not in getattr(web.Request, "ATTRS", ()):
            log.info(
                "aiohttp %s keeps a request's match info elsewhere: every request goes through its router",
                aiohttp.__version__,
            )
            return None
        hot = cls(runner.app, server.request_handler)
        server.request_handler = hot
        return hot
