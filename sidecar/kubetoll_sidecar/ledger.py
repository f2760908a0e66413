"""The spend ledger: one record per settled request.

Reports (`kubetoll report`), the operator's budget status and the demo read spend
per tenant, route and backend from it. The in-memory ledger keeps a bounded ring
for one process; the Redis ledger appends to a stream per namespace.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol


# The outcome of a record that bills a semantic cache lookup's embedding call: spend,
# but not a request of its own (reports count requests without it).
CACHE_EMBEDDING_OUTCOME = "cache_embedding"


@dataclass(frozen=True, slots=True)
class SpendRecord:
    time: float  # epoch seconds, at settlement
    namespace: str
    route: str
    backend: str  # "" when no backend was called (a cache hit)
    tenant: str
    tier: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float
    cache_hit: str = ""  # "", "exact", "semantic"
    avoided_usd: float = 0.0  # what a cache hit saved
    downgraded: bool = False
    fallbacks: int = 0
    outcome: str = "ok"  # ok, upstream_error, cut_stream, client_disconnected, cache_embedding
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Ledger(Protocol):
    def append(self, record: SpendRecord) -> None:
        """Never blocks the request; a shared ledger buffers and writes in the background."""
        ...

    def records(self, since: float = 0.0, until: float | None = None) -> Iterable[SpendRecord]: ...

    async def close(self) -> None: ...


class InMemoryLedger:
    def __init__(self, max_records: int = 100_000) -> None:
        self._records: deque[SpendRecord] = deque(maxlen=max_records)
        self.dropped = 0  # records pushed out of the ring (reported by /v1/kubetoll/spend)

    def append(self, record: SpendRecord) -> None:
        if len(self._records) == self._records.maxlen:
            self.dropped += 1
        self._records.append(record)

    def records(self, since: float = 0.0, until: float | None = None) -> Iterable[SpendRecord]:
        for r in list(self._records):
            if r.time >= since and (until is None or r.time < until):
                yield r

    async def close(self) -> None:
        return None
