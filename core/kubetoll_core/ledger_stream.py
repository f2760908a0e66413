"""Reading the spend ledger stream and the meter totals from Redis: for reports, the operator and the sidecar.

The sidecars write both in the same Lua script (docs/redis-layout.md): the stream
`kt:{<ns>}:ledger` holds one entry per spend (or refusal) record, fields as in `SpendRecord`
plus `cost_nusd` (exact integer nano-USD) and `sidecar`; entry ids are Redis
time at the flush. Each meter's state hash holds its settled total, limit and
leases.

`read_ledger` gives spend records by settlement time (refusal records left
out); `read_ledger_page` reads every entry forward from a cursor (the operator
counts the day's cache hits and notes refusals reading each entry once);
`period_totals` lists every meter of a namespace or budget, which is what the
TokenBudget status shows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .redis_keys import RedisKeys, check_name
from .spend_record import SpendRecord, decode_record

# How far before `since` the reader starts: a record's entry id is the flush time,
# never earlier than its settlement time unless Redis's clock is behind the sidecar's.
CLOCK_SKEW_MS = 300_000


async def iter_ledger(
    client: Any,
    namespace: str,
    since: float = 0.0,
    until: float | None = None,
    page: int = 1000,
    refusals: bool = False,
) -> AsyncIterator[SpendRecord]:
    """Records of one namespace with `since <= time < until` (settlement time), oldest flush first.

    Refusal records only with `refusals`: they are no spend and no request served,
    and reports count requests.
    """
    after = ledger_start_id(since)
    while True:
        records, last, n = await read_ledger_page(client, namespace, after, page)
        for r in records:
            if r.refusal and not refusals:
                continue
            if r.time >= since and (until is None or r.time < until):
                yield r
        if n < page:
            return
        after = last


def ledger_start_id(since: float) -> str:
    """The entry id to read after (exclusive) so that no record settled at or after `since` is missed."""
    ms = int(since * 1000) - CLOCK_SKEW_MS
    return f"{ms - 1}-{2**64 - 1}" if ms > 0 else "0-0"


async def read_ledger_page(
    client: Any, namespace: str, after: str, count: int = 1000
) -> tuple[list[SpendRecord], str, int]:
    """Up to `count` entries after entry id `after` (exclusive; "0-0" for the start of the stream; Redis 6.2+).

    Returns the records, the id to pass as `after` next time (unchanged when nothing was
    read) and how many entries were read. For readers that keep a cursor (the operator
    counts cache hits of the day this way, reading each entry once).
    """
    entries = await client.xrange(RedisKeys(namespace).ledger(), min=f"({after}", max="+", count=count)
    if not entries:
        return [], after, 0
    return [decode_record(fields) for _, fields in entries], entries[-1][0], len(entries)


async def read_ledger(client: Any, namespace: str, since: float = 0.0, until: float | None = None) -> list[SpendRecord]:
    return [r async for r in iter_ledger(client, namespace, since, until)]


@dataclass(frozen=True, slots=True)
class MeterTotal:
    budget: str
    meter: str  # the meter key without the budget prefix, e.g. "cap:usd:2026-11" or "tier:free:t:acme:usd:2026-11-22"
    kind: str  # "window" | "bucket"
    unit: str
    label: str
    scale: int
    limit_units: int
    spent_units: int  # window: settled spend; bucket: level outside leases
    leased_units: int  # leased to sidecars (reserved or about to be)
    period: str  # window: period id ("2026-11-22", "2026-11")
    period_end: float  # window: epoch seconds

    @property
    def limit(self) -> float:
        return self.limit_units / self.scale

    @property
    def spent(self) -> float:
        return self.spent_units / self.scale

    @property
    def leased(self) -> float:
        return self.leased_units / self.scale

    @property
    def remaining(self) -> float:
        """Window: limit - spent - leased (what no sidecar holds yet)."""
        return (self.limit_units - self.spent_units - self.leased_units) / self.scale

    @property
    def percent(self) -> float:
        return 100.0 * self.spent_units / self.limit_units if self.limit_units > 0 else 100.0


async def period_totals(
    client: Any, namespace: str, budget: str | None = None, kind: str | None = "window", min_expiry: float | None = None
) -> list[MeterTotal]:
    """Every live meter of a budget (or of every budget of the namespace), as stored in Redis.

    `min_expiry` (epoch seconds) skips meters whose keys expire before it (the meter
    index's score): `now + RETENTION_AFTER_PERIOD["day"]` leaves out the day windows of
    past days and idle buckets, so a reader of the current period does not fetch weeks
    of history (month windows of the past year still come; filter on `period`).
    """
    keys = RedisKeys(namespace)
    if budget is None:
        budgets = sorted(await client.smembers(keys.budgets_index()))
    else:
        budgets = [check_name("budget", budget)]
    out: list[MeterTotal] = []
    for b in budgets:
        if min_expiry is None:
            suffixes = await client.zrange(keys.meter_index(b), 0, -1)
        else:
            suffixes = await client.zrangebyscore(keys.meter_index(b), int(min_expiry * 1000), "+inf")
        if not suffixes:
            continue
        pipe = client.pipeline(transaction=False)
        for s in suffixes:
            pipe.hgetall(keys.meter_named(b, s).state)
        for s, h in zip(suffixes, await pipe.execute()):
            if not h or (kind is not None and h.get("kind") != kind):
                continue
            out.append(
                MeterTotal(
                    budget=b,
                    meter=s,
                    kind=h.get("kind", ""),
                    unit=h.get("unit", ""),
                    label=h.get("label", ""),
                    scale=int(h.get("scale", 1)),
                    limit_units=int(h.get("limit", 0)),
                    spent_units=int(h.get("spent", h.get("level", 0))),
                    leased_units=int(h.get("leased", 0)),
                    period=h.get("period", ""),
                    period_end=int(h.get("period_end", 0)) / 1000.0,
                )
            )
    return out
