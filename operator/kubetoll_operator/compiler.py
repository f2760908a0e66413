"""compile_namespace: a namespace's custom resources → one RouterConfig.

A pure function: plain dicts in (the objects as the API server or a YAML file
has them), a `CompileResult` out. The operator, `kubetoll validate`, `compile`
and `run` all call it, so a cluster and a laptop get the same answer.

A broken resource never breaks the namespace. The rules, in order:

* A resource whose spec does not parse, whose name the router cannot use, or
  whose Secret is missing (when secrets are given) is left out: it gets an
  error problem and Ready=False.
* Last known good: when a resource that was in force (it is in `last_good`)
  is updated to a version that does not compile, its last good version is
  compiled in its place. It stays in force with Ready=False, reason
  `InvalidUpdate`, and the new version's problems. An edit never drops a budget
  or a route.
* A route drops each backend reference that does not resolve (a warning, and
  ResolvedRefs=False). A rule left with no backend is skipped (a warning): the
  route and the budgets on it stay in force for its other rules. The route is
  left out only when no rule keeps a backend. Downgrade backends that do not
  resolve are dropped; with none left, the downgrade is dropped. The same for a
  cascade step (CascadeStepDropped; no step left: CascadeDropped, the requests go
  to the chain it escalates to) and an experiment arm (ArmDropped: the other arms
  take its share; no arm of weight above 0 left: RuleSkipped).
* A budget drops routes that do not resolve. When none of the routes it names
  resolve, the budget is left out: an empty list would mean "every route" and
  widen it.
* Fail closed: a TokenBudget left out for any other reason (and with no last
  good version) becomes an `unavailableBudgets` entry, and the sidecar answers
  503 `budget_unavailable` on every route it names (every route when it names
  none, or when its routes cannot be read). A route a budget names is never
  served without it.
* Tenancy comes from the budgets that set `spec.tenant`, in name order: the
  first one wins; a later one that differs gets a TenancyConflict warning and
  its tenant spec is ignored (its limits still apply).
* Tenant tiers (`spec.tenantTiers`, or a ConfigMap key named by
  `spec.tenantTiersFrom`) are merged from every budget into
  `tenancy.tenantTiers` (tenant_tiers.py). A ConfigMap or key that is missing or
  does not read contributes nothing (a warning; no tenant is lifted); a tenant
  two budgets assign different tiers gets the lower by `tierOrder`, else the
  first budget's (a TenantTierConflict warning on the later one). Once any
  budget assigns tiers, `tierHeaderPolicy` defaults to `capped`.
* A CachePolicy whose embedding backend does not resolve (or is an anthropic
  backend, which has no embeddings API) is left out; so is one whose
  `semantic.verifier.backend` does not resolve (or, for a rerank verifier, is not
  openai-compatible: the hosted providers have no rerank API). A route naming a missing or
  left-out CachePolicy drops the reference (warning).
* A context policy whose `summarizer` is not a ready ModelBackend (SummarizerNotFound,
  a warning) or is a CachePolicy's embedding or rerank backend (SummarizerNotChat) is
  compiled as `overflow: dropOldest`.
* Two routes with the same modelName: the later by resource name is left out.

The JSON is canonical (sorted keys, compact, no nulls) and `content_hash` is the
sha256 of exactly those bytes, so the sidecar can hash the file it read and
compare with the ConfigMap's `kubetoll.dev/config-hash` annotation.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from kubetoll_core.enums import ContextOverflow, TierHeaderPolicy, VerifierKind
from kubetoll_core.jwt_settings import HS256_SECRET_FILE
from kubetoll_core.names import NAME_PATTERN, ROUTE_NAME_PATTERN
from kubetoll_core.parts import MAX_TENANT_TIERS, Cascade, ContextPolicy, Rule, Tenancy
from kubetoll_core.price_catalog import with_catalog_prices
from kubetoll_core.prices import PricingError, resolve_price
from kubetoll_core.router_config import (
    Backend,
    Budget,
    BudgetStoreSettings,
    CachePolicy,
    Route,
    RouterConfig,
    ServerSettings,
    TelemetrySettings,
)

from .endpoint_slices import replicas_of, slices_among
from .jwt_keys import check_public_keys
from .resources import (
    API_VERSION,
    GROUP,
    KINDS,
    CachePolicySpec,
    JwtSpec,
    ModelBackendSpec,
    ModelRouteSpec,
    Provider,
    TokenBudgetSpec,
)
from .tenant_tiers import TenantTiersError, config_maps_among, merge_tenant_tiers, parse_tenant_tiers

CredentialMode = Literal["file", "env"]
Severity = Literal["error", "warning"]

ENV_PREFIX = "KUBETOLL_SECRET_"

CREDENTIALS_KEY_SEPARATOR = "_"  # cannot occur in a Secret name, so "<secret>_<key>" is unambiguous
MAX_SECRET_KEY_LENGTH = 253


@dataclass(frozen=True)
class Problem:
    """Something wrong with one resource. `field` is a path such as spec.rules[0].backends[1]."""

    kind: str
    name: str
    reason: str
    message: str
    field: str = ""
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.kind}/{self.name}: {where}{self.message} ({self.reason})"


@dataclass
class Outcome:
    """What became of one resource: in the config or not, and what its status should show."""

    kind: str
    name: str
    generation: int | None
    included: bool = True
    reason: str = "Compiled"
    message: str = ""
    refs_ok: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    # Set when the current version did not compile and its last good version
    # (this generation) is what is in force.
    serving_generation: int | None = None


#: Problems about references to other resources. `check_resource` reports them as
#: warnings: an object may be applied before the objects it names.
REFERENCE_REASONS = frozenset(
    {
        "BackendNotFound",
        "BackendNotReady",
        "RouteNotFound",
        "RouteNotReady",
        "CachePolicyNotFound",
        "CachePolicyNotReady",
        "RuleSkipped",
        "NoBackends",
        "NoRoutes",
        "DowngradeDropped",
        "SummarizerNotFound",
        "SecretNotFound",
        "SecretKeyNotFound",
        "ConfigMapNotFound",
        "ConfigMapKeyNotFound",
        "InvalidPublicKeys",  # spec.tenant.jwt.publicKeysFrom resolves to text that holds no usable keys
    }
)

INVALID_UPDATE = "InvalidUpdate"

ObjectKey = tuple[str, str]  # (kind, name)


@dataclass(frozen=True)
class CompileResult:
    config: RouterConfig | None
    config_json: str
    content_hash: str
    problems: list[Problem]
    # key in kubetoll-credentials (file mode) or env var name (env mode) → (Secret name, key)
    credentials: dict[str, tuple[str, str]]
    outcomes: dict[tuple[str, str], Outcome]
    # The object versions in force, (kind, name) → {apiVersion, kind, metadata, spec}:
    # the operator keeps them as the next compile's `last_good`.
    in_force: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.config is not None and not any(p.severity == "error" for p in self.problems)

    def problems_for(self, kind: str, name: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind and p.name == name]


def credential_file_key(secret: str, key: str) -> str:
    """The key in `kubetoll-credentials` (and file name in the sidecar) for one Secret key."""
    return f"{secret}{CREDENTIALS_KEY_SEPARATOR}{key}"


def credential_env_name(secret: str, key: str) -> str:
    """The environment variable `kubetoll run` reads a Secret key from."""
    return ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", f"{secret}_{key}".upper())


def service_endpoint(namespace: str, name: str, port: int, scheme: str, path: str, cluster_domain: str) -> str:
    return f"{scheme}://{name}.{namespace}.svc.{cluster_domain}:{port}{path}".rstrip("/")


def _loc(prefix: str, loc: Iterable[Any]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _pydantic_problems(kind: str, name: str, exc: ValidationError, prefix: str, reason: str) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        msg = err["msg"]
        where = _loc(prefix, err["loc"])
        if not msg.startswith("Value error, "):
            problems.append(Problem(kind, name, reason, msg, where))
            continue
        # Cross-field rules report "field: message; field: message" (see SpecModel).
        for part in msg[len("Value error, ") :].split("; "):
            m = re.match(r"^([A-Za-z][A-Za-z0-9.]*): (.*)$", part)
            if m:
                problems.append(
                    Problem(kind, name, reason, m.group(2), f"{where}.{m.group(1)}" if where else m.group(1))
                )
            else:
                problems.append(Problem(kind, name, reason, part, where))
    return problems


def canonical_json(config: RouterConfig) -> str:
    data = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    if not data.get("unavailableBudgets"):
        # Absent rather than empty, so a namespace without one keeps the hash it had before the field existed.
        data.pop("unavailableBudgets", None)
    if config.telemetry == TelemetrySettings():
        data.pop("telemetry", None)  # the operator writes none (traces off): the same hash as before the field
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class _Compilation:
    def __init__(
        self,
        namespace: str,
        credential_mode: CredentialMode,
        secrets: Mapping[str, Mapping[str, Any]] | None,
        cluster_domain: str,
        check_only: bool = False,
        config_maps: Mapping[str, Mapping[str, str]] | None = None,
        endpoint_slices: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        # The EndpointSlices of the Services ModelBackends reference: their ready replicas (endpoint_slices.py).
        self.endpoint_slices = endpoint_slices
        # check_only: one object on its own (admission, `kubetoll validate` of a file):
        # references to other objects are reported but kept, so every check of the
        # object itself still runs.
        self.check_only = check_only
        # ConfigMap name → data, for `tenantTiersFrom` (the operator's reads, or the manifests given).
        self.config_maps: Mapping[str, Mapping[str, str]] = config_maps or {}
        self.namespace = namespace
        self.credential_mode = credential_mode
        self.secrets = secrets
        self.cluster_domain = cluster_domain
        self.problems: list[Problem] = []
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        self.credentials: dict[str, tuple[str, str]] = {}
        self.objects: dict[ObjectKey, Mapping[str, Any]] = {}

    # ----------------------------------------------------------------- helpers

    def problem(
        self, kind: str, name: str, reason: str, message: str, field: str = "", severity: Severity = "error"
    ) -> None:
        self.problems.append(Problem(kind, name, reason, message, field, severity))
        outcome = self.outcomes.get((kind, name))
        if outcome is None:
            return
        if severity == "error":
            if outcome.included:
                outcome.included = False
                outcome.reason = reason
                outcome.message = f"{field}: {message}" if field else message
        elif reason.endswith("NotFound") or reason.endswith("NotReady") or reason == "Unsupported":
            outcome.refs_ok = False

    def leave_out(self, kind: str, name: str, reason: str, message: str, field: str = "") -> None:
        self.problem(kind, name, reason, message, field, "error")

    # ----------------------------------------------------------------- parse

    def parse(self, resources: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """kind → name → parsed spec model, for the resources that parse."""
        parsed: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        for obj in resources:
            api_version = str(obj.get("apiVersion", ""))
            kind = str(obj.get("kind", ""))
            if api_version.split("/", 1)[0] != GROUP:
                continue  # Secrets, Services, ...: not ours
            meta = obj.get("metadata") or {}
            name = str(meta.get("name") or "")
            if kind not in KINDS:
                self.problems.append(
                    Problem(
                        kind or "<no kind>",
                        name or "<unnamed>",
                        "UnknownKind",
                        f"{api_version} has no kind {kind!r}",
                        "kind",
                    )
                )
                continue
            if not name:
                self.problems.append(
                    Problem(kind, "<unnamed>", "InvalidMetadata", "metadata.name is required", "metadata.name")
                )
                continue
            if (kind, name) in self.outcomes:
                self.problems.append(
                    Problem(
                        kind,
                        name,
                        "Duplicate",
                        f"a second {kind} named {name!r}; the first one is used",
                        "metadata.name",
                    )
                )
                continue
            generation = meta.get("generation")
            self.outcomes[(kind, name)] = Outcome(kind, name, generation if isinstance(generation, int) else None)
            self.objects[(kind, name)] = obj
            if api_version != API_VERSION:
                self.leave_out(
                    kind,
                    name,
                    "UnsupportedVersion",
                    f"apiVersion {api_version!r} is not served; use {API_VERSION}",
                    "apiVersion",
                )
                continue
            spec = obj.get("spec")
            if not isinstance(spec, Mapping):
                self.leave_out(kind, name, "InvalidSpec", "spec is required and must be an object", "spec")
                continue
            try:
                model = KINDS[kind].spec_model.model_validate(spec)
            except ValidationError as exc:
                for p in _pydantic_problems(kind, name, exc, "spec", "InvalidSpec"):
                    self.leave_out(p.kind, p.name, p.reason, p.message, p.field)
                continue
            parsed[kind][name] = model
        return parsed

    # ----------------------------------------------------------------- backends

    def backends(self, specs: dict[str, ModelBackendSpec]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        env_owner: dict[str, tuple[str, str]] = {}
        for name in sorted(specs):
            spec = specs[name]
            kind = "ModelBackend"
            if not re.match(NAME_PATTERN, name):
                self.leave_out(
                    kind,
                    name,
                    "InvalidName",
                    "name must be at most 63 characters of a-z, 0-9, '.', '-' (it names the backend in metrics)",
                    "metadata.name",
                )
                continue
            replicas: list[dict[str, str]] = []
            if spec.endpoint is not None:
                endpoint = spec.endpoint
            else:
                ref = spec.service_ref
                assert ref is not None  # the model guarantees one of the two
                endpoint = service_endpoint(
                    self.namespace, ref.name, ref.port, ref.scheme.value, ref.path, self.cluster_domain
                )
                replicas = replicas_of(
                    ref.name, ref.port, ref.port_name, ref.scheme.value, ref.path, self.endpoint_slices
                )
            data: dict[str, Any] = {
                "name": name,
                "provider": spec.provider.value,
                "model": spec.model,
                "endpoint": endpoint,
                "headers": dict(spec.headers),
                "pricing": spec.pricing.model_dump(by_alias=True, exclude_none=True),
                "limits": spec.limits.model_dump(by_alias=True, exclude_none=True),
                "timeouts": spec.timeouts.model_dump(by_alias=True),
                "circuitBreaker": spec.circuit_breaker.model_dump(by_alias=True),
                "maxConnections": spec.max_connections,
            }
            if spec.service_ref is not None and replicas:
                data["replicas"] = replicas
            if spec.load_metrics is not None:
                data["loadMetrics"] = spec.load_metrics.model_dump(mode="json", by_alias=True)
                if spec.service_ref is None:
                    self.problem(
                        kind,
                        name,
                        "LoadMetricsIgnored",
                        "loadMetrics is read from the replicas of a serviceRef's Service; an endpoint URL has none, "
                        "so it is not read",
                        "spec.loadMetrics",
                        "warning",
                    )
            if spec.azure is not None:
                data["azure"] = spec.azure.model_dump(by_alias=True)
            if spec.credentials is not None:
                secret, key = spec.credentials.secret_ref.name, spec.credentials.secret_ref.key
                field_path = "spec.credentials.secretRef"
                if self.secrets is not None:
                    if secret not in self.secrets:
                        self.leave_out(
                            kind,
                            name,
                            "SecretNotFound",
                            f"Secret {secret!r} not found in namespace {self.namespace!r}",
                            field_path + ".name",
                        )
                        continue
                    if key not in self.secrets[secret]:
                        self.leave_out(
                            kind,
                            name,
                            "SecretKeyNotFound",
                            f"Secret {secret!r} has no key {key!r}",
                            field_path + ".key",
                        )
                        continue
                if self.credential_mode == "file":
                    cred_key = credential_file_key(secret, key)
                    if len(cred_key) > MAX_SECRET_KEY_LENGTH:
                        self.leave_out(
                            kind,
                            name,
                            "InvalidSecretRef",
                            f"Secret name plus key is longer than {MAX_SECRET_KEY_LENGTH - 1} characters",
                            field_path,
                        )
                        continue
                    data["credentials"] = {"file": cred_key}
                else:
                    cred_key = credential_env_name(secret, key)
                    owner = env_owner.setdefault(cred_key, (secret, key))
                    if owner != (secret, key):
                        self.leave_out(
                            kind,
                            name,
                            "CredentialConflict",
                            f"Secret {secret!r} key {key!r} maps to the same environment variable {cred_key} "
                            f"as Secret {owner[0]!r} key {owner[1]!r}",
                            field_path,
                        )
                        continue
                    data["credentials"] = {"env": cred_key}
                self.credentials[cred_key] = (secret, key)
            try:
                backend = Backend.model_validate(data)
            except ValidationError as exc:
                for p in _pydantic_problems(kind, name, exc, "spec", "InvalidSpec"):
                    self.leave_out(kind, name, p.reason, p.message, p.field)
                continue
            # The sidecar refuses a whole config with a backend it cannot price,
            # so such a backend is left out here rather than break the namespace.
            # Catalogue prices are looked up here and written into the config: the
            # sidecar carries no catalogue (kubetoll_core/price_catalog.py).
            try:
                backend = with_catalog_prices(backend)
                price = resolve_price(backend)
            except PricingError as exc:
                self.leave_out(kind, name, "PriceUnknown", str(exc).removeprefix(f"backend {name}: "), "spec.pricing")
                continue
            out[name] = backend.model_dump(mode="json", by_alias=True, exclude_none=True)
            prices: dict[str, Any] = {"source": price.source, **price.per_mtok()}
            if price.tiers:
                prices["note"] = "prompt-size tiers apply: " + ", ".join(
                    f"over {start} input tokens: input ${r.input * 1e6:g}, output ${r.output * 1e6:g} per MTok"
                    for start, r in price.tiers
                )
            self.outcomes[(kind, name)].details = {"endpoint": endpoint, "prices": prices}
            if replicas:
                self.outcomes[(kind, name)].details["replicas"] = len(replicas)
        # A credential only a left-out backend used is not needed.
        used = {b["credentials"].get("file") or b["credentials"].get("env") for b in out.values() if "credentials" in b}
        self.credentials = {k: v for k, v in self.credentials.items() if k in used}
        return out

    # ----------------------------------------------------------------- cache policies

    def cache_policies(
        self, specs: dict[str, CachePolicySpec], backends: dict[str, dict[str, Any]], all_backends: set[str]
    ) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        kind = "CachePolicy"
        for name in sorted(specs):
            spec = specs[name]
            if not re.match(NAME_PATTERN, name):
                self.leave_out(
                    kind,
                    name,
                    "InvalidName",
                    "name must be at most 63 characters of a-z, 0-9, '.', '-'",
                    "metadata.name",
                )
                continue
            ref = spec.semantic.embedding_backend
            field_path = "spec.semantic.embeddingBackend"
            if ref is not None and ref not in backends and self.check_only and ref not in all_backends:
                self.problem(
                    kind,
                    name,
                    "BackendNotFound",
                    f"ModelBackend {ref!r} is not in this check; it must exist when the policy is applied",
                    field_path,
                    "warning",
                )
            elif ref is not None and ref not in backends:
                reason = "BackendNotReady" if ref in all_backends else "BackendNotFound"
                what = "is not ready" if ref in all_backends else "not found"
                self.leave_out(kind, name, reason, f"ModelBackend {ref!r} {what}", field_path)
                continue
            if ref is not None and ref in backends and backends[ref]["provider"] == Provider.anthropic.value:
                self.leave_out(
                    kind,
                    name,
                    "Unsupported",
                    f"ModelBackend {ref!r} is an anthropic backend, which serves no /v1/embeddings",
                    field_path,
                )
                continue
            # The verifier's backend, as strictly as the embedding one: a policy that could only miss is left out.
            verifier = spec.semantic.verifier
            vref = verifier.backend if verifier is not None else None
            field_path = "spec.semantic.verifier.backend"
            if vref is not None and vref not in backends and self.check_only and vref not in all_backends:
                self.problem(
                    kind,
                    name,
                    "BackendNotFound",
                    f"ModelBackend {vref!r} is not in this check; it must exist when the policy is applied",
                    field_path,
                    "warning",
                )
            elif vref is not None and vref not in backends:
                reason = "BackendNotReady" if vref in all_backends else "BackendNotFound"
                what = "is not ready" if vref in all_backends else "not found"
                self.leave_out(kind, name, reason, f"ModelBackend {vref!r} {what}", field_path)
                continue
            if (
                verifier is not None
                and vref in backends
                and verifier.kind is VerifierKind.rerank
                and backends[vref]["provider"] != Provider.openai_compatible.value
            ):
                self.leave_out(
                    kind,
                    name,
                    "Unsupported",
                    f"ModelBackend {vref!r} is a {backends[vref]['provider']} backend; a rerank verifier needs an "
                    "openai-compatible server with a /rerank or /score API (TEI, vLLM, Infinity)",
                    field_path,
                )
                continue
            data = {"name": name, **spec.model_dump(mode="json", by_alias=True, exclude_none=True)}
            try:
                policy = CachePolicy.model_validate(data)
            except ValidationError as exc:
                for p in _pydantic_problems(kind, name, exc, "spec", "InvalidSpec"):
                    self.leave_out(kind, name, p.reason, p.message, p.field)
                continue
            out[name] = policy.model_dump(mode="json", by_alias=True, exclude_none=True)
        return out

    # ----------------------------------------------------------------- routes

    def _resolve_backends(
        self, name: str, refs: list[str], field_prefix: str, backends: dict[str, dict[str, Any]], all_backends: set[str]
    ) -> list[str]:
        kept = []
        for j, ref in enumerate(refs):
            if ref in backends or (self.check_only and ref not in all_backends):
                if ref not in kept:
                    kept.append(ref)
                if ref in backends:
                    continue
                self.problem(
                    "ModelRoute",
                    name,
                    "BackendNotFound",
                    f"ModelBackend {ref!r} is not in this check; it must exist when the route is applied",
                    f"{field_prefix}[{j}]",
                    "warning",
                )
                continue
            if ref in all_backends:
                self.problem(
                    "ModelRoute",
                    name,
                    "BackendNotReady",
                    f"ModelBackend {ref!r} is not ready; dropped from the chain",
                    f"{field_prefix}[{j}]",
                    "warning",
                )
            else:
                self.problem(
                    "ModelRoute",
                    name,
                    "BackendNotFound",
                    f"ModelBackend {ref!r} not found; dropped from the chain",
                    f"{field_prefix}[{j}]",
                    "warning",
                )
        return kept

    def _cascade(
        self,
        name: str,
        cascade: Cascade | None,
        field_prefix: str,
        backends: dict[str, dict[str, Any]],
        all_backends: set[str],
    ) -> dict[str, Any] | None:
        """A cascade with its references resolved: a step keeping no backend is dropped, and so is a cascade
        keeping no step (its requests go to the chain it escalates to, as without one)."""
        if cascade is None:
            return None
        steps = []
        for k, step in enumerate(cascade.steps):
            where = f"{field_prefix}.steps[{k}].backends"
            kept = self._resolve_backends(name, step.backends, where, backends, all_backends)
            if kept:
                steps.append({"backends": kept})
            else:
                self.problem(
                    "ModelRoute",
                    name,
                    "CascadeStepDropped",
                    "no backend of this step resolves; it is dropped",
                    where,
                    "warning",
                )
        if not steps:
            self.problem(
                "ModelRoute",
                name,
                "CascadeDropped",
                "no cascade step keeps a backend; the cascade is dropped",
                field_prefix,
                "warning",
            )
            return None
        return {**cascade.model_dump(mode="json", by_alias=True, exclude_none=True), "steps": steps}

    def _rule(
        self, name: str, i: int, rule: Rule, backends: dict[str, dict[str, Any]], all_backends: set[str]
    ) -> dict[str, Any] | None:
        """One rule with its references resolved, or None when it keeps nothing to serve with (RuleSkipped)."""
        out: dict[str, Any] = {"name": rule.name, "match": rule.match.model_dump(by_alias=True, exclude_none=True)}
        prefix = f"spec.rules[{i}]"
        if rule.split is None:
            kept = self._resolve_backends(name, rule.backends, f"{prefix}.backends", backends, all_backends)
            if not kept:
                self.problem(
                    "ModelRoute",
                    name,
                    "RuleSkipped",
                    f"rule {rule.name or i!r} has no backend that resolves; it is skipped",
                    f"{prefix}.backends",
                    "warning",
                )
                return None
            out["backends"] = kept
            cascade = self._cascade(name, rule.cascade, f"{prefix}.cascade", backends, all_backends)
            if cascade is not None:
                out["cascade"] = cascade
            return out
        arms = []
        for j, arm in enumerate(rule.split.arms):
            where = f"{prefix}.split.arms[{j}]"
            kept = self._resolve_backends(name, arm.backends, f"{where}.backends", backends, all_backends)
            if not kept:
                # Its share goes to the other arms: the experiment goes on, its records say which arms ran.
                self.problem(
                    "ModelRoute",
                    name,
                    "ArmDropped",
                    f"arm {arm.name!r} of experiment {rule.split.experiment!r} has no backend that resolves; it is "
                    "dropped and the other arms take its share",
                    f"{where}.backends",
                    "warning",
                )
                continue
            compiled: dict[str, Any] = {"name": arm.name, "weight": arm.weight, "backends": kept}
            cascade = self._cascade(name, arm.cascade, f"{where}.cascade", backends, all_backends)
            if cascade is not None:
                compiled["cascade"] = cascade
            arms.append(compiled)
        if not any(a["weight"] > 0 for a in arms):
            self.problem(
                "ModelRoute",
                name,
                "RuleSkipped",
                f"rule {rule.name or i!r}: no arm of experiment {rule.split.experiment!r} with a weight above 0 keeps "
                "a backend; the rule is skipped",
                f"{prefix}.split.arms",
                "warning",
            )
            return None
        split = rule.split.model_dump(mode="json", by_alias=True, exclude_none=True)
        out["split"] = {**split, "arms": arms}
        return out

    def _context(
        self,
        name: str,
        context: ContextPolicy,
        backends: dict[str, dict[str, Any]],
        all_backends: set[str],
        policies: dict[str, dict[str, Any]],
    ) -> dict[str, Any]:
        """A context policy with its summarizer resolved. A summarizer that names no backend of the namespace,
        or one that serves no chat (a cache policy's embedding or rerank backend), cannot summarize: the policy
        is compiled as dropOldest (what the sidecar falls back to when a summary fails), with a Problem."""
        out = context.model_dump(mode="json", by_alias=True, exclude_none=True)
        ref = context.summarizer
        if ref is None:
            return out
        where = "spec.context.summarizer"
        problem: tuple[str, str] | None = None
        if ref not in backends and self.check_only and ref not in all_backends:
            self.problem(
                "ModelRoute",
                name,
                "BackendNotFound",
                f"ModelBackend {ref!r} is not in this check; it must exist when the route is applied",
                where,
                "warning",
            )
            return out
        if ref not in backends:
            what = "is not ready" if ref in all_backends else "not found"
            problem = ("SummarizerNotFound", f"summarizer ModelBackend {ref!r} {what}")
        else:
            for policy, p in sorted(policies.items()):
                semantic = p.get("semantic", {})
                verifier = semantic.get("verifier", {})
                if semantic.get("embeddingBackend") == ref:
                    problem = (
                        "SummarizerNotChat",
                        f"summarizer ModelBackend {ref!r} is CachePolicy {policy!r}'s embedding backend, not a "
                        "chat model",
                    )
                elif verifier.get("kind") == VerifierKind.rerank.value and verifier.get("backend") == ref:
                    problem = (
                        "SummarizerNotChat",
                        f"summarizer ModelBackend {ref!r} is CachePolicy {policy!r}'s rerank backend, not a chat model",
                    )
                if problem is not None:
                    break
        if problem is None:
            return out
        # A missing backend is a reference (it may be applied later: a warning, as for a chain's backends);
        # an embedding or rerank server named as a summarizer is a mistake in the route.
        severity: Severity = "warning" if problem[0] == "SummarizerNotFound" else "error"
        self.problem(
            "ModelRoute", name, problem[0], f"{problem[1]}; the route drops the oldest turns instead", where, severity
        )
        out["overflow"] = ContextOverflow.drop_oldest.value
        out.pop("summarizer", None)
        return out

    def routes(
        self,
        specs: dict[str, ModelRouteSpec],
        backends: dict[str, dict[str, Any]],
        all_backends: set[str],
        policies: dict[str, dict[str, Any]],
        all_policies: set[str],
    ) -> dict[str, dict[str, Any]]:
        """Route resource name → RouterConfig route dict."""
        out: dict[str, dict[str, Any]] = {}
        model_names: dict[str, str] = {}
        policy_users: dict[str, list[str]] = {}
        for name in sorted(specs):
            spec = specs[name]
            kind = "ModelRoute"
            model_name = spec.model_name or name
            if not re.match(ROUTE_NAME_PATTERN, model_name):
                self.leave_out(
                    kind,
                    name,
                    "InvalidName",
                    f"model name {model_name!r} must match {ROUTE_NAME_PATTERN}; set spec.modelName",
                    "spec.modelName",
                )
                continue
            if model_name in model_names:
                self.leave_out(
                    kind,
                    name,
                    "ModelNameConflict",
                    f"model name {model_name!r} is already served by ModelRoute {model_names[model_name]!r}",
                    "spec.modelName",
                )
                continue
            rules: list[dict[str, Any]] = []
            for i, rule in enumerate(spec.rules):
                # A rule keeping no backend affects only the requests it would take: they go to
                # the next rule that matches. The route and its budgets stay in force.
                compiled = self._rule(name, i, rule, backends, all_backends)
                if compiled is not None:
                    rules.append(compiled)
            if not rules:
                self.leave_out(kind, name, "NoBackends", "no rule has a backend that resolves", "spec.rules")
                continue
            data: dict[str, Any] = {
                "name": model_name,
                "rules": rules,
                "fallbackOn": [f.value for f in spec.fallback_on],
            }
            if spec.max_output_tokens is not None:
                data["maxOutputTokens"] = spec.max_output_tokens
            if spec.spillover is not None:
                data["spillover"] = spec.spillover.model_dump(by_alias=True)
            if spec.context is not None:
                data["context"] = self._context(name, spec.context, backends, all_backends, policies)
            if spec.pod_selector is not None and spec.pod_selector.match_labels:
                data["podSelector"] = dict(spec.pod_selector.match_labels)
            if spec.downgrade is not None:
                kept = self._resolve_backends(
                    name, spec.downgrade.backends, "spec.downgrade.backends", backends, all_backends
                )
                if kept:
                    data["downgrade"] = {"atPercent": spec.downgrade.at_percent, "backends": kept}
                    if spec.downgrade.burn_rate is not None:
                        data["downgrade"]["burnRate"] = spec.downgrade.burn_rate.model_dump(by_alias=True)
                else:
                    self.problem(
                        kind,
                        name,
                        "DowngradeDropped",
                        "no downgrade backend resolves; the downgrade is dropped",
                        "spec.downgrade.backends",
                        "warning",
                    )
            if spec.cache_policy is not None:
                if spec.cache_policy in policies:
                    policy_users.setdefault(spec.cache_policy, []).append(model_name)
                    data["cachePolicy"] = spec.cache_policy
                elif spec.cache_policy in all_policies:
                    self.problem(
                        kind,
                        name,
                        "CachePolicyNotReady",
                        f"CachePolicy {spec.cache_policy!r} is not ready; the reference is dropped",
                        "spec.cachePolicy",
                        "warning",
                    )
                else:
                    self.problem(
                        kind,
                        name,
                        "CachePolicyNotFound",
                        f"CachePolicy {spec.cache_policy!r} not found; the reference is dropped",
                        "spec.cachePolicy",
                        "warning",
                    )
            try:
                route = Route.model_validate(data)
            except ValidationError as exc:
                for p in _pydantic_problems(kind, name, exc, "spec", "InvalidSpec"):
                    self.leave_out(kind, name, p.reason, p.message, p.field)
                continue
            model_names[model_name] = name
            out[name] = route.model_dump(mode="json", by_alias=True, exclude_none=True)
            chain: list[str] = []
            for r in route.rules:  # cascade steps and experiment arms too
                chain += [b for b in r.backend_names() if b not in chain]
            for b in data.get("downgrade", {}).get("backends", []):
                if b not in chain:
                    chain.append(b)
            self.outcomes[(kind, name)].details = {
                "modelName": model_name,
                "firstBackend": route.rules[0].backend_names()[0],
                "backends": chain,
            }
        for policy, users in policy_users.items():
            outcome = self.outcomes.get(("CachePolicy", policy))
            if outcome is not None:
                outcome.details["routes"] = sorted(users)
        return out

    # ----------------------------------------------------------------- budgets

    def budgets(
        self, specs: dict[str, TokenBudgetSpec], routes: dict[str, dict[str, Any]], all_routes: set[str]
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        out: list[dict[str, Any]] = []
        tenancy: dict[str, Any] | None = None
        tenancy_from = ""
        tier_maps: list[tuple[str, dict[str, str]]] = []  # (budget, its tenant → tier map), budgets in force
        for name in sorted(specs):
            spec = specs[name]
            kind = "TokenBudget"
            if not re.match(NAME_PATTERN, name):
                self.leave_out(
                    kind,
                    name,
                    "InvalidName",
                    "name must be at most 63 characters of a-z, 0-9, '.', '-' (it names the budget in Redis keys)",
                    "metadata.name",
                )
                continue
            covered = []
            for j, ref in enumerate(spec.routes):
                if ref in routes:
                    covered.append(routes[ref]["name"])
                elif self.check_only and ref not in all_routes:
                    covered.append(ref)
                    self.problem(
                        kind,
                        name,
                        "RouteNotFound",
                        f"ModelRoute {ref!r} is not in this check; it must exist for the budget to cover it",
                        f"spec.routes[{j}]",
                        "warning",
                    )
                elif ref in all_routes:
                    self.problem(
                        kind,
                        name,
                        "RouteNotReady",
                        f"ModelRoute {ref!r} is not ready; not covered",
                        f"spec.routes[{j}]",
                        "warning",
                    )
                else:
                    self.problem(
                        kind,
                        name,
                        "RouteNotFound",
                        f"ModelRoute {ref!r} not found; not covered",
                        f"spec.routes[{j}]",
                        "warning",
                    )
            if spec.routes and not covered:
                self.leave_out(
                    kind,
                    name,
                    "NoRoutes",
                    "none of the routes in spec.routes resolves; an empty list would cover every route, "
                    "so the budget is left out",
                    "spec.routes",
                )
                continue
            data = {
                "name": name,
                "routes": sorted(set(covered)),
                "cap": spec.cap.model_dump(by_alias=True, exclude_none=True),
                "capOnExhausted": spec.cap_on_exhausted.value,
                "timezone": spec.timezone,
                "failMode": spec.fail_mode.value,
                "suspended": spec.suspended,
                "tiers": {t.name: t.model_dump(by_alias=True, exclude_none=True, exclude={"name"}) for t in spec.tiers},
            }
            if spec.workload_selector is not None and not spec.workload_selector.empty:
                data["workloadSelector"] = spec.workload_selector.model_dump(by_alias=True, exclude_none=True)
            if spec.tag_selector:
                data["tagSelector"] = dict(spec.tag_selector)
            if spec.attribution is not None:
                data["attribution"] = spec.attribution.model_dump(by_alias=True, exclude_none=True)
            if spec.exhausted_response is not None:
                data["exhaustedResponse"] = spec.exhausted_response
            try:
                budget = Budget.model_validate(data)
            except ValidationError as exc:
                for p in _pydantic_problems(kind, name, exc, "spec", "InvalidSpec"):
                    self.leave_out(kind, name, p.reason, p.message, p.field)
                continue
            out.append(budget.model_dump(mode="json", by_alias=True, exclude_none=True))
            self.outcomes[(kind, name)].details = {"routes": data["routes"], "tenancy": "none"}
            tiers = self._tenant_tiers_of(name, spec)
            if tiers is not None:
                tier_maps.append((name, tiers))
            if spec.tenant is not None:
                tenant = spec.tenant.model_dump(by_alias=True)
                if tenancy is None:
                    tenancy, tenancy_from = tenant, name
                    self.outcomes[(kind, name)].details["tenancy"] = "accepted"
                elif tenant != tenancy:
                    diff = sorted(k for k in tenant if tenant[k] != tenancy[k])
                    self.problem(
                        kind,
                        name,
                        "TenancyConflict",
                        f"spec.tenant differs from TokenBudget {tenancy_from!r} in {', '.join(diff)}; that one is used",
                        "spec.tenant",
                        "warning",
                    )
                    self.outcomes[(kind, name)].details["tenancy"] = "conflict"
                else:
                    self.outcomes[(kind, name)].details["tenancy"] = "accepted"
        if tier_maps:
            tenancy = self._merge_tenant_tiers(tier_maps, tenancy, out)
        if tenancy is not None and tenancy.get("jwt") is not None:
            tenant_spec = specs[tenancy_from].tenant
            assert tenant_spec is not None and tenant_spec.jwt is not None  # its dump is `tenancy`
            tenancy = {**tenancy, "jwt": self._jwt_identity(tenancy_from, tenant_spec.jwt)}
        return out, tenancy

    # ----------------------------------------------------------------- signed identity

    def _jwt_identity(self, name: str, spec: JwtSpec) -> dict[str, Any]:
        """`tenancy.jwt` compiled: the Secret as a credentials file (or variable), the public keys inline.

        A reference that does not resolve is a warning on the budget, not an error: leaving
        the budget out would drop the namespace's tenancy, and with it the token check. The
        key material it would have given is missing instead (`unavailable` says why), so the
        sidecar answers a token that needs it 503 and, with `required`, lets nothing through.
        """
        kind, base = "TokenBudget", "spec.tenant.jwt"
        out = spec.model_dump(by_alias=True, exclude={"hs256_secret_ref", "public_keys_from"}, exclude_none=True)
        then = (
            "with required, no request is served until it is fixed"
            if spec.required
            else "requests carrying a token get 503 until it is fixed"
        )
        missing: list[str] = []

        def unresolved(reason: str, message: str, field_path: str) -> None:
            shown = message if self.check_only else f"{message}; {then}"
            self.problem(kind, name, reason, shown, field_path, "warning")
            missing.append(message)

        ref = spec.hs256_secret_ref
        if ref is not None:
            secret, key = ref.name, ref.key
            if self.secrets is not None and secret not in self.secrets:
                unresolved(
                    "SecretNotFound",
                    f"Secret {secret!r} (the HS256 key) not found in namespace {self.namespace!r}",
                    f"{base}.hs256SecretRef.name",
                )
            elif self.secrets is not None and key not in self.secrets[secret]:
                unresolved(
                    "SecretKeyNotFound",
                    f"Secret {secret!r} has no key {key!r} (the HS256 key)",
                    f"{base}.hs256SecretRef.key",
                )
            else:
                cred_key = HS256_SECRET_FILE if self.credential_mode == "file" else credential_env_name(secret, key)
                owner = self.credentials.get(cred_key, (secret, key))
                if owner != (secret, key):
                    unresolved(
                        "CredentialConflict",
                        f"Secret {secret!r} key {key!r} maps to the environment variable {cred_key} "
                        f"of Secret {owner[0]!r} key {owner[1]!r}",
                        f"{base}.hs256SecretRef",
                    )
                else:
                    self.credentials[cred_key] = (secret, key)
                    out["hs256SecretFile" if self.credential_mode == "file" else "hs256SecretEnv"] = cred_key
        source = spec.public_keys_from
        if source is not None:
            cm, key = source.config_map_name, source.key
            if cm not in self.config_maps:
                where = "is not in this check" if self.check_only else f"not found in namespace {self.namespace!r}"
                unresolved("ConfigMapNotFound", f"ConfigMap {cm!r} (the public keys) {where}", f"{base}.publicKeysFrom")
            elif key not in self.config_maps[cm]:
                unresolved(
                    "ConfigMapKeyNotFound",
                    f"ConfigMap {cm!r} has no key {key!r} (the public keys)",
                    f"{base}.publicKeysFrom.key",
                )
            else:
                text = self.config_maps[cm][key].strip()
                try:
                    check_public_keys(text, spec.algorithms)
                except ValueError as exc:
                    unresolved(
                        "InvalidPublicKeys", f"ConfigMap {cm!r} key {key!r}: {exc}", f"{base}.publicKeysFrom.key"
                    )
                else:
                    out["publicKeys"] = text
        if missing:
            out["unavailable"] = "; ".join(missing)[:1024]
        return out

    # ----------------------------------------------------------------- tenant tiers

    def _tenant_tiers_of(self, name: str, spec: TokenBudgetSpec) -> dict[str, str] | None:
        """The budget's tenant → tier map; None when it assigns none, {} when its source cannot be read.

        A source that cannot be read is a warning, not an error: the budget's limits stay
        in force, and its assignments (which could only lift tenants) do not apply.
        """
        kind = "TokenBudget"
        if spec.tenant_tiers is not None:
            tiers = dict(spec.tenant_tiers)
            self._tiers_status(name, True, "Accepted", f"{len(tiers)} tenants assigned tiers by spec.tenantTiers")
            return tiers
        source = spec.tenant_tiers_from
        if source is None:
            return None
        cm, key = source.config_map_name, source.key
        where = f"ConfigMap {cm!r} key {key!r}"
        lost = "none of its tier assignments apply (its tenants get defaultTier)"
        if cm not in self.config_maps:
            reason, field_path = "ConfigMapNotFound", "spec.tenantTiersFrom.configMapName"
            message = (
                f"ConfigMap {cm!r} is not in this check; it must exist for its tier assignments to apply"
                if self.check_only
                else f"ConfigMap {cm!r} not found in namespace {self.namespace!r}; {lost}"
            )
        elif key not in self.config_maps[cm]:
            reason, field_path = "ConfigMapKeyNotFound", "spec.tenantTiersFrom.key"
            message = f"ConfigMap {cm!r} has no key {key!r}; {lost}"
        else:
            try:
                tiers = parse_tenant_tiers(self.config_maps[cm][key])
            except TenantTiersError as exc:
                reason, field_path = "InvalidTenantTiers", "spec.tenantTiersFrom.key"
                message = f"{where}: {exc}; {lost}"
            else:
                self._tiers_status(name, True, "Accepted", f"{len(tiers)} tenants assigned tiers by {where}")
                return tiers
        self.problem(kind, name, reason, message, field_path, "warning")
        self._tiers_status(name, False, reason, f"{field_path}: {message}")
        return {}

    def _tiers_status(self, name: str, ok: bool, reason: str, message: str) -> None:
        """What the budget's TenantTiersAccepted condition says (status.py); the first failure stays."""
        details = self.outcomes[("TokenBudget", name)].details
        current = details.get("tenantTiers")
        if current is not None and not current["ok"]:
            return
        details["tenantTiers"] = {"ok": ok, "reason": reason, "message": message}

    def _merge_tenant_tiers(
        self,
        tier_maps: list[tuple[str, dict[str, str]]],
        tenancy: dict[str, Any] | None,
        budgets: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """The namespace's tenancy with every budget's assignments merged in (and capped the default)."""
        kind = "TokenBudget"
        out = dict(tenancy) if tenancy is not None else Tenancy().model_dump(by_alias=True)
        merged = merge_tenant_tiers(tier_maps, out.get("tierOrder"))
        for name in merged.over_bound:
            message = (
                f"the namespace's TokenBudgets assign more than {MAX_TENANT_TIERS} tenants; none of this budget's "
                "tier assignments apply (its tenants get defaultTier)"
            )
            self.problem(kind, name, "InvalidTenantTiers", message, "spec", "warning")
            self._tiers_status(name, False, "InvalidTenantTiers", message)
        for name, conflicts in sorted(merged.conflicts.items()):
            shown = "; ".join(
                f"tenant {c.tenant!r} is {c.tier!r} here and {c.other_tier!r} in TokenBudget {c.other_budget!r}, "
                f"{c.used!r} is used"
                for c in conflicts[:5]
            )
            more = f" (and {len(conflicts) - 5} more)" if len(conflicts) > 5 else ""
            message = (
                f"{shown}{more}: a tenant assigned two tiers gets the lower by spec.tenant.tierOrder, "
                "else the first budget's by name"
            )
            self.problem(kind, name, "TenantTierConflict", message, "spec", "warning")
            self._tiers_status(name, False, "TenantTierConflict", message)
        defined = {t for b in budgets for t in b.get("tiers", {})}
        for name, tiers in tier_maps:
            missing = sorted({t for t in tiers.values() if t not in defined})
            if missing:
                listed = ", ".join(map(repr, missing[:5])) + (
                    f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
                )
                which = f"tier {listed} is" if len(missing) == 1 else f"tiers {listed} are"
                self.problem(
                    kind,
                    name,
                    "TierNotDefined",
                    f"{which} not defined by any TokenBudget's spec.tiers: their tenants get defaultTier's limits",
                    "spec",
                    "warning",
                )
        out["tenantTiers"] = merged.tiers
        if out.get("tierHeaderPolicy") is None:
            # Explicit, so the sidecar stays capped even when every source failed and the map is empty.
            out["tierHeaderPolicy"] = TierHeaderPolicy.capped.value
        return out

    def unavailable_budgets(self, routes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Fail closed: each TokenBudget left out, as the routes it would have covered."""
        out = []
        for (kind, name), outcome in sorted(self.outcomes.items()):
            if kind != "TokenBudget" or outcome.included or outcome.reason == "NoRoutes":
                continue  # NoRoutes: none of its routes is served, so there is nothing to guard
            spec = self.objects[(kind, name)].get("spec")
            named = spec.get("routes") if isinstance(spec, Mapping) else None
            covered: list[str] | None = None
            if isinstance(named, list) and named:
                covered = sorted({routes[r]["name"] for r in named if isinstance(r, str) and r in routes})
                if not covered:
                    continue
            entry: dict[str, Any] = {
                "name": name[:253],
                "reason": outcome.reason[:64],
                "message": outcome.message[:1024],
            }
            if covered is not None:
                entry["routes"] = covered
            out.append(entry)
        return out


@dataclass
class _Pass:
    compilation: _Compilation
    data: dict[str, Any]


def _compile_pass(
    namespace: str,
    resources: list[Mapping[str, Any]],
    credential_mode: CredentialMode,
    secrets: Mapping[str, Mapping[str, Any]] | None,
    cluster_domain: str,
    check_only: bool,
    config_maps: Mapping[str, Mapping[str, str]] | None = None,
    endpoint_slices: Sequence[Mapping[str, Any]] | None = None,
) -> _Pass:
    if config_maps is None:
        config_maps = config_maps_among(resources, namespace)
    if endpoint_slices is None:
        endpoint_slices = slices_among(resources)
    c = _Compilation(namespace, credential_mode, secrets, cluster_domain, check_only, config_maps, endpoint_slices)
    parsed = c.parse(resources)
    all_backends = {n for (k, n) in c.outcomes if k == "ModelBackend"}
    all_routes = {n for (k, n) in c.outcomes if k == "ModelRoute"}
    backends = c.backends(parsed["ModelBackend"])
    policies = c.cache_policies(parsed["CachePolicy"], backends, all_backends)
    all_policies = {n for (k, n) in c.outcomes if k == "CachePolicy"}
    routes = c.routes(parsed["ModelRoute"], backends, all_backends, policies, all_policies)
    budgets, tenancy = c.budgets(parsed["TokenBudget"], routes, all_routes)

    for name in policies:
        outcome = c.outcomes[("CachePolicy", name)]
        outcome.details.setdefault("routes", [])

    data: dict[str, Any] = {
        "namespace": namespace,
        "backends": [backends[n] for n in sorted(backends)],
        "routes": sorted(routes.values(), key=lambda r: r["name"]),
        "budgets": budgets,
        "cachePolicies": [policies[n] for n in sorted(policies)],
    }
    unavailable = c.unavailable_budgets(routes)
    if unavailable:
        data["unavailableBudgets"] = unavailable
    if tenancy is not None:
        data["tenancy"] = tenancy
    return _Pass(c, data)


def _object_key(obj: Mapping[str, Any]) -> ObjectKey:
    return (str(obj.get("kind", "")), str((obj.get("metadata") or {}).get("name") or ""))


def _generation(obj: Mapping[str, Any]) -> int | None:
    gen = (obj.get("metadata") or {}).get("generation")
    return gen if isinstance(gen, int) else None


def _to_substitute(
    objects: list[Mapping[str, Any]],
    outcomes: Mapping[ObjectKey, Outcome],
    last_good: Mapping[ObjectKey, Mapping[str, Any]],
    substituted: Mapping[ObjectKey, Any],
    *,
    references_too: bool,
) -> list[tuple[ObjectKey, Mapping[str, Any], Outcome]]:
    """Objects left out whose last good version differs from the one given: compile that one instead."""
    out = []
    for obj in objects:
        key = _object_key(obj)
        outcome = outcomes.get(key)
        good = last_good.get(key)
        if (
            outcome is not None
            and not outcome.included
            and key not in substituted
            and good is not None
            and good.get("spec") != obj.get("spec")
            and (references_too or outcome.reason not in REFERENCE_REASONS)
        ):
            out.append((key, good, outcome))
    return out


def _in_force_copy(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator keeps of a version in force: enough to compile it again."""
    meta = obj.get("metadata") or {}
    kept_meta: dict[str, Any] = {"name": meta.get("name")}
    if isinstance(meta.get("generation"), int):
        kept_meta["generation"] = meta["generation"]
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": kept_meta,
        "spec": obj.get("spec"),
    }


def compile_namespace(
    namespace: str,
    resources: Iterable[Mapping[str, Any]],
    *,
    credential_mode: CredentialMode = "file",
    secrets: Mapping[str, Mapping[str, Any]] | None = None,
    server: ServerSettings | None = None,
    budget_store: BudgetStoreSettings | None = None,
    telemetry: TelemetrySettings | None = None,
    cluster_domain: str = "cluster.local",
    last_good: Mapping[ObjectKey, Mapping[str, Any]] | None = None,
    check_only: bool = False,
    config_maps: Mapping[str, Mapping[str, str]] | None = None,
    endpoint_slices: Sequence[Mapping[str, Any]] | None = None,
) -> CompileResult:
    """Compile one namespace's ModelBackends, ModelRoutes, TokenBudgets and CachePolicies.

    `resources` are whole objects (apiVersion, kind, metadata, spec); objects of
    other API groups are ignored. `secrets`, when given, maps Secret name → its
    data keys (values are not read); backends whose Secret or key is missing are
    left out. Without it (offline validation) references to Secrets are not
    checked. `credential_mode` "file" names keys of the kubetoll-credentials
    Secret; "env" names environment variables (`kubetoll run`). `server`,
    `budget_store` and `telemetry` are deployment settings, not resources: the operator and
    `kubetoll run` pass them in. `last_good` is the previous result's `in_force`:
    a resource whose update does not compile is compiled from it instead.
    `check_only` keeps references to objects not given (see `check_resource`).
    `config_maps` maps ConfigMap name → its data, for `tenantTiersFrom` (the
    operator reads the ones referenced); without it, ConfigMap manifests among
    `resources` are used. `endpoint_slices` are the EndpointSlices of the Services
    ModelBackends reference (their ready endpoints become the backend's `replicas`:
    endpoint_slices.py); without it, EndpointSlice manifests among `resources` are used.
    """
    objects = list(resources)
    substituted: dict[ObjectKey, tuple[Mapping[str, Any], list[Problem], Outcome]] = {}
    current = objects
    # Each pass only adds substitutions, so this ends within len(objects) + 1 passes. Failures
    # of an object's own fields are substituted first; one that failed only for a reference
    # after that, since the object it named may be back in force by then.
    while True:
        run = _compile_pass(
            namespace, current, credential_mode, secrets, cluster_domain, check_only, config_maps, endpoint_slices
        )
        c = run.compilation
        fresh = _to_substitute(objects, c.outcomes, last_good or {}, substituted, references_too=False)
        if not fresh:
            fresh = _to_substitute(objects, c.outcomes, last_good or {}, substituted, references_too=True)
        if not fresh:
            break
        for key, good, failed in fresh:
            substituted[key] = (good, [p for p in c.problems if (p.kind, p.name) == key], failed)
        current = [substituted[_object_key(o)][0] if _object_key(o) in substituted else o for o in objects]

    by_key = {_object_key(o): o for o in objects}
    for key, (good, problems, failed) in substituted.items():
        if key not in c.outcomes:
            continue
        outcome = c.outcomes[key]
        outcome.generation = _generation(by_key[key])
        # The new version's errors are what to fix; the warnings are those of the version in force.
        errors = [p for p in problems if p.severity == "error"]
        c.problems = [p for p in c.problems if (p.kind, p.name) != key or p.severity == "warning"] + errors
        if outcome.included:
            outcome.serving_generation = _generation(good)
            outcome.reason = INVALID_UPDATE
            served = (
                f"generation {outcome.serving_generation}" if outcome.serving_generation else "its last good version"
            )
            outcome.message = f"this update does not compile, so {served} stays in force: {failed.message}"
        else:
            outcome.reason, outcome.message = failed.reason, failed.message
    data = run.data
    if server is not None:
        data["server"] = server.model_dump(mode="json", by_alias=True)
    if budget_store is not None:
        data["budgetStore"] = budget_store.model_dump(mode="json", by_alias=True)
    if telemetry is not None:
        data["telemetry"] = telemetry.model_dump(mode="json", by_alias=True)
    try:
        config: RouterConfig | None = RouterConfig.model_validate(data)
    except ValidationError as exc:
        # Every part was validated on its own; reaching here is a compiler bug.
        # Report it and produce nothing, so the last good config stays in place.
        for p in _pydantic_problems("Namespace", namespace, exc, "", "CompileError"):
            c.problems.append(p)
        config = None
    if config is None:
        return CompileResult(None, "", "", c.problems, c.credentials, c.outcomes)
    in_force = {
        key: _in_force_copy(substituted[key][0] if key in substituted else c.objects[key])
        for key, outcome in c.outcomes.items()
        if outcome.included and key in c.objects
    }
    text = canonical_json(config)
    return CompileResult(
        config,
        text,
        hashlib.sha256(text.encode()).hexdigest(),
        c.problems,
        c.credentials,
        c.outcomes,
        in_force,
    )


def check_resource(namespace: str, obj: Mapping[str, Any]) -> list[Problem]:
    """Every check of one object on its own: what admission and `kubetoll validate` refuse.

    The object's own fields are checked as the compiler checks them (timezones,
    regexes, header names, the price catalogue, cross-field rules); references
    to objects that are not given are warnings, since an object may be applied
    before the objects it names.
    """
    result = compile_namespace(namespace, [obj], check_only=True)
    key = _object_key(obj)
    out = []
    for p in result.problems:
        # Namespace-level problems in a check are the references it kept on purpose.
        if (p.kind, p.name) != key:
            continue
        if p.reason in REFERENCE_REASONS and p.severity == "error":
            p = Problem(p.kind, p.name, p.reason, p.message, p.field, "warning")
        out.append(p)
    return out
