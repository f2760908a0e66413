"""Who this sidecar spends for: its pod's namespace, name, ServiceAccount and workload.

The injector (`kubetoll_operator.injection`) hands them to the sidecar container as
environment variables: the first three through the downward API, so Kubernetes
fills them in and the app cannot choose them; the workload (`Deployment/search-api`,
`StatefulSet/db`, `CronJob/nightly`, `App/chat`, `Pod/debug`) as a literal the injector
derived from the pod's owner and labels at admission. The sidecar reads them once at
start: every ledger record carries the workload, the access log too, and
`kubetoll_sidecar_info` exposes all four.

Outside a pod (`kubetoll run`, a sidecar started by hand) the variables are missing:
the pod name falls back to `HOSTNAME` and the rest stays empty (reports show
"(unknown)"). Values go into records and metric labels, so each is checked: one
line of plain name characters, at most 253 of them (a workload must also be
`Kind/name`). A value that fails is dropped with a warning naming the variable,
and the sidecar runs on without it rather than record a line break or a megabyte.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from kubetoll_core.names import MAX_WORKLOAD_CHARS, WORKLOAD_PATTERN

log = logging.getLogger("kubetoll.sidecar")

NAMESPACE_ENV = "KUBETOLL_POD_NAMESPACE"  # downward API: metadata.namespace
POD_ENV = "KUBETOLL_POD_NAME"  # downward API: metadata.name
SERVICE_ACCOUNT_ENV = "KUBETOLL_POD_SERVICE_ACCOUNT"  # downward API: spec.serviceAccountName
WORKLOAD_ENV = "KUBETOLL_WORKLOAD"  # the injector's literal, e.g. "Deployment/search-api"
HOSTNAME_ENV = "HOSTNAME"  # the pod name in a pod (unless spec.hostname says otherwise)

MAX_VALUE_CHARS = 253  # a Kubernetes object name's limit (RFC 1123 subdomain)
# Namespace, pod and ServiceAccount names are RFC 1123 subdomains in a pod; outside one
# HOSTNAME may carry upper case (a laptop), which is still a harmless label value.
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_WORKLOAD = re.compile(WORKLOAD_PATTERN)


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    namespace: str = ""
    pod: str = ""
    service_account: str = ""
    workload: str = ""  # "" when unknown

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkloadIdentity:
        """The identity the injector gave this container (os.environ by default); checked, never raises."""
        env = os.environ if env is None else env
        return cls(
            namespace=_checked(env, NAMESPACE_ENV, _NAME, MAX_VALUE_CHARS),
            pod=_checked(env, POD_ENV, _NAME, MAX_VALUE_CHARS) or _checked(env, HOSTNAME_ENV, _NAME, MAX_VALUE_CHARS),
            service_account=_checked(env, SERVICE_ACCOUNT_ENV, _NAME, MAX_VALUE_CHARS),
            workload=_checked(env, WORKLOAD_ENV, _WORKLOAD, MAX_WORKLOAD_CHARS),
        )


def _checked(env: Mapping[str, str], name: str, pattern: re.Pattern[str], limit: int) -> str:
    value = env.get(name, "")
    if not value:
        return ""
    if len(value) <= limit and pattern.fullmatch(value):
        return value
    # The value itself is not repeated: it failed because it is not a plain name, and may be long.
    why = f"longer than {limit} characters" if len(value) > limit else "not a plain name (letters, digits, . _ -)"
    if pattern is _WORKLOAD and len(value) <= limit:
        why = "not Kind/name"
    log.warning("environment variable %s is %s: ignored, records and metrics go without it", name, why)
    return ""
