"""RouterConfig: the contract between the operator (or `kubetoll run`) and the sidecar.

Plain data, no Kubernetes. The operator compiles a namespace's custom resources into
one of these and writes it as JSON into the `kubetoll-router` ConfigMap; the sidecar
reads the mounted file. Field names are camelCase in JSON (as in the CRDs) and
snake_case in Python.

Only resolved facts live here: backends with endpoint, provider, model, prices,
limits and timeouts; routes with ordered rules; budgets with tiers. Credentials
never do: a backend names a file under the mounted credentials Secret, or (for
`kubetoll run`) an environment variable.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

CONFIG_VERSION = 1

# A name that is safe in metric labels, Redis keys and headers.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
# Route names are what apps send as `model`; they may carry upper case and slashes
# (e.g. "openai/gpt-4o" or "Support-Bot").
ROUTE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class Provider(str, Enum):
    openai = "openai"
    azure_openai = "azure-openai"
    anthropic = "anthropic"
    openai_compatible = "openai-compatible"


class FailureClass(str, Enum):
    """Why an attempt at a backend failed; a route lists which ones it falls back on."""

    rate_limited = "rateLimited"  # 429 from the provider
    server_error = "serverError"  # 5xx
    timeout = "timeout"  # connect, first byte or total timeout
    connection_error = "connectionError"  # refused, reset, DNS
    context_length_exceeded = "contextLengthExceeded"  # prompt too long for this model
    budget_exhausted = "budgetExhausted"  # provider account out of quota (OpenAI insufficient_quota, HTTP 402)


DEFAULT_FALLBACK_ON = (
    FailureClass.rate_limited,
    FailureClass.server_error,
    FailureClass.timeout,
    FailureClass.connection_error,
)


class FailMode(str, Enum):
    """What a budget does when the shared store (Redis) cannot answer in time."""

    fail_open = "failOpen"  # serve on a conservative local allowance, reconcile later
    fail_closed = "failClosed"  # reject with 503


class OnExhausted(str, Enum):
    reject = "reject"  # 429 with Retry-After
    downgrade = "downgrade"  # serve from the route's downgrade backends
    allow = "allow"  # serve and count the overage (alerting is the operator's job)


# --------------------------------------------------------------------------- server


class ServerSettings(Model):
    host: str = Field("127.0.0.1", description="API listen address. Keep 127.0.0.1: the API carries no auth of its own.")
    port: int = Field(7400, ge=1, le=65535)
    metrics_host: str = Field("0.0.0.0", description="Address for /metrics, /healthz, /readyz (may be the pod IP).")
    metrics_port: int = Field(7401, ge=1, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Requests over this size get 413.")
    drain_seconds: float = Field(25.0, ge=0, description="On SIGTERM, how long requests in flight may take to finish.")
    credentials_dir: str = Field(
        "/var/run/kubetoll/credentials", description="Where the kubetoll-credentials Secret is mounted."
    )
    log_prompts: bool = Field(False, description="Debug only: include prompts and completions in logs.")
    pod_labels_file: str = Field(
        "/etc/kubetoll/podinfo/labels",
        description="Downward-API file with the pod's labels, for routes with a podSelector.",
    )

    @model_validator(mode="after")
    def _ports_differ(self) -> ServerSettings:
        if self.port == self.metrics_port:
            raise ValueError("server.port and server.metricsPort must differ")
        return self


# --------------------------------------------------------------------------- backends


class Credential(Model):
    """Where a backend's API key comes from. Exactly one of file or env."""

    file: str | None = Field(None, description="File name under server.credentialsDir (a key of kubetoll-credentials).")
    env: str | None = Field(None, description="Environment variable (kubetoll run on a laptop).")

    @model_validator(mode="after")
    def _one_source(self) -> Credential:
        if (self.file is None) == (self.env is None):
            raise ValueError("credentials: set exactly one of file or env")
        if self.file is not None and ("/" in self.file or self.file.startswith(".")):
            raise ValueError("credentials.file must be a plain file name inside credentialsDir")
        return self


class Pricing(Model):
    """USD prices. Leave empty to use the price catalogue (genai-prices) for the backend's model.

    Per-million-token prices override the catalogue. `gpuHourlyUSD` with
    `tokensPerSecond` gives an in-cluster server a shadow price, so routing
    decisions compare like with like.
    """

    input_per_mtok: float | None = Field(None, ge=0, alias="inputPerMTok")
    output_per_mtok: float | None = Field(None, ge=0, alias="outputPerMTok")
    cached_input_per_mtok: float | None = Field(None, ge=0, alias="cachedInputPerMTok", description="Defaults to the input price.")
    cache_write_per_mtok: float | None = Field(None, ge=0, alias="cacheWritePerMTok", description="Anthropic cache writes; defaults to input.")
    gpu_hourly_usd: float | None = Field(None, ge=0, alias="gpuHourlyUSD")
    tokens_per_second: float | None = Field(None, gt=0, description="Sustained throughput of the GPU server (all tokens).")
    catalog_model: str | None = Field(None, description="Look this model id up in the catalogue instead of `model`.")
    catalog_provider: str | None = Field(None, description="Catalogue provider id (e.g. openai, anthropic, azure).")

    @model_validator(mode="after")
    def _consistent(self) -> Pricing:
        per_token = self.input_per_mtok is not None or self.output_per_mtok is not None
        gpu = self.gpu_hourly_usd is not None or self.tokens_per_second is not None
        if per_token and gpu:
            raise ValueError("pricing: use per-million-token prices or gpuHourlyUSD+tokensPerSecond, not both")
        if per_token and (self.input_per_mtok is None or self.output_per_mtok is None):
            raise ValueError("pricing: set both inputPerMTok and outputPerMTok")
        if gpu and (self.gpu_hourly_usd is None or self.tokens_per_second is None):
            raise ValueError("pricing: gpuHourlyUSD needs tokensPerSecond (and the other way round)")
        return self

    @property
    def is_override(self) -> bool:
        return self.input_per_mtok is not None or self.gpu_hourly_usd is not None


class Timeouts(Model):
    connect: float = Field(3.0, gt=0, description="Seconds to open a connection.")
    first_token: float = Field(30.0, gt=0, description="Seconds until response headers / first streamed byte.")
    total: float = Field(300.0, gt=0, description="Seconds for the whole attempt.")


class CircuitBreakerSettings(Model):
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the circuit.")
    cooldown_seconds: float = Field(30.0, gt=0, description="How long an open circuit stays open before a probe.")


class AzureSettings(Model):
    deployment: str
    api_version: str = "2024-10-21"


class BackendLimits(Model):
    context_window: int | None = Field(None, gt=0, description="Prompt+output tokens the model accepts.")
    max_output_tokens: int | None = Field(None, gt=0)


class Backend(Model):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    provider: Provider
    model: str = Field(min_length=1, description="The model id sent upstream.")
    endpoint: str = Field(description="Base URL, e.g. https://api.openai.com/v1 or http://vllm.models.svc:8000/v1.")
    credentials: Credential | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="Extra non-secret request headers.")
    azure: AzureSettings | None = None
    pricing: Pricing = Field(default_factory=Pricing)
    limits: BackendLimits = Field(default_factory=BackendLimits)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)
    max_connections: int = Field(100, ge=1, description="Size of this backend's keep-alive pool.")

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("endpoint must be an http:// or https:// URL")
        return v.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _no_secret_headers(cls, v: dict[str, str]) -> dict[str, str]:
        for h in v:
            if h.lower() in {"authorization", "api-key", "x-api-key", "proxy-authorization"}:
                raise ValueError(f"header {h!r} carries a credential; use credentials instead")
        return v

    @model_validator(mode="after")
    def _provider_fields(self) -> Backend:
        if self.provider is Provider.azure_openai and self.azure is None:
            raise ValueError("provider azure-openai needs azure.deployment")
        if self.provider is not Provider.azure_openai and self.azure is not None:
            raise ValueError("azure settings are only for provider azure-openai")
        return self


# --------------------------------------------------------------------------- routes


class HeaderMatch(Model):
    name: str = Field(min_length=1)
    value: str | None = Field(None, description="Exact value; omit with regex also omitted to match presence.")
    regex: str | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            re.compile(v)
        return v


class RuleMatch(Model):
    """All given conditions must hold. An empty match matches every request."""

    min_prompt_tokens: int | None = Field(None, ge=0)
    max_prompt_tokens: int | None = Field(None, ge=0)
    tiers: list[str] = Field(default_factory=list)
    tenants: list[str] = Field(default_factory=list)
    header: HeaderMatch | None = None
    keywords: list[str] = Field(default_factory=list, description="Any of these words in the last user message (case-insensitive).")
    regex: str | None = Field(None, description="Python regex searched in the last user message.")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            re.compile(v)
        return v

    @model_validator(mode="after")
    def _range(self) -> RuleMatch:
        if (
            self.min_prompt_tokens is not None
            and self.max_prompt_tokens is not None
            and self.min_prompt_tokens > self.max_prompt_tokens
        ):
            raise ValueError("minPromptTokens is greater than maxPromptTokens")
        return self


class Rule(Model):
    name: str = ""
    match: RuleMatch = Field(default_factory=RuleMatch)
    backends: list[str] = Field(min_length=1, description="The fallback chain, in order.")


class Downgrade(Model):
    at_percent: float = Field(gt=0, le=100, description="Budget use (percent) at which cheaper backends take over.")
    backends: list[str] = Field(min_length=1)


class Route(Model):
    name: Annotated[str, Field(pattern=ROUTE_NAME_PATTERN)]
    rules: list[Rule] = Field(min_length=1)
    fallback_on: list[FailureClass] = Field(default_factory=lambda: list(DEFAULT_FALLBACK_ON))
    max_output_tokens: int | None = Field(None, gt=0, description="Cap on max_tokens; also the output reservation when the request gives none.")
    downgrade: Downgrade | None = None
    pod_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Serve this route only in pods whose labels include all of these (empty: every pod).",
    )
    cache_policy: str | None = Field(None, description="Name of the cache policy answering this route from cache.")


# --------------------------------------------------------------------------- budgets


class Cap(Model):
    usd_per_day: float | None = Field(None, gt=0)
    usd_per_month: float | None = Field(None, gt=0)
    tokens_per_day: int | None = Field(None, gt=0)
    tokens_per_month: int | None = Field(None, gt=0)


class Tier(Model):
    tokens_per_minute: int | None = Field(None, gt=0)
    requests_per_minute: int | None = Field(None, gt=0)
    usd_per_day: float | None = Field(None, gt=0)
    usd_per_month: float | None = Field(None, gt=0)
    on_exhausted: OnExhausted = OnExhausted.reject


class Budget(Model):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    routes: list[str] = Field(default_factory=list, description="Routes this budget covers; empty means all.")
    cap: Cap = Field(default_factory=Cap, description="Namespace-wide cap across every tenant.")
    cap_on_exhausted: OnExhausted = OnExhausted.reject
    timezone: str = "UTC"
    tiers: dict[str, Tier] = Field(default_factory=dict)
    fail_mode: FailMode = FailMode.fail_open
    suspended: bool = Field(False, description="Kill switch: admit nothing under this budget (403).")

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {v!r}") from exc
        return v

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, v: dict[str, Tier]) -> dict[str, Tier]:
        for name in v:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"tier name {name!r} must match {NAME_PATTERN}")
        return v

    def covers(self, route: str) -> bool:
        return not self.routes or route in self.routes


# --------------------------------------------------------------------------- caching


class CacheScope(str, Enum):
    tenant = "tenant"  # a tenant only ever gets answers cached for itself
    namespace = "namespace"  # every tenant of the namespace shares entries


class ExactCacheSettings(Model):
    enabled: bool = True
    ttl_seconds: int = Field(3600, gt=0)


class SemanticCacheSettings(Model):
    enabled: bool = False
    embedding_backend: str | None = Field(None, description="A backend serving /v1/embeddings.")
    threshold: float = Field(0.7, gt=0, le=1, description="Cosine similarity a hit needs (before the strict check); model-specific, see docs/caching.md.")
    ttl_seconds: int = Field(3600, gt=0)
    embed: Literal["lastUserMessage", "allUserMessages"] = "lastUserMessage"
    verify: bool = Field(True, description="Also require numbers, negations, named things and the action to agree.")
    max_entries: int = Field(20_000, gt=0, description="Local index entries per sidecar.")

    @model_validator(mode="after")
    def _backend(self) -> SemanticCacheSettings:
        if self.enabled and not self.embedding_backend:
            raise ValueError("semantic caching needs embeddingBackend")
        return self


class CacheableSettings(Model):
    max_temperature: float = Field(0.0, ge=0, le=2, description="Requests above this temperature are not cached.")
    allow_tools: bool = False


class CachePolicy(Model):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    scope: CacheScope = CacheScope.tenant
    exact: ExactCacheSettings = Field(default_factory=ExactCacheSettings)
    semantic: SemanticCacheSettings = Field(default_factory=SemanticCacheSettings)
    cacheable: CacheableSettings = Field(default_factory=CacheableSettings)
    local_max_bytes: int = Field(64 * 1024 * 1024, gt=0, description="In-process LRU bound per sidecar.")


class Tenancy(Model):
    """How the sidecar names the end user (tenant) and their tier."""

    header: str = Field("x-kubetoll-tenant", description="Request header carrying the tenant id.")
    use_user_field: bool = Field(True, description="Fall back to the OpenAI `user` field when the header is absent.")
    tier_header: str = Field("x-kubetoll-tier", description="Request header carrying the tier name.")
    default_tier: str = "default"
    required: bool = Field(False, description="Reject (400) requests that name no tenant.")
    anonymous_tenant: str = Field("anonymous", description="Tenant id used when none is given and not required.")


class BudgetStoreSettings(Model):
    """Where budget state lives. No URL: in process memory (one sidecar, `kubetoll run`, the demo)."""

    url: str | None = Field(
        None,
        description="redis://, rediss:// (TLS), redis+sentinel:// or redis+cluster:// URL, without credentials.",
    )
    username_file: str | None = Field(None, description="File under credentialsDir holding the Redis ACL user.")
    password_file: str | None = Field(None, description="File under credentialsDir holding the Redis password.")
    timeout_ms: float = Field(50.0, gt=0, description="No request waits on Redis longer than this.")
    ledger_retention_days: int = Field(35, ge=1, description="Spend ledger records older than this are trimmed.")

    @field_validator("url")
    @classmethod
    def _no_inline_credentials(cls, v: str | None) -> str | None:
        if v is not None:
            if not re.match(r"^(redis|rediss|redis\+sentinel|redis\+cluster|unix)://", v):
                raise ValueError("budgetStore.url must be a redis://, rediss://, redis+sentinel://, redis+cluster:// or unix:// URL")
            if re.match(r"^[a-z+]+://[^/@]*@", v):
                raise ValueError("budgetStore.url must not carry credentials; use usernameFile/passwordFile")
        return v


# --------------------------------------------------------------------------- the whole


class RouterConfig(Model):
    version: Literal[1] = CONFIG_VERSION
    namespace: str = Field("default", pattern=NAME_PATTERN)
    revision: str = Field("", description="Content hash written by the operator; informational.")
    server: ServerSettings = Field(default_factory=ServerSettings)
    tenancy: Tenancy = Field(default_factory=Tenancy)
    budget_store: BudgetStoreSettings = Field(default_factory=BudgetStoreSettings)
    backends: list[Backend] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    budgets: list[Budget] = Field(default_factory=list)
    cache_policies: list[CachePolicy] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> RouterConfig:
        names = [b.name for b in self.backends]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate backend names: {sorted(dup)}")
        known = set(names)
        routes = [r.name for r in self.routes]
        dup = {n for n in routes if routes.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate route names: {sorted(dup)}")
        for route in self.routes:
            for i, rule in enumerate(route.rules):
                for b in rule.backends:
                    if b not in known:
                        raise ValueError(f"routes[{route.name}].rules[{i}].backends: unknown backend {b!r}")
            if route.downgrade:
                for b in route.downgrade.backends:
                    if b not in known:
                        raise ValueError(f"routes[{route.name}].downgrade.backends: unknown backend {b!r}")
        policies = {p.name: p for p in self.cache_policies}
        if len(policies) != len(self.cache_policies):
            raise ValueError("duplicate cache policy names")
        for route in self.routes:
            if route.cache_policy is not None and route.cache_policy not in policies:
                raise ValueError(f"routes[{route.name}].cachePolicy: unknown cache policy {route.cache_policy!r}")
        for p in self.cache_policies:
            if p.semantic.embedding_backend is not None and p.semantic.embedding_backend not in known:
                raise ValueError(f"cachePolicies[{p.name}].semantic.embeddingBackend: unknown backend {p.semantic.embedding_backend!r}")
        budgets = [b.name for b in self.budgets]
        dup = {n for n in budgets if budgets.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate budget names: {sorted(dup)}")
        for budget in self.budgets:
            for r in budget.routes:
                if r not in routes:
                    raise ValueError(f"budgets[{budget.name}].routes: unknown route {r!r}")
        return self

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)
