"""RouterConfig: the contract between the operator (or `kubetoll run`) and the sidecar.

Plain data, no Kubernetes (the model is Envoy AI Gateway's `filterapi`). The
operator compiles a namespace's custom resources into one of these and writes it
as JSON into the `kubetoll-router` ConfigMap; the sidecar reads the mounted file.
Field names are camelCase in JSON (as in the CRDs) and snake_case in Python.

Only resolved facts live here: backends with endpoint, provider, model, prices,
limits and timeouts; routes with ordered rules; budgets with tiers; cache
policies. Credentials never do: a backend names a file under the mounted
credentials Secret, or (for `kubetoll run`) an environment variable.

The parts a custom resource shares with its compiled form (pricing, timeouts,
rules, caps, tiers, tenancy, cache settings) are the models of `parts`; only
what exists on one side alone is defined here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .enums import DEFAULT_FALLBACK_ON, FailMode, FailureClass, OnExhausted, Provider, TierHeaderPolicy
from .jwt_settings import JwtIdentity
from .model_base import ContractModel
from .names import CREDENTIAL_HEADERS, NAME_PATTERN, ROUTE_NAME_PATTERN
from .parts import (
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

CONFIG_VERSION: Literal[1] = 1

# --------------------------------------------------------------------------- server


class ServerSettings(ContractModel):
    host: str = Field(
        "127.0.0.1", description="API listen address. Keep 127.0.0.1: the API carries no auth of its own."
    )
    port: int = Field(7400, ge=1, le=65535)
    metrics_host: str = Field("0.0.0.0", description="Address for /metrics, /healthz, /readyz (may be the pod IP).")
    metrics_port: int = Field(7401, ge=1, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Requests over this size get 413.")
    drain_seconds: float = Field(25.0, ge=0, description="On SIGTERM, how long requests in flight may take to finish.")
    header_timeout_seconds: float = Field(
        15.0,
        gt=0,
        description="A connection without a whole request head (or idle between requests) this long is closed.",
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="A request body not received in full within this is answered 408 and dropped."
    )
    max_connections: int = Field(1024, ge=1, description="Connections the API port holds at once; more are closed.")
    metrics_max_connections: int = Field(
        128, ge=1, description="Connections the metrics and probe port holds at once; more are closed."
    )
    credentials_dir: str = Field(
        "/var/run/kubetoll/credentials", description="Where the kubetoll-credentials Secret is mounted."
    )
    log_prompts: bool = Field(False, description="Debug only: include prompts and completions in logs.")
    pod_labels_file: str = Field(
        "/etc/kubetoll/podinfo/labels",
        description="Downward-API file with the pod's labels, for routes with a podSelector.",
    )
    state_dir: str = Field(
        "/var/lib/kubetoll",
        description="Where the sidecar keeps, across its own restarts, spend Redis has not confirmed and the failOpen "
        "allowance it used (the injector mounts an emptyDir here). Missing or not writable: nothing is kept.",
    )
    batch_poll_seconds: float = Field(
        60.0,
        gt=0,
        description="How often the sidecar asks the provider about the Batch API jobs it holds reservations for "
        "(a client retrieving a finished batch settles it at once).",
    )

    @model_validator(mode="after")
    def _ports_differ(self) -> ServerSettings:
        if self.port == self.metrics_port:
            raise ValueError("server.port and server.metricsPort must differ")
        return self


# --------------------------------------------------------------------------- telemetry


def _credential_file_name(value: str | None, field: str) -> str | None:
    if value is not None and ("/" in value or value.startswith(".") or not value):
        raise ValueError(f"{field} must be a plain file name inside server.credentialsDir")
    return value


class OtlpExport(ContractModel):
    """Where the sidecar sends its traces: an OTLP/HTTP collector."""

    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP URL of the collector, e.g. http://otel-collector.observability:4318 (a URL without "
        "a path gets /v1/traces). Unset: no traces, and the sidecar loads no OpenTelemetry code.",
    )
    protocol: Literal["http/protobuf"] = Field("http/protobuf", description="The OTLP transport (only http/protobuf).")
    headers_file: str | None = Field(
        None,
        description="File name under server.credentialsDir holding the export's headers (e.g. the collector's "
        "Authorization), one `Name: value` per line. Never put in a span.",
    )
    timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="One export call's timeout; exports run in the background, never on a request."
    )

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", v):
            raise ValueError("telemetry.otlp.endpoint must be an http:// or https:// URL (OTLP/HTTP)")
        return v

    @field_validator("headers_file")
    @classmethod
    def _plain_headers_file(cls, v: str | None) -> str | None:
        return _credential_file_name(v, "telemetry.otlp.headersFile")


class TelemetrySettings(ContractModel):
    """OpenTelemetry traces (docs/sidecar.md, "Traces"). Off unless otlp.endpoint is set; read at start."""

    otlp: OtlpExport = Field(default_factory=OtlpExport)
    sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of traces started here that are kept (a request with a traceparent follows its "
        "parent's sampled flag instead).",
    )
    tenant_hash_key_file: str | None = Field(
        None,
        description="File name under server.credentialsDir with the key of kubetoll.tenant.hash (HMAC-SHA256 of the "
        "tenant id), so every sidecar hashes a tenant alike. Unset: a random key per process.",
    )
    max_queued_spans: int = Field(
        2048,
        ge=1,
        le=1_000_000,
        description="Finished spans waiting for export; past this they are dropped (kubetoll_traces_dropped_total).",
    )

    @field_validator("tenant_hash_key_file")
    @classmethod
    def _plain_key_file(cls, v: str | None) -> str | None:
        return _credential_file_name(v, "telemetry.tenantHashKeyFile")


# --------------------------------------------------------------------------- backends


class Credential(ContractModel):
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


class PriceTier(ContractModel):
    """A catalogue price that replaces the base one for a request over `start` prompt tokens."""

    start: int = Field(ge=0, description="Prompt (input) tokens a request must exceed for this price to apply.")
    per_mtok: float = Field(ge=0, alias="perMTok", description="USD per million tokens.")


class CatalogRate(ContractModel):
    """One kind of token's catalogue price, USD per million tokens, with its prompt-size tiers."""

    per_mtok: float = Field(ge=0, alias="perMTok", description="USD per million tokens.")
    tiers: list[PriceTier] = Field(default_factory=list)


class CatalogPrice(ContractModel):
    """One price catalogue entry, as the compiler read it (rates as the catalogue gives them, unrounded)."""

    provider: str = Field(min_length=1, description="The catalogue's provider id.")
    model: str = Field(min_length=1, description="The catalogue's model id.")
    input: CatalogRate
    output: CatalogRate | None = Field(None, description="Absent for input-only (embedding) models.")
    cached_input: CatalogRate | None = Field(None, alias="cachedInput", description="Absent: the input price.")
    cache_write: CatalogRate | None = Field(None, alias="cacheWrite", description="Absent: the input price.")


class CatalogPrices(ContractModel):
    """The price catalogue's prices for a backend priced from it, resolved where the config is compiled.

    The sidecar carries no price catalogue (it would cost every pod tens of MB and a
    catalogue version of its own): the operator and `kubetoll run` look the backend's
    model up in `genai-prices` and write what they found here.
    """

    standard: CatalogPrice
    batch: CatalogPrice | None = Field(None, description="The catalogue's Batch API prices, when it has them.")


class Replica(ContractModel):
    """One ready replica of an in-cluster backend, as the operator read it from the Service's EndpointSlices."""

    url: str = Field(description="The replica's own base URL, e.g. http://10.0.3.7:8000/v1.")
    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="The replica's pod name (else its place in the list): the `replica` label of its metrics.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("replica url must be an http:// or https:// URL")
        return v.rstrip("/")


class Backend(ContractModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    provider: Provider
    model: str = Field(min_length=1, description="The model id sent upstream.")
    endpoint: str = Field(description="Base URL, e.g. https://api.openai.com/v1 or http://vllm.models.svc:8000/v1.")
    credentials: Credential | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="Extra non-secret request headers.")
    azure: AzureSettings | None = None
    pricing: Pricing = Field(default_factory=Pricing)
    catalog_prices: CatalogPrices | None = Field(
        None,
        alias="catalogPrices",
        description="For a backend priced from the catalogue (no explicit pricing): its catalogue prices, written "
        "by the compiler. Absent: looked up in the catalogue at load where one is installed (not in the sidecar "
        "image).",
    )
    limits: BackendLimits = Field(default_factory=BackendLimits)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)
    max_connections: int = Field(100, ge=1, description="Size of this backend's keep-alive pool.")
    # Absent (not empty) without replicas, so a config without them keeps the hash it had before the field.
    replicas: list[Replica] | None = Field(
        None,
        max_length=1000,
        description="The ready replicas behind `endpoint` (an in-cluster Service), each called directly, the "
        "least loaded first. Absent or empty: `endpoint` is called.",
    )
    load_metrics: LoadMetrics | None = Field(
        None, description="How the sidecar reads each replica's load. Absent: not read (hosted backends)."
    )

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
            if h.lower() in CREDENTIAL_HEADERS:
                raise ValueError(f"header {h!r} carries a credential; use credentials instead")
        return v

    @model_validator(mode="after")
    def _provider_fields(self) -> Backend:
        if self.provider is Provider.azure_openai and self.azure is None:
            raise ValueError("provider azure-openai needs azure.deployment")
        if self.provider is not Provider.azure_openai and self.azure is not None:
            raise ValueError("azure settings are only for provider azure-openai")
        if self.catalog_prices is not None and self.pricing.is_override:
            # Explicit prices win; catalogue prices beside them would be read by nobody.
            raise ValueError("catalogPrices is for a backend priced from the catalogue, not one with explicit pricing")
        return self


# --------------------------------------------------------------------------- routes


class Route(ContractModel):
    name: Annotated[str, Field(pattern=ROUTE_NAME_PATTERN)]
    rules: list[Rule] = Field(min_length=1)
    fallback_on: list[FailureClass] = Field(default_factory=lambda: list(DEFAULT_FALLBACK_ON))
    max_output_tokens: int | None = Field(
        None, gt=0, description="Cap on max_tokens; also the output reservation when the request gives none."
    )
    downgrade: Downgrade | None = None
    pod_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Serve this route only in pods whose labels include all of these (empty: every pod).",
    )
    cache_policy: str | None = Field(None, description="Name of the cache policy answering this route from cache.")
    spillover: Spillover | None = Field(
        None, description="Skip an in-cluster backend whose replicas' queues are all deeper than this."
    )
    context: ContextPolicy | None = Field(
        None, description="What a chat prompt over maxPromptTokens becomes (docs/routing.md, Context policies)."
    )


# --------------------------------------------------------------------------- budgets


class Budget(ContractModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    routes: list[str] = Field(default_factory=list, description="Routes this budget covers; empty means all.")
    cap: Cap = Field(default_factory=Cap, description="Namespace-wide cap across every tenant.")
    cap_on_exhausted: OnExhausted = OnExhausted.reject
    timezone: str = "UTC"
    tiers: dict[str, TierLimits] = Field(default_factory=dict)
    fail_mode: FailMode = FailMode.fail_open
    suspended: bool = Field(False, description="Kill switch: admit nothing under this budget (403).")
    workload_selector: LabelSelector | None = Field(
        None,
        description="Apply this budget only in sidecars whose pod's labels (server.podLabelsFile) match; "
        "absent: every pod. The pods it selects share its meters.",
    )
    tag_selector: dict[str, str] | None = Field(
        None, description="Apply this budget only to requests carrying all these tags (e.g. feature: search)."
    )
    attribution: Attribution | None = Field(None, description="The request tags kept on spend records.")
    exhausted_response: str | None = Field(
        None, description="The answer served when a limit with onExhausted respond is spent."
    )

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return valid_timezone(v)

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, v: dict[str, TierLimits]) -> dict[str, TierLimits]:
        for name in v:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"tier name {name!r} must match {NAME_PATTERN}")
        return v

    def covers(self, route: str) -> bool:
        return not self.routes or route in self.routes

    def selects(self, tags: Mapping[str, str]) -> bool:
        """Whether a request with these (accepted) tags falls under this budget (its tagSelector)."""
        return not self.tag_selector or all(tags.get(k) == v for k, v in self.tag_selector.items())

    def applies_to(self, pod_labels: Mapping[str, str]) -> bool:
        """Whether this budget applies in a pod with these labels (its workloadSelector, if any, matches)."""
        return self.workload_selector is None or self.workload_selector.matches(pod_labels)


class UnavailableBudget(ContractModel):
    """A budget that names routes but could not be compiled and has no last good version.

    Fail closed: the routes it would cover answer 503 `budget_unavailable` rather than
    serve without it. The name is kept as written (it may be the very thing that is
    invalid), bounded so a config cannot grow without limit.
    """

    name: str = Field(min_length=1, max_length=253)
    routes: list[str] | None = Field(
        None, description="Routes it would cover (model names); absent means every route of the namespace."
    )
    reason: str = Field(max_length=64, description="Why it did not compile, e.g. InvalidSpec.")
    message: str = Field("", max_length=1024, description="Field and reason, for the 503 body.")

    def covers(self, route: str) -> bool:
        return self.routes is None or route in self.routes


# --------------------------------------------------------------------------- caching


class CachePolicy(CacheSettings):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]


class BudgetStoreSettings(ContractModel):
    """Where budget state lives. No URL: in process memory (one sidecar, `kubetoll run`, the demo)."""

    url: str | None = Field(
        None,
        description="redis://, rediss:// (TLS), redis+sentinel:// or redis+cluster:// URL, without credentials.",
    )
    username_file: str | None = Field(None, description="File under credentialsDir holding the Redis ACL user.")
    password_file: str | None = Field(None, description="File under credentialsDir holding the Redis password.")
    timeout_ms: float = Field(50.0, gt=0, description="No request waits on Redis longer than this.")
    ledger_retention_days: int = Field(35, ge=1, description="Spend ledger records older than this are trimmed.")
    expected_sidecars: int = Field(
        0,
        ge=0,
        description="Sidecars sharing the namespace's budgets, as the operator last counted injected pods (rounded "
        "up to a power of two). A sidecar that has not seen the real count in Redis divides its failOpen allowance "
        "by this. 0: unknown.",
    )
    max_meters: int = Field(
        100_000,
        ge=100,
        description="Meters the in-memory store keeps (tenant ids are the caller's); past it the oldest idle tenant "
        "windows are evicted, their spend kept in a sketch that never undercounts.",
    )

    @field_validator("url")
    @classmethod
    def _no_inline_credentials(cls, v: str | None) -> str | None:
        if v is not None:
            if not re.match(r"^(redis|rediss|redis\+sentinel|redis\+cluster|unix)://", v):
                raise ValueError(
                    "budgetStore.url must be a redis://, rediss://, redis+sentinel://, redis+cluster:// or unix:// URL"
                )
            if re.match(r"^[a-z+]+://[^/@]*@", v):
                raise ValueError("budgetStore.url must not carry credentials; use usernameFile/passwordFile")
        return v


# --------------------------------------------------------------------------- tenancy


class RouterTenancy(Tenancy):
    """The namespace's tenancy as compiled: the budgets' `spec.tenant`, plus the tenant → tier map every
    TokenBudget's `tenantTiers` and `tenantTiersFrom` add up to (the platform team's assignment, which the
    tier header cannot lift a tenant above unless tierHeaderPolicy is trusted)."""

    tenant_tiers: dict[str, str] | None = Field(
        None, description="Tenant id → assigned tier; a tenant not in it is assigned defaultTier."
    )
    # The resource's spec.tenant.jwt names a Secret and a ConfigMap (kubetoll_operator.resources.JwtSpec);
    # compiled, the Secret is a credentials file and the public keys are inline (kubetoll_core.jwt_settings).
    jwt: JwtIdentity | None = Field(
        None, description="Signed identity: the tenant (and tier) from the claims of a token the platform signed."
    )

    @field_validator("tenant_tiers")
    @classmethod
    def _tenant_tiers(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            check_tenant_tiers(v)
        return v

    def effective_tier_header_policy(self) -> TierHeaderPolicy:
        """tierHeaderPolicy as set, else capped when tiers are assigned and trusted (as before) when not."""
        if self.tier_header_policy is not None:
            return self.tier_header_policy
        return TierHeaderPolicy.capped if self.tenant_tiers else TierHeaderPolicy.trusted


# --------------------------------------------------------------------------- the whole


def _duplicates(names: list[str]) -> list[str]:
    seen: set[str] = set()
    dup: set[str] = set()
    for n in names:
        (dup if n in seen else seen).add(n)
    return sorted(dup)


class RouterConfig(ContractModel):
    version: Literal[1] = CONFIG_VERSION
    namespace: str = Field("default", pattern=NAME_PATTERN)
    revision: str = Field("", description="Content hash written by the operator; informational.")
    server: ServerSettings = Field(default_factory=ServerSettings)
    tenancy: RouterTenancy = Field(default_factory=RouterTenancy)
    budget_store: BudgetStoreSettings = Field(default_factory=BudgetStoreSettings)
    backends: list[Backend] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    budgets: list[Budget] = Field(default_factory=list)
    unavailable_budgets: list[UnavailableBudget] = Field(
        default_factory=list, description="Budgets that failed to compile: their routes answer 503, never unbudgeted."
    )
    cache_policies: list[CachePolicy] = Field(default_factory=list)
    telemetry: TelemetrySettings = Field(
        default_factory=TelemetrySettings,
        description="OpenTelemetry traces; off unless telemetry.otlp.endpoint is set.",
    )

    @model_validator(mode="after")
    def _references(self) -> RouterConfig:
        # Linear in the size of the config: a namespace may hold thousands of routes.
        names = [b.name for b in self.backends]
        dup = _duplicates(names)
        if dup:
            raise ValueError(f"duplicate backend names: {dup}")
        known = set(names)
        routes = [r.name for r in self.routes]
        dup = _duplicates(routes)
        if dup:
            raise ValueError(f"duplicate route names: {dup}")
        for route in self.routes:
            for i, rule in enumerate(route.rules):
                for where, b in rule.backend_refs():  # the chain, cascade steps and experiment arms
                    if b not in known:
                        raise ValueError(f"routes[{route.name}].rules[{i}].{where}: unknown backend {b!r}")
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
                raise ValueError(
                    f"cachePolicies[{p.name}].semantic.embeddingBackend: "
                    f"unknown backend {p.semantic.embedding_backend!r}"
                )
            verifier = p.semantic.verifier
            if verifier is not None and verifier.backend is not None and verifier.backend not in known:
                raise ValueError(
                    f"cachePolicies[{p.name}].semantic.verifier.backend: unknown backend {verifier.backend!r}"
                )
        dup = _duplicates([b.name for b in self.budgets])
        if dup:
            raise ValueError(f"duplicate budget names: {dup}")
        route_set = set(routes)
        for budget in self.budgets:
            for r in budget.routes:
                if r not in route_set:
                    raise ValueError(f"budgets[{budget.name}].routes: unknown route {r!r}")
        return self

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)
