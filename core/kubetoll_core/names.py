"""Name and value patterns shared by the custom resources, the RouterConfig and the Redis keys."""

from __future__ import annotations

# A name that is safe in metric labels, Redis keys and headers (backends, budgets,
# cache policies, tiers, namespaces).
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
TIER_NAME_PATTERN = NAME_PATTERN
# Route names are what apps send as `model`; they may carry upper case and slashes
# (e.g. "openai/gpt-4o" or "Support-Bot").
ROUTE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
# Kubernetes object names (RFC 1123 subdomain) and Service names (RFC 1035 label).
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SERVICE_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
# An HTTP header field name (RFC 9110 token).
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
URL_PATTERN = r"^https?://[^/\s]+(/\S*)?$"
# Headers that carry credentials; those go through credentials instead.
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key", "proxy-authorization")
# The OPENAI_API_KEY the sidecar injector gives an app that sets none (the SDKs refuse to start
# without one): the sidecar holds the real keys. With tenancy.jwt it means "no token".
API_KEY_PLACEHOLDER = "kubetoll-placeholder-the-sidecar-holds-the-credentials"
# A pod's workload, as the sidecar injector derives it from the pod's owner and labels
# ("Deployment/search-api", "CronJob/nightly-report", "App/chat", "Pod/debug"): a kind, a
# slash and a name. It goes into every ledger record and a metric label, so it is one line
# of plain text of bounded length; the injector writes it and the sidecar checks it again
# (with re.fullmatch: `$` alone would let a trailing newline through).
WORKLOAD_PATTERN = r"^[A-Za-z][A-Za-z0-9]{0,62}/[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"
MAX_WORKLOAD_CHARS = 253
# Kubernetes label keys (an optional DNS-subdomain prefix and a slash, then a name of at most
# 63 characters) and label values (at most 63 characters, may be empty), for workload selectors.
_LABEL_PREFIX = r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
LABEL_KEY_PATTERN = "^" + _LABEL_PREFIX + r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
MAX_LABEL_KEY_LENGTH = 317  # 253 for the prefix, the slash, 63 for the name
