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
    "MAX_FAN_OUT",
    "Capability",
    "Endpoint",
    "StreamTranslator",
    "Translator",
    "UnsupportedRequest",
    "UpstreamError",
    "UpstreamRequest",
    "Usage",
    "requested_choices",
    "upstream_calls",
]


class Endpoint(StrEnum):
    """The API the client called."""

    chat = "chat"
    completions = "completions"
    embeddings = "embeddings"
    # Inbound APIs (inbound/): served natively by their own provider's backends, through chat by the others.
    responses = "responses"  # OpenAI's Responses API
    messages = "messages"  # Anthropic's Messages API


class Capability(StrEnum):
    """Something a request may need of a backend. Each translator declares the ones it serves
    (`Translator.capabilities`), so a request no backend of its route can serve is refused with
    a 400 before anything is reserved or sent, instead of failing on every backend in turn."""

    chat = "chat"  # POST /v1/chat/completions
    completions = "completions"  # POST /v1/completions (legacy)
    embeddings = "embeddings"  # POST /v1/embeddings
    multiple_choices = "multiple_choices"  # n > 1, in one upstream call (the provider has `n`)
    # n > 1 as n upstream calls of one choice each, made by the forwarder (up to MAX_FAN_OUT): for
    # providers without `n`. The translator itself still builds one-choice requests only.
    fan_out_choices = "fan_out_choices"
    legacy_functions = "legacy_functions"  # `functions`, `function_call`, messages with the `function` role
    audio_output = "audio_output"  # `audio`, `modalities: ["audio"]`


ALL_CAPABILITIES = frozenset(Capability)

# The most choices served by fanning out (`Capability.fan_out_choices`). Each choice is a whole
# upstream call that bills the prompt again and holds a connection of the backend's pool, so one
# request may not turn into more than this many (OpenAI's own `n` goes to 128, in one call).
MAX_FAN_OUT = 8


def requested_choices(body: Mapping[str, Any]) -> int:
    """The number of choices an OpenAI request asks for (`n`; 1 when absent)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def upstream_calls(capabilities: frozenset[Capability], n: int) -> int | None:
    """How many upstream calls serve `n` choices on a backend with these capabilities: 1 when the
    provider has `n` (or n is 1), n when the forwarder fans out, None when the backend cannot."""
    if n <= 1 or Capability.multiple_choices in capabilities:
        return 1
    if Capability.fan_out_choices in capabilities and n <= MAX_FAN_OUT:
        return n
    return None


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
    """This provider cannot serve this request: the endpoint (embeddings on Anthropic) or a parameter (audio input \
on Anthropic, more than MAX_FAN_OUT choices on a provider without `n`). The forwarder skips the backend and says why."""


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
