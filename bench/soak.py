"""Soak: does the sidecar's memory and file use stay flat over many mixed requests?

Starts the simulated upstream and a sidecar (budgets and metrics on, as in
sidecar_latency.py), then:

 (a) --requests mixed requests (plain, streamed, with tools, a malformed body, an
     unknown model, and one in 100 a body over the size limit) over a few keep-alive connections, printing
     the sidecar's RSS and open file descriptors every --every requests;
 (b) --tenants requests each from a new tenant id, printing RSS before and after
     and the growth per tenant (the per-tenant tables the budget store keeps).

Reads /proc (Linux). Prints figures; never asserts.

    .venv/bin/python bench/soak.py [--requests 100000] [--every 20000] [--tenants 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchsupport as bs


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def mixed_requests(client: bs.RawHTTPClient) -> list[tuple[bytes, set[int]]]:
    """(raw request, statuses it may get): what a busy namespace sends, good and bad."""
    model = bs.ROUTE
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look a thing up",
                "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": "what"}}},
            },
        }
    ]
    chat = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 32})
    with_tools = json.dumps({"model": model, "messages": [{"role": "user", "content": "find x"}], "tools": tools})
    return [
        (client.build("/v1/chat/completions", chat.encode()), {200}),
        (client.build("/v1/chat/completions", bs.chat_body(model, stream=True)), {200}),
        (client.build("/v1/chat/completions", with_tools.encode()), {200}),
        (client.build("/v1/chat/completions", b'{"model": "chat", "messages": [}'), {400}),
        (client.build("/v1/chat/completions", json.dumps({"model": "nope", "messages": []}).encode()), {400, 404}),
        (client.build("/v1/chat/completions", b"{" + b" " * (5 * 1024 * 1024) + b"}"), {413}),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--every", type=int, default=20_000)
    ap.add_argument("--tenants", type=int, default=100_000)
    args = ap.parse_args()
    for line in bs.machine_lines():
        print(line)
    with bs.tempdir() as tmp:
        up_port, api_port, metrics_port = bs.free_port(), bs.free_port(), bs.free_port()
        upstream = bs.start_upstream(up_port, None, tmp / "upstream.log")
        sidecar = None
        try:
            config = bs.write_config(tmp, up_port, api_port, metrics_port)
            sidecar = bs.start_sidecar(config, metrics_port, None, tmp / "sidecar.log", log_level="WARNING")
            pid = sidecar.pid
            clients = [bs.RawHTTPClient(api_port) for _ in range(4)]
            mixes = [mixed_requests(c) for c in clients]
            print(f"\n(a) {args.requests} mixed requests (6 kinds, good and bad), RSS and open files:")
            print(f"    {'requests':>9s}  {'RSS MiB':>8s}  {'open fds':>8s}  {'req/s':>7s}")
            print(f"    {0:9d}  {rss_mib(pid):8.1f}  {open_fds(pid):8d}")
            started = time.perf_counter()
            unexpected = 0
            for i in range(1, args.requests + 1):
                k = i % len(clients)
                client = clients[k]
                # A 413 (a 5 MiB body) once in 100; the rest cycle through the other kinds.
                raw, allowed = mixes[k][-1] if i % 100 == 0 else mixes[k][i % (len(mixes[k]) - 1)]
                try:
                    status, _, _, _ = client.request(raw)
                except ConnectionError:  # a 413 closes the connection: open a new one
                    client.close()
                    clients[k] = bs.RawHTTPClient(api_port)
                    mixes[k] = mixed_requests(clients[k])
                    continue
                if status not in allowed:
                    unexpected += 1
                if i % args.every == 0:
                    rate = i / (time.perf_counter() - started)
                    print(f"    {i:9d}  {rss_mib(pid):8.1f}  {open_fds(pid):8d}  {rate:7.0f}")
            print(f"    answers outside the expected statuses: {unexpected}")
            for c in clients:
                c.close()

            print(f"\n(b) {args.tenants} requests, each from a new tenant id:")
            client = bs.RawHTTPClient(api_port)
            body = json.dumps(
                {"model": bs.ROUTE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            ).encode()
            before = rss_mib(pid)
            step = max(args.tenants // 5, 1)
            for i in range(args.tenants):
                status, _, _, _ = client.request(
                    client.build("/v1/chat/completions", body, {"x-kubetoll-tenant": f"tenant-{i:07d}"})
                )
                if status != 200:
                    print(f"    tenant {i}: HTTP {status}")
                    break
                if (i + 1) % step == 0:
                    print(f"    {i + 1:9d} tenants  RSS {rss_mib(pid):8.1f} MiB")
            after = rss_mib(pid)
            per_tenant = (after - before) * 1024 * 1024 / args.tenants
            print(f"    RSS {before:.1f} -> {after:.1f} MiB: {per_tenant:.0f} B a tenant")
            client.close()
        finally:
            bs.stop(sidecar)
            bs.stop(upstream)


if __name__ == "__main__":
    main()
