"""The request pipeline: one OpenAI API call from parse to record.

Stages, in order (docs/architecture.md, "The request pipeline"):

 1 parse      `request_parsing.parse_request` — OpenAI-style 400/413 on bad input
 2 identify   `TenantResolver.identify` — tenant and tier
 3 route      `CompiledRoute.select` — rule, then the fallback chain
 4 estimate   `tokens.count_*` — prompt tokens; output from max_tokens or the caps
 5 rate       requests/min buckets — 429 + Retry-After
 6 cache      `CacheStage.lookup` — exact, then semantic; a hit is answered here
 7 admit      `reserve_with_policy` — every budget level; reject, downgrade or allow
 8 forward    `Forwarder.forward` — fallback, circuit breakers; `StreamRelay` streams
 9 settle     `BudgetStore.settle` — the provider's usage, priced, replaces the
              reservation; the spend-ledger record is appended in the same step
10 record     metrics, one log line, cost headers; the answer is offered to the cache

Each stage is a function or object of its own module; this module only strings
them together, passing one `RequestContext` along, and turns their exceptions
into OpenAI errors (or, for an inbound API such as the Responses or Messages
API, into that API's errors: inbound/, which also says how each backend gets
such a request, natively or through chat).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import os
import time
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from kubetoll_core.burn_rate import BurnRates
from kubetoll_core.periods import Clock
from kubetoll_core.spend_record import (
    CONTEXT_SUMMARY_OUTCOME,
    EXHAUSTED_RESPONSE_OUTCOME,
    REFUSAL_OUTCOME,
    SpendRecord,
)

from . import capabilities, context_policy, drain, exhausted_answer, inbound, tokens
from .access_log import access_log
from .attribution import NONE as NO_ATTRIBUTION
from .attribution_stage import AttributionStage
from .budgets.admission import (
    Admitted,
    MeterSet,
    NeverFits,
    NoDowngradeBackends,
    Rejected,
    RespondExhausted,
    burn_exhausts,
    percent_used,
    reserve_with_policy,
    tightest,
)
from .budgets.refusals import RefusalSampler
from .budgets.session_starts import SessionStarts
from .budgets.store import BudgetStore, Hold, Meter, Reservation, StoreUnavailable, Suspended
from .cache.stage import CacheLookup, CacheStage, LookupCharge
from .cascade import combine_holds
from .context import RequestContext
from .errors import ApiError, budget_suspended, not_found_model, store_unavailable
from .forwarder import (
    AllBackendsFailed,
    Forwarded,
    Forwarder,
    Spend,
    UpstreamRejected,
    capabilities_of,
    total_usage,
)
from .header_values import usable_request_id
from .inbound.responses import StoredResponses
from .ledger import Ledger
from .metrics import Metrics
from .providers.base import Endpoint, Usage, upstream_calls
from .request_parsing import ParsedRequest, body_deadline, parse_request
from .routing import CompiledRoute, RouteContext
from .state import DEFAULT_OUTPUT_RESERVATION, RouterState
from .stream_relay import StreamRelay

log = logging.getLogger("kubetoll.sidecar")

# Request ids when the app sends none: a random per-process prefix and a counter
# (unique across sidecars and restarts, and cheaper than a uuid4 per request).
_ID_PREFIX = os.urandom(6).hex()
_ids = itertools.count(1)

# Counting a large prompt never seen before takes tiktoken milliseconds (~18 ms for
# 100k tokens, bench/token_estimate.py); from this body size it runs in a worker
# thread (tiktoken releases the GIL) so the event loop keeps serving other requests.
OFFLOAD_COUNT_BYTES = 64 * 1024


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
        workload: str = "",
        context: context_policy.ContextPolicies | None = None,
        sessions: SessionStarts | None = None,
    ) -> None:
        self.get_state = get_state
        self.store = store
        self.ledger = ledger
        self.forwarder = forwarder
        self.metrics = metrics
        self.clock = clock
        self.cache = cache
        # Context policies' summaries (context_policy.py): shared through Redis when the server gives a client;
        # without one, kept in this sidecar.
        # (No client, so the namespace is never put in a key: any valid name will do.)
        self.context = context or context_policy.ContextPolicies(
            context_policy.SummaryStore("local", None, wall=clock.time), forwarder.credentials
        )
        # The pod's workload (`workload.WorkloadIdentity`): on every record, the access line and the cost metric.
        self.workload = workload
        self.relay = StreamRelay(metrics, cache, self._settle_stream)
        self.refusals = RefusalSampler()  # which refusals get a ledger record
        # Responses API ids an OpenAI backend stored, with that backend: GET/DELETE /v1/responses/{id} go there.
        self.stored_responses = StoredResponses()
        # The namespace caps' spend rates, for downgrade.burnRate (read on the requests of such routes).
        self.burn_rates = BurnRates()
        # Stage 2 (cont.): tags, sessions and outcomes onto records and metrics; its state outlives a config
        # reload (attribution_stage.py).
        self.attribution = AttributionStage(ledger, metrics, clock, workload, sessions)
        # A plain counter, read by the gauge at scrape time (a locked gauge update
        # twice a request cost 1-2% of the CPU).
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: self.in_flight)

    # ------------------------------------------------------------------ entry

    async def handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        ctx = RequestContext(
            request,
            endpoint,
            self.get_state(),
            # One that is not text is not echoed (stage 1 answers 400 for it).
            usable_request_id(request.headers) or f"{_ID_PREFIX}{next(_ids):010x}",
            time.perf_counter(),
        )
        # The request's span, a child of the app's traceparent (tracing.py; a no-op when traces are off).
        trace = self.forwarder.tracing.request(request.headers)
        self.in_flight += 1
        try:
            return await self._run(ctx)
        except RespondExhausted as exc:  # onExhausted respond: the budget's message, as a normal answer
            return await self._exhausted_answer(ctx, exc)
        except ApiError as exc:
            ctx.status, ctx.outcome = exc.status, ctx.outcome if ctx.outcome != "ok" else "error"
            # In the error format of the API called (an inbound API's own: inbound/).
            routed = ctx.target.headers(ctx.cascade) if ctx.target is not None else {}  # its experiment arm
            return inbound.error_response(ctx.endpoint, exc, {"x-request-id": ctx.request_id, **routed})
        except asyncio.CancelledError:
            if ctx.outcome == "ok":  # the client went away before we answered, or the drain deadline came
                ctx.status, ctx.outcome = (503, "drain_cut") if drain.cut_by_drain() else (499, "client_disconnected")
            raise
        except ConnectionResetError:
            # The client went away mid-upload or mid-answer: nobody to answer, nothing to log loudly.
            ctx.status, ctx.outcome = 499, "client_disconnected"
            return web.Response(status=499)
        except Exception:
            # A bug, not the caller's fault: counted and logged as one (type and request id;
            # never the request, which holds the prompt and, from the app, its headers).
            ctx.status, ctx.outcome = 500, "internal_error"
            log.error("internal error on %s (request %s)", ctx.endpoint, ctx.request_id, exc_info=True)
            err = ApiError(
                500,
                f"internal error in the kubetoll sidecar (request {ctx.request_id}; see its log)",
                "server_error",
                "internal_error",
            )
            return inbound.error_response(ctx.endpoint, err, {"x-request-id": ctx.request_id})
        finally:
            self.in_flight -= 1
            ctx.finished = time.perf_counter()
            # The metrics and the access line are written once the answer is out, not before it:
            # the caller does not wait for them. The server writes a whole answer in the step that
            # returns it, so this callback runs after the write (and before the loop reads anything
            # new: callbacks run in the order they were scheduled).
            asyncio.get_running_loop().call_soon(self._record, ctx)
            trace.end(ctx)

    async def _run(self, ctx: RequestContext) -> web.StreamResponse:
        request, state = ctx.request, ctx.state
        # 1 parse
        server = state.config.server
        try:
            # A stalled upload must not hold its buffers and its connection for ever.
            async with body_deadline(request, server.body_timeout_seconds):
                req = ctx.req = await parse_request(request, ctx.endpoint, server.max_body_bytes)
        except TimeoutError:
            ctx.outcome = "body_timeout"
            raise ApiError(
                408,
                f"the request body did not arrive within {server.body_timeout_seconds:g} s",
                "invalid_request_error",
                "request_timeout",
                headers={"Connection": "close"},
            ) from None
        # 2 identify
        ident = state.tenants.identify(request.headers, req.chat_view)
        ctx.tenant, ctx.tier, ctx.tier_source = ident.tenant, ident.tier, ident.tier_source
        # 3 route (its rules may match on the estimate, so 4 comes first)
        route = state.router.get(req.model)
        if route is None:
            ctx.outcome = "unknown_route"
            raise not_found_model(req.model, state.router.names())
        ctx.route, ctx.route_name = route, route.name
        # 2 (cont.) attribution: the tags and session this route accepts, a reported outcome (attribution.py)
        await self.attribution.read(ctx, req.body)
        self._check_budget_available(ctx)
        # 4 estimate
        if req.body_size >= OFFLOAD_COUNT_BYTES:
            ctx.prompt_tokens = await asyncio.to_thread(self._estimate_prompt, req, state, route)
        else:
            ctx.prompt_tokens = self._estimate_prompt(req, state, route)
        # 3 (cont.) the route's context policy: a chat prompt over its limit is trimmed, summarized or refused
        # here, so the rules, the reservation and the upstream all see the prompt that is sent.
        if route.context is not None and ctx.endpoint == Endpoint.chat and ctx.prompt_tokens > 0:
            await self._apply_context(ctx, req, state, route)
        rule = route.select(
            RouteContext(
                ctx.prompt_tokens,
                ident.tenant,
                ident.tier,
                request.headers,
                lambda: tokens.last_user_text(req.messages),
            )
        )
        if rule is None:
            ctx.outcome = "no_rule"
            raise ApiError(
                404,
                f"no rule of route `{route.name}` matches this request",
                "invalid_request_error",
                "no_matching_rule",
                "model",
            )
        # The rule's backends, or this caller's experiment arm (experiments.py).
        target = ctx.target = rule.target(ident.tenant, request.headers)
        try:  # a request no backend of the chain can serve: 400 now, before anything is counted
            capabilities.check_route(
                ctx.endpoint, req.body, route.name, [state.backends[n].config for n in target.backends]
            )
        except ApiError:
            ctx.outcome = "unsupported"
            raise
        output_tokens = self._output_reservation(req, route, state, target.all_backends)
        now = self.clock.time()
        meters = ctx.meters = state.meters.for_request(
            route.name, ident.tenant, ident.tier, now, ctx.attribution.tag_map, ctx.session_meter
        )
        self._check_suspended(ctx)
        # 5 request rate
        can_downgrade = bool(route.downgrade_chain)
        rate_holds = [Hold(m, 1.0) for m in meters.requests] if meters.requests else None
        rate_res = await self._admit(ctx, rate_holds, now, can_downgrade)
        downgrade = bool(rate_res and rate_res.downgrade)
        if downgrade:
            self.metrics.downgrades.labels(route.name, "rate").inc()
        if rate_res is not None:
            # The request is counted once admitted (a cache hit counts too): settle at once,
            # so a shared store never holds the count as an open reservation.
            await self._settle(ctx, rate_res.reservation, None, 0.0, now, requests=1.0)
        # 6 cache
        if self.cache is not None and route.cache_policy is not None:
            lookup = await self._cache_lookup(ctx, route.cache_policy)
            if lookup.hit is not None:
                return await self._cache_response(ctx, lookup)
        # Budget-aware downgrade by percent, decided before reserving.
        if not downgrade and route.downgrade_at is not None and meters.windows():
            if percent_used(self.store, meters.windows(), now) >= route.downgrade_at:
                downgrade = True
                self.metrics.downgrades.labels(route.name, "at_percent").inc()
        # ... and by burn rate: the caps would run out before their periods end at the current pace.
        burn = route.burn_rate
        if burn is not None and (not burn.tiers or ctx.tier in burn.tiers) and meters.windows():
            # Read on every request of such a route (also once downgraded: the rate must stay current).
            if burn_exhausts(self.store, meters.windows(), now, self.burn_rates, burn.window_minutes * 60.0):
                if not downgrade:
                    downgrade = True
                    self.metrics.downgrades.labels(route.name, "burn_rate").inc()
        chain_names = route.downgrade_chain if downgrade else target.backends
        per_choice = output_tokens // max(req.n, 1)  # what each choice's context window must hold besides the prompt
        chain_names = self._within_windows(ctx, chain_names, per_choice, refuse=True)
        # 7 admit (a cascade reserves for every step: each one called is billed, cascade.py)
        ctx.cascade = target.cascade_run(ctx.endpoint, req.stream, downgrade, state.backends)
        if ctx.cascade is not None:
            # Each step keeps the backends whose window holds the prompt; a step with none is passed by
            # (nothing reserved or sent), and the last step is the chain checked above.
            ctx.cascade.fit([self._fitting(ctx, c, per_choice) for c in ctx.cascade.chains[:-1]], chain_names)
        chains = ctx.cascade.chains if ctx.cascade is not None else (chain_names,)
        holds = combine_holds(
            [self._holds(meters, state, c, ctx.prompt_tokens, output_tokens, req.n) for c in chains if c]
        )
        admitted = await self._admit(ctx, holds, now, can_downgrade)
        if admitted and admitted.downgrade and not downgrade:
            downgrade = True
            chain_names, ctx.cascade = route.downgrade_chain, None
            chain_names = self._within_windows(ctx, chain_names, per_choice, refuse=False)
            self.metrics.downgrades.labels(route.name, "exhausted").inc()
        ctx.downgraded = downgrade
        ctx.reservation = admitted.reservation if admitted else None
        # 8 forward
        fwd = await self._forward(ctx, chain_names, now)
        ctx.backend, ctx.fallbacks, ctx.upstream_seconds = fwd.backend.config.name, fwd.fallbacks, fwd.upstream_seconds
        ctx.spillover = _spilled(fwd.attempts)
        self.stored_responses.remember(ctx.endpoint, fwd)
        if fwd.stream is not None:
            return await self.relay.respond(ctx, fwd, self._headers(ctx, None))
        # 9 settle (each upstream call's usage: n of them when the backend fanned `n` out)
        usage, cost = total_usage(fwd.usages), fwd.cost(fwd.usages)
        ctx.usage, ctx.cost = usage, cost
        await self._settle(
            ctx,
            ctx.reservation,
            usage,
            cost,
            self.clock.time(),
            record=self._spend_record(ctx),
            abandoned=fwd.abandoned,
        )
        # 10 record (the rest happens in _record)
        body = fwd.body or {}
        if ctx.cache is not None and ctx.cache.wants_answer and self.cache is not None:
            self.cache.store_soon(ctx.cache, body, usage, cost)
        lookup_cost = ctx.cache.lookup_cost_usd if ctx.cache is not None else 0.0
        headers = self._headers(ctx, cost + sum(s.cost() for s in fwd.abandoned) + lookup_cost + ctx.context_cost)
        return web.Response(body=orjson.dumps(body), content_type="application/json", headers=headers)

    # ------------------------------------------------------------------ stages

    def _estimate_prompt(self, req: ParsedRequest, state: RouterState, route: CompiledRoute) -> int:
        first = route.all_backends[0]
        model = state.backends[first].config.model
        if req.endpoint in (Endpoint.chat, Endpoint.responses, Endpoint.messages):
            # An inbound API's request is counted as its chat equivalent (`messages` is from it).
            return tokens.count_chat(req.messages, model, req.chat_view.get("tools"))
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

    # ------------------------------------------------------------------ context policy (stage 3)

    async def _apply_context(
        self, ctx: RequestContext, req: ParsedRequest, state: RouterState, route: CompiledRoute
    ) -> None:
        policy = route.context
        assert policy is not None
        if policy.summarizer is not None:
            self._check_suspended(ctx)  # a suspended budget's request must not pay for a summary first
        model = state.backends[route.all_backends[0]].config.model
        tools = req.chat_view.get("tools")
        try:
            applied = await self.context.apply(
                policy,
                req.messages,
                lambda msgs: tokens.count_chat(msgs, model, tools),
                ctx.prompt_tokens,
                state.backends,
            )
        except context_policy.DoesNotFit as exc:
            ctx.outcome, ctx.reason = "rejected", "context_length_exceeded"
            self.metrics.rejections.labels(route.name, "context_length_exceeded").inc()
            raise ApiError(400, str(exc), "invalid_request_error", "context_length_exceeded", "messages") from None
        if applied is None:
            return
        req.messages = applied.messages
        req.upstream_body = {**req.upstream_body, "messages": applied.messages}
        ctx.prompt_tokens = applied.after
        ctx.context = context_policy.header(applied.action, applied.saved)
        m = self.metrics
        m.context_tokens_saved.labels(route.name, applied.action).inc(applied.saved)
        summary = applied.summary
        if applied.action == "summary_failed":
            m.context_summaries.labels(route.name, "failed").inc()
        elif summary is not None:
            m.context_summaries.labels(route.name, "cached" if applied.cached else "computed").inc()
        if summary is not None and summary.usage is not None:
            await self._bill_summary(ctx, summary, summary.usage)

    async def _bill_summary(self, ctx: RequestContext, summary: context_policy.Summary, usage: Usage) -> None:
        """The summarizer's call is spend of this request: counted against its budgets (never refused: it
        already happened) and in the ledger, as outcome context_summary (spend, not a request)."""
        now = self.clock.time()
        ctx.meters = ctx.state.meters.for_request(
            ctx.route_name, ctx.tenant, ctx.tier, now, ctx.attribution.tag_map, ctx.session_meter
        )
        holds = [Hold(m, float(usage.total_tokens), enforce=False) for m in ctx.meters.tokens]
        holds += [Hold(m, summary.cost_usd, enforce=False) for m in ctx.meters.usd]
        reservation = None
        if holds:
            try:
                reservation = await self.store.reserve(holds, now)
            except (StoreUnavailable, Suspended):
                reservation = None  # the record still goes to the ledger; the store is away
        record = self._record_of(ctx, now, CONTEXT_SUMMARY_OUTCOME, usage, summary.cost_usd, backend=summary.backend)
        ctx.context_cost += summary.cost_usd
        self.metrics.cost.labels(ctx.route_name, summary.backend, ctx.tier, self.workload).inc(summary.cost_usd)
        self.metrics.tokens.labels(ctx.route_name, summary.backend, "input").inc(usage.prompt_tokens)
        self.metrics.tokens.labels(ctx.route_name, summary.backend, "output").inc(usage.completion_tokens)
        await self._settle(ctx, reservation, usage, summary.cost_usd, now, record=record)

    def _fitting(self, ctx: RequestContext, chain: tuple[str, ...], output: int) -> tuple[str, ...]:
        """The backends of `chain` whose declared context window holds the prompt plus `output` (all of
        them for embeddings, or when none declares a window); () when none does."""
        if ctx.endpoint == Endpoint.embeddings or not chain:
            return chain
        configs = [ctx.state.backends[n].config for n in chain]
        if all(b.limits.context_window is None for b in configs):
            return chain
        return tuple(context_policy.within_windows(configs, ctx.prompt_tokens, output))

    def _within_windows(
        self, ctx: RequestContext, chain: tuple[str, ...], output: int, *, refuse: bool
    ) -> tuple[str, ...]:
        """The chain without the backends whose declared context window cannot hold the prompt plus the
        output reservation (they would only refuse it). None holds it: a 400 when `refuse`, else the chain."""
        fitting = self._fitting(ctx, chain, output)
        if fitting or not chain:
            return fitting
        if not refuse:
            return chain
        configs = [ctx.state.backends[n].config for n in chain]
        ctx.outcome, ctx.reason = "rejected", "context_length_exceeded"
        self.metrics.rejections.labels(ctx.route_name, "context_length_exceeded").inc()
        largest = max(b.limits.context_window or 0 for b in configs)
        raise ApiError(
            400,
            f"the prompt is about {ctx.prompt_tokens} tokens and {output} are reserved for the answer; the largest "
            f"context window of route `{ctx.route_name}`'s backends is {largest} tokens",
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        )

    def _check_budget_available(self, ctx: RequestContext) -> None:
        # Fail closed: a route a budget names is never served without that budget.
        for b in ctx.state.config.unavailable_budgets:
            if b.covers(ctx.route_name):
                ctx.outcome = "budget_unavailable"
                self.metrics.rejections.labels(ctx.route_name, "budget_unavailable").inc()
                detail = f": {b.message}" if b.message else ""
                raise ApiError(
                    503,
                    f"TokenBudget {b.name!r} covering route `{ctx.route_name}` could not be compiled "
                    f"({b.reason}{detail}); the route is refused until the budget is fixed",
                    "budget_unavailable",
                    "budget_unavailable",
                )

    def _check_suspended(self, ctx: RequestContext) -> None:
        state = ctx.state
        for b in state.meters.budgets:  # the budgets that apply in this pod (a workloadSelector may exclude some)
            if b.covers(ctx.route_name) and (b.name in state.suspended_budgets or self.store.is_suspended(b.name)):
                ctx.outcome = "suspended"
                self.metrics.rejections.labels(ctx.route_name, "budget_suspended").inc()
                raise ApiError(403, str(Suspended(b.name)), "permission_denied", "budget_suspended")

    def _holds(
        self, meters: MeterSet, state: RouterState, chain: tuple[str, ...], prompt: int, output: int, n: int = 1
    ) -> list[Hold]:
        if not meters.tokens and not meters.usd:
            return []
        # `output` covers the n choices. A backend without `n` makes one call per choice, each
        # billing the prompt again (and priced on its own: a tiered price depends on one call's prompt).
        calls = {b: upstream_calls(capabilities_of(state.backends[b].config.provider), n) or 1 for b in chain}
        est_tokens = float(max(prompt * calls[b] for b in chain) + output)
        # The chain's dearest backend: fallback must never run past what was reserved.
        est_usd = max(calls[b] * state.backends[b].price.estimate(prompt, output // calls[b]) for b in chain)
        return [Hold(m, est_tokens) for m in meters.tokens] + [Hold(m, est_usd) for m in meters.usd]

    async def _admit(
        self, ctx: RequestContext, holds: list[Hold] | None, now: float, can_downgrade: bool
    ) -> Admitted | None:
        if not holds:
            return None
        route = ctx.route_name
        try:
            return await reserve_with_policy(self.store, holds, now, can_downgrade)
        except Rejected as exc:
            ctx.outcome, ctx.reason = "rejected", exc.reason
            self.metrics.rejections.labels(route, exc.reason).inc()
            self._note_refusal(ctx, exc.exhausted.meter, now)
            per_minute = exc.reason.endswith("per_minute")
            raise ApiError(
                429,
                f"budget limit reached: {exc.exhausted}. Retry after {math.ceil(exc.retry_after)}s.",
                "rate_limit_error" if per_minute else "insufficient_quota",
                "rate_limit_exceeded" if per_minute else "budget_exhausted",
                retry_after=exc.retry_after,
            ) from None
        except NeverFits as exc:
            # Waiting would not help (a 429's Retry-After would send the client back to be refused).
            ctx.outcome, ctx.reason = "rejected", "never_fits"
            self.metrics.rejections.labels(route, "never_fits").inc()
            raise ApiError(400, str(exc), "invalid_request_error", "exceeds_budget_limit", "max_tokens") from None
        except NoDowngradeBackends as exc:
            ctx.outcome, ctx.reason = "rejected", "no_downgrade_backends"
            self.metrics.rejections.labels(route, "no_downgrade_backends").inc()
            self._note_refusal(ctx, exc.exhausted.meter, now)
            raise ApiError(
                429, str(exc), "insufficient_quota", "budget_exhausted", retry_after=exc.exhausted.retry_after or 60.0
            ) from None
        except StoreUnavailable as exc:
            ctx.outcome, ctx.reason = "rejected", "store_unavailable"
            self.metrics.rejections.labels(route, "store_unavailable").inc()
            raise store_unavailable(exc) from None
        except Suspended as exc:
            ctx.outcome = "suspended"
            self.metrics.rejections.labels(route, "budget_suspended").inc()
            raise budget_suspended(exc) from None

    async def _exhausted_answer(self, ctx: RequestContext, exc: RespondExhausted) -> web.StreamResponse:
        """A spent limit with onExhausted respond: its budget's exhaustedResponse, served at no cost."""
        meter, req = exc.exhausted.meter, ctx.req
        message = ctx.state.exhausted_responses.get(meter.budget)
        now = self.clock.time()
        self._note_refusal(ctx, meter, now)  # admission refused on this meter: the operator's status says so
        if message is None or req is None or ctx.endpoint == Endpoint.embeddings:
            # Nothing to answer with (an embedding; a budget without a message, which validation refuses).
            ctx.status, ctx.outcome, ctx.reason = 429, "rejected", "usd"
            err = ApiError(
                429,
                f"budget limit reached: {exc.exhausted}.",
                "insufficient_quota",
                "budget_exhausted",
                retry_after=exc.exhausted.retry_after or 60.0,
            )
            return inbound.error_response(ctx.endpoint, err, {"x-request-id": ctx.request_id})
        ctx.outcome, ctx.backend = EXHAUSTED_RESPONSE_OUTCOME, ""
        self.metrics.exhausted_answers.labels(ctx.route_name, meter.level.partition(":")[0]).inc()
        record = self._no_spend_record(
            ctx, now, EXHAUSTED_RESPONSE_OUTCOME, latency_ms=(time.perf_counter() - ctx.started) * 1000
        )
        self.ledger.append(self.attribution.stamp(ctx, record))
        body = exhausted_answer.render(ctx.endpoint, message, req.model, req.body, req.stream, req.include_usage)
        headers = {
            "x-request-id": ctx.request_id,
            exhausted_answer.EXHAUSTED_HEADER: meter.label,
            "x-kubetoll-cost-usd": "0.000000000",
        }
        return await self._answer_here(ctx, body, headers, req.stream)

    def _note_refusal(self, ctx: RequestContext, meter: Meter, now: float) -> None:
        """A refusal record for the operator's status: which meter refused (a window only), sampled."""
        if meter.kind != "window" or not self.refusals.due(meter.key, now):
            return
        self.ledger.append_refusal(
            self._no_spend_record(
                ctx,
                now,
                REFUSAL_OUTCOME,
                refused_budget=meter.budget,
                refused_meter=meter.key[len(meter.budget) + 1 :],  # the key is "<budget>:<meter name>"
            )
        )

    def _no_spend_record(self, ctx: RequestContext, now: float, outcome: str, **fields: Any) -> SpendRecord:
        """A ledger record of this request that bills nothing (a refusal, an exhausted response, a failure)."""
        return self._record_of(ctx, now, outcome, None, 0.0, **fields)

    def _record_of(
        self, ctx: RequestContext, now: float, outcome: str, usage: Usage | None, cost: float, **fields: Any
    ) -> SpendRecord:
        """A ledger record of this request other than its answer's (`_spend_record`): a call made for it
        (a summary, an unused fan-out or escalated step) or no call at all."""
        backend = fields.pop("backend", "")
        return SpendRecord(
            time=now,
            namespace=ctx.state.config.namespace,
            route=ctx.route_name or "-",
            backend=backend,
            model=ctx.state.model_of(backend),
            tenant=ctx.tenant,
            tier=ctx.tier,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cached_tokens=usage.cached_tokens if usage else 0,
            cost_usd=cost,
            outcome=outcome,
            request_id=ctx.request_id,
            workload=self.workload,
            **fields,
        )

    async def _forward(self, ctx: RequestContext, chain_names: tuple[str, ...], now: float) -> Forwarded:
        req, route = ctx.req, ctx.route
        assert req is not None and route is not None
        # Fan-out calls whose answers were not used: billed however forwarding ends.
        abandoned: list[Spend] = []
        try:
            if ctx.cascade is not None:  # cheaper steps first, each answer checked (cascade.py)
                return await ctx.cascade.run(
                    self.forwarder,
                    ctx.state.chain,
                    ctx.endpoint,
                    req,
                    route.fallback_on,
                    lambda backend, reason: self.metrics.fallbacks.labels(route.name, backend, reason).inc(),
                    ctx.prompt_tokens,
                    abandoned,
                    spillover_depth=route.spillover_depth,
                    on_spillover=lambda backend: self.metrics.spillover.labels(route.name, backend).inc(),
                )
            return await self.forwarder.forward(
                ctx.state.chain(chain_names),
                ctx.endpoint,
                req.upstream_body,
                req.stream,
                route.fallback_on,
                req.model,
                req.include_usage,
                on_fallback=lambda backend, reason: self.metrics.fallbacks.labels(route.name, backend, reason).inc(),
                prompt_tokens=ctx.prompt_tokens,
                abandoned=abandoned,
                spillover_depth=route.spillover_depth,
                on_spillover=lambda backend: self.metrics.spillover.labels(route.name, backend).inc(),
            )
        except AllBackendsFailed as exc:
            ctx.outcome, ctx.fallbacks = "all_backends_failed", len(exc.attempts)
            ctx.spillover = _spilled(exc.attempts)
            last = exc.attempts[-1].backend if exc.attempts else ""
            await self._settle_failed(ctx, now, abandoned, self._failure_record(ctx, last))
            raise ApiError(
                exc.status(),
                f"every backend of route `{route.name}` failed: " + "; ".join(a.describe() for a in exc.attempts),
                "server_error" if exc.status() != 503 else "service_unavailable",
                "all_backends_failed",
                retry_after=exc.retry_after() or (1.0 if exc.status() == 503 else None),
            ) from None
        except UpstreamRejected as exc:
            ctx.outcome, ctx.backend = "upstream_error", exc.attempts[-1].backend
            await self._settle_failed(ctx, now, abandoned, self._failure_record(ctx, ctx.backend))
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
            await self._settle_failed(ctx, now, abandoned)
            raise

    # ------------------------------------------------------------------ settle (stage 9)

    async def _settle(
        self,
        ctx: RequestContext,
        reservation: Reservation | None,
        usage: Usage | None,
        cost: float,
        now: float,
        *,
        record: SpendRecord | None = None,
        requests: float = 0.0,
        abandoned: list[Spend] | None = None,
    ) -> None:
        """Settle what was spent, and append its ledger record in the same step.

        Shielded: a client that disconnects must not cancel the settlement of what it
        spent. Spend and record go in one coroutine with no suspension between them,
        so a shared store flushes both in the same batch (its totals and its ledger
        never disagree, even if the process dies right after). `abandoned` spend (fan-out
        calls whose answers were not used) is settled with it, each with a record of its own.
        """
        records = [record] if record is not None else []
        if abandoned:
            records.extend(self._abandoned_records(ctx, abandoned))
            usage = total_usage([*([usage] if usage else []), *(s.usage for s in abandoned)])
            cost += sum(s.cost() for s in abandoned)
        if ctx.attribution is not NO_ATTRIBUTION:
            records = [self.attribution.stamp(ctx, r) for r in records]
        actual: dict[str, float] = {}
        if reservation is not None:
            if requests:
                actual = {h.meter.key: requests for h in reservation.holds}
            else:
                total = float(usage.total_tokens) if usage else 0.0
                actual = {m.key: total for m in ctx.meters.tokens}
                actual.update({m.key: cost for m in ctx.meters.usd})
        self._settle_and_record(reservation, actual, now, records)

    def _settle_and_record(
        self, reservation: Reservation | None, actual: dict[str, float], now: float, records: list[SpendRecord]
    ) -> None:
        # No await from here to the ledger: a cancel cannot land between settling and recording.
        if reservation is not None:
            self.store.settle(reservation, actual, now)
        for record in records:
            self.ledger.append(record)

    async def _settle_failed(
        self, ctx: RequestContext, now: float, abandoned: list[Spend], record: SpendRecord | None = None
    ) -> None:
        """Forwarding failed: the reservation is released, less what abandoned fan-out calls (and the
        cascade steps before the failing one) spent."""
        if abandoned:
            await self._settle(ctx, ctx.reservation, None, 0.0, self.clock.time(), record=record, abandoned=abandoned)
        else:
            await self._settle(ctx, ctx.reservation, None, 0.0, now, record=record)

    async def _settle_stream(self, ctx: RequestContext, fwd: Forwarded, usages: list[Usage]) -> float:
        """What `StreamRelay` calls once a stream ended (or was cut), with each upstream call's usage:
        settle, record, return what the request cost."""
        ctx.settled = True
        usage, cost = total_usage(usages), fwd.cost(usages)
        ctx.usage, ctx.cost = usage, cost
        await self._settle(
            ctx,
            ctx.reservation,
            usage,
            cost,
            self.clock.time(),
            record=self._spend_record(ctx),
            abandoned=fwd.abandoned,
        )
        return cost + sum(s.cost() for s in fwd.abandoned)

    def _abandoned_records(self, ctx: RequestContext, abandoned: list[Spend]) -> list[SpendRecord]:
        """One spend record (and the cost and token metrics) per backend whose fan-out calls went unused."""
        out = []
        route = ctx.route_name or "-"
        for s in abandoned:
            backend, usage, cost = s.backend.config.name, s.usage, s.cost()
            m = self.metrics
            m.child(m.tokens, route, backend, "input").inc(usage.prompt_tokens)
            m.child(m.tokens, route, backend, "output").inc(usage.completion_tokens)
            if usage.cached_tokens:
                m.child(m.tokens, route, backend, "cached_input").inc(usage.cached_tokens)
            m.child(m.cost, route, backend, ctx.tier, self.workload).inc(cost)
            out.append(
                self._record_of(
                    ctx,
                    self.clock.time(),
                    s.outcome,  # fan_out_abandoned, or cascade_escalated
                    usage,
                    cost,
                    backend=backend,
                    downgraded=ctx.downgraded,
                    cascade_step=s.cascade_step,
                    escalation=s.escalation,
                    **(ctx.target.record_fields(None, None, 0.0) if ctx.target is not None else {}),
                )
            )
        return out

    def _spend_record(self, ctx: RequestContext) -> SpendRecord | None:
        u = ctx.usage
        if u is None or not ctx.backend:
            return None
        return SpendRecord(
            time=self.clock.time(),
            namespace=ctx.state.config.namespace,
            route=ctx.route_name or "-",
            backend=ctx.backend,
            model=ctx.state.model_of(ctx.backend),
            tenant=ctx.tenant,
            tier=ctx.tier,
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            cached_tokens=u.cached_tokens,
            cost_usd=ctx.cost,
            downgraded=ctx.downgraded,
            fallbacks=ctx.fallbacks,
            spillover=ctx.spillover,
            outcome=ctx.outcome,
            request_id=ctx.request_id,
            workload=self.workload,
            latency_ms=(time.perf_counter() - ctx.started) * 1000,
            **(ctx.target.record_fields(ctx.cascade, u, ctx.cost) if ctx.target is not None else {}),
        )

    def _failure_record(self, ctx: RequestContext, backend: str) -> SpendRecord | None:
        """A request under an experiment that failed upstream: a record without spend, so that its arm's
        error rate is in the ledger (`kubetoll report --experiment`). Other failed requests have none."""
        if ctx.target is None or not ctx.target.experiment:
            return None
        return self._no_spend_record(
            ctx,
            self.clock.time(),
            ctx.outcome,
            backend=backend,
            downgraded=ctx.downgraded,
            fallbacks=ctx.fallbacks,
            spillover=ctx.spillover,
            latency_ms=(time.perf_counter() - ctx.started) * 1000,
            **ctx.target.record_fields(ctx.cascade, None, 0.0),
        )

    # ------------------------------------------------------------------ cache (stage 6)

    async def _cache_lookup(self, ctx: RequestContext, policy: str) -> CacheLookup:
        assert self.cache is not None and ctx.req is not None
        lookup = await self.cache.lookup(
            policy,
            ctx.route_name,
            ctx.tenant,
            ctx.endpoint,
            ctx.req.upstream_body,
            ctx.request.headers,
            arm=ctx.target.arm_id if ctx.target is not None else "",
        )
        ctx.cache = lookup
        for outcome, charge in lookup.charges:
            await self._bill_lookup_charge(ctx, lookup, outcome, charge)
        # Error control's answer comparison runs after the response: billed the same way, then.
        lookup.bill_later = partial(self._bill_lookup_charge, ctx, lookup)
        return lookup

    async def _bill_lookup_charge(
        self, ctx: RequestContext, lookup: CacheLookup, outcome: str, charge: LookupCharge
    ) -> None:
        # The semantic lookup's embedding and verifier calls are spend like any other: counted
        # against this request's budgets (never refused: they already happened) and in the ledger.
        record = CacheStage.charge_record(
            lookup,
            charge,
            outcome,
            time_=self.clock.time(),
            namespace=ctx.state.config.namespace,
            tenant=ctx.tenant,
            tier=ctx.tier,
            request_id=ctx.request_id,
            workload=self.workload,
            model=ctx.state.model_of(charge.backend),
        )
        record = self._under_arm(ctx, record)
        meters = ctx.meters
        holds = [Hold(m, float(charge.usage.total_tokens), enforce=False) for m in meters.tokens]
        holds += [Hold(m, charge.cost_usd, enforce=False) for m in meters.usd]
        reservation = None
        if holds:
            try:
                reservation = await self.store.reserve(holds, self.clock.time())
            except (StoreUnavailable, Suspended):
                reservation = None  # the record still goes to the ledger; the store is away
        self.metrics.cost.labels(ctx.route_name, charge.backend, ctx.tier, self.workload).inc(charge.cost_usd)
        await self._settle(ctx, reservation, charge.usage, charge.cost_usd, self.clock.time(), record=record)

    @staticmethod
    def _under_arm(ctx: RequestContext, record: SpendRecord) -> SpendRecord:
        """A cache record of a request under an experiment carries its experiment and arm (the entries
        are the arm's own: `cache.keys.scope_value`)."""
        fields = ctx.target.arm_fields() if ctx.target is not None else {}
        return dataclasses.replace(record, **fields) if fields else record

    async def _cache_response(self, ctx: RequestContext, lookup: CacheLookup) -> web.StreamResponse:
        hit, req = lookup.hit, ctx.req
        assert hit is not None and req is not None
        ctx.outcome = f"cache_hit_{hit.kind}"
        record = CacheStage.spend_record(
            lookup,
            time_=self.clock.time(),
            namespace=ctx.state.config.namespace,
            tenant=ctx.tenant,
            tier=ctx.tier,
            request_id=ctx.request_id,
            workload=self.workload,
        )
        if record is not None:
            self.ledger.append(self.attribution.stamp(ctx, self._under_arm(ctx, record)))
        headers = {"x-request-id": ctx.request_id, **hit.headers()}
        if ctx.target is not None:  # the arm whose entries served it
            headers.update(ctx.target.arm_headers())
        if lookup.lookup_cost_usd:  # the hit cost nothing upstream; its embedding and verifier calls did
            headers["x-kubetoll-cost-usd"] = f"{lookup.lookup_cost_usd:.9f}"
        body = hit.sse_bytes(req.include_usage) if req.stream else hit.json_bytes()
        return await self._answer_here(ctx, body, headers, req.stream)

    async def _answer_here(
        self, ctx: RequestContext, body: bytes, headers: dict[str, str], stream: bool
    ) -> web.StreamResponse:
        """An answer made here, not upstream (a cache hit, an exhausted response): JSON, or a whole event stream."""
        if not stream:
            return web.Response(body=body, content_type="application/json", headers=headers)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache", **headers})
        try:
            await resp.prepare(ctx.request)
            await resp.write_eof(body)  # head, events and the body's end in one write
        except (ConnectionResetError, RuntimeError):
            ctx.outcome = "client_disconnected"
        return resp

    # ------------------------------------------------------------------ record (stage 10)

    def _headers(self, ctx: RequestContext, cost: float | None) -> dict[str, str]:
        h = {
            "x-request-id": ctx.request_id,
            "x-kubetoll-backend": ctx.backend,
            "x-kubetoll-fallbacks": str(ctx.fallbacks),
        }
        if ctx.spillover:
            h["x-kubetoll-spillover"] = ctx.spillover
        if ctx.context:
            h["x-kubetoll-context"] = ctx.context
        if cost is not None:
            h["x-kubetoll-cost-usd"] = f"{cost:.9f}"
        if ctx.downgraded:
            h["x-kubetoll-downgraded"] = "true"
        if ctx.cache is not None:
            h["x-kubetoll-cache"] = ctx.cache.header_value
        if ctx.target is not None:
            h.update(ctx.target.headers(ctx.cascade))  # experiment arm, cascade (experiments.py)
        t = tightest(self.store, ctx.meters.all(), self.clock.time())
        if t is not None:
            m, st = t
            h["x-kubetoll-budget-remaining"] = (
                f"{max(st.remaining, 0):.6f} {m.unit}; scope={m.label}; used={st.percent:.1f}%"
            )
        return h

    def _record(self, ctx: RequestContext) -> None:
        elapsed = ctx.finished - ctx.started
        added = ctx.added_before_first_byte
        if added is None:
            added = max(elapsed - ctx.upstream_seconds, 0.0)
        m = self.metrics
        child = m.child
        route = ctx.route_name or "-"
        child(m.requests, route, ctx.backend or "-", ctx.tier or "-", ctx.outcome).inc()
        if ctx.route_name:
            child(m.added_latency, route).observe(added)
        if ctx.backend and ctx.upstream_seconds:
            child(m.upstream_latency, ctx.backend, ctx.endpoint).observe(ctx.upstream_seconds)
        u = ctx.usage
        if u is not None and ctx.backend:
            child(m.tokens, route, ctx.backend, "input").inc(u.prompt_tokens)
            child(m.tokens, route, ctx.backend, "output").inc(u.completion_tokens)
            if u.cached_tokens:
                child(m.tokens, route, ctx.backend, "cached_input").inc(u.cached_tokens)
            child(m.cost, route, ctx.backend, ctx.tier, self.workload).inc(ctx.cost)
        if access_log.enabled:
            access_log.write(
                orjson.dumps(
                    {
                        "request_id": ctx.request_id,
                        "endpoint": ctx.endpoint,
                        "route": ctx.route_name,
                        "backend": ctx.backend,
                        "tier": ctx.tier,
                        "tier_source": ctx.tier_source or None,
                        "workload": self.workload,
                        "status": ctx.status,
                        "outcome": ctx.outcome,
                        "reason": ctx.reason or None,
                        "prompt_tokens": u.prompt_tokens if u else 0,
                        "completion_tokens": u.completion_tokens if u else 0,
                        "usage_reported": u.reported if u else None,
                        "cost_usd": round(ctx.cost, 9),
                        "fallbacks": ctx.fallbacks,
                        "spillover": ctx.spillover or None,
                        "downgraded": ctx.downgraded,
                        "added_ms": round(added * 1000, 3),
                        "upstream_ms": round(ctx.upstream_seconds * 1000, 1),
                    }
                )
            )


def _spilled(attempts: list[Any]) -> str:
    """The backends an attempt list skipped for their replicas' deep queues (the spillover header and record)."""
    return ",".join(dict.fromkeys(a.backend for a in attempts if a.outcome == "spillover"))
