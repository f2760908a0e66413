"""OpenAI's Responses API, passed through to an OpenAI backend as it is (inbound/responses.py).

The client's `POST /v1/responses` body goes to `<endpoint>/responses` with the
backend's model and key; the answer and its typed event stream come back
unchanged. What the sidecar reads of them: the usage (`input_tokens`,
`input_tokens_details.cached_tokens`, `output_tokens`) from the response, or from
the stream's terminal event (`response.completed`, `response.incomplete`,
`response.failed`), and the text and function-call arguments streamed, which a
stream cut before its terminal event is billed for. An `error` event is
classified like an OpenAI chat stream's error chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from kubetoll_core.enums import FailureClass
from kubetoll_core.router_config import Backend

from .base import ALL_CAPABILITIES, UpstreamError, UpstreamRequest, Usage
from .openai import classify_openai_error, classify_stream_error

__all__ = ["OpenAIResponsesTranslator", "ResponsesStream", "TERMINAL_EVENTS", "responses_usage"]

# The events that end a response's stream, each carrying the whole response (and its usage).
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# The events whose deltas are generated text (billed when the stream is cut before its usage).
_TEXT_DELTAS = frozenset(
    {"response.output_text.delta", "response.function_call_arguments.delta", "response.refusal.delta"}
)


def responses_usage(u: Any) -> Usage | None:
    """A Responses API usage object: input tokens include the cached ones, as OpenAI's prompt_tokens do."""
    if not isinstance(u, dict):
        return None
    details = u.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(
        prompt_tokens=int(u.get("input_tokens") or 0),
        completion_tokens=int(u.get("output_tokens") or 0),
        cached_tokens=int(cached or 0),
    )


class ResponsesStream:
    """The upstream's response events, passed on as they are; the usage read from the terminal one."""

    __slots__ = ("usage", "done", "text", "text_chars", "_error")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.done = False
        self.text: list[str] = []
        self.text_chars = 0
        self._error: UpstreamError | None = None

    def feed(self, event: str | None, data: bytes) -> list[dict[str, Any]]:
        if self.done or not data:
            return []
        if data == b"[DONE]":  # not part of the Responses API, but some servers end with it
            self.done = True
            return []
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            self._error = UpstreamError(502, FailureClass.server_error, "upstream sent a malformed stream event")
            return []
        kind = payload.get("type") or event
        if not isinstance(kind, str):  # an upstream's odd event: a list `type` would not hash below
            kind = None
        if kind == "error":
            # OpenAI nests the error (`{"type": "error", "error": {...}}`); its reference documents
            # the fields at the top level. Either is read.
            nested = payload.get("error")
            self._error = classify_stream_error(nested if isinstance(nested, dict) else payload)
            return []
        if kind in _TEXT_DELTAS:
            delta = payload.get("delta")
            if isinstance(delta, str) and delta:
                self.text.append(delta)
                self.text_chars += len(delta)
        elif kind in TERMINAL_EVENTS:
            response = payload.get("response")
            self.usage = responses_usage(response.get("usage")) if isinstance(response, dict) else None
            self.done = True
        return [payload]

    def error(self) -> UpstreamError | None:
        return self._error


class OpenAIResponsesTranslator:
    """`POST /v1/responses` to an OpenAI backend, untranslated."""

    __slots__ = ()

    capabilities = ALL_CAPABILITIES

    def build_request(
        self, backend: Backend, endpoint: str, body: dict[str, Any], api_key: str | None, stream: bool
    ) -> UpstreamRequest:
        headers = {"content-type": "application/json", **backend.headers}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return UpstreamRequest("POST", backend.endpoint + "/responses", headers, orjson.dumps(body))

    def parse_response(self, endpoint: str, body: bytes, model_alias: str) -> tuple[dict[str, Any], Usage]:
        data = orjson.loads(body)
        if not isinstance(data, dict) or data.get("object") != "response":
            raise ValueError("upstream response is not a Responses API response object")
        usage = responses_usage(data.get("usage"))
        return data, usage if usage is not None else Usage(reported=False)

    def stream_translator(self, model_alias: str, include_usage: bool) -> ResponsesStream:
        return ResponsesStream()

    def classify_error(self, status: int, headers: Mapping[str, str] | None, body: bytes) -> UpstreamError:
        return classify_openai_error(status, headers, body)


def retrieve_request(backend: Backend, method: str, response_id: str, api_key: str | None) -> UpstreamRequest:
    """`GET` or `DELETE /v1/responses/{id}` on the backend that created the response."""
    headers = {**backend.headers}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return UpstreamRequest(method, f"{backend.endpoint}/responses/{response_id}", headers, b"")
