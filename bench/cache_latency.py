"""What the cache stage adds to a request, and what its entries cost in memory.

Prints, on one core:
* exact tier: a miss (key hash + LRU + one Redis GET), a hit from the local LRU,
  a hit from Redis (another sidecar's entry), and a miss with Redis down;
* semantic tier without the embedding call (a local encoder stands in for it):
  a miss and a hit at 1k, 10k and 100k entries in one partition, at 384 and
  1,536 dimensions (all-MiniLM-L6-v2; text-embedding-3-small), and the strict
  check's own cost;
* memory per 100,000 entries: the semantic index and the exact tier's LRU.

Uses a private `redis-server` from PATH (or REDIS_URL). Figures, never pass/fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / d) for d in ("core", "sidecar", "operator", "tools")]
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the sidecar runs it (see cache/semantic.py)
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from kubetoll_core.router_config import RouterConfig  # noqa: E402
from kubetoll_sidecar.cache import CacheStage  # noqa: E402
from kubetoll_sidecar.cache.lru import ByteLRU  # noqa: E402
from kubetoll_sidecar.cache.replay import Entry  # noqa: E402
from kubetoll_sidecar.cache.semantic import SemanticIndex  # noqa: E402
from kubetoll_sidecar.cache.verify import signature  # noqa: E402
from kubetoll_sidecar.providers.base import Usage  # noqa: E402

ANSWER_TEXT = "To cancel your order, open Orders, pick the order and choose Cancel. " * 8  # ~550 characters


def answer() -> dict[str, Any]:
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER_TEXT, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 120, "total_tokens": 160},
    }


def config(semantic: bool, dim: int = 384) -> RouterConfig:
    pol: dict[str, Any] = {"name": "faq"}
    if semantic:
        pol.update(
            exact={"enabled": False},
            semantic={"enabled": True, "embeddingBackend": "emb", "threshold": 0.56, "maxEntries": 200_000},
        )
    return RouterConfig.model_validate(
        {
            "namespace": "bench",
            "backends": [
                {"name": "p", "provider": "openai", "model": "gpt-4o", "endpoint": "http://127.0.0.1:9/v1"},
                {
                    "name": "emb",
                    "provider": "openai-compatible",
                    "model": "e",
                    "endpoint": "http://127.0.0.1:9/v1",
                    "pricing": {"inputPerMTok": 0, "outputPerMTok": 0},
                },
            ],
            "routes": [{"name": "chat", "rules": [{"backends": ["p"]}], "cachePolicy": "faq"}],
            "cachePolicies": [pol],
        }
    )


def body(q: str) -> dict[str, Any]:
    return {
        "model": "chat",
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are the support assistant of Acme. Be brief."},
            {"role": "user", "content": q},
        ],
    }


def fmt(samples_ns: list[int]) -> str:
    s = sorted(samples_ns)
    p50 = s[len(s) // 2] / 1000
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))] / 1000
    return f"p50 {p50:8.1f} µs   p99 {p99:8.1f} µs"


async def timed(n: int, fn: Any) -> list[int]:
    out = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        await fn(i)
        out.append(time.perf_counter_ns() - t0)
    return out


async def exact_figures(redis_url: str | None) -> None:
    import redis.asyncio as aioredis

    print("exact tier (chat request with a system prompt, ~550-character answer)")
    client = aioredis.from_url(redis_url) if redis_url else None
    stage = CacheStage("bench", client, redis_timeout=0.02)
    stage.configure(config(False))
    if client is not None:
        await client.ping()
    n = 2000
    # miss: hash + LRU miss + Redis GET (nothing stored)
    miss = await timed(n, lambda i: stage.lookup("faq", "chat", "t", "chat", body(f"miss question {i}")))
    print(f"  miss (hash, LRU, Redis GET)        {fmt(miss)}")
    lk = await stage.lookup("faq", "chat", "t", "chat", body("How do I cancel my order?"))
    await stage.store(lk, answer(), Usage(40, 120), 0.0013)
    hit = await timed(n, lambda i: stage.lookup("faq", "chat", "t", "chat", body("How do I cancel my order?")))
    print(f"  hit from the local LRU             {fmt(hit)}")
    rt = stage._policies["faq"]

    async def redis_hit(i: int) -> None:
        rt.lru.clear()  # as if another sidecar had stored it
        await stage.lookup("faq", "chat", "t", "chat", body("How do I cancel my order?"))

    if client is not None:
        print(f"  hit from Redis (another pod's)     {fmt(await timed(n, redis_hit))}")
    h = stage.metrics.registry
    hits = h.get_sample_value("kubetoll_cache_lookups_total", {"route": "chat", "policy": "faq", "result": "hit_exact"})
    print(f"  (hits counted: {int(hits or 0)})")
    render = [0] * n
    hit_obj = (await stage.lookup("faq", "chat", "t", "chat", body("How do I cancel my order?"))).hit
    for i in range(n):
        t0 = time.perf_counter_ns()
        hit_obj.json_bytes()
        render[i] = time.perf_counter_ns() - t0
    print(f"  render a hit as JSON               {fmt(render)}")
    for i in range(n):
        t0 = time.perf_counter_ns()
        hit_obj.sse_bytes(True)
        render[i] = time.perf_counter_ns() - t0
    print(f"  render a hit as an SSE replay      {fmt(render)}")
    down = CacheStage("bench", aioredis.from_url("redis://127.0.0.1:1/0"), redis_timeout=0.02)
    down.configure(config(False))
    first = time.perf_counter_ns()
    await down.lookup("faq", "chat", "t", "chat", body("x"))
    first = time.perf_counter_ns() - first
    later = await timed(n, lambda i: down.lookup("faq", "chat", "t", "chat", body(f"q {i}")))
    print(f"  Redis refusing: first lookup {first / 1e6:.2f} ms, then (cool-down) {fmt(later)}")
    await stage.close()
    await down.close()
    if client is not None:
        await client.aclose()


def unit(dim: int, rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def semantic_figures() -> None:
    print("\nsemantic tier, embedding call excluded (one partition holding every entry: the worst case)")
    rng = np.random.default_rng(0)
    questions = ["How do I cancel my order?", "Where is my package?", "Can I get a refund for order 1234?"]
    for q in questions:
        signature(q)  # warm the signature cache the way repeated traffic would
    t_sig = []
    for i in range(3000):
        q = f"Can I return item {i} after 30 days if it arrived damaged?"
        t0 = time.perf_counter_ns()
        signature.__wrapped__(q)
        t_sig.append(time.perf_counter_ns() - t0)
    print(f"  strict-check signature of a question {fmt(t_sig)}")
    for dim in (384, 1536):
        for size in (1_000, 10_000, 100_000):
            if dim == 1536 and size == 100_000 and os.environ.get("KT_BENCH_QUICK"):
                continue
            query = unit(dim, rng)[0]
            stored = query.copy()

            async def embed(texts: list[str], _q: np.ndarray = query) -> Any:
                return [_q], Usage(8, 0), 0.0

            stage = CacheStage("bench", None)
            stage.configure(config(True, dim), {"emb": embed})
            rt = stage._policies["faq"]
            index = rt.ensure_index()
            # Fill the index straight away (storing through the stage would embed each question).
            lk = await stage.lookup("faq", "chat", "t", "chat", body("How do I cancel my order?"))
            part, sig = lk._partition, lk._signature
            vecs = unit(dim, rng, size)
            vecs[:, :] = 0.5 * vecs + 0.0  # random directions: similarity to the query stays far below the threshold
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            exp = time.time() + 3600
            for i in range(size):
                index.add(f"e{i}", part, vecs[i], sig, exp)
            miss = await timed(
                300, lambda i, s=stage: s.lookup("faq", "chat", "t", "chat", body("How do I cancel my order?"))
            )
            # Now store the answer under the query's own vector: the same question becomes a hit.
            await stage.store(lk, answer(), Usage(40, 120), 0.0013)
            index.add(lk._key, part, stored, sig, exp)
            hit = await timed(
                300, lambda i, s=stage: s.lookup("faq", "chat", "t", "chat", body("how can I cancel my order"))
            )
            ok = (await stage.lookup("faq", "chat", "t", "chat", body("how can I cancel my order"))).hit is not None
            print(f"  {dim:5d} dims {size:7,d} entries: miss {fmt(miss)} | hit {fmt(hit)}{'' if ok else ' (NO HIT?)'}")
            await stage.close()
            index.clear()
            gc.collect()


def memory_figures() -> None:
    print("\nmemory per 100,000 entries")
    rng = np.random.default_rng(1)
    base = signature("How do I cancel my order for the Pro plan before Friday?")
    for dim in (384, 1536):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        index = SemanticIndex(100_000)
        exp = time.time() + 3600
        for chunk in range(10):
            vecs = unit(dim, rng, 10_000)
            for i in range(10_000):
                # 20 partitions, ids as the stage makes them (32 hex characters)
                # a signature of its own per entry, as entries read from Redis have
                sig = dataclasses.replace(base, numbers=(str(chunk * 10_000 + i),))
                index.add(
                    f"{chunk:02d}{i:06d}".ljust(32, "0"),
                    f"part{i % 20:02d}".ljust(32, "0"),
                    vecs[i],
                    sig.to_json(),
                    exp,
                )
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        print(
            f"  semantic index, {dim:4d} dims: {used / 2**20:7.1f} MiB measured ({used / 100_000:,.0f} B per entry; "
            f"vectors {4 * dim:,} B; the index's own estimate {index.nbytes / 2**20:.1f} MiB)"
        )
        del index
        gc.collect()
    raw = Entry("chat", answer(), 40, 120, 0, 0.0013, time.time()).dumps()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    lru = ByteLRU(1 << 40)
    for i in range(100_000):
        lru.put(f"{i:032x}", raw[:-8] + b"%08d" % (i % 10**8), time.time() + 3600)  # a distinct value each
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(
        f"  exact LRU, {len(raw):,}-byte entries: {used / 2**20:7.1f} MiB measured ({used / 100_000:,.0f} B per entry; "
        f"the byte bound counts {lru.bytes / 100_000:,.0f} B per entry)"
    )


async def main() -> None:
    url = os.environ.get("REDIS_URL")
    proc = None
    if not url:
        try:
            from support.redis_server import RedisProcess

            proc = RedisProcess().start()
            url = proc.url
        except RuntimeError as exc:
            print(f"(no Redis: {exc}; exact-tier figures are local only)")
    try:
        await exact_figures(url)
    finally:
        if proc:
            proc.stop()
    await semantic_figures()
    memory_figures()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
