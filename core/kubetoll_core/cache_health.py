"""The semantic cache tier's health as the sidecars report it to the operator, through Redis.

A sidecar whose semantic tier of a cache policy is degraded (the circuit on its
embedding or verifier backend is open, or it has no client for that backend)
writes a `DegradedReport` into the policy's hash
`kt:{<ns>}:cachehealth:<policy>` (`RedisKeys.cache_health`), field
`<part>:<sidecar>`, and deletes the field when the part is healthy again. It
writes on each transition and refreshes the report every `REFRESH_SECONDS`
while the part stays degraded; each report carries the time it stops counting
(`until`, `TTL_SECONDS` after it was written) and the hash expires with the
last report, so a sidecar that dies degraded stops counting within a minute
without anyone deleting its field.

The operator reads the hash on its reporter pass (`read_degraded`) and turns the
live reports into the CachePolicy's `Degraded` condition.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .redis_keys import RedisKeys

EMBEDDING = "embedding"
VERIFIER = "verifier"
PARTS = (EMBEDDING, VERIFIER)
TTL_SECONDS = 60.0
REFRESH_SECONDS = 20.0
MAX_MESSAGE = 300  # characters of the reason kept in a report (it ends up in a status message)


@dataclass(frozen=True, slots=True)
class DegradedReport:
    part: str  # "embedding" or "verifier"
    backend: str  # the ModelBackend the part calls
    reason: str  # why, in words (an error class and message; never a credential)
    since: float  # epoch seconds: when this sidecar's part became degraded
    until: float  # epoch seconds: when this report stops counting unless refreshed
    sidecar: str = ""  # filled in from the field name by `read_degraded`

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "part": self.part,
                "backend": self.backend,
                "reason": self.reason[:MAX_MESSAGE],
                "since": self.since,
                "until": self.until,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str, sidecar: str = "") -> DegradedReport | None:
        """None for anything this version cannot read (a report is advisory; garbage is not an error)."""
        try:
            d = orjson.loads(raw)
            report = cls(
                str(d["part"]),
                str(d["backend"]),
                str(d.get("reason") or "")[:MAX_MESSAGE],
                float(d["since"]),
                float(d["until"]),
                sidecar,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        if report.part not in PARTS or not (math.isfinite(report.since) and math.isfinite(report.until)):
            return None
        return report


def report_field(part: str, sidecar: str) -> str:
    if part not in PARTS:
        raise ValueError(f"unknown semantic tier part {part!r}")
    return f"{part}:{sidecar}"


def live_reports(fields: Mapping[Any, Any], now: float) -> list[DegradedReport]:
    """The reports of a policy's hash (HGETALL, bytes or str) that still count at `now`, oldest first."""
    out = []
    for name, raw in fields.items():
        field_name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        _, _, sidecar = field_name.partition(":")
        report = DegradedReport.from_json(raw, sidecar)
        if report is not None and report.until > now:
            out.append(report)
    return sorted(out, key=lambda r: (r.since, r.part, r.sidecar))


async def read_degraded(client: Any, namespace: str, policy: str, now: float) -> list[DegradedReport]:
    """The live reports of one policy (raises what the Redis client raises)."""
    return live_reports(await client.hgetall(RedisKeys(namespace).cache_health(policy)), now)


# --------------------------------------------------------------------------- error-rate control

# A sidecar running error-rate control for a policy (semantic.targetErrorRate) writes what its
# controller learned into the hash `kt:{<ns>}:cachecontrol:<policy>` (`RedisKeys.cache_control`),
# field `<sidecar>`, every REFRESH_SECONDS; each report stops counting TTL_SECONDS after it was
# written. The operator pools the live ones into the CachePolicy's `status.errorControl`.
_CONTROL_INTS = ("explored", "exploredWrong", "samples", "served", "verifiedCorrect", "verifiedWrong")
# Wilson's z for the pooled error interval: one-sided 95%, the controller's own default delta.
_POOLED_Z = 1.6448536269514722


@dataclass(frozen=True, slots=True)
class ControlReport:
    target: float
    threshold: float | None  # None: closed (serves no semantic hit)
    exploration_rate: float
    counts: Mapping[str, int]  # _CONTROL_INTS
    until: float
    sidecar: str = ""

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "target": self.target,
                "threshold": self.threshold,
                "explorationRate": self.exploration_rate,
                **{k: int(self.counts.get(k, 0)) for k in _CONTROL_INTS},
                "until": self.until,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str, sidecar: str = "") -> ControlReport | None:
        """None for anything this version cannot read."""
        try:
            d = orjson.loads(raw)
            threshold = None if d.get("threshold") is None else float(d["threshold"])
            report = cls(
                float(d["target"]),
                threshold,
                float(d["explorationRate"]),
                {k: max(0, int(d.get(k) or 0)) for k in _CONTROL_INTS},
                float(d["until"]),
                sidecar,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        values = [report.target, report.exploration_rate, report.until, *([threshold] if threshold is not None else [])]
        return report if all(math.isfinite(v) for v in values) else None


def live_control_reports(fields: Mapping[Any, Any], now: float) -> list[ControlReport]:
    out = []
    for name, raw in fields.items():
        sidecar = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        report = ControlReport.from_json(raw, sidecar)
        if report is not None and report.until > now:
            out.append(report)
    return sorted(out, key=lambda r: r.sidecar)


def pooled_control_status(reports: list[ControlReport], target: float) -> dict[str, Any]:
    """The CachePolicy's `status.errorControl` from the sidecars' live reports.

    The explored would-be hits of every sidecar are pooled into one error estimate with its
    Wilson interval (they are samples of the same policy's traffic); thresholds differ per
    sidecar (each learns its own), so the lowest and highest are given.
    """
    mine = [r for r in reports if r.target == target]
    totals = {k: sum(r.counts.get(k, 0) for r in mine) for k in _CONTROL_INTS}
    open_thresholds = [r.threshold for r in mine if r.threshold is not None]
    explored, wrong = totals["explored"], totals["exploredWrong"]
    estimate: float | None = None
    interval: list[float | None] = [None, None]
    if explored:
        estimate = wrong / explored
        p, n, z2 = estimate, float(explored), _POOLED_Z**2
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = _POOLED_Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        interval = [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]
    return {
        "targetErrorRate": target,
        "sidecars": len(mine),
        "closedSidecars": len(mine) - len(open_thresholds),
        "thresholdMin": round(min(open_thresholds), 6) if open_thresholds else None,
        "thresholdMax": round(max(open_thresholds), 6) if open_thresholds else None,
        "explorationRate": round(sum(r.exploration_rate for r in mine) / len(mine), 6) if mine else None,
        "estimatedErrorRate": None if estimate is None else round(estimate, 6),
        "errorRateInterval": interval,
        **totals,
    }


async def read_control_reports(client: Any, namespace: str, policy: str, now: float) -> list[ControlReport]:
    """The live error-control reports of one policy (raises what the Redis client raises)."""
    return live_control_reports(await client.hgetall(RedisKeys(namespace).cache_control(policy)), now)
