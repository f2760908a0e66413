"""Pipeline stage 1: parse and validate an OpenAI API request (or an inbound API's: inbound/).

Checks what the router needs and what OpenAI itself would refuse with a 400
(missing model or messages, wrong types), and leaves every other field to the
upstream, so new OpenAI parameters pass through without a sidecar release.
Parsing is plain orjson plus a few checks: pydantic models for whole requests
would cost more than the rest of the pipeline.

Broken input is the caller's fault and gets a 4xx here, never a 500 later: a
body that does not decode as its `Content-Encoding` (400) or an encoding aiohttp
does not decode (415), JSON nested deeper than what is serialised again (400),
a request id that is not text (400), and a `Content-Length` over the limit
(413, before any `100 Continue`: `expect_continue`).
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError

from . import inbound
from .errors import ApiError, bad_request
from .header_values import MAX_REQUEST_ID_LEN, REQUEST_ID_HEADER, text_header
from .json_depth import MAX_JSON_DEPTH, nests_deeper_than
from .providers.base import Endpoint

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# The codings aiohttp's request parser decodes before the body reaches a handler (br
# and zstd only with their libraries; without them aiohttp itself answers 400). Any
# other coding would reach us still encoded.
_DECODED_ENCODINGS = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})


@dataclass(slots=True)
class ParsedRequest:
    endpoint: str
    body: dict[str, Any]  # the client's request as sent
    upstream_body: dict[str, Any]  # what goes upstream (the route's cap applied)
    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    n: int
    max_tokens: int | None
    messages: list[dict[str, Any]]
    body_size: int = 0  # bytes of the JSON body as received
    # An inbound API's request (inbound/): its chat equivalent, which `messages` is from. None for OpenAI's APIs.
    chat: dict[str, Any] | None = None
    max_tokens_field: str | None = None  # where an inbound API keeps its output cap

    @property
    def chat_view(self) -> dict[str, Any]:
        """The request as chat: what the estimate (tools), the route rules and tenancy (`user`) read."""
        return self.chat if self.chat is not None else self.body

    def set_max_tokens(self, value: int) -> None:
        self.max_tokens = value
        key = self.max_tokens_field or (
            "max_completion_tokens" if "max_completion_tokens" in self.body else "max_tokens"
        )
        self.upstream_body = {**self.upstream_body, key: value}


def _too_large(request: web.Request, limit: int) -> ApiError | None:
    if request.content_length is not None and request.content_length > limit:
        return ApiError(
            413,
            f"request body is {request.content_length} bytes; the limit is {limit}",
            "invalid_request_error",
            "request_too_large",
        )
    return None


async def expect_continue(request: web.Request, limit: int) -> web.StreamResponse | None:
    """aiohttp's `Expect` handler with the size check first: a body over the limit gets its
    413 instead of `100 Continue` (the client never sends it), and the connection closes."""
    api = inbound.endpoint_for_path(request.path)  # an inbound API's errors are in its own format
    too_large = _too_large(request, limit)
    if too_large is not None:
        resp = inbound.error_response(api, too_large)
        resp.force_close()  # the unsent body must not be waited for
        return resp
    expect = request.headers.get("expect", "")
    if request.version >= (1, 1) and expect.lower() != "100-continue":
        unsupported = ApiError(
            417, f"unsupported Expect: {expect!r} (only 100-continue)", "invalid_request_error", "expectation_failed"
        )
        return inbound.error_response(api, unsupported)
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own handler: the answer has not started
    return None


_NOTHING_TO_WAIT_FOR: AbstractAsyncContextManager[None] = contextlib.nullcontext()


def body_deadline(request: web.Request, seconds: float) -> AbstractAsyncContextManager[Any]:
    """`asyncio.timeout(seconds)` around reading a body still arriving; nothing to bound when the
    whole body came with the head (the usual case: a timer and a context switch saved)."""
    return _NOTHING_TO_WAIT_FOR if request.content.is_eof() else asyncio.timeout(seconds)


async def read_body(request: web.Request, limit: int) -> bytes:
    too_large = _too_large(request, limit)
    if too_large is not None:
        raise too_large
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in _DECODED_ENCODINGS:
        raise ApiError(
            415,
            f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)",
            "invalid_request_error",
            "unsupported_content_encoding",
        )
    content = request.content
    chunks = []
    size = 0
    try:
        if content.is_eof():  # all of it is in (decoded, when it had a Content-Encoding)
            raw = content.read_nowait()
            if len(raw) > limit:
                raise _over_limit(limit)
            return raw
        async for chunk in content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                raise _over_limit(limit)
            chunks.append(chunk)
    except web.RequestPayloadError as exc:
        if isinstance(exc.__cause__, ContentEncodingError):
            raise bad_request(
                f"the request body does not decode as its Content-Encoding {encoding!r}",
                code="invalid_content_encoding",
            ) from None
        raise bad_request("the request body is malformed (its framing or length)", code="malformed_body") from None
    return b"".join(chunks)


def _over_limit(limit: int) -> ApiError:
    message = f"request body exceeds the limit of {limit} bytes"
    return ApiError(413, message, "invalid_request_error", "request_too_large")


def _int_field(body: dict[str, Any], name: str, minimum: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise bad_request(f"`{name}` must be an integer >= {minimum}", param=name)
    return v


async def parse_request(request: web.Request, endpoint: str, limit: int) -> ParsedRequest:
    body, size = await read_json(request, limit)
    parsed = validate_body(body, endpoint)
    parsed.body_size = size
    return parsed


async def read_json(request: web.Request, limit: int) -> tuple[Any, int]:
    """The request's JSON body and its size in bytes, with the checks every JSON endpoint makes."""
    text_header(request.headers, REQUEST_ID_HEADER, MAX_REQUEST_ID_LEN)  # echoed and recorded: text only
    raw = await read_body(request, limit)
    ctype = request.headers.get("content-type", "application/json")
    if "json" not in ctype:
        raise bad_request(f"expected a JSON body (content-type application/json), got {ctype!r}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if nests_deeper_than(raw, MAX_JSON_DEPTH):
        raise bad_request(f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep", code="json_too_deep")
    return body, len(raw)


def validate_body(body: Any, endpoint: str) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", param="model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("`stream` must be a boolean", param="stream")
    if endpoint == Endpoint.embeddings and stream:
        raise bad_request("embeddings cannot be streamed", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad_request("`stream_options` must be an object", param="stream_options")
    if opts and not stream:
        raise bad_request("`stream_options` is only allowed when `stream` is true", param="stream_options")
    include_usage = bool(opts and opts.get("include_usage"))
    adapter = inbound.adapter_for(endpoint)
    if adapter is not None:  # an inbound API: its own checks, and its chat equivalent for the stages that read one
        got = adapter.parse(body)
        return ParsedRequest(
            endpoint,
            body,
            body,
            model,
            stream,
            False,
            1,
            got.max_tokens,
            got.chat["messages"],
            chat=got.chat,
            max_tokens_field=adapter.max_tokens_field,
        )
    n = _int_field(body, "n", 1) or 1
    max_tokens = _int_field(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens", 1)
    messages: list[dict[str, Any]] = []
    if endpoint == Endpoint.chat:
        messages = body.get("messages")  # type: ignore[assignment]
        if not isinstance(messages, list) or not messages:
            raise bad_request("`messages` must be a non-empty array", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
            role = m.get("role")
            if not isinstance(role, str) or role not in _ROLES:
                raise bad_request(f"messages[{i}].role must be one of {sorted(_ROLES)}", param=f"messages[{i}].role")
            content = m.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise bad_request(
                    f"messages[{i}].content must be a string or an array of parts", param=f"messages[{i}].content"
                )
            if content is None and role in ("user", "system", "developer"):
                raise bad_request(f"messages[{i}].content is required for role {role}", param=f"messages[{i}].content")
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise bad_request("`tools` must be an array", param="tools")
    elif endpoint == Endpoint.completions:
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
            raise bad_request("`prompt` must be a string or a non-empty array", param="prompt")
    elif endpoint == Endpoint.embeddings:
        inp = body.get("input")
        if not isinstance(inp, (str, list)) or (isinstance(inp, list) and not inp) or inp == "":
            raise bad_request("`input` must be a non-empty string or array", param="input")
    return ParsedRequest(endpoint, body, body, model, stream, include_usage, n, max_tokens, messages)
