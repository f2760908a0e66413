"""The operator-managed webhook certificate (webhook_cert.py), against kmock's emulator.

The operator runs for real (support/kopf_env.py) with `managed_cert`, as the
chart's default mode starts it: an empty certificate directory, the two webhook
configurations installed without caBundle. The test plays the API server: it
reads the caBundle the operator patched in and completes an AdmissionReview over
HTTPS trusting exactly that CA, checking the Service's DNS name. More replicas
are the bootstrap run again on the same emulator (same Secret, another directory).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
from cryptography import x509
from kmock._internal.references import ResourceInfo, resource

from kubetoll_operator import webhook_cert
from kubetoll_operator.injection import InjectionOptions
from kubetoll_operator.kube import KubeApi
from kubetoll_operator.webhook import WebhookOptions
from support.admission import admission_review
from support.kopf_env import eventually
from test_webhook_server import IMAGE, VERBS, app_pod, cluster, patched, start_operator  # noqa: F401

SYSTEM_NS = "kubetoll-system"
SECRET = "kubetoll-webhook-cert"
MUTATING = "kubetoll-sidecar-injector"
VALIDATING = "kubetoll-validator"
SERVICE_DNS = f"kubetoll-webhook.{SYSTEM_NS}.svc"
ADMISSION = "/apis/admissionregistration.k8s.io/v1"


def cert_options(cert_dir: Path) -> webhook_cert.CertOptions:
    return webhook_cert.CertOptions(
        secret=SECRET,
        service="kubetoll-webhook",
        namespace=SYSTEM_NS,
        configurations=(("mutating", MUTATING), ("validating", VALIDATING)),
        cert_dir=str(cert_dir),
    )


def _hook(name: str, path: str) -> dict[str, Any]:
    return {
        "name": name,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": "Ignore",
        "clientConfig": {"service": {"name": "kubetoll-webhook", "namespace": SYSTEM_NS, "path": path, "port": 443}},
    }


@pytest.fixture
async def configurations(kmock: Any, cluster: aiohttp.ClientSession) -> aiohttp.ClientSession:  # noqa: F811
    """The two configurations as the chart's default mode renders them: no caBundle."""
    for kind, plural in (
        ("MutatingWebhookConfiguration", "mutatingwebhookconfigurations"),
        ("ValidatingWebhookConfiguration", "validatingwebhookconfigurations"),
    ):
        kmock.resources[resource("admissionregistration.k8s.io", "v1", plural)] = ResourceInfo(
            kind=kind, namespaced=False, verbs=VERBS
        )
    objs = {
        "mutatingwebhookconfigurations": (
            MUTATING,
            [
                _hook("pod.sidecar-injector.kubetoll.dev", "/inject-sidecar"),
                _hook("namespace.sidecar-injector.kubetoll.dev", "/inject-sidecar-namespace"),
            ],
        ),
        "validatingwebhookconfigurations": (
            VALIDATING,
            [_hook("resources.validator.kubetoll.dev", "/validate-resources")],
        ),
    }
    for plural, (name, hooks) in objs.items():
        body = {"apiVersion": "admissionregistration.k8s.io/v1", "metadata": {"name": name}, "webhooks": hooks}
        async with cluster.post(f"{ADMISSION}/{plural}", json=body) as resp:
            assert resp.status < 300, await resp.text()
    return cluster


async def read(session: aiohttp.ClientSession, path: str) -> dict[str, Any] | None:
    async with session.get(path) as resp:
        if resp.status == 404:
            return None
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


async def ca_bundles(session: aiohttp.ClientSession) -> list[str | None]:
    out = []
    for plural, name in (("mutatingwebhookconfigurations", MUTATING), ("validatingwebhookconfigurations", VALIDATING)):
        obj = await read(session, f"{ADMISSION}/{plural}/{name}")
        assert obj is not None
        out += [w["clientConfig"].get("caBundle") for w in obj["webhooks"]]
    return out


async def secret(session: aiohttp.ClientSession) -> dict[str, Any] | None:
    return await read(session, f"/api/v1/namespaces/{SYSTEM_NS}/secrets/{SECRET}")


def api_for(kmock: Any) -> KubeApi:
    """The operator's own client, logged in as the operator is on kmock (tests/support/kopf_env.py)."""
    return KubeApi(kopf.ConnectionInfo(server=str(kmock.url).rstrip("/"), token="test-token"))


def leaf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


async def review_over_tls(webhook_port: int, ca_pem: bytes, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """As the API server calls the webhook: verifying the certificate against caBundle and the Service's name."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"https://127.0.0.1:{webhook_port}{path}", json=body, ssl=ctx, server_hostname=SERVICE_DNS
        ) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()  # type: ignore[no-any-return]


async def test_the_operator_makes_the_certificate_and_the_api_server_trusts_it(
    kmock: Any,
    configurations: aiohttp.ClientSession,
    start_operator: Any,  # noqa: F811
    port: int,
    tmp_path: Path,
) -> None:
    cert_dir = tmp_path / "webhook-tls"  # the emptyDir: nothing there before the operator starts
    assert await ca_bundles(configurations) == [None, None, None]
    await start_operator(
        WebhookOptions(
            enabled=True,
            addr="127.0.0.1",
            port=port,
            native_sidecars="false",
            injection=InjectionOptions(image=IMAGE),
            managed_cert=cert_options(cert_dir),
        )
    )

    async def patched_bundles() -> list[str | None]:
        bundles = await ca_bundles(configurations)
        assert None not in bundles and len(set(bundles)) == 1, bundles
        return bundles

    bundle = (await eventually(patched_bundles, timeout=20))[0]
    assert bundle is not None
    stored = await secret(configurations)
    assert stored is not None and stored["data"]["ca.crt"] == bundle
    ca_pem = base64.b64decode(bundle)
    assert (cert_dir / "ca.crt").read_bytes() == ca_pem
    served = leaf((cert_dir / "tls.crt").read_bytes())
    sans = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert sans == [
        "kubetoll-webhook",
        f"kubetoll-webhook.{SYSTEM_NS}",
        SERVICE_DNS,
        f"{SERVICE_DNS}.cluster.local",
    ]
    assert dt.timedelta(days=360) < served.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(days=366)

    async def injected() -> dict[str, Any]:
        pod = app_pod(labels={"kubetoll.dev/inject": "true"})
        try:
            response = (
                await review_over_tls(port, ca_pem, "/inject-sidecar", admission_review(pod, namespace="team-a"))
            )["response"]
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            raise AssertionError(f"not listening yet: {exc}") from exc
        return patched(pod, response)

    result = await eventually(injected, timeout=20)
    assert [c["name"] for c in result["spec"]["containers"]] == ["app", "kubetoll-sidecar"]

    # A client trusting any other CA is refused: the served certificate is the one behind caBundle.
    other = webhook_cert.generate_ca("someone else")[0]
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await review_over_tls(port, other, "/inject-sidecar", admission_review(app_pod(), namespace="team-a"))

    # A second replica (or a restart) reuses the CA and the serving certificate: no churn, no patch.
    patches_before = sum(1 for r in kmock if str(r.method.value).upper() == "PATCH")
    api = api_for(kmock)
    try:
        second = await webhook_cert.bootstrap(api, cert_options(tmp_path / "replica-2"))
    finally:
        await api.close()
    assert second.ca_crt == ca_pem and second.tls_crt == (cert_dir / "tls.crt").read_bytes()
    assert (tmp_path / "replica-2" / "tls.key").read_bytes() == (cert_dir / "tls.key").read_bytes()
    assert sum(1 for r in kmock if str(r.method.value).upper() == "PATCH") == patches_before
    assert (await secret(configurations)) == stored


async def test_replicas_starting_together_agree_on_one_ca(
    kmock: Any, configurations: aiohttp.ClientSession, tmp_path: Path
) -> None:
    apis = [api_for(kmock) for _ in range(2)]
    try:
        first, second = await asyncio.gather(
            *(webhook_cert.bootstrap(api, cert_options(tmp_path / f"r{i}")) for i, api in enumerate(apis))
        )
    finally:
        for api in apis:
            await api.close()
    stored = await secret(configurations)
    assert stored is not None
    # One create won; the other got 409, read the winner's Secret and serves its certificate.
    creates = [r for r in kmock if str(r.method.value).upper() == "POST" and r.resource.plural == "secrets"]
    assert len(creates) == 2
    assert first.ca_crt == second.ca_crt == base64.b64decode(stored["data"]["ca.crt"])
    assert first.tls_crt == second.tls_crt
    assert set(await ca_bundles(configurations)) == {stored["data"]["ca.crt"]}


async def test_a_serving_certificate_near_expiry_is_renewed_with_the_same_ca(
    kmock: Any, configurations: aiohttp.ClientSession, tmp_path: Path
) -> None:
    options = cert_options(tmp_path / "certs")
    ca_crt, ca_key = webhook_cert.generate_ca("kept CA")
    old_crt, old_key = webhook_cert.issue_leaf(ca_crt, ca_key, options.dns_names, validity=dt.timedelta(days=10))
    material = webhook_cert.Material(ca_crt, ca_key, old_crt, old_key)
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "data": material.secret_data()}
    async with configurations.post(f"/api/v1/namespaces/{SYSTEM_NS}/secrets", json=body) as resp:
        assert resp.status < 300
    api = api_for(kmock)
    try:
        renewed = await webhook_cert.bootstrap(api, options)
        # ... and a certificate missing one of the Service's names is renewed too.
        short_crt, short_key = webhook_cert.issue_leaf(ca_crt, ca_key, options.dns_names[:2])
        await api.merge_patch(
            f"/api/v1/namespaces/{SYSTEM_NS}/secrets/{SECRET}",
            {"data": webhook_cert.Material(ca_crt, ca_key, short_crt, short_key).secret_data()},
        )
        again = await webhook_cert.bootstrap(api, options)
    finally:
        await api.close()
    assert renewed.ca_crt == ca_crt and renewed.ca_key == ca_key
    assert renewed.tls_crt != old_crt
    assert leaf(renewed.tls_crt).not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=360)
    leaf(renewed.tls_crt).verify_directly_issued_by(leaf(ca_crt))
    stored = await secret(configurations)
    assert stored is not None
    assert base64.b64decode(stored["data"]["ca.crt"]) == ca_crt
    assert again.ca_crt == ca_crt and again.tls_crt not in (short_crt, renewed.tls_crt)
    assert (tmp_path / "certs" / "tls.crt").read_bytes() == again.tls_crt
    assert set(await ca_bundles(configurations)) == {base64.b64encode(ca_crt).decode()}


async def test_a_missing_configuration_is_a_clear_error_and_the_webhook_does_not_listen(
    kmock: Any, configurations: aiohttp.ClientSession, tmp_path: Path
) -> None:
    options = cert_options(tmp_path / "certs")
    options = webhook_cert.CertOptions(
        **{**options.__dict__, "configurations": (*options.configurations, ("mutating", "not-installed"))}
    )
    api = api_for(kmock)
    try:
        with pytest.raises(webhook_cert.CertBootstrapError, match="reading MutatingWebhookConfiguration not-installed"):
            await webhook_cert.bootstrap(api, options)
        # The server wrapper keeps retrying and never starts kopf's server meanwhile.
        from kubetoll_operator.webhook import InjectionWebhookServer

        started: list[Any] = []

        async def inner(fn: Any) -> Any:
            started.append(fn)
            yield None

        server = InjectionWebhookServer(inner, managed_cert=options, get_api=lambda: api)
        gen = server(lambda *a, **k: None).__aiter__()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(gen.__anext__(), 2.5)
        assert started == []
    finally:
        await api.close()
