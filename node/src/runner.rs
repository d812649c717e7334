//! Running one job in a locked-down container.
//!
//! Every job container gets, whatever the spec says: no network (unless the
//! job asks for it and the provider's policy allows it), all Linux
//! capabilities dropped, `no-new-privileges`, a non-root user (65534), a
//! read-only root filesystem with a size-limited `noexec` `/tmp`, Docker's
//! default seccomp profile, memory (swap off), CPU, pids and open-files
//! limits, inputs mounted read-only, an output area whose size and number of
//! entries are enforced, no host path other than its own directories, no
//! Docker socket, no device but the GPUs assigned to it, and a wall-clock
//! timeout after which it gets SIGTERM and, after a grace period, SIGKILL.
//!
//! Every place a job can write is a size-limited tmpfs charged to its memory
//! budget: `/tmp`, the output area, `/dev/shm`, and each `VOLUME` its image
//! declares (which Docker would otherwise back with an unbounded anonymous
//! volume on the provider's disk).
//!
//! Logs never touch the host's disk: the container uses the `none` log
//! driver and the node reads stdout/stderr from the attach stream, keeping
//! at most `log_cap_bytes` of each and counting the rest, so a log flood
//! costs nothing and the receipt says how much was cut.
//!
//! Containers carry the labels `kiln.job`, `kiln.offer` and `kiln.node`, and
//! both containers and job directories are named by job *and offer* id (one
//! per attempt: two attempts of a job never share either), so whatever a
//! crash leaves behind is found and reaped at start-up
//! ([`Runner::reap_orphans`]).

use std::collections::HashMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, ResourcesUlimits};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, InspectContainerOptions, ListContainersOptions,
    RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use futures::{Stream, StreamExt};
use kiln_blobs::{PinGuard, Store};
use kiln_protocol::{
    JobId, JobSpec, Manifest, ManifestEntry, NetworkMode, OfferId, Outcome, UnixMillis,
};
use tokio_util::sync::CancellationToken;

pub const LABEL_JOB: &str = "kiln.job";
pub const LABEL_OFFER: &str = "kiln.offer";
pub const LABEL_NODE: &str = "kiln.node";
/// The uid:gid jobs run as (`nobody`).
pub const JOB_USER: &str = "65534:65534";
/// The uid and gid of [`JOB_USER`], owner of the tmpfs put over image volumes.
const JOB_UID: u32 = 65534;

/// Smallest tmpfs an image volume gets: below it, the image declares more
/// volumes than [`Limits::volume_size_bytes`] can usefully hold.
pub const MIN_VOLUME_BYTES: u64 = 1 << 20;

/// Where an image may not declare a volume: the kernel's and the engine's
/// own file systems, which the sandbox sets up.
const SYSTEM_PATHS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Limits the provider applies to every job.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Kept per stream (stdout, stderr); the rest is counted and dropped.
    pub log_cap_bytes: u64,
    pub tmp_size_bytes: u64,
    /// Size of the output area, enforced while the job runs.
    pub max_output_bytes: u64,
    /// Most entries (files, directories, links) the output area may hold
    /// when collected: each file becomes a manifest entry the coordinator
    /// records, so their number is bounded like their size.
    pub max_output_files: u64,
    /// tmpfs lent to the volumes an image declares (`VOLUME /data`), split
    /// evenly among them: without it Docker backs each with an unbounded
    /// anonymous volume on the provider's disk.
    pub volume_size_bytes: u64,
    /// Size of the job's `/dev/shm` (0: no `/dev/shm` at all); Docker would
    /// otherwise give 64 MiB that no budget counts.
    pub shm_size_bytes: u64,
    /// Most processes and threads a job may ask for (`resources.pids`);
    /// larger asks are refused at admission.
    pub max_pids: u32,
    pub nofile: i64,
    /// SIGTERM→SIGKILL grace on timeout or cancellation.
    pub stop_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            log_cap_bytes: 4 << 20,
            tmp_size_bytes: 64 << 20,
            max_output_bytes: 64 << 20,
            max_output_files: 10_000,
            volume_size_bytes: 64 << 20,
            shm_size_bytes: 64 << 20,
            max_pids: 4096,
            nofile: 1024,
            stop_grace: Duration::from_secs(2),
        }
    }
}

/// What the provider allows, beyond the fixed sandbox.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Jobs may ask for `network = "full"`.
    pub allow_network: bool,
    /// OCI runtime for jobs (e.g. `runsc` for gVisor); the engine default if `None`.
    pub runtime: Option<String>,
    /// If non-empty, only images matching one of these run (image ids, or
    /// repository name prefixes such as `ghcr.io/acme/`).
    pub image_allow: Vec<String>,
    /// Images matching any of these never run. Deny wins over allow.
    pub image_deny: Vec<String>,
    /// Largest image (uncompressed bytes) accepted; 0 means no limit.
    pub max_image_bytes: u64,
    /// Registry hosts (`ghcr.io`, `127.0.0.1:5000`) images may be pulled
    /// from by digest; none by default.
    pub registries: Vec<String>,
    /// Longest a registry pull may take.
    pub pull_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_network: false,
            runtime: None,
            image_allow: Vec::new(),
            image_deny: Vec::new(),
            max_image_bytes: 0,
            registries: Vec::new(),
            pull_timeout: Duration::from_secs(600),
        }
    }
}

/// What an image is known as, for the policy check.
#[derive(Clone, Debug, Default)]
pub struct ImageFacts {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub size: u64,
    /// The volumes its config declares (`VOLUME /data`), as written there.
    pub volumes: Vec<String>,
}

/// The provider's cap on `resources.pids`: a pure check, made when an offer
/// is admitted and again before a container is created.
pub fn check_pids(limits: &Limits, spec: &JobSpec) -> Result<(), String> {
    let asked = spec.resources.pids;
    if asked > limits.max_pids {
        return Err(format!(
            "the job asks for {asked} processes (resources.pids), over this provider's cap of {} \
             (kiln-node --max-pids); ask for at most {}",
            limits.max_pids, limits.max_pids
        ));
    }
    Ok(())
}

/// `p` as Docker cleans a mount destination (`/a/./b/../c/` → `/a/c`), or
/// `None` when it is not absolute.
fn clean_path(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// The tmpfs to put over each volume an image declares, with its size:
/// the `budget` split evenly (in whole pages) among the volumes not already
/// covered by one of the job's own mounts (`taken`: `/tmp`, the output
/// area, the inputs), so the space a job can write is the same whatever
/// its image declares. Refuses an image that declares a volume that is not
/// an absolute path, one inside `/proc`, `/sys` or `/dev`, or so many that
/// each would get less than [`MIN_VOLUME_BYTES`].
pub fn volume_tmpfs(
    image: &str,
    declared: &[String],
    taken: &[&str],
    budget: u64,
) -> Result<Vec<(String, u64)>, String> {
    let taken: Vec<String> = taken.iter().filter_map(|t| clean_path(t)).collect();
    let mut paths = std::collections::BTreeSet::new();
    for v in declared {
        let Some(p) = clean_path(v) else {
            return Err(format!(
                "image {image} declares a volume `{v}` that is not an absolute path; fix its VOLUME instruction"
            ));
        };
        if let Some(sys) = SYSTEM_PATHS
            .iter()
            .find(|s| p == "/" || p == **s || p.starts_with(&format!("{s}/")))
        {
            return Err(format!(
                "image {image} declares a volume at {p}, inside {sys}, which the sandbox manages; \
                 remove that VOLUME from the image"
            ));
        }
        if !taken.contains(&p) {
            paths.insert(p);
        }
    }
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let n = paths.len() as u64;
    let each = budget / n / 4096 * 4096;
    if each < MIN_VOLUME_BYTES {
        let shown: Vec<&str> = paths.iter().take(5).map(String::as_str).collect();
        let more = if n > 5 { ", …" } else { "" };
        let noun = if n == 1 { "volume" } else { "volumes" };
        return Err(format!(
            "image {image} declares {n} {noun} ({}{more}); this provider lends image volumes {budget} bytes \
             in all (kiln-node --volume-size), under the {MIN_VOLUME_BYTES}-byte minimum each; \
             declare fewer volumes in the image",
            shown.join(", ")
        ));
    }
    Ok(paths.into_iter().map(|p| (p, each)).collect())
}

fn matches_pattern(pattern: &str, facts: &ImageFacts) -> bool {
    if pattern.starts_with("sha256:") {
        return facts.id == pattern
            || facts
                .repo_digests
                .iter()
                .any(|d| d.ends_with(&format!("@{pattern}")));
    }
    facts
        .repo_tags
        .iter()
        .chain(&facts.repo_digests)
        .any(|name| name.starts_with(pattern))
}

/// The provider's image policy, as a pure decision.
pub fn check_image_policy(policy: &Policy, facts: &ImageFacts) -> Result<(), String> {
    if let Some(p) = policy.image_deny.iter().find(|p| matches_pattern(p, facts)) {
        return Err(format!(
            "image {} is denied by this provider's policy (matches `{p}`)",
            facts.id
        ));
    }
    if !policy.image_allow.is_empty()
        && !policy.image_allow.iter().any(|p| matches_pattern(p, facts))
    {
        return Err(format!(
            "image {} is not on this provider's allow list ({})",
            facts.id,
            policy.image_allow.join(", ")
        ));
    }
    if policy.max_image_bytes > 0 && facts.size > policy.max_image_bytes {
        return Err(format!(
            "image {} is {} bytes, over this provider's {}-byte limit",
            facts.id, facts.size, policy.max_image_bytes
        ));
    }
    Ok(())
}

/// One attempt for [`Runner::run`]: which job and offer, its spec, the
/// engine's name for its image (see `images.rs`), its mounted inputs and
/// its GPUs.
#[derive(Clone, Copy, Debug)]
pub struct Launch<'a> {
    pub job: JobId,
    pub offer: OfferId,
    pub spec: &'a JobSpec,
    pub image: &'a str,
    pub inputs: &'a [LocalInput],
    pub gpu_uuids: &'a [String],
}

impl<'a> Launch<'a> {
    /// An attempt of `spec` with its image as the spec names it, no
    /// inputs and no GPUs.
    pub fn plain(job: JobId, offer: OfferId, spec: &'a JobSpec) -> Self {
        Self {
            job,
            offer,
            spec,
            image: &spec.image.0,
            inputs: &[],
            gpu_uuids: &[],
        }
    }
}

/// Everything the provider learned from running a job.
#[derive(Debug)]
pub struct RunReport {
    pub outcome: Outcome,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub image_digest: String,
    pub started_at: UnixMillis,
    pub finished_at: UnixMillis,
    pub wall_ms: u64,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Bytes the job wrote to each stream (kept or not).
    pub stdout_total: u64,
    pub stderr_total: u64,
    pub manifest: Manifest,
    /// The output files (and the manifest itself) in the node's blob store,
    /// pinned until the result has been delivered.
    pub pins: Vec<PinGuard>,
}

impl RunReport {
    /// A job that failed before its container ran (nothing to pay for).
    pub fn failed_before_start(error: String, image_digest: String) -> Self {
        let now = UnixMillis::now();
        Self {
            outcome: Outcome::Failed,
            exit_code: None,
            error: Some(error),
            image_digest,
            started_at: now,
            finished_at: now,
            wall_ms: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_total: 0,
            stderr_total: 0,
            manifest: Manifest::default(),
            pins: Vec::new(),
        }
    }

    pub fn logs_truncated(&self) -> bool {
        self.stdout_total > self.stdout.len() as u64 || self.stderr_total > self.stderr.len() as u64
    }
}

/// An input already on local disk, to be mounted read-only.
#[derive(Clone, Debug)]
pub struct LocalInput {
    pub host_path: PathBuf,
    pub container_path: String,
}

/// A job left behind by a previous run of this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Orphan {
    pub job: JobId,
    pub offer: OfferId,
}

/// Runs jobs on the local Docker engine.
#[derive(Clone)]
pub struct Runner {
    docker: Docker,
    work_dir: PathBuf,
    node_label: String,
    limits: Limits,
    policy: Policy,
    /// Outputs are imported here (hashed once, verified, served by CID).
    store: Store,
    /// What each running container has written so far, by offer id (for
    /// `kiln job logs --follow`); an entry lives while its container does.
    live: Arc<std::sync::Mutex<HashMap<OfferId, Arc<LiveLog>>>>,
    /// How GPUs reach containers on this host (`None`: no GPUs).
    gpu: Option<Arc<(crate::gpu_access::GpuPath, crate::gpu_access::HostFacts)>>,
}

/// A running container's output so far: the first `log_cap` bytes of each
/// stream (what its receipt's logs will hold) and how much it wrote in all.
#[derive(Debug, Default)]
pub struct LiveLog {
    inner: std::sync::Mutex<LiveInner>,
}

#[derive(Debug, Default)]
struct LiveInner {
    out: Vec<u8>,
    err: Vec<u8>,
    out_total: u64,
    err_total: u64,
    ended: bool,
}

impl LiveLog {
    /// What was kept from these offsets on, at most [`LogChunk::MAX`] bytes
    /// of each stream.
    pub fn read(&self, stdout_from: u64, stderr_from: u64) -> kiln_protocol::LogChunk {
        let g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slice = |buf: &[u8], from: u64| {
            let from = usize::try_from(from).unwrap_or(usize::MAX).min(buf.len());
            let to = from
                .saturating_add(kiln_protocol::LogChunk::MAX)
                .min(buf.len());
            buf[from..to].to_vec()
        };
        kiln_protocol::LogChunk {
            stdout: slice(&g.out, stdout_from),
            stderr: slice(&g.err, stderr_from),
            stdout_total: g.out_total,
            stderr_total: g.err_total,
            ended: g.ended,
        }
    }
}

/// The job's output directory on the host. Mounted as a size-limited tmpfs
/// when the node may mount (root), so writes past the limit fail with
/// ENOSPC inside the job; otherwise a plain directory watched while the job
/// runs, and the job is killed when it goes over.
///
/// The tmpfs also holds at most twice [`Limits::max_output_files`] entries
/// (`nr_inodes`; hard links count too): a flood of empty files stops there,
/// which bounds the kernel memory it takes and the walk that collects the
/// outputs, and [`collect_outputs`] fails a job over the limit itself with
/// the reason.
struct OutputArea {
    path: PathBuf,
    mounted: bool,
}

/// `nr_inodes` of the output tmpfs: room for twice the entry limit (so a
/// job over it is told why at collection) and the root directory.
fn output_inodes(max_entries: u64) -> u64 {
    max_entries.saturating_mul(2).saturating_add(1)
}

impl OutputArea {
    fn create(path: &Path, limit: u64, max_entries: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(path)?;
        let opts = format!(
            "size={limit},nr_inodes={},mode=0777,nosuid,nodev,noexec",
            output_inodes(max_entries)
        );
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            // The job runs as uid 65534 and must be able to write its outputs.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            mounted,
        })
    }
}

fn unmount(path: &Path) {
    let ok = std::process::Command::new("umount")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(path)
            .status();
    }
}

/// Bytes in all regular files under `dir` (not following symlinks) and
/// the number of entries (files, directories, links) under it; stops
/// counting once there are more than `max_entries`, so a flood of files
/// costs the watcher no more than the limit.
fn dir_usage(dir: &Path, max_entries: u64) -> (u64, u64) {
    let (mut bytes, mut entries) = (0, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(list) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in list.flatten() {
            entries += 1;
            if entries > max_entries {
                return (bytes, entries);
            }
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                bytes += m.len();
            }
        }
    }
    (bytes, entries)
}

/// Mount points at or below `root`, deepest first.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(root))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Reads a container's attach stream into `live` as it arrives, keeping
/// at most `cap` bytes of each stream and counting all of them; returns
/// what was kept once the stream ends.
async fn capture_logs(
    mut stream: std::pin::Pin<
        Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
    >,
    cap: usize,
    live: Arc<LiveLog>,
) -> (Vec<u8>, Vec<u8>, u64, u64) {
    while let Some(item) = stream.next().await {
        let mut g = live
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let g = &mut *g;
        let (buf, n, msg) = match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                (&mut g.out, &mut g.out_total, message)
            }
            Ok(LogOutput::StdErr { message }) => (&mut g.err, &mut g.err_total, message),
            Ok(LogOutput::StdIn { .. }) => continue,
            Err(_) => break,
        };
        *n += msg.len() as u64;
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&msg[..msg.len().min(room)]);
    }
    let mut g = live
        .inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    g.ended = true;
    (g.out.clone(), g.err.clone(), g.out_total, g.err_total)
}

/// A live log registered for as long as its container runs.
struct LiveEntry {
    map: Arc<std::sync::Mutex<HashMap<OfferId, Arc<LiveLog>>>>,
    offer: OfferId,
}

impl LiveEntry {
    fn register(
        map: &Arc<std::sync::Mutex<HashMap<OfferId, Arc<LiveLog>>>>,
        offer: OfferId,
        live: Arc<LiveLog>,
    ) -> Self {
        map.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(offer, live);
        Self {
            map: map.clone(),
            offer,
        }
    }
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.offer);
    }
}

enum Ended {
    Exited(Result<i64, String>),
    TimedOut,
    Cancelled,
    OutputOverflow(u64),
    /// More entries than the limit in an output area that is not a tmpfs.
    TooManyOutputs,
}

/// An image resolved for a job: its id and the volumes it declares.
#[derive(Clone, Debug, Default)]
pub struct ResolvedImage {
    pub id: String,
    pub volumes: Vec<String>,
    /// The image's own `LD_LIBRARY_PATH`, kept when GPUs are injected.
    pub ld_library_path: Option<String>,
}

impl Runner {
    pub fn new(
        docker: Docker,
        work_dir: PathBuf,
        node_label: String,
        limits: Limits,
        policy: Policy,
        store: Store,
    ) -> Self {
        Self {
            docker,
            work_dir,
            node_label,
            limits,
            policy,
            store,
            live: Arc::default(),
            gpu: None,
        }
    }

    /// How `gpu_uuids` reach the container of `image` on this host.
    fn gpu_plan(
        &self,
        image: &ResolvedImage,
        gpu_uuids: &[String],
    ) -> Result<crate::gpu_access::GpuPlan, String> {
        if gpu_uuids.is_empty() {
            return Ok(crate::gpu_access::GpuPlan::default());
        }
        let Some(g) = &self.gpu else {
            return Err("this provider has no way to give GPUs to containers".into());
        };
        crate::gpu_access::plan(g.0, &g.1, gpu_uuids, image.ld_library_path.as_deref())
    }

    /// The live output of attempt `offer`, while its container runs.
    pub fn live_log(&self, offer: &OfferId) -> Option<Arc<LiveLog>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(offer)
            .cloned()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Sets how GPUs reach containers (see [`crate::gpu_access`]).
    pub fn set_gpu_access(
        &mut self,
        path: crate::gpu_access::GpuPath,
        facts: crate::gpu_access::HostFacts,
    ) {
        self.gpu = Some(Arc::new((path, facts)));
    }

    /// The engine jobs run on.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The directory of one attempt of a job (`<job>-<offer>`, like its
    /// container's name): inputs under `in/`, outputs under `out/`.
    pub fn attempt_dir(&self, job: &JobId, offer: &OfferId) -> PathBuf {
        self.work_dir.join(format!("{job}-{offer}"))
    }

    /// Containers of this node still present (running or not).
    pub async fn containers(
        &self,
    ) -> Result<Vec<bollard::models::ContainerSummary>, bollard::errors::Error> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_NODE}={}", self.node_label)],
        )]);
        self.docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
    }

    /// Removes containers, mounts and job directories a previous run of this
    /// node left behind (after a crash or SIGKILL), and returns the jobs they
    /// belonged to so the coordinator can be told they are lost.
    pub async fn reap_orphans(&self) -> Result<Vec<Orphan>, bollard::errors::Error> {
        let mut orphans = Vec::new();
        for c in self.containers().await? {
            let labels = c.labels.unwrap_or_default();
            let job = labels.get(LABEL_JOB).and_then(|j| j.parse().ok());
            let offer = labels.get(LABEL_OFFER).and_then(|o| o.parse().ok());
            if let Some(id) = c.id {
                self.remove_container(&id).await;
                tracing::warn!(job = ?job, container = %&id[..12.min(id.len())], "reaped a container left by a previous run");
            }
            if let (Some(job), Some(offer)) = (job, offer) {
                orphans.push(Orphan { job, offer });
            }
        }
        for m in mounts_under(&self.work_dir) {
            unmount(&m);
        }
        if let Ok(entries) = std::fs::read_dir(&self.work_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(orphans)
    }

    /// Whether anything of `job` (any attempt) is left on this machine
    /// (container, mount, directory).
    pub async fn leftovers(&self, job: &JobId) -> Result<Vec<String>, bollard::errors::Error> {
        let mut left = Vec::new();
        for c in self.containers().await? {
            if c.labels.as_ref().and_then(|l| l.get(LABEL_JOB)) == Some(&job.to_string()) {
                left.push(format!("container {}", c.id.unwrap_or_default()));
            }
        }
        let prefix = format!("{job}-");
        let dirs = std::fs::read_dir(&self.work_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix));
        for dir in dirs.map(|e| e.path()) {
            left.extend(
                mounts_under(&dir)
                    .into_iter()
                    .map(|m| format!("mount {}", m.display())),
            );
            left.push(format!("directory {}", dir.display()));
        }
        Ok(left)
    }

    async fn remove_container(&self, id: &str) {
        let opts = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        if let Err(e) = self.docker.remove_container(id, Some(opts)).await {
            tracing::warn!(container = id, "could not remove container: {e}");
        }
    }

    /// Resolves the spec's pinned image to a local image (its id and the
    /// volumes it declares) and applies the provider's image policy.
    pub async fn resolve_image(
        &self,
        spec: &JobSpec,
        reference: &str,
    ) -> Result<ResolvedImage, String> {
        let inspect = self.docker.inspect_image(reference).await.map_err(|e| {
            format!(
                "image {reference} is not present on this provider ({e}); push it with \
                 `kiln image push` and name it as kiln:<cid>, or name it as name@sha256:… \
                 for a provider that allows its registry"
            )
        })?;
        let ld_library_path = inspect
            .config
            .as_ref()
            .and_then(|c| c.env.as_ref())
            .and_then(|env| {
                env.iter()
                    .find_map(|e| e.strip_prefix("LD_LIBRARY_PATH=").map(str::to_string))
            });
        let facts = ImageFacts {
            id: inspect.id.clone().unwrap_or_default(),
            repo_tags: inspect.repo_tags.clone().unwrap_or_default(),
            repo_digests: inspect.repo_digests.clone().unwrap_or_default(),
            size: inspect
                .size
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(0),
            volumes: inspect
                .config
                .as_ref()
                .and_then(|c| c.volumes.clone())
                .unwrap_or_default(),
        };
        // An image this or another node loaded for a Kiln image is that
        // image's buyer's: reachable only as kiln:<cid>, which the
        // coordinator checks, never by its engine id.
        if spec.image.is_image_id()
            && !facts.repo_tags.is_empty()
            && facts.repo_tags.iter().all(|t| t.starts_with("kiln-cache-"))
        {
            return Err(format!(
                "image {reference} is not present on this provider as an image of its own; \
                 name a pushed image as kiln:<cid>"
            ));
        }
        if spec.image.is_image_id() && Some(facts.id.as_str()) != spec.image.digest() {
            return Err(format!(
                "image id mismatch: asked for {reference}, found {}",
                facts.id
            ));
        }
        check_image_policy(&self.policy, &facts)?;
        Ok(ResolvedImage {
            id: facts.id,
            volumes: facts.volumes,
            ld_library_path,
        })
    }

    /// Runs `spec` to completion, timeout or cancellation, and collects logs
    /// and outputs. Never returns an error: anything that goes wrong becomes
    /// a failed report with the reason, so the buyer always gets an answer.
    /// Everything the job created on this machine is gone when this returns.
    pub async fn run(&self, attempt: Launch<'_>, cancel: CancellationToken) -> RunReport {
        let Launch {
            job,
            offer,
            spec,
            image,
            inputs,
            gpu_uuids,
        } = attempt;
        if spec.network == NetworkMode::Full && !self.policy.allow_network {
            return RunReport::failed_before_start(
                "this provider does not allow network access for jobs".into(),
                String::new(),
            );
        }
        if let Err(e) = check_pids(&self.limits, spec) {
            return RunReport::failed_before_start(e, String::new());
        }
        let image = match self.resolve_image(spec, image).await {
            Ok(image) => image,
            Err(e) => return RunReport::failed_before_start(e, String::new()),
        };
        let image_id = image.id.clone();
        let dir = self.attempt_dir(&job, &offer);
        let area = match std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)))
            .and_then(|()| {
                OutputArea::create(
                    &dir.join("out"),
                    self.limits.max_output_bytes,
                    self.limits.max_output_files,
                )
            }) {
            Ok(a) => a,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return RunReport::failed_before_start(
                    format!("cannot prepare the job directory: {e}"),
                    image_id,
                );
            }
        };
        // Named by job and offer: the members of a gang job share its id,
        // and may share one Docker engine.
        let name = format!("kiln-{job}-{offer}");
        let report = match self
            .run_container(
                &name, job, offer, spec, &image, &area, inputs, gpu_uuids, cancel,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => RunReport::failed_before_start(e, image_id.clone()),
        };
        self.remove_container(&name).await;
        if area.mounted {
            unmount(&area.path);
        }
        let _ = std::fs::remove_dir_all(&dir);
        report
    }

    fn host_config(
        &self,
        spec: &JobSpec,
        image: &ResolvedImage,
        area: &OutputArea,
        inputs: &[LocalInput],
        gpu_uuids: &[String],
    ) -> Result<HostConfig, String> {
        let out_dir = &area.path;
        let r = &spec.resources;
        let mut binds = vec![format!("{}:{}:rw", out_dir.display(), spec.output_path)];
        binds.extend(
            inputs
                .iter()
                .map(|i| format!("{}:{}:ro", i.host_path.display(), i.container_path)),
        );
        let mut tmpfs = HashMap::from([(
            "/tmp".to_string(),
            format!("rw,noexec,nosuid,nodev,size={}", self.limits.tmp_size_bytes),
        )]);
        // A volume the image declares would be an anonymous Docker volume on
        // the provider's disk, bounded by nothing; a tmpfs there takes its
        // place (Docker creates no volume where a mount already is), owned
        // by the job's user so the job can write it as it could the volume.
        let mut taken = vec!["/tmp", spec.output_path.as_str()];
        taken.extend(inputs.iter().map(|i| i.container_path.as_str()));
        let volumes = volume_tmpfs(
            &image.id,
            &image.volumes,
            &taken,
            self.limits.volume_size_bytes,
        )?;
        for (path, size) in &volumes {
            tmpfs.insert(
                path.clone(),
                format!("rw,noexec,nosuid,nodev,size={size},uid={JOB_UID},gid={JOB_UID}"),
            );
        }
        // tmpfs pages are charged to the memory cgroup of whoever writes them,
        // so the scratch areas (/tmp, the output area, /dev/shm, the image's
        // volumes) get their own budgets on top of the job's declared memory:
        // filling one hits ENOSPC at its own limit instead of OOM-killing a
        // job that stays within its memory.
        let scratch = [
            self.limits.tmp_size_bytes,
            if area.mounted {
                self.limits.max_output_bytes
            } else {
                0
            },
            self.limits.shm_size_bytes,
            volumes.iter().map(|(_, size)| size).sum(),
        ]
        .into_iter()
        .try_fold(0u64, u64::checked_add);
        let memory = scratch
            .and_then(|s| r.memory.0.checked_add(s))
            .and_then(|m| i64::try_from(m).ok())
            .ok_or_else(|| {
                format!(
                    "the job's memory ({}) plus this provider's scratch areas overflows; ask for less memory",
                    r.memory
                )
            })?;
        let shm_size = i64::try_from(self.limits.shm_size_bytes)
            .map_err(|_| "this provider's --shm-size is too large".to_string())?;
        let gpu = self.gpu_plan(image, gpu_uuids)?;
        binds.extend(gpu.binds);
        let device_requests = (!gpu.device_requests.is_empty()).then_some(gpu.device_requests);
        let devices = (!gpu.devices.is_empty()).then_some(gpu.devices);
        let network = match spec.network {
            NetworkMode::Isolated => "none",
            NetworkMode::Full => "bridge",
        };
        Ok(HostConfig {
            network_mode: Some(network.into()),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            readonly_rootfs: Some(true),
            memory: Some(memory),
            memory_swap: Some(memory), // equal to memory: no swap
            nano_cpus: Some(i64::from(r.cpus.0) * 1_000_000),
            pids_limit: Some(i64::from(r.pids)),
            // Its own IPC namespace and a /dev/shm of the size counted above
            // (none at all when that size is 0).
            ipc_mode: Some(if shm_size > 0 { "private" } else { "none" }.into()),
            shm_size: (shm_size > 0).then_some(shm_size),
            ulimits: Some(vec![ResourcesUlimits {
                name: Some("nofile".into()),
                soft: Some(self.limits.nofile),
                hard: Some(self.limits.nofile),
            }]),
            tmpfs: Some(tmpfs),
            binds: Some(binds),
            // No log driver: logs come from the attach stream, capped in memory.
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            device_requests,
            devices,
            runtime: self.policy.runtime.clone(),
            ..Default::default()
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_container(
        &self,
        name: &str,
        job: JobId,
        offer: OfferId,
        spec: &JobSpec,
        image: &ResolvedImage,
        area: &OutputArea,
        inputs: &[LocalInput],
        gpu_uuids: &[String],
        cancel: CancellationToken,
    ) -> Result<RunReport, String> {
        let image_id = image.id.as_str();
        // The GPU plan's variables first: the job's own may override them.
        let mut env = self.gpu_plan(image, gpu_uuids)?.env;
        env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
        env.push(format!("KILN_JOB_ID={job}"));
        env.push(format!("KILN_OUTPUT_DIR={}", spec.output_path));
        let body = ContainerCreateBody {
            image: Some(image_id.to_string()),
            entrypoint: spec.entrypoint.clone(),
            cmd: Some(spec.command.clone()),
            env: Some(env),
            user: Some(JOB_USER.into()),
            network_disabled: Some(spec.network == NetworkMode::Isolated),
            tty: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            labels: Some(HashMap::from([
                (LABEL_JOB.to_string(), job.to_string()),
                (LABEL_OFFER.to_string(), offer.to_string()),
                (LABEL_NODE.to_string(), self.node_label.clone()),
            ])),
            host_config: Some(self.host_config(spec, image, area, inputs, gpu_uuids)?),
            ..Default::default()
        };
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.to_string()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| format!("the Docker engine refused to create the container: {e}"))?;
        let attach = self
            .docker
            .attach_container(
                name,
                Some(AttachContainerOptions {
                    stdout: true,
                    stderr: true,
                    stream: true,
                    logs: false,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| format!("cannot attach to the container's output: {e}"))?;
        let live = Arc::new(LiveLog::default());
        let _registered = LiveEntry::register(&self.live, offer, live.clone());
        let logs = tokio::spawn(capture_logs(
            attach.output,
            self.limits.log_cap_bytes as usize,
            live,
        ));

        let started_at = UnixMillis::now();
        let t0 = Instant::now();
        self.docker
            .start_container(name, None)
            .await
            .map_err(|e| format!("the container did not start: {e}"))?;

        let ended = self.wait(name, spec, area, &cancel).await;
        let wall_ms = t0.elapsed().as_millis() as u64;
        let finished_at = UnixMillis::now();
        let (mut outcome, mut exit_code, mut error) = match ended {
            Ended::Exited(Ok(0)) => (Outcome::Succeeded, Some(0), None),
            Ended::Exited(Ok(code)) => (Outcome::Failed, Some(code), None),
            Ended::Exited(Err(e)) => (Outcome::Failed, None, Some(e)),
            Ended::TimedOut => (
                Outcome::TimedOut,
                None,
                Some(format!(
                    "killed after the {}s wall-clock limit",
                    spec.resources.timeout.0
                )),
            ),
            Ended::Cancelled => (
                Outcome::Cancelled,
                None,
                Some("cancelled by the buyer".into()),
            ),
            Ended::OutputOverflow(n) => (
                Outcome::Failed,
                None,
                Some(format!(
                    "killed: wrote {n} bytes of output, over the {}-byte output limit",
                    self.limits.max_output_bytes
                )),
            ),
            Ended::TooManyOutputs => (
                Outcome::Failed,
                None,
                Some(too_many_outputs(
                    &spec.output_path,
                    self.limits.max_output_files,
                )),
            ),
        };
        // A SIGKILL we did not send (exit 137) is almost always the memory
        // limit, but Docker records `OOMKilled` from an event that can land
        // after the exit is reported: look again briefly before concluding.
        let sigkilled = exit_code == Some(137) && matches!(outcome, Outcome::Failed);
        let mut oom = false;
        for attempt in 0..if sigkilled { 10 } else { 1 } {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let Ok(info) = self
                .docker
                .inspect_container(name, None::<InspectContainerOptions>)
                .await
            else {
                break;
            };
            let Some(state) = info.state else { break };
            if exit_code.is_none() && matches!(outcome, Outcome::Failed) {
                exit_code = state.exit_code;
            }
            if state.oom_killed == Some(true) {
                oom = true;
                break;
            }
        }
        let limit = spec.resources.memory;
        if oom {
            outcome = Outcome::Failed;
            error = Some(format!("killed: out of memory (limit {limit})"));
        } else if sigkilled && error.is_none() {
            error = Some(format!(
                "killed by SIGKILL (exit 137) with no OOM record from Docker; most likely out of memory (limit {limit})"
            ));
        }
        let (stdout, stderr, stdout_total, stderr_total) =
            tokio::time::timeout(Duration::from_secs(10), logs)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
        let out_dir = area.path.clone();
        let limits = OutputLimits {
            max_bytes: self.limits.max_output_bytes,
            max_entries: self.limits.max_output_files,
            container_path: spec.output_path.clone(),
        };
        let store = self.store.clone();
        let collected =
            tokio::task::spawn_blocking(move || collect_outputs(&out_dir, &limits, &store))
                .await
                .unwrap_or_else(|e| Err(format!("collecting outputs failed: {e}")));
        let (manifest, pins) = match collected {
            Ok(x) => x,
            Err(e) => {
                outcome = Outcome::Failed;
                error = Some(e);
                (Manifest::default(), Vec::new())
            }
        };
        Ok(RunReport {
            outcome,
            exit_code,
            error,
            image_digest: image_id.to_string(),
            started_at,
            finished_at,
            wall_ms,
            stdout,
            stderr,
            stdout_total,
            stderr_total,
            manifest,
            pins,
        })
    }

    /// Waits for the container to exit, the timeout, cancellation, or (when
    /// the output area is not a sized mount) the output limit to be crossed;
    /// stops the container in every case but a normal exit.
    async fn wait(
        &self,
        name: &str,
        spec: &JobSpec,
        area: &OutputArea,
        cancel: &CancellationToken,
    ) -> Ended {
        let deadline = tokio::time::sleep(Duration::from_secs(spec.resources.timeout.0));
        tokio::pin!(deadline);
        let mut wait = self
            .docker
            .wait_container(name, None::<WaitContainerOptions>);
        let mut watch = tokio::time::interval(Duration::from_millis(250));
        let ended = loop {
            tokio::select! {
                r = wait.next() => break Ended::Exited(match r {
                    Some(Ok(resp)) => Ok(resp.status_code),
                    // bollard reports a non-zero exit as an error carrying the code.
                    Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
                    Some(Err(e)) => Err(format!("waiting for the container failed: {e}")),
                    None => Err("the Docker engine stopped reporting on the container".into()),
                }),
                () = &mut deadline => break Ended::TimedOut,
                () = cancel.cancelled() => break Ended::Cancelled,
                _ = watch.tick(), if !area.mounted => {
                    let most = output_inodes(self.limits.max_output_files);
                    let (used, entries) = dir_usage(&area.path, most);
                    if used > self.limits.max_output_bytes {
                        break Ended::OutputOverflow(used);
                    }
                    if entries > most {
                        break Ended::TooManyOutputs;
                    }
                }
            }
        };
        if !matches!(ended, Ended::Exited(_)) {
            let grace = i32::try_from(self.limits.stop_grace.as_secs()).unwrap_or(2);
            let _ = self
                .docker
                .stop_container(
                    name,
                    Some(StopContainerOptions {
                        t: Some(grace),
                        signal: None,
                    }),
                )
                .await;
        }
        ended
    }
}

/// What [`collect_outputs`] accepts from a job.
#[derive(Clone, Debug)]
pub struct OutputLimits {
    /// Bytes of all regular files.
    pub max_bytes: u64,
    /// Entries (files, directories, links) in the whole tree.
    pub max_entries: u64,
    /// Where the job saw its output area (named in errors).
    pub container_path: String,
}

fn too_many_outputs(container_path: &str, max: u64) -> String {
    format!(
        "the job left more than {max} entries (files, directories, links) in {container_path}, \
         over this provider's limit (kiln-node --max-output-files); write fewer, larger files \
         (e.g. one archive)"
    )
}

/// Walks the output directory (never following symlinks), importing each
/// regular file into `store` (hashed once while copied, with its bao
/// outboard) and the resulting manifest too. Returns the manifest and pins
/// on everything it names. Fails as soon as the tree holds more entries or
/// bytes than `limits` allow: the manifest becomes one record (and one
/// transaction) at the coordinator, so its length is bounded here.
pub fn collect_outputs(
    out_dir: &Path,
    limits: &OutputLimits,
    store: &Store,
) -> Result<(Manifest, Vec<PinGuard>), String> {
    let max_bytes = limits.max_bytes;
    let mut entries = Vec::new();
    let mut pins = Vec::new();
    let mut total = 0u64;
    let mut seen = 0u64;
    let mut stack = vec![out_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let list = std::fs::read_dir(&dir)
            .map_err(|e| format!("cannot read outputs in {}: {e}", dir.display()))?;
        for e in list.flatten() {
            seen += 1;
            if seen > limits.max_entries {
                return Err(too_many_outputs(&limits.container_path, limits.max_entries));
            }
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            if !meta.is_file() {
                continue; // symlinks, sockets, fifos are not outputs
            }
            total += meta.len();
            if total > max_bytes {
                return Err(format!(
                    "outputs exceed this provider's {max_bytes}-byte limit; write less to the output directory"
                ));
            }
            let rel = path
                .strip_prefix(out_dir)
                .map_err(|_| "output path escaped the output directory".to_string())?
                .to_string_lossy()
                .into_owned();
            // Opened without following links: the job cannot swap the file
            // for a symlink between the check above and this read.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc_o_nofollow())
                .open(&path)
                .map_err(|e| format!("cannot read output {rel}: {e}"))?;
            let size = meta.len();
            let cid = store
                .import_reader(
                    std::io::BufReader::with_capacity(1 << 20, f),
                    Some(size),
                    None,
                )
                .map_err(|e| format!("cannot store output {rel}: {e}"))?;
            pins.push(store.pin(&cid));
            entries.push(ManifestEntry {
                path: rel,
                cid,
                size,
                // Only the executable bit survives; setuid/setgid never do.
                executable: meta.permissions().mode() & 0o111 != 0,
            });
        }
    }
    let manifest = Manifest::new(entries).map_err(|e| e.to_string())?;
    let bytes = manifest.to_dag_cbor();
    let cid = manifest.cid();
    store
        .import_reader(&bytes[..], Some(bytes.len() as u64), Some(cid))
        .map_err(|e| format!("cannot store the output manifest: {e}"))?;
    pins.push(store.pin(&cid));
    Ok((manifest, pins))
}

/// `O_NOFOLLOW` (Linux value).
const fn libc_o_nofollow() -> i32 {
    0o400000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_hashed_sorted_and_capped() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("b.txt"), b"bee").unwrap();
        std::fs::write(d.path().join("sub/a.txt"), b"a").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).unwrap();
        let sd = tempfile::tempdir().unwrap();
        let store = Store::open_dir(sd.path(), Default::default()).unwrap();
        let limits = |max_bytes, max_entries| OutputLimits {
            max_bytes,
            max_entries,
            container_path: "/out".into(),
        };
        let (m, pins) = collect_outputs(d.path(), &limits(1000, 4), &store).unwrap();
        let paths: Vec<_> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["b.txt", "sub/a.txt"]);
        assert_eq!(pins.len(), 3, "two files and the manifest");
        assert_eq!(m.entries[0].cid, kiln_protocol::ContentId::of_bytes(b"bee"));
        assert_eq!(store.get(&m.entries[0].cid).unwrap().unwrap(), b"bee");
        assert_eq!(
            store.get(&m.cid()).unwrap().unwrap(),
            m.to_dag_cbor(),
            "the manifest is fetchable by its CID"
        );
        assert!(store.is_pinned(&m.cid()));
        assert!(collect_outputs(d.path(), &limits(3, 4), &store).is_err());
        // b.txt, sub, sub/a.txt and the link: four entries.
        let e = collect_outputs(d.path(), &limits(1000, 3), &store).unwrap_err();
        assert!(
            e.contains("more than 3 entries") && e.contains("--max-output-files"),
            "{e}"
        );
        assert_eq!(dir_usage(d.path(), 100), (4, 4));
        assert_eq!(dir_usage(d.path(), 2).1, 3, "stops counting past the limit");
    }

    #[test]
    fn a_flood_of_empty_files_fails_collection_early() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..500 {
            std::fs::write(d.path().join(format!("f{i}")), b"").unwrap();
        }
        let sd = tempfile::tempdir().unwrap();
        let store = Store::open_dir(sd.path(), Default::default()).unwrap();
        let limits = OutputLimits {
            max_bytes: 1 << 20,
            max_entries: 100,
            container_path: "/results".into(),
        };
        let e = collect_outputs(d.path(), &limits, &store).unwrap_err();
        assert!(
            e.contains("more than 100 entries") && e.contains("/results"),
            "{e}"
        );
        let limits = OutputLimits {
            max_entries: 500,
            ..limits
        };
        let (m, _pins) = collect_outputs(d.path(), &limits, &store).unwrap();
        assert_eq!(m.entries.len(), 500, "at the limit is fine");
    }

    /// As root the output area is a tmpfs that refuses new entries past
    /// twice the limit (hard links included), with ENOSPC.
    #[test]
    fn the_output_tmpfs_bounds_its_entries() {
        let root = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let area = OutputArea::create(&out, 1 << 20, 10).unwrap();
        if !root {
            assert!(!area.mounted);
            eprintln!("not root: the output area is a plain directory, watched instead");
            return;
        }
        assert!(area.mounted, "root mounts the output area");
        let mut made = 0;
        let err = loop {
            let r = if made % 2 == 0 {
                std::fs::write(out.join(format!("f{made}")), b"")
            } else {
                std::fs::hard_link(out.join("f0"), out.join(format!("l{made}")))
            };
            match r {
                Ok(()) => made += 1,
                Err(e) => break e,
            }
            assert!(made <= 100, "no bound on entries");
        };
        unmount(&out);
        assert_eq!(made, 20, "twice the limit of 10");
        assert_eq!(err.raw_os_error(), Some(28), "ENOSPC: {err}");
    }

    #[test]
    fn image_volumes_get_an_even_share_of_the_budget() {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let taken = ["/tmp", "/out", "/in/data"];
        let mib = 1u64 << 20;
        // One volume gets it all; `/vol/` and `/vol/.` are the same volume.
        assert_eq!(
            volume_tmpfs("img", &v(&["/vol/", "/vol/."]), &taken, 64 * mib).unwrap(),
            vec![("/vol".to_string(), 64 * mib)]
        );
        // Volumes already covered by the job's own mounts take nothing.
        assert_eq!(
            volume_tmpfs("img", &v(&["/tmp", "/out/", "/in/data"]), &taken, 64 * mib).unwrap(),
            vec![]
        );
        // Three share evenly, in whole pages, never more than the budget.
        let three = volume_tmpfs("img", &v(&["/a", "/b/../c", "/d"]), &taken, 10 * mib).unwrap();
        let paths: Vec<_> = three.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["/a", "/c", "/d"]);
        let each = three[0].1;
        assert!(
            each.is_multiple_of(4096) && each * 3 <= 10 * mib && each * 3 > 10 * mib - 3 * 4096
        );
        // Refused, each naming what to fix.
        let cases: [(&[&str], u64, &str); 6] = [
            (&["data"], 64 * mib, "not an absolute path"),
            (&["/dev/shm"], 64 * mib, "inside /dev"),
            (&["/proc/x"], 64 * mib, "inside /proc"),
            (&["/"], 64 * mib, "which the sandbox manages"),
            (
                &["/a", "/b", "/c"],
                2 * mib,
                "declares 3 volumes (/a, /b, /c)",
            ),
            (&["/vol"], 0, "--volume-size"),
        ];
        for (declared, budget, want) in cases {
            let e = volume_tmpfs("img", &v(declared), &taken, budget).unwrap_err();
            assert!(e.contains(want) && e.contains("img"), "{declared:?}: {e}");
        }
    }

    #[test]
    fn pids_over_the_provider_cap_are_refused() {
        let limits = Limits::default();
        let mut spec = JobSpec::new(format!("sha256:{}", "1".repeat(64)), vec!["x".into()]);
        spec.resources.pids = limits.max_pids;
        assert!(check_pids(&limits, &spec).is_ok());
        spec.resources.pids = limits.max_pids + 1;
        let e = check_pids(&limits, &spec).unwrap_err();
        assert!(
            e.contains("4097 processes") && e.contains("cap of 4096") && e.contains("--max-pids"),
            "{e}"
        );
    }

    #[test]
    fn image_policy_table() {
        let id = format!("sha256:{}", "1".repeat(64));
        let facts = ImageFacts {
            id: id.clone(),
            repo_tags: vec!["ghcr.io/acme/train:1".into()],
            repo_digests: vec![format!("ghcr.io/acme/train@sha256:{}", "2".repeat(64))],
            size: 1000,
            volumes: Vec::new(),
        };
        let p = |allow: &[&str], deny: &[&str], max: u64| Policy {
            image_allow: allow.iter().map(|s| s.to_string()).collect(),
            image_deny: deny.iter().map(|s| s.to_string()).collect(),
            max_image_bytes: max,
            ..Default::default()
        };
        let digest = format!("sha256:{}", "2".repeat(64));
        let cases: Vec<(&str, Policy, Option<&str>)> = vec![
            ("no policy", p(&[], &[], 0), None),
            ("allowed by prefix", p(&["ghcr.io/acme/"], &[], 0), None),
            ("allowed by id", p(&[&id], &[], 0), None),
            ("allowed by repo digest", p(&[&digest], &[], 0), None),
            (
                "not on allow list",
                p(&["docker.io/"], &[], 0),
                Some("not on this provider's allow list"),
            ),
            ("denied", p(&[], &["ghcr.io/acme/train"], 0), Some("denied")),
            ("deny wins", p(&["ghcr.io/"], &[&id], 0), Some("denied")),
            (
                "too big",
                p(&[], &[], 999),
                Some("over this provider's 999-byte limit"),
            ),
            ("fits", p(&[], &[], 1000), None),
        ];
        for (name, policy, want) in cases {
            match (check_image_policy(&policy, &facts), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.contains(w), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }
}
