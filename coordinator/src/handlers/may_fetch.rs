//! `MayFetch`: a provider asks whether `asker` may have `cid` from its
//! cache. Answered only to registered providers (what a provider may fetch
//! is nobody else's business), and yes only when the asker holds a job
//! that uses it (see [`crate::blobs::provider_may_fetch`]).

use kiln_protocol::{ContentId, ProviderId};

use super::{Handled, refuse};
use crate::AppState;

pub async fn handle(
    state: &AppState,
    from: ProviderId,
    asker: ProviderId,
    cid: ContentId,
) -> Handled {
    if !state.db.provider_known(&from).await? {
        return Err(refuse("only registered providers may ask who may fetch"));
    }
    if crate::blobs::provider_may_fetch(state, asker.peer_id(), cid).await {
        Ok(())
    } else {
        Err(refuse(format!("{} may not fetch {cid}", asker.short())))
    }
}
