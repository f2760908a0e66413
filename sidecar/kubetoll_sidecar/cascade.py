"""Cascades: a cheap backend first, escalating to the next step only when its answer fails a check.

A rule's (or experiment arm's) `cascade.steps` are tried in order before its
`backends`, which are the last step and are served unchecked. Each step is a
fallback chain walked by the forwarder as any chain is: a failure in the route's
`fallbackOn` classes moves to the step's next backend; a step whose every backend
failed escalates to the next step (reason `failed`), as does one no backend of
which can serve the request (nothing sent); a caller's error (a 400 from the
provider) ends the request as it would without a cascade. A step's answer is
checked (`answer_checks`): one that fails escalates, named by the check.

What a cascade applies to: chat completions, not streamed, or streamed with
`streams: buffer` (each cheaper step's stream is read whole, checked, and sent only
if it passes; the last step streams live). Everything else (`streams: skip`, the
other endpoints, a request the budget downgraded, a Batch API line) is served by
the target's `backends` alone, with the header `x-kubetoll-cascade: skipped`.

Billing: every step that was called is billed. The reservation covers every step's
dearest backend (`combine_holds`: the worst case is every step called), and a step
whose answer was not served is handed back as a `Spend` with outcome
`cascade_escalated` in the request's `abandoned` list, so the pipeline settles and
records it with the request, however the request ends (the answer served, the last
step failing, the client leaving).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from kubetoll_core.enums import CascadeCheck, CascadeStreams, FailureClass
from kubetoll_core.parts import Cascade
from kubetoll_core.spend_record import CASCADE_ESCALATED_OUTCOME

from . import answer_checks
from .budgets.store import Hold
from .forwarder import AllBackendsFailed, BackendRuntime, Forwarded, Forwarder, Spend, UpstreamRejected
from .providers.base import Endpoint, Usage
from .request_parsing import ParsedRequest

# Why a step's answer was not served when no check failed: its backends failed, or its stream did.
FAILED = "failed"
# Why a step was passed by without a call: none of its backends' context windows holds the prompt.
CONTEXT_WINDOW = "context_window"


@dataclass(frozen=True, slots=True)
class CompiledCascade:
    steps: tuple[tuple[str, ...], ...]  # the steps before the target's backends, cheapest first
    checks: tuple[CascadeCheck, ...]
    streams: CascadeStreams

    @classmethod
    def of(cls, cascade: Cascade) -> CompiledCascade:
        """The cascade as the sidecar runs it; what its checks need is loaded now, with the config."""
        answer_checks.prepare(cascade.checks)
        return cls(tuple(tuple(s.backends) for s in cascade.steps), tuple(cascade.checks), cascade.streams)

    def applies(self, endpoint: str, stream: bool) -> bool:
        return endpoint == Endpoint.chat and (not stream or self.streams is CascadeStreams.buffer)


def combine_holds(per_chain: Sequence[list[Hold]]) -> list[Hold]:
    """One hold per meter for the whole cascade: each step's holds (its dearest backend) added up."""
    if len(per_chain) == 1:
        return per_chain[0]
    total: dict[str, Hold] = {}
    for holds in per_chain:
        for h in holds:
            prev = total.get(h.meter.key)
            total[h.meter.key] = h if prev is None else Hold(h.meter, prev.amount + h.amount, prev.enforce)
    return list(total.values())


OnFallback = Callable[[str, str], None]


class CascadeRun:
    """One request's way through a cascade: which steps it called, why each escalated, which answered."""

    __slots__ = ("cascade", "chains", "ran", "answered", "escalations", "skipped", "baseline")

    def __init__(self, cascade: CompiledCascade, final: tuple[str, ...], baseline: BackendRuntime) -> None:
        self.cascade = cascade
        self.chains: tuple[tuple[str, ...], ...] = (*cascade.steps, final)
        self.ran = False  # forwarding began (a request refused before it has no cascade to tell of)
        self.answered = -1  # the step whose answer was served (-1: none yet)
        self.escalations: list[str] = []  # per step passed: the check it failed, "failed" or "context_window"
        self.skipped = 0  # of those, the steps passed by without a call (context_window)
        self.baseline = baseline  # the last step's first backend: what "always the strong model" would call

    def fit(self, steps: Sequence[tuple[str, ...]], final: tuple[str, ...]) -> None:
        """The backends each step may call (an empty step is passed by) and the last step's chain."""
        self.chains = (*steps, final)

    @property
    def label(self) -> str:
        """first (the first step's answer was served), escalated (a later step's), failed (none: an error)."""
        return "first" if self.answered == 0 else "escalated" if self.answered > 0 else "failed"

    def headers(self) -> dict[str, str]:
        if not self.ran:
            return {}
        called = len(self.escalations) - self.skipped + 1
        h = {"x-kubetoll-cascade": self.label, "x-kubetoll-cascade-attempts": str(called)}
        if self.escalations:
            h["x-kubetoll-cascade-escalations"] = ",".join(self.escalations)
        return h

    def record_fields(self, usage: Usage, cost: float) -> dict[str, Any]:
        """The answering record's cascade fields: the label, the step, and what the last step would have cost."""
        last = len(self.chains) - 1
        baseline = cost if self.answered == last else self.baseline.price.cost(usage)
        return {"cascade": self.label, "cascade_step": self.answered, "cascade_baseline_usd": baseline}

    def failure_fields(self) -> dict[str, Any]:
        """A failed request's record (under an experiment): whether it had escalated before it failed."""
        return {"cascade": "escalated" if self.escalations else "first", "cascade_step": len(self.escalations)}

    async def run(
        self,
        forwarder: Forwarder,
        chain_of: Callable[[tuple[str, ...]], list[BackendRuntime]],
        endpoint: str,
        req: ParsedRequest,
        fallback_on: frozenset[FailureClass],
        on_fallback: OnFallback | None,
        prompt_tokens: int,
        abandoned: list[Spend],
        spillover_depth: int | None = None,
        on_spillover: Callable[[str], None] | None = None,
    ) -> Forwarded:
        """The answer served: the first step's that passes the checks, else the last step's, unchecked.
        Each step is a chain as the forwarder walks one (its fallback, the route's spill-over).

        Raises what the forwarder raises for the last step (or for a caller's error at any step);
        the steps called before are in `abandoned` either way."""
        self.ran = True
        earlier = 0.0  # upstream seconds of the steps whose answers were not served
        last = len(self.chains) - 1
        for step, names in enumerate(self.chains):
            if not names:  # no backend of the step can hold the prompt (fit): nothing is sent or billed
                self.escalations.append(CONTEXT_WINDOW)
                self.skipped += 1
                continue
            before = len(abandoned)
            try:
                fwd = await forwarder.forward(
                    chain_of(names),
                    endpoint,
                    req.upstream_body,
                    req.stream,
                    fallback_on,
                    req.model,
                    req.include_usage,
                    on_fallback,
                    prompt_tokens=prompt_tokens,
                    abandoned=abandoned,
                    spillover_depth=spillover_depth,
                    on_spillover=on_spillover,
                )
            except (AllBackendsFailed, UpstreamRejected) as exc:
                self._tag(abandoned, before, step)
                nothing_sent = isinstance(exc, UpstreamRejected) and all(
                    a.outcome == "unsupported" for a in exc.attempts
                )
                if step == last or not (isinstance(exc, AllBackendsFailed) or nothing_sent):
                    raise  # the last step's failure, or the caller's error (the next step would be asked the same)
                self.escalations.append(FAILED)
                continue
            self._tag(abandoned, before, step)
            if step == last:
                self.answered = step
                fwd.upstream_seconds += earlier
                return fwd
            reason, seconds = await self._judge(fwd, req, prompt_tokens, abandoned, step)
            if reason is None:
                self.answered = step
                fwd.upstream_seconds = seconds + earlier
                return fwd
            earlier += seconds
            self.escalations.append(reason)
        raise AssertionError("unreachable: the last step returns or raises")

    @staticmethod
    def _tag(abandoned: list[Spend], before: int, step: int) -> None:
        """Fan-out calls a step left unused are billed as that step's."""
        for s in abandoned[before:]:
            s.cascade_step = step

    async def _judge(
        self, fwd: Forwarded, req: ParsedRequest, prompt_tokens: int, abandoned: list[Spend], step: int
    ) -> tuple[str | None, float]:
        """Whether the step's answer is served (None) or why not, and the upstream seconds it took. An answer
        not served is closed and handed to `abandoned` as spend."""
        checks = self.cascade.checks
        if fwd.stream is None:
            reason = answer_checks.failed_check(fwd.body, req.body, checks)
            if reason is not None:
                abandoned.append(_escalated(fwd.backend, fwd.usages, step, reason))
            return reason, fwd.upstream_seconds
        # Only a buffered stream needs it: the cache's assembler puts the streamed answer back together.
        from .cache.replay import StreamAssembler

        st = fwd.stream
        model = fwd.backend.config.model
        assembler = StreamAssembler(Endpoint.chat)
        chunks = list(st.pending)
        try:
            while not st.done:
                more = await st.next_chunks()
                if more is None:
                    break
                chunks.extend(more)
                if st.error() is not None:
                    break
        except asyncio.CancelledError:
            st.close()
            abandoned.append(_escalated(fwd.backend, st.usages(model, prompt_tokens), step, FAILED))
            raise
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            pass  # the stream failed part way: judged below as not done
        seconds = time.monotonic() - st.started
        body = None
        if st.done and st.error() is None:
            for c in chunks:
                assembler.feed(c)
            body = assembler.body()
        reason = FAILED if body is None else answer_checks.failed_check(body, req.body, checks)
        if reason is not None:
            st.close()
            abandoned.append(_escalated(fwd.backend, st.usages(model, prompt_tokens), step, reason))
            return reason, seconds
        st.pending = chunks  # the relay sends the whole buffered answer, then finds the stream done
        return None, seconds


def _escalated(backend: BackendRuntime, usages: list[Usage], step: int, reason: str) -> Spend:
    return Spend(backend, usages, outcome=CASCADE_ESCALATED_OUTCOME, cascade_step=step, escalation=reason)
