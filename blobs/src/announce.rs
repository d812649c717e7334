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

/// Most (blob, peer) entries an index keeps: announcements are gossip from
/// anyone, so what they may make a coordinator or node remember is bounded.
pub const MAX_REMEMBERED: usize = 1 << 20;
/// Most blobs one peer may be remembered for (a node announces what it
/// caches; 100,000 cached inputs is far beyond any real cache).
pub const MAX_PER_PEER: usize = 100_000;

/// An index of who announced what. Entries expire after `ttl` unless
/// re-announced, and are swept (not just hidden) once they have, so a
/// stream of announcements of random CIDs cannot grow it without bound;
/// past [`MAX_REMEMBERED`] in all or [`MAX_PER_PEER`] for one peer, new
/// entries are dropped until old ones expire.
#[derive(Debug)]
pub struct Providers {
    ttl: Duration,
    max_entries: usize,
    max_per_peer: usize,
    by_cid: HashMap<ContentId, BTreeMap<PeerId, (u64, Instant)>>,
    per_peer: HashMap<PeerId, usize>,
    entries: usize,
    swept: Instant,
}

impl Providers {
    pub fn new(ttl: Duration) -> Self {
        Self::with_limits(ttl, MAX_REMEMBERED, MAX_PER_PEER)
    }

    /// An index with other bounds (tests).
    pub fn with_limits(ttl: Duration, max_entries: usize, max_per_peer: usize) -> Self {
        Self {
            ttl,
            max_entries,
            max_per_peer,
            by_cid: HashMap::new(),
            per_peer: HashMap::new(),
            entries: 0,
            swept: Instant::now(),
        }
    }

    /// (blob, peer) entries held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Records an announcement from `peer` (the authenticated publisher).
    pub fn record(&mut self, peer: PeerId, a: &Announcement) {
        let now = Instant::now();
        // Sweep a few times per TTL, and whenever a bound is reached.
        if now.duration_since(self.swept) >= self.ttl / 4 || self.entries >= self.max_entries {
            self.sweep(now);
        }
        for (cid, size) in &a.have {
            let peers = self.by_cid.entry(*cid).or_default();
            if let Some(e) = peers.get_mut(&peer) {
                *e = (*size, now); // a refresh costs no room
                continue;
            }
            let mine = self.per_peer.get(&peer).copied().unwrap_or(0);
            if self.entries >= self.max_entries || mine >= self.max_per_peer {
                if peers.is_empty() {
                    self.by_cid.remove(cid);
                }
                continue;
            }
            peers.insert(peer, (*size, now));
            self.entries += 1;
            *self.per_peer.entry(peer).or_default() += 1;
        }
        for cid in &a.dropped {
            self.remove(cid, &peer);
        }
    }

    fn remove(&mut self, cid: &ContentId, peer: &PeerId) {
        let Some(m) = self.by_cid.get_mut(cid) else {
            return;
        };
        if m.remove(peer).is_some() {
            self.entries -= 1;
            if let Some(n) = self.per_peer.get_mut(peer) {
                *n -= 1;
                if *n == 0 {
                    self.per_peer.remove(peer);
                }
            }
        }
        if m.is_empty() {
            self.by_cid.remove(cid);
        }
    }

    /// Drops every expired entry and recounts.
    fn sweep(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.by_cid.retain(|_, m| {
            m.retain(|_, (_, at)| now.duration_since(*at) < ttl);
            !m.is_empty()
        });
        self.recount();
        self.swept = now;
    }

    fn recount(&mut self) {
        self.per_peer.clear();
        self.entries = 0;
        for m in self.by_cid.values() {
            for p in m.keys() {
                *self.per_peer.entry(*p).or_default() += 1;
                self.entries += 1;
            }
        }
    }

    /// Forgets a peer (e.g. it was caught serving bad data).
    pub fn forget_peer(&mut self, peer: &PeerId) {
        self.by_cid.retain(|_, m| {
            m.remove(peer);
            !m.is_empty()
        });
        self.recount();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(i: u64) -> ContentId {
        ContentId::of_bytes(&i.to_le_bytes())
    }

    fn have(range: std::ops::Range<u64>) -> Announcement {
        Announcement {
            have: range.map(|i| (cid(i), 1)).collect(),
            dropped: Vec::new(),
        }
    }

    #[test]
    fn one_peer_cannot_make_the_index_remember_without_bound() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut p = Providers::with_limits(Duration::from_secs(600), 100, 30);
        p.record(a, &have(0..1_000));
        assert_eq!(p.len(), 30, "one peer is held to its share");
        // Re-announcing what it has costs nothing and still counts.
        p.record(a, &have(0..30));
        assert_eq!(p.len(), 30);
        assert_eq!(p.providers(&cid(29)), vec![(a, 1)]);
        assert!(p.providers(&cid(30)).is_empty());
        // Another peer still gets its own share, up to the total.
        p.record(b, &have(0..30));
        assert_eq!(p.len(), 60);
        for i in 0..4 {
            p.record(PeerId::random(), &have(i * 100..i * 100 + 30));
        }
        assert_eq!(p.len(), 100, "never more than the total");
        // Dropping frees room.
        p.record(
            a,
            &Announcement {
                have: Vec::new(),
                dropped: (0..10).map(cid).collect(),
            },
        );
        assert_eq!(p.len(), 90);
        p.forget_peer(&b);
        assert_eq!(p.len(), 60);
    }

    #[test]
    fn expired_entries_are_swept_not_just_hidden() {
        let a = PeerId::random();
        let mut p = Providers::with_limits(Duration::from_millis(40), 1_000, 1_000);
        p.record(a, &have(0..500));
        assert_eq!(p.len(), 500);
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            p.providers(&cid(1)).is_empty(),
            "expired entries are hidden"
        );
        p.record(a, &have(1_000..1_001));
        assert_eq!(p.len(), 1, "and swept at the next announcement");
    }
}
