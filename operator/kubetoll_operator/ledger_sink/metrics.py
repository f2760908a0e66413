"""The sink's Prometheus metrics (docs/ledger.md, "Metrics"), in a registry of its own.

* `kubetoll_ledger_sink_rows_written_total{namespace}`: rows inserted;
* `kubetoll_ledger_sink_duplicates_total{namespace}`: entries whose row was already there
  (read again after a crash between commit and ack, or by two replicas);
* `kubetoll_ledger_sink_pending_entries{namespace}`: delivered to the group, not yet acked;
* `kubetoll_ledger_sink_lag_entries{namespace}`: in the stream, not yet delivered to the group;
* `kubetoll_ledger_sink_errors_total{kind}`: failed passes, `database` or `redis`;
* `kubetoll_ledger_sink_entries_lost_total{namespace}`: entries Redis trimmed before the sink wrote them;
* `kubetoll_ledger_sink_retention_deleted_rows_total`.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rows = Counter(
            "kubetoll_ledger_sink_rows_written", "Ledger rows inserted into PostgreSQL.", ["namespace"], registry=r
        )
        self.duplicates = Counter(
            "kubetoll_ledger_sink_duplicates",
            "Ledger entries whose row was already in PostgreSQL (replayed after a crash before the ack).",
            ["namespace"],
            registry=r,
        )
        self.pending = Gauge(
            "kubetoll_ledger_sink_pending_entries",
            "Ledger entries delivered to the sink's group and not yet acked.",
            ["namespace"],
            registry=r,
        )
        self.lag_entries = Gauge(
            "kubetoll_ledger_sink_lag_entries",
            "Ledger entries in the stream not yet delivered to the sink's group.",
            ["namespace"],
            registry=r,
        )
        self.errors = Counter(
            "kubetoll_ledger_sink_errors", "Sink passes that failed, by what failed.", ["kind"], registry=r
        )
        self.lost_entries = Counter(
            "kubetoll_ledger_sink_entries_lost",
            "Ledger entries trimmed from the stream before the sink wrote them.",
            ["namespace"],
            registry=r,
        )
        self.retention = Counter(
            "kubetoll_ledger_sink_retention_deleted_rows", "Rows deleted by the retention.", registry=r
        )

    def written(self, namespace: str, rows: int, duplicates: int) -> None:
        self.rows.labels(namespace).inc(rows)
        if duplicates:
            self.duplicates.labels(namespace).inc(duplicates)

    def lag(self, namespace: str, pending: int, undelivered: int | None) -> None:
        self.pending.labels(namespace).set(pending)
        if undelivered is not None:
            self.lag_entries.labels(namespace).set(undelivered)

    def error(self, kind: Literal["database", "redis"]) -> None:
        self.errors.labels(kind).inc()

    def lost(self, namespace: str, n: int) -> None:
        self.lost_entries.labels(namespace).inc(n)

    def retention_deleted(self, n: int) -> None:
        self.retention.inc(n)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when absent): for tests and the `--once` summary."""
        v = self.registry.get_sample_value(name, labels)
        return float(v) if v is not None else 0.0
