"""Exact cache keys: what decides an answer is in the key, how it is normalised, and the semantic split."""

from __future__ import annotations

import json

import pytest

from kubetoll_core.router_config import CachePolicy
from kubetoll_sidecar.cache import keys
from kubetoll_sidecar.cache.stage import policy_hash, uncacheable_reason


def key(body, endpoint="chat", route="chat", scope="alice"):
    return keys.exact_key(endpoint, route, scope, keys.normalize_request(body))


BASE = {"model": "chat", "messages": [{"role": "user", "content": "Hi there"}], "temperature": 0}


def test_canonical_json_ignores_key_order_and_formatting():
    a = json.loads('{"model":"chat","temperature":0,"messages":[{"role":"user","content":"Hi there"}]}')
    b = json.loads(
        '{ "messages" : [ {"content": "Hi there", "role": "user"} ],\n "temperature": 0.0, "model": "chat" }'
    )
    assert key(a) == key(b)


@pytest.mark.parametrize(
    "same",
    [
        {**BASE, "stream": True, "stream_options": {"include_usage": True}},
        {**BASE, "user": "u-1", "metadata": {"a": "b"}, "store": True, "service_tier": "auto"},
        {**BASE, "top_p": 1, "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0},
        {**BASE, "seed": None, "tools": None},
        {**BASE, "model": "another-alias-of-the-same-route"},
    ],
)
def test_fields_that_do_not_change_the_answer(same):
    assert key(same) == key(BASE)


def test_max_completion_tokens_and_max_tokens_are_one_field():
    assert key({**BASE, "max_tokens": 10}) == key({**BASE, "max_completion_tokens": 10})
    assert key({**BASE, "max_tokens": 10}) != key({**BASE, "max_tokens": 11})


def test_absent_temperature_is_openais_default_of_one():
    no_t = {k: v for k, v in BASE.items() if k != "temperature"}
    assert key(no_t) == key({**BASE, "temperature": 1})
    assert key(no_t) != key(BASE)


def test_scope_route_and_endpoint_change_the_key():
    assert key(BASE, scope="alice") != key(BASE, scope="bob")
    assert key(BASE, route="chat") != key(BASE, route="support")
    assert key(BASE, endpoint="chat") != key(BASE, endpoint="completions")


def test_policy_hash_changes_with_any_setting():
    base = CachePolicy(name="faq")
    variants = [
        CachePolicy(name="faq", scope="namespace"),
        CachePolicy(name="faq", exact={"ttlSeconds": 60}),
        CachePolicy(name="faq", cacheable={"maxTemperature": 0.3}),
        CachePolicy(name="faq", localMaxBytes=1024 * 1024),
        CachePolicy(name="faq", semantic={"enabled": True, "embeddingBackend": "e", "threshold": 0.8}),
    ]
    hashes = {policy_hash(base)} | {policy_hash(v) for v in variants}
    assert len(hashes) == len(variants) + 1
    assert policy_hash(CachePolicy(name="faq")) == policy_hash(base)


def test_redis_keys_are_namespaced_with_a_cluster_hash_tag():
    k = keys.entry_key("shop", "faq", "abc123e0", "ff00")
    assert k == "kt:cache:{shop}:faq:abc123e0:e:ff00"
    assert keys.epoch_key("shop", "faq") == "kt:cache:{shop}:faq:epoch"
    assert keys.log_key("shop", "faq", "g").startswith("kt:cache:{shop}:faq:")


def test_semantic_split_last_user_message():
    body = keys.normalize_request(
        {
            "model": "m",
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "You are Acme's bot."},
                {"role": "user", "content": [{"type": "text", "text": "Where is my order?"}]},
            ],
        }
    )
    split = keys.semantic_split("chat", "chat", "alice", body, "lastUserMessage")
    assert split is not None and split.text == "Where is my order?"
    other_system = keys.normalize_request(
        {
            "model": "m",
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "You are Globex's bot."},
                {"role": "user", "content": "Where is my order?"},
            ],
        }
    )
    assert keys.semantic_split("chat", "chat", "alice", other_system, "lastUserMessage").partition != split.partition
    same_question_other_wording = keys.normalize_request(
        {
            "model": "m",
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "You are Acme's bot."},
                {"role": "user", "content": "Track my package"},
            ],
        }
    )
    assert (
        keys.semantic_split("chat", "chat", "alice", same_question_other_wording, "lastUserMessage").partition
        == split.partition
    )


def test_semantic_split_needs_a_user_question_in_text():
    tool_turn = keys.normalize_request(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "1"}]},
                {"role": "tool", "content": "{}", "tool_call_id": "1"},
            ]
        }
    )
    assert keys.semantic_split("chat", "r", "s", tool_turn, "lastUserMessage") is None
    image = keys.normalize_request(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    )
    assert keys.semantic_split("chat", "r", "s", image, "lastUserMessage") is None
    assert (
        keys.semantic_split("completions", "r", "s", keys.normalize_request({"prompt": "x"}), "lastUserMessage") is None
    )


def test_all_user_messages_mode_embeds_every_user_turn():
    body = keys.normalize_request(
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "I bought a Pro plan."},
                {"role": "assistant", "content": "Great!"},
                {"role": "user", "content": "How do I cancel it?"},
            ]
        }
    )
    split = keys.semantic_split("chat", "r", "s", body, "allUserMessages")
    assert split.text == "I bought a Pro plan.\nHow do I cancel it?"
    reworded_reply = keys.normalize_request(
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "I bought a Pro plan."},
                {"role": "assistant", "content": "Nice choice!"},
                {"role": "user", "content": "How do I cancel it?"},
            ]
        }
    )
    assert keys.semantic_split("chat", "r", "s", reworded_reply, "allUserMessages").partition == split.partition
    # ...while in lastUserMessage mode the earlier turns must match exactly.
    assert (
        keys.semantic_split("chat", "r", "s", reworded_reply, "lastUserMessage").partition
        != keys.semantic_split("chat", "r", "s", body, "lastUserMessage").partition
    )


def test_uncacheable_reasons():
    p = CachePolicy(name="faq", cacheable={"maxTemperature": 0.2})
    assert uncacheable_reason(p, "chat", {"temperature": 0.2}) == ""
    assert uncacheable_reason(p, "chat", {}) == "temperature"  # absent means 1
    assert uncacheable_reason(p, "chat", {"temperature": 0, "tools": [{"type": "function"}]}) == "tools"
    assert uncacheable_reason(p, "chat", {"temperature": 0, "functions": [{"name": "f"}]}) == "tools"
    assert uncacheable_reason(p, "embeddings", {"temperature": 0}) == "endpoint"
    off = CachePolicy(name="off", exact={"enabled": False})
    assert uncacheable_reason(off, "chat", {"temperature": 0}) == "disabled"
