//! `GangOffer`: reserve one member of a gang job. Same checks and admission
//! as an ordinary offer, but nothing starts: a task holds the reservation
//! until its fate arrives through the gang table (a start, a release) or
//! it lapses on its own (the hold ran out, or the attempt was cancelled or
//! drained). A coordinator that dies mid-dispatch thus strands nothing.

use std::sync::Arc;
use std::time::Duration;

use kiln_net::Peer;
use kiln_protocol::{GangOffer, NetResponse, Signed};

use super::common::{HandlerError, from_coordinator, job_table};
use crate::admission::{admit, unadmit};
use crate::execution::launch;
use crate::gang::{Go, MAX_HOLD, MemberEvent};
use crate::state::State;

pub(crate) fn handle(
    state: &Arc<State>,
    peer: Peer,
    signed: &Signed<GangOffer>,
) -> Result<NetResponse, HandlerError> {
    let g = from_coordinator(state, peer, signed, |g| g.offer.provider, "gang offer")?.clone();
    let short = g.offer.offer_id.short();
    g.check_shape()
        .map_err(|e| format!("gang offer {short} rejected: {e}"))?;
    g.offer
        .spec
        .validate()
        .map_err(|e| format!("gang offer {short} rejected: invalid spec: {e}"))?;
    let (job, offer_id) = (g.offer.job_id, g.offer.offer_id);
    let (mut rx, admitted) = {
        let mut jobs = job_table(state)?;
        if jobs.accepted.contains(&offer_id) {
            // A retried gang offer: the same answer as the first time.
            return match jobs.gang.last(&offer_id) {
                Some(MemberEvent::Reserved { .. } | MemberEvent::Started) => {
                    Ok(NetResponse::Accepted)
                }
                Some(e) => Err(format!(
                    "gang offer {short} was already reserved and then {e}; not taken again"
                )
                .into()),
                None => Err(format!(
                    "gang offer {short} reuses the id of an ordinary offer; refused"
                )
                .into()),
            };
        }
        let admitted = admit(state, &mut jobs, &g.offer)?;
        let rx = jobs.gang.reserve(job, offer_id, g.rank, g.size);
        (rx, admitted)
    };
    let hold = Duration::from_millis(g.hold_ms).min(MAX_HOLD);
    tracing::info!(job = %job.short(), offer = %short, rank = g.rank, size = g.size, hold_ms = hold.as_millis() as u64, "reserved a gang member; waiting for the start");
    let s = state.clone();
    let token = admitted.cancel.clone();
    state.tasks.spawn(async move {
        // The hold ran out or the attempt was cancelled/drained: release it,
        // unless a start or release already took the reservation (then its
        // decision is on the way through `rx`).
        let lapse = |why: Option<String>| {
            let ev = why.map_or(MemberEvent::Expired, MemberEvent::Released);
            s.jobs
                .lock()
                .ok()
                .and_then(|mut j| j.gang.take(&offer_id, ev))
                .is_some()
        };
        let go = tokio::select! {
            r = &mut rx => r.ok(),
            () = token.cancelled() => {
                if lapse(Some("cancelled on this node".into())) { Some(Go::Release) } else { (&mut rx).await.ok() }
            }
            () = tokio::time::sleep(hold) => {
                if lapse(None) { Some(Go::Release) } else { (&mut rx).await.ok() }
            }
        };
        match go {
            Some(Go::Start) => {
                let mut offer = g.offer.clone();
                for (k, v) in g.env() {
                    offer.spec.env.insert(k, v);
                }
                tracing::info!(job = %job.short(), offer = %offer_id.short(), rank = g.rank, "gang member starting");
                launch(&s, offer, admitted);
            }
            Some(Go::Release) | None => {
                tracing::info!(job = %job.short(), offer = %offer_id.short(), "gang reservation released");
                if let Ok(mut j) = s.jobs.lock() {
                    unadmit(&mut j, &offer_id);
                }
            }
        }
    });
    Ok(NetResponse::Accepted)
}
