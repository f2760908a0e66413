"""The custom resources: ModelBackend, ModelRoute, TokenBudget and CachePolicy.

These pydantic models are the single source of truth for the resources' shape. The
operator and `kubetoll validate/compile/run` parse `spec` with them, and `crdgen`
turns them into the CRDs' openAPIV3Schema. A rule that spans fields is written
once as a `CelRule`: its CEL text goes into the CRD as an `x-kubernetes-validations`
entry (so the API server enforces it) and its Python twin runs when the model is
parsed (so files checked offline get the same answer). Tests hold the two equal.

Field names are camelCase on the wire (aliases) and snake_case in Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kubetoll.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kubetoll"

# Kubernetes object names (RFC 1123 subdomain) and Service names (RFC 1035 label).
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SERVICE_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
# What the router accepts as a tier name (safe in metric labels and Redis keys).
TIER_NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
# What apps send as `model` (kept equal to the sidecar's ROUTE_NAME_PATTERN).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
# An HTTP header field name (RFC 9110 token).
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
URL_PATTERN = r"^https?://[^/\s]+(/\S*)?$"
# Headers that carry credentials; those go through credentials.secretRef instead.
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key", "proxy-authorization")


@dataclass(frozen=True)
class CelRule:
    """A rule that spans fields: CEL for the API server, and the same rule in Python.

    `rule` is evaluated with `self` bound to the object the rule is attached to;
    `check` gets the parsed model and returns True when the object is valid.
    `field_path` (relative to that object, as in x-kubernetes-validations) names
    the field the message is about.
    """

    rule: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None

    def to_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


def _add_cel_rules(schema: dict[str, Any], cls: type) -> None:
    rules: tuple[CelRule, ...] = getattr(cls, "__cel_rules__", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.to_schema() for r in rules]


class SpecModel(BaseModel):
    """Base for every part of a spec: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        json_schema_extra=_add_cel_rules,
    )

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Any:
        failed = []
        for rule in type(self).__cel_rules__:
            if not rule.check(self):
                where = rule.field_path.lstrip(".") + ": " if rule.field_path else ""
                failed.append(where + rule.message)
        if failed:
            raise ValueError("; ".join(failed))
        return self


def _compiles(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
    return value


# --------------------------------------------------------------------------- shared enums


class Provider(str, Enum):
    """The provider's wire protocol."""

    openai = "openai"
    azure_openai = "azure-openai"
    anthropic = "anthropic"
    openai_compatible = "openai-compatible"


HOSTED_PROVIDERS = ("openai", "azure-openai", "anthropic")


class FailureClass(str, Enum):
    """A failure of one attempt at a backend that moves on to the next backend in the chain."""

    rate_limited = "rateLimited"
    server_error = "serverError"
    timeout = "timeout"
    connection_error = "connectionError"
    context_length_exceeded = "contextLengthExceeded"
    budget_exhausted = "budgetExhausted"


class OnExhausted(str, Enum):
    """What happens to a request once a limit is spent: reject (429 with Retry-After), downgrade (serve from the route's downgrade backends) or allow (serve, count the overage, alert)."""

    reject = "reject"
    downgrade = "downgrade"
    allow = "allow"


class FailMode(str, Enum):
    """What a budget does when the shared budget store (Redis) cannot answer in time: failOpen serves on a conservative local allowance and reconciles later, failClosed rejects with 503."""

    fail_open = "failOpen"
    fail_closed = "failClosed"


class Scheme(str, Enum):
    """URL scheme of an in-cluster Service."""

    http = "http"
    https = "https"


class CacheScope(str, Enum):
    """Who shares cache entries: each tenant their own (tenant) or everyone in the namespace (namespace)."""

    tenant = "tenant"
    namespace = "namespace"


class EmbedInput(str, Enum):
    """What text of a request is embedded for the semantic cache."""

    last_user_message = "lastUserMessage"
    all_user_messages = "allUserMessages"


# --------------------------------------------------------------------------- ModelBackend


class ServiceRef(SpecModel):
    """An in-cluster Service in the resource's own namespace serving an OpenAI-compatible API."""

    name: str = Field(
        max_length=63, pattern=SERVICE_NAME_PATTERN, description="Name of the Service, in the same namespace."
    )
    port: int = Field(ge=1, le=65535, description="Service port.")
    scheme: Scheme = Field(Scheme.http, description="http or https.")
    path: str = Field(
        "/v1",
        max_length=256,
        pattern=r"^/\S*$",
        description="Path prefix of the API on the Service; the endpoint becomes scheme://name.namespace.svc.cluster.local:port+path.",
    )


class SecretKeyRef(SpecModel):
    """A key of a Secret in the resource's own namespace."""

    name: str = Field(max_length=253, pattern=OBJECT_NAME_PATTERN, description="Name of the Secret.")
    key: str = Field(max_length=253, pattern=SECRET_KEY_PATTERN, description="Key in the Secret's data that holds the API key.")


class BackendCredentials(SpecModel):
    """Where the API key comes from. The operator copies the key into the kubetoll-credentials Secret that only the sidecar mounts."""

    secret_ref: SecretKeyRef = Field(description="The Secret and key holding the provider API key.")


class AzureSettings(SpecModel):
    """Azure OpenAI deployment settings (provider azure-openai only)."""

    deployment: str = Field(min_length=1, max_length=256, description="Azure OpenAI deployment name.")
    api_version: str = Field(
        "2024-10-21", min_length=1, max_length=64, description="Azure OpenAI REST API version (api-version query parameter)."
    )


class Pricing(SpecModel):
    """USD prices. Leave empty to use the price catalogue for the backend's model; per-million-token prices override it; gpuHourlyUSD with tokensPerSecond gives an in-cluster GPU server a shadow price."""

    input_per_mtok: float | None = Field(None, ge=0, alias="inputPerMTok", description="USD per million input (prompt) tokens.")
    output_per_mtok: float | None = Field(None, ge=0, alias="outputPerMTok", description="USD per million output (completion) tokens.")
    cached_input_per_mtok: float | None = Field(
        None, ge=0, alias="cachedInputPerMTok", description="USD per million input tokens read from the provider's prompt cache (default: the input price)."
    )
    cache_write_per_mtok: float | None = Field(
        None, ge=0, alias="cacheWritePerMTok", description="USD per million input tokens written to the provider's prompt cache (Anthropic; default: the input price)."
    )
    gpu_hourly_usd: float | None = Field(None, ge=0, alias="gpuHourlyUSD", description="What the GPU server costs per hour, in USD.")
    tokens_per_second: float | None = Field(
        None, gt=0, alias="tokensPerSecond", description="Sustained throughput of the GPU server (input and output tokens)."
    )
    catalog_model: str | None = Field(
        None, min_length=1, max_length=256, alias="catalogModel", description="Look this model id up in the price catalogue instead of spec.model."
    )
    catalog_provider: str | None = Field(
        None, min_length=1, max_length=64, alias="catalogProvider", description="Price catalogue provider id (e.g. openai, anthropic, azure)."
    )

    __cel_rules__ = (
        CelRule(
            "has(self.inputPerMTok) == has(self.outputPerMTok)",
            "inputPerMTok and outputPerMTok come in pairs: set both or neither",
            lambda p: (p.input_per_mtok is None) == (p.output_per_mtok is None),
        ),
        CelRule(
            "(!has(self.cachedInputPerMTok) && !has(self.cacheWritePerMTok)) || has(self.inputPerMTok)",
            "cachedInputPerMTok and cacheWritePerMTok need inputPerMTok and outputPerMTok",
            lambda p: (p.cached_input_per_mtok is None and p.cache_write_per_mtok is None) or p.input_per_mtok is not None,
        ),
        CelRule(
            "has(self.gpuHourlyUSD) == has(self.tokensPerSecond)",
            "gpuHourlyUSD and tokensPerSecond come in pairs: set both or neither",
            lambda p: (p.gpu_hourly_usd is None) == (p.tokens_per_second is None),
        ),
        CelRule(
            "!(has(self.gpuHourlyUSD) || has(self.tokensPerSecond)) || !(has(self.inputPerMTok) || has(self.outputPerMTok) || has(self.cachedInputPerMTok) || has(self.cacheWritePerMTok))",
            "use per-million-token prices or gpuHourlyUSD with tokensPerSecond, not both",
            lambda p: not (p.gpu_hourly_usd is not None or p.tokens_per_second is not None)
            or not any(
                v is not None
                for v in (p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok, p.cache_write_per_mtok)
            ),
        ),
    )

    @property
    def is_override(self) -> bool:
        return self.input_per_mtok is not None or self.gpu_hourly_usd is not None


class BackendLimits(SpecModel):
    """The provider's limits for this model."""

    context_window: int | None = Field(None, gt=0, description="Prompt plus output tokens the model accepts.")
    max_output_tokens: int | None = Field(None, gt=0, description="Most output tokens the model produces in one response.")

    __cel_rules__ = (
        CelRule(
            "!has(self.contextWindow) || !has(self.maxOutputTokens) || self.maxOutputTokens <= self.contextWindow",
            "maxOutputTokens must not exceed contextWindow",
            lambda m: m.context_window is None or m.max_output_tokens is None or m.max_output_tokens <= m.context_window,
            ".maxOutputTokens",
        ),
    )


class Timeouts(SpecModel):
    """Per-attempt timeouts, in seconds."""

    connect: float = Field(3.0, gt=0, le=3600, description="Seconds to open a connection.")
    first_token: float = Field(30.0, gt=0, le=3600, description="Seconds until the response headers or the first streamed byte.")
    total: float = Field(300.0, gt=0, le=86400, description="Seconds for the whole attempt.")


class CircuitBreaker(SpecModel):
    """Stop sending to a backend that keeps failing, for a while."""

    failure_threshold: int = Field(5, ge=1, le=10000, description="Consecutive failures that open the circuit.")
    cooldown_seconds: float = Field(30.0, gt=0, le=86400, description="How long an open circuit stays open before one probe request.")


class ModelBackendSpec(SpecModel):
    """One model at one endpoint."""

    provider: Provider = Field(description="Wire protocol: openai, azure-openai, anthropic or openai-compatible (vLLM, TGI, Ollama, llama.cpp, ...).")
    model: str = Field(min_length=1, max_length=256, description="The model id sent upstream (for azure-openai, the model behind the deployment, used for pricing).")
    endpoint: str | None = Field(
        None, max_length=2048, pattern=URL_PATTERN, description="Base URL of the API, e.g. https://api.openai.com/v1. Set this or serviceRef."
    )
    service_ref: ServiceRef | None = Field(None, description="An in-cluster Service to call instead of an endpoint URL. Set this or endpoint.")
    credentials: BackendCredentials | None = Field(None, description="API key source. Required for the hosted providers (openai, azure-openai, anthropic).")
    azure: AzureSettings | None = Field(None, description="Azure OpenAI settings; required for provider azure-openai, not allowed for the others.")
    pricing: Pricing = Field(default_factory=Pricing, description="Prices in USD; empty means the price catalogue.")
    limits: BackendLimits = Field(default_factory=BackendLimits, description="The model's context window and output limit.")
    timeouts: Timeouts = Field(default_factory=Timeouts, description="Per-attempt timeouts in seconds.")
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker, description="Circuit breaker for this backend.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra non-secret request headers sent upstream (credential headers are not allowed here)."
    )
    max_connections: int = Field(100, ge=1, le=10000, description="Size of this backend's keep-alive connection pool per sidecar.")

    __cel_rules__ = (
        CelRule(
            "has(self.endpoint) != has(self.serviceRef)",
            "set exactly one of endpoint or serviceRef",
            lambda s: (s.endpoint is None) != (s.service_ref is None),
        ),
        CelRule(
            "self.provider != 'azure-openai' || has(self.azure)",
            "provider azure-openai needs azure.deployment",
            lambda s: s.provider is not Provider.azure_openai or s.azure is not None,
            ".azure",
        ),
        CelRule(
            "self.provider == 'azure-openai' || !has(self.azure)",
            "azure is only for provider azure-openai",
            lambda s: s.provider is Provider.azure_openai or s.azure is None,
            ".azure",
        ),
        CelRule(
            "!(self.provider in ['openai', 'azure-openai', 'anthropic']) || has(self.credentials)",
            "hosted providers (openai, azure-openai, anthropic) need credentials.secretRef",
            lambda s: s.provider.value not in HOSTED_PROVIDERS or s.credentials is not None,
            ".credentials",
        ),
        CelRule(
            "!has(self.headers) || self.headers.all(h, !h.matches('(?i)^(authorization|api-key|x-api-key|proxy-authorization)$'))",
            "headers must not carry credentials (Authorization, api-key, x-api-key, Proxy-Authorization); use credentials.secretRef",
            lambda s: all(h.lower() not in CREDENTIAL_HEADERS for h in s.headers),
            ".headers",
        ),
    )

    @field_validator("headers")
    @classmethod
    def _header_names(cls, v: dict[str, str]) -> dict[str, str]:
        for h in v:
            if not re.match(HEADER_NAME_PATTERN, h):
                raise ValueError(f"{h!r} is not a valid header name")
        return v


# --------------------------------------------------------------------------- ModelRoute


class PodSelector(SpecModel):
    """Serve the route only in pods whose labels include all of these."""

    match_labels: dict[str, str] = Field(default_factory=dict, description="Labels a pod must carry (all of them) for this route to be served in it.")


class HeaderMatch(SpecModel):
    """A request header condition. With neither value nor regex, the header only has to be present."""

    name: str = Field(min_length=1, max_length=256, pattern=HEADER_NAME_PATTERN, description="Header name (case-insensitive).")
    value: str | None = Field(None, max_length=1024, description="Exact value the header must have.")
    regex: str | None = Field(None, max_length=1024, description="Regular expression searched in the header value.")

    __cel_rules__ = (
        CelRule(
            "!(has(self.value) && has(self.regex))",
            "set at most one of value or regex",
            lambda h: h.value is None or h.regex is None,
        ),
    )

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        return _compiles(v)


class RuleMatch(SpecModel):
    """Conditions on a request; all given ones must hold. An empty match matches every request."""

    min_prompt_tokens: int | None = Field(None, ge=0, description="The prompt has at least this many tokens.")
    max_prompt_tokens: int | None = Field(None, ge=0, description="The prompt has at most this many tokens.")
    tiers: list[str] = Field(
        default_factory=list, max_length=64, description="The tenant's tier is one of these.",
        json_schema_extra={"items": {"type": "string", "maxLength": 63, "description": "A tier name."}},
    )
    tenants: list[str] = Field(
        default_factory=list, max_length=256, description="The tenant id is one of these.",
        json_schema_extra={"items": {"type": "string", "maxLength": 256, "description": "A tenant id."}},
    )
    header: HeaderMatch | None = Field(None, description="A request header condition.")
    keywords: list[str] = Field(
        default_factory=list, max_length=256, description="Any of these words appears in the last user message (case-insensitive).",
        json_schema_extra={"items": {"type": "string", "maxLength": 256, "minLength": 1, "description": "A keyword."}},
    )
    regex: str | None = Field(None, max_length=1024, description="Regular expression searched in the last user message.")

    __cel_rules__ = (
        CelRule(
            "!has(self.minPromptTokens) || !has(self.maxPromptTokens) || self.minPromptTokens <= self.maxPromptTokens",
            "minPromptTokens must not be greater than maxPromptTokens",
            lambda m: m.min_prompt_tokens is None or m.max_prompt_tokens is None or m.min_prompt_tokens <= m.max_prompt_tokens,
            ".minPromptTokens",
        ),
    )

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        return _compiles(v)


class Rule(SpecModel):
    """A routing rule: when `match` holds, try `backends` in order."""

    name: str = Field("", max_length=63, description="Rule name, shown in logs and metrics.")
    match: RuleMatch = Field(default_factory=RuleMatch, description="When this rule applies; empty matches every request.")
    backends: list[str] = Field(
        min_length=1, max_length=16, description="ModelBackend names: the fallback chain, in order.",
        json_schema_extra={"items": {"type": "string", "maxLength": 253, "description": "Name of a ModelBackend in this namespace."}},
    )


class Downgrade(SpecModel):
    """Budget-aware downgrade: past a share of the budget, serve from cheaper backends."""

    at_percent: float = Field(ge=1, le=100, description="Budget use, in percent, from which the downgrade backends serve this route.")
    backends: list[str] = Field(
        min_length=1, max_length=16, description="ModelBackend names used once the budget use reaches atPercent, in order.",
        json_schema_extra={"items": {"type": "string", "maxLength": 253, "description": "Name of a ModelBackend in this namespace."}},
    )


DEFAULT_FALLBACK_ON = ["rateLimited", "serverError", "timeout", "connectionError"]


class ModelRouteSpec(SpecModel):
    """The model name apps ask for, and how its requests are routed."""

    model_name: str | None = Field(
        None, pattern=MODEL_NAME_PATTERN, max_length=128, description="The `model` apps send. Defaults to the resource's name."
    )
    pod_selector: PodSelector | None = Field(None, description="Serve this route only in matching pods (default: every pod).")
    rules: list[Rule] = Field(min_length=1, max_length=32, description="Ordered rules; the first whose match holds picks the backends.")
    fallback_on: list[FailureClass] = Field(
        default_factory=lambda: [FailureClass(v) for v in DEFAULT_FALLBACK_ON],
        max_length=6,
        description="Failures that move on to the next backend in the chain.",
        json_schema_extra={"x-kubernetes-list-type": "set", "default": DEFAULT_FALLBACK_ON},
    )
    max_output_tokens: int | None = Field(None, gt=0, description="Cap on max_tokens; also the output reservation when a request gives none.")
    downgrade: Downgrade | None = Field(None, description="Cheaper backends once the budget covering this route is this far spent.")
    cache_policy: str | None = Field(None, max_length=253, pattern=OBJECT_NAME_PATTERN, description="Name of a CachePolicy in this namespace.")


# --------------------------------------------------------------------------- TokenBudget


class Cap(SpecModel):
    """A namespace-wide cap across every tenant; days and months reset on the calendar in the budget's timezone."""

    usd_per_day: float | None = Field(None, gt=0, alias="usdPerDay", description="USD per calendar day.")
    usd_per_month: float | None = Field(None, gt=0, alias="usdPerMonth", description="USD per calendar month.")
    tokens_per_day: int | None = Field(None, gt=0, description="Tokens (input plus output) per calendar day.")
    tokens_per_month: int | None = Field(None, gt=0, description="Tokens (input plus output) per calendar month.")


class Tenant(SpecModel):
    """How the sidecar names the end user (tenant) and their tier. Every budget in a namespace that sets this must agree."""

    header: str = Field("x-kubetoll-tenant", max_length=256, pattern=HEADER_NAME_PATTERN, description="Request header carrying the tenant id.")
    use_user_field: bool = Field(True, description="Fall back to the OpenAI `user` field when the header is absent.")
    tier_header: str = Field("x-kubetoll-tier", max_length=256, pattern=HEADER_NAME_PATTERN, description="Request header carrying the tier name.")
    default_tier: str = Field("default", max_length=63, pattern=TIER_NAME_PATTERN, description="Tier of a tenant whose request names none.")
    required: bool = Field(False, description="Reject (400) requests that name no tenant.")
    anonymous_tenant: str = Field("anonymous", min_length=1, max_length=256, description="Tenant id used when a request names none and a tenant is not required.")


class Tier(SpecModel):
    """Limits for each tenant of one tier."""

    name: str = Field(max_length=63, pattern=TIER_NAME_PATTERN, description="Tier name, as sent in the tier header.")
    tokens_per_minute: int | None = Field(None, gt=0, description="Token bucket: tokens per minute per tenant.")
    requests_per_minute: int | None = Field(None, gt=0, description="Requests per minute per tenant.")
    usd_per_day: float | None = Field(None, gt=0, alias="usdPerDay", description="USD per calendar day per tenant.")
    usd_per_month: float | None = Field(None, gt=0, alias="usdPerMonth", description="USD per calendar month per tenant.")
    on_exhausted: OnExhausted = Field(OnExhausted.reject, description="What happens once a tenant has spent a limit.")

    __cel_rules__ = (
        CelRule(
            "(!has(self.tokensPerMinute) || self.tokensPerMinute > 0) && (!has(self.requestsPerMinute) || self.requestsPerMinute > 0) && (!has(self.usdPerDay) || self.usdPerDay > 0.0) && (!has(self.usdPerMonth) || self.usdPerMonth > 0.0)",
            "tier limits must be positive",
            lambda t: all(v is None or v > 0 for v in (t.tokens_per_minute, t.requests_per_minute, t.usd_per_day, t.usd_per_month)),
        ),
    )


def _valid_timezone(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {v!r} (use an IANA name such as UTC or Europe/Berlin)") from exc
    return v


class TokenBudgetSpec(SpecModel):
    """Spend limits for routes: a namespace-wide cap and per-tenant tiers."""

    routes: list[str] = Field(
        default_factory=list, max_length=256, description="ModelRoute names this budget covers; empty means every route in the namespace.",
        json_schema_extra={"items": {"type": "string", "maxLength": 253, "description": "Name of a ModelRoute in this namespace."}, "x-kubernetes-list-type": "set"},
    )
    cap: Cap = Field(default_factory=Cap, description="Namespace-wide cap across every tenant.")
    cap_on_exhausted: OnExhausted = Field(OnExhausted.reject, description="What happens once the namespace cap is spent.")
    timezone: str = Field("UTC", max_length=64, pattern=r"^[A-Za-z0-9_+\-/]+$", description="IANA timezone for the calendar day and month resets.")
    tenant: Tenant | None = Field(None, description="Tenant identity; budgets in one namespace that set it must agree.")
    fail_mode: FailMode = Field(FailMode.fail_open, description="What happens when the budget store (Redis) cannot answer in time.")
    suspended: bool = Field(False, description="Kill switch: admit no request under this budget (403) while true.")
    tiers: list[Tier] = Field(
        default_factory=list, max_length=64, description="Per-tenant tiers.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    alert_thresholds: list[int] = Field(
        default_factory=lambda: [50, 75, 90, 100],
        max_length=20,
        description="Percentages of each namespace cap limit at which the operator posts an Event, once per threshold and period (Warning from 90, Normal below); needs a Redis budget store.",
        json_schema_extra={
            "items": {"type": "integer", "minimum": 1, "maximum": 100, "description": "Percent of the cap."},
            "x-kubernetes-list-type": "set",
            "default": [50, 75, 90, 100],
        },
    )

    __cel_rules__ = (
        CelRule(
            "!has(self.tiers) || self.tiers.all(t, self.tiers.filter(u, u.name == t.name).size() == 1)",
            "tier names must be unique",
            lambda s: len({t.name for t in s.tiers}) == len(s.tiers),
            ".tiers",
        ),
    )

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return _valid_timezone(v)

    @field_validator("alert_thresholds")
    @classmethod
    def _thresholds(cls, v: list[int]) -> list[int]:
        for t in v:
            if not 1 <= t <= 100:
                raise ValueError(f"alert threshold {t} is not between 1 and 100")
        if len(set(v)) != len(v):
            raise ValueError("alert thresholds must be unique")
        return v


# --------------------------------------------------------------------------- CachePolicy


class ExactCache(SpecModel):
    """Serve a stored answer to the same normalised request."""

    enabled: bool = Field(True, description="Turn exact caching on.")
    ttl_seconds: int = Field(3600, ge=1, le=2592000, description="How long an entry lives, in seconds.")


class SemanticCache(SpecModel):
    """Serve a stored answer to a near-identical question that passes a strict agreement check."""

    enabled: bool = Field(False, description="Turn semantic caching on.")
    threshold: float = Field(0.7, gt=0, le=1, description="Cosine similarity (model-specific; see docs/caching.md) at or above which a stored question is a candidate (a hit also needs the strict agreement check when verify is on).")
    embedding_backend: str | None = Field(
        None, max_length=253, pattern=OBJECT_NAME_PATTERN, description="Name of a ModelBackend in this namespace that serves /v1/embeddings."
    )
    ttl_seconds: int = Field(3600, ge=1, le=2592000, description="How long an entry lives, in seconds.")
    embed: EmbedInput = Field(EmbedInput.last_user_message, description="What is embedded: the last user message or all user messages.")
    verify: bool = Field(True, description="Also require the two questions to agree on numbers, negation, named things and the action asked for.")
    max_entries: int = Field(20000, ge=1, le=100000000, description="Entries in each sidecar's local semantic index.")

    __cel_rules__ = (
        CelRule(
            "!self.enabled || has(self.embeddingBackend)",
            "semantic caching needs embeddingBackend",
            lambda s: not s.enabled or s.embedding_backend is not None,
            ".embeddingBackend",
        ),
    )


class Cacheable(SpecModel):
    """Which requests may be cached."""

    max_temperature: float = Field(0.0, ge=0, le=2, description="Requests with a higher temperature are not cached.")
    allow_tools: bool = Field(False, description="Cache requests that offer tools.")


class CachePolicySpec(SpecModel):
    """Exact and semantic response caching for the routes that name this policy."""

    exact: ExactCache = Field(default_factory=ExactCache, description="Exact-match caching.")
    semantic: SemanticCache = Field(default_factory=SemanticCache, description="Semantic caching.")
    scope: CacheScope = Field(CacheScope.tenant, description="Who shares entries: tenant (each tenant their own) or namespace.")
    cacheable: Cacheable = Field(default_factory=Cacheable, description="Which requests may be cached.")
    local_max_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Bound of each sidecar's in-process LRU, in bytes.")


# --------------------------------------------------------------------------- status


class ConditionStatus(str, Enum):
    """Whether the condition holds."""

    true = "True"
    false = "False"
    unknown = "Unknown"


class StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class Condition(StatusModel):
    """One aspect of the resource's state, Kubernetes style."""

    type: str = Field(max_length=316, description="Condition type: Ready and ResolvedRefs (every kind); TenancyAccepted, SpendKnown and ThresholdReached (TokenBudget).")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="CamelCase reason for the status.")
    message: str = Field("", max_length=32768, description="Human-readable detail naming the field.")
    last_transition_time: str | None = Field(None, description="When the status last changed (RFC 3339).", json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation the condition was computed from.")


_CONDITIONS_EXTRA = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class ResolvedPrices(StatusModel):
    """Prices the router uses for this backend, in USD per million tokens."""

    source: str = Field(description="Where the prices come from: override, gpu-shadow, or catalog:<provider>/<model>.")
    input_per_mtok: float | None = Field(None, alias="inputPerMTok", description="USD per million input tokens.")
    output_per_mtok: float | None = Field(None, alias="outputPerMTok", description="USD per million output tokens.")
    cached_input_per_mtok: float | None = Field(None, alias="cachedInputPerMTok", description="USD per million cached input tokens.")
    cache_write_per_mtok: float | None = Field(None, alias="cacheWritePerMTok", description="USD per million cache-write tokens.")
    note: str | None = Field(None, description="Why a price is missing or how it was derived.")


class ModelBackendStatus(StatusModel):
    """Observed state of a ModelBackend."""

    observed_generation: int | None = Field(None, description="metadata.generation last compiled.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready and ResolvedRefs.", json_schema_extra=_CONDITIONS_EXTRA)
    endpoint: str | None = Field(None, description="The resolved endpoint URL.")
    prices: ResolvedPrices | None = Field(None, description="Resolved prices.")


class ModelRouteStatus(StatusModel):
    """Observed state of a ModelRoute."""

    observed_generation: int | None = Field(None, description="metadata.generation last compiled.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready and ResolvedRefs.", json_schema_extra=_CONDITIONS_EXTRA)
    model_name: str | None = Field(None, description="The model name apps send for this route.")
    first_backend: str | None = Field(None, description="First backend of the first rule.")
    backends: list[str] = Field(default_factory=list, description="Every backend the route may use, resolved.")


class BudgetMeterStatus(StatusModel):
    """One level of a budget in its current calendar period: the namespace cap, or a tier summed over its tenants."""

    level: str = Field(description="cap (the namespace cap) or tier:<name> (that tier's tenants).")
    unit: str = Field(description="USD or tokens.")
    window: str = Field(description="day or month.")
    period: str = Field(description="Period id in the budget's timezone: 2026-11-22 (day) or 2026-11 (month).")
    period_start: str | None = Field(None, description="Start of the period (RFC 3339).", json_schema_extra={"format": "date-time"})
    period_end: str | None = Field(None, description="End of the period (RFC 3339).", json_schema_extra={"format": "date-time"})
    limit: float | None = Field(None, description="cap: the limit for the period; tier: each tenant's limit.")
    spent: float | None = Field(None, description="Settled spend in the period (tier: all its tenants together).")
    remaining: float | None = Field(None, description="cap only: limit minus spent, at least 0.")
    percent: float | None = Field(None, description="cap only: percent of the limit spent.")
    tenants: int | None = Field(None, description="tier only: tenants with spend in the period.")
    tenants_over: int | None = Field(None, description="tier only: tenants at or over their limit.")
    max_percent: float | None = Field(None, description="tier only: the highest percent any tenant has spent.")


class TokenBudgetStatus(StatusModel):
    """Observed state of a TokenBudget.

    The compile fills observedGeneration, routes and the Ready, ResolvedRefs and
    TenancyAccepted conditions. With a Redis budget store the operator's spend
    reporter reads the sidecars' totals every few seconds and fills the rest: the
    headline (spent, limit, remaining, unit, percent, period) is the namespace cap of
    the longest period set, USD before tokens; `meters` lists every level.
    """

    observed_generation: int | None = Field(None, description="metadata.generation last compiled.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, ResolvedRefs, TenancyAccepted, SpendKnown and ThresholdReached.", json_schema_extra=_CONDITIONS_EXTRA
    )
    spent: float | None = Field(None, description="Spent in the current period of the headline cap (month before day, USD before tokens), in unit.")
    limit: float | None = Field(None, description="The headline cap for the current period, in unit.")
    remaining: float | None = Field(None, description="What remains of the headline cap, in unit (at least 0).")
    unit: str | None = Field(None, description="USD or tokens.")
    percent: float | None = Field(None, description="Percent of the headline cap spent.")
    period_start: str | None = Field(None, description="Start of the headline cap's current period (RFC 3339).", json_schema_extra={"format": "date-time"})
    period_end: str | None = Field(None, description="End of the headline cap's current period (RFC 3339).", json_schema_extra={"format": "date-time"})
    tenants_over_budget: list[str] = Field(
        default_factory=list, description="Tenants at or over a tier's USD limit in its current period, highest percent first (at most the operator's --tenants-over-budget)."
    )
    meters: list[BudgetMeterStatus] = Field(default_factory=list, description="Every level in its current period: each namespace cap limit, and each tier limit summed over its tenants.")
    routes: list[str] = Field(default_factory=list, description="Model names of the routes covered, resolved.")


class CachePolicyStatus(StatusModel):
    """Observed state of a CachePolicy.

    With a Redis budget store the operator counts the policy's cache hits in the spend
    ledger (records with a cache hit on the routes naming the policy) since the start of
    the current UTC day (countersSince). savedTokens and entries stay empty: the ledger
    does not record the tokens a hit avoided, and counting entries would mean scanning
    the cache's keys.
    """

    observed_generation: int | None = Field(None, description="metadata.generation last compiled.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready and ResolvedRefs.", json_schema_extra=_CONDITIONS_EXTRA)
    entries: int | None = Field(None, description="Entries stored (not reported yet).")
    hits: int | None = Field(None, description="Requests answered from the cache since countersSince.")
    saved_tokens: int | None = Field(None, description="Tokens not sent upstream thanks to the cache (not reported yet: the ledger does not record them).")
    saved_usd: float | None = Field(None, alias="savedUSD", description="USD not spent thanks to the cache since countersSince.")
    counters_since: str | None = Field(None, description="Start of the window hits and savedUSD count (the current UTC day, RFC 3339).", json_schema_extra={"format": "date-time"})
    routes: list[str] = Field(default_factory=list, description="Routes naming this policy.")


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class KindInfo:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec_model: type[SpecModel]
    status_model: type[StatusModel]
    printer_columns: tuple[dict[str, Any], ...]
    description: str

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


_READY = {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status', "description": "Whether the resource is in the compiled router config."}
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

MODEL_BACKEND = KindInfo(
    kind="ModelBackend",
    plural="modelbackends",
    singular="modelbackend",
    short_names=("mb",),
    spec_model=ModelBackendSpec,
    status_model=ModelBackendStatus,
    printer_columns=(
        {"name": "Provider", "type": "string", "jsonPath": ".spec.provider", "description": "Wire protocol."},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model", "description": "Model id sent upstream."},
        _READY,
        _AGE,
    ),
    description="ModelBackend is one model at one endpoint: a hosted API or an in-cluster model server.",
)
MODEL_ROUTE = KindInfo(
    kind="ModelRoute",
    plural="modelroutes",
    singular="modelroute",
    short_names=("mr",),
    spec_model=ModelRouteSpec,
    status_model=ModelRouteStatus,
    printer_columns=(
        {"name": "Model Name", "type": "string", "jsonPath": ".status.modelName", "description": "The model name apps send."},
        {"name": "First Backend", "type": "string", "jsonPath": ".status.firstBackend", "description": "First backend of the first rule."},
        _READY,
        _AGE,
    ),
    description="ModelRoute maps the model name apps ask for to ordered rules, each with a fallback chain of ModelBackends.",
)
TOKEN_BUDGET = KindInfo(
    kind="TokenBudget",
    plural="tokenbudgets",
    singular="tokenbudget",
    short_names=("tb",),
    spec_model=TokenBudgetSpec,
    status_model=TokenBudgetStatus,
    printer_columns=(
        {"name": "Spent", "type": "number", "jsonPath": ".status.spent", "description": "Spent in the current period."},
        {"name": "Limit", "type": "number", "jsonPath": ".status.limit", "description": "Cap for the current period."},
        {"name": "Unit", "type": "string", "jsonPath": ".status.unit", "description": "USD or tokens."},
        {"name": "Percent", "type": "number", "jsonPath": ".status.percent", "description": "Percent of the cap spent."},
        # string, not date: kubectl prints a date column as an age, and a time in the future as <invalid>.
        {"name": "Period End", "type": "string", "jsonPath": ".status.periodEnd", "description": "When the current period resets."},
        _READY,
    ),
    description="TokenBudget limits spend on routes: a namespace-wide cap and per-tenant tiers.",
)
CACHE_POLICY = KindInfo(
    kind="CachePolicy",
    plural="cachepolicies",
    singular="cachepolicy",
    short_names=("cp",),
    spec_model=CachePolicySpec,
    status_model=CachePolicyStatus,
    printer_columns=(
        {"name": "Exact", "type": "boolean", "jsonPath": ".spec.exact.enabled", "description": "Exact caching on."},
        {"name": "Semantic", "type": "boolean", "jsonPath": ".spec.semantic.enabled", "description": "Semantic caching on."},
        {"name": "Hits", "type": "integer", "jsonPath": ".status.hits", "description": "Requests answered from the cache today (UTC)."},
        {"name": "Saved USD", "type": "number", "jsonPath": ".status.savedUSD", "description": "USD the cache saved today (UTC)."},
        _READY,
        _AGE,
    ),
    description="CachePolicy configures exact and semantic response caching for the routes that name it.",
)

KINDS: dict[str, KindInfo] = {k.kind: k for k in (MODEL_BACKEND, MODEL_ROUTE, TOKEN_BUDGET, CACHE_POLICY)}
