"""Error-rate control wired into the cache stage (semantic.targetErrorRate), against a real Redis.

The controller's statistics are tested alone in test_cache_error_control.py; here a stream
of questions whose truth is known goes through `CacheStage.lookup` and `store` as the
pipeline drives them: a candidate the controller does not serve is a miss, the upstream's
answer is compared with the cached one (text, numbers, then the answers' embeddings, a call
that is billed), and the verdict teaches the controller. What is checked: nothing is served
before enough answers were compared, the wrong hits served stay within the target, the
learned threshold sits above the similarities where answers differ, the comparison's
embedding call is billed, the metrics and the report the operator reads say the same, and a
failed comparison teaches nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from kubetoll_core.cache_health import pooled_control_status, read_control_reports
from kubetoll_core.router_config import RouterConfig
from kubetoll_core.spend_record import CACHE_EMBEDDING_OUTCOME
from kubetoll_sidecar.cache import CacheStage
from kubetoll_sidecar.cache.answer_match import answer_text
from kubetoll_sidecar.providers.base import Usage
from support.cache_stage import answer, make_config, request, sample
from support.kopf_env import LOCAL_BACKEND, NS, Kubectl, eventually, route_to_local
from support.redis_server import RedisProcess
from test_cache_degraded import EMBEDDINGS

DIM = 64
STORED_Q = "stored question"
RIGHT = "Open Settings, then Security, then Reset password."
WRONG = "Your plan renews on the first day of each month."
TARGET = 0.05
BOUNDARY = 0.85  # below this similarity the cached answer is wrong for the new question


def unit(v: np.ndarray) -> list[float]:
    return [float(x) for x in v / np.linalg.norm(v)]


class Embedder:
    """Question vectors at chosen cosines to the stored question; the two answers far apart."""

    def __init__(self) -> None:
        self.vectors: dict[str, list[float]] = {}
        self.fail_answers = False
        self.calls: list[list[str]] = []
        e = np.eye(DIM)
        self.vectors[STORED_Q] = unit(e[0])
        self.vectors[RIGHT] = unit(e[1])
        self.vectors[WRONG] = unit(e[1] * 0.3 + e[2] * math.sqrt(1 - 0.09))  # cosine 0.3 with RIGHT

    def question(self, i: int, s: float) -> str:
        """A new question whose cosine with the stored one is `s` (and low with every other new one)."""
        text = f"asked {i}"
        other = np.eye(DIM)[3 + i % (DIM - 3)]
        self.vectors[text] = unit(s * np.eye(DIM)[0] + math.sqrt(1 - s * s) * other)
        return text

    async def __call__(self, texts: list[str]) -> Any:
        self.calls.append(list(texts))
        if self.fail_answers and any(t in (RIGHT, WRONG) for t in texts):
            raise RuntimeError("embedding server down")
        return [self.vectors[t] for t in texts], Usage(prompt_tokens=4 * len(texts)), 0.000001 * len(texts)


def controlled(ns: str, target: float = TARGET, **semantic: Any) -> Any:
    return make_config(
        ns,
        "http://127.0.0.1:9/v1",
        exact={"enabled": False},
        semantic={
            "enabled": True,
            "embeddingBackend": "embedder",
            "threshold": 0.5,
            "verifier": {"kind": "none"},
            "targetErrorRate": target,
            **semantic,
        },
    )


def ask_body(question: str) -> dict[str, Any]:
    return request(question)


async def seeded(stage: CacheStage) -> None:
    lk = await stage.lookup("faq", "chat", "alice", "chat", ask_body(STORED_Q))
    assert lk.status == "miss" and lk.should_store
    assert await stage.store(lk, answer(RIGHT), Usage(30, 9), 0.004)


class Stream:
    """Plays questions with uniform similarities in [0.5, 1): the truth is RIGHT at or above BOUNDARY."""

    def __init__(self, stage: CacheStage, embedder: Embedder, seed: int = 7) -> None:
        self.stage, self.embedder, self.rng = stage, embedder, random.Random(seed)
        self.served = self.served_wrong = self.first_hit = 0
        self.billed: list[tuple[str, Any]] = []
        self.n = 0

    async def bill(self, outcome: str, charge: Any) -> None:
        self.billed.append((outcome, charge))

    async def play(self, count: int) -> None:
        for _ in range(count):
            self.n += 1
            s = self.rng.uniform(0.5, 0.999)
            truth = RIGHT if s >= BOUNDARY else WRONG
            # no-store: the stream's questions must not become candidates of each other
            lk = await self.stage.lookup(
                "faq",
                "chat",
                "alice",
                "chat",
                ask_body(self.embedder.question(self.n, s)),
                {"x-kubetoll-cache-control": "no-store"},
            )
            if lk.hit is not None:
                self.served += 1
                self.first_hit = self.first_hit or self.n
                if truth != RIGHT:
                    self.served_wrong += 1
                continue
            lk.bill_later = self.bill
            if lk.wants_answer:
                await self.stage.store(lk, answer(truth), Usage(30, 9), 0.004)


async def test_hits_wait_for_evidence_then_stay_within_the_target(redis, ns, stages):
    stage = stages(ns, redis, instance="sc-a")
    embedder = Embedder()
    stage.configure(controlled(ns), embedders={"embedder": embedder})
    await seeded(stage)
    stream = Stream(stage, embedder)
    await stream.play(1500)
    rt = stage._policies["faq"]
    ctl = rt.control
    assert ctl is not None and ctl.threshold is not None
    # Closed until min_samples (100) answers were compared: no hit before that.
    assert stream.first_hit > 100
    assert stream.served > 200, "the controller never opened far enough to serve"
    # Every wrong answer lies below BOUNDARY, so a threshold that keeps within target is near or above it.
    assert ctl.threshold >= BOUNDARY - 0.05
    # The served error rate is within target (a Wilson lower bound below it, one-sided 99%).
    p = stream.served_wrong / stream.served
    assert p <= TARGET or p - 2.33 * math.sqrt(p * (1 - p) / stream.served) <= TARGET
    # Metrics agree with what was decided and compared.
    assert sample(stage, "kubetoll_cache_error_control_decisions_total", policy="faq", decision="hit") == stream.served
    explored = sample(stage, "kubetoll_cache_error_control_decisions_total", policy="faq", decision="explore")
    labelled = sample(stage, "kubetoll_cache_error_control_decisions_total", policy="faq", decision="label")
    assert explored > 0 and labelled > 100
    equal = sample(stage, "kubetoll_cache_error_control_comparisons_total", policy="faq", verdict="equal")
    differ = sample(stage, "kubetoll_cache_error_control_comparisons_total", policy="faq", verdict="not_similar")
    assert equal + differ == explored + labelled and equal > 0 and differ > 0
    stage._publish_gauges(list(stage._policies.values()))
    assert sample(stage, "kubetoll_cache_error_control_threshold", policy="faq") == pytest.approx(ctl.threshold)
    assert 0 < sample(stage, "kubetoll_cache_error_control_exploration_rate", policy="faq") <= 0.5
    assert sample(stage, "kubetoll_cache_error_control_target_error_rate", policy="faq") == TARGET
    # A comparison that was not equal text embedded both answers, billed like the lookup's own call.
    assert len(stream.billed) == differ
    assert all(o == CACHE_EMBEDDING_OUTCOME and c.backend == "embedder" for o, c in stream.billed)
    assert all(c.usage.prompt_tokens == 8 and c.cost_usd == pytest.approx(0.000002) for _, c in stream.billed)


async def test_the_operator_reads_what_each_sidecar_learned(redis, ns, stages):
    embedder = Embedder()
    stage = stages(ns, redis, instance="sc-a")
    stage.configure(controlled(ns), embedders={"embedder": embedder})
    await seeded(stage)
    await Stream(stage, embedder).play(400)
    other = stages(ns, redis, instance="sc-b")  # a second sidecar that has learned nothing yet
    other.configure(controlled(ns), embedders={"embedder": embedder})
    await other.sync_once()  # reads the stored question's vector from Redis
    lk = await other.lookup("faq", "chat", "alice", "chat", ask_body(embedder.question(9999, 0.9)))
    assert lk.status == "miss" and lk.compares  # closed: compared, not served
    for st in (stage, other):
        st._next_control_report = 0.0
        await st.sync_once()
    reports = await read_control_reports(redis, ns, "faq", stage._wall())
    assert sorted(r.sidecar for r in reports) == ["sc-a", "sc-b"]
    status = pooled_control_status(reports, TARGET)
    snap = stage._policies["faq"].control.snapshot()
    assert status["sidecars"] == 2 and status["targetErrorRate"] == TARGET
    assert status["closedSidecars"] == (1 if snap.threshold is not None else 2)
    assert status["explored"] == snap.explored and status["exploredWrong"] == snap.explored_wrong
    assert status["verifiedCorrect"] + status["verifiedWrong"] == snap.verified_correct + snap.verified_wrong
    if snap.threshold is not None:
        assert status["thresholdMin"] == status["thresholdMax"] == pytest.approx(snap.threshold, abs=1e-6)
    low, high = status["errorRateInterval"]
    assert low is None or low <= status["estimatedErrorRate"] <= high
    # A report for another target (a policy since changed) is not pooled with this one.
    assert pooled_control_status(reports, 0.01)["sidecars"] == 0
    # A sidecar that stops takes its report with it.
    await other.close()
    assert sorted(r.sidecar for r in await read_control_reports(redis, ns, "faq", stage._wall())) == ["sc-a"]


async def test_a_failed_comparison_teaches_nothing(redis, ns, stages):
    embedder = Embedder()
    embedder.fail_answers = True
    stage = stages(ns, redis)
    stage.configure(controlled(ns), embedders={"embedder": embedder})
    await seeded(stage)
    stream = Stream(stage, embedder)
    await stream.play(60)
    snap = stage._policies["faq"].control.snapshot()
    failed = sample(stage, "kubetoll_cache_error_control_comparisons_total", policy="faq", verdict="similarity_failed")
    equal = sample(stage, "kubetoll_cache_error_control_comparisons_total", policy="faq", verdict="equal")
    # Equal text needs no embedding, so only those are learned; nothing failed was billed.
    assert failed > 0 and equal > 0
    assert snap.verified_correct + snap.verified_wrong == equal
    assert stream.billed == []


async def test_a_new_target_relearns_and_an_unrelated_change_keeps_the_controller(redis, ns, stages):
    embedder = Embedder()
    stage = stages(ns, redis)
    stage.configure(controlled(ns), embedders={"embedder": embedder})
    await seeded(stage)
    await Stream(stage, embedder).play(150)
    ctl = stage._policies["faq"].control
    assert ctl is not None and ctl.snapshot().samples > 0
    stage.configure(controlled(ns, embeddingTimeoutMs=900), embedders={"embedder": embedder})
    assert stage._policies["faq"].control is ctl
    stage.configure(controlled(ns, target=0.02), embedders={"embedder": embedder})
    assert stage._policies["faq"].control is None  # rebuilt on the next candidate
    cfg = make_config(
        ns,
        "http://127.0.0.1:9/v1",
        exact={"enabled": False},
        semantic={"enabled": True, "embeddingBackend": "embedder", "threshold": 0.5, "verifier": {"kind": "none"}},
    )
    stage.configure(cfg, embedders={"embedder": embedder})
    # Without a target the fixed threshold serves again, at once.
    lk = await stage.lookup("faq", "chat", "alice", "chat", ask_body(embedder.question(5000, 0.7)))
    assert lk.hit is not None and stage._policies["faq"].control is None


def test_answer_text_reads_every_cached_api_and_tool_calls():
    chat = answer("Hello")
    chat["choices"][0]["message"]["tool_calls"] = [
        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"id": 7}'}}
    ]
    assert answer_text("chat", chat) == 'Hello\nlookup({"id": 7})'
    assert answer_text("completions", {"choices": [{"index": 0, "text": "Hi"}]}) == "Hi"
    responses = {
        "output": [
            {"type": "message", "content": [{"type": "output_text", "text": "A"}]},
            {"type": "function_call", "name": "f", "arguments": "{}"},
        ]
    }
    assert answer_text("responses", responses) == "A\nf({})"
    messages = {
        "content": [{"type": "text", "text": "B"}, {"type": "tool_use", "name": "g", "input": {"b": 1, "a": 2}}]
    }
    assert answer_text("messages", messages) == 'B\ng({"a":2,"b":1})'
    assert answer_text("chat", {"choices": [{"message": {"content": None}}]}) is None
    assert answer_text("chat", "not a body") is None
    assert answer_text("embeddings", {"data": []}) is None


# --------------------------------------------------------------------------- the CachePolicy's status

CONTROLLED_POLICY = {
    "apiVersion": "kubetoll.dev/v1alpha1",
    "kind": "CachePolicy",
    "metadata": {"name": "faq"},
    "spec": {
        "exact": {"enabled": False},
        "semantic": {
            "enabled": True,
            "embeddingBackend": "emb",
            "threshold": 0.5,
            "verifier": {"kind": "none"},
            "targetErrorRate": TARGET,
        },
    },
}


@pytest.fixture
def redis_proc() -> Iterator[RedisProcess]:
    proc = RedisProcess().start()
    yield proc
    proc.stop()


async def test_the_operator_writes_error_control_into_the_policy_status(
    kubectl: Kubectl, start_operator: Any, redis_proc: RedisProcess
) -> None:
    for doc in (LOCAL_BACKEND, EMBEDDINGS, route_to_local(cachePolicy="faq"), CONTROLLED_POLICY):
        await kubectl.apply(doc)
    await start_operator(redis_url=redis_proc.url, spend_interval_seconds=0.1)

    async def compiled() -> RouterConfig:
        cm = await kubectl.get("ConfigMap", "kubetoll-router")
        config = RouterConfig.model_validate_json(cm["data"]["router.json"])
        assert config.cache_policies[0].semantic.target_error_rate == TARGET
        return config

    config = await eventually(compiled)
    client = aioredis.from_url(redis_proc.url)
    stage = CacheStage(NS, client, redis_timeout=0.5, instance="pod-a")
    try:
        embedder = Embedder()
        stage.configure(config, embedders={"emb": embedder})
        await seeded(stage)
        await Stream(stage, embedder).play(300)
        stage._next_control_report = 0.0  # due now (the sync task may have reported a moment ago)
        await stage.sync_once()
        snap = stage._policies["faq"].control.snapshot()

        async def reported() -> dict[str, Any]:
            ec = (await kubectl.get("CachePolicy", "faq")).get("status", {}).get("errorControl")
            assert ec and ec["sidecars"] == 1 and ec["explored"] == snap.explored, ec
            return ec

        ec = await eventually(reported)
        assert ec["targetErrorRate"] == TARGET and ec["served"] == snap.decisions["hit"]
        assert ec["verifiedCorrect"] == snap.verified_correct and ec["verifiedWrong"] == snap.verified_wrong
        assert (ec.get("thresholdMin") is None) == (snap.threshold is None)

        # Error control turned off: the status says nothing about it any more.
        await kubectl.patch("CachePolicy", "faq", {"spec": {"semantic": {"targetErrorRate": None, "threshold": 0.5}}})

        async def cleared() -> None:
            assert "errorControl" not in (await kubectl.get("CachePolicy", "faq")).get("status", {})

        await eventually(cleared)
    finally:
        await stage.close()
        await client.aclose()
