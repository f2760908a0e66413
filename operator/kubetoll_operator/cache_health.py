"""The CachePolicy `Degraded` condition, from what the sidecars report about its semantic tier.

A sidecar whose semantic tier of a policy cannot serve (the circuit on its
embedding or verifier backend is open, or it has no client for that backend)
writes a report into Redis (kubetoll_core.cache_health); the spend reporter
reads each policy's reports on its pass (`spend_reporter.SpendReporter.report_spend`) and
writes this condition:

* True, reason `EmbeddingUnavailable` (or `VerifierUnavailable` when only the
  verifier is lost), the message naming the backend, how many sidecars report
  it and the latest reason they give;
* False, reason `SemanticTierServing`, when no live report is left;
* False, reason `NoSemanticTier`, for a policy without a semantic tier.

Without a Redis budget store there are no reports, and no condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubetoll_core.cache_health import EMBEDDING, DegradedReport
from kubetoll_core.router_config import CachePolicy

DEGRADED = "Degraded"
_REASONS = {EMBEDDING: "EmbeddingUnavailable"}
_WHAT = {EMBEDDING: "embedding backend"}
MAX_MESSAGE = 1000


def _condition(ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": DEGRADED, "status": "True" if ok else "False", "reason": reason, "message": message}


def degraded_condition(policy: CachePolicy, reports: Sequence[DegradedReport]) -> dict[str, Any]:
    """The Degraded condition of `policy` from its live reports (`cache_health.read_degraded`)."""
    if not policy.semantic.enabled:
        return _condition(False, "NoSemanticTier", "the policy has no semantic tier")
    if not reports:
        return _condition(False, "SemanticTierServing", "no sidecar reports its semantic tier degraded")
    # The embedding first: without it nothing is looked up, whatever the verifier does.
    parts = sorted({r.part for r in reports}, key=lambda p: p != EMBEDDING)
    lines = []
    for part in parts:
        mine = [r for r in reports if r.part == part]
        latest = max(mine, key=lambda r: r.since)
        backends = ", ".join(sorted({r.backend for r in mine}))
        sidecars = len({r.sidecar for r in mine})
        lines.append(
            f"{_WHAT.get(part, 'verifier backend')} {backends} unavailable in {sidecars} "
            f"sidecar{'s' if sidecars != 1 else ''} ({latest.reason or 'no reason given'})"
        )
    message = "; ".join(lines) + ": semantic lookups miss there (the exact tier still serves)"
    return _condition(True, _REASONS.get(parts[0], "VerifierUnavailable"), message[:MAX_MESSAGE])
