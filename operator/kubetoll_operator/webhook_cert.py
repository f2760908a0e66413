"""The webhook's serving certificate, made and kept by the operator (the chart's default, `webhook.tls.mode: operator`).

Why: a certificate Helm generates is new on every `helm template` (no `lookup`
there), so GitOps tools see a diff on every sync. As Kyverno's and Gatekeeper's
cert-controllers do, the operator owns it instead, and the chart renders no
certificate material at all:

1. read the Secret `--webhook-cert-secret` in the webhook Service's namespace
   (ca.crt, ca.key, tls.crt, tls.key);
2. absent: generate a CA (10 years) and a serving certificate (1 year, ECDSA
   P-256) for the Service's DNS names and create the Secret; a 409 means another
   replica created it first: read that one (both replicas then serve its CA);
3. present: reuse its CA; a serving certificate that expires within 30 days,
   is not signed by that CA or does not name every DNS name of the Service is
   renewed with the same CA (a merge patch with the Secret's resourceVersion, so
   two replicas renewing at once cannot interleave: the loser re-reads);
4. write tls.crt, tls.key and ca.crt into the webhook's certificate directory
   (an emptyDir), which kopf's server reads and re-reads when they change;
5. set `clientConfig.caBundle` in every webhook of the named Mutating- and
   ValidatingWebhookConfigurations: read each, patch its whole `webhooks` list
   with only caBundle changed (a JSON merge patch replaces lists), skipped when
   it already holds the CA.

All of it runs before the webhook server listens (`InjectionWebhookServer`), so
the chart's readiness probe (the webhook port) fails until the API server
trusts the certificate; a failing step is logged with the step and the object
and retried. Afterwards it runs again every few hours, to renew in time and to
pick up what another replica renewed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .kube import ApiError

log = logging.getLogger("kubetoll.webhook.cert")

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)
CHECK_INTERVAL_SECONDS = 6 * 3600.0
RETRY_MAX_SECONDS = 30.0
CONFIGURATION_KINDS = {
    "mutating": ("MutatingWebhookConfiguration", "mutatingwebhookconfigurations"),
    "validating": ("ValidatingWebhookConfiguration", "validatingwebhookconfigurations"),
}
ADMISSION_API = "/apis/admissionregistration.k8s.io/v1"
OWNER_LABEL = {"app.kubernetes.io/managed-by": "kubetoll-operator"}


class CertBootstrapError(Exception):
    """A step of the bootstrap failed; the message names the step and the object."""


@dataclass(frozen=True)
class CertOptions:
    secret: str  # the Secret's name, in the Service's namespace
    service: str  # the webhook Service's name
    namespace: str  # the Service's (and the operator's) namespace
    configurations: tuple[tuple[str, str], ...]  # ("mutating" | "validating", name)
    cert_dir: str
    cluster_domain: str = "cluster.local"

    @property
    def dns_names(self) -> tuple[str, ...]:
        s, ns = self.service, self.namespace
        return (s, f"{s}.{ns}", f"{s}.{ns}.svc", f"{s}.{ns}.svc.{self.cluster_domain}")


def parse_configuration(text: str) -> tuple[str, str]:
    """`mutating/NAME` or `validating/NAME`, as `--webhook-configuration` takes it."""
    kind, sep, name = text.partition("/")
    if not sep or kind not in CONFIGURATION_KINDS or not name:
        raise ValueError(f"{text!r} is not mutating/NAME or validating/NAME")
    return kind, name


def parse_service(text: str) -> tuple[str, str]:
    """`NAME.NAMESPACE`, as `--webhook-service` takes it."""
    name, sep, namespace = text.partition(".")
    if not sep or not name or not namespace or "." in namespace:
        raise ValueError(f"{text!r} is not NAME.NAMESPACE")
    return name, namespace


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Material:
    """PEM bytes, as the Secret and the certificate directory hold them."""

    ca_crt: bytes
    ca_key: bytes
    tls_crt: bytes
    tls_key: bytes

    def secret_data(self) -> dict[str, str]:
        return {
            k: base64.b64encode(v).decode()
            for k, v in (
                ("ca.crt", self.ca_crt),
                ("ca.key", self.ca_key),
                ("tls.crt", self.tls_crt),
                ("tls.key", self.tls_key),
            )
        }

    @classmethod
    def from_secret(cls, secret: dict[str, Any]) -> Material:
        data = secret.get("data") or {}
        missing = [k for k in ("ca.crt", "ca.key", "tls.crt", "tls.key") if not data.get(k)]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        return cls(*(base64.b64decode(data[k]) for k in ("ca.crt", "ca.key", "tls.crt", "tls.key")))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def generate_ca(common_name: str, now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # clock skew between nodes
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_leaf(
    ca_crt: bytes, ca_key: bytes, dns_names: tuple[str, ...], now: dt.datetime | None = None, validity: Any = None
) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or _now()
    ca = x509.load_pem_x509_certificate(ca_crt)
    signer = serialization.load_pem_private_key(ca_key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + (validity or LEAF_VALIDITY), ca.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[min(2, len(dns_names) - 1)])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)  # type: ignore[arg-type]
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def ca_problem(m: Material, now: dt.datetime) -> str | None:
    """Why the CA cannot be kept, or None."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        ca = x509.load_pem_x509_certificate(m.ca_crt)
        key = serialization.load_pem_private_key(m.ca_key, password=None)
    except ValueError as exc:
        return f"the CA does not parse ({exc})"
    if key.public_key().public_numbers() != ca.public_key().public_numbers():  # type: ignore[union-attr]
        return "ca.key is not the CA's key"
    if ca.not_valid_after_utc - now < RENEW_BEFORE:
        return f"the CA expires {ca.not_valid_after_utc:%Y-%m-%d}"
    return None


def leaf_problem(m: Material, dns_names: tuple[str, ...], now: dt.datetime) -> str | None:
    """Why the serving certificate must be renewed, or None."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        leaf = x509.load_pem_x509_certificate(m.tls_crt)
        key = serialization.load_pem_private_key(m.tls_key, password=None)
        ca = x509.load_pem_x509_certificate(m.ca_crt)
    except ValueError as exc:
        return f"it does not parse ({exc})"
    if key.public_key().public_numbers() != leaf.public_key().public_numbers():  # type: ignore[union-attr]
        return "tls.key is not its key"
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature is no ValueError
        return f"it is not signed by the CA ({type(exc).__name__})"
    if leaf.not_valid_after_utc - now < RENEW_BEFORE:
        return f"it expires {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    try:
        sans = set(
            leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        )
    except x509.ExtensionNotFound:
        sans = set()
    missing = [n for n in dns_names if n not in sans]
    if missing:
        return f"it does not name {', '.join(missing)}"
    return None


def new_material(options: CertOptions, now: dt.datetime) -> Material:
    ca_crt, ca_key = generate_ca(f"{options.service}.{options.namespace} webhook CA", now)
    tls_crt, tls_key = issue_leaf(ca_crt, ca_key, options.dns_names, now)
    return Material(ca_crt, ca_key, tls_crt, tls_key)


# --------------------------------------------------------------------------- the API steps


def _secret_path(options: CertOptions, name: bool = True) -> str:
    base = f"/api/v1/namespaces/{options.namespace}/secrets"
    return f"{base}/{options.secret}" if name else base


async def _read_secret(api: Any, options: CertOptions) -> dict[str, Any] | None:
    try:
        return await api.get(_secret_path(options))
    except ApiError as exc:
        raise CertBootstrapError(f"reading Secret {options.namespace}/{options.secret}: {exc}") from exc


async def ensure_secret(api: Any, options: CertOptions, now: dt.datetime | None = None) -> Material:
    """The Secret's certificate, created or renewed as needed (module docstring, steps 1-3)."""
    where = f"Secret {options.namespace}/{options.secret}"
    for _attempt in range(5):  # conflicts with another replica: each round re-reads
        now = now or _now()
        secret = await _read_secret(api, options)
        if secret is None:
            material = new_material(options, now)
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",  # not kubernetes.io/tls: it also holds ca.key
                "metadata": {"name": options.secret, "namespace": options.namespace, "labels": OWNER_LABEL},
                "data": material.secret_data(),
            }
            try:
                await api.create(_secret_path(options, name=False), body)
            except ApiError as exc:
                if exc.status == 409:  # another replica created it first: use that one
                    log.info("%s was created by another replica; reading it", where)
                    continue
                raise CertBootstrapError(f"creating {where}: {exc}") from exc
            log.info("created %s with a new CA and a serving certificate for %s", where, ", ".join(options.dns_names))
            return material
        try:
            material = Material.from_secret(secret)
            problem = ca_problem(material, now)
        except ValueError as exc:
            problem = f"it holds no usable CA ({exc})"
        if problem is not None:
            log.warning("%s: %s: replacing the CA and the serving certificate", where, problem)
            material = new_material(options, now)
        else:
            leaf = leaf_problem(material, options.dns_names, now)
            if leaf is None:
                return material
            log.info("%s: renewing the serving certificate with the same CA: %s", where, leaf)
            tls_crt, tls_key = issue_leaf(material.ca_crt, material.ca_key, options.dns_names, now)
            material = Material(material.ca_crt, material.ca_key, tls_crt, tls_key)
        patch: dict[str, Any] = {"data": material.secret_data()}
        version = (secret.get("metadata") or {}).get("resourceVersion")
        if version:  # optimistic concurrency: a replica that renewed meanwhile makes this a 409
            patch["metadata"] = {"resourceVersion": version}
        try:
            await api.merge_patch(_secret_path(options), patch)
        except ApiError as exc:
            if exc.status in (404, 409):
                continue
            raise CertBootstrapError(f"patching {where}: {exc}") from exc
        return material
    raise CertBootstrapError(f"{where}: still conflicting with another writer after 5 attempts")


def write_cert_dir(cert_dir: str, material: Material) -> bool:
    """Write the three files the webhook server reads; False when they already hold this certificate."""
    d = Path(cert_dir)
    d.mkdir(parents=True, exist_ok=True)
    files = {"ca.crt": material.ca_crt, "tls.key": material.tls_key, "tls.crt": material.tls_crt}
    if all((d / n).is_file() and (d / n).read_bytes() == v for n, v in files.items()):
        return False
    for name, value in files.items():  # the key before the certificate: kopf re-reads on tls.crt's change
        tmp = d / f".{name}.tmp"
        tmp.write_bytes(value)
        if name.endswith(".key"):
            os.chmod(tmp, 0o600)
        os.replace(tmp, d / name)  # atomic: the server never reads half a file
    return True


async def patch_ca_bundles(api: Any, options: CertOptions, ca_crt: bytes) -> list[str]:
    """Set caBundle in every webhook of the named configurations; the ones it changed."""
    bundle = base64.b64encode(ca_crt).decode()
    changed = []
    for kind, name in options.configurations:
        title, plural = CONFIGURATION_KINDS[kind]
        path = f"{ADMISSION_API}/{plural}/{name}"
        for _attempt in range(5):
            try:
                obj = await api.get(path)
            except ApiError as exc:
                raise CertBootstrapError(f"reading {title} {name}: {exc}") from exc
            if obj is None:
                raise CertBootstrapError(
                    f"reading {title} {name}: not found (the chart installs it; --webhook-configuration names it)"
                )
            webhooks = obj.get("webhooks") or []
            if all((w.get("clientConfig") or {}).get("caBundle") == bundle for w in webhooks):
                break
            new = [{**w, "clientConfig": {**(w.get("clientConfig") or {}), "caBundle": bundle}} for w in webhooks]
            patch: dict[str, Any] = {"webhooks": new}
            version = (obj.get("metadata") or {}).get("resourceVersion")
            if version:  # the whole list is replaced: an edit made since the read must not be lost
                patch["metadata"] = {"resourceVersion": version}
            try:
                await api.merge_patch(path, patch)
            except ApiError as exc:
                if exc.status == 409:
                    continue
                raise CertBootstrapError(f"patching caBundle of {title} {name}: {exc}") from exc
            changed.append(f"{title} {name}")
            break
        else:
            raise CertBootstrapError(f"patching caBundle of {title} {name}: still conflicting after 5 attempts")
    return changed


async def bootstrap(api: Any, options: CertOptions, now: dt.datetime | None = None) -> Material:
    """One pass of the whole bootstrap (module docstring, steps 1-5)."""
    if api is None:
        raise CertBootstrapError("no API client: the operator has not logged in")
    material = await ensure_secret(api, options, now)
    if write_cert_dir(options.cert_dir, material):
        log.info("wrote the serving certificate to %s", options.cert_dir)
    changed = await patch_ca_bundles(api, options, material.ca_crt)
    if changed:
        log.info("set the caBundle of %s", ", ".join(changed))
    return material


async def bootstrap_until_done(get_api: Any, options: CertOptions) -> Material:
    """`bootstrap`, retried (with a growing pause) until it succeeds: the webhook does not listen before."""
    delay = 1.0
    while True:
        try:
            return await bootstrap(get_api(), options)
        except CertBootstrapError as exc:
            log.error("webhook certificate: %s; not serving the webhook yet, retrying in %.0fs", exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_SECONDS)


async def keep_renewed(get_api: Any, options: CertOptions, interval: float = CHECK_INTERVAL_SECONDS) -> None:
    """Re-run the bootstrap now and then: renews in time, adopts what another replica renewed."""
    while True:
        await asyncio.sleep(interval)
        try:
            await bootstrap(get_api(), options)
        except CertBootstrapError as exc:  # the files on disk still serve until they expire
            log.error("webhook certificate check: %s; retrying in %.0fs", exc, interval)


__all__ = [
    "CertBootstrapError",
    "CertOptions",
    "Material",
    "bootstrap",
    "bootstrap_until_done",
    "ensure_secret",
    "issue_leaf",
    "keep_renewed",
    "parse_configuration",
    "parse_service",
    "patch_ca_bundles",
    "write_cert_dir",
]
