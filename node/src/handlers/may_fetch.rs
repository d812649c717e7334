//! Serving `/kiln/blobs/1`: whether a peer may fetch a blob from this node.
//!
//! The coordinator may have anything (it collects outputs and logs).
//! Another peer only a cached job input, and only if the coordinator says a
//! job entitles it (`MayFetch`): blobs are not capabilities, and only the
//! coordinator knows who runs what. Answers are remembered: yes for
//! [`FETCH_GRANT_TTL`], no for [`FETCH_REFUSAL_TTL`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_net::Peer;
use kiln_protocol::{ContentId, NetRequest, NetResponse, ProviderId};

use crate::state::State;

/// How long the coordinator's permission for a peer to fetch a cached input
/// is remembered (no longer than the coordinator's own grant cache).
const FETCH_GRANT_TTL: Duration = Duration::from_secs(30);
/// How long a refusal is remembered.
const FETCH_REFUSAL_TTL: Duration = Duration::from_secs(5);

/// The blob server's authorization hook, bound to this node.
pub(crate) fn authorize(state: &Arc<State>) -> kiln_blobs::wire::Authorize {
    let s = state.clone();
    Arc::new(move |peer, cids| {
        let s = s.clone();
        Box::pin(async move {
            let mut allowed = std::collections::HashSet::new();
            // Only cached inputs ever reach the coordinator's check, and its
            // answers are remembered, so a long list costs one question per
            // cached CID at most.
            for cid in cids {
                if may_serve(&s, peer, cid).await {
                    allowed.insert(cid);
                }
            }
            allowed
        })
    })
}

/// Whether `peer` may fetch `cid` from this node.
async fn may_serve(state: &State, peer: Peer, cid: ContentId) -> bool {
    if peer == state.coordinator {
        return true;
    }
    if !state.shared.contains(&cid) {
        return false;
    }
    let key = (peer, cid);
    let remembered = state.fetch_grants.lock().ok().and_then(|g| {
        g.get(&key).and_then(|(at, ok)| {
            let ttl = if *ok {
                FETCH_GRANT_TTL
            } else {
                FETCH_REFUSAL_TTL
            };
            (at.elapsed() < ttl).then_some(*ok)
        })
    });
    if let Some(ok) = remembered {
        return ok;
    }
    let ask = NetRequest::MayFetch {
        peer: ProviderId::from_peer_id(peer),
        cid,
    };
    let ok = match state.ask_coordinator(ask).await {
        Ok(NetResponse::Accepted) => true,
        Ok(NetResponse::Rejected { reason }) => {
            tracing::debug!(%peer, %cid, "not serving a cached input: {reason}");
            false
        }
        Ok(other) => {
            tracing::warn!("unexpected answer to a fetch check: {other:?}");
            false
        }
        Err(e) => {
            tracing::warn!(%peer, %cid, "cannot ask the coordinator whether to serve a cached input: {e}");
            false
        }
    };
    // Refusals are remembered too (briefly), so a peer repeating a request
    // cannot turn one node into a stream of questions to the coordinator.
    if let Ok(mut g) = state.fetch_grants.lock() {
        if g.len() > 10_000 {
            g.retain(|_, (at, _)| at.elapsed() < FETCH_GRANT_TTL);
        }
        g.insert(key, (Instant::now(), ok));
    }
    ok
}
