//! Kiln's integration tests: one binary, real components (Docker engine,
//! libp2p on loopback, SQLite or PostgreSQL, HTTP). See `kiln_tests` for the
//! harness; `it_postgres` builds these same files again on PostgreSQL.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod abuse;
mod api;
mod audit;
mod billing;
mod data;
mod e2e;
mod gang;
mod images;
mod ledger;
mod load;
mod metrics;
mod sandbox;
mod tamper;
mod verification;
