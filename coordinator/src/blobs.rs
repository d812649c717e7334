//! The coordinator's side of the data plane.
//!
//! Bytes live in a [`kiln_blobs::Store`] under `<state_dir>/blobs` (atomic,
//! verified on import, bao outboards beside each blob). This module decides
//! who may read them and where inputs can be fetched from:
//!
//! * over `/kiln/blobs/1`, a **provider** may fetch the inputs of a job
//!   assigned to it (and the files of an input directory manifest); a
//!   **buyer** peer may fetch what the REST API would let it read. Nobody
//!   else gets anything, not even whether a CID is held.
//! * over REST, a buyer reads a blob only if `blob_owners` says so: it
//!   uploaded it, or it is an output, log or manifest of one of its jobs.
//! * [`offer_sources`] tells a provider which peers announced (or advertise
//!   as cached) a job's inputs, so it fetches from several at once.
//! * [`fetch_from_provider`] pulls a result's outputs from the provider that
//!   ran the job, verified group by group, before the result is accepted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_blobs::announce::Providers;
use kiln_blobs::wire::{Authorize, ServeConfig};
use kiln_net::Peer;
use kiln_protocol::{
    BuyerId, ContentId, InputSources, JobOffer, PeerSource, ProviderId, PublicKey,
};
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// How long a positive access decision is remembered (a 1 GiB input is a
/// thousand 1 MiB requests; the database is asked once).
const GRANT_TTL: Duration = Duration::from_secs(30);
/// Peers besides the coordinator named per input in an offer.
const MAX_SOURCES_PER_INPUT: usize = 4;

/// What the data plane keeps in memory.
pub struct DataPlane {
    /// Who announced which blobs (gossip on `kiln/blobs/have/1`).
    pub holders: Arc<Mutex<Providers>>,
    grants: Mutex<HashMap<(Peer, ContentId), Instant>>,
}

impl DataPlane {
    pub fn new() -> Self {
        Self {
            holders: Arc::new(Mutex::new(Providers::new(Duration::from_secs(600)))),
            grants: Mutex::new(HashMap::new()),
        }
    }
}

impl Default for DataPlane {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves the store over `/kiln/blobs/1` and tracks announcements until
/// `cancel` fires.
pub async fn serve(state: AppState, cancel: CancellationToken) {
    let s = state.clone();
    let authorize: Authorize = Arc::new(move |peer, cids| {
        let s = s.clone();
        Box::pin(async move { may_fetch(&s, peer, cids).await })
    });
    let track = tokio::spawn(kiln_blobs::announce::track(
        state.net.clone(),
        state.data.holders.clone(),
        cancel.clone(),
    ));
    let config = ServeConfig {
        validate: true,
        authorize: Some(authorize),
    };
    if let Err(e) =
        kiln_blobs::wire::serve_with(state.blobs.clone(), state.net.clone(), cancel, config).await
    {
        tracing::error!("cannot serve blobs: {e}");
    }
    let _ = track.await;
}

/// Whether provider `peer` may fetch `cid` because a job it runs uses it:
/// the answer to a node's `MayFetch`. Never about buyers, so a provider
/// cannot use it to learn what a buyer owns; not cached here (the asking
/// node caches it).
pub(crate) async fn provider_may_fetch(state: &AppState, peer: Peer, cid: ContentId) -> bool {
    match decide(state, peer, &[cid], true).await {
        Ok(g) => g.contains(&cid),
        Err(e) => {
            tracing::warn!(%peer, %cid, "blob access check failed: {e}");
            false
        }
    }
}

/// Which of `cids` `peer` may fetch over the blob protocol.
async fn may_fetch(state: &AppState, peer: Peer, cids: Vec<ContentId>) -> HashSet<ContentId> {
    let mut allowed = HashSet::new();
    let mut undecided = Vec::new();
    if let Ok(g) = state.data.grants.lock() {
        for c in cids {
            if g.get(&(peer, c)).is_some_and(|at| at.elapsed() < GRANT_TTL) {
                allowed.insert(c);
            } else {
                undecided.push(c);
            }
        }
    }
    if undecided.is_empty() {
        return allowed;
    }
    let granted = match decide(state, peer, &undecided, false).await {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(%peer, "blob access check failed: {e}");
            HashSet::new()
        }
    };
    allowed.extend(undecided.iter().filter(|c| granted.contains(c)));
    if !granted.is_empty()
        && let Ok(mut g) = state.data.grants.lock()
    {
        if g.len() > 100_000 {
            g.retain(|_, at| at.elapsed() < GRANT_TTL);
        }
        let now = Instant::now();
        for c in granted {
            g.insert((peer, c), now);
        }
    }
    allowed
}

/// What `peer` may fetch among `cids`, and for a provider everything the
/// jobs that entitle it may read (their inputs and every file of their
/// input directories), so that fetching a directory of N files decides
/// once, not N times (each of which would read and decode the manifest).
/// A few queries however many CIDs are asked about: the buyer's grants in
/// batches, the provider's jobs once.
async fn decide(
    state: &AppState,
    peer: Peer,
    cids: &[ContentId],
    providers_only: bool,
) -> Result<HashSet<ContentId>, crate::db::DbError> {
    let mut granted = HashSet::new();
    // A buyer peer (its libp2p key is its buyer key): what the API allows.
    if !providers_only && let Some(key) = PublicKey::from_peer_id(&peer) {
        let buyer = BuyerId::new(key);
        granted = state.db.readable_of(&buyer, cids).await?;
        if granted.len() == cids.len() {
            return Ok(granted);
        }
    }
    // A provider: inputs of the jobs assigned to it, and the files of
    // input directories.
    let provider = ProviderId::from_peer_id(peer);
    let jobs = state.db.jobs_held_by(&provider).await?;
    let mut entitled = HashSet::new();
    for j in &jobs {
        // Stored inputs and the Kiln image (URL inputs come from their URL
        // only: naming a CID with a URL proves nothing about being allowed
        // to read the stored copy).
        let inputs = j.spec.stored_cids();
        for node in inputs
            .iter()
            .filter(|c| c.codec() == kiln_protocol::content::DAG_CBOR_CODEC)
        {
            let store = state.blobs.clone();
            let node = *node;
            // Disk read and decode off the async threads: a directory's
            // files, an image's config and layers.
            let children = tokio::task::spawn_blocking(move || {
                store
                    .get(&node)
                    .ok()
                    .flatten()
                    .and_then(|b| kiln_protocol::DagNode::decode(&b).ok())
                    .map(|n| n.children())
                    .unwrap_or_default()
            })
            .await
            .unwrap_or_default();
            entitled.extend(children);
        }
        entitled.extend(inputs);
    }
    if cids.iter().any(|c| entitled.contains(c)) {
        granted.extend(entitled);
    }
    Ok(granted)
}

/// Peers that hold the offer's inputs (announced, or cached per their
/// advert), with their addresses, excluding the provider itself.
pub async fn offer_sources(state: &AppState, offer: &JobOffer) -> Vec<InputSources> {
    // Inputs and the Kiln image: a directory's or image's peers serve its
    // files and layers too.
    let stored = offer.spec.stored_cids();
    if stored.is_empty() {
        return Vec::new();
    }
    let since = crate::live::lease_start(state);
    let live = match state.db.providers_seen_since(since).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("cannot list providers for input sources: {e}");
            return Vec::new();
        }
    };
    let announced: HashMap<ContentId, HashSet<Peer>> = state
        .data
        .holders
        .lock()
        .map(|h| {
            stored
                .iter()
                .map(|c| (*c, h.providers(c).into_iter().map(|(p, _)| p).collect()))
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for cid in stored {
        let peers: Vec<PeerSource> = live
            .iter()
            .map(|p| &p.advert.payload)
            .filter(|a| a.provider != offer.provider)
            .filter(|a| {
                a.cached.contains(&cid)
                    || announced
                        .get(&cid)
                        .is_some_and(|s| s.contains(&a.provider.peer_id()))
            })
            .take(MAX_SOURCES_PER_INPUT)
            .map(|a| PeerSource {
                peer: a.provider,
                addrs: a.listen_addrs.clone(),
            })
            .collect();
        if !peers.is_empty() {
            out.push(InputSources { cid, peers });
        }
    }
    out
}

/// Where to reach `provider` (its advertised addresses), for fetching a
/// result's blobs from it.
pub async fn provider_source(
    state: &AppState,
    provider: &ProviderId,
) -> Result<kiln_blobs::Source, String> {
    let addrs = state
        .db
        .provider_addrs(provider)
        .await
        .map_err(|e| e.to_string())?;
    Ok(kiln_blobs::Source {
        peer: provider.peer_id(),
        addrs,
    })
}

/// Fetches `cid` from `source` (the provider that produced it), verified
/// as it arrives, unless the store already has it.
pub async fn fetch_from_provider(
    state: &AppState,
    source: &kiln_blobs::Source,
    cid: ContentId,
    size: Option<u64>,
) -> Result<(), String> {
    if state.blobs.has(&cid) {
        return Ok(());
    }
    let opts = kiln_blobs::FetchOptions::default();
    kiln_blobs::fetch(&state.blobs, &state.net, cid, size, vec![source.clone()], &opts)
        .await
        .map(|r| {
            if r.data_bytes > 0 {
                tracing::info!(%cid, bytes = r.data_bytes, ms = r.elapsed.as_millis() as u64, provider = %source.peer, "output fetched and verified");
            }
        })
        .map_err(|e| e.to_string())
}
