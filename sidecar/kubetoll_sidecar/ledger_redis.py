"""The spend ledger on Redis, as the sidecar writes it.

`RedisLedger` does not write on its own: it hands each record to the Redis
budget store, whose flusher appends the records and adds the settled spend to
the period totals in the same Lua script, so the stream and the totals never
disagree (a record and its spend that arrive between two flushes land in
consecutive flushes). Reading the stream back is `kubetoll_core.ledger_stream`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kubetoll_core.ledger_stream import read_ledger
from kubetoll_core.spend_record import SpendRecord

from .budgets.redis_store import RedisBudgetStore


class RedisLedger:
    """A `Ledger` whose records ride on the budget store's flushes; `read` reads the stream back."""

    scope = "namespace"

    def __init__(self, store: RedisBudgetStore, client: Any) -> None:
        self.store = store
        self.client = client

    def append(self, record: SpendRecord) -> None:
        self.store.add_record(record)

    def append_refusal(self, record: SpendRecord) -> None:
        self.store.add_refusal(record)

    def records(self, since: float = 0.0, until: float | None = None) -> Iterable[SpendRecord]:
        """This process's recent records (no I/O); `read_ledger` reads the whole namespace."""
        return self.store.recent_records(since, until)

    async def read(self, since: float = 0.0, until: float | None = None) -> list[SpendRecord]:
        """The whole namespace's records from the stream (every sidecar's), as far as they are flushed."""
        return await read_ledger(self.client, self.store.namespace, since, until)

    @property
    def dropped(self) -> int:
        return self.store.counters.dropped_records

    async def close(self) -> None:
        return None  # the store flushes on its own close
