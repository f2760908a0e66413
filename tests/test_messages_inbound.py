"""Anthropic's Messages API served by the sidecar, through the official `anthropic` SDK.

Each behaviour runs on three routes of the same simulated upstream: an Anthropic
backend (served natively: the body goes to `/v1/messages`), an OpenAI backend and
an OpenAI-compatible server (both through chat completions). Spend is checked
against what the simulated upstream reported for the call it received, through
the ledger's HTTP endpoint.
"""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from kubetoll_core.periods import FakeClock
from kubetoll_core.usage import Usage
from kubetoll_sidecar.drain import draining_response
from kubetoll_sidecar.inbound.messages import from_chat
from kubetoll_sidecar.providers.anthropic_messages import AnthropicMessagesTranslator
from kubetoll_tools.simulator import Fault, anthropic_prompt_tokens, openai_prompt_tokens
from support.harness import base_config

# route -> (backend, the upstream path it is called on)
ROUTES = {
    "claude": ("claude", "/v1/messages"),
    "gpt": ("gpt", "/v1/chat/completions"),
    "local": ("local", "/v1/chat/completions"),
}
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CLIENT_KEY = "sk-ant-the-apps-own-key"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()


def config(sim_url: str, **extra: Any) -> dict[str, Any]:
    cfg = base_config(sim_url, **extra)
    key = {"env": "KT_TEST_OPENAI_KEY"}  # the simulator takes one key for every provider
    cfg["backends"] = [
        {
            "name": "claude",
            "provider": "anthropic",
            "model": "claude-haiku-4-5",
            "endpoint": sim_url,
            "credentials": key,
        },
        {"name": "gpt", "provider": "openai", "model": "gpt-4o", "endpoint": sim_url + "/v1", "credentials": key},
        {
            "name": "local",
            "provider": "openai-compatible",
            "model": "llama-3.1-8b",
            "endpoint": sim_url + "/v1",
            "credentials": key,
            "pricing": {"inputPerMTok": 0.5, "outputPerMTok": 1.5},
        },
    ]
    cfg["routes"] = [{"name": r, "rules": [{"backends": [b]}]} for r, (b, _) in ROUTES.items()]
    return cfg


def client(sc) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=sc.url, api_key=CLIENT_KEY, max_retries=0)


async def spend(sc) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.url + "/kubetoll/v1/spend") as r:
            return (await r.json())["records"]


def upstream_prompt(sim, route: str) -> int:
    """What the simulated upstream counted as the input of the last call it received."""
    sent = sim.requests[-1]
    assert sent.path == ROUTES[route][1]
    if route == "claude":
        return anthropic_prompt_tokens(sent.body, sent.body["model"])
    return openai_prompt_tokens(sent.body["messages"], sent.body["model"])


async def check_spend(sc, sim, route: str, usage: Any) -> dict[str, Any]:
    """The last ledger record bills the upstream's usage (Anthropic's input excludes cache reads)."""
    (*_, rec) = await spend(sc)
    backend = ROUTES[route][0]
    cached = usage.cache_read_input_tokens or 0
    written = usage.cache_creation_input_tokens or 0
    prompt = usage.input_tokens + cached + written
    assert rec["route"] == route and rec["backend"] == backend
    assert prompt == upstream_prompt(sim, route)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["cached_tokens"]) == (
        prompt,
        usage.output_tokens,
        cached,
    )
    price = sc.sidecar.state.backends[backend].price
    expected = price.cost(Usage(prompt, usage.output_tokens, cached, written))
    assert rec["cost_usd"] == pytest.approx(expected, abs=1e-12) and rec["cost_usd"] > 0
    return rec


@pytest.mark.parametrize("route", list(ROUTES))
async def test_create_with_system_and_turns(sim, start_sidecar, route):
    sim.settings.cached_prompt_tokens = 3
    sc = await start_sidecar(config(sim.url))
    raw = await client(sc).messages.with_raw_response.create(
        model=route,
        max_tokens=64,
        system="You answer briefly.",
        messages=[
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": [{"type": "text", "text": "What is the refund policy?"}]},
        ],
    )
    msg = await raw.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.stop_reason == "end_turn"
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.usage.cache_read_input_tokens == 3 and msg.usage.output_tokens == 16
    assert raw.headers["x-kubetoll-backend"] == ROUTES[route][0]
    await check_spend(sc, sim, route, msg.usage)
    sent = sim.requests[-1]
    # The app's key and version header stop at the sidecar: the backend gets the sidecar's credential.
    assert CLIENT_KEY not in str(sent.headers)
    if route == "claude":
        assert sent.headers["x-api-key"] == "sk-test-openai-key-123" and sent.body["system"] == "You answer briefly."
        assert sent.body["max_tokens"] == 64 and sent.body["model"] == "claude-haiku-4-5"
    else:
        assert sent.headers["authorization"] == "Bearer sk-test-openai-key-123"
        assert sent.body["messages"][0] == {"role": "system", "content": "You answer briefly."}
        assert [m["role"] for m in sent.body["messages"]] == ["system", "user", "assistant", "user"]


@pytest.mark.parametrize("route", list(ROUTES))
async def test_max_tokens_stop_reason(sim, start_sidecar, route):
    sc = await start_sidecar(config(sim.url))
    msg = await client(sc).messages.create(
        model=route, max_tokens=4, messages=[{"role": "user", "content": "Tell me a long story"}]
    )
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 4
    await check_spend(sc, sim, route, msg.usage)


@pytest.mark.parametrize("route", list(ROUTES))
async def test_streaming_events_in_anthropics_order(sim, start_sidecar, route):
    sc = await start_sidecar(config(sim.url))
    async with client(sc).messages.stream(
        model=route, max_tokens=64, messages=[{"role": "user", "content": "hello there"}]
    ) as stream:
        kinds = [e.type async for e in stream]
        final = await stream.get_final_message()
    # The SDK yields its own `text` events after each delta; the raw order is what remains.
    raw = [k for k in kinds if k not in ("text", "input_json")]
    deltas = raw.count("content_block_delta")
    assert deltas > 0
    assert raw == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert final.stop_reason == "end_turn" and final.content[0].text and final.usage.output_tokens == 16
    await check_spend(sc, sim, route, final.usage)

    # On the wire: named events, the ping after the first block starts, no `[DONE]`.
    async with aiohttp.ClientSession() as s:
        body = {"model": route, "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(sc.url + "/v1/messages", json=body) as r:
            text = (await r.read()).decode()
    names = [line[len("event: ") :] for line in text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "[DONE]" not in text


@pytest.mark.parametrize("route", list(ROUTES))
async def test_tool_use_and_tool_results(sim, start_sidecar, route):
    sc = await start_sidecar(config(sim.url))
    c = client(sc)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = await c.messages.create(
        model=route, max_tokens=200, messages=ask, tools=[WEATHER], tool_choice={"type": "any"}
    )
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and "city" in use.input and use.id
    await check_spend(sc, sim, route, first.usage)
    if route != "claude":
        sent = sim.requests[-1].body
        assert sent["tools"][0]["function"]["name"] == "get_weather" and sent["tool_choice"] == "required"

    turns = [
        *ask,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 24 C"},
                {"type": "text", "text": "Thanks!"},
            ],
        },
    ]
    second = await c.messages.create(model=route, max_tokens=200, messages=turns, tools=[WEATHER])
    assert second.stop_reason == "end_turn" and second.content[0].type == "text"
    if route != "claude":  # the result went as a tool message right after the call, then the rest of the turn
        sent = sim.requests[-1].body["messages"]
        assert sent[1]["tool_calls"][0]["id"] == use.id
        assert sent[2] == {"role": "tool", "tool_call_id": use.id, "content": "Sunny, 24 C"}
        assert sent[3] == {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]}

    async with c.messages.stream(
        model=route, max_tokens=200, messages=ask, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"}
    ) as stream:
        final = await stream.get_final_message()
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed.input == use.input


@pytest.mark.parametrize("route", list(ROUTES))
async def test_images_as_content_blocks(sim, start_sidecar, route):
    sc = await start_sidecar(config(sim.url))
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    msg = await client(sc).messages.create(
        model=route,
        max_tokens=32,
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is in this picture?"}]}],
    )
    assert msg.content[0].text
    sent = sim.requests[-1].body["messages"][0]["content"]
    if route == "claude":
        assert sent[0] == image
    else:
        assert sent[0] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}


async def test_count_tokens_is_the_estimate_the_pipeline_reserves(sim, start_sidecar):
    sc = await start_sidecar(config(sim.url))
    c = client(sc)
    request = {
        "system": "You answer briefly.",
        "messages": [{"role": "user", "content": "What is the weather in Paris today?"}],
        "tools": [WEATHER],
    }
    for route in ROUTES:
        counted = await c.messages.count_tokens(model=route, **request)
        assert counted.input_tokens > 0
        # With no usage from the provider, the sidecar bills its own estimate: the same figure.
        sim.enqueue_fault(Fault(kind="no_usage"))
        await c.messages.create(model=route, max_tokens=16, tool_choice={"type": "none"}, **request)
        (*_, rec) = await spend(sc)
        assert rec["prompt_tokens"] == counted.input_tokens
    calls = len(sim.requests)
    await c.messages.count_tokens(model="claude", **request)
    assert len(sim.requests) == calls, "count_tokens called a backend"
    with pytest.raises(anthropic.NotFoundError):
        await c.messages.count_tokens(model="nope", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "body,status,etype",
    [
        ({"model": "claude", "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
        ({"model": "claude", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, 400, None),
        ({"model": "claude", "max_tokens": 5, "messages": []}, 400, None),
        ({"model": "claude", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400, None),
        ({"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": 7}]}, 400, None),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, 400, None),
        ({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, 404, "not_found_error"),
    ],
)
async def test_bad_input_gets_anthropic_errors(sim, start_sidecar, body, status, etype):
    sc = await start_sidecar(config(sim.url))
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/messages", json=body) as r:
            assert r.status == status
            got = await r.json()
    assert got["type"] == "error" and set(got["error"]) == {"type", "message"} and got["error"]["message"]
    assert got["error"]["type"] == (etype or "invalid_request_error")
    assert got["request_id"]
    assert not sim.requests


async def test_errors_through_the_sdk(sim, start_sidecar):
    cfg = config(sim.url)
    cfg["routes"].append({"name": "down", "rules": [{"backends": ["gpt"]}], "fallbackOn": ["serverError"]})
    sc = await start_sidecar(cfg)
    c = client(sc)
    with pytest.raises(anthropic.BadRequestError) as bad:
        await c.messages.create(model="claude", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        await c.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    # Every backend failed: 502, in Anthropic's shape.
    sim.enqueue_fault(Fault(status=500))
    with pytest.raises(anthropic.InternalServerError) as down:
        await c.messages.create(model="down", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert down.value.status_code == 502 and down.value.body["error"]["type"] == "api_error"
    # Rate-limited upstream with no fallback left: 503 overloaded_error, with Retry-After.
    sim.enqueue_fault(Fault(status=429, retry_after=7))
    with pytest.raises(anthropic.APIStatusError) as limited:
        await c.messages.create(model="gpt", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert limited.value.status_code == 503 and limited.value.body["error"]["type"] == "overloaded_error"
    assert limited.value.response.headers["Retry-After"] == "7"
    # An error an Anthropic backend returned keeps its own type.
    sim.enqueue_fault(Fault(status=403))
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        await c.messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert denied.value.body["error"]["type"] == "permission_error"
    # A path under /v1/messages the sidecar does not serve, and a wrong method: Anthropic's shape too.
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/messages/batches", json={}) as r:
            assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
        async with s.get(sc.url + "/v1/messages") as r:
            assert r.status == 405 and (await r.json())["type"] == "error"


@pytest.mark.parametrize("route", ["claude", "gpt"])
async def test_a_budget_refusal_is_a_rate_limit_error(sim, start_sidecar, route):
    cfg = config(sim.url)
    cfg["budgets"] = [{"name": "b", "tiers": {"default": {"requestsPerMinute": 1}}}]
    sc = await start_sidecar(cfg, clock=FakeClock(1_800_000_000.0))
    c = client(sc)
    await c.messages.create(model=route, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.RateLimitError) as info:
        await c.messages.create(model=route, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 429 and info.value.body["error"]["type"] == "rate_limit_error"
    assert info.value.response.headers["Retry-After"] == "60"
    # A streaming request is refused the same way, before any event.
    with pytest.raises(anthropic.RateLimitError):
        async with c.messages.stream(model=route, max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
            await s.get_final_message()


@pytest.mark.parametrize("route", ["claude", "gpt"])
async def test_a_cut_stream_ends_with_an_error_event_and_is_billed(sim, start_sidecar, route):
    sc = await start_sidecar(config(sim.url))
    sim.enqueue_fault(Fault(kind="cut_stream", after_chunks=5))
    with pytest.raises(anthropic.APIStatusError) as info:
        async with client(sc).messages.stream(
            model=route, max_tokens=64, messages=[{"role": "user", "content": "hello there"}]
        ) as stream:
            await stream.get_final_message()
    assert "api_error" in str(info.value.body)
    (*_, rec) = await spend(sc)
    assert rec["outcome"] == "cut_stream" and rec["completion_tokens"] > 0


async def test_fallback_and_cache_apply_as_for_chat(sim, start_sidecar):
    # Anthropic's SDK sends no temperature: the policy caches answers at the default one.
    policy = {"name": "faq", "scope": "namespace", "exact": {"enabled": True}, "cacheable": {"maxTemperature": 1}}
    cfg = config(sim.url, cachePolicies=[policy])
    cfg["routes"].append({"name": "mixed", "rules": [{"backends": ["claude", "gpt"]}], "cachePolicy": "faq"})
    sc = await start_sidecar(cfg)
    c = client(sc)
    ask = {"model": "mixed", "max_tokens": 32, "messages": [{"role": "user", "content": "Hi!"}]}
    sim.enqueue_fault(Fault(status=529))  # Anthropic overloaded: fall back to the OpenAI backend, through chat
    first = await c.messages.with_raw_response.create(**ask)
    assert first.headers["x-kubetoll-backend"] == "gpt" and first.headers["x-kubetoll-fallbacks"] == "1"
    assert [r.path for r in sim.requests] == ["/v1/messages", "/v1/chat/completions"]
    msg = await first.parse()
    (rec,) = await spend(sc)
    assert (rec["route"], rec["backend"], rec["fallbacks"]) == ("mixed", "gpt", 1)
    prompt = msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (prompt, msg.usage.output_tokens)
    assert prompt == upstream_prompt(sim, "gpt")
    await sc.sidecar.cache.drain()
    second = await c.messages.with_raw_response.create(**ask)
    assert second.headers["x-kubetoll-cache"] == "hit-exact" and len(sim.requests) == 2
    hit = await second.parse()
    assert hit.content[0].text == msg.content[0].text and hit.id != msg.id
    async with c.messages.stream(**ask) as stream:
        replayed = await stream.get_final_message()
    assert replayed.content[0].text == msg.content[0].text and len(sim.requests) == 2


def test_draining_answers_in_the_api_format():
    resp = draining_response("/v1/messages")
    assert resp.status == 503 and b'"overloaded_error"' in resp.body and resp.headers["Retry-After"]
    assert b'"draining"' in draining_response("/v1/chat/completions").body


async def test_the_apps_headers_are_accepted_and_never_forwarded(sim, start_sidecar):
    cfg = config(sim.url, tenancy={"useUserField": True})
    sc = await start_sidecar(cfg)
    headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "tools-2024-04-04"}
    body = {
        "model": "claude",
        "max_tokens": 8,
        "metadata": {"user_id": "alice"},
        "messages": [{"role": "user", "content": "hi"}],
    }
    for route in ("claude", "gpt"):
        async with aiohttp.ClientSession() as s:
            async with s.post(sc.url + "/v1/messages", json={**body, "model": route}, headers=headers) as r:
                assert r.status == 200 and (await r.json())["type"] == "message"
        sent = sim.requests[-1].headers
        assert CLIENT_KEY not in str(sent) and "anthropic-beta" not in sent
    # metadata.user_id is the Messages API's `user`: the tenant, when tenancy reads the user field.
    assert [r["tenant"] for r in await spend(sc)] == ["alice", "alice"]


def test_native_answers_pass_through_with_their_stop_sequence_and_cache_usage():
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "Hi"}],
        "stop_reason": "stop_sequence",
        "stop_sequence": "END",
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 50,
            "output_tokens": 7,
        },
    }
    body, usage = AnthropicMessagesTranslator().parse_response("messages", orjson.dumps(message), "claude")
    assert body == message
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_write_tokens) == (
        160,
        7,
        50,
        100,
    )
    stream = AnthropicMessagesTranslator().stream_translator("claude", False)
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {**message, "content": [], "usage": {**message["usage"], "output_tokens": 1}},
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"},
                "usage": {"output_tokens": 7},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    out = [e for name, payload in events for e in stream.feed(name, orjson.dumps(payload))]
    assert out == [payload for _, payload in events]  # every event as the provider sent it
    assert stream.done and stream.usage == usage and stream.text == ["Hi"]


def test_through_chat_stop_reasons_and_usage():
    def answer(finish: str, **message: Any) -> dict[str, Any]:
        return {
            "model": "gpt-4o",
            "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", **message}}],
        }

    usage = Usage(prompt_tokens=100, completion_tokens=9, cached_tokens=40)
    msg = from_chat(answer("stop", content="Hi"), usage, {})
    assert msg["stop_reason"] == "end_turn" and msg["content"] == [{"type": "text", "text": "Hi"}]
    assert msg["usage"] == {
        "input_tokens": 60,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 40,
        "output_tokens": 9,
    }
    assert from_chat(answer("length", content="Hi"), usage, {})["stop_reason"] == "max_tokens"
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    tool = from_chat(answer("tool_calls", content=None, tool_calls=[call]), usage, {})
    assert tool["stop_reason"] == "tool_use"
    assert tool["content"] == [{"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}]
    assert from_chat(answer("content_filter", content=""), usage, {})["stop_reason"] == "refusal"
