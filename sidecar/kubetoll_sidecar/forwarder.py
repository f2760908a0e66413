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

Streams: the client's response starts only when the first upstream chunk is in
hand, so a backend that fails before sending anything is still fallen back from.
After the first byte has reached the client there is no fallback (the client has
part of one model's answer); a stream cut short is ended with an error event and
billed for what was sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from kubetoll_core.enums import FailureClass, Provider
from kubetoll_core.prices import ResolvedPrice
from kubetoll_core.router_config import Backend

from .circuit import BreakerRegistry, counts_against_backend
from .credentials import CredentialStore, MissingCredential
from .providers.base import Capability, Translator, UnsupportedRequest, UpstreamError, Usage
from .retry_after import clamp_retry_after
from .sse import SSEDecoder

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


def translator_for(provider: Provider) -> Translator:
    """A fresh translator (they hold a stream's state)."""
    translator: Translator = translator_class(provider)()
    return translator


def capabilities_of(provider: Provider) -> frozenset[Capability]:
    """What the provider's translator declares it serves (read from the class: nothing is built)."""
    caps: frozenset[Capability] = translator_class(provider).capabilities
    return caps


@dataclass(slots=True)
class BackendRuntime:
    """A backend with what calling it needs: its price, its connection pool."""

    config: Backend
    price: ResolvedPrice
    session: aiohttp.ClientSession


@dataclass(slots=True)
class Attempt:
    backend: str
    outcome: str  # "ok", a FailureClass value, "circuit_open", "unsupported", "credentials", "upstream_error"
    status: int = 0
    message: str = ""
    retry_after: float | None = None

    def describe(self) -> str:
        what = f"HTTP {self.status}" if self.status else self.outcome
        detail = f": {self.message}" if self.message else ""
        return f"{self.backend} ({what}{detail})"


@dataclass(slots=True)
class OpenStream:
    response: aiohttp.ClientResponse
    decoder: SSEDecoder
    translator: Any  # StreamTranslator
    pending: list[Any]  # chunks translated but not yet sent (at least one, unless done)
    started: float  # monotonic time the attempt began
    first_chunk_at: float


@dataclass(slots=True)
class Forwarded:
    backend: BackendRuntime
    attempts: list[Attempt]
    upstream_seconds: float = 0.0
    body: dict[str, Any] | None = None  # non-streaming response (OpenAI shape)
    usage: Usage | None = None
    stream: OpenStream | None = None

    @property
    def fallbacks(self) -> int:
        return len(self.attempts) - 1


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
    def __init__(self, breakers: BreakerRegistry, credentials: CredentialStore) -> None:
        self.breakers = breakers
        self.credentials = credentials

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
    ) -> Forwarded:
        attempts: list[Attempt] = []
        for rt in chain:
            b = rt.config
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
            translator = translator_for(b.provider)
            try:
                api_key = self.credentials.get(b.credentials)
                req = translator.build_request(b, endpoint, {**body, "model": b.model}, api_key, stream)
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
            started = time.monotonic()
            t = b.timeouts
            timeout = aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.first_token)
            failure: FailureClass
            try:
                resp = await rt.session.request(
                    req.method, req.url, data=req.body, headers=req.headers, timeout=timeout
                )
            except TimeoutError:
                failure, status, message, retry = (
                    FailureClass.timeout,
                    0,
                    f"no response within {t.first_token:g}s",
                    None,
                )
            except (aiohttp.ClientError, OSError) as exc:
                failure, status, message, retry = FailureClass.connection_error, 0, _connection_message(exc), None
            else:
                try:
                    if resp.status >= 400:
                        raw = await resp.read()
                        err = translator.classify_error(resp.status, resp.headers, raw)
                        resp.release()
                        err.retry_after = clamp_retry_after(err.retry_after, b.circuit_breaker.max_retry_after_seconds)
                        if err.failure is None or _too_long_without_fallback(err.failure, fallback_on):
                            breaker.release_probe()
                            attempts.append(Attempt(b.name, "upstream_error", err.status, err.message, err.retry_after))
                            raise UpstreamRejected(err, attempts)
                        failure, status, message, retry = err.failure, err.status, err.message, err.retry_after
                    elif not stream:
                        raw = await resp.read()
                        data, usage = translator.parse_response(endpoint, raw, model_alias)
                        breaker.success()
                        attempts.append(Attempt(b.name, "ok", resp.status))
                        return Forwarded(rt, attempts, time.monotonic() - started, body=data, usage=usage)
                    else:
                        opened = await self._open_stream(resp, translator, model_alias, include_usage, started)
                        if isinstance(opened, OpenStream):
                            breaker.success()
                            attempts.append(Attempt(b.name, "ok", resp.status))
                            return Forwarded(rt, attempts, opened.first_chunk_at - started, stream=opened)
                        resp.close()
                        if opened.failure is None or _too_long_without_fallback(opened.failure, fallback_on):
                            # An error event before any data that is the caller's (an invalid request
                            # inside a 200 stream): nothing has reached the client, so it gets the
                            # error as the provider classed it, and the breaker does not count it.
                            breaker.release_probe()
                            attempts.append(Attempt(b.name, "upstream_error", opened.status, opened.message))
                            raise UpstreamRejected(opened, attempts)
                        failure, status, message, retry = (
                            opened.failure or FailureClass.server_error,
                            opened.status,
                            opened.message,
                            clamp_retry_after(opened.retry_after, b.circuit_breaker.max_retry_after_seconds),
                        )
                except TimeoutError:
                    resp.close()
                    failure, status, message, retry = (
                        FailureClass.timeout,
                        0,
                        f"no data within {t.first_token:g}s",
                        None,
                    )
                except (aiohttp.ClientError, OSError) as exc:
                    resp.close()
                    failure, status, message, retry = FailureClass.connection_error, 0, _connection_message(exc), None
                except ValueError as exc:  # a 200 whose body is not what the API promises
                    resp.close()
                    failure, status, message, retry = (
                        FailureClass.server_error,
                        resp.status,
                        f"malformed response: {exc}",
                        None,
                    )
                except asyncio.CancelledError:
                    resp.close()
                    breaker.release_probe()
                    raise
            if counts_against_backend(failure, status):
                breaker.failure(failure.value, retry)
            else:
                breaker.release_probe()
            attempts.append(Attempt(b.name, failure.value, status, message, retry))
            if failure not in fallback_on:
                raise AllBackendsFailed(attempts)
            if on_fallback:
                on_fallback(b.name, failure.value)
        if attempts and all(a.outcome == "unsupported" for a in attempts):
            # Nothing was sent: no backend of the chain can express this request. A 5xx would
            # have the SDKs retry a call that can never succeed.
            raise UpstreamRejected(_unsupported_error(attempts), attempts)
        raise AllBackendsFailed(attempts)

    async def _open_stream(
        self,
        resp: aiohttp.ClientResponse,
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
            chunk = await resp.content.readany()
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
