-- Network-aware steps: a step attempt that failed with a network error while the
-- browser was offline is kept in the history (offline) but does not count against
-- the step's retry budget; the run waits with wait_reason 'offline'.
ALTER TABLE durably_step_attempts ADD COLUMN offline BOOLEAN NOT NULL DEFAULT false;

-- wake_offline_runs: the runs waiting for the network, found without a scan.
CREATE INDEX durably_runs_offline ON durably_runs (id) WHERE status = 'waiting' AND wait_reason = 'offline';
