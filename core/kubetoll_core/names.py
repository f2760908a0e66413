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
