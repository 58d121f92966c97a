-- API keys: only a keyed hash of each key is kept (see src/auth.rs).
CREATE TABLE api_keys (
    id         uuid PRIMARY KEY,
    hash       text        NOT NULL UNIQUE,
    prefix     text        NOT NULL,
    tenant     text        NOT NULL,
    scope      text        NOT NULL CHECK (scope IN ('read', 'submit', 'admin')),
    name       text,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
