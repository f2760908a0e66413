"""Anthropic's Messages API, passed through to an Anthropic backend as it is (inbound/messages.py).

The client's `POST /v1/messages` body goes to the backend's `/v1/messages` with
the backend's model, its `x-api-key` and `anthropic-version` (the client's own
`x-api-key`, `anthropic-version` and `Authorization` headers are never
forwarded: every header is built here). The message and its event stream come
back unchanged, thinking blocks, stop sequences and cache usage included.

What the sidecar reads of them is read by the chat translator's own code
(`AnthropicTranslator`): the usage (input, cache reads, cache writes, output)
from the message, or from the stream's `message_start` and `message_delta`;
`message_stop` as the stream's end; an `error` event, classified by its type.
The text, tool-input and thinking deltas are kept for billing a stream cut
before its usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from kubetoll_core.enums import FailureClass
from kubetoll_core.router_config import Backend

from .anthropic import ANTHROPIC_VERSION, AnthropicStreamTranslator, AnthropicTranslator
from .base import Endpoint, UpstreamError, UpstreamRequest, Usage

__all__ = ["AnthropicMessagesTranslator", "MessagesStream", "messages_url"]


def messages_url(backend: Backend) -> str:
    """The Messages API of a backend whose endpoint may or may not end in `/v1` (as AnthropicTranslator reads it)."""
    base = backend.endpoint.rstrip("/")
    return f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"


class MessagesStream:
    """The upstream's message events, passed on as they are.

    Each event is also fed to an `AnthropicStreamTranslator`, whose chat chunks are dropped:
    it keeps the usage, the end of the stream and an in-stream error exactly as it does for
    a chat request, so both paths bill alike.
    """

    __slots__ = ("usage", "done", "text", "text_chars", "_reader", "_counted", "_error")

    def __init__(self) -> None:
        self._reader = AnthropicStreamTranslator("", include_usage=False)
        self.usage: Usage | None = None
        self.done = False
        self.text: list[str] = self._reader.text  # text and tool input (the reader's), thinking (added here)
        self.text_chars = 0
        self._counted = 0  # pieces of `text` already in `text_chars`
        self._error: UpstreamError | None = None

    def feed(self, event: str | None, data: bytes) -> list[dict[str, Any]]:
        if self.done or not data:
            return []
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            self._error = UpstreamError(502, FailureClass.server_error, "anthropic sent a malformed stream event")
            return []
        self._reader.feed(event, data)
        self.usage, self.done = self._reader.usage, self._reader.done
        if (event or payload.get("type")) == "error":
            return []  # classified by the reader: the relay ends the stream with the API's error event
        delta = payload.get("delta")
        if isinstance(delta, dict) and delta.get("type") == "thinking_delta":
            thinking = delta.get("thinking")
            if isinstance(thinking, str) and thinking:
                self.text.append(thinking)  # thinking is output the provider bills
        for piece in self.text[self._counted :]:
            self.text_chars += len(piece)
        self._counted = len(self.text)
        return [payload]

    def error(self) -> UpstreamError | None:
        return self._error or self._reader.error()


class AnthropicMessagesTranslator:
    """`POST /v1/messages` to an Anthropic backend, untranslated."""

    __slots__ = ()

    capabilities = AnthropicTranslator.capabilities

    def build_request(
        self, backend: Backend, endpoint: str, body: dict[str, Any], api_key: str | None, stream: bool
    ) -> UpstreamRequest:
        headers = {"content-type": "application/json"}
        if api_key:
            headers["x-api-key"] = api_key
        headers["anthropic-version"] = ANTHROPIC_VERSION
        headers.update(backend.headers)  # an `anthropic-beta` the backend's config sets
        return UpstreamRequest("POST", messages_url(backend), headers, orjson.dumps(body))

    def parse_response(self, endpoint: str, body: bytes, model_alias: str) -> tuple[dict[str, Any], Usage]:
        message = orjson.loads(body)
        if not isinstance(message, dict) or message.get("type") != "message":
            raise ValueError("anthropic returned a response that is not a message")
        # The chat translator reads the usage (and refuses what is not a message) the way it does for chat.
        _, usage = AnthropicTranslator().parse_response(Endpoint.chat, body, model_alias)
        if not isinstance(message.get("usage"), dict):
            usage = Usage(reported=False)
        return message, usage

    def stream_translator(self, model_alias: str, include_usage: bool) -> MessagesStream:
        return MessagesStream()

    def classify_error(self, status: int, headers: Mapping[str, str] | None, body: bytes) -> UpstreamError:
        return AnthropicTranslator().classify_error(status, headers, body)
