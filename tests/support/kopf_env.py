"""The kopf operator against kmock's Kubernetes emulator, for the operator and webhook tests.

`Kubectl` is a small client of the emulator; `OperatorThreads` runs the operator's
kopf registry in threads of their own (kopf cancels every task created after it
started when it stops, as kopf.testing.KopfRunner knows), while the emulator keeps
serving on the test's loop. The `kubectl` and `start_operator` fixtures
(tests/conftest.py) are built on them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import traceback
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
import yaml
from kmock._internal.references import ResourceInfo, resource

from kubetoll_operator import handlers

NS = "team-a"
PLURALS = {
    "ModelBackend": "modelbackends",
    "ModelRoute": "modelroutes",
    "TokenBudget": "tokenbudgets",
    "CachePolicy": "cachepolicies",
}
CORE = {"ConfigMap": "configmaps", "Secret": "secrets", "Event": "events", "Namespace": "namespaces", "Pod": "pods"}


# A backend with prices and a route to it: what most operator tests compile around.
LOCAL_BACKEND: dict[str, Any] = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "ModelBackend",
    "metadata": {"name": "local"},
    "spec": {
        "provider": "openai-compatible",
        "model": "m",
        "endpoint": "http://llm:8000/v1",
        "pricing": {"inputPerMTok": 1, "outputPerMTok": 2},
    },
}


def route_to_local(name: str = "chat", **spec: Any) -> dict[str, Any]:
    """A ModelRoute sending everything to LOCAL_BACKEND, with any other spec fields given."""
    return {
        "apiVersion": "kubetoll.dev/v1alpha1",
        "kind": "ModelRoute",
        "metadata": {"name": name},
        "spec": {"rules": [{"backends": ["local"]}], **spec},
    }


def register_resources(emulator: Any) -> None:
    verbs = ["get", "list", "watch", "create", "update", "patch", "delete"]
    for kind, plural in PLURALS.items():
        emulator.resources[resource("kubetoll.dev", "v1alpha1", plural)] = ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True, verbs=verbs, subresources=["status"]
        )
    for kind, plural in CORE.items():
        emulator.resources[resource("", "v1", plural)] = ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=kind != "Namespace", verbs=verbs
        )
    # The replicas of a serviceRef's Service (kubetoll_operator.endpoint_slices).
    emulator.resources[resource("discovery.k8s.io", "v1", "endpointslices")] = ResourceInfo(
        kind="EndpointSlice", singular="endpointslice", namespaced=True, verbs=verbs
    )
    emulator.resources[resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")] = ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=verbs
    )


class Kubectl:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    @staticmethod
    def path(kind: str, namespace: str, name: str | None = None) -> str:
        if kind in PLURALS:
            base = f"/apis/kubetoll.dev/v1alpha1/namespaces/{namespace}/{PLURALS[kind]}"
        elif kind == "EndpointSlice":
            base = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
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
        async with self.session.patch(
            self.path(kind, namespace, name), data=json.dumps(patch), headers=headers
        ) as resp:
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


def use_kmock_kubeconfig(kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point KUBECONFIG at the emulator for this test."""
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


class OperatorThreads:
    """Operators started by a test, each with its own stop flag and thread."""

    def __init__(self) -> None:
        self.running: list[tuple[threading.Event, threading.Thread]] = []
        self.failures: list[BaseException] = []

    async def start(
        self, *, idle_timeout: float | None = 0.5, namespaces: list[str] | None = None, **options: Any
    ) -> kopf.Memo:
        """Start one (OperatorOptions from `options`); returns its memo once it is ready.

        `namespaces`: watch those only, as `kubetoll operator --namespace` does; default: cluster-wide.
        """
        settings = kopf.OperatorSettings()
        settings.watching.reconnect_backoff = 0.1
        if idle_timeout is not None:
            settings.queueing.idle_timeout = idle_timeout
        memo = kopf.Memo(options=handlers.OperatorOptions(**{"debounce_seconds": 0.05, **options}))
        ready, stop = threading.Event(), threading.Event()

        async def operate() -> None:
            _LOOPS[threading.get_ident()] = asyncio.get_running_loop()  # for _joined's report
            await kopf.operator(
                registry=handlers.registry,
                settings=settings,
                clusterwide=not namespaces,
                namespaces=namespaces or (),
                standalone=True,
                stop_flag=stop,
                ready_flag=ready,
                memo=memo,
            )

        def main() -> None:
            try:
                asyncio.run(operate())
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # reported at teardown
                self.failures.append(exc)

        thread = threading.Thread(target=main, name="kopf-operator", daemon=True)
        thread.start()
        self.running.append((stop, thread))
        memo.stop_flag, memo.operator_thread = stop, thread
        assert await asyncio.to_thread(ready.wait, 10), "the operator did not start"
        return memo

    async def stop_all(self) -> None:
        for stop, thread in self.running:
            stop.set()
            await _joined(thread)
        assert self.failures == []


async def stop_operator(memo: kopf.Memo) -> None:
    """Stop one operator started by `start_operator` and wait until its thread has ended."""
    memo.stop_flag.set()
    await _joined(memo.operator_thread)


async def _joined(thread: threading.Thread) -> None:
    """Wait for a stopped operator's thread. A stop that takes more than 15 s (once seen in a
    full suite on a loaded 2-core machine, not reproduced alone) is reported with where the
    thread was, as a warning if it then ends within 45 s, as a failure if it does not."""
    await asyncio.to_thread(thread.join, 15)
    if not thread.is_alive():
        _LOOPS.pop(thread.ident or -1, None)
        return
    where = _where(thread)
    await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive(), f"the operator did not stop within 45 s; after 15 s its thread was at:\n{where}"
    warnings.warn(f"the operator took more than 15 s to stop; after 15 s its thread was at:\n{where}", stacklevel=1)


_LOOPS: dict[int, asyncio.AbstractEventLoop] = {}  # operator thread id -> its event loop


def _where(thread: threading.Thread) -> str:
    """The thread's stack and its loop's unfinished tasks (names and where each waits): a diagnosis."""
    frame = sys._current_frames().get(thread.ident or -1)
    out = ["".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"]
    loop = _LOOPS.get(thread.ident or -1)
    if loop is not None:
        try:
            tasks = list(asyncio.all_tasks(loop))  # read from another thread: good enough for a report
        except RuntimeError:
            tasks = []
        for task in tasks:
            stack = task.get_stack(limit=2)
            at = ", ".join(f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in stack)
            out.append(f"task {task.get_name()}: {at}")
    return "\n".join(out)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions", []):
        if c["type"] == type_:
            return c
    raise AssertionError(f"no {type_} condition in {obj.get('status')}")
