"""Validating admission for Kubetoll's four kinds: an AdmissionReview in, its answer out.

The checks are the compiler's own (`compiler.check_resource`: timezones, regexes,
header names, the price catalogue, cross-field rules), so `kubectl apply`,
`kubetoll validate` and the operator agree on what is wrong. Errors refuse the
request with HTTP 422 and reason `Invalid`, one cause per field, the way the API
server answers a schema violation (kubectl prints `The TokenBudget "x" is
invalid:` and each `field: message`). References to objects that may be applied
later are warnings (`response.warnings`), cut to the API server's limits.

Always allowed, without a check:

* DELETE (and CONNECT): removing an object must never depend on the operator;
* a subresource (status) and an object being deleted (its finalizers must come off);
* an UPDATE that leaves `spec` as it was: metadata-only patches (labels, kopf's
  annotations, finalizers) of an object that predates the webhook or slipped in
  while it was down; its status already says what is wrong;
* a kind that is not one of the four (a webhook rule added by hand): the webhook
  is not the authority on it, so it answers with a warning instead of blocking it.

A review that is not an AdmissionReview raises `MalformedReview`; the server
answers HTTP 400 with its message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .compiler import Problem, check_resource

log = logging.getLogger("kubetoll.validation")

GROUP = "kubetoll.dev"
KINDS = ("ModelBackend", "ModelRoute", "TokenBudget", "CachePolicy")
CHECKED_OPERATIONS = frozenset({"CREATE", "UPDATE"})
# The API server keeps at most 256 characters of one warning and 4096 of them all
# (k8s.io/apiserver, endpoints/filters/warning.go); longer ones it cuts blindly.
WARNING_MAX_CHARS = 256
WARNINGS_MAX_TOTAL = 4096
_NOTE_ROOM = 80  # kept free for the note that counts the warnings left out
DENIED_CODE = 422  # Unprocessable Entity, as the API server answers an invalid object

Checker = Callable[[str, Mapping[str, Any]], list[Problem]]


class MalformedReview(ValueError):
    """The request is not an admission.k8s.io/v1 AdmissionReview the webhook can answer."""


@dataclass
class Decision:
    allowed: bool
    kind: str = ""
    name: str = ""
    namespace: str = ""
    errors: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: bool = False  # False: allowed without running the checks (DELETE, unchanged spec, ...)


def review_request(review: Any) -> Mapping[str, Any]:
    """The review's `request`, after the checks every admission answer needs."""
    if not isinstance(review, Mapping):
        raise MalformedReview(f"expected an AdmissionReview object, got {type(review).__name__}")
    if review.get("kind") != "AdmissionReview":
        raise MalformedReview(f"expected kind AdmissionReview, got {review.get('kind')!r}")
    request = review.get("request")
    if not isinstance(request, Mapping):
        raise MalformedReview("the AdmissionReview has no request object")
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        raise MalformedReview("request.uid is missing: the answer could not be matched to the request")
    return request


def decide(request: Mapping[str, Any], check: Checker | None = None) -> Decision:
    """What to answer to one admission request (already shaped by `review_request`)."""
    operation = request.get("operation")
    if not isinstance(operation, str):
        raise MalformedReview("request.operation is missing")
    kind_info = request.get("kind")
    if not isinstance(kind_info, Mapping) or not isinstance(kind_info.get("kind"), str):
        raise MalformedReview("request.kind.kind is missing")
    kind = kind_info["kind"]
    obj = request.get("object")
    name = _name(request, obj)
    if operation not in CHECKED_OPERATIONS or request.get("subResource"):
        return Decision(True, kind, name)
    if kind_info.get("group") != GROUP or kind not in KINDS:
        group = kind_info.get("group") or "core"
        return Decision(
            True,
            kind,
            name,
            warnings=[
                f"kubetoll: {kind}.{group} not validated: the webhook checks {', '.join(KINDS)} only"
                " (is a webhook rule wrong?)"
            ],
        )
    if not isinstance(obj, Mapping):
        raise MalformedReview(f"request.object is missing for a {operation}")
    raw_meta = obj.get("metadata")
    meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
    if meta.get("deletionTimestamp"):
        return Decision(True, kind, name)
    old = request.get("oldObject")
    if operation == "UPDATE" and isinstance(old, Mapping) and old.get("spec") == obj.get("spec"):
        return Decision(True, kind, name)
    namespace = request.get("namespace") or meta.get("namespace") or ""
    if not isinstance(namespace, str) or not namespace:
        raise MalformedReview(f"no namespace for {kind} {name}: request.namespace is missing")
    if obj.get("kind") != kind:
        # kubectl always sends both; a review built by hand may leave the object's kind out.
        obj = {**obj, "kind": kind}
    problems = (check or check_resource)(namespace, obj)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [_warning(p) for p in problems if p.severity != "error"]
    return Decision(not errors, kind, name, namespace, errors=errors, warnings=fit_warnings(warnings), checked=True)


def answer(review: Any, check: Checker | None = None) -> tuple[dict[str, Any], Decision]:
    """The AdmissionReview to send back, and the decision it carries."""
    request = review_request(review)
    decision = decide(request, check)
    response: dict[str, Any] = {"uid": request["uid"], "allowed": decision.allowed}
    if decision.warnings:
        response["warnings"] = decision.warnings
    if not decision.allowed:
        response["status"] = denial_status(decision)
    return {
        "apiVersion": review.get("apiVersion", "admission.k8s.io/v1"),
        "kind": "AdmissionReview",
        "response": response,
    }, decision


def denial_status(decision: Decision) -> dict[str, Any]:
    """A metav1.Status as the API server builds one for an invalid object.

    kubectl prints a 422 `Invalid` with causes as `The KIND "NAME" is invalid:`
    followed by `* field: message` lines; other clients read `message`.
    """
    lines = [f"{p.field or 'spec'}: {p.message}" for p in decision.errors]
    return {
        "code": DENIED_CODE,
        "status": "Failure",
        "reason": "Invalid",
        "message": f"{decision.kind} {decision.name!r} is invalid: " + "; ".join(lines),
        "details": {
            "group": GROUP,
            "kind": decision.kind,
            "name": decision.name,
            "causes": [
                {"reason": "FieldValueInvalid", "field": p.field or "spec", "message": p.message}
                for p in decision.errors
            ],
        },
    }


def fit_warnings(warnings: Sequence[str]) -> list[str]:
    """Each warning cut to 256 characters, all of them to 4096, the rest counted in the last one."""
    out: list[str] = []
    total = 0
    unique = list(dict.fromkeys(warnings))
    for i, text in enumerate(unique):
        text = _cut(text, WARNING_MAX_CHARS)
        more_after = i < len(unique) - 1
        if total + len(text) + (_NOTE_ROOM if more_after else 0) > WARNINGS_MAX_TOTAL:
            out.append(f"kubetoll: {len(unique) - i} more warnings; the resource's status lists them all")
            break
        out.append(text)
        total += len(text)
    return out


def _warning(p: Problem) -> str:
    where = f"{p.field}: " if p.field else ""
    return f"{p.kind} {p.name}: {where}{p.message}"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _name(request: Mapping[str, Any], obj: Any) -> str:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if isinstance(meta, Mapping):
        if meta.get("name"):
            return str(meta["name"])
        if meta.get("generateName"):
            return f"{meta['generateName']}*"
    return str(request.get("name") or "")


__all__ = [
    "GROUP",
    "KINDS",
    "Decision",
    "MalformedReview",
    "answer",
    "decide",
    "denial_status",
    "fit_warnings",
    "review_request",
]
