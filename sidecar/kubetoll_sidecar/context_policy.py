"""Context policies: what a chat prompt over its route's `context.maxPromptTokens` becomes.

The pipeline (stage 3, once the route is known and before the estimate admission uses)
calls `ContextPolicies.apply`; the trimming itself is pure functions over the message
list and each message's token count, so it is testable alone:

* `reject`: `DoesNotFit`, which the pipeline answers with the 400 `context_length_exceeded`.
* `dropOldest` (`drop_oldest`): the oldest turns go first, never the system messages
  (with `keepSystem`) and never the last `keepLastTurns` messages; an assistant message
  with tool calls and the tool results after it go together (a tool result without its
  call is refused by the providers). What must be kept and still does not fit: `DoesNotFit`.
* `summarize` (`summary_plan`, `with_summary`): every turn before the kept tail (but the
  system messages, with `keepSystem`) is replaced by one system message holding a summary
  the route's summarizer backend wrote. The summary is kept by the digest of the messages
  it replaces (`prefix_digest`) in this sidecar's LRU and in Redis, so each prefix is
  summarized once across the namespace's sidecars. A summarizer that fails (or a Redis
  that is away) never fails the request: the oldest turns are dropped instead.

docs/routing.md, "Context policies", says what applies where.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from kubetoll_core.parts import ContextPolicy
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import Backend
from kubetoll_core.usage import Usage

from . import tracing
from .cache.embeddings import call_through_translator
from .cache.lru import ByteLRU
from .cache.redis_guard import RedisGuard, RedisUnavailable

log = logging.getLogger("kubetoll.context")

SYSTEM_ROLES = frozenset({"system", "developer"})
SUMMARY_PREFIX = "Summary of the earlier conversation: "
# Bump when the prompt below changes: the cached summaries of the old prompt are then not reused.
PROMPT_VERSION = 1
SUMMARY_PROMPT = (
    "You condense conversations. Summarize the conversation below for the assistant that will continue it: "
    "keep the facts, names, numbers, decisions, the user's goals and preferences, what was tried and what is "
    "still open. Write plain prose, no preamble, no more than a few paragraphs."
)
# The summary's own bound: a quarter of the policy's limit, at most this many tokens.
SUMMARY_MAX_TOKENS = 1024
# The transcript the summarizer reads is cut from its start past this many characters (a prefix too long
# for the summarizer's window would only fail there).
MAX_TRANSCRIPT_CHARS = 400_000
SUMMARY_TTL_SECONDS = 86_400
LOCAL_SUMMARY_BYTES = 4 * 1024 * 1024


class DoesNotFit(Exception):
    """What must be kept is over the limit (or the policy is reject): the 400 context_length_exceeded."""

    def __init__(self, estimate: int, limit: int, kept: int | None = None) -> None:
        self.estimate, self.limit, self.kept = estimate, limit, kept
        if kept is None:
            msg = (
                f"the prompt is about {estimate} tokens; this route's context policy allows {limit} "
                "(maxPromptTokens). Shorten the conversation."
            )
        else:
            msg = (
                f"the prompt is about {estimate} tokens; this route's context policy allows {limit} "
                f"(maxPromptTokens), and what it always keeps (system messages, the last turns) is already "
                f"about {kept}. Shorten the conversation."
            )
        super().__init__(msg)


# --------------------------------------------------------------------------- pure trimming


def units(messages: Sequence[dict[str, Any]]) -> list[list[int]]:
    """The message indices in groups that are kept or dropped together: an assistant message with
    tool calls (or a legacy function call) and the tool (function) results right after it; every
    other message alone."""
    out: list[list[int]] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        group = [i]
        i += 1
        if m.get("role") == "assistant" and (m.get("tool_calls") or m.get("function_call")):
            while i < len(messages) and messages[i].get("role") in ("tool", "function"):
                group.append(i)
                i += 1
        out.append(group)
    return out


def tail_start(messages: Sequence[dict[str, Any]], keep_last: int) -> int:
    """Where the kept tail starts: the last `keep_last` messages, moved back to the start of the group
    they begin in (a tool result is never kept without its call)."""
    start = max(len(messages) - keep_last, 0)
    for group in units(messages):
        if group[0] <= start <= group[-1]:
            return group[0]
    return start


def _protected(messages: Sequence[dict[str, Any]], i: int, tail: int, keep_system: bool) -> bool:
    return i >= tail or (keep_system and messages[i].get("role") in SYSTEM_ROLES)


def drop_oldest(
    messages: Sequence[dict[str, Any]],
    costs: Sequence[int],
    base: int,
    limit: int,
    keep_system: bool,
    keep_last: int,
) -> list[dict[str, Any]]:
    """The messages with the oldest droppable groups removed until `base + sum(costs)` is at most `limit`.

    `costs[i]` is message i's share of the estimate and `base` the rest (reply priming, the tools), so
    the estimate of any subset is `base` plus its costs. Raises DoesNotFit when the messages that must
    be kept are over the limit by themselves.
    """
    total = base + sum(costs)
    if total <= limit:
        return list(messages)
    tail = tail_start(messages, keep_last)
    dropped: set[int] = set()
    for group in units(messages):
        if total <= limit:
            break
        if any(_protected(messages, i, tail, keep_system) for i in group):
            continue
        dropped.update(group)
        total -= sum(costs[i] for i in group)
    if total > limit:
        raise DoesNotFit(base + sum(costs), limit, total)
    return [m for i, m in enumerate(messages) if i not in dropped]


def summary_plan(messages: Sequence[dict[str, Any]], keep_system: bool, keep_last: int) -> list[int]:
    """The indices a summary replaces: every message before the kept tail but the system messages
    (with `keep_system`). Empty: there is nothing to summarize."""
    tail = tail_start(messages, keep_last)
    return [i for i in range(tail) if not _protected(messages, i, tail, keep_system)]


def with_summary(messages: Sequence[dict[str, Any]], replaced: Sequence[int], summary: str) -> list[dict[str, Any]]:
    """The messages with `replaced` removed and one system message holding `summary` where the first was."""
    gone = set(replaced)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if i == replaced[0]:
            out.append(summary_message(summary))
        if i not in gone:
            out.append(m)
    return out


def summary_message(summary: str) -> dict[str, Any]:
    return {"role": "system", "content": SUMMARY_PREFIX + summary.strip()}


def prefix_digest(replaced: Sequence[dict[str, Any]], summarizer: str, model: str) -> str:
    """sha256 hex of the canonical JSON of the replaced messages, the summarizer (backend and model)
    and the prompt version: the summary's key, the same on every sidecar."""
    canonical = orjson.dumps(
        {"v": PROMPT_VERSION, "summarizer": summarizer, "model": model, "messages": list(replaced)},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, dict) and p.get("type") in ("image_url", "input_image"):
                parts.append("[image]")
        return " ".join(parts)
    return "" if content is None else orjson.dumps(content).decode()


def transcript(replaced: Sequence[dict[str, Any]]) -> str:
    """The replaced turns as the text the summarizer reads, one `role: text` block per message (tool calls
    as their JSON), cut from its start past MAX_TRANSCRIPT_CHARS."""
    lines = []
    for m in replaced:
        role = str(m.get("role") or "unknown")
        text = _text(m.get("content"))
        calls = m.get("tool_calls") or m.get("function_call")
        if calls:
            text = f"{text}\n[tool calls: {orjson.dumps(calls).decode()}]".strip()
        lines.append(f"{role}: {text}")
    out = "\n\n".join(lines)
    if len(out) > MAX_TRANSCRIPT_CHARS:
        out = "[the start of the conversation is left out]\n" + out[-MAX_TRANSCRIPT_CHARS:]
    return out


def summarizer_body(model: str, text: str, max_tokens: int) -> dict[str, Any]:
    """The chat request sent to the summarizer: the fixed prompt, the transcript, a bounded answer."""
    return {
        "model": model,
        "messages": [{"role": "system", "content": SUMMARY_PROMPT}, {"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }


def summary_max_tokens(policy: ContextPolicy) -> int:
    return max(min(SUMMARY_MAX_TOKENS, policy.max_prompt_tokens // 4), 16)


def within_windows(backends: Sequence[Backend], prompt: int, output: int) -> list[str]:
    """The backends whose declared context window holds `prompt` plus `output` tokens (no window declared:
    it holds anything), in order."""
    return [b.name for b in backends if b.limits.context_window is None or prompt + output <= b.limits.context_window]


def header(action: str, saved: int) -> str:
    """The x-kubetoll-context value: `dropped;saved=N`, `summarized;saved=N`, or after a failed summary
    `dropped;saved=N;summary=failed`."""
    if action == "summary_failed":
        return f"dropped;saved={saved};summary=failed"
    return f"{action};saved={saved}"


# --------------------------------------------------------------------------- summaries


class SummaryFailed(Exception):
    """The summarizer did not give a summary (its error, its timeout, an answer without text)."""


@dataclass(frozen=True, slots=True)
class Summary:
    text: str
    usage: Usage | None  # None: it came from a cache (nothing was spent)
    cost_usd: float
    backend: str


class SummaryStore:
    """Summaries by prefix digest: this sidecar's LRU, then Redis (shared by the namespace's sidecars).

    Redis calls are bounded (`RedisGuard`): a Redis that is away costs one timeout and then a cool-down,
    and the summary is made and kept here only.
    """

    def __init__(
        self,
        namespace: str,
        client: Any | None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        ttl: float = SUMMARY_TTL_SECONDS,
        local_bytes: int = LOCAL_SUMMARY_BYTES,
    ) -> None:
        self.keys = RedisKeys(namespace)
        self.guard = RedisGuard(client, timeout=0.05, cooldown=5.0, monotonic=monotonic)
        self.local = ByteLRU(local_bytes)
        self.ttl = ttl
        self._wall = wall

    async def get(self, digest: str) -> str | None:
        now = self._wall()
        raw = self.local.get(digest, now)
        if raw is None and self.guard.available:
            key = self.keys.context_summary(digest)
            try:
                got = await self.guard.call("context_summary_get", lambda c: c.get(key))
            except RedisUnavailable:
                got = None
            if got is not None:
                raw = got.encode() if isinstance(got, str) else bytes(got)
                self.local.put(digest, raw, now + self.ttl)
        return None if raw is None else raw.decode("utf-8", "replace")

    async def put(self, digest: str, text: str) -> None:
        raw = text.encode()
        self.local.put(digest, raw, self._wall() + self.ttl)
        if self.guard.available:
            key, ttl = self.keys.context_summary(digest), int(self.ttl)
            try:
                await self.guard.call("context_summary_set", lambda c: c.set(key, raw, ex=ttl), timeout=0.2)
            except RedisUnavailable as exc:
                log.info("context summary kept in this sidecar only: %s", exc)


async def summarize(runtime: Any, credentials: Any, replaced: Sequence[dict[str, Any]], max_tokens: int) -> Summary:
    """One call to the summarizer backend (`runtime`, a forwarder.BackendRuntime) through its provider's
    translator. Raises SummaryFailed."""
    from . import tokens
    from .forwarder import translator_for
    from .providers.base import Endpoint

    backend = runtime.config
    body = summarizer_body(backend.model, transcript(replaced), max_tokens)
    timeout = min(backend.timeouts.total, 120.0)
    data, usage = await call_through_translator(
        runtime,
        credentials,
        translator_for(backend.provider),
        Endpoint.chat,
        body,
        timeout,
        SummaryFailed,
        tracing.CONTEXT_SUMMARY,
    )
    choices = data.get("choices") if isinstance(data, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise SummaryFailed(f"{backend.name}: the answer has no text")
    if not usage.reported:
        usage = Usage(
            prompt_tokens=tokens.count_chat(body["messages"], backend.model),
            completion_tokens=tokens.count_prompt(text, backend.model),
            reported=False,
        )
    return Summary(text.strip(), usage, float(runtime.price.cost(usage)), backend.name)


@dataclass(slots=True)
class Applied:
    """What a policy did to one request."""

    messages: list[dict[str, Any]]
    action: str  # dropped, summarized, summary_failed
    before: int
    after: int
    summary: Summary | None = None  # summarized: the summary (its spend, when it was made for this request)
    cached: bool = False
    failure: str = ""  # summary_failed: why

    @property
    def saved(self) -> int:
        return max(self.before - self.after, 0)


class ContextPolicies:
    """Applies a route's context policy to a chat request's messages."""

    def __init__(self, store: SummaryStore, credentials: Any) -> None:
        self.store = store
        self.credentials = credentials
        # One summarizer call per digest in flight in this sidecar: concurrent turns of one conversation
        # wait for it rather than pay for the same summary twice.
        self._pending: dict[str, asyncio.Future[Summary]] = {}

    async def apply(
        self,
        policy: ContextPolicy,
        messages: list[dict[str, Any]],
        count: Callable[[list[dict[str, Any]]], int],
        estimate: int,
        backends: dict[str, Any],
    ) -> Applied | None:
        """None when the prompt fits. `count(messages)` is the route's estimate of a message list
        (tiktoken, the tools included); `backends` maps names to forwarder.BackendRuntime."""
        limit = policy.max_prompt_tokens
        if estimate <= limit:
            return None
        if policy.overflow.value == "reject":
            raise DoesNotFit(estimate, limit)
        empty = count([])
        costs = [count([m]) - empty for m in messages]
        base = estimate - sum(costs)
        if policy.overflow.value == "summarize":
            replaced = summary_plan(messages, policy.keep_system, policy.keep_last_turns)
            gone = set(replaced)
            kept_cost = base + sum(c for i, c in enumerate(costs) if i not in gone)
            if kept_cost > limit:  # not even without the turns a summary would replace: no call is worth it
                raise DoesNotFit(estimate, limit, kept_cost)
            runtime = backends.get(policy.summarizer or "")
            failure = "the summarizer backend is not in this config" if runtime is None else ""
            if replaced and runtime is not None:
                try:
                    summary, cached = await self._summary(runtime, [messages[i] for i in replaced], policy)
                except SummaryFailed as exc:
                    failure = str(exc)
                else:
                    trimmed = with_summary(messages, replaced, summary.text)
                    after = count(trimmed)
                    if after <= limit:
                        return Applied(trimmed, "summarized", estimate, after, summary, cached)
                    failure = f"the summary left the prompt at {after} tokens"
            elif not replaced:
                failure = "nothing before the kept turns to summarize"
            log.info("context policy: summary not used (%s); dropping the oldest turns", failure)
            kept = drop_oldest(messages, costs, base, limit, policy.keep_system, policy.keep_last_turns)
            return Applied(kept, "summary_failed", estimate, count(kept), failure=failure)
        kept = drop_oldest(messages, costs, base, limit, policy.keep_system, policy.keep_last_turns)
        return Applied(kept, "dropped", estimate, count(kept))

    async def _summary(
        self, runtime: Any, replaced: list[dict[str, Any]], policy: ContextPolicy
    ) -> tuple[Summary, bool]:
        backend = runtime.config
        digest = prefix_digest(replaced, backend.name, backend.model)
        text = await self.store.get(digest)
        if text is not None:
            return Summary(text, None, 0.0, backend.name), True
        pending = self._pending.get(digest)
        if pending is not None:
            shared = await asyncio.shield(pending)
            return Summary(shared.text, None, 0.0, backend.name), True
        fut: asyncio.Future[Summary] = asyncio.get_running_loop().create_future()
        self._pending[digest] = fut
        try:
            summary = await summarize(runtime, self.credentials, replaced, summary_max_tokens(policy))
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, SummaryFailed) else SummaryFailed("the summary was abandoned"))
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._pending.pop(digest, None)
        fut.set_result(summary)
        await self.store.put(digest, summary.text)
        return summary, False
