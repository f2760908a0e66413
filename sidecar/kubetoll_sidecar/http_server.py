"""The aiohttp runners both ports are served by, and what they log about broken HTTP.

aiohttp logs a request it cannot parse (bare LF line endings, a bad status
line, an oversized header) at ERROR with a traceback whose message holds the
raw bytes it received: the `Authorization` header and the prompt included,
whatever `logPrompts` says. The sidecar's HTTP server logger never passes an
exception's text on: it writes one WARNING line with the peer and the kind of
error, at most once a second (the rest are counted into the next line), so a
client that floods malformed requests cannot flood the log either.
"""

from __future__ import annotations

import logging
import time
from typing import Any

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


def app_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """An AppRunner with the sidecar's settings: no aiohttp access log, the quiet server logger."""
    return web.AppRunner(app, access_log=None, handle_signals=False, logger=_SERVER_LOGGER, **kwargs)
