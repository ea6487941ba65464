-- Fewer index writes per run on the hot path (issue 15).
--
-- durably_runs_queue, durably_runs_leases and durably_runs_finished led with status, so every
-- status change (pending -> leased -> completed) moved the run's entry in all three, though
-- each serves rows of one or two states only. Partial, with the same names and columns, each
-- holds just those rows: a run enters and leaves each at most once. The queries they serve
-- name the state or compare the column (which implies IS NOT NULL), so the planner still
-- picks them (tests/test_run_list_plans.py).
DROP INDEX durably_runs_queue;
-- Pending and waiting runs (the claim's due waiting runs, a debounce's next start).
CREATE INDEX durably_runs_queue ON durably_runs (status, available_at)
    WHERE status = 'pending' OR status = 'waiting';
DROP INDEX durably_runs_leases;
-- Runs holding a lease: leased, and cancelled ones whose handler has not stopped yet.
CREATE INDEX durably_runs_leases ON durably_runs (status, lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;
DROP INDEX durably_runs_finished;
-- Ended runs, by when they ended (retention's purge).
CREATE INDEX durably_runs_finished ON durably_runs (status, completed_at)
    WHERE completed_at IS NOT NULL;
