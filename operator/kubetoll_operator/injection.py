"""Sidecar injection: which pods get the sidecar, and the JSONPatch that adds it.

Pure functions over plain dicts (no kopf, no API calls), so every decision can be
tested with real AdmissionReview JSON and the resulting pod validated against the
Kubernetes schema. `webhook.py` serves them from the kopf operator.

Who is injected (Istio's rules, with our names):

* a pod labelled `kubetoll.dev/inject: "true"`, or
* any pod in a namespace labelled `kubetoll.dev/injection: enabled`, unless the
  pod says `kubetoll.dev/inject: "false"`;
* never: pods in a namespace labelled `kubetoll.dev/injection: disabled`, in an
  excluded namespace (kube-system, the operator's own...), on the host network
  (every pod on the node would fight over 127.0.0.1:7400), or already injected.

`kubetoll.dev/inject` is read from the labels first and from the annotations only
when no such label exists (labels win, as in Istio). Only a label reaches the API
server's objectSelector, so an annotation can opt a pod *out* of a namespace that
is enabled, but cannot opt one in.

What is injected:

* the container `kubetoll-sidecar` running `kubetoll-sidecar --config
  /etc/kubetoll/router/router.json`, as a native sidecar (an init container with
  `restartPolicy: Always`, first among the init containers, so it starts before
  the app and stops after it) when the cluster has them, else as the last plain
  container;
* volumes, mounted into the sidecar only: the namespace's `kubetoll-router`
  ConfigMap and `kubetoll-credentials` Secret (both `optional`, so a pod starts
  before the operator's first compile: the sidecar runs with `--wait-for-config`
  and answers 503 until the file appears), the pod's labels through the downward API,
  a small `/tmp`, and an emptyDir at `server.stateDir` where the sidecar keeps, across
  its own restarts, the spend Redis has not confirmed and the failOpen allowance it
  used (an emptyDir lives as long as the pod, so a crash-looping sidecar finds it);
* in each app container, `OPENAI_BASE_URL` and `OPENAI_API_BASE` (both or neither:
  a container whose `env` names either one itself keeps its own endpoint and gets
  neither, with an admission warning, unless what it set is the sidecar's URL), and
  a placeholder `OPENAI_API_KEY` when its `env` names none (`app_env`);
* `terminationGracePeriodSeconds` raised to cover the sidecar's drain when the pod
  asks for less (`grace_period_seconds`); never lowered;
* the annotation and label `kubetoll.dev/injected: "true"` (the label is what
  the chart's PodMonitor selects);
* the pod's identity for the sidecar (`identity_env`): its namespace, name and
  ServiceAccount through the downward API, and its workload (`pod_workload`:
  `Deployment/search-api`, `CronJob/nightly`, ...) as `KUBETOLL_WORKLOAD` and the
  annotation `kubetoll.dev/workload`, replacing any value the pod set itself.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from kubetoll_core.names import API_KEY_PLACEHOLDER, MAX_WORKLOAD_CHARS, WORKLOAD_PATTERN
from kubetoll_core.router_config import ServerSettings

INJECT_KEY = "kubetoll.dev/inject"  # pod label (or annotation): "true" / "false"
NAMESPACE_LABEL = "kubetoll.dev/injection"  # namespace label: "enabled" / "disabled"
INJECTED_KEY = "kubetoll.dev/injected"  # annotation and label we set: "true"
WORKLOAD_KEY = "kubetoll.dev/workload"  # annotation we set: the pod's workload, e.g. "Deployment/search-api"
WORKLOAD_ENV = "KUBETOLL_WORKLOAD"  # the same, for the sidecar (kubetoll_sidecar.workload reads it)
APP_NAME_LABEL = "app.kubernetes.io/name"
POD_TEMPLATE_HASH_LABEL = "pod-template-hash"  # the Deployment controller's suffix of its ReplicaSets' names

SIDECAR_NAME = "kubetoll-sidecar"
METRICS_PORT_NAME = "kt-metrics"  # a port name is at most 15 characters

ANNOTATION_IMAGE = "kubetoll.dev/sidecar-image"
ANNOTATION_PORT = "kubetoll.dev/sidecar-port"
ANNOTATION_METRICS_PORT = "kubetoll.dev/sidecar-metrics-port"
ANNOTATION_CPU = "kubetoll.dev/sidecar-cpu"  # request
ANNOTATION_MEMORY = "kubetoll.dev/sidecar-memory"  # request
ANNOTATION_CPU_LIMIT = "kubetoll.dev/sidecar-cpu-limit"
ANNOTATION_MEMORY_LIMIT = "kubetoll.dev/sidecar-memory-limit"
ANNOTATION_LOG_LEVEL = "kubetoll.dev/log-level"
ANNOTATION_NATIVE = "kubetoll.dev/native-sidecar"  # "true" / "false": this pod only

CONFIG_DIR = "/etc/kubetoll/router"
CONFIG_PATH = f"{CONFIG_DIR}/router.json"
CREDENTIALS_DIR = "/var/run/kubetoll/credentials"  # ServerSettings.credentialsDir
PODINFO_DIR = "/etc/kubetoll/podinfo"  # ServerSettings.podLabelsFile is <dir>/labels
STATE_DIR = ServerSettings().state_dir  # where the compiled config tells the sidecar to keep its state
STATE_SIZE_LIMIT = "64Mi"
ROUTER_CONFIGMAP = "kubetoll-router"  # written by the operator (handlers.CONFIGMAP_NAME)
CREDENTIALS_SECRET = "kubetoll-credentials"  # written by the operator (handlers.CREDENTIALS_SECRET)

BASE_URL_VARS = ("OPENAI_BASE_URL", "OPENAI_API_BASE")  # the v1 SDKs read the first, older ones the second
API_KEY_VAR = "OPENAI_API_KEY"
# The official SDKs refuse to start without an API key, but the app never needs the real one:
# the sidecar holds the provider credentials (mounted into it alone) and ignores the key the
# app sends. So an app container without a key of its own gets API_KEY_PLACEHOLDER, which is
# plainly not one (in kubetoll_core.names: with tenancy.jwt the sidecar reads it as "no token").

# What the sidecar needs after SIGTERM: `server.drainSeconds`, which already holds the last
# min(2 s, drainSeconds/4) for returning its leases and writing buffered spend (the sidecar's
# drain.py), plus the margin: the process exit, the kubelet's signal delivery, and the 0.3 s the
# sidecar still takes with a drainSeconds of 0. Kubernetes' default grace period is 30 s.
DEFAULT_DRAIN_SECONDS = ServerSettings().drain_seconds
SHUTDOWN_MARGIN_SECONDS = 5
DEFAULT_GRACE_PERIOD_SECONDS = 30  # what the API server fills in when the pod sets none
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ALWAYS_EXCLUDED = frozenset({"kube-system", "kube-public", "kube-node-lease"})
NATIVE_SIDECARS_SINCE = (1, 29)  # SidecarContainers is on by default from Kubernetes 1.29


class InjectionError(ValueError):
    """The pod asks for something the injector cannot do; the webhook denies it with this message."""


@dataclass(frozen=True)
class Resources:
    cpu_request: str | None = "100m"
    memory_request: str | None = "192Mi"  # both tiktoken encodings loaded: ~165 MiB resident
    cpu_limit: str | None = None  # a CPU limit throttles, which shows up as added latency
    memory_limit: str | None = "512Mi"


@dataclass(frozen=True)
class InjectionOptions:
    image: str = "ghcr.io/kubetoll/kubetoll-sidecar:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    port: int = 7400
    metrics_port: int = 7401
    resources: Resources = field(default_factory=Resources)
    log_level: str = "INFO"
    native_sidecars: bool = False  # resolved by the webhook from nativeSidecars=auto|true|false
    run_as_user: int = 10001  # the images' numeric user
    excluded_namespaces: frozenset[str] = ALWAYS_EXCLUDED
    drain_seconds: float = DEFAULT_DRAIN_SECONDS  # the compiled config's server.drainSeconds


@dataclass
class Plan:
    inject: bool
    reason: str
    ops: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    native: bool | None = None


# --------------------------------------------------------------------------- who


def injection_requested(
    pod: Mapping[str, Any], namespace_labels: Mapping[str, str], options: InjectionOptions
) -> tuple[bool, str]:
    """(inject?, why). Says nothing about whether the pod is already injected."""
    meta = pod.get("metadata") or {}
    namespace = meta.get("namespace") or ""
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if namespace in options.excluded_namespaces or namespace in ALWAYS_EXCLUDED:
        return False, f"namespace {namespace} is excluded from injection"
    ns_setting = namespace_labels.get(NAMESPACE_LABEL)
    if ns_setting == "disabled":
        return False, f"namespace {namespace} is labelled {NAMESPACE_LABEL}=disabled"
    if INJECT_KEY in labels:
        pod_setting, source = labels[INJECT_KEY], "label"
    else:
        pod_setting, source = annotations.get(INJECT_KEY), "annotation"
    if pod_setting == "false":
        return False, f"the pod opts out ({source} {INJECT_KEY}=false)"
    if pod_setting == "true":
        return True, f"the pod opts in ({source} {INJECT_KEY}=true)"
    if ns_setting == "enabled":
        return True, f"namespace {namespace} is labelled {NAMESPACE_LABEL}=enabled"
    return False, "neither the pod nor its namespace asks for injection"


def already_injected(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    if (meta.get("annotations") or {}).get(INJECTED_KEY) == "true":
        return True
    spec = pod.get("spec") or {}
    return any(
        c.get("name") == SIDECAR_NAME for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])
    )


# --------------------------------------------------------------------------- whose pod

_WORKLOAD = re.compile(WORKLOAD_PATTERN)
# The CronJob controller names each Job `<cronjob>-<scheduled time in minutes since the epoch>`
# (8 digits from 1989 until the year 2160).
_CRONJOB_JOB = re.compile(r"(?P<cronjob>.+)-[0-9]{8,}")


def pod_workload(pod: Mapping[str, Any]) -> str:
    """The pod's workload as admission sees it ("Deployment/search-api"), or "" when nothing names one.

    From the pod's controlling owner (the ownerReference with `controller: true`, else the
    first one):

    * a ReplicaSet named `<deployment>-<the pod's pod-template-hash label>` is
      `Deployment/<deployment>` (the Deployment controller's naming); another ReplicaSet
      stays `ReplicaSet/<name>`;
    * a Job named `<cronjob>-<8 or more digits>` is `CronJob/<cronjob>` (the CronJob
      controller's naming; a Job named like that by hand is taken for a CronJob's too);
      another Job is `Job/<name>`;
    * any other owner is `<Kind>/<name>` as it stands (StatefulSet, DaemonSet, ...).

    Without an owner: the `app.kubernetes.io/name` label as `App/<name>`, else
    `Pod/<generateName without its trailing dash>`, else `Pod/<name>`. A candidate that is
    not `Kind/name` (WORKLOAD_PATTERN) within MAX_WORKLOAD_CHARS gives way to the next: the
    value goes into ledger records and a metric label. Read from the pod, with no API call:
    the owner is what the pod's creator wrote (a controller, for controllers' pods).
    """
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    owners = [o for o in meta.get("ownerReferences") or [] if isinstance(o, Mapping)]
    owner = next((o for o in owners if o.get("controller") is True), owners[0] if owners else None)
    candidates: list[str] = []
    if owner is not None:
        candidates.append(_owner_workload(str(owner.get("kind") or ""), str(owner.get("name") or ""), labels))
    if isinstance(labels.get(APP_NAME_LABEL), str):
        candidates.append(f"App/{labels[APP_NAME_LABEL]}")
    if isinstance(meta.get("generateName"), str):
        candidates.append(f"Pod/{meta['generateName'].rstrip('-')}")
    if isinstance(meta.get("name"), str):
        candidates.append(f"Pod/{meta['name']}")
    return next((c for c in candidates if len(c) <= MAX_WORKLOAD_CHARS and _WORKLOAD.fullmatch(c)), "")


def _owner_workload(kind: str, name: str, labels: Mapping[str, Any]) -> str:
    if kind == "ReplicaSet":
        template_hash = labels.get(POD_TEMPLATE_HASH_LABEL)
        if isinstance(template_hash, str) and template_hash and name.endswith(f"-{template_hash}"):
            deployment = name[: -len(template_hash) - 1]
            if deployment:
                return f"Deployment/{deployment}"
    if kind == "Job" and (m := _CRONJOB_JOB.fullmatch(name)):
        return f"CronJob/{m['cronjob']}"
    return f"{kind}/{name}"


def identity_env(workload: str) -> list[dict[str, Any]]:
    """The sidecar's identity variables: the pod's namespace, name and ServiceAccount, and its workload.

    The first three come from the downward API, filled in by the kubelet from the pod as
    admitted, so the app cannot choose them; the workload is the literal `pod_workload`
    computed (none when it found nothing).
    """
    env: list[dict[str, Any]] = [
        {"name": "KUBETOLL_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KUBETOLL_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KUBETOLL_POD_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
    ]
    if workload:
        env.append({"name": WORKLOAD_ENV, "value": workload})
    return env


# --------------------------------------------------------------------------- quantities

_QUANTITY = re.compile(
    r"^(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "m": Decimal("0.001"),
    "": Decimal(1),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
}


def parse_quantity(text: str) -> Decimal:
    """A non-negative Kubernetes resource quantity ("100m", "1.5", "256Mi", "1e3") as a number."""
    m = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 100m, 0.5, 256Mi, 1Gi)")
    try:
        number = Decimal(m["num"])
    except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from None
    suffix = m["suffix"] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix[:1] in ("e", "E"):
        return number * (Decimal(10) ** int(suffix[1:]))
    return number * _DECIMAL[suffix]


# --------------------------------------------------------------------------- pod overrides


def _port(annotations: Mapping[str, str], key: str, default: int) -> int:
    if key not in annotations:
        return default
    text = annotations[key]
    if not re.fullmatch(r"[0-9]{1,5}", text or "") or not 1 <= int(text) <= 65535:
        raise InjectionError(f"annotation {key}: {text!r} is not a port number (1-65535)")
    return int(text)


def effective_options(pod: Mapping[str, Any], options: InjectionOptions) -> InjectionOptions:
    """The injector's options with the pod's `kubetoll.dev/...` annotations applied and checked."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    image = annotations.get(ANNOTATION_IMAGE, options.image)
    if not image or re.search(r"\s", image):
        raise InjectionError(f"annotation {ANNOTATION_IMAGE}: {image!r} is not an image reference")
    log_level = annotations.get(ANNOTATION_LOG_LEVEL, options.log_level).upper()
    if log_level not in LOG_LEVELS:
        raise InjectionError(
            f"annotation {ANNOTATION_LOG_LEVEL}: {annotations.get(ANNOTATION_LOG_LEVEL)!r} "
            f"is not one of {', '.join(LOG_LEVELS)}"
        )
    port = _port(annotations, ANNOTATION_PORT, options.port)
    metrics_port = _port(annotations, ANNOTATION_METRICS_PORT, options.metrics_port)
    if port == metrics_port:
        raise InjectionError(
            f"the sidecar's API port and metrics port are both {port}: "
            f"set {ANNOTATION_PORT} or {ANNOTATION_METRICS_PORT}"
        )
    native = options.native_sidecars
    if ANNOTATION_NATIVE in annotations:
        value = annotations[ANNOTATION_NATIVE]
        if value not in ("true", "false"):
            raise InjectionError(f'annotation {ANNOTATION_NATIVE}: {value!r} is not "true" or "false"')
        native = value == "true"
    return replace(
        options,
        image=image,
        log_level=log_level,
        port=port,
        metrics_port=metrics_port,
        native_sidecars=native,
        resources=_resources(annotations, options.resources),
    )


def _resources(annotations: Mapping[str, str], defaults: Resources) -> Resources:
    values: dict[str, str | None] = {}
    from_annotation: set[str] = set()
    for attr, key in (
        ("cpu_request", ANNOTATION_CPU),
        ("memory_request", ANNOTATION_MEMORY),
        ("cpu_limit", ANNOTATION_CPU_LIMIT),
        ("memory_limit", ANNOTATION_MEMORY_LIMIT),
    ):
        if key in annotations:
            try:
                parse_quantity(annotations[key])
            except ValueError as exc:
                raise InjectionError(f"annotation {key}: {exc}") from None
            values[attr] = annotations[key].strip()
            from_annotation.add(attr)
        else:
            values[attr] = getattr(defaults, attr)
    for what in ("cpu", "memory"):
        request, limit = values[f"{what}_request"], values[f"{what}_limit"]
        if request is None or limit is None or parse_quantity(request) <= parse_quantity(limit):
            continue
        if f"{what}_limit" in from_annotation:
            raise InjectionError(f"the sidecar's {what} request {request} is above its limit {limit}")
        # Only the request was raised for this pod: the default limit follows it.
        values[f"{what}_limit"] = request
    return Resources(**values)


# --------------------------------------------------------------------------- what


def _pointer(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _free_name(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    n = 1
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def sidecar_container(options: InjectionOptions, volume_names: Mapping[str, str], workload: str = "") -> dict[str, Any]:
    r = options.resources
    requests = {k: v for k, v in (("cpu", r.cpu_request), ("memory", r.memory_request)) if v}
    limits = {k: v for k, v in (("cpu", r.cpu_limit), ("memory", r.memory_limit)) if v}
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": ["kubetoll-sidecar"],
        "args": [
            "--config",
            CONFIG_PATH,
            "--port",
            str(options.port),
            "--metrics-port",
            str(options.metrics_port),
            "--log-level",
            options.log_level,
            "--wait-for-config",  # the ConfigMap is optional: start before the operator has compiled
        ],
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": options.metrics_port, "protocol": "TCP"}],
        "env": identity_env(workload),
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        # Probes go to the metrics port: the API port listens on 127.0.0.1 only.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": options.metrics_port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": options.metrics_port},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": options.run_as_user,
            "runAsGroup": options.run_as_user,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": volume_names["router"], "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": volume_names["credentials"], "mountPath": CREDENTIALS_DIR, "readOnly": True},
            {"name": volume_names["podinfo"], "mountPath": PODINFO_DIR, "readOnly": True},
            {"name": volume_names["tmp"], "mountPath": "/tmp"},
            {"name": volume_names["state"], "mountPath": STATE_DIR},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if options.native_sidecars:
        container["restartPolicy"] = "Always"
    return container


def sidecar_volumes(volume_names: Mapping[str, str]) -> list[dict[str, Any]]:
    return [
        # Whole-directory mounts (no subPath), so the kubelet's updates reach the sidecar.
        {"name": volume_names["router"], "configMap": {"name": ROUTER_CONFIGMAP, "optional": True}},
        {"name": volume_names["credentials"], "secret": {"secretName": CREDENTIALS_SECRET, "optional": True}},
        {
            "name": volume_names["podinfo"],
            "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
        },
        {"name": volume_names["tmp"], "emptyDir": {"sizeLimit": "16Mi"}},
        {"name": volume_names["state"], "emptyDir": {"sizeLimit": STATE_SIZE_LIMIT}},
    ]


def app_env(container: Mapping[str, Any], base_url: str) -> tuple[list[dict[str, Any]], str | None]:
    """(env entries to add to one app container, a warning or None).

    Only `env` is read: the values of `envFrom` are not in the pod, and an `env` entry
    overrides them, so what the app sets in `env` is what it means to keep.
    """
    have = {e.get("name"): e for e in container.get("env") or []}
    own = [n for n in BASE_URL_VARS if n in have and have[n].get("value") != base_url]
    if own:
        # The app chose its own endpoint: setting the other variable to the sidecar would send
        # the new and the old SDKs to different places. Its key is its own business too.
        return [], (
            f"kubetoll: container {container.get('name')} sets {', '.join(own)} itself: "
            f"its OpenAI traffic does not go through the kubetoll sidecar (unset it to use {base_url})"
        )
    new = [{"name": n, "value": base_url} for n in BASE_URL_VARS if n not in have]
    if API_KEY_VAR not in have:
        new.append({"name": API_KEY_VAR, "value": API_KEY_PLACEHOLDER})
    return new, None


def grace_period_seconds(spec: Mapping[str, Any], drain_seconds: float) -> int | None:
    """The pod's new terminationGracePeriodSeconds, or None to leave it as it is (never lowered)."""
    needed = math.ceil(drain_seconds) + SHUTDOWN_MARGIN_SECONDS
    current = spec.get("terminationGracePeriodSeconds")
    if current is None:
        current = DEFAULT_GRACE_PERIOD_SECONDS
    return needed if current < needed else None


def plan_injection(pod: Mapping[str, Any], namespace_labels: Mapping[str, str], options: InjectionOptions) -> Plan:
    """Decide, and build the JSONPatch (RFC 6902) ops against `pod` as given. Raises InjectionError."""
    wanted, reason = injection_requested(pod, namespace_labels, options)
    if not wanted:
        return Plan(False, reason)
    if already_injected(pod):
        return Plan(False, "already injected")
    spec = pod.get("spec") or {}
    if spec.get("hostNetwork"):
        return Plan(
            False,
            "host-network pod: the sidecar's 127.0.0.1 port would clash with every other such pod on the node",
            warnings=[f"kubetoll: {SIDECAR_NAME} not injected: the pod uses hostNetwork"],
        )
    opts = effective_options(pod, options)
    restart_policy = spec.get("restartPolicy", "Always")
    if not opts.native_sidecars and restart_policy != "Always":
        # A plain sidecar container never exits, so a Job's pod would never complete.
        return Plan(
            False,
            f"restartPolicy {restart_policy} needs a native sidecar, which this cluster or pod does not use",
            warnings=[
                f"kubetoll: {SIDECAR_NAME} not injected: restartPolicy {restart_policy} pods get it only "
                "as a native sidecar (Kubernetes >= 1.29)"
            ],
        )

    containers = list(spec.get("containers") or [])
    for c in containers + list(spec.get("initContainers") or []):
        for p in c.get("ports") or []:
            if p.get("containerPort") in (opts.port, opts.metrics_port) and p.get("protocol", "TCP") == "TCP":
                raise InjectionError(
                    f"container {c.get('name')} uses port {p['containerPort']}, which the kubetoll sidecar needs; "
                    f"move the sidecar with the annotations {ANNOTATION_PORT} / {ANNOTATION_METRICS_PORT}"
                )

    ops: list[dict[str, Any]] = []
    meta = pod.get("metadata") or {}
    for key, field_name in ((INJECTED_KEY, "annotations"), (INJECTED_KEY, "labels")):
        if field_name in meta and meta[field_name] is not None:
            ops.append({"op": "add", "path": _pointer("metadata", field_name, key), "value": "true"})
        else:
            ops.append({"op": "add", "path": _pointer("metadata", field_name), "value": {key: "true"}})
    workload = pod_workload(pod)
    if workload:
        # The annotations exist by now (the op above made them if need be). "add" replaces a
        # value the pod set itself: the annotation says what the injector derived.
        ops.append({"op": "add", "path": _pointer("metadata", "annotations", WORKLOAD_KEY), "value": workload})

    taken = {v.get("name") for v in spec.get("volumes") or []}
    volume_names: dict[str, str] = {}
    for role in ("router", "credentials", "podinfo", "tmp", "state"):
        volume_names[role] = _free_name(f"kubetoll-{role}", taken)
        taken.add(volume_names[role])
    volumes = sidecar_volumes(volume_names)
    if spec.get("volumes"):
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes]
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})

    base_url = f"http://127.0.0.1:{opts.port}/v1"
    warnings: list[str] = []
    for i, c in enumerate(containers):
        new, warning = app_env(c, base_url)
        if warning:
            warnings.append(warning)
        if not new:
            continue
        if c.get("env"):
            ops += [{"op": "add", "path": _pointer("spec", "containers", i, "env", "-"), "value": e} for e in new]
        else:
            ops.append({"op": "add", "path": _pointer("spec", "containers", i, "env"), "value": new})

    grace = grace_period_seconds(spec, opts.drain_seconds)
    if grace is not None:
        # "add" replaces an existing member (RFC 6902), so one op serves both cases.
        ops.append({"op": "add", "path": "/spec/terminationGracePeriodSeconds", "value": grace})
        warnings.append(
            f"kubetoll: terminationGracePeriodSeconds raised from "
            f"{spec.get('terminationGracePeriodSeconds', DEFAULT_GRACE_PERIOD_SECONDS)} to {grace}: "
            f"the sidecar drains and writes its spend within {opts.drain_seconds:g} s, then exits"
        )

    sidecar = sidecar_container(opts, volume_names, workload)
    if opts.native_sidecars:
        if spec.get("initContainers"):
            ops.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    else:
        # Last, so `kubectl logs/exec` still default to the app's first container.
        ops.append({"op": "add", "path": "/spec/containers/-", "value": sidecar})
    return Plan(True, reason, ops, warnings=warnings, native=opts.native_sidecars)


def mutate_pod(
    pod: Mapping[str, Any], namespace_labels: Mapping[str, str], options: InjectionOptions
) -> list[dict[str, Any]]:
    """The JSONPatch ops that inject the sidecar into `pod` (empty: leave it as it is). Raises InjectionError."""
    return plan_injection(pod, namespace_labels, options).ops


# --------------------------------------------------------------------------- AdmissionReview


def pod_from_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """The pod under review, with `metadata.namespace` filled from the request when the object lacks it."""
    pod = copy.deepcopy(dict(request.get("object") or {}))
    meta = pod.setdefault("metadata", {})
    if not meta.get("namespace") and request.get("namespace"):
        meta["namespace"] = request["namespace"]
    return pod


def admission_response(
    review: Mapping[str, Any], namespace_labels: Mapping[str, str], options: InjectionOptions
) -> dict[str, Any]:
    """An AdmissionReview request in, its response out (admission.k8s.io/v1)."""
    request = review.get("request") or {}
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": True}
    out = {
        "apiVersion": review.get("apiVersion", "admission.k8s.io/v1"),
        "kind": "AdmissionReview",
        "response": response,
    }
    kind = (request.get("kind") or {}).get("kind")
    if kind != "Pod" or request.get("operation") != "CREATE" or request.get("subResource"):
        return out
    try:
        plan = plan_injection(pod_from_request(request), namespace_labels, options)
    except InjectionError as exc:
        response["allowed"] = False
        response["status"] = {"code": 400, "message": f"kubetoll sidecar injection: {exc}"}
        return out
    if plan.warnings:
        response["warnings"] = plan.warnings
    if plan.ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(plan.ops).encode()).decode()
    return out


def native_sidecars_supported(version: Mapping[str, Any]) -> bool:
    """From the API server's /version: 1.29 and later run native sidecars ("minor" may read "29+")."""
    try:
        major = int(re.sub(r"[^0-9]", "", str(version.get("major", ""))))
        minor = int(re.sub(r"[^0-9]", "", str(version.get("minor", ""))))
    except ValueError:
        m = re.match(r"v?(\d+)\.(\d+)", str(version.get("gitVersion", "")))
        if not m:
            return False
        major, minor = int(m[1]), int(m[2])
    return (major, minor) >= NATIVE_SIDECARS_SINCE
