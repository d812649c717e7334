-- Capability challenges and provider reputation.
CREATE TABLE provider_audits (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    provider     TEXT NOT NULL,
    at           INTEGER NOT NULL,
    challenge_id TEXT NOT NULL,
    outcome      TEXT NOT NULL,   -- passed | flagged | failed
    detail       TEXT NOT NULL
);
CREATE INDEX provider_audits_by_provider ON provider_audits (provider, seq);

-- Reputation 0..=1000, starting at 500; see `audit::reputation_after`.
CREATE TABLE reputation (
    provider TEXT PRIMARY KEY,
    score    INTEGER NOT NULL,
    passed   INTEGER NOT NULL DEFAULT 0,
    flagged  INTEGER NOT NULL DEFAULT 0,
    failed   INTEGER NOT NULL DEFAULT 0
);
