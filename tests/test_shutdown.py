"""SIGTERM: stop accepting, finish requests in flight, settle their spend, exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp

from kubetoll_tools.simulator import Fault
from support.harness import base_config

ROOT = Path(__file__).resolve().parents[1]


async def until_status(s: aiohttp.ClientSession, url: str, status: int = 200, tries: int = 200) -> None:
    """GET `url` until it answers `status` (the process under test is starting)."""
    for _ in range(tries):
        try:
            async with s.get(url) as r:
                if r.status == status:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered {status}")


async def test_sigterm_drains_in_flight_requests_and_exits_zero(sim, tmp_path):
    cfg = base_config(sim.url)
    path = tmp_path / "router.json"
    path.write_text(json.dumps(cfg))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kubetoll_tools.cli",
        "sidecar",
        "--config",
        str(path),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": "sidecar:operator"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{cfg['server']['port']}"
    try:
        async with aiohttp.ClientSession() as s:
            await until_status(s, url + "/v1/models")
            sim.enqueue_fault(Fault(kind="slow_first_token", delay=1.0))
            body = {"model": "chat", "messages": [{"role": "user", "content": "slow one"}]}
            in_flight = asyncio.create_task(s.post(url + "/v1/chat/completions", json=body))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            resp = await in_flight
            assert resp.status == 200, await resp.text()
            assert float(resp.headers["x-kubetoll-cost-usd"]) > 0
            await resp.read()
        rc = await asyncio.wait_for(proc.wait(), 15)
        assert rc == 0
        err = (await proc.stderr.read()).decode()
        assert "draining" in err and "stopped" in err
        # The drained request was settled and logged before exit, and no key leaked into the log.
        lines = err.splitlines()
        at = next(i for i, x in enumerate(lines) if "kubetoll.access" in x)
        record = json.loads(lines[at].split("kubetoll.access ", 1)[1])
        assert record["outcome"] == "ok" and record["cost_usd"] > 0
        # Access lines are batched; they still come out in order with the other lines, before the last.
        assert at < next(i for i, x in enumerate(lines) if "stopped" in x)
        assert "sk-test-openai-key-123" not in err and "slow one" not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_wait_for_config_serves_503_until_the_file_appears_then_starts(sim, tmp_path):
    """A pod created before the operator compiled its namespace: no crash loop."""
    cfg = base_config(sim.url)
    path = tmp_path / "router" / "router.json"
    api, ops = cfg["server"]["port"], cfg["server"]["metricsPort"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kubetoll_tools.cli",
        "sidecar",
        "--config",
        str(path),
        "--wait-for-config",
        "--port",
        str(api),
        "--metrics-port",
        str(ops),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": "sidecar:operator"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as s:
            await until_status(s, f"http://127.0.0.1:{ops}/healthz")
            async with s.get(f"http://127.0.0.1:{ops}/readyz") as r:
                assert r.status == 503 and (await r.json())["waitingForConfig"] == str(path)
            async with s.post(f"http://127.0.0.1:{api}/v1/chat/completions", json=body) as r:
                assert r.status == 503 and r.headers["retry-after"]
                assert (await r.json())["error"]["code"] == "config_pending"
            # The kubelet writes the ConfigMap: the sidecar starts on it.
            path.parent.mkdir()
            path.write_text(json.dumps(cfg))
            await until_status(s, f"http://127.0.0.1:{ops}/readyz")
            async with s.post(f"http://127.0.0.1:{api}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_without_wait_for_config_a_missing_file_exits_2(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kubetoll_tools.cli",
        "sidecar",
        "--config",
        str(tmp_path / "missing.json"),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": "sidecar:operator"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert await asyncio.wait_for(proc.wait(), 15) == 2
    assert "cannot start" in (await proc.stderr.read()).decode()
