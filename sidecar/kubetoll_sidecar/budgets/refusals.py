"""Which admission refusals become refusal records in the ledger.

The operator's TokenBudget status needs to know that a meter refuses, not how
often: a reservation stops fitting before spend reaches the limit, and from then
on every request under that meter gets a 429 while the totals stay just below it.
One record per meter per `interval` seconds per sidecar says that, and keeps a
client that retries in a tight loop from filling the ledger's write buffer (which
spend records share).
"""

from __future__ import annotations

from dataclasses import dataclass, field

REFUSAL_RECORD_INTERVAL = 1.0  # seconds between two refusal records of one meter from one sidecar


@dataclass
class RefusalSampler:
    interval: float = REFUSAL_RECORD_INTERVAL
    max_meters: int = 50_000  # past this the memory starts over (a few extra records, nothing more)
    last: dict[str, float] = field(default_factory=dict)  # meter key -> wall time of its last record

    def due(self, meter_key: str, now: float) -> bool:
        """Whether a refusal on this meter at `now` gets a record (and, if so, note it)."""
        t = self.last.get(meter_key)
        if t is not None and 0.0 <= now - t < self.interval:
            return False
        if t is None and len(self.last) >= self.max_meters:
            self.last.clear()
        self.last[meter_key] = now
        return True
