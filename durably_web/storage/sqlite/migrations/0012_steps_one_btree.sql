-- A step's commit writes one b-tree (issue 15): durably_steps becomes a WITHOUT ROWID
-- table clustered on its primary key (run_id, seq), and UNIQUE (run_id, name) goes.
--
-- Before, every recorded step touched three b-trees: the rowid table, the (run_id, seq)
-- primary-key index and the (run_id, name) unique index, about 3.2 WAL pages per step
-- commit against the 1.05 of a one-row insert into a rowid table (on OPFS each page is a
-- write through a sync access handle, and the commit's cost follows the page count).
-- Clustered on (run_id, seq) a step is one leaf: about 1.2 pages per commit. Reading a
-- run's steps in order (replay, the run view) walks that leaf range directly instead of
-- an index and then a table lookup per row.
--
-- Rows are not all small (a step's output is whatever it returned). A row longer than
-- about a quarter of a page keeps its head in the leaf and the rest in overflow pages,
-- as in the rowid table, which writes the same overflow chain; measured with 1.5 KB,
-- 5 KB and 50 KB outputs a step commit writes no more pages than before either way.
--
-- Step names stay unique within a run, enforced where a run is executed: a worker writes
-- a run's steps only while it holds its lease (record_step is fenced on the lease
-- generation, in the same statement), it reads every recorded step, completed or failed,
-- after taking the lease, and refuses a name that is recorded at another position or was
-- used already in this execution (StepContext: _claim_name, _check_not_recorded_elsewhere).
-- Rows written before this migration were unique under the index. PostgreSQL keeps its
-- unique index.
--
-- The documented rebuild (create, copy, drop, rename), with the columns in their old
-- order so SELECT * reads the same; the store runs migrations with foreign keys off.
-- Copied in key order, so the new b-tree is filled by appends.

CREATE TABLE durably_steps_new (
    run_id       TEXT NOT NULL REFERENCES durably_runs (id) ON DELETE CASCADE,
    seq          INTEGER NOT NULL,
    name         TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('completed', 'failed')),
    output       TEXT,
    error        TEXT,
    attempt      INTEGER NOT NULL DEFAULT 1,
    started_at   INTEGER NOT NULL,
    completed_at INTEGER NOT NULL,
    -- 'run' | 'sleep' | 'signal' (0002); metadata: attempt metadata JSON (0005).
    kind         TEXT NOT NULL DEFAULT 'run',
    metadata     TEXT,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

INSERT INTO durably_steps_new (
    run_id, seq, name, status, output, error, attempt, started_at, completed_at, kind, metadata)
SELECT run_id, seq, name, status, output, error, attempt, started_at, completed_at, kind, metadata
FROM durably_steps ORDER BY run_id, seq;

DROP TABLE durably_steps;
ALTER TABLE durably_steps_new RENAME TO durably_steps;
