"""RouterState: everything derived from one RouterConfig, built once per load and swapped atomically.

A request takes a reference to the current state when it starts and uses it to
the end, so a reload never changes a request in flight: new requests see the new
state, old ones finish on theirs.

Connection pools outlive reloads (a reload that keeps a backend's endpoint keeps
its warm keep-alive connections); pools no state uses any more are closed after
the longest request could have finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import aiohttp

from kubetoll_core.periods import Clock, SystemClock
from kubetoll_core.prices import PricingError, resolve_price
from kubetoll_core.router_config import Backend, RouterConfig

from .attribution import AttributionPolicy
from .budgets.admission import BudgetMeters
from .config_loader import ConfigError
from .credentials import CredentialStore
from .forwarder import BackendRuntime
from .routing import Router
from .tenancy import TenantResolver
from .upstream_client import UpstreamClient

log = logging.getLogger("kubetoll.state")

# Output reservation when neither the request, the route nor the backend caps it.
DEFAULT_OUTPUT_RESERVATION = 4096


@dataclass(slots=True)
class RouterState:
    config: RouterConfig
    digest: str
    router: Router
    tenants: TenantResolver
    meters: BudgetMeters
    backends: dict[str, BackendRuntime]
    suspended_budgets: frozenset[str]
    attribution: AttributionPolicy  # the tag keys each route accepts
    # Budget name -> its exhaustedResponse (what onExhausted respond answers).
    exhausted_responses: dict[str, str]

    def chain(self, names: tuple[str, ...]) -> list[BackendRuntime]:
        return [self.backends[n] for n in names]

    def model_of(self, backend: str) -> str:
        """The model a backend is called with, for its spend records ("" for none or one this config lacks)."""
        b = self.backends.get(backend)
        return b.config.model if b is not None else ""


class _Pools(NamedTuple):
    """One backend endpoint's two pools."""

    session: aiohttp.ClientSession
    client: UpstreamClient

    async def close(self) -> None:
        await self.session.close()
        await self.client.close()


class SessionPool:
    """The connection pools of each backend endpoint, shared across reloads.

    Two per backend: the lean `UpstreamClient` the forwarder's calls (the hot path) go
    through, and an aiohttp `ClientSession` for the calls off it (embeddings, verifiers,
    batch lines, the Responses passthrough). `maxConnections` bounds each; a session opens
    connections only when such a call is made.
    """

    def __init__(self) -> None:
        self._pools: dict[tuple[str, str, int], _Pools] = {}
        self._closing: set[asyncio.Task] = set()

    def get(self, b: Backend) -> aiohttp.ClientSession:
        return self._pool(b).session

    def client(self, b: Backend) -> UpstreamClient:
        return self._pool(b).client

    def _pool(self, b: Backend) -> _Pools:
        key = (b.name, b.endpoint, b.max_connections)
        pool = self._pools.get(key)
        if pool is None or pool.session.closed or pool.client.closed:
            connector = aiohttp.TCPConnector(
                limit=b.max_connections, limit_per_host=b.max_connections, keepalive_timeout=60, ttl_dns_cache=30
            )
            # auto_decompress off is not wanted: providers gzip large bodies. Cookies are never wanted.
            s = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",)
            )
            pool = _Pools(s, UpstreamClient(max_connections=b.max_connections, keepalive_seconds=60))
            self._pools[key] = pool
        return pool

    def retire_unused(self, in_use: Mapping[str, BackendRuntime], grace: float) -> None:
        used = {id(rt.session) for rt in in_use.values()}
        for key, pool in list(self._pools.items()):
            if id(pool.session) not in used:
                del self._pools[key]
                task = asyncio.create_task(self._close_later(pool, grace))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_later(pool: _Pools, grace: float) -> None:
        await asyncio.sleep(grace)
        await pool.close()

    async def close(self) -> None:
        for t in list(self._closing):
            t.cancel()
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()


def build_state(
    config: RouterConfig,
    digest: str,
    sessions: SessionPool,
    pod_labels: Mapping[str, str],
    *,
    credentials: CredentialStore | None = None,
    clock: Clock | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> RouterState:
    """Everything a request needs from this config. Raises ConfigError; never half-builds.

    `credentials` and the clocks are the sidecar's: the token verifier of `tenancy.jwt`
    reads its HS256 key through the one and checks `exp` on the other.
    """
    prices = {}
    problems = []
    for b in config.backends:
        try:
            prices[b.name] = resolve_price(b)
        except PricingError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    backends = {b.name: BackendRuntime(b, prices[b.name], sessions.get(b), sessions.client(b)) for b in config.backends}
    jwt = None
    if config.tenancy.jwt is not None:
        # Imported here: PyJWT and cryptography cost a sidecar ~8 MB and ~80 ms of start-up.
        from .jwt_identity import JwtVerifier

        store = credentials or CredentialStore(config.server.credentials_dir)
        jwt = JwtVerifier(config.tenancy.jwt, store, clock or SystemClock(), monotonic)  # ConfigError: bad keys
    meters = BudgetMeters(config, pod_labels)  # a budget whose workloadSelector this pod fails is not applied
    applied = {b.name for b in meters.budgets}
    skipped = [b.name for b in config.budgets if b.name not in applied]
    if skipped:
        log.info(
            "%d budgets not applied in this pod (its labels do not match their workloadSelector): %s%s",
            len(skipped),
            ", ".join(skipped[:20]),
            " ..." if len(skipped) > 20 else "",
        )
    return RouterState(
        config=config,
        digest=digest,
        router=Router(config, pod_labels),
        tenants=TenantResolver(config, jwt),
        meters=meters,
        backends=backends,
        suspended_budgets=frozenset(b.name for b in config.budgets if b.suspended),
        attribution=AttributionPolicy(meters.budgets, [r.name for r in config.routes]),
        exhausted_responses={b.name: b.exhausted_response for b in meters.budgets if b.exhausted_response},
    )
