"""Budget meter names and amounts, as the sidecars write them and the operator reads them back.

A meter is one limited quantity at one level: the namespace cap's USD this
month, a tenant tier's tokens per minute. Its key is "<budget>:<name>"; the name
says the level, the tenant, what is counted and (for calendar windows) the
period id. The sidecar's admission builds names with these functions and the
operator's TokenBudget status parses them with `parse_meter_name`: one layout,
one module.

Amounts are stored as integers in a unit's scale (nano-USD, milli-tokens,
milli-requests): exact sums across sidecars, no float drift.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SCALE = {"usd": 1_000_000_000, "tokens": 1000, "requests": 1000}
DEFAULT_SCALE = 1000


def scale_of(unit: str) -> int:
    return SCALE.get(unit, DEFAULT_SCALE)


def to_units(amount: float, scale: int) -> int:
    return int(round(amount * scale))


def cap_meter_name(unit: str, period_id: str) -> str:
    """The namespace cap's window: "cap:usd:2026-11", "cap:tokens:2026-11-22"."""
    return f"cap:{unit}:{period_id}"


def tier_meter_name(tier: str, tenant: str, what: str) -> str:
    """A tenant's meter in a tier; `what` is "rpm", "tpm" or "usd:<period id>"."""
    return f"tier:{tier}:t:{tenant}:{what}"


def session_meter_name(tier: str, session: str, what: str) -> str:
    """A session's meter in a tier (usdPerSession, tokensPerSession); `what` is "usd:<day>" or "tokens:<day>".

    The session id is the app's to choose: it is hashed, so the name stays short and holds no
    character a key or a name parser must watch for. `parse_meter_name` does not read these
    (the operator's status does not list sessions)."""
    digest = hashlib.blake2b(session.encode(), digest_size=10).hexdigest()
    return f"tier:{tier}:s:{digest}:{what}"


@dataclass(frozen=True, slots=True)
class MeterName:
    level: str  # "cap" or "tier:<name>"
    tier: str  # "" for the cap
    tenant: str  # "" for the cap
    unit: str  # "usd", "tokens" (windows), "tpm", "rpm" (buckets)
    period: str  # the period id of a window, "" for a bucket


def parse_meter_name(name: str) -> MeterName | None:
    """The parts of a meter name built above (None for anything else). Tenant ids may contain ":"."""
    if name.startswith("cap:"):
        unit, _, period = name[4:].partition(":")
        return MeterName("cap", "", "", unit, period) if unit and period and ":" not in period else None
    if not name.startswith("tier:"):
        return None
    tier, _, rest = name[5:].partition(":")
    if not tier or not rest.startswith("t:"):
        return None
    rest = rest[2:]
    if rest.endswith((":rpm", ":tpm")):
        tenant, _, what = rest.rpartition(":")
        return MeterName(f"tier:{tier}", tier, tenant, what, "")
    parts = rest.rsplit(":", 2)
    if len(parts) != 3:
        return None
    tenant, unit, period = parts
    return MeterName(f"tier:{tier}", tier, tenant, unit, period)
