"""Kubetoll core: the contract the control plane and the data plane share.

The RouterConfig the operator writes and the sidecar reads (`router_config`),
the enums and sub-models both the custom resources and the RouterConfig are made
of (`enums`, `parts`), budget meter names and calendar periods (`meters`,
`periods`), the Redis key layout, connection and readers (`redis_keys`,
`redis_connect`, `ledger_stream`, `kill_switch`), the spend record and its codec
(`spend_record`) and price resolution (`prices`).

Nothing here knows Kubernetes or serves HTTP: `kubetoll_sidecar` and
`kubetoll_operator` depend on this package, never the other way round
(import-linter contracts in pyproject.toml).
"""

__version__ = "0.1.0"
