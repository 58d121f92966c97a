-- Jobs are the source of truth; the outbox carries what must reach a broker;
-- job_events records every transition with a monotonic id.
CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    kind             text        NOT NULL,
    payload          jsonb       NOT NULL,
    status           text        NOT NULL,
    attempt          int         NOT NULL DEFAULT 0,
    max_attempts     int         NOT NULL,
    attempt_limit    int         NOT NULL,
    backoff_base_ms  bigint      NOT NULL,
    backoff_max_ms   bigint      NOT NULL,
    timeout_secs     int         NOT NULL,
    run_at           timestamptz,
    idempotency_key  text,
    result           jsonb,
    errors           jsonb       NOT NULL DEFAULT '[]',
    parent_id        uuid,
    lease_until      timestamptz,
    worker           text,
    cancel_requested boolean     NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    next_run_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- Indexes are kept few and partial: every transition changes `status`, so
-- no update is HOT and each index costs a new entry per transition.
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_dead ON jobs (id DESC) WHERE status = 'dead';
CREATE INDEX jobs_lease ON jobs (lease_until) WHERE status = 'running';
CREATE INDEX jobs_waiting ON jobs (updated_at) WHERE status IN ('queued', 'retrying');
CREATE INDEX jobs_parent ON jobs (parent_id) WHERE parent_id IS NOT NULL;

CREATE TABLE job_events (
    id        bigserial PRIMARY KEY,
    job_id    uuid        NOT NULL,
    kind      text        NOT NULL,
    type      text        NOT NULL,
    status    text        NOT NULL,
    attempt   int         NOT NULL,
    parent_id uuid,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_events_job ON job_events (job_id, id);

CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    job_id       uuid        NOT NULL,
    pool         text        NOT NULL,
    available_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_due ON outbox (available_at, id);
CREATE INDEX outbox_job ON outbox (job_id);
