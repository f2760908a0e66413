-- The model the serving backend was called with (spend records carry it from this release on):
-- `kubetoll report --by model` and the FOCUS export read it. Rows written before have ''.
ALTER TABLE kubetoll_spend_records ADD COLUMN model text NOT NULL DEFAULT '';
