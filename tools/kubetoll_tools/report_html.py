"""The spend report page: one self-contained HTML file with inline SVG charts.

Two pages share the template and the section renderers here: the demo's
(`render_html`, from `build_report_data`) and `kubetoll report --format html`'s
for a period of real ledger records (`render_ledger_report`).

No scripts, fonts or styles from the network: the file opens offline and can be
mailed around. Every number is computed from the sidecar's spend ledger (what
was actually billed), except counts of events that never reach a backend
(rejections, fallbacks, downgrades), which come from the sidecar's metrics.

The numbers are also embedded as JSON in
`<script type="application/json" id="kubetoll-report-data">`, so a test or a
script can read them without scraping the page.
"""

from __future__ import annotations

import html
import json
import math
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, tzinfo
from typing import Any

from kubetoll_core.prices import ResolvedPrice
from kubetoll_core.spend_record import SpendRecord

from . import experiment_report, spend
from .spend import Group, fmt_usd

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
TIER_COLORS = {"premium": "#4e79a7", "free": "#76b7b2"}
DATA_ID = "kubetoll-report-data"


# --------------------------------------------------------------------------- data


def timeline(records: Iterable[SpendRecord], t0: float, t1: float, bucket_s: float) -> dict[str, Any]:
    """Spend per backend per bucket of `bucket_s` seconds from t0 (the run's start)."""
    n = max(1, math.ceil(max(t1 - t0, bucket_s) / bucket_s))
    tl = edge_timeline(records, [t0 + i * bucket_s for i in range(n + 1)])
    del tl["edges"]  # uniform buckets: their size says it
    tl["bucket_seconds"] = bucket_s
    return tl


def build_report_data(
    records: Sequence[SpendRecord],
    *,
    baseline: ResolvedPrice,
    baseline_label: str,
    t0: float,
    t1: float,
    meta: dict[str, Any],
    backends: list[dict[str, Any]],
    tenants: list[dict[str, Any]],
    events: dict[str, Any],
    cache: dict[str, Any],
    bucket_s: float = 5.0,
) -> dict[str, Any]:
    summary = spend.summarize(records, baseline=baseline, baseline_label=baseline_label, top=len(records) or 1)
    return {
        "meta": meta,
        "summary": summary,
        "timeline": timeline(records, t0, t1, bucket_s),
        "backends": backends,
        "tenants": tenants,
        "events": events,
        "cache": cache,
    }


# --------------------------------------------------------------------------- SVG helpers


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _char_em(c: str) -> float:
    """A generous width of one character in em: wider than most sans-serif faces draw it, so text sized with it
    fits whichever font the viewer's browser picks."""
    if ord(c) >= 0x2E80:  # CJK and wider: a full em
        return 1.0
    if c.isupper() or c in "mwMW@%&#":
        return 0.95
    if c in "il.,:;'|!() ":
        return 0.4
    return 0.66


def text_width(text: str, font_px: float) -> float:
    return font_px * sum(_char_em(c) for c in text)


def fit_text(text: str, max_px: float, font_px: float) -> str:
    """SVG <text> content for `text` in at most `max_px`: escaped, and when too long cut with an ellipsis and the
    whole text in a <title> tooltip. Tenant names and tag values come from callers, so any length arrives."""
    if text_width(text, font_px) <= max_px:
        return _e(text)
    budget = max_px - text_width("…", font_px)
    shown = ""
    for c in text:
        if text_width(shown + c, font_px) > budget:
            break
        shown += c
    return f"<title>{_e(text)}</title>{_e(shown)}…"


def _y_grid(parts: list[str], y_of: Any, ymax: float, step: float, x0: float, x1: float) -> None:
    """Horizontal grid lines with their value labels, from 0 to ymax every step."""
    v = 0.0
    while v <= ymax + 1e-12:
        y = y_of(v)
        parts.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        parts.append(f'<text x="{x0 - 8}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_e(_tick(v, step))}</text>')
        v += step


def _nice_step(max_value: float, ticks: int = 5) -> float:
    if max_value <= 0:
        return 1.0
    raw = max_value / ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _tick(v: float, step: float) -> str:
    """An axis label with as many decimals as the step needs (at least two)."""
    for d in range(2, 10):
        if abs(round(step, d) - step) < step * 1e-9:
            break
    return "$0" if v == 0 else f"${v:,.{d}f}"


def _colors(keys: Iterable[str]) -> dict[str, str]:
    out = {}
    for i, k in enumerate(keys):
        out[k] = "#bab0ac" if k == spend.CACHE_BACKEND else PALETTE[i % len(PALETTE)]
    return out


def stacked_area_svg(
    tl: dict[str, Any],
    colors: dict[str, str],
    width: int = 1000,
    height: int = 320,
    *,
    x_label: Callable[[int], str] | None = None,
    axis_label: str | None = None,
) -> str:
    """Spend per bucket, stacked per series. `x_label(i)` names bucket edge i (default: seconds into the run)."""
    n = tl["buckets"]
    bs = tl["bucket_seconds"]
    series = tl["series"]
    left, right, top, bottom = 78, 20, 16, 44
    pw, ph = width - left - right, height - top - bottom
    totals = [sum(s[i] for s in series.values()) for i in range(n)]
    vmax = max(totals, default=0.0)
    step = _nice_step(vmax)
    ymax = step * max(1, math.ceil(vmax / step)) if vmax > 0 else 1.0
    x_of = lambda i: left + pw * (i / n)  # noqa: E731
    y_of = lambda v: top + ph * (1 - v / ymax)  # noqa: E731
    parts = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="Spend over time per backend">']
    _y_grid(parts, y_of, ymax, step, left, width - right)
    # x labels: about eight of them, on whole multiples of the bucket
    label = x_label or (lambda i: f"{int(i * bs)}s")
    # Labels no closer than the widest one needs, so neighbours never overlap.
    widest = max((text_width(label(i), 12) for i in range(n + 1)), default=0.0) + 12
    every = max(1, math.ceil(n / 8), math.ceil(widest / (pw / n)))
    for i in range(0, n + 1, every):
        x = x_of(i)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 5}" stroke="#9ca3af"/>')
        anchor = "end" if i == n else "middle"  # the last edge's label ends at the axis end, inside the chart
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 20}" text-anchor="{anchor}" class="tick">{_e(label(i))}</text>')
    axis = axis_label if axis_label is not None else f"seconds into the run (spend per {bs:g}-second bucket)"
    parts.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" class="axis">'
        f"{fit_text(axis, pw, 12)}</text>"
    )
    # stacked areas: each bucket is a step of its width, so areas read as spend per bucket
    base = [0.0] * n
    for name, values in series.items():
        upper = [base[i] + values[i] for i in range(n)]
        pts_top = []
        pts_bot = []
        for i in range(n):
            pts_top += [(x_of(i), y_of(upper[i])), (x_of(i + 1), y_of(upper[i]))]
            pts_bot += [(x_of(i), y_of(base[i])), (x_of(i + 1), y_of(base[i]))]
        poly = pts_top + list(reversed(pts_bot))
        d = " ".join(f"{x:.1f},{y:.1f}" for x, y in poly)
        parts.append(
            f'<polygon points="{d}" fill="{colors[name]}" fill-opacity="0.85" stroke="{colors[name]}" '
            f'stroke-width="0.5"><title>{_e(name)}: {_e(fmt_usd(sum(values)))}</title></polygon>'
        )
        base = upper
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + ph}" y2="{top + ph}" stroke="#6b7280"/>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#6b7280"/>')
    parts.append("</svg>")
    return "".join(parts)


def legend_html(colors: dict[str, str], totals: dict[str, float]) -> str:
    items = "".join(
        f'<span class="legend-item"><span class="swatch" style="background:{c}"></span>'
        f'<span class="name" title="{_e(k)}">{_e(k)}</span> <b>{_e(fmt_usd(totals.get(k, 0.0)))}</b></span>'
        for k, c in colors.items()
    )
    return f'<div class="legend">{items}</div>'


def tenant_bars_svg(rows: list[dict[str, Any]], width: int = 1000) -> str:
    """The demo's tenants: coloured by tier, with what was served, rejected and downgraded."""

    def value(r: dict[str, Any]) -> str:
        bits = [fmt_usd(r["cost_usd"]), f"{r['requests']} served"]
        if r.get("rejected"):
            bits.append(f"{r['rejected']} rejected")
        if r.get("downgraded"):
            bits.append(f"{r['downgraded']} downgraded")
        if r.get("budget_percent") is not None:
            bits.append(f"budget {r['budget_percent']:.0f}%")
        return " · ".join(bits)

    return bars_svg(
        rows, lambda r: TIER_COLORS.get(r.get("tier", ""), "#9c755f"), value, "Spend per tenant", width=width
    )


def bars_svg(
    rows: list[dict[str, Any]],
    color_of: Callable[[dict[str, Any]], str],
    value_of: Callable[[dict[str, Any]], str],
    aria: str,
    width: int = 1000,
) -> str:
    """One horizontal bar per row (`key`, `cost_usd`): the key left of it, `value_of(row)` right of it, both cut
    to their column so neither leaves the chart."""
    row_h, left, right, top = 34, 190, 330, 8
    height = top * 2 + row_h * max(len(rows), 1)
    vmax = max((r["cost_usd"] for r in rows), default=0.0) or 1.0
    pw = width - left - right
    parts = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{_e(aria)}">']
    for i, r in enumerate(rows):
        y = top + i * row_h
        w = max(pw * r["cost_usd"] / vmax, 1.5)
        key = str(r["key"])
        parts.append(
            f'<text x="{left - 10}" y="{y + row_h / 2 + 5:.1f}" text-anchor="end" class="label">'
            f"{fit_text(key, left - 16, 13)}</text>"
        )
        parts.append(
            f'<rect x="{left}" y="{y + 6}" width="{w:.1f}" height="{row_h - 12}" rx="3" '
            f'fill="{color_of(r)}"><title>{_e(key)}: {_e(fmt_usd(r["cost_usd"]))}</title></rect>'
        )
        room = width - (left + w + 8) - 6
        parts.append(
            f'<text x="{left + w + 8:.1f}" y="{y + row_h / 2 + 5:.1f}" class="value">{fit_text(value_of(r), room, 12)}'
            "</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def waterfall_svg(s: dict[str, Any], width: int = 1000, height: int = 300) -> str:
    """Baseline → minus cache, routing, downgrade savings → what was spent."""
    steps = [
        ("baseline", s["baseline_usd"], "total"),
        ("cache", -s["cache_usd"], "delta"),
        ("routing", -s["routing_usd"], "delta"),
        ("downgrade", -s["downgrade_usd"], "delta"),
        ("actual spend", s["actual_usd"], "total"),
    ]
    left, right, top, bottom = 78, 20, 24, 48
    pw, ph = width - left - right, height - top - bottom
    running = 0.0
    bars = []
    hi = 0.0
    for label, v, kind in steps:
        if kind == "total":
            lo_v, hi_v = 0.0, v
            running = v
        else:
            lo_v, hi_v = sorted((running, running + v))
            running += v
        hi = max(hi, hi_v, lo_v)
        bars.append((label, v, kind, lo_v, hi_v, running))
    step = _nice_step(hi)
    ymax = step * max(1, math.ceil(hi / step)) if hi > 0 else 1.0
    y_of = lambda v: top + ph * (1 - v / ymax)  # noqa: E731
    slot = pw / len(bars)
    parts = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="Savings against the baseline">']
    _y_grid(parts, y_of, ymax, step, left, width - right)
    for i, (label, val, kind, lo_v, hi_v, after) in enumerate(bars):
        x = left + i * slot + slot * 0.2
        w = slot * 0.6
        if kind == "total":
            color = "#6b7280" if label == "baseline" else "#2563eb"
        else:
            color = "#16a34a" if val <= 0 else "#dc2626"
        y1, y2 = y_of(hi_v), y_of(lo_v)
        hgt = max(y2 - y1, 1.0)
        parts.append(f'<rect x="{x:.1f}" y="{y1:.1f}" width="{w:.1f}" height="{hgt:.1f}" rx="2" fill="{color}"/>')
        shown = val if kind == "total" else -val
        if kind == "total" or abs(shown) < 5e-10:
            text = fmt_usd(shown)
        else:
            text = ("−" if shown > 0 else "+") + fmt_usd(abs(shown))
        parts.append(f'<text x="{x + w / 2:.1f}" y="{y1 - 6:.1f}" text-anchor="middle" class="value">{_e(text)}</text>')
        parts.append(
            f'<text x="{x + w / 2:.1f}" y="{top + ph + 20}" text-anchor="middle" class="label">{_e(label)}</text>'
        )
        if i + 1 < len(bars):
            nxt = y_of(after)
            parts.append(
                f'<line x1="{x + w:.1f}" x2="{x + slot:.1f}" y1="{nxt:.1f}" y2="{nxt:.1f}" stroke="#9ca3af" '
                'stroke-dasharray="3,3"/>'
            )
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + ph}" y2="{top + ph}" stroke="#6b7280"/>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- page


# A backslash ending a line joins it to the next one: the CSS has no line break there.
_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;\
color:#111827;background:#f9fafb;margin:0}
main{max-width:1100px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:18px;margin:34px 0 10px}h3{font-size:15px;margin:18px 0 8px}
.sub{color:#6b7280;font-size:14px;margin:0 0 22px}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:12px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:14px 16px}
.card .k{color:#6b7280;font-size:13px}
.card .v{font-size:24px;font-weight:600;margin-top:4px}.card .n{color:#6b7280;font-size:12px;margin-top:2px}
.good{color:#15803d}.bad{color:#b91c1c}
.panel{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:14px 16px}
svg text.tick{font-size:12px;fill:#6b7280}svg text.axis{font-size:12px;fill:#374151}
svg text.label{font-size:13px;fill:#111827}svg text.value{font-size:12px;fill:#374151}
.legend{display:flex;flex-wrap:wrap;gap:16px;font-size:13px;margin:0 0 8px}
.legend-item{display:flex;align-items:center;gap:6px}.swatch{width:12px;height:12px;border-radius:2px;display:inline-block}
table{border-collapse:collapse;width:100%;font-size:13px;background:#fff}
th,td{padding:6px 10px;border-bottom:1px solid #e5e7eb;text-align:right;white-space:nowrap}
th{background:#f3f4f6;font-weight:600}th:first-child,td:first-child{text-align:left}
td.l,th.l{text-align:left}
td:first-child{max-width:340px;overflow:hidden;text-overflow:ellipsis}
.legend-item .name{max-width:300px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.empty{background:#fff;border:1px dashed #d1d5db;border-radius:8px;padding:28px;text-align:center;color:#4b5563}
.note{color:#4b5563;font-size:13px;line-height:1.5}
.two{display:grid;grid-template-columns:1fr 1fr;gap:16px}
code{font-size:12px;background:#f3f4f6;padding:1px 4px;border-radius:3px}
"""


def _table(headers: list[str], rows: list[list[Any]], left_cols: int = 1) -> str:
    def td(i: int, c: Any) -> str:
        # A long first cell (a tenant name) is cut by the CSS; its title keeps the whole text.
        title = f' title="{_e(c)}"' if i == 0 else ""
        return f'<td class="{"l" if i < left_cols else ""}"{title}>{_e(c)}</td>'

    th = "".join(f'<th class="{"l" if i < left_cols else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(td(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(data: dict[str, Any]) -> str:
    meta = data["meta"]
    summ = data["summary"]
    tot = summ["totals"]
    sav = summ["savings"]
    tl = data["timeline"]
    ev = data["events"]
    cache = data["cache"]
    colors = _colors(tl["series"].keys())
    backend_totals = {k: sum(v) for k, v in tl["series"].items()}
    rejected = sum(int(v) for v in ev.get("rejections", {}).values())
    fallbacks = sum(int(v) for v in ev.get("fallbacks", {}).values())

    cards = [
        (
            "spent",
            fmt_usd(tot["cost_usd"]),
            f"{tot['requests']} requests billed · {fmt_usd(tot['cost_per_request_usd'])}/request",
            "",
        ),
        (f"baseline: all on {sav['baseline']}", fmt_usd(sav["baseline_usd"]), "same tokens, no cache, no routing", ""),
        (
            "saved",
            f"{fmt_usd(sav['saved_usd'])} ({sav['saved_percent']:.0f}%)",
            f"cache {fmt_usd(sav['cache_usd'])} · routing {fmt_usd(sav['routing_usd'])} · "
            f"downgrade {fmt_usd(sav['downgrade_usd'])}",
            "good" if sav["saved_usd"] >= 0 else "bad",
        ),
        (
            "rejected · fallbacks · downgraded",
            f"{rejected} · {fallbacks} · {tot['downgraded']}",
            "budget rejections · moved down a chain · served by cheaper backends",
            "",
        ),
    ]

    tenants = data["tenants"]
    tenant_rows = sorted(tenants, key=lambda r: -r["cost_usd"])

    backend_info = {b["name"]: b for b in data["backends"]}
    backend_table = _table(
        ["backend", "model", "price", "requests", "input tokens", "output tokens", "spend", "per request", "share"],
        [
            [
                g["key"],
                backend_info.get(g["key"], {}).get("model", ""),
                backend_info.get(g["key"], {}).get("price", ""),
                g["requests"],
                f"{g['prompt_tokens']:,}",
                f"{g['completion_tokens']:,}",
                fmt_usd(g["cost_usd"]),
                fmt_usd(g["cost_per_request_usd"]),
                f"{100 * g['cost_usd'] / tot['cost_usd']:.1f}%" if tot["cost_usd"] else "–",
            ]
            for g in summ["by_backend"]
        ],
        left_cols=3,
    )
    tenant_table = _table(
        [
            "tenant",
            "tier",
            "served",
            "rejected",
            "downgraded",
            "input tokens",
            "output tokens",
            "spend",
            "per request",
            "budget used",
        ],
        [
            [
                r["key"],
                r.get("tier", ""),
                r["requests"],
                r.get("rejected", 0),
                r["downgraded"],
                f"{r['prompt_tokens']:,}",
                f"{r['completion_tokens']:,}",
                fmt_usd(r["cost_usd"]),
                fmt_usd(r["cost_per_request_usd"]),
                f"{r['budget_percent']:.0f}%" if r.get("budget_percent") is not None else "–",
            ]
            for r in tenant_rows
        ],
        left_cols=2,
    )
    events_rows: list[list[Any]] = []
    for key, v in sorted(ev.get("rejections", {}).items(), key=lambda kv: -kv[1]):
        events_rows.append(["rejection", key, int(v)])
    for key, v in sorted(ev.get("fallbacks", {}).items(), key=lambda kv: -kv[1]):
        events_rows.append(["fallback", key, int(v)])
    for key, v in sorted(ev.get("downgrades", {}).items(), key=lambda kv: -kv[1]):
        events_rows.append(["downgrade", key, int(v)])
    for key, v in sorted(ev.get("spillovers", {}).items(), key=lambda kv: -kv[1]):
        events_rows.append(["spill-over", f"{key}: every replica's queue deep; sent to the next backend", int(v)])
    cascade = ev.get("cascade")
    if cascade:
        why = (
            f"escalated to the next step, of {cascade['cascaded']} cascaded; saved {fmt_usd(cascade['saved_usd'])} "
            "against always calling the last step"
        )
        events_rows.append(["cascade", why, int(cascade["escalated"])])
    events_table = _table(["event", "where and why", "count"], events_rows or [["none", "", 0]], left_cols=2)

    if cache.get("hits"):
        cache_text = (
            f"{cache['hits']} requests were answered from cache ({100 * cache['hit_rate']:.1f}%), avoiding "
            f"{fmt_usd(cache['avoided_usd'])}."
        )
    elif cache.get("configured"):
        cache_text = "A cache policy is configured, but no request was answered from cache in this run."
    else:
        cache_text = "Caching is not configured, so no request was answered from cache."
    waste = ""
    if cache.get("exact_repeats"):
        waste = (
            f" {cache['exact_repeats']} requests repeated, word for word, "
            "a question the same tenant had already been answered; "
            f"they cost {fmt_usd(cache['exact_repeat_usd'])} — what an exact cache would have saved. "
            f"{cache.get('paraphrases', 0)} more rephrased an earlier question "
            f"({fmt_usd(cache.get('paraphrase_usd', 0.0))}): the candidates for a semantic cache."
        )

    attribution_html = _attribution_section(data.get("attribution") or {})
    stopped = " Stopped early (interrupted); the report covers what ran." if meta.get("interrupted") else ""
    notes = "".join(f" · {n}" for n in meta.get("notes", []))
    sub = (
        f"{_e(meta.get('generated_at', ''))} · {meta.get('duration_s', 0):.0f} s of traffic · "
        f"seed {_e(meta.get('seed'))} · "
        f"{_e(meta.get('requests_sent', 0))} requests sent to route <code>{_e(meta.get('route', ''))}</code> · "
        f"config: {_e(meta.get('config_source', ''))}{_e(notes)}{_e(stopped)}"
    )
    body = f"""<h2>Spend over time, per backend</h2>
<div class="panel">{legend_html(colors, backend_totals)}{stacked_area_svg(tl, colors)}</div>

<h2>Savings against sending everything to {_e(sav["baseline"])}</h2>
<div class="panel">{waterfall_svg(sav)}
<p class="note">The baseline prices every billed request's tokens at {_e(sav["baseline"])}'s list prices \
({_e(meta.get("baseline_price", ""))}), with no cache and no routing.
<b>Routing</b> is what requests saved by being served, without a downgrade, on a cheaper backend (negative when a \
fallback went to a dearer one);
<b>downgrade</b> is what downgraded requests saved; <b>cache</b> is what cache hits avoided. \
{_e(cache_text)}{_e(waste)}</p></div>

<h2>Spend per tenant</h2>
<div class="panel">{tenant_bars_svg(tenant_rows)}
<p class="note"><span class="swatch" style="background:{TIER_COLORS["premium"]}"></span> premium &nbsp; \
<span class="swatch" style="background:{TIER_COLORS["free"]}"></span> free.
Budget used: the fullest of the tenant's tier USD budgets, as the sidecar's budget store saw it at the end.</p></div>

<h2>Backends</h2>
{backend_table}

<h2>Tenants</h2>
{tenant_table}

{attribution_html}
<h2>Rejections, fallbacks and downgrades</h2>
{events_table}
<p class="note">Counts from the sidecar's Prometheus metrics (<code>kubetoll_rejections</code>, \
<code>kubetoll_fallbacks</code>, <code>kubetoll_downgrades</code>); spend and tokens from its ledger \
({tot["requests"]} records).
A downgrade is counted when it is decided, so the metric also counts downgraded requests that a budget then rejected; \
the ledger's {tot["downgraded"]} are the ones served.</p>"""
    return render_page("Kubetoll demo report", sub, cards_html(cards), body, data)


def cards_html(cards: Iterable[tuple[str, str, str, str]]) -> str:
    """The headline cards: (title, value, note, CSS class of the value)."""
    return "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v {cls}">{_e(v)}</div>'
        f'<div class="n">{_e(n)}</div></div>'
        for k, v, n, cls in cards
    )


def render_page(title: str, sub_html: str, cards: str, body: str, data: dict[str, Any]) -> str:
    """The page both reports share: title, subtitle (already escaped HTML), cards, sections, the embedded data."""
    # "<" as its JSON escape: no "</script>" or "<!--" in a caller's string can end or derail the script element.
    payload = json.dumps(data, sort_keys=True).replace("<", "\\u003c")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body><main>
<h1>{_e(title)}</h1>
<p class="sub">{sub_html}</p>
<div class="cards">{cards}</div>

{body}
<script type="application/json" id="{DATA_ID}">{payload}</script>
</main></body></html>
"""


def _attribution_section(attr: dict[str, Any]) -> str:
    """Cost per feature (the `feature` tag) and per business outcome, when the traffic carried them."""
    features = attr.get("by_feature") or []
    outcomes = attr.get("outcomes") or []
    if not (any(g["key"] != "(untagged)" for g in features) or outcomes):
        return ""
    parts = ["<h2>Cost per feature and per outcome</h2>"]
    if features:
        rows = [[g["key"], g["requests"], fmt_usd(g["cost_usd"]), fmt_usd(g["cost_per_request_usd"])] for g in features]
        parts.append(_table(["feature", "requests", "spend", "per request"], rows, left_cols=1))
    if outcomes:
        rows = [
            [o["outcome"], o["count"], fmt_usd(o["spend_usd"]), fmt_usd(o["cost_per_outcome_usd"])] for o in outcomes
        ]
        parts.append(_table(["outcome", "conversations", "their spend", "per outcome"], rows, left_cols=1))
    parts.append(
        '<p class="note">From the ledger: the requests\' <code>feature</code> tag '
        "(<code>x-kubetoll-tags</code>), and the outcomes the app reported for its sessions "
        "(<code>x-kubetoll-outcome</code>, <code>POST /kubetoll/v1/outcomes</code>): a conversation's spend is "
        "every request of its session.</p>"
    )
    return "\n".join(parts)


# --------------------------------------------------------------------------- the ledger's page

# Up to this long a period is charted per hour, beyond it per day (in the report's time zone).
HOURLY_UP_TO_S = 2 * 86400
# Dimensions charted besides tags: record fields, each its own heading.
_FIELD_DIMENSIONS = ("tenant", "route", "backend", "model", "tier", "workload")
_NONE_KEY = "(none)"  # the bar of records without a value for a field (an older sidecar wrote no model)


def bucket_edges(start: float, end: float, tz: tzinfo) -> tuple[list[float], str]:
    """Edges (epoch seconds) of the hours or days, local to tz, that cover [start, end), and which it is."""
    hourly = end - start <= HOURLY_UP_TO_S
    first = datetime.fromtimestamp(start, tz)
    if hourly:
        edge = first.replace(minute=0, second=0, microsecond=0).timestamp()
        edges = [edge]
        while edges[-1] < end:  # hours as elapsed seconds: a DST change neither repeats nor skips one
            edges.append(edges[-1] + 3600)
    else:
        day = first.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        edges = [day.replace(tzinfo=tz).timestamp()]
        while edges[-1] < end:  # local midnights: a day with a DST change is 23 or 25 hours
            day += timedelta(days=1)
            edges.append(day.replace(tzinfo=tz).timestamp())
    if len(edges) < 2:
        edges.append(edges[0] + (3600 if hourly else 86400))
    return edges, "hour" if hourly else "day"


def edge_timeline(records: Iterable[SpendRecord], edges: list[float]) -> dict[str, Any]:
    """Spend per backend between consecutive edges (the `timeline` shape, with the edges)."""
    n = len(edges) - 1
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * n)
    for r in records:
        i = min(max(bisect_right(edges, r.time) - 1, 0), n - 1)
        series[r.backend or spend.CACHE_BACKEND][i] += r.cost_usd
    order = sorted(series, key=lambda k: (-sum(series[k]), k))
    return {
        "bucket_seconds": edges[1] - edges[0],
        "buckets": n,
        "edges": edges,
        "series": {k: series[k] for k in order},
    }


def dimension_groups(recs: Sequence[SpendRecord], top: int) -> list[tuple[str, list[dict[str, Any]]]]:
    """Per dimension (record fields, then every tag key the records carry): its `top` dearest groups, the rest
    folded into one row. A field no record sets (every group "(none)") is left out."""
    out: list[tuple[str, list[Group]]] = []
    for field in _FIELD_DIMENSIONS:
        groups = spend.group_by(recs, field)
        if field == "workload" and all(g.key == spend.UNKNOWN_WORKLOAD for g in groups):
            continue
        if all(not g.key for g in groups):
            continue
        out.append((field, groups))
    for key in sorted({k for r in recs for k in r.tag_map}):
        out.append((f"tag {key}", spend.group_by_tag(recs, key)))
    result = []
    for heading, groups in out:
        rows = [{**g.as_dict(), "key": g.key or _NONE_KEY} for g in groups[:top]]
        rest = groups[top:]
        if rest:
            rows.append(
                {
                    "key": f"({len(rest)} more)",
                    "requests": sum(g.requests for g in rest),
                    "cost_usd": math.fsum(g.cost_usd for g in rest),
                }
            )
        result.append((heading, rows))
    return result


def session_summary(recs: Iterable[SpendRecord]) -> dict[str, Any] | None:
    """Spend per session (the records that carried a session id): how many, their spend, mean and dearest."""
    cost = spend.session_costs(recs)
    if not cost:
        return None
    total = math.fsum(cost.values())
    dearest = max(cost, key=lambda k: (cost[k], k))
    return {
        "sessions": len(cost),
        "spend_usd": total,
        "cost_per_session_usd": total / len(cost),
        "dearest_session": dearest,
        "dearest_session_usd": cost[dearest],
    }


def _when(t: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(t, tz).strftime("%Y-%m-%d %H:%M %Z").strip()


def render_ledger_report(
    recs: list[SpendRecord],
    *,
    namespace: str,
    source: str,
    since: float,
    until: float | None,
    tz: tzinfo,
    baseline: ResolvedPrice | None,
    baseline_label: str,
    top: int,
) -> str:
    """`kubetoll report --format html`: the page for a period of ledger records (`until` None: up to now, so the
    chart ends at the last record)."""
    top = max(1, top)
    summ = spend.summarize(recs, baseline=baseline, baseline_label=baseline_label, top=top)
    summ["outcomes"] = spend.outcome_costs(recs)
    summ["cascade"] = experiment_report.cascade_summary(recs)
    summ["sessions"] = session_summary(recs)
    period = f"{_when(since, tz)} – {_when(until, tz) if until is not None else 'now'}"
    sub = f"namespace <code>{_e(namespace)}</code> · {_e(period)} · from {_e(source)} · {len(recs)} records"
    meta = {"namespace": namespace, "source": source, "since": since, "until": until, "tz": str(tz)}
    title = "Kubetoll spend report"
    if not recs:
        body = f'<div class="empty"><b>No spend records</b> in namespace {_e(namespace)} for {_e(period)}.</div>'
        return render_page(title, sub, "", body, {"meta": meta, "summary": summ, "timeline": None, "dimensions": {}})
    end = until if until is not None else max(r.time for r in recs) + 1
    edges, unit = bucket_edges(min(since, min(r.time for r in recs)), max(end, since + 1), tz)
    tl = edge_timeline(recs, edges)
    dims = dimension_groups(recs, top)
    data = {"meta": meta, "summary": summ, "timeline": tl, "dimensions": dict(dims)}
    return render_page(title, sub, cards_html(_ledger_cards(summ)), _ledger_body(summ, tl, unit, dims, tz), data)


def _ledger_cards(summ: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    tot, sav = summ["totals"], summ["savings"]
    per_request = fmt_usd(tot["cost_per_request_usd"])
    cards = [
        ("spent", fmt_usd(tot["cost_usd"]), f"{tot['requests']} requests · {per_request}/request", ""),
        (
            "input · output tokens",
            f"{tot['prompt_tokens']:,} · {tot['completion_tokens']:,}",
            f"{tot['cached_tokens']:,} input tokens from the provider's cache",
            "",
        ),
        (
            "cache hits · downgraded · fallbacks",
            f"{tot['cache_hits']} · {tot['downgraded']} · {tot['fallbacks']}",
            f"cache hits avoided {fmt_usd(tot['avoided_usd'])}",
            "",
        ),
    ]
    if sav is not None:
        cards.append(
            (
                f"saved against {sav['baseline']}",
                f"{fmt_usd(sav['saved_usd'])} ({sav['saved_percent']:.0f}%)",
                f"baseline {fmt_usd(sav['baseline_usd'])}",
                "good" if sav["saved_usd"] >= 0 else "bad",
            )
        )
    return cards


def _ledger_body(
    summ: dict[str, Any], tl: dict[str, Any], unit: str, dims: list[tuple[str, list[dict[str, Any]]]], tz: tzinfo
) -> str:
    edges = tl["edges"]
    fmt = "%m-%d %H:%M" if unit == "hour" else "%Y-%m-%d"
    colors = _colors(tl["series"].keys())
    chart = stacked_area_svg(
        tl,
        colors,
        x_label=lambda i: datetime.fromtimestamp(edges[i], tz).strftime(fmt),
        axis_label=f"{tz} (spend per {unit})",
    )
    parts = [
        "<h2>Spend over time, per backend</h2>",
        f'<div class="panel">{legend_html(colors, {k: sum(v) for k, v in tl["series"].items()})}{chart}</div>',
        "<h2>Spend by dimension</h2>",
    ]
    for heading, rows in dims:
        parts.append(f"<h3>{_e(heading)}</h3>")
        bars = bars_svg(rows, lambda r: PALETTE[0], _bar_value, f"Spend per {heading}")
        parts.append(f'<div class="panel">{bars}</div>')
    sav = summ["savings"]
    if sav is not None:
        parts.append(f"<h2>Savings against sending everything to {_e(sav['baseline'])}</h2>")
        parts.append(
            f'<div class="panel">{waterfall_svg(sav)}<p class="note">The baseline prices every record\'s tokens at '
            f"{_e(sav['baseline'])}'s list prices, with no cache and no routing; the parts add up to what was "
            "saved.</p></div>"
        )
    parts.append(_outcome_section(summ))
    if summ["cascade"]:
        parts.append("<h2>Cascades</h2>")
        parts.append(f'<p class="note">{_e(experiment_report.cascade_line(summ["cascade"]))}</p>')
    return "\n".join(parts)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _bar_value(r: dict[str, Any]) -> str:
    bits = [fmt_usd(r["cost_usd"]), _count(r["requests"], "request")]
    if r.get("cache_hits"):
        bits.append(_count(r["cache_hits"], "cache hit"))
    if r.get("downgraded"):
        bits.append(f"{r['downgraded']} downgraded")
    return " · ".join(bits)


def _outcome_section(summ: dict[str, Any]) -> str:
    outcomes, sessions = summ["outcomes"], summ["sessions"]
    parts = ["<h2>Cost per outcome and per session</h2>"]
    if outcomes:
        rows = [
            [o["outcome"], o["count"], fmt_usd(o["spend_usd"]), fmt_usd(o["cost_per_outcome_usd"])] for o in outcomes
        ]
        parts.append(_table(["outcome", "conversations", "their spend", "per outcome"], rows))
    else:
        parts.append('<p class="note">No business outcome was reported in this period.</p>')
    if sessions:
        rows = [
            [
                sessions["sessions"],
                fmt_usd(sessions["spend_usd"]),
                fmt_usd(sessions["cost_per_session_usd"]),
                sessions["dearest_session"],
                fmt_usd(sessions["dearest_session_usd"]),
            ]
        ]
        parts.append(_table(["sessions", "their spend", "per session", "dearest session", "its spend"], rows, 0))
    parts.append(
        '<p class="note">Outcomes are what the app reported (<code>x-kubetoll-outcome</code>, '
        "<code>POST /kubetoll/v1/outcomes</code>); a conversation's spend is every record of its session.</p>"
    )
    return "\n".join(parts)


def extract_data(page: str) -> dict[str, Any]:
    """The JSON embedded in a report page."""
    start_tag = f'<script type="application/json" id="{DATA_ID}">'
    i = page.index(start_tag) + len(start_tag)
    j = page.index("</script>", i)
    return json.loads(page[i:j])
