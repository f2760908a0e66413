-- The spend ledger, kept as long as the platform wants (Redis keeps 35 days: docs/ledger.md).
-- One row per ledger stream entry; its id is "<namespace>/<stream entry id>", unique because
-- each namespace has one stream and Redis never reuses an entry id within a stream.
CREATE TABLE kubetoll_spend_records (
    id text PRIMARY KEY,
    namespace text NOT NULL,
    stream_id text NOT NULL,
    flushed_at timestamptz NOT NULL,  -- the entry id's time: when the sidecar's flush reached Redis
    time timestamptz NOT NULL,  -- settlement time (the record's `time`)
    route text NOT NULL,
    backend text NOT NULL,
    tenant text NOT NULL,
    tier text NOT NULL,
    workload text NOT NULL,
    prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cached_tokens bigint NOT NULL,
    cost_usd double precision NOT NULL,
    cost_nusd numeric(30, 0) NOT NULL,  -- exact nano-USD, the integer the meters added
    cache_hit text NOT NULL,
    avoided_usd double precision NOT NULL,
    downgraded boolean NOT NULL,
    fallbacks bigint NOT NULL,
    outcome text NOT NULL,
    request_id text NOT NULL,
    refused_budget text NOT NULL,
    refused_meter text NOT NULL,
    batch_id text NOT NULL,
    experiment text NOT NULL,
    arm text NOT NULL,
    cascade text NOT NULL,
    cascade_step bigint NOT NULL,
    escalation text NOT NULL,
    cascade_baseline_usd double precision NOT NULL,
    latency_ms double precision NOT NULL,
    session text NOT NULL,
    business_outcome text NOT NULL,
    outcome_value double precision NOT NULL,
    spillover text NOT NULL,
    tags jsonb NOT NULL DEFAULT '{}'::jsonb,  -- the record's tags as an object ({} without tags)
    sidecar text NOT NULL,  -- the sidecar that wrote the entry
    -- Stream fields no column holds (a field newer than this schema), and what the sink had to change to
    -- store a value (a NUL character, an integer beyond bigint): nothing of an entry is dropped.
    extra jsonb NOT NULL DEFAULT '{}'::jsonb,
    inserted_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX kubetoll_spend_records_time ON kubetoll_spend_records (time);
CREATE INDEX kubetoll_spend_records_namespace_time ON kubetoll_spend_records (namespace, time);
CREATE INDEX kubetoll_spend_records_tenant_time ON kubetoll_spend_records (namespace, tenant, time);
