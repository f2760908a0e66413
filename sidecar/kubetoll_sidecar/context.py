"""RequestContext: one request on its way through the pipeline's stages.

Each stage reads what the earlier ones decided and writes its own decision
here; the record stage (metrics, the access line, cost headers) reports from it.
One object per request, with typed fields, so no stage reaches into another's
state and nothing travels in an untyped side channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from kubetoll_core.usage import Usage

from .attribution import NONE as NO_ATTRIBUTION
from .attribution import Attributed
from .budgets.admission import MeterSet
from .budgets.store import Reservation
from .cache.stage import CacheLookup
from .cascade import CascadeRun
from .experiments import Target
from .providers.base import Endpoint
from .request_parsing import ParsedRequest
from .routing import CompiledRoute
from .state import RouterState


@dataclass(slots=True)
class RequestContext:
    request: web.Request
    endpoint: Endpoint
    state: RouterState  # this request's config, to the end (a reload does not change it)
    request_id: str
    started: float  # perf_counter at arrival
    finished: float = 0.0  # perf_counter when the pipeline returned its answer (the record reads it)
    # what the stages decided
    req: ParsedRequest | None = None  # 1 parse
    route: CompiledRoute | None = None  # 3 route
    target: Target | None = None  # 3 route: the rule's backends, or the caller's experiment arm
    cascade: CascadeRun | None = None  # 7 admit: the target's cascade, when it applies to this request
    prompt_tokens: int = 0  # 4 estimate
    meters: MeterSet = field(default_factory=MeterSet)  # 5/7: the budget levels this request falls under
    reservation: Reservation | None = None  # 7 admit
    cache: CacheLookup | None = None  # 6 cache
    # what the record stage reports
    route_name: str = ""
    tenant: str = ""
    tier: str = ""
    tier_source: str = ""  # how the tier was decided (tenancy.py: header, assigned, default, capped, token)
    backend: str = ""
    status: int = 200
    outcome: str = "ok"
    reason: str = ""
    usage: Usage | None = None
    cost: float = 0.0
    fallbacks: int = 0
    spillover: str = ""  # 8 forward: the backends skipped for their replicas' deep queues, comma-separated
    context: str = ""  # 3 route: what the context policy did, the x-kubetoll-context header (context_policy.py)
    context_cost: float = 0.0  # 3 route: what the context policy's summarizer call cost
    downgraded: bool = False
    upstream_seconds: float = 0.0
    added_before_first_byte: float | None = None  # streams: the router's share before the first byte
    settled: bool = False  # spend settled and recorded (a stream settles once, whichever path ends it)
    attribution: Attributed = NO_ATTRIBUTION  # 2 identify: tags, session, a reported outcome
    # 2 (cont.) the session as its budget meters know it: its id, and when it began where its tier ends
    # idle sessions (sessionIdleSeconds, budgets/session_starts.py); "" without a session.
    session_meter: str = ""
