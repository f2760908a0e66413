"""`kubetoll-sidecar` (and `kubetoll sidecar`): serve the router from a RouterConfig file.

The sidecar image runs this entry point; it holds the core and sidecar packages
only, so nothing here imports the tools or the operator.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="RouterConfig JSON or YAML (reloaded when it changes)")
    p.add_argument("--host", help="API listen address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="API port (default from config)")
    p.add_argument("--metrics-port", type=int, help="metrics/probes port (default from config)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--wait-for-config",
        action="store_true",
        help="if the config file does not exist yet, wait for it (API answers 503 config_pending, /readyz 503) "
        "instead of exiting; the injected sidecar uses this",
    )


def run(args: argparse.Namespace) -> int:
    from .server import run_sidecar

    return run_sidecar(
        args.config,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        log_level=args.log_level,
        wait_for_config=args.wait_for_config,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kubetoll-sidecar", description="Serve the OpenAI-compatible Kubetoll router from a RouterConfig file."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
