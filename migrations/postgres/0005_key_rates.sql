-- A key's request rate limit (requests per window), shared by every API
-- process through Redis, and the cap on its tenant's waiting jobs past which
-- its submits are refused; NULL means unlimited.
ALTER TABLE api_keys ADD COLUMN rate_limit integer, ADD COLUMN rate_window_secs integer,
    ADD COLUMN max_queued bigint;
-- Counting a tenant's waiting jobs at submit reads only these.
CREATE INDEX jobs_tenant_waiting ON jobs (tenant) WHERE status IN ('queued', 'retrying');
