//! How a node is set up ([`NodeConfig`]) and why it may fail to start
//! ([`NodeError`]). Plain data: everything else in the crate reads it.

use std::path::PathBuf;
use std::time::Duration;

use kiln_net::Addr;
use kiln_protocol::Credits;
use kiln_protocol::keys::keyfile;

use crate::runner::{Limits, Policy};
use crate::{hw, idle};

/// How a node is set up.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The coordinator's multiaddr, ending in `/p2p/<peer id>`.
    pub coordinator: Addr,
    /// Identity key and job working directories live here.
    pub state_dir: PathBuf,
    pub listen: Addr,
    /// Jobs run at once: at most the machine's CPU cores unless
    /// `overcommit_slots` ([`start`](crate::start) refuses more).
    pub slots: u32,
    /// Advertise more slots than the machine has CPU cores (several jobs
    /// that ask for less than a core each may then share one; the
    /// scheduler still books no more CPUs than there are cores).
    pub overcommit_slots: bool,
    pub price_per_cpu_hour: Credits,
    pub price_per_gpu_hour: Credits,
    /// How often the advert is re-registered (the liveness signal).
    pub heartbeat: Duration,
    pub limits: Limits,
    pub policy: Policy,
    /// How often a running job's usage is reported for settlement.
    pub usage_interval: Duration,
    /// Stake bond to hold with the coordinator (from earnings or a faucet).
    pub stake: Option<Credits>,
    /// When the owner's use of the GPUs keeps offers away.
    pub idle: idle::IdlePolicy,
    /// Benchmark at start-up (or use the cached benchmark) and put the
    /// report in the advert.
    pub startup_benchmark: bool,
    /// Most bytes the blob cache (inputs and outputs, `<state_dir>/blobs`)
    /// may use; least recently used blobs not in use by a job are evicted.
    pub cache_quota: Option<u64>,
    /// Where this machine is (`eu-west-1`), advertised for jobs that ask for
    /// a region; `None`: it matches no region requirement.
    pub region: Option<String>,
    /// Disk lent to jobs in all (0: jobs asking for disk are not placed
    /// here); at most what is free on the filesystem of `state_dir`
    /// ([`start`](crate::start) refuses more).
    pub disk: kiln_protocol::ByteSize,
    /// How long [`Node::shutdown`](crate::Node::shutdown) gives running jobs
    /// to stop and finished ones to deliver their results before it reports
    /// what is left lost.
    pub drain_grace: Duration,
    /// Fetch URL inputs from loopback, private (RFC 1918, fc00::/7),
    /// link-local and other non-global addresses too. Off: a buyer's URL
    /// could otherwise reach this machine's services, its LAN or the cloud
    /// metadata endpoint.
    pub allow_private_urls: bool,
    /// Most bytes of images this node loads or pulls may take in the
    /// engine; least recently used ones no job is using are removed.
    pub image_cache: u64,
    /// Load Kiln images with `docker load` of an archive streamed from the
    /// cache, after every layer is fetched, instead of the engine pulling
    /// them from this node's loopback registry as they arrive (the
    /// default). Used anyway when the engine is not on this machine
    /// (`DOCKER_HOST` over TCP or SSH), which cannot reach our loopback.
    pub image_load_archive: bool,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (none if unset).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl NodeConfig {
    pub fn new(coordinator: Addr, state_dir: PathBuf) -> Self {
        Self {
            coordinator,
            state_dir,
            listen: "/ip4/127.0.0.1/tcp/0"
                .parse()
                .unwrap_or_else(|_| Addr::empty()),
            slots: default_slots(),
            overcommit_slots: false,
            price_per_cpu_hour: Credits(100_000),
            price_per_gpu_hour: Credits(2_000_000),
            heartbeat: Duration::from_secs(5),
            limits: Limits::default(),
            policy: Policy::default(),
            usage_interval: Duration::from_secs(60),
            stake: None,
            idle: idle::IdlePolicy::default(),
            startup_benchmark: true,
            cache_quota: Some(50 << 30),
            region: None,
            disk: kiln_protocol::ByteSize(0),
            drain_grace: Duration::from_secs(30),
            allow_private_urls: false,
            image_cache: 20 << 30,
            image_load_archive: false,
            metrics_listen: None,
        }
    }
}

/// Jobs at once unless configured: 2, or 1 on a machine with one core.
pub fn default_slots() -> u32 {
    hw::logical_cores().clamp(1, 2)
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A size for people, as the doctor writes it: `72.6 GiB`, `300.0 MiB`.
pub(crate) fn human(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

/// Refuses a configuration that would advertise what the machine does not
/// have: more slots than its `cores` (unless
/// [`NodeConfig::overcommit_slots`]), or more disk than is free on the
/// filesystem of the state directory, where job files and the blob cache
/// live (`free_disk`: measured there, `None` when no disk is lent). Memory
/// is not configured: the advert states the machine's physical memory.
pub(crate) fn check_capacity(
    config: &NodeConfig,
    cores: u32,
    free_disk: Option<Result<u64, String>>,
) -> Result<(), NodeError> {
    if config.slots > cores && !config.overcommit_slots {
        return Err(NodeError::SlotsOverCores {
            slots: config.slots,
            cores,
        });
    }
    let asked = config.disk.0;
    if asked == 0 {
        return Ok(());
    }
    let path = config.state_dir.display().to_string();
    match free_disk {
        Some(Ok(free)) if asked <= free => Ok(()),
        Some(Ok(free)) => Err(NodeError::DiskOverFree {
            asked: config.disk.to_string(),
            free: human(free),
            suggest: if free >= GIB {
                format!("{}GiB", free / GIB)
            } else {
                format!("{}MiB", free / MIB)
            },
            path,
        }),
        Some(Err(why)) => Err(NodeError::DiskUnmeasured {
            asked: config.disk.to_string(),
            path,
            why,
        }),
        None => Err(NodeError::DiskUnmeasured {
            asked: config.disk.to_string(),
            path,
            why: "not measured".into(),
        }),
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Key(#[from] keyfile::KeyFileError),
    #[error(transparent)]
    Docker(#[from] kiln_docker::DockerError),
    #[error(transparent)]
    Net(#[from] kiln_net::NetError),
    #[error(
        "the coordinator address `{0}` must end in /p2p/<peer id> (the coordinator prints its full address at start-up)"
    )]
    CoordinatorAddress(String),
    #[error("cannot open the blob cache: {0}")]
    Cache(#[from] kiln_blobs::StoreError),
    #[error(
        "--slots {slots} is more than this machine's {cores} CPU cores: the node would advertise more jobs at once than it has cores to run them on. Use --slots {cores} or fewer, or pass --overcommit-slots to take more jobs than cores (jobs asking for less than a core may then share one; no more CPUs than cores are ever booked)"
    )]
    SlotsOverCores { slots: u32, cores: u32 },
    #[error(
        "--disk {asked} is more than the {free} free on the filesystem of the state directory {path} (job files and the blob cache live there): jobs asking for that much disk would be placed here and run out of space. Lend at most what is free (--disk {suggest}), free space on that filesystem, or point --state-dir at a larger disk"
    )]
    DiskOverFree {
        asked: String,
        free: String,
        suggest: String,
        path: String,
    },
    #[error(
        "--disk {asked}: cannot measure the free space of the state directory {path} ({why}), so the disk lent cannot be checked; make sure `df` works there (`df -Pk {path}`), or lend no disk (--disk 0)"
    )]
    DiskUnmeasured {
        asked: String,
        path: String,
        why: String,
    },
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}; pick a free address for --metrics")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::ByteSize;

    fn config(slots: u32, disk: u64) -> NodeConfig {
        let addr = "/ip4/127.0.0.1/tcp/1"
            .parse()
            .unwrap_or_else(|_| Addr::empty());
        let mut c = NodeConfig::new(addr, PathBuf::from("/var/lib/kiln-node"));
        c.slots = slots;
        c.disk = ByteSize(disk);
        c
    }

    #[test]
    fn a_node_advertises_no_more_than_the_machine_has() {
        /// (slots, overcommit, cores, disk asked, free disk, refused with)
        type Case = (
            u32,
            bool,
            u32,
            u64,
            Option<Result<u64, String>>,
            Option<&'static str>,
        );
        let free = |b: u64| Some(Ok(b));
        let cases: [Case; 9] = [
            (2, false, 2, 0, None, None),
            (1, false, 8, 0, None, None),
            (
                3,
                false,
                2,
                0,
                None,
                Some("--slots 3 is more than this machine's 2 CPU cores"),
            ),
            (8, true, 2, 0, None, None),
            (2, false, 2, 72 * GIB, free(72 * GIB), None),
            (
                2,
                false,
                2,
                500 * GIB,
                free(72 * GIB + 600 * MIB),
                Some("--disk 500GiB is more than the 72.6 GiB free"),
            ),
            (2, false, 2, GIB, free(300 * MIB), Some("(--disk 300MiB)")),
            (
                2,
                false,
                2,
                GIB,
                Some(Err("cannot run df".into())),
                Some("cannot measure the free space"),
            ),
            // Disk is checked even when slots are overcommitted.
            (
                4,
                true,
                2,
                2 * GIB,
                free(GIB),
                Some("--disk 2GiB is more than the 1.0 GiB free"),
            ),
        ];
        for (slots, over, cores, disk, measured, refused) in cases {
            let mut c = config(slots, disk);
            c.overcommit_slots = over;
            let got = check_capacity(&c, cores, measured.clone());
            match (refused, got) {
                (None, Ok(())) => {}
                (Some(says), Err(e)) => {
                    let e = e.to_string();
                    assert!(e.contains(says), "{slots} slots, {disk} B: {e}");
                    // Every refusal says what to do.
                    assert!(
                        e.contains("--overcommit-slots")
                            || e.contains("--state-dir")
                            || e.contains("--disk 0"),
                        "{e}"
                    );
                }
                (want, got) => panic!(
                    "{slots} slots on {cores} cores, {disk} B of {measured:?}: want {want:?}, got {got:?}"
                ),
            }
        }
    }

    #[test]
    fn the_default_slots_fit_any_machine() {
        let c = config(default_slots(), 0);
        assert!(check_capacity(&c, hw::logical_cores(), None).is_ok());
        assert!((1..=2).contains(&default_slots()));
    }
}
