-- Webhook deliveries are limited per receiving host, not per exact URL:
-- each delivery keeps the host it counts against (lower case, no port).
-- Rows written before this have none and count against their URL until
-- they are delivered (the claim reads coalesce(host, url)).
--
-- Webhook secrets need no column: a sealed secret is stored as
-- `enc:v1:<key id>:<base64>` in the same text columns (webhooks.secret and
-- the `secret` of jobs.webhook), and a plain one is still read as it is
-- until `stevedore webhooks rotate-key` re-encrypts it.
ALTER TABLE webhook_deliveries ADD COLUMN host TEXT;
CREATE INDEX webhooks_tenant ON webhooks (tenant);
