-- Flow control. A job's priority (-100..100, higher first) rides on its
-- outbox row so the relay can send the most urgent first. `pools` holds
-- the paused flag of each pool that was ever paused: a paused pool's outbox
-- rows stay here and its jobs are not claimed. `workers` is where each
-- worker process says it is alive, for GET /v1/pools.
ALTER TABLE jobs ADD COLUMN priority smallint NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN priority smallint NOT NULL DEFAULT 0;
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox (priority DESC, available_at, id);

CREATE TABLE pools (
    name       text        PRIMARY KEY,
    paused     boolean     NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workers (
    name        text        PRIMARY KEY,
    pool        text        NOT NULL,
    concurrency int         NOT NULL,
    seen_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workers_pool ON workers (pool, seen_at);
