"""The semantic cache's labelled pairs: the test split is frozen, well formed and disjoint from the dev data.

bench/cache_pairs/test.jsonl was written blind to the verifier and frozen by its sha256
before anything was measured on it (bench/cache_pairs/README.md). If this test fails
because test.jsonl changed, the change is the bug: tune on the dev files (pairs.jsonl,
dev_more.jsonl, dev_retired_test.jsonl), and when the test split has been looked at for
tuning, retire it to dev and write a new one with a hash of its own, never edit it.

The checks are written out here rather than imported from make_pairs.py, so the gate does
not share the code it is checking; only the last test runs make_pairs, to prove the
committed files are what their hand-written sources compile to.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

PAIRS_DIR = Path(__file__).resolve().parents[1] / "bench" / "cache_pairs"
TEST_SPLIT_SHA256 = "cb3a3247c938907696db06e6b5644b83b311c823e5fd6fe35921352e27408af1"

FIELDS = ["id", "a", "b", "label", "category", "split", "domain", "lang"]
LANGS = {"en", "de", "es", "fr"}
DOMAINS = {"ecommerce", "it_helpdesk", "banking", "travel", "healthcare_admin", "saas_billing"}
SAME = {"typo", "filler", "acronym", "synonym", "register", "paraphrase"}
DIFFERENT = {
    "negation_scope",
    "role_swap",
    "time",
    "date",
    "tense",
    "one_sided_qualifier",
    "sub_question",
    "number",
    "id_code",
    "action",
    "object",
    "product",
    "place",
    "unrelated",
}
# pairs.jsonl keeps the categories it was written with.
LEGACY = {
    "same": {"paraphrase"},
    "different": {
        "action",
        "object",
        "product",
        "place",
        "negation",
        "number",
        "qualifier",
        "question",
        "attribute",
        "unrelated",
    },
}

Row = dict[str, str]


def load(name: str) -> list[Row]:
    return [json.loads(line) for line in (PAIRS_DIR / name).read_text(encoding="utf-8").splitlines()]


@functools.cache
def _make_pairs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_pairs", PAIRS_DIR / "make_pairs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def norm(text: str) -> str:
    """Accents, case, punctuation and spacing folded away: what counts as the same text (make_pairs.py's own)."""
    normalized: Callable[[str], str] = _make_pairs().normalized
    return normalized(text)


def field_problems(rows: list[Row], split: str, legacy: bool) -> list[str]:
    out = []
    for n, r in enumerate(rows, 1):
        where = f"row {n} ({r.get('id')})"
        if list(r) != FIELDS:
            out.append(f"{where}: fields {list(r)} (want {FIELDS})")
            continue
        if not all(isinstance(r[k], str) and r[k] for k in FIELDS):
            out.append(f"{where}: every field must be a non-empty string")
            continue
        if r["id"] != hashlib.sha1(f"{r['a']}\x00{r['b']}".encode()).hexdigest()[:10]:
            out.append(f"{where}: id is not the hash of a and b")
        if r["a"] == r["b"] or any(r[k] != r[k].strip() for k in ("a", "b")):
            out.append(f"{where}: a and b must differ and carry no outer whitespace")
        if r["label"] not in ("same", "different"):
            out.append(f"{where}: label {r['label']!r}")
            continue
        allowed = LEGACY[r["label"]] if legacy else (SAME if r["label"] == "same" else DIFFERENT)
        if r["category"] not in allowed:
            out.append(f"{where}: category {r['category']!r} is not a {r['label']} category")
        if r["split"] != split:
            out.append(f"{where}: split {r['split']!r} (want {split!r})")
        if legacy:
            if (r["domain"], r["lang"]) != ("mixed", "en"):
                out.append(f"{where}: pairs.jsonl rows are domain 'mixed', lang 'en'")
        elif r["domain"] not in DOMAINS or r["lang"] not in LANGS:
            out.append(f"{where}: domain {r['domain']!r} / lang {r['lang']!r}")
    return out


def overlap_problems(test: list[Row], dev: list[Row]) -> list[str]:
    """Ids, pairs (either order, normalised) and single questions (normalised) the two splits share."""
    out = []
    ids = Counter(r["id"] for r in test + dev)
    out += [f"id {i} occurs {n} times" for i, n in ids.items() if n > 1]
    dev_pairs = {frozenset((norm(r["a"]), norm(r["b"]))) for r in dev}
    dev_texts = {norm(t) for r in dev for t in (r["a"], r["b"])}
    for r in test:
        if frozenset((norm(r["a"]), norm(r["b"]))) in dev_pairs:
            out.append(f"test pair {r['id']} is also a dev pair")
        out += [f"test question {t!r} ({r['id']}) is in the dev data" for t in (r["a"], r["b"]) if norm(t) in dev_texts]
    test_pairs = Counter(frozenset((norm(r["a"]), norm(r["b"]))) for r in test)
    out += [f"test pair {sorted(p)} occurs {n} times" for p, n in test_pairs.items() if n > 1]
    return out


@pytest.fixture(scope="module")
def files() -> dict[str, list[Row]]:
    return {name: load(f"{name}.jsonl") for name in ("test", "pairs", "dev_more", "dev_retired_test")}


def dev_rows(files: dict[str, list[Row]]) -> list[Row]:
    return files["pairs"] + files["dev_more"] + files["dev_retired_test"]


def test_the_test_split_is_frozen() -> None:
    digest = hashlib.sha256((PAIRS_DIR / "test.jsonl").read_bytes()).hexdigest()
    assert digest == TEST_SPLIT_SHA256, (
        "bench/cache_pairs/test.jsonl changed: it is frozen (README.md). Revert it; put new pairs in "
        "a dev file, or retire this split to dev and write a new one with its own hash."
    )
    assert TEST_SPLIT_SHA256 in (PAIRS_DIR / "README.md").read_text(), "README.md must state the frozen hash"


def test_every_row_is_well_formed(files: dict[str, list[Row]]) -> None:
    problems = field_problems(files["test"], "test", legacy=False)
    problems += field_problems(files["dev_more"], "dev", legacy=False)
    problems += field_problems(files["dev_retired_test"], "dev", legacy=False)
    problems += field_problems(files["pairs"], "dev", legacy=True)
    assert not problems, "\n".join(problems[:20])


def test_the_test_split_shares_nothing_with_the_dev_data(files: dict[str, list[Row]]) -> None:
    problems = overlap_problems(files["test"], dev_rows(files))
    assert not problems, "\n".join(problems[:20])


def test_the_checks_catch_tampering(files: dict[str, list[Row]]) -> None:
    """The checks above can fail: a copied pair, an edited question, a bad field are each caught."""
    dev = dev_rows(files)
    leaked = dict(files["test"][0])
    assert overlap_problems([leaked], [leaked])  # same id, same pair
    reordered = {**dev[0], "a": dev[0]["b"] + " ", "b": dev[0]["a"].upper()}
    assert overlap_problems([reordered], dev)  # near-duplicate pair, other order
    one_question = {**files["test"][1], "b": files["dev_more"][0]["a"].replace("?", " ?")}
    assert overlap_problems([one_question], dev)
    bad = [
        {**files["test"][2], "a": files["test"][2]["a"] + "!"},  # id no longer the hash
        {**files["test"][3], "category": "paraphrase", "label": "different"},
        {**files["test"][4], "lang": "it"},
        {k: v for k, v in files["test"][5].items() if k != "domain"},
    ]
    assert len(field_problems(bad, "test", legacy=False)) == len(bad)


def test_the_test_split_has_the_promised_composition(files: dict[str, list[Row]]) -> None:
    test = files["test"]
    assert len(test) >= 300 and len(files["dev_more"]) >= 300 and len(files["dev_retired_test"]) >= 600
    same = sum(r["label"] == "same" for r in test) / len(test)
    assert 0.35 <= same <= 0.45, f"{same:.0%} same"
    by_lang = Counter((r["lang"], r["label"]) for r in test)
    for lang in ("de", "es", "fr"):
        assert by_lang[(lang, "same")] + by_lang[(lang, "different")] >= 45 and by_lang[(lang, "same")] >= 15
    assert {r["domain"] for r in test} == DOMAINS
    assert {r["category"] for r in test if r["label"] == "different"} == DIFFERENT
    assert {r["category"] for r in test if r["label"] == "same"} == SAME


def test_the_files_are_what_their_sources_compile_to() -> None:
    for path, data in _make_pairs().outputs().items():
        assert path.read_bytes() == data, f"{path.name} differs from what make_pairs.py writes from its sources"
