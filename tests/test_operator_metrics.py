"""The operator's /metrics endpoint (operator/kubetoll_operator/metrics.py), on the kmock emulator.

The operator runs for real (tests/support/kopf_env.py) with `metrics_port=0`; the
test scrapes the port it bound over HTTP and reads the exposition with
prometheus_client's own parser, after reconciles it caused: a good compile, a
compile with an error, its fix, a cleanup, and an admission request.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
import time
from typing import Any

import aiohttp
import trustme
from prometheus_client.parser import text_string_to_metric_families

from kubetoll_operator.injection import InjectionOptions
from kubetoll_operator.webhook import WebhookOptions
from support.admission import admission_review, post_review
from support.kopf_env import NS, Kubectl, eventually
from test_operator_kopf import example_docs

IMAGE = "registry.example/kubetoll-sidecar:1.2.3"


def app_pod(labels: dict[str, str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": "team-a",
            "generateName": "chat-api-",
            "labels": labels,
            "annotations": annotations or {},
        },
        "spec": {"containers": [{"name": "app", "image": "example/chat-api:2"}]},
    }


async def review(port: int, ca: trustme.CA, pod: dict[str, Any]) -> dict[str, Any]:
    """POST an AdmissionReview to /inject-sidecar over verified HTTPS, as the API server does."""
    context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    body = admission_review(pod, namespace="team-a")
    return await post_review(f"https://127.0.0.1:{port}/inject-sidecar", body, context)


async def wait_listening(port: int, ca: trustme.CA, timeout: float = 15.0) -> None:
    """Refused until kopf has scanned the API's resources; the probe is one `allowed` decision."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await review(port, ca, app_pod({}))
            return
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, AssertionError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample (name, sorted labels) → value, from the operator's endpoint."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def series(samples: dict[Any, float], name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {k[1]: v for k, v in samples.items() if k[0] == name and set(labels.items()) <= set(k[1])}


async def test_metrics_endpoint_serves_reconcile_and_compile_metrics(kubectl: Kubectl, start_operator: Any) -> None:
    started = time.time()
    memo = await start_operator(metrics_addr="127.0.0.1", metrics_port=0)
    port = memo.metrics_port
    assert isinstance(port, int) and port > 0
    before = await scrape(port)
    ok_before = value(before, "kubetoll_operator_reconciles_total", kind="compile", result="ok") or 0.0
    # The registry is the process's: an earlier test may have compiled this namespace already.
    prior = value(before, "kubetoll_operator_last_successful_compile_timestamp_seconds", namespace=NS)
    assert prior is None or prior < started

    docs = example_docs()
    for doc in docs:
        await kubectl.apply(doc)

    async def compiled() -> dict[Any, float]:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        assert cm is not None
        # The compile of every document is written (and with it the last good versions the
        # route's typo below falls back on), not only an earlier one of part of them.
        config = json.loads(cm["data"]["router.json"])
        assert {r["name"] for r in config["routes"]} >= {
            d["metadata"]["name"] for d in docs if d["kind"] == "ModelRoute"
        }
        assert {b["name"] for b in config["budgets"]} >= {
            d["metadata"]["name"] for d in docs if d["kind"] == "TokenBudget"
        }
        samples = await scrape(port)
        assert (value(samples, "kubetoll_operator_reconciles_total", kind="compile", result="ok") or 0) > ok_before
        stamp = value(samples, "kubetoll_operator_last_successful_compile_timestamp_seconds", namespace=NS)
        assert stamp is not None and started <= stamp <= time.time()
        assert (value(samples, "kubetoll_operator_reconcile_duration_seconds_count", kind="compile") or 0) >= 1
        assert series(samples, "kubetoll_operator_compile_errors", namespace=NS) == {}
        return samples

    await eventually(compiled)

    # A regex typo in the route: one error of that kind and reason, by namespace.
    route = copy.deepcopy(next(d for d in docs if d["kind"] == "ModelRoute"))
    good_rules = copy.deepcopy(route["spec"]["rules"])
    bad_rules = copy.deepcopy(good_rules)
    bad_rules[0].setdefault("match", {})["header"] = {"name": "x-team", "regex": "^(platform|data$"}
    await kubectl.patch("ModelRoute", route["metadata"]["name"], {"spec": {"rules": bad_rules}})

    async def error_counted() -> dict[Any, float]:
        samples = await scrape(port)
        errors = series(samples, "kubetoll_operator_compile_errors", namespace=NS)
        assert errors, "no compile error series"
        assert {dict(k)["kind"] for k in errors} == {"ModelRoute"} and all(v >= 1 for v in errors.values()), errors
        # The last good route stays in force, so the compile still produced a config.
        assert (value(samples, "kubetoll_operator_reconciles_total", kind="compile", result="problems") or 0) >= 1
        return samples

    samples = await eventually(error_counted)
    reason = dict(next(iter(series(samples, "kubetoll_operator_compile_errors", namespace=NS))))["reason"]
    route_obj = await kubectl.get("ModelRoute", route["metadata"]["name"])
    assert route_obj is not None
    conditions = {c["type"]: c for c in route_obj["status"]["conditions"]}
    assert conditions["Ready"]["status"] == "False"  # the metric and the status agree on what is wrong
    assert reason  # the label is the Problem's reason, e.g. InvalidUpdate

    # Fixed: the series goes (the gauge says what is wrong now, not what once was).
    await kubectl.patch("ModelRoute", route["metadata"]["name"], {"spec": {"rules": good_rules}})

    async def error_gone() -> None:
        assert series(await scrape(port), "kubetoll_operator_compile_errors", namespace=NS) == {}

    await eventually(error_gone)

    # Every resource deleted: a cleanup reconcile, and the namespace's series are dropped.
    for doc in reversed(docs):
        await kubectl.delete(doc["kind"], doc["metadata"]["name"])

    async def cleaned_up() -> None:
        assert await kubectl.get("ConfigMap", "kubetoll-router") is None
        samples = await scrape(port)
        assert (value(samples, "kubetoll_operator_reconciles_total", kind="cleanup", result="ok") or 0) >= 1
        assert value(samples, "kubetoll_operator_last_successful_compile_timestamp_seconds", namespace=NS) is None

    await eventually(cleaned_up)


async def test_metrics_port_off_serves_nothing(kubectl: Kubectl, start_operator: Any) -> None:
    memo = await start_operator()  # OperatorOptions.metrics_port defaults to None
    assert getattr(memo, "metrics_port", None) is None


async def test_injection_decisions_are_counted(
    kubectl: Kubectl, start_operator: Any, cert_dir: Any, ca: Any, port: int
) -> None:
    """Real AdmissionReviews over HTTPS to the mutate path; the endpoint counts each decision."""
    memo = await start_operator(
        idle_timeout=None,
        metrics_addr="127.0.0.1",
        metrics_port=0,
        webhook=WebhookOptions(
            enabled=True,
            addr="127.0.0.1",
            port=port,
            cert_dir=str(cert_dir),
            native_sidecars="false",
            injection=InjectionOptions(image=IMAGE),
        ),
    )
    await wait_listening(port, ca)
    before = await scrape(memo.metrics_port)

    def delta(after: dict[Any, float], decision: str) -> float:
        name = "kubetoll_operator_admission_decisions_total"
        return (value(after, name, kind="mutate", decision=decision) or 0) - (
            value(before, name, kind="mutate", decision=decision) or 0
        )

    opted_in = {"kubetoll.dev/inject": "true"}
    assert (await review(port, ca, app_pod(opted_in)))["allowed"]
    denied = app_pod(opted_in, annotations={"kubetoll.dev/sidecar-memory": "lots"})
    assert not (await review(port, ca, denied))["allowed"]
    broken = app_pod(opted_in)
    broken["spec"]["containers"] = "not a list"  # fails inside the webhook: allowed, as --webhook-on-error=allow
    assert (await review(port, ca, broken))["allowed"]

    after = await scrape(memo.metrics_port)
    assert (delta(after, "allowed"), delta(after, "denied"), delta(after, "error")) == (1, 1, 1)


def test_record_admission_counts_by_kind_and_decision() -> None:
    from kubetoll_operator import metrics

    def count(kind: str, decision: str) -> float:
        return metrics.ADMISSIONS.labels(kind, decision)._value.get()

    before = {(k, d): count(k, d) for k in ("mutate", "validate") for d in ("allowed", "denied", "error")}
    metrics.record_admission("mutate", True)
    metrics.record_admission("validate", False)
    metrics.record_admission("validate", True, error=True)
    after = {key: count(*key) - n for key, n in before.items()}
    assert after == {
        ("mutate", "allowed"): 1,
        ("mutate", "denied"): 0,
        ("mutate", "error"): 0,
        ("validate", "allowed"): 0,
        ("validate", "denied"): 1,
        ("validate", "error"): 1,
    }
    text = metrics.exposition().decode()
    assert 'kubetoll_operator_admission_decisions_total{decision="denied",kind="validate"}' in text


def test_cli_flags_reach_the_options() -> None:
    import argparse

    from kubetoll_operator.main import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--metrics-port", "9100", "--metrics-addr", "127.0.0.1", "-n", "team-a", "-n", "b"])
    assert (args.metrics_port, args.metrics_addr, args.no_metrics, args.namespace) == (
        9100,
        "127.0.0.1",
        False,
        ["team-a", "b"],
    )
    assert parser.parse_args([]).metrics_port == 8081
    assert parser.parse_args(["--no-metrics"]).no_metrics
