"""Hot reload: changed files and kubelet symlink swaps apply within 1 s; broken configs are refused."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from kubetoll_sidecar import tokens
from kubetoll_sidecar.config_loader import ConfigError, load_config
from kubetoll_sidecar.server import Sidecar
from kubetoll_tools.simulator import Fault
from support.harness import base_config, in_cluster_llama, wait_until

ROOT = Path(__file__).resolve().parents[1]


async def models(sc):
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.url + "/v1/models") as r:
            return sorted(m["id"] for m in (await r.json())["data"])


async def readyz(sc):
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.ops_url + "/readyz") as r:
            return r.status, await r.json()


async def test_changed_file_is_applied_without_a_restart(sim, start_sidecar):
    cfg = base_config(sim.url)
    sc = await start_sidecar(cfg)
    assert await models(sc) == ["chat"]
    cfg["routes"].append({"name": "chat-2", "rules": [{"backends": ["primary"]}]})
    sc.write_config(cfg)
    applied = sc.sidecar.metrics.config_reloads.labels("applied")
    await wait_until(lambda: applied._value.get() == 1, timeout=30)  # a hang bound, not a speed claim
    assert await models(sc) == ["chat", "chat-2"]


async def test_a_reload_counts_approximate_models_as_the_new_config_wants(sim, start_sidecar):
    """gpt-4o beside a Llama: the Llama is counted with o200k_base. Without the gpt-4o backend,
    it is counted with cl100k_base again, loaded with the new config, before it applies."""
    cfg = base_config(sim.url)
    cfg["backends"].append(in_cluster_llama(sim.url))
    cfg["routes"].append({"name": "local", "rules": [{"backends": ["gpu"]}]})
    sc = await start_sidecar(cfg)
    assert tokens.approximate_encoding() == tokens.O200K
    cfg["backends"] = [b for b in cfg["backends"] if b["name"] == "gpu"]
    cfg["routes"] = [{"name": "local", "rules": [{"backends": ["gpu"]}]}]
    sc.write_config(cfg)
    applied = sc.sidecar.metrics.config_reloads.labels("applied")
    await wait_until(lambda: applied._value.get() == 1, timeout=30)  # a hang bound, not a speed claim
    assert tokens.approximate_encoding() == tokens.CL100K
    assert tokens.CL100K in tokens.loaded_encodings()
    async with aiohttp.ClientSession() as s:
        body = {"model": "local", "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(sc.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()


async def test_kubelet_style_symlink_swap(sim, start_sidecar, tmp_path):
    # The kubelet's layout: router.json -> ..data/router.json, ..data -> ..<version>/
    def publish(version: str, cfg: dict) -> None:
        d = tmp_path / f"..{version}"
        d.mkdir()
        (d / "router.json").write_text(json.dumps(cfg))
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(d.name)
        os.replace(tmp_link, tmp_path / "..data")  # the atomic swap

    cfg = base_config(sim.url)
    publish("v1", cfg)
    link = tmp_path / "router.json"
    link.symlink_to(Path("..data") / "router.json")
    sidecar = Sidecar(load_config(str(link)), watch_interval=0.1)
    await sidecar.start()
    try:
        assert sidecar.state.router.names() == ["chat"]
        publish("v2", dict(cfg, routes=[{"name": "swapped", "rules": [{"backends": ["primary"]}]}]))
        await wait_until(lambda: sidecar.state.router.names() == ["swapped"], timeout=1.0)
    finally:
        await sidecar.close()


@pytest.mark.parametrize(
    "content",
    [
        "{ this is not json",
        json.dumps({"version": 2}),
        json.dumps({"routes": [{"name": "r", "rules": [{"backends": ["ghost"]}]}]}),
        json.dumps({"backends": [{"name": "x", "provider": "nope", "model": "m", "endpoint": "http://a"}]}),
        json.dumps(
            {"backends": [{"name": "x", "provider": "openai-compatible", "model": "m", "endpoint": "http://a"}]}
        ),  # no price
    ],
)
async def test_broken_config_is_refused_and_the_last_good_one_serves(sim, start_sidecar, content):
    sc = await start_sidecar(base_config(sim.url))
    sc.path.write_text(content)
    await wait_until(lambda: sc.sidecar.refused is not None, timeout=2)
    status, detail = await readyz(sc)
    assert status == 200 and detail["configRefused"]
    assert sc.sidecar.metrics.config_refused._value.get() == 1
    # Still serving the old config.
    r = await sc.openai().chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert r.choices
    # Fixing the file clears the refusal.
    sc.write_config(base_config(sim.url) | {"server": sc.config["server"]})
    await wait_until(lambda: sc.sidecar.refused is None, timeout=2)
    assert sc.sidecar.metrics.config_refused._value.get() == 0


async def test_request_in_flight_finishes_on_the_old_config(sim, sim2, start_sidecar):
    cfg = base_config(sim.url)
    sc = await start_sidecar(cfg)
    sim.enqueue_fault(Fault(kind="slow_first_token", delay=0.8))
    task = asyncio.create_task(
        sc.openai().chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "x"}])
    )
    await asyncio.sleep(0.2)
    new = base_config(sim2.url) | {"server": cfg["server"]}
    sc.write_config(new)
    await wait_until(lambda: sc.sidecar.state.config.backends[0].endpoint == sim2.url + "/v1", timeout=1)
    raw = await task
    assert raw.headers["x-kubetoll-backend"] == "primary"
    assert len(sim.requests) == 1 and not sim2.requests  # the old request used the old endpoint
    await sc.openai().chat.completions.create(model="chat", messages=[{"role": "user", "content": "y"}])
    assert len(sim2.requests) == 1  # a new request uses the new one


def test_load_config_reports_the_field():
    with pytest.raises(ConfigError) as exc:
        from kubetoll_sidecar.config_loader import parse_config

        parse_config(json.dumps({"server": {"port": "eighty"}}).encode(), "x.json")
    assert "server.port" in str(exc.value)


def test_a_config_from_a_newer_operator_says_so(sim):
    from kubetoll_sidecar.config_loader import parse_config

    newer = base_config(sim.url, revision="3f9a1c")
    newer["backends"][0]["catalogPricesV2"] = {"input": 1}  # a field a later operator writes
    with pytest.raises(ConfigError) as exc:
        parse_config(json.dumps(newer).encode(), "router.json")
    assert "backends.0.catalogPricesV2" in str(exc.value)
    assert "newer than this pod's sidecar" in str(exc.value) and "rollout restart" in str(exc.value)
    # A typo in a hand-written config (no revision), or a wrong value, is not version skew.
    typo = base_config(sim.url)
    typo["backends"][0]["modle"] = "gpt-4o"
    wrong = base_config(sim.url, revision="3f9a1c")
    wrong["backends"][0]["catalogPricesV2"] = {}
    wrong["server"]["port"] = "eighty"
    for cfg in (typo, wrong):
        with pytest.raises(ConfigError) as exc:
            parse_config(json.dumps(cfg).encode(), "router.json")
        assert "newer" not in str(exc.value)


def test_sidecar_started_with_an_invalid_config_exits_with_a_clear_message(tmp_path):
    bad = tmp_path / "router.yaml"
    bad.write_text("routes:\n  - name: r\n    rules: [{backends: [missing]}]\n")
    p = subprocess.run(
        [sys.executable, "-m", "kubetoll_tools.cli", "sidecar", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": "sidecar:operator"},
    )
    assert p.returncode == 2
    assert "cannot start" in p.stderr and "unknown backend 'missing'" in p.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "kubetoll_tools.cli", "sidecar", "--config", str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": "sidecar:operator"},
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr
