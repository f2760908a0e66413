"""Pipeline stage 2: who the end user (tenant) is, and their tier.

The app names its end user with a header or the OpenAI `user` field; the tier
comes from a header. A tier the budgets do not define falls back to the default
tier, so a typo or a forged header can never lift a tenant out of its limits.
Both are recorded (ledger, access log, metrics), so both must be text: a header
byte that is not UTF-8, or a control character, is a 400 naming where it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetoll_core.router_config import RouterConfig

from .errors import bad_request
from .header_values import is_text, text_header

MAX_TENANT_LEN = 128


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    tier: str


class TenantResolver:
    def __init__(self, config: RouterConfig) -> None:
        t = config.tenancy
        self._header = t.header
        self._tier_header = t.tier_header
        self._use_user = t.use_user_field
        self._default_tier = t.default_tier
        self._required = t.required
        self._anonymous = t.anonymous_tenant
        self._known_tiers = frozenset(name for b in config.budgets for name in b.tiers)

    def identify(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> Identity:
        tenant = text_header(headers, self._header)
        source, param = f"the {self._header} header", self._header
        if not tenant and self._use_user:
            source, param = "`user`", "user"
            user = body.get("user")
            tenant = user if isinstance(user, str) else None
        if not tenant:
            if self._required:
                raise bad_request(
                    f"this router requires a tenant: set the {self._header} header"
                    + (" or the `user` field" if self._use_user else ""),
                    param="user",
                    code="tenant_required",
                )
            tenant = self._anonymous
        if len(tenant) > MAX_TENANT_LEN or "{" in tenant or "}" in tenant or not is_text(tenant):
            raise bad_request(
                f"tenant id ({source}) must be at most {MAX_TENANT_LEN} characters of text "
                "without braces or control characters",
                param=param,
                code="invalid_tenant",
            )
        tier = text_header(headers, self._tier_header) or self._default_tier
        if tier not in self._known_tiers:
            tier = self._default_tier
        return Identity(tenant, tier)
