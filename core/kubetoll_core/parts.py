"""Sub-models shared by the custom resources and the RouterConfig.

A ModelBackend's `pricing`, `limits`, `timeouts` and `circuitBreaker`, a
ModelRoute's rules and downgrade, a TokenBudget's cap, tiers and tenancy, and a
CachePolicy's settings are the same objects in the resource and in the
RouterConfig the operator compiles it into. They are defined once, here, with
the CRD's descriptions and rules, so a new field is one edit (plus, where the
operator must translate it, one line of the compiler).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from .enums import (
    CacheScope,
    CascadeCheck,
    CascadeStreams,
    ContextOverflow,
    EmbedInput,
    LoadMetricsFormat,
    OnExhausted,
    RerankApi,
    SelectorOperator,
    StickyBy,
    TierHeaderPolicy,
    VerifierKind,
)
from .model_base import CelRule, ContractModel, regex_compiles
from .names import (
    HEADER_NAME_PATTERN,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    MAX_LABEL_KEY_LENGTH,
    NAME_PATTERN,
    TIER_NAME_PATTERN,
)

# --------------------------------------------------------------------------- backends


class AzureSettings(ContractModel):
    """Azure OpenAI deployment settings (provider azure-openai only)."""

    deployment: str = Field(min_length=1, max_length=256, description="Azure OpenAI deployment name.")
    api_version: str = Field(
        "2024-10-21",
        min_length=1,
        max_length=64,
        description="Azure OpenAI REST API version (api-version query parameter).",
    )


class Pricing(ContractModel):
    """USD prices. Leave empty to use the price catalogue for the backend's model; per-million-token prices override it; gpuHourlyUSD with tokensPerSecond gives an in-cluster GPU server a shadow price."""  # noqa: E501 (the CRD's description)

    input_per_mtok: float | None = Field(
        None, ge=0, alias="inputPerMTok", description="USD per million input (prompt) tokens."
    )
    output_per_mtok: float | None = Field(
        None, ge=0, alias="outputPerMTok", description="USD per million output (completion) tokens."
    )
    cached_input_per_mtok: float | None = Field(
        None,
        ge=0,
        alias="cachedInputPerMTok",
        description="USD per million input tokens read from the provider's prompt cache (default: the input price).",
    )
    cache_write_per_mtok: float | None = Field(
        None,
        ge=0,
        alias="cacheWritePerMTok",
        description="USD per million input tokens written to the provider's prompt cache (Anthropic; default: the input price).",  # noqa: E501
    )
    gpu_hourly_usd: float | None = Field(
        None, ge=0, alias="gpuHourlyUSD", description="What the GPU server costs per hour, in USD."
    )
    tokens_per_second: float | None = Field(
        None,
        gt=0,
        alias="tokensPerSecond",
        description="Sustained throughput of the GPU server (input and output tokens).",
    )
    catalog_model: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        alias="catalogModel",
        description="Look this model id up in the price catalogue instead of spec.model.",
    )
    catalog_provider: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        alias="catalogProvider",
        description="Price catalogue provider id (e.g. openai, anthropic, azure).",
    )
    batch_discount: float | None = Field(
        None,
        ge=0,
        le=1,
        alias="batchDiscount",
        description="Batch API discount, as a fraction of the standard price (0.5: half price). Default: the "
        "catalogue's batch prices where it has them, else the provider's published discount (0.5 for openai and "
        "azure-openai, none for openai-compatible).",
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
            lambda p: (
                (p.cached_input_per_mtok is None and p.cache_write_per_mtok is None) or p.input_per_mtok is not None
            ),
        ),
        CelRule(
            "has(self.gpuHourlyUSD) == has(self.tokensPerSecond)",
            "gpuHourlyUSD and tokensPerSecond come in pairs: set both or neither",
            lambda p: (p.gpu_hourly_usd is None) == (p.tokens_per_second is None),
        ),
        CelRule(
            "!(has(self.gpuHourlyUSD) || has(self.tokensPerSecond)) || !(has(self.inputPerMTok) || has(self.outputPerMTok) || has(self.cachedInputPerMTok) || has(self.cacheWritePerMTok))",  # noqa: E501
            "use per-million-token prices or gpuHourlyUSD with tokensPerSecond, not both",
            lambda p: (
                not (p.gpu_hourly_usd is not None or p.tokens_per_second is not None)
                or not any(
                    v is not None
                    for v in (p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok, p.cache_write_per_mtok)
                )
            ),
        ),
    )

    @property
    def is_override(self) -> bool:
        return self.input_per_mtok is not None or self.gpu_hourly_usd is not None


class BackendLimits(ContractModel):
    """The provider's limits for this model."""

    context_window: int | None = Field(None, gt=0, description="Prompt plus output tokens the model accepts.")
    max_output_tokens: int | None = Field(
        None, gt=0, description="Most output tokens the model produces in one response."
    )

    __cel_rules__ = (
        CelRule(
            "!has(self.contextWindow) || !has(self.maxOutputTokens) || self.maxOutputTokens <= self.contextWindow",
            "maxOutputTokens must not exceed contextWindow",
            lambda m: (
                m.context_window is None or m.max_output_tokens is None or m.max_output_tokens <= m.context_window
            ),
            ".maxOutputTokens",
        ),
    )


class Timeouts(ContractModel):
    """Per-attempt timeouts, in seconds."""

    connect: float = Field(3.0, gt=0, le=3600, description="Seconds to open a connection.")
    first_token: float = Field(
        30.0, gt=0, le=3600, description="Seconds until the response headers or the first streamed byte."
    )
    total: float = Field(300.0, gt=0, le=86400, description="Seconds for the whole attempt.")


class CircuitBreaker(ContractModel):
    """Stop sending to a backend that keeps failing, for a while."""

    failure_threshold: int = Field(5, ge=1, le=10000, description="Consecutive failures that open the circuit.")
    cooldown_seconds: float = Field(
        30.0, gt=0, le=86400, description="How long an open circuit stays open before one probe request."
    )
    max_retry_after_seconds: float = Field(
        300.0,
        gt=0,
        le=86400,
        description=(
            "The longest a provider's Retry-After (on a 429 or 5xx) may hold the circuit open: a longer value, "
            "or inf, is cut to this; a negative, NaN or unreadable one is ignored (the failure counts as any other)."
        ),
    )


class LoadMetrics(ContractModel):
    """Where and how often the sidecar reads an in-cluster backend's replicas' load (docs/routing.md, Load-aware choice)."""  # noqa: E501 (the CRD's description)

    format: LoadMetricsFormat = Field(
        LoadMetricsFormat.none, description="Which server's gauges to read: vllm, tgi, sglang or none (not read)."
    )
    path: str = Field(
        "/metrics",
        max_length=256,
        pattern=r"^/\S*$",
        description="Path of the Prometheus text endpoint on each replica's host and port.",
    )
    interval_seconds: float = Field(1.0, ge=0.1, le=60, description="Seconds between two reads of one replica.")
    timeout_seconds: float = Field(
        0.5, gt=0, le=10, description="A read that takes longer fails (the replica's load is then as last read)."
    )
    stale_after_seconds: float = Field(
        5.0,
        gt=0,
        le=600,
        description="A replica whose last good read is older than this counts as unknown: still used, after "
        "the replicas whose load is known.",
    )


class Spillover(ContractModel):
    """Skip an in-cluster backend whose every replica has a deep queue, for the next backend of the chain."""

    queue_depth: int = Field(
        ge=0,
        le=100000,
        description="When every replica of a backend with loadMetrics reports more requests waiting than this, "
        "the request goes to the next backend of the chain (a hosted API, say). A replica whose load is unknown "
        "never counts as deep.",
    )


# --------------------------------------------------------------------------- routes


class HeaderMatch(ContractModel):
    """A request header condition. With neither value nor regex, the header only has to be present."""

    name: str = Field(
        min_length=1, max_length=256, pattern=HEADER_NAME_PATTERN, description="Header name (case-insensitive)."
    )
    value: str | None = Field(None, max_length=1024, description="Exact value the header must have.")
    regex: str | None = Field(
        None,
        max_length=1024,
        description="RE2 regular expression searched in the header value (no backreferences or lookaround).",
    )

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
        return regex_compiles(v)


class RuleMatch(ContractModel):
    """Conditions on a request; all given ones must hold. An empty match matches every request."""

    min_prompt_tokens: int | None = Field(None, ge=0, description="The prompt has at least this many tokens.")
    max_prompt_tokens: int | None = Field(None, ge=0, description="The prompt has at most this many tokens.")
    tiers: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="The tenant's tier is one of these.",
        json_schema_extra={"items": {"type": "string", "maxLength": 63, "description": "A tier name."}},
    )
    tenants: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="The tenant id is one of these.",
        json_schema_extra={"items": {"type": "string", "maxLength": 256, "description": "A tenant id."}},
    )
    header: HeaderMatch | None = Field(None, description="A request header condition.")
    keywords: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Any of these words appears in the last user message (case-insensitive).",
        json_schema_extra={"items": {"type": "string", "maxLength": 256, "minLength": 1, "description": "A keyword."}},
    )
    regex: str | None = Field(
        None,
        max_length=1024,
        description="RE2 regular expression searched in the last user message (no backreferences or lookaround).",
    )

    __cel_rules__ = (
        CelRule(
            "!has(self.minPromptTokens) || !has(self.maxPromptTokens) || self.minPromptTokens <= self.maxPromptTokens",
            "minPromptTokens must not be greater than maxPromptTokens",
            lambda m: (
                m.min_prompt_tokens is None or m.max_prompt_tokens is None or m.min_prompt_tokens <= m.max_prompt_tokens
            ),
            ".minPromptTokens",
        ),
    )

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        return regex_compiles(v)


def _backend_items() -> dict[str, Any]:
    """The CRD schema of a list of backend names' items (a fresh dict each time: schemas are edited in place)."""
    return {"items": {"type": "string", "maxLength": 253, "description": "Name of a ModelBackend in this namespace."}}


DEFAULT_CASCADE_CHECKS = tuple(CascadeCheck)


class CascadeStep(ContractModel):
    """One cheaper step of a cascade: a fallback chain whose answer is served only if it passes the checks."""

    backends: list[str] = Field(
        min_length=1,
        max_length=16,
        description="ModelBackend names: this step's fallback chain, in order.",
        json_schema_extra=_backend_items(),
    )


class Cascade(ContractModel):
    """Try cheaper backends first: a step's answer that fails a check escalates to the next step, and the last step is the rule's (or arm's) backends, served unchecked (docs/routing.md, "Cascades")."""  # noqa: E501 (the CRD's description)

    steps: list[CascadeStep] = Field(
        min_length=1,
        max_length=4,
        description="The steps tried before the rule's backends, cheapest first.",
    )
    checks: list[CascadeCheck] = Field(
        default_factory=lambda: list(DEFAULT_CASCADE_CHECKS),
        min_length=1,
        max_length=len(DEFAULT_CASCADE_CHECKS),
        description="What a step's answer must pass to be served (default: all of them).",
        json_schema_extra={"x-kubernetes-list-type": "set", "default": [c.value for c in DEFAULT_CASCADE_CHECKS]},
    )
    streams: CascadeStreams = Field(
        CascadeStreams.skip,
        description="Streaming requests: skip (the rule's backends stream them, no cascade) or buffer (each "
        "cheaper step's stream is read whole and checked before any of it is sent).",
    )

    @field_validator("checks")
    @classmethod
    def _unique_checks(cls, v: list[CascadeCheck]) -> list[CascadeCheck]:
        if len(set(v)) != len(v):
            raise ValueError("each check may be listed once")
        return v


class SplitArm(ContractModel):
    """One arm of an experiment: its share of the rule's traffic and what serves it."""

    name: str = Field(
        max_length=63,
        pattern=NAME_PATTERN,
        description="Arm name, recorded on the spend records of its requests.",
    )
    weight: int = Field(ge=0, le=10000, description="Share of the traffic, relative to the other arms (0: none).")
    backends: list[str] = Field(
        min_length=1,
        max_length=16,
        description="ModelBackend names: this arm's fallback chain (with a cascade, its last step).",
        json_schema_extra=_backend_items(),
    )
    cascade: Cascade | None = Field(None, description="Cheaper steps this arm tries before its backends.")


class Split(ContractModel):
    """An experiment: the rule's traffic split between arms by weight, each caller kept on one arm (docs/routing.md, "Experiments")."""  # noqa: E501 (the CRD's description)

    experiment: str = Field(
        max_length=63,
        pattern=NAME_PATTERN,
        description="Experiment name, recorded with the arm on every spend record (kubetoll report --experiment).",
    )
    sticky_by: StickyBy = Field(
        StickyBy.tenant,
        description="What keeps a caller on one arm: tenant, session (the x-kubetoll-session header, else the "
        "tenant) or none (each request drawn on its own).",
    )
    # One arm is allowed: what is left when the compiler drops arms whose backends are all gone.
    arms: list[SplitArm] = Field(min_length=1, max_length=8, description="The arms; the traffic splits by weight.")

    __cel_rules__ = (
        CelRule(
            "self.arms.all(a, self.arms.filter(b, b.name == a.name).size() == 1)",
            "arm names must be unique",
            lambda s: len({a.name for a in s.arms}) == len(s.arms),
            ".arms",
        ),
        CelRule(
            "self.arms.exists(a, a.weight > 0)",
            "at least one arm needs a weight above 0",
            lambda s: any(a.weight > 0 for a in s.arms),
            ".arms",
        ),
    )


class Rule(ContractModel):
    """A routing rule: when `match` holds, try `backends` in order (or, with `split`, the backends of the caller's arm)."""  # noqa: E501 (the CRD's description)

    name: str = Field("", max_length=63, description="Rule name, shown in logs and metrics.")
    match: RuleMatch = Field(
        default_factory=RuleMatch, description="When this rule applies; empty matches every request."
    )
    # Empty only with `split`, whose arms name the backends (the CEL rule below).
    backends: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="ModelBackend names: the fallback chain, in order (with a cascade, its last step). Leave out "
        "with split.",
        json_schema_extra=_backend_items(),
    )
    cascade: Cascade | None = Field(None, description="Cheaper steps tried before backends.")
    split: Split | None = Field(None, description="An experiment: split this rule's traffic between arms.")

    __cel_rules__ = (
        CelRule(
            "has(self.split) != (has(self.backends) && size(self.backends) > 0)",
            "set backends (a fallback chain) or split (an experiment's arms), exactly one",
            lambda r: (r.split is not None) != bool(r.backends),
            ".backends",
        ),
        CelRule(
            "!has(self.split) || !has(self.cascade)",
            "with split, a cascade goes in the arms (split.arms[].cascade)",
            lambda r: r.split is None or r.cascade is None,
            ".cascade",
        ),
    )

    def backend_refs(self) -> list[tuple[str, str]]:
        """Every backend this rule names, with the field that names it (relative to the rule), in the order
        a request may meet them: cascade steps before the chain they escalate to, arms in order."""
        out: list[tuple[str, str]] = []

        def chain(prefix: str, backends: list[str], cascade: Cascade | None) -> None:
            if cascade is not None:
                for i, step in enumerate(cascade.steps):
                    out.extend((f"{prefix}cascade.steps[{i}].backends[{j}]", b) for j, b in enumerate(step.backends))
            out.extend((f"{prefix}backends[{j}]", b) for j, b in enumerate(backends))

        if self.split is not None:
            for i, arm in enumerate(self.split.arms):
                chain(f"split.arms[{i}].", arm.backends, arm.cascade)
        else:
            chain("", self.backends, self.cascade)
        return out

    def backend_names(self) -> list[str]:
        """Every backend this rule may call, each once, in `backend_refs` order."""
        return list(dict.fromkeys(b for _, b in self.backend_refs()))


class BurnRateDowngrade(ContractModel):
    """Downgrade before atPercent when the cap is being spent fast enough to run out before its period ends."""

    window_minutes: int = Field(
        60,
        ge=5,
        le=1440,
        description="Minutes the spend rate is averaged over (a quarter of it must have been seen first).",
    )
    tiers: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="Tiers downgraded by the burn rate; empty: every tier. Tiers not listed (premium, say) keep "
        "their backends until atPercent.",
        json_schema_extra={"items": {"type": "string", "maxLength": 63}},
    )


class Downgrade(ContractModel):
    """Budget-aware downgrade: past a share of the budget, serve from cheaper backends."""

    at_percent: float = Field(
        ge=1, le=100, description="Budget use, in percent, from which the downgrade backends serve this route."
    )
    backends: list[str] = Field(
        min_length=1,
        max_length=16,
        description="ModelBackend names used once the budget use reaches atPercent, in order.",
        json_schema_extra={
            "items": {"type": "string", "maxLength": 253, "description": "Name of a ModelBackend in this namespace."}
        },
    )
    burn_rate: BurnRateDowngrade | None = Field(
        None,
        description="Also downgrade while a cap's current spend rate would exhaust it before its period ends "
        "(docs/sidecar.md, Burn-aware downgrade). Never refuses: it only picks the downgrade backends.",
    )


class ContextPolicy(ContractModel):
    """What a chat request whose estimated prompt is over maxPromptTokens becomes: trimmed, summarized or refused (docs/routing.md, "Context policies")."""  # noqa: E501 (the CRD's description)

    max_prompt_tokens: int = Field(
        ge=64,
        le=10_000_000,
        description="The most prompt tokens (as the sidecar estimates them) a chat request may send upstream.",
    )
    keep_system: bool = Field(
        True, description="Keep every system (and developer) message; false: they are dropped like other turns."
    )
    keep_last_turns: int = Field(
        4,
        ge=0,
        le=1000,
        description="The last messages always kept as they are (an assistant message with tool calls and its "
        "tool results are kept or dropped together, so the kept tail may be longer).",
    )
    overflow: ContextOverflow = Field(
        ContextOverflow.drop_oldest,
        description="dropOldest (drop the oldest turns until the prompt fits), summarize (replace the turns "
        "before the kept tail by one summary from the summarizer backend) or reject (a 400 "
        "context_length_exceeded).",
    )
    summarizer: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="Name of a chat ModelBackend in this namespace (a cheap one) that writes the summaries. "
        "Required for summarize, not allowed otherwise.",
    )

    __cel_rules__ = (
        CelRule(
            "(self.overflow == 'summarize') == has(self.summarizer)",
            "overflow summarize needs summarizer (a ModelBackend); dropOldest and reject take none",
            lambda c: (c.overflow is ContextOverflow.summarize) == (c.summarizer is not None),
            ".summarizer",
        ),
    )


# --------------------------------------------------------------------------- budgets

TAG_KEY_PATTERN = r"^[a-z][a-z0-9_.-]{0,31}$"
TAG_VALUE_PATTERN = r"^[A-Za-z0-9._:/-]+$"
DEFAULT_MAX_TAG_VALUES = 100
DEFAULT_MAX_TAG_VALUE_LENGTH = 64


class AttributionTag(ContractModel):
    """A request tag key the platform accepts (from x-kubetoll-tags or the OpenAI metadata object)."""

    key: str = Field(pattern=TAG_KEY_PATTERN, description="The tag key, e.g. feature or team.")
    max_values: int = Field(
        DEFAULT_MAX_TAG_VALUES,
        ge=1,
        le=10000,
        description="Distinct values kept per UTC day in each sidecar; later new values are recorded as other.",
    )
    metric_label: bool = Field(
        False,
        description="Also count spend by this key's values in kubetoll_spend_by_tag_usd_total (bounded by maxValues).",
    )


class Attribution(ContractModel):
    """Which request tags are kept on spend records; tags with other keys are dropped and counted."""

    tags: list[AttributionTag] = Field(
        default_factory=list,
        max_length=16,
        description="Tag keys accepted on the requests this budget covers.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["key"]},
    )
    max_value_length: int = Field(
        DEFAULT_MAX_TAG_VALUE_LENGTH,
        ge=1,
        le=128,
        description="Longest tag value kept (characters: letters, digits and . _ : / -); longer ones are dropped.",
    )

    __cel_rules__ = (
        CelRule(
            "self.tags.all(t, self.tags.filter(u, u.key == t.key).size() == 1)",
            "tag keys must be unique",
            lambda s: len({t.key for t in s.tags}) == len(s.tags),
            ".tags",
        ),
    )


class Cap(ContractModel):
    """A namespace-wide cap across every tenant; days and months reset on the calendar in the budget's timezone."""

    usd_per_day: float | None = Field(None, gt=0, alias="usdPerDay", description="USD per calendar day.")
    usd_per_month: float | None = Field(None, gt=0, alias="usdPerMonth", description="USD per calendar month.")
    tokens_per_day: int | None = Field(None, gt=0, description="Tokens (input plus output) per calendar day.")
    tokens_per_month: int | None = Field(None, gt=0, description="Tokens (input plus output) per calendar month.")


class TierLimits(ContractModel):
    """Limits for each tenant of one tier."""

    tokens_per_minute: int | None = Field(None, gt=0, description="Token bucket: tokens per minute per tenant.")
    requests_per_minute: int | None = Field(None, gt=0, description="Requests per minute per tenant.")
    usd_per_day: float | None = Field(None, gt=0, alias="usdPerDay", description="USD per calendar day per tenant.")
    usd_per_month: float | None = Field(
        None, gt=0, alias="usdPerMonth", description="USD per calendar month per tenant."
    )
    usd_per_session: float | None = Field(
        None,
        gt=0,
        alias="usdPerSession",
        description="USD per session (x-kubetoll-session or metadata.session_id) per calendar day; requests without "
        "a session are not under it.",
    )
    tokens_per_session: int | None = Field(
        None, gt=0, description="Tokens (input plus output) per session per calendar day."
    )
    session_idle_seconds: int | None = Field(
        None,
        ge=60,
        le=30 * 86400,
        description="A session with no request for this long ends: the same session id then starts a new session, "
        "with the whole usdPerSession and tokensPerSession again. Absent: a session lasts the calendar day.",
    )
    on_exhausted: OnExhausted = Field(OnExhausted.reject, description="What happens once a tenant has spent a limit.")

    @property
    def per_session(self) -> bool:
        return self.usd_per_session is not None or self.tokens_per_session is not None

    __cel_rules__ = (
        CelRule(
            "(!has(self.tokensPerMinute) || self.tokensPerMinute > 0) && (!has(self.requestsPerMinute) || self.requestsPerMinute > 0) && (!has(self.usdPerDay) || self.usdPerDay > 0.0) && (!has(self.usdPerMonth) || self.usdPerMonth > 0.0)",  # noqa: E501
            "tier limits must be positive",
            lambda t: all(
                v is None or v > 0 for v in (t.tokens_per_minute, t.requests_per_minute, t.usd_per_day, t.usd_per_month)
            ),
        ),
        CelRule(
            "!has(self.sessionIdleSeconds) || has(self.usdPerSession) || has(self.tokensPerSession)",
            "sessionIdleSeconds ends a session's usdPerSession or tokensPerSession: set one of them, or drop it",
            lambda t: t.session_idle_seconds is None or t.per_session,
            ".sessionIdleSeconds",
        ),
    )


class Tenancy(ContractModel):
    """How the sidecar names the end user (tenant) and their tier. Every budget in a namespace that sets this must agree."""  # noqa: E501 (the CRD's description)

    header: str = Field(
        "x-kubetoll-tenant",
        max_length=256,
        pattern=HEADER_NAME_PATTERN,
        description="Request header carrying the tenant id.",
    )
    use_user_field: bool = Field(True, description="Fall back to the OpenAI `user` field when the header is absent.")
    tier_header: str = Field(
        "x-kubetoll-tier",
        max_length=256,
        pattern=HEADER_NAME_PATTERN,
        description="Request header carrying the tier name.",
    )
    default_tier: str = Field(
        "default", max_length=63, pattern=TIER_NAME_PATTERN, description="Tier of a tenant whose request names none."
    )
    required: bool = Field(False, description="Reject (400) requests that name no tenant.")
    anonymous_tenant: str = Field(
        "anonymous",
        min_length=1,
        max_length=256,
        description="Tenant id used when a request names none and a tenant is not required.",
    )
    # Absent, not defaulted: the compiler makes `capped` explicit when a budget assigns tiers, and a
    # namespace without either keeps the config (and hash) it had before these fields existed.
    tier_header_policy: TierHeaderPolicy | None = Field(
        None,
        description=(
            "What the tier header may do: trusted (it names the tier), capped (it may only choose a tier at or "
            "below the tenant's assigned tier, from TokenBudget tenantTiers or tenantTiersFrom; a tenant no map "
            "names is assigned defaultTier) or ignored (the assigned tier always). Default: capped when a "
            "TokenBudget of the namespace assigns tiers, trusted otherwise."
        ),
    )
    tier_order: list[str] | None = Field(
        None,
        max_length=64,
        description=(
            "Tier names, lowest first: what 'at or below' means for tierHeaderPolicy capped. Without it, capped "
            "lets the header choose only the tenant's assigned tier or defaultTier."
        ),
        json_schema_extra={
            "items": {"type": "string", "maxLength": 63, "pattern": TIER_NAME_PATTERN, "description": "A tier name."},
            "x-kubernetes-list-type": "set",
        },
    )

    @field_validator("tier_order")
    @classmethod
    def _tier_order(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for name in v:
            if not re.fullmatch(TIER_NAME_PATTERN, name):
                raise ValueError(f"tier name {name!r} must match {TIER_NAME_PATTERN}")
        if len(set(v)) != len(v):
            raise ValueError("tier names in tierOrder must be unique")
        return v


# --------------------------------------------------------------------------- tenant tiers and workloads

MAX_TENANT_ID_LENGTH = 128  # what the sidecar accepts from a request (tenancy.py): longer ids never arrive
MAX_TENANT_TIERS = 100_000  # entries of a namespace's tenant → tier map, all TokenBudgets together


def tenant_id_problem(tenant: object) -> str | None:
    """Why `tenant` cannot be a tenant id the sidecar would ever see (None: it can).

    The sidecar refuses ids over 128 characters, with braces or with control
    characters (they go into Redis keys and log lines), so a map entry for one could
    never apply: refused where it is written instead.
    """
    if not isinstance(tenant, str):
        return f"tenant id {tenant!r} is not a string"
    if not tenant:
        return "a tenant id must not be empty"
    if len(tenant) > MAX_TENANT_ID_LENGTH:
        return f"tenant id {tenant[:40]!r}... is longer than {MAX_TENANT_ID_LENGTH} characters"
    if "{" in tenant or "}" in tenant or any(unicodedata.category(c) in ("Cc", "Cs") for c in tenant):
        return f"tenant id {tenant!r} has braces or control characters"
    return None


def tier_name_problem(tier: object) -> str | None:
    """Why `tier` is not a tier name (None: it is one)."""
    if not isinstance(tier, str):
        return f"tier {tier!r} is not a string"
    if not re.fullmatch(TIER_NAME_PATTERN, tier):
        return f"tier name {tier!r} must be 1-63 characters of a-z, 0-9, '.', '-', '_'"
    return None


def check_tenant_tiers(v: Mapping[str, str]) -> Mapping[str, str]:
    """A field validator for a tenant → tier map: bounded, every key a tenant id, every value a tier name."""
    if len(v) > MAX_TENANT_TIERS:
        raise ValueError(f"{len(v)} tenants; at most {MAX_TENANT_TIERS}")
    for tenant, tier in v.items():
        problem = tenant_id_problem(tenant) or tier_name_problem(tier)
        if problem:
            raise ValueError(problem)
    return v


class LabelSelectorRequirement(ContractModel):
    """One condition on a pod label, as in a Kubernetes label selector."""

    key: str = Field(
        min_length=1, max_length=MAX_LABEL_KEY_LENGTH, pattern=LABEL_KEY_PATTERN, description="The label key."
    )
    operator: SelectorOperator = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="The values for In and NotIn (at least one); empty for Exists and DoesNotExist.",
        json_schema_extra={
            "items": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN, "description": "A value."}
        },
    )

    __cel_rules__ = (
        CelRule(
            "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            "In and NotIn need values; Exists and DoesNotExist take none",
            lambda r: (r.operator in (SelectorOperator.in_, SelectorOperator.not_in)) == bool(r.values),
            ".values",
        ),
    )

    @field_validator("values")
    @classmethod
    def _values(cls, v: list[str]) -> list[str]:
        for value in v:
            if len(value) > 63 or not re.fullmatch(LABEL_VALUE_PATTERN, value):
                raise ValueError(f"{value!r} is not a label value (at most 63 characters of A-Z, a-z, 0-9, - _ .)")
        return v

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator is SelectorOperator.in_:
            return value is not None and value in self.values
        if self.operator is SelectorOperator.not_in:
            return value is None or value not in self.values
        if self.operator is SelectorOperator.exists:
            return value is not None
        return value is None


class LabelSelector(ContractModel):
    """A Kubernetes label selector on the pod: every matchLabels entry and every matchExpressions requirement must hold; empty selects every pod."""  # noqa: E501 (the CRD's description)

    match_labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="Labels the pod must carry with exactly these values.",
        json_schema_extra={
            "additionalProperties": {
                "type": "string",
                "maxLength": 63,
                "pattern": LABEL_VALUE_PATTERN,
                "description": "The label's value.",
            }
        },
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=64, description="Conditions on the pod's labels, all of which must hold."
    )

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            prefix, _, _ = key.rpartition("/")
            if len(key) > MAX_LABEL_KEY_LENGTH or len(prefix) > 253 or not re.fullmatch(LABEL_KEY_PATTERN, key):
                raise ValueError(f"{key!r} is not a label key")
            if len(value) > 63 or not re.fullmatch(LABEL_VALUE_PATTERN, value):
                raise ValueError(f"{value!r} (label {key}) is not a label value")
        return v

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a pod with these labels is selected (Kubernetes semantics)."""
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            r.matches(labels) for r in self.match_expressions
        )


def valid_timezone(v: str) -> str:
    """A field validator: an IANA timezone name this machine's zone database knows."""
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {v!r} (use an IANA name such as UTC or Europe/Berlin)") from exc
    return v


# --------------------------------------------------------------------------- caching


class ExactCache(ContractModel):
    """Serve a stored answer to the same normalised request."""

    enabled: bool = Field(True, description="Turn exact caching on.")
    ttl_seconds: int = Field(3600, ge=1, le=2592000, description="How long an entry lives, in seconds.")


_MODEL_VERIFIERS = (VerifierKind.rerank, VerifierKind.judge)
DEFAULT_RERANK_THRESHOLD = 0.5
DEFAULT_EMBEDDING_TIMEOUT_MS = 2000


class SemanticVerifier(ContractModel):
    """What confirms the nearest stored question before its answer is served (docs/caching.md, "Verifiers")."""

    kind: VerifierKind = Field(
        VerifierKind.rules,
        description="rules (the strict agreement check), rerank (a cross-encoder scores the two questions), judge (a "
        "chat model answers yes or no: would one answer serve both?) or none (similarity alone).",
    )
    backend: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="Name of a ModelBackend in this namespace: for rerank an openai-compatible server with a /rerank "
        "or /score API (TEI, vLLM, Infinity), for judge any chat backend. Required for rerank and judge.",
    )
    api: RerankApi | None = Field(
        None,
        description="rerank only: the wire format, tei (POST <endpoint>/rerank with texts), cohere (POST "
        "<endpoint>/rerank with documents; vLLM, Infinity, Cohere) or score (POST <endpoint>/score; vLLM). Default "
        "cohere.",
    )
    threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description=f"rerank only: the score at or above which the candidate is served (default "
        f"{DEFAULT_RERANK_THRESHOLD}; model-specific, see docs/caching.md).",
    )
    timeout_ms: int = Field(
        2000, ge=10, le=60000, description="Milliseconds a verifier call may take; slower is a failure (a miss)."
    )
    rules_first: bool = Field(
        True,
        description="rerank and judge: run the strict agreement check first (it is free and can only turn a "
        "candidate down), so the model is asked only about candidates that pass it.",
    )

    __cel_rules__ = (
        CelRule(
            "(self.kind == 'rerank' || self.kind == 'judge') == has(self.backend)",
            "rerank and judge need backend (a ModelBackend); rules and none take none",
            lambda v: (v.kind in _MODEL_VERIFIERS) == (v.backend is not None),
            ".backend",
        ),
        CelRule(
            "self.kind == 'rerank' || !has(self.threshold)",
            "threshold is the rerank score to serve at; only kind rerank takes it",
            lambda v: v.kind is VerifierKind.rerank or v.threshold is None,
            ".threshold",
        ),
        CelRule(
            "self.kind == 'rerank' || !has(self.api)",
            "api is the rerank wire format; only kind rerank takes it",
            lambda v: v.kind is VerifierKind.rerank or v.api is None,
            ".api",
        ),
    )

    @property
    def uses_model(self) -> bool:
        """A rerank or judge verifier: a paid call to a backend."""
        return self.kind in _MODEL_VERIFIERS

    @property
    def rerank_threshold(self) -> float:
        return DEFAULT_RERANK_THRESHOLD if self.threshold is None else self.threshold

    @property
    def rerank_api(self) -> RerankApi:
        return self.api or RerankApi.cohere

    @property
    def runs_rules(self) -> bool:
        """Whether the strict agreement check runs (as the whole check, or before the model)."""
        return self.kind is VerifierKind.rules or (self.uses_model and self.rules_first)


class SemanticCircuitBreaker(ContractModel):
    """When the embedding or verifier backend keeps failing, stop calling it for a while: the semantic tier misses (and says so: the Degraded condition)."""  # noqa: E501 (the CRD's description)

    failure_threshold: int = Field(
        3, ge=1, le=10000, description="Consecutive failures (errors, timeouts, unreadable answers) that open it."
    )
    cooldown_seconds: float = Field(
        10.0, gt=0, le=86400, description="How long it stays open before one probe call is let through."
    )


DEFAULT_ANSWER_SIMILARITY = 0.92


class SemanticCache(ContractModel):
    """Serve a stored answer to a near-identical question that passes a strict agreement check."""

    enabled: bool = Field(False, description="Turn semantic caching on.")
    threshold: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Cosine similarity (model-specific; see docs/caching.md) at or above which a stored question is a candidate (a hit also needs the verifier's yes).",  # noqa: E501
    )
    embedding_backend: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="Name of a ModelBackend in this namespace that serves /v1/embeddings.",
    )
    ttl_seconds: int = Field(3600, ge=1, le=2592000, description="How long an entry lives, in seconds.")
    embed: EmbedInput = Field(
        EmbedInput.last_user_message, description="What is embedded: the last user message or all user messages."
    )
    verify: bool = Field(
        True,
        description="Deprecated: use verifier. Without verifier, true is verifier.kind rules (the two questions must agree on numbers, negation, named things and the action asked for) and false is kind none.",  # noqa: E501
    )
    max_entries: int = Field(20000, ge=1, le=100000000, description="Entries in each sidecar's local semantic index.")
    # Absent, not defaulted (like Tenancy.tierHeaderPolicy): a policy that sets none of these
    # compiles to the config, and the cache generation, it had before they existed.
    verifier: SemanticVerifier | None = Field(
        None, description="What confirms the nearest candidate before it is served. Default: from verify."
    )
    embedding_timeout_ms: int | None = Field(
        None,
        ge=10,
        le=60000,
        description=f"Milliseconds the embedding call may take; slower is a failure (a miss). Default "
        f"{DEFAULT_EMBEDDING_TIMEOUT_MS}.",
    )
    circuit_breaker: SemanticCircuitBreaker | None = Field(
        None,
        description="When to stop calling a failing embedding or verifier backend (default: 3 failures, 10 s open).",
    )
    target_error_rate: float | None = Field(
        None,
        gt=0,
        lt=0.5,
        description="Error-rate control: the largest share of semantic hits that may be wrong answers, e.g. 0.01. "
        "A sample of would-be hits goes upstream too and the fresh answer is compared with the cached one, so "
        "each sidecar learns the similarity above which hits are right often enough; none is served until enough "
        "answers were compared (docs/caching.md). Absent: the fixed threshold alone.",
    )
    answer_similarity: float | None = Field(
        None,
        gt=0,
        le=1,
        description=f"With targetErrorRate: the cosine (by the embedding backend) at or above which a fresh answer "
        f"and the cached one are the same answer, after their text and numbers are compared. Default "
        f"{DEFAULT_ANSWER_SIMILARITY}.",
    )

    __cel_rules__ = (
        CelRule(
            "!self.enabled || has(self.embeddingBackend)",
            "semantic caching needs embeddingBackend",
            lambda s: not s.enabled or s.embedding_backend is not None,
            ".embeddingBackend",
        ),
        CelRule(
            "!has(self.verifier) || !has(self.verify) || self.verify",
            "verify is deprecated: with verifier set leave verify out (verifier.kind none turns the check off)",
            lambda s: s.verifier is None or s.verify,
            ".verify",
        ),
        CelRule(
            "!has(self.answerSimilarity) || has(self.targetErrorRate)",
            "answerSimilarity is used by error-rate control only: set targetErrorRate too",
            lambda s: s.answer_similarity is None or s.target_error_rate is not None,
            ".answerSimilarity",
        ),
    )

    @property
    def verifier_settings(self) -> SemanticVerifier:
        """The verifier in force: `verifier`, else what the deprecated `verify` means."""
        if self.verifier is not None:
            return self.verifier
        return SemanticVerifier(kind=VerifierKind.rules if self.verify else VerifierKind.none)

    @property
    def embedding_timeout(self) -> float:
        """Seconds."""
        ms = self.embedding_timeout_ms if self.embedding_timeout_ms is not None else DEFAULT_EMBEDDING_TIMEOUT_MS
        return ms / 1000.0

    @property
    def circuit(self) -> SemanticCircuitBreaker:
        return self.circuit_breaker or SemanticCircuitBreaker()

    @property
    def answer_match_similarity(self) -> float:
        return self.answer_similarity if self.answer_similarity is not None else DEFAULT_ANSWER_SIMILARITY


class Cacheable(ContractModel):
    """Which requests may be cached."""

    max_temperature: float = Field(0.0, ge=0, le=2, description="Requests with a higher temperature are not cached.")
    allow_tools: bool = Field(False, description="Cache requests that offer tools.")


class CacheSettings(ContractModel):
    """Exact and semantic response caching for the routes that name this policy."""

    exact: ExactCache = Field(default_factory=ExactCache, description="Exact-match caching.")
    semantic: SemanticCache = Field(default_factory=SemanticCache, description="Semantic caching.")
    scope: CacheScope = Field(
        CacheScope.tenant, description="Who shares entries: tenant (each tenant their own) or namespace."
    )
    cacheable: Cacheable = Field(default_factory=Cacheable, description="Which requests may be cached.")
    local_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Bound of each sidecar's in-process LRU, in bytes."
    )
