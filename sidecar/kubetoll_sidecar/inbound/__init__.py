"""The inbound APIs the sidecar serves besides OpenAI chat completions: one adapter per API.

`base.py` says how an adapter fits the one pipeline; `responses.py` is OpenAI's
Responses API, `messages.py` Anthropic's Messages API. The rest of the sidecar
asks this module, by endpoint, for the few things that differ per API: the
translator a backend gets (`translator_for`, used by the forwarder), the error
format (`error_response`), the stream framing (`stream_framing`) and what the
cache needs (`adapter_for`). For the OpenAI endpoints the answers are None (or
the OpenAI default), and nothing changes.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from kubetoll_core.enums import Provider

from ..errors import ApiError
from ..providers.base import Endpoint, Translator
from ..sse import StreamFraming
from . import base
from .base import InboundAdapter, InboundRequest
from .messages import MESSAGES
from .responses import RESPONSES

__all__ = [
    "InboundAdapter",
    "InboundRequest",
    "adapter_for",
    "body_texts",
    "endpoint_for_path",
    "error_response",
    "stream_framing",
    "translator_for",
]

_ADAPTERS: dict[str, InboundAdapter] = {Endpoint.responses: RESPONSES, Endpoint.messages: MESSAGES}
# URL prefixes of each inbound API, for answers made before the pipeline runs (404, 405, draining).
_PATHS = (("/v1/messages", Endpoint.messages), ("/v1/responses", Endpoint.responses))


def adapter_for(endpoint: str) -> InboundAdapter | None:
    """The adapter of an inbound API's endpoint; None for the OpenAI endpoints the pipeline speaks itself."""
    return _ADAPTERS.get(endpoint)


def translator_for(endpoint: str, provider: Provider, chat_translator: type[Any]) -> Translator:
    """The translator of one backend for one request (the forwarder's only use of an adapter)."""
    adapter = _ADAPTERS.get(endpoint)
    if adapter is None:
        translator: Translator = chat_translator()
        return translator
    return base.translator_for(adapter, provider, chat_translator)


def endpoint_for_path(path: str) -> str | None:
    for prefix, endpoint in _PATHS:
        if path == prefix or path.startswith(prefix + "/"):
            return endpoint
    return None


def error_response(endpoint: str | None, err: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    """`err` in the format of the API the client called."""
    adapter = _ADAPTERS.get(endpoint) if endpoint is not None else None
    if adapter is None:
        return err.response(headers)
    return adapter.error_response(err, headers or {})


def stream_framing(endpoint: str) -> StreamFraming | None:
    """A new framing for one stream of an inbound API; None for OpenAI chat's."""
    adapter = _ADAPTERS.get(endpoint)
    return adapter.framing() if adapter is not None else None


def body_texts(body: Any) -> list[str]:
    """The generated text of an inbound API's answer (by its shape); [] for any other body."""
    for adapter in _ADAPTERS.values():
        texts = adapter.output_texts(body)
        if texts:
            return texts
    return []
