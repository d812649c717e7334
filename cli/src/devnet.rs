//! `kiln devnet`: a whole marketplace on loopback, in one process.
//!
//! A coordinator (SQLite in a temp dir, a faucet for buyers) and N provider
//! nodes (each with its own identity and state dir) start on 127.0.0.1; the
//! demo workload image is built locally if missing; a demo job is submitted
//! and its receipt verified on the client side.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_coordinator::CoordinatorConfig;
use kiln_node::NodeConfig;
use kiln_protocol::views::JobState;
use kiln_protocol::{
    ByteSize, ContentId, Credits, JobId, JobSpec, ManifestEntry, MilliCpu, ProviderId, Seconds,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::Client;

pub struct DevnetOptions {
    pub providers: usize,
    pub state_dir: Option<PathBuf>,
    pub http_port: u16,
    pub heartbeat: Duration,
    /// Jobs each provider runs at once.
    pub slots: u32,
    pub limits: kiln_node::runner::Limits,
    /// How often providers report usage for interval settlement.
    pub usage_interval: Duration,
    /// Minimum stake bond for a provider to be offered work.
    pub min_stake: Credits,
    /// Stake each provider bonds at start-up (from the faucet).
    pub provider_stake: Option<Credits>,
    /// How long after its timeout a started job may take to deliver before
    /// the coordinator gives up on it (the coordinator's default: 2 min).
    pub result_grace: Duration,
    /// The coordinator refuses usage reports closer together than this. A
    /// devnet's nodes may report much faster than the coordinator's default
    /// (5 s) allows, so it is short here.
    pub min_usage_interval: Duration,
    /// Mean time between two capability challenges of one provider
    /// (`None`: no audits). `kiln devnet` turns them on every few minutes;
    /// tests leave them off unless they test audits, so a random benchmark
    /// never competes with what a test measures.
    pub audit_interval: Option<Duration>,
    /// Re-execute sampled results on another provider before paying for
    /// them. `kiln devnet` turns it on; tests leave it off unless they test
    /// verification, so a re-run never competes with what a test measures.
    pub verification: bool,
    /// Least escrow a job must lock to be queued. Devnet jobs are tiny (a
    /// 1 s timeout at 1 cr/h locks 278 µcr), below the coordinator's
    /// default (0.01 cr), so it is 1 here: a job that locks nothing is
    /// still refused.
    pub min_job_escrow: Credits,
    /// Let the nodes fetch URL inputs from loopback and private addresses
    /// (`kiln-node run --allow-private-urls`): tests serve URLs on
    /// loopback. Off, as on a real provider.
    pub allow_private_urls: bool,
    /// Most bytes one buyer may hold on the coordinator (its default:
    /// 10 GiB).
    pub blob_quota_per_buyer: Option<u64>,
    /// The coordinator's database: `None` for the embedded SQLite file in
    /// the state directory, or a PostgreSQL database.
    pub database: Option<kiln_coordinator::db::DbLocation>,
}

impl Default for DevnetOptions {
    fn default() -> Self {
        Self {
            providers: 2,
            state_dir: None,
            http_port: 0,
            heartbeat: Duration::from_secs(2),
            slots: 2,
            limits: kiln_node::runner::Limits::default(),
            usage_interval: Duration::from_secs(5),
            min_stake: Credits(0),
            provider_stake: None,
            result_grace: Duration::from_secs(120),
            min_usage_interval: Duration::from_millis(500),
            audit_interval: None,
            verification: false,
            min_job_escrow: Credits(1),
            allow_private_urls: false,
            blob_quota_per_buyer: CoordinatorConfig::new(PathBuf::new()).blob_quota_per_buyer,
            database: None,
        }
    }
}

/// A running devnet. Dropping it does not stop it: call [`Devnet::shutdown`].
pub struct Devnet {
    pub coordinator: kiln_coordinator::Coordinator,
    pub nodes: Vec<kiln_node::Node>,
    /// One token per node (children of `cancel`): cancelling one stops that
    /// node's network and heartbeats at once, as if its machine vanished.
    pub node_cancels: Vec<CancellationToken>,
    /// The coordinator's own token (a child of `cancel`) and configuration,
    /// so it can be stopped and started again on the same state and ports
    /// ([`Devnet::restart_coordinator`]).
    coordinator_cancel: CancellationToken,
    coordinator_config: CoordinatorConfig,
    pub image_id: String,
    pub cancel: CancellationToken,
    pub state_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Devnet {
    pub async fn start(opts: DevnetOptions) -> anyhow::Result<Self> {
        let (temp, state_dir) = match opts.state_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("kiln-devnet-")
                    .tempdir()
                    .context("creating a temp dir")?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let docker = kiln_docker::connect().await?;
        let image = kiln_docker::ensure_workload_image(&docker).await?;
        let cancel = CancellationToken::new();
        let mut cc = CoordinatorConfig::new(state_dir.join("coordinator"));
        cc.http_listen = std::net::SocketAddr::from(([127, 0, 0, 1], opts.http_port));
        cc.faucet = Some(Credits(1_000_000_000));
        cc.min_stake = opts.min_stake;
        cc.provider_lease = opts.heartbeat * 5;
        cc.schedule_interval = Duration::from_millis(250);
        cc.result_grace = opts.result_grace;
        cc.min_usage_interval = opts.min_usage_interval;
        cc.audit.mean_interval = opts.audit_interval;
        cc.verification.enabled = opts.verification;
        cc.min_job_escrow = opts.min_job_escrow;
        cc.blob_quota_per_buyer = opts.blob_quota_per_buyer;
        cc.database = opts.database.clone();
        let coordinator_cancel = cancel.child_token();
        let coordinator = kiln_coordinator::start(cc.clone(), coordinator_cancel.clone()).await?;
        let coord_addr = coordinator
            .p2p_addrs
            .first()
            .cloned()
            .context("the coordinator has no p2p address")?;
        let mut nodes = Vec::new();
        let mut node_cancels = Vec::new();
        for i in 0..opts.providers {
            let mut nc = NodeConfig::new(coord_addr.clone(), state_dir.join(format!("node{i}")));
            nc.heartbeat = opts.heartbeat;
            nc.slots = opts.slots;
            // Every devnet node lends the same machine, so slots are
            // overcommitted whatever their number.
            nc.overcommit_slots = true;
            nc.usage_interval = opts.usage_interval;
            nc.stake = opts.provider_stake;
            nc.limits = opts.limits.clone();
            nc.allow_private_urls = opts.allow_private_urls;
            let token = cancel.child_token();
            nodes.push(kiln_node::start(nc, token.clone()).await?);
            node_cancels.push(token);
        }
        let dn = Self {
            coordinator,
            nodes,
            node_cancels,
            coordinator_cancel,
            coordinator_config: cc,
            image_id: image.id,
            cancel,
            state_dir,
            _temp: temp,
        };
        dn.wait_for_providers(opts.providers, Duration::from_secs(30))
            .await?;
        Ok(dn)
    }

    /// The configuration of node `i` (state in `node<i>`), as one more
    /// devnet node would have it: 1 s heartbeats, usage every 5 s, slots
    /// overcommitted (the nodes share this machine's cores).
    pub fn node_config(&self, i: usize) -> anyhow::Result<NodeConfig> {
        let addr = self
            .coordinator
            .p2p_addrs
            .first()
            .cloned()
            .context("the coordinator has no p2p address")?;
        let mut nc = NodeConfig::new(addr, self.state_dir.join(format!("node{i}")));
        nc.heartbeat = Duration::from_secs(1);
        nc.usage_interval = Duration::from_secs(5);
        nc.overcommit_slots = true;
        Ok(nc)
    }

    /// Starts one more node, its configuration adjusted by `adjust`; it is
    /// drained and stopped with the devnet.
    pub async fn add_node(
        &mut self,
        adjust: impl FnOnce(&mut NodeConfig),
    ) -> anyhow::Result<ProviderId> {
        let mut nc = self.node_config(self.nodes.len())?;
        adjust(&mut nc);
        let token = self.cancel.child_token();
        let node = kiln_node::start(nc, token.clone()).await?;
        let id = node.provider;
        self.nodes.push(node);
        self.node_cancels.push(token);
        Ok(id)
    }

    /// The images this devnet's nodes hold in their image caches (tags
    /// `kiln-cache-<node>:…`), as tag strings.
    pub async fn cached_images(&self) -> anyhow::Result<Vec<String>> {
        let docker = kiln_docker::connect().await?;
        let repos: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}:", kiln_node::image_cache_repo(&n.provider)))
            .collect();
        let all = docker
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await?;
        Ok(all
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| repos.iter().any(|r| t.starts_with(r.as_str())))
            .collect())
    }

    /// Removes what [`Self::cached_images`] lists: tests and benchmarks
    /// leave the shared engine as they found it.
    pub async fn remove_cached_images(&self) -> anyhow::Result<()> {
        let docker = kiln_docker::connect().await?;
        for t in self.cached_images().await? {
            let _ = docker
                .remove_image(
                    &t,
                    None::<bollard::query_parameters::RemoveImageOptions>,
                    None,
                )
                .await;
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        self.coordinator.url()
    }

    /// Where the coordinator's database is.
    pub fn database(&self) -> kiln_coordinator::db::DbLocation {
        self.coordinator_config.database_location()
    }

    /// Stops the coordinator (its tasks end and release the database and
    /// ports) and starts it again on the same state directory, HTTP port and
    /// p2p address, as an operator restarting a crashed coordinator would.
    /// Nodes are untouched: they reconnect on their next heartbeat.
    pub async fn restart_coordinator(&mut self) -> anyhow::Result<()> {
        self.coordinator_cancel.cancel();
        for t in std::mem::take(&mut self.coordinator.tasks) {
            let _ = t.await;
        }
        // Requests still in flight (dispatches, gang reservations) were
        // spawned apart from those tasks; with the pool closed they can no
        // longer write, as if the process had died with them.
        self.coordinator.state.db.pool.close().await;
        let mut cc = self.coordinator_config.clone();
        cc.http_listen = self.coordinator.http_addr;
        cc.p2p_listen = self
            .coordinator
            .p2p_addrs
            .first()
            .context("the coordinator had no p2p address")?
            .iter()
            .filter(|p| !matches!(p, kiln_net::multiaddr::Protocol::P2p(_)))
            .collect();
        self.coordinator_cancel = self.cancel.child_token();
        self.coordinator = kiln_coordinator::start(cc, self.coordinator_cancel.clone()).await?;
        Ok(())
    }

    /// Waits until `n` providers are registered.
    pub async fn wait_for_providers(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let client = Client::new(&self.url(), kiln_protocol::Keypair::generate());
        let start = Instant::now();
        loop {
            let registered = client.providers().await?.providers.len();
            if registered >= n {
                return Ok(());
            }
            if start.elapsed() > timeout {
                anyhow::bail!(
                    "only {registered} of {n} providers registered after {}s",
                    timeout.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A spec for the workload image with small resources.
    pub fn workload_spec(&self, args: &[&str]) -> JobSpec {
        let mut spec = JobSpec::new(
            self.image_id.clone(),
            args.iter().map(|s| s.to_string()).collect(),
        );
        spec.resources.cpus = MilliCpu(500);
        spec.resources.memory = ByteSize(64 << 20);
        spec.resources.timeout = Seconds(60);
        spec
    }

    /// Stops everything in order: the cancel token stops the network loops,
    /// the schedulers and the HTTP server; then we wait for every task.
    pub async fn shutdown(self) {
        for n in &self.nodes {
            n.drain(Duration::from_secs(10)).await;
        }
        self.cancel.cancel();
        for n in self.nodes {
            for t in n.tasks {
                let _ = t.await;
            }
        }
        for t in self.coordinator.tasks {
            let _ = t.await;
        }
    }
}

/// What `kiln devnet` prints about its demo job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoSummary {
    pub job_id: JobId,
    pub state: JobState,
    pub provider: Option<ProviderId>,
    pub output_cid: Option<ContentId>,
    /// Whether the receipt (and the output manifest) verified on this side.
    pub receipt_verified: bool,
    pub exit_code: Option<i64>,
    pub cost: Option<Credits>,
    pub stdout: Option<String>,
    pub outputs: Option<Vec<ManifestEntry>>,
    pub image: String,
    pub coordinator: String,
    pub providers: Vec<ProviderId>,
}

/// Runs the demo job on a devnet and returns the summary printed by `kiln devnet`.
pub async fn run_demo(dn: &Devnet, client: &Client) -> anyhow::Result<DemoSummary> {
    let spec = dn.workload_spec(&["demo", "7"]);
    let job = client.submit(spec, Some("devnet demo".into())).await?;
    let id = job.job_id;
    let done = crate::wait_for(client, &id, Duration::from_secs(120), |_| {}).await?;
    let outputs = client.outputs(&id).await.ok();
    let manifest = outputs.as_ref().and_then(|o| o.manifest().ok());
    let verified = crate::verify_receipt(&done, manifest.as_ref()).is_ok();
    let logs = client.logs(&id).await.ok();
    Ok(DemoSummary {
        job_id: id,
        state: done.state,
        provider: done.provider,
        output_cid: done.output_cid,
        receipt_verified: verified,
        exit_code: done.exit_code,
        cost: done.cost,
        stdout: logs.map(|l| l.stdout),
        outputs: outputs.map(|o| o.entries),
        image: dn.image_id.clone(),
        coordinator: dn.url(),
        providers: dn.nodes.iter().map(|n| n.provider).collect(),
    })
}
