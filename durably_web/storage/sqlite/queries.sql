-- Every statement the SQLite store runs, one per "-- name:" header.
-- Parameters are named; lists and label sets are passed as JSON text and
-- unpacked with json_each, so every statement here is static text (the claim's is
-- assembled from fragments once, when the queries load).

-- name: create_migrations_table
-- The schema version record; each applied migration adds its number.
CREATE TABLE IF NOT EXISTS durably_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at INTEGER NOT NULL
)

-- name: schema_version
SELECT COALESCE(MAX(version), 0) AS version FROM durably_migrations

-- name: has_migrations_table
-- Whether this is a durably-web database at all (read-only opens check before reading).
SELECT COUNT(*) AS found FROM sqlite_master WHERE type = 'table' AND name = 'durably_migrations'

-- name: find_idempotent_run
SELECT * FROM durably_runs WHERE job_name = :job_name AND idempotency_key = :idempotency_key

-- name: find_pending_by_concurrency_key
SELECT * FROM durably_runs WHERE concurrency_key = :concurrency_key AND status = 'pending'

-- name: insert_run
INSERT INTO durably_runs (
    id, job_name, status, input, labels, idempotency_key, concurrency_key,
    available_at, created_at, updated_at, forked_from,
    priority, trace_parent, parent_run_id, deadline_at, version
) VALUES (
    :id, :job_name, 'pending', :input, :labels, :idempotency_key, :concurrency_key,
    :created_at, :created_at, :created_at, :forked_from,
    :priority, :trace_parent, :parent_run_id, :deadline_at, :version
)

-- name: insert_leased_run
-- A run created already leased to the worker of the process triggering it (the insert is
-- its first claim): create_leased_run.
INSERT INTO durably_runs (
    id, job_name, status, input, labels, available_at, created_at, updated_at, started_at,
    priority, trace_parent, parent_run_id, deadline_at, version,
    lease_owner, lease_generation, lease_expires_at, attempt
) VALUES (
    :id, :job_name, 'leased', :input, :labels, :created_at, :created_at, :created_at, :created_at,
    :priority, :trace_parent, :parent_run_id, :deadline_at, :version,
    :worker_id, 1, :lease_until, 1
)

-- name: insert_labels
INSERT INTO durably_run_labels (run_id, key, value)
SELECT :run_id, key, value FROM json_each(:labels)

-- name: get_run
SELECT * FROM durably_runs WHERE id = :id

-- name: cancel_run
-- The lease is kept: a cancelled run holds its concurrency key until its worker
-- has stopped the handler (release_run) or the lease runs out. A waiting run has none.
UPDATE durably_runs
SET status = 'cancelled', completed_at = :now, updated_at = :now
WHERE id = :id AND status IN ('pending', 'leased', 'waiting')

-- name: delete_run
DELETE FROM durably_runs WHERE id = :id

-- name: purge_runs
DELETE FROM durably_runs WHERE id IN (
    SELECT id FROM durably_runs
    WHERE status IN ('completed', 'failed', 'cancelled') AND completed_at < :before
      AND NOT EXISTS (  -- as delete_run: never a parent whose children are still active
        SELECT 1 FROM durably_runs AS c
        WHERE c.parent_run_id = durably_runs.id AND c.status IN ('pending', 'leased', 'waiting'))
    ORDER BY completed_at
    LIMIT :limit)

-- name: find_claimable_run
-- Highest priority first, then oldest: a pending run, a waiting run whose wake-up time
-- (available_at) is due, or a leased run whose lease has expired. Each kind is looked up
-- on its own and the best of the (at most) three wins, so no claim sorts the backlog:
-- pending runs are walked in claim order through durably_runs_claim_order (INDEXED BY: a
-- schema change that made the planner pick another plan is an error, not a slow claim)
-- and the walk stops at the first one that passes the claim's filter; due waiting runs and
-- expired leases are the few found by a range of durably_runs_queue / durably_runs_leases.
-- The filter's placeholder stands for the claim_filter text below, put in when the queries load; the store
-- also builds find_claimable_run_rate_limited from this text, for claims while some job's
-- rate window is full, with rate_limit_filter added (so the plain claim, the hot path,
-- tests nothing more per candidate).
SELECT id FROM (
    SELECT * FROM (
        SELECT r.id, r.priority FROM durably_runs AS r INDEXED BY durably_runs_claim_order
        WHERE r.status = 'pending' AND r.available_at <= :now {claim_filter}
        ORDER BY r.priority DESC, r.id LIMIT 1)
    UNION ALL
    SELECT * FROM (
        SELECT r.id, r.priority FROM durably_runs AS r
        WHERE r.status = 'waiting' AND r.available_at <= :now {claim_filter}
        ORDER BY r.priority DESC, r.id LIMIT 1)
    UNION ALL
    SELECT * FROM (
        SELECT r.id, r.priority FROM durably_runs AS r
        WHERE r.status = 'leased' AND r.lease_expires_at <= :now {claim_filter}
        ORDER BY r.priority DESC, r.id LIMIT 1)
)
ORDER BY priority DESC, id
LIMIT 1

-- name: claim_filter
-- What a claim tests of each candidate run (r). A concurrency key blocks while another run
-- holds a live lease on it, including a cancelled run whose handler has not stopped yet.
  AND r.job_name IN (SELECT value FROM json_each(:job_names))
  AND (r.concurrency_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM durably_runs AS other
        WHERE other.concurrency_key = r.concurrency_key
          AND other.status IN ('leased', 'cancelled') AND other.lease_expires_at > :now
          AND other.id <> r.id))
  -- Safe deploys: a started run of a job this worker pins to its version (:pinned_versions,
  -- a JSON object job -> version) is left for a worker of the version that started it.
  AND (r.started_at IS NULL OR r.version IS NULL OR NOT EXISTS (
        SELECT 1 FROM json_each(:pinned_versions) AS pin
        WHERE pin.key = r.job_name AND pin.value <> r.version))

-- name: rate_limit_filter
-- Flow control: a job whose rate window is full starts no new run (one already started
-- continues). :rate_limited lists those jobs.
  AND (r.started_at IS NOT NULL OR r.job_name NOT IN (SELECT value FROM json_each(:rate_limited)))

-- name: lease_columns
-- What a claim writes. The first claim records the claiming worker's version of the job
-- (:versions, a JSON object job -> version); a resumed run keeps the version that started it.
    status = 'leased', lease_owner = :worker_id, lease_generation = lease_generation + 1,
    lease_expires_at = :lease_until, attempt = attempt + 1,
    version = CASE WHEN started_at IS NULL THEN COALESCE(
        (SELECT value FROM json_each(:versions) WHERE key = job_name), version) ELSE version END,
    started_at = COALESCE(started_at, :now), updated_at = :now

-- name: lease_claimable_run
-- Claims the run find_claimable_run picks, in one statement: used in the transaction of a
-- claim with flow limits, whose counts decide which jobs may start. The placeholders stand
-- for lease_columns and for find_claimable_run (or its rate-limited text), put in when the
-- queries load.
UPDATE durably_runs AS r SET {lease_columns}
WHERE r.id = ({claimable})
RETURNING *

-- name: lease_found_run
-- The hot path's claim (no flow limits): leases the run find_claimable_run just found, if
-- it is still claimable -- another claimer may have taken it, or a run sharing its
-- concurrency key, since the look. One statement by primary key, so its own committed
-- transaction holding the write lock only for the write; the look is not run twice.
UPDATE durably_runs AS r SET {lease_columns}
WHERE r.id = :id
  AND ((r.status IN ('pending', 'waiting') AND r.available_at <= :now)
       OR (r.status = 'leased' AND r.lease_expires_at <= :now))
  {claim_filter}
RETURNING *

-- name: renew_lease
-- :status is 'leased', or 'cancelled' for a run whose handler is still winding
-- down (its lease keeps the concurrency key held until release_run). An expired lease
-- is not renewed even when nobody has taken the run over yet: once it lapsed, another
-- run of its concurrency key may have been claimed, and both would run.
UPDATE durably_runs SET lease_expires_at = :lease_until
WHERE id = :id AND status = :status AND lease_generation = :generation
  AND lease_expires_at > :now

-- name: release_run
-- A worker that stops gracefully hands the run back: 'pending' again, claimable at
-- once. Only if another run of its concurrency key is already pending (at most one
-- may be) does it stay 'leased', with its lease expired: just as claimable, and
-- still first in line. A cancelled run stays cancelled; its lease ends.
UPDATE durably_runs
SET status = CASE
        WHEN status = 'leased' AND (concurrency_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM durably_runs AS other
            WHERE other.concurrency_key = durably_runs.concurrency_key AND other.status = 'pending'))
        THEN 'pending' ELSE status END,
    lease_expires_at = :now, lease_owner = NULL, updated_at = :now
WHERE id = :id AND status IN ('leased', 'cancelled') AND lease_generation = :generation

-- name: expire_leases
UPDATE durably_runs SET lease_expires_at = :now, lease_owner = NULL, updated_at = :now
WHERE status IN ('leased', 'cancelled') AND lease_expires_at > :now

-- name: record_step
-- One statement, so it is its own committed transaction on the hot path. A failed
-- row at the same position (a resumed run executing its failed step again) is replaced.
INSERT INTO durably_steps (
    run_id, seq, name, status, output, error, started_at, completed_at, kind, attempt, metadata)
SELECT :run_id, :seq, :name, :status, :output, :error, :started_at, :completed_at, :kind, :attempt, :metadata
WHERE EXISTS (
    SELECT 1 FROM durably_runs
    WHERE id = :run_id AND status = 'leased' AND lease_generation = :generation)
ON CONFLICT (run_id, seq) DO UPDATE
SET name = excluded.name, status = excluded.status, output = excluded.output, error = excluded.error,
    started_at = excluded.started_at, completed_at = excluded.completed_at, kind = excluded.kind,
    attempt = excluded.attempt, metadata = excluded.metadata
WHERE durably_steps.status = 'failed'

-- name: record_failed_step
INSERT INTO durably_steps (run_id, seq, name, status, output, error, started_at, completed_at, attempt, metadata)
VALUES (:run_id, :seq, :name, 'failed', NULL, :error, :started_at, :completed_at, :attempt,
        :metadata)
ON CONFLICT (run_id, seq) DO UPDATE
SET status = 'failed', error = excluded.error, started_at = excluded.started_at,
    completed_at = excluded.completed_at, attempt = excluded.attempt, metadata = excluded.metadata

-- name: set_progress
UPDATE durably_runs
SET progress_current = :current, progress_total = :total, progress_message = :message,
    updated_at = :now
WHERE id = :id AND status = 'leased' AND lease_generation = :generation

-- name: finish_run
-- Returns the parent, which the same transaction then wakes (no row: the lease was lost).
UPDATE durably_runs
SET status = :status, output = :output, error = :error, completed_at = :now, updated_at = :now,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = :id AND status = 'leased' AND lease_generation = :generation
RETURNING parent_run_id

-- name: wait_run
-- Durable waiting: the leased run gives up its lease and slot and becomes claimable
-- again at :until (fenced). Runs in one transaction with what it waits for. A signal
-- wait whose signal arrived meanwhile (sent while the run was leased) is due at once.
UPDATE durably_runs
SET status = 'waiting',
    available_at = CASE
        WHEN :reason = 'signal' AND EXISTS (
            SELECT 1 FROM durably_signals AS s
            WHERE s.run_id = :id AND s.name = :step_name AND s.consumed_at IS NULL)
        THEN :now ELSE :until END,
    wait_reason = :reason, wait_step = :step_name, wait_deadline = :deadline,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = :now, wait_child_id = :child_run_id
WHERE id = :id AND status = 'leased' AND lease_generation = :generation

-- name: due_if_child_ended
-- A child wait whose child ended (or was deleted) before the wait was written is due at
-- once (same transaction as wait_run): the child's own wake-up found the parent still leased.
UPDATE durably_runs SET available_at = :now
WHERE id = :id AND status = 'waiting' AND wait_reason = 'child' AND wait_child_id = :child_run_id
  AND NOT EXISTS (
    SELECT 1 FROM durably_runs AS c
    WHERE c.id = :child_run_id AND c.status IN ('pending', 'leased', 'waiting'))
-- name: find_overdue_runs
-- Unfinished runs past their deadline that no live lease covers (a worker holding one stops
-- the handler itself). The status list repeats durably_runs_deadline's, so that partial
-- index serves it; INDEXED BY, as the planner would otherwise walk every unfinished run by
-- status (it cannot know few have deadlines), and so a schema that lost the index fails loudly.
SELECT id FROM durably_runs INDEXED BY durably_runs_deadline
WHERE deadline_at <= :now AND status IN ('pending', 'leased', 'waiting')
  AND (status <> 'leased' OR lease_expires_at <= :now)

-- name: fail_overdue_run
UPDATE durably_runs
SET status = 'failed', error = :error, completed_at = :now, updated_at = :now,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = :id AND deadline_at <= :now AND status IN ('pending', 'leased', 'waiting')
  AND (status <> 'leased' OR lease_expires_at <= :now)
RETURNING *

-- name: find_signal_by_id
SELECT id FROM durably_signals WHERE run_id = :run_id AND signal_id = :signal_id

-- name: insert_signal
INSERT INTO durably_signals (run_id, name, signal_id, payload, created_at)
VALUES (:run_id, :name, :signal_id, :payload, :now)

-- name: wake_for_signal
-- A run waiting for this very signal is due now.
UPDATE durably_runs SET available_at = :now, updated_at = :now
WHERE id = :run_id AND status = 'waiting' AND wait_reason = 'signal' AND wait_step = :name

-- name: wake_parent
-- The run :id ended (or was deleted): a parent waiting for it is due now, in the same
-- transaction as the outcome. Found through the child's parent_run_id (primary key).
UPDATE durably_runs SET available_at = :now, updated_at = :now
WHERE id = :parent_run_id AND status = 'waiting' AND wait_reason = 'child' AND wait_child_id = :id

-- name: run_tree
-- The run :id and all its descendants (also below children that ended), deepest first.
WITH RECURSIVE tree (id, depth) AS (
    SELECT :id, 0
    UNION ALL
    SELECT c.id, tree.depth + 1 FROM durably_runs AS c JOIN tree ON c.parent_run_id = tree.id
)
SELECT r.* FROM tree JOIN durably_runs AS r ON r.id = tree.id ORDER BY tree.depth DESC, r.id

-- name: find_active_child
SELECT id, status FROM durably_runs
WHERE parent_run_id = :id AND status IN ('pending', 'leased', 'waiting')
LIMIT 1

-- name: wake_offline_runs
-- The network is back: every run waiting for it is due now (its recheck time was later).
UPDATE durably_runs SET available_at = :now, updated_at = :now
WHERE status = 'waiting' AND wait_reason = 'offline' AND available_at > :now

-- name: next_signal
SELECT id, payload FROM durably_signals
WHERE run_id = :run_id AND name = :name AND consumed_at IS NULL
ORDER BY id LIMIT 1

-- name: consume_signal
UPDATE durably_signals SET consumed_at = :now WHERE id = :id AND consumed_at IS NULL

-- name: reject_signal
-- Only the run's live lease holder may drop a signal (its waiting handler refused the payload).
DELETE FROM durably_signals
WHERE id = :id AND consumed_at IS NULL AND EXISTS (
    SELECT 1 FROM durably_runs
    WHERE durably_runs.id = durably_signals.run_id AND status = 'leased'
      AND lease_generation = :generation)

-- name: insert_step_attempt
INSERT INTO durably_step_attempts (run_id, seq, name, attempt, error, started_at, completed_at, offline, metadata)
VALUES (:run_id, :seq, :name, :attempt, :error, :started_at, :completed_at, :offline,
        :metadata)
ON CONFLICT (run_id, seq, attempt) DO NOTHING

-- name: list_step_attempts
SELECT * FROM durably_step_attempts WHERE run_id = :run_id ORDER BY seq, attempt

-- name: count_step_attempts
-- Per position: failed attempts in all (attempt numbering) and since the last resume (retry
-- budget). An attempt that failed because the browser was offline numbers, but never counts.
SELECT seq, COUNT(*) AS total, SUM(before_resume = 0 AND offline = 0) AS current
FROM durably_step_attempts WHERE run_id = :run_id GROUP BY seq

-- name: resume_run
-- A failed or cancelled run goes back to pending; its attempt count is kept.
UPDATE durably_runs
SET status = 'pending', available_at = :now, output = NULL, error = NULL, completed_at = NULL,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = :now
WHERE id = :id AND status IN ('failed', 'cancelled')

-- name: archive_failed_steps
-- On resume the failed step's row becomes an attempt in the history (the step runs again).
INSERT INTO durably_step_attempts (run_id, seq, name, attempt, error, started_at, completed_at, metadata)
SELECT run_id, seq, name, attempt, error, started_at, completed_at, metadata
FROM durably_steps WHERE run_id = :run_id AND status = 'failed'
ON CONFLICT (run_id, seq, attempt) DO NOTHING

-- name: delete_failed_steps
DELETE FROM durably_steps WHERE run_id = :run_id AND status = 'failed'

-- name: mark_attempts_before_resume
UPDATE durably_step_attempts SET before_resume = 1 WHERE run_id = :run_id

-- name: copy_steps_for_fork
-- fork_run: the source's completed steps before the fork point, at the same positions.
INSERT INTO durably_steps (
    run_id, seq, name, status, output, error, started_at, completed_at, kind, attempt, metadata)
SELECT :new_id, seq, name, status, output, error, started_at, completed_at, kind, attempt, metadata
FROM durably_steps WHERE run_id = :source_id AND status = 'completed' AND seq < :before_seq

-- name: drop_step_outputs
UPDATE durably_steps SET output = NULL WHERE run_id = :run_id

-- name: list_steps
SELECT * FROM durably_steps WHERE run_id = :run_id ORDER BY seq

-- name: list_completed_steps
SELECT * FROM durably_steps WHERE run_id = :run_id AND status = 'completed' ORDER BY seq

-- name: append_log
INSERT INTO durably_logs (run_id, step_name, level, message, data, created_at)
VALUES (:run_id, :step_name, :level, :message, :data, :created_at)

-- name: list_logs
SELECT * FROM durably_logs WHERE run_id = :run_id ORDER BY id


-- name: debounce_run
-- A trigger of a debounced job joins the pending run of its job and concurrency key that
-- never started: the latest input wins and the start moves to :available_at.
UPDATE durably_runs SET input = :input, available_at = :available_at, updated_at = :now
WHERE id = :id AND status = 'pending' AND started_at IS NULL
RETURNING *

-- name: delay_new_run
-- A new run of a debounced job starts only once its debounce has passed with no further trigger.
UPDATE durably_runs SET available_at = :available_at WHERE id = :id

-- name: count_job_leases
-- max_concurrent: the runs of one job under a live lease (a cancelled run whose handler is
-- still stopping holds its lease too). Served by durably_runs_leases: live leases are few.
SELECT COUNT(*) AS n FROM durably_runs
WHERE status IN ('leased', 'cancelled') AND lease_expires_at > :now AND job_name = :job_name

-- name: count_job_starts
-- rate_limit: the runs of one job first claimed after :since (durably_runs_job_started).
SELECT COUNT(*) AS n FROM durably_runs WHERE job_name = :job_name AND started_at > :since

-- name: nth_job_start
-- The start whose leaving the window frees a rate-limited job: the (:skip + 1)-th oldest since :since.
SELECT started_at FROM durably_runs WHERE job_name = :job_name AND started_at > :since
ORDER BY started_at LIMIT 1 OFFSET :skip

-- name: next_pending_available
-- The earliest not-before time of a pending run still in the future (a debounce).
SELECT MIN(available_at) AS at FROM durably_runs
WHERE status = 'pending' AND available_at > :now
  AND job_name IN (SELECT value FROM json_each(:job_names))
-- name: upsert_schedule
-- A changed cron or timezone replaces the next tick; otherwise it stays (every worker syncs
-- define_job(schedule=) at start, and that must not move a tick). Paused and the last tick
-- are an operator's and the firing's: an upsert keeps them.
INSERT INTO durably_schedules (
    name, job_name, cron, timezone, input, catch_up, paused, next_tick_at,
    last_tick_at, last_run_id, created_at, updated_at
) VALUES (
    :name, :job_name, :cron, :timezone, :input, :catch_up, :paused, :next_tick_at,
    NULL, NULL, :now, :now
)
ON CONFLICT (name) DO UPDATE
SET job_name = excluded.job_name, input = excluded.input, catch_up = excluded.catch_up,
    next_tick_at = CASE
        WHEN durably_schedules.cron = excluded.cron AND durably_schedules.timezone = excluded.timezone
        THEN durably_schedules.next_tick_at ELSE excluded.next_tick_at END,
    cron = excluded.cron, timezone = excluded.timezone, updated_at = excluded.updated_at

-- name: get_schedule
SELECT * FROM durably_schedules WHERE name = :name

-- name: list_schedules
SELECT * FROM durably_schedules ORDER BY name

-- name: delete_schedule
DELETE FROM durably_schedules WHERE name = :name

-- name: set_schedule_paused
UPDATE durably_schedules
SET paused = :paused, next_tick_at = COALESCE(:next_tick_at, next_tick_at), updated_at = :now
WHERE name = :name

-- name: due_schedules
SELECT * FROM durably_schedules WHERE paused = 0 AND next_tick_at <= :now
ORDER BY next_tick_at LIMIT :limit

-- name: next_schedule_tick
SELECT MIN(next_tick_at) AS next_tick_at FROM durably_schedules WHERE paused = 0

-- name: advance_schedule
-- The compare-and-set of a firing: only the worker that read this next tick moves it on.
UPDATE durably_schedules
SET next_tick_at = :next_tick_at, last_tick_at = :last_tick_at, updated_at = :now
WHERE name = :name AND paused = 0 AND next_tick_at = :expected_next_tick

-- name: set_schedule_last_run
UPDATE durably_schedules SET last_run_id = :run_id WHERE name = :name

