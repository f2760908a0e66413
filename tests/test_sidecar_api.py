"""The OpenAI API through the official SDK, against a running sidecar and a simulated provider."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import openai
import orjson
import pytest

from support.harness import base_config


async def test_chat_completion_with_cost_headers(sim, start_sidecar):
    sc = await start_sidecar(base_config(sim.url))
    client = sc.openai()
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "What is the refund policy?"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage.prompt_tokens > 0
    assert raw.headers["x-kubetoll-backend"] == "primary"
    assert raw.headers["x-kubetoll-fallbacks"] == "0"
    # gpt-4o list price from the catalogue: $2.50 in / $10 out per million tokens.
    expected = completion.usage.prompt_tokens * 2.5e-6 + completion.usage.completion_tokens * 10e-6
    assert float(raw.headers["x-kubetoll-cost-usd"]) == pytest.approx(expected, abs=1e-9)
    # The sidecar sent the backend's model and the credential, never the client's key.
    sent = sim.requests[-1]
    assert sent.body["model"] == "gpt-4o"
    assert sent.headers["authorization"] == "Bearer sk-test-openai-key-123"


async def test_streaming_with_usage_chunk(sim, start_sidecar):
    sc = await start_sidecar(base_config(sim.url))
    stream = await sc.openai().chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


async def test_a_stream_whose_body_ends_after_its_last_event_keeps_its_upstream_connection(sim, start_sidecar):
    # A hosted API's end of body (chunked's last chunk) often comes after the last event, in a
    # record of its own. The client's stream is over by then; the connection still goes back to
    # the pool once the end arrives, so the next stream does not open (and TLS-handshake) another.
    sim.settings.stream_end_delay_ms = 50
    sc = await start_sidecar(base_config(sim.url))
    for _ in range(2):
        stream = await sc.openai().chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        assert [c async for c in stream]
        await asyncio.sleep(0.2)  # the end arrives; the connection is pooled
    first, second = sim.requests[-2:]
    assert first.peer and first.peer == second.peer


async def test_streaming_without_usage_hides_the_usage_chunk_but_still_bills(sim, start_sidecar):
    sc = await start_sidecar(base_config(sim.url))
    stream = await sc.openai().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks), "a usage-only chunk the client did not ask for leaked"
    # ...but the sidecar asked upstream for usage and billed it.
    assert sim.requests[-1].body["stream_options"] == {"include_usage": True}
    records = list(sc.sidecar.ledger.records())
    assert records[-1].completion_tokens > 0 and records[-1].cost_usd > 0


async def test_tools_response_format_and_n(sim, start_sidecar):
    sc = await start_sidecar(base_config(sim.url))
    client = sc.openai()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    r = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "weather in Paris?"}], tools=tools, tool_choice="required"
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    assert r.choices[0].finish_reason == "tool_calls"

    r = await client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "give me a user"}],
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "user",
                "schema": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
            },
        },
    )
    assert "name" in json.loads(r.choices[0].message.content)

    r = await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], n=2)
    assert len(r.choices) == 2


async def test_completions_embeddings_and_models(sim, start_sidecar):
    cfg = base_config(sim.url)
    cfg["routes"].append({"name": "embed", "rules": [{"backends": ["embedder"]}]})
    cfg["backends"].append(
        {
            "name": "embedder",
            "provider": "openai",
            "model": "text-embedding-3-small",
            "endpoint": sim.url + "/v1",
            "credentials": {"env": "KT_TEST_OPENAI_KEY"},
        }
    )
    sc = await start_sidecar(cfg)
    client = sc.openai()
    c = await client.completions.create(model="chat", prompt="Say hi", max_tokens=5)
    assert c.choices[0].text and c.usage.completion_tokens <= 5
    e = await client.embeddings.create(model="embed", input=["one", "two"])
    assert len(e.data) == 2 and len(e.data[0].embedding) > 0
    models = await client.models.list()
    assert sorted(m.id for m in models.data) == ["chat", "embed"]
    m = await client.models.retrieve("embed")
    assert m.id == "embed"


async def test_route_cap_is_enforced_upstream(sim, start_sidecar):
    cfg = base_config(sim.url)
    cfg["routes"][0]["maxOutputTokens"] = 7
    sc = await start_sidecar(cfg)
    r = await sc.openai().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "tell me a long story"}], max_tokens=500
    )
    assert sim.requests[-1].body["max_tokens"] == 7
    assert r.usage.completion_tokens <= 7


@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        (b"[1,2]", 400, None),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
        (json.dumps({"model": "chat"}).encode(), 400, "messages"),
        (json.dumps({"model": "chat", "messages": []}).encode(), 400, "messages"),
        (
            json.dumps({"model": "chat", "messages": [{"role": "robot", "content": "x"}]}).encode(),
            400,
            "messages[0].role",
        ),
        (
            json.dumps({"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(),
            400,
            "max_tokens",
        ),
        (
            json.dumps({"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(),
            400,
            "stream",
        ),
        (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model"),
    ],
)
async def test_bad_requests_get_openai_errors(sim, start_sidecar, body, status, param):
    sc = await start_sidecar(base_config(sim.url))
    async with aiohttp.ClientSession() as s:
        async with s.post(
            sc.url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
        ) as r:
            assert r.status == status
            err = (await r.json())["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["message"]
            assert err["param"] == param
    assert not sim.requests, "a bad request reached the provider"


async def test_body_over_limit_is_413(sim, start_sidecar):
    cfg = base_config(sim.url)
    cfg["server"]["maxBodyBytes"] = 2048
    sc = await start_sidecar(cfg)
    big = {"model": "chat", "messages": [{"role": "user", "content": "x" * 5000}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/chat/completions", json=big) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"


async def test_a_gzip_body_over_the_limit_once_decoded_is_413(sim, start_sidecar):
    # Small on the wire, so Content-Length passes; the limit holds for the decoded body, whole
    # (it came with the head) or still arriving.
    cfg = base_config(sim.url)
    cfg["server"]["maxBodyBytes"] = 2048
    sc = await start_sidecar(cfg)
    raw = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "x" * 100_000}]})
    packed = gzip.compress(raw)
    assert len(packed) < 2048
    async with aiohttp.ClientSession() as s:
        async with s.post(
            sc.url + "/v1/chat/completions",
            data=packed,
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        ) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"
    assert not sim.requests


async def test_sdk_exception_types(sim, start_sidecar):
    sc = await start_sidecar(base_config(sim.url))
    client = sc.openai()
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="chat", messages=[])


async def test_unknown_path_and_method(sim, start_sidecar):
    sc = await start_sidecar(base_config(sim.url))
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.url + "/v1/chat/completions") as r:
            assert r.status == 405 and "error" in await r.json()
        async with s.post(sc.url + "/v2/nothing", json={}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_url"


async def test_probes_and_metrics(sim, start_sidecar):
    sc = await start_sidecar(base_config(sim.url))
    await sc.openai().chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.ops_url + "/healthz") as r:
            assert r.status == 200
        async with s.get(sc.ops_url + "/readyz") as r:
            detail = await r.json()
            assert r.status == 200 and detail["routes"] == ["chat"] and detail["configRefused"] is None
        async with s.get(sc.ops_url + "/metrics") as r:
            text = await r.text()
    assert 'kubetoll_requests_total{backend="primary",outcome="ok",route="chat",tier="default"} 1.0' in text
    assert "kubetoll_added_latency_seconds_bucket" in text
    assert 'kubetoll_tokens_total{backend="primary",route="chat",type="output"}' in text
    assert "gen_ai_client_operation_duration_seconds" in text
    assert "sk-test-openai-key-123" not in text


async def test_spend_endpoint_lists_ledger_records(sim, start_sidecar):
    sc = await start_sidecar(base_config(sim.url))
    await sc.openai().chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], user="alice")
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.url + "/kubetoll/v1/spend") as r:
            data = await r.json()
        async with s.get(sc.url + "/kubetoll/v1/spend?since=abc") as r:
            assert r.status == 400
    assert data["namespace"] == "test"
    (rec,) = data["records"]
    assert rec["tenant"] == "alice" and rec["route"] == "chat" and rec["backend"] == "primary" and rec["cost_usd"] > 0
    assert rec["model"] == "gpt-4o"  # the model the backend was called with: `kubetoll report --by model`
