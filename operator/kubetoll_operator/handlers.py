"""The kopf operator: every change in a namespace recompiles that namespace.

kopf indexes keep the four kinds in memory by namespace (and kopf starts the
handlers only after the initial listing filled every index, so the first compile
sees the whole namespace, never half of it). An event on any of them, on a Secret
a backend references, or on the operator's own ConfigMap or Secret asks the
`Reconciler` to recompile that namespace. The Reconciler runs one worker per
namespace: it coalesces bursts of events, compiles, and writes

* the ConfigMap `kubetoll-router` (key `router.json`, annotation
  `kubetoll.dev/config-hash`), only when its content changes;
* the Secret `kubetoll-credentials` with exactly the referenced keys, only when
  they change;
* each resource's status (only when it changes) and a Warning Event per new
  problem;

and deletes both managed objects once the namespace has no resources left. A
failed API call is retried with backoff; the last written config stays in place
meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import hashlib
import logging
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import kopf

from .compiler import CompileResult, compile_namespace
from .kube import ApiError, KubeApi
from .resources import API_VERSION, GROUP, KINDS, VERSION
from .status import desired_status, merge_transition_times, status_differs

log = logging.getLogger("kubetoll.operator")

CONFIGMAP_NAME = "kubetoll-router"
CONFIG_KEY = "router.json"
CREDENTIALS_SECRET = "kubetoll-credentials"
HASH_ANNOTATION = "kubetoll.dev/config-hash"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetoll-operator"
COMPONENT = "kubetoll-operator"

registry = kopf.OperatorRegistry()


@dataclass
class OperatorOptions:
    redis_url: str | None = None
    cluster_domain: str = "cluster.local"
    debounce_seconds: float = 0.2  # coalesce a burst of events (kubectl apply -f dir/) into one compile
    max_backoff_seconds: float = 60.0
    webhook: Any = None  # webhook.WebhookOptions: the sidecar-injection webhook (None: off)


def _index_name(plural: str) -> str:
    return f"kubetoll_{plural}"


def _snapshot(body: Any) -> dict[str, Any]:
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: copy.deepcopy(meta.get(k)) for k in ("name", "namespace", "uid", "generation") if meta.get(k) is not None},
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()


def _secret_keys(secret: dict[str, Any]) -> dict[str, str]:
    """Key → base64 value. `stringData` only shows up on API emulators; a real server folds it into data."""
    out = dict(secret.get("data") or {})
    for k, v in (secret.get("stringData") or {}).items():
        out.setdefault(k, base64.b64encode(str(v).encode()).decode())
    return out


@dataclass
class Reconciler:
    options: OperatorOptions
    api: KubeApi | None = None
    indices: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    seen: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (kind, ns, name) → fingerprint
    applied: dict[str, str] = field(default_factory=dict)  # ns → config hash written
    reported: dict[str, set[tuple[str, ...]]] = field(default_factory=dict)  # ns → problems already posted as Events
    last_compile: str | None = None
    compiles: int = 0

    # ----------------------------------------------------------------- triggers

    def bind(self, kwargs: dict[str, Any]) -> None:
        for info in KINDS.values():
            name = _index_name(info.plural)
            if name in kwargs:
                self.indices[info.kind] = kwargs[name]

    def changed(self, kind: str, namespace: str, name: str, fingerprint: str | None) -> bool:
        key = (kind, namespace, name)
        if fingerprint is None:  # deleted
            self.seen.pop(key, None)
            return True
        if self.seen.get(key) == fingerprint:
            return False
        self.seen[key] = fingerprint
        return True

    def request(self, namespace: str, why: str) -> None:
        log.debug("recompile of %s requested: %s", namespace, why)
        self.pending.add(namespace)
        if namespace not in self.tasks:
            self.tasks[namespace] = asyncio.create_task(self._worker(namespace), name=f"kubetoll-reconcile-{namespace}")

    async def _worker(self, namespace: str) -> None:
        backoff = 1.0
        try:
            while namespace in self.pending:
                await asyncio.sleep(self.options.debounce_seconds)
                self.pending.discard(namespace)
                try:
                    await self.reconcile(namespace)
                    backoff = 1.0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("namespace %s: recompile failed, retrying in %.0fs (the last written config stays): %s", namespace, backoff, exc)
                    self.pending.add(namespace)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.options.max_backoff_seconds)
        finally:
            self.tasks.pop(namespace, None)

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self.api is not None:
            await self.api.close()

    # ----------------------------------------------------------------- reconcile

    def resources(self, namespace: str) -> list[dict[str, Any]]:
        out = []
        for index in self.indices.values():
            if namespace in index:
                out += list(index[namespace])
        return out

    def referenced_secrets(self, namespace: str) -> set[str]:
        names = set()
        for obj in self.resources(namespace):
            if obj.get("kind") == "ModelBackend":
                ref = ((obj.get("spec") or {}).get("credentials") or {}).get("secretRef") or {}
                if isinstance(ref.get("name"), str):
                    names.add(ref["name"])
        return names

    async def reconcile(self, namespace: str) -> None:
        assert self.api is not None, "not logged in yet"
        api = self.api
        resources = self.resources(namespace)
        cm_path = f"/api/v1/namespaces/{namespace}/configmaps/{CONFIGMAP_NAME}"
        secret_path = f"/api/v1/namespaces/{namespace}/secrets/{CREDENTIALS_SECRET}"
        if not resources:
            removed = []
            for what, path in (("configmap", cm_path), ("secret", secret_path)):
                current = await api.get(path)
                if current is not None and (current.get("metadata", {}).get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY:
                    await api.delete(path)
                    removed.append(what)
            self.applied.pop(namespace, None)
            self.reported.pop(namespace, None)
            if removed:
                log.info("namespace %s: no kubetoll resources left; removed %s", namespace, " and ".join(removed))
            return

        sources: dict[str, dict[str, str]] = {}
        for name in sorted(self.referenced_secrets(namespace)):
            secret = await api.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
            if secret is not None:
                sources[name] = _secret_keys(secret)
        store = None
        if self.options.redis_url:
            from kubetoll_sidecar.config import BudgetStoreSettings

            store = BudgetStoreSettings(url=self.options.redis_url)
        result = compile_namespace(namespace, resources, secrets=sources, budget_store=store, cluster_domain=self.options.cluster_domain)
        self.compiles += 1
        self.last_compile = datetime.datetime.now(datetime.timezone.utc).isoformat()

        changed: list[str] = []
        if result.config is None:
            log.error("namespace %s: compile failed (%s); keeping config %s", namespace, "; ".join(map(str, result.problems)), self.applied.get(namespace, "none")[:12])
        else:
            data = {key: sources[secret][k] for key, (secret, k) in result.credentials.items()}
            if await self._apply_secret(namespace, secret_path, data):
                changed.append("credentials")
            if await self._apply_configmap(namespace, cm_path, result):
                changed.append("config")
            self.applied[namespace] = result.content_hash
        statuses = await self._apply_statuses(namespace, result)
        events = await self._post_events(namespace, result)
        errors = sum(1 for p in result.problems if p.severity == "error")
        log.info(
            "namespace %s: compiled %d resources: config %s, %s; %d errors, %d warnings; %d statuses and %d events written",
            namespace,
            len(resources),
            result.content_hash[:12] or "none",
            ("updated " + " and ".join(changed)) if changed else "unchanged",
            errors,
            len(result.problems) - errors,
            statuses,
            events,
        )

    async def _apply_configmap(self, namespace: str, path: str, result: CompileResult) -> bool:
        assert self.api is not None
        current = await self.api.get(path)
        meta = {
            "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": {HASH_ANNOTATION: result.content_hash},
        }
        data = {CONFIG_KEY: result.config_json}
        if current is None:
            await self.api.create(
                f"/api/v1/namespaces/{namespace}/configmaps",
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CONFIGMAP_NAME, "namespace": namespace, **meta}, "data": data},
            )
            return True
        labels = current.get("metadata", {}).get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
            raise RuntimeError(f"ConfigMap {namespace}/{CONFIGMAP_NAME} exists and is not managed by {MANAGED_BY}; not overwriting it")
        annotations = current.get("metadata", {}).get("annotations") or {}
        if (current.get("data") or {}) == data and annotations.get(HASH_ANNOTATION) == result.content_hash:
            return False
        stale = {k: None for k in (current.get("data") or {}) if k not in data}
        await self.api.merge_patch(path, {"metadata": meta, "data": {**stale, **data}})
        return True

    async def _apply_secret(self, namespace: str, path: str, data: dict[str, str]) -> bool:
        assert self.api is not None
        current = await self.api.get(path)
        meta = {"labels": {MANAGED_BY_LABEL: MANAGED_BY}}
        if current is None:
            await self.api.create(
                f"/api/v1/namespaces/{namespace}/secrets",
                {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": CREDENTIALS_SECRET, "namespace": namespace, **meta}, "data": data},
            )
            return True
        labels = current.get("metadata", {}).get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
            raise RuntimeError(f"Secret {namespace}/{CREDENTIALS_SECRET} exists and is not managed by {MANAGED_BY}; not overwriting it")
        have = _secret_keys(current)
        if have == data:
            return False
        patch: dict[str, Any] = {"metadata": meta, "data": {**{k: None for k in have if k not in data}, **data}}
        if current.get("stringData"):
            patch["stringData"] = None
        await self.api.merge_patch(path, patch)
        return True

    async def _apply_statuses(self, namespace: str, result: CompileResult) -> int:
        assert self.api is not None
        current_by_key = {(o.get("kind"), o["metadata"]["name"]): o for o in self.resources(namespace)}
        written = 0
        for key, outcome in sorted(result.outcomes.items()):
            obj = current_by_key.get(key)
            if obj is None:
                continue
            current = obj.get("status") or {}
            desired = desired_status(result, outcome)
            if not status_differs(desired, current):
                continue
            status = merge_transition_times(desired, current)
            for k in current:
                if k not in status and k in ("endpoint", "prices", "modelName", "firstBackend"):
                    status[k] = None
            plural = KINDS[outcome.kind].plural
            path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}/{outcome.name}/status"
            try:
                await self.api.merge_patch(path, {"status": status})
            except ApiError as exc:
                if exc.status == 404:  # deleted meanwhile; its DELETED event recompiles
                    continue
                raise
            written += 1
        return written

    async def _post_events(self, namespace: str, result: CompileResult) -> int:
        assert self.api is not None
        uids = {(o.get("kind"), o["metadata"]["name"]): o["metadata"].get("uid") for o in self.resources(namespace)}
        current = {(p.kind, p.name, p.reason, p.field, p.message) for p in result.problems}
        before = self.reported.get(namespace, set())
        posted = 0
        for p in result.problems:
            key = (p.kind, p.name, p.reason, p.field, p.message)
            if key in before or (p.kind, p.name) not in uids:
                continue
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            event = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{p.name}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
                "involvedObject": {"apiVersion": API_VERSION, "kind": p.kind, "name": p.name, "namespace": namespace, "uid": uids[(p.kind, p.name)]},
                "type": "Warning",
                "reason": p.reason,
                "message": (f"{p.field}: " if p.field else "") + p.message,
                "source": {"component": COMPONENT},
                "reportingComponent": COMPONENT,
                "reportingInstance": socket.gethostname(),
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
            await self.api.create(f"/api/v1/namespaces/{namespace}/events", event)
            posted += 1
        self.reported[namespace] = current
        return posted


# --------------------------------------------------------------------------- kopf wiring


def _reconciler(memo: Any) -> Reconciler:
    reconciler: Reconciler | None = getattr(memo, "reconciler", None)
    if reconciler is None:
        reconciler = memo.reconciler = Reconciler(getattr(memo, "options", None) or OperatorOptions())
    return reconciler


@kopf.on.startup(registry=registry)
def _startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    # Event handlers and indexes only: kopf keeps no handler state and adds no
    # finalizers on our objects. Its own Events are for real trouble only.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    _reconciler(memo)


@kopf.on.cleanup(registry=registry)
async def _cleanup(memo: Any, **_: Any) -> None:
    await _reconciler(memo).close()


@kopf.on.login(registry=registry)
def _login(memo: Any, **kwargs: Any) -> kopf.ConnectionInfo | None:
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        reconciler = _reconciler(memo)
        if reconciler.api is None:
            reconciler.api = KubeApi(info)
        else:
            reconciler.api.update(info)
    return info


@kopf.on.probe(id="compiles", registry=registry)
def _probe(memo: Any, **_: Any) -> dict[str, Any]:
    r = _reconciler(memo)
    return {"compiles": r.compiles, "last": r.last_compile, "namespaces": len(r.applied)}


def _register_kind(plural: str, kind: str) -> None:
    index_name = _index_name(plural)

    def index(body: Any, namespace: str, **_: Any) -> dict[str, Any]:
        return {namespace: _snapshot(body)}

    index.__name__ = index_name
    kopf.index(GROUP, VERSION, plural, id=index_name, registry=registry)(index)

    async def on_event(type: str | None, body: Any, namespace: str, name: str, memo: Any, **kwargs: Any) -> None:
        r = _reconciler(memo)
        r.bind(kwargs)
        meta = body.get("metadata", {})
        deleted = type == "DELETED"
        # Status writes (ours) come back as events too: only a spec, generation or deletion change counts.
        fp = None if deleted else _fingerprint((dict(body.get("spec") or {}), meta.get("generation"), meta.get("deletionTimestamp")))
        if r.changed(kind, namespace, name, fp):
            r.request(namespace, f"{kind}/{name} {type or 'listed'}")

    on_event.__name__ = f"recompile_on_{plural}"
    kopf.on.event(GROUP, VERSION, plural, id=f"recompile_on_{plural}", registry=registry)(on_event)


for _info in KINDS.values():
    _register_kind(_info.plural, _info.kind)


@kopf.on.event("v1", "secrets", id="recompile_on_secrets", registry=registry)
async def _on_secret(type: str | None, body: Any, namespace: str, name: str, memo: Any, **kwargs: Any) -> None:
    r = _reconciler(memo)
    r.bind(kwargs)
    labels = body.get("metadata", {}).get("labels") or {}
    if name == CREDENTIALS_SECRET and labels.get(MANAGED_BY_LABEL) == MANAGED_BY:
        # Ours: restore it if someone edits or deletes it (a no-op compile otherwise).
        if type in ("DELETED", "MODIFIED"):
            r.request(namespace, f"managed Secret {name} {type}")
        return
    if name not in r.referenced_secrets(namespace):
        return
    fp = None if type == "DELETED" else _fingerprint(sorted(_secret_keys(dict(body)).items()))
    if r.changed("Secret", namespace, name, fp):
        r.request(namespace, f"Secret {name} {type or 'listed'}")


@kopf.on.event("v1", "configmaps", id="recompile_on_configmaps", labels={MANAGED_BY_LABEL: MANAGED_BY}, registry=registry)
async def _on_configmap(type: str | None, body: Any, namespace: str, name: str, memo: Any, **kwargs: Any) -> None:
    if name != CONFIGMAP_NAME:
        return
    r = _reconciler(memo)
    r.bind(kwargs)
    annotations = body.get("metadata", {}).get("annotations") or {}
    # At startup this finds namespaces whose resources were all deleted while no
    # operator ran; later, it restores a ConfigMap someone edited or deleted.
    if type == "DELETED" or namespace not in r.applied or annotations.get(HASH_ANNOTATION) != r.applied[namespace]:
        r.request(namespace, f"ConfigMap {name} {type or 'listed'}")


# The sidecar-injection webhook (webhook.py): its admission handlers and server settings.
from . import webhook as _webhook  # noqa: E402  (imports handlers lazily: no cycle at import time)

_webhook.register(registry)


def run_operator(
    options: OperatorOptions,
    *,
    standalone: bool = False,
    peering_name: str = "kubetoll",
    priority: int = 0,
    namespaces: list[str] | None = None,
    liveness_endpoint: str | None = "http://0.0.0.0:8080/healthz",
) -> None:
    """`kubetoll operator`: blocks until SIGTERM/SIGINT."""
    kopf.run(
        registry=registry,
        standalone=standalone,
        peering_name=None if standalone else peering_name,
        priority=priority,
        clusterwide=not namespaces,
        namespaces=namespaces or (),
        liveness_endpoint=liveness_endpoint,
        memo=kopf.Memo(options=options),
    )
