"""Kubetoll operator: the control plane.

Custom resource models (`resources`), CRD generation (`crdgen`), the compiler from
a namespace's resources to a RouterConfig (`compiler`), the `kubetoll` sub-commands
(`commands`) and the kopf handlers (`handlers`).
"""

__version__ = "0.1.0"
