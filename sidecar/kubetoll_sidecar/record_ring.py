"""The last N spend records of this process, held compressed.

A sidecar keeps its recent spend records for `/kubetoll/v1/spend` (the in-memory
ledger: 100,000 of them; beside a Redis ledger, 10,000). As objects they cost
~500 bytes each (a slotted `SpendRecord`, its request id, tenant and floats):
~48 MiB once a long-running pod's ring is full, more than half its idle memory
again. Records are written once and read rarely, so they are kept as objects only
until a block of `BLOCK` is complete; the block's field values are then pickled
(repeated strings once a block) and zlib-compressed at level 1: ~20 bytes a record
on the sidecar's usual traffic, so a full ring of 100,000 takes ~2 MiB.

The compaction (~0.4 ms for a block of 256) runs off the request: on the event
loop, `call_soon` after the step that appended the block's last record (that step
is the one that writes the answer), or at once when no loop runs. A read
decompresses only the blocks whose time range overlaps the period asked for.

The pickles are made and read by this process only (never from outside), and
`SpendRecord` is rebuilt from its field values in declaration order, so every
field round-trips exactly (tests/test_record_ring.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import operator
import pickle
import zlib
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

from kubetoll_core.spend_record import SpendRecord

BLOCK = 256  # records a compressed block holds
_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(SpendRecord)))


class _Block(NamedTuple):
    first: float  # the earliest and latest record time in the block (records are not strictly in time order)
    last: float
    size: int  # records in the block
    data: bytes | tuple[SpendRecord, ...]  # compressed, or the records themselves if pickle could not write one


class RecordRing:
    """The newest `max_records` records, and the block still being filled; older ones pushed out a block at a time."""

    def __init__(self, max_records: int, block: int = BLOCK) -> None:
        if max_records < 1 or block < 1:
            raise ValueError("max_records and block must be at least 1")
        self.max_records = max_records
        self._block = min(block, max_records)
        self._fresh: list[SpendRecord] = []
        self._blocks: deque[_Block] = deque()
        self._compacted = 0  # records in _blocks
        self._compact_scheduled = False
        self.dropped = 0  # records pushed out of the ring

    def __len__(self) -> int:
        return self._compacted + len(self._fresh)

    def append(self, record: SpendRecord) -> None:
        self._fresh.append(record)
        if len(self._fresh) < self._block:
            return
        if self._compact_scheduled:
            if len(self._fresh) >= 2 * self._block:  # the loop that was to compact has stopped
                self._compact()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._compact()
            return
        self._compact_scheduled = True
        loop.call_soon(self._compact)

    def records(self, since: float = 0.0, until: float | None = None) -> Iterator[SpendRecord]:
        """The records of the period [since, until), oldest first."""
        for r in self._held(since, until):
            if r.time >= since and (until is None or r.time < until):
                yield r

    def _held(self, since: float, until: float | None) -> Iterator[SpendRecord]:
        """Every record of the blocks whose time range overlaps the period, then the fresh ones."""
        for b in list(self._blocks):
            if b.last < since or (until is not None and b.first >= until):
                continue
            if isinstance(b.data, tuple):
                yield from b.data
            else:
                yield from (SpendRecord(*v) for v in pickle.loads(zlib.decompress(b.data)))
        yield from list(self._fresh)

    def _compact(self) -> None:
        self._compact_scheduled = False
        while len(self._fresh) >= self._block:
            chunk, self._fresh = self._fresh[: self._block], self._fresh[self._block :]
            times = [r.time for r in chunk]
            data: bytes | tuple[SpendRecord, ...]
            try:
                data = zlib.compress(pickle.dumps([_FIELDS(r) for r in chunk], pickle.HIGHEST_PROTOCOL), 1)
            except Exception:  # a field holding what pickle cannot write (a bug upstream): kept as it is
                data = tuple(chunk)
            self._blocks.append(_Block(min(times), max(times), len(chunk), data))
            self._compacted += len(chunk)
        while self._blocks and len(self) > self.max_records:
            oldest = self._blocks.popleft()
            self._compacted -= oldest.size
            self.dropped += oldest.size
