//! The integration suite (`it`) again, every coordinator on PostgreSQL:
//! the same tests, built from the same files (see `kiln_tests::database`).

#[path = "it/main.rs"]
mod it;
