-- Verification by spot re-execution (see `verification` and
-- `lifecycle::reexec`).
--
-- A member's role: `run` executes the job for the buyer; `verify`
-- re-executes a sampled result on another provider (a second one breaks a
-- tie). Verifiers are members of the job's current attempt, ranked after
-- its runners.
ALTER TABLE members ADD COLUMN role TEXT NOT NULL DEFAULT 'run';

-- One audit record per job whose result was accepted: the decision (every
-- input of the draw, the probabilities, the draw) as JSON, the secret epoch
-- it was drawn under, where the verification stands, and the signed record
-- the buyer reads.
--   status: not_sampled | pending | verified | disputed |
--           failed_verification | nondeterministic | unverified
CREATE TABLE verifications (
    job_id        TEXT PRIMARY KEY,
    attempt       INTEGER NOT NULL,
    offer_id      TEXT NOT NULL,
    provider      TEXT NOT NULL,
    epoch         INTEGER NOT NULL,
    decision_json TEXT NOT NULL,
    audited       INTEGER NOT NULL,
    status        TEXT NOT NULL,
    detail        TEXT NOT NULL,
    record_json   TEXT NOT NULL,
    signature     TEXT NOT NULL,
    opened_at     INTEGER NOT NULL,
    closes_at     INTEGER NOT NULL,
    decided_at    INTEGER
);
CREATE INDEX verifications_by_status ON verifications (status, closes_at);

-- Each provider's verified track record: consecutive results that passed
-- an audit since its last failure (BOINC's CV; `verification::trust`).
CREATE TABLE trust (
    provider             TEXT PRIMARY KEY,
    consecutive_verified INTEGER NOT NULL DEFAULT 0
);
