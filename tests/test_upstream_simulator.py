"""The simulated upstreams, driven by the official openai / anthropic SDKs and raw aiohttp."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import openai
import pytest

try:  # not in the test extras of every checkout; its tests skip without it
    import anthropic
except ImportError:  # pragma: no cover
    anthropic = None

from kubetoll_tools.simulator import (
    Fault,
    RateLimitBurst,
    SimSettings,
    SimulatedUpstream,
    answer_pieces,
    count_tokens,
    openai_prompt_tokens,
    parse_fault,
)

KEY = "sk-test-key"
AZURE_VERSION = "2024-10-21"
ANTHROPIC_HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["location", "unit"],
        },
    },
}
ANTHROPIC_WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}


needs_anthropic = pytest.mark.skipif(anthropic is None, reason="the anthropic SDK is not installed")


@pytest.fixture
async def sim():
    async with SimulatedUpstream(SimSettings(api_key=KEY)) as upstream:
        yield upstream


@pytest.fixture
async def oai(sim):
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key=KEY, max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def claude(sim):
    client = anthropic.AsyncAnthropic(base_url=sim.url, api_key=KEY, max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def raw_sse(http, url: str, body: dict, headers: dict) -> tuple[list[str], BaseException | None]:
    """The `data:` payloads of a stream, and the error that ended it early, if any."""
    data, error = b"", None
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        try:
            async for chunk in resp.content.iter_any():
                data += chunk
        except aiohttp.ClientPayloadError as exc:
            error = exc
    lines = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
    return lines, error


# --------------------------------------------------------------------------- building blocks


def test_answer_pieces_have_exact_token_counts():
    import tiktoken

    import kubetoll_sidecar

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(kubetoll_sidecar.__file__).with_name("tiktoken_cache")))

    encodings = [tiktoken.get_encoding("o200k_base"), tiktoken.get_encoding("cl100k_base")]
    for seed in ("hello", "what is the weather", "x" * 50, ""):
        for n in (1, 7, 16, 333):
            pieces = answer_pieces(seed, n)
            text = "".join(pieces)
            assert len(pieces) == n
            for enc in encodings:
                assert len(enc.encode_ordinary(text)) == n, (seed, n, enc.name)
    assert answer_pieces("same", 10) == answer_pieces("same", 10)
    assert answer_pieces("same", 10) != answer_pieces("other question", 10)


def test_parse_fault_syntax():
    assert parse_fault("429;retry-after=2") == Fault(status=429, retry_after=2.0, kind="error")
    assert parse_fault("500").status == 500
    assert parse_fault("cut;after=3") == Fault(kind="cut_stream", after_chunks=3)
    assert parse_fault("slow;delay=0.5") == Fault(kind="slow_first_token", delay=0.5)
    assert parse_fault("context_length").kind == "context_length"
    assert parse_fault("stream_error;status=529;after=2") == Fault(status=529, kind="stream_error", after_chunks=2)
    with pytest.raises(ValueError):
        parse_fault("explode")
    with pytest.raises(ValueError):
        Fault(kind="nope")


# --------------------------------------------------------------------------- OpenAI


async def test_chat_is_deterministic_with_exact_usage(sim, oai):
    messages = [{"role": "system", "content": "Be brief."}, *user("How do budgets work?")]
    raw = await oai.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
    first = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    assert "openai-processing-ms" in raw.headers and "x-ratelimit-remaining-requests" in raw.headers
    again = await oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
    choice = first.choices[0]
    assert choice.message.content == again.choices[0].message.content
    assert choice.finish_reason == "stop" and first.object == "chat.completion"
    expected_prompt = 3 + (3 + 1 + count_tokens("Be brief.")) + (3 + 1 + count_tokens("How do budgets work?"))
    assert first.usage.prompt_tokens == expected_prompt == openai_prompt_tokens(messages, "gpt-4o-mini")
    assert first.usage.completion_tokens == 16 == count_tokens(choice.message.content)
    assert first.usage.total_tokens == expected_prompt + 16
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert sim.requests[-1].path == "/v1/chat/completions"
    assert sim.requests[-1].body["model"] == "gpt-4o-mini"
    assert sim.requests[-1].headers["authorization"] == f"Bearer {KEY}"


async def test_chat_max_tokens_cuts_and_cached_tokens(sim, oai):
    sim.settings.cached_prompt_tokens = 4
    resp = await oai.chat.completions.create(model="gpt-4o", messages=user("hi"), max_completion_tokens=5)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5 == count_tokens(resp.choices[0].message.content)
    assert resp.usage.prompt_tokens_details.cached_tokens == 4


async def test_chat_stream_with_usage_last(oai):
    stream = await oai.chat.completions.create(
        model="gpt-4o", messages=user("stream please"), stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    plain = await oai.chat.completions.create(model="gpt-4o", messages=user("stream please"))
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


async def test_stream_without_usage_when_server_never_sends_it(sim, http):
    sim.settings.send_usage_in_stream = False
    body = {"model": "gpt-4o", "messages": user("hi"), "stream": True, "stream_options": {"include_usage": True}}
    lines, error = await raw_sse(http, sim.url + "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert error is None and lines[-1] == "[DONE]"
    assert all("usage" not in json.loads(line) for line in lines[:-1])


async def test_tools_give_tool_calls(oai):
    resp = await oai.chat.completions.create(
        model="gpt-4o", messages=user("What's the weather in Paris?"), tools=[WEATHER_TOOL]
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris, France", "unit": "celsius"}

    plain = await oai.chat.completions.create(model="gpt-4o", messages=user("Tell me a story"), tools=[WEATHER_TOOL])
    assert plain.choices[0].finish_reason == "stop"
    forced = await oai.chat.completions.create(
        model="gpt-4o", messages=user("Tell me a story"), tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"
    answered = await oai.chat.completions.create(
        model="gpt-4o",
        tools=[WEATHER_TOOL],
        messages=[
            *user("weather in Paris?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": call.function.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
        ],
    )
    assert answered.choices[0].finish_reason == "stop" and answered.choices[0].message.content


async def test_streamed_tool_call_deltas(oai):
    stream = await oai.chat.completions.create(
        model="gpt-4o", messages=user("weather in Oslo"), tools=[WEATHER_TOOL], stream=True
    )
    chunks = [c async for c in stream]
    first = chunks[0].choices[0].delta.tool_calls[0]
    assert first.id.startswith("call_") and first.function.name == "get_weather"
    args = "".join(c.choices[0].delta.tool_calls[0].function.arguments for c in chunks if c.choices[0].delta.tool_calls)
    assert json.loads(args)["unit"] == "celsius"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_json_schema_and_json_object(oai):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "tags", "ok"],
        "additionalProperties": False,
    }
    resp = await oai.chat.completions.create(
        model="gpt-4o",
        messages=user("describe a person"),
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )
    value = json.loads(resp.choices[0].message.content)
    assert set(value) == {"name", "age", "tags", "ok"}
    assert isinstance(value["age"], int) and isinstance(value["tags"], list) and value["ok"] is True
    obj = await oai.chat.completions.create(
        model="gpt-4o", messages=user("json please"), response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


async def test_n_choices(oai):
    resp = await oai.chat.completions.create(model="gpt-4o", messages=user("two answers"), n=2)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].message.content != resp.choices[1].message.content
    assert resp.usage.completion_tokens == 32


async def test_validation_errors(oai):
    with pytest.raises(openai.BadRequestError) as exc:
        await oai.chat.completions.create(model="gpt-4o", messages=[])
    assert exc.value.param == "messages" and exc.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as exc:
        await oai.chat.completions.create(model="", messages=user("hi"))
    assert exc.value.param == "model"


async def test_legacy_completions(oai):
    resp = await oai.completions.create(model="gpt-3.5-turbo-instruct", prompt=["Say a", "Say b"], max_tokens=3)
    assert resp.object == "text_completion" and len(resp.choices) == 2
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 6 and resp.usage.prompt_tokens == 4
    stream = await oai.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say a", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert (
        "".join(c.choices[0].text for c in chunks if c.choices)
        == (await oai.completions.create(model="m", prompt="Say a")).choices[0].text
    )
    assert chunks[-1].usage.completion_tokens == 16


async def test_embeddings_float_and_base64(sim, oai, http):
    default = await oai.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"]
    )  # SDK asks for base64
    floats = await oai.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float"
    )
    assert sim.requests[-2].body["encoding_format"] == "base64"
    assert len(default.data) == 2 and len(default.data[0].embedding) == 64
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding)
    assert math.isclose(math.sqrt(sum(x * x for x in floats.data[1].embedding)), 1.0, rel_tol=1e-5)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 2
    small = await oai.embeddings.create(
        model="text-embedding-3-small", input=[[1, 2, 3]], dimensions=8, encoding_format="float"
    )
    assert len(small.data[0].embedding) == 8 and small.usage.prompt_tokens == 3
    async with http.post(
        sim.url + "/v1/embeddings",
        json={"model": "e", "input": "alpha", "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        packed = base64.b64decode((await resp.json())["data"][0]["embedding"])
    assert list(struct.unpack("<64f", packed)) == pytest.approx(floats.data[0].embedding)


async def test_models(sim, oai, http):
    models = [m.id async for m in oai.models.list()]
    assert models == sim.settings.models
    async with http.get(sim.url + "/v1/models", headers=ANTHROPIC_HEADERS) as resp:
        body = await resp.json()
    assert body["data"][0]["type"] == "model" and body["has_more"] is False


async def test_rate_limit_fault_queue_and_header(sim, oai):
    sim.enqueue_fault(Fault(status=429, retry_after=2))
    with pytest.raises(openai.RateLimitError) as exc:
        await oai.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert exc.value.response.headers["retry-after"] == "2"
    assert exc.value.code == "rate_limit_exceeded"
    await oai.chat.completions.create(model="gpt-4o", messages=user("hi"))  # the queue is used up
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(
            model="gpt-4o", messages=user("hi"), extra_headers={"x-sim-fault": "429;retry-after=1"}
        )


async def test_server_error_and_quota(sim, oai):
    sim.enqueue_fault(Fault(status=500))
    sim.enqueue_fault(Fault(kind="insufficient_quota"))
    with pytest.raises(openai.InternalServerError) as exc:
        await oai.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert exc.value.type == "server_error"
    with pytest.raises(openai.RateLimitError) as exc:
        await oai.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert exc.value.code == "insufficient_quota" and exc.value.type == "insufficient_quota"


async def test_context_length_and_auth(sim, oai):
    with pytest.raises(openai.BadRequestError) as exc:
        await oai.chat.completions.create(
            model="gpt-4o", messages=user("hi"), extra_headers={"x-sim-fault": "context_length"}
        )
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "messages"
    sim.settings.context_window = 10
    with pytest.raises(openai.BadRequestError) as exc:
        await oai.chat.completions.create(
            model="gpt-4o", messages=user("a long enough question to pass ten tokens easily")
        )
    assert exc.value.code == "context_length_exceeded"
    bad = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        await bad.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert exc.value.code == "invalid_api_key"
    await bad.close()


async def test_cut_stream(sim, oai, http):
    body = {"model": "gpt-4o", "messages": user("cut me"), "stream": True}
    auth = {"Authorization": f"Bearer {KEY}"}
    full, error = await raw_sse(http, sim.url + "/v1/chat/completions", body, auth)
    assert error is None and full[-1] == "[DONE]"
    cut, error = await raw_sse(http, sim.url + "/v1/chat/completions", body, {**auth, "x-sim-fault": "cut;after=2"})
    assert isinstance(error, aiohttp.ClientPayloadError)
    assert len(cut) == 2 and "[DONE]" not in cut
    assert all(json.loads(line)["choices"][0]["finish_reason"] is None for line in cut)
    sim.enqueue_fault(Fault(kind="cut_stream", after_chunks=1))
    with pytest.raises(openai.APIConnectionError):  # the SDK reports the dropped connection
        stream = await oai.chat.completions.create(model="gpt-4o", messages=user("cut me"), stream=True)
        async for _ in stream:
            pass
    with pytest.raises(openai.APIConnectionError):  # non-streaming: the body stops half-way
        await oai.chat.completions.create(model="gpt-4o", messages=user("cut"), extra_headers={"x-sim-fault": "cut"})


async def test_slow_first_token_and_pacing(sim, oai):
    async def first_chunk_after(**kwargs) -> float:
        start = time.perf_counter()
        stream = await oai.chat.completions.create(model="gpt-4o", messages=user("slow"), stream=True, **kwargs)
        elapsed = None
        async for _ in stream:
            elapsed = elapsed if elapsed is not None else time.perf_counter() - start
        return elapsed

    assert await first_chunk_after(extra_headers={"x-sim-fault": "slow;delay=0.3"}) >= 0.3
    assert await first_chunk_after() < 0.2
    sim.settings.first_token_ms = 150
    sim.settings.chunk_interval_ms = 20
    start = time.perf_counter()
    assert await first_chunk_after() >= 0.15
    assert time.perf_counter() - start >= 0.15 + 3 * 0.02  # 4 content chunks, 3 gaps


async def test_malformed_and_no_usage(sim, oai, http):
    auth = {"Authorization": f"Bearer {KEY}", "x-sim-fault": "malformed"}
    async with http.post(
        sim.url + "/v1/chat/completions", json={"model": "m", "messages": user("x")}, headers=auth
    ) as resp:
        assert resp.status == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(await resp.text())
    resp = await oai.chat.completions.create(
        model="gpt-4o", messages=user("hi"), extra_headers={"x-sim-fault": "no_usage"}
    )
    assert resp.usage is None and resp.choices[0].message.content


async def test_stream_error_event_openai(oai):
    stream = await oai.chat.completions.create(
        model="gpt-4o", messages=user("hi"), stream=True, extra_headers={"x-sim-fault": "stream_error;after=2"}
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def test_error_rate_and_burst_are_deterministic(sim, http):
    sim.settings = SimSettings(error_rate=0.5, seed=7)
    sim.reset()

    async def statuses(n: int) -> list[int]:
        out = []
        for _ in range(n):
            async with http.post(sim.url + "/v1/chat/completions", json={"model": "m", "messages": user("x")}) as resp:
                out.append(resp.status)
        return out

    first = await statuses(12)
    sim.reset()
    assert await statuses(12) == first and {429, 500, 200} >= set(first) and 200 in first and len(set(first)) > 1
    sim.settings = SimSettings(rate_limit_burst=RateLimitBurst(every_s=10, duration_s=2))
    sim.reset()  # the burst clock starts now: the first 8 s of every 10 are open
    assert await statuses(2) == [200, 200]
    sim._started -= 8.5  # jump into the burst window instead of sleeping
    async with http.post(sim.url + "/v1/chat/completions", json={"model": "m", "messages": user("x")}) as resp:
        assert resp.status == 429 and 1.0 < float(resp.headers["retry-after"]) <= 1.5


# --------------------------------------------------------------------------- Azure


async def test_azure_chat_stream_embeddings(sim, http):
    az = openai.AsyncAzureOpenAI(azure_endpoint=sim.url, api_version=AZURE_VERSION, api_key=KEY, max_retries=0)
    resp = await az.chat.completions.create(model="my-gpt4o", messages=user("hello azure"))
    assert resp.model == "my-gpt4o" and resp.usage.completion_tokens == 16
    rec = sim.requests[-1]
    assert (rec.provider, rec.deployment, rec.api_version) == ("azure", "my-gpt4o", AZURE_VERSION)
    assert rec.headers["api-key"] == KEY
    stream = await az.chat.completions.create(
        model="my-gpt4o", messages=user("hello azure"), stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices == []  # Azure's prompt_filter_results chunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == resp.choices[0].message.content
    assert chunks[-1].usage.total_tokens == resp.usage.total_tokens
    emb = await az.embeddings.create(model="my-embed", input="hi")
    assert len(emb.data[0].embedding) == 64
    sim.enqueue_fault(Fault(status=429, retry_after=3))
    with pytest.raises(openai.RateLimitError) as exc:
        await az.chat.completions.create(model="my-gpt4o", messages=user("hi"))
    assert exc.value.response.headers["retry-after"] == "3" and exc.value.code == "429"
    await az.close()
    bad = openai.AsyncAzureOpenAI(azure_endpoint=sim.url, api_version=AZURE_VERSION, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model="my-gpt4o", messages=user("hi"))
    await bad.close()
    async with http.post(
        sim.url + "/openai/deployments/d/chat/completions", json={"messages": user("x")}, headers={"api-key": KEY}
    ) as r:
        assert r.status == 400 and "api-version" in (await r.json())["error"]["message"]


# --------------------------------------------------------------------------- Anthropic


@needs_anthropic
async def test_anthropic_message(sim, claude):
    sim.settings.cached_prompt_tokens = 3
    msg = await claude.messages.create(
        model="claude-haiku-4-5", max_tokens=100, system="Be kind.", messages=user("Hello Claude")
    )
    assert msg.id.startswith("msg_") and msg.stop_reason == "end_turn" and msg.type == "message"
    assert msg.usage.output_tokens == 16 == count_tokens(msg.content[0].text)
    total = 3 + (3 + 1 + count_tokens("Be kind.")) + (3 + 1 + count_tokens("Hello Claude"))
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == total
    assert msg.usage.cache_read_input_tokens == 3
    short = await claude.messages.create(model="claude-haiku-4-5", max_tokens=4, messages=user("Hello Claude"))
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 4
    assert msg.content[0].text.startswith(short.content[0].text)
    assert sim.requests[-1].headers["anthropic-version"]
    tokens = await claude.messages.count_tokens(
        model="claude-haiku-4-5", system="Be kind.", messages=user("Hello Claude")
    )
    assert tokens.input_tokens == total


@needs_anthropic
async def test_anthropic_stream_text_and_tool(claude):
    async with claude.messages.stream(model="claude-sonnet-4-6", max_tokens=100, messages=user("Stream it")) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == final.content[0].text and final.usage.output_tokens == 16 and final.stop_reason == "end_turn"
    async with claude.messages.stream(
        model="claude-sonnet-4-6",
        max_tokens=100,
        messages=user("What's the weather in Rome?"),
        tools=[ANTHROPIC_WEATHER_TOOL],
    ) as stream:
        final = await stream.get_final_message()
    block = final.content[0]
    assert final.stop_reason == "tool_use" and block.type == "tool_use" and block.id.startswith("toolu_")
    assert block.input == {"location": "Paris, France", "unit": "celsius"}
    raw = await claude.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=user("hi"), stream=True)
    kinds = [event.type async for event in raw]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]


@needs_anthropic
async def test_anthropic_errors(sim, claude, http):
    sim.enqueue_fault(Fault(status=429, retry_after=4))
    with pytest.raises(anthropic.RateLimitError) as exc:
        await claude.messages.create(model="claude", max_tokens=10, messages=user("hi"))
    assert exc.value.response.headers["retry-after"] == "4"
    assert exc.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(anthropic.OverloadedError) as exc:
        await claude.messages.create(
            model="claude", max_tokens=10, messages=user("hi"), extra_headers={"x-sim-fault": "529"}
        )
    assert exc.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.BadRequestError) as exc:
        await claude.messages.create(
            model="claude", max_tokens=10, messages=user("hi"), extra_headers={"x-sim-fault": "context_length"}
        )
    assert "prompt is too long" in exc.value.body["error"]["message"]
    with pytest.raises(anthropic.APIStatusError) as exc:
        async with claude.messages.stream(
            model="claude", max_tokens=10, messages=user("hi"), extra_headers={"x-sim-fault": "stream_error;after=3"}
        ) as stream:
            async for _ in stream:
                pass
    assert "overloaded_error" in str(exc.value)
    bad = anthropic.AsyncAnthropic(base_url=sim.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        await bad.messages.create(model="claude", max_tokens=10, messages=user("hi"))
    await bad.close()
    async with http.post(
        sim.url + "/v1/messages",
        json={"model": "c", "max_tokens": 5, "messages": user("x")},
        headers={"x-api-key": KEY},
    ) as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
    async with http.post(
        sim.url + "/v1/messages", json={"model": "c", "messages": user("x")}, headers=ANTHROPIC_HEADERS
    ) as r:
        assert r.status == 400 and "max_tokens" in (await r.json())["error"]["message"]


# --------------------------------------------------------------------------- run()


def test_run_serves_until_sigterm():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "sidecar"), str(root / "operator")])}
    code = "from kubetoll_tools.simulator import run, SimSettings; run('127.0.0.1', 0, SimSettings())"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line and "/v1/messages" in line
        url = line.split("listening on ")[1].split()[0]

        async def ask() -> int:
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "/v1/models") as resp:
                    return resp.status

        assert asyncio.run(ask()) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
