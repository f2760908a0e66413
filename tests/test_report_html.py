"""`kubetoll report --format html`'s page (`report_html.render_ledger_report`), read as text and rendered by
headless Chromium: the numbers are the records', user strings are escaped, the screenshot is not blank and
every SVG label lies inside its chart without overlapping another."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from kubetoll_core.prices import Rates, ResolvedPrice
from kubetoll_core.spend_record import CASCADE_ESCALATED_OUTCOME, OUTCOME_REPORTED, SpendRecord
from kubetoll_tools import report_html
from kubetoll_tools.spend import fmt_usd
from support.png import decode

DAY0 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
SINCE, UNTIL = DAY0, DAY0 + 3 * 86400
LONG_TENANT = "tenant-with-an-extraordinarily-long-name-" * 4 + "end"
HOSTILE_TENANT = "<script>alert('tenant')</script>"
HOSTILE_TAG = "<script>alert(2)</script>"
BASELINE = ResolvedPrice(Rates(input=2.5e-6, output=10e-6, cached_input=1.25e-6, cache_write=0.0))
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (`make install` installs it when run as root)"
)

# Injected into a copy of the page only: measures every SVG <text> against its svg's viewBox and against the
# other texts of that svg, and writes what it found into the DOM for --dump-dom to carry out.
FIT_SCRIPT = """<script>
(function () {
  var bad = [], texts = 0;
  document.querySelectorAll("svg").forEach(function (svg, si) {
    var vb = svg.viewBox.baseVal, boxes = [];
    svg.querySelectorAll("text").forEach(function (t) {
      texts++;
      var b = t.getBBox(), name = t.textContent;
      if (b.x < vb.x - 0.5 || b.y < vb.y - 0.5 || b.x + b.width > vb.x + vb.width + 0.5 ||
          b.y + b.height > vb.y + vb.height + 0.5) {
        bad.push("outside svg " + si + ": " + name + " " + [b.x, b.y, b.width, b.height].join(","));
      }
      boxes.push([b, name]);
    });
    for (var i = 0; i < boxes.length; i++) {
      for (var j = i + 1; j < boxes.length; j++) {
        var a = boxes[i][0], c = boxes[j][0];
        var w = Math.min(a.x + a.width, c.x + c.width) - Math.max(a.x, c.x);
        var h = Math.min(a.y + a.height, c.y + c.height) - Math.max(a.y, c.y);
        if (w > 1 && h > 1) { bad.push("overlap in svg " + si + ": " + boxes[i][1] + " / " + boxes[j][1]); }
      }
    }
  });
  var out = document.createElement("pre");
  out.id = "fit-result";
  out.textContent = JSON.stringify({svgs: document.querySelectorAll("svg").length, texts: texts, bad: bad});
  document.body.appendChild(out);
})();
</script>"""


def rec(t: float, tenant: str, cost: float, **kw: object) -> SpendRecord:
    fields: dict[str, object] = {
        "namespace": "shop",
        "route": "support-bot",
        "backend": "flagship",
        "model": "gpt-4o",
        "tier": "premium",
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "cached_tokens": 0,
    }
    fields.update(kw)
    return SpendRecord(time=t, tenant=tenant, cost_usd=cost, **fields)  # type: ignore[arg-type]


def ledger() -> list[SpendRecord]:
    h = 3600.0
    recs = [
        rec(DAY0 + 1 * h, "acme", 0.0060, tags="feature=search", session="s-1", request_id="a1"),
        rec(DAY0 + 2 * h, "acme", 0.0045, tags="feature=search", session="s-1", request_id="a2"),
        rec(DAY0 + 2 * h + 5, "acme", 0.0, outcome=OUTCOME_REPORTED, business_outcome="resolved", session="s-1",
            backend="", model="", prompt_tokens=0, completion_tokens=0),
        rec(DAY0 + 26 * h, "globex", 0.0009, backend="cheap", model="gpt-4o-mini", tier="free", downgraded=True,
            tags="feature=summarize", session="s-2", request_id="g1"),
        rec(DAY0 + 27 * h, "globex", 0.0, backend="", model="", tier="free", cache_hit="exact", avoided_usd=0.0009,
            tags="feature=summarize", session="s-2", request_id="g2"),
        rec(DAY0 + 27 * h + 9, "globex", 0.0, outcome=OUTCOME_REPORTED, business_outcome="resolved", session="s-2",
            backend="", model="", tier="free", prompt_tokens=0, completion_tokens=0),
        rec(DAY0 + 30 * h, LONG_TENANT, 0.0120, route="extract", tags="feature=" + LONG_TENANT, request_id="l1"),
        rec(DAY0 + 50 * h, HOSTILE_TENANT, 0.0030, tags="feature=" + HOSTILE_TAG, request_id="x1", fallbacks=1),
        # A cascaded request: its cheap first step's answer failed a check, the flagship's was served.
        rec(DAY0 + 60 * h, "acme", 0.0002, backend="cheap", model="gpt-4o-mini", outcome=CASCADE_ESCALATED_OUTCOME,
            cascade="escalated", request_id="c1"),
        rec(DAY0 + 60 * h + 2, "acme", 0.0050, cascade="escalated", cascade_baseline_usd=0.0050, request_id="c1"),
        rec(DAY0 + 61 * h, "acme", 0.0004, backend="cheap", model="gpt-4o-mini", cascade="first",
            cascade_baseline_usd=0.0050, request_id="c2"),
        rec(DAY0 + 70 * h, "acme", 0.0011, model="", request_id="old"),  # an older sidecar: no model
    ]  # fmt: skip
    return recs


def render(recs: list[SpendRecord], **kw: object) -> str:
    args: dict[str, object] = {
        "namespace": "shop",
        "source": "redis://redis.kubetoll:6379/0",
        "since": SINCE,
        "until": UNTIL,
        "tz": UTC,
        "baseline": BASELINE,
        "baseline_label": "gpt-4o",
        "top": 10,
    }
    args.update(kw)
    return report_html.render_ledger_report(recs, **args)  # type: ignore[arg-type]


def test_page_has_the_records_numbers_and_every_section() -> None:
    recs = ledger()
    page = render(recs)
    data = report_html.extract_data(page)
    total = sum(r.cost_usd for r in recs)
    s = data["summary"]
    assert s["totals"]["cost_usd"] == pytest.approx(total, rel=1e-12)
    assert f">{fmt_usd(total)}<" in page  # the "spent" card
    # Three days in UTC: one bucket per day, and the buckets hold every record once.
    tl = data["timeline"]
    assert tl["buckets"] == 3 and tl["edges"][0] == SINCE and tl["edges"][-1] == UNTIL
    assert sum(sum(v) for v in tl["series"].values()) == pytest.approx(total, rel=1e-12)
    assert "2026-11-01" in page and "2026-11-03" in page
    for heading in (
        "Spend over time, per backend",
        "Spend by dimension",
        "<h3>tenant</h3>",
        "<h3>route</h3>",
        "<h3>backend</h3>",
        "<h3>model</h3>",
        "<h3>tier</h3>",
        "<h3>tag feature</h3>",
        "Savings against sending everything to gpt-4o",
        "Cost per outcome and per session",
        "<h2>Cascades</h2>",
    ):
        assert heading in page, heading
    assert "<h3>workload</h3>" not in page  # no record names a workload: no chart of one "(unknown)" bar
    dims = data["dimensions"]
    assert {r["key"]: r["cost_usd"] for r in dims["model"]} == pytest.approx(
        {"gpt-4o": 0.0305, "gpt-4o-mini": 0.0015, "(none)": 0.0011}
    )
    # Cost per outcome: both resolved sessions, each conversation's spend once.
    assert s["outcomes"] == [
        {
            "outcome": "resolved",
            "count": 2,
            "spend_usd": pytest.approx(0.0114),
            "cost_per_outcome_usd": pytest.approx(0.0057),
        }
    ]
    assert s["sessions"]["sessions"] == 2 and s["sessions"]["cost_per_session_usd"] == pytest.approx(0.0057)
    assert s["cascade"]["cascaded"] == 2 and s["cascade"]["escalated"] == 1
    sav = s["savings"]
    assert sav["cache_usd"] + sav["routing_usd"] + sav["downgrade_usd"] == pytest.approx(sav["saved_usd"])
    assert "namespace <code>shop</code>" in page and "redis://redis.kubetoll:6379/0" in page


def test_caller_strings_are_escaped_and_long_ones_cut() -> None:
    page = render(ledger())
    assert "<script>alert" not in page
    assert page.count("<script") == 1  # only the embedded data's
    assert html.escape(HOSTILE_TENANT) in page and html.escape(HOSTILE_TAG) in page
    data = report_html.extract_data(page)  # the JSON still holds the strings as they were
    assert HOSTILE_TENANT in {r["key"] for r in data["summary"]["by_tenant"]}
    # The long name's bar label: cut with an ellipsis, the whole name in its tooltip.
    assert re.search(rf"<text [^>]*><title>{re.escape(LONG_TENANT)}</title>tenant-with[^<]*…</text>", page)
    assert f">{LONG_TENANT}</text>" not in page


def test_buckets_follow_the_period_and_time_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    edges, unit = report_html.bucket_edges(SINCE + 1800, SINCE + 1800 + 36 * 3600, berlin)
    assert unit == "hour" and edges[0] == SINCE and edges[-1] == SINCE + 37 * 3600 and len(edges) == 38
    assert all(b - a == 3600 for a, b in zip(edges, edges[1:], strict=False))
    # Across the end of summer time (2026-10-25 in Berlin) a day has 25 hours.
    start = datetime(2026, 10, 24, tzinfo=berlin).timestamp()
    edges, unit = report_html.bucket_edges(start, start + 3 * 86400, berlin)
    assert unit == "day" and [b - a for a, b in zip(edges, edges[1:], strict=False)][:2] == [86400, 90000]
    assert all(datetime.fromtimestamp(e, berlin).hour == 0 for e in edges)


def test_empty_period_says_so() -> None:
    page = render([])
    assert "No spend records" in page and "<svg" not in page
    assert report_html.extract_data(page)["summary"]["records"] == 0


def chromium(page: str, tmp_path: Path) -> tuple[bytes, dict[str, object]]:
    """Screenshot the page, then dump the DOM of a copy with the label-measuring script injected."""
    assert CHROMIUM is not None
    shot = tmp_path / "shot.png"
    plain = tmp_path / "page.html"
    measured = tmp_path / "measured.html"
    plain.write_text(page, encoding="utf-8")
    measured.write_text(page.replace("</body>", FIT_SCRIPT + "</body>"), encoding="utf-8")

    def run(profile: str, *args: str) -> str:
        cmd = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / profile}", "--window-size=1280,2400", *args,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    run("profile-shot", f"--screenshot={shot}", plain.as_uri())
    dom = run("profile-dom", "--dump-dom", measured.as_uri())
    m = re.search(r'<pre id="fit-result">(.*?)</pre>', dom, re.S)
    assert m, "the measuring script wrote no result"
    return shot.read_bytes(), json.loads(html.unescape(m.group(1)))


def ink(png: bytes) -> tuple[float, int]:
    """The fraction of pixels that are not (near) white, and how many distinct colours there are."""
    img = decode(png)
    colours = set()
    inked = 0
    for y in range(0, img.height, 2):
        for x in range(0, img.width, 2):
            px = img.pixel(x, y)
            colours.add(px)
            if min(px) < 235:
                inked += 1
    return inked / (((img.height + 1) // 2) * ((img.width + 1) // 2)), len(colours)


@needs_chromium
def test_chromium_renders_charts_with_labels_that_fit(tmp_path: Path) -> None:
    png, fit = chromium(render(ledger()), tmp_path)
    img = decode(png)
    assert (img.width, img.height) == (1280, 2400)
    inked, colours = ink(png)
    assert inked > 0.05, f"only {inked:.1%} of the screenshot is not white"
    assert colours > 50, f"only {colours} distinct colours: no charts drawn"
    assert fit["svgs"] == 8 and fit["texts"] > 60  # time, 6 dimensions (no workload), waterfall
    assert fit["bad"] == []


@needs_chromium
def test_chromium_renders_the_empty_page(tmp_path: Path) -> None:
    png, fit = chromium(render([]), tmp_path)
    inked, _ = ink(png)
    assert 0 < inked < 0.2  # the header and the "no records" box, nothing else
    assert fit == {"svgs": 0, "texts": 0, "bad": []}
