"""`kubetoll-sidecar` (and `kubetoll sidecar`): serve the router from a RouterConfig file.

The sidecar image runs this entry point; it holds the core and sidecar packages
only, so nothing here imports the tools or the operator.
"""

from __future__ import annotations

import argparse
import gc
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
    # The imports create ~57,000 container objects that live as long as the process
    # (modules, classes, functions, pydantic's validators): the cyclic collector would
    # walk them while they are made (~8% of the start-up CPU, measured) and again at
    # every full collection after. So it is off while they are made, and they are frozen
    # out of its view once made (gc.freeze: never scanned again; garbage made later is).
    gc.disable()
    try:
        preload_encodings(args.config)
        from .server import run_sidecar
    finally:
        gc.freeze()
        gc.enable()
    return run_sidecar(
        args.config,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        log_level=args.log_level,
        wait_for_config=args.wait_for_config,
    )


def preload_encodings(config_path: str) -> None:
    """Load the encodings the config's backends need before the server's modules are imported.

    Loading and importing are both CPU work under one GIL, so their order does not
    change the time to ready; it changes the peak. An encoding's load holds its Python
    table of ranks beside the Rust one it builds (~30 MB more for o200k_base, freed at
    the end), and the container limit kills at the peak: done first, that transient
    sits on a 20 MB process instead of on the 60 MB aiohttp, pydantic and the config
    models make, and the freed memory is reused by those imports.

    The operator writes JSON, read here without validation (it only names the models);
    anything it cannot read is left to the real load, which says what is wrong, and
    loads the encodings itself.
    """
    from pathlib import Path

    import orjson

    try:
        backends = orjson.loads(Path(config_path).read_bytes())["backends"]
        models = [b["model"] for b in backends if isinstance(b, dict) and isinstance(b.get("model"), str)]
    except (OSError, ValueError, KeyError, TypeError):  # missing (--wait-for-config), YAML, or invalid
        return
    from . import tokens

    for name in tokens.use_encodings_for(models):
        try:
            tokens.get_encoding(name)
        except RuntimeError:  # raised again, and reported, when the sidecar starts
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kubetoll-sidecar", description="Serve the OpenAI-compatible Kubetoll router from a RouterConfig file."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
