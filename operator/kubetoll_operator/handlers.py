"""The kopf operator: every change in a namespace recompiles that namespace.

kopf indexes keep the four kinds in memory by namespace (and kopf starts the
handlers only after the initial listing filled every index, so the first compile
sees the whole namespace, never half of it). An event on any of them, on a Secret
a backend (or a TokenBudget's `tenant.jwt`) references, on a ConfigMap a
TokenBudget's `tenantTiersFrom` or `tenant.jwt.publicKeysFrom` names, on an
EndpointSlice of a Service a backend's `serviceRef` names (its ready replicas:
endpoint_slices.py), or on the operator's own ConfigMap or Secret asks the
`Reconciler` to recompile that namespace; so does a count of the namespace's
injected pods that passes a power of two (sidecar_count.py, `expectedSidecars`).
The Reconciler runs one worker per namespace: it coalesces bursts of events,
compiles, and writes

* the ConfigMap `kubetoll-router` (key `router.json`, annotation
  `kubetoll.dev/config-hash`), only when its content changes;
* the Secret `kubetoll-credentials` with exactly the referenced keys (and, with
  `redis_auth_dir`, the namespace's own Redis login: redis_auth.py), only when
  they change;
* each resource's status (only when it changes) and a Warning Event per new
  problem;

and deletes both managed objects once the namespace has no resources left. A
failed API call is retried with backoff; the last written config stays in place
meanwhile.

Each compiled config also goes to the Reconciler's spend reporter
(spend_reporter.py), a second task per namespace with budgets that writes what the
sidecars spent back into the statuses.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import hashlib
import json
import logging
import socket
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf

from . import endpoint_slices, metrics, sidecar_count, spend
from .compiler import CompileResult, compile_namespace
from .kube import ApiError, KubeApi
from .resources import API_VERSION, GROUP, KINDS, VERSION
from .spend_reporter import SpendReporter
from .status import desired_status, merge_transition_times, status_differs

log = logging.getLogger("kubetoll.operator")

CONFIGMAP_NAME = "kubetoll-router"
CONFIG_KEY = "router.json"
# The versions of the resources in force, beside the config they compiled into (one
# write, so the two never disagree): an update that does not compile is compiled
# from these instead, across operator restarts (compiler.py, "Last known good").
LAST_GOOD_KEY = "last-good.json"
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
    telemetry: Any = None  # TelemetrySettings for every namespace's sidecars (--otlp-endpoint); None: no traces
    debounce_seconds: float = 0.2  # coalesce a burst of events (kubectl apply -f dir/) into one compile
    max_backoff_seconds: float = 60.0
    webhook: Any = None  # webhook.WebhookOptions: the sidecar-injection webhook (None: off)
    # The spend reporter (only with redis_url).
    spend_interval_seconds: float = 15.0  # how often each namespace's spend is read and its statuses updated
    tenants_over_budget: int = 10  # TokenBudget status lists at most this many tenants over a tier limit
    refusal_window_seconds: float = spend.REFUSAL_WINDOW  # a meter refused on this recently counts as refusing
    redis_timeout_seconds: float = 2.0  # bound on each step of a reading (totals, an alert mark, the ledger)
    cache_ledger_records_per_tick: int = 200_000  # ledger entries read per namespace and tick for cache counters
    redis_username_file: str | None = None
    redis_password_file: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    # The budget store's credentials (redis_auth.py): the directory of the mounted Secret, whether it holds
    # one ACL user per namespace, and how often it is checked for a rotation (then every namespace recompiles).
    redis_auth_dir: str | None = None
    redis_auth_per_namespace: bool = False
    redis_auth_poll_seconds: float = 10.0
    # The operator's own metrics (metrics.py) on http://metrics_addr:metrics_port/metrics; None: not served.
    metrics_addr: str = "0.0.0.0"
    metrics_port: int | None = None


def _index_name(plural: str) -> str:
    return f"kubetoll_{plural}"


def _snapshot(body: Any) -> dict[str, Any]:
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            k: copy.deepcopy(meta.get(k)) for k in ("name", "namespace", "uid", "generation") if meta.get(k) is not None
        },
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()


def _encode_last_good(in_force: dict[tuple[str, str], dict[str, Any]]) -> str:
    items = [in_force[key] for key in sorted(in_force)]
    return json.dumps(items, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _last_good(configmap: dict[str, Any] | None) -> dict[tuple[str, str], dict[str, Any]]:
    """The versions in force when the ConfigMap was written; {} when absent or unreadable."""
    text = ((configmap or {}).get("data") or {}).get(LAST_GOOD_KEY)
    if not text:
        return {}
    try:
        items = json.loads(text)
    except ValueError:
        log.warning("ConfigMap key %s is not JSON; no last good versions are kept", LAST_GOOD_KEY)
        return {}
    out = {}
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("metadata"), dict):
            out[(str(item.get("kind")), str(item["metadata"].get("name")))] = item
    return out


def _jwt_ref(obj: dict[str, Any], field: str) -> dict[str, Any]:
    """A TokenBudget's `spec.tenant.jwt.<field>` reference as written ({} when absent or not an object)."""
    node: Any = obj.get("spec")
    for part in ("tenant", "jwt", field):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


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
    reported: dict[str, set[tuple[str, str, str, str, str]]] = field(
        default_factory=dict
    )  # ns → problems already posted as Events, as (kind, name, reason, field, message)
    last_compile: str | None = None
    compiles: int = 0
    # Statuses, written by the compile and by the spend reporter alike.
    written: dict[tuple[str, str, str], tuple[str | None, dict[str, Any]]] = field(
        default_factory=dict
    )  # (kind, ns, name) → (uid, status we wrote)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)  # ns → held while a status is read, merged and written
    reporter: SpendReporter = field(init=False)
    auth_watch: asyncio.Task[None] | None = None  # notices a rotated budget-store Secret (redis_auth.py)
    auth_missing: set[str] = field(default_factory=set)  # namespaces warned about having no Redis credential
    sidecars: sidecar_count.SidecarCounts = field(default_factory=sidecar_count.SidecarCounts)  # expectedSidecars

    def __post_init__(self) -> None:
        self.reporter = SpendReporter(
            self.options,
            resources=self.resources,
            lock=self._lock,
            current_status=self._current_status,
            write_status=self._write_status,
            create_event=self._create_event,
            redis_auth=self._redis_auth,
        )

    # ----------------------------------------------------------------- triggers

    def bind(self, kwargs: dict[str, Any]) -> None:
        for info in KINDS.values():
            name = _index_name(info.plural)
            if name in kwargs:
                self.indices[info.kind] = kwargs[name]
        self.sidecars.bind(kwargs)

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
                    metrics.record_reconcile("compile" if self.resources(namespace) else "cleanup", "failed")
                    log.error(
                        "namespace %s: recompile failed, retrying in %.0fs (the last written config stays): %s",
                        namespace,
                        backoff,
                        exc,
                    )
                    self.pending.add(namespace)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.options.max_backoff_seconds)
        finally:
            self.tasks.pop(namespace, None)

    async def close(self) -> None:
        # The reporter's tasks stop with ours, in one go; its close then finds them done and shuts its Redis client.
        tasks = [*self.tasks.values(), *self.reporter.tasks.values(), *([self.auth_watch] if self.auth_watch else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.reporter.close()
        if self.api is not None:
            await self.api.close()

    # ----------------------------------------------------------------- reconcile

    def resources(self, namespace: str) -> list[dict[str, Any]]:
        out = []
        for index in self.indices.values():
            if namespace in index:
                out += list(index[namespace])
        return out

    def referenced_config_maps(self, namespace: str) -> set[str]:
        """ConfigMaps a TokenBudget of the namespace reads: its tenant → tier map (`tenantTiersFrom`), public keys."""
        names = set()
        for obj in self.resources(namespace):
            if obj.get("kind") == "TokenBudget":
                ref = (obj.get("spec") or {}).get("tenantTiersFrom") or {}
                if isinstance(ref, dict) and isinstance(ref.get("configMapName"), str):
                    names.add(ref["configMapName"])
                keys = _jwt_ref(obj, "publicKeysFrom")  # the public keys of signed identity (spec.tenant.jwt)
                if isinstance(keys.get("configMapName"), str):
                    names.add(keys["configMapName"])
        return names

    def referenced_services(self, namespace: str) -> set[str]:
        """Services a ModelBackend of the namespace calls (`serviceRef`): their EndpointSlices give its replicas."""
        names = set()
        for obj in self.resources(namespace):
            if obj.get("kind") == "ModelBackend":
                ref = (obj.get("spec") or {}).get("serviceRef") or {}
                if isinstance(ref, dict) and isinstance(ref.get("name"), str):
                    names.add(ref["name"])
        return names

    async def _endpoint_slices(self, api: KubeApi, namespace: str) -> list[dict[str, Any]]:
        """The EndpointSlices of the Services ModelBackends reference, one list call per Service."""
        out: list[dict[str, Any]] = []
        for service in sorted(self.referenced_services(namespace)):
            selector = urllib.parse.quote(f"{endpoint_slices.SERVICE_NAME_LABEL}={service}", safe="")
            path = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
            listed = await api.get(f"{path}?labelSelector={selector}")
            for item in (listed or {}).get("items") or ():
                # The list's items carry no apiVersion and kind; the compiler takes whole objects.
                obj = {**item, "apiVersion": endpoint_slices.API_VERSION, "kind": endpoint_slices.KIND}
                if endpoint_slices.service_of(obj) == service:  # the selector, checked: never another Service's pods
                    out.append(obj)
        return out

    def referenced_secrets(self, namespace: str) -> set[str]:
        names = set()
        for obj in self.resources(namespace):
            if obj.get("kind") == "ModelBackend":
                ref = ((obj.get("spec") or {}).get("credentials") or {}).get("secretRef") or {}
                if isinstance(ref.get("name"), str):
                    names.add(ref["name"])
            elif obj.get("kind") == "TokenBudget":  # the HS256 key of signed identity (spec.tenant.jwt)
                ref = _jwt_ref(obj, "hs256SecretRef")
                if isinstance(ref.get("name"), str):
                    names.add(ref["name"])
        return names

    async def reconcile(self, namespace: str) -> None:
        assert self.api is not None, "not logged in yet"
        api = self.api
        started = time.perf_counter()
        resources = self.resources(namespace)
        cm_path = f"/api/v1/namespaces/{namespace}/configmaps/{CONFIGMAP_NAME}"
        secret_path = f"/api/v1/namespaces/{namespace}/secrets/{CREDENTIALS_SECRET}"
        if not resources:
            removed = []
            for what, path in (("configmap", cm_path), ("secret", secret_path)):
                current = await api.get(path)
                if (
                    current is not None
                    and (current.get("metadata", {}).get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY
                ):
                    await api.delete(path)
                    removed.append(what)
            self.applied.pop(namespace, None)
            self.reported.pop(namespace, None)
            self.reporter.forget(namespace)
            self.sidecars.forget(namespace)
            metrics.forget_namespace(namespace)
            metrics.record_reconcile("cleanup", "ok", time.perf_counter() - started)
            if removed:
                log.info("namespace %s: no kubetoll resources left; removed %s", namespace, " and ".join(removed))
            return

        sources: dict[str, dict[str, str]] = {}
        for name in sorted(self.referenced_secrets(namespace)):
            secret = await api.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
            if secret is not None:
                sources[name] = _secret_keys(secret)
        config_maps: dict[str, dict[str, str]] = {}
        for name in sorted(self.referenced_config_maps(namespace)):
            if name == CONFIGMAP_NAME:
                continue  # ours holds the config, never a tier list: reading it would feed the compile its own output
            cm = await api.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")
            if cm is not None:
                config_maps[name] = {k: v for k, v in (cm.get("data") or {}).items() if isinstance(v, str)}
        slices = await self._endpoint_slices(api, namespace)
        store = None
        store_secret: dict[str, str] = {}  # this namespace's own Redis login, for kubetoll-credentials
        if self.options.redis_url:
            store, store_secret = self._store_access(namespace)
            store = store.model_copy(update={"expected_sidecars": self.sidecars.for_compile(namespace)})
        # Read once: its last good versions feed the compile, and the apply compares against it.
        current_cm = await api.get(cm_path)
        last_good = _last_good(current_cm)
        compile_started = time.perf_counter()
        result = compile_namespace(
            namespace,
            resources,
            secrets=sources,
            config_maps=config_maps,
            endpoint_slices=slices,
            budget_store=store,
            telemetry=self.options.telemetry,
            cluster_domain=self.options.cluster_domain,
            last_good=last_good,
        )
        compile_ms = (time.perf_counter() - compile_started) * 1000
        self.compiles += 1
        self.last_compile = datetime.datetime.now(datetime.UTC).isoformat()

        changed: list[str] = []
        if result.config is None:
            log.error(
                "namespace %s: compile failed (%s); keeping config %s",
                namespace,
                "; ".join(map(str, result.problems)),
                self.applied.get(namespace, "none")[:12],
            )
        else:
            # Backend keys are "<secret>_<key>", the store's have no "_" (redis_auth.py): they never collide.
            data = {key: sources[secret][k] for key, (secret, k) in result.credentials.items()} | store_secret
            if await self._apply_secret(namespace, secret_path, data):
                changed.append("credentials")
            if await self._apply_configmap(namespace, cm_path, result, current_cm):
                changed.append("config")
            self.applied[namespace] = result.content_hash
            self.reporter.compiled(namespace, result.config)
        statuses = await self._apply_statuses(namespace, result)
        events = await self._post_events(namespace, result)
        errors = sum(1 for p in result.problems if p.severity == "error")
        metrics.record_compile(
            namespace, [(p.kind, p.reason) for p in result.problems if p.severity == "error"], result.config is not None
        )
        metrics.record_reconcile(
            "compile",
            "no_config" if result.config is None else "problems" if errors else "ok",
            time.perf_counter() - started,
        )
        log.info(
            "namespace %s: compiled %d resources in %.0f ms (%.0f ms with the API calls): config %s, %s; "
            "%d errors, %d warnings; %d statuses and %d events written",
            namespace,
            len(resources),
            compile_ms,
            (time.perf_counter() - started) * 1000,
            result.content_hash[:12] or "none",
            ("updated " + " and ".join(changed)) if changed else "unchanged",
            errors,
            len(result.problems) - errors,
            statuses,
            events,
        )

    async def _apply_configmap(
        self, namespace: str, path: str, result: CompileResult, current: dict[str, Any] | None
    ) -> bool:
        assert self.api is not None
        meta = {
            "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": {HASH_ANNOTATION: result.content_hash},
        }
        data = {CONFIG_KEY: result.config_json, LAST_GOOD_KEY: _encode_last_good(result.in_force)}
        if current is None:
            await self.api.create(
                f"/api/v1/namespaces/{namespace}/configmaps",
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": CONFIGMAP_NAME, "namespace": namespace, **meta},
                    "data": data,
                },
            )
            return True
        labels = current.get("metadata", {}).get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
            raise RuntimeError(
                f"ConfigMap {namespace}/{CONFIGMAP_NAME} exists and is not managed by {MANAGED_BY}; not overwriting it"
            )
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
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "Opaque",
                    "metadata": {"name": CREDENTIALS_SECRET, "namespace": namespace, **meta},
                    "data": data,
                },
            )
            return True
        labels = current.get("metadata", {}).get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
            raise RuntimeError(
                f"Secret {namespace}/{CREDENTIALS_SECRET} exists and is not managed by {MANAGED_BY}; not overwriting it"
            )
        have = _secret_keys(current)
        if have == data:
            return False
        patch: dict[str, Any] = {"metadata": meta, "data": {**{k: None for k in have if k not in data}, **data}}
        if current.get("stringData"):
            patch["stringData"] = None
        await self.api.merge_patch(path, patch)
        return True

    # ----------------------------------------------------------------- the budget store's credentials

    def _redis_auth(self) -> Any:
        from .redis_auth import RedisAuth

        o = self.options
        return RedisAuth(Path(o.redis_auth_dir), o.redis_auth_per_namespace) if o.redis_auth_dir else None

    def _store_access(self, namespace: str) -> tuple[Any, dict[str, str]]:
        """`budgetStore` for the namespace's config and the keys its credentials Secret gets.

        Only the namespace's own login, never the operator's nor another namespace's: without
        an entry for it in a per-namespace Secret its sidecars connect without one (and Redis
        refuses them, so their budgets fail as with Redis away) and the operator says so once.
        """
        from kubetoll_core.router_config import BudgetStoreSettings

        url = self.options.redis_url
        auth = self._redis_auth()
        if auth is None:
            return BudgetStoreSettings(url=url), {}
        if self.auth_watch is None:  # fingerprinted before the first read, so no rotation slips in between
            self.auth_watch = asyncio.create_task(
                self._watch_auth(auth, auth.fingerprint()), name="kubetoll-redis-auth-watch"
            )
        credential = auth.for_namespace(namespace)
        if credential is None:
            if namespace not in self.auth_missing:
                self.auth_missing.add(namespace)
                log.warning(
                    "namespace %s: the Redis credentials Secret has no %s; its sidecars connect without a login",
                    namespace,
                    auth.missing_keys(namespace),
                )
            return BudgetStoreSettings(url=url), {}
        self.auth_missing.discard(namespace)
        return credential.store_settings(url), credential.secret_data()

    async def _watch_auth(self, auth: Any, seen: str) -> None:
        """Recompile every namespace when the kubelet updates the mounted Secret (a rotated password)."""
        while True:
            await asyncio.sleep(self.options.redis_auth_poll_seconds)
            try:
                now = auth.fingerprint()
            except ValueError as exc:
                log.warning("the Redis credentials dir cannot be read: %s", exc)
                continue
            if now != seen:
                log.info("the Redis credentials changed; recompiling %d namespaces", len(self.applied))
                for namespace in sorted(self.applied):
                    self.request(namespace, "Redis credentials changed")
                seen = now

    def _lock(self, namespace: str) -> asyncio.Lock:
        lock = self.locks.get(namespace)
        if lock is None:
            lock = self.locks[namespace] = asyncio.Lock()
        return lock

    def _current_status(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The freshest status we know: the one we last wrote, else what the index holds.

        Two writers (the compile and the spend reporter) share `status.conditions`, a list a
        merge patch replaces whole, so each keeps the other's conditions; the index can lag
        behind our own last write by a watch event.
        """
        meta = obj.get("metadata", {})
        key = (obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))
        cached = self.written.get(key)
        if cached is not None and cached[0] == meta.get("uid"):
            return cached[1]
        return dict(obj.get("status") or {})

    async def _write_status(self, obj: dict[str, Any], patch: dict[str, Any], current: dict[str, Any]) -> bool:
        """Merge-patch `status` (with lastTransitionTime kept where a condition did not change).

        False: the object is gone.
        """
        assert self.api is not None
        meta = obj["metadata"]
        kind, namespace, name = obj["kind"], meta.get("namespace", ""), meta["name"]
        if "conditions" in patch:
            patch = merge_transition_times(patch, current)
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{KINDS[kind].plural}/{name}/status"
        try:
            answer = await self.api.merge_patch(path, {"status": patch})
        except ApiError as exc:
            if exc.status == 404:  # deleted meanwhile; its DELETED event recompiles
                self.written.pop((kind, namespace, name), None)
                return False
            raise
        status = (answer or {}).get("status")
        if not isinstance(status, dict):
            status = {k: v for k, v in {**current, **patch}.items() if v is not None}
        self.written[(kind, namespace, name)] = (meta.get("uid"), status)
        return True

    async def _apply_statuses(self, namespace: str, result: CompileResult) -> int:
        assert self.api is not None
        objects = self.resources(namespace)
        current_by_key = {(o.get("kind"), o["metadata"]["name"]): o for o in objects}
        live = {(o.get("kind"), namespace, o["metadata"]["name"]) for o in objects}
        for stale in [k for k in self.written if k[1] == namespace and k not in live]:
            del self.written[stale]
        written = 0
        async with self._lock(namespace):
            for key, outcome in sorted(result.outcomes.items()):
                obj = current_by_key.get(key)
                if obj is None:
                    continue
                obj = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}
                current = self._current_status(obj)
                desired = desired_status(result, outcome)
                # The spend reporter's conditions stay as it wrote them.
                desired["conditions"] += [
                    c for c in current.get("conditions") or [] if c.get("type") in spend.SPEND_CONDITIONS
                ]
                if not status_differs(desired, current):
                    continue
                status = dict(desired)
                for k in current:
                    if k not in status and k in ("endpoint", "prices", "modelName", "firstBackend"):
                        status[k] = None
                if await self._write_status(obj, status, current):
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
            await self._create_event(
                namespace,
                p.kind,
                p.name,
                uids[(p.kind, p.name)],
                "Warning",
                p.reason,
                (f"{p.field}: " if p.field else "") + p.message,
            )
            posted += 1
        self.reported[namespace] = current
        return posted

    async def _create_event(
        self, namespace: str, kind: str, name: str, uid: str | None, type_: str, reason: str, message: str
    ) -> None:
        assert self.api is not None
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": kind,
                "name": name,
                "namespace": namespace,
                "uid": uid,
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.api.create(f"/api/v1/namespaces/{namespace}/events", event)


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
    if not settings.peering.clusterwide:  # kopf.run sets it from clusterwide=, before start-up handlers run
        # Listed namespaces only (--namespace): kopf watches exactly those and neither
        # lists namespaces nor watches CRDs cluster-wide, which the chart's namespaced
        # RBAC does not grant; a CRD installed later is seen at the next restart.
        settings.scanning.disabled = True
    # The replicas share the chart's one ClusterKopfPeering in both modes: namespaced,
    # kopf would otherwise look for a KopfPeering object in each namespace.
    settings.peering.clusterwide = True
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

    def index(*, body: Any, namespace: str | None, **_: Any) -> dict[str | None, Any]:
        return {namespace: _snapshot(body)}

    index.__name__ = index_name
    kopf.index(GROUP, VERSION, plural, id=index_name, registry=registry)(index)

    async def on_event(
        *, type: str | None, body: Any, namespace: str | None, name: str, memo: Any, **kwargs: Any
    ) -> None:
        r = _reconciler(memo)
        r.bind(kwargs)
        assert namespace is not None, "the four kinds are namespaced"
        meta = body.get("metadata", {})
        deleted = type == "DELETED"
        # Status writes (ours) come back as events too: only a spec, generation or deletion change counts.
        fp = (
            None
            if deleted
            else _fingerprint((dict(body.get("spec") or {}), meta.get("generation"), meta.get("deletionTimestamp")))
        )
        if r.changed(kind, namespace, name, fp):
            r.request(namespace, f"{kind}/{name} {type or 'listed'}")

    on_event.__name__ = f"recompile_on_{plural}"
    kopf.on.event(GROUP, VERSION, plural, id=f"recompile_on_{plural}", registry=registry)(on_event)


for _info in KINDS.values():
    _register_kind(_info.plural, _info.kind)


@kopf.on.event("v1", "secrets", id="recompile_on_secrets", registry=registry)
async def _on_secret(
    *, type: str | None, body: Any, namespace: str | None, name: str, memo: Any, **kwargs: Any
) -> None:
    r = _reconciler(memo)
    r.bind(kwargs)
    assert namespace is not None, "Secrets are namespaced"
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


@kopf.on.event(
    "v1", "configmaps", id="recompile_on_configmaps", labels={MANAGED_BY_LABEL: MANAGED_BY}, registry=registry
)
async def _on_configmap(
    *, type: str | None, body: Any, namespace: str | None, name: str, memo: Any, **kwargs: Any
) -> None:
    if name != CONFIGMAP_NAME:
        return
    r = _reconciler(memo)
    r.bind(kwargs)
    assert namespace is not None, "ConfigMaps are namespaced"
    annotations = body.get("metadata", {}).get("annotations") or {}
    # At startup this finds namespaces whose resources were all deleted while no
    # operator ran; later, it restores a ConfigMap someone edited or deleted.
    if type == "DELETED" or namespace not in r.applied or annotations.get(HASH_ANNOTATION) != r.applied[namespace]:
        r.request(namespace, f"ConfigMap {name} {type or 'listed'}")


@kopf.on.event("v1", "configmaps", id="recompile_on_tier_configmaps", registry=registry)
async def _on_tier_configmap(
    *, type: str | None, body: Any, namespace: str | None, name: str, memo: Any, **kwargs: Any
) -> None:
    """A ConfigMap a TokenBudget reads (`tenantTiersFrom`, `tenant.jwt.publicKeysFrom`): a change recompiles."""
    r = _reconciler(memo)
    r.bind(kwargs)
    assert namespace is not None, "ConfigMaps are namespaced"
    if name == CONFIGMAP_NAME or name not in r.referenced_config_maps(namespace):
        return
    fp = None if type == "DELETED" else _fingerprint(sorted((body.get("data") or {}).items()))
    if r.changed("ConfigMap", namespace, name, fp):
        r.request(namespace, f"ConfigMap {name} {type or 'listed'}")


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices", id="recompile_on_endpointslices", registry=registry)
async def _on_endpoint_slice(
    *, type: str | None, body: Any, namespace: str | None, name: str, memo: Any, **kwargs: Any
) -> None:
    """An EndpointSlice of a Service a ModelBackend calls: its ready replicas changed (a scale, a rollout)."""
    r = _reconciler(memo)
    r.bind(kwargs)
    assert namespace is not None, "EndpointSlices are namespaced"
    service = endpoint_slices.service_of(dict(body))
    if service is None or service not in r.referenced_services(namespace):
        return
    fp = None if type == "DELETED" else _fingerprint(endpoint_slices.fingerprint_fields(dict(body)))
    if r.changed("EndpointSlice", namespace, name, fp):
        r.request(namespace, f"EndpointSlice {name} of Service {service} {type or 'listed'}")


# The sidecar-injection webhook (webhook.py): its admission handlers and server settings.
from . import webhook as _webhook  # noqa: E402  (imports handlers lazily: no cycle at import time)

_webhook.register(registry)
# Counting each namespace's injected pods, for budgetStore.expectedSidecars (sidecar_count.py).
sidecar_count.register(registry, _reconciler)
# The operator's /metrics endpoint (metrics.py), started with the operator.
metrics.register(registry)


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
