"""Pipeline stage 3: pick the rule, then the candidate backends (the fallback chain).

A route is the model name the app asks for. Its rules are tried in order and
the first whose conditions all hold wins; its backends are the chain the
forwarder walks. Regexes and keyword sets are compiled once per config load.
What serves the request is the rule's `Target` (experiments.py): its backends and
cascade (cascade.py), or with a `split` those of the caller's experiment arm.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kubetoll_core.enums import FailureClass
from kubetoll_core.parts import Rule
from kubetoll_core.router_config import Route, RouterConfig
from kubetoll_core.user_regex import compile_user_regex

from .cascade import CompiledCascade
from .experiments import CompiledSplit, Target


@dataclass(frozen=True, slots=True)
class RouteContext:
    prompt_tokens: int
    tenant: str
    tier: str
    headers: Mapping[str, str]
    last_user_text: Callable[[], str]  # lazy: only rules on content need it


class CompiledRule:
    __slots__ = (
        "name",
        "backends",
        "_target",
        "_split",
        "_min",
        "_max",
        "_tiers",
        "_tenants",
        "_header",
        "_hvalue",
        "_hregex",
        "_kw",
        "_re",
    )

    def __init__(self, name: str, rule: Rule) -> None:
        self.name = name
        self.backends = tuple(rule.backends)  # empty with a split: each arm names its own
        self._split = CompiledSplit(rule.split) if rule.split is not None else None
        cascade = CompiledCascade.of(rule.cascade) if rule.cascade is not None else None
        self._target = Target(self.backends, cascade)
        match = rule.match
        self._min = match.min_prompt_tokens
        self._max = match.max_prompt_tokens
        self._tiers = frozenset(match.tiers)
        self._tenants = frozenset(match.tenants)
        h = match.header
        self._header = h.name.lower() if h else None
        self._hvalue = h.value if h else None
        # User patterns run on RE2: linear time whatever the caller sends (kubetoll_core.user_regex).
        self._hregex = compile_user_regex(h.regex) if h and h.regex else None
        self._kw = (
            re.compile(r"\b(?:" + "|".join(re.escape(k) for k in match.keywords) + r")\b", re.IGNORECASE)
            if match.keywords
            else None
        )
        self._re = compile_user_regex(match.regex) if match.regex else None

    def target(self, tenant: str, headers: Mapping[str, str]) -> Target:
        """What serves this request: the rule's backends (and cascade), or its experiment arm for this caller."""
        if self._split is None:
            return self._target
        return self._split.choose(tenant, headers)

    def matches(self, ctx: RouteContext) -> bool:
        if self._min is not None and ctx.prompt_tokens < self._min:
            return False
        if self._max is not None and ctx.prompt_tokens > self._max:
            return False
        if self._tiers and ctx.tier not in self._tiers:
            return False
        if self._tenants and ctx.tenant not in self._tenants:
            return False
        if self._header is not None:
            value = ctx.headers.get(self._header)
            if value is None:
                return False
            if self._hvalue is not None and value != self._hvalue:
                return False
            if self._hregex is not None and not self._hregex.search(value):
                return False
        if self._kw is not None or self._re is not None:
            text = ctx.last_user_text()
            if self._kw is not None and not self._kw.search(text):
                return False
            if self._re is not None and not self._re.search(text):
                return False
        return True


class CompiledRoute:
    def __init__(self, route: Route) -> None:
        self.name = route.name
        self.rules = [CompiledRule(r.name or f"rule-{i}", r) for i, r in enumerate(route.rules)]
        self.fallback_on: frozenset[FailureClass] = frozenset(route.fallback_on)
        self.max_output_tokens = route.max_output_tokens
        self.downgrade_at = route.downgrade.at_percent if route.downgrade else None
        self.downgrade_chain: tuple[str, ...] = tuple(route.downgrade.backends) if route.downgrade else ()
        self.burn_rate = route.downgrade.burn_rate if route.downgrade else None
        self.cache_policy = route.cache_policy
        # Skip an in-cluster backend whose replicas' queues are all deeper (forwarder.py, replica_load.py).
        self.spillover_depth = route.spillover.queue_depth if route.spillover is not None else None
        # What a chat prompt over its limit becomes (context_policy.py; the pipeline applies it before the estimate).
        self.context = route.context
        # Every backend this route might call (cascade steps and experiment arms too).
        seen: dict[str, None] = {}
        for r in route.rules:
            seen.update(dict.fromkeys(r.backend_names()))
        self.all_backends = tuple(seen)

    def select(self, ctx: RouteContext) -> CompiledRule | None:
        for rule in self.rules:
            if rule.matches(ctx):
                return rule
        return None


def read_pod_labels(path: str) -> dict[str, str]:
    """The downward API's labels file: one `key="value"` per line. Missing file: no labels."""
    p = Path(path)
    if not p.is_file():
        return {}
    labels: dict[str, str] = {}
    for line in p.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            labels[key.strip()] = value.strip().strip('"')
    return labels


class Router:
    def __init__(self, config: RouterConfig, pod_labels: Mapping[str, str]) -> None:
        self.routes: dict[str, CompiledRoute] = {}
        for r in config.routes:
            if all(pod_labels.get(k) == v for k, v in r.pod_selector.items()):
                self.routes[r.name] = CompiledRoute(r)

    def get(self, name: str) -> CompiledRoute | None:
        return self.routes.get(name)

    def names(self) -> list[str]:
        return list(self.routes)
