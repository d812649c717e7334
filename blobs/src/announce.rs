//! Which peers hold which blobs.
//!
//! Holders gossip an [`Announcement`] on `kiln/blobs/have/1` (gossipsub with
//! signed messages: the publisher's peer id is authenticated by the gossip
//! layer). Anyone can keep a [`Providers`] index from them and turn it into
//! fetch [`Source`]s; before trusting a claim, a fetcher can also ask a peer
//! directly ([`crate::wire::has`]) — and the data itself is always verified.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_net::{Client, NetError, Peer as PeerId};
use kiln_protocol::{ContentId, encoding};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::fetch::Source;
use crate::store::Store;

/// Most entries in one gossip message (the gossip limit is 256 KiB).
pub const MAX_ENTRIES: usize = 4000;

/// "I hold these complete blobs" (and "no longer these").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// (cid, size) of complete blobs held.
    pub have: Vec<(ContentId, u64)>,
    /// Blobs no longer held (evicted or removed).
    pub dropped: Vec<ContentId>,
}

/// Gossips what `store` holds (several messages for large stores).
pub async fn announce_store(client: &Client, store: &Store) -> Result<(), NetError> {
    let all: Vec<(ContentId, u64)> = store.list().into_iter().map(|b| (b.cid, b.size)).collect();
    for part in all.chunks(MAX_ENTRIES) {
        announce(
            client,
            &Announcement {
                have: part.to_vec(),
                dropped: Vec::new(),
            },
        )
        .await?;
    }
    Ok(())
}

/// Gossips one announcement.
pub async fn announce(client: &Client, a: &Announcement) -> Result<(), NetError> {
    let bytes = encoding::encode(a).map_err(|e| NetError::Encode(e.to_string()))?;
    client.publish_blob_announcement(bytes).await
}

/// An index of who announced what. Entries expire after `ttl` unless
/// re-announced.
#[derive(Debug)]
pub struct Providers {
    ttl: Duration,
    by_cid: HashMap<ContentId, BTreeMap<PeerId, (u64, Instant)>>,
}

impl Providers {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            by_cid: HashMap::new(),
        }
    }

    /// Records an announcement from `peer` (the authenticated publisher).
    pub fn record(&mut self, peer: PeerId, a: &Announcement) {
        let now = Instant::now();
        for (cid, size) in &a.have {
            self.by_cid
                .entry(*cid)
                .or_default()
                .insert(peer, (*size, now));
        }
        for cid in &a.dropped {
            if let Some(m) = self.by_cid.get_mut(cid) {
                m.remove(&peer);
            }
        }
    }

    /// Forgets a peer (e.g. it was caught serving bad data).
    pub fn forget_peer(&mut self, peer: &PeerId) {
        for m in self.by_cid.values_mut() {
            m.remove(peer);
        }
    }

    /// Peers that recently announced `cid`, with their claimed size.
    pub fn providers(&self, cid: &ContentId) -> Vec<(PeerId, u64)> {
        let now = Instant::now();
        self.by_cid
            .get(cid)
            .map(|m| {
                m.iter()
                    .filter(|(_, (_, at))| now.duration_since(*at) < self.ttl)
                    .map(|(p, (s, _))| (*p, *s))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Fetch sources for `cid` (addresses left to the swarm).
    pub fn sources(&self, cid: &ContentId) -> Vec<Source> {
        self.providers(cid)
            .into_iter()
            .map(|(p, _)| Source::from(p))
            .collect()
    }
}

/// Feeds gossiped announcements into `providers` until `cancel` fires.
pub async fn track(client: Client, providers: Arc<Mutex<Providers>>, cancel: CancellationToken) {
    let mut rx = client.blob_announcements();
    loop {
        let msg = tokio::select! {
            () = cancel.cancelled() => return,
            m = rx.recv() => m,
        };
        match msg {
            Ok((peer, bytes)) => match encoding::decode::<Announcement>(&bytes) {
                Ok(a) => providers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(peer, &a),
                Err(e) => tracing::debug!(%peer, "ignoring malformed blob announcement: {e}"),
            },
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(n, "missed blob announcements");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
