//! After a restart.
//!
//! A job of one whose offer was not confirmed gets the *same* offer again
//! (a node accepts an offer id once, so this never runs a job twice); its
//! node answers, or the usual requeue path applies. A gang still reserving
//! is released and requeued (its nodes release by themselves anyway once
//! their hold runs out). Started members need nothing: deadlines and
//! leases apply to them as before the restart.

use super::{place, settle, wind_down};
use crate::AppState;
use crate::db::DbError;
use crate::jobs::{JobState, Member, MemberState};

pub async fn recover(state: &AppState) -> Result<(), DbError> {
    for job in state.db.jobs_in(&[JobState::Dispatched], 100_000).await? {
        let members = state.db.attempt_members(&job.id, job.attempts).await?;
        if job.size() == 1 {
            let offered: Vec<Member> = members
                .into_iter()
                .filter(|m| m.state == MemberState::Offered)
                .collect();
            if !offered.is_empty() {
                tracing::info!(job = %job.id.short(), "re-sending an unconfirmed offer after restart");
                state.tasks.spawn(place::run(state.clone(), job, offered));
            }
            continue;
        }
        let reason = "the coordinator restarted while the gang reserved; released";
        let (open, started): (Vec<Member>, Vec<Member>) = members
            .into_iter()
            .filter(|m| m.state.pending())
            .partition(|m| matches!(m.state, MemberState::Offered | MemberState::Reserved));
        wind_down(state, true, &open, &started, reason).await?;
        settle::requeue_or_fail(state, &job.id, job.attempts, reason).await?;
    }
    Ok(())
}
