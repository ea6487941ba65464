-- Flow control and tracing (issue 14).
--
-- priority: the claim takes higher first, then oldest (the claim already sorts its due
-- candidates, found through durably_runs_queue and durably_runs_leases, so the new sort
-- key costs nothing more). trace_parent: the W3C traceparent current at trigger time.
ALTER TABLE durably_runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE durably_runs ADD COLUMN trace_parent TEXT;

-- rate_limit: the runs of a job started (first claimed) since a time, counted from an
-- index range. A run enters it once, at its first claim (started_at is never changed).
CREATE INDEX durably_runs_job_started ON durably_runs (job_name, started_at) WHERE started_at IS NOT NULL;
