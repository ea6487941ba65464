-- Child runs (step.start_child / step.wait_for_child): a run started by another run's
-- step links to it with parent_run_id; a parent waiting for a child (wait_reason
-- 'child') names it in wait_child_id, so the child's outcome wakes exactly that wait.
ALTER TABLE durably_runs ADD COLUMN parent_run_id TEXT;
ALTER TABLE durably_runs ADD COLUMN wait_child_id TEXT;

-- get_runs(parent_run_id=), the cancel cascade and delete's "children still active" check:
-- a parent's children in list order (newest id first), without a scan. Partial: most runs
-- have no parent.
CREATE INDEX durably_runs_parent ON durably_runs (parent_run_id, id) WHERE parent_run_id IS NOT NULL;
