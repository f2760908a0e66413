"""Time of the prompt token estimate (`kubetoll_sidecar.tokens.count_chat`), pipeline stage 4.

For a ~2k-token and a ~100k-token chat (a system prompt and alternating
user/assistant turns of English-like text), per call:

- cold: a conversation never seen before (what tiktoken itself costs);
- warm: the same conversation again, as freshly parsed strings, the way the
  sidecar sees a resent history (the memoised path: a hash and a lookup a message);
- next turn: the same history plus one new ~60-token user message (a multi-turn
  chat's usual request: history memoised, the new turn encoded).

Each figure is the median over many calls (min and p90 alongside). The strings
of each call are fresh objects parsed from JSON outside the timed region, so
Python's cached string hashes do not flatter the warm path.

    .venv/bin/python bench/token_estimate.py [--model gpt-4o-mini] [--runs 300]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson

import benchsupport as bs
from kubetoll_sidecar import tokens

TARGET_2K_MS = 0.1

WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who "
    "may down side been now find any new work part take get place made live where after back little only "
    "round man year came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell does set three "
    "want air well also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again animal point "
    "mother world near build self earth father kubernetes cluster namespace budget tenant latency router "
    "deployment container request response token model gateway invoice refund shipment customer account "
    "password configuration database replica throughput monitoring dashboard alert incident upgrade"
).split()


def sentence(rng: random.Random) -> str:
    n = rng.randint(6, 18)
    words = [rng.choice(WORDS) for _ in range(n)]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(1, 99999)))
    s = " ".join(words)
    return s[0].upper() + s[1:] + rng.choice((".", ".", ".", "?", "!", ","))


def text_of(rng: random.Random, tokens_wanted: int, enc) -> str:
    """English-like text of exactly `tokens_wanted` tokens (in `enc`)."""
    parts: list[str] = []
    chars = 0
    goal = tokens_wanted * 5  # characters: a little over what that many tokens take
    while True:
        while chars < goal:
            s = sentence(rng)
            parts.append(s)
            chars += len(s) + 1
        ids = enc.encode_ordinary(" ".join(parts))
        if len(ids) >= tokens_wanted:
            return enc.decode(ids[:tokens_wanted])
        goal += (tokens_wanted - len(ids)) * 6


def conversation(seed: int, total_tokens: int, turns: int, enc) -> list[dict]:
    rng = random.Random(seed)
    system = text_of(rng, 120, enc)
    per_turn = max(16, (total_tokens - 120) // turns)
    msgs = [{"role": "system", "content": system}]
    for i in range(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text_of(rng, per_turn, enc)})
    return msgs


def timed(calls: list[list[dict]], model: str) -> list[float]:
    out = []
    gc.collect()
    gc.disable()
    try:
        for msgs in calls:
            t0 = time.perf_counter()
            tokens.count_chat(msgs, model)
            out.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return out


def fmt(values: list[float]) -> str:
    v = sorted(values)
    p90 = v[min(len(v) - 1, int(len(v) * 0.9))]
    return (
        f"median {statistics.median(v) * 1000:9.4f} ms   (min {v[0] * 1000:.4f}, p90 {p90 * 1000:.4f}, {len(v)} calls)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="gpt-4o-mini", help="model whose encoding counts (default gpt-4o-mini: o200k_base)"
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=300,
        help="calls per figure for the 2k prompt (the 100k prompt uses a tenth, at least 10)",
    )
    args = ap.parse_args()

    choice = tokens.encoding_for_model(args.model)
    enc = tokens.get_encoding(choice.name)  # loaded once, as the sidecar does at start
    import tiktoken

    print("kubetoll prompt token estimate: tokens.count_chat")
    for line in bs.machine_lines()[:2]:
        print(line)
    print(
        f"model {args.model} -> encoding {choice.name}{' (approximate)' if choice.approximate else ''}; "
        f"tiktoken {tiktoken.__version__}"
    )
    print()

    results = {}
    for label, size, turns, runs in (
        ("~2k-token prompt", 2000, 10, args.runs),
        ("~100k-token prompt", 100_000, 100, max(10, args.runs // 10)),
    ):
        # cold: `runs` different conversations, each seen once
        cold_convs = [conversation(1_000_000 * size + i, size, turns, enc) for i in range(runs)]
        n_tokens = tokens.count_chat(conversation(1, size, turns, enc), args.model)
        chars = sum(len(m["content"]) for m in cold_convs[0])
        cold_raw = [orjson.dumps(c) for c in cold_convs]
        cold_calls = [orjson.loads(r) for r in cold_raw]
        cold = timed(cold_calls, args.model)

        # warm: one conversation, counted once to fill the memo, then fresh copies of it
        base = conversation(7, size, turns, enc)
        raw = orjson.dumps(base)
        tokens.count_chat(orjson.loads(raw), args.model)
        warm = timed([orjson.loads(raw) for _ in range(runs)], args.model)

        # next turn: the memoised history plus a new user message each call
        rng = random.Random(size)
        nxt_calls = []
        for i in range(runs):
            msgs = orjson.loads(raw)
            msgs.append({"role": "user", "content": text_of(rng, 60, enc) + f" ({i})"})
            nxt_calls.append(msgs)
        nxt = timed(nxt_calls, args.model)

        results[label] = (cold, warm, nxt)
        cold_med = statistics.median(cold)
        print(f"{label}: {n_tokens:,} tokens, {len(base)} messages, {chars:,} characters")
        print(f"    cold       {fmt(cold)}   ~{n_tokens / cold_med / 1e6:.1f} M tokens/s")
        print(f"    warm       {fmt(warm)}")
        print(f"    next turn  {fmt(nxt)}")
        if size == 2000:
            for name, vals in (("cold", cold), ("warm", warm), ("next turn", nxt)):
                med = statistics.median(vals) * 1000
                print(
                    f"      target 2k estimate <= {TARGET_2K_MS} ms: {name} {med:.4f} ms "
                    f"({'meets' if med <= TARGET_2K_MS else 'MISSES'})"
                )
        print()
    print(
        "Cold is tiktoken's own encode (a new conversation, or a first request after a restart); "
        "warm and next turn are the"
    )
    print(
        "memoised path multi-turn chats take "
        "(tokens._CountCache: counts keyed by (encoding, text), messages >= 64 characters)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
