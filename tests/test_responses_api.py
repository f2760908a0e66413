"""OpenAI's Responses API through the official `openai` SDK, against a running sidecar.

Each behaviour runs on three routes of the same simulated upstream: an OpenAI
backend (served natively: the body goes to `/v1/responses`), an Anthropic backend
and an OpenAI-compatible server (both through chat completions). Spend is checked
against what the simulated upstream reported for the call it received, through
the ledger's HTTP endpoint.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import aiohttp
import openai
import pytest

from kubetoll_core.enums import FailureClass, Provider
from kubetoll_core.periods import FakeClock
from kubetoll_core.usage import Usage
from kubetoll_sidecar.cache.keys import normalize_request, semantic_split
from kubetoll_sidecar.inbound.responses import StoredResponses
from kubetoll_sidecar.providers.base import Endpoint
from kubetoll_sidecar.providers.openai_responses import ResponsesStream
from kubetoll_tools.simulator import Fault, anthropic_prompt_tokens, openai_prompt_tokens
from support.harness import base_config

# route -> (backend, the upstream path it is called on)
ROUTES = {
    "gpt": ("gpt", "/v1/responses"),
    "claude": ("claude", "/v1/messages"),
    "local": ("local", "/v1/chat/completions"),
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def config(sim_url: str, **extra: Any) -> dict[str, Any]:
    cfg = base_config(sim_url, **extra)
    key = {"env": "KT_TEST_OPENAI_KEY"}  # the simulator takes one key for every provider
    cfg["backends"] = [
        {"name": "gpt", "provider": "openai", "model": "gpt-4o", "endpoint": sim_url + "/v1", "credentials": key},
        {
            "name": "claude",
            "provider": "anthropic",
            "model": "claude-haiku-4-5",
            "endpoint": sim_url,
            "credentials": key,
        },
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


async def spend(sc) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.url + "/kubetoll/v1/spend") as r:
            return (await r.json())["records"]


def upstream_usage(sim, route: str) -> tuple[int, int]:
    """What the simulated upstream counted for the last call it received: (prompt, completion)."""
    sent = sim.requests[-1]
    assert sent.path == ROUTES[route][1]
    model = sent.body["model"]
    if route == "claude":
        return anthropic_prompt_tokens(sent.body, model), 0
    if route == "local":
        return openai_prompt_tokens(sent.body["messages"], model), 0
    return -1, 0  # the native answer carries the upstream's usage itself


async def last_record(sc) -> dict[str, Any]:
    records = await spend(sc)
    assert records, "nothing was recorded"
    return records[-1]


async def check_spend(sc, sim, route: str, input_tokens: int, output_tokens: int, cached: int = 0) -> None:
    """The ledger record of the last request is the upstream's usage, priced by the backend's price."""
    rec = await last_record(sc)
    backend = ROUTES[route][0]
    assert rec["route"] == route and rec["backend"] == backend
    counted, _ = upstream_usage(sim, route)
    if counted >= 0:  # through chat: the upstream's own count of the request it received
        assert input_tokens == counted
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["cached_tokens"]) == (
        input_tokens,
        output_tokens,
        cached,
    )
    price = sc.sidecar.state.backends[backend].price
    assert rec["cost_usd"] == pytest.approx(price.cost(Usage(input_tokens, output_tokens, cached)), abs=1e-12)
    assert rec["cost_usd"] > 0


@pytest.mark.parametrize("route", list(ROUTES))
async def test_create_with_instructions_and_a_cap(sim, start_sidecar, route):
    sim.settings.cached_prompt_tokens = 2
    sc = await start_sidecar(config(sim.url))
    raw = await sc.openai().responses.with_raw_response.create(
        model=route, instructions="Answer briefly.", input="What is the refund policy?", max_output_tokens=20
    )
    resp = raw.parse()
    assert resp.object == "response" and resp.status == "completed"
    assert resp.output_text and resp.output[0].type == "message"
    assert raw.headers["x-kubetoll-backend"] == ROUTES[route][0]
    u = resp.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens == 16
    assert u.input_tokens_details.cached_tokens == 2
    await check_spend(sc, sim, route, u.input_tokens, u.output_tokens, cached=2)
    assert float(raw.headers["x-kubetoll-cost-usd"]) == pytest.approx((await last_record(sc))["cost_usd"], abs=1e-9)
    sent = sim.requests[-1]
    if route == "gpt":  # natively: the client's body as sent, with the backend's model and key
        assert sent.body["instructions"] == "Answer briefly." and sent.body["max_output_tokens"] == 20
    elif route == "claude":
        assert sent.body["system"] == [{"type": "text", "text": "Answer briefly."}] and sent.body["max_tokens"] == 20
    else:
        assert sent.body["messages"][0] == {"role": "system", "content": "Answer briefly."}
        assert sent.body["max_tokens"] == 20
    assert sent.body["model"] != route
    assert sent.headers.get("authorization", "Bearer sk-test-openai-key-123").endswith("sk-test-openai-key-123")


@pytest.mark.parametrize("route", list(ROUTES))
async def test_a_cap_that_cuts_the_answer_is_incomplete(sim, start_sidecar, route):
    sc = await start_sidecar(config(sim.url))
    resp = await sc.openai().responses.create(model=route, input="Tell me a long story", max_output_tokens=5)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 5
    await check_spend(sc, sim, route, resp.usage.input_tokens, 5)


@pytest.mark.parametrize("route", list(ROUTES))
async def test_streaming_gives_the_typed_event_stream(sim, start_sidecar, route):
    sc = await start_sidecar(config(sim.url))
    client = sc.openai()
    async with client.responses.stream(model=route, input=[{"role": "user", "content": "hello there"}]) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas) and deltas
    assert kinds[4 + len(deltas) :] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "".join(deltas) and final.usage.output_tokens == 16
    await check_spend(sc, sim, route, final.usage.input_tokens, final.usage.output_tokens)

    # stream=True on create parses the same events.
    events2 = [e async for e in await client.responses.create(model=route, input="hello there", stream=True)]
    assert events2[-1].type == "response.completed" and events2[-1].response.usage.output_tokens == 16


@pytest.mark.parametrize("route", list(ROUTES))
async def test_function_tools_and_their_outputs(sim, start_sidecar, route):
    sc = await start_sidecar(config(sim.url))
    client = sc.openai()
    first = await client.responses.create(
        model=route, input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required"
    )
    (call,) = [o for o in first.output if o.type == "function_call"]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments) and call.call_id
    await check_spend(sc, sim, route, first.usage.input_tokens, first.usage.output_tokens)
    if route != "gpt":  # through chat: the tool went as a chat function tool
        sent = sim.requests[-1].body
        tool = sent["tools"][0]
        assert (tool.get("function") or tool)["name"] == "get_weather"

    follow_up = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"},
    ]
    second = await client.responses.create(model=route, input=follow_up, tools=[WEATHER])
    assert second.output_text and second.output[-1].type == "message"
    sent = sim.requests[-1].body
    if route == "local":
        assert sent["messages"][1]["tool_calls"][0]["id"] == call.call_id
        assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 24 C"}
    elif route == "claude":
        assert sent["messages"][1]["content"][0]["type"] == "tool_use"
        assert sent["messages"][2]["content"][0] == {
            "type": "tool_result",
            "tool_use_id": call.call_id,
            "content": "Sunny, 24 C",
        }

    # A streamed call: the arguments arrive as deltas, the final response has the whole call.
    async with client.responses.stream(
        model=route, input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required"
    ) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (streamed,) = [o for o in final.output if o.type == "function_call"]
    assert streamed.arguments == args and json.loads(args)
    assert "response.function_call_arguments.done" in [e.type for e in events]


async def test_server_side_state_needs_an_openai_backend(sim, start_sidecar):
    cfg = config(sim.url)
    cfg["routes"].append({"name": "mixed", "rules": [{"backends": ["claude", "gpt"]}]})
    sc = await start_sidecar(cfg)
    client = sc.openai()
    for route in ("claude", "local"):
        for extra in ({"store": True}, {"previous_response_id": "resp_abc"}):
            with pytest.raises(openai.BadRequestError) as info:
                await client.responses.create(model=route, input="hi", **extra)
            assert info.value.code == "unsupported_by_route" and "OpenAI backend" in info.value.message
    assert not sim.requests, "a request needing server state reached a backend that cannot serve it"
    # On a chain with an OpenAI backend, the others are skipped for it.
    raw = await client.responses.with_raw_response.create(model="mixed", input="hi", store=True)
    assert raw.headers["x-kubetoll-backend"] == "gpt" and raw.parse().store is True
    assert [r.path for r in sim.requests] == ["/v1/responses"]


async def test_stored_responses_are_retrieved_from_the_backend_that_made_them(sim, start_sidecar):
    sc = await start_sidecar(config(sim.url))
    client = sc.openai()
    first = await client.responses.create(model="gpt", input="What is the refund policy?")
    got = await client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    assert sim.requests[-1].method == "GET" and sim.requests[-1].path == f"/v1/responses/{first.id}"
    assert sim.requests[-1].headers["authorization"] == "Bearer sk-test-openai-key-123"

    # previous_response_id continues it upstream: the whole conversation is billed again, as the provider bills it.
    second = await client.responses.create(model="gpt", input="And for orders?", previous_response_id=first.id)
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    await check_spend(sc, sim, "gpt", second.usage.input_tokens, second.usage.output_tokens)

    await client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_never_seen")
    # Made through chat: nothing upstream holds it.
    via_chat = await client.responses.create(model="claude", input="hi")
    assert via_chat.store is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(via_chat.id)
    # store=false is not remembered either.
    unstored = await client.responses.create(model="gpt", input="hi", store=False)
    calls = len(sim.requests)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)
    assert len(sim.requests) == calls


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "gpt"}, "input"),
        ({"model": "gpt", "input": 42}, "input"),
        ({"model": "gpt", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": "gpt", "input": [{"role": []}]}, "input[0].role"),  # found by the fuzzer: was a 500
        ({"model": "gpt", "input": [{"role": {"a": 1}, "content": "x"}]}, "input[0].role"),
        ({"model": "gpt", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"model": "gpt", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "gpt", "input": "x", "tools": {}}, "tools"),
        ({"model": "gpt", "input": "x", "n": 2}, "n"),
        ({"input": "x"}, "model"),
    ],
)
async def test_bad_input_gets_openai_errors(sim, start_sidecar, body, param):
    sc = await start_sidecar(config(sim.url))
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/responses", json=body) as r:
            assert r.status == 400
            err = (await r.json())["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    assert not sim.requests


async def test_errors_through_the_sdk(sim, start_sidecar):
    sc = await start_sidecar(config(sim.url))
    client = sc.openai()
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="nope", input="x")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model="claude", input="x", tools=[{"type": "web_search"}])


async def test_a_budget_refusal_is_a_rate_limit_error(sim, start_sidecar):
    cfg = config(sim.url)
    cfg["budgets"] = [{"name": "b", "tiers": {"default": {"requestsPerMinute": 1}}}]
    sc = await start_sidecar(cfg, clock=FakeClock(1_800_000_000.0))
    client = sc.openai()
    await client.responses.create(model="claude", input="x")
    with pytest.raises(openai.RateLimitError) as info:
        await client.responses.create(model="claude", input="x")
    assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers["Retry-After"] == "60"


async def test_fallback_from_a_failing_openai_backend_goes_through_chat(sim, start_sidecar):
    cfg = config(sim.url)
    cfg["routes"].append({"name": "mixed", "rules": [{"backends": ["gpt", "claude"]}]})
    sc = await start_sidecar(cfg)
    sim.enqueue_fault(Fault(status=500))
    raw = await sc.openai().responses.with_raw_response.create(model="mixed", input="hello")
    resp = raw.parse()
    assert raw.headers["x-kubetoll-backend"] == "claude" and raw.headers["x-kubetoll-fallbacks"] == "1"
    assert [r.path for r in sim.requests] == ["/v1/responses", "/v1/messages"]
    rec = await last_record(sc)
    assert rec["backend"] == "claude" and rec["fallbacks"] == 1
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (resp.usage.input_tokens, resp.usage.output_tokens)


@pytest.mark.parametrize("route", ["gpt", "claude"])
async def test_a_cut_stream_raises_and_bills_what_was_sent(sim, start_sidecar, route):
    sc = await start_sidecar(config(sim.url))
    sim.enqueue_fault(Fault(kind="cut_stream", after_chunks=5))
    stream = await sc.openai().responses.create(model=route, input="hello there", stream=True)
    seen = []
    with pytest.raises(openai.APIError) as info:
        async for event in stream:
            seen.append(event)
    assert "upstream_stream_cut" in str(info.value.body) or "ended early" in info.value.message
    assert seen and seen[0].type == "response.created"
    rec = await last_record(sc)
    assert rec["outcome"] == "cut_stream" and rec["completion_tokens"] > 0


@pytest.mark.parametrize("route", ["gpt", "claude"])
async def test_cache_hits_in_the_api_format(sim, start_sidecar, route):
    cfg = config(sim.url, cachePolicies=[{"name": "faq", "scope": "namespace", "exact": {"enabled": True}}])
    for r in cfg["routes"]:
        r["cachePolicy"] = "faq"
    sc = await start_sidecar(cfg)
    client = sc.openai()
    ask = {"model": route, "input": "How do I reset my password?", "temperature": 0, "store": False}
    first = await client.responses.with_raw_response.create(**ask)
    assert first.headers["x-kubetoll-cache"] == "miss"
    await sc.sidecar.cache.drain()
    calls = len(sim.requests)
    second = await client.responses.with_raw_response.create(**ask)
    assert second.headers["x-kubetoll-cache"] == "hit-exact" and len(sim.requests) == calls
    hit, original = second.parse(), first.parse()
    assert hit.output_text == original.output_text and hit.id != original.id
    async with client.responses.stream(**ask) as stream:
        replayed = await stream.get_final_response()
    assert replayed.output_text == original.output_text and len(sim.requests) == calls
    # A stream's answer is stored too (assembled from its events) and answers the same request whole.
    streamed = {**ask, "input": "How do I change my email?"}
    async with client.responses.stream(**streamed) as stream:
        answer = await stream.get_final_response()
    await sc.sidecar.cache.drain()
    calls = len(sim.requests)
    again = await client.responses.with_raw_response.create(**streamed)
    assert again.headers["x-kubetoll-cache"] == "hit-exact" and again.parse().output_text == answer.output_text
    assert len(sim.requests) == calls
    # Server-side state is never answered from the cache.
    stored = await client.responses.with_raw_response.create(**{**ask, "store": True, "model": "gpt"})
    assert stored.headers["x-kubetoll-cache"] == "uncacheable"


async def test_the_routes_output_cap_and_tenancy_apply(sim, start_sidecar):
    cfg = config(sim.url, tenancy={"useUserField": True})
    for r in cfg["routes"]:
        r["maxOutputTokens"] = 7
    sc = await start_sidecar(cfg)
    for route in ROUTES:
        resp = await sc.openai().responses.create(model=route, input="Tell me a long story", user="bob")
        assert resp.usage.output_tokens == 7
        sent = sim.requests[-1].body
        assert sent.get("max_output_tokens", sent.get("max_tokens")) == 7
    assert {r["tenant"] for r in await spend(sc)} == {"bob"}
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.ops_url + "/metrics") as r:
            metrics = await r.text()
    for route, (backend, _) in ROUTES.items():
        assert (
            f'kubetoll_requests_total{{backend="{backend}",outcome="ok",route="{route}",tier="default"}} 1.0' in metrics
        )
    assert 'gen_ai_operation_name="responses"' in metrics


def test_native_stream_usage_and_errors():
    stream = ResponsesStream()
    delta = {
        "type": "response.output_text.delta",
        "sequence_number": 3,
        "delta": "Hi",
        "item_id": "m",
        "output_index": 0,
    }
    assert stream.feed("response.output_text.delta", json.dumps(delta).encode()) == [delta]
    usage = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 2}
    done = {"type": "response.completed", "sequence_number": 9, "response": {"id": "r", "usage": usage}}
    assert stream.feed(None, json.dumps(done).encode()) == [done]
    assert stream.done and stream.text == ["Hi"] and stream.usage == Usage(12, 2, 4)
    odd, event = ResponsesStream(), {"type": ["response.completed"]}
    assert odd.feed(None, json.dumps(event).encode()) == [event] and not odd.done  # passed on, not a crash
    for payload in (
        {
            "type": "error",
            "sequence_number": 1,
            "error": {"type": "tokens", "code": "rate_limit_exceeded", "message": "slow"},
        },
        {"type": "error", "sequence_number": 1, "code": "rate_limit_exceeded", "message": "slow", "param": None},
    ):
        s = ResponsesStream()
        assert s.feed("error", json.dumps(payload).encode()) == []
        err = s.error()
        assert err is not None and err.failure is FailureClass.rate_limited and err.message == "slow"


def test_the_semantic_cache_reads_each_apis_question():
    def split(endpoint: str, body: dict[str, Any]) -> Any:
        return semantic_split(endpoint, "r", "*", normalize_request(body), "lastUserMessage")

    responses = {"model": "r", "instructions": "Be brief.", "input": "How do I reset my password?"}
    items = {
        "model": "r",
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "How do I reset my password?"}]}],
    }
    messages = {"model": "r", "max_tokens": 9, "messages": [{"role": "user", "content": "How do I reset my password?"}]}
    a, b, c = split("responses", responses), split("responses", items), split("messages", messages)
    assert a is not None and b is not None and c is not None
    assert a.text == b.text == c.text == "How do I reset my password?"
    # Everything but the question must match: other instructions are another partition.
    assert split("responses", {**responses, "instructions": "Be verbose."}).partition != a.partition
    after_a_call = [*items["input"], {"type": "function_call_output", "call_id": "c", "output": "x"}]
    assert split("responses", {**items, "input": after_a_call}) is None  # a tool result is not a question


def test_stored_ids_are_bounded_and_only_an_openai_backends():
    def forwarded(provider: str, rid: str, store: Any = None) -> Any:
        backend = SimpleNamespace(config=SimpleNamespace(provider=Provider(provider), name=f"{provider}-1"))
        return SimpleNamespace(backend=backend, body={"id": rid, "object": "response", "store": store}, stream=None)

    stored = StoredResponses(max_ids=2)
    for rid in ("resp_a", "resp_b", "resp_c"):
        stored.remember(Endpoint.responses, forwarded("openai", rid))
    assert [stored.backend(r) for r in ("resp_a", "resp_b", "resp_c")] == [None, "openai-1", "openai-1"]
    stored.remember(Endpoint.responses, forwarded("openai", "resp_d", store=False))
    stored.remember(Endpoint.responses, forwarded("anthropic", "resp_e"))
    stored.remember(Endpoint.chat, forwarded("openai", "resp_f"))
    assert stored.backend("resp_d") is stored.backend("resp_e") is stored.backend("resp_f") is None
