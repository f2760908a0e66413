"""Numbers, times, dates, ordinals, ids and codes, read the same way on both sides.

`parse(token, lang)` turns a token with a digit in it into one canonical value:

* ``("num", "1234")``: "1,234" (English), "1.234" (German, Spanish, French),
  "#1234"; decimals keep their digits ("19.99"), leading zeros are kept
  because they make another id ("0045" is not "45");
* ``("num", "256 gb")``: a number glued to a unit ("256GB", "12-month");
* ``("ord", "2")``: "2nd", "1er", "2e", "3º";
* ``("time", "19:00")``: "7pm", "7:00pm", "19:00", "19h", "19h30" (12 h
  clocks are turned into 24 h);
* ``("date", "2024-03-05")``: ISO dates, d.m.y, and d/m/y or (English) m/d/y;
* ``("code", "inv-2023-0045")``: anything else with a digit.

Times written apart ("7 am", "19 Uhr"), units after a number ("49 euros") and
month names are joined by the reader, which sees the neighbouring tokens.
"""

from __future__ import annotations

import re

_TIME_12 = re.compile(r"^(\d{1,2})(?::(\d{2}))?(am|pm|a\.m|p\.m)\.?$")
_TIME_24 = re.compile(r"^(\d{1,2})[:h](\d{2})$")
_TIME_H = re.compile(r"^(\d{1,2})h$")
_ISO_DATE = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$")
_DATE = re.compile(r"^(\d{1,2})[./\-](\d{1,2})[./\-](\d{2}|\d{4})$")
_DAY_MONTH = re.compile(r"^(\d{1,2})[./](\d{1,2})$")
_ORDINAL = re.compile(r"^(\d+)(?:st|nd|rd|th|er|re|e|eme|ème|º|ª)$")
_NUMBER = re.compile(r"^#?(\d+(?:[.,]\d+)*)$")
_NUMBER_UNIT = re.compile(r"^#?(\d+(?:[.,]\d+)?)-?([^\W\d_]+)$")


def parse(tok: str, lang: str) -> tuple[str, str]:
    m = _TIME_12.match(tok)
    if m and 1 <= int(m.group(1)) <= 12:
        return "time", clock(int(m.group(1)), int(m.group(2) or 0), m.group(3)[0])
    m = _TIME_24.match(tok)
    if m and int(m.group(1)) <= 24 and int(m.group(2)) < 60:
        return "time", clock(int(m.group(1)), int(m.group(2)), "")
    m = _TIME_H.match(tok)
    if m and int(m.group(1)) <= 24:
        return "time", clock(int(m.group(1)), 0, "")
    m = _ORDINAL.match(tok)
    if m:
        return "ord", str(int(m.group(1)))
    m = _ISO_DATE.match(tok)
    if m:
        got = _date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        if got:
            return "date", got
    m = _DATE.match(tok)
    if m:
        a, b, y = int(m.group(1)), int(m.group(2)), int(m.group(3))
        y = y + 2000 if y < 100 else y
        month, day = (a, b) if lang == "en" and "/" in tok else (b, a)  # dotted dates are day first anywhere
        got = _date(y, month, day)
        if got:
            return "date", got
    m = _NUMBER.match(tok)  # after the dates: "05.03.2024" is a date, "1.234.567" a number
    if m:
        return "num", number(m.group(1), lang)
    m = _DAY_MONTH.match(tok)
    if m and "/" in tok:
        a, b = int(m.group(1)), int(m.group(2))
        month, day = (a, b) if lang == "en" else (b, a)
        if 1 <= month <= 12 and 1 <= day <= 31:
            return "date", f"{month:02d}-{day:02d}"
    m = _NUMBER_UNIT.match(tok)
    if m:
        return "num", f"{number(m.group(1), lang)} {m.group(2)}"
    return "code", tok.lstrip("#")


def number(digits: str, lang: str) -> str:
    """One spelling per value: "1,234" and "1234" (English), "12,50" and "12.5" (German) agree."""
    if "," not in digits and "." not in digits:
        return digits
    seps = [c for c in digits if c in ",."]
    groups = re.split(r"[.,]", digits)
    if len(set(seps)) == 2:  # "1,234.56" / "1.234,56": the last one is the decimal mark
        dec = seps[-1]
        whole, _, frac = digits.rpartition(dec)
        return _decimal(re.sub(r"[.,]", "", whole), frac)
    sep = seps[0]
    if len(seps) > 1 or all(len(g) == 3 for g in groups[1:]):
        grouping = "," if lang in ("en", "") else "."
        if len(seps) > 1 or sep == grouping:
            return "".join(groups)
    return _decimal(groups[0], groups[1]) if len(groups) == 2 else digits


def _decimal(whole: str, frac: str) -> str:
    frac = frac.rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def clock(hour: int, minute: int, half: str) -> str:
    if half == "a":
        hour %= 12
    elif half == "p":
        hour = hour % 12 + 12
    return f"{hour % 24:02d}:{minute:02d}"


def _date(y: int, m: int, d: int) -> str | None:
    if 1 <= m <= 12 and 1 <= d <= 31:
        return f"{y:04d}-{m:02d}-{d:02d}"
    return None
