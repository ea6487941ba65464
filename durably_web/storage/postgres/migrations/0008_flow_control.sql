-- Flow control and tracing (issue 14).
--
-- priority: the claim takes higher first, then oldest. It walks the unfinished runs in
-- claim order and stops at the first claimable one, so durably_runs_active now holds
-- them in that order (priority descending, then id) instead of id alone.
-- trace_parent: the W3C traceparent current at trigger time.
ALTER TABLE durably_runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE durably_runs ADD COLUMN trace_parent TEXT;
DROP INDEX durably_runs_active;
CREATE INDEX durably_runs_active ON durably_runs (priority DESC, id)
    WHERE status IN ('pending', 'leased', 'waiting');

-- rate_limit: the runs of a job started (first claimed) since a time, counted from an
-- index range. A run enters it once, at its first claim (started_at is never changed).
CREATE INDEX durably_runs_job_started ON durably_runs (job_name, started_at) WHERE started_at IS NOT NULL;
