"""Sidecar injection: real AdmissionReview JSON in, JSONPatch out, applied to the pod.

Every mutated pod is checked three ways: against the pod we expect, against the
Kubernetes Pod schema (kubernetes-validate, strict: unknown fields fail), and by
a second mutation that must change nothing (reinvocation safety).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
from dataclasses import replace
from decimal import Decimal
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest

from kubetoll_operator import webhook
from kubetoll_operator.injection import (
    InjectionError,
    InjectionOptions,
    Resources,
    admission_response,
    mutate_pod,
    native_sidecars_supported,
    parse_quantity,
    plan_injection,
)
from support.admission import admission_review

NS = "team-a"
ENABLED = {"kubetoll.dev/injection": "enabled", "kubernetes.io/metadata.name": NS}
PLAIN = InjectionOptions(image="registry.example/kubetoll-sidecar:1.2.3", native_sidecars=False)
NATIVE = replace(PLAIN, native_sidecars=True)
BASE_URL_ENV = [
    {"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:7400/v1"},
    {"name": "OPENAI_API_BASE", "value": "http://127.0.0.1:7400/v1"},
]
KEY_ENV = {"name": "OPENAI_API_KEY", "value": "kubetoll-placeholder-the-sidecar-holds-the-credentials"}
APP_ENV = [*BASE_URL_ENV, KEY_ENV]  # what an app container without any of the three gets

# The sidecar the default options inject, written out in full: a change to it shows here.
EXPECTED_SIDECAR: dict[str, Any] = {
    "name": "kubetoll-sidecar",
    "image": "registry.example/kubetoll-sidecar:1.2.3",
    "imagePullPolicy": "IfNotPresent",
    "command": ["kubetoll-sidecar"],
    "args": [
        "--config",
        "/etc/kubetoll/router/router.json",
        "--port",
        "7400",
        "--metrics-port",
        "7401",
        "--log-level",
        "INFO",
        "--wait-for-config",
    ],
    "ports": [{"name": "kt-metrics", "containerPort": 7401, "protocol": "TCP"}],
    "env": [
        {"name": "KUBETOLL_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KUBETOLL_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KUBETOLL_POD_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        # `pod()` has no owner and no app.kubernetes.io/name: its generateName names the workload.
        {"name": "KUBETOLL_WORKLOAD", "value": "Pod/chat-api-7d9c6b5f4"},
    ],
    "resources": {"requests": {"cpu": "100m", "memory": "192Mi"}, "limits": {"memory": "512Mi"}},
    "readinessProbe": {"httpGet": {"path": "/readyz", "port": 7401}, "periodSeconds": 5, "failureThreshold": 3},
    "livenessProbe": {
        "httpGet": {"path": "/healthz", "port": 7401},
        "initialDelaySeconds": 5,
        "periodSeconds": 10,
        "failureThreshold": 3,
    },
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "volumeMounts": [
        {"name": "kubetoll-router", "mountPath": "/etc/kubetoll/router", "readOnly": True},
        {"name": "kubetoll-credentials", "mountPath": "/var/run/kubetoll/credentials", "readOnly": True},
        {"name": "kubetoll-podinfo", "mountPath": "/etc/kubetoll/podinfo", "readOnly": True},
        {"name": "kubetoll-tmp", "mountPath": "/tmp"},
        {"name": "kubetoll-state", "mountPath": "/var/lib/kubetoll"},
    ],
    "terminationMessagePolicy": "FallbackToLogsOnError",
}
EXPECTED_VOLUMES: list[dict[str, Any]] = [
    {"name": "kubetoll-router", "configMap": {"name": "kubetoll-router", "optional": True}},
    {"name": "kubetoll-credentials", "secret": {"secretName": "kubetoll-credentials", "optional": True}},
    {
        "name": "kubetoll-podinfo",
        "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
    },
    {"name": "kubetoll-tmp", "emptyDir": {"sizeLimit": "16Mi"}},
    {"name": "kubetoll-state", "emptyDir": {"sizeLimit": "64Mi"}},
]


def pod(
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    containers: list[dict[str, Any]] | None = None,
    init_containers: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
    namespace: str | None = NS,
    **spec: Any,
) -> dict[str, Any]:
    """A pod as the ReplicaSet controller sends it: generateName, no name, no uid yet."""
    meta: dict[str, Any] = {
        "generateName": "chat-api-7d9c6b5f4-",
        "labels": {"app": "chat-api", "pod-template-hash": "7d9c6b5f4", **(labels or {})},
    }
    if namespace:
        meta["namespace"] = namespace
    if annotations is not None:
        meta["annotations"] = annotations
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": containers
            if containers is not None
            else [
                {"name": "app", "image": "example/chat-api:2.0", "ports": [{"containerPort": 8080, "protocol": "TCP"}]}
            ],
            "restartPolicy": "Always",
            "serviceAccountName": "default",
            **spec,
        },
    }
    if init_containers is not None:
        body["spec"]["initContainers"] = init_containers
    if volumes is not None:
        body["spec"]["volumes"] = volumes
    return body


def review(obj: dict[str, Any], *, operation: str = "CREATE", namespace: str = NS) -> dict[str, Any]:
    return admission_review(obj, namespace=namespace, operation=operation)


def admit(
    obj: dict[str, Any], namespace_labels: dict[str, str], options: InjectionOptions, **kw: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(response, the pod after the response's patch)."""
    req = review(obj, **kw)
    resp = admission_response(req, namespace_labels, options)
    assert resp["apiVersion"] == "admission.k8s.io/v1" and resp["kind"] == "AdmissionReview"
    assert resp["response"]["uid"] == req["request"]["uid"]
    patched = copy.deepcopy(obj)
    if "patch" in resp["response"]:
        assert resp["response"]["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(resp["response"]["patch"]))
        patched = jsonpatch.apply_patch(obj, ops)
    return resp["response"], patched


def assert_valid_pod(obj: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


def assert_stable(obj: dict[str, Any], namespace_labels: dict[str, str], options: InjectionOptions) -> None:
    """A second pass over an injected pod (reinvocation) changes nothing."""
    assert mutate_pod(obj, namespace_labels, options) == []
    assert mutate_pod(obj, namespace_labels, replace(options, native_sidecars=not options.native_sidecars)) == []


def injected(obj: dict[str, Any]) -> dict[str, Any]:
    """The expected metadata additions."""
    out = copy.deepcopy(obj)
    out["metadata"].setdefault("annotations", {})["kubetoll.dev/injected"] = "true"
    out["metadata"]["annotations"]["kubetoll.dev/workload"] = "Pod/chat-api-7d9c6b5f4"
    out["metadata"]["labels"]["kubetoll.dev/injected"] = "true"
    return out


# --------------------------------------------------------------------------- the whole pod


def test_labelled_pod_gets_the_sidecar_as_a_plain_container() -> None:
    original = pod(labels={"kubetoll.dev/inject": "true"})
    resp, patched = admit(original, {}, PLAIN)
    assert resp["allowed"] is True and "warnings" not in resp

    expected = injected(original)
    expected["spec"]["containers"][0]["env"] = APP_ENV
    expected["spec"]["containers"].append(EXPECTED_SIDECAR)
    expected["spec"]["volumes"] = EXPECTED_VOLUMES
    assert patched == expected
    assert_valid_pod(patched, "1.25")
    assert_valid_pod(patched, "1.35")
    assert_stable(patched, {}, PLAIN)


def test_native_sidecar_goes_first_among_init_containers() -> None:
    inits = [
        {"name": "migrate", "image": "example/migrate:1", "command": ["migrate", "up"]},
        {"name": "warm-cache", "image": "example/warm:1"},
    ]
    original = pod(labels={"kubetoll.dev/inject": "true"}, init_containers=inits)
    resp, patched = admit(original, {}, NATIVE)
    assert resp["allowed"] is True

    expected = injected(original)
    expected["spec"]["containers"][0]["env"] = APP_ENV
    expected["spec"]["initContainers"] = [
        {**EXPECTED_SIDECAR, "restartPolicy": "Always"},
        *inits,
    ]  # init containers get no env
    expected["spec"]["volumes"] = EXPECTED_VOLUMES
    assert patched == expected
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app"]
    assert_valid_pod(patched, "1.29")
    assert_stable(patched, {}, NATIVE)


def test_native_sidecar_without_init_containers_creates_the_list() -> None:
    original = pod(labels={"kubetoll.dev/inject": "true"})
    _, patched = admit(original, {}, NATIVE)
    assert patched["spec"]["initContainers"] == [{**EXPECTED_SIDECAR, "restartPolicy": "Always"}]
    assert_valid_pod(patched, "1.29")


def test_several_containers_and_existing_env() -> None:
    containers = [
        {"name": "web", "image": "example/web:1", "env": [{"name": "LOG_LEVEL", "value": "debug"}]},
        # Its own endpoint for the new SDK: it keeps it, and gets neither variable (nor a key),
        # so the old and the new SDK never go to different places.
        {
            "name": "worker",
            "image": "example/worker:1",
            "env": [{"name": "OPENAI_BASE_URL", "value": "https://api.openai.com/v1"}],
        },
        {
            "name": "legacy",
            "image": "example/legacy:1",
            "env": [
                {"name": "OPENAI_API_BASE", "value": "http://proxy:8000"},
                {"name": "OPENAI_BASE_URL", "value": "http://proxy:8000"},
            ],
        },
        # The old SDK's variable from a ConfigMap: a value we cannot see counts as its own.
        {
            "name": "from-config",
            "image": "example/cfg:1",
            "env": [
                {"name": "OPENAI_API_BASE", "valueFrom": {"configMapKeyRef": {"name": "endpoints", "key": "openai"}}}
            ],
        },
        # Already pointed at the sidecar by hand: the other variable follows, and the key is its own.
        {
            "name": "by-hand",
            "image": "example/by-hand:1",
            "env": [
                {"name": "OPENAI_API_BASE", "value": "http://127.0.0.1:7400/v1"},
                {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "app", "key": "openai"}}},
            ],
        },
        {"name": "plain", "image": "example/plain:1"},
    ]
    original = pod(labels={"kubetoll.dev/inject": "true"}, containers=containers)
    resp, patched = admit(original, {}, PLAIN)
    envs = {c["name"]: c.get("env") for c in patched["spec"]["containers"] if c["name"] != "kubetoll-sidecar"}
    assert envs == {
        "web": [{"name": "LOG_LEVEL", "value": "debug"}, *APP_ENV],
        "worker": containers[1]["env"],
        "legacy": containers[2]["env"],
        "from-config": containers[3]["env"],
        "by-hand": [*containers[4]["env"], BASE_URL_ENV[0]],
        "plain": APP_ENV,
    }
    for before, after in zip(containers, patched["spec"]["containers"], strict=False):
        # Each container ends with both pointing at one place, or neither set by us.
        values = {e["name"]: e.get("value", "?") for e in after.get("env") or []}
        added = {e["name"] for e in after.get("env") or []} - {e["name"] for e in before.get("env") or []}
        urls = {values.get(n) for n in ("OPENAI_BASE_URL", "OPENAI_API_BASE")}
        assert not added & {"OPENAI_BASE_URL", "OPENAI_API_BASE"} or urls == {"http://127.0.0.1:7400/v1"}
    assert resp["warnings"] == [
        "kubetoll: container worker sets OPENAI_BASE_URL itself: its OpenAI traffic does not go through the "
        "kubetoll sidecar (unset it to use http://127.0.0.1:7400/v1)",
        "kubetoll: container legacy sets OPENAI_BASE_URL, OPENAI_API_BASE itself: its OpenAI traffic does not go "
        "through the kubetoll sidecar (unset it to use http://127.0.0.1:7400/v1)",
        "kubetoll: container from-config sets OPENAI_API_BASE itself: its OpenAI traffic does not go through the "
        "kubetoll sidecar (unset it to use http://127.0.0.1:7400/v1)",
    ]
    assert [c["name"] for c in patched["spec"]["containers"]] == [
        "web",
        "worker",
        "legacy",
        "from-config",
        "by-hand",
        "plain",
        "kubetoll-sidecar",
    ]
    # The provider credentials reach the sidecar only: no app container mounts them.
    for c in patched["spec"]["containers"][:-1]:
        assert "volumeMounts" not in c
    assert_valid_pod(patched, "1.35")
    assert_stable(patched, {}, PLAIN)


def test_the_state_volume_is_where_the_compiled_config_keeps_the_sidecars_state() -> None:
    from kubetoll_operator.compiler import compile_namespace

    config = compile_namespace(NS, []).config  # what the operator writes into kubetoll-router
    assert config is not None
    _, patched = admit(pod(labels={"kubetoll.dev/inject": "true"}), {}, PLAIN)
    sidecar = patched["spec"]["containers"][-1]
    mounts = [m for m in sidecar["volumeMounts"] if m["mountPath"] == config.server.state_dir]
    # Written by the sidecar (spend Redis has not confirmed, the failOpen allowance used): not read-only.
    assert len(mounts) == 1 and not mounts[0].get("readOnly")
    # An emptyDir: it outlives the sidecar's container restarts, not the pod.
    volume = next(v for v in patched["spec"]["volumes"] if v["name"] == mounts[0]["name"])
    assert volume == {"name": "kubetoll-state", "emptyDir": {"sizeLimit": "64Mi"}}
    assert all("volumeMounts" not in c for c in patched["spec"]["containers"][:-1])


def test_volume_name_clash_picks_free_names() -> None:
    volumes = [
        {"name": "kubetoll-router", "emptyDir": {}},
        {"name": "kubetoll-router-1", "emptyDir": {}},
        {"name": "kubetoll-tmp", "configMap": {"name": "something"}},
        {"name": "kubetoll-state", "persistentVolumeClaim": {"claimName": "app-state"}},
    ]
    containers = [
        {
            "name": "app",
            "image": "example/app:1",
            "volumeMounts": [
                {"name": "kubetoll-router", "mountPath": "/data"},
                {"name": "kubetoll-tmp", "mountPath": "/cfg"},
            ],
        }
    ]
    original = pod(labels={"kubetoll.dev/inject": "true"}, volumes=volumes, containers=containers)
    _, patched = admit(original, {}, NATIVE)
    names = [v["name"] for v in patched["spec"]["volumes"]]
    assert names == [
        "kubetoll-router",
        "kubetoll-router-1",
        "kubetoll-tmp",
        "kubetoll-state",
        "kubetoll-router-2",
        "kubetoll-credentials",
        "kubetoll-podinfo",
        "kubetoll-tmp-1",
        "kubetoll-state-1",
    ]
    sidecar = patched["spec"]["initContainers"][0]
    assert [m["name"] for m in sidecar["volumeMounts"]] == [
        "kubetoll-router-2",
        "kubetoll-credentials",
        "kubetoll-podinfo",
        "kubetoll-tmp-1",
        "kubetoll-state-1",
    ]
    assert patched["spec"]["volumes"][4]["configMap"] == {"name": "kubetoll-router", "optional": True}
    assert patched["spec"]["volumes"][-1] == {"name": "kubetoll-state-1", "emptyDir": {"sizeLimit": "64Mi"}}
    # The app's own volumes and mounts are untouched.
    assert patched["spec"]["volumes"][:4] == volumes
    assert patched["spec"]["containers"][0]["volumeMounts"] == containers[0]["volumeMounts"]
    assert_valid_pod(patched, "1.29")
    assert_stable(patched, {}, NATIVE)


def test_api_key_placeholder_only_where_the_app_has_no_key_in_env() -> None:
    containers = [
        {"name": "own-key", "image": "example/a:1", "env": [{"name": "OPENAI_API_KEY", "value": "sk-app-own"}]},
        # envFrom values are not in the pod; an env entry overrides them, like the base URL's (docs/install.md).
        {"name": "env-from", "image": "example/b:1", "envFrom": [{"secretRef": {"name": "app-secrets"}}]},
        {"name": "none", "image": "example/c:1"},
    ]
    _, patched = admit(pod(labels={"kubetoll.dev/inject": "true"}, containers=containers), {}, PLAIN)
    envs = {c["name"]: c.get("env") for c in patched["spec"]["containers"]}
    assert envs["own-key"] == [{"name": "OPENAI_API_KEY", "value": "sk-app-own"}, *BASE_URL_ENV]
    assert envs["env-from"] == APP_ENV and envs["none"] == APP_ENV
    assert patched["spec"]["containers"][1]["envFrom"] == containers[1]["envFrom"]
    # The sidecar gets no placeholder: its credentials come from its mounted Secret.
    assert {e["name"] for e in envs["kubetoll-sidecar"]} == {
        "KUBETOLL_POD_NAME",
        "KUBETOLL_POD_NAMESPACE",
        "KUBETOLL_POD_SERVICE_ACCOUNT",
        "KUBETOLL_WORKLOAD",
    }
    # Init containers get nothing either.
    _, patched = admit(
        pod(labels={"kubetoll.dev/inject": "true"}, init_containers=[{"name": "migrate", "image": "m:1"}]), {}, PLAIN
    )
    assert "env" not in patched["spec"]["initContainers"][0]
    assert_valid_pod(patched, "1.35")


@pytest.mark.parametrize(
    ("given", "options", "expected"),
    [
        (None, PLAIN, None),  # the API server's default, 30 s: 25 s drain + 5 s margin fit
        (30, PLAIN, None),
        (120, PLAIN, None),  # never lowered
        (10, PLAIN, 30),
        (0, NATIVE, 30),
        (30, replace(PLAIN, drain_seconds=40.5), 46),  # a longer drain: ceil(40.5) + 5
        (45, replace(NATIVE, drain_seconds=40), None),
    ],
)
def test_grace_period_covers_the_sidecar_drain(
    given: int | None, options: InjectionOptions, expected: int | None
) -> None:
    extra = {} if given is None else {"terminationGracePeriodSeconds": given}
    original = pod(labels={"kubetoll.dev/inject": "true"}, **extra)
    resp, patched = admit(original, {}, options)
    assert resp["allowed"]
    if expected is None:
        assert patched["spec"].get("terminationGracePeriodSeconds") == given
        assert "warnings" not in resp
    else:
        assert patched["spec"]["terminationGracePeriodSeconds"] == expected
        assert resp["warnings"] == [
            f"kubetoll: terminationGracePeriodSeconds raised from {given} to {expected}: the sidecar drains and "
            f"writes its spend within {options.drain_seconds:g} s, then exits"
        ]
    assert_valid_pod(patched, "1.35")
    assert_stable(patched, {}, options)


def test_default_drain_is_the_sidecar_default() -> None:
    from kubetoll_core.router_config import ServerSettings

    assert InjectionOptions().drain_seconds == ServerSettings().drain_seconds == 25


def test_namespace_enabled_injects_unlabelled_pods() -> None:
    original = pod()
    resp, patched = admit(original, ENABLED, PLAIN)
    assert resp["allowed"] and "patch" in resp
    assert patched["spec"]["containers"][-1]["name"] == "kubetoll-sidecar"
    assert_stable(patched, ENABLED, PLAIN)


def test_request_namespace_fills_a_pod_without_one() -> None:
    original = pod(labels={"kubetoll.dev/inject": "true"}, namespace=None)
    resp, patched = admit(original, {}, PLAIN, namespace="team-b")
    assert "patch" in resp
    assert "namespace" not in patched["metadata"]  # the patch adds ours only; the API server sets the namespace
    resp, _ = admit(pod(labels={"kubetoll.dev/inject": "true"}, namespace=None), {}, PLAIN, namespace="kube-system")
    assert "patch" not in resp  # the request's namespace counts for exclusions


# --------------------------------------------------------------------------- whose pod: workload identity

IDENTITY_FROM_THE_DOWNWARD_API = [
    {"name": "KUBETOLL_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "KUBETOLL_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    {"name": "KUBETOLL_POD_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
]


def ref(kind: str, name: str, *, controller: bool = True) -> dict[str, Any]:
    """An ownerReference as a controller writes it."""
    api_version = "batch/v1" if kind == "Job" else "v1" if kind == "ConfigMap" else "apps/v1"
    out = {"apiVersion": api_version, "kind": kind, "name": name, "uid": "6f1c1a52-0c1b-4bde-9f3e-2f0e5b7a9d11"}
    if controller:
        out |= {"controller": True, "blockOwnerDeletion": True}
    return out


def owned(obj: dict[str, Any], *owners: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"]["ownerReferences"] = list(owners)
    return obj


def identity_of(patched: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """(the injected sidecar's env, the pod's workload annotation)."""
    spec = patched["spec"]
    (sidecar,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == "kubetoll-sidecar"]
    return sidecar["env"], patched["metadata"]["annotations"].get("kubetoll.dev/workload")


OPT_IN = {"kubetoll.dev/inject": "true"}


@pytest.mark.parametrize(
    ("owners", "labels", "restart_policy", "workload"),
    [
        # A Deployment's pod: owned by its ReplicaSet <deployment>-<pod-template-hash>.
        ([ref("ReplicaSet", "chat-api-7d9c6b5f4")], {}, "Always", "Deployment/chat-api"),
        # A ReplicaSet of its own (its name does not end in the template hash): itself.
        ([ref("ReplicaSet", "chat-api-manual")], {}, "Always", "ReplicaSet/chat-api-manual"),
        ([ref("StatefulSet", "db")], {"app.kubernetes.io/name": "postgres"}, "Always", "StatefulSet/db"),
        ([ref("DaemonSet", "node-agent")], {}, "Always", "DaemonSet/node-agent"),
        ([ref("Job", "reindex")], {}, "Never", "Job/reindex"),
        # The CronJob controller names its Jobs <cronjob>-<scheduled minute since the epoch>.
        ([ref("Job", "nightly-report-29345678")], {}, "OnFailure", "CronJob/nightly-report"),
        ([ref("Job", "backup-1234567")], {}, "Never", "Job/backup-1234567"),  # 7 digits: not a CronJob's
        # Two owners: the controller names the workload, wherever it is in the list.
        ([ref("ConfigMap", "anchor", controller=False), ref("DaemonSet", "agent")], {}, "Always", "DaemonSet/agent"),
        # No owner: the app.kubernetes.io/name label, else the pod's generateName.
        ([], {"app.kubernetes.io/name": "search-api"}, "Always", "App/search-api"),
        ([], {}, "Always", "Pod/chat-api-7d9c6b5f4"),
    ],
    ids=[
        "deployment",
        "replicaset",
        "statefulset",
        "daemonset",
        "job",
        "cronjob",
        "job-with-digits",
        "controller-of-two",
        "app-label",
        "bare-pod",
    ],
)
def test_the_sidecar_knows_its_pod_and_workload(
    owners: list[dict[str, Any]], labels: dict[str, str], restart_policy: str, workload: str
) -> None:
    original = pod(labels={**OPT_IN, **labels}, restartPolicy=restart_policy)
    if owners:
        owned(original, *owners)
    options = PLAIN if restart_policy == "Always" else NATIVE  # pods that run to completion: native sidecars only
    resp, patched = admit(original, {}, options)
    assert resp["allowed"] is True
    env, annotation = identity_of(patched)
    # Namespace, name and ServiceAccount from the downward API (the kubelet fills them in), the workload literal.
    assert env == [*IDENTITY_FROM_THE_DOWNWARD_API, {"name": "KUBETOLL_WORKLOAD", "value": workload}]
    assert annotation == workload
    assert_valid_pod(patched, "1.35")
    assert_stable(patched, {}, options)


def test_a_bare_pod_with_a_name_and_no_generate_name() -> None:
    original = pod(labels=OPT_IN)
    del original["metadata"]["generateName"]
    original["metadata"]["name"] = "debug-shell"
    _, patched = admit(original, {}, PLAIN)
    assert identity_of(patched)[1] == "Pod/debug-shell"


def test_a_workload_the_pod_claims_is_replaced_by_the_derived_one() -> None:
    original = owned(
        pod(labels=OPT_IN, annotations={"kubetoll.dev/workload": "Deployment/payments"}),
        ref("ReplicaSet", "chat-api-7d9c6b5f4"),
    )
    _, patched = admit(original, {}, PLAIN)
    env, annotation = identity_of(patched)
    assert annotation == "Deployment/chat-api"
    assert {"name": "KUBETOLL_WORKLOAD", "value": "Deployment/chat-api"} in env


@pytest.mark.parametrize(
    ("owner", "labels", "workload"),
    [
        # What goes into records and metric labels is one line of name characters, at most 253:
        # a candidate that is not gives way to the next one.
        (("ReplicaSet", "evil\nname"), {"app.kubernetes.io/name": "search-api"}, "App/search-api"),
        (("Weird Kind", "x"), {}, "Pod/chat-api-7d9c6b5f4"),
        (("StatefulSet", "d" * 300), {}, "Pod/chat-api-7d9c6b5f4"),
        (("StatefulSet", ""), {}, "Pod/chat-api-7d9c6b5f4"),
        (None, {"app.kubernetes.io/name": "line\nbreak"}, "Pod/chat-api-7d9c6b5f4"),
        # The hash alone is no Deployment name.
        (("ReplicaSet", "-7d9c6b5f4"), {}, "Pod/chat-api-7d9c6b5f4"),
    ],
)
def test_a_workload_that_cannot_be_recorded_gives_way_to_the_next_candidate(
    owner: tuple[str, str] | None, labels: dict[str, str], workload: str
) -> None:
    original = pod(labels={**OPT_IN, **labels})
    if owner is not None:
        owned(original, ref(*owner))
    plan = plan_injection(original, {}, PLAIN)
    patched = jsonpatch.apply_patch(original, plan.ops)
    assert identity_of(patched) == (
        [*IDENTITY_FROM_THE_DOWNWARD_API, {"name": "KUBETOLL_WORKLOAD", "value": workload}],
        workload,
    )


def test_no_workload_at_all_means_neither_variable_nor_annotation() -> None:
    original = pod(labels={**OPT_IN, "app.kubernetes.io/name": "-bad-"})
    original["metadata"]["generateName"] = "-"
    plan = plan_injection(original, {}, PLAIN)
    patched = jsonpatch.apply_patch(original, plan.ops)
    env, annotation = identity_of(patched)
    assert env == IDENTITY_FROM_THE_DOWNWARD_API and annotation is None


# --------------------------------------------------------------------------- left alone


@pytest.mark.parametrize(
    ("labels", "annotations", "namespace_labels", "reason"),
    [
        ({"kubetoll.dev/inject": "false"}, None, ENABLED, "opts out (label"),
        ({}, {"kubetoll.dev/inject": "false"}, ENABLED, "opts out (annotation"),
        ({}, None, {}, "neither the pod nor its namespace"),
        (
            {"kubetoll.dev/inject": "yes"},
            None,
            {},
            "neither the pod nor its namespace",
        ),  # only "true" opts in, as the objectSelector
        ({}, {"kubetoll.dev/inject": "true"}, {}, "opts in (annotation"),  # listed for the reason; injected, see below
        ({"kubetoll.dev/inject": "true"}, None, {"kubetoll.dev/injection": "disabled"}, "disabled"),
    ],
)
def test_who_is_injected(
    labels: dict[str, str], annotations: dict[str, str] | None, namespace_labels: dict[str, str], reason: str
) -> None:
    plan = plan_injection(pod(labels=labels, annotations=annotations), namespace_labels, PLAIN)
    assert reason in plan.reason
    assert plan.inject == ("opts in" in reason)
    assert bool(plan.ops) == plan.inject


def test_labels_win_over_annotations() -> None:
    plan = plan_injection(
        pod(labels={"kubetoll.dev/inject": "true"}, annotations={"kubetoll.dev/inject": "false"}), {}, PLAIN
    )
    assert plan.inject and "label" in plan.reason
    plan = plan_injection(
        pod(labels={"kubetoll.dev/inject": "false"}, annotations={"kubetoll.dev/inject": "true"}), ENABLED, PLAIN
    )
    assert not plan.inject


def test_excluded_namespaces() -> None:
    options = replace(PLAIN, excluded_namespaces=frozenset({"kubetoll-system"}))
    for ns in ("kube-system", "kube-public", "kube-node-lease", "kubetoll-system"):
        resp, patched = admit(pod(labels={"kubetoll.dev/inject": "true"}, namespace=ns), ENABLED, options, namespace=ns)
        assert resp["allowed"] and "patch" not in resp, ns


@pytest.mark.parametrize("how", ["container", "annotation"])
def test_already_injected_is_left_as_is(how: str) -> None:
    original = pod(labels={"kubetoll.dev/inject": "true"})
    if how == "container":
        original["spec"]["containers"].append({"name": "kubetoll-sidecar", "image": "custom/sidecar:1"})
    else:
        original["metadata"]["annotations"] = {"kubetoll.dev/injected": "true"}
    resp, patched = admit(original, ENABLED, NATIVE)
    assert resp["allowed"] and "patch" not in resp and patched == original
    assert plan_injection(original, ENABLED, NATIVE).reason == "already injected"


def test_host_network_pods_are_skipped_with_a_warning() -> None:
    resp, patched = admit(pod(labels={"kubetoll.dev/inject": "true"}, hostNetwork=True), {}, PLAIN)
    assert resp["allowed"] and "patch" not in resp
    assert "hostNetwork" in resp["warnings"][0]


def test_job_pods_get_the_sidecar_only_as_native_sidecar() -> None:
    job_pod = pod(labels={"kubetoll.dev/inject": "true"}, restartPolicy="Never")
    resp, _ = admit(job_pod, {}, PLAIN)
    assert resp["allowed"] and "patch" not in resp and "restartPolicy Never" in resp["warnings"][0]
    resp, patched = admit(job_pod, {}, NATIVE)
    assert "patch" in resp and patched["spec"]["initContainers"][0]["restartPolicy"] == "Always"
    assert_valid_pod(patched, "1.29")


def test_other_requests_pass_untouched() -> None:
    resp, _ = admit(pod(labels={"kubetoll.dev/inject": "true"}), {}, PLAIN, operation="UPDATE")
    assert resp == {"uid": resp["uid"], "allowed": True}
    req = review(pod(labels={"kubetoll.dev/inject": "true"}))
    req["request"]["kind"] = {"group": "", "version": "v1", "kind": "Binding"}
    assert "patch" not in admission_response(req, {}, PLAIN)["response"]


# --------------------------------------------------------------------------- per-pod overrides


def test_annotations_override_image_port_resources_and_log_level() -> None:
    annotations = {
        "kubetoll.dev/sidecar-image": "mirror.internal/kubetoll-sidecar:1.2.3-debug",
        "kubetoll.dev/sidecar-port": "17400",
        "kubetoll.dev/sidecar-metrics-port": "17401",
        "kubetoll.dev/sidecar-cpu": "250m",
        "kubetoll.dev/sidecar-memory": "1Gi",  # above the default limit: the limit follows
        "kubetoll.dev/log-level": "debug",
    }
    original = pod(labels={"kubetoll.dev/inject": "true"}, annotations=annotations)
    _, patched = admit(original, {}, PLAIN)
    sidecar = patched["spec"]["containers"][-1]
    assert sidecar["image"] == "mirror.internal/kubetoll-sidecar:1.2.3-debug"
    assert sidecar["args"] == [
        "--config",
        "/etc/kubetoll/router/router.json",
        "--port",
        "17400",
        "--metrics-port",
        "17401",
        "--log-level",
        "DEBUG",
        "--wait-for-config",
    ]
    assert sidecar["resources"] == {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}
    assert sidecar["readinessProbe"]["httpGet"]["port"] == 17401 and sidecar["ports"][0]["containerPort"] == 17401
    assert patched["spec"]["containers"][0]["env"] == [
        *({"name": n, "value": "http://127.0.0.1:17400/v1"} for n in ("OPENAI_BASE_URL", "OPENAI_API_BASE")),
        KEY_ENV,
    ]
    assert patched["metadata"]["annotations"] == {
        **annotations,
        "kubetoll.dev/injected": "true",
        "kubetoll.dev/workload": "Pod/chat-api-7d9c6b5f4",
    }
    assert_valid_pod(patched, "1.35")


def test_native_sidecar_annotation_per_pod() -> None:
    _, patched = admit(
        pod(labels={"kubetoll.dev/inject": "true"}, annotations={"kubetoll.dev/native-sidecar": "false"}), {}, NATIVE
    )
    assert "initContainers" not in patched["spec"] and patched["spec"]["containers"][-1]["name"] == "kubetoll-sidecar"
    _, patched = admit(
        pod(labels={"kubetoll.dev/inject": "true"}, annotations={"kubetoll.dev/native-sidecar": "true"}), {}, PLAIN
    )
    assert patched["spec"]["initContainers"][0]["restartPolicy"] == "Always"


def test_limits_from_options_and_cpu_limit() -> None:
    options = replace(
        PLAIN, resources=Resources(cpu_request="50m", memory_request=None, cpu_limit="1", memory_limit=None)
    )
    _, patched = admit(
        pod(labels={"kubetoll.dev/inject": "true"}, annotations={"kubetoll.dev/sidecar-cpu-limit": "500m"}), {}, options
    )
    assert patched["spec"]["containers"][-1]["resources"] == {"requests": {"cpu": "50m"}, "limits": {"cpu": "500m"}}
    assert_valid_pod(patched, "1.35")


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"kubetoll.dev/sidecar-cpu": "2 cores"}, "kubetoll.dev/sidecar-cpu: '2 cores' is not a Kubernetes quantity"),
        ({"kubetoll.dev/sidecar-memory": "-1Gi"}, "kubetoll.dev/sidecar-memory: '-1Gi' is not a Kubernetes quantity"),
        (
            {"kubetoll.dev/sidecar-memory": "2Gi", "kubetoll.dev/sidecar-memory-limit": "1Gi"},
            "memory request 2Gi is above its limit 1Gi",
        ),
        ({"kubetoll.dev/log-level": "verbose"}, "kubetoll.dev/log-level: 'verbose' is not one of DEBUG, INFO"),
        ({"kubetoll.dev/sidecar-port": "70000"}, "kubetoll.dev/sidecar-port: '70000' is not a port number"),
        ({"kubetoll.dev/sidecar-port": "7401"}, "API port and metrics port are both 7401"),
        ({"kubetoll.dev/sidecar-image": "has space:1"}, "is not an image reference"),
        ({"kubetoll.dev/native-sidecar": "maybe"}, "kubetoll.dev/native-sidecar: 'maybe' is not"),
    ],
)
def test_bad_annotations_deny_with_a_clear_message(annotations: dict[str, str], message: str) -> None:
    resp, _ = admit(pod(labels={"kubetoll.dev/inject": "true"}, annotations=annotations), {}, PLAIN)
    assert resp["allowed"] is False and resp["status"]["code"] == 400
    assert message in resp["status"]["message"], resp["status"]["message"]
    assert "patch" not in resp


def test_port_clash_with_an_app_container_is_denied() -> None:
    containers = [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": 7400}]}]
    resp, _ = admit(pod(labels={"kubetoll.dev/inject": "true"}, containers=containers), {}, PLAIN)
    assert not resp["allowed"] and "container app uses port 7400" in resp["status"]["message"]
    # Moving the sidecar away solves it.
    annotated = pod(
        labels={"kubetoll.dev/inject": "true"}, containers=containers, annotations={"kubetoll.dev/sidecar-port": "7410"}
    )
    resp, patched = admit(annotated, {}, PLAIN)
    assert resp["allowed"] and patched["spec"]["containers"][0]["env"][0]["value"] == "http://127.0.0.1:7410/v1"


def test_injection_error_from_mutate_pod() -> None:
    with pytest.raises(InjectionError):
        mutate_pod(
            pod(labels={"kubetoll.dev/inject": "true"}, annotations={"kubetoll.dev/sidecar-cpu": "lots"}), {}, PLAIN
        )


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("100m", Decimal("0.1")),
        ("1", Decimal(1)),
        ("1.5", Decimal("1.5")),
        ("256Mi", Decimal(256 * 2**20)),
        ("1Gi", Decimal(2**30)),
        ("1k", Decimal(1000)),
        ("1e3", Decimal(1000)),
        ("0.5G", Decimal(500_000_000)),
    ],
)
def test_parse_quantity(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "m", "1 Gi", "1GB", "-5", "1.2.3", "abc"])
def test_parse_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


@pytest.mark.parametrize(
    ("version", "native"),
    [
        ({"major": "1", "minor": "29"}, True),
        ({"major": "1", "minor": "33+", "gitVersion": "v1.33.2-eks-931bdca"}, True),
        ({"major": "1", "minor": "28"}, False),
        ({"major": "1", "minor": "26", "gitVersion": "v1.26.4+k3s1"}, False),
        ({"major": "", "minor": "", "gitVersion": "v1.30.1"}, True),
        ({}, False),
    ],
)
def test_native_sidecars_from_the_server_version(version: dict[str, str], native: bool) -> None:
    assert native_sidecars_supported(version) is native


def test_operator_flags_build_the_webhook_options() -> None:
    from kubetoll_tools.operator_commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "operator",
            "--priority",
            "random",
            "--webhook",
            "--webhook-port",
            "10443",
            "--native-sidecars",
            "false",
            "--sidecar-image",
            "reg/sidecar:9",
            "--sidecar-memory",
            "256Mi",
            "--sidecar-cpu-limit",
            "2",
            "--webhook-exclude-namespace",
            "kubetoll-system",
            "--sidecar-log-level",
            "warning",
        ]
    )
    assert 1 <= args.priority < 2**31
    options = webhook.options_from_args(args)
    assert options is not None and options.enabled and options.port == 10443 and options.native_sidecars == "false"
    inj = options.injection
    assert inj.image == "reg/sidecar:9" and inj.log_level == "WARNING"
    assert inj.resources == Resources(cpu_request="100m", memory_request="256Mi", cpu_limit="2", memory_limit="512Mi")
    assert {"kubetoll-system", "kube-system"} <= inj.excluded_namespaces
    assert webhook.options_from_args(parser.parse_args(["operator"])) is None
    with pytest.raises(SystemExit, match="--sidecar-cpu: 'x' is not a Kubernetes quantity"):
        webhook.options_from_args(parser.parse_args(["operator", "--webhook", "--sidecar-cpu", "x"]))
    with pytest.raises(SystemExit, match="has no tls.crt"):
        webhook.options_from_args(parser.parse_args(["operator", "--webhook", "--webhook-cert-dir", "/nonexistent"]))
