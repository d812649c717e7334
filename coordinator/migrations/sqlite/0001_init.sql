-- Kiln coordinator schema, v1. Portable SQL (SQLite now, PostgreSQL later):
-- ids are TEXT in their Display form, amounts and times are INTEGER
-- (micro-credits, Unix milliseconds), signed messages are stored as the exact
-- canonical bytes that were verified.

CREATE TABLE providers (
    id            TEXT PRIMARY KEY,
    advert        BLOB NOT NULL,
    advert_json   TEXT NOT NULL,
    last_seen     INTEGER NOT NULL,
    registered_at INTEGER NOT NULL
);

CREATE TABLE jobs (
    id             TEXT PRIMARY KEY,
    owner          TEXT NOT NULL,
    submission     BLOB NOT NULL,
    spec_json      TEXT NOT NULL,
    label          TEXT,
    state          TEXT NOT NULL,
    reason         TEXT,
    provider       TEXT,
    offer_id       TEXT,
    attempts       INTEGER NOT NULL DEFAULT 0,
    price_per_hour INTEGER,
    max_cost       INTEGER NOT NULL,
    cost           INTEGER,
    exit_code      INTEGER,
    receipt        BLOB,
    receipt_json   TEXT,
    manifest_json  TEXT,
    output_cid     TEXT,
    stdout_cid     TEXT,
    stderr_cid     TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX jobs_by_owner ON jobs (owner, created_at);
CREATE INDEX jobs_by_state ON jobs (state, created_at);

-- Every state change of every job, in order.
CREATE TABLE job_events (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at     INTEGER NOT NULL,
    state  TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX job_events_by_job ON job_events (job_id, seq);

-- Replay protection: each (signer, nonce) is accepted once.
CREATE TABLE seen_nonces (
    signer     TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    domain     TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (signer, nonce)
);

-- Settlement operations, append-only, replayed into the in-memory ledger at start.
CREATE TABLE ledger_ops (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    op_key  TEXT NOT NULL UNIQUE,
    op      TEXT NOT NULL,
    applied TEXT NOT NULL,
    at      INTEGER NOT NULL
);

-- Blobs held in the coordinator's store (bytes live on disk, named by CID).
CREATE TABLE blobs (
    cid        TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
