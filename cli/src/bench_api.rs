//! `kiln bench api`: the coordinator's HTTP API under a hostile flood, on
//! loopback, in one process.
//!
//! A real coordinator (default request limits, SQLite in a temp dir, a
//! faucet, no providers) serves honest buyers, each with one job that
//! stays queued. Three measurements:
//!
//! 1. *unloaded*: the buyers make signed `GET /v1/jobs/{id}` at a steady
//!    rate; their latency (p50, p99) and requests/s;
//! 2. *loaded*: the same, while a hostile client floods the unauthenticated
//!    routes (`/v1/offers`, `/v1/providers`, `/v1/ledger`, a statement,
//!    `/v1/info`) from as many connections as it likes; also its requests/s
//!    and what it was answered (how many 429);
//! 3. *bare*: a trivial axum route returning a small JSON (same server
//!    runtime, same `axum::serve` settings) against the coordinator's
//!    cheapest comparable route, `GET /v1/info`, each driven closed-loop by
//!    the same client at the honest load's concurrency, on a second
//!    coordinator whose limits are set too high to refuse (so the limiter
//!    still runs but a closed loop from one address is not refused). Signed
//!    `GET /v1/jobs/{id}` there is reported too.
//!
//! The server, the honest buyers and the hostile client each run on a
//! runtime of their own (threads), so a busy client does not delay the
//! others' futures; they still share the machine's cores. Each comparison
//! (unloaded against loaded, bare against coordinator) runs in
//! alternating slices, so whatever else the machine does weighs on both
//! sides alike. Everything is bounded: each phase stops after its request
//! count or `--seconds` (the flood too, and at most 1,000 hostile
//! requests per honest one).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::future::join_all;
use kiln_coordinator::CoordinatorConfig;
use kiln_coordinator::throttle::{ApiLimits, Rate};
use kiln_protocol::{BuyerId, ByteSize, Credits, JobId, JobSpec, Keypair, MilliCpu, Seconds};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::Client;
use crate::bench::Machine;

/// What `kiln bench api` runs.
#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// Honest requests per latency phase (all buyers together).
    pub requests: usize,
    /// Longest any one phase runs.
    pub seconds: u64,
    /// Honest buyers, each with its own key and job: the honest concurrency.
    pub buyers: usize,
    /// Requests per second each honest buyer makes.
    pub rate: u32,
    /// Connections the hostile client floods from.
    pub hostile: usize,
    /// Where the servers listen; loopback only.
    pub host: IpAddr,
    /// Directory for the JSON report.
    pub out: PathBuf,
}

/// `kiln bench api`'s flags (the defaults finish in under a minute).
#[derive(Clone, Debug, clap::Args)]
pub struct ApiArgs {
    /// Honest requests in each latency phase, all buyers together.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Longest each phase runs, in seconds (the closed loops run half).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Honest buyers (each its own key and job): the honest concurrency.
    #[arg(long, default_value_t = 4)]
    pub buyers: usize,
    /// Requests per second each honest buyer makes.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Connections the hostile client floods from.
    #[arg(long, default_value_t = 64)]
    pub hostile: usize,
    /// Address the servers listen on: loopback only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Directory for the JSON report.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
}

impl From<ApiArgs> for ApiOptions {
    fn from(a: ApiArgs) -> Self {
        Self {
            requests: a.requests,
            seconds: a.seconds,
            buyers: a.buyers,
            rate: a.rate,
            hostile: a.hostile,
            host: a.host,
            out: a.out,
        }
    }
}

/// The lines `kiln bench api` prints.
pub fn summary(r: &ApiReport, out: &Path) -> String {
    format!(
        "honest GET /v1/jobs/{{id}}: unloaded p50 {:.2} ms p99 {:.2} ms at {:.0} req/s; under the flood p50 {:.2} ms p99 {:.2} ms at {:.0} req/s (p99 ratio {:.2}×)\n\
         hostile: {:.0} req/s from {} connections, {} of {} answered 429\n\
         throughput at concurrency {}: bare axum {:.0} req/s, coordinator /v1/info {:.0} req/s (ratio {:.2}), signed GET job {:.0} req/s\n\
         loaded p99 <= 2x unloaded: {}\n\
         coordinator/bare >= 0.8: {}\n\
         every honest request served: {}\n\
         (report in {})",
        r.unloaded.p50_ms,
        r.unloaded.p99_ms,
        r.unloaded.req_per_s,
        r.loaded.p50_ms,
        r.loaded.p99_ms,
        r.loaded.req_per_s,
        r.p99_ratio,
        r.hostile.req_per_s,
        r.hostile.connections,
        r.hostile.throttled_429,
        r.hostile.requests,
        r.honest_buyers,
        r.bare_axum.req_per_s,
        r.coordinator_info.req_per_s,
        r.bare_ratio,
        r.coordinator_job.req_per_s,
        r.checks.loaded_p99_within_2x,
        r.checks.bare_ratio_at_least_0_8,
        r.checks.honest_all_served,
        out.display()
    )
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            requests: 2000,
            seconds: 10,
            buyers: 4,
            rate: 50,
            hostile: 64,
            host: IpAddr::from([127, 0, 0, 1]),
            out: PathBuf::from("target/bench"),
        }
    }
}

/// Latency and rate of one stream of requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub requests: usize,
    pub seconds: f64,
    pub req_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Answers other than success, by HTTP status (0: no answer).
    pub failed: BTreeMap<u16, u64>,
}

/// What the hostile client sent and was answered.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Hostile {
    pub connections: usize,
    pub routes: Vec<String>,
    pub requests: u64,
    pub seconds: f64,
    pub req_per_s: f64,
    /// Answers by HTTP status (0: no answer).
    pub statuses: BTreeMap<u16, u64>,
    pub throttled_429: u64,
}

/// The API's limits as the loaded coordinator ran them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LimitsView {
    pub public_per_address_per_s: Option<u32>,
    pub public_burst: Option<u32>,
    pub public_in_flight: Option<usize>,
    pub buyer_per_s: Option<u32>,
    pub buyer_burst: Option<u32>,
    /// How long a refusal is held before its 429 is sent, at most.
    pub refusal_delay_s: Option<f64>,
}

/// The acceptance checks of issue 13 (acceptance 2).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Checks {
    /// Loaded honest p99 at most twice the unloaded one.
    pub loaded_p99_within_2x: bool,
    /// The coordinator's `/v1/info` at least 0.8 of a bare axum route's
    /// throughput.
    pub bare_ratio_at_least_0_8: bool,
    /// No honest request failed (none throttled).
    pub honest_all_served: bool,
}

/// `kiln bench api`'s report (also `api.json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ApiReport {
    pub benchmark: &'static str,
    pub command: String,
    pub machine: Machine,
    pub honest_buyers: usize,
    pub honest_rate_per_buyer: u32,
    pub limits: LimitsView,
    pub unloaded: Latency,
    pub loaded: Latency,
    pub hostile: Hostile,
    /// `loaded.p99_ms / unloaded.p99_ms`.
    pub p99_ratio: f64,
    /// Closed loop at the honest concurrency: a bare axum route.
    pub bare_axum: Latency,
    /// The same client against the coordinator's `GET /v1/info`.
    pub coordinator_info: Latency,
    /// And against its signed `GET /v1/jobs/{id}`.
    pub coordinator_job: Latency,
    /// `coordinator_info.req_per_s / bare_axum.req_per_s`.
    pub bare_ratio: f64,
    pub checks: Checks,
}

/// Runs the benchmark (on threads of its own) and writes `api.json` and
/// `api.md` under `opts.out`.
pub async fn api(opts: ApiOptions) -> anyhow::Result<ApiReport> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kiln-bench-api".into())
        .spawn(move || {
            let _ = tx.send(run(&opts));
        })
        .context("starting the benchmark thread")?;
    rx.await.context("the benchmark thread stopped")?
}

/// Slices each comparison is cut into, alternating its two sides.
const ROUNDS: usize = 4;

/// How long the flood runs before the honest buyers' loaded slice starts.
const FLOOD_RAMP: Duration = Duration::from_millis(300);

fn runtime(name: &str, workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("building the {name} runtime"))
}

/// The servers: a coordinator with its default limits, one whose limits
/// never refuse, and the bare route.
struct Servers {
    loaded: kiln_coordinator::Coordinator,
    open: kiln_coordinator::Coordinator,
    bare: SocketAddr,
    cancel: CancellationToken,
    _dirs: [tempfile::TempDir; 2],
}

fn coordinator_config(dir: &Path, host: IpAddr, limits: ApiLimits) -> CoordinatorConfig {
    let mut cc = CoordinatorConfig::new(dir.to_path_buf());
    cc.http_listen = SocketAddr::new(host, 0);
    cc.p2p_listen = match host {
        IpAddr::V4(ip) => format!("/ip4/{ip}/tcp/0"),
        IpAddr::V6(ip) => format!("/ip6/{ip}/tcp/0"),
    }
    .parse()
    .unwrap_or(cc.p2p_listen);
    cc.faucet = Some(Credits(1_000_000_000));
    cc.min_job_escrow = Credits(1);
    cc.audit.mean_interval = None;
    cc.verification.enabled = false;
    cc.api_limits = limits;
    cc
}

/// Limits too high for the closed loops to reach: the limiter runs, and
/// refuses nothing.
fn never_refusing() -> ApiLimits {
    let huge = Rate {
        per_second: u32::MAX / 2,
        burst: u32::MAX / 2,
    };
    ApiLimits {
        public_rate: Some(huge),
        public_in_flight: Some(1 << 20),
        buyer_rate: Some(huge),
        ..ApiLimits::default()
    }
}

async fn start_servers(host: IpAddr) -> anyhow::Result<Servers> {
    let cancel = CancellationToken::new();
    let dirs = [
        tempfile::Builder::new()
            .prefix("kiln-bench-api-")
            .tempdir()?,
        tempfile::Builder::new()
            .prefix("kiln-bench-api-")
            .tempdir()?,
    ];
    let loaded = kiln_coordinator::start(
        coordinator_config(dirs[0].path(), host, ApiLimits::default()),
        cancel.child_token(),
    )
    .await?;
    let open = kiln_coordinator::start(
        coordinator_config(dirs[1].path(), host, never_refusing()),
        cancel.child_token(),
    )
    .await?;
    // The bare route, served as the coordinator serves its router: a
    // small JSON body made once (as the coordinator's `/v1/info` is), so
    // the comparison is of everything around the body.
    let app = axum::Router::new().route(
        "/v1/info",
        axum::routing::get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                axum::body::Bytes::from_static(br#"{"ok":true}"#),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(host, 0)).await?;
    let bare = listener.local_addr()?;
    let c = cancel.clone();
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { c.cancelled().await })
            .await;
    });
    Ok(Servers {
        loaded,
        open,
        bare,
        cancel,
        _dirs: dirs,
    })
}

/// A job nothing can run here (there are no providers): it stays queued.
fn queued_spec() -> JobSpec {
    let mut s = JobSpec::new(
        format!("sha256:{}", "ab".repeat(32)),
        vec!["echo".into(), "bench".into()],
    );
    s.resources.cpus = MilliCpu(500);
    s.resources.memory = ByteSize(64 << 20);
    s.resources.timeout = Seconds(60);
    s
}

/// Buyers (new keys, funded by the faucet), each with one queued job.
async fn new_buyers(
    coordinator: &kiln_coordinator::Coordinator,
    n: usize,
) -> anyhow::Result<Vec<(Client, JobId)>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let c = Client::new(&coordinator.url(), Keypair::generate())
            .with_coordinator_id(coordinator.state.peer);
        let job = c.submit(queued_spec(), Some("bench".into())).await?.job_id;
        c.job(&job).await?;
        out.push((c, job));
    }
    Ok(out)
}

/// The `p` quantile (0..=1) of ascending `sorted` samples (0 for none).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Raw timings of one or more slices of a run.
#[derive(Default)]
struct Samples {
    ms: Vec<f64>,
    failed: BTreeMap<u16, u64>,
    elapsed: Duration,
}

impl Samples {
    fn add(&mut self, other: Samples) {
        self.ms.extend(other.ms);
        for (s, n) in other.failed {
            *self.failed.entry(s).or_default() += n;
        }
        self.elapsed += other.elapsed;
    }

    fn latency(self) -> Latency {
        latency(self.ms, self.failed, self.elapsed)
    }
}

fn latency(mut ms: Vec<f64>, failed: BTreeMap<u16, u64>, elapsed: Duration) -> Latency {
    ms.sort_by(f64::total_cmp);
    let secs = elapsed.as_secs_f64().max(1e-9);
    Latency {
        requests: ms.len(),
        seconds: secs,
        req_per_s: ms.len() as f64 / secs,
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
        failed,
    }
}

impl Hostile {
    fn add(&mut self, other: Hostile) {
        self.connections = other.connections;
        self.routes = other.routes;
        self.requests += other.requests;
        self.seconds += other.seconds;
        self.req_per_s = self.requests as f64 / self.seconds.max(1e-9);
        for (k, n) in other.statuses {
            *self.statuses.entry(k).or_default() += n;
        }
        self.throttled_429 = self.statuses.get(&429).copied().unwrap_or(0);
    }
}

fn status_of(e: &crate::ClientError) -> u16 {
    match e {
        crate::ClientError::Api { status, .. } => *status,
        _ => 0,
    }
}

/// Each buyer asks for its job at `rate` per second (a request that comes
/// due while the previous one is out is sent as soon as it returns), until
/// `total` requests in all or `limit` passed.
async fn honest(buyers: &[(Client, JobId)], total: usize, rate: u32, limit: Duration) -> Samples {
    let per = total.div_ceil(buyers.len().max(1));
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let t0 = tokio::time::Instant::now();
    let deadline = t0 + limit;
    let runs = buyers
        .iter()
        .enumerate()
        .map(|(b, (client, job))| async move {
            let mut ms = Vec::with_capacity(per);
            let mut failed: BTreeMap<u16, u64> = BTreeMap::new();
            // Staggered, so the buyers do not all send at the same instant.
            let offset = interval.mul_f64(b as f64 / buyers.len().max(1) as f64);
            for k in 0..per {
                let due = t0 + offset + interval * u32::try_from(k).unwrap_or(u32::MAX);
                if due >= deadline {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let sent = Instant::now();
                match client.job(job).await {
                    Ok(_) => ms.push(sent.elapsed().as_secs_f64() * 1e3),
                    Err(e) => *failed.entry(status_of(&e)).or_default() += 1,
                }
            }
            (ms, failed)
        });
    let results = join_all(runs).await;
    let mut all = Samples {
        elapsed: t0.elapsed(),
        ..Samples::default()
    };
    for (ms, failed) in results {
        all.add(Samples {
            ms,
            failed,
            elapsed: Duration::ZERO,
        });
    }
    all
}

/// The flood: `connections` loops over `routes`, each request right after
/// the last, until `stop` or `max` requests in all.
async fn flood(
    base: String,
    routes: Vec<String>,
    connections: usize,
    max: u64,
    stop: CancellationToken,
) -> Hostile {
    let http = reqwest::Client::new();
    let sent = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let loops = (0..connections).map(|c| {
        let (http, base, routes, sent, stop) = (
            http.clone(),
            base.clone(),
            routes.clone(),
            sent.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
            let mut i = c;
            while !stop.is_cancelled() && sent.fetch_add(1, Ordering::Relaxed) < max {
                let url = format!("{base}{}", routes[i % routes.len()]);
                i += 1;
                let status = tokio::select! {
                    () = stop.cancelled() => break,
                    r = http.get(url).send() => match r {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 0,
                    },
                };
                *statuses.entry(status).or_default() += 1;
            }
            statuses
        })
    });
    let done = join_all(loops).await;
    let seconds = t0.elapsed().as_secs_f64().max(1e-9);
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for s in done.into_iter().flatten() {
        for (k, n) in s {
            *statuses.entry(k).or_default() += n;
        }
    }
    let requests = statuses.values().sum();
    Hostile {
        connections,
        throttled_429: statuses.get(&429).copied().unwrap_or(0),
        routes,
        requests,
        seconds,
        req_per_s: requests as f64 / seconds,
        statuses,
    }
}

/// A closed loop of `concurrency` workers, each sending its next request
/// as soon as the last returned, for `warmup` (not counted) and then
/// `limit` or `max` requests in all.
async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    limit: Duration,
    max: usize,
    send: F,
) -> Samples
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), u16>>,
{
    let send = &send;
    let warm_until = Instant::now() + warmup;
    let count = AtomicU64::new(0);
    let count = &count;
    let t0 = std::sync::OnceLock::new();
    let t0 = &t0;
    let workers = (0..concurrency).map(|w| async move {
        let mut ms = Vec::new();
        let mut failed: BTreeMap<u16, u64> = BTreeMap::new();
        while Instant::now() < warm_until {
            let _ = send(w).await;
        }
        let start = *t0.get_or_init(Instant::now);
        while start.elapsed() < limit && count.fetch_add(1, Ordering::Relaxed) < max as u64 {
            let sent = Instant::now();
            match send(w).await {
                Ok(()) => ms.push(sent.elapsed().as_secs_f64() * 1e3),
                Err(s) => *failed.entry(s).or_default() += 1,
            }
        }
        (ms, failed)
    });
    let results = join_all(workers).await;
    let mut all = Samples {
        elapsed: t0.get().map(Instant::elapsed).unwrap_or_default(),
        ..Samples::default()
    };
    for (ms, failed) in results {
        all.add(Samples {
            ms,
            failed,
            elapsed: Duration::ZERO,
        });
    }
    all
}

/// One unauthenticated GET, its body read.
async fn plain_get(http: &reqwest::Client, url: &str) -> Result<(), u16> {
    let r = http.get(url).send().await.map_err(|_| 0u16)?;
    let s = r.status();
    r.bytes().await.map_err(|_| 0u16)?;
    if s.is_success() {
        Ok(())
    } else {
        Err(s.as_u16())
    }
}

fn run(opts: &ApiOptions) -> anyhow::Result<ApiReport> {
    if !opts.host.is_loopback() {
        bail!(
            "kiln bench api floods the API it measures: it runs on loopback only, and {} is not a loopback address (use 127.0.0.1 or ::1)",
            opts.host
        );
    }
    if opts.buyers == 0 || opts.requests == 0 || opts.seconds == 0 {
        bail!("--buyers, --requests and --seconds must be positive");
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let server_rt = runtime("kiln-bench-server", cpus)?;
    let honest_rt = runtime("kiln-bench-honest", 1)?;
    let hostile_rt = runtime("kiln-bench-hostile", 1)?;
    let servers = server_rt.block_on(start_servers(opts.host))?;
    let result = measure(opts, &servers, &honest_rt, &hostile_rt);
    let Servers {
        loaded,
        open,
        cancel,
        _dirs,
        ..
    } = servers;
    cancel.cancel();
    server_rt.block_on(async move {
        loaded.shutdown().await;
        open.shutdown().await;
    });
    drop(_dirs);
    let report = result?;
    write(&report, &opts.out)?;
    Ok(report)
}

fn measure(
    opts: &ApiOptions,
    servers: &Servers,
    honest_rt: &tokio::runtime::Runtime,
    hostile_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<ApiReport> {
    let limit = Duration::from_secs(opts.seconds);
    let rounds = ROUNDS;
    let buyers = honest_rt.block_on(new_buyers(&servers.loaded, opts.buyers))?;
    // Warm-up (connections, caches, the database), not counted.
    honest_rt.block_on(honest(
        &buyers,
        opts.buyers * 10,
        opts.rate,
        Duration::from_secs(1),
    ));

    // (a) and (b), in alternating slices, so that whatever else the
    // machine does weighs on both alike. The flood starts before each
    // loaded slice and stops after it.
    let account = format!("buyer:{}", BuyerId::new(buyers[0].0.key().public()));
    let routes = vec![
        "/v1/offers?q=num_gpus>=1&sort=price".to_string(),
        "/v1/providers".to_string(),
        "/v1/ledger?from=0&limit=1000".to_string(),
        format!("/v1/accounts/{account}/statement"),
        "/v1/info".to_string(),
    ];
    let per_slice = opts.requests.div_ceil(rounds);
    let slice = limit / u32::try_from(rounds).unwrap_or(1);
    let max_hostile = (opts.requests as u64).saturating_mul(1000) / rounds as u64;
    let (mut unloaded, mut loaded, mut hostile) =
        (Samples::default(), Samples::default(), Hostile::default());
    for _ in 0..rounds {
        unloaded.add(honest_rt.block_on(honest(&buyers, per_slice, opts.rate, slice)));
        let stop = CancellationToken::new();
        let flooding = hostile_rt.spawn(flood(
            servers.loaded.url(),
            routes.clone(),
            opts.hostile,
            max_hostile,
            stop.clone(),
        ));
        std::thread::sleep(FLOOD_RAMP);
        loaded.add(honest_rt.block_on(honest(&buyers, per_slice, opts.rate, slice)));
        stop.cancel();
        hostile.add(
            hostile_rt
                .block_on(flooding)
                .context("the hostile client stopped")?,
        );
    }
    let (unloaded, loaded) = (unloaded.latency(), loaded.latency());

    // (c) throughput, closed loop at the honest concurrency, the bare
    // route and the coordinator's in alternating slices too.
    let run_for = (limit / 2).max(Duration::from_secs(1));
    let part = run_for / u32::try_from(rounds).unwrap_or(1);
    let max = opts.requests.saturating_mul(50) / rounds;
    let warmup = Duration::from_millis(500);
    let http = reqwest::Client::new();
    let bare_url = format!("http://{}/v1/info", servers.bare);
    let info_url = format!("{}/v1/info", servers.open.url());
    let (mut bare_axum, mut coordinator_info) = (Samples::default(), Samples::default());
    for r in 0..rounds {
        let warm = if r == 0 { warmup } else { Duration::ZERO };
        bare_axum.add(
            honest_rt.block_on(closed_loop(opts.buyers, warm, part, max, |_| {
                plain_get(&http, &bare_url)
            })),
        );
        coordinator_info.add(
            honest_rt.block_on(closed_loop(opts.buyers, warm, part, max, |_| {
                plain_get(&http, &info_url)
            })),
        );
    }
    let (bare_axum, coordinator_info) = (bare_axum.latency(), coordinator_info.latency());
    let open_buyers = honest_rt.block_on(new_buyers(&servers.open, opts.buyers))?;
    let coordinator_job = honest_rt
        .block_on(closed_loop(opts.buyers, warmup, run_for, max, |w| {
            let (client, job) = &open_buyers[w % open_buyers.len()];
            async move { client.job(job).await.map(|_| ()).map_err(|e| status_of(&e)) }
        }))
        .latency();

    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let l = &servers.loaded.state.config.api_limits;
    let p99_ratio = loaded.p99_ms / unloaded.p99_ms.max(1e-9);
    let bare_ratio = coordinator_info.req_per_s / bare_axum.req_per_s.max(1e-9);
    let checks = Checks {
        loaded_p99_within_2x: p99_ratio <= 2.0,
        bare_ratio_at_least_0_8: bare_ratio >= 0.8,
        honest_all_served: unloaded.failed.is_empty() && loaded.failed.is_empty(),
    };
    Ok(ApiReport {
        benchmark: "honest signed GET /v1/jobs/{id} under a flood of unauthenticated requests; coordinator vs bare axum",
        command: format!(
            "kiln bench api --requests {} --seconds {} --buyers {} --rate {} --hostile {} --host {}",
            opts.requests, opts.seconds, opts.buyers, opts.rate, opts.hostile, opts.host
        ),
        machine: Machine { cpus },
        honest_buyers: opts.buyers,
        honest_rate_per_buyer: opts.rate,
        limits: LimitsView {
            public_per_address_per_s: l.public_rate.map(|r| r.per_second),
            public_burst: l.public_rate.map(|r| r.burst),
            public_in_flight: l.public_in_flight,
            buyer_per_s: l.buyer_rate.map(|r| r.per_second),
            buyer_burst: l.buyer_rate.map(|r| r.burst),
            refusal_delay_s: l.refusal_delay.map(|d| d.as_secs_f64()),
        },
        unloaded,
        loaded,
        hostile,
        p99_ratio,
        bare_axum,
        coordinator_info,
        coordinator_job,
        bare_ratio,
        checks,
    })
}

fn write(r: &ApiReport, out: &Path) -> anyhow::Result<()> {
    let row = |name: &str, l: &Latency| {
        format!(
            "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |\n",
            l.requests,
            l.req_per_s,
            l.p50_ms,
            l.p99_ms,
            l.max_ms,
            l.failed.values().sum::<u64>()
        )
    };
    let mut md = format!(
        "# kiln bench api\n\n`{}` on {} CPUs.\n\n{} honest buyers at {}/s each (signed `GET /v1/jobs/{{id}}`); the hostile client floods from {} connections.\n\n",
        r.command, r.machine.cpus, r.honest_buyers, r.honest_rate_per_buyer, r.hostile.connections
    );
    md += "| run | requests | req/s | p50 ms | p99 ms | max ms | failed |\n|---|---|---|---|---|---|---|\n";
    md += &row("honest, unloaded", &r.unloaded);
    md += &row("honest, under the flood", &r.loaded);
    md += &row("bare axum route (closed loop)", &r.bare_axum);
    md += &row(
        "coordinator GET /v1/info (closed loop)",
        &r.coordinator_info,
    );
    md += &row(
        "coordinator signed GET /v1/jobs/{id} (closed loop)",
        &r.coordinator_job,
    );
    md += &format!(
        "\nhostile: {} requests, {:.0}/s, answers {:?} ({} × 429)\n\n",
        r.hostile.requests, r.hostile.req_per_s, r.hostile.statuses, r.hostile.throttled_429
    );
    md += &format!(
        "- loaded p99 / unloaded p99: **{:.2}×** (≤ 2: {})\n- coordinator /v1/info / bare axum throughput: **{:.2}** (≥ 0.8: {})\n- every honest request served: {}\n",
        r.p99_ratio,
        r.checks.loaded_p99_within_2x,
        r.bare_ratio,
        r.checks.bare_ratio_at_least_0_8,
        r.checks.honest_all_served
    );
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("api.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(out.join("api.md"), md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_from_the_sorted_samples() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), xs[50]);
        assert_eq!(percentile(&xs, 0.99), xs[98]);
        assert_eq!(percentile(&[], 0.99), 0.0);
    }

    #[tokio::test]
    async fn it_refuses_a_non_loopback_host() {
        let opts = ApiOptions {
            host: IpAddr::from([192, 0, 2, 1]),
            ..ApiOptions::default()
        };
        let e = api(opts)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("loopback only"), "{e}");
    }
}
