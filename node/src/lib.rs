//! # kiln-node — the provider daemon
//!
//! A node lends an idle machine to the marketplace. [`start`] loads (or
//! creates) its identity key, connects to the Docker engine, reaps anything
//! a previous crash left behind (to be reported lost), discovers its GPUs
//! (NVML; CPU-only when there is no driver), measures its CPU, and then:
//!
//! 1. registers a signed `CapabilityAdvert` with its coordinator, and
//!    gossips it; re-registering every heartbeat is its liveness signal
//!    (`reporting`);
//! 2. answers job offers: signed by *its* coordinator, addressed to *this*
//!    node, unexpired, fitting a free slot; the same offer id twice is
//!    accepted once (`handlers/offer.rs`, `admission`);
//! 3. for each accepted attempt, fetches inputs by CID into its blob cache,
//!    verified as they arrive (`inputs`), runs the container under the
//!    sandbox ([`runner`]) while reporting usage, and sends back a signed
//!    `ResultReceipt` with the output manifest, small blobs inline
//!    (`execution`, `delivery`). The coordinator fetches the rest from this
//!    node over `/kiln/blobs/1`, which serves the coordinator anything and
//!    other peers only cached inputs it allows (`handlers/may_fetch.rs`).
//!
//! ## Attempts, not jobs
//!
//! The job table and everything on disk are keyed by **offer id**: a
//! requeued job comes back as a new offer, and its new attempt runs beside
//! an old one still winding down, each with its own slot, token, container
//! (`kiln-<job>-<offer>`, labelled `kiln.job`/`kiln.offer`) and directory
//! (`<state>/jobs/<job>-<offer>`). Messages about an attempt (cancel, gang
//! release) must name both ids.
//!
//! ## Module map
//!
//! Lower layers never import higher ones (`grep 'use crate::'` shows it):
//!
//! | layer | modules |
//! |---|---|
//! | machine facts, pure decisions | [`hw`], [`gpu`], [`bench`](mod@bench), [`idle`], [`doctor`], [`runner`] (one job in one container), `shared` (which inputs peers may fetch), `gang` (the reservation table) |
//! | set-up | `config` ([`NodeConfig`], [`NodeError`]) |
//! | shared state | `state` (`State`, the job table) |
//! | one concern each | `admission` (offer checks, admit/unadmit), `inputs`, `reporting` (advert, stake, usage, lost) → `delivery` → `execution` (run, receipt); `owner` (owner sampler, preemption) |
//! | the wire | `handlers/` (one file per request, one error type) |
//! | the service | this file ([`start`], [`Node`]), [`cli`] |
//!
//! ## Stopping
//!
//! [`Node::drain`] stops taking offers and stops running jobs, which report
//! themselves lost so the coordinator requeues them. [`Node::shutdown`]
//! drains, then makes outstanding deliveries give up (reporting lost),
//! waits for every job task, and only then stops the network: every report
//! goes out while there is still a network to send it on.

pub mod bench;
pub mod cli;
pub mod config_file;
pub mod doctor;
pub mod gpu;
pub mod gpu_access;
pub mod hw;
pub mod idle;
pub mod metrics;
pub mod mig;
pub mod runner;

mod admission;
mod config;
mod delivery;
mod execution;
mod gang;
mod handlers;
mod image_serve;
mod images;
pub use images::image_cache_repo;
mod inputs;
mod owner;
mod registry;
mod reporting;
mod shared;
mod state;

pub use config::{NodeConfig, NodeError};

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_blobs::{Store, StoreConfig};
use kiln_net::{Addr, NetConfig};
use kiln_protocol::keys::keyfile;
use kiln_protocol::{CapabilityAdvert, JobId, NetRequest, ProviderId, PublicKey, UnixMillis};
use runner::Runner;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use state::{Jobs, State};

/// How long [`Node::shutdown`] waits, after deliveries gave up, for job
/// tasks to send their last reports.
const WIND_DOWN: Duration = Duration::from_secs(10);
/// How long [`Node::shutdown`] waits for the service tasks once stopped.
const STOP: Duration = Duration::from_secs(10);

/// A running node.
pub struct Node {
    pub provider: ProviderId,
    pub listen_addrs: Vec<Addr>,
    /// Where `/metrics` is served (`NodeConfig::metrics_listen`, bound).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The service tasks: the network event loop, the blob server, the
    /// heartbeat, the owner sampler (when needed) and the request loop. They
    /// end when the token given to [`start`] fires. (Job tasks are tracked
    /// separately; [`Node::shutdown`] waits for both.)
    pub tasks: Vec<JoinHandle<()>>,
    /// The node's job runner, for inspecting what is left on this machine.
    pub runner: Runner,
    state: Arc<State>,
    /// The node's own token, a child of the one [`start`] got: shutdown
    /// stops the node with it without touching the caller's.
    cancel: CancellationToken,
}

/// Starts a node; it runs until `cancel` fires (or [`Node::shutdown`]).
pub async fn start(config: NodeConfig, cancel: CancellationToken) -> Result<Node, NodeError> {
    let cancel = cancel.child_token();
    let state_dir_err = |source| NodeError::StateDir {
        path: config.state_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&config.state_dir).map_err(state_dir_err)?;
    std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(state_dir_err)?;
    // The advert below states these: refuse what the machine does not have
    // before anything is set up. Free disk is measured as the doctor does.
    let free_disk = if config.disk.0 == 0 {
        None
    } else {
        let dir = config.state_dir.clone();
        Some(
            tokio::task::spawn_blocking(move || doctor::available_bytes(&dir))
                .await
                .unwrap_or_else(|e| Err(format!("measuring it failed: {e}"))),
        )
    };
    config::check_capacity(&config, hw::logical_cores(), free_disk)?;
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
            evict: Default::default(),
        },
    )?;
    let mut runner = Runner::new(
        docker,
        config.state_dir.join("jobs"),
        provider.to_string(),
        config.limits.clone(),
        config.policy.clone(),
        store.clone(),
    );
    // Before anything can be offered: whatever a crash left is removed, and
    // its jobs are reported lost at the first registration.
    let lost = match runner.reap_orphans().await {
        Ok(reaped) => reaped,
        Err(e) => {
            tracing::warn!("could not list leftover containers: {e}");
            Vec::new()
        }
    };

    let mut gpus = hw::discover_gpus().unwrap_or_else(|why| {
        tracing::info!("{why}");
        Vec::new()
    });
    if !gpus.is_empty() {
        // How GPUs get into containers here; none: offer no GPUs at all
        // rather than take GPU jobs that cannot run.
        let info = runner.docker().info().await.ok();
        let version = runner
            .docker()
            .version()
            .await
            .ok()
            .and_then(|v| v.version)
            .unwrap_or_default();
        let runtimes: Vec<String> = info
            .as_ref()
            .and_then(|i| i.runtimes.clone())
            .map(|r| r.into_keys().collect())
            .unwrap_or_default();
        let cdi_dirs = info.and_then(|i| i.cdi_spec_dirs).unwrap_or_default();
        let facts = tokio::task::spawn_blocking(move || {
            gpu_access::probe(&runtimes, &version, &cdi_dirs, gpu_access::nvml_minors())
        })
        .await
        .unwrap_or_default();
        match gpu_access::choose(&facts) {
            Ok(path) => {
                tracing::info!("GPUs reach containers through {path}");
                runner.set_gpu_access(path, facts);
            }
            Err(why) => {
                tracing::error!("offering no GPUs: {why}");
                gpus.clear();
            }
        }
    }
    let benchmark = config.startup_benchmark.then(|| {
        let dir = config.state_dir.clone();
        tokio::task::spawn_blocking(move || {
            bench::startup_report(&dir, &gpu::discover(), &hw::cpu_model())
        })
    });
    let cpu = tokio::task::spawn_blocking(|| hw::cpu_info(Duration::from_millis(100)))
        .await
        .unwrap_or_else(|_| hw::cpu_info(Duration::ZERO));

    let (client, events, event_loop) = kiln_net::spawn(
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
        registries: config.policy.registries.clone(),
        benchmark: match benchmark {
            Some(task) => task.await.ok(),
            None => None,
        },
    };
    let shared = shared::SharedSet::open(&config.state_dir.join("shared-cids"));
    let images = Arc::new(images::ImageCache::open(
        &config.state_dir,
        provider.to_string().as_bytes(),
        config.image_cache,
    ));
    let engine_here = kiln_docker::docker_host().starts_with("unix://");
    let image_registry = if config.image_load_archive || !engine_here {
        None
    } else {
        match image_serve::LocalRegistry::start(cancel.child_token()).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("cannot serve images on loopback, loading them as archives: {e}");
                None
            }
        }
    };
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
        shared,
        images,
        image_registry,
        counters: metrics::Counters::default(),
        fetch_grants: Mutex::new(HashMap::new()),
        tasks: TaskTracker::new(),
        give_up: cancel.child_token(),
    });

    let mut tasks = vec![tokio::spawn(event_loop.run())];
    let (client, c) = (state.client.clone(), cancel.clone());
    let serve = kiln_blobs::wire::ServeConfig {
        validate: true,
        authorize: Some(handlers::may_fetch::authorize(&state)),
    };
    tasks.push(tokio::spawn(async move {
        if let Err(e) = kiln_blobs::wire::serve_with(store, client, c, serve).await {
            tracing::error!("cannot serve blobs: {e}");
        }
    }));
    tasks.push(tokio::spawn(reporting::heartbeat(
        state.clone(),
        cancel.clone(),
    )));
    if owner::needed(&state) {
        tasks.push(tokio::spawn(owner::sampler(state.clone(), cancel.clone())));
    }
    tasks.push(tokio::spawn(handlers::serve(
        state.clone(),
        events,
        cancel.clone(),
    )));
    let metrics_addr = match state.config.metrics_listen {
        Some(addr) => Some(
            metrics::serve(state.clone(), addr, cancel.clone())
                .await
                .map_err(|source| NodeError::Metrics { addr, source })?,
        ),
        None => None,
    };
    Ok(Node {
        provider,
        listen_addrs,
        metrics_addr,
        tasks,
        runner: state.runner.clone(),
        state,
        cancel,
    })
}

impl Node {
    /// Stops taking offers, stops running containers and reports their jobs
    /// lost (so the coordinator requeues them), waiting up to `grace` for
    /// every attempt to leave the job table (a finished job's delivery
    /// included). Call before cancelling the root token: the network must
    /// still be up. [`Node::shutdown`] does this and the rest, in order.
    pub async fn drain(&self, grace: Duration) {
        let tokens: Vec<CancellationToken> = match self.state.jobs.lock() {
            Ok(mut j) => {
                j.draining = true;
                j.attempts.values().map(|a| a.cancel.clone()).collect()
            }
            Err(_) => Vec::new(),
        };
        // Advertise zero slots at once, so the scheduler stops offering work here.
        if let Some(advert) = reporting::signed_advert(&self.state) {
            let _ = self
                .state
                .ask_coordinator(NetRequest::Register(advert))
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
                .map(|j| j.attempts.is_empty())
                .unwrap_or(true)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!("some jobs were still stopping when the drain period ended");
    }

    /// Stops the node in order, and returns when it has stopped (or the
    /// bounds below ran out):
    ///
    /// 1. [`drain`](Node::drain) for [`NodeConfig::drain_grace`]: no more
    ///    offers, running attempts stopped and reported lost, finished ones
    ///    left to deliver;
    /// 2. deliveries still retrying give up and report their jobs lost;
    ///    wait (10 s at most) for every job task, gang hold and challenge;
    /// 3. stop the service tasks (request loop, heartbeat, owner sampler,
    ///    blob server, network) and wait for them (10 s at most, then they
    ///    are aborted).
    ///
    /// The network goes last, so every report in steps 1–2 can be sent.
    /// The token given to [`start`] is not touched.
    pub async fn shutdown(self) {
        self.drain(self.state.config.drain_grace).await;

        self.state.give_up.cancel();
        self.state.tasks.close();
        if tokio::time::timeout(WIND_DOWN, self.state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.state.tasks.len(),
                "job tasks still running at shutdown; leaving them (a restart reaps their containers)"
            );
        }

        self.cancel.cancel();
        let deadline = tokio::time::Instant::now() + STOP;
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                tracing::warn!("a service task did not stop in time; aborting it");
                t.abort();
            }
        }
    }

    /// What happened to this node's gang members of `job`, oldest first
    /// (`offer-id: reserved rank 0 of 2`, `…: started`, `…: released: why`).
    pub fn gang_events(&self, job: &JobId) -> Vec<String> {
        self.state
            .jobs
            .lock()
            .map(|j| j.gang.events(job))
            .unwrap_or_default()
    }

    /// Gang reservations held now (waiting for their start).
    pub fn gang_reservations(&self) -> usize {
        self.state
            .jobs
            .lock()
            .map(|j| j.gang.held_count())
            .unwrap_or(0)
    }
}
