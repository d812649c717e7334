//! `kiln data`: datasets by content id.
//!
//! * [`add`] hashes a file or a directory locally (a directory becomes a
//!   DAG-CBOR manifest of its files), asks the coordinator which blobs it
//!   lacks, and streams only those up. The coordinator refuses bytes that do
//!   not hash to the CID they are sent under.
//! * [`get`] downloads a blob (or a whole directory manifest) through the
//!   bao endpoint: every 16 KiB group is verified against the CID as it
//!   arrives and written into a partial blob in the local cache
//!   (`<key dir>/cache`), so an interrupted download resumes with only what
//!   is missing. The file appears at its destination only once complete.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use futures::TryStreamExt;
use kiln_blobs::Store;
use kiln_blobs::wire::StreamBuf;
use kiln_protocol::content::DAG_CBOR_CODEC;
use kiln_protocol::{ContentId, Manifest, ManifestEntry};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::Client;

/// Progress on stderr (an `indicatif` bar: bytes done, total, rate and
/// time left), drawn only on a terminal and when asked for; it counts
/// either way.
#[derive(Clone)]
pub struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    /// Draws only when stderr is a terminal and `enabled`.
    pub fn new(label: impl Into<String>, total: u64, enabled: bool) -> Self {
        let bar = if enabled && std::io::stderr().is_terminal() {
            indicatif::ProgressBar::with_draw_target(
                Some(total),
                indicatif::ProgressDrawTarget::stderr_with_hz(5),
            )
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_length(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg}: {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec}, {eta} left",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label.into());
        Self { bar }
    }

    pub fn add(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Sets the total once it is known (0 until then).
    pub fn set_total_if_unknown(&self, total: u64) {
        if self.bar.length().unwrap_or(0) == 0 {
            self.bar.set_length(total);
        }
    }

    pub fn finish(&self) {
        self.bar.finish();
    }

    pub fn done(&self) -> u64 {
        self.bar.position()
    }
}

/// Bytes of the files under `dir` (0 if it does not exist).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// `1.5 MiB`.
pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// What `kiln data add` did.
#[derive(Clone, Debug, Serialize)]
pub struct AddReport {
    pub cid: ContentId,
    /// `file` or `directory`.
    pub kind: &'static str,
    pub files: usize,
    pub size: u64,
    /// Bytes sent (blobs the coordinator lacked).
    pub uploaded_bytes: u64,
    /// Bytes not sent because the coordinator already had them for you.
    pub skipped_bytes: u64,
    pub elapsed_ms: u64,
}

struct LocalFile {
    path: PathBuf,
    entry: ManifestEntry,
}

/// Hashes a file as `b3sum` would, streaming.
pub fn cid_of_file(path: &Path) -> anyhow::Result<(ContentId, u64)> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    ContentId::of_reader(kiln_protocol::content::RAW_CODEC, f)
        .with_context(|| format!("cannot read {}", path.display()))
}

/// Every regular file under `root` (symlinks are refused: a dataset is
/// what is there, not what it points at).
fn walk(root: &Path) -> anyhow::Result<Vec<LocalFile>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let e = e?;
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path
                    .strip_prefix(root)?
                    .to_str()
                    .with_context(|| format!("{} is not valid UTF-8", path.display()))?
                    .to_string();
                use std::os::unix::fs::PermissionsExt;
                let (cid, size) = cid_of_file(&path)?;
                out.push(LocalFile {
                    path,
                    entry: ManifestEntry {
                        path: rel,
                        cid,
                        size,
                        executable: meta.permissions().mode() & 0o111 != 0,
                    },
                });
            } else {
                bail!(
                    "{} is a symlink or special file; a dataset holds only regular files",
                    path.display()
                );
            }
        }
    }
    Ok(out)
}

/// Streams one file up, counting progress.
pub(crate) async fn upload_file(
    client: &Client,
    path: &Path,
    cid: &ContentId,
    size: u64,
    name: &str,
    progress: &Progress,
) -> anyhow::Result<()> {
    let f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let p = progress.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).inspect_ok(move |b| {
        p.add(b.len() as u64);
    });
    client
        .put_blob(cid, size, name, reqwest::Body::wrap_stream(stream))
        .await
        .with_context(|| format!("uploading {}", path.display()))?;
    Ok(())
}

/// `kiln data add <path>`.
pub async fn add(client: &Client, path: &Path, show_progress: bool) -> anyhow::Result<AddReport> {
    let started = Instant::now();
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    if meta.is_file() {
        let p = path.to_path_buf();
        let (cid, size) = tokio::task::spawn_blocking(move || cid_of_file(&p)).await??;
        // An empty file costs nothing to send, and sending it records it
        // under its name (its content is readable by everyone already).
        let missing = if size == 0 {
            vec![cid]
        } else {
            client.missing(&[cid]).await?
        };
        let progress = Progress::new(format!("uploading {name}"), size, show_progress);
        if !missing.is_empty() {
            upload_file(client, path, &cid, size, &name, &progress).await?;
            progress.finish();
        }
        return Ok(AddReport {
            cid,
            kind: "file",
            files: 1,
            size,
            uploaded_bytes: if missing.is_empty() { 0 } else { size },
            skipped_bytes: if missing.is_empty() { size } else { 0 },
            elapsed_ms: started.elapsed().as_millis() as u64,
        });
    }
    if !meta.is_dir() {
        bail!("{} is neither a file nor a directory", path.display());
    }
    let root = path.to_path_buf();
    let files = tokio::task::spawn_blocking(move || walk(&root)).await??;
    let manifest = Manifest::new(files.iter().map(|f| f.entry.clone()).collect())
        .context("the directory cannot be described as a manifest")?;
    let manifest_bytes = manifest.to_dag_cbor();
    let mcid = manifest.cid();
    let mut cids: Vec<ContentId> = files.iter().map(|f| f.entry.cid).collect();
    cids.push(mcid);
    let missing: std::collections::HashSet<ContentId> =
        client.missing(&cids).await?.into_iter().collect();
    let mut sent = std::collections::HashSet::new();
    let to_send: Vec<&LocalFile> = files
        .iter()
        .filter(|f| missing.contains(&f.entry.cid) && sent.insert(f.entry.cid))
        .collect();
    let upload_total: u64 = to_send.iter().map(|f| f.entry.size).sum();
    let progress = Progress::new(format!("uploading {name}"), upload_total, show_progress);
    for f in &to_send {
        let label = format!("{name}/{}", f.entry.path);
        upload_file(
            client,
            &f.path,
            &f.entry.cid,
            f.entry.size,
            &label,
            &progress,
        )
        .await?;
    }
    if missing.contains(&mcid) {
        let len = manifest_bytes.len() as u64;
        client
            .put_blob(
                &mcid,
                len,
                &format!("{name}/"),
                reqwest::Body::from(manifest_bytes),
            )
            .await
            .context("uploading the directory manifest")?;
    }
    progress.finish();
    let size = manifest.total_size();
    Ok(AddReport {
        cid: mcid,
        kind: "directory",
        files: files.len(),
        size,
        uploaded_bytes: upload_total,
        skipped_bytes: size.saturating_sub(upload_total),
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// What one verified download did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GetReport {
    pub cid: Option<ContentId>,
    pub files: usize,
    pub size: u64,
    /// Verified bytes already in the local cache (a resumed download).
    pub resumed_bytes: u64,
    /// Bytes read from the network (data and proofs).
    pub bytes_transferred: u64,
    pub elapsed_ms: u64,
}

/// The local cache of downloads (`<dir of the key>/cache`).
pub fn open_cache(key_path: &Path) -> anyhow::Result<Store> {
    let dir = key_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
        .join("cache");
    Store::open_dir(&dir, Default::default())
        .with_context(|| format!("opening the download cache at {}", dir.display()))
}

/// Counts bytes read through it.
struct Counting<R> {
    inner: R,
    n: Arc<AtomicU64>,
    progress: Option<Progress>,
}

impl<R: futures::AsyncRead + Unpin> futures::AsyncRead for Counting<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(k)) = &r {
            self.n.fetch_add(*k as u64, Ordering::Relaxed);
            if let Some(p) = &self.progress {
                p.add(*k as u64);
            }
        }
        r
    }
}

/// Downloads one blob into `cache`, verified, resuming a partial one.
/// `cancel` stops it early (what verified so far is kept).
pub async fn fetch_blob(
    client: &Client,
    cache: &Store,
    cid: ContentId,
    progress: Option<&Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<GetReport> {
    let started = Instant::now();
    let mut report = GetReport {
        cid: Some(cid),
        files: 1,
        ..GetReport::default()
    };
    if let Some(size) = cache.size(&cid) {
        report.size = size;
        report.resumed_bytes = size;
        if let Some(p) = progress {
            p.add(size);
        }
        return Ok(report);
    }
    let lock = cache.lock_partial(&cid).await;
    // The size comes from the coordinator's header; it is proven by the
    // decode (the last chunk's proof binds it), so a lie fails verification.
    let (size, first) = match cache.partial_size(&cid) {
        Some(size) => (size, None),
        None => {
            let (size, resp) = client.bao(&cid, None).await?;
            (size, Some(resp))
        }
    };
    let partial = cache.partial(&lock, size)?;
    report.size = size;
    report.resumed_bytes = partial.verified_bytes();
    if let Some(p) = progress {
        p.set_total_if_unknown(size);
        p.add(report.resumed_bytes);
    }
    if !partial.is_complete() {
        // Always include the last chunk: its proof binds the size.
        let ranges = partial.missing() | kiln_blobs::wire::last_chunk();
        let resp = match first {
            Some(resp)
                if ranges == kiln_blobs::all_chunks(size) | kiln_blobs::wire::last_chunk() =>
            {
                resp
            }
            _ => {
                let bounds = kiln_blobs::wire::ranges_to_wire(&ranges);
                client.bao(&cid, Some(&bounds)).await?.1
            }
        };
        let n = Arc::new(AtomicU64::new(0));
        let reader = Counting {
            inner: resp
                .bytes_stream()
                .map_err(std::io::Error::other)
                .into_async_read(),
            n: n.clone(),
            progress: progress.cloned(),
        };
        let mut sb = StreamBuf::new(reader);
        let decoded = tokio::select! {
            r = kiln_blobs::wire::decode_into(&partial, &ranges, &mut sb) => Some(r),
            () = cancel.cancelled() => None,
        };
        report.bytes_transferred = n.load(Ordering::Relaxed);
        match decoded {
            None => bail!(
                "download of {cid} interrupted with {} of {size} bytes verified; run the same command again to resume",
                partial.verified_bytes()
            ),
            Some(Err(e)) => bail!(
                "download of {cid} stopped: {e}; {} of {size} bytes verified are kept, run the same command again to resume",
                partial.verified_bytes()
            ),
            Some(Ok(_)) => {}
        }
    }
    cache.finalize(&lock, &partial)?;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Places a cached blob at `dest`: a copy (a hard link would let an edit
/// of the file corrupt the cache), written beside it and renamed, so a
/// partial file is never left there.
fn place(cache: &Store, cid: &ContentId, dest: &Path, executable: bool) -> anyhow::Result<()> {
    let src = cache
        .path(cid)
        .with_context(|| format!("{cid} vanished from the download cache"))?;
    if let Some(parent) = dest.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = dest.with_extension("kiln-tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::copy(&src, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("cannot write {}", dest.display()))?;
    Ok(())
}

/// `kiln data get <cid> -o <path>`: a file, or a directory manifest laid
/// out as a tree under `out`.
pub async fn get(
    client: &Client,
    cache: &Store,
    cid: ContentId,
    out: &Path,
    show_progress: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<GetReport> {
    let started = Instant::now();
    if cid.codec() != DAG_CBOR_CODEC {
        let progress = Progress::new(format!("downloading {}", cid.short()), 0, show_progress);
        let mut r = fetch_blob(client, cache, cid, Some(&progress), cancel).await?;
        progress.finish();
        place(cache, &cid, out, false)?;
        r.elapsed_ms = started.elapsed().as_millis() as u64;
        return Ok(r);
    }
    let mut total = fetch_blob(client, cache, cid, None, cancel).await?;
    let bytes = cache
        .get(&cid)?
        .with_context(|| format!("{cid} vanished from the download cache"))?;
    let manifest = Manifest::from_dag_cbor(&bytes)
        .with_context(|| format!("{cid} is not a usable directory manifest"))?;
    let progress = Progress::new(
        format!("downloading {}", cid.short()),
        manifest.total_size(),
        show_progress,
    );
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for e in &manifest.entries {
        let r = fetch_blob(client, cache, e.cid, Some(&progress), cancel).await?;
        total.resumed_bytes += r.resumed_bytes;
        total.bytes_transferred += r.bytes_transferred;
        place(cache, &e.cid, &out.join(&e.path), e.executable)?;
    }
    progress.finish();
    total.files = manifest.entries.len();
    total.size = manifest.total_size();
    total.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(total)
}
