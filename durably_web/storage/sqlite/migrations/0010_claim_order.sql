-- The hot path's claim order (issue 15).
--
-- find_claimable_run takes the pending run of highest priority, then oldest. Found through
-- durably_runs_queue, every due pending run had to be sorted on every claim (1 ms per
-- claim behind 2,000 pending runs); this index holds the pending runs in claim order, so
-- a claim reads the first entry that passes its tests and stops. Partial: only pending
-- rows, the ones a claim walks, are kept in it. A pending run not due yet (debounced, or
-- triggered with a later start) that sorts ahead is passed over one entry at a time.
CREATE INDEX durably_runs_claim_order ON durably_runs (priority DESC, id) WHERE status = 'pending';
