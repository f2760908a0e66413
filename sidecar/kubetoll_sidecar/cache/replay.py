"""Cached answers: the stored entry, a hit rendered as JSON or as an SSE replay, and
the assembler that turns a streamed answer back into one response body for storing.

A hit is the original response with a new `id` and `created`. A streaming
request gets it as a well-formed OpenAI stream: a role chunk, content (and
refusal, tool-call) chunks, a finish chunk per choice, the usage chunk when the
client asked for it, and `[DONE]`, which the `openai` SDK parses like any
stream. The usage reported is the original answer's (the tokens the answer
represents; the `x-kubetoll-cost-usd` header says what it cost: nothing).

An inbound API's answer (inbound/: the Responses and Messages APIs) is kept in
that API's shape, and its adapter says when it is complete, gives a hit its new
id, replays it as the API's event stream and assembles it from one.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .. import inbound
from ..inbound.base import Assembler
from ..providers.base import Usage

COMPLETE_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "function_call"})
_PIECE_CHARS = 96  # content characters per replayed chunk
_DONE = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------- the stored entry


@dataclass(frozen=True, slots=True)
class Entry:
    endpoint: str
    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float
    created: float  # epoch seconds when it was stored

    def dumps(self) -> bytes:
        raw = orjson.dumps(
            {
                "v": 1,
                "ep": self.endpoint,
                "body": self.body,
                "u": [self.prompt_tokens, self.completion_tokens, self.cached_tokens],
                "c": self.cost_usd,
                "t": self.created,
            }
        )
        # orjson's bytes keep their whole working buffer (64 KiB behind a 5 KiB answer,
        # measured with orjson 3.13): a right-sized copy for anything kept in memory.
        return bytes(memoryview(raw))

    @classmethod
    def loads(cls, raw: bytes) -> Entry:
        d = orjson.loads(raw)
        p, c, k = d["u"]
        return cls(d["ep"], d["body"], int(p), int(c), int(k), float(d["c"]), float(d["t"]))


def is_complete(endpoint: str, body: Any) -> bool:
    """A successful, whole answer: every choice finished for a reason worth repeating."""
    adapter = inbound.adapter_for(endpoint)
    if adapter is not None:
        return adapter.is_complete(body)
    if not isinstance(body, dict) or "error" in body:
        return False
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for c in choices:
        if not isinstance(c, dict) or c.get("finish_reason") not in COMPLETE_FINISH_REASONS:
            return False
        if endpoint == "chat" and not isinstance(c.get("message"), dict):
            return False
        if endpoint == "completions" and not isinstance(c.get("text"), str):
            return False
    return True


def usage_dict(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


# --------------------------------------------------------------------------- a hit


@dataclass(slots=True)
class CacheHit:
    kind: str  # "exact" or "semantic"
    policy: str
    entry: Entry
    similarity: float = 1.0  # cosine similarity of the questions (1.0 for exact)
    # The wall clock the hit's age and new `created` are read from: the cache stage's.
    wall: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    @property
    def endpoint(self) -> str:
        return self.entry.endpoint

    @property
    def avoided_usage(self) -> Usage:
        e = self.entry
        return Usage(e.prompt_tokens, e.completion_tokens, e.cached_tokens)

    @property
    def avoided_usd(self) -> float:
        return self.entry.cost_usd

    @property
    def age_seconds(self) -> float:
        return max(self.wall() - self.entry.created, 0.0)

    def _fresh_ids(self) -> tuple[str, int]:
        prefix = "chatcmpl-" if self.entry.endpoint == "chat" else "cmpl-"
        return prefix + "kt" + secrets.token_hex(12), int(self.wall())

    def response_body(self) -> dict[str, Any]:
        """The original response with a new id and created time (a new object: safe to change)."""
        adapter = inbound.adapter_for(self.entry.endpoint)
        if adapter is not None:
            return adapter.refreshed(self.entry.body, self.wall())
        body = dict(self.entry.body)
        body["id"], body["created"] = self._fresh_ids()
        if "usage" not in body:
            e = self.entry
            body["usage"] = usage_dict(e.prompt_tokens, e.completion_tokens, e.cached_tokens)
        return body

    def json_bytes(self) -> bytes:
        return orjson.dumps(self.response_body())

    def headers(self) -> dict[str, str]:
        h = {
            "x-kubetoll-cache": f"hit-{self.kind}",
            "x-kubetoll-cost-usd": "0.000000000",
            "x-kubetoll-avoided-usd": f"{self.avoided_usd:.9f}",
            "x-kubetoll-cache-age": str(int(self.age_seconds)),
        }
        if self.kind == "semantic":
            h["x-kubetoll-cache-similarity"] = f"{self.similarity:.4f}"
        return h

    def sse_chunks(self, include_usage: bool) -> list[dict[str, Any]]:
        """The replay as chat.completion.chunk (or text_completion) dicts, without `[DONE]`."""
        body = self.entry.body
        rid, created = self._fresh_ids()
        e = self.entry
        usage = body.get("usage") or usage_dict(e.prompt_tokens, e.completion_tokens, e.cached_tokens)
        if e.endpoint == "chat":
            base: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.get("model", ""),
            }
            if body.get("system_fingerprint"):
                base["system_fingerprint"] = body["system_fingerprint"]
            per_choice = [_chat_choice_deltas(c) for c in body.get("choices") or ()]
        else:
            base = {"id": rid, "object": "text_completion", "created": created, "model": body.get("model", "")}
            per_choice = [_completion_choice_deltas(c) for c in body.get("choices") or ()]
        if include_usage:
            base["usage"] = None  # OpenAI sends usage: null on every chunk when usage was asked for
        chunks: list[dict[str, Any]] = []
        # Choice by choice: one choice's chunks in order, then the next's (OpenAI interleaves; both are valid).
        for deltas in per_choice:
            for choice in deltas:
                chunks.append({**base, "choices": [choice]})
        if include_usage:
            chunks.append({**base, "choices": [], "usage": usage})
        return chunks

    def sse_bytes(self, include_usage: bool) -> bytes:
        """The whole replay, `[DONE]` included, ready to write to a text/event-stream response."""
        adapter = inbound.adapter_for(self.entry.endpoint)
        if adapter is not None:
            return adapter.replay(self.response_body())  # the API's own events (and no `[DONE]`)
        parts = [b"data: " + orjson.dumps(c) + b"\n\n" for c in self.sse_chunks(include_usage)]
        parts.append(_DONE)
        return b"".join(parts)


def _pieces(text: str, size: int = _PIECE_CHARS) -> list[str]:
    if len(text) <= size:
        return [text] if text else []
    out = []
    i = 0
    while i < len(text):
        j = min(i + size, len(text))
        if j < len(text):
            sp = text.rfind(" ", i + size // 2, j)
            if sp > i:
                j = sp + 1
        out.append(text[i:j])
        i = j
    return out


def _chat_choice_deltas(c: dict[str, Any]) -> list[dict[str, Any]]:
    i = c.get("index", 0)
    msg = c.get("message") or {}
    content = msg.get("content")
    tool_calls = msg.get("tool_calls") or []
    logprobs = c.get("logprobs")
    out: list[dict[str, Any]] = []
    first: dict[str, Any] = {
        "role": msg.get("role") or "assistant",
        "content": "" if content is not None or not tool_calls else None,
    }
    out.append({"index": i, "delta": first, "logprobs": None, "finish_reason": None})
    if isinstance(content, str) and content:
        if logprobs:
            # Logprobs belong with the tokens they describe: send the content whole with them.
            out.append({"index": i, "delta": {"content": content}, "logprobs": logprobs, "finish_reason": None})
        else:
            out.extend(
                {"index": i, "delta": {"content": p}, "logprobs": None, "finish_reason": None} for p in _pieces(content)
            )
    if msg.get("refusal"):
        out.append({"index": i, "delta": {"refusal": msg["refusal"]}, "logprobs": None, "finish_reason": None})
    for j, tc in enumerate(tool_calls):
        fn = tc.get("function") or {}
        call = {
            "index": j,
            "id": tc.get("id"),
            "type": tc.get("type") or "function",
            "function": {"name": fn.get("name"), "arguments": fn.get("arguments") or ""},
        }
        out.append({"index": i, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None})
    if msg.get("function_call"):
        out.append(
            {"index": i, "delta": {"function_call": msg["function_call"]}, "logprobs": None, "finish_reason": None}
        )
    out.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": c.get("finish_reason")})
    return out


def _completion_choice_deltas(c: dict[str, Any]) -> list[dict[str, Any]]:
    i = c.get("index", 0)
    text = c.get("text") or ""
    out = [{"text": p, "index": i, "logprobs": None, "finish_reason": None} for p in _pieces(text)]
    out.append({"text": "", "index": i, "logprobs": None, "finish_reason": c.get("finish_reason")})
    return out


# --------------------------------------------------------------------------- storing a stream


def assembler_for(endpoint: str) -> Assembler:
    """What puts a streamed answer of `endpoint` back together."""
    adapter = inbound.adapter_for(endpoint)
    return adapter.assembler() if adapter is not None else StreamAssembler(endpoint)


class StreamAssembler:
    """Feed it every chunk sent to the client (dicts or JSON bytes); `body()` is the
    equivalent non-streaming response, or None when the stream did not finish."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._meta: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None
        self.broken = False

    def feed(self, chunk: dict[str, Any] | bytes) -> None:
        if self.broken:
            return
        if isinstance(chunk, (bytes, bytearray, memoryview)):
            try:
                chunk = orjson.loads(chunk)
            except orjson.JSONDecodeError:
                self.broken = True
                return
        if not isinstance(chunk, dict):
            return
        if "error" in chunk and "choices" not in chunk:
            self.broken = True
            return
        for k in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(k) and k not in self._meta:
                self._meta[k] = chunk[k]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for c in chunk.get("choices") or ():
            if not isinstance(c, dict):
                continue
            idx = c.get("index", 0)
            st = self._choices.setdefault(
                idx,
                {"content": [], "refusal": [], "tools": {}, "role": None, "finish": None, "logprobs": [], "fn": None},
            )
            if self.endpoint == "completions":
                if isinstance(c.get("text"), str):
                    st["content"].append(c["text"])
            else:
                d = c.get("delta") or {}
                if d.get("role"):
                    st["role"] = d["role"]
                if isinstance(d.get("content"), str):
                    st["content"].append(d["content"])
                if isinstance(d.get("refusal"), str):
                    st["refusal"].append(d["refusal"])
                for tc in d.get("tool_calls") or ():
                    t = st["tools"].setdefault(
                        tc.get("index", 0), {"id": None, "type": "function", "name": [], "args": []}
                    )
                    if tc.get("id"):
                        t["id"] = tc["id"]
                    if tc.get("type"):
                        t["type"] = tc["type"]
                    fn = tc.get("function") or {}
                    if fn.get("name"):
                        t["name"].append(fn["name"])
                    if fn.get("arguments"):
                        t["args"].append(fn["arguments"])
                if d.get("function_call"):
                    fc = d["function_call"]
                    cur = st["fn"] or {"name": "", "arguments": ""}
                    cur["name"] += fc.get("name") or ""
                    cur["arguments"] += fc.get("arguments") or ""
                    st["fn"] = cur
                lp = c.get("logprobs")
                if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                    st["logprobs"].extend(lp["content"])
            if c.get("finish_reason"):
                st["finish"] = c["finish_reason"]

    def body(self) -> dict[str, Any] | None:
        if self.broken or not self._choices:
            return None
        choices = []
        for idx in sorted(self._choices):
            st = self._choices[idx]
            if st["finish"] not in COMPLETE_FINISH_REASONS:
                return None
            if self.endpoint == "completions":
                choices.append(
                    {"text": "".join(st["content"]), "index": idx, "logprobs": None, "finish_reason": st["finish"]}
                )
                continue
            msg: dict[str, Any] = {
                "role": st["role"] or "assistant",
                "content": "".join(st["content"]) if st["content"] or not st["tools"] else None,
            }
            if st["refusal"]:
                msg["refusal"] = "".join(st["refusal"])
            if st["tools"]:
                msg["tool_calls"] = [
                    {
                        "id": t["id"],
                        "type": t["type"],
                        "function": {"name": "".join(t["name"]), "arguments": "".join(t["args"])},
                    }
                    for _, t in sorted(st["tools"].items())
                ]
            if st["fn"]:
                msg["function_call"] = st["fn"]
            choice: dict[str, Any] = {
                "index": idx,
                "message": msg,
                "logprobs": {"content": st["logprobs"]} if st["logprobs"] else None,
                "finish_reason": st["finish"],
            }
            choices.append(choice)
        body: dict[str, Any] = {
            "id": self._meta.get("id", ""),
            "object": "chat.completion" if self.endpoint == "chat" else "text_completion",
            "created": self._meta.get("created", int(time.time())),
            "model": self._meta.get("model", ""),
            "choices": choices,
        }
        if self._meta.get("system_fingerprint"):
            body["system_fingerprint"] = self._meta["system_fingerprint"]
        if self._usage:
            body["usage"] = self._usage
        return body
