"""The strict check behind a semantic hit: guards that can only say "these differ".

Embeddings place "cancel my order" and "cancel my subscription", "refund for
order 1234" and "refund for order 1235", "I was charged" and "I was not
charged" within a few hundredths of each other. So a nearest neighbour above
the similarity threshold is only a candidate, and these guards look for a
reason to turn it down, in any language (the word lists behind them, in
`guards/lexicon.py`, are closed-class words of English, German, Spanish and
French; a question in another language is compared with every word counting):

* ``language``: the two questions are clearly in different languages;
* ``number``: numbers with their units, ids and codes differ ("order 1234" /
  "order 1235", "5 GB" / "50 GB", "2nd" / "3rd"), in order;
* ``time``: clock times differ ("7 am" / "7 pm", "07:00" / "19:00");
* ``date``: dates, months or weekdays differ;
* ``negation``: one side is negated and the other not, or the negation governs
  other words ("opens but won't sync" / "syncs but won't open");
* ``tense``: past against future ("renewed" / "will renew"), or another day
  ("yesterday" / "tomorrow");
* ``question``: another kind of question (when / why / who / where / how many);
* ``modality``: may against must ("Can I pay by card?" / "Do I have to pay by card?");
* ``role``: two words trade a role ("from savings to checking" / "from
  checking to savings", "points for a flight" / "a flight for points",
  "credit instead of a refund" / "a refund instead of credit");
* ``one_sided_word``: a content word only one side has ("delete my account" /
  "delete my business account");
* ``swapped_word``: each side has a word the other has no match for ("cancel" /
  "pause", "get" / "use"): another thing, or a synonym;
* ``order``: the same content words in another order ("the order arrived but the
  invoice is missing" / "the invoice arrived but the order is missing", "can my
  partner add me" / "can I add my partner"): an embedding barely sees word order,
  and who does what to which is in it. A paraphrase that only reorders its words
  is turned down with them: a miss, the safe side.

Content words are what is left once function words, fillers ("hmm", "thanks"),
framing words ("need", "help", "way"), negators, numbers and question words
are taken out; they match across inflections, typos, compounds and acronyms
(`guards/matching.py`). Light verbs ("get", "use", "take") count only when
each side has one the other lacks ("give" is not light: it has a direction).
Synonyms do not match: "cancel" and "terminate" are two words here, and
telling that they mean the same is the embedding's job (and a verifier's,
which confirms what these guards let through). A paraphrase the
guards cannot see through is a miss, a call to the model; never a wrong answer.

A question's `Signature` is computed once, when its answer is stored, and kept
with the vector in Redis, so a lookup reads only the new question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, update_wrapper

import orjson

from .guards.lexicon import BY_CODE, EN, Lang
from .guards.matching import fuzzy, has_match, same_word, unmatched
from .guards.reading import read
from .guards.tokens import tokenize
from .keys import VERIFY_VERSION  # part of every cache generation (keys.py)

# What `disagreement` can answer, in the order the guards run (a metric label: a fixed set).
REASONS = (
    "language",
    "number",
    "time",
    "date",
    "negation",
    "tense",
    "question",
    "modality",
    "role",
    "one_sided_word",
    "swapped_word",
    "order",
)


@dataclass(frozen=True, slots=True)
class Signature:
    lang: str  # "en", "de", "es", "fr"; with "?" after it when a guess ("es?"); "" when none
    words: tuple[str, ...]  # content words, folded, in order
    light: tuple[str, ...]  # light verbs
    negated: bool
    negated_words: tuple[int, ...]  # indices into words: those in a negated clause
    numbers: tuple[str, ...]  # "1234", "49 usd", "2 user", "o2" (2nd), "#inv-2023-0045"
    times: tuple[str, ...]  # "19:00"; "07:00~" when am/pm is unknown
    dates: tuple[str, ...]  # "2024-03-05", "03-05", "03" (a month), "w1" (a weekday)
    tense: str  # "p" past, "f" future, both, or ""
    anchors: tuple[str, ...]  # deictic days: "-1" yesterday, "0" today, "+1" tomorrow
    kinds: tuple[str, ...]  # kinds of question asked: time, reason, person, place, quantity, frequency
    roles: tuple[str, ...]  # "s3": words[3] follows "from"; "d3" "to"; "f3" "for"; "i3" "instead of"; "f-1" "for me";
    # "o3": words[3] has "'s" (it owns what follows)
    first_person: bool  # the asker speaks of themself (I, me, my)
    modality: str  # "m" may (can, could...), "o" must (must, have to...), both, or ""

    def to_json(self) -> bytes:
        raw = orjson.dumps(
            [
                self.lang,
                self.words,
                self.light,
                int(self.negated),
                self.negated_words,
                self.numbers,
                self.times,
                self.dates,
                self.tense,
                self.anchors,
                self.kinds,
                self.roles,
                int(self.first_person),
                self.modality,
            ]
        )
        return bytes(memoryview(raw))  # right-sized: orjson's bytes keep a 4 KiB buffer, and the index keeps these

    @classmethod
    def from_json(cls, raw: bytes | str) -> Signature:
        """Raises ValueError for anything but a signature of this version."""
        doc = orjson.loads(raw)
        if not isinstance(doc, list) or len(doc) != 14:
            raise ValueError(f"not a version {VERIFY_VERSION} signature")
        lang, words, light, neg, negw, nums, times, dates, tense, anchors, kinds, roles, me, modality = doc
        strs = (words, light, nums, times, dates, anchors, kinds, roles)
        if not (
            isinstance(lang, str)
            and isinstance(tense, str)
            and isinstance(modality, str)
            and isinstance(neg, int)
            and isinstance(me, int)
            and all(isinstance(x, list) and all(isinstance(s, str) for s in x) for x in strs)
            and isinstance(negw, list)
            and all(isinstance(j, int) and 0 <= j < len(words) for j in negw)
            and all(
                r[:1] in _ROLE_NAMES and (r[1:] == "-1" or (r[1:].isdigit() and int(r[1:]) < len(words))) for r in roles
            )
        ):
            raise ValueError(f"not a version {VERIFY_VERSION} signature")
        return cls(
            lang,
            tuple(words),
            tuple(light),
            bool(neg),
            tuple(negw),
            tuple(nums),
            tuple(times),
            tuple(dates),
            tense,
            tuple(anchors),
            tuple(kinds),
            tuple(roles),
            bool(me),
            modality,
        )

    def describe(self) -> dict[str, object]:
        return {
            "lang": self.lang,
            "words": list(self.words),
            "light": list(self.light),
            "negated": self.negated,
            "negated_words": [self.words[j] for j in self.negated_words],
            "numbers": list(self.numbers),
            "times": list(self.times),
            "dates": list(self.dates),
            "tense": {"": "", "p": "past", "f": "future", "pf": "past+future"}.get(self.tense, self.tense),
            "anchors": list(self.anchors),
            "kinds": list(self.kinds),
            "roles": [f"{_ROLE_NAMES[r[0]]} {_holder(self, int(r[1:]))}" for r in self.roles],
            "first_person": self.first_person,
            "modality": {"": "", "m": "may", "o": "must", "mo": "may+must"}.get(self.modality, self.modality),
        }


def _read_signature(text: str) -> Signature:
    r = read(tokenize(text))
    return Signature(
        r.lang if r.clear or not r.lang else r.lang + "?",
        tuple(r.words),
        tuple(r.light),
        r.negated,
        tuple(r.negated_words),
        tuple(r.numbers),
        tuple(r.times),
        tuple(r.dates),
        ("p" if r.past else "") + ("f" if r.future else ""),
        tuple(sorted(r.anchors)),
        tuple(sorted(r.kinds)),
        tuple(r.roles),
        r.first_person,
        ("m" if "may" in r.modality else "") + ("o" if "must" in r.modality else ""),
    )


_remembered = lru_cache(maxsize=8192)(_read_signature)


def signature(text: str) -> Signature:
    """The guards' reading of a question; short ones are remembered (repeated traffic asks the same)."""
    return _remembered(text) if len(text) <= _REMEMBER_CHARS else _read_signature(text)


# A long message is read each time rather than kept: 8,192 remembered texts must stay small.
_REMEMBER_CHARS = 2000
update_wrapper(signature, _read_signature, assigned=(), updated=())  # signature.__wrapped__: the uncached read


def disagreement(a: Signature, b: Signature) -> str | None:
    """None when no guard finds a difference; else the first guard that does (one of REASONS)."""
    found = _check(a, b)
    return None if found is None else found[0]


def explain(a: Signature, b: Signature) -> str | None:
    """Like `disagreement`, with what differed ("word: one-sided word 'business'"), for debugging.

    It quotes the questions' words: not for metrics or logs that must not hold user text.
    """
    found = _check(a, b)
    return None if found is None else f"{found[0]}: {found[1]}"


def _check(a: Signature, b: Signature) -> tuple[str, str] | None:
    if a.lang and b.lang and a.lang != b.lang and "?" not in a.lang + b.lang:
        return "language", f"{a.lang} / {b.lang}"
    for name, x, y in (("number", a.numbers, b.numbers), ("time", a.times, b.times), ("date", a.dates, b.dates)):
        if x != y:
            return name, f"{list(x)} / {list(y)}"
    lang = BY_CODE.get((a.lang or b.lang).rstrip("?"), EN)
    found = _negation(a, b, lang) or _tense(a, b) or _question(a, b) or _modality(a, b) or _roles(a, b, lang)
    if found:
        return found
    return _words(a, b, lang) or _order(a, b, lang)


def _order(a: Signature, b: Signature, lang: Lang) -> tuple[str, str] | None:
    """The same content words in another order. Each of a's words is matched to the first
    unused match in b (words with no single match, a compound or an acronym spelled out,
    are passed over); two words matched in the opposite order turn the pair down, unless
    one of them holds the same role on both sides: a phrase with its preposition may move
    ("to checking from savings" is "from savings to checking", "switch from monthly to
    annual billing" is "switch my billing from monthly to annual"), the role guard compares
    those. Linear in the words but for the inexact matches, which long texts go without
    (`guards.matching.fuzzy`)."""
    role_a, role_b = _role_of(a), _role_of(b)
    inexact = fuzzy(a.words, b.words)
    at: dict[str, list[int]] = {}
    for j, v in enumerate(b.words):
        at.setdefault(v, []).append(j)
    used: set[int] = set()
    last, last_word = -1, ""
    for i, w in enumerate(a.words):
        exact = at.get(w)
        while exact and exact[0] in used:  # taken by an inexact match before
            exact.pop(0)
        found = exact.pop(0) if exact else None
        if found is None and inexact:
            found = next((k for k, v in enumerate(b.words) if k not in used and same_word(w, v, lang)), None)
        if found is None:
            continue
        j = found
        used.add(j)
        if i in role_a and role_a[i] == role_b.get(j):
            continue  # a word its preposition places: where it stands says nothing
        if j < last:
            return "order", f"{last_word!r} / {w!r} in the other order"
        last, last_word = j, w
    return None


def _role_of(sig: Signature) -> dict[int, str]:
    """Word index -> the role it holds (the asker's, -1, left out): `_holders` turned round."""
    return {i: role for role, held in _holders(sig).items() for i in held if i >= 0}


def _words(a: Signature, b: Signature, lang: Lang) -> tuple[str, str] | None:
    mine, theirs = unmatched(a.words, b.words, lang), unmatched(b.words, a.words, lang)
    if mine and theirs:
        return "swapped_word", f"{a.words[mine[0]]!r} / {b.words[theirs[0]]!r}"
    if mine or theirs:
        x, left = (a, mine) if mine else (b, theirs)
        return "one_sided_word", f"one-sided word {x.words[left[0]]!r}"
    light_a, light_b = unmatched(a.light, b.light, lang), unmatched(b.light, a.light, lang)
    if light_a and light_b:
        return "swapped_word", f"{a.light[light_a[0]]!r} / {b.light[light_b[0]]!r}"
    return None


def _negation(a: Signature, b: Signature, lang: Lang) -> tuple[str, str] | None:
    if a.negated != b.negated:
        return "negation", "one side negated"
    inexact = fuzzy(a.words, b.words)
    for x, y in ((a, b), (b, a)):
        negated_y = [y.words[j] for j in y.negated_words]
        y_all, y_negated = set(y.words), set(negated_y)
        for j in x.negated_words:
            w = x.words[j]
            # A word negated here, present there, but not negated there: the negation governs something else.
            if has_match(w, y.words, y_all, lang, inexact) and not has_match(w, negated_y, y_negated, lang, inexact):
                return "negation", f"{w!r} negated on one side only"
    return None


def _tense(a: Signature, b: Signature) -> tuple[str, str] | None:
    if {a.tense, b.tense} == {"p", "f"}:
        return "tense", "past / future"
    if a.anchors != b.anchors:
        return "tense", f"{list(a.anchors)} / {list(b.anchors)}"
    return None


def _question(a: Signature, b: Signature) -> tuple[str, str] | None:
    if a.kinds != b.kinds:
        return "question", f"{list(a.kinds) or ['open']} / {list(b.kinds) or ['open']}"
    return None


def _modality(a: Signature, b: Signature) -> tuple[str, str] | None:
    """May against must, when both say which: "Can I pay later?" / "Do I have to pay later?"."""
    if a.modality and b.modality and a.modality != b.modality:
        return "modality", f"{a.modality} / {b.modality}"
    return None


def _roles(a: Signature, b: Signature, lang: Lang) -> tuple[str, str] | None:
    """Two words that trade a role (from X, to X, for X, instead of X): each side has both, and
    each gives the role to the one the other does not: "points for a flight" / "a flight for points";
    or a word owns something on one side only (`_owners`)."""
    if not a.roles and not b.roles:
        return None
    held_a, held_b = _holders(a), _holders(b)
    for role in held_a.keys() & held_b.keys():
        lost = _moved(a, held_a[role], b, held_b[role], lang)
        if lost is not None and _moved(b, held_b[role], a, held_a[role], lang) is not None:
            return "role", f"{lost!r} {_ROLE_NAMES[role]} on one side only"
    return _owners(a, held_a.get("o", ()), b, held_b.get("o", ()), lang) or _owners(
        b, held_b.get("o", ()), a, held_a.get("o", ()), lang
    )


def _owners(
    x: Signature, owns_x: Sequence[int], y: Signature, owns_y: Sequence[int], lang: Lang
) -> tuple[str, str] | None:
    """A word that owns something in x ("can I use my wife's card") and is in y without owning
    anything ("can my wife use my card"): whose the thing is, or who acts, changed."""
    if not owns_x:
        return None
    owners_y = [y.words[j] for j in owns_y]
    owners_set, y_set = set(owners_y), set(y.words)
    inexact = fuzzy(x.words, y.words)
    for i in owns_x:
        w = x.words[i]
        if has_match(w, owners_y, owners_set, lang, inexact):
            continue
        if has_match(w, y.words, y_set, lang, inexact):
            return "role", f"{w!r} owns something on one side only"
    return None


def _holders(sig: Signature) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in sig.roles:
        out.setdefault(r[0], []).append(int(r[1:]))
    return out


def _moved(x: Signature, held_x: list[int], y: Signature, held_y: list[int], lang: Lang) -> str | None:
    """A word holding the role in x that y has too, but not in that role (-1: the asker, "for me")."""
    y_set, inexact = set(y.words), fuzzy(x.words, y.words)
    for i in held_x:
        if i < 0:
            if y.first_person and -1 not in held_y:
                return "me"
            continue
        w = x.words[i]
        if not any(j >= 0 and same_word(w, y.words[j], lang) for j in held_y) and has_match(
            w, y.words, y_set, lang, inexact
        ):
            return w
    return None


def _holder(sig: Signature, i: int) -> str:
    return "me" if i < 0 else sig.words[i]


_ROLE_NAMES = {"s": "from", "d": "to", "f": "for", "i": "instead of", "o": "'s"}
