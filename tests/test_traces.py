"""OpenTelemetry traces (docs/sidecar.md, "Traces"), against running sidecars.

Each sidecar exports to an OTLP/HTTP receiver in this process (an aiohttp server
on port 0 that decodes `ExportTraceServiceRequest`s as a collector would), and
its requests go through the official OpenAI SDK to simulated upstreams. What is
checked is what a collector receives: span names, kinds, parents and attributes.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import threading
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from pydantic import ValidationError

from kubetoll_core.periods import FakeClock
from kubetoll_core.router_config import RouterConfig
from kubetoll_sidecar import otel_tracing
from kubetoll_sidecar.metrics import Metrics
from kubetoll_tools.simulator import Fault
from support.harness import base_config, two_backend_config, wait_until
from support.ports import refusing_port

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2
COLLECTOR_TOKEN = "Bearer collector-secret-4d1f"
TENANT = "acme-corp"
HASH_KEY = b"a-key-of-32-bytes-for-tenant-ids"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN_ID = "00f067aa0ba902b7"
T0 = 1_790_000_000.0  # a fixed wall clock: a request-rate window that does not roll over mid-test


class Receiver:
    """POST /v1/traces, as an OTLP/HTTP collector takes it (protobuf)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        export = ExportTraceServiceRequest.FromString(await request.read())
        for rs in export.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        {
                            "name": s.name,
                            "kind": s.kind,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(),
                            "status": s.status.code,
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in s.attributes},
                            "resource": resource,
                        }
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def requests(self) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["kind"] == SERVER]

    def attempts(self, parent: dict[str, Any]) -> list[dict[str, Any]]:
        """The attempt spans under a request span, in the order they started."""
        children = [s for s in self.spans if s["parent"] == parent["span_id"] and s["trace_id"] == parent["trace_id"]]
        return sorted(children, key=lambda s: s["start"])

    def request_span(self, request_id: str) -> dict[str, Any] | None:
        return next((s for s in self.requests() if s["attributes"].get("kubetoll.request_id") == request_id), None)


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@pytest.fixture
async def receiver():
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    d = tmp_path / "credentials"
    d.mkdir()
    (d / "otel-headers").write_text(f"# the collector's login\nAuthorization: {COLLECTOR_TOKEN}\n")
    (d / "tenant-key").write_bytes(HASH_KEY)
    return d


def traced(cfg: dict[str, Any], endpoint: str, creds: Path, **telemetry: Any) -> dict[str, Any]:
    cfg["server"]["credentialsDir"] = str(creds)
    cfg["telemetry"] = {
        "otlp": {"endpoint": endpoint, "headersFile": "otel-headers", "timeoutSeconds": 2},
        "tenantHashKeyFile": "tenant-key",
        **telemetry,
    }
    return cfg


async def chat(sc, **kw: Any) -> Any:
    return await sc.openai().chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "Where is my parcel?"}], **kw
    )


async def span_of(receiver: Receiver, request_id: str, attempts: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The request's span and its attempt spans, once the sidecar has exported them."""

    def arrived() -> bool:
        span = receiver.request_span(request_id)
        return span is not None and len(receiver.attempts(span)) >= attempts

    await wait_until(arrived, timeout=10)
    span = receiver.request_span(request_id)
    assert span is not None
    return span, receiver.attempts(span)


# --------------------------------------------------------------------------- the request span


async def test_a_chat_gives_a_request_span_with_the_genai_attributes_of_its_answer(sim, start_sidecar, receiver, creds):
    sc = await start_sidecar(traced(base_config(sim.url), receiver.url, creds))
    raw = await chat(sc, extra_headers={"x-kubetoll-tenant": TENANT})
    answer = raw.parse()
    span, attempts = await span_of(receiver, raw.headers["x-request-id"], 1)
    (record,) = list(sc.sidecar.ledger.records())
    assert len(receiver.requests()) == 1  # one request, one request span
    a = span["attributes"]
    assert span["name"] == "chat chat" and span["kind"] == SERVER and span["parent"] == ""
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "chat"  # what the app asked for: the route
    assert a["gen_ai.response.model"] == answer.model  # what answered, as the upstream said
    assert a["gen_ai.provider.name"] == "openai"
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", sim.port)
    assert a["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens == record.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens == record.completion_tokens
    assert a["kubetoll.cost_usd"] == pytest.approx(record.cost_usd) and record.cost_usd > 0
    assert a["kubetoll.cost_usd"] == pytest.approx(float(raw.headers["x-kubetoll-cost-usd"]))
    assert a["kubetoll.budget.decision"] == "admit"
    assert a["kubetoll.fallbacks"] == 0
    assert a["kubetoll.route"] == "chat" and a["kubetoll.backend"] == "primary"
    assert a["http.response.status_code"] == 200
    # The tenant as the keyed hash of the key file: the same in every sidecar given that key, never the id.
    assert a["kubetoll.tenant.hash"] == hmac.new(HASH_KEY, TENANT.encode(), hashlib.sha256).hexdigest()[:32]
    assert span["resource"]["service.name"] == "kubetoll-sidecar"
    assert span["resource"]["k8s.namespace.name"] == "test"
    # One attempt, a CLIENT child of the request span, describing the upstream call.
    (attempt,) = attempts
    b = attempt["attributes"]
    assert attempt["kind"] == CLIENT and attempt["name"] == "chat gpt-4o"
    assert b["kubetoll.backend"] == "primary" and b["gen_ai.request.model"] == "gpt-4o"
    assert b["http.response.status_code"] == 200 and "kubetoll.failure_class" not in b
    assert b["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert span["start"] <= attempt["start"] <= attempt["end"] <= span["end"]
    # The collector got its login from the headers file; no span carries a credential or the tenant id.
    assert receiver.headers[0]["authorization"] == COLLECTOR_TOKEN
    values = [str(v) for s in receiver.spans for v in s["attributes"].values()]
    for secret in (os.environ["KT_TEST_OPENAI_KEY"], COLLECTOR_TOKEN, "collector-secret", TENANT):
        assert not any(secret in v for v in values), secret


async def test_a_streamed_chat_span_carries_the_streams_usage(sim, start_sidecar, receiver, creds):
    sc = await start_sidecar(traced(base_config(sim.url), receiver.url, creds))
    stream = await sc.openai().chat.completions.with_raw_response.create(
        model="chat",
        messages=[{"role": "user", "content": "Tell me about parcels."}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    async for chunk in stream.parse():
        usage = chunk.usage or usage
    assert usage is not None
    span, (attempt,) = await span_of(receiver, stream.headers["x-request-id"], 1)
    (record,) = list(sc.sidecar.ledger.records())
    assert span["attributes"]["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert span["attributes"]["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert span["attributes"]["kubetoll.cost_usd"] == pytest.approx(record.cost_usd)
    # The request span lasts until the stream ended, after its attempt (which ends at the first chunk).
    assert attempt["end"] <= span["end"]


@pytest.mark.parametrize("fault,failure", [(Fault(status=429), "rateLimited"), (Fault(status=503), "serverError")])
async def test_a_fallback_gives_a_failed_attempt_span_then_an_ok_one(
    sim, sim2, start_sidecar, receiver, creds, fault, failure
):
    sc = await start_sidecar(
        traced(two_backend_config(sim, sim2, fallbackOn=["rateLimited", "serverError"]), receiver.url, creds)
    )
    sim.enqueue_fault(fault)
    raw = await chat(sc)
    assert raw.headers["x-kubetoll-backend"] == "secondary"
    span, attempts = await span_of(receiver, raw.headers["x-request-id"], 2)
    first, second = attempts
    assert first["attributes"]["kubetoll.backend"] == "primary"
    assert first["attributes"]["http.response.status_code"] == fault.status
    assert first["attributes"]["kubetoll.failure_class"] == failure == first["attributes"]["error.type"]
    assert first["status"] == STATUS_ERROR
    assert second["attributes"]["kubetoll.backend"] == "secondary"
    assert second["attributes"]["http.response.status_code"] == 200
    assert "kubetoll.failure_class" not in second["attributes"] and second["status"] != STATUS_ERROR
    assert first["end"] <= second["start"]
    a = span["attributes"]
    assert a["kubetoll.fallbacks"] == 1 and a["kubetoll.backend"] == "secondary"
    assert a["gen_ai.response.model"] == "gpt-4o-mini"
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", sim2.port)


async def test_an_apps_traceparent_is_the_parent_and_the_upstream_gets_the_attempt_as_its_own(
    sim, start_sidecar, receiver, creds
):
    sc = await start_sidecar(traced(base_config(sim.url), receiver.url, creds))
    raw = await chat(
        sc, extra_headers={"traceparent": f"00-{TRACE_ID}-{APP_SPAN_ID}-01", "tracestate": "vendor=opaque"}
    )
    span, (attempt,) = await span_of(receiver, raw.headers["x-request-id"], 1)
    assert span["trace_id"] == TRACE_ID and span["parent"] == APP_SPAN_ID
    assert attempt["trace_id"] == TRACE_ID
    (upstream,) = [r for r in sim.requests if r.path.endswith("/chat/completions")]
    version, trace_id, parent, flags = upstream.headers["traceparent"].split("-")
    assert (version, trace_id, parent, flags) == ("00", TRACE_ID, attempt["span_id"], "01")
    assert upstream.headers["tracestate"] == "vendor=opaque"


async def test_an_unsampled_parent_is_followed_and_still_propagated(sim, start_sidecar, receiver, creds):
    """sampleRatio decides only for traces started here: an app's unsampled trace stays unsampled
    (nothing exported), and the upstream still gets its trace id, flagged unsampled."""
    sc = await start_sidecar(traced(base_config(sim.url), receiver.url, creds, sampleRatio=1.0))
    await chat(sc, extra_headers={"traceparent": f"00-{TRACE_ID}-{APP_SPAN_ID}-00"})
    (upstream,) = [r for r in sim.requests if r.path.endswith("/chat/completions")]
    _, trace_id, _, flags = upstream.headers["traceparent"].split("-")
    assert (trace_id, flags) == (TRACE_ID, "00")
    raw = await chat(sc)  # a sampled request after it: once it is exported, the first was not
    await span_of(receiver, raw.headers["x-request-id"], 1)
    assert all(s["trace_id"] != TRACE_ID for s in receiver.spans)


async def test_a_cache_hit_span_says_hit_and_has_no_attempt(sim, start_sidecar, receiver, creds):
    cfg = base_config(
        sim.url,
        cachePolicies=[{"name": "faq", "scope": "namespace", "exact": {"enabled": True, "ttlSeconds": 600}}],
    )
    cfg["routes"][0]["cachePolicy"] = "faq"
    sc = await start_sidecar(traced(cfg, receiver.url, creds))
    first = await chat(sc, temperature=0)
    await sc.sidecar.cache.drain()  # the store is fire-and-forget
    second = await chat(sc, temperature=0)
    assert second.headers["x-kubetoll-cache"] == "hit-exact"
    miss, _ = await span_of(receiver, first.headers["x-request-id"], 1)
    hit, attempts = await span_of(receiver, second.headers["x-request-id"], 0)
    assert miss["attributes"]["kubetoll.cache.result"] == "miss"
    assert hit["attributes"]["kubetoll.cache.result"] == "hit"
    assert hit["attributes"]["kubetoll.cache.kind"] == "exact"
    assert hit["attributes"]["kubetoll.cost_usd"] == 0
    assert hit["attributes"]["kubetoll.budget.decision"] == "admit"
    assert attempts == [] and [s for s in receiver.spans if s["trace_id"] == hit["trace_id"]] == [hit]


async def test_a_budget_rejection_is_in_the_span(sim, start_sidecar, receiver, creds):
    cfg = base_config(sim.url, budgets=[{"name": "b", "tiers": {"default": {"requestsPerMinute": 1}}}])
    sc = await start_sidecar(traced(cfg, receiver.url, creds), clock=FakeClock(T0))
    await chat(sc)
    with pytest.raises(openai.RateLimitError) as exc:
        await chat(sc)
    span, attempts = await span_of(receiver, exc.value.response.headers["x-request-id"], 0)
    assert span["attributes"]["kubetoll.budget.decision"] == "reject"
    assert span["attributes"]["http.response.status_code"] == 429
    assert span["attributes"]["error.type"] == "rejected"
    assert attempts == []


# --------------------------------------------------------------------------- a collector away


async def test_a_dead_collector_fails_no_request_and_its_spans_are_counted_dropped(sim, start_sidecar, creds):
    with refusing_port() as port:
        sc = await start_sidecar(traced(base_config(sim.url), f"http://127.0.0.1:{port}", creds))
        for _ in range(5):
            raw = await chat(sc)
            assert raw.http_response.status_code == 200
        dropped = sc.sidecar.metrics.traces_dropped.labels("export_failed")
        await wait_until(lambda: dropped._value.get() >= 10, timeout=15)  # 5 request spans, 5 attempt spans


class BlockedExporter:
    """An exporter whose collector never answers (until released)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.batches: list[int] = []

    def export(self, spans: Any) -> Any:
        self.batches.append(len(spans))
        self.release.wait()
        return otel_tracing.SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.release.set()


def test_the_export_queue_is_bounded_and_counts_what_it_drops():
    """With the collector stuck, at most one batch is in the exporter and maxQueuedSpans wait: the rest is
    dropped at once (never waited for) and counted."""
    metrics = Metrics()
    exporter = BlockedExporter()
    processor = otel_tracing.BoundedExport(exporter, 2, metrics.traces_dropped)  # type: ignore[arg-type]
    for _ in range(10):
        processor.on_end(object())  # type: ignore[arg-type]
    full = metrics.traces_dropped.labels("queue_full")._value.get()
    assert full >= 6  # at most 2 taken by the stuck export, 2 queued
    exporter.release.set()  # the collector answers again (refusing): what was taken and queued fails now
    processor.shutdown(timeout=5)
    dropped = sum(metrics.traces_dropped.labels(r)._value.get() for r in ("queue_full", "export_failed", "shutdown"))
    assert dropped == 10  # every span accounted for: none reached a collector


# --------------------------------------------------------------------------- settings


def test_telemetry_settings_are_checked():
    cfg = RouterConfig.model_validate(
        {"telemetry": {"otlp": {"endpoint": "http://collector:4318"}, "sampleRatio": 0.25}}
    )
    assert cfg.telemetry.otlp.protocol == "http/protobuf" and cfg.telemetry.sample_ratio == 0.25
    assert RouterConfig().telemetry.otlp.endpoint is None  # off by default
    for bad, where in [
        ({"otlp": {"endpoint": "collector:4317"}}, "telemetry.otlp.endpoint"),
        ({"otlp": {"endpoint": "http://c:4318", "protocol": "grpc"}}, "protocol"),
        ({"otlp": {"endpoint": "http://c:4318", "headersFile": "../etc/passwd"}}, "headersFile"),
        ({"sampleRatio": 1.5}, "sampleRatio"),
        ({"tenantHashKeyFile": "keys/k"}, "tenantHashKeyFile"),
    ]:
        with pytest.raises(ValidationError, match=where):
            RouterConfig.model_validate({"telemetry": bad})
    assert otel_tracing.traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert otel_tracing.traces_url("https://c/otlp/v1/traces") == "https://c/otlp/v1/traces"


def test_a_malformed_headers_file_is_refused_without_echoing_it(tmp_path):
    path = tmp_path / "h"
    path.write_text("Authorization Bearer sk-live-123\n")
    with pytest.raises(otel_tracing.TelemetryConfigError, match="line 1: expected `Name: value`") as exc:
        otel_tracing.read_headers(path)
    assert "sk-live" not in str(exc.value)


async def test_unreadable_telemetry_files_leave_traces_off_and_requests_served(sim, start_sidecar, receiver, creds):
    (creds / "otel-headers").unlink()
    sc = await start_sidecar(traced(base_config(sim.url), receiver.url, creds))
    raw = await chat(sc)
    assert raw.http_response.status_code == 200
    assert sc.sidecar.tracing is not None and type(sc.sidecar.tracing).__name__ == "_Off"
    (upstream,) = [r for r in sim.requests if r.path.endswith("/chat/completions")]
    assert "traceparent" not in upstream.headers


async def test_a_reload_that_changes_telemetry_keeps_the_traces_in_use(sim, start_sidecar, receiver, creds, caplog):
    sc = await start_sidecar(traced(base_config(sim.url), receiver.url, creds))
    in_use = sc.sidecar.tracing
    changed = copy.deepcopy(sc.config)
    changed["telemetry"]["sampleRatio"] = 0.5
    sc.write_config(changed)
    await wait_until(lambda: sc.sidecar.metrics.config_reloads.labels("applied")._value.get() >= 1)
    assert "config changed telemetry; the traces in use stay until the next restart" in caplog.text
    assert sc.sidecar.tracing is in_use
    raw = await chat(sc)
    await span_of(receiver, raw.headers["x-request-id"], 1)  # still exported, sampled as at start


# --------------------------------------------------------------------------- calls made for a request


def semantic_config(sim_url: str, embed_url: str, verifier: dict[str, Any], verifier_backend: dict[str, Any]):
    cfg = base_config(sim_url)
    cfg["backends"] += [
        {
            "name": "embedder",
            "provider": "openai-compatible",
            "model": "hashed",
            "endpoint": embed_url,
            "pricing": {"inputPerMTok": 0.02, "outputPerMTok": 0},
        },
        verifier_backend,
    ]
    cfg["cachePolicies"] = [
        {
            "name": "faq",
            "cacheable": {"maxTemperature": 0.5},
            "exact": {"enabled": False},
            "semantic": {"enabled": True, "embeddingBackend": "embedder", "threshold": 0.5, "verifier": verifier},
        }
    ]
    cfg["routes"][0]["cachePolicy"] = "faq"
    return cfg


async def ask(sc: Any, question: str) -> Any:
    return await sc.openai().chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": question}], temperature=0
    )


def calls(receiver: Receiver, request_span: dict[str, Any], purpose: str) -> list[dict[str, Any]]:
    return [s for s in receiver.attempts(request_span) if s["attributes"].get("kubetoll.call") == purpose]


@pytest.mark.parametrize("kind", ["judge", "rerank"])
async def test_the_semantic_caches_embedding_and_verifier_calls_are_spans_of_the_request(
    sim, start_sidecar, receiver, creds, embed_server, monkeypatch, kind
):
    from kubetoll_tools.simulator_rerank import JudgeServer, RerankServer

    monkeypatch.setenv("KT_TEST_RERANK_KEY", "rerank-key")
    server: Any = JudgeServer(decide=lambda a, b: True) if kind == "judge" else RerankServer(api_key="rerank-key")
    async with server:
        if kind == "judge":
            backend = {"name": "judge", "provider": "openai-compatible", "model": "judge-small", "endpoint": server.url}
            verifier: dict[str, Any] = {"kind": "judge", "backend": "judge"}
        else:
            backend = {
                "name": "reranker",
                "provider": "openai-compatible",
                "model": "bge-reranker-base",
                "endpoint": server.url,
                "credentials": {"env": "KT_TEST_RERANK_KEY"},
            }
            verifier = {"kind": "rerank", "backend": "reranker", "api": "tei", "threshold": 0.0}
        backend["pricing"] = {"inputPerMTok": 0.15, "outputPerMTok": 0.6}
        cfg = semantic_config(sim.url, embed_server.url, verifier, backend)
        sc = await start_sidecar(traced(cfg, receiver.url, creds))
        first = await ask(sc, "How do I reset my password?")
        await sc.sidecar.cache.drain()
        second = await ask(sc, "how can I reset my password")
        miss, _ = await span_of(receiver, first.headers["x-request-id"], 2)  # the embedding, the upstream
        asked, _ = await span_of(receiver, second.headers["x-request-id"], 2)  # the embedding, the verifier
    (embedding,) = calls(receiver, miss, "cache_embedding")
    a = embedding["attributes"]
    assert embedding["kind"] == CLIENT and embedding["name"] == "embeddings hashed"
    assert a["kubetoll.backend"] == "embedder" and a["gen_ai.operation.name"] == "embeddings"
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", embed_server.port)
    assert a["http.response.status_code"] == 200 and a["gen_ai.usage.input_tokens"] > 0
    assert miss["start"] <= embedding["start"] <= embedding["end"]
    # The embedding server got the call span as its parent.
    assert f"-{embedding['span_id']}-" in (embed_server.traceparents[0] or "")
    (check,) = calls(receiver, asked, "cache_verifier")
    b = check["attributes"]
    model = backend["model"]
    assert check["name"] == (f"chat {model}" if kind == "judge" else f"rerank {model}")
    assert b["kubetoll.backend"] == backend["name"] and b["http.response.status_code"] == 200
    assert b["gen_ai.usage.input_tokens"] > 0 and check["status"] != STATUS_ERROR
    assert f"-{check['span_id']}-" in (server.traceparents[-1] or "")
    assert len(calls(receiver, asked, "cache_embedding")) == 1


async def test_a_failed_embedding_call_is_an_error_span_with_its_status_only(
    sim, start_sidecar, receiver, creds, embed_server
):
    cfg = semantic_config(
        sim.url,
        embed_server.url,
        {"kind": "rules"},
        {"name": "spare", "provider": "openai", "model": "gpt-4o-mini", "endpoint": sim.url + "/v1"},
    )
    sc = await start_sidecar(traced(cfg, receiver.url, creds))
    embed_server.fail = True
    raw = await ask(sc, "How do I reset my password?")
    assert raw.headers["x-kubetoll-cache"] == "miss"  # the answer is served; the semantic tier missed
    span, _ = await span_of(receiver, raw.headers["x-request-id"], 2)
    (embedding,) = calls(receiver, span, "cache_embedding")
    assert embedding["status"] == STATUS_ERROR
    assert embedding["attributes"]["error.type"] == "500"
    assert embedding["attributes"]["http.response.status_code"] == 500
    assert not any("simulated failure" in str(v) for v in embedding["attributes"].values())


def test_outside_a_traced_request_a_call_is_not_traced() -> None:
    from kubetoll_core.router_config import Backend
    from kubetoll_sidecar import tracing

    headers: dict[str, str] = {}
    backend = Backend.model_validate(
        {"name": "embedder", "provider": "openai-compatible", "model": "hashed", "endpoint": "http://127.0.0.1:9/v1"}
    )
    tracing.call(backend, "embeddings", tracing.CACHE_EMBEDDING, "http://127.0.0.1:9/v1", headers).end(200, None, None)
    assert headers == {}  # no traceparent: no span to be the parent of
