//! How a node is set up ([`NodeConfig`]) and why it may fail to start
//! ([`NodeError`]). Plain data: everything else in the crate reads it.

use std::path::PathBuf;
use std::time::Duration;

use kiln_net::Addr;
use kiln_protocol::Credits;
use kiln_protocol::keys::keyfile;

use crate::idle;
use crate::runner::{Limits, Policy};

/// How a node is set up.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The coordinator's multiaddr, ending in `/p2p/<peer id>`.
    pub coordinator: Addr,
    /// Identity key and job working directories live here.
    pub state_dir: PathBuf,
    pub listen: Addr,
    /// Jobs run at once.
    pub slots: u32,
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
    /// Disk lent to jobs in all (0: jobs asking for disk are not placed here).
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
}

impl NodeConfig {
    pub fn new(coordinator: Addr, state_dir: PathBuf) -> Self {
        Self {
            coordinator,
            state_dir,
            listen: "/ip4/127.0.0.1/tcp/0"
                .parse()
                .unwrap_or_else(|_| Addr::empty()),
            slots: 2,
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
        }
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
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
}
