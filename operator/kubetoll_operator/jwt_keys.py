"""The public keys of `spec.tenant.jwt.publicKeysFrom`, checked before the compiler inlines them.

The operator puts the ConfigMap's text into the RouterConfig as it is (public
keys are public, and inline they reach the sidecars in the same atomic config
swap as the algorithms and issuer they belong to). So it checks here what the
sidecar will do with them (`kubetoll_sidecar.jwt_identity.load_public_keys`):
the text splits into public keys (`kubetoll_core.jwt_settings`, which refuses
private key material), every key loads, RSA keys have at least 2048 bits, EC
keys are on P-256, and each asymmetric algorithm listed has a key of its kind.
A ConfigMap that fails is reported on the budget instead of reaching a sidecar,
which would refuse the whole config.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kubetoll_core.jwt_settings import ASYMMETRIC, KEY_TYPE, MAX_PUBLIC_KEYS_CHARS, JwtAlgorithm, split_public_keys

MIN_RSA_BITS = 2048


def _b64url_int(value: str) -> int:
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    return int.from_bytes(raw, "big")


def _load(pem: str | None, jwk: dict[str, Any] | None) -> Any:
    if pem is not None:
        return serialization.load_pem_public_key(pem.encode())
    assert jwk is not None
    if jwk["kty"] == "RSA":
        return rsa.RSAPublicNumbers(_b64url_int(jwk["e"]), _b64url_int(jwk["n"])).public_key()
    return ec.EllipticCurvePublicNumbers(_b64url_int(jwk["x"]), _b64url_int(jwk["y"]), ec.SECP256R1()).public_key()


def check_public_keys(text: str, algorithms: Iterable[JwtAlgorithm]) -> int:
    """How many keys the text holds; ValueError naming the first key (by index and kid) that is not usable."""
    if len(text) > MAX_PUBLIC_KEYS_CHARS:  # what the RouterConfig holds inline
        raise ValueError(f"{len(text)} characters of keys; at most {MAX_PUBLIC_KEYS_CHARS}")
    kinds: set[str] = set()
    keys = split_public_keys(text)
    for i, item in enumerate(keys):
        where = f"key {i}" + (f" (kid {item.kid!r})" if item.kid else "")
        try:
            key = _load(item.pem, item.jwk)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where} does not load ({type(exc).__name__})") from None
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < MIN_RSA_BITS:
                raise ValueError(f"{where}: an RSA key of {key.key_size} bits; at least {MIN_RSA_BITS}")
            kinds.add("RSA")
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            kinds.add("EC")
        else:
            raise ValueError(f"{where}: only RSA and EC P-256 public keys verify RS256 and ES256")
    for alg in algorithms:
        if alg in ASYMMETRIC and KEY_TYPE[alg] not in kinds:
            raise ValueError(f"no {KEY_TYPE[alg]} key to verify {alg.value} with")
    return len(keys)
