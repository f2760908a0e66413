"""One pass over a question's tokens: the facts the guards compare.

The reader decides the language (the one of `lexicon.LANGS` whose function
words the text uses most; none when it is unclear, and then English lists
are used, which in a text with no English function word change nothing), then
walks the tokens once and files each into one of:

* numbers (with the unit glued to them, "49 usd", "2 user"), times, dates;
* negation, per clause: a clause is cut at punctuation and conjunctions, so
  "opens but won't sync" negates "sync" and not "opens";
* tense markers (past, future, English "going to" before a verb) and deictic
  days (yesterday, tomorrow...);
* the kind of question (when, why, who, where, how many...);
* roles: the word after "from", "to", "for", "instead of" (and their
  German, Spanish, French kin), within three tokens; in English, a content
  word with "'s" owns what follows ("o");
* content words: what is left once function words, fillers, framing words,
  negators, numbers and question words are taken out; light verbs ("get",
  "use") apart, since they count only when swapped for another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .lexicon import BY_CODE, EN, LANGS, MARKS, UNITS, Lang, fold
from .numbers import clock, parse

# A participle after these is passive ("will be charged"), not a past tense.
_EN_PASSIVE = frozenset("am is are be been being was were get gets got getting".split())
# After "going to", a determiner starts a place ("going to the bank"); anything else, a verb (a future).
_EN_DETERMINERS = frozenset("the a an my your our their his her its this that these those some any every each".split())
_FR_AUX = frozenset("ai as a avons avez ont suis est sommes etes sont ete".split())
_ES_MORNING = frozenset("la esta cada por".split())  # "por la mañana": the morning, not tomorrow
_NOT_A_SECOND = frozenset("a an per one every un una une cada".split())  # "a second": time, not 2nd
_CLOCK = re.compile(r"^(\d{1,2})(?:[.:](\d{2}))?$")
_CLOCK_WORDS = frozenset({"uhr", "oclock"})  # after a number, a clock time in any language


@dataclass(slots=True)
class Reading:
    lang: str = ""
    clear: bool = False  # the language is clear, not a guess
    words: list[str] = field(default_factory=list)
    light: list[str] = field(default_factory=list)
    negated: bool = False
    negated_words: list[int] = field(default_factory=list)  # indices into words
    numbers: list[str] = field(default_factory=list)
    times: list[str] = field(default_factory=list)
    dates: list[str] = field(default_factory=list)
    past: bool = False
    future: bool = False
    anchors: set[str] = field(default_factory=set)
    kinds: set[str] = field(default_factory=set)
    roles: list[str] = field(default_factory=list)  # "s3": words[3] follows "from"; "d", "f", "i": to, for, instead
    first_person: bool = False  # the asker speaks of themself (I, me, my): "s-1" is "from me"
    modality: set[str] = field(default_factory=set)  # "may" (can, could...), "must" (must, have to...)


def detect(folded: list[str]) -> tuple[str, bool]:
    """The language whose function words the text uses most ("" for none), and whether clearly so.

    Spanish and French share many ("de", "la", "que", "y"), so the lists are
    chosen by the plain majority; only a clear one (two function words or
    more, twice the runner-up's score) lets the language guard turn a pair
    down for it.
    """
    scores = [0] * len(LANGS)
    for w in folded:
        for i, weight in MARKS.get(w, ()):
            scores[i] += weight
    best = max(scores)
    if best == 0:
        return "", False
    second = sorted(scores)[-2]
    return LANGS[scores.index(best)].code, best >= 4 and best >= 2 * second


def read(toks: list[tuple[str, str]]) -> Reading:
    owners_at: set[int] = set()  # token indices of words an "'s" follows
    if any(k == "o" for k, _ in toks):
        kept: list[tuple[str, str]] = []
        for k, t in toks:
            if k != "o":
                kept.append((k, t))
            elif kept and kept[-1][0] in ("w", "A"):
                owners_at.add(len(kept) - 1)
        toks = kept
    folded = [fold(t) if k in ("w", "A") else "" for k, t in toks]
    code, clear = detect([f for f, (k, _) in zip(folded, toks, strict=True) if k == "w"])
    lang = BY_CODE[code] if code else EN
    r = Reading(lang=code, clear=clear)
    n = len(toks)
    clause = 0
    negated_clauses: set[int] = set()
    word_clause: list[int] = []
    sentence_start = True
    role: tuple[str, int] | None = None  # a role preposition waiting for its word ("s", "db"...), where it stood
    role_words: list[tuple[str, int, int, bool]] = []  # (role, word index, clause, weak)
    currency: tuple[str, int] | None = None  # a "$" waiting for its number
    bindable = -2  # token index of the last number a unit may still attach to
    starts = lang.question_starts

    def phrase_at(i: int, words: tuple[str, ...]) -> bool:
        end = i + len(words)
        return end <= n and all(toks[i + k][0] == "w" and folded[i + k] == w for k, w in enumerate(words))

    i = 0
    while i < n:
        kind, low = toks[i]
        if kind in ("x", "c"):
            clause += 1
            role = None
            sentence_start = True  # a question word may open a clause too: "I was charged twice, why?"
            i += 1
            continue
        if kind == "n":
            negated_clauses.add(clause)
            i += 1
            continue
        if kind == "$":
            unit = UNITS[low]
            if bindable == i - 1:
                r.numbers[-1] += " " + unit
                bindable = -2
            else:
                currency = (unit, i)
            i += 1
            continue
        if kind == "d":
            before = len(r.numbers)
            i = _digits(r, toks, folded, i, lang, currency)
            # A plain number just read may still take a unit ("5 GB"); a code, a time or "49 usd" may not.
            fresh = len(r.numbers) > before and not r.numbers[-1].startswith("#") and " " not in r.numbers[-1]
            bindable = i - 1 if fresh else -2
            currency = None
            continue

        acronym = kind == "A"
        w = folded[i]
        prev = folded[i - 1] if i else ""
        # set phrases first: "not sure", "thank you", "guten Morgen"
        phrases = lang.phrase_starts.get(w)
        if phrases:
            skip = next((len(p) for p in phrases if phrase_at(i, p)), 0)
            if skip:
                i += skip
                continue
        # the kind of question, where a question word asks
        if w in starts:
            asks = sentence_start or prev in lang.ask
            hit = next(((p, k) for p, k in lang.questions if phrase_at(i, p) and (asks or p in lang.anywhere)), None)
            if hit is not None:
                p, k = hit
                end = i + len(p)
                if k == "quantity" and end < n and folded[end] in lang.time_units:
                    k, end = "time", end + 1  # "how many days" asks how long
                nxt = folded[end] if end < n else ""
                after = folded[end + 1] if end + 1 < n else ""
                procedure = (
                    k == "place" and nxt in lang.proc_next and (not lang.proc_person or after in lang.proc_person)
                )
                if not procedure:
                    r.kinds.add(k)
                sentence_start = False
                i = end
                continue
        role_phrases = lang.role_starts.get(w)
        if role_phrases:
            hit_role = next(((p, k) for p, k in role_phrases if phrase_at(i, p)), None)
            if hit_role is not None:
                role = (hit_role[1], i + len(hit_role[0]) - 1)
                i += len(hit_role[0])
                continue
        if w in lang.negators:
            nxt_kind = toks[i + 1][0] if i + 1 < n else "x"
            if w == "no" and nxt_kind in ("x", "c"):
                i += 1  # "No, I meant...": an answer, not a negation
                continue
            negated_clauses.add(clause)
            i += 2 if (w == "no" and i + 1 < n and folded[i + 1] == "longer") else 1
            continue
        if w in lang.splitters:
            clause += 1
            role = None
            i += 1
            continue
        if w in lang.anchors and not (lang.code == "es" and prev in _ES_MORNING):
            day = lang.anchors[w]
            r.anchors.add(day)
            r.past = r.past or day.startswith("-")
            r.future = r.future or day.startswith("+")
            i += 1
            continue
        month = lang.months.get(w)
        if month and (w != "may" or _next_to_number(toks, i)):
            i = _month(r, toks, i, month, bindable, lang)
            bindable = -2
            continue
        if w in lang.weekdays:
            r.dates.append(f"w{lang.weekdays[w]}")
            i += 1
            continue
        if w in lang.ordinals and not (lang.ordinals[w] == 2 and prev in _NOT_A_SECOND):
            r.numbers.append(f"o{lang.ordinals[w]}")
            bindable = i
            i += 1
            continue
        if w in lang.numbers:
            value = str(lang.numbers[w])
            if currency is not None and currency[1] == i - 1:
                value += " " + currency[0]
            r.numbers.append(value)
            bindable = i if " " not in value else -2
            i += 1
            continue
        _tense(r, lang, w, low, prev)
        nxt_word = folded[i + 1] if i + 1 < n else ""
        if lang is EN and w == "going" and nxt_word == "to" and i + 2 < n and folded[i + 2] not in _EN_DETERMINERS:
            r.future = True  # "is going to be returned"; "going to the bank" is a place, not a tense
        if sentence_start and nxt_word not in lang.addressee:
            _modality(r, lang, w, nxt_word, folded, i)
        if w in lang.roles:
            role = (lang.roles[w], i)
        if w in lang.first_person:
            r.first_person = True
            if role is not None and role[1] == i - 1 and w in lang.first_object:
                role_words.append((role[0][0], -1, clause, False))  # "for me": the asker holds the role
                role = None
        if w in lang.filler:
            i += 1  # a filler ("OK" too) leaves the sentence start where it was: "Hmm, why..."
            continue
        # "need" frames only before "to": "I need to cancel" asks to cancel, "Do I need a visa?" asks about need
        framing = w in lang.framing and lang.framing_before.get(w, nxt_word) == nxt_word
        if not acronym and (w in lang.stop or framing or (len(w) < 2 and not _is_ideograph(w))):
            sentence_start = False
            i += 1
            continue
        if w in lang.light and not acronym:
            r.light.append(w)
            sentence_start = False
            i += 1
            continue
        if bindable == i - 1:  # "2 users", "49 euros", "5 GB": the unit belongs to the number
            r.numbers[-1] += " " + _unit(w)
            bindable = -2
            i += 1
            continue
        if role is not None and i - role[1] <= 3:
            # The first word after the preposition and its article: "from my savings", "to the Pro plan";
            # not "for me in the portal" (a pronoun, then another phrase).
            mode = role[0]
            weak = mode[1:] == "w" or (mode[1:] == "b" and i == role[1] + 1)
            role_words.append((mode[0], len(r.words), clause, weak))
        role = None
        if i in owners_at and lang is EN:  # a content word with "'s": it owns what follows ("my wife's card")
            role_words.append(("o", len(r.words), clause, False))
        r.words.append(UNITS.get(w, w))  # "dollars" and "USD" are one word
        word_clause.append(clause)
        sentence_start = False
        i += 1

    # A weak role counts only in a clause with a source and a destination: "de Paris à Bruxelles".
    both = {c for c in {rw[2] for rw in role_words} if {"s", "d"} <= {rw[0] for rw in role_words if rw[2] == c}}
    r.roles = [f"{k}{j}" for k, j, c, weak in role_words if not weak or c in both]
    r.negated = bool(negated_clauses)
    r.negated_words = [j for j, c in enumerate(word_clause) if c in negated_clauses]
    return r


def _digits(
    r: Reading,
    toks: list[tuple[str, str]],
    folded: list[str],
    i: int,
    lang: Lang,
    currency: tuple[str, int] | None,
) -> int:
    raw = toks[i][1]
    nxt = folded[i + 1] if i + 1 < len(toks) and toks[i + 1][0] in ("w", "A") else ""
    m = _CLOCK.match(raw)
    if m and nxt in ("am", "pm") and 1 <= int(m.group(1)) <= 12:  # "7 am", "7:30 pm"
        r.times.append(clock(int(m.group(1)), int(m.group(2) or 0), nxt[0]))
        return i + 2
    if m and (nxt in _CLOCK_WORDS or nxt in lang.time_after) and int(m.group(1)) <= 24:  # "19.30 Uhr", "7 h"
        if nxt == "oclock":
            r.times.append(f"{int(m.group(1)) % 12:02d}:{int(m.group(2) or 0):02d}~")  # am or pm: unknown
        else:
            r.times.append(clock(int(m.group(1)), int(m.group(2) or 0), ""))
        return i + 2
    kind, value = parse(raw, lang.code)
    if kind == "num":
        if currency is not None and currency[1] == i - 1 and " " not in value:
            value += " " + currency[0]
        r.numbers.append(value)
    elif kind == "ord":
        r.numbers.append("o" + value)
    elif kind == "time":
        r.times.append(value)
    elif kind == "date":
        r.dates.append(value)
    else:
        r.numbers.append("#" + value)
    return i + 1


def _month(r: Reading, toks: list[tuple[str, str]], i: int, month: int, bindable: int, lang: Lang) -> int:
    """A month with its day when one stands next to it: "March 3", "3 March", "3. März", "5 de mayo"."""
    if r.numbers and 0 <= i - 2 <= bindable and _day(r.numbers[-1]):
        r.dates.append(f"{month:02d}-{int(r.numbers.pop().lstrip('o')):02d}")
        return i + 1
    if i + 1 < len(toks) and toks[i + 1][0] == "d":
        kind, value = parse(toks[i + 1][1], lang.code)
        if kind in ("num", "ord") and _day(value):
            r.dates.append(f"{month:02d}-{int(value):02d}")
            return i + 2
    r.dates.append(f"{month:02d}")
    return i + 1


def _day(value: str) -> bool:
    v = value.lstrip("o")
    return v.isdigit() and 1 <= int(v) <= 31


def _next_to_number(toks: list[tuple[str, str]], i: int) -> bool:
    """English "may" is a month only beside a day: "May 5", "5 May", "the 5th of May"."""
    return any(0 <= j < len(toks) and toks[j][0] == "d" for j in (i - 2, i - 1, i + 1))


def _tense(r: Reading, lang: Lang, w: str, low: str, prev: str) -> None:
    if w in lang.past:
        # "will be sent" is passive, not a past; "was sent" has its past in "was"
        r.past = r.past or not (lang is EN and prev in _EN_PASSIVE)
    elif w in lang.future and not (lang.code == "es" and prev in _ES_MORNING):
        r.future = True
    code = lang.code
    if code in ("en", "") and len(w) >= 5 and w.endswith("ed") and not w.endswith("eed") and prev not in _EN_PASSIVE:
        r.past = True
    elif code == "es":
        if (low.endswith("ó") and len(low) >= 4) or (len(low) >= 6 and low.endswith(("aron", "ieron"))):
            r.past = True
        elif len(low) >= 5 and low.endswith(("rá", "rán", "ré", "remos")):
            r.future = True
    elif code == "fr":
        if low.endswith(("é", "ée", "és", "ées")) and prev in _FR_AUX:
            r.past = True
        elif len(low) >= 6 and low.endswith(("era", "eront", "erai", "erons", "erez")):
            r.future = True


def _modality(r: Reading, lang: Lang, w: str, nxt: str, folded: list[str], i: int) -> None:
    """A question that opens with "Can I" asks what is allowed; "Must I", "Do I have to" what is required."""
    if w in lang.permission:
        r.modality.add("may")
    elif w in lang.obligation or (w, nxt) in lang.obligation_pairs:
        r.modality.add("must")
    elif lang is EN and w in ("do", "does") and i + 3 < len(folded):
        if folded[i + 2] in ("have", "has", "need", "needs") and folded[i + 3] == "to":  # "do I have to"
            r.modality.add("must")


def _unit(w: str) -> str:
    unit = UNITS.get(w)
    if unit:
        return unit
    return w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w


def _is_ideograph(w: str) -> bool:
    return "\u3040" <= w <= "\ufaff"
