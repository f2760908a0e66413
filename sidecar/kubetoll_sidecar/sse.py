"""Server-sent events: an incremental decoder for upstream streams and an encoder for the client.

Upstreams deliver bytes in arbitrary chunks; an event may be split across reads
or several may arrive in one. The decoder buffers until a blank line ends an
event (per the WHATWG EventSource rules: `event:` and `data:` fields, multi-line
data joined by newlines, comments ignored).
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson


class SSEDecoder:
    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[tuple[str | None, bytes]]:
        """Returns the complete events in `chunk` (plus what was buffered) as (event, data)."""
        buf = self._buf + chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[tuple[str | None, bytes]] = []
        while True:
            end = buf.find(b"\n\n")
            if end < 0:
                break
            block, buf = buf[:end], buf[end + 2 :]
            ev = _parse_block(block)
            if ev is not None:
                events.append(ev)
        self._buf = buf
        return events

    def flush(self) -> list[tuple[str | None, bytes]]:
        """An event the upstream did not terminate with a blank line (cut stream or sloppy server)."""
        buf, self._buf = self._buf, b""
        ev = _parse_block(buf.strip(b"\n")) if buf.strip() else None
        return [ev] if ev else []

    @property
    def pending(self) -> int:
        return len(self._buf)


def _parse_block(block: bytes) -> tuple[str | None, bytes] | None:
    event: str | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    if not data and event is None:
        return None
    return event, b"\n".join(data)


def encode_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"


class StreamFraming(Protocol):
    """How one stream's events go to the client: OpenAI chat's `data:` lines ending with `[DONE]`
    (stream_relay.ChatFraming), or an inbound API's own named events (inbound/)."""

    done: bytes  # what ends a complete stream (nothing for an API whose last event says so)

    def encode(self, chunk: dict[str, Any] | bytes) -> bytes:
        """One event: a dict, or bytes already holding its JSON."""
        ...

    def error_event(self, message: str, type: str, code: str) -> bytes:
        """The event a stream cut short ends with, in the shape the API's SDKs raise."""
        ...
