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
from pathlib import Path
from typing import Any

import yaml

from support.kopf_env import NS, PLURALS, Kubectl, condition, eventually

ROOT = Path(__file__).resolve().parent.parent


def example_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(glob.glob(str(ROOT / "examples" / "*.yaml"))):
        docs += [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    return docs


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
        assert {b["name"] for b in config["backends"]} == {
            "gpt-4o",
            "gpt-4o-mini",
            "claude-sonnet",
            "llama-vllm",
            "embeddings",
        }
        assert [r["name"] for r in config["routes"]] == ["chat"] and config["namespace"] == NS
        return config

    config = await eventually(config_written)
    assert config["routes"][0]["rules"][0]["backends"] == ["claude-sonnet", "gpt-4o"]

    async def credentials_written() -> dict[str, Any]:
        secret = await kubectl.get("Secret", "kubetoll-credentials")
        assert (
            secret is not None and secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetoll-operator"
        )
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert data == {
            "openai-credentials_api-key": "sk-REPLACE-ME",
            "anthropic-credentials_api-key": "sk-ant-REPLACE-ME",
        }
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
        assert (
            cm["metadata"]["annotations"]["kubetoll.dev/config-hash"]
            != cm_before["metadata"]["annotations"]["kubetoll.dev/config-hash"]
        )

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
    await kubectl.patch(
        "ModelRoute", "chat", {"spec": {"rules": [{"name": "default", "backends": ["no-such-backend", "gpt-4o-mini"]}]}}
    )

    async def reference_reported() -> None:
        r = await kubectl.get("ModelRoute", "chat")
        refs = condition(r, "ResolvedRefs")
        assert (
            refs["status"] == "False"
            and refs["reason"] == "BackendNotFound"
            and "spec.rules[0].backends[0]" in refs["message"]
        )
        assert condition(r, "Ready")["status"] == "True"
        events = [e for e in await kubectl.list("Event") if e["involvedObject"]["name"] == "chat"]
        assert any(
            e["reason"] == "BackendNotFound" and e["type"] == "Warning" and "no-such-backend" in e["message"]
            for e in events
        )
        config = json.loads((await kubectl.get("ConfigMap", "kubetoll-router"))["data"]["router.json"])
        assert config["routes"][0]["rules"] == [
            {"name": "default", "match": {"keywords": [], "tenants": [], "tiers": []}, "backends": ["gpt-4o-mini"]}
        ]

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


async def test_namespaces_are_compiled_apart_and_stale_config_is_removed_at_start(
    kubectl: Kubectl, start_operator: Any
) -> None:
    # Left behind by an earlier operator: managed config in a namespace with no resources.
    stale = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "kubetoll-router", "labels": {"app.kubernetes.io/managed-by": "kubetoll-operator"}},
        "data": {"router.json": "{}"},
    }
    await kubectl.apply(stale, namespace="old")
    # Created before the operator starts: picked up from the initial listing.
    backend = {
        "apiVersion": "kubetoll.dev/v1alpha1",
        "kind": "ModelBackend",
        "metadata": {"name": "local"},
        "spec": {
            "provider": "openai-compatible",
            "model": "m",
            "serviceRef": {"name": "llm", "port": 80},
            "pricing": {"gpuHourlyUSD": 1, "tokensPerSecond": 100},
        },
    }
    route = {
        "apiVersion": "kubetoll.dev/v1alpha1",
        "kind": "ModelRoute",
        "metadata": {"name": "chat"},
        "spec": {"rules": [{"backends": ["local"]}]},
    }
    await kubectl.apply(backend, namespace="ns-1")
    await kubectl.apply(route, namespace="ns-1")
    await kubectl.apply(backend, namespace="ns-2")
    bad = {**route, "spec": {"rules": [{"backends": ["missing"]}]}}
    await kubectl.apply(bad, namespace="ns-2")

    memo = await start_operator()

    async def compiled() -> None:
        assert await kubectl.get("ConfigMap", "kubetoll-router", namespace="old") is None
        one = json.loads((await kubectl.get("ConfigMap", "kubetoll-router", namespace="ns-1"))["data"]["router.json"])
        assert (
            one["namespace"] == "ns-1" and one["backends"][0]["endpoint"] == "http://llm.ns-1.svc.cluster.local:80/v1"
        )
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
        "spec": {
            "provider": "openai-compatible",
            "model": "m",
            "endpoint": "http://llm:8000/v1",
            "pricing": {"inputPerMTok": 0, "outputPerMTok": 0},
        },
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
