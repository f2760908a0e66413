"""Keeping the database password out of logs, metrics and errors.

The URL comes from a Secret and holds the password; what the sink logs is the
URL with its password replaced (`redact_url`), and any error text scrubbed of
the password (`scrub`), because a driver's message may quote what it was given.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL (or `key=value` conninfo) with its password as `***`."""
    if "://" not in url:
        return _CONNINFO_PASSWORD.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<database URL that does not parse>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = _CONNINFO_PASSWORD.sub(r"\1***", parts.query.replace("&", " ")).replace(" ", "&") if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def passwords_of(url: str) -> list[str]:
    """The password of the URL, as written and decoded (empty when it has none)."""
    found: list[str] = []
    if "://" in url:
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = None
        if parts is not None:
            userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
            if ":" in userinfo:
                found.append(userinfo.split(":", 1)[1])
            query = parts.query
        else:
            query = ""
        for m in re.finditer(r"(?:^|&)password=([^&]*)", query, re.IGNORECASE):
            found.append(m.group(1))
    else:
        for m in _CONNINFO_PASSWORD.finditer(url):
            found.append(m.group(2).strip("'"))
    out: list[str] = []
    for p in found:
        for v in (p, unquote(p)):
            if v and v not in out:
                out.append(v)
    return sorted(out, key=len, reverse=True)  # the longer first, so a part of it is never left behind


def scrub(text: str, url: str) -> str:
    """`text` with the URL's password (as written or decoded) replaced by `***`."""
    for p in passwords_of(url):
        text = text.replace(p, "***")
    return text
