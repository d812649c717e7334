//! Container images on a provider: where a job's image comes from, and the
//! cache of those this node put into its engine.
//!
//! A job names its image one of three ways ([`kiln_protocol::ImageRef`]):
//!
//! * **`kiln:<cid>`**, pushed by a buyer with `kiln image push`: the image
//!   manifest, the config and every layer are fetched into the blob cache
//!   like any input (from the coordinator and every peer the offer names at
//!   once, each 16 KiB group verified against its BLAKE3 CID, layers shared
//!   by two images fetched once), then streamed into the engine as a
//!   `docker load` archive assembled on the fly from the cached files (no
//!   second copy written here). Each blob's SHA-256 is computed as it
//!   streams; a blob whose bytes do not match the OCI digest the manifest
//!   gives aborts the load before the archive ends, so the engine registers
//!   nothing. The engine then checks the layers against the config's
//!   `diff_ids`, and we check the image id it reports is the config digest.
//! * **`name@sha256:…`**, pulled from a registry by the engine, only when
//!   the registry's host is on the provider's allow-list (`--registry-allow`;
//!   none by default). The size is read from the registry's manifest (whose
//!   bytes must hash to the digest) before any layer is downloaded, the
//!   pull has a deadline, and the engine must report the digest asked for.
//! * **`sha256:<id>`**, an image already in the engine (the operator's own,
//!   or Kiln's demo workload): used as is.
//!
//! Images this node loaded or pulled are tagged `kiln-cache-<node>:<key>`
//! and kept in an LRU table (`<state>/images.json`) within `--image-cache`
//! bytes; a running job pins its image. Evicting removes this node's tag:
//! the engine deletes the image when no other tag holds it, so nodes that
//! share one engine never delete each other's images, and images the
//! operator has are never touched.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bytes::Bytes;
use futures::StreamExt;
use kiln_protocol::{ContentId, ImageManifest, JobOffer, OciDigest, UnixMillis};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::registry;
use crate::state::State;

/// What to do when an image's blob cannot be fetched.
const IMAGE_FIX: &str = "push the image again with `kiln image push`";

/// What a job's container is created from, and the pin that keeps it.
pub(crate) struct PreparedImage {
    /// The engine's name for it (an id, a digest reference or our tag).
    pub(crate) reference: String,
    _pin: Option<ImagePin>,
}

/// One image this node put into the engine.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    /// `kiln:<cid>` or `name@sha256:…`.
    key: String,
    /// Our tag on it in the engine.
    tag: String,
    /// The engine's id.
    image_id: String,
    /// Bytes it takes (the engine's size, else the manifest's).
    size: u64,
    last_used: u64,
}

#[derive(Default)]
struct Table {
    entries: HashMap<String, Entry>,
    pins: HashMap<String, u32>,
}

/// The image cache: a table of what this node loaded, with pins.
pub(crate) struct ImageCache {
    path: PathBuf,
    /// `kiln-cache-<12 hex of this node's id>`.
    repo: String,
    quota: u64,
    table: Mutex<Table>,
    /// One load at a time per image (two jobs naming it wait for one load).
    loading: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Keeps an image from eviction while a job uses it.
pub(crate) struct ImagePin {
    cache: Arc<ImageCache>,
    key: String,
}

impl Drop for ImagePin {
    fn drop(&mut self) {
        if let Ok(mut t) = self.cache.table.lock()
            && let Some(n) = t.pins.get_mut(&self.key)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.pins.remove(&self.key);
            }
        }
    }
}

/// What `kiln-node doctor` shows about the cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheSummary {
    pub count: usize,
    pub bytes: u64,
    pub quota: u64,
}

impl ImageCache {
    /// Opens the table kept in `<state_dir>/images.json` (missing or
    /// unreadable: empty, with a warning).
    pub(crate) fn open(state_dir: &std::path::Path, node: &[u8], quota: u64) -> Self {
        let path = state_dir.join("images.json");
        let entries: Vec<Entry> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "ignoring an unreadable image table: {e}");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        Self {
            path,
            repo: cache_repo(node),
            quota,
            table: Mutex::new(Table {
                entries: entries.into_iter().map(|e| (e.key.clone(), e)).collect(),
                pins: HashMap::new(),
            }),
            loading: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn summary(&self) -> CacheSummary {
        let t = self
            .table
            .lock()
            .map(|t| t.entries.values().map(|e| e.size).collect::<Vec<_>>());
        let sizes = t.unwrap_or_default();
        CacheSummary {
            count: sizes.len(),
            bytes: sizes.iter().sum(),
            quota: self.quota,
        }
    }

    /// The Kiln image manifests this node holds loaded, for its advert.
    pub(crate) fn held_kiln_images(&self) -> Vec<ContentId> {
        self.table
            .lock()
            .map(|t| {
                t.entries
                    .keys()
                    .filter_map(|k| k.strip_prefix("kiln:")?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn tag_for(&self, key: &str) -> String {
        let t = match key.strip_prefix("kiln:") {
            Some(cid) => cid.to_string(),
            None => format!("r-{}", &blake3::hash(key.as_bytes()).to_hex()[..32]),
        };
        format!("{}:{t}", self.repo)
    }

    fn pin(self: &Arc<Self>, key: &str) -> ImagePin {
        if let Ok(mut t) = self.table.lock() {
            *t.pins.entry(key.to_string()).or_default() += 1;
            if let Some(e) = t.entries.get_mut(key) {
                e.last_used = UnixMillis::now().0;
            }
        }
        ImagePin {
            cache: self.clone(),
            key: key.to_string(),
        }
    }

    fn lookup(&self, key: &str) -> Option<Entry> {
        self.table.lock().ok()?.entries.get(key).cloned()
    }

    fn forget(&self, key: &str) {
        if let Ok(mut t) = self.table.lock() {
            t.entries.remove(key);
        }
        self.save();
    }

    fn record(&self, e: Entry) {
        if let Ok(mut t) = self.table.lock() {
            t.entries.insert(e.key.clone(), e);
        }
        self.save();
    }

    /// Rewrites the table atomically (temp file, rename).
    fn save(&self) {
        let Ok(entries) = self
            .table
            .lock()
            .map(|t| t.entries.values().cloned().collect::<Vec<_>>())
        else {
            return;
        };
        let tmp = self.path.with_extension("json.tmp");
        let r = serde_json::to_vec_pretty(&entries)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = r {
            tracing::warn!(path = %self.path.display(), "cannot save the image table: {e}");
        }
    }

    /// Unpinned entries to remove, least recently used first, until the
    /// rest fits the quota (pure: the table decides, the engine is told).
    fn victims(&self) -> Vec<Entry> {
        let Ok(t) = self.table.lock() else {
            return Vec::new();
        };
        plan_eviction(t.entries.values(), &t.pins, self.quota)
    }

    /// Removes this node's tag from what [`Self::victims`] names.
    async fn evict(&self, docker: &Docker) {
        for e in self.victims() {
            let opts = bollard::query_parameters::RemoveImageOptions {
                force: false,
                noprune: false,
                ..Default::default()
            };
            match docker.remove_image(&e.tag, Some(opts), None).await {
                Ok(_) => {
                    tracing::info!(image = %e.key, bytes = e.size, "evicted from the image cache");
                    self.forget(&e.key);
                }
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => self.forget(&e.key),
                // In use by a container (another node's, on a shared
                // engine): kept, tried again after the next load.
                Err(err) => {
                    tracing::warn!(image = %e.key, "cannot evict yet: {err}");
                }
            }
        }
    }
}

/// Which entries to evict so the unpinned rest fits `quota`: least
/// recently used first, never a pinned one.
fn plan_eviction<'a>(
    entries: impl Iterator<Item = &'a Entry>,
    pins: &HashMap<String, u32>,
    quota: u64,
) -> Vec<Entry> {
    let mut all: Vec<&Entry> = entries.collect();
    let mut total: u64 = all.iter().map(|e| e.size).sum();
    all.sort_by_key(|e| (e.last_used, e.key.clone()));
    let mut out = Vec::new();
    for e in all {
        if total <= quota {
            break;
        }
        if pins.get(&e.key).is_some_and(|n| *n > 0) {
            continue;
        }
        total -= e.size;
        out.push(e.clone());
    }
    out
}

fn cache_repo(node: &[u8]) -> String {
    format!("kiln-cache-{}", &blake3::hash(node).to_hex()[..12])
}

/// The repository under which provider `provider` tags the images it
/// loads or pulls (`kiln-cache-<12 hex>`), on whatever engine it uses.
pub fn image_cache_repo(provider: &kiln_protocol::ProviderId) -> String {
    cache_repo(provider.to_string().as_bytes())
}

/// Makes the offer's image available in the engine, and pins it for the
/// job. Errors name the image (and the layer or registry) and what to do.
pub(crate) async fn prepare(state: &Arc<State>, offer: &JobOffer) -> Result<PreparedImage, String> {
    let image = &offer.spec.image;
    if let Some(cid) = image.kiln_image() {
        let key = format!("kiln:{cid}");
        let pin = ensure(state, &key, load_kiln(state, offer, cid)).await?;
        return Ok(PreparedImage {
            reference: state.images.tag_for(&key),
            _pin: Some(pin),
        });
    }
    if let Some(host) = image.registry_host() {
        let allowed = &state.config.policy.registries;
        if !allowed.iter().any(|a| a == host) {
            return Err(format!(
                "image {image} comes from registry {host}, which this provider does not allow \
                 (it allows {}; see kiln-node --registry-allow); push the image with `kiln image push` \
                 and name it as kiln:<cid> to run it anywhere",
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                }
            ));
        }
        let key = image.0.clone();
        let pin = ensure(state, &key, pull(state, offer)).await?;
        return Ok(PreparedImage {
            reference: state.images.tag_for(&key),
            _pin: Some(pin),
        });
    }
    Ok(PreparedImage {
        reference: image.0.clone(),
        _pin: None,
    })
}

/// The cached image `key`, or else `load` it (once, however many jobs wait
/// for it; a future does nothing until awaited), record it and evict what
/// no longer fits.
async fn ensure(
    state: &Arc<State>,
    key: &str,
    load: impl std::future::Future<Output = Result<(String, u64), String>>,
) -> Result<ImagePin, String> {
    let cache = &state.images;
    let gate = cache
        .loading
        .lock()
        .map(|mut l| l.entry(key.to_string()).or_default().clone())
        .map_err(|_| "the image cache is unavailable".to_string())?;
    let held = gate.lock().await;
    let r = ensure_locked(state, key, load).await;
    drop(held);
    // The last one out removes the gate (the map holds one reference,
    // each waiter another), so the map holds only images being loaded.
    if let Ok(mut l) = cache.loading.lock()
        && Arc::strong_count(&gate) == 2
    {
        l.remove(key);
    }
    r
}

async fn ensure_locked(
    state: &Arc<State>,
    key: &str,
    load: impl std::future::Future<Output = Result<(String, u64), String>>,
) -> Result<ImagePin, String> {
    let cache = &state.images;
    let docker = state.runner.docker();
    if let Some(e) = cache.lookup(key) {
        // Pinned before the engine is asked, so no eviction can slip in
        // between the answer and the job's use of it.
        let pin = cache.pin(key);
        match docker.inspect_image(&e.tag).await {
            Ok(i) if i.id.as_deref() == Some(e.image_id.as_str()) => return Ok(pin),
            // Removed behind our back (or retagged): load it again.
            _ => {
                drop(pin);
                cache.forget(key);
            }
        }
    }
    let (image_id, size) = load.await?;
    cache.record(Entry {
        key: key.to_string(),
        tag: cache.tag_for(key),
        image_id,
        size,
        last_used: UnixMillis::now().0,
    });
    let pin = cache.pin(key);
    cache.evict(docker).await;
    Ok(pin)
}

/// The engine's name for this machine's architecture.
pub(crate) fn engine_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Fetches, checks and loads the Kiln image `cid`. Returns its engine id
/// and size.
async fn load_kiln(
    state: &Arc<State>,
    offer: &JobOffer,
    cid: ContentId,
) -> Result<(String, u64), String> {
    let name = format!("kiln:{cid}");
    let job = &offer.job_id;
    let sources = crate::inputs::sources_for(state, offer, &cid);
    let _mpin = state.store.pin(&cid);
    crate::inputs::fetch_one_or(state, job, cid, None, sources.clone(), IMAGE_FIX)
        .await
        .map_err(|e| format!("image {name}: {e}"))?;
    let bytes = state
        .store
        .get(&cid)
        .map_err(|e| format!("image {name}: cannot read its manifest: {e}"))?
        .ok_or_else(|| format!("image {name}: its manifest vanished from the cache"))?;
    let manifest = ImageManifest::from_dag_cbor(&bytes).map_err(|e| {
        format!("image {name} is not an image manifest ({e}); push images with `kiln image push`")
    })?;
    let total = manifest.total_size();
    let limit = state.config.policy.max_image_bytes;
    if limit > 0 && total > limit {
        return Err(format!(
            "image {name} is {total} bytes, over this provider's {limit}-byte image limit (kiln-node --max-image-size)"
        ));
    }
    // The config first (small): its digest, platform and layer count,
    // before any layer moves or the engine sees anything.
    let blobs = manifest.blobs();
    let pins: Vec<_> = blobs.iter().map(|b| state.store.pin(&b.cid)).collect();
    let cfg = manifest.config;
    crate::inputs::fetch_one_or(
        state,
        job,
        cfg.cid,
        Some(cfg.size),
        sources.clone(),
        IMAGE_FIX,
    )
    .await
    .map_err(|e| format!("image {name}, config {}: {e}", cfg.digest))?;
    let config = state
        .store
        .get(&cfg.cid)
        .map_err(|e| format!("image {name}: cannot read its config: {e}"))?
        .ok_or_else(|| format!("image {name}: its config vanished from the cache"))?;
    let digest = OciDigest(sha2::Sha256::digest(&config).into());
    if digest != cfg.digest {
        return Err(format!(
            "image {name}: its config's bytes hash to {digest}, not the {} its manifest names; push it again",
            cfg.digest
        ));
    }
    let parsed: kiln_protocol::OciConfig = serde_json::from_slice(&config)
        .map_err(|e| format!("image {name}: its config is not an OCI image config: {e}"))?;
    if parsed.platform.os != "linux" || parsed.platform.architecture != engine_arch() {
        return Err(format!(
            "image {name} is for {}; this provider runs linux/{}",
            parsed.platform,
            engine_arch()
        ));
    }
    if parsed.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(format!(
            "image {name}: its config lists {} layers, its manifest {}",
            parsed.rootfs.diff_ids.len(),
            manifest.layers.len()
        ));
    }

    let tag = state.images.tag_for(&name);
    let docker = state.runner.docker();
    let started = std::time::Instant::now();
    let fetch = Fetch {
        state,
        job,
        name: &name,
        sources: &sources,
    };
    match &state.image_registry {
        Some(reg) => pull_while_fetching(&fetch, reg, &manifest, &tag).await?,
        None => {
            fetch.all(&blobs, |_, _| {}).await?;
            let files = blobs
                .iter()
                .map(|b| {
                    state.store.path(&b.cid).map(|p| (*b, p)).ok_or_else(|| {
                        format!("image {name}: blob {} vanished from the cache", b.digest)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            load_archive(docker, &manifest, &tag, files)
                .await
                .map_err(|e| format!("image {name}: {e}"))?;
        }
    }
    // Peers may now fetch the image from here.
    let cids: Vec<ContentId> = std::iter::once(cid)
        .chain(blobs.iter().map(|b| b.cid))
        .collect();
    crate::inputs::share(state, &cids).await;
    drop(pins);
    let inspect = docker
        .inspect_image(&tag)
        .await
        .map_err(|e| format!("image {name} was loaded but the engine cannot find it: {e}"))?;
    let id = inspect.id.clone().unwrap_or_default();
    let layers = inspect.root_fs.and_then(|r| r.layers).unwrap_or_default();
    // A classic engine names the image by its config digest; one with the
    // containerd store by its manifest's, so then the layers are compared.
    if id != manifest.image_id() && layers != parsed.rootfs.diff_ids {
        let _ = docker
            .remove_image(
                &tag,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await;
        return Err(format!(
            "image {name}: the engine loaded {id}, not the image its manifest names ({})",
            manifest.image_id()
        ));
    }
    let size = inspect
        .size
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(total);
    tracing::info!(job = %job.short(), image = %name, id = %id, bytes = total, ms = started.elapsed().as_millis() as u64, "image fetched, verified and loaded into the engine");
    Ok((id, size))
}

/// Fetches an image's blobs into the cache: from the coordinator and
/// every peer the offer names at once, each verified per group.
struct Fetch<'a> {
    state: &'a Arc<State>,
    job: &'a kiln_protocol::JobId,
    name: &'a str,
    sources: &'a [kiln_blobs::Source],
}

impl Fetch<'_> {
    /// Fetches `blobs` in order, two at a time, telling `done` about each
    /// (its path, or why it failed) as it completes.
    async fn all(
        &self,
        blobs: &[kiln_protocol::ImageBlob],
        mut done: impl FnMut(&kiln_protocol::ImageBlob, Result<PathBuf, String>),
    ) -> Result<(), String> {
        let fetches: Vec<_> = blobs
            .iter()
            .map(|b| async move {
                let r = crate::inputs::fetch_one_or(
                    self.state,
                    self.job,
                    b.cid,
                    Some(b.size),
                    self.sources.to_vec(),
                    IMAGE_FIX,
                )
                .await
                .and_then(|()| {
                    self.state
                        .store
                        .path(&b.cid)
                        .ok_or_else(|| "it vanished from the cache".to_string())
                })
                .map_err(|e| format!("image {}, blob {}: {e}", self.name, b.digest));
                (b, r)
            })
            .collect();
        let mut s = futures::stream::iter(fetches).buffered(2);
        let mut first_error = None;
        while let Some((b, r)) = s.next().await {
            if let Err(e) = &r {
                first_error.get_or_insert_with(|| e.clone());
            }
            done(b, r);
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The engine's refusal of a pull, in our words where we know them: a
/// digest it could not verify names the layer.
fn engine_refused(name: &str, e: &str) -> String {
    const BAD: &str = "verification failed for digest ";
    match e.split_once(BAD) {
        Some((_, rest)) => {
            let digest = rest.split_whitespace().next().unwrap_or(rest);
            format!(
                "image {name}: layer {digest} does not match its OCI digest (the engine checked its bytes); \
                 the image was pushed with a wrong manifest, push it again with `kiln image push`"
            )
        }
        None if e.contains("connection refused") || e.contains("no such host") => format!(
            "image {name}: the engine could not reach this node's loopback registry ({e}); \
             an engine in another network namespace (rootless Docker, Docker Desktop, a node in a container) \
             needs kiln-node run --image-load-archive"
        ),
        None => format!("image {name}: the engine refused it: {e}"),
    }
}

/// Has the engine pull the image from the loopback registry while its
/// layers are still being fetched: each layer is served once verified, so
/// the engine unpacks early layers while later ones arrive. Whatever
/// fails first (a fetch, a digest on the way out, the engine) ends the
/// pull; an unfinished pull registers no image.
async fn pull_while_fetching(
    fetch: &Fetch<'_>,
    reg: &Arc<crate::image_serve::LocalRegistry>,
    manifest: &ImageManifest,
    tag: &str,
) -> Result<(), String> {
    use crate::image_serve::Slot;
    let name = fetch.name;
    let blobs = manifest.blobs();
    let mut senders = HashMap::new();
    let mut slots = HashMap::new();
    for b in &blobs {
        let (tx, rx) = tokio::sync::watch::channel(Slot::Pending);
        senders.insert(b.digest, tx);
        slots.insert(b.digest, rx);
    }
    let serving = reg.serve(manifest, slots);
    let reference = serving.reference();
    let docker = fetch.state.runner.docker();
    let fetching = fetch.all(&blobs, |b, r| {
        if let Some(tx) = senders.get(&b.digest) {
            let _ = tx.send(match r {
                Ok(p) => Slot::Ready(p),
                Err(e) => Slot::Failed(e),
            });
        }
    });
    let mut fetching = std::pin::pin!(fetching);
    let opts = bollard::query_parameters::CreateImageOptions {
        from_image: Some(reference.clone()),
        ..Default::default()
    };
    let mut pull = docker.create_image(Some(opts), None, None);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut fetched = false;
    let ours = || serving.served.failure.lock().ok().and_then(|f| f.clone());
    loop {
        tokio::select! {
            r = &mut fetching, if !fetched => {
                fetched = true;
                r?; // dropping `pull` here cancels it in the engine
            }
            item = pull.next() => match item {
                None => break,
                Some(Ok(info)) => {
                    if let Some(e) = info.error_detail.and_then(|d| d.message) {
                        return Err(ours().unwrap_or_else(|| engine_refused(name, &e)));
                    }
                }
                Some(Err(e)) => {
                    return Err(ours().unwrap_or_else(|| engine_refused(name, &e.to_string())));
                }
            },
            _ = tick.tick() => {
                if let Some(f) = ours() {
                    return Err(format!("image {name}: {f}"));
                }
            }
        }
    }
    if let Some(f) = ours() {
        return Err(format!("image {name}: {f}"));
    }
    if !fetched {
        fetching.await?;
    }
    let (repo, t) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
    let opts = bollard::query_parameters::TagImageOptions {
        repo: Some(repo.to_string()),
        tag: Some(t.to_string()),
    };
    docker
        .tag_image(&reference, Some(opts))
        .await
        .map_err(|e| format!("image {name}: cannot tag it for the cache: {e}"))?;
    // The pull's own name goes; our tag keeps the image.
    let opts = bollard::query_parameters::RemoveImageOptions {
        noprune: true,
        ..Default::default()
    };
    let _ = docker.remove_image(&reference, Some(opts), None).await;
    Ok(())
}

/// Streams a `docker load` archive of `manifest` (tagged `tag`) into the
/// engine from the cached files, checking each file's SHA-256 on the way;
/// a mismatch ends the stream with an error before the archive is
/// complete, so the engine registers nothing.
async fn load_archive(
    docker: &Docker,
    manifest: &ImageManifest,
    tag: &str,
    files: Vec<(kiln_protocol::ImageBlob, PathBuf)>,
) -> Result<(), String> {
    let layer_name = |d: &OciDigest| format!("{}.tar", d.hex());
    let index = serde_json::json!([{
        "Config": format!("{}.json", manifest.config.digest.hex()),
        "RepoTags": [tag],
        "Layers": manifest.layers.iter().map(|l| layer_name(&l.digest)).collect::<Vec<_>>(),
    }]);
    let index = serde_json::to_vec(&index).map_err(|e| e.to_string())?;
    let config_digest = manifest.config.digest;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let fail = failure.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let r = write_archive(&tx, &index, config_digest, &files);
        if let Err(e) = r {
            if let Ok(mut f) = fail.lock() {
                *f = Some(e.clone());
            }
            let _ = tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    let body =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    let opts = bollard::query_parameters::ImportImageOptions {
        quiet: true,
        ..Default::default()
    };
    let mut answers = docker.import_image_stream(opts, body, None);
    let mut engine_error = None;
    while let Some(a) = answers.next().await {
        match a {
            Ok(info) => {
                if let Some(e) = info.error_detail.and_then(|d| d.message) {
                    engine_error = Some(e);
                }
            }
            Err(e) => {
                engine_error = Some(e.to_string());
                break;
            }
        }
    }
    drop(answers);
    let _ = writer.await;
    if let Some(ours) = failure.lock().ok().and_then(|f| f.clone()) {
        return Err(ours);
    }
    match engine_error {
        Some(e) => Err(format!("the engine refused it: {e}")),
        None => Ok(()),
    }
}

/// Writes the archive into `tx` (blocking: file reads and hashing).
fn write_archive(
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    index: &[u8],
    config_digest: OciDigest,
    files: &[(kiln_protocol::ImageBlob, PathBuf)],
) -> Result<(), String> {
    use kiln_docker::tar;
    let send = |b: Bytes| {
        tx.blocking_send(Ok(b))
            .map_err(|_| "the engine stopped reading the image".to_string())
    };
    let entry = |name: &str, size: u64| -> Result<Bytes, String> {
        tar::header(name, b'0', 0o644, size)
            .map(|h| Bytes::copy_from_slice(&h))
            .map_err(|e| e.to_string())
    };
    send(entry("manifest.json", index.len() as u64)?)?;
    let mut small = index.to_vec();
    small.resize(small.len() + tar::padding(index.len() as u64), 0);
    send(Bytes::from(small))?;
    for (blob, path) in files {
        let name = if blob.digest == config_digest {
            format!("{}.json", blob.digest.hex())
        } else {
            format!("{}.tar", blob.digest.hex())
        };
        send(entry(&name, blob.size)?)?;
        let mut f = std::fs::File::open(path)
            .map_err(|e| format!("cannot read blob {}: {e}", blob.digest))?;
        let mut h = sha2::Sha256::new();
        let mut left = blob.size;
        while left > 0 {
            let mut buf = vec![0u8; (1usize << 20).min(usize::try_from(left).unwrap_or(1 << 20))];
            f.read_exact(&mut buf)
                .map_err(|e| format!("cannot read blob {}: {e}", blob.digest))?;
            h.update(&buf);
            left -= buf.len() as u64;
            if left == 0 {
                // Checked before its last bytes go out: a bad layer never
                // completes, so the archive never does.
                let got = OciDigest(h.clone().finalize().into());
                if got != blob.digest {
                    return Err(format!(
                        "layer {} ({}) does not match its OCI digest: its bytes hash to {got}; \
                         the image was pushed with a wrong manifest, push it again with `kiln image push`",
                        blob.digest, blob.cid
                    ));
                }
            }
            send(Bytes::from(buf))?;
        }
        let pad = tar::padding(blob.size);
        if pad > 0 {
            send(Bytes::from(vec![0u8; pad]))?;
        }
    }
    send(Bytes::from_static(&tar::END))
}

/// Pulls `name@sha256:…` from its (allowed) registry: the size from the
/// registry's manifest first, then the engine's pull under a deadline,
/// progress in the log, the digest checked. Returns the id and size.
async fn pull(state: &Arc<State>, offer: &JobOffer) -> Result<(String, u64), String> {
    let image = &offer.spec.image;
    let policy = &state.config.policy;
    let started = std::time::Instant::now();
    let size = registry::image_size(image, policy.pull_timeout).await?;
    let limit = policy.max_image_bytes;
    if limit > 0 && size > limit {
        return Err(format!(
            "image {image} is {size} bytes (per its registry manifest), over this provider's {limit}-byte image limit"
        ));
    }
    let docker = state.runner.docker();
    let pulled = tokio::time::timeout(policy.pull_timeout, async {
        let opts = bollard::query_parameters::CreateImageOptions {
            from_image: Some(image.0.clone()),
            ..Default::default()
        };
        let mut s = docker.create_image(Some(opts), None, None);
        let mut progress: HashMap<String, u64> = HashMap::new();
        let mut last_log = std::time::Instant::now();
        while let Some(item) = s.next().await {
            let info = item.map_err(|e| format!("the engine could not pull it: {e}"))?;
            if let Some(e) = info.error_detail.and_then(|d| d.message) {
                return Err(format!("the engine could not pull it: {e}"));
            }
            if let (Some(id), Some(d)) = (info.id, info.progress_detail)
                && let Some(c) = d.current
            {
                progress.insert(id, u64::try_from(c).unwrap_or(0));
            }
            if last_log.elapsed() > Duration::from_secs(2) {
                last_log = std::time::Instant::now();
                tracing::info!(image = %image, bytes = progress.values().sum::<u64>(), of = size, "pulling");
            }
        }
        Ok(())
    })
    .await;
    match pulled {
        Ok(r) => r.map_err(|e| format!("image {image}: {e}"))?,
        Err(_) => {
            return Err(format!(
                "image {image}: the pull from {} did not finish within {} s (kiln-node --pull-timeout)",
                image.registry_host().unwrap_or("?"),
                policy.pull_timeout.as_secs()
            ));
        }
    }
    let inspect = docker
        .inspect_image(&image.0)
        .await
        .map_err(|e| format!("image {image} was pulled but the engine cannot find it: {e}"))?;
    let digest = image.digest().unwrap_or_default();
    let digests = inspect.repo_digests.clone().unwrap_or_default();
    if !digests.iter().any(|d| d.ends_with(&format!("@{digest}"))) {
        return Err(format!(
            "image {image}: the engine reports digests {digests:?}, not {digest}"
        ));
    }
    let tag = state.images.tag_for(&image.0);
    let (repo, t) = tag.rsplit_once(':').unwrap_or((&tag, "latest"));
    let opts = bollard::query_parameters::TagImageOptions {
        repo: Some(repo.to_string()),
        tag: Some(t.to_string()),
    };
    docker
        .tag_image(&image.0, Some(opts))
        .await
        .map_err(|e| format!("image {image}: cannot tag it for the cache: {e}"))?;
    // Only our tag holds it now, so evicting it frees the disk.
    let opts = bollard::query_parameters::RemoveImageOptions {
        noprune: true,
        ..Default::default()
    };
    let _ = docker.remove_image(&image.0, Some(opts), None).await;
    let id = inspect.id.unwrap_or_default();
    tracing::info!(image = %image, id = %id, bytes = size, ms = started.elapsed().as_millis() as u64, "image pulled and checked");
    Ok((
        id,
        inspect
            .size
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(size),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(key: &str, size: u64, last_used: u64) -> Entry {
        Entry {
            key: key.into(),
            tag: format!("t:{key}"),
            image_id: String::new(),
            size,
            last_used,
        }
    }

    #[test]
    fn eviction_is_lru_within_the_quota_and_spares_pinned_images() {
        let entries = [e("a", 40, 1), e("b", 40, 2), e("c", 40, 3)];
        let none = HashMap::new();
        let keys = |v: Vec<Entry>| v.into_iter().map(|e| e.key).collect::<Vec<_>>();
        // (quota, pinned, evicted)
        let cases: [(u64, &[&str], &[&str]); 5] = [
            (120, &[], &[]),
            (100, &[], &["a"]),
            (40, &[], &["a", "b"]),
            (40, &["a"], &["b", "c"]),
            (0, &["a", "b", "c"], &[]),
        ];
        for (quota, pinned, want) in cases {
            let pins: HashMap<String, u32> = pinned.iter().map(|k| (k.to_string(), 1)).collect();
            let got = keys(plan_eviction(
                entries.iter(),
                if pinned.is_empty() { &none } else { &pins },
                quota,
            ));
            assert_eq!(got, want, "quota {quota}, pinned {pinned:?}");
        }
    }

    #[test]
    fn tags_are_per_node_and_valid_docker_references() {
        let dir = tempfile::tempdir().unwrap();
        let a = ImageCache::open(dir.path(), b"node-a", 1);
        let b = ImageCache::open(dir.path(), b"node-b", 1);
        let cid = kiln_protocol::ImageManifest {
            config: kiln_protocol::ImageBlob {
                cid: ContentId::of_bytes(b"c"),
                digest: OciDigest([0; 32]),
                size: 1,
            },
            layers: vec![],
        }
        .cid();
        let key = format!("kiln:{cid}");
        assert_ne!(a.tag_for(&key), b.tag_for(&key));
        for tag in [a.tag_for(&key), a.tag_for("127.0.0.1:5000/x@sha256:00")] {
            let (repo, t) = tag.rsplit_once(':').unwrap();
            assert!(
                repo.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'),
                "{tag}"
            );
            assert!(
                t.len() <= 128 && t.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'),
                "{tag}"
            );
        }
    }
}
