-- Concurrency keys. A job may carry a key; `concurrency_limits` caps how
-- many jobs whose key starts with a prefix run at once, per key, across
-- every worker (the longest matching prefix wins). A claim that finds its
-- key full parks the job's outbox row as held on that key (`held_key`),
-- where the relay leaves it; a job of that key leaving `running` releases
-- the most urgent held row. A key that a remote side asked to wait for
-- (Retry-After) cools down until `concurrency_cooldowns.until`.
ALTER TABLE jobs ADD COLUMN concurrency_key text;
-- Only running jobs with a key have an entry: the count a claim makes is
-- over at most the key's limit, and other jobs never touch this index.
CREATE INDEX jobs_key_running ON jobs (concurrency_key)
    WHERE status = 'running' AND concurrency_key IS NOT NULL;

ALTER TABLE outbox ADD COLUMN held_key text;
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox (priority DESC, available_at, id) WHERE held_key IS NULL;
CREATE INDEX outbox_held ON outbox (held_key, priority DESC, id) WHERE held_key IS NOT NULL;

CREATE TABLE concurrency_limits (
    prefix      text        PRIMARY KEY,
    max_running int         NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE concurrency_cooldowns (
    key   text        PRIMARY KEY,
    until timestamptz NOT NULL
);

-- Scrape jobs carry `host:<registrable domain>`: at most this many pages of
-- one site load at once across the fleet unless an operator says otherwise.
INSERT INTO concurrency_limits (prefix, max_running) VALUES ('host:', 4);
