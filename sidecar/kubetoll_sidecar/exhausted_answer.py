"""The answer a spent limit with `onExhausted: respond` gives: the budget's `exhaustedResponse`, as a normal completion.

A support bot whose tenant ran out of budget mid-conversation should not show
its user a raw 429: the platform's message ("I've reached my limit for this
conversation; an agent will follow up") is served as the assistant's answer,
with `finish_reason: stop` and zero usage, streamed or not, in the format of the
API called (chat, completions, the Responses API, Anthropic's Messages). The
response says what happened in `x-kubetoll-exhausted` (the limit's label) and
costs nothing. Embeddings have no message to answer with: a 429 instead.

The bodies are built as a chat completion and, for an inbound API, converted by
its adapter, then rendered by the same replay code as a cache hit (`cache/replay.py`),
so a stream has exactly the framing an upstream answer would.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from . import inbound
from .cache.replay import CacheHit, Entry
from .providers.base import Endpoint, Usage

EXHAUSTED_HEADER = "x-kubetoll-exhausted"


def chat_body(message: str, model: str, now: float) -> dict[str, Any]:
    return {
        "id": "chatcmpl-kt" + secrets.token_hex(12),
        "object": "chat.completion",
        "created": int(now),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": message, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def answer_body(endpoint: Endpoint, message: str, model: str, request: dict[str, Any], now: float) -> dict[str, Any]:
    """The whole answer in the endpoint's own format (not for embeddings)."""
    if endpoint == Endpoint.completions:
        return {
            "id": "cmpl-kt" + secrets.token_hex(12),
            "object": "text_completion",
            "created": int(now),
            "model": model,
            "choices": [{"index": 0, "text": message, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
    chat = chat_body(message, model, now)
    adapter = inbound.adapter_for(endpoint)
    if adapter is not None:
        return adapter.from_chat(chat, Usage(0, 0), request)
    return chat


def render(
    endpoint: Endpoint, message: str, model: str, request: dict[str, Any], stream: bool, include_usage: bool
) -> bytes:
    """The response body: JSON, or the whole event stream when the request streams."""
    now = time.time()
    entry = Entry(str(endpoint), answer_body(endpoint, message, model, request, now), 0, 0, 0, 0.0, now)
    replay = CacheHit("exhausted", "", entry)
    return replay.sse_bytes(include_usage) if stream else replay.json_bytes()
