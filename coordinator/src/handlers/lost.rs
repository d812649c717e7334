//! `Lost`: a node reports a member it accepted as lost (its daemon was
//! killed and the container reaped, its owner came back, it is draining,
//! it could not deliver). The member is released and the job requeued or
//! decided (see [`crate::lifecycle::lost`]). Reports about a member
//! already settled change nothing.

use kiln_protocol::{JobLost, ProviderId, Signed};

use super::{Handled, member_statement};
use crate::AppState;
use crate::lifecycle::lost::{Loss, member_lost};

pub async fn handle(state: &AppState, peer: ProviderId, signed: &Signed<JobLost>) -> Handled {
    let (job, m) = member_statement(state, peer, signed, "lost-job report", |l| {
        (l.job_id, l.offer_id)
    })
    .await?;
    if m.state.pending() {
        member_lost(state, &job, &m, &signed.payload.reason, Loss::Lost).await?;
    }
    Ok(())
}
