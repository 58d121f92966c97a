-- A running job's latest progress report, and the report each
-- `job.progress` event carries (see the Postgres migration).
ALTER TABLE jobs ADD COLUMN progress TEXT;
ALTER TABLE job_events ADD COLUMN progress TEXT;
