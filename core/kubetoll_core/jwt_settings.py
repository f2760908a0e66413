"""Signed tenant identity (`tenancy.jwt`): the settings both planes share, and the public-key text format.

With `tenancy.jwt` set, the app passes a token signed by the platform (as the
OpenAI SDK's api_key, so it arrives as `Authorization: Bearer <token>`, or in a
header of its own) and the sidecar takes the tenant, and optionally the tier,
from its claims instead of from headers anyone in the pod could set.

`JwtVerification` is what a TokenBudget's `spec.tenant.jwt` and the compiled
RouterConfig have in common: which header, which algorithms, issuer, audience,
leeway and claim names. The two differ only in the key material: the resource
names a Secret (`hs256SecretRef`) and a ConfigMap (`publicKeysFrom`), the
RouterConfig names the credentials file (or variable) the Secret was copied to and
carries the public keys inline (`JwtIdentity`). The resource side is in
`kubetoll_operator.resources`; the verifier in `kubetoll_sidecar.jwt_identity`.

`split_public_keys` reads the public-key text (PEM blocks or a JWKS document) the
same way for the operator, which checks a ConfigMap before inlining it, and the
sidecar, which loads the keys: private key material is refused outright, so a
private key pasted into a ConfigMap never reaches a RouterConfig.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import Field, field_validator, model_validator

from .model_base import ContractModel
from .names import HEADER_NAME_PATTERN

# The HS256 secret's key in kubetoll-credentials (and file name under credentialsDir). Fixed, and
# without "_", so it never collides with a backend's "<secret>_<key>" or the store's redis-* keys.
HS256_SECRET_FILE = "jwt-hs256-key"
# RFC 7518 3.2: an HS256 key shorter than the hash output (32 bytes) is refused.
MIN_HS256_SECRET_BYTES = 32
MAX_PUBLIC_KEYS_CHARS = 256 * 1024
MAX_PUBLIC_KEYS = 64


class JwtAlgorithm(str, Enum):
    """A signature algorithm the sidecar verifies. `none` is not one: an unsigned token is never accepted."""

    hs256 = "HS256"
    rs256 = "RS256"
    es256 = "ES256"


ASYMMETRIC = (JwtAlgorithm.rs256, JwtAlgorithm.es256)
# The key type (JWK `kty`) each asymmetric algorithm verifies with.
KEY_TYPE = {JwtAlgorithm.rs256: "RSA", JwtAlgorithm.es256: "EC"}


class JwtVerification(ContractModel):
    """How a token is found and checked, and which claims name the tenant and the tier."""

    required: bool = Field(
        False,
        description=(
            "Refuse (401) a request that carries no token. Either way a token that does not verify is refused; "
            "off, a request without one is identified as it would be without jwt (tenant header, `user`)."
        ),
    )
    header: str = Field(
        "authorization",
        max_length=256,
        pattern=HEADER_NAME_PATTERN,
        description=(
            "Request header carrying the token: authorization as `Bearer <token>` (what the OpenAI SDKs send their "
            "api_key as, so an app passes its token as the API key), or a header of your own holding the token."
        ),
    )
    algorithms: list[JwtAlgorithm] = Field(
        min_length=1,
        max_length=3,
        description=(
            "Signature algorithms accepted: HS256, RS256, ES256. A token signed with any other (none included) is "
            "refused."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    issuer: str | None = Field(
        None, min_length=1, max_length=1024, description="The `iss` claim a token must carry; unset: not checked."
    )
    audience: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="A value the token's `aud` claim must hold; unset: a token that carries an `aud` is refused.",
    )
    leeway_seconds: int = Field(
        30, ge=0, le=300, description="Clock skew allowed when checking `exp` and `nbf`, in seconds."
    )
    tenant_claim: str = Field(
        "sub", min_length=1, max_length=256, description="The claim holding the tenant id (a string)."
    )
    tier_claim: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description=(
            "The claim holding the tier, trusted since the platform signed it (a tier no budget defines counts as "
            "the default tier); unset: the tier comes from the tier header."
        ),
    )

    @field_validator("algorithms")
    @classmethod
    def _unique(cls, v: list[JwtAlgorithm]) -> list[JwtAlgorithm]:
        if len(set(v)) != len(v):
            raise ValueError("algorithms must be unique")
        return v


class JwtIdentity(JwtVerification):
    """`tenancy.jwt` in the RouterConfig: the verification settings and where the key material is."""

    hs256_secret_file: str | None = Field(
        None,
        description=f"File under server.credentialsDir holding the HS256 secret (the operator's: {HS256_SECRET_FILE}).",
    )
    hs256_secret_env: str | None = Field(
        None, description="Environment variable holding the HS256 secret (kubetoll run)."
    )
    public_keys: str | None = Field(
        None,
        max_length=MAX_PUBLIC_KEYS_CHARS,
        description="PEM public keys or a JWKS document for RS256 and ES256 (public: the operator inlines them).",
    )
    unavailable: str | None = Field(
        None,
        max_length=1024,
        description=(
            "Why key material the algorithms need is missing (a reference the operator could not resolve): a token "
            "that needs it gets 503, and with `required` so does every request without one."
        ),
    )

    @field_validator("hs256_secret_file")
    @classmethod
    def _plain_file(cls, v: str | None) -> str | None:
        if v is not None and ("/" in v or v.startswith(".") or not v):
            raise ValueError("hs256SecretFile must be a plain file name inside credentialsDir")
        return v

    @field_validator("public_keys")
    @classmethod
    def _keys_parse(cls, v: str | None) -> str | None:
        if v is not None:
            split_public_keys(v)
        return v

    @model_validator(mode="after")
    def _material(self) -> JwtIdentity:
        if self.hs256_secret_file is not None and self.hs256_secret_env is not None:
            raise ValueError("set at most one of hs256SecretFile or hs256SecretEnv")
        if self.unavailable is None:
            if (
                JwtAlgorithm.hs256 in self.algorithms
                and self.hs256_secret_file is None
                and self.hs256_secret_env is None
            ):
                raise ValueError("algorithm HS256 needs hs256SecretFile or hs256SecretEnv")
            if any(a in self.algorithms for a in ASYMMETRIC) and self.public_keys is None:
                raise ValueError("algorithms RS256 and ES256 need publicKeys")
        return self


# --------------------------------------------------------------------------- public-key text


@dataclass(frozen=True)
class PublicKeyText:
    """One public key as written: a PEM block, or a JWK (an RSA or EC public key)."""

    kid: str | None
    pem: str | None = None
    jwk: dict[str, Any] | None = None

    @property
    def key_type(self) -> str | None:
        """`RSA` or `EC` for a JWK; None for PEM (known only once the key is loaded)."""
        return str(self.jwk["kty"]) if self.jwk is not None else None


_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)
# JWK members that only a private or symmetric key has (RFC 7518 6.2.2, 6.3.2, 6.4.1).
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


def split_public_keys(text: str) -> list[PublicKeyText]:
    """The keys of PEM text (`-----BEGIN PUBLIC KEY-----` blocks) or of a JWKS document (or one JWK).

    Structure only (the cryptography is the loader's): ValueError with what is wrong and,
    for a JWK, its index and kid; never the key material itself.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        return _jwks(stripped)
    if "PRIVATE KEY-----" in stripped:
        raise ValueError("the keys hold a PEM private key: publish only the public keys (openssl pkey -pubout)")
    keys: list[PublicKeyText] = []
    for label, body in _PEM_BLOCK.findall(stripped):
        if label not in ("PUBLIC KEY", "RSA PUBLIC KEY"):
            raise ValueError(f"a PEM block labelled {label!r}: only PUBLIC KEY blocks are public keys")
        try:
            base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"PEM block {len(keys)} is not base64") from None
        keys.append(PublicKeyText(None, pem=f"-----BEGIN {label}-----{body}-----END {label}-----\n"))
    if not keys:
        raise ValueError('neither PEM public keys (-----BEGIN PUBLIC KEY-----) nor a JWKS document ({"keys": [...]})')
    if len(keys) > MAX_PUBLIC_KEYS:
        raise ValueError(f"more than {MAX_PUBLIC_KEYS} public keys")
    return keys


def _jwks(text: str) -> list[PublicKeyText]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the JWKS document is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise ValueError("a JWKS document is a JSON object")
    items = doc.get("keys") if "keys" in doc else [doc]
    if not isinstance(items, list) or not items:
        raise ValueError("the JWKS document's `keys` must be a non-empty list")
    if len(items) > MAX_PUBLIC_KEYS:
        raise ValueError(f"more than {MAX_PUBLIC_KEYS} public keys")
    out = []
    kids: set[str] = set()
    for i, jwk in enumerate(items):
        if not isinstance(jwk, dict):
            raise ValueError(f"JWKS key {i} is not an object")
        kid = jwk.get("kid")
        where = f"JWKS key {i}" + (f" (kid {kid!r})" if isinstance(kid, str) else "")
        if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > 256):
            raise ValueError(f"{where}: kid must be a string of 1 to 256 characters")
        if kid is not None:
            if kid in kids:
                raise ValueError(f"{where}: two keys with one kid")
            kids.add(kid)
        private = [m for m in _PRIVATE_MEMBERS if m in jwk]
        if private:
            raise ValueError(
                f"{where} holds private or symmetric key material ({', '.join(private)}): publish only public keys"
            )
        kty = jwk.get("kty")
        needed: tuple[str, ...]
        if kty == "RSA":
            needed = ("n", "e")
        elif kty == "EC":
            needed = ("crv", "x", "y")
            if jwk.get("crv") != "P-256":
                raise ValueError(f"{where}: only the EC curve P-256 (ES256) is supported")
        else:
            raise ValueError(f"{where}: kty must be RSA or EC (public keys), not {str(kty)[:16]!r}")
        missing = [m for m in needed if not isinstance(jwk.get(m), str) or not jwk.get(m)]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        if jwk.get("use", "sig") != "sig":
            raise ValueError(f"{where}: use must be sig")
        out.append(PublicKeyText(kid, jwk=dict(jwk)))
    return out
