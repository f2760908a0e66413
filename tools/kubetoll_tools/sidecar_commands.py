"""The data-plane `kubetoll` sub-commands: `sidecar`, `check-config` and `simulate-upstream`."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from kubetoll_sidecar.main import add_arguments as add_sidecar_arguments

    p = sub.add_parser("sidecar", help="serve the OpenAI-compatible router from a RouterConfig file")
    add_sidecar_arguments(p)
    p.set_defaults(handler=_sidecar)

    p = sub.add_parser("check-config", help="validate a RouterConfig file and resolve its prices")
    p.add_argument("config")
    p.set_defaults(handler=_check)

    p = sub.add_parser("simulate-upstream", help="run simulated OpenAI / Azure / Anthropic APIs for local testing")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before each response")
    p.add_argument("--first-token-ms", type=float, default=0.0)
    p.add_argument("--chunk-interval-ms", type=float, default=0.0)
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered 429/500")
    p.set_defaults(handler=_simulate)


def _sidecar(args: argparse.Namespace) -> int:
    from kubetoll_sidecar.main import run

    return run(args)


def _check(args: argparse.Namespace) -> int:
    from kubetoll_core.prices import PricingError, resolve_price
    from kubetoll_sidecar.config_loader import ConfigError, load_config

    try:
        loaded = load_config(args.config)
        for b in loaded.config.backends:
            price = resolve_price(b)
            rates = price.per_mtok()
            print(
                f"backend {b.name}: {b.provider.value} {b.model} ({price.source}) in ${rates['inputPerMTok']}/MTok "
                f"out ${rates['outputPerMTok']}/MTok"
            )
    except (ConfigError, PricingError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    c = loaded.config
    print(f"ok: {len(c.routes)} routes, {len(c.backends)} backends, {len(c.budgets)} budgets")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from .simulator import SimSettings, run

    settings = SimSettings(
        latency_ms=args.latency_ms,
        first_token_ms=args.first_token_ms,
        chunk_interval_ms=args.chunk_interval_ms,
        error_rate=args.error_rate,
    )
    run(args.host, args.port, settings)
    return 0
