"""The PostgreSQL ledger sink (kubetoll_operator.ledger_sink): real Redis, real PostgreSQL, exactly once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from redis.asyncio import Redis

from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import BudgetStoreSettings
from kubetoll_core.spend_record import SpendRecord, encode_record
from kubetoll_operator.ledger_sink.metrics import SinkMetrics
from kubetoll_operator.ledger_sink.redact import redact_url, scrub
from kubetoll_operator.ledger_sink.schema import MIGRATIONS_TABLE, RECORDS_TABLE, migrate, migrations
from kubetoll_operator.ledger_sink.sink import DatabaseUnavailable, LedgerSink, SinkOptions, record_columns_missing
from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
from kubetoll_sidecar.ledger_redis import RedisLedger

REPO = Path(__file__).resolve().parents[1]
NOW = 1_795_000_000.0  # 2026-11-18


@pytest.fixture
def db(postgres_url: str):
    """A database of its own (so migrations start from nothing), dropped after the test."""
    name = f"kt_sink_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield make_conninfo(postgres_url, dbname=name)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def record(ns: str, i: int, t: float = NOW, **kw) -> SpendRecord:
    fields = dict(
        time=t,
        namespace=ns,
        route="chat",
        backend="gpt",
        tenant=f"tenant-{i % 3}",
        tier="free",
        prompt_tokens=10 + i,
        completion_tokens=5,
        cached_tokens=0,
        cost_usd=0.001 * (i + 1),
        request_id=f"req-{i}",
    )
    return SpendRecord(**{**fields, **kw})


async def write_through_sidecar_store(
    redis_url: str, ns: str, records: list[SpendRecord], sid: str | None = None
) -> None:
    """Records written as a sidecar writes them: the Redis budget store's flusher and its Lua script."""
    client = Redis.from_url(redis_url, decode_responses=True)
    before = await client.xlen(RedisKeys(ns).ledger())
    # A sidecar id per call, as each sidecar process has its own.
    sid = sid or f"sc-{uuid.uuid4().hex[:8]}"
    store = RedisBudgetStore.connect(BudgetStoreSettings(url=redis_url), ns, "/nonexistent", sidecar_id=sid)
    ledger = RedisLedger(store, store.client)
    await store.start()
    for rec in records:
        ledger.append(rec)
    await store.close(timeout=10)
    try:
        assert await client.xlen(RedisKeys(ns).ledger()) == before + len(records)
    finally:
        await client.aclose()


def sink_for(redis_url: str, database: str, ns: str, **kw) -> tuple[LedgerSink, Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    kw.setdefault("namespaces", [ns])
    return LedgerSink(client, SinkOptions(database_url=database, **kw), metrics=SinkMetrics()), client


def rows(database: str, ns: str) -> list[tuple]:
    with psycopg.connect(database) as conn:
        found = conn.execute(
            f"SELECT stream_id, request_id FROM {RECORDS_TABLE} WHERE namespace = %s", (ns,)
        ).fetchall()
    return sorted(found, key=lambda row: tuple(map(int, row[0].split("-"))))  # in stream order


async def stream_ids(r: Redis, ns: str) -> list[str]:
    return [eid for eid, _ in await r.xrange(RedisKeys(ns).ledger())]


async def pending(r: Redis, ns: str, group: str = "kubetoll-ledger-sink") -> int:
    return int((await r.xpending(RedisKeys(ns).ledger(), group))["pending"])


async def test_records_from_the_ledger_writer_land_in_postgres_once(redis_url, r, db, ns):
    other = f"{ns}b"
    recs = [record(ns, i) for i in range(25)]
    recs.append(record(ns, 99, tags="feature=search,team=a", experiment="e1", arm="b", workload="Deployment/api"))
    await write_through_sidecar_store(redis_url, ns, recs)
    await write_through_sidecar_store(redis_url, other, [record(other, i) for i in range(4)])
    sink, client = sink_for(redis_url, db, ns, namespaces=[ns, other], batch_size=7)
    try:
        assert await sink.migrate() == [v for v, _ in migrations()]
        assert await sink.run_pass() == 30
        assert sink.namespaces == sorted([ns, other])
        assert await sink.run_pass() == 0  # everything acked: nothing read again
    finally:
        await sink.close()
        await client.aclose()
    got = rows(db, ns)
    assert [s for s, _ in got] == await stream_ids(r, ns)
    assert sorted(q for _, q in got) == sorted(rec.request_id for rec in recs)
    assert len(rows(db, other)) == 4
    assert await pending(r, ns) == 0 and await pending(r, other) == 0
    assert sink.metrics.value("kubetoll_ledger_sink_rows_written_total", namespace=ns) == 26
    assert sink.metrics.value("kubetoll_ledger_sink_pending_entries", namespace=ns) == 0
    with psycopg.connect(db) as conn:
        row = conn.execute(
            f"SELECT tenant, cost_usd, cost_nusd, time, tags, experiment, arm, workload, sidecar, extra "
            f"FROM {RECORDS_TABLE} WHERE namespace = %s AND request_id = 'req-99'",
            (ns,),
        ).fetchone()
    assert row is not None
    tenant, cost, nusd, t, tags, experiment, arm, workload, sidecar, extra = row
    assert (tenant, cost, int(nusd)) == ("tenant-0", pytest.approx(0.1), 100_000_000)
    assert t.timestamp() == NOW
    assert tags == {"feature": "search", "team": "a"}
    assert (experiment, arm, workload, extra) == ("e1", "b", "Deployment/api", {})
    assert sidecar.startswith("sc-")


async def test_every_record_field_has_a_column(db):
    conn = await psycopg.AsyncConnection.connect(db)
    try:
        await migrate(conn)
        cur = await conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (RECORDS_TABLE,)
        )
        columns = [c for (c,) in await cur.fetchall()]
    finally:
        await conn.close()
    # A SpendRecord field newer than the migrations still lands (in `extra`), but it wants a migration.
    assert record_columns_missing(columns) == set(), "add a migration with a column for each new SpendRecord field"


async def test_fields_postgres_cannot_hold_are_escaped_and_fields_newer_than_the_schema_kept(redis_url, r, db, ns):
    entry = encode_record(record(ns, 1), "sc-1")
    fields = dict(zip(entry[::2], entry[1::2]))
    fields["tenant"] = "acme\x00evil"
    fields["from_the_future"] = "42"
    await r.xadd(RedisKeys(ns).ledger(), fields)
    sink, client = sink_for(redis_url, db, ns)
    try:
        await sink.migrate()
        assert await sink.run_pass() == 1
    finally:
        await sink.close()
        await client.aclose()
    with psycopg.connect(db) as conn:
        tenant, extra = conn.execute(
            f"SELECT tenant, extra FROM {RECORDS_TABLE} WHERE namespace = %s", (ns,)
        ).fetchone()
    assert tenant == "acme\\x00evil"
    assert extra == {"from_the_future": "42", "nul_escaped": ["tenant"]}
    assert await pending(r, ns) == 0


KILL_SCRIPT = """
import asyncio, os, signal, sys
from redis.asyncio import Redis
from kubetoll_operator.ledger_sink.sink import LedgerSink, SinkOptions

redis_url, database, ns, marker = sys.argv[1:5]
commits = 0

async def after_commit(namespace, ids):
    global commits
    commits += 1
    if commits == 2:  # the second batch is in PostgreSQL, not acked in Redis
        with open(marker, "w") as f:
            f.write(",".join(ids))
        os.kill(os.getpid(), signal.SIGKILL)

async def main():
    client = Redis.from_url(redis_url, decode_responses=True)
    sink = LedgerSink(client, SinkOptions(database_url=database, namespaces=[ns], batch_size=10, consumer="doomed"),
                      after_commit=after_commit)
    await sink.migrate()
    await sink.run_pass()

asyncio.run(main())
"""


async def test_a_sink_killed_between_commit_and_ack_replays_without_duplicates(redis_url, r, db, ns, tmp_path):
    await write_through_sidecar_store(redis_url, ns, [record(ns, i) for i in range(35)])
    script = tmp_path / "sink_killed.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    marker = tmp_path / "killed-after"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("core", "sidecar", "operator", "tools")))
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), redis_url, db, ns, str(marker), env=env)
    assert await asyncio.wait_for(proc.wait(), 120) == -signal.SIGKILL
    committed_unacked = marker.read_text().split(",")
    assert len(committed_unacked) == 10
    # The killed sink's second batch is in PostgreSQL and still pending in Redis.
    assert len(rows(db, ns)) == 20
    assert await pending(r, ns) == 10
    # A sink in its place (another consumer, as a new pod would be) takes the dead one's entries over.
    sink, client = sink_for(redis_url, db, ns, consumer="successor", claim_idle_ms=0, batch_size=10)
    try:
        assert await sink.run_pass() == 15  # the 15 never written; the 10 replayed insert nothing
    finally:
        await sink.close()
        await client.aclose()
    got = rows(db, ns)
    assert [s for s, _ in got] == await stream_ids(r, ns)  # rows equal the stream: none missing, none twice
    assert len({q for _, q in got}) == 35
    assert await pending(r, ns) == 0
    assert sink.metrics.value("kubetoll_ledger_sink_duplicates_total", namespace=ns) == 10


async def test_a_batch_re_sent_after_redis_lost_its_data_is_not_written_twice(redis_url, r, db, ns):
    """Redis applied a batch, the sink copied it, Redis restarted empty before the sidecar saw its
    reply: the sidecar sends the same batch (same id, number and records) again."""
    recs = [record(ns, i) for i in range(12)]
    sid = f"sc-{uuid.uuid4().hex[:8]}"
    await write_through_sidecar_store(redis_url, ns, recs, sid=sid)
    sink, client = sink_for(redis_url, db, ns, batch_size=5)
    try:
        await sink.migrate()
        assert await sink.run_pass() == 12
        first = {stream: rid for stream, rid in rows(db, ns)}
        # Everything of the namespace gone, as after a restart without persistence.
        for key in await r.keys(f"kt:{{{ns}}}:*"):
            await r.delete(key)
        await write_through_sidecar_store(redis_url, ns, recs, sid=sid)  # batch 1 of that sidecar, again
        assert await sink.run_pass() == 0  # 12 entries read, none a new row
    finally:
        await sink.close()
        await client.aclose()
    assert rows(db, ns) == sorted(first.items(), key=lambda row: tuple(map(int, row[0].split("-"))))
    assert sink.metrics.value("kubetoll_ledger_sink_duplicates_total", namespace=ns) == 12
    with psycopg.connect(db) as conn:
        ids = [i for (i,) in conn.execute(f"SELECT id FROM {RECORDS_TABLE} WHERE namespace = %s", (ns,))]
    assert sorted(ids) == sorted(f"{ns}/{sid}/1/{i}" for i in range(12))


class Proxy:
    """A TCP proxy in front of PostgreSQL that can be taken down (connections cut and refused) and back up."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.up = True
        self.conns: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        ur, uw = await asyncio.open_connection(*self.target)
        self.conns += [writer, uw]

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            try:
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                b.transport.abort()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))

    def down(self) -> None:
        self.up = False
        for w in self.conns:
            w.transport.abort()
        self.conns.clear()

    async def close(self) -> None:
        self.down()
        if self.server is not None:
            self.server.close()


async def test_postgres_down_then_up_loses_nothing(redis_url, r, db, ns):
    info = conninfo_to_dict(db)
    proxy = Proxy(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
    port = await proxy.start()
    via_proxy = make_conninfo(db, host="127.0.0.1", port=port)
    await write_through_sidecar_store(redis_url, ns, [record(ns, i) for i in range(12)])
    sink, client = sink_for(redis_url, via_proxy, ns, batch_size=5, connect_timeout=2)
    try:
        await sink.migrate()
        assert await sink.run_pass() == 12
        proxy.down()
        await write_through_sidecar_store(redis_url, ns, [record(ns, 100 + i) for i in range(13)])
        with pytest.raises(DatabaseUnavailable):
            await sink.run_pass()
        with pytest.raises(DatabaseUnavailable):  # still down: the same batch, still not acked
            await sink.run_pass()
        assert await pending(r, ns) == 5  # the batch it could not write stays pending, the rest undelivered
        assert len(rows(db, ns)) == 12
        proxy.up = True
        assert await sink.run_pass() == 13
    finally:
        await sink.close()
        await client.aclose()
        await proxy.close()
    got = rows(db, ns)
    assert [s for s, _ in got] == await stream_ids(r, ns)
    assert await pending(r, ns) == 0


async def test_a_dead_database_is_logged_clearly_without_its_password(redis_url, r, db, ns, caplog):
    await write_through_sidecar_store(redis_url, ns, [record(ns, i) for i in range(3)])
    secret = "pw-S3cret-%2Fx"
    # Nothing listens on port 1: the connection is refused.
    url = f"postgresql://kubetoll:{secret}@127.0.0.1:1/ledger?sslmode=disable"
    sink, client = sink_for(redis_url, url, ns, backoff_initial=0.01, backoff_max=0.02, connect_timeout=1)
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="kubetoll.ledger_sink")
    task = asyncio.create_task(sink.run(stop))
    try:
        deadline = time.monotonic() + 30
        while sink.metrics.value("kubetoll_ledger_sink_errors_total", kind="database") < 2:
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await sink.close()
        await client.aclose()
    assert "PostgreSQL at postgresql://kubetoll:***@127.0.0.1:1/ledger?sslmode=disable unavailable" in caplog.text
    assert "entries stay pending in Redis" in caplog.text
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warnings and all("\n" not in w for w in warnings)  # one line each, whatever libpq said
    for text in (secret, "S3cret", "pw-S3cret-/x"):
        assert text not in caplog.text
    assert secret not in repr(sink.options)
    assert await r.xlen(RedisKeys(ns).ledger()) == 3  # nothing acked, nothing trimmed


def test_redaction_covers_urls_conninfo_and_encoded_passwords():
    assert redact_url("postgresql://u:p%40ss@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redact_url("postgresql://db/x?user=u&password=hunter2") == "postgresql://db/x?user=u&password=***"
    assert redact_url("host=db password='a b' dbname=x") == "host=db password=*** dbname=x"
    assert redact_url("postgresql://db/x") == "postgresql://db/x"
    url = "postgresql://u:p%40ss@db/x"
    assert scrub("auth failed for p@ss and p%40ss", url) == "auth failed for *** and ***"


async def test_migrations_are_idempotent_and_safe_when_sinks_start_together(db):
    conns = [await psycopg.AsyncConnection.connect(db) for _ in range(5)]
    try:
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        assert await migrate(conns[0]) == []
    finally:
        for c in conns:
            await c.close()
    versions = [v for v, _ in migrations()]
    assert sorted(v for a in applied for v in a) == versions  # each migration applied by exactly one sink
    with psycopg.connect(db) as conn:
        recorded = conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE} ORDER BY version").fetchall()
    assert [v for (v,) in recorded] == versions


async def test_retention_deletes_only_rows_older_than_the_retention(redis_url, r, db, ns):
    day = 86_400
    old = [record(ns, i, t=NOW - 40 * day + i) for i in range(7)]
    edge = [record(ns, 50, t=NOW - 30 * day + 1)]  # inside the 30 days by a second
    new = [record(ns, 100 + i, t=NOW - i * day) for i in range(5)]
    await write_through_sidecar_store(redis_url, ns, old + edge + new)
    sink, client = sink_for(redis_url, db, ns, retention_days=30, retention_batch=3)
    sink.clock = lambda: NOW
    try:
        await sink.migrate()
        await sink.run_pass()  # drains, then the retention is due for the first time
    finally:
        await sink.close()
        await client.aclose()
    left = sorted(q for _, q in rows(db, ns))
    assert left == sorted(rec.request_id for rec in edge + new)
    assert sink.metrics.value("kubetoll_ledger_sink_retention_deleted_rows_total") == 7


def test_the_command_needs_its_urls(monkeypatch):
    from kubetoll_operator.ledger_sink.main import main

    monkeypatch.delenv("KUBETOLL_REDIS_URL", raising=False)
    monkeypatch.delenv("KUBETOLL_DATABASE_URL", raising=False)
    assert main(["--redis-url", "redis://127.0.0.1:1"]) == 2
    assert main(["--database-url", "postgresql://db/x"]) == 2


def test_the_command_drains_once(redis_url, db, ns):
    asyncio.run(write_through_sidecar_store(redis_url, ns, [record(ns, i) for i in range(4)]))
    out = subprocess.run(
        [
            str(REPO / ".venv/bin/kubetoll"),
            "ledger-sink",
            "--once",
            "--redis-url",
            redis_url,
            "--database-url",
            db,
            "-n",
            ns,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "4 rows written from 1 namespaces" in out.stdout
    assert len(rows(db, ns)) == 4


async def test_entries_trimmed_while_pending_are_acked_and_counted_lost(redis_url, r, db, ns):
    await write_through_sidecar_store(redis_url, ns, [record(ns, i) for i in range(4)])
    key = RedisKeys(ns).ledger()
    sink, client = sink_for(redis_url, "postgresql://kubetoll@127.0.0.1:1/none", ns, connect_timeout=1)
    try:
        with pytest.raises(DatabaseUnavailable):
            await sink.run_pass()  # delivered to the sink, not written
        assert await pending(r, ns) == 4
        await r.xtrim(key, maxlen=0)  # the stream's retention ran while the sink was behind
        sink.options.database_url = db
        await sink.migrate()
        assert await sink.run_pass() == 0
    finally:
        await sink.close()
        await client.aclose()
    assert await pending(r, ns) == 0
    assert sink.metrics.value("kubetoll_ledger_sink_entries_lost_total", namespace=ns) == 4


async def test_report_reads_the_same_spend_from_postgres_as_from_redis(redis_url, r, db, ns):
    import argparse

    from kubetoll_tools import report
    from kubetoll_tools import tool_commands as commands

    recs = [record(ns, i, t=NOW + i) for i in range(9)]
    recs.append(record(ns, 50, t=NOW + 20, tags="feature=x,team=a", experiment="e1", arm="a", cascade="first",
                       model="gpt-4o-mini"))  # fmt: skip
    await write_through_sidecar_store(redis_url, ns, recs)
    sink, client = sink_for(redis_url, db, ns)
    try:
        await sink.migrate()
        await sink.run_pass()
    finally:
        await sink.close()
        await client.aclose()

    def args(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser(prog="kubetoll")
        commands.register(parser.add_subparsers())
        window = ("--since", str(NOW - 60), "--until", str(NOW + 60), "--format", "json", "--namespace", ns)
        return parser.parse_args(["report", *argv, *window])

    from_redis = await report.build_report(args("--redis-url", redis_url), NOW + 100)
    from_pg = await report.build_report(args("--database-url", db), NOW + 100)
    assert from_pg["source"].startswith("PostgreSQL ledger at ")
    assert from_pg["summary"] == from_redis["summary"]
    assert from_pg["summary"]["totals"]["requests"] == 10
    from kubetoll_operator.ledger_sink.reader import read_records

    back = {x.request_id: x for x in await read_records(db, ns, NOW - 60, NOW + 60)}
    assert back["req-50"] == recs[-1] and back["req-0"].model == ""  # every field back, the model included
    exp = await report.build_report(args("--database-url", db, "--experiment", "e1"), NOW + 100)
    assert (
        exp["experiment"]
        == (await report.build_report(args("--redis-url", redis_url, "--experiment", "e1"), NOW + 100))["experiment"]
    )
    with pytest.raises(report.ReportError, match="not both"):
        await report.build_report(args("--database-url", db, "--redis-url", redis_url), NOW + 100)
    secret_url = "postgresql://kubetoll:hunter2-pw@127.0.0.1:1/x"
    with pytest.raises(report.ReportError) as failed:
        await report.build_report(args("--database-url", secret_url), NOW + 100)
    assert "hunter2" not in str(failed.value) and "kubetoll:***@127.0.0.1:1" in str(failed.value)


async def test_the_operator_acl_user_of_the_docs_can_run_the_sink(redis_url, r, db, ns, tmp_path):
    """The sink logs in as the operator (the chart's redis.auth): the docs' ACL line must let it drain."""
    from kubetoll_core.redis_connect import RedisCredentials, connect_redis

    text = (REPO / "docs" / "redis-layout.md").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("ACL SETUSER kubetoll-operator ")]
    user, password = f"kt-sink-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    args = line.replace(">PASSWORD", f">{password}").split()[2:]
    await r.execute_command("ACL", "SETUSER", user, *args[1:])
    try:
        await write_through_sidecar_store(redis_url, ns, [record(ns, i) for i in range(6)])
        (tmp_path / "user").write_text(user)
        (tmp_path / "password").write_text(password)
        client = connect_redis(
            BudgetStoreSettings(url=redis_url), RedisCredentials(tmp_path / "user", tmp_path / "password")
        )
        sink = LedgerSink(client, SinkOptions(database_url=db, namespaces=[ns], claim_idle_ms=0, batch_size=4))
        try:
            await sink.migrate()
            assert await sink.run_pass() == 6
        finally:
            await sink.close()
            await client.aclose()
    finally:
        await r.execute_command("ACL", "DELUSER", user)
    assert await pending(r, ns) == 0


async def test_a_batch_the_database_refuses_stays_pending_and_other_namespaces_go_on(redis_url, r, db, ns):
    bad, good = ns, f"{ns}g"
    await write_through_sidecar_store(redis_url, bad, [record(bad, 1, tenant="poison")])
    await write_through_sidecar_store(redis_url, good, [record(good, i) for i in range(3)])
    sink, client = sink_for(redis_url, db, ns, namespaces=[bad, good])
    try:
        await sink.migrate()
        with psycopg.connect(db, autocommit=True) as conn:  # a constraint of the platform's that this row breaks
            conn.execute(f"ALTER TABLE {RECORDS_TABLE} ADD CONSTRAINT no_poison CHECK (tenant <> 'poison')")
        with pytest.raises(DatabaseUnavailable, match="no_poison"):
            await sink.run_pass()
        assert len(rows(db, good)) == 3 and await pending(r, good) == 0
        assert rows(db, bad) == [] and await pending(r, bad) == 1  # not acked: nothing lost
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE {RECORDS_TABLE} DROP CONSTRAINT no_poison")
        assert await sink.run_pass() == 1
    finally:
        await sink.close()
        await client.aclose()
    assert await pending(r, bad) == 0


def test_the_command_with_a_dead_database_exits_1_without_the_password(redis_url, ns):
    asyncio.run(write_through_sidecar_store(redis_url, ns, [record(ns, 1)]))
    url = "postgresql://kubetoll:Zq9-very-secret@127.0.0.1:1/ledger"
    out = subprocess.run(
        [str(REPO / ".venv/bin/kubetoll"), "ledger-sink", "--once", "--redis-url", redis_url, "--database-url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "PostgreSQL at postgresql://kubetoll:***@127.0.0.1:1/ledger unavailable" in out.stderr
    assert "Zq9-very-secret" not in out.stdout + out.stderr
