"""Error-rate control (`semantic.targetErrorRate`) on the labelled pairs, through a running sidecar over HTTP.

The quality bench (`cache_semantic_quality.py`) asks each pair once, with a fixed
threshold. Error-rate control learns while it serves, so this bench replays the
pairs of one split as traffic, `--rounds` times, through one sidecar process whose
cache policy sets `targetErrorRate`: in each round every pair's `a` is asked (and
stored) in a tenant of that round, then every `b`. The upstream answers as a
support team would: the same answer for the questions of a `same` pair, another
one for a `different` pair's `b`. So when a candidate is explored (or compared
below the learned threshold), the fresh answer equals the cached one exactly when
the pair is `same`: the comparison the controller learns from is true to the labels.

Per round: the semantic hits served (the `x-kubetoll-cache: hit-semantic` header),
how many were wrong (a `different` pair's `b` answered with `a`'s answer),
precision and recall over the split, and the controller's state from the
sidecar's metrics (threshold, exploration rate, decisions).

What it measures is how the controller behaves on this traffic, learning on it as
it would in production; no threshold or rule is chosen from it.

    .venv/bin/python bench/cache_error_control.py                       # test split, target 0.02, 6 rounds
    .venv/bin/python bench/cache_error_control.py --split dev --target 0.05 --verifier '{"kind": "none"}'

The model is all-MiniLM-L6-v2 when installed (see cache_semantic_quality.py), else
the hashed embedder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp

import cache_semantic_quality as quality
from benchsupport import listen_port, metric_samples, stop, tempdir
from kubetoll_sidecar.cache.embeddings import EmbeddingServer, HashedEmbedder

Pair = dict[str, str]


def truthful_answers(pairs: list[Pair]) -> tuple[dict[str, str], list[Pair]]:
    """Each question's answer (a `same` pair's `b` gets its `a`'s), and the pairs whose truth is consistent.

    A question asked in two pairs whose labels would give it two different answers is left out
    with both pairs: the upstream could not answer it truthfully for both.
    """
    answers: dict[str, str] = {}
    clash: set[str] = set()
    for p in pairs:
        for q, ans in (
            (p["a"], quality.answer_for(p["a"])),
            (p["b"], quality.answer_for(p["a" if p["label"] == "same" else "b"])),
        ):
            if answers.setdefault(q, ans) != ans:
                clash.add(q)
    kept = [p for p in pairs if p["a"] not in clash and p["b"] not in clash]
    return answers, kept


class TruthfulUpstream(quality.DistinctAnswerUpstream):
    """`DistinctAnswerUpstream` answering from the labels (`truthful_answers`)."""

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__()
        self.answers = answers

    def answer(self, question: str) -> str | None:
        return self.answers.get(question)


def gauge(text: str, name: str) -> float | None:
    values = [v for _, v in metric_samples(text, name)]
    return values[0] if values else None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    splits = quality.load_pairs(quality.QUICK_STRIDE if args.quick else 1)
    answers, pairs = truthful_answers(splits[args.split])
    loaded = quality.load_minilm() if args.embedder in ("auto", "minilm") else None
    encode, model = loaded if loaded else (HashedEmbedder().encode, "hashed bag of words (tests' embedder)")
    encoder = quality.MemoEncoder(encode, [q for p in pairs for q in (p["a"], p["b"])] + sorted(set(answers.values())))
    server = await EmbeddingServer(encoder, model="bench").start()
    upstream = await TruthfulUpstream(answers).start()
    verifier = quality.parse_verifier(args.verifier)
    api_port, metrics_port = listen_port(), listen_port()
    cfg = quality.router_config(
        quality.RunSpec(args.threshold, True), upstream.url, server.url, "bench", api_port, metrics_port, verifier, None
    )
    cfg["cachePolicies"][0]["semantic"]["targetErrorRate"] = args.target
    quality.validated(cfg, verifier)
    n_same = sum(p["label"] == "same" for p in pairs)
    print(
        f"{model}; {args.split} split: {len(pairs)} pairs ({n_same} same, {len(pairs) - n_same} different); "
        f"threshold floor {args.threshold}, targetErrorRate {args.target}, verifier {verifier or 'rules'}"
    )
    rounds: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=args.concurrency + 8)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            with tempdir() as tmp:
                proc = await quality.start_sidecar(cfg, tmp / "router.json", tmp / "sidecar.log", http)
                try:
                    runner = quality.Runner(
                        http,
                        quality.RunSpec(args.threshold, True),
                        f"http://127.0.0.1:{api_port}",
                        f"http://127.0.0.1:{metrics_port}",
                        args.concurrency,
                    )
                    stored = 0.0
                    print(
                        f"  {'round':>5} | {'hits':>5} {'wrong':>5} | {'precision':>9} {'recall':>7} | "
                        f"{'threshold':>9} {'explore':>7} | decisions (hit/explore/label)"
                    )
                    for r in range(1, args.rounds + 1):
                        tenant = {p["id"]: f"{p['id']}-r{r}" for p in pairs}
                        await asyncio.gather(*(runner.ask(tenant[p["id"]], p["a"]) for p in pairs))
                        stored += len(pairs)
                        if await runner.wait_stored(stored) < stored:
                            raise RuntimeError(f"round {r}: not every answer was stored")
                        results = await asyncio.gather(*(runner.ask(tenant[p["id"]], p["b"]) for p in pairs))
                        hits = wrong = tp = 0
                        for p, (status, content, headers) in zip(pairs, results, strict=True):
                            if status != 200:
                                raise RuntimeError(f"round {r}: HTTP {status}: {content}")
                            if headers.get("x-kubetoll-cache") == "hit-semantic":
                                hits += 1
                                tp += p["label"] == "same"
                                wrong += p["label"] != "same"
                            else:
                                stored += 1  # the miss's answer is stored too
                        await runner.wait_stored(stored)  # and the comparisons are made on the store
                        text = await runner.metrics()
                        decisions = {
                            k: quality._counter_sum(text, "kubetoll_cache_error_control_decisions_total", decision=k)
                            for k in ("hit", "explore", "label")
                        }
                        verdicts: dict[str, float] = {}
                        for lab, v in metric_samples(text, "kubetoll_cache_error_control_comparisons_total"):
                            verdicts[lab.get("verdict", "?")] = verdicts.get(lab.get("verdict", "?"), 0.0) + v
                        thr = gauge(text, "kubetoll_cache_error_control_threshold")
                        explore = gauge(text, "kubetoll_cache_error_control_exploration_rate")
                        row = {
                            "round": r,
                            "hits": hits,
                            "wrong": wrong,
                            "precision": tp / hits if hits else None,
                            "recall": tp / n_same if n_same else 0.0,
                            "threshold": thr,
                            "exploration_rate": explore,
                            "decisions": decisions,
                            "comparisons": verdicts,
                        }
                        rounds.append(row)
                        prec = f"{row['precision']:.3f}" if hits else "-"
                        thr_text = "closed" if thr is None or thr != thr else f"{thr:.3f}"
                        print(
                            f"  {r:>5} | {hits:>5} {wrong:>5} | {prec:>9} {row['recall']:>7.3f} | {thr_text:>9} "
                            f"{(explore or 0):>7.3f} | {decisions['hit']:.0f}/{decisions['explore']:.0f}/"
                            f"{decisions['label']:.0f}  comparisons {dict(sorted(verdicts.items()))}",
                            flush=True,
                        )
                finally:
                    await asyncio.to_thread(stop, proc)
    finally:
        await upstream.stop()
        await server.stop()
    served = sum(r["hits"] for r in rounds)
    wrong = sum(r["wrong"] for r in rounds)
    print(
        f"all rounds: {served} semantic hits, {wrong} wrong ({(wrong / served if served else 0):.1%}); "
        f"upstream calls {upstream.calls}"
    )
    return {"model": model, "split": args.split, "target": args.target, "threshold": args.threshold, "rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--split", choices=["dev", "test"], default="test")
    ap.add_argument("--target", type=float, default=0.02, help="semantic.targetErrorRate (default 0.02)")
    ap.add_argument("--threshold", type=float, default=0.60, help="semantic.threshold, the floor (default 0.60)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--verifier", help="semantic.verifier as JSON (default: rules)")
    ap.add_argument("--embedder", choices=["auto", "minilm", "hashed"], default="auto")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="every sixth pair")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if not 0 < args.target < 0.5 or args.rounds < 1:
        raise SystemExit("--target must be in (0, 0.5) and --rounds at least 1")
    with asyncio.Runner(loop_factory=quality.loop_factory()) as loop:
        result = loop.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
