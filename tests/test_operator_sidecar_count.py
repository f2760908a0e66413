"""`budgetStore.expectedSidecars`: the operator counts each namespace's injected pods (sidecar_count.py).

The operator runs on kmock's emulator (tests/conftest.py, support/kopf_env.py)
with a Redis budget store configured (a private redis-server; no budget, so no
spend reporter reads it). Pods are plain objects the test creates, patches and
deletes, as the API server would show them to a watch: labelled by the injector
or not, Running or terminated. What is checked is the compiled ConfigMap, and the
recompiles the operator asked for (its debug log names each request's cause).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from kubetoll_operator.injection import INJECTED_KEY
from kubetoll_operator.sidecar_count import FIELD_SELECTOR, LABEL_SELECTOR, expected_sidecars
from support.kopf_env import LOCAL_BACKEND, NS, Kubectl, eventually, route_to_local
from support.log_events import log_events

BACKEND = LOCAL_BACKEND
ROUTE = route_to_local()


def pod(name: str, *, injected: bool = True, phase: str = "Running") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "chat", **({INJECTED_KEY: "true"} if injected else {})}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
        "status": {"phase": phase},
    }


async def expected_in_config(kubectl: Kubectl, want: int) -> None:
    async def check() -> None:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        assert json.loads(cm["data"]["router.json"])["budgetStore"]["expectedSidecars"] == want

    await eventually(check)


def pod_requests(events: Any) -> list[str]:
    """The recompiles the operator asked for because of a pod, in order."""
    return [r.getMessage() for r in events.records if r.getMessage().startswith(f"recompile of {NS} requested: Pod ")]


@pytest.mark.parametrize("count, want", [(0, 0), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16), (1000, 1024)])
def test_the_count_is_rounded_up_to_a_power_of_two(count: int, want: int) -> None:
    assert expected_sidecars(count) == want


async def test_the_first_compile_counts_the_pods_that_were_there(
    kmock: Any, kubectl: Kubectl, start_operator: Any, redis_url: str
) -> None:
    for doc in (BACKEND, ROUTE, pod("a"), pod("b"), pod("c")):
        await kubectl.apply(doc)
    # Not counted: a finished Job's pod, a failed one, a pod without the injector's label, another namespace's.
    await kubectl.apply(pod("done", phase="Succeeded"))
    await kubectl.apply(pod("crashed", phase="Failed"))
    await kubectl.apply(pod("plain", injected=False))
    await kubectl.apply(pod("elsewhere"), namespace="team-b")
    memo = await start_operator(redis_url=redis_url)
    await expected_in_config(kubectl, 4)
    # kopf fills every index before any handler runs: the one compile already had all three.
    assert memo.reconciler.compiles == 1
    # The watch asks the API server for injected, unterminated pods only (kmock ignores selectors;
    # a real API server sends a pod that stops matching as DELETED).
    pod_reads = [
        r
        for r in kmock
        if r.headers.get("Authorization") == "Bearer test-token"  # the operator's (the test's own carry no token)
        and r.resource is not None
        and r.resource.plural == "pods"
    ]
    assert pod_reads
    for r in pod_reads:
        assert r.params.get("labelSelector") == LABEL_SELECTOR == f"{INJECTED_KEY}=true"
        assert r.params.get("fieldSelector") == FIELD_SELECTOR == "status.phase!=Succeeded,status.phase!=Failed"


async def test_the_config_changes_only_when_the_rounded_count_does(
    kubectl: Kubectl, start_operator: Any, redis_url: str
) -> None:
    for doc in (BACKEND, ROUTE):
        await kubectl.apply(doc)
    with log_events("kubetoll.operator", logging.DEBUG) as events:
        await start_operator(redis_url=redis_url)
        await expected_in_config(kubectl, 0)  # no pods: unknown

        await kubectl.apply(pod("p1"))
        await expected_in_config(kubectl, 1)
        await kubectl.apply(pod("p2"))
        await kubectl.apply(pod("p3"))
        await expected_in_config(kubectl, 4)

        # Same power of two: a status update, and a fourth pod. Neither asks for a recompile.
        seen = len(pod_requests(events))
        conditions = [{"type": "Ready", "status": "True"}]
        await kubectl.patch("Pod", "p1", {"status": {"phase": "Running", "conditions": conditions}})
        await kubectl.apply(pod("p4"))
        # Then 2 pods: p1 finished (after its status update, so that event was handled first) and p4 gone.
        await kubectl.patch("Pod", "p1", {"status": {"phase": "Succeeded"}})
        await kubectl.delete("Pod", "p4")
        await expected_in_config(kubectl, 2)
        later = pod_requests(events)[seen:]
        assert later and all(m.endswith("expectedSidecars 2") for m in later), later
