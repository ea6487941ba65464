-- Schedules: a cron expression (read in a time zone) that creates a run of a job at each
-- tick. next_tick_at is the compare-and-set token a firing worker moves on, in the same
-- transaction as it creates the tick's run, so two workers never both fire a tick.
CREATE TABLE durably_schedules (
    name         TEXT PRIMARY KEY,
    job_name     TEXT NOT NULL,
    cron         TEXT NOT NULL,
    timezone     TEXT NOT NULL,
    input        TEXT NOT NULL,
    catch_up     TEXT NOT NULL CHECK (catch_up IN ('latest', 'all')),
    paused       INTEGER NOT NULL DEFAULT 0,
    next_tick_at INTEGER NOT NULL,
    last_tick_at INTEGER,
    last_run_id  TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);

-- due_schedules / next_schedule_tick: the live schedules by due time.
CREATE INDEX durably_schedules_due ON durably_schedules (next_tick_at) WHERE paused = 0;
