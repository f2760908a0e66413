"""OpenTelemetry traces of the sidecar's requests (docs/sidecar.md, "Traces").

Imported only by `tracing.build` when `telemetry.otlp.endpoint` is set: this is
the one module of the sidecar that imports OpenTelemetry (the `traces` extra).

Spans follow the OpenTelemetry GenAI semantic conventions: a SERVER span per
request (`{gen_ai.operation.name} {gen_ai.request.model}`) with the usage, the
model that answered and Kubetoll's own attributes (cost, budget decision, cache
result, fallbacks, route, tier, the tenant as a keyed hash), and a CLIENT span
per upstream attempt (backend, HTTP status, failure class; its duration is the
span's). Nothing of a request's headers, prompt or answer is recorded, and an
upstream's error message is not either (providers echo parts of keys in them).

Export is off the request path: finished spans go into a bounded queue that a
thread of the sidecar's drains in batches to the collector. A full queue drops
the span, a failed export drops its batch; both are counted in
`kubetoll_traces_dropped_total`, so a dead collector costs a request nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import hmac
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kubetoll_core.enums import Provider
from kubetoll_core.router_config import Backend, TelemetrySettings
from kubetoll_core.spend_record import EXHAUSTED_RESPONSE_OUTCOME

from .tracing import CURRENT_REQUEST

if TYPE_CHECKING:
    from .context import RequestContext
    from .metrics import Metrics
    from .providers.base import UpstreamRequest, Usage

log = logging.getLogger("kubetoll.sidecar")

TRACES_PATH = "/v1/traces"
EXPORT_BATCH = 512  # spans per export call
EXPORT_INTERVAL_SECONDS = 0.5  # how long a finished span waits, at most, when fewer than a batch are queued

# gen_ai.operation.name by the API called (an inbound API is a chat, as its estimate is).
OPERATIONS = {
    "chat": "chat",
    "responses": "chat",
    "messages": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
# gen_ai.provider.name's well-known values; an OpenAI-compatible server speaks OpenAI's API.
PROVIDER_NAMES = {
    Provider.openai: "openai",
    Provider.openai_compatible: "openai",
    Provider.azure_openai: "azure.ai.openai",
    Provider.anthropic: "anthropic",
}
# The outcomes of a request refused by a budget (pipeline.py sets them).
REJECTED_OUTCOMES = frozenset({"rejected", "suspended", "budget_unavailable"})


class TelemetryConfigError(Exception):
    """The telemetry settings name a file that cannot be used (the message names it, never its content)."""


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: the endpoint as given, or with /v1/traces when it has no path."""
    return endpoint.rstrip("/") + TRACES_PATH if urlsplit(endpoint).path in ("", "/") else endpoint


def read_headers(path: Path) -> dict[str, str]:
    """`Name: value` lines (blank lines and `#` comments skipped)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise TelemetryConfigError(f"telemetry.otlp.headersFile {str(path)!r} cannot be read: {exc.strerror}") from None
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name or any(c in name for c in ' \t()<>@,;\\"/[]?={}') or not value:
            # The line is not echoed: it holds a credential.
            raise TelemetryConfigError(
                f"telemetry.otlp.headersFile {str(path)!r} line {number}: expected `Name: value`"
            )
        headers[name] = value
    return headers


def read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise TelemetryConfigError(
            f"telemetry.tenantHashKeyFile {str(path)!r} cannot be read: {exc.strerror}"
        ) from None
    if len(key) < 16:
        raise TelemetryConfigError(f"telemetry.tenantHashKeyFile {str(path)!r} holds fewer than 16 bytes")
    return key


class BoundedExport(SpanProcessor):
    """Finished spans into a bounded queue; a thread exports them in batches.

    The SDK's BatchSpanProcessor drops silently when full; this one counts every span
    it does not deliver (queue full, export failed, left at shutdown) in the metric."""

    def __init__(self, exporter: SpanExporter, max_queued: int, dropped: Any) -> None:
        self.exporter = exporter
        self.max_queued = max_queued
        self.dropped = dropped  # the kubetoll_traces_dropped counter (labels: reason)
        self.exported = 0  # spans the collector accepted
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="kubetoll-trace-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            if self._stopping or len(self._queue) >= self.max_queued:
                full = not self._stopping
            else:
                self._queue.append(span)
                if len(self._queue) >= EXPORT_BATCH:
                    self._wake.set()
                return
        self.dropped.labels("queue_full" if full else "shutdown").inc()

    def _take(self) -> list[ReadableSpan]:
        with self._lock:
            return [self._queue.popleft() for _ in range(min(EXPORT_BATCH, len(self._queue)))]

    def _run(self) -> None:
        while True:
            self._wake.wait(EXPORT_INTERVAL_SECONDS)
            self._wake.clear()
            while batch := self._take():
                self._export(batch)
            if self._stopping:
                return

    def _export(self, batch: list[ReadableSpan]) -> None:
        try:
            ok = self.exporter.export(batch) is SpanExportResult.SUCCESS
        except Exception:  # the exporter's own failure must not end the thread
            ok = False
        if ok:
            self.exported += len(batch)
            if self._failing:
                self._failing = False
                log.info("trace export to the collector works again")
            return
        self.dropped.labels("export_failed").inc(len(batch))
        if not self._failing:  # once per outage, not once per batch
            self._failing = True
            log.warning("trace export to the collector failed; spans are dropped until it answers again")

    def shutdown(self, timeout: float = 2.0) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            left = len(self._queue)
            self._queue.clear()
        if left:
            self.dropped.labels("shutdown").inc(left)
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._wake.set()
        return True


# The request span of the request this task serves (fan-out tasks inherit it): tracing.CURRENT_REQUEST.
_CURRENT: contextvars.ContextVar[RequestSpan | None] = CURRENT_REQUEST


@dataclass(slots=True)
class Answered:
    """What the attempt that answered tells the request span."""

    response_model: str = ""
    address: str = ""
    port: int | None = None


class OtelTracing:
    def __init__(
        self,
        settings: TelemetrySettings,
        credentials_dir: str,
        metrics: Metrics,
        resource: Mapping[str, str] | None = None,
    ) -> None:
        otlp = settings.otlp
        assert otlp.endpoint is not None
        headers = read_headers(Path(credentials_dir) / otlp.headers_file) if otlp.headers_file else {}
        key_file = settings.tenant_hash_key_file
        self.tenant_key = read_key(Path(credentials_dir) / key_file) if key_file else os.urandom(32)
        # The exporter's per-failure log lines: one line per outage instead (BoundedExport).
        logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)
        self.exporter = OTLPSpanExporter(
            endpoint=traces_url(otlp.endpoint), headers=headers, timeout=otlp.timeout_seconds
        )
        self.processor = BoundedExport(self.exporter, settings.max_queued_spans, metrics.traces_dropped)
        # Not the global provider: several sidecars may share a process (tests, `kubetoll run`).
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            resource=Resource.create({"service.name": "kubetoll-sidecar", **(resource or {})}),
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("kubetoll_sidecar")
        self.propagator = TraceContextTextMapPropagator()

    def tenant_hash(self, tenant: str) -> str:
        return hmac.new(self.tenant_key, tenant.encode(), sha256).hexdigest()[:32]

    def request(self, headers: Mapping[str, str]) -> RequestSpan:
        parent = self.propagator.extract(headers)  # traceparent/tracestate; none or invalid: a new trace
        span = self.tracer.start_span("kubetoll.request", context=parent, kind=SpanKind.SERVER)
        return RequestSpan(self, span)

    def attempt(self, backend: Backend, endpoint: str, req: UpstreamRequest) -> AttemptSpan:
        current = _CURRENT.get()
        span, address, port = self.client_span(
            current.span if current is not None else None,
            backend,
            OPERATIONS.get(endpoint, "chat"),
            req.url,
            req.headers,
        )
        return AttemptSpan(span, current, address, port)

    def client_span(
        self,
        parent: Any,
        backend: Backend,
        operation: str,
        url: str,
        headers: dict[str, str],
        extra: dict[str, str] | None = None,
    ) -> tuple[Any, str, int]:
        """A CLIENT span for a call to `backend` at `url`, child of `parent` (a span, or None for a new
        trace), with the GenAI attributes; its traceparent goes into `headers`. (span, address, port)."""
        context = trace.set_span_in_context(parent) if parent is not None else None
        span = self.tracer.start_span(f"{operation} {backend.model}", context=context, kind=SpanKind.CLIENT)
        address, port = _server(url)
        if span.is_recording():
            span.set_attributes(
                {
                    "gen_ai.operation.name": operation,
                    "gen_ai.provider.name": PROVIDER_NAMES.get(backend.provider, backend.provider.value),
                    "gen_ai.request.model": backend.model,
                    "server.address": address,
                    "server.port": port,
                    "kubetoll.backend": backend.name,
                    **(extra or {}),
                }
            )
        # The callee's parent is this span (the W3C headers; tracestate is the app's, carried along).
        self.propagator.inject(headers, context=trace.set_span_in_context(span))
        return span, address, port

    async def close(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self.processor.shutdown, timeout), timeout + 0.5)
        except TimeoutError:
            log.warning("trace export still in flight at shutdown was dropped")
        self.provider.shutdown()


def _server(url: str) -> tuple[str, int]:
    """server.address and server.port of a call to `url` (the scheme's port when it names none)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


class RequestSpan:
    __slots__ = ("tracing", "span", "answered", "_token")

    def __init__(self, tracing: OtelTracing, span: Any) -> None:
        self.tracing, self.span = tracing, span
        self.answered = Answered()
        self._token = _CURRENT.set(self)

    def call(self, backend: Backend, operation: str, purpose: str, url: str, headers: dict[str, str]) -> CallSpan:
        """A CLIENT child for a call made on this request's behalf (tracing.call)."""
        span, _, _ = self.tracing.client_span(self.span, backend, operation, url, headers, {"kubetoll.call": purpose})
        return CallSpan(span)

    def end(self, ctx: RequestContext) -> None:
        try:
            if self.span.is_recording():
                self._describe(ctx)
            self.span.end()
        finally:
            _CURRENT.reset(self._token)

    def _describe(self, ctx: RequestContext) -> None:
        span, req = self.span, ctx.req
        operation = OPERATIONS.get(ctx.endpoint, "chat")
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "http.response.status_code": ctx.status,
            "kubetoll.request_id": ctx.request_id,
            "kubetoll.outcome": ctx.outcome,
            "kubetoll.fallbacks": ctx.fallbacks,
            "kubetoll.cost_usd": ctx.cost,
        }
        if req is not None:
            attrs["gen_ai.request.model"] = req.model
            span.update_name(f"{operation} {req.model}")
        if ctx.route_name:
            attrs["kubetoll.route"] = ctx.route_name
        if ctx.tier:
            attrs["kubetoll.tier"] = ctx.tier
        if ctx.tenant:
            attrs["kubetoll.tenant.hash"] = self.tracing.tenant_hash(ctx.tenant)
        runtime = ctx.state.backends.get(ctx.backend) if ctx.backend else None
        if runtime is not None:
            b = runtime.config
            a = self.answered
            attrs["kubetoll.backend"] = b.name
            attrs["gen_ai.provider.name"] = PROVIDER_NAMES.get(b.provider, b.provider.value)
            attrs["gen_ai.response.model"] = a.response_model or b.model
            if a.address:
                attrs["server.address"] = a.address
                if a.port is not None:
                    attrs["server.port"] = a.port
        if ctx.usage is not None:
            attrs["gen_ai.usage.input_tokens"] = ctx.usage.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = ctx.usage.completion_tokens
            attrs["kubetoll.usage.reported"] = ctx.usage.reported
        if ctx.spillover:
            attrs["kubetoll.spillover"] = ctx.spillover
        decision = budget_decision(ctx)
        if decision:
            attrs["kubetoll.budget.decision"] = decision
        if ctx.cache is not None:
            hit = ctx.cache.hit
            attrs["kubetoll.cache.result"] = "hit" if hit is not None else ctx.cache.status
            if hit is not None:
                attrs["kubetoll.cache.kind"] = hit.kind
        if ctx.status >= 400:
            attrs["error.type"] = ctx.outcome
        span.set_attributes(attrs)
        if ctx.status >= 500:
            span.set_status(Status(StatusCode.ERROR))


def budget_decision(ctx: RequestContext) -> str:
    """admit, downgrade, reject or respond (the budget's exhaustedResponse); "" before admission was reached."""
    if ctx.outcome in REJECTED_OUTCOMES:
        return "reject"
    if ctx.outcome == EXHAUSTED_RESPONSE_OUTCOME:
        return "respond"
    if ctx.downgraded:
        return "downgrade"
    if ctx.backend or ctx.outcome == "all_backends_failed" or (ctx.cache is not None and ctx.cache.hit is not None):
        return "admit"
    return ""


class AttemptSpan:
    __slots__ = ("span", "request", "address", "port")

    def __init__(self, span: Any, request: RequestSpan | None, address: str, port: int | None) -> None:
        self.span, self.request, self.address, self.port = span, request, address, port

    def end(self, results: Sequence[Any]) -> None:
        span = self.span
        failed = next((r for r in results if r.error is not None), None)
        if span.is_recording():
            attrs: dict[str, Any] = {}
            if len(results) > 1:
                attrs["kubetoll.calls"] = len(results)  # fan-out: n one-choice calls
            if failed is not None:
                err = failed.error
                if failed.status or err.status:
                    attrs["http.response.status_code"] = failed.status or err.status
                kind = err.failure.value if err.failure is not None else "upstream_error"
                attrs["kubetoll.failure_class"] = kind
                attrs["error.type"] = kind
                span.set_status(Status(StatusCode.ERROR))
            else:
                first = results[0]
                attrs["http.response.status_code"] = first.status
                model = first.body.get("model") if isinstance(first.body, dict) else None
                if isinstance(model, str) and model:
                    attrs["gen_ai.response.model"] = model
                usages = [r.usage for r in results if r.usage is not None and r.usage.reported]
                if usages and len(usages) == len(results):
                    attrs["gen_ai.usage.input_tokens"] = sum(u.prompt_tokens for u in usages)
                    attrs["gen_ai.usage.output_tokens"] = sum(u.completion_tokens for u in usages)
            span.set_attributes(attrs)
        span.end()
        if failed is None and self.request is not None:
            a = self.request.answered
            a.address, a.port = self.address, self.port
            model = results[0].body.get("model") if isinstance(results[0].body, dict) else None
            a.response_model = model if isinstance(model, str) else ""

    def cancelled(self) -> None:
        self.span.set_attribute("error.type", "cancelled")
        self.span.end()


class CallSpan:
    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def end(self, status: int | None, usage: Usage | None, error: str | None) -> None:
        span = self.span
        if span.is_recording():
            attrs: dict[str, Any] = {}
            if status is not None:
                attrs["http.response.status_code"] = status
            if usage is not None:
                attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
                attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
                attrs["kubetoll.usage.reported"] = usage.reported
            if error is not None:
                # The kind only: an upstream's message can echo parts of a key.
                attrs["error.type"] = error
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attrs)
        span.end()
