//! Jobs and their member executions: the one model every job follows.
//!
//! * [`model`]: job and member states, the transition tables, and the pure
//!   decisions over a job's members (start all or release all, what their
//!   results add up to). Table-tested.
//! * [`billing`]: what a member is paid: observed time, capped. Pure.
//! * [`keys`]: typed idempotency keys for every ledger operation.
//! * [`store`]: all SQL for jobs and members; every change is a
//!   compare-and-set on the state (and attempt, and offer id) it expects.
//! * [`verifications`]: SQL for audit records and providers' verified
//!   track records.
//!
//! The I/O that drives these (dispatch, results, usage, loss, cancel,
//! deadlines, recovery) is in [`crate::lifecycle`] and [`crate::handlers`].

pub mod billing;
pub mod keys;
pub mod model;
pub mod store;
pub mod verifications;

pub use model::{JobState, MemberState, Role};
pub use store::{Change, Expect, JobEvent, JobRecord, Member};
