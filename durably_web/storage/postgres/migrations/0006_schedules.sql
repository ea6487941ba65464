-- Schedules: a cron expression (read in a time zone) that creates a run of a job at each
-- tick. next_tick_at is the compare-and-set token a firing worker moves on, in the same
-- transaction as it creates the tick's run (the row is locked FOR UPDATE), so two workers
-- never both fire a tick. The same table as SQLite's migration 0007.
CREATE TABLE durably_schedules (
    name         TEXT COLLATE "C" PRIMARY KEY,
    job_name     TEXT NOT NULL,
    cron         TEXT NOT NULL,
    timezone     TEXT NOT NULL,
    input        TEXT NOT NULL,
    catch_up     TEXT NOT NULL CHECK (catch_up IN ('latest', 'all')),
    paused       BOOLEAN NOT NULL DEFAULT false,
    next_tick_at BIGINT NOT NULL,
    last_tick_at BIGINT,
    last_run_id  TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);

-- due_schedules / next_schedule_tick: the live schedules by due time.
CREATE INDEX durably_schedules_due ON durably_schedules (next_tick_at) WHERE NOT paused;
