"""What every provider translator offers the forwarder.

A translator knows one provider's wire format and nothing else: how to turn an
OpenAI-shaped request into that provider's HTTP request, how to turn its response
(or its SSE stream) back into OpenAI's shape, how to read its usage, and how to
classify its errors into the route's failure classes. It does no I/O: the
forwarder owns connections, timeouts and fallback (Envoy AI Gateway splits it the
same way: one translator per provider).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from kubetoll_core.enums import FailureClass
from kubetoll_core.router_config import Backend
from kubetoll_core.usage import Usage

__all__ = [
    "ALL_CAPABILITIES",
    "Capability",
    "Endpoint",
    "StreamTranslator",
    "Translator",
    "UnsupportedRequest",
    "UpstreamError",
    "UpstreamRequest",
    "Usage",
]


class Endpoint(StrEnum):
    """The API the client called."""

    chat = "chat"
    completions = "completions"
    embeddings = "embeddings"


class Capability(StrEnum):
    """Something a request may need of a backend. Each translator declares the ones it serves
    (`Translator.capabilities`), so a request no backend of its route can serve is refused with
    a 400 before anything is reserved or sent, instead of failing on every backend in turn."""

    chat = "chat"  # POST /v1/chat/completions
    completions = "completions"  # POST /v1/completions (legacy)
    embeddings = "embeddings"  # POST /v1/embeddings
    multiple_choices = "multiple_choices"  # n > 1
    legacy_functions = "legacy_functions"  # `functions`, `function_call`, messages with the `function` role
    audio_output = "audio_output"  # `audio`, `modalities: ["audio"]`


ALL_CAPABILITIES = frozenset(Capability)


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class UpstreamError:
    """A failed attempt, classified. `failure` None means: not a fallback class, pass it to the client."""

    status: int
    failure: FailureClass | None
    message: str
    retry_after: float | None = None
    # The provider's error translated to OpenAI's error object, for passing through.
    openai_error: dict[str, Any] = field(default_factory=dict)


class UnsupportedRequest(Exception):
    """This provider cannot serve this request: the endpoint (embeddings on Anthropic) or a parameter (n > 1 on \
Anthropic). The forwarder skips the backend and says why."""


class StreamTranslator(Protocol):
    """Turns the upstream's SSE events into OpenAI chat.completion.chunk dicts.

    `feed` takes one upstream SSE event (its `event:` name, may be None, and its
    `data:` payload as bytes) and returns the OpenAI chunks to send, in order:
    each a dict, or bytes already holding the chunk's JSON (pass-through). It
    keeps the usage it has seen. `done` is True once the upstream said the stream
    is complete (OpenAI `[DONE]`, Anthropic `message_stop`).

    `text` holds the pieces of generated text emitted so far, in order: content
    deltas and tool-call argument deltas (the OpenAI pass-through also keeps the
    function name of a tool-call delta, as it always has). When a stream is cut
    before the upstream reported usage, `"".join(text)` is what gets counted
    (with tiktoken) and billed. `text_chars` is the length of that text.
    """

    usage: Usage | None
    done: bool
    text: list[str]  # content and tool-call argument pieces emitted so far, in order
    text_chars: int  # characters of content and tool arguments emitted so far: len("".join(text))

    def feed(self, event: str | None, data: bytes) -> list[dict[str, Any] | bytes]: ...

    def error(self) -> UpstreamError | None:
        """An error the upstream sent inside the stream, if any."""
        ...


class Translator(Protocol):
    # What this provider can serve. `build_request` still raises UnsupportedRequest for what
    # no capability names (an input part or tool kind the provider lacks).
    capabilities: frozenset[Capability]

    def build_request(
        self, backend: Backend, endpoint: str, body: dict[str, Any], api_key: str | None, stream: bool
    ) -> UpstreamRequest:
        """`body` is the client's OpenAI request with `model` already set to the backend's model.

        Raises UnsupportedRequest when the provider cannot serve it.
        """
        ...

    def parse_response(self, endpoint: str, body: bytes, model_alias: str) -> tuple[dict[str, Any], Usage]:
        """A successful non-streaming response, as the OpenAI response body and its usage.

        `model_alias` is what the client asked for; the OpenAI body's `model` stays
        the upstream's real model id (as OpenAI itself does).
        """
        ...

    def stream_translator(self, model_alias: str, include_usage: bool) -> StreamTranslator: ...

    def classify_error(self, status: int, headers: Mapping[str, str] | None, body: bytes) -> UpstreamError:
        """An unsuccessful response, classified. `headers` are the response's (case-insensitive or not)."""
        ...
