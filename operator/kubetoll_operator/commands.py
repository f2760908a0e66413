"""The operator's `kubetoll` sub-commands: crds, validate, compile, run, operator.

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
    p.add_argument("--out", metavar="DIR", help="directory to write one YAML file per CRD into (default: print to stdout)")
    p.add_argument("--check", action="store_true", help="exit 1 if the files in --out (default crds/) differ from the models")
    p.set_defaults(handler=cmd_crds)

    p = sub.add_parser("validate", help="check ModelBackend/ModelRoute/TokenBudget/CachePolicy manifests: schema and references")
    _add_files(p)
    p.add_argument("--namespace", default="default", help="namespace for manifests that name none (default: default)")
    p.add_argument("--strict", action="store_true", help="fail on warnings too (e.g. a dropped reference)")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("compile", help="print the RouterConfig JSON that one namespace's manifests compile to")
    _add_files(p)
    p.add_argument("--namespace", default="default", help="namespace to compile (manifests that name none belong to it)")
    p.add_argument("--credentials", choices=("file", "env"), default="file", help="credentials as kubetoll-credentials file names (the operator's) or environment variables (kubetoll run's)")
    p.add_argument("--canonical", action="store_true", help="print the canonical compact JSON whose sha256 is the config hash")
    p.set_defaults(handler=cmd_compile)

    p = sub.add_parser("run", help="run the sidecar on manifests from disk, recompiling when they change (no cluster needed)")
    _add_files(p)
    p.add_argument("--namespace", default="default", help="namespace to serve (manifests that name none belong to it)")
    p.add_argument("--host", help="API listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="API port (default 7400)")
    p.add_argument("--metrics-port", type=int, help="metrics and probes port (default 7401)")
    p.add_argument("--redis-url", help="share budgets through this Redis (default: in memory)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf) that compiles custom resources into each namespace's router config")
    p.add_argument("--standalone", action="store_true", help="no peering: run as the only replica")
    p.add_argument("--peering", default="kubetoll", metavar="NAME", help="ClusterKopfPeering name shared by the replicas; one is active (default: kubetoll)")
    p.add_argument("--priority", type=_priority, default=0, metavar="N|random", help="peering priority of this replica (highest wins; replicas with equal priorities all pause); random: a random one, for the replicas of one Deployment")
    p.add_argument("-n", "--namespace", action="append", default=[], metavar="NS", help="watch only this namespace (repeatable; globs allowed); default: all namespaces")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", metavar="URL", help="liveness endpoint (default: http://0.0.0.0:8080/healthz; empty to disable)")
    p.add_argument("--redis-url", default=os.environ.get("KUBETOLL_REDIS_URL"), help="Redis URL written into every namespace's config (budgets shared across sidecars); env KUBETOLL_REDIS_URL")
    p.add_argument("--cluster-domain", default=os.environ.get("KUBETOLL_CLUSTER_DOMAIN", "cluster.local"), help="cluster DNS domain for serviceRef endpoints (default: cluster.local)")
    p.add_argument("--redis-username-file", default=os.environ.get("KUBETOLL_REDIS_USERNAME_FILE"), metavar="PATH", help="file holding the operator's Redis ACL user, read at each connection; env KUBETOLL_REDIS_USERNAME_FILE")
    p.add_argument("--redis-password-file", default=os.environ.get("KUBETOLL_REDIS_PASSWORD_FILE"), metavar="PATH", help="file holding the operator's Redis password, read at each connection; env KUBETOLL_REDIS_PASSWORD_FILE (or the password itself in KUBETOLL_REDIS_PASSWORD)")
    p.add_argument("--spend-interval", type=_positive_float, default=_positive_float(os.environ.get("KUBETOLL_SPEND_INTERVAL", "15")), metavar="SECONDS", help="with --redis-url: how often each namespace's spend is read into TokenBudget and CachePolicy status (default 15); env KUBETOLL_SPEND_INTERVAL")
    p.add_argument("--tenants-over-budget", type=int, default=10, metavar="N", help="TokenBudget status lists at most N tenants over a tier limit (default 10)")
    p.add_argument("--verbose", action="store_true")
    from .webhook import add_arguments as add_webhook_arguments

    add_webhook_arguments(p)
    p.set_defaults(handler=cmd_operator)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _priority(text: str) -> int:
    if text == "random":
        import random

        return random.SystemRandom().randint(1, 2**31 - 1)
    return int(text)


def _add_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", dest="files", action="append", required=True, metavar="DIR|FILE", help="manifest file or directory (repeatable)")


# --------------------------------------------------------------------------- crds


def cmd_crds(args: argparse.Namespace) -> int:
    from . import crdgen

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
    from .resources import GROUP

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
    from .compiler import compile_namespace
    from .manifests import load

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

    from .compiler import compile_namespace
    from .manifests import load

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

    A change that does not load or compiles with an error is logged and the last
    good file stays. Credentials come from environment variables named by
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

    def fingerprint(self) -> tuple[Any, ...]:
        from .manifests import manifest_files

        out = []
        for f in manifest_files(self.files):
            try:
                st = f.stat()
                out.append((str(f), st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((str(f), None, None))
        return tuple(out)

    def compile(self) -> tuple[Any, list[str]]:
        """(result or None, messages). None means: do not apply."""
        from kubetoll_sidecar.config import BudgetStoreSettings

        from .compiler import compile_namespace
        from .manifests import load, secret_values

        # Taken before reading, so a change made while compiling is seen by watch().
        self.compiled_fingerprint = self.fingerprint()
        docs, load_errors = load(self.files)
        messages = [f"{e}: error" for e in load_errors]
        group = _by_namespace(docs, self.namespace).get(self.namespace, [])
        store = BudgetStoreSettings(url=self.redis_url) if self.redis_url else None
        result = compile_namespace(self.namespace, [d.obj for d in group], credential_mode="env", budget_store=store)
        where = _locate(group)
        messages += [_report(p, where, self.namespace) for p in result.problems]
        if load_errors or not result.ok:
            return None, messages
        secrets = secret_values(docs, self.namespace, self.namespace)
        for env, (secret, key) in sorted(result.credentials.items()):
            if env in os.environ and env not in self._env_from_manifests:
                continue
            value = secrets.get(secret, {}).get(key)
            if value:
                if os.environ.get(env) != value:
                    messages.append(f"credential {env}: from the Secret manifest {secret}/{key} (set {env} to override)")
                os.environ[env] = value
                self._env_from_manifests.add(env)
            elif env not in os.environ:
                messages.append(f"warning: credential {env} is not set: export it with the value of Secret {secret} key {key}")
        return result, messages

    def apply(self, result: Any) -> bool:
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
                log.error("manifests changed but do not compile; keeping config %s", self.current_hash[:12])
            elif self.apply(result):
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
            print("kubetoll run: the manifests do not compile; fix the errors above", file=sys.stderr)
            return 2
        runner.apply(result)
        config = result.config
        print(
            f"kubetoll run: namespace {args.namespace}: {len(config.routes)} routes ({', '.join(r.name for r in config.routes)}), "
            f"{len(config.backends)} backends, {len(config.budgets)} budgets; config {result.content_hash[:12]} at {runner.config_path}",
            file=sys.stderr,
        )
        stop = threading.Event()
        watcher = threading.Thread(target=runner.watch, args=(stop,), name="kubetoll-manifest-watch", daemon=True)
        watcher.start()
        try:
            return run_sidecar(str(runner.config_path), host=args.host, port=args.port, metrics_port=args.metrics_port, log_level=args.log_level)
        finally:
            stop.set()
            watcher.join(timeout=2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- operator


def cmd_operator(args: argparse.Namespace) -> int:
    from .handlers import OperatorOptions, run_operator
    from .webhook import options_from_args as webhook_options

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from .spend import credentials_from_env

    options = OperatorOptions(
        redis_url=args.redis_url or None,
        cluster_domain=args.cluster_domain,
        webhook=webhook_options(args),
        spend_interval_seconds=args.spend_interval,
        tenants_over_budget=max(args.tenants_over_budget, 0),
        redis_username_file=args.redis_username_file or None,
        redis_password_file=args.redis_password_file or None,
        redis_password=credentials_from_env(),
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
