"""`kubetoll cache ...`: operator commands for the response cache.

    kubetoll cache flush --redis-url URL --namespace NS --policy P

Wire it with `register(subparsers)` (kubetoll_sidecar.cli's COMMAND_MODULES).
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


def _read(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()


def _flush(args: argparse.Namespace) -> int:
    if not args.redis_url:
        print("kubetoll cache flush: --redis-url is required (or set KUBETOLL_REDIS_URL)", file=sys.stderr)
        return 2
    try:
        username = _read(args.username_file)
        password = _read(args.password_file) or os.environ.get("KUBETOLL_REDIS_PASSWORD") or None
    except OSError as exc:
        print(f"kubetoll cache flush: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_flush_async(args.redis_url, args.namespace, args.policy, username, password, args.timeout))


async def _flush_async(
    url: str, namespace: str, policy: str, username: str | None, password: str | None, timeout: float
) -> int:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from .cache_flush import flush_policy

    client = aioredis.from_url(url, username=username, password=password, socket_connect_timeout=min(timeout, 5.0))
    try:
        result = await asyncio.wait_for(flush_policy(client, namespace, policy), timeout)
    except (TimeoutError, RedisError, OSError) as exc:
        print(f"kubetoll cache flush: cannot flush {namespace}/{policy}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()
    print(
        f"flushed cache policy {namespace}/{policy}: epoch is now {result.epoch}, {result.deleted} keys deleted; "
        "sidecars stop serving old entries within about a second"
    )
    return 0
