"""The generated CRDs: up to date, structural, and doing what the models do.

The API server is not available here, so this file plays its part: it applies
schema defaults, validates with the openAPIV3Schema (jsonschema, draft 4, whose
boolean exclusiveMinimum is OpenAPI 3.0's) and evaluates every
x-kubernetes-validations rule with a CEL implementation (celpy). Each bad object
must be rejected by that *and* by the pydantic models that `kubetoll validate`
and the operator use, with a message naming the field.
"""

from __future__ import annotations

import copy
import glob
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from celpy import celtypes

from kubetoll_operator import crdgen
from kubetoll_operator.compiler import compile_namespace
from kubetoll_operator.resources import KINDS

ROOT = Path(__file__).resolve().parent.parent
CRDS = {
    crd["spec"]["names"]["kind"]: crd for crd in crdgen.all_crds().values() if crd["spec"]["group"] == "kubetoll.dev"
}


def schema_of(kind: str) -> dict[str, Any]:
    return CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --------------------------------------------------------------------------- an API server stand-in


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Kubernetes structural defaulting: fill absent properties that have a default, recursively."""
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
        if "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
            for k in list(value):
                value[k] = apply_defaults(value[k], schema["additionalProperties"])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


def to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """JSON → CEL values typed by the schema, as the API server does (number is always double)."""
    t = schema.get("type")
    if t == "object":
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for k, v in value.items():
            sub = props.get(k) or (extra if isinstance(extra, dict) else {"type": _json_type(v)})
            out[celtypes.StringType(k)] = to_cel(v, sub)
        return celtypes.MapType(out)
    if t == "array":
        return celtypes.ListType([to_cel(v, schema.get("items", {})) for v in value])
    if t == "number":
        return celtypes.DoubleType(float(value))
    if t == "integer":
        return celtypes.IntType(value)
    if t == "boolean":
        return celtypes.BoolType(value)
    if t == "string":
        return celtypes.StringType(value)
    return celpy.json_to_cel(value)


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array", bool: "boolean", int: "integer", float: "number", str: "string"}.get(
        type(v), "string"
    )


_CEL = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}
EVALUATED_RULES: dict[str, set[bool]] = {}  # rule → outcomes seen, for the coverage test


def eval_rule(rule: str, value: Any, schema: dict[str, Any]) -> bool:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _CEL.program(_CEL.compile(rule))
    result = _PROGRAMS[rule].evaluate({"self": to_cel(value, schema)})
    if isinstance(result, Exception):
        raise AssertionError(f"CEL rule {rule!r} failed to evaluate: {result}")
    ok = bool(result)
    EVALUATED_RULES.setdefault(rule, set()).add(ok)
    return ok


def cel_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    errors = []
    for v in schema.get("x-kubernetes-validations", []):
        if not eval_rule(v["rule"], value, schema):
            where = path + v.get("fieldPath", "")
            errors.append(f"{where.lstrip('.') or '<root>'}: {v['message']}")
    if isinstance(value, dict) and schema.get("type") == "object":
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += cel_errors(value[name], sub, f"{path}.{name}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += cel_errors(item, schema["items"], f"{path}[{i}]")
    return errors


def api_server_errors(obj: dict[str, Any]) -> list[str]:
    """What a Kubernetes API server would say about `obj`: schema errors, then CEL errors."""
    schema = schema_of(obj["kind"])
    obj = apply_defaults(copy.deepcopy(obj), schema)
    validator = jsonschema.Draft4Validator(schema)
    errors = [
        f"{'.'.join(str(p) if isinstance(p, str) else f'[{p}]' for p in e.absolute_path).replace('.[', '[')}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    if errors:
        return errors  # CEL rules run only on objects that pass the schema
    return cel_errors(obj, schema)


def model_errors(obj: dict[str, Any]) -> list[str]:
    """What `kubetoll validate` and the operator say: the pydantic models."""
    result = compile_namespace("ns", [obj])
    return [
        f"{p.field}: {p.message}"
        for p in result.problems
        if p.severity == "error" and p.reason in ("InvalidSpec", "InvalidName", "InvalidMetadata")
    ]


def examples() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(glob.glob(str(ROOT / "examples" / "*.yaml"))):
        docs += [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    return docs


# --------------------------------------------------------------------------- committed files


def test_committed_crds_match_the_models() -> None:
    problems = crdgen.check(ROOT / "crds")
    assert problems == [], "crds/ is stale; run `kubetoll crds --out crds`:\n" + "\n".join(problems)


def test_every_kind_has_a_crd_with_names_columns_and_status() -> None:
    for kind, info in KINDS.items():
        crd = CRDS[kind]
        names = crd["spec"]["names"]
        assert names["plural"] == info.plural and names["shortNames"] and names["categories"] == ["kubetoll"]
        assert crd["spec"]["scope"] == "Namespaced"
        version = crd["spec"]["versions"][0]
        assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
        assert version["additionalPrinterColumns"]
    cols = lambda kind: [c["name"] for c in CRDS[kind]["spec"]["versions"][0]["additionalPrinterColumns"]]  # noqa: E731
    assert cols("TokenBudget") == ["Binding", "Spent", "Limit", "Percent", "Resets", "Unit", "Ready", "Age"]
    # Each TokenBudget and CachePolicy column reads a status field the spend reporter fills.
    paths = lambda kind: [c["jsonPath"] for c in CRDS[kind]["spec"]["versions"][0]["additionalPrinterColumns"]]  # noqa: E731
    assert paths("TokenBudget")[:6] == [
        ".status.binding",
        ".status.display.spent",
        ".status.limit",
        ".status.display.percent",
        ".status.periodEnd",
        ".status.unit",
    ]
    assert [".status.hits", ".status.savedUSD"] == [
        p for p in paths("CachePolicy") if p.startswith(".status.") and "conditions" not in p
    ]
    assert cols("ModelRoute")[:3] == ["Model Name", "First Backend", "Ready"]
    assert cols("ModelBackend")[:3] == ["Provider", "Model", "Ready"]
    assert [
        CRDS[k]["spec"]["names"]["shortNames"] for k in ("ModelBackend", "ModelRoute", "TokenBudget", "CachePolicy")
    ] == [["mb"], ["mr"], ["tb"], ["cp"]]
    status = schema_of("TokenBudget")["properties"]["status"]["properties"]
    assert {"spent", "remaining", "percent", "periodStart", "periodEnd", "tenantsOverBudget", "meters"} <= set(status)


# --------------------------------------------------------------------------- structural


def _walk_structural(node: dict[str, Any], path: str, problems: list[str], root: bool = False) -> None:
    for banned in ("anyOf", "oneOf", "allOf", "not", "$ref", "definitions", "$defs", "title"):
        if banned in node:
            problems.append(f"{path}: {banned} present")
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type")
    ap = node.get("additionalProperties")
    if ap is not None:
        if isinstance(ap, bool):
            problems.append(f"{path}: additionalProperties is a boolean")
        if "properties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
    if node.get("type") == "object" and "properties" in node:
        for name in node.get("required", []):
            if name not in node["properties"]:
                problems.append(f"{path}: required {name} is not a property")
    if "default" in node:
        try:
            jsonschema.Draft4Validator({k: v for k, v in node.items() if k != "default"}).validate(node["default"])
        except jsonschema.ValidationError as exc:
            problems.append(f"{path}: default does not validate: {exc.message}")
    if node.get("x-kubernetes-list-type") == "map":
        item = node["items"]
        for key in node["x-kubernetes-list-map-keys"]:
            if key not in item.get("required", []) and "default" not in item["properties"][key]:
                problems.append(f"{path}: list-map key {key} neither required nor defaulted")
    for name, sub in node.get("properties", {}).items():
        if not sub.get("description") and not (root and name == "metadata"):
            problems.append(f"{path}.{name}: no description")
        _walk_structural(sub, f"{path}.{name}", problems)
    if "items" in node:
        _walk_structural(node["items"], f"{path}[]", problems)
    if isinstance(ap, dict):
        _walk_structural(ap, f"{path}{{}}", problems)


@pytest.mark.parametrize("kind", list(KINDS))
def test_schema_is_structural(kind: str) -> None:
    schema = schema_of(kind)
    problems: list[str] = []
    _walk_structural(schema, kind, problems, root=True)
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert problems == []


def test_every_spec_field_has_a_description_and_rules_compile() -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        for rule in node.get("x-kubernetes-validations", []):
            _CEL.compile(rule["rule"])  # raises on a syntax error
            assert rule["message"]
        for name, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{path}.{name}"
            walk(sub, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], path + "[]")

    for kind in KINDS:
        walk(schema_of(kind)["properties"]["spec"], kind)


# --------------------------------------------------------------------------- examples


def test_examples_cover_every_kind_and_validate() -> None:
    docs = examples()
    kinds = {d["kind"] for d in docs}
    assert set(KINDS) | {"Secret"} == kinds
    for doc in docs:
        if doc["kind"] == "Secret":
            assert doc["apiVersion"] == "v1" and doc["stringData"]
            continue
        assert api_server_errors(doc) == [], doc["metadata"]["name"]
        assert model_errors(doc) == [], doc["metadata"]["name"]
    result = compile_namespace("team-a", docs)
    assert result.ok and result.problems == [], result.problems


def test_examples_use_the_documented_parts() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in examples()}
    providers = {d["spec"]["provider"] for (k, _), d in docs.items() if k == "ModelBackend"}
    assert {"openai", "anthropic", "openai-compatible"} <= providers
    vllm = docs[("ModelBackend", "llama-vllm")]["spec"]
    assert "serviceRef" in vllm and "gpuHourlyUSD" in vllm["pricing"]
    route = docs[("ModelRoute", "chat")]["spec"]
    assert route["downgrade"] and len(route["rules"][0]["backends"]) > 1 and route["cachePolicy"] == "faq-cache"
    tiers = {t["name"] for t in docs[("TokenBudget", "chat-budget")]["spec"]["tiers"]}
    assert tiers == {"free", "premium"}


# --------------------------------------------------------------------------- bad input

BACKEND = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "ModelBackend",
    "metadata": {"name": "b"},
    "spec": {
        "provider": "openai",
        "model": "gpt-4o",
        "endpoint": "https://api.openai.com/v1",
        "credentials": {"secretRef": {"name": "s", "key": "k"}},
    },
}
VLLM = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "ModelBackend",
    "metadata": {"name": "v"},
    "spec": {
        "provider": "openai-compatible",
        "model": "m",
        "serviceRef": {"name": "vllm", "port": 8000},
        "pricing": {"gpuHourlyUSD": 1, "tokensPerSecond": 100},
    },
}
ROUTE = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "ModelRoute",
    "metadata": {"name": "r"},
    "spec": {"rules": [{"backends": ["b"]}]},
}
BUDGET = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "TokenBudget",
    "metadata": {"name": "t"},
    "spec": {"cap": {"usdPerDay": 10}, "tiers": [{"name": "free", "tokensPerMinute": 100}]},
}
CACHE = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "CachePolicy",
    "metadata": {"name": "c"},
    "spec": {"semantic": {"enabled": True, "embeddingBackend": "b"}},
}


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `base` with the dotted `path` set (a value of DELETE removes it)."""
    obj = copy.deepcopy(base)
    parts = path.split(".")
    node = obj
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return obj


DELETE = object()

BAD = [
    # (id, object, text that must appear in both the API server's and the models' messages)
    ("wrong-type", _with(BACKEND, "spec.maxConnections", "many"), "maxConnections"),
    ("missing-model", _with(BACKEND, "spec.model", DELETE), "model"),
    ("missing-provider", _with(BACKEND, "spec.provider", DELETE), "provider"),
    ("unknown-provider", _with(BACKEND, "spec.provider", "cohere"), "provider"),
    ("port-out-of-range", _with(VLLM, "spec.serviceRef.port", 70000), "port"),
    ("endpoint-and-serviceRef", _with(VLLM, "spec.endpoint", "http://x:8000/v1"), "serviceRef"),
    ("neither-endpoint-nor-serviceRef", _with(VLLM, "spec.serviceRef", DELETE), "serviceRef"),
    ("endpoint-not-http", _with(BACKEND, "spec.endpoint", "ftp://files.example.com"), "endpoint"),
    ("azure-without-deployment", _with(BACKEND, "spec.provider", "azure-openai"), "azure"),
    ("azure-on-openai", _with(BACKEND, "spec.azure", {"deployment": "d"}), "azure"),
    ("hosted-without-credentials", _with(BACKEND, "spec.credentials", DELETE), "credentials"),
    ("secret-key-pattern", _with(BACKEND, "spec.credentials.secretRef.key", "a/b"), "key"),
    ("input-price-alone", _with(BACKEND, "spec.pricing", {"inputPerMTok": 1}), "outputPerMTok"),
    ("cached-price-alone", _with(BACKEND, "spec.pricing", {"cachedInputPerMTok": 1}), "cachedInputPerMTok"),
    ("negative-price", _with(BACKEND, "spec.pricing", {"inputPerMTok": -1, "outputPerMTok": 1}), "inputPerMTok"),
    ("gpu-without-throughput", _with(VLLM, "spec.pricing", {"gpuHourlyUSD": 2}), "tokensPerSecond"),
    (
        "token-and-gpu-pricing",
        _with(VLLM, "spec.pricing", {"gpuHourlyUSD": 2, "tokensPerSecond": 10, "inputPerMTok": 1, "outputPerMTok": 1}),
        "gpuHourlyUSD",
    ),
    ("zero-throughput", _with(VLLM, "spec.pricing.tokensPerSecond", 0), "tokensPerSecond"),
    (
        "output-over-context",
        _with(BACKEND, "spec.limits", {"contextWindow": 1000, "maxOutputTokens": 2000}),
        "maxOutputTokens",
    ),
    ("negative-timeout", _with(BACKEND, "spec.timeouts", {"connect": -1}), "connect"),
    ("breaker-zero", _with(BACKEND, "spec.circuitBreaker", {"failureThreshold": 0}), "failureThreshold"),
    ("credential-header", _with(BACKEND, "spec.headers", {"Authorization": "Bearer x"}), "headers"),
    ("backend-name-too-long", _with(BACKEND, "metadata.name", "b" * 64), "metadata.name"),
    ("no-rules", _with(ROUTE, "spec.rules", []), "rules"),
    ("rule-without-backends", _with(ROUTE, "spec.rules", [{"backends": []}]), "backends"),
    (
        "min-over-max-prompt",
        _with(ROUTE, "spec.rules.0.match", {"minPromptTokens": 10, "maxPromptTokens": 5}),
        "minPromptTokens",
    ),
    ("negative-prompt-tokens", _with(ROUTE, "spec.rules.0.match", {"minPromptTokens": -1}), "minPromptTokens"),
    (
        "header-value-and-regex",
        _with(ROUTE, "spec.rules.0.match", {"header": {"name": "x", "value": "a", "regex": "a"}}),
        "regex",
    ),
    ("unknown-fallback", _with(ROUTE, "spec.fallbackOn", ["always"]), "fallbackOn"),
    # Cascades and experiments (docs/routing.md).
    (
        "cascade-unknown-check",
        _with(ROUTE, "spec.rules.0.cascade", {"steps": [{"backends": ["b"]}], "checks": ["vibes"]}),
        "checks",
    ),
    ("cascade-without-steps", _with(ROUTE, "spec.rules.0.cascade", {"steps": []}), "steps"),
    (
        "cascade-bad-streams",
        _with(ROUTE, "spec.rules.0.cascade", {"steps": [{"backends": ["b"]}], "streams": "maybe"}),
        "streams",
    ),
    (
        "backends-and-split",
        _with(
            ROUTE, "spec.rules.0.split", {"experiment": "e", "arms": [{"name": "a", "weight": 1, "backends": ["b"]}]}
        ),
        "backends",
    ),
    (
        "split-with-rule-cascade",
        _with(
            ROUTE,
            "spec.rules",
            [
                {
                    "split": {"experiment": "e", "arms": [{"name": "a", "weight": 1, "backends": ["b"]}]},
                    "cascade": {"steps": [{"backends": ["b"]}]},
                }
            ],
        ),
        "cascade",
    ),
    (
        "split-duplicate-arms",
        _with(
            ROUTE,
            "spec.rules",
            [
                {
                    "split": {
                        "experiment": "e",
                        "arms": [
                            {"name": "a", "weight": 1, "backends": ["b"]},
                            {"name": "a", "weight": 1, "backends": ["b"]},
                        ],
                    }
                }
            ],
        ),
        "arms",
    ),
    (
        "context-summarize-without-summarizer",
        _with(ROUTE, "spec.context", {"maxPromptTokens": 2000, "overflow": "summarize"}),
        "summarizer",
    ),
    (
        "context-summarizer-without-summarize",
        _with(ROUTE, "spec.context", {"maxPromptTokens": 2000, "overflow": "reject", "summarizer": "mini"}),
        "summarizer",
    ),
    (
        "split-all-weights-zero",
        _with(
            ROUTE,
            "spec.rules",
            [{"split": {"experiment": "e", "arms": [{"name": "a", "weight": 0, "backends": ["b"]}]}}],
        ),
        "arms",
    ),
    (
        "split-bad-experiment-name",
        _with(
            ROUTE,
            "spec.rules",
            [{"split": {"experiment": "Big Test", "arms": [{"name": "a", "weight": 1, "backends": ["b"]}]}}],
        ),
        "experiment",
    ),
    (
        "split-bad-sticky-by",
        _with(
            ROUTE,
            "spec.rules",
            [{"split": {"experiment": "e", "stickyBy": "ip", "arms": [{"name": "a", "weight": 1, "backends": ["b"]}]}}],
        ),
        "stickyBy",
    ),
    ("downgrade-zero", _with(ROUTE, "spec.downgrade", {"atPercent": 0, "backends": ["b"]}), "atPercent"),
    ("downgrade-over-100", _with(ROUTE, "spec.downgrade", {"atPercent": 150, "backends": ["b"]}), "atPercent"),
    ("bad-model-name", _with(ROUTE, "spec.modelName", "has space"), "modelName"),
    ("tier-duplicate", _with(BUDGET, "spec.tiers", [{"name": "free"}, {"name": "free"}]), "tiers"),
    ("tier-negative", _with(BUDGET, "spec.tiers.0.tokensPerMinute", -5), "tokensPerMinute"),
    ("tier-zero-usd", _with(BUDGET, "spec.tiers.0.usdPerDay", 0), "usdPerDay"),
    ("tier-bad-name", _with(BUDGET, "spec.tiers.0.name", "Free Tier"), "name"),
    ("tier-bad-on-exhausted", _with(BUDGET, "spec.tiers.0.onExhausted", "explode"), "onExhausted"),
    ("tier-idle-without-session-limit", _with(BUDGET, "spec.tiers.0.sessionIdleSeconds", 1800), "sessionIdleSeconds"),
    ("tier-idle-too-short", _with(BUDGET, "spec.tiers.0.sessionIdleSeconds", 30), "sessionIdleSeconds"),
    ("cap-negative", _with(BUDGET, "spec.cap.usdPerMonth", -1), "usdPerMonth"),
    ("threshold-over-100", _with(BUDGET, "spec.alertThresholds", [150]), "alertThresholds"),
    ("bad-fail-mode", _with(BUDGET, "spec.failMode", "sometimes"), "failMode"),
    ("budget-name-too-long", _with(BUDGET, "metadata.name", "t" * 64), "metadata.name"),
    (
        "jwt-hs256-without-secret",
        _with(
            BUDGET,
            "spec.tenant",
            {"jwt": {"algorithms": ["HS256", "RS256"], "publicKeysFrom": {"configMapName": "k", "key": "jwks"}}},
        ),
        "hs256SecretRef",
    ),
    (
        "jwt-es256-without-keys",
        _with(
            BUDGET,
            "spec.tenant",
            {"jwt": {"algorithms": ["ES256", "HS256"], "hs256SecretRef": {"name": "s", "key": "k"}}},
        ),
        "publicKeysFrom",
    ),
    ("semantic-without-embedder", _with(CACHE, "spec.semantic.embeddingBackend", DELETE), "embeddingBackend"),
    ("threshold-over-1", _with(CACHE, "spec.semantic.threshold", 1.5), "threshold"),
    ("bad-scope", _with(CACHE, "spec.scope", "cluster"), "scope"),
    ("bad-embed", _with(CACHE, "spec.semantic.embed", "everything"), "embed"),
    # The semantic verifier (docs/caching.md, "Verifiers").
    ("rerank-without-backend", _with(CACHE, "spec.semantic.verifier", {"kind": "rerank"}), "backend"),
    ("rules-with-backend", _with(CACHE, "spec.semantic.verifier", {"kind": "rules", "backend": "b"}), "backend"),
    (
        "judge-with-threshold",
        _with(CACHE, "spec.semantic.verifier", {"kind": "judge", "backend": "b", "threshold": 0.5}),
        "threshold",
    ),
    ("judge-with-api", _with(CACHE, "spec.semantic.verifier", {"kind": "judge", "backend": "b", "api": "tei"}), "api"),
    ("bad-verifier-kind", _with(CACHE, "spec.semantic.verifier", {"kind": "oracle"}), "kind"),
    ("bad-rerank-api", _with(CACHE, "spec.semantic.verifier", {"kind": "rerank", "backend": "b", "api": "x"}), "api"),
    (
        "verify-false-with-verifier",
        _with(_with(CACHE, "spec.semantic.verify", False), "spec.semantic.verifier", {"kind": "none"}),
        "verify",
    ),
    ("embedding-timeout-zero", _with(CACHE, "spec.semantic.embeddingTimeoutMs", 0), "embeddingTimeoutMs"),
    (
        "circuit-zero-failures",
        _with(CACHE, "spec.semantic.circuitBreaker", {"failureThreshold": 0}),
        "failureThreshold",
    ),
    # Attribution and onExhausted respond (docs/attribution.md).
    ("respond-without-message", _with(BUDGET, "spec.capOnExhausted", "respond"), "exhaustedResponse"),
    (
        "tier-respond-without-message",
        _with(BUDGET, "spec.tiers", [{"name": "free", "usdPerDay": 1, "onExhausted": "respond"}]),
        "exhaustedResponse",
    ),
    (
        "duplicate-tag-keys",
        _with(BUDGET, "spec.attribution", {"tags": [{"key": "feature"}, {"key": "feature"}]}),
        "tags",
    ),
    ("bad-tag-key", _with(BUDGET, "spec.attribution", {"tags": [{"key": "Feature!"}]}), "key"),
    ("bad-tag-selector-value", _with(BUDGET, "spec.tagSelector", {"feature": "a b"}), "tagSelector"),
    # Error-rate control (docs/caching.md, "Error-rate control").
    ("answer-similarity-alone", _with(CACHE, "spec.semantic.answerSimilarity", 0.9), "answerSimilarity"),
    ("target-error-rate-half", _with(CACHE, "spec.semantic.targetErrorRate", 0.5), "targetErrorRate"),
    ("target-error-rate-zero", _with(CACHE, "spec.semantic.targetErrorRate", 0), "targetErrorRate"),
    ("ttl-zero", _with(CACHE, "spec.exact.ttlSeconds", 0), "ttlSeconds"),
    ("spec-not-object", _with(CACHE, "spec", "yes"), "spec"),
    # Identity from Kubernetes: tier assignments, the tier header policy, workload selectors.
    ("tenant-tier-not-a-tier", _with(BUDGET, "spec.tenantTiers", {"acme": "Gold Tier"}), "tenantTiers"),
    (
        "tenant-tiers-inline-and-from",
        _with(
            BUDGET,
            "spec",
            {
                **BUDGET["spec"],
                "tenantTiers": {"acme": "free"},
                "tenantTiersFrom": {"configMapName": "tiers", "key": "tiers.yaml"},
                # valid, so its own rule is seen passing while the one-of rule fails
                "workloadSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["search-api"]}]},
            },
        ),
        "tenantTiersFrom",
    ),
    (
        "tenant-tiers-from-bad-name",
        _with(BUDGET, "spec.tenantTiersFrom", {"configMapName": "Tiers", "key": "k"}),
        "configMapName",
    ),
    ("tenant-tiers-from-no-key", _with(BUDGET, "spec.tenantTiersFrom", {"configMapName": "tiers"}), "key"),
    ("tier-header-policy-unknown", _with(BUDGET, "spec.tenant", {"tierHeaderPolicy": "sometimes"}), "tierHeaderPolicy"),
    ("tier-order-bad-name", _with(BUDGET, "spec.tenant", {"tierOrder": ["free", "Gold"]}), "tierOrder"),
    (
        "selector-in-without-values",
        _with(BUDGET, "spec.workloadSelector", {"matchExpressions": [{"key": "app", "operator": "In"}]}),
        "values",
    ),
    (
        "selector-exists-with-values",
        _with(
            BUDGET,
            "spec.workloadSelector",
            {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]},
        ),
        "values",
    ),
    (
        "selector-unknown-operator",
        _with(
            BUDGET, "spec.workloadSelector", {"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]}
        ),
        "operator",
    ),
    (
        "selector-bad-label-value",
        _with(BUDGET, "spec.workloadSelector", {"matchLabels": {"app": "search api"}}),
        "matchLabels",
    ),
]


@pytest.mark.parametrize("good", [BACKEND, VLLM, ROUTE, BUDGET, CACHE], ids=lambda o: o["kind"])
def test_good_minimal_objects_pass_both(good: dict[str, Any]) -> None:
    assert api_server_errors(good) == []
    assert model_errors(good) == []


@pytest.mark.parametrize(("obj", "field"), [(o, f) for _, o, f in BAD], ids=[i for i, _, _ in BAD])
def test_bad_objects_are_rejected_naming_the_field(obj: dict[str, Any], field: str) -> None:
    server = api_server_errors(obj)
    assert server, "the API server would accept it"
    assert any(field in e for e in server), server
    models = model_errors(obj)
    assert models, "kubetoll validate would accept it"
    assert any(field in e for e in models), models


def test_every_cel_rule_was_seen_passing_and_failing() -> None:
    # Runs after the cases above in file order; evaluate them here too so it also stands alone.
    for _, obj, _ in BAD:
        api_server_errors(obj)
    for obj in [BACKEND, VLLM, ROUTE, BUDGET, CACHE, *[d for d in examples() if d["kind"] != "Secret"]]:
        api_server_errors(obj)
    # Fields no example above sets (examples/spend-less/ is checked by its own tests).
    api_server_errors(
        _with(ROUTE, "spec.context", {"maxPromptTokens": 2000, "overflow": "summarize", "summarizer": "b"})
    )
    rules = set()
    for kind in KINDS:

        def walk(node: dict[str, Any]) -> None:
            rules.update(v["rule"] for v in node.get("x-kubernetes-validations", []))
            for sub in node.get("properties", {}).values():
                walk(sub)
            if "items" in node:
                walk(node["items"])

        walk(schema_of(kind))
    # "tier limits must be positive" duplicates the schema minimum, so the schema
    # rejects first and the rule is only seen passing; check it fails on its own.
    tier_rule = next(r for r in rules if "tokensPerMinute > 0" in r)
    tier_schema = schema_of("TokenBudget")["properties"]["spec"]["properties"]["tiers"]["items"]
    assert eval_rule(tier_rule, {"name": "x", "usdPerDay": 0}, tier_schema) is False
    # ModelRoute's root rule on long names: a long name without modelName fails, with it passes.
    route_rule = next(r for r in rules if "modelName" in r and "metadata" in r)
    route_schema = schema_of("ModelRoute")
    assert eval_rule(route_rule, {"metadata": {"name": "r" * 200}, "spec": {"rules": []}}, route_schema) is False
    assert (
        eval_rule(route_rule, {"metadata": {"name": "r" * 200}, "spec": {"modelName": "x", "rules": []}}, route_schema)
        is True
    )
    missing = {r: EVALUATED_RULES.get(r, set()) for r in rules if EVALUATED_RULES.get(r, set()) != {True, False}}
    assert missing == {}, "CEL rules not exercised both ways"


def test_cel_rules_agree_with_the_python_twins() -> None:
    """For each attached rule, the CEL verdict equals the model's Python check on the same object."""
    from kubetoll_operator.resources import CelRule, SpecModel

    def models(cls: type) -> list[type[SpecModel]]:
        out = []
        for sub in cls.__subclasses__():
            out.append(sub)
            out += models(sub)
        return out

    checked = 0
    for obj, _ in [(o, f) for _, o, f in BAD] + [(o, "") for o in (BACKEND, VLLM, ROUTE, BUDGET, CACHE)]:
        if not isinstance(obj.get("spec"), dict):
            continue
        schema = schema_of(obj["kind"])
        full = apply_defaults(copy.deepcopy(obj), schema)
        if jsonschema.Draft4Validator(schema).is_valid(full):
            cel_ok = not cel_errors(full, schema)
            py_ok = not model_errors(obj)
            assert cel_ok == py_ok, (obj, cel_errors(full, schema), model_errors(obj))
            checked += 1
    assert checked >= 15
    assert all(isinstance(r, CelRule) for m in models(SpecModel) for r in m.__cel_rules__)
