//! What the node tells its coordinator unasked: its signed advert every
//! heartbeat (the liveness signal, with zero slots while draining or while
//! the owner is busy), its stake bond once registered, a running job's
//! usage every interval (the coordinator pays as it goes), and jobs lost
//! (reaped at start-up, stopped by a drain or the owner, results that could
//! not be delivered), retried every heartbeat until the coordinator
//! answers.

use std::sync::Arc;

use kiln_protocol::{
    CapabilityAdvert, JobLost, JobOffer, NetRequest, NetResponse, Signed, UnixMillis,
};
use tokio_util::sync::CancellationToken;

use crate::state::State;

/// Most cached CIDs named in one advert.
const MAX_ADVERTISED_CACHE: usize = 1024;

/// The advert as of now, signed.
pub(crate) fn signed_advert(state: &State) -> Option<Signed<CapabilityAdvert>> {
    let mut advert = state.advert_base.clone();
    advert.issued_at = UnixMillis::now();
    if state
        .jobs
        .lock()
        .map(|j| j.draining || j.owner_busy.is_some())
        .unwrap_or(true)
    {
        advert.slots = 0; // shutting down, or the owner is busy: take no new work
    }
    // Images loaded in the engine first (the cheapest to start), then the
    // blobs held (inputs, image layers).
    let mut cached = state.images.held_kiln_images();
    cached.extend(state.shared.held(&state.store, MAX_ADVERTISED_CACHE));
    cached.sort_unstable();
    cached.dedup();
    cached.truncate(MAX_ADVERTISED_CACHE);
    advert.cached = cached;
    let ttl = (state.config.heartbeat.as_secs() * 3).max(15);
    Signed::sign(&state.key, advert, ttl).ok()
}

/// Registers with the coordinator now and every heartbeat interval, until
/// `cancel` fires.
pub(crate) async fn heartbeat(state: Arc<State>, cancel: CancellationToken) {
    let mut registered = false;
    loop {
        if let Some(advert) = signed_advert(&state) {
            let _ = state.client.publish_advert(&advert).await;
            match state.ask_coordinator(NetRequest::Register(advert)).await {
                Ok(NetResponse::Accepted) => {
                    if !registered {
                        tracing::info!(coordinator = %state.coordinator, "registered with the coordinator");
                        set_stake(&state).await;
                    }
                    registered = true;
                    report_lost(&state).await;
                }
                Ok(other) => {
                    registered = false;
                    tracing::warn!("the coordinator refused our advert: {other:?}");
                }
                Err(e) => {
                    registered = false;
                    tracing::warn!("cannot register with the coordinator: {e}");
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(state.config.heartbeat) => {}
        }
    }
}

/// Asks the coordinator to hold the configured stake bond.
async fn set_stake(state: &State) {
    let Some(target) = state.config.stake else {
        return;
    };
    let req = kiln_protocol::SetStake {
        provider: state.provider,
        target,
    };
    let Ok(signed) = Signed::sign(&state.key, req, 300) else {
        return;
    };
    match state.ask_coordinator(NetRequest::Stake(signed)).await {
        Ok(NetResponse::Accepted) => tracing::info!(%target, "stake bond set"),
        Ok(NetResponse::Rejected { reason }) => tracing::warn!("stake not set: {reason}"),
        Ok(_) | Err(_) => tracing::warn!("stake not set: the coordinator did not answer"),
    }
}

/// Tells the coordinator about jobs reaped at start-up, so it requeues them
/// instead of waiting for results that will never come.
async fn report_lost(state: &State) {
    report_lost_with(
        state,
        "the provider daemon restarted while the job ran; its container was reaped",
    )
    .await;
}

/// Reports every job waiting in the lost list, with `why`; those the
/// coordinator did not answer for go back on the list for the next
/// heartbeat.
pub(crate) async fn report_lost_with(state: &State, why: &str) {
    let pending = state
        .jobs
        .lock()
        .map(|mut j| std::mem::take(&mut j.lost))
        .unwrap_or_default();
    let mut failed = Vec::new();
    for o in pending {
        let lost = JobLost {
            job_id: o.job,
            offer_id: o.offer,
            provider: state.provider,
            reason: why.into(),
        };
        let Ok(signed) = Signed::sign(&state.key, lost, 3600) else {
            continue;
        };
        match state.ask_coordinator(NetRequest::Lost(signed)).await {
            Ok(NetResponse::Accepted) => {
                tracing::warn!(job = %o.job.short(), "reported a lost job to the coordinator")
            }
            Ok(NetResponse::Rejected { reason }) => {
                tracing::warn!(job = %o.job.short(), "the coordinator ignored a lost job: {reason}")
            }
            _ => failed.push(o),
        }
    }
    if let Ok(mut j) = state.jobs.lock() {
        j.lost.extend(failed);
    }
}

/// Reports usage every `usage_interval` for as long as it is polled (the
/// caller drops it when the job ends).
pub(crate) async fn report_usage(state: &State, offer: &JobOffer) -> std::convert::Infallible {
    let started = std::time::Instant::now();
    let mut interval = 0u64;
    loop {
        tokio::time::sleep(state.config.usage_interval).await;
        interval += 1;
        let report = kiln_protocol::UsageReport {
            job_id: offer.job_id,
            offer_id: offer.offer_id,
            provider: state.provider,
            interval,
            wall_ms: started.elapsed().as_millis() as u64,
        };
        let Ok(signed) = Signed::sign(&state.key, report, 3600) else {
            continue;
        };
        match state.ask_coordinator(NetRequest::Usage(signed)).await {
            Ok(NetResponse::Accepted) => {}
            Ok(NetResponse::Rejected { reason }) => {
                tracing::warn!(job = %offer.job_id.short(), "usage report refused: {reason}")
            }
            Ok(_) | Err(_) => {
                tracing::warn!(job = %offer.job_id.short(), interval, "usage report not delivered")
            }
        }
    }
}
