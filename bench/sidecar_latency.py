"""Added latency, throughput and added time to first token of the kubetoll sidecar.

Starts the simulated upstream (its own process) and the sidecar (`python -m
kubetoll_tools.cli sidecar --config <temp config>`, budgets and metrics on),
then measures in one run, each path side by side:

 (a) non-streaming, one client: p50/p99 direct to the upstream and via the
     sidecar over --requests requests each (interleaved in blocks, after a
     warm-up), and the difference;
 (b) requests/s with --concurrency clients for --duration seconds, via the
     sidecar and direct (wrk when installed, else an aiohttp load generator);
 (c) stream=true: time to the first `data:` event, p50/p99, via and direct.

Prints figures next to the performance targets (README, "Performance"); never asserts.

    .venv/bin/python bench/sidecar_latency.py [--requests 2000] [--duration 10] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchsupport as bs

TARGET_ADDED_P50_MS = 0.3
TARGET_ADDED_P99_MS = 0.8
TARGET_RPS = 3500
TARGET_CPU_US = 250  # CPU a request, budgets, metrics and the access log on
TARGET_TTFT_MS = 0.5
NOISY = 0.10  # other processes' share of a core above which a figure is flagged
BLOCK = 100  # requests per path before switching to the other (interleaving cancels drift)


def measure(paths: dict[str, tuple[bs.RawHTTPClient, bytes]], n: int, stream: bool) -> dict[str, list[float]]:
    """n requests on each path, interleaved in blocks; sorted seconds per path (to the first token when streaming)."""
    out: dict[str, list[float]] = {name: [] for name in paths}
    gc.collect()
    gc.disable()
    try:
        done = 0
        while done < n:
            k = min(BLOCK, n - done)
            for name, (client, raw) in paths.items():
                for _ in range(k):
                    status, first, end, body = client.request(raw)
                    if status != 200 or (stream and b"[DONE]" not in body):
                        raise RuntimeError(f"{name}: HTTP {status}: {body[:300]!r}")
                    out[name].append(first if stream else end)
            done += k
    finally:
        gc.enable()
    return {name: sorted(v) for name, v in out.items()}


def warm(client: bs.RawHTTPClient, raw: bytes, n: int) -> None:
    for _ in range(n):
        status, _, _, body = client.request(raw)
        if status != 200:
            raise RuntimeError(f"warm-up: HTTP {status}: {body[:300]!r}")


def ms(x: float) -> str:
    return f"{x * 1000:7.3f} ms"


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def print_paths(title: str, res: dict[str, list[float]], t50: float, t99: float | None) -> None:
    print(title)
    print(f"    {'':22s} {'p50':>10s}  {'p99':>10s}")
    for name, vals in res.items():
        print(f"    {name:22s} {ms(bs.percentile(vals, 50))}  {ms(bs.percentile(vals, 99))}")
    d = res["direct"]
    for name, vals in res.items():
        if name == "direct":
            continue
        a50 = bs.percentile(vals, 50) - bs.percentile(d, 50)
        a99 = bs.percentile(vals, 99) - bs.percentile(d, 99)
        target = ""
        if name == "via sidecar":
            if t99 is None:
                target = f"   target p50 <= {t50} ms ({verdict(a50 * 1000 <= t50)})"
            else:
                target = (
                    f"   target p50 <= {t50} ms / p99 <= {t99} ms ({verdict(a50 * 1000 <= t50)} / "
                    f"{verdict(a99 * 1000 <= t99)})"
                )
        print(f"    {'added, ' + name.replace('via ', ''):22s} {ms(a50)}  {ms(a99)}{target}")


def print_noise(m: tuple[float, float, float | None]) -> None:
    _, wall, other = m
    if other is not None and wall > 0:
        note = " (NOISY: rerun on a quiet machine)" if other / wall > NOISY else ""
        print(
            f"    other processes (not this benchmark's) used {other / wall:.0%} of a core on the pinned cores "
            f"meanwhile{note}"
        )


def hist_delta(before: str, after: str, name: str) -> list[tuple[float, float]]:
    """Cumulative bucket counts (le, count) of a histogram between two scrapes."""

    def buckets(text: str) -> dict[float, float]:
        return {float(lbl["le"]): v for lbl, v in bs.metric_samples(text, name + "_bucket")}

    b, a = buckets(before), buckets(after)
    return sorted((le, a[le] - b.get(le, 0.0)) for le in a)


def describe_own_histogram(delta: list[tuple[float, float]]) -> str:
    if not delta or delta[-1][1] <= 0:
        return "no samples"
    total = delta[-1][1]
    parts = [f"<= {le * 1000:g} ms: {c / total:.0%}" for le, c in delta if le <= 0.0025]
    return ", ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--requests", type=int, default=2000, help="requests per path in (a) and (c), after the warm-up (default 2000)"
    )
    ap.add_argument("--warmup", type=int, default=500, help="warm-up requests per path (default 500)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load per path in (b) (default 10)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients in (b) (default 8)")
    ap.add_argument(
        "--load-tool",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="(b)'s load generator; auto: wrk when installed",
    )
    ap.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the bare aiohttp proxy (the reference) in (a) and (b)",
    )
    ap.add_argument(
        "--log-level",
        default="INFO",
        help="the sidecar's log level (INFO, the default, writes one access line a request)",
    )
    args = ap.parse_args()

    place = bs.placement()
    print("kubetoll sidecar: added latency, throughput, added time to first token")
    for line in bs.machine_lines():
        print(line)
    print(f"placement: {place.describe()}")

    tool = args.load_tool
    if tool == "auto":
        tool = "wrk" if bs.wrk_path() else "aiohttp"
    if tool == "wrk" and not bs.wrk_path():
        print("wrk is not installed; using the aiohttp load generator")
        tool = "aiohttp"
    if tool == "wrk":
        out = subprocess.run([bs.wrk_path() or "wrk", "-v"], capture_output=True, text=True)
        m = re.search(r"wrk (?:\S*/)?(\d[\w.]*)", out.stdout + out.stderr)
        tool_desc = (
            f"wrk {m.group(1) if m else ''} with a Lua POST body, 1 thread, {args.concurrency} keep-alive connections"
        ).replace("  ", " ")
    else:
        tool_desc = (
            f"aiohttp load generator (one ClientSession, {args.concurrency} keep-alive connections, "
            "Python: heavier than wrk)"
        )

    bs.pin_self(place.other_cpus)
    upstream = sidecar = bare = None
    with bs.tempdir() as tmp:
        try:
            up_port, api_port, met_port, bare_port = bs.free_port(), bs.free_port(), bs.free_port(), bs.free_port()
            upstream = bs.start_upstream(up_port, place.other_cpus, tmp / "upstream.log")
            config = bs.write_config(tmp, up_port, api_port, met_port)
            sidecar = bs.start_sidecar(config, met_port, place.sidecar_cpus, tmp / "sidecar.log", args.log_level)
            if args.baseline:
                bare = bs.start_bare_proxy(up_port, bare_port, place.sidecar_cpus, tmp / "bare.log")
            print(
                f"sidecar:   python -m kubetoll_tools.cli sidecar --config router.json --log-level {args.log_level} "
                "(log to a file); budgets on: namespace cap (USD/day, USD/month, tokens/day) and tier `standard` "
                "(tokens/min, requests/min, USD/day), limits too high to reject; Prometheus metrics on"
            )
            print("upstream:  kubetoll_tools.simulator.run (SimSettings: no added latency, recording off)")
            if bare:
                print(
                    "baseline:  a bare aiohttp pass-through proxy (aiohttp server + ClientSession on uvloop, nothing "
                    "else; benchsupport/bare_proxy.py) on the sidecar's core: the reference (the sidecar's own "
                    "upstream calls use upstream_client.py, not ClientSession)"
                )
            print(
                "request:   POST /v1/chat/completions, system + user message (61 prompt tokens), "
                "16 completion tokens back"
            )
            print()

            headers = {"x-kubetoll-tenant": bs.TENANT}
            body_d, body_v = bs.chat_body(bs.UPSTREAM_MODEL), bs.chat_body(bs.ROUTE)
            sbody_d, sbody_v = bs.chat_body(bs.UPSTREAM_MODEL, stream=True), bs.chat_body(bs.ROUTE, stream=True)
            clients = {"direct": bs.RawHTTPClient(up_port), "via sidecar": bs.RawHTTPClient(api_port)}
            if bare:
                clients["via bare aiohttp proxy"] = bs.RawHTTPClient(bare_port)
            bodies = {"direct": body_d, "via sidecar": body_v, "via bare aiohttp proxy": body_d}
            plain = {name: (c, c.build("/v1/chat/completions", bodies[name], headers)) for name, c in clients.items()}
            plain = {k: plain[k] for k in ("direct", "via bare aiohttp proxy", "via sidecar") if k in plain}
            streams = {
                "direct": (clients["direct"], clients["direct"].build("/v1/chat/completions", sbody_d, headers)),
                "via sidecar": (
                    clients["via sidecar"],
                    clients["via sidecar"].build("/v1/chat/completions", sbody_v, headers),
                ),
            }
            for c, raw in list(plain.values()) + list(streams.values()):
                warm(c, raw, args.warmup)

            # (a) added latency, non-streaming, one client
            all_cpus = (place.sidecar_cpus or set()) | (place.other_cpus or set()) or None
            ours = [p.pid for p in (sidecar, upstream, bare) if p] + [os.getpid()]
            before = bs.scrape(met_port)
            sc_before = bs.process_cpu_seconds(sidecar.pid)
            cpu = bs.CpuMeter(ours, all_cpus)
            res_a = measure(plain, args.requests, stream=False)
            noise_a = cpu.stop()
            sc_used = bs.process_cpu_seconds(sidecar.pid) - sc_before
            after = bs.scrape(met_port)
            print_paths(
                f"(a) added latency, non-streaming, one client: {args.requests} requests per path after {args.warmup} "
                f"warm-up, interleaved in blocks of {BLOCK} (raw-socket keep-alive client)",
                res_a,
                TARGET_ADDED_P50_MS,
                TARGET_ADDED_P99_MS,
            )
            own = hist_delta(before, after, "kubetoll_added_latency_seconds")
            print(
                "    the sidecar's own kubetoll_added_latency_seconds over (a) (excludes HTTP parsing/writing and the "
                f"upstream call): {describe_own_histogram(own)}"
            )
            print(
                f"    sidecar CPU time per request in (a): "
                f"{sc_used / args.requests * 1e6:.0f} us (utime + stime of the sidecar process over (a), "
                "one request at a time)"
            )
            print_noise(noise_a)
            print()

            # (c) streams; measured before (b) so both latency figures come from a quiet machine
            cpu = bs.CpuMeter(ours, all_cpus)
            sc_before = bs.process_cpu_seconds(sidecar.pid)
            res_c = measure(streams, args.requests, stream=True)
            sc_used_c = bs.process_cpu_seconds(sidecar.pid) - sc_before
            noise_c = cpu.stop()
            for c in clients.values():
                c.close()

            # (b) throughput
            print(f"(b) throughput, {args.concurrency} concurrent clients, {args.duration:g} s per path ({tool_desc})")
            targets = [("direct", up_port, body_d, None)]
            if bare:
                targets.append(("via bare aiohttp proxy", bare_port, body_d, bare))
            targets.append(("via sidecar", api_port, body_v, sidecar))
            before = bs.scrape(met_port)
            bare_per_req: float | None = None  # the bare proxy's CPU a request on this run: the steadier reference
            for name, port, body, proc in targets:
                cpu = bs.CpuMeter([proc.pid], place.sidecar_cpus) if proc else None
                r = bs.run_load(port, body, headers, args.concurrency, args.duration, place.other_cpus, tmp, tool)
                lat = (
                    f"   latency under load p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms"
                    if r.p50_ms is not None and r.p99_ms is not None
                    else ""
                )
                err = f"   ({r.errors} errors)" if r.errors else ""
                tgt = (
                    f"   target >= {TARGET_RPS:,} req/s ({verdict(r.rate >= TARGET_RPS)})"
                    if name == "via sidecar"
                    else ""
                )
                print(f"    {name:22s} {r.rate:9,.0f} req/s  ({r.requests:,} in {r.seconds:.1f} s){lat}{err}{tgt}")
                if cpu and r.requests:
                    used, wall, other = cpu.stop()
                    per_req = used / r.requests
                    line = (
                        f"    {'':22s} CPU {per_req * 1e6:.0f} us per request ({used / wall:.0%} of its core)"
                        f" -> {1 / per_req:,.0f} req/s per fully used core"
                    )
                    if proc is bare:
                        bare_per_req = per_req
                    if name == "via sidecar":
                        line += f"; target <= {TARGET_CPU_US} us ({verdict(per_req * 1e6 <= TARGET_CPU_US)})"
                        if bare_per_req:
                            line += f"; {per_req / bare_per_req:.2f}x the bare proxy's"
                    if other is not None:
                        line += f"; other processes used {other / wall:.0%} of that core"
                        if other / wall > NOISY:
                            line += " (NOISY: rerun on a quiet machine)"
                    print(line)
            after = bs.scrape(met_port)
            ok = sum(
                val for lbl, val in bs.metric_samples(after, "kubetoll_requests_total") if lbl.get("outcome") == "ok"
            ) - sum(
                val for lbl, val in bs.metric_samples(before, "kubetoll_requests_total") if lbl.get("outcome") == "ok"
            )
            rejected = sum(val for _, val in bs.metric_samples(after, "kubetoll_rejections_total"))
            print(
                f"    the sidecar counted {ok:,.0f} ok requests in (b); budget rejections in the whole run: "
                f"{rejected:.0f}"
            )
            print()

            print_paths(
                "(c) added time to first streamed token (stream=true; time to the first `data:` event): "
                f"{args.requests} streams per path",
                res_c,
                TARGET_TTFT_MS,
                None,
            )
            print(
                f"    sidecar CPU time per stream in (c): {sc_used_c / args.requests * 1e6:.0f} us "
                "(utime + stime of the sidecar process over (c), one stream at a time)"
            )
            print_noise(noise_c)
            print()
            print(
                'Targets (README, "Performance"): added p50 <= 0.3 ms / p99 <= 0.8 ms; '
                f">= {TARGET_RPS:,} req/s and <= {TARGET_CPU_US} us CPU a request on one core; added TTFT <= 0.5 ms."
            )
            print(
                "Added = the via-path percentile minus the direct one. "
                "The load generator shares the machine with the upstream (bench/README.md)."
            )
        finally:
            bs.stop(bare)
            bs.stop(sidecar)
            bs.stop(upstream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
