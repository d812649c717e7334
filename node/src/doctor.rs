//! `kiln-node doctor`: is this machine ready to be a provider?
//!
//! Each check is `{name, status, detail, fix}` with status `ok`, `warn`,
//! `fail` or `skip` (not applicable or not asked for); every `warn` and
//! `fail` says what is wrong and the command or setting that fixes it.
//!
//! Exit code ([`exit_code`]): **0** every check ok (or skipped), **1** at
//! least one check failed, **2** no failure but at least one warning.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bench::cuda;
use crate::gpu::{self, Discovery, NVML_FIX};
use crate::gpu_access::{self, GpuPath};

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

/// One check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    /// The command or setting that fixes a `warn` or `fail`.
    pub fix: Option<String>,
}

impl Check {
    fn new(name: &str, status: Status, detail: impl Into<String>, fix: Option<String>) -> Self {
        Self {
            name: name.into(),
            status,
            detail: detail.into(),
            fix,
        }
    }
    fn ok(name: &str, detail: impl Into<String>) -> Self {
        Self::new(name, Status::Ok, detail, None)
    }
    fn skip(name: &str, detail: impl Into<String>) -> Self {
        Self::new(name, Status::Skip, detail, None)
    }
    fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Status::Warn, detail, Some(fix.into()))
    }
    fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Status::Fail, detail, Some(fix.into()))
    }
}

/// All checks and the exit code they imply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DoctorReport {
    pub checks: Vec<Check>,
    pub exit_code: i32,
}

/// 0 all ok (or skipped), 1 any fail, 2 only warnings.
pub fn exit_code(checks: &[Check]) -> i32 {
    if checks.iter().any(|c| c.status == Status::Fail) {
        1
    } else if checks.iter().any(|c| c.status == Status::Warn) {
        2
    } else {
        0
    }
}

/// What the doctor looks at.
#[derive(Clone, Debug)]
pub struct DoctorOptions {
    pub state_dir: PathBuf,
    /// The coordinator's libp2p multiaddr (`/…/p2p/<peer id>`), for reachability.
    pub coordinator: Option<kiln_net::Addr>,
    /// The coordinator's HTTP base URL, for clock skew (its `Date` header).
    pub coordinator_http: Option<String>,
    /// The address `kiln-node run` will listen on.
    pub listen: Option<kiln_net::Addr>,
    /// Registry hosts pulls are allowed from (`--registry-allow`).
    pub registries: Vec<String>,
    /// The image cache's size (`--image-cache`).
    pub image_cache: u64,
}

const DOCKER_INSTALL: &str = "install Docker Engine (https://docs.docker.com/engine/install/) and start it with `sudo systemctl enable --now docker`; add yourself to the docker group (`sudo usermod -aG docker $USER`) or set DOCKER_HOST";
const TOOLKIT_FIX: &str = "install the NVIDIA Container Toolkit (`sudo apt install nvidia-container-toolkit`) and register it with Docker: `sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`";

struct DockerFacts {
    version: String,
    runtimes: Vec<String>,
    cdi_dirs: Vec<String>,
    root_dir: Option<String>,
}

async fn check_docker(checks: &mut Vec<Check>) -> Option<DockerFacts> {
    let docker = match kiln_docker::connect().await {
        Ok(d) => d,
        Err(e) => {
            checks.push(Check::fail("docker", e.to_string(), DOCKER_INSTALL));
            return None;
        }
    };
    let version = docker
        .version()
        .await
        .ok()
        .and_then(|v| v.version)
        .unwrap_or_else(|| "unknown".into());
    let info = match docker.info().await {
        Ok(i) => i,
        Err(e) => {
            checks.push(Check::fail(
                "docker",
                format!("Docker {version} answers but `info` failed: {e}"),
                "check `docker info` and the engine's log (`journalctl -u docker`)",
            ));
            return None;
        }
    };
    let driver = info.driver.clone().unwrap_or_else(|| "unknown".into());
    let detail = format!(
        "Docker {version} at {}, storage driver {driver}",
        kiln_docker::docker_host()
    );
    // vfs copies every layer; devicemapper and aufs are deprecated.
    if !["vfs", "devicemapper", "aufs"].contains(&driver.as_str()) {
        checks.push(Check::ok("docker", detail));
    } else {
        checks.push(Check::warn(
            "docker",
            format!("{detail}: slow or deprecated for job images"),
            "use the overlay2 storage driver: set {\"storage-driver\": \"overlay2\"} in /etc/docker/daemon.json and restart Docker",
        ));
    }
    Some(DockerFacts {
        version,
        runtimes: info
            .runtimes
            .map(|r| {
                let mut v: Vec<String> = r.into_keys().collect();
                v.sort();
                v
            })
            .unwrap_or_default(),
        cdi_dirs: info.cdi_spec_dirs.unwrap_or_default(),
        root_dir: info.docker_root_dir,
    })
}

/// How GPUs will reach jobs' containers here (see
/// [`crate::gpu_access`]): the toolkit, CDI or built-in injection, or why
/// none can.
fn check_gpu_path(gpus: usize, docker: Option<&DockerFacts>) -> Check {
    if gpus == 0 {
        return Check::skip(GPU_PATH, "no GPUs: not needed");
    }
    let Some(d) = docker else {
        return Check::fail(
            GPU_PATH,
            "GPUs exist but Docker is not reachable, so jobs cannot use them",
            DOCKER_INSTALL,
        );
    };
    let facts = gpu_access::probe(
        &d.runtimes,
        &d.version,
        &d.cdi_dirs,
        gpu_access::nvml_minors(),
    );
    gpu_path_check(&facts)
}

const GPU_PATH: &str = "gpu-path";

/// The check for a host with `facts` (pure).
pub fn gpu_path_check(facts: &gpu_access::HostFacts) -> Check {
    let check = gpu_path_choice(facts);
    if check.status != Status::Ok || facts.mig.is_empty() {
        return check;
    }
    // MIG instances are offered one by one (see `crate::mig`).
    let n = facts.mig.len();
    Check::ok(
        GPU_PATH,
        format!(
            "{}; {n} MIG instance{} offered as GPU units, each given to a container with only its \
             capability device nodes",
            check.detail,
            if n == 1 { "" } else { "s" }
        ),
    )
}

fn gpu_path_choice(facts: &gpu_access::HostFacts) -> Check {
    match gpu_access::choose(facts) {
        Ok(GpuPath::Toolkit) => Check::ok(
            GPU_PATH,
            format!("GPUs reach jobs through {}", GpuPath::Toolkit),
        ),
        Ok(GpuPath::Cdi) => Check::ok(
            GPU_PATH,
            format!(
                "GPUs reach jobs through {} ({} NVIDIA CDI devices)",
                GpuPath::Cdi,
                facts.cdi_devices.len()
            ),
        ),
        Ok(GpuPath::Injected) => Check::ok(
            GPU_PATH,
            format!(
                "GPUs reach jobs through {}: {} NVIDIA device nodes, driver libraries {} \
                 (the NVIDIA Container Toolkit is not needed; with it, Docker sets GPUs up itself)",
                GpuPath::Injected,
                facts.dev_nodes.len(),
                facts
                    .libraries
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Err(why) => Check::fail(GPU_PATH, why, TOOLKIT_FIX),
    }
}

fn check_nvml(d: &Discovery) -> Check {
    match (&d.nvml_version, &d.error) {
        (None, _) => Check::warn(
            "nvml",
            format!(
                "{}: this machine runs CPU-only",
                d.error
                    .as_deref()
                    .unwrap_or("NVML (libnvidia-ml.so.1) is not available")
            ),
            NVML_FIX,
        ),
        (Some(v), Some(e)) => Check::warn(
            "nvml",
            format!("NVML {v} loaded but: {e}"),
            "check `nvidia-smi`; reboot after a driver update; if a GPU fell off the bus, reseat it",
        ),
        (Some(v), None) => Check::ok(
            "nvml",
            format!(
                "NVML {v}, {} GPU(s): {}",
                d.gpus.len(),
                d.gpus
                    .iter()
                    .map(|g| format!("{} ({})", g.name, g.uuid))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    }
}

fn check_driver(d: &Discovery) -> Check {
    const NAME: &str = "driver";
    let cuda_api = cuda::driver_version();
    match (&d.driver_version, cuda_api) {
        (None, None) => Check::warn(
            NAME,
            "no NVIDIA driver (neither libnvidia-ml.so.1 nor libcuda.so.1 loads): GPUs cannot be offered",
            NVML_FIX,
        ),
        (driver, Some(v)) if v < 13000 => Check::warn(
            NAME,
            format!(
                "driver {} supports CUDA {}; Kiln's GPU benchmark needs CUDA 13.0 (driver 580 or newer)",
                driver.as_deref().unwrap_or("unknown"),
                gpu::cuda_version_string(v)
            ),
            "upgrade the NVIDIA driver to 580 or newer (`sudo apt install nvidia-driver-580`) and reboot",
        ),
        (Some(driver), None) => Check::warn(
            NAME,
            format!(
                "driver {driver} but libcuda.so.1 does not load: the CUDA benchmark cannot run"
            ),
            "reinstall the driver's CUDA library (`sudo apt install --reinstall libnvidia-compute-580`) so libcuda.so.1 is on the loader path",
        ),
        (driver, Some(v)) => Check::ok(
            NAME,
            format!(
                "driver {}, CUDA {} (driver API)",
                driver.as_deref().unwrap_or("unknown"),
                gpu::cuda_version_string(v)
            ),
        ),
    }
}

fn check_cublas(d: &Discovery) -> Check {
    const NAME: &str = "cublas";
    if d.gpus.is_empty() && !cuda::driver_present() {
        return Check::skip(NAME, "no GPUs: not needed");
    }
    match cuda::cublas() {
        Ok(l) => Check::ok(NAME, format!("{} ({})", l.path, l.how)),
        Err(e) => Check::warn(
            NAME,
            format!("{e}; GPU benchmarks fall back to Kiln's slower driver-only FP32 kernel"),
            "install cuBLAS 13 (`sudo apt install libcublas-13-0`, part of the CUDA 13 toolkit) or set KILN_CUBLAS_DIR=<dir with libcublas.so.13>",
        ),
    }
}

/// Available bytes on the filesystem holding `path` (or its nearest existing
/// ancestor), from `df -Pk`.
pub fn available_bytes(path: &Path) -> Result<u64, String> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            return Err(format!("no existing directory above {}", path.display()));
        }
    }
    let out = std::process::Command::new("df")
        .arg("-Pk")
        .arg(&p)
        .output()
        .map_err(|e| format!("cannot run df: {e}"))?;
    parse_df(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| format!("cannot read df's output for {}", p.display()))
}

/// The `Available` column (KiB) of `df -Pk`'s data line, in bytes.
pub fn parse_df(out: &str) -> Option<u64> {
    out.lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

const GIB: u64 = 1 << 30;

/// Disk thresholds: fail below 2 GiB, warn below 20 GiB.
pub fn disk_check(name: &str, what: &str, path: &Path, available: u64) -> Check {
    let detail = format!(
        "{:.1} GiB free for {what} ({})",
        available as f64 / GIB as f64,
        path.display()
    );
    let fix = format!(
        "free space on the filesystem of {} (e.g. `docker system prune` for images), or move it to a larger disk{}",
        path.display(),
        if name == "disk-state" {
            " with --state-dir"
        } else {
            " (Docker's data-root in /etc/docker/daemon.json)"
        }
    );
    if available < 2 * GIB {
        Check::fail(name, detail, fix)
    } else if available < 20 * GIB {
        Check::warn(
            name,
            format!("{detail}: job inputs, outputs and images need room"),
            fix,
        )
    } else {
        Check::ok(name, detail)
    }
}

fn check_disk(name: &str, what: &str, path: &Path) -> Check {
    match available_bytes(path) {
        Ok(b) => disk_check(name, what, path, b),
        Err(e) => Check::warn(
            name,
            e,
            "make sure `df` is installed (coreutils) and the path exists",
        ),
    }
}

/// Key file mode check: the identity key must be readable by its owner only.
pub fn key_check(path: &Path, mode: Option<u32>) -> Check {
    const NAME: &str = "key-permissions";
    match mode {
        None => Check::skip(
            NAME,
            format!(
                "{} does not exist yet; `kiln-node run` creates it with mode 0600",
                path.display()
            ),
        ),
        Some(m) if m & 0o077 != 0 => Check::fail(
            NAME,
            format!(
                "{} has mode {:04o}: other users can read the provider's signing key",
                path.display(),
                m & 0o7777
            ),
            format!(
                "`chmod 600 {}` (and consider the key leaked: move it away to get a new identity)",
                path.display()
            ),
        ),
        Some(m) => Check::ok(NAME, format!("{} mode {:04o}", path.display(), m & 0o7777)),
    }
}

fn check_ports(listen: Option<&kiln_net::Addr>) -> Check {
    const NAME: &str = "ports";
    let Some(addr) = listen else {
        return Check::ok(
            NAME,
            "listening on an ephemeral TCP port (default /ip4/0.0.0.0/tcp/0)",
        );
    };
    let s = addr.to_string();
    let parts: Vec<&str> = s.split('/').collect();
    let (ip, port) = match parts.as_slice() {
        ["", "ip4" | "ip6", ip, "tcp", port, ..] => (ip.to_string(), port.parse::<u16>().ok()),
        _ => {
            return Check::skip(
                NAME,
                format!("{s}: only /ip4|ip6/…/tcp/<port> addresses are checked"),
            );
        }
    };
    let Some(port) = port else {
        return Check::fail(
            NAME,
            format!("{s}: the port is not a number"),
            "use --listen /ip4/0.0.0.0/tcp/<port>",
        );
    };
    if port == 0 {
        return Check::ok(NAME, format!("{s}: an ephemeral port"));
    }
    let host = if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    match TcpListener::bind(&host) {
        Ok(_) => Check::ok(
            NAME,
            format!(
                "TCP {host} is free; let the coordinator reach it (`sudo ufw allow {port}/tcp`)"
            ),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("cannot listen on TCP {host}: {e}"),
            format!(
                "stop what uses it (`sudo ss -ltnp 'sport = :{port}'`) or choose another port with --listen /ip4/0.0.0.0/tcp/<port>"
            ),
        ),
    }
}

/// Seconds since the epoch of an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_http_date(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = months.iter().position(|x| x == month)? as i64 + 1;
    let d: i64 = day.parse().ok()?;
    let y: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, mi, se] = hms.as_slice() else {
        return None;
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

/// Clock-skew thresholds: ok within 2 s, warn within 10 s, fail beyond
/// (signed messages live for seconds to minutes).
pub fn skew_check(skew_ms: i64, url: &str) -> Check {
    const NAME: &str = "clock-skew";
    let detail = format!(
        "local clock is {:+.1} s from the coordinator's ({url})",
        -skew_ms as f64 / 1000.0
    );
    let fix = "synchronise the clock with NTP: `sudo timedatectl set-ntp true` (check with `timedatectl status`)";
    match skew_ms.unsigned_abs() {
        0..=2_000 => Check::ok(NAME, detail),
        2_001..=10_000 => Check::warn(NAME, detail, fix),
        _ => Check::fail(
            NAME,
            format!("{detail}: signed offers and receipts will be refused"),
            fix,
        ),
    }
}

/// `(server time − local time)` in ms from the coordinator's HTTP `Date`.
async fn http_skew(url: &str) -> Result<i64, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are checked"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let io = async {
        let mut s = tokio::net::TcpStream::connect(&hostport).await?;
        let before = kiln_protocol::UnixMillis::now().0 as i64;
        s.write_all(
            format!("HEAD / HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let after = kiln_protocol::UnixMillis::now().0 as i64;
        Ok::<_, std::io::Error>((buf, (before + after) / 2))
    };
    let (buf, local) = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| format!("{hostport}: no answer within 5 s"))?
        .map_err(|e| format!("{hostport}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let date = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("date").then(|| v.trim().to_string())
        })
        .ok_or_else(|| format!("{hostport} sent no Date header"))?;
    let server =
        parse_http_date(&date).ok_or_else(|| format!("unreadable Date header `{date}`"))?;
    // The Date header has 1 s resolution: compare against the middle of its second.
    Ok(server * 1000 + 500 - local)
}

async fn check_clock(url: Option<&str>) -> Check {
    let Some(url) = url else {
        return Check::skip(
            "clock-skew",
            "not checked: pass --coordinator-http <url> (or set KILN_COORDINATOR)",
        );
    };
    match http_skew(url).await {
        Ok(skew) => skew_check(skew, url),
        Err(e) => Check::warn(
            "clock-skew",
            format!("could not read the coordinator's clock: {e}"),
            "pass the coordinator's HTTP URL with --coordinator-http http://<host>:<port>",
        ),
    }
}

async fn check_coordinator(addr: Option<&kiln_net::Addr>) -> Check {
    const NAME: &str = "coordinator";
    let Some(addr) = addr else {
        return Check::skip(
            NAME,
            "not checked: pass --coordinator <multiaddr> (or set KILN_COORDINATOR_ADDR)",
        );
    };
    let Some(peer) = kiln_net::peer_of(addr) else {
        return Check::fail(
            NAME,
            format!("`{addr}` does not end in /p2p/<peer id>"),
            "use the full address the coordinator prints at start-up",
        );
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let config = kiln_net::NetConfig {
        listen: vec![],
        ..kiln_net::NetConfig::default()
    };
    // The probe is a connection, nothing more: reaching the address and
    // completing the Noise handshake with the key the address names proves
    // the coordinator is there and is the one meant, and sends it no request
    // it would have to refuse (and log).
    let result = async {
        let (client, _events, event_loop) = kiln_net::spawn(
            kiln_protocol::Keypair::generate().to_libp2p(),
            config,
            cancel.clone(),
        )
        .await?;
        let task = tokio::spawn(event_loop.run());
        let started = std::time::Instant::now();
        let connected = tokio::time::timeout(Duration::from_secs(15), client.dial(addr.clone()))
            .await
            .map_err(|_| kiln_net::NetError::Unreachable {
                peer,
                reason: "no connection within 15 s".into(),
            })
            .and_then(|r| r);
        cancel.cancel();
        let _ = task.await;
        connected.map(|_| started.elapsed())
    }
    .await;
    match result {
        Ok(rtt) => Check::ok(
            NAME,
            format!(
                "{addr} answered in {} ms (connected; its peer id is the one the address names)",
                rtt.as_millis()
            ),
        ),
        Err(kiln_net::NetError::WrongPeer {
            expected,
            found,
            addr: at,
        }) => Check::fail(
            NAME,
            format!(
                "the peer at {at} has peer id {found}, not {expected} as --coordinator says: the /p2p/ part of the address is mistyped or out of date (a coordinator that lost its state directory has a new key)"
            ),
            "copy the full address the coordinator prints at start-up (`providers join with: kiln-node run --coordinator /ip4/…/tcp/…/p2p/…`) into --coordinator (or KILN_COORDINATOR_ADDR)",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("cannot reach the coordinator at {addr}: {e}"),
            "check the address (the coordinator prints it at start-up), that the coordinator runs, and that its TCP port is open from here (`nc -vz <host> <port>`)",
        ),
    }
}

/// What the image cache holds (read from the state directory's table).
fn check_image_cache(state_dir: &Path, quota: u64) -> Check {
    let s = crate::images::ImageCache::open(state_dir, b"", quota).summary();
    Check::ok(
        "image-cache",
        format!(
            "{} image{} loaded by this node, {} of {} (kiln-node --image-cache)",
            s.count,
            if s.count == 1 { "" } else { "s" },
            crate::config::human(s.bytes),
            crate::config::human(s.quota)
        ),
    )
}

/// The registry policy, and whether each allowed registry answers.
async fn check_registries(hosts: &[String]) -> Check {
    if hosts.is_empty() {
        return Check::ok(
            "registries",
            "registry pulls are off: jobs bring images as kiln:<cid> (`kiln image push`) or use images already in the engine",
        );
    }
    let mut down = Vec::new();
    for h in hosts {
        if let Err(e) = crate::registry::probe(h).await {
            down.push(e);
        }
    }
    if down.is_empty() {
        Check::ok(
            "registries",
            format!("images may be pulled by digest from {}", hosts.join(", ")),
        )
    } else {
        Check::warn(
            "registries",
            down.join("; "),
            "check the host names given to --registry-allow and this machine's route to them",
        )
    }
}

/// Runs every check. Never panics.
pub async fn run(opts: &DoctorOptions) -> DoctorReport {
    let mut checks = Vec::new();
    let docker = check_docker(&mut checks).await;
    let discovery = tokio::task::spawn_blocking(gpu::discover)
        .await
        .unwrap_or_else(|_| gpu::Discovery {
            nvml_version: None,
            driver_version: None,
            cuda_driver_version: None,
            gpus: Vec::new(),
            error: Some("NVML discovery crashed".into()),
        });
    checks.push(check_gpu_path(discovery.gpus.len(), docker.as_ref()));
    checks.push(check_nvml(&discovery));
    checks.push(check_driver(&discovery));
    checks.push(
        tokio::task::spawn_blocking({
            let d = discovery.clone();
            move || check_cublas(&d)
        })
        .await
        .unwrap_or_else(|_| Check::warn("cublas", "probing cuBLAS crashed", "set KILN_CUBLAS_DIR")),
    );
    checks.push(check_disk(
        "disk-state",
        "the state directory (keys, job files, benchmark cache)",
        &opts.state_dir,
    ));
    if let Some(root) = docker.as_ref().and_then(|d| d.root_dir.as_deref()) {
        checks.push(check_disk(
            "disk-docker",
            "Docker images and containers",
            Path::new(root),
        ));
    }
    let key = opts.state_dir.join("identity.key");
    checks.push(key_check(
        &key,
        std::fs::metadata(&key).ok().map(|m| m.permissions().mode()),
    ));
    checks.push(check_image_cache(&opts.state_dir, opts.image_cache));
    checks.push(check_registries(&opts.registries).await);
    checks.push(check_ports(opts.listen.as_ref()));
    checks.push(check_clock(opts.coordinator_http.as_deref()).await);
    checks.push(check_coordinator(opts.coordinator.as_ref()).await);
    let exit_code = exit_code(&checks);
    DoctorReport { checks, exit_code }
}

/// The human-readable form.
pub fn render(r: &DoctorReport) -> String {
    let mut s = String::new();
    for c in &r.checks {
        let tag = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        s += &format!("[{tag}] {:<24} {}\n", c.name, c.detail);
        if let Some(f) = &c.fix {
            s += &format!("       {:<24} fix: {f}\n", "");
        }
    }
    s += &format!(
        "exit code {} (0 all ok, 1 a check failed, 2 warnings only)\n",
        r.exit_code
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let ok = Check::ok("a", "");
        let skip = Check::skip("b", "");
        let warn = Check::warn("c", "", "x");
        let fail = Check::fail("d", "", "y");
        let cases: [(&[Check], i32); 6] = [
            (&[], 0),
            (std::slice::from_ref(&ok), 0),
            (&[ok.clone(), skip.clone()], 0),
            (&[ok.clone(), warn.clone()], 2),
            (&[warn.clone(), fail.clone()], 1),
            (&[fail.clone(), ok.clone(), skip.clone()], 1),
        ];
        for (checks, want) in cases {
            assert_eq!(exit_code(checks), want, "{checks:?}");
        }
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Sat, 29 Feb 2020 23:59:59 GMT"),
            Some(1_583_020_799)
        );
        assert_eq!(parse_http_date("yesterday"), None);
        assert_eq!(parse_http_date("Sun, 06 Foo 1994 08:49:37 GMT"), None);
    }

    #[test]
    fn thresholds() {
        let p = Path::new("/x");
        assert_eq!(disk_check("disk-state", "s", p, GIB).status, Status::Fail);
        assert_eq!(
            disk_check("disk-state", "s", p, 10 * GIB).status,
            Status::Warn
        );
        assert_eq!(
            disk_check("disk-state", "s", p, 100 * GIB).status,
            Status::Ok
        );
        assert_eq!(skew_check(500, "u").status, Status::Ok);
        assert_eq!(skew_check(-5_000, "u").status, Status::Warn);
        assert_eq!(skew_check(60_000, "u").status, Status::Fail);
        assert_eq!(key_check(p, Some(0o100600)).status, Status::Ok);
        let k = key_check(p, Some(0o100644));
        assert_eq!(k.status, Status::Fail);
        assert!(k.fix.unwrap().contains("chmod 600"));
        assert_eq!(key_check(p, None).status, Status::Skip);
        assert_eq!(
            parse_df(
                "Filesystem 1024-blocks Used Available Capacity Mounted\n/dev/vda 100 50 42 50% /\n"
            ),
            Some(42 * 1024)
        );
        assert_eq!(parse_df(""), None);
    }

    #[test]
    fn ports() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let busy: kiln_net::Addr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        let c = check_ports(Some(&busy));
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.fix.unwrap().contains("--listen"));
        drop(l);
        let eph: kiln_net::Addr = "/ip4/0.0.0.0/tcp/0".parse().unwrap();
        assert_eq!(check_ports(Some(&eph)).status, Status::Ok);
    }

    #[test]
    fn gpu_path_is_reported_and_only_matters_with_gpus() {
        use crate::gpu_access::HostFacts;
        assert_eq!(check_gpu_path(0, None).status, Status::Skip);
        assert_eq!(check_gpu_path(1, None).status, Status::Fail);
        let driver_only = HostFacts {
            dev_nodes: ["nvidia0", "nvidiactl", "nvidia-uvm"]
                .map(String::from)
                .to_vec(),
            libraries: crate::gpu_access::parse_ldconfig(
                "\tlibcuda.so.1 (libc6,x86-64) => /lib/libcuda.so.1\n\tlibnvidia-ml.so.1 (libc6,x86-64) => /lib/libnvidia-ml.so.1\n",
            ),
            ..HostFacts::default()
        };
        let c = gpu_path_check(&driver_only);
        assert_eq!(c.status, Status::Ok);
        assert!(
            c.detail.contains("built-in injection") && c.detail.contains("libcuda.so.1"),
            "{c:?}"
        );
        let toolkit = HostFacts {
            nvidia_runtime: true,
            ..HostFacts::default()
        };
        assert!(
            gpu_path_check(&toolkit)
                .detail
                .contains("Container Toolkit")
        );
        let mut with_mig = driver_only.clone();
        with_mig.mig.insert(
            "MIG-7a6b5c4d-3e2f-5a1b-8c9d-0e1f2a3b4c5d".into(),
            crate::mig::MigNodes {
                parent_minor: 0,
                gi_cap: 84,
                ci_cap: 85,
            },
        );
        let c = gpu_path_check(&with_mig);
        assert_eq!(c.status, Status::Ok);
        assert!(
            c.detail.contains("built-in injection") && c.detail.contains("1 MIG instance offered"),
            "{c:?}"
        );
        let nothing = gpu_path_check(&HostFacts::default());
        assert_eq!(nothing.status, Status::Fail);
        assert!(nothing.detail.contains("/dev/nvidiactl"), "{nothing:?}");
        assert!(nothing.fix.unwrap().contains("nvidia-ctk"));
    }

    #[tokio::test]
    async fn every_problem_has_a_fix() {
        let dir = tempfile::tempdir().unwrap();
        let r = run(&DoctorOptions {
            state_dir: dir.path().to_path_buf(),
            coordinator: None,
            coordinator_http: None,
            listen: None,
            // A registry nobody listens on: a warning with a fix.
            registries: vec!["127.0.0.1:9".into()],
            image_cache: 1 << 30,
        })
        .await;
        let reg = r.checks.iter().find(|c| c.name == "registries").unwrap();
        assert_eq!(reg.status, Status::Warn, "{reg:?}");
        assert!(reg.detail.contains("127.0.0.1:9"), "{reg:?}");
        let cache = r.checks.iter().find(|c| c.name == "image-cache").unwrap();
        assert!(cache.detail.contains("0 images"), "{cache:?}");
        for c in &r.checks {
            if matches!(c.status, Status::Warn | Status::Fail) {
                assert!(c.fix.as_deref().is_some_and(|f| !f.is_empty()), "{c:?}");
            }
        }
        assert_eq!(r.exit_code, exit_code(&r.checks));
        let nvml = r.checks.iter().find(|c| c.name == "nvml").unwrap();
        if !gpu::discover().nvml_present() {
            assert_eq!(nvml.status, Status::Warn);
            assert!(nvml.fix.as_deref().unwrap().contains("libnvidia-ml.so.1"));
        }
        assert!(render(&r).contains("exit code"));
    }
}
