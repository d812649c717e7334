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
use std::time::Duration;

use kiln_protocol::{JobId, ProviderId, UnixMillis};

use super::lost::{self, Loss};
use crate::AppState;
use crate::db::DbError;
use crate::jobs::JobRecord;

/// How long outputs may take to arrive after their receipt did.
pub const OUTPUT_PATIENCE: Duration = Duration::from_secs(3600);

pub async fn expire(state: &AppState) -> Result<(), DbError> {
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
        if let Some(arrived) = m.result_at
            && now.0.saturating_sub(arrived.0) > OUTPUT_PATIENCE.as_millis() as u64
        {
            let why = format!(
                "its outputs did not arrive within {} minutes of its receipt",
                OUTPUT_PATIENCE.as_secs() / 60
            );
            lost::member_lost(state, job, &m, &why, Loss::Lost).await?;
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
