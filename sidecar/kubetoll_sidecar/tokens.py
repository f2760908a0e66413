"""Prompt token estimates with tiktoken, without network.

The estimate sizes the reservation before a call (the provider's reported usage
settles it after), so it must be close and fast:

- OpenAI models get their own encoding: o200k_base for the GPT-4o/4.1/5 and
  o-series families, cl100k_base for GPT-4/3.5 and the embedding models.
- Other families (Claude, Llama, Mistral, Qwen...) have tokenizers tiktoken does
  not ship; we count with cl100k_base and say so (`Estimate.approximate`). On
  English text it lands within ~10-20% of those tokenizers, and settlement
  corrects it.
- Messages resent on every turn of a conversation are counted once: counts are
  memoised per (encoding, text) in a bounded LRU, so a long history costs a hash
  lookup per message instead of a re-encode.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

_BUNDLED_CACHE = Path(__file__).with_name("tiktoken_cache")
# tiktoken downloads an encoding unless this directory holds it; ours ship with the package.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_BUNDLED_CACHE))

import tiktoken  # noqa: E402  (must follow the cache-dir setting)

O200K = "o200k_base"
CL100K = "cl100k_base"

# OpenAI's documented chat accounting: each message costs its content plus a few
# framing tokens, and every reply is primed with <|start|>assistant<|message|>.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3

_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss", "codex")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-", "davinci-002", "babbage-002")

_encodings: dict[str, tiktoken.Encoding] = {}


@dataclass(frozen=True, slots=True)
class EncodingChoice:
    name: str
    approximate: bool  # True when the model's own tokenizer is not in tiktoken


def encoding_for_model(model: str) -> EncodingChoice:
    m = model.lower().rsplit("/", 1)[-1]  # "openai/gpt-4o" -> "gpt-4o"
    if m.startswith("ft:"):
        m = m[3:]
    if m.startswith(_O200K_PREFIXES):
        return EncodingChoice(O200K, False)
    if m.startswith(_CL100K_PREFIXES):
        return EncodingChoice(CL100K, False)
    return EncodingChoice(CL100K, True)


def get_encoding(name: str) -> tiktoken.Encoding:
    enc = _encodings.get(name)
    if enc is None:
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as exc:  # a missing file would otherwise surface as a network error
            raise RuntimeError(
                f"tiktoken encoding {name!r} could not be loaded from {os.environ.get('TIKTOKEN_CACHE_DIR')}: {exc}"
            ) from exc
        _encodings[name] = enc
    return enc


class _CountCache:
    """LRU of token counts keyed by (encoding, text). Bounded by entries.

    Thread-safe: the pipeline counts large prompts in a worker thread. The lock
    covers the dict only, never the encoding.
    """

    def __init__(self, max_entries: int = 20_000, min_chars: int = 64) -> None:
        self._data: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.min_chars = min_chars  # short strings encode faster than they hash and evict

    def count(self, enc: tiktoken.Encoding, text: str) -> int:
        if len(text) < self.min_chars:
            return len(enc.encode_ordinary(text))
        return self.memo(enc, text, lambda: len(enc.encode_ordinary(text)))

    def memo(self, enc: tiktoken.Encoding, text: str, compute: Any) -> int:
        """The count for `text` (a key), computing it once with `compute()`."""
        key = (enc.name, text)
        with self._lock:
            n = self._data.get(key)
            if n is not None:
                self._data.move_to_end(key)
                return n
        n = compute()
        with self._lock:
            self._data[key] = n
            if len(self._data) > self.max_entries:
                self._data.popitem(last=False)
        return n


_cache = _CountCache()


def count_text(text: str, model: str = "gpt-4o") -> int:
    return _cache.count(get_encoding(encoding_for_model(model).name), text)


def _content_text(content: Any) -> str:
    """Text of a message's content: a string, or the text parts of a content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type") == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return str(content)


_role_tokens: dict[tuple[str, str], int] = {}
_KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# An image costs tokens by size; without decoding it we reserve OpenAI's
# high-detail figure for a 1024x1024 image (85 + 4*170), a safe middle.
IMAGE_TOKENS = 765


def count_chat(messages: list[dict[str, Any]], model: str, tools: list[Any] | None = None) -> int:
    enc = get_encoding(encoding_for_model(model).name)
    total = REPLY_PRIMING
    for msg in messages:
        total += TOKENS_PER_MESSAGE
        role = msg.get("role")
        if isinstance(role, str):
            # OpenAI's accounting encodes the role too (one token for the standard ones).
            key = (enc.name, role)
            n = _role_tokens.get(key)
            if n is None:
                n = len(enc.encode_ordinary(role))
                if role in _KNOWN_ROLES:  # bounded: a client may send any role string
                    _role_tokens[key] = n
            total += n
        content = msg.get("content")
        total += _cache.count(enc, _content_text(content))
        if isinstance(content, list):
            total += IMAGE_TOKENS * sum(
                1 for p in content if isinstance(p, dict) and p.get("type") in ("image_url", "input_image")
            )
        if msg.get("name"):
            total += TOKENS_PER_NAME + _cache.count(enc, str(msg["name"]))
        calls = msg.get("tool_calls")
        if calls:
            total += _cache.count(enc, orjson.dumps(calls).decode())
    if tools:
        # One count per distinct tool set: agents resend the same tools on every turn.
        tools_key = "\x00tools\x00" + orjson.dumps(tools).decode()
        total += _cache.memo(enc, tools_key, lambda: count_tools(tools, enc))
    return total


# OpenAI renders function tools into the prompt as a TypeScript-like namespace
# (`namespace functions { // description \n type name = (_: { ... }) => any; }`),
# not as JSON: the JSON overcounts by 13-38%. The framing each part adds was
# measured against the API's reported usage (OpenAI's cookbook, "Counting tokens
# for chat completions with tool calls"): per function, a fixed start that differs
# by encoding; per parameter object and per property a fixed cost; an enum's
# values a fixed cost each, less a little for the list; the block's end once.
_FUNCTION_START = {O200K: 7, CL100K: 10}
_PROPERTIES_START = 3
_PROPERTY = 3
_ENUM_START = -3
_ENUM_ITEM = 3
_TOOLS_END = 12


def _strip_period(text: str) -> str:
    return text[:-1] if text.endswith(".") else text


def _type_name(schema: dict[str, Any]) -> str:
    t = schema.get("type")
    if isinstance(t, list):
        return " | ".join(str(x) for x in t)
    if isinstance(t, str):
        return t
    return "any"


def _count_properties(properties: dict[str, Any], enc: tiktoken.Encoding) -> int:
    n = _PROPERTIES_START
    for name, schema in properties.items():
        n += _PROPERTY
        if not isinstance(schema, dict):
            n += len(enc.encode_ordinary(str(name)))
            continue
        enum = schema.get("enum")
        if isinstance(enum, list):
            n += _ENUM_START
            for item in enum:
                n += _ENUM_ITEM + len(enc.encode_ordinary(str(item)))
        line = f"{name}:{_type_name(schema)}"
        desc = schema.get("description")
        if isinstance(desc, str) and desc:
            line += ":" + _strip_period(desc)
        n += len(enc.encode_ordinary(line))
        # Nested objects (directly or as array items) are rendered inline, property by property.
        nested = schema.get("properties")
        items = schema.get("items")
        if not isinstance(nested, dict) and isinstance(items, dict):
            nested = items.get("properties")
        if isinstance(nested, dict) and nested:
            n += _count_properties(nested, enc)
    return n


def count_tools(tools: list[Any], enc: tiktoken.Encoding) -> int:
    """Prompt tokens a `tools` list adds, as OpenAI renders it (within a few percent)."""
    total = 0
    rendered = False
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            # Not a function tool (a hosted tool, a malformed entry): its JSON is a fair upper bound.
            total += _cache.count(enc, orjson.dumps(tool).decode())
            continue
        rendered = True
        total += _FUNCTION_START.get(enc.name, _FUNCTION_START[CL100K])
        line = str(fn.get("name", ""))
        desc = fn.get("description")
        line += ":" + (_strip_period(desc) if isinstance(desc, str) else "")
        total += len(enc.encode_ordinary(line))
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict) and props:
            total += _count_properties(props, enc)
    if rendered:
        total += _TOOLS_END
    return total


def count_prompt(prompt: Any, model: str) -> int:
    """The legacy completions `prompt`: a string, a list of strings, or token arrays."""
    enc = get_encoding(encoding_for_model(model).name)
    if isinstance(prompt, str):
        return _cache.count(enc, prompt)
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return sum(count_prompt(p, model) for p in prompt)
    return 0


def count_embedding_input(inp: Any, model: str) -> int:
    return count_prompt(inp, model)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user":
            return _content_text(msg.get("content"))
    return ""
