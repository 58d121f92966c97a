-- Flow control: job priorities (on the outbox row and the embedded queue's
-- message too, so both hand out the most urgent first), paused pools and
-- the worker processes' last sign of life (see the Postgres migration).
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox (priority DESC, available_at, id);
ALTER TABLE queue ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
DROP INDEX queue_visible;
CREATE INDEX queue_visible ON queue (pool, priority DESC, visible_at, id);

CREATE TABLE pools (
    name       TEXT    PRIMARY KEY,
    paused     INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL
);

CREATE TABLE workers (
    name        TEXT    PRIMARY KEY,
    pool        TEXT    NOT NULL,
    concurrency INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL
);
CREATE INDEX workers_pool ON workers (pool, seen_at);
