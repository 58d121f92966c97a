-- Tenants, as on Postgres. Dev mode serves one tenant ('default', it has no
-- keys), so the idempotency key stays unique across the file.
ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE webhooks ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
