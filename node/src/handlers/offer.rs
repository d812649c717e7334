//! `Offer`: an ordinary (one-node) job offer. Checked, admitted and
//! launched at once; the same offer id twice is accepted once (a retried
//! dispatch gets the same answer and starts nothing new).

use std::sync::Arc;

use kiln_net::Peer;
use kiln_protocol::{JobOffer, NetResponse, Signed};

use super::common::{HandlerError, job_table};
use crate::admission::{admit, check_offer};
use crate::execution::launch;
use crate::state::State;

pub(crate) fn handle(
    state: &Arc<State>,
    peer: Peer,
    signed: &Signed<JobOffer>,
) -> Result<NetResponse, HandlerError> {
    let offer = check_offer(state, peer, signed)?;
    let admitted = {
        let mut jobs = job_table(state)?;
        if jobs.accepted.contains(&offer.offer_id) {
            return Ok(NetResponse::Accepted); // a retried dispatch of an offer we already run
        }
        admit(state, &mut jobs, &offer)?
    };
    tracing::info!(job = %offer.job_id.short(), offer = %offer.offer_id.short(), "accepted offer");
    launch(state, offer, admitted);
    Ok(NetResponse::Accepted)
}
