-- Blob access checks and unstake requests ask for one provider's active
-- jobs; without this index each such question scanned every active job.
CREATE INDEX jobs_by_provider ON jobs (provider, state);
