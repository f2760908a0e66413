"""AdmissionReview requests as the API server sends them, for the webhook tests."""

from __future__ import annotations

import ssl
import uuid
from typing import Any

import aiohttp


def admission_review(obj: dict[str, Any], *, namespace: str, operation: str = "CREATE") -> dict[str, Any]:
    """An admission.k8s.io/v1 AdmissionReview for a Pod, as a ReplicaSet controller's create."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "4a1e",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


PLURALS = {"ModelBackend": "modelbackends", "ModelRoute": "modelroutes", "TokenBudget": "tokenbudgets"}
PLURALS["CachePolicy"] = "cachepolicies"


def resource_review(
    obj: dict[str, Any],
    *,
    namespace: str,
    operation: str = "CREATE",
    old: dict[str, Any] | None = None,
    group: str = "kubetoll.dev",
    version: str = "v1alpha1",
) -> dict[str, Any]:
    """An AdmissionReview for one of Kubetoll's kinds, as the API server sends it for `kubectl apply`.

    For DELETE the API server sends the stored object as `oldObject` and no `object`.
    """
    kind = obj["kind"]
    plural = PLURALS.get(kind, kind.lower() + "s")
    gvk = {"group": group, "version": version, "kind": kind}
    gvr = {"group": group, "version": version, "resource": plural}
    options_kind = {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions", "DELETE": "DeleteOptions"}[operation]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": obj.get("metadata", {}).get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "kubernetes-admin", "groups": ["kubeadm:cluster-admins", "system:authenticated"]},
            "object": None if operation == "DELETE" else obj,
            "oldObject": obj if operation == "DELETE" else old,
            "dryRun": False,
            "options": {"kind": options_kind, "apiVersion": "meta.k8s.io/v1"},
        },
    }


async def post_review(url: str, body: dict[str, Any], ssl_context: ssl.SSLContext) -> dict[str, Any]:
    """POST an AdmissionReview as the API server does; the answer's `response`, its envelope checked."""
    async with aiohttp.ClientSession() as session, session.post(url, json=body, ssl=ssl_context) as resp:
        assert resp.status == 200, f"{resp.status}: {await resp.text()}"
        answer = await resp.json()
    assert answer["kind"] == "AdmissionReview" and answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["response"]["uid"] == body["request"]["uid"]
    return dict(answer["response"])
