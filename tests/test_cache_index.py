"""The local vector index: exact cosine search per partition, expiry, eviction, and searches
run in a worker thread that must never serve an entry under another's id."""

from __future__ import annotations

import numpy as np

from kubetoll_sidecar.cache import semantic
from kubetoll_sidecar.cache.semantic import SemanticIndex
from kubetoll_sidecar.cache.verify import signature

SIG = signature("How do I cancel my order?")


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_search_is_per_partition_best_first_and_thresholded():
    idx = SemanticIndex(100)
    idx.add("a", "p1", unit(1, 0, 0), SIG, 1e12)
    idx.add("b", "p1", unit(1, 1, 0), SIG, 1e12)
    idx.add("c", "p2", unit(1, 0, 0), SIG, 1e12)
    got = idx.search("p1", unit(1, 0.1, 0), 0.5, 0.0)
    assert [c.entry_id for c in got] == ["a", "b"]
    assert got[0].similarity > got[1].similarity
    assert got[0].signature == SIG
    assert [c.entry_id for c in idx.search("p1", unit(1, 0.1, 0), 0.9, 0.0)] == ["a"]
    assert idx.search("p3", unit(1, 0, 0), 0.1, 0.0) == []
    assert idx.search("p1", unit(1, 0, 0, 0), 0.1, 0.0) == []  # another model's dimension


def test_expired_entries_are_skipped_then_swept():
    idx = SemanticIndex(100)
    idx.add("old", "p", unit(1, 0), SIG, 10.0)
    idx.add("new", "p", unit(1, 0.2), SIG, 1000.0)
    assert [c.entry_id for c in idx.search("p", unit(1, 0), 0.1, now=20.0)] == ["new"]
    assert idx.sweep(now=20.0) == 1 and "old" not in idx and len(idx) == 1


def test_eviction_of_the_oldest_past_max_entries():
    idx = SemanticIndex(3)
    for i in range(5):
        idx.add(f"e{i}", f"p{i % 2}", unit(1, i), SIG, 1e12)
    assert len(idx) == 3 and idx.evictions == 2
    assert "e0" not in idx and "e1" not in idx and "e4" in idx


def test_removal_keeps_rows_contiguous_and_ids_right():
    idx = SemanticIndex(1000)
    rng = np.random.default_rng(0)
    vecs = {f"e{i}": SemanticIndex.normalise(rng.standard_normal(16)) for i in range(200)}
    for k, v in vecs.items():
        idx.add(k, "p", v, SIG, 1e12)
    for i in range(0, 200, 3):
        idx.remove(f"e{i}")
    for k, v in vecs.items():
        got = idx.search("p", v, 0.999, 0.0, k=1)
        if int(k[1:]) % 3 == 0:
            assert not got or got[0].entry_id != k
        else:
            assert got and got[0].entry_id == k


def test_a_worker_thread_search_rescored_after_the_index_changed():
    idx = SemanticIndex(100)
    idx.add("a", "p", unit(1, 0, 0), SIG, 1e12)
    idx.add("b", "p", unit(0, 1, 0), SIG, 1e12)
    idx.add("c", "p", unit(0, 0, 1), SIG, 1e12)
    plan = idx.search_plan("p", unit(1, 0, 0))
    assert plan is not None
    rows = plan.top_rows(unit(1, 0, 0), 0.0, 4)  # as the worker thread would
    assert rows[0] == 0
    idx.remove("a")  # meanwhile, on the event loop: "c" moves into row 0
    got = idx.rescore("p", rows, unit(1, 0, 0), 0.5, 0.0)
    assert got == []  # "c" now sits in a's row, but it is not similar: nothing is served as "a"
    got = idx.rescore("p", rows, unit(0, 0, 1), 0.5, 0.0)
    assert [c.entry_id for c in got] == ["c"]


def test_large_partitions_are_searched_in_a_worker_thread(monkeypatch):
    monkeypatch.setattr(semantic, "OFFLOAD_ELEMENTS", 0)
    idx = SemanticIndex(10)
    idx.add("a", "p", unit(1, 0), SIG, 1e12)
    assert idx.needs_offload("p")
