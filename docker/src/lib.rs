//! # kiln-docker: Kiln's bridge to the local Docker engine
//!
//! Both the provider node (which runs jobs) and the tooling (which prepares
//! and checks them) need the same few things from Docker. They live here.
//!
//! ## Connecting
//!
//! [`connect`] opens a [`bollard::Docker`] client the way the `docker` CLI
//! does: `DOCKER_HOST` if set, else `unix:///var/run/docker.sock`. Two details
//! matter:
//!
//! * **Version negotiation.** bollard speaks a newer API version than many
//!   engines in the field (bollard 0.21 defaults to API 1.5x; Debian's Docker
//!   20.10 speaks 1.41). An engine rejects a request whose version is newer
//!   than its own ("client version 1.5x is too new"), so [`connect`] calls
//!   [`Docker::negotiate_version`], which downgrades the client to the
//!   engine's version.
//! * **Liveness.** Creating the client does not touch the socket; [`connect`]
//!   then pings the engine, so "Docker is not running" is reported once,
//!   clearly, instead of as a puzzling failure deep inside the first real
//!   request.
//!
//! ## The workload image
//!
//! Kiln's demo and test job is the `kiln-workload` program (the `workload/`
//! crate). This crate's build script compiles it as a *static* executable and
//! the library embeds it as [`WORKLOAD_ELF`]. Because it depends on nothing,
//! it can run alone in a `FROM scratch` image, so the image can be built
//! offline, with no registry and nothing to pull:
//!
//! ```text
//! FROM scratch
//! COPY kiln-workload /kiln-workload
//! USER 65534:65534
//! ENTRYPOINT ["/kiln-workload"]
//! ```
//!
//! [`ensure_workload_image`] builds that image through the engine's build API
//! from a build context (a tar archive) made in memory, and tags it
//! `kiln-workload:<first 16 hex digits of blake3(ELF)>`. The tag is therefore
//! content-addressed: a changed workload gets a new tag, and an existing tag is
//! reused without rebuilding. [`build_workload_variant`] builds the same image
//! with more instructions (e.g. a `VOLUME`), for tests that need an image with
//! a property a buyer's image may have.
//!
//! ## Running containers (bollard notes)
//!
//! The helpers [`wait_exit_code`] and [`collect_logs`] encode two bollard
//! behaviours that are easy to trip over:
//!
//! * `wait_container` yields `Err(DockerContainerWaitError { code, .. })` for a
//!   non-zero exit status instead of `Ok` with the code;
//! * its default condition, `not-running`, returns at once for a container
//!   that was created but not yet started, so wait *after* starting it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kiln_docker::DockerError> {
//! let docker = kiln_docker::connect().await?;
//! let image = kiln_docker::ensure_workload_image(&docker).await?;
//! println!("workload image {} ({})", image.tag, image.id);
//! # Ok(()) }
//! ```

pub mod gpu_image;
pub mod tar;

pub use gpu_image::build_gpu_workload_image;

use std::error::Error as StdError;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, LogsOptionsBuilder, WaitContainerOptions,
};
use futures::StreamExt;
use tokio::sync::Mutex;

/// The statically linked `kiln-workload` executable, built by `build.rs`.
pub const WORKLOAD_ELF: &[u8] = include_bytes!(env!("KILN_WORKLOAD_ELF"));

/// Repository part of the workload image's tag.
pub const WORKLOAD_IMAGE_REPO: &str = "kiln-workload";

/// Path of the workload executable inside the image (its entrypoint).
pub const WORKLOAD_PATH_IN_IMAGE: &str = "/kiln-workload";

/// User the workload image runs as (`nobody:nogroup`).
pub const WORKLOAD_USER: &str = "65534:65534";

/// Where the engine is expected when `DOCKER_HOST` is not set.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// How long [`connect`] waits for the engine to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from talking to the Docker engine.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// No usable engine: nothing listening, permission denied, timed out...
    #[error(
        "Docker engine not reachable at {addr}: {cause}; start it with `sudo systemctl start docker` (or set DOCKER_HOST)"
    )]
    Unreachable {
        /// The address tried (`DOCKER_HOST` or the default socket).
        addr: String,
        /// What went wrong, with the underlying error chain flattened.
        cause: String,
    },
    /// An API call failed.
    #[error("Docker {op} failed: {}", chain(.error))]
    Api {
        /// What we were doing, e.g. `inspect image kiln-workload:…`.
        op: String,
        /// The bollard error (kept for matching, e.g. on HTTP status codes).
        error: BollardError,
    },
    /// The engine reported an error while building an image.
    #[error("building image {tag} failed: {message}")]
    ImageBuild {
        /// The tag being built.
        tag: String,
        /// The engine's message, with the build's last output lines.
        message: String,
    },
    /// The engine answered something we did not expect.
    #[error("unexpected answer from Docker during {op}: {message}")]
    Unexpected {
        /// What we were doing.
        op: String,
        /// What was odd.
        message: String,
    },
}

/// An error and its sources, joined with `: ` (bollard's top-level messages,
/// such as "error in the hyper legacy client", hide the useful part).
fn chain(error: &dyn StdError) -> String {
    let mut out = error.to_string();
    let mut cur = error.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

fn api(op: impl Into<String>, error: BollardError) -> DockerError {
    DockerError::Api {
        op: op.into(),
        error,
    }
}

/// The engine address [`connect`] uses: `DOCKER_HOST`, else the default socket.
pub fn docker_host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string())
}

/// Connects to the local engine (honouring `DOCKER_HOST`), negotiates the API
/// version down to the engine's, and pings it.
///
/// Every failure becomes [`DockerError::Unreachable`], whose message says how
/// to fix it.
pub async fn connect() -> Result<Docker, DockerError> {
    let addr = docker_host();
    let unreachable = |cause: String| DockerError::Unreachable {
        addr: addr.clone(),
        cause,
    };
    let docker = Docker::connect_with_defaults().map_err(|e| unreachable(chain(&e)))?;
    let handshake = async {
        let docker = docker.negotiate_version().await?;
        docker.ping().await?;
        Ok::<_, BollardError>(docker)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(Ok(docker)) => {
            tracing::debug!(%addr, api = %docker.client_version(), "connected to Docker engine");
            Ok(docker)
        }
        Ok(Err(e)) => Err(unreachable(chain(&e))),
        Err(_) => Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
}

/// blake3 of [`WORKLOAD_ELF`], as 64 lowercase hex digits.
pub fn workload_digest() -> String {
    blake3::hash(WORKLOAD_ELF).to_hex().to_string()
}

/// The workload image's tag: `kiln-workload:<first 16 hex of blake3(ELF)>`.
pub fn workload_image_tag() -> String {
    format!("{WORKLOAD_IMAGE_REPO}:{}", &workload_digest()[..16])
}

/// A locally available workload image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadImage {
    /// Image id, `sha256:…`.
    pub id: String,
    /// Tag, `kiln-workload:<16 hex>`.
    pub tag: String,
}

/// Returns the id (`sha256:…`) of the local image `reference` (a tag or an
/// id), or `None` if the engine does not have it.
pub async fn image_exists(docker: &Docker, reference: &str) -> Result<Option<String>, DockerError> {
    match docker.inspect_image(reference).await {
        Ok(inspect) => match inspect.id {
            Some(id) => Ok(Some(id)),
            None => Err(DockerError::Unexpected {
                op: format!("inspect image {reference}"),
                message: "the image has no Id".into(),
            }),
        },
        Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(api(format!("inspect image {reference}"), e)),
    }
}

/// Serialises image builds within this process (tests run in parallel).
static BUILD_LOCK: Mutex<()> = Mutex::const_new(());

/// The Dockerfile of the workload image.
fn workload_dockerfile(digest: &str) -> String {
    format!(
        "FROM scratch\n\
         LABEL io.kiln.workload.blake3=\"{digest}\"\n\
         COPY kiln-workload {WORKLOAD_PATH_IN_IMAGE}\n\
         USER {WORKLOAD_USER}\n\
         ENTRYPOINT [\"{WORKLOAD_PATH_IN_IMAGE}\"]\n"
    )
}

/// The build context: the Dockerfile and the executable (mode 0755).
fn workload_context(digest: &str) -> Result<Vec<u8>, DockerError> {
    let mut t = tar::TarBuilder::new();
    let bad = |e: tar::TarError| DockerError::Unexpected {
        op: "make build context".into(),
        message: e.to_string(),
    };
    t.add_file("Dockerfile", 0o644, workload_dockerfile(digest).as_bytes())
        .map_err(bad)?;
    t.add_file("kiln-workload", 0o755, WORKLOAD_ELF)
        .map_err(bad)?;
    Ok(t.finish())
}

/// Makes sure the workload image exists locally, building it if needed.
///
/// Safe to call concurrently: builds in this process are serialised, and an
/// image that already carries the tag (built by anyone) counts as success.
/// No network access is needed.
pub async fn ensure_workload_image(docker: &Docker) -> Result<WorkloadImage, DockerError> {
    let digest = workload_digest();
    let tag = workload_image_tag();
    if let Some(id) = image_exists(docker, &tag).await? {
        return Ok(WorkloadImage { id, tag });
    }
    let _guard = BUILD_LOCK.lock().await;
    // Someone may have built it while we waited.
    if let Some(id) = image_exists(docker, &tag).await? {
        return Ok(WorkloadImage { id, tag });
    }
    tracing::info!(%tag, bytes = WORKLOAD_ELF.len(), "building workload image");
    let context = workload_context(&digest)?;
    let id = build_from_context(docker, &tag, context).await?;
    tracing::info!(%tag, %id, "workload image ready");
    Ok(WorkloadImage { id, tag })
}

/// Repository part of the tags [`build_workload_variant`] gives.
pub const WORKLOAD_VARIANT_REPO: &str = "kiln-workload-variant";

/// Builds (or reuses) the workload image with `extra` Dockerfile
/// instructions appended, and the empty directories `dirs` (mode 0777) in
/// the build context for those instructions to `COPY`: how tests make an
/// image with a property a buyer's image may have (a declared `VOLUME`, a
/// directory owned by the job's user) with no registry and no `RUN`.
///
/// The tag is content-addressed like the workload's:
/// `kiln-workload-variant:<16 hex of blake3(ELF digest, extra, dirs)>`.
pub async fn build_workload_variant(
    docker: &Docker,
    extra: &str,
    dirs: &[&str],
) -> Result<WorkloadImage, DockerError> {
    let digest = workload_digest();
    let mut h = blake3::Hasher::new();
    h.update(digest.as_bytes());
    h.update(&(extra.len() as u64).to_le_bytes());
    h.update(extra.as_bytes());
    for d in dirs {
        h.update(&(d.len() as u64).to_le_bytes());
        h.update(d.as_bytes());
    }
    let tag = format!("{WORKLOAD_VARIANT_REPO}:{}", &h.finalize().to_hex()[..16]);
    if let Some(id) = image_exists(docker, &tag).await? {
        return Ok(WorkloadImage { id, tag });
    }
    let _guard = BUILD_LOCK.lock().await;
    if let Some(id) = image_exists(docker, &tag).await? {
        return Ok(WorkloadImage { id, tag });
    }
    let bad = |e: tar::TarError| DockerError::Unexpected {
        op: format!("make the build context of {tag}"),
        message: e.to_string(),
    };
    let mut dockerfile = workload_dockerfile(&digest);
    dockerfile.push_str(extra);
    if !dockerfile.ends_with('\n') {
        dockerfile.push('\n');
    }
    let mut t = tar::TarBuilder::new();
    t.add_file("Dockerfile", 0o644, dockerfile.as_bytes())
        .map_err(bad)?;
    t.add_file("kiln-workload", 0o755, WORKLOAD_ELF)
        .map_err(bad)?;
    for d in dirs {
        t.add_dir(d, 0o777).map_err(bad)?;
    }
    tracing::info!(%tag, "building a workload variant image");
    let id = build_from_context(docker, &tag, t.finish()).await?;
    Ok(WorkloadImage { id, tag })
}

/// Builds the tar build `context` (classic builder, nothing pulled unless the
/// Dockerfile asks for it) and tags the result `tag`; returns the image id.
///
/// The build stream is drained to the end. bollard turns an `errorDetail`
/// line into `Err(DockerStreamError)`; that message, plus the last lines of
/// build output, becomes [`DockerError::ImageBuild`]. If the tag exists
/// afterwards anyway (a concurrent builder won), that counts as success.
pub(crate) async fn build_from_context(
    docker: &Docker,
    tag: &str,
    context: Vec<u8>,
) -> Result<String, DockerError> {
    let options = BuildImageOptionsBuilder::new()
        .dockerfile("Dockerfile")
        .t(tag)
        .rm(true)
        .forcerm(true)
        .build();
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    // Keep the last lines of output to explain a failure.
    let mut tail: Vec<String> = Vec::new();
    let mut failure: Option<String> = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(line) = info
                    .stream
                    .as_deref()
                    .map(str::trim_end)
                    .filter(|l| !l.is_empty())
                {
                    tracing::debug!(target: "kiln_docker::build", "{line}");
                    tail.push(line.to_string());
                    if tail.len() > 10 {
                        tail.remove(0);
                    }
                }
            }
            Err(BollardError::DockerStreamError { error }) => {
                failure = Some(error);
                break;
            }
            Err(e) => {
                failure = Some(chain(&e));
                break;
            }
        }
    }
    drop(stream);
    match image_exists(docker, tag).await? {
        Some(id) => Ok(id),
        None => {
            let mut message =
                failure.unwrap_or_else(|| "the build ended but the tag does not exist".into());
            if !tail.is_empty() {
                message.push_str("\nlast build output:\n");
                message.push_str(&tail.join("\n"));
            }
            Err(DockerError::ImageBuild {
                tag: tag.to_string(),
                message,
            })
        }
    }
}

/// Waits for a *started* container to stop and returns its exit status.
///
/// Hides a bollard quirk: a non-zero exit status arrives as
/// `Err(DockerContainerWaitError { code, .. })`. Call this after
/// `start_container`: with the default `not-running` condition, waiting on a
/// container that is only created returns immediately.
pub async fn wait_exit_code(docker: &Docker, container: &str) -> Result<i64, DockerError> {
    let op = || format!("wait for container {container}");
    let mut stream = docker.wait_container(container, None::<WaitContainerOptions>);
    match stream.next().await {
        Some(Ok(response)) => Ok(response.status_code),
        Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(e)) => Err(api(op(), e)),
        None => Err(DockerError::Unexpected {
            op: op(),
            message: "the wait stream ended without a status".into(),
        }),
    }
}

/// A finished container's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerLogs {
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
}

impl ContainerLogs {
    /// stdout as (lossy) UTF-8.
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as (lossy) UTF-8.
    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Reads all of a container's stdout and stderr so far (no follow).
///
/// Needs a log driver that supports reading (the default `json-file` or
/// `local`) and a container created without a TTY, so the streams stay apart.
pub async fn collect_logs(docker: &Docker, container: &str) -> Result<ContainerLogs, DockerError> {
    let options = LogsOptionsBuilder::new().stdout(true).stderr(true).build();
    let mut stream = docker.logs(container, Some(options));
    let mut logs = ContainerLogs::default();
    while let Some(item) = stream.next().await {
        match item.map_err(|e| api(format!("read logs of container {container}"), e))? {
            bollard::container::LogOutput::StdErr { message } => {
                logs.stderr.extend_from_slice(&message)
            }
            bollard::container::LogOutput::StdOut { message }
            | bollard::container::LogOutput::Console { message } => {
                logs.stdout.extend_from_slice(&message)
            }
            bollard::container::LogOutput::StdIn { .. } => {}
        }
    }
    Ok(logs)
}

/// One layer of an image made without a builder: files as `(path, mode,
/// bytes)`, written as an uncompressed layer tar.
pub fn layer_tar(files: &[(&str, u32, &[u8])]) -> Result<Vec<u8>, DockerError> {
    let mut t = tar::TarBuilder::new();
    for (path, mode, data) in files {
        t.add_file(path, *mode, data)
            .map_err(|e| DockerError::Unexpected {
                op: "make an image layer".into(),
                message: e.to_string(),
            })?;
    }
    Ok(t.finish())
}

/// The workload binary as a layer (at [`WORKLOAD_PATH_IN_IMAGE`], 0755).
pub fn workload_layer() -> Result<Vec<u8>, DockerError> {
    layer_tar(&[(
        WORKLOAD_PATH_IN_IMAGE.trim_start_matches('/'),
        0o755,
        WORKLOAD_ELF,
    )])
}

/// Loads an image of `layers` (uncompressed layer tars, bottom first) into
/// the engine as `tag`, with the workload's entrypoint and user, through
/// `docker load` (no builder, no registry): how tests and benchmarks make
/// images of a chosen size and content, as `docker import` of a root
/// filesystem would. `label` makes the config (so the image id) unique.
/// Returns the image id (`sha256:` of the config).
pub async fn load_layers(
    docker: &Docker,
    tag: &str,
    layers: &[Vec<u8>],
    label: &str,
) -> Result<String, DockerError> {
    use futures::StreamExt;
    use sha2::Digest;
    let digests: Vec<String> = layers
        .iter()
        .map(|l| hex::encode(sha2::Sha256::digest(l)))
        .collect();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":["{WORKLOAD_PATH_IN_IMAGE}"],"User":"{WORKLOAD_USER}","Labels":{{"io.kiln.test":"{label}"}}}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        digests
            .iter()
            .map(|d| format!("\"sha256:{d}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let config_hex = hex::encode(sha2::Sha256::digest(config.as_bytes()));
    let index = format!(
        r#"[{{"Config":"{config_hex}.json","RepoTags":["{tag}"],"Layers":[{}]}}]"#,
        digests
            .iter()
            .map(|d| format!("\"{d}.tar\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let bad = |e: tar::TarError| DockerError::Unexpected {
        op: format!("make the archive of {tag}"),
        message: e.to_string(),
    };
    let mut head = tar::TarBuilder::new();
    head.add_file("manifest.json", 0o644, index.as_bytes())
        .map_err(bad)?;
    head.add_file(&format!("{config_hex}.json"), 0o644, config.as_bytes())
        .map_err(bad)?;
    let mut head = head.finish();
    head.truncate(head.len() - 2 * tar::BLOCK); // more entries follow
    let mut chunks: Vec<bytes::Bytes> = vec![bytes::Bytes::from(head)];
    let mut seen = std::collections::HashSet::new();
    for (l, d) in layers.iter().zip(&digests) {
        if !seen.insert(d) {
            continue;
        }
        let h = tar::header(&format!("{d}.tar"), b'0', 0o644, l.len() as u64).map_err(bad)?;
        chunks.push(bytes::Bytes::copy_from_slice(&h));
        chunks.push(bytes::Bytes::copy_from_slice(l));
        chunks.push(bytes::Bytes::from(vec![0u8; tar::padding(l.len() as u64)]));
    }
    chunks.push(bytes::Bytes::from_static(&tar::END));
    let body = futures::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    let opts = bollard::query_parameters::ImportImageOptions {
        quiet: true,
        ..Default::default()
    };
    let mut s = docker.import_image_stream(opts, body, None);
    while let Some(r) = s.next().await {
        let info = r.map_err(|e| api(format!("load {tag}"), e))?;
        if let Some(m) = info.error_detail.and_then(|d| d.message) {
            return Err(DockerError::Unexpected {
                op: format!("load {tag}"),
                message: m,
            });
        }
    }
    Ok(format!("sha256:{config_hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_workload_is_a_static_elf() {
        assert_eq!(&WORKLOAD_ELF[..4], b"\x7fELF");
        assert!(WORKLOAD_ELF.len() > 10_000);
    }

    #[test]
    fn tag_is_content_addressed() {
        let tag = workload_image_tag();
        let (repo, hex) = tag.split_once(':').unwrap_or_default();
        assert_eq!(repo, WORKLOAD_IMAGE_REPO);
        assert_eq!(hex.len(), 16);
        assert!(workload_digest().starts_with(hex));
    }

    #[test]
    fn context_holds_dockerfile_and_binary() -> Result<(), DockerError> {
        let ctx = workload_context("abc")?;
        assert_eq!(&ctx[..10], b"Dockerfile");
        let text = String::from_utf8_lossy(&ctx[512..1024]);
        assert!(text.starts_with("FROM scratch\n"));
        assert!(text.contains("USER 65534:65534"));
        assert!(text.contains("ENTRYPOINT [\"/kiln-workload\"]"));
        assert_eq!(&ctx[1024..1024 + 13], b"kiln-workload");
        assert_eq!(&ctx[1024 + 100..1024 + 108], b"0000755\0");
        Ok(())
    }

    #[test]
    fn unreachable_message_is_actionable() {
        let e = DockerError::Unreachable {
            addr: "unix:///nope.sock".into(),
            cause: "No such file or directory".into(),
        };
        let s = e.to_string();
        assert!(s.starts_with("Docker engine not reachable at unix:///nope.sock: No such file"));
        assert!(s.contains("sudo systemctl start docker"));
    }

    /// Needs the local engine: a failing Dockerfile step must come back as
    /// `ImageBuild` with the engine's message.
    #[tokio::test]
    async fn build_errors_are_surfaced() -> Result<(), DockerError> {
        let docker = connect().await?;
        let mut t = tar::TarBuilder::new();
        t.add_file("Dockerfile", 0o644, b"FROM scratch\nCOPY missing-file /x\n")
            .map_err(|e| DockerError::Unexpected {
                op: "test".into(),
                message: e.to_string(),
            })?;
        let tag = "kiln-docker-test-broken:0";
        match build_from_context(&docker, tag, t.finish()).await {
            Err(DockerError::ImageBuild { tag: t, message }) => {
                assert_eq!(t, tag);
                assert!(message.contains("missing-file"), "{message}");
                println!("surfaced: {message}");
                Ok(())
            }
            other => panic!("expected ImageBuild error, got {other:?}"),
        }
    }
}
