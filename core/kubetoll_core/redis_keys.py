"""The Redis key layout of the shared budget store (docs/redis-layout.md describes it in full).

Every key starts with `kt:{<namespace>` so one namespace's keys can be fenced
off with an ACL key pattern, and a budget's keys carry the hash tag
`{<namespace>:<budget>}` so a Redis Cluster keeps them in one slot and one Lua
script may touch all of them.

Nothing outside this module builds a key, and nothing here takes a raw key:
callers pass a namespace (fixed when a `RedisKeys` is built) and a budget or a
meter key, both validated, so a store configured for one namespace cannot name a
key of another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .meters import DEFAULT_SCALE, SCALE, scale_of, to_units  # noqa: F401 (re-exported for the readers)
from .names import NAME_PATTERN

_NAME = re.compile(NAME_PATTERN)

PREFIX = "kt"

DAY = 86_400
# How long a window meter's keys outlive the end of their period (reports and the
# operator's status read last period's totals; the ledger keeps the detail).
RETENTION_AFTER_PERIOD = {"day": 35 * DAY, "month": 400 * DAY}
BUCKET_IDLE_GRACE_MS = 60_000  # a bucket key lives this long past the time it would be full again
INDEX_TTL_S = 400 * DAY + DAY  # index keys: refreshed on use, longer than any meter they list

_DAY_ID = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MONTH_ID = re.compile(r"^\d{4}-\d{2}$")


def check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{what} {value!r} must match {NAME_PATTERN}")
    return value


def period_kind(pid: str) -> str:
    """ "day" for a day id (2026-11-22), "month" for a month id (2026-11), "" for anything else."""
    if _DAY_ID.match(pid):
        return "day"
    if _MONTH_ID.match(pid):
        return "month"
    return ""


def period_of(meter_key: str) -> tuple[str, str]:
    """(period kind, period id) of a window meter: admission puts the period id last in its key."""
    pid = meter_key.rsplit(":", 1)[-1]
    return period_kind(pid), pid


def window_expire_at(meter_key: str, period_end: float) -> float:
    """Epoch seconds when a window meter's keys expire: period end plus the retention for its kind."""
    kind, _ = period_of(meter_key)
    return period_end + RETENTION_AFTER_PERIOD.get(kind, RETENTION_AFTER_PERIOD["month"])


@dataclass(frozen=True, slots=True)
class MeterKeys:
    budget: str
    suffix: str  # the meter key without its "<budget>:" prefix
    state: str  # hash: totals, limit, lease per sidecar
    holders: str  # sorted set: sidecar id -> lease expiry (ms, Redis time)


class RedisKeys:
    """All the keys of one namespace. Home tags: `{ns}` (namespace-wide keys) and `{ns:budget}`."""

    def __init__(self, namespace: str) -> None:
        self.namespace = check_name("namespace", namespace)
        self.ns_tag = f"{{{namespace}}}"

    # -- tags

    def budget_tag(self, budget: str) -> str:
        return f"{{{self.namespace}:{check_name('budget', budget)}}}"

    def _k(self, tag: str, *parts: str) -> str:
        return ":".join((PREFIX, tag, *parts))

    # -- per budget (slot {ns:budget})

    def meter(self, budget: str, meter_key: str) -> MeterKeys:
        """The keys of a meter by its full key ("<budget>:<name>")."""
        budget = check_name("budget", budget)
        if not meter_key.startswith(budget + ":") or len(meter_key) == len(budget) + 1:
            raise ValueError(f"meter key {meter_key!r} must start with its budget name {budget!r} and a colon")
        return self.meter_named(budget, meter_key[len(budget) + 1 :])

    def meter_named(self, budget: str, suffix: str) -> MeterKeys:
        """A meter by its name within the budget (what the budget's meter index lists)."""
        tag = self.budget_tag(budget)
        return MeterKeys(budget, suffix, self._k(tag, "m", suffix), self._k(tag, "m", suffix, "holders"))

    def meter_index(self, budget: str) -> str:
        """Sorted set: meter suffix -> expiry (ms). What the operator lists to find a budget's meters."""
        return self._k(self.budget_tag(budget), "meters")

    def alert_posted(self, budget: str, meter: str, threshold: int) -> str:
        """Present once the operator posted the Event for `threshold` percent of one window meter.

        `meter` is the meter's name within the budget (it ends with its period id, so a new
        period starts with no marks). The operator sets it with SET NX: of two replicas, one posts.
        """
        if not meter or any(c in meter for c in "{}\n\r "):
            raise ValueError(f"meter name {meter!r} is not usable in a key")
        return self._k(self.budget_tag(budget), "alert", meter, str(int(threshold)))

    def suspended(self, budget: str) -> str:
        """The kill switch: present (any value) means suspended."""
        return self._k(self.budget_tag(budget), "suspended")

    def suspension_known(self, budget: str) -> str:
        """Present once the kill switch was written (set or cleared) since Redis last lost its data.

        Without it, a missing `suspended` flag says nothing: Redis may have restarted empty, so
        sidecars keep the suspension they knew until the operator re-asserts the flags from the
        TokenBudgets (`kill_switch.assert_suspensions`).
        """
        return self._k(self.budget_tag(budget), "suspended", "known")

    # -- per home tag (either {ns} or {ns:budget}): bookkeeping a sync script needs in its own slot

    def home_tag(self, budget: str | None) -> str:
        return self.ns_tag if budget is None else self.budget_tag(budget)

    def epoch(self, home_tag: str) -> str:
        """Set once by the first script to run against an empty Redis; a changed value means history was lost."""
        return self._k(self._checked_home(home_tag), "epoch")

    def sidecar(self, home_tag: str, sidecar_id: str) -> str:
        """Hash {seq, batch}: the last script sequence and flush batch applied for one sidecar (idempotency)."""
        return self._k(self._checked_home(home_tag), "sc", sidecar_id)

    # -- per namespace (slot {ns})

    def ledger(self) -> str:
        return self._k(self.ns_tag, "ledger")

    def ledger_quarantine(self) -> str:
        """Stream: records the codec had to alter (odd text), kept out of the ledger with a `defects` field."""
        return self._k(self.ns_tag, "ledger", "quarantine")

    def budgets_index(self) -> str:
        return self._k(self.ns_tag, "budgets")

    def cache_health(self, policy: str) -> str:
        """Hash: `<part>:<sidecar>` -> a report (kubetoll_core.cache_health) of a cache policy's semantic tier
        degraded in that sidecar. Written by the sidecars on a transition, read by the operator."""
        return self._k(self.ns_tag, "cachehealth", check_name("cache policy", policy))

    def cache_control(self, policy: str) -> str:
        """Hash: `<sidecar>` -> what that sidecar's error-rate controller learned for a cache policy
        (kubetoll_core.cache_health.ControlReport). Written by the sidecars, read by the operator."""
        return self._k(self.ns_tag, "cachecontrol", check_name("cache policy", policy))

    def channel(self) -> str:
        """Pub/sub channel for kill-switch changes (JSON: {"budget": ..., "suspended": bool})."""
        return self._k(self.ns_tag, "events")

    # -- context policies (kubetoll_sidecar.context_policy), slot {ns}

    def context_summary(self, digest: str) -> str:
        """String with a TTL: the summary of one conversation prefix (a route's context policy, overflow
        summarize), by the sha256 hex digest of that prefix, its summarizer and the prompt version."""
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"{digest!r} is not a sha256 hex digest")
        return self._k(self.ns_tag, "ctxsum", digest)

    # -- sessions (kubetoll_sidecar.budgets.session_starts), slot {ns}

    def session_start(self, digest: str) -> str:
        """String "<start>:<last seen>" (epoch seconds) with a TTL past the tier's sessionIdleSeconds, renewed
        on use: when one session began in one tier, by the blake2b-128 hex digest of the tier and session id."""
        if not re.fullmatch(r"[0-9a-f]{32}", digest):
            raise ValueError(f"{digest!r} is not a 128-bit hex digest")
        return self._k(self.ns_tag, "sess", digest)

    # -- Batch API (kubetoll_sidecar.batches), slot {ns}

    def upstream_object(self, object_id: str) -> str:
        """String (JSON): which backend holds a file or batch id the sidecars created or saw."""
        return self._k(self.ns_tag, "up", check_upstream_id(object_id))

    def batches_pending(self) -> str:
        """Hash: batch id -> the pending batch (JSON) whose reservation is still open."""
        return self._k(self.ns_tag, "batches")

    def batch_owners(self) -> str:
        """Hash: batch id -> the owner (a pod) that holds its reservation and settles it."""
        return self._k(self.ns_tag, "batches", "owners")

    def batch_owner_alive(self, owner: str) -> str:
        """String with a TTL: present while that owner's sidecar polls its batches."""
        return self._k(self.ns_tag, "batches", "alive", check_sidecar_id(owner))

    def _checked_home(self, tag: str) -> str:
        if tag == self.ns_tag or (tag.startswith(f"{{{self.namespace}:") and tag.endswith("}")):
            return tag
        raise ValueError(f"{tag!r} is not a home tag of namespace {self.namespace!r}")


def check_sidecar_id(value: str) -> str:
    if not re.match(r"^[A-Za-z0-9._-]{1,100}$", value):
        raise ValueError(f"sidecar id {value!r} must be 1-100 characters of [A-Za-z0-9._-]")
    return value


_UPSTREAM_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def check_upstream_id(value: str) -> str:
    """A provider's file or batch id (`file-abc123`, `batch_abc123`): plain characters only, in a key."""
    if not isinstance(value, str) or not _UPSTREAM_ID.match(value):
        raise ValueError(f"upstream id {value!r} must be 1-128 characters of [A-Za-z0-9._-]")
    return value
