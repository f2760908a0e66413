"""Reading spend records back from the sink's table: what `kubetoll report --database-url` reads.

The same records `kubetoll_core.ledger_stream.read_ledger` gives from Redis (settlement
time in `[since, until)`, refusal records left out unless asked for), in stream order, for
periods older than Redis keeps.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubetoll_core.spend_record import SpendRecord

from .redact import scrub
from .schema import RECORDS_TABLE
from .sink import RECORD_COLUMNS

_SELECT = f"SELECT {', '.join(RECORD_COLUMNS)} FROM {RECORDS_TABLE} WHERE namespace = %s AND time >= %s"


class ReadError(Exception):
    """The table could not be read; the text holds no password."""


def record_of(row: tuple[Any, ...]) -> SpendRecord:
    values = dict(zip(RECORD_COLUMNS, row))
    values["time"] = values["time"].timestamp()
    tags = values["tags"] or {}
    # The record's canonical form (kubetoll_core.attribution): pairs sorted by key, joined by ",".
    values["tags"] = ",".join(f"{k}={tags[k]}" for k in sorted(tags))
    return SpendRecord(**values)


async def read_records(
    database_url: str, namespace: str, since: float = 0.0, until: float | None = None, refusals: bool = False
) -> list[SpendRecord]:
    import psycopg

    sql = _SELECT
    params: list[Any] = [namespace, datetime.fromtimestamp(since, UTC)]
    if until is not None:
        sql += " AND time < %s"
        params.append(datetime.fromtimestamp(until, UTC))
    if not refusals:
        sql += " AND refused_meter = ''"
    # Stream order: entry ids compare as (milliseconds, sequence).
    sql += " ORDER BY flushed_at, split_part(stream_id, '-', 2)::numeric"
    try:
        async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=10) as conn:
            cur = await conn.execute(sql, params)
            return [record_of(row) for row in await cur.fetchall()]
    except psycopg.Error as exc:
        raise ReadError(scrub(" ".join(f"{type(exc).__name__}: {exc}".split()), database_url)) from None
