"""Footprint of one sidecar: import time, start to ready, memory per encoding.

Kubetoll runs a sidecar in every application pod, so what one costs idle is paid
once a pod. Measured on real processes, the sidecar alone on one core:

 (1) import: `python -c "import kubetoll_sidecar.server"` (what `kubetoll-sidecar`
     imports before it serves), wall and CPU, median of --imports runs; the
     process's RSS after it; the largest imports (`-X importtime`, cumulative);
     and what each encoding adds to a bare process (RSS after, peak while loading).
 (2) per config (one backend counted with cl100k_base (gpt-4), one with
     o200k_base (gpt-4o-mini), both, and gpt-4o-mini with an in-cluster Llama): `python -m kubetoll_sidecar --config
     router.json` spawned and its /readyz polled every 5 ms; start to ready (wall
     and the process's CPU until then, median of --starts); RSS (VmRSS), its
     anonymous part and the peak (VmHWM) when ready, after --requests requests of
     one tenant, and after --tenants requests each from a tenant of its own (every
     tenant gets its tier's meters), against the simulated upstream. The encodings
     are baked as in the image (`tokens.bake_encodings`, into a temp directory).
 (3) the o200k config once more with the encodings read from OpenAI's text files
     (a dev checkout, nothing baked): start to ready and peak.

The configs carry their catalogue prices as the operator compiles them, so no
sidecar loads the price catalogue. TLS roots come from the hashed /etc/ssl/certs
on demand, as the image sets them (SSL_CERT_DIR, SSL_CERT_FILE=/dev/null). Every
child runs with bytecode, as the image's (its `pip install` compiles the modules):
written once into a temporary PYTHONPYCACHEPREFIX before measuring, whatever
PYTHONDONTWRITEBYTECODE says.
Prints figures next to the targets; never asserts.

    .venv/bin/python bench/footprint.py [--starts 5] [--requests 10000] [--tenants 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchsupport as bs

TARGET_IDLE_ONE_BACKEND_MB = 50  # the targets are in MB (10**6 bytes); /proc reports KiB
TARGET_IDLE_O200K_MB = 70
MIB_PER_MB = 1e6 / 2**20
TARGET_READY_S = 0.5

IN_CLUSTER_MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # priced by GPU time, as a vLLM backend is

CONFIGS = {
    "one backend, cl100k_base": ["gpt-4"],
    "one backend, o200k_base": ["gpt-4o-mini"],
    "two backends, both": ["gpt-4o-mini", "gpt-4"],
    # A hosted model with an in-cluster fallback whose tokenizer tiktoken does not ship: counted
    # with the o200k_base the hosted one needs (tokens.use_encodings_for), so no second table.
    "gpt-4o-mini + in-cluster Llama": ["gpt-4o-mini", IN_CLUSTER_MODEL],
}


def status(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon and VmHWM of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def run_child(code: str, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, CPU s, stdout) of `python -c code`."""
    t0, r0 = time.perf_counter(), os.times()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    wall, r1 = time.perf_counter() - t0, os.times()
    return wall, (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system), out.stdout


RSS_LINE = (
    "import pathlib; s = {l.split(':')[0]: int(l.split()[1]) for l in "
    "pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith(('VmRSS', 'VmHWM'))}; "
    "print(s['VmRSS'] / 1024, s['VmHWM'] / 1024)"
)


def measure_import(runs: int, env: dict[str, str]) -> None:
    walls, cpus, rss = [], [], []
    for _ in range(runs):
        wall, cpu, out = run_child("import kubetoll_sidecar.server\n" + RSS_LINE, env)
        walls.append(wall)
        cpus.append(cpu)
        rss.append(float(out.split()[0]))
    print(
        "(1) import kubetoll_sidecar.server (a fresh interpreter included): "
        f"wall median {statistics.median(walls):.3f} s (min {min(walls):.3f}), "
        f"CPU median {statistics.median(cpus):.3f} s, over {runs} runs; "
        f"RSS after {statistics.median(rss):.1f} MiB"
    )
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import kubetoll_sidecar.server"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    rows = []
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and len(m.group(3)) <= 4:  # the sidecar's own imports and what they import directly
            rows.append((int(m.group(2)), m.group(4)))
    top = sorted(rows, reverse=True)[1:11]
    print("    largest imports (cumulative, one run): " + ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in top))
    for name in ("cl100k_base", "o200k_base"):
        code = (
            "from kubetoll_sidecar import tokens\n"
            + RSS_LINE
            + f"\nimport time; t = time.process_time(); tokens.get_encoding({name!r}); "
            "c = time.process_time() - t\n" + RSS_LINE + "\nprint(c)"
        )
        _, _, out = run_child(code, env)
        before, _, after, peak, cpu = (float(x) for x in out.split())
        print(
            f"    {name} (baked) in a bare process: +{after - before:.1f} MiB RSS, peak +{peak - before:.1f} MiB while "
            f"loading, {cpu * 1000:.0f} ms CPU"
        )
    print()


def write_config(directory: Path, models: list[str], up_port: int, api_port: int, met_port: int) -> Path:
    path = bs.write_config(directory, up_port, api_port, met_port)
    cfg = json.loads(path.read_text())
    template = cfg["backends"][0]
    backends = []
    for i, model in enumerate(models):
        b = {k: v for k, v in template.items() if k != "catalogPrices"}
        b.update(name=f"sim{i}", model=model)
        if model == IN_CLUSTER_MODEL:
            b.update(provider="openai-compatible", pricing={"gpuHourlyUSD": 0.36, "tokensPerSecond": 1000})
        backends.append(bs.compiled_backend(b))
    cfg["backends"] = backends
    cfg["routes"][0]["rules"][0]["backends"] = [b["name"] for b in backends]
    path.write_text(json.dumps(cfg, indent=2))
    return path


def start(config: Path, met_port: int, cpus: set[int] | None, log: Path, env: dict[str, str]) -> tuple:
    """(process, seconds from spawn to /readyz 200, CPU seconds the process used until then)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetoll_sidecar", "--config", str(config)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    url = f"http://127.0.0.1:{met_port}/readyz"
    while time.perf_counter() - t0 < 60:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with status {proc.returncode}\n{log.read_text()[-2000:]}")
        with suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return proc, time.perf_counter() - t0, bs.process_cpu_seconds(proc.pid)
        time.sleep(0.005)
    bs.stop(proc)
    raise RuntimeError("the sidecar did not become ready within 60 s")


def drive(api_port: int, n: int, tenant_of) -> None:
    client = bs.RawHTTPClient(api_port)
    body = bs.chat_body(bs.ROUTE)
    try:
        for i in range(n):
            status_code, _, _, resp = client.request(
                client.build("/v1/chat/completions", body, {"x-kubetoll-tenant": tenant_of(i)})
            )
            if status_code != 200:
                raise RuntimeError(f"HTTP {status_code}: {resp[:300]!r}")
    finally:
        client.close()


def mapped(pid: int, *names: str) -> list[str]:
    """Which of these native libraries the process has mapped (a library imported at start shows here)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [n for n in names if f"/{n}/" in maps]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=5, help="starts per config for start to ready (default 5)")
    ap.add_argument("--imports", type=int, default=5, help="runs of the import measurement (default 5)")
    ap.add_argument("--requests", type=int, default=10_000, help="requests of one tenant (default 10000)")
    ap.add_argument("--tenants", type=int, default=10_000, help="requests each from a new tenant (default 10000)")
    args = ap.parse_args()

    place = bs.placement()
    print("kubetoll sidecar: footprint (import, start to ready, memory)")
    for line in bs.machine_lines():
        print(line)
    print(f"placement: {place.describe()}")
    bs.pin_self(place.other_cpus)
    t = time.process_time()
    sum(range(10**7))
    print(f"calibration: sum(range(10**7)) takes {time.process_time() - t:.2f} s of CPU here (to scale CPU figures by)")

    from kubetoll_sidecar import tokens

    with bs.tempdir() as tmp:
        baked, text = tmp / "baked", tmp / "not-baked"
        baked.mkdir()
        text.mkdir()
        tokens.bake_encodings(baked)
        env = {**bs.child_env(), "KUBETOLL_BAKED_ENCODINGS": str(baked)}
        # Bytecode as the image has it (its `pip install` of the wheel compiles every module): written
        # once into a temporary cache, outside the tree, whatever PYTHONDONTWRITEBYTECODE says here.
        # Without it a dev checkout compiles the project's own modules at every start (~60-100 ms).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
        run_child("import kubetoll_sidecar.server, kubetoll_sidecar.main", env)
        print("bytecode: compiled once into a temporary cache before measuring, as in the image")
        if any(Path("/etc/ssl/certs").glob("*.0")):  # the image's TLS roots: the hashed directory, on demand
            env |= {"SSL_CERT_DIR": "/etc/ssl/certs", "SSL_CERT_FILE": os.devnull}
            print("TLS roots: SSL_CERT_DIR=/etc/ssl/certs, SSL_CERT_FILE=/dev/null, as in the image")
        else:
            print("TLS roots: this machine has no hashed /etc/ssl/certs: the bundle is parsed at start")
        measure_import(args.imports, env)

        up_port = bs.free_port()
        upstream = bs.start_upstream(up_port, place.other_cpus, tmp / "upstream.log")
        rows = []
        try:
            for label, models in CONFIGS.items():
                api_port, met_port = bs.free_port(), bs.free_port()
                config = write_config(tmp, models, up_port, api_port, met_port)
                readies, cpus = [], []
                for i in range(args.starts):
                    proc, ready, cpu = start(config, met_port, place.sidecar_cpus, tmp / "sidecar.log", env)
                    readies.append(ready)
                    cpus.append(cpu)
                    if i < args.starts - 1:
                        bs.stop(proc)
                try:
                    time.sleep(0.5)  # what a pod holds idle, after the start-up's own tasks ran
                    idle = status(proc.pid)
                    libs = mapped(proc.pid, "numpy", "cryptography", "genai_prices", "yaml")
                    drive(api_port, args.requests, lambda i: bs.TENANT)
                    after_req = status(proc.pid)
                    drive(api_port, args.tenants, lambda i: f"tenant-{i:06d}")
                    after_ten = status(proc.pid)
                finally:
                    bs.stop(proc)
                rows.append((label, models, readies, cpus, idle, after_req, after_ten, libs))

            api_port, met_port = bs.free_port(), bs.free_port()
            config = write_config(tmp, CONFIGS["one backend, o200k_base"], up_port, api_port, met_port)
            text_env = {**env, "KUBETOLL_BAKED_ENCODINGS": str(text)}
            proc, text_ready, text_cpu = start(config, met_port, place.sidecar_cpus, tmp / "sidecar.log", text_env)
            text_idle = status(proc.pid)
            bs.stop(proc)
        finally:
            bs.stop(upstream)

    print(
        f"(2) per config: start to ready, wall and the sidecar's own CPU until ready, median (min) of {args.starts} "
        "starts; memory in MiB "
        f"(RSS / anonymous / peak) idle, after {args.requests:,} requests of one tenant, after {args.tenants:,} "
        "more from as many new tenants"
    )
    head = f"    {'config':32s} {'encodings':24s} {'ready':^15s} {'CPU':^15s}   {'idle':^19s}   {'requests':^19s}"
    print(head + f"   {'tenants':^19s}")

    def mem(s: dict[str, float]) -> str:
        return f"{s['VmRSS']:5.1f} / {s['RssAnon']:5.1f} / {s['VmHWM']:5.1f}"

    for label, models, readies, cpus, idle, after_req, after_ten, _ in rows:
        encs = "+".join(tokens.encodings_for(models))
        print(
            f"    {label:32s} {encs:24s} {statistics.median(readies):5.2f} ({min(readies):4.2f}) s "
            f"{statistics.median(cpus):5.2f} ({min(cpus):4.2f}) s   "
            f"{mem(idle)}   {mem(after_req)}   {mem(after_ten)}"
        )
    for label, *_, after_req, after_ten, libs in rows:
        per_k = (after_ten["VmRSS"] - after_req["VmRSS"]) / max(args.tenants / 1000, 1e-9)
        print(
            f"    {label}: {per_k:+.2f} MiB RSS per 1,000 new tenants; native libraries mapped of numpy, "
            f"cryptography, genai_prices, yaml: {', '.join(libs) or 'none'}"
        )
    print(
        f"(3) o200k_base read from OpenAI's text files (nothing baked, a dev checkout): ready in {text_ready:.2f} s "
        f"(CPU {text_cpu:.2f} s), idle {mem(text_idle)}"
    )
    print()
    one = next(r for r in rows if r[0] == "one backend, cl100k_base")
    o200k = next(r for r in rows if r[0] == "one backend, o200k_base")
    ready = max(statistics.median(r[2]) for r in rows)
    print(
        f"Targets: idle RSS <= {TARGET_IDLE_ONE_BACKEND_MB} MB with one backend ({one[4]['VmRSS']:.1f} MiB = "
        f"{one[4]['VmRSS'] / MIB_PER_MB:.1f} MB: "
        f"{verdict(one[4]['VmRSS'] <= TARGET_IDLE_ONE_BACKEND_MB * MIB_PER_MB)}), <= {TARGET_IDLE_O200K_MB} MB with "
        f"an o200k backend ({o200k[4]['VmRSS']:.1f} MiB = {o200k[4]['VmRSS'] / MIB_PER_MB:.1f} MB: "
        f"{verdict(o200k[4]['VmRSS'] <= TARGET_IDLE_O200K_MB * MIB_PER_MB)}); start to "
        f"ready <= {TARGET_READY_S} s (slowest config {ready:.2f} s: {verdict(ready <= TARGET_READY_S)})."
    )
    print("Wall times move with other load on the machine; the CPU figures much less.")
    return 0


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


if __name__ == "__main__":
    sys.exit(main())
