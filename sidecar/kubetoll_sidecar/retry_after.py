"""Retry-After, read the one way every translator and the forwarder read it.

A provider's Retry-After decides how long a backend's circuit stays open, for
every caller of the sidecar, and is passed on to the client. So a value that is
not a sane wait must never get that far: `inf` once opened a circuit for ever
(and `math.ceil(inf)` turned the answer into a 500), `1e9` for 31 years.

What is read (RFC 9110 section 10.2.3, plus what providers send):

* `retry-after-ms`: milliseconds (OpenAI and Azure OpenAI send it next to
  Retry-After, with more precision); it wins when both are readable.
* `retry-after`: delay-seconds (decimals accepted: providers send `1.5`) or an
  HTTP-date. A date is measured from the response's own `Date` header when it
  has one (so a skewed clock on either side does not matter), else from `now`.

What comes out: seconds, at most `maximum`; an infinite or larger value is cut
to `maximum` (the provider did say "come back later"); a negative, NaN or
unreadable value is None (ignored: the failure then counts like any other).
A date in the past is 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = ["RETRY_AFTER_CEILING", "clamp_retry_after", "parse_retry_after", "retry_after_from_headers"]

# The most any configuration may allow (circuitBreaker.maxRetryAfterSeconds has this bound):
# a translator, which does not know the backend's setting, cuts at this; the forwarder then
# cuts at the backend's own maximum.
RETRY_AFTER_CEILING = 86400.0

_MAX_HEADER_CHARS = 64  # an HTTP-date is 29 characters; anything much longer is not a Retry-After


def parse_retry_after(
    value: str | None, *, now: float | None = None, date: str | None = None, maximum: float = RETRY_AFTER_CEILING
) -> float | None:
    """One Retry-After value in seconds (see the module doc), or None when it is not a usable wait.

    `now` is the wall clock (epoch seconds) an HTTP-date is measured from when the
    response has no readable `date`; it defaults to the system clock, which is what
    the upstream's dates are in.
    """
    if value is None:
        return None
    text = str(value).strip()
    if not text or len(text) > _MAX_HEADER_CHARS:
        return None
    try:
        seconds: float | None = float(text)
    except ValueError:
        seconds = _seconds_until(text, now, date)
    return clamp_retry_after(seconds, maximum)


def clamp_retry_after(seconds: float | None, maximum: float) -> float | None:
    """None for NaN, negative or no value; otherwise at most `maximum` (inf included)."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, maximum)


def retry_after_from_headers(
    headers: Mapping[str, str] | None, *, now: float | None = None, maximum: float = RETRY_AFTER_CEILING
) -> float | None:
    """The wait a response asks for: `retry-after-ms`, else `retry-after`; None when neither is usable."""
    if headers is None:
        return None
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        seconds = parse_retry_after(ms, maximum=maximum * 1000.0)
        if seconds is not None:
            return min(seconds / 1000.0, maximum)
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    return parse_retry_after(raw, now=now, date=_header(headers, "date"), maximum=maximum)


def _seconds_until(text: str, now: float | None, date: str | None) -> float | None:
    when = _http_date(text)
    if when is None:
        return None
    sent = _http_date(date) if date is not None else None
    if sent is None:
        sent = time.time() if now is None else now
    # A date in the past means "now": 0, which the breaker treats as no wait of its own.
    return max(when - sent, 0.0)


def _http_date(text: str) -> float | None:
    """Epoch seconds of an HTTP-date (IMF-fixdate, or the obsolete RFC 850 / asctime forms)."""
    try:
        when = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        # HTTP-dates are GMT; a date without a zone is read as GMT too.
        return when.timestamp() if when.tzinfo is not None else when.replace(tzinfo=UTC).timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Header `name` (lower case): a case-insensitive mapping finds it at once, a plain dict by a scan."""
    value = headers.get(name)
    if value is not None:
        return str(value)
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name:
            return str(value)
    return None
