-- The notifier's schema on SQLite (dev mode); same shape as Postgres. Dev
-- mode is one process, so new events are announced in process instead of
-- by NOTIFY.
ALTER TABLE jobs ADD COLUMN webhook TEXT;

CREATE TABLE notifier_cursor (
    name    TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
INSERT INTO notifier_cursor (name, last_id)
SELECT 'main', coalesce(max(id), 0) FROM job_events;

CREATE TABLE webhooks (
    id              TEXT PRIMARY KEY,
    url             TEXT    NOT NULL,
    secret          TEXT    NOT NULL,
    events          TEXT    NOT NULL,
    kinds           TEXT,
    disabled_at     INTEGER,
    disabled_reason TEXT,
    created_at      INTEGER NOT NULL
);

CREATE TABLE webhook_deliveries (
    id              TEXT PRIMARY KEY,
    webhook_id      TEXT REFERENCES webhooks (id) ON DELETE CASCADE,
    job_id          TEXT    NOT NULL,
    event_id        INTEGER NOT NULL,
    event_type      TEXT    NOT NULL,
    url             TEXT    NOT NULL,
    body            TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    event_at        INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    finished_at     INTEGER,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
