"""The recent spend records a sidecar holds, compressed (record_ring.py): exact, bounded, small, off the request."""

from __future__ import annotations

import asyncio
import dataclasses
import tracemalloc

import pytest

from kubetoll_core.spend_record import SpendRecord
from kubetoll_sidecar.ledger import InMemoryLedger
from kubetoll_sidecar.record_ring import BLOCK, RecordRing


def record(i: int, t0: float = 1_790_000_000.0) -> SpendRecord:
    """A request's record as the pipeline writes it, its values varying with i (every field type set)."""
    return SpendRecord(
        time=t0 + i * 0.01,
        namespace="shop",
        route="chat",
        backend="primary" if i % 3 else "gpu",
        tenant=f"tenant-{i % 97}",
        tier="free",
        prompt_tokens=61 + i % 13,
        completion_tokens=16 + i % 7,
        cached_tokens=i % 5,
        cost_usd=0.000184 * (1 + i % 11) / 3,
        cache_hit="semantic" if i % 17 == 0 else "",
        avoided_usd=0.000184 if i % 17 == 0 else 0.0,
        downgraded=i % 2 == 0,
        fallbacks=i % 3,
        outcome="ok",
        request_id=f"8d8751be070a{i:010x}",
        workload="Deployment/search-api",
        experiment="prompt-v2" if i % 4 == 0 else "",
        arm="b" if i % 8 == 0 else "",
        cascade_step=i % 2,
        cascade_baseline_usd=0.001 if i % 2 else 0.0,
        latency_ms=0.3 + i * 1e-4,
        tags="feature=search,team=ü" if i % 5 == 0 else "",
        session=f"s{i // 10}",
        outcome_value=float(i % 3),
        model="gpt-4o-mini",
    )


def test_every_field_round_trips_in_order():
    ring = RecordRing(10_000)
    written = [record(i) for i in range(3 * BLOCK + 17)]  # three compressed blocks and a partial one
    for r in written:
        ring.append(r)
    assert len(ring) == len(written)
    got = list(ring.records())
    assert got == written
    # Types too (a float 0.0 stays a float, a bool a bool, an int an int).
    for a, b in zip(got, written):
        for f in dataclasses.fields(SpendRecord):
            assert type(getattr(a, f.name)) is type(getattr(b, f.name)), f.name


def test_a_period_reads_only_its_records():
    ring = RecordRing(10_000)
    written = [record(i) for i in range(5 * BLOCK)]
    for r in written:
        ring.append(r)
    since, until = written[300].time, written[900].time
    assert list(ring.records(since, until)) == written[300:900]
    assert list(ring.records(written[-1].time + 1)) == []
    assert list(ring.records(0.0, written[0].time)) == []


def test_the_oldest_records_are_pushed_out_and_counted():
    ring = RecordRing(1_000, block=100)
    written = [record(i) for i in range(2_550)]
    for r in written:
        ring.append(r)
    kept = list(ring.records())
    assert len(kept) <= 1_000 + 100  # the bound, plus the block being filled
    assert kept == written[-len(kept) :]  # the newest, in order
    assert ring.dropped == len(written) - len(kept)
    assert ring.dropped >= 1_500


def test_a_ring_smaller_than_a_block():
    ring = RecordRing(3)
    for i in range(10):
        ring.append(record(i))
    kept = list(ring.records())
    assert kept == [record(i) for i in range(10)][-len(kept) :] and 1 <= len(kept) <= 6
    assert ring.dropped == 10 - len(kept)


def test_the_ledger_reports_what_its_ring_dropped():
    ledger = InMemoryLedger(max_records=BLOCK)
    for i in range(3 * BLOCK):
        ledger.append(record(i))
    assert ledger.dropped == 3 * BLOCK - len(list(ledger.records()))
    assert ledger.dropped >= BLOCK


def test_a_full_ring_is_small():
    """100,000 records as objects take ~48 MiB; compressed, a few."""
    tracemalloc.start()
    try:
        ring = RecordRing(100_000)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            ring.append(record(i))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(ring) == 100_000
    assert held < 8 * 2**20, f"{held / 2**20:.1f} MiB for 100,000 records"


async def test_on_a_loop_the_block_is_compressed_after_the_step_that_filled_it():
    """The step that appends a block's last record is the one that writes the answer: the
    compression waits for the loop's next turn."""
    ring = RecordRing(10_000)
    for i in range(BLOCK):
        ring.append(record(i))
    assert ring._compacted == 0 and len(ring._fresh) == BLOCK  # not yet: still this step
    await asyncio.sleep(0)
    assert ring._compacted == BLOCK and ring._fresh == []
    assert list(ring.records()) == [record(i) for i in range(BLOCK)]


def test_a_ring_whose_loop_stopped_still_compresses():
    """A compaction scheduled on a loop that stopped before running it: at twice a block
    pending, the ring compresses at once rather than grow."""
    ring = RecordRing(10_000)
    ring._compact_scheduled = True  # what a loop that never ran its callback leaves behind
    for i in range(2 * BLOCK - 1):
        ring.append(record(i))
    assert len(ring._fresh) == 2 * BLOCK - 1  # still waiting for that loop
    ring.append(record(2 * BLOCK - 1))
    assert ring._fresh == [] and ring._compacted == 2 * BLOCK and not ring._compact_scheduled
    assert list(ring.records()) == [record(i) for i in range(2 * BLOCK)]


def test_a_block_pickle_cannot_write_is_kept_as_it_is():
    """A record holding something pickle cannot write (a bug elsewhere) costs that block its
    compression, never the records, the bound or the next blocks."""
    ring = RecordRing(10_000)
    odd = dataclasses.replace(record(5), tags=lambda: None)  # type: ignore[arg-type]
    written = [record(i) for i in range(5)] + [odd] + [record(i) for i in range(6, 2 * BLOCK)]
    for r in written:
        ring.append(r)
    assert list(ring.records()) == written
    assert isinstance(ring._blocks[0].data, tuple) and isinstance(ring._blocks[1].data, bytes)


@pytest.mark.parametrize("bad", [0, -1])
def test_a_ring_needs_room(bad):
    with pytest.raises(ValueError):
        RecordRing(bad)
