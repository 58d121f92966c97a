-- Concurrency keys (see the Postgres migration).
ALTER TABLE jobs ADD COLUMN concurrency_key TEXT;
CREATE INDEX jobs_key_running ON jobs (concurrency_key)
    WHERE status = 'running' AND concurrency_key IS NOT NULL;

ALTER TABLE outbox ADD COLUMN held_key TEXT;
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox (priority DESC, available_at, id) WHERE held_key IS NULL;
CREATE INDEX outbox_held ON outbox (held_key, priority DESC, id) WHERE held_key IS NOT NULL;

CREATE TABLE concurrency_limits (
    prefix      TEXT    PRIMARY KEY,
    max_running INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE concurrency_cooldowns (
    key   TEXT    PRIMARY KEY,
    until INTEGER NOT NULL
);

-- Scrape jobs carry `host:<registrable domain>`: at most this many pages of
-- one site load at once across the fleet unless an operator says otherwise.
INSERT INTO concurrency_limits (prefix, max_running, updated_at) VALUES ('host:', 4, 0);
