-- Which accounts each ledger entry moves, written in the entry's own
-- transaction, so an account's statement reads its own entries (paged)
-- instead of decoding the whole chain. A database from before this table
-- is indexed once at start-up, from the chain it verifies anyway.
CREATE TABLE ledger_accounts (
    account TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (account, seq)
) WITHOUT ROWID;
