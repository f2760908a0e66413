"""The custom resources: ModelBackend, ModelRoute, TokenBudget and CachePolicy.

These pydantic models are the single source of truth for the resources' shape. The
operator and `kubetoll validate/compile/run` parse `spec` with them, and `crdgen`
turns them into the CRDs' openAPIV3Schema. The parts a resource shares with the
RouterConfig it compiles into (pricing, timeouts, rules, caps, tiers, tenancy,
cache settings) and the enums are `kubetoll_core`'s: one definition, one set of
rules. A rule that spans fields is a `CelRule` (`kubetoll_core.model_base`): its
CEL goes into the CRD and its Python twin runs when the model is parsed.

Field names are camelCase on the wire (aliases) and snake_case in Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from kubetoll_core.enums import DEFAULT_FALLBACK_ON as _DEFAULT_FALLBACK_ON
from kubetoll_core.enums import HOSTED_PROVIDERS, FailMode, FailureClass, OnExhausted, Provider
from kubetoll_core.jwt_settings import ASYMMETRIC, JwtAlgorithm, JwtVerification
from kubetoll_core.model_base import CelRule
from kubetoll_core.model_base import ContractModel as SpecModel
from kubetoll_core.names import (
    CREDENTIAL_HEADERS,
    HEADER_NAME_PATTERN,
    OBJECT_NAME_PATTERN,
    ROUTE_NAME_PATTERN,
    SECRET_KEY_PATTERN,
    SERVICE_NAME_PATTERN,
    TIER_NAME_PATTERN,
    URL_PATTERN,
)
from kubetoll_core.parts import (
    TAG_KEY_PATTERN,
    TAG_VALUE_PATTERN,
    Attribution,
    AzureSettings,
    BackendLimits,
    CacheSettings,
    Cap,
    CircuitBreaker,
    ContextPolicy,
    Downgrade,
    LabelSelector,
    LoadMetrics,
    Pricing,
    Rule,
    Spillover,
    Tenancy,
    TierLimits,
    Timeouts,
    check_tenant_tiers,
    valid_timezone,
)

GROUP = "kubetoll.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kubetoll"
# What apps send as `model`: the router's route name.
MODEL_NAME_PATTERN = ROUTE_NAME_PATTERN


class Scheme(str, Enum):
    """URL scheme of an in-cluster Service."""

    http = "http"
    https = "https"


# --------------------------------------------------------------------------- ModelBackend


class ServiceRef(SpecModel):
    """An in-cluster Service in the resource's own namespace serving an OpenAI-compatible API."""

    name: str = Field(
        max_length=63, pattern=SERVICE_NAME_PATTERN, description="Name of the Service, in the same namespace."
    )
    port: int = Field(ge=1, le=65535, description="Service port.")
    port_name: str | None = Field(
        None,
        max_length=15,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Name of that Service port: how its replicas' port is found in the EndpointSlices when the "
        "Service maps it to another target port. Absent: the EndpointSlice port numbered `port`, or a "
        "single-port Service's only port.",
    )
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
    key: str = Field(
        max_length=253, pattern=SECRET_KEY_PATTERN, description="Key in the Secret's data that holds the API key."
    )


class BackendCredentials(SpecModel):
    """Where the API key comes from.

    The operator copies the key into the kubetoll-credentials Secret that only the sidecar mounts.
    """

    secret_ref: SecretKeyRef = Field(description="The Secret and key holding the provider API key.")


class ModelBackendSpec(SpecModel):
    """One model at one endpoint."""

    provider: Provider = Field(
        description=(
            "Wire protocol: openai, azure-openai, anthropic or openai-compatible (vLLM, TGI, Ollama, llama.cpp, ...)."
        )
    )
    model: str = Field(
        min_length=1,
        max_length=256,
        description="The model id sent upstream (for azure-openai, the model behind the deployment, used for pricing).",
    )
    endpoint: str | None = Field(
        None,
        max_length=2048,
        pattern=URL_PATTERN,
        description="Base URL of the API, e.g. https://api.openai.com/v1. Set this or serviceRef.",
    )
    service_ref: ServiceRef | None = Field(
        None, description="An in-cluster Service to call instead of an endpoint URL. Set this or endpoint."
    )
    credentials: BackendCredentials | None = Field(
        None, description="API key source. Required for the hosted providers (openai, azure-openai, anthropic)."
    )
    azure: AzureSettings | None = Field(
        None, description="Azure OpenAI settings; required for provider azure-openai, not allowed for the others."
    )
    pricing: Pricing = Field(default_factory=Pricing, description="Prices in USD; empty means the price catalogue.")
    limits: BackendLimits = Field(
        default_factory=BackendLimits, description="The model's context window and output limit."
    )
    timeouts: Timeouts = Field(default_factory=Timeouts, description="Per-attempt timeouts in seconds.")
    circuit_breaker: CircuitBreaker = Field(
        default_factory=CircuitBreaker, description="Circuit breaker for this backend."
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra non-secret request headers sent upstream (credential headers are not allowed here).",
    )
    max_connections: int = Field(
        100, ge=1, le=10000, description="Size of this backend's keep-alive connection pool per sidecar."
    )
    load_metrics: LoadMetrics | None = Field(
        None,
        description="With serviceRef: read each replica's load from its Prometheus metrics and send each request "
        "to the least loaded one. Absent: not read (replicas are taken in turn, fewest requests in flight first).",
    )

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
            "!has(self.headers) || "
            "self.headers.all(h, !h.matches('(?i)^(authorization|api-key|x-api-key|proxy-authorization)$'))",
            "headers must not carry credentials (Authorization, api-key, x-api-key, Proxy-Authorization); "
            "use credentials.secretRef",
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

    match_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels a pod must carry (all of them) for this route to be served in it."
    )


DEFAULT_FALLBACK_ON = [f.value for f in _DEFAULT_FALLBACK_ON]


class ModelRouteSpec(SpecModel):
    """The model name apps ask for, and how its requests are routed."""

    model_name: str | None = Field(
        None,
        pattern=MODEL_NAME_PATTERN,
        max_length=128,
        description="The `model` apps send. Defaults to the resource's name.",
    )
    pod_selector: PodSelector | None = Field(
        None, description="Serve this route only in matching pods (default: every pod)."
    )
    rules: list[Rule] = Field(
        min_length=1, max_length=32, description="Ordered rules; the first whose match holds picks the backends."
    )
    fallback_on: list[FailureClass] = Field(
        default_factory=lambda: [FailureClass(v) for v in DEFAULT_FALLBACK_ON],
        max_length=6,
        description="Failures that move on to the next backend in the chain.",
        json_schema_extra={"x-kubernetes-list-type": "set", "default": list(DEFAULT_FALLBACK_ON)},
    )
    max_output_tokens: int | None = Field(
        None, gt=0, description="Cap on max_tokens; also the output reservation when a request gives none."
    )
    downgrade: Downgrade | None = Field(
        None, description="Cheaper backends once the budget covering this route is this far spent."
    )
    cache_policy: str | None = Field(
        None, max_length=253, pattern=OBJECT_NAME_PATTERN, description="Name of a CachePolicy in this namespace."
    )
    spillover: Spillover | None = Field(
        None,
        description="Spill over under load: skip an in-cluster backend of the chain whose every replica's queue "
        "is deeper than queueDepth, for the next backend.",
    )
    context: ContextPolicy | None = Field(
        None,
        description="Context policy for chat requests: past maxPromptTokens, drop the oldest turns, summarize "
        "them with a cheaper backend, or refuse the request.",
    )


# --------------------------------------------------------------------------- TokenBudget


class Tier(TierLimits):
    """Limits for each tenant of one tier."""

    name: str = Field(max_length=63, pattern=TIER_NAME_PATTERN, description="Tier name, as sent in the tier header.")


class PublicKeysSource(SpecModel):
    """A key of a ConfigMap in the budget's namespace holding PEM public keys or a JWKS document."""

    config_map_name: str = Field(
        max_length=253, pattern=OBJECT_NAME_PATTERN, description="Name of the ConfigMap, in the same namespace."
    )
    key: str = Field(
        max_length=253, pattern=SECRET_KEY_PATTERN, description="Key of the ConfigMap's data holding the keys."
    )


class Hs256SecretRef(SecretKeyRef):
    """A key of a Secret in the budget's namespace holding the HS256 secret."""

    key: str = Field(
        max_length=253, pattern=SECRET_KEY_PATTERN, description="Key in the Secret's data that holds the HS256 secret."
    )


class JwtSpec(JwtVerification):
    """Signed identity: the tenant (and tier) from the claims of a token the platform signs.

    The operator copies the HS256 secret into the kubetoll-credentials Secret (never into the ConfigMap) and
    inlines the public keys, which are public, into the router config.
    """

    hs256_secret_ref: Hs256SecretRef | None = Field(
        None,
        description=(
            "The Secret key holding the HS256 secret (at least 32 bytes); the operator copies it into "
            "kubetoll-credentials."
        ),
    )
    public_keys_from: PublicKeysSource | None = Field(
        None,
        description=(
            "The ConfigMap key holding the RS256 and ES256 public keys: PEM (-----BEGIN PUBLIC KEY----- blocks) or "
            "a JWKS document, whose kid selects the key."
        ),
    )

    __cel_rules__ = (
        CelRule(
            "!('HS256' in self.algorithms) || has(self.hs256SecretRef)",
            "algorithm HS256 needs hs256SecretRef",
            lambda j: JwtAlgorithm.hs256 not in j.algorithms or j.hs256_secret_ref is not None,
            ".hs256SecretRef",
        ),
        CelRule(
            "!('RS256' in self.algorithms || 'ES256' in self.algorithms) || has(self.publicKeysFrom)",
            "algorithms RS256 and ES256 need publicKeysFrom",
            lambda j: not any(a in j.algorithms for a in ASYMMETRIC) or j.public_keys_from is not None,
            ".publicKeysFrom",
        ),
    )


class TenantSpec(Tenancy):
    """How the sidecar names the end user (tenant) and their tier. Every budget in a namespace that sets this must agree."""  # noqa: E501 (the CRD's description)

    jwt: JwtSpec | None = Field(
        None,
        description=(
            "Signed identity: take the tenant (and tier) from a token the platform signed instead of from headers; "
            "see docs/sidecar.md."
        ),
    )


#: Inline `tenantTiers` entries: a TokenBudget is one etcd object (about 1.5 MiB); longer lists
#: go into a ConfigMap (`tenantTiersFrom`).
MAX_INLINE_TENANT_TIERS = 10_000


class TenantTiersSource(SpecModel):
    """A key of a ConfigMap in the budget's namespace holding tenant → tier assignments: a JSON object or a YAML mapping of `tenant: tier` lines."""  # noqa: E501 (the CRD's description)

    config_map_name: str = Field(
        max_length=253, pattern=OBJECT_NAME_PATTERN, description="Name of the ConfigMap, in the same namespace."
    )
    key: str = Field(
        max_length=253, pattern=SECRET_KEY_PATTERN, description="Key of the ConfigMap's data holding the map."
    )


def _exhausted_policies(spec: Any) -> set[OnExhausted]:
    """Every onExhausted a TokenBudget spec sets (its cap's and its tiers')."""
    return {spec.cap_on_exhausted, *(t.on_exhausted for t in spec.tiers)}


class TokenBudgetSpec(SpecModel):
    """Spend limits for routes: a namespace-wide cap and per-tenant tiers."""

    routes: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="ModelRoute names this budget covers; empty means every route in the namespace.",
        json_schema_extra={
            "items": {"type": "string", "maxLength": 253, "description": "Name of a ModelRoute in this namespace."},
            "x-kubernetes-list-type": "set",
        },
    )
    cap: Cap = Field(default_factory=Cap, description="Namespace-wide cap across every tenant.")
    cap_on_exhausted: OnExhausted = Field(
        OnExhausted.reject, description="What happens once the namespace cap is spent."
    )
    timezone: str = Field(
        "UTC",
        max_length=64,
        pattern=r"^[A-Za-z0-9_+\-/]+$",
        description="IANA timezone for the calendar day and month resets.",
    )
    tenant: TenantSpec | None = Field(
        None, description="Tenant identity; budgets in one namespace that set it must agree."
    )
    fail_mode: FailMode = Field(
        FailMode.fail_open, description="What happens when the budget store (Redis) cannot answer in time."
    )
    suspended: bool = Field(False, description="Kill switch: admit no request under this budget (403) while true.")
    tiers: list[Tier] = Field(
        default_factory=list,
        max_length=64,
        description="Per-tenant tiers.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    tenant_tiers: dict[str, str] | None = Field(
        None,
        max_length=MAX_INLINE_TENANT_TIERS,
        description=(
            "The platform team's tier for each tenant (tenant id → tier name), namespace-wide like spec.tenant: "
            "every budget's map is merged. With tierHeaderPolicy capped (the default once a map exists) the tier "
            "header cannot lift a tenant above its tier; a tenant no map names is on defaultTier."
        ),
        json_schema_extra={
            "additionalProperties": {
                "type": "string",
                "maxLength": 63,
                "pattern": TIER_NAME_PATTERN,
                "description": "A tier name.",
            }
        },
    )
    tenant_tiers_from: TenantTiersSource | None = Field(
        None,
        description=(
            "Read the tenant → tier map from a ConfigMap key instead (for long lists); the operator recompiles "
            "when it changes. Missing or invalid: none of its tiers apply (no tenant is lifted) and the "
            "TenantTiersAccepted condition says why."
        ),
    )
    workload_selector: LabelSelector | None = Field(
        None,
        description=(
            "Apply this budget only to the pods whose labels match (a Kubernetes label selector): their "
            "sidecars share its meters, other pods' sidecars ignore it. Absent: every pod."
        ),
    )
    tag_selector: dict[str, str] | None = Field(
        None,
        max_length=8,
        description="Apply this budget only to requests carrying all these tags (tag key → value, e.g. "
        "feature: search), alongside the namespace's other budgets. Its keys are accepted as tags.",
        json_schema_extra={"additionalProperties": {"type": "string", "maxLength": 128}},
    )
    attribution: Attribution | None = Field(
        None,
        description="Request tags (x-kubetoll-tags, the OpenAI metadata object) kept on the spend records of the "
        "routes this budget covers; other keys are dropped and counted.",
    )
    exhausted_response: str | None = Field(
        None,
        min_length=1,
        max_length=4000,
        description="What the assistant answers, as a normal completion at no cost, once a limit whose onExhausted "
        'is respond is spent (e.g. "I\'ve reached my limit for this conversation; an agent will follow up.").',
    )
    alert_thresholds: list[int] = Field(
        default_factory=lambda: [50, 75, 90, 100],
        max_length=20,
        description=(
            "Percentages of each namespace cap limit at which the operator posts an Event, "
            "once per threshold and period (Warning from 90, Normal below); needs a Redis budget store."
        ),
        json_schema_extra={
            "items": {"type": "integer", "minimum": 1, "maximum": 100, "description": "Percent of the cap."},
            "x-kubernetes-list-type": "set",
            "default": [50, 75, 90, 100],
        },
    )

    def tag_items(self) -> list[tuple[str, str]]:
        return list((self.tag_selector or {}).items())

    __cel_rules__ = (
        CelRule(
            f"!has(self.tagSelector) || self.tagSelector.all(k, k.matches('{TAG_KEY_PATTERN}') && "
            f"self.tagSelector[k].matches('{TAG_VALUE_PATTERN}'))",
            "tagSelector keys are lower-case tag keys and values letters, digits and . _ : / -",
            lambda s: all(
                re.match(TAG_KEY_PATTERN, k) and re.match(TAG_VALUE_PATTERN, v)
                for k, v in (s.tag_selector or {}).items()
            ),
            ".tagSelector",
        ),
        CelRule(
            "has(self.exhaustedResponse) || ((!has(self.capOnExhausted) || self.capOnExhausted != 'respond') && "
            "(!has(self.tiers) || self.tiers.all(t, !has(t.onExhausted) || t.onExhausted != 'respond')))",
            "onExhausted respond needs exhaustedResponse (the answer it serves)",
            lambda s: (
                s.exhausted_response is not None
                or (
                    s.cap_on_exhausted != OnExhausted.respond
                    and all(t.on_exhausted != OnExhausted.respond for t in s.tiers)
                )
            ),
            ".exhaustedResponse",
        ),
        CelRule(
            "!has(self.tiers) || self.tiers.all(t, self.tiers.filter(u, u.name == t.name).size() == 1)",
            "tier names must be unique",
            lambda s: len({t.name for t in s.tiers}) == len(s.tiers),
            ".tiers",
        ),
        CelRule(
            "!(has(self.tenantTiers) && has(self.tenantTiersFrom))",
            "set at most one of tenantTiers or tenantTiersFrom",
            lambda s: s.tenant_tiers is None or s.tenant_tiers_from is None,
            ".tenantTiersFrom",
        ),
    )

    @field_validator("tenant_tiers")
    @classmethod
    def _tenant_tiers(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            check_tenant_tiers(v)
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return valid_timezone(v)

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


# The RouterConfig's cache policy is this spec plus its name.
CachePolicySpec = CacheSettings


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

    type: str = Field(
        max_length=316,
        description=(
            "Condition type: Ready and ResolvedRefs (every kind); "
            "TenancyAccepted, TenantTiersAccepted, SpendKnown and ThresholdReached (TokenBudget)."
        ),
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="CamelCase reason for the status.")
    message: str = Field("", max_length=32768, description="Human-readable detail naming the field.")
    last_transition_time: str | None = Field(
        None, description="When the status last changed (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was computed from."
    )


_CONDITIONS_EXTRA: JsonDict = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class ResolvedPrices(StatusModel):
    """Prices the router uses for this backend, in USD per million tokens."""

    source: str = Field(description="Where the prices come from: override, gpu-shadow, or catalog:<provider>/<model>.")
    input_per_mtok: float | None = Field(None, alias="inputPerMTok", description="USD per million input tokens.")
    output_per_mtok: float | None = Field(None, alias="outputPerMTok", description="USD per million output tokens.")
    cached_input_per_mtok: float | None = Field(
        None, alias="cachedInputPerMTok", description="USD per million cached input tokens."
    )
    cache_write_per_mtok: float | None = Field(
        None, alias="cacheWritePerMTok", description="USD per million cache-write tokens."
    )
    note: str | None = Field(None, description="Why a price is missing or how it was derived.")


class ModelBackendStatus(StatusModel):
    """Observed state of a ModelBackend."""

    observed_generation: int | None = Field(None, description="metadata.generation last compiled.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready and ResolvedRefs.", json_schema_extra=_CONDITIONS_EXTRA
    )
    endpoint: str | None = Field(None, description="The resolved endpoint URL.")
    prices: ResolvedPrices | None = Field(None, description="Resolved prices.")


class ModelRouteStatus(StatusModel):
    """Observed state of a ModelRoute."""

    observed_generation: int | None = Field(None, description="metadata.generation last compiled.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready and ResolvedRefs.", json_schema_extra=_CONDITIONS_EXTRA
    )
    model_name: str | None = Field(None, description="The model name apps send for this route.")
    first_backend: str | None = Field(None, description="First backend of the first rule.")
    backends: list[str] = Field(default_factory=list, description="Every backend the route may use, resolved.")


class BudgetMeterStatus(StatusModel):
    """One level of a budget in its current calendar period: the namespace cap, or a tier summed over its tenants."""

    level: str = Field(description="cap (the namespace cap) or tier:<name> (that tier's tenants).")
    unit: str = Field(description="USD or tokens.")
    window: str = Field(description="day or month.")
    period: str = Field(description="Period id in the budget's timezone: 2026-11-22 (day) or 2026-11 (month).")
    period_start: str | None = Field(
        None, description="Start of the period (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    period_end: str | None = Field(
        None, description="End of the period (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    limit: float | None = Field(None, description="cap: the limit for the period; tier: each tenant's limit.")
    spent: float | None = Field(None, description="Settled spend in the period (tier: all its tenants together).")
    remaining: float | None = Field(None, description="cap only: limit minus spent, at least 0.")
    percent: float | None = Field(None, description="cap only: percent of the limit spent.")
    projected_exhaustion: str | None = Field(
        None,
        description="cap only: when the limit runs out at the spend rate of the last hour, if before the period "
        "ends (empty: it lasts, or too little history yet).",
        json_schema_extra={"format": "date-time"},
    )
    tenants: int | None = Field(None, description="tier only: tenants with spend in the period.")
    tenants_over: int | None = Field(None, description="tier only: tenants at or over their limit.")
    max_percent: float | None = Field(None, description="tier only: the highest percent any tenant has spent.")
    refusing: bool | None = Field(
        None,
        description=(
            "Admission refused a request on this limit within the last minute (tier: for some tenant); "
            "a reservation stops fitting before spend reaches the limit."
        ),
    )


class BudgetDisplay(StatusModel):
    """The spend figures as the printer columns show them (text, so that no column is empty)."""

    spent: str | None = Field(None, description="The binding meter's spent amount, or `per pod` without Redis.")
    percent: str | None = Field(
        None,
        description="The binding meter's percent spent, `(refusing)` appended while admission refuses on it; "
        "`unknown` without Redis.",
    )


class TokenBudgetStatus(StatusModel):
    """Observed state of a TokenBudget.

    The compile fills observedGeneration, routes and the Ready, ResolvedRefs,
    TenancyAccepted and TenantTiersAccepted conditions. With a Redis budget store
    the operator's spend reporter reads the sidecars' totals and refusals every few
    seconds and fills the rest: the headline (binding, spent, limit, remaining, unit,
    percent, period) is the binding meter, the limit closest to refusing among the cap
    limits and every tenant's tier limits; `meters` lists every level. Without Redis, spend is per pod:
    limit and period come from the spec, and SpendKnown is False (NoSharedStore).
    """

    observed_generation: int | None = Field(None, description="metadata.generation last compiled.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, ResolvedRefs, TenancyAccepted, TenantTiersAccepted, SpendKnown and ThresholdReached.",
        json_schema_extra=_CONDITIONS_EXTRA,
    )
    binding: str | None = Field(
        None,
        description=(
            "The binding meter, the limit closest to refusing: cap/usd-day, cap/tokens-month, "
            "tier:<name>/usd-day (<tenant>). Refusing first, then spent at or over its limit, then highest percent."
        ),
    )
    refusing: bool | None = Field(
        None, description="Admission refused a request on the binding meter within the last minute."
    )
    spent: float | None = Field(
        None, description="Spent on the binding meter in its current period, in unit (empty without Redis)."
    )
    limit: float | None = Field(None, description="The binding meter's limit for its current period, in unit.")
    remaining: float | None = Field(None, description="What remains of the binding meter, in unit (at least 0).")
    unit: str | None = Field(None, description="USD or tokens.")
    percent: float | None = Field(None, description="Percent of the binding meter's limit spent.")
    period_start: str | None = Field(
        None,
        description="Start of the binding meter's current period (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    period_end: str | None = Field(
        None,
        description="End of the binding meter's current period, when it resets (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    projected_exhaustion: str | None = Field(
        None,
        description="The earliest time a namespace cap runs out at the spend rate of the last hour, if before its "
        "period ends (RFC 3339; empty: every cap lasts its period, or the operator has seen under 15 minutes).",
        json_schema_extra={"format": "date-time"},
    )
    display: BudgetDisplay | None = Field(None, description="Spent and percent as the printer columns show them.")
    tenants_over_budget: list[str] = Field(
        default_factory=list,
        description=(
            "Tenants at or over a tier's USD limit in its current period, or refused on it within the last "
            "minute, highest percent first (at most the operator's --tenants-over-budget)."
        ),
    )
    meters: list[BudgetMeterStatus] = Field(
        default_factory=list,
        description=(
            "Every level in its current period: each namespace cap limit, and each tier limit summed over its tenants."
        ),
    )
    routes: list[str] = Field(default_factory=list, description="Model names of the routes covered, resolved.")


class ErrorControlStatus(StatusModel):
    """What the sidecars' error-rate controllers learned (semantic.targetErrorRate), pooled."""

    target_error_rate: float | None = Field(None, description="semantic.targetErrorRate.")
    sidecars: int | None = Field(None, description="Sidecars that reported in the last minute.")
    closed_sidecars: int | None = Field(
        None, description="Of them, those serving no semantic hit yet (too few compared answers to certify one)."
    )
    threshold_min: float | None = Field(None, description="Lowest learned similarity threshold among the sidecars.")
    threshold_max: float | None = Field(None, description="Highest learned similarity threshold among the sidecars.")
    exploration_rate: float | None = Field(
        None, description="Mean share of would-be hits answered upstream and compared instead of served."
    )
    estimated_error_rate: float | None = Field(
        None, description="Share of explored would-be hits whose cached answer was wrong (pooled, recent)."
    )
    error_rate_interval: list[float | None] = Field(
        default_factory=list, description="One-sided 95% Wilson interval of estimatedErrorRate: [low, high]."
    )
    explored: int | None = Field(None, description="Explored would-be hits the estimate is over.")
    explored_wrong: int | None = Field(None, description="Of them, those whose cached answer was wrong.")
    samples: int | None = Field(None, description="Compared answers the controllers learn from (explored and below).")
    served: int | None = Field(None, description="Semantic hits served since the sidecars started.")
    verified_correct: int | None = Field(None, description="Comparisons where the cached answer was right.")
    verified_wrong: int | None = Field(None, description="Comparisons where the cached answer was wrong.")


class CachePolicyStatus(StatusModel):
    """Observed state of a CachePolicy.

    With a Redis budget store the operator counts the policy's cache hits in the spend
    ledger (records with a cache hit on the routes naming the policy) since the start of
    the current UTC day (countersSince). savedTokens and entries stay empty: the ledger
    does not record the tokens a hit avoided, and counting entries would mean scanning
    the cache's keys. The same pass sets Degraded from what the sidecars report: True
    (EmbeddingUnavailable or VerifierUnavailable, naming the backend) while some sidecar's
    semantic tier misses because its embedding or verifier backend is lost.
    """

    observed_generation: int | None = Field(None, description="metadata.generation last compiled.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, ResolvedRefs and (with a Redis budget store) Degraded: True while a sidecar's semantic "
        "tier misses because its embedding or verifier backend is unavailable.",
        json_schema_extra=_CONDITIONS_EXTRA,
    )
    entries: int | None = Field(None, description="Entries stored (not reported yet).")
    hits: int | None = Field(None, description="Requests answered from the cache since countersSince.")
    saved_tokens: int | None = Field(
        None,
        description="Tokens not sent upstream thanks to the cache (not reported yet: the ledger does not record them).",
    )
    saved_usd: float | None = Field(
        None, alias="savedUSD", description="USD not spent thanks to the cache since countersSince."
    )
    counters_since: str | None = Field(
        None,
        description="Start of the window hits and savedUSD count (the current UTC day, RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    routes: list[str] = Field(default_factory=list, description="Routes naming this policy.")
    error_control: ErrorControlStatus | None = Field(
        None, description="With semantic.targetErrorRate and a Redis budget store: what error-rate control learned."
    )


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


_READY = {
    "name": "Ready",
    "type": "string",
    "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    "description": "Whether the resource is in the compiled router config.",
}
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
        {
            "name": "Model Name",
            "type": "string",
            "jsonPath": ".status.modelName",
            "description": "The model name apps send.",
        },
        {
            "name": "First Backend",
            "type": "string",
            "jsonPath": ".status.firstBackend",
            "description": "First backend of the first rule.",
        },
        _READY,
        _AGE,
    ),
    description=(
        "ModelRoute maps the model name apps ask for to ordered rules, each with a fallback chain of ModelBackends."
    ),
)
TOKEN_BUDGET = KindInfo(
    kind="TokenBudget",
    plural="tokenbudgets",
    singular="tokenbudget",
    short_names=("tb",),
    spec_model=TokenBudgetSpec,
    status_model=TokenBudgetStatus,
    printer_columns=(
        {
            "name": "Binding",
            "type": "string",
            "jsonPath": ".status.binding",
            "description": "The limit closest to refusing (cap or a tenant's tier limit, unit and period).",
        },
        # Text: without a shared store spend is per pod, and the column says so instead of staying empty.
        {
            "name": "Spent",
            "type": "string",
            "jsonPath": ".status.display.spent",
            "description": "Spent on the binding meter in its current period.",
        },
        {
            "name": "Limit",
            "type": "number",
            "jsonPath": ".status.limit",
            "description": "The binding meter's limit.",
        },
        {
            "name": "Percent",
            "type": "string",
            "jsonPath": ".status.display.percent",
            "description": "Percent of the binding meter spent; (refusing) while admission refuses on it.",
        },
        # string, not date: kubectl prints a date column as an age, and a time in the future as <invalid>.
        {
            "name": "Resets",
            "type": "string",
            "jsonPath": ".status.periodEnd",
            "description": "When the binding meter's period ends.",
        },
        {"name": "Unit", "type": "string", "jsonPath": ".status.unit", "description": "USD or tokens.", "priority": 1},
        _READY,
        _AGE,
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
        {
            "name": "Semantic",
            "type": "boolean",
            "jsonPath": ".spec.semantic.enabled",
            "description": "Semantic caching on.",
        },
        {
            "name": "Hits",
            "type": "integer",
            "jsonPath": ".status.hits",
            "description": "Requests answered from the cache today (UTC).",
        },
        {
            "name": "Saved USD",
            "type": "number",
            "jsonPath": ".status.savedUSD",
            "description": "USD the cache saved today (UTC).",
        },
        _READY,
        _AGE,
    ),
    description="CachePolicy configures exact and semantic response caching for the routes that name it.",
)

KINDS: dict[str, KindInfo] = {k.kind: k for k in (MODEL_BACKEND, MODEL_ROUTE, TOKEN_BUDGET, CACHE_POLICY)}
