//! `TailLogs`: the coordinator asks what a running attempt has written so
//! far (a buyer follows its logs). Answered from the runner's live log of
//! that attempt; only this node's coordinator may ask, and only for an
//! attempt named by job *and* offer id.

use kiln_net::Peer;
use kiln_protocol::{NetResponse, Signed, TailLogs, UnixMillis};

use super::common::{HandlerError, job_table};
use crate::state::State;

pub(crate) fn handle(
    state: &State,
    peer: Peer,
    signed: &Signed<TailLogs>,
) -> Result<NetResponse, HandlerError> {
    let t = signed
        .verify(UnixMillis::now())
        .map_err(|e| format!("log request from {peer} rejected: {e}"))?;
    if signed.signer != state.coordinator_key
        || peer != state.coordinator
        || t.provider != state.provider
    {
        return Err(format!(
            "log request for job {} rejected: not from this node's coordinator or not for this node",
            t.job_id.short()
        )
        .into());
    }
    if job_table(state)?.attempt(&t.job_id, &t.offer_id).is_none() {
        return Err(format!("job {} is not running here", t.job_id.short()).into());
    }
    let chunk = match state.runner.live_log(&t.offer_id) {
        Some(live) => live.read(t.stdout_from, t.stderr_from),
        // Booked but its container has not started (inputs, image), or it
        // has exited and its result is on the way: nothing live to show.
        None => kiln_protocol::LogChunk::default(),
    };
    Ok(NetResponse::Logs(chunk))
}
