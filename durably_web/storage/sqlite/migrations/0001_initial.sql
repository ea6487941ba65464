-- Runs: one row per trigger. Times are integer milliseconds since the epoch (UTC).
CREATE TABLE durably_runs (
    id               TEXT PRIMARY KEY,
    job_name         TEXT NOT NULL,
    status           TEXT NOT NULL
                     CHECK (status IN ('pending', 'leased', 'completed', 'failed', 'cancelled')),
    input            TEXT NOT NULL,
    output           TEXT,
    error            TEXT,
    labels           TEXT NOT NULL DEFAULT '{}',
    progress_current INTEGER,
    progress_total   INTEGER,
    progress_message TEXT,
    attempt          INTEGER NOT NULL DEFAULT 0,
    -- Room for per-step/run retries: how many attempts are allowed in all.
    max_attempts     INTEGER NOT NULL DEFAULT 1,
    idempotency_key  TEXT,
    concurrency_key  TEXT,
    lease_owner      TEXT,
    -- Fencing token: bumped on every lease; writes carry the generation they hold.
    lease_generation INTEGER NOT NULL DEFAULT 0,
    lease_expires_at INTEGER,
    -- A pending run is not claimed before this time (retry backoff, delayed runs).
    available_at     INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    completed_at     INTEGER,
    updated_at       INTEGER NOT NULL
);

CREATE UNIQUE INDEX durably_runs_idempotency
    ON durably_runs (job_name, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- At most one pending run per concurrency key, enforced by the database itself.
CREATE UNIQUE INDEX durably_runs_pending_concurrency
    ON durably_runs (concurrency_key) WHERE status = 'pending' AND concurrency_key IS NOT NULL;
CREATE INDEX durably_runs_concurrency
    ON durably_runs (concurrency_key, status) WHERE concurrency_key IS NOT NULL;
CREATE INDEX durably_runs_queue ON durably_runs (status, available_at);
CREATE INDEX durably_runs_leases ON durably_runs (status, lease_expires_at);
CREATE INDEX durably_runs_finished ON durably_runs (status, completed_at);
CREATE INDEX durably_runs_job ON durably_runs (job_name, id);

-- Labels again, one row each, so runs can be filtered by exact key/value.
CREATE TABLE durably_run_labels (
    run_id TEXT NOT NULL REFERENCES durably_runs (id) ON DELETE CASCADE,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX durably_run_labels_pair ON durably_run_labels (key, value);

-- Steps: checkpoints. A completed row is the promise that the step never runs again.
CREATE TABLE durably_steps (
    run_id       TEXT NOT NULL REFERENCES durably_runs (id) ON DELETE CASCADE,
    seq          INTEGER NOT NULL,
    name         TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('completed', 'failed')),
    output       TEXT,
    error        TEXT,
    attempt      INTEGER NOT NULL DEFAULT 1,
    started_at   INTEGER NOT NULL,
    completed_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq),
    UNIQUE (run_id, name)
);

CREATE TABLE durably_logs (
    id         INTEGER PRIMARY KEY,
    run_id     TEXT NOT NULL REFERENCES durably_runs (id) ON DELETE CASCADE,
    step_name  TEXT,
    level      TEXT NOT NULL,
    message    TEXT NOT NULL,
    data       TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX durably_logs_run ON durably_logs (run_id, id);
