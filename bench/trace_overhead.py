"""What traces cost a request: the tracing hooks the pipeline and the forwarder call, in-process.

Per request: the request span (with an app's traceparent), one attempt span (its
traceparent written into the upstream headers), both ended with their attributes,
as `pipeline.Pipeline.handle` and `forwarder.Forwarder.forward` do. Three settings:

 off      no telemetry.otlp.endpoint: the no-op hooks (tracing.OFF)
 on       an endpoint (a port nothing listens on) and a queue that drops every span:
          the cost on the event loop alone
 on+enc   the same with a queue that keeps them: the export thread also encodes each
          batch to protobuf (and holds the GIL meanwhile), before its export fails

Prints microseconds per request (CPU on one core, median of --rounds); never asserts.

    .venv/bin/python bench/trace_overhead.py [--requests 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "sidecar")]

from kubetoll_core.router_config import Backend, TelemetrySettings  # noqa: E402
from kubetoll_core.usage import Usage  # noqa: E402
from kubetoll_sidecar import tracing  # noqa: E402
from kubetoll_sidecar.metrics import Metrics  # noqa: E402
from kubetoll_sidecar.providers.base import UpstreamRequest  # noqa: E402

TRACEPARENT = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


def run(t: tracing.Tracing, backend: Backend, n: int) -> float:
    """Seconds of CPU per request."""
    state = types.SimpleNamespace(backends={backend.name: types.SimpleNamespace(config=backend)})
    ctx = types.SimpleNamespace(
        req=types.SimpleNamespace(model="chat"),
        endpoint="chat",
        status=200,
        request_id="r1",
        outcome="ok",
        fallbacks=0,
        cost=0.00123,
        route_name="chat",
        tier="free",
        tenant="acme",
        backend=backend.name,
        state=state,
        usage=Usage(812, 96),
        spillover="",
        downgraded=False,
        cache=None,
    )
    result = types.SimpleNamespace(status=200, error=None, body={"model": "gpt-4o-2024-08-06"}, usage=Usage(812, 96))
    start = time.process_time()
    for _ in range(n):
        request = t.request(TRACEPARENT)
        req = UpstreamRequest("POST", "http://127.0.0.1:9/v1/chat/completions", {}, b"")
        attempt = t.attempt(backend, "chat", req)
        attempt.end([result])
        request.end(ctx)  # type: ignore[arg-type]  # the attributes end() reads, without a live request
    return (time.process_time() - start) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests per round (default 20000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per setting (default 3)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the export failures' WARNING line is expected here
    backend = Backend.model_validate(
        {
            "name": "primary",
            "provider": "openai",
            "model": "gpt-4o",
            "endpoint": "http://127.0.0.1:9/v1",
            "credentials": {"env": "UNUSED"},
        }
    )
    endpoint = {"endpoint": "http://127.0.0.1:9"}
    settings = {
        "off": TelemetrySettings(),
        "on": TelemetrySettings.model_validate({"otlp": endpoint, "maxQueuedSpans": 1}),
        "on+enc": TelemetrySettings.model_validate({"otlp": endpoint, "maxQueuedSpans": 1_000_000}),
    }
    with tempfile.TemporaryDirectory() as creds:
        for label, s in settings.items():
            t = tracing.build(s, creds, Metrics())
            per = statistics.median(run(t, backend, args.requests) for _ in range(args.rounds))
            print(f"{label:7} {per * 1e6:7.1f} us of CPU per request (request span + one attempt span)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
