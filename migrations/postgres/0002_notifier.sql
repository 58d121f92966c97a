-- The notifier: a persisted cursor over job_events, webhook endpoints and
-- their durable deliveries, per-job webhooks, and a throttled wake-up NOTIFY.

-- A job may carry its own webhook: {"url", "secret"?}.
ALTER TABLE jobs ADD COLUMN webhook jsonb;

-- How far each notifier got. Starts at the newest event so a first deploy on
-- an existing database does not replay history to webhooks.
CREATE TABLE notifier_cursor (
    name    text PRIMARY KEY,
    last_id bigint NOT NULL
);
INSERT INTO notifier_cursor (name, last_id)
SELECT 'main', coalesce(max(id), 0) FROM job_events;

CREATE TABLE webhooks (
    id              uuid PRIMARY KEY,
    url             text        NOT NULL,
    secret          text        NOT NULL,
    events          text[]      NOT NULL,
    kinds           text[],
    disabled_at     timestamptz,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    id              uuid PRIMARY KEY,
    webhook_id      uuid REFERENCES webhooks (id) ON DELETE CASCADE,
    job_id          uuid        NOT NULL,
    event_id        bigint      NOT NULL,
    event_type      text        NOT NULL,
    url             text        NOT NULL,
    body            text        NOT NULL,
    status          text        NOT NULL DEFAULT 'pending',
    attempts        int         NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    last_status     int,
    last_error      text,
    event_at        timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status IN ('pending', 'delivering');
CREATE INDEX webhook_deliveries_status ON webhook_deliveries (status, id);

-- Wake-up only: the notifier reads rows, never payloads. A NOTIFY takes a
-- cluster-wide lock at commit that serialises every notifying transaction, so
-- at most one transaction per 10 ms bucket notifies: the bucket is kept in a
-- sequence because setval/last_value are non-transactional and never block.
-- Two transactions racing in the same bucket both notify, which is harmless;
-- a transaction that skips relies on the next bucket's NOTIFY or, when the
-- fleet goes quiet, on the notifier's short polling interval.
CREATE SEQUENCE stevedore_notify_bucket MINVALUE 0 START 0;
CREATE FUNCTION stevedore_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bucket bigint := floor(extract(epoch FROM clock_timestamp()) * 100);
BEGIN
    IF bucket > (SELECT last_value FROM stevedore_notify_bucket) THEN
        PERFORM setval('stevedore_notify_bucket', bucket);
        PERFORM pg_notify('stevedore_events', '');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER job_events_notify AFTER INSERT ON job_events
    FOR EACH STATEMENT EXECUTE FUNCTION stevedore_events_notify();
