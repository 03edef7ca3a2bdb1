-- ecst outbox, schema version 1.
-- Producers insert one row per entity change, in the same transaction as the change;
-- `ecst relay` publishes the rows to Redis Streams and deletes (or marks) them.
CREATE TABLE IF NOT EXISTS {table} (
    id                bigserial   PRIMARY KEY,
    stream            text        NOT NULL,               -- Redis stream key
    aggregate_type    text        NOT NULL,               -- e.g. athlete
    aggregate_id      text        NOT NULL,
    aggregate_version bigint      NOT NULL,               -- monotonic per aggregate
    event_type        text        NOT NULL,               -- e.g. athlete.updated
    event_id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    schema_version    integer     NOT NULL DEFAULT 1,
    occurred_at       timestamptz NOT NULL DEFAULT now(),
    payload           jsonb,                              -- the full new state; NULL = deleted
    headers           jsonb       NOT NULL DEFAULT '{}',  -- traceparent, tracestate
    created_at        timestamptz NOT NULL DEFAULT now(),
    published_at      timestamptz                         -- set by the relay under on_publish: mark
);
COMMENT ON TABLE {table} IS 'ecst outbox v1';
CREATE INDEX IF NOT EXISTS {unpublished_index} ON {table} (id) WHERE published_at IS NULL;

-- Rows the relay could not publish (bad stream name, payload not an object, ...), with why.
CREATE TABLE IF NOT EXISTS {dead_letters} (
    LIKE {table},
    error     text        NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
-- A dead letter keeps the row as it was, NULLs included (LIKE copied the NOT NULLs).
ALTER TABLE {dead_letters}
    ALTER COLUMN stream DROP NOT NULL,
    ALTER COLUMN aggregate_type DROP NOT NULL,
    ALTER COLUMN aggregate_id DROP NOT NULL,
    ALTER COLUMN aggregate_version DROP NOT NULL,
    ALTER COLUMN event_type DROP NOT NULL,
    ALTER COLUMN event_id DROP NOT NULL,
    ALTER COLUMN schema_version DROP NOT NULL,
    ALTER COLUMN occurred_at DROP NOT NULL,
    ALTER COLUMN headers DROP NOT NULL,
    ALTER COLUMN created_at DROP NOT NULL;

-- Wakes relays at commit; they poll as well, since a notification is lost while disconnected.
CREATE OR REPLACE FUNCTION {notify_function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify({channel_literal}, '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS {notify_trigger} ON {table};
CREATE TRIGGER {notify_trigger} AFTER INSERT ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {notify_function}();
