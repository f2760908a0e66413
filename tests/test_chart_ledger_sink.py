"""The chart's ledger sink (ledgerSink.*), rendered by the real helm binary (tests/support/helm.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from kubetoll_operator.ledger_sink.main import add_arguments
from support.helm import helm

CHART = Path(__file__).resolve().parent.parent / "charts" / "kubetoll"
NS = "kubetoll-system"
ON = [
    "--set",
    "redis.url=redis://redis.infra.svc:6379/0",
    "--set",
    "ledgerSink.enabled=true",
    "--set",
    "ledgerSink.databaseUrlSecret.name=ledger-db",
]


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "kubetoll", str(CHART), "--namespace", NS, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kubetoll-operator"]
    return dep["spec"]["template"]["spec"]


def sink_container(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [c for c in pod_spec(docs)["containers"] if c["name"] == "ledger-sink"]
    return found[0] if found else None


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(args)


def test_off_by_default() -> None:
    assert sink_container(render()) is None
    assert sink_container(render("--set", "redis.deploy=true")) is None


def test_enabled_runs_the_sink_beside_the_operator_with_the_url_from_the_secret() -> None:
    docs = render(*ON)
    for doc in docs:
        if doc["kind"] == "Deployment":
            kubernetes_validate.validate(doc, latest_version(), strict=True)
    c = sink_container(docs)
    assert c is not None
    assert c["command"] == ["kubetoll-ledger-sink"]
    assert c["image"] == pod_spec(docs)["containers"][0]["image"]  # the operator image
    args = parse(c["args"])  # the real parser takes every flag the chart passes
    assert (args.retention_days, args.batch_size, args.metrics_port) == (400.0, 500, 8082)
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBETOLL_REDIS_URL"]["value"] == "redis://redis.infra.svc:6379/0"
    assert env["KUBETOLL_DATABASE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "ledger-db", "key": "url"}}
    assert "value" not in env["KUBETOLL_DATABASE_URL"]  # never the URL itself in the manifest
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["ports"] == [{"name": "sink-metrics", "containerPort": 8082, "protocol": "TCP"}]


def test_retention_key_and_auth_reach_the_sink() -> None:
    docs = render(
        *ON,
        "--set",
        "ledgerSink.retentionDays=0",
        "--set",
        "ledgerSink.databaseUrlSecret.key=dsn",
        "--set",
        "redis.auth.existingSecret=redis-auth",
        "--set",
        "monitoring.enabled=true",
    )
    c = sink_container(docs)
    assert c is not None
    args = parse(c["args"])
    assert args.retention_days is None  # 0: keep every row
    assert args.redis_auth_dir == "/etc/kubetoll/redis-auth"
    assert {m["name"] for m in c["volumeMounts"]} == {"redis-auth"}
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBETOLL_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "dsn"
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor" and d["metadata"]["name"] == "kubetoll-operator"]
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics", "sink-metrics"]
    assert parse(sink_container(render(*ON, "--set", "ledgerSink.retentionDays=30"))["args"]).retention_days == 30


def test_lint_passes_with_the_sink_on() -> None:
    assert "0 chart(s) failed" in helm("lint", str(CHART), "--strict", "--namespace", NS, *ON).stdout


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "ledgerSink.enabled=true", "--set", "ledgerSink.databaseUrlSecret.name=db"], "needs a Redis"),
        (["--set", "redis.deploy=true", "--set", "ledgerSink.enabled=true"], "databaseUrlSecret.name"),
        ([*ON, "--set", "ledgerSink.metricsPort=8081"], "ledgerSink.metricsPort 8081 is taken"),
        ([*ON, "--set", "ledgerSink.retentionDays=-1"], "retentionDays"),
        ([*ON, "--set", "ledgerSink.databaseUrl=postgresql://u:p@db/x"], "databaseUrl"),  # no URL in values
    ],
)
def test_bad_values_are_refused(values: list[str], message: str) -> None:
    result = helm("template", "kubetoll", str(CHART), "--namespace", NS, *values, check=False)
    assert result.returncode != 0, result.stdout[:300]
    assert message in result.stderr, result.stderr
