"""Tier assignments and workload selectors through compile_namespace: merge, conflicts, ConfigMaps, bounds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetoll_core.enums import TierHeaderPolicy
from kubetoll_core.parts import MAX_TENANT_TIERS
from kubetoll_core.router_config import RouterConfig
from kubetoll_operator.compiler import check_resource, compile_namespace
from kubetoll_operator.status import desired_status
from kubetoll_operator.tenant_tiers import TenantTiersError, parse_tenant_tiers
from test_operator_compiler import by_reason, obj

BACKEND = obj(
    "ModelBackend",
    "b",
    {
        "provider": "openai-compatible",
        "model": "m",
        "endpoint": "http://llm:8000/v1",
        "pricing": {"inputPerMTok": 1, "outputPerMTok": 2},
    },
)
ROUTE = obj("ModelRoute", "chat", {"rules": [{"backends": ["b"]}]})
TIERS = [{"name": "free", "requestsPerMinute": 5}, {"name": "premium", "requestsPerMinute": 600}]


def budget(name: str, **spec: Any) -> dict[str, Any]:
    return obj("TokenBudget", name, {"tiers": TIERS, **spec})


def config_map(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def condition(result: Any, name: str, type_: str = "TenantTiersAccepted") -> dict[str, Any]:
    status = desired_status(result, result.outcomes[("TokenBudget", name)])
    return next(c for c in status["conditions"] if c["type"] == type_)


# --------------------------------------------------------------------------- merge


def test_every_budgets_map_is_merged_into_the_tenancy_and_capped_becomes_the_default() -> None:
    a = budget("a", tenantTiers={"acme": "premium", "globex": "premium"})
    z = budget("z", tenantTiersFrom={"configMapName": "tiers", "key": "tiers.yaml"}, routes=["chat"])
    cm = config_map("tiers", **{"tiers.yaml": "# the long list\ntinyshop: free\n'007': premium\nno: free\n"})
    result = compile_namespace("ns", [BACKEND, ROUTE, a, z, cm])
    assert result.problems == [] and result.ok
    data = json.loads(result.config_json)
    assert data["tenancy"]["tenantTiers"] == {
        "acme": "premium",
        "globex": "premium",
        "tinyshop": "free",
        "007": "premium",  # YAML read as text: not the number 7
        "no": "free",  # ... and not False
    }
    assert data["tenancy"]["tierHeaderPolicy"] == "capped"
    assert result.config.tenancy.effective_tier_header_policy() is TierHeaderPolicy.capped
    for name, source in (("a", "spec.tenantTiers"), ("z", "ConfigMap 'tiers' key 'tiers.yaml'")):
        c = condition(result, name)
        assert c["status"] == "True" and c["reason"] == "Accepted" and source in c["message"], c
    # The budget map leaves the budgets themselves alone.
    assert all("tenantTiers" not in b for b in data["budgets"])


def test_without_a_map_the_config_is_what_it_was() -> None:
    plain = compile_namespace("ns", [BACKEND, ROUTE, budget("a", tenant={"defaultTier": "free"})])
    data = json.loads(plain.config_json)
    # No new key at all: a namespace that assigns no tiers keeps its config and its hash.
    assert set(data["tenancy"]) == {
        "header",
        "useUserField",
        "tierHeader",
        "defaultTier",
        "required",
        "anonymousTenant",
    }
    assert plain.config.tenancy.effective_tier_header_policy() is TierHeaderPolicy.trusted
    assert all(
        c["type"] != "TenantTiersAccepted"
        for c in desired_status(plain, plain.outcomes[("TokenBudget", "a")])["conditions"]
    )


def test_an_explicit_policy_and_order_are_kept() -> None:
    a = budget(
        "a",
        tenant={"tierHeaderPolicy": "ignored", "tierOrder": ["free", "premium"]},
        tenantTiers={"acme": "premium"},
    )
    data = json.loads(compile_namespace("ns", [BACKEND, ROUTE, a]).config_json)
    assert data["tenancy"]["tierHeaderPolicy"] == "ignored" and data["tenancy"]["tierOrder"] == ["free", "premium"]
    trusted = budget("a", tenant={"tierHeaderPolicy": "trusted"}, tenantTiers={"acme": "premium"})
    assert json.loads(compile_namespace("ns", [BACKEND, ROUTE, trusted]).config_json)["tenancy"][
        "tierHeaderPolicy"
    ] == ("trusted")


# --------------------------------------------------------------------------- conflicts


def test_a_tenant_two_budgets_assign_differently_is_a_conflict_on_the_later_one() -> None:
    a = budget("a", tenantTiers={"acme": "premium", "globex": "free"})
    b = budget("b", tenantTiers={"acme": "free", "globex": "free", "initech": "free"})
    result = compile_namespace("ns", [BACKEND, ROUTE, b, a])
    (p,) = by_reason(result)["TenantTierConflict"]
    assert p.name == "b" and p.severity == "warning" and "'acme'" in p.message and "TokenBudget 'a'" in p.message
    assert "globex" not in p.message  # the same tier twice is no conflict
    # No order: the first budget's by name; both budgets stay in force with their limits.
    assert result.config.tenancy.tenant_tiers == {"acme": "premium", "globex": "free", "initech": "free"}
    assert [x.name for x in result.config.budgets] == ["a", "b"]
    c = condition(result, "b")
    assert c["status"] == "False" and c["reason"] == "TenantTierConflict" and "acme" in c["message"]
    assert condition(result, "a")["status"] == "True"


def test_with_a_tier_order_a_conflict_resolves_to_the_lower_tier() -> None:
    order = {"tierOrder": ["free", "premium"]}
    a = budget("a", tenant=order, tenantTiers={"acme": "premium"})
    b = budget("b", tenant=order, tenantTiers={"acme": "free"})
    result = compile_namespace("ns", [BACKEND, ROUTE, a, b])
    (p,) = by_reason(result)["TenantTierConflict"]
    assert p.name == "b" and "'free' is used" in p.message
    assert result.config.tenancy.tenant_tiers == {"acme": "free"}


def test_a_tier_no_budget_defines_is_a_warning() -> None:
    a = budget("a", tenantTiers={"acme": "gold", "globex": "free"})
    result = compile_namespace("ns", [BACKEND, ROUTE, a])
    (p,) = by_reason(result)["TierNotDefined"]
    assert p.severity == "warning" and "'gold'" in p.message and "defaultTier" in p.message
    assert result.config.tenancy.tenant_tiers == {"acme": "gold", "globex": "free"}


# --------------------------------------------------------------------------- ConfigMaps


@pytest.mark.parametrize(
    ("objects", "reason", "field"),
    [
        ([], "ConfigMapNotFound", "spec.tenantTiersFrom.configMapName"),
        ([config_map("tiers", other="acme: premium")], "ConfigMapKeyNotFound", "spec.tenantTiersFrom.key"),
        ([config_map("tiers", t="acme: [premium]")], "InvalidTenantTiers", "spec.tenantTiersFrom.key"),
        ([config_map("tiers", t="acme: premium\nacme: free\n")], "InvalidTenantTiers", "spec.tenantTiersFrom.key"),
        ([config_map("tiers", t='{"x{y": "premium"}')], "InvalidTenantTiers", "spec.tenantTiersFrom.key"),
    ],
    ids=["missing", "no-key", "not-a-map", "twice", "bad-tenant-id"],
)
def test_a_configmap_that_cannot_be_read_lifts_no_tenant(objects: list[Any], reason: str, field: str) -> None:
    a = budget("a", tenantTiersFrom={"configMapName": "tiers", "key": "t"})
    result = compile_namespace("ns", [BACKEND, ROUTE, a, *objects])
    (p,) = by_reason(result)[reason]
    assert p.severity == "warning" and p.field == field and "none of its tier assignments apply" in p.message
    # The budget stays in force (its limits apply) ...
    assert [b.name for b in result.config.budgets] == ["a"] and result.ok
    # ... nobody is assigned a tier, and the header stays capped: every tenant is on the default tier.
    assert result.config.tenancy.tenant_tiers == {}
    assert result.config.tenancy.effective_tier_header_policy() is TierHeaderPolicy.capped
    c = condition(result, "a")
    assert c["status"] == "False" and c["reason"] == reason and field in c["message"]


def test_the_operator_given_configmaps_win_over_manifests_and_json_is_read() -> None:
    a = budget("a", tenantTiersFrom={"configMapName": "tiers", "key": "t.json"})
    result = compile_namespace(
        "ns",
        [BACKEND, ROUTE, a, config_map("tiers", **{"t.json": '{"stale": "premium"}'})],
        config_maps={"tiers": {"t.json": '{"acme": "premium", "007": "free"}'}},
    )
    assert result.problems == []
    assert result.config.tenancy.tenant_tiers == {"acme": "premium", "007": "free"}


def test_a_changed_configmap_changes_the_config_hash() -> None:
    a = budget("a", tenantTiersFrom={"configMapName": "tiers", "key": "t"})
    one = compile_namespace("ns", [BACKEND, ROUTE, a], config_maps={"tiers": {"t": "acme: free"}})
    two = compile_namespace("ns", [BACKEND, ROUTE, a], config_maps={"tiers": {"t": "acme: premium"}})
    same = compile_namespace("ns", [BACKEND, ROUTE, a], config_maps={"tiers": {"t": "acme: free\n"}})
    assert one.content_hash != two.content_hash and one.content_hash == same.content_hash


def test_check_resource_reports_an_absent_configmap_as_a_warning() -> None:
    a = budget("a", tenantTiersFrom={"configMapName": "tiers", "key": "t"})
    problems = check_resource("ns", a)
    assert [(p.reason, p.severity) for p in problems] == [("ConfigMapNotFound", "warning")]
    assert "not in this check" in problems[0].message


def test_inline_and_from_together_and_bad_inline_entries_are_refused() -> None:
    both = budget("a", tenantTiers={"acme": "free"}, tenantTiersFrom={"configMapName": "tiers", "key": "t"})
    assert any(p.field == "spec.tenantTiersFrom" for p in check_resource("ns", both) if p.severity == "error")
    for tiers in ({"": "free"}, {"x" * 129: "free"}, {"a}b": "free"}, {"tab\there": "free"}, {"acme": "Premium"}):
        problems = [p for p in check_resource("ns", budget("a", tenantTiers=tiers)) if p.severity == "error"]
        assert problems and problems[0].field == "spec.tenantTiers", (tiers, problems)


def test_the_namespace_bound_leaves_out_the_budget_that_passes_it() -> None:
    big = {f"t{i}": "free" for i in range(MAX_TENANT_TIERS)}
    cm = config_map("tiers", t=json.dumps(big))
    a = budget("a", tenantTiersFrom={"configMapName": "tiers", "key": "t"})
    b = budget("b", tenantTiers={"one-more": "premium", "t1": "free"})
    result = compile_namespace("ns", [BACKEND, ROUTE, a, b, cm])
    (p,) = by_reason(result)["InvalidTenantTiers"]
    assert p.name == "b" and str(MAX_TENANT_TIERS) in p.message
    tiers = result.config.tenancy.tenant_tiers
    assert len(tiers) == MAX_TENANT_TIERS and "one-more" not in tiers
    # The RouterConfig itself refuses more, whoever wrote it.
    with pytest.raises(ValueError, match=str(MAX_TENANT_TIERS)):
        RouterConfig.model_validate({"tenancy": {"tenantTiers": {**big, "one-more": "premium"}}})


def test_parse_tenant_tiers() -> None:
    assert parse_tenant_tiers("") == {} and parse_tenant_tiers("# nothing yet\n") == {}
    assert parse_tenant_tiers('{"a": "free"}') == {"a": "free"}
    assert parse_tenant_tiers("a: free\nb: &p premium\nc: *p\n") == {"a": "free", "b": "premium", "c": "premium"}
    for text, says in (
        ("- a\n- b\n", "mapping"),
        ('{"a": 1}', "tier name"),
        ("a: free\na: premium\n", "twice"),
        ('{"a": "free", "a": "free"}', "twice"),
        ("{a: b", "neither a JSON object nor a YAML mapping"),
        ("? [a, b]\n: free\n", "plain text"),
    ):
        with pytest.raises(TenantTiersError, match=says):
            parse_tenant_tiers(text)


# --------------------------------------------------------------------------- workload selectors


def test_a_workload_selector_reaches_the_budget() -> None:
    selector = {
        "matchLabels": {"app.kubernetes.io/name": "search-api"},
        "matchExpressions": [
            {"key": "track", "operator": "NotIn", "values": ["canary"]},
            {"key": "kubetoll.dev/injected", "operator": "Exists"},
        ],
    }
    result = compile_namespace("ns", [BACKEND, ROUTE, budget("a", workloadSelector=selector, cap={"usdPerDay": 50})])
    assert result.problems == []
    (b,) = json.loads(result.config_json)["budgets"]
    assert b["workloadSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "search-api"},
        "matchExpressions": [
            {"key": "track", "operator": "NotIn", "values": ["canary"]},
            {"key": "kubetoll.dev/injected", "operator": "Exists", "values": []},
        ],
    }
    budget_model = result.config.budgets[0]
    selected = {"app.kubernetes.io/name": "search-api", "kubetoll.dev/injected": "true"}
    assert budget_model.applies_to(selected)
    assert not budget_model.applies_to({**selected, "track": "canary"})
    assert not budget_model.applies_to({"app.kubernetes.io/name": "search-api"})
    assert not budget_model.applies_to({})
    # An empty selector selects every pod, so it compiles to none.
    empty = compile_namespace("ns", [BACKEND, ROUTE, budget("a", workloadSelector={})])
    assert "workloadSelector" not in json.loads(empty.config_json)["budgets"][0]


def test_bad_label_keys_and_values_are_refused() -> None:
    for selector in (
        {"matchLabels": {"-app": "x"}},
        {"matchLabels": {"app": "has space"}},
        {"matchLabels": {"a/b/c": "x"}},
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["bad value"]}]},
    ):
        problems = [p for p in check_resource("ns", budget("a", workloadSelector=selector)) if p.severity == "error"]
        assert problems and problems[0].field.startswith("spec.workloadSelector"), (selector, problems)
