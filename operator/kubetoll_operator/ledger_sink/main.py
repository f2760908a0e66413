"""`kubetoll-ledger-sink` (and `kubetoll ledger-sink`): run the PostgreSQL ledger sink.

The chart runs it as a second container of the operator Deployment, from the
operator image (`ledgerSink.enabled`); each replica is one consumer of the same
group, so they share the entries.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from ..main import port_number, positive_float


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument(
        "--redis-url", default=env("KUBETOLL_REDIS_URL"), help="the budget store's Redis; env KUBETOLL_REDIS_URL"
    )
    p.add_argument("--redis-username-file", default=env("KUBETOLL_REDIS_USERNAME_FILE"), metavar="PATH")
    p.add_argument(
        "--redis-password-file",
        default=env("KUBETOLL_REDIS_PASSWORD_FILE"),
        metavar="PATH",
        help="(or the password itself in KUBETOLL_REDIS_PASSWORD)",
    )
    p.add_argument(
        "--redis-auth-dir",
        default=env("KUBETOLL_REDIS_AUTH_DIR"),
        metavar="DIR",
        help="the mounted budget-store Secret: its keys username and password are the sink's login (as the operator's)",
    )
    p.add_argument(
        "--database-url",
        default=env("KUBETOLL_DATABASE_URL"),
        help="PostgreSQL URL (postgresql://user:password@host/db); env KUBETOLL_DATABASE_URL (the chart sets it "
        "from a Secret). Its password is never logged",
    )
    p.add_argument("--group", default="kubetoll-ledger-sink", help="the Redis consumer group (one per database)")
    p.add_argument(
        "--consumer",
        default=env("POD_NAME", ""),
        help="this sink's consumer name (default: env POD_NAME, else host-pid)",
    )
    p.add_argument(
        "-n", "--namespace", action="append", default=[], metavar="NS", help="only these namespaces (globs; repeatable)"
    )
    p.add_argument("--batch-size", type=int, default=500, metavar="N", help="entries per transaction (default 500)")
    p.add_argument(
        "--retention-days",
        type=positive_float,
        default=None,
        metavar="DAYS",
        help="delete rows settled longer ago than this, in batches, once an hour (default: keep every row)",
    )
    p.add_argument(
        "--claim-idle-seconds",
        type=positive_float,
        default=60.0,
        metavar="S",
        help="take over entries another consumer left pending this long (default 60)",
    )
    p.add_argument("--poll-interval", type=positive_float, default=1.0, metavar="S", help="wait after an idle pass")
    p.add_argument(
        "--metrics-port", type=port_number, default=8082, metavar="PORT", help="/metrics port (default 8082)"
    )
    p.add_argument("--metrics-addr", default="0.0.0.0", metavar="ADDR")
    p.add_argument("--no-metrics", action="store_true")
    p.add_argument("--once", action="store_true", help="migrate, drain every namespace once, and exit")
    p.add_argument("--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if not args.redis_url:
        print("kubetoll ledger-sink: --redis-url (or KUBETOLL_REDIS_URL) is required", file=sys.stderr)
        return 2
    if not args.database_url:
        print("kubetoll ledger-sink: --database-url (or KUBETOLL_DATABASE_URL) is required", file=sys.stderr)
        return 2
    try:
        import psycopg  # noqa: F401
    except ModuleNotFoundError:
        print(
            "kubetoll ledger-sink: needs psycopg 3 (pip install 'kubetoll[operator]' or 'psycopg[binary]')",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kubetoll_core.redis_connect import RedisCredentials, connect_redis, password_from_env
    from kubetoll_core.router_config import BudgetStoreSettings

    from .metrics import SinkMetrics
    from .sink import DatabaseUnavailable, LedgerSink, SinkOptions

    creds = RedisCredentials(
        Path(args.redis_username_file) if args.redis_username_file else None,
        Path(args.redis_password_file) if args.redis_password_file else None,
        password_from_env(),
    )
    if not creds.configured and args.redis_auth_dir:
        from kubetoll_operator.redis_auth import RedisAuth

        creds = RedisAuth(Path(args.redis_auth_dir), False).operator_credentials()
    redis = connect_redis(
        BudgetStoreSettings(url=args.redis_url), creds, io_timeout=5.0, client_name="kubetoll-ledger-sink"
    )
    metrics = SinkMetrics()
    options = SinkOptions(
        database_url=args.database_url,
        group=args.group,
        consumer=args.consumer,
        namespaces=args.namespace,
        batch_size=args.batch_size,
        claim_idle_ms=int(args.claim_idle_seconds * 1000),
        poll_interval=args.poll_interval,
        retention_days=args.retention_days,
    )
    sink = LedgerSink(redis, options, metrics=metrics)
    try:
        if args.once:
            try:
                await sink.migrate()
                written = await sink.run_pass()
            except DatabaseUnavailable as exc:
                print(f"kubetoll ledger-sink: PostgreSQL at {sink.where} unavailable: {exc}", file=sys.stderr)
                return 1
            print(f"{written} rows written from {len(sink.namespaces)} namespaces")
            return 0
        if not args.no_metrics:
            from prometheus_client import start_http_server

            start_http_server(args.metrics_port, args.metrics_addr, registry=metrics.registry)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        logging.getLogger("kubetoll.ledger_sink").info(
            "ledger sink: consumer %s of group %s, writing to %s", sink.consumer, options.group, sink.where
        )
        await sink.run(stop)
        return 0
    finally:
        await sink.close()
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kubetoll-ledger-sink",
        description="Drain every namespace's ledger stream from Redis into PostgreSQL, exactly once.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
