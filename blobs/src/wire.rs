//! The `/kiln/blobs/1` protocol: verified byte ranges over libp2p streams.
//!
//! One request per stream (yamux streams are cheap, and concurrent requests
//! to one peer are concurrent streams):
//!
//! ```text
//! requester → u32 BE length ‖ encoding::encode(Request)
//! responder → u32 BE length ‖ encoding::encode(Response)
//!             [Found only] the bao encoding of the requested chunk ranges
//!             (parent hash pairs and 16 KiB leaves, pre-order), then EOF
//! ```
//!
//! Ranges travel as the boundaries of a chunk range set (1 KiB chunks,
//! strictly increasing; an odd count means the last range is open). The
//! responder encodes with `encode_ranges_validated`, re-checking its own
//! bytes against its outboard as it reads them, and streams the encoding as
//! it is produced; the requester checks every parent pair and every leaf
//! against the root hash (the CID) as it arrives, and writes a leaf only
//! after it checked out ([`decode_into`]).
//!
//! The size in `Found` is a claim: it shapes the tree, so a requester that
//! does not know the size yet verifies it first by asking for the last chunk
//! ([`probe_size`]), whose proof binds the size to the root.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bao_tree::{BaoTree, ChunkNum, ChunkRanges};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use kiln_net::{Addr as Multiaddr, Client, NetError, Peer as PeerId, Stream};
use kiln_protocol::{ContentId, encoding};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, DecodeFail, Decoder, EncodeFail, Encoder, Verified};
use crate::root_of;
use crate::store::{Partial, Store};

/// The protocol name.
pub const PROTOCOL: &str = kiln_net::BLOB_PROTOCOL;
/// Largest request frame.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Largest response header frame.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Most range boundaries in one request.
pub const MAX_BOUNDARIES: usize = 4096;
/// Most CIDs in one `Has` request.
pub const MAX_HAS: usize = 4096;
/// Requests served at once (further ones wait for a slot). A slot is held
/// only while a request is answered, never while a stream sits idle.
pub const MAX_CONCURRENT_SERVES: usize = 64;
/// Streams open at once, idle or not; more are dropped as they arrive.
pub const MAX_OPEN_STREAMS: usize = 1024;
/// Streams one peer may hold open at once; more are dropped as they arrive
/// (a fetch uses one per source).
pub const MAX_STREAMS_PER_PEER: usize = 16;

/// What a requester asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The bao encoding of `ranges` (chunk range-set boundaries) of `cid`.
    Get { cid: ContentId, ranges: Vec<u64> },
    /// Which of these complete blobs the responder holds, with sizes.
    Has { cids: Vec<ContentId> },
}

/// The responder's header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The blob is here; its bao encoding of the requested ranges follows.
    Found {
        size: u64,
    },
    NotFound,
    /// One entry per asked CID.
    Has {
        sizes: Vec<Option<u64>>,
    },
    /// The request was malformed or the responder failed.
    Error {
        reason: String,
    },
}

/// Why a request over `/kiln/blobs/1` failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("blob stream with {peer} failed: {source}")]
    Io { peer: PeerId, source: io::Error },
    #[error("{peer} answered unexpectedly: {what}")]
    Protocol { peer: PeerId, what: String },
    #[error("{peer} does not have {cid}")]
    NotFound { peer: PeerId, cid: ContentId },
    #[error("{peer} refused the request: {reason}")]
    Refused { peer: PeerId, reason: String },
}

/// The boundaries of a chunk range set, for the wire.
pub fn ranges_to_wire(ranges: &ChunkRanges) -> Vec<u64> {
    ranges.boundaries().iter().map(|c| c.0).collect()
}

/// Parses range-set boundaries; `None` unless strictly increasing and
/// bounded in count.
pub fn ranges_from_wire(b: &[u64]) -> Option<ChunkRanges> {
    if b.len() > MAX_BOUNDARIES || b.windows(2).any(|w| w[0] >= w[1]) {
        return None;
    }
    let mut out = ChunkRanges::empty();
    for pair in b.chunks(2) {
        out |= match *pair {
            [s, e] => ChunkRanges::from(ChunkNum(s)..ChunkNum(e)),
            [s] => ChunkRanges::from(ChunkNum(s)..),
            _ => return None,
        };
    }
    Some(out)
}

/// The ranges that select only a blob's last chunk, whatever its size.
pub fn last_chunk() -> ChunkRanges {
    ChunkRanges::from(ChunkNum(u64::MAX - 1)..)
}

/// Writes one length-prefixed frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> io::Result<()> {
    let buf = encoding::encode(value)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let len = u32::try_from(buf.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&buf).await
}

/// Reads one length-prefixed frame of at most `max` bytes.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {max}-byte limit"),
        ));
    }
    read_body(r, len).await
}

/// Reads a frame body of `len` bytes, growing the buffer only as bytes
/// arrive (a declared length costs nothing until it is sent).
async fn read_body<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> io::Result<T> {
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    (&mut *r).take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the peer closed after {} of the {len} bytes it announced",
                buf.len()
            ),
        ));
    }
    encoding::decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

// ---------------------------------------------------------------------------
// Serving

/// How long a served stream may sit idle between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes handed to the stream per write.
const PIECE: usize = 256 * 1024;

/// Decides which of `cids` `peer` may fetch (and learn are held): the
/// allowed subset. Asked once per request, for all its distinct CIDs at
/// once (a `Has` of 4,096 CIDs is one decision, which the coordinator
/// answers with a few batched queries), before the store is looked at.
pub type Authorize = Arc<
    dyn Fn(PeerId, Vec<ContentId>) -> futures::future::BoxFuture<'static, HashSet<ContentId>>
        + Send
        + Sync,
>;

/// Server settings.
#[derive(Clone)]
pub struct ServeConfig {
    /// Re-check stored groups against the outboard while serving them (a
    /// blob rotted on disk is then caught and removed instead of sent).
    pub validate: bool,
    /// Who may fetch what; `None` serves every blob to every peer (CIDs as
    /// capabilities, as in IPFS).
    pub authorize: Option<Authorize>,
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("validate", &self.validate)
            .field("authorize", &self.authorize.is_some())
            .finish()
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            validate: true,
            authorize: None,
        }
    }
}

impl ServeConfig {
    async fn allows(&self, peer: PeerId, cid: ContentId) -> bool {
        match &self.authorize {
            None => true,
            Some(f) => f(peer, vec![cid]).await.contains(&cid),
        }
    }

    /// The subset of `cids` (distinct) that `peer` may fetch.
    async fn allowed(&self, peer: PeerId, cids: Vec<ContentId>) -> HashSet<ContentId> {
        match &self.authorize {
            None => cids.into_iter().collect(),
            Some(f) => f(peer, cids).await,
        }
    }
}

/// Serves `/kiln/blobs/1` from `store` until `cancel` fires. Only one server
/// per process and client (the stream protocol has one acceptor).
pub async fn serve(
    store: Store,
    client: Client,
    cancel: CancellationToken,
) -> Result<(), NetError> {
    serve_with(store, client, cancel, ServeConfig::default()).await
}

/// [`serve`] with settings.
pub async fn serve_with(
    store: Store,
    client: Client,
    cancel: CancellationToken,
    config: ServeConfig,
) -> Result<(), NetError> {
    let mut incoming = client.accept_streams(PROTOCOL)?;
    let limits = Arc::new(StreamLimits {
        serving: Semaphore::new(MAX_CONCURRENT_SERVES),
        open: Arc::new(Semaphore::new(MAX_OPEN_STREAMS)),
        per_peer: Mutex::new(HashMap::new()),
    });
    loop {
        // Hand each stream off at once: libp2p-stream drops inbound streams
        // that arrive while this loop is not ready for them.
        tokio::select! {
            () = cancel.cancelled() => break,
            next = incoming.next() => {
                let Some((peer, stream)) = next else { break };
                // Past the limits the stream is dropped here, costing no
                // task: the requester sees it reset and may retry.
                let Some(held) = limits.admit(peer) else {
                    tracing::debug!(%peer, "blob stream refused: too many open streams");
                    continue;
                };
                let (store, limits, cancel) = (store.clone(), limits.clone(), cancel.clone());
                let config = config.clone();
                tokio::spawn(async move {
                    let _held = held;
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        r = serve_stream(&store, peer, stream, &config, &limits.serving) => if let Err(e) = r {
                            tracing::debug!(%peer, "blob stream ended: {e}");
                        }
                    }
                });
            }
        }
    }
    Ok(())
}

/// What the server's streams may take, in all and per peer.
struct StreamLimits {
    /// Requests being answered.
    serving: Semaphore,
    /// Streams open.
    open: Arc<Semaphore>,
    /// Streams open per peer.
    per_peer: Mutex<HashMap<PeerId, usize>>,
}

/// One admitted stream's share of [`StreamLimits`], given back on drop.
struct Admitted {
    limits: Arc<StreamLimits>,
    peer: PeerId,
    _open: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut m) = self.limits.per_peer.lock()
            && let Some(n) = m.get_mut(&self.peer)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

impl StreamLimits {
    fn admit(self: &Arc<Self>, peer: PeerId) -> Option<Admitted> {
        let open = self.open.clone().try_acquire_owned().ok()?;
        let mut m = self.per_peer.lock().ok()?;
        let n = m.entry(peer).or_insert(0);
        if *n >= MAX_STREAMS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Admitted {
            limits: self.clone(),
            peer,
            _open: open,
        })
    }
}

/// Answers requests on one stream, one after the other, until the requester
/// closes it (or is idle for [`IDLE_TIMEOUT`]).
async fn serve_stream(
    store: &Store,
    peer: PeerId,
    mut stream: Stream,
    config: &ServeConfig,
    serving: &Semaphore,
) -> io::Result<()> {
    let mut spare = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match tokio::time::timeout(IDLE_TIMEOUT, stream.read_exact(&mut len)).await {
            Err(_) => break,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) => {}
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_REQUEST_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request of {len} bytes exceeds the limit"),
            ));
        }
        let request: Request = tokio::time::timeout(IDLE_TIMEOUT, read_body(&mut stream, len))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request body stalled"))??;
        // A slot only while answering: idle streams hold none.
        let _slot = serving
            .acquire()
            .await
            .map_err(|_| io::Error::other("server closed"))?;
        serve_request(store, peer, &mut stream, request, config, &mut spare).await?;
        stream.flush().await?;
    }
    stream.close().await
}

async fn serve_request(
    store: &Store,
    peer: PeerId,
    stream: &mut Stream,
    request: Request,
    config: &ServeConfig,
    spare: &mut Vec<u8>,
) -> io::Result<()> {
    let (cid, ranges) = match request {
        Request::Has { cids } => {
            let response = if cids.len() > MAX_HAS {
                Response::Error {
                    reason: format!("at most {MAX_HAS} CIDs per request"),
                }
            } else {
                // One access decision for all distinct CIDs, however
                // often each is listed.
                let mut distinct: Vec<ContentId> = cids.clone();
                distinct.sort_unstable();
                distinct.dedup();
                let allowed = config.allowed(peer, distinct).await;
                let sizes = cids
                    .iter()
                    .map(|c| {
                        if allowed.contains(c) {
                            store.size(c)
                        } else {
                            None
                        }
                    })
                    .collect();
                Response::Has { sizes }
            };
            return write_frame(stream, &response).await;
        }
        Request::Get { cid, ranges } => (cid, ranges),
    };
    if !config.allows(peer, cid).await {
        let reason = format!("{peer} may not fetch {cid} from this peer");
        return write_frame(stream, &Response::Error { reason }).await;
    }
    let Some(ranges) = ranges_from_wire(&ranges) else {
        let reason = "ranges must be strictly increasing chunk boundaries".into();
        return write_frame(stream, &Response::Error { reason }).await;
    };
    let blob = match store.open(&cid) {
        Ok(Some(b)) => b,
        Ok(None) => return write_frame(stream, &Response::NotFound).await,
        Err(e) => {
            tracing::warn!(%cid, "cannot open blob to serve: {e}");
            let reason = "the blob could not be read".into();
            return write_frame(stream, &Response::Error { reason }).await;
        }
    };
    write_frame(stream, &Response::Found { size: blob.size() }).await?;
    let corrupt = |what: String| {
        // Our own copy failed its check: never send more of it (the stream
        // is dropped mid-response) and take the blob out of the store.
        tracing::error!(%cid, "stopped serving: the stored blob failed verification at {what}");
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let _ = store.verify(&cid);
        });
        io::Error::new(io::ErrorKind::InvalidData, what)
    };
    if !Encoder::aligned(blob.tree(), &ranges) {
        // Ranges inside a group (the size probe): bao-tree's encoder, which
        // recomputes the inner hashes; such responses are tiny.
        let encoded = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            blob.encode_ranges(&ranges, &mut out).map(|()| out)
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
        let encoded = encoded.map_err(|e| corrupt(e.to_string()))?;
        return stream.write_all(&encoded).await;
    }
    // Aligned ranges: fill one buffer on a blocking thread (file reads and
    // hashing) while the previous one is written to the stream.
    let (data, outboard) = blob.into_parts();
    let encoder = Encoder::new(data, outboard, &ranges, config.validate);
    let fill = |mut enc: Encoder, mut buf: Vec<u8>| {
        tokio::task::spawn_blocking(move || {
            buf.resize(PIECE, 0);
            let mut pos = 0;
            let r = enc.fill(&mut buf, &mut pos);
            (enc, buf, pos, r)
        })
    };
    let mut job = fill(encoder, std::mem::take(spare));
    loop {
        let (enc, buf, pos, r) = (&mut job)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let done = match r {
            Ok(done) => done,
            Err(EncodeFail::Corrupt(what)) => return Err(corrupt(what)),
            Err(e) => return Err(io::Error::other(e.to_string())),
        };
        if !done {
            job = fill(enc, std::mem::take(spare));
        }
        let sent = stream.write_all(&buf[..pos]).await;
        *spare = buf;
        if let Err(e) = sent {
            tracing::debug!(%peer, %cid, "requester went away: {e}");
            return Err(e);
        }
        if done {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------
// Requesting

/// Where to reach a peer: its id and (optionally) addresses to dial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
}

impl From<PeerId> for PeerAddr {
    fn from(peer: PeerId) -> Self {
        Self {
            peer,
            addrs: Vec::new(),
        }
    }
}

/// A buffered reader that counts what it reads and lets a decoder work on
/// the buffered bytes in place.
pub struct StreamBuf<S> {
    inner: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes read from `inner` so far.
    pub read: u64,
    eof: bool,
}

const BUF_BYTES: usize = 256 * 1024;

impl<S: AsyncRead + Unpin> StreamBuf<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: vec![0u8; BUF_BYTES],
            start: 0,
            end: 0,
            read: 0,
            eof: false,
        }
    }

    /// The buffered, unconsumed bytes.
    pub fn available(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more (at least one byte unless the stream ended, then `false`).
    pub async fn fill_more(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.end == self.buf.len() {
            // Move the unconsumed tail (less than one item) to the front.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.inner.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        self.read += n as u64;
        if n == 0 {
            self.eof = true;
        }
        Ok(n > 0)
    }

    /// Reads exactly `n` bytes (n ≤ the buffer size).
    async fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.available().len() < n {
            if !self.fill_more().await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let out = self.available()[..n].to_vec();
        self.consume(n);
        Ok(out)
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

/// A requester's open stream to one peer, reusable for any number of
/// requests in turn.
pub struct BlobStream {
    peer: PeerId,
    buf: StreamBuf<Stream>,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobStream({})", self.peer)
    }
}

impl BlobStream {
    /// Opens a stream to `to` (dialing its addresses if needed).
    pub async fn open(client: &Client, to: &PeerAddr) -> Result<Self, WireError> {
        let stream = client
            .open_stream(to.peer, to.addrs.clone(), PROTOCOL)
            .await?;
        Ok(Self {
            peer: to.peer,
            buf: StreamBuf::new(stream),
        })
    }

    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Bytes read from the stream so far.
    pub fn bytes_read(&self) -> u64 {
        self.buf.read
    }

    /// Whether the stream sits between responses (safe to reuse).
    pub fn is_idle(&self) -> bool {
        self.buf.available().is_empty() && !self.buf.eof
    }

    fn io(&self, source: io::Error) -> WireError {
        WireError::Io {
            peer: self.peer,
            source,
        }
    }

    async fn send(&mut self, request: &Request) -> Result<Response, WireError> {
        let stream = self.buf.get_mut();
        let res = async {
            write_frame(stream, request).await?;
            stream.flush().await
        }
        .await;
        res.map_err(|e| self.io(e))?;
        let len = self.buf.take(4).await.map_err(|e| self.io(e))?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > MAX_RESPONSE_BYTES.min(BUF_BYTES) {
            return Err(WireError::Protocol {
                peer: self.peer,
                what: format!("response header of {len} bytes"),
            });
        }
        let bytes = self.buf.take(len).await.map_err(|e| self.io(e))?;
        encoding::decode(&bytes).map_err(|e| WireError::Protocol {
            peer: self.peer,
            what: e.to_string(),
        })
    }

    /// Asks which of `cids` the peer holds; sizes are its claims.
    pub async fn has(&mut self, cids: Vec<ContentId>) -> Result<Vec<Option<u64>>, WireError> {
        let n = cids.len();
        match self.send(&Request::Has { cids }).await? {
            Response::Has { sizes } if sizes.len() == n => Ok(sizes),
            Response::Error { reason } => Err(WireError::Refused {
                peer: self.peer,
                reason,
            }),
            other => Err(WireError::Protocol {
                peer: self.peer,
                what: format!("{other:?} to a Has request of {n} CIDs"),
            }),
        }
    }

    /// Sends a `Get` and reads the header: the claimed size. The bao
    /// encoding follows; read all of it (with [`decode_into`] or
    /// [`Self::decode`]) before the next request.
    pub async fn get(&mut self, cid: ContentId, ranges: &ChunkRanges) -> Result<u64, WireError> {
        let request = Request::Get {
            cid,
            ranges: ranges_to_wire(ranges),
        };
        match self.send(&request).await? {
            Response::Found { size } => Ok(size),
            Response::NotFound => Err(WireError::NotFound {
                peer: self.peer,
                cid,
            }),
            Response::Error { reason } => Err(WireError::Refused {
                peer: self.peer,
                reason,
            }),
            other => Err(WireError::Protocol {
                peer: self.peer,
                what: format!("{other:?} to a Get request"),
            }),
        }
    }

    /// Verifies the response body of a `Get` of `ranges` against `root` for
    /// a blob of `size` bytes, handing each verified item to `sink`.
    pub async fn decode<E>(
        &mut self,
        root: blake3::Hash,
        size: u64,
        ranges: &ChunkRanges,
        sink: impl FnMut(Verified<'_>) -> Result<(), E>,
    ) -> Result<(), DecodeError<E>> {
        decode_stream(&mut self.buf, root, crate::tree(size), ranges, sink).await
    }

    /// The buffered stream (for custom decoding).
    pub fn stream_buf(&mut self) -> &mut StreamBuf<Stream> {
        &mut self.buf
    }

    /// Closes the stream cleanly.
    pub async fn close(mut self) {
        let _ = self.buf.get_mut().close().await;
    }
}

/// Why decoding a response stopped.
#[derive(Debug)]
pub enum DecodeError<E> {
    /// The sender's bytes failed verification.
    Corrupt(String),
    /// The stream broke or ended early.
    Transport(io::Error),
    /// The sink failed.
    Sink(E),
}

/// Decodes one response body from `sb`, verifying as bytes arrive.
pub async fn decode_stream<S: AsyncRead + Unpin, E>(
    sb: &mut StreamBuf<S>,
    root: blake3::Hash,
    tree: BaoTree,
    ranges: &ChunkRanges,
    mut sink: impl FnMut(Verified<'_>) -> Result<(), E>,
) -> Result<(), DecodeError<E>> {
    let ranges = codec::truncated(ranges, tree.size());
    let mut dec = Decoder::new(root, tree, &ranges);
    while !dec.is_done() {
        if sb.available().len() < dec.need() {
            match sb.fill_more().await {
                Ok(true) => continue,
                Ok(false) => {
                    return Err(DecodeError::Transport(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the stream ended inside the response",
                    )));
                }
                Err(e) => return Err(DecodeError::Transport(e)),
            }
        }
        match dec.feed(sb.available(), &mut sink) {
            Err(e) => return Err(DecodeError::Sink(e)),
            Ok(Err(DecodeFail::Leaf(offset))) => {
                return Err(DecodeError::Corrupt(format!(
                    "the 16 KiB group at byte {offset} does not match the hash"
                )));
            }
            Ok(Err(DecodeFail::Parent(chunks))) => {
                return Err(DecodeError::Corrupt(format!(
                    "the proof node over chunks {chunks:?} does not match the hash"
                )));
            }
            Ok(Ok(n)) => sb.consume(n),
        }
    }
    Ok(())
}

/// Asks `to` which of `cids` it holds; sizes are the peer's claims.
pub async fn has(
    client: &Client,
    to: &PeerAddr,
    cids: Vec<ContentId>,
) -> Result<Vec<Option<u64>>, WireError> {
    let mut s = BlobStream::open(client, to).await?;
    let r = s.has(cids).await;
    s.close().await;
    r
}

/// One whole response on a fresh stream, unverified: the claimed size and
/// the bao-encoded bytes (at most `max` of them). Decode with bao-tree
/// (`bao_tree::io::sync::decode_ranges`) against the CID's root.
pub async fn fetch_range(
    client: &Client,
    to: &PeerAddr,
    cid: ContentId,
    ranges: &ChunkRanges,
    max: usize,
) -> Result<(u64, Vec<u8>), WireError> {
    let mut s = BlobStream::open(client, to).await?;
    let size = s.get(cid, ranges).await?;
    s.buf.get_mut().close().await.map_err(|e| s.io(e))?;
    let mut out = Vec::new();
    loop {
        out.extend_from_slice(s.buf.available());
        let n = s.buf.available().len();
        s.buf.consume(n);
        if out.len() > max {
            return Err(WireError::Protocol {
                peer: to.peer,
                what: format!("response longer than {max} bytes"),
            });
        }
        if !s.buf.fill_more().await.map_err(|e| s.io(e))? {
            break;
        }
    }
    Ok((size, out))
}

/// Verifies a size claim on `stream`: asks for the last chunk and checks its
/// proof against the root. Returns the proven size. A peer whose proof fails
/// is lying (or corrupted): `Err(Bad)`.
pub async fn probe_size(stream: &mut BlobStream, cid: ContentId) -> Result<u64, ProbeError> {
    let size = stream
        .get(cid, &last_chunk())
        .await
        .map_err(ProbeError::Wire)?;
    let peer = stream.peer;
    match stream
        .decode(root_of(&cid), size, &last_chunk(), |_| Ok::<(), ()>(()))
        .await
    {
        Ok(()) => Ok(size),
        Err(DecodeError::Corrupt(what)) => Err(ProbeError::Bad(format!(
            "size claim of {size} bytes does not verify: {what}"
        ))),
        Err(DecodeError::Transport(source)) => {
            Err(ProbeError::Wire(WireError::Io { peer, source }))
        }
        Err(DecodeError::Sink(())) => Ok(size),
    }
}

/// Checks that `to` holds the blob `cid` of `size` bytes: asks for one
/// random 16 KiB group and verifies its proof against the root. A peer that
/// merely knows the CID cannot answer. Proof of possession of one group,
/// chosen after the claim was made, not of every byte.
pub async fn prove_possession(
    client: &Client,
    to: &PeerAddr,
    cid: ContentId,
    size: u64,
) -> Result<(), ProbeError> {
    let group_chunks = crate::GROUP_BYTES / 1024;
    let groups = size.div_ceil(crate::GROUP_BYTES).max(1);
    let g = getrandom::u64().map_or(0, |r| r % groups);
    let ranges = ChunkRanges::from(ChunkNum(g * group_chunks)..ChunkNum((g + 1) * group_chunks));
    let mut stream = BlobStream::open(client, to)
        .await
        .map_err(ProbeError::Wire)?;
    let claimed = stream.get(cid, &ranges).await.map_err(ProbeError::Wire)?;
    if claimed != size {
        return Err(ProbeError::Bad(format!(
            "{} claims {cid} has {claimed} bytes, not {size}",
            to.peer
        )));
    }
    let peer = stream.peer;
    let mut leaf = 0u64;
    let r = stream
        .decode(root_of(&cid), size, &ranges, |item| {
            if let Verified::Leaf(_, data) = item {
                leaf += data.len() as u64;
            }
            Ok::<(), ()>(())
        })
        .await;
    stream.close().await;
    match r {
        Ok(()) if leaf > 0 || size == 0 => Ok(()),
        Ok(()) | Err(DecodeError::Sink(())) => {
            Err(ProbeError::Bad(format!("{peer} sent no data for {cid}")))
        }
        Err(DecodeError::Corrupt(what)) => Err(ProbeError::Bad(format!(
            "{peer} does not hold {cid}: {what}"
        ))),
        Err(DecodeError::Transport(source)) => {
            Err(ProbeError::Wire(WireError::Io { peer, source }))
        }
    }
}

/// Why a size probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Wire(WireError),
    #[error("{0}")]
    Bad(String),
}

/// What [`decode_into`] achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Verified leaf bytes written into the partial blob.
    pub data_bytes: u64,
}

/// Why [`decode_into`] stopped early; `stats` says what was kept.
#[derive(Debug, thiserror::Error)]
pub enum DecodeFailure {
    /// The sender's bytes failed verification (the sender is bad).
    #[error("corrupt data: {what}")]
    Corrupt { what: String, stats: DecodeStats },
    /// The stream broke or ended early (try again, maybe elsewhere).
    #[error("transfer interrupted: {source}")]
    Transport {
        source: io::Error,
        stats: DecodeStats,
    },
    /// Writing verified bytes to the local store failed.
    #[error("writing the partial blob failed: {source}")]
    Local {
        source: io::Error,
        stats: DecodeStats,
    },
}

impl DecodeFailure {
    pub fn stats(&self) -> DecodeStats {
        match self {
            Self::Corrupt { stats, .. }
            | Self::Transport { stats, .. }
            | Self::Local { stats, .. } => *stats,
        }
    }
}

/// Reads the bao encoding of `ranges` from `sb`, verifying each parent pair
/// and each 16 KiB group against the partial blob's root as it arrives, and
/// writes only what verified. Stops at the first failure, keeping
/// everything verified before it.
pub async fn decode_into<S: AsyncRead + Unpin>(
    partial: &Partial,
    ranges: &ChunkRanges,
    sb: &mut StreamBuf<S>,
) -> Result<DecodeStats, DecodeFailure> {
    let mut stats = DecodeStats::default();
    let res = decode_stream(
        sb,
        root_of(&partial.cid()),
        partial.tree(),
        ranges,
        |item| match item {
            Verified::Parent(node, pair) => partial.save_verified_parent(node, &pair),
            Verified::Leaf(offset, data) => {
                partial.write_verified_leaf(offset, data)?;
                stats.data_bytes += data.len() as u64;
                Ok(())
            }
        },
    )
    .await;
    match res {
        Ok(()) => Ok(stats),
        Err(DecodeError::Corrupt(what)) => Err(DecodeFailure::Corrupt { what, stats }),
        Err(DecodeError::Transport(source)) => Err(DecodeFailure::Transport { source, stats }),
        Err(DecodeError::Sink(source)) => Err(DecodeFailure::Local { source, stats }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bao_tree::io::outboard::PostOrderMemOutboard;

    /// Issue 13, finding 5: streams are admitted per peer and in all, and
    /// a stream's share comes back when it ends. (Serving slots are taken
    /// per request in `serve_stream`, so an admitted idle stream holds
    /// none.)
    #[test]
    fn streams_are_admitted_per_peer_and_in_all() {
        let limits = Arc::new(StreamLimits {
            serving: Semaphore::new(MAX_CONCURRENT_SERVES),
            open: Arc::new(Semaphore::new(MAX_STREAMS_PER_PEER + 4)),
            per_peer: Mutex::new(HashMap::new()),
        });
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut held: Vec<Admitted> = (0..MAX_STREAMS_PER_PEER)
            .map(|_| limits.admit(a).expect("within a's share"))
            .collect();
        assert!(limits.admit(a).is_none(), "one more than a's share");
        // Others are still admitted, up to the total.
        let others: Vec<Admitted> = (0..4)
            .map(|i| limits.admit(if i % 2 == 0 { b } else { c }).expect("b, c"))
            .collect();
        assert!(limits.admit(b).is_none(), "the total is reached");
        // A stream that ends gives its share back, to its peer and to all.
        held.pop();
        assert!(limits.admit(a).is_some());
        drop(others);
        assert_eq!(limits.per_peer.lock().map(|m| m.len()).unwrap_or(0), 1);
        assert!(limits.admit(b).is_some());
    }

    #[test]
    fn ranges_round_trip_and_reject_garbage() {
        let r = ChunkRanges::from(ChunkNum(0)..ChunkNum(16))
            | ChunkRanges::from(ChunkNum(32)..ChunkNum(48))
            | ChunkRanges::from(ChunkNum(100)..);
        assert_eq!(ranges_from_wire(&ranges_to_wire(&r)), Some(r));
        assert_eq!(ranges_from_wire(&[5, 3]), None);
        assert_eq!(ranges_from_wire(&[1, 1]), None);
        assert_eq!(ranges_from_wire(&vec![0; MAX_BOUNDARIES + 1]), None);
        assert_eq!(ranges_from_wire(&[]), Some(ChunkRanges::empty()));
    }

    #[tokio::test]
    async fn last_chunk_proof_binds_the_size() {
        use crate::BLOCK_SIZE;
        use bao_tree::io::fsm::{ResponseDecoder, ResponseDecoderNext};
        use bytes::Bytes;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let ob = PostOrderMemOutboard::create(&data, BLOCK_SIZE);
        let mut enc = Vec::new();
        bao_tree::io::sync::encode_ranges_validated(&data[..], &ob, &last_chunk(), &mut enc)
            .unwrap();
        assert!(enc.len() < 4096, "only the last chunk and its proof");
        let root = blake3::hash(&data);
        let ok = |size: u64, enc: Vec<u8>| async move {
            let mut d =
                ResponseDecoder::new(root, last_chunk(), crate::tree(size), Bytes::from(enc));
            loop {
                match d.next().await {
                    ResponseDecoderNext::More((n, item)) => {
                        d = n;
                        if item.is_err() {
                            return false;
                        }
                    }
                    ResponseDecoderNext::Done(_) => return true,
                }
            }
        };
        assert!(ok(data.len() as u64, enc.clone()).await);
        // A lie about the size (same power-of-two bucket) does not verify.
        assert!(!ok(data.len() as u64 - 1000, enc.clone()).await);
        assert!(!ok(data.len() as u64 + 5000, enc).await);
    }
}
