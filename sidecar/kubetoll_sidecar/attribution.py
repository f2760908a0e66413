"""Attribution: the tags, session and business outcome a request carries, bounded by what the platform accepts.

Spend is attributed by tenant, route and backend without the app doing
anything; the questions teams ask ("what does search cost per user", "what does
one resolved conversation cost") need the app to say more:

* **Tags**: `x-kubetoll-tags: feature=search,team=growth`, or the OpenAI
  `metadata` object (string values). A key is kept only when a TokenBudget
  covering the route lists it in `attribution.tags` (or selects on it with
  `tagSelector`); others are dropped. A value must be 1..`maxValueLength`
  characters of letters, digits and `. _ : / -`; and each key keeps at most
  `maxValues` distinct values per UTC day in this sidecar: later new values
  are recorded as `other`. So a caller cannot grow the ledger's vocabulary or
  the metrics' label sets without bound. The header wins over `metadata` for
  the same key.
* **Session**: `x-kubetoll-session`, else `metadata.session_id`: up to 128
  characters of the same alphabet.
* **Outcome**: `x-kubetoll-outcome: resolved` (or `resolved=12.5`, with a value)
  on a request, or `POST /kubetoll/v1/outcomes` (`server.py`): an *outcome
  record* in the ledger for the session (or the request), which reports divide
  spend by.

Everything dropped or folded is counted in `kubetoll_attribution_dropped_total{reason}`
(unknown_key, invalid_value, folded, invalid_session, invalid_outcome); nothing here
ever fails a request.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kubetoll_core.parts import DEFAULT_MAX_TAG_VALUE_LENGTH, DEFAULT_MAX_TAG_VALUES, TAG_VALUE_PATTERN
from kubetoll_core.router_config import Budget

TAGS_HEADER = "x-kubetoll-tags"
SESSION_HEADER = "x-kubetoll-session"
OUTCOME_HEADER = "x-kubetoll-outcome"
SESSION_METADATA_KEY = "session_id"
MAX_SESSION_CHARS = 128
MAX_OUTCOME_CHARS = 64
MAX_OUTCOMES_PER_DAY = 50  # distinct outcome names a sidecar keeps a day; later new ones are "other"
OUTCOME_KEY = "\0outcome"  # DistinctValues' key for outcome names (no tag key can be it)
MAX_HEADER_PAIRS = 32  # pairs read from the tags header (the rest is dropped unread)
OTHER = "other"
_VALUE = re.compile(TAG_VALUE_PATTERN)
DROP_REASONS = ("unknown_key", "invalid_value", "folded", "invalid_session", "invalid_outcome")


@dataclass(frozen=True, slots=True)
class TagRule:
    key: str
    max_values: int
    metric_label: bool
    max_length: int


class AttributionPolicy:
    """The tag keys each route accepts, from the budgets this pod is under (one per loaded config)."""

    def __init__(self, budgets: Sequence[Budget], routes: Sequence[str]) -> None:
        self._by_route: dict[str, dict[str, TagRule]] = {r: {} for r in routes}
        for b in budgets:
            rules: list[TagRule] = []
            if b.attribution is not None:
                n = b.attribution.max_value_length
                rules += [TagRule(t.key, t.max_values, t.metric_label, n) for t in b.attribution.tags]
            for key in b.tag_selector or {}:
                rules.append(TagRule(key, DEFAULT_MAX_TAG_VALUES, False, DEFAULT_MAX_TAG_VALUE_LENGTH))
            for route in b.routes or list(self._by_route):
                mine = self._by_route.get(route)
                if mine is None:
                    continue
                for rule in rules:
                    have = mine.get(rule.key)
                    if have is None:
                        mine[rule.key] = rule
                    else:  # two budgets list the key: the more generous bounds, a metric if either asks
                        mine[rule.key] = TagRule(
                            rule.key,
                            max(have.max_values, rule.max_values),
                            have.metric_label or rule.metric_label,
                            max(have.max_length, rule.max_length),
                        )

    def rules(self, route: str) -> Mapping[str, TagRule]:
        return self._by_route.get(route, {})


class DistinctValues:
    """The distinct values seen per key in the current UTC day; past a key's bound, new ones are `other`.

    Lives as long as the process (not per config), so a reload does not reopen the bound.
    """

    def __init__(self) -> None:
        self._day = -1
        self._seen: dict[str, set[str]] = {}

    def admit(self, key: str, value: str, bound: int, now: float) -> str:
        day = int(now // 86400)
        if day != self._day:
            self._day, self._seen = day, {}
        seen = self._seen.setdefault(key, set())
        if value in seen:
            return value
        if len(seen) >= bound:
            return OTHER
        seen.add(value)
        return value


@dataclass(frozen=True, slots=True)
class Attributed:
    tags: str = ""  # canonical "k=v,k2=v2", keys sorted (the spend record's `tags`)
    tag_map: Mapping[str, str] = field(default_factory=dict)
    session: str = ""
    outcome: str = ""  # from the outcome header: its name ...
    outcome_value: float = 0.0  # ... and value
    dropped: tuple[str, ...] = ()  # a DROP_REASONS entry per thing dropped or folded


NONE = Attributed()


def _header_pairs(raw: str) -> list[tuple[str, str]]:
    out = []
    for part in raw.split(",")[:MAX_HEADER_PAIRS]:
        key, sep, value = part.partition("=")
        out.append((key.strip(), value.strip() if sep else ""))
    return out


def canonical_tags(tags: Mapping[str, str]) -> str:
    return ",".join(f"{k}={tags[k]}" for k in sorted(tags))


def valid_session(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_SESSION_CHARS and _VALUE.match(value) is not None


def parse_outcome(raw: str) -> tuple[str, float] | None:
    """`resolved` or `resolved=12.5` -> (name, value); None when it is not a valid outcome."""
    name, sep, value = raw.strip().partition("=")
    name = name.strip()
    if not (0 < len(name) <= MAX_OUTCOME_CHARS and _VALUE.match(name)):
        return None
    if not sep:
        return name, 0.0
    try:
        v = float(value)
    except ValueError:
        return None
    return (name, v) if math.isfinite(v) else None


def read(
    rules: Mapping[str, TagRule],
    values: DistinctValues,
    headers: Mapping[str, str],
    body: Mapping[str, object],
    now: float,
) -> Attributed:
    """The attribution of one request (never raises: what is not usable is dropped and counted)."""
    raw_header = headers.get(TAGS_HEADER)
    metadata = body.get("metadata")
    meta = metadata if isinstance(metadata, dict) else {}
    session_raw = headers.get(SESSION_HEADER)
    outcome_raw = headers.get(OUTCOME_HEADER)
    if raw_header is None and not meta and session_raw is None and outcome_raw is None:
        return NONE  # the common case: nothing to read
    dropped: list[str] = []
    offered: dict[str, str] = {}
    for key, value in meta.items():
        if key != SESSION_METADATA_KEY and isinstance(key, str):
            offered[key] = value if isinstance(value, str) else ""
    if raw_header:
        offered.update(_header_pairs(raw_header))
    tags: dict[str, str] = {}
    for key, value in offered.items():
        rule = rules.get(key)
        if rule is None:
            if key:
                dropped.append("unknown_key")
            continue
        if not (0 < len(value) <= rule.max_length and _VALUE.match(value)):
            dropped.append("invalid_value")
            continue
        kept = values.admit(key, value, rule.max_values, now)
        if kept is OTHER:
            dropped.append("folded")
        tags[key] = kept
    session = session_raw if session_raw is not None else meta.get(SESSION_METADATA_KEY)
    if session is not None and not valid_session(session):
        dropped.append("invalid_session")
        session = None
    outcome, outcome_value = "", 0.0
    if outcome_raw is not None:
        parsed = parse_outcome(outcome_raw)
        if parsed is None:
            dropped.append("invalid_outcome")
        else:
            outcome, outcome_value = parsed
    return Attributed(canonical_tags(tags), tags, str(session or ""), outcome, outcome_value, tuple(dropped))


class SessionSpend:
    """What each recent session spent through this sidecar (for `kubetoll_outcome_spend_usd_total`).

    Bounded (least recently used sessions are forgotten first): the ledger has the exact figures;
    this is the live metric's approximation, per pod.
    """

    def __init__(self, max_sessions: int = 10_000) -> None:
        self.max_sessions = max_sessions
        self._spent: OrderedDict[str, float] = OrderedDict()

    def add(self, session: str, usd: float) -> None:
        if not session:
            return
        self._spent[session] = self._spent.pop(session, 0.0) + usd
        if len(self._spent) > self.max_sessions:
            self._spent.popitem(last=False)

    def spent(self, session: str) -> float:
        return self._spent.get(session, 0.0)
