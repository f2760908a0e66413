"""Cache keys: what in a request decides its answer, hashed; where entries live in Redis.

The exact key is a hash of a canonical JSON document (sorted keys, compact,
`null` fields dropped, OpenAI defaults filled in) holding the endpoint, the
route, the scope (the tenant, or `*` for a namespace-wide policy) and every
request field except the few that cannot change the answer (`stream`,
`stream_options`, `user`, `metadata`, ...). A denylist rather than an allowlist:
a request field the router has never heard of changes the key, so a new OpenAI
parameter can only cause a miss, never a wrong hit.

The semantic cache splits the same document in two: the text it embeds (the
last user message, or every user turn) and everything else, which must match
exactly (the partition). A hit never crosses a system prompt, a tool set, a
sampling setting or, in `lastUserMessage` mode, the conversation before the
question.

Redis keys carry the Kubernetes namespace in a hash tag, so every key of a
namespace lands in one Redis Cluster slot and no namespace reads another's:

    kt:cache:{<ns>}:<policy>:epoch             admin epoch (INCR it to flush)
    kt:cache:{<ns>}:<policy>:<gen>:e:<hash>    one cached response (both tiers)
    kt:cache:{<ns>}:<policy>:<gen>:log         stream of semantic inserts
    kt:cache:{<ns>}:<policy>:<gen>:q:<hash>    the question a semantic entry answers (for rerank/judge)
    kt:cache:{<ns>}:<policy>:<gen>:v:<hash>    a verifier's score for one pair of questions
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from kubetoll_core.enums import CacheScope
from kubetoll_core.router_config import CachePolicy

from .. import inbound

# Bump when the stored entry format or the strict check changes: it is part of
# every generation, so entries written by an older sidecar are never read.
CACHE_FORMAT_VERSION = 1

# The strict check's version (verify.py), part of every cache generation: a changed check never
# reads signatures made by an older one. Here, with the keys, so the stage can name a policy's
# generation without loading the check's word lists (a sidecar with no semantic policy never does).
VERIFY_VERSION = 5

# Request fields that cannot change the answer's content.
IGNORED_FIELDS = frozenset(
    {
        "model",  # the route is keyed instead (the body's model is the route name)
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
    }
)

# OpenAI's defaults: an absent field means the same request as the default written out.
_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
_FLOAT_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")

NAMESPACE_SCOPE = "*"


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def normalize_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields that decide the answer, with defaults filled and nulls dropped."""
    doc = {k: v for k, v in body.items() if k not in IGNORED_FIELDS and v is not None}
    if "max_completion_tokens" in doc:
        # The two spellings of the same cap.
        doc["max_tokens"] = doc.pop("max_completion_tokens")
    for k, default in _DEFAULTS.items():
        doc.setdefault(k, default)
    for k in _FLOAT_FIELDS:
        v = doc.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            doc[k] = float(v)
    return _drop_nulls(doc)


def canonical_json(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def digest(data: bytes, size: int = 16) -> str:
    return hashlib.blake2b(data, digest_size=size).hexdigest()


def scope_value(policy: CachePolicy, tenant: str, arm: str = "") -> str:
    """The key's and the semantic partition's scope: the tenant (or every tenant), and under an
    experiment its arm (`experiment/arm`), so an arm is only ever served the answers its backends gave."""
    scope = tenant if policy.scope is CacheScope.tenant else NAMESPACE_SCOPE
    return f"{scope}\x00{arm}" if arm else scope


def exact_key(endpoint: str, route: str, scope: str, normalized: Mapping[str, Any]) -> str:
    return digest(canonical_json({"endpoint": endpoint, "route": route, "scope": scope, "request": normalized}))


def policy_settings_hash(policy: CachePolicy) -> str:
    """Changes whenever any setting of the policy changes (or the entry format does)."""
    doc = {"format": CACHE_FORMAT_VERSION, "policy": policy.model_dump(mode="json", by_alias=True)}
    return digest(canonical_json(doc), 6)


# --------------------------------------------------------------------------- semantic split


def text_of(content: Any) -> str | None:
    """A message's text; None when it holds anything but text (images, audio)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                return None
            parts.append(p["text"])
        return "\n".join(parts)
    return None


@dataclass(frozen=True, slots=True)
class SemanticSplit:
    text: str  # what is embedded and checked
    partition: str  # digest of everything else, which must match exactly


def semantic_split(
    endpoint: str, route: str, scope: str, normalized: Mapping[str, Any], mode: str
) -> SemanticSplit | None:
    """None when the request has no question to embed (not chat, or the last turn is not user text)."""
    if endpoint == "chat":
        messages: Any = normalized.get("messages")
        turns_key = "messages"
    else:
        # An inbound API's turns, in chat's shape (Anthropic's messages are; a Responses API `input` is made so).
        adapter = inbound.adapter_for(endpoint)
        if adapter is None:
            return None
        messages = adapter.conversation(normalized)
        turns_key = adapter.turns_field
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None  # a tool result or an assistant prefill: not a question
    if mode == "allUserMessages":
        texts = []
        context = []
        for m in messages:
            role = m.get("role") if isinstance(m, dict) else None
            if role == "user":
                t = text_of(m.get("content"))
                if t is None:
                    return None
                texts.append(t)
            elif role == "assistant" and not m.get("tool_calls") and not m.get("function_call"):
                # Plain assistant turns follow from the user turns; they are not compared.
                continue
            else:
                context.append(m)
        text = "\n".join(texts)
    else:
        t = text_of(last.get("content"))
        if t is None:
            return None
        text = t
        # Earlier turns must match exactly: a follow-up question means something
        # different in a different conversation.
        context = messages[:-1]
    if not text.strip():
        return None
    rest = {k: v for k, v in normalized.items() if k != turns_key}
    part = {
        "endpoint": endpoint,
        "route": route,
        "scope": scope,
        "mode": mode,
        "context": context,
        "last": {k: v for k, v in last.items() if k not in ("content",)},
        "request": rest,
    }
    return SemanticSplit(text, digest(canonical_json(part)))


# --------------------------------------------------------------------------- Redis keys


def policy_prefix(namespace: str, policy: str) -> str:
    return f"kt:cache:{{{namespace}}}:{policy}:"


def epoch_key(namespace: str, policy: str) -> str:
    return policy_prefix(namespace, policy) + "epoch"


def generation(settings_hash: str, epoch: int) -> str:
    return f"{settings_hash}e{epoch}"


def entry_key(namespace: str, policy: str, gen: str, h: str) -> str:
    return f"{policy_prefix(namespace, policy)}{gen}:e:{h}"


def log_key(namespace: str, policy: str, gen: str) -> str:
    return f"{policy_prefix(namespace, policy)}{gen}:log"


def question_key(namespace: str, policy: str, gen: str, h: str) -> str:
    """The question text a semantic entry (`h`) answers: what a rerank or judge verifier compares."""
    return f"{policy_prefix(namespace, policy)}{gen}:q:{h}"


def verdict_key(namespace: str, policy: str, gen: str, pair: str) -> str:
    """A verifier's score for one pair of questions (`pair`: a hash of the verifier and both texts)."""
    return f"{policy_prefix(namespace, policy)}{gen}:v:{pair}"
