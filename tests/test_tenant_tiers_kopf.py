"""The operator reads a TokenBudget's tenantTiersFrom ConfigMap and recompiles when it changes (kopf on kmock).

The operator runs for real against kmock's Kubernetes emulator (tests/support/kopf_env.py):
the ConfigMap's tiers reach the RouterConfig, an edit to it reaches the config again, a
deleted or broken one lifts nobody and says so in the budget's TenantTiersAccepted
condition, and every request the operator made is one the chart's RBAC allows.
"""

from __future__ import annotations

import json
from typing import Any

from support.kopf_env import LOCAL_BACKEND, Kubectl, condition, eventually, route_to_local
from test_chart import render
from test_least_privilege import authorized, operator_requests

BUDGET: dict[str, Any] = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "TokenBudget",
    "metadata": {"name": "chat-budget"},
    "spec": {
        "routes": ["chat"],
        "tiers": [{"name": "free", "requestsPerMinute": 5}, {"name": "premium", "requestsPerMinute": 600}],
        "tenant": {"defaultTier": "free", "tierOrder": ["free", "premium"]},
        "tenantTiersFrom": {"configMapName": "tenant-tiers", "key": "tiers.yaml"},
    },
}


def tiers_cm(text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "tenant-tiers"},
        "data": {"tiers.yaml": text},
    }


async def router_tenancy(kubectl: Kubectl) -> dict[str, Any]:
    cm = await kubectl.get("ConfigMap", "kubetoll-router")
    assert cm is not None
    return json.loads(cm["data"]["router.json"])["tenancy"]


async def test_the_configmap_is_read_and_every_change_recompiles(
    kmock: Any, kubectl: Kubectl, start_operator: Any
) -> None:
    await start_operator()
    await kubectl.apply(tiers_cm("acme: premium\nglobex: premium\n"))
    for doc in (LOCAL_BACKEND, route_to_local(), BUDGET):
        await kubectl.apply(doc)

    async def assigned(expected: dict[str, str]) -> None:
        tenancy = await router_tenancy(kubectl)
        assert tenancy["tenantTiers"] == expected and tenancy["tierHeaderPolicy"] == "capped", tenancy

    await eventually(lambda: assigned({"acme": "premium", "globex": "premium"}))

    async def accepted(status: str, reason: str) -> dict[str, Any]:
        c = condition(await kubectl.get("TokenBudget", "chat-budget"), "TenantTiersAccepted")
        assert c["status"] == status and c["reason"] == reason, c
        return c

    c = await eventually(lambda: accepted("True", "Accepted"))
    assert "2 tenants" in c["message"] and "tenant-tiers" in c["message"]

    # An edit of the list alone (no TokenBudget changes) reaches the config.
    await kubectl.patch("ConfigMap", "tenant-tiers", {"data": {"tiers.yaml": "acme: free\ninitech: premium\n"}})
    await eventually(lambda: assigned({"acme": "free", "initech": "premium"}))

    # A list that does not read: nobody is lifted, the budget stays, its condition and an Event say why.
    await kubectl.patch("ConfigMap", "tenant-tiers", {"data": {"tiers.yaml": "acme: [premium]\n"}})
    await eventually(lambda: assigned({}))
    c = await eventually(lambda: accepted("False", "InvalidTenantTiers"))
    assert "acme" in c["message"] and "spec.tenantTiersFrom.key" in c["message"]
    budget = await kubectl.get("TokenBudget", "chat-budget")
    assert condition(budget, "Ready")["status"] == "True"

    async def event_posted() -> None:
        events = [e for e in await kubectl.list("Event") if e["involvedObject"]["name"] == "chat-budget"]
        assert any(e["reason"] == "InvalidTenantTiers" and e["type"] == "Warning" for e in events), events

    await eventually(event_posted)

    # Deleted: the same, and the references condition names the ConfigMap.
    await kubectl.patch("ConfigMap", "tenant-tiers", {"data": {"tiers.yaml": "acme: premium\n"}})
    await eventually(lambda: assigned({"acme": "premium"}))
    await kubectl.delete("ConfigMap", "tenant-tiers")
    await eventually(lambda: assigned({}))
    await eventually(lambda: accepted("False", "ConfigMapNotFound"))
    refs = condition(await kubectl.get("TokenBudget", "chat-budget"), "ResolvedRefs")
    assert refs["status"] == "False" and refs["reason"] == "ConfigMapNotFound"

    # Created again: back in force.
    await kubectl.apply(tiers_cm("globex: premium\n"))
    await eventually(lambda: assigned({"globex": "premium"}))
    await eventually(lambda: accepted("True", "Accepted"))

    # Everything the operator asked for on the way (reading the ConfigMap by name included) the chart grants.
    requests = operator_requests(kmock)
    assert any(a.verb == "get" and a.resource == "configmaps" and a.name == "tenant-tiers" for a in requests)
    docs = render()
    denied = sorted({a for a in requests if not authorized(docs, a)}, key=repr)
    assert denied == [], "the chart's RBAC does not allow what the operator did"


async def test_only_a_referenced_configmap_asks_for_a_recompile() -> None:
    """The ConfigMap handler on its own: kopf sends it every ConfigMap of the cluster."""
    from kubetoll_operator import handlers

    reconciler = handlers.Reconciler(handlers.OperatorOptions())
    memo = type("Memo", (), {"reconciler": reconciler})()
    index = {"kubetoll_tokenbudgets": {"team-a": [{**BUDGET, "metadata": {"name": "chat-budget"}}]}}

    async def event(name: str, data: dict[str, str], type_: str = "MODIFIED", namespace: str = "team-a") -> None:
        body = {"metadata": {"name": name, "namespace": namespace}, "data": data}
        await handlers._on_tier_configmap(type=type_, body=body, namespace=namespace, name=name, memo=memo, **index)

    try:
        await event("app-settings", {"a": "1"})  # nobody's tier list
        await event("tenant-tiers", {"tiers.yaml": "acme: premium"}, namespace="team-b")  # same name, other namespace
        await event(handlers.CONFIGMAP_NAME, {"router.json": "{}"})  # the operator's own: not a tier list
        assert reconciler.pending == set()
        await event("tenant-tiers", {"tiers.yaml": "acme: premium"})
        assert reconciler.pending == {"team-a"}
        reconciler.pending.clear()
        await event("tenant-tiers", {"tiers.yaml": "acme: premium"})  # the same data again (a resync)
        assert reconciler.pending == set()
        await event("tenant-tiers", {}, type_="DELETED")
        assert reconciler.pending == {"team-a"}
    finally:
        await reconciler.close()
