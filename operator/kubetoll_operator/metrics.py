"""The operator's Prometheus metrics and the endpoint that serves them.

One registry per process: the handlers and the webhooks record into it through
the functions below, and `register` adds a kopf start-up handler that serves it
on `OperatorOptions.metrics_addr:metrics_port` (`/metrics`), so the chart's
PodMonitor scrapes every replica: both answer admission requests, only the
active one reconciles.

The names (docs/install.md, "Operator metrics"; the chart's alerts use them):

* `kubetoll_operator_reconciles_total{kind, result}`: kind is what ran,
  `compile` (a namespace with resources), `cleanup` (its last resource went) or
  `spend` (a spend report); result `ok`, `problems` (compiled, with errors on
  some resources), `no_config` (nothing compiled; the last config stays),
  `store_unavailable` (a spend report that could not read Redis) or `failed`
  (an exception; retried with backoff);
* `kubetoll_operator_reconcile_duration_seconds{kind}`;
* `kubetoll_operator_compile_errors{namespace, kind, reason}`: the errors of
  each namespace's last compile, by resource kind and reason (a gauge: the same
  problem recompiled is still one problem);
* `kubetoll_operator_last_successful_compile_timestamp_seconds{namespace}`:
  when a compile last produced a config for the namespace;
* `kubetoll_operator_admission_decisions_total{kind, decision}`: kind `mutate`
  (sidecar injection) or `validate`; decision `allowed`, `denied`, or `error`
  (the webhook itself failed and answered as its on-error setting says).

The `namespace` label is the app namespace; the PodMonitor keeps it
(`honorLabels`) rather than the operator pod's own namespace.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from typing import Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("kubetoll.operator.metrics")

ReconcileKind = Literal["compile", "cleanup", "spend"]
ReconcileResult = Literal["ok", "problems", "no_config", "store_unavailable", "failed"]
AdmissionKind = Literal["mutate", "validate"]

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "kubetoll_operator_reconciles",
    "Reconciles run, by kind (compile, cleanup, spend) and result.",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "kubetoll_operator_reconcile_duration_seconds",
    "Time a reconcile took, API calls included, by kind.",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
COMPILE_ERRORS = Gauge(
    "kubetoll_operator_compile_errors",
    "Errors in each namespace's last compile, by resource kind and reason.",
    ["namespace", "kind", "reason"],
    registry=REGISTRY,
)
LAST_SUCCESSFUL_COMPILE = Gauge(
    "kubetoll_operator_last_successful_compile_timestamp_seconds",
    "Unix time of the last compile that produced a namespace's config.",
    ["namespace"],
    registry=REGISTRY,
)
ADMISSIONS = Counter(
    "kubetoll_operator_admission_decisions",
    "Admission requests answered, by webhook kind (mutate, validate) and decision (allowed, denied, error).",
    ["kind", "decision"],
    registry=REGISTRY,
)

# The (kind, reason) series each namespace has now, to drop the ones its next compile no longer has.
_error_series: dict[str, set[tuple[str, str]]] = {}


def record_reconcile(kind: ReconcileKind, result: ReconcileResult, seconds: float | None = None) -> None:
    """One reconcile; `seconds` None (one that raised part way): its duration says nothing, so none is observed."""
    RECONCILES.labels(kind, result).inc()
    if seconds is not None:
        RECONCILE_SECONDS.labels(kind).observe(seconds)


def record_compile(namespace: str, errors: Iterable[tuple[str, str]], produced_config: bool) -> None:
    """A compile's outcome: its errors as (resource kind, reason), and whether it produced a config."""
    counts: dict[tuple[str, str], int] = {}
    for key in errors:
        counts[key] = counts.get(key, 0) + 1
    for gone in _error_series.get(namespace, set()) - set(counts):
        COMPILE_ERRORS.remove(namespace, *gone)
    for (kind, reason), n in counts.items():
        COMPILE_ERRORS.labels(namespace, kind, reason).set(n)
    _error_series[namespace] = set(counts)
    if produced_config:
        LAST_SUCCESSFUL_COMPILE.labels(namespace).set(time.time())


def forget_namespace(namespace: str) -> None:
    """The namespace has no resources left: its series go (no alert on a namespace that is gone)."""
    for gone in _error_series.pop(namespace, set()):
        COMPILE_ERRORS.remove(namespace, *gone)
    try:
        LAST_SUCCESSFUL_COMPILE.remove(namespace)
    except KeyError:
        pass


def record_admission(kind: AdmissionKind, allowed: bool, *, error: bool = False) -> None:
    """One admission answer; `error`: the webhook failed and answered `allowed` as its on-error setting says."""
    ADMISSIONS.labels(kind, "error" if error else "allowed" if allowed else "denied").inc()


def exposition() -> bytes:
    return generate_latest(REGISTRY)


# --------------------------------------------------------------------------- the endpoint


async def start_server(addr: str, port: int) -> tuple[Any, int]:
    """Serve /metrics on addr:port (0: any free port); the aiohttp runner and the port bound."""
    from aiohttp import web

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # A socket of our own, so the port bound (port 0 in tests) is known.
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    bound = sock.getsockname()[1]
    return runner, int(bound)


def register(registry: Any) -> None:
    """Start the endpoint with the operator and stop it at its end (`metrics_port` None: not served)."""
    import kopf

    @kopf.on.startup(id="kubetoll-metrics-server", registry=registry)
    async def _serve(memo: Any, **_: Any) -> None:
        options = getattr(memo, "options", None)
        port = getattr(options, "metrics_port", None)
        if port is None:
            return
        addr = getattr(options, "metrics_addr", "0.0.0.0")
        memo.metrics_runner, memo.metrics_port = await start_server(addr, port)
        log.info("operator metrics on http://%s:%d/metrics", addr, memo.metrics_port)

    @kopf.on.cleanup(id="kubetoll-metrics-server", registry=registry)
    async def _stop(memo: Any, **_: Any) -> None:
        runner = getattr(memo, "metrics_runner", None)
        if runner is not None:
            memo.metrics_runner = None
            await runner.cleanup()


__all__ = [
    "REGISTRY",
    "exposition",
    "forget_namespace",
    "record_admission",
    "record_compile",
    "record_reconcile",
    "register",
    "start_server",
]
