"""Statuses from a CompileResult: plain functions, no API calls."""

from __future__ import annotations

import datetime
from typing import Any

from .compiler import REFERENCE_REASONS, CompileResult, Outcome, Problem

# What makes ResolvedRefs False: the compiler's reference reasons, and a reference to
# something that cannot serve the role (an anthropic embedding backend).
REF_REASONS = REFERENCE_REASONS | {"Unsupported"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    c: dict[str, Any] = {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message}
    if generation is not None:
        c["observedGeneration"] = generation
    return c


def _describe(problems: list[Problem]) -> str:
    return "; ".join((f"{p.field}: " if p.field else "") + p.message for p in problems)


def desired_status(result: CompileResult, outcome: Outcome) -> dict[str, Any]:
    """The status one resource should have after this compilation (without lastTransitionTime)."""
    gen = outcome.generation
    problems = result.problems_for(outcome.kind, outcome.name)
    ref_problems = [p for p in problems if p.reason in REF_REASONS]
    if outcome.included and outcome.serving_generation is None and outcome.reason != "InvalidUpdate":
        warn = [p for p in problems if p.severity == "warning"]
        # No config hash here: it would rewrite every status on every change.
        message = "compiled into the namespace's router config"
        if warn:
            message += "; " + _describe(warn)
        ready = _condition("Ready", True, "Compiled", message, gen)
    elif outcome.included:
        # An update that does not compile: the last good version is still in force.
        errors = _describe([p for p in problems if p.severity == "error"])
        ready = _condition("Ready", False, outcome.reason, outcome.message + (f" ({errors})" if errors else ""), gen)
    else:
        ready = _condition(
            "Ready",
            False,
            outcome.reason,
            _describe([p for p in problems if p.severity == "error"]) or outcome.message,
            gen,
        )
    if ref_problems:
        refs = _condition("ResolvedRefs", False, ref_problems[0].reason, _describe(ref_problems), gen)
    else:
        refs = _condition("ResolvedRefs", True, "ResolvedRefs", "every reference resolves", gen)
    conditions = [ready, refs]
    status: dict[str, Any] = {"observedGeneration": gen, "conditions": conditions}
    d = outcome.details
    if outcome.kind == "ModelBackend":
        status["endpoint"] = d.get("endpoint")
        status["prices"] = d.get("prices")
    elif outcome.kind == "ModelRoute":
        status["modelName"] = d.get("modelName")
        status["firstBackend"] = d.get("firstBackend")
        status["backends"] = d.get("backends", [])
    elif outcome.kind == "TokenBudget":
        status["routes"] = d.get("routes", [])
        tenancy = d.get("tenancy")
        if tenancy == "conflict":
            conflict = [p for p in problems if p.reason == "TenancyConflict"]
            conditions.append(_condition("TenancyAccepted", False, "TenancyConflict", _describe(conflict), gen))
        elif tenancy == "accepted":
            conditions.append(
                _condition("TenancyAccepted", True, "TenancyAccepted", "spec.tenant is the namespace's tenancy", gen)
            )
        tiers = d.get("tenantTiers")
        if tiers is not None:  # the budget assigns tenants tiers (tenantTiers or tenantTiersFrom)
            conditions.append(_condition("TenantTiersAccepted", tiers["ok"], tiers["reason"], tiers["message"], gen))
    elif outcome.kind == "CachePolicy":
        status["routes"] = d.get("routes", [])
    return {k: v for k, v in status.items() if v is not None}


def merge_transition_times(desired: dict[str, Any], current: dict[str, Any] | None) -> dict[str, Any]:
    """Keep lastTransitionTime of a condition whose status did not change; stamp the others."""
    old = {c.get("type"): c for c in (current or {}).get("conditions", []) or []}
    now = _now()
    out = dict(desired)
    conds = []
    for c in desired.get("conditions", []):
        prev = old.get(c["type"])
        t = (
            prev.get("lastTransitionTime")
            if prev and prev.get("status") == c["status"] and prev.get("lastTransitionTime")
            else now
        )
        conds.append({**c, "lastTransitionTime": t})
    out["conditions"] = conds
    return out


def status_differs(desired: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """Whether a patch is needed: compares everything but the transition times."""
    if not current:
        return True

    def strip(s: dict[str, Any]) -> dict[str, Any]:
        s = {k: v for k, v in s.items() if k in desired}
        s["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in s.get("conditions", []) or []
        ]
        return s

    return strip(dict(current)) != strip(dict(desired))
