//! `GangStart`: start a reserved gang member. Taking the reservation out of
//! the gang table decides it; a start that finds it gone (expired,
//! released) is refused, and a retried start of a started member is
//! accepted again.

use kiln_net::Peer;
use kiln_protocol::{GangStart, NetResponse, Signed};

use super::common::{HandlerError, from_coordinator, job_table};
use crate::gang::{Go, MemberEvent};
use crate::state::State;

pub(crate) fn handle(
    state: &State,
    peer: Peer,
    signed: &Signed<GangStart>,
) -> Result<NetResponse, HandlerError> {
    let st = from_coordinator(state, peer, signed, |g| g.provider, "gang start")?;
    let short = st.offer_id.short();
    let mut jobs = job_table(state)?;
    if jobs
        .gang
        .held_job(&st.offer_id)
        .is_some_and(|j| j != st.job_id)
    {
        return Err(format!(
            "gang start for job {} rejected: offer {short} reserved another job",
            st.job_id.short()
        )
        .into());
    }
    if let Some(h) = jobs.gang.take(&st.offer_id, MemberEvent::Started) {
        if h.go.send(Go::Start).is_err() {
            return Err(
                format!("gang start {short}: the reservation was dropped; not started").into(),
            );
        }
        return Ok(NetResponse::Accepted);
    }
    match jobs.gang.last(&st.offer_id) {
        Some(MemberEvent::Started) => Ok(NetResponse::Accepted), // a retried start
        Some(e) => Err(format!(
            "gang start {short} refused: the reservation was already {e}; not started"
        )
        .into()),
        None => Err(format!(
            "gang start {short} refused: no reservation for this offer on this node"
        )
        .into()),
    }
}
