"""A running sidecar on real sockets, for tests: config in a temp file, real upstream simulators."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from kubetoll_core.periods import Clock
from kubetoll_sidecar.config_loader import load_config
from kubetoll_sidecar.server import Sidecar, listen

from .ports import candidate_port

# Still imported by tests/test_budget_commands.py for "a port nothing listens on";
# `support.ports.refusing_port` holds such a port for the test instead. Not a copy: the one helper.
free_port = candidate_port


def base_config(sim_url: str, **overrides: Any) -> dict[str, Any]:
    """A small config: one OpenAI-style backend and one route, on the simulator.

    Its ports are candidates, for a sidecar run as a process of its own (give it the
    ports through `support.ports.start_on_free_port`). `RunningSidecar` ignores them:
    it binds port 0 and writes the ports it got into `config["server"]`.
    """
    cfg: dict[str, Any] = {
        "version": 1,
        "namespace": "test",
        "server": {"port": candidate_port(), "metricsPort": candidate_port(), "drainSeconds": 5},
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


def two_backend_config(sim: Any, sim2: Any, **route: Any) -> dict[str, Any]:
    """`base_config` with a second OpenAI backend on `sim2` after the first in the route's chain (fallback tests)."""
    cfg = base_config(sim.url)
    cfg["backends"].append(
        {
            "name": "secondary",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "endpoint": sim2.url + "/v1",
            "credentials": {"env": "KT_TEST_OPENAI_KEY"},
            "timeouts": {"connect": 1, "firstToken": 2, "total": 5},
        }
    )
    cfg["routes"] = [{"name": "chat", "rules": [{"backends": ["primary", "secondary"]}], **route}]
    return cfg


def in_cluster_llama(sim_url: str, name: str = "gpu") -> dict[str, Any]:
    """An in-cluster Llama backend on the simulator (a model tiktoken ships no tokenizer for), priced by GPU time."""
    return {
        "name": name,
        "provider": "openai-compatible",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "endpoint": sim_url + "/v1",
        "credentials": {"env": "KT_TEST_OPENAI_KEY"},
        "pricing": {"gpuHourlyUSD": 0.36, "tokensPerSecond": 1000},
    }


class SidecarUrls:
    """The API and ops base URLs of a sidecar whose router config is `self.config`."""

    config: dict[str, Any]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['server']['port']}"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.config['server']['metricsPort']}"


class RunningSidecar(SidecarUrls):
    """A sidecar in this process on two ports it bound itself (port 0), written back into `config["server"]`."""

    def __init__(
        self,
        tmp: Path,
        config: dict[str, Any],
        clock: Clock | None = None,
        store: Any = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = tmp / "router.json"
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        self.store = store
        self.sidecar: Sidecar | None = None
        self._runners: list[web.AppRunner] = []

    async def start(self) -> RunningSidecar:
        self.path.write_text(json.dumps(self.config))
        self.sidecar = Sidecar(
            load_config(str(self.path)),
            clock=self.clock,
            monotonic=self.monotonic,
            store=self.store,
            watch_interval=0.1,
        )
        await self.sidecar.start()
        # The same listeners as `kubetoll-sidecar` (header timeout, connection bounds, quiet
        # logger), on port 0: the ports they got are what `url`, `ops_url` and the config say.
        api, ops = await listen(self.sidecar, "127.0.0.1", 0, "127.0.0.1", 0)
        self._runners.extend((api, ops))
        self.config["server"] = {**self.config["server"], "port": _bound_port(api), "metricsPort": _bound_port(ops)}
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


def _bound_port(runner: web.AppRunner) -> int:
    (site,) = runner.sites
    return int(site.port)  # type: ignore[attr-defined]  # BoundedTCPSite reports the port it bound


async def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout:.1f}s")
