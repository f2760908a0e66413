"""Attribution through a running sidecar and the official SDK: tags, sessions, outcomes, budgets by tag,
and `onExhausted: respond` (the platform's message served as a normal completion, streamed or not)."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from kubetoll_core.periods import FakeClock
from kubetoll_core.spend_record import EXHAUSTED_RESPONSE_OUTCOME, OUTCOME_REPORTED
from kubetoll_sidecar import attribution
from support.harness import base_config

pytestmark = pytest.mark.asyncio
T0 = 1_795_000_000.0
HELLO = [{"role": "user", "content": "hello"}]
LIMIT = 0.0003  # USD: a few requests of 16 output tokens at gpt-4o's price
MESSAGE = "I've reached my limit for this conversation; an agent will follow up."


def attributed_config(sim_url: str, **budget: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "name": "main",
        "cap": {"usdPerDay": 100},
        "attribution": {
            "tags": [{"key": "feature", "maxValues": 2, "metricLabel": True}, {"key": "team"}],
            "maxValueLength": 20,
        },
        **budget,
    }
    return base_config(sim_url, budgets=[b])


def sample(sc: Any, name: str, **labels: str) -> float:
    return sc.sidecar.metrics.registry.get_sample_value(name, labels) or 0.0


def requests_of(sc: Any) -> list[Any]:
    return [r for r in sc.sidecar.ledger.records() if r.outcome == "ok"]


async def test_tags_and_session_from_the_header_and_metadata_reach_the_ledger(sim, start_sidecar):
    sc = await start_sidecar(attributed_config(sim.url), clock=FakeClock(T0))
    client = sc.openai()
    await client.chat.completions.create(
        model="chat",
        messages=HELLO,
        extra_headers={"x-kubetoll-tags": "feature=search, team=growth, color=blue", "x-kubetoll-session": "conv-1"},
    )
    # The metadata object too; the header wins for the same key.
    await client.chat.completions.create(
        model="chat",
        messages=HELLO,
        metadata={"feature": "chat", "team": "core", "session_id": "conv-2"},
        extra_headers={"x-kubetoll-tags": "team=growth"},
    )
    first, second = requests_of(sc)
    assert (first.tags, first.session) == ("feature=search,team=growth", "conv-1")
    assert (second.tags, second.session) == ("feature=chat,team=growth", "conv-2")
    assert first.tag_map == {"feature": "search", "team": "growth"}
    # The key no budget accepts is dropped and counted; the metric label key counts spend.
    assert sample(sc, "kubetoll_attribution_dropped_total", reason="unknown_key") == 1
    spent = sample(sc, "kubetoll_spend_by_tag_usd_total", route="chat", key="feature", value="search")
    assert spent == pytest.approx(first.cost_usd) and spent > 0
    assert sample(sc, "kubetoll_spend_by_tag_usd_total", route="chat", key="team", value="growth") == 0  # not a label


async def test_values_are_bounded_a_day_and_bad_ones_dropped(sim, start_sidecar):
    clock = FakeClock(T0)
    sc = await start_sidecar(attributed_config(sim.url), clock=clock)
    client = sc.openai()
    for value in ("a", "b", "c", "a", "bad value!", "x" * 21):
        await client.chat.completions.create(
            model="chat", messages=HELLO, extra_headers={"x-kubetoll-tags": f"feature={value}"}
        )
    tags = [r.tags for r in requests_of(sc)]
    # maxValues 2: the third distinct value is "other"; a known one stays itself; invalid ones are dropped.
    assert tags == ["feature=a", "feature=b", "feature=other", "feature=a", "", ""]
    assert sample(sc, "kubetoll_attribution_dropped_total", reason="folded") == 1
    assert sample(sc, "kubetoll_attribution_dropped_total", reason="invalid_value") == 2
    clock.advance(86400)  # a new UTC day: new values are kept again
    await client.chat.completions.create(model="chat", messages=HELLO, extra_headers={"x-kubetoll-tags": "feature=c"})
    assert requests_of(sc)[-1].tags == "feature=c"
    # A session id that is not usable is dropped, and the request still served.
    await client.chat.completions.create(model="chat", messages=HELLO, extra_headers={"x-kubetoll-session": "a b"})
    assert requests_of(sc)[-1].session == ""
    assert sample(sc, "kubetoll_attribution_dropped_total", reason="invalid_session") == 1


async def test_outcomes_by_endpoint_and_header_are_recorded_with_their_session_spend(sim, start_sidecar):
    sc = await start_sidecar(attributed_config(sim.url), clock=FakeClock(T0))
    client = sc.openai()
    for _ in range(2):
        await client.chat.completions.create(model="chat", messages=HELLO, extra_headers={"x-kubetoll-session": "s1"})
    session_cost = sum(r.cost_usd for r in requests_of(sc))
    async with aiohttp.ClientSession() as http:
        async with http.post(
            sc.url + "/kubetoll/v1/outcomes",
            json={"session_id": "s1", "outcome": "resolved", "value": 40},
            headers={"x-kubetoll-tenant": "acme"},
        ) as r:
            assert r.status == 201
            body = await r.json()
        assert body == {
            "object": "kubetoll.outcome",
            "outcome": "resolved",
            "value": 40.0,
            "session_id": "s1",
            "request_id": "",
            "tenant": "acme",
        }
        for bad, field in (
            ({"outcome": "resolved"}, None),
            ({"session_id": "s1", "outcome": "not ok"}, "outcome"),
            ({"session_id": "s1", "outcome": "ok", "value": "x"}, "value"),
            ({"session_id": "a b", "outcome": "ok"}, "session_id"),
        ):
            async with http.post(sc.url + "/kubetoll/v1/outcomes", json=bad) as r:
                err = (await r.json())["error"]
                assert r.status == 400 and err["type"] == "invalid_request_error" and err["param"] == field, bad
        async with http.post(
            sc.url + "/kubetoll/v1/outcomes", data=b"{", headers={"content-type": "application/json"}
        ) as r:
            assert r.status == 400
    # The header on a request: the outcome of its session.
    await client.chat.completions.create(
        model="chat", messages=HELLO, extra_headers={"x-kubetoll-session": "s2", "x-kubetoll-outcome": "escalated"}
    )
    outcomes = [r for r in sc.sidecar.ledger.records() if r.outcome == OUTCOME_REPORTED]
    assert [(r.session, r.business_outcome, r.outcome_value, r.cost_usd) for r in outcomes] == [
        ("s1", "resolved", 40.0, 0.0),
        ("s2", "escalated", 0.0, 0.0),
    ]
    assert outcomes[0].tenant == "acme"
    assert sample(sc, "kubetoll_outcomes_total", outcome="resolved") == 1
    assert sample(sc, "kubetoll_outcome_spend_usd_total", outcome="resolved") == pytest.approx(session_cost)


async def test_a_budget_scoped_to_a_tag_limits_only_those_requests(sim, start_sidecar):
    cfg = attributed_config(sim.url)
    # A few requests of 16 output tokens fit its cap, and then no more.
    cfg["budgets"].append({"name": "search", "tagSelector": {"feature": "search"}, "cap": {"usdPerDay": LIMIT}})
    sc = await start_sidecar(cfg, clock=FakeClock(T0))
    client = sc.openai()
    search = {"x-kubetoll-tags": "feature=search"}
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(10):
            await client.chat.completions.create(model="chat", messages=HELLO, max_tokens=16, extra_headers=search)
    assert "search/cap/usd-day" in str(refused.value)
    served = len(requests_of(sc))
    assert 1 <= served < 10
    # Other features (and untagged requests) are not under it.
    for headers in ({"x-kubetoll-tags": "feature=chat"}, {}):
        await client.chat.completions.create(model="chat", messages=HELLO, max_tokens=16, extra_headers=headers)
    assert [r.tags for r in requests_of(sc)] == ["feature=search"] * served + ["feature=chat", ""]


def respond_config(sim_url: str) -> dict[str, Any]:
    return base_config(
        sim_url,
        budgets=[
            {
                "name": "main",
                "tiers": {"default": {"usdPerDay": LIMIT, "onExhausted": "respond"}},
                "exhaustedResponse": MESSAGE,
            }
        ],
    )


async def test_respond_serves_the_platform_message_as_a_normal_completion(sim, start_sidecar):
    sc = await start_sidecar(respond_config(sim.url), clock=FakeClock(T0))
    client = sc.openai()
    for _ in range(10):  # served until the tier's day is spent, then answered with the message
        raw = await client.chat.completions.with_raw_response.create(
            model="chat", messages=HELLO, max_tokens=16, extra_headers={"x-kubetoll-session": "c1"}
        )
        if "x-kubetoll-exhausted" in raw.headers:
            break
    served = len(requests_of(sc))
    assert 1 <= served < 10
    upstream = len(sim.requests)
    answer = raw.parse()
    assert answer.choices[0].message.content == MESSAGE and answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.total_tokens == 0
    assert raw.headers["x-kubetoll-exhausted"] == "main/tier:default/usd-day"
    assert raw.headers["x-kubetoll-cost-usd"] == "0.000000000"
    # Streamed, through the SDK: the same message in chunks, finish_reason stop.
    text, finish = "", None
    stream = await client.chat.completions.create(
        model="chat", messages=HELLO, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert (text, finish) == (MESSAGE, "stop")
    # The legacy completions API and the Responses API answer in their own formats.
    completion = await client.completions.create(model="chat", prompt="hello", max_tokens=16)
    assert completion.choices[0].text == MESSAGE
    response = await client.responses.create(model="chat", input="hello", max_output_tokens=16)
    assert response.output_text == MESSAGE
    assert len(sim.requests) == upstream  # nothing went upstream
    records = [r for r in sc.sidecar.ledger.records() if r.outcome == EXHAUSTED_RESPONSE_OUTCOME]
    assert len(records) == 4 and all(r.cost_usd == 0 and r.backend == "" for r in records)
    assert records[0].session == "c1"
    assert sample(sc, "kubetoll_exhausted_responses_total", route="chat", level="tier") == 4


async def test_respond_has_no_message_for_embeddings(sim, start_sidecar):
    cfg = respond_config(sim.url)
    cfg["backends"][0]["model"] = "text-embedding-3-small"
    sc = await start_sidecar(cfg, clock=FakeClock(T0))
    client = sc.openai()
    with pytest.raises(openai.RateLimitError):
        for _ in range(50):
            await client.embeddings.create(model="chat", input="hello " * 2000)


async def test_reading_attribution_never_raises_on_odd_input():
    rules = {"feature": attribution.TagRule("feature", 10, False, 10)}
    values = attribution.DistinctValues()
    odd: list[tuple[dict[str, str], dict[str, Any]]] = [
        ({"x-kubetoll-tags": "=,,=x,feature"}, {}),
        ({}, {"metadata": {"feature": 3, "session_id": ["x"]}}),
        ({}, {"metadata": "not an object"}),
        ({"x-kubetoll-outcome": "ok=nan"}, {}),
        ({"x-kubetoll-tags": ",".join(f"k{i}=v" for i in range(1000))}, {}),
    ]
    for headers, body in odd:
        a = attribution.read(rules, values, headers, body, T0)
        assert a.tags == "" and a.session == "" and a.outcome == ""
    assert attribution.parse_outcome("lead=12.5") == ("lead", 12.5)
    assert attribution.parse_outcome("lead=inf") is None


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_session_limit_answers_that_session_with_the_message_and_no_one_else(
    sim, start_sidecar, store, redis_url, ns
):
    """usdPerSession with onExhausted respond: the conversation that spent its share gets the platform's
    message; another session of the same tenant, and requests without a session, are still served.
    The same with the budgets in Redis (the session's meter is a day window like a tenant's)."""
    extra: dict[str, Any] = {"namespace": ns, "budgetStore": {"url": redis_url, "timeoutMs": 1000}}
    cfg = base_config(
        sim.url,
        **(extra if store == "redis" else {}),
        budgets=[
            {
                "name": "main",
                "tiers": {"default": {"usdPerSession": LIMIT, "onExhausted": "respond"}},
                "exhaustedResponse": MESSAGE,
            }
        ],
    )
    sc = await start_sidecar(cfg, clock=FakeClock(T0))
    client = sc.openai()

    async def ask(session: str | None) -> Any:
        headers = {"x-kubetoll-tenant": "acme"} | ({"x-kubetoll-session": session} if session else {})
        return await client.chat.completions.with_raw_response.create(
            model="chat", messages=HELLO, max_tokens=16, extra_headers=headers
        )

    for _ in range(10):
        raw = await ask("conv-1")
        if "x-kubetoll-exhausted" in raw.headers:
            break
    assert raw.headers["x-kubetoll-exhausted"] == "main/tier:default/usd-per-session"
    assert raw.parse().choices[0].message.content == MESSAGE
    spent = sum(r.cost_usd for r in requests_of(sc) if r.session == "conv-1")
    assert 0 < spent <= LIMIT
    # The same tenant's other conversation, and its requests without a session, are not under conv-1's share.
    for session in ("conv-2", None):
        other = await ask(session)
        assert "x-kubetoll-exhausted" not in other.headers and other.parse().choices[0].message.content != MESSAGE
    # The next day the session starts again (its share is per calendar day).
    sc.sidecar.clock.advance(86400)
    assert "x-kubetoll-exhausted" not in (await ask("conv-1")).headers


def idle_session_config(sim_url: str, store: str, redis_url: str, ns: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"namespace": ns, "budgetStore": {"url": redis_url, "timeoutMs": 1000}}
    tier = {"usdPerSession": LIMIT, "sessionIdleSeconds": 600, "onExhausted": "respond"}
    return base_config(
        sim_url,
        **(extra if store == "redis" else {}),
        budgets=[{"name": "main", "tiers": {"default": tier}, "exhaustedResponse": MESSAGE}],
    )


async def ask_in_session(sc: Any, session: str) -> Any:
    return await sc.openai().chat.completions.with_raw_response.create(
        model="chat",
        messages=HELLO,
        max_tokens=16,
        extra_headers={"x-kubetoll-tenant": "acme", "x-kubetoll-session": session},
    )


async def exhaust(sc: Any, session: str) -> None:
    for _ in range(10):
        if "x-kubetoll-exhausted" in (await ask_in_session(sc, session)).headers:
            return
    raise AssertionError(f"session {session} was never refused")


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_session_idle_for_sessionIdleSeconds_starts_afresh(sim, start_sidecar, store, redis_url, ns):
    """sessionIdleSeconds: a conversation that spent its share stays refused while it goes on (every request,
    the refused ones too, keeps it alive); after that long without a request the same id is a new session."""
    clock = FakeClock(T0)
    sc = await start_sidecar(idle_session_config(sim.url, store, redis_url, ns), clock=clock)
    await exhaust(sc, "conv-1")
    for _ in range(3):  # 3 × 599 s: never idle for 600 s, so the same session, still out of its share
        clock.advance(599)
        assert "x-kubetoll-exhausted" in (await ask_in_session(sc, "conv-1")).headers
    clock.advance(600)
    raw = await ask_in_session(sc, "conv-1")
    assert "x-kubetoll-exhausted" not in raw.headers and raw.parse().choices[0].message.content != MESSAGE
    # The ledger keeps the app's session id as sent: reports see one conversation id across both sessions.
    assert {r.session for r in sc.sidecar.ledger.records()} == {"conv-1"}


async def test_a_session_spread_over_two_sidecars_is_one_session_and_ends_for_both(
    sim, start_sidecar, redis_url, ns, r
):
    """Two pods of one namespace agree on when a session began (a key in Redis), so its share is one share;
    once it has been idle, the next request on either pod starts the same new session for both."""
    one, two = FakeClock(T0), FakeClock(T0 + 1)  # clocks a second apart, as two nodes' may be
    a = await start_sidecar(idle_session_config(sim.url, "redis", redis_url, ns), clock=one)
    b = await start_sidecar(idle_session_config(sim.url, "redis", redis_url, ns), clock=two)
    await exhaust(a, "conv-9")
    assert "x-kubetoll-exhausted" in (await ask_in_session(b, "conv-9")).headers  # the same session on pod b
    keys = [k async for k in r.scan_iter(f"kt:{{{ns}}}:sess:*")]
    assert len(keys) == 1  # one session, one key, whatever pod served it
    started = int((await r.get(keys[0])).split(":")[0])
    assert started == int(T0)
    one.advance(700)
    two.advance(700)
    assert "x-kubetoll-exhausted" not in (await ask_in_session(b, "conv-9")).headers  # a new session ...
    await ask_in_session(a, "conv-9")  # ... which pod a joins (served or not: the new share is shared too)
    start, seen = (int(x) for x in (await r.get(keys[0])).split(":"))
    assert start == int(T0 + 701) and seen == int(T0 + 701)  # b began it; a's clock, a second behind, joined it
    # Pod a's view of when the session began is b's (its meters are named after it), even with Redis
    # gone now: the sidecar keeps the start it learnt.
    assert await a.sidecar.pipeline.attribution.sessions.start_of("default", "conv-9", 600) == start
    a.sidecar.pipeline.attribution.sessions.guard.client = None
    assert await a.sidecar.pipeline.attribution.sessions.start_of("default", "conv-9", 600) == start
    ttl = await r.ttl(keys[0])
    assert 600 < ttl <= 600 + 3600  # cleared away once long over, not before it could end
