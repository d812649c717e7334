//! Leases and deadlines, checked at the start of every scheduling round.
//!
//! * **Leases (churn).** A member whose provider has not registered within
//!   its lease and is no longer connected is lost (see [`super::lost`]);
//!   the job goes to another provider. A missed heartbeat alone is not
//!   proof of death: a provider under load may heartbeat late. If it was
//!   only partitioned and later delivers, its result names a released
//!   member and is refused, so a job completes at most once.
//! * **Deadlines.** A started member that has delivered no verified receipt
//!   by `timeout + result_grace` after the coordinator saw it start is
//!   released and the job decided without it, whatever its node says:
//!   a provider that heartbeats, never delivers and ignores cancels cannot
//!   hold an escrow. It keeps only what its usage reports earned (each
//!   bounded by observed time and the timeout); the rest is refunded.
//! * A member whose receipt arrived but whose outputs never finish moving
//!   is given up after [`OUTPUT_PATIENCE`].

use std::collections::{HashMap, HashSet};

use kiln_protocol::{JobId, ProviderId, UnixMillis};

use super::lost::{self, Loss};
use super::settle;
use crate::AppState;
use crate::db::DbError;
use crate::jobs::JobRecord;

pub use super::lost::OUTPUT_PATIENCE;

pub async fn expire(state: &AppState) -> Result<(), DbError> {
    sweep(state).await?;
    let members = state.db.pending_members().await?;
    if members.is_empty() {
        return Ok(());
    }
    let since = crate::live::lease_start(state);
    let live: HashSet<ProviderId> = state
        .db
        .providers_seen_since(since)
        .await?
        .into_iter()
        .map(|p| p.advert.payload.provider)
        .collect();
    let now = UnixMillis::now();
    let grace_ms = u64::try_from(state.config.result_grace.as_millis()).unwrap_or(u64::MAX);
    let lease_ms = u64::try_from(state.config.provider_lease.as_millis()).unwrap_or(u64::MAX);
    let mut jobs: HashMap<JobId, Option<JobRecord>> = HashMap::new();
    for m in members {
        if let std::collections::hash_map::Entry::Vacant(e) = jobs.entry(m.job_id) {
            e.insert(state.db.job(&m.job_id).await?);
        }
        let Some(Some(job)) = jobs.get(&m.job_id) else {
            continue;
        };
        if lost::past_deadline(job, &m, grace_ms, now) {
            let why = lost::deadline_reason(job, &m, grace_ms);
            lost::member_lost(state, job, &m, &why, Loss::Deadline).await?;
            continue;
        }
        if lost::outputs_overdue(&m, now) {
            let why = format!(
                "{}: its outputs did not arrive within {} minutes of its receipt",
                crate::jobs::model::who(m.rank, job.size() as usize, &m.provider),
                OUTPUT_PATIENCE.as_secs() / 60
            );
            lost::member_lost(state, job, &m, &why, Loss::Deadline).await?;
            continue;
        }
        // A member placed moments ago on a provider that registered moments
        // ago is not lost; only judge jobs older than one lease.
        let stale = now.0.saturating_sub(job.updated_at.0) > lease_ms;
        if stale
            && !live.contains(&m.provider)
            && !state
                .net
                .is_connected(m.provider.peer_id())
                .await
                .unwrap_or(false)
        {
            let why = format!(
                "provider {} stopped answering (lease of {}s expired)",
                m.provider.short(),
                state.config.provider_lease.as_secs()
            );
            // Out of the scheduler's fleet now, not at the next round's
            // expiry: the requeued job must not go straight back to it.
            crate::live::lock(state).suspend(&m.provider);
            lost::member_lost(state, job, &m, &why, Loss::Lost).await?;
        }
    }
    Ok(())
}

/// The safety net: an active job whose current attempt has no member that
/// could still deliver (a crash between two steps, a bug) is decided now:
/// from what its members delivered, or requeued if none did and the buyer
/// is not cancelling. Jobs that changed within the last lease are left to
/// the path that is changing them.
async fn sweep(state: &AppState) -> Result<(), DbError> {
    let lease_ms = u64::try_from(state.config.provider_lease.as_millis()).unwrap_or(u64::MAX);
    let now = UnixMillis::now();
    let active = [
        crate::jobs::JobState::Dispatched,
        crate::jobs::JobState::Running,
        crate::jobs::JobState::Cancelling,
    ];
    for job in state.db.jobs_in(&active, 10_000).await? {
        if now.0.saturating_sub(job.updated_at.0) <= lease_ms {
            continue;
        }
        let members = state.db.attempt_members(&job.id, job.attempts).await?;
        if members.iter().any(|m| m.state.pending()) {
            continue;
        }
        let delivered = members
            .iter()
            .any(|m| m.state == crate::jobs::MemberState::Delivered);
        let mut tx = state.db.begin().await?;
        let mut pending = state.bank.begin().await;
        let reason = "no execution of this attempt can deliver any more";
        if delivered || job.state == crate::jobs::JobState::Cancelling {
            match settle::conclude(
                &mut tx,
                &mut pending,
                state.bank.fee_bps,
                &job.id,
                job.attempts,
            )
            .await
            {
                Ok((_, true)) => {
                    tx.commit().await?;
                    pending.commit();
                    settle::finished(state, &job.id);
                    tracing::warn!(job = %job.id.short(), "{reason}; decided from its members");
                }
                Ok((_, false)) => {}
                Err(e) => tracing::error!(job = %job.id.short(), "deciding the job failed: {e}"),
            }
            continue;
        }
        match settle::requeue_in(state, &mut tx, &mut pending, &job.id, job.attempts, reason).await
        {
            Ok(r) => {
                tx.commit().await?;
                pending.commit();
                settle::after_requeue(state, &job.id, job.attempts, r, reason);
            }
            Err(e) => tracing::error!(job = %job.id.short(), "requeueing failed: {e}"),
        }
    }
    Ok(())
}
