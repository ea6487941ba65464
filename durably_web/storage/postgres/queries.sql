-- Every statement the PostgreSQL store runs, one per "-- name:" header.
-- Parameters are psycopg's named placeholders (%(name)s, bound server-side); lists are
-- passed as arrays, so every statement here is static text. Tables are unqualified:
-- each connection's search_path is the store's schema.
--
-- Changes are announced with pg_notify(%(channel)s, '<run id> <status> <origin>') inside the
-- transaction that makes them, so a listener hears of a change only once it is committed
-- (and never of one that was rolled back).
--
-- Locking protocol (see store.py for the reasoning): a transaction that may make a run of
-- concurrency key K pending, or give K a lease, first holds the advisory lock of K
-- (hashtextextended of the store's lock namespace || K); several are taken in sorted
-- order, and always before any row lock. claim_run only ever *tries* that lock, so it
-- never waits for anything and cannot be part of a deadlock.

-- name: create_migrations_table
-- The schema version record; each applied migration adds its number.
CREATE TABLE IF NOT EXISTS durably_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at BIGINT NOT NULL
)

-- name: lock_migrations
-- Held until the migration transaction ends: ten workers starting at once migrate one by one.
SELECT pg_advisory_xact_lock(%(key)s)

-- name: schema_exists
-- :schema is the quoted identifier (to_regnamespace reads a name as SQL would).
SELECT to_regnamespace(%(schema)s) IS NOT NULL AS found

-- name: record_migration
INSERT INTO durably_migrations (version, applied_at) VALUES (%(version)s, %(now)s)

-- name: schema_version
SELECT COALESCE(MAX(version), 0) AS version FROM durably_migrations

-- name: has_migrations_table
-- Whether this schema holds a durably-web database at all (read-only opens check before reading).
SELECT to_regclass('durably_migrations') IS NOT NULL AS found

-- name: ping
-- The LISTEN connection's health check after a quiet while.
SELECT 1

-- name: configure_session
-- Run once per new pool connection (search_path, statement_timeout, read-only default).
SELECT set_config(setting.name, setting.value, false)
FROM unnest(%(names)s::text[], %(values)s::text[]) AS setting (name, value)

-- name: lock_keys
-- Blocking advisory locks, one per text, taken in the order given (callers sort them).
SELECT pg_advisory_xact_lock(hashtextextended(lock_text, 0))
FROM unnest(%(locks)s::text[]) AS lock_text

-- name: lock_concurrency_key_of_run
-- The advisory lock of one run's concurrency key (no row at all for a run without one).
SELECT pg_advisory_xact_lock(hashtextextended(%(ns)s || concurrency_key, 0))
FROM durably_runs WHERE id = %(id)s AND concurrency_key IS NOT NULL

-- name: try_lock
SELECT pg_try_advisory_xact_lock(hashtextextended(%(lock)s, 0)) AS locked

-- name: find_idempotent_run
SELECT * FROM durably_runs WHERE job_name = %(job_name)s AND idempotency_key = %(idempotency_key)s

-- name: find_pending_by_concurrency_key
SELECT * FROM durably_runs WHERE concurrency_key = %(concurrency_key)s AND status = 'pending'

-- name: insert_run
-- One statement: the run, its label rows and the announcement. ON CONFLICT DO NOTHING: a
-- unique index that another transaction filled first (idempotency key, pending concurrency
-- key) returns no row instead of an error, and the caller looks the winner up.
WITH inserted AS (
    INSERT INTO durably_runs (
        id, job_name, status, input, labels, idempotency_key, concurrency_key,
        available_at, created_at, updated_at, forked_from,
        priority, trace_parent, parent_run_id, deadline_at, version
    ) VALUES (
        %(id)s, %(job_name)s, 'pending', %(input)s, %(labels)s, %(idempotency_key)s, %(concurrency_key)s,
        %(created_at)s, %(created_at)s, %(created_at)s, %(forked_from)s,
        %(priority)s, %(trace_parent)s, %(parent_run_id)s, %(deadline_at)s, %(version)s
    )
    ON CONFLICT DO NOTHING
    RETURNING id
), labelled AS (
    INSERT INTO durably_run_labels (run_id, key, value)
    SELECT inserted.id, label.key, label.value
    FROM inserted, unnest(%(label_keys)s::text[], %(label_values)s::text[]) AS label (key, value)
)
SELECT id, pg_notify(%(channel)s, id || ' pending' || ' ' || %(origin)s) FROM inserted

-- name: insert_leased_run
-- A run created already leased to the worker of the process triggering it (the insert is
-- its first claim): create_leased_run. Its label rows and announcement in the same statement;
-- 'started' tells other processes it was both triggered and leased.
WITH inserted AS (
    INSERT INTO durably_runs (
        id, job_name, status, input, labels, available_at, created_at, updated_at, started_at,
        priority, trace_parent, parent_run_id, deadline_at, version,
        lease_owner, lease_generation, lease_expires_at, attempt
    ) VALUES (
        %(id)s, %(job_name)s, 'leased', %(input)s, %(labels)s, %(created_at)s, %(created_at)s,
        %(created_at)s, %(created_at)s, %(priority)s, %(trace_parent)s, %(parent_run_id)s,
        %(deadline_at)s, %(version)s, %(worker_id)s, 1, %(lease_until)s, 1
    )
    RETURNING id
), labelled AS (
    INSERT INTO durably_run_labels (run_id, key, value)
    SELECT inserted.id, label.key, label.value
    FROM inserted, unnest(%(label_keys)s::text[], %(label_values)s::text[]) AS label (key, value)
)
SELECT id, pg_notify(%(channel)s, id || ' started' || ' ' || %(origin)s) FROM inserted

-- name: get_run
SELECT * FROM durably_runs WHERE id = %(id)s

-- name: get_run_for_update
SELECT * FROM durably_runs WHERE id = %(id)s FOR UPDATE

-- name: get_run_for_share
SELECT * FROM durably_runs WHERE id = %(id)s FOR SHARE

-- name: cancel_run
-- The lease is kept: a cancelled run holds its concurrency key until its worker
-- has stopped the handler (release_run) or the lease runs out. A waiting run has none.
WITH cancelled AS (
    UPDATE durably_runs
    SET status = 'cancelled', completed_at = %(now)s, updated_at = %(now)s
    WHERE id = %(id)s AND status IN ('pending', 'leased', 'waiting')
    RETURNING *
)
SELECT cancelled.*, pg_notify(%(channel)s, cancelled.id || ' cancelled' || ' ' || %(origin)s) FROM cancelled

-- name: delete_run
WITH deleted AS (DELETE FROM durably_runs WHERE id = %(id)s RETURNING id)
SELECT pg_notify(%(channel)s, id || ' deleted ' || %(origin)s) FROM deleted

-- name: purge_runs
-- SKIP LOCKED: workers purging at the same time share the work instead of queueing.
WITH purged AS (
    DELETE FROM durably_runs WHERE id IN (
        SELECT id FROM durably_runs
        WHERE status IN ('completed', 'failed', 'cancelled') AND completed_at < %(before)s
          AND NOT EXISTS (  -- as delete_run: never a parent whose children are still active
            SELECT 1 FROM durably_runs AS c
            WHERE c.parent_run_id = durably_runs.id AND c.status IN ('pending', 'leased', 'waiting'))
        ORDER BY completed_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    RETURNING id)
SELECT pg_notify(%(channel)s, id || ' deleted ' || %(origin)s) FROM purged

-- name: find_claimable_run
-- Highest priority first, then oldest (durably_runs_active holds the unfinished runs in
-- that order), as SQLite's find_claimable_run: pending or waiting and due, or leased with
-- an expired lease; a concurrency key blocks while another run holds a live lease on it,
-- including a cancelled run whose handler has not stopped yet. FOR UPDATE SKIP LOCKED: a
-- row another claimer (or any writer) has locked is passed over, never waited for, and
-- the row returned is rechecked against these conditions in its latest committed version.
-- The concurrency-key condition is only a first filter here (it reads this statement's
-- snapshot); lease_run checks it again under the key's lock.
-- The first condition is implied by the second, but the planner does not see that
-- through the OR: stated on its own it lets the claim walk durably_runs_active (the
-- unfinished runs, in id order) instead of the primary key, which passes over every
-- finished run older than the oldest claimable one, so a claim got slower with every run
-- that completed (0.2 ms behind 1,000 finished runs, where this takes 0.02 ms).
SELECT r.id, r.concurrency_key FROM durably_runs AS r
WHERE r.status IN ('pending', 'leased', 'waiting')
  AND ((r.status IN ('pending', 'waiting') AND r.available_at <= %(now)s)
       OR (r.status = 'leased' AND r.lease_expires_at <= %(now)s))
  AND r.job_name = ANY(%(job_names)s::text[])
  AND r.id <> ALL(%(passed_over)s::text[])
  AND (r.concurrency_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM durably_runs AS other
        WHERE other.concurrency_key = r.concurrency_key
          AND other.status IN ('leased', 'cancelled') AND other.lease_expires_at > %(now)s
          AND other.id <> r.id))
  -- Flow control (see SQLite's find_claimable_run): empty unless rate-limited jobs are full.
  AND (r.started_at IS NOT NULL OR r.job_name <> ALL(%(rate_limited)s::text[]))
  -- Safe deploys: a started run of a job this worker pins to its version (pinned_versions,
  -- a JSON object job -> version) is left for a worker of the version that started it.
  AND (r.started_at IS NULL OR r.version IS NULL
       OR COALESCE(%(pinned_versions)s::jsonb ->> r.job_name, r.version) = r.version)
ORDER BY r.priority DESC, r.id
LIMIT 1
FOR UPDATE OF r SKIP LOCKED

-- name: claim_unkeyed_run
-- claim_run's fast path, one statement in autocommit (a single round trip): the candidate
-- find_claimable_run would pick (highest priority, then oldest), leased at once if it has no concurrency
-- key (nothing else to check: its row is locked and rechecked, as in find_claimable_run).
-- A candidate with a key is only reported (candidate_key) and left alone: claim_run
-- then claims in a transaction, under the key's advisory lock. The lease's columns are
-- NULL unless leased; no row means nothing is claimable. pg_notify sits in a scalar
-- subquery over leased, so only a lease is announced. MATERIALIZED: both uses of the
-- candidate are the one row this statement locked. Its conditions are find_claimable_run's
-- (see there why the status is tested twice) but for flow control's: it claims only for
-- jobs without limits (a claim with limited jobs is _claim_limited's, in a transaction).
WITH candidate AS MATERIALIZED (
    SELECT r.id, r.concurrency_key FROM durably_runs AS r
    WHERE r.status IN ('pending', 'leased', 'waiting')
      AND ((r.status IN ('pending', 'waiting') AND r.available_at <= %(now)s)
           OR (r.status = 'leased' AND r.lease_expires_at <= %(now)s))
      AND r.job_name = ANY(%(job_names)s::text[])
      AND (r.concurrency_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM durably_runs AS other
            WHERE other.concurrency_key = r.concurrency_key
              AND other.status IN ('leased', 'cancelled') AND other.lease_expires_at > %(now)s
              AND other.id <> r.id))
      -- Safe deploys: a started run of a job this worker pins to its version (pinned_versions,
      -- a JSON object job -> version) is left for a worker of the version that started it.
      AND (r.started_at IS NULL OR r.version IS NULL
           OR COALESCE(%(pinned_versions)s::jsonb ->> r.job_name, r.version) = r.version)
    ORDER BY r.priority DESC, r.id
    LIMIT 1
    FOR UPDATE OF r SKIP LOCKED
), leased AS (
    UPDATE durably_runs
    SET status = 'leased', lease_owner = %(worker_id)s, lease_generation = lease_generation + 1,
        lease_expires_at = %(lease_until)s, attempt = attempt + 1,
        version = CASE WHEN started_at IS NULL
            THEN COALESCE(%(versions)s::jsonb ->> job_name, version) ELSE version END,
        started_at = COALESCE(started_at, %(now)s), updated_at = %(now)s
    FROM candidate
    WHERE durably_runs.id = candidate.id AND candidate.concurrency_key IS NULL
    RETURNING durably_runs.*
)
SELECT candidate.id AS candidate_id, candidate.concurrency_key AS candidate_key, leased.*,
       (SELECT pg_notify(%(channel)s, l.id || ' leased' || ' ' || %(origin)s) FROM leased AS l) AS notified
FROM candidate LEFT JOIN leased ON leased.id = candidate.id

-- name: lease_run
-- The run's row is locked by find_claimable_run. For a run with a concurrency key the
-- caller holds that key's advisory lock, and this statement's snapshot is newer than that
-- lock: every lease of the key committed by another claimer is visible, so the check
-- below is exact.
WITH leased AS (
    UPDATE durably_runs
    SET status = 'leased', lease_owner = %(worker_id)s, lease_generation = lease_generation + 1,
        lease_expires_at = %(lease_until)s, attempt = attempt + 1,
        version = CASE WHEN started_at IS NULL
            THEN COALESCE(%(versions)s::jsonb ->> job_name, version) ELSE version END,
        started_at = COALESCE(started_at, %(now)s), updated_at = %(now)s
    WHERE id = %(id)s
      AND (concurrency_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM durably_runs AS other
            WHERE other.concurrency_key = durably_runs.concurrency_key
              AND other.status IN ('leased', 'cancelled') AND other.lease_expires_at > %(now)s
              AND other.id <> durably_runs.id))
    RETURNING *
)
SELECT leased.*, pg_notify(%(channel)s, leased.id || ' leased' || ' ' || %(origin)s) FROM leased

-- name: concurrency_keys_of_runs
SELECT DISTINCT concurrency_key FROM durably_runs
WHERE id = ANY(%(ids)s::text[]) AND concurrency_key IS NOT NULL

-- name: renew_leases
-- :status is 'leased', or 'cancelled' for runs whose handlers are still winding down
-- (their leases keep the concurrency keys held until release_run). A lease that has
-- expired by :now is not renewed: another run of its key may already have been claimed.
-- Nor is one whose key another run holds a live lease on: that claim saw this lease
-- expired (by its clock) after this renewal read the clock. The caller holds the keys'
-- advisory locks, so no such claim can be in progress.
UPDATE durably_runs AS r SET lease_expires_at = %(lease_until)s
FROM unnest(%(ids)s::text[], %(generations)s::bigint[]) AS mine (id, generation)
WHERE r.id = mine.id AND r.lease_generation = mine.generation AND r.status = %(status)s
  AND r.lease_expires_at > %(now)s
  AND (r.concurrency_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM durably_runs AS other
        WHERE other.concurrency_key = r.concurrency_key
          AND other.status IN ('leased', 'cancelled') AND other.lease_expires_at > %(now)s
          AND other.id <> r.id))
RETURNING r.id

-- name: release_run
-- A worker that stops gracefully hands the run back: 'pending' again, claimable at
-- once. Only if another run of its concurrency key is already pending (at most one
-- may be) does it stay 'leased', with its lease expired: just as claimable, and
-- still first in line. A cancelled run stays cancelled; its lease ends. The caller
-- holds the key's advisory lock, so no other transaction makes a run of the key
-- pending meanwhile (the unique index would turn that race into an error).
WITH released AS (
    UPDATE durably_runs
    SET status = CASE
            WHEN status = 'leased' AND (concurrency_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM durably_runs AS other
                WHERE other.concurrency_key = durably_runs.concurrency_key AND other.status = 'pending'))
            THEN 'pending' ELSE status END,
        lease_expires_at = %(now)s, lease_owner = NULL, updated_at = %(now)s
    WHERE id = %(id)s AND status IN ('leased', 'cancelled') AND lease_generation = %(generation)s
    RETURNING id, status
)
SELECT pg_notify(%(channel)s, id || ' ' || status || ' ' || %(origin)s) FROM released

-- name: expire_leases
WITH expired AS (
    UPDATE durably_runs SET lease_expires_at = %(now)s, lease_owner = NULL, updated_at = %(now)s
    WHERE status IN ('leased', 'cancelled') AND lease_expires_at > %(now)s
    RETURNING id, status
)
SELECT pg_notify(%(channel)s, id || ' ' || status || ' ' || %(origin)s) FROM expired

-- name: record_step
-- One statement, so it is its own committed transaction on the hot path. A failed
-- row at the same position (a resumed run executing its failed step again) is replaced.
-- FOR SHARE makes the fence exact: a takeover (claim_run's UPDATE of the run row) either
-- committed before, and the recheck of the locked row sees the new generation, or waits
-- until this step is committed, so the new owner's replay reads it.
INSERT INTO durably_steps (
    run_id, seq, name, status, output, error, started_at, completed_at, kind, attempt, metadata)
SELECT %(run_id)s, %(seq)s, %(name)s, %(status)s, %(output)s, %(error)s, %(started_at)s,
       %(completed_at)s, %(kind)s, %(attempt)s, %(metadata)s
WHERE EXISTS (
    SELECT 1 FROM durably_runs
    WHERE id = %(run_id)s AND status = 'leased' AND lease_generation = %(generation)s
    FOR SHARE)
ON CONFLICT (run_id, seq) DO UPDATE
SET name = excluded.name, status = excluded.status, output = excluded.output, error = excluded.error,
    started_at = excluded.started_at, completed_at = excluded.completed_at, kind = excluded.kind,
    attempt = excluded.attempt, metadata = excluded.metadata
WHERE durably_steps.status = 'failed'

-- name: record_failed_step
INSERT INTO durably_steps (run_id, seq, name, status, output, error, started_at, completed_at, attempt, metadata)
VALUES (%(run_id)s, %(seq)s, %(name)s, 'failed', NULL, %(error)s, %(started_at)s, %(completed_at)s, %(attempt)s,
        %(metadata)s)
ON CONFLICT (run_id, seq) DO UPDATE
SET status = 'failed', error = excluded.error, started_at = excluded.started_at,
    completed_at = excluded.completed_at, attempt = excluded.attempt, metadata = excluded.metadata

-- name: set_progress
UPDATE durably_runs
SET progress_current = %(current)s, progress_total = %(total)s, progress_message = %(message)s,
    updated_at = %(now)s
WHERE id = %(id)s AND status = 'leased' AND lease_generation = %(generation)s

-- name: finish_run
-- %(with_parent)s false: only a run without a parent (the one-statement path); a child's
-- outcome goes through a transaction that wakes its parent in a second statement.
WITH finished AS (
    UPDATE durably_runs
    SET status = %(status)s, output = %(output)s, error = %(error)s, completed_at = %(now)s,
        updated_at = %(now)s, lease_owner = NULL, lease_expires_at = NULL
    WHERE id = %(id)s AND status = 'leased' AND lease_generation = %(generation)s
      AND (%(with_parent)s OR parent_run_id IS NULL)
    RETURNING id, status
)
SELECT pg_notify(%(channel)s, id || ' ' || status || ' ' || %(origin)s) FROM finished

-- name: lock_leased_run
-- The fence of a multi-statement write, and the row lock that orders it against
-- send_signal (which locks the same row first).
SELECT id FROM durably_runs
WHERE id = %(id)s AND status = 'leased' AND lease_generation = %(generation)s
FOR UPDATE

-- name: wait_run
-- Durable waiting: the leased run gives up its lease and slot and becomes claimable
-- again at :until (fenced by lock_leased_run, earlier in the transaction). A signal
-- wait whose signal arrived meanwhile (sent while the run was leased) is due at once:
-- send_signal locks the run row before writing, so this statement (started after the
-- lock was taken) sees every signal committed before, and any later one finds the run
-- waiting and wakes it.
WITH waiting AS (
    UPDATE durably_runs
    SET status = 'waiting',
        available_at = CASE
            WHEN %(reason)s = 'signal' AND EXISTS (
                SELECT 1 FROM durably_signals AS s
                WHERE s.run_id = %(id)s AND s.name = %(step_name)s AND s.consumed_at IS NULL)
            THEN %(now)s ELSE %(until)s END,
        wait_reason = %(reason)s, wait_step = %(step_name)s, wait_deadline = %(deadline)s,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = %(now)s,
        wait_child_id = %(child_run_id)s
    WHERE id = %(id)s AND status = 'leased' AND lease_generation = %(generation)s
    RETURNING id
)
SELECT pg_notify(%(channel)s, id || ' waiting' || ' ' || %(origin)s) FROM waiting

-- name: lock_child_for_wait
-- A child wait locks the child's row before the parent's (every writer of a child's outcome
-- locks the child, then wakes the parent: one order, no deadlock). A child ending meanwhile
-- has then either committed (due_if_child_ended, a later statement, sees it) or waits for
-- this transaction (and then finds the parent waiting).
SELECT id FROM durably_runs WHERE id = %(child_run_id)s FOR SHARE

-- name: due_if_child_ended
-- The child ended (or was deleted) before the wait was written: the wait is due at once.
WITH woken AS (
    UPDATE durably_runs SET available_at = %(now)s
    WHERE id = %(id)s AND status = 'waiting' AND wait_reason = 'child'
      AND wait_child_id = %(child_run_id)s
      AND NOT EXISTS (
        SELECT 1 FROM durably_runs AS c
        WHERE c.id = %(child_run_id)s AND c.status IN ('pending', 'leased', 'waiting'))
    RETURNING id
)
SELECT pg_notify(%(channel)s, id || ' waiting' || ' ' || %(origin)s) FROM woken

-- name: wake_parent
-- The run %(id)s ended or is being deleted (its row locked by this transaction): a parent
-- waiting for it is due now, announced as claimable. A statement of its own, so that its
-- snapshot includes a parent's wait committed while this transaction waited for the child.
WITH woken AS (
    UPDATE durably_runs AS p SET available_at = %(now)s, updated_at = %(now)s
    FROM durably_runs AS c
    WHERE c.id = %(id)s AND p.id = c.parent_run_id AND p.status = 'waiting'
      AND p.wait_reason = 'child' AND p.wait_child_id = c.id
    RETURNING p.id
)
SELECT pg_notify(%(channel)s, id || ' waiting' || ' ' || %(origin)s) FROM woken

-- name: lock_run_tree
-- The run and every descendant (also below children that ended), locked deepest first:
-- the order every child-outcome writer follows (child, then parent).
WITH RECURSIVE tree (id, depth) AS (
    SELECT id, 0 FROM durably_runs WHERE id = %(id)s
    UNION ALL
    SELECT c.id, tree.depth + 1 FROM durably_runs AS c JOIN tree ON c.parent_run_id = tree.id
)
SELECT r.* FROM tree JOIN durably_runs AS r ON r.id = tree.id
ORDER BY tree.depth DESC, r.id
FOR UPDATE OF r

-- name: find_active_child
SELECT id, status FROM durably_runs
WHERE parent_run_id = %(id)s AND status IN ('pending', 'leased', 'waiting')
LIMIT 1

-- name: find_signal_by_id
SELECT id FROM durably_signals WHERE run_id = %(run_id)s AND signal_id = %(signal_id)s

-- name: insert_signal
INSERT INTO durably_signals (run_id, name, signal_id, payload, created_at)
VALUES (%(run_id)s, %(name)s, %(signal_id)s, %(payload)s, %(now)s)

-- name: wake_for_signal
-- A run waiting for this very signal is due now (announced: it is claimable again).
WITH woken AS (
    UPDATE durably_runs SET available_at = %(now)s, updated_at = %(now)s
    WHERE id = %(run_id)s AND status = 'waiting' AND wait_reason = 'signal' AND wait_step = %(name)s
    RETURNING id
)
SELECT pg_notify(%(channel)s, id || ' waiting' || ' ' || %(origin)s) FROM woken

-- name: wake_offline_runs
-- The network is back: every run waiting for it is due now (announced: claimable again).
WITH woken AS (
    UPDATE durably_runs SET available_at = %(now)s, updated_at = %(now)s
    WHERE status = 'waiting' AND wait_reason = 'offline' AND available_at > %(now)s
    RETURNING id
)
SELECT pg_notify(%(channel)s, id || ' waiting' || ' ' || %(origin)s) FROM woken

-- name: fail_overdue_runs
-- Unfinished runs past their deadline that no live lease covers (a worker holding one stops
-- the handler itself), failed and announced in one statement. The status list repeats
-- durably_runs_deadline's, so that partial index serves it; SKIP LOCKED passes over a run a
-- claimer has locked this instant (the next turn, or its new owner, fails it).
WITH overdue AS (
    SELECT id FROM durably_runs
    WHERE deadline_at <= %(now)s AND status IN ('pending', 'leased', 'waiting')
      AND (status <> 'leased' OR lease_expires_at <= %(now)s)
    ORDER BY id
    FOR UPDATE SKIP LOCKED
), failed AS (
    UPDATE durably_runs
    SET status = 'failed', error = %(error)s, completed_at = %(now)s, updated_at = %(now)s,
        lease_owner = NULL, lease_expires_at = NULL
    FROM overdue WHERE durably_runs.id = overdue.id
    RETURNING durably_runs.*
)
SELECT failed.*, pg_notify(%(channel)s, failed.id || ' failed' || ' ' || %(origin)s) FROM failed

-- name: drop_step_outputs_of_runs
UPDATE durably_steps SET output = NULL WHERE run_id = ANY(%(ids)s::text[])

-- name: next_signal
SELECT id, payload FROM durably_signals
WHERE run_id = %(run_id)s AND name = %(name)s AND consumed_at IS NULL
ORDER BY id LIMIT 1

-- name: consume_signal
UPDATE durably_signals SET consumed_at = %(now)s WHERE id = %(id)s AND consumed_at IS NULL

-- name: reject_signal
-- Only the run's live lease holder may drop a signal (its waiting handler refused the
-- payload); FOR SHARE fences it exactly, as in record_step.
DELETE FROM durably_signals
WHERE id = %(id)s AND consumed_at IS NULL AND EXISTS (
    SELECT 1 FROM durably_runs
    WHERE durably_runs.id = durably_signals.run_id AND status = 'leased'
      AND lease_generation = %(generation)s
    FOR SHARE)

-- name: insert_step_attempt
INSERT INTO durably_step_attempts (run_id, seq, name, attempt, error, started_at, completed_at, offline, metadata)
VALUES (%(run_id)s, %(seq)s, %(name)s, %(attempt)s, %(error)s, %(started_at)s, %(completed_at)s, %(offline)s,
        %(metadata)s)
ON CONFLICT (run_id, seq, attempt) DO NOTHING

-- name: list_step_attempts
SELECT * FROM durably_step_attempts WHERE run_id = %(run_id)s ORDER BY seq, attempt

-- name: count_step_attempts
-- Per position: failed attempts in all (attempt numbering) and since the last resume (retry
-- budget). An attempt that failed because the browser was offline numbers, but never counts.
SELECT seq, count(*) AS total, count(*) FILTER (WHERE NOT before_resume AND NOT offline) AS current
FROM durably_step_attempts WHERE run_id = %(run_id)s GROUP BY seq

-- name: resume_run
-- A failed or cancelled run goes back to pending; its attempt count is kept.
WITH resumed AS (
    UPDATE durably_runs
    SET status = 'pending', available_at = %(now)s, output = NULL, error = NULL, completed_at = NULL,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = %(now)s
    WHERE id = %(id)s AND status IN ('failed', 'cancelled')
    RETURNING *
)
SELECT resumed.*, pg_notify(%(channel)s, resumed.id || ' pending' || ' ' || %(origin)s) FROM resumed

-- name: archive_failed_steps
-- On resume the failed step's row becomes an attempt in the history (the step runs again).
INSERT INTO durably_step_attempts (run_id, seq, name, attempt, error, started_at, completed_at, metadata)
SELECT run_id, seq, name, attempt, error, started_at, completed_at, metadata
FROM durably_steps WHERE run_id = %(run_id)s AND status = 'failed'
ON CONFLICT (run_id, seq, attempt) DO NOTHING

-- name: delete_failed_steps
DELETE FROM durably_steps WHERE run_id = %(run_id)s AND status = 'failed'

-- name: mark_attempts_before_resume
UPDATE durably_step_attempts SET before_resume = true WHERE run_id = %(run_id)s

-- name: copy_steps_for_fork
-- fork_run: the source's completed steps before the fork point, at the same positions.
INSERT INTO durably_steps (
    run_id, seq, name, status, output, error, started_at, completed_at, kind, attempt, metadata)
SELECT %(new_id)s, seq, name, status, output, error, started_at, completed_at, kind, attempt, metadata
FROM durably_steps WHERE run_id = %(source_id)s AND status = 'completed' AND seq < %(before_seq)s

-- name: drop_step_outputs
UPDATE durably_steps SET output = NULL WHERE run_id = %(run_id)s

-- name: list_steps
SELECT * FROM durably_steps WHERE run_id = %(run_id)s ORDER BY seq

-- name: list_completed_steps
SELECT * FROM durably_steps WHERE run_id = %(run_id)s AND status = 'completed' ORDER BY seq

-- name: append_log
INSERT INTO durably_logs (run_id, step_name, level, message, data, created_at)
VALUES (%(run_id)s, %(step_name)s, %(level)s, %(message)s, %(data)s, %(created_at)s)

-- name: list_logs
SELECT * FROM durably_logs WHERE run_id = %(run_id)s ORDER BY id


-- name: debounce_run
-- A trigger of a debounced job joins the pending run of its job and concurrency key that
-- never started (create_runs holds the key's advisory lock, so no claim of it is in
-- flight): the latest input wins and the start moves to available_at.
UPDATE durably_runs SET input = %(input)s, available_at = %(available_at)s, updated_at = %(now)s
WHERE id = %(id)s AND status = 'pending' AND started_at IS NULL
RETURNING *

-- name: delay_new_run
-- A new run of a debounced job starts only once its debounce has passed with no further trigger.
UPDATE durably_runs SET available_at = %(available_at)s WHERE id = %(id)s

-- name: count_job_flow
-- The claim's limited jobs, under their advisory locks (so every lease committed by an
-- earlier claimer of them is in this statement's snapshot): per job, its runs under a live
-- lease (durably_runs_leases: live leases are few) and its runs first claimed after
-- since (durably_runs_job_started; since is far in the future for a job without rate_limit).
SELECT job.name,
       (SELECT COUNT(*) FROM durably_runs AS r
        WHERE r.status IN ('leased', 'cancelled') AND r.lease_expires_at > %(now)s
          AND r.job_name = job.name) AS leased,
       (SELECT COUNT(*) FROM durably_runs AS r
        WHERE r.job_name = job.name AND r.started_at > job.since) AS started
FROM unnest(%(job_names)s::text[], %(sinces)s::bigint[]) AS job (name, since)

-- name: count_job_starts
SELECT COUNT(*) AS n FROM durably_runs WHERE job_name = %(job_name)s AND started_at > %(since)s

-- name: nth_job_start
-- The start whose leaving the window frees a rate-limited job: the (skip + 1)-th oldest since since.
SELECT started_at FROM durably_runs WHERE job_name = %(job_name)s AND started_at > %(since)s
ORDER BY started_at LIMIT 1 OFFSET %(skip)s

-- name: next_pending_available
-- The earliest not-before time of a pending run still in the future (a debounce).
SELECT MIN(available_at) AS at FROM durably_runs
WHERE status = 'pending' AND available_at > %(now)s AND job_name = ANY(%(job_names)s::text[])
-- name: upsert_schedule
-- A changed cron or timezone replaces the next tick; otherwise it stays (every worker syncs
-- define_job(schedule=) at start, and that must not move a tick). Paused and the last tick
-- are an operator's and the firing's: an upsert keeps them.
INSERT INTO durably_schedules (
    name, job_name, cron, timezone, input, catch_up, paused, next_tick_at,
    last_tick_at, last_run_id, created_at, updated_at
) VALUES (
    %(name)s, %(job_name)s, %(cron)s, %(timezone)s, %(input)s, %(catch_up)s, %(paused)s,
    %(next_tick_at)s, NULL, NULL, %(now)s, %(now)s
)
ON CONFLICT (name) DO UPDATE
SET job_name = excluded.job_name, input = excluded.input, catch_up = excluded.catch_up,
    next_tick_at = CASE
        WHEN durably_schedules.cron = excluded.cron AND durably_schedules.timezone = excluded.timezone
        THEN durably_schedules.next_tick_at ELSE excluded.next_tick_at END,
    cron = excluded.cron, timezone = excluded.timezone, updated_at = excluded.updated_at
RETURNING *

-- name: get_schedule
SELECT * FROM durably_schedules WHERE name = %(name)s

-- name: get_schedule_for_update
-- fire_schedule: the row lock makes a second firing worker wait, then see the moved tick.
SELECT * FROM durably_schedules WHERE name = %(name)s FOR UPDATE

-- name: list_schedules
SELECT * FROM durably_schedules ORDER BY name

-- name: delete_schedule
DELETE FROM durably_schedules WHERE name = %(name)s RETURNING *

-- name: set_schedule_paused
UPDATE durably_schedules
SET paused = %(paused)s, next_tick_at = COALESCE(%(next_tick_at)s, next_tick_at), updated_at = %(now)s
WHERE name = %(name)s
RETURNING *

-- name: due_schedules
SELECT * FROM durably_schedules WHERE NOT paused AND next_tick_at <= %(now)s
ORDER BY next_tick_at LIMIT %(limit)s

-- name: next_schedule_tick
SELECT MIN(next_tick_at) AS next_tick_at FROM durably_schedules WHERE NOT paused

-- name: advance_schedule
UPDATE durably_schedules
SET next_tick_at = %(next_tick_at)s, last_tick_at = %(last_tick_at)s, last_run_id = %(run_id)s,
    updated_at = %(now)s
WHERE name = %(name)s
