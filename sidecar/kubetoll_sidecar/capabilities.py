"""What a request needs of a backend, and the 400 for a request no backend of its route can serve.

Decided before anything is reserved or sent (between routing and the rate limits),
from what each backend's translator declares (`Translator.capabilities`). Without
it such a request went to every backend in turn, each skipped it as unsupported,
and the client got a 502 `all_backends_failed`, which SDKs retry: three requests
for a call that can never succeed. A 400 says what to change.

`n > 1` is served by a backend whose provider has `n` and, up to `MAX_FAN_OUT`
choices, by one that fans out (one upstream call per choice, forwarder.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubetoll_core.router_config import Backend

from . import inbound
from .errors import ApiError
from .forwarder import capabilities_of
from .providers.base import ALL_CAPABILITIES, MAX_FAN_OUT, Capability, Endpoint, requested_choices, upstream_calls

# How the error names each capability, and the request field a client changes to do without it.
_NAMES: dict[Capability, tuple[str, str | None]] = {
    Capability.chat: ("chat completions (/v1/chat/completions)", None),
    Capability.completions: ("legacy completions (/v1/completions)", None),
    Capability.embeddings: ("embeddings (/v1/embeddings)", None),
    Capability.multiple_choices: ("more than one choice (n > 1)", "n"),
    Capability.legacy_functions: (
        "the legacy functions API (`functions`, `function_call` or messages with the `function` role; use tools)",
        "messages",
    ),
    Capability.audio_output: ('audio output (`audio`, `modalities: ["audio"]`)', "modalities"),
}
_ENDPOINT_CAPABILITY = {
    Endpoint.chat: Capability.chat,
    Endpoint.completions: Capability.completions,
    Endpoint.embeddings: Capability.embeddings,
    # An inbound API is served natively by its own provider's backends and through chat by any other.
    Endpoint.responses: Capability.chat,
    Endpoint.messages: Capability.chat,
}


def required(endpoint: str, body: dict[str, Any]) -> list[Capability]:
    """The capabilities this request needs, the endpoint's first."""
    need = [_ENDPOINT_CAPABILITY[Endpoint(endpoint)]]
    if requested_choices(body) > 1:
        need.append(Capability.multiple_choices)
    if body.get("functions") is not None or body.get("function_call") is not None or _has_function_role(body):
        need.append(Capability.legacy_functions)
    modalities = body.get("modalities")
    if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        need.append(Capability.audio_output)
    return need


def check_route(endpoint: str, body: dict[str, Any], route: str, backends: Sequence[Backend]) -> None:
    """Raises the 400 when no backend of `backends` (the rule's chain) has every capability the request needs."""
    adapter = inbound.adapter_for(endpoint)
    if adapter is not None:  # what chat cannot carry (server-side state, built-in tools) needs a native backend
        adapter.check_route(body, route, backends)
    caps = [(b, capabilities_of(b.provider)) for b in backends]
    if not caps or any(c >= ALL_CAPABILITIES for _, c in caps):
        return  # the common case: a pass-through backend serves anything, nothing to inspect
    need = required(endpoint, body)
    n = requested_choices(body)
    if n > 1:
        # A backend without `n` that fans out serves up to MAX_FAN_OUT choices as well as one that has it.
        caps = [(b, c | {Capability.multiple_choices} if upstream_calls(c, n) else c) for b, c in caps]
    if any(c.issuperset(need) for _, c in caps):
        return
    # Name what is missing everywhere if there is such a thing (the usual case), else per backend.
    missing_everywhere = [cap for cap in need if all(cap not in c for _, c in caps)]
    listed = ", ".join(f"{b.name} ({b.provider.value})" for b, _ in caps)
    if missing_everywhere:
        cap = missing_everywhere[0]
        what, param = _NAMES[cap]
        if cap is Capability.multiple_choices and any(Capability.fan_out_choices in c for _, c in caps):
            what = (
                f"{n} choices (n > {MAX_FAN_OUT}: backends without `n` make one upstream call per choice, "
                f"at most {MAX_FAN_OUT})"
            )
        message = f"route `{route}` cannot serve {what}: none of its backends supports it ({listed})"
    else:
        per_backend = "; ".join(
            f"{b.name} ({b.provider.value}) lacks {', '.join(_NAMES[x][0] for x in need if x not in c)}"
            for b, c in caps
        )
        param = None
        message = f"route `{route}` has no backend that can serve all of this request: {per_backend}"
    raise ApiError(400, message, "invalid_request_error", "unsupported_by_route", param)


def _has_function_role(body: dict[str, Any]) -> bool:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    return any(isinstance(m, dict) and m.get("role") == "function" for m in messages)
