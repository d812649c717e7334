//! Running one job in a locked-down container.
//!
//! Every job container gets, whatever the spec says: no network, all Linux
//! capabilities dropped, `no-new-privileges`, a non-root user (65534), a
//! read-only root filesystem with a size-limited `/tmp`, memory (swap off),
//! CPU and pids limits, an open-files limit, inputs mounted read-only, a log
//! driver capped in size, and a wall-clock timeout after which it is killed.
//! Containers carry the labels `kiln.job` and `kiln.node`, so anything a
//! crash leaves behind can be found and reaped ([`Runner::reap_orphans`]).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, HostConfigLogConfig, ResourcesUlimits,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use futures::StreamExt;
use kiln_protocol::{ContentId, JobId, JobSpec, Manifest, ManifestEntry, Outcome, UnixMillis};

pub const LABEL_JOB: &str = "kiln.job";
pub const LABEL_NODE: &str = "kiln.node";
/// The uid:gid jobs run as (`nobody`).
pub const JOB_USER: &str = "65534:65534";

/// Limits the provider applies to every job.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Per stream (stdout, stderr).
    pub log_cap_bytes: u64,
    pub tmp_size_bytes: u64,
    pub max_output_bytes: u64,
    pub nofile: i64,
    /// SIGTERM→SIGKILL grace on timeout.
    pub stop_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            log_cap_bytes: 8 << 20,
            tmp_size_bytes: 64 << 20,
            max_output_bytes: 64 << 20,
            nofile: 1024,
            stop_grace: Duration::from_secs(2),
        }
    }
}

/// A file of the job's output, read back from the output directory.
#[derive(Debug)]
pub struct OutputFile {
    pub entry: ManifestEntry,
    pub bytes: Vec<u8>,
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
    pub logs_truncated: bool,
    pub manifest: Manifest,
    pub outputs: Vec<OutputFile>,
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
            logs_truncated: false,
            manifest: Manifest::default(),
            outputs: Vec::new(),
        }
    }
}

/// An input already on local disk, to be mounted read-only.
#[derive(Clone, Debug)]
pub struct LocalInput {
    pub host_path: PathBuf,
    pub container_path: String,
}

/// Runs jobs on the local Docker engine.
#[derive(Clone)]
pub struct Runner {
    docker: Docker,
    work_dir: PathBuf,
    node_label: String,
    limits: Limits,
}

impl Runner {
    pub fn new(docker: Docker, work_dir: PathBuf, node_label: String, limits: Limits) -> Self {
        Self {
            docker,
            work_dir,
            node_label,
            limits,
        }
    }

    pub fn job_dir(&self, job: &JobId) -> PathBuf {
        self.work_dir.join(job.to_string())
    }

    /// Removes containers and job directories a previous run of this node
    /// left behind (after a crash or SIGKILL). Returns the job ids reaped.
    pub async fn reap_orphans(&self) -> Result<Vec<String>, bollard::errors::Error> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_NODE}={}", self.node_label)],
        )]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await?;
        let mut reaped = Vec::new();
        for c in list {
            let job = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_JOB))
                .cloned()
                .unwrap_or_default();
            if let Some(id) = c.id {
                self.remove_container(&id).await;
                tracing::warn!(job = %job, container = %&id[..12.min(id.len())], "reaped a container left by a previous run");
                reaped.push(job);
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.work_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(reaped)
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

    /// Resolves the spec's pinned image to a local image id, refusing an
    /// image whose id does not match the pin.
    async fn resolve_image(&self, spec: &JobSpec) -> Result<String, String> {
        let reference = &spec.image.0;
        let inspect = self.docker.inspect_image(reference).await.map_err(|e| {
            format!(
                "image {reference} is not present on this provider ({e}); no registry is reachable, \
                 so it must be loaded with `docker load` or built locally first"
            )
        })?;
        let id = inspect.id.unwrap_or_default();
        if spec.image.is_image_id() && Some(id.as_str()) != spec.image.digest() {
            return Err(format!(
                "image id mismatch: asked for {reference}, found {id}"
            ));
        }
        Ok(id)
    }

    /// Runs `spec` to completion (or timeout) and collects logs and outputs.
    /// Never returns an error: anything that goes wrong becomes a failed
    /// report with the reason, so the buyer always gets an answer.
    pub async fn run(
        &self,
        job: JobId,
        spec: &JobSpec,
        inputs: &[LocalInput],
        gpu_uuids: &[String],
    ) -> RunReport {
        let image_id = match self.resolve_image(spec).await {
            Ok(id) => id,
            Err(e) => return RunReport::failed_before_start(e, String::new()),
        };
        let dir = self.job_dir(&job);
        let out_dir = dir.join("out");
        if let Err(e) = prepare_dirs(&dir, &out_dir) {
            return RunReport::failed_before_start(
                format!("cannot prepare the job directory: {e}"),
                image_id,
            );
        }
        let name = format!("kiln-{job}");
        let report = match self
            .run_container(&name, job, spec, &image_id, &out_dir, inputs, gpu_uuids)
            .await
        {
            Ok(r) => r,
            Err(e) => RunReport::failed_before_start(e, image_id.clone()),
        };
        self.remove_container(&name).await;
        let _ = std::fs::remove_dir_all(&dir);
        report
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_container(
        &self,
        name: &str,
        job: JobId,
        spec: &JobSpec,
        image_id: &str,
        out_dir: &Path,
        inputs: &[LocalInput],
        gpu_uuids: &[String],
    ) -> Result<RunReport, String> {
        let r = &spec.resources;
        let mut binds = vec![format!("{}:{}:rw", out_dir.display(), spec.output_path)];
        binds.extend(
            inputs
                .iter()
                .map(|i| format!("{}:{}:ro", i.host_path.display(), i.container_path)),
        );
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(format!("KILN_JOB_ID={job}"));
        env.push(format!("KILN_OUTPUT_DIR={}", spec.output_path));
        let memory = i64::try_from(r.memory.0).map_err(|_| "memory limit too large".to_string())?;
        let device_requests = (!gpu_uuids.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                device_ids: Some(gpu_uuids.to_vec()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]
        });
        let host_config = HostConfig {
            network_mode: Some("none".into()),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            readonly_rootfs: Some(true),
            memory: Some(memory),
            memory_swap: Some(memory), // equal to memory: no swap
            nano_cpus: Some(i64::from(r.cpus.0) * 1_000_000),
            pids_limit: Some(i64::from(r.pids)),
            ulimits: Some(vec![ResourcesUlimits {
                name: Some("nofile".into()),
                soft: Some(self.limits.nofile),
                hard: Some(self.limits.nofile),
            }]),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_string(),
                format!("rw,noexec,nosuid,nodev,size={}", self.limits.tmp_size_bytes),
            )])),
            binds: Some(binds),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    (
                        "max-size".to_string(),
                        self.limits.log_cap_bytes.to_string(),
                    ),
                    ("max-file".to_string(), "1".to_string()),
                ])),
            }),
            device_requests,
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image_id.to_string()),
            entrypoint: spec.entrypoint.clone(),
            cmd: Some(spec.command.clone()),
            env: Some(env),
            user: Some(JOB_USER.into()),
            network_disabled: Some(true),
            labels: Some(HashMap::from([
                (LABEL_JOB.to_string(), job.to_string()),
                (LABEL_NODE.to_string(), self.node_label.clone()),
            ])),
            host_config: Some(host_config),
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

        let started_at = UnixMillis::now();
        let t0 = Instant::now();
        self.docker
            .start_container(name, None)
            .await
            .map_err(|e| format!("the container did not start: {e}"))?;

        let timeout = Duration::from_secs(spec.resources.timeout.0);
        let mut wait = self
            .docker
            .wait_container(name, None::<WaitContainerOptions>);
        let waited = tokio::time::timeout(timeout, wait.next()).await;
        let (mut outcome, mut exit_code, mut error) = match waited {
            Ok(Some(Ok(resp))) => (Outcome::Succeeded, Some(resp.status_code), None),
            // bollard reports a non-zero exit as an error carrying the code.
            Ok(Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. }))) => {
                (Outcome::Failed, Some(code), None)
            }
            Ok(Some(Err(e))) => (
                Outcome::Failed,
                None,
                Some(format!("waiting for the container failed: {e}")),
            ),
            Ok(None) => (
                Outcome::Failed,
                None,
                Some("the Docker engine stopped reporting on the container".into()),
            ),
            Err(_) => {
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
                (
                    Outcome::TimedOut,
                    None,
                    Some(format!(
                        "killed after the {}s wall-clock limit",
                        spec.resources.timeout.0
                    )),
                )
            }
        };
        drop(wait);
        let wall_ms = t0.elapsed().as_millis() as u64;
        let finished_at = UnixMillis::now();
        if exit_code.is_some_and(|c| c != 0) {
            outcome = Outcome::Failed;
        }
        if let Ok(info) = self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
            && let Some(state) = info.state
        {
            if state.oom_killed == Some(true) {
                outcome = Outcome::Failed;
                error = Some(format!(
                    "killed: out of memory (limit {})",
                    spec.resources.memory
                ));
            }
            if exit_code.is_none() && outcome != Outcome::TimedOut {
                exit_code = state.exit_code;
            }
        }

        let (stdout, stderr, logs_truncated) = self.collect_logs(name).await;
        let (manifest, outputs) = match collect_outputs(out_dir, self.limits.max_output_bytes) {
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
            logs_truncated,
            manifest,
            outputs,
        })
    }

    /// Reads both log streams, each capped at `log_cap_bytes`.
    async fn collect_logs(&self, name: &str) -> (Vec<u8>, Vec<u8>, bool) {
        let cap = self.limits.log_cap_bytes as usize;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut truncated = false;
        let mut logs = self.docker.logs(
            name,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                follow: false,
                tail: "all".into(),
                ..Default::default()
            }),
        );
        while let Some(item) = logs.next().await {
            let (buf, msg) = match item {
                Ok(LogOutput::StdOut { message }) => (&mut stdout, message),
                Ok(LogOutput::StdErr { message }) => (&mut stderr, message),
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(container = name, "reading logs failed: {e}");
                    break;
                }
            };
            let room = cap.saturating_sub(buf.len());
            if msg.len() > room {
                truncated = true;
            }
            buf.extend_from_slice(&msg[..msg.len().min(room)]);
        }
        (stdout, stderr, truncated)
    }
}

fn prepare_dirs(dir: &Path, out_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(out_dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    // The job runs as uid 65534 and must be able to write its outputs.
    std::fs::set_permissions(out_dir, std::fs::Permissions::from_mode(0o777))
}

/// Walks the output directory (never following symlinks), hashing each
/// regular file into a manifest entry.
pub fn collect_outputs(
    out_dir: &Path,
    max_bytes: u64,
) -> Result<(Manifest, Vec<OutputFile>), String> {
    let mut files = Vec::new();
    let mut total = 0u64;
    let mut stack = vec![out_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| format!("cannot read outputs in {}: {e}", dir.display()))?;
        for e in entries.flatten() {
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
            let bytes =
                std::fs::read(&path).map_err(|e| format!("cannot read output {rel}: {e}"))?;
            files.push(OutputFile {
                entry: ManifestEntry {
                    path: rel,
                    cid: ContentId::of_bytes(&bytes),
                    size: bytes.len() as u64,
                    executable: meta.permissions().mode() & 0o111 != 0,
                },
                bytes,
            });
        }
    }
    let manifest = Manifest::new(files.iter().map(|f| f.entry.clone()).collect())
        .map_err(|e| e.to_string())?;
    Ok((manifest, files))
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
        let (m, files) = collect_outputs(d.path(), 1000).unwrap();
        let paths: Vec<_> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["b.txt", "sub/a.txt"]);
        assert_eq!(files.len(), 2);
        assert_eq!(m.entries[0].cid, ContentId::of_bytes(b"bee"));
        assert!(collect_outputs(d.path(), 3).is_err());
    }
}
