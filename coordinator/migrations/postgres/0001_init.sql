-- Kiln coordinator schema on PostgreSQL: the same tables, columns and
-- indexes as the SQLite migrations (migrations/sqlite, 0001..0013) leave,
-- in PostgreSQL's types. Ids are TEXT in their Display form, amounts and
-- times BIGINT (micro-credits, Unix milliseconds), signed messages BYTEA
-- holding the exact canonical bytes that were verified.
--
-- A new migration is added to both folders, with the same number.

CREATE TABLE providers (
    id            TEXT PRIMARY KEY,
    advert        BYTEA NOT NULL,
    advert_json   TEXT NOT NULL,
    last_seen     BIGINT NOT NULL,
    registered_at BIGINT NOT NULL
);

CREATE TABLE jobs (
    id             TEXT PRIMARY KEY,
    owner          TEXT NOT NULL,
    submission     BYTEA NOT NULL,
    spec_json      TEXT NOT NULL,
    label          TEXT,
    state          TEXT NOT NULL,
    reason         TEXT,
    provider       TEXT,
    offer_id       TEXT,
    attempts       BIGINT NOT NULL DEFAULT 0,
    price_per_hour BIGINT,
    max_cost       BIGINT NOT NULL,
    cost           BIGINT,
    exit_code      BIGINT,
    receipt        BYTEA,
    receipt_json   TEXT,
    manifest_json  TEXT,
    output_cid     TEXT,
    stdout_cid     TEXT,
    stderr_cid     TEXT,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);
CREATE INDEX jobs_by_owner ON jobs (owner, created_at);
CREATE INDEX jobs_by_state ON jobs (state, created_at);
CREATE INDEX jobs_by_provider ON jobs (provider, state);
CREATE INDEX jobs_by_owner_state ON jobs (owner, state);

CREATE TABLE job_events (
    seq    BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    at     BIGINT NOT NULL,
    state  TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX job_events_by_job ON job_events (job_id, seq);

CREATE TABLE seen_nonces (
    signer     TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    domain     TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (signer, nonce)
);

-- Only SQLite databases from before the signed chain ever held rows here;
-- kept so the one migration path reads the same table on both engines.
CREATE TABLE ledger_ops (
    seq     BIGSERIAL PRIMARY KEY,
    op_key  TEXT NOT NULL UNIQUE,
    op      TEXT NOT NULL,
    applied TEXT NOT NULL,
    at      BIGINT NOT NULL
);

CREATE TABLE blobs (
    cid        TEXT PRIMARY KEY,
    size       BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE ledger_entries (
    seq   BIGINT PRIMARY KEY,
    entry BYTEA NOT NULL,
    at    BIGINT NOT NULL
);

CREATE TABLE balances (
    account TEXT PRIMARY KEY,
    balance BIGINT NOT NULL
);

CREATE TABLE provider_audits (
    seq          BIGSERIAL PRIMARY KEY,
    provider     TEXT NOT NULL,
    at           BIGINT NOT NULL,
    challenge_id TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    detail       TEXT NOT NULL
);
CREATE INDEX provider_audits_by_provider ON provider_audits (provider, seq);

CREATE TABLE reputation (
    provider TEXT PRIMARY KEY,
    score    BIGINT NOT NULL,
    passed   BIGINT NOT NULL DEFAULT 0,
    flagged  BIGINT NOT NULL DEFAULT 0,
    failed   BIGINT NOT NULL DEFAULT 0,
    good     BIGINT NOT NULL DEFAULT 0,
    bad      BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE blob_owners (
    buyer      TEXT NOT NULL,
    cid        TEXT NOT NULL,
    size       BIGINT NOT NULL,
    name       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (buyer, cid)
);
CREATE INDEX blob_owners_cid ON blob_owners (cid);

CREATE TABLE members (
    offer_id       TEXT PRIMARY KEY,
    job_id         TEXT NOT NULL,
    attempt        BIGINT NOT NULL,
    rank           BIGINT NOT NULL,
    provider       TEXT NOT NULL,
    listen_addrs   TEXT NOT NULL,
    price_per_hour BIGINT NOT NULL,
    state          TEXT NOT NULL,
    reason         TEXT,
    outcome        TEXT,
    paid           BIGINT NOT NULL DEFAULT 0,
    cost           BIGINT,
    receipt        BYTEA,
    manifest_json  TEXT,
    updated_at     BIGINT NOT NULL,
    started_at     BIGINT,
    result_at      BIGINT,
    paid_at        BIGINT,
    role           TEXT NOT NULL DEFAULT 'run'
);
CREATE INDEX gang_members_by_job ON members (job_id, attempt, rank);
CREATE INDEX gang_members_by_state ON members (state);
CREATE INDEX members_by_provider ON members (provider, state);

CREATE TABLE verifications (
    job_id        TEXT PRIMARY KEY,
    attempt       BIGINT NOT NULL,
    offer_id      TEXT NOT NULL,
    provider      TEXT NOT NULL,
    epoch         BIGINT NOT NULL,
    decision_json TEXT NOT NULL,
    audited       BOOLEAN NOT NULL,
    status        TEXT NOT NULL,
    detail        TEXT NOT NULL,
    record_json   TEXT NOT NULL,
    signature     TEXT NOT NULL,
    opened_at     BIGINT NOT NULL,
    closes_at     BIGINT NOT NULL,
    decided_at    BIGINT
);
CREATE INDEX verifications_by_status ON verifications (status, closes_at);

CREATE TABLE trust (
    provider             TEXT PRIMARY KEY,
    consecutive_verified BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE gpu_speed (
    provider          TEXT NOT NULL,
    gpu_uuid          TEXT NOT NULL,
    gpu_name          TEXT NOT NULL,
    verified_mflops   BIGINT NOT NULL,
    observed_mflops   BIGINT NOT NULL,
    advertised_mflops BIGINT NOT NULL,
    proven_flops      BIGINT NOT NULL,
    round_trip_us     BIGINT NOT NULL,
    challenge_id      TEXT NOT NULL,
    at                BIGINT NOT NULL,
    PRIMARY KEY (provider, gpu_uuid)
);

CREATE TABLE ledger_accounts (
    account TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    PRIMARY KEY (account, seq)
);
