"""Shared parts of the sidecar benchmarks: processes, pinning, config, load generators.

A package (not a `bench/*.py` module) so that `make bench`, which runs every
`bench/*.py`, does not run it as a benchmark of its own.

Placement on a machine with at least two cores: the sidecar alone on the first
core; the simulated upstream and the load generator (this process, or wrk)
together on the second. The design's throughput target is "on one core", and the
upstream and client are in both the direct and the via-sidecar path, so they
sit together on the other core.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The four package folders (docs/architecture.md): the scripts run from the venv whether or not the
# package is installed into it, and child processes get the same path.
SRC_PATHS = [str(ROOT / d) for d in ("core", "sidecar", "operator", "tools")]
for _p in reversed(SRC_PATHS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

TENANT = "bench"
ROUTE = "chat"
UPSTREAM_MODEL = "gpt-4o-mini"

# A short chat, as an app would send: a system prompt and one user turn.
SYSTEM_PROMPT = (
    "You are a support assistant for an online shop. Answer briefly and politely, "
    "cite the order number when there is one, and never promise refunds yourself."
)
USER_PROMPT = "Hello, my order 12345 has not arrived yet. It was due last Tuesday. Can you tell me where it is?"


def chat_body(model: str, stream: bool = False, max_tokens: int = 64) -> bytes:
    body: dict = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": USER_PROMPT}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class Placement:
    sidecar_cpus: set[int] | None
    other_cpus: set[int] | None  # upstream + load generator

    def describe(self) -> str:
        if self.sidecar_cpus is None:
            return "not pinned (fewer than 2 usable cores): sidecar, upstream and load generator share the cores"
        return (
            f"sidecar pinned to core {fmt_cpus(self.sidecar_cpus)}; simulated upstream and load generator "
            f"pinned to core {fmt_cpus(self.other_cpus)} (the load generator shares the machine)"
        )


def fmt_cpus(cpus: set[int] | None) -> str:
    return ",".join(str(c) for c in sorted(cpus or ()))


def placement() -> Placement:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return Placement(None, None)
    if len(cpus) < 2:
        return Placement(None, None)
    return Placement({cpus[0]}, {cpus[1]})


def pin_self(cpus: set[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def _pinner(cpus: set[int] | None):
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def uvloop_status() -> str:
    try:
        import uvloop
    except ImportError:
        return "off (uvloop not installed: asyncio's default loop)"
    return f"on (uvloop {uvloop.__version__}; the sidecar, the simulator and the Python load generator use it)"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_lines() -> list[str]:
    import aiohttp

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"machine: {os.cpu_count()} cores ({usable} usable), {cpu_model()}, {platform.system()} {platform.release()}",
        f"python:  {platform.python_implementation()} {platform.python_version()}, aiohttp {aiohttp.__version__}",
        f"uvloop:  {uvloop_status()}",
    ]


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TAKEN: set[int] = set()


def listen_port() -> int:
    """A free port below the kernel's ephemeral range, never handed out twice by this process.

    `free_port` (`bind(0)`) draws from the ephemeral range, where every outgoing
    connection takes its local port too: with many sidecars starting at once, each
    opening Redis connections, a port chosen that way can be taken before its sidecar
    binds it, and a server restarted on its old port can find it taken by a client.
    """
    try:
        lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lo = 32768
    low = 10000 if lo > 11000 else 1024
    for _ in range(2000):
        port = random.randint(low, lo - 1)
        if port in _TAKEN:
            continue
        with socket.socket() as sk:
            try:
                sk.bind(("127.0.0.1", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port
    return free_port()


def wait_port(port: int, proc: subprocess.Popen, what: str, log: Path | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on {port}\n{detail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(SRC_PATHS + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_upstream(port: int, cpus: set[int] | None, log: Path) -> subprocess.Popen:
    """The simulated OpenAI server (`upstream_simulator.run`), no latency, request recording off."""
    code = (
        "from kubetoll_tools.simulator import SimSettings, run\n"
        f"run('127.0.0.1', {port}, SimSettings(max_recorded_requests=0))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=child_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=_pinner(cpus),
    )
    wait_port(port, proc, "simulated upstream", log)
    return proc


def write_config(directory: Path, upstream_port: int, api_port: int, metrics_port: int) -> Path:
    """A RouterConfig with budgets (namespace cap + a tier with tokens/min and requests/min) that never reject."""
    cfg: dict = {
        "version": 1,
        "namespace": "bench",
        "server": {"host": "127.0.0.1", "port": api_port, "metricsHost": "127.0.0.1", "metricsPort": metrics_port},
        "tenancy": {"header": "x-kubetoll-tenant", "tierHeader": "x-kubetoll-tier", "defaultTier": "standard"},
        "backends": [
            {
                "name": "sim",
                "provider": "openai",
                "model": UPSTREAM_MODEL,
                "endpoint": f"http://127.0.0.1:{upstream_port}/v1",
            }
        ],
        "routes": [{"name": ROUTE, "rules": [{"name": "default", "backends": ["sim"]}], "maxOutputTokens": 512}],
        "budgets": [
            {
                "name": "bench",
                "routes": [ROUTE],
                "cap": {"usdPerDay": 1e9, "usdPerMonth": 1e10, "tokensPerDay": 10**15},
                "tiers": {
                    "standard": {
                        "tokensPerMinute": 10**15,
                        "requestsPerMinute": 10**12,
                        "usdPerDay": 1e9,
                        "onExhausted": "reject",
                    }
                },
            }
        ],
    }
    cfg["backends"] = [compiled_backend(b) for b in cfg["backends"]]
    path = directory / "router.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def compiled_backend(backend: dict) -> dict:
    """A RouterConfig backend as the operator writes it: catalogue prices included.

    The operator looks catalogue-priced backends up and writes `catalogPrices`, so a
    sidecar never loads the price catalogue; a benchmark's config does the same, or
    its sidecar would carry the catalogue no pod carries.
    """
    from kubetoll_core.price_catalog import with_catalog_prices
    from kubetoll_core.router_config import Backend

    compiled = with_catalog_prices(Backend.model_validate(backend))
    return compiled.model_dump(mode="json", by_alias=True, exclude_none=True)


def start_sidecar(
    config: Path, metrics_port: int, cpus: set[int] | None, log: Path, log_level: str = "INFO"
) -> subprocess.Popen:
    """`kubetoll sidecar --config ...` as `python -m kubetoll_tools.cli`, its access log (a line a request) to `log`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetoll_tools.cli", "sidecar", "--config", str(config), "--log-level", log_level],
        env=child_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=_pinner(cpus),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with status {proc.returncode}\n{log.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc
        time.sleep(0.1)
    raise RuntimeError("the sidecar did not become ready within 30s")


def start_bare_proxy(upstream_port: int, port: int, cpus: set[int] | None, log: Path) -> subprocess.Popen:
    """The reference: aiohttp server + ClientSession pass-through, nothing else (benchsupport/bare_proxy.py)."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("bare_proxy.py")), str(upstream_port), str(port)],
        env=child_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=_pinner(cpus),
    )
    wait_port(port, proc, "bare aiohttp proxy", log)
    return proc


def stop(proc: subprocess.Popen | None) -> None:
    """Stop a process this benchmark started (by its own handle, nothing else)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextlib.contextmanager
def tempdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kubetoll-bench-") as d:
        yield Path(d)


def scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            labels = dict(re.findall(r'(\w+)="([^"]*)"', head))
            out.append((labels, float(value)))
    return out


# --------------------------------------------------------------------------- CPU accounting


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (Linux /proc), 0 when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def core_busy_seconds() -> dict[int, float]:
    """Busy (non-idle, non-iowait) seconds of each core since boot, from /proc/stat."""
    out: dict[int, float] = {}
    try:
        tick = os.sysconf("SC_CLK_TCK")
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                out[int(name[3:])] = (sum(v[:8]) - v[3] - v[4]) / tick
    except (OSError, ValueError):
        pass
    return out


class CpuMeter:
    """CPU used by some processes and by whole cores over an interval, to tell their cost from other load."""

    def __init__(self, pids: list[int], cores: set[int] | None) -> None:
        self.pids, self.cores = pids, cores
        self.t0 = time.monotonic()
        self.p0 = [process_cpu_seconds(p) for p in pids]
        self.c0 = core_busy_seconds()

    def stop(self) -> tuple[float, float, float | None]:
        """(CPU seconds of the processes, wall seconds, CPU seconds other processes used on the cores, or None)."""
        wall = time.monotonic() - self.t0
        used = sum(process_cpu_seconds(p) - p0 for p, p0 in zip(self.pids, self.p0))
        c1 = core_busy_seconds()
        if not self.cores or not c1:
            return used, wall, None
        busy = sum(c1.get(c, 0.0) - self.c0.get(c, 0.0) for c in self.cores)
        return used, wall, max(busy - used, 0.0)


# --------------------------------------------------------------------------- raw client (latency)


class RawHTTPClient:
    """One keep-alive HTTP/1.1 connection over a blocking socket.

    The lightest client there is in Python (a send and a few recvs per request, no
    event loop, no header objects), so the client's own cost and jitter stay small
    next to the tenths of a millisecond being measured. Understands exactly what
    the two servers send: Content-Length bodies and chunked SSE streams.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def build(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def _recv(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def request(self, raw: bytes) -> tuple[int, float, float, bytes]:
        """Send one request: (status, seconds to the first SSE `data:` or the body, seconds to the end, body)."""
        t0 = time.perf_counter()
        self.sock.sendall(raw)
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        m = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
        if m:
            n = int(m.group(1))
            self.buf = rest
            while len(self.buf) < n:
                self._recv()
            t_end = time.perf_counter()
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, t_end - t0, t_end - t0, body
        if b"transfer-encoding: chunked" not in lower:
            raise RuntimeError(f"unexpected response framing: {head[:200]!r}")
        # Chunked (an SSE stream): first `data:` is the first token; the zero chunk ends it.
        self.buf = rest
        t_first = None
        while True:
            if t_first is None and b"data:" in self.buf:
                t_first = time.perf_counter() - t0
            if self.buf.endswith(b"0\r\n\r\n") and (self.buf == b"0\r\n\r\n" or self.buf.endswith(b"\r\n0\r\n\r\n")):
                break
            self._recv()
        t_end = time.perf_counter() - t0
        body, self.buf = self.buf, b""
        return status, (t_first if t_first is not None else t_end), t_end, body


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


# --------------------------------------------------------------------------- throughput


@dataclass
class LoadResult:
    tool: str
    requests: int
    seconds: float
    errors: int  # non-2xx responses and socket errors
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _wrk_time_ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(
    port: int,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    duration: float,
    cpus: set[int] | None,
    workdir: Path,
) -> LoadResult:
    script = workdir / f"post-{port}.lua"
    hdrs = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in {"Content-Type": "application/json", **headers}.items())
    script.write_text(f'wrk.method = "POST"\nwrk.body = [==[{body.decode()}]==]\n{hdrs}')
    cmd = [
        wrk_path() or "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/v1/chat/completions",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_pinner(cpus), timeout=duration + 30).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not total:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    n, secs = int(total.group(1)), _wrk_time_ms(total.group(2), total.group(3)) / 1000.0
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))

    def ms(key: str) -> float | None:
        if key not in lat:
            return None
        mm = re.match(r"([\d.]+)(us|ms|s|m)$", lat[key])
        return _wrk_time_ms(mm.group(1), mm.group(2)) if mm else None

    return LoadResult("wrk", n, secs, errors, ms("50"), ms("99"))


async def _aiohttp_load(
    port: int, body: bytes, headers: dict[str, str], concurrency: int, duration: float
) -> LoadResult:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    hdrs = {"Content-Type": "application/json", **headers}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",)) as session:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= deadline:
                    return
                try:
                    async with session.post(url, data=body, headers=hdrs) as r:
                        await r.read()
                        if r.status >= 300:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - t0)

        import asyncio

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return LoadResult(
        "aiohttp", len(latencies), elapsed, errors, percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
    )


def run_aiohttp_load(port: int, body: bytes, headers: dict[str, str], concurrency: int, duration: float) -> LoadResult:
    """The fallback load generator: one aiohttp ClientSession, `concurrency` keep-alive connections, in this process."""
    import asyncio

    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_aiohttp_load(port, body, headers, concurrency, duration))


def run_load(
    port: int,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    duration: float,
    cpus: set[int] | None,
    workdir: Path,
    tool: str = "auto",
) -> LoadResult:
    if tool == "wrk" or (tool == "auto" and wrk_path()):
        return run_wrk(port, body, headers, concurrency, duration, cpus, workdir)
    return run_aiohttp_load(port, body, headers, concurrency, duration)


def load_in_subprocess(
    port: int,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    duration: float,
    cpus: set[int] | None,
    workdir: Path,
    tool: str = "auto",
) -> subprocess.Popen:
    """Drive load from another process (for the in-process profile); prints a JSON LoadResult on stdout."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
        "from benchsupport import run_load\n"
        f"r = run_load({port}, {body!r}, {headers!r}, {concurrency}, {duration}, None, "
        f"__import__('pathlib').Path({str(workdir)!r}), {tool!r})\n"
        "print(json.dumps(r.__dict__))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], env=child_env(), stdout=subprocess.PIPE, preexec_fn=_pinner(cpus)
    )
