"""Least privilege: the chart's RBAC, `operator.watchNamespaces`, and what the operator really asks for.

The chart is rendered by the real helm binary (tests/support/helm.py). Then the
operator runs on the kmock emulator (tests/support/kopf_env.py) through a whole
life cycle: compile, a managed ConfigMap edited behind its back (restored by a
patch), every resource deleted (the ConfigMap and Secret deleted). Every request
it made (the ones carrying its token; the test's own carry none) is checked
against the rendered rules the way the API server's RBAC authorizer does, for
the cluster-wide ClusterRole and for the Roles of `watchNamespaces`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate.utils import latest_version

from kubetoll_operator.handlers import CONFIGMAP_NAME, CREDENTIALS_SECRET
from kubetoll_operator.injection import INJECTED_KEY
from support.helm import helm
from support.kopf_env import Kubectl, eventually
from test_chart import CHART, NS, OLDEST_KUBERNETES, RELEASE, operator_args, parse_operator_args, render
from test_operator_kopf import example_docs

OWNED = {"configmaps": CONFIGMAP_NAME, "secrets": CREDENTIALS_SECRET}
WATCHED = ["team-a", "team-b"]


def watch_values(namespaces: list[str]) -> tuple[str, ...]:
    return ("--set-json", "operator.watchNamespaces=" + json.dumps(namespaces))


def rules_of(docs: list[dict[str, Any]], kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
    found = [
        d for d in docs if d["kind"] == kind and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]
    assert len(found) == 1, f"{len(found)} {kind} in {namespace}"
    return found[0]["rules"]


# --------------------------------------------------------------------------- an RBAC authorizer


@dataclass(frozen=True)
class Attributes:
    """A request as the API server's authorizer sees it."""

    verb: str
    group: str
    resource: str  # plural, with "/subresource"
    namespace: str | None
    name: str | None


def allows(rules: list[dict[str, Any]], a: Attributes) -> bool:
    for r in rules:
        if a.group not in r["apiGroups"] or a.resource not in r["resources"] or a.verb not in r["verbs"]:
            continue
        names = r.get("resourceNames")
        if names and a.name not in names:  # a create has no name, so named rules never allow it
            continue
        return True
    return False


def authorized(docs: list[dict[str, Any]], a: Attributes) -> bool:
    """ClusterRole (bound cluster-wide) or the Role of the request's namespace."""
    if allows(rules_of(docs, "ClusterRole"), a):
        return True
    roles = [r for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == a.namespace for r in d["rules"]]
    return a.namespace is not None and allows(roles, a)


def attributes(request: Any) -> Attributes | None:
    """None: a discovery request (/api, /apis/<group>/<version>), which every authenticated user may make."""
    res = request.resource
    if res is None or res.plural is None:
        return None
    method = str(request.method.value).upper()
    if method == "GET":
        verb = "get" if request.name else "watch" if request.params.get("watch") in ("true", "1") else "list"
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
    plural = res.plural + (f"/{request.subresource}" if request.subresource else "")
    return Attributes(verb, res.group, plural, request.namespace, request.name)


def operator_requests(kmock: Any) -> list[Attributes]:
    out = []
    for request in list(kmock):
        if request.headers.get("Authorization") != "Bearer test-token":
            continue  # the test's own calls (support/kopf_env.Kubectl sends no token)
        a = attributes(request)
        if a is not None:
            out.append(a)
    return out


# --------------------------------------------------------------------------- the chart


def test_configmap_and_secret_writes_are_limited_to_the_owned_names() -> None:
    for docs, rules in (
        (render(), rules_of(render(), "ClusterRole")),
        (render(*watch_values(WATCHED)), rules_of(render(*watch_values(WATCHED)), "Role", "team-a")),
    ):
        core = [r for r in rules if r["apiGroups"] == [""] and {"configmaps", "secrets"} & set(r["resources"])]
        writes = [r for r in core if {"patch", "update", "delete"} & set(r["verbs"])]
        assert writes, "no write rule at all"
        for r in writes:
            assert len(r["resources"]) == 1 and r["resourceNames"] == [OWNED[r["resources"][0]]], r
            assert "update" not in r["verbs"]  # the operator merge-patches, never PUTs
        assert {r["resources"][0] for r in writes} == {"configmaps", "secrets"}
        # create cannot be limited by name: its own rule, create only.
        creates = [r for r in core if "create" in r["verbs"]]
        assert creates == [{"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["create"]}]
        assert not any(r.get("resourceNames") for r in core if {"list", "watch"} & set(r["verbs"]))
        # The authorizer agrees: the owned names can be patched, no other.
        for resource, owned in OWNED.items():
            for verb in ("patch", "delete"):
                assert allows(rules, Attributes(verb, "", resource, "team-a", owned))
                assert not allows(rules, Attributes(verb, "", resource, "team-a", "someone-elses"))
            assert not allows(rules, Attributes("update", "", resource, "team-a", owned))
            assert allows(rules, Attributes("create", "", resource, "team-a", None))
        assert docs


def test_watch_namespaces_renders_roles_and_the_flags() -> None:
    default = render()
    # The only Role by default: the webhook certificate's, in the release's namespace.
    assert {d["metadata"]["name"] for d in default if d["kind"] in ("Role", "RoleBinding")} == {
        "kubetoll-operator-webhook-cert"
    }
    assert parse_operator_args(operator_args(default)).namespace == []

    docs = render(*watch_values(WATCHED))
    # The operator is started with exactly those namespaces (parsed by the real parser).
    assert parse_operator_args(operator_args(docs)).namespace == WATCHED
    cluster_rules = rules_of(docs, "ClusterRole")
    # Nothing namespaced is granted cluster-wide any more.
    flat = {res for r in cluster_rules for res in r["resources"]}
    assert flat == {
        "namespaces",
        "clusterkopfpeerings",
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
    }, flat
    assert [r["verbs"] for r in cluster_rules if r["resources"] == ["namespaces"]] == [["get"]]
    # Each listed namespace gets the rules the cluster-wide ClusterRole has for namespaced kinds.
    namespaced_in_default = [
        r
        for r in rules_of(default, "ClusterRole")
        if not {"namespaces", "customresourcedefinitions"} & set(r["resources"])
        and r["apiGroups"] not in (["kopf.dev"], ["admissionregistration.k8s.io"])
    ]
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    for ns in WATCHED:
        assert rules_of(docs, "Role", ns) == namespaced_in_default
        binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == ns)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "kubetoll-operator",
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NS}]
    for doc in docs:
        if doc["kind"] in ("Role", "RoleBinding", "ClusterRole"):
            for version in (OLDEST_KUBERNETES, latest_version()):
                kubernetes_validate.validate(doc, version, strict=True)
    out = helm("lint", str(CHART), "--strict", "--namespace", NS, *watch_values(WATCHED)).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(
    "values, message",
    [
        (watch_values(["team-*"]), "watchNamespaces"),
        (watch_values(["team-a", "team-a"]), "watchNamespaces"),
        (("--set", "operator.metrics.port=8080"), "operator.metrics.port 8080 is taken"),
        (("--set", "operator.metrics.port=9443"), "operator.metrics.port 9443 is taken"),
    ],
)
def test_bad_least_privilege_values_are_refused(values: tuple[str, ...], message: str) -> None:
    result = helm("template", RELEASE, str(CHART), "--namespace", NS, *values, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# --------------------------------------------------------------------------- what the operator really does


async def _life_cycle(kubectl: Kubectl, namespace: str) -> None:
    """Compile, a managed ConfigMap edited behind the operator's back, then every resource deleted.

    An injected pod comes and goes meanwhile (the operator counts them: sidecar_count.py).
    """
    docs = example_docs()
    for doc in docs:
        await kubectl.apply(doc, namespace=namespace)
    injected = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app", "labels": {INJECTED_KEY: "true"}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
        "status": {"phase": "Running"},
    }
    await kubectl.apply(injected, namespace=namespace)

    async def written() -> dict[str, Any]:
        cm = await kubectl.get("ConfigMap", CONFIGMAP_NAME, namespace=namespace)
        assert cm is not None and await kubectl.get("Secret", CREDENTIALS_SECRET, namespace=namespace) is not None
        return cm

    await eventually(written)
    edit = {"metadata": {"annotations": {"kubetoll.dev/config-hash": "edited"}}, "data": {"router.json": "{}"}}
    await kubectl.patch("ConfigMap", CONFIGMAP_NAME, edit, namespace=namespace)

    async def restored() -> None:
        now = await kubectl.get("ConfigMap", CONFIGMAP_NAME, namespace=namespace)
        assert now is not None and now["data"]["router.json"] != "{}"
        text = now["data"]["router.json"]
        assert now["metadata"]["annotations"]["kubetoll.dev/config-hash"] == hashlib.sha256(text.encode()).hexdigest()

    await eventually(restored)
    await kubectl.delete("Pod", "app", namespace=namespace)
    for doc in reversed(docs):
        await kubectl.delete(doc["kind"], doc["metadata"]["name"], namespace=namespace)

    async def removed() -> None:
        assert await kubectl.get("ConfigMap", CONFIGMAP_NAME, namespace=namespace) is None
        assert await kubectl.get("Secret", CREDENTIALS_SECRET, namespace=namespace) is None

    await eventually(removed)


def _check_authorized(docs: list[dict[str, Any]], requests: list[Attributes]) -> None:
    verbs = {(a.verb, a.resource) for a in requests}
    # The life cycle exercised every kind of write the rules are about.
    for needed in (
        ("patch", "configmaps"),
        ("delete", "configmaps"),
        ("delete", "secrets"),
        ("create", "secrets"),
        ("list", "pods"),
        ("watch", "pods"),
    ):
        assert needed in verbs, (needed, sorted(verbs))
    denied = sorted({a for a in requests if not authorized(docs, a)}, key=repr)
    assert denied == [], "the chart's RBAC does not allow what the operator did"


async def test_cluster_wide_operator_needs_nothing_the_cluster_role_does_not_grant(
    kmock: Any, kubectl: Kubectl, start_operator: Any
) -> None:
    await start_operator()
    await _life_cycle(kubectl, "team-a")
    _check_authorized(render(), operator_requests(kmock))


async def test_namespaced_operator_stays_in_its_namespaces(kmock: Any, kubectl: Kubectl, start_operator: Any) -> None:
    await start_operator(namespaces=["team-a"])
    # A namespace it does not watch: its resources are never compiled.
    for doc in example_docs():
        await kubectl.apply(doc, namespace="team-c")
    await _life_cycle(kubectl, "team-a")
    assert await kubectl.get("ConfigMap", CONFIGMAP_NAME, namespace="team-c") is None

    requests = operator_requests(kmock)
    # Never a cluster-wide list or watch of a namespaced kind, never another namespace.
    assert {a.namespace for a in requests if a.resource not in ("namespaces", "clusterkopfpeerings")} == {"team-a"}
    _check_authorized(render(*watch_values(["team-a"])), requests)
    # ... which the cluster-wide ClusterRole of that render would not have allowed on its own.
    docs = render(*watch_values(["team-a"]))
    assert not allows(rules_of(docs, "ClusterRole"), Attributes("list", "", "secrets", None, None))


async def test_the_webhook_certificate_bootstrap_needs_only_its_rules(kmock: Any, tmp_path: Any) -> None:
    """webhook_cert.py's requests (create, renew, caBundle patches), as the chart's default mode runs them."""
    import base64

    import kopf
    from kmock._internal.references import ResourceInfo, resource

    from kubetoll_operator import webhook_cert
    from kubetoll_operator.kube import KubeApi

    verbs = ["get", "list", "watch", "create", "update", "patch", "delete"]
    kmock.resources[resource("", "v1", "secrets")] = ResourceInfo(kind="Secret", namespaced=True, verbs=verbs)
    docs = render()
    args = parse_operator_args(operator_args(docs))
    for doc in docs:
        if doc["kind"] in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            plural = doc["kind"].lower() + "s"
            kmock.resources[resource("admissionregistration.k8s.io", "v1", plural)] = ResourceInfo(
                kind=doc["kind"], namespaced=False, verbs=verbs
            )
            kmock.objects[resource("admissionregistration.k8s.io", "v1", plural), None, doc["metadata"]["name"]] = doc
    service, namespace = webhook_cert.parse_service(args.webhook_service)
    options = webhook_cert.CertOptions(
        secret=args.webhook_cert_secret,
        service=service,
        namespace=namespace,
        configurations=tuple(webhook_cert.parse_configuration(c) for c in args.webhook_configuration),
        cert_dir=str(tmp_path / "certs"),
    )
    api = KubeApi(kopf.ConnectionInfo(server=str(kmock.url).rstrip("/"), token="test-token"))
    try:
        first = await webhook_cert.bootstrap(api, options)
        # A serving certificate missing a name: renewed, i.e. the Secret patched.
        crt, key = webhook_cert.issue_leaf(first.ca_crt, first.ca_key, options.dns_names[:1])
        await api.merge_patch(
            f"/api/v1/namespaces/{namespace}/secrets/{options.secret}",
            {"data": {"tls.crt": base64.b64encode(crt).decode(), "tls.key": base64.b64encode(key).decode()}},
        )
        await webhook_cert.bootstrap(api, options)
    finally:
        await api.close()
    requests = operator_requests(kmock)
    seen = {(a.verb, a.resource) for a in requests}
    for needed in (
        ("create", "secrets"),
        ("get", "secrets"),
        ("patch", "secrets"),
        ("get", "mutatingwebhookconfigurations"),
        ("patch", "mutatingwebhookconfigurations"),
        ("patch", "validatingwebhookconfigurations"),
    ):
        assert needed in seen, (needed, sorted(seen))
    for rendered in (docs, render(*watch_values(WATCHED))):
        denied = sorted({a for a in requests if not authorized(rendered, a)}, key=repr)
        assert denied == [], "the chart's RBAC does not allow what the certificate bootstrap did"
    # ... with the Role in the release's namespace alone when nothing is watched there.
    role = rules_of(render(*watch_values(WATCHED)), "Role", NS)
    assert all(allows(role, a) for a in requests if a.resource == "secrets")
    assert not allows(role, Attributes("patch", "", "secrets", NS, "another-secret"))
