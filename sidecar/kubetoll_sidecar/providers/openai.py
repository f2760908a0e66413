"""OpenAI and every server that speaks its API (vLLM, TGI, Ollama, llama.cpp), and Azure OpenAI.

The request body passes through nearly untouched: the model id is swapped for
the backend's, and streams ask for usage (`stream_options.include_usage`) so
settlement uses the provider's count. A usage chunk the client did not ask for
is not forwarded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from kubetoll_core.enums import FailureClass
from kubetoll_core.router_config import Backend

from ..retry_after import retry_after_from_headers
from .base import ALL_CAPABILITIES, Endpoint, UpstreamError, UpstreamRequest, Usage

# Keyed by str (an Endpoint is one): the translators take the endpoint as the client called it.
_PATHS: dict[str, str] = {
    Endpoint.chat: "/chat/completions",
    Endpoint.completions: "/completions",
    Endpoint.embeddings: "/embeddings",
}
_CONTEXT_RE = re.compile(r"context length|context_length|maximum context|too many tokens|prompt is too long", re.I)


def parse_usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    details = u.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(u.get("prompt_tokens") or 0),
        completion_tokens=int(u.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
    )


def openai_error_object(body: bytes, status: int) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(err, dict):
        return {
            "message": str(err.get("message") or f"upstream returned HTTP {status}"),
            "type": err.get("type") or "upstream_error",
            "param": err.get("param"),
            "code": err.get("code"),
        }
    if isinstance(err, str):  # some servers (TGI, older vLLM) send {"error": "text"}
        return {"message": err, "type": "upstream_error", "param": None, "code": None}
    snippet = body[:200].decode("utf-8", "replace")
    return {
        "message": f"upstream returned HTTP {status}: {snippet}",
        "type": "upstream_error",
        "param": None,
        "code": None,
    }


def classify_openai_error(status: int, headers: Mapping[str, str] | None, body: bytes) -> UpstreamError:
    obj = openai_error_object(body, status)
    code = str(obj.get("code") or "")
    typ = str(obj.get("type") or "")
    msg = obj["message"]
    failure: FailureClass | None = None
    if status == 429:
        if code == "insufficient_quota" or typ == "insufficient_quota":
            failure = FailureClass.budget_exhausted
        else:
            failure = FailureClass.rate_limited
    elif status == 402:
        failure = FailureClass.budget_exhausted
    elif status == 408:
        failure = FailureClass.timeout
    elif status >= 500:
        failure = FailureClass.server_error
    elif status in (400, 413, 422) and (code == "context_length_exceeded" or _CONTEXT_RE.search(msg)):
        failure = FailureClass.context_length_exceeded
    return UpstreamError(status, failure, msg, retry_after_from_headers(headers), obj)


# An error sent inside a stream carries no HTTP status of its own: its type and code say
# whose fault it is. A client error must not be taken for a server one (it would count
# toward opening the backend's circuit for every caller, and be fallen back from).
_STREAM_CLIENT_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
}
_STREAM_CLIENT_CODES = {"invalid_api_key": 401, "model_not_found": 404}


def classify_stream_error(err: dict[str, Any]) -> UpstreamError:
    """An in-stream `{"error": ...}` object, classified as its HTTP twin would be."""
    msg = str(err.get("message") or "upstream stream error")
    obj = {
        "message": msg,
        "type": err.get("type") or "server_error",
        "param": err.get("param"),
        "code": err.get("code"),
    }
    code, typ = str(obj["code"] or ""), str(obj["type"])
    if code == "insufficient_quota" or typ == "insufficient_quota":
        return UpstreamError(429, FailureClass.budget_exhausted, msg, None, obj)
    if code == "rate_limit_exceeded" or typ in ("rate_limit_error", "requests", "tokens"):
        return UpstreamError(429, FailureClass.rate_limited, msg, None, obj)
    if code == "context_length_exceeded" or (typ == "invalid_request_error" and _CONTEXT_RE.search(msg)):
        return UpstreamError(400, FailureClass.context_length_exceeded, msg, None, obj)
    status = _STREAM_CLIENT_CODES.get(code) or _STREAM_CLIENT_STATUS.get(typ)
    if status is not None:
        return UpstreamError(status, None, msg, None, obj)
    return UpstreamError(502, FailureClass.server_error, msg, None, obj)


class OpenAIStream:
    """Passes OpenAI chunks through, keeping the usage and dropping what the client did not ask for."""

    __slots__ = ("usage", "done", "text_chars", "text", "_include_usage", "_error")

    def __init__(self, include_usage: bool) -> None:
        self.usage: Usage | None = None
        self.done = False
        self.text_chars = 0
        self.text: list[str] = []  # what was streamed, to count tokens when the server reports no usage
        self._include_usage = include_usage
        self._error: UpstreamError | None = None

    def feed(self, event: str | None, data: bytes) -> list[Any]:
        if data == b"[DONE]":
            self.done = True
            return []
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._error = UpstreamError(502, FailureClass.server_error, "upstream sent a malformed stream event")
            return []
        if not isinstance(chunk, dict):
            return []
        if "error" in chunk and "choices" not in chunk:
            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            self._error = classify_stream_error(err)
            return []
        choices = chunk.get("choices") or ()
        for c in choices:
            delta = c.get("delta")
            if delta:
                content = delta.get("content")
                if content:
                    self.text_chars += len(content)
                    self.text.append(content)
                for tc in delta.get("tool_calls") or ():
                    fn = tc.get("function") or {}
                    piece = (fn.get("name") or "") + (fn.get("arguments") or "")
                    self.text_chars += len(piece)
                    self.text.append(piece)
            elif c.get("text"):  # legacy completions
                self.text_chars += len(c["text"])
                self.text.append(c["text"])
        u = chunk.get("usage")
        if u:
            self.usage = parse_usage(u)
            if not choices and not self._include_usage:
                return []
        # Pass the upstream's bytes on unchanged: no re-encoding on the hot path.
        return [data]

    def error(self) -> UpstreamError | None:
        return self._error


class OpenAITranslator:
    """OpenAI itself and OpenAI-compatible servers at a plain URL."""

    # The request passes through: whatever the server cannot do, it says so itself.
    capabilities = ALL_CAPABILITIES

    def url(self, backend: Backend, endpoint: str) -> str:
        return backend.endpoint + _PATHS[endpoint]

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"} if api_key else {}

    def build_request(
        self, backend: Backend, endpoint: str, body: dict[str, Any], api_key: str | None, stream: bool
    ) -> UpstreamRequest:
        if stream and endpoint != Endpoint.embeddings:
            opts = dict(body.get("stream_options") or {})
            opts["include_usage"] = True
            body = {**body, "stream_options": opts}
        headers = {"content-type": "application/json", **backend.headers, **self.auth_headers(api_key)}
        return UpstreamRequest("POST", self.url(backend, endpoint), headers, orjson.dumps(body))

    def parse_response(self, endpoint: str, body: bytes, model_alias: str) -> tuple[dict[str, Any], Usage]:
        data = orjson.loads(body)
        if not isinstance(data, dict):
            raise ValueError("upstream response is not a JSON object")
        usage = parse_usage(data.get("usage"))
        if usage is None:
            usage = Usage(reported=False)
        return data, usage

    def stream_translator(self, model_alias: str, include_usage: bool) -> OpenAIStream:
        return OpenAIStream(include_usage)

    def classify_error(self, status: int, headers: Mapping[str, str] | None, body: bytes) -> UpstreamError:
        return classify_openai_error(status, headers, body)


class AzureOpenAITranslator(OpenAITranslator):
    """Azure OpenAI: deployment URLs, an `api-version` query parameter, the `api-key` header."""

    def url(self, backend: Backend, endpoint: str) -> str:
        az = backend.azure
        assert az is not None  # enforced by the config model
        return f"{backend.endpoint}/openai/deployments/{az.deployment}{_PATHS[endpoint]}?api-version={az.api_version}"

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"api-key": api_key} if api_key else {}
