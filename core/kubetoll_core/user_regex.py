"""Regular expressions written by platform teams, run on RE2.

A route rule's `regex` is searched in the last user message and a header rule's
in a header value: text the caller chooses. Python's backtracking engine can
take exponential time on such patterns (`^(a+)+$` against 25 characters blocked
the event loop for about a second), so every user regex is compiled by RE2,
which matches in time linear in the input whatever the pattern. The price is
RE2's syntax: no backreferences and no lookaround; a pattern that needs them is
refused when the resource or config is validated, with RE2's reason.
"""

from __future__ import annotations

from typing import Any

import re2

# A pattern over this much compiled memory is refused rather than grown (RE2's
# default is 8 MiB; a route rule has no business near it).
MAX_PROGRAM_BYTES = 2 * 1024 * 1024


class UserRegexError(ValueError):
    """The pattern is not valid RE2 syntax (the message says why)."""


def compile_user_regex(pattern: str) -> Any:
    """The compiled pattern (its `search(text)` is what callers use); raises UserRegexError."""
    options = re2.Options()
    options.log_errors = False  # the reason is in the exception; stderr stays quiet
    options.max_mem = MAX_PROGRAM_BYTES
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise UserRegexError(
            f"not a valid regular expression (RE2 syntax: no backreferences or lookaround): {reason}"
        ) from None
