-- The athletes service's own table (examples/producer.sql writes it together with the outbox;
-- the snapshot endpoint serves it).
CREATE TABLE IF NOT EXISTS athletes (
    id           text        PRIMARY KEY,
    version      bigint      NOT NULL,
    display_name text        NOT NULL,
    country_code text        NOT NULL,
    weight_class text        NOT NULL,
    status       text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
