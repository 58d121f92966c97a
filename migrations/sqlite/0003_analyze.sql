-- The analyze kind's shared state in dev mode, where no Redis runs: the
-- rate-limit buckets and the answer cache, shared by every process that
-- opens this file. Production keeps both in Redis.

-- One row per provider+model; the levels and the time (ms since the epoch)
-- they were computed at, as in the Redis hash.
CREATE TABLE analyze_buckets (
    key      TEXT PRIMARY KEY,
    requests REAL NOT NULL,
    tokens   REAL NOT NULL,
    at_ms    REAL NOT NULL
) WITHOUT ROWID;

-- answer: the cached answer as JSON. Expired rows are misses until pruned.
CREATE TABLE analyze_answers (
    key        TEXT PRIMARY KEY,
    answer     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX analyze_answers_expiry ON analyze_answers (expires_at);
