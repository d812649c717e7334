-- Counting a buyer's queued jobs (the per-buyer queue limit, checked at
-- every submission) without walking its whole history.
CREATE INDEX jobs_by_owner_state ON jobs (owner, state);
