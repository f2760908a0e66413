"""`kubetoll budget suspend|resume NAME -n NS`: a TokenBudget's kill switch.

    kubetoll budget suspend chat-budget -n team-a [--redis-url URL]
    kubetoll budget resume chat-budget -n team-a

Two writes, in this order:

1. `spec.suspended` on the TokenBudget, through the Kubernetes API: the source of
   truth. The operator compiles it into the namespace's config, and every sidecar
   refuses (403 `budget_suspended`) once its mounted config reloads; that can take
   the kubelet's ConfigMap sync, up to a minute or more.
2. The fast flag in the shared budget store (`kubetoll_core.kill_switch.set_suspended`:
   the key and a pub/sub message), which every sidecar of the namespace obeys within
   2 s (docs/redis-layout.md, "Kill switch").

A sidecar refuses while either says suspended, so a suspension is fast and a
resume is fast only where the suspension had not reached the config yet;
elsewhere it waits for the config that says `suspended: false`.

The spec goes first so that a failure in step 2 leaves the truth written and the
command says so; a resume leaves a flag it could not clear in place, so a failure
never lifts a budget by mistake. The Redis URL is `--redis-url` (env
KUBETOLL_REDIS_URL), else the `budgetStore.url` of the namespace's `kubetoll-router`
ConfigMap; credentials come from `--username-file` / `--password-file` or env
KUBETOLL_REDIS_PASSWORD, never from the URL. A namespace without a shared store has
no fast path: the spec is all there is, and the command says how long that takes.

The API is reached with the kubeconfig (`$KUBECONFIG`, else `~/.kube/config`, its
current context: tokens, client certificates, basic auth) or, in a pod, the service
account, the way the operator logs in (kopf's login functions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kubetoll_operator.kube import ApiError, KubeApi

SPEC_RELOAD_NOTE = (
    "sidecars follow it once their mounted config reloads (the kubelet's ConfigMap sync, up to a minute or more)"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("budget", help="suspend or resume a TokenBudget (the kill switch)")
    actions = p.add_subparsers(dest="budget_action", metavar="ACTION")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])
    for action, on, text in (
        ("suspend", True, "admit nothing under a TokenBudget: spec.suspended and the Redis flag (403 within 2 s)"),
        ("resume", False, "lift a TokenBudget's suspension: spec.suspended and the Redis flag"),
    ):
        a = actions.add_parser(action, help=text, description=text)
        a.add_argument("name", metavar="NAME", help="TokenBudget name")
        a.add_argument(
            "-n", "--namespace", help="namespace of the TokenBudget (default: the kubeconfig context's, else default)"
        )
        a.add_argument(
            "--redis-url",
            default=os.environ.get("KUBETOLL_REDIS_URL"),
            help="the budget store, reachable from here (default: $KUBETOLL_REDIS_URL, "
            "else budgetStore.url of the namespace's kubetoll-router ConfigMap)",
        )
        a.add_argument("--username-file", help="file holding the Redis ACL user")
        a.add_argument("--password-file", help="file holding the Redis password (or set KUBETOLL_REDIS_PASSWORD)")
        a.add_argument("--timeout", type=float, default=10.0, help="seconds each step may take (default 10)")
        a.set_defaults(handler=_run, suspend=on)


class StepFailed(Exception):
    """One step failed; the message says which, and what was and was not changed."""


@dataclass
class Target:
    namespace: str
    name: str
    on: bool

    @property
    def label(self) -> str:
        return f"TokenBudget {self.namespace}/{self.name}"

    @property
    def value(self) -> str:
        return "true" if self.on else "false"


def _run(args: argparse.Namespace) -> int:
    verb = "suspend" if args.suspend else "resume"
    try:
        print(asyncio.run(switch(args)))
    except StepFailed as exc:
        print(f"kubetoll budget {verb}: {exc}", file=sys.stderr)
        return 1
    return 0


async def switch(args: argparse.Namespace) -> str:
    """Both steps; the line to print on success. StepFailed otherwise."""
    info = _login()
    target = Target(args.namespace or info.default_namespace or "default", args.name, bool(args.suspend))
    api = KubeApi(info)
    try:
        redis_url = await _read_then_patch(api, target, args.redis_url, args.timeout)
    finally:
        await api.close()
    spec_done = f"spec.suspended is {target.value}"
    if redis_url is None:
        return (
            f"{target.label}: {spec_done}; the namespace has no shared budget store (no --redis-url, "
            f"no budgetStore.url in its config), so there is no fast flag: {SPEC_RELOAD_NOTE}"
        )
    await _set_flag(target, redis_url, args, spec_done)
    if target.on:
        return f"{target.label} suspended: {spec_done}, Redis flag set and published: every sidecar refuses within 2 s"
    # Lifting is not symmetric, on purpose: a sidecar whose config already says suspended keeps
    # refusing until the config with spec.suspended=false reaches it (the Redis flag never
    # overrides the spec).
    return (
        f"{target.label} resumed: {spec_done}, Redis flag cleared and published: sidecars admit again within 2 s, "
        "or, where the suspension had reached their config, once the config with spec.suspended=false does"
    )


# --------------------------------------------------------------------------- Kubernetes


def _login() -> Any:
    try:
        import kopf
    except ModuleNotFoundError:
        raise StepFailed(
            "logging in to the Kubernetes API needs the operator extras (pip install 'kubetoll[cli]'); nothing changed"
        ) from None
    settings = kopf.OperatorSettings()
    try:
        # A kubeconfig first, as kubectl does; the service account when run in a pod without one.
        info = kopf.login_with_kubeconfig(settings=settings) or kopf.login_with_service_account(settings=settings)
    except (OSError, ValueError, KeyError, TypeError, kopf.LoginError) as exc:
        raise StepFailed(f"cannot read the kubeconfig: {type(exc).__name__}: {exc}; nothing changed") from None
    if info is None:
        raise StepFailed(
            "no kubeconfig ($KUBECONFIG, ~/.kube/config) and no service account: cannot reach the Kubernetes API; "
            "nothing changed"
        )
    return info


async def _read_then_patch(api: KubeApi, target: Target, redis_url: str | None, timeout: float) -> str | None:
    """Check the budget exists and find the store (nothing changed yet), then patch the spec.

    Returns the Redis URL to use, or None when the namespace has no shared store.
    """
    from kubetoll_operator.handlers import CONFIG_KEY, CONFIGMAP_NAME
    from kubetoll_operator.resources import GROUP, VERSION

    ns = target.namespace
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/tokenbudgets/{target.name}"
    server = str(api.info.server)

    async def call(what: str, coro: Any, changed: str) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout)
        except ApiError as exc:
            hint = ""
            if exc.status == 401:
                hint = (
                    " (the API refused the credentials: kubetoll reads token, client-certificate and basic-auth users "
                    "from the kubeconfig, not exec plugins; `kubectl proxy` and a kubeconfig with its URL work)"
                )
            elif exc.status == 403:
                hint = " (RBAC: the command needs get and patch on tokenbudgets.kubetoll.dev, get on configmaps)"
            raise StepFailed(f"{what}: {exc}{hint}; {changed}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise StepFailed(
                f"{what}: cannot reach the Kubernetes API at {server}: {type(exc).__name__}: "
                f"{exc or 'timed out'}; {changed}"
            ) from None

    unchanged = "nothing changed (spec.suspended not set, Redis flag not touched)"
    budget = await call(f"reading {target.label}", api.get(path), unchanged)
    if budget is None:
        raise StepFailed(f"{target.label} not found; {unchanged}")
    if redis_url is None:
        cm_path = f"/api/v1/namespaces/{ns}/configmaps/{CONFIGMAP_NAME}"
        cm = await call(
            f"reading ConfigMap {ns}/{CONFIGMAP_NAME} to find the budget store (or pass --redis-url)",
            api.get(cm_path),
            unchanged,
        )
        redis_url = _store_url(cm, CONFIG_KEY) if cm is not None else None
    await call(
        f"setting spec.suspended={target.value} on {target.label}",
        api.merge_patch(path, {"spec": {"suspended": target.on}}),
        "spec.suspended was not set and the Redis flag was not touched",
    )
    return redis_url


def _store_url(configmap: dict[str, Any], key: str) -> str | None:
    text = (configmap.get("data") or {}).get(key)
    if not text:
        return None
    try:
        url = (json.loads(text).get("budgetStore") or {}).get("url")
    except (ValueError, AttributeError):
        return None  # the sidecars cannot read it either; the spec is the only path then
    return url if isinstance(url, str) and url else None


# --------------------------------------------------------------------------- Redis


async def _set_flag(target: Target, redis_url: str, args: argparse.Namespace, spec_done: str) -> None:
    from redis.exceptions import RedisError

    from kubetoll_core.kill_switch import set_suspended
    from kubetoll_core.redis_connect import RedisCredentials, connect_redis, password_from_env
    from kubetoll_core.router_config import BudgetStoreSettings

    if target.on:
        consequence = f"{spec_done} (the source of truth: {SPEC_RELOAD_NOTE}), but the fast Redis flag is not set"
    else:
        consequence = (
            f"{spec_done}, but the Redis flag is not cleared: if it was set, the budget stays suspended; "
            "run `kubetoll budget resume` again once Redis answers"
        )
    try:
        creds = RedisCredentials(
            Path(args.username_file) if args.username_file else None,
            Path(args.password_file) if args.password_file else None,
            None if args.password_file else password_from_env(),
        )
        client = connect_redis(
            BudgetStoreSettings(url=redis_url),
            creds,
            io_timeout=min(args.timeout, 5.0),
            client_name="kubetoll-budget",
        )
    except ValueError as exc:
        raise StepFailed(f"Redis URL {redis_url!r}: {exc}; {consequence}") from None
    try:
        await asyncio.wait_for(set_suspended(client, target.namespace, target.name, target.on), args.timeout)
    except (TimeoutError, RedisError, OSError, ValueError) as exc:
        raise StepFailed(
            f"cannot reach the budget store at {redis_url}: {type(exc).__name__}: {exc or 'timed out'}; {consequence}"
            + ("" if args.redis_url else " (the URL is the namespace config's; pass --redis-url reachable from here)")
        ) from None
    finally:
        await client.aclose()
