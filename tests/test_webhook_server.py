"""The operator's real webhook server (kopf's, over HTTPS) answering AdmissionReviews.

kopf runs for real (`kopf.operator` with the project's registry, in its own thread
and loop, support/kopf_env.py) against kmock's KubernetesEmulator, with the
webhook enabled the way the chart runs it: a certificate directory (tls.crt,
tls.key, ca.crt, made here by trustme) on a fixed port. The test is the API
server: it POSTs AdmissionReviews to the two webhook paths, verifying the server
certificate against the CA, and applies the returned JSONPatch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import trustme
import yaml
from kmock._internal.references import ResourceInfo, resource

from kubetoll_operator.injection import InjectionOptions, mutate_pod
from kubetoll_operator.webhook import WebhookOptions
from support.admission import admission_review, post_review
from support.kopf_env import Kubectl, OperatorThreads, eventually, use_kmock_kubeconfig

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "registry.example/kubetoll-sidecar:1.2.3"
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]


@pytest.fixture
async def cluster(kmock: Any) -> AsyncIterator[aiohttp.ClientSession]:
    """The emulator with the kinds the operator's handlers watch, and two namespaces."""
    for kind, plural in (
        ("ModelBackend", "modelbackends"),
        ("ModelRoute", "modelroutes"),
        ("TokenBudget", "tokenbudgets"),
        ("CachePolicy", "cachepolicies"),
    ):
        kmock.resources[resource("kubetoll.dev", "v1alpha1", plural)] = ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True, verbs=VERBS, subresources=["status"]
        )
    for kind, plural in (
        ("ConfigMap", "configmaps"),
        ("Secret", "secrets"),
        ("Event", "events"),
        ("Namespace", "namespaces"),
        ("Pod", "pods"),
    ):
        kmock.resources[resource("", "v1", plural)] = ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=kind != "Namespace", verbs=VERBS
        )
    kmock.resources[resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")] = ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=VERBS
    )
    # kmock 0.8 cannot store cluster-scoped namespaces (its path parser reads
    # /api/v1/namespaces/NAME as a namespace, not an object), so the two
    # namespaces the webhook reads are canned GET answers.
    for name, labels in (("team-a", {}), ("team-b", {"kubetoll.dev/injection": "enabled"})):
        kmock[f"get /api/v1/namespaces/{name}"] << {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **labels}},
        }
    async with aiohttp.ClientSession(base_url=str(kmock.url)) as session:
        yield session


@pytest.fixture
async def start_operator(
    kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[WebhookOptions], Awaitable[Any]]]:
    """The operator with the given webhook options (support/kopf_env.py)."""
    use_kmock_kubeconfig(kmock, tmp_path, monkeypatch)
    operators = OperatorThreads()
    yield lambda webhook: operators.start(idle_timeout=None, webhook=webhook)
    await operators.stop_all()


class ApiServer:
    """Plays the API server's part: POSTs AdmissionReviews over verified HTTPS."""

    def __init__(self, port: int, ca: trustme.CA) -> None:
        self.base = f"https://127.0.0.1:{port}"
        self.ssl = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())

    async def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await self.review(
                    "/inject-sidecar",
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {"namespace": "team-a", "name": "probe"},
                        "spec": {"containers": []},
                    },
                )
                return
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, AssertionError):
                # Refused until kopf has scanned the API's resources; 404 while pods are unknown to it.
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def review(self, path: str, pod: dict[str, Any], namespace: str = "team-a") -> dict[str, Any]:
        return await post_review(self.base + path, admission_review(pod, namespace=namespace), self.ssl)


def app_pod(
    labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None, namespace: str | None = "team-a"
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "generateName": "chat-api-5f7d-",
        "labels": {"app": "chat-api", **(labels or {})},
        "annotations": annotations or {},
    }
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [{"name": "app", "image": "example/chat-api:2", "env": [{"name": "MODE", "value": "prod"}]}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def patched(original: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["allowed"] is True, response
    if "patch" not in response:
        return original
    assert response["patchType"] == "JSONPatch"
    return jsonpatch.apply_patch(original, json.loads(base64.b64decode(response["patch"])))


async def test_kopf_serves_the_injection_webhook_over_https(
    kmock: Any, cluster: Any, start_operator: Any, cert_dir: Path, ca: trustme.CA, port: int
) -> None:
    options = WebhookOptions(
        enabled=True,
        addr="127.0.0.1",
        port=port,
        cert_dir=str(cert_dir),
        native_sidecars="auto",
        injection=InjectionOptions(image=IMAGE),
    )
    await start_operator(options)
    api = ApiServer(port, ca)
    await api.wait_listening()

    # Opted in by label. The emulator reports Kubernetes 1.26, so auto means a plain container.
    pod = app_pod(labels={"kubetoll.dev/inject": "true"})
    result = patched(pod, await api.review("/inject-sidecar", pod))
    assert result == jsonpatch.apply_patch(
        pod, mutate_pod(pod, {}, InjectionOptions(image=IMAGE, native_sidecars=False))
    )
    assert [c["name"] for c in result["spec"]["containers"]] == ["app", "kubetoll-sidecar"]
    assert result["spec"]["containers"][0]["env"][1:] == [
        *({"name": n, "value": "http://127.0.0.1:7400/v1"} for n in ("OPENAI_BASE_URL", "OPENAI_API_BASE")),
        {"name": "OPENAI_API_KEY", "value": "kubetoll-placeholder-the-sidecar-holds-the-credentials"},
    ]
    assert result["metadata"]["annotations"]["kubetoll.dev/injected"] == "true"

    # Reinvocation: the injected pod comes back unchanged.
    assert "patch" not in await api.review("/inject-sidecar", result)

    # Namespace-enabled: the webhook reads team-b's labels through the API.
    pod = app_pod(namespace=None)  # as the API server may send it: the namespace only in the request
    result = patched(pod, await api.review("/inject-sidecar-namespace", pod, namespace="team-b"))
    assert result["spec"]["containers"][-1]["name"] == "kubetoll-sidecar"
    assert len(kmock["get /api/v1/namespaces/team-b"]) == 1
    # ... and does not take the API server's word blindly: team-a is not enabled.
    assert "patch" not in await api.review("/inject-sidecar-namespace", app_pod(), namespace="team-a")
    # Opted out in an enabled namespace (an annotation: the label would not even reach us).
    assert "patch" not in await api.review(
        "/inject-sidecar-namespace",
        app_pod(annotations={"kubetoll.dev/inject": "false"}, namespace="team-b"),
        namespace="team-b",
    )

    # A bad override is denied with its reason, for the ReplicaSet's events.
    response = await api.review(
        "/inject-sidecar",
        app_pod(labels={"kubetoll.dev/inject": "true"}, annotations={"kubetoll.dev/sidecar-memory": "lots"}),
    )
    assert response["allowed"] is False
    assert "kubetoll.dev/sidecar-memory: 'lots' is not a Kubernetes quantity" in response["status"]["message"]

    # A pod the webhook is not for passes.
    assert "patch" not in await api.review("/inject-sidecar", app_pod())

    # A failure inside the webhook (here: a pod it cannot read) lets the pod through
    # un-injected, with a warning, as failurePolicy Ignore would (--webhook-on-error=allow).
    broken = app_pod(labels={"kubetoll.dev/inject": "true"})
    broken["spec"]["containers"] = "not a list"
    response = await api.review("/inject-sidecar", broken)
    assert response["allowed"] is True and "patch" not in response
    assert "the webhook failed (TypeError)" in response["warnings"][0]


async def test_webhook_errors_deny_when_asked(
    cluster: Any, start_operator: Any, cert_dir: Path, ca: trustme.CA, port: int
) -> None:
    await start_operator(
        WebhookOptions(
            enabled=True,
            addr="127.0.0.1",
            port=port,
            cert_dir=str(cert_dir),
            native_sidecars="false",
            on_error="deny",
            injection=InjectionOptions(image=IMAGE),
        )
    )
    api = ApiServer(port, ca)
    await api.wait_listening()
    broken = app_pod(labels={"kubetoll.dev/inject": "true"})
    broken["spec"]["containers"] = "not a list"
    response = await api.review("/inject-sidecar", broken)
    assert response["allowed"] is False and response["status"]["code"] == 500
    assert "kubetoll sidecar injection failed: TypeError" in response["status"]["message"]


async def test_auto_native_sidecars_follow_the_server_version(
    kmock: Any, cluster: Any, start_operator: Any, cert_dir: Path, ca: trustme.CA, port: int
) -> None:
    kmock["get /version"] << {"major": "1", "minor": "31", "gitVersion": "v1.31.4", "platform": "linux/amd64"}
    await start_operator(
        WebhookOptions(
            enabled=True, addr="127.0.0.1", port=port, cert_dir=str(cert_dir), injection=InjectionOptions(image=IMAGE)
        )
    )
    api = ApiServer(port, ca)
    await api.wait_listening()
    pod = app_pod(labels={"kubetoll.dev/inject": "true"})
    result = patched(pod, await api.review("/inject-sidecar", pod))
    assert [c["name"] for c in result["spec"]["initContainers"]] == ["kubetoll-sidecar"]
    assert result["spec"]["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in result["spec"]["containers"]] == ["app"]


async def test_the_operator_runs_without_the_webhook(cluster: Any, start_operator: Any) -> None:
    """With the webhook off (no --webhook) the admission handlers idle and the operator works as before."""
    memo = await start_operator(None)  # type: ignore[arg-type]
    assert "injector" not in memo  # no webhook state: nothing was set up to serve admission reviews
    # ... and it still does its job: the examples compile into the namespace's RouterConfig.
    kubectl = Kubectl(cluster)
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                await kubectl.apply(doc)

    async def compiled() -> None:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        assert cm is not None
        assert [r["name"] for r in json.loads(cm["data"]["router.json"])["routes"]] == ["chat"]

    await eventually(compiled)
