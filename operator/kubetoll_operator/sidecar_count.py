"""How many sidecars share each namespace's budgets: `budgetStore.expectedSidecars` in the RouterConfig.

A sidecar that never reached Redis has not seen how many others hold leases, so
it divides its failOpen allowance by this instead: N cold sidecars together take
about one allowance, not N. The count is the namespace's pods that carry the
injector's label (`kubetoll.dev/injected: "true"`) and are not terminated (phase
Succeeded or Failed), kept by a kopf index; the config gets it rounded up to a
power of two, and a namespace is recompiled only when that rounded value moves.
So pod status updates, and pods coming and going inside one power of two, never
rewrite the ConfigMap (each rewrite makes every sidecar of the namespace reload).

The watch asks the API server for labelled, unterminated pods only (label and
field selectors, set at start-up), so the operator is not sent every pod of the
cluster; the handlers filter the same way for servers that ignore selectors. A
pod that terminates stops matching the field selector and arrives as DELETED.
With `--namespace`, kopf watches pods in those namespaces only, like the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import kopf

from .injection import INJECTED_KEY

INDEX_ID = "kubetoll_injected_pods"
TERMINATED_PHASES = ("Succeeded", "Failed")
LABEL_SELECTOR = f"{INJECTED_KEY}=true"
FIELD_SELECTOR = ",".join(f"status.phase!={phase}" for phase in TERMINATED_PHASES)


def expected_sidecars(count: int) -> int:
    """The next power of two at or above `count`; 0 (unknown) for no pods."""
    return 0 if count <= 0 else 1 << (count - 1).bit_length()


def _running(body: Any) -> bool:
    return (body.get("status") or {}).get("phase") not in TERMINATED_PHASES


@dataclass
class SidecarCounts:
    """The pods kopf indexed per namespace, and the rounded count each namespace was last compiled with."""

    index: Any = None  # kopf's index: namespace -> one entry per injected pod not terminated
    compiled: dict[str, int] = field(default_factory=dict)

    def bind(self, kwargs: dict[str, Any]) -> None:
        if INDEX_ID in kwargs:
            self.index = kwargs[INDEX_ID]

    def count(self, namespace: str) -> int:
        if self.index is None or namespace not in self.index:
            return 0
        return len(self.index[namespace])

    def for_compile(self, namespace: str) -> int:
        """`expectedSidecars` for a compile of the namespace starting now (remembered, to compare with later)."""
        value = self.compiled[namespace] = expected_sidecars(self.count(namespace))
        return value

    def stale(self, namespace: str) -> bool:
        """The namespace was compiled with a rounded count its pods no longer make.

        A namespace never compiled is not stale: its first compile reads the index.
        """
        return namespace in self.compiled and self.compiled[namespace] != expected_sidecars(self.count(namespace))

    def forget(self, namespace: str) -> None:
        self.compiled.pop(namespace, None)


class Recompiles(Protocol):
    """What the pod handler needs of handlers.Reconciler (imported the other way round)."""

    sidecars: SidecarCounts

    def bind(self, kwargs: dict[str, Any]) -> None: ...

    def request(self, namespace: str, why: str) -> None: ...


def register(registry: kopf.OperatorRegistry, reconciler: Callable[[Any], Recompiles]) -> None:
    """Add the pod index, its selectors and the recompile trigger; `reconciler(memo)` gives the Reconciler."""

    @kopf.on.startup(id="kubetoll-pod-selectors", registry=registry)
    def _selectors(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.label_selectors["v1", "pods"] = LABEL_SELECTOR
        settings.watching.field_selectors["v1", "pods"] = FIELD_SELECTOR

    def _injected_pod(*, namespace: str | None, uid: str | None, **_: Any) -> dict[str | None, Any]:
        return {namespace: uid}

    _injected_pod.__name__ = INDEX_ID
    kopf.index(
        "v1",
        "pods",
        id=INDEX_ID,
        labels={INJECTED_KEY: "true"},
        when=lambda body, **_: _running(body),
        registry=registry,
    )(_injected_pod)

    # Not filtered by phase: a pod turning Succeeded must still recount (the index has dropped it by then).
    @kopf.on.event("v1", "pods", id="recount_sidecars", labels={INJECTED_KEY: "true"}, registry=registry)
    async def _recount(*, type: str | None, namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
        r = reconciler(memo)
        r.bind(kwargs)
        if namespace is not None and r.sidecars.stale(namespace):
            count = r.sidecars.count(namespace)
            r.request(
                namespace,
                f"Pod {name} {type or 'listed'}: {count} sidecars, expectedSidecars {expected_sidecars(count)}",
            )
