"""A longer run of the "no body makes the sidecar answer 5xx" property.

Runs tests/test_fuzz_bodies.py (generated bodies to every POST route of a
running sidecar) with --examples examples instead of CI's few hundred, and
prints how long it took and whether a counterexample was found (hypothesis
prints it, shrunk). Prints; the exit status is pytest's.

    .venv/bin/python bench/fuzz_bodies.py [--examples 5000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=5000)
    args = ap.parse_args()
    env = {**os.environ, "KT_FUZZ_EXAMPLES": str(args.examples)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_fuzz_bodies.py"], cwd=ROOT, env=env)
    took = time.perf_counter() - started
    verdict = "no 5xx from the sidecar" if proc.returncode == 0 else "COUNTEREXAMPLE above"
    print(f"{args.examples} generated bodies over 3 routes in {took:.0f} s: {verdict}")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
