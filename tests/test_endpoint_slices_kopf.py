"""The operator keeps a serviceRef backend's replicas current as its Service scales (kopf on kmock).

The operator runs for real against kmock's Kubernetes emulator (tests/support/kopf_env.py):
the ready endpoints of the Service's EndpointSlices reach the RouterConfig, a scale up or
down (a slice edited, added or deleted) reaches it again, a slice of a Service no backend
calls asks for nothing, and every request the operator made is one the chart's RBAC allows.
"""

from __future__ import annotations

import json
from typing import Any

from support.kopf_env import Kubectl, eventually, route_to_local
from test_chart import render
from test_least_privilege import authorized, operator_requests

BACKEND: dict[str, Any] = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "ModelBackend",
    "metadata": {"name": "local"},
    "spec": {
        "provider": "openai-compatible",
        "model": "m",
        "serviceRef": {"name": "vllm", "port": 8000},
        "pricing": {"inputPerMTok": 1, "outputPerMTok": 2},
        "loadMetrics": {"format": "vllm"},
    },
}


def endpoint_slice(name: str, ips: dict[str, bool], service: str = "vllm") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": f"pod-{i}"}}
            for i, (ip, ready) in enumerate(ips.items())
        ],
    }


async def router(kubectl: Kubectl) -> dict[str, Any]:
    cm = await kubectl.get("ConfigMap", "kubetoll-router")
    assert cm is not None
    return json.loads(cm["data"]["router.json"])


async def replica_urls(kubectl: Kubectl) -> list[str]:
    backend = (await router(kubectl))["backends"][0]
    return [r["url"] for r in backend.get("replicas", [])]


async def test_a_scale_of_the_service_updates_the_configmap(kmock: Any, kubectl: Kubectl, start_operator: Any) -> None:
    await start_operator()
    await kubectl.apply(endpoint_slice("vllm-abc", {"10.0.0.1": True, "10.0.0.2": False}))
    await kubectl.apply(endpoint_slice("other-abc", {"10.9.0.1": True}, service="other"))
    for doc in (BACKEND, route_to_local()):
        await kubectl.apply(doc)

    async def urls(expected: list[str]) -> None:
        assert await replica_urls(kubectl) == expected

    await eventually(lambda: urls(["http://10.0.0.1:8000/v1"]))
    first = (await kubectl.get("ConfigMap", "kubetoll-router"))["metadata"]["annotations"]["kubetoll.dev/config-hash"]

    # The second pod becomes ready: scaled up.
    await kubectl.patch(
        "EndpointSlice",
        "vllm-abc",
        {"endpoints": endpoint_slice("x", {"10.0.0.1": True, "10.0.0.2": True})["endpoints"]},
    )
    await eventually(lambda: urls(["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"]))
    # A slice of its own for a third pod (large Services have several).
    await kubectl.apply(endpoint_slice("vllm-def", {"10.0.0.3": True}))
    await eventually(lambda: urls(["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1", "http://10.0.0.3:8000/v1"]))

    # Scaled down to none: no replicas, the Service URL is the endpoint, and the hash is the first one's again
    # once the same single pod is back.
    await kubectl.delete("EndpointSlice", "vllm-def")
    await kubectl.patch("EndpointSlice", "vllm-abc", {"endpoints": []})
    await eventually(lambda: urls([]))
    assert (await router(kubectl))["backends"][0]["endpoint"] == "http://vllm.team-a.svc.cluster.local:8000/v1"
    await kubectl.patch(
        "EndpointSlice", "vllm-abc", {"endpoints": endpoint_slice("x", {"10.0.0.1": True})["endpoints"]}
    )
    await eventually(lambda: urls(["http://10.0.0.1:8000/v1"]))

    async def same_hash() -> None:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        assert cm["metadata"]["annotations"]["kubetoll.dev/config-hash"] == first

    await eventually(same_hash)

    requests = operator_requests(kmock)
    assert any(a.verb == "list" and a.resource == "endpointslices" for a in requests)
    docs = render()
    denied = sorted({a for a in requests if not authorized(docs, a)}, key=repr)
    assert denied == [], "the chart's RBAC does not allow what the operator did"


async def test_only_a_slice_of_a_referenced_service_that_changed_asks_for_a_recompile() -> None:
    """The EndpointSlice handler on its own: kopf sends it every EndpointSlice of the cluster."""
    from kubetoll_operator import handlers

    reconciler = handlers.Reconciler(handlers.OperatorOptions())
    memo = type("Memo", (), {"reconciler": reconciler})()
    index = {"kubetoll_modelbackends": {"team-a": [BACKEND]}}

    async def event(body: dict[str, Any], type_: str = "MODIFIED", namespace: str = "team-a") -> None:
        name = body["metadata"]["name"]
        await handlers._on_endpoint_slice(type=type_, body=body, namespace=namespace, name=name, memo=memo, **index)

    try:
        await event(endpoint_slice("other-abc", {"10.9.0.1": True}, service="other"))  # no backend calls it
        await event(endpoint_slice("vllm-abc", {"10.0.0.1": True}), namespace="team-b")  # same Service name elsewhere
        assert reconciler.pending == set()
        await event(endpoint_slice("vllm-abc", {"10.0.0.1": True}))
        assert reconciler.pending == {"team-a"}
        reconciler.pending.clear()
        # A resync, or a change to what the replicas do not depend on (a label, the resourceVersion): nothing.
        again = endpoint_slice("vllm-abc", {"10.0.0.1": True})
        again["metadata"]["resourceVersion"] = "42"
        await event(again)
        assert reconciler.pending == set()
        await event(endpoint_slice("vllm-abc", {"10.0.0.1": False}))  # not ready any more
        assert reconciler.pending == {"team-a"}
        reconciler.pending.clear()
        await event(endpoint_slice("vllm-abc", {}), type_="DELETED")
        assert reconciler.pending == {"team-a"}
    finally:
        await reconciler.close()
