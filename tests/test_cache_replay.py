"""Cache hits as the client sees them: JSON with a new id, and SSE replays the `openai` SDK parses;
streamed answers assembled back into one body for storing."""

from __future__ import annotations

import copy
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from kubetoll_sidecar.cache import CacheHit, StreamAssembler
from kubetoll_sidecar.cache.replay import Entry, is_complete
from kubetoll_sidecar.sse import SSEDecoder

LONG = "Open Settings, choose Billing, then Cancel subscription. " * 6

TEXT_BODY: dict[str, Any] = {
    "id": "chatcmpl-orig",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-2024-08-06",
    "system_fingerprint": "fp_1",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": LONG, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": "Second choice."},
            "logprobs": None,
            "finish_reason": "length",
        },
    ],
    "usage": {"prompt_tokens": 21, "completion_tokens": 80, "total_tokens": 101},
}

TOOL_BODY: dict[str, Any] = {
    "id": "chatcmpl-tool",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup_order", "arguments": '{"order_id": "A-1234"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70},
}

COMPLETION_BODY: dict[str, Any] = {
    "id": "cmpl-orig",
    "object": "text_completion",
    "created": 1700000000,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [
        {"text": "Paris is the capital of France. " * 5, "index": 0, "logprobs": None, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45},
}


def hit_of(body: dict[str, Any], endpoint: str = "chat", kind: str = "exact") -> CacheHit:
    u = body["usage"]
    return CacheHit(
        kind,
        "faq",
        Entry(endpoint, copy.deepcopy(body), u["prompt_tokens"], u["completion_tokens"], 0, 0.0123, 1700000000.0),
    )


@pytest.fixture
async def serve():
    """Serves one CacheHit the way the pipeline would, for the real SDK to read."""
    runners: list[web.AppRunner] = []

    async def _serve(hit: CacheHit) -> openai.AsyncOpenAI:
        async def handler(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            if not body.get("stream"):
                return web.Response(body=hit.json_bytes(), content_type="application/json", headers=hit.headers())
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            resp = web.StreamResponse(headers={"content-type": "text/event-stream", **hit.headers()})
            await resp.prepare(request)
            await resp.write(hit.sse_bytes(include_usage))
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)

    yield _serve
    for r in runners:
        await r.cleanup()


async def test_json_hit_parsed_by_the_sdk(serve):
    client = await serve(hit_of(TEXT_BODY))
    raw = await client.chat.completions.with_raw_response.create(
        model="faq", messages=[{"role": "user", "content": "q"}]
    )
    c = raw.parse()
    assert c.id != "chatcmpl-orig" and c.created != 1700000000
    assert c.choices[0].message.content == LONG and c.choices[1].finish_reason == "length"
    assert c.usage.completion_tokens == 80
    assert raw.headers["x-kubetoll-cache"] == "hit-exact" and float(raw.headers["x-kubetoll-cost-usd"]) == 0.0
    assert float(raw.headers["x-kubetoll-avoided-usd"]) == pytest.approx(0.0123)


@pytest.mark.parametrize("include_usage", [False, True])
async def test_streamed_text_replay_parsed_by_the_sdk(serve, include_usage):
    client = await serve(hit_of(TEXT_BODY))
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = await client.chat.completions.create(
        model="faq", messages=[{"role": "user", "content": "q"}], stream=True, n=2, **kwargs
    )
    chunks = [c async for c in stream]
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    roles = set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.delta.role:
                roles.add(ch.delta.role)
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts == {0: LONG, 1: "Second choice."}
    assert finishes == {0: "stop", 1: "length"} and roles == {"assistant"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != "chatcmpl-orig"
    assert sum(1 for c in chunks if c.choices and c.choices[0].index == 0 and c.choices[0].delta.content) > 1, (
        "long content comes in pieces"
    )
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 101
        assert all(c.usage is None for c in chunks[:-1])
    else:
        assert all(c.choices for c in chunks)


async def test_streamed_tool_call_replay_parsed_by_the_sdk(serve):
    client = await serve(hit_of(TOOL_BODY))
    stream = await client.chat.completions.create(model="faq", messages=[{"role": "user", "content": "q"}], stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for c in stream:
        for ch in c.choices:
            for tc in ch.delta.tool_calls or ():
                cur = calls.setdefault(tc.index, {"id": "", "name": "", "args": ""})
                cur["id"] += tc.id or ""
                cur["name"] += (tc.function.name or "") if tc.function else ""
                cur["args"] += (tc.function.arguments or "") if tc.function else ""
            finish = ch.finish_reason or finish
    assert calls == {
        0: {"id": "call_1", "name": "lookup_order", "args": '{"order_id": "A-1234"}'},
        1: {"id": "call_2", "name": "get_weather", "args": '{"city": "Paris"}'},
    }
    assert finish == "tool_calls"


async def test_the_sdk_stream_helper_accumulates_the_replay(serve):
    client = await serve(hit_of(TOOL_BODY))
    async with client.chat.completions.stream(model="faq", messages=[{"role": "user", "content": "q"}]) as stream:
        final = await stream.get_final_completion()
    msg = final.choices[0].message
    assert [t.function.name for t in msg.tool_calls] == ["lookup_order", "get_weather"]
    assert final.choices[0].finish_reason == "tool_calls"


async def test_streamed_completions_replay_parsed_by_the_sdk(serve):
    client = await serve(hit_of(COMPLETION_BODY, endpoint="completions"))
    stream = await client.completions.create(
        model="faq", prompt="capital?", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == COMPLETION_BODY["choices"][0]["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 40


def test_replay_is_well_formed_sse_ending_in_done():
    raw = hit_of(TEXT_BODY).sse_bytes(include_usage=True)
    assert raw.endswith(b"data: [DONE]\n\n")
    events = SSEDecoder().feed(raw)
    assert events[-1] == (None, b"[DONE]")
    payloads = [orjson.loads(d) for _, d in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    first_of_choice = [p for p in payloads if p["choices"] and p["choices"][0]["delta"].get("role")]
    assert len(first_of_choice) == 2


@pytest.mark.parametrize("body", [TEXT_BODY, TOOL_BODY], ids=["text", "tools"])
def test_assembling_a_replay_gives_back_the_body(body):
    asm = StreamAssembler("chat")
    for chunk in hit_of(body).sse_chunks(include_usage=True):
        asm.feed(orjson.dumps(chunk))  # as bytes, the way OpenAI chunks pass through the pipeline
    out = asm.body()
    assert out is not None and is_complete("chat", out)
    for got, want in zip(out["choices"], body["choices"]):
        assert got["finish_reason"] == want["finish_reason"]
        assert got["message"]["content"] == want["message"]["content"]
        assert got["message"].get("tool_calls") == want["message"].get("tool_calls")
    assert out["usage"] == body["usage"]


def test_assembler_refuses_cut_and_failed_streams():
    chunks = hit_of(TEXT_BODY).sse_chunks(include_usage=False)
    cut = StreamAssembler("chat")
    for c in chunks[:-1]:  # the last choice never finished
        cut.feed(c)
    assert cut.body() is None
    failed = StreamAssembler("chat")
    for c in chunks:
        failed.feed(c)
    failed.feed({"error": {"message": "upstream died", "type": "server_error"}})
    assert failed.body() is None
    assert StreamAssembler("chat").body() is None
    filtered = StreamAssembler("chat")
    filtered.feed(
        {"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}]}
    )
    filtered.feed({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]})
    assert filtered.body() is None


async def test_assembling_a_real_upstream_stream_matches_its_non_streamed_answer(sim):
    """The simulator streams the same answer it returns whole: the assembled body must equal it."""
    req = {"model": "gpt-4o", "messages": [{"role": "user", "content": "What is the refund policy?"}], "temperature": 0}
    headers = {"authorization": "Bearer sk-test-openai-key-123"}
    async with aiohttp.ClientSession() as s:
        async with s.post(sim.url + "/v1/chat/completions", json=req, headers=headers) as r:
            whole = await r.json()
        async with s.post(
            sim.url + "/v1/chat/completions",
            json={**req, "stream": True, "stream_options": {"include_usage": True}},
            headers=headers,
        ) as r:
            raw = await r.read()
    asm = StreamAssembler("chat")
    for _, data in SSEDecoder().feed(raw):
        if data != b"[DONE]":
            asm.feed(data)
    out = asm.body()
    assert out is not None
    assert out["choices"][0]["message"]["content"] == whole["choices"][0]["message"]["content"]
    assert out["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert out["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
