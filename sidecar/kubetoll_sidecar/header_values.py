"""Header values the sidecar records: text, or a 400 that names the header.

The tenant, tier and request id headers end up in the spend ledger, the access
log, metrics and the answer's own headers. aiohttp decodes header bytes that are
not UTF-8 into lone surrogates (Python's surrogateescape), which no UTF-8 writer
accepts: such a value, or one with control characters, is refused at the door
rather than failing later in a write nobody can answer for.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping

from .errors import bad_request

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LEN = 256  # echoed in every answer and written to every record and log line


def is_text(value: str) -> bool:
    """UTF-8 text without control characters (no lone surrogates, no C0/C1 controls)."""
    if value.isascii():
        return value.isprintable()
    return not any(unicodedata.category(c) in ("Cc", "Cs") for c in value)


def text_header(headers: Mapping[str, str], name: str, max_len: int | None = None) -> str | None:
    """The header's value (None when absent); 400 `invalid_header` when it is not text or too long."""
    value = headers.get(name)
    if value is None:
        return None
    if not is_text(value):
        raise bad_request(
            f"the {name} header must be UTF-8 text without control characters", param=name, code="invalid_header"
        )
    if max_len is not None and len(value) > max_len:
        raise bad_request(f"the {name} header must be at most {max_len} characters", param=name, code="invalid_header")
    return value


def usable_request_id(headers: Mapping[str, str]) -> str | None:
    """The app's request id when it may be echoed and recorded; None when absent or not (stage 1 answers 400)."""
    value = headers.get(REQUEST_ID_HEADER)
    if value and len(value) <= MAX_REQUEST_ID_LEN and is_text(value):
        return value
    return None
