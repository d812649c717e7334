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

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bao_tree::io::BaoContentItem;
use bao_tree::io::fsm::{ResponseDecoder, ResponseDecoderNext};
use bao_tree::{ChunkNum, ChunkRanges};
use bytes::{Bytes, BytesMut};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use iroh_io::AsyncStreamReader;
use kiln_net::{Addr as Multiaddr, Client, NetError, Peer as PeerId, Stream};
use kiln_protocol::{ContentId, encoding};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::store::{Partial, Store};
use crate::{BLOCK_SIZE, root_of};

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
/// Streams served at once (further ones wait).
pub const MAX_CONCURRENT_SERVES: usize = 64;

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
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    encoding::decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

// ---------------------------------------------------------------------------
// Serving

/// How long a served stream may sit idle between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Serves `/kiln/blobs/1` from `store` until `cancel` fires. Only one server
/// per process and client (the stream protocol has one acceptor).
pub async fn serve(
    store: Store,
    client: Client,
    cancel: CancellationToken,
) -> Result<(), NetError> {
    let mut incoming = client.accept_streams(PROTOCOL)?;
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_SERVES));
    loop {
        // Hand each stream off at once: libp2p-stream drops inbound streams
        // that arrive while this loop is not ready for them.
        tokio::select! {
            () = cancel.cancelled() => break,
            next = incoming.next() => {
                let Some((peer, stream)) = next else { break };
                let (store, slots, cancel) = (store.clone(), slots.clone(), cancel.clone());
                tokio::spawn(async move {
                    let Ok(_permit) = slots.acquire_owned().await else { return };
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        r = serve_stream(&store, peer, stream) => if let Err(e) = r {
                            tracing::debug!(%peer, "blob stream ended: {e}");
                        }
                    }
                });
            }
        }
    }
    Ok(())
}

/// Answers requests on one stream, one after the other, until the requester
/// closes it (or is idle for [`IDLE_TIMEOUT`]).
pub async fn serve_stream(store: &Store, peer: PeerId, mut stream: Stream) -> io::Result<()> {
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
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await?;
        let request: Request = encoding::decode(&buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        serve_request(store, peer, &mut stream, request).await?;
        stream.flush().await?;
    }
    stream.close().await
}

async fn serve_request(
    store: &Store,
    peer: PeerId,
    stream: &mut Stream,
    request: Request,
) -> io::Result<()> {
    match request {
        Request::Has { cids } => {
            let response = if cids.len() > MAX_HAS {
                Response::Error {
                    reason: format!("at most {MAX_HAS} CIDs per request"),
                }
            } else {
                Response::Has {
                    sizes: cids.iter().map(|c| store.size(c)).collect(),
                }
            };
            write_frame(stream, &response).await
        }
        Request::Get { cid, ranges } => {
            let Some(ranges) = ranges_from_wire(&ranges) else {
                return write_frame(
                    stream,
                    &Response::Error {
                        reason: "ranges must be strictly increasing chunk boundaries".into(),
                    },
                )
                .await;
            };
            let blob = match store.open(&cid) {
                Ok(Some(b)) => b,
                Ok(None) => return write_frame(stream, &Response::NotFound).await,
                Err(e) => {
                    tracing::warn!(%cid, "cannot open blob to serve: {e}");
                    return write_frame(
                        stream,
                        &Response::Error {
                            reason: "the blob could not be read".into(),
                        },
                    )
                    .await;
                }
            };
            write_frame(stream, &Response::Found { size: blob.size() }).await?;
            let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
            let encoder = tokio::task::spawn_blocking(move || {
                let mut w = ChannelWriter::new(tx);
                let res = if std::env::var_os("KILN_BLOBS_NO_VALIDATE").is_some() {
                    bao_tree::io::sync::encode_ranges(blob.data(), blob.outboard(), &ranges, &mut w)
                } else {
                    blob.encode_ranges(&ranges, &mut w)
                };
                let res = res.and_then(|()| w.finish().map_err(Into::into));
                (blob.cid(), res)
            });
            let mut sent = Ok(());
            while let Some(chunk) = rx.recv().await {
                if let Err(e) = stream.write_all(&chunk).await {
                    sent = Err(e);
                    break;
                }
            }
            drop(rx);
            match encoder.await {
                Ok((_, Ok(()))) => sent,
                Ok((cid, Err(bao_tree::io::EncodeError::Io(e)))) if sent.is_err() => {
                    tracing::debug!(%peer, %cid, "requester went away: {e}");
                    sent
                }
                Ok((cid, Err(e))) => {
                    // Our own copy failed its check: never send more of it.
                    // The stream is dropped (reset) mid-response.
                    tracing::error!(%cid, "serving stopped, stored blob failed verification: {e}");
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || {
                        let _ = store.verify(&cid);
                    });
                    Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
                }
                Err(e) => Err(io::Error::other(e.to_string())),
            }
        }
    }
}

/// A blocking writer that hands 256 KiB pieces to an async task.
struct ChannelWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

const PIECE: usize = 256 * 1024;

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Vec<u8>>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(PIECE),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE));
        self.tx
            .blocking_send(piece)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the stream closed"))
    }

    fn finish(mut self) -> io::Result<()> {
        self.send()
    }
}

impl io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIECE {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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

/// A requester's open stream to one peer, reusable for any number of
/// requests in turn (a response is self-delimiting: its header, then exactly
/// the bao encoding of the requested ranges).
pub struct BlobStream {
    peer: PeerId,
    reader: CountingReader<Stream>,
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
            reader: CountingReader::new(stream),
        })
    }

    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Bytes read from the stream so far.
    pub fn bytes_read(&self) -> u64 {
        self.reader.read
    }

    /// Whether the stream sits between responses (safe to reuse).
    pub fn is_idle(&self) -> bool {
        self.reader.buf.is_empty() && !self.reader.eof
    }

    fn io(&self, source: io::Error) -> WireError {
        WireError::Io {
            peer: self.peer,
            source,
        }
    }

    async fn send(&mut self, request: &Request) -> Result<Response, WireError> {
        let stream = &mut self.reader.inner;
        let res = async {
            write_frame(stream, request).await?;
            stream.flush().await
        }
        .await;
        res.map_err(|e| self.io(e))?;
        let len = self.reader.read::<4>().await.map_err(|e| self.io(e))?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_RESPONSE_BYTES {
            return Err(WireError::Protocol {
                peer: self.peer,
                what: format!("response header of {len} bytes"),
            });
        }
        let bytes = self
            .reader
            .read_bytes_exact(len)
            .await
            .map_err(|e| self.io(e))?;
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
    /// encoding follows on [`Self::reader`]; read all of it (e.g. with
    /// [`decode_into`]) before the next request.
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

    /// The response body reader (an [`AsyncStreamReader`]).
    pub fn reader(&mut self) -> &mut CountingReader<Stream> {
        &mut self.reader
    }

    /// Closes the stream cleanly.
    pub async fn close(mut self) {
        let _ = self.reader.inner.close().await;
    }
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
/// the bao-encoded bytes (at most `max` of them). Decode with
/// [`decode_into`] or `bao_tree::io::sync::decode_ranges` against the CID's
/// root.
pub async fn fetch_range(
    client: &Client,
    to: &PeerAddr,
    cid: ContentId,
    ranges: &ChunkRanges,
    max: usize,
) -> Result<(u64, Vec<u8>), WireError> {
    let mut s = BlobStream::open(client, to).await?;
    let size = s.get(cid, ranges).await?;
    s.reader.inner.close().await.map_err(|e| s.io(e))?;
    let mut out = Vec::new();
    loop {
        let piece = s.reader.read_bytes(READ_PIECE).await.map_err(|e| s.io(e))?;
        if piece.is_empty() {
            break;
        }
        out.extend_from_slice(&piece);
        if out.len() > max {
            return Err(WireError::Protocol {
                peer: to.peer,
                what: format!("response longer than {max} bytes"),
            });
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
    let tree = crate::tree(size);
    let peer = stream.peer;
    let mut decoder = ResponseDecoder::new(root_of(&cid), last_chunk(), tree, stream.reader());
    loop {
        match decoder.next().await {
            ResponseDecoderNext::More((next, item)) => {
                decoder = next;
                if let Err(e) = item {
                    return Err(match classify(e) {
                        Failure::Bad(what) => ProbeError::Bad(format!(
                            "size claim of {size} bytes does not verify: {what}"
                        )),
                        Failure::Transport(source) => {
                            ProbeError::Wire(WireError::Io { peer, source })
                        }
                    });
                }
            }
            ResponseDecoderNext::Done(_) => break,
        }
    }
    Ok(size)
}

/// Why a size probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Wire(WireError),
    #[error("{0}")]
    Bad(String),
}

enum Failure {
    /// The peer sent bytes that do not verify.
    Bad(String),
    /// The stream broke or ended early.
    Transport(io::Error),
}

fn classify(e: bao_tree::io::DecodeError) -> Failure {
    use bao_tree::io::DecodeError as D;
    match e {
        D::LeafHashMismatch(c) => Failure::Bad(format!(
            "16 KiB group at byte {} does not match the hash",
            c.to_bytes()
        )),
        D::ParentHashMismatch(n) => Failure::Bad(format!(
            "proof node for chunks {:?} does not match the hash",
            n.chunk_range()
        )),
        D::LeafNotFound(c) => Failure::Transport(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("stream ended before the group at byte {}", c.to_bytes()),
        )),
        D::ParentNotFound(_) => Failure::Transport(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "stream ended inside the proof",
        )),
        D::Io(e) => Failure::Transport(e),
    }
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

/// Reads the bao encoding of `ranges` from `reader`, verifying each parent
/// pair and each 16 KiB group against the partial blob's root as it
/// arrives, and writes only what verified. Stops at the first failure,
/// keeping everything verified before it.
pub async fn decode_into<R: AsyncStreamReader>(
    partial: &Partial,
    ranges: &ChunkRanges,
    reader: R,
) -> Result<DecodeStats, DecodeFailure> {
    let mut stats = DecodeStats::default();
    let mut decoder = ResponseDecoder::new(
        root_of(&partial.cid()),
        ranges.clone(),
        partial.tree(),
        reader,
    );
    debug_assert_eq!(partial.tree().block_size(), BLOCK_SIZE);
    loop {
        match decoder.next().await {
            ResponseDecoderNext::More((next, item)) => {
                decoder = next;
                match item {
                    Ok(BaoContentItem::Parent(p)) => partial
                        .save_verified_parent(p.node, &p.pair)
                        .map_err(|source| DecodeFailure::Local { source, stats })?,
                    Ok(BaoContentItem::Leaf(leaf)) => {
                        partial
                            .write_verified_leaf(leaf.offset, &leaf.data)
                            .map_err(|source| DecodeFailure::Local { source, stats })?;
                        stats.data_bytes += leaf.data.len() as u64;
                    }
                    Err(e) => {
                        return Err(match classify(e) {
                            Failure::Bad(what) => DecodeFailure::Corrupt { what, stats },
                            Failure::Transport(source) => {
                                DecodeFailure::Transport { source, stats }
                            }
                        });
                    }
                }
            }
            ResponseDecoderNext::Done(_) => return Ok(stats),
        }
    }
}

/// An [`AsyncStreamReader`] over a libp2p stream (or any `AsyncRead`) that
/// counts the bytes it reads.
pub struct CountingReader<S> {
    inner: S,
    buf: BytesMut,
    /// Bytes read from `inner` so far.
    pub read: u64,
    eof: bool,
}

const READ_PIECE: usize = 128 * 1024;

impl<S: AsyncRead + Unpin> CountingReader<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(READ_PIECE),
            read: 0,
            eof: false,
        }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Reads until `want` bytes are buffered or the stream ends.
    async fn fill(&mut self, want: usize) -> io::Result<()> {
        while self.buf.len() < want && !self.eof {
            let old = self.buf.len();
            let grow = READ_PIECE.max(want - old);
            self.buf.resize(old + grow, 0);
            let n = match self.inner.read(&mut self.buf[old..]).await {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(e);
                }
            };
            self.buf.truncate(old + n);
            self.read += n as u64;
            if n == 0 {
                self.eof = true;
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncStreamReader for CountingReader<S> {
    async fn read_bytes(&mut self, len: usize) -> io::Result<Bytes> {
        self.fill(len).await?;
        let n = len.min(self.buf.len());
        Ok(self.buf.split_to(n).freeze())
    }

    async fn read<const L: usize>(&mut self) -> io::Result<[u8; L]> {
        self.fill(L).await?;
        if self.buf.len() < L {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut out = [0u8; L];
        out.copy_from_slice(&self.buf.split_to(L));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bao_tree::io::outboard::PostOrderMemOutboard;

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
