"""Many sidecar processes at once, for the multi-process benches: start, readiness, signals, stop, counters.

Each `Sidecar` has its own config file, ports and log, and can be killed or
stopped and started again on the same config (same ports, same state dir), as a
pod's container restarts. `start_all` starts many at once and waits until each
answers /readyz; `stop_all` SIGTERMs them all at once (each drains, returns its
leases and flushes), then waits for each.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import child_env, metric_samples, scrape


def zone_at_midday(now: float) -> str:
    """A fixed-offset zone where it is about noon now: a budget's day cannot end during the run."""
    offset = 12 - time.gmtime(now).tm_hour
    return "Etc/UTC" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


@dataclass
class Sidecar:
    """One `kubetoll sidecar --config ...` process, by its config; `proc` is its current life."""

    config: Path
    api_port: int
    metrics_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def spawn(self, log_level: str = "INFO") -> None:
        """Start a process on this config (`python -m kubetoll_tools.cli`, as the `kubetoll` script runs it)."""
        with self.log.open("ab") as out:  # a restart appends: one log per sidecar across its lives
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubetoll_tools.cli", "sidecar", "--config", str(self.config)]
                + ["--log-level", log_level],
                env=child_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def send(self, sig: signal.Signals) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> None:
        """Wait for the process to end; SIGKILL it past `timeout` (it is ours, by its handle)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_ready(sidecars: Sequence[Sidecar], timeout: float | None = None) -> None:
    """Until every sidecar answers /readyz 200; RuntimeError (with its log's tail) if one exits first."""
    deadline = time.monotonic() + (timeout if timeout is not None else 60 + 3 * len(sidecars))
    pending = set(range(len(sidecars)))
    while pending:
        for i in sorted(pending):
            sc = sidecars[i]
            if not sc.alive:
                code = sc.proc.returncode if sc.proc is not None else None
                raise RuntimeError(
                    f"sidecar {i} ({sc.config}) exited with status {code}\n"
                    + sc.log.read_text(errors="replace")[-2000:]
                )
            if sc.ready():
                pending.discard(i)
        if pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} sidecars not ready in time")
            time.sleep(0.1)


def start_all(sidecars: Sequence[Sidecar], log_level: str = "INFO", timeout: float | None = None) -> None:
    """Start every sidecar at once (a start costs ~1.5 s of CPU; they share the cores) and wait until all are ready."""
    try:
        for sc in sidecars:
            sc.spawn(log_level)
        wait_ready(sidecars, timeout)
    except BaseException:
        stop_all(sidecars)
        raise


def stop_all(sidecars: Sequence[Sidecar], timeout: float = 10.0) -> None:
    """SIGTERM to every sidecar still running, at once, then wait for each (SIGKILL only past `timeout`)."""
    for sc in sidecars:
        sc.send(signal.SIGTERM)
    for sc in sidecars:
        sc.wait(timeout)


def scrape_all(sidecars: Sequence[Sidecar]) -> dict[str, float]:
    """Summed over running sidecars: ok requests, rejections, and the budget store's counters (`stats()`)."""
    tot: dict[str, float] = {"ok": 0.0, "rejected": 0.0}
    for sc in sidecars:
        if not sc.alive:
            continue
        text = scrape(sc.metrics_port)
        tot["ok"] += sum(v for lbl, v in metric_samples(text, "kubetoll_requests_total") if lbl.get("outcome") == "ok")
        tot["rejected"] += sum(v for _, v in metric_samples(text, "kubetoll_rejections_total"))
        for lbl, v in metric_samples(text, "kubetoll_budget_store"):
            tot[lbl["stat"]] = tot.get(lbl["stat"], 0.0) + v
    return tot
