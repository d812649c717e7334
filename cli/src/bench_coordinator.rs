//! `kiln bench coordinator`: jobs through the whole coordinator, on SQLite
//! and on PostgreSQL, against the same database writes done by a plain
//! `sqlx` loop in the same run.
//!
//! The coordinator is the real one (`kiln_coordinator::start`: REST API,
//! scheduler, libp2p, settlement), on a fresh database of each engine.
//! Providers are scripted: real libp2p peers on loopback, each with its own
//! key, that register a signed advert, accept every offer at once and
//! deliver a signed, well-formed result for it (no container runs: what is
//! measured is the coordinator). Buyers submit signed jobs over REST, a few
//! at a time each. Audits and spot re-execution are off (each would add
//! jobs of its own), and the API limiter refuses nothing.
//!
//! Timings come from the coordinator's own job events (`queued`,
//! `dispatched`, `completed`: one transaction each), so each step is what
//! the database recorded. The writes one job needs are counted from the
//! database after the run (rows per job in each table, one transaction per
//! job event); the raw loop then performs that many transactions with those
//! rows, on a fresh database of the same engine with the same schema and
//! the same write lock, one after another, as fast as it can.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use kiln_coordinator::db::{Db, DbLocation};
use kiln_coordinator::throttle::{ApiLimits, Rate};
use kiln_coordinator::{Coordinator, CoordinatorConfig};
use kiln_net::{Addr, NetConfig, NetEvent};
use kiln_protocol::{
    Blob, ByteSize, CapabilityAdvert, ContentId, CpuInfo, Credits, JobOffer, JobResult, JobSpec,
    Keypair, Manifest, MilliCpu, NetRequest, NetResponse, Outcome, ProviderId, ResourceUsage,
    ResultReceipt, Seconds, Signed, UnixMillis,
};
use serde::Serialize;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::Client;
use crate::bench_api::percentile;

/// Runs of the raw loop per database.
pub const RAW_RUNS: usize = 3;

/// `kiln bench coordinator`'s flags.
#[derive(Clone, Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// Scripted providers (each a libp2p peer with its own key).
    #[arg(long, default_value_t = 1000)]
    pub providers: usize,
    /// Jobs submitted on each database.
    #[arg(long, default_value_t = 2000)]
    pub jobs: usize,
    /// Buyers (keys) submitting them.
    #[arg(long, default_value_t = 16)]
    pub buyers: usize,
    /// Submissions in flight at once, all buyers together.
    #[arg(long, default_value_t = 32)]
    pub in_flight: usize,
    /// Databases to run on: `sqlite`, `postgres`, or both.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    pub backends: Vec<String>,
    /// A PostgreSQL server whose account may create databases (a fresh one
    /// is made for each run and dropped after).
    #[arg(
        long,
        env = "KILN_BENCH_POSTGRES",
        default_value = "postgres://kiln:kiln@127.0.0.1:5432/postgres"
    )]
    pub postgres: String,
    /// Directory for the JSON and Markdown report.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
}

/// p50 and p99 of one step, milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Step {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Rows one job writes, on average (counted after the run).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Writes {
    /// One per job event (each state change is one transaction).
    pub transactions: f64,
    pub job_events: f64,
    pub job_rows: f64,
    pub members: f64,
    pub nonces: f64,
    pub ledger_entries: f64,
    /// `ledger_accounts` rows; each also upserts that account's balance.
    pub ledger_accounts: f64,
    /// Mean size of a signed ledger entry, bytes.
    pub ledger_entry_bytes: f64,
}

/// One database's run.
#[derive(Clone, Debug, Serialize)]
pub struct BackendReport {
    pub backend: String,
    pub jobs: usize,
    pub completed: usize,
    /// Every job has exactly one `completed` event and its escrow is closed.
    pub settled_exactly_once: bool,
    /// First submission to last settlement.
    pub wall_s: f64,
    pub submitted_per_s: f64,
    pub settled_per_s: f64,
    /// The HTTP round trip of a submission (client side).
    pub submit: Step,
    pub queued_to_dispatched: Step,
    pub dispatched_to_settled: Step,
    pub queued_to_settled: Step,
    pub writes_per_job: Writes,
    /// The raw loop: jobs' worth of the same writes per second (the
    /// median of [`RAW_RUNS`] runs).
    pub raw_jobs_per_s: f64,
    /// Every run of the raw loop, slowest first.
    pub raw_runs_jobs_per_s: Vec<f64>,
    pub raw_transactions_per_s: f64,
    /// settled_per_s / raw_jobs_per_s.
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CoordinatorReport {
    pub command: String,
    pub cpus: usize,
    pub providers: usize,
    pub buyers: usize,
    pub in_flight: usize,
    pub backends: Vec<BackendReport>,
}

/// Runs the benchmark and writes `coordinator.json` and `coordinator.md`
/// to `args.out`.
pub async fn run(args: CoordinatorArgs) -> anyhow::Result<CoordinatorReport> {
    if args.jobs == 0 || args.providers == 0 || args.buyers == 0 {
        bail!("--jobs, --providers and --buyers must be at least 1");
    }
    let mut backends = Vec::new();
    for b in &args.backends {
        let r = match b.as_str() {
            "sqlite" => {
                let dir = tempfile::tempdir()?;
                let db = DbLocation::Sqlite(dir.path().join("bench.db"));
                let raw = DbLocation::Sqlite(dir.path().join("raw.db"));
                one_backend("sqlite", &args, db, raw).await?
            }
            "postgres" => {
                let pg = Postgres::connect(&args.postgres).await?;
                let db = pg.fresh().await?;
                let raw = pg.fresh().await?;
                let r = one_backend("postgres", &args, db, raw).await;
                pg.drop_all().await;
                r?
            }
            other => bail!("unknown backend `{other}`: use sqlite, postgres or both"),
        };
        backends.push(r);
    }
    let report = CoordinatorReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        providers: args.providers,
        buyers: args.buyers,
        in_flight: args.in_flight,
        backends,
    };
    write(&report, &args.out)?;
    Ok(report)
}

/// The lines `kiln bench coordinator` prints.
pub fn summary(r: &CoordinatorReport, out: &Path) -> String {
    let mut s = String::new();
    for b in &r.backends {
        s += &format!(
            "{}: {} jobs settled at {:.0}/s (p50 queued→settled {:.0} ms, p99 {:.0} ms); raw sqlx loop of the same writes {:.0} jobs/s; ratio {:.2}×{}\n",
            b.backend,
            b.completed,
            b.settled_per_s,
            b.queued_to_settled.p50_ms,
            b.queued_to_settled.p99_ms,
            b.raw_jobs_per_s,
            b.ratio,
            if b.settled_exactly_once {
                ""
            } else {
                " (NOT settled exactly once)"
            }
        );
    }
    s += &format!("report in {}", out.join("coordinator.md").display());
    s
}

async fn one_backend(
    name: &str,
    args: &CoordinatorArgs,
    db: DbLocation,
    raw: DbLocation,
) -> anyhow::Result<BackendReport> {
    let dir = tempfile::tempdir()?;
    let cancel = CancellationToken::new();
    let coordinator = kiln_coordinator::start(config(dir.path(), db, args.jobs), cancel.clone())
        .await
        .context("starting the coordinator")?;
    let addr = coordinator
        .p2p_addrs
        .first()
        .cloned()
        .context("the coordinator has no p2p address")?;
    eprintln!("{name}: starting {} scripted providers", args.providers);
    let peers = cancel.child_token();
    let joined = futures::stream::iter(0..args.providers)
        .map(|_| scripted_provider(addr.clone(), peers.clone()))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    if let Some(e) = joined.into_iter().find_map(Result::err) {
        coordinator.shutdown().await;
        return Err(e.context("a scripted provider could not join"));
    }
    let result = measure(name, args, &coordinator, raw).await;
    peers.cancel();
    coordinator.shutdown().await;
    result
}

fn config(dir: &Path, db: DbLocation, jobs: usize) -> CoordinatorConfig {
    let mut cc = CoordinatorConfig::new(dir.to_path_buf());
    cc.database = Some(db);
    cc.http_listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    cc.p2p_listen = "/ip4/127.0.0.1/tcp/0".parse().unwrap_or(cc.p2p_listen);
    cc.faucet = Some(Credits(1_000_000_000_000));
    cc.min_job_escrow = Credits(1);
    cc.audit.mean_interval = None;
    cc.verification.enabled = false;
    cc.provider_lease = Duration::from_secs(120);
    cc.max_queued_per_buyer = u32::try_from(jobs).unwrap_or(u32::MAX);
    let huge = Rate {
        per_second: u32::MAX / 2,
        burst: u32::MAX / 2,
    };
    cc.api_limits = ApiLimits {
        public_rate: Some(huge),
        public_in_flight: Some(1 << 20),
        buyer_rate: Some(huge),
        ..ApiLimits::default()
    };
    cc
}

fn spec() -> JobSpec {
    let mut s = JobSpec::new(format!("sha256:{}", "be".repeat(32)), vec!["bench".into()]);
    s.resources.cpus = MilliCpu(500);
    s.resources.memory = ByteSize(64 << 20);
    s.resources.timeout = Seconds(60);
    s.resources.max_price_per_hour = Credits(1_000_000);
    s
}

async fn measure(
    name: &str,
    args: &CoordinatorArgs,
    coordinator: &Coordinator,
    raw: DbLocation,
) -> anyhow::Result<BackendReport> {
    let buyers: Vec<Client> = (0..args.buyers)
        .map(|_| {
            Client::new(&coordinator.url(), Keypair::generate())
                .with_coordinator_id(coordinator.state.peer)
        })
        .collect();
    eprintln!("{name}: submitting {} jobs", args.jobs);
    let start = Instant::now();
    let submits: Vec<Result<f64, String>> = futures::stream::iter(0..args.jobs)
        .map(|i| {
            let c = buyers[i % buyers.len()].clone();
            async move {
                let t = Instant::now();
                c.submit(spec(), None)
                    .await
                    .map(|_| t.elapsed().as_secs_f64() * 1e3)
                    .map_err(|e| e.to_string())
            }
        })
        .buffer_unordered(args.in_flight.max(1))
        .collect()
        .await;
    let submitted_in = start.elapsed();
    let mut submit_ms = Vec::with_capacity(submits.len());
    for s in submits {
        submit_ms.push(s.map_err(|e| anyhow::anyhow!("a submission failed: {e}"))?);
    }
    // Wait for every job to settle (or for progress to stop).
    let db = &coordinator.state.db;
    let (mut last, mut since) = (0usize, Instant::now());
    loop {
        let done: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE state = 'completed'")
            .fetch_one(&db.pool)
            .await?;
        let done = usize::try_from(done).unwrap_or(0);
        if done >= args.jobs {
            break;
        }
        if done > last {
            (last, since) = (done, Instant::now());
        } else if since.elapsed() > Duration::from_secs(60) {
            bail!(
                "{name}: stuck at {done} of {} jobs completed for 60 s",
                args.jobs
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The coordinator's own record of each job's steps.
    let rows = sqlx::query("SELECT job_id, state, at FROM job_events ORDER BY seq")
        .fetch_all(&db.pool)
        .await?;
    let mut steps: HashMap<String, [Option<i64>; 3]> = HashMap::new();
    let mut completions: HashMap<String, u32> = HashMap::new();
    for r in &rows {
        let (job, state, at): (String, String, i64) =
            (r.try_get("job_id")?, r.try_get("state")?, r.try_get("at")?);
        let slot = match state.as_str() {
            "queued" => 0,
            "dispatched" => 1,
            "completed" => {
                *completions.entry(job.clone()).or_default() += 1;
                2
            }
            _ => continue,
        };
        let e = steps.entry(job).or_default();
        e[slot].get_or_insert(at);
    }
    let diffs = |a: usize, b: usize| -> Vec<f64> {
        let mut v: Vec<f64> = steps
            .values()
            .filter_map(|s| Some((s[b]? - s[a]?) as f64))
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let first = steps.values().filter_map(|s| s[0]).min().unwrap_or(0);
    let last_done = steps.values().filter_map(|s| s[2]).max().unwrap_or(first);
    let wall_s = ((last_done - first) as f64 / 1e3).max(1e-3);
    let completed = completions.len();
    let open_escrows: i64 = {
        let mut held = 0i64;
        for b in &buyers {
            held += i64::try_from(b.account().await?.escrowed.0).unwrap_or(i64::MAX);
        }
        held
    };
    let settled_exactly_once =
        completed == args.jobs && completions.values().all(|&n| n == 1) && open_escrows == 0;
    let writes = count_writes(db, args.jobs).await?;
    eprintln!("{name}: the raw sqlx loop");
    // Three runs (the disk's fsync times vary from one to the next): the
    // median is compared with, all three are reported.
    let mut raw_runs = Vec::new();
    for run in 0..RAW_RUNS {
        raw_runs.push(raw_loop(&raw, &writes, args.jobs.min(2000), run).await?);
    }
    raw_runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (raw_jobs_per_s, raw_tx_per_s) = raw_runs[raw_runs.len() / 2];
    let settled_per_s = completed as f64 / wall_s;
    let mut submit_sorted = submit_ms;
    submit_sorted.sort_by(f64::total_cmp);
    Ok(BackendReport {
        backend: name.to_string(),
        jobs: args.jobs,
        completed,
        settled_exactly_once,
        wall_s,
        submitted_per_s: args.jobs as f64 / submitted_in.as_secs_f64().max(1e-3),
        settled_per_s,
        submit: step(&submit_sorted),
        queued_to_dispatched: step(&diffs(0, 1)),
        dispatched_to_settled: step(&diffs(1, 2)),
        queued_to_settled: step(&diffs(0, 2)),
        writes_per_job: writes,
        raw_jobs_per_s,
        raw_transactions_per_s: raw_tx_per_s,
        raw_runs_jobs_per_s: raw_runs.iter().map(|r| r.0).collect(),
        ratio: settled_per_s / raw_jobs_per_s.max(1e-9),
    })
}

fn step(sorted: &[f64]) -> Step {
    Step {
        p50_ms: percentile(sorted, 0.5),
        p99_ms: percentile(sorted, 0.99),
    }
}

/// Rows per job in each table the job path writes.
async fn count_writes(db: &Db, jobs: usize) -> anyhow::Result<Writes> {
    let count = |sql: &'static str| async move {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(&db.pool).await?;
        anyhow::Ok(n as f64 / jobs as f64)
    };
    let bytes: Option<i64> =
        sqlx::query_scalar("SELECT CAST(AVG(LENGTH(entry)) AS BIGINT) FROM ledger_entries")
            .fetch_one(&db.pool)
            .await?;
    let job_events = count("SELECT COUNT(*) FROM job_events").await?;
    Ok(Writes {
        transactions: job_events,
        job_events,
        job_rows: count("SELECT COUNT(*) FROM jobs").await?,
        members: count("SELECT COUNT(*) FROM members").await?,
        nonces: count("SELECT COUNT(*) FROM seen_nonces").await?,
        ledger_entries: count("SELECT COUNT(*) FROM ledger_entries").await?,
        ledger_accounts: count("SELECT COUNT(*) FROM ledger_accounts").await?,
        ledger_entry_bytes: bytes.unwrap_or(0) as f64,
    })
}

/// Performs `jobs` jobs' worth of `w`'s writes on a fresh database at
/// `location`: `w.transactions` write transactions per job (taking the
/// coordinator's write lock), its rows spread over them. Returns (jobs/s,
/// transactions/s).
async fn raw_loop(
    location: &DbLocation,
    w: &Writes,
    jobs: usize,
    run: usize,
) -> anyhow::Result<(f64, f64)> {
    let db = Db::open(location).await?;
    let per_job = |x: f64, j: usize| -> usize {
        // Spread fractional rates evenly: job j writes floor((j+1)x) - floor(jx).
        (((j + 1) as f64 * x).floor() - (j as f64 * x).floor()) as usize
    };
    let entry = vec![0x5au8; w.ledger_entry_bytes.max(1.0) as usize];
    // Each run writes its own rows (ids and sequence numbers apart).
    let base = i64::try_from(run).unwrap_or(0) * 1_000_000_000;
    let (mut seq, mut ev, mut txs) = (base, 0i64, 0usize);
    let start = Instant::now();
    for j in 0..jobs {
        let id = format!("job-{run}-{j:08}");
        let n_tx = per_job(w.transactions, j).max(1);
        let mut entries = per_job(w.ledger_entries, j);
        let mut accounts = per_job(w.ledger_accounts, j);
        let members = per_job(w.members, j);
        let nonces = per_job(w.nonces, j);
        for t in 0..n_tx {
            let mut tx = db.begin().await?;
            if t == 0 {
                for k in 0..nonces {
                    sqlx::query("INSERT INTO seen_nonces (signer, nonce, domain, expires_at) VALUES ($1, $2, $3, $4)")
                        .bind(&id)
                        .bind(format!("{k}"))
                        .bind("bench")
                        .bind(0i64)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(
                    "INSERT INTO jobs (id, owner, submission, spec_json, state, attempts, max_cost, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, 'queued', 0, 1, 0, 0)",
                )
                .bind(&id)
                .bind("buyer")
                .bind(&entry[..entry.len().min(512)])
                .bind("{}")
                .execute(&mut *tx)
                .await?;
            } else {
                sqlx::query("UPDATE jobs SET state = $1, updated_at = $2 WHERE id = $3")
                    .bind(format!("s{t}"))
                    .bind(t as i64)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            }
            if t == 1 {
                for m in 0..members {
                    sqlx::query(
                        "INSERT INTO members (offer_id, job_id, attempt, rank, provider, listen_addrs, price_per_hour, state, updated_at) \
                         VALUES ($1, $2, 0, 0, 'p', '[]', 1, 'offered', 0)",
                    )
                    .bind(format!("{id}-{m}"))
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            ev += 1;
            sqlx::query(
                "INSERT INTO job_events (job_id, at, state, detail) VALUES ($1, $2, $3, NULL)",
            )
            .bind(&id)
            .bind(ev)
            .bind(format!("s{t}"))
            .execute(&mut *tx)
            .await?;
            // Ledger rows go with the first and the last transaction (the
            // escrow lock at submission, the settlement at the end).
            let share = if n_tx == 1 || t == n_tx - 1 {
                usize::MAX
            } else if t == 0 {
                1
            } else {
                0
            };
            let e_now = entries.min(share);
            let a_now = if entries == e_now {
                accounts
            } else {
                accounts.min(2 * e_now)
            };
            for _ in 0..e_now {
                sqlx::query("INSERT INTO ledger_entries (seq, entry, at) VALUES ($1, $2, $3)")
                    .bind(seq)
                    .bind(&entry)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
                seq += 1;
            }
            for a in 0..a_now {
                let account = format!("acct-{}", (j + a) % 64);
                sqlx::query("INSERT INTO ledger_accounts (account, seq) VALUES ($1, $2)")
                    .bind(&account)
                    .bind(seq * 16 + a as i64)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO balances (account, balance) VALUES ($1, $2) ON CONFLICT (account) DO UPDATE SET balance = excluded.balance")
                    .bind(&account)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
            }
            entries -= e_now;
            accounts -= a_now;
            tx.commit().await?;
            txs += 1;
        }
    }
    let s = start.elapsed().as_secs_f64().max(1e-9);
    db.pool.close().await;
    Ok((jobs as f64 / s, txs as f64 / s))
}

/// A PostgreSQL server on which fresh databases are made and dropped.
struct Postgres {
    admin: String,
    made: tokio::sync::Mutex<Vec<String>>,
}

impl Postgres {
    async fn connect(admin: &str) -> anyhow::Result<Self> {
        use sqlx::Connection;
        sqlx::PgConnection::connect(admin).await.with_context(|| {
            format!(
                "no PostgreSQL answered at {} (pass --postgres URL of an account that may CREATE DATABASE, or --backends sqlite)",
                DbLocation::Postgres(admin.into()).display()
            )
        })?;
        Ok(Self {
            admin: admin.to_string(),
            made: tokio::sync::Mutex::new(Vec::new()),
        })
    }

    async fn fresh(&self) -> anyhow::Result<DbLocation> {
        use sqlx::Connection;
        let mut made = self.made.lock().await;
        let name = format!("kiln_bench_{}_{}", std::process::id(), made.len());
        let mut c = sqlx::PgConnection::connect(&self.admin).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await?;
        made.push(name.clone());
        let (base, _) = self
            .admin
            .rsplit_once('/')
            .context("the PostgreSQL URL must end in /DBNAME")?;
        Ok(DbLocation::Postgres(format!("{base}/{name}")))
    }

    async fn drop_all(&self) {
        use sqlx::Connection;
        let Ok(mut c) = sqlx::PgConnection::connect(&self.admin).await else {
            return;
        };
        for name in self.made.lock().await.drain(..) {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut c)
            .await;
        }
    }
}

/// A scripted provider: registers, accepts every offer and delivers a
/// signed result for it at once; re-registers every 30 s.
async fn scripted_provider(addr: Addr, cancel: CancellationToken) -> anyhow::Result<()> {
    let key = Keypair::generate();
    let (net, mut events, ev) =
        kiln_net::spawn(key.to_libp2p(), NetConfig::default(), cancel.clone()).await?;
    tokio::spawn(ev.run());
    let coordinator = kiln_net::peer_of(&addr).context("coordinator address without /p2p")?;
    let id = ProviderId::from_public_key(&key.public());
    let advert = CapabilityAdvert {
        provider: id,
        protocol_version: kiln_protocol::PROTOCOL_VERSION,
        node_version: "bench".into(),
        listen_addrs: net.listen_addrs().iter().map(ToString::to_string).collect(),
        cpu: CpuInfo {
            model: "scripted".into(),
            logical_cores: 8,
            matmul_mflops: 1,
        },
        memory: ByteSize(16 << 30),
        gpus: vec![],
        slots: 8,
        price_per_cpu_hour: Credits(1_000),
        price_per_gpu_hour: Credits(1_000),
        runtime: "scripted".into(),
        allows_network: false,
        issued_at: UnixMillis::now(),
        benchmark: None,
        region: None,
        disk: ByteSize(0),
        cached: vec![],
        registries: vec![],
    };
    let send = {
        let net = net.clone();
        let addr = addr.clone();
        move |req: NetRequest| {
            let net = net.clone();
            let addr = addr.clone();
            async move { net.request(coordinator, vec![addr], req).await }
        }
    };
    let register = {
        let send = send.clone();
        let key = key.clone();
        move |mut a: CapabilityAdvert| {
            let send = send.clone();
            let key = key.clone();
            async move {
                a.issued_at = UnixMillis::now();
                let signed = Signed::sign(&key, a, 3600)?;
                match send(NetRequest::Register(signed)).await? {
                    NetResponse::Accepted => anyhow::Ok(()),
                    other => bail!("registration refused: {other:?}"),
                }
            }
        }
    };
    register(advert.clone()).await?;
    let key = Arc::new(key);
    tokio::spawn(async move {
        let mut heartbeat = tokio::time::interval(Duration::from_secs(30));
        heartbeat.tick().await;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = heartbeat.tick() => {
                    let _ = register(advert.clone()).await;
                }
                ev = events.recv() => match ev {
                    Some(NetEvent::Request { request: NetRequest::Offer(offer), reply, .. }) => {
                        let _ = reply.send(NetResponse::Accepted);
                        let (send, key) = (send.clone(), key.clone());
                        tokio::spawn(async move {
                            let Ok(result) = honest_result(&offer.payload, &key, b"bench\n", Manifest::default(), 1) else { return };
                            for _ in 0..300 {
                                match send(NetRequest::Result(Box::new(result.clone()))).await {
                                    Ok(NetResponse::Retry { .. }) | Err(_) => {
                                        tokio::time::sleep(Duration::from_millis(100)).await;
                                    }
                                    Ok(_) => return,
                                }
                            }
                        });
                    }
                    Some(NetEvent::Request { reply, .. }) => {
                        let _ = reply.send(NetResponse::Rejected { reason: "scripted provider".into() });
                    }
                    Some(_) => {}
                    None => return,
                },
            }
        }
    });
    Ok(())
}

/// A well-formed result for `offer` signed by `key`: succeeded with exit
/// code 0 after `wall_ms`, `manifest` as its outputs (whose files the
/// sender does not serve), `stdout` and an empty stderr inline. What the
/// scripted providers here send, and what the test harness's scripted
/// providers build on.
pub fn honest_result(
    offer: &JobOffer,
    key: &Keypair,
    stdout: &[u8],
    manifest: Manifest,
    wall_ms: u64,
) -> anyhow::Result<JobResult> {
    let stderr: &[u8] = b"";
    let now = UnixMillis::now();
    let receipt = ResultReceipt {
        job_id: offer.job_id,
        offer_id: offer.offer_id,
        provider: ProviderId::from_public_key(&key.public()),
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        error: None,
        image_digest: offer.spec.image.0.clone(),
        input_cids: vec![],
        output_cid: manifest.cid(),
        stdout_cid: ContentId::of_bytes(stdout),
        stderr_cid: ContentId::of_bytes(stderr),
        started_at: now,
        finished_at: now,
        usage: ResourceUsage {
            wall_ms,
            stdout_bytes: stdout.len() as u64,
            ..Default::default()
        },
    };
    Ok(JobResult {
        job_id: offer.job_id,
        receipt: Signed::sign(key, receipt, 600)?,
        manifest,
        blobs: vec![
            Blob {
                cid: ContentId::of_bytes(stdout),
                bytes: stdout.to_vec(),
            },
            Blob {
                cid: ContentId::of_bytes(stderr),
                bytes: stderr.to_vec(),
            },
        ],
    })
}

fn write(r: &CoordinatorReport, out: &Path) -> anyhow::Result<()> {
    let mut md = format!(
        "# kiln bench coordinator\n\n`{}` on {} CPUs: {} scripted providers over libp2p on loopback, {} buyers, {} submissions in flight. Audits and spot re-execution off.\n\n",
        r.command, r.cpus, r.providers, r.buyers, r.in_flight
    );
    md += "| database | jobs | settled/s | submit p50/p99 ms | queued→dispatched p50/p99 ms | dispatched→settled p50/p99 ms | raw sqlx jobs/s, median (tx/s) | raw runs | ratio | exactly once |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for b in &r.backends {
        md += &format!(
            "| {} | {} | {:.0} | {:.1} / {:.1} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} ({:.0}) | {} | {:.2} | {} |\n",
            b.backend,
            b.completed,
            b.settled_per_s,
            b.submit.p50_ms,
            b.submit.p99_ms,
            b.queued_to_dispatched.p50_ms,
            b.queued_to_dispatched.p99_ms,
            b.dispatched_to_settled.p50_ms,
            b.dispatched_to_settled.p99_ms,
            b.raw_jobs_per_s,
            b.raw_transactions_per_s,
            b.raw_runs_jobs_per_s
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            b.ratio,
            b.settled_exactly_once
        );
    }
    md += "\nWrites per job (counted in the coordinator's database after the run; the raw loop repeats them):\n\n| database | transactions | job events | members | nonces | ledger entries | ledger accounts (+ balance upserts) | entry bytes |\n|---|---|---|---|---|---|---|---|\n";
    for b in &r.backends {
        let w = &b.writes_per_job;
        md += &format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |\n",
            b.backend,
            w.transactions,
            w.job_events,
            w.members,
            w.nonces,
            w.ledger_entries,
            w.ledger_accounts,
            w.ledger_entry_bytes
        );
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("coordinator.json"),
        serde_json::to_string_pretty(r)?,
    )?;
    std::fs::write(out.join("coordinator.md"), md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small run on SQLite: every job settles exactly once, the steps are
    /// ordered, and the raw loop wrote something.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_run_settles_every_job_once() {
        let out = tempfile::tempdir().unwrap();
        let r = run(CoordinatorArgs {
            providers: 4,
            jobs: 20,
            buyers: 2,
            in_flight: 4,
            backends: vec!["sqlite".into()],
            postgres: String::new(),
            out: out.path().to_path_buf(),
        })
        .await
        .unwrap();
        let b = &r.backends[0];
        assert_eq!(b.completed, 20);
        assert!(b.settled_exactly_once, "{b:?}");
        assert!(b.writes_per_job.transactions >= 3.0, "{b:?}");
        assert!(b.writes_per_job.ledger_entries >= 1.0, "{b:?}");
        assert!(b.raw_jobs_per_s > 0.0 && b.settled_per_s > 0.0);
        assert_eq!(b.raw_runs_jobs_per_s.len(), RAW_RUNS);
        assert!(b.queued_to_settled.p50_ms >= b.queued_to_dispatched.p50_ms);
        let md = std::fs::read_to_string(out.path().join("coordinator.md")).unwrap();
        assert!(md.contains("| sqlite | 20 |"), "{md}");
    }

    #[tokio::test]
    async fn bad_arguments_are_named() {
        let args = CoordinatorArgs {
            providers: 1,
            jobs: 1,
            buyers: 1,
            in_flight: 1,
            backends: vec!["mysql".into()],
            postgres: String::new(),
            out: PathBuf::from("target/bench"),
        };
        let e = run(args).await.unwrap_err().to_string();
        assert!(e.contains("unknown backend `mysql`"), "{e}");
    }
}
