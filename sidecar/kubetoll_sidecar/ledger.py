"""The spend ledger: one `SpendRecord` per settled request.

The in-memory ledger keeps a bounded ring for one process (`kubetoll run`, the
demo, a sidecar without a shared store), compressed (`record_ring`); the Redis
ledger (`ledger_redis`) appends to a stream per namespace.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from kubetoll_core.spend_record import SpendRecord

from .record_ring import RecordRing


class Ledger(Protocol):
    # Whose records `read` returns: "sidecar" (this process) or "namespace" (every sidecar's).
    scope: str

    @property
    def dropped(self) -> int:
        """Records lost: pushed out of a ring, or refused by a full write buffer."""
        ...

    def append(self, record: SpendRecord) -> None:
        """Never blocks the request; a shared ledger buffers and writes in the background."""
        ...

    def append_refusal(self, record: SpendRecord) -> None:
        """A refusal record (`SpendRecord.refusal`): for the operator's status, never read back as spend."""
        ...

    def records(self, since: float = 0.0, until: float | None = None) -> Iterable[SpendRecord]:
        """This process's records, without I/O."""
        ...

    async def read(self, since: float = 0.0, until: float | None = None) -> list[SpendRecord]:
        """Every record of `scope` in the period (a shared ledger reads its store)."""
        ...

    async def close(self) -> None: ...


class InMemoryLedger:
    scope = "sidecar"

    def __init__(self, max_records: int = 100_000) -> None:
        self._records = RecordRing(max_records)  # held compressed: ~20 bytes a record, not ~500

    @property
    def dropped(self) -> int:
        """Records pushed out of the ring (reported by /v1/kubetoll/spend)."""
        return self._records.dropped

    def append(self, record: SpendRecord) -> None:
        self._records.append(record)

    def append_refusal(self, record: SpendRecord) -> None:
        # One process, no operator reading a shared stream: the 429, the access log and
        # kubetoll_rejections_total already say it, and refusals are not spend.
        return None

    def records(self, since: float = 0.0, until: float | None = None) -> Iterable[SpendRecord]:
        return self._records.records(since, until)

    async def read(self, since: float = 0.0, until: float | None = None) -> list[SpendRecord]:
        return list(self.records(since, until))

    async def close(self) -> None:
        return None
