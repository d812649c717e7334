//! `GangRelease`: give a reservation back, or stop the member if it already
//! started (another member failed). Idempotent: releasing what is not held
//! is accepted.

use kiln_net::Peer;
use kiln_protocol::{GangRelease, NetResponse, Signed};

use super::common::{HandlerError, from_coordinator, job_table};
use crate::gang::{Go, MemberEvent};
use crate::state::State;

pub(crate) fn handle(
    state: &State,
    peer: Peer,
    signed: &Signed<GangRelease>,
) -> Result<NetResponse, HandlerError> {
    let r = from_coordinator(state, peer, signed, |g| g.provider, "gang release")?;
    let mut jobs = job_table(state)?;
    if jobs
        .gang
        .held_job(&r.offer_id)
        .is_some_and(|j| j != r.job_id)
    {
        return Err(format!(
            "gang release for job {} rejected: offer {} reserved another job",
            r.job_id.short(),
            r.offer_id.short()
        )
        .into());
    }
    if let Some(h) = jobs
        .gang
        .take(&r.offer_id, MemberEvent::Released(r.reason.clone()))
    {
        let _ = h.go.send(Go::Release);
        return Ok(NetResponse::Accepted);
    }
    if matches!(jobs.gang.last(&r.offer_id), Some(MemberEvent::Started))
        && let Some(attempt) = jobs.attempt(&r.job_id, &r.offer_id)
    {
        tracing::info!(job = %r.job_id.short(), reason = %r.reason, "gang member released after its start; stopping it");
        attempt.cancel.cancel();
    }
    // Nothing held (already released, expired or never reserved): releasing is idempotent.
    Ok(NetResponse::Accepted)
}
