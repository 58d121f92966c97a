-- The W3C trace context a job's attempts continue: the submit's
-- `traceparent` header or span, or for a child job the attempt that made
-- it. Read by the claim; NULL when the submit had none and tracing was off.
-- (0008 and 0009 are taken by work done beside this.)
ALTER TABLE jobs ADD COLUMN traceparent text;
