"""The enums the custom resources and the RouterConfig share (one definition for both)."""

from __future__ import annotations

from enum import Enum


class Provider(str, Enum):
    """The provider's wire protocol."""

    openai = "openai"
    azure_openai = "azure-openai"
    anthropic = "anthropic"
    openai_compatible = "openai-compatible"


# Providers whose API needs a key (the CRD refuses them without credentials).
HOSTED_PROVIDERS = ("openai", "azure-openai", "anthropic")


class FailureClass(str, Enum):
    """A failure of one attempt at a backend that moves on to the next backend in the chain."""

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


class OnExhausted(str, Enum):
    """What happens to a request once a limit is spent: reject (429 with Retry-After), downgrade (serve from the route's downgrade backends), allow (serve, count the overage, alert) or respond (answer with the budget's exhaustedResponse as a normal completion, at no cost)."""  # noqa: E501 (the CRD's description)

    reject = "reject"
    downgrade = "downgrade"
    allow = "allow"
    respond = "respond"


class FailMode(str, Enum):
    """What a budget does when the shared budget store (Redis) cannot answer in time: failOpen serves on a conservative local allowance and reconciles later, failClosed rejects with 503."""  # noqa: E501 (the CRD's description)

    fail_open = "failOpen"
    fail_closed = "failClosed"


class CacheScope(str, Enum):
    """Who shares cache entries: each tenant their own (tenant) or everyone in the namespace (namespace)."""

    tenant = "tenant"
    namespace = "namespace"


class EmbedInput(str, Enum):
    """What text of a request is embedded for the semantic cache."""

    last_user_message = "lastUserMessage"
    all_user_messages = "allUserMessages"


class VerifierKind(str, Enum):
    """What confirms a semantic cache candidate before it is served: rules (the strict agreement check), rerank (a cross-encoder's score), judge (a chat model's yes/no) or none (similarity alone)."""  # noqa: E501 (the CRD's description)

    rules = "rules"
    rerank = "rerank"
    judge = "judge"
    none = "none"


class RerankApi(str, Enum):
    """The rerank wire format: tei (POST /rerank with texts), cohere (POST /rerank with documents: vLLM, Infinity, Cohere) or score (vLLM's POST /score)."""  # noqa: E501 (the CRD's description)

    tei = "tei"
    cohere = "cohere"
    score = "score"


class TierHeaderPolicy(str, Enum):
    """What the tier header may do: trusted (it names the tier), capped (it may only choose a tier at or below the tenant's assigned one) or ignored (the assigned tier always)."""  # noqa: E501 (the CRD's description)

    trusted = "trusted"
    capped = "capped"
    ignored = "ignored"


class SelectorOperator(str, Enum):
    """A label selector requirement's operator, as in Kubernetes: In, NotIn, Exists, DoesNotExist."""

    in_ = "In"
    not_in = "NotIn"
    exists = "Exists"
    does_not_exist = "DoesNotExist"


class CascadeCheck(str, Enum):
    """A check a cascade step's answer must pass to be served: length (no choice stopped at finish_reason length), empty (every choice has text, a tool call or a refusal), refusal (no message.refusal and no short stock refusal), jsonSchema (the answer satisfies the request's response_format), toolArguments (every tool call names an offered tool and its arguments are a JSON object)."""  # noqa: E501 (the CRD's description)

    length = "length"
    empty = "empty"
    refusal = "refusal"
    json_schema = "jsonSchema"
    tool_arguments = "toolArguments"


class CascadeStreams(str, Enum):
    """What a cascade does with a streaming request: skip (no cascade: the rule's backends stream it) or buffer (each cheaper step's stream is read whole and checked before any of it is sent)."""  # noqa: E501 (the CRD's description)

    skip = "skip"
    buffer = "buffer"


class ContextOverflow(str, Enum):
    """What a route does with a chat prompt over its context policy's maxPromptTokens: dropOldest (drop the oldest turns until it fits), summarize (replace the older turns by a summary from the summarizer backend) or reject (a 400 context_length_exceeded)."""  # noqa: E501 (the CRD's description)

    drop_oldest = "dropOldest"
    summarize = "summarize"
    reject = "reject"


class StickyBy(str, Enum):
    """What keeps a caller on one arm of an experiment: tenant (the tenant id), session (the x-kubetoll-session header, else the tenant id) or none (each request drawn on its own)."""  # noqa: E501 (the CRD's description)

    tenant = "tenant"
    session = "session"
    none = "none"


class LoadMetricsFormat(str, Enum):
    """Which server's Prometheus gauges tell a replica's load: vllm (vllm:num_requests_waiting, vllm:num_requests_running, vllm:gpu_cache_usage_perc), tgi (tgi_queue_size), sglang (sglang:num_queue_reqs, sglang:num_running_reqs) or none (not read)."""  # noqa: E501 (the CRD's description)

    vllm = "vllm"
    tgi = "tgi"
    sglang = "sglang"
    none = "none"
