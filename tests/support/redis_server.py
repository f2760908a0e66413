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
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir, *self.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
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
