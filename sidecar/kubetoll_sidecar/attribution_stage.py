"""The pipeline's attribution stage: what a request says about itself, onto its records and metrics.

`attribution.py` reads and bounds the tags, session and outcome a request carries;
this stage applies them: it reads them for a request (stage 2, after identify),
names the session its budget meters use (with when it began, where the tier ends
idle sessions: `budgets/session_starts.py`), writes outcome records, and stamps
every spend record of the request with its tags and session while counting the
attribution metrics (spend by tag, a session's spend for cost per outcome).

Its state outlives config reloads (one per sidecar, owned by the pipeline): the
distinct values each tag key has had today, each session's spend, session starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kubetoll_core.periods import Clock
from kubetoll_core.spend_record import OUTCOME_REPORTED, SpendRecord

from . import attribution
from .budgets.session_starts import SessionStarts
from .context import RequestContext
from .ledger import Ledger
from .metrics import Metrics
from .state import RouterState


class AttributionStage:
    def __init__(
        self, ledger: Ledger, metrics: Metrics, clock: Clock, workload: str, sessions: SessionStarts | None = None
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.clock = clock
        self.workload = workload
        self.tag_values = attribution.DistinctValues()
        self.session_spend = attribution.SessionSpend()
        # Shared through Redis when the server gives a client, else kept in this sidecar.
        self.sessions = sessions or SessionStarts("local", None, wall=clock.time)

    async def read(self, ctx: RequestContext, body: dict[str, Any]) -> None:
        """Stage 2 (cont.): the tags and session the route accepts, a reported outcome, the session's meter id."""
        state = ctx.state
        a = ctx.attribution = attribution.read(
            state.attribution.rules(ctx.route_name), self.tag_values, ctx.request.headers, body, self.clock.time()
        )
        for reason in a.dropped:
            self.metrics.attribution_dropped.labels(reason).inc()
        if a.outcome:
            self.record_outcome(state, ctx.tenant, ctx.tier, a.session, ctx.request_id, a.outcome, a.outcome_value)
        if a.session:
            ctx.session_meter = await self._session_meter(ctx, state)

    async def _session_meter(self, ctx: RequestContext, state: RouterState) -> str:
        """The session id the budget meters use: with the time it began where the tier ends idle sessions."""
        session = ctx.attribution.session
        idle = state.meters.session_idle_seconds(ctx.tier)
        if idle is None:
            return session
        return f"{session}@{await self.sessions.start_of(ctx.tier, session, idle)}"

    def stamp(self, ctx: RequestContext, record: SpendRecord) -> SpendRecord:
        """A record of this request with its tags and session, counted in the attribution metrics."""
        a = ctx.attribution
        if record.cost_usd:
            self.session_spend.add(a.session, record.cost_usd)
            rules = ctx.state.attribution.rules(ctx.route_name)
            for key, value in a.tag_map.items():
                rule = rules.get(key)
                if rule is not None and rule.metric_label:
                    self.metrics.spend_by_tag.labels(ctx.route_name, key, value).inc(record.cost_usd)
        return dataclasses.replace(record, tags=a.tags, session=a.session)

    def record_outcome(
        self, state: RouterState, tenant: str, tier: str, session: str, request_id: str, name: str, value: float
    ) -> SpendRecord:
        """An outcome record (no spend): the app says this session or request ended with `name`."""
        # Outcome names are the app's to choose: bounded like a tag's values (the metric's label set).
        name = self.tag_values.admit(attribution.OUTCOME_KEY, name, attribution.MAX_OUTCOMES_PER_DAY, self.clock.time())
        record = SpendRecord(
            time=self.clock.time(),
            namespace=state.config.namespace,
            route="",
            backend="",
            tenant=tenant,
            tier=tier,
            prompt_tokens=0,
            completion_tokens=0,
            cached_tokens=0,
            cost_usd=0.0,
            outcome=OUTCOME_REPORTED,
            request_id=request_id,
            workload=self.workload,
            session=session,
            business_outcome=name,
            outcome_value=value,
        )
        self.ledger.append(record)
        self.metrics.outcomes.labels(name).inc()
        self.metrics.outcome_spend.labels(name).inc(self.session_spend.spent(session))
        return record
