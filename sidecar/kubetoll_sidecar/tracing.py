"""Traces (docs/sidecar.md, "Traces"): the hooks the pipeline and the forwarder call.

Off by default. Without `telemetry.otlp.endpoint` the hooks are `OFF`'s, which do
nothing and import nothing: the sidecar runs in every application pod, and the
OpenTelemetry SDK, its exporter and protobuf are megabytes it must not load for
a feature that is not on. With an endpoint, `build` imports `otel_tracing` (the
only module that imports OpenTelemetry) and returns its `OtelTracing`.

The pipeline opens one request trace per request (`Tracing.request`, with the
app's `traceparent`/`tracestate`) and ends it after the record stage, from the
`RequestContext`. The forwarder opens one attempt trace per upstream attempt
(`Tracing.attempt`), which writes the W3C headers into the upstream request, so
the upstream sees the attempt span as its parent. The attempt finds its request
span through a context variable set for the request's task (fan-out calls are
tasks of it and see the same value), so nothing is threaded through the stages.

The calls the sidecar makes on a request's behalf to other backends (the
semantic cache's embedding, its rerank or judge verifier, a context policy's
summary) are traced with `call`: a CLIENT span under the request's span, found
through the same context variable, so the embedders and verifiers built once per
config need no tracing object of their own. Outside a traced request it is a
no-op.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from kubetoll_core.router_config import Backend, TelemetrySettings

if TYPE_CHECKING:
    from .context import RequestContext
    from .metrics import Metrics
    from .providers.base import UpstreamRequest, Usage

log = logging.getLogger("kubetoll.sidecar")


class RequestTrace(Protocol):
    def end(self, ctx: RequestContext) -> None:
        """The request is over (answered, refused or failed): its span gets what the stages decided."""


class AttemptTrace(Protocol):
    def end(self, results: list[Any]) -> None:
        """The attempt's calls are done (`forwarder._Call`s: one, or n with fan-out)."""

    def cancelled(self) -> None:
        """The attempt was cancelled (the client left, the drain cut it)."""


class CallTrace(Protocol):
    def end(self, status: int | None, usage: Usage | None, error: str | None) -> None:
        """The call is over: the HTTP status (None: no answer), the usage it billed, why it failed."""


class Tracing(Protocol):
    def request(self, headers: Mapping[str, str]) -> RequestTrace: ...

    def attempt(self, backend: Backend, endpoint: str, req: UpstreamRequest) -> AttemptTrace:
        """Opens an attempt span and writes traceparent (and tracestate) into `req.headers`."""
        ...

    async def close(self, timeout: float) -> None:
        """Export what is queued, within `timeout` seconds; what is left is dropped (and counted)."""
        ...


class _Off:
    """Tracing off: every hook is a no-op."""

    __slots__ = ()

    def request(self, headers: Mapping[str, str]) -> _Off:
        return self

    def attempt(self, backend: Backend, endpoint: str, req: UpstreamRequest) -> _Off:
        return self

    def end(self, *args: Any) -> None:
        return None

    def cancelled(self) -> None:
        return None

    async def close(self, timeout: float) -> None:
        return None


OFF: Tracing = _Off()

# The open span of the request this task serves (otel_tracing's RequestSpan sets it; off: never set).
CURRENT_REQUEST: contextvars.ContextVar[Any] = contextvars.ContextVar("kubetoll_request_span", default=None)

# Why the sidecar called a backend on its own account (the span's `kubetoll.call`).
CACHE_EMBEDDING = "cache_embedding"
CACHE_VERIFIER = "cache_verifier"
CONTEXT_SUMMARY = "context_summary"


def call(backend: Backend, operation: str, purpose: str, url: str, headers: dict[str, str]) -> CallTrace:
    """A span for one call to `backend` made for the current request; writes traceparent into `headers`.

    `operation`: gen_ai.operation.name (`embeddings`, `chat`, `rerank`); `purpose`: one of the names above."""
    request = CURRENT_REQUEST.get()
    if request is None:
        return _OFF_CALL
    trace: CallTrace = request.call(backend, operation, purpose, url, headers)
    return trace


_OFF_CALL: CallTrace = _Off()


def failure_kind(status: int | None) -> str:
    """A failed call's `error.type` when its answer came: the HTTP status of an error, else `invalid_answer`."""
    return str(status) if status is not None and status >= 400 else "invalid_answer"


def build(
    settings: TelemetrySettings, credentials_dir: str, metrics: Metrics, resource: Mapping[str, str] | None = None
) -> Tracing:
    """The sidecar's tracing for `settings`: OFF without an endpoint (nothing imported).

    `resource`: the OpenTelemetry resource attributes naming this sidecar (k8s.namespace.name, k8s.pod.name).
    A headers file or hash key that cannot be read leaves tracing off with an error in the
    log naming the file: traces are not worth refusing to serve the pod's requests."""
    if not settings.otlp.endpoint:
        return OFF
    from . import otel_tracing

    try:
        return otel_tracing.OtelTracing(settings, credentials_dir, metrics, resource)
    except otel_tracing.TelemetryConfigError as exc:
        log.error("traces are off: %s", exc)
        return OFF
