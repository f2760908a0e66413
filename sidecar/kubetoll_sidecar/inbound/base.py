"""What an inbound API offers the pipeline, and the translator that carries it over chat completions.

An *inbound API* is an API the sidecar serves besides OpenAI's chat (and legacy)
completions and embeddings: OpenAI's Responses API (`responses.py`) and
Anthropic's Messages API (`messages.py`). The pipeline does not fork for them.
A request keeps the client's API all the way: the pipeline carries its body as
sent, and each backend of the chain gets it one of two ways, decided per backend
in the forwarder (`translator_for`, the one place an adapter is applied):

* **natively**, when the backend's provider speaks that API (`InboundAdapter.native`:
  OpenAI for the Responses API, Anthropic for the Messages API): a translator of
  that provider's own (`providers/openai_responses.py`, `providers/anthropic_messages.py`)
  passes the body through with the backend's model and credential, and reads the
  provider's usage from its answer and its event stream;
* **through chat**, otherwise: `ViaChat` wraps the provider's chat translator. The
  body becomes a chat request (`to_chat`, strict: what chat cannot carry is an
  `UnsupportedRequest`, so the backend is skipped as for any request it cannot
  serve), and the chat answer, or its stream of chat chunks, becomes the API's
  answer again (`from_chat`, `stream_from_chat`), with the usage the provider
  reported for the chat call.

Either way the answer reaching the pipeline is in the client's API, with the
provider's usage beside it, so estimate, rate limits, cache, admission, fallback,
settlement, the ledger and metrics run exactly as for chat. What the pipeline
reads of the request (the messages and tools it estimates, the last user text a
route rule matches, the `user` field tenancy may read) comes from the request's
chat equivalent, built leniently at parse time (`InboundRequest.chat`).

The rest of an adapter is the API's outside: its error format (`error_response`),
how its events go on the wire (`framing`: named SSE events, no `[DONE]`), and
what the cache needs to keep its answers (`is_complete`, `refreshed`, `replay`,
`assembler`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import orjson
from aiohttp import web

from kubetoll_core.enums import Provider
from kubetoll_core.router_config import Backend

from ..errors import ApiError
from ..providers.base import (
    Capability,
    Endpoint,
    StreamTranslator,
    Translator,
    UpstreamError,
    UpstreamRequest,
    Usage,
)
from ..sse import StreamFraming

__all__ = [
    "Assembler",
    "FromChat",
    "InboundAdapter",
    "InboundRequest",
    "ViaChat",
    "chat_tool_calls",
    "first_choice",
    "int_field",
    "named_event",
    "obj",
    "translator_for",
]


@dataclass(slots=True)
class InboundRequest:
    """What stage 1 makes of an inbound API's request, besides the body itself."""

    # The chat-completions equivalent, built leniently (what chat cannot carry is left out): its
    # `messages` and `tools` are what the prompt estimate counts and route rules read, its `user`
    # what tenancy's `useUserField` reads.
    chat: dict[str, Any]
    max_tokens: int | None  # the API's output cap (`max_output_tokens`, `max_tokens`)


class Assembler(Protocol):
    """Rebuilds a streamed answer as the API's response body, for the cache."""

    def feed(self, event: dict[str, Any] | bytes) -> None: ...

    def body(self) -> dict[str, Any] | None:
        """The whole answer, or None unless the stream ended complete."""
        ...


class InboundAdapter(Protocol):
    endpoint: Endpoint
    # The request field holding the output cap (the route's `maxOutputTokens` is written there).
    max_tokens_field: str
    # Providers whose backends speak this API natively, and the translator that passes it through.
    native: Mapping[Provider, type[Any]]
    turns_field: str  # the request field holding the conversation (the semantic cache's question is in it)

    # ----- stage 1
    def parse(self, body: dict[str, Any]) -> InboundRequest:
        """Checks what the API itself would refuse (ApiError 400, rendered by `error_response`)."""
        ...

    def check_route(self, body: dict[str, Any], route: str, backends: Sequence[Backend]) -> None:
        """The 400 for a request no backend of the chain can serve (decided before anything is reserved)."""
        ...

    # ----- through chat (ViaChat)
    def to_chat(self, body: dict[str, Any], provider: Provider) -> dict[str, Any]:
        """The chat request for a backend of `provider`. Raises UnsupportedRequest for what chat cannot carry."""
        ...

    def from_chat(self, chat: dict[str, Any], usage: Usage, request: dict[str, Any]) -> dict[str, Any]: ...

    def stream_from_chat(self, inner: Any, request: dict[str, Any]) -> Any:
        """A StreamTranslator turning `inner`'s chat chunks into this API's events."""
        ...

    # ----- the answer's outside
    def framing(self) -> StreamFraming:
        """A fresh framing for one stream."""
        ...

    def error_response(self, err: ApiError, headers: dict[str, str]) -> web.Response: ...

    def output_texts(self, body: Any) -> list[str]:
        """The generated text of an answer in this API's shape ([] for another shape): what is counted
        when the provider reported no usage."""
        ...

    # ----- the cache (cache/keys.py, cache/stage.py, cache/replay.py)
    def uncacheable_reason(self, body: Mapping[str, Any]) -> str: ...

    def conversation(self, body: Mapping[str, Any]) -> list[Any] | None:
        """The request's turns in chat's shape (role, content), for the semantic cache's question."""
        ...

    def is_complete(self, body: Any) -> bool: ...

    def refreshed(self, body: dict[str, Any], now: float) -> dict[str, Any]:
        """A stored answer with a new id (and time), as a cache hit serves it."""
        ...

    def replay(self, body: dict[str, Any]) -> bytes:
        """A whole answer as this API's event stream (a cache hit on a streaming request)."""
        ...

    def assembler(self) -> Assembler: ...


def named_event(payload: dict[str, Any]) -> bytes:
    """One SSE event named after its payload's `type`, as both inbound APIs frame their streams."""
    name = payload.get("type")
    head = b"event: " + str(name).encode() + b"\n" if isinstance(name, str) else b""
    return head + b"data: " + orjson.dumps(payload) + b"\n\n"


def translator_for(adapter: InboundAdapter, provider: Provider, chat_translator: type[Any]) -> Translator:
    """The translator a backend of `provider` gets for this API: its native one, else its chat one behind `ViaChat`."""
    native = adapter.native.get(provider)
    if native is not None:
        translator: Translator = native()
        return translator
    return ViaChat(adapter, chat_translator(), provider)


class ViaChat:
    """A provider's chat translator serving an inbound API: the request goes out as chat, and the
    answer (or its stream) comes back in the API's shape with the provider's usage for the call."""

    __slots__ = ("adapter", "inner", "provider", "capabilities", "_request")

    def __init__(self, adapter: InboundAdapter, inner: Translator, provider: Provider) -> None:
        self.adapter = adapter
        self.inner = inner
        self.provider = provider
        # An inbound API's request asks for one answer: the inner translator's `n` support is moot.
        self.capabilities: frozenset[Capability] = inner.capabilities
        self._request: dict[str, Any] = {}

    def build_request(
        self, backend: Backend, endpoint: str, body: dict[str, Any], api_key: str | None, stream: bool
    ) -> UpstreamRequest:
        chat = self.adapter.to_chat(body, self.provider)
        self._request = body
        return self.inner.build_request(backend, Endpoint.chat, chat, api_key, stream)

    def parse_response(self, endpoint: str, body: bytes, model_alias: str) -> tuple[dict[str, Any], Usage]:
        chat, usage = self.inner.parse_response(Endpoint.chat, body, model_alias)
        return self.adapter.from_chat(chat, usage, self._request), usage

    def stream_translator(self, model_alias: str, include_usage: bool) -> StreamTranslator:
        # The API's last event carries the usage, so the chat stream must always report it.
        inner = self.inner.stream_translator(model_alias, True)
        translator: StreamTranslator = self.adapter.stream_from_chat(inner, self._request)
        return translator

    def classify_error(self, status: int, headers: Mapping[str, str] | None, body: bytes) -> UpstreamError:
        return self.inner.classify_error(status, headers, body)


class FromChat(ABC):
    """Base of the stream translators that turn a chat stream into an inbound API's events.

    Subclasses implement `_chunk` (one chat chunk, as a dict) and `_complete` (the closing events,
    once the chat stream said it is complete). Usage, the text emitted (what a cut stream is billed
    for) and errors are the inner chat translator's.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.usage: Usage | None = None
        self.done = False
        self.text: list[str] = inner.text  # the same list: the inner translator appends to it
        self.text_chars = 0

    def error(self) -> UpstreamError | None:
        err: UpstreamError | None = self.inner.error()
        return err

    def feed(self, event: str | None, data: bytes) -> list[dict[str, Any]]:
        if self.done:
            return []
        out: list[dict[str, Any]] = []
        for c in self.inner.feed(event, data):
            if isinstance(c, (bytes, bytearray, memoryview)):
                c = orjson.loads(c)
            if isinstance(c, dict) and "error" not in c:
                self._chunk(c, out)
        self.usage = self.inner.usage
        self.text_chars = self.inner.text_chars
        if self.inner.done and self.inner.error() is None:
            self._complete(out)
            self.done = True
        return out

    @abstractmethod
    def _chunk(self, chunk: dict[str, Any], out: list[dict[str, Any]]) -> None:
        """Append the API's events for one chat chunk to `out`."""

    @abstractmethod
    def _complete(self, out: list[dict[str, Any]]) -> None:
        """Append the events that end the answer (its last one carries the usage) to `out`."""


def chat_tool_calls(chunk: dict[str, Any]) -> tuple[str, list[dict[str, Any]], str | None]:
    """The first choice of a chat chunk: its content delta, tool-call deltas and finish reason."""
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        calls = delta.get("tool_calls") if isinstance(delta, dict) else None
        return (
            content if isinstance(content, str) else "",
            [c for c in calls or () if isinstance(c, dict)],
            choice.get("finish_reason"),
        )
    return "", [], None


def first_choice(chat: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A chat response's first choice: its message and finish reason."""
    for choice in chat.get("choices") or ():
        if isinstance(choice, dict):
            msg = choice.get("message")
            return (msg if isinstance(msg, dict) else {}), choice.get("finish_reason")
    return {}, None


def int_field(value: Any) -> TypeGuard[int]:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def obj(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}
