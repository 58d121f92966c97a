-- Tenants: every job and webhook belongs to one (the tenant of the API key
-- that made it; children inherit their parent's). Jobs made before keys
-- existed, and by deployments without keys, are in 'default'. An idempotency
-- key is unique within its tenant, so one tenant cannot claim another's.
ALTER TABLE jobs ADD COLUMN tenant text NOT NULL DEFAULT 'default';
DROP INDEX jobs_idempotency_key;
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
ALTER TABLE webhooks ADD COLUMN tenant text NOT NULL DEFAULT 'default';
