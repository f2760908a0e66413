"""A careless operator's config: bad regexes, secrets in a YAML typo, a watcher that must not die.

Against a running sidecar: a regex that does not compile is a validation error
(at start and on reload) and the watcher keeps applying later changes; a YAML
syntax error never echoes the offending line; a backtracking pattern cannot
stall the event loop, because user regexes run on RE2; a namespace of
thousands of routes and budgets builds in linear time.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kubetoll_core.router_config import RouterConfig
from kubetoll_core.user_regex import UserRegexError, compile_user_regex
from kubetoll_sidecar.budgets.admission import BudgetMeters
from kubetoll_sidecar.server import Sidecar
from support.harness import base_config, wait_until

SECRET = "sk-live-THIS-MUST-NEVER-BE-ECHOED"


async def models(sc: Any) -> list[str]:
    async with aiohttp.ClientSession() as s, s.get(sc.url + "/v1/models") as r:
        return sorted(m["id"] for m in (await r.json())["data"])


async def readyz(sc: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(sc.ops_url + "/readyz") as r:
        return await r.json()


def with_rule_regex(cfg: dict[str, Any], regex: str) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg))
    cfg["routes"][0]["rules"] = [{"match": {"regex": regex}, "backends": ["primary"]}, {"backends": ["primary"]}]
    return cfg


@pytest.mark.parametrize(
    "where",
    [
        lambda cfg, rx: with_rule_regex(cfg, rx),
        lambda cfg, rx: {
            **cfg,
            "routes": [
                {
                    "name": "chat",
                    "rules": [{"match": {"header": {"name": "x-team", "regex": rx}}, "backends": ["primary"]}],
                }
            ],
        },
    ],
    ids=["rule-regex", "header-regex"],
)
async def test_a_bad_regex_on_reload_is_refused_and_the_watcher_lives_on(
    sim: Any, start_sidecar: Any, where: Any
) -> None:
    cfg = base_config(sim.url)
    sc = await start_sidecar(cfg)
    sc.write_config(where(cfg, "^(platform|data$"))
    await wait_until(lambda: sc.sidecar.refused is not None)
    ready = await readyz(sc)
    assert "regular expression" in json.dumps(ready) and "missing )" in json.dumps(ready)
    assert await models(sc) == ["chat"]
    # Every later change still applies.
    cfg["routes"].append({"name": "chat-2", "rules": [{"backends": ["primary"]}]})
    sc.write_config(cfg)
    await wait_until(lambda: sc.sidecar.refused is None)
    assert await models(sc) == ["chat", "chat-2"]


async def test_the_watcher_outlives_an_unexpected_error(
    sim: Any, start_sidecar: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = base_config(sim.url)
    sc = await start_sidecar(cfg)
    calls = {"n": 0}
    real_build = Sidecar._build

    def flaky_build(self: Sidecar, loaded: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug while building")
        return real_build(self, loaded)

    monkeypatch.setattr(Sidecar, "_build", flaky_build)
    cfg["routes"].append({"name": "chat-2", "rules": [{"backends": ["primary"]}]})
    sc.write_config(cfg)
    await wait_until(lambda: sc.sidecar.refused is not None)
    assert "could not be built" in sc.sidecar.refused
    cfg["routes"].append({"name": "chat-3", "rules": [{"backends": ["primary"]}]})
    sc.write_config(cfg)
    await wait_until(lambda: sc.sidecar.refused is None)
    assert await models(sc) == ["chat", "chat-2", "chat-3"]


async def test_a_yaml_typo_never_echoes_the_offending_line(
    sim: Any, start_sidecar: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = base_config(sim.url)
    sc = await start_sidecar(cfg)
    # The sidecar reads JSON, and YAML from the same file when it is not JSON.
    tmp = sc.path.with_suffix(".tmp")
    tmp.write_text(f'version: 1\nbackends:\n  - name: x\n    headers: {{x-key: "{SECRET}"\n')
    tmp.replace(sc.path)
    await wait_until(lambda: sc.sidecar.refused is not None)
    ready = json.dumps(await readyz(sc))
    assert "line" in ready and SECRET not in ready
    assert SECRET not in caplog.text and SECRET not in sc.sidecar.refused


async def test_a_backtracking_pattern_cannot_stall_the_sidecar(sim: Any, start_sidecar: Any) -> None:
    # On a backtracking engine this pattern against 40 a's and a b takes about 2**40 steps: a hang.
    sc = await start_sidecar(with_rule_regex(base_config(sim.url), "^(a+)+$"))
    client = sc.openai()
    answer = await asyncio.wait_for(
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "a" * 40 + "b"}]),
        timeout=20,
    )
    assert answer.choices[0].message.content


def test_re2_syntax_is_what_validation_accepts() -> None:
    assert compile_user_regex("^(platform|data)$").search("data")
    assert compile_user_regex("(?i)^PLATFORM").search("platform-x")
    for bad, why in (("(?=x)", "invalid perl operator"), (r"(a)\1", "invalid escape"), ("^(a", "missing )")):
        with pytest.raises(UserRegexError, match="RE2 syntax") as caught:
            compile_user_regex(bad)
        assert why in str(caught.value)
    with pytest.raises(ValueError, match="RE2 syntax"):
        RouterConfig.model_validate(with_rule_regex(base_config("http://127.0.0.1:1"), "(?<=a)b"))


def test_a_sidecar_started_with_a_bad_regex_exits_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    path.write_text(json.dumps(with_rule_regex(base_config("http://127.0.0.1:1"), "^(a")))
    proc = subprocess.run(
        [sys.executable, "-m", "kubetoll_sidecar.main", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "regular expression" in proc.stderr and "Traceback" not in proc.stderr


def test_budget_meters_build_in_linear_time_for_a_large_namespace() -> None:
    # 20k routes and 2k budgets: the old route x budget scan took ~12 s here (printed, not asserted).
    n = 20_000
    cfg = base_config("http://127.0.0.1:1")
    cfg["routes"] = [{"name": f"r{i}", "rules": [{"backends": ["primary"]}]} for i in range(n)]
    cfg["budgets"] = [{"name": f"b{i}", "routes": [f"r{i}"], "cap": {"usdPerDay": 1}} for i in range(n // 10)]
    cfg["budgets"].append({"name": "all", "cap": {"usdPerDay": 5}})
    config = RouterConfig.model_validate(cfg)
    started = time.process_time()
    meters = BudgetMeters(config)
    elapsed = time.process_time() - started
    assert [b.name for b in meters._budgets_by_route["r10"]] == ["b10", "all"]
    assert [b.name for b in meters._budgets_by_route["r19999"]] == ["all"]
    print(f"BudgetMeters for {n} routes: {elapsed * 1000:.0f} ms CPU")
