"""What serves a request once its rule is chosen (a `Target`), and experiments: a rule's traffic split by weight.

A rule without `split` has one target: its backends (the fallback chain) and its
cascade, if any. A rule with `split` has one target per arm, and each request goes
to one of them. Which one is a pure function of the experiment's name and the
caller's key (the tenant id, or the `x-kubetoll-session` header with `stickyBy:
session`): a blake2b hash of the two, read as a point in [0, 1), falls into one
arm's share of the weights laid end to end in the arms' order. So a caller stays on
its arm across requests, restarts and every sidecar of the namespace (no state,
no coordination), as long as the experiment's name and weights stay as they are;
with two arms, moving weight from one to the other moves only the callers in
between. `stickyBy: none` draws each request on its own.

The experiment and arm go on every spend record of the request (`kubetoll report
--experiment NAME` reads them back, docs/routing.md "Experiments") and into the
response headers `x-kubetoll-experiment` and `x-kubetoll-arm`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetoll_core.enums import StickyBy
from kubetoll_core.parts import Split

from .cascade import CascadeRun, CompiledCascade
from .forwarder import BackendRuntime
from .providers.base import Usage

# The request header naming a session, for `stickyBy: session`.
SESSION_HEADER = "x-kubetoll-session"


@dataclass(frozen=True, slots=True)
class Target:
    """The backends that serve a request (the last step of its cascade, if it has one), and its experiment arm."""

    backends: tuple[str, ...]
    cascade: CompiledCascade | None = None
    experiment: str = ""
    arm: str = ""

    @property
    def all_backends(self) -> tuple[str, ...]:
        """Every backend the target may call: the cascade's steps, then `backends`."""
        steps = self.cascade.steps if self.cascade is not None else ()
        return tuple(dict.fromkeys(b for chain in (*steps, self.backends) for b in chain))

    def cascade_run(
        self, endpoint: str, stream: bool, downgraded: bool, backends: Mapping[str, BackendRuntime]
    ) -> CascadeRun | None:
        """This request's way through the target's cascade; None when it has none or it does not apply
        (docs/routing.md: streams with `skip`, endpoints other than chat, a downgraded request)."""
        c = self.cascade
        if c is None or downgraded or not c.applies(endpoint, stream):
            return None
        return CascadeRun(c, self.backends, backends[self.backends[0]])

    @property
    def arm_id(self) -> str:
        """`experiment/arm` under an experiment, else "" (what partitions the cache: cache.keys.scope_value)."""
        return f"{self.experiment}/{self.arm}" if self.experiment else ""

    def arm_headers(self) -> dict[str, str]:
        """The response headers naming the experiment arm (none without an experiment)."""
        return {"x-kubetoll-experiment": self.experiment, "x-kubetoll-arm": self.arm} if self.experiment else {}

    def arm_fields(self) -> dict[str, Any]:
        """The spend-record fields naming the experiment arm (none without an experiment)."""
        return {"experiment": self.experiment, "arm": self.arm} if self.experiment else {}

    def headers(self, run: CascadeRun | None) -> dict[str, str]:
        """The response headers saying how the request was routed: its experiment arm, its cascade."""
        h = self.arm_headers()
        if run is not None:
            h.update(run.headers())
        elif self.cascade is not None:
            h["x-kubetoll-cascade"] = "skipped"
        return h

    def record_fields(self, run: CascadeRun | None, usage: Usage | None, cost: float) -> dict[str, Any]:
        """The request's spend-record fields for its experiment arm and cascade (none when it has neither)."""
        out = self.arm_fields()
        if run is not None and run.answered >= 0 and usage is not None:
            out.update(run.record_fields(usage, cost))
        elif run is not None and run.answered < 0:  # the request failed: how far it got
            out.update(run.failure_fields())
        return out


def assignment_hash(experiment: str, key: str) -> int:
    """The caller's 64-bit hash for this experiment: the same on every sidecar, for every request."""
    # surrogatepass: a header aiohttp decoded with surrogateescape must still hash (to itself).
    data = experiment.encode() + b"\x00" + key.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class CompiledSplit:
    """A rule's experiment: its arms as targets, and the sticky weighted choice between them."""

    __slots__ = ("experiment", "sticky_by", "arms", "_bounds", "_total")

    def __init__(self, split: Split) -> None:
        self.experiment = split.experiment
        self.sticky_by = split.sticky_by
        self.arms = tuple(
            Target(
                tuple(arm.backends),
                CompiledCascade.of(arm.cascade) if arm.cascade is not None else None,
                split.experiment,
                arm.name,
            )
            for arm in split.arms
        )
        bounds, total = [], 0
        for arm in split.arms:
            total += arm.weight
            bounds.append(total)
        self._bounds = tuple(bounds)  # arm i takes [bounds[i-1], bounds[i]) of [0, total)
        self._total = total  # > 0: the Split model refuses arms that are all weight 0

    def key(self, tenant: str, headers: Mapping[str, str]) -> str | None:
        """What keeps the caller on its arm; None: draw this request on its own."""
        if self.sticky_by is StickyBy.none:
            return None
        if self.sticky_by is StickyBy.session:
            session = headers.get(SESSION_HEADER)
            if session:
                return "session:" + session
        return "tenant:" + tenant

    def choose(self, tenant: str, headers: Mapping[str, str]) -> Target:
        key = self.key(tenant, headers)
        # Integers throughout: the hash scaled to [0, total) exactly, so no rounding moves a caller.
        at = (
            random.randrange(self._total)
            if key is None
            else (assignment_hash(self.experiment, key) * self._total) >> 64
        )
        for arm, bound in zip(self.arms, self._bounds):
            if at < bound:
                return arm
        raise AssertionError("unreachable: at < total == the last bound")
