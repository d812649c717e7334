-- Who may read which blob through the REST API: the buyer who uploaded it,
-- and the owner of the job whose outputs and logs it is. A blob held for
-- one buyer is never readable by another just because they know its CID.
CREATE TABLE blob_owners (
    buyer      TEXT NOT NULL,
    cid        TEXT NOT NULL,
    size       INTEGER NOT NULL,
    -- What it is, for listings: a file name given at upload, or
    -- "job <id>: <path>" for outputs.
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (buyer, cid)
);
CREATE INDEX blob_owners_cid ON blob_owners (cid);
