"""The sidecar process: the API on 127.0.0.1, probes and metrics on a second port, hot reload, drain.

`Sidecar` owns the long-lived parts (budget store, ledger, cache, connection
pools, circuit breakers, metrics) and the current RouterState, which a config
reload replaces in one assignment. The budget store is chosen at start from
`budgetStore.url`: Redis when set (shared by every sidecar of the namespace),
process memory otherwise; changing it takes a restart. `run_sidecar` is the blocking entry used by
`kubetoll sidecar` and `kubetoll run`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubetoll_core.periods import Clock, SystemClock
from kubetoll_core.router_config import RouterConfig, ServerSettings

from . import attribution, inbound, lean_http, tracing
from .access_log import access_log
from .batch_registry import FileRegistry, RedisRegistry
from .batches import BatchManager, owner_id
from .budgets.memory import InMemoryBudgetStore
from .budgets.session_starts import SessionStarts
from .budgets.store import BudgetStore
from .cache.embeddings import embedder_for_backend
from .cache.stage import CacheStage
from .cache.verifiers import verifier_for_policy
from .circuit import BreakerRegistry
from .config_loader import ConfigError, ConfigWatcher, LoadedConfig, load_config
from .context_policy import ContextPolicies, SummaryStore
from .credentials import CredentialStore
from .drain import CLOSE_RESERVE_MAX_SECONDS, Drain, DrainBudget
from .errors import ApiError
from .forwarder import Forwarder
from .header_values import REQUEST_ID_HEADER, usable_request_id
from .hot_routes import HotRoutes
from .http_server import BoundedTCPSite, app_runner
from .inbound.messages import count_tokens
from .inbound.responses import forward_stored
from .ledger import InMemoryLedger, Ledger
from .metrics import Metrics
from .pipeline import Pipeline
from .providers.base import Endpoint
from .replica_load import ReplicaLoads
from .request_parsing import body_deadline, expect_continue, read_json
from .routing import read_pod_labels
from .state import RouterState, SessionPool, build_state
from .workload import WorkloadIdentity

OUTCOME_MAX_BYTES = 16 * 1024  # an outcome report is a few fields
# The API's JSON POSTs: what the API port's own protocol serves (lean_http.py). Not the
# batch and file uploads (multipart, large): those stay aiohttp's.
LEAN_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/kubetoll/v1/outcomes",
)
log = logging.getLogger("kubetoll.sidecar")


class Sidecar:
    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        store: BudgetStore | None = None,
        ledger: Ledger | None = None,
        clock: Clock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        watch: bool = True,
        watch_interval: float = 0.25,
        identity: WorkloadIdentity | None = None,
    ) -> None:
        self.config_path = loaded.path
        # Who spends: the pod's identity the injector passed in the environment, read once.
        self.identity = identity if identity is not None else WorkloadIdentity.from_env()
        self.metrics = metrics or Metrics()
        # Two clocks, injected into every part that measures time: the wall clock for
        # calendar periods and records, the monotonic one for timeouts, leases and breakers.
        self.clock = clock or SystemClock()
        self.monotonic = monotonic
        self.sessions = SessionPool()
        self.breakers = BreakerRegistry(monotonic)
        # In-cluster backends' replicas and their load (replica_load.py), kept across reloads.
        self.replica_loads = ReplicaLoads(self.metrics, monotonic)
        self._loaded = loaded
        self._store_given = store is not None
        self.store: BudgetStore = store or InMemoryBudgetStore(loaded.config.budget_store.max_meters)
        self.ledger: Ledger = ledger or InMemoryLedger()
        self.cache: CacheStage | None = None
        self.credentials = CredentialStore(loaded.config.server.credentials_dir)
        self._redis_clients: list[Any] = []
        self.state: RouterState | None = None
        self.refused: str | None = None  # why the file on disk is not being served
        self.drain = Drain()  # SIGTERM: 503 for new requests, the cut at the deadline (drain.py)
        self._watch = watch
        self._watch_interval = watch_interval
        self._watcher: ConfigWatcher | None = None
        self.pipeline: Pipeline | None = None
        self.batches: BatchManager | None = None  # /v1/files and /v1/batches (batches.py)
        self.tracing: tracing.Tracing = tracing.OFF  # spans of requests and attempts (start builds it)
        self.started_at = time.time()

    def _trace_resource(self, cfg: RouterConfig) -> dict[str, str]:
        """The OpenTelemetry resource attributes naming this sidecar (its pod, as the injector passed it)."""
        ident = self.identity
        attrs = {"k8s.namespace.name": ident.namespace or cfg.namespace, "k8s.pod.name": ident.pod}
        if ident.workload:
            attrs["kubetoll.workload"] = ident.workload
        return {k: v for k, v in attrs.items() if v}

    @property
    def config(self) -> RouterConfig:
        assert self.state is not None
        return self.state.config

    def _serving_state(self) -> RouterState:
        assert self.state is not None
        return self.state

    @property
    def draining(self) -> bool:
        return self.drain.active

    async def start(self) -> None:
        """Builds the first state; raises ConfigError if it cannot (the process then exits)."""
        from . import tokens

        # Only the encodings the backends need, loaded while the rest starts (Redis, batches);
        # awaited before the ports open. `main.run` has usually loaded them already.
        encodings = tokens.load_in_background(tokens.use_encodings_for(b.model for b in self._loaded.config.backends))
        self.state = self._build(self._loaded)
        cfg = self.state.config
        redis_cache_client = None
        redis_client = None
        if cfg.budget_store.url and not self._store_given:
            from kubetoll_core.redis_connect import RedisCredentials, connect_redis

            from .budgets.redis_store import RedisBudgetStore
            from .ledger_redis import RedisLedger

            creds = RedisCredentials.for_store(cfg.budget_store, cfg.server.credentials_dir)
            client = redis_client = connect_redis(cfg.budget_store, creds)
            self._redis_clients.append(client)
            store = RedisBudgetStore(
                client,
                cfg.budget_store,
                cfg.namespace,
                clock=self.clock,
                monotonic=self.monotonic,
                state_dir=cfg.server.state_dir,  # spend and allowance kept across restarts (journal.py)
            )
            await store.start()  # bounded; Redis being away is not fatal (failOpen/failClosed decide)
            self.store, self.ledger = store, RedisLedger(store, client)
            # The cache stores binary vectors: its own client, without response decoding.
            redis_cache_client = connect_redis(cfg.budget_store, creds, decode_responses=False)
            self._redis_clients.append(redis_cache_client)
        # Always present (cheap when no route names a policy), so a reload can add policies.
        self.cache = CacheStage(
            cfg.namespace,
            redis_cache_client,
            self.metrics.registry,
            monotonic=self.monotonic,
            wall=self.clock.time,
            instance=self.identity.pod or None,  # names this sidecar in its reports to the operator
        )
        await self.cache.start()
        self._apply_to_shared_parts(self.state)
        # Traces (telemetry.otlp): read at start like the budget store; OFF imports no OpenTelemetry.
        self.tracing = tracing.build(cfg.telemetry, cfg.server.credentials_dir, self.metrics, self._trace_resource(cfg))
        self.pipeline = Pipeline(
            lambda: self.state,
            self.store,
            self.ledger,
            Forwarder(self.breakers, self.credentials, self.replica_loads, self.tracing),
            self.metrics,
            self.clock,
            self.cache,
            workload=self.identity.workload,
            # Context policies' summaries, shared by the namespace's sidecars through Redis (context_policy.py).
            context=ContextPolicies(
                SummaryStore(cfg.namespace, redis_cache_client, monotonic=self.monotonic, wall=self.clock.time),
                self.credentials,
            ),
            # Session starts, shared the same way (budgets/session_starts.py).
            sessions=SessionStarts(cfg.namespace, redis_cache_client, wall=self.clock.time, monotonic=self.monotonic),
        )
        # Pending batches are kept where the budgets are: in Redis, else on the pod's disk.
        owner = owner_id(self.identity.pod or os.uname().nodename)
        self.batches = BatchManager(
            self._serving_state,
            self.store,
            self.ledger,
            self.metrics,
            self.clock,
            self.credentials,
            RedisRegistry(redis_client, cfg.namespace, owner)
            if redis_client is not None
            else FileRegistry.open(cfg.server.state_dir),
            self.pipeline._estimate_prompt,
            self.pipeline._output_reservation,
            workload=self.identity.workload,
            monotonic=self.monotonic,
        )
        await self.batches.start()
        ident = self.identity
        # Outside a pod no namespace comes from the environment; the config's is the same one in a pod.
        self.metrics.publish_identity(
            ident.namespace or cfg.namespace, ident.pod, ident.service_account, ident.workload
        )
        await asyncio.wrap_future(encodings)
        self._publish_config_metrics()
        self.replica_loads.start()
        if self._watch:
            self._watcher = ConfigWatcher(
                self.config_path, self._on_config_change, self._watch_interval, self._loaded.digest
            )
            self._watcher.start()

    @staticmethod
    def _warm_encodings(state: RouterState) -> None:
        """Load the encodings a reloaded config's backends need (~0.2 s each), not on the first request."""
        from . import tokens

        for name in tokens.encodings_for(b.config.model for b in state.backends.values()):
            tokens.get_encoding(name)

    def _apply_to_shared_parts(self, state: RouterState) -> None:
        """What a config load changes outside RouterState: the kill switches the store
        watches, the cache policies and their embedding backends."""
        self.store.watch_budgets([b.name for b in state.config.budgets])
        self.replica_loads.configure(state.config.backends)
        self.store.apply_settings(state.config.budget_store)
        if self.cache is not None:
            semantic = [p.semantic for p in state.config.cache_policies if p.semantic.enabled]
            # One embedder per backend; its own bound is the longest policy timeout using it (the stage
            # bounds each policy's call by that policy's embeddingTimeoutMs).
            timeouts: dict[str, float] = {}
            for s in semantic:
                if s.embedding_backend in state.backends:
                    timeouts[s.embedding_backend] = max(timeouts.get(s.embedding_backend, 0.0), s.embedding_timeout)
            embedders = {
                name: embedder_for_backend(state.backends[name], self.credentials, timeout)
                for name, timeout in timeouts.items()
            }
            verifiers = {
                p.name: v
                for p in state.config.cache_policies
                if (v := verifier_for_policy(p, state.backends, self.credentials)) is not None
            }
            self.cache.configure(state.config, embedders, verifiers)

    def _build(self, loaded: LoadedConfig) -> RouterState:
        labels = read_pod_labels(loaded.config.server.pod_labels_file)
        return build_state(
            loaded.config,
            loaded.digest,
            self.sessions,
            labels,
            credentials=self.credentials,
            clock=self.clock,
            monotonic=self.monotonic,
        )

    async def _build_off_loop(self, loaded: LoadedConfig) -> RouterState:
        """A reload builds its state in a thread, so requests keep flowing meanwhile.

        The keep-alive pools are made here first: aiohttp sessions belong to the loop.
        """
        for b in loaded.config.backends:
            self.sessions.get(b)
        state = await asyncio.to_thread(self._build, loaded)
        await asyncio.to_thread(self._warm_encodings, state)
        return state

    async def _on_config_change(self, result: LoadedConfig | ConfigError) -> None:
        if isinstance(result, LoadedConfig):
            try:
                new_state = await self._build_off_loop(result)
            except ConfigError as exc:
                result = exc
            except Exception as exc:  # a bug while building: refuse this config, keep serving the last
                log.exception("config %s could not be built", result.path)
                result = ConfigError(f"{result.path}: could not be built ({type(exc).__name__}); see the log")
            else:
                old = self.state
                self._apply_to_shared_parts(new_state)
                from . import tokens

                # Approximate models counted as this config wants (its encodings were warmed with it).
                tokens.use_encodings_for(b.config.model for b in new_state.backends.values())
                self.state = new_state  # new requests see it; requests in flight keep theirs
                self.refused = None
                self.metrics.config_reloads.labels("applied").inc()
                self._publish_config_metrics()
                if old is not None:
                    grace = max((b.timeouts.total for b in old.config.backends), default=300.0)
                    self.sessions.retire_unused(new_state.backends, grace)
                    if (old.config.server.port, old.config.server.metrics_port) != (
                        new_state.config.server.port,
                        new_state.config.server.metrics_port,
                    ):
                        log.warning("config changed the listen ports; they apply at the next restart")
                    live = {"expected_sidecars"}  # applied by the running store (apply_settings)
                    if old.config.budget_store.model_dump(exclude=live) != new_state.config.budget_store.model_dump(
                        exclude=live
                    ):
                        log.warning("config changed budgetStore; the budget store in use stays until the next restart")
                    if old.config.telemetry != new_state.config.telemetry:
                        log.warning("config changed telemetry; the traces in use stay until the next restart")
                log.info(
                    "config applied: %s (revision %s, %d routes, %d backends, %d budgets)",
                    result.path,
                    result.config.revision or result.digest[:12],
                    len(result.config.routes),
                    len(result.config.backends),
                    len(result.config.budgets),
                )
                return
        self.refused = str(result)
        self.metrics.config_reloads.labels("refused").inc()
        self.metrics.config_refused.set(1)
        log.error("config refused, still serving the last good one: %s", result)

    def _publish_config_metrics(self) -> None:
        assert self.state is not None
        self.metrics.config_refused.set(0)
        self.metrics.config_info.clear()
        c = self.state.config
        self.metrics.config_info.labels(c.revision or self.state.digest[:12], c.namespace).set(1)

    async def close(self, timeout: float = CLOSE_RESERVE_MAX_SECONDS) -> None:
        """Return leases and write buffered spend, then stop the rest, within about `timeout` seconds.

        The drain passes what is left of `server.drainSeconds`. The budget store gets the
        time first; the cache's writes in flight get what is left after it (they are optional).
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        if self._watcher:
            await self._watcher.stop()
        if self.batches is not None:
            # Pending batches stay persisted for the next process; a settlement under way finishes.
            await self.batches.close(timeout=max(end - loop.time(), 0.0) / 4)
        await self.store.close(timeout=max(end - loop.time(), 0.0))  # leases back, buffered spend written
        await self.ledger.close()
        if self.cache is not None:
            try:
                # At least a moment, so that with nothing in flight it still stops its sync task.
                await asyncio.wait_for(self.cache.close(), max(end - loop.time(), 0.05))
            except TimeoutError:
                log.warning("cache writes still in flight at shutdown were dropped")
        await self.replica_loads.close()
        await self.sessions.close()
        await self.tracing.close(min(max(end - loop.time(), 0.0), 2.0))  # the spans still queued, if it can
        for client in self._redis_clients:
            try:
                await client.aclose()
            except Exception:  # closing is best effort; the process is ending
                pass

    # ------------------------------------------------------------------ apps

    def api_app(self) -> web.Application:
        # client_max_size is above our own limit so that read_body, not aiohttp, answers 413 in OpenAI's format.
        app = web.Application(client_max_size=1 << 40, middlewares=[self._error_middleware])
        self.drain.install(app)  # in front of the error middleware: it answers new requests while draining
        # expect_handler: a body over the limit gets its 413 instead of `100 Continue`.
        app.router.add_post("/v1/chat/completions", self._chat, expect_handler=self._expect)
        app.router.add_post("/v1/completions", self._completions, expect_handler=self._expect)
        app.router.add_post("/v1/embeddings", self._embeddings, expect_handler=self._expect)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)
        # Inbound APIs (inbound/): OpenAI's Responses API and Anthropic's Messages API, on the same pipeline.
        app.router.add_post("/v1/responses", self._responses, expect_handler=self._expect)
        app.router.add_get("/v1/responses/{response_id}", self._stored_response)
        app.router.add_delete("/v1/responses/{response_id}", self._stored_response)
        app.router.add_post("/v1/messages", self._messages, expect_handler=self._expect)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens, expect_handler=self._expect)
        if self.batches is not None:
            self.batches.add_routes(app.router)  # /v1/files, /v1/batches
        # Spend records of this sidecar, for `kubetoll report`. On the API port (127.0.0.1
        # only), not the metrics port: per-tenant spend must not be readable from the pod network.
        app.router.add_get("/kubetoll/v1/spend", self._spend)
        app.router.add_post("/kubetoll/v1/outcomes", self._outcomes)
        return app

    def ops_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # In the error format of the API the path belongs to (Anthropic's under /v1/messages: inbound/).
        api = inbound.endpoint_for_path(request.path)
        try:
            return await handler(request)
        except ApiError as exc:
            return inbound.error_response(api, exc)
        except web.HTTPNotFound:
            return inbound.error_response(
                api,
                ApiError(
                    404,
                    f"unknown path {request.path}; this router serves the OpenAI API under /v1",
                    "invalid_request_error",
                    "unknown_url",
                ),
            )
        except web.HTTPMethodNotAllowed as exc:
            return inbound.error_response(
                api,
                ApiError(
                    405,
                    f"{request.method} is not allowed on {request.path} "
                    f"(allowed: {', '.join(sorted(exc.allowed_methods))})",
                    "invalid_request_error",
                    "method_not_allowed",
                ),
            )
        except Exception:
            log.exception("internal error on %s", request.path)
            return inbound.error_response(
                api,
                ApiError(500, "internal error in the kubetoll sidecar (see its log)", "server_error", "internal_error"),
            )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, Endpoint.chat)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, Endpoint.completions)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, Endpoint.embeddings)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, Endpoint.responses)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, Endpoint.messages)

    async def _stored_response(self, request: web.Request) -> web.Response:
        """GET/DELETE /v1/responses/{id}: on the backend that stored it. No spend, so not the pipeline."""
        assert self.pipeline is not None and self.state is not None
        return await forward_stored(request, self.state, self.pipeline.stored_responses, self.credentials)

    async def _count_tokens(self, request: web.Request) -> web.Response:
        """POST /v1/messages/count_tokens: the sidecar's estimate; no backend is called, nothing is spent."""
        assert self.state is not None
        server = self.state.config.server
        try:
            async with body_deadline(request, server.body_timeout_seconds):
                body, _ = await read_json(request, server.max_body_bytes)
        except TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive within {server.body_timeout_seconds:g} s",
                "invalid_request_error",
                "request_timeout",
                headers={"Connection": "close"},
            ) from None
        return web.json_response(count_tokens(body, self.state))

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        return await expect_continue(request, self.config.server.max_body_bytes)

    async def _serve(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        # While draining, the drain's middleware answers 503 `draining` before this runs.
        assert self.pipeline is not None
        return await self.pipeline.handle(request, endpoint)

    def _model_entry(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(self.started_at), "owned_by": "kubetoll"}

    async def _models(self, request: web.Request) -> web.Response:
        assert self.state is not None
        data = [self._model_entry(n) for n in self.state.router.names()]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

    async def _model(self, request: web.Request) -> web.Response:
        assert self.state is not None
        name = request.match_info["model"]
        if self.state.router.get(name) is None:
            from .errors import not_found_model

            raise not_found_model(name, self.state.router.names())
        return web.Response(body=orjson.dumps(self._model_entry(name)), content_type="application/json")

    async def _outcomes(self, request: web.Request) -> web.Response:
        """`POST /kubetoll/v1/outcomes`: `{"session_id" or "request_id", "outcome", "value"?}` -> an outcome record.

        The tenant comes from the request's headers as for any request (tenancy). 201 with the record.
        """
        assert self.pipeline is not None and self.state is not None
        body, _ = await read_json(request, OUTCOME_MAX_BYTES)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", "invalid_request_error", "invalid_body")
        session, request_id = body.get("session_id", ""), body.get("request_id", "")
        if session and not attribution.valid_session(session):
            raise ApiError(
                400,
                f"session_id must be 1-{attribution.MAX_SESSION_CHARS} characters of letters, digits and . _ : / -",
                "invalid_request_error",
                "invalid_session",
                "session_id",
            )
        if request_id and not (isinstance(request_id, str) and usable_request_id({REQUEST_ID_HEADER: request_id})):
            raise ApiError(400, "request_id must be a request id", "invalid_request_error", "invalid_id", "request_id")
        if not session and not request_id:
            raise ApiError(
                400, "name the session_id or the request_id the outcome is for", "invalid_request_error", "missing"
            )
        value = body.get("value", 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ApiError(400, "value must be a finite number", "invalid_request_error", "invalid_value", "value")
        name = body.get("outcome")
        parsed = attribution.parse_outcome(name) if isinstance(name, str) and "=" not in name else None
        if parsed is None:
            raise ApiError(
                400,
                f"outcome must be 1-{attribution.MAX_OUTCOME_CHARS} characters of letters, digits and . _ : / -",
                "invalid_request_error",
                "invalid_outcome",
                "outcome",
            )
        state = self.state
        ident = state.tenants.identify(request.headers, {})
        record = self.pipeline.attribution.record_outcome(
            state, ident.tenant, ident.tier, session, request_id, parsed[0], float(value)
        )
        out = {
            "object": "kubetoll.outcome",
            "outcome": record.business_outcome,
            "value": record.outcome_value,
            "session_id": record.session,
            "request_id": record.request_id,
            "tenant": record.tenant,
        }
        return web.json_response(out, status=201, dumps=lambda o: orjson.dumps(o).decode())

    async def _spend(self, request: web.Request) -> web.Response:
        try:
            since = float(request.query.get("since", 0))
            until = float(request.query["until"]) if "until" in request.query else None
        except ValueError:
            raise ApiError(
                400, "since and until must be epoch seconds", "invalid_request_error", None, "since"
            ) from None
        try:
            found = await asyncio.wait_for(self.ledger.read(since, until), 10.0)
        except Exception as exc:
            raise ApiError(
                503,
                f"the spend ledger in Redis cannot be read: {type(exc).__name__}",
                "service_unavailable",
                "ledger_unavailable",
                retry_after=1.0,
            ) from None
        records = [r.to_dict() for r in found]
        return web.Response(
            body=orjson.dumps(
                {
                    "namespace": self.config.namespace,
                    "scope": self.ledger.scope,
                    "records": records,
                    "dropped": self.ledger.dropped,
                }
            ),
            content_type="application/json",
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        self._refresh_gauges()
        return web.Response(body=generate_latest(self.metrics.registry), headers={"content-type": CONTENT_TYPE_LATEST})

    def _refresh_gauges(self) -> None:
        """Gauges computed at scrape time, not per request."""
        assert self.state is not None
        now = self.clock.time()
        m = self.metrics
        m.budget_remaining.clear()
        m.budget_percent.clear()
        for route in self.state.router.names():
            for meter in self.state.meters.for_request(route, "-", "-", now).windows():
                if meter.level != "cap":
                    continue  # tenant levels are per tenant: not labels (cardinality)
                st = self.store.snapshot(meter, now)
                period = meter.label.rsplit("-", 1)[-1]
                m.budget_remaining.labels(meter.budget, meter.level, meter.unit, period).set(st.remaining)
                m.budget_percent.labels(meter.budget, meter.level, meter.unit, period).set(st.percent)
        for name, value in self.store.stats().items():
            m.budget_store.labels(name).set(value)
        # The served config's backends only: a breaker of a removed backend, or of a backend's old
        # endpoint (breakers are kept per name and endpoint), must not speak for the current one.
        m.publish_circuits((name, self.breakers.get(rt.config).state) for name, rt in self.state.backends.items())

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        assert self.state is not None
        detail = {
            "ready": not self.draining,
            "configRevision": self.state.config.revision or self.state.digest[:12],
            "configPath": self.config_path,
            "configRefused": self.refused,
            "routes": self.state.router.names(),
            "draining": self.draining,
            "budgetStore": {
                "kind": self.store.kind,
                # Not a readiness condition: failOpen/failClosed decide per budget while Redis is away.
                "available": self.store.available,
            },
        }
        # A refused newer config does not make the pod unready: it still serves the
        # last good one, and restarting it would lose that. The detail says why.
        return web.json_response(detail, status=200 if not self.draining else 503)


def _stop_on_signals(stop: asyncio.Event | None) -> None:
    """SIGTERM/SIGINT set `stop` (None: remove the handlers). Not on Windows."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            if stop is None:
                loop.remove_signal_handler(sig)
            else:
                loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass


async def listen(
    sidecar: Sidecar, host: str, port: int, metrics_host: str, metrics_port: int
) -> tuple[web.AppRunner, web.AppRunner]:
    """Open the API and the metrics port for a started sidecar: (api runner, metrics runner).

    Both with the header timeout and their connection bounds (http_server.py). The API
    runner is cleaned up by `drain_and_close`, the metrics runner after it.
    """
    cfg = sidecar.config.server
    api = app_runner(sidecar.api_app(), header_timeout=cfg.header_timeout_seconds)
    ops = app_runner(sidecar.ops_app(), header_timeout=cfg.header_timeout_seconds)
    for runner, h, p, limit, evict in (
        (api, host, port, cfg.max_connections, False),
        (ops, metrics_host, metrics_port, cfg.metrics_max_connections, True),
    ):
        await runner.setup()
        protocol = None
        if runner is api:
            hot = HotRoutes.install(api)  # the POST routes without the router's per-request work (hot_routes.py)
            if lean_http.unavailable is not None:
                log.info("the API port's own protocol is off (%s): aiohttp serves it", lean_http.unavailable)
            elif hot is not None and runner.server is not None:
                # The JSON POSTs served by the API port's own protocol, the rest by aiohttp (lean_http.py).
                protocol = lean_http.LeanAPI(
                    api.app,
                    {path: hot.route(path) for path in LEAN_PATHS},
                    runner.server,
                    header_timeout=cfg.header_timeout_seconds,
                    body_limit=lambda: sidecar.config.server.max_body_bytes,
                )
        await BoundedTCPSite(runner, h, p, max_connections=limit, evict_oldest=evict, protocol=protocol).start()
    return api, ops


async def serve(
    sidecar: Sidecar,
    host: str | None = None,
    port: int | None = None,
    metrics_port: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set (or SIGTERM/SIGINT), then drain and close."""
    await sidecar.start()
    cfg = sidecar.config.server
    api_host = host or cfg.host
    if api_host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("API bound to %s: it has no auth of its own, keep it on 127.0.0.1 in a pod", api_host)
    api, ops = await listen(sidecar, api_host, port or cfg.port, cfg.metrics_host, metrics_port or cfg.metrics_port)
    log.info(
        "kubetoll sidecar serving the OpenAI API on http://%s:%d/v1 (metrics and probes on %s:%d), config %s",
        api_host,
        port or cfg.port,
        cfg.metrics_host,
        metrics_port or cfg.metrics_port,
        sidecar.config_path,
    )
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    await stop.wait()
    await drain_and_close(sidecar, api, ops)


async def drain_and_close(sidecar: Sidecar, api: web.BaseRunner, ops: web.BaseRunner) -> None:
    """From SIGTERM to stopped within `server.drainSeconds` (drain.py has the phases).

    Requests in flight finish or are cut, the API port closes, the budget store and
    ledger get the rest of the time to return leases and write spend, and the probe
    port, answering /readyz 503 all along, closes last.
    """
    drain_seconds = sidecar.config.server.drain_seconds
    loop = asyncio.get_running_loop()
    budget = DrainBudget.starting(loop.time(), drain_seconds)
    in_flight = sidecar.drain.begin()
    log.info(
        "draining (server.drainSeconds %g): new requests get 503 draining; %d requests in flight have until "
        "%.2fs from now, then are cut; spend is written and the process exits by %.2fs",
        drain_seconds,
        in_flight,
        budget.handlers_until - budget.started,
        budget.deadline - budget.started,
    )
    await sidecar.drain.run(budget, api)
    await sidecar.close(timeout=budget.close_seconds(loop.time()))
    await ops.cleanup()
    access_log.flush()
    d = sidecar.drain
    log.info(
        "stopped %.2fs after the drain began: %d requests in flight finished, %d cut at the deadline, "
        "%d new requests answered 503 draining",
        loop.time() - budget.started,
        d.finished,
        d.cut,
        d.refused,
    )


def configure_logging(level: str = "INFO") -> None:
    # Plain synchronous stderr for the rare lines (a QueueHandler thread was measured and did
    # not pay off on one core: docs/performance.md); the access line is written its own way.
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # The access line, once a request, skips the logging machinery for the same stream (access_log.py);
    # its lines are batched, and flushed before any other line so the stream stays in order.
    try:
        access_log.write_to(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # a stderr without a descriptor (an embedding program's)
        access_log.write_to(None)
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.addFilter(access_log.flush_before)


async def wait_for_config_file(
    path: str, host: str, port: int, metrics_host: str, metrics_port: int, poll: float = 0.5
) -> bool:
    """Serve "not ready yet" until `path` exists. False if told to stop first.

    In a pod the router ConfigMap is mounted `optional`: a pod created before the
    operator compiled its namespace starts with no file. Exiting would crash-loop
    the pod (and back off for minutes after the file appears); instead the API
    answers 503 `config_pending` in OpenAI's format, /readyz says what it waits
    for, /healthz stays up, and the sidecar starts as soon as the kubelet writes
    the file.
    """
    message = (
        f"the kubetoll sidecar is waiting for its router config ({path}); "
        "the operator writes it from the namespace's resources"
    )

    async def pending(request: web.Request) -> web.Response:
        return ApiError(503, message, "service_unavailable", "config_pending", retry_after=2).response()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"ready": False, "waitingForConfig": path}, status=503)

    api, ops = web.Application(), web.Application()
    api.router.add_route("*", "/{tail:.*}", pending)
    ops.router.add_get("/healthz", healthz)
    ops.router.add_get("/readyz", readyz)
    runners = [
        app_runner(api),
        app_runner(ops),
    ]
    stop = asyncio.Event()
    _stop_on_signals(stop)
    try:
        for runner, h, p in zip(runners, (host, metrics_host), (port, metrics_port)):
            await runner.setup()
            await web.TCPSite(runner, h, p, reuse_address=True).start()
        log.warning("router config %s does not exist yet: waiting for it (API answers 503 config_pending)", path)
        while not os.path.exists(path):  # noqa: ASYNC240 (a stat every `poll` seconds while nothing else runs)
            try:
                await asyncio.wait_for(stop.wait(), poll)
                return False
            except TimeoutError:
                continue
        log.info("router config %s appeared: starting", path)
        return True
    finally:
        for runner in runners:
            await runner.cleanup()
        _stop_on_signals(None)


def run_sidecar(
    config_path: str,
    *,
    host: str | None = None,
    port: int | None = None,
    metrics_port: int | None = None,
    log_level: str = "INFO",
    wait_for_config: bool = False,
) -> int:
    """Blocking entry point. Exit status 2 with a clear message when the config is unusable.

    `wait_for_config`: a missing file is waited for (see `wait_for_config_file`);
    an existing but invalid one still exits 2.
    """
    configure_logging(log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    if wait_for_config and not os.path.exists(config_path):
        defaults = ServerSettings()
        try:
            if not asyncio.run(
                wait_for_config_file(
                    config_path,
                    host or defaults.host,
                    port or defaults.port,
                    defaults.metrics_host,
                    metrics_port or defaults.metrics_port,
                )
            ):
                return 0
        except OSError as exc:
            print(f"kubetoll sidecar: cannot listen: {exc}", file=sys.stderr)
            return 1
    try:
        loaded = load_config(config_path)
    except ConfigError as exc:
        print(f"kubetoll sidecar: cannot start: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(Sidecar(loaded), host, port, metrics_port))
    except ConfigError as exc:
        print(f"kubetoll sidecar: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kubetoll sidecar: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0
