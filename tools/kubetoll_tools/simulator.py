"""Simulated LLM provider servers (OpenAI, Azure OpenAI, Anthropic) with fault injection.

One aiohttp server answers the wire formats of three providers, so the sidecar
(and the official `openai` / `anthropic` SDKs) can be tested against real HTTP:

* OpenAI: `POST /v1/chat/completions`, `POST /v1/completions`,
  `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{model}`.
* Azure OpenAI: `POST /openai/deployments/{deployment}/{chat/completions,
  completions,embeddings}?api-version=...` (`api-key` header).
* Anthropic: `POST /v1/messages`, `POST /v1/messages/count_tokens`
  (`GET /v1/models` answers in Anthropic's shape when `anthropic-version` is sent).
* OpenAI's (and Azure's) Files and Batch APIs: `simulator_batches` (`SimulatedUpstream.batches`).
* OpenAI's Responses API (`POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`):
  `simulator_responses` (`SimulatedUpstream.responses`).
* An inference server's Prometheus `GET /metrics` (vLLM, TGI or SGLang load gauges,
  set by the test): `simulator_vllm_metrics` (`SimulatedUpstream.load_metrics`).

What it simulates: request validation and error bodies in each provider's own
format; authentication (OpenAI `Authorization: Bearer`, Azure `api-key`,
Anthropic `x-api-key` or `Authorization: Bearer`, which anthropic SDKs >= 2 send);
deterministic answers (the same last user message gives the same text); token
usage counted with tiktoken through `kubetoll_sidecar.tokens` (OpenAI's cookbook
formula: 3 per message + role + content, +3 reply priming; completion tokens are
exact, the answer text is built from one-token pieces); tool calls with arguments
built from the JSON schema; JSON / json_schema response formats; `n` choices;
SSE streaming framed as each provider frames it (including Azure's leading
`prompt_filter_results` chunk with no choices and `"usage": null` on every OpenAI
chunk when usage was asked for); latency, time-to-first-token and inter-chunk
pacing; and faults (`Fault`, the `x-sim-fault` header, `error_rate`,
`rate_limit_burst`). Every request is recorded in `SimulatedUpstream.requests`.

What it does not: real language understanding, stop sequences, logprobs, legacy
`echo`/`suffix`, parallel tool calls (one call per choice), token counting of
tool definitions or images (an image part counts a flat 85 tokens), content
filtering, Azure's `/openai/v1` surface, Anthropic thinking / server tools /
citations, HTTP/2. JSON-mode answers are not cut by `max_tokens`.

Fault syntax (header `x-sim-fault`, or `Fault(...)` via `enqueue_fault`):
`429;retry-after=2` (also `inf`, `nan`, `-5`, `1e9`; anything that is not a number,
such as an HTTP-date, is sent as written), `500`, `529`, `cut;after=3`, `slow;delay=0.5`,
`context_length`, `insufficient_quota`, `malformed`, `no_usage`,
`stream_error;status=529;after=2`. `after` counts SSE events of any kind (OpenAI's
role chunk, Anthropic's message_start and ping included); a cut never reaches the
finishing event (finish_reason chunk / message_delta), usage or `[DONE]`. On a
non-streaming request `cut` sends half of the JSON body and drops the connection.

Bad answers (a 200 whose answer a cascade's checks turn down; OpenAI and Azure chat
completions, streamed or not): `length` (half the answer, `finish_reason: length`),
`empty` (no text), `refusal` (`message.refusal` set, no content), `bad_json` (with a
`json_schema` response format whose schema requires properties: the sampled object
without them; otherwise JSON cut short by one character), `bad_tool_args` (a tool
call's arguments cut short by one character: not JSON).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import math
import random
import signal
import ssl
import struct
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .simulator_batches import SimulatedBatches
from .simulator_responses import SimulatedResponses
from .simulator_vllm_metrics import SimulatedLoadMetrics

__all__ = [
    "Fault",
    "RateLimitBurst",
    "RecordedRequest",
    "SimSettings",
    "SimulatedUpstream",
    "answer_pieces",
    "count_tokens",
    "openai_prompt_tokens",
    "anthropic_prompt_tokens",
    "parse_fault",
    "run",
    "sample_from_schema",
]

OPENAI, AZURE, ANTHROPIC = "openai", "azure", "anthropic"
_RATE_LIMIT_REQUESTS = 10_000  # per minute, for the x-ratelimit-* headers
_IMAGE_TOKENS = 85
_MALFORMED_BODY = b'{"id": "chatcmpl-sim", "object": "chat.completion", "choices": [{"index": 0, <html>502'


# --------------------------------------------------------------------------- settings, faults


@dataclass
class RateLimitBurst:
    """Every `every_s` seconds (from server start) the last `duration_s` seconds answer `status`.

    The `retry-after` sent is the time left in the burst window.
    """

    every_s: float = 10.0
    duration_s: float = 2.0
    status: int = 429


@dataclass
class SimSettings:
    latency_ms: float = 0  # before the response headers
    first_token_ms: float = 0  # before the first streamed event
    chunk_interval_ms: float = 0  # between streamed token chunks
    # between a stream's last event and its body's end (chunked's last chunk): a hosted API's
    # often comes in a TLS record of its own, after the client has read the last event
    stream_end_delay_ms: float = 0
    tokens_per_chunk: int = 4
    completion_tokens: int = 16  # natural answer length; max_tokens below it cuts (finish "length")
    embedding_dim: int = 64
    api_key: str | None = None
    models: list[str] = field(
        default_factory=lambda: [
            "gpt-4o-mini",
            "gpt-4o",
            "gpt-4.1-mini",
            "text-embedding-3-small",
            "claude-haiku-4-5",
            "claude-sonnet-4-6",
        ]
    )
    strict_models: bool = False  # unknown model → 404 model_not_found / not_found_error
    error_rate: float = 0.0  # fraction of requests answered 429 or 500 at random
    seed: int = 0
    rate_limit_burst: RateLimitBurst | None = None
    send_usage_in_stream: bool = True  # False: never send the usage chunk, even when asked
    cached_prompt_tokens: int = 0  # reported as cached (OpenAI) / cache_read (Anthropic)
    context_window: int | None = None  # None: 128000 on OpenAI/Azure paths, 200000 on Anthropic
    max_recorded_requests: int = 10_000  # 0 disables recording; oldest half dropped when full
    batch_seconds: float | None = 1.0  # a batch completes this long after it was created; None: when told to


FAULT_KINDS = (
    "error",
    "slow_first_token",
    "cut_stream",
    "context_length",
    "insufficient_quota",
    "malformed",
    "no_usage",
    "stream_error",
    "answer_length",
    "answer_empty",
    "answer_refusal",
    "answer_bad_json",
    "answer_bad_tool_args",
)
# The faults that answer 200 with an answer a check turns down (`spoil_reply`).
ANSWER_FAULTS = frozenset(k for k in FAULT_KINDS if k.startswith("answer_"))
SIM_REFUSAL = "I'm sorry, but I can't help with that."

_KIND_ALIASES = {k: k for k in FAULT_KINDS} | {
    "cut": "cut_stream",
    "slow": "slow_first_token",
    "context": "context_length",
    "quota": "insufficient_quota",
    "length": "answer_length",
    "empty": "answer_empty",
    "refusal": "answer_refusal",
    "bad_json": "answer_bad_json",
    "bad_tool_args": "answer_bad_tool_args",
}


@dataclass
class Fault:
    """One injected failure. `status` defaults per kind (500 for "error")."""

    status: int | None = None
    retry_after: float | None = None
    # Sent as the Retry-After header exactly as written, for what a float cannot carry: an
    # HTTP-date or garbage (wins over `retry_after`; no retry-after-ms goes with it).
    retry_after_header: str | None = None
    kind: str = "error"
    delay: float = 0.0  # slow_first_token: seconds before headers (non-stream) / first event (stream)
    after_chunks: int = 0  # cut_stream / stream_error: SSE events sent before the fault

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(FAULT_KINDS)}")


def parse_fault(spec: str) -> Fault:
    """Parses the `x-sim-fault` syntax: `429;retry-after=2`, `cut;after=3`, `slow;delay=0.5`, ..."""
    parts = [p.strip() for p in spec.split(";") if p.strip()]
    if not parts:
        raise ValueError("empty x-sim-fault")
    head = parts[0].lower()
    params: dict[str, str] = {}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        params[key.strip().lower().replace("-", "_")] = value.strip()
    try:
        if head.isdigit():
            fault = Fault(status=int(head), kind="error")
        elif head in _KIND_ALIASES:
            fault = Fault(kind=_KIND_ALIASES[head])
        else:
            raise ValueError(f"unknown fault {head!r}")
        if "status" in params:
            fault.status = int(params["status"])
        if "retry_after" in params:
            try:
                fault.retry_after = float(params["retry_after"])
            except ValueError:
                fault.retry_after_header = params["retry_after"]
        if "delay" in params:
            fault.delay = float(params["delay"])
        after = params.get("after", params.get("after_chunks"))
        if after is not None:
            fault.after_chunks = int(after)
    except ValueError as exc:
        raise ValueError(f"invalid x-sim-fault {spec!r}: {exc}") from None
    return fault


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, None when absent or unparseable
    time: float  # time.time()
    provider: str  # "openai" | "azure" | "anthropic"
    deployment: str | None = None
    api_version: str | None = None
    peer: str = ""  # the client's address and port: one per connection, so reuse shows


def _peer(req: web.Request) -> str:
    peer = req.transport.get_extra_info("peername") if req.transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""


# --------------------------------------------------------------------------- token counting


@functools.cache
def _text_counter() -> Callable[[str, str], int]:
    """The sidecar's own counter, memoised: the simulator reports the usage a provider would."""
    from kubetoll_sidecar.tokens import count_text

    return functools.lru_cache(maxsize=8192)(count_text)


def _warm_tokenizers() -> None:
    count_tokens("warm up", "gpt-4o")
    count_tokens("warm up", "gpt-4")


def count_tokens(text: str, model: str = "gpt-4o") -> int:
    return _text_counter()(text, model) if text else 0


def _content_tokens(content: Any, model: str) -> int:
    """Tokens of an OpenAI or Anthropic message content (string or list of parts/blocks)."""
    if isinstance(content, str):
        return count_tokens(content, model)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if isinstance(part, str):
            total += count_tokens(part, model)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("text", "input_text"):
            total += count_tokens(part.get("text") or "", model)
        elif kind in ("image_url", "image", "input_image", "document"):
            total += _IMAGE_TOKENS
        elif kind == "tool_use":
            total += count_tokens(part.get("name") or "", model)
            total += count_tokens(orjson.dumps(part.get("input") or {}).decode(), model)
        elif kind == "tool_result":
            total += _content_tokens(part.get("content"), model)
    return total


def openai_prompt_tokens(messages: list[Any], model: str) -> int:
    """OpenAI's cookbook formula: 3 per message + role + content (+1 + name), +3 reply priming."""
    total = 3
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        total += 3 + count_tokens(str(msg.get("role") or ""), model)
        total += _content_tokens(msg.get("content"), model)
        name = msg.get("name")
        if name:
            total += 1 + count_tokens(str(name), model)
        for call in msg.get("tool_calls") or ():
            fn = (call.get("function") or {}) if isinstance(call, dict) else {}
            total += count_tokens(str(fn.get("name") or ""), model)
            total += count_tokens(str(fn.get("arguments") or ""), model)
    return total


def anthropic_prompt_tokens(body: dict[str, Any], model: str) -> int:
    """The same formula over the system prompt (as one message) and the messages."""
    total = openai_prompt_tokens(body.get("messages") or [], model)
    system = body.get("system")
    if system:
        total += 3 + count_tokens("system", model) + _content_tokens(system, model)
    return total


# --------------------------------------------------------------------------- deterministic content

# Every word is one token in o200k_base and cl100k_base, with and without a leading space,
# lower-case and capitalised; "," and "." are tokens of their own. So the pieces below join
# to text whose token count is exactly the number of pieces (the tests check it).
_DETERMINERS = ("the", "a", "each", "one", "this", "your", "every")
_ADJECTIVES = ("simple", "clear", "small", "large", "good", "fast", "first", "next", "new", "main")
_NOUNS = (
    "model request answer token budget cluster router tenant service data system result value time "
    "response stream cost limit rate node pod policy route cache window plan note step order level "
    "point case user team"
).split()
_MODALS = ("can", "will", "should", "may", "must")
_VERBS = "keep send read write test check find run call build start change make help show give take use".split()
_PREPOSITIONS = ("for", "with", "in", "on", "from", "by", "into", "over", "after")


def _noun_phrase(rng: random.Random) -> list[str]:
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    return words


def _build_corpus(sentences: int = 512) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Sentences like "The router can keep each small request in the cache." as one-token pieces."""
    rng = random.Random(20240601)
    pieces: list[str] = []
    starts: list[int] = []
    for _ in range(sentences):
        starts.append(len(pieces))
        words = _noun_phrase(rng) + [rng.choice(_MODALS), rng.choice(_VERBS)] + _noun_phrase(rng)
        clause = rng.random()
        if clause < 0.6:
            words += [rng.choice(_PREPOSITIONS)] + _noun_phrase(rng)
        pieces.append(" " + words[0].capitalize())
        pieces.extend(" " + w for w in words[1:])
        if clause < 0.25:
            pieces.extend([",", " and", " " + rng.choice(_NOUNS), " " + rng.choice(_MODALS), " " + rng.choice(_VERBS)])
        pieces.append(".")
    return tuple(pieces), tuple(starts)


_CORPUS, _SENTENCE_STARTS = _build_corpus()


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")


def answer_pieces(seed_text: str, n_tokens: int, variant: int = 0) -> list[str]:
    """`n_tokens` one-token pieces of English-looking text, chosen by a hash of `seed_text`."""
    if n_tokens <= 0:
        return []
    start = _SENTENCE_STARTS[(_stable_hash(seed_text) + variant * 7919) % len(_SENTENCE_STARTS)]
    end = start + n_tokens
    if end <= len(_CORPUS):
        pieces = list(_CORPUS[start:end])
    else:
        pieces = [_CORPUS[i % len(_CORPUS)] for i in range(start, end)]
    pieces[0] = pieces[0].lstrip()
    return pieces


_PLAUSIBLE_STRINGS = (
    (("location", "city", "place", "address", "where"), "Paris, France"),
    (("country",), "France"),
    (("unit",), "celsius"),
    (("date", "day"), "2024-06-01"),
    (("time",), "12:00"),
    (("email",), "user@example.com"),
    (("url", "link", "uri"), "https://example.com"),
    (("language", "lang", "locale"), "en"),
    (("query", "search", "question", "prompt", "q"), "kubernetes budgets"),
    (("name", "title"), "Alice"),
    (("id",), "id_123"),
)
_FORMAT_STRINGS = {
    "date": "2024-06-01",
    "date-time": "2024-06-01T12:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com",
    "uuid": "123e4567-e89b-12d3-a456-426614174000",
}


def _plausible_string(name: str) -> str:
    lowered = name.lower()
    for keys, value in _PLAUSIBLE_STRINGS:
        if any(k == lowered or k in lowered.split("_") or (len(k) > 2 and k in lowered) for k in keys):
            return value
    return "example"


def sample_from_schema(schema: Any, name: str = "", root: Any = None, depth: int = 0) -> Any:
    """A plausible value for a JSON schema: enum/const/default first, then by type and property name."""
    if not isinstance(schema, dict) or depth > 8:
        return "example" if depth else {}
    root = schema if root is None else root
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for key in ref[2:].split("/"):
            target = target.get(key) if isinstance(target, dict) else None
        return sample_from_schema(target, name, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for combo in ("anyOf", "oneOf", "allOf"):
        options = [o for o in schema.get(combo) or () if not (isinstance(o, dict) and o.get("type") == "null")]
        if options:
            return sample_from_schema(options[0], name, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        required = schema.get("required")
        keys = [k for k in required if k in props] if required else list(props)
        return {k: sample_from_schema(props[k], k, root, depth + 1) for k in keys}
    if kind == "array":
        count = max(1, int(schema.get("minItems") or 1))
        return [sample_from_schema(schema.get("items") or {}, name, root, depth + 1) for _ in range(count)]
    if kind == "integer":
        value = 3
        if "minimum" in schema:
            value = max(value, math.ceil(schema["minimum"]))
        return min(value, math.floor(schema["maximum"])) if "maximum" in schema else value
    if kind == "number":
        number = 21.5
        if "minimum" in schema:
            number = max(number, float(schema["minimum"]))
        return min(number, float(schema["maximum"])) if "maximum" in schema else number
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if schema.get("format") in _FORMAT_STRINGS:
        return _FORMAT_STRINGS[schema["format"]]
    return _plausible_string(name)


# --------------------------------------------------------------------------- reading requests


def _text_of(content: Any) -> str:
    """The text of a message content; tool results included (Anthropic blocks, OpenAI parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        if isinstance(part, dict):
            if part.get("type") in ("text", "input_text"):
                texts.append(str(part.get("text") or ""))
            elif part.get("type") == "tool_result":
                texts.append(_text_of(part.get("content")))
    return "\n".join(texts)


def _last_user_text(messages: list[Any]) -> str:
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return _text_of(msg.get("content"))
    return ""


def _ends_with_tool_result(messages: list[Any]) -> bool:
    """The conversation's last turn returns a tool result: the model answers in text."""
    if not messages or not isinstance(messages[-1], dict):
        return False
    last = messages[-1]
    if last.get("role") in ("tool", "function"):
        return True
    content = last.get("content")
    return isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


@dataclass(slots=True)
class _Tool:
    name: str
    description: str
    schema: dict[str, Any]


def _pick_tool(tools: list[_Tool], choice: str | tuple[str, str], last_text: str, after_result: bool) -> _Tool | None:
    """Which tool the simulated model calls, if any. `choice`: none/auto/required or ("named", name)."""
    if not tools or choice == "none":
        return None
    if isinstance(choice, tuple):
        return next((t for t in tools if t.name == choice[1]), tools[0])
    lowered = last_text.lower()
    mentioned = next(
        (t for t in tools if t.name.lower() in lowered or t.name.lower().replace("_", " ") in lowered), None
    )
    if choice == "required":
        return mentioned or tools[0]
    if after_result:
        return None
    if mentioned:
        return mentioned
    if "weather" in lowered:
        return next((t for t in tools if "weather" in (t.name + t.description).lower()), tools[0])
    return None


def _openai_tools(body: dict[str, Any]) -> tuple[list[_Tool], str | tuple[str, str]]:
    tools = []
    for tool in body.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("name"):
            tools.append(_Tool(str(fn["name"]), str(fn.get("description") or ""), fn.get("parameters") or {}))
    raw = body.get("tool_choice", "auto")
    choice: str | tuple[str, str] = raw if raw in ("none", "auto", "required") else "auto"
    if isinstance(raw, dict) and isinstance(raw.get("function"), dict) and raw["function"].get("name"):
        choice = ("named", str(raw["function"]["name"]))
    return tools, choice


def _anthropic_tools(body: dict[str, Any]) -> tuple[list[_Tool], str | tuple[str, str]]:
    tools = [
        _Tool(str(t["name"]), str(t.get("description") or ""), t.get("input_schema") or {})
        for t in body.get("tools") or ()
        if isinstance(t, dict) and t.get("name") and "input_schema" in t
    ]
    raw = body.get("tool_choice") or {}
    kind = raw.get("type", "auto") if isinstance(raw, dict) else "auto"
    choice: str | tuple[str, str] = {"any": "required", "none": "none"}.get(kind, "auto")
    if kind == "tool" and raw.get("name"):
        choice = ("named", str(raw["name"]))
    return tools, choice


# --------------------------------------------------------------------------- planning replies


@dataclass(slots=True)
class _Reply:
    """What one choice says: text pieces, or one tool call; with its finish reason and token count."""

    pieces: list[str]
    finish: str  # OpenAI: stop | length | tool_calls
    tokens: int
    tool: _Tool | None = None
    tool_id: str = ""
    arguments: str = ""
    pre_split: bool = False  # pieces are already stream-sized (JSON answers), not single tokens
    refusal: str | None = None  # OpenAI's structured refusal, instead of content

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def chunks(self, tokens_per_chunk: int) -> list[str]:
        return self.pieces if self.pre_split else _group(self.pieces, tokens_per_chunk)


def _random_id(prefix: str, n: int = 24) -> str:
    return prefix + f"{random.getrandbits(n * 4):0{n}x}"


def _cap(body: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = body.get(key)
        if value is not None:
            return int(value)
    return None


def _text_reply(seed: str, settings: SimSettings, cap: int | None, variant: int) -> _Reply:
    natural = max(0, settings.completion_tokens)
    length = natural if cap is None else min(natural, cap)
    pieces = answer_pieces(seed, length, variant)
    finish = "length" if cap is not None and cap < natural else "stop"
    return _Reply(pieces, finish, len(pieces))


def _tool_reply(tool: _Tool, model: str, tool_prefix: str) -> _Reply:
    arguments = orjson.dumps(sample_from_schema(tool.schema)).decode()
    tokens = count_tokens(tool.name, model) + count_tokens(arguments, model)
    return _Reply([], "tool_calls", tokens, tool, _random_id(tool_prefix), arguments)


def _json_reply(body: dict[str, Any], seed: str, settings: SimSettings, model: str, variant: int) -> _Reply | None:
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        return None
    if fmt["type"] == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        value = sample_from_schema(schema)
    else:
        value = {"answer": "".join(answer_pieces(seed, settings.completion_tokens, variant))}
    text = orjson.dumps(value).decode()
    pieces = _split_chars(text, 4 * max(1, settings.tokens_per_chunk))
    return _Reply(pieces, "stop", count_tokens(text, model), pre_split=True)


def plan_chat(body: dict[str, Any], settings: SimSettings, model: str) -> list[_Reply]:
    messages = body["messages"]
    seed = _last_user_text(messages)
    tools, choice = _openai_tools(body)
    tool = _pick_tool(tools, choice, seed, _ends_with_tool_result(messages))
    cap = _cap(body, "max_completion_tokens", "max_tokens")
    replies = []
    for i in range(int(body.get("n") or 1)):
        if tool is not None:
            replies.append(_tool_reply(tool, model, "call_"))
        else:
            replies.append(_json_reply(body, seed, settings, model, i) or _text_reply(seed, settings, cap, i))
    return replies


def spoil_reply(reply: _Reply, kind: str, body: dict[str, Any], settings: SimSettings, model: str) -> _Reply:
    """The reply as an answer fault (ANSWER_FAULTS) turns it bad; see the module's docstring."""
    size = 4 * max(1, settings.tokens_per_chunk)
    if kind == "answer_empty":
        return _Reply([], "stop", 0)
    if kind == "answer_refusal":
        return _Reply([], "stop", count_tokens(SIM_REFUSAL, model), refusal=SIM_REFUSAL)
    if kind == "answer_length":
        if reply.tool is not None:
            args = reply.arguments[: len(reply.arguments) // 2]
            return _Reply([], "length", count_tokens(args, model), reply.tool, reply.tool_id, args)
        pieces = reply.pieces[: max(1, len(reply.pieces) // 2)]
        tokens = count_tokens("".join(pieces), model) if reply.pre_split else len(pieces)
        return _Reply(pieces, "length", tokens, pre_split=reply.pre_split)
    if kind == "answer_bad_tool_args" and reply.tool is not None:
        args = reply.arguments[:-1]
        return _Reply([], reply.finish, count_tokens(args, model), reply.tool, reply.tool_id, args)
    if kind == "answer_bad_json" and reply.tool is None:
        fmt = body.get("response_format")
        schema = ((fmt.get("json_schema") or {}).get("schema") or {}) if isinstance(fmt, dict) else {}
        required = schema.get("required") if isinstance(schema, dict) else None
        value = sample_from_schema(schema) if schema else None
        if isinstance(value, dict) and required:
            text = orjson.dumps({k: v for k, v in value.items() if k not in required}).decode()
        else:
            text = (reply.text or "{}")[:-1]
        return _Reply(_split_chars(text, size), "stop", count_tokens(text, model), pre_split=True)
    return reply


def _split_chars(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _group(pieces: list[str], size: int) -> list[str]:
    size = max(1, size)
    return ["".join(pieces[i : i + size]) for i in range(0, len(pieces), size)]


def _openai_usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min(cached, prompt), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


# --------------------------------------------------------------------------- SSE framing

Event = tuple[bytes, bool]  # (bytes on the wire, is a paced token chunk)


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _sse_named(name: str, payload: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


def _interleave(per_choice: list[list[Event]]) -> list[Event]:
    if len(per_choice) == 1:
        return per_choice[0]
    out: list[Event] = []
    for step in range(max(len(events) for events in per_choice)):
        out.extend(events[step] for events in per_choice if step < len(events))
    return out


def chat_stream_events(
    base: dict[str, Any], replies: list[_Reply], settings: SimSettings, usage: dict[str, Any] | None, azure: bool
) -> tuple[list[Event], int]:
    """OpenAI chat.completion.chunk events; returns them and the index of the first finishing event."""
    with_usage = usage is not None

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        payload = {**base, "choices": choices}
        if with_usage:
            payload["usage"] = None
        return _sse(payload)

    def choice(i: int, delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]

    bodies: list[list[Event]] = []
    finishes: list[Event] = []
    for i, reply in enumerate(replies):
        events: list[Event] = []
        if reply.tool is not None:
            call = {
                "index": 0,
                "id": reply.tool_id,
                "type": "function",
                "function": {"name": reply.tool.name, "arguments": ""},
            }
            events.append(
                (chunk(choice(i, {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None})), False)
            )
            for piece in _split_chars(reply.arguments, 4 * max(1, settings.tokens_per_chunk)):
                events.append(
                    (chunk(choice(i, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})), True)
                )
        elif reply.refusal is not None:
            events.append((chunk(choice(i, {"role": "assistant", "content": None, "refusal": ""})), False))
            events.extend(
                (chunk(choice(i, {"refusal": text})), True)
                for text in _split_chars(reply.refusal, 4 * max(1, settings.tokens_per_chunk))
            )
        else:
            events.append((chunk(choice(i, {"role": "assistant", "content": "", "refusal": None})), False))
            events.extend(
                (chunk(choice(i, {"content": text})), True) for text in reply.chunks(settings.tokens_per_chunk) if text
            )
        bodies.append(events)
        finishes.append((chunk(choice(i, {}, reply.finish)), False))
    events = _interleave(bodies)
    if azure:
        events.insert(
            0,
            (
                _sse(
                    {
                        "choices": [],
                        "created": 0,
                        "id": "",
                        "model": "",
                        "object": "",
                        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
                    }
                ),
                False,
            ),
        )
    closing = len(events)
    events.extend(finishes)
    if usage is not None:
        events.append((_sse({**base, "choices": [], "usage": usage}), False))
    events.append((_DONE, False))
    return events, closing


def completion_stream_events(
    base: dict[str, Any], replies: list[_Reply], settings: SimSettings, usage: dict[str, Any] | None
) -> tuple[list[Event], int]:
    """Legacy text_completion stream events."""

    def chunk(i: int, text: str, finish: str | None = None) -> bytes:
        payload = {**base, "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": finish}]}
        if usage is not None:
            payload["usage"] = None
        return _sse(payload)

    bodies = [[(chunk(i, text), True) for text in r.chunks(settings.tokens_per_chunk)] for i, r in enumerate(replies)]
    events = _interleave(bodies)
    closing = len(events)
    events.extend((chunk(i, "", r.finish), False) for i, r in enumerate(replies))
    if usage is not None:
        events.append((_sse({**base, "choices": [], "usage": usage}), False))
    events.append((_DONE, False))
    return events, closing


_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _anthropic_content(reply: _Reply) -> list[dict[str, Any]]:
    if reply.tool is not None:
        return [
            {"type": "tool_use", "id": reply.tool_id, "name": reply.tool.name, "input": orjson.loads(reply.arguments)}
        ]
    return [{"type": "text", "text": reply.text}]


def messages_stream_events(
    message: dict[str, Any], reply: _Reply, settings: SimSettings, send_usage: bool
) -> tuple[list[Event], int]:
    """Anthropic's event sequence: message_start, content_block_*, ping, message_delta, message_stop."""
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    if send_usage:
        start["usage"] = {**message["usage"], "output_tokens": 1}
    else:
        start.pop("usage", None)
    events: list[Event] = [(_sse_named("message_start", {"type": "message_start", "message": start}), False)]
    if reply.tool is not None:
        block = {"type": "tool_use", "id": reply.tool_id, "name": reply.tool.name, "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": ""}] + [
            {"type": "input_json_delta", "partial_json": p}
            for p in _split_chars(reply.arguments, 4 * max(1, settings.tokens_per_chunk))
        ]
    else:
        block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": t} for t in reply.chunks(settings.tokens_per_chunk)]
    events.append(
        (_sse_named("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}), False)
    )
    events.append((_sse_named("ping", {"type": "ping"}), False))
    events.extend(
        (_sse_named("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d}), True)
        for d in deltas
    )
    events.append((_sse_named("content_block_stop", {"type": "content_block_stop", "index": 0}), False))
    closing = len(events)
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
    }
    if send_usage:
        delta["usage"] = {"output_tokens": reply.tokens}
    events.append((_sse_named("message_delta", delta), False))
    events.append((_sse_named("message_stop", {"type": "message_stop"}), False))
    return events, closing


# --------------------------------------------------------------------------- errors


def _fmt_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else (f"{value:.3f}".rstrip("0").rstrip(".") or "0")


_OPENAI_STATUS = {
    400: ("invalid_request_error", None, "Invalid request (simulated)."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
    ),
    402: ("insufficient_quota", "payment_required", "Payment required: your account has no credit left."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM): Limit 10000, Used 10000, Requested 1.",
    ),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    529: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_ANTHROPIC_STATUS = {
    400: ("invalid_request_error", "Invalid request (simulated)."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out."),
    529: ("overloaded_error", "Overloaded"),
}


def openai_error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def anthropic_error_body(type_: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "error": {"type": type_, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def azure_error_body(status: int, message: str, api_version: str | None) -> dict[str, Any]:
    if status == 429:
        message = (
            f"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version {api_version} have "
            "exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after a few seconds."
        )
    elif status == 401:
        message = (
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
            "for an active subscription and use a correct regional API endpoint for your resource."
        )
    elif status == 404:
        message = "The API deployment for this resource does not exist."
    return {"error": {"code": str(status), "message": message}}


# --------------------------------------------------------------------------- the server


@dataclass(slots=True)
class _Ctx:
    request: web.Request
    provider: str
    body: Any
    t0: float
    stream: bool = False
    fault: Fault | None = None
    deployment: str | None = None
    api_version: str | None = None

    @property
    def model(self) -> str:
        """The model the response names: the Azure deployment, else the request's model."""
        if self.deployment:
            return self.deployment
        return str(self.body.get("model") or "") if isinstance(self.body, dict) else ""


Handler = Callable[[_Ctx], Awaitable[web.StreamResponse]]


class SimulatedUpstream:
    """An aiohttp server speaking OpenAI, Azure OpenAI and Anthropic. Use `async with`."""

    def __init__(
        self,
        settings: SimSettings | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings or SimSettings()
        self.host = host
        self.ssl_context = ssl_context  # set: serves HTTPS, as a hosted API does
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.faults: deque[Fault] = deque()
        self._rng = random.Random(self.settings.seed)
        self._started = time.monotonic()
        self._window = (0, 0)  # (minute, requests in it)
        self._runner: web.AppRunner | None = None
        self.batches = SimulatedBatches(self)  # the Files and Batch APIs (simulator_batches)
        self.responses = SimulatedResponses(self)  # the Responses API (simulator_responses)
        # GET /metrics: the load gauges of an inference server, set by the test (simulator_vllm_metrics).
        self.load_metrics = SimulatedLoadMetrics()
        self.app = self._build_app()

    # ----- lifecycle

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._started = time.monotonic()
        # Load the encodings now (once per process), not on the first request's clock.
        await asyncio.get_running_loop().run_in_executor(None, _warm_tokenizers)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimulatedUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reset(self) -> None:
        """Forgets recorded requests and queued faults; restarts the error-rate RNG and burst clock."""
        self.requests.clear()
        self.faults.clear()
        self._rng = random.Random(self.settings.seed)
        self._started = time.monotonic()

    def enqueue_fault(self, fault: Fault) -> None:
        """Applies `fault` to the next request that has no `x-sim-fault` header (FIFO, one each)."""
        self.faults.append(fault)

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        routes: list[tuple[str, str, str, Handler]] = [
            ("POST", "/v1/chat/completions", OPENAI, self._chat),
            ("POST", "/v1/completions", OPENAI, self._completions),
            ("POST", "/v1/embeddings", OPENAI, self._embeddings),
            ("GET", "/v1/models", OPENAI, self._models),
            ("GET", "/v1/models/{model_id}", OPENAI, self._models),
            ("POST", "/openai/deployments/{deployment}/chat/completions", AZURE, self._chat),
            ("POST", "/openai/deployments/{deployment}/completions", AZURE, self._completions),
            ("POST", "/openai/deployments/{deployment}/embeddings", AZURE, self._embeddings),
            ("POST", "/v1/messages", ANTHROPIC, self._messages),
            ("POST", "/v1/messages/count_tokens", ANTHROPIC, self._count_tokens),
        ]
        for method, path, provider, handler in routes:
            app.router.add_route(method, path, functools.partial(self._entry, provider, handler))
        self.batches.add_routes(app)
        self.responses.add_routes(app)
        self.load_metrics.add_routes(app)
        return app

    async def answer(self, provider: str, endpoint: str, body: dict[str, Any], request: web.Request) -> tuple[int, Any]:
        """One request to `endpoint` ("/chat/completions", "/completions", "/embeddings") as it would be
        answered, without faults or latency: (status, JSON body). What a batch runs for each of its lines."""
        handlers: dict[str, Handler] = {
            "/chat/completions": self._chat,
            "/completions": self._completions,
            "/embeddings": self._embeddings,
        }
        handler = handlers.get(endpoint)
        if handler is None:
            return 404, openai_error_body(f"Unknown endpoint {endpoint}.", "invalid_request_error")
        resp = await handler(_Ctx(request, provider, body, time.perf_counter()))
        raw = resp.body if isinstance(resp, web.Response) else None
        return resp.status, orjson.loads(raw) if isinstance(raw, bytes) else None

    # ----- the common path of every request

    async def _entry(self, provider: str, handler: Handler, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        settings = self.settings
        if provider == OPENAI and request.method == "GET" and "anthropic-version" in request.headers:
            provider = ANTHROPIC
        raw = await request.read() if request.can_read_body else b""
        body: Any = {}
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = None
        ctx = _Ctx(request, provider, body, t0, deployment=request.match_info.get("deployment"))
        if provider == AZURE:
            ctx.api_version = request.query.get("api-version")
        if isinstance(body, dict):
            ctx.stream = bool(body.get("stream"))
        if settings.max_recorded_requests > 0:
            self._record(ctx)
        self._count_request()
        if settings.latency_ms > 0:
            await asyncio.sleep(settings.latency_ms / 1000)

        early = self._preflight(ctx)
        if early is not None:
            return early
        try:
            ctx.fault = self._next_fault(ctx)
        except ValueError as exc:
            return self._invalid(ctx, str(exc), None)
        if ctx.fault is not None:
            response = self._fault_response(ctx)
            if response is not None:
                return response
            if ctx.fault.kind == "slow_first_token" and not ctx.stream:
                await asyncio.sleep(ctx.fault.delay)
        try:
            return await handler(ctx)
        except ConnectionResetError:  # the client went away mid-stream
            return web.Response(status=499)

    def _record(self, ctx: _Ctx) -> None:
        req = ctx.request
        if len(self.requests) >= self.settings.max_recorded_requests:
            del self.requests[: len(self.requests) // 2 or 1]
        self.requests.append(
            RecordedRequest(
                method=req.method,
                path=req.path,
                query=dict(req.query),
                headers={k.lower(): v for k, v in req.headers.items()},
                body=ctx.body if ctx.body != {} or req.method != "GET" else None,
                time=time.time(),
                provider=ctx.provider,
                deployment=ctx.deployment,
                api_version=ctx.api_version,
                peer=_peer(req),
            )
        )

    def _count_request(self) -> None:
        minute = int(time.monotonic() // 60)
        current, count = self._window
        self._window = (minute, count + 1 if minute == current else 1)

    def _preflight(self, ctx: _Ctx) -> web.StreamResponse | None:
        """Authentication, version headers/params and a parseable JSON body."""
        headers = ctx.request.headers
        key = self.settings.api_key
        if ctx.provider == ANTHROPIC:
            # x-api-key, or Bearer as anthropic SDKs >= 2 send the API key.
            if key is not None and headers.get("x-api-key") != key and headers.get("Authorization") != f"Bearer {key}":
                if "x-api-key" not in headers and "Authorization" not in headers:
                    return self._error(
                        ctx, 401, anthropic_error_body("authentication_error", "x-api-key header is required")
                    )
                return self._status_error(ctx, 401, None)
            if ctx.request.method == "POST" and "anthropic-version" not in headers:
                return self._error(
                    ctx, 400, anthropic_error_body("invalid_request_error", "anthropic-version: header is required")
                )
        elif ctx.provider == AZURE:
            if key is not None and headers.get("api-key") != key:
                return self._status_error(ctx, 401, None)
            if not ctx.api_version:
                return self._error(
                    ctx,
                    400,
                    {"error": {"code": "BadRequest", "message": "Missing required query parameter: api-version"}},
                )
        elif key is not None:
            auth = headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return self._error(
                    ctx,
                    401,
                    openai_error_body(
                        "You didn't provide an API key. You need to provide your API key in an Authorization header "
                        "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                        "invalid_request_error",
                    ),
                )
            if auth[7:] != key:
                return self._status_error(ctx, 401, None)
        if ctx.body is None or (ctx.request.method == "POST" and not isinstance(ctx.body, dict)):
            if ctx.provider == ANTHROPIC:
                return self._invalid(ctx, "There was an error parsing the body of your request.", None)
            return self._invalid(
                ctx,
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
                "HTTP library correctly.)",
                None,
            )
        return None

    def _next_fault(self, ctx: _Ctx) -> Fault | None:
        """The header fault, else the queued one, else a rate-limit burst, else a random error."""
        header = ctx.request.headers.get("x-sim-fault")
        if header:
            return parse_fault(header)
        if self.faults:
            return self.faults.popleft()
        settings = self.settings
        burst = settings.rate_limit_burst
        if burst is not None and burst.every_s > 0:
            phase = (time.monotonic() - self._started) % burst.every_s
            if phase >= burst.every_s - burst.duration_s:
                return Fault(status=burst.status, retry_after=round(burst.every_s - phase, 3))
        if settings.error_rate > 0 and self._rng.random() < settings.error_rate:
            if self._rng.random() < 0.5:
                return Fault(status=429, retry_after=1)
            return Fault(status=500)
        return None

    def _fault_response(self, ctx: _Ctx) -> web.StreamResponse | None:
        """The response for faults that replace the answer; None for faults applied while answering."""
        fault = ctx.fault
        assert fault is not None
        kind = fault.kind
        if kind == "error" or (kind == "stream_error" and not ctx.stream):
            default = 529 if kind == "stream_error" and ctx.provider == ANTHROPIC else 500
            retry = fault.retry_after if fault.retry_after_header is None else fault.retry_after_header
            return self._status_error(ctx, fault.status or default, retry)
        if kind == "context_length":
            return self._context_length_error(ctx, self._prompt_tokens_of(ctx))
        if kind == "insufficient_quota":
            if ctx.provider == ANTHROPIC:
                return self._invalid(
                    ctx,
                    "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to "
                    "upgrade or purchase credits.",
                    None,
                )
            body = openai_error_body(
                "You exceeded your current quota, please check your plan and billing details. For more information on "
                "this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
                "insufficient_quota",
                None,
                "insufficient_quota",
            )
            return self._error(ctx, fault.status or 429, body)
        if kind == "malformed":
            return web.Response(
                status=200, body=_MALFORMED_BODY, content_type="application/json", headers=self._headers(ctx)
            )
        return None

    # ----- responses

    def _headers(self, ctx: _Ctx) -> dict[str, str]:
        remaining = str(max(0, _RATE_LIMIT_REQUESTS - self._window[1]))
        if ctx.provider == ANTHROPIC:
            return {
                "request-id": _random_id("req_"),
                "anthropic-ratelimit-requests-limit": str(_RATE_LIMIT_REQUESTS),
                "anthropic-ratelimit-requests-remaining": remaining,
            }
        headers = {
            "x-request-id": _random_id("req_"),
            "openai-processing-ms": str(int((time.perf_counter() - ctx.t0) * 1000)),
            "x-ratelimit-limit-requests": str(_RATE_LIMIT_REQUESTS),
            "x-ratelimit-remaining-requests": remaining,
        }
        if ctx.provider == AZURE:
            headers["apim-request-id"] = _random_id("", 32)
        else:
            headers["openai-version"] = "2020-10-01"
        return headers

    async def _send_json(self, ctx: _Ctx, payload: Any) -> web.StreamResponse:
        body = orjson.dumps(payload)
        if ctx.fault is not None and ctx.fault.kind == "cut_stream":
            # A non-streaming answer cut mid-body: Content-Length promises more than arrives.
            resp = web.StreamResponse(status=200, headers=self._headers(ctx))
            resp.content_type = "application/json"
            resp.content_length = len(body)
            await resp.prepare(ctx.request)
            await resp.write(body[: len(body) // 2])
            return self._abort(ctx, resp)
        return web.Response(body=body, content_type="application/json", headers=self._headers(ctx))

    def _abort(self, ctx: _Ctx, resp: web.StreamResponse) -> web.StreamResponse:
        transport = ctx.request.transport
        if transport is not None:
            transport.abort()
        return resp

    def _error(self, ctx: _Ctx, status: int, body: Any, retry_after: float | str | None = None) -> web.Response:
        """`retry_after`: seconds, or a string sent as the Retry-After header as it is."""
        headers = self._headers(ctx)
        if isinstance(retry_after, str):
            headers["retry-after"] = retry_after
        elif retry_after is not None:
            headers["retry-after"] = _fmt_seconds(retry_after)
            if ctx.provider == AZURE and math.isfinite(retry_after):
                headers["retry-after-ms"] = str(int(retry_after * 1000))
        if ctx.provider == ANTHROPIC and isinstance(body, dict) and body.get("type") == "error":
            body["request_id"] = headers["request-id"]
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)

    def _status_error(self, ctx: _Ctx, status: int, retry_after: float | str | None) -> web.Response:
        """An error response for an HTTP status, in the provider's format."""
        if ctx.provider == ANTHROPIC:
            type_, message = _ANTHROPIC_STATUS.get(
                status, ("api_error" if status >= 500 else "invalid_request_error", f"Error {status}")
            )
            return self._error(ctx, status, anthropic_error_body(type_, message), retry_after)
        type_, code, message = _OPENAI_STATUS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None, f"Error {status}")
        )
        if status == 429 and ctx.model:
            message = (
                f"Rate limit reached for {ctx.model} in organization org-kubetoll-sim on requests per min "
                "(RPM): Limit 10000, Used 10000, Requested 1."
            )
        if ctx.provider == AZURE and (status in (401, 404, 429) or status >= 500):
            return self._error(ctx, status, azure_error_body(status, message, ctx.api_version), retry_after)
        return self._error(ctx, status, openai_error_body(message, type_, None, code), retry_after)

    def _invalid(self, ctx: _Ctx, message: str, param: str | None, code: str | None = None) -> web.Response:
        if ctx.provider == ANTHROPIC:
            return self._error(ctx, 400, anthropic_error_body("invalid_request_error", message))
        return self._error(ctx, 400, openai_error_body(message, "invalid_request_error", param, code))

    def _context_window(self, ctx: _Ctx) -> int:
        if self.settings.context_window is not None:
            return self.settings.context_window
        return 200_000 if ctx.provider == ANTHROPIC else 128_000

    def _prompt_tokens_of(self, ctx: _Ctx) -> int:
        body = ctx.body if isinstance(ctx.body, dict) else {}
        model = str(body.get("model") or "gpt-4o")
        try:
            if ctx.provider == ANTHROPIC:
                return anthropic_prompt_tokens(body, model)
            if isinstance(body.get("messages"), list):
                return openai_prompt_tokens(body["messages"], model)
        except Exception:
            pass
        return 0

    def _context_length_error(self, ctx: _Ctx, prompt_tokens: int) -> web.Response:
        window = self._context_window(ctx)
        tokens = max(prompt_tokens, window + 1)
        if ctx.provider == ANTHROPIC:
            return self._invalid(ctx, f"prompt is too long: {tokens} tokens > {window} maximum", None)
        message = (
            f"This model's maximum context length is {window} tokens. However, your messages resulted in "
            f"{tokens} tokens. Please reduce the length of the messages."
        )
        return self._invalid(ctx, message, "messages", "context_length_exceeded")

    def _unknown_model(self, ctx: _Ctx) -> web.Response | None:
        if not self.settings.strict_models or ctx.deployment or ctx.model in self.settings.models:
            return None
        if ctx.provider == ANTHROPIC:
            return self._error(ctx, 404, anthropic_error_body("not_found_error", f"model: {ctx.model}"))
        return self._error(
            ctx,
            404,
            openai_error_body(
                f"The model `{ctx.model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                None,
                "model_not_found",
            ),
        )

    def _wants_usage(self, ctx: _Ctx) -> bool:
        return not (ctx.fault is not None and ctx.fault.kind == "no_usage")

    async def _write_stream(
        self, ctx: _Ctx, events: list[Event], closing: int, error_event: bytes | None
    ) -> web.StreamResponse:
        """Sends SSE events, honouring first_token_ms, chunk_interval_ms and the stream faults."""
        settings, fault = self.settings, ctx.fault
        headers = self._headers(ctx)
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        headers["Cache-Control"] = "no-cache"
        resp = web.StreamResponse(status=200, headers=headers)
        await resp.prepare(ctx.request)
        delay = settings.first_token_ms / 1000
        cut = False
        if fault is not None:
            if fault.kind == "slow_first_token":
                delay += fault.delay
            elif fault.kind == "cut_stream":
                events, cut = events[: min(max(0, fault.after_chunks), closing)], True
            elif fault.kind == "stream_error" and error_event is not None:
                events = events[: min(max(0, fault.after_chunks), closing)] + [(error_event, False)]
        if delay > 0:
            await asyncio.sleep(delay)
        interval = settings.chunk_interval_ms / 1000
        if interval <= 0:
            if events:
                await resp.write(b"".join(data for data, _ in events))
        else:
            pending: list[bytes] = []
            paced_before = False
            for data, paced in events:
                if paced and paced_before:
                    await resp.write(b"".join(pending))
                    pending.clear()
                    await asyncio.sleep(interval)
                paced_before = paced_before or paced
                pending.append(data)
            if pending:
                await resp.write(b"".join(pending))
        if cut:
            return self._abort(ctx, resp)
        if settings.stream_end_delay_ms > 0:
            await asyncio.sleep(settings.stream_end_delay_ms / 1000)
        await resp.write_eof()
        return resp

    # ----- OpenAI / Azure endpoints

    def _validate_chat(self, ctx: _Ctx) -> web.Response | None:
        body = ctx.body
        if not body.get("model") and not ctx.deployment:
            return self._invalid(ctx, "you must provide a model parameter", "model")
        messages = body.get("messages")
        if messages is None:
            return self._invalid(
                ctx, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
            )
        if not isinstance(messages, list):
            return self._invalid(
                ctx, "Invalid type for 'messages': expected an array of objects.", "messages", "invalid_type"
            )
        if not messages:
            return self._invalid(
                ctx,
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array "
                "instead.",
                "messages",
                "empty_array",
            )
        roles = ("system", "developer", "user", "assistant", "tool", "function")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in roles:
                role = msg.get("role") if isinstance(msg, dict) else None
                return self._invalid(
                    ctx,
                    f"Invalid value: {role!r}. Supported values are: 'system', 'assistant', 'user', 'function', "
                    "'tool', and 'developer'.",
                    f"messages[{i}].role",
                    "invalid_value",
                )
        return self._validate_common(ctx)

    def _validate_common(self, ctx: _Ctx) -> web.Response | None:
        body = ctx.body
        n = body.get("n")
        if n is not None and (not isinstance(n, int) or not 1 <= n <= 128):
            return self._invalid(
                ctx,
                f"Invalid 'n': integer out of range. Expected a value between 1 and 128, but got {n} instead.",
                "n",
                "integer_out_of_range",
            )
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if value is not None and (not isinstance(value, int) or value < 1):
                return self._invalid(
                    ctx,
                    f"Invalid '{key}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
                    key,
                    "integer_below_min_value",
                )
        if body.get("stream_options") is not None and not ctx.stream:
            return self._invalid(
                ctx, "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
            )
        if body.get("tool_choice") is not None and not body.get("tools") and "messages" in body:
            return self._invalid(
                ctx,
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                "tool_choice",
            )
        return self._unknown_model(ctx)

    def _include_usage(self, ctx: _Ctx) -> bool:
        options = ctx.body.get("stream_options")
        asked = isinstance(options, dict) and bool(options.get("include_usage"))
        return asked and self.settings.send_usage_in_stream and self._wants_usage(ctx)

    def _openai_base(self, ctx: _Ctx, prefix: str, obj: str) -> dict[str, Any]:
        return {
            "id": _random_id(prefix, 29),
            "object": obj,
            "created": int(time.time()),
            "model": ctx.model,
            "system_fingerprint": "fp_kubetoll_sim",
        }

    async def _chat(self, ctx: _Ctx) -> web.StreamResponse:
        invalid = self._validate_chat(ctx)
        if invalid is not None:
            return invalid
        body, settings = ctx.body, self.settings
        count_model = str(body.get("model") or "gpt-4o")
        prompt = openai_prompt_tokens(body["messages"], count_model)
        if prompt > self._context_window(ctx):
            return self._context_length_error(ctx, prompt)
        replies = plan_chat(body, settings, count_model)
        if ctx.fault is not None and ctx.fault.kind in ANSWER_FAULTS:
            replies = [spoil_reply(r, ctx.fault.kind, body, settings, count_model) for r in replies]
        usage = _openai_usage(prompt, sum(r.tokens for r in replies), settings.cached_prompt_tokens)
        if ctx.stream:
            base = self._openai_base(ctx, "chatcmpl-", "chat.completion.chunk")
            base["service_tier"] = "default"
            events, closing = chat_stream_events(
                base, replies, settings, usage if self._include_usage(ctx) else None, ctx.provider == AZURE
            )
            return await self._write_stream(ctx, events, closing, self._openai_stream_error(ctx))
        choices = []
        for i, reply in enumerate(replies):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if reply.tool or reply.refusal is not None else reply.text,
                "refusal": reply.refusal,
                "annotations": [],
            }
            if reply.tool is not None:
                message["tool_calls"] = [
                    {
                        "id": reply.tool_id,
                        "type": "function",
                        "function": {"name": reply.tool.name, "arguments": reply.arguments},
                    }
                ]
            choice: dict[str, Any] = {"index": i, "message": message, "logprobs": None, "finish_reason": reply.finish}
            if ctx.provider == AZURE:
                choice["content_filter_results"] = {}
            choices.append(choice)
        payload = self._openai_base(ctx, "chatcmpl-", "chat.completion")
        payload["choices"] = choices
        if self._wants_usage(ctx):
            payload["usage"] = usage
        payload["service_tier"] = "default"
        if ctx.provider == AZURE:
            payload["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": {}}]
        return await self._send_json(ctx, payload)

    def _openai_stream_error(self, ctx: _Ctx) -> bytes | None:
        """The `data: {"error": ...}` event OpenAI sends mid-stream, when the fault asks for one."""
        fault = ctx.fault
        if fault is None or fault.kind != "stream_error":
            return None
        status = fault.status or 500
        type_, code, message = _OPENAI_STATUS.get(
            status,
            ("server_error", None, "The server had an error while processing your request.")
            if status >= 500
            else ("invalid_request_error", None, f"Error {status}"),
        )
        return _sse(openai_error_body(message, type_, None, code))

    async def _completions(self, ctx: _Ctx) -> web.StreamResponse:
        body, settings = ctx.body, self.settings
        if not body.get("model") and not ctx.deployment:
            return self._invalid(ctx, "you must provide a model parameter", "model")
        prompt = body.get("prompt")
        if prompt is None:
            return self._invalid(ctx, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
        invalid = self._validate_common(ctx)
        if invalid is not None:
            return invalid
        count_model = str(body.get("model") or "gpt-4o")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt) if isinstance(prompt, list) else [str(prompt)]
        if not prompts or any(p == "" or p == [] for p in prompts):
            return self._invalid(
                ctx, "Invalid 'prompt': empty. Expected a non-empty string or array.", "prompt", "empty_array"
            )
        prompt_tokens = sum(count_tokens(p, count_model) if isinstance(p, str) else len(p) for p in prompts)
        if prompt_tokens > self._context_window(ctx):
            return self._context_length_error(ctx, prompt_tokens)
        cap = _cap(body, "max_tokens")
        n = int(body.get("n") or 1)
        replies = [
            _text_reply(p if isinstance(p, str) else str(p), settings, cap, j) for p in prompts for j in range(n)
        ]
        usage = _openai_usage(prompt_tokens, sum(r.tokens for r in replies), settings.cached_prompt_tokens)
        base = self._openai_base(ctx, "cmpl-", "text_completion")
        if ctx.stream:
            events, closing = completion_stream_events(
                base, replies, settings, usage if self._include_usage(ctx) else None
            )
            return await self._write_stream(ctx, events, closing, self._openai_stream_error(ctx))
        base["choices"] = [
            {"text": r.text, "index": i, "logprobs": None, "finish_reason": r.finish} for i, r in enumerate(replies)
        ]
        if self._wants_usage(ctx):
            base["usage"] = usage
        return await self._send_json(ctx, base)

    async def _embeddings(self, ctx: _Ctx) -> web.StreamResponse:
        body, settings = ctx.body, self.settings
        if not body.get("model") and not ctx.deployment:
            return self._invalid(ctx, "you must provide a model parameter", "model")
        raw = body.get("input")
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            inputs: list[Any] = [raw]
        else:
            inputs = raw if isinstance(raw, list) else []
        if not inputs or any(x == "" or x == [] or not isinstance(x, (str, list)) for x in inputs):
            return self._invalid(
                ctx,
                "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
                "input",
            )
        dims = body.get("dimensions") or settings.embedding_dim
        if not isinstance(dims, int) or dims < 1:
            return self._invalid(
                ctx,
                f"Invalid 'dimensions': integer below minimum value. Expected a value >= 1, but got {dims} instead.",
                "dimensions",
                "integer_below_min_value",
            )
        invalid = self._unknown_model(ctx)
        if invalid is not None:
            return invalid
        count_model = str(body.get("model") or "text-embedding-3-small")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        tokens = 0
        for i, item in enumerate(inputs):
            key = item.encode() if isinstance(item, str) else array("i", item).tobytes()
            tokens += count_tokens(item, count_model) if isinstance(item, str) else len(item)
            packed = embedding_bytes(key, dims)
            vector: Any = base64.b64encode(packed).decode() if as_base64 else list(struct.unpack(f"<{dims}f", packed))
            data.append({"object": "embedding", "index": i, "embedding": vector})
        payload: dict[str, Any] = {"object": "list", "data": data, "model": ctx.model}
        if self._wants_usage(ctx):
            payload["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return await self._send_json(ctx, payload)

    async def _models(self, ctx: _Ctx) -> web.StreamResponse:
        wanted = ctx.request.match_info.get("model_id")
        ids = [m for m in self.settings.models if wanted is None or m == wanted]
        if wanted is not None and not ids:
            ctx.body = {"model": wanted}
            if ctx.provider == ANTHROPIC:
                return self._error(ctx, 404, anthropic_error_body("not_found_error", f"model: {wanted}"))
            return self._error(
                ctx,
                404,
                openai_error_body(
                    f"The model '{wanted}' does not exist", "invalid_request_error", "model", "model_not_found"
                ),
            )
        if ctx.provider == ANTHROPIC:
            items: list[dict[str, Any]] = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in ids
            ]
            payload: Any = (
                items[0]
                if wanted
                else {
                    "data": items,
                    "has_more": False,
                    "first_id": ids[0] if ids else None,
                    "last_id": ids[-1] if ids else None,
                }
            )
        else:
            items = [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "kubetoll-sim"} for m in ids]
            payload = items[0] if wanted else {"object": "list", "data": items}
        return await self._send_json(ctx, payload)

    # ----- Anthropic endpoints

    def _validate_messages(self, ctx: _Ctx, need_max_tokens: bool = True) -> web.Response | None:
        body = ctx.body
        if not body.get("model"):
            return self._invalid(ctx, "model: Field required", None)
        if need_max_tokens:
            max_tokens = body.get("max_tokens")
            if max_tokens is None:
                return self._invalid(ctx, "max_tokens: Field required", None)
            if not isinstance(max_tokens, int) or max_tokens < 1:
                return self._invalid(ctx, "max_tokens: Input should be greater than or equal to 1", None)
        messages = body.get("messages")
        if messages is None:
            return self._invalid(ctx, "messages: Field required", None)
        if not isinstance(messages, list) or not messages:
            return self._invalid(ctx, "messages: at least one message is required", None)
        for i, msg in enumerate(messages):
            role = msg.get("role") if isinstance(msg, dict) else None
            if role == "system":
                return self._invalid(
                    ctx,
                    'messages: Unexpected role "system". The Messages API accepts a top-level `system` parameter, not '
                    '"system" as an input message role.',
                    None,
                )
            if role not in ("user", "assistant"):
                return self._invalid(ctx, f"messages.{i}.role: Input should be 'user' or 'assistant'", None)
        return self._unknown_model(ctx)

    async def _messages(self, ctx: _Ctx) -> web.StreamResponse:
        invalid = self._validate_messages(ctx)
        if invalid is not None:
            return invalid
        body, settings = ctx.body, self.settings
        model = str(body["model"])
        total = anthropic_prompt_tokens(body, model)
        if total > self._context_window(ctx):
            return self._context_length_error(ctx, total)
        messages = body["messages"]
        seed = _last_user_text(messages)
        tools, choice = _anthropic_tools(body)
        tool = _pick_tool(tools, choice, seed, _ends_with_tool_result(messages))
        reply = _tool_reply(tool, model, "toolu_") if tool else _text_reply(seed, settings, int(body["max_tokens"]), 0)
        cached = min(max(0, settings.cached_prompt_tokens), total)
        message: dict[str, Any] = {
            "id": _random_id("msg_", 24),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": _anthropic_content(reply),
            "stop_reason": _ANTHROPIC_STOP[reply.finish],
            "stop_sequence": None,
            "usage": {
                "input_tokens": total - cached,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": cached,
                "output_tokens": reply.tokens,
                "service_tier": "standard",
            },
        }
        if ctx.stream:
            events, closing = messages_stream_events(message, reply, settings, self._wants_usage(ctx))
            return await self._write_stream(ctx, events, closing, self._anthropic_stream_error(ctx))
        if not self._wants_usage(ctx):
            del message["usage"]
        return await self._send_json(ctx, message)

    def _anthropic_stream_error(self, ctx: _Ctx) -> bytes | None:
        """Anthropic's in-stream `event: error` (an overloaded_error unless the fault says otherwise)."""
        fault = ctx.fault
        if fault is None or fault.kind != "stream_error":
            return None
        status = fault.status or 529
        type_, text = _ANTHROPIC_STATUS.get(
            status,
            ("api_error", "Internal server error") if status >= 500 else ("invalid_request_error", f"Error {status}"),
        )
        return _sse_named("error", anthropic_error_body(type_, text))

    async def _count_tokens(self, ctx: _Ctx) -> web.StreamResponse:
        invalid = self._validate_messages(ctx, need_max_tokens=False)
        if invalid is not None:
            return invalid
        return await self._send_json(ctx, {"input_tokens": anthropic_prompt_tokens(ctx.body, str(ctx.body["model"]))})


def embedding_bytes(key: bytes, dims: int) -> bytes:
    """A deterministic unit-norm vector for `key`, as little-endian float32 bytes."""
    raw = array("H", hashlib.shake_256(key).digest(dims * 2))
    values = [x - 32767.5 for x in raw]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return struct.pack(f"<{dims}f", *(v / norm for v in values))


# --------------------------------------------------------------------------- CLI entry


def describe_paths() -> str:
    return (
        "OpenAI /v1/chat/completions /v1/completions /v1/embeddings /v1/models; "
        "Azure /openai/deployments/{deployment}/(chat/completions|completions|embeddings)?api-version=...; "
        "Anthropic /v1/messages /v1/messages/count_tokens; "
        "Files and Batches /v1/files /v1/batches (Azure /openai/files /openai/batches); "
        "Responses /v1/responses"
    )


async def _serve(host: str, port: int, settings: SimSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            loop.add_signal_handler(sig, stop.set)
    async with SimulatedUpstream(settings, host=host, port=port) as sim:
        print(f"kubetoll simulated upstream listening on {sim.url} - {describe_paths()}", flush=True)
        await stop.wait()


def run(host: str = "127.0.0.1", port: int = 8089, settings: SimSettings | None = None) -> None:
    """Serves until SIGINT/SIGTERM (blocking). Uses uvloop when it is installed."""
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(host, port, settings or SimSettings()))
