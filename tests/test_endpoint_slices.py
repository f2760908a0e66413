"""A serviceRef backend's replicas, compiled from its Service's EndpointSlices (kubetoll_operator.endpoint_slices)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetoll_core.router_config import Backend
from kubetoll_operator.compiler import check_resource, compile_namespace
from kubetoll_operator.endpoint_slices import replicas_of
from test_operator_crds import api_server_errors, examples, model_errors

NS = "models"
BACKEND: dict[str, Any] = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "ModelBackend",
    "metadata": {"name": "llama"},
    "spec": {
        "provider": "openai-compatible",
        "model": "llama",
        "serviceRef": {"name": "vllm", "port": 8000},
        "pricing": {"inputPerMTok": 0.1, "outputPerMTok": 0.1},
        "loadMetrics": {"format": "vllm"},
    },
}
ROUTE: dict[str, Any] = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "ModelRoute",
    "metadata": {"name": "chat"},
    "spec": {"rules": [{"backends": ["llama"]}], "spillover": {"queueDepth": 8}},
}


def endpoint(ip: str, pod: str | None, ready: bool | None = True) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip]}
    if ready is not None:
        ep["conditions"] = {"ready": ready}
    if pod is not None:
        ep["targetRef"] = {"kind": "Pod", "name": pod, "namespace": NS}
    return ep


def slice_(
    name: str, endpoints: list[dict[str, Any]], service: str = "vllm", ports: Any = None, address_type: str = "IPv4"
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "ports": ports if ports is not None else [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def compiled(*objs: dict[str, Any], backend: dict[str, Any] = BACKEND, slices: Any = None) -> tuple[Backend, str]:
    result = compile_namespace(NS, [backend, ROUTE, *objs], endpoint_slices=slices)
    assert result.config is not None and [p for p in result.problems if p.severity == "error"] == []
    return result.config.backend("llama"), result.content_hash


def test_ready_endpoints_become_replicas_and_the_service_url_stays_the_endpoint() -> None:
    s = slice_(
        "vllm-a",
        [endpoint("10.0.0.2", "vllm-1"), endpoint("10.0.0.1", "vllm-0"), endpoint("10.0.0.3", "vllm-2", ready=False)],
    )
    other = slice_("other-a", [endpoint("10.9.9.9", "other-0")], service="other")
    b, _ = compiled(s, other)
    assert b.endpoint == "http://vllm.models.svc.cluster.local:8000/v1"
    assert [(r.url, r.name) for r in b.replicas or []] == [
        ("http://10.0.0.1:8000/v1", "vllm-0"),
        ("http://10.0.0.2:8000/v1", "vllm-1"),
    ]
    assert b.load_metrics is not None and b.load_metrics.format.value == "vllm"
    result = compile_namespace(NS, [BACKEND, ROUTE, s])
    assert result.config is not None and result.config.routes[0].spillover is not None
    assert result.config.routes[0].spillover.queue_depth == 8


def test_an_unknown_ready_condition_counts_as_ready_and_slices_of_one_service_add_up() -> None:
    b, _ = compiled(
        slice_("vllm-a", [endpoint("10.0.0.1", "vllm-0", ready=None)]),
        slice_("vllm-b", [endpoint("10.0.0.2", None), endpoint("10.0.0.1", "vllm-0")]),
    )
    # A pod-less endpoint is named by its place in the list, never by its address.
    assert [(r.url, r.name) for r in b.replicas or []] == [
        ("http://10.0.0.1:8000/v1", "vllm-0"),
        ("http://10.0.0.2:8000/v1", "replica-1"),
    ]


def test_no_ready_replica_leaves_the_backend_as_it_was_before_replicas_existed() -> None:
    without, plain_hash = compiled()
    assert without.replicas is None
    none_ready, h = compiled(slice_("vllm-a", [endpoint("10.0.0.1", "vllm-0", ready=False)]))
    assert none_ready.replicas is None and h == plain_hash


def test_the_port_is_found_by_name_by_number_or_as_a_single_port_services_only_port() -> None:
    ports = [{"name": "metrics", "port": 9090}, {"name": "api", "port": 8080}]
    named = copy.deepcopy(BACKEND)
    named["spec"]["serviceRef"] = {"name": "vllm", "port": 80, "portName": "api", "path": "/v1"}
    b, _ = compiled(slice_("vllm-a", [endpoint("10.0.0.1", "vllm-0")], ports=ports), backend=named)
    assert [r.url for r in b.replicas or []] == ["http://10.0.0.1:8080/v1"]
    assert b.endpoint == "http://vllm.models.svc.cluster.local:80/v1"

    # Without portName, the Service port 80 is none of the slice's named ports: nothing is guessed.
    unnamed = copy.deepcopy(BACKEND)
    unnamed["spec"]["serviceRef"] = {"name": "vllm", "port": 80}
    b, _ = compiled(slice_("vllm-a", [endpoint("10.0.0.1", "vllm-0")], ports=ports), backend=unnamed)
    assert b.replicas is None
    # A single-port Service's one unnamed port is the one (its target port may differ from the Service's).
    b, _ = compiled(slice_("vllm-a", [endpoint("10.0.0.1", "vllm-0")], ports=[{"port": 8000}]), backend=unnamed)
    assert [r.url for r in b.replicas or []] == ["http://10.0.0.1:8000/v1"]


def test_ipv6_addresses_are_bracketed_and_https_and_the_path_are_kept() -> None:
    s = slice_("vllm-a", [endpoint("fd00::7", "vllm-0")], address_type="IPv6")
    assert replicas_of("vllm", 8000, None, "https", "/openai/v1", [s]) == [
        {"url": "https://[fd00::7]:8000/openai/v1", "name": "vllm-0"}
    ]


def test_scaling_up_and_down_changes_the_config_hash_and_only_then() -> None:
    one = [endpoint("10.0.0.1", "vllm-0")]
    two = [*one, endpoint("10.0.0.2", "vllm-1")]
    _, h1 = compiled(slices=[slice_("vllm-a", one)])
    _, h2 = compiled(slices=[slice_("vllm-a", two)])
    _, h2_again = compiled(slices=[slice_("vllm-b", list(reversed(two)))])  # another slice, another order
    _, h1_again = compiled(slices=[slice_("vllm-a", [*one, endpoint("10.0.0.2", "vllm-1", ready=False)])])
    assert h1 != h2
    assert h2 == h2_again
    assert h1 == h1_again


def test_slices_given_apart_win_over_manifests_among_the_resources() -> None:
    among = slice_("vllm-a", [endpoint("10.0.0.1", "vllm-0")])
    b, _ = compiled(among, slices=[slice_("vllm-a", [endpoint("10.0.0.9", "vllm-9")])])
    assert [r.name for r in b.replicas or []] == ["vllm-9"]


@pytest.mark.parametrize(
    "spec,field",
    [
        ({"loadMetrics": {"format": "triton"}}, "spec.loadMetrics.format"),
        ({"loadMetrics": {"format": "vllm", "intervalSeconds": 0}}, "spec.loadMetrics.intervalSeconds"),
        ({"loadMetrics": {"format": "vllm", "path": "metrics"}}, "spec.loadMetrics.path"),
        ({"serviceRef": {"name": "vllm", "port": 8000, "portName": "HTTP!"}}, "spec.serviceRef.portName"),
    ],
)
def test_bad_load_settings_are_refused_with_the_field(spec: dict[str, Any], field: str) -> None:
    obj = copy.deepcopy(BACKEND)
    obj["spec"].update(spec)
    problems = check_resource(NS, obj)
    assert any(p.field.startswith(field) for p in problems), problems


def test_a_negative_queue_depth_is_refused() -> None:
    route = copy.deepcopy(ROUTE)
    route["spec"]["spillover"] = {"queueDepth": -1}
    problems = check_resource(NS, route)
    assert any(p.field.startswith("spec.spillover.queueDepth") for p in problems), problems


def test_the_example_validates_and_compiles_with_the_other_examples() -> None:
    """examples/spend-less/spillover.yaml: what the API server and the compiler say, beside examples/*.yaml."""
    path = Path(__file__).resolve().parent.parent / "examples" / "spend-less" / "spillover.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        assert api_server_errors(doc) == [] and model_errors(doc) == [], doc["metadata"]["name"]
    pods = slice_("vllm-llama-x1", [endpoint("10.1.0.5", "vllm-llama-0"), endpoint("10.1.0.6", "vllm-llama-1")])
    pods["metadata"]["labels"]["kubernetes.io/service-name"] = "vllm-llama"
    result = compile_namespace("team-a", [*examples(), *docs, pods])
    assert result.ok and result.problems == [], result.problems
    assert result.config is not None
    pool = result.config.backend("llama-vllm-pool")
    assert [r.name for r in pool.replicas or []] == ["vllm-llama-0", "vllm-llama-1"]
    route = next(r for r in result.config.routes if r.name == "chat-local-first")
    assert route.spillover is not None and route.spillover.queue_depth == 8


def test_load_metrics_on_an_endpoint_url_is_a_warning() -> None:
    obj = copy.deepcopy(BACKEND)
    del obj["spec"]["serviceRef"]
    obj["spec"]["endpoint"] = "http://vllm.example:8000/v1"
    problems = check_resource(NS, obj)
    assert [(p.reason, p.severity, p.field) for p in problems] == [
        ("LoadMetricsIgnored", "warning", "spec.loadMetrics")
    ]
