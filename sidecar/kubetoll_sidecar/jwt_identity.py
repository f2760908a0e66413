"""Signed tenant identity (`tenancy.jwt`): verify the app's token and take the tenant and tier from its claims.

Headers such as `x-kubetoll-tenant` are whatever the code in the pod sets. With
`tenancy.jwt`, the platform signs a token per tenant, the app passes it (as the
OpenAI SDK's api_key, so it arrives as `Authorization: Bearer <token>`, or in a
header of its own) and `TenantResolver.identify` takes the tenant, and the tier
when `tierClaim` is set, from the token's claims once it verifies:

* the algorithm is one of `algorithms` (HS256, RS256, ES256; an unsigned
  `alg: none` token is refused like any other algorithm not listed), and the key
  is of that algorithm's kind: the HS256 secret from the credentials file, an RSA
  or EC P-256 public key from `publicKeys` (PEM, or a JWKS whose `kid` selects
  the key), never one for another;
* the signature, then `iss`, `aud` and the presence of `exp` (PyJWT); `exp` and
  `nbf` against the injected wall clock with `leewaySeconds`.

Verifying costs an HMAC or an RSA/ECDSA verification per request, and an app
sends the same token for minutes, so the outcome is cached for a short time by
the token's SHA-256 (bounded, least recently used out first). The time checks
run on every request, cached or not, so a cached token still expires on time; a
rotated HS256 secret empties the cache.

Failures are 401 in OpenAI's error format (`token_required`, `invalid_token`,
`token_expired`), saying what was wrong and never echoing the token; key
material that is missing (a Secret the operator could not find, an unreadable
credentials file) is 503 `identity_unavailable`, since no token could pass. The
token and the keys are never logged.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kubetoll_core.jwt_settings import (
    KEY_TYPE,
    MIN_HS256_SECRET_BYTES,
    JwtAlgorithm,
    JwtIdentity,
    split_public_keys,
)
from kubetoll_core.names import API_KEY_PLACEHOLDER
from kubetoll_core.periods import Clock
from kubetoll_core.router_config import Credential

from .config_loader import ConfigError
from .credentials import CredentialStore, MissingCredential
from .errors import ApiError

log = logging.getLogger("kubetoll.identity")

MAX_TOKEN_CHARS = 16 * 1024
MIN_RSA_BITS = 2048
CACHE_SECONDS = 30.0
CACHE_ENTRIES = 4096
_BEARER = re.compile(r"^bearer +(\S+)\s*$", re.IGNORECASE)
_SHOWN_ALG = re.compile(r"^[A-Za-z0-9+-]{1,16}$")

_DECODE_OPTIONS: Any = {
    "verify_signature": True,
    # exp and nbf are checked against the injected clock (JwtVerifier._check_times), not PyJWT's.
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_iss": True,
    "verify_aud": True,
    "require": ["exp"],
    "enforce_minimum_key_length": True,
}


@dataclass(frozen=True, slots=True)
class SignedIdentity:
    """What a verified token says: the tenant, and the tier when `tierClaim` names one (unchecked here)."""

    tenant: str
    tier: str | None


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    key_type: str  # "RSA" or "EC"
    key: Any  # a cryptography public key object


@dataclass(slots=True)
class _Entry:
    """A cached verification: an identity with its time claims, or a refusal that no clock can change."""

    until: float  # monotonic
    hs256: bool  # the outcome came from the HS256 secret: it holds only while that secret does
    identity: SignedIdentity | None = None
    exp: float = 0.0
    nbf: float | None = None
    code: str = ""
    message: str = ""

    @classmethod
    def refusal(cls, until: float, hs256: bool, message: str) -> _Entry:
        return cls(until, hs256, code="invalid_token", message=message)


def unauthorized(message: str, code: str, error_type: str = "authentication_error") -> ApiError:
    """401 in OpenAI's error format, with the RFC 6750 challenge (no error attribute when no token came)."""
    challenge = 'Bearer realm="kubetoll"' + ("" if code == "token_required" else ', error="invalid_token"')
    return ApiError(401, message, error_type, code, headers={"WWW-Authenticate": challenge})


def invalid_token(message: str) -> ApiError:
    return unauthorized(message, "invalid_token")


def identity_unavailable(message: str) -> ApiError:
    return ApiError(503, message, "service_unavailable", "identity_unavailable")


def load_public_keys(text: str) -> list[_Key]:
    """The keys of `publicKeys`, ready to verify with; ValueError naming the key that is not usable."""
    out = []
    for i, item in enumerate(split_public_keys(text)):
        where = f"key {i}" + (f" (kid {item.kid!r})" if item.kid else "")
        try:
            if item.pem is not None:
                key: Any = serialization.load_pem_public_key(item.pem.encode())
            elif item.key_type == "RSA":
                key = jwt.algorithms.RSAAlgorithm.from_jwk(dict(item.jwk or {}))
            else:
                key = jwt.algorithms.ECAlgorithm.from_jwk(dict(item.jwk or {}))
        except (ValueError, TypeError, jwt.InvalidKeyError) as exc:
            raise ValueError(f"{where} does not load ({type(exc).__name__})") from None
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < MIN_RSA_BITS:
                raise ValueError(f"{where}: an RSA key of {key.key_size} bits; at least {MIN_RSA_BITS}")
            out.append(_Key(item.kid, "RSA", key))
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            out.append(_Key(item.kid, "EC", key))
        else:
            raise ValueError(f"{where}: only RSA and EC P-256 public keys verify RS256 and ES256")
    return out


class JwtVerifier:
    """Verifies the token of one config's `tenancy.jwt` (a reload builds a new one, with an empty cache)."""

    def __init__(
        self,
        settings: JwtIdentity,
        credentials: CredentialStore,
        clock: Clock,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.required = settings.required
        self._header = settings.header.lower()
        self._allowed = frozenset(a.value for a in settings.algorithms)
        self._credentials = credentials
        self._clock = clock
        self._monotonic = monotonic
        try:
            self._keys = load_public_keys(settings.public_keys) if settings.public_keys else []
        except ValueError as exc:
            raise ConfigError(f"tenancy.jwt.publicKeys: {exc}") from None
        self._hs_source: Credential | None = None
        if settings.hs256_secret_file is not None:
            self._hs_source = Credential(file=settings.hs256_secret_file)
        elif settings.hs256_secret_env is not None:
            self._hs_source = Credential(env=settings.hs256_secret_env)
        self._hs_secret: bytes | None = None  # the one last read: a different one empties the cache
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._logged_unavailable: str | None = None

    # ------------------------------------------------------------------ the token

    def token(self, headers: Mapping[str, str]) -> str | None:
        """The token the request carries; None when it carries none (absent, empty, or the injector's placeholder)."""
        value = headers.get(self._header)
        if value is None or not value.strip() or value.strip().lower() == "bearer":  # an SDK's empty api_key
            return None
        m = _BEARER.match(value)
        if m is not None:
            token = m.group(1)
        elif self._header == "authorization":
            raise invalid_token("the Authorization header must be `Bearer <token>`")
        else:
            token = value.strip()
        if token == API_KEY_PLACEHOLDER:
            # What the injector sets as OPENAI_API_KEY for an app that sets none: no token.
            return None
        return token

    def verify(self, headers: Mapping[str, str]) -> SignedIdentity | None:
        """The identity in the request's token; None when it has none and none is required. Raises ApiError."""
        token = self.token(headers)
        if token is None:
            if self.required:
                where = "as the API key (Authorization: Bearer)" if self._header == "authorization" else self._header
                raise unauthorized(
                    f"this router requires a signed token: pass it {where}", "token_required", "invalid_request_error"
                )
            return None
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise invalid_token(f"the token is not a JWT (at most {MAX_TOKEN_CHARS} ASCII characters)")
        digest = hashlib.sha256(token.encode()).digest()
        now = self._monotonic()
        entry = self._cache.get(digest)
        if entry is not None and entry.until > now and (not entry.hs256 or self._hs_current()):
            self._cache.move_to_end(digest)
        else:
            entry = self._verify(token, now)
            self._cache[digest] = entry
            self._cache.move_to_end(digest)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        if entry.code:
            raise invalid_token(entry.message)
        return self._check_times(entry)

    # ------------------------------------------------------------------ verification

    def _verify(self, token: str, now: float) -> _Entry:
        until = now + CACHE_SECONDS
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return _Entry.refusal(until, False, "the token is not a JWT (header.payload.signature)")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            shown = f"`{alg}`" if isinstance(alg, str) and _SHOWN_ALG.match(alg) else "an unrecognised algorithm"
            accepted = ", ".join(sorted(self._allowed))
            return _Entry.refusal(until, False, f"the token is signed with {shown}; this router accepts {accepted}")
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        hs256 = alg == JwtAlgorithm.hs256.value
        if hs256:
            keys: list[Any] = [self._hs_key()]
        else:
            candidates = [k for k in self._keys if k.key_type == KEY_TYPE[JwtAlgorithm(alg)]]
            if not candidates:
                if self.settings.unavailable:
                    raise self._unavailable(f"no {alg} key: {self.settings.unavailable}")
                return _Entry.refusal(until, hs256, f"this router has no {alg} key")
            if kid is not None and any(k.kid is not None for k in candidates):
                candidates = [k for k in candidates if k.kid == kid]
                if not candidates:
                    return _Entry.refusal(until, hs256, f"no {alg} key has the token's kid")
            keys = [k.key for k in candidates]
        s = self.settings
        claims: dict[str, Any] | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    options=_DECODE_OPTIONS,
                    audience=s.audience,
                    issuer=s.issuer,
                    leeway=s.leeway_seconds,
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.MissingRequiredClaimError as exc:
                return _Entry.refusal(until, hs256, f"the token has no `{exc.claim}` claim")
            except jwt.InvalidAudienceError:
                wanted = "does not hold this router's audience" if s.audience else "is set, and this router names none"
                return _Entry.refusal(until, hs256, f"the token's `aud` {wanted}")
            except jwt.InvalidIssuerError:
                return _Entry.refusal(until, hs256, "the token's `iss` is not this router's issuer")
            except jwt.InvalidTokenError as exc:
                # Names the check (e.g. DecodeError, InvalidSubjectError), not PyJWT's text, which may quote claims.
                return _Entry.refusal(until, hs256, f"the token does not verify ({type(exc).__name__})")
        if claims is None:
            return _Entry.refusal(until, hs256, "the token's signature does not verify")
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int | float) or isinstance(exp, bool) or not (nbf is None or _is_number(nbf)):
            return _Entry.refusal(until, hs256, "the token's `exp` and `nbf` must be numbers")
        tenant = claims.get(s.tenant_claim)
        if isinstance(tenant, int) and not isinstance(tenant, bool):
            tenant = str(tenant)
        if not isinstance(tenant, str) or not tenant:
            return _Entry.refusal(until, hs256, f"the token has no `{s.tenant_claim}` claim naming the tenant")
        tier = claims.get(s.tier_claim) if s.tier_claim is not None else None
        return _Entry(
            until,
            hs256,
            identity=SignedIdentity(tenant, tier if isinstance(tier, str) else None),
            exp=float(exp),
            nbf=float(nbf) if isinstance(nbf, int | float) else None,
        )

    def _check_times(self, entry: _Entry) -> SignedIdentity:
        assert entry.identity is not None
        now = self._clock.time()
        leeway = self.settings.leeway_seconds
        if now > entry.exp + leeway:
            raise unauthorized(
                f"the token expired {_ago(now - entry.exp)} ago; get a new one", "token_expired", "authentication_error"
            )
        if entry.nbf is not None and now < entry.nbf - leeway:
            raise invalid_token(f"the token is not valid for another {_ago(entry.nbf - now)}")
        return entry.identity

    # ------------------------------------------------------------------ key material

    def _hs_key(self) -> bytes:
        if self._hs_source is None:
            raise self._unavailable(f"no HS256 key: {self.settings.unavailable or 'none configured'}")
        try:
            value = self._credentials.get(self._hs_source)
        except MissingCredential as exc:  # names the file or variable, never a value
            raise self._unavailable(f"the HS256 key is not available: {exc}") from None
        secret = (value or "").encode()
        if len(secret) < MIN_HS256_SECRET_BYTES:
            raise self._unavailable(
                f"the HS256 key is shorter than {MIN_HS256_SECRET_BYTES} bytes, too short to verify with"
            )
        if self._hs_secret is not None and secret != self._hs_secret:
            self._cache.clear()  # rotated: what the old secret verified (or refused) no longer holds
        self._hs_secret = secret
        return secret

    def _hs_current(self) -> bool:
        """Whether the HS256 secret is the one the cached entries were verified with (False: they were dropped)."""
        before = self._hs_secret
        return self._hs_key() == before

    def _unavailable(self, message: str) -> ApiError:
        if message != self._logged_unavailable:  # once per reason: the log says what the platform must fix
            self._logged_unavailable = message
            log.warning("signed identity: %s; requests with a token get 503", message)
        return identity_unavailable(f"this router cannot verify tokens now: {message}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h"
