"""Profile of the sidecar's hot path under load: top functions by self and cumulative time.

Default (pyinstrument): the sidecar runs in this process (`server.serve(Sidecar(...))`
on uvloop, logging at INFO to a file, as `kubetoll sidecar` does), pinned to the
first core; the simulated upstream and the load generator (wrk when installed,
else the aiohttp load generator, in a subprocess) share the second core. After
a warm-up, pyinstrument samples the event-loop thread while --concurrency
clients send non-streaming chat completions for --duration seconds.

--profiler py-spy: the same load against `python -m kubetoll_tools.cli sidecar`
as a subprocess, sampled from outside by `py-spy record` (no hook in the
sidecar, so call-heavy Python code is not inflated; needs ptrace permission).

Prints where the time goes: by area (aiohttp server, aiohttp client, sidecar
code, logging, metrics...), the top functions by self time, by cumulative time,
and the sidecar's own functions by cumulative time.

    .venv/bin/python bench/profile_hot_path.py [--duration 10] [--concurrency 8] [--top 25] [--save out.pyisession]
    .venv/bin/python bench/profile_hot_path.py --profiler py-spy

Needs pyinstrument or py-spy (`.venv/bin/pip install pyinstrument py-spy`); without it, says so and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchsupport as bs

AREAS = (
    # (area, substrings of the file path; first match wins)
    ("upstream client (upstream_client.py)", ("kubetoll_sidecar/upstream_client.py",)),
    ("kubetoll sidecar code", ("kubetoll_sidecar/",)),
    ("logging (access log line)", ("/logging/",)),
    ("prometheus_client (metrics)", ("prometheus_client/",)),
    ("tiktoken (token estimate)", ("tiktoken/",)),
    (
        "aiohttp client (calls off the hot path)",
        ("aiohttp/client", "aiohttp/connector.py", "aiohttp/cookiejar.py", "aiohttp/tracing.py"),
    ),
    ("aiohttp server (API side)", ("aiohttp/web", "aiohttp/base_protocol.py")),
    ("aiohttp shared (http writer/parser, streams, helpers)", ("aiohttp/", "multidict/", "yarl/")),
    ("asyncio / event loop", ("asyncio/", "uvloop/")),
)


def area_of(path: str) -> str:
    for name, keys in AREAS:
        if any(k in path for k in keys):
            return name
    return "other (stdlib, pydantic, builtins)"


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "/sidecar/", "/lib/python3.11/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


Frame = tuple[str, str]  # (function, with its class when known; file path)


def pyinstrument_records(session) -> list[tuple[list[Frame], float]]:
    """pyinstrument's records as (stack of (function, path), seconds)."""
    from pyinstrument.frame_info import parse_frame_info

    out = []
    for stack, t in session.frame_records:
        frames = []
        for info in stack:
            ident, attrs = parse_frame_info(info)
            parts = ident.split("\x00")
            if len(parts) < 2 or parts[1] == "<thread>":
                continue  # the thread pseudo-frame
            func, path = parts[0], parts[1]
            cls = next((a[1:] for a in attrs if a.startswith("c")), None)
            frames.append((f"{cls}.{func}" if cls else func, path))
        if frames:
            out.append((frames, t))
    return out


_PYSPY_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def pyspy_records(raw: str, rate: int) -> list[tuple[list[Frame], float]]:
    """py-spy's `--format raw` (collapsed stacks, one `a;b;c count` a line) as (stack, seconds)."""
    out = []
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for f in stack.split(";"):
            m = _PYSPY_FRAME.match(f)
            frames.append((m.group(1), m.group(2)) if m else (f, ""))
        if frames and frames[0][0].startswith("process ") or frames and frames[0][0].startswith("thread "):
            frames = frames[1:]
        if frames:
            out.append((frames, int(count) / rate))
    return out


def analyse(records: list[tuple[list[Frame], float]], top: int, requests: int, busy_note: str) -> None:
    self_t: Counter[Frame] = Counter()
    cum_t: Counter[Frame] = Counter()
    area_t: Counter[str] = Counter()
    total = 0.0
    for frames, t in records:
        total += t
        self_t[frames[-1]] += t
        for f in set(frames):
            cum_t[f] += t
        area_t[area_of(frames[-1][1])] += t
    if total <= 0:
        print("no samples")
        return

    def row(t: float, label: str) -> str:
        per = f"{t / requests * 1e6:7.1f} us/req  " if requests else ""
        return f"  {t / total:6.1%}  {per}{label}"

    def name(f: Frame) -> str:
        return f"{f[0]}  ({_short_path(f[1])})"

    print(busy_note)
    print()
    print("By area (self time of the innermost frame):")
    for area, t in area_t.most_common():
        print(row(t, area))
    print()
    print(f"Top {top} functions by self time:")
    for f, t in self_t.most_common(top):
        print(row(t, name(f)))
    print()
    print(f"Top {top} functions by cumulative time (time with the function on the stack):")
    skip = (
        "asyncio/runners.py",
        "asyncio/base_events.py",
        "asyncio/events.py",
        "benchsupport",
        "profile_hot_path",
        "<frozen runpy>",
        "kubetoll_sidecar/cli.py",
        "kubetoll_sidecar/commands.py",
    )
    shown = 0
    for f, t in cum_t.most_common():
        if any(s in f[1] for s in skip) or f[0] in ("run_sidecar",):
            continue
        print(row(t, name(f)))
        shown += 1
        if shown >= top:
            break
    print()
    print("kubetoll_sidecar functions by cumulative time (the pipeline stages and what they call):")
    shown = 0
    for f, t in cum_t.most_common():
        if "kubetoll_sidecar/" not in f[1] or any(s in f[1] for s in skip) or f[0] == "run_sidecar":
            continue
        print(row(t, name(f)))
        shown += 1
        if shown >= top:
            break


async def drive(args, place, tmp: Path, api_port: int, loaded, tool: str):
    from pyinstrument import Profiler

    from kubetoll_sidecar.server import Sidecar, serve

    stop = asyncio.Event()
    sidecar = Sidecar(loaded)
    server = asyncio.create_task(serve(sidecar, stop=stop))
    deadline = time.monotonic() + 20
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", api_port)
            w.close()
            break
        except OSError as exc:
            if server.done() or time.monotonic() > deadline:
                server.result()
                raise RuntimeError("the in-process sidecar did not start") from exc
            await asyncio.sleep(0.05)

    body = bs.chat_body(bs.ROUTE)
    headers = {"x-kubetoll-tenant": bs.TENANT}

    async def load(seconds: float, profiler=None) -> dict:
        proc = bs.load_in_subprocess(api_port, body, headers, args.concurrency, seconds, place.other_cpus, tmp, tool)
        if profiler is not None:
            profiler.start()  # after the fork, so the profile holds the sidecar's work only
        await asyncio.to_thread(proc.wait)  # the loop keeps serving the load meanwhile
        out = proc.stdout.read() if proc.stdout else b""
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed with status {proc.returncode}")
        return json.loads(out)

    await load(args.warmup)
    profiler = Profiler(interval=args.interval, async_mode="disabled")
    result = await load(args.duration, profiler)
    session = profiler.stop()
    stop.set()
    await server
    return result, session, profiler


def run_pyinstrument(args, place, tool: str) -> None:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    from kubetoll_sidecar.config_loader import load_config

    upstream = None
    with bs.tempdir() as tmp:
        try:
            up_port, api_port, met_port = bs.free_port(), bs.free_port(), bs.free_port()
            upstream = bs.start_upstream(up_port, place.other_cpus, tmp / "upstream.log")
            config = bs.write_config(tmp, up_port, api_port, met_port)
            log_file = tmp / "sidecar.log"
            logging.basicConfig(
                level=getattr(logging, args.log_level.upper(), logging.INFO),
                filename=str(log_file),
                format="%(asctime)s %(levelname)s %(name)s %(message)s",
            )
            bs.pin_self(place.sidecar_cpus)
            loaded = load_config(str(config))
            with asyncio.Runner(loop_factory=factory) as runner:
                result, session, profiler = runner.run(drive(args, place, tmp, api_port, loaded, tool))
        finally:
            bs.stop(upstream)

    n, secs = result["requests"], result["seconds"]
    print(
        f"throughput while profiled: {n / secs:,.0f} req/s ({n:,} requests in {secs:.1f} s, {result['errors']} "
        "errors); pyinstrument's per-call hook slows the sidecar (and inflates call-heavy Python code), so see "
        "bench/sidecar_latency.py for the unprofiled rate and --profiler py-spy for a low-overhead view"
    )
    analyse(
        pyinstrument_records(session),
        args.top,
        n,
        f"sampled {session.duration:.2f} s of the event-loop thread ({session.sample_count:,} samples), idle included; "
        "us/req = that time divided by the requests served while sampling",
    )
    if args.save:
        session.save(args.save)
        print(f"\nsession saved to {args.save}")
    if args.html:
        Path(args.html).write_text(profiler.output_html())
        print(f"HTML report written to {args.html}")


def run_pyspy(args, place, tool: str) -> None:
    import shutil

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy  (skipping the profile)")
        return
    bs.pin_self(place.other_cpus)
    upstream = sidecar = spy = None
    with bs.tempdir() as tmp:
        try:
            up_port, api_port, met_port = bs.free_port(), bs.free_port(), bs.free_port()
            upstream = bs.start_upstream(up_port, place.other_cpus, tmp / "upstream.log")
            config = bs.write_config(tmp, up_port, api_port, met_port)
            sidecar = bs.start_sidecar(config, met_port, place.sidecar_cpus, tmp / "sidecar.log", args.log_level)
            body, headers = bs.chat_body(bs.ROUTE), {"x-kubetoll-tenant": bs.TENANT}
            bs.run_load(api_port, body, headers, args.concurrency, args.warmup, place.other_cpus, tmp, tool)
            out = tmp / "pyspy.txt"
            seconds = max(1, round(args.duration))
            cmd = [
                pyspy,
                "record",
                "-p",
                str(sidecar.pid),
                "-d",
                str(seconds),
                "-r",
                str(args.rate),
                "-f",
                "raw",
                "--full-filenames",
                "-o",
                str(out),
            ] + (["--nonblocking"] if args.nonblocking else [])
            spy = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=(lambda: __import__("os").sched_setaffinity(0, place.other_cpus))
                if place.other_cpus
                else None,
            )
            time.sleep(0.3)  # py-spy attaches
            cpu = bs.CpuMeter([sidecar.pid], place.sidecar_cpus)
            res = bs.run_load(api_port, body, headers, args.concurrency, seconds + 0.7, place.other_cpus, tmp, tool)
            used, wall, _ = cpu.stop()
            spy_out = spy.communicate(timeout=60)[0].decode(errors="replace")
            if not out.exists():
                print(f"py-spy wrote nothing (it needs ptrace permission: root or CAP_SYS_PTRACE):\n{spy_out}")
                return
            raw = out.read_text()
            if args.save:
                Path(args.save).write_text(raw)
        finally:
            bs.stop(spy)
            bs.stop(sidecar)
            bs.stop(upstream)
    samples = re.search(r"Samples: (\d+) Errors: (\d+)", spy_out)
    print(
        f"throughput while sampled: {res.rate:,.0f} req/s ({res.requests:,} requests in {res.seconds:.1f} s, "
        f"{res.errors} errors); py-spy "
        f"{samples.group(1) + ' samples, ' + samples.group(2) + ' errors' if samples else ''} at {args.rate} Hz from "
        "outside the process"
    )
    # py-spy leaves out idle samples (the loop waiting in epoll), so the shares are of the sidecar's busy
    # time; spread over its measured CPU time per request to put them in microseconds.
    records = pyspy_records(raw, args.rate)
    per_req = used / res.requests if res.requests else 0.0
    total = sum(t for _, t in records) or 1.0
    records = [(frames, t / total * per_req) for frames, t in records]
    print(f"sidecar CPU while sampled: {per_req * 1e6:.0f} us per request ({used / wall:.0%} of a core)")
    analyse(
        records,
        args.top,
        1,
        "shares are of the sidecar's busy time (py-spy drops idle samples); us/req = share x its CPU time per request",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--profiler",
        choices=("pyinstrument", "py-spy"),
        default="pyinstrument",
        help="pyinstrument: the sidecar in this process (default); py-spy: sample `kubetoll sidecar` as a subprocess",
    )
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of profiled load (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before profiling (default 2)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument(
        "--interval", type=float, default=0.0005, help="pyinstrument sampling interval in seconds (default 0.0005)"
    )
    ap.add_argument(
        "--rate", type=int, default=200, help="py-spy samples per second (default 200; each sample pauses the sidecar)"
    )
    ap.add_argument(
        "--nonblocking",
        action="store_true",
        help="py-spy: do not pause the sidecar to sample (less overhead, some torn stacks)",
    )
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--load-tool", choices=("auto", "wrk", "aiohttp"), default="auto")
    ap.add_argument(
        "--log-level", default="INFO", help="the sidecar's log level (default INFO: one access line a request)"
    )
    ap.add_argument(
        "--save",
        help=(
            "also save the samples here "
            "(pyinstrument: a session for `pyinstrument --load FILE`; py-spy: collapsed stacks)"
        ),
    )
    ap.add_argument("--html", help="pyinstrument: also write the HTML report here")
    args = ap.parse_args()

    place = bs.placement()
    tool = args.load_tool
    if tool == "auto" or (tool == "wrk" and not bs.wrk_path()):
        tool = "wrk" if bs.wrk_path() else "aiohttp"
    if args.profiler == "pyinstrument":
        try:
            import pyinstrument
        except ImportError:
            print("pyinstrument is not installed: .venv/bin/pip install pyinstrument  (skipping the profile)")
            return 0
        what = (
            f"pyinstrument {pyinstrument.__version__} (interval {args.interval * 1000:g} ms), "
            "the sidecar in this process"
        )
    else:
        what = f"py-spy at {args.rate} Hz on `python -m kubetoll_tools.cli sidecar` (a subprocess)"
    print(f"kubetoll sidecar hot-path profile: {what}")
    for line in bs.machine_lines():
        print(line)
    load = "wrk" if tool == "wrk" else "the aiohttp load generator"
    print(
        f"load: {load}, {args.concurrency} connections, {args.warmup:g} s warm-up then {args.duration:g} s profiled "
        "(in a subprocess when the sidecar is in-process)"
    )
    print(f"placement: {place.describe()}")
    print(
        "request: non-streaming POST /v1/chat/completions (system + user message), budgets and metrics on, "
        f"sidecar log level {args.log_level} to a file"
    )
    print()
    if args.profiler == "pyinstrument":
        run_pyinstrument(args, place, tool)
    else:
        run_pyspy(args, place, tool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
