"""A private redis-server for the Redis benchmarks, which some of them also kill, stop and restart.

`start_redis` is what the throughput and overshoot benches need: REDIS_URL when set,
else a server of their own. `RedisServer` is one server on a fixed port that
bench/faults.py SIGKILLs, SIGSTOPs and starts again on the same port, empty or from
its append-only file (`appendonly=True`: `--appendfsync always`, so every write
Redis acknowledged is on disk when it is killed).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from . import listen_port


class RedisServer:
    """One redis-server process on 127.0.0.1, its data in a temporary directory of its own."""

    def __init__(self, *, appendonly: bool = False, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            sys.exit("redis-server is not on PATH; install it or set REDIS_URL")
        self.exe = exe
        self.appendonly = appendonly
        self.port = port or listen_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kubetoll-bench-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        cmd = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir)]
        if self.appendonly:
            return cmd + ["--appendonly", "yes", "--appendfsync", "always"]
        return cmd + ["--appendonly", "no"]

    def start(self, timeout: float = 30.0) -> RedisServer:
        """Start it and return once it answers PING (after loading its append-only file, if any)."""
        import redis

        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    detail = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server exited with status {self.proc.returncode}\n{detail}")
                with contextlib.suppress(redis.RedisError, OSError):
                    if client.ping():  # a server still loading its AOF answers LOADING (an error)
                        return self
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {timeout:.0f}s")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections dropped as a crash drops them."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)  # a stopped process dies on SIGKILL too; this keeps wait() short
                self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers, as a Redis stalled on its host."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self, *, empty: bool) -> None:
        """Start it again on the same port: `empty` drops its files first, else it loads its append-only file."""
        self.kill()
        if empty:
            for p in self.dir.iterdir():
                if p.name == "redis.log":
                    continue
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_redis() -> tuple[str, subprocess.Popen[bytes] | None]:
    """REDIS_URL when set (nothing is started), else a private redis-server: (its URL, its process)."""
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"], None
    server = RedisServer().start()
    atexit.register(shutil.rmtree, server.dir, True)  # the caller kills the process; its directory goes at exit
    return server.url, server.proc
