"""The control-plane `kubetoll` sub-commands: crds, validate, compile, run, operator.

`kubetoll_sidecar.cli` calls `register(subparsers)`. Nothing heavy is imported at
module level (kopf is an optional dependency), so `kubetoll --help` stays fast
and works without the operator extras.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger("kubetoll.run")

POLL_SECONDS = 0.5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crds", help="write (or check) the CustomResourceDefinitions generated from the resource models")
    p.add_argument(
        "--out", metavar="DIR", help="directory to write one YAML file per CRD into (default: print to stdout)"
    )
    p.add_argument(
        "--check", action="store_true", help="exit 1 if the files in --out (default crds/) differ from the models"
    )
    p.set_defaults(handler=cmd_crds)

    p = sub.add_parser(
        "validate", help="check ModelBackend/ModelRoute/TokenBudget/CachePolicy manifests: schema and references"
    )
    _add_files(p)
    p.add_argument("--namespace", default="default", help="namespace for manifests that name none (default: default)")
    p.add_argument("--strict", action="store_true", help="fail on warnings too (e.g. a dropped reference)")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("compile", help="print the RouterConfig JSON that one namespace's manifests compile to")
    _add_files(p)
    p.add_argument(
        "--namespace", default="default", help="namespace to compile (manifests that name none belong to it)"
    )
    p.add_argument(
        "--credentials",
        choices=("file", "env"),
        default="file",
        help=(
            "credentials as kubetoll-credentials file names (the operator's) or environment variables (kubetoll run's)"
        ),
    )
    p.add_argument(
        "--canonical", action="store_true", help="print the canonical compact JSON whose sha256 is the config hash"
    )
    p.set_defaults(handler=cmd_compile)

    p = sub.add_parser(
        "run", help="run the sidecar on manifests from disk, recompiling when they change (no cluster needed)"
    )
    _add_files(p)
    p.add_argument("--namespace", default="default", help="namespace to serve (manifests that name none belong to it)")
    p.add_argument("--host", help="API listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="API port (default 7400)")
    p.add_argument("--metrics-port", type=int, help="metrics and probes port (default 7401)")
    p.add_argument("--redis-url", help="share budgets through this Redis (default: in memory)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(handler=cmd_run)

    from kubetoll_operator.main import add_arguments as add_operator_arguments

    p = sub.add_parser(
        "operator",
        help="run the Kubernetes operator (kopf) that compiles custom resources into each namespace's router config",
    )
    add_operator_arguments(p)
    p.set_defaults(handler=cmd_operator)

    from kubetoll_operator.ledger_sink.main import add_arguments as add_sink_arguments

    p = sub.add_parser(
        "ledger-sink",
        help="drain every namespace's ledger stream from Redis into PostgreSQL, exactly once (docs/ledger.md)",
    )
    add_sink_arguments(p)
    p.set_defaults(handler=cmd_ledger_sink)


def _add_files(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        required=True,
        metavar="DIR|FILE",
        help="manifest file or directory (repeatable)",
    )


# --------------------------------------------------------------------------- crds


def cmd_crds(args: argparse.Namespace) -> int:
    from kubetoll_operator import crdgen

    if args.check:
        problems = crdgen.check(Path(args.out or "crds"))
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run `kubetoll crds --out crds` to regenerate", file=sys.stderr)
            return 1
        print(f"{args.out or 'crds'}: up to date")
        return 0
    if args.out:
        for path in crdgen.write(Path(args.out)):
            print(path)
        return 0
    sys.stdout.write("---\n".join(crdgen.render(crd) for crd in crdgen.all_crds().values()))
    return 0


# --------------------------------------------------------------------------- validate / compile


def _by_namespace(docs: list[Any], default_ns: str) -> dict[str, list[Any]]:
    from kubetoll_operator.resources import GROUP

    groups: dict[str, list[Any]] = defaultdict(list)
    for d in docs:
        if str(d.obj.get("apiVersion", "")).split("/", 1)[0] == GROUP:
            groups[d.namespace(default_ns)].append(d)
    return groups


def _locate(docs: list[Any]) -> dict[tuple[str, str], list[Any]]:
    where: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for d in docs:
        where[(d.kind, d.name or "<unnamed>")].append(d)
    return where


def _report(problem: Any, where: dict[tuple[str, str], list[Any]], namespace: str) -> str:
    docs = where.get((problem.kind, problem.name), [])
    doc = docs[1] if problem.reason == "Duplicate" and len(docs) > 1 else (docs[0] if docs else None)
    loc = doc.where if doc else f"namespace {namespace}"
    field = f" {problem.field}:" if problem.field else ":"
    level = "error" if problem.severity == "error" else "warning"
    return f"{loc}: {level}: {problem.kind}/{problem.name}{field} {problem.message} ({problem.reason})"


def cmd_validate(args: argparse.Namespace) -> int:
    from kubetoll_operator.compiler import compile_namespace
    from kubetoll_operator.manifests import load

    docs, load_errors = load(args.files)
    errors = warnings = 0
    for e in load_errors:
        print(f"{e}: error", file=sys.stderr)
        errors += 1
    groups = _by_namespace(docs, args.namespace)
    count = 0
    for ns in sorted(groups):
        group = groups[ns]
        count += len(group)
        result = compile_namespace(ns, [d.obj for d in group])
        where = _locate(group)
        for p in result.problems:
            print(_report(p, where, ns), file=sys.stderr)
            if p.severity == "error":
                errors += 1
            else:
                warnings += 1
    files = len({d.path for d in docs})
    print(f"{count} resources in {files} files: {errors} errors, {warnings} warnings")
    return 1 if errors or (args.strict and warnings) else 0


def cmd_compile(args: argparse.Namespace) -> int:
    import json

    from kubetoll_operator.compiler import compile_namespace
    from kubetoll_operator.manifests import load

    docs, load_errors = load(args.files)
    for e in load_errors:
        print(f"{e}: error", file=sys.stderr)
    group = _by_namespace(docs, args.namespace).get(args.namespace, [])
    result = compile_namespace(args.namespace, [d.obj for d in group], credential_mode=args.credentials)
    where = _locate(group)
    for p in result.problems:
        print(_report(p, where, args.namespace), file=sys.stderr)
    if result.config is None:
        return 1
    if args.canonical:
        print(result.config_json)
    else:
        print(json.dumps(json.loads(result.config_json), indent=2, sort_keys=True))
    print(f"config hash {result.content_hash}", file=sys.stderr)
    return 1 if load_errors or not result.ok else 0


# --------------------------------------------------------------------------- run


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class LocalRunner:
    """`kubetoll run`: compile manifests from disk into a config file and keep it current.

    A change that does not load is logged and the last good file stays. A
    resource whose update does not compile keeps its last good version (the
    compiler's `last_good`); a budget that never compiled makes its routes answer
    503 `budget_unavailable`. Credentials come from environment variables named by
    `credential_env_name`; a variable that is not set is filled from a Secret
    manifest among the files, if there is one (never overriding the environment).
    """

    def __init__(self, files: list[str], namespace: str, config_path: Path, redis_url: str | None = None) -> None:
        self.files = files
        self.namespace = namespace
        self.config_path = config_path
        self.redis_url = redis_url
        self.current_hash = ""
        self.compiled_fingerprint: tuple[Any, ...] | None = None
        self._env_from_manifests: set[str] = set()
        self.in_force: dict[tuple[str, str], dict[str, Any]] = {}  # the last applied result's versions

    def fingerprint(self) -> tuple[Any, ...]:
        from kubetoll_operator.manifests import manifest_files

        out: list[tuple[str, int | None, int | None]] = []  # (path, mtime, size); None: unreadable
        for f in manifest_files(self.files):
            try:
                st = f.stat()
                out.append((str(f), st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((str(f), None, None))
        return tuple(out)

    def compile(self) -> tuple[Any, list[str]]:
        """(result or None, messages). None means: do not apply (a file does not load)."""
        from kubetoll_core.router_config import BudgetStoreSettings
        from kubetoll_operator.compiler import compile_namespace
        from kubetoll_operator.manifests import load, secret_values

        # Taken before reading, so a change made while compiling is seen by watch().
        self.compiled_fingerprint = self.fingerprint()
        docs, load_errors = load(self.files)
        messages = [f"{e}: error" for e in load_errors]
        group = _by_namespace(docs, self.namespace).get(self.namespace, [])
        store = BudgetStoreSettings(url=self.redis_url) if self.redis_url else None
        result = compile_namespace(
            self.namespace,
            [d.obj for d in group],
            credential_mode="env",
            budget_store=store,
            last_good=self.in_force,
        )
        where = _locate(group)
        messages += [_report(p, where, self.namespace) for p in result.problems]
        if load_errors or result.config is None:
            return None, messages
        secrets = secret_values(docs, self.namespace, self.namespace)
        for env, (secret, key) in sorted(result.credentials.items()):
            if env in os.environ and env not in self._env_from_manifests:
                continue
            value = secrets.get(secret, {}).get(key)
            if value:
                if os.environ.get(env) != value:
                    messages.append(
                        f"credential {env}: from the Secret manifest {secret}/{key} (set {env} to override)"
                    )
                os.environ[env] = value
                self._env_from_manifests.add(env)
            elif env not in os.environ:
                messages.append(
                    f"warning: credential {env} is not set: export it with the value of Secret {secret} key {key}"
                )
        return result, messages

    def apply(self, result: Any) -> bool:
        self.in_force = dict(result.in_force)
        if result.content_hash == self.current_hash:
            return False
        write_atomically(self.config_path, result.config_json)
        self.current_hash = result.content_hash
        return True

    def watch(self, stop: threading.Event) -> None:
        seen = self.compiled_fingerprint if self.compiled_fingerprint is not None else self.fingerprint()
        while not stop.wait(POLL_SECONDS):
            now = self.fingerprint()
            if now == seen:
                continue
            seen = now
            try:
                result, messages = self.compile()
            except Exception:  # a bug must not kill the watcher; the last good file stays
                log.exception("recompile failed; keeping the last good config")
                continue
            for m in messages:
                log.warning("%s", m) if ("error" in m or "warning" in m) else log.info("%s", m)
            if result is None:
                log.error("manifests changed but do not load; keeping config %s", self.current_hash[:12])
                continue
            if not result.ok:
                log.error("manifests changed with errors: see above; what did not compile keeps its last good version")
            if self.apply(result):
                log.info("manifests changed: config %s written to %s", result.content_hash[:12], self.config_path)
            else:
                log.info("manifests changed: config unchanged (%s)", result.content_hash[:12])


def cmd_run(args: argparse.Namespace) -> int:
    from kubetoll_sidecar.server import run_sidecar

    workdir = Path(tempfile.mkdtemp(prefix="kubetoll-run-"))
    try:
        runner = LocalRunner(args.files, args.namespace, workdir / "router.json", args.redis_url)
        result, messages = runner.compile()
        for m in messages:
            print(m, file=sys.stderr)
        if result is None:
            print("kubetoll run: the manifests do not load; fix the errors above", file=sys.stderr)
            return 2
        runner.apply(result)
        for b in result.config.unavailable_budgets:
            print(
                f"kubetoll run: TokenBudget {b.name} did not compile: its routes answer 503 budget_unavailable",
                file=sys.stderr,
            )
        config = result.config
        print(
            f"kubetoll run: namespace {args.namespace}: "
            f"{len(config.routes)} routes ({', '.join(r.name for r in config.routes)}), "
            f"{len(config.backends)} backends, {len(config.budgets)} budgets; "
            f"config {result.content_hash[:12]} at {runner.config_path}",
            file=sys.stderr,
        )
        stop = threading.Event()
        watcher = threading.Thread(target=runner.watch, args=(stop,), name="kubetoll-manifest-watch", daemon=True)
        watcher.start()
        try:
            return run_sidecar(
                str(runner.config_path),
                host=args.host,
                port=args.port,
                metrics_port=args.metrics_port,
                log_level=args.log_level,
            )
        finally:
            stop.set()
            watcher.join(timeout=2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- operator


def cmd_operator(args: argparse.Namespace) -> int:
    from kubetoll_operator.main import run

    return run(args)


def cmd_ledger_sink(args: argparse.Namespace) -> int:
    from kubetoll_operator.ledger_sink.main import run

    return run(args)
