"""The access line's cost: through `logging` against straight to the descriptor (access_log.py).

Writes --lines access lines of the sidecar's usual shape to /dev/null both ways, in this
process, and prints microseconds a line (median of --rounds). The sidecar writes one a
request, so the difference is CPU a request saved at INFO.

    .venv/bin/python bench/access_line.py [--lines 50000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sidecar"))

import orjson

from kubetoll_sidecar.access_log import AccessLog

LINE = {
    "request_id": "8d8751be070a0000000039", "endpoint": "chat", "route": "chat", "backend": "primary",
    "tier": "free", "tier_source": None, "workload": "Deployment/search-api", "status": 200, "outcome": "ok",
    "reason": None, "prompt_tokens": 24, "completion_tokens": 16, "usage_reported": True, "cost_usd": 0.000184,
    "fallbacks": 0, "spillover": None, "downgraded": False, "added_ms": 0.512, "upstream_ms": 12.3,
}  # fmt: skip


def per_line(write: object, lines: int) -> float:
    t0 = time.perf_counter()
    for _ in range(lines):
        write(orjson.dumps(LINE))  # type: ignore[operator]
    return (time.perf_counter() - t0) / lines * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    devnull = open(os.devnull, "w")
    # The sidecar's logging set-up (server.configure_logging), on /dev/null.
    logging.basicConfig(level=logging.INFO, stream=devnull, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    via_logging, direct = AccessLog(), AccessLog()
    direct.write_to(devnull.fileno())
    a = [per_line(via_logging.write, args.lines) for _ in range(args.rounds)]
    b = [per_line(direct.write, args.lines) for _ in range(args.rounds)]
    print(f"access line, {args.lines} lines x {args.rounds} rounds, median µs a line (JSON encoding included):")
    print(f"  through logging (StreamHandler, formatter): {statistics.median(a):6.2f}")
    print(f"  straight to the descriptor (one write(2)):  {statistics.median(b):6.2f}")
    print(f"  saved a request: {statistics.median(a) - statistics.median(b):.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
