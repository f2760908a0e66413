"""The PostgreSQL ledger sink: every namespace's ledger stream drained from Redis into PostgreSQL, exactly once.

Redis keeps the ledger 35 days and the chart's Redis keeps nothing across a
restart; the sink keeps it as long as `--retention-days` says (docs/ledger.md).
`sink.py` is the loop, `schema.py` the migrations (`migrations/`), `metrics.py`
its Prometheus metrics, `redact.py` keeps the database password out of logs,
`main.py` the `kubetoll-ledger-sink` command (also `kubetoll ledger-sink`).

psycopg is imported only here, and only when the sink runs: the operator runs
without it (it is in the operator extra, but an image built without it still runs).
"""
