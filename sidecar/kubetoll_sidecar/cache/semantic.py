"""The local vector index of one semantic cache policy: exact cosine search in numpy.

Entries are split by partition (the exact-match part of the request: route,
scope, system prompt, tools, sampling settings, earlier turns), and each
partition keeps its vectors in one contiguous float32 matrix, so a search is
one matrix-vector product over the entries that could possibly be answers,
never over the whole index. Vectors are L2-normalised on the way in, so the
product is the cosine similarity.

Memory per entry: 4 bytes x dimensions for the vector (1,536 B at 384
dimensions, 6,144 B at 1,536), plus about 350 B of bookkeeping (the id, the
signature, the expiry, dict and list slots). `bench/cache_latency.py` measures it.

The index is bounded by `max_entries`: past it, the oldest entry is evicted.
Expired entries are skipped at search time and swept out by `sweep`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

# One BLAS thread: the sidecar runs on one core next to the app, and OpenBLAS's
# worker threads only contend with the event loop there (set before numpy loads;
# an explicit setting in the environment wins).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np

from .verify import Signature

# Per entry, besides the vector: id and partition strings, the signature as JSON
# bytes, the expiry, list and dict slots (measured by bench/cache_latency.py).
BOOKKEEPING_BYTES = 450
# Searches over more than this many float32 values (n x dimensions) run in a
# worker thread (numpy releases the GIL), so one large search does not stall every
# other request on the event loop.
OFFLOAD_ELEMENTS = 2_000_000


@dataclass(slots=True)
class Candidate:
    similarity: float
    entry_id: str
    signature_json: bytes

    @property
    def signature(self) -> Signature:
        return Signature.from_json(self.signature_json)


class SearchPlan(NamedTuple):
    """A partition's arrays as they are when the plan is made, for a search in a worker thread."""

    mat: np.ndarray
    expires: np.ndarray
    n: int

    def top_rows(self, query: np.ndarray, now: float, k: int = 4) -> list[int]:
        """Rows of the k most similar live entries, best first (pure numpy: safe in a worker thread).

        Rows, not candidates: the index may change meanwhile, so `SemanticIndex.rescore` turns
        them into candidates back on the event loop."""
        return top_rows(self.mat, self.expires, self.n, query, now, k)


@dataclass(slots=True)
class _Partition:
    dim: int
    key: str
    mat: np.ndarray = field(init=False)
    expires: np.ndarray = field(init=False)
    ids: list[str] = field(default_factory=list)
    sigs: list[bytes] = field(default_factory=list)  # Signature.to_json(): decoded only for candidates
    rows: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mat = np.empty((8, self.dim), dtype=np.float32)
        self.expires = np.empty(8, dtype=np.float64)

    @property
    def n(self) -> int:
        return len(self.ids)

    def add(self, entry_id: str, vec: np.ndarray, sig: bytes, expires: float) -> None:
        row = self.rows.get(entry_id)
        if row is None:
            row = self.n
            if row == self.mat.shape[0]:
                cap = row + max(row // 2, 8)  # 1.5x: at most a third of the matrix unused
                mat = np.empty((cap, self.dim), dtype=np.float32)
                mat[:row] = self.mat[:row]
                exp = np.empty(cap, dtype=np.float64)
                exp[:row] = self.expires[:row]
                self.mat, self.expires = mat, exp
            self.ids.append(entry_id)
            self.sigs.append(sig)
            self.rows[entry_id] = row
        else:
            self.sigs[row] = sig
        self.mat[row] = vec
        self.expires[row] = expires

    def remove(self, entry_id: str) -> bool:
        row = self.rows.pop(entry_id, None)
        if row is None:
            return False
        last = self.n - 1
        if row != last:
            # Move the last row into the hole: rows stay contiguous.
            moved = self.ids[last]
            self.mat[row] = self.mat[last]
            self.expires[row] = self.expires[last]
            self.ids[row] = moved
            self.sigs[row] = self.sigs[last]
            self.rows[moved] = row
        self.ids.pop()
        self.sigs.pop()
        if self.mat.shape[0] > 64 and self.n < self.mat.shape[0] // 4:
            cap = self.mat.shape[0] // 2
            self.mat = self.mat[:cap].copy()
            self.expires = self.expires[:cap].copy()
        return True


class SemanticIndex:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.dim: int | None = None
        self._parts: dict[str, _Partition] = {}
        self._order: OrderedDict[str, _Partition] = OrderedDict()  # entry id -> its partition, oldest first
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._order

    @property
    def nbytes(self) -> int:
        vec = sum(p.mat.nbytes + p.expires.nbytes for p in self._parts.values())
        return vec + len(self._order) * BOOKKEEPING_BYTES

    @staticmethod
    def normalise(vector: object) -> np.ndarray | None:
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.size == 0 or not np.all(np.isfinite(v)):
            return None
        norm = float(np.linalg.norm(v))
        if norm == 0.0:
            return None
        return v / norm

    def add(self, entry_id: str, partition: str, vec: np.ndarray, sig: Signature | bytes, expires: float) -> bool:
        """False when the vector's dimension does not match the index (another embedding model)."""
        if self.dim is None:
            self.dim = int(vec.shape[0])
        if vec.shape[0] != self.dim:
            return False
        old = self._order.get(entry_id)
        if old is not None and old.key != partition:
            self.remove(entry_id)
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = _Partition(self.dim, partition)
        part.add(entry_id, vec, sig.to_json() if isinstance(sig, Signature) else bytes(sig), expires)
        self._order[entry_id] = part
        self._order.move_to_end(entry_id)
        while len(self._order) > self.max_entries:
            oldest = next(iter(self._order))
            self.remove(oldest)
            self.evictions += 1
        return True

    def remove(self, entry_id: str) -> None:
        part = self._order.pop(entry_id, None)
        if part is None:
            return
        part.remove(entry_id)
        if part.n == 0 and self._parts.get(part.key) is part:
            del self._parts[part.key]

    def search(self, partition: str, query: np.ndarray, threshold: float, now: float, k: int = 4) -> list[Candidate]:
        """Up to k live entries of the partition with similarity >= threshold, best first."""
        part = self._parts.get(partition)
        if part is None or self.dim is None or query.shape[0] != self.dim:
            return []
        return self._candidates(part, top_rows(part.mat, part.expires, part.n, query, now, k), query, threshold)

    def search_plan(self, partition: str, query: np.ndarray) -> SearchPlan | None:
        """For a search in a worker thread: the partition's arrays as they are now, or None."""
        part = self._parts.get(partition)
        if part is None or self.dim is None or query.shape[0] != self.dim:
            return None
        return SearchPlan(part.mat, part.expires, part.n)

    def rescore(
        self, partition: str, rows: list[int], query: np.ndarray, threshold: float, now: float
    ) -> list[Candidate]:
        """Candidates for rows found by a worker thread, scored again against the index as it
        is now: an entry added, moved or removed meanwhile cannot be served under another's id."""
        part = self._parts.get(partition)
        if part is None:
            return []
        live = [r for r in rows if r < part.n and part.expires[r] > now]
        if not live:
            return []
        sims = part.mat[live] @ query
        order = np.argsort(-sims)
        return self._candidates(part, [live[i] for i in order], query, threshold, [float(sims[i]) for i in order])

    @staticmethod
    def _candidates(
        part: _Partition, rows: Iterable[int], query: np.ndarray, threshold: float, sims: list[float] | None = None
    ) -> list[Candidate]:
        out = []
        for j, row in enumerate(rows):
            s = sims[j] if sims is not None else float(part.mat[row] @ query)
            if s < threshold:
                break
            out.append(Candidate(s, part.ids[row], part.sigs[row]))
        return out

    def needs_offload(self, partition: str) -> bool:
        part = self._parts.get(partition)
        return part is not None and part.n * part.dim > OFFLOAD_ELEMENTS

    def sweep(self, now: float) -> int:
        """Drops expired entries; returns how many."""
        dead = []
        for part in self._parts.values():
            n = part.n
            if n:
                for row in np.nonzero(part.expires[:n] <= now)[0]:
                    dead.append(part.ids[int(row)])
        for entry_id in dead:
            self.remove(entry_id)
        return len(dead)

    def clear(self) -> None:
        self._parts.clear()
        self._order.clear()
        self.dim = None


def top_rows(mat: np.ndarray, expires: np.ndarray, n: int, query: np.ndarray, now: float, k: int) -> list[int]:
    """Rows of the k most similar live entries, best first (pure numpy: safe in a worker thread)."""
    if n == 0:
        return []
    sims = mat[:n] @ query
    sims[expires[:n] <= now] = -2.0
    top = np.argpartition(-sims, k)[:k] if n > k else np.arange(n)
    top = top[np.argsort(-sims[top])]
    return [int(r) for r in top if sims[r] > -2.0]
