"""OpenAI's Responses API (`POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`) on the pipeline.

OpenAI backends serve it natively (`providers/openai_responses.py`): the body
passes through, and so do the answer, its event stream and its usage. Every other
backend (Azure OpenAI, OpenAI-compatible servers, Anthropic) serves it through
chat completions:

    request                                   chat request
    `instructions`                            a system message first
    `input` string                            one user message
    input message items (any role)            messages (`developer` as `system`); `input_text`,
                                              `input_image` (URL), `input_file` (data or file id),
                                              `input_audio` parts; assistant `output_text` as text
    `function_call` items                     the assistant message's `tool_calls`
    `function_call_output` items              `tool` messages
    `reasoning` items                         dropped (only their provider can read them)
    function `tools`, `tool_choice`,          the same, in chat's shape
    `parallel_tool_calls`
    `max_output_tokens`                       `max_tokens` (`max_completion_tokens` on Azure)
    `text.format` (json_schema, json_object)  `response_format`
    `reasoning.effort`                        `reasoning_effort` (Azure)
    `temperature`, `top_p`, `user`            the same

and the chat answer becomes a response (`message` and `function_call` output
items, `status` `incomplete` with reason `max_output_tokens` or `content_filter`
for those finish reasons, `usage` with input, cached and output tokens), its
stream the typed events the SDK parses (response.created, response.in_progress,
response.output_item.added, response.content_part.added,
response.output_text.delta, response.function_call_arguments.delta, the
`.done` events, response.completed or response.incomplete with the usage), each
with its `sequence_number`. What chat cannot carry (built-in tools, item types
other than the above, an image by file id) makes the backend unsupported for the
request: it is skipped, and a route with no backend left answers 400 before
anything is reserved.

**Server-side state.** A request that needs the provider to keep or read state
(`store: true`, `previous_response_id`, `conversation`, a stored `prompt`,
`background`, `item_reference` input items) can be served only by an OpenAI
backend: the other backends of the chain are skipped for it, and a route with
none answers 400 `unsupported_by_route`. A response an OpenAI backend created
and stored (any `store` but false) is remembered by id (`StoredResponses`:
the last 10,000, with the backend), so `GET` and `DELETE /v1/responses/{id}`
reach that backend; an id this sidecar did not return, or has forgotten, is a
404. Answers made through chat are never stored (`"store": false`).
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from kubetoll_core.enums import Provider
from kubetoll_core.router_config import Backend

from ..credentials import MissingCredential
from ..errors import ApiError, bad_request
from ..providers.base import Endpoint, UnsupportedRequest, Usage
from ..providers.openai import classify_openai_error
from ..providers.openai_responses import TERMINAL_EVENTS, OpenAIResponsesTranslator, retrieve_request
from ..sse import StreamFraming
from .base import FromChat, InboundRequest, chat_tool_calls, first_choice, int_field, named_event, obj

if TYPE_CHECKING:
    from ..credentials import CredentialStore
    from ..forwarder import Forwarded
    from ..state import RouterState

__all__ = ["RESPONSES", "ResponsesAdapter", "StoredResponses", "forward_stored", "needs_server_state"]

_ROLES = frozenset({"user", "assistant", "system", "developer"})
# Item types chat can carry (reasoning items are dropped: only the provider that made them can read them).
_CHAT_ITEMS = frozenset({"message", "function_call", "function_call_output", "reasoning"})
_FINISH = {  # chat finish_reason -> (response status, incomplete reason)
    "length": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
}
_ID = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_PIECE_CHARS = 96  # text per delta when a cached answer is replayed
MAX_STORED_IDS = 10_000


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(24)


def needs_server_state(body: Mapping[str, Any]) -> bool:
    """The request asks the provider to keep or read state: only a backend speaking the API natively can serve it."""
    if body.get("store") is True or body.get("background") is True:
        return True
    if any(body.get(k) not in (None, "") for k in ("previous_response_id", "conversation", "prompt")):
        return True
    items = body.get("input")
    return isinstance(items, list) and any(isinstance(i, dict) and i.get("type") == "item_reference" for i in items)


# --------------------------------------------------------------------------- stage 1


def _validate(body: dict[str, Any]) -> None:
    if "n" in body:  # not a parameter of this API (its providers refuse it): one answer per request
        raise bad_request("Unrecognized request argument supplied: n", param="n")
    inp = body.get("input")
    if inp is None:
        if not needs_server_state(body):
            raise bad_request("Missing required parameter: 'input'.", param="input")
    elif isinstance(inp, list):
        for i, item in enumerate(inp):
            _validate_item(item, f"input[{i}]")
    elif not isinstance(inp, str):
        raise bad_request("Invalid type for 'input': expected a string or an array of input items.", param="input")
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise bad_request("Invalid type for 'instructions': expected a string.", param="instructions")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("Invalid type for 'tools': expected an array of tools.", param="tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
                raise bad_request(f"tools[{i}] must be an object with a `type`", param=f"tools[{i}]")
            if tool["type"] == "function" and (not isinstance(tool.get("name"), str) or not tool["name"]):
                raise bad_request(f"Missing required parameter: 'tools[{i}].name'.", param=f"tools[{i}].name")
    cap = body.get("max_output_tokens")
    if cap is not None and (not int_field(cap) or cap < 1):
        raise bad_request("`max_output_tokens` must be an integer >= 1", param="max_output_tokens")


def _validate_item(item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise bad_request(f"Invalid type for '{where}': expected an object.", param=where)
    kind = item.get("type")
    if kind is None or kind == "message":
        role = item.get("role")
        if not isinstance(role, str) or role not in _ROLES:  # a list or an object is unhashable
            raise bad_request(f"{where}.role must be one of {sorted(_ROLES)}", param=f"{where}.role")
        content = item.get("content")
        if not isinstance(content, (str, list)):
            raise bad_request(f"{where}.content must be a string or an array of content parts", param=where)
        if isinstance(content, list) and not all(isinstance(p, dict) for p in content):
            raise bad_request(f"{where}.content must be an array of objects", param=f"{where}.content")
    elif kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise bad_request(f"Missing required parameter: '{where}.{key}'.", param=f"{where}.{key}")
    elif kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise bad_request(f"Missing required parameter: '{where}.call_id'.", param=f"{where}.call_id")
        if not isinstance(item.get("output"), (str, list)):
            raise bad_request(f"Missing required parameter: '{where}.output'.", param=f"{where}.output")
    elif not isinstance(kind, str):
        raise bad_request(f"{where}.type must be a string", param=f"{where}.type")


# --------------------------------------------------------------------------- request -> chat


def _unsupported(strict: bool, what: str) -> None:
    if strict:
        raise UnsupportedRequest(
            f"{what} cannot be carried over chat completions; an OpenAI backend serves it natively"
        )


def _part(part: dict[str, Any], strict: bool) -> dict[str, Any] | None:
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": str(part.get("text") or "")}
    if kind == "refusal":
        return {"type": "text", "text": str(part.get("refusal") or "")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            _unsupported(strict, "an input_image by file id")
            return None
        image: dict[str, Any] = {"url": url}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file = {k: part[k] for k in ("file_data", "file_id", "filename") if isinstance(part.get(k), str)}
        if "file_data" not in file and "file_id" not in file:
            _unsupported(strict, "an input_file by URL")
            return None
        return {"type": "file", "file": file}
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": part.get("input_audio")}
    _unsupported(strict, f"a content part of type {kind!r}")
    return None


def _content(content: Any, strict: bool) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts = [_part(p, strict) for p in content or () if isinstance(p, dict)]
    return [p for p in parts if p is not None]


def _text_only(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p.get("type") == "text")


def chat_messages(body: Mapping[str, Any], strict: bool) -> list[dict[str, Any]]:
    """The request's instructions and input as chat messages."""
    out: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        out.append({"role": "system", "content": instructions})
    inp = body.get("input")
    if isinstance(inp, str):
        out.append({"role": "user", "content": inp})
        return out
    for item in inp if isinstance(inp, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type") or "message"
        if kind == "message":
            role = item.get("role")
            content = _content(item.get("content"), strict)
            if role == "assistant":
                out.append({"role": "assistant", "content": _text_only(content)})
            else:
                out.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"},
            }
            prev = out[-1] if out else None
            if prev is not None and prev["role"] == "assistant":
                prev.setdefault("tool_calls", []).append(call)  # parallel calls, or calls after the text
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_only(_content(output, strict))
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind not in _CHAT_ITEMS:
            _unsupported(strict, f"an input item of type {kind!r}")
    return out


def _chat_tools(tools: Any, strict: bool) -> list[dict[str, Any]]:
    out = []
    for tool in tools or ():
        if not isinstance(tool, dict):
            continue
        if tool.get("type") != "function":
            _unsupported(strict, f"the built-in tool {tool.get('type')!r}")
            continue
        fn = {"name": tool.get("name")}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                fn[key] = tool[key]
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: Any, strict: bool) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    _unsupported(strict, f"tool_choice {choice!r}")
    return None


def _response_format(text: Any) -> dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt["type"]}


def chat_request(body: Mapping[str, Any], provider: Provider | None, strict: bool) -> dict[str, Any]:
    """The chat request a Responses API request stands for. `strict`: UnsupportedRequest for what it cannot carry."""
    if strict and needs_server_state(body):
        raise UnsupportedRequest("the request needs server-side state (store, previous_response_id, ...)")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": chat_messages(body, strict)}
    tools = _chat_tools(body.get("tools"), strict)
    if tools:
        chat["tools"] = tools
        choice = _chat_tool_choice(body.get("tool_choice"), strict)
        if choice is not None:
            chat["tool_choice"] = choice
        if isinstance(body.get("parallel_tool_calls"), bool):
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    cap = body.get("max_output_tokens")
    if cap is not None:
        # Azure's reasoning deployments refuse `max_tokens`; other servers may not know the newer name.
        chat["max_completion_tokens" if provider is Provider.azure_openai else "max_tokens"] = cap
    for key in ("temperature", "top_p", "user", "stream"):
        if body.get(key) is not None:
            chat[key] = body[key]
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    reasoning = body.get("reasoning")
    if provider is Provider.azure_openai and isinstance(reasoning, dict) and reasoning.get("effort"):
        chat["reasoning_effort"] = reasoning["effort"]
    return chat


# --------------------------------------------------------------------------- chat -> response


def _usage(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    }


def _envelope(request: Mapping[str, Any], rid: str, created: int, model: str) -> dict[str, Any]:
    """A response object before its output, echoing the request as OpenAI does."""
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "metadata": request.get("metadata") or {},
        "model": model,
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,  # made through chat: nothing was stored upstream
        "temperature": request.get("temperature", 1.0),
        "text": request.get("text") or {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "top_p": request.get("top_p", 1.0),
        "truncation": request.get("truncation") or "disabled",
        "usage": None,
        "user": request.get("user"),
    }


def _status(finish: Any) -> tuple[str, dict[str, Any] | None]:
    status, reason = _FINISH.get(finish, ("completed", None)) if isinstance(finish, str) else ("completed", None)
    return status, ({"reason": reason} if reason else None)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def from_chat(chat: dict[str, Any], usage: Usage, request: Mapping[str, Any]) -> dict[str, Any]:
    msg, finish = first_choice(chat)
    status, incomplete = _status(finish)
    response = _envelope(request, _new_id("resp_"), int(time.time()), str(chat.get("model") or request.get("model")))
    output: list[dict[str, Any]] = []
    text, refusal = msg.get("content"), msg.get("refusal")
    calls = [c for c in msg.get("tool_calls") or () if isinstance(c, dict)]
    if (isinstance(text, str) and text) or refusal or not calls:
        parts = [_text_part(text if isinstance(text, str) else "")] if text or not refusal else []
        if refusal:
            parts.append({"type": "refusal", "refusal": str(refusal)})
        output.append(
            {"id": _new_id("msg_"), "type": "message", "status": status, "role": "assistant", "content": parts}
        )
    for call in calls:
        fn = call.get("function") or {}
        output.append(
            {
                "id": _new_id("fc_"),
                "type": "function_call",
                "status": "completed",
                "call_id": call.get("id") or _new_id("call_"),
                "name": fn.get("name"),
                "arguments": fn.get("arguments") or "",
            }
        )
    response.update(status=status, incomplete_details=incomplete, output=output, usage=_usage(usage))
    return response


# --------------------------------------------------------------------------- events


class _Events:
    """Writes one response's typed events in order, numbering them, and keeps its output items."""

    __slots__ = ("response", "seq", "items", "_open")

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response  # the envelope; `output` and `usage` are filled in at the end
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # output items, by output_index
        self._open: list[int] = []  # output indexes not yet done, in order

    def ev(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        snapshot = {**self.response, "status": "in_progress", "output": [], "usage": None}
        return [self.ev("response.created", response=snapshot), self.ev("response.in_progress", response=snapshot)]

    def open_message(self, item_id: str | None = None) -> tuple[int, list[dict[str, Any]]]:
        index = len(self.items)
        item: dict[str, Any] = {
            "id": item_id or _new_id("msg_"),
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self.items.append(item)
        self._open.append(index)
        part = _text_part("")
        item["content"].append(dict(part))
        return index, [
            self.ev("response.output_item.added", output_index=index, item={**item, "content": []}),
            self.ev("response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part),
        ]

    def text(self, index: int, delta: str) -> dict[str, Any]:
        item = self.items[index]
        item["content"][0]["text"] += delta
        return self.ev(
            "response.output_text.delta",
            item_id=item["id"],
            output_index=index,
            content_index=0,
            delta=delta,
            logprobs=[],
        )

    def open_call(self, call_id: str, name: str, item_id: str | None = None) -> tuple[int, list[dict[str, Any]]]:
        index = len(self.items)
        item = {
            "id": item_id or _new_id("fc_"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call_id,
            "name": name,
            "arguments": "",
        }
        self.items.append(item)
        self._open.append(index)
        return index, [self.ev("response.output_item.added", output_index=index, item=dict(item))]

    def arguments(self, index: int, delta: str) -> dict[str, Any]:
        item = self.items[index]
        item["arguments"] += delta
        return self.ev("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=delta)

    def add_item(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """An item the stream carries whole (a replayed reasoning or tool-call item of another kind)."""
        index = len(self.items)
        self.items.append(item)
        return [
            self.ev("response.output_item.added", output_index=index, item=item),
            self.ev("response.output_item.done", output_index=index, item=item),
        ]

    def close(self, index: int, status: str = "completed") -> list[dict[str, Any]]:
        if index not in self._open:
            return []
        self._open.remove(index)
        item = self.items[index]
        item["status"] = status
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            common = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(self.ev("response.output_text.done", **common, text=part["text"], logprobs=[]))
            out.append(self.ev("response.content_part.done", **common, part=dict(part)))
        else:
            out.append(
                self.ev(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        out.append(self.ev("response.output_item.done", output_index=index, item=dict(item)))
        return out

    def finish(self, status: str, incomplete: dict[str, Any] | None, usage: Usage | None) -> list[dict[str, Any]]:
        out = []
        for index in list(self._open):
            out.extend(self.close(index, "incomplete" if status == "incomplete" else "completed"))
        self.response.update(
            status=status,
            incomplete_details=incomplete,
            output=self.items,
            usage=_usage(usage) if usage is not None else None,
        )
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return [*out, self.ev(kind, response=self.response)]


class ResponsesFromChat(FromChat):
    """Chat chunks in, the Responses API's typed events out."""

    def __init__(self, inner: Any, request: Mapping[str, Any]) -> None:
        super().__init__(inner)
        self._request = request
        self._events: _Events | None = None
        self._message: int | None = None  # output index of the open message item
        self._calls: dict[int, int] = {}  # chat tool-call index -> output index
        self._finish: Any = None

    def _chunk(self, chunk: dict[str, Any], out: list[dict[str, Any]]) -> None:
        if self._events is None:
            model = str(chunk.get("model") or self._request.get("model"))
            self._events = _Events(_envelope(self._request, _new_id("resp_"), int(time.time()), model))
            out.extend(self._events.start())
        ev = self._events
        content, calls, finish = chat_tool_calls(chunk)
        if content:
            if self._message is None:
                self._message, opened = ev.open_message()
                out.extend(opened)
            out.append(ev.text(self._message, content))
        for call in calls:
            index = call.get("index", 0)
            fn = call.get("function") or {}
            if index not in self._calls:
                if self._message is not None:  # the text is over once the model calls a tool
                    out.extend(ev.close(self._message))
                    self._message = None
                given = call.get("id")
                call_id = given if isinstance(given, str) and given else _new_id("call_")
                self._calls[index], opened = ev.open_call(call_id, str(fn.get("name") or ""))
                out.extend(opened)
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                out.append(ev.arguments(self._calls[index], args))
        if finish:
            self._finish = finish

    def _complete(self, out: list[dict[str, Any]]) -> None:
        if self._events is None:
            self._chunk({}, out)
        assert self._events is not None
        if not self._events.items:  # an empty answer is still a message
            self._message, opened = self._events.open_message()
            out.extend(opened)
        status, incomplete = _status(self._finish)
        out.extend(self._events.finish(status, incomplete, self.usage))


def replay(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole response as its event stream (a cached answer for a streaming request)."""
    ev = _Events({k: v for k, v in body.items() if k not in ("output", "usage")})
    out = ev.start()
    for item in body.get("output") or ():
        if not isinstance(item, dict):
            continue
        kind, item_id = item.get("type"), item.get("id") if isinstance(item.get("id"), str) else None
        parts = item.get("content") or ()
        if kind == "message" and all(isinstance(p, dict) and p.get("type") == "output_text" for p in parts):
            index, opened = ev.open_message(item_id)
            out.extend(opened)
            text = "".join(str(p.get("text") or "") for p in parts)
            out.extend(ev.text(index, text[i : i + _PIECE_CHARS]) for i in range(0, len(text), _PIECE_CHARS))
            out.extend(ev.close(index, str(item.get("status") or "completed")))
        elif kind == "function_call":
            index, opened = ev.open_call(str(item.get("call_id") or ""), str(item.get("name") or ""), item_id)
            out.extend(opened)
            if item.get("arguments"):
                out.append(ev.arguments(index, str(item["arguments"])))
            out.extend(ev.close(index))
        else:  # a refusal, a reasoning item, a built-in tool's call: whole
            out.extend(ev.add_item(item))
    kind = "response.incomplete" if body.get("status") == "incomplete" else "response.completed"
    out.append(ev.ev(kind, response={**body, "output": ev.items}))
    return out


# --------------------------------------------------------------------------- the outside


class ResponsesFraming:
    """Named events (`event: response.output_text.delta`), no `[DONE]`; a cut stream ends with an `error` event."""

    __slots__ = ("_seq",)

    done = b""

    def __init__(self) -> None:
        self._seq = -1  # the highest sequence_number sent

    def encode(self, chunk: dict[str, Any] | bytes) -> bytes:
        event = obj(orjson.loads(chunk) if isinstance(chunk, (bytes, bytearray, memoryview)) else chunk)
        seq = event.get("sequence_number")
        if int_field(seq) and seq > self._seq:
            self._seq = seq
        return named_event(event)

    def error_event(self, message: str, type: str, code: str) -> bytes:
        self._seq += 1
        error = {"type": type, "code": code, "message": message, "param": None}
        # The reference's fields at the top level, and the nested object OpenAI sends (which the SDK raises).
        return named_event(
            {"type": "error", "code": code, "message": message, "param": None, "sequence_number": self._seq}
            | {"error": error}
        )


class _Assembler:
    """A streamed response, kept whole: its terminal event carries all of it."""

    __slots__ = ("_body", "_broken")

    def __init__(self) -> None:
        self._body: dict[str, Any] | None = None
        self._broken = False

    def feed(self, event: dict[str, Any] | bytes) -> None:
        got = obj(orjson.loads(event) if isinstance(event, (bytes, bytearray, memoryview)) else event)
        kind = got.get("type")
        if kind == "error":
            self._broken = True
        elif kind in TERMINAL_EVENTS and isinstance(got.get("response"), dict):
            self._body = got["response"]

    def body(self) -> dict[str, Any] | None:
        return None if self._broken else self._body


def _conversation(body: Mapping[str, Any]) -> list[Any] | None:
    inp = body.get("input")
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    if not isinstance(inp, list):
        return None
    turns: list[Any] = []
    for item in inp:
        if isinstance(item, dict) and (item.get("type") or "message") == "message":
            content = item.get("content")
            if isinstance(content, list):
                content = [
                    {"type": "text", "text": p.get("text")}
                    if isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
                    else p
                    for p in content
                ]
            turns.append({"role": item.get("role"), "content": content})
        else:
            turns.append(item)  # tool calls and their outputs: context that must match exactly
    return turns


class ResponsesAdapter:
    endpoint = Endpoint.responses
    max_tokens_field = "max_output_tokens"
    turns_field = "input"
    native: Mapping[Provider, type[Any]] = {Provider.openai: OpenAIResponsesTranslator}

    def parse(self, body: dict[str, Any]) -> InboundRequest:
        _validate(body)
        return InboundRequest(chat_request(body, None, strict=False), body.get("max_output_tokens"))

    def check_route(self, body: dict[str, Any], route: str, backends: Sequence[Backend]) -> None:
        if any(b.provider in self.native for b in backends):
            return  # a native backend serves whatever the API takes
        try:
            chat_request(body, None, strict=True)
        except UnsupportedRequest as exc:
            listed = ", ".join(f"{b.name} ({b.provider.value})" for b in backends)
            param = "input" if not needs_server_state(body) else None
            raise ApiError(
                400,
                f"route `{route}` cannot serve this Responses API request: {exc}, and none of its backends "
                f"is an OpenAI backend ({listed})",
                "invalid_request_error",
                "unsupported_by_route",
                param,
            ) from None

    def to_chat(self, body: dict[str, Any], provider: Provider) -> dict[str, Any]:
        return chat_request(body, provider, strict=True)

    def from_chat(self, chat: dict[str, Any], usage: Usage, request: dict[str, Any]) -> dict[str, Any]:
        return from_chat(chat, usage, request)

    def stream_from_chat(self, inner: Any, request: dict[str, Any]) -> ResponsesFromChat:
        return ResponsesFromChat(inner, request)

    def framing(self) -> StreamFraming:
        return ResponsesFraming()

    def error_response(self, err: ApiError, headers: dict[str, str]) -> web.Response:
        return err.response(headers)  # OpenAI's error format: the sidecar's own

    def output_texts(self, body: Any) -> list[str]:
        if not isinstance(body, dict) or body.get("object") != "response":
            return []
        texts = []
        for item in body.get("output") or ():
            if not isinstance(item, dict):
                continue
            if item.get("type") == "function_call":
                texts.append(str(item.get("name") or "") + str(item.get("arguments") or ""))
            for part in item.get("content") or () if item.get("type") == "message" else ():
                if isinstance(part, dict):
                    texts.append(str(part.get("text") or part.get("refusal") or ""))
        return texts

    def uncacheable_reason(self, body: Mapping[str, Any]) -> str:
        # Its answer depends on what the provider holds, or the client wants it kept there.
        return "server_state" if needs_server_state(body) else ""

    def conversation(self, body: Mapping[str, Any]) -> list[Any] | None:
        return _conversation(body)

    def is_complete(self, body: Any) -> bool:
        if not isinstance(body, dict) or body.get("object") != "response" or not body.get("output"):
            return False
        if body.get("status") == "completed":
            return True
        details = body.get("incomplete_details")
        # As for chat, an answer cut at its length limit is repeated; one a filter stopped is not.
        return (
            body.get("status") == "incomplete"
            and isinstance(details, dict)
            and details.get("reason") == ("max_output_tokens")
        )

    def refreshed(self, body: dict[str, Any], now: float) -> dict[str, Any]:
        # A new id (no backend holds it: the cache's copy is not retrievable, hence store false).
        return {**body, "id": "resp_kt" + secrets.token_hex(22), "created_at": int(now), "store": False}

    def replay(self, body: dict[str, Any]) -> bytes:
        return b"".join(named_event(e) for e in replay(body))

    def assembler(self) -> _Assembler:
        return _Assembler()


RESPONSES = ResponsesAdapter()


# --------------------------------------------------------------------------- stored responses


class StoredResponses:
    """The responses an OpenAI backend created and stored for this sidecar's callers: id -> backend."""

    def __init__(self, max_ids: int = MAX_STORED_IDS) -> None:
        self.max_ids = max_ids
        self._ids: OrderedDict[str, str] = OrderedDict()

    def remember(self, endpoint: str, fwd: Forwarded) -> None:
        """After a Responses API request was forwarded: keep its id when its backend stored it."""
        if endpoint != Endpoint.responses or fwd.backend.config.provider not in RESPONSES.native:
            return
        response = fwd.body
        if response is None and fwd.stream is not None:
            first = fwd.stream.pending[0] if fwd.stream.pending else None
            response = first.get("response") if isinstance(first, dict) else None
        if not isinstance(response, dict) or response.get("store") is False:
            return
        rid = response.get("id")
        if isinstance(rid, str) and _ID.match(rid):
            self._ids[rid] = fwd.backend.config.name
            self._ids.move_to_end(rid)
            while len(self._ids) > self.max_ids:
                self._ids.popitem(last=False)

    def backend(self, rid: str) -> str | None:
        return self._ids.get(rid)

    def forget(self, rid: str) -> None:
        self._ids.pop(rid, None)


def _not_found(rid: str) -> ApiError:
    return ApiError(
        404,
        f"Response with id '{rid}' not found: this sidecar did not return it, or no longer remembers which "
        "backend did (responses made through chat completions are not stored)",
        "invalid_request_error",
        "response_not_found",
        "response_id",
    )


async def forward_stored(
    request: web.Request, state: RouterState, stored: StoredResponses, credentials: CredentialStore
) -> web.Response:
    """`GET` or `DELETE /v1/responses/{id}`: on the backend that created the response, answered as it answers."""
    rid = request.match_info["response_id"]
    name = stored.backend(rid) if _ID.match(rid) else None
    rt = state.backends.get(name) if name is not None else None
    if rt is None:
        raise _not_found(rid)
    if request.method == "GET" and request.query.get("stream") not in (None, "false"):
        raise bad_request("a stored response is retrieved whole here (`stream` is not supported)", param="stream")
    b = rt.config
    try:
        api_key = credentials.get(b.credentials)
    except MissingCredential as exc:  # names the file or variable, never a value
        raise ApiError(503, str(exc), "service_unavailable", "credentials_unavailable") from None
    upstream = retrieve_request(b, request.method, rid, api_key)
    t = b.timeouts
    try:
        async with rt.session.request(
            upstream.method,
            upstream.url,
            params=[(k, v) for k, v in request.query.items() if k != "stream"],
            headers=upstream.headers,
            timeout=aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.first_token),
        ) as resp:
            raw = await resp.read()
            status = resp.status
            headers = resp.headers
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ApiError(
            502, f"backend {b.name} could not be reached: {type(exc).__name__}", "server_error", "upstream_error"
        ) from None
    if status >= 400:
        err = classify_openai_error(status, headers, raw).openai_error
        if status == 404:
            stored.forget(rid)
        raise ApiError(
            status,
            str(err.get("message")),
            str(err.get("type") or "upstream_error"),
            err.get("code"),
            err.get("param"),
            headers={"x-kubetoll-backend": b.name},
        )
    if request.method == "DELETE":
        stored.forget(rid)
    return web.Response(
        status=status, body=raw, content_type="application/json", headers={"x-kubetoll-backend": b.name}
    )
