-- A key's request rate limit (requests per window), shared by every API
-- process through Redis; NULL means unlimited.
ALTER TABLE api_keys ADD COLUMN rate_limit integer, ADD COLUMN rate_window_secs integer;
