"""`kubetoll report`: spend for a period, from a running sidecar or the shared ledger.

Sources:

* `--sidecar URL` (default http://127.0.0.1:7400): the sidecar's own ledger, read
  from `GET /kubetoll/v1/spend?since=&until=` on its API port (127.0.0.1 only, so
  run it in the pod: `kubectl exec ... -c kubetoll -- kubetoll report`).
* `--redis-url URL --namespace NS`: the namespace's shared ledger in Redis (one
  stream per namespace, read with `ledger_redis.read_ledger`), every sidecar's
  records. A build without the Redis ledger says so and exits 2.
* `--database-url URL --namespace NS`: the PostgreSQL ledger sink's table
  (docs/ledger.md), for periods older than Redis keeps; the URL's password is
  never printed.

Periods: `--since`/`--until` take ISO dates (`2026-11-01`, local midnight),
date-times (`2026-11-01T09:30`, `...Z`, `...+01:00`), epoch seconds, `now`,
`today`, `yesterday`, `this-month`, `last-month`, or a duration back from now
(`24h`, `7d`, `90m`, `2w`).

Without `--by`, tables group by tenant, route, backend, tier and workload (the
sidecar's pod's workload, "(unknown)" for records without one), one table each.
`--by DIM[,DIM...]` is a pivot instead (`report_pivot.py`): one row per distinct
combination of the dimensions named (tenant, route, backend, model, tier,
workload, session, outcome, day, or a tag key such as feature), dearest first,
`--top N` rows (10 in a table, every row in JSON and CSV unless `--top` is given),
the rows left out summed on a line of their own so the table still adds up.
Totals carry the sessions and the cost per session; when the app reported
business outcomes, a "Cost per outcome" section follows (`spend.outcome_costs`).

JSON (`--format json`): `namespace`, `source`, `since`/`until` (epoch seconds)
and their text, `dropped`, `by` (the dimensions' labels), `summary`
(`spend.summarize`'s output plus `cascade`, `outcomes` and, in `totals`,
`sessions` and `cost_per_session_usd`) and `pivot` (None without `--by`, else
`report_pivot.pivot_summary`'s output: `by`, `rows` each with `keys` (label →
value) and the figures, `total_rows`, `omitted`, `missing_tags`). CSV: without
`--by`, one row per group (`dimension,key,...`), a `total` row and `savings`
rows; with `--by`, one row per pivot row (a column per dimension, then the
figures) and an `(other N rows)` row for those `--top` left out.
`--format focus` writes FOCUS 1.2 rows (`report_focus.py`); `--format html` the
ledger's HTML report (`report_html.render_ledger_report`).

Savings are shown against a baseline model's catalogue prices (`--baseline`,
default gpt-4o): every request's tokens priced there, with no cache and no
routing, split into cache, routing and downgrade parts (see `spend.py`). Cascaded
requests get a line of their own: the escalation rate and the savings against
always calling each cascade's last step.

`--experiment NAME` reports one experiment instead, per arm, with 95% intervals
(`experiment_report.py`).
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kubetoll_core.prices import ResolvedPrice
from kubetoll_core.spend_record import SpendRecord

from . import experiment_report, report_focus, report_pivot, spend
from .estimate import EstimateError, catalog_price, text_table
from .spend import fmt_usd

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# What the tables (and CSV rows) group by, in this order, without `--by`.
DIMENSIONS = ("tenant", "route", "backend", "tier", "workload")
DEFAULT_TOP = 10  # rows of the top spenders and pivot tables when `--top` is not given


class ReportError(Exception):
    """Bad arguments or an unreachable source (exit status 2)."""


def _tz(name: str | None) -> tzinfo:
    if not name:
        local = datetime.now().astimezone().tzinfo
        assert local is not None
        return local
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ReportError(f"--tz: unknown timezone {name!r}") from None


def parse_when(text: str, now: float, tz: tzinfo, option: str = "--since") -> float:
    """Epoch seconds for a --since/--until value."""
    t = text.strip().lower()
    local_now = datetime.fromtimestamp(now, tz)
    midnight = local_now.replace(hour=0, minute=0, second=0, microsecond=0)
    if t == "now":
        return now
    if t == "today":
        return midnight.timestamp()
    if t == "yesterday":
        return (midnight - timedelta(days=1)).timestamp()
    if t == "this-month":
        return midnight.replace(day=1).timestamp()
    if t == "last-month":
        first = midnight.replace(day=1)
        prev = (first - timedelta(days=1)).replace(day=1)
        return prev.timestamp()
    m = _DURATION.match(t)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    if re.fullmatch(r"\d{9,11}(\.\d+)?", t):
        return float(t)
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ReportError(
            f"{option} {text!r}: expected an ISO date or date-time, epoch seconds, now, today, yesterday, "
            "this-month, last-month, or a duration such as 24h or 7d"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return dt.timestamp()


def _dimensions(values: list[str]) -> list[report_pivot.Dimension]:
    try:
        return report_pivot.parse_dimensions(values)
    except report_pivot.PivotError as exc:
        raise ReportError(str(exc)) from None


# --------------------------------------------------------------------------- sources


async def fetch_from_sidecar(
    url: str, since: float, until: float | None, timeout: float = 10.0
) -> tuple[str, list[dict[str, Any]], int]:
    """(namespace, records, dropped) from a sidecar's /kubetoll/v1/spend."""
    import aiohttp

    params = {"since": repr(since)}
    if until is not None:
        params["until"] = repr(until)
    endpoint = url.rstrip("/") + "/kubetoll/v1/spend"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(endpoint, params=params) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise ReportError(f"{endpoint}: HTTP {resp.status}: {body[:300].decode('utf-8', 'replace')}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ReportError(f"cannot reach the sidecar at {url}: {exc}") from None
    try:
        data = json.loads(body)
        return str(data.get("namespace", "")), list(data["records"]), int(data.get("dropped", 0))
    except (ValueError, KeyError, TypeError):
        raise ReportError(f"{endpoint}: not a spend response") from None


def redis_reader() -> Any | None:
    """`ledger_redis.read_ledger` when this build has the Redis ledger, else None."""
    try:
        module = importlib.import_module("kubetoll_sidecar.ledger_redis")
    except ModuleNotFoundError as exc:
        if exc.name and "kubetoll_sidecar.ledger_redis".startswith(exc.name):
            return None
        raise
    return getattr(module, "read_ledger", None)


async def fetch_from_redis(
    url: str,
    namespace: str,
    since: float,
    until: float | None,
    password_file: str | None = None,
    username_file: str | None = None,
    timeout: float = 10.0,
) -> list[Any]:
    """The namespace's records from the shared ledger (a Redis stream), with the ledger's own reader."""
    reader = redis_reader()
    if reader is None:
        raise ReportError(
            "reading the shared ledger from Redis is not available in this build (no Redis ledger reader); "
            "use --sidecar URL to read a running sidecar's ledger"
        )
    from pathlib import Path

    from redis.exceptions import RedisError

    from kubetoll_core.redis_connect import RedisCredentials, connect_redis, password_from_env
    from kubetoll_core.redis_keys import check_name
    from kubetoll_core.router_config import BudgetStoreSettings

    creds = RedisCredentials(
        Path(username_file) if username_file else None,
        Path(password_file) if password_file else None,
        None if password_file else password_from_env(),
    )
    try:
        check_name("namespace", namespace)
        client = connect_redis(BudgetStoreSettings(url=url), creds, io_timeout=timeout, client_name="kubetoll-report")
    except ValueError as exc:
        raise ReportError(f"--redis-url / --namespace: {exc}") from None
    try:
        return list(await reader(client, namespace, since, until))
    except (RedisError, OSError, TimeoutError) as exc:
        raise ReportError(f"cannot read the ledger from Redis at {url}: {type(exc).__name__}: {exc}") from None
    finally:
        await client.aclose()


async def fetch_from_postgres(url: str, namespace: str, since: float, until: float | None) -> list[Any]:
    """The namespace's records from the PostgreSQL ledger sink's table (docs/ledger.md)."""
    from kubetoll_core.redis_keys import check_name

    try:
        check_name("namespace", namespace)
        from kubetoll_operator.ledger_sink.reader import ReadError, read_records
        from kubetoll_operator.ledger_sink.redact import redact_url
    except ValueError as exc:
        raise ReportError(f"--database-url / --namespace: {exc}") from None
    except ModuleNotFoundError as exc:
        raise ReportError(f"reading the ledger from PostgreSQL needs psycopg 3 ({exc.name} is missing)") from None
    try:
        return await read_records(url, namespace, since, until)
    except ReadError as exc:
        raise ReportError(f"cannot read the ledger from PostgreSQL at {redact_url(url)}: {exc}") from None


# --------------------------------------------------------------------------- output


def _fmt_time(ts: float | None, tz: tzinfo) -> str:
    if ts is None:
        return "now"
    return datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _group_rows(groups: list[dict[str, Any]], total: float) -> list[list[str]]:
    return [
        [
            g["key"] or "(none)",
            str(g["requests"]),
            f"{g['prompt_tokens']:,}",
            f"{g['completion_tokens']:,}",
            fmt_usd(g["cost_usd"]),
            fmt_usd(g["cost_per_request_usd"]),
            f"{100 * g['cost_usd'] / total:.1f}%" if total else "–",
            str(g["cache_hits"]),
            fmt_usd(g["avoided_usd"]),
            str(g["downgraded"]),
        ]
        for g in groups
    ]


_HEADERS = [
    "requests",
    "input tok",
    "output tok",
    "spend",
    "per request",
    "share",
    "cache hits",
    "avoided",
    "downgraded",
]


def _pivot_table(p: dict[str, Any], total: float) -> list[str]:
    """The pivot's title and table, and a line for the rows `--top` left out (so the table adds up)."""
    rows = p["rows"]
    by = p["by"]
    with_sessions = any(r["sessions"] for r in rows)
    headers = [*by, *_HEADERS] + (["sessions", "per session"] if with_sessions else [])
    body = []
    for r, cells in zip(rows, _group_rows([{**r, "key": ""} for r in rows], total)):
        per_session = "–" if r["cost_per_session_usd"] is None else fmt_usd(r["cost_per_session_usd"])
        extra = [str(r["sessions"]), per_session] if with_sessions else []
        body.append([*(r["keys"][label] for label in by), *cells[1:], *extra])
    if by == ["tenant"]:
        title = f"Top spenders ({len(rows)} of {p['total_rows']} tenants)"
    else:
        title = "By " + " × ".join(by)
        if p["omitted"]:
            title += f" (top {len(rows)} of {p['total_rows']} rows)"
    lines = ["", title, text_table(headers, body, set(range(len(by), len(headers))))]
    o = p["omitted"]
    if o:
        share = f" ({100 * o['cost_usd'] / total:.1f}%)" if total else ""
        lines.append(
            f"… and {o['rows']} more rows: {o['requests']} requests, {fmt_usd(o['cost_usd'])}{share} "
            "(--top N shows more)"
        )
    for key in p["missing_tags"]:
        lines.append(f"note: no record in the period carries the tag {key!r} (every row is {report_pivot.UNTAGGED})")
    return lines


def _outcome_table(outcomes: list[dict[str, Any]]) -> list[str]:
    rows = [
        [o["outcome"], str(o["count"]), fmt_usd(o["spend_usd"]), fmt_usd(o["cost_per_outcome_usd"])] for o in outcomes
    ]
    return ["", "Cost per outcome", text_table(["outcome", "count", "spend", "per outcome"], rows, {1, 2, 3})]


def format_table(report: dict[str, Any]) -> str:
    s = report["summary"]
    t = s["totals"]
    sessions = (
        f" · {t['sessions']} sessions · {fmt_usd(t['cost_per_session_usd'])} per session" if t.get("sessions") else ""
    )
    lines = [
        f"Spend in namespace {report['namespace'] or '?'} from {report['since_text']} to {report['until_text']} "
        f"({report['source']})",
        f"{t['requests']} requests · {fmt_usd(t['cost_usd'])} · {fmt_usd(t['cost_per_request_usd'])} per request · "
        f"{t['prompt_tokens']:,} input + {t['completion_tokens']:,} output tokens{sessions}",
    ]
    if report.get("dropped"):
        lines.append(
            f"warning: the sidecar's in-memory ledger dropped {report['dropped']} older records; totals miss them"
        )
    sav = s["savings"]
    if sav:
        lines.append(
            f"Savings against {sav['baseline']} for every request "
            f"(no cache, no routing: {fmt_usd(sav['baseline_usd'])}): "
            f"{fmt_usd(sav['saved_usd'])} ({sav['saved_percent']:.1f}%) — "
            f"cache {fmt_usd(sav['cache_usd'])} ({t['cache_hits']} hits), "
            f"routing {fmt_usd(sav['routing_usd'])}, "
            f"downgrade {fmt_usd(sav['downgrade_usd'])} ({t['downgraded']} downgraded requests)"
        )
    if s.get("cascade"):
        lines.append("Cascades: " + experiment_report.cascade_line(s["cascade"]))
    if report.get("pivot"):
        lines += _pivot_table(report["pivot"], t["cost_usd"])
        if s.get("outcomes"):
            lines += _outcome_table(s["outcomes"])
        return "\n".join(lines)
    for dim in report["by"]:
        groups = s[f"by_{dim}"]
        if dim == "tenant":
            groups = s["top_spenders"]
            title = f"Top spenders ({len(groups)} of {len(s['by_tenant'])} tenants)"
        else:
            title = f"By {dim}"
        lines += ["", title, text_table([dim, *_HEADERS], _group_rows(groups, t["cost_usd"]), set(range(1, 10)))]
    if s.get("outcomes"):
        lines += _outcome_table(s["outcomes"])
    return "\n".join(lines)


_CSV_FIELDS = [
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_usd",
    "cost_per_request_usd",
    "cache_hits",
    "avoided_usd",
    "downgraded",
    "downgraded_cost_usd",
    "fallbacks",
]


def _pivot_csv(p: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    by = p["by"]
    w.writerow([*by, *_CSV_FIELDS, "sessions", "cost_per_session_usd"])
    for r in p["rows"]:
        per_session = "" if r["cost_per_session_usd"] is None else r["cost_per_session_usd"]
        w.writerow([*(r["keys"][label] for label in by), *(r[f] for f in _CSV_FIELDS), r["sessions"], per_session])
    o = p["omitted"]
    if o:
        figures = {"requests": o["requests"], "cost_usd": o["cost_usd"]}
        w.writerow(
            [f"(other {o['rows']} rows)", *([""] * (len(by) - 1)), *(figures.get(f, "") for f in _CSV_FIELDS), "", ""]
        )
    return buf.getvalue()


def format_csv(report: dict[str, Any]) -> str:
    if report.get("pivot"):
        return _pivot_csv(report["pivot"])
    s = report["summary"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dimension", "key", *_CSV_FIELDS])
    w.writerow(["total", "", *(s["totals"][f] for f in _CSV_FIELDS)])
    for dim in report["by"]:
        for g in s[f"by_{dim}"]:
            w.writerow([dim, g["key"], *(g[f] for f in _CSV_FIELDS)])
    if s["savings"]:
        for part in ("baseline_usd", "saved_usd", "cache_usd", "routing_usd", "downgrade_usd"):
            w.writerow(
                ["savings", part.removesuffix("_usd"), "", "", "", "", s["savings"][part], "", "", "", "", "", ""]
            )
    return buf.getvalue()


_EXPERIMENT_CSV = [
    "requests",
    "cost_usd",
    "cost_per_request_usd",
    "latency_p50_ms",
    "latency_p95_ms",
    "errors",
    "error_rate",
]


def format_experiment(report: dict[str, Any], fmt: str) -> str:
    e = report["experiment"]
    if fmt == "json":
        return json.dumps(report, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["arm", *_EXPERIMENT_CSV, "cost_per_request_ci95_low", "cost_per_request_ci95_high",
                    "error_rate_ci95_low", "error_rate_ci95_high", "escalation_rate", "cascade_saved_usd"])  # fmt: skip
        for a in e["arms"]:
            cost_ci, err_ci, c = a["cost_per_request_ci95"] or ("", ""), a["error_rate_ci95"] or ("", ""), a["cascade"]
            w.writerow(
                [a["arm"], *(a[f] for f in _EXPERIMENT_CSV), *cost_ci, *err_ci]
                + ([c["escalation_rate"], c["saved_usd"]] if c else ["", ""])
            )
        return buf.getvalue()
    head = (
        f"Namespace {report['namespace'] or '?'} from {report['since_text']} to {report['until_text']} "
        f"({report['source']})"
    )
    return head + "\n" + experiment_report.format_experiment(e) + "\n"


@dataclass
class Ledger:
    """A period's records, where they came from, and the options every output reads."""

    namespace: str
    source: str
    since: float
    until: float | None
    tz: tzinfo
    dropped: int
    records: list[SpendRecord]
    baseline: ResolvedPrice | None
    dims: list[report_pivot.Dimension] | None  # `--by`'s dimensions, None without it

    def header(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "source": self.source,
            "since": self.since,
            "until": self.until,
            "since_text": _fmt_time(self.since, self.tz),
            "until_text": _fmt_time(self.until, self.tz),
            "dropped": self.dropped,
        }


async def load_ledger(args: Any, now: float) -> Ledger:
    """Parse the period and options, and read the records from the source the arguments name."""
    tz = _tz(args.tz)
    since = parse_when(args.since, now, tz, "--since")
    until = parse_when(args.until, now, tz, "--until") if args.until else None
    if until is not None and until <= since:
        raise ReportError(f"--until ({_fmt_time(until, tz)}) is not after --since ({_fmt_time(since, tz)})")
    if args.top is not None and args.top < 1:
        raise ReportError("--top must be at least 1")
    dims = _dimensions(args.by) if args.by else None
    if getattr(args, "experiment", None) and getattr(args, "format", "table") in ("focus", "html"):
        raise ReportError(f"--format {args.format} reports spend, not an experiment: use table, json or csv")
    dropped = 0
    database_url = getattr(args, "database_url", None)  # callers that build args by hand may leave it out
    if database_url and args.redis_url:
        raise ReportError("--database-url and --redis-url: read one ledger, not both")
    if database_url:
        if not args.namespace:
            raise ReportError("--database-url needs --namespace")
        from kubetoll_operator.ledger_sink.redact import redact_url

        records = await fetch_from_postgres(database_url, args.namespace, since, until)
        namespace, source = args.namespace, f"PostgreSQL ledger at {redact_url(database_url)}"
    elif args.redis_url:
        if not args.namespace:
            raise ReportError("--redis-url needs --namespace (the ledger is one stream per namespace)")
        records = await fetch_from_redis(
            args.redis_url, args.namespace, since, until, args.redis_password_file, args.redis_username_file
        )
        namespace, source = args.namespace, f"Redis ledger at {args.redis_url}"
    else:
        namespace, records, dropped = await fetch_from_sidecar(args.sidecar, since, until)
        source = f"sidecar {args.sidecar}"
        if args.namespace and namespace and args.namespace != namespace:
            raise ReportError(f"the sidecar at {args.sidecar} serves namespace {namespace}, not {args.namespace}")
    baseline = None
    if args.baseline and args.baseline.lower() != "none":
        try:
            baseline = catalog_price(args.baseline)
        except EstimateError as exc:
            raise ReportError(str(exc).replace("--models", "--baseline")) from None
    recs = [spend.to_record(r) for r in records]
    return Ledger(namespace, source, since, until, tz, dropped, recs, baseline, dims)


def summarize(ledger: Ledger, args: Any) -> dict[str, Any]:
    """The report as plain data (the JSON output; the table and CSV are made from it)."""
    recs = ledger.records
    if getattr(args, "experiment", None):  # callers that build args by hand may leave it out
        return {**ledger.header(), "experiment": experiment_report.experiment_summary(recs, args.experiment)}
    summary = spend.summarize(
        recs, baseline=ledger.baseline, baseline_label=args.baseline or "", top=args.top or DEFAULT_TOP
    )
    summary["cascade"] = experiment_report.cascade_summary(recs)
    summary["outcomes"] = spend.outcome_costs(recs)
    summary["totals"].update(report_pivot.session_totals(recs))
    pivot = None
    if ledger.dims is not None:
        # A table shows DEFAULT_TOP rows unless told; JSON and CSV are exports: every row unless told.
        top = args.top if getattr(args, "format", "table") in ("json", "csv") else (args.top or DEFAULT_TOP)
        pivot = report_pivot.pivot_summary(recs, ledger.dims, ledger.tz, top)
    return {
        **ledger.header(),
        # The dimensions' labels: the pivot's, or the default tables' without `--by`.
        "by": [d.label for d in ledger.dims] if ledger.dims is not None else list(DIMENSIONS),
        "summary": summary,
        "pivot": pivot,
    }


async def build_report(args: Any, now: float) -> dict[str, Any]:
    return summarize(await load_ledger(args, now), args)


def format_html(ledger: Ledger, args: Any) -> str:
    from . import report_html  # the HTML renderer's imports wait until an HTML report is asked for

    return report_html.render_ledger_report(
        ledger.records,
        namespace=ledger.namespace,
        source=ledger.source,
        since=ledger.since,
        until=ledger.until,
        tz=ledger.tz,
        baseline=ledger.baseline,
        baseline_label=args.baseline or "",
        top=args.top or DEFAULT_TOP,
    )


def run(args: Any, out: Any = None, err: Any = None) -> int:
    import asyncio
    import time

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        ledger = asyncio.run(load_ledger(args, time.time()))
    except ReportError as exc:
        print(f"kubetoll report: {exc}", file=err)
        return 2
    if args.format == "focus":
        out.write(report_focus.format_focus(ledger.records, ledger.namespace))
        return 0
    if args.format == "html":
        out.write(format_html(ledger, args))
        return 0
    report = summarize(ledger, args)
    if "experiment" in report:
        out.write(format_experiment(report, args.format))
    elif args.format == "json":
        out.write(json.dumps(report, indent=2) + "\n")
    elif args.format == "csv":
        out.write(format_csv(report))
    else:
        out.write(format_table(report) + "\n")
    return 0
