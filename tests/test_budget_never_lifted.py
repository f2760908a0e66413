"""A budget is never lifted by an edit: last known good per resource, and fail closed.

On the emulator with the examples applied, each typo applied over a good version
leaves the good budget and route in the ConfigMap, with the condition saying why;
the last good version survives an operator restart. A budget that never compiled
makes its routes answer 503 `budget_unavailable` through a real sidecar.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetoll_operator.compiler import compile_namespace
from support.harness import base_config
from support.kopf_env import Kubectl, condition, eventually, stop_operator

ROOT = Path(__file__).resolve().parent.parent


def example_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def example(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in example_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


async def router_config(kubectl: Kubectl) -> dict[str, Any]:
    cm = await kubectl.get("ConfigMap", "kubetoll-router")
    assert cm is not None
    return json.loads(cm["data"]["router.json"])


async def apply_examples_and_wait(kubectl: Kubectl) -> dict[str, Any]:
    for doc in example_docs():
        await kubectl.apply(doc)

    async def compiled() -> dict[str, Any]:
        config = await router_config(kubectl)
        assert [b["name"] for b in config["budgets"]] == ["chat-budget"]
        assert [r["name"] for r in config["routes"]] == ["chat"]
        # Applied last: until it is compiled in, the route is compiled without its cache policy,
        # and the "good" version a test keeps would not be the one the examples describe.
        assert [p["name"] for p in config.get("cachePolicies") or ()] == ["faq-cache"]
        assert config["routes"][0].get("cachePolicy") == "faq-cache"
        return config

    return await eventually(compiled)


async def test_typos_over_a_good_version_keep_it_in_force(kubectl: Kubectl, start_operator: Any) -> None:
    memo = await start_operator()
    good = await apply_examples_and_wait(kubectl)
    good_budget = good["budgets"][0]
    good_route = good["routes"][0]
    assert good_budget["timezone"] == "Europe/Berlin"

    # 1. A timezone typo in the TokenBudget.
    await kubectl.patch("TokenBudget", "chat-budget", {"spec": {"timezone": "Europe/Berln"}})

    async def budget_kept() -> None:
        t = await kubectl.get("TokenBudget", "chat-budget")
        ready = condition(t, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "InvalidUpdate", ready
        assert "spec.timezone" in ready["message"] and "Europe/Berln" in ready["message"]
        config = await router_config(kubectl)
        assert config["budgets"] == [good_budget]
        assert "unavailableBudgets" not in config

    await eventually(budget_kept)

    async def warning_event() -> None:
        events = [e for e in await kubectl.list("Event") if e["involvedObject"]["name"] == "chat-budget"]
        assert any(e["type"] == "Warning" and "timezone" in e["message"] for e in events), events

    await eventually(warning_event)

    # 2. A regex typo in the ModelRoute: the route (and so the budget on it) stays.
    rules = copy.deepcopy(example("ModelRoute", "chat")["spec"]["rules"])
    rules[2]["match"]["header"]["regex"] = "^(platform|data$"
    await kubectl.patch("ModelRoute", "chat", {"spec": {"rules": rules}})

    async def route_kept() -> None:
        r = await kubectl.get("ModelRoute", "chat")
        ready = condition(r, "Ready")
        assert ready["reason"] == "InvalidUpdate" and "spec.rules[2].match.header.regex" in ready["message"], ready
        config = await router_config(kubectl)
        assert config["routes"] == [good_route] and config["budgets"] == [good_budget]

    await eventually(route_kept)

    # 3. A header name that is not a token in a ModelBackend, and a model the catalogue lacks.
    await kubectl.patch("ModelBackend", "gpt-4o", {"spec": {"headers": {"bad header": "x"}}})
    await kubectl.patch("ModelBackend", "gpt-4o-mini", {"spec": {"model": "no-such-model-anywhere"}})

    async def backends_kept() -> None:
        for name in ("gpt-4o", "gpt-4o-mini"):
            b = await kubectl.get("ModelBackend", name)
            assert condition(b, "Ready")["reason"] == "InvalidUpdate", (name, condition(b, "Ready"))
        config = await router_config(kubectl)
        by_name = {b["name"]: b for b in config["backends"]}
        assert by_name["gpt-4o-mini"]["model"] == "gpt-4o-mini" and "bad header" not in by_name["gpt-4o"]["headers"]
        assert config["routes"] == [good_route] and config["budgets"] == [good_budget]

    await eventually(backends_kept)

    # 4. The last good versions survive an operator restart.
    await stop_operator(memo)
    await start_operator()
    await kubectl.patch("CachePolicy", "faq-cache", {"spec": {"exact": {"ttlSeconds": 1234}}})

    async def still_kept_after_restart() -> None:
        config = await router_config(kubectl)
        assert config["cachePolicies"][0]["exact"]["ttlSeconds"] == 1234  # the restarted operator compiled
        assert config["budgets"] == [good_budget] and config["routes"] == [good_route]

    await eventually(still_kept_after_restart)

    # 5. Fixing the typo puts the new version in force and Ready back to True.
    await kubectl.patch("TokenBudget", "chat-budget", {"spec": {"timezone": "Europe/Paris"}})

    async def fixed() -> None:
        config = await router_config(kubectl)
        assert config["budgets"][0]["timezone"] == "Europe/Paris"
        t = await kubectl.get("TokenBudget", "chat-budget")
        assert condition(t, "Ready")["status"] == "True"

    await eventually(fixed)


async def test_deleting_backends_loses_only_the_rules_that_used_them(kubectl: Kubectl, start_operator: Any) -> None:
    await start_operator()
    await apply_examples_and_wait(kubectl)
    # claude-sonnet and gpt-4o are the whole chain of the long-context rule.
    await kubectl.delete("ModelBackend", "claude-sonnet")
    await kubectl.delete("ModelBackend", "gpt-4o")

    async def rule_skipped() -> None:
        config = await router_config(kubectl)
        (chat,) = config["routes"]
        assert [r["name"] for r in chat["rules"]] == ["premium", "internal", "default"]
        assert [b["name"] for b in config["budgets"]] == ["chat-budget"]

    await eventually(rule_skipped)


async def test_a_first_apply_of_a_bad_budget_fails_closed(kubectl: Kubectl, start_operator: Any) -> None:
    await start_operator()
    budget = copy.deepcopy(example("TokenBudget", "chat-budget"))
    budget["spec"]["timezone"] = "Europe/Berln"
    for doc in example_docs():
        await kubectl.apply(budget if doc["kind"] == "TokenBudget" else doc)

    async def unavailable() -> dict[str, Any]:
        config = await router_config(kubectl)
        assert config["budgets"] == []
        (entry,) = config["unavailableBudgets"]
        assert entry["name"] == "chat-budget" and entry["routes"] == ["chat"] and entry["reason"] == "InvalidSpec"
        assert "spec.timezone" in entry["message"]
        return config

    await eventually(unavailable)


@pytest.fixture
def bad_budget_config() -> dict[str, Any]:
    docs = example_docs()
    for d in docs:
        if d["kind"] == "TokenBudget":
            d["spec"]["timezone"] = "Europe/Berln"
    result = compile_namespace("default", docs, credential_mode="env")
    assert result.config is not None and not result.ok
    return json.loads(result.config_json)


async def test_the_route_of_an_unavailable_budget_answers_503(
    sim: Any, start_sidecar: Any, bad_budget_config: dict[str, Any]
) -> None:
    import aiohttp
    import openai

    # The compiled config's unavailable budget, on a route served by the simulator.
    config = base_config(sim.url)
    config["unavailableBudgets"] = bad_budget_config["unavailableBudgets"]
    sidecar = await start_sidecar(config)
    with pytest.raises(openai.APIStatusError) as caught:
        await sidecar.openai().chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "budget_unavailable"
    assert "chat-budget" in error["message"] and "spec.timezone" in error["message"]
    assert sim.requests == []  # nothing reached the upstream
    async with aiohttp.ClientSession() as http, http.get(sidecar.ops_url + "/metrics") as resp:
        assert 'reason="budget_unavailable"' in await resp.text()


def test_kubetoll_compile_of_a_budget_typo_fails_closed_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetoll_tools.cli import main

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        text = path.read_text()
        (tmp_path / path.name).write_text(text.replace("timezone: Europe/Berlin", "timezone: Europe/Berln"))
    assert main(["compile", "--namespace", "team-a", "--canonical", "-f", str(tmp_path)]) == 1
    out = capsys.readouterr()
    config = json.loads(out.out)
    (chat,) = config["routes"]
    assert config["budgets"] == [] and config["unavailableBudgets"][0]["routes"] == [chat["name"]]
    assert "spec.timezone" in out.err
    assert main(["validate", "-f", str(tmp_path)]) == 1
