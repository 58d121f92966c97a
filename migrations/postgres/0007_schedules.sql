-- Cron schedules. Each row is one tenant's named schedule and the submit
-- body each fire makes a job from; `next_fire_at` is the fire time a
-- dispatcher waits for (NULL while paused). A dispatcher takes due rows
-- with FOR UPDATE SKIP LOCKED and, in the same transaction, inserts the
-- job and moves `next_fire_at` on, so each fire time makes one job however
-- many dispatchers run and whichever of them dies mid-fire.
CREATE TABLE schedules (
    tenant       text        NOT NULL,
    name         text        NOT NULL,
    cron         text        NOT NULL,
    timezone     text        NOT NULL,
    jitter_secs  int         NOT NULL DEFAULT 0,
    job          jsonb       NOT NULL,
    paused       boolean     NOT NULL DEFAULT false,
    next_fire_at timestamptz,
    last_fire_at timestamptz,
    last_job_id  uuid,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE NOT paused;

-- Which schedule and fire time made a job. The unique index is partial, so
-- jobs without a schedule (the hot path) never get an entry in it.
ALTER TABLE jobs ADD COLUMN schedule text;
ALTER TABLE jobs ADD COLUMN scheduled_for timestamptz;
CREATE UNIQUE INDEX jobs_schedule_fire ON jobs (tenant, schedule, scheduled_for)
    WHERE schedule IS NOT NULL;
