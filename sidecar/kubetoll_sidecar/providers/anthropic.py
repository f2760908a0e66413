"""Anthropic Messages API <-> OpenAI Chat Completions.

`AnthropicTranslator` turns an OpenAI chat request into a `POST /v1/messages`
request and Anthropic's responses, SSE streams and errors back into OpenAI's
shapes. It does no I/O. Only chat completions are served: legacy completions
and embeddings raise `UnsupportedRequest`. `capabilities` declares as much, so a
route of Anthropic backends only answers such a request with a 400 before
trying any of them.

Anthropic returns one candidate per call and has no `n`. The translator builds
one-choice requests only (a body with `n > 1` raises `UnsupportedRequest`) and
declares `fan_out_choices`: the forwarder serves `n > 1` (up to
`base.MAX_FAN_OUT`) as n calls of the same translated request, merges the
choices by index and sums the usage (forwarder.py, "Choices by fan-out").

Request mapping
    * system and developer messages, wherever they sit in the conversation,
      become the top-level `system` as text blocks, in order.
    * user/assistant content becomes content blocks: text, images (`data:` URLs
      as base64 sources, http(s) URLs as url sources) and PDF `file` parts with
      `data:` URLs as documents. Assistant `tool_calls` become `tool_use`
      blocks (arguments must be a JSON object; anything else is a ValueError,
      which the caller reports as a 400). `tool` messages become `tool_result`
      blocks in a user message. Consecutive messages of the same role are
      merged (Anthropic requires user/assistant alternation) and inside a
      merged user message the tool results come first, as Anthropic requires.
      Empty text is dropped (Anthropic rejects empty text blocks); a message
      left with no content is dropped.
    * `max_tokens` (required by Anthropic) comes from `max_completion_tokens`,
      `max_tokens`, the backend's `limits.maxOutputTokens`, or 4096.
    * temperature is clamped to Anthropic's 0..1; `stop` -> `stop_sequences`;
      `user` -> `metadata.user_id`; tools and tool_choice are translated and
      `parallel_tool_calls: false` becomes `disable_parallel_tool_use`.
    * fields in `IGNORED_OPENAI_FIELDS` have no Anthropic meaning and are dropped.
    * `cache_control` on content parts, system parts and tools (the Anthropic
      prompt-caching marker some OpenAI clients already send) is passed through.

JSON response mode (`response_format` json_schema / json_object)
    Anthropic has no response_format, so the translator adds one tool (named
    after the schema, or `json_response`) whose input_schema is the requested
    schema, and forces the model to call it: `tool_choice` names that tool, or
    is `any` when the client also gave tools of its own (so the model may still
    call those). When the model calls the JSON tool, the response carries the
    tool's input as the message `content` (a JSON string) with finish_reason
    "stop" instead of a tool call; streams turn that tool's `input_json_delta`
    pieces into content deltas.

    `build_request` records the JSON tool's name on the translator instance
    (the forwarder creates one translator per request, so this is the only
    per-request state it keeps); `parse_response` reads it, and
    `stream_translator` hands it to the separate `AnthropicStreamTranslator`.

Usage
    Anthropic's `input_tokens` excludes prompt-cache reads and writes; OpenAI's
    `prompt_tokens` includes them. prompt_tokens = input + cache_read +
    cache_creation, cached_tokens = cache_read, cache_write_tokens =
    cache_creation.

Errors
    429/rate_limit_error -> rateLimited (with retry-after); 5xx, 529
    overloaded_error, api_error, timeout_error -> serverError; 400 "prompt is
    too long" / "exceed context limit" and 413 request_too_large ->
    contextLengthExceeded; 402, billing_error and the 400 "credit balance is too
    low" -> budgetExhausted; everything else is not a fallback class.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from kubetoll_core.enums import FailureClass
from kubetoll_core.router_config import Backend

from ..retry_after import retry_after_from_headers
from .base import Capability, Endpoint, UnsupportedRequest, UpstreamError, UpstreamRequest, Usage

__all__ = [
    "ANTHROPIC_VERSION",
    "DEFAULT_MAX_TOKENS",
    "IGNORED_OPENAI_FIELDS",
    "JSON_RESPONSE_TOOL",
    "STOP_REASONS",
    "AnthropicStreamTranslator",
    "AnthropicTranslator",
]

ANTHROPIC_VERSION = "2023-06-01"

# Anthropic requires max_tokens; used when neither the request nor the backend gives one.
DEFAULT_MAX_TOKENS = 4096

# The tool that carries a JSON response_format when the schema has no name.
JSON_RESPONSE_TOOL = "json_response"

# OpenAI request fields with no Anthropic meaning: dropped without complaint.
IGNORED_OPENAI_FIELDS = frozenset(
    {
        "stream_options",  # include_usage is honoured by the stream translator itself
        "logprobs",
        "top_logprobs",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "store",
        "metadata",  # OpenAI's stored-completion tags, not Anthropic's metadata.user_id
        "service_tier",
        "prediction",
        "reasoning_effort",
        "verbosity",
        "web_search_options",
    }
)

# Anthropic stop_reason -> OpenAI finish_reason.
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}

# An Anthropic error type -> the HTTP status Anthropic uses for it (errors inside a stream carry no status).
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

# An Anthropic error type -> the OpenAI error `type` clients expect.
_OPENAI_ERROR_TYPE = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "billing_error": "insufficient_quota",
    "permission_error": "permission_error",
    "not_found_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "rate_limit_error": "rate_limit_error",
    "api_error": "server_error",
    "timeout_error": "server_error",
    "overloaded_error": "server_error",
}

_CONTEXT_TOO_LONG = re.compile(
    r"prompt is too long|exceeds? (?:the )?context (?:limit|window)|context length", re.IGNORECASE
)
# Matched at the start of the message only: an error that quotes the caller's input must not be
# able to pass for the account being out of credit (which counts against the backend's circuit).
_OUT_OF_CREDIT = re.compile(r"(?:your )?credit balance is too low", re.IGNORECASE)
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL)
_BODY_SNIPPET = 200
_MESSAGE_MAX = 2000


# --------------------------------------------------------------------------- translator


class AnthropicTranslator:
    """One request's translator. Cheap to create; keeps only the JSON-mode tool name."""

    __slots__ = ("_json_tool",)

    capabilities = frozenset({Capability.chat, Capability.fan_out_choices})

    def __init__(self) -> None:
        self._json_tool: str | None = None

    @property
    def json_response_tool(self) -> str | None:
        """The tool carrying a JSON response_format for the request last built, or None."""
        return self._json_tool

    # ------------------------------------------------------------------ request

    def build_request(
        self, backend: Backend, endpoint: str, body: dict[str, Any], api_key: str | None, stream: bool
    ) -> UpstreamRequest:
        self._json_tool = None
        if endpoint != Endpoint.chat:
            raise UnsupportedRequest("anthropic backends serve chat completions only")
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            # The forwarder fans n > 1 out as n one-choice requests; one that reaches here asks for more.
            raise UnsupportedRequest("anthropic backends return one choice per call (n must be 1)")
        if body.get("functions") is not None or body.get("function_call") is not None:
            raise UnsupportedRequest("anthropic backends do not serve the legacy functions API; use tools")
        modalities = body.get("modalities")
        if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
            raise UnsupportedRequest("anthropic backends do not produce audio")

        system, messages = _convert_messages(body.get("messages"))

        payload: dict[str, Any] = {"model": body["model"], "max_tokens": _max_tokens(backend, body)}
        if system:
            payload["system"] = system
        payload["messages"] = messages

        temperature = body.get("temperature")
        if temperature is not None:
            if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 1:
                temperature = 1.0
            payload["temperature"] = temperature
        if body.get("top_p") is not None:
            payload["top_p"] = body["top_p"]
        stop = body.get("stop")
        if isinstance(stop, str):
            payload["stop_sequences"] = [stop]
        elif isinstance(stop, list) and stop:
            payload["stop_sequences"] = list(stop)
        elif stop is not None and not isinstance(stop, list):
            raise ValueError("stop must be a string or a list of strings")
        if body.get("user") is not None:
            payload["metadata"] = {"user_id": str(body["user"])}

        self._add_tools(payload, body)

        if stream:
            payload["stream"] = True

        base = backend.endpoint.rstrip("/")
        url = f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"
        headers = {"content-type": "application/json"}
        if api_key:
            headers["x-api-key"] = api_key
        headers["anthropic-version"] = ANTHROPIC_VERSION
        headers.update(backend.headers)
        return UpstreamRequest(method="POST", url=url, headers=headers, body=orjson.dumps(payload))

    def _add_tools(self, payload: dict[str, Any], body: dict[str, Any]) -> None:
        raw_tools = body.get("tools")
        if raw_tools is not None and not isinstance(raw_tools, list):
            raise ValueError("tools must be a list")
        tools = _convert_tools(raw_tools or [])
        user_tools = bool(tools)
        choice = _convert_tool_choice(body.get("tool_choice"))

        json_tool = _json_response_tool(body.get("response_format"), {t["name"] for t in tools})
        if json_tool is not None:
            self._json_tool = json_tool["name"]
            tools.append(json_tool)
            if user_tools and (choice is None or choice["type"] in ("auto", "any")):
                # The model may still call the client's tools, but must answer through one.
                choice = {"type": "any"}
            elif user_tools and choice is not None and choice["type"] == "tool":
                pass  # the client forced one of its own tools for this turn
            else:
                choice = {"type": "tool", "name": json_tool["name"], "disable_parallel_tool_use": True}

        if not tools:
            return  # Anthropic rejects tool_choice without tools; OpenAI's parallel_tool_calls is moot
        if body.get("parallel_tool_calls") is False:
            if choice is None:
                choice = {"type": "auto"}
            if choice["type"] != "none":
                choice["disable_parallel_tool_use"] = True
        payload["tools"] = tools
        if choice is not None:
            payload["tool_choice"] = choice

    # ------------------------------------------------------------------ response

    def parse_response(self, endpoint: str, body: bytes, model_alias: str) -> tuple[dict[str, Any], Usage]:
        if endpoint != Endpoint.chat:
            raise UnsupportedRequest("anthropic backends serve chat completions only")
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("anthropic returned a response body that is not JSON") from None
        if not isinstance(msg, dict) or msg.get("type") == "error":
            raise ValueError("anthropic returned a response that is not a message")

        texts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        json_content: str | None = None
        for block in msg.get("content") or []:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text":
                texts.append(block.get("text") or "")
            elif kind == "tool_use":
                tool_input = block.get("input")
                if tool_input is None:
                    tool_input = {}
                arguments = orjson.dumps(tool_input).decode()
                if self._json_tool is not None and block.get("name") == self._json_tool:
                    if json_content is None:
                        json_content = arguments
                    continue
                tool_calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {"name": block.get("name"), "arguments": arguments},
                    }
                )
            # thinking, redacted_thinking and server-tool blocks have no OpenAI equivalent

        if json_content is not None:
            content: str | None = json_content
        else:
            content = "".join(texts) if texts else None
        finish = _finish_reason(msg.get("stop_reason"), json_content is not None, bool(tool_calls))

        message: dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls
        usage = _usage_from(msg.get("usage"), None)
        result = {
            "id": _completion_id(msg.get("id")),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": msg.get("model") or model_alias,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": _openai_usage(usage),
        }
        return result, usage

    def stream_translator(self, model_alias: str, include_usage: bool) -> AnthropicStreamTranslator:
        return AnthropicStreamTranslator(model_alias, include_usage, json_tool=self._json_tool)

    # ------------------------------------------------------------------ errors

    def classify_error(self, status: int, headers: Mapping[str, str] | None, body: bytes) -> UpstreamError:
        retry_after = retry_after_from_headers(headers)
        etype: str | None = None
        message: str | None = None
        try:
            data = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict):
                etype = err.get("type") if isinstance(err.get("type"), str) else None
                message = err.get("message") if isinstance(err.get("message"), str) else None
            elif isinstance(data.get("message"), str):
                message = data["message"]
        if message is None:
            snippet = _snippet(body)
            message = (
                f"anthropic returned HTTP {status}: {snippet}"
                if snippet
                else f"anthropic returned HTTP {status} with an empty body"
            )
        return _classify(status, etype, message, retry_after)


# --------------------------------------------------------------------------- stream


class AnthropicStreamTranslator:
    """Anthropic SSE events in, OpenAI chat.completion.chunk dicts out."""

    __slots__ = (
        "usage",
        "done",
        "text",
        "text_chars",
        "_model_alias",
        "_include_usage",
        "_json_tool",
        "_id",
        "_created",
        "_model",
        "_error",
        "_tool_index",
        "_json_blocks",
        "_tools_seen",
        "_json_seen",
        "_finish",
    )

    def __init__(self, model_alias: str, include_usage: bool, json_tool: str | None = None) -> None:
        self.usage: Usage | None = None
        self.done = False
        self.text: list[str] = []  # content and tool argument pieces emitted, to count a cut stream's tokens
        self.text_chars = 0
        self._model_alias = model_alias
        self._include_usage = include_usage
        self._json_tool = json_tool
        self._id = _completion_id(None)
        self._created = int(time.time())
        self._model = model_alias
        self._error: UpstreamError | None = None
        # Anthropic content block index (None when an event carries none) -> OpenAI tool_calls index
        self._tool_index: dict[int | None, int] = {}
        self._json_blocks: set[int | None] = set()  # content blocks that carry the JSON response tool
        self._tools_seen = 0
        self._json_seen = False
        self._finish: str | None = None

    def error(self) -> UpstreamError | None:
        return self._error

    def feed(self, event: str | None, data: bytes) -> list[dict[str, Any]]:
        if self.done or not data:
            return []
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            if self._error is None:
                self._error = UpstreamError(
                    status=502,
                    failure=FailureClass.server_error,
                    message=f"anthropic sent a malformed stream event: {_snippet(data)}",
                    openai_error=_openai_error("anthropic sent a malformed stream event", "server_error", None),
                )
            return []
        kind = event or payload.get("type")

        if kind == "content_block_delta":
            return self._on_delta(payload)
        if kind == "content_block_start":
            return self._on_block_start(payload)
        if kind == "message_start":
            return self._on_message_start(payload)
        if kind == "message_delta":
            return self._on_message_delta(payload)
        if kind == "message_stop":
            self.done = True
            if not self._include_usage:
                return []
            usage = self.usage or Usage()
            chunk = self._chunk_base()
            chunk["choices"] = []
            chunk["usage"] = _openai_usage(usage)
            return [chunk]
        if kind == "error":
            err = _dict(payload.get("error"))
            etype, message = err.get("type"), err.get("message")
            if not isinstance(etype, str):
                etype = "api_error"
            if not isinstance(message, str):
                message = "error in stream"
            self._error = _classify(_ERROR_STATUS.get(etype, 500), etype, message, None)
            return []
        return []  # ping, content_block_stop, unknown events

    # ------------------------------------------------------------------ events

    def _on_message_start(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        msg = _dict(payload.get("message"))
        if msg.get("id"):
            self._id = _completion_id(msg["id"])
        if msg.get("model"):
            self._model = msg["model"]
        self.usage = _usage_from(msg.get("usage"), self.usage)
        return [self._chunk({"role": "assistant", "content": ""})]

    def _on_block_start(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        block = _dict(payload.get("content_block"))
        index = _block_index(payload)
        kind = block.get("type")
        if kind == "text":
            text = block.get("text") or ""
            if text:
                self._emitted(text)
                return [self._chunk({"content": text})]
            return []
        if kind != "tool_use":
            return []  # thinking, redacted_thinking, server tools
        if self._json_tool is not None and block.get("name") == self._json_tool:
            self._json_blocks.add(index)
            self._json_seen = True
            return []
        tool_index = self._tools_seen
        self._tools_seen += 1
        self._tool_index[index] = tool_index
        call = {
            "index": tool_index,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": block.get("name"), "arguments": ""},
        }
        return [self._chunk({"tool_calls": [call]})]

    def _on_delta(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        delta = _dict(payload.get("delta"))
        index = _block_index(payload)
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text") or ""
            if not text:
                return []
            self._emitted(text)
            return [self._chunk({"content": text})]
        if kind == "input_json_delta":
            piece = delta.get("partial_json") or ""
            if not piece:
                return []
            if index in self._json_blocks:
                self._emitted(piece)
                return [self._chunk({"content": piece})]
            tool_index = self._tool_index.get(index)
            if tool_index is None:
                return []  # a block we did not announce (server tool)
            self._emitted(piece)
            return [self._chunk({"tool_calls": [{"index": tool_index, "function": {"arguments": piece}}]})]
        return []  # thinking_delta, signature_delta, citations_delta

    def _on_message_delta(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        if isinstance(payload.get("usage"), dict):
            self.usage = _usage_from(payload["usage"], self.usage)
        delta = _dict(payload.get("delta"))
        self._finish = _finish_reason(delta.get("stop_reason"), self._json_seen, self._tools_seen > 0)
        return [self._chunk({}, self._finish)]

    def _emitted(self, piece: str) -> None:
        """Keeps a piece of content or tool arguments sent to the client, for billing a cut stream."""
        self.text.append(piece)
        self.text_chars += len(piece)

    # ------------------------------------------------------------------ chunks

    def _chunk_base(self) -> dict[str, Any]:
        return {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._model}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        chunk = self._chunk_base()
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        if self._include_usage:
            chunk["usage"] = None  # as OpenAI does: null on every chunk but the last
        return chunk


def _dict(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _block_index(payload: dict[str, Any]) -> int | None:
    """The content block index of a stream event (an int in every Anthropic event that has one)."""
    index = payload.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else None


# --------------------------------------------------------------------------- messages


def _convert_messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where} must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            system.extend(_text_blocks(msg.get("content"), where))
            continue
        if role == "user":
            blocks = _user_blocks(msg.get("content"), where)
        elif role == "assistant":
            blocks = _assistant_blocks(msg, where)
        elif role == "tool":
            role, blocks = "user", [_tool_result(msg, where)]
        elif role == "function":
            raise UnsupportedRequest("anthropic backends do not serve legacy function messages; use tools")
        else:
            raise ValueError(f"{where}.role {role!r} is not supported")
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    if not out:
        raise ValueError("the conversation needs at least one user or assistant message with content")
    for m in out:
        if m["role"] == "user":
            # Anthropic wants a user turn's tool results before anything else in it.
            results = [b for b in m["content"] if b["type"] == "tool_result"]
            if results:
                m["content"] = results + [b for b in m["content"] if b["type"] != "tool_result"]
    return system, out


def _text_block(part: dict[str, Any]) -> dict[str, Any] | None:
    text = part.get("text")
    if not isinstance(text, str):
        raise ValueError("a text content part needs a string `text`")
    if not text:
        return None
    block: dict[str, Any] = {"type": "text", "text": text}
    if part.get("cache_control") is not None:
        block["cache_control"] = part["cache_control"]
    return block


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """Content that may only be text (system, developer)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of content parts")
    blocks = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValueError(f"{where}.content[{j}]: only text parts are allowed here")
        block = _text_block(part)
        if block is not None:
            blocks.append(block)
    return blocks


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of content parts")
    blocks = []
    for j, part in enumerate(content):
        block = _user_part(part, f"{where}.content[{j}]")
        if block is not None:
            blocks.append(block)
    return blocks


def _user_part(part: Any, where: str) -> dict[str, Any] | None:
    if not isinstance(part, dict):
        raise ValueError(f"{where} must be an object")
    kind = part.get("type")
    if kind == "text":
        return _text_block(part)
    if kind == "image_url":
        block = _image_block(part.get("image_url"), where)
    elif kind == "file":
        block = _document_block(part.get("file"), where)
    elif kind == "input_audio":
        raise UnsupportedRequest("anthropic backends do not accept audio input")
    else:
        raise ValueError(f"{where}: content part type {kind!r} is not supported")
    if part.get("cache_control") is not None:
        block["cache_control"] = part["cache_control"]
    return block


def _image_block(image: Any, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}.image_url needs a url")
    if url.startswith("data:"):
        media_type, data = _parse_data_url(url, where)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise ValueError(f"{where}.image_url.url must be a data: URL or an http(s) URL")


def _document_block(file: Any, where: str) -> dict[str, Any]:
    if not isinstance(file, dict):
        raise ValueError(f"{where}.file must be an object")
    data_url = file.get("file_data")
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise UnsupportedRequest("anthropic backends accept files only inline as base64 data: URLs (not file ids)")
    media_type, data = _parse_data_url(data_url, where)
    if media_type != "application/pdf":
        raise UnsupportedRequest(f"anthropic backends accept PDF files only, not {media_type}")
    return {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _parse_data_url(url: str, where: str) -> tuple[str, str]:
    m = _DATA_URL.match(url)
    if m is None:
        raise ValueError(f"{where}: malformed data: URL")
    media_type, params, data = m.group(1), m.group(2), m.group(3)
    if "base64" not in [p.strip().lower() for p in params.split(";")]:
        raise ValueError(f"{where}: data: URLs must be base64-encoded")
    if not media_type:
        raise ValueError(f"{where}: data: URL has no media type")
    return media_type.lower(), data


def _assistant_blocks(msg: dict[str, Any], where: str) -> list[dict[str, Any]]:
    content = msg.get("content")
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise ValueError(f"{where}.content[{j}] must be an object")
            if part.get("type") == "text":
                block = _text_block(part)
            elif part.get("type") == "refusal":
                refusal = part.get("refusal")
                block = {"type": "text", "text": refusal} if isinstance(refusal, str) and refusal else None
            else:
                raise ValueError(f"{where}.content[{j}]: assistant content part {part.get('type')!r} is not supported")
            if block is not None:
                blocks.append(block)
    elif content is not None:
        raise ValueError(f"{where}.content must be a string, a list of content parts, or null")

    tool_calls = msg.get("tool_calls")
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise ValueError(f"{where}.tool_calls must be a list")
    for j, call in enumerate(tool_calls or []):
        cw = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise ValueError(f"{cw} must be an object")
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{cw} needs function.name")
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise ValueError(f"{cw} needs an id")
        blocks.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": fn["name"],
                "input": _parse_arguments(fn.get("arguments"), cw),
            }
        )
    return blocks


def _parse_arguments(arguments: Any, where: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}  # a call without arguments
    if not isinstance(arguments, str):
        raise ValueError(f"{where}.function.arguments must be a JSON string")
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"{where}.function.arguments is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object")
    return value


def _tool_result(msg: dict[str, Any], where: str) -> dict[str, Any]:
    tool_call_id = msg.get("tool_call_id")
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise ValueError(f"{where}: a tool message needs tool_call_id")
    content = msg.get("content")
    if content is None:
        result: Any = ""
    elif isinstance(content, str):
        result = content
    elif isinstance(content, list):
        result = _user_blocks(content, where)
    else:
        raise ValueError(f"{where}.content must be a string or a list of content parts")
    return {"type": "tool_result", "tool_use_id": tool_call_id, "content": result}


# --------------------------------------------------------------------------- parameters


def _max_tokens(backend: Backend, body: dict[str, Any]) -> Any:
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            return body[key]
    if backend.limits.max_output_tokens is not None:
        return backend.limits.max_output_tokens
    return DEFAULT_MAX_TOKENS


def _convert_tools(tools: list[Any]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ValueError(f"{where} must be an object")
        kind = tool.get("type", "function")
        if kind != "function":
            raise UnsupportedRequest(f"anthropic backends support function tools only, not {kind!r}")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where} needs function.name")
        entry: dict[str, Any] = {"name": fn["name"]}
        if fn.get("description"):
            entry["description"] = fn["description"]
        entry["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
        if tool.get("cache_control") is not None:
            entry["cache_control"] = tool["cache_control"]
        out.append(entry)
    return out


def _convert_tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]:
            return {"type": "tool", "name": fn["name"]}
    raise ValueError(f"tool_choice {choice!r} is not supported")


def _json_response_tool(response_format: Any, taken: set[str]) -> dict[str, Any] | None:
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        name, description, schema = None, None, {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format json_schema needs a json_schema object")
        name = spec.get("name") if isinstance(spec.get("name"), str) and spec.get("name") else None
        description = spec.get("description")
        schema = spec.get("schema") or {"type": "object"}
    else:
        raise ValueError(f"response_format type {kind!r} is not supported")
    if name is None or name in taken:
        name = JSON_RESPONSE_TOOL
    if name in taken:
        raise ValueError(f"a client tool is named {JSON_RESPONSE_TOOL!r}, which JSON response mode needs")
    return {
        "name": name,
        "description": description or "Give your final answer by calling this tool; its input is the JSON response.",
        "input_schema": schema,
    }


def _finish_reason(stop_reason: Any, json_answer: bool, tool_calls: bool) -> str:
    finish = STOP_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"
    if finish == "tool_calls" and json_answer and not tool_calls:
        return "stop"
    return finish


def _completion_id(message_id: Any) -> str:
    if isinstance(message_id, str) and message_id:
        return "chatcmpl-" + message_id
    return "chatcmpl-" + uuid.uuid4().hex


# --------------------------------------------------------------------------- usage


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def _usage_from(raw: Any, previous: Usage | None) -> Usage:
    """Anthropic usage (from a message, message_start or message_delta) merged over what was seen."""
    prev = previous or Usage()
    input_tokens = prev.prompt_tokens - prev.cached_tokens - prev.cache_write_tokens
    output = prev.completion_tokens
    cache_read = prev.cached_tokens
    cache_write = prev.cache_write_tokens
    if isinstance(raw, dict):
        if (v := _int(raw.get("input_tokens"))) is not None:
            input_tokens = v
        if (v := _int(raw.get("cache_read_input_tokens"))) is not None:
            cache_read = v
        if (v := _int(raw.get("cache_creation_input_tokens"))) is not None:
            cache_write = v
        if (v := _int(raw.get("output_tokens"))) is not None:
            output = v
    return Usage(
        prompt_tokens=input_tokens + cache_read + cache_write,
        completion_tokens=output,
        cached_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


def _openai_usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


# --------------------------------------------------------------------------- errors


def _classify(status: int, etype: str | None, message: str, retry_after: float | None) -> UpstreamError:
    if len(message) > _MESSAGE_MAX:
        message = message[:_MESSAGE_MAX] + "..."
    code: str | None = etype
    if status == 429 or etype == "rate_limit_error":
        failure: FailureClass | None = FailureClass.rate_limited
        openai_type = "rate_limit_error"
    elif status == 402 or etype == "billing_error" or _OUT_OF_CREDIT.match(message):
        failure = FailureClass.budget_exhausted
        openai_type = "insufficient_quota"
    elif status >= 500 or etype in ("api_error", "overloaded_error", "timeout_error"):
        failure = FailureClass.server_error
        openai_type = "server_error"
    elif status == 413 or etype == "request_too_large":
        failure = FailureClass.context_length_exceeded
        openai_type = "invalid_request_error"
    elif (status == 400 or etype == "invalid_request_error") and _CONTEXT_TOO_LONG.search(message):
        failure = FailureClass.context_length_exceeded
        openai_type = "invalid_request_error"
        code = "context_length_exceeded"
    else:
        failure = None
        openai_type = _OPENAI_ERROR_TYPE.get(etype or "") or _openai_type_for_status(status)
    label = f"anthropic HTTP {status} {etype}" if etype else f"anthropic HTTP {status}"
    return UpstreamError(
        status=status,
        failure=failure,
        message=message if message.startswith("anthropic returned HTTP") else f"{label}: {message}",
        retry_after=retry_after,
        openai_error=_openai_error(message, openai_type, code),
    )


def _openai_type_for_status(status: int) -> str:
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error"
    )


def _openai_error(message: str, openai_type: str, code: str | None) -> dict[str, Any]:
    return {"message": message, "type": openai_type, "code": code, "param": None}


def _snippet(body: bytes | None) -> str:
    if not body:
        return ""
    text = body[: _BODY_SNIPPET * 4].decode("utf-8", "replace")
    return " ".join(text.split())[:_BODY_SNIPPET]
