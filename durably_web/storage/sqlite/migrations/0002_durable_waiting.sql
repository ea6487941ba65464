-- Durable waiting: a run that is not executing but continues at a known time
-- ('waiting': step retry backoff, step.sleep), step kinds, and every step attempt.
--
-- SQLite cannot change a CHECK constraint in place, so durably_runs is rebuilt
-- (the documented 12-step procedure). The store runs migrations with foreign
-- keys off: with them on, dropping the old table would cascade-delete every
-- step, label and log row.

CREATE TABLE durably_runs_new (
    id               TEXT PRIMARY KEY,
    job_name         TEXT NOT NULL,
    status           TEXT NOT NULL
                     CHECK (status IN ('pending', 'leased', 'waiting', 'completed', 'failed', 'cancelled')),
    input            TEXT NOT NULL,
    output           TEXT,
    error            TEXT,
    labels           TEXT NOT NULL DEFAULT '{}',
    progress_current INTEGER,
    progress_total   INTEGER,
    progress_message TEXT,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL DEFAULT 1,
    idempotency_key  TEXT,
    concurrency_key  TEXT,
    lease_owner      TEXT,
    lease_generation INTEGER NOT NULL DEFAULT 0,
    lease_expires_at INTEGER,
    -- A pending or waiting run is not claimed before this time: for a waiting
    -- run it is its wake-up time (retry backoff, end of a sleep).
    available_at     INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    completed_at     INTEGER,
    updated_at       INTEGER NOT NULL,
    -- The last wait: why ('retry' | 'sleep' | 'signal') and for which step; shown while
    -- 'waiting'. wait_deadline: a signal wait's timeout, fixed when the wait first executes.
    wait_reason      TEXT,
    wait_step        TEXT,
    wait_deadline    INTEGER,
    -- fork_run: the run this one was forked from.
    forked_from      TEXT
);

INSERT INTO durably_runs_new (
    id, job_name, status, input, output, error, labels, progress_current, progress_total,
    progress_message, attempt, max_attempts, idempotency_key, concurrency_key, lease_owner,
    lease_generation, lease_expires_at, available_at, created_at, started_at, completed_at, updated_at
)
SELECT
    id, job_name, status, input, output, error, labels, progress_current, progress_total,
    progress_message, attempt, max_attempts, idempotency_key, concurrency_key, lease_owner,
    lease_generation, lease_expires_at, available_at, created_at, started_at, completed_at, updated_at
FROM durably_runs;

DROP TABLE durably_runs;
ALTER TABLE durably_runs_new RENAME TO durably_runs;

CREATE UNIQUE INDEX durably_runs_idempotency
    ON durably_runs (job_name, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX durably_runs_pending_concurrency
    ON durably_runs (concurrency_key) WHERE status = 'pending' AND concurrency_key IS NOT NULL;
CREATE INDEX durably_runs_concurrency
    ON durably_runs (concurrency_key, status) WHERE concurrency_key IS NOT NULL;
CREATE INDEX durably_runs_queue ON durably_runs (status, available_at);
CREATE INDEX durably_runs_leases ON durably_runs (status, lease_expires_at);
CREATE INDEX durably_runs_finished ON durably_runs (status, completed_at);
CREATE INDEX durably_runs_job ON durably_runs (job_name, id);

-- What a recorded step is: 'run' (step.run), 'sleep' (step.sleep / sleep_until, whose
-- output is its due time) or 'signal' (wait_for_signal, whose output is the outcome:
-- {"payload": ...} or {"timeout": true}), so a replay that swaps one for another is caught.
ALTER TABLE durably_steps ADD COLUMN kind TEXT NOT NULL DEFAULT 'run';

-- Failed attempts of a step that were retried (the final attempt of a step, completed
-- or failed, is its durably_steps row). Written in the same transaction that makes
-- the run wait for its retry.
CREATE TABLE durably_step_attempts (
    run_id       TEXT NOT NULL REFERENCES durably_runs (id) ON DELETE CASCADE,
    seq          INTEGER NOT NULL,
    name         TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    -- 1 once resume_run has given the step a fresh retry budget (the attempt stays in the history).
    before_resume INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    started_at   INTEGER NOT NULL,
    completed_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq, attempt)
);

-- Signals sent to runs (send_signal), kept until a wait_for_signal of that name takes
-- them (consumed_at), oldest first. A signal_id makes sending idempotent per run.
CREATE TABLE durably_signals (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES durably_runs (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    signal_id   TEXT,
    payload     TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    consumed_at INTEGER
);
CREATE UNIQUE INDEX durably_signals_idempotency
    ON durably_signals (run_id, signal_id) WHERE signal_id IS NOT NULL;
CREATE INDEX durably_signals_waiting ON durably_signals (run_id, name, id) WHERE consumed_at IS NULL;
