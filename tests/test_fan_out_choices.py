"""`n` on a backend without it (Anthropic): n upstream calls, merged, and billed as n calls.

Through a running sidecar with the official `openai` SDK against the simulated
Anthropic upstream (`kubetoll_tools.simulator`): choices in order with the usage
summed and the ledger's spend equal to the simulator's usage priced call by call;
a stream of n choices the SDK accumulates by index, with one usage chunk summing
all; one failing call fails (or falls back) the whole request while what the
others spent is still settled and recorded once; more choices than
`MAX_FAN_OUT` is a 400; the reservation covers n outputs and, on a backend that
fans out, n prompts.
"""

from __future__ import annotations

import aiohttp
import openai
import pytest

from kubetoll_core.periods import FakeClock
from kubetoll_core.spend_record import FAN_OUT_ABANDONED_OUTCOME, SpendRecord
from kubetoll_sidecar.forwarder import merge_choices
from kubetoll_sidecar.providers.anthropic import AnthropicTranslator
from kubetoll_sidecar.providers.base import MAX_FAN_OUT, Usage, upstream_calls
from kubetoll_sidecar.providers.openai import OpenAITranslator
from kubetoll_tools.simulator import Fault, RecordedRequest, anthropic_prompt_tokens
from kubetoll_tools.spend import totals
from support.harness import RunningSidecar, base_config

T0 = 1_790_000_000.0
CLAUDE_MODEL = "claude-haiku-4-5"
# Round prices, so an expected cost is easy to state: USD per token.
INPUT_USD, OUTPUT_USD = 1e-6, 5e-6
HELLO = [{"role": "user", "content": "hello"}]


def claude(sim) -> dict[str, object]:
    return {
        "name": "claude",
        "provider": "anthropic",
        "model": CLAUDE_MODEL,
        "endpoint": sim.url,
        "credentials": {"env": "KT_TEST_OPENAI_KEY"},  # the simulator's key, whatever it speaks
        "pricing": {"inputPerMTok": INPUT_USD * 1e6, "outputPerMTok": OUTPUT_USD * 1e6},
        "timeouts": {"connect": 1, "firstToken": 2, "total": 5},
    }


def gpt(sim) -> dict[str, object]:
    return {
        "name": "gpt",
        "provider": "openai",
        "model": "gpt-4o",
        "endpoint": sim.url + "/v1",
        "credentials": {"env": "KT_TEST_OPENAI_KEY"},
        "pricing": {"inputPerMTok": 2.0, "outputPerMTok": 8.0},
        "timeouts": {"connect": 1, "firstToken": 2, "total": 5},
    }


def config(backends: list[dict[str, object]], chain: list[str], **extra: object) -> dict[str, object]:
    cfg = base_config("http://unused")
    cfg["backends"] = backends
    cfg["routes"] = [{"name": "chat", "rules": [{"backends": chain}]}]
    cfg.update(extra)
    return cfg


def messages_calls(sim) -> list[RecordedRequest]:
    return [r for r in sim.requests if r.path == "/v1/messages"]


def sim_usage(sim, call: RecordedRequest) -> Usage:
    """What the simulator bills for one Messages call: its prompt counted as Anthropic would, and
    its answer (the natural length unless max_tokens cuts it)."""
    prompt = anthropic_prompt_tokens(call.body, CLAUDE_MODEL)
    return Usage(prompt, min(sim.settings.completion_tokens, int(call.body["max_tokens"])))


def priced(u: Usage) -> float:
    return u.prompt_tokens * INPUT_USD + u.completion_tokens * OUTPUT_USD


def records(sc: RunningSidecar, request_id: str | None = None) -> list[SpendRecord]:
    assert sc.sidecar is not None
    got = [r for r in sc.sidecar.ledger.records() if not r.refusal]
    return [r for r in got if r.request_id == request_id] if request_id else got


# --------------------------------------------------------------------------- non-streaming


@pytest.mark.parametrize("n", [2, 3])
async def test_n_choices_are_n_calls_merged_in_order_with_usage_and_spend_summed(sim, start_sidecar, n):
    sc = await start_sidecar(config([claude(sim)], ["claude"]))
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO, n=n)
    r = raw.parse()

    calls = messages_calls(sim)
    assert len(calls) == n
    assert all("n" not in c.body for c in calls)  # Anthropic has no `n`: each call asks for one answer
    assert [c.index for c in r.choices] == list(range(n))
    assert all(c.finish_reason == "stop" and c.message.content for c in r.choices)

    each = [sim_usage(sim, c) for c in calls]
    assert r.usage.prompt_tokens == sum(u.prompt_tokens for u in each)  # each call billed the prompt
    assert r.usage.completion_tokens == sum(u.completion_tokens for u in each)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    (rec,) = records(sc)
    assert rec.backend == "claude" and rec.outcome == "ok"
    assert (rec.prompt_tokens, rec.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    assert rec.cost_usd == pytest.approx(sum(priced(u) for u in each))
    assert float(raw.headers["x-kubetoll-cost-usd"]) == pytest.approx(rec.cost_usd, abs=1e-9)


async def test_up_to_the_bound_is_served_and_beyond_it_is_a_400_in_openai_format(sim, start_sidecar):
    sc = await start_sidecar(config([claude(sim)], ["claude"]))
    client = sc.openai()
    r = await client.chat.completions.create(model="chat", messages=HELLO, n=MAX_FAN_OUT)
    assert [c.index for c in r.choices] == list(range(MAX_FAN_OUT)) and len(messages_calls(sim)) == MAX_FAN_OUT

    sim.reset()
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(model="chat", messages=HELLO, n=MAX_FAN_OUT + 1)
    err = exc.value.body
    assert err["type"] == "invalid_request_error" and err["code"] == "unsupported_by_route" and err["param"] == "n"
    assert f"n > {MAX_FAN_OUT}" in err["message"] and "claude (anthropic)" in err["message"]
    assert sim.requests == []  # refused before anything was reserved or sent


async def test_beyond_the_bound_a_backend_with_n_later_in_the_chain_serves_it(sim, sim2, start_sidecar):
    sc = await start_sidecar(config([claude(sim), gpt(sim2)], ["claude", "gpt"]))
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO, n=MAX_FAN_OUT + 1)
    assert raw.headers["x-kubetoll-backend"] == "gpt" and len(raw.parse().choices) == MAX_FAN_OUT + 1
    assert sim.requests == []  # claude was skipped (unsupported), not asked
    assert sc.sidecar.metrics.fallbacks.labels("chat", "claude", "unsupported")._value.get() == 1


def test_which_backends_fan_out_and_how_far():
    """Decided by what the translator declares, not by the provider's name."""
    assert upstream_calls(AnthropicTranslator.capabilities, 1) == 1
    assert upstream_calls(AnthropicTranslator.capabilities, 3) == 3
    assert upstream_calls(AnthropicTranslator.capabilities, MAX_FAN_OUT) == MAX_FAN_OUT
    assert upstream_calls(AnthropicTranslator.capabilities, MAX_FAN_OUT + 1) is None
    assert upstream_calls(OpenAITranslator.capabilities, 100) == 1  # OpenAI has `n`: one call


def test_merged_choices_keep_each_calls_own_finish_reason():
    """The simulator answers the same request the same way, so distinct finishes are shown here."""
    bodies = [
        {
            "id": f"chatcmpl-{i}",
            "object": "chat.completion",
            "model": CLAUDE_MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": i + 1, "total_tokens": 11 + i},
        }
        for i, (text, finish) in enumerate([("a", "stop"), ("b", "length"), ("c", "tool_calls")])
    ]
    usages = [Usage(10, 1), Usage(10, 2, cached_tokens=4), Usage(10, 3)]
    merged = merge_choices(bodies, usages)
    assert merged["id"] == "chatcmpl-0"
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in merged["choices"]] == [
        (0, "a", "stop"),
        (1, "b", "length"),
        (2, "c", "tool_calls"),
    ]
    assert merged["usage"] == {
        "prompt_tokens": 30,
        "completion_tokens": 6,
        "total_tokens": 36,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    # A call whose usage was counted, not reported: the answer does not present an estimate as the provider's.
    assert "usage" not in merge_choices(bodies, [Usage(10, 1), Usage(10, 2, reported=False), Usage(10, 3)])


# --------------------------------------------------------------------------- streaming


async def test_a_stream_of_n_choices_accumulates_by_index_and_sums_the_usage(sim, start_sidecar):
    sim.settings.chunk_interval_ms = 2  # the parts' chunks arrive interleaved
    sc = await start_sidecar(config([claude(sim)], ["claude"]))
    seen: list[int] = []
    usage_chunks = []
    async with sc.openai().chat.completions.stream(
        model="chat", messages=HELLO, n=2, stream_options={"include_usage": True}
    ) as stream:
        async for event in stream:
            if event.type == "chunk":
                seen.extend(c.index for c in event.chunk.choices)
                if event.chunk.usage is not None:
                    usage_chunks.append(event.chunk)
        final = await stream.get_final_completion()

    calls = messages_calls(sim)
    assert len(calls) == 2 and all(c.body.get("stream") is True and "n" not in c.body for c in calls)
    assert set(seen) == {0, 1}
    assert [c.index for c in final.choices] == [0, 1]
    assert all(c.finish_reason == "stop" and c.message.content for c in final.choices)
    # The same request gets the same answer from the simulator: each choice holds one whole answer.
    assert final.choices[0].message.content == final.choices[1].message.content

    each = [sim_usage(sim, c) for c in calls]
    (last,) = usage_chunks  # one usage chunk, the last, with no choices
    assert last.choices == [] and final.usage is not None
    assert last.usage.prompt_tokens == sum(u.prompt_tokens for u in each)
    assert last.usage.completion_tokens == sum(u.completion_tokens for u in each)

    (rec,) = records(sc)
    assert rec.outcome == "ok" and rec.prompt_tokens == last.usage.prompt_tokens
    assert rec.completion_tokens == last.usage.completion_tokens
    assert rec.cost_usd == pytest.approx(sum(priced(u) for u in each))


async def test_a_stream_without_include_usage_sends_no_usage_chunk_and_is_still_billed(sim, start_sidecar):
    sc = await start_sidecar(config([claude(sim)], ["claude"]))
    stream = await sc.openai().chat.completions.create(model="chat", messages=HELLO, n=3, stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None and c.choices for c in chunks)
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    each = [sim_usage(sim, c) for c in messages_calls(sim)]
    (rec,) = records(sc)
    assert rec.completion_tokens == sum(u.completion_tokens for u in each)
    assert rec.cost_usd == pytest.approx(sum(priced(u) for u in each))


async def test_a_stream_one_of_whose_calls_is_cut_ends_with_the_cut_event_and_bills_both(sim, start_sidecar):
    sc = await start_sidecar(config([claude(sim)], ["claude"]))
    sim.enqueue_fault(Fault(kind="cut_stream", after_chunks=3))  # message_start, block start, ping; no text
    stream = await sc.openai().chat.completions.create(model="chat", messages=HELLO, n=2, stream=True)
    with pytest.raises(openai.APIError) as exc:
        [c async for c in stream]
    assert exc.value.code == "upstream_stream_cut"
    calls = messages_calls(sim)
    (rec,) = records(sc)
    assert rec.outcome == "cut_stream"
    # Both calls billed their prompt (each from its message_start) and what they sent.
    assert rec.prompt_tokens == sum(sim_usage(sim, c).prompt_tokens for c in calls)
    assert rec.cost_usd == pytest.approx(rec.prompt_tokens * INPUT_USD + rec.completion_tokens * OUTPUT_USD)


# --------------------------------------------------------------------------- one call fails


async def test_one_failing_call_fails_the_request_and_the_completed_calls_are_billed(sim, start_sidecar):
    budget = {"name": "b", "cap": {"tokensPerDay": 1_000_000}}
    sc = await start_sidecar(config([claude(sim)], ["claude"], budgets=[budget]), clock=FakeClock(T0))
    sim.enqueue_fault(Fault(status=500))  # the first of the two calls to arrive
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/chat/completions", json={"model": "chat", "messages": HELLO, "n": 2}) as resp:
            assert resp.status == 502
            body = await resp.json()
            request_id = resp.headers["x-request-id"]
    assert body["error"]["code"] == "all_backends_failed" and "(n=2)" in body["error"]["message"]
    calls = messages_calls(sim)
    assert len(calls) == 2

    # The call that completed is billed on its backend, once, and is not counted as a request.
    (rec,) = records(sc, request_id)
    done = sim_usage(sim, calls[1])  # both calls sent the same body: either one is the one that completed
    assert rec.outcome == FAN_OUT_ABANDONED_OUTCOME and rec.backend == "claude"
    assert (rec.prompt_tokens, rec.completion_tokens) == (done.prompt_tokens, done.completion_tokens)
    assert rec.cost_usd == pytest.approx(priced(done))
    assert totals(records(sc)).requests == 0 and totals(records(sc)).cost_usd == pytest.approx(priced(done))
    assert sc.sidecar.metrics.cost.labels("chat", "claude", "default", "")._value.get() == pytest.approx(priced(done))

    # ... and settled against the budget: the next request sees it spent, and nothing more.
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    remaining = float(raw.headers["x-kubetoll-budget-remaining"].split()[0])
    one = sim_usage(sim, messages_calls(sim)[-1])
    assert remaining == 1_000_000 - done.total_tokens - one.total_tokens


async def test_one_failing_call_falls_back_as_one_request(sim, sim2, start_sidecar):
    sc = await start_sidecar(config([claude(sim), gpt(sim2)], ["claude", "gpt"]))
    sim.enqueue_fault(Fault(status=529))
    raw = await sc.openai().chat.completions.with_raw_response.create(model="chat", messages=HELLO, n=2)
    r = raw.parse()
    assert raw.headers["x-kubetoll-backend"] == "gpt" and raw.headers["x-kubetoll-fallbacks"] == "1"
    assert [c.index for c in r.choices] == [0, 1]
    assert len(messages_calls(sim)) == 2 and len(sim2.requests) == 1 and sim2.requests[0].body["n"] == 2
    assert sc.sidecar.metrics.fallbacks.labels("chat", "claude", "serverError")._value.get() == 1

    rid = raw.headers["x-request-id"]
    by_outcome = {rec.outcome: rec for rec in records(sc, rid)}
    assert set(by_outcome) == {"ok", FAN_OUT_ABANDONED_OUTCOME}
    answer, abandoned = by_outcome["ok"], by_outcome[FAN_OUT_ABANDONED_OUTCOME]
    assert answer.backend == "gpt" and answer.prompt_tokens == r.usage.prompt_tokens
    done = sim_usage(sim, messages_calls(sim)[1])
    assert abandoned.backend == "claude" and abandoned.cost_usd == pytest.approx(priced(done))
    assert abandoned.prompt_tokens == done.prompt_tokens
    assert totals(records(sc)).requests == 1  # one request, whatever it cost on the way
    # The cost the client is told is all of it: the answer and the abandoned call.
    assert float(raw.headers["x-kubetoll-cost-usd"]) == pytest.approx(answer.cost_usd + abandoned.cost_usd, abs=1e-9)


async def test_a_stream_whose_one_call_fails_before_any_data_fails_as_one_and_bills_the_other(sim, start_sidecar):
    sc = await start_sidecar(config([claude(sim)], ["claude"]))
    sim.enqueue_fault(Fault(status=500))
    with pytest.raises(openai.InternalServerError) as exc:
        stream = await sc.openai().chat.completions.create(model="chat", messages=HELLO, n=2, stream=True)
        [c async for c in stream]
    assert exc.value.status_code == 502  # before the first byte: an HTTP error, not a cut stream
    calls = messages_calls(sim)
    assert len(calls) == 2
    (rec,) = records(sc)
    # The stream that opened was closed: billed for its prompt (from message_start) and what it sent.
    assert rec.outcome == FAN_OUT_ABANDONED_OUTCOME
    assert rec.prompt_tokens == sim_usage(sim, calls[1]).prompt_tokens
    assert 1 <= rec.completion_tokens <= sim.settings.completion_tokens
    assert rec.cost_usd == pytest.approx(rec.prompt_tokens * INPUT_USD + rec.completion_tokens * OUTPUT_USD)


async def test_a_client_error_on_one_call_passes_through_and_the_other_is_billed(sim, sim2, start_sidecar):
    sc = await start_sidecar(config([claude(sim), gpt(sim2)], ["claude", "gpt"]))
    sim.enqueue_fault(Fault(status=400))
    with pytest.raises(openai.BadRequestError):
        await sc.openai().chat.completions.create(model="chat", messages=HELLO, n=2)
    assert not sim2.requests  # a caller's error is not fallen back from
    (rec,) = records(sc)
    assert rec.outcome == FAN_OUT_ABANDONED_OUTCOME and rec.backend == "claude"


# --------------------------------------------------------------------------- the reservation


async def test_the_reservation_covers_n_outputs(sim, start_sidecar):
    budget = {"name": "b", "cap": {"tokensPerDay": 500}}
    sc = await start_sidecar(config([claude(sim)], ["claude"], budgets=[budget]), clock=FakeClock(T0))
    client = sc.openai()
    assert len((await client.chat.completions.create(model="chat", messages=HELLO, n=2, max_tokens=200)).choices) == 2
    sim.reset()
    with pytest.raises(openai.BadRequestError) as exc:  # 3 x 200 output tokens can never fit in 500
        await client.chat.completions.create(model="chat", messages=HELLO, n=3, max_tokens=200)
    assert exc.value.body["code"] == "exceeds_budget_limit" and sim.requests == []


async def test_the_reservation_counts_the_prompt_once_per_call_only_where_calls_fan_out(sim, sim2, start_sidecar):
    long_prompt = [{"role": "user", "content": "hello " * 200}]  # ~200 prompt tokens
    budget = {"name": "b", "cap": {"tokensPerDay": 500}}
    # Anthropic: 4 calls bill the prompt 4 times (~800 tokens + output), more than the whole day's 500.
    sc = await start_sidecar(config([claude(sim)], ["claude"], budgets=[budget]), clock=FakeClock(T0))
    with pytest.raises(openai.BadRequestError) as exc:
        await sc.openai().chat.completions.create(model="chat", messages=long_prompt, n=4, max_tokens=10)
    assert exc.value.body["code"] == "exceeds_budget_limit" and sim.requests == []
    # One call of 4 choices (OpenAI has `n`) bills it once: ~200 + 40 fits.
    sc2 = await start_sidecar(config([gpt(sim2)], ["gpt"], budgets=[budget]), clock=FakeClock(T0))
    r = await sc2.openai().chat.completions.create(model="chat", messages=long_prompt, n=4, max_tokens=10)
    assert len(r.choices) == 4
