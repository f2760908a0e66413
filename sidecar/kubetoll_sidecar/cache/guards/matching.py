"""When two content words are the same word: inflection, typos, compounds, initials.

Two words match when they are equal, or

* share a stem and differ only by an inflection of the language: a stem of
  4+ letters may differ by "s", "ed", "ing" ("opens" / "open", "ship" /
  "shipped"; German "e", "en", "t"...), one of 5+ letters also by derivations
  ("delivery" / "delivered", "cancellation" / "cancel", Spanish "cancelación" /
  "cancelar");
* are one typo apart, with the same first letter: a letter dropped or added
  (words of 5+ letters: "adress", "anual"), two swapped (6+: "cancle",
  "recieve"), a letter replaced by a sound-alike (6+: "organise", "targeta")
  or by anything in words of 9+ letters; in shorter words an arbitrary
  substitution is as often another word ("charged" / "changed");
* are a compound on one side and two adjacent words on the other ("username"
  / "user name", "E-Mail-Adresse" / "E-Mail Adresse");
* are an acronym on one side and the initials of adjacent words on the other
  ("VAT" / "value added tax").

Prefixes are never stripped: "subscribe" / "unsubscribe", "activate" /
"deactivate", "including" / "excluding" stay different words.
"""

from __future__ import annotations

from collections.abc import Sequence

from .lexicon import Lang

_CLITICS = ("la", "lo", "las", "los", "le", "les", "me", "te", "se", "nos")


def same_word(x: str, y: str, lang: Lang) -> bool:
    if x == y:
        return True
    if x[0] != y[0]:  # no rule here changes a first letter
        return False
    return _same_stem(x, y, lang) or _one_typo(x, y)


def _same_stem(x: str, y: str, lang: Lang) -> bool:
    p = 0
    for cx, cy in zip(x, y, strict=False):
        if cx != cy:
            break
        p += 1
    rx, ry = x[p:], y[p:]
    last = x[p - 1] if p else ""
    if p >= 4 and _inflection(rx, last, lang.suffix4) and _inflection(ry, last, lang.suffix4):
        return True
    if p >= 5:
        return _derivation(rx, last, lang) and _derivation(ry, last, lang)
    return False


def _inflection(rest: str, last: str, suffixes: frozenset[str]) -> bool:
    # a doubled consonant too: ship / shipped, plan / planning
    return not rest or rest in suffixes or (rest[0] == last and rest[1:] in suffixes)


def _derivation(rest: str, last: str, lang: Lang) -> bool:
    if not rest or rest in lang.suffix5:
        return True
    if rest[0] == last and rest[1:] in lang.suffix5:  # a doubled consonant: cancel / cancelled
        return True
    if lang.code == "es":  # an object pronoun glued on: cancelar / cancelarla
        for c in _CLITICS:
            if rest.endswith(c) and (rest[: -len(c)] in lang.suffix5):
                return True
    return False


def _one_typo(x: str, y: str) -> bool:
    """One slip of the keyboard: a letter dropped or doubled, two letters swapped, or a letter
    replaced (by a sound-alike in a word of 6+ letters, by anything in one of 9+)."""
    n = min(len(x), len(y))
    if len(x) == len(y):
        if n < 6:
            return False
        diff = [i for i in range(n) if x[i] != y[i]]
        if len(diff) == 2 and diff[1] == diff[0] + 1:
            return x[diff[0]] == y[diff[1]] and x[diff[1]] == y[diff[0]]  # two letters swapped
        return len(diff) == 1 and (n >= 9 or frozenset((x[diff[0]], y[diff[0]])) in _SOUND_ALIKE)
    if n < 5 or abs(len(x) - len(y)) != 1:
        return False
    short, long_ = (x, y) if len(x) < len(y) else (y, x)
    for i in range(len(short)):
        if short[i] != long_[i]:
            return short[i:] == long_[i + 1 :]
    return True  # the extra letter is the last one


# Letters spelled for one another across English, German, Spanish and French
# ("organise" / "organize", "licence" / "license", "tarjeta" / "targeta").
_SOUND_ALIKE = frozenset(frozenset(p) for p in ("sz", "sc", "ck", "gj", "bv", "iy", "kq", "zc"))


# Inexact matching compares every word of one side with every word of the other: past this many
# pairs (two texts of 200 content words) only equal words match, so a long message costs
# milliseconds, never a second of the event loop; its typos are then misses, never wrong answers.
FUZZY_PAIRS = 40_000


def fuzzy(xs: Sequence[str], ys: Sequence[str]) -> bool:
    """Whether inexact matching between these two word lists is affordable (FUZZY_PAIRS)."""
    return len(xs) * len(ys) <= FUZZY_PAIRS


def has_match(x: str, ys: Sequence[str], yset: set[str] | frozenset[str], lang: Lang, inexact: bool) -> bool:
    """`x` is one of `ys` (their set: `yset`), or matches one when `inexact`."""
    return x in yset or (inexact and any(same_word(x, y, lang) for y in ys))


def unmatched(xs: Sequence[str], ys: Sequence[str], lang: Lang) -> list[int]:
    """Indices of the words of `xs` that have no match in `ys`."""
    if not xs:
        return []
    yset = set(ys)
    left = [i for i, x in enumerate(xs) if x not in yset]
    if left and fuzzy(xs, ys):
        left = [i for i in left if not any(same_word(xs[i], y, lang) for y in ys)]
    if not left:
        return left
    covered = _compounds(xs, ys, yset) | _initials(xs, ys)
    return [i for i in left if i not in covered]


def _compounds(xs: Sequence[str], ys: Sequence[str], yset: set[str]) -> set[int]:
    out: set[int] = set()
    for i in range(len(xs) - 1):
        if xs[i] + xs[i + 1] in yset:
            out.update((i, i + 1))
    pairs = {ys[j] + ys[j + 1] for j in range(len(ys) - 1)}
    out.update(i for i, x in enumerate(xs) if x in pairs)
    return out


def _initials(xs: Sequence[str], ys: Sequence[str]) -> set[int]:
    """An acronym on one side spelled out on the other, either way round."""
    out: set[int] = set()
    short_x = {x for x in xs if 2 <= len(x) <= 5}
    short_y = {y for y in ys if 2 <= len(y) <= 5}
    if short_x:
        runs = _runs(ys)
        out.update(i for i, x in enumerate(xs) if x in runs)
    if short_y:
        for start in range(len(xs)):
            for n in range(2, min(5, len(xs) - start) + 1):
                if "".join(w[0] for w in xs[start : start + n]) in short_y:
                    out.update(range(start, start + n))
    return out


def _runs(words: Sequence[str]) -> set[str]:
    return {
        "".join(w[0] for w in words[start : start + n])
        for start in range(len(words))
        for n in range(2, min(5, len(words) - start) + 1)
    }
