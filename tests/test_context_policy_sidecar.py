"""Context policies end to end: the official `openai` SDK against running sidecars and simulated upstreams.

`sim` serves the route's backends, `sim2` is the summarizer (a cheaper chat backend), so
what the summarizer was asked is exactly `sim2`'s recorded requests. A 40-turn support
conversation under a 2000-token policy: summarized once, and a second sidecar sharing the
same real Redis reuses the summary (the summarizer sees one call); the summary is billed
(ledger record `context_summary`, the cost header); reject and dropOldest, tool-call pairs
kept together, a summarizer failure falling back to dropOldest, a backend whose context
window is too small skipped; the compiler's Problems for a summarizer that cannot summarize.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from kubetoll_core.spend_record import CONTEXT_SUMMARY_OUTCOME
from kubetoll_operator.compiler import compile_namespace
from kubetoll_operator.resources import API_VERSION
from kubetoll_sidecar.context_policy import SUMMARY_PREFIX
from kubetoll_tools.simulator import Fault
from support.harness import RunningSidecar, base_config
from test_operator_crds import api_server_errors, examples, model_errors

LIMIT = 2000
SYSTEM = {"role": "system", "content": "You are the support assistant of an online bookshop."}
MINI_PRICES = {"inputPerMTok": 0.15, "outputPerMTok": 0.6}
MAIN_PRICES = {"inputPerMTok": 2.5, "outputPerMTok": 10.0}


def conversation(turns: int = 40) -> list[dict[str, Any]]:
    """A system message and `turns` alternating user and assistant messages of about 90 tokens each."""
    out = [SYSTEM]
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        text = f"Turn {i}: " + f"about order {1000 + i}, the parcel, the invoice and the delivery address. " * 7
        out.append({"role": role, "content": text})
    if out[-1]["role"] != "user":
        out.append({"role": "user", "content": "So where is my parcel now?"})
    return out


def chat_backend(name: str, sim: Any, model: str, prices: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "model": model,
        "endpoint": sim.url + "/v1",
        "credentials": {"env": "KT_TEST_OPENAI_KEY"},
        "pricing": prices,
        "timeouts": {"connect": 1, "firstToken": 2, "total": 5},
        **extra,
    }


def policy_config(sim: Any, sim2: Any, tmp: Path, **context: Any) -> dict[str, Any]:
    cfg = base_config(sim.url)
    cfg["server"]["stateDir"] = str(tmp)
    cfg["backends"] = [
        chat_backend("primary", sim, "gpt-4o", MAIN_PRICES),
        chat_backend("mini", sim2, "gpt-4o-mini", MINI_PRICES),
    ]
    policy = {"maxPromptTokens": LIMIT, "keepLastTurns": 4, **context}
    cfg["routes"] = [{"name": "chat", "rules": [{"backends": ["primary"]}], "context": policy}]
    cfg["budgets"] = [{"name": "b", "cap": {"tokensPerDay": 1_000_000}}]
    return cfg


async def start(tmp: Path, name: str, cfg: dict[str, Any]) -> RunningSidecar:
    d = tmp / name
    d.mkdir()
    cfg = json.loads(json.dumps(cfg))
    cfg["server"]["stateDir"] = str(d)
    return await RunningSidecar(d, cfg).start()


def chat_calls(sim: Any) -> list[Any]:
    return [r for r in sim.requests if r.path.endswith("/chat/completions")]


async def metric(sc: RunningSidecar, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(sc.ops_url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def ask(sc: RunningSidecar, messages: list[dict[str, Any]], **kw: Any) -> Any:
    async with sc.openai() as client:
        return await client.chat.completions.with_raw_response.create(model="chat", messages=messages, **kw)


def saved_of(header: str) -> int:
    fields = dict(p.split("=", 1) for p in header.split(";")[1:])
    return int(fields["saved"])


# --------------------------------------------------------------------------- summarize


async def test_summarized_once_and_reused_by_a_second_sidecar(sim, sim2, redis_url, ns, tmp_path) -> None:
    cfg = policy_config(sim, sim2, tmp_path, overflow="summarize", summarizer="mini")
    cfg.update(namespace=ns, budgetStore={"url": redis_url, "timeoutMs": 1000})
    convo = conversation(40)
    a = await start(tmp_path, "a", cfg)
    b = await start(tmp_path, "b", cfg)
    try:
        raw = await ask(a, convo)
        header = raw.headers["x-kubetoll-context"]
        assert header.startswith("summarized;saved=")
        assert len(chat_calls(sim2)) == 1  # the summarizer, once
        asked = chat_calls(sim2)[0].body
        assert asked["model"] == "gpt-4o-mini" and asked["max_tokens"] <= LIMIT // 4
        assert "Turn 0:" in asked["messages"][1]["content"]  # the oldest turns are what it summarizes
        sent = chat_calls(sim)[-1].body["messages"]
        # The system message, the summary in place of the older turns, the last 4 messages as they were.
        assert sent[0] == SYSTEM
        assert sent[1]["role"] == "system" and sent[1]["content"].startswith(SUMMARY_PREFIX)
        assert sent[2:] == convo[-4:]
        saved = saved_of(header)
        assert saved > 1000
        assert await metric(a, "kubetoll_context_tokens_saved_total", route="chat", action="summarized") == saved
        assert await metric(a, "kubetoll_context_summaries_total", route="chat", result="computed") == 1

        # The summarizer's call is spend of this request: its own ledger record, in the request's cost.
        assert a.sidecar is not None
        request_id = raw.headers["x-request-id"]
        mine = [r for r in a.sidecar.ledger.records() if r.request_id == request_id]
        summary_records = [r for r in mine if r.outcome == CONTEXT_SUMMARY_OUTCOME]
        assert len(summary_records) == 1
        rec = summary_records[0]
        assert rec.backend == "mini" and rec.route == "chat" and rec.cost_usd > 0 and rec.prompt_tokens > 1000
        answer = [r for r in mine if r.outcome == "ok"]
        assert len(answer) == 1 and answer[0].prompt_tokens < LIMIT
        assert float(raw.headers["x-kubetoll-cost-usd"]) == pytest.approx(sum(r.cost_usd for r in mine), abs=1e-9)

        # The second sidecar finds the summary in Redis: no second summarizer call, the same prompt upstream.
        raw2 = await ask(b, convo)
        assert raw2.headers["x-kubetoll-context"].startswith("summarized;saved=")
        assert len(chat_calls(sim2)) == 1
        assert chat_calls(sim)[-1].body["messages"] == sent
        assert await metric(b, "kubetoll_context_summaries_total", route="chat", result="cached") == 1
        assert b.sidecar is not None
        assert not [r for r in b.sidecar.ledger.records() if r.outcome == CONTEXT_SUMMARY_OUTCOME]
    finally:
        await a.stop()
        await b.stop()


async def test_a_short_conversation_is_left_alone(sim, sim2, tmp_path) -> None:
    sc = await start(tmp_path, "a", policy_config(sim, sim2, tmp_path, overflow="summarize", summarizer="mini"))
    try:
        convo = conversation(4)
        raw = await ask(sc, convo)
        assert "x-kubetoll-context" not in raw.headers
        assert chat_calls(sim)[-1].body["messages"] == convo and not chat_calls(sim2)
    finally:
        await sc.stop()


async def test_a_failing_summarizer_falls_back_to_dropping_the_oldest_turns(sim, sim2, tmp_path) -> None:
    sc = await start(tmp_path, "a", policy_config(sim, sim2, tmp_path, overflow="summarize", summarizer="mini"))
    try:
        sim2.enqueue_fault(Fault(status=500))
        convo = conversation(40)
        raw = await ask(sc, convo)  # the request is served all the same
        header = raw.headers["x-kubetoll-context"]
        assert header.startswith("dropped;saved=") and header.endswith(";summary=failed")
        assert len(chat_calls(sim2)) == 1
        sent = chat_calls(sim)[-1].body["messages"]
        assert sent[0] == SYSTEM and sent[-4:] == convo[-4:]
        assert not any(m["content"].startswith(SUMMARY_PREFIX) for m in sent)
        assert await metric(sc, "kubetoll_context_summaries_total", route="chat", result="failed") == 1
        saved = saved_of(header)
        assert await metric(sc, "kubetoll_context_tokens_saved_total", route="chat", action="summary_failed") == saved
        assert sc.sidecar is not None
        assert not [r for r in sc.sidecar.ledger.records() if r.outcome == CONTEXT_SUMMARY_OUTCOME]
    finally:
        await sc.stop()


# --------------------------------------------------------------------------- reject, dropOldest


async def test_reject_answers_400_context_length_exceeded(sim, sim2, tmp_path) -> None:
    sc = await start(tmp_path, "a", policy_config(sim, sim2, tmp_path, overflow="reject"))
    try:
        with pytest.raises(openai.BadRequestError) as exc:
            await ask(sc, conversation(40))
        assert exc.value.code == "context_length_exceeded"
        assert f"allows {LIMIT}" in exc.value.message and "the prompt is about" in exc.value.message
        assert not chat_calls(sim)
    finally:
        await sc.stop()


async def test_drop_oldest_keeps_system_the_tail_and_tool_pairs(sim, sim2, tmp_path) -> None:
    sc = await start(tmp_path, "a", policy_config(sim, sim2, tmp_path, overflow="dropOldest"))
    try:
        convo = conversation(40)
        # Tool calls with their results, in the middle of the conversation and across the tail's boundary.
        call = {"id": "call_7", "type": "function", "function": {"name": "track_parcel", "arguments": '{"id":"7"}'}}
        pair = [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_7", "content": "in transit, Leipzig hub " * 20},
        ]
        convo = convo[:20] + pair + convo[20:-3] + pair + convo[-3:]
        raw = await ask(sc, convo)
        header = raw.headers["x-kubetoll-context"]
        assert header.startswith("dropped;saved=")
        sent = chat_calls(sim)[-1].body["messages"]
        assert sent[0] == SYSTEM
        assert len(sent) < len(convo)
        # The last 4 messages start at a tool result: its call is kept with it.
        assert sent[-4:] == convo[-4:] and sent[-5] == convo[-5] and sent[-5]["tool_calls"]
        for i, m in enumerate(sent):
            if m["role"] == "tool":
                assert sent[i - 1]["role"] in ("assistant", "tool")
                prior = next(p for p in reversed(sent[:i]) if p["role"] != "tool")
                assert prior.get("tool_calls")
        assert sc.sidecar is not None
        answer = [r for r in sc.sidecar.ledger.records() if r.request_id == raw.headers["x-request-id"]]
        assert len(answer) == 1 and answer[0].prompt_tokens <= LIMIT
    finally:
        await sc.stop()


async def test_drop_oldest_refuses_what_cannot_fit_with_what_it_keeps(sim, sim2, tmp_path) -> None:
    sc = await start(tmp_path, "a", policy_config(sim, sim2, tmp_path, overflow="dropOldest"))
    try:
        convo = [SYSTEM, {"role": "user", "content": "tell me about the invoice " * 600}]
        with pytest.raises(openai.BadRequestError) as exc:
            await ask(sc, convo)
        assert exc.value.code == "context_length_exceeded" and "always keeps" in exc.value.message
        assert not chat_calls(sim)
    finally:
        await sc.stop()


async def test_a_backend_whose_window_cannot_hold_the_trimmed_prompt_is_skipped(sim, sim2, tmp_path) -> None:
    cfg = policy_config(sim, sim2, tmp_path, overflow="dropOldest")
    cfg["backends"].insert(0, chat_backend("small", sim, "gpt-4o-mini", MINI_PRICES, limits={"contextWindow": 1500}))
    cfg["routes"][0]["rules"] = [{"backends": ["small", "primary"]}]
    sc = await start(tmp_path, "a", cfg)
    try:
        raw = await ask(sc, conversation(40), max_tokens=200)
        assert raw.headers["x-kubetoll-context"].startswith("dropped;")
        assert raw.headers["x-kubetoll-backend"] == "primary"
        assert [r.body["model"] for r in chat_calls(sim)] == ["gpt-4o"]
        # A short prompt fits the small one, which is first in the chain.
        raw = await ask(sc, conversation(2), max_tokens=200)
        assert raw.headers["x-kubetoll-backend"] == "small"
    finally:
        await sc.stop()


# --------------------------------------------------------------------------- the compiler


def obj(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def crd_backend(name: str) -> dict[str, Any]:
    return obj(
        "ModelBackend",
        name,
        {
            "provider": "openai-compatible",
            "model": "m",
            "endpoint": "http://models.svc:8000/v1",
            "pricing": {"inputPerMTok": 0.1, "outputPerMTok": 0.2},
        },
    )


def context_route(summarizer: str) -> dict[str, Any]:
    policy = {"maxPromptTokens": 2000, "overflow": "summarize", "summarizer": summarizer}
    return obj("ModelRoute", "chat", {"rules": [{"backends": ["main"]}], "context": policy})


def test_the_policy_compiles_into_the_route() -> None:
    result = compile_namespace("team", [crd_backend("main"), crd_backend("mini"), context_route("mini")])
    assert not result.problems
    assert result.config is not None
    ctx = result.config.routes[0].context
    assert ctx is not None and ctx.summarizer == "mini" and ctx.max_prompt_tokens == 2000 and ctx.keep_system


def test_a_summarizer_that_names_no_backend_is_a_problem() -> None:
    result = compile_namespace("team", [crd_backend("main"), context_route("nope")])
    (problem,) = [p for p in result.problems if p.reason == "SummarizerNotFound"]
    assert problem.field == "spec.context.summarizer" and "'nope'" in problem.message
    assert result.config is not None
    ctx = result.config.routes[0].context
    assert ctx is not None and ctx.overflow.value == "dropOldest" and ctx.summarizer is None


def test_a_summarizer_that_is_an_embedding_server_is_an_error() -> None:
    policy = obj("CachePolicy", "answers", {"semantic": {"enabled": True, "embeddingBackend": "embed"}})
    result = compile_namespace("team", [crd_backend("main"), crd_backend("embed"), policy, context_route("embed")])
    (problem,) = [p for p in result.problems if p.reason == "SummarizerNotChat"]
    assert problem.severity == "error" and "embedding backend" in problem.message
    assert result.config is not None
    ctx = result.config.routes[0].context
    assert ctx is not None and ctx.overflow.value == "dropOldest"


def test_the_crd_refuses_summarize_without_a_summarizer() -> None:
    route = obj(
        "ModelRoute",
        "chat",
        {"rules": [{"backends": ["main"]}], "context": {"maxPromptTokens": 2000, "overflow": "summarize"}},
    )
    result = compile_namespace("team", [crd_backend("main"), route])
    assert any("summarize needs summarizer" in p.message for p in result.problems)


def test_the_example_validates_and_compiles_with_the_other_examples() -> None:
    """examples/spend-less/context-route.yaml: what the API server and the compiler say, beside examples/*.yaml."""
    path = Path(__file__).resolve().parent.parent / "examples" / "spend-less" / "context-route.yaml"
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert api_server_errors(doc) == [] and model_errors(doc) == []
    result = compile_namespace("team-a", [*examples(), doc])
    assert result.ok and result.problems == [], result.problems
    assert result.config is not None
    route = next(r for r in result.config.routes if r.name == "support-chat")
    assert route.context is not None and route.context.summarizer == "gpt-4o-mini"
    assert route.context.keep_last_turns == 6 and route.context.overflow.value == "summarize"


async def test_a_stream_is_trimmed_too(sim, sim2, tmp_path) -> None:
    sc = await start(tmp_path, "a", policy_config(sim, sim2, tmp_path, overflow="dropOldest"))
    try:
        convo = conversation(40)
        async with sc.openai() as client:
            raw = await client.chat.completions.with_raw_response.create(model="chat", messages=convo, stream=True)
            assert raw.headers["x-kubetoll-context"].startswith("dropped;saved=")
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        assert text
        sent = chat_calls(sim)[-1].body["messages"]
        assert sent[0] == SYSTEM and sent[-4:] == convo[-4:] and len(sent) < len(convo)
    finally:
        await sc.stop()
