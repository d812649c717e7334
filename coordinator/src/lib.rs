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
//! * re-executes a sample of accepted results on another provider before
//!   it pays for them, slashes whoever the majority contradicts, and keeps
//!   each provider's verified track record ([`verification`],
//!   [`lifecycle::reexec`]);
//! * challenges providers' advertised performance at random times
//!   ([`audit`]) and keeps their reputation.
//!
//! Every job, whatever its size, follows one model ([`jobs`]: a job has
//! member executions; states, transitions, billing and storage in one
//! place), driven by [`lifecycle`] and the per-message [`handlers`].
//!
//! `create_app` builds the HTTP router; [`start`] wires everything together
//! and returns a handle whose [`Coordinator::shutdown`] stops it in order;
//! `main.rs` is a thin shell around it.
//!
//! Layers, each using only those below it (no module imports one that
//! imports it back): `db`, `verify`, `challenge`, `sched` (pure) → `bank`,
//! `jobs` → `live` → `blobs` → `lifecycle` → `handlers`, `schedule`,
//! `audit`, `views` → `listing`, `throttle` → `auth` → `blob_api` → `api`.

pub mod api;
pub mod audit;
pub mod auth;
pub mod bank;
pub mod bench;
pub mod blob_api;
pub mod blobs;
pub mod challenge;
pub mod db;
pub mod handlers;
pub mod jobs;
pub mod join;
pub mod lifecycle;
pub mod listing;
pub mod live;
pub mod metrics;
pub mod operator;
pub mod sched;
pub mod schedule;
pub mod throttle;
pub mod verification;
pub mod verify;
pub mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_net::{Addr, NetConfig};
use kiln_protocol::keys::keyfile;
use kiln_protocol::{Credits, Keypair, ProviderId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use api::create_app;

/// How a coordinator is set up.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Database (unless [`Self::database`] names one), blob store and
    /// identity key live here.
    pub state_dir: PathBuf,
    /// The database: `None` for the embedded SQLite file `kiln.db` in the
    /// state directory, or a PostgreSQL URL (see [`db`]).
    pub database: Option<db::DbLocation>,
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
    /// Most bytes the blob store may hold (`None`: no limit). Nothing is
    /// ever evicted to make room (the store holds buyers' only copies): an
    /// upload or result that does not fit is refused.
    pub blob_quota: Option<u64>,
    /// Most bytes one buyer may hold (its uploads and its jobs' outputs,
    /// each counted once); an upload past it is refused (HTTP 507) until
    /// the buyer deletes something. Outputs of its jobs always land.
    pub blob_quota_per_buyer: Option<u64>,
    /// How long after its timeout a started member may take to stop,
    /// collect its outputs and deliver its receipt before the coordinator
    /// gives up on it (it is then paid only what its usage reports earned).
    pub result_grace: Duration,
    /// Usage reports closer together than this are refused (payments are
    /// cumulative, so the next report catches up).
    pub min_usage_interval: Duration,
    /// Verification of results by spot re-execution.
    pub verification: verification::VerificationConfig,
    /// Least escrow a job must lock (`max_price_per_hour × gang × timeout`)
    /// to be queued: a place in the queue is held by money, so a job that
    /// asks to pay nothing is refused.
    pub min_job_escrow: Credits,
    /// Most jobs one buyer may have queued (not yet placed); more are
    /// refused (HTTP 429) until some are placed or cancelled.
    pub max_queued_per_buyer: u32,
    /// Request rates and concurrency of the HTTP API (see [`throttle`]).
    pub api_limits: throttle::ApiLimits,
    /// Keys that may record deposits and payouts ([`operator`]), besides
    /// `operator.key` in the state directory, which [`start`] creates on
    /// first use and always trusts.
    pub operators: Vec<kiln_protocol::PublicKey>,
}

impl CoordinatorConfig {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            database: None,
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
            blob_quota_per_buyer: Some(10 << 30),
            result_grace: Duration::from_secs(120),
            min_usage_interval: Duration::from_secs(5),
            verification: verification::VerificationConfig::default(),
            min_job_escrow: Credits(10_000),
            max_queued_per_buyer: 100,
            api_limits: throttle::ApiLimits::default(),
            operators: Vec::new(),
        }
    }

    /// The operator key file [`start`] creates (mode 0600) in the state
    /// directory.
    pub fn operator_key_path(&self) -> PathBuf {
        self.state_dir.join("operator.key")
    }

    /// Where the database is: [`Self::database`], or `kiln.db` in the
    /// state directory.
    pub fn database_location(&self) -> db::DbLocation {
        self.database
            .clone()
            .unwrap_or_else(|| db::DbLocation::Sqlite(self.state_dir.join("kiln.db")))
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
    #[error(
        "a faucet gives credits to every new key, so it runs only on a development coordinator listening on loopback; \
         {what} is {addr}: listen on 127.0.0.1 (or ::1), or drop the faucet"
    )]
    FaucetExposed { what: &'static str, addr: String },
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
    /// Every task spawned on behalf of a request or a job (answers to
    /// providers, dispatches, notices to nodes, audits): shutdown waits
    /// for them before it stops the network and closes the database.
    pub tasks: TaskTracker,
    /// Fires when shutdown begins: tasks that talk to nodes stop waiting
    /// for them (what they leave undone is resumed from the database at
    /// the next start, see [`lifecycle::recover`]).
    pub stopping: CancellationToken,
    /// One verification step at a time (see [`lifecycle::reexec`]).
    pub reexec: tokio::sync::Mutex<()>,
    /// API latency, for `GET /metrics` (see [`metrics`]).
    pub http_metrics: metrics::HttpMetrics,
}

pub type AppState = Arc<Inner>;

/// A running coordinator.
pub struct Coordinator {
    pub http_addr: SocketAddr,
    pub p2p_addrs: Vec<Addr>,
    pub state: AppState,
    /// One task that runs the coordinator until its token is cancelled,
    /// then shuts it down in order (see [`Coordinator::shutdown`]).
    pub tasks: Vec<JoinHandle<()>>,
    cancel: CancellationToken,
}

/// How long shutdown waits for in-flight requests and dispatches.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl Coordinator {
    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Stops the coordinator in order: no new HTTP requests, scheduling
    /// rounds or audits; then in-flight work (answers to providers,
    /// dispatches, notices) finishes, up to [`SHUTDOWN_GRACE`]; then the
    /// network stops and the database closes. Returns when all is done.
    /// Cancelling the token given to [`start`] does the same.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

/// Opens the state, starts libp2p, the scheduler and the HTTP server. Runs
/// until `cancel` fires; the returned tasks finish after it does.
/// A faucet pays every fresh key: it must be impossible to run one where
/// strangers can reach it, so it needs every listener on loopback.
fn check_faucet(config: &CoordinatorConfig) -> Result<(), StartError> {
    if config.faucet.is_none() {
        return Ok(());
    }
    if !config.http_listen.ip().is_loopback() {
        return Err(StartError::FaucetExposed {
            what: "the HTTP address",
            addr: config.http_listen.to_string(),
        });
    }
    let loopback = config.p2p_listen.iter().any(|p| match p {
        kiln_net::multiaddr::Protocol::Ip4(ip) => ip.is_loopback(),
        kiln_net::multiaddr::Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    });
    if !loopback {
        return Err(StartError::FaucetExposed {
            what: "the p2p address",
            addr: config.p2p_listen.to_string(),
        });
    }
    Ok(())
}

pub async fn start(
    config: CoordinatorConfig,
    cancel: CancellationToken,
) -> Result<Coordinator, StartError> {
    check_faucet(&config)?;
    std::fs::create_dir_all(&config.state_dir).map_err(|source| StartError::StateDir {
        path: config.state_dir.display().to_string(),
        source,
    })?;
    let key = keyfile::load_or_create(&config.state_dir.join("coordinator.key"))?;
    let mut config = config;
    let operator = keyfile::load_or_create(&config.operator_key_path())?;
    if !config.operators.contains(&operator.public()) {
        config.operators.push(operator.public());
    }
    tracing::info!(key = %config.operator_key_path().display(), "operator key (records deposits and payouts: `kiln --key <it> operator …`)");
    let location = config.database_location();
    let db = db::Db::open(&location).await?;
    tracing::info!(database = %location.display(), backend = db.backend.as_str(), "database open");
    let bank = bank::Bank::load(&db, &key, config.fee_bps).await?;
    let blobs = kiln_blobs::Store::open_dir(
        &config.state_dir.join("blobs"),
        kiln_blobs::StoreConfig {
            quota: config.blob_quota,
            no_sync: false,
            evict: kiln_blobs::Eviction::Never,
        },
    )?;
    // The network outlives the services above it: it is stopped last.
    let net_cancel = CancellationToken::new();
    let (net, events, event_loop) = kiln_net::spawn(
        key.to_libp2p(),
        NetConfig {
            listen: vec![config.p2p_listen.clone()],
            ..NetConfig::default()
        },
        net_cancel.clone(),
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
        tasks: TaskTracker::new(),
        stopping: cancel.clone(),
        reexec: tokio::sync::Mutex::new(()),
        http_metrics: metrics::HttpMetrics::default(),
    });
    tracing::info!(http = %http_addr, p2p = ?p2p_addrs, "coordinator up");

    let event_loop = tokio::spawn(event_loop.run());
    // Services: each stops taking new work when `cancel` fires.
    let services = vec![
        tokio::spawn(handlers::handle_network(
            state.clone(),
            events,
            cancel.clone(),
        )),
        tokio::spawn(blobs::serve(state.clone(), cancel.clone())),
        tokio::spawn(schedule::schedule_loop(state.clone(), cancel.clone())),
        tokio::spawn(audit::audit_loop(state.clone(), cancel.clone())),
        tokio::spawn({
            let app = create_app(state.clone());
            let c = cancel.clone();
            async move {
                // The peer address, for the per-address limits.
                let app = app.into_make_service_with_connect_info::<SocketAddr>();
                let serve = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { c.cancelled().await });
                if let Err(e) = serve.await {
                    tracing::error!("HTTP server stopped: {e}");
                }
            }
        }),
    ];
    let s = state.clone();
    let c = cancel.clone();
    let tasks = vec![tokio::spawn(async move {
        c.cancelled().await;
        shut_down(s, services, net_cancel, event_loop).await;
    })];
    Ok(Coordinator {
        http_addr,
        p2p_addrs,
        state,
        tasks,
        cancel,
    })
}

/// The ordered shutdown (see [`Coordinator::shutdown`]).
async fn shut_down(
    state: AppState,
    services: Vec<JoinHandle<()>>,
    net_cancel: CancellationToken,
    event_loop: JoinHandle<()>,
) {
    for t in services {
        let _ = t.await;
    }
    state.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = state.tasks.len(),
            "shutting down with work still in flight; it resumes from the database at the next start"
        );
    }
    net_cancel.cancel();
    let _ = event_loop.await;
    state.db.pool.close().await;
    tracing::info!("coordinator stopped");
}
