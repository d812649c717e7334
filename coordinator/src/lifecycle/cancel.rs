//! The buyer cancels a job.
//!
//! Queued, or dispatched with nothing started: cancelled at once and the
//! whole escrow refunded. Started: the job becomes `cancelling` (it never
//! shows `running` again), its members are told to stop, and each is paid
//! for its observed time when its receipt comes; a member that never
//! answers is released at its deadline and the job ends `cancelled`.

use super::{settle, wind_down};
use crate::AppState;
use crate::db::{Db, DbError};
use crate::jobs::{Change, Expect, JobRecord, JobState, Member, MemberState};

/// What a cancellation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Nothing had started: cancelled and refunded.
    Cancelled,
    /// Its members are being stopped; receipts settle the time used.
    Cancelling,
    /// It had already ended.
    AlreadyEnded(JobState),
}

impl CancelOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::Cancelling => "cancelling",
            Self::AlreadyEnded(s) => s.as_str(),
        }
    }
}

const BEFORE_START: &str = "cancelled by the buyer before it started";
const STOPPING: &str = "cancelled by the buyer; stopping";

/// Cancels `job` for its owner.
pub async fn cancel(state: &AppState, job: &JobRecord) -> Result<CancelOutcome, DbError> {
    let mut job = job.clone();
    // A few rounds at most: each retry means the job moved meanwhile.
    for _ in 0..5 {
        match job.state {
            s if s.is_terminal() => return Ok(CancelOutcome::AlreadyEnded(s)),
            JobState::Cancelling => return Ok(CancelOutcome::Cancelling),
            // Its result is in; only the coordinator's check of it is running.
            JobState::Verifying => return Ok(CancelOutcome::AlreadyEnded(JobState::Verifying)),
            JobState::Queued => {
                let expect = Expect::attempt(&[JobState::Queued], job.attempts);
                if settle::end_job(state, &job.id, expect, JobState::Cancelled, BEFORE_START)
                    .await?
                {
                    return Ok(CancelOutcome::Cancelled);
                }
            }
            _ => {
                let members = state.db.attempt_members(&job.id, job.attempts).await?;
                let started = members
                    .iter()
                    .any(|m| m.state.ran() || m.state == MemberState::Delivered);
                let (open, running): (Vec<Member>, Vec<Member>) = members
                    .into_iter()
                    .filter(|m| m.state.pending())
                    .partition(|m| matches!(m.state, MemberState::Offered | MemberState::Reserved));
                let gang = job.size() > 1;
                if !started && job.state == JobState::Dispatched {
                    let expect = Expect::attempt(&[JobState::Dispatched], job.attempts);
                    if settle::end_job(state, &job.id, expect, JobState::Cancelled, BEFORE_START)
                        .await?
                    {
                        wind_down(state, gang, &open, &[], BEFORE_START).await?;
                        return Ok(CancelOutcome::Cancelled);
                    }
                } else {
                    let mut tx = state.db.begin().await?;
                    let moved = Db::transition(
                        &mut tx,
                        &job.id,
                        Expect::attempt(&[JobState::Dispatched, JobState::Running], job.attempts),
                        JobState::Cancelling,
                        Change {
                            reason: Some(STOPPING),
                            ..Default::default()
                        },
                    )
                    .await?;
                    tx.commit().await?;
                    if moved {
                        wind_down(state, gang, &open, &running, "cancelled by the buyer").await?;
                        return Ok(CancelOutcome::Cancelling);
                    }
                }
            }
        }
        match state.db.job(&job.id).await? {
            Some(j) => job = j,
            None => return Ok(CancelOutcome::AlreadyEnded(JobState::Cancelled)),
        }
    }
    Ok(CancelOutcome::AlreadyEnded(job.state))
}
