"""The request pipeline: one OpenAI API call from parse to record.

Stages, in order (DESIGN.md "The request pipeline"):

 1 parse      `request_parsing.parse_request` — OpenAI-style 400/413 on bad input
 2 identify   `TenantResolver.identify` — tenant and tier
 3 route      `CompiledRoute.select` — rule, then the fallback chain
 4 estimate   `tokens.count_*` — prompt tokens; output from max_tokens or the caps
 5 rate       requests/min buckets — 429 + Retry-After
 6 cache      `CacheStage.lookup` — exact, then semantic; a hit is answered here
 7 admit      `reserve_with_policy` — every budget level; reject, downgrade or allow
 8 forward    `Forwarder.forward` — fallback, circuit breakers, streaming
 9 settle     `BudgetStore.settle` — the provider's usage, priced, replaces the
              reservation; the spend-ledger record is appended in the same step
10 record     metrics, one log line, cost headers; the answer is offered to the cache

Each stage is a function or object of its own module; this module only strings
them together and turns their exceptions into OpenAI errors.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from kubetoll_core.periods import Clock
from kubetoll_core.spend_record import SpendRecord

from . import tokens
from .budgets.admission import (
    Admitted,
    MeterSet,
    NoDowngradeBackends,
    Rejected,
    percent_used,
    reserve_with_policy,
    tightest,
)
from .budgets.store import BudgetStore, Hold, Reservation, StoreUnavailable, Suspended
from .cache.replay import StreamAssembler
from .cache.stage import CacheLookup, CacheStage
from .errors import ApiError, not_found_model
from .forwarder import AllBackendsFailed, Forwarded, Forwarder, UpstreamRejected
from .ledger import Ledger
from .metrics import Metrics
from .providers.base import Endpoint, Usage
from .request_parsing import ParsedRequest, parse_request
from .routing import CompiledRoute, RouteContext
from .sse import DONE, encode_event
from .state import DEFAULT_OUTPUT_RESERVATION, RouterState

access_log = logging.getLogger("kubetoll.access")

# Request ids when the app sends none: a random per-process prefix and a counter
# (unique across sidecars and restarts, and cheaper than a uuid4 per request).
_ID_PREFIX = os.urandom(6).hex()
_ids = itertools.count(1)

# Counting a large prompt never seen before takes tiktoken milliseconds (~18 ms for
# 100k tokens, bench/token_estimate.py); from this body size it runs in a worker
# thread (tiktoken releases the GIL) so the event loop keeps serving other requests.
OFFLOAD_COUNT_BYTES = 64 * 1024


@dataclass(slots=True)
class Outcome:
    """What the record stage needs to know about one request."""

    request_id: str
    started: float
    route: str = ""
    tenant: str = ""
    tier: str = ""
    backend: str = ""
    status: int = 200
    outcome: str = "ok"
    usage: Usage | None = None
    cost: float = 0.0
    fallbacks: int = 0
    downgraded: bool = False
    upstream_seconds: float = 0.0
    reason: str = ""
    cache: CacheLookup | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    def __init__(
        self,
        get_state: Any,  # () -> RouterState
        store: BudgetStore,
        ledger: Ledger,
        forwarder: Forwarder,
        metrics: Metrics,
        clock: Clock,
        cache: CacheStage | None = None,
    ) -> None:
        self.get_state = get_state
        self.store = store
        self.ledger = ledger
        self.forwarder = forwarder
        self.metrics = metrics
        self.clock = clock
        self.cache = cache
        # A plain counter, read by the gauge at scrape time (a locked gauge update
        # twice a request cost 1-2% of the CPU).
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: self.in_flight)

    # ------------------------------------------------------------------ entry

    async def handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        state: RouterState = self.get_state()  # this request's config, to the end
        out = Outcome(
            request_id=request.headers.get("x-request-id") or f"{_ID_PREFIX}{next(_ids):010x}",
            started=time.perf_counter(),
        )
        self.in_flight += 1
        try:
            return await self._run(request, endpoint, state, out)
        except ApiError as exc:
            out.status, out.outcome = exc.status, out.outcome if out.outcome != "ok" else "error"
            return exc.response({"x-request-id": out.request_id})
        except asyncio.CancelledError:
            if out.outcome == "ok":  # the client went away before we answered
                out.status, out.outcome = 499, "client_disconnected"
            raise
        finally:
            self.in_flight -= 1
            self._record(out, endpoint)

    async def _run(self, request: web.Request, endpoint: str, state: RouterState, out: Outcome) -> web.StreamResponse:
        # 1 parse
        req = await parse_request(request, endpoint, state.config.server.max_body_bytes)
        # 2 identify
        ident = state.tenants.identify(request.headers, req.body)
        out.tenant, out.tier = ident.tenant, ident.tier
        # 3 route (its rules may match on the estimate, so 4 comes first)
        route = state.router.get(req.model)
        if route is None:
            out.outcome = "unknown_route"
            raise not_found_model(req.model, state.router.names())
        out.route = route.name
        # 4 estimate
        if req.body_size >= OFFLOAD_COUNT_BYTES:
            prompt_tokens = await asyncio.to_thread(self._estimate_prompt, req, state, route)
        else:
            prompt_tokens = self._estimate_prompt(req, state, route)
        rule = route.select(
            RouteContext(
                prompt_tokens, ident.tenant, ident.tier, request.headers, lambda: tokens.last_user_text(req.messages)
            )
        )
        if rule is None:
            out.outcome = "no_rule"
            raise ApiError(
                404,
                f"no rule of route `{route.name}` matches this request",
                "invalid_request_error",
                "no_matching_rule",
                "model",
            )
        output_tokens = self._output_reservation(req, route, state, rule.backends)
        now = self.clock.time()
        meters = state.meters.for_request(route.name, ident.tenant, ident.tier, now)
        self._check_suspended(state, route, out)
        # 5 request rate
        rate_res = await self._admit(
            meters.requests and [Hold(m, 1.0) for m in meters.requests],
            now,
            route,
            out,
            can_downgrade=bool(route.downgrade_chain),
        )
        downgrade = bool(rate_res and rate_res.downgrade)
        if rate_res is not None:
            # The request is counted once admitted (a cache hit counts too): settle at once,
            # so a shared store never holds the count as an open reservation.
            await self._settle(rate_res.reservation, meters, None, 0.0, now, requests=1.0)
        # 6 cache
        if self.cache is not None and route.cache_policy is not None:
            lookup = await self._cache_lookup(request, req, state, route, meters, endpoint, out)
            if lookup.hit is not None:
                return await self._cache_response(request, req, state, lookup, out)
        # Budget-aware downgrade by percent, decided before reserving.
        if not downgrade and route.downgrade_at is not None and meters.windows():
            if percent_used(self.store, meters.windows(), now) >= route.downgrade_at:
                downgrade = True
                self.metrics.downgrades.labels(route.name, "at_percent").inc()
        chain_names = route.downgrade_chain if downgrade else rule.backends
        # 7 admit
        admitted = await self._admit(
            self._holds(meters, state, chain_names, prompt_tokens, output_tokens),
            now,
            route,
            out,
            can_downgrade=bool(route.downgrade_chain),
        )
        if admitted and admitted.downgrade and not downgrade:
            downgrade = True
            chain_names = route.downgrade_chain
            self.metrics.downgrades.labels(route.name, "exhausted").inc()
        out.downgraded = downgrade
        reservation = admitted.reservation if admitted else None
        # 8 forward
        try:
            fwd = await self.forwarder.forward(
                state.chain(chain_names),
                endpoint,
                req.upstream_body,
                req.stream,
                route.fallback_on,
                req.model,
                req.include_usage,
                on_fallback=lambda backend, reason: self.metrics.fallbacks.labels(route.name, backend, reason).inc(),
            )
        except AllBackendsFailed as exc:
            await self._settle(reservation, meters, None, 0.0, now)
            out.outcome, out.fallbacks = "all_backends_failed", len(exc.attempts)
            raise ApiError(
                exc.status(),
                f"every backend of route `{route.name}` failed: " + "; ".join(a.describe() for a in exc.attempts),
                "server_error" if exc.status() != 503 else "service_unavailable",
                "all_backends_failed",
                retry_after=exc.retry_after() or (1.0 if exc.status() == 503 else None),
            ) from None
        except UpstreamRejected as exc:
            await self._settle(reservation, meters, None, 0.0, now)
            out.outcome, out.backend = "upstream_error", exc.attempts[-1].backend
            e = exc.error.openai_error or {}
            raise ApiError(
                exc.error.status,
                str(e.get("message") or exc.error.message),
                str(e.get("type") or "upstream_error"),
                e.get("code"),
                e.get("param"),
                headers={"x-kubetoll-backend": exc.attempts[-1].backend},
            ) from None
        except BaseException:
            await self._settle(reservation, meters, None, 0.0, now)
            raise
        out.backend, out.fallbacks, out.upstream_seconds = fwd.backend.config.name, fwd.fallbacks, fwd.upstream_seconds
        if fwd.stream is not None:
            return await self._stream_response(
                request, req, state, route, meters, reservation, fwd, prompt_tokens, out, now
            )
        # 9 settle
        usage = (
            fwd.usage
            if fwd.usage and fwd.usage.reported
            else Usage(prompt_tokens, _count_body_output(fwd.body, fwd.backend.config.model), reported=False)
        )
        cost = fwd.backend.price.cost(usage)
        out.usage, out.cost = usage, cost
        await self._settle(reservation, meters, usage, cost, self.clock.time(), record=self._spend_record(state, out))
        # 10 record (the rest happens in _record)
        body = fwd.body or {}
        if out.cache is not None and out.cache.should_store and self.cache is not None:
            self.cache.store_soon(out.cache, body, usage, cost)
        return web.Response(
            body=orjson.dumps(body),
            content_type="application/json",
            headers=self._headers(state, meters, out, cost),
        )

    # ------------------------------------------------------------------ stages

    def _estimate_prompt(self, req: ParsedRequest, state: RouterState, route: CompiledRoute) -> int:
        first = route.all_backends[0]
        model = state.backends[first].config.model
        if req.endpoint == Endpoint.chat:
            return tokens.count_chat(req.messages, model, req.body.get("tools"))
        if req.endpoint == Endpoint.completions:
            return tokens.count_prompt(req.body.get("prompt"), model)
        return tokens.count_embedding_input(req.body.get("input"), model)

    def _output_reservation(
        self, req: ParsedRequest, route: CompiledRoute, state: RouterState, chain: tuple[str, ...]
    ) -> int:
        if req.endpoint == Endpoint.embeddings:
            return 0
        asked = req.max_tokens
        cap = route.max_output_tokens
        if cap is not None and (asked is None or asked > cap):
            # The route's cap is enforced upstream, not just reserved.
            req.set_max_tokens(cap)
            asked = cap
        if asked is None:
            limits = [state.backends[n].config.limits.max_output_tokens for n in chain]
            asked = max((x for x in limits if x), default=DEFAULT_OUTPUT_RESERVATION)
        return asked * req.n

    def _check_suspended(self, state: RouterState, route: CompiledRoute, out: Outcome) -> None:
        for b in state.config.budgets:
            if b.covers(route.name) and (b.name in state.suspended_budgets or self.store.is_suspended(b.name)):
                out.outcome = "suspended"
                self.metrics.rejections.labels(route.name, "budget_suspended").inc()
                raise ApiError(403, str(Suspended(b.name)), "permission_denied", "budget_suspended")

    def _holds(
        self, meters: MeterSet, state: RouterState, chain: tuple[str, ...], prompt: int, output: int
    ) -> list[Hold]:
        if not meters.tokens and not meters.usd:
            return []
        est_tokens = float(prompt + output)
        # The chain's dearest backend: fallback must never run past what was reserved.
        est_usd = max(state.backends[n].price.estimate(prompt, output) for n in chain)
        return [Hold(m, est_tokens) for m in meters.tokens] + [Hold(m, est_usd) for m in meters.usd]

    async def _admit(
        self, holds: list[Hold] | None, now: float, route: CompiledRoute, out: Outcome, can_downgrade: bool
    ) -> Admitted | None:
        if not holds:
            return None
        try:
            return await reserve_with_policy(self.store, holds, now, can_downgrade)
        except Rejected as exc:
            out.outcome, out.reason = "rejected", exc.reason
            self.metrics.rejections.labels(route.name, exc.reason).inc()
            raise ApiError(
                429,
                f"budget limit reached: {exc.exhausted}. Retry after {math.ceil(exc.retry_after)}s.",
                "rate_limit_error" if exc.reason.endswith("per_minute") else "insufficient_quota",
                "rate_limit_exceeded" if exc.reason.endswith("per_minute") else "budget_exhausted",
                retry_after=exc.retry_after,
            ) from None
        except NoDowngradeBackends as exc:
            out.outcome, out.reason = "rejected", "no_downgrade_backends"
            self.metrics.rejections.labels(route.name, "no_downgrade_backends").inc()
            raise ApiError(
                429, str(exc), "insufficient_quota", "budget_exhausted", retry_after=exc.exhausted.retry_after or 60.0
            ) from None
        except StoreUnavailable as exc:
            out.outcome, out.reason = "rejected", "store_unavailable"
            self.metrics.rejections.labels(route.name, "store_unavailable").inc()
            raise ApiError(
                503,
                f"budget store unavailable: {exc}",
                "service_unavailable",
                "budget_store_unavailable",
                retry_after=1.0,
            ) from None
        except Suspended as exc:
            out.outcome = "suspended"
            self.metrics.rejections.labels(route.name, "budget_suspended").inc()
            raise ApiError(403, str(exc), "permission_denied", "budget_suspended") from None

    async def _settle(
        self,
        reservation: Reservation | None,
        meters: MeterSet,
        usage: Usage | None,
        cost: float,
        now: float,
        *,
        record: SpendRecord | None = None,
        requests: float = 0.0,
    ) -> None:
        """Settle what was spent, and append its ledger record in the same step.

        Shielded: a client that disconnects must not cancel the settlement of what it
        spent. Spend and record go in one coroutine with no suspension between them,
        so a shared store flushes both in the same batch (its totals and its ledger
        never disagree, even if the process dies right after).
        """
        actual: dict[str, float] = {}
        if reservation is not None:
            if requests:
                actual = {h.meter.key: requests for h in reservation.holds}
            else:
                total = float(usage.total_tokens) if usage else 0.0
                actual = {m.key: total for m in meters.tokens}
                actual.update({m.key: cost for m in meters.usd})
        await asyncio.shield(self._settle_and_record(reservation, actual, now, record))

    async def _settle_and_record(
        self, reservation: Reservation | None, actual: dict[str, float], now: float, record: SpendRecord | None
    ) -> None:
        if reservation is not None:
            await self.store.settle(reservation, actual, now)
        if record is not None:
            self.ledger.append(record)

    def _spend_record(self, state: RouterState, out: Outcome) -> SpendRecord | None:
        u = out.usage
        if u is None or not out.backend:
            return None
        return SpendRecord(
            time=self.clock.time(),
            namespace=state.config.namespace,
            route=out.route or "-",
            backend=out.backend,
            tenant=out.tenant,
            tier=out.tier,
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            cached_tokens=u.cached_tokens,
            cost_usd=out.cost,
            downgraded=out.downgraded,
            fallbacks=out.fallbacks,
            outcome=out.outcome,
            request_id=out.request_id,
        )

    # ------------------------------------------------------------------ cache (stage 6)

    async def _cache_lookup(
        self,
        request: web.Request,
        req: ParsedRequest,
        state: RouterState,
        route: CompiledRoute,
        meters: MeterSet,
        endpoint: str,
        out: Outcome,
    ) -> CacheLookup:
        assert self.cache is not None
        lookup = await self.cache.lookup(
            route.cache_policy, route.name, out.tenant, endpoint, req.upstream_body, request.headers
        )
        out.cache = lookup
        charge = lookup.embedding
        if charge is not None:
            # The semantic lookup's embedding call is spend like any other: counted against
            # this request's budgets (never refused: it already happened) and in the ledger.
            record = CacheStage.embedding_record(
                lookup,
                time_=self.clock.time(),
                namespace=state.config.namespace,
                tenant=out.tenant,
                tier=out.tier,
                request_id=out.request_id,
            )
            holds = [Hold(m, float(charge.usage.total_tokens), enforce=False) for m in meters.tokens]
            holds += [Hold(m, charge.cost_usd, enforce=False) for m in meters.usd]
            reservation = None
            if holds:
                try:
                    reservation = await self.store.reserve(holds, self.clock.time())
                except (StoreUnavailable, Suspended):
                    reservation = None  # the record still goes to the ledger; the store is away
            self.metrics.cost.labels(route.name, charge.backend, out.tier).inc(charge.cost_usd)
            await self._settle(reservation, meters, charge.usage, charge.cost_usd, self.clock.time(), record=record)
        return lookup

    async def _cache_response(
        self, request: web.Request, req: ParsedRequest, state: RouterState, lookup: CacheLookup, out: Outcome
    ) -> web.StreamResponse:
        hit = lookup.hit
        assert hit is not None
        out.outcome = f"cache_hit_{hit.kind}"
        record = CacheStage.spend_record(
            lookup,
            time_=self.clock.time(),
            namespace=state.config.namespace,
            tenant=out.tenant,
            tier=out.tier,
            request_id=out.request_id,
        )
        if record is not None:
            self.ledger.append(record)
        headers = {"x-request-id": out.request_id, **hit.headers()}
        if not req.stream:
            return web.Response(body=hit.json_bytes(), content_type="application/json", headers=headers)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache", **headers})
        try:
            await resp.prepare(request)
            await resp.write(hit.sse_bytes(req.include_usage))
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            out.outcome = "client_disconnected"
        return resp

    async def _stream_response(
        self,
        request: web.Request,
        req: ParsedRequest,
        state: RouterState,
        route: CompiledRoute,
        meters: MeterSet,
        reservation: Reservation | None,
        fwd: Forwarded,
        prompt_tokens: int,
        out: Outcome,
        now: float,
    ) -> web.StreamResponse:
        st = fwd.stream
        assert st is not None
        resp = web.StreamResponse(
            headers={
                "content-type": "text/event-stream",
                "cache-control": "no-cache",
                **self._headers(state, meters, out, None),
            }
        )
        outcome = "ok"
        # The answer is assembled as it streams, to be cached if it ends cleanly.
        assembler = StreamAssembler(req.endpoint) if out.cache is not None and out.cache.should_store else None
        try:
            await resp.prepare(request)
            added_before_first = time.perf_counter() - out.started - out.upstream_seconds
            out.extra["ttfb_added"] = added_before_first
            self.metrics.ttft.labels(out.backend).observe(st.first_chunk_at - st.started)
            await _write_chunks(resp, st.pending, assembler)
            translator = st.translator
            while not translator.done:
                chunk = await st.response.content.readany()
                if not chunk:
                    for ev, data in st.decoder.flush():
                        await _write_chunks(resp, translator.feed(ev, data), assembler)
                    break
                for ev, data in st.decoder.feed(chunk):
                    await _write_chunks(resp, translator.feed(ev, data), assembler)
                if translator.error() is not None:
                    break
            err = translator.error()
            if err is not None or not translator.done:
                outcome = "cut_stream"
                msg = err.message if err else "the upstream stream ended early"
                await resp.write(
                    encode_event(
                        {
                            "error": {
                                "message": f"{out.backend}: {msg}",
                                "type": "server_error",
                                "param": None,
                                "code": "upstream_stream_cut",
                            }
                        }
                    )
                )
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            outcome = "client_disconnected"
            if isinstance(exc, asyncio.CancelledError):
                await self._finish_stream(st, req, state, fwd, prompt_tokens, reservation, meters, out, outcome)
                raise
        except (TimeoutError, OSError, Exception) as exc:  # upstream read failed mid-stream
            outcome = "cut_stream"
            try:
                await resp.write(
                    encode_event(
                        {
                            "error": {
                                "message": f"{out.backend}: upstream stream failed: {type(exc).__name__}",
                                "type": "server_error",
                                "param": None,
                                "code": "upstream_stream_cut",
                            }
                        }
                    )
                )
            except (ConnectionResetError, RuntimeError):
                outcome = "client_disconnected"
        cost = await self._finish_stream(st, req, state, fwd, prompt_tokens, reservation, meters, out, outcome)
        if outcome == "ok" and assembler is not None and self.cache is not None and out.cache is not None:
            body = assembler.body()  # None unless every choice finished
            if body is not None:
                self.cache.store_soon(out.cache, body, out.usage, cost)
        if outcome != "client_disconnected":
            try:
                # An SSE comment: SDKs ignore it, curl users and tests see the final cost.
                await resp.write(f": kubetoll cost_usd={cost:.9f} backend={out.backend}\n\n".encode())
                await resp.write(DONE)
                await resp.write_eof()
            except (ConnectionResetError, RuntimeError):
                out.outcome = "client_disconnected"
        return resp

    async def _finish_stream(
        self,
        st: Any,
        req: ParsedRequest,
        state: RouterState,
        fwd: Forwarded,
        prompt_tokens: int,
        reservation: Reservation | None,
        meters: MeterSet,
        out: Outcome,
        outcome: str,
    ) -> float:
        if out.extra.get("stream_settled"):
            return out.cost
        out.extra["stream_settled"] = True
        st.response.close()
        translator = st.translator
        usage = translator.usage
        if usage is None or not translator.done:
            # No usage from the provider, or a stream cut short: bill for what was sent.
            counted = _count_streamed(translator, fwd.backend.config.model)
            prompt = usage.prompt_tokens if usage and usage.prompt_tokens else prompt_tokens
            cached = usage.cached_tokens if usage else 0
            usage = Usage(prompt, max(counted, usage.completion_tokens if usage else 0), cached, reported=False)
        cost = fwd.backend.price.cost(usage)
        out.usage, out.cost, out.outcome = usage, cost, outcome
        await self._settle(reservation, meters, usage, cost, self.clock.time(), record=self._spend_record(state, out))
        return cost

    # ------------------------------------------------------------------ record

    def _headers(self, state: RouterState, meters: MeterSet, out: Outcome, cost: float | None) -> dict[str, str]:
        h = {
            "x-request-id": out.request_id,
            "x-kubetoll-backend": out.backend,
            "x-kubetoll-fallbacks": str(out.fallbacks),
        }
        if cost is not None:
            h["x-kubetoll-cost-usd"] = f"{cost:.9f}"
        if out.downgraded:
            h["x-kubetoll-downgraded"] = "true"
        if out.cache is not None:
            h["x-kubetoll-cache"] = out.cache.header_value
        t = tightest(self.store, meters.all(), self.clock.time())
        if t is not None:
            m, st = t
            h["x-kubetoll-budget-remaining"] = (
                f"{max(st.remaining, 0):.6f} {m.unit}; scope={m.label}; used={st.percent:.1f}%"
            )
        return h

    def _record(self, out: Outcome, endpoint: str) -> None:
        elapsed = time.perf_counter() - out.started
        added = out.extra.get("ttfb_added", max(elapsed - out.upstream_seconds, 0.0))
        m = self.metrics
        child = m.child
        route = out.route or "-"
        child(m.requests, route, out.backend or "-", out.tier or "-", out.outcome).inc()
        if out.route:
            child(m.added_latency, route).observe(added)
        if out.backend and out.upstream_seconds:
            child(m.upstream_latency, out.backend, endpoint).observe(out.upstream_seconds)
        u = out.usage
        if u is not None and out.backend:
            child(m.tokens, route, out.backend, "input").inc(u.prompt_tokens)
            child(m.tokens, route, out.backend, "output").inc(u.completion_tokens)
            if u.cached_tokens:
                child(m.tokens, route, out.backend, "cached_input").inc(u.cached_tokens)
            child(m.cost, route, out.backend, out.tier).inc(out.cost)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                orjson.dumps(
                    {
                        "request_id": out.request_id,
                        "endpoint": endpoint,
                        "route": out.route,
                        "backend": out.backend,
                        "tier": out.tier,
                        "status": out.status,
                        "outcome": out.outcome,
                        "reason": out.reason or None,
                        "prompt_tokens": u.prompt_tokens if u else 0,
                        "completion_tokens": u.completion_tokens if u else 0,
                        "usage_reported": u.reported if u else None,
                        "cost_usd": round(out.cost, 9),
                        "fallbacks": out.fallbacks,
                        "downgraded": out.downgraded,
                        "added_ms": round(added * 1000, 3),
                        "upstream_ms": round(out.upstream_seconds * 1000, 1),
                    }
                ).decode()
            )


async def _write_chunks(resp: web.StreamResponse, chunks: list[Any], assembler: StreamAssembler | None = None) -> None:
    if not chunks:
        return
    parts = []
    for c in chunks:
        if assembler is not None:
            assembler.feed(c)
        parts.append(b"data: " + c + b"\n\n" if isinstance(c, bytes) else encode_event(c))
    await resp.write(b"".join(parts))


def _count_streamed(translator: Any, model: str) -> int:
    text = getattr(translator, "text", None)
    if text:
        return tokens.count_text("".join(text), model)
    # Providers whose translator keeps only a character count: ~4 characters a token.
    return math.ceil(getattr(translator, "text_chars", 0) / 4)


def _count_body_output(body: dict[str, Any] | None, model: str) -> int:
    """Output tokens of a response whose server reported no usage."""
    if not body:
        return 0
    parts = []
    for c in body.get("choices") or ():
        msg = c.get("message") or {}
        if isinstance(msg.get("content"), str):
            parts.append(msg["content"])
        for tc in msg.get("tool_calls") or ():
            fn = tc.get("function") or {}
            parts.append((fn.get("name") or "") + (fn.get("arguments") or ""))
        if isinstance(c.get("text"), str):
            parts.append(c["text"])
    return tokens.count_text("".join(parts), model) if parts else 0
