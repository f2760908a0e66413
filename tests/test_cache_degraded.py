"""Losing the semantic tier is seen: per-policy timeouts, a circuit per part, a gauge, one log line, a condition.

A slow or failing embedding (or verifier) backend makes semantic lookups miss,
never error; enough failures in a row open that part's circuit, and while it is
open nobody waits on the backend, `kubetoll_cache_semantic_degraded{policy,part}`
is 1, one WARNING says so (one INFO when it recovers), and the sidecar's report
in Redis becomes the CachePolicy's `Degraded` condition through the operator
(kopf on kmock's emulator, a real redis-server). Real parts throughout: Redis,
an embedding server that hangs on demand, the rerank simulator, the sidecar.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from kubetoll_core.cache_health import TTL_SECONDS, DegradedReport, live_reports, read_degraded
from kubetoll_core.enums import VerifierKind
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import CachePolicy, RouterConfig
from kubetoll_operator.cache_health import degraded_condition
from kubetoll_sidecar.cache import CacheStage, http_embedder
from kubetoll_sidecar.cache.embeddings import EmbeddingFailed, HashedEmbedder
from kubetoll_sidecar.cache.verifiers import Judgement, ModelVerifier
from kubetoll_sidecar.providers.base import Usage
from support.cache_stage import FakeClock, ask, request, sample
from support.harness import base_config
from support.kopf_env import LOCAL_BACKEND, NS, Kubectl, condition, eventually, route_to_local
from support.redis_server import RedisProcess

STORED = "How do I reset my password?"
PARAPHRASE = "how can I reset my password"

# --------------------------------------------------------------------------- fixtures and helpers


def config(ns: str, embed_url: str = "http://127.0.0.1:9/v1", verifier: dict[str, Any] | None = None, **semantic):
    sem: dict[str, Any] = {"enabled": True, "embeddingBackend": "embedder", "threshold": 0.5, **semantic}
    if verifier is not None:
        sem["verifier"] = verifier
    backends = [
        {"name": "primary", "provider": "openai", "model": "gpt-4o", "endpoint": "http://127.0.0.1:9/v1"},
        {"name": "embedder", "provider": "openai-compatible", "model": "hashed", "endpoint": embed_url},
        {"name": "reranker", "provider": "openai-compatible", "model": "bge", "endpoint": "http://127.0.0.1:9"},
    ]
    return RouterConfig.model_validate(
        {
            "namespace": ns,
            "backends": backends,
            "routes": [{"name": "chat", "rules": [{"backends": ["primary"]}], "cachePolicy": "faq"}],
            "cachePolicies": [{"name": "faq", "cacheable": {"maxTemperature": 0.5}, "semantic": sem}],
        }
    )


def degraded(stage: CacheStage, part: str) -> float:
    return sample(stage, "kubetoll_cache_semantic_degraded", policy="faq", part=part)


class Switch:
    """An EmbedFn or verifier score function that fails while `failing` is set, and counts its calls."""

    def __init__(self, ok: Any) -> None:
        self.ok, self.failing, self.calls = ok, False, 0

    async def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.failing:
            raise EmbeddingFailed("embedder: HTTP 503")
        return await self.ok(*args)


def fake_verifier(score: Switch) -> ModelVerifier:
    return ModelVerifier(VerifierKind.rerank, "reranker", "rerank|test", 0.5, score)


async def always_yes(question: str, stored: str) -> Judgement:
    return Judgement(0.9, Usage(prompt_tokens=10), 0.0)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kubetoll.cache" and r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- the embedding part


async def test_a_slow_embedding_server_opens_the_circuit_and_it_closes_again(
    redis, ns, stages, embed_server, http, clock, caplog
):
    caplog.set_level(logging.INFO, logger="kubetoll.cache")
    stage = stages(ns, redis, **clock.clocks)
    cfg = config(
        ns,
        embed_server.url,
        embeddingTimeoutMs=50,
        circuitBreaker={"failureThreshold": 2, "cooldownSeconds": 5},
    )
    # The client's own bound is generous: the policy's 50 ms is what cuts the call.
    stage.configure(cfg, {"embedder": http_embedder(http, embed_server.url, "hashed", timeout=10)})
    await ask(stage, request(STORED), reply="Use the reset link.")
    assert degraded(stage, "embedding") == 0

    embed_server.hang = 0.5  # a loaded node: every embedding takes longer than the policy allows
    lk = await ask(stage, request(PARAPHRASE))
    assert lk.status == "miss" and lk.reason == "embedding_failed" and degraded(stage, "embedding") == 0
    lk = await ask(stage, request(PARAPHRASE))  # the second failure in a row opens the circuit
    assert lk.status == "miss" and degraded(stage, "embedding") == 1
    assert stage.health.degraded("faq", "embedding") and "no answer within 50 ms" in stage.health.reason(
        "faq", "embedding"
    )
    calls = embed_server.calls
    for _ in range(5):  # open: no call at all, a miss at once
        assert (await ask(stage, request(PARAPHRASE))).reason == "embedding_unavailable"
    assert embed_server.calls == calls
    assert sample(stage, "kubetoll_cache_embedding_calls_total", policy="faq", result="skipped") == 5
    assert (await ask(stage, request(STORED))).hit is not None  # the exact tier needs no embedding

    clock.advance(5.0)  # the cool-down is over: one probe, which fails: open again, still degraded
    assert (await ask(stage, request(PARAPHRASE))).reason == "embedding_failed"
    assert embed_server.calls == calls + 1 and degraded(stage, "embedding") == 1
    assert (await ask(stage, request(PARAPHRASE))).reason == "embedding_unavailable"

    embed_server.hang = 0.0
    clock.advance(5.0)
    lk = await ask(stage, request(PARAPHRASE))  # the probe succeeds: closed, serving again
    assert lk.hit is not None and lk.hit.kind == "semantic" and degraded(stage, "embedding") == 0
    # Once on each transition, never per request.
    assert len(warnings_of(caplog)) == 1 and "embedding backend embedder is unavailable" in warnings_of(caplog)[0]
    assert any("semantic tier recovered" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


async def test_no_embedder_for_the_backend_is_degraded_at_once(redis, ns, stages, caplog):
    caplog.set_level(logging.INFO, logger="kubetoll.cache")
    stage = stages(ns, redis)
    stage.configure(config(ns), {})
    assert degraded(stage, "embedding") == 1
    assert (await ask(stage, request(STORED))).reason == "embedding_unavailable"
    stage.configure(config(ns), {})  # a reload with the same trouble: no second warning
    assert len(warnings_of(caplog)) == 1 and "no embedder for backend embedder" in warnings_of(caplog)[0]


# --------------------------------------------------------------------------- the verifier part


async def test_a_failing_verifier_degrades_its_part_and_the_tier_stops_embedding(redis, ns, stages, clock):
    stage = stages(ns, redis, **clock.clocks)
    embed = Switch(lambda texts: _hashed(texts))
    score = Switch(always_yes)
    cfg = config(ns, verifier={"kind": "rerank", "backend": "reranker"}, circuitBreaker={"failureThreshold": 1})
    stage.configure(cfg, {"embedder": embed}, {"faq": fake_verifier(score)})
    await ask(stage, request(STORED), reply="Use the reset link.")
    assert (await ask(stage, request(PARAPHRASE))).hit is not None
    score.failing = True
    lk = await ask(stage, request("how could I reset my password"))
    assert lk.hit is None and lk.reason == "verifier_failed"
    assert degraded(stage, "verifier") == 1 and degraded(stage, "embedding") == 0
    embeds = embed.calls
    lk = await ask(stage, request("how would I reset my password"))
    # Nothing could be confirmed: the embedding is not paid for either.
    assert lk.reason == "verifier_unavailable" and lk.embedding is None and embed.calls == embeds
    assert sample(stage, "kubetoll_cache_verifier_calls_total", policy="faq", kind="rerank", result="skipped") == 1
    score.failing = False
    clock.advance(10.0)  # the default cool-down
    assert (await ask(stage, request("how would I reset my password"))).hit is not None
    assert degraded(stage, "verifier") == 0
    # A policy whose verifier has no client: degraded from the start.
    stage.configure(cfg, {"embedder": embed}, {})
    assert degraded(stage, "verifier") == 1
    assert (await ask(stage, request("how should I reset my password"))).reason == "verifier_unavailable"


async def _hashed(texts: list[str]) -> Any:
    return HashedEmbedder().encode(texts), Usage(prompt_tokens=len(texts)), 0.0


# --------------------------------------------------------------------------- the report in Redis


async def test_the_sidecar_reports_a_degraded_part_in_redis_refreshes_and_clears_it(r, redis, ns, stages, clock):
    stage = stages(ns, redis, instance="pod-a", **clock.clocks)
    embed = Switch(lambda texts: _hashed(texts))
    cfg = config(ns, circuitBreaker={"failureThreshold": 1, "cooldownSeconds": 100})
    stage.configure(cfg, {"embedder": embed})
    key = RedisKeys(ns).cache_health("faq")
    await stage.sync_once()
    assert await r.hgetall(key) == {}  # healthy: nothing written
    embed.failing = True
    await ask(stage, request(STORED))
    assert await r.hgetall(key) == {}  # not on the request path: the background sync writes it
    await stage.sync_once()
    fields = await r.hgetall(key)
    assert list(fields) == ["embedding:pod-a"]
    (report,) = await read_degraded(r, ns, "faq", clock.now)
    assert (report.part, report.backend, report.sidecar) == ("embedding", "embedder", "pod-a")
    assert "HTTP 503" in report.reason and report.until == pytest.approx(clock.now + TTL_SECONDS)
    assert 0 < await r.ttl(key) <= TTL_SECONDS + 1
    # While degraded it is refreshed, so it keeps counting; a report nobody refreshes stops counting.
    clock.advance(25.0)
    await stage.sync_once()
    (refreshed,) = await read_degraded(r, ns, "faq", clock.now)
    assert refreshed.until == pytest.approx(clock.now + TTL_SECONDS) and refreshed.since == report.since
    assert await read_degraded(r, ns, "faq", clock.now + TTL_SECONDS + 1) == []
    # Recovered: the field goes.
    embed.failing = False
    clock.advance(100.0)
    assert (await ask(stage, request(STORED))).status == "miss" and degraded(stage, "embedding") == 0
    await stage.sync_once()
    assert await r.hgetall(key) == {}
    # Degraded at shutdown: the report leaves with the sidecar.
    embed.failing = True
    await ask(stage, request(PARAPHRASE))
    await stage.sync_once()
    assert await r.hexists(key, "embedding:pod-a")
    await stage.close()
    assert not await r.hexists(key, "embedding:pod-a")


async def test_the_namespace_user_writes_its_reports_and_the_operator_user_reads_them(clock) -> None:
    """With the ACL lines of docs/redis-layout.md: no new grant is needed, and no namespace reaches another's."""
    from test_redis_auth import ADMIN_PW, PASSWORDS, USERS, acl_args

    proc = RedisProcess(args=("--requirepass", ADMIN_PW)).start()
    clients: list[Any] = []
    try:
        admin = aioredis.Redis(port=proc.port, password=ADMIN_PW)
        clients.append(admin)
        for who in ("operator", "team-a"):
            await admin.execute_command("ACL", "SETUSER", *acl_args(None if who == "operator" else who, PASSWORDS[who]))
        team_a = aioredis.Redis(port=proc.port, username=USERS["team-a"], password=PASSWORDS["team-a"])
        operator = aioredis.Redis(port=proc.port, username=USERS["operator"], password=PASSWORDS["operator"])
        clients += [team_a, operator]
        embed = Switch(lambda texts: _hashed(texts))
        embed.failing = True
        stage = CacheStage("team-a", team_a, redis_timeout=0.5, instance="pod-a", **clock.clocks)
        try:
            stage.configure(config("team-a", circuitBreaker={"failureThreshold": 1}), {"embedder": embed})
            await stage.sync_once()  # reads the epoch first (the stage uses Redis only once it knows it)
            await ask(stage, request(STORED))
            await stage.sync_once()
            assert stage.guard.last_error == ""  # no NOPERM on the way
            (report,) = await read_degraded(operator, "team-a", "faq", clock.now)
            assert report.sidecar == "pod-a" and report.backend == "embedder"
            # The namespace user cannot read (or write) another namespace's reports.
            with pytest.raises(NoPermissionError):
                await team_a.hgetall(RedisKeys("team-b").cache_health("faq"))
        finally:
            await stage.close()
    finally:
        for c in clients:
            await c.aclose()
        proc.stop()


def test_reports_that_expired_or_do_not_parse_do_not_count() -> None:
    now = 1_000_000.0
    live = DegradedReport("verifier", "rr", "HTTP 500", now - 30, now + 30).to_json()
    fields = {
        b"verifier:pod-a": live,
        b"embedding:pod-b": DegradedReport("embedding", "emb", "x", now - 90, now - 1).to_json(),
        b"embedding:pod-c": b"{not json",
        b"frobnicator:pod-d": orjson.dumps({"part": "frobnicator", "backend": "b", "since": 1, "until": now + 9}),
    }
    (report,) = live_reports(fields, now)
    assert (report.part, report.backend, report.sidecar) == ("verifier", "rr", "pod-a")
    policy = CachePolicy.model_validate({"name": "faq", "semantic": {"enabled": True, "embeddingBackend": "emb"}})
    c = degraded_condition(policy, [report])
    assert (c["status"], c["reason"]) == ("True", "VerifierUnavailable") and "rr unavailable in 1 sidecar" in c[
        "message"
    ]
    emb = DegradedReport("embedding", "emb", "no answer within 2000 ms", now, now + 60, "pod-b")
    c = degraded_condition(policy, [report, emb])
    assert c["reason"] == "EmbeddingUnavailable" and c["message"].startswith("embedding backend emb unavailable")
    assert degraded_condition(policy, [])["status"] == "False"
    exact_only = CachePolicy.model_validate({"name": "faq"})
    assert degraded_condition(exact_only, [])["reason"] == "NoSemanticTier"


# --------------------------------------------------------------------------- the sidecar: per-policy timeout


async def test_the_sidecar_bounds_the_embedding_by_the_policy_and_shows_the_gauge(sim, start_sidecar, embed_server):
    cfg = base_config(sim.url)
    cfg["backends"].append(
        {
            "name": "embedder",
            "provider": "openai-compatible",
            "model": "hashed",
            "endpoint": embed_server.url,
            "pricing": {"inputPerMTok": 0.02, "outputPerMTok": 0},
        }
    )
    semantic = {
        "enabled": True,
        "embeddingBackend": "embedder",
        "embeddingTimeoutMs": 100,
        "circuitBreaker": {"failureThreshold": 1, "cooldownSeconds": 60},
    }
    cfg["cachePolicies"] = [{"name": "faq", "exact": {"enabled": False}, "semantic": semantic}]
    cfg["routes"][0]["cachePolicy"] = "faq"
    sc = await start_sidecar(cfg)
    embed_server.hang = 3.0  # longer than the sidecar's 2 s default would have waited
    body = {"model": "chat", "messages": [{"role": "user", "content": STORED}], "temperature": 0}
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200 and resp.headers["x-kubetoll-cache"] == "miss"
        async with s.get(sc.ops_url + "/metrics") as resp:
            text = await resp.text()
    assert 'kubetoll_cache_semantic_degraded{part="embedding",policy="faq"} 1.0' in text
    # Cut by the policy's 100 ms, not by a default.
    assert sc.sidecar.cache is not None
    assert "no answer within 100 ms" in sc.sidecar.cache.health.reason("faq", "embedding")


# --------------------------------------------------------------------------- the operator's Degraded condition


@pytest.fixture
def redis_proc() -> Iterator[RedisProcess]:
    proc = RedisProcess().start()
    yield proc
    proc.stop()


EMBEDDINGS = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "ModelBackend",
    "metadata": {"name": "emb"},
    "spec": {
        "provider": "openai-compatible",
        "model": "e",
        "endpoint": "http://emb:8000/v1",
        "pricing": {"inputPerMTok": 0.02, "outputPerMTok": 0},
    },
}
RERANKER = {**EMBEDDINGS, "metadata": {"name": "rr"}, "spec": {**EMBEDDINGS["spec"], "endpoint": "http://tei:8080"}}
POLICY = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "CachePolicy",
    "metadata": {"name": "faq"},
    "spec": {
        "semantic": {
            "enabled": True,
            "embeddingBackend": "emb",
            "verifier": {"kind": "rerank", "backend": "rr", "api": "tei"},
            "circuitBreaker": {"failureThreshold": 1, "cooldownSeconds": 30},
        }
    },
}


async def test_the_operator_sets_the_degraded_condition_from_the_sidecars_reports(
    kubectl: Kubectl, start_operator: Any, redis_proc: RedisProcess
) -> None:
    for doc in (LOCAL_BACKEND, EMBEDDINGS, RERANKER, route_to_local(cachePolicy="faq"), POLICY):
        await kubectl.apply(doc)
    await start_operator(redis_url=redis_proc.url, spend_interval_seconds=0.1)

    async def compiled() -> RouterConfig:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        config = RouterConfig.model_validate_json(cm["data"]["router.json"])
        assert [p.name for p in config.cache_policies] == ["faq"]
        return config

    config = await eventually(compiled)

    async def degraded_is(status: str, reason: str) -> dict[str, Any]:
        c = condition(await kubectl.get("CachePolicy", "faq"), "Degraded")
        assert (c["status"], c["reason"]) == (status, reason), c
        return c

    await eventually(lambda: degraded_is("False", "SemanticTierServing"))

    # A sidecar of the namespace (a real CacheStage on the same Redis) loses its embedding backend.
    clock = FakeClock()
    client = aioredis.from_url(redis_proc.url)
    stage = CacheStage(NS, client, redis_timeout=0.5, instance="pod-a", **clock.clocks)
    try:
        embed = Switch(lambda texts: _hashed(texts))
        embed.failing = True
        stage.configure(config, {"emb": embed}, {"faq": fake_verifier(Switch(always_yes))})
        await stage.lookup("faq", "chat", "t", "chat", request(STORED))
        await stage.sync_once()
        c = await eventually(lambda: degraded_is("True", "EmbeddingUnavailable"))
        assert "embedding backend emb unavailable in 1 sidecar" in c["message"] and "HTTP 503" in c["message"]
        ready = condition(await kubectl.get("CachePolicy", "faq"), "Ready")
        assert ready["status"] == "True"  # the policy is in force; it serves its exact tier

        # A recompile (the spec changes) keeps the reporter's condition.
        await kubectl.patch("CachePolicy", "faq", {"spec": {"exact": {"ttlSeconds": 120}}})

        async def recompiled() -> None:
            cm = await kubectl.get("ConfigMap", "kubetoll-router")
            assert json_ttl(cm) == 120
            await degraded_is("True", "EmbeddingUnavailable")

        await eventually(recompiled)

        # The embedding comes back (the probe after the cool-down succeeds)...
        embed.failing = False
        clock.advance(30.0)
        assert (await stage.lookup("faq", "chat", "t", "chat", request(STORED))).embedding is not None
        await stage.sync_once()
        await eventually(lambda: degraded_is("False", "SemanticTierServing"))
        # ... but then this sidecar has no client for the verifier's backend.
        stage.configure(config, {"emb": embed}, {})
        await stage.sync_once()
        c = await eventually(lambda: degraded_is("True", "VerifierUnavailable"))
        assert "verifier backend rr unavailable" in c["message"] and "no rerank verifier for backend rr" in c["message"]

        # Healthy again: False.
        stage.configure(config, {"emb": embed}, {"faq": fake_verifier(Switch(always_yes))})
        await stage.lookup("faq", "chat", "t", "chat", request(STORED))
        await stage.sync_once()
        await eventually(lambda: degraded_is("False", "SemanticTierServing"))
    finally:
        await stage.close()
        await client.aclose()


def json_ttl(cm: dict[str, Any]) -> int:
    config = RouterConfig.model_validate_json(cm["data"]["router.json"])
    return config.cache_policies[0].exact.ttl_seconds
