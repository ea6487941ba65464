-- Indexes that hand the run list its rows already in list order (newest id first), so
-- a filtered page costs its own size, not the table's (durably_web/storage/run_list.py).
--
-- Labels: the pair index gains run_id, so the rows of one (key, value) come out in id
-- order and the walk stops after the page.
DROP INDEX durably_run_labels_pair;
CREATE INDEX durably_run_labels_pair ON durably_run_labels (key, value, run_id);
-- Status filter: (status, id). Job filter, with or without statuses: (job_name, status,
-- id), walked once per status; it replaces (job_name, id), which nothing else used.
CREATE INDEX durably_runs_status_list ON durably_runs (status, id);
DROP INDEX durably_runs_job;
CREATE INDEX durably_runs_job_list ON durably_runs (job_name, status, id);
