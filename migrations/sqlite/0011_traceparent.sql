-- The W3C trace context a job's attempts continue (see the Postgres
-- migration). (0009 and 0010 are taken by work done beside this.)
ALTER TABLE jobs ADD COLUMN traceparent TEXT;
