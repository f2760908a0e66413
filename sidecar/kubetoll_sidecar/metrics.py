"""Prometheus metrics, served on the metrics port (never the 127.0.0.1 API port).

Names follow the OpenTelemetry GenAI semantic conventions where they have one
(`gen_ai_client_token_usage`, `gen_ai_client_operation_duration_seconds`,
`gen_ai_server_time_to_first_token_seconds` measured from the client side);
the rest are `kubetoll_*`. Tenant ids are never labels (unbounded cardinality);
tiers are (a handful per budget).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .circuit import CLOSED, HALF_OPEN, OPEN

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
# Every value `kubetoll_circuit_state` has a series for (one-hot, as kube-state-metrics does states).
CIRCUIT_STATES = (CLOSED, OPEN, HALF_OPEN)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "kubetoll_requests",
            "Requests handled, by route, backend, tier and outcome.",
            ["route", "backend", "tier", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "kubetoll_tokens",
            "Tokens billed, by route, backend and type (input, output, cached_input).",
            ["route", "backend", "type"],
            registry=r,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per call (OTel GenAI), by type.",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        # `workload` is the same on every series of one sidecar (its pod's workload), so it adds
        # no series: it lets spend be summed by workload without joining on kubetoll_sidecar_info.
        self.cost = Counter(
            "kubetoll_cost_usd",
            "USD spent (list or shadow price), by route, backend, tier and the pod's workload.",
            ["route", "backend", "tier", "workload"],
            registry=r,
        )
        self.fallbacks = Counter(
            "kubetoll_fallbacks",
            "Attempts that moved on to the next backend, by the backend left and why.",
            ["route", "backend", "reason"],
            registry=r,
        )
        self.rejections = Counter(
            "kubetoll_rejections",
            "Requests refused before reaching a backend, by reason.",
            ["route", "reason"],
            registry=r,
        )
        self.attribution_dropped = Counter(
            "kubetoll_attribution_dropped",
            "Request tags, sessions and outcomes not kept as sent, by why: unknown_key (no budget of the route "
            "accepts the key), invalid_value, folded (past the key's maxValues a day: recorded as other), "
            "invalid_session, invalid_outcome.",
            ["reason"],
            registry=r,
        )
        self.spend_by_tag = Counter(
            "kubetoll_spend_by_tag_usd",
            "USD spent by tag value, for the tag keys the platform marked metricLabel (bounded by maxValues).",
            ["route", "key", "value"],
            registry=r,
        )
        self.traces_dropped = Counter(
            "kubetoll_traces_dropped",
            "Finished spans not exported (telemetry.otlp), by why: queue_full (the export queue was at "
            "telemetry.maxQueuedSpans), export_failed (the collector refused or did not answer), shutdown.",
            ["reason"],
            registry=r,
        )
        self.exhausted_answers = Counter(
            "kubetoll_exhausted_responses",
            "Requests answered with a budget's exhaustedResponse (a spent limit with onExhausted respond), by level "
            "(cap, tier).",
            ["route", "level"],
            registry=r,
        )
        self.outcomes = Counter(
            "kubetoll_outcomes",
            "Business outcomes the app reported (x-kubetoll-outcome, POST /kubetoll/v1/outcomes), by name.",
            ["outcome"],
            registry=r,
        )
        self.outcome_spend = Counter(
            "kubetoll_outcome_spend_usd",
            "USD this sidecar saw the sessions spend that then reported the outcome (divide by kubetoll_outcomes "
            "for a live cost per outcome; the ledger has the exact figures).",
            ["outcome"],
            registry=r,
        )
        self.downgrades = Counter(
            "kubetoll_downgrades",
            "Requests served from a route's downgrade backends, by why.",
            ["route", "reason"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Upstream call duration (OTel GenAI), by backend.",
            ["backend", "gen_ai_operation_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first streamed chunk, as the sidecar sees it.",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.added_latency = Histogram(
            "kubetoll_added_latency_seconds",
            "Time the sidecar itself adds to a request (all but the upstream call).",
            ["route"],
            buckets=_ADDED_BUCKETS,
            registry=r,
        )
        self.budget_remaining = Gauge(
            "kubetoll_budget_remaining",
            "What is left of a namespace-cap budget level in its period.",
            ["budget", "level", "unit", "period"],
            registry=r,
        )
        self.budget_percent = Gauge(
            "kubetoll_budget_used_percent",
            "Percent used of a namespace-cap budget level in its period.",
            ["budget", "level", "unit", "period"],
            registry=r,
        )
        self.circuit_open = Gauge(
            "kubetoll_circuit_open",
            "1 while a backend's circuit breaker refuses calls (open: cooling down, or its one probe in flight), "
            "read at scrape time; 0 when closed or half-open.",
            ["backend"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "kubetoll_circuit_state",
            "A backend's circuit breaker state, read at scrape time: 1 for the current one of closed, open, "
            "half_open (half-open: the cool-down has passed and the next call goes through as the probe).",
            ["backend", "state"],
            registry=r,
        )
        self.config_reloads = Counter(
            "kubetoll_config_reloads",
            "Config loads, by result (applied, refused, unchanged).",
            ["result"],
            registry=r,
        )
        self.config_refused = Gauge(
            "kubetoll_config_refused",
            "1 while the config file on disk is refused and an older one serves.",
            registry=r,
        )
        self.config_info = Gauge(
            "kubetoll_config_info",
            "The config being served.",
            ["revision", "namespace"],
            registry=r,
        )
        self.in_flight = Gauge("kubetoll_requests_in_flight", "Requests being served now.", registry=r)
        self.sidecar_info = Gauge(
            "kubetoll_sidecar_info",
            "Who this sidecar spends for: its pod's namespace, name, ServiceAccount and workload (always 1).",
            ["namespace", "pod", "service_account", "workload"],
            registry=r,
        )
        self.budget_store = Gauge(
            "kubetoll_budget_store",
            "The shared (Redis) budget store, read at scrape time: available (1/0), buffered_records, "
            "dropped_records, dropped_spend_batches, leases_active, redis_calls, redis_errors, unavailable_total, "
            "degraded_decisions_total, fail_open_allowance_used_total and more (docs/redis-layout.md).",
            ["stat"],
            registry=r,
        )
        # Load-aware choice (replica_load.py, docs/routing.md): `replica` is the pod's name, never an address.
        self.spillover = Counter(
            "kubetoll_spillover",
            "Requests that skipped an in-cluster backend because every replica's queue was deeper than the "
            "route's spillover.queueDepth, by route and the backend skipped.",
            ["route", "backend"],
            registry=r,
        )
        # Context policies (context_policy.py). action: dropped, summarized, or summary_failed (the summarizer
        # failed and the oldest turns were dropped instead).
        self.context_tokens_saved = Counter(
            "kubetoll_context_tokens_saved",
            "Prompt tokens a route's context policy kept from going upstream (estimate before minus after), by "
            "route and action.",
            ["route", "action"],
            registry=r,
        )
        self.context_summaries = Counter(
            "kubetoll_context_summaries",
            "Summaries a context policy needed, by route and where it came from: computed (a summarizer call), "
            "cached (this sidecar or Redis had it) or failed.",
            ["route", "result"],
            registry=r,
        )
        self.replica_queue_depth = Gauge(
            "kubetoll_replica_queue_depth",
            "Requests waiting at a replica of an in-cluster backend, as its metrics last said.",
            ["backend", "replica"],
            registry=r,
        )

    def forget_replica(self, backend: str, replica: str) -> None:
        """A replica no longer in the config: its series goes."""
        try:
            self.replica_queue_depth.remove(backend, replica)
        except KeyError:
            pass

    def publish_identity(self, namespace: str, pod: str, service_account: str, workload: str) -> None:
        """Set `kubetoll_sidecar_info` (one series; the identity is read once, at start)."""
        self.sidecar_info.clear()
        self.sidecar_info.labels(namespace, pod, service_account, workload).set(1)

    def publish_circuits(self, states: Iterable[tuple[str, str]]) -> None:
        """Set the circuit gauges from (backend, breaker state) pairs read just now.

        Called at scrape time: a breaker's state moves with its clock (open turns
        half-open when the cool-down ends, with no call to notice it), so a value
        set when something last happened would go stale.
        """
        self.circuit_open.clear()
        self.circuit_state.clear()
        for backend, state in states:
            self.circuit_open.labels(backend).set(1 if state == OPEN else 0)
            for each in CIRCUIT_STATES:
                self.circuit_state.labels(backend, each).set(1 if each == state else 0)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: labels() validates and locks on
        every call, several times per request. Label values here are bounded (routes,
        backends, known tiers, outcomes), and so is this memo."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c
