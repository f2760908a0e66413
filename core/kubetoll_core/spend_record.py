"""The spend record: one settled request (or cache hit), and its codec for the Redis ledger stream.

Reports (`kubetoll report`), the operator's status and the demo read spend per
tenant, route and backend from these records. The stream entry carries the
record's own fields, the cost as exact integer nano-USD (`cost_nusd`) and the
sidecar that wrote it (docs/redis-layout.md, "ledger"). `workload` names what
spent: the workload of the writing sidecar's pod, which the injector derives from
the pod's owner (`kubetoll_sidecar.workload`); older records have none. A line of
a Batch API job carries its batch's id (`batch_id`; `kubetoll_sidecar.batches`).
A request under an experiment carries its `experiment` and `arm`, a cascaded one
its `cascade` fields (docs/routing.md); a request's record its `latency_ms`.

A *refusal record* says that admission refused a request on one budget meter
(`refused_budget`, `refused_meter`): no spend, outcome `rejected`. Sidecars write
at most one per meter per second each (`kubetoll_sidecar.budgets.refusals`); the
operator's status reads them to tell that a meter refuses before its spend reaches
the limit (a reservation stops fitting first). Spend readers (`iter_ledger`,
reports) leave them out.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from .meters import scale_of, to_units

# The outcome of a record that bills a semantic cache lookup's embedding call: spend,
# but not a request of its own (reports count requests without it).
CACHE_EMBEDDING_OUTCOME = "cache_embedding"
# The same for the call a semantic lookup makes to its verifier (rerank or judge backend).
CACHE_VERIFIER_OUTCOME = "cache_verifier"
# The outcome of a record that bills upstream calls whose answers were not used: the calls of a
# fanned-out `n` (one per choice, on a provider without `n`) that completed while a sibling failed.
# Spend on the backend that made them, not a request of its own.
FAN_OUT_ABANDONED_OUTCOME = "fan_out_abandoned"
# The outcome of a record that bills a cascade step whose answer failed a check (or whose backends
# failed) and was not served: the request escalated to the next step (docs/routing.md, "Cascades").
CASCADE_ESCALATED_OUTCOME = "cascade_escalated"
# The outcome of a record that bills the summarizer call a route's context policy made to shorten the
# request's prompt (docs/routing.md, "Context policies"): spend on the summarizer, not a request.
CONTEXT_SUMMARY_OUTCOME = "context_summary"
# Records that are spend but not requests (reports do not count them as requests).
SPEND_ONLY_OUTCOMES = frozenset(
    {
        CACHE_EMBEDDING_OUTCOME,
        CACHE_VERIFIER_OUTCOME,
        FAN_OUT_ABANDONED_OUTCOME,
        CASCADE_ESCALATED_OUTCOME,
        CONTEXT_SUMMARY_OUTCOME,
    }
)
# The outcome of a refusal record (the same word the access log and metrics use).
REFUSAL_OUTCOME = "rejected"
# The outcome of an *outcome record*: the app reported a business outcome (`business_outcome`, e.g.
# "resolved", with an optional `outcome_value`) for a session or a request (`POST
# /kubetoll/v1/outcomes`). No spend, not a request: reports divide spend by these.
OUTCOME_REPORTED = "outcome_reported"
# Records that are not requests: spend-only ones and outcome records (reports count requests without them).
NOT_REQUEST_OUTCOMES = SPEND_ONLY_OUTCOMES | {OUTCOME_REPORTED}
# The outcome of a request answered with the platform's exhaustedResponse (a session or budget
# exhausted with onExhausted: respond): a request, at no cost.
EXHAUSTED_RESPONSE_OUTCOME = "exhausted_response"


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
    # ok, upstream_error, cut_stream, client_disconnected, drain_cut, cache_embedding, cache_verifier,
    # fan_out_abandoned
    outcome: str = "ok"
    request_id: str = ""
    refused_budget: str = ""  # a refusal record: the budget whose meter refused
    refused_meter: str = ""  # ... and that meter's name in the budget, e.g. "cap:usd:2026-11-22"
    workload: str = ""  # the writing sidecar's pod's workload, e.g. "Deployment/search-api" ("" unknown)
    batch_id: str = ""  # a Batch API line: the batch it ran in (its request_id is the line's custom_id)
    experiment: str = ""  # a rule with a split: the experiment ...
    arm: str = ""  # ... and the arm the request was assigned to
    # A cascaded request's record: "first" (its first step's answer was served) or "escalated".
    cascade: str = ""
    # The cascade step whose call this record bills (0: the first); on a cascade_escalated record,
    # why that step's answer was not served: the check it failed, or "failed" (its backends failed).
    cascade_step: int = 0
    escalation: str = ""
    # A cascaded request's record: what its last step's first backend would have charged for the
    # answer served (an estimate for an answer a cheaper step gave); the saving is this minus what
    # every step of the request cost.
    cascade_baseline_usd: float = 0.0
    latency_ms: float = 0.0  # a request's record: arrival to the whole answer in hand (a stream's last chunk), ms
    # Attribution: the request's accepted tags, canonical "key=value" pairs sorted by key and joined
    # with "," (`kubetoll_core.attribution`), and its session id ("" without one).
    tags: str = ""
    session: str = ""
    # An outcome record (outcome OUTCOME_REPORTED): the outcome's name and its value (0 when none given).
    business_outcome: str = ""
    outcome_value: float = 0.0
    # The in-cluster backends this request skipped because every replica's queue was deeper than the
    # route's spillover.queueDepth (comma-separated, in chain order; "" when none): docs/routing.md.
    spillover: str = ""
    # The model name the serving backend was called with (its RouterConfig `model`); "" when no
    # backend was called (a cache hit, a refusal, an outcome record) or written by an older sidecar.
    model: str = ""

    @property
    def refusal(self) -> bool:
        return bool(self.refused_meter)

    @property
    def tag_map(self) -> dict[str, str]:
        """`tags` as a mapping ({} without tags)."""
        if not self.tags:
            return {}
        return dict(pair.partition("=")[::2] for pair in self.tags.split(","))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_RECORD_FIELDS = (
    "time", "namespace", "route", "backend", "tenant", "tier", "prompt_tokens", "completion_tokens", "cached_tokens",
    "cost_usd", "cache_hit", "avoided_usd", "downgraded", "fallbacks", "outcome", "request_id",
)  # fmt: skip
# Written only when set, so spend records stay as they were; a reader that predates
# them ignores them (decoding reads fields by name).
_OPTIONAL_FIELDS = (
    "refused_budget", "refused_meter", "workload", "batch_id", "experiment", "arm", "cascade", "escalation",
    "tags", "session", "business_outcome", "spillover", "model",
)  # fmt: skip
# The same for numbers: written only when not 0; an entry without one decodes as 0.
_OPTIONAL_INTS = ("cascade_step",)
_OPTIONAL_FLOATS = ("cascade_baseline_usd", "latency_ms", "outcome_value")
_OPTIONAL_NUMBERS = _OPTIONAL_INTS + _OPTIONAL_FLOATS


def encode_record(r: SpendRecord, sidecar_id: str) -> list[str]:
    """Stream entry fields of a spend record: its own fields, exact nano-USD, and the writer. Never raises."""
    return encode_record_checked(r, sidecar_id).fields


class EncodedRecord(NamedTuple):
    fields: list[str]  # the stream entry: always valid UTF-8 text, whatever the record held
    defects: tuple[str, ...]  # fields the codec had to change; empty when the record round-trips exactly


def encode_record_checked(r: SpendRecord, sidecar_id: str) -> EncodedRecord:
    """`encode_record`, and the names of the fields it could not write as given.

    The codec writes whatever it is given, so one odd record can never make a flush
    fail (Redis, the Lua script's JSON and every reader need UTF-8 text):

    - text that UTF-8 cannot carry (a lone surrogate: what aiohttp makes of a header
      byte that is not UTF-8) is written with Python's backslash escapes (`\\udcff`);
    - text longer than `MAX_TEXT_CHARS` is cut to that length, ending in "…";
    - a value of the wrong type is written as text (`str()`), a number that is not
      finite (or not representable) as 0, a non-bool flag as "0";
    - control characters are kept as they are: Redis and JSON carry them.

    Each of these is a defect: the store quarantines such a record instead of
    putting it in the ledger (docs/redis-layout.md, "The codec, and quarantine").
    """
    values = _RECORD_VALUES(r)
    try:
        if (
            tuple(map(type, values)) == _KINDS
            and all(map(math.isfinite, _FLOAT_VALUES(r)))
            and tuple(map(type, _OPTIONAL_VALUES(r))) == _OPTIONAL_KINDS
            and tuple(map(type, _OPTIONAL_NUMBER_VALUES(r))) == _OPTIONAL_NUMBER_KINDS
            and all(map(math.isfinite, _OPTIONAL_FLOAT_VALUES(r)))
        ):
            out = _encode_plain(r, values, sidecar_id)
            joined = "".join(out)
            if (joined.isascii() or _is_utf8(joined)) and (
                len(joined) <= MAX_TEXT_CHARS or max(map(len, out)) <= MAX_TEXT_CHARS
            ):
                return EncodedRecord(out, ())
    except (ValueError, OverflowError, TypeError):  # an int too long for str(), a cost beyond any integer, ...
        pass
    return _encode_careful(r, values, sidecar_id)


def _encode_plain(r: SpendRecord, values: tuple[Any, ...], sidecar_id: str) -> list[str]:
    """The entry of a record whose fields have their declared types (once per request: kept lean)."""
    out: list[str] = []
    for name, v in zip(_RECORD_FIELDS, values):
        out.append(name)
        out.append(repr(v) if type(v) is float else ("1" if v else "0") if type(v) is bool else str(v))
    for name in _OPTIONAL_FIELDS:
        if getattr(r, name):
            out += [name, getattr(r, name)]
    for name in _OPTIONAL_NUMBERS:
        v = getattr(r, name)
        if v:
            out += [name, repr(v) if type(v) is float else str(v)]
    out += ["cost_nusd", str(to_units(r.cost_usd, scale_of("usd"))), "sidecar", sidecar_id]
    return out


def _encode_careful(r: SpendRecord, values: tuple[Any, ...], sidecar_id: str) -> EncodedRecord:
    """Field by field, each through its kind's encoder, noting what had to change."""
    out: list[str] = []
    defects: list[str] = []
    for name, kind, v in zip(_RECORD_FIELDS, _KINDS, values):
        text, ok = _ENCODERS[kind](v)
        out += [name, text]
        if not ok:
            defects.append(name)
    for name in _OPTIONAL_FIELDS:
        v = getattr(r, name, "")
        if v != "":  # only the empty string is "not set"; anything else is written
            text, ok = _text(v)
            out += [name, text]
            if not ok:
                defects.append(name)
    for name in _OPTIONAL_NUMBERS:
        v = getattr(r, name, 0)
        if not _is_zero(v):  # only a zero is "not set"; anything else is written
            text, ok = (_int if name in _OPTIONAL_INTS else _float)(v)
            out += [name, text]
            if not ok:
                defects.append(name)
    cost = r.cost_usd if "cost_usd" not in defects else 0.0
    try:
        nusd = str(to_units(cost, scale_of("usd")))
    except (OverflowError, ValueError):  # finite, but beyond any integer a float rounds to
        nusd = "0"
        defects.append("cost_nusd")
    sid, ok = _text(sidecar_id)
    if not ok:
        defects.append("sidecar")
    out += ["cost_nusd", nusd, "sidecar", sid]
    return EncodedRecord(out, tuple(defects))


# Ledger text is identifiers (tenant ids are at most 128 characters, request ids 256):
# anything longer is not a value a reader can use, and must not bloat the stream.
MAX_TEXT_CHARS = 1024


def _text(v: Any) -> tuple[str, bool]:
    if type(v) is str and len(v) <= MAX_TEXT_CHARS and (v.isascii() or _is_utf8(v)):
        return v, True
    if not isinstance(v, str):
        try:
            v = str(v)
        except Exception:  # a value whose __str__ fails is still written, as its type
            v = f"<{type(v).__name__}>"
    if not _is_utf8(v):
        v = v.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(v) > MAX_TEXT_CHARS:
        v = v[: MAX_TEXT_CHARS - 1] + "…"
    return v, False


def _is_zero(v: Any) -> bool:
    """Whether an optional number is unset: a zero of a number type (not False, "0" or None)."""
    return type(v) in (int, float) and v == 0


def _is_utf8(v: str) -> bool:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int(v: Any) -> tuple[str, bool]:
    if type(v) is int:
        try:
            return str(v), True
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            return "0", False
    return "0", False


def _float(v: Any) -> tuple[str, bool]:
    if type(v) in (float, int):
        try:
            f = float(v)
        except OverflowError:
            return "0.0", False
        if math.isfinite(f):
            return repr(f), True
    return "0.0", False


def _bool(v: Any) -> tuple[str, bool]:
    if type(v) is bool:
        return ("1" if v else "0"), True
    return "0", False


_ENCODERS: dict[type, Callable[[Any], tuple[str, bool]]] = {str: _text, int: _int, float: _float, bool: _bool}
_FLOATS = ("time", "cost_usd", "avoided_usd")
_INTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "fallbacks")
# Each field's declared type, in _RECORD_FIELDS order.
_KINDS: tuple[type, ...] = tuple(
    float if n in _FLOATS else int if n in _INTS else bool if n == "downgraded" else str for n in _RECORD_FIELDS
)
_FLOAT_VALUES = operator.attrgetter(*_FLOATS)
_RECORD_VALUES = operator.attrgetter(*_RECORD_FIELDS)
_OPTIONAL_VALUES = operator.attrgetter(*_OPTIONAL_FIELDS)
_OPTIONAL_KINDS = (str,) * len(_OPTIONAL_FIELDS)
_OPTIONAL_NUMBER_VALUES = operator.attrgetter(*_OPTIONAL_NUMBERS)
_OPTIONAL_NUMBER_KINDS = (int,) * len(_OPTIONAL_INTS) + (float,) * len(_OPTIONAL_FLOATS)
_OPTIONAL_FLOAT_VALUES = operator.attrgetter(*_OPTIONAL_FLOATS)


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
        refused_budget=fields.get("refused_budget", ""),
        refused_meter=fields.get("refused_meter", ""),
        workload=fields.get("workload", ""),
        batch_id=fields.get("batch_id", ""),
        experiment=fields.get("experiment", ""),
        arm=fields.get("arm", ""),
        cascade=fields.get("cascade", ""),
        cascade_step=f("cascade_step", int, 0),
        escalation=fields.get("escalation", ""),
        cascade_baseline_usd=f("cascade_baseline_usd", float, 0.0),
        latency_ms=f("latency_ms", float, 0.0),
        tags=fields.get("tags", ""),
        session=fields.get("session", ""),
        business_outcome=fields.get("business_outcome", ""),
        outcome_value=f("outcome_value", float, 0.0),
        spillover=fields.get("spillover", ""),
        model=fields.get("model", ""),
    )
