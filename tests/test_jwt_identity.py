"""Signed identity (`tenancy.jwt`): the tenant from a verified token, end to end.

A running sidecar against the simulated provider, called with the official
openai SDK whose api_key is the token (so it arrives as `Authorization: Bearer`):
HS256, RS256 and ES256 with PEM keys, a JWKS whose kid picks the key, and each
way a token can be wrong (another key, expired, missing, `alg: none`). Then the
operator's side: the CRD fields (schema and CEL, as tests/test_operator_crds.py
plays the API server), the compiler (the HS256 Secret into kubetoll-credentials,
the public keys inline, a missing reference a condition and a fail-closed
config), and the operator on kmock.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kubetoll_core.jwt_settings import HS256_SECRET_FILE, split_public_keys
from kubetoll_core.names import API_KEY_PLACEHOLDER
from kubetoll_core.periods import FakeClock
from kubetoll_core.router_config import RouterConfig
from kubetoll_operator.compiler import compile_namespace
from kubetoll_sidecar import jwt_identity
from kubetoll_sidecar.credentials import CredentialStore
from kubetoll_sidecar.jwt_identity import JwtVerifier
from support.harness import base_config
from support.kopf_env import LOCAL_BACKEND, Kubectl, condition, eventually, route_to_local
from test_operator_crds import api_server_errors, model_errors

SECRET = "an-hs256-secret-of-at-least-32-bytes-0123456789"
OTHER_SECRET = "another-hs256-secret-nobody-signed-with-987654"
MESSAGES = [{"role": "user", "content": "What is the refund policy?"}]
ISSUER = "https://idp.example"


# --------------------------------------------------------------------------- keys and tokens


def _pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key_2() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def token(key: Any, alg: str, clock: FakeClock | None = None, kid: str | None = None, **claims: Any) -> str:
    now = clock.time() if clock is not None else time.time()
    body = {"sub": "acme", "exp": now + 600, **claims}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


def jwks(*keys: tuple[str, Any]) -> str:
    out = []
    for kid, private in keys:
        algorithm = (
            jwt.algorithms.RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
        )
        jwk = json.loads(algorithm.to_jwk(private.public_key()))
        out.append({**jwk, "kid": kid, "use": "sig"})
    return json.dumps({"keys": out})


def jwt_config(sim_url: str, creds: Path, **jwt_settings: Any) -> dict[str, Any]:
    """The harness config with two tiers and `tenancy.jwt`; the HS256 key in the credentials dir, as mounted."""
    creds.mkdir(exist_ok=True)
    (creds / HS256_SECRET_FILE).write_text(SECRET + "\n")
    settings = {"algorithms": ["HS256"], "hs256SecretFile": HS256_SECRET_FILE, **jwt_settings}
    cfg = base_config(
        sim_url,
        tenancy={"defaultTier": "free", "jwt": settings},
        budgets=[{"name": "b", "tiers": {"free": {"requestsPerMinute": 1000}, "premium": {"requestsPerMinute": 1000}}}],
    )
    cfg["server"]["credentialsDir"] = str(creds)
    return cfg


def client(sc: Any, api_key: str, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sc.url + "/v1", api_key=api_key, max_retries=0, **kw)


def records(sc: Any) -> list[Any]:
    return list(sc.sidecar.ledger.records())


async def refused(sc: Any, api_key: str, status: int = 401, **kw: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        await client(sc, api_key, **kw).chat.completions.create(model="chat", messages=MESSAGES)
    err = caught.value
    assert err.status_code == status, err
    assert set(err.body) == {"message", "type", "param", "code"}  # OpenAI's error object
    assert api_key not in err.message and api_key not in json.dumps(err.body)  # never echoed
    return err


# --------------------------------------------------------------------------- through a running sidecar


async def test_hs256_token_names_the_tenant_and_tier(sim, start_sidecar, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    sc = await start_sidecar(jwt_config(sim.url, tmp_path / "creds", tierClaim="tier"))
    t = token(SECRET, "HS256", sub="acme", tier="premium")
    # The tenant and tier headers are what code in the pod can forge: the signed claims win.
    forged = {"x-kubetoll-tenant": "someone-else", "x-kubetoll-tier": "free"}
    raw = await client(sc, t, default_headers=forged).chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES
    )
    assert raw.parse().choices[0].message.content
    (rec,) = records(sc)
    assert (rec.tenant, rec.tier) == ("acme", "premium")
    # Upstream gets the backend's key; the token goes nowhere past the sidecar.
    sent = sim.requests[-1]
    assert sent.headers["authorization"] == "Bearer sk-test-openai-key-123"
    assert all(t not in v for v in sent.headers.values())
    # A tier claim no budget defines counts as the default tier, as a header would.
    await client(sc, token(SECRET, "HS256", sub="acme", tier="platinum")).chat.completions.create(
        model="chat", messages=MESSAGES
    )
    assert records(sc)[-1].tier == "free"
    # A signed tenant id is still held to the limits of any tenant id (it names Redis keys and log lines).
    with pytest.raises(openai.BadRequestError) as caught:
        await client(sc, token(SECRET, "HS256", sub="a{b}")).chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.code == "invalid_tenant" and "the token's `sub` claim" in caught.value.message
    # Nothing of the token in the logs or the metrics.
    async with aiohttp.ClientSession() as s, s.get(sc.ops_url + "/metrics") as r:
        metrics = await r.text()
    assert t not in metrics and t not in caplog.text and SECRET not in caplog.text


async def test_rs256_and_es256_with_pem_keys(sim, start_sidecar, tmp_path, rsa_key, ec_key):
    cfg = jwt_config(
        sim.url, tmp_path / "creds", algorithms=["RS256", "ES256"], publicKeys=_pem(rsa_key) + _pem(ec_key)
    )
    del cfg["tenancy"]["jwt"]["hs256SecretFile"]
    sc = await start_sidecar(cfg)
    await client(sc, token(rsa_key, "RS256", sub="rsa-tenant")).chat.completions.create(model="chat", messages=MESSAGES)
    await client(sc, token(ec_key, "ES256", sub="ec-tenant")).chat.completions.create(model="chat", messages=MESSAGES)
    assert [r.tenant for r in records(sc)] == ["rsa-tenant", "ec-tenant"]
    # HS256 is not in the list: a token signed with it is refused, whatever it is signed with.
    err = await refused(sc, token(SECRET, "HS256"))
    assert err.code == "invalid_token" and "HS256" in err.message and "accepts ES256, RS256" in err.message


async def test_jwks_kid_selects_the_key(sim, start_sidecar, tmp_path, rsa_key, rsa_key_2):
    cfg = jwt_config(
        sim.url, tmp_path / "creds", algorithms=["RS256"], publicKeys=jwks(("one", rsa_key), ("two", rsa_key_2))
    )
    del cfg["tenancy"]["jwt"]["hs256SecretFile"]
    sc = await start_sidecar(cfg)
    for kid, key in (("one", rsa_key), ("two", rsa_key_2)):
        await client(sc, token(key, "RS256", kid=kid, sub=f"t-{kid}")).chat.completions.create(
            model="chat", messages=MESSAGES
        )
    assert [r.tenant for r in records(sc)] == ["t-one", "t-two"]
    # Signed with key two but naming key one: kid "one" is the only key tried, and it does not verify.
    err = await refused(sc, token(rsa_key_2, "RS256", kid="one"))
    assert err.code == "invalid_token" and "signature" in err.message
    err = await refused(sc, token(rsa_key, "RS256", kid="three"))
    assert err.code == "invalid_token" and "kid" in err.message
    assert len(records(sc)) == 2


async def test_wrong_key_is_401_even_when_a_token_is_not_required(sim, start_sidecar, tmp_path):
    sc = await start_sidecar(jwt_config(sim.url, tmp_path / "creds"))
    bad = token(OTHER_SECRET, "HS256")
    err = await refused(sc, bad, default_headers={"x-kubetoll-tenant": "acme"})
    # A bad token never becomes an anonymous (or header-named) request.
    assert isinstance(err, openai.AuthenticationError)
    assert err.code == "invalid_token" and err.type == "authentication_error"
    assert "signature does not verify" in err.message
    # Again, answered from the cache: the same refusal.
    err = await refused(sc, bad)
    assert err.code == "invalid_token" and "signature does not verify" in err.message
    # Not a JWT at all, and not a Bearer token.
    assert (await refused(sc, "sk-an-openai-key-of-its-own")).code == "invalid_token"
    async with aiohttp.ClientSession() as s:
        async with s.post(
            sc.url + "/v1/chat/completions",
            json={"model": "chat", "messages": MESSAGES},
            headers={"Authorization": "Basic dXNlcjpwYXNz"},
        ) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_token"
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="kubetoll", error="invalid_token"'
    assert not sim.requests and not records(sc)


async def test_expired_token_is_401_token_expired(sim, start_sidecar, tmp_path):
    clock = FakeClock(time.time())
    sc = await start_sidecar(jwt_config(sim.url, tmp_path / "creds", leewaySeconds=10), clock=clock)
    t = token(SECRET, "HS256", clock, exp=clock.time() + 60)
    await client(sc, t).chat.completions.create(model="chat", messages=MESSAGES)
    clock.advance(65)  # past exp, within the leeway: still good (and answered from the cache)
    await client(sc, t).chat.completions.create(model="chat", messages=MESSAGES)
    clock.advance(10)  # 75 s after issue: exp + leeway has passed
    err = await refused(sc, t)
    assert err.code == "token_expired" and err.type == "authentication_error"
    assert "expired 15 s ago" in err.message
    assert len(records(sc)) == 2
    # One that was never valid in the clock's time, and one not valid yet.
    assert (await refused(sc, token(SECRET, "HS256", clock, exp=clock.time() - 3600))).code == "token_expired"
    early = token(SECRET, "HS256", clock, nbf=clock.time() + 300)
    err = await refused(sc, early)
    assert err.code == "invalid_token" and "not valid for another" in err.message
    clock.advance(300)
    await client(sc, early).chat.completions.create(model="chat", messages=MESSAGES)
    # A token without exp never expires, so it is not accepted.
    no_exp = jwt.encode({"sub": "acme"}, SECRET, algorithm="HS256")
    err = await refused(sc, no_exp)
    assert err.code == "invalid_token" and "`exp`" in err.message


async def test_missing_token_with_required_is_401(sim, start_sidecar, tmp_path):
    sc = await start_sidecar(jwt_config(sim.url, tmp_path / "creds", required=True))
    # What the injector gives an app without a key of its own counts as no token.
    err = await refused(sc, API_KEY_PLACEHOLDER, default_headers={"x-kubetoll-tenant": "acme"})
    assert err.code == "token_required" and err.type == "invalid_request_error"
    assert "requires a signed token" in err.message
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/chat/completions", json={"model": "chat", "messages": MESSAGES}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "token_required"
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="kubetoll"'
    await client(sc, token(SECRET, "HS256")).chat.completions.create(model="chat", messages=MESSAGES)
    assert [r.tenant for r in records(sc)] == ["acme"]


async def test_missing_token_without_required_falls_back_to_the_headers(sim, start_sidecar, tmp_path):
    sc = await start_sidecar(jwt_config(sim.url, tmp_path / "creds"))
    await client(sc, API_KEY_PLACEHOLDER, default_headers={"x-kubetoll-tenant": "from-header"}).chat.completions.create(
        model="chat", messages=MESSAGES
    )
    await client(sc, API_KEY_PLACEHOLDER).chat.completions.create(model="chat", messages=MESSAGES, user="from-user")
    await client(sc, API_KEY_PLACEHOLDER).chat.completions.create(model="chat", messages=MESSAGES)
    # An SDK given an empty api_key sends a bare "Bearer": no token either.
    async with aiohttp.ClientSession() as http:
        async with http.post(
            sc.url + "/v1/chat/completions",
            json={"model": "chat", "messages": MESSAGES},
            headers={"Authorization": "Bearer ", "x-kubetoll-tenant": "bare-bearer"},
        ) as r:
            assert r.status == 200, await r.text()
    assert [r.tenant for r in records(sc)] == ["from-header", "from-user", "anonymous", "bare-bearer"]


async def test_alg_none_is_refused(sim, start_sidecar, tmp_path):
    sc = await start_sidecar(jwt_config(sim.url, tmp_path / "creds"))
    unsigned = jwt.encode({"sub": "acme", "exp": time.time() + 600}, None, algorithm="none")
    err = await refused(sc, unsigned)
    assert err.code == "invalid_token" and "`none`" in err.message and "accepts HS256" in err.message
    # Nor does re-labelling an HS256 token as none get it past.
    header, payload, _ = token(SECRET, "HS256").split(".")
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    assert (await refused(sc, f"{none_header}.{payload}.")).code == "invalid_token"
    assert not sim.requests


async def test_issuer_audience_and_a_header_of_its_own(sim, start_sidecar, tmp_path):
    cfg = jwt_config(
        sim.url, tmp_path / "creds", issuer="https://idp.example", audience="kubetoll", header="x-tenant-token"
    )
    sc = await start_sidecar(cfg)
    good = token(SECRET, "HS256", iss="https://idp.example", aud="kubetoll", sub="acme")
    await client(sc, "unused", default_headers={"x-tenant-token": good}).chat.completions.create(
        model="chat", messages=MESSAGES
    )
    assert records(sc)[-1].tenant == "acme"
    for bad, what in (
        (token(SECRET, "HS256", iss="https://other.example", aud="kubetoll"), "`iss`"),
        (token(SECRET, "HS256", iss="https://idp.example", aud="another-service"), "`aud`"),
        (token(SECRET, "HS256", aud="kubetoll"), "`iss`"),
    ):
        err = await refused(sc, "unused", default_headers={"x-tenant-token": bad})
        assert err.code == "invalid_token" and what in err.message, err.message


async def test_without_jwt_nothing_changes(sim, start_sidecar):
    """The Authorization header the app sends is ignored, as before, and never forwarded."""
    sc = await start_sidecar(base_config(sim.url))
    signed = token(SECRET, "HS256", sub="acme")
    for key in (signed, "sk-the-apps-own-key", API_KEY_PLACEHOLDER):
        await client(sc, key, default_headers={"x-kubetoll-tenant": "from-header"}).chat.completions.create(
            model="chat", messages=MESSAGES
        )
        assert sim.requests[-1].headers["authorization"] == "Bearer sk-test-openai-key-123"
    assert [r.tenant for r in records(sc)] == ["from-header"] * 3


async def test_rotated_hs256_secret_takes_over_and_a_missing_one_is_503(
    sim, start_sidecar, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(CredentialStore, "RECHECK_SECONDS", 0.0)  # re-read on every change of mtime
    creds = tmp_path / "creds"
    sc = await start_sidecar(jwt_config(sim.url, creds))
    old = token(SECRET, "HS256", sub="old")
    await client(sc, old).chat.completions.create(model="chat", messages=MESSAGES)
    key_file = creds / HS256_SECRET_FILE
    key_file.write_text(OTHER_SECRET)
    stat = key_file.stat()
    os.utime(key_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new mtime, as the kubelet's swap
    # The cached verification of the old token does not outlive the secret it passed with.
    assert (await refused(sc, old)).code == "invalid_token"
    await client(sc, token(OTHER_SECRET, "HS256", sub="new")).chat.completions.create(model="chat", messages=MESSAGES)
    assert [r.tenant for r in records(sc)] == ["old", "new"]
    # No key at all: no token can pass, and the answer says which file, never a value.
    key_file.unlink()
    err = await refused(sc, token(OTHER_SECRET, "HS256"), status=503)
    assert err.code == "identity_unavailable" and HS256_SECRET_FILE in err.message
    assert OTHER_SECRET not in caplog.text and OTHER_SECRET not in err.message


async def test_keys_the_operator_could_not_resolve_fail_closed(sim, start_sidecar, tmp_path):
    cfg = jwt_config(sim.url, tmp_path / "creds", required=True, unavailable="Secret 'idp-key' not found")
    del cfg["tenancy"]["jwt"]["hs256SecretFile"]
    sc = await start_sidecar(cfg)
    err = await refused(sc, token(SECRET, "HS256"), status=503)
    assert err.code == "identity_unavailable" and "idp-key" in err.message
    assert (await refused(sc, API_KEY_PLACEHOLDER)).code == "token_required"
    assert not sim.requests


async def test_a_config_with_unusable_keys_is_refused(sim, start_sidecar, tmp_path, rsa_key):
    from kubetoll_sidecar.config_loader import ConfigError

    cfg = jwt_config(
        sim.url, tmp_path / "creds", algorithms=["RS256"], publicKeys=_pem(ec.generate_private_key(ec.SECP384R1()))
    )
    del cfg["tenancy"]["jwt"]["hs256SecretFile"]
    with pytest.raises(ConfigError, match="publicKeys: key 0: only RSA and EC P-256"):
        await start_sidecar(cfg)
    private = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    with pytest.raises(ValueError, match="private key"):
        split_public_keys(private)


def test_verifications_are_cached_by_token_and_bounded(tmp_path, monkeypatch):
    (tmp_path / HS256_SECRET_FILE).write_text(SECRET)
    cfg = RouterConfig.model_validate(
        {"tenancy": {"jwt": {"algorithms": ["HS256"], "hs256SecretFile": HS256_SECRET_FILE}}}
    )
    assert cfg.tenancy.jwt is not None
    verifier = JwtVerifier(cfg.tenancy.jwt, CredentialStore(str(tmp_path)), FakeClock(time.time()))
    decodes = []
    real = jwt_identity.jwt.decode
    monkeypatch.setattr(jwt_identity.jwt, "decode", lambda *a, **kw: decodes.append(1) or real(*a, **kw))
    monkeypatch.setattr(jwt_identity, "CACHE_ENTRIES", 8)
    t = token(SECRET, "HS256")
    for _ in range(5):
        assert verifier.verify({"authorization": f"Bearer {t}"}).tenant == "acme"
    assert len(decodes) == 1
    for i in range(20):
        verifier.verify({"authorization": f"Bearer {token(SECRET, 'HS256', sub=f't{i}')}"})
    assert len(verifier._cache) == 8  # the oldest went first
    verifier.verify({"authorization": f"Bearer {t}"})
    assert len(decodes) == 22  # evicted, so verified again


# --------------------------------------------------------------------------- the CRD fields

BUDGET = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "TokenBudget",
    "metadata": {"name": "t"},
    "spec": {
        "tiers": [{"name": "free", "requestsPerMinute": 100}],
        "tenant": {
            "jwt": {
                "required": True,
                "algorithms": ["HS256", "RS256"],
                "hs256SecretRef": {"name": "idp", "key": "hs256"},
                "publicKeysFrom": {"configMapName": "idp-keys", "key": "jwks.json"},
                "issuer": ISSUER,
                "tierClaim": "tier",
            }
        },
    },
}


def _jwt_with(**changes: Any) -> dict[str, Any]:
    obj = copy.deepcopy(BUDGET)
    for k, v in changes.items():
        if v is None:
            del obj["spec"]["tenant"]["jwt"][k]
        else:
            obj["spec"]["tenant"]["jwt"][k] = v
    return obj


def test_crd_accepts_the_jwt_block_and_defaults_it():
    assert api_server_errors(BUDGET) == [] and model_errors(BUDGET) == []
    from test_operator_crds import apply_defaults, schema_of

    defaulted = apply_defaults(copy.deepcopy(BUDGET), schema_of("TokenBudget"))["spec"]["tenant"]["jwt"]
    assert (defaulted["header"], defaulted["tenantClaim"], defaulted["leewaySeconds"]) == ("authorization", "sub", 30)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (_jwt_with(hs256SecretRef=None), "hs256SecretRef"),
        (_jwt_with(publicKeysFrom=None), "publicKeysFrom"),
        (_jwt_with(algorithms=["none"]), "algorithms"),
        (_jwt_with(algorithms=[]), "algorithms"),
        (_jwt_with(algorithms=None), "algorithms"),
        (_jwt_with(leewaySeconds=3600), "leewaySeconds"),
        (_jwt_with(header="not a header"), "header"),
        (_jwt_with(hs256SecretRef={"name": "idp"}), "key"),
    ],
    ids=[
        "hs256-without-secret",
        "rs256-without-keys",
        "alg-none",
        "no-algorithms",
        "algorithms-missing",
        "leeway",
        "header",
        "ref-key",
    ],
)
def test_crd_and_models_refuse_bad_jwt_blocks(obj: dict[str, Any], field: str) -> None:
    server = api_server_errors(obj)
    assert server and any(field in e for e in server), server
    models = model_errors(obj)
    assert models and any(field in e for e in models), models


# --------------------------------------------------------------------------- the compiler


def _namespace(*extra: dict[str, Any], budget: dict[str, Any] = BUDGET) -> list[dict[str, Any]]:
    route = {**route_to_local(), "metadata": {"name": "chat"}}
    return [LOCAL_BACKEND, route, budget, *extra]


def test_compile_copies_the_secret_and_inlines_the_public_keys(rsa_key):
    keys = jwks(("k1", rsa_key))
    result = compile_namespace(
        "team-a",
        _namespace(),
        secrets={"idp": {"hs256": "c2VjcmV0"}},
        config_maps={"idp-keys": {"jwks.json": keys}},
    )
    assert result.ok, result.problems
    compiled = json.loads(result.config_json)["tenancy"]["jwt"]
    assert compiled["hs256SecretFile"] == HS256_SECRET_FILE and compiled["publicKeys"] == keys
    assert "hs256SecretRef" not in compiled and "publicKeysFrom" not in compiled and "unavailable" not in compiled
    # The operator copies exactly that key into kubetoll-credentials; the config names the file only.
    assert result.credentials[HS256_SECRET_FILE] == ("idp", "hs256")
    assert "c2VjcmV0" not in result.config_json
    # `kubetoll run`: an environment variable instead of the file.
    env = compile_namespace(
        "team-a", _namespace(), credential_mode="env", config_maps={"idp-keys": {"jwks.json": keys}}
    )
    assert json.loads(env.config_json)["tenancy"]["jwt"]["hs256SecretEnv"] == "KUBETOLL_SECRET_IDP_HS256"
    assert env.credentials["KUBETOLL_SECRET_IDP_HS256"] == ("idp", "hs256")


def test_missing_or_bad_references_are_conditions_and_fail_closed(rsa_key):
    from kubetoll_operator.status import desired_status

    private = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    result = compile_namespace("team-a", _namespace(), secrets={}, config_maps={"idp-keys": {"jwks.json": private}})
    reasons = {p.reason: p for p in result.problems_for("TokenBudget", "t")}
    assert set(reasons) == {"SecretNotFound", "InvalidPublicKeys"}
    assert reasons["SecretNotFound"].field == "spec.tenant.jwt.hs256SecretRef.name"
    assert "no request is served until it is fixed" in reasons["SecretNotFound"].message
    assert "private key" in reasons["InvalidPublicKeys"].message
    # The budget stays in force (its tenancy with it); the key material is missing, and says why.
    compiled = json.loads(result.config_json)["tenancy"]["jwt"]
    assert compiled["required"] is True
    assert "hs256SecretFile" not in compiled and "publicKeys" not in compiled
    assert "Secret 'idp'" in compiled["unavailable"] and HS256_SECRET_FILE not in result.credentials
    assert "PRIVATE" not in result.config_json
    status = desired_status(result, result.outcomes[("TokenBudget", "t")])
    refs = condition({"status": status}, "ResolvedRefs")
    assert refs["status"] == "False" and refs["reason"] == "SecretNotFound"
    assert "hs256SecretRef" in refs["message"] and "publicKeysFrom" in refs["message"]
    # A ConfigMap that is not there at all.
    gone = compile_namespace("team-a", _namespace(), secrets={"idp": {"hs256": "x"}}, config_maps={})
    assert [p.reason for p in gone.problems_for("TokenBudget", "t")] == ["ConfigMapNotFound"]
    assert "ConfigMap 'idp-keys'" in json.loads(gone.config_json)["tenancy"]["jwt"]["unavailable"]


async def test_compiled_config_serves_tokens(sim, start_sidecar, tmp_path, rsa_key):
    """What the operator writes, as a sidecar mounts it: router.json plus the credentials Secret's files."""
    result = compile_namespace(
        "team-a",
        _namespace(),
        secrets={"idp": {"hs256": "x"}},
        config_maps={"idp-keys": {"jwks.json": jwks(("k1", rsa_key))}},
    )
    cfg = json.loads(result.config_json)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / HS256_SECRET_FILE).write_text(SECRET)
    served = base_config(sim.url, tenancy=cfg["tenancy"], budgets=cfg["budgets"])
    served["server"]["credentialsDir"] = str(creds)
    sc = await start_sidecar(served)
    await client(sc, token(rsa_key, "RS256", kid="k1", sub="rs", tier="free", iss=ISSUER)).chat.completions.create(
        model="chat", messages=MESSAGES
    )
    await client(sc, token(SECRET, "HS256", sub="hs", iss=ISSUER)).chat.completions.create(
        model="chat", messages=MESSAGES
    )
    assert [(r.tenant, r.tier) for r in records(sc)] == [("rs", "free"), ("hs", "default")]
    assert (await refused(sc, API_KEY_PLACEHOLDER)).code == "token_required"


# --------------------------------------------------------------------------- the operator on kmock


async def test_operator_copies_the_secret_and_recompiles_on_changes(
    kubectl: Kubectl, start_operator: Any, rsa_key, rsa_key_2
) -> None:
    await start_operator()
    secret_value = "an-hs256-secret-the-operator-must-not-put-in-a-configmap"
    await kubectl.apply(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "idp"}, "stringData": {"hs256": secret_value}}
    )
    await kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "idp-keys"},
            "data": {"jwks.json": jwks(("k1", rsa_key))},
        }
    )
    for obj in _namespace():
        await kubectl.apply(obj)

    async def compiled() -> dict[str, Any]:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        jwt_cfg = json.loads(cm["data"]["router.json"])["tenancy"]["jwt"]
        assert jwt_cfg["hs256SecretFile"] == HS256_SECRET_FILE and '"k1"' in jwt_cfg["publicKeys"]
        secret = await kubectl.get("Secret", "kubetoll-credentials")
        assert base64.b64decode(secret["data"][HS256_SECRET_FILE]).decode() == secret_value
        assert all(secret_value not in v for v in cm["data"].values())
        return cm

    await eventually(compiled)

    # A new key in the ConfigMap reaches the config.
    await kubectl.patch("ConfigMap", "idp-keys", {"data": {"jwks.json": jwks(("k2", rsa_key_2))}})

    async def rotated() -> None:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        assert '"k2"' in json.loads(cm["data"]["router.json"])["tenancy"]["jwt"]["publicKeys"]

    await eventually(rotated)

    # The Secret deleted: a condition on the budget, the key gone from kubetoll-credentials, and the config
    # keeps `required` with the reason the HS256 key is missing.
    await kubectl.delete("Secret", "idp")

    async def reported() -> None:
        budget = await kubectl.get("TokenBudget", "t")
        refs = condition(budget, "ResolvedRefs")
        assert refs["status"] == "False" and refs["reason"] == "SecretNotFound", refs
        assert "spec.tenant.jwt.hs256SecretRef.name" in refs["message"]
        secret = await kubectl.get("Secret", "kubetoll-credentials")
        assert HS256_SECRET_FILE not in (secret.get("data") or {})
        jwt_cfg = json.loads((await kubectl.get("ConfigMap", "kubetoll-router"))["data"]["router.json"])["tenancy"][
            "jwt"
        ]
        assert jwt_cfg["required"] is True and "Secret 'idp'" in jwt_cfg["unavailable"]
        assert "hs256SecretFile" not in jwt_cfg

    await eventually(reported)
