//! A job's inputs, from the network to a read-only mount.
//!
//! Each input is fetched by CID into the blob cache (a cache hit costs
//! nothing): from the coordinator and every peer the offer names at once,
//! or from its URL, each 16 KiB group verified as it arrives. It is then
//! hard-linked into the attempt's directory (`<attempt>/in/<i>`; a directory
//! manifest becomes a tree of links) and pinned, so the cache cannot evict
//! it while the job runs. Fetched inputs are then shared: announced to
//! peers and served to those the coordinator allows.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_blobs::PinGuard;
use kiln_blobs::http::HttpOptions;
use kiln_protocol::spec::InputSpec;
use kiln_protocol::{ContentId, JobId, JobOffer};

use crate::runner::LocalInput;
use crate::state::State;

/// Inputs ready to mount, and the pins that keep them in the cache while
/// the job runs.
pub(crate) struct FetchedInputs {
    pub(crate) local: Vec<LocalInput>,
    _pins: Vec<PinGuard>,
}

/// Fetches every input of `offer` into the blob cache and lays them out
/// under the attempt's directory for read-only mounts.
pub(crate) async fn fetch_inputs(state: &State, offer: &JobOffer) -> Result<FetchedInputs, String> {
    let job = &offer.job_id;
    let dir = state.runner.attempt_dir(job, &offer.offer_id).join("in");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create the input directory: {e}"))?;
    let mut local = Vec::new();
    let mut pins = Vec::new();
    let mut announce = Vec::new();
    let url_deadline =
        Instant::now().checked_add(Duration::from_secs(offer.spec.resources.timeout.0));
    for (i, input) in offer.spec.inputs.iter().enumerate() {
        let sources = sources_for(state, offer, &input.cid);
        pins.push(state.store.pin(&input.cid));
        if let Some(url) = &input.url {
            let opts = url_options(state, input, url_deadline);
            let r = kiln_blobs::http::fetch_url_with(&state.store, url, input.cid, &opts)
                .await
                .map_err(|e| {
                    // The buyer gets the kind of failure; this log, the
                    // provider-side detail.
                    if let Some(d) = e.detail() {
                        tracing::warn!(job = %job.short(), input = i, "URL input failed: {d}");
                    }
                    format!("input {i} ({}): {e}", input.path)
                })?;
            tracing::info!(job = %job.short(), cid = %input.cid.short(), bytes = r.bytes_transferred, ms = r.elapsed.as_millis() as u64, "input downloaded from its URL and verified");
        } else {
            fetch_one(
                state,
                job,
                input.cid,
                input.size.map(|s| s.0),
                sources.clone(),
            )
            .await?;
        }
        announce.push(input.cid);
        let target = dir.join(i.to_string());
        if input.cid.codec() == kiln_protocol::content::DAG_CBOR_CODEC {
            let bytes = state
                .store
                .get(&input.cid)
                .map_err(|e| format!("cannot read input manifest {}: {e}", input.cid))?
                .ok_or_else(|| format!("input manifest {} vanished from the cache", input.cid))?;
            let manifest = kiln_protocol::Manifest::from_dag_cbor(&bytes)
                .map_err(|e| format!("input {} ({}): {e}", input.cid, input.path))?;
            std::fs::create_dir_all(&target)
                .map_err(|e| format!("cannot create the input directory: {e}"))?;
            for e in &manifest.entries {
                pins.push(state.store.pin(&e.cid));
                fetch_one(state, job, e.cid, Some(e.size), sources.clone()).await?;
                announce.push(e.cid);
                let dest = target.join(&e.path);
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|err| format!("cannot lay out input {}: {err}", e.path))?;
                }
                link_blob(state, &e.cid, &dest, e.executable)?;
            }
        } else {
            link_blob(state, &input.cid, &target, false)?;
        }
        local.push(LocalInput {
            host_path: target,
            container_path: input.path.clone(),
        });
    }
    share(state, &announce).await;
    Ok(FetchedInputs { local, _pins: pins })
}

/// Peers may now fetch `cids` from here (when the coordinator allows):
/// they join the shared set and are announced.
pub(crate) async fn share(state: &State, cids: &[ContentId]) {
    let have: Vec<(ContentId, u64)> = cids
        .iter()
        .filter_map(|c| state.store.size(c).map(|s| (*c, s)))
        .collect();
    state
        .shared
        .extend(have.iter().map(|(c, _)| *c), &state.store);
    let a = kiln_blobs::announce::Announcement {
        have,
        dropped: Vec::new(),
    };
    if let Err(e) = kiln_blobs::announce::announce(&state.client, &a).await {
        tracing::debug!("could not announce cached blobs: {e}");
    }
}

/// How a URL input is fetched: the provider's address policy
/// (`--allow-private-urls`), never more than the size the spec declares (or
/// the whole cache when it declares none), and done by `deadline`, the
/// job's timeout counted from the start of its input fetch: the coordinator
/// gives up on a job that has not delivered by its timeout (plus a grace),
/// so a URL still sending then only holds the slot. A CID this node already
/// caches is fetched and verified in full all the same
/// ([`kiln_blobs::http`]): the cached copy is mounted only for a URL that
/// served every byte of it.
fn url_options(state: &State, input: &InputSpec, deadline: Option<Instant>) -> HttpOptions {
    HttpOptions {
        max_bytes: input.size.map(|s| s.0).or(state.config.cache_quota),
        allow_private: state.config.allow_private_urls,
        deadline,
        ..HttpOptions::default()
    }
}

/// Where an input can come from: the coordinator, plus the peers the offer
/// names for it (never this node itself).
pub(crate) fn sources_for(
    state: &State,
    offer: &JobOffer,
    cid: &ContentId,
) -> Vec<kiln_blobs::Source> {
    let mut v = vec![kiln_blobs::Source {
        peer: state.coordinator,
        addrs: vec![state.coordinator_addr.clone()],
    }];
    for s in offer.sources.iter().filter(|s| s.cid == *cid) {
        for p in s.peers.iter().filter(|p| p.peer != state.provider) {
            v.push(kiln_blobs::Source {
                peer: p.peer.peer_id(),
                addrs: p.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
            });
        }
    }
    v
}

pub(crate) async fn fetch_one(
    state: &State,
    job: &JobId,
    cid: ContentId,
    size: Option<u64>,
    sources: Vec<kiln_blobs::Source>,
) -> Result<(), String> {
    fetch_one_or(
        state,
        job,
        cid,
        size,
        sources,
        "upload it with `kiln data add` or give it a url",
    )
    .await
}

/// [`fetch_one`], with `fix` as what to do if it cannot be fetched.
pub(crate) async fn fetch_one_or(
    state: &State,
    job: &JobId,
    cid: ContentId,
    size: Option<u64>,
    sources: Vec<kiln_blobs::Source>,
    fix: &str,
) -> Result<(), String> {
    let opts = kiln_blobs::FetchOptions::default();
    match kiln_blobs::fetch(&state.store, &state.client, cid, size, sources, &opts).await {
        Ok(r) => {
            state
                .counters
                .fetched_bytes
                .fetch_add(r.data_bytes, std::sync::atomic::Ordering::Relaxed);
            if r.data_bytes > 0 {
                tracing::info!(
                    job = %job.short(), cid = %cid.short(), bytes = r.data_bytes,
                    resumed_from = r.already_had, peers = r.per_peer.len(),
                    bad_peers = r.bad_peers.len(), ms = r.elapsed.as_millis() as u64,
                    "input fetched and verified"
                );
            }
            Ok(())
        }
        Err(e) => Err(format!("blob {cid} could not be fetched: {e}; {fix}")),
    }
}

/// Makes `dest` name the cached blob `cid` (a hard link: no copy; the cache
/// and the job directories share a filesystem under the state directory).
fn link_blob(state: &State, cid: &ContentId, dest: &Path, executable: bool) -> Result<(), String> {
    let src = state
        .store
        .path(cid)
        .ok_or_else(|| format!("input {cid} vanished from the cache"))?;
    if std::fs::hard_link(&src, dest).is_err() {
        std::fs::copy(&src, dest).map_err(|e| format!("cannot lay out input {cid}: {e}"))?;
    }
    // Readable by the job's unprivileged user; the mount is read-only. The
    // link shares its inode with the cache (and with other jobs using the
    // same bytes), so bits are only ever added: one job's executable file
    // never loses its exec bit because another job mounts it as data.
    let current = std::fs::metadata(dest)
        .map(|m| m.permissions().mode())
        .unwrap_or(0);
    let mode = 0o444 | (current & 0o111) | if executable { 0o111 } else { 0 };
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot protect input {cid}: {e}"))
}
