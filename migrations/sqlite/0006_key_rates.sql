ALTER TABLE api_keys ADD COLUMN rate_limit INTEGER;
ALTER TABLE api_keys ADD COLUMN rate_window_secs INTEGER;
ALTER TABLE api_keys ADD COLUMN max_queued INTEGER;
