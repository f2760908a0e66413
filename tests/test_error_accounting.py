"""Errors are counted as errors: an unexpected exception, an aborted upload, a rate downgrade.

Against a running sidecar: the metrics and the access log say what happened,
the answer is in OpenAI's error format, and nothing is counted as `ok` that was not.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest

from kubetoll_sidecar.pipeline import Pipeline
from support.harness import base_config, wait_until


def counted(counter: Any, **labels: str) -> float:
    """A Prometheus counter's total over the samples whose labels include `labels`."""
    return sum(
        s.value
        for metric in counter.collect()
        for s in metric.samples
        if s.name.endswith("_total") and labels.items() <= s.labels.items()
    )


def requests_count(sc: Any, outcome: str) -> float:
    return counted(sc.sidecar.metrics.requests, outcome=outcome)


async def test_an_unexpected_exception_is_a_500_in_openai_format_and_counted_as_such(
    sim: Any, start_sidecar: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sc = await start_sidecar(base_config(sim.url))

    def broken(self: Pipeline, *args: Any, **kwargs: Any) -> int:
        raise RuntimeError("a bug in a stage")

    monkeypatch.setattr(Pipeline, "_estimate_prompt", broken)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            sc.url + "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "the secret prompt"}]},
            headers={"Authorization": "Bearer sk-should-not-be-logged"},
        ) as resp:
            assert resp.status == 500
            body = await resp.json()
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "internal_error"
    assert resp.headers["x-request-id"] in body["error"]["message"]
    assert requests_count(sc, "internal_error") == 1 and requests_count(sc, "ok") == 0
    assert "sk-should-not-be-logged" not in caplog.text and "the secret prompt" not in caplog.text
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "kubetoll.access"]
    assert access and access[-1]["status"] == 500 and access[-1]["outcome"] == "internal_error"


async def test_an_aborted_upload_is_counted_as_a_disconnect_without_a_traceback(
    sim: Any, start_sidecar: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sc = await start_sidecar(base_config(sim.url))
    port = sc.config["server"]["port"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n" + b'{"model": "chat", "messages": ['
    )
    await writer.drain()
    await wait_until(lambda: sc.sidecar.pipeline.in_flight == 1)  # the sidecar is reading the body
    writer.close()
    await wait_until(lambda: requests_count(sc, "client_disconnected") == 1)
    assert requests_count(sc, "ok") == 0
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith(("kubetoll", "aiohttp"))]


async def test_a_rate_limit_downgrade_is_counted(sim: Any, start_sidecar: Any) -> None:
    cfg = base_config(sim.url)
    cfg["backends"].append({**cfg["backends"][0], "name": "cheap", "model": "gpt-4o-mini"})
    cfg["routes"][0]["downgrade"] = {"atPercent": 100, "backends": ["cheap"]}
    cfg["budgets"] = [
        {"name": "b", "tiers": {"free": {"requestsPerMinute": 1, "onExhausted": "downgrade"}}},
    ]
    cfg["tenancy"] = {"defaultTier": "free"}
    sc = await start_sidecar(cfg)
    client = sc.openai()
    for _ in range(3):
        await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert counted(sc.sidecar.metrics.downgrades, reason="rate") == 2


async def test_malformed_framing_logs_one_line_without_the_request(
    sim: Any, start_sidecar: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sc = await start_sidecar(base_config(sim.url))
    port = sc.config["server"]["port"]
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\nHost: x\nAuthorization: Bearer sk-FRAMING-SECRET\n"
        b'Content-Length: 27\n\n{"prompt":"FRAMING-PROMPT"}'
    )
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    assert "sk-FRAMING-SECRET" not in caplog.text and "FRAMING-PROMPT" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith(("kubetoll", "aiohttp"))]
    warnings = [r for r in caplog.records if r.name == "kubetoll.http" and r.levelno == logging.WARNING]
    assert 1 <= len(warnings) < 5  # rate-limited: one line, the rest counted into the next
    assert "BadStatusLine" in warnings[0].getMessage() and "127.0.0.1" in warnings[0].getMessage()
    # (other tests' clients closing after their loop ended may log on asyncio: not ours)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith(("kubetoll", "aiohttp"))]
