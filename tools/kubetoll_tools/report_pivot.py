"""Pivots of ledger records for `kubetoll report --by`: one row per distinct combination of dimensions.

`--by feature,model` gives a row for (search, gpt-4o-mini), one for (search, llama), and so on: every
record counts in exactly one row, so the rows add up to the period's totals.

Dimensions (`FIXED_DIMENSIONS`), and the key of a record that has no value for one:

* tenant, route, tier: the record's own field;
* backend: "(cache)" for a record no backend served (`spend.CACHE_BACKEND`);
* model: the model the backend was called with; "(cache)" without a backend, "(unknown)" for a
  record that names a backend but no model (a sidecar older than the field);
* workload: "(unknown)" without one (`spend.UNKNOWN_WORKLOAD`);
* session: "(none)" for a request outside a session;
* outcome: the business outcomes the app reported (`POST /kubetoll/v1/outcomes`) for the record's
  session, and for its request when an outcome named the request. A session that reported
  "resolved" puts every record of that session under "resolved" (so "cost per resolved
  conversation" is the row's spend over its sessions). A session that reported several outcomes
  goes under their names sorted and joined with "+" ("escalated+resolved"), so each record still
  counts once; records whose session and request reported none are "(none)". Only outcomes
  reported inside the period count: the report reads nothing outside it;
* day: the record's date in the report's timezone (`--tz`), ISO (2026-11-22);
* any other name, or `tag:KEY`: the value of that tag key on the record's accepted tags,
  "(untagged)" without it (`feature` is the usual one). `tag:KEY` names a tag whose key is also a
  fixed dimension (`tag:tenant`).

Each row carries `spend.Group`'s figures (requests, tokens, cost, per request, cache hits, avoided,
downgraded, ...) plus `sessions` (distinct session ids among its records) and
`cost_per_session_usd`: the spend of its records that belong to a session over those sessions
(None without sessions), so traffic outside sessions does not inflate it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from kubetoll_core.parts import TAG_KEY_PATTERN
from kubetoll_core.spend_record import OUTCOME_REPORTED, SpendRecord

from .spend import CACHE_BACKEND, UNKNOWN_WORKLOAD, Group, session_costs

FIXED_DIMENSIONS = ("tenant", "route", "backend", "model", "tier", "workload", "session", "outcome", "day")
NO_SESSION = "(none)"
NO_OUTCOME = "(none)"
UNTAGGED = "(untagged)"
UNKNOWN_MODEL = "(unknown)"
OUTCOME_JOIN = "+"  # between the outcome names of a session that reported several
_TAG_KEY = re.compile(TAG_KEY_PATTERN)


class PivotError(ValueError):
    """A `--by` value that names no dimension."""


@dataclass(frozen=True, slots=True)
class Dimension:
    label: str  # the column's name in tables, CSV and JSON
    tag: str = ""  # a tag dimension: the tag key ("" for a fixed dimension)


def parse_dimensions(values: Iterable[str]) -> list[Dimension]:
    """The dimensions comma-separated `values` name, in order, each once."""
    dims: list[Dimension] = []
    for value in values:
        for raw in value.split(","):
            name = raw.strip().lower()
            if name in FIXED_DIMENSIONS:
                dim = Dimension(name)
            else:
                key = name.removeprefix("tag:")
                if not _TAG_KEY.match(key):
                    raise PivotError(
                        f"--by {raw.strip()!r}: expected one or more of {', '.join(FIXED_DIMENSIONS)}, "
                        "or a tag key (a lowercase letter, then up to 31 of a-z 0-9 _ . -; tag:KEY for one named "
                        "like a dimension)"
                    )
                dim = Dimension(f"tag:{key}" if key in FIXED_DIMENSIONS else key, key)
            if dim not in dims:
                dims.append(dim)
    if not dims:
        raise PivotError("--by: name at least one dimension")
    return dims


def _outcomes(records: Sequence[SpendRecord]) -> Callable[[SpendRecord], str]:
    """The outcome key of a record: what its session (and its request) reported, see the module docstring."""
    by_session: dict[str, set[str]] = defaultdict(set)
    by_request: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.outcome != OUTCOME_REPORTED or not r.business_outcome:
            continue
        if r.session:
            by_session[r.session].add(r.business_outcome)
        elif r.request_id:
            by_request[r.request_id].add(r.business_outcome)

    def key(r: SpendRecord) -> str:
        names = by_session.get(r.session, set()) if r.session else set()
        if r.request_id and r.request_id in by_request:
            names = names | by_request[r.request_id]
        return OUTCOME_JOIN.join(sorted(names)) if names else NO_OUTCOME

    return key


def _tag_key(key: str) -> Callable[[SpendRecord], str]:
    return lambda r: r.tag_map.get(key, UNTAGGED)


def _key_functions(
    dims: Sequence[Dimension], records: Sequence[SpendRecord], tz: tzinfo
) -> list[Callable[[SpendRecord], str]]:
    fixed: dict[str, Callable[[SpendRecord], str]] = {
        "tenant": lambda r: r.tenant,
        "route": lambda r: r.route,
        "backend": lambda r: r.backend or CACHE_BACKEND,
        "model": lambda r: r.model or (UNKNOWN_MODEL if r.backend else CACHE_BACKEND),
        "tier": lambda r: r.tier,
        "workload": lambda r: r.workload or UNKNOWN_WORKLOAD,
        "session": lambda r: r.session or NO_SESSION,
        "day": lambda r: datetime.fromtimestamp(r.time, tz).date().isoformat(),
    }
    out: list[Callable[[SpendRecord], str]] = []
    for d in dims:
        if d.tag:
            out.append(_tag_key(d.tag))
        elif d.label == "outcome":
            out.append(_outcomes(records))
        else:
            out.append(fixed[d.label])
    return out


@dataclass
class PivotRow:
    keys: tuple[str, ...]
    group: Group
    sessions: set[str] = field(default_factory=set)
    session_cost_usd: float = 0.0

    def add(self, r: SpendRecord) -> None:
        self.group.add(r)
        if r.session:
            self.sessions.add(r.session)
            self.session_cost_usd += r.cost_usd

    def as_dict(self, labels: Sequence[str]) -> dict[str, Any]:
        figures = self.group.as_dict()
        del figures["key"]
        return {
            "keys": dict(zip(labels, self.keys)),
            **figures,
            "sessions": len(self.sessions),
            "cost_per_session_usd": self.session_cost_usd / len(self.sessions) if self.sessions else None,
        }


def pivot(records: Iterable[SpendRecord], dims: Sequence[Dimension], tz: tzinfo) -> list[PivotRow]:
    """One row per distinct combination of the dimensions' keys, dearest first (ties by keys)."""
    recs = list(records)
    keyfns = _key_functions(dims, recs, tz)
    rows: dict[tuple[str, ...], PivotRow] = {}
    for r in recs:
        keys = tuple(f(r) for f in keyfns)
        row = rows.get(keys)
        if row is None:
            row = rows[keys] = PivotRow(keys, Group(" / ".join(keys)))
        row.add(r)
    return sorted(rows.values(), key=lambda row: (-row.group.cost_usd, row.keys))


def session_totals(records: Iterable[SpendRecord]) -> dict[str, Any]:
    """Distinct sessions in the records, and the spend of their records per session (None without any)."""
    cost = session_costs(records)
    return {"sessions": len(cost), "cost_per_session_usd": sum(cost.values()) / len(cost) if cost else None}


def pivot_summary(
    records: Iterable[SpendRecord], dims: Sequence[Dimension], tz: tzinfo, top: int | None
) -> dict[str, Any]:
    """The pivot as plain data: `by` (column labels), `rows` (the `top` dearest, all when None), `total_rows`,
    `omitted` (the rows left out: how many, their requests and spend; None when none were), and
    `missing_tags` (tag dimensions no record carries: usually a misspelt key)."""
    recs = list(records)
    labels = [d.label for d in dims]
    rows = pivot(recs, dims, tz)
    shown = rows if top is None else rows[:top]
    rest = rows[len(shown) :]
    omitted = None
    if rest:
        omitted = {
            "rows": len(rest),
            "requests": sum(row.group.requests for row in rest),
            "cost_usd": sum(row.group.cost_usd for row in rest),
        }
    present = {k for r in recs for k in r.tag_map}
    return {
        "by": labels,
        "rows": [row.as_dict(labels) for row in shown],
        "total_rows": len(rows),
        "omitted": omitted,
        "missing_tags": [d.tag for d in dims if d.tag and recs and d.tag not in present],
    }
