"""The demo's live terminal view (rich), and the snapshot it draws.

A snapshot is read from what the sidecar itself keeps: its spend ledger (spend
per tenant and backend, cache hits and savings), its budget store (percent used)
and its Prometheus registry (fallbacks, rejections and downgrades with their
reasons). The traffic generator adds only what the sidecar cannot know: how many
requests were planned and are in flight.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from .spend import fmt_usd
from .traffic import repeat_analysis

if TYPE_CHECKING:
    from rich.console import JustifyMethod


def counter_values(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """A counter's current values by label set, read from the registry (no HTTP scrape)."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in registry.collect():
        if family.name != name:
            continue
        for s in family.samples:
            if s.name == name + "_total":
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def counter_by(registry: CollectorRegistry, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """Sums a counter over every label but `labels`."""
    c: dict[tuple[str, ...], float] = {}
    for key, value in counter_values(registry, name).items():
        d = dict(key)
        k = tuple(d.get(lb, "") for lb in labels)
        c[k] = c.get(k, 0) + value
    return c


def most_common(counts: Mapping[tuple[str, ...], float]) -> list[tuple[tuple[str, ...], float]]:
    """The counts, highest first (ties in insertion order), as `Counter.most_common()` orders them."""
    return sorted(counts.items(), key=lambda kv: kv[1], reverse=True)


@dataclass
class TenantRow:
    name: str
    tier: str
    ok: int = 0
    rejected: int = 0
    failed: int = 0
    downgraded: int = 0
    spend: float = 0.0
    budget_percent: float | None = None


@dataclass
class BackendRow:
    name: str
    model: str
    requests: int = 0
    spend: float = 0.0
    fallbacks_from: int = 0
    circuit: str = "closed"  # the breaker's state: closed, open (refusing) or half_open (the next call probes)


@dataclass
class Snapshot:
    elapsed: float
    duration: float
    source: str
    route: str
    planned: int
    sent: int
    in_flight: int
    done: int
    total_spend: float
    tenants: list[TenantRow]
    backends: list[BackendRow]
    # Prometheus counter values (floats) summed per label tuple
    fallbacks: Mapping[tuple[str, ...], float]  # (backend, reason)
    rejections: Mapping[tuple[str, ...], float]  # (reason,)
    downgrades: Mapping[tuple[str, ...], float]  # (reason,)
    cache_configured: bool
    cache_hits: int
    ledger_records: int
    avoided_usd: float
    repeats: int = 0
    repeat_spend: float = 0.0
    stopping: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.ledger_records if self.ledger_records else 0.0


def take_snapshot(
    sidecar: Any,
    stats: Any,
    *,
    route: str,
    source: str,
    started: float,
    duration: float,
    tiers: dict[str, str],
    stopping: bool = False,
) -> Snapshot:
    records = list(sidecar.ledger.records())
    state = sidecar.state
    now = sidecar.clock.time()
    spend_by_tenant: dict[str, float] = defaultdict(float)
    by_backend: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    hits, avoided = 0, 0.0
    for r in records:
        spend_by_tenant[r.tenant] += r.cost_usd
        b = by_backend[r.backend or "(cache)"]
        b[0] += 1
        b[1] += r.cost_usd
        if r.cache_hit:
            hits += 1
            avoided += r.avoided_usd
    tenants = []
    for name, tier in tiers.items():
        c = stats.status_by_tenant.get(name, Counter())
        row = TenantRow(
            name, tier, c["ok"], c["rejected"], c["failed"], c["downgraded"], spend_by_tenant.get(name, 0.0)
        )
        if state is not None:
            ms = state.meters.for_request(route, name, tier, now)
            pcts = [sidecar.store.snapshot(m, now).percent for m in ms.windows() if m.level != "cap"]
            row.budget_percent = max(pcts) if pcts else None
        tenants.append(row)
    registry = sidecar.metrics.registry
    fallbacks = counter_by(registry, "kubetoll_fallbacks", "backend", "reason")
    from_counts: Counter[str] = Counter()
    for (backend, _), v in fallbacks.items():
        from_counts[backend] += int(v)
    backends = []
    if state is not None:
        for name, rt in state.backends.items():
            br = sidecar.breakers.get(rt.config)
            n, spend = by_backend.get(name, [0, 0.0])
            backends.append(BackendRow(name, rt.config.model, int(n), spend, from_counts[name], br.state))
    if "(cache)" in by_backend:
        n, spend = by_backend["(cache)"]
        backends.append(BackendRow("(cache)", "", int(n), spend))
    cache_configured = bool(state and any(r.cache_policy for r in state.config.routes))
    rep = repeat_analysis(records, stats.by_request_id)
    return Snapshot(
        elapsed=time.monotonic() - started,
        duration=duration,
        source=source,
        route=route,
        planned=stats.planned,
        sent=stats.sent,
        in_flight=stats.in_flight,
        done=stats.done,
        total_spend=sum(r.cost_usd for r in records),
        tenants=tenants,
        backends=backends,
        fallbacks=fallbacks,
        rejections=counter_by(registry, "kubetoll_rejections", "reason"),
        downgrades=counter_by(registry, "kubetoll_downgrades", "reason"),
        cache_configured=cache_configured,
        cache_hits=hits,
        ledger_records=len(records),
        avoided_usd=avoided,
        repeats=rep["exact_repeats"],
        repeat_spend=rep["exact_repeat_usd"],
        stopping=stopping,
    )


def cache_line(s: Snapshot) -> str:
    if not s.cache_configured and not s.cache_hits:
        base = "caching not configured"
    else:
        base = f"{s.cache_hits} hits ({100 * s.cache_hit_rate:.1f}%), saved {fmt_usd(s.avoided_usd)}"
        if not s.cache_hits:
            base += " (no cache stage answered yet)"
    if s.repeats:
        base += f"; {s.repeats} exact repeats cost {fmt_usd(s.repeat_spend)}"
    return base


def headless_line(s: Snapshot) -> str:
    ok = sum(t.ok for t in s.tenants)
    rej = sum(t.rejected for t in s.tenants)
    dg = sum(t.downgraded for t in s.tenants)
    fb = int(sum(s.fallbacks.values()))
    return (
        f"[{s.elapsed:5.1f}s] sent {s.sent}/{s.planned}, in flight {s.in_flight}, ok {ok}, rejected {rej}, "
        f"downgraded {dg}, fallbacks {fb}, spend {fmt_usd(s.total_spend)}"
    )


def _bar(pct: float | None, width: int = 12) -> Any:
    from rich.text import Text

    if pct is None:
        return Text("no budget", style="dim")
    filled = min(int(round(width * min(pct, 100.0) / 100.0)), width)
    style = "green" if pct < 70 else ("yellow" if pct < 100 else "red")
    t = Text("█" * filled, style=style)
    t.append("░" * (width - filled), style="dim")
    t.append(f" {pct:5.1f}%", style=style)
    return t


def render(s: Snapshot) -> Any:
    """A rich renderable for one snapshot, compact enough for a 30-line terminal."""
    from rich import box
    from rich.console import Group as RGroup
    from rich.table import Table
    from rich.text import Text

    head = Text()
    head.append("kubetoll demo", style="bold")
    head.append(f"  route {s.route} · {s.source}\n", style="dim")
    progress = min(s.elapsed / s.duration, 1.0) if s.duration else 1.0
    head.append(f"{min(s.elapsed, s.duration):5.1f}s / {s.duration:.0f}s ")
    head.append("█" * int(24 * progress) + "░" * (24 - int(24 * progress)), style="cyan")
    head.append(f"  sent {s.sent}/{s.planned} · in flight {s.in_flight} · spend ")
    head.append(fmt_usd(s.total_spend), style="bold green")
    if s.stopping:
        head.append("  stopping: finishing requests in flight…", style="yellow")
    elif s.elapsed > s.duration and s.in_flight:
        head.append("  finishing requests in flight…", style="dim")

    tenants = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
    tenant_columns: list[tuple[str, JustifyMethod]] = [
        ("tenant", "left"),
        ("tier", "left"),
        ("ok", "right"),
        ("rejected", "right"),
        ("downgraded", "right"),
        ("spend", "right"),
        ("budget used (tier, USD/day)", "left"),
    ]
    for col, justify in tenant_columns:
        tenants.add_column(col, justify=justify)
    for t in sorted(s.tenants, key=lambda t: -t.spend):
        tenants.add_row(
            t.name,
            t.tier,
            str(t.ok),
            Text(str(t.rejected), style="red" if t.rejected else ""),
            Text(str(t.downgraded), style="yellow" if t.downgraded else ""),
            fmt_usd(t.spend),
            _bar(t.budget_percent),
        )

    backends = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
    backend_columns: list[tuple[str, JustifyMethod]] = [
        ("backend", "left"),
        ("model", "left"),
        ("requests", "right"),
        ("spend", "right"),
        ("fell back from", "right"),
        ("circuit", "left"),
    ]
    for col, justify in backend_columns:
        backends.add_column(col, justify=justify)
    for b in s.backends:
        backends.add_row(
            b.name,
            b.model,
            str(b.requests),
            fmt_usd(b.spend),
            str(b.fallbacks_from),
            Text(b.circuit.replace("_", "-"), style={"open": "red", "half_open": "yellow"}.get(b.circuit, "dim")),
        )

    ev = Table(box=None, show_header=False, pad_edge=False, expand=True)
    ev.add_column(style="bold", no_wrap=True)
    ev.add_column()
    ev.add_row("fallbacks", ", ".join(f"{b} {r} ×{int(v)}" for (b, r), v in most_common(s.fallbacks)) or "none")
    ev.add_row("rejections", ", ".join(f"{r} ×{int(v)}" for (r,), v in most_common(s.rejections)) or "none")
    ev.add_row("downgrades", ", ".join(f"{r} ×{int(v)}" for (r,), v in most_common(s.downgrades)) or "none")
    ev.add_row("cache", cache_line(s))
    return RGroup(head, tenants, backends, ev)
