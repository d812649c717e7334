//! Integration tests against the real local Docker engine: build the workload
//! image offline and run containers from it the way a provider runs jobs
//! (no network, read-only root, tmpfs `/tmp`, no capabilities, uid 65534).

use std::collections::HashMap;
use std::error::Error;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectNetworkOptions, RemoveContainerOptionsBuilder,
    StartContainerOptions,
};

type TestResult = Result<(), Box<dyn Error>>;

#[derive(Debug)]
struct Run {
    code: i64,
    stdout: String,
    stderr: String,
}

/// The sandbox a provider gives a job; `network` is a Docker network mode.
fn sandbox(network: &str, binds: Vec<String>) -> HostConfig {
    HostConfig {
        network_mode: Some(network.to_string()),
        readonly_rootfs: Some(true),
        tmpfs: Some(HashMap::from([(
            "/tmp".to_string(),
            "rw,nosuid,nodev,size=64m".to_string(),
        )])),
        cap_drop: Some(vec!["ALL".to_string()]),
        security_opt: Some(vec!["no-new-privileges".to_string()]),
        binds: if binds.is_empty() { None } else { Some(binds) },
        ..Default::default()
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// create → start → wait → logs → remove (the container is removed even if a
/// step in between fails).
async fn run(
    docker: &Docker,
    image: &str,
    args: &[&str],
    host_config: HostConfig,
) -> Result<Run, Box<dyn Error>> {
    let name = format!(
        "kiln-docker-test-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: Some(args.iter().map(|s| s.to_string()).collect()),
        tty: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::new().name(&name).build();
    let created = docker.create_container(Some(options), body).await?;
    let outcome = async {
        docker
            .start_container(&created.id, None::<StartContainerOptions>)
            .await?;
        let code = kiln_docker::wait_exit_code(docker, &created.id).await?;
        let logs = kiln_docker::collect_logs(docker, &created.id).await?;
        Ok::<_, Box<dyn Error>>(Run {
            code,
            stdout: logs.stdout_lossy(),
            stderr: logs.stderr_lossy(),
        })
    }
    .await;
    let remove = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    docker.remove_container(&created.id, Some(remove)).await?;
    outcome
}

async fn setup() -> Result<(Docker, String), Box<dyn Error>> {
    let docker = kiln_docker::connect().await?;
    let image = kiln_docker::ensure_workload_image(&docker).await?;
    Ok((docker, image.id))
}

/// A host directory the container (uid 65534) can write to.
fn writable_tempdir() -> Result<tempfile::TempDir, Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

fn bind(host: &Path, container: &str, mode: &str) -> String {
    format!("{}:{container}:{mode}", host.display())
}

#[tokio::test]
async fn image_is_content_addressed_and_idempotent() -> TestResult {
    let docker = kiln_docker::connect().await?;
    let (a, b, c) = tokio::join!(
        kiln_docker::ensure_workload_image(&docker),
        kiln_docker::ensure_workload_image(&docker),
        kiln_docker::ensure_workload_image(&docker),
    );
    let (a, b, c) = (a?, b?, c?);
    assert_eq!(a.tag, kiln_docker::workload_image_tag());
    assert!(a.id.starts_with("sha256:"), "{}", a.id);
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(
        kiln_docker::image_exists(&docker, &a.tag).await?,
        Some(a.id.clone())
    );
    assert_eq!(
        kiln_docker::image_exists(&docker, "kiln-no-such-image:0").await?,
        None
    );
    let inspect = docker.inspect_image(&a.tag).await?;
    let config = inspect.config.unwrap_or_default();
    assert_eq!(config.user.as_deref(), Some("65534:65534"));
    assert_eq!(config.entrypoint, Some(vec!["/kiln-workload".to_string()]));
    let labels = config.labels.unwrap_or_default();
    assert_eq!(
        labels.get("io.kiln.workload.blake3"),
        Some(&kiln_docker::workload_digest())
    );
    Ok(())
}

#[tokio::test]
async fn echo_hello() -> TestResult {
    let (docker, image) = setup().await?;
    let r = run(&docker, &image, &["echo", "hello"], sandbox("none", vec![])).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "hello\n");
    assert_eq!(r.stderr, "");
    Ok(())
}

#[tokio::test]
async fn exit_code_and_stderr_are_reported() -> TestResult {
    let (docker, image) = setup().await?;
    let r = run(
        &docker,
        &image,
        &["exit", "7", "going", "away"],
        sandbox("none", vec![]),
    )
    .await?;
    assert_eq!(r.code, 7, "{r:?}");
    assert_eq!(r.stderr, "going away\n");
    let r = run(
        &docker,
        &image,
        &["no-such-command"],
        sandbox("none", vec![]),
    )
    .await?;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("usage:"), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn no_network_connect_fails_with_42() -> TestResult {
    let (docker, image) = setup().await?;
    let r = run(
        &docker,
        &image,
        &["connect", "127.0.0.1:1", "1000"],
        sandbox("none", vec![]),
    )
    .await?;
    assert_eq!(r.code, 42, "{r:?}");
    assert!(r.stderr.starts_with("connect failed: "), "{r:?}");
    Ok(())
}

/// Stronger than a refused loopback port: a listener on the host is reachable
/// through the default bridge, and unreachable with network mode `none`.
#[tokio::test]
async fn network_none_cannot_reach_host_listener() -> TestResult {
    let (docker, image) = setup().await?;
    let bridge = docker
        .inspect_network("bridge", None::<InspectNetworkOptions>)
        .await?;
    // Docker 20.10 lists only the subnet of the default bridge; the gateway
    // (the host's docker0 address) is then the subnet's first address.
    let gateway = bridge
        .ipam
        .and_then(|ipam| ipam.config)
        .and_then(|configs| {
            configs.into_iter().find_map(|c| {
                c.gateway
                    .and_then(|g| g.parse::<Ipv4Addr>().ok())
                    .or_else(|| first_host(c.subnet.as_deref()?))
            })
        })
        .ok_or("cannot tell the default bridge network's gateway")?;
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let port = listener.local_addr()?.port();
    let accept = tokio::spawn(async move {
        loop {
            if listener.accept().await.is_err() {
                break;
            }
        }
    });
    let target = format!("{gateway}:{port}");

    let open = run(
        &docker,
        &image,
        &["connect", &target, "3000"],
        sandbox("bridge", vec![]),
    )
    .await?;
    let closed = run(
        &docker,
        &image,
        &["connect", &target, "3000"],
        sandbox("none", vec![]),
    )
    .await?;
    accept.abort();

    assert_eq!(
        open.code, 0,
        "positive control through the bridge failed: {open:?}"
    );
    assert!(open.stdout.contains("connect ok"), "{open:?}");
    assert_eq!(closed.code, 42, "{closed:?}");
    Ok(())
}

/// `172.17.0.0/16` → `172.17.0.1`.
fn first_host(subnet: &str) -> Option<Ipv4Addr> {
    let (net, _) = subnet.split_once('/')?;
    let net: Ipv4Addr = net.parse().ok()?;
    Some(Ipv4Addr::from(u32::from(net) + 1))
}

#[tokio::test]
async fn write_to_bind_mounted_out() -> TestResult {
    let (docker, image) = setup().await?;
    let out = writable_tempdir()?;
    let r = run(
        &docker,
        &image,
        &["write", "x", "1000", "1"],
        sandbox("none", vec![bind(out.path(), "/out", "rw")]),
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    let printed = r
        .stdout
        .lines()
        .find_map(|l| l.strip_suffix("  /out/x"))
        .ok_or_else(|| format!("no `<hash>  /out/x` line in {:?}", r.stdout))?;
    let bytes = std::fs::read(out.path().join("x"))?;
    assert_eq!(bytes.len(), 1000);
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), printed);
    Ok(())
}

#[tokio::test]
async fn root_fs_is_read_only() -> TestResult {
    let (docker, image) = setup().await?;
    // No /out mount: the workload must try to create /out in the image root.
    let r = run(
        &docker,
        &image,
        &["write", "x", "10"],
        sandbox("none", vec![]),
    )
    .await?;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("Read-only file system") || r.stderr.contains("denied"),
        "{r:?}"
    );
    Ok(())
}

#[tokio::test]
async fn demo_is_deterministic_with_read_only_inputs() -> TestResult {
    let (docker, image) = setup().await?;
    let input = tempfile::tempdir()?;
    std::fs::create_dir_all(input.path().join("sub"))?;
    std::fs::write(input.path().join("a.txt"), b"alpha\n")?;
    std::fs::write(input.path().join("sub/b.bin"), [0u8, 1, 2, 3])?;
    for p in [input.path().to_path_buf(), input.path().join("sub")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    let mut results = Vec::new();
    for _ in 0..2 {
        let out = writable_tempdir()?;
        let r = run(
            &docker,
            &image,
            &["demo", "7"],
            sandbox(
                "none",
                vec![
                    bind(input.path(), "/in", "ro"),
                    bind(out.path(), "/out", "rw"),
                ],
            ),
        )
        .await?;
        assert_eq!(r.code, 0, "{r:?}");
        let result = std::fs::read_to_string(out.path().join("result.txt"))?;
        assert!(result.contains("seed=7\ninputs=2\n"), "{result}");
        let hashes = std::fs::read_to_string(out.path().join("hashes.txt"))?;
        let a = blake3::hash(b"alpha\n").to_hex().to_string();
        assert!(hashes.contains(&format!("{a}  a.txt\n")), "{hashes}");
        assert!(hashes.contains("  sub/b.bin\n"), "{hashes}");
        results.push((result, r.stdout));
    }
    assert_eq!(results[0], results[1]);
    Ok(())
}
