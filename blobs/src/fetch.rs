//! Multi-source, verified, resumable download of one blob.
//!
//! 1. The size is proven first (the last chunk's bao proof from one source,
//!    see [`wire::probe_size`]) unless a partial download already holds it.
//! 2. What the partial download lacks is cut into work units (1 MiB, aligned
//!    to 16 KiB groups) in a shared queue; each source works on up to
//!    `per_peer` units at once and takes the next unit from the front when
//!    one finishes, so fast sources do more of the work.
//! 3. Every group is verified as it arrives and written only if it checks
//!    out ([`wire::decode_into`]). A source whose group (or proof) fails is
//!    dropped at once and its unfinished range goes back to the front of the
//!    queue for another source; a source whose stream breaks is retried
//!    until `max_failures` in a row.
//! 4. When every group is verified the blob is renamed into the store.
//!
//! Dropping the future (or a crash) loses nothing verified: a later fetch of
//! the same CID, in this process or after a restart, starts from the groups
//! the partial download holds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bao_tree::ChunkRanges;
use kiln_net::{Client, Peer as PeerId};
use kiln_protocol::ContentId;
use tokio::task::JoinSet;

use crate::store::{Partial, Store, StoreError};
use crate::wire::{self, BlobStream, DecodeFailure, PeerAddr, ProbeError, WireError};
use crate::{group_ranges, ranges_bytes};

/// A source: a peer id and addresses to dial it at (may be empty when the
/// peer is already connected or its address is known to the swarm).
pub type Source = PeerAddr;

/// Tuning of [`fetch`].
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Bytes per work unit (rounded to 16 KiB groups).
    pub unit_bytes: u64,
    /// Work units in flight per source.
    pub per_peer: usize,
    /// Consecutive transport failures after which a source is given up.
    pub max_failures: u32,
    /// Longest a single work unit may take before it counts as a failure.
    pub unit_timeout: Duration,
    /// Receives the number of verified bytes held after each unit.
    pub progress: Option<Arc<tokio::sync::watch::Sender<u64>>>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            unit_bytes: 1 << 20,
            per_peer: 4,
            max_failures: 3,
            unit_timeout: Duration::from_secs(60),
            progress: None,
        }
    }
}

/// What one source did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Verified blob bytes received from it.
    pub data_bytes: u64,
    /// Bytes read from its streams (encoding, proofs and headers).
    pub wire_bytes: u64,
    /// Work units it completed.
    pub units: u64,
    /// Failed work units.
    pub failures: u64,
}

/// What [`fetch`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchReport {
    pub cid: ContentId,
    pub size: u64,
    /// Verified bytes already held when the fetch started (resumed).
    pub already_had: u64,
    /// Verified blob bytes received by this fetch.
    pub data_bytes: u64,
    /// Bytes read from the network by this fetch (data, proofs, headers,
    /// the size probe, and bytes of failed units).
    pub bytes_transferred: u64,
    pub per_peer: BTreeMap<PeerId, PeerStats>,
    /// Sources dropped for sending data that failed verification.
    pub bad_peers: Vec<(PeerId, String)>,
    /// Sources given up after repeated transport failures.
    pub failed_peers: Vec<(PeerId, String)>,
    pub elapsed: Duration,
}

/// Why [`fetch`] did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no source to fetch {cid} from")]
    NoSources { cid: ContentId },
    #[error("no source could prove the size of {cid}: {}", describe(.errors))]
    SizeUnknown {
        cid: ContentId,
        errors: Vec<(PeerId, String)>,
    },
    #[error(
        "every source of {cid} failed with {have} of {size} bytes verified (kept for a resume): {}",
        describe(.errors)
    )]
    Exhausted {
        cid: ContentId,
        have: u64,
        size: u64,
        errors: Vec<(PeerId, String)>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn describe(errors: &[(PeerId, String)]) -> String {
    if errors.is_empty() {
        return "no source answered".into();
    }
    let mut s = errors
        .iter()
        .take(6)
        .map(|(p, e)| format!("{p}: {e}"))
        .collect::<Vec<_>>()
        .join("; ");
    if errors.len() > 6 {
        s.push_str(&format!("; and {} more", errors.len() - 6));
    }
    s
}

struct PeerState {
    addr: PeerAddr,
    inflight: usize,
    failures: u32,
    dropped: bool,
}

enum Outcome {
    Done,
    Bad(String),
    Failed(String),
    /// The source does not have the blob (any more).
    Gone(String),
    Local(StoreError),
}

struct UnitResult {
    peer: usize,
    ranges: ChunkRanges,
    wire_bytes: u64,
    data_bytes: u64,
    outcome: Outcome,
}

/// Downloads `cid` into `store` from `sources`, verifying every 16 KiB
/// group as it arrives. `size`, if known (e.g. from a manifest), is only a
/// hint: the size is always proven against the CID before it is used.
pub async fn fetch(
    store: &Store,
    client: &Client,
    cid: ContentId,
    size: Option<u64>,
    sources: Vec<Source>,
    opts: &FetchOptions,
) -> Result<FetchReport, FetchError> {
    let started = Instant::now();
    let mut report = FetchReport {
        cid,
        size: size.unwrap_or(0),
        already_had: 0,
        data_bytes: 0,
        bytes_transferred: 0,
        per_peer: BTreeMap::new(),
        bad_peers: Vec::new(),
        failed_peers: Vec::new(),
        elapsed: Duration::ZERO,
    };
    if let Some(s) = store.size(&cid) {
        report.size = s;
        report.already_had = s;
        return Ok(report);
    }
    if cid.digest() == *blake3::hash(&[]).as_bytes() {
        store.import_reader(&[][..], Some(0), Some(cid))?;
        report.size = 0;
        return Ok(report);
    }
    let lock = store.lock_partial(&cid).await;
    if let Some(s) = store.size(&cid) {
        report.size = s;
        report.already_had = s;
        return Ok(report);
    }
    let mut peers: Vec<PeerState> = dedup(sources)
        .into_iter()
        .map(|addr| PeerState {
            addr,
            inflight: 0,
            failures: 0,
            dropped: false,
        })
        .collect();

    let pool: Pool = Arc::default();

    // 1. A proven size.
    let size = match store.partial_size(&cid) {
        Some(s) => s,
        None => {
            if peers.is_empty() {
                return Err(FetchError::NoSources { cid });
            }
            let mut errors = Vec::new();
            let mut proven = None;
            // Two rounds: a connection that closed just as the stream was
            // opened (an idle timeout racing this fetch) is dialled again,
            // once it has had time to finish closing (an immediate retry
            // lands on the same closing connection).
            let n = peers.len();
            for (round, i) in (0..2).flat_map(|r| (0..n).map(move |i| (r, i))) {
                if round == 1 && i == 0 && proven.is_none() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let p = &mut peers[i];
                if proven.is_some() || p.dropped || (round == 1 && p.failures == 0) {
                    continue;
                }
                let mut stream = match take_stream(client, &p.addr, &pool, i).await {
                    Ok(s) => s,
                    Err(e) => {
                        p.failures += 1;
                        errors.push((p.addr.peer, e.to_string()));
                        continue;
                    }
                };
                let probed = wire::probe_size(&mut stream, cid).await;
                let wire_bytes = stream.bytes_read();
                report.bytes_transferred += wire_bytes;
                report.per_peer.entry(p.addr.peer).or_default().wire_bytes += wire_bytes;
                if probed.is_ok() {
                    put_back(&pool, i, stream);
                }
                match probed {
                    Ok(s) => {
                        if let Some(hint) = size
                            && hint != s
                        {
                            tracing::warn!(%cid, hint, proven = s, "size hint differs from the proven size");
                        }
                        proven = Some(s);
                        continue;
                    }
                    Err(ProbeError::Bad(what)) => {
                        tracing::warn!(peer = %p.addr.peer, %cid, "dropping source: {what}");
                        p.dropped = true;
                        report.bad_peers.push((p.addr.peer, what.clone()));
                        errors.push((p.addr.peer, what));
                    }
                    Err(ProbeError::Wire(e)) => {
                        if matches!(e, WireError::NotFound { .. }) {
                            p.dropped = true;
                        }
                        p.failures += 1;
                        errors.push((p.addr.peer, e.to_string()));
                    }
                }
            }
            proven.ok_or(FetchError::SizeUnknown { cid, errors })?
        }
    };
    report.size = size;

    // 2. What is missing, in units.
    // Re-validating an existing partial hashes what it holds: off the runtime.
    let (lock, partial) = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let p = store.partial(&lock, size);
            (lock, p)
        })
        .await
        .map_err(|e| join_error(&e))?
    };
    let partial = partial?;
    let missing = partial.missing();
    report.already_had = size - ranges_bytes(&missing, size);
    let unit = opts.unit_bytes.max(crate::GROUP_BYTES);
    let mut queue: VecDeque<ChunkRanges> = (0..size.div_ceil(unit))
        .map(|i| group_ranges(i * unit, (i + 1) * unit, size) & &missing)
        .filter(|r| !r.is_empty())
        .collect();
    let publish = |p: &Partial| {
        if let Some(tx) = &opts.progress {
            tx.send_replace(p.verified_bytes());
        }
    };
    publish(&partial);

    // 3. Work the queue.
    let mut tasks: JoinSet<UnitResult> = JoinSet::new();
    let mut errors: Vec<(PeerId, String)> = Vec::new();
    let per_peer = opts.per_peer.max(1);
    loop {
        // Hand out units, one per source in turn, while any source has room.
        'assign: loop {
            let mut gave = false;
            for (i, p) in peers.iter_mut().enumerate() {
                if p.dropped || p.inflight >= per_peer {
                    continue;
                }
                let Some(ranges) = queue.pop_front() else {
                    break 'assign;
                };
                p.inflight += 1;
                gave = true;
                tasks.spawn(fetch_unit(
                    client.clone(),
                    pool.clone(),
                    p.addr.clone(),
                    i,
                    cid,
                    partial.clone(),
                    ranges,
                    opts.unit_timeout,
                ));
            }
            if !gave {
                break;
            }
        }
        let Some(joined) = tasks.join_next().await else {
            break; // nothing in flight and nothing could be handed out
        };
        let r = joined.map_err(|e| join_error(&e))?;
        let p = &mut peers[r.peer];
        p.inflight -= 1;
        let stats = report.per_peer.entry(p.addr.peer).or_default();
        stats.data_bytes += r.data_bytes;
        stats.wire_bytes += r.wire_bytes;
        report.data_bytes += r.data_bytes;
        report.bytes_transferred += r.wire_bytes;
        let rest = r.ranges & partial.missing();
        match r.outcome {
            Outcome::Done => {
                stats.units += 1;
                p.failures = 0;
            }
            Outcome::Bad(what) => {
                stats.failures += 1;
                if !p.dropped {
                    tracing::warn!(peer = %p.addr.peer, %cid, "dropping source: {what}");
                    p.dropped = true;
                    report.bad_peers.push((p.addr.peer, what.clone()));
                    errors.push((p.addr.peer, what));
                }
            }
            Outcome::Gone(what) => {
                stats.failures += 1;
                if !p.dropped {
                    p.dropped = true;
                    report.failed_peers.push((p.addr.peer, what.clone()));
                }
                errors.push((p.addr.peer, what));
            }
            Outcome::Failed(what) => {
                stats.failures += 1;
                p.failures += 1;
                if p.failures >= opts.max_failures && !p.dropped {
                    tracing::info!(peer = %p.addr.peer, %cid, "giving up on source: {what}");
                    p.dropped = true;
                    report.failed_peers.push((p.addr.peer, what.clone()));
                }
                errors.push((p.addr.peer, what));
            }
            Outcome::Local(e) => return Err(FetchError::Store(e)),
        }
        if !rest.is_empty() {
            queue.push_front(rest);
        }
        publish(&partial);
        if queue.is_empty() && tasks.is_empty() {
            break;
        }
        if !queue.is_empty() && tasks.is_empty() && peers.iter().all(|p| p.dropped) {
            break;
        }
    }

    // 4. Commit, or report what is kept.
    if !partial.is_complete() {
        errors.dedup();
        return Err(FetchError::Exhausted {
            cid,
            have: partial.verified_bytes(),
            size,
            errors,
        });
    }
    {
        let store = store.clone();
        let partial = partial.clone();
        tokio::task::spawn_blocking(move || store.finalize(&lock, &partial))
            .await
            .map_err(|e| join_error(&e))??;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn join_error(e: &tokio::task::JoinError) -> FetchError {
    FetchError::Store(StoreError::Io {
        path: "<fetch task>".into(),
        source: std::io::Error::other(e.to_string()),
    })
}

fn dedup(sources: Vec<Source>) -> Vec<Source> {
    let mut out: Vec<Source> = Vec::new();
    for s in sources {
        match out.iter_mut().find(|o| o.peer == s.peer) {
            Some(o) => o.addrs.extend(s.addrs),
            None => out.push(s),
        }
    }
    out
}

/// Idle streams per source, reused across work units.
type Pool = Arc<std::sync::Mutex<HashMap<usize, Vec<BlobStream>>>>;

async fn take_stream(
    client: &Client,
    to: &PeerAddr,
    pool: &Pool,
    idx: usize,
) -> Result<BlobStream, WireError> {
    let pooled = pool
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&idx)
        .and_then(Vec::pop);
    match pooled {
        Some(s) => Ok(s),
        None => BlobStream::open(client, to).await,
    }
}

fn put_back(pool: &Pool, idx: usize, stream: BlobStream) {
    if stream.is_idle() {
        pool.lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(idx)
            .or_default()
            .push(stream);
    }
}

#[allow(clippy::too_many_arguments)]
async fn fetch_unit(
    client: Client,
    pool: Pool,
    to: PeerAddr,
    peer: usize,
    cid: ContentId,
    partial: Arc<Partial>,
    ranges: ChunkRanges,
    timeout: Duration,
) -> UnitResult {
    let mut r = UnitResult {
        peer,
        ranges: ranges.clone(),
        wire_bytes: 0,
        data_bytes: 0,
        outcome: Outcome::Done,
    };
    let work = async {
        // A stream can fail before its first byte (an idle pooled stream the
        // peer closed, an inbound stream the peer's stack dropped under
        // load): retry those on a fresh stream without counting a failure.
        let mut attempt = 0;
        let (mut stream, claimed, before) = loop {
            attempt += 1;
            let mut stream = match take_stream(&client, &to, &pool, peer).await {
                Ok(s) => s,
                Err(e) => return (0, Outcome::Failed(e.to_string()), 0),
            };
            let before = stream.bytes_read();
            match stream.get(cid, &ranges).await {
                Ok(claimed) => break (stream, claimed, before),
                Err(WireError::NotFound { .. }) => {
                    return (0, Outcome::Gone(format!("does not have {cid}")), 0);
                }
                Err(WireError::Io { .. }) if stream.bytes_read() == before && attempt < 4 => {
                    tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                }
                Err(e) => return (0, Outcome::Failed(e.to_string()), 0),
            }
        };
        if claimed != partial.size() {
            return (
                stream.bytes_read() - before,
                Outcome::Bad(format!(
                    "claims {claimed} bytes, the proven size is {}",
                    partial.size()
                )),
                0,
            );
        }
        let res = wire::decode_into(&partial, &ranges, stream.stream_buf()).await;
        let wire_bytes = stream.bytes_read() - before;
        match res {
            Ok(stats) => {
                put_back(&pool, peer, stream);
                (wire_bytes, Outcome::Done, stats.data_bytes)
            }
            Err(f) => {
                let data = f.stats().data_bytes;
                let outcome = match f {
                    DecodeFailure::Corrupt { what, .. } => Outcome::Bad(what),
                    DecodeFailure::Transport { source, .. } => Outcome::Failed(source.to_string()),
                    DecodeFailure::Local { source, .. } => Outcome::Local(crate::store::io_err(
                        std::path::Path::new("partial/"),
                        source,
                    )),
                };
                (wire_bytes, outcome, data)
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok((wire_bytes, outcome, data_bytes)) => {
            r.wire_bytes = wire_bytes;
            r.data_bytes = data_bytes;
            r.outcome = outcome;
        }
        Err(_) => {
            r.outcome = Outcome::Failed(format!("work unit took over {}s", timeout.as_secs()));
        }
    }
    r
}
