"""Would the cached answer have been right? Compare a fresh upstream answer with it.

The error-rate controller (`error_control.py`) learns from these verdicts, so
they must lean one way: a "different" verdict on two answers that say the same
thing only makes the cache more cautious (a few more misses), while a "match"
on two answers that differ lets it serve wrong answers. Hence, in order:

1. Normalised equality: Unicode NFKC, casefold, every run of whitespace,
   punctuation and symbols one space. Equal: a match. (At temperature 0 most
   models repeat an answer word for word.)
2. Numbers: the numbers written in digits (thousands separators and trailing
   decimal zeros dropped, a leading minus kept; versions and zero-padded codes
   as written) must be the same multiset.
   Embeddings and judges are both poor at numbers, so a difference here is
   final: "$49" and "$94" are different answers however similar the rest is.
   Numbers written in words are not read (they count as text).
3. Answer-embedding similarity (optional, `similarity`): cosine at or above
   `min_similarity` is a match. Below it, the judge decides if there is one.
4. A judge (optional, `judge`): an async callback, e.g. an LLM asked whether
   both answers say the same; its yes or no is the verdict.
5. Otherwise: different.

A callback that fails (raises) makes the verdict inconclusive
(`conclusive=False`): the caller should report nothing to the controller
rather than a guess.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from kubetoll_core.parts import DEFAULT_ANSWER_SIMILARITY

from .embeddings import EmbedFn

# (fresh, cached) -> cosine similarity of the two answers
Similarity = Callable[[str, str], Awaitable[float]]
# (fresh, cached) -> True when both answers say the same
Judge = Callable[[str, str], Awaitable[bool]]
# Told the usage and USD cost of an embedding call made for a comparison, so the caller can bill it.
ChargeFn = Callable[[Any, float], None]

DEFAULT_MIN_SIMILARITY = DEFAULT_ANSWER_SIMILARITY  # a policy's semantic.answerSimilarity when unset

# A run of digits with the separators inside it; a minus before it counts only
# at the start or after a space or bracket (elsewhere it is a hyphen: "INV-2023").
_DIGIT_RUN = re.compile(r"(-?)(\d[\d.,]*)")
_PLAIN_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
_SEPARATOR = re.compile(r"[\s\W_]+", re.UNICODE)


@dataclass(frozen=True, slots=True)
class MatchResult:
    match: bool
    # equal, numbers_differ, empty, similar, not_similar, judge_same, judge_different,
    # different, similarity_failed, judge_failed
    reason: str
    conclusive: bool = True
    similarity: float | None = None


def normalize_answer(text: str) -> str:
    """NFKC, casefold, and every run of whitespace / punctuation / symbols collapsed to one space."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _SEPARATOR.sub(" ", folded).strip()


def numbers_in(text: str) -> Counter[str]:
    """The numbers written in digits, with their counts.

    Plain numbers are canonical ("1,000.50" -> "1000.5", "3.0" -> "3"); any
    other run of digits and separators is kept as written, so versions
    ("1.5.3") and zero-padded codes ("0045") compare exactly.
    """
    found: Counter[str] = Counter()
    t = unicodedata.normalize("NFKC", text)
    for m in _DIGIT_RUN.finditer(t):
        sign = m.group(1)
        if sign and m.start() > 0 and not (t[m.start() - 1].isspace() or t[m.start() - 1] in "([{"):
            sign = ""
        run = m.group(2).rstrip(".,")  # a sentence's full stop or a list's comma
        if _PLAIN_NUMBER.fullmatch(run) and not (run[0] == "0" and run[1:2].isdigit()):
            canon = format(Decimal(run.replace(",", "")).normalize(), "f")
            found["0" if canon == "0" else sign + canon] += 1
        else:
            found[sign + run] += 1
    return found


async def answers_match(
    fresh: str,
    cached: str,
    *,
    similarity: Similarity | None = None,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    judge: Judge | None = None,
) -> MatchResult:
    """Whether `cached` would have answered the question `fresh` answers (see the module docstring)."""
    if not isinstance(fresh, str) or not isinstance(cached, str):
        raise TypeError("answers_match compares two strings (the answers' text)")
    if not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be a cosine in [-1, 1], got {min_similarity!r}")
    a, b = normalize_answer(fresh), normalize_answer(cached)
    if a == b:
        # Two empty answers are equal too; one empty and one not is "different" below.
        return MatchResult(True, "equal")
    if not a or not b:
        return MatchResult(False, "empty")
    if numbers_in(fresh) != numbers_in(cached):
        return MatchResult(False, "numbers_differ")
    sim: float | None = None
    if similarity is not None:
        try:
            sim = float(await similarity(fresh, cached))
        except Exception:
            return MatchResult(False, "similarity_failed", conclusive=False)
        if not math.isfinite(sim):
            return MatchResult(False, "similarity_failed", conclusive=False)
        if sim >= min_similarity:
            return MatchResult(True, "similar", similarity=sim)
        if judge is None:
            return MatchResult(False, "not_similar", similarity=sim)
    if judge is not None:
        try:
            same = bool(await judge(fresh, cached))
        except Exception:
            return MatchResult(False, "judge_failed", conclusive=False, similarity=sim)
        return MatchResult(same, "judge_same" if same else "judge_different", similarity=sim)
    return MatchResult(False, "different")


def cosine(u: Sequence[float], v: Sequence[float]) -> float:
    """Cosine similarity of two vectors; ValueError when their lengths differ or one is zero."""
    if len(u) != len(v) or not u:
        raise ValueError(f"vectors of different or zero length ({len(u)} and {len(v)})")
    dot = sum(x * y for x, y in zip(u, v))
    nu = math.sqrt(sum(x * x for x in u))
    nv = math.sqrt(sum(y * y for y in v))
    if nu == 0.0 or nv == 0.0:
        raise ValueError("a zero vector has no direction")
    return dot / (nu * nv)


def embedding_similarity(embed: EmbedFn, on_charge: ChargeFn | None = None) -> Similarity:
    """A `Similarity` from the policy's `EmbedFn`: one call embedding both answers.

    The call is paid for: `on_charge(usage, cost_usd)` is told about it so
    the caller can bill it like the lookup's own embedding call.
    """

    async def similarity(fresh: str, cached: str) -> float:
        vectors, usage, cost = await embed([fresh, cached])
        if on_charge is not None:
            on_charge(usage, cost)
        if len(vectors) != 2:
            raise ValueError(f"the embedding backend returned {len(vectors)} vectors for 2 texts")
        return cosine(vectors[0], vectors[1])

    return similarity


def _content_text(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):  # parts: [{"type": "text", "text": ...}]
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def _call_text(name: Any, arguments: Any) -> str:
    """A tool call as text: a different function or different arguments is a different answer."""
    args = arguments if isinstance(arguments, str) else orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS).decode()
    return f"{name}({args})"


def answer_text(endpoint: str, body: Any) -> str | None:
    """The text of a complete answer as its API returns it (tool calls included), to compare two answers.

    `endpoint` is the cache's: chat, completions, responses or messages. None when the body holds no
    answer this version can read (the comparison is then inconclusive, never a guess).
    """
    if not isinstance(body, dict):
        return None
    out: list[str] = []
    if endpoint in ("chat", "completions"):
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            return None
        for c in sorted((c for c in choices if isinstance(c, dict)), key=lambda c: c.get("index") or 0):
            if endpoint == "completions":
                out += _content_text(c.get("text"))
                continue
            msg = c.get("message")
            if not isinstance(msg, dict):
                continue
            out += _content_text(msg.get("content"))
            for call in msg.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    out.append(_call_text(fn.get("name"), fn.get("arguments")))
    elif endpoint == "responses":
        for item in body.get("output") or ():
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                out += _content_text(item.get("content"))
            elif item.get("type") == "function_call":
                out.append(_call_text(item.get("name"), item.get("arguments")))
    elif endpoint == "messages":
        for block in body.get("content") or ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                out.append(block["text"])
            elif block.get("type") == "tool_use":
                out.append(_call_text(block.get("name"), block.get("input")))
    else:
        return None
    return "\n".join(out) if out else None
