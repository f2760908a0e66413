"""SIGTERM drain: the process exits within `server.drainSeconds`, new requests get 503 `draining`, the rest are cut.

Each test runs `kubetoll sidecar` as a process of its own in front of the upstream
simulator, with its budgets in a real redis-server, and sends it SIGTERM: what the
kubelet does. The ledger in Redis, read after the process is gone, shows that the
spend of a cut stream was written before exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kubetoll_core.ledger_stream import read_ledger
from kubetoll_sidecar.drain import CLOSE_RESERVE_MAX_SECONDS, MIN_CLOSE_SECONDS, DrainBudget
from kubetoll_tools.simulator import Fault
from support.harness import SidecarUrls, base_config, wait_until
from support.ports import candidate_port, is_address_in_use

ROOT = Path(__file__).resolve().parents[1]
HANG_MARGIN = 1.5  # seconds past drainSeconds before "it hung" (process exit and a loaded machine), not a speed claim
LOG_TIMEOUT = 30.0  # hang bound for a log line


class SidecarProcess(SidecarUrls):
    """`kubetoll sidecar` in a child process; its stderr read line by line as it is written."""

    def __init__(self, proc: asyncio.subprocess.Process, config: dict[str, Any]) -> None:
        self.proc = proc
        self.config = config
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._ended = False
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            async with self._changed:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._ended = True
            self._changed.notify_all()

    async def wait_for_line(self, needle: str) -> str | None:
        """The first log line holding `needle`; None if the process ended without one."""

        def found() -> str | None:
            return next((line for line in self.lines if needle in line), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self._ended or found() is not None), LOG_TIMEOUT)
            return found()

    async def exit_code(self, timeout: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._reader


@asynccontextmanager
async def sidecar_process(config: dict[str, Any], tmp_path: Path) -> AsyncIterator[SidecarProcess]:
    """Start the sidecar on fresh candidate ports (again on others while its port was taken) and wait until it serves."""
    path = tmp_path / "router.json"
    for _ in range(5):
        config["server"] = {**config["server"], "port": candidate_port(), "metricsPort": candidate_port()}
        path.write_text(json.dumps(config))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "kubetoll_tools.cli", "sidecar", "--config", str(path)),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": "sidecar:operator"},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        sc = SidecarProcess(proc, config)
        try:
            if await sc.wait_for_line("kubetoll sidecar serving") is not None:
                break
            await sc.kill()
            if not is_address_in_use("\n".join(sc.lines)):
                raise AssertionError("the sidecar exited before serving:\n" + "\n".join(sc.lines[-20:]))
        except BaseException:
            await sc.kill()
            raise
    else:
        raise AssertionError("no free ports for the sidecar after 5 attempts")
    try:
        yield sc
    finally:
        await sc.kill()


class KeptAlive:
    """One HTTP/1.1 connection used for several requests (a client pool would hide which connection it took)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> KeptAlive:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, await self.reader.readexactly(int(headers["content-length"]))

    async def closed_by_peer(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), LOG_TIMEOUT) == b""

    def close(self) -> None:
        self.writer.close()


def drain_config(sim_url: str, ns: str, redis_url: str, drain_seconds: float) -> dict[str, Any]:
    cfg = base_config(
        sim_url,
        namespace=ns,
        budgetStore={"url": redis_url, "timeoutMs": 1000},
        budgets=[{"name": "b", "routes": ["chat"], "cap": {"usdPerDay": 50}}],
    )
    cfg["server"]["drainSeconds"] = drain_seconds
    # Upstream timeouts far past the drain: only the drain may end these requests.
    cfg["backends"][0]["timeouts"] = {"connect": 2, "firstToken": 60, "total": 120}
    return cfg


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": content}], **extra}


def paced_stream(sim: Any) -> None:
    """Every stream from `sim` outlasts the drain: ~1000 chunks, 50 ms apart."""
    sim.settings.chunk_interval_ms = 50
    sim.settings.completion_tokens = 4000


async def sent_to_upstream(sim: Any, count: int) -> None:
    await wait_until(lambda: len(sim.requests) >= count, timeout=LOG_TIMEOUT)


async def rest_of_stream(resp: aiohttp.ClientResponse) -> list[bytes]:
    """The stream's remaining SSE data lines, up to the end of the response."""
    lines = []
    async for raw in resp.content:
        if raw.startswith(b"data: "):
            lines.append(raw[len(b"data: ") :].strip())
    return lines


def draining_event(data_lines: list[bytes]) -> dict[str, Any]:
    errors = [json.loads(d)["error"] for d in data_lines if d.startswith(b'{"error"')]
    assert len(errors) == 1, data_lines[-5:]
    return errors[0]


async def test_sigterm_drains_finishes_refuses_and_cuts_within_drain_seconds(sim, redis_url, r, ns, tmp_path):
    drain_seconds = 2.0
    paced_stream(sim)
    cfg = drain_config(sim.url, ns, redis_url, drain_seconds)
    async with sidecar_process(cfg, tmp_path) as sc, aiohttp.ClientSession() as s:
        port = cfg["server"]["port"]
        kept = await KeptAlive.open(port)
        status, headers, _ = await kept.request("GET", "/v1/models")
        assert status == 200 and headers.get("connection") != "close"

        # In flight at SIGTERM: a stream that outlasts the drain (flowing), a request that finishes
        # inside the window, and one whose upstream answers only after the drain deadline.
        stream = await s.post(sc.url + "/v1/chat/completions", json=chat("a long story", stream=True))
        assert stream.status == 200
        assert (await stream.content.readline()).startswith(b"data: ")
        sim.enqueue_fault(Fault(kind="slow_first_token", delay=0.5))
        quick = asyncio.create_task(s.post(sc.url + "/v1/chat/completions", json=chat("quick", max_tokens=16)))
        await sent_to_upstream(sim, 2)
        sim.enqueue_fault(Fault(kind="slow_first_token", delay=30))
        slow = asyncio.create_task(s.post(sc.url + "/v1/chat/completions", json=chat("slow", max_tokens=16)))
        await sent_to_upstream(sim, 3)

        sc.proc.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        started = await sc.wait_for_line("draining")
        assert started is not None and "3 requests in flight" in started

        # A new request on the kept-alive connection: 503 draining, and the connection closes.
        status, headers, body = await kept.request("POST", "/v1/chat/completions", chat("late"))
        assert status == 503 and json.loads(body)["error"]["code"] == "draining", body
        assert headers["connection"] == "close" and int(headers["retry-after"]) >= 1
        assert await kept.closed_by_peer()
        kept.close()
        # On a new connection too; and the pod is unready meanwhile.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
            async with fresh.post(sc.url + "/v1/chat/completions", json=chat("late")) as late:
                assert late.status == 503 and (await late.json())["error"]["code"] == "draining"
                assert late.headers["Connection"] == "close" and late.headers["Retry-After"]
            async with fresh.get(sc.ops_url + "/readyz") as ready:
                assert ready.status == 503 and (await ready.json())["draining"] is True

        # Finished inside the window: a normal answer, and its connection is not kept.
        done = await quick
        assert done.status == 200, await done.text()
        assert float(done.headers["x-kubetoll-cost-usd"]) > 0 and done.headers["Connection"] == "close"
        assert (await done.json())["choices"][0]["message"]["content"]
        # Cut at the deadline with nothing sent yet: 503 draining.
        cut = await slow
        assert cut.status == 503 and (await cut.json())["error"]["code"] == "draining"
        # The stream ends with an error event in OpenAI's streaming shape.
        event = draining_event(await rest_of_stream(stream))
        assert event["code"] == "draining" and event["type"] == "service_unavailable" and event["message"]

        assert await sc.exit_code(timeout=drain_seconds + HANG_MARGIN) == 0
        assert time.monotonic() - sigterm < drain_seconds + HANG_MARGIN
    stopped = next(line for line in sc.lines if "stopped" in line)
    assert "1 requests in flight finished, 2 cut" in stopped and "2 new requests answered 503" in stopped, stopped

    # Written to Redis before exit: the finished request and what the cut stream had sent.
    records = {rec.outcome: rec for rec in await read_ledger(r, ns)}
    assert records["ok"].cost_usd > 0
    cut_stream = records["drain_cut"]
    assert cut_stream.completion_tokens > 0 and cut_stream.cost_usd > 0


async def test_drain_seconds_zero_cuts_at_once_and_still_writes_the_spend(sim, redis_url, r, ns, tmp_path):
    paced_stream(sim)
    cfg = drain_config(sim.url, ns, redis_url, drain_seconds=0)
    async with sidecar_process(cfg, tmp_path) as sc, aiohttp.ClientSession() as s:
        stream = await s.post(sc.url + "/v1/chat/completions", json=chat("a long story", stream=True))
        assert stream.status == 200
        assert (await stream.content.readline()).startswith(b"data: ")

        sc.proc.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        event = draining_event(await rest_of_stream(stream))
        assert event["code"] == "draining"
        assert await sc.exit_code(timeout=HANG_MARGIN) == 0
        assert time.monotonic() - sigterm < HANG_MARGIN
    stopped = next(line for line in sc.lines if "stopped" in line)
    assert "0 requests in flight finished, 1 cut" in stopped, stopped
    (record,) = await read_ledger(r, ns)
    assert record.outcome == "drain_cut" and record.completion_tokens > 0 and record.cost_usd > 0


@pytest.mark.parametrize("drain_seconds", [0.0, 1.0, 2.0, 8.0, 25.0, 120.0])
def test_the_drain_budget_ends_at_drain_seconds_and_keeps_the_close_reserve(drain_seconds: float) -> None:
    b = DrainBudget.starting(100.0, drain_seconds)
    assert b.started == 100.0 and b.deadline == 100.0 + drain_seconds
    assert b.started <= b.handlers_until <= b.cut_until <= b.deadline
    close_reserve = min(CLOSE_RESERVE_MAX_SECONDS, drain_seconds / 4)
    assert b.deadline - b.cut_until == pytest.approx(close_reserve)
    # The close gets what is left of the budget, and never less than the floor (drainSeconds 0, or a late cut).
    assert b.close_seconds(b.cut_until) == pytest.approx(max(close_reserve, MIN_CLOSE_SECONDS))
    assert b.close_seconds(b.deadline + 5) == MIN_CLOSE_SECONDS
