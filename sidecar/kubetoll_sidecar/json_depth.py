"""How deep a JSON document nests, from its bytes, without walking the parsed object.

orjson parses documents nested up to 1024 levels but serialises only 255, and
every request body is serialised again (upstream, cache keys): a body nested
deeper than the bound gets a 400 at parse instead of a 500 later. The check
runs on the raw bytes at C speed (bytes.count, replace, translate, split), so a
4 MB body of token arrays costs a few milliseconds at most, and a body with
fewer brackets than the bound costs two counts.
"""

from __future__ import annotations

MAX_JSON_DEPTH = 128  # well below orjson's 255, so what wraps the body (a translator, a cache key) still fits

# Everything but brackets and quotes is deleted before the depth is measured.
_KEEP = b'"[]{}'
_DROP = bytes(b for b in range(256) if b not in _KEEP)
_SAME_BRACKETS = bytes.maketrans(b"{}", b"[]")


def nests_deeper_than(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the (valid) JSON document `raw` has containers nested more than `limit` deep."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    # Escapes first, so that only the quotes that open and close strings remain: an
    # escaped backslash, then an escaped quote (valid JSON has backslashes only in strings).
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _DROP)
    # Outside strings: every other piece between quotes. Then one bracket kind only.
    brackets = b"".join(text.split(b'"')[::2]).translate(_SAME_BRACKETS)
    # Each pass removes the innermost level (str.replace does not rescan what it wrote).
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)
