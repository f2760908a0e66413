"""The `kubetoll` command.

One command for everything a person runs: each group of sub-commands is a
module of this package with a `register(subparsers)` function. The sidecar and
the operator have entry points of their own (`kubetoll-sidecar`,
`kubetoll-operator`: what their images run); `kubetoll sidecar` and `kubetoll
operator` take the same arguments through those packages' `add_arguments`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# Modules that contribute sub-commands. Each has `register(subparsers)`; a module
# whose optional dependencies are missing is skipped with a note in --help.
COMMAND_MODULES = (
    "kubetoll_tools.sidecar_commands",
    "kubetoll_tools.cache_commands",
    "kubetoll_tools.tool_commands",
    "kubetoll_tools.operator_commands",
    "kubetoll_tools.budget_commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetoll",
        description="Budget-aware router for LLM traffic on Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    missing: list[str] = []
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == name or name.startswith(exc.name + ".")):
                continue  # the part is not built yet or not installed
            missing.append(f"{name} (needs {exc.name})")
            continue
        module.register(sub)
    if missing:
        parser.epilog = "unavailable command groups: " + ", ".join(missing)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
