-- Same shape as the Postgres schema; times are unix milliseconds so that
-- comparisons are plain integer comparisons. `queue` is the embedded broker.
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    kind             TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    attempt_limit    INTEGER NOT NULL,
    backoff_base_ms  INTEGER NOT NULL,
    backoff_max_ms   INTEGER NOT NULL,
    timeout_secs     INTEGER NOT NULL,
    run_at           INTEGER,
    idempotency_key  TEXT UNIQUE,
    result           TEXT,
    errors           TEXT    NOT NULL DEFAULT '[]',
    parent_id        TEXT,
    lease_until      INTEGER,
    worker           TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    next_run_at      INTEGER,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX jobs_status_id ON jobs (status, id DESC);
CREATE INDEX jobs_parent ON jobs (parent_id) WHERE parent_id IS NOT NULL;

CREATE TABLE job_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id    TEXT    NOT NULL,
    kind      TEXT    NOT NULL,
    type      TEXT    NOT NULL,
    status    TEXT    NOT NULL,
    attempt   INTEGER NOT NULL,
    parent_id TEXT,
    at        INTEGER NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, id);

CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id       TEXT    NOT NULL,
    pool         TEXT    NOT NULL,
    available_at INTEGER NOT NULL
);
CREATE INDEX outbox_due ON outbox (available_at, id);
CREATE INDEX outbox_job ON outbox (job_id);

CREATE TABLE queue (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    pool       TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    visible_at INTEGER NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX queue_visible ON queue (pool, visible_at, id);
