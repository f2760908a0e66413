"""Instructions the sidecar process executes a request: a figure the VM's noise does not move.

CPU seconds a request move by ±12% between runs minutes apart on a shared VM, so a
change worth 5-10% needs many alternating runs to show. valgrind's callgrind counts
the instructions a process executes in user space instead (the same count for the
same binary, inputs and environment, whatever else the machine does). This starts
the simulated upstream normally and the sidecar (`python -m kubetoll_tools.cli
sidecar`, budgets and metrics on, as bench/sidecar_latency.py configures it) under
`valgrind --tool=callgrind` twice, sends --small and then --large non-streaming chat
completions one at a time on one keep-alive connection, and prints

    (instructions of the large run - instructions of the small run) / (large - small)

so start-up, the config load and shutdown cancel out. Kernel time (the socket
syscalls) is not counted: this is the sidecar's own work, the part a code change
moves. Needs valgrind (`apt-get install valgrind`); without it, says so and exits 0.
Slow (the sidecar runs ~50x slower under callgrind): ~2-4 minutes with the defaults.

    .venv/bin/python bench/instructions_per_request.py [--small 300] [--large 1300] [--bare]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchsupport as bs


def _ready(what: str, api: int, met: int | None) -> bool:
    try:
        if met is None:  # the bare proxy has no probe: its port open is ready
            socket.create_connection(("127.0.0.1", api), timeout=5).close()
            return True
        with urllib.request.urlopen(f"http://127.0.0.1:{met}/readyz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def run_once(tmp: Path, up_port: int, requests: int, what: str) -> int:
    api, met = bs.free_port(), bs.free_port()
    out = tmp / f"callgrind.{what}.{requests}.out"
    log = tmp / f"{what}.{requests}.log"
    if what == "sidecar":
        config = bs.write_config(tmp, up_port, api, met)
        cmd = [sys.executable, "-m", "kubetoll_tools.cli", "sidecar", "--config", str(config), "--log-level", "INFO"]
        probe: int | None = met
    else:
        cmd = [sys.executable, str(Path(bs.__file__).with_name("bare_proxy.py")), str(up_port), str(api)]
        probe = None
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
        env=bs.child_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 600
        while not _ready(what, api, probe):
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with status {proc.returncode}\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {what} under callgrind did not become ready within 600 s")
            time.sleep(0.5)
        client = bs.RawHTTPClient(api)
        raw = client.build("/v1/chat/completions", bs.chat_body(bs.ROUTE), {"x-kubetoll-tenant": bs.TENANT})
        for _ in range(requests):
            status, _, _, body = client.request(raw)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    m = re.search(r"Collected : (\d+)", text)
    if not m:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{text[-2000:]}")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=300, help="requests in the first run (default 300)")
    ap.add_argument("--large", type=int, default=1300, help="requests in the second run (default 1300)")
    ap.add_argument(
        "--bare", action="store_true", help="also the bare aiohttp proxy (benchsupport/bare_proxy.py), as the reference"
    )
    args = ap.parse_args()
    if args.large <= args.small:
        ap.error("--large must be more than --small")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing measured (apt-get install valgrind)")
        return 0
    print("kubetoll sidecar: instructions executed a request (valgrind callgrind, user space)")
    for line in bs.machine_lines():
        print(line)
    print(f"request:  POST /v1/chat/completions, {bs.ROUTE!r} route, budgets and metrics on, one client, keep-alive")
    with bs.tempdir() as tmp:
        upstream = bs.start_upstream(up_port := bs.free_port(), None, tmp / "upstream.log")
        try:
            per: dict[str, float] = {}
            for what in ("sidecar", "bare aiohttp proxy") if args.bare else ("sidecar",):
                counts = {}
                for n in (args.small, args.large):
                    t0 = time.monotonic()
                    counts[n] = run_once(tmp, up_port, n, what.split()[0])
                    took = time.monotonic() - t0
                    print(f"    {what}, {n:6,} requests: {counts[n]:,} instructions in all ({took:.0f} s)")
                per[what] = (counts[args.large] - counts[args.small]) / (args.large - args.small)
        finally:
            bs.stop(upstream)
    for what, value in per.items():
        print(f"instructions a request, {what}: {value:,.0f}")
    if "bare aiohttp proxy" in per:
        print(f"the sidecar / the bare proxy: {per['sidecar'] / per['bare aiohttp proxy']:.2f}x")
    print(f"(PYTHONHASHSEED={os.environ.get('PYTHONHASHSEED', 'random')}; the count moves by well under 1% run to run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
