"""A Service's ready replicas, from its EndpointSlices (discovery.k8s.io/v1), for a ModelBackend's serviceRef.

The compiler (`compile_namespace`, kept pure) takes the namespace's EndpointSlices as
input objects like the other resources; `handlers.py` lists those of the Services a
ModelBackend references and recompiles when one of them changes (docs/operator.md,
"Replicas of in-cluster backends"). Each ready endpoint becomes one replica of the
compiled backend: its own base URL (`scheme://address:port` + the serviceRef's path)
and its pod's name, so the sidecar can call the least loaded one directly
(docs/routing.md, "Load-aware choice and spill-over").

What counts:

* a slice belongs to the Service its `kubernetes.io/service-name` label names;
* an endpoint is used when its `conditions.ready` is not false (the API says an
  absent value means unknown, to be taken as ready), and only its first address
  (the API: the addresses of one endpoint are fungible);
* the port is the slice port named `serviceRef.portName` when that is set, else the
  one numbered `serviceRef.port`, else, in a slice with a single unnamed port (a
  single-port Service, whose target port may differ), that one;
* addresses are IPv4, IPv6 (bracketed in the URL) or FQDN, as `addressType` says.

The replicas are sorted by URL (then name), so the config, and its hash, change only
when the set of ready replicas does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
API_VERSION = "discovery.k8s.io/v1"
KIND = "EndpointSlice"
# A replica name as the RouterConfig takes it (a pod name is a DNS subdomain).
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
MAX_REPLICAS = 1000  # RouterConfig's bound on one backend's replicas


def is_endpoint_slice(obj: Mapping[str, Any]) -> bool:
    return obj.get("apiVersion") == API_VERSION and obj.get("kind") == KIND


def slices_among(resources: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The EndpointSlice objects among a list of manifests (what `kubetoll compile` and the tests pass)."""
    return [o for o in resources if is_endpoint_slice(o)]


def service_of(slice_: Mapping[str, Any]) -> str | None:
    labels = (slice_.get("metadata") or {}).get("labels") or {}
    name = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, Mapping) else None
    return name if isinstance(name, str) else None


def _port_of(slice_: Mapping[str, Any], port: int, port_name: str | None) -> int | None:
    ports = [p for p in slice_.get("ports") or () if isinstance(p, Mapping)]
    numbers = [(p.get("name") or "", p.get("port")) for p in ports if isinstance(p.get("port"), int)]
    if port_name is not None:
        return next((n for name, n in numbers if name == port_name), None)
    if any(n == port for _, n in numbers):
        return port
    if len(numbers) == 1 and numbers[0][0] == "":
        return numbers[0][1]
    return None


def _host(address: str, address_type: str) -> str:
    return f"[{address}]" if address_type == "IPv6" or ":" in address else address


def replicas_of(
    service: str,
    port: int,
    port_name: str | None,
    scheme: str,
    path: str,
    slices: Iterable[Mapping[str, Any]],
) -> list[dict[str, str]]:
    """The ready replicas of `service` as RouterConfig `replicas` entries ({url, name}), sorted by URL."""
    found: dict[str, str] = {}  # url → name
    for s in slices:
        if not is_endpoint_slice(s) or service_of(s) != service:
            continue
        target = _port_of(s, port, port_name)
        if target is None:
            continue
        address_type = str(s.get("addressType") or "IPv4")
        for ep in s.get("endpoints") or ():
            if not isinstance(ep, Mapping):
                continue
            conditions = ep.get("conditions") or {}
            if isinstance(conditions, Mapping) and conditions.get("ready") is False:
                continue
            addresses = [a for a in ep.get("addresses") or () if isinstance(a, str) and a]
            if not addresses:
                continue
            url = f"{scheme}://{_host(addresses[0], address_type)}:{target}{path}".rstrip("/")
            ref = ep.get("targetRef") or {}
            name = ref.get("name") if isinstance(ref, Mapping) else None
            if not isinstance(name, str) or not _NAME.match(name) or len(name) > 253:
                hostname = ep.get("hostname")
                name = hostname if isinstance(hostname, str) and _NAME.match(hostname) else ""
            found.setdefault(url, name)
    ordered = sorted(found.items(), key=lambda kv: (kv[0], kv[1]))[:MAX_REPLICAS]
    # A replica with no usable pod name is named by its place in the list: never by its address
    # alone (a label value should say which pod, and an address is not one).
    return [{"url": url, "name": name or f"replica-{i}"} for i, (url, name) in enumerate(ordered)]


def fingerprint_fields(slice_: Mapping[str, Any]) -> Any:
    """What of a slice the compiled replicas depend on (the operator's event handler compares these)."""
    endpoints = []
    for ep in slice_.get("endpoints") or ():
        if isinstance(ep, Mapping):
            conditions = ep.get("conditions") or {}
            endpoints.append(
                (
                    list(ep.get("addresses") or ()),
                    conditions.get("ready") if isinstance(conditions, Mapping) else None,
                    (ep.get("targetRef") or {}).get("name") if isinstance(ep.get("targetRef"), Mapping) else None,
                    ep.get("hostname"),
                )
            )
    ports = [(p.get("name"), p.get("port")) for p in slice_.get("ports") or () if isinstance(p, Mapping)]
    return (slice_.get("addressType"), sorted(map(repr, endpoints)), sorted(map(repr, ports)), service_of(slice_))
