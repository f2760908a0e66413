"""Prompt token estimates with tiktoken, without network.

The estimate sizes the reservation before a call (the provider's reported usage
settles it after), so it must be close and fast:

- OpenAI models get their own encoding: o200k_base for the GPT-4o/4.1/5 and
  o-series families, cl100k_base for GPT-4/3.5 and the embedding models.
- Other families (Claude, Llama, Mistral, Qwen...) have tokenizers tiktoken does
  not ship; we count with cl100k_base and say so (`Estimate.approximate`). On
  English text it lands within ~10-20% of those tokenizers, and settlement
  corrects it. When the config's exact models need o200k_base alone, those
  families are counted with it instead (`use_encodings_for`), so a hosted GPT-4o
  backend with an in-cluster Llama fallback holds one encoding, not two.
- Messages resent on every turn of a conversation are counted once: counts are
  memoised per (encoding, text) in a bounded LRU, so a long history costs a hash
  lookup per message instead of a re-encode.

A sidecar runs in every application pod, so the encodings are loaded as lean as
tiktoken allows (docs/performance.md, "Footprint"):

- only the ones the configured backends need (`encodings_for`): before the
  server's modules are imported (`main.preload_encodings`), or in a thread
  started at config load (`load_in_background`);
- from a form baked at image build (`bake_encodings`): token bytes in rank order,
  read without the base64 decoding of OpenAI's text files (~40% less CPU to
  load), checked against the SHA-256 of the file it was made from; without it (a
  dev checkout), from the bundled text files through tiktoken;
- keeping only tiktoken's Rust tables: `Encoding` would also hold its Python
  `dict[bytes, int]` of ranks (~16 MiB for cl100k_base, ~27 MiB for o200k_base),
  which only pickling reads; it is dropped and the freed heap handed back to the
  system (`malloc_trim`).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

_BUNDLED_CACHE = Path(__file__).with_name("tiktoken_cache")
# tiktoken downloads an encoding unless this directory holds it; ours ship with the
# package. Set for every user of tiktoken in this process (tests and tools call
# `tiktoken.get_encoding` too); this module itself never lets tiktoken download.
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


@dataclass(frozen=True, slots=True)
class _Source:
    """An encoding's file as OpenAI publishes it, and the SHA-256 tiktoken checks it against."""

    url: str
    sha256: str

    @property
    def cache_name(self) -> str:
        """The file name tiktoken looks for in TIKTOKEN_CACHE_DIR."""
        return hashlib.sha1(self.url.encode()).hexdigest()


_SOURCES = {
    O200K: _Source(
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    CL100K: _Source(
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}
# Larger first: the process peaks at the tables held plus the next load's transient,
# so o200k_base's load (+71 MiB at its peak) goes before cl100k_base's tables (23 MiB)
# are held, and cl100k_base's (+36 MiB) comes on top of o200k_base's 43 MiB.
_LOAD_ORDER = (O200K, CL100K)

BAKED_SUFFIX = ".kubetoll-bpe"
_BAKED_MAGIC = b"KUBETOLL-BPE 1"
# Where the baked encodings are read from: the package's folder (the image bakes them
# there), or this directory (the footprint benchmark points a dev checkout at its own).
BAKED_DIR_ENV = "KUBETOLL_BAKED_ENCODINGS"

_encodings: dict[str, tiktoken.Encoding] = {}
_sources: dict[str, Path] = {}  # the file each loaded encoding was read from
_load_lock = threading.Lock()  # one load at a time: two at once would stack their peaks


@dataclass(frozen=True, slots=True)
class EncodingChoice:
    name: str
    approximate: bool  # True when the model's own tokenizer is not in tiktoken


# What a model of a family tiktoken does not ship is counted with (`use_encodings_for` sets it).
_approximate_with = CL100K


def _exact_encoding(model: str) -> str | None:
    m = model.lower().rsplit("/", 1)[-1]  # "openai/gpt-4o" -> "gpt-4o"
    if m.startswith("ft:"):
        m = m[3:]
    if m.startswith(_O200K_PREFIXES):
        return O200K
    if m.startswith(_CL100K_PREFIXES):
        return CL100K
    return None


def encoding_for_model(model: str) -> EncodingChoice:
    exact = _exact_encoding(model)
    if exact is not None:
        return EncodingChoice(exact, False)
    return EncodingChoice(_approximate_with, True)


def _plan(models: Iterable[str]) -> tuple[list[str], str]:
    """The encodings these models need, in load order, and the one approximate models are counted with.

    A model whose tokenizer tiktoken does not ship is counted with an encoding held for an
    exact model when there is one: cl100k_base if an exact model needs it (the historical
    choice), else o200k_base. Neither is that model's tokenizer (settlement corrects the
    estimate either way), and o200k_base's tables would otherwise sit beside cl100k_base's
    (+23 MiB) for a hosted GPT-4o backend with an in-cluster Llama or a Claude fallback.
    """
    exact: set[str] = set()
    approximate = False
    for m in models:
        name = _exact_encoding(m)
        if name is None:
            approximate = True
        else:
            exact.add(name)
    approximate_with = O200K if exact == {O200K} else CL100K
    if approximate:
        exact.add(approximate_with)
    return [n for n in _LOAD_ORDER if n in exact], approximate_with


def encodings_for(models: Iterable[str]) -> list[str]:
    """The encodings these models are counted with, in the order to load them."""
    return _plan(models)[0]


def use_encodings_for(models: Iterable[str]) -> list[str]:
    """Count approximate models as a config of these models wants; the encodings to load, in order.

    The sidecar calls it when a config takes effect, with that config's encodings loaded
    (at start, before its ports open; on a reload, after `encodings_for` was loaded off
    the loop). A count of an encoding not loaded yet would load it then.
    """
    global _approximate_with
    names, _approximate_with = _plan(models)
    return names


def approximate_encoding() -> str:
    """The encoding models of families tiktoken does not ship are counted with, in this process."""
    return _approximate_with


def loaded_encodings() -> dict[str, str]:
    """The encodings this process has loaded, and the file each was read from."""
    return {name: str(_sources[name]) for name in sorted(_encodings)}


def get_encoding(name: str) -> tiktoken.Encoding:
    enc = _encodings.get(name)
    if enc is None:
        with _load_lock:
            enc = _encodings.get(name)  # another thread may have loaded it while we waited
            if enc is None:
                enc = _encodings[name] = _load(name)
    return enc


def load_in_background(names: Iterable[str]) -> Future[None]:
    """Load `names` in a thread of their own; the future is done (or failed) when all are.

    The sidecar starts this at config load and awaits it before it listens, so the
    rest of its start-up (Redis, the batch registry) overlaps the load.
    """
    todo = list(names)
    done: Future[None] = Future()

    def run() -> None:
        try:
            for n in todo:
                get_encoding(n)
        except BaseException as exc:  # handed to whoever awaits the future
            done.set_exception(exc)
        else:
            done.set_result(None)

    threading.Thread(target=run, name="kubetoll-encodings", daemon=True).start()
    return done


def _load(name: str) -> tiktoken.Encoding:
    if name not in _SOURCES:
        raise RuntimeError(f"tiktoken encoding {name!r} is not one the sidecar ships ({', '.join(_SOURCES)})")
    try:
        path = _baked_dir() / (name + BAKED_SUFFIX)
        if path.exists():
            kwargs = _read_baked(path, name)
        else:
            path = _published_path(name)
            kwargs = _read_published(name)
        enc = tiktoken.Encoding(**kwargs)
    except Exception as exc:  # a missing or damaged file would otherwise surface as a network error
        raise RuntimeError(f"tiktoken encoding {name!r} could not be loaded: {exc}") from exc
    # Only pickling reads the Python copy of the ranks; the Rust tables hold their own.
    enc._mergeable_ranks = {}
    del kwargs
    _release_freed_heap()
    _sources[name] = path
    return enc


def _baked_dir() -> Path:
    return Path(os.environ.get(BAKED_DIR_ENV) or _BUNDLED_CACHE)


def _published_path(name: str) -> Path:
    """Where tiktoken reads OpenAI's file from; an error if it is not there, so tiktoken never downloads."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache_dir:  # empty: tiktoken would skip its cache and download
        raise RuntimeError("TIKTOKEN_CACHE_DIR is empty (the sidecar never downloads encodings)")
    path = Path(cache_dir) / _SOURCES[name].cache_name
    if not path.is_file():
        raise RuntimeError(f"{path} is missing (the sidecar never downloads encodings)")
    return path


def _read_published(name: str) -> dict[str, Any]:
    """tiktoken's own constructor over the bundled file (which checks its SHA-256)."""
    from tiktoken_ext.openai_public import ENCODING_CONSTRUCTORS

    _published_path(name)
    kwargs: dict[str, Any] = ENCODING_CONSTRUCTORS[name]()
    return kwargs


def _read_baked(path: Path, name: str) -> dict[str, Any]:
    """A file written by `bake_encodings`: a magic line, a JSON header line, then the body:
    one length byte per token in rank order, then the tokens' bytes back to back."""
    parts = path.read_bytes().split(b"\n", 2)
    if len(parts) != 3 or parts[0] != _BAKED_MAGIC:
        raise RuntimeError(f"{path} is not a baked encoding")
    _, header_line, body = parts
    try:
        header = orjson.loads(header_line)
        n, source, digest = int(header["tokens"]), header["source_sha256"], header["body_sha256"]
        pat_str, special_tokens = str(header["pat_str"]), dict(header["special_tokens"])
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"{path} is not a baked encoding (its header does not read)") from None
    if header.get("name") != name or source != _SOURCES[name].sha256:
        raise RuntimeError(f"{path} was baked from another file than {name}'s published one")
    if hashlib.sha256(body).hexdigest() != digest or len(body) != n + sum(body[:n]):
        raise RuntimeError(f"{path} is damaged (its contents do not match its header)")
    ranks: dict[bytes, int] = {}
    pos = n
    for rank, length in enumerate(body[:n]):
        ranks[body[pos : pos + length]] = rank
        pos += length
    return {"name": name, "pat_str": pat_str, "mergeable_ranks": ranks, "special_tokens": special_tokens}


def bake_encodings(directory: Path | None = None) -> list[Path]:
    """Write the baked form of every shipped encoding into `directory` (the package's folder).

    Run once at image build (Dockerfile.sidecar). Made from tiktoken's own constructor
    over the bundled files, so the pattern, special tokens and ranks are tiktoken's.
    """
    target = directory or _BUNDLED_CACHE
    written = []
    for name in _LOAD_ORDER:
        kwargs = _read_published(name)
        ranks: dict[bytes, int] = kwargs["mergeable_ranks"]
        by_rank = sorted(ranks, key=ranks.__getitem__)
        # The format stores ranks by position and lengths in a byte; both hold for OpenAI's files.
        if [ranks[t] for t in by_rank] != list(range(len(by_rank))) or max(map(len, by_rank)) > 255:
            raise RuntimeError(f"{name}: ranks are not 0..n-1 or a token is longer than 255 bytes")
        body = bytes(map(len, by_rank)) + b"".join(by_rank)
        header = {
            "name": name,
            "pat_str": kwargs["pat_str"],
            "special_tokens": kwargs["special_tokens"],
            "source_sha256": _SOURCES[name].sha256,
            "tokens": len(by_rank),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "tiktoken": tiktoken.__version__,
        }
        path = target / (name + BAKED_SUFFIX)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(_BAKED_MAGIC + b"\n" + orjson.dumps(header) + b"\n" + body)
        # Read back as the sidecar will: the same tables as tiktoken's, or no file at all.
        again = _read_baked(tmp, name)
        if again != kwargs:
            tmp.unlink()
            raise RuntimeError(f"{name}: the baked file does not read back as tiktoken's encoding")
        tmp.replace(path)
        written.append(path)
    return written


def _release_freed_heap() -> None:
    """Hand the heap freed by the dropped ranks back to the system (glibc; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): the memory stays reusable by this process
        pass


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
