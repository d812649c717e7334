-- Reputation from verifiable events: each provider's good and bad evidence
-- (thousandths of an event, forgetting older ones), from which `score` is
-- derived (see `verification::reputation`). Scores written by the old
-- audit-only rule stay until the provider's next event.
ALTER TABLE reputation ADD COLUMN good INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reputation ADD COLUMN bad INTEGER NOT NULL DEFAULT 0;
