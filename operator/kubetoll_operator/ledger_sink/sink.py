"""Draining every namespace's ledger stream from Redis into PostgreSQL, exactly once.

Per namespace stream `kt:{<ns>}:ledger` the sink is one consumer of a consumer
group (`--group`, default `kubetoll-ledger-sink`; the replicas of one sink are
consumers of the same group and share the entries). One pass, per namespace:

1. its own pending entries (XREADGROUP from id 0): delivered before, not acked,
   e.g. the batch a failed insert left;
2. entries other consumers left pending longer than `claim_idle_ms` (XAUTOCLAIM):
   a sink that crashed, or a replica that went away;
3. new entries (XREADGROUP `>`).

Each batch is inserted in one transaction (`INSERT ... ON CONFLICT (id) DO
NOTHING`, the id being `<namespace>/<rid>`, the writer's own id of the record,
or `<namespace>/<entry id>` for an entry without one), and XACKed only after the commit.
A crash between the commit and the ack leaves the entries pending: they are read
again, inserted again as nothing, and acked, so a row is never written twice and
an entry is never acked unwritten. With PostgreSQL away nothing is acked: the
entries stay pending in Redis and the pass is retried with a backoff.

An entry Redis trimmed (`XADD MINID`, the stream's retention) while it was
pending comes back without fields: it is acked and counted as lost
(`kubetoll_ledger_sink_entries_lost_total`), which only happens when the sink
was behind by more than the stream's retention.

Namespaces are found by scanning for the ledger keys (`kt:{*}:ledger`), every
`discover_interval` seconds, so the sink needs no Kubernetes access.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from kubetoll_core.redis_keys import PREFIX, RedisKeys, check_name
from kubetoll_core.spend_record import SpendRecord, decode_record

from .metrics import SinkMetrics
from .redact import redact_url, scrub
from .schema import RECORDS_TABLE, migrate

log = logging.getLogger("kubetoll.ledger_sink")

DEFAULT_GROUP = "kubetoll-ledger-sink"
_LEDGER_KEY = re.compile(r"^" + re.escape(PREFIX) + r":\{([^{}:]+)\}:ledger$")
_INT64 = 2**63 - 1
_MIN_TS, _MAX_TS = -62_135_596_800.0, 253_402_300_799.0  # years 1 and 9999

# Record fields stored in a column of their own, in column order; `time` as timestamptz, `tags` as jsonb.
RECORD_COLUMNS: tuple[str, ...] = (
    "time", "namespace", "route", "backend", "tenant", "tier", "workload", "prompt_tokens", "completion_tokens",
    "cached_tokens", "cost_usd", "cache_hit", "avoided_usd", "downgraded", "fallbacks", "outcome", "request_id",
    "refused_budget", "refused_meter", "batch_id", "experiment", "arm", "cascade", "cascade_step", "escalation",
    "cascade_baseline_usd", "latency_ms", "session", "business_outcome", "outcome_value", "spillover", "tags",
    "model",
)  # fmt: skip
# Stream fields that are not record fields but have a column.
ENTRY_COLUMNS = ("cost_nusd", "sidecar")
COLUMNS = ("id", "stream_id", "flushed_at", *RECORD_COLUMNS, *ENTRY_COLUMNS, "extra")
_INSERT = (
    f"INSERT INTO {RECORDS_TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
    "ON CONFLICT (id) DO NOTHING"
)
# The record's id as its writer gave it (sidecar/batch/index, redis_scripts.py): the row's id when present,
# so a record re-sent after Redis lost its data is not a second row. Older writers' entries have none.
RECORD_ID_FIELD = "rid"
_RECORD_ID = re.compile(r"[A-Za-z0-9._-]{1,100}/\d{1,20}/\d{1,10}")
_KNOWN_FIELDS = frozenset(RECORD_COLUMNS) | frozenset(ENTRY_COLUMNS) | {RECORD_ID_FIELD}
_RECORD_FIELD_NAMES = frozenset(f.name for f in fields(SpendRecord))


class DatabaseUnavailable(Exception):
    """PostgreSQL refused or failed a write; the entries stay pending in Redis. Its text holds no password."""


def row_of(namespace: str, entry_id: str, entry: Mapping[str, str]) -> tuple[Any, ...]:
    """The table row of one stream entry: the record's columns, what no column holds in `extra`."""
    record = decode_record(entry)
    values = record.to_dict()
    extra: dict[str, Any] = {k: v for k, v in entry.items() if k not in _KNOWN_FIELDS}
    changed: list[str] = []

    def text(name: str, v: str) -> str:
        if "\x00" in v:  # PostgreSQL text (and jsonb) cannot hold NUL: written as the codec escapes odd text
            changed.append(name)
            return v.replace("\x00", "\\x00")
        return v

    rid = entry.get(RECORD_ID_FIELD, "")
    if rid and not _RECORD_ID.fullmatch(rid):
        extra[RECORD_ID_FIELD] = rid  # not a writer's id: kept, and the row keyed on the entry as before
        rid = ""
    row: list[Any] = [f"{namespace}/{rid or entry_id}", entry_id, _entry_time(entry_id)]
    for name in RECORD_COLUMNS:
        v = values[name]
        if name == "time":
            if math.isfinite(v) and _MIN_TS < v < _MAX_TS:
                row.append(datetime.fromtimestamp(v, UTC))
            else:  # beyond what timestamptz holds: the epoch, and the text as written in `extra`
                row.append(datetime.fromtimestamp(0, UTC))
                extra["time"] = entry.get("time", "")
        elif name == "tags":
            tags = {text("tags", k): text("tags", t) for k, t in record.tag_map.items()}
            row.append(json.dumps(tags))
        elif name == "namespace":
            # The stream's namespace (the row's id is made of it); a record naming another is kept in `extra`.
            row.append(namespace)
            if v != namespace:
                extra["namespace"] = v
        elif type(v) is int and abs(v) > _INT64:  # bigint holds any real count; keep the odd one in `extra`
            extra[name] = entry.get(name, str(v))
            row.append(0)
        elif isinstance(v, str):
            row.append(text(name, v))
        else:
            row.append(v)
    nusd = entry.get("cost_nusd", "0")
    row.append(int(nusd) if re.fullmatch(r"-?\d{1,30}", nusd) else 0)
    row.append(text("sidecar", entry.get("sidecar", "")))
    kept = {text("extra", k): text("extra", v) if isinstance(v, str) else v for k, v in extra.items()}
    if changed:
        kept["nul_escaped"] = sorted(set(changed))
    row.append(json.dumps(kept))
    return tuple(row)


def _entry_time(entry_id: str) -> datetime:
    ms = entry_id.split("-", 1)[0]
    return datetime.fromtimestamp(int(ms) / 1000.0 if ms.isdigit() else 0.0, UTC)


@dataclass
class SinkOptions:
    database_url: str = field(repr=False)
    group: str = DEFAULT_GROUP
    consumer: str = ""  # default: this host's name and the process id
    namespaces: Sequence[str] = ()  # globs; empty: every namespace with a ledger stream
    batch_size: int = 500
    claim_idle_ms: int = 60_000  # another consumer's entry pending this long is taken over
    discover_interval: float = 30.0  # seconds between scans for new namespaces
    poll_interval: float = 1.0  # seconds to wait after a pass that found nothing
    retention_days: float | None = None  # delete rows settled longer ago; None keeps them
    retention_interval: float = 3600.0
    retention_batch: int = 5000
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    connect_timeout: float = 5.0


class LedgerSink:
    """One sink process: `run` until stopped, or `run_pass` for one pass (tests, `--once`)."""

    def __init__(
        self,
        redis: Any,
        options: SinkOptions,
        *,
        metrics: SinkMetrics | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        after_commit: Callable[[str, list[str]], Awaitable[None]] | None = None,
    ) -> None:
        if options.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.redis = redis
        self.options = options
        self.consumer = options.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = metrics or SinkMetrics()
        self.clock = clock
        self.monotonic = monotonic
        # Called after a batch's transaction committed and before its XACK: where tests kill the process.
        self.after_commit = after_commit
        self.where = redact_url(options.database_url)
        self._conn: Any = None
        self._namespaces: list[str] = []
        self._discovered_at: float | None = None
        self._retention_at: float | None = None
        self._groups: set[str] = set()
        self._db_down = False

    @property
    def namespaces(self) -> list[str]:
        """The namespaces the last discovery found."""
        return list(self._namespaces)

    # -- PostgreSQL

    async def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            try:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.options.database_url, connect_timeout=max(1, int(self.options.connect_timeout))
                )
            except psycopg.Error as exc:
                raise DatabaseUnavailable(self._describe(exc)) from None
        return self._conn

    def _describe(self, exc: BaseException) -> str:
        # One line: libpq's messages carry a hint on a second line.
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        return scrub(text, self.options.database_url)

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.close()
            except Exception:  # closing a broken connection: nothing more to learn from it
                pass
            self._conn = None

    async def migrate(self) -> list[str]:
        import psycopg

        conn = await self._connection()
        try:
            applied = await migrate(conn)
        except psycopg.Error as exc:
            await self._drop_connection()
            raise DatabaseUnavailable(self._describe(exc)) from None
        if applied:
            log.info("ledger sink: applied migrations %s to %s", ", ".join(applied), self.where)
        return applied

    async def _insert(self, namespace: str, entries: list[tuple[str, Mapping[str, str]]]) -> int:
        """Insert one batch in one transaction; returns the rows that were new."""
        import psycopg

        rows = [row_of(namespace, eid, f) for eid, f in entries]
        conn = await self._connection()
        try:
            async with conn.transaction():
                async with conn.cursor() as cur:
                    await cur.executemany(_INSERT, rows, returning=False)
                    written = max(cur.rowcount, 0)
        except psycopg.Error as exc:
            if conn.closed or isinstance(exc, psycopg.OperationalError):
                await self._drop_connection()
            raise DatabaseUnavailable(self._describe(exc)) from None
        return written

    # -- Redis

    async def discover(self) -> list[str]:
        """The namespaces with a ledger stream (and matching `namespaces`, when given)."""
        found: set[str] = set()
        async for key in self.redis.scan_iter(match=f"{PREFIX}:{{*}}:ledger", count=1000, _type="stream"):
            k = key.decode() if isinstance(key, bytes) else key
            m = _LEDGER_KEY.match(k)
            if not m:
                continue
            try:
                ns = check_name("namespace", m.group(1))
            except ValueError:
                continue
            if not self.options.namespaces or any(fnmatch.fnmatchcase(ns, g) for g in self.options.namespaces):
                found.add(ns)
        self._namespaces = sorted(found)
        self._discovered_at = self.monotonic()
        return self._namespaces

    async def _ensure_group(self, key: str) -> None:
        if key in self._groups:
            return
        from redis.exceptions import ResponseError

        try:
            # From the start of the stream: the sink's first run takes what Redis still holds.
            await self.redis.xgroup_create(key, self.options.group, id="0")
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(key)

    async def _read(self, key: str, start: str) -> list[tuple[str, Mapping[str, str] | None]]:
        reply = await self.redis.xreadgroup(
            self.options.group, self.consumer, {key: start}, count=self.options.batch_size
        )
        if not reply:
            return []
        streams = reply.items() if isinstance(reply, dict) else [(s, e) for s, e in reply]
        out: list[tuple[str, Mapping[str, str] | None]] = []
        for _, entries in streams:
            if entries and isinstance(entries[0], list):
                entries = entries[0]  # RESP3 ({key: [[entry, ...]]}) nests them one level deeper than RESP2
            out += [(eid, f or None) for eid, f in entries]
        return out

    async def _claim(self, key: str) -> list[tuple[str, Mapping[str, str] | None]]:
        reply = await self.redis.xautoclaim(
            key, self.options.group, self.consumer, self.options.claim_idle_ms, "0-0", count=self.options.batch_size
        )
        entries = [(eid, f or None) for eid, f in reply[1] if eid is not None]
        deleted = list(reply[2]) if len(reply) > 2 else []  # pending entries Redis trimmed (7.0+)
        return entries + [(eid, None) for eid in deleted]

    # -- one namespace

    async def drain(self, namespace: str) -> int:
        """Write what the namespace's stream holds for this sink; returns the rows written (new ones)."""
        from redis.exceptions import ResponseError

        key = RedisKeys(namespace).ledger()
        await self._ensure_group(key)
        try:
            return await self._drain(namespace, key)
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
        # The stream or its group is gone (Redis restarted empty, a failover to an empty replica, the
        # stream deleted): the group is made again and what the stream holds now is read from its start.
        log.info("ledger sink: namespace %s: the consumer group was gone; made again", namespace)
        self._groups.discard(key)
        await self._ensure_group(key)
        return await self._drain(namespace, key)

    async def _drain(self, namespace: str, key: str) -> int:
        written = 0
        for source in ("own", "claim", "new"):
            while True:
                if source == "own":
                    batch = await self._read(key, "0")
                elif source == "claim":
                    batch = await self._claim(key)
                else:
                    batch = await self._read(key, ">")
                if not batch:
                    break
                written += await self._write(namespace, key, batch)
                if len(batch) < self.options.batch_size:
                    break
        await self._observe_lag(namespace, key)
        return written

    async def _write(self, namespace: str, key: str, batch: list[tuple[str, Mapping[str, str] | None]]) -> int:
        entries = [(eid, f) for eid, f in batch if f]
        lost = [eid for eid, f in batch if not f]
        written = await self._insert(namespace, entries) if entries else 0
        ids = [eid for eid, _ in batch]
        if self.after_commit is not None:
            await self.after_commit(namespace, ids)
        await self.redis.xack(key, self.options.group, *ids)
        if lost:
            self.metrics.lost(namespace, len(lost))
            log.warning(
                "ledger sink: namespace %s: %d entries were trimmed from the stream before they were written "
                "(the sink was behind by more than the stream's retention)",
                namespace,
                len(lost),
            )
        self.metrics.written(namespace, written, len(entries) - written)
        return written

    async def _observe_lag(self, namespace: str, key: str) -> None:
        for g in await self.redis.xinfo_groups(key):
            name = g.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == self.options.group:
                pending = int(g.get("pending") or 0)
                lag = g.get("lag")  # entries not yet delivered to the group (None when Redis cannot tell)
                self.metrics.lag(namespace, pending, int(lag) if lag is not None else None)

    # -- retention

    async def enforce_retention(self) -> int:
        """Delete rows settled more than `retention_days` ago, in batches; returns how many."""
        import psycopg

        days = self.options.retention_days
        if days is None:
            return 0
        cutoff = datetime.fromtimestamp(self.clock() - days * 86_400, UTC)
        conn = await self._connection()
        deleted = 0
        try:
            while True:
                async with conn.transaction():
                    cur = await conn.execute(
                        f"DELETE FROM {RECORDS_TABLE} WHERE id IN "
                        f"(SELECT id FROM {RECORDS_TABLE} WHERE time < %s LIMIT %s)",
                        (cutoff, self.options.retention_batch),
                    )
                    n = max(cur.rowcount, 0)
                deleted += n
                if n < self.options.retention_batch:
                    break
        except psycopg.Error as exc:
            if conn.closed or isinstance(exc, psycopg.OperationalError):
                await self._drop_connection()
            raise DatabaseUnavailable(self._describe(exc)) from None
        self._retention_at = self.monotonic()
        if deleted:
            self.metrics.retention_deleted(deleted)
            log.info("ledger sink: retention: deleted %d rows settled before %s", deleted, cutoff.isoformat())
        return deleted

    # -- the loop

    async def run_pass(self) -> int:
        """Discover (when due), drain every namespace, enforce retention (when due). Raises on a failure."""
        if self._discovered_at is None or self.monotonic() - self._discovered_at >= self.options.discover_interval:
            await self.discover()
        written = 0
        failure: DatabaseUnavailable | None = None
        for ns in self._namespaces:
            try:
                written += await self.drain(ns)
            except DatabaseUnavailable as exc:
                if self._conn is None:  # the database is away: the other namespaces would fail the same way
                    raise
                # The database refused this namespace's batch (the connection is fine): the others go on.
                failure = failure or exc
        if failure is not None:
            raise failure
        if self.options.retention_days is not None and (
            self._retention_at is None or self.monotonic() - self._retention_at >= self.options.retention_interval
        ):
            await self.enforce_retention()
        if self._db_down:
            self._db_down = False
            log.info("ledger sink: PostgreSQL at %s is back; pending entries written", self.where)
        return written

    async def run(self, stop: asyncio.Event) -> None:
        """Migrate, then pass after pass until `stop` is set. Failures are logged and retried with a backoff."""
        from redis.exceptions import RedisError

        backoff = self.options.backoff_initial
        migrated = False
        while not stop.is_set():
            wait = self.options.poll_interval
            try:
                if not migrated:
                    await self.migrate()
                    migrated = True
                if await self.run_pass():
                    wait = 0.0
                backoff = self.options.backoff_initial
            except DatabaseUnavailable as exc:
                self.metrics.error("database")
                self._db_down = True
                log.warning(
                    "ledger sink: PostgreSQL at %s unavailable (%s); entries stay pending in Redis, retrying in %.1fs",
                    self.where,
                    exc,
                    backoff,
                )
                wait, backoff = backoff, min(backoff * 2, self.options.backoff_max)
            except (RedisError, OSError, TimeoutError) as exc:
                self.metrics.error("redis")
                log.warning("ledger sink: Redis failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                self._groups.clear()  # Redis may have restarted empty: groups are made again
                wait, backoff = backoff, min(backoff * 2, self.options.backoff_max)
            if wait > 0:
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                except TimeoutError:
                    pass

    async def close(self) -> None:
        await self._drop_connection()


def record_columns_missing(table_columns: Iterable[str]) -> set[str]:
    """Record fields with no column in the table (a SpendRecord field newer than the migrations)."""
    return set(_RECORD_FIELD_NAMES) - set(table_columns)
