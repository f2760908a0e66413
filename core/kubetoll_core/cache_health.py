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
