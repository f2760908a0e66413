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
    """What happens to a request once a limit is spent: reject (429 with Retry-After), downgrade (serve from the route's downgrade backends) or allow (serve, count the overage, alert)."""  # noqa: E501 (the CRD's description)

    reject = "reject"
    downgrade = "downgrade"
    allow = "allow"


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
