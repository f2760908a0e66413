"""The spend record: one settled request (or cache hit), and its codec for the Redis ledger stream.

Reports (`kubetoll report`), the operator's status and the demo read spend per
tenant, route and backend from these records. The stream entry carries the
record's own fields, the cost as exact integer nano-USD (`cost_nusd`) and the
sidecar that wrote it (docs/redis-layout.md, "ledger").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .meters import scale_of, to_units

# The outcome of a record that bills a semantic cache lookup's embedding call: spend,
# but not a request of its own (reports count requests without it).
CACHE_EMBEDDING_OUTCOME = "cache_embedding"


@dataclass(frozen=True, slots=True)
class SpendRecord:
    time: float  # epoch seconds, at settlement
    namespace: str
    route: str
    backend: str  # "" when no backend was called (a cache hit)
    tenant: str
    tier: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float
    cache_hit: str = ""  # "", "exact", "semantic"
    avoided_usd: float = 0.0  # what a cache hit saved
    downgraded: bool = False
    fallbacks: int = 0
    outcome: str = "ok"  # ok, upstream_error, cut_stream, client_disconnected, cache_embedding
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_RECORD_FIELDS = (
    "time", "namespace", "route", "backend", "tenant", "tier", "prompt_tokens", "completion_tokens", "cached_tokens",
    "cost_usd", "cache_hit", "avoided_usd", "downgraded", "fallbacks", "outcome", "request_id",
)  # fmt: skip


def encode_record(r: SpendRecord, sidecar_id: str) -> list[str]:
    """Stream entry fields of a spend record: its own fields, exact nano-USD, and the writer."""
    out: list[str] = []
    for name in _RECORD_FIELDS:
        v = getattr(r, name)
        out.append(name)
        out.append(("1" if v else "0") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v))
    out += ["cost_nusd", str(to_units(r.cost_usd, scale_of("usd"))), "sidecar", sidecar_id]
    return out


def decode_record(fields: Mapping[str, str]) -> SpendRecord:
    def f(name: str, conv: Any, default: Any) -> Any:
        v = fields.get(name)
        if v is None:
            return default
        try:
            return conv(v)
        except ValueError:
            return default

    return SpendRecord(
        time=f("time", float, 0.0),
        namespace=fields.get("namespace", ""),
        route=fields.get("route", ""),
        backend=fields.get("backend", ""),
        tenant=fields.get("tenant", ""),
        tier=fields.get("tier", ""),
        prompt_tokens=f("prompt_tokens", int, 0),
        completion_tokens=f("completion_tokens", int, 0),
        cached_tokens=f("cached_tokens", int, 0),
        cost_usd=f("cost_usd", float, 0.0),
        cache_hit=fields.get("cache_hit", ""),
        avoided_usd=f("avoided_usd", float, 0.0),
        downgraded=fields.get("downgraded") == "1",
        fallbacks=f("fallbacks", int, 0),
        outcome=fields.get("outcome", "ok"),
        request_id=fields.get("request_id", ""),
    )
