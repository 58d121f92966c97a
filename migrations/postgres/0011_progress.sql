-- Progress: a running job's latest report ({fraction, message, partial?,
-- attempt, at}) on the job, and on each `job.progress` event the report it
-- announces (NULL on every other event). Neither column is indexed and a
-- progress write touches nothing else of the row, so it changes no index
-- entry and can be a HOT update.
ALTER TABLE jobs ADD COLUMN progress jsonb;
ALTER TABLE job_events ADD COLUMN progress jsonb;
