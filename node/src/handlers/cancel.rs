//! `Cancel`: the coordinator stops one attempt of a job (the buyer
//! cancelled, or a gang member failed). Only the attempt the message names
//! by job *and* offer id is stopped; another attempt of the same job here
//! is untouched.

use kiln_net::Peer;
use kiln_protocol::{CancelJob, NetResponse, Signed, UnixMillis};

use super::common::{HandlerError, job_table};
use crate::state::State;

pub(crate) fn handle(
    state: &State,
    peer: Peer,
    signed: &Signed<CancelJob>,
) -> Result<NetResponse, HandlerError> {
    let c = signed
        .verify(UnixMillis::now())
        .map_err(|e| format!("cancel from {peer} rejected: {e}"))?;
    if signed.signer != state.coordinator_key
        || peer != state.coordinator
        || c.provider != state.provider
    {
        return Err(format!(
            "cancel for job {} rejected: not from this node's coordinator or not for this node",
            c.job_id.short()
        )
        .into());
    }
    let jobs = job_table(state)?;
    let Some(attempt) = jobs.attempt(&c.job_id, &c.offer_id) else {
        return Err(format!("cancel for job {}: not running here", c.job_id.short()).into());
    };
    tracing::info!(job = %c.job_id.short(), offer = %c.offer_id.short(), reason = %c.reason, "cancelling job");
    attempt.cancel.cancel();
    Ok(NetResponse::Accepted)
}
