"""What a stream's end costs the sidecar: its writes, the upstream connections it opens, its TTFT.

A stream ends with the cost comment, `[DONE]` and the chunked terminator to the client,
and the upstream's own terminator, which often arrives after its last event. This starts
the simulated upstream and the sidecar (`python -m kubetoll_tools.cli sidecar`, budgets
and metrics on, as bench/sidecar_latency.py configures it), sends --streams streaming
chat completions one at a time on one keep-alive connection, and prints

 (1) time to the first `data:` event through the sidecar, p50 and p99;
 (2) under `strace -c -f` (when strace is installed and may attach), over --traced more
     streams: the sidecar's write(2) calls a stream and the upstream connections it
     opened (connect(2)), the figures a change to the stream's end moves.

strace slows the sidecar, so (2)'s streams are timed apart from (1)'s. Prints, never asserts.

    .venv/bin/python bench/stream_ends.py [--streams 1500] [--traced 500]
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchsupport as bs


def traced(pid: int, run: Callable[[], object], out: Path) -> dict[str, int] | None:
    """Syscall counts of `pid` while `run()` runs, from `strace -c -f`; None without strace."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    tracer = subprocess.Popen(
        [strace, "-f", "-c", "-e", "trace=write,writev,connect", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached
    try:
        run()
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    if not out.exists():
        return None
    counts = {}
    for line in out.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if m:
            counts[m.group(2)] = int(m.group(1))
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--streams", type=int, default=1500, help="streams timed in (1) (default 1500)")
    ap.add_argument("--traced", type=int, default=500, help="streams counted under strace in (2) (default 500)")
    ap.add_argument("--warmup", type=int, default=300)
    args = ap.parse_args()
    place = bs.placement()
    print("kubetoll sidecar: a stream's end (writes, upstream connections, time to first token)")
    for line in bs.machine_lines():
        print(line)
    upstream = sidecar = None
    with bs.tempdir() as tmp:
        try:
            up_port, api_port, met_port = bs.free_port(), bs.free_port(), bs.free_port()
            upstream = bs.start_upstream(up_port, place.other_cpus, tmp / "upstream.log")
            config = bs.write_config(tmp, up_port, api_port, met_port)
            sidecar = bs.start_sidecar(config, met_port, place.sidecar_cpus, tmp / "sidecar.log")
            bs.pin_self(place.other_cpus)
            client = bs.RawHTTPClient(api_port)
            raw = client.build(
                "/v1/chat/completions", bs.chat_body(bs.ROUTE, stream=True), {"x-kubetoll-tenant": bs.TENANT}
            )

            def streams(n: int) -> list[float]:
                firsts = []
                for _ in range(n):
                    status, first, _, body = client.request(raw)
                    if status != 200 or b"[DONE]" not in body:
                        raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
                    firsts.append(first)
                return sorted(firsts)

            streams(args.warmup)
            firsts = streams(args.streams)
            print(
                f"(1) {args.streams} sequential streams, time to the first `data:` event through the sidecar: "
                f"p50 {bs.percentile(firsts, 50) * 1000:.3f} ms, p99 {bs.percentile(firsts, 99) * 1000:.3f} ms"
            )
            counts = traced(sidecar.pid, lambda: streams(args.traced), tmp / "strace.txt")
            if counts is None:
                print("(2) strace is not installed or could not attach: no syscall counts")
            else:
                writes = counts.get("write", 0) + counts.get("writev", 0)
                print(
                    f"(2) {args.traced} sequential streams under strace -c -f: {writes:,} write(2) calls "
                    f"({writes / args.traced:.1f} a stream, the upstream request included), "
                    f"{counts.get('connect', 0)} upstream connections opened"
                )
        finally:
            bs.stop(sidecar)
            bs.stop(upstream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
