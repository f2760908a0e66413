"""`kubetoll cache ...`: operator commands for the response cache.

    kubetoll cache flush --redis-url URL --namespace NS --policy P

Wired by `register(subparsers)` (kubetoll_tools.cli's COMMAND_MODULES).
The Redis password, if any, comes from a file or an environment variable,
never from the URL on the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="manage the response cache (flush a policy's entries)")
    actions = p.add_subparsers(dest="cache_action", metavar="ACTION")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])
    f = actions.add_parser("flush", help="invalidate every cached answer of one cache policy, in every sidecar")
    f.add_argument(
        "--redis-url",
        default=os.environ.get("KUBETOLL_REDIS_URL"),
        help="redis:// or rediss:// URL (default: $KUBETOLL_REDIS_URL)",
    )
    f.add_argument("--namespace", required=True, help="Kubernetes namespace of the policy")
    f.add_argument("--policy", required=True, help="CachePolicy name")
    f.add_argument("--username-file", help="file holding the Redis ACL user")
    f.add_argument("--password-file", help="file holding the Redis password (or set KUBETOLL_REDIS_PASSWORD)")
    f.add_argument("--timeout", type=float, default=10.0, help="seconds before giving up (default 10)")
    f.set_defaults(handler=_flush)


def _flush(args: argparse.Namespace) -> int:
    if not args.redis_url:
        print("kubetoll cache flush: --redis-url is required (or set KUBETOLL_REDIS_URL)", file=sys.stderr)
        return 2
    return asyncio.run(_flush_async(args))


async def _flush_async(args: argparse.Namespace) -> int:
    from pathlib import Path

    from redis.exceptions import RedisError

    from kubetoll_core.redis_connect import RedisCredentials, connect_redis, password_from_env
    from kubetoll_core.router_config import BudgetStoreSettings

    from .cache_flush import flush_policy

    creds = RedisCredentials(
        Path(args.username_file) if args.username_file else None,
        Path(args.password_file) if args.password_file else None,
        None if args.password_file else password_from_env(),
    )
    try:
        # The same client as the sidecars' (TLS, Sentinel and Cluster URLs included); binary values.
        client = connect_redis(
            BudgetStoreSettings(url=args.redis_url),
            creds,
            io_timeout=min(args.timeout, 5.0),
            decode_responses=False,
            client_name="kubetoll-cache-flush",
        )
    except ValueError as exc:
        print(f"kubetoll cache flush: --redis-url: {exc}", file=sys.stderr)
        return 2
    try:
        result = await asyncio.wait_for(flush_policy(client, args.namespace, args.policy), args.timeout)
    except (TimeoutError, RedisError, OSError, ValueError) as exc:
        print(
            f"kubetoll cache flush: cannot flush {args.namespace}/{args.policy}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        await client.aclose()
    swept = (
        f"{result.deleted} keys deleted"
        if result.swept
        else "old keys left to expire by their TTL (this Redis user may not SCAN, as a namespace's own may not)"
    )
    print(
        f"flushed cache policy {args.namespace}/{args.policy}: epoch is now {result.epoch}, {swept}; "
        "sidecars stop serving old entries within about a second"
    )
    return 0
