"""The cache stage against a real Redis: exact and semantic tiers, sharing, scope, TTLs,
invalidation, flushes, and what happens when Redis or the embedding backend fails."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from kubetoll_sidecar.cache import CacheStage, http_embedder, keys
from kubetoll_sidecar.providers.base import Usage
from kubetoll_tools import cache_commands
from kubetoll_tools.cache_flush import flush_policy
from support.cache_stage import SEMANTIC, answer, ask, make_config, request, sample
from support.redis_server import RedisProcess

# --------------------------------------------------------------------------- exact tier


async def test_exact_miss_then_hit_with_new_id_and_savings(redis, ns, stages):
    stage = stages(ns, redis)
    stage.configure(make_config(ns))
    first = await ask(stage, request(), reply="Use the reset link.")
    assert first.status == "miss" and first.hit is None and first.header_value == "miss"
    hit = (await ask(stage, request())).hit
    assert hit is not None and hit.kind == "exact" and hit.similarity == 1.0
    body = hit.response_body()
    assert body["choices"][0]["message"]["content"] == "Use the reset link."
    assert body["id"] != "chatcmpl-original" and body["id"].startswith("chatcmpl-")
    assert body["created"] != 1700000000
    assert hit.avoided_usd == pytest.approx(0.0042)
    assert hit.headers()["x-kubetoll-cache"] == "hit-exact"
    assert sample(stage, "kubetoll_cache_lookups_total", route="chat", policy="faq", result="hit_exact") == 1
    assert sample(stage, "kubetoll_cache_avoided_usd_total", route="chat", policy="faq", kind="exact") == pytest.approx(
        0.0042
    )
    assert sample(stage, "kubetoll_cache_avoided_tokens_total", route="chat", policy="faq", type="output") == 9
    # The ledger record of a hit: no backend, nothing billed, the savings.
    rec = CacheStage.spend_record(
        await ask(stage, request()), time_=1.0, namespace=ns, tenant="alice", tier="free", request_id="r1"
    )
    assert (
        rec is not None
        and rec.backend == ""
        and rec.cost_usd == 0
        and rec.cache_hit == "exact"
        and rec.avoided_usd == pytest.approx(0.0042)
    )


def _mutations() -> list[tuple[str, Any]]:
    tool = {
        "type": "function",
        "function": {"name": "lookup_order", "parameters": {"type": "object", "properties": {}}},
    }
    return [
        ("question", lambda b: b["messages"][-1].update(content="How do I change my password?")),
        ("system prompt", lambda b: b["messages"][0].update(content="You are the support bot of Globex.")),
        ("earlier turn", lambda b: b["messages"].insert(1, {"role": "user", "content": "hi"})),
        ("tools", lambda b: b.update(tools=[tool])),
        ("tool_choice", lambda b: b.update(tool_choice="none")),
        ("response_format", lambda b: b.update(response_format={"type": "json_object"})),
        ("temperature", lambda b: b.update(temperature=0.2)),
        ("top_p", lambda b: b.update(top_p=0.5)),
        ("seed", lambda b: b.update(seed=7)),
        ("max_tokens", lambda b: b.update(max_tokens=50)),
        ("n", lambda b: b.update(n=2)),
        ("stop", lambda b: b.update(stop=["\n"])),
        ("an unknown new field", lambda b: b.update(reasoning_effort="high")),
    ]


@pytest.mark.parametrize("what,mutate", _mutations(), ids=[m[0] for m in _mutations()])
async def test_every_field_that_decides_the_answer_is_in_the_key(redis, ns, stages, what, mutate):
    stage = stages(ns, redis)
    stage.configure(make_config(ns, cacheable={"maxTemperature": 0.5, "allowTools": True}))
    await ask(stage, request(), reply="original")
    changed = request()
    mutate(changed)
    assert (await ask(stage, changed)).hit is None, f"a different {what} must not hit"
    assert (await ask(stage, request())).hit is not None


async def test_route_endpoint_and_tenant_are_in_the_key(redis, ns, stages):
    stage = stages(ns, redis)
    stage.configure(make_config(ns))
    await ask(stage, request(), reply="original")
    assert (await ask(stage, request(), route="other")).hit is None
    assert (await ask(stage, request(), tenant="bob")).hit is None
    completion = {"model": "chat", "prompt": "How do I reset my password?", "temperature": 0}
    assert (await ask(stage, completion, endpoint="completions")).hit is None


async def test_fields_that_do_not_change_the_answer_share_an_entry(redis, ns, stages):
    stage = stages(ns, redis)
    stage.configure(make_config(ns))
    await ask(stage, request(max_tokens=64), reply="original")
    same = [
        request(max_tokens=64, stream=True, stream_options={"include_usage": True}),
        request(max_tokens=64, user="someone"),
        request(max_tokens=64, metadata={"trace": "x"}),
        request(max_completion_tokens=64),  # the other spelling of max_tokens
        request(max_tokens=64, temperature=0.0, top_p=1, n=1, seed=None),  # defaults written out, nulls
    ]
    for body in same:
        assert (await ask(stage, body)).hit is not None, body


async def test_key_order_and_whitespace_outside_strings_do_not_matter(redis, ns, stages):
    stage = stages(ns, redis)
    stage.configure(make_config(ns))
    raw_a = (
        '{"model":"chat","temperature":0,"messages":[{"role":"user","content":"Where is my order?"}],"max_tokens":20}'
    )
    raw_b = """{
        "max_tokens" : 20,
        "messages" : [ { "content" : "Where is my order?", "role" : "user" } ],
        "temperature":0, "model":"chat"
    }"""
    await ask(stage, json.loads(raw_a), reply="It ships tomorrow.")
    assert (await ask(stage, json.loads(raw_b))).hit is not None
    # ...but whitespace inside a string is part of the question.
    assert (await ask(stage, json.loads(raw_a.replace("Where is", "Where  is")))).hit is None


async def test_two_sidecars_share_entries_through_redis(redis, ns, stages):
    a, b = stages(ns, redis), stages(ns, redis)
    a.configure(make_config(ns))
    b.configure(make_config(ns))
    await ask(a, request(), reply="shared answer")
    hit = (await ask(b, request())).hit
    assert hit is not None and hit.response_body()["choices"][0]["message"]["content"] == "shared answer"
    # Namespaces never share.
    c = stages(ns + "x", redis)
    c.configure(make_config(ns + "x"))
    assert (await ask(c, request())).hit is None


async def test_ttl_expiry_in_the_local_lru_and_in_redis(redis, ns, stages, clock):
    a, b = stages(ns, redis, **clock.clocks), stages(ns, redis, **clock.clocks)
    for s in (a, b):
        s.configure(make_config(ns, exact={"ttlSeconds": 1}))
    await ask(a, request(), reply="short-lived")
    assert (await ask(b, request())).hit is not None
    h = keys.exact_key("chat", "chat", "alice", keys.normalize_request(request()))
    key = keys.entry_key(ns, "faq", a._policies["faq"].gen, h)
    assert 0 < await redis.pttl(key) <= 1000  # Redis drops it by itself once the TTL is up
    clock.advance(1.3)  # the entry's age is past the TTL: neither the LRU nor what Redis still returns is served
    assert (await ask(a, request())).hit is None
    assert (await ask(b, request())).hit is None


async def test_tenant_scope_isolates_and_namespace_scope_shares(redis, ns, stages):
    stage = stages(ns, redis)
    stage.configure(make_config(ns))  # scope: tenant (the default)
    await ask(stage, request(), tenant="tenant-a", reply="A's answer")
    assert (await ask(stage, request(), tenant="tenant-b")).hit is None
    await ask(stage, request(), tenant="tenant-b", reply="B's answer")
    for tenant, expected in (("tenant-a", "A's answer"), ("tenant-b", "B's answer")):
        hit = (await ask(stage, request(), tenant=tenant)).hit
        assert hit is not None and hit.response_body()["choices"][0]["message"]["content"] == expected
    shared = stages(ns + "n", redis)
    shared.configure(make_config(ns + "n", scope="namespace"))
    await ask(shared, request(), tenant="tenant-a", reply="for everyone")
    assert (await ask(shared, request(), tenant="tenant-b")).hit is not None


async def test_a_changed_policy_invalidates_and_an_unchanged_reload_keeps(redis, ns, stages):
    a, b = stages(ns, redis), stages(ns, redis)
    cfg = make_config(ns)
    a.configure(cfg)
    b.configure(cfg)
    await ask(a, request(), reply="v1")
    a.configure(make_config(ns))  # same settings, new config object
    assert (await ask(a, request())).hit is not None
    changed = make_config(ns, exact={"ttlSeconds": 7200})
    a.configure(changed)
    assert (await ask(a, request())).hit is None, "entries of the old policy settings must not be served"
    assert sample(a, "kubetoll_cache_invalidations_total", policy="faq", reason="policy_changed") == 1
    # A sidecar still on the old settings does not read the new generation's entries either.
    await ask(a, request(), reply="v2")
    hit = (await ask(b, request())).hit
    assert hit is not None and hit.response_body()["choices"][0]["message"]["content"] == "v1"


async def test_flush_policy_reaches_every_sidecar(redis, ns, stages, clock):
    kw = {"epoch_interval": 0.05, **clock.clocks}
    a, b = stages(ns, redis, **kw), stages(ns, redis, **kw)
    for s in (a, b):
        s.configure(make_config(ns))
    await ask(a, request(), reply="stale")
    assert (await ask(b, request())).hit is not None  # now in b's LRU too
    result = await flush_policy(redis, ns, "faq")
    assert result.epoch == 1 and result.deleted >= 1
    clock.advance(0.06)  # past epoch_interval: the next sync reads the epochs
    for s in (a, b):
        await s.sync_once()
        assert (await ask(s, request())).hit is None
    assert sample(b, "kubetoll_cache_invalidations_total", policy="faq", reason="epoch_bumped") == 1
    # Bumping the epoch key by hand (what an operator may do with redis-cli) works the same way.
    await ask(a, request(), reply="fresh")
    assert (await ask(b, request())).hit is not None
    await redis.incr(keys.epoch_key(ns, "faq"))
    clock.advance(0.06)
    await b.sync_once()
    assert (await ask(b, request())).hit is None


def test_kubetoll_cache_flush_command(redis_url, ns):
    async def seed() -> None:
        c = aioredis.from_url(redis_url)
        await c.set(keys.entry_key(ns, "faq", "abc", "h1"), b"x")
        await c.aclose()

    async def check() -> tuple[int, int]:
        c = aioredis.from_url(redis_url)
        epoch = int(await c.get(keys.epoch_key(ns, "faq")) or 0)
        left = await c.exists(keys.entry_key(ns, "faq", "abc", "h1"))
        await c.aclose()
        return epoch, left

    asyncio.run(seed())
    parser = argparse.ArgumentParser(prog="kubetoll")
    cache_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cache", "flush", "--redis-url", redis_url, "--namespace", ns, "--policy", "faq"])
    assert args.handler(args) == 0
    assert asyncio.run(check()) == (1, 0)
    bad = parser.parse_args(
        [
            "cache",
            "flush",
            "--redis-url",
            "redis://127.0.0.1:1/0",
            "--namespace",
            ns,
            "--policy",
            "faq",
            "--timeout",
            "2",
        ]
    )
    assert bad.handler(bad) == 1


# --------------------------------------------------------------------------- cacheability and the control header


async def test_no_cache_skips_lookup_and_store_and_no_store_only_store(redis, ns, stages):
    stage = stages(ns, redis)
    stage.configure(make_config(ns))
    lk = await ask(stage, request(), headers={"x-kubetoll-cache-control": "no-cache"}, reply="never stored")
    assert lk.status == "bypass" and not lk.should_store
    assert (await ask(stage, request())).hit is None
    lk = await stage.lookup("faq", "chat", "alice", "chat", request(), {"X-Kubetoll-Cache-Control": "no-store"})
    assert lk.status == "miss" and not lk.should_store
    assert not await stage.store(lk, answer(), Usage(1, 1), 0.0)
    assert (await ask(stage, request())).hit is None
    await ask(stage, request(), reply="stored")
    # no-store still reads.
    assert (await ask(stage, request(), headers={"x-kubetoll-cache-control": "no-store"})).hit is not None
    assert (await ask(stage, request(), headers={"x-kubetoll-cache-control": "no-cache"})).hit is None


async def test_what_is_cacheable(redis, ns, stages):
    stage = stages(ns, redis)
    stage.configure(make_config(ns, cacheable={"maxTemperature": 0.0}))
    no_temperature = request()
    del no_temperature["temperature"]  # OpenAI's default is 1
    assert (await ask(stage, no_temperature)).status == "uncacheable"
    assert (await ask(stage, request(temperature=0.7))).reason == "temperature"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert (await ask(stage, request(tools=[tool]))).reason == "tools"
    assert (
        await stage.lookup("faq", "chat", "a", "embeddings", {"model": "chat", "input": "x"})
    ).status == "uncacheable"
    assert (await stage.lookup(None, "chat", "a", "chat", request())).status == "off"
    assert (await stage.lookup("no-such-policy", "chat", "a", "chat", request())).status == "off"
    stage.configure(make_config(ns, cacheable={"maxTemperature": 0.0, "allowTools": True}))
    await ask(stage, request(tools=[tool]), reply="with tools")
    assert (await ask(stage, request(tools=[tool]))).hit is not None


@pytest.mark.parametrize(
    "body",
    [
        answer(finish=None),
        answer(finish="content_filter"),
        {"error": {"message": "boom", "type": "server_error"}},
        {"id": "x", "object": "chat.completion", "choices": []},
    ],
    ids=["unfinished", "content_filter", "error", "no choices"],
)
async def test_only_complete_answers_are_stored(redis, ns, stages, body):
    stage = stages(ns, redis)
    stage.configure(make_config(ns))
    lk = await ask(stage, request())
    assert not await stage.store(lk, body, Usage(1, 1), 0.0)
    assert (await ask(stage, request())).hit is None


async def test_length_and_tool_call_answers_are_stored(redis, ns, stages):
    stage = stages(ns, redis)
    stage.configure(make_config(ns))
    lk = await ask(stage, request())
    assert await stage.store(lk, answer(finish="length"), Usage(1, 1), 0.0)
    assert (await ask(stage, request())).hit is not None


# --------------------------------------------------------------------------- Redis trouble


def test_a_redis_client_that_decodes_responses_is_refused(redis_url):
    with pytest.raises(ValueError, match="decode_responses"):
        CacheStage("ns", aioredis.from_url(redis_url, decode_responses=True))


async def test_without_redis_the_local_tier_still_serves(ns, stages):
    stage = stages(ns, None)
    stage.configure(make_config(ns))
    await ask(stage, request(), reply="local only")
    assert (await ask(stage, request())).hit is not None


async def test_redis_down_is_a_miss_and_requests_never_wait_on_it(ns, stages, clock):
    proc = RedisProcess().start()
    client = aioredis.from_url(proc.url)
    try:
        other = stages(ns, client, redis_timeout=0.02)
        other.configure(make_config(ns))
        await ask(other, request(), reply="in redis")
        stage = stages(ns, client, redis_timeout=0.02, redis_cooldown=0.3, **clock.clocks)
        stage.configure(make_config(ns))
        assert (await ask(stage, request())).hit is not None  # from Redis
        proc.pause()  # connections stay open; nothing answers
        try:
            fresh = request(question="Do you ship to Canada?")
            lk = await asyncio.wait_for(ask(stage, fresh, reply="stored locally"), 2.0)
            assert lk.status == "miss"
            assert sample(stage, "kubetoll_cache_redis_errors_total", op="get", reason="timeout") >= 1
            # While Redis is out, the sidecar's own entries still serve.
            assert (await asyncio.wait_for(ask(stage, fresh), 2.0)).hit is not None
            # And a sidecar that never saw the entry misses instead of waiting.
            newcomer = stages(ns, client, redis_timeout=0.02)
            newcomer.configure(make_config(ns))
            assert (await asyncio.wait_for(ask(newcomer, request()), 2.0)).status == "miss"
        finally:
            proc.resume()
        assert not stage.guard.available  # cooling down: Redis is not even tried
        clock.advance(0.35)
        assert stage.guard.available  # the cool-down is over: the next call probes Redis again
        third = stages(ns, client)
        third.configure(make_config(ns))
        assert (await ask(third, request())).hit is not None  # back once Redis is
        proc.stop()  # gone entirely: refused connections are misses too
        last = stages(ns, client, redis_timeout=0.02)
        last.configure(make_config(ns))
        assert (await asyncio.wait_for(ask(last, request()), 2.0)).status == "miss"
    finally:
        await client.aclose()
        proc.stop()


# --------------------------------------------------------------------------- semantic tier


async def test_semantic_hit_for_a_paraphrase_and_the_embedding_is_billed(redis, ns, stages, embed_server, http):
    stage = stages(ns, redis)
    stage.configure(
        make_config(ns, embed_server.url, **SEMANTIC),
        {"embedder": http_embedder(http, embed_server.url, "hashed", usd_per_mtok=0.02)},
    )
    miss = await ask(stage, request("How do I cancel my order?"), reply="Orders can be cancelled from the Orders page.")
    assert miss.status == "miss" and miss.embedding is not None
    assert miss.embedding.backend == "embedder" and miss.embedding.usage.prompt_tokens == 6
    assert miss.embedding.cost_usd == pytest.approx(6 * 0.02e-6)
    lk = await ask(stage, request("how can i cancel my order"))
    assert lk.hit is not None and lk.hit.kind == "semantic" and 0.5 <= lk.hit.similarity < 1.0
    assert lk.embedding is not None  # a semantic hit still paid for its embedding
    assert lk.hit.headers()["x-kubetoll-cache"] == "hit-semantic"
    assert "x-kubetoll-cache-similarity" in lk.hit.headers()
    rec = CacheStage.embedding_record(lk, time_=1.0, namespace=ns, tenant="alice", tier="free", request_id="r")
    assert rec is not None and rec.backend == "embedder" and rec.cost_usd == pytest.approx(lk.embedding.cost_usd)
    assert sample(stage, "kubetoll_cache_lookups_total", route="chat", policy="faq", result="hit_semantic") == 1


HARD_NEGATIVES = [
    ("How do I cancel my order?", "How do I cancel my subscription?", "swapped_word"),
    ("How do I cancel my subscription?", "How do I pause my subscription?", "swapped_word"),
    ("Can I get a refund for order 1234?", "Can I get a refund for order 1235?", "number"),
    ("I was charged for my subscription", "I was not charged for my subscription", "negation"),
    ("How much is the Pro plan per month?", "How much is the Basic plan per month?", "swapped_word"),
    ("Do you ship to Canada?", "Do you ship to Mexico?", "swapped_word"),
    ("Can I return an item after 30 days?", "Can I return an item before 30 days?", "swapped_word"),
    ("How do I upgrade from Basic to Pro?", "How do I upgrade from Pro to Basic?", "role"),
]


@pytest.mark.parametrize("stored,asked,why", HARD_NEGATIVES, ids=[h[2] + ":" + h[1] for h in HARD_NEGATIVES])
async def test_the_strict_check_turns_down_hard_negatives(redis, ns, stages, embed_server, http, stored, asked, why):
    stage = stages(ns, redis)
    low = {"exact": {"enabled": False}, "semantic": {"enabled": True, "embeddingBackend": "embedder", "threshold": 0.3}}
    stage.configure(
        make_config(ns, embed_server.url, **low), {"embedder": http_embedder(http, embed_server.url, "hashed")}
    )
    await ask(stage, request(stored), reply="the answer to the stored question")
    lk = await ask(stage, request(asked))
    assert lk.hit is None and lk.reason == why
    assert sample(stage, "kubetoll_cache_semantic_rejections_total", route="chat", policy="faq", reason=why) == 1
    # The check is what protects: without it, the same pair is a (wrong) hit.
    loose = stages(ns + "v", redis)
    unverified = copy.deepcopy(low)
    unverified["semantic"]["verify"] = False
    loose.configure(
        make_config(ns + "v", embed_server.url, **unverified),
        {"embedder": http_embedder(http, embed_server.url, "hashed")},
    )
    await ask(loose, request(stored), reply="the answer to the stored question")
    assert (await ask(loose, request(asked))).hit is not None


async def test_semantic_hit_through_a_worker_thread_search(redis, ns, stages, embed_server, http, monkeypatch):
    from kubetoll_sidecar.cache import semantic

    monkeypatch.setattr(semantic, "OFFLOAD_ELEMENTS", 0)  # every search goes to the thread pool
    stage = stages(ns, redis)
    stage.configure(
        make_config(ns, embed_server.url, **SEMANTIC), {"embedder": http_embedder(http, embed_server.url, "hashed")}
    )
    await ask(stage, request("How do I cancel my order?"), reply="answer")
    assert (await ask(stage, request("how can i cancel my order"))).hit is not None
    assert (await ask(stage, request("How do I cancel my subscription?"))).hit is None


async def test_semantic_partition_never_crosses_a_system_prompt_or_tenant(redis, ns, stages, embed_server, http):
    stage = stages(ns, redis)
    stage.configure(
        make_config(ns, embed_server.url, **SEMANTIC), {"embedder": http_embedder(http, embed_server.url, "hashed")}
    )
    await ask(stage, request("How do I cancel my order?"), reply="Acme's answer")
    other_bot = request("How do I cancel my order?")
    other_bot["messages"][0]["content"] = "You are the support bot of Globex."
    assert (await ask(stage, other_bot)).hit is None
    assert (await ask(stage, request("How do I cancel my order?"), tenant="mallory")).hit is None
    assert (await ask(stage, request("How do I cancel my order?", max_tokens=5))).hit is None
    assert (await ask(stage, request("How do I cancel my order?"))).hit is not None


async def test_semantic_entries_reach_other_sidecars_through_the_stream(redis, ns, stages, embed_server, http):
    embed = {"embedder": http_embedder(http, embed_server.url, "hashed")}
    a, b = stages(ns, redis), stages(ns, redis)
    a.configure(make_config(ns, embed_server.url, **SEMANTIC), embed)
    b.configure(make_config(ns, embed_server.url, **SEMANTIC), embed)
    await b.sync_once()  # b has read the (empty) stream before a stores
    await ask(a, request("Where can I download my invoices?"), reply="Billing > Invoices.")
    await b.sync_once()
    hit = (await ask(b, request("where do I download my invoices"))).hit
    assert hit is not None and hit.kind == "semantic"
    # A sidecar started later backfills the index from the stream.
    c = stages(ns, redis)
    c.configure(make_config(ns, embed_server.url, **SEMANTIC), embed)
    await c.sync_once()
    assert (await ask(c, request("Where do I download my invoices?"))).hit is not None


async def test_a_semantic_answer_gone_from_redis_is_a_miss_and_leaves_the_index(redis, ns, stages, embed_server, http):
    embed = {"embedder": http_embedder(http, embed_server.url, "hashed")}
    a, b = stages(ns, redis), stages(ns, redis)
    for s in (a, b):
        s.configure(make_config(ns, embed_server.url, **SEMANTIC), embed)
    await ask(a, request("How do I reset my password?"), reply="Use the reset link.")
    await b.sync_once()
    rt = b._policies["faq"]
    assert len(rt.index) == 1
    async for key in redis.scan_iter(match=keys.policy_prefix(ns, "faq") + "*:e:*"):
        await redis.delete(key)  # evicted by Redis, or expired
    assert (await ask(b, request("how can I reset my password"))).hit is None
    assert len(rt.index) == 0


async def test_semantic_ttl_expires_entries_in_the_index(redis, ns, stages, embed_server, http, clock):
    stage = stages(ns, redis, **clock.clocks)
    short = copy.deepcopy(SEMANTIC)
    short["semantic"]["ttlSeconds"] = 1
    stage.configure(
        make_config(ns, embed_server.url, **short), {"embedder": http_embedder(http, embed_server.url, "hashed")}
    )
    await ask(stage, request("How do I reset my password?"), reply="Use the reset link.")
    assert (await ask(stage, request("how can I reset my password"))).hit is not None
    clock.advance(1.2)
    assert (await ask(stage, request("how can I reset my password"))).hit is None


async def test_a_failing_embedding_backend_is_a_miss_not_an_error(redis, ns, stages, embed_server, http):
    stage = stages(ns, redis, embed_cooldown=0.0)
    both = {"semantic": {"enabled": True, "embeddingBackend": "embedder", "threshold": 0.5}}
    stage.configure(
        make_config(ns, embed_server.url, **both),
        {"embedder": http_embedder(http, embed_server.url, "hashed", timeout=0.2)},
    )
    await ask(stage, request("How do I cancel my order?"), reply="answer")
    embed_server.fail = True
    lk = await ask(stage, request("how can i cancel my order"))
    assert lk.status == "miss" and lk.embedding is None
    assert sample(stage, "kubetoll_cache_embedding_calls_total", policy="faq", result="failed") == 1
    assert (await ask(stage, request("How do I cancel my order?"))).hit is not None  # the exact tier needs no embedding
    embed_server.fail, embed_server.hang = False, 1.0  # slow: timed out
    assert (await ask(stage, request("how could i cancel my order"))).status == "miss"
    embed_server.hang = 0.0
    stage.configure(make_config(ns, embed_server.url, **both), {})  # no embedder at all
    assert (await ask(stage, request("how can i cancel my order"))).status == "miss"


async def test_embedder_for_backend_calls_the_simulator_and_prices_the_call(sim, http):
    from kubetoll_core.prices import resolve_price
    from kubetoll_core.router_config import Backend
    from kubetoll_sidecar.cache import embedder_for_backend
    from kubetoll_sidecar.credentials import CredentialStore
    from kubetoll_sidecar.forwarder import BackendRuntime

    backend = Backend.model_validate(
        {
            "name": "emb",
            "provider": "openai",
            "model": "text-embedding-3-small",
            "endpoint": sim.url + "/v1",
            "credentials": {"env": "KT_TEST_OPENAI_KEY"},
        }
    )
    embed = embedder_for_backend(BackendRuntime(backend, resolve_price(backend), http), CredentialStore("/nonexistent"))
    vectors, usage, cost = await embed(["How do I reset my password?"])
    assert len(vectors) == 1 and len(vectors[0]) == 64
    assert usage.prompt_tokens > 0
    assert cost == pytest.approx(usage.prompt_tokens * 0.02e-6)  # the catalogue's text-embedding-3-small price
    wrong = Backend.model_validate({**backend.model_dump(by_alias=True), "credentials": {"env": "KT_NO_SUCH_KEY"}})
    from kubetoll_sidecar.cache import EmbeddingFailed

    with pytest.raises(EmbeddingFailed):
        await embedder_for_backend(BackendRuntime(wrong, resolve_price(wrong), http), CredentialStore("/nonexistent"))(
            ["x"]
        )
