"""Anthropic's Messages API served to clients (`POST /v1/messages`, `POST /v1/messages/count_tokens`).

Apps point the `anthropic` SDK at the sidecar (`ANTHROPIC_BASE_URL=http://127.0.0.1:7400`).
The route is the request's `model`, as for chat. The SDK's `x-api-key` (or
`Authorization`) and `anthropic-version` headers are accepted and never forwarded:
the sidecar holds the backends' credentials.

Anthropic backends serve it natively (`providers/anthropic_messages.py`): the
body, the message and its event stream pass through, so thinking blocks, stop
sequences, cache_control and the cache usage are the provider's own. Every other
backend serves it through chat completions:

    request                                   chat request
    `system` (string or text blocks)          a system message first
    user text, `image` blocks (base64, url)   user content parts (`image_url`)
    `document` blocks (base64 PDF, text)      `file` parts (PDF), text parts
    `tool_result` blocks                      `tool` messages, before the rest of the turn
    assistant text, `tool_use` blocks         assistant content, `tool_calls`
    `thinking` blocks                         dropped (only their provider can read them)
    `tools` (custom), `tool_choice`           function tools; auto, any (required), tool, none;
                                              `disable_parallel_tool_use` as `parallel_tool_calls: false`
    `max_tokens`, `stop_sequences`            `max_tokens` (`max_completion_tokens` on Azure), `stop`
    `temperature`, `top_p`                    the same (`top_k` and `thinking` are dropped)
    `metadata.user_id`                        `user`

and the chat answer becomes a message: text and `tool_use` blocks, stop_reason
`end_turn` (chat cannot tell a stop sequence from the end of the turn), `max_tokens`,
`tool_use` or `refusal`, and the usage in Anthropic's terms (`input_tokens` without
the cache reads, `cache_read_input_tokens`). Its stream becomes Anthropic's events
in their order: message_start, content_block_start, ping, content_block_delta,
content_block_stop, message_delta (stop reason and the whole usage), message_stop.
Through chat, message_start carries `input_tokens: 0` (a chat stream reports its
usage at the end) and message_delta the provider's counts, which the SDK's final
message takes. Server tools, search results, documents by URL and MCP servers make
a backend unsupported for the request (skipped; a route with no backend left is a 400).

Errors on these paths are Anthropic's (`{"type": "error", "error": {"type", "message"},
"request_id"}`) with the sidecar's status: 400 invalid_request_error, 401
authentication_error, 403 permission_error (a suspended budget), 404 not_found_error,
413 request_too_large, 429 rate_limit_error (budgets and rate limits, with
Retry-After), 500 api_error, 503 overloaded_error (every backend failed, the budget
store away, draining), 504 timeout_error. An error an Anthropic backend returned
keeps its own type. In a stream, the same shape as an `error` event.

`count_tokens` answers the sidecar's own estimate for the request (tiktoken over its
chat equivalent: the figure the pipeline reserves with), without calling a backend.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from kubetoll_core.enums import Provider
from kubetoll_core.router_config import Backend

from .. import tokens
from ..errors import ApiError, bad_request, not_found_model, retry_after_header
from ..providers.anthropic_messages import AnthropicMessagesTranslator
from ..providers.base import Endpoint, UnsupportedRequest, Usage
from ..sse import StreamFraming
from .base import FromChat, InboundRequest, chat_tool_calls, first_choice, int_field, named_event, obj

if TYPE_CHECKING:
    from ..state import RouterState

__all__ = ["MESSAGES", "MessagesAdapter", "anthropic_error_type", "count_tokens"]

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
COMPLETE_STOP_REASONS = frozenset({"end_turn", "max_tokens", "tool_use", "stop_sequence"})
# Anthropic's error types, and the one for each status the sidecar answers with.
ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "timeout_error",
        "overloaded_error",
    }
)
_STATUS_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_PIECE_CHARS = 96  # text per delta when a cached answer is replayed


def anthropic_error_type(status: int, code: Any = None) -> str:
    """The Anthropic error type for a status; an Anthropic backend's own type (passed on as `code`) wins."""
    if isinstance(code, str) and code in ERROR_TYPES:
        return code
    return _STATUS_TYPE.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def _new_id() -> str:
    return "msg_" + secrets.token_hex(12)


# --------------------------------------------------------------------------- stage 1


def _validate(body: dict[str, Any], counting: bool) -> None:
    if "n" in body:  # not a parameter of this API (its providers refuse it): one answer per request
        raise bad_request("Unrecognized request argument supplied: n", param="n")
    if not counting:
        cap = body.get("max_tokens")
        if cap is None:
            raise bad_request("max_tokens: Field required", param="max_tokens")
        if not int_field(cap) or cap < 1:
            raise bad_request("max_tokens: Input should be an integer >= 1", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: at least one message is required", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages.{i}: Input should be an object", param=f"messages.{i}")
        role = m.get("role")
        if role == "system":
            raise bad_request(
                'messages: Unexpected role "system". The Messages API accepts a top-level `system` parameter, '
                'not "system" as an input message role.',
                param=f"messages.{i}.role",
            )
        if role not in ("user", "assistant"):
            raise bad_request(f"messages.{i}.role: Input should be 'user' or 'assistant'", param=f"messages.{i}.role")
        content = m.get("content")
        if isinstance(content, list):
            for j, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise bad_request(
                        f"messages.{i}.content.{j}: a content block needs a `type`", param=f"messages.{i}.content.{j}"
                    )
        elif not isinstance(content, str):
            raise bad_request(
                f"messages.{i}.content: Input should be a string or a list of content blocks",
                param=f"messages.{i}.content",
            )
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise bad_request("system: Input should be a string or a list of text blocks", param="system")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("tools: Input should be a list", param="tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
                raise bad_request(f"tools.{i}.name: Field required", param=f"tools.{i}.name")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise bad_request("stop_sequences: Input should be a list of strings", param="stop_sequences")
    choice = body.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and isinstance(choice.get("type"), str)):
        raise bad_request("tool_choice: Input should be an object with a `type`", param="tool_choice")


# --------------------------------------------------------------------------- request -> chat


def _unsupported(strict: bool, what: str) -> None:
    if strict:
        raise UnsupportedRequest(f"{what} cannot be carried over chat completions; an Anthropic backend serves it")


def _text(block: dict[str, Any]) -> dict[str, Any]:
    # cache_control is Anthropic's: OpenAI-family servers refuse fields they do not know.
    return {"type": "text", "text": str(block.get("text") or "")}


def _source_part(block: dict[str, Any], strict: bool) -> dict[str, Any] | None:
    """An image or document block as a chat content part."""
    source = obj(block.get("source"))
    kind, media = source.get("type"), source.get("media_type")
    if block.get("type") == "image":
        if kind == "base64":
            return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{source.get('data')}"}}
        if kind == "url":
            return {"type": "image_url", "image_url": {"url": source.get("url")}}
        _unsupported(strict, f"an image of source type {kind!r}")
        return None
    if kind == "base64" and media == "application/pdf":
        name = block.get("title") if isinstance(block.get("title"), str) else "document.pdf"
        return {"type": "file", "file": {"file_data": f"data:{media};base64,{source.get('data')}", "filename": name}}
    if kind == "text":
        return {"type": "text", "text": str(source.get("data") or "")}
    _unsupported(strict, f"a document of source type {kind!r}")
    return None


def _tool_result_text(content: Any, strict: bool) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for block in content or ():
        if isinstance(block, dict) and block.get("type") == "text":
            texts.append(str(block.get("text") or ""))
        else:
            _unsupported(strict, "a tool_result holding anything but text")
    return "\n".join(texts)


def _chat_messages(body: Mapping[str, Any], strict: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str) and system:
        out.append({"role": "system", "content": system})
    elif isinstance(system, list):
        system_parts = [_text(b) for b in system if isinstance(b, dict) and b.get("type") == "text"]
        if system_parts:
            out.append({"role": "system", "content": system_parts})
    for m in body.get("messages") or ():
        if not isinstance(m, dict):
            continue
        role, content = m.get("role"), m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        blocks = [b for b in content or () if isinstance(b, dict)]
        if role == "assistant":
            texts: list[str] = []
            calls: list[dict[str, Any]] = []
            for b in blocks:
                kind = b.get("type")
                if kind == "text":
                    texts.append(str(b.get("text") or ""))
                elif kind == "tool_use":
                    args = orjson.dumps(b.get("input") if b.get("input") is not None else {}).decode()
                    calls.append(
                        {"id": b.get("id"), "type": "function", "function": {"name": b.get("name"), "arguments": args}}
                    )
                elif kind not in ("thinking", "redacted_thinking"):
                    _unsupported(strict, f"an assistant block of type {kind!r}")
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        parts = []
        for b in blocks:
            kind = b.get("type")
            if kind == "tool_result":
                # Chat wants each result right after the call, before the rest of the user's turn.
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": b.get("tool_use_id"),
                        "content": _tool_result_text(b.get("content"), strict),
                    }
                )
            elif kind == "text":
                parts.append(_text(b))
            elif kind in ("image", "document"):
                part = _source_part(b, strict)
                if part is not None:
                    parts.append(part)
            else:
                _unsupported(strict, f"a content block of type {kind!r}")
        if parts:
            out.append({"role": "user", "content": parts})
    return out


def _chat_tools(tools: Any, strict: bool) -> list[dict[str, Any]]:
    out = []
    for tool in tools or ():
        if not isinstance(tool, dict):
            continue
        if tool.get("type") not in (None, "custom"):
            _unsupported(strict, f"the server tool {tool.get('type')!r}")
            continue
        fn: dict[str, Any] = {"name": tool.get("name")}
        if tool.get("description"):
            fn["description"] = tool["description"]
        fn["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out


def chat_request(body: Mapping[str, Any], provider: Provider | None, strict: bool) -> dict[str, Any]:
    """The chat request a Messages API request stands for. `strict`: UnsupportedRequest for what it cannot carry."""
    if strict and body.get("mcp_servers"):
        _unsupported(strict, "mcp_servers")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _chat_messages(body, strict)}
    tools = _chat_tools(body.get("tools"), strict)
    choice = obj(body.get("tool_choice"))
    kind = choice.get("type")
    if tools:
        chat["tools"] = tools  # with tool_choice none too: the definitions are still part of the prompt
        if kind in ("auto", "none"):
            chat["tool_choice"] = kind
        elif kind == "any":
            chat["tool_choice"] = "required"
        elif kind == "tool" and isinstance(choice.get("name"), str):
            chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        if choice.get("disable_parallel_tool_use") is True and kind != "none":
            chat["parallel_tool_calls"] = False
    if body.get("max_tokens") is not None:
        chat["max_completion_tokens" if provider is Provider.azure_openai else "max_tokens"] = body["max_tokens"]
    for key in ("temperature", "top_p", "stream"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    return chat


# --------------------------------------------------------------------------- chat -> message


def usage_dict(u: Usage | None) -> dict[str, Any]:
    """A usage in Anthropic's terms: input_tokens leaves out the prompt-cache reads and writes."""
    if u is None:
        return {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0}
    return {
        "input_tokens": max(u.prompt_tokens - u.cached_tokens - u.cache_write_tokens, 0),
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": u.completion_tokens,
    }


def _tool_input(arguments: Any) -> Any:
    try:
        value = orjson.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _stop(finish: Any) -> str:
    return _STOP.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"


def from_chat(chat: dict[str, Any], usage: Usage, request: Mapping[str, Any]) -> dict[str, Any]:
    msg, finish = first_choice(chat)
    content: list[dict[str, Any]] = []
    text = msg.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refusal = msg.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {} if isinstance(call, dict) else {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": fn.get("name"),
                "input": _tool_input(fn.get("arguments")),
            }
        )
    return {
        "id": _new_id(),
        "type": "message",
        "role": "assistant",
        "model": str(chat.get("model") or request.get("model")),
        "content": content,
        "stop_reason": _stop(finish),
        "stop_sequence": None,
        "usage": usage_dict(usage),
    }


class _Events:
    """Writes one message's events in Anthropic's order."""

    __slots__ = ("message", "blocks", "_open", "_pinged")

    def __init__(self, message: dict[str, Any]) -> None:
        self.message = message
        self.blocks = 0
        self._open: int | None = None
        self._pinged = False

    def start(self, usage: dict[str, Any]) -> list[dict[str, Any]]:
        shell = {**self.message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
        return [{"type": "message_start", "message": shell}]

    def open(self, block: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        out = self.close()
        index = self.blocks
        self.blocks += 1
        self._open = index
        out.append({"type": "content_block_start", "index": index, "content_block": block})
        if not self._pinged:
            self._pinged = True
            out.append({"type": "ping"})
        return index, out

    def delta(self, index: int, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": index, "delta": delta}

    def close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        return [{"type": "content_block_stop", "index": index}]

    def finish(self, stop_reason: Any, stop_sequence: Any, usage: dict[str, Any]) -> list[dict[str, Any]]:
        out = self.close()
        if not self._pinged:
            self._pinged = True
            out.append({"type": "ping"})
        out.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": usage,
            }
        )
        out.append({"type": "message_stop"})
        return out


class MessagesFromChat(FromChat):
    """Chat chunks in, Anthropic's message events out."""

    def __init__(self, inner: Any, request: Mapping[str, Any]) -> None:
        super().__init__(inner)
        self._request = request
        self._events: _Events | None = None
        self._text: int | None = None  # index of the open text block
        self._calls: dict[int, int] = {}  # chat tool-call index -> block index
        self._finish: Any = None

    def _chunk(self, chunk: dict[str, Any], out: list[dict[str, Any]]) -> None:
        if self._events is None:
            model = str(chunk.get("model") or self._request.get("model"))
            message = {"id": _new_id(), "type": "message", "role": "assistant", "model": model}
            self._events = _Events(message)
            # A chat stream reports its usage at the end: message_delta carries it.
            out.extend(self._events.start(usage_dict(self.inner.usage)))
        ev = self._events
        content, calls, finish = chat_tool_calls(chunk)
        if content:
            if self._text is None:
                self._text, opened = ev.open({"type": "text", "text": ""})
                out.extend(opened)
            out.append(ev.delta(self._text, {"type": "text_delta", "text": content}))
        for call in calls:
            index = call.get("index", 0)
            fn = call.get("function") or {}
            if index not in self._calls:
                self._text = None  # closed by the next open
                block: dict[str, Any] = {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": {}}
                self._calls[index], opened = ev.open(block)
                out.extend(opened)
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                out.append(ev.delta(self._calls[index], {"type": "input_json_delta", "partial_json": args}))
        if finish:
            self._finish = finish

    def _complete(self, out: list[dict[str, Any]]) -> None:
        if self._events is None:
            self._chunk({}, out)
        assert self._events is not None
        out.extend(self._events.finish(_stop(self._finish), None, usage_dict(self.usage)))


def replay(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole message as its event stream (a cached answer for a streaming request)."""
    ev = _Events({k: v for k, v in body.items() if k not in ("content", "stop_reason", "stop_sequence", "usage")})
    usage = obj(body.get("usage")) or usage_dict(None)
    out = ev.start({**usage, "output_tokens": 0})
    for block in body.get("content") or ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            index, opened = ev.open({"type": "text", "text": ""})
            out.extend(opened)
            text = str(block.get("text") or "")
            out.extend(
                ev.delta(index, {"type": "text_delta", "text": text[i : i + _PIECE_CHARS]})
                for i in range(0, len(text), _PIECE_CHARS)
            )
        elif kind == "tool_use":
            index, opened = ev.open({**block, "input": {}})
            out.extend(opened)
            out.append(
                ev.delta(
                    index, {"type": "input_json_delta", "partial_json": orjson.dumps(block.get("input") or {}).decode()}
                )
            )
        elif kind == "thinking":
            index, opened = ev.open({"type": "thinking", "thinking": "", "signature": ""})
            out.extend(opened)
            out.append(ev.delta(index, {"type": "thinking_delta", "thinking": str(block.get("thinking") or "")}))
            out.append(ev.delta(index, {"type": "signature_delta", "signature": str(block.get("signature") or "")}))
        else:  # redacted thinking, server tool blocks: whole in their start event
            _, opened = ev.open(block)
            out.extend(opened)
    out.extend(ev.finish(body.get("stop_reason"), body.get("stop_sequence"), usage))
    return out


# --------------------------------------------------------------------------- the outside


class MessagesFraming:
    """Named events (`event: content_block_delta`), no `[DONE]`; a cut stream ends with an `error` event."""

    __slots__ = ()

    done = b""

    def encode(self, chunk: dict[str, Any] | bytes) -> bytes:
        event = orjson.loads(chunk) if isinstance(chunk, (bytes, bytearray, memoryview)) else chunk
        return named_event(event)

    def error_event(self, message: str, type: str, code: str) -> bytes:
        kind = "overloaded_error" if type == "service_unavailable" else "api_error"
        return named_event({"type": "error", "error": {"type": kind, "message": message}})


class _Assembler:
    """A streamed message put back together from its events."""

    __slots__ = ("_message", "_json", "_stopped", "_broken")

    def __init__(self) -> None:
        self._message: dict[str, Any] | None = None
        self._json: dict[int, list[str]] = {}  # tool_use block index -> input JSON pieces
        self._stopped = False
        self._broken = False

    def feed(self, event: dict[str, Any] | bytes) -> None:
        if isinstance(event, (bytes, bytearray, memoryview)):
            event = orjson.loads(event)
        if not isinstance(event, dict) or self._broken:
            return
        kind = event.get("type")
        msg = self._message
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self._message = {**event["message"], "content": []}
        elif msg is None:
            self._broken = kind == "error"
        elif kind == "content_block_start" and isinstance(event.get("content_block"), dict):
            msg["content"].append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            self._delta(msg, event)
        elif kind == "content_block_stop":
            index = event.get("index")
            if int_field(index) and index in self._json and index < len(msg["content"]):
                try:
                    msg["content"][index]["input"] = orjson.loads("".join(self._json.pop(index)) or "{}")
                except orjson.JSONDecodeError:
                    self._broken = True
        elif kind == "message_delta":
            delta = obj(event.get("delta"))
            msg["stop_reason"], msg["stop_sequence"] = delta.get("stop_reason"), delta.get("stop_sequence")
            if isinstance(event.get("usage"), dict):
                msg["usage"] = {**(msg.get("usage") or {}), **event["usage"]}
        elif kind == "message_stop":
            self._stopped = True
        elif kind == "error":
            self._broken = True

    def _delta(self, msg: dict[str, Any], event: dict[str, Any]) -> None:
        index, delta = event.get("index"), event.get("delta")
        if not int_field(index) or not isinstance(delta, dict) or index >= len(msg["content"]):
            self._broken = True
            return
        block = msg["content"][index]
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] = str(block.get("text") or "") + str(delta.get("text") or "")
        elif kind == "input_json_delta":
            self._json.setdefault(index, []).append(str(delta.get("partial_json") or ""))
        elif kind == "thinking_delta":
            block["thinking"] = str(block.get("thinking") or "") + str(delta.get("thinking") or "")
        elif kind == "signature_delta":
            block["signature"] = delta.get("signature")
        else:  # citations and what may come: not kept, so the answer is not stored
            self._broken = True

    def body(self) -> dict[str, Any] | None:
        if self._broken or not self._stopped or self._message is None:
            return None
        return self._message


class MessagesAdapter:
    endpoint = Endpoint.messages
    max_tokens_field = "max_tokens"
    turns_field = "messages"
    native: Mapping[Provider, type[Any]] = {Provider.anthropic: AnthropicMessagesTranslator}

    def parse(self, body: dict[str, Any], counting: bool = False) -> InboundRequest:
        _validate(body, counting)
        return InboundRequest(chat_request(body, None, strict=False), body.get("max_tokens"))

    def check_route(self, body: dict[str, Any], route: str, backends: Sequence[Backend]) -> None:
        if any(b.provider in self.native for b in backends):
            return
        try:
            chat_request(body, None, strict=True)
        except UnsupportedRequest as exc:
            listed = ", ".join(f"{b.name} ({b.provider.value})" for b in backends)
            raise ApiError(
                400,
                f"route `{route}` cannot serve this Messages API request: {exc}, and none of its backends is an "
                f"Anthropic backend ({listed})",
                "invalid_request_error",
                "unsupported_by_route",
            ) from None

    def to_chat(self, body: dict[str, Any], provider: Provider) -> dict[str, Any]:
        return chat_request(body, provider, strict=True)

    def from_chat(self, chat: dict[str, Any], usage: Usage, request: dict[str, Any]) -> dict[str, Any]:
        return from_chat(chat, usage, request)

    def stream_from_chat(self, inner: Any, request: dict[str, Any]) -> MessagesFromChat:
        return MessagesFromChat(inner, request)

    def framing(self) -> StreamFraming:
        return MessagesFraming()

    def error_response(self, err: ApiError, headers: dict[str, str]) -> web.Response:
        h = {**err.headers, **headers}
        if err.retry_after is not None:
            h["Retry-After"] = retry_after_header(err.retry_after)
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": anthropic_error_type(err.status, err.code), "message": err.message},
        }
        if headers.get("x-request-id"):
            body["request_id"] = headers["x-request-id"]
        return web.Response(status=err.status, body=orjson.dumps(body), content_type="application/json", headers=h)

    def output_texts(self, body: Any) -> list[str]:
        if not isinstance(body, dict) or body.get("type") != "message":
            return []
        texts = []
        for block in body.get("content") or ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                texts.append(str(block.get("name") or "") + orjson.dumps(block.get("input") or {}).decode())
            elif isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif isinstance(block.get("thinking"), str):
                texts.append(block["thinking"])
        return texts

    def uncacheable_reason(self, body: Mapping[str, Any]) -> str:
        return ""

    def conversation(self, body: Mapping[str, Any]) -> list[Any] | None:
        messages = body.get("messages")
        return messages if isinstance(messages, list) else None

    def is_complete(self, body: Any) -> bool:
        return (
            isinstance(body, dict)
            and body.get("type") == "message"
            and body.get("stop_reason") in COMPLETE_STOP_REASONS
            and isinstance(body.get("content"), list)
        )

    def refreshed(self, body: dict[str, Any], now: float) -> dict[str, Any]:
        return {**body, "id": "msg_kt" + secrets.token_hex(10)}

    def replay(self, body: dict[str, Any]) -> bytes:
        return b"".join(named_event(e) for e in replay(body))

    def assembler(self) -> _Assembler:
        return _Assembler()


MESSAGES = MessagesAdapter()


def count_tokens(body: Any, state: RouterState) -> dict[str, Any]:
    """`POST /v1/messages/count_tokens`: the sidecar's estimate of the request's input tokens.

    The same count the pipeline reserves with for this request on `/v1/messages` (its chat
    equivalent, with the encoding of the route's first backend); no backend is called.
    """
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model: Field required", param="model")
    chat = MESSAGES.parse(body, counting=True).chat
    route = state.router.get(model)
    if route is None:
        raise not_found_model(model, state.router.names())
    encoding_model = state.backends[route.all_backends[0]].config.model
    return {"input_tokens": tokens.count_chat(chat["messages"], encoding_model, chat.get("tools"))}
