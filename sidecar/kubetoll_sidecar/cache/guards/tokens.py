"""Unicode tokenization: words of any script, numbers and codes, symbols, breaks.

A token is a (kind, text) pair:

* ``w`` a word, case-folded (accents kept; `lexicon.fold` strips them for comparison);
* ``A`` a word written in capitals in a text that is not ("US", "IT", "PIN"):
  an acronym, a content word even where its lower case is a function word; a
  capital letter alone inside a sentence too ("building B", "plan A");
* ``d`` a token with a digit in it: a number, time, date, ordinal, id or code;
* ``$`` a currency or percent sign;
* ``n`` a negation carried by a contraction ("n't", French "n'");
* ``o`` an English "'s" after a word: it owns what follows when the word is a
  content word ("my wife's card"), it is "is" after a pronoun ("it's");
* ``c`` a clause break (comma, colon, parenthesis, dash);
* ``x`` a sentence break (. ! ? ; and line breaks).

Letters are whatever Unicode calls letters, so "suscripción", "Straße" and
"заказ" are one word each; Chinese and Japanese, written without spaces, are
cut into characters. Contractions and elisions are expanded (don't, we'll,
l'application, n'arrive); a hyphenated word is one word when its parts are
("e-mail", "two-factor") and a phrase when a part is a function word
("sign-in", "puis-je").
"""

from __future__ import annotations

import re
import unicodedata

from .lexicon import ANY_STOP

_TOKEN = re.compile(
    r"(?P<ampm>(?<!\w)[ap]\.m\.?)"
    r"|(?P<tok>\w+(?:['\-./:,]\w+)*)"
    r"|(?P<sym>[$€£¥₹%])"
    r"|(?P<sent>[.!?;¿¡…\n]+)"
    r"|(?P<clause>[,:()\[\]\"«»“”„—–])",
    re.IGNORECASE,
)
_DIGIT = re.compile(r"\d")
_IDEOGRAPH = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")
_INNER = re.compile(r"[./:,]")
_APOSTROPHES = str.maketrans({"’": "'", "ʼ": "'", "`": "'", "´": "'"})

# English contractions: the tail -> what it adds.
_EN_TAILS = {"s": "", "re": "are", "ve": "have", "d": "", "m": "am", "ll": "will"}
# French elisions: the head -> the word it stands for.
_ELIDED = {
    "l": "le",
    "d": "de",
    "j": "je",
    "m": "me",
    "t": "te",
    "s": "se",
    "c": "ce",
    "qu": "que",
    "jusqu": "jusque",
    "lorsqu": "lorsque",
    "puisqu": "puisque",
}
_N_T_BASES = {"wo": "will", "ca": "can", "sha": "shall", "ai": "am"}


def tokenize(text: str) -> list[tuple[str, str]]:
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    out: list[tuple[str, str]] = []
    shouting = _shouting(text)
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        raw = m.group()
        if kind == "tok":
            if not shouting and raw.isupper() and raw.isalpha():
                if len(raw) > 1:
                    out.append(("A", raw.casefold()))  # an acronym: "US" is not "us", "IT" not "it"
                    continue
                if raw != "I" and out and out[-1][0] != "x":
                    # A capital letter alone inside a sentence names something: "building B", "gate C",
                    # "plan A" (at a sentence's start it may be an article: "A friend...").
                    out.append(("A", raw.casefold()))
                    continue
            _word(raw.casefold(), out)
        elif kind == "ampm":
            out.append(("w", "am" if raw[0] in "aA" else "pm"))
        elif kind == "sym":
            out.append(("$", raw))
        elif kind == "sent":
            out.append(("x", ""))
        else:
            out.append(("c", ""))
    return out


def _shouting(text: str) -> bool:
    """Mostly capitals: there capitals say nothing ("HOW DO I CANCEL")."""
    upper = sum(1 for c in text if c.isupper())
    if upper < 2:
        return False
    return upper > 0.6 * sum(1 for c in text if c.isalpha())


def _word(tok: str, out: list[tuple[str, str]]) -> None:
    if tok.isalpha() and tok.isascii():  # the common case, first
        out.append(("w", tok))
        return
    if _DIGIT.search(tok):
        out.append(("d", tok.rstrip(".,:")))
        return
    if _IDEOGRAPH.search(tok):
        out.extend(("w", piece) for piece in _IDEOGRAPH.split(tok) if piece)
        return
    for piece in _INNER.split(tok):  # "ok,thanks", "e.g", "www.example.com"
        if piece:
            _hyphenated(piece, out)


def _hyphenated(tok: str, out: list[tuple[str, str]]) -> None:
    if "-" not in tok:
        _apostrophe(tok, out)
        return
    parts = [p for p in tok.split("-") if p]
    if any(len(p) > 1 and p.replace("'", "") in ANY_STOP for p in parts):
        for p in parts:  # "sign-in", "puis-je", "est-ce": a phrase
            _apostrophe(p, out)
    else:
        _apostrophe("".join(parts), out)  # "e-mail", "two-factor", "après-demain": one word


def _apostrophe(tok: str, out: list[tuple[str, str]]) -> None:
    if "'" not in tok:
        out.append(("w", tok))
        return
    head, _, tail = tok.partition("'")
    if tail == "t" and head.endswith("n") and len(head) > 1:  # don't, won't, can't
        base = head[:-1]
        out.append(("w", _N_T_BASES.get(base, base)))
        out.append(("n", "n't"))
        return
    if head == "n":  # French n'est, n'arrive
        out.append(("n", "n'"))
        _apostrophe(tail, out)
        return
    if head in _ELIDED and tail:
        out.append(("w", _ELIDED[head]))
        _apostrophe(tail, out)
        return
    if tail in _EN_TAILS and head:
        out.append(("w", head))
        if _EN_TAILS[tail]:
            out.append(("w", _EN_TAILS[tail]))
        elif tail == "s":
            out.append(("o", "'s"))  # a possessive ("my wife's card"), or "is" after a pronoun: the reader tells
        return
    out.append(("w", head + tail.replace("'", "")))  # o'clock, aujourd'hui
