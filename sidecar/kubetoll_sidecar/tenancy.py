"""Pipeline stage 2: who the end user (tenant) is, and their tier.

The app names its end user with a header or the OpenAI `user` field. The tier
is the platform team's when a TokenBudget assigns tenants tiers
(`tenancy.tenantTiers`): under `tierHeaderPolicy` capped (the default then) the
tier header may only choose a tier at or below the tenant's assigned one (by
`tierOrder`; without it only the assigned tier or the default tier), under
ignored it is not read, and only under trusted (the default without a map, as
before) does it name the tier. A tenant the map does not name is assigned the
default tier. A tier the budgets do not define falls back to the default tier.
So with a map a forged header cannot lift a tenant above its assigned tier;
without one it can choose any tier a budget defines. How the tier was decided
goes into the access log (`Identity.tier_source`).
Both are recorded (ledger, access log, metrics), so both must be text: a header
byte that is not UTF-8, or a control character, is a 400 naming where it came from.

With `tenancy.jwt` the tenant comes from a token the platform signed instead
(jwt_identity.py): a request whose token verifies is that token's tenant, and its
tier claim, when it has one, is its tier (still one the budgets define, else the
default tier); a token that does not verify is a 401, never an anonymous request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetoll_core.enums import TierHeaderPolicy
from kubetoll_core.router_config import RouterConfig

from .errors import bad_request
from .header_values import is_text, text_header

if TYPE_CHECKING:  # PyJWT and cryptography load only with tenancy.jwt (state.build_state)
    from .jwt_identity import JwtVerifier

MAX_TENANT_LEN = 128


# How the tier was decided, for the access log: the header's choice, the tenant's assigned tier, the
# default tier, the assigned (or default) tier because the header asked for more than capped allows,
# or a verified token's tier claim.
TIER_FROM_HEADER = "header"
TIER_ASSIGNED = "assigned"
TIER_DEFAULT = "default"
TIER_CAPPED = "capped"
TIER_FROM_TOKEN = "token"


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    tier: str
    tier_source: str = TIER_FROM_HEADER


class TenantResolver:
    def __init__(self, config: RouterConfig, jwt: JwtVerifier | None = None) -> None:
        t = config.tenancy
        self._jwt = jwt  # set when tenancy.jwt is: built by state.build_state with the credentials and clocks
        self._signed_source = f"the token's `{jwt.settings.tenant_claim}` claim" if jwt is not None else ""
        self._header = t.header
        self._tier_header = t.tier_header
        self._use_user = t.use_user_field
        self._default_tier = t.default_tier
        self._required = t.required
        self._anonymous = t.anonymous_tenant
        self._known_tiers = frozenset(name for b in config.budgets for name in b.tiers)
        self._tier_policy = t.effective_tier_header_policy()
        self._assigned: Mapping[str, str] = t.tenant_tiers or {}
        self._tier_rank = {name: i for i, name in enumerate(t.tier_order or ())}

    def identify(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> Identity:
        signed = self._jwt.verify(headers) if self._jwt is not None else None  # 401 / 503 when it must
        tenant: str | None
        param: str | None
        if signed is not None:
            tenant, source, param = signed.tenant, self._signed_source, None
        else:
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
        tier, tier_source = self.resolve_tier(tenant, text_header(headers, self._tier_header))
        if signed is not None and signed.tier is not None:
            # Signed by the platform, so it outranks the header; it still has to be a tier the budgets define.
            known = signed.tier in self._known_tiers
            tier, tier_source = (signed.tier, TIER_FROM_TOKEN) if known else (self._default_tier, TIER_DEFAULT)
        return Identity(tenant, tier, tier_source)

    def resolve_tier(self, tenant: str, requested: str | None) -> tuple[str, str]:
        """The tier a request of `tenant` counts under, given the tier it asks for (None: none), and why.

        The assigned tier (the map's, else the default tier) is the ceiling under capped
        and the answer under ignored; trusted takes what is asked, as before the map.
        """
        assigned = self._assigned.get(tenant)
        base, base_source = (assigned, TIER_ASSIGNED) if assigned is not None else (self._default_tier, TIER_DEFAULT)
        policy = self._tier_policy
        if not requested or requested == base or policy is TierHeaderPolicy.ignored:
            tier, source = base, base_source
        elif policy is TierHeaderPolicy.trusted:
            tier, source = requested, TIER_FROM_HEADER
        elif requested in self._known_tiers and self._at_or_below(requested, base):
            # Only a tier some budget defines: an undefined one counts as the default tier,
            # whose limits may be looser (or none) than the assigned tier's.
            tier, source = requested, TIER_FROM_HEADER
        else:
            tier, source = base, TIER_CAPPED
        if tier not in self._known_tiers:
            tier, source = self._default_tier, TIER_DEFAULT
        return tier, source

    def _at_or_below(self, requested: str, ceiling: str) -> bool:
        low, high = self._tier_rank.get(requested), self._tier_rank.get(ceiling)
        if low is not None and high is not None:
            return low <= high
        # No order that names both: the only tier the header may choose besides the assigned one.
        return requested == self._default_tier
