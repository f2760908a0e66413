"""A real Redis server for tests.

`REDIS_URL` when set (a shared server: tests use their own key prefixes and a
separate db), else a private `redis-server` from PATH on a free port (needed by
the fault tests, which kill and restart it), else a clear failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisProcess:
    """A redis-server the test owns: it can be stopped, paused (SIGSTOP) and restarted empty."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server is not on PATH: install it (apt-get install redis-server) or set REDIS_URL"
            )
        self._dir = tempfile.mkdtemp(prefix="kt-redis-")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up (with or without requirepass)
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a stalled Redis)."""
        assert self.proc
        self.proc.send_signal(19)

    def resume(self) -> None:
        assert self.proc
        self.proc.send_signal(18)

    def restart_empty(self) -> None:
        self.stop()
        self.start()


def shared_redis_url() -> str | None:
    return os.environ.get("REDIS_URL")


# --------------------------------------------------------------------------- extensions for the Redis budget tests


def redis_server_exe() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not on PATH: install it (apt-get install redis-server) or set REDIS_URL")
    return exe


def _wait_ping(
    port: int, proc: subprocess.Popen, *, tls: tuple[str, str, str] | None = None, password: str | None = None
) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=0.2)
            if tls:
                import ssl

                ctx = ssl.create_default_context(cafile=tls[0])
                ctx.check_hostname = False
                sock = ctx.wrap_socket(sock)
            with sock:
                if password:
                    sock.sendall(f"AUTH {password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"redis-server did not start on port {port}")


@dataclass
class PersistentRedis(RedisProcess):
    """A redis-server with an fsync-always AOF: killed with SIGKILL and started again, it comes back with its data."""

    def start(self) -> PersistentRedis:
        if not getattr(self, "_dir", None):
            self._dir = tempfile.mkdtemp(prefix="kt-redis-aof-")
        self.proc = subprocess.Popen(
            [
                redis_server_exe(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                self._dir,
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_ping(self.port, self.proc)
        return self

    def restart_keeping_data(self) -> None:
        self.stop()
        self.start()


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is valid and free too."""
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port + 10000 > 65535:
                continue
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class ClusterRedis(RedisProcess):
    """A one-node Redis Cluster owning all 16384 slots: cluster rules (CROSSSLOT) apply as on a real one."""

    port: int = field(default_factory=free_cluster_port)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.port}/"

    def start(self) -> ClusterRedis:
        self._dir = tempfile.mkdtemp(prefix="kt-redis-cluster-")
        self.proc = subprocess.Popen(
            [
                redis_server_exe(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                os.path.join(self._dir, "nodes.conf"),
                "--dir",
                self._dir,
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_ping(self.port, self.proc)
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "CLUSTER", "ADDSLOTSRANGE", "0", "16383"],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["redis-cli", "-p", str(self.port), "CLUSTER", "INFO"], capture_output=True, text=True
            ).stdout
            if "cluster_state:ok" in out:
                return self
            time.sleep(0.05)
        raise RuntimeError("the one-node cluster did not become ready")


@dataclass
class SentinelRedis:
    """A master plus one sentinel watching it as `mymaster`."""

    master: RedisProcess = field(default_factory=RedisProcess)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/mymaster/0"

    def start(self) -> SentinelRedis:
        self.master.start()
        d = tempfile.mkdtemp(prefix="kt-sentinel-")
        conf = os.path.join(d, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {d}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1\n"
                "sentinel down-after-milliseconds mymaster 5000\n"
            )
        self.proc = subprocess.Popen(
            [redis_server_exe(), conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_ping(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.master.stop()


@dataclass
class TlsRedis(RedisProcess):
    """A redis-server speaking only TLS, with a throwaway CA made by the openssl CLI."""

    ca: str = ""

    @property
    def url(self) -> str:
        return f"rediss://localhost:{self.port}/0?ssl_ca_certs={self.ca}"

    def start(self) -> TlsRedis:
        if shutil.which("openssl") is None:
            raise RuntimeError("openssl is not on PATH")
        d = tempfile.mkdtemp(prefix="kt-redis-tls-")
        self._dir = d
        ca_key, ca, key, csr, crt = (
            os.path.join(d, n) for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
        )
        ext = os.path.join(d, "ext.cnf")
        with open(ext, "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
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
        self.proc = subprocess.Popen(
            [
                redis_server_exe(),
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                d,
                "--tls-cert-file",
                crt,
                "--tls-key-file",
                key,
                "--tls-ca-cert-file",
                ca,
                "--tls-auth-clients",
                "no",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_ping(self.port, self.proc, tls=(ca, crt, key))
        return self


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
