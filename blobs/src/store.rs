//! The blob store: verified, atomic, resumable, with a quota.
//!
//! Layout under the store's directory:
//!
//! ```text
//! data/<cid>            the blob's bytes (visible = complete and verified)
//! data/<cid>.obao4      its outboard: post-order BLAKE3 hash pairs of the bao
//!                       tree with 16 KiB chunk groups (size = data length)
//! partial/<cid>.data    a download in progress (sparse, full length)
//! partial/<cid>.obao4   its outboard so far (hash pairs arrive with proofs)
//! tmp/                  imports being written; emptied at open
//! ```
//!
//! * **Nothing unverified is visible.** An import is hashed while it is
//!   written to `tmp/`, compared with the expected CID, synced and renamed
//!   into `data/` (outboard first, then data: `data/<cid>` appearing is the
//!   commit). A download writes only groups whose bao proof checked out, and
//!   is renamed into `data/` once every group is there.
//! * **Resumable.** What a partial download holds is recomputed at open
//!   from its outboard and data (bao validation from the root hash), so a
//!   crash can never make an unverified byte count as verified.
//! * **Quota.** With a quota, room for an import or download is reserved
//!   up front by evicting least-recently-used blobs (and stale partial
//!   downloads); a pinned blob ([`Store::pin`]) is never evicted. Access times
//!   live in memory and in the outboard file's mtime, so LRU order survives a
//!   restart.
//! * **Disk full** is [`StoreError::DiskFull`]; the temporary files are
//!   removed, so the store stays as it was.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bao_tree::io::outboard::PostOrderOutboard;
use bao_tree::io::sync::{Outboard, ReadAt, WriteAt, outboard_post_order, valid_ranges};
use bao_tree::{BaoTree, ChunkNum, ChunkRanges, TreeNode};
use kiln_protocol::ContentId;
use kiln_protocol::content::RAW_CODEC;

use crate::{BLOCK_SIZE, all_chunks, outboard_size, root_of, tree};

const OUTBOARD_EXT: &str = "obao4";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "content mismatch: expected {expected}, but the bytes hash to {actual}; nothing was stored"
    )]
    Mismatch {
        expected: ContentId,
        actual: ContentId,
    },
    #[error(
        "disk full while writing {path}: {source}; free space on that filesystem or lower the \
         blob store's quota (nothing partial was stored)"
    )]
    DiskFull { path: PathBuf, source: io::Error },
    #[error(
        "the store is full: {used} of its {quota} bytes are in use and {need} more were asked \
         for; nothing is evicted here (it is other people's data): the operator raises the quota \
         (`kiln-coordinator --blob-quota`) or buyers free space (`kiln data rm`)"
    )]
    Full { need: u64, quota: u64, used: u64 },
    #[error(
        "the blob store quota of {quota} bytes cannot make room for {need} more bytes: \
         {used} are in use, {pinned} of them pinned by running jobs; raise the quota or wait for \
         jobs to finish"
    )]
    Quota {
        need: u64,
        quota: u64,
        used: u64,
        pinned: u64,
    },
    #[error("the source ended after {got} of the declared {declared} bytes")]
    Truncated { got: u64, declared: u64 },
    #[error("the source has more than the declared {declared} bytes")]
    TooLong { declared: u64 },
    #[error("{cid} is pinned by a running job and cannot be removed")]
    Pinned { cid: ContentId },
    #[error("blob {cid} on disk does not match its id (disk corruption?); it was removed")]
    Corrupt { cid: ContentId },
    #[error(
        "a partial download of {cid} has {existing} bytes, not {size}; it was discarded, retry"
    )]
    SizeConflict {
        cid: ContentId,
        existing: u64,
        size: u64,
    },
    #[error("the partial download of {cid} is not complete ({have} of {size} bytes verified)")]
    Incomplete {
        cid: ContentId,
        have: u64,
        size: u64,
    },
    #[error("blob store I/O error at {path}: {source}; check permissions and the disk")]
    Io { path: PathBuf, source: io::Error },
}

fn is_disk_full(e: &io::Error) -> bool {
    // ENOSPC 28, EDQUOT 122 on Linux.
    e.kind() == io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(28) | Some(122))
}

/// Maps an I/O error on `path`, telling disk-full apart.
pub(crate) fn io_err(path: &Path, source: io::Error) -> StoreError {
    if is_disk_full(&source) {
        StoreError::DiskFull {
            path: path.to_path_buf(),
            source,
        }
    } else {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Store settings.
#[derive(Clone, Debug, Default)]
pub struct StoreConfig {
    /// Most bytes on disk (blobs, outboards, partial downloads); `None` for
    /// no limit.
    pub quota: Option<u64>,
    /// Skip `fsync` before a blob becomes visible (tests and benchmarks of a
    /// throw-away store only).
    pub no_sync: bool,
    /// What a full store does to make room.
    pub evict: Eviction,
}

/// How a store with a quota makes room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Eviction {
    /// Evict least-recently-used unpinned blobs: a cache, whose content
    /// can be fetched again (a provider's input cache).
    #[default]
    Lru,
    /// Never evict: refuse what does not fit. For a store that is the
    /// only copy of other people's data (the coordinator's uploads and
    /// job outputs), where one party's upload must not erase another's.
    Never,
}

/// One stored blob, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub cid: ContentId,
    pub size: u64,
    pub last_access: SystemTime,
    pub pinned: bool,
}

/// Space accounting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes on disk for complete blobs and their outboards.
    pub blobs: u64,
    /// Bytes reserved by partial downloads.
    pub partials: u64,
    /// Bytes reserved by imports in progress.
    pub reserved: u64,
    /// Bytes of pinned complete blobs.
    pub pinned: u64,
    pub quota: Option<u64>,
    pub count: usize,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    size: u64,
    /// Unix milliseconds.
    last_access: u64,
}

impl Entry {
    fn disk(&self) -> u64 {
        disk_bytes(self.size)
    }
}

/// Bytes a blob of `size` takes on disk with its outboard.
pub fn disk_bytes(size: u64) -> u64 {
    size + outboard_size(size)
}

#[derive(Default)]
struct State {
    blobs: HashMap<ContentId, Entry>,
    partials: HashMap<ContentId, Entry>,
    pins: HashMap<ContentId, usize>,
    reserved: u64,
    fetch_locks: HashMap<ContentId, Arc<tokio::sync::Mutex<()>>>,
    clock: u64,
}

impl State {
    fn used(&self) -> u64 {
        self.blobs.values().map(Entry::disk).sum::<u64>()
            + self.partials.values().map(Entry::disk).sum::<u64>()
            + self.reserved
    }

    fn pinned_bytes(&self) -> u64 {
        self.blobs
            .iter()
            .filter(|(c, _)| self.pins.contains_key(c))
            .map(|(_, e)| e.disk())
            .sum()
    }

    fn partial_busy(&self, cid: &ContentId) -> bool {
        self.fetch_locks
            .get(cid)
            .is_some_and(|l| l.try_lock().is_err())
    }

    /// A strictly increasing clock in milliseconds (LRU ties are broken by
    /// order of access).
    fn tick(&mut self) -> u64 {
        let now = now_ms().max(self.clock + 1);
        self.clock = now;
        now
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn mtime_ms(path: &Path) -> u64 {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Inner {
    root: PathBuf,
    config: StoreConfig,
    state: Mutex<State>,
}

/// The blob store. Cheap to clone; all clones share one state. Methods do
/// blocking file I/O: call the heavy ones (imports) from `spawn_blocking`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

/// Keeps a blob from being evicted or removed while it lives (a running
/// job's inputs and outputs). Pinning a CID not yet stored protects it from
/// the moment it arrives.
#[must_use = "the pin ends when the guard is dropped"]
pub struct PinGuard {
    store: Store,
    cid: ContentId,
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinGuard({:?})", self.cid)
    }
}

impl PinGuard {
    pub fn cid(&self) -> ContentId {
        self.cid
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut st = self.store.state();
        if let Some(n) = st.pins.get_mut(&self.cid) {
            *n -= 1;
            if *n == 0 {
                st.pins.remove(&self.cid);
            }
        }
    }
}

/// Room reserved under the quota for an import in progress.
struct Reservation {
    store: Store,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = self.store.state();
        st.reserved = st.reserved.saturating_sub(self.bytes);
    }
}

/// Exclusive right to write one CID's partial download (held by a fetch).
pub struct PartialLock {
    cid: ContentId,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl std::fmt::Debug for PartialLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PartialLock({:?})", self.cid)
    }
}

/// A temporary file removed on drop unless it was committed.
struct TmpFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Store {
    /// Opens (creating) a store at `dir`: empties `tmp/`, rebuilds the index
    /// from `data/` and `partial/`, removes leftovers of interrupted commits.
    pub fn open_dir(dir: &Path, config: StoreConfig) -> Result<Self, StoreError> {
        for d in ["data", "partial", "tmp"] {
            let p = dir.join(d);
            fs::create_dir_all(&p).map_err(|e| io_err(&p, e))?;
        }
        let store = Self {
            inner: Arc::new(Inner {
                root: dir.to_path_buf(),
                config,
                state: Mutex::new(State::default()),
            }),
        };
        let tmp = dir.join("tmp");
        for e in fs::read_dir(&tmp).map_err(|e| io_err(&tmp, e))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        store.scan_data()?;
        store.scan_partials()?;
        Ok(store)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn root_dir(&self) -> &Path {
        &self.inner.root
    }

    fn data_path(&self, cid: &ContentId) -> PathBuf {
        self.inner.root.join("data").join(cid.to_string())
    }

    fn outboard_path(&self, cid: &ContentId) -> PathBuf {
        self.inner
            .root
            .join("data")
            .join(format!("{cid}.{OUTBOARD_EXT}"))
    }

    fn partial_data_path(&self, cid: &ContentId) -> PathBuf {
        self.inner.root.join("partial").join(format!("{cid}.data"))
    }

    fn partial_outboard_path(&self, cid: &ContentId) -> PathBuf {
        self.inner
            .root
            .join("partial")
            .join(format!("{cid}.{OUTBOARD_EXT}"))
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        self.inner
            .root
            .join("tmp")
            .join(format!("{}.{what}", kiln_protocol::Nonce::random()))
    }

    fn scan_data(&self) -> Result<(), StoreError> {
        let dir = self.inner.root.join("data");
        let mut found = Vec::new();
        let mut outboards = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(&format!(".{OUTBOARD_EXT}")) {
                outboards.push((stem.to_string(), e.path()));
            } else if let Ok(cid) = name.parse::<ContentId>() {
                found.push(cid);
            } else {
                tracing::warn!(file = %e.path().display(), "ignoring a stray file in the blob store");
            }
        }
        for cid in found {
            let data = self.data_path(&cid);
            let size = fs::metadata(&data).map_err(|e| io_err(&data, e))?.len();
            let ob = self.outboard_path(&cid);
            let ok = fs::metadata(&ob).is_ok_and(|m| m.len() == outboard_size(size));
            if !ok && !self.rebuild_outboard(&cid, size)? {
                continue;
            }
            let last_access = mtime_ms(&ob);
            self.state().blobs.insert(cid, Entry { size, last_access });
        }
        for (stem, path) in outboards {
            let has_data = stem
                .parse::<ContentId>()
                .is_ok_and(|c| self.state().blobs.contains_key(&c));
            if !has_data {
                let _ = fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// Recomputes a missing or torn outboard; removes the blob if its bytes
    /// do not match its id. Returns whether the blob is kept.
    fn rebuild_outboard(&self, cid: &ContentId, size: u64) -> Result<bool, StoreError> {
        let data = self.data_path(cid);
        let tmp = TmpFile {
            path: self.tmp_path(OUTBOARD_EXT),
            keep: false,
        };
        let f = File::open(&data).map_err(|e| io_err(&data, e))?;
        let out = File::create(&tmp.path).map_err(|e| io_err(&tmp.path, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, out);
        let root =
            outboard_post_order(io::BufReader::with_capacity(1 << 20, f), tree(size), &mut w)
                .map_err(|e| io_err(&data, e))?;
        w.flush().map_err(|e| io_err(&tmp.path, e))?;
        if root.as_bytes() != &cid.digest() {
            tracing::warn!(%cid, "blob bytes do not match their id; removing it");
            let _ = fs::remove_file(&data);
            return Ok(false);
        }
        let ob = self.outboard_path(cid);
        fs::rename(&tmp.path, &ob).map_err(|e| io_err(&ob, e))?;
        Ok(true)
    }

    fn scan_partials(&self) -> Result<(), StoreError> {
        let dir = self.inner.root.join("partial");
        for e in fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((stem, ext)) = name.rsplit_once('.') else {
                continue;
            };
            let Ok(cid) = stem.parse::<ContentId>() else {
                let _ = fs::remove_file(e.path());
                continue;
            };
            let complete = self.state().blobs.contains_key(&cid);
            let data = self.partial_data_path(&cid);
            let ob = self.partial_outboard_path(&cid);
            if complete || !data.is_file() || !ob.is_file() {
                // Finished elsewhere, or half of a pair: useless.
                let _ = fs::remove_file(e.path());
                continue;
            }
            if ext == "data" {
                let size = fs::metadata(&data).map_err(|e| io_err(&data, e))?.len();
                let last_access = mtime_ms(&data);
                self.state()
                    .partials
                    .insert(cid, Entry { size, last_access });
            }
        }
        Ok(())
    }

    /// Whether the complete blob is stored.
    pub fn has(&self, cid: &ContentId) -> bool {
        self.state().blobs.contains_key(cid)
    }

    /// The size of a stored blob.
    pub fn size(&self, cid: &ContentId) -> Option<u64> {
        self.state().blobs.get(cid).map(|e| e.size)
    }

    /// The path of a stored blob's bytes (for read-only mounts; pin it for as
    /// long as the path is in use).
    pub fn path(&self, cid: &ContentId) -> Option<PathBuf> {
        self.has(cid).then(|| self.data_path(cid))
    }

    /// Every stored blob, sorted by CID.
    pub fn list(&self) -> Vec<BlobInfo> {
        let st = self.state();
        let mut v: Vec<_> = st
            .blobs
            .iter()
            .map(|(cid, e)| BlobInfo {
                cid: *cid,
                size: e.size,
                last_access: UNIX_EPOCH + Duration::from_millis(e.last_access),
                pinned: st.pins.contains_key(cid),
            })
            .collect();
        v.sort_by_key(|b| b.cid);
        v
    }

    /// Partial downloads: (cid, size).
    pub fn partials(&self) -> Vec<(ContentId, u64)> {
        let mut v: Vec<_> = self
            .state()
            .partials
            .iter()
            .map(|(c, e)| (*c, e.size))
            .collect();
        v.sort();
        v
    }

    pub fn usage(&self) -> Usage {
        let st = self.state();
        Usage {
            blobs: st.blobs.values().map(Entry::disk).sum(),
            partials: st.partials.values().map(Entry::disk).sum(),
            reserved: st.reserved,
            pinned: st.pinned_bytes(),
            quota: self.inner.config.quota,
            count: st.blobs.len(),
        }
    }

    /// Pins `cid` (stored or not yet) until the guard is dropped.
    pub fn pin(&self, cid: &ContentId) -> PinGuard {
        *self.state().pins.entry(*cid).or_insert(0) += 1;
        PinGuard {
            store: self.clone(),
            cid: *cid,
        }
    }

    pub fn is_pinned(&self, cid: &ContentId) -> bool {
        self.state().pins.contains_key(cid)
    }

    fn touch(&self, cid: &ContentId) {
        let mut st = self.state();
        let now = st.tick();
        if let Some(e) = st.blobs.get_mut(cid) {
            e.last_access = now;
            drop(st);
            // Persist the access time for LRU order across restarts.
            if let Ok(f) = File::options().write(true).open(self.outboard_path(cid)) {
                let _ = f.set_modified(UNIX_EPOCH + Duration::from_millis(now));
            }
        }
    }

    /// Reserves `need` bytes under the quota, evicting least-recently-used
    /// unpinned blobs (then stale partial downloads) if needed. Nothing is
    /// evicted when even evicting everything evictable would not suffice.
    fn reserve(&self, need: u64) -> Result<Reservation, StoreError> {
        self.make_room(need)?;
        Ok(Reservation {
            store: self.clone(),
            bytes: need,
        })
    }

    /// Grows a reservation by `more` bytes (evicting as [`Self::reserve`]).
    fn grow(&self, r: &mut Reservation, more: u64) -> Result<(), StoreError> {
        self.make_room(more)?;
        r.bytes += more;
        Ok(())
    }

    fn make_room(&self, need: u64) -> Result<(), StoreError> {
        let mut st = self.state();
        if let Some(quota) = self.inner.config.quota {
            let used = st.used();
            if used + need > quota && self.inner.config.evict == Eviction::Never {
                return Err(StoreError::Full { need, quota, used });
            }
            if used + need > quota {
                let mut victims: Vec<(u64, bool, ContentId, u64)> = st
                    .blobs
                    .iter()
                    .filter(|(c, _)| !st.pins.contains_key(c))
                    .map(|(c, e)| (e.last_access, true, *c, e.disk()))
                    .chain(
                        st.partials
                            .iter()
                            .filter(|(c, _)| !st.pins.contains_key(c) && !st.partial_busy(c))
                            .map(|(c, e)| (e.last_access, false, *c, e.disk())),
                    )
                    .collect();
                let evictable: u64 = victims.iter().map(|v| v.3).sum();
                if used - evictable + need > quota {
                    return Err(StoreError::Quota {
                        need,
                        quota,
                        used,
                        pinned: st.pinned_bytes(),
                    });
                }
                // Complete blobs first (oldest first), stale partials after.
                victims.sort_by_key(|v| (!v.1, v.0));
                let mut used = used;
                for (_, complete, cid, bytes) in victims {
                    if used + need <= quota {
                        break;
                    }
                    if complete {
                        st.blobs.remove(&cid);
                        let _ = fs::remove_file(self.data_path(&cid));
                        let _ = fs::remove_file(self.outboard_path(&cid));
                        tracing::info!(%cid, bytes, "evicted least recently used blob");
                    } else {
                        st.partials.remove(&cid);
                        let _ = fs::remove_file(self.partial_data_path(&cid));
                        let _ = fs::remove_file(self.partial_outboard_path(&cid));
                        tracing::info!(%cid, bytes, "evicted a stale partial download");
                    }
                    used -= bytes;
                }
            }
        }
        st.reserved += need;
        Ok(())
    }

    /// Stores `bytes` under their raw CID.
    pub fn import_bytes(&self, bytes: &[u8]) -> Result<ContentId, StoreError> {
        self.import_reader(bytes, Some(bytes.len() as u64), None)
    }

    /// Stores the bytes of a file under their raw CID (streamed: one read,
    /// hashed while copied).
    pub fn import_file(&self, path: &Path) -> Result<ContentId, StoreError> {
        let f = File::open(path).map_err(|e| io_err(path, e))?;
        let size = f.metadata().map_err(|e| io_err(path, e))?.len();
        self.import_reader(io::BufReader::with_capacity(1 << 20, f), Some(size), None)
    }

    /// Stores what `reader` yields, streamed: hashed (with its outboard) as
    /// it is written to `tmp/`, then renamed into place. With `size`, the
    /// reader must yield exactly that many bytes. With `expected`, bytes that
    /// do not hash to it are refused with both CIDs and nothing is stored.
    pub fn import_reader(
        &self,
        mut reader: impl Read,
        size: Option<u64>,
        expected: Option<ContentId>,
    ) -> Result<ContentId, StoreError> {
        if let Some(cid) = expected
            && self.has(&cid)
        {
            self.touch(&cid);
            return Ok(cid);
        }
        let codec = expected.map_or(RAW_CODEC, |c| c.codec());
        let data_tmp = TmpFile {
            path: self.tmp_path("data"),
            keep: false,
        };
        let ob_tmp = TmpFile {
            path: self.tmp_path(OUTBOARD_EXT),
            keep: false,
        };
        let (size, root, _reservation) = match size {
            Some(size) => {
                let reservation = self.reserve(disk_bytes(size))?;
                let f = File::create(&data_tmp.path).map_err(|e| io_err(&data_tmp.path, e))?;
                let mut tee = Tee {
                    inner: (&mut reader).take(size),
                    out: BufWriter::with_capacity(1 << 20, f),
                    read: 0,
                    write_err: None,
                };
                let ob = File::create(&ob_tmp.path).map_err(|e| io_err(&ob_tmp.path, e))?;
                let mut ob = BufWriter::with_capacity(1 << 20, ob);
                let res = outboard_post_order(&mut tee, tree(size), &mut ob);
                let Tee {
                    out: data_out,
                    read: got,
                    write_err,
                    ..
                } = tee;
                if let Some(e) = write_err {
                    return Err(io_err(&data_tmp.path, e));
                }
                let root = match res {
                    Ok(root) => root,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Err(StoreError::Truncated {
                            got,
                            declared: size,
                        });
                    }
                    Err(e) if is_disk_full(&e) => return Err(io_err(&ob_tmp.path, e)),
                    Err(e) => {
                        return Err(StoreError::Io {
                            path: PathBuf::from("<import source>"),
                            source: e,
                        });
                    }
                };
                let mut extra = [0u8; 1];
                if reader.read(&mut extra).map_err(|e| StoreError::Io {
                    path: PathBuf::from("<import source>"),
                    source: e,
                })? > 0
                {
                    return Err(StoreError::TooLong { declared: size });
                }
                finish(data_out, &data_tmp.path, self.inner.config.no_sync)?;
                finish(ob, &ob_tmp.path, self.inner.config.no_sync)?;
                (size, root, reservation)
            }
            None => {
                // Unknown length: copy, reserving as it grows, then hash.
                let mut reservation = self.reserve(0)?;
                let f = File::create(&data_tmp.path).map_err(|e| io_err(&data_tmp.path, e))?;
                let mut out = BufWriter::with_capacity(1 << 20, f);
                let mut buf = vec![0u8; 1 << 20];
                let mut size = 0u64;
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            return Err(StoreError::Io {
                                path: PathBuf::from("<import source>"),
                                source: e,
                            });
                        }
                    };
                    self.grow(
                        &mut reservation,
                        disk_bytes(size + n as u64) - disk_bytes(size),
                    )?;
                    out.write_all(&buf[..n])
                        .map_err(|e| io_err(&data_tmp.path, e))?;
                    size += n as u64;
                }
                finish(out, &data_tmp.path, self.inner.config.no_sync)?;
                let f = File::open(&data_tmp.path).map_err(|e| io_err(&data_tmp.path, e))?;
                let ob = File::create(&ob_tmp.path).map_err(|e| io_err(&ob_tmp.path, e))?;
                let mut ob = BufWriter::with_capacity(1 << 20, ob);
                let root = outboard_post_order(
                    io::BufReader::with_capacity(1 << 20, f),
                    tree(size),
                    &mut ob,
                )
                .map_err(|e| io_err(&ob_tmp.path, e))?;
                finish(ob, &ob_tmp.path, self.inner.config.no_sync)?;
                (size, root, reservation)
            }
        };
        let actual = ContentId::from_blake3(codec, root);
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(StoreError::Mismatch { expected, actual });
        }
        self.commit(&actual, size, data_tmp, ob_tmp)?;
        Ok(actual)
    }

    /// Renames verified, synced temporaries into `data/` (outboard first:
    /// the data file appearing is the commit).
    fn commit(
        &self,
        cid: &ContentId,
        size: u64,
        mut data_tmp: TmpFile,
        mut ob_tmp: TmpFile,
    ) -> Result<(), StoreError> {
        let mut st = self.state();
        if st.blobs.contains_key(cid) {
            return Ok(()); // the temporaries are removed on drop
        }
        let ob = self.outboard_path(cid);
        fs::rename(&ob_tmp.path, &ob).map_err(|e| io_err(&ob, e))?;
        ob_tmp.keep = true;
        let data = self.data_path(cid);
        if let Err(e) = fs::rename(&data_tmp.path, &data) {
            let _ = fs::remove_file(&ob);
            return Err(io_err(&data, e));
        }
        data_tmp.keep = true;
        self.sync_dir("data");
        let now = st.tick();
        st.blobs.insert(
            *cid,
            Entry {
                size,
                last_access: now,
            },
        );
        // A finished partial of the same blob is now useless.
        if st.partials.remove(cid).is_some() {
            let _ = fs::remove_file(self.partial_data_path(cid));
            let _ = fs::remove_file(self.partial_outboard_path(cid));
        }
        Ok(())
    }

    fn sync_dir(&self, sub: &str) {
        if !self.inner.config.no_sync
            && let Ok(d) = File::open(self.inner.root.join(sub))
        {
            let _ = d.sync_all();
        }
    }

    /// Opens a stored blob for reading (marks it used for LRU).
    pub fn open(&self, cid: &ContentId) -> Result<Option<Blob>, StoreError> {
        let Some(size) = self.size(cid) else {
            return Ok(None);
        };
        let path = self.data_path(cid);
        let data = match File::open(&path) {
            Ok(f) => f,
            // Evicted or removed between the lookup and the open.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path, e)),
        };
        let obp = self.outboard_path(cid);
        let ob = match File::open(&obp) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&obp, e)),
        };
        self.touch(cid);
        Ok(Some(Blob {
            cid: *cid,
            path,
            data,
            outboard: PostOrderOutboard {
                root: root_of(cid),
                tree: tree(size),
                data: ob,
            },
        }))
    }

    /// Reads a whole blob, re-verifying it (a blob corrupted on disk is
    /// removed and reported, never returned).
    pub fn get(&self, cid: &ContentId) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(blob) = self.open(cid)? else {
            return Ok(None);
        };
        let mut bytes = vec![0u8; blob.size() as usize];
        FileExt::read_exact_at(&blob.data, &mut bytes, 0).map_err(|e| io_err(&blob.path, e))?;
        if blake3::hash(&bytes).as_bytes() != &cid.digest() {
            drop(blob);
            self.quarantine(cid);
            return Err(StoreError::Corrupt { cid: *cid });
        }
        Ok(Some(bytes))
    }

    /// Re-verifies a stored blob against its id; a corrupted one is removed.
    pub fn verify(&self, cid: &ContentId) -> Result<bool, StoreError> {
        let Some(blob) = self.open(cid)? else {
            return Ok(false);
        };
        if blob.verify().map_err(|e| io_err(&blob.path, e))? {
            Ok(true)
        } else {
            drop(blob);
            self.quarantine(cid);
            Err(StoreError::Corrupt { cid: *cid })
        }
    }

    fn quarantine(&self, cid: &ContentId) {
        tracing::error!(%cid, "stored blob does not match its id; removing it");
        self.state().blobs.remove(cid);
        let _ = fs::remove_file(self.data_path(cid));
        let _ = fs::remove_file(self.outboard_path(cid));
    }

    /// Removes a blob (and any partial download of it) unless pinned.
    pub fn remove(&self, cid: &ContentId) -> Result<bool, StoreError> {
        let mut st = self.state();
        if st.pins.contains_key(cid) {
            return Err(StoreError::Pinned { cid: *cid });
        }
        let had = st.blobs.remove(cid).is_some();
        if had {
            let _ = fs::remove_file(self.data_path(cid));
            let _ = fs::remove_file(self.outboard_path(cid));
        }
        if !st.partial_busy(cid) && st.partials.remove(cid).is_some() {
            let _ = fs::remove_file(self.partial_data_path(cid));
            let _ = fs::remove_file(self.partial_outboard_path(cid));
        }
        Ok(had)
    }

    /// Waits for the exclusive right to download `cid` into `partial/`.
    pub async fn lock_partial(&self, cid: &ContentId) -> PartialLock {
        let lock = self.state().fetch_locks.entry(*cid).or_default().clone();
        PartialLock {
            cid: *cid,
            _guard: lock.lock_owned().await,
        }
    }

    /// Bytes of `cid` already verified in `partial/` (0 if none).
    pub fn partial_size(&self, cid: &ContentId) -> Option<u64> {
        self.state().partials.get(cid).map(|e| e.size)
    }

    /// Opens (or creates, reserving its room) the partial download of the
    /// locked CID with a size already verified by the caller. An existing one
    /// is re-validated from its root hash: only groups whose proof checks out
    /// count as present.
    pub fn partial(&self, lock: &PartialLock, size: u64) -> Result<Arc<Partial>, StoreError> {
        let cid = lock.cid;
        let data_path = self.partial_data_path(&cid);
        let ob_path = self.partial_outboard_path(&cid);
        let existing = self.state().partials.get(&cid).map(|e| e.size);
        match existing {
            Some(s) if s != size => {
                self.state().partials.remove(&cid);
                let _ = fs::remove_file(&data_path);
                let _ = fs::remove_file(&ob_path);
                Err(StoreError::SizeConflict {
                    cid,
                    existing: s,
                    size,
                })
            }
            Some(_) => {
                let open = |p: &Path| {
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(p)
                        .map_err(|e| io_err(p, e))
                };
                let data = open(&data_path)?;
                let ob = open(&ob_path)?;
                let partial = Partial::new(cid, size, data, ob);
                let verified = partial.validate().map_err(|e| io_err(&data_path, e))?;
                *partial.verified_mut() = verified;
                Ok(Arc::new(partial))
            }
            None => {
                let reservation = self.reserve(disk_bytes(size))?;
                let create = |p: &Path| {
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(p)
                        .map_err(|e| io_err(p, e))
                };
                let data = create(&data_path)?;
                let ob = create(&ob_path)?;
                // Sparse: the length is the size, holes read as zeros.
                if let Err(e) = data.set_len(size) {
                    let _ = fs::remove_file(&data_path);
                    let _ = fs::remove_file(&ob_path);
                    return Err(io_err(&data_path, e));
                }
                let mut st = self.state();
                let now = st.tick();
                st.partials.insert(
                    cid,
                    Entry {
                        size,
                        last_access: now,
                    },
                );
                drop(st);
                drop(reservation); // now accounted as a partial
                Ok(Arc::new(Partial::new(cid, size, data, ob)))
            }
        }
    }

    /// Makes a complete partial download visible: synced, then renamed into
    /// `data/` (outboard first). Refused unless every group was verified.
    pub fn finalize(&self, lock: &PartialLock, partial: &Partial) -> Result<(), StoreError> {
        let cid = lock.cid;
        if partial.cid != cid {
            return Err(StoreError::Incomplete {
                cid,
                have: 0,
                size: partial.size(),
            });
        }
        if !partial.is_complete() {
            return Err(StoreError::Incomplete {
                cid,
                have: partial.verified_bytes(),
                size: partial.size(),
            });
        }
        let data_path = self.partial_data_path(&cid);
        let ob_path = self.partial_outboard_path(&cid);
        if !self.inner.config.no_sync {
            partial.data.sync_all().map_err(|e| io_err(&data_path, e))?;
            partial
                .outboard
                .sync_all()
                .map_err(|e| io_err(&ob_path, e))?;
        }
        // Outboard files of tiny blobs have no pairs; make the length exact.
        partial
            .outboard
            .set_len(outboard_size(partial.size()))
            .map_err(|e| io_err(&ob_path, e))?;
        let mut st = self.state();
        if st.blobs.contains_key(&cid) {
            st.partials.remove(&cid);
            let _ = fs::remove_file(&data_path);
            let _ = fs::remove_file(&ob_path);
            return Ok(());
        }
        let ob = self.outboard_path(&cid);
        fs::rename(&ob_path, &ob).map_err(|e| io_err(&ob, e))?;
        let data = self.data_path(&cid);
        if let Err(e) = fs::rename(&data_path, &data) {
            let _ = fs::rename(&ob, &ob_path);
            return Err(io_err(&data, e));
        }
        self.sync_dir("data");
        st.partials.remove(&cid);
        let now = st.tick();
        st.blobs.insert(
            cid,
            Entry {
                size: partial.size(),
                last_access: now,
            },
        );
        Ok(())
    }
}

fn finish(mut w: BufWriter<File>, path: &Path, no_sync: bool) -> Result<(), StoreError> {
    w.flush().map_err(|e| io_err(path, e))?;
    let f = w.into_inner().map_err(|e| io_err(path, e.into_error()))?;
    if !no_sync {
        f.sync_all().map_err(|e| io_err(path, e))?;
    }
    Ok(())
}

/// Copies what is read into `out`, remembering a write error separately
/// (so a full disk is told apart from a failing source).
struct Tee<R, W> {
    inner: R,
    out: W,
    read: u64,
    write_err: Option<io::Error>,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Err(e) = self.out.write_all(&buf[..n]) {
            let kind = e.kind();
            self.write_err = Some(e);
            return Err(io::Error::new(kind, "writing the temporary file failed"));
        }
        self.read += n as u64;
        Ok(n)
    }
}

/// A complete stored blob, open for reading.
#[derive(Debug)]
pub struct Blob {
    cid: ContentId,
    path: PathBuf,
    data: File,
    outboard: PostOrderOutboard<File>,
}

impl Blob {
    pub fn cid(&self) -> ContentId {
        self.cid
    }

    pub fn size(&self) -> u64 {
        self.outboard.tree.size()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tree(&self) -> BaoTree {
        self.outboard.tree
    }

    /// The raw file (for positioned reads).
    pub fn data(&self) -> &File {
        &self.data
    }

    /// The outboard, for bao encoding.
    pub fn outboard(&self) -> &PostOrderOutboard<File> {
        &self.outboard
    }

    /// The open data file and outboard.
    pub fn into_parts(self) -> (File, PostOrderOutboard<File>) {
        (self.data, self.outboard)
    }

    /// Reads `len` bytes at `offset` (clipped to the blob).
    pub fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let end = (offset.saturating_add(len)).min(self.size());
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        FileExt::read_exact_at(&self.data, &mut buf, offset)?;
        Ok(buf)
    }

    /// Writes the bao encoding of `ranges` (the data re-checked against the
    /// outboard as it is read: a blob rotted on disk fails here instead of
    /// being served).
    pub fn encode_ranges(
        &self,
        ranges: &ChunkRanges,
        out: impl Write,
    ) -> Result<(), bao_tree::io::EncodeError> {
        bao_tree::io::sync::encode_ranges_validated(&self.data, &self.outboard, ranges, out)
    }

    /// Whether every byte matches the root hash.
    pub fn verify(&self) -> io::Result<bool> {
        let all = all_chunks(self.size());
        let mut got = ChunkRanges::empty();
        for r in valid_ranges(&self.outboard, &self.data, &all) {
            got |= ChunkRanges::from(r?);
        }
        if self.size() == 0 {
            return Ok(blake3::hash(&[]) == self.outboard.root);
        }
        Ok(got == all)
    }
}

/// A file shared by concurrent positioned writers.
#[derive(Clone, Debug)]
struct Shared(Arc<File>);

impl ReadAt for Shared {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        FileExt::read_at(&*self.0, buf, pos)
    }
}

impl WriteAt for Shared {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> io::Result<usize> {
        FileExt::write_at(&*self.0, buf, pos)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A download in progress: written only with verified groups, by any number
/// of concurrent decoders (one per work unit).
#[derive(Debug)]
pub struct Partial {
    cid: ContentId,
    tree: BaoTree,
    data: Arc<File>,
    outboard: Arc<File>,
    verified: Mutex<ChunkRanges>,
}

impl Partial {
    fn new(cid: ContentId, size: u64, data: File, outboard: File) -> Self {
        Self {
            cid,
            tree: BaoTree::new(size, BLOCK_SIZE),
            data: Arc::new(data),
            outboard: Arc::new(outboard),
            verified: Mutex::new(ChunkRanges::empty()),
        }
    }

    fn verified_mut(&self) -> MutexGuard<'_, ChunkRanges> {
        self.verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Recomputes what is present from the root hash down.
    fn validate(&self) -> io::Result<ChunkRanges> {
        let ob = PostOrderOutboard {
            root: root_of(&self.cid),
            tree: self.tree,
            data: Shared(self.outboard.clone()),
        };
        let all = all_chunks(self.size());
        let mut got = ChunkRanges::empty();
        for r in valid_ranges(&ob, Shared(self.data.clone()), &all) {
            got |= ChunkRanges::from(r?);
        }
        Ok(got)
    }

    pub fn cid(&self) -> ContentId {
        self.cid
    }

    pub fn size(&self) -> u64 {
        self.tree.size()
    }

    pub fn tree(&self) -> BaoTree {
        self.tree
    }

    /// Chunk ranges verified so far.
    pub fn verified(&self) -> ChunkRanges {
        self.verified_mut().clone()
    }

    /// Chunk ranges still to fetch.
    pub fn missing(&self) -> ChunkRanges {
        all_chunks(self.size()) - self.verified()
    }

    pub fn verified_bytes(&self) -> u64 {
        crate::ranges_bytes(&self.verified(), self.size())
    }

    pub fn is_complete(&self) -> bool {
        self.missing().is_empty()
    }

    /// Writes a leaf whose hash was checked against the tree (only the
    /// decoder in this crate calls this, after verification).
    pub(crate) fn write_verified_leaf(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.data.write_all_at(data, offset)?;
        let start = ChunkNum::full_chunks(offset);
        let end = ChunkNum::chunks(offset + data.len() as u64);
        *self.verified_mut() |= ChunkRanges::from(start..end);
        Ok(())
    }

    /// Saves a verified parent hash pair into the outboard.
    pub(crate) fn save_verified_parent(
        &self,
        node: TreeNode,
        pair: &(blake3::Hash, blake3::Hash),
    ) -> io::Result<()> {
        if let Some(offset) = self.tree.post_order_offset(node) {
            let mut buf = [0u8; 64];
            buf[..32].copy_from_slice(pair.0.as_bytes());
            buf[32..].copy_from_slice(pair.1.as_bytes());
            self.outboard.write_all_at(&buf, offset.value() * 64)?;
        }
        Ok(())
    }

    /// A reading view of the verified part (to serve ranges of a blob still
    /// being downloaded, or to inspect it in tests).
    pub fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let end = offset.saturating_add(len).min(self.size());
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        FileExt::read_exact_at(&*self.data, &mut buf, offset)?;
        Ok(buf)
    }

    /// The outboard path of a partial blob, for `Outboard` users.
    pub fn outboard_view(&self) -> impl Outboard + '_ {
        PostOrderOutboard {
            root: root_of(&self.cid),
            tree: self.tree,
            data: Shared(self.outboard.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    fn open(dir: &Path, quota: Option<u64>) -> Store {
        Store::open_dir(
            dir,
            StoreConfig {
                quota,
                evict: Default::default(),
                no_sync: true,
            },
        )
        .unwrap()
    }

    #[test]
    fn import_verifies_and_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path(), None);
        let data = bytes(100_000, 1);
        let cid = s.import_bytes(&data).unwrap();
        assert_eq!(cid, ContentId::of_bytes(&data));
        assert!(s.has(&cid));
        assert_eq!(s.get(&cid).unwrap().unwrap(), data);
        let blob = s.open(&cid).unwrap().unwrap();
        assert_eq!(blob.read_range(99_990, 100).unwrap(), &data[99_990..]);
        assert!(blob.verify().unwrap());
        assert_eq!(
            fs::metadata(s.outboard_path(&cid)).unwrap().len(),
            outboard_size(data.len() as u64)
        );
        // Same bytes again: a no-op.
        assert_eq!(s.import_bytes(&data).unwrap(), cid);
        assert_eq!(s.list().len(), 1);
        // A file import streams the same result.
        let f = d.path().join("in.bin");
        fs::write(&f, &data).unwrap();
        assert_eq!(s.import_file(&f).unwrap(), cid);
        // Empty blob.
        let empty = s.import_bytes(b"").unwrap();
        assert_eq!(empty, ContentId::of_bytes(b""));
        assert_eq!(s.get(&empty).unwrap().unwrap(), b"");
    }

    #[test]
    fn mismatch_names_both_cids_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path(), None);
        let want = ContentId::of_bytes(b"the right bytes");
        let e = s
            .import_reader(&b"the wrong bytes"[..], Some(15), Some(want))
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&want.to_string()), "{msg}");
        assert!(
            msg.contains(&ContentId::of_bytes(b"the wrong bytes").to_string()),
            "{msg}"
        );
        assert!(!s.has(&want));
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(d.path().join("data")).unwrap().count(), 0);
        // Unknown length takes the other path; same outcome.
        let e = s
            .import_reader(&b"the wrong bytes"[..], None, Some(want))
            .unwrap_err();
        assert!(matches!(e, StoreError::Mismatch { .. }));
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        // Wrong declared lengths.
        assert!(matches!(
            s.import_reader(&b"abc"[..], Some(4), None),
            Err(StoreError::Truncated {
                got: 3,
                declared: 4
            })
        ));
        assert!(matches!(
            s.import_reader(&b"abcde"[..], Some(4), None),
            Err(StoreError::TooLong { declared: 4 })
        ));
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn reopen_rebuilds_index_repairs_and_drops_corruption() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c);
        {
            let s = open(d.path(), None);
            a = s.import_bytes(&bytes(50_000, 1)).unwrap();
            b = s.import_bytes(&bytes(70_000, 2)).unwrap();
            c = s.import_bytes(&bytes(20_000, 3)).unwrap();
        }
        let st = Store {
            inner: Arc::new(Inner {
                root: d.path().to_path_buf(),
                config: StoreConfig::default(),
                state: Mutex::new(State::default()),
            }),
        };
        // b loses its outboard (rebuilt), c's bytes rot (removed at rebuild),
        // a stray outboard and a temp file are cleaned.
        fs::remove_file(st.outboard_path(&b)).unwrap();
        fs::remove_file(st.outboard_path(&c)).unwrap();
        fs::write(st.data_path(&c), bytes(20_000, 9)).unwrap();
        let stray = ContentId::of_bytes(b"stray");
        fs::write(st.outboard_path(&stray), b"x").unwrap();
        fs::write(d.path().join("tmp").join("junk"), b"x").unwrap();
        let s = open(d.path(), None);
        assert!(s.has(&a) && s.has(&b) && !s.has(&c));
        assert!(s.verify(&b).unwrap());
        assert!(!st.outboard_path(&stray).exists());
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        // Rot after open: get refuses and removes.
        fs::write(s.data_path(&a), bytes(50_000, 7)).unwrap();
        assert!(matches!(s.get(&a), Err(StoreError::Corrupt { .. })));
        assert!(!s.has(&a));
    }

    #[test]
    fn quota_evicts_lru_but_never_pinned() {
        let d = tempfile::tempdir().unwrap();
        let one = disk_bytes(40_000);
        let s = open(d.path(), Some(3 * one + 10));
        let blobs: Vec<_> = (0..3)
            .map(|i| s.import_bytes(&bytes(40_000, i)).unwrap())
            .collect();
        // Use blob 0 so blob 1 is the least recently used; pin blob 1.
        s.open(&blobs[0]).unwrap().unwrap();
        let pin = s.pin(&blobs[1]);
        let d3 = s.import_bytes(&bytes(40_000, 3)).unwrap();
        assert!(s.has(&blobs[1]), "pinned blob survives");
        assert!(!s.has(&blobs[2]), "oldest unpinned blob is evicted");
        assert!(s.has(&blobs[0]) && s.has(&d3));
        // Pin everything: no room, a clear error, nothing evicted.
        let _p0 = s.pin(&blobs[0]);
        let _p3 = s.pin(&d3);
        let e = s.import_bytes(&bytes(40_000, 4)).unwrap_err();
        assert!(matches!(e, StoreError::Quota { .. }), "{e}");
        assert!(e.to_string().contains("pinned"), "{e}");
        assert_eq!(s.list().len(), 3);
        assert!(matches!(
            s.remove(&blobs[1]),
            Err(StoreError::Pinned { .. })
        ));
        drop(pin);
        assert!(s.remove(&blobs[1]).unwrap());
        // Too big for the quota at all: refused without evicting.
        let e = s.import_bytes(&bytes(200_000, 5)).unwrap_err();
        assert!(matches!(e, StoreError::Quota { .. }));
        assert_eq!(s.list().len(), 2);
        assert_eq!(s.usage().reserved, 0);
    }

    #[test]
    fn a_store_that_never_evicts_refuses_what_does_not_fit_and_keeps_everything() {
        let d = tempfile::tempdir().unwrap();
        let one = disk_bytes(40_000);
        let s = Store::open_dir(
            d.path(),
            StoreConfig {
                quota: Some(2 * one + 10),
                no_sync: true,
                evict: Eviction::Never,
            },
        )
        .unwrap();
        let kept: Vec<_> = (0..2)
            .map(|i| s.import_bytes(&bytes(40_000, i)).unwrap())
            .collect();
        let e = s.import_bytes(&bytes(40_000, 2)).unwrap_err();
        assert!(matches!(e, StoreError::Full { .. }), "{e}");
        assert!(e.to_string().contains("--blob-quota"), "{e}");
        assert!(kept.iter().all(|c| s.has(c)), "nothing was evicted");
        assert_eq!(s.usage().reserved, 0);
        // Removing one makes room again.
        assert!(s.remove(&kept[0]).unwrap());
        s.import_bytes(&bytes(40_000, 2)).unwrap();
    }

    #[test]
    fn lru_order_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let one = disk_bytes(30_000);
        let (a, b);
        {
            let s = open(d.path(), None);
            a = s.import_bytes(&bytes(30_000, 1)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
            b = s.import_bytes(&bytes(30_000, 2)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
            s.open(&a).unwrap().unwrap(); // a is now the most recent
        }
        let s = open(d.path(), Some(2 * one + 10));
        s.import_bytes(&bytes(30_000, 3)).unwrap();
        assert!(s.has(&a) && !s.has(&b));
    }

    #[tokio::test]
    async fn partial_holds_only_verified_groups_and_revalidates() {
        let d = tempfile::tempdir().unwrap();
        let data = bytes(200_000, 4);
        let cid = ContentId::of_bytes(&data);
        let size = data.len() as u64;
        {
            let s = open(d.path(), None);
            let lock = s.lock_partial(&cid).await;
            let p = s.partial(&lock, size).unwrap();
            assert_eq!(p.verified_bytes(), 0);
            // Decode the first two groups from a real encoding.
            let ob = bao_tree::io::outboard::PostOrderMemOutboard::create(&data, BLOCK_SIZE);
            let ranges = crate::group_ranges(0, 32 * 1024, size);
            let mut enc = Vec::new();
            bao_tree::io::sync::encode_ranges_validated(&data[..], &ob, &ranges, &mut enc).unwrap();
            let mut sb = crate::wire::StreamBuf::new(futures::io::Cursor::new(enc));
            crate::wire::decode_into(&p, &ranges, &mut sb)
                .await
                .unwrap();
            assert_eq!(p.verified_bytes(), 32 * 1024);
            assert!(matches!(
                s.finalize(&lock, &p),
                Err(StoreError::Incomplete { .. })
            ));
            assert!(!s.has(&cid));
        }
        // Restart: the verified part is recomputed from disk.
        let s = open(d.path(), None);
        assert_eq!(s.partials(), vec![(cid, size)]);
        let lock = s.lock_partial(&cid).await;
        let p = s.partial(&lock, size).unwrap();
        assert_eq!(p.verified_bytes(), 32 * 1024);
        assert_eq!(p.read_range(0, 32 * 1024).unwrap(), &data[..32 * 1024]);
        // Rot in the partial data is caught at the next open.
        p.data.write_all_at(b"X", 100).unwrap();
        drop(p);
        let p = s.partial(&lock, size).unwrap();
        assert_eq!(p.verified_bytes(), 16 * 1024);
        // A different size for the same CID is a conflict.
        assert!(matches!(
            s.partial(&lock, size + 1),
            Err(StoreError::SizeConflict { .. })
        ));
    }

    /// ENOSPC on a real (tiny) tmpfs; needs root to mount, skipped otherwise.
    #[test]
    fn disk_full_is_a_clear_error_and_leaves_the_store_consistent() {
        let d = tempfile::tempdir().unwrap();
        let mnt = d.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mnt)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipping: cannot mount a tmpfs here (not root?)");
            return;
        }
        struct Umount(PathBuf);
        impl Drop for Umount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _u = Umount(mnt.clone());
        let s = open(&mnt, None);
        let small = s.import_bytes(&bytes(100_000, 1)).unwrap();
        let e = s.import_bytes(&bytes(2 << 20, 2)).unwrap_err();
        assert!(matches!(e, StoreError::DiskFull { .. }), "{e}");
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(fs::read_dir(mnt.join("tmp")).unwrap().count(), 0);
        assert_eq!(s.list().len(), 1);
        assert_eq!(s.usage().reserved, 0);
        assert_eq!(s.get(&small).unwrap().unwrap(), bytes(100_000, 1));
        // After a failure the store still works.
        assert!(s.import_bytes(&bytes(50_000, 3)).is_ok());
        drop(s);
        let s = open(&mnt, None);
        assert_eq!(s.list().len(), 2);
    }
}
