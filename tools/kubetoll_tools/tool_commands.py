"""The tools' `kubetoll` sub-commands: `demo`, `estimate`, `report`.

Registered by `kubetoll_sidecar.cli` through `register(subparsers)`. Heavy imports
(the sidecar server, rich) wait until a command runs, so `kubetoll --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help=(
            "run the whole story offline: simulated providers, the sidecar, tenants on free and premium tiers, "
            "a spend report"
        ),
        description=(
            "Runs simulated providers, the sidecar and seeded support-bot traffic on this machine "
            "(no network, no cluster), shows what the router does live, and writes an HTML spend report at the end. "
            "Ctrl-C stops early and still writes the report."
        ),
    )
    p.add_argument(
        "--duration", type=float, default=60.0, metavar="SECONDS", help="how long traffic is sent (default 60)"
    )
    p.add_argument(
        "--seed", type=int, default=7, help="traffic seed: the same seed sends the same requests (default 7)"
    )
    p.add_argument(
        "--rate", type=float, default=8.0, metavar="RPS", help="requests per second over all tenants (default 8)"
    )
    p.add_argument(
        "--concurrency", type=int, default=32, metavar="N", help="most requests in flight at once (default 32)"
    )
    p.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="no live view: a progress line every 10 s (for CI and logs)",
    )
    p.add_argument(
        "--report",
        default="kubetoll-demo-report.html",
        metavar="PATH",
        help="where to write the HTML report (default kubetoll-demo-report.html)",
    )
    p.add_argument(
        "--config-source",
        choices=("auto", "examples", "embedded"),
        default="auto",
        help="auto: compile examples/ when possible, else the embedded config (default auto)",
    )
    p.add_argument(
        "--examples",
        dest="examples_dir",
        metavar="DIR",
        help="examples directory to compile (default ./examples, then the repository's)",
    )
    p.add_argument(
        "--budget-scale",
        type=float,
        metavar="X",
        help="multiply USD budgets by X (default 1 for the embedded config, 0.01 for examples/)",
    )
    p.add_argument(
        "--baseline",
        metavar="BACKEND",
        help="backend the savings are measured against (default: the first a premium request is routed to)",
    )
    p.add_argument("--verbose", action="store_true", help="show the sidecar's log")
    p.set_defaults(handler=_demo)

    p = sub.add_parser(
        "estimate",
        help="forecast the cost of a workload from sample conversations or a prompt template",
        description=(
            "Counts tokens in sample conversations with tiktoken and prices them "
            "per model (catalogue) or per backend of a route (RouterConfig)."
        ),
    )
    _estimate_arguments(p)
    p.set_defaults(handler=_estimate)

    p = sub.add_parser(
        "report",
        help="spend for a period by tenant, route, backend, model, feature, session, outcome, ... from a running "
        "sidecar (or the shared ledger); table, JSON, CSV, FOCUS",
    )
    _report_arguments(p)
    p.set_defaults(handler=_report)


def _estimate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "samples",
        nargs="?",
        help='sample conversations: JSONL (one {"messages": [...]} or messages list per line), a JSON array, or YAML',
    )
    p.add_argument(
        "--template",
        metavar="FILE",
        help="a prompt template (text: one user message; YAML/JSON: a conversation) with {{name}} variables",
    )
    p.add_argument("--vars", metavar="JSONL", help="template variables, one JSON object per line (one request each)")
    p.add_argument("--requests-per-day", type=float, metavar="N")
    p.add_argument("--mau", type=float, metavar="N", help="monthly active users (with --requests-per-user)")
    p.add_argument("--requests-per-user", type=float, metavar="M", help="requests per user per month")
    p.add_argument(
        "--models",
        metavar="LIST",
        help="catalogue models, comma-separated (provider/model where the name is ambiguous)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a RouterConfig (JSON/YAML): price the backends of --route with their configured prices",
    )
    p.add_argument("--route", metavar="NAME", help="the route of --config (default: its only route)")
    p.add_argument(
        "--output-tokens",
        type=int,
        metavar="N",
        help="output tokens per request for samples with no final assistant reply",
    )
    p.add_argument(
        "--cache-hit-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="share of requests answered from cache, 0..1 (default 0)",
    )
    p.add_argument(
        "--split", metavar="NAME=W,...", help="how requests spread over the models/backends (default: all on the first)"
    )
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sidecar",
        default="http://127.0.0.1:7400",
        metavar="URL",
        help="a running sidecar's API (default http://127.0.0.1:7400)",
    )
    p.add_argument("--redis-url", metavar="URL", help="read the namespace's shared ledger from Redis instead")
    p.add_argument(
        "--database-url",
        metavar="URL",
        help="read the namespace's ledger from the PostgreSQL ledger sink's table instead (docs/ledger.md)",
    )
    p.add_argument("--namespace", metavar="NS", help="the namespace (required with --redis-url or --database-url)")
    p.add_argument(
        "--redis-password-file", metavar="FILE", help="file holding the Redis password (URLs never carry credentials)"
    )
    p.add_argument("--redis-username-file", metavar="FILE", help="file holding the Redis ACL user")
    p.add_argument(
        "--since",
        default="this-month",
        help="start: ISO date/time, epoch, today, yesterday, this-month, last-month, or 24h/7d (default this-month)",
    )
    p.add_argument("--until", help="end (exclusive), same forms (default now)")
    p.add_argument("--tz", metavar="ZONE", help="timezone for dates and named periods (default: local)")
    p.add_argument(
        "--top",
        type=int,
        metavar="N",
        help="top spenders, and pivot rows, to show (default 10 in a table; JSON and CSV pivots: every row)",
    )
    p.add_argument(
        "--by",
        action="append",
        metavar="DIM[,DIM...]",
        help="a pivot: one row per combination of tenant, route, backend, model, tier, workload, session, "
        "outcome, day, or a tag key (feature, tag:KEY) (default: a table per tenant, route, backend, tier, "
        "workload; repeatable)",
    )
    p.add_argument(
        "--baseline",
        default="gpt-4o",
        metavar="MODEL",
        help="catalogue model the savings are measured against (default gpt-4o; 'none' to skip)",
    )
    p.add_argument(
        "--experiment",
        metavar="NAME",
        help="report one experiment instead: per arm, requests, cost per request, latency p50/p95, error and "
        "escalation rates, with 95%% intervals",
    )
    p.add_argument(
        "--format",
        choices=("table", "json", "csv", "focus", "html"),
        default="table",
        help="focus: FinOps FOCUS 1.2 CSV rows; html: a report page (default table)",
    )


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from .demo import DemoError, DemoOptions, run_demo

    if args.live and not sys.stdout.isatty():
        args.live = False  # a pipe or a log file gets progress lines, not terminal control codes
    opts = DemoOptions(
        duration=args.duration,
        seed=args.seed,
        rate=args.rate,
        concurrency=args.concurrency,
        live=args.live,
        report=args.report,
        config_source=args.config_source,
        examples_dir=args.examples_dir,
        budget_scale=args.budget_scale,
        baseline=args.baseline,
        verbose=args.verbose,
    )
    if args.verbose:
        from kubetoll_sidecar.server import configure_logging

        configure_logging("INFO")
    try:
        asyncio.run(run_demo(opts))
    except DemoError as exc:
        print(f"kubetoll demo: {exc}", file=sys.stderr)
        return 2
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from .estimate import run

    return run(args)


def _report(args: argparse.Namespace) -> int:
    from .report import run

    return run(args)
