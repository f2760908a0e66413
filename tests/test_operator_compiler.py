"""compile_namespace: every field reaches RouterConfig, references, defaults, tenancy, hashing."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from typing import Any

from kubetoll_core.router_config import RouterConfig
from kubetoll_operator.compiler import compile_namespace, credential_env_name, credential_file_key

API = "kubetoll.dev/v1alpha1"


def obj(kind: str, name: str, spec: Any, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name, **meta}, "spec": spec}


def backend(name: str, **spec: Any) -> dict[str, Any]:
    base = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "endpoint": "https://api.openai.com/v1",
        "credentials": {"secretRef": {"name": "openai", "key": "api-key"}},
    }
    base.update(spec)
    return obj("ModelBackend", name, base)


def route(name: str, *chains: list[str], **spec: Any) -> dict[str, Any]:
    return obj("ModelRoute", name, {"rules": [{"backends": list(c)} for c in chains], **spec})


def by_reason(result: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for p in result.problems:
        out.setdefault(p.reason, []).append(p)
    return out


# --------------------------------------------------------------------------- every field


FULL_BACKEND = backend(
    "full",
    provider="azure-openai",
    model="gpt-4o",
    endpoint="https://example.openai.azure.com/",
    azure={"deployment": "prod-4o", "apiVersion": "2025-01-01"},
    pricing={"inputPerMTok": 2, "outputPerMTok": 8, "cachedInputPerMTok": 1, "cacheWritePerMTok": 3},
    limits={"contextWindow": 128000, "maxOutputTokens": 4096},
    timeouts={"connect": 1.5, "firstToken": 10, "total": 60},
    circuitBreaker={"failureThreshold": 3, "cooldownSeconds": 12},
    headers={"x-team": "platform"},
    maxConnections=7,
)
GPU_BACKEND = obj(
    "ModelBackend",
    "gpu",
    {
        "provider": "openai-compatible",
        "model": "llama",
        "serviceRef": {"name": "vllm", "port": 8443, "scheme": "https", "path": "/openai/v1"},
        "pricing": {"gpuHourlyUSD": 3.6, "tokensPerSecond": 1000},
    },
)
CATALOG_BACKEND = obj(
    "ModelBackend",
    "hosted-compat",
    {
        "provider": "openai-compatible",
        "model": "x",
        "endpoint": "https://compat.example.com/v1",
        "pricing": {"catalogModel": "gpt-4o", "catalogProvider": "openai"},
    },
)
FULL_ROUTE = obj(
    "ModelRoute",
    "full-route",
    {
        "modelName": "Support/Bot-1",
        "podSelector": {"matchLabels": {"app": "support"}},
        "rules": [
            {
                "name": "big",
                "match": {
                    "minPromptTokens": 100,
                    "maxPromptTokens": 5000,
                    "tiers": ["premium"],
                    "tenants": ["acme"],
                    "header": {"name": "x-lane", "regex": "^fast$"},
                    "keywords": ["refund"],
                    "regex": "order #\\d+",
                },
                "backends": ["full", "gpu"],
            },
            {"name": "rest", "match": {"header": {"name": "x-exact", "value": "1"}}, "backends": ["gpu"]},
        ],
        "fallbackOn": ["rateLimited", "contextLengthExceeded", "budgetExhausted"],
        "maxOutputTokens": 1024,
        "downgrade": {"atPercent": 85, "backends": ["gpu"], "burnRate": {"windowMinutes": 30, "tiers": ["free"]}},
        "cachePolicy": "cache",
    },
)
FULL_BUDGET = obj(
    "TokenBudget",
    "full-budget",
    {
        "routes": ["full-route"],
        "cap": {"usdPerDay": 5, "usdPerMonth": 100, "tokensPerDay": 1000000, "tokensPerMonth": 20000000},
        "capOnExhausted": "allow",
        "timezone": "America/New_York",
        "failMode": "failClosed",
        "suspended": True,
        "tenant": {
            "header": "x-user",
            "useUserField": False,
            "tierHeader": "x-plan",
            "defaultTier": "free",
            "required": True,
            "anonymousTenant": "nobody",
        },
        "tiers": [
            {
                "name": "free",
                "tokensPerMinute": 1000,
                "requestsPerMinute": 10,
                "usdPerDay": 0.5,
                "usdPerMonth": 5,
                "onExhausted": "reject",
            },
            {
                "name": "premium",
                "tokensPerMinute": 100000,
                "usdPerSession": 2,
                "tokensPerSession": 50000,
                "sessionIdleSeconds": 1800,
                "onExhausted": "downgrade",
            },
        ],
        "alertThresholds": [80, 95],
        "tagSelector": {"feature": "search"},
        "attribution": {"tags": [{"key": "feature", "maxValues": 7, "metricLabel": True}], "maxValueLength": 40},
        "exhaustedResponse": "Limit reached; an agent will follow up.",
    },
)
CACHE_POLICY = obj(
    "CachePolicy",
    "cache",
    {
        "exact": {"enabled": True, "ttlSeconds": 60},
        "semantic": {
            "enabled": True,
            "threshold": 0.97,
            "embeddingBackend": "full",
            "ttlSeconds": 600,
            "embed": "allUserMessages",
            "verify": False,
            "maxEntries": 500,
        },
        "scope": "namespace",
        "cacheable": {"maxTemperature": 0.5, "allowTools": True},
        "localMaxBytes": 1048576,
    },
)
FULL = [FULL_BACKEND, GPU_BACKEND, CATALOG_BACKEND, FULL_ROUTE, FULL_BUDGET, CACHE_POLICY]


def test_every_field_reaches_router_config() -> None:
    result = compile_namespace("team-a", FULL)
    assert result.problems == []
    data = json.loads(result.config_json)
    backends = {b["name"]: b for b in data["backends"]}
    assert backends["full"] == {
        "name": "full",
        "provider": "azure-openai",
        "model": "gpt-4o",
        "endpoint": "https://example.openai.azure.com",
        "azure": {"deployment": "prod-4o", "apiVersion": "2025-01-01"},
        "credentials": {"file": "openai_api-key"},
        "pricing": {"inputPerMTok": 2.0, "outputPerMTok": 8.0, "cachedInputPerMTok": 1.0, "cacheWritePerMTok": 3.0},
        "limits": {"contextWindow": 128000, "maxOutputTokens": 4096},
        "timeouts": {"connect": 1.5, "firstToken": 10.0, "total": 60.0},
        "circuitBreaker": {"failureThreshold": 3, "cooldownSeconds": 12.0, "maxRetryAfterSeconds": 300.0},
        "headers": {"x-team": "platform"},
        "maxConnections": 7,
    }
    assert backends["gpu"]["endpoint"] == "https://vllm.team-a.svc.cluster.local:8443/openai/v1"
    assert backends["gpu"]["pricing"] == {"gpuHourlyUSD": 3.6, "tokensPerSecond": 1000.0}
    assert "credentials" not in backends["gpu"]
    assert backends["hosted-compat"]["pricing"] == {"catalogModel": "gpt-4o", "catalogProvider": "openai"}

    (r,) = data["routes"]
    assert r == {
        "name": "Support/Bot-1",
        "podSelector": {"app": "support"},
        "rules": [
            {
                "name": "big",
                "match": {
                    "minPromptTokens": 100,
                    "maxPromptTokens": 5000,
                    "tiers": ["premium"],
                    "tenants": ["acme"],
                    "header": {"name": "x-lane", "regex": "^fast$"},
                    "keywords": ["refund"],
                    "regex": "order #\\d+",
                },
                "backends": ["full", "gpu"],
            },
            {
                "name": "rest",
                "match": {"header": {"name": "x-exact", "value": "1"}, "keywords": [], "tenants": [], "tiers": []},
                "backends": ["gpu"],
            },
        ],
        "fallbackOn": ["rateLimited", "contextLengthExceeded", "budgetExhausted"],
        "maxOutputTokens": 1024,
        "downgrade": {"atPercent": 85.0, "backends": ["gpu"], "burnRate": {"windowMinutes": 30, "tiers": ["free"]}},
        "cachePolicy": "cache",
    }
    (b,) = data["budgets"]
    assert b == {
        "name": "full-budget",
        "routes": ["Support/Bot-1"],  # the ModelRoute's model name, not its resource name
        "cap": {"usdPerDay": 5.0, "usdPerMonth": 100.0, "tokensPerDay": 1000000, "tokensPerMonth": 20000000},
        "capOnExhausted": "allow",
        "timezone": "America/New_York",
        "failMode": "failClosed",
        "suspended": True,
        "tiers": {
            "free": {
                "tokensPerMinute": 1000,
                "requestsPerMinute": 10,
                "usdPerDay": 0.5,
                "usdPerMonth": 5.0,
                "onExhausted": "reject",
            },
            "premium": {
                "tokensPerMinute": 100000,
                "usdPerSession": 2.0,
                "tokensPerSession": 50000,
                "sessionIdleSeconds": 1800,
                "onExhausted": "downgrade",
            },
        },
        "tagSelector": {"feature": "search"},
        "attribution": {"tags": [{"key": "feature", "maxValues": 7, "metricLabel": True}], "maxValueLength": 40},
        "exhaustedResponse": "Limit reached; an agent will follow up.",
    }
    assert data["tenancy"] == {
        "header": "x-user",
        "useUserField": False,
        "tierHeader": "x-plan",
        "defaultTier": "free",
        "required": True,
        "anonymousTenant": "nobody",
    }
    assert data["namespace"] == "team-a"
    assert data["cachePolicies"] == [
        {
            "name": "cache",
            "scope": "namespace",
            "exact": {"enabled": True, "ttlSeconds": 60},
            "semantic": {
                "enabled": True,
                "threshold": 0.97,
                "embeddingBackend": "full",
                "ttlSeconds": 600,
                "embed": "allUserMessages",
                "verify": False,
                "maxEntries": 500,
            },
            "cacheable": {"maxTemperature": 0.5, "allowTools": True},
            "localMaxBytes": 1048576,
        }
    ]
    cache_outcome = result.outcomes[("CachePolicy", "cache")]
    assert cache_outcome.included and cache_outcome.reason == "Compiled"
    assert result.credentials == {"openai_api-key": ("openai", "api-key")}
    # Statuses get what they show.
    assert result.outcomes[("ModelRoute", "full-route")].details == {
        "modelName": "Support/Bot-1",
        "firstBackend": "full",
        "backends": ["full", "gpu"],
    }
    assert result.outcomes[("CachePolicy", "cache")].details == {"routes": ["Support/Bot-1"]}
    prices = result.outcomes[("ModelBackend", "gpu")].details["prices"]
    assert prices["source"] == "gpu-shadow" and abs(prices["inputPerMTok"] - 1.0) < 1e-9
    assert result.outcomes[("ModelBackend", "full")].details["prices"]["cacheWritePerMTok"] == 3.0


def test_defaults() -> None:
    result = compile_namespace("ns", [backend("b"), route("chat", ["b"]), obj("TokenBudget", "t", {})])
    assert result.problems == []
    data = json.loads(result.config_json)
    (b,) = data["backends"]
    assert b["timeouts"] == {"connect": 3.0, "firstToken": 30.0, "total": 300.0}
    assert b["circuitBreaker"] == {"failureThreshold": 5, "cooldownSeconds": 30.0, "maxRetryAfterSeconds": 300.0}
    assert b["maxConnections"] == 100 and b["pricing"] == {} and b["headers"] == {}
    (r,) = data["routes"]
    assert r["name"] == "chat"  # modelName defaults to metadata.name
    assert r["fallbackOn"] == ["rateLimited", "serverError", "timeout", "connectionError"]
    assert r["rules"] == [{"name": "", "match": {"keywords": [], "tenants": [], "tiers": []}, "backends": ["b"]}]
    assert "downgrade" not in r and "maxOutputTokens" not in r
    (t,) = data["budgets"]
    assert (
        t["routes"] == []
        and t["timezone"] == "UTC"
        and t["capOnExhausted"] == "reject"
        and t["failMode"] == "failOpen"
        and t["tiers"] == {}
    )
    assert data["tenancy"] == {
        "header": "x-kubetoll-tenant",
        "useUserField": True,
        "tierHeader": "x-kubetoll-tier",
        "defaultTier": "default",
        "required": False,
        "anonymousTenant": "anonymous",
    }
    RouterConfig.model_validate_json(result.config_json)


def test_service_ref_defaults_and_cluster_domain() -> None:
    gpu = obj(
        "ModelBackend",
        "v",
        {
            "provider": "openai-compatible",
            "model": "m",
            "serviceRef": {"name": "vllm", "port": 8000},
            "pricing": {"inputPerMTok": 0, "outputPerMTok": 0},
        },
    )
    assert (
        json.loads(compile_namespace("ml", [gpu]).config_json)["backends"][0]["endpoint"]
        == "http://vllm.ml.svc.cluster.local:8000/v1"
    )
    assert (
        json.loads(compile_namespace("ml", [gpu], cluster_domain="corp.internal").config_json)["backends"][0][
            "endpoint"
        ]
        == "http://vllm.ml.svc.corp.internal:8000/v1"
    )


# --------------------------------------------------------------------------- references


def test_missing_backend_is_dropped_from_the_chain_with_a_warning() -> None:
    result = compile_namespace(
        "ns", [backend("a"), route("r", ["missing", "a"], downgrade={"atPercent": 50, "backends": ["gone"]})]
    )
    problems = by_reason(result)
    (p,) = problems["BackendNotFound"][:1]
    assert p.field == "spec.rules[0].backends[0]" and "missing" in p.message and p.severity == "warning"
    assert problems["DowngradeDropped"][0].field == "spec.downgrade.backends"
    (r,) = result.config.routes
    assert r.rules[0].backends == ["a"] and r.downgrade is None
    outcome = result.outcomes[("ModelRoute", "r")]
    assert outcome.included and not outcome.refs_ok


def test_a_rule_left_without_backends_is_skipped_and_the_route_stays() -> None:
    result = compile_namespace("ns", [backend("a"), route("r", ["missing"], ["a"]), route("ok", ["a"])])
    assert [r.name for r in result.config.routes] == ["ok", "r"]
    (r,) = [r for r in result.config.routes if r.name == "r"]
    assert [rule.backends for rule in r.rules] == [["a"]]
    (p,) = by_reason(result)["RuleSkipped"]
    assert p.kind == "ModelRoute" and p.name == "r" and p.field == "spec.rules[0].backends" and p.severity == "warning"
    assert result.outcomes[("ModelRoute", "r")].included


def test_a_route_with_no_rule_left_is_left_out() -> None:
    result = compile_namespace("ns", [backend("a"), route("r", ["missing"], ["gone"]), route("ok", ["a"])])
    assert [r.name for r in result.config.routes] == ["ok"]
    (p,) = by_reason(result)["NoBackends"]
    assert p.name == "r" and p.field == "spec.rules" and p.severity == "error"
    assert not result.outcomes[("ModelRoute", "r")].included


def test_invalid_backend_counts_as_not_ready_for_routes() -> None:
    bad = backend("bad", provider="azure-openai")  # no azure.deployment
    result = compile_namespace("ns", [bad, backend("a"), route("r", ["bad", "a"])])
    reasons = by_reason(result)
    assert reasons["InvalidSpec"][0].name == "bad" and reasons["InvalidSpec"][0].field == "spec.azure"
    assert reasons["BackendNotReady"][0].field == "spec.rules[0].backends[0]"
    assert [b.name for b in result.config.backends] == ["a"]


def test_budget_references() -> None:
    resources = [
        backend("a"),
        route("r", ["a"]),
        obj("TokenBudget", "partial", {"routes": ["r", "nope"]}),
        obj("TokenBudget", "none", {"routes": ["nope"]}),
    ]
    result = compile_namespace("ns", resources)
    assert [b.name for b in result.config.budgets] == ["partial"]
    assert result.config.budgets[0].routes == ["r"]
    reasons = by_reason(result)
    assert {(p.name, p.field) for p in reasons["RouteNotFound"]} == {
        ("partial", "spec.routes[1]"),
        ("none", "spec.routes[0]"),
    }
    (p,) = reasons["NoRoutes"]
    assert p.name == "none" and "cover every route" in p.message


def test_budget_on_left_out_route_is_route_not_ready() -> None:
    result = compile_namespace("ns", [route("r", ["missing"]), obj("TokenBudget", "t", {"routes": ["r"]})])
    assert by_reason(result)["RouteNotReady"][0].name == "t"
    assert result.config.budgets == []


def test_cache_policy_references() -> None:
    anthropic = backend(
        "claude", provider="anthropic", model="claude-sonnet-4-5", endpoint="https://api.anthropic.com/v1"
    )
    resources = [
        backend("a"),
        anthropic,
        route("r", ["a"], cachePolicy="nope"),
        route("s", ["a"], cachePolicy="lost"),
        route("t", ["a"], cachePolicy="exact-only"),
        obj("CachePolicy", "lost", {"semantic": {"enabled": True, "embeddingBackend": "ghost"}}),
        obj("CachePolicy", "wrong", {"semantic": {"enabled": True, "embeddingBackend": "claude"}}),
        obj("CachePolicy", "exact-only", {}),
    ]
    result = compile_namespace("ns", resources)
    reasons = by_reason(result)
    assert (
        reasons["CachePolicyNotFound"][0].name == "r" and reasons["CachePolicyNotFound"][0].field == "spec.cachePolicy"
    )
    assert reasons["CachePolicyNotReady"][0].name == "s"
    (p,) = reasons["BackendNotFound"]
    assert p.name == "lost" and p.field == "spec.semantic.embeddingBackend" and p.severity == "error"
    assert reasons["Unsupported"][0].name == "wrong"
    routes = {r.name: r for r in result.config.routes}
    assert set(routes) == {"r", "s", "t"}  # the routes stay, without the broken reference
    assert (
        routes["r"].cache_policy is None
        and routes["s"].cache_policy is None
        and routes["t"].cache_policy == "exact-only"
    )
    assert [p.name for p in result.config.cache_policies] == ["exact-only"]
    assert result.outcomes[("CachePolicy", "exact-only")].details["routes"] == ["t"]


def test_secrets_checked_when_given() -> None:
    resources = [
        backend("a"),
        backend("b", credentials={"secretRef": {"name": "other", "key": "k"}}),
        backend("c", credentials={"secretRef": {"name": "openai", "key": "nokey"}}),
    ]
    result = compile_namespace("ns", resources, secrets={"openai": {"api-key": b"x"}})
    reasons = by_reason(result)
    assert (
        reasons["SecretNotFound"][0].name == "b"
        and reasons["SecretNotFound"][0].field == "spec.credentials.secretRef.name"
    )
    assert (
        reasons["SecretKeyNotFound"][0].name == "c"
        and reasons["SecretKeyNotFound"][0].field == "spec.credentials.secretRef.key"
    )
    assert [b.name for b in result.config.backends] == ["a"]
    assert result.credentials == {"openai_api-key": ("openai", "api-key")}


def test_credentials_in_env_mode() -> None:
    resources = [
        backend("a", credentials={"secretRef": {"name": "openai-creds", "key": "api.key"}}),
        backend("b", credentials={"secretRef": {"name": "openai", "key": "creds-api.key"}}),
    ]
    result = compile_namespace("ns", resources, credential_mode="env")
    assert credential_env_name("openai-creds", "api.key") == "KUBETOLL_SECRET_OPENAI_CREDS_API_KEY"
    assert result.config.backends[0].credentials.env == "KUBETOLL_SECRET_OPENAI_CREDS_API_KEY"
    # b maps to the same variable name: left out, not silently sharing a key.
    assert by_reason(result)["CredentialConflict"][0].name == "b"
    assert result.credentials == {"KUBETOLL_SECRET_OPENAI_CREDS_API_KEY": ("openai-creds", "api.key")}
    assert credential_file_key("openai-creds", "api.key") == "openai-creds_api.key"


def test_price_unknown_backend_is_left_out() -> None:
    result = compile_namespace(
        "ns",
        [
            obj("ModelBackend", "local", {"provider": "openai-compatible", "model": "m", "endpoint": "http://x:1/v1"}),
            backend("a"),
        ],
    )
    (p,) = by_reason(result)["PriceUnknown"]
    assert p.name == "local" and p.field == "spec.pricing" and "price" in p.message
    assert [b.name for b in result.config.backends] == ["a"]


def test_model_name_conflict_leaves_out_the_later_route() -> None:
    result = compile_namespace(
        "ns", [backend("a"), route("z-route", ["a"], modelName="chat"), route("a-route", ["a"], modelName="chat")]
    )
    (p,) = by_reason(result)["ModelNameConflict"]
    assert p.name == "z-route" and "a-route" in p.message
    assert [r.name for r in result.config.routes] == ["chat"]


def test_tenancy_conflict_is_reported_on_the_later_budget() -> None:
    t1 = obj("TokenBudget", "b-first", {"tenant": {"header": "x-user"}})
    t2 = obj(
        "TokenBudget", "c-second", {"tenant": {"header": "x-other"}, "tiers": [{"name": "free", "tokensPerMinute": 5}]}
    )
    t3 = obj("TokenBudget", "d-same", {"tenant": {"header": "x-user"}})
    t0 = obj("TokenBudget", "a-none", {})
    result = compile_namespace("ns", [t3, t2, t1, t0])
    (p,) = by_reason(result)["TenancyConflict"]
    assert p.name == "c-second" and p.field == "spec.tenant" and "header" in p.message and "b-first" in p.message
    assert result.config.tenancy.header == "x-user"
    assert [b.name for b in result.config.budgets] == ["a-none", "b-first", "c-second", "d-same"]  # limits still apply
    assert result.outcomes[("TokenBudget", "c-second")].details["tenancy"] == "conflict"
    assert result.outcomes[("TokenBudget", "d-same")].details["tenancy"] == "accepted"


def test_file_level_problems() -> None:
    long_name = backend("x" * 64)
    dup = [backend("a"), backend("a", model="gpt-4o")]
    other = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}
    unknown = {"apiVersion": API, "kind": "ModelThing", "metadata": {"name": "m"}, "spec": {}}
    old = {**backend("old"), "apiVersion": "kubetoll.dev/v1"}
    unnamed = {"apiVersion": API, "kind": "ModelRoute", "metadata": {}, "spec": {}}
    extra = backend("e", colour="blue")
    result = compile_namespace("ns", [long_name, *dup, other, unknown, old, unnamed, extra])
    reasons = by_reason(result)
    assert reasons["InvalidName"][0].field == "metadata.name"
    assert reasons["Duplicate"][0].name == "a"
    assert reasons["UnknownKind"][0].kind == "ModelThing"
    assert reasons["UnsupportedVersion"][0].name == "old"
    assert reasons["InvalidMetadata"][0].field == "metadata.name"
    assert reasons["InvalidSpec"][0].field == "spec.colour"
    assert [b.model for b in result.config.backends] == ["gpt-4o-mini"]  # the first "a"


# --------------------------------------------------------------------------- output


def test_json_is_canonical_and_hash_is_its_sha256() -> None:
    result = compile_namespace("team-a", FULL)
    text = result.config_json
    assert result.content_hash == hashlib.sha256(text.encode()).hexdigest()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert RouterConfig.model_validate_json(text) == result.config


def test_hash_is_stable_across_input_order_and_changes_with_content() -> None:
    first = compile_namespace("team-a", FULL)
    for seed in range(5):
        shuffled = copy.deepcopy(FULL)
        random.Random(seed).shuffle(shuffled)
        assert compile_namespace("team-a", shuffled).content_hash == first.content_hash
    changed = copy.deepcopy(FULL)
    changed[0]["spec"]["maxConnections"] = 8
    assert compile_namespace("team-a", changed).content_hash != first.content_hash
    assert compile_namespace("team-b", FULL).content_hash != first.content_hash
    # Status-only and metadata changes do not change the config.
    noisy = copy.deepcopy(FULL)
    noisy[0]["status"] = {"conditions": []}
    noisy[0]["metadata"]["resourceVersion"] = "42"
    assert compile_namespace("team-a", noisy).content_hash == first.content_hash


def test_empty_namespace_compiles_to_an_empty_config() -> None:
    result = compile_namespace("ns", [])
    assert result.ok and result.config.backends == [] and result.config.routes == []
