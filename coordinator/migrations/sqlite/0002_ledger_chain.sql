-- The settlement ledger as a signed hash chain: each row is one applied
-- operation, canonically encoded Signed<LedgerEntry> (kiln-contracts::chain),
-- linking to the blake3 of the previous row. Replaces ledger_ops as the
-- source of truth; ledger_ops is kept only to migrate older databases.
CREATE TABLE ledger_entries (
    seq   INTEGER PRIMARY KEY,
    entry BLOB NOT NULL,
    at    INTEGER NOT NULL
);

-- Materialized balances, written in the same transaction as each entry:
-- the "stored state" that `kiln ledger verify` compares a replay against.
CREATE TABLE balances (
    account TEXT PRIMARY KEY,
    balance INTEGER NOT NULL
);
