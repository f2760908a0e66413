"""A running sidecar on real sockets, for tests: config in a temp file, real upstream simulators."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from kubetoll_core.periods import Clock
from kubetoll_sidecar.config_loader import load_config
from kubetoll_sidecar.server import Sidecar, listen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_config(sim_url: str, **overrides: Any) -> dict[str, Any]:
    """A small config: one OpenAI-style backend and one route, on the simulator."""
    cfg: dict[str, Any] = {
        "version": 1,
        "namespace": "test",
        "server": {"port": free_port(), "metricsPort": free_port(), "drainSeconds": 5},
        "backends": [
            {
                "name": "primary",
                "provider": "openai",
                "model": "gpt-4o",
                "endpoint": sim_url + "/v1",
                "credentials": {"env": "KT_TEST_OPENAI_KEY"},
                "timeouts": {"connect": 1, "firstToken": 2, "total": 5},
            },
        ],
        "routes": [{"name": "chat", "rules": [{"backends": ["primary"]}]}],
    }
    cfg.update(copy.deepcopy(overrides))
    return cfg


class RunningSidecar:
    def __init__(self, tmp: Path, config: dict[str, Any], clock: Clock | None = None, store: Any = None) -> None:
        self.path = tmp / "router.json"
        self.path.write_text(json.dumps(config))
        self.config = config
        self.clock = clock
        self.store = store
        self.sidecar: Sidecar | None = None
        self._runners: list[web.AppRunner] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['server']['port']}"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.config['server']['metricsPort']}"

    async def start(self) -> RunningSidecar:
        self.sidecar = Sidecar(load_config(str(self.path)), clock=self.clock, store=self.store, watch_interval=0.1)
        await self.sidecar.start()
        # The same listeners as `kubetoll-sidecar`: header timeout, connection bounds, quiet logger.
        runners = await listen(
            self.sidecar, "127.0.0.1", self.config["server"]["port"], "127.0.0.1", self.config["server"]["metricsPort"]
        )
        self._runners.extend(runners)
        return self

    def write_config(self, config: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config))
        tmp.replace(self.path)

    async def stop(self) -> None:
        for r in self._runners:
            await r.cleanup()
        if self.sidecar:
            await self.sidecar.close()

    def openai(self, **kw: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused-by-the-sidecar", max_retries=0, **kw)


async def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout:.1f}s")
