-- Cron schedules (see the Postgres migration). Times are milliseconds
-- since the epoch like every other time in this file; the one writer at a
-- time that SQLite allows is what keeps a fire time to one job here.
CREATE TABLE schedules (
    tenant       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    cron         TEXT    NOT NULL,
    timezone     TEXT    NOT NULL,
    jitter_secs  INTEGER NOT NULL DEFAULT 0,
    job          TEXT    NOT NULL,
    paused       INTEGER NOT NULL DEFAULT 0,
    next_fire_at INTEGER,
    last_fire_at INTEGER,
    last_job_id  TEXT,
    last_error   TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE paused = 0;

ALTER TABLE jobs ADD COLUMN schedule TEXT;
ALTER TABLE jobs ADD COLUMN scheduled_for INTEGER;
CREATE UNIQUE INDEX jobs_schedule_fire ON jobs (tenant, schedule, scheduled_for)
    WHERE schedule IS NOT NULL;
