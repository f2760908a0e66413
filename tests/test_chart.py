"""The Helm chart, with the real helm binary (tests/support/helm.py).

`helm lint --strict` and `helm template` with several value sets; every rendered
manifest validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict, offline) for the oldest Kubernetes the chart supports and the newest the
package knows. Objects of CRD-defined kinds (prometheus-operator, cert-manager,
kopf) are outside those schemas: each is listed in CRD_KINDS and its shape is
checked by hand below. Then what the objects must say: the webhook's selectors,
the RBAC rules, the operator's flags (parsed by the real `kubetoll operator`
parser), the CRDs (the chart's copy equals crds/ byte for byte), the generated
certificate (served by kopf's own webhook server), and every metric name the
alerts and the dashboard use (against the sidecar's metric definitions).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import socket
import ssl
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from support.helm import helm

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubetoll"
NS = "kubetoll-system"
RELEASE = "kubetoll"
OLDEST_KUBERNETES = "1.25"  # Chart.yaml kubeVersion

# Kinds defined by CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("kopf.dev/v1", "ClusterKopfPeering"),
}

VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "cert-manager": ["--set", "webhook.certManager.enabled=true"],
    "cert-manager-cluster-issuer": [
        "--set",
        "webhook.certManager.enabled=true",
        "--set",
        "webhook.certManager.issuerRef.kind=ClusterIssuer",
        "--set",
        "webhook.certManager.issuerRef.name=internal-ca",
    ],
    "chart-redis": ["--set", "redis.deploy=true"],
    "external-redis": ["--set", "redis.url=rediss://redis.infra.svc:6380/2"],
    "monitoring": ["--set", "monitoring.enabled=true", "--set", "monitoring.labels.release=kube-prometheus-stack"],
    "single-replica-fail-closed": [
        "--set",
        "operator.replicas=1",
        "--set",
        "webhook.failurePolicy=Fail",
        "--set",
        "webhook.nativeSidecars=false",
        "--set",
        "webhook.excludeNamespaces={batch,legacy}",
    ],
    "webhook-off": ["--set", "webhook.enabled=false"],
    "everything": [
        "--set",
        "webhook.certManager.enabled=true",
        "--set",
        "redis.deploy=true",
        "--set",
        "monitoring.enabled=true",
        "--set",
        "operator.verbose=true",
        "--set",
        "sidecar.resources.limits.cpu=1",
        "--set",
        "sidecar.logLevel=DEBUG",
        "--set",
        "imagePullSecrets[0].name=regcred",
        "--set",
        "operator.priorityClassName=system-cluster-critical",
    ],
}


@cache
def _render(args: tuple[str, ...]) -> str:
    return helm("template", RELEASE, str(CHART), "--namespace", NS, *args).stdout


def render(*args: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render(tuple(args))) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


# --------------------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint(name: str) -> None:
    out = helm("lint", str(CHART), "--strict", "--namespace", NS, *VALUE_SETS[name]).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_manifests_validate_against_kubernetes_schemas(name: str) -> None:
    docs = render(*VALUE_SETS[name])
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_KINDS:
            continue  # CRD-defined: shapes checked in the tests below
        for version in (OLDEST_KUBERNETES, latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
        # Namespaced objects land in the release namespace (cluster-scoped ones have none).
        if doc["kind"] not in (
            "ClusterRole",
            "ClusterRoleBinding",
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        ):
            assert doc["metadata"].get("namespace") == NS, (doc["kind"], doc["metadata"]["name"])


def test_crds_render_and_validate() -> None:
    docs = [d for d in yaml.safe_load_all(_render(("--include-crds",))) if d]
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert {c["metadata"]["name"] for c in crds} == {
        "modelbackends.kubetoll.dev",
        "modelroutes.kubetoll.dev",
        "tokenbudgets.kubetoll.dev",
        "cachepolicies.kubetoll.dev",
        "clusterkopfpeerings.kopf.dev",
    }
    for crd in crds:
        kubernetes_validate.validate(crd, latest_version(), strict=True)
        if crd["spec"]["group"] == "kubetoll.dev":
            assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}


def test_chart_crds_are_a_byte_for_byte_copy_of_crds_dir() -> None:
    """crds/ is generated from the models (test_operator_crds.py); the chart must ship the same bytes."""
    generated = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    shipped = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert sorted(shipped) == sorted(generated), (
        "the chart's crds/ holds other files than crds/: cp crds/*.yaml charts/kubetoll/crds/"
    )
    for name in generated:
        assert shipped[name] == generated[name], (
            f"charts/kubetoll/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/kubetoll/crds/"
        )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "webhook.failurePolicy=Sometimes"], "failurePolicy"),
        (["--set", "webhook.nativeSidecars=maybe"], "nativeSidecars"),
        (["--set", "redis.url=redis://user:secret@redis:6379"], "url"),
        (["--set", "sidecar.resources.requests.memory=lots"], "memory"),
        (["--set", "operator.replica=3"], "replica"),  # a typo is an error, not a silently ignored key
        (["--set", "redis.url=redis://r:6379", "--set", "redis.deploy=true"], "not both"),
        (["--set", "telemetry.otlpEndpoint=otel:4318"], "otlpEndpoint"),
    ],
)
def test_bad_values_are_refused(values: list[str], message: str) -> None:
    result = helm("template", RELEASE, str(CHART), "--namespace", NS, *values, check=False)
    assert result.returncode != 0, result.stdout[:500]
    assert message in result.stderr, result.stderr


# --------------------------------------------------------------------------- the webhook


def test_mutating_webhook_configuration() -> None:
    from kubetoll_operator.webhook import NAMESPACE_WEBHOOK_ID, WEBHOOK_ID

    docs = render()
    mwc = one(docs, "MutatingWebhookConfiguration")
    service = one(docs, "Service", "kubetoll-webhook")
    hooks = {h["name"]: h for h in mwc["webhooks"]}
    assert set(hooks) == {"pod.sidecar-injector.kubetoll.dev", "namespace.sidecar-injector.kubetoll.dev"}
    excluded = {
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": ["kube-system", "kube-public", "kube-node-lease", NS],
    }

    pod_hook = hooks["pod.sidecar-injector.kubetoll.dev"]
    assert pod_hook["objectSelector"] == {
        "matchExpressions": [{"key": "kubetoll.dev/inject", "operator": "In", "values": ["true"]}]
    }
    assert pod_hook["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubetoll.dev/injection", "operator": "NotIn", "values": ["enabled", "disabled"]},
            excluded,
        ]
    }
    assert pod_hook["clientConfig"]["service"]["path"] == f"/{WEBHOOK_ID}"

    ns_hook = hooks["namespace.sidecar-injector.kubetoll.dev"]
    assert ns_hook["objectSelector"] == {
        "matchExpressions": [{"key": "kubetoll.dev/inject", "operator": "NotIn", "values": ["false"]}]
    }
    assert ns_hook["namespaceSelector"] == {
        "matchExpressions": [{"key": "kubetoll.dev/injection", "operator": "In", "values": ["enabled"]}, excluded]
    }
    assert ns_hook["clientConfig"]["service"]["path"] == f"/{NAMESPACE_WEBHOOK_ID}"

    for hook in hooks.values():
        assert hook["rules"] == [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        assert (
            hook["failurePolicy"] == "Ignore"
            and hook["sideEffects"] == "None"
            and hook["admissionReviewVersions"] == ["v1"]
        )
        assert hook["timeoutSeconds"] <= 30 and hook["reinvocationPolicy"] == "Never"
        assert hook["clientConfig"]["service"] | {"path": None} == {
            "name": service["metadata"]["name"],
            "namespace": NS,
            "port": 443,
            "path": None,
        }
    assert service["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "webhook", "protocol": "TCP"}]
    assert service["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]


def test_webhook_values_reach_the_configuration() -> None:
    mwc = one(render(*VALUE_SETS["single-replica-fail-closed"]), "MutatingWebhookConfiguration")
    for hook in mwc["webhooks"]:
        assert hook["failurePolicy"] == "Fail"
        assert hook["namespaceSelector"]["matchExpressions"][1]["values"] == [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            NS,
            "batch",
            "legacy",
        ]
    assert "MutatingWebhookConfiguration" not in kinds(render(*VALUE_SETS["webhook-off"]))


def test_generated_certificate_matches_the_ca_bundle() -> None:
    from cryptography import x509

    docs = render("--set", "webhook.tls.mode=helm")  # the default mode renders no certificate
    secret = one(docs, "Secret", "kubetoll-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    for hook in one(docs, "MutatingWebhookConfiguration")["webhooks"]:
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == data["ca.crt"]
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "kubetoll-webhook.kubetoll-system.svc" in sans  # the name the API server calls


async def test_kopf_serves_the_charts_certificate(tmp_path: Path) -> None:
    """kopf's webhook server with the chart's Secret, reached as the API server does: by service name, against caBundle."""
    from kubetoll_operator.webhook import WebhookOptions, build_server

    docs = render("--set", "webhook.tls.mode=helm")  # the default mode renders no certificate
    secret = one(docs, "Secret", "kubetoll-webhook-tls")
    for key, value in secret["data"].items():
        (tmp_path / key).write_bytes(base64.b64decode(value))
    ca_bundle = base64.b64decode(
        one(docs, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"]
    ).decode()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = build_server(WebhookOptions(enabled=True, addr="127.0.0.1", port=port, cert_dir=str(tmp_path)))
    seen: list[dict[str, Any]] = []

    async def fn(request: dict[str, Any], **_: Any) -> dict[str, Any]:
        seen.append(request)
        return {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": request["request"]["uid"], "allowed": True},
        }

    async def serve() -> None:
        async for _ in server(fn):
            pass

    async with server:
        task = asyncio.create_task(serve())
        try:
            context = ssl.create_default_context(cadata=ca_bundle)
            body = {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {"uid": "u1", "namespace": "team-a", "object": {"metadata": {}}},
            }
            async with aiohttp.ClientSession() as session:
                for _ in range(100):
                    try:
                        async with session.post(
                            f"https://127.0.0.1:{port}/inject-sidecar",
                            json=body,
                            ssl=context,
                            server_hostname="kubetoll-webhook.kubetoll-system.svc",
                        ) as resp:
                            answer = await resp.json()
                        break
                    except aiohttp.ClientConnectorError:
                        await asyncio.sleep(0.05)
            assert answer["response"] == {"uid": "u1", "allowed": True}
            # The request's namespace was copied into the pod for the handlers.
            assert seen[0]["request"]["object"]["metadata"]["namespace"] == "team-a"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def test_cert_manager_variant() -> None:
    docs = render(*VALUE_SETS["cert-manager"])
    assert "Secret" not in kinds(docs)  # cert-manager writes it
    mwc = one(docs, "MutatingWebhookConfiguration")
    assert mwc["metadata"]["annotations"] == {"cert-manager.io/inject-ca-from": f"{NS}/kubetoll-webhook"}
    assert all("caBundle" not in h["clientConfig"] for h in mwc["webhooks"])
    cert = one(docs, "Certificate")
    issuer = one(docs, "Issuer")
    assert cert["metadata"]["name"] == "kubetoll-webhook" and cert["metadata"]["namespace"] == NS
    assert cert["spec"]["secretName"] == "kubetoll-webhook-tls"
    assert "kubetoll-webhook.kubetoll-system.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"] == {
        "kind": "Issuer",
        "name": issuer["metadata"]["name"],
        "group": "cert-manager.io",
    }
    assert issuer["spec"] == {"selfSigned": {}}
    deployment = one(docs, "Deployment")
    assert {"name": "webhook-tls", "secret": {"secretName": "kubetoll-webhook-tls"}} in deployment["spec"]["template"][
        "spec"
    ]["volumes"]

    docs = render(*VALUE_SETS["cert-manager-cluster-issuer"])
    assert "Issuer" not in kinds(docs)
    assert one(docs, "Certificate")["spec"]["issuerRef"] == {
        "kind": "ClusterIssuer",
        "name": "internal-ca",
        "group": "cert-manager.io",
    }


# --------------------------------------------------------------------------- RBAC


def test_rbac_is_exactly_what_the_operator_touches() -> None:
    docs = render()
    role = one(docs, "ClusterRole")
    rules = {
        (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r.get("resourceNames", ()))): sorted(r["verbs"])
        for r in role["rules"]
    }
    assert len(rules) == len(role["rules"])
    kinds4 = ("modelbackends", "modelroutes", "tokenbudgets", "cachepolicies")
    rules = {k[:2] if not k[2] else k: v for k, v in rules.items()}
    assert rules == {
        (("kubetoll.dev",), kinds4): ["get", "list", "watch"],
        (("kubetoll.dev",), tuple(f"{k}/status" for k in kinds4)): ["patch"],
        # Writes only to the two owned names; create cannot be limited by name (tests/test_least_privilege.py).
        (("",), ("secrets",)): ["get", "list", "watch"],
        # get: the ConfigMap a TokenBudget's tenantTiersFrom names (any name; list already reads them all).
        (("",), ("configmaps",)): ["get", "list", "watch"],
        # The injected pods, counted for budgetStore.expectedSidecars: never read by name, never written.
        (("",), ("pods",)): ["list", "watch"],
        # The ready replicas of the Services serviceRefs name (endpoint_slices.py): listed and watched, never read
        # by name, never written.
        (("discovery.k8s.io",), ("endpointslices",)): ["list", "watch"],
        (("",), ("configmaps",), ("kubetoll-router",)): ["delete", "get", "patch"],
        (("",), ("secrets",), ("kubetoll-credentials",)): ["delete", "patch"],
        (("",), ("configmaps", "secrets")): ["create"],
        (("",), ("events",)): ["create"],
        (("",), ("namespaces",)): ["get"],
        (("apiextensions.k8s.io",), ("customresourcedefinitions",)): ["list", "watch"],
        (("kopf.dev",), ("clusterkopfpeerings",)): ["get", "list", "patch", "watch"],
        # webhook.tls.mode=operator (the default): the caBundle of the chart's two configurations only.
        (("admissionregistration.k8s.io",), ("mutatingwebhookconfigurations",), ("kubetoll-sidecar-injector",)): [
            "get",
            "patch",
        ],
        (("admissionregistration.k8s.io",), ("validatingwebhookconfigurations",), ("kubetoll-validator",)): [
            "get",
            "patch",
        ],
    }
    flat = json.dumps(role["rules"])
    for absent in ('"*"', "pods/", "nodes"):
        assert absent not in flat
    # ... and none of that in the other modes.
    assert "webhookconfigurations" not in json.dumps(one(render("--set", "webhook.tls.mode=helm"), "ClusterRole"))
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    sa = one(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NS}]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_rbac_covers_the_api_calls_in_the_operator_code() -> None:
    """Every verb the Reconciler's KubeApi calls map to is granted (a new call without a rule fails here)."""
    source = (ROOT / "operator" / "kubetoll_operator" / "handlers.py").read_text()
    calls = set(re.findall(r"api\.(get|create|merge_patch|delete)\(", source))
    verbs = {"get": "get", "create": "create", "merge_patch": "patch", "delete": "delete"}
    role = one(render(), "ClusterRole")
    granted = {v for r in role["rules"] if "configmaps" in r["resources"] for v in r["verbs"]}
    assert {verbs[c] for c in calls} <= granted


# --------------------------------------------------------------------------- the operator Deployment


def operator_args(docs: list[dict[str, Any]]) -> list[str]:
    container = one(docs, "Deployment", "kubetoll-operator")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["kubetoll-operator"]
    return container["args"]


def parse_operator_args(args: list[str]) -> argparse.Namespace:
    """The arguments as the image's entry point (`kubetoll-operator`) parses them."""
    from kubetoll_operator.main import add_arguments

    parser = argparse.ArgumentParser(prog="kubetoll-operator")
    add_arguments(parser)
    return parser.parse_args(args)


def test_operator_deployment(tmp_path: Path) -> None:
    from kubetoll_operator.webhook import options_from_args

    docs = render()
    deployment = one(docs, "Deployment", "kubetoll-operator")
    assert deployment["spec"]["replicas"] == 2
    pod_spec = deployment["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["image"] == "ghcr.io/kubetoll/kubetoll-operator:0.1.0"
    assert pod_spec["securityContext"]["runAsNonRoot"] is True and pod_spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["tcpSocket"] == {"port": "webhook"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]

    # The flags parse with the real `kubetoll operator` parser.
    args = parse_operator_args(operator_args(docs))
    assert args.peering == "kubetoll" and not args.standalone and 1 <= args.priority < 2**31
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert args.webhook and args.webhook_port == 9443 and args.webhook_cert_dir == "/etc/kubetoll/webhook-tls"
    assert (
        args.webhook_cert_secret == "kubetoll-webhook-cert"
        and args.webhook_service == "kubetoll-webhook.kubetoll-system"
    )
    assert args.webhook_configuration == ["mutating/kubetoll-sidecar-injector", "validating/kubetoll-validator"]
    args.webhook_cert_secret = None  # below: the files of a mounted Secret (webhook.tls, cert-manager)
    (tmp_path / "tls.crt").write_text("x")
    (tmp_path / "tls.key").write_text("x")
    args.webhook_cert_dir = str(tmp_path)
    options = options_from_args(args)
    assert options is not None and options.native_sidecars == "auto" and options.on_error == "allow"
    inj = options.injection
    assert inj.image == "ghcr.io/kubetoll/kubetoll-sidecar:0.1.0" and inj.port == 7400 and inj.metrics_port == 7401
    assert (
        inj.resources.cpu_request,
        inj.resources.memory_request,
        inj.resources.cpu_limit,
        inj.resources.memory_limit,
    ) == ("100m", "192Mi", None, "512Mi")
    assert NS in inj.excluded_namespaces

    # The replicas coordinate through the ClusterKopfPeering the chart creates.
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == args.peering
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_traces_reach_every_namespace_config() -> None:
    """telemetry.otlpEndpoint: the operator's flags, then the RouterConfig every namespace's sidecars read."""
    from kubetoll_operator.compiler import compile_namespace
    from kubetoll_operator.main import telemetry_settings

    assert "--otlp-endpoint" not in " ".join(operator_args(render()))  # off by default
    docs = render(
        "--set", "telemetry.otlpEndpoint=http://otel.observability:4318", "--set-json", "telemetry.sampleRatio=0.2"
    )
    args = parse_operator_args(operator_args(docs))
    telemetry = telemetry_settings(args.otlp_endpoint, args.trace_sample_ratio)
    assert telemetry is not None and telemetry.otlp.endpoint == "http://otel.observability:4318"
    result = compile_namespace("team-a", [], telemetry=telemetry)
    assert result.config is not None and result.config.telemetry.sample_ratio == 0.2
    assert result.config.telemetry.otlp.endpoint == "http://otel.observability:4318"
    with pytest.raises(SystemExit, match="sample"):
        telemetry_settings("http://otel:4318", 1.5)


def test_single_replica_runs_standalone() -> None:
    docs = render(*VALUE_SETS["single-replica-fail-closed"])
    args = parse_operator_args(operator_args(docs))
    assert args.standalone and args.native_sidecars == "false"
    assert args.webhook_on_error == "deny"  # failurePolicy Fail: a failing webhook blocks, whichever way it fails
    assert {"ClusterKopfPeering", "PodDisruptionBudget"}.isdisjoint(kinds(docs))


def test_everything_on_parses_too() -> None:
    docs = render(*VALUE_SETS["everything"])
    args = parse_operator_args(operator_args(docs))
    assert args.verbose and args.sidecar_cpu_limit == "1" and args.sidecar_log_level == "DEBUG"
    pod_spec = one(docs, "Deployment", "kubetoll-operator")["spec"]["template"]["spec"]
    assert (
        pod_spec["imagePullSecrets"] == [{"name": "regcred"}]
        and pod_spec["priorityClassName"] == "system-cluster-critical"
    )
    assert parse_operator_args(operator_args(render(*VALUE_SETS["webhook-off"]))).webhook is False


# --------------------------------------------------------------------------- Redis


def redis_url_env(docs: list[dict[str, Any]]) -> str | None:
    container = one(docs, "Deployment", "kubetoll-operator")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}.get("KUBETOLL_REDIS_URL")


def test_redis_wiring() -> None:
    from kubetoll_core.router_config import BudgetStoreSettings

    assert redis_url_env(render()) is None
    assert redis_url_env(render(*VALUE_SETS["external-redis"])) == "rediss://redis.infra.svc:6380/2"

    docs = render(*VALUE_SETS["chart-redis"])
    url = redis_url_env(docs)
    assert url == "redis://kubetoll-redis.kubetoll-system.svc.cluster.local:6379/0"
    BudgetStoreSettings(url=url)  # what the sidecar will accept
    # The spend reporter's settings reach the operator only with a Redis to read.
    args = parse_operator_args(operator_args(docs))
    assert (args.spend_interval, args.tenants_over_budget) == (15.0, 10)
    assert "--spend-interval" not in " ".join(operator_args(render()))
    tuned = parse_operator_args(
        operator_args(
            render(
                *VALUE_SETS["external-redis"],
                "--set-json",
                "operator.spendStatus.intervalSeconds=2.5",
                "--set",
                "operator.spendStatus.tenantsOverBudget=3",
            )
        )
    )
    assert (tuned.spend_interval, tuned.tenants_over_budget) == (2.5, 3)
    redis = one(docs, "Deployment", "kubetoll-redis")
    service = one(docs, "Service", "kubetoll-redis")
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 6379
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis["spec"]["replicas"] == 1


# --------------------------------------------------------------------------- monitoring


def test_monitoring_objects() -> None:
    assert not {"PodMonitor", "PrometheusRule"} & kinds(render())
    assert not any(d["kind"] == "ConfigMap" for d in render())
    docs = render(*VALUE_SETS["monitoring"])
    pm = one(docs, "PodMonitor", "kubetoll-sidecars")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert pm["spec"]["selector"] == {"matchLabels": {"kubetoll.dev/injected": "true"}}
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "kt-metrics", "path": "/metrics", "interval": "30s"}]
    from kubetoll_operator.injection import INJECTED_KEY, METRICS_PORT_NAME

    assert INJECTED_KEY == "kubetoll.dev/injected" and METRICS_PORT_NAME == "kt-metrics"

    rule = one(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "KubetollBudgetWarning",
        "KubetollBudgetCritical",
        "KubetollHighFallbackRate",
        "KubetollHighRejectionRate",
        "KubetollConfigRefused",
        "KubetollCircuitOpen",
        "KubetollRedisErrors",
        "KubetollSemanticCacheDegraded",
        "KubetollSemanticCacheErrorRateHigh",
        "KubetollWebhookFailedOpen",
        # tests/test_least_privilege.py checks these
        "KubetollBudgetExhaustionPredicted",
        "KubetollBudgetStoreUnavailable",
        "KubetollCompileErrors",
        "KubetollReconcileFailing",
        "KubetollWebhookRejecting",
        "KubetollWebhookErrors",
    }
    for alert in alerts.values():
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}
        assert alert["labels"]["severity"] in ("warning", "critical") and alert["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", alert.get("for", "0m"))
        assert alert["expr"].count("(") == alert["expr"].count(")")
        assert "{{ $labels" in alert["annotations"]["summary"] or alert["alert"] == "KubetollWebhookFailedOpen"
    assert "kubetoll_budget_used_percent) >= 80" in alerts["KubetollBudgetWarning"]["expr"]
    assert "kubetoll_budget_used_percent) >= 95" in alerts["KubetollBudgetCritical"]["expr"]
    assert "> 0.1" in alerts["KubetollHighFallbackRate"]["expr"]
    # The webhook names the fail-open alert matches are the chart's.
    pattern = re.search(r'name=~"(.*?)"', alerts["KubetollWebhookFailedOpen"]["expr"])[1].replace("\\\\", "\\")
    for hook in one(docs, "MutatingWebhookConfiguration")["webhooks"]:
        assert re.fullmatch(pattern, hook["name"])

    dashboard_cm = one(docs, "ConfigMap", "kubetoll-dashboard")
    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard_cm["data"]["kubetoll.json"]) == json.loads(
        (CHART / "dashboards" / "kubetoll.json").read_text()
    )


def test_dashboard_panels() -> None:
    dashboard = json.loads((CHART / "dashboards" / "kubetoll.json").read_text())
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in panels.items()}
    for title, metric, by in (
        ("Spend by route (USD/h)", "kubetoll_cost_usd_total", "route"),
        ("Spend by backend (USD/h)", "kubetoll_cost_usd_total", "backend"),
        ("Spend by tier (USD/h)", "kubetoll_cost_usd_total", "tier"),
        ("Spend by workload (USD/h)", "kubetoll_cost_usd_total", "workload"),
        ("Budget remaining", "kubetoll_budget_remaining", "budget"),
        ("Cache hit rate", "kubetoll_cache_lookups_total", "route"),
        ("Cache savings (USD/h)", "kubetoll_cache_avoided_usd_total", "route"),
        ("Fallbacks (per second)", "kubetoll_fallbacks_total", "reason"),
        ("Spend by tag $tag_key (USD/h)", "kubetoll_spend_by_tag_usd_total", "value"),
        ("Outcomes reported (per hour)", "kubetoll_outcomes_total", "outcome"),
    ):
        assert metric in exprs[title] and by in exprs[title], title
    # Spend by feature: only the tag keys the platform made metric labels exist as series; the
    # variable lists those, "feature" first.
    assert 'key=~"$tag_key"' in exprs["Spend by tag $tag_key (USD/h)"]
    (tag_key,) = [v for v in dashboard["templating"]["list"] if v["name"] == "tag_key"]
    assert tag_key["definition"] == "label_values(kubetoll_spend_by_tag_usd_total, key)"
    assert tag_key["current"]["value"] == ["feature"]
    # Cost per outcome: the sessions' spend over the outcomes they reported, in the dashboard's range.
    per_outcome = exprs["Cost per outcome in range (USD)"]
    spend_part, _, count_part = per_outcome.partition(" / ")
    assert "kubetoll_outcome_spend_usd_total" in spend_part and "kubetoll_outcomes_total" in count_part
    assert spend_part.count("[$__range]") == count_part.count("[$__range]") == 1
    # No two panels overlap on the grid.
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine
    assert (
        "histogram_quantile(0.5, sum by (le) (rate(kubetoll_added_latency_seconds_bucket"
        in exprs["Added latency (router overhead)"]
    )
    assert (
        "histogram_quantile(0.99, sum by (le) (rate(kubetoll_added_latency_seconds_bucket"
        in exprs["Added latency (router overhead)"]
    )
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels.values():
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert t["expr"].count("(") == t["expr"].count(")")


# The labels Prometheus adds to every scraped series (PodMonitor target labels), plus histogram buckets.
TARGET_LABELS = {"namespace", "pod", "container", "job", "instance", "endpoint", "le"}


@lru_cache(maxsize=1)
def known_metrics() -> dict[str, set[str]]:
    """Sample name → label names, for every metric the sidecar defines."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from kubetoll_operator import metrics as operator_metrics
    from kubetoll_sidecar.cache.metrics import CacheMetrics
    from kubetoll_sidecar.metrics import Metrics

    out: dict[str, set[str]] = {}
    for holder in (Metrics(CollectorRegistry()), CacheMetrics(CollectorRegistry()), operator_metrics):
        for metric in vars(holder).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            labels = set(metric._labelnames)
            name = metric._name
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}[metric._type]
            for suffix in suffixes:
                out[name + suffix] = labels
    return out


def promql_expressions() -> list[tuple[str, str]]:
    docs = render(*VALUE_SETS["monitoring"])
    rule = one(docs, "PrometheusRule")
    out = [(f"alert {r['alert']}", r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]]
    dashboard = json.loads((CHART / "dashboards" / "kubetoll.json").read_text())
    out += [(f"panel {p['title']}", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"variable {var['name']}", var["definition"]))
    return out


def test_every_metric_the_chart_uses_exists_in_the_sidecar() -> None:
    known = known_metrics()
    for where, expr in promql_expressions():
        names = set(re.findall(r"\b((?:kubetoll|gen_ai)_[a-z0-9_]+)\b", expr))
        if not names:
            continue  # the API server's own metrics (KubetollWebhookFailedOpen)
        for name in names:
            assert name in known, (
                f"{where}: {name} is not a metric the sidecar or the operator exports "
                "(sidecar/kubetoll_sidecar/metrics.py, cache/metrics.py, operator/kubetoll_operator/metrics.py)"
            )
        labels = set().union(*(known[n] for n in names)) | TARGET_LABELS
        for selector in re.findall(r"(?:kubetoll|gen_ai)_[a-z0-9_]+\{([^}]*)\}", expr):
            for key in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector):
                assert key in labels, f"{where}: label {key} is not on {names}"
        for clause in re.findall(r"\bby \(([^)]*)\)", expr):
            for key in (k.strip() for k in clause.split(",")):
                assert key in labels, f"{where}: by ({key}) is not a label of {names}"
