-- The athletes service's writes, done right: the entity and its outbox row commit together,
-- or neither does. (The second seed's updateStatus, in SQL; any language works the same way.)
CREATE TABLE IF NOT EXISTS athletes (
    id           text        PRIMARY KEY,
    version      bigint      NOT NULL,
    display_name text        NOT NULL,
    country_code text        NOT NULL,
    weight_class text        NOT NULL,
    status       text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- A new athlete.
BEGIN;
WITH created AS (
    INSERT INTO athletes (id, version, display_name, country_code, weight_class, status)
    VALUES ('ath-4', 1, 'Kenji Mori', 'JP', 'featherweight', 'active')
    RETURNING *
)
INSERT INTO ecst_outbox (stream, aggregate_type, aggregate_id, aggregate_version, event_type,
                         occurred_at, payload)
SELECT 'athletes.athlete-updated.v1', 'athlete', id, version, 'athlete.updated', updated_at,
       jsonb_build_object('athleteId', id, 'displayName', display_name,
                          'countryCode', country_code, 'weightClass', weight_class,
                          'status', status, 'updatedAt', updated_at)
FROM created;
COMMIT;

-- updateStatus('ath-4', 'suspended'): version + 1, the full new state in the event.
BEGIN;
WITH changed AS (
    UPDATE athletes SET status = 'suspended', version = version + 1, updated_at = now()
    WHERE id = 'ath-4'
    RETURNING *
)
INSERT INTO ecst_outbox (stream, aggregate_type, aggregate_id, aggregate_version, event_type,
                         occurred_at, payload)
SELECT 'athletes.athlete-updated.v1', 'athlete', id, version, 'athlete.updated', updated_at,
       jsonb_build_object('athleteId', id, 'displayName', display_name,
                          'countryCode', country_code, 'weightClass', weight_class,
                          'status', status, 'updatedAt', updated_at)
FROM changed;
COMMIT;

-- A write that fails rolls back its event with it: no phantom athlete downstream.
BEGIN;
INSERT INTO ecst_outbox (stream, aggregate_type, aggregate_id, aggregate_version, event_type, payload)
VALUES ('athletes.athlete-updated.v1', 'athlete', 'ath-phantom', 1, 'athlete.updated', '{}');
ROLLBACK;
