"""The kopf operator end to end against kmock's KubernetesEmulator.

The operator runs for real (kopf.operator with the project's registry) and talks
HTTP to the emulator, logging in through a kubeconfig file like it would on a
laptop. The test acts as `kubectl`: it creates, patches and deletes objects over
the same HTTP API and waits (polling with a deadline) for the operator's output.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import hashlib
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
import yaml
from kmock._internal.references import ResourceInfo, resource
from kubetoll_operator import handlers

ROOT = Path(__file__).resolve().parent.parent
NS = "team-a"
PLURALS = {"ModelBackend": "modelbackends", "ModelRoute": "modelroutes", "TokenBudget": "tokenbudgets", "CachePolicy": "cachepolicies"}
CORE = {"ConfigMap": "configmaps", "Secret": "secrets", "Event": "events", "Namespace": "namespaces", "Pod": "pods"}


def register_resources(emulator: Any) -> None:
    verbs = ["get", "list", "watch", "create", "update", "patch", "delete"]
    for kind, plural in PLURALS.items():
        emulator.resources[resource("kubetoll.dev", "v1alpha1", plural)] = ResourceInfo(kind=kind, singular=kind.lower(), namespaced=True, verbs=verbs, subresources=["status"])
    for kind, plural in CORE.items():
        emulator.resources[resource("", "v1", plural)] = ResourceInfo(kind=kind, singular=kind.lower(), namespaced=kind != "Namespace", verbs=verbs)
    emulator.resources[resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")] = ResourceInfo(kind="CustomResourceDefinition", namespaced=False, verbs=verbs)


class Kubectl:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    @staticmethod
    def path(kind: str, namespace: str, name: str | None = None) -> str:
        if kind in PLURALS:
            base = f"/apis/kubetoll.dev/v1alpha1/namespaces/{namespace}/{PLURALS[kind]}"
        else:
            base = f"/api/v1/namespaces/{namespace}/{CORE[kind]}"
        return f"{base}/{name}" if name else base

    async def apply(self, obj: dict[str, Any], namespace: str = NS) -> None:
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["namespace"] = namespace
        async with self.session.post(self.path(obj["kind"], namespace), json=obj) as resp:
            assert resp.status < 300, await resp.text()

    async def patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str = NS) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(self.path(kind, namespace, name), data=json.dumps(patch), headers=headers) as resp:
            assert resp.status < 300, await resp.text()

    async def delete(self, kind: str, name: str, namespace: str = NS) -> None:
        async with self.session.delete(self.path(kind, namespace, name)) as resp:
            assert resp.status < 300, await resp.text()

    async def get(self, kind: str, name: str, namespace: str = NS) -> dict[str, Any] | None:
        async with self.session.get(self.path(kind, namespace, name)) as resp:
            if resp.status == 404:
                return None
            assert resp.status < 300, await resp.text()
            return await resp.json()

    async def list(self, kind: str, namespace: str = NS) -> list[dict[str, Any]]:
        async with self.session.get(self.path(kind, namespace)) as resp:
            assert resp.status < 300, await resp.text()
            return (await resp.json())["items"]


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Poll `check` until it passes; its last error if the deadline passes.

    KeyError and TypeError count as "not yet": a check that indexes an object the
    operator has not written yet (`None["data"]`) must wait, not fail at once.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await check()
        except (AssertionError, KeyError, TypeError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


def example_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(glob.glob(str(ROOT / "examples" / "*.yaml"))):
        docs += [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    return docs


@pytest.fixture
async def kubectl(kmock: Any) -> AsyncIterator[Kubectl]:
    register_resources(kmock)
    async with aiohttp.ClientSession(base_url=str(kmock.url)) as session:
        yield Kubectl(session)


@pytest.fixture
async def start_operator(kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[[], Awaitable[kopf.Memo]]]:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}],
        "current-context": "kmock",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    # kopf cancels every task created after it started when it stops, so it gets
    # its own thread and event loop (as kopf.testing.KopfRunner does); the
    # emulator keeps serving on the test's loop. Each start has its own stop flag:
    # `await stop_operator(memo)` stops one (to test a restart); the rest stop at teardown.
    running: list[tuple[threading.Event, threading.Thread]] = []
    failures: list[BaseException] = []

    async def start(**options: Any) -> kopf.Memo:
        settings = kopf.OperatorSettings()
        settings.watching.reconnect_backoff = 0.1
        settings.queueing.idle_timeout = 0.5
        memo = kopf.Memo(options=handlers.OperatorOptions(**{"debounce_seconds": 0.05, **options}))
        ready = threading.Event()
        stop = threading.Event()

        def main() -> None:
            try:
                asyncio.run(kopf.operator(registry=handlers.registry, settings=settings, clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready, memo=memo))
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # reported at teardown
                failures.append(exc)

        thread = threading.Thread(target=main, name="kopf-operator", daemon=True)
        thread.start()
        running.append((stop, thread))
        memo.stop_flag, memo.operator_thread = stop, thread
        assert await asyncio.to_thread(ready.wait, 10), "the operator did not start"
        return memo

    yield start
    for stop, thread in running:
        stop.set()
        await asyncio.to_thread(thread.join, 15)
        assert not thread.is_alive(), "the operator did not stop"
    assert failures == []


async def stop_operator(memo: kopf.Memo) -> None:
    """Stop one operator started by `start_operator` and wait until its thread has ended."""
    memo.stop_flag.set()
    await asyncio.to_thread(memo.operator_thread.join, 15)
    assert not memo.operator_thread.is_alive(), "the operator did not stop"


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions", []):
        if c["type"] == type_:
            return c
    raise AssertionError(f"no {type_} condition in {obj.get('status')}")


async def test_operator_compiles_updates_and_cleans_up(kubectl: Kubectl, start_operator: Any) -> None:
    await start_operator()
    for doc in example_docs():
        await kubectl.apply(doc)

    # ConfigMap and credentials Secret appear.
    async def config_written() -> dict[str, Any]:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        assert cm is not None
        text = cm["data"]["router.json"]
        assert cm["metadata"]["annotations"]["kubetoll.dev/config-hash"] == hashlib.sha256(text.encode()).hexdigest()
        assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetoll-operator"
        config = json.loads(text)
        assert {b["name"] for b in config["backends"]} == {"gpt-4o", "gpt-4o-mini", "claude-sonnet", "llama-vllm", "embeddings"}
        assert [r["name"] for r in config["routes"]] == ["chat"] and config["namespace"] == NS
        return config

    config = await eventually(config_written)
    assert config["routes"][0]["rules"][0]["backends"] == ["claude-sonnet", "gpt-4o"]

    async def credentials_written() -> dict[str, Any]:
        secret = await kubectl.get("Secret", "kubetoll-credentials")
        assert secret is not None and secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetoll-operator"
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert data == {"openai-credentials_api-key": "sk-REPLACE-ME", "anthropic-credentials_api-key": "sk-ant-REPLACE-ME"}
        return secret

    await eventually(credentials_written)

    # Statuses.
    async def statuses() -> None:
        b = await kubectl.get("ModelBackend", "llama-vllm")
        assert condition(b, "Ready")["status"] == "True" and condition(b, "ResolvedRefs")["status"] == "True"
        assert b["status"]["endpoint"] == f"http://vllm-llama.{NS}.svc.cluster.local:8000/v1"
        assert b["status"]["prices"]["source"] == "gpu-shadow"
        g = await kubectl.get("ModelBackend", "gpt-4o")
        assert g["status"]["prices"]["source"] == "catalog:openai/gpt-4o" and g["status"]["prices"]["inputPerMTok"] > 0
        r = await kubectl.get("ModelRoute", "chat")
        assert condition(r, "Ready")["status"] == "True"
        assert r["status"]["modelName"] == "chat" and r["status"]["firstBackend"] == "claude-sonnet"
        t = await kubectl.get("TokenBudget", "chat-budget")
        assert condition(t, "Ready")["status"] == "True" and condition(t, "TenancyAccepted")["status"] == "True"
        c = await kubectl.get("CachePolicy", "faq-cache")
        ready = condition(c, "Ready")
        assert ready["status"] == "True" and ready["reason"] == "Compiled"
        assert c["status"]["routes"] == ["chat"]

    await eventually(statuses)

    # An update changes the ConfigMap (and its hash); the Secret stays.
    cm_before = await kubectl.get("ConfigMap", "kubetoll-router")
    await kubectl.patch("ModelBackend", "gpt-4o-mini", {"spec": {"maxConnections": 9}})

    async def config_updated() -> None:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        config = json.loads(cm["data"]["router.json"])
        assert {b["name"]: b for b in config["backends"]}["gpt-4o-mini"]["maxConnections"] == 9
        assert cm["metadata"]["annotations"]["kubetoll.dev/config-hash"] != cm_before["metadata"]["annotations"]["kubetoll.dev/config-hash"]

    await eventually(config_updated)

    # A rotated key reaches the credentials Secret; the config does not change.
    cm_before = await kubectl.get("ConfigMap", "kubetoll-router")
    await kubectl.patch("Secret", "openai-credentials", {"stringData": {"api-key": "sk-rotated"}})

    async def key_rotated() -> None:
        secret = await kubectl.get("Secret", "kubetoll-credentials")
        assert base64.b64decode(secret["data"]["openai-credentials_api-key"]).decode() == "sk-rotated"

    await eventually(key_rotated)
    cm_after = await kubectl.get("ConfigMap", "kubetoll-router")
    assert cm_after["data"] == cm_before["data"]

    # A broken reference: the route keeps working without it, says so, and an Event is posted.
    await kubectl.patch("ModelRoute", "chat", {"spec": {"rules": [{"name": "default", "backends": ["no-such-backend", "gpt-4o-mini"]}]}})

    async def reference_reported() -> None:
        r = await kubectl.get("ModelRoute", "chat")
        refs = condition(r, "ResolvedRefs")
        assert refs["status"] == "False" and refs["reason"] == "BackendNotFound" and "spec.rules[0].backends[0]" in refs["message"]
        assert condition(r, "Ready")["status"] == "True"
        events = [e for e in await kubectl.list("Event") if e["involvedObject"]["name"] == "chat"]
        assert any(e["reason"] == "BackendNotFound" and e["type"] == "Warning" and "no-such-backend" in e["message"] for e in events)
        config = json.loads((await kubectl.get("ConfigMap", "kubetoll-router"))["data"]["router.json"])
        assert config["routes"][0]["rules"] == [{"name": "default", "match": {"keywords": [], "tenants": [], "tiers": []}, "backends": ["gpt-4o-mini"]}]

    await eventually(reference_reported)

    # A deleted Secret leaves its backend out (and its key out of the credentials).
    await kubectl.delete("Secret", "anthropic-credentials")

    async def secret_gone() -> None:
        b = await kubectl.get("ModelBackend", "claude-sonnet")
        ready = condition(b, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "SecretNotFound"
        secret = await kubectl.get("Secret", "kubetoll-credentials")
        assert set(secret["data"]) == {"openai-credentials_api-key"}
        config = json.loads((await kubectl.get("ConfigMap", "kubetoll-router"))["data"]["router.json"])
        assert "claude-sonnet" not in {b["name"] for b in config["backends"]}

    await eventually(secret_gone)

    # Deleting every resource removes both managed objects.
    for doc in example_docs():
        if doc["kind"] in PLURALS:
            await kubectl.delete(doc["kind"], doc["metadata"]["name"])

    async def cleaned_up() -> None:
        assert await kubectl.get("ConfigMap", "kubetoll-router") is None
        assert await kubectl.get("Secret", "kubetoll-credentials") is None

    await eventually(cleaned_up)


async def test_namespaces_are_compiled_apart_and_stale_config_is_removed_at_start(kubectl: Kubectl, start_operator: Any) -> None:
    # Left behind by an earlier operator: managed config in a namespace with no resources.
    stale = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kubetoll-router", "labels": {"app.kubernetes.io/managed-by": "kubetoll-operator"}}, "data": {"router.json": "{}"}}
    await kubectl.apply(stale, namespace="old")
    # Created before the operator starts: picked up from the initial listing.
    backend = {
        "apiVersion": "kubetoll.dev/v1alpha1",
        "kind": "ModelBackend",
        "metadata": {"name": "local"},
        "spec": {"provider": "openai-compatible", "model": "m", "serviceRef": {"name": "llm", "port": 80}, "pricing": {"gpuHourlyUSD": 1, "tokensPerSecond": 100}},
    }
    route = {"apiVersion": "kubetoll.dev/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "chat"}, "spec": {"rules": [{"backends": ["local"]}]}}
    await kubectl.apply(backend, namespace="ns-1")
    await kubectl.apply(route, namespace="ns-1")
    await kubectl.apply(backend, namespace="ns-2")
    bad = {**route, "spec": {"rules": [{"backends": ["missing"]}]}}
    await kubectl.apply(bad, namespace="ns-2")

    memo = await start_operator()

    async def compiled() -> None:
        assert await kubectl.get("ConfigMap", "kubetoll-router", namespace="old") is None
        one = json.loads((await kubectl.get("ConfigMap", "kubetoll-router", namespace="ns-1"))["data"]["router.json"])
        assert one["namespace"] == "ns-1" and one["backends"][0]["endpoint"] == "http://llm.ns-1.svc.cluster.local:80/v1"
        assert [r["name"] for r in one["routes"]] == ["chat"]
        two = json.loads((await kubectl.get("ConfigMap", "kubetoll-router", namespace="ns-2"))["data"]["router.json"])
        assert two["routes"] == []  # the broken route is left out of ns-2 only
        r = await kubectl.get("ModelRoute", "chat", namespace="ns-2")
        ready = condition(r, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "NoBackends"
        assert (await kubectl.get("Secret", "kubetoll-credentials", namespace="ns-1"))["data"] == {}

    await eventually(compiled)

    # A status write by the operator does not trigger another compile; a spec change does.
    compiles = memo.reconciler.compiles
    await asyncio.sleep(0.5)
    assert memo.reconciler.compiles == compiles
    await kubectl.patch("ModelRoute", "chat", {"spec": {"rules": [{"backends": ["local"]}]}}, namespace="ns-2")

    async def fixed() -> None:
        r = await kubectl.get("ModelRoute", "chat", namespace="ns-2")
        assert condition(r, "Ready")["status"] == "True"
        two = json.loads((await kubectl.get("ConfigMap", "kubetoll-router", namespace="ns-2"))["data"]["router.json"])
        assert [r["name"] for r in two["routes"]] == ["chat"]

    await eventually(fixed)


async def test_managed_configmap_is_restored_after_manual_deletion(kubectl: Kubectl, start_operator: Any) -> None:
    await start_operator()
    backend = {
        "apiVersion": "kubetoll.dev/v1alpha1",
        "kind": "ModelBackend",
        "metadata": {"name": "local"},
        "spec": {"provider": "openai-compatible", "model": "m", "endpoint": "http://llm:8000/v1", "pricing": {"inputPerMTok": 0, "outputPerMTok": 0}},
    }
    await kubectl.apply(backend)

    async def exists() -> dict[str, Any]:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        assert cm is not None
        return cm

    first = await eventually(exists)
    await kubectl.delete("ConfigMap", "kubetoll-router")
    again = await eventually(exists)
    assert again["data"] == first["data"]
