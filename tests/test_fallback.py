"""Fallback down the chain on each failure class, circuit breakers, and the providers behind it."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from kubetoll_core.periods import FakeClock
from kubetoll_tools.simulator import Fault
from support.harness import base_config, two_backend_config, wait_until
from support.ports import refusing_port
from test_operator_metrics import scrape, value


async def chat(sc, **kw):
    return await sc.openai().chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], **kw
    )


@pytest.mark.parametrize(
    "fault,reason",
    [
        (Fault(status=429, retry_after=1), "rateLimited"),
        (Fault(status=500), "serverError"),
        (Fault(status=503), "serverError"),
        (Fault(kind="slow_first_token", delay=3.0), "timeout"),
        (Fault(kind="context_length"), "contextLengthExceeded"),
        (Fault(kind="insufficient_quota"), "budgetExhausted"),
        (Fault(kind="malformed"), "serverError"),
    ],
)
async def test_falls_back_on_each_listed_failure_class(sim, sim2, start_sidecar, fault, reason):
    cfg = two_backend_config(
        sim,
        sim2,
        fallbackOn=[
            "rateLimited",
            "serverError",
            "timeout",
            "connectionError",
            "contextLengthExceeded",
            "budgetExhausted",
        ],
    )
    sc = await start_sidecar(cfg)
    sim.enqueue_fault(fault)
    raw = await chat(sc)
    assert raw.headers["x-kubetoll-backend"] == "secondary"
    assert raw.headers["x-kubetoll-fallbacks"] == "1"
    assert len(sim2.requests) == 1
    assert sc.sidecar.metrics.fallbacks.labels("chat", "primary", reason)._value.get() == 1


async def test_connection_error_falls_back(sim2, start_sidecar):
    with refusing_port() as port:  # held for the whole test: nothing can start listening there

        class Dead:
            url = f"http://127.0.0.1:{port}"

        sc = await start_sidecar(two_backend_config(Dead, sim2))
        raw = await chat(sc)
    assert raw.headers["x-kubetoll-backend"] == "secondary"
    assert sc.sidecar.metrics.fallbacks.labels("chat", "primary", "connectionError")._value.get() == 1


async def test_failure_class_not_listed_does_not_fall_back(sim, sim2, start_sidecar):
    sc = await start_sidecar(two_backend_config(sim, sim2, fallbackOn=["rateLimited"]))
    sim.enqueue_fault(Fault(status=500))
    with pytest.raises(openai.InternalServerError) as exc:
        await chat(sc)
    assert exc.value.status_code == 502
    assert "primary (HTTP 500" in exc.value.message
    assert not sim2.requests


async def test_client_errors_pass_through_untouched(sim, sim2, start_sidecar):
    sc = await start_sidecar(two_backend_config(sim, sim2))
    sim.enqueue_fault(Fault(status=400))
    with pytest.raises(openai.BadRequestError):
        await chat(sc)
    assert not sim2.requests


async def test_every_backend_failed_lists_what_was_tried(sim, sim2, start_sidecar):
    sc = await start_sidecar(two_backend_config(sim, sim2))
    sim.enqueue_fault(Fault(status=429, retry_after=7))
    sim2.enqueue_fault(Fault(status=500))
    async with aiohttp.ClientSession() as s:
        async with s.post(
            sc.url + "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "x"}]}
        ) as r:
            body = await r.json()
            assert r.status == 503
            assert r.headers["Retry-After"] == "7"
    msg = body["error"]["message"]
    assert "primary (HTTP 429" in msg and "secondary (HTTP 500" in msg
    assert body["error"]["code"] == "all_backends_failed"


async def test_all_timeouts_give_504(sim, sim2, start_sidecar):
    sc = await start_sidecar(two_backend_config(sim, sim2))
    sim.enqueue_fault(Fault(kind="slow_first_token", delay=3))
    sim2.enqueue_fault(Fault(kind="slow_first_token", delay=3))
    with pytest.raises(openai.APIStatusError) as exc:
        await chat(sc)
    assert exc.value.status_code == 504


async def test_circuit_opens_after_threshold_and_a_probe_closes_it(sim, sim2, start_sidecar):
    cfg = two_backend_config(sim, sim2)
    cfg["backends"][0]["circuitBreaker"] = {"failureThreshold": 2, "cooldownSeconds": 0.5}
    mono = FakeClock(1000.0)  # the breakers' clock: the cool-down passes when the test says so
    sc = await start_sidecar(cfg, monotonic=mono.time)
    for _ in range(2):
        sim.enqueue_fault(Fault(status=500))
        assert (await chat(sc)).headers["x-kubetoll-backend"] == "secondary"
    calls = len(sim.requests)
    # Open: primary is not called at all.
    raw = await chat(sc)
    assert raw.headers["x-kubetoll-backend"] == "secondary" and len(sim.requests) == calls
    assert sc.sidecar.breakers.items()[0][1].state == "open"
    # Still open just before the cool-down ends.
    mono.advance(0.49)
    assert (await chat(sc)).headers["x-kubetoll-backend"] == "secondary" and len(sim.requests) == calls
    # After the cool-down a probe goes through, succeeds, and closes the circuit.
    mono.advance(0.02)
    assert sc.sidecar.breakers.items()[0][1].state == "half_open"
    assert (await chat(sc)).headers["x-kubetoll-backend"] == "primary"
    assert sc.sidecar.breakers.items()[0][1].state == "closed"


CLOSED = {"closed": 1, "open": 0, "half_open": 0}
OPEN = {"closed": 0, "open": 1, "half_open": 0}
HALF_OPEN = {"closed": 0, "open": 0, "half_open": 1}


async def circuit_metrics(sc, backend: str) -> tuple[float | None, dict[str, float | None]]:
    """`kubetoll_circuit_open` and the one-hot `kubetoll_circuit_state` of a backend, scraped from /metrics."""
    samples = await scrape(sc.config["server"]["metricsPort"])
    states = {s: value(samples, "kubetoll_circuit_state", backend=backend, state=s) for s in CLOSED}
    return value(samples, "kubetoll_circuit_open", backend=backend), states


async def test_circuit_metrics_read_the_breaker_at_scrape_time(sim, sim2, start_sidecar):
    cfg = two_backend_config(sim, sim2)
    cfg["backends"][0]["circuitBreaker"] = {"failureThreshold": 2, "cooldownSeconds": 30}
    mono = FakeClock(1000.0)
    sc = await start_sidecar(cfg, monotonic=mono.time)
    # Every backend of the config has its series from the start, before any call.
    assert await circuit_metrics(sc, "primary") == (0, CLOSED)
    for _ in range(2):
        sim.enqueue_fault(Fault(status=500))
        await chat(sc)
    assert await circuit_metrics(sc, "primary") == (1, OPEN)
    assert await circuit_metrics(sc, "secondary") == (0, CLOSED)
    # The cool-down passes with no traffic at all: only the scrape looks, and it reads half-open.
    mono.advance(30.01)
    assert await circuit_metrics(sc, "primary") == (0, HALF_OPEN)
    assert await circuit_metrics(sc, "primary") == (0, HALF_OPEN)  # a scrape takes no probe
    # A failed probe opens it again for the cool-down ...
    sim.enqueue_fault(Fault(status=500))
    await chat(sc)
    assert await circuit_metrics(sc, "primary") == (1, OPEN)
    mono.advance(30.01)
    assert await circuit_metrics(sc, "primary") == (0, HALF_OPEN)
    # ... and a successful one closes it.
    assert (await chat(sc)).headers["x-kubetoll-backend"] == "primary"
    assert await circuit_metrics(sc, "primary") == (0, CLOSED)


async def test_circuit_metrics_follow_the_served_config(sim, sim2, start_sidecar):
    cfg = two_backend_config(sim, sim2)
    mono = FakeClock(1000.0)
    sc = await start_sidecar(cfg, monotonic=mono.time)
    sim.enqueue_fault(Fault(status=429, retry_after=60))
    await chat(sc)
    assert await circuit_metrics(sc, "primary") == (1, OPEN)
    # The same backend name on another endpoint is another breaker: the old one's state is not reported for it.
    moved = two_backend_config(sim2, sim)
    sc.write_config(moved)
    await wait_until(lambda: sc.sidecar.state.backends["primary"].config.endpoint == sim2.url + "/v1")
    assert await circuit_metrics(sc, "primary") == (0, CLOSED)
    # A backend the config no longer has has no series.
    moved["backends"].pop()
    moved["routes"] = [{"name": "chat", "rules": [{"backends": ["primary"]}]}]
    sc.write_config(moved)
    await wait_until(lambda: "secondary" not in sc.sidecar.state.backends)
    assert await circuit_metrics(sc, "secondary") == (None, dict.fromkeys(CLOSED))


async def test_retry_after_opens_the_circuit_for_that_long(sim, sim2, start_sidecar):
    mono = FakeClock(1000.0)
    sc = await start_sidecar(two_backend_config(sim, sim2), monotonic=mono.time)
    sim.enqueue_fault(Fault(status=429, retry_after=30))
    await chat(sc)
    calls = len(sim.requests)
    for _ in range(3):
        assert (await chat(sc)).headers["x-kubetoll-backend"] == "secondary"
    assert len(sim.requests) == calls
    breaker = dict(sc.sidecar.breakers.items())["primary"]
    assert breaker.retry_in() == 30
    mono.advance(29.9)
    assert (await chat(sc)).headers["x-kubetoll-backend"] == "secondary" and len(sim.requests) == calls
    mono.advance(0.2)  # Retry-After has passed: primary is asked again
    assert (await chat(sc)).headers["x-kubetoll-backend"] == "primary" and len(sim.requests) == calls + 1


async def test_stream_falls_back_before_the_first_byte(sim, sim2, start_sidecar):
    sc = await start_sidecar(two_backend_config(sim, sim2))
    sim.enqueue_fault(Fault(kind="cut_stream", after_chunks=0))
    stream = await sc.openai().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    chunks = [c async for c in stream]
    assert chunks and chunks[0].model == "gpt-4o-mini"  # served by secondary


async def test_stream_cut_after_first_byte_is_not_retried_and_is_billed(sim, sim2, start_sidecar):
    sc = await start_sidecar(two_backend_config(sim, sim2))
    sim.enqueue_fault(Fault(kind="cut_stream", after_chunks=3))
    stream = await sc.openai().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    got = []
    with pytest.raises(openai.APIError) as exc:
        async for c in stream:
            got.append(c)
    assert "ended early" in str(exc.value) or "stream" in str(exc.value)
    assert got, "the chunks before the cut must reach the client"
    assert not sim2.requests, "no fallback after the first byte"
    rec = list(sc.sidecar.ledger.records())[-1]
    assert rec.outcome == "cut_stream" and rec.backend == "primary"
    assert rec.completion_tokens > 0 and rec.cost_usd > 0


async def test_stream_from_a_server_without_usage_is_counted(sim, start_sidecar):
    sim.settings.send_usage_in_stream = False
    sc = await start_sidecar(base_config(sim.url))
    stream = await sc.openai().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    rec = list(sc.sidecar.ledger.records())[-1]
    from kubetoll_sidecar.tokens import count_text

    assert rec.completion_tokens == count_text(text, "gpt-4o")
    assert rec.prompt_tokens > 0


async def test_anthropic_backend_through_the_openai_sdk(sim, start_sidecar):
    cfg = base_config(sim.url)
    cfg["backends"] = [
        {
            "name": "claude",
            "provider": "anthropic",
            "model": "claude-3-5-haiku-latest",
            "endpoint": sim.url,
            "credentials": {"env": "KT_TEST_OPENAI_KEY"},
        }
    ]
    cfg["routes"] = [{"name": "chat", "rules": [{"backends": ["claude"]}]}]
    sim.settings.cached_prompt_tokens = 3
    sc = await start_sidecar(cfg)
    client = sc.openai()
    r = await client.chat.completions.create(
        model="chat", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    )
    assert r.choices[0].message.content and r.usage.prompt_tokens_details.cached_tokens == 3
    sent = sim.requests[-1]
    assert sent.path == "/v1/messages" and sent.body["system"] and sent.headers["x-api-key"]
    stream = await client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    r = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "weather?"}], tools=tools, tool_choice="required"
    )
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    # Anthropic has no embeddings: a 400 before any call (tests/test_upstream_errors.py has the rest).
    with pytest.raises(openai.BadRequestError) as exc:
        await client.embeddings.create(model="chat", input="x")
    assert "embeddings" in exc.value.message


async def test_azure_backend(sim, start_sidecar):
    cfg = base_config(sim.url)
    cfg["backends"] = [
        {
            "name": "az",
            "provider": "azure-openai",
            "model": "gpt-4o",
            "endpoint": sim.url,
            "azure": {"deployment": "prod-gpt4o", "apiVersion": "2024-10-21"},
            "credentials": {"env": "KT_TEST_OPENAI_KEY"},
        }
    ]
    cfg["routes"] = [{"name": "chat", "rules": [{"backends": ["az"]}]}]
    sc = await start_sidecar(cfg)
    r = await sc.openai().chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content
    sent = sim.requests[-1]
    assert sent.deployment == "prod-gpt4o" and sent.api_version == "2024-10-21"
    assert sent.headers["api-key"] == "sk-test-openai-key-123" and "authorization" not in sent.headers


async def test_missing_credential_is_skipped_with_a_reason_that_names_no_value(sim, sim2, start_sidecar):
    cfg = two_backend_config(sim, sim2)
    cfg["backends"][0]["credentials"] = {"env": "KT_TEST_UNSET_KEY"}
    sc = await start_sidecar(cfg)
    raw = await chat(sc)
    assert raw.headers["x-kubetoll-backend"] == "secondary"
    cfg["backends"][1]["credentials"] = {"env": "KT_TEST_UNSET_KEY"}
    sc2 = await start_sidecar(cfg)  # a second sidecar, on ports of its own (it binds port 0)
    with pytest.raises(openai.APIStatusError) as exc:
        await chat(sc2)
    assert "KT_TEST_UNSET_KEY is not set" in exc.value.message
