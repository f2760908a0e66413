"""`kubetoll-operator` (and `kubetoll operator`): run the kopf operator and its webhooks.

The operator image runs this entry point; it holds the core and operator
packages only, so nothing here imports the tools or the sidecar.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any


def telemetry_settings(endpoint: str, sample_ratio: float) -> Any:
    """The sidecars' trace export, from the operator's flags (None: no endpoint, no traces)."""
    if not endpoint:
        return None
    from kubetoll_core.router_config import TelemetrySettings

    try:
        return TelemetrySettings.model_validate({"otlp": {"endpoint": endpoint}, "sampleRatio": sample_ratio})
    except ValueError as exc:
        raise SystemExit(f"--otlp-endpoint / --trace-sample-ratio: {exc}") from None


def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port (0: any free one)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0-65535)")
    return value


def _priority(text: str) -> int:
    if text == "random":
        import random

        return random.SystemRandom().randint(1, 2**31 - 1)
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--standalone", action="store_true", help="no peering: run as the only replica")
    p.add_argument(
        "--peering",
        default="kubetoll",
        metavar="NAME",
        help="ClusterKopfPeering name shared by the replicas; one is active (default: kubetoll)",
    )
    p.add_argument(
        "--priority",
        type=_priority,
        default=0,
        metavar="N|random",
        help="peering priority of this replica (highest wins; replicas with equal priorities all pause); "
        "random: a random one, for the replicas of one Deployment",
    )
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch only this namespace (repeatable; globs allowed); default: all namespaces",
    )
    p.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        metavar="URL",
        help="liveness endpoint (default: http://0.0.0.0:8080/healthz; empty to disable)",
    )
    p.add_argument(
        "--redis-url",
        default=env("KUBETOLL_REDIS_URL"),
        help="Redis URL written into every namespace's config (budgets shared across sidecars); env KUBETOLL_REDIS_URL",
    )
    p.add_argument(
        "--cluster-domain",
        default=env("KUBETOLL_CLUSTER_DOMAIN", "cluster.local"),
        help="cluster DNS domain for serviceRef endpoints (default: cluster.local)",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=env("KUBETOLL_OTLP_ENDPOINT", ""),
        metavar="URL",
        help="OTLP/HTTP collector every sidecar sends its traces to (telemetry.otlp.endpoint; default: no traces)",
    )
    p.add_argument(
        "--trace-sample-ratio",
        type=positive_float,
        default=float(env("KUBETOLL_TRACE_SAMPLE_RATIO", "1.0")),
        metavar="R",
        help="share of requests traced, 0 < R <= 1 (telemetry.sampleRatio; default 1)",
    )
    p.add_argument(
        "--redis-username-file",
        default=env("KUBETOLL_REDIS_USERNAME_FILE"),
        metavar="PATH",
        help="file holding the operator's Redis ACL user, read at each connection; env KUBETOLL_REDIS_USERNAME_FILE",
    )
    p.add_argument(
        "--redis-password-file",
        default=env("KUBETOLL_REDIS_PASSWORD_FILE"),
        metavar="PATH",
        help="file holding the operator's Redis password, read at each connection; env KUBETOLL_REDIS_PASSWORD_FILE "
        "(or the password itself in KUBETOLL_REDIS_PASSWORD)",
    )
    p.add_argument(
        "--redis-auth-dir",
        default=env("KUBETOLL_REDIS_AUTH_DIR"),
        metavar="DIR",
        help="a mounted Secret with the budget store's credentials: its keys password (and username) are the "
        "operator's own login (unless the two flags above are given) and, without --redis-auth-per-namespace, every "
        "namespace's; each namespace's login goes into its kubetoll-credentials Secret; env KUBETOLL_REDIS_AUTH_DIR",
    )
    p.add_argument(
        "--redis-auth-per-namespace",
        action="store_true",
        help="with --redis-auth-dir: each namespace gets its own Redis ACL user from the keys <namespace>.password "
        "(and <namespace>.username), never the operator's",
    )
    p.add_argument(
        "--spend-interval",
        type=positive_float,
        default=positive_float(env("KUBETOLL_SPEND_INTERVAL", "15")),
        metavar="SECONDS",
        help="with --redis-url: how often each namespace's spend is read into TokenBudget and CachePolicy status "
        "(default 15); env KUBETOLL_SPEND_INTERVAL",
    )
    p.add_argument(
        "--tenants-over-budget",
        type=int,
        default=10,
        metavar="N",
        help="TokenBudget status lists at most N tenants over a tier limit (default 10)",
    )
    p.add_argument(
        "--metrics-port",
        type=port_number,
        default=int(env("KUBETOLL_OPERATOR_METRICS_PORT", "8081")),
        metavar="PORT",
        help="serve the operator's Prometheus metrics on http://ADDR:PORT/metrics (default 8081; 0: any free port); "
        "env KUBETOLL_OPERATOR_METRICS_PORT",
    )
    p.add_argument("--metrics-addr", default="0.0.0.0", metavar="ADDR", help="metrics listen address (default 0.0.0.0)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve the operator's metrics")
    p.add_argument("--verbose", action="store_true")
    from .webhook import add_arguments as add_webhook_arguments

    add_webhook_arguments(p)


def run(args: argparse.Namespace) -> int:
    from kubetoll_core.redis_connect import password_from_env

    from .handlers import OperatorOptions, run_operator
    from .webhook import options_from_args as webhook_options

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    options = OperatorOptions(
        redis_url=args.redis_url or None,
        cluster_domain=args.cluster_domain,
        telemetry=telemetry_settings(args.otlp_endpoint, args.trace_sample_ratio),
        webhook=webhook_options(args),
        spend_interval_seconds=args.spend_interval,
        tenants_over_budget=max(args.tenants_over_budget, 0),
        redis_username_file=args.redis_username_file or None,
        redis_password_file=args.redis_password_file or None,
        redis_password=password_from_env(),
        redis_auth_dir=args.redis_auth_dir or None,
        redis_auth_per_namespace=args.redis_auth_per_namespace,
        metrics_addr=args.metrics_addr,
        metrics_port=None if args.no_metrics else args.metrics_port,
    )
    run_operator(
        options,
        standalone=args.standalone,
        peering_name=args.peering,
        priority=args.priority,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kubetoll-operator",
        description="Run the Kubetoll operator: compiles custom resources into each namespace's router config "
        "and serves the sidecar-injection webhook.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
