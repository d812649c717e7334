//! # kiln-coordinator
//!
//! The coordinator is where buyers meet providers. It
//!
//! * takes signed job submissions over REST ([`api`]), verifies them, locks
//!   the job's maximum cost in escrow ([`bank`], over `kiln-contracts`), and
//!   stores the job ([`db`]);
//! * keeps a registry of providers from their signed adverts, refreshed by
//!   each heartbeat;
//! * places queued jobs with the pure matcher ([`sched`]) and dispatches
//!   signed offers over libp2p request-response; a job that fits nowhere
//!   waits, and its status says why;
//! * holds inputs, outputs and logs by CID in a verified blob store and
//!   serves them over `/kiln/blobs/1` to the providers and buyers entitled
//!   to them ([`blobs`]);
//! * accepts a result only after [`verify`] has checked the receipt's
//!   signature, signer, job and offer binding and manifest, and every blob
//!   it names has been received and verified (small ones inline, the rest
//!   fetched from the provider); then records it and settles payment in one
//!   transaction.
//!
//! `create_app` builds the HTTP router; [`start`] wires everything together
//! and returns a handle; `main.rs` is a thin shell around it.

pub mod api;
pub mod audit;
pub mod bank;
pub mod bench;
pub mod blob_api;
pub mod blobs;
pub mod challenge;
pub mod db;
pub mod gang;
pub mod live;
pub mod sched;
pub mod service;
pub mod stake;
pub mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_net::{Addr, NetConfig};
use kiln_protocol::keys::keyfile;
use kiln_protocol::{Credits, Keypair, ProviderId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use api::create_app;

/// How a coordinator is set up.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Database, blob store and identity key live here.
    pub state_dir: PathBuf,
    pub http_listen: SocketAddr,
    pub p2p_listen: Addr,
    /// Credits given once to each new buyer (devnet); `None` in production.
    pub faucet: Option<Credits>,
    /// Marketplace fee in basis points of each payment.
    pub fee_bps: u16,
    /// A provider not heard from for this long is not offered work.
    pub provider_lease: Duration,
    /// How often the queue is re-examined even without a trigger.
    pub schedule_interval: Duration,
    /// How long a dispatched offer stays valid.
    pub offer_ttl: Duration,
    /// Dispatch attempts before a job fails.
    pub max_attempts: u32,
    /// Capability challenges (random-time benchmark audits).
    pub audit: audit::AuditConfig,
    /// Providers need at least this stake bond to be offered work.
    pub min_stake: Credits,
    /// Most bytes the blob store may hold (`None`: no limit). Blobs still
    /// needed by a job in flight are never evicted.
    pub blob_quota: Option<u64>,
}

impl CoordinatorConfig {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8730)),
            p2p_listen: "/ip4/127.0.0.1/tcp/0"
                .parse()
                .unwrap_or_else(|_| Addr::empty()),
            faucet: None,
            fee_bps: 100,
            provider_lease: Duration::from_secs(20),
            schedule_interval: Duration::from_secs(1),
            offer_ttl: Duration::from_secs(30),
            max_attempts: 5,
            audit: audit::AuditConfig::default(),
            min_stake: Credits(0),
            blob_quota: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Key(#[from] keyfile::KeyFileError),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Bank(#[from] bank::BankError),
    #[error(transparent)]
    Blobs(#[from] kiln_blobs::StoreError),
    #[error(transparent)]
    Net(#[from] kiln_net::NetError),
    #[error(
        "cannot listen for HTTP on {addr}: {source}; is another coordinator running? pick another port"
    )]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
}

/// Shared state of a running coordinator.
pub struct Inner {
    pub config: CoordinatorConfig,
    pub key: Keypair,
    pub peer: ProviderId,
    pub db: db::Db,
    pub bank: bank::Bank,
    /// Inputs, outputs and logs, by CID.
    pub blobs: kiln_blobs::Store,
    /// Who holds what, and recent access decisions.
    pub data: blobs::DataPlane,
    pub net: kiln_net::Client,
    /// Wakes the scheduler (new job, new provider, finished job).
    pub wake: tokio::sync::Notify,
    /// The scheduler's fleet, kept between rounds (see [`live`]).
    pub live: std::sync::Mutex<live::LiveFleet>,
}

pub type AppState = Arc<Inner>;

/// A running coordinator.
pub struct Coordinator {
    pub http_addr: SocketAddr,
    pub p2p_addrs: Vec<Addr>,
    pub state: AppState,
    pub tasks: Vec<JoinHandle<()>>,
}

impl Coordinator {
    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr)
    }
}

/// Opens the state, starts libp2p, the scheduler and the HTTP server. Runs
/// until `cancel` fires; the returned tasks finish after it does.
pub async fn start(
    config: CoordinatorConfig,
    cancel: CancellationToken,
) -> Result<Coordinator, StartError> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| StartError::StateDir {
        path: config.state_dir.display().to_string(),
        source,
    })?;
    let key = keyfile::load_or_create(&config.state_dir.join("coordinator.key"))?;
    let db = db::Db::open_sqlite(&config.state_dir.join("kiln.db")).await?;
    let bank = bank::Bank::load(&db, &key, config.fee_bps).await?;
    let blobs = kiln_blobs::Store::open_dir(
        &config.state_dir.join("blobs"),
        kiln_blobs::StoreConfig {
            quota: config.blob_quota,
            no_sync: false,
        },
    )?;
    let (net, events, event_loop) = kiln_net::spawn(
        key.to_libp2p(),
        NetConfig {
            listen: vec![config.p2p_listen.clone()],
            ..NetConfig::default()
        },
        cancel.clone(),
    )
    .await?;
    let p2p_addrs = net.listen_addrs().to_vec();
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| StartError::Http {
            addr: config.http_listen,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| StartError::Http {
        addr: config.http_listen,
        source,
    })?;
    let state = Arc::new(Inner {
        peer: ProviderId::from_public_key(&key.public()),
        config,
        key,
        db,
        bank,
        blobs,
        data: blobs::DataPlane::new(),
        net,
        wake: tokio::sync::Notify::new(),
        live: std::sync::Mutex::new(live::LiveFleet::new()),
    });
    tracing::info!(http = %http_addr, p2p = ?p2p_addrs, "coordinator up");

    let mut tasks = vec![tokio::spawn(event_loop.run())];
    tasks.push(tokio::spawn(service::handle_network(
        state.clone(),
        events,
        cancel.clone(),
    )));
    tasks.push(tokio::spawn(blobs::serve(state.clone(), cancel.clone())));
    tasks.push(tokio::spawn(service::schedule_loop(
        state.clone(),
        cancel.clone(),
    )));
    let app = create_app(state.clone());
    let c = cancel.clone();
    tasks.push(tokio::spawn(async move {
        let serve =
            axum::serve(listener, app).with_graceful_shutdown(async move { c.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!("HTTP server stopped: {e}");
        }
    }));
    Ok(Coordinator {
        http_addr,
        p2p_addrs,
        state,
        tasks,
    })
}
