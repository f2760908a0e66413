"""The chart's alerts and the operator's PodMonitor, rendered by the real helm binary.

Every PrometheusRule and dashboard expression is parsed and type-checked by
promql-parser (a Rust port of Prometheus' own parser). The exhaustion alert's
horizon is evaluated from its parse tree and compared with the calendar period
that kubetoll_core.periods computes; the budget-store alert's stat is one the
Redis store reports. Each alert's runbook_url points at a section of
docs/runbooks.md that exists.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import promql_parser
import pytest

from kubetoll_core.periods import compute_period
from test_chart import CHART, NS, ROOT, VALUE_SETS, one, operator_args, parse_operator_args, render

DEFAULT_BASE = "https://github.com/kubetoll/kubetoll/blob/main/docs"


def alerts(*values: str) -> dict[str, dict[str, Any]]:
    rule = one(render(*VALUE_SETS["monitoring"], *values), "PrometheusRule")
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def runbook_sections() -> set[str]:
    """The `## ` headings of docs/runbooks.md, as the anchors GitHub makes of them."""
    text = (ROOT / "docs" / "runbooks.md").read_text()
    return {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", text, re.M)
    }


def test_every_alert_has_a_runbook_section_a_summary_and_a_description() -> None:
    found = alerts()
    sections = runbook_sections()
    for name, alert in found.items():
        annotations = alert["annotations"]
        assert annotations["runbook_url"] == f"{DEFAULT_BASE}/runbooks.md#{name.lower()}", name
        assert name.lower() in sections, f"docs/runbooks.md has no section ## {name}"
        assert annotations.get("summary") and annotations.get("description"), name
    # No runbook for an alert that does not exist.
    assert sections - {n.lower() for n in found} == set()
    # The base URL is a value; a trailing slash is not doubled.
    moved = alerts("--set", "monitoring.prometheusRule.runbookBaseURL=https://docs.example/kubetoll/")
    assert moved["KubetollBudgetStoreUnavailable"]["annotations"]["runbook_url"] == (
        "https://docs.example/kubetoll/runbooks.md#kubetollbudgetstoreunavailable"
    )


def grafana_free(expr: str) -> str:
    """A dashboard expression with Grafana's variables as Prometheus would receive them."""
    return expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$namespace", "team-a")


def test_every_expression_parses_and_type_checks() -> None:
    for name, alert in alerts().items():
        try:
            promql_parser.parse(alert["expr"])
        except ValueError as exc:
            raise AssertionError(f"alert {name}: {exc}\n{alert['expr']}") from None
    dashboard = json.loads((CHART / "dashboards" / "kubetoll.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            try:
                promql_parser.parse(grafana_free(target["expr"]))
            except ValueError as exc:
                raise AssertionError(f"panel {panel['title']}: {exc}\n{target['expr']}") from None
    # The parser refuses what Prometheus refuses (a vector where predict_linear takes a scalar).
    with pytest.raises(ValueError, match="scalar"):
        promql_parser.parse("predict_linear(kubetoll_budget_used_percent[1h], days_in_month() * 86400)")


# --------------------------------------------------------------------------- the exhaustion horizon


def evaluate_scalar(node: Any, now: float) -> float:
    """The value of a scalar expression at `now`, for the few functions the horizon uses."""
    if isinstance(node, promql_parser.NumberLiteral):
        return float(node.val)
    if isinstance(node, promql_parser.ParenExpr):
        return evaluate_scalar(node.expr, now)
    if isinstance(node, promql_parser.BinaryExpr):
        left, right = evaluate_scalar(node.lhs, now), evaluate_scalar(node.rhs, now)
        ops = {"+": left + right, "-": left - right, "*": left * right, "%": left % right}
        return ops[str(node.op)]
    if isinstance(node, promql_parser.Call):
        name = node.func.name
        t = datetime.datetime.fromtimestamp(now, datetime.UTC)
        if name == "time":
            return now
        if name == "scalar":
            return evaluate_scalar(node.args[0], now)
        if name == "day_of_month":
            return float(t.day)
        if name == "days_in_month":
            following = (t.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
            return float((following - datetime.timedelta(days=1)).day)
    raise AssertionError(f"unexpected node in the horizon: {node!r}")


def predict_calls(node: Any) -> list[Any]:
    out = []
    if isinstance(node, promql_parser.Call) and node.func.name == "predict_linear":
        out.append(node)
    for attr in ("lhs", "rhs", "expr"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, str | int | float):
            out += predict_calls(child)
    for arg in getattr(node, "args", None) or []:
        out += predict_calls(arg)
    return out


def test_exhaustion_is_predicted_up_to_the_end_of_the_period() -> None:
    alert = alerts("--set", "monitoring.prometheusRule.exhaustionLookback=3h")["KubetollBudgetExhaustionPredicted"]
    calls = predict_calls(promql_parser.parse(alert["expr"]))
    by_period = {}
    for call in calls:
        selector = call.args[0]
        assert selector.vector_selector.name == "kubetoll_budget_used_percent"
        assert promql_parser.display_duration(selector.range) == "3h"  # the lookback value
        period = {m.name: m.value for m in selector.vector_selector.matchers.matchers}["period"]
        by_period[period] = call.args[1]
    assert set(by_period) == {"day", "month"}  # the sidecar's period label values (server.py)
    for stamp in ("2026-02-14T09:30:00", "2026-02-28T23:59:00", "2026-12-31T00:00:01", "2028-02-29T12:00:00"):
        now = datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.UTC).timestamp()
        for kind, horizon in by_period.items():
            expected = compute_period(kind, "UTC", now).end - now
            assert evaluate_scalar(horizon, now) == pytest.approx(expected), (kind, stamp)
    # Quiet once the critical alert has the budget.
    assert alert["expr"].rstrip().endswith("(kubetoll_budget_used_percent) >= 95")


def test_budget_store_alert_reads_a_stat_the_redis_store_reports() -> None:
    from redis.asyncio import Redis

    from kubetoll_core.router_config import BudgetStoreSettings
    from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore

    alert = alerts()["KubetollBudgetStoreUnavailable"]
    stat = re.search(r'kubetoll_budget_store\{stat="(\w+)"\}', alert["expr"])
    assert stat is not None and alert["expr"].endswith("== 0")
    client = Redis.from_url("redis://127.0.0.1:1")  # never connected: stats() is local state
    store = RedisBudgetStore(client, BudgetStoreSettings(url="redis://127.0.0.1:1"), "team-a")
    stats = store.stats()
    assert stat[1] in stats and stats[stat[1]] == 1.0  # 1 while healthy: the alert fires on 0
    assert alert["labels"]["severity"] == "critical"
    assert alert["for"] == "2m"
    assert (
        alerts("--set", "monitoring.prometheusRule.budgetStoreUnavailableFor=30s")["KubetollBudgetStoreUnavailable"][
            "for"
        ]
        == "30s"
    )


def test_webhook_failure_alerts_match_the_chart_webhooks() -> None:
    found = alerts()
    docs = render(*VALUE_SETS["monitoring"])
    names = [h["name"] for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
             for d in docs if d["kind"] == kind for h in d["webhooks"]]  # fmt: skip
    assert names
    rejecting = found["KubetollWebhookRejecting"]["expr"]
    assert "apiserver_admission_webhook_rejection_count" in rejecting
    pattern = re.search(r'name=~"(.*?)"', rejecting)
    assert pattern is not None
    for name in names:
        assert re.fullmatch(pattern[1].replace("\\\\", "\\"), name), name
    assert 'kubetoll_operator_admission_decisions_total{decision="error"}' in found["KubetollWebhookErrors"]["expr"]


# --------------------------------------------------------------------------- the operator's PodMonitor


def test_operator_pod_monitor_scrapes_the_operator_metrics_port() -> None:
    docs = render(*VALUE_SETS["monitoring"])
    monitor = one(docs, "PodMonitor", "kubetoll-operator")
    assert (
        monitor["metadata"]["namespace"] == NS and monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    )
    deployment = one(docs, "Deployment", "kubetoll-operator")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NS]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "30s", "honorLabels": True}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = parse_operator_args(operator_args(docs))
    assert ports["metrics"] == args.metrics_port == 8081 and not args.no_metrics
    # The sidecars' PodMonitor selects app pods, never the operator's.
    sidecars = one(docs, "PodMonitor", "kubetoll-sidecars")
    assert not sidecars["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    moved = render(*VALUE_SETS["monitoring"], "--set", "operator.metrics.port=9100")
    assert parse_operator_args(operator_args(moved)).metrics_port == 9100

    off = render(*VALUE_SETS["monitoring"], "--set", "operator.metrics.enabled=false")
    assert parse_operator_args(operator_args(off)).no_metrics
    assert not [d for d in off if d["kind"] == "PodMonitor" and d["metadata"]["name"] == "kubetoll-operator"]
    container = one(off, "Deployment", "kubetoll-operator")["spec"]["template"]["spec"]["containers"][0]
    assert "metrics" not in {p["name"] for p in container["ports"]}
