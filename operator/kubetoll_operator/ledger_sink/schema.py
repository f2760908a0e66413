"""The sink's PostgreSQL schema: the migrations shipped in `migrations/`, applied in order.

Each file `NNNN_<what>.sql` runs once, in name order, and is recorded in
`kubetoll_schema_migrations`. Everything happens in one transaction that first
takes a transaction-level advisory lock, so two sinks starting together (two
operator replicas) apply each migration once: the second waits on the lock, then
finds the migrations recorded and applies nothing. PostgreSQL's DDL is
transactional, so a migration that fails leaves the schema as it was.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

MIGRATIONS_TABLE = "kubetoll_schema_migrations"
RECORDS_TABLE = "kubetoll_spend_records"
# pg_advisory_xact_lock key: "kubetoll" read as ASCII, so it does not collide with an application's small numbers.
ADVISORY_LOCK_KEY = 0x6B756265746F6C6C

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[str, str]]:
    """(version, SQL) of every shipped migration, in order. The version is the file name without `.sql`."""
    folder = resources.files(__package__ or "kubetoll_operator.ledger_sink") / "migrations"
    out: list[tuple[str, str]] = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            if not _NAME.match(entry.name):
                raise RuntimeError(f"migration file name {entry.name!r} must be NNNN_<lowercase words>.sql")
            out.append((entry.name[: -len(".sql")], entry.read_text(encoding="utf-8")))
    out.sort()
    numbers = [v[:4] for v, _ in out]
    if len(set(numbers)) != len(numbers):
        raise RuntimeError(f"two migrations share a number: {numbers}")
    return out


async def migrate(conn: Any) -> list[str]:
    """Apply the migrations this database has not had; returns the versions applied (empty when up to date).

    `conn` is a psycopg AsyncConnection not inside a transaction.
    """
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
            "version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE}")
        done = {row[0] for row in await cur.fetchall()}
        for version, sql in migrations():
            if version in done:
                continue
            await conn.execute(sql)  # no parameters: the file may hold several statements
            await conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (version) VALUES (%s)", (version,))
            applied.append(version)
    return applied
