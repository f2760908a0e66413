"""The chart's validating webhook and its certificate modes, with the real helm binary.

The ValidatingWebhookConfiguration: its rules, path, service and caBundle (the
mutating webhook's), its failurePolicy and the operator flag that goes with it.
The certificate: with webhook.tls (a Secret made elsewhere, or cert and key
given as values) or cert-manager, two `helm template` runs render byte for byte
the same manifests, as GitOps tools need; the generated default does not (shown
here, so the comparison is known to catch it). The values-supplied certificate
is then served by the operator's own webhook server and trusted through the
rendered caBundle, answering a real validation review.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import trustme
import yaml
from kubernetes_validate.utils import latest_version

from kubetoll_operator.webhook import VALIDATE_WEBHOOK_ID, WebhookOptions, build_server
from support.admission import resource_review
from support.helm import helm
from test_chart import CHART, NS, OLDEST_KUBERNETES, RELEASE, kinds, one, operator_args, parse_operator_args, render

SERVICE_NAME = f"{RELEASE}-webhook.{NS}.svc"  # what the API server calls


def template(*args: str) -> str:
    """One fresh `helm template` run (test_chart's render() caches, which would hide a difference)."""
    return helm("template", RELEASE, str(CHART), "--namespace", NS, *args).stdout


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a serving certificate made outside the chart, as PEM files for `--set-file`."""
    ca = trustme.CA()
    cert = ca.issue_cert(SERVICE_NAME, f"{RELEASE}-webhook.{NS}", "127.0.0.1")
    d = tmp_path_factory.mktemp("webhook-pki")
    files = {"ca": d / "ca.crt", "cert": d / "tls.crt", "key": d / "tls.key"}
    files["ca"].write_bytes(ca.cert_pem.bytes())
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    files["key"].write_bytes(cert.private_key_pem.bytes())
    return files


def given_cert(issued: dict[str, Path]) -> list[str]:
    return [
        "--set-file",
        f"webhook.tls.cert={issued['cert']}",
        "--set-file",
        f"webhook.tls.key={issued['key']}",
        "--set-file",
        f"webhook.tls.caBundle={issued['ca']}",
    ]


def existing_secret(issued: dict[str, Path]) -> list[str]:
    return ["--set", "webhook.tls.existingSecret=webhook-serving", "--set-file", f"webhook.tls.caBundle={issued['ca']}"]


def validator(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (hook,) = one(docs, "ValidatingWebhookConfiguration", f"{RELEASE}-validator")["webhooks"]
    return hook


def test_validating_webhook_configuration() -> None:
    docs = render()
    vwc = one(docs, "ValidatingWebhookConfiguration", f"{RELEASE}-validator")
    for version in (OLDEST_KUBERNETES, latest_version()):
        kubernetes_validate.validate(vwc, version, strict=True)
    hook = validator(docs)
    assert hook["name"] == "resources.validator.kubetoll.dev"
    assert hook["rules"] == [
        {
            "operations": ["CREATE", "UPDATE"],  # never DELETE: removing an object never waits on the operator
            "apiGroups": ["kubetoll.dev"],
            "apiVersions": ["v1alpha1"],
            "resources": ["modelbackends", "modelroutes", "tokenbudgets", "cachepolicies"],
            "scope": "Namespaced",
        }
    ]
    # The four kinds are the CRDs' plurals.
    crd_plurals = {
        doc["spec"]["names"]["plural"]
        for f in (CHART / "crds").glob("*.yaml")
        for doc in yaml.safe_load_all(f.read_text())
        if doc and doc["spec"]["group"] == "kubetoll.dev"
    }
    assert set(hook["rules"][0]["resources"]) == crd_plurals
    assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
    assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 10
    # The same service and CA as the injection webhooks, on the path the operator answers.
    mutating = one(docs, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]
    assert hook["clientConfig"]["service"] == {**mutating["service"], "path": f"/{VALIDATE_WEBHOOK_ID}"}
    # The default (webhook.tls.mode=operator): no caBundle, the operator patches it in (tests/test_webhook_cert.py).
    assert "caBundle" not in hook["clientConfig"] and "caBundle" not in mutating
    helm_docs = render("--set", "webhook.tls.mode=helm")
    mutating = one(helm_docs, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]
    assert validator(helm_docs)["clientConfig"]["caBundle"] == mutating["caBundle"]
    assert one(helm_docs, "Secret", f"{RELEASE}-webhook-tls")["data"]["ca.crt"] == mutating["caBundle"]
    assert "--validate-on-error=allow" in operator_args(docs)
    assert parse_operator_args(operator_args(docs)).validate_on_error == "allow"


def test_validation_values() -> None:
    docs = render("--set", "webhook.validation.failurePolicy=Fail", "--set", "webhook.validation.timeoutSeconds=5")
    hook = validator(docs)
    assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 5
    # A failure inside the checks is answered as the failure policy answers an unreachable webhook.
    assert parse_operator_args(operator_args(docs)).validate_on_error == "deny"
    # The injection webhook keeps its own policy.
    assert {h["failurePolicy"] for h in one(docs, "MutatingWebhookConfiguration")["webhooks"]} == {"Ignore"}
    assert "ValidatingWebhookConfiguration" not in kinds(render("--set", "webhook.validation.enabled=false"))
    assert "ValidatingWebhookConfiguration" not in kinds(render("--set", "webhook.enabled=false"))
    docs = render("--set", "webhook.certManager.enabled=true")
    vwc = one(docs, "ValidatingWebhookConfiguration")
    assert vwc["metadata"]["annotations"] == {"cert-manager.io/inject-ca-from": f"{NS}/{RELEASE}-webhook"}
    assert "caBundle" not in validator(docs)["clientConfig"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "webhook.tls.existingSecret=mine"], "webhook.tls.caBundle is required"),
        (["--set", "webhook.tls.cert=abc"], "webhook.tls.cert needs webhook.tls.key"),
        (["--set", "webhook.tls.key=abc"], "webhook.tls.key needs webhook.tls.cert"),
        (
            ["--set", "webhook.tls.existingSecret=a", "--set", "webhook.tls.cert=b", "--set", "webhook.tls.key=c"],
            "exclude each other",
        ),
        (["--set", "webhook.certManager.enabled=true", "--set", "webhook.tls.existingSecret=a"], "exclude each other"),
        (["--set", "webhook.validation.failurePolicy=Sometimes"], "failurePolicy"),
        (["--set", "webhook.tls.secret=a"], "secret"),
    ],
)
def test_bad_tls_and_validation_values_are_refused(values: list[str], message: str) -> None:
    result = helm("template", RELEASE, str(CHART), "--namespace", NS, *values, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


@pytest.mark.parametrize("mode", ["operator", "cert-values", "existing-secret", "cert-manager"])
def test_repeated_helm_template_renders_the_same_certificate(mode: str, issued: dict[str, Path]) -> None:
    args = {
        "cert-values": given_cert(issued),
        "existing-secret": existing_secret(issued),
        "cert-manager": ["--set", "webhook.certManager.enabled=true"],
        "operator": [],  # the default
    }[mode]
    first, second = template(*args), template(*args)
    assert first == second  # every manifest, not just the webhook's
    assert "0 chart(s) failed" in helm("lint", str(CHART), "--strict", "--namespace", NS, *args).stdout
    docs = [d for d in yaml.safe_load_all(first) if d]
    if mode == "operator":
        # No certificate material at all: the operator makes it at start-up.
        assert "-----BEGIN" not in first and "caBundle:" not in first
        assert [d for d in docs if d["kind"] == "Secret"] == []
        for hook in [*one(docs, "MutatingWebhookConfiguration")["webhooks"], validator(docs)]:
            assert "caBundle" not in hook["clientConfig"]
    elif mode != "cert-manager":
        ca_b64 = base64.b64encode(issued["ca"].read_bytes()).decode()
        for hook in [*one(docs, "MutatingWebhookConfiguration")["webhooks"], validator(docs)]:
            assert hook["clientConfig"]["caBundle"] == ca_b64
    volumes = one(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["volumes"]
    (tls_volume,) = [v for v in volumes if v["name"] == "webhook-tls"]
    if mode == "operator":
        assert tls_volume == {"name": "webhook-tls", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
    if mode == "existing-secret":
        # The chart makes no Secret and mounts the one named.
        assert [d for d in docs if d["kind"] == "Secret" and "webhook" in d["metadata"]["name"]] == []
        assert tls_volume["secret"]["secretName"] == "webhook-serving"
    if mode == "cert-values":
        data = one(docs, "Secret", f"{RELEASE}-webhook-tls")["data"]
        assert base64.b64decode(data["tls.crt"]) == issued["cert"].read_bytes()
        assert base64.b64decode(data["tls.key"]) == issued["key"].read_bytes()
        assert base64.b64decode(data["ca.crt"]) == issued["ca"].read_bytes()
        assert tls_volume["secret"]["secretName"] == f"{RELEASE}-webhook-tls"


def test_the_helm_generated_mode_changes_on_every_helm_template() -> None:
    """Why the default is the operator's: `lookup` finds nothing under `helm template`, so each render makes a new CA."""
    first, second = (
        yaml.safe_load_all(template("--show-only", "templates/webhook.yaml", "--set", "webhook.tls.mode=helm"))
        for _ in range(2)
    )
    ca = [validator([d for d in docs if d])["clientConfig"]["caBundle"] for docs in (first, second)]
    assert ca[0] != ca[1]


def test_pem_or_base64_values_render_alike(issued: dict[str, Path]) -> None:
    b64 = {k: base64.b64encode(p.read_bytes()).decode() for k, p in issued.items()}
    as_base64 = template(
        "--set",
        f"webhook.tls.cert={b64['cert']}",
        "--set",
        f"webhook.tls.key={b64['key']}",
        "--set",
        f"webhook.tls.caBundle={b64['ca']}",
    )
    assert as_base64 == template(*given_cert(issued))


async def test_the_operator_serves_the_values_certificate(issued: dict[str, Path], tmp_path: Path) -> None:
    """The Secret from webhook.tls, served by the operator, trusted through the rendered caBundle, as the API server does."""
    docs = render(*given_cert(issued))
    for key, value in one(docs, "Secret", f"{RELEASE}-webhook-tls")["data"].items():
        (tmp_path / key).write_bytes(base64.b64decode(value))
    hook = validator(docs)
    context = ssl.create_default_context(cadata=base64.b64decode(hook["clientConfig"]["caBundle"]).decode())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = build_server(WebhookOptions(enabled=True, addr="127.0.0.1", port=port, cert_dir=str(tmp_path)))

    async def kopf_dispatch(request: dict[str, Any], **_: Any) -> dict[str, Any]:
        raise AssertionError("the validating path is answered before kopf's dispatch")

    async def serve() -> None:
        async for _ in server(kopf_dispatch):
            pass

    budget = {
        "apiVersion": "kubetoll.dev/v1alpha1",
        "kind": "TokenBudget",
        "metadata": {"name": "chat-budget", "namespace": "team-a"},
        "spec": {"routes": ["chat"], "timezone": "Europe/Berln", "cap": {"usdPerDay": 5}},
    }
    async with server:
        task = asyncio.create_task(serve())
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(200):
                    try:
                        async with session.post(
                            f"https://127.0.0.1:{port}{hook['clientConfig']['service']['path']}",
                            json=resource_review(copy.deepcopy(budget), namespace="team-a"),
                            ssl=context,
                            server_hostname=SERVICE_NAME,
                        ) as resp:
                            assert resp.status == 200, await resp.text()
                            answer = await resp.json()
                        break
                    except aiohttp.ClientConnectorError:
                        await asyncio.sleep(0.05)
            response = answer["response"]
            assert response["allowed"] is False and response["status"]["code"] == 422
            causes = response["status"]["details"]["causes"]
            assert [c["field"] for c in causes] == ["spec.timezone"], causes
            assert "spec.timezone: unknown timezone 'Europe/Berln'" in response["status"]["message"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
