"""The ledger codec writes whatever it is given, and round-trips every record it does not call defective.

`encode_record_checked` must never raise and must always produce valid UTF-8
text (what Redis, the SYNC script's JSON and every reader need); a record it had
to alter names the fields in `defects`, and the store quarantines it. Values
here are the ones that broke flushes or could: lone surrogates (aiohttp's
decoding of a header byte that is not UTF-8), control characters, huge strings
and integers, non-finite floats, values of the wrong type.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Any

import orjson
import pytest

from kubetoll_core.spend_record import (
    _RECORD_VALUES,
    MAX_TEXT_CHARS,
    SpendRecord,
    _encode_careful,
    decode_record,
    encode_record,
    encode_record_checked,
)

BASE = SpendRecord(
    time=1_790_000_000.123456,
    namespace="team-a",
    route="chat",
    backend="primary",
    tenant="alice",
    tier="free",
    prompt_tokens=12,
    completion_tokens=34,
    cached_tokens=5,
    cost_usd=0.000123456789,
    cache_hit="exact",
    avoided_usd=0.5,
    downgraded=True,
    fallbacks=2,
    outcome="ok",
    request_id="req-1",
)


def pairs(fields: list[str]) -> dict[str, str]:
    assert len(fields) % 2 == 0
    return dict(zip(fields[::2], fields[1::2]))


def assert_writable(fields: list[str]) -> None:
    """What a flush does with an entry: every field is a str that UTF-8 and orjson accept."""
    assert all(type(f) is str for f in fields)
    for f in fields:
        f.encode("utf-8")
    orjson.dumps({"recs": [fields]})


ODD_BUT_TEXT = [
    "",
    "é",
    "日本語のテナント",
    "🙂👩‍👩‍👧",  # with zero-width joiners
    "a\x00b",
    "\x01\x1f\x7f\x85",
    "line\nbreak\r\ttab",
    "\u2028\u2029",
    "\ufeffbom",
    'quote"back\\slash',
    "x" * MAX_TEXT_CHARS,
]


@pytest.mark.parametrize("text", ODD_BUT_TEXT, ids=[repr(t)[:20] for t in ODD_BUT_TEXT])
@pytest.mark.parametrize("field", ["tenant", "request_id", "route", "tier", "outcome", "refused_meter"])
def test_odd_text_round_trips_exactly(field: str, text: str) -> None:
    r = replace(BASE, **{field: text})
    fields, defects = encode_record_checked(r, "sc-1")
    assert defects == ()
    assert_writable(fields)
    assert decode_record(pairs(fields)) == r


@pytest.mark.parametrize(
    "value",
    [
        0.0,
        -0.0,
        0.1 + 0.2,
        1e-12,
        123456.789e10,
        5e-324,
    ],
)
def test_floats_round_trip_exactly(value: float) -> None:
    r = replace(BASE, cost_usd=value, avoided_usd=value, time=value)
    fields, defects = encode_record_checked(r, "sc")
    assert defects == ()
    back = decode_record(pairs(fields))
    assert back == r and math.copysign(1, back.cost_usd) == math.copysign(1, value)


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("t\udcff", "t\\udcff"),  # aiohttp's surrogateescape of b"t\xff"
        ("\ud800", "\\ud800"),
        ("ok\udc80\udcfe", "ok\\udc80\\udcfe"),
        ("é\udcff🙂", "é\\udcff🙂"),
    ],
)
def test_lone_surrogates_are_escaped_and_reported(text: str, written: str) -> None:
    r = replace(BASE, tenant=text, request_id=text)
    fields, defects = encode_record_checked(r, "sc")
    assert_writable(fields)
    assert defects == ("tenant", "request_id")
    back = decode_record(pairs(fields))
    assert back.tenant == written and back.request_id == written
    assert back.cost_usd == r.cost_usd and back.prompt_tokens == r.prompt_tokens  # the rest intact


def test_huge_text_is_cut_with_a_mark() -> None:
    r = replace(BASE, tenant="t" * 1_000_000, request_id="\udcff" * 1000)
    fields, defects = encode_record_checked(r, "sc")
    assert_writable(fields)
    assert defects == ("tenant", "request_id")
    f = pairs(fields)
    assert len(f["tenant"]) == MAX_TEXT_CHARS and f["tenant"].endswith("…")
    assert len(f["request_id"]) == MAX_TEXT_CHARS and f["request_id"].startswith("\\udcff")


@pytest.mark.parametrize(
    ("changes", "defects", "expect"),
    [
        ({"cost_usd": math.nan}, ("cost_usd",), {"cost_usd": "0.0", "cost_nusd": "0"}),
        ({"cost_usd": math.inf}, ("cost_usd",), {"cost_usd": "0.0", "cost_nusd": "0"}),
        ({"time": -math.inf, "avoided_usd": math.nan}, ("time", "avoided_usd"), {"time": "0.0", "avoided_usd": "0.0"}),
        ({"cost_usd": 1e300}, ("cost_nusd",), {"cost_usd": "1e+300", "cost_nusd": "0"}),
        ({"prompt_tokens": 10**5000}, ("prompt_tokens",), {"prompt_tokens": "0"}),
        ({"fallbacks": True}, ("fallbacks",), {"fallbacks": "0"}),
        ({"downgraded": "yes"}, ("downgraded",), {"downgraded": "0"}),
        ({"tenant": None}, ("tenant",), {"tenant": "None"}),
        ({"tenant": b"t\xff"}, ("tenant",), {"tenant": "b't\\xff'"}),
        ({"completion_tokens": "7"}, ("completion_tokens",), {"completion_tokens": "0"}),
        ({"time": 1_700_000_000}, (), {"time": "1700000000.0"}),  # an int time is a float time
    ],
)
def test_values_of_the_wrong_kind_are_written_and_reported(
    changes: dict[str, Any], defects: tuple[str, ...], expect: dict[str, str]
) -> None:
    r = replace(BASE, **changes)
    fields, got = encode_record_checked(r, "sc")
    assert_writable(fields)
    assert got == defects
    f = pairs(fields)
    for k, v in expect.items():
        assert f[k] == v


def test_a_value_whose_str_fails_is_written_as_its_type() -> None:
    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no")

    fields, defects = encode_record_checked(replace(BASE, tenant=Hostile()), "sc")  # type: ignore[arg-type]
    assert_writable(fields)
    assert defects == ("tenant",) and pairs(fields)["tenant"] == "<Hostile>"


def test_odd_sidecar_id_and_optional_fields() -> None:
    r = replace(BASE, refused_budget="b\udcff", refused_meter="cap:usd:2026-11-22")
    fields, defects = encode_record_checked(r, "sc\udcff")
    assert_writable(fields)
    assert defects == ("refused_budget", "sidecar")
    assert pairs(fields)["sidecar"] == "sc\\udcff"


def test_the_fast_and_the_careful_path_write_the_same_entry() -> None:
    for text in ODD_BUT_TEXT:
        r = replace(BASE, tenant=text, refused_meter=text)
        fast = encode_record_checked(r, "sc")
        careful = _encode_careful(r, _RECORD_VALUES(r), "sc")
        assert fast == careful
        assert encode_record(r, "sc") == fast.fields


POOL: list[Any] = [
    *ODD_BUT_TEXT,
    "t\udcff",
    "\ud83d",  # half a surrogate pair
    "z" * (MAX_TEXT_CHARS + 1),
    None,
    b"\xff",
    0,
    -1,
    2**63,
    10**4500,
    True,
    1.5,
    math.nan,
    -math.inf,
    1e308,
    [1, "\udcff"],
    {"k": "v"},
    object(),
]


def test_encode_never_raises_and_is_always_writable() -> None:
    rng = random.Random(13)
    names = [f for f in SpendRecord.__dataclass_fields__]
    for _ in range(3000):
        changes = {name: rng.choice(POOL) for name in rng.sample(names, rng.randint(1, len(names)))}
        r = replace(BASE, **changes)
        fields, defects = encode_record_checked(r, rng.choice(["sc", "s\udcff", "x" * 5000]))
        assert_writable(fields)
        back = decode_record(pairs(fields))
        if not defects:
            assert back == r, changes
