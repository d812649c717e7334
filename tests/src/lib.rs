//! Kiln's integration-test harness.
//!
//! [`devnet`] boots a real coordinator (SQLite or PostgreSQL, HTTP, libp2p) and N real
//! provider nodes (Docker engine, libp2p) on loopback — the same code
//! `kiln devnet` runs. [`RogueProvider`] is a real libp2p peer with its own
//! key that registers like a provider but lets a test decide what it sends
//! back (tampered, replayed or foreign receipts). [`TestCoordinatorPeer`] is
//! the mirror image: a libp2p peer a real node trusts as its coordinator, so a
//! test can send that node expired or misaddressed offers.

pub mod cheat;
mod rogue;
pub use rogue::RogueSender;

use std::time::Duration;

use anyhow::{Context, bail};
use kiln_cli::Client;
use kiln_cli::devnet::{Devnet, DevnetOptions};
use kiln_net::{Addr, NetConfig, NetEvent, Peer};
use kiln_protocol::views::JobView;
use kiln_protocol::{
    ByteSize, CapabilityAdvert, CpuInfo, Credits, JobOffer, JobResult, Keypair, Manifest,
    NetRequest, NetResponse, ProviderId, Signed, UnixMillis,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A coordinator and `providers` nodes on loopback.
pub async fn devnet(providers: usize) -> anyhow::Result<Devnet> {
    devnet_with(DevnetOptions {
        providers,
        ..DevnetOptions::default()
    })
    .await
}

/// A devnet with no nodes and one [`RogueProvider`] joined to it, with the
/// token that stops the rogue's network: the test scripts the only
/// provider there is.
pub async fn devnet_with_rogue() -> anyhow::Result<(Devnet, CancellationToken, RogueProvider)> {
    let dn = devnet(0).await?;
    let cancel = CancellationToken::new();
    let addr = dn.coordinator.p2p_addrs[0].clone();
    let rogue = RogueProvider::join(&addr, &cancel).await?;
    Ok((dn, cancel, rogue))
}

/// A devnet with explicit options (1 s heartbeats, a free HTTP port, the
/// suite's database: see [`database`]).
pub async fn devnet_with(opts: DevnetOptions) -> anyhow::Result<Devnet> {
    init_tracing();
    let database = match opts.database {
        Some(d) => Some(d),
        None => database().await?,
    };
    Devnet::start(DevnetOptions {
        http_port: 0,
        heartbeat: Duration::from_secs(1),
        database,
        ..opts
    })
    .await
}

mod postgres;
pub use postgres::{database, open_database};

/// Starts one more provider node and joins it to the devnet's coordinator
/// (1 s heartbeats); it is drained and stopped with the devnet.
pub async fn add_node(dn: &mut Devnet) -> anyhow::Result<ProviderId> {
    add_node_with(dn, |_| {}).await
}

/// [`add_node`] with its configuration adjusted by `adjust`.
pub async fn add_node_with(
    dn: &mut Devnet,
    adjust: impl FnOnce(&mut kiln_node::NodeConfig),
) -> anyhow::Result<ProviderId> {
    dn.add_node(adjust).await
}

/// Stops node `i` and starts it again on the same state directory (so the
/// same identity, blob cache and records), as a restarted daemon would
/// come back; its configuration is adjusted by `adjust` again.
pub async fn restart_node(
    dn: &mut Devnet,
    i: usize,
    adjust: impl FnOnce(&mut kiln_node::NodeConfig),
) -> anyhow::Result<ProviderId> {
    dn.node_cancels[i].cancel();
    for t in std::mem::take(&mut dn.nodes[i].tasks) {
        let _ = t.await;
    }
    let mut nc = dn.node_config(i)?;
    adjust(&mut nc);
    let token = dn.cancel.child_token();
    let node = kiln_node::start(nc, token.clone()).await?;
    let id = node.provider;
    dn.nodes[i] = node;
    dn.node_cancels[i] = token;
    Ok(id)
}

/// Containers (running or not) that Docker holds for `job`, on any node.
pub async fn job_containers(job: &kiln_protocol::JobId) -> anyhow::Result<Vec<String>> {
    let docker = kiln_docker::connect().await?;
    let filters = std::collections::HashMap::from([(
        "label".to_string(),
        vec![format!("{}={job}", kiln_node::runner::LABEL_JOB)],
    )]);
    let list = docker
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?;
    Ok(list
        .into_iter()
        .map(|c| format!("{:?} {:?}", c.names, c.labels))
        .collect())
}

/// Mount points below `dir` (a job's output area must never outlive it).
pub fn mounts_below(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| std::path::Path::new(m).starts_with(dir))
        .map(str::to_string)
        .collect()
}

/// Everything nodes of this devnet left behind: containers, job directories, mounts.
pub async fn leftovers(dn: &Devnet) -> anyhow::Result<Vec<String>> {
    let mut left = Vec::new();
    for (i, n) in dn.nodes.iter().enumerate() {
        for c in n.runner.containers().await? {
            left.push(format!("node{i} container {:?} {:?}", c.names, c.labels));
        }
        let jobs = dn.state_dir.join(format!("node{i}/jobs"));
        if let Ok(entries) = std::fs::read_dir(&jobs) {
            left.extend(
                entries
                    .flatten()
                    .map(|e| format!("node{i} job dir {}", e.path().display())),
            );
        }
        left.extend(
            mounts_below(&jobs)
                .into_iter()
                .map(|m| format!("node{i} mount {m}")),
        );
    }
    Ok(left)
}

/// How long [`eventually`] and [`job_until`] wait. Generous because CI
/// machines are shared: a slow poll costs seconds, a flaky test costs a run.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// Calls `probe` every 100 ms until `done` holds for what it returned, or
/// [`PATIENCE`] passes. Returns the last observation either way, so the
/// caller asserts on it and a failure prints what was actually seen.
pub async fn eventually<T, Fut>(
    mut probe: impl FnMut() -> Fut,
    mut done: impl FnMut(&T) -> bool,
) -> T
where
    Fut: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let seen = probe().await;
        if done(&seen) || tokio::time::Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A job's status once `done` holds for it (or the last one seen). A
/// failed status request counts as "not yet"; if the last one failed, it
/// panics with the error (there is no status to assert on).
pub async fn job_until(
    client: &Client,
    id: &kiln_protocol::JobId,
    mut done: impl FnMut(&JobView) -> bool,
) -> JobView {
    let seen = eventually(
        || async { client.job(id).await },
        |r| r.as_ref().is_ok_and(&mut done),
    )
    .await;
    seen.unwrap_or_else(|e| panic!("GET /v1/jobs/{id} failed: {e}"))
}

/// The scheduler's explanation of a queued job, once it has given one.
pub fn reason(job: &JobView) -> &str {
    job.reason.as_deref().unwrap_or("")
}

/// A fresh buyer (new key) talking to the devnet.
pub fn buyer(dn: &Devnet) -> Client {
    Client::new(&dn.url(), Keypair::generate())
}

/// Submits a job and waits for it to end.
pub async fn run_job(client: &Client, spec: kiln_protocol::JobSpec) -> anyhow::Result<JobView> {
    let v = client.submit(spec, None).await?;
    kiln_cli::wait_for(client, &v.job_id, Duration::from_secs(120), |_| {}).await
}

/// A provider peer whose answers the test scripts.
pub struct RogueProvider {
    pub key: Keypair,
    pub id: ProviderId,
    net: kiln_net::Client,
    events: mpsc::Receiver<NetEvent>,
    coordinator: Peer,
    coordinator_addr: Addr,
}

impl RogueProvider {
    /// Joins the coordinator at `addr` with a real signed advert.
    pub async fn join(addr: &Addr, cancel: &CancellationToken) -> anyhow::Result<Self> {
        let key = Keypair::generate();
        let (net, events, ev) =
            kiln_net::spawn(key.to_libp2p(), NetConfig::default(), cancel.clone()).await?;
        tokio::spawn(ev.run());
        let coordinator = kiln_net::peer_of(addr).context("coordinator address without /p2p")?;
        let id = ProviderId::from_public_key(&key.public());
        let me = Self {
            key,
            id,
            net,
            events,
            coordinator,
            coordinator_addr: addr.clone(),
        };
        match me.send(NetRequest::Register(me.advert()?)).await? {
            NetResponse::Accepted => Ok(me),
            other => bail!("registration refused: {other:?}"),
        }
    }

    fn advert(&self) -> anyhow::Result<Signed<CapabilityAdvert>> {
        let a = CapabilityAdvert {
            provider: self.id,
            protocol_version: kiln_protocol::PROTOCOL_VERSION,
            node_version: "rogue".into(),
            listen_addrs: self
                .net
                .listen_addrs()
                .iter()
                .map(ToString::to_string)
                .collect(),
            cpu: CpuInfo {
                model: "test".into(),
                logical_cores: 4,
                matmul_mflops: 1,
            },
            memory: ByteSize(8 << 30),
            gpus: vec![],
            slots: 8,
            // Cheaper than any real node, so the scheduler prefers it.
            price_per_cpu_hour: Credits(1),
            price_per_gpu_hour: Credits(1),
            runtime: "none".into(),
            allows_network: false,
            issued_at: UnixMillis::now(),
            benchmark: None,
            region: None,
            disk: ByteSize(0),
            cached: vec![],
            registries: Vec::new(),
        };
        Ok(Signed::sign(&self.key, a, 3600)?)
    }

    pub async fn send(&self, req: NetRequest) -> anyhow::Result<NetResponse> {
        Ok(self
            .net
            .request(self.coordinator, vec![self.coordinator_addr.clone()], req)
            .await?)
    }

    /// Waits for the next offer, accepts it, and returns it.
    pub async fn next_offer(&mut self) -> anyhow::Result<Signed<JobOffer>> {
        let (offer, reply) = self.hold_offer().await?;
        let _ = reply.send(NetResponse::Accepted);
        Ok(offer)
    }

    /// Waits for the next offer and returns it unanswered, with the means
    /// to answer.
    pub async fn hold_offer(
        &mut self,
    ) -> anyhow::Result<(Signed<JobOffer>, oneshot::Sender<NetResponse>)> {
        self.next_request("offer", |req| match req {
            NetRequest::Offer(o) => Ok(o),
            other => Err(other),
        })
        .await
    }

    /// Waits for the next gang offer and refuses it with `reason` (as a
    /// node whose owner came back would); returns it. Other requests are
    /// refused too.
    pub async fn refuse_gang_offer(
        &mut self,
        reason: &str,
    ) -> anyhow::Result<Signed<kiln_protocol::GangOffer>> {
        let (offer, reply) = self.hold_gang_offer().await?;
        let _ = reply.send(NetResponse::Rejected {
            reason: reason.into(),
        });
        Ok(offer)
    }

    /// Waits for the next gang offer and returns it unanswered, with the
    /// means to answer: the coordinator waits as long as it is held.
    pub async fn hold_gang_offer(
        &mut self,
    ) -> anyhow::Result<(
        Signed<kiln_protocol::GangOffer>,
        oneshot::Sender<NetResponse>,
    )> {
        self.next_request("gang offer", |req| match req {
            NetRequest::GangOffer(o) => Ok(o),
            other => Err(other),
        })
        .await
    }

    /// Waits (up to 30 s) for the first request `pick` takes and returns
    /// what it kept with the reply channel; every other request is refused.
    pub async fn next_request<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(NetRequest) -> Result<T, NetRequest>,
    ) -> anyhow::Result<(T, oneshot::Sender<NetResponse>)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .with_context(|| format!("no {what} within 30s"))?;
            match ev {
                Some(NetEvent::Request { request, reply, .. }) => match pick(request) {
                    Ok(kept) => return Ok((kept, reply)),
                    Err(_) => {
                        let _ = reply.send(NetResponse::Rejected {
                            reason: "rogue".into(),
                        });
                    }
                },
                Some(_) => {}
                None => bail!("network stopped"),
            }
        }
    }

    /// An honest, well-formed result for `offer`, signed by `signer`.
    pub fn result_for(offer: &JobOffer, signer: &Keypair) -> anyhow::Result<JobResult> {
        Self::result_with(offer, signer, Manifest::default())
    }

    /// [`Self::result_for`], claiming `manifest` as the outputs (whose
    /// files this peer does not serve).
    pub fn result_with(
        offer: &JobOffer,
        signer: &Keypair,
        manifest: Manifest,
    ) -> anyhow::Result<JobResult> {
        kiln_cli::bench_coordinator::honest_result(offer, signer, b"rogue ran it\n", manifest, 1000)
    }
}

/// A libp2p peer that a real node trusts as its coordinator.
pub struct TestCoordinatorPeer {
    pub key: Keypair,
    pub net: kiln_net::Client,
    events: mpsc::Receiver<NetEvent>,
}

impl TestCoordinatorPeer {
    pub async fn start(cancel: &CancellationToken) -> anyhow::Result<Self> {
        let key = Keypair::generate();
        let (net, events, ev) =
            kiln_net::spawn(key.to_libp2p(), NetConfig::default(), cancel.clone()).await?;
        tokio::spawn(ev.run());
        Ok(Self { key, net, events })
    }

    pub fn addr(&self) -> Addr {
        self.net.listen_addrs()[0].clone()
    }

    /// Waits for a node to register and accepts it; returns its advert.
    pub async fn accept_registration(&mut self) -> anyhow::Result<CapabilityAdvert> {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(60), self.events.recv())
                .await
                .context("no registration")?;
            if let Some(NetEvent::Request {
                request: NetRequest::Register(a),
                reply,
                ..
            }) = ev
            {
                let _ = reply.send(NetResponse::Accepted);
                return Ok(a.payload);
            }
        }
    }

    /// Waits for the node to deliver a result, accepts it and returns it
    /// (answering heartbeats and usage reports meanwhile).
    pub async fn next_result(&mut self) -> anyhow::Result<JobResult> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .context("no result within 120s")?;
            match ev {
                Some(NetEvent::Request {
                    request: NetRequest::Result(r),
                    reply,
                    ..
                }) => {
                    let _ = reply.send(NetResponse::Accepted);
                    return Ok(*r);
                }
                Some(NetEvent::Request { reply, .. }) => {
                    let _ = reply.send(NetResponse::Accepted);
                }
                Some(_) => {}
                None => bail!("network stopped"),
            }
        }
    }

    /// Sends an offer to the node and returns its answer, answering any
    /// heartbeats that arrive meanwhile.
    pub async fn offer(
        &mut self,
        to: &CapabilityAdvert,
        offer: Signed<JobOffer>,
    ) -> anyhow::Result<NetResponse> {
        self.request(to, NetRequest::Offer(offer)).await
    }

    /// Sends any request to the node and returns its answer, answering any
    /// heartbeats that arrive meanwhile.
    pub async fn request(
        &mut self,
        to: &CapabilityAdvert,
        req: NetRequest,
    ) -> anyhow::Result<NetResponse> {
        let addrs: Vec<Addr> = to
            .listen_addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let (tx, rx) = oneshot::channel();
        let net = self.net.clone();
        let peer = to.provider.peer_id();
        tokio::spawn(async move {
            let _ = tx.send(net.request(peer, addrs, req).await);
        });
        let mut rx = rx;
        loop {
            tokio::select! {
                r = &mut rx => return Ok(r.context("request task died")??),
                Some(ev) = self.events.recv() => {
                    if let NetEvent::Request { reply, .. } = ev {
                        let _ = reply.send(NetResponse::Accepted);
                    }
                }
            }
        }
    }
}

pub use kiln_cli::registry::LoopbackRegistry;
