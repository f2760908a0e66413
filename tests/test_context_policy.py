"""Context policies, the pure parts: grouping, the kept tail, dropOldest, the summary plan, the digest.

Each message's cost is given (as the pipeline gives tiktoken's per-message share), so the
arithmetic is exact; the end-to-end behaviour is in test_context_policy_sidecar.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubetoll_core.enums import ContextOverflow
from kubetoll_core.parts import ContextPolicy
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import Backend
from kubetoll_sidecar.context_policy import (
    SUMMARY_PREFIX,
    ContextPolicies,
    DoesNotFit,
    SummaryStore,
    drop_oldest,
    header,
    prefix_digest,
    summary_plan,
    tail_start,
    transcript,
    units,
    with_summary,
    within_windows,
)


def msg(role: str, content: str = "x", **kw: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **kw}


CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}

CONVO = [
    msg("system", "s"),  # 0
    msg("user", "u1"),  # 1
    msg("assistant", "", tool_calls=[CALL]),  # 2
    msg("tool", "r1", tool_call_id="call_1"),  # 3
    msg("tool", "r2", tool_call_id="call_2"),  # 4
    msg("assistant", "a1"),  # 5
    msg("user", "u2"),  # 6
    msg("assistant", "a2"),  # 7
    msg("user", "u3"),  # 8
]


def test_units_keep_a_tool_call_with_its_results() -> None:
    assert units(CONVO) == [[0], [1], [2, 3, 4], [5], [6], [7], [8]]


def test_the_kept_tail_never_starts_inside_a_tool_group() -> None:
    assert tail_start(CONVO, 2) == 7
    # The last 6 messages start at a tool result (index 3): the tail moves back to its call.
    assert tail_start(CONVO, 6) == 2
    assert tail_start(CONVO, 0) == len(CONVO)
    assert tail_start(CONVO, 100) == 0


def test_drop_oldest_drops_whole_groups_oldest_first() -> None:
    costs = [10] * len(CONVO)
    # 9 messages at 10 + base 5 = 95; a limit of 60 needs 4 messages gone: u1, then the tool group (3).
    kept = drop_oldest(CONVO, costs, 5, 60, keep_system=True, keep_last=2)
    assert kept == [CONVO[0], CONVO[5], CONVO[6], CONVO[7], CONVO[8]]
    assert 5 + 10 * len(kept) <= 60


def test_drop_oldest_never_splits_a_tool_pair_even_when_one_message_would_do() -> None:
    costs = [10, 10, 10, 1, 1, 10, 10, 10, 10]
    # 72 + base 0 over 55: u1 (10) is not enough, the whole tool group goes (12), never the call alone.
    kept = drop_oldest(CONVO, costs, 0, 55, keep_system=True, keep_last=2)
    assert [m["role"] for m in kept].count("tool") == 0
    assert not any(m.get("tool_calls") for m in kept)


def test_drop_oldest_keeps_system_messages_unless_told() -> None:
    costs = [10] * len(CONVO)
    kept = drop_oldest(CONVO, costs, 0, 20, keep_system=False, keep_last=2)
    assert kept == [CONVO[7], CONVO[8]]
    with pytest.raises(DoesNotFit) as exc:
        drop_oldest(CONVO, costs, 0, 20, keep_system=True, keep_last=2)
    assert exc.value.kept == 30 and exc.value.limit == 20 and exc.value.estimate == 90
    assert "about 90 tokens" in str(exc.value) and "allows 20" in str(exc.value)


def test_drop_oldest_leaves_a_prompt_that_fits_alone() -> None:
    assert drop_oldest(CONVO, [1] * len(CONVO), 0, 100, True, 2) == CONVO


def test_summary_plan_and_with_summary() -> None:
    replaced = summary_plan(CONVO, keep_system=True, keep_last=3)
    assert replaced == [1, 2, 3, 4, 5]
    out = with_summary(CONVO, replaced, " the user asked about an order ")
    assert out[0] == CONVO[0]
    assert out[1] == {"role": "system", "content": SUMMARY_PREFIX + "the user asked about an order"}
    assert out[2:] == CONVO[6:]
    # Without keepSystem the system message is summarized with the rest.
    assert summary_plan(CONVO, keep_system=False, keep_last=3) == [0, 1, 2, 3, 4, 5]
    assert summary_plan(CONVO, keep_system=True, keep_last=100) == []


def test_the_digest_is_canonical_and_names_the_summarizer() -> None:
    a = [{"role": "user", "content": "hi", "name": "bob"}]
    b = [{"name": "bob", "content": "hi", "role": "user"}]  # the same message, keys in another order
    assert prefix_digest(a, "mini", "gpt-4o-mini") == prefix_digest(b, "mini", "gpt-4o-mini")
    assert prefix_digest(a, "mini", "gpt-4o-mini") != prefix_digest(a, "other", "gpt-4o-mini")
    assert prefix_digest(a, "mini", "gpt-4o-mini") != prefix_digest(a + a, "mini", "gpt-4o-mini")
    key = RedisKeys("team-a").context_summary(prefix_digest(a, "mini", "gpt-4o-mini"))
    assert key.startswith("kt:{team-a}:ctxsum:")
    with pytest.raises(ValueError):
        RedisKeys("team-a").context_summary("not-a-digest")


def test_transcript_shows_tool_calls() -> None:
    text = transcript(CONVO[1:4])
    assert text.startswith("user: u1")
    assert '"name":"lookup"' in text and "tool: r1" in text


def test_header_values() -> None:
    assert header("dropped", 12) == "dropped;saved=12"
    assert header("summarized", 900) == "summarized;saved=900"
    assert header("summary_failed", 5) == "dropped;saved=5;summary=failed"


def test_within_windows() -> None:
    def b(name: str, window: int | None) -> Backend:
        return Backend.model_validate(
            {
                "name": name,
                "provider": "openai",
                "model": "gpt-4o",
                "endpoint": "http://x/v1",
                "limits": {"contextWindow": window} if window else {},
            }
        )

    chain = [b("small", 1000), b("none", None), b("big", 8000)]
    assert within_windows(chain, 900, 200) == ["none", "big"]
    assert within_windows(chain, 700, 200) == ["small", "none", "big"]


def test_the_policy_model_and_its_rule() -> None:
    p = ContextPolicy.model_validate({"maxPromptTokens": 2000})
    assert p.keep_system and p.keep_last_turns == 4 and p.overflow is ContextOverflow.drop_oldest
    with pytest.raises(ValidationError, match="summarize needs summarizer"):
        ContextPolicy.model_validate({"maxPromptTokens": 2000, "overflow": "summarize"})
    with pytest.raises(ValidationError, match="summarize needs summarizer"):
        ContextPolicy.model_validate({"maxPromptTokens": 2000, "summarizer": "mini"})
    ContextPolicy.model_validate({"maxPromptTokens": 2000, "overflow": "summarize", "summarizer": "mini"})


async def test_apply_reject_and_drop_without_a_summarizer() -> None:
    policies = ContextPolicies(SummaryStore("t", None), credentials=None)

    def count(msgs: list[dict[str, Any]]) -> int:
        return 3 + 10 * len(msgs)

    est = count(CONVO)
    reject = ContextPolicy.model_validate({"maxPromptTokens": 64, "overflow": "reject"})
    with pytest.raises(DoesNotFit, match=f"about {est} tokens"):
        await policies.apply(reject, CONVO, count, est, {})
    assert await policies.apply(reject, CONVO[:2], count, count(CONVO[:2]), {}) is None
    drop = ContextPolicy.model_validate({"maxPromptTokens": 64, "keepLastTurns": 2})
    applied = await policies.apply(drop, CONVO, count, est, {})
    assert applied is not None and applied.action == "dropped"
    assert applied.after == count(applied.messages) <= 64 and applied.saved == est - applied.after
    # summarize whose backend is not in the config: the oldest turns are dropped, and it says so.
    summ = ContextPolicy.model_validate(
        {"maxPromptTokens": 64, "keepLastTurns": 2, "overflow": "summarize", "summarizer": "gone"}
    )
    applied = await policies.apply(summ, CONVO, count, est, {})
    assert applied is not None and applied.action == "summary_failed" and applied.after <= 64
    assert "not in this config" in applied.failure


async def test_the_summary_store_shares_through_redis_and_keeps_going_without_it(redis_url, ns) -> None:
    import redis.asyncio as aioredis

    from support.ports import refusing_port

    digest = prefix_digest([msg("user", "hello")], "mini", "gpt-4o-mini")
    shared = aioredis.from_url(redis_url)
    try:
        a, b = SummaryStore(ns, shared), SummaryStore(ns, shared)
        await a.put(digest, "the user said hello")
        assert await b.get(digest) == "the user said hello"  # from Redis: the other sidecar's summary
        assert await shared.ttl(RedisKeys(ns).context_summary(digest)) > 3600
    finally:
        await shared.aclose()
    with refusing_port() as port:
        down = aioredis.from_url(f"redis://127.0.0.1:{port}")
        try:
            alone = SummaryStore(ns, down)
            assert await alone.get(digest) is None
            await alone.put(digest, "kept here")  # Redis away: kept in this sidecar, no error
            assert await alone.get(digest) == "kept here"
        finally:
            await down.aclose()
