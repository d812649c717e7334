//! # kiln-node — the provider daemon
//!
//! A node lends an idle machine to the marketplace. On start it loads (or
//! creates) its identity key, connects to the Docker engine, reaps anything a
//! previous crash left behind, discovers its GPUs (NVML; CPU-only when there
//! is no driver), measures its CPU, and then:
//!
//! 1. registers a signed [`CapabilityAdvert`] with its coordinator over
//!    request-response, and gossips it on the advert topic; re-registering
//!    every heartbeat interval doubles as its liveness signal;
//! 2. answers [`JobOffer`]s: an offer must be signed by *its* coordinator,
//!    addressed to *this* node, unexpired, and fit a free slot; accepting the
//!    same offer id twice is idempotent;
//! 3. for each accepted job, fetches inputs by CID into its blob cache
//!    ([`kiln_blobs::Store`]: from the coordinator and from peers holding
//!    them at once, or from a URL; every 16 KiB group verified as it
//!    arrives), mounts them read-only, runs the container under the sandbox
//!    in [`runner`], imports the outputs into the cache, and sends back a
//!    signed [`ResultReceipt`] with the output manifest. Small blobs ride
//!    inline; the coordinator fetches the rest from this node over
//!    `/kiln/blobs/1`.
//!
//! The cache serves `/kiln/blobs/1`: the coordinator may fetch anything
//! (outputs, logs); other peers only blobs this node fetched as job inputs
//! (which it announces, so later jobs can fetch from several providers).
//!
//! Module map: [`hw`] (what the machine has), [`gpu`] (everything NVML
//! says), [`bench`] (benchmarks and their proofs, cached), [`doctor`]
//! (readiness checks), [`idle`] (owner idle policy), [`runner`] (one job in
//! one container), this file (the service that ties them to the network).

pub mod bench;
mod challenge;
pub mod cli;
pub mod doctor;
mod gang;
pub mod gpu;
pub mod hw;
pub mod idle;
mod owner;
pub mod runner;
mod shared;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_blobs::{PinGuard, Store, StoreConfig};
use kiln_net::{Addr, NetConfig, NetEvent, Peer};
use kiln_protocol::keys::keyfile;
use kiln_protocol::{
    Blob, CancelJob, CapabilityAdvert, ContentId, Credits, JobId, JobLost, JobOffer, JobResult,
    Keypair, NetRequest, NetResponse, OfferId, ProviderId, PublicKey, ResourceUsage, ResultReceipt,
    Signed, UnixMillis,
};
use runner::{Limits, LocalInput, Orphan, Policy, Runner};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// A running node.
pub struct Node {
    pub provider: ProviderId,
    pub listen_addrs: Vec<Addr>,
    pub tasks: Vec<JoinHandle<()>>,
    /// The node's job runner, for inspecting what is left on this machine.
    pub runner: Runner,
    state: Arc<State>,
}

struct State {
    key: Keypair,
    provider: ProviderId,
    coordinator: Peer,
    coordinator_addr: Addr,
    coordinator_key: PublicKey,
    client: kiln_net::Client,
    runner: Runner,
    config: NodeConfig,
    gpus: Vec<kiln_protocol::GpuInfo>,
    advert_base: CapabilityAdvert,
    jobs: Mutex<Jobs>,
    /// Inputs and outputs, by CID.
    store: Store,
    /// Blobs fetched as job inputs: the only ones served to peers other
    /// than the coordinator (when it allows, see [`may_serve`]), and the
    /// ones advertised as cached.
    shared: shared::SharedSet,
    /// The coordinator's answers about fetches of cached inputs, by (peer,
    /// CID): when, and whether allowed.
    fetch_grants: Mutex<HashMap<(Peer, ContentId), (std::time::Instant, bool)>>,
}

#[derive(Default)]
struct Jobs {
    accepted: HashMap<OfferId, JobId>,
    /// Running jobs and the token that stops them.
    running: HashMap<JobId, (OfferId, CancellationToken)>,
    busy_gpus: HashSet<u32>,
    /// GPUs on which a finished job's process was still found; not assigned
    /// until a later check finds them clean.
    dirty_gpus: HashSet<u32>,
    /// Jobs reaped at start-up, still to be reported lost to the coordinator.
    lost: Vec<Orphan>,
    /// Set by [`Node::drain`]: take no offers, report running jobs lost.
    draining: bool,
    /// Jobs holding GPUs (preempted when the owner returns, per policy).
    gpu_jobs: HashSet<JobId>,
    /// Jobs stopped because the owner came back: reported lost as
    /// `preempted_by_owner`.
    preempted: HashSet<JobId>,
    /// Why the owner sampler keeps offers away (`None`: take them).
    owner_busy: Option<String>,
    /// A benchmark challenge runs: take no offers meanwhile.
    benchmarking: bool,
    /// Gang members reserved and waiting for their start, and what happened to each.
    gang: gang::Table,
}

/// Starts a node; it runs until `cancel` fires.
pub async fn start(config: NodeConfig, cancel: CancellationToken) -> Result<Node, NodeError> {
    let state_dir_err = |source| NodeError::StateDir {
        path: config.state_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&config.state_dir).map_err(state_dir_err)?;
    std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(state_dir_err)?;
    let key = keyfile::load_or_create(&config.state_dir.join("identity.key"))?;
    let provider = ProviderId::from_public_key(&key.public());
    let coordinator = kiln_net::peer_of(&config.coordinator)
        .ok_or_else(|| NodeError::CoordinatorAddress(config.coordinator.to_string()))?;
    let coordinator_key = PublicKey::from_peer_id(&coordinator)
        .ok_or_else(|| NodeError::CoordinatorAddress(config.coordinator.to_string()))?;

    let docker = kiln_docker::connect().await?;
    let store = Store::open_dir(
        &config.state_dir.join("blobs"),
        StoreConfig {
            quota: config.cache_quota,
            no_sync: false,
        },
    )?;
    let runner = Runner::new(
        docker,
        config.state_dir.join("jobs"),
        provider.to_string(),
        config.limits.clone(),
        config.policy.clone(),
        store.clone(),
    );
    let lost = match runner.reap_orphans().await {
        Ok(reaped) => reaped,
        Err(e) => {
            tracing::warn!("could not list leftover containers: {e}");
            Vec::new()
        }
    };

    let gpus = hw::discover_gpus().unwrap_or_else(|why| {
        tracing::info!("{why}");
        Vec::new()
    });
    let benchmark = config.startup_benchmark.then(|| {
        let dir = config.state_dir.clone();
        tokio::task::spawn_blocking(move || {
            bench::startup_report(&dir, &gpu::discover(), &hw::cpu_model())
        })
    });
    let cpu = tokio::task::spawn_blocking(|| hw::cpu_info(Duration::from_millis(100)))
        .await
        .unwrap_or_else(|_| hw::cpu_info(Duration::ZERO));

    let (client, mut events, event_loop) = kiln_net::spawn(
        key.to_libp2p(),
        NetConfig {
            listen: vec![config.listen.clone()],
            ..NetConfig::default()
        },
        cancel.clone(),
    )
    .await?;
    let listen_addrs = client.listen_addrs().to_vec();
    tracing::info!(provider = %provider, addrs = ?listen_addrs, gpus = gpus.len(), cpu = %cpu.model, "provider node up");

    let advert_base = CapabilityAdvert {
        provider,
        protocol_version: kiln_protocol::PROTOCOL_VERSION,
        node_version: env!("CARGO_PKG_VERSION").into(),
        listen_addrs: listen_addrs.iter().map(ToString::to_string).collect(),
        cpu,
        memory: hw::total_memory(),
        gpus: gpus.clone(),
        slots: config.slots,
        price_per_cpu_hour: config.price_per_cpu_hour,
        price_per_gpu_hour: config.price_per_gpu_hour,
        runtime: config
            .policy
            .runtime
            .clone()
            .unwrap_or_else(|| "runc".into()),
        allows_network: config.policy.allow_network,
        issued_at: UnixMillis::now(),
        region: config.region.clone(),
        disk: config.disk,
        cached: Vec::new(),
        benchmark: match benchmark {
            Some(task) => task.await.ok(),
            None => None,
        },
    };
    let config_state_dir = config.state_dir.clone();
    let state = Arc::new(State {
        key,
        provider,
        coordinator,
        coordinator_addr: config.coordinator.clone(),
        coordinator_key,
        client,
        runner,
        config,
        gpus,
        advert_base,
        jobs: Mutex::new(Jobs {
            lost,
            ..Jobs::default()
        }),
        store: store.clone(),
        shared: shared::SharedSet::open(&config_state_dir.join("shared-cids")),
        fetch_grants: Mutex::new(HashMap::new()),
    });

    let mut tasks = vec![tokio::spawn(event_loop.run())];
    let s = state.clone();
    let authorize: kiln_blobs::wire::Authorize = Arc::new(move |peer, cid| {
        let s = s.clone();
        Box::pin(async move { may_serve(&s, peer, cid).await })
    });
    let (client, c) = (state.client.clone(), cancel.clone());
    tasks.push(tokio::spawn(async move {
        let config = kiln_blobs::wire::ServeConfig {
            validate: true,
            authorize: Some(authorize),
        };
        if let Err(e) = kiln_blobs::wire::serve_with(store, client, c, config).await {
            tracing::error!("cannot serve blobs: {e}");
        }
    }));
    tasks.push(tokio::spawn(heartbeat(state.clone(), cancel.clone())));
    if owner::needed(&state) {
        tasks.push(tokio::spawn(owner::sampler(state.clone(), cancel.clone())));
    }
    let s = state.clone();
    let c = cancel.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                () = c.cancelled() => break,
                ev = events.recv() => match ev { Some(ev) => ev, None => break },
            };
            if let NetEvent::Request {
                peer,
                request,
                reply,
            } = ev
            {
                if let NetRequest::Challenge(ch) = request {
                    // Takes seconds: answered from its own task.
                    let s = s.clone();
                    tokio::spawn(async move {
                        let _ = reply.send(challenge::handle(s, peer, ch).await);
                    });
                    continue;
                }
                let response = handle_request(&s, peer, request);
                let _ = reply.send(response);
            }
        }
    }));
    Ok(Node {
        provider,
        listen_addrs,
        tasks,
        runner: state.runner.clone(),
        state,
    })
}

impl State {
    fn signed_advert(&self) -> Option<Signed<CapabilityAdvert>> {
        let mut advert = self.advert_base.clone();
        advert.issued_at = UnixMillis::now();
        if self
            .jobs
            .lock()
            .map(|j| j.draining || j.owner_busy.is_some())
            .unwrap_or(true)
        {
            advert.slots = 0; // shutting down, or the owner is busy: take no new work
        }
        advert.cached = self.shared.held(&self.store, MAX_ADVERTISED_CACHE);
        let ttl = (self.config.heartbeat.as_secs() * 3).max(15);
        Signed::sign(&self.key, advert, ttl).ok()
    }
}

/// Whether `peer` may fetch `cid` from this node: the coordinator may have
/// anything (it collects outputs); another peer only a cached job input, and
/// only if the coordinator says a job entitles it (blobs are not
/// capabilities, and only the coordinator knows who runs what). Answers
/// are remembered: yes for [`FETCH_GRANT_TTL`], no for [`FETCH_REFUSAL_TTL`].
async fn may_serve(state: &State, peer: Peer, cid: ContentId) -> bool {
    if peer == state.coordinator {
        return true;
    }
    if !state.shared.contains(&cid) {
        return false;
    }
    let key = (peer, cid);
    let remembered = state.fetch_grants.lock().ok().and_then(|g| {
        g.get(&key).and_then(|(at, ok)| {
            let ttl = if *ok {
                FETCH_GRANT_TTL
            } else {
                FETCH_REFUSAL_TTL
            };
            (at.elapsed() < ttl).then_some(*ok)
        })
    });
    if let Some(ok) = remembered {
        return ok;
    }
    let ask = NetRequest::MayFetch {
        peer: ProviderId::from_peer_id(peer),
        cid,
    };
    let addrs = vec![state.coordinator_addr.clone()];
    let ok = match state.client.request(state.coordinator, addrs, ask).await {
        Ok(NetResponse::Accepted) => true,
        Ok(NetResponse::Rejected { reason }) => {
            tracing::debug!(%peer, %cid, "not serving a cached input: {reason}");
            false
        }
        Ok(other) => {
            tracing::warn!("unexpected answer to a fetch check: {other:?}");
            false
        }
        Err(e) => {
            tracing::warn!(%peer, %cid, "cannot ask the coordinator whether to serve a cached input: {e}");
            false
        }
    };
    // Refusals are remembered too (briefly), so a peer repeating a request
    // cannot turn one node into a stream of questions to the coordinator.
    if let Ok(mut g) = state.fetch_grants.lock() {
        if g.len() > 10_000 {
            g.retain(|_, (at, _)| at.elapsed() < FETCH_GRANT_TTL);
        }
        g.insert(key, (std::time::Instant::now(), ok));
    }
    ok
}

/// How long the coordinator's permission for a peer to fetch a cached input
/// is remembered.
/// (No longer than the coordinator's own grant cache.)
const FETCH_GRANT_TTL: Duration = Duration::from_secs(30);
/// How long a refusal is remembered.
const FETCH_REFUSAL_TTL: Duration = Duration::from_secs(5);

/// Most cached CIDs named in one advert.
const MAX_ADVERTISED_CACHE: usize = 1024;

/// Registers with the coordinator now and every heartbeat interval.
async fn heartbeat(state: Arc<State>, cancel: CancellationToken) {
    let mut registered = false;
    loop {
        if let Some(advert) = state.signed_advert() {
            let _ = state.client.publish_advert(&advert).await;
            let addrs = vec![state.coordinator_addr.clone()];
            match state
                .client
                .request(state.coordinator, addrs, NetRequest::Register(advert))
                .await
            {
                Ok(NetResponse::Accepted) => {
                    if !registered {
                        tracing::info!(coordinator = %state.coordinator, "registered with the coordinator");
                    }
                    if !registered {
                        set_stake(&state).await;
                    }
                    registered = true;
                    report_lost(&state).await;
                }
                Ok(other) => {
                    registered = false;
                    tracing::warn!("the coordinator refused our advert: {other:?}");
                }
                Err(e) => {
                    registered = false;
                    tracing::warn!("cannot register with the coordinator: {e}");
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(state.config.heartbeat) => {}
        }
    }
}

/// Asks the coordinator to hold the configured stake bond.
async fn set_stake(state: &State) {
    let Some(target) = state.config.stake else {
        return;
    };
    let req = kiln_protocol::SetStake {
        provider: state.provider,
        target,
    };
    let Ok(signed) = Signed::sign(&state.key, req, 300) else {
        return;
    };
    let addrs = vec![state.coordinator_addr.clone()];
    match state
        .client
        .request(state.coordinator, addrs, NetRequest::Stake(signed))
        .await
    {
        Ok(NetResponse::Accepted) => tracing::info!(%target, "stake bond set"),
        Ok(NetResponse::Rejected { reason }) => tracing::warn!("stake not set: {reason}"),
        Ok(_) | Err(_) => tracing::warn!("stake not set: the coordinator did not answer"),
    }
}

/// Tells the coordinator about jobs reaped at start-up, so it requeues them
/// instead of waiting for results that will never come.
async fn report_lost(state: &State) {
    report_lost_with(
        state,
        "the provider daemon restarted while the job ran; its container was reaped",
    )
    .await;
}

async fn report_lost_with(state: &State, why: &str) {
    let pending = state
        .jobs
        .lock()
        .map(|mut j| std::mem::take(&mut j.lost))
        .unwrap_or_default();
    let mut failed = Vec::new();
    for o in pending {
        let lost = JobLost {
            job_id: o.job,
            offer_id: o.offer,
            provider: state.provider,
            reason: why.into(),
        };
        let Ok(signed) = Signed::sign(&state.key, lost, 3600) else {
            continue;
        };
        let addrs = vec![state.coordinator_addr.clone()];
        match state
            .client
            .request(state.coordinator, addrs, NetRequest::Lost(signed))
            .await
        {
            Ok(NetResponse::Accepted) => {
                tracing::warn!(job = %o.job.short(), "reported a lost job to the coordinator")
            }
            Ok(NetResponse::Rejected { reason }) => {
                tracing::warn!(job = %o.job.short(), "the coordinator ignored a lost job: {reason}")
            }
            _ => failed.push(o),
        }
    }
    if let Ok(mut j) = state.jobs.lock() {
        j.lost.extend(failed);
    }
}

fn reject(reason: String) -> NetResponse {
    tracing::warn!("{reason}");
    NetResponse::Rejected { reason }
}

fn handle_request(state: &Arc<State>, peer: Peer, request: NetRequest) -> NetResponse {
    match request {
        NetRequest::Offer(offer) => handle_offer(state, peer, offer),
        NetRequest::Cancel(cancel) => handle_cancel(state, peer, &cancel),
        NetRequest::Register(_)
        | NetRequest::Result(_)
        | NetRequest::Lost(_)
        | NetRequest::Usage(_)
        | NetRequest::Stake(_)
        | NetRequest::MayFetch { .. } => reject(format!(
            "peer {peer} sent a request only a coordinator accepts"
        )),
        // Answered from its own task by the request loop in `start`.
        NetRequest::Challenge(_) => reject("internal error: challenge not dispatched".into()),
        NetRequest::GangOffer(o) => gang::handle_offer(state, peer, &o),
        NetRequest::GangStart(g) => gang::handle_start(state, peer, &g),
        NetRequest::GangRelease(g) => gang::handle_release(state, peer, &g),
    }
}

/// Stops a running job when its coordinator says so.
fn handle_cancel(state: &Arc<State>, peer: Peer, signed: &Signed<CancelJob>) -> NetResponse {
    let c = match signed.verify(UnixMillis::now()) {
        Ok(c) => c,
        Err(e) => return reject(format!("cancel from {peer} rejected: {e}")),
    };
    if signed.signer != state.coordinator_key
        || peer != state.coordinator
        || c.provider != state.provider
    {
        return reject(format!(
            "cancel for job {} rejected: not from this node's coordinator or not for this node",
            c.job_id.short()
        ));
    }
    let Ok(jobs) = state.jobs.lock() else {
        return reject("internal error: job table poisoned".into());
    };
    match jobs.running.get(&c.job_id) {
        Some((offer, token)) if *offer == c.offer_id => {
            tracing::info!(job = %c.job_id.short(), reason = %c.reason, "cancelling job");
            token.cancel();
            NetResponse::Accepted
        }
        _ => reject(format!(
            "cancel for job {}: not running here",
            c.job_id.short()
        )),
    }
}

/// Decides whether to take an offer. Pure checks first, then capacity.
fn handle_offer(state: &Arc<State>, peer: Peer, signed: Signed<JobOffer>) -> NetResponse {
    let offer = match signed.verify(UnixMillis::now()) {
        Ok(o) => o.clone(),
        Err(e) => return reject(format!("offer from {peer} rejected: {e}")),
    };
    if signed.signer != state.coordinator_key || peer != state.coordinator {
        return reject(format!(
            "offer {} rejected: not from this node's coordinator",
            offer.offer_id.short()
        ));
    }
    if offer.provider != state.provider {
        return reject(format!(
            "offer {} rejected: addressed to provider {}, not this one",
            offer.offer_id.short(),
            offer.provider
        ));
    }
    if let Err(e) = offer.spec.validate() {
        return reject(format!(
            "offer {} rejected: invalid spec: {e}",
            offer.offer_id.short()
        ));
    }
    if offer.spec.resources.gang > 1 {
        return reject(format!(
            "offer {} rejected: job {} is a gang of {} nodes and must come as a gang offer (reserve, then start)",
            offer.offer_id.short(),
            offer.job_id.short(),
            offer.spec.resources.gang
        ));
    }
    let gpu_uuids = {
        let Ok(mut jobs) = state.jobs.lock() else {
            return reject("internal error: job table poisoned".into());
        };
        if jobs.accepted.contains_key(&offer.offer_id) {
            return NetResponse::Accepted; // a retried dispatch of an offer we already run
        }
        match admit(state, &mut jobs, &offer) {
            Ok(picked) => picked,
            Err(why) => return reject(why),
        }
    };
    tracing::info!(job = %offer.job_id.short(), offer = %offer.offer_id.short(), "accepted offer");
    launch(state, offer, gpu_uuids);
    NetResponse::Accepted
}

/// Checks that `offer` fits now (a slot, not draining, the owner away, no
/// benchmark, enough clean GPUs) and books it: a slot, its GPUs, and its
/// offer id. Returns the GPUs picked (index, uuid), or why it does not fit.
fn admit(state: &State, jobs: &mut Jobs, offer: &JobOffer) -> Result<Vec<(u32, String)>, String> {
    let short = offer.offer_id.short();
    // One attempt of a job at a time here: an earlier attempt (a released
    // gang reservation, a stopped run) may still be winding down, and its
    // bookkeeping is keyed by job.
    if let Some((other, _)) = jobs.running.get(&offer.job_id)
        && *other != offer.offer_id
    {
        return Err(format!(
            "offer {short} rejected: job {} is still winding down here under offer {}; offer it again shortly",
            offer.job_id.short(),
            other.short()
        ));
    }
    if jobs.running.len() >= state.config.slots as usize {
        return Err(format!(
            "offer {short} rejected: all {} slots busy",
            state.config.slots
        ));
    }
    if jobs.draining {
        return Err(format!(
            "offer {short} rejected: this provider is shutting down"
        ));
    }
    if let Some(why) = &jobs.owner_busy {
        return Err(format!("offer {short} rejected: {why}"));
    }
    if jobs.benchmarking {
        return Err(format!(
            "offer {short} rejected: a benchmark challenge is running"
        ));
    }
    recheck_dirty_gpus(&state.gpus, &mut jobs.dirty_gpus);
    let free = hw::assignable_gpus(&state.gpus, &jobs.busy_gpus, &jobs.dirty_gpus);
    let want = offer.spec.resources.gpus as usize;
    if free.len() < want {
        return Err(format!(
            "offer {short} rejected: needs {want} GPUs, {} free",
            free.len()
        ));
    }
    let picked: Vec<(u32, String)> = free
        .iter()
        .take(want)
        .map(|g| (g.index, g.uuid.clone()))
        .collect();
    for (i, _) in &picked {
        jobs.busy_gpus.insert(*i);
    }
    jobs.accepted.insert(offer.offer_id, offer.job_id);
    jobs.running
        .insert(offer.job_id, (offer.offer_id, CancellationToken::new()));
    if want > 0 {
        jobs.gpu_jobs.insert(offer.job_id);
    }
    Ok(picked)
}

/// Gives back what [`admit`] booked for a job that will not run (a gang
/// member's reservation released). The offer id stays known, so the same
/// offer is not taken again.
fn unadmit(jobs: &mut Jobs, job: &JobId, offer: &OfferId, gpus: &[(u32, String)]) {
    forget_run(jobs, job, offer);
    for (i, _) in gpus {
        jobs.busy_gpus.remove(i);
    }
}

/// Drops the slot bookkeeping of `job`, if it is still held by `offer`
/// (never another attempt's).
fn forget_run(jobs: &mut Jobs, job: &JobId, offer: &OfferId) {
    if jobs.running.get(job).is_some_and(|(o, _)| o == offer) {
        jobs.running.remove(job);
        jobs.gpu_jobs.remove(job);
        jobs.preempted.remove(job);
    }
}

/// Runs an admitted job in the background; frees its slot and GPUs when it ends.
fn launch(state: &Arc<State>, offer: JobOffer, gpu_uuids: Vec<(u32, String)>) {
    let s = state.clone();
    tokio::spawn(async move {
        let gpu_indices: Vec<u32> = gpu_uuids.iter().map(|(i, _)| *i).collect();
        let uuids: Vec<String> = gpu_uuids.into_iter().map(|(_, u)| u).collect();
        let (job, offer_id) = (offer.job_id, offer.offer_id);
        run_job(&s, offer, &uuids).await;
        // GPU hygiene: a GPU the job used must be free of processes before
        // it is given to anyone else.
        let leftover: HashSet<u32> = match hw::gpu_processes(&uuids) {
            Ok(counts) => counts
                .iter()
                .filter(|(_, n)| *n > 0)
                .filter_map(|(u, _)| s.gpus.iter().find(|g| &g.uuid == u).map(|g| g.index))
                .collect(),
            Err(_) => HashSet::new(), // no GPUs, nothing to check
        };
        if !leftover.is_empty() {
            tracing::warn!(job = %job.short(), gpus = ?leftover, "processes left on GPUs after the job; quarantined until clean");
        }
        if let Ok(mut jobs) = s.jobs.lock() {
            forget_run(&mut jobs, &job, &offer_id);
            for i in gpu_indices {
                jobs.busy_gpus.remove(&i);
            }
            jobs.dirty_gpus.extend(leftover);
        }
    });
}

/// Returns dirty GPUs to service once NVML shows no process on them.
fn recheck_dirty_gpus(gpus: &[kiln_protocol::GpuInfo], dirty: &mut HashSet<u32>) {
    if dirty.is_empty() {
        return;
    }
    let uuids: Vec<String> = gpus
        .iter()
        .filter(|g| dirty.contains(&g.index))
        .map(|g| g.uuid.clone())
        .collect();
    if let Ok(counts) = hw::gpu_processes(&uuids) {
        for (u, n) in counts {
            if n == 0
                && let Some(g) = gpus.iter().find(|g| g.uuid == u)
            {
                dirty.remove(&g.index);
            }
        }
    }
}

impl Node {
    /// Stops taking offers, stops running containers and reports their jobs
    /// lost (so the coordinator requeues them), waiting up to `grace`. Call
    /// before cancelling the root token: the network must still be up.
    pub async fn drain(&self, grace: Duration) {
        let tokens: Vec<CancellationToken> = match self.state.jobs.lock() {
            Ok(mut j) => {
                j.draining = true;
                j.running.values().map(|(_, t)| t.clone()).collect()
            }
            Err(_) => Vec::new(),
        };
        // Advertise zero slots at once, so the scheduler stops offering work here.
        if let Some(advert) = self.state.signed_advert() {
            let addrs = vec![self.state.coordinator_addr.clone()];
            let _ = self
                .state
                .client
                .request(self.state.coordinator, addrs, NetRequest::Register(advert))
                .await;
        }
        for t in &tokens {
            t.cancel();
        }
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if self
                .state
                .jobs
                .lock()
                .map(|j| j.running.is_empty())
                .unwrap_or(true)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!("some jobs were still stopping when the drain period ended");
    }
}

/// Inputs ready to mount, and the pins that keep them in the cache while
/// the job runs.
struct FetchedInputs {
    local: Vec<LocalInput>,
    _pins: Vec<PinGuard>,
}

/// Fetches every input into the blob cache (a cache hit costs nothing),
/// verifying each 16 KiB group as it arrives, and lays them out under the
/// job directory for read-only mounts: a file as a hard link to the cached
/// blob, a directory manifest as a tree of hard links.
async fn fetch_inputs(
    state: &State,
    job: &JobId,
    offer: &JobOffer,
) -> Result<FetchedInputs, String> {
    let dir = state.runner.job_dir(job).join("in");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create the input directory: {e}"))?;
    let mut local = Vec::new();
    let mut pins = Vec::new();
    let mut announce = Vec::new();
    for (i, input) in offer.spec.inputs.iter().enumerate() {
        let sources = sources_for(state, offer, &input.cid);
        pins.push(state.store.pin(&input.cid));
        if let Some(url) = &input.url {
            let r = kiln_blobs::http::fetch_url(&state.store, url, input.cid)
                .await
                .map_err(|e| format!("input {i} ({}): {e}", input.path))?;
            if r.bytes_transferred > 0 {
                tracing::info!(job = %job.short(), cid = %input.cid.short(), bytes = r.bytes_transferred, ms = r.elapsed.as_millis() as u64, "input downloaded from its URL");
            }
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
    // Peers may now fetch these from here; tell them.
    let have: Vec<(ContentId, u64)> = announce
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
        tracing::debug!("could not announce cached inputs: {e}");
    }
    Ok(FetchedInputs { local, _pins: pins })
}

/// Where an input can come from: the coordinator, plus the peers the offer
/// names for it (never this node itself).
fn sources_for(state: &State, offer: &JobOffer, cid: &ContentId) -> Vec<kiln_blobs::Source> {
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

async fn fetch_one(
    state: &State,
    job: &JobId,
    cid: ContentId,
    size: Option<u64>,
    sources: Vec<kiln_blobs::Source>,
) -> Result<(), String> {
    let opts = kiln_blobs::FetchOptions::default();
    match kiln_blobs::fetch(&state.store, &state.client, cid, size, sources, &opts).await {
        Ok(r) => {
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
        Err(e) => Err(format!(
            "input {cid} could not be fetched: {e}; upload it with `kiln data add` or give it a url"
        )),
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

async fn run_job(state: &State, offer: JobOffer, gpu_uuids: &[String]) {
    let job = offer.job_id;
    let cancel = state
        .jobs
        .lock()
        .ok()
        .and_then(|j| j.running.get(&job).map(|(_, t)| t.clone()))
        .unwrap_or_default();
    let fetched = tokio::select! {
        f = fetch_inputs(state, &job, &offer) => f,
        () = cancel.cancelled() => Err("cancelled while its inputs were being fetched".into()),
    };
    let report = match fetched {
        Ok(inputs) => {
            let run = state.runner.run(
                job,
                offer.offer_id,
                &offer.spec,
                &inputs.local,
                gpu_uuids,
                cancel,
            );
            // Usage is reported for settlement while the job runs.
            tokio::select! {
                report = run => report,
                never = report_usage(state, &offer) => match never {},
            }
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(state.runner.job_dir(&job));
            tracing::warn!(job = %job.short(), "{e}");
            runner::RunReport::failed_before_start(e, String::new())
        }
    };
    tracing::info!(job = %job.short(), outcome = ?report.outcome, exit = ?report.exit_code, wall_ms = report.wall_ms, "job finished");
    if state
        .jobs
        .lock()
        .map(|j| j.preempted.contains(&job))
        .unwrap_or(false)
    {
        // Stopped because the provider's owner came back (preempt policy):
        // the coordinator requeues it.
        if let Ok(mut j) = state.jobs.lock() {
            j.lost.push(Orphan {
                job,
                offer: offer.offer_id,
            });
        }
        report_lost_with(
            state,
            &format!(
                "{}: the provider's owner started using the GPU",
                idle::PREEMPTED_BY_OWNER
            ),
        )
        .await;
        return;
    }
    if state.jobs.lock().map(|j| j.draining).unwrap_or(false) {
        // Stopped because this provider is shutting down, not because the
        // buyer cancelled: the coordinator should run it elsewhere.
        if let Ok(mut j) = state.jobs.lock() {
            j.lost.push(Orphan {
                job,
                offer: offer.offer_id,
            });
        }
        report_lost_with(state, "the provider shut down while the job ran").await;
        return;
    }

    let stdout_cid = ContentId::of_bytes(&report.stdout);
    let stderr_cid = ContentId::of_bytes(&report.stderr);
    let receipt = ResultReceipt {
        job_id: job,
        offer_id: offer.offer_id,
        provider: state.provider,
        outcome: report.outcome,
        exit_code: report.exit_code,
        error: report.error.clone(),
        image_digest: report.image_digest.clone(),
        input_cids: offer.spec.inputs.iter().map(|i| i.cid).collect(),
        output_cid: report.manifest.cid(),
        stdout_cid,
        stderr_cid,
        started_at: report.started_at,
        finished_at: report.finished_at,
        usage: ResourceUsage {
            wall_ms: report.wall_ms,
            output_bytes: report.manifest.total_size(),
            stdout_bytes: report.stdout_total,
            stderr_bytes: report.stderr_total,
            logs_truncated: report.logs_truncated(),
            log_cap_bytes: state.config.limits.log_cap_bytes,
        },
    };
    let Ok(receipt) = Signed::sign(&state.key, receipt, 3600) else {
        tracing::error!(job = %job.short(), "could not sign the receipt");
        return;
    };
    // Logs go into the cache too, so the coordinator can fetch them when
    // they are too large to send inline.
    let mut pins = report.pins;
    for bytes in [&report.stdout, &report.stderr] {
        if bytes.len() as u64 > kiln_protocol::MAX_INLINE_BLOB {
            match state.store.import_bytes(bytes) {
                Ok(cid) => pins.push(state.store.pin(&cid)),
                Err(e) => tracing::warn!(job = %job.short(), "cannot cache logs: {e}"),
            }
        }
    }
    let blobs = inline_blobs(
        &state.store,
        [(stdout_cid, report.stdout), (stderr_cid, report.stderr)],
        &report.manifest,
    );
    let result = JobResult {
        job_id: job,
        receipt,
        manifest: report.manifest,
        blobs,
    };
    deliver(state, job, result).await;
    drop(pins); // delivered (or given up): the cache may evict them now
}

/// The blobs small enough to send inline with a result: logs first, then
/// output files, up to [`kiln_protocol::MAX_INLINE_TOTAL`] bytes.
fn inline_blobs(
    store: &Store,
    logs: [(ContentId, Vec<u8>); 2],
    manifest: &kiln_protocol::Manifest,
) -> Vec<Blob> {
    let mut budget = kiln_protocol::MAX_INLINE_TOTAL;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut take = |cid: ContentId, bytes: Vec<u8>, budget: &mut u64, out: &mut Vec<Blob>| {
        let n = bytes.len() as u64;
        if n <= kiln_protocol::MAX_INLINE_BLOB && n <= *budget && seen.insert(cid) {
            *budget -= n;
            out.push(Blob { cid, bytes });
        }
    };
    for (cid, bytes) in logs {
        take(cid, bytes, &mut budget, &mut out);
    }
    for e in &manifest.entries {
        if e.size <= kiln_protocol::MAX_INLINE_BLOB
            && e.size <= budget
            && let Ok(Some(bytes)) = store.get(&e.cid)
        {
            take(e.cid, bytes, &mut budget, &mut out);
        }
    }
    out
}

/// Reports usage every `usage_interval` for as long as it is polled (the
/// caller drops it when the job ends).
async fn report_usage(state: &State, offer: &JobOffer) -> std::convert::Infallible {
    let started = std::time::Instant::now();
    let mut interval = 0u64;
    loop {
        tokio::time::sleep(state.config.usage_interval).await;
        interval += 1;
        let report = kiln_protocol::UsageReport {
            job_id: offer.job_id,
            offer_id: offer.offer_id,
            provider: state.provider,
            interval,
            wall_ms: started.elapsed().as_millis() as u64,
        };
        let Ok(signed) = Signed::sign(&state.key, report, 3600) else {
            continue;
        };
        let addrs = vec![state.coordinator_addr.clone()];
        match state
            .client
            .request(state.coordinator, addrs, NetRequest::Usage(signed))
            .await
        {
            Ok(NetResponse::Accepted) => {}
            Ok(NetResponse::Rejected { reason }) => {
                tracing::warn!(job = %offer.job_id.short(), "usage report refused: {reason}")
            }
            Ok(_) | Err(_) => {
                tracing::warn!(job = %offer.job_id.short(), interval, "usage report not delivered")
            }
        }
    }
}

/// Sends a result until the coordinator answers; a refusal is final.
/// How long to keep offering a result: the coordinator fetches and
/// verifies every output before it accepts (answering `Retry` meanwhile,
/// and keeping what it verified), so large outputs get time in proportion,
/// at a pessimistic 8 MiB/s, and never less than ten minutes.
/// Bounded by the signed receipt's own lifetime: past it the coordinator
/// would refuse the result anyway.
fn delivery_budget(result: &JobResult) -> Duration {
    let usage = &result.receipt.payload.usage;
    let logs = usage.stdout_bytes.saturating_add(usage.stderr_bytes);
    let bytes = result
        .manifest
        .total_size()
        .saturating_add(logs.min(usage.log_cap_bytes.saturating_mul(2)));
    let wanted = Duration::from_secs(600).max(Duration::from_secs(bytes / (8 << 20)));
    let left = Duration::from_millis(
        result
            .receipt
            .expires_at
            .0
            .saturating_sub(UnixMillis::now().0),
    );
    wanted.min(left.saturating_sub(Duration::from_secs(30)))
}

async fn deliver(state: &State, job: JobId, result: JobResult) {
    let mut delay = Duration::from_millis(500);
    let budget = delivery_budget(&result);
    let started = std::time::Instant::now();
    let mut attempt = 0u32;
    while attempt < 10 || started.elapsed() < budget {
        attempt += 1;
        let addrs = vec![state.coordinator_addr.clone()];
        match state
            .client
            .request(
                state.coordinator,
                addrs,
                NetRequest::Result(Box::new(result.clone())),
            )
            .await
        {
            Ok(NetResponse::Accepted) => {
                tracing::info!(job = %job.short(), "result delivered");
                return;
            }
            Ok(NetResponse::Rejected { reason }) => {
                tracing::error!(job = %job.short(), "the coordinator refused our result: {reason}");
                return;
            }
            Ok(NetResponse::Retry { reason }) => {
                tracing::warn!(job = %job.short(), attempt, "the coordinator asks for the result again: {reason}")
            }
            Ok(other) => {
                tracing::warn!(job = %job.short(), "unexpected answer to a result: {other:?}")
            }
            Err(e) => {
                tracing::warn!(job = %job.short(), attempt, "delivering the result failed: {e}")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    // Never leave the job hanging on the coordinator: hand it back so it
    // is requeued (or failed after its attempts run out).
    tracing::error!(job = %job.short(), attempt, secs = started.elapsed().as_secs(), "gave up delivering the result; reporting the job lost");
    if let Ok(mut j) = state.jobs.lock() {
        j.lost.push(Orphan {
            job,
            offer: result.receipt.payload.offer_id,
        });
    }
    report_lost_with(
        state,
        "the result could not be delivered to the coordinator",
    )
    .await;
}
