"""Cascades: a cheap backend first, the strong one only when the cheap answer fails a check.

Through a running sidecar with the official `openai` SDK against two simulated
upstreams, the cheap one (`sim`) told to give a bad answer (`kubetoll_tools.simulator`,
the answer faults): each check escalates to the strong one (`sim2`) and a good answer
does not; the ledger holds every attempt (the escalated one as `cascade_escalated`,
spend but not a request) and the budget settled exactly what the ledger holds; a step
whose backends fail escalates, a step falls back within itself first, a caller's
error is not escalated; streams are skipped or buffered as the route says; the last
step failing still bills the steps before it. Then the checks on their own, the
compiler's handling of cascade references, and the report's cascade figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest

from kubetoll_core.enums import CascadeCheck
from kubetoll_core.periods import FakeClock
from kubetoll_core.router_config import RouterConfig
from kubetoll_core.spend_record import CASCADE_ESCALATED_OUTCOME, SpendRecord
from kubetoll_operator.compiler import compile_namespace
from kubetoll_sidecar.answer_checks import failed_check, is_stock_refusal
from kubetoll_tools.experiment_report import cascade_summary
from kubetoll_tools.simulator import Fault
from kubetoll_tools.spend import totals
from support.harness import RunningSidecar, base_config

T0 = 1_790_000_000.0
HELLO = [{"role": "user", "content": "How do I reset my password?"}]
# Round prices (USD per million tokens): the strong backend is 10x the cheap one.
CHEAP = {"inputPerMTok": 0.5, "outputPerMTok": 2.0}
STRONG = {"inputPerMTok": 5.0, "outputPerMTok": 20.0}
TOKENS_PER_DAY = 1_000_000
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
        },
    }
]


def backend(name: str, sim: Any, model: str, pricing: dict[str, float]) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "model": model,
        "endpoint": sim.url + "/v1",
        "credentials": {"env": "KT_TEST_OPENAI_KEY"},
        "pricing": pricing,
        "timeouts": {"connect": 1, "firstToken": 2, "total": 5},
    }


def cascade_config(sim: Any, sim2: Any, *, steps: list[list[str]] | None = None, **cascade: Any) -> dict[str, Any]:
    cfg = base_config(sim.url)
    cfg["backends"] = [
        backend("cheap", sim, "gpt-4o-mini", CHEAP),
        backend("cheap-b", sim, "gpt-4o-mini", CHEAP),
        backend("strong", sim2, "gpt-4o", STRONG),
    ]
    rule = {"backends": ["strong"], "cascade": {"steps": [{"backends": s} for s in steps or [["cheap"]]], **cascade}}
    cfg["routes"] = [{"name": "chat", "rules": [rule]}]
    cfg["budgets"] = [{"name": "b", "cap": {"tokensPerDay": TOKENS_PER_DAY}}]
    return cfg


def records(sc: RunningSidecar, request_id: str | None = None) -> list[SpendRecord]:
    assert sc.sidecar is not None
    got = [r for r in sc.sidecar.ledger.records() if not r.refusal]
    return [r for r in got if r.request_id == request_id] if request_id else got


def chat_calls(sim: Any) -> int:
    return sum(1 for r in sim.requests if r.path.endswith("/chat/completions"))


def assert_settled_as_recorded(sc: RunningSidecar, spent_tokens: float) -> None:
    """What the budget settled is exactly what the ledger holds: no attempt's spend lost."""
    recs = records(sc)
    assert spent_tokens == sum(r.prompt_tokens + r.completion_tokens for r in recs)


async def spent(sc: RunningSidecar, raw: Any) -> float:
    """Tokens the budget has settled, from the response's remaining-budget header."""
    return TOKENS_PER_DAY - float(raw.headers["x-kubetoll-budget-remaining"].split()[0])


# --------------------------------------------------------------------------- non-streaming


async def test_a_good_answer_is_served_by_the_first_step_and_not_escalated(sim, sim2, start_sidecar):
    sc = await start_sidecar(cascade_config(sim, sim2), clock=FakeClock(T0))
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    answer = raw.parse()
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "stop"
    assert raw.headers["x-kubetoll-backend"] == "cheap"
    assert raw.headers["x-kubetoll-cascade"] == "first" and raw.headers["x-kubetoll-cascade-attempts"] == "1"
    assert "x-kubetoll-cascade-escalations" not in raw.headers
    assert chat_calls(sim) == 1 and chat_calls(sim2) == 0

    (rec,) = records(sc)
    u = answer.usage
    assert rec.backend == "cheap" and rec.outcome == "ok" and rec.cascade == "first" and rec.cascade_step == 0
    assert rec.cost_usd == pytest.approx((u.prompt_tokens * 0.5 + u.completion_tokens * 2.0) / 1e6)
    # What the strong backend would have charged for the same tokens: the saving's baseline.
    assert rec.cascade_baseline_usd == pytest.approx((u.prompt_tokens * 5.0 + u.completion_tokens * 20.0) / 1e6)
    assert rec.latency_ms > 0
    assert await spent(sc, raw) == u.total_tokens
    assert_settled_as_recorded(sc, await spent(sc, raw))


CHECK_CASES = [
    # (fault on the cheap backend, extra request arguments, the check that turns its answer down)
    ("answer_length", {}, "length"),
    ("answer_empty", {}, "empty"),
    ("answer_refusal", {}, "refusal"),
    ("answer_bad_json", {"response_format": RESPONSE_FORMAT}, "jsonSchema"),  # parses, misses required keys
    ("answer_bad_json", {"response_format": {"type": "json_object"}}, "jsonSchema"),  # does not parse
    ("answer_bad_tool_args", {"tools": TOOLS, "tool_choice": "required"}, "toolArguments"),
]


@pytest.mark.parametrize(("fault", "extra", "check"), CHECK_CASES, ids=[f"{c[0]}-{c[2]}" for c in CHECK_CASES])
async def test_each_check_escalates_and_the_ledger_holds_both_attempts(sim, sim2, start_sidecar, fault, extra, check):
    sc = await start_sidecar(cascade_config(sim, sim2), clock=FakeClock(T0))
    sim.enqueue_fault(Fault(kind=fault))
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO, **extra)
    answer = raw.parse()
    assert raw.headers["x-kubetoll-backend"] == "strong"
    assert raw.headers["x-kubetoll-cascade"] == "escalated"
    assert raw.headers["x-kubetoll-cascade-attempts"] == "2"
    assert raw.headers["x-kubetoll-cascade-escalations"] == check
    assert chat_calls(sim) == 1 and chat_calls(sim2) == 1
    # The client gets the strong backend's answer, which passes the check the cheap one failed.
    msg = answer.choices[0].message
    assert failed_check(answer.model_dump(), {**extra}, (CascadeCheck(check),)) is None
    if check == "jsonSchema" and extra["response_format"]["type"] == "json_schema":
        jsonschema.validate(json.loads(msg.content), SCHEMA)
    if check == "toolArguments":
        assert json.loads(msg.tool_calls[0].function.arguments)["order_id"]

    rid = raw.headers["x-request-id"]
    by_outcome = {r.outcome: r for r in records(sc, rid)}
    assert set(by_outcome) == {CASCADE_ESCALATED_OUTCOME, "ok"}
    first, served = by_outcome[CASCADE_ESCALATED_OUTCOME], by_outcome["ok"]
    assert (first.backend, first.cascade_step, first.escalation) == ("cheap", 0, check)
    assert first.cost_usd > 0 and first.prompt_tokens > 0  # the cheap call is billed though not served
    assert (served.backend, served.cascade, served.cascade_step) == ("strong", "escalated", 1)
    assert served.cascade_baseline_usd == pytest.approx(served.cost_usd)  # the strong backend answered
    assert totals(records(sc)).requests == 1  # one request, two attempts
    # The client is told what both attempts cost, and the budget settled both.
    cost = float(raw.headers["x-kubetoll-cost-usd"])
    assert cost == pytest.approx(first.cost_usd + served.cost_usd, abs=1e-9)
    assert await spent(sc, raw) == sum(r.prompt_tokens + r.completion_tokens for r in (first, served))
    assert_settled_as_recorded(sc, await spent(sc, raw))
    assert sc.sidecar.metrics.cost.labels("chat", "cheap", "default", "")._value.get() == pytest.approx(first.cost_usd)


async def test_a_good_answer_passes_every_check(sim, sim2, start_sidecar):
    """The same requests without a fault: the cheap backend's answers are served."""
    sc = await start_sidecar(cascade_config(sim, sim2), clock=FakeClock(T0))
    for _, extra, _ in CHECK_CASES:
        raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO, **extra)
        assert raw.headers["x-kubetoll-cascade"] == "first", extra
    assert chat_calls(sim2) == 0
    assert {r.outcome for r in records(sc)} == {"ok"}


async def test_only_the_listed_checks_escalate(sim, sim2, start_sidecar):
    sc = await start_sidecar(cascade_config(sim, sim2, checks=["length"]), clock=FakeClock(T0))
    sim.enqueue_fault(Fault(kind="answer_empty"))
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    assert raw.headers["x-kubetoll-cascade"] == "first" and raw.parse().choices[0].message.content == ""
    sim.enqueue_fault(Fault(kind="answer_length"))
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    assert raw.headers["x-kubetoll-cascade-escalations"] == "length"


async def test_a_step_whose_backends_fail_escalates_and_a_step_falls_back_first(sim, sim2, start_sidecar):
    sc = await start_sidecar(cascade_config(sim, sim2, steps=[["cheap", "cheap-b"]]), clock=FakeClock(T0))
    # Within the step: cheap fails, cheap-b answers well. No escalation.
    sim.enqueue_fault(Fault(status=500))
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    assert raw.headers["x-kubetoll-backend"] == "cheap-b" and raw.headers["x-kubetoll-fallbacks"] == "1"
    assert raw.headers["x-kubetoll-cascade"] == "first" and chat_calls(sim2) == 0
    # The whole step fails: escalated, reason "failed"; failed calls cost nothing, so one record.
    sim.enqueue_fault(Fault(status=500))
    sim.enqueue_fault(Fault(status=503))
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    assert raw.headers["x-kubetoll-backend"] == "strong"
    assert raw.headers["x-kubetoll-cascade-escalations"] == "failed"
    (rec,) = records(sc, raw.headers["x-request-id"])
    assert rec.cascade == "escalated" and rec.backend == "strong"


async def test_a_callers_error_at_a_step_is_not_escalated(sim, sim2, start_sidecar):
    sc = await start_sidecar(cascade_config(sim, sim2), clock=FakeClock(T0))
    sim.enqueue_fault(Fault(status=400))
    with pytest.raises(openai.BadRequestError):
        await sc.openai().chat.completions.create(model="chat", messages=HELLO)
    assert chat_calls(sim2) == 0


async def test_the_last_step_failing_still_bills_the_steps_before(sim, sim2, start_sidecar):
    sc = await start_sidecar(cascade_config(sim, sim2), clock=FakeClock(T0))
    sim.enqueue_fault(Fault(kind="answer_refusal"))
    sim2.enqueue_fault(Fault(status=500))
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/chat/completions", json={"model": "chat", "messages": HELLO}) as resp:
            assert resp.status == 502
            rid = resp.headers["x-request-id"]
    (rec,) = records(sc, rid)
    assert rec.outcome == CASCADE_ESCALATED_OUTCOME and rec.escalation == "refusal" and rec.cost_usd > 0
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    assert_settled_as_recorded(sc, await spent(sc, raw))


async def test_the_reservation_covers_every_step(sim, sim2, start_sidecar):
    """A budget that fits the cheap call but not the cheap and the strong one together refuses up front."""
    cfg = cascade_config(sim, sim2)
    cfg["budgets"] = [{"name": "b", "cap": {"tokensPerDay": 1000}}]
    cfg["routes"][0]["maxOutputTokens"] = 600  # each step reserves its prompt + 600: two steps need over 1200
    sc = await start_sidecar(cfg, clock=FakeClock(T0))
    with pytest.raises(openai.BadRequestError) as exc:
        await sc.openai().chat.completions.create(model="chat", messages=HELLO)
    assert exc.value.code == "exceeds_budget_limit" and chat_calls(sim) == 0
    assert "x-kubetoll-cascade" not in exc.value.response.headers  # refused before any step ran
    cfg["routes"][0]["rules"][0].pop("cascade")
    sc2 = await start_sidecar(cfg, clock=FakeClock(T0))
    assert (await sc2.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO)).headers[
        "x-kubetoll-backend"
    ] == "strong"


async def test_a_step_whose_context_windows_cannot_hold_the_prompt_is_passed_by_unbilled(sim, sim2, start_sidecar):
    """A cheap model with a small window is skipped for a long prompt: no call, no reservation, no 400."""
    cfg = cascade_config(sim, sim2, steps=[["cheap"], ["cheap-b"]])
    cfg["backends"][0]["limits"] = {"contextWindow": 2_000}  # cheap: too small for the long prompt
    cfg["backends"][1]["limits"] = {"contextWindow": 2_000}  # cheap-b: too
    cfg["routes"][0]["maxOutputTokens"] = 200
    sc = await start_sidecar(cfg, clock=FakeClock(T0))
    long = [{"role": "user", "content": "Please summarise this ticket history. " + "The order was late again. " * 400}]
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=long)
    assert raw.headers["x-kubetoll-backend"] == "strong"
    assert raw.headers["x-kubetoll-cascade"] == "escalated"
    assert raw.headers["x-kubetoll-cascade-escalations"] == "context_window,context_window"
    assert raw.headers["x-kubetoll-cascade-attempts"] == "1"  # only the strong step was called
    assert chat_calls(sim) == 0 and chat_calls(sim2) == 1
    (rec,) = records(sc)  # no escalated step's spend: nothing was sent
    assert rec.backend == "strong" and rec.cascade == "escalated" and rec.cascade_step == 2
    assert_settled_as_recorded(sc, await spent(sc, raw))
    # A short prompt still goes to the first step.
    short = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    assert short.headers["x-kubetoll-backend"] == "cheap" and short.headers["x-kubetoll-cascade"] == "first"


# --------------------------------------------------------------------------- streams


async def test_streams_skip_the_cascade_by_default(sim, sim2, start_sidecar):
    sc = await start_sidecar(cascade_config(sim, sim2), clock=FakeClock(T0))
    async with sc.openai().chat.completions.with_streaming_response.create(
        model="chat", messages=HELLO, stream=True
    ) as resp:
        assert resp.headers["x-kubetoll-cascade"] == "skipped" and resp.headers["x-kubetoll-backend"] == "strong"
        text = "".join([c.choices[0].delta.content or "" async for c in await resp.parse() if c.choices])
    assert text and chat_calls(sim) == 0
    (rec,) = records(sc)
    assert rec.cascade == "" and rec.backend == "strong"


async def test_buffered_streams_are_checked_before_anything_is_sent(sim, sim2, start_sidecar):
    sc = await start_sidecar(cascade_config(sim, sim2, streams="buffer"), clock=FakeClock(T0))
    client = sc.openai()
    # A good cheap answer: buffered, then sent whole; the SDK reads it as any stream.
    plain = (await client.chat.completions.create(model="chat", messages=HELLO)).choices[0].message.content
    async with client.chat.completions.with_streaming_response.create(
        model="chat", messages=HELLO, stream=True, stream_options={"include_usage": True}
    ) as resp:
        assert resp.headers["x-kubetoll-cascade"] == "first" and resp.headers["x-kubetoll-backend"] == "cheap"
        rid = resp.headers["x-request-id"]
        chunks = [c async for c in await resp.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert chunks[-1].usage is not None and chat_calls(sim2) == 0
    (rec,) = records(sc, rid)
    assert (rec.backend, rec.cascade, rec.outcome) == ("cheap", "first", "ok")
    assert rec.completion_tokens == chunks[-1].usage.completion_tokens  # the provider's usage, from the stream
    # A refusal: nothing of it reaches the client; the strong backend's stream does.
    sim.enqueue_fault(Fault(kind="answer_refusal"))
    async with client.chat.completions.with_streaming_response.create(
        model="chat", messages=HELLO, stream=True
    ) as resp:
        assert resp.headers["x-kubetoll-cascade"] == "escalated"
        assert resp.headers["x-kubetoll-cascade-escalations"] == "refusal"
        rid = resp.headers["x-request-id"]
        got = [c async for c in await resp.parse()]
    assert not any(c.choices and c.choices[0].delta.refusal for c in got)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == plain  # same question, same answer
    by_outcome = {r.outcome: r for r in records(sc, rid)}
    assert set(by_outcome) == {CASCADE_ESCALATED_OUTCOME, "ok"}
    assert by_outcome[CASCADE_ESCALATED_OUTCOME].completion_tokens > 0  # the refusal's tokens, billed
    assert by_outcome["ok"].backend == "strong"
    # A cheap stream cut short is a failed step: escalated, billed for what it sent.
    sim.enqueue_fault(Fault(kind="cut_stream", after_chunks=3))
    async with client.chat.completions.with_streaming_response.create(
        model="chat", messages=HELLO, stream=True
    ) as resp:
        assert resp.headers["x-kubetoll-cascade-escalations"] == "failed"
        assert "".join([c.choices[0].delta.content or "" async for c in await resp.parse() if c.choices]) == plain


# --------------------------------------------------------------------------- the checks on their own


def chat_body(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}]}


ALL = tuple(CascadeCheck)


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that.",
        "I’m sorry, but I can’t assist with that request.",  # curly apostrophes
        "Sorry, I cannot help with this.",
        "I am unable to comply with that.",
        "I'm not able to provide that information.",
        "I apologize, but I won't help with that.",
    ],
)
def test_stock_refusals_are_recognised(text):
    assert is_stock_refusal(text)
    assert failed_check(chat_body({"content": text}), {}, ALL) == "refusal"


@pytest.mark.parametrize(
    "text",
    [
        "To reset your password, open Settings and choose Security.",
        "I can't wait to help! " + "Here is how: open Settings. " * 20,  # long: an answer, whatever its opening
        "I'm sorry for the delay. Your parcel ships tomorrow.",
        "You can't help with that alone; ask your admin to reset it.",
        "Lo siento, no puedo ayudar con eso.",  # not English: not recognised (documented)
    ],
)
def test_answers_are_not_refusals(text):
    assert not is_stock_refusal(text)
    assert failed_check(chat_body({"content": text}), {}, ALL) is None


def test_the_checks_read_every_choice_and_report_in_order():
    good = {"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}
    cut = {"index": 1, "message": {"role": "assistant", "content": ""}, "finish_reason": "length"}
    body = {"choices": [good, cut]}
    assert failed_check(body, {}, ALL) == "length"
    assert failed_check(body, {}, (CascadeCheck.empty, CascadeCheck.length)) == "empty"
    assert failed_check({"choices": []}, {}, ALL) == "empty"
    assert failed_check({"choices": []}, {}, (CascadeCheck.length,)) is None
    # Content parts count as text; a structured refusal is a refusal, not an empty answer.
    assert failed_check(chat_body({"content": [{"type": "text", "text": "ok"}]}), {}, ALL) is None
    assert failed_check(chat_body({"content": None, "refusal": "no"}), {}, (CascadeCheck.empty,)) is None


def test_json_schema_and_tool_argument_checks():
    fmt = {"response_format": RESPONSE_FORMAT}
    assert failed_check(chat_body({"content": '{"city": "Oslo", "days": 3}'}), fmt, ALL) is None
    assert failed_check(chat_body({"content": '{"city": "Oslo", "days": "3"}'}), fmt, ALL) == "jsonSchema"
    assert failed_check(chat_body({"content": '{"city": "Oslo"'}), fmt, ALL) == "jsonSchema"
    # A schema jsonschema cannot use judges nothing.
    broken = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}}
    assert failed_check(chat_body({"content": "not json"}), broken, ALL) is None
    # A remote $ref is never fetched: no verdict, the answer passes.
    remote = {"$ref": "https://example.invalid/schema.json"}
    fmt_remote = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": remote}}}
    assert failed_check(chat_body({"content": "{}"}), fmt_remote, ALL) is None

    def call(name: str, args: str) -> dict[str, Any]:
        return {
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": name, "arguments": args}}],
        }

    tools = {"tools": TOOLS}
    assert failed_check(chat_body(call("lookup_order", '{"order_id": "1"}'), "tool_calls"), tools, ALL) is None
    assert failed_check(chat_body(call("lookup_order", '{"order_id": '), "tool_calls"), tools, ALL) == "toolArguments"
    assert failed_check(chat_body(call("lookup_order", "[1]"), "tool_calls"), tools, ALL) == "toolArguments"
    assert failed_check(chat_body(call("drop_tables", "{}"), "tool_calls"), tools, ALL) == "toolArguments"
    # A tool call is not held to the text answer's schema.
    assert (
        failed_check(chat_body(call("lookup_order", '{"order_id": "1"}'), "tool_calls"), {**tools, **fmt}, ALL) is None
    )


@pytest.mark.parametrize(
    ("header", "extra", "check"),
    [
        ("length", {}, "length"),
        ("empty", {}, "empty"),
        ("refusal", {}, "refusal"),
        ("bad_json", {"response_format": RESPONSE_FORMAT}, "jsonSchema"),
        ("bad_tool_args", {"tools": TOOLS, "tool_choice": "required"}, "toolArguments"),
    ],
)
async def test_the_simulators_bad_answers_fail_the_check_they_are_for(sim, header, extra, check):
    """The x-sim-fault names, straight to the simulator: each bad answer fails its check and only that one."""
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key=sim.settings.api_key, max_retries=0)
    answer = await client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, extra_headers={"x-sim-fault": header}, **extra
    )
    body, request = answer.model_dump(), {"messages": HELLO, **extra}
    assert failed_check(body, request, ALL) == check
    assert failed_check(body, request, tuple(c for c in CascadeCheck if c.value != check)) is None
    good = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, **extra)
    assert failed_check(good.model_dump(), request, ALL) is None


# --------------------------------------------------------------------------- config and compiler


_LOADS_JSONSCHEMA = """
import json, sys
from kubetoll_core.router_config import RouterConfig
from kubetoll_sidecar.routing import Router
Router(RouterConfig.model_validate(json.loads(sys.argv[1])), {})
print("jsonschema" in sys.modules)
"""


@pytest.mark.parametrize(("checks", "loaded"), [(["length", "empty", "refusal", "toolArguments"], False), (None, True)])
def test_jsonschema_is_loaded_only_by_a_config_that_uses_the_check(sim, sim2, checks, loaded):
    """Another process, so that nothing this one imported counts: a sidecar without the check never loads it."""
    cfg = cascade_config(sim, sim2, **({"checks": checks} if checks else {}))  # no checks given: all of them
    out = subprocess.run([sys.executable, "-c", _LOADS_JSONSCHEMA, json.dumps(cfg)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(loaded)


def test_the_router_config_refuses_unknown_backends_in_a_cascade(sim, sim2):
    cfg = cascade_config(sim, sim2, steps=[["cheap"], ["nope"]])
    with pytest.raises(ValueError, match=r"rules\[0\]\.cascade\.steps\[1\]\.backends\[0\]: unknown backend 'nope'"):
        RouterConfig.model_validate(cfg)


def _resources(route_spec: dict[str, Any]) -> list[dict[str, Any]]:
    def mb(name: str, model: str) -> dict[str, Any]:
        return {
            "apiVersion": "kubetoll.dev/v1alpha1",
            "kind": "ModelBackend",
            "metadata": {"name": name},
            "spec": {
                "provider": "openai-compatible",
                "model": model,
                "endpoint": "http://llm.example:8000/v1",
                "pricing": {"inputPerMTok": 1, "outputPerMTok": 2},
            },
        }

    route = {"apiVersion": "kubetoll.dev/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "chat"}}
    return [mb("small", "s"), mb("big", "b"), {**route, "spec": route_spec}]


def test_the_compiler_drops_cascade_steps_that_resolve_nothing():
    spec = {
        "rules": [
            {
                "backends": ["big"],
                "cascade": {"steps": [{"backends": ["gone"]}, {"backends": ["small", "missing"]}], "streams": "buffer"},
            }
        ]
    }
    result = compile_namespace("ns", _resources(spec))
    assert result.ok
    (route,) = result.config.routes
    cascade = route.rules[0].cascade
    assert cascade is not None and [s.backends for s in cascade.steps] == [["small"]]
    assert cascade.streams.value == "buffer" and list(cascade.checks) == list(CascadeCheck)
    reasons = {(p.reason, p.field) for p in result.problems}
    assert ("CascadeStepDropped", "spec.rules[0].cascade.steps[0].backends") in reasons
    assert ("BackendNotFound", "spec.rules[0].cascade.steps[1].backends[1]") in reasons
    outcome = result.outcomes[("ModelRoute", "chat")]
    assert outcome.details["firstBackend"] == "small" and outcome.details["backends"] == ["small", "big"]

    spec["rules"][0]["cascade"]["steps"] = [{"backends": ["gone"]}]
    result = compile_namespace("ns", _resources(spec))
    assert result.config.routes[0].rules[0].cascade is None
    assert "CascadeDropped" in {p.reason for p in result.problems}


# --------------------------------------------------------------------------- the report


def test_the_report_shows_the_escalation_rate_and_the_savings():
    def rec(rid: str, **kw: Any) -> SpendRecord:
        return SpendRecord(
            time=T0,
            namespace="ns",
            route="chat",
            tenant="t",
            tier="default",
            prompt_tokens=10,
            completion_tokens=10,
            cached_tokens=0,
            request_id=rid,
            **kw,
        )

    recs = [
        rec("a", backend="cheap", cost_usd=0.001, cascade="first", cascade_baseline_usd=0.01),
        rec("b", backend="cheap", cost_usd=0.001, outcome=CASCADE_ESCALATED_OUTCOME, escalation="length"),
        rec("b", backend="strong", cost_usd=0.01, cascade="escalated", cascade_step=1, cascade_baseline_usd=0.01),
        rec("c", backend="strong", cost_usd=0.01),  # not cascaded
    ]
    c = cascade_summary(recs)
    assert c is not None
    assert (c["cascaded"], c["escalated"], c["escalation_rate"]) == (2, 1, 0.5)
    assert c["baseline_usd"] == pytest.approx(0.02) and c["actual_usd"] == pytest.approx(0.012)
    assert c["saved_usd"] == pytest.approx(0.008) and c["saved_percent"] == pytest.approx(40.0)
    low, high = c["escalation_rate_ci95"]
    assert 0 < low < 0.5 < high < 1
    assert cascade_summary(recs[-1:]) is None
