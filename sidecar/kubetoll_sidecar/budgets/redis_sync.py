"""Settled spend on its way to Redis, and the one Lua call per sync that writes it.

`SpendBuffer` collects what requests settled (per-meter deltas and ledger
records) into an open batch; a sync freezes it into a numbered `Batch`, sends it
with the lease renewals in one `SYNC` script call per home slot, and drops it
once every slot confirmed. Redis remembers the last batch number per sidecar,
so a retry after a lost reply is applied once (the script answers "dup").

`SyncCall` is one script call being assembled: its keys (by index, as the
script reads them), its meters and budgets. `SyncScript` loads the script and
calls it, loading it again when Redis restarted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import NoScriptError

from .leases import Lease
from .redis_scripts import SYNC

MAX_METERS_PER_CALL = 500  # a script runs alone in Redis: keep each one short


@dataclass(slots=True)
class Batch:
    no: int
    deltas: dict[str, int]
    records: list[list[str]]
    homes: set[str]  # home tags whose part is not confirmed yet
    quarantined: list[list[str]] = field(default_factory=list)  # for the quarantine stream, not the ledger


@dataclass(slots=True)
class SyncCall:
    home: str
    keys: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    meters: list[dict[str, Any]] = field(default_factory=list)
    leases: list[tuple[Lease, int]] = field(default_factory=list)  # (state, delta applied in this call)
    budgets: list[str] = field(default_factory=list)
    budget_entries: list[list[Any]] = field(default_factory=list)
    batch: int = 0
    records: list[list[str]] = field(default_factory=list)
    quarantined: list[list[str]] = field(default_factory=list)
    new_budgets: list[str] = field(default_factory=list)

    def key(self, k: str) -> int:
        """The script's 1-based index of key `k`, adding it the first time."""
        i = self.index.get(k)
        if i is None:
            self.keys.append(k)
            i = self.index[k] = len(self.keys)
        return i


class SpendBuffer:
    """Spend and ledger records not written yet: the open batch and at most one frozen batch in flight."""

    def __init__(self, batch_records: int, max_buffered_records: int) -> None:
        self.batch_records = batch_records
        self.max_buffered_records = max_buffered_records
        self.open_deltas: dict[str, int] = {}
        self.open_records: deque[list[str]] = deque()
        # Records the codec had to alter: written with the same batch, to the quarantine
        # stream instead of the ledger, so one odd record never stops a flush.
        self.open_quarantined: deque[list[str]] = deque()
        self.open_since: float | None = None  # monotonic: when the open batch got its first entry
        self.frozen: Batch | None = None
        self.batch_no = 0
        self.records_peak = 0
        self.changes = 0  # grows with every entry added: tells whether a journal written earlier is still whole

    # ------------------------------------------------------------------ filling

    def add_spend(self, meter_key: str, units: int, mono: float) -> None:
        self.changes += 1
        self.open_deltas[meter_key] = self.open_deltas.get(meter_key, 0) + units
        if self.open_since is None:
            self.open_since = mono

    def add_record(self, fields: list[str], mono: float, quarantine: bool = False) -> bool:
        """Queue one encoded ledger record. False when the buffer is full (the record is dropped)."""
        if self.buffered_records >= self.max_buffered_records:
            return False
        self.changes += 1
        if quarantine:
            self.open_quarantined.append(fields)
            if self.open_since is None:
                self.open_since = mono
            return True
        self.open_records.append(fields)
        if self.open_since is None:
            self.open_since = mono
        n = len(self.open_records)
        if n > self.records_peak:
            self.records_peak = n
        return True

    # ------------------------------------------------------------------ state

    @property
    def buffered_records(self) -> int:
        frozen = self.frozen
        open_ = len(self.open_records) + len(self.open_quarantined)
        return open_ + (len(frozen.records) + len(frozen.quarantined) if frozen else 0)

    @property
    def buffered_meters(self) -> int:
        return len(self.open_deltas) + (len(self.frozen.deltas) if self.frozen else 0)

    @property
    def open_full(self) -> bool:
        return len(self.open_records) >= self.batch_records

    def has_open(self) -> bool:
        return bool(self.open_deltas or self.open_records or self.open_quarantined)

    def pending(self) -> bool:
        """Anything not confirmed written: open or in flight."""
        return bool(self.frozen or self.has_open())

    # ------------------------------------------------------------------ a sync

    def freeze(self, mono: float, home_of: Callable[[str | None], str]) -> Batch | None:
        """Turn the open batch into the numbered batch this sync sends (unless one is still in flight)."""
        if self.frozen is not None or not self.has_open():
            return self.frozen
        self.batch_no += 1
        recs = [self.open_records.popleft() for _ in range(min(self.batch_records, len(self.open_records)))]
        quar = [self.open_quarantined.popleft() for _ in range(min(self.batch_records, len(self.open_quarantined)))]
        deltas = self.open_deltas
        self.open_deltas = {}
        if len(deltas) > MAX_METERS_PER_CALL:
            keep = list(deltas)[MAX_METERS_PER_CALL:]
            self.open_deltas = {k: deltas.pop(k) for k in keep}
        homes = {home_of(k.split(":", 1)[0]) for k in deltas}  # a meter key starts with its budget
        if recs or quar:
            homes.add(home_of(None))
        self.frozen = Batch(self.batch_no, deltas, recs, homes, quar)
        self.open_since = mono if self.has_open() else None
        return self.frozen

    def unwritten(self, home_of: Callable[[str | None], str]) -> list[Batch]:
        """Everything not confirmed, as the batches this buffer will send, numbered as they will be.

        The batch in flight, then the open entries cut exactly as `freeze` will cut them
        (the first `batch_records` records, the first MAX_METERS_PER_CALL meters). So a
        journal of this and the flushes that follow agree batch by batch: a later batch
        `n` holds what this batch `n` holds, and perhaps more. Changes nothing.
        """
        out: list[Batch] = []
        if self.frozen is not None:
            f = self.frozen
            out.append(Batch(f.no, dict(f.deltas), list(f.records), set(f.homes), list(f.quarantined)))
        recs, quar, deltas = list(self.open_records), list(self.open_quarantined), dict(self.open_deltas)
        no = self.batch_no
        n = self.batch_records
        while recs or quar or deltas:
            no += 1
            r, recs = recs[:n], recs[n:]
            q, quar = quar[:n], quar[n:]
            keys = list(deltas)[:MAX_METERS_PER_CALL]
            d = {k: deltas.pop(k) for k in keys}
            homes = {home_of(k.split(":", 1)[0]) for k in d}
            if r or q:
                homes.add(home_of(None))
            out.append(Batch(no, d, r, homes, q))
        return out

    def confirmed(self, home: str, batch_no: int) -> None:
        if self.frozen is not None and self.frozen.no == batch_no:
            self.frozen.homes.discard(home)

    def release_if_done(self) -> bool:
        """Drop the frozen batch once every home confirmed it. True when it was dropped."""
        if self.frozen is not None and not self.frozen.homes:
            self.frozen = None
            return True
        return False


class SyncScript:
    """The SYNC script in one Redis: loaded once, loaded again after NOSCRIPT (Redis restarted or flushed)."""

    def __init__(self, client: Any, count_call: Callable[[], None]) -> None:
        self._client = client
        self._count = count_call
        self._sha: str | None = None

    async def load(self) -> None:
        self._count()
        self._sha = await self._client.script_load(SYNC)

    async def call(self, keys: list[str], body: bytes) -> list[Any]:
        if self._sha is None:
            await self.load()
        self._count()
        try:
            return await self._client.evalsha(self._sha, len(keys), *keys, body)
        except NoScriptError:
            await self.load()
            self._count()
            return await self._client.evalsha(self._sha, len(keys), *keys, body)
