"""Tenant → tier assignments: a TokenBudget's `tenantTiersFrom` ConfigMap key read, and every budget's map merged.

The platform team assigns tenants their tiers (`spec.tenantTiers` inline, or a
ConfigMap key for long lists); the compiler merges every budget's map into the
RouterConfig's `tenancy.tenantTiers`, namespace-wide like `spec.tenant`. Pure
functions, no API calls: the operator fetches the ConfigMaps, `kubetoll
validate/compile/run` find them among the manifests.

A ConfigMap key holds a JSON object or a YAML mapping of `tenant: tier` lines.
YAML is read with every scalar as text (PyYAML's BaseLoader): a tenant id such
as `007` or `no` stays the string it looks like instead of becoming 7 or False.
A tenant named twice in one key is an error (the later line would silently win
otherwise). Whatever is wrong, the key contributes nothing: an assignment that
cannot be read lifts no tenant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
import yaml.nodes

from kubetoll_core.parts import MAX_TENANT_TIERS, tenant_id_problem, tier_name_problem

# A ConfigMap holds at most 1 MiB; a manifest file given to `kubetoll compile` could be bigger,
# and parsing it whole is the cost bounded here.
MAX_TEXT_CHARS = 32 * 1024 * 1024


class TenantTiersError(ValueError):
    """The text is not a tenant → tier map; the message says where and why."""


class _Loader(yaml.BaseLoader):
    """Every scalar as a string, and a key named twice in one mapping refused."""


def _mapping(loader: _Loader, node: yaml.nodes.MappingNode) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.nodes.ScalarNode):
            raise TenantTiersError(f"line {key_node.start_mark.line + 1}: a tenant id must be plain text")
        key = loader.construct_object(key_node)
        if key in out:
            raise TenantTiersError(f"line {key_node.start_mark.line + 1}: tenant {key!r} appears twice")
        out[key] = loader.construct_object(value_node)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise TenantTiersError(f"tenant {key!r} appears twice")
        out[key] = value
    return out


def parse_tenant_tiers(text: str) -> dict[str, str]:
    """The map in a ConfigMap value; TenantTiersError naming the first thing wrong."""
    if len(text) > MAX_TEXT_CHARS:
        raise TenantTiersError(f"{len(text)} characters; at most {MAX_TEXT_CHARS}")
    data: Any
    try:
        data = json.loads(text, object_pairs_hook=_json_pairs)
    except ValueError as exc:
        if isinstance(exc, TenantTiersError):
            raise
        try:
            data = yaml.load(text, Loader=_Loader)  # BaseLoader: strings, lists and dicts only
        except yaml.YAMLError as yexc:
            mark = getattr(yexc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise TenantTiersError(
                f"neither a JSON object nor a YAML mapping{where}: {getattr(yexc, 'problem', None) or yexc}"
            ) from None
    if data is None or data == "":
        return {}  # an empty key (or only comments): no assignments
    if not isinstance(data, dict):
        raise TenantTiersError(f"expected a mapping of tenant: tier, got a {type(data).__name__}")
    if len(data) > MAX_TENANT_TIERS:
        raise TenantTiersError(f"{len(data)} tenants; at most {MAX_TENANT_TIERS}")
    out: dict[str, str] = {}
    for tenant, tier in data.items():
        problem = tenant_id_problem(tenant)
        if problem is None and not isinstance(tier, str):
            problem = f"tenant {tenant!r}: the tier must be a tier name, not a {type(tier).__name__}"
        if problem is None:
            problem = tier_name_problem(tier)
            if problem is not None:
                problem = f"tenant {tenant!r}: {problem}"
        if problem is not None:
            raise TenantTiersError(problem)
        out[tenant] = tier
    return out


def config_maps_among(resources: list[Mapping[str, Any]], namespace: str) -> dict[str, dict[str, str]]:
    """ConfigMap manifests among the objects (`kubetoll validate/compile/run`): name → data."""
    out: dict[str, dict[str, str]] = {}
    for obj in resources:
        if obj.get("apiVersion") != "v1" or obj.get("kind") != "ConfigMap":
            continue
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str) or meta.get("namespace", namespace) != namespace:
            continue
        data = obj.get("data") or {}
        if isinstance(data, Mapping):
            out[name] = {str(k): v for k, v in data.items() if isinstance(v, str)}
    return out


@dataclass(frozen=True)
class Conflict:
    """A tenant two budgets assign different tiers."""

    tenant: str
    tier: str  # this budget's
    other_budget: str
    other_tier: str
    used: str


@dataclass
class Merged:
    tiers: dict[str, str] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # tenant → the budget whose entry is used
    conflicts: dict[str, list[Conflict]] = field(default_factory=dict)  # budget → its conflicting entries
    over_bound: list[str] = field(default_factory=list)  # budgets left out for the namespace-wide bound


def merge_tenant_tiers(maps: Sequence[tuple[str, Mapping[str, str]]], tier_order: list[str] | None) -> Merged:
    """Every budget's map, in budget name order, into one.

    A tenant two budgets assign different tiers gets the lower one when `tier_order`
    names both (the safe side for a product that caps spend), else the first
    budget's; the later budget gets the conflict either way. A budget whose entries
    would take the namespace past MAX_TENANT_TIERS adds none of them.
    """
    rank = {t: i for i, t in enumerate(tier_order or [])}
    out = Merged()
    for budget, tiers in sorted(maps, key=lambda m: m[0]):
        new = sum(1 for t in tiers if t not in out.tiers)
        if len(out.tiers) + new > MAX_TENANT_TIERS:
            out.over_bound.append(budget)
            continue
        for tenant, tier in tiers.items():
            have = out.tiers.get(tenant)
            if have is None:
                out.tiers[tenant], out.owner[tenant] = tier, budget
                continue
            if have == tier:
                continue
            used = have
            if tier in rank and have in rank and rank[tier] < rank[have]:
                used = tier
            out.conflicts.setdefault(budget, []).append(Conflict(tenant, tier, out.owner[tenant], have, used))
            if used != have:
                out.tiers[tenant], out.owner[tenant] = used, budget
    return out
