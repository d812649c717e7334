-- One job model: every job has member executions, one per node per
-- attempt (a single-node job is a gang of one). `gang_members` becomes
-- `members`, and each member records what the coordinator itself
-- observed, which is what it is paid for:
--   started_at  when the coordinator saw it start (offer or start accepted)
--   result_at   when its verified receipt first arrived
--   paid_at     when it was last paid (usage reports have a minimum interval)
ALTER TABLE gang_members RENAME TO members;
ALTER TABLE members ADD COLUMN started_at INTEGER;
ALTER TABLE members ADD COLUMN result_at INTEGER;
ALTER TABLE members ADD COLUMN paid_at INTEGER;

-- Gang members that started before this version: their pay clock starts
-- at their last recorded change (the best the old rows know).
UPDATE members SET started_at = updated_at WHERE state IN ('started', 'stopping') AND started_at IS NULL;

-- Single-node jobs in flight when this version starts get their member.
INSERT INTO members (offer_id, job_id, attempt, rank, provider, listen_addrs, price_per_hour, state, updated_at, started_at)
SELECT offer_id, id, attempts, 0, provider, '[]', COALESCE(price_per_hour, 0),
       CASE state WHEN 'running' THEN 'started' ELSE 'offered' END,
       updated_at,
       CASE state WHEN 'running' THEN updated_at END
FROM jobs
WHERE state IN ('dispatched', 'running') AND offer_id IS NOT NULL AND provider IS NOT NULL
  AND offer_id NOT IN (SELECT offer_id FROM members);

CREATE INDEX members_by_provider ON members (provider, state);
