"""Spend summaries over ledger records: totals, groups, top spenders, savings.

`kubetoll report` (records from a sidecar or the shared ledger) and the demo's
HTML report both summarise with these functions, so the two never disagree on
what a number means.

Savings are measured against a baseline: every record's tokens priced at one
backend's prices (the flagship), with no cache and no routing. The difference
between that and what was spent is split per record, so the parts add up to the
whole exactly:

* cache: a record answered from cache saved its `avoided_usd` (what the
  backend it would have gone to charges);
* downgrade: a record served by a route's downgrade backends saved
  baseline − actual;
* routing: every other record saved baseline − actual (negative when a
  fallback went to a dearer backend than the baseline); for a cache hit,
  baseline − avoided (routing's share of what the hit would have cost).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from kubetoll_core.prices import ResolvedPrice
from kubetoll_core.spend_record import NOT_REQUEST_OUTCOMES, OUTCOME_REPORTED, SpendRecord

CACHE_BACKEND = "(cache)"  # the group key of records no backend served
# The group key of records that name no workload: written by a sidecar that was not injected
# (`kubetoll run`, the demo) or by one older than the field.
UNKNOWN_WORKLOAD = "(unknown)"
_RECORD_FIELDS = {f.name for f in fields(SpendRecord)}


def fmt_usd(v: float) -> str:
    a = abs(v)
    if a < 5e-10:
        return "$0"
    if a >= 100:
        return f"${v:,.2f}"
    if a >= 1:
        return f"${v:.3f}"
    if a >= 0.01:
        return f"${v:.4f}"
    return f"${v:.6f}"


def to_record(item: SpendRecord | Mapping[str, Any]) -> SpendRecord:
    """A SpendRecord from a record or its JSON form (fields a newer sidecar adds are ignored)."""
    if isinstance(item, SpendRecord):
        return item
    return SpendRecord(**{k: v for k, v in item.items() if k in _RECORD_FIELDS})


@dataclass
class Group:
    key: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    cache_hits: int = 0
    avoided_usd: float = 0.0
    downgraded: int = 0
    downgraded_cost_usd: float = 0.0
    fallbacks: int = 0

    def add(self, r: SpendRecord) -> None:
        if r.outcome not in NOT_REQUEST_OUTCOMES:  # a lookup's embedding call, an outcome record: not requests
            self.requests += 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self.cached_tokens += r.cached_tokens
        self.cost_usd += r.cost_usd
        if r.cache_hit:
            self.cache_hits += 1
            self.avoided_usd += r.avoided_usd
        if r.downgraded:
            self.downgraded += 1
            self.downgraded_cost_usd += r.cost_usd
        self.fallbacks += r.fallbacks

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "cost_usd": self.cost_usd,
            "cost_per_request_usd": self.cost_usd / self.requests if self.requests else 0.0,
            "cache_hits": self.cache_hits,
            "avoided_usd": self.avoided_usd,
            "downgraded": self.downgraded,
            "downgraded_cost_usd": self.downgraded_cost_usd,
            "fallbacks": self.fallbacks,
        }


def group_by(records: Iterable[SpendRecord], key: str) -> list[Group]:
    """Groups by a record field, dearest first (ties by key, so output is stable)."""
    groups: dict[str, Group] = {}
    for r in records:
        k = getattr(r, key) or ""
        if key == "backend" and not k:
            k = CACHE_BACKEND
        elif key == "workload" and not k:
            k = UNKNOWN_WORKLOAD
        g = groups.get(k)
        if g is None:
            g = groups[k] = Group(k)
        g.add(r)
    return sorted(groups.values(), key=lambda g: (-g.cost_usd, g.key))


def group_by_tag(records: Iterable[SpendRecord], key: str, missing: str = "(untagged)") -> list[Group]:
    """Groups by one tag key's value (`missing` for records without it), dearest first."""
    groups: dict[str, Group] = {}
    for r in records:
        k = r.tag_map.get(key, missing)
        g = groups.get(k)
        if g is None:
            g = groups[k] = Group(k)
        g.add(r)
    return sorted(groups.values(), key=lambda g: (-g.cost_usd, g.key))


def session_costs(records: Iterable[SpendRecord]) -> dict[str, float]:
    """Spend per session id, over the records that carried one."""
    cost: dict[str, float] = defaultdict(float)
    for r in records:
        if r.session:
            cost[r.session] += r.cost_usd
    return cost


def outcome_costs(records: Iterable[SpendRecord]) -> list[dict[str, Any]]:
    """Per business outcome the app reported: how many, the spend of the conversations that reported it
    (a session's records; a request's own when the outcome named a request), and that spend per outcome."""
    recs = list(records)
    by_session = session_costs(recs)
    by_request: dict[str, float] = defaultdict(float)
    for r in recs:
        if r.request_id:
            by_request[r.request_id] += r.cost_usd
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, set[str]] = defaultdict(set)
    for r in recs:
        if r.outcome != OUTCOME_REPORTED or not r.business_outcome:
            continue
        o = out.setdefault(r.business_outcome, {"outcome": r.business_outcome, "count": 0, "spend_usd": 0.0})
        o["count"] += 1
        unit = f"s:{r.session}" if r.session else f"r:{r.request_id}"
        if unit not in seen[r.business_outcome]:  # a conversation's spend counts once per outcome name
            seen[r.business_outcome].add(unit)
            o["spend_usd"] += by_session.get(r.session, 0.0) if r.session else by_request.get(r.request_id, 0.0)
    for o in out.values():
        o["cost_per_outcome_usd"] = o["spend_usd"] / o["count"]
    return sorted(out.values(), key=lambda o: (-o["count"], o["outcome"]))


def totals(records: Iterable[SpendRecord]) -> Group:
    g = Group("total")
    for r in records:
        g.add(r)
    return g


def baseline_cost(r: SpendRecord, price: ResolvedPrice) -> float:
    """What the record's tokens cost at the baseline's list prices, no provider cache discount."""
    return price.estimate(r.prompt_tokens, r.completion_tokens)


@dataclass
class Savings:
    baseline_label: str
    baseline_usd: float = 0.0
    actual_usd: float = 0.0
    cache_usd: float = 0.0
    routing_usd: float = 0.0
    downgrade_usd: float = 0.0

    @property
    def saved_usd(self) -> float:
        return self.baseline_usd - self.actual_usd

    @property
    def saved_percent(self) -> float:
        return 100.0 * self.saved_usd / self.baseline_usd if self.baseline_usd > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline_label,
            "baseline_usd": self.baseline_usd,
            "actual_usd": self.actual_usd,
            "saved_usd": self.saved_usd,
            "saved_percent": self.saved_percent,
            "cache_usd": self.cache_usd,
            "routing_usd": self.routing_usd,
            "downgrade_usd": self.downgrade_usd,
        }


def savings(records: Iterable[SpendRecord], price: ResolvedPrice, label: str) -> Savings:
    s = Savings(label)
    for r in records:
        base = baseline_cost(r, price)
        s.baseline_usd += base
        s.actual_usd += r.cost_usd
        rest = base - r.cost_usd
        if r.cache_hit:
            s.cache_usd += r.avoided_usd
            rest -= r.avoided_usd
        if r.downgraded:
            s.downgrade_usd += rest
        else:
            s.routing_usd += rest
    return s


def summarize(
    records: Iterable[SpendRecord | Mapping[str, Any]],
    *,
    baseline: ResolvedPrice | None = None,
    baseline_label: str = "",
    top: int = 10,
) -> dict[str, Any]:
    """Everything `kubetoll report` prints, as plain data (floats unrounded)."""
    recs = [to_record(r) for r in records]
    t = totals(recs)
    by_tenant = group_by(recs, "tenant")
    out: dict[str, Any] = {
        "records": len(recs),
        "first_record": min((r.time for r in recs), default=None),
        "last_record": max((r.time for r in recs), default=None),
        "totals": t.as_dict(),
        "by_tenant": [g.as_dict() for g in by_tenant],
        "by_route": [g.as_dict() for g in group_by(recs, "route")],
        "by_backend": [g.as_dict() for g in group_by(recs, "backend")],
        "by_tier": [g.as_dict() for g in group_by(recs, "tier")],
        "by_workload": [g.as_dict() for g in group_by(recs, "workload")],
        "top_spenders": [g.as_dict() for g in by_tenant[:top]],
        "savings": savings(recs, baseline, baseline_label).as_dict() if baseline is not None else None,
    }
    tiers: dict[str, set[str]] = defaultdict(set)
    for r in recs:
        tiers[r.tenant].add(r.tier)
    for row in out["by_tenant"] + out["top_spenders"]:
        row["tiers"] = sorted(tiers[row["key"]])
    return out
