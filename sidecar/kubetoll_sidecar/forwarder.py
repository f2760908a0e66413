"""Pipeline stage 8: forward to the backends of the chain, falling back on the route's failure classes.

For each backend in order: skip it if its circuit is open or it cannot serve the
request; otherwise call it with per-attempt timeouts (connect, first byte, total).
A failure in one of the route's `fallbackOn` classes moves on to the next
backend; any other upstream error goes back to the client as it is. Only
failures that say the backend is unwell count for its breaker
(`circuit.counts_against_backend`): a caller's 4xx never does. A provider's
Retry-After is cut to the backend's `circuitBreaker.maxRetryAfterSeconds` here,
before the breaker or the client sees it. A chain whose every backend skipped
the request as unsupported answers 400, not 502 (nothing was sent).

In-cluster backends with replicas (replica_load.py): each attempt goes to the
least loaded replica, and with the route's `spillover` a backend whose every
replica's queue is too deep is skipped for the next one ("spillover" attempt).

Streams: the client's response starts only when the first upstream chunk is in
hand, so a backend that fails before sending anything is still fallen back from.
After the first byte has reached the client there is no fallback (the client has
part of one model's answer); a stream cut short is ended with an error event and
billed for what was sent.

Choices by fan-out: a provider without `n` (Anthropic) whose translator declares
`Capability.fan_out_choices` serves `n > 1` (up to `MAX_FAN_OUT`) as n calls of
the same one-choice request, made at once. Their answers are merged by choice
index (`merge_choices`; streams: `FanOutStream`) and their usages kept one per
call, each priced on its own. One failing call fails the backend as a single
failing call would; what the others spent is handed back as `Spend` in the
caller's `abandoned` list, to be settled however forwarding ends.

Transport: each backend's calls go through its `UpstreamClient` (upstream_client.py,
a lean HTTP/1.1 keep-alive pool); aiohttp's `ClientSession` serves the calls off this path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from kubetoll_core.enums import FailureClass, Provider
from kubetoll_core.prices import ResolvedPrice
from kubetoll_core.router_config import Backend
from kubetoll_core.spend_record import FAN_OUT_ABANDONED_OUTCOME

from . import inbound, tokens
from .circuit import BreakerRegistry, counts_against_backend
from .credentials import CredentialStore, MissingCredential
from .providers.base import (
    MAX_FAN_OUT,
    Capability,
    Endpoint,
    Translator,
    UnsupportedRequest,
    UpstreamError,
    UpstreamRequest,
    Usage,
    requested_choices,
    upstream_calls,
)
from .replica_load import ReplicaLoads
from .retry_after import clamp_retry_after
from .sse import SSEDecoder
from .tracing import OFF as TRACING_OFF
from .tracing import Tracing
from .upstream_client import CallTimeout, UpstreamClient, UpstreamResponse

# type[Any]: the translators are Translators structurally, not by type[...] (their stream
# translators' `feed` returns narrower lists than the protocol's).
_TRANSLATORS: dict[Provider, type[Any]] = {}


def translator_class(provider: Provider) -> type[Any]:
    """The translator class of a provider. Classes are looked up once: importing inside
    the call cost more than the rest of building a request."""
    if not _TRANSLATORS:
        from .providers.anthropic import AnthropicTranslator
        from .providers.openai import AzureOpenAITranslator, OpenAITranslator

        _TRANSLATORS.update({Provider.anthropic: AnthropicTranslator, Provider.azure_openai: AzureOpenAITranslator})
        _TRANSLATORS[Provider.openai] = OpenAITranslator
    return _TRANSLATORS.get(provider, _TRANSLATORS[Provider.openai])


def translator_for(provider: Provider, endpoint: str = Endpoint.chat) -> Translator:
    """A fresh translator (they hold a stream's state). For an inbound API's endpoint (inbound/), the
    provider's own translator for that API when it speaks it, else its chat one behind the API's adapter."""
    return inbound.translator_for(endpoint, provider, translator_class(provider))


def capabilities_of(provider: Provider) -> frozenset[Capability]:
    """What the provider's translator declares it serves (read from the class: nothing is built)."""
    caps: frozenset[Capability] = translator_class(provider).capabilities
    return caps


@dataclass(slots=True)
class BackendRuntime:
    """A backend with what calling it needs: its price, its connection pool."""

    config: Backend
    price: ResolvedPrice
    session: aiohttp.ClientSession  # for the calls off the hot path (embeddings, verifiers, batches)
    client: UpstreamClient = field(default_factory=UpstreamClient)  # the forwarder's calls
    call_timeout: CallTimeout = field(init=False)

    def __post_init__(self) -> None:
        t = self.config.timeouts
        self.call_timeout = CallTimeout(total=t.total, connect=t.connect, read=t.first_token)


@dataclass(slots=True)
class Attempt:
    backend: str
    # "ok", a FailureClass value, "circuit_open", "unsupported", "credentials", "upstream_error", "spillover"
    outcome: str
    status: int = 0
    message: str = ""
    retry_after: float | None = None

    def describe(self) -> str:
        what = f"HTTP {self.status}" if self.status else self.outcome
        detail = f": {self.message}" if self.message else ""
        return f"{self.backend} ({what}{detail})"


@dataclass(slots=True)
class OpenStream:
    """One upstream stream, opened: its first chunks are in hand."""

    response: UpstreamResponse
    decoder: SSEDecoder
    translator: Any  # StreamTranslator
    pending: list[Any]  # chunks translated but not yet sent (at least one, unless done)
    started: float  # monotonic time the attempt began
    first_chunk_at: float
    ended: bool = False  # the upstream closed its body

    @property
    def done(self) -> bool:
        """The upstream said the stream is complete."""
        return bool(self.translator.done)

    @property
    def finished(self) -> bool:
        """Nothing more will come: complete, closed by the upstream, or failed with an error event."""
        return self.done or self.ended or self.error() is not None

    def error(self) -> UpstreamError | None:
        """An error the upstream sent inside the stream."""
        err: UpstreamError | None = self.translator.error()
        return err

    async def next_chunks(self) -> list[Any] | None:
        """The chunks of the upstream's next read (maybe none), or None once it is finished."""
        if self.finished:
            return None
        return self.take(await self.response.readany())

    def take(self, raw: bytes) -> list[Any]:
        """Translate one read of the upstream body (b"": its end) into chunks to send."""
        if not raw:
            self.ended = True
            events = self.decoder.flush()
        else:
            events = self.decoder.feed(raw)
        out: list[Any] = []
        for ev, data in events:
            out.extend(self.translator.feed(ev, data))
        return out

    def close(self) -> None:
        # Released, not closed: a stream that said it is complete has its connection back in the
        # pool (once its body's end arrives, which may come just after); one given up part way
        # is closed (release reads past only what was already received).
        if self.done and not self.ended:
            self.response.release_when_done()
        else:
            self.response.release()

    def usages(self, model: str, prompt_tokens: int) -> list[Usage]:
        """What the stream cost, per upstream call (one here)."""
        return [stream_usage(self.translator, model, prompt_tokens)]


class FanOutStream:
    """n upstream streams of one choice each, relayed as one stream of n choices (fan-out).

    Every part is open before the client's response starts. Chunks go out as the parts
    send them, each choice carrying its part's `index` (the OpenAI SDK accumulates choices by
    index) and every chunk the first part's `id` and `created`. The parts' own usage chunks are
    held back: when the client asked for usage, one chunk summing every part's comes once all
    are complete. The stream is done when every part is; the first part's error is its error.
    """

    __slots__ = ("parts", "pending", "started", "first_chunk_at", "_include_usage", "_meta", "_reads", "_usage_sent")

    def __init__(self, parts: list[OpenStream], include_usage: bool) -> None:
        self.parts = parts
        self.started = min(p.started for p in parts)
        self.first_chunk_at = max(p.first_chunk_at for p in parts)
        self._include_usage = include_usage
        self._meta: dict[str, Any] = {}
        self._reads: dict[int, asyncio.Future[bytes]] = {}
        self._usage_sent = False
        self.pending = self._merge({i: p.pending for i, p in enumerate(parts)})
        for p in parts:
            p.pending = []

    @property
    def done(self) -> bool:
        return all(p.done for p in self.parts)

    def error(self) -> UpstreamError | None:
        return next((e for p in self.parts if (e := p.error()) is not None), None)

    async def next_chunks(self) -> list[Any] | None:
        if any(p.ended and not p.done for p in self.parts):
            return None  # one choice was cut short: so is the answer (the relay ends it with an error event)
        live = [i for i, p in enumerate(self.parts) if not p.finished]
        if not live:
            return None
        for i in live:
            if i not in self._reads:
                self._reads[i] = asyncio.ensure_future(self.parts[i].response.readany())
        await asyncio.wait([self._reads[i] for i in live], return_when=asyncio.FIRST_COMPLETED)
        got: dict[int, list[Any]] = {}
        for i in live:
            read = self._reads[i]
            if read.done():
                del self._reads[i]
                got[i] = self.parts[i].take(read.result())  # a failed read raises, as a single stream's does
        return self._merge(got)

    def close(self) -> None:
        for read in self._reads.values():
            if read.done() and not read.cancelled():
                read.exception()  # retrieved: a read that failed after the stream was given up is not news
            else:
                read.cancel()
        self._reads.clear()
        for p in self.parts:
            p.close()

    def usages(self, model: str, prompt_tokens: int) -> list[Usage]:
        return [u for p in self.parts for u in p.usages(model, prompt_tokens)]

    def _merge(self, got: dict[int, list[Any]]) -> list[Any]:
        out: list[Any] = []
        for i in sorted(got):
            for raw in got[i]:
                chunk = orjson.loads(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
                if not isinstance(chunk, dict):
                    continue
                choices = chunk.get("choices")
                if not choices:
                    continue  # a usage chunk (summed below) or a part's preamble (Azure's filter results)
                for key in ("id", "created", "model"):
                    if key in chunk:
                        chunk[key] = self._meta.setdefault(key, chunk[key])
                chunk["choices"] = [{**c, "index": i} if isinstance(c, dict) else c for c in choices]
                if chunk.get("usage") is not None:
                    chunk["usage"] = None  # the summed usage comes last, on a chunk of its own
                out.append(chunk)
        if self._include_usage and not self._usage_sent and self.done:
            self._usage_sent = True
            usage = total_usage([p.translator.usage for p in self.parts if p.translator.usage is not None])
            out.append(
                {
                    "id": self._meta.get("id", ""),
                    "object": "chat.completion.chunk",
                    "created": self._meta.get("created", 0),
                    "model": self._meta.get("model", ""),
                    "choices": [],
                    "usage": openai_usage(usage),
                }
            )
        return out


@dataclass(slots=True)
class Spend:
    """Upstream calls of one backend whose answers were not used (fan-out calls whose sibling
    failed, or that completed before the request was cancelled; a cascade step that escalated).
    The provider bills them, so they are settled and recorded all the same."""

    backend: BackendRuntime
    usages: list[Usage]  # one per call
    # A cascade step whose answer was not served is spend of this kind too (cascade.py).
    outcome: str = FAN_OUT_ABANDONED_OUTCOME
    cascade_step: int = 0
    escalation: str = ""  # cascade_escalated: the check the answer failed, or "failed"

    @property
    def usage(self) -> Usage:
        return total_usage(self.usages)

    def cost(self) -> float:
        return sum(self.backend.price.cost(u) for u in self.usages)


@dataclass(slots=True)
class _Call:
    """One upstream call's result: an answer, an opened stream, or `error`."""

    status: int
    body: dict[str, Any] | None = None
    usage: Usage | None = None
    stream: OpenStream | None = None
    error: UpstreamError | None = None
    seconds: float = 0.0  # non-streaming: how long the call took


@dataclass(slots=True)
class Forwarded:
    backend: BackendRuntime
    attempts: list[Attempt]
    upstream_seconds: float = 0.0
    body: dict[str, Any] | None = None  # non-streaming response (OpenAI shape)
    usage: Usage | None = None  # non-streaming: the sum of `usages`
    stream: OpenStream | FanOutStream | None = None
    # Non-streaming: each upstream call's usage (n with fan-out; priced one by one, since a
    # tiered price depends on one call's prompt), counted when the provider reported none.
    usages: list[Usage] = field(default_factory=list)
    # Spend of calls whose answers were not used: fan-out calls on a backend fallen back from.
    abandoned: list[Spend] = field(default_factory=list)

    @property
    def fallbacks(self) -> int:
        return len(self.attempts) - 1

    def cost(self, usages: list[Usage]) -> float:
        """What these calls on the answering backend cost, each priced on its own."""
        return sum(self.backend.price.cost(u) for u in usages)


class AllBackendsFailed(Exception):
    def __init__(self, attempts: list[Attempt]) -> None:
        self.attempts = attempts
        super().__init__("every backend failed: " + "; ".join(a.describe() for a in attempts))

    def status(self) -> int:
        outcomes = {a.outcome for a in self.attempts}
        if outcomes and outcomes <= {FailureClass.timeout.value}:
            return 504
        if outcomes & {FailureClass.rate_limited.value, "circuit_open", FailureClass.budget_exhausted.value}:
            return 503
        return 502

    def retry_after(self) -> float | None:
        waits = [a.retry_after for a in self.attempts if a.retry_after]
        return min(waits) if waits else None


class UpstreamRejected(Exception):
    """An upstream error outside the route's fallback classes: the client sees it as it is."""

    def __init__(self, error: UpstreamError, attempts: list[Attempt]) -> None:
        self.error = error
        self.attempts = attempts
        super().__init__(error.message)


class Forwarder:
    def __init__(
        self,
        breakers: BreakerRegistry,
        credentials: CredentialStore,
        replicas: ReplicaLoads | None = None,
        tracing: Tracing = TRACING_OFF,
    ) -> None:
        self.breakers = breakers
        self.credentials = credentials
        # An in-cluster backend's replicas and their load: each attempt goes to the least loaded one.
        self.replicas = replicas
        # A span per upstream attempt, its traceparent in the request (tracing.py; no-ops when off).
        self.tracing = tracing

    async def forward(
        self,
        chain: Iterable[BackendRuntime],
        endpoint: str,
        body: dict[str, Any],
        stream: bool,
        fallback_on: frozenset[FailureClass],
        model_alias: str,
        include_usage: bool,
        on_fallback: Any = None,
        *,
        prompt_tokens: int = 0,
        abandoned: list[Spend] | None = None,
        spillover_depth: int | None = None,
        on_spillover: Any = None,
    ) -> Forwarded:
        """`prompt_tokens` (the estimate) bills a call whose provider reported no usage. `abandoned`
        collects the spend of fan-out calls whose answers were not used (a sibling failed, or the
        request was cancelled): the caller settles it whichever way this returns or raises.

        `spillover_depth` (the route's spillover.queueDepth): a backend with replicas whose every
        queue is deeper is skipped for the next one of the chain, and kept as the last resort (tried
        again after the rest of the chain failed), so spill-over never fails a request the deep queue
        would have served. The last backend of the chain never spills: nothing is after it."""
        attempts: list[Attempt] = []
        abandoned = abandoned if abandoned is not None else []
        n = requested_choices(body)
        candidates = list(chain)
        spilled: set[str] = set()
        pos = 0
        while pos < len(candidates):
            rt = candidates[pos]
            pos += 1
            b = rt.config
            replicas = self.replicas if b.replicas else None
            if (
                replicas is not None
                and spillover_depth is not None
                and pos < len(candidates)
                and b.name not in spilled
                and replicas.all_deeper_than(b, spillover_depth)
            ):
                # Before the breaker is asked: a half-open breaker would count this as its probe.
                spilled.add(b.name)
                candidates.append(rt)
                attempts.append(
                    Attempt(b.name, "spillover", 0, f"every replica has more than {spillover_depth} requests waiting")
                )
                if on_spillover:
                    on_spillover(b.name)
                if on_fallback:
                    on_fallback(b.name, "spillover")
                continue
            breaker = self.breakers.get(b)
            if not breaker.allow():
                attempts.append(
                    Attempt(
                        b.name,
                        "circuit_open",
                        0,
                        f"circuit open for {breaker.retry_in():.1f}s ({breaker.reason})",
                        breaker.retry_in(),
                    )
                )
                if on_fallback:
                    on_fallback(b.name, "circuit_open")
                continue
            translator = translator_for(b.provider, endpoint)
            replica = None
            try:
                calls = upstream_calls(translator.capabilities, n)
                if calls is None:
                    raise UnsupportedRequest(
                        f"{b.provider.value} backends have no `n`: {n} choices would take {n} upstream calls "
                        f"(at most {MAX_FAN_OUT})"
                    )
                api_key = self.credentials.get(b.credentials)
                send = {**body, "model": b.model}
                if calls > 1:
                    del send["n"]  # each call asks for one choice: the provider has no `n`
                replica = replicas.pick(b, spillover_depth) if replicas is not None else None
                req = translator.build_request(
                    replica.backend_view(b) if replica is not None else b, endpoint, send, api_key, stream
                )
            except UnsupportedRequest as exc:
                breaker.release_probe()
                attempts.append(Attempt(b.name, "unsupported", 0, str(exc)))
                if on_fallback:
                    on_fallback(b.name, "unsupported")
                continue
            except ValueError as exc:
                # The request cannot be expressed for this provider (e.g. tool arguments that are
                # not JSON): the client's to fix, so a 400 rather than a fallback.
                breaker.release_probe()
                attempts.append(Attempt(b.name, "upstream_error", 400, str(exc)))
                raise UpstreamRejected(
                    UpstreamError(
                        400,
                        None,
                        str(exc),
                        None,
                        {
                            "message": str(exc),
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_request",
                        },
                    ),
                    attempts,
                ) from None
            except MissingCredential as exc:
                breaker.release_probe()
                attempts.append(Attempt(b.name, "credentials", 0, str(exc)))
                if on_fallback:
                    on_fallback(b.name, "credentials")
                continue
            span = self.tracing.attempt(b, endpoint, req)  # also writes traceparent into req.headers
            started = time.monotonic()
            if replica is not None:
                replica.in_flight += calls  # until the answer (a stream: its first chunk) is in hand
            try:
                if calls == 1:
                    results = [await self._call(rt, translator, req, endpoint, stream, model_alias, include_usage)]
                else:
                    results = await self._fan_out(
                        rt,
                        translator,
                        req,
                        calls,
                        endpoint,
                        stream,
                        model_alias,
                        include_usage,
                        prompt_tokens,
                        abandoned,
                    )
            except asyncio.CancelledError:
                breaker.release_probe()
                span.cancelled()
                raise
            finally:
                if replica is not None:
                    replica.in_flight -= calls
            span.end(results)
            errors = [(i, r.error) for i, r in enumerate(results) if r.error is not None]
            if (
                replica is not None
                and replicas is not None
                and any(e.failure in (FailureClass.connection_error, FailureClass.timeout) for _, e in errors)
            ):
                replicas.mark_failed(replica)  # the next requests try the other replicas first
            if not errors:
                breaker.success()
                attempts.append(Attempt(b.name, "ok", results[0].status))
                fwd = _forwarded(rt, attempts, results, started, b.model, prompt_tokens, include_usage)
                fwd.abandoned = abandoned
                return fwd
            # The backend failed if one of its calls did: the first failure (by choice index) is
            # handled as that of a single call. What the other calls spent is billed all the same.
            _abandon(rt, results, b.model, prompt_tokens, abandoned)
            index, err = errors[0]
            message = f"choice {index} (n={calls}): {err.message}" if calls > 1 else err.message
            health = [e for _, e in errors if counts_against_backend(e.failure, e.status)]
            if health:
                breaker.failure((health[0].failure or FailureClass.server_error).value, health[0].retry_after)
            else:
                breaker.release_probe()
            if err.failure is None or _too_long_without_fallback(err.failure, fallback_on):
                # A caller's error (in a response, or as an error event before a stream's first
                # data): nothing has reached the client, so it gets the error as the provider classed it.
                attempts.append(Attempt(b.name, "upstream_error", err.status, message, err.retry_after))
                raise UpstreamRejected(err, attempts)
            attempts.append(Attempt(b.name, err.failure.value, err.status, message, err.retry_after))
            if err.failure not in fallback_on:
                raise AllBackendsFailed(attempts)
            if on_fallback:
                on_fallback(b.name, err.failure.value)
        if attempts and all(a.outcome == "unsupported" for a in attempts):
            # Nothing was sent: no backend of the chain can express this request. A 5xx would
            # have the SDKs retry a call that can never succeed.
            raise UpstreamRejected(_unsupported_error(attempts), attempts)
        raise AllBackendsFailed(attempts)

    async def _fan_out(
        self,
        rt: BackendRuntime,
        translator: Translator,
        req: UpstreamRequest,
        calls: int,
        endpoint: str,
        stream: bool,
        model_alias: str,
        include_usage: bool,
        prompt_tokens: int,
        abandoned: list[Spend],
    ) -> list[_Call]:
        """The same upstream request `calls` times at once. Every call is let finish (or open its
        stream), so what each spent is known before the backend is judged."""
        tasks = [
            asyncio.ensure_future(self._call(rt, translator, req, endpoint, stream, model_alias, include_usage))
            for _ in range(calls)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            # Cancelled (the client left, the drain cut it) or a bug in one call: the calls still
            # running are cancelled (each closes its response); those that completed are billed.
            for t in tasks:
                t.cancel()
            done = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
            _abandon(rt, done, rt.config.model, prompt_tokens, abandoned)
            raise

    async def _call(
        self,
        rt: BackendRuntime,
        translator: Translator,
        req: UpstreamRequest,
        endpoint: str,
        stream: bool,
        model_alias: str,
        include_usage: bool,
    ) -> _Call:
        """One upstream call: its answer (or its opened stream), or its failure classified. Raises
        only CancelledError (and bugs)."""
        b = rt.config
        started = time.monotonic()
        t = b.timeouts
        max_retry = b.circuit_breaker.max_retry_after_seconds
        try:
            resp = await rt.client.request(
                req.method, req.url, body=req.body, headers=req.headers, timeout=rt.call_timeout
            )
        except TimeoutError:
            return _Call(0, error=UpstreamError(0, FailureClass.timeout, f"no response within {t.first_token:g}s"))
        except OSError as exc:  # UpstreamConnectionError included
            return _Call(0, error=UpstreamError(0, FailureClass.connection_error, _connection_message(exc)))
        try:
            if resp.status >= 400:
                raw = await resp.read()
                err = translator.classify_error(resp.status, resp.headers, raw)
                resp.release()
                err.retry_after = clamp_retry_after(err.retry_after, max_retry)
                return _Call(resp.status, error=err)
            if not stream:
                raw = await resp.read()
                data, usage = translator.parse_response(endpoint, raw, model_alias)
                return _Call(resp.status, body=data, usage=usage, seconds=time.monotonic() - started)
            opened = await self._open_stream(resp, translator, model_alias, include_usage, started)
            if isinstance(opened, OpenStream):
                return _Call(resp.status, stream=opened)
            resp.close()
            if opened.failure is not None:
                opened.retry_after = clamp_retry_after(opened.retry_after, max_retry)
            return _Call(opened.status, error=opened)
        except TimeoutError:
            resp.close()
            return _Call(0, error=UpstreamError(0, FailureClass.timeout, f"no data within {t.first_token:g}s"))
        except OSError as exc:
            resp.close()
            return _Call(0, error=UpstreamError(0, FailureClass.connection_error, _connection_message(exc)))
        except ValueError as exc:  # a 200 whose body is not what the API promises
            resp.close()
            return _Call(
                resp.status, error=UpstreamError(resp.status, FailureClass.server_error, f"malformed response: {exc}")
            )
        except asyncio.CancelledError:
            resp.close()
            raise

    async def _open_stream(
        self,
        resp: UpstreamResponse,
        translator: Translator,
        model_alias: str,
        include_usage: bool,
        started: float,
    ) -> OpenStream | UpstreamError:
        """Read until there is something to send; an upstream that fails before that can be fallen back from."""
        decoder = SSEDecoder()
        st = translator.stream_translator(model_alias, include_usage)
        pending: list[Any] = []
        while not pending and not st.done:
            chunk = await resp.readany()
            if not chunk:
                events = decoder.flush()
                for ev, data in events:
                    pending.extend(st.feed(ev, data))
                if not pending and not st.done:
                    return st.error() or UpstreamError(502, FailureClass.server_error, "stream ended before any data")
                break
            for ev, data in decoder.feed(chunk):
                pending.extend(st.feed(ev, data))
            err = st.error()
            if err is not None and not pending:
                return err
        return OpenStream(resp, decoder, st, pending, started, time.monotonic())


def _too_long_without_fallback(failure: FailureClass, fallback_on: frozenset[FailureClass]) -> bool:
    """A too-long prompt with no fallback for it is, like a client error (no failure class),
    the client's to fix: it goes back as the provider said it."""
    return failure is FailureClass.context_length_exceeded and failure not in fallback_on


def _unsupported_error(attempts: list[Attempt]) -> UpstreamError:
    message = "no backend of this route can serve this request: " + "; ".join(
        f"{a.backend}: {a.message}" for a in attempts
    )
    return UpstreamError(
        400,
        None,
        message,
        None,
        {"message": message, "type": "invalid_request_error", "param": None, "code": "unsupported_by_route"},
    )


def _connection_message(exc: BaseException) -> str:
    # The exception text may carry the URL; it never carries headers, so no key can leak here.
    return f"{type(exc).__name__}: {exc}"[:300]


# --------------------------------------------------------------------------- fan-out and usage


def _forwarded(
    rt: BackendRuntime,
    attempts: list[Attempt],
    results: list[_Call],
    started: float,
    model: str,
    prompt_tokens: int,
    include_usage: bool,
) -> Forwarded:
    """The answer of a backend whose every call succeeded: one call's, or n calls' merged by choice index."""
    streams = [r.stream for r in results if r.stream is not None]
    if streams:
        stream: OpenStream | FanOutStream = streams[0] if len(streams) == 1 else FanOutStream(streams, include_usage)
        return Forwarded(rt, attempts, stream.first_chunk_at - started, stream=stream)
    usages = [call_usage(r.body, r.usage, model, prompt_tokens) for r in results]
    bodies = [r.body or {} for r in results]
    body = bodies[0] if len(bodies) == 1 else merge_choices(bodies, usages)
    return Forwarded(rt, attempts, max(r.seconds for r in results), body=body, usage=total_usage(usages), usages=usages)


def _abandon(rt: BackendRuntime, results: list[_Call], model: str, prompt_tokens: int, into: list[Spend]) -> None:
    """Close what the calls that did not fail opened, and keep what they spent."""
    usages: list[Usage] = []
    for r in results:
        if r.stream is not None:
            r.stream.close()
            usages.extend(r.stream.usages(model, prompt_tokens))
        elif r.error is None:
            usages.append(call_usage(r.body, r.usage, model, prompt_tokens))
    if usages:
        into.append(Spend(rt, usages))


def merge_choices(bodies: list[dict[str, Any]], usages: list[Usage]) -> dict[str, Any]:
    """n one-choice chat responses as one response of n choices: the first one's envelope, choice i
    from call i (`index` i, its own finish_reason), the usage summed when every call reported it."""
    merged = dict(bodies[0])
    merged["choices"] = [
        {**c, "index": i} if isinstance(c, dict) else c for i, b in enumerate(bodies) for c in b.get("choices") or ()
    ]
    if all(u.reported for u in usages):
        merged["usage"] = openai_usage(total_usage(usages))
    else:
        merged.pop("usage", None)  # counted, not reported: the answer does not pass an estimate for the provider's
    return merged


def total_usage(usages: Iterable[Usage]) -> Usage:
    """The sum of several calls' usage (each call bills its own prompt); reported only if every one was."""
    total = Usage()
    for u in usages:
        total.prompt_tokens += u.prompt_tokens
        total.completion_tokens += u.completion_tokens
        total.cached_tokens += u.cached_tokens
        total.cache_write_tokens += u.cache_write_tokens
        total.reported = total.reported and u.reported
    return total


def openai_usage(usage: Usage) -> dict[str, Any]:
    """A usage in OpenAI's response shape."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def call_usage(body: dict[str, Any] | None, usage: Usage | None, model: str, prompt_tokens: int) -> Usage:
    """A non-streaming call's usage: the provider's, else its answer counted (the prompt as estimated)."""
    if usage is not None and usage.reported:
        return usage
    return Usage(prompt_tokens, count_body_output(body, model), reported=False)


def stream_usage(translator: Any, model: str, prompt_tokens: int) -> Usage:
    """The provider's usage of a complete stream; else what was sent, counted."""
    usage: Usage | None = translator.usage
    if usage is not None and translator.done:
        return usage
    # No usage from the provider, or a stream cut short: bill for what was sent.
    text: list[str] = translator.text
    counted = tokens.count_text("".join(text), model) if text else 0
    prompt = usage.prompt_tokens if usage and usage.prompt_tokens else prompt_tokens
    cached = usage.cached_tokens if usage else 0
    return Usage(prompt, max(counted, usage.completion_tokens if usage else 0), cached, reported=False)


def count_body_output(body: dict[str, Any] | None, model: str) -> int:
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
    parts.extend(inbound.body_texts(body))  # a Responses or Messages API answer
    return tokens.count_text("".join(parts), model) if parts else 0
