//! A member that will deliver nothing: its node reported it lost, its
//! provider vanished, or it missed its deadline.
//!
//! The member is released (paid nothing more: what its usage reports
//! earned stays paid). What happens to the job depends on why the attempt
//! was still open:
//! * running normally: the other members are stopped and the job is
//!   requeued (another provider gets it), or failed after `max_attempts`;
//! * already winding down (the buyer cancelled, or another member failed
//!   and this one was being stopped): the job is decided from what its
//!   members delivered;
//! * past its deadline: not requeued, the job is decided (it fails).

use kiln_protocol::UnixMillis;

use super::{settle, wind_down};
use crate::AppState;
use crate::db::{Db, DbError};
use crate::jobs::store::MemberChange;
use crate::jobs::{JobRecord, JobState, Member, MemberState};
use crate::verification::reputation::Event;

/// How long outputs may take to arrive after their receipt did.
pub const OUTPUT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether `m`'s receipt arrived more than [`OUTPUT_PATIENCE`] ago and its
/// outputs still have not.
pub fn outputs_overdue(m: &Member, now: UnixMillis) -> bool {
    m.result_at.is_some_and(|arrived| {
        now.0.saturating_sub(arrived.0)
            > u64::try_from(OUTPUT_PATIENCE.as_millis()).unwrap_or(u64::MAX)
    })
}

/// Why a member was given up on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Reported lost, or its provider vanished: worth another attempt.
    Lost,
    /// It did not deliver by its deadline: the job is decided without it.
    Deadline,
}

/// The words for member `m` of `job` in reasons.
pub fn describe(job: &JobRecord, m: &Member, why: &str) -> String {
    let when = if m.state == MemberState::Stopping {
        " while stopping"
    } else {
        ""
    };
    if job.size() > 1 {
        format!(
            "gang member rank {} (provider {}) lost{when}: {why}",
            m.rank,
            m.provider.short()
        )
    } else {
        format!("lost{when} on provider {}: {why}", m.provider.short())
    }
}

/// Gives member `m` of `job` up (see the module docs).
pub async fn member_lost(
    state: &AppState,
    job: &JobRecord,
    m: &Member,
    why: &str,
    loss: Loss,
) -> Result<(), DbError> {
    let reason = match loss {
        Loss::Lost => describe(job, m, why),
        Loss::Deadline => why.to_string(),
    };
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    // Decide on the member as it is now, under the write lock: the caller's
    // copy may be a round old (it may have delivered, or started stopping).
    let Some(m) = Db::member_in(&mut tx, &m.offer_id).await? else {
        return Ok(());
    };
    let grace_ms = u64::try_from(state.config.result_grace.as_millis()).unwrap_or(u64::MAX);
    let now = UnixMillis::now();
    if !m.state.pending()
        || (loss == Loss::Deadline
            && !past_deadline(job, &m, grace_ms, now)
            && !outputs_overdue(&m, now))
    {
        return Ok(());
    }
    let released = Db::set_member(
        &mut tx,
        &m.offer_id,
        &[m.state],
        MemberState::Released,
        MemberChange {
            reason: Some(&reason),
            ..Default::default()
        },
    )
    .await?;
    if !released {
        return Ok(());
    }
    // Bad evidence for its provider: it accepted and delivered nothing.
    let event = match loss {
        Loss::Deadline => Event::MissedDeadline,
        Loss::Lost if why.contains("preempted_by_owner") => Event::Preempted,
        Loss::Lost => Event::Lost,
    };
    if m.state.ran() {
        Db::reputation_event(&mut tx, &m.provider, event).await?;
    }
    let Some((now, attempt)) = Db::job_state_in(&mut tx, &job.id).await? else {
        return Ok(());
    };
    tracing::warn!(job = %job.id.short(), "{reason}");
    if attempt != m.attempt || !now.is_active() {
        // A member of an earlier attempt: nothing else depends on it.
        tx.commit().await?;
        return Ok(());
    }
    let winding_down =
        now == JobState::Cancelling || m.state == MemberState::Stopping || loss == Loss::Deadline;
    if winding_down {
        let (verdict, ended) =
            match settle::conclude(&mut tx, &mut pending, state.bank.fee_bps, &job.id, attempt)
                .await
            {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(job = %job.id.short(), "deciding the job failed: {e}");
                    return Ok(());
                }
            };
        tx.commit().await?;
        pending.commit();
        if ended {
            settle::finished(state, &job.id);
            tracing::info!(job = %job.id.short(), "job ended: {verdict:?}");
        }
        if loss == Loss::Deadline && !ended {
            // The others are told to stop too; each is released at its
            // own deadline if it never delivers.
            stop_others(state, job, &m, &reason).await?;
        }
        return Ok(());
    }
    // Released and requeued (or failed) in one transaction: no moment
    // where the job is active with nobody executing it.
    let reason = if job.size() > 1 {
        format!("{reason}; stopped the others")
    } else {
        reason
    };
    let requeued =
        match settle::requeue_in(state, &mut tx, &mut pending, &job.id, attempt, &reason).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(job = %job.id.short(), "requeueing failed: {e}");
                return Ok(());
            }
        };
    tx.commit().await?;
    pending.commit();
    settle::after_requeue(state, &job.id, attempt, requeued, &reason);
    stop_others(state, job, &m, &reason).await
}

/// Releases (not started) or stops (started) the other pending members of
/// `m`'s attempt.
async fn stop_others(
    state: &AppState,
    job: &JobRecord,
    m: &Member,
    reason: &str,
) -> Result<(), DbError> {
    let others: Vec<Member> = state
        .db
        .attempt_members(&job.id, m.attempt)
        .await?
        .into_iter()
        .filter(|o| o.offer_id != m.offer_id && o.state.pending())
        .collect();
    let (open, started): (Vec<Member>, Vec<Member>) = others
        .into_iter()
        .partition(|o| matches!(o.state, MemberState::Offered | MemberState::Reserved));
    wind_down(state, job.size() > 1, &open, &started, reason).await
}

/// The reason a member missed its deadline.
pub fn deadline_reason(job: &JobRecord, m: &Member, grace_ms: u64) -> String {
    format!(
        "{} delivered no result within its timeout of {}s plus {}s of grace; stopped, paid only for the usage it reported, the rest refunded",
        crate::jobs::model::who(m.rank, job.size() as usize, &m.provider),
        job.spec.resources.timeout.0,
        grace_ms / 1000
    )
}

/// Whether `m` is past its deadline at `now`.
pub fn past_deadline(job: &JobRecord, m: &Member, grace_ms: u64, now: UnixMillis) -> bool {
    let Some(started) = m.started_at else {
        return false;
    };
    if !m.state.ran() || m.result_at.is_some() {
        return false;
    }
    now > crate::jobs::billing::deadline(started, job.timeout_ms(), grace_ms)
}
