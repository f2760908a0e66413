"""The operator's admission webhooks: sidecar injection and resource validation.

kopf runs the HTTPS server (`kopf.WebhookServer`) and routes an AdmissionReview
by its URL path to the handler with that id; the decisions and the JSONPatch come
from `injection.py`. The Helm chart ships the MutatingWebhookConfiguration (two
webhooks, as Istio does) and the serving certificate, shared by every replica,
so kopf's self-managed configuration stays off:

* `/inject-sidecar`: pods labelled `kubetoll.dev/inject: "true"` in namespaces
  not labelled `kubetoll.dev/injection` enabled or disabled;
* `/inject-sidecar-namespace`: pods in namespaces labelled
  `kubetoll.dev/injection: enabled`, except those labelled
  `kubetoll.dev/inject: "false"`;
* `/validate-resources`: the ValidatingWebhookConfiguration's one webhook for
  ModelBackend, ModelRoute, TokenBudget and CachePolicy (`validation.py`: the
  compiler's checks; errors refuse, references warn). It is answered here,
  before kopf's dispatch, because the answer is a whole metav1.Status (422
  `Invalid` with a cause per field), which kopf's handlers cannot return.

A body that is not an AdmissionReview gets HTTP 400 with what is missing.

Namespace labels: the API server's namespaceSelector has already matched them
before a request arrives; the webhook checks again with the namespace read from
the API (GET, cached for a few seconds per namespace). Not a kopf index: both
replicas serve admission requests, but with peering only the active one keeps
its watches going, so a standby's index would go stale. If the read fails, the
path says what the API server matched (`-namespace`: the namespace is enabled).

Native sidecars (`nativeSidecars: auto`): the API server's version, read once
(on the first admission request, as login happens after kopf's start-up
handlers) and again a minute after a failed read; meanwhile the plain container
is used, which every version runs.

The certificate: `--webhook-cert-dir` (tls.crt, tls.key, mounted from a Secret;
kopf re-reads them when they change, so cert-manager's renewals apply without a
restart), else kopf's self-signed certificate for local tries (it needs the
`certbuilder` package, which the images do not carry). With
`--webhook-cert-secret` (the chart's default) the operator makes and keeps the
certificate itself (`webhook_cert.py`): the directory is an emptyDir it fills,
and the server listens only once the webhook configurations trust its CA.

kopf is imported inside functions only: `kubetoll --help` must not need it.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import __version__, validation
from .injection import (
    ALWAYS_EXCLUDED,
    LOG_LEVELS,
    NAMESPACE_LABEL,
    SIDECAR_NAME,
    InjectionError,
    InjectionOptions,
    Resources,
    native_sidecars_supported,
    plan_injection,
    pod_from_request,
)
from .webhook_cert import CertOptions, bootstrap_until_done, keep_renewed, parse_configuration, parse_service

log = logging.getLogger("kubetoll.webhook")

WEBHOOK_ID = "inject-sidecar"  # URL path /inject-sidecar: pods opted in by label
NAMESPACE_WEBHOOK_ID = "inject-sidecar-namespace"  # URL path /inject-sidecar-namespace: namespace enabled
VALIDATE_WEBHOOK_ID = "validate-resources"  # URL path /validate-resources: the four kinds
DEFAULT_SIDECAR_IMAGE = f"ghcr.io/kubetoll/kubetoll-sidecar:{__version__}"
NAMESPACE_CACHE_SECONDS = 10.0
VERSION_RETRY_SECONDS = 60.0
API_TIMEOUT_SECONDS = 3.0


@dataclass
class WebhookOptions:
    enabled: bool = False
    addr: str = "0.0.0.0"
    port: int = 9443
    cert_dir: str | None = None  # tls.crt + tls.key; None: kopf's self-signed certificate
    host: str | None = None  # the self-signed certificate's hostname
    native_sidecars: str = "auto"  # auto | true | false
    on_error: str = "allow"  # a bug in the webhook: allow the pod without the sidecar, or deny it
    validate_on_error: str = "allow"  # a bug in the checks: allow the resource unchecked, or deny it
    injection: InjectionOptions = field(default_factory=InjectionOptions)
    managed_cert: CertOptions | None = None  # the operator makes the certificate in cert_dir (webhook_cert.py)


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `kubetoll operator` flags of the injection webhook."""
    g = p.add_argument_group("sidecar injection webhook")
    g.add_argument("--webhook", action="store_true", help="serve the sidecar-injection admission webhook (HTTPS)")
    g.add_argument("--webhook-addr", default="0.0.0.0", metavar="ADDR", help="listen address (default: 0.0.0.0)")
    g.add_argument("--webhook-port", type=int, default=9443, metavar="PORT", help="listen port (default: 9443)")
    g.add_argument(
        "--webhook-cert-dir",
        metavar="DIR",
        help=(
            "directory with tls.crt and tls.key, re-read when they change "
            "(default: a self-signed certificate, needs certbuilder)"
        ),
    )
    g.add_argument("--webhook-host", metavar="HOST", help="hostname for the self-signed certificate")
    g.add_argument(
        "--webhook-cert-secret",
        metavar="NAME",
        help=(
            "the operator makes and keeps the certificate itself: a CA and a serving certificate in this Secret "
            "(in the --webhook-service namespace), written to --webhook-cert-dir, the CA patched into the "
            "--webhook-configuration objects before the webhook listens"
        ),
    )
    g.add_argument(
        "--webhook-service",
        metavar="NAME.NAMESPACE",
        help="with --webhook-cert-secret: the webhook's Service, whose DNS names the certificate carries",
    )
    g.add_argument(
        "--webhook-configuration",
        action="append",
        default=[],
        metavar="mutating/NAME|validating/NAME",
        help="with --webhook-cert-secret: a webhook configuration whose caBundle the operator sets (repeatable)",
    )
    g.add_argument(
        "--webhook-exclude-namespace",
        action="append",
        default=[],
        metavar="NS",
        help=f"never inject pods in this namespace (repeatable; always: {', '.join(sorted(ALWAYS_EXCLUDED))})",
    )
    g.add_argument(
        "--webhook-on-error",
        choices=("allow", "deny"),
        default="allow",
        help=(
            "when the webhook itself fails on a pod: allow it without the sidecar "
            "(as failurePolicy Ignore does for an unreachable webhook) or deny it (as Fail does); default: allow"
        ),
    )
    g.add_argument(
        "--validate-on-error",
        choices=("allow", "deny"),
        default="allow",
        help=(
            "when validating a Kubetoll resource fails inside the webhook: allow it unchecked, with a warning "
            "(the compiler still checks it), or deny it; default: allow"
        ),
    )
    g.add_argument(
        "--native-sidecars",
        choices=("auto", "true", "false"),
        default="auto",
        help=(
            "inject the sidecar as a native sidecar (init container, restartPolicy Always); "
            "auto: when the API server is 1.29 or later"
        ),
    )
    g.add_argument(
        "--sidecar-image",
        default=os.environ.get("KUBETOLL_SIDECAR_IMAGE", DEFAULT_SIDECAR_IMAGE),
        metavar="IMAGE",
        help=f"sidecar image (default: env KUBETOLL_SIDECAR_IMAGE, else {DEFAULT_SIDECAR_IMAGE})",
    )
    g.add_argument("--sidecar-image-pull-policy", choices=("Always", "IfNotPresent", "Never"), default="IfNotPresent")
    g.add_argument(
        "--sidecar-port", type=int, default=7400, metavar="PORT", help="sidecar API port on 127.0.0.1 (default: 7400)"
    )
    g.add_argument(
        "--sidecar-metrics-port",
        type=int,
        default=7401,
        metavar="PORT",
        help="sidecar metrics and probes port (default: 7401)",
    )
    defaults = Resources()
    g.add_argument(
        "--sidecar-cpu",
        default=defaults.cpu_request,
        metavar="QTY",
        help=f"CPU request (default: {defaults.cpu_request}; empty: none)",
    )
    g.add_argument(
        "--sidecar-memory",
        default=defaults.memory_request,
        metavar="QTY",
        help=f"memory request (default: {defaults.memory_request}; empty: none)",
    )
    g.add_argument(
        "--sidecar-cpu-limit", default=defaults.cpu_limit or "", metavar="QTY", help="CPU limit (default: none)"
    )
    g.add_argument(
        "--sidecar-memory-limit",
        default=defaults.memory_limit,
        metavar="QTY",
        help=f"memory limit (default: {defaults.memory_limit}; empty: none)",
    )
    g.add_argument("--sidecar-log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")


def options_from_args(args: argparse.Namespace) -> WebhookOptions | None:
    if not args.webhook:
        return None
    from .injection import parse_quantity

    for flag in ("sidecar_cpu", "sidecar_memory", "sidecar_cpu_limit", "sidecar_memory_limit"):
        value = getattr(args, flag)
        if value:
            try:
                parse_quantity(value)
            except ValueError as exc:
                raise SystemExit(f"kubetoll operator: --{flag.replace('_', '-')}: {exc}") from None
    if args.sidecar_port == args.sidecar_metrics_port:
        raise SystemExit("kubetoll operator: --sidecar-port and --sidecar-metrics-port must differ")
    managed: CertOptions | None = None
    if args.webhook_cert_secret:
        if not args.webhook_cert_dir or not args.webhook_service or not args.webhook_configuration:
            raise SystemExit(
                "kubetoll operator: --webhook-cert-secret needs --webhook-cert-dir, --webhook-service "
                "and at least one --webhook-configuration"
            )
        try:
            service, namespace = parse_service(args.webhook_service)
            configurations = tuple(parse_configuration(c) for c in args.webhook_configuration)
        except ValueError as exc:
            raise SystemExit(f"kubetoll operator: {exc}") from None
        managed = CertOptions(
            secret=args.webhook_cert_secret,
            service=service,
            namespace=namespace,
            configurations=configurations,
            cert_dir=args.webhook_cert_dir,
            cluster_domain=getattr(args, "cluster_domain", None) or "cluster.local",
        )
    elif args.webhook_cert_dir:
        for name in ("tls.crt", "tls.key"):
            if not (Path(args.webhook_cert_dir) / name).is_file():
                raise SystemExit(f"kubetoll operator: --webhook-cert-dir {args.webhook_cert_dir} has no {name}")
    injection = InjectionOptions(
        image=args.sidecar_image,
        image_pull_policy=args.sidecar_image_pull_policy,
        port=args.sidecar_port,
        metrics_port=args.sidecar_metrics_port,
        resources=Resources(
            cpu_request=args.sidecar_cpu or None,
            memory_request=args.sidecar_memory or None,
            cpu_limit=args.sidecar_cpu_limit or None,
            memory_limit=args.sidecar_memory_limit or None,
        ),
        log_level=args.sidecar_log_level,
        excluded_namespaces=frozenset(ALWAYS_EXCLUDED | set(args.webhook_exclude_namespace)),
    )
    return WebhookOptions(
        enabled=True,
        addr=args.webhook_addr,
        port=args.webhook_port,
        cert_dir=args.webhook_cert_dir,
        host=args.webhook_host,
        native_sidecars=args.native_sidecars,
        on_error=args.webhook_on_error,
        validate_on_error=args.validate_on_error,
        injection=injection,
        managed_cert=managed,
    )


# --------------------------------------------------------------------------- state


class InjectorState:
    """Per operator process: the options, cached namespace labels and the native-sidecar answer."""

    def __init__(self, options: WebhookOptions) -> None:
        self.options = options
        self._namespaces: dict[str, tuple[float, dict[str, str]]] = {}
        self._native: bool | None = {"true": True, "false": False}.get(options.native_sidecars)
        self._native_retry_at = 0.0
        self._lock = asyncio.Lock()
        self.injected = 0
        self.skipped = 0

    async def native_sidecars(self, api: Any) -> bool:
        if self._native is not None:
            return self._native
        if time.monotonic() < self._native_retry_at:
            return False
        async with self._lock:
            if self._native is not None:
                return self._native
            try:
                version = await asyncio.wait_for(api.get("/version"), API_TIMEOUT_SECONDS)
                self._native = native_sidecars_supported(version or {})
                log.info(
                    "API server %s: injecting the sidecar as a %s",
                    (version or {}).get("gitVersion", "?"),
                    "native sidecar (init container, restartPolicy Always)"
                    if self._native
                    else "plain container (native sidecars need 1.29)",
                )
                return self._native
            except Exception as exc:
                self._native_retry_at = time.monotonic() + VERSION_RETRY_SECONDS
                log.warning(
                    "cannot read the API server version (%s); injecting plain containers, retrying in %.0fs",
                    exc,
                    VERSION_RETRY_SECONDS,
                )
                return False

    async def namespace_labels(self, api: Any, namespace: str, *, matched_by_namespace: bool) -> dict[str, str]:
        now = time.monotonic()
        cached = self._namespaces.get(namespace)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            if api is None:
                raise RuntimeError("not logged in to the API yet")
            obj = await asyncio.wait_for(api.get(f"/api/v1/namespaces/{namespace}"), API_TIMEOUT_SECONDS)
        except Exception as exc:
            # What the API server's namespaceSelector matched stands in for the labels.
            fallback = {NAMESPACE_LABEL: "enabled"} if matched_by_namespace else {}
            log.warning(
                "cannot read namespace %s (%s); going by the webhook that was called: %s",
                namespace,
                exc,
                fallback or "no namespace label",
            )
            return fallback
        labels = dict(((obj or {}).get("metadata") or {}).get("labels") or {})
        self._namespaces[namespace] = (now + NAMESPACE_CACHE_SECONDS, labels)
        return labels


def _state(memo: Any) -> InjectorState | None:
    return getattr(memo, "injector", None)


def _webhook_options(memo: Any) -> WebhookOptions | None:
    options = getattr(memo, "options", None)
    webhook = getattr(options, "webhook", None)
    return webhook if isinstance(webhook, WebhookOptions) and webhook.enabled else None


# --------------------------------------------------------------------------- kopf server


class InjectionWebhookServer:
    """kopf's WebhookServer, with the validating path answered here and the injection paths passed to kopf.

    Every body must be an AdmissionReview (else HTTP 400 naming what is missing);
    on the injection paths each request's namespace is copied into the pod when
    the object lacks it. An async context manager like kopf's own, so kopf
    closes the server on exit.
    """

    def __init__(
        self,
        inner: Any,
        *,
        validate_on_error: str = "allow",
        managed_cert: CertOptions | None = None,
        get_api: Any = None,
    ) -> None:
        self.inner = inner
        self.validate_on_error = validate_on_error
        self.managed_cert = managed_cert
        self.get_api = get_api  # () -> KubeApi: the operator's client, logged in by the time kopf serves

    async def __aenter__(self) -> InjectionWebhookServer:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        return await self.inner.__aexit__(*exc)

    def validate(self, review: Any) -> dict[str, Any]:
        """The answer of `/validate-resources`; a review it cannot read is HTTP 400."""
        from aiohttp import web

        from .metrics import record_admission

        try:
            response, decision = validation.answer(review)
        except validation.MalformedReview as exc:
            raise web.HTTPBadRequest(text=f"kubetoll: not an AdmissionReview it can answer: {exc}\n") from None
        except Exception as exc:  # a bug in the checks: answer as the failure policy answers an unreachable webhook
            request = review["request"]  # review_request has passed, so the shape is known
            log.exception("validating %s failed", request.get("kind"))
            message = f"kubetoll: the resource was not validated: the webhook failed ({type(exc).__name__}: {exc})"
            body: dict[str, Any] = {"uid": request["uid"], "allowed": self.validate_on_error != "deny"}
            record_admission("validate", body["allowed"], error=True)
            if body["allowed"]:
                body["warnings"] = [validation.fit_warnings([message + "; see the operator's log"])[0]]
            else:
                body["status"] = {"code": 500, "status": "Failure", "message": message}
            return {
                "apiVersion": review.get("apiVersion", "admission.k8s.io/v1"),
                "kind": "AdmissionReview",
                "response": body,
            }
        record_admission("validate", decision.allowed)
        if decision.checked:
            level = logging.INFO if decision.allowed else logging.WARNING
            log.log(
                level,
                "%s %s/%s: %s%s",
                decision.kind,
                decision.namespace,
                decision.name,
                "allowed" if decision.allowed else "refused: ",
                "; ".join(f"{p.field}: {p.message}" for p in decision.errors),
            )
        return response

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async def with_namespace(request: Any, **kwargs: Any) -> Any:
            if kwargs.get("webhook") == VALIDATE_WEBHOOK_ID:
                return self.validate(request)
            try:
                validation.review_request(request)
            except validation.MalformedReview as exc:
                from aiohttp import web

                raise web.HTTPBadRequest(text=f"kubetoll: not an AdmissionReview it can answer: {exc}\n") from None
            payload = request.get("request")
            if isinstance(payload, dict) and isinstance(payload.get("object"), dict):
                request = {**request, "request": {**payload, "object": pod_from_request(payload)}}
            return await fn(request, **kwargs)

        renewing: asyncio.Task[None] | None = None
        if self.managed_cert is not None:
            # Before kopf's server reads the files and listens: readiness (the webhook port) waits for this.
            await bootstrap_until_done(self.get_api, self.managed_cert)
            renewing = asyncio.create_task(keep_renewed(self.get_api, self.managed_cert), name="webhook cert renewal")
        try:
            async for client_config in self.inner(with_namespace):
                yield client_config
        finally:
            if renewing is not None:
                renewing.cancel()


class _NoWebhookServer:
    """Stands in while the webhook is off: kopf refuses to start with admission handlers and no server."""

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield  # pragma: no cover - never reached; makes this an async generator


def build_server(options: WebhookOptions, get_api: Any = None) -> InjectionWebhookServer:
    """kopf's server for `options`; `get_api` (the operator's client) is needed with `options.managed_cert`."""
    import kopf

    kwargs: dict[str, Any] = {"addr": options.addr, "port": options.port}
    managed = options.managed_cert
    cert_dir = managed.cert_dir if managed is not None else options.cert_dir
    if cert_dir:
        kwargs["certfile"] = str(Path(cert_dir) / "tls.crt")
        kwargs["pkeyfile"] = str(Path(cert_dir) / "tls.key")
        ca = Path(cert_dir) / "ca.crt"
        if ca.is_file() or managed is not None:  # managed: written before kopf's server reads it
            kwargs["cafile"] = str(ca)
        kwargs["file_check_interval"] = 30.0
    elif options.host:
        kwargs["host"] = options.host
    return InjectionWebhookServer(
        kopf.WebhookServer(**kwargs),
        validate_on_error=options.validate_on_error,
        managed_cert=options.managed_cert,
        get_api=get_api,
    )


# --------------------------------------------------------------------------- kopf handlers


def _apply_ops(ops: list[dict[str, Any]], body: dict[str, Any]) -> None:
    import jsonpatch

    jsonpatch.apply_patch(body, ops, in_place=True)


def register(registry: Any) -> None:
    """Add the webhook's start-up and admission handlers to the operator's registry."""
    import kopf

    @kopf.on.startup(id="kubetoll-webhook-server", registry=registry)
    def _configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        options = _webhook_options(memo)
        settings.admission.managed = None  # the chart ships the MutatingWebhookConfiguration
        if options is None:
            settings.admission.server = _NoWebhookServer()
            return
        memo.injector = InjectorState(options)

        def operator_api() -> Any:
            from .handlers import _reconciler  # the operator's API client, logged in by kopf

            return _reconciler(memo).api

        settings.admission.server = build_server(options, get_api=operator_api)
        log.info(
            "admission webhooks on https://%s:%d/{%s,%s,%s} (certificate: %s; native sidecars: %s)",
            options.addr,
            options.port,
            WEBHOOK_ID,
            NAMESPACE_WEBHOOK_ID,
            VALIDATE_WEBHOOK_ID,
            ("made by the operator in Secret " + options.managed_cert.secret)
            if options.managed_cert
            else options.cert_dir or "self-signed",
            options.native_sidecars,
        )

    # Keyword-only, as kopf calls handlers, to match kopf.WebhookFn. `param` is "pod" or
    # "namespace", as registered below; kopf always passes it (its protocol gives it a default).
    async def inject(*, body: Any, patch: Any, warnings: list[str], memo: Any, param: Any = None, **_: Any) -> None:
        state = _state(memo)
        if state is None:
            return
        from .handlers import _reconciler  # the operator's API client, logged in by kopf
        from .metrics import record_admission

        api = _reconciler(memo).api
        pod = copy.deepcopy(dict(body))
        meta = pod.get("metadata") or {}
        namespace = meta.get("namespace") or ""
        who = f"{namespace}/{meta.get('name') or (meta.get('generateName') or '') + '*'}"
        labels = await state.namespace_labels(api, namespace, matched_by_namespace=param == "namespace")
        native = await state.native_sidecars(api) if api is not None else False
        options = replace(state.options.injection, native_sidecars=native)
        try:
            plan = plan_injection(pod, labels, options)
        except InjectionError as exc:
            log.warning("pod %s: denied: %s", who, exc)
            record_admission("mutate", False)
            raise kopf.AdmissionError(f"kubetoll sidecar injection: {exc}", code=400) from None
        except Exception as exc:  # a bug: answer as the failure policy would for an unreachable webhook
            log.exception("pod %s: injection failed", who)
            record_admission("mutate", state.options.on_error != "deny", error=True)
            if state.options.on_error == "deny":
                raise kopf.AdmissionError(
                    f"kubetoll sidecar injection failed: {type(exc).__name__}: {exc}", code=500
                ) from None
            warnings.append(
                f"kubetoll: {SIDECAR_NAME} not injected: the webhook failed ({type(exc).__name__}); "
                "see the operator's log"
            )
            return
        warnings.extend(plan.warnings)
        record_admission("mutate", True)
        if plan.ops:
            state.injected += 1
            patch.fns.append(functools.partial(_apply_ops, plan.ops))
            log.info(
                "pod %s: injected the sidecar as a %s (%s)",
                who,
                "native sidecar" if plan.native else "container",
                plan.reason,
            )
        else:
            state.skipped += 1
            log.debug("pod %s: not injected: %s", who, plan.reason)

    for handler_id, param in ((WEBHOOK_ID, "pod"), (NAMESPACE_WEBHOOK_ID, "namespace")):
        kopf.on.mutate(
            "v1",
            "pods",
            id=handler_id,
            param=param,
            operations=["CREATE"],
            side_effects=False,
            ignore_failures=True,
            registry=registry,
        )(inject)

    @kopf.on.probe(id="injections", registry=registry)
    def _probe(memo: Any, **_: Any) -> dict[str, Any] | None:
        state = _state(memo)
        return None if state is None else {"injected": state.injected, "skipped": state.skipped}


__all__ = [
    "NAMESPACE_WEBHOOK_ID",
    "VALIDATE_WEBHOOK_ID",
    "WEBHOOK_ID",
    "InjectionWebhookServer",
    "InjectorState",
    "WebhookOptions",
    "add_arguments",
    "build_server",
    "options_from_args",
    "register",
]
