"""The cache stage inside the real sidecar: what an app sees, what the upstream
sees, what the ledger and budgets record.

Unit-level cache behaviour (keys, strict check, replay) is in test_cache_*.py;
these tests go through the OpenAI SDK and the HTTP API of running sidecars.
"""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from kubetoll_core.spend_record import CACHE_EMBEDDING_OUTCOME
from kubetoll_tools.simulator import Fault
from support.harness import base_config

pytestmark = pytest.mark.asyncio

QUESTION = [{"role": "user", "content": "How do I reset my password?"}]


def cached_config(sim_url: str, **extra) -> dict:
    cfg = base_config(
        sim_url,
        cachePolicies=[{"name": "faq", "scope": "namespace", "exact": {"enabled": True, "ttlSeconds": 600}}],
        **extra,
    )
    cfg["routes"][0]["cachePolicy"] = "faq"
    return cfg


def upstream_chats(sim) -> int:
    return sum(1 for r in sim.requests if r.path.endswith("/chat/completions"))


async def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            url + "/v1/chat/completions",
            data=orjson.dumps(body),
            headers={"content-type": "application/json", **(headers or {})},
        ) as r:
            return r.status, dict(r.headers), await r.read()


async def test_a_repeat_is_answered_from_cache_without_calling_upstream(sim, start_sidecar):
    sc = await start_sidecar(cached_config(sim.url))
    client = sc.openai()
    first = await client.chat.completions.with_raw_response.create(model="chat", messages=QUESTION, temperature=0)
    assert first.headers["x-kubetoll-cache"] == "miss"
    answer = first.parse()
    await sc.sidecar.cache.drain()  # the store is fire-and-forget
    second = await client.chat.completions.with_raw_response.create(model="chat", messages=QUESTION, temperature=0)
    hit = second.parse()
    assert second.headers["x-kubetoll-cache"] == "hit-exact"
    assert second.headers["x-kubetoll-cost-usd"] == "0.000000000"
    assert float(second.headers["x-kubetoll-avoided-usd"]) > 0
    assert hit.choices[0].message.content == answer.choices[0].message.content
    assert hit.id != answer.id  # a fresh id, as a new completion would have
    assert upstream_chats(sim) == 1
    # Ledger: one billed call, one hit that cost nothing and says what it saved.
    records = list(sc.sidecar.ledger.records())
    assert [r.cache_hit for r in records] == ["", "exact"]
    assert (
        records[1].cost_usd == 0
        and records[1].backend == ""
        and records[1].avoided_usd == pytest.approx(records[0].cost_usd)
    )


async def test_a_streamed_answer_is_stored_and_replayed_as_a_stream(sim, start_sidecar):
    sc = await start_sidecar(cached_config(sim.url))
    client = sc.openai()
    text = ""
    async for chunk in await client.chat.completions.create(
        model="chat", messages=QUESTION, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    await sc.sidecar.cache.drain()
    replay, usage = "", None
    stream = await client.chat.completions.create(
        model="chat", messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            replay += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert replay == text and text
    assert usage is not None and usage.completion_tokens > 0  # the original answer's usage
    assert upstream_chats(sim) == 1
    # And a non-streaming ask of the same question is a hit too.
    status, headers, _ = await post(sc.url, {"model": "chat", "messages": QUESTION, "temperature": 0})
    assert status == 200 and headers["x-kubetoll-cache"] == "hit-exact"


async def test_a_cut_stream_is_not_cached(sim, start_sidecar):
    sc = await start_sidecar(cached_config(sim.url))
    sim.enqueue_fault(Fault(kind="cut_stream", after_chunks=2))
    status, _, body = await post(sc.url, {"model": "chat", "messages": QUESTION, "temperature": 0, "stream": True})
    assert status == 200 and b"upstream_stream_cut" in body
    await sc.sidecar.cache.drain()
    status, headers, _ = await post(sc.url, {"model": "chat", "messages": QUESTION, "temperature": 0})
    assert headers["x-kubetoll-cache"] == "miss"
    assert upstream_chats(sim) == 2


async def test_no_cache_header_bypasses_and_hot_temperature_is_not_cached(sim, start_sidecar):
    sc = await start_sidecar(cached_config(sim.url))
    await post(sc.url, {"model": "chat", "messages": QUESTION, "temperature": 0})
    await sc.sidecar.cache.drain()
    _, headers, _ = await post(
        sc.url, {"model": "chat", "messages": QUESTION, "temperature": 0}, {"x-kubetoll-cache-control": "no-cache"}
    )
    assert headers["x-kubetoll-cache"] == "bypass"
    _, headers, _ = await post(sc.url, {"model": "chat", "messages": QUESTION, "temperature": 1.2})
    assert headers["x-kubetoll-cache"] == "uncacheable"
    assert upstream_chats(sim) == 3


async def test_a_hit_still_counts_against_the_request_rate(sim, start_sidecar):
    cfg = cached_config(
        sim.url,
        budgets=[
            {
                "name": "rate",
                "routes": ["chat"],
                "tiers": {"default": {"requestsPerMinute": 2, "onExhausted": "reject"}},
            }
        ],
    )
    sc = await start_sidecar(cfg)
    statuses = []
    for _ in range(3):
        status, _, _ = await post(
            sc.url, {"model": "chat", "messages": QUESTION, "temperature": 0}, {"x-kubetoll-tenant": "t1"}
        )
        statuses.append(status)
        await sc.sidecar.cache.drain()
    assert statuses == [200, 200, 429]
    assert upstream_chats(sim) == 1


async def test_semantic_lookup_bills_its_embedding_call(sim, start_sidecar):
    cfg = cached_config(sim.url)
    cfg["backends"].append(
        {
            "name": "embed",
            "provider": "openai",
            "model": "text-embedding-3-small",
            "endpoint": sim.url + "/v1",
            "credentials": {"env": "KT_TEST_OPENAI_KEY"},
        }
    )
    cfg["cachePolicies"][0]["semantic"] = {
        "enabled": True,
        "embeddingBackend": "embed",
        "threshold": 0.99,
        "verify": True,
    }
    cfg["budgets"] = [{"name": "usd", "routes": ["chat"], "cap": {"usdPerDay": 100}}]
    sc = await start_sidecar(cfg)
    status, headers, _ = await post(sc.url, {"model": "chat", "messages": QUESTION, "temperature": 0})
    assert status == 200 and headers["x-kubetoll-cache"] == "miss"
    assert any(r.path.endswith("/embeddings") for r in sim.requests)
    records = list(sc.sidecar.ledger.records())
    embedding = [r for r in records if r.outcome == CACHE_EMBEDDING_OUTCOME]
    assert len(embedding) == 1 and embedding[0].backend == "embed" and embedding[0].cost_usd > 0
    # The embedding's cost is in the budget, as the ledger says: they agree exactly.
    meter = next(m for m in sc.sidecar.state.meters.for_request("chat", "-", "-", sc.sidecar.clock.time()).usd)
    assert sc.sidecar.store.spent(meter.key) == pytest.approx(sum(r.cost_usd for r in records), rel=1e-12)


async def test_two_sidecars_on_redis_share_cached_answers_and_one_ledger(sim, start_sidecar, redis_url, ns):
    a = await start_sidecar(cached_config(sim.url, namespace=ns, budgetStore={"url": redis_url, "timeoutMs": 500}))
    b = await start_sidecar(cached_config(sim.url, namespace=ns, budgetStore={"url": redis_url, "timeoutMs": 500}))
    status, headers, _ = await post(a.url, {"model": "chat", "messages": QUESTION, "temperature": 0})
    assert status == 200 and headers["x-kubetoll-cache"] == "miss"
    await a.sidecar.cache.drain()
    status, headers, _ = await post(b.url, {"model": "chat", "messages": QUESTION, "temperature": 0})
    assert status == 200 and headers["x-kubetoll-cache"] == "hit-exact"
    assert upstream_chats(sim) == 1
    # /kubetoll/v1/spend on either sidecar reads the namespace's ledger in Redis.
    await a.sidecar.store.close()
    await b.sidecar.store.close()  # flushes what is buffered
    async with aiohttp.ClientSession() as s:
        async with s.get(b.url + "/kubetoll/v1/spend") as r:
            data = await r.json()
    assert data["scope"] == "namespace"
    assert sorted(rec["cache_hit"] for rec in data["records"]) == ["", "exact"]


async def test_error_control_compares_the_upstream_answer_and_bills_the_comparison(sim, start_sidecar, embed_server):
    """semantic.targetErrorRate: before enough answers were compared nothing is served; a near
    question goes upstream, its answer is compared with the cached one after the response, and
    the comparison's embedding call is in the ledger and the budget like the lookup's own."""
    cfg = cached_config(sim.url)
    cfg["backends"].append(
        {
            "name": "embed",
            "provider": "openai-compatible",
            "model": "hashed",  # similar questions are near (the simulator's vectors are random)
            "endpoint": embed_server.url,
            "pricing": {"inputPerMTok": 0.02, "outputPerMTok": 0},
        }
    )
    cfg["cachePolicies"][0]["exact"] = {"enabled": False}
    cfg["cachePolicies"][0]["semantic"] = {
        "enabled": True,
        "embeddingBackend": "embed",
        "threshold": 0.3,
        "verifier": {"kind": "none"},
        "targetErrorRate": 0.05,
    }
    cfg["budgets"] = [{"name": "usd", "routes": ["chat"], "cap": {"usdPerDay": 100}}]
    sc = await start_sidecar(cfg)
    client = sc.openai()
    await client.chat.completions.create(model="chat", messages=QUESTION, temperature=0)
    await sc.sidecar.cache.drain()
    near = [{"role": "user", "content": "How can I reset my password?"}]
    second = await client.chat.completions.with_raw_response.create(model="chat", messages=near, temperature=0)
    assert second.headers["x-kubetoll-cache"] == "miss"
    await sc.sidecar.cache.drain()  # the comparison runs after the response
    m = sc.sidecar.cache.metrics.registry
    assert m.get_sample_value("kubetoll_cache_error_control_decisions_total", {"policy": "faq", "decision": "label"})
    verdicts = {
        s.labels["verdict"]: s.value
        for metric in m.collect()
        if metric.name == "kubetoll_cache_error_control_comparisons"
        for s in metric.samples
        if s.name.endswith("_total")
    }
    assert sum(verdicts.values()) == 1 and verdicts.get("not_similar") == 1  # the simulator's answers differ
    assert upstream_chats(sim) == 2
    records = list(sc.sidecar.ledger.records())
    embedding = [r for r in records if r.outcome == CACHE_EMBEDDING_OUTCOME]
    assert len(embedding) == 3  # two lookups and the comparison
    assert embedding[-1].prompt_tokens > embedding[1].prompt_tokens  # it embedded both answers
    meter = next(m for m in sc.sidecar.state.meters.for_request("chat", "-", "-", sc.sidecar.clock.time()).usd)
    assert sc.sidecar.store.spent(meter.key) == pytest.approx(sum(r.cost_usd for r in records), rel=1e-12)
