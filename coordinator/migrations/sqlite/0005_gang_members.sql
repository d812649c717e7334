-- Multi-node gang jobs: one row per member (node) per dispatch attempt.
-- A gang job's own row in `jobs` has no provider or offer id; its members
-- live here, each with its own offer id, rank, provider, price, state,
-- what it has been paid, and its verified receipt once it delivered.
--
-- state: offered | reserved | started | released | stopping | delivered
CREATE TABLE gang_members (
    offer_id       TEXT PRIMARY KEY,
    job_id         TEXT NOT NULL,
    attempt        INTEGER NOT NULL,
    rank           INTEGER NOT NULL,
    provider       TEXT NOT NULL,
    listen_addrs   TEXT NOT NULL,
    price_per_hour INTEGER NOT NULL,
    state          TEXT NOT NULL,
    reason         TEXT,
    outcome        TEXT,
    paid           INTEGER NOT NULL DEFAULT 0,
    cost           INTEGER,
    receipt        BLOB,
    manifest_json  TEXT,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX gang_members_by_job ON gang_members (job_id, attempt, rank);
CREATE INDEX gang_members_by_state ON gang_members (state);
