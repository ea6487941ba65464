-- Deadlines: a run's deadline_at (ms; created_at + its timeout, NULL: none). Past it the
-- run fails with RunTimeoutError, whichever worker finds it.
-- Safe deploys: version, the job version that started the run (before its first claim:
-- the version the triggering process knew).
ALTER TABLE durably_runs ADD COLUMN deadline_at INTEGER;
ALTER TABLE durably_runs ADD COLUMN version TEXT;

-- fail_overdue_runs, on every claim loop turn: only unfinished runs with a deadline are in
-- it, so finding none due is one index probe.
CREATE INDEX durably_runs_deadline ON durably_runs (deadline_at)
    WHERE deadline_at IS NOT NULL AND status IN ('pending', 'leased', 'waiting');
-- get_runs(version=...): the run list walks (version, status, id) in list order.
CREATE INDEX durably_runs_version_list ON durably_runs (version, status, id) WHERE version IS NOT NULL;
