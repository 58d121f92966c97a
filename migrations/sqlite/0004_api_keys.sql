-- API keys, same shape as Postgres (times in epoch milliseconds).
CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    hash       TEXT    NOT NULL UNIQUE,
    prefix     TEXT    NOT NULL,
    tenant     TEXT    NOT NULL,
    scope      TEXT    NOT NULL CHECK (scope IN ('read', 'submit', 'admin')),
    name       TEXT,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
