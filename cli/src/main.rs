//! `kiln`: the buyer's command line. All logic lives in the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_cli::devnet::{Devnet, DevnetOptions, run_demo};
use kiln_cli::{Client, buyer_key, default_key_path, job_line, term};
use kiln_protocol::JobId;
use kiln_protocol::views::JobState;
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: run jobs on a decentralized GPU marketplace",
    after_help = "Files: $KILN_HOME (default: your config directory's `kiln`) holds buyer.key, \
your identity (created on first use, mode 0600), and cache/, verified downloads kept so an \
interrupted one resumes (safe to delete). Money is shown in credits (1 cr = 1,000,000 µcr); \
JSON output and integers in job specs are micro-credits. Job ids may be shortened to any \
unique prefix of 4 or more hex digits."
)]
struct Cli {
    /// Coordinator URL.
    #[arg(
        long,
        global = true,
        env = "KILN_COORDINATOR",
        default_value = "http://127.0.0.1:8730"
    )]
    coordinator: String,
    /// The coordinator's peer id (`kiln_protocol` provider id, as
    /// `GET /v1/info` shows it). Given, requests are signed for it alone, so
    /// a server that claims another identity cannot use them anywhere;
    /// otherwise the id is asked of the server once.
    #[arg(long, global = true, env = "KILN_COORDINATOR_ID")]
    coordinator_id: Option<kiln_protocol::ProviderId>,
    /// Buyer key file (created on first use, mode 0600).
    #[arg(long, global = true, env = "KILN_KEY")]
    key: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an image as `docker run` does: submit, wait, print its logs,
    /// exit with its exit code. `kiln run --cpus 2 --memory 1GiB sha256:… -- CMD ARGS…`
    Run(RunArgs),
    /// Submit, inspect and fetch jobs.
    #[command(subcommand)]
    Job(JobCmd),
    /// List live providers.
    Providers,
    /// Balances and statements.
    #[command(subcommand)]
    Account(AccountCmd),
    /// Search the marketplace's providers.
    #[command(subcommand)]
    Offers(OffersCmd),
    /// Audit the coordinator's settlement ledger.
    #[command(subcommand)]
    Ledger(LedgerCmd),
    /// Record money that crossed the marketplace's edge (an operator's
    /// key only: `--key <coordinator state dir>/operator.key`).
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Datasets by content id: add, get, list.
    #[command(subcommand)]
    Data(DataCmd),
    /// Your own container images, as content-addressed data: push, list.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Run a coordinator and N providers on loopback, and a demo job.
    Devnet {
        /// Provider nodes to run.
        #[arg(long, default_value_t = 2)]
        providers: usize,
        /// Stop once the demo job is done (default: keep running until Ctrl-C).
        #[arg(long)]
        exit_after_demo: bool,
        /// HTTP port for the devnet coordinator (0 picks a free one).
        #[arg(long, default_value_t = 8730)]
        port: u16,
        /// The coordinator's database: an empty PostgreSQL database
        /// (`postgres://user:password@host/dbname`) instead of the embedded
        /// SQLite file in the devnet's temporary state directory.
        #[arg(long)]
        db: Option<String>,
    },
    /// Benchmarks (reports, not tests).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Print a shell completion script: `kiln completions bash >
    /// ~/.local/share/bash-completion/completions/kiln` (or zsh, fish,
    /// elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Simulations of marketplace mechanisms (reports, not tests).
    #[command(subcommand)]
    Sim(kiln_cli::sim::SimCmd),
}

#[derive(Subcommand)]
enum JobCmd {
    /// Submit a job spec (TOML).
    Submit {
        /// The job spec, a TOML file (see README.md for its fields).
        spec: PathBuf,
        /// Follow the job until it ends; exit with its exit code (1 if it
        /// ended without one, 130 if you stop waiting with Ctrl-C: the job
        /// goes on).
        #[arg(long)]
        wait: bool,
        /// A name for the job, shown in `kiln job list`.
        #[arg(long)]
        label: Option<String>,
    },
    /// Your jobs, newest first.
    List,
    /// One job: what it asked for, where it stands and why, its cost,
    /// outputs and history.
    Status {
        /// A job id or a unique prefix of one.
        id: String,
    },
    /// Cancel a job (refunded if not started; otherwise stopped and paid for the time used).
    Cancel {
        /// A job id or a unique prefix of one.
        id: String,
    },
    /// A job's stdout then stderr. Control characters and escape sequences
    /// in them are shown as visible escapes (`\x1b`), so a job cannot drive
    /// your terminal.
    Logs {
        /// A job id or a unique prefix of one.
        id: String,
        /// A gang member's logs (0-based rank; default: rank 0).
        #[arg(long)]
        rank: Option<u32>,
        /// Write the logs exactly as the coordinator serves them, escape
        /// sequences included (for a file or a program, not a terminal).
        #[arg(long, conflicts_with = "json")]
        raw: bool,
        /// Follow a running job: print what it writes as it writes it
        /// (read from its node every second), until it ends.
        #[arg(short, long, conflicts_with = "json")]
        follow: bool,
    },
    /// Download a job's outputs by CID, verifying the receipt, the manifest
    /// and every 16 KiB of every file as it arrives (resumable).
    Get {
        /// A job id or a unique prefix of one.
        id: String,
        /// Directory to write the outputs into (a gang: one `rank-<r>` per member).
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Hash a file or directory locally and upload what the coordinator
    /// lacks; prints the CID to use as a job input.
    Add {
        /// A file or a directory.
        path: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Download a blob or directory by CID, verified as it arrives;
    /// an interrupted download resumes where it stopped.
    Get {
        /// The content id `kiln data add` printed (or an output's).
        cid: kiln_protocol::ContentId,
        /// Where to write it (a file, or a directory for a directory's CID).
        #[arg(short, long)]
        output: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// The blobs you may read: your uploads and your jobs' outputs, and
    /// how much of your quota they use.
    Ls,
    /// Empty the local download cache ($KILN_HOME/cache: verified bytes
    /// kept so an interrupted download resumes).
    ClearCache,
    /// Give up a blob (an upload or a job's output): it stops counting
    /// against your quota, and its bytes leave the coordinator unless
    /// another buyer holds the same content.
    Rm {
        /// The content id to give up.
        cid: kiln_protocol::ContentId,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Upload an image from your Docker engine (its layers and config, as
    /// blobs; only what the coordinator lacks is sent) and print the name
    /// jobs use for it: `image = "kiln:<cid>"`.
    Push {
        /// The image as your engine knows it: `name:tag`, or an id.
        image: String,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// The images you pushed.
    Ls,
    /// Build Kiln's GPU workload image on your engine (no registry):
    /// `kiln-node gemm`, a deterministic FP32 matrix product on the GPU,
    /// with the libraries it links. Prints its id; a job runs it with
    /// `gpus = 1` and `command = ["<n>", "<seed>"]`, and `kiln image push`
    /// sends it to the coordinator like any image.
    GpuWorkload {
        /// The `kiln-node` binary to put in it (default: the one beside
        /// this `kiln`, else the first on PATH).
        #[arg(long)]
        kiln_node: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum AccountCmd {
    /// This buyer's balance and escrowed funds.
    Balance,
    /// Ledger entries touching an account (default: this buyer).
    Statement {
        /// e.g. `provider:12D3…`, `buyer:kb…`, `fee`.
        #[arg(long)]
        account: Option<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// CPU cores per node (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    cpus: f64,
    /// Memory per node, e.g. 8GiB.
    #[arg(long, default_value = "512MiB")]
    memory: kiln_protocol::ByteSize,
    /// GPUs per node.
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// Nodes, all or none (a gang); each gets the resources above.
    #[arg(long, default_value_t = 1)]
    gang: u32,
    /// Wall-clock limit, e.g. 90s, 10m, 2h.
    #[arg(long, default_value = "10m")]
    timeout: kiln_protocol::Seconds,
    /// Most you pay per node-hour, e.g. 2.5cr (the escrow locks this ×
    /// nodes × timeout; what is not used comes back).
    #[arg(long, default_value = "1cr")]
    max_price: kiln_protocol::Credits,
    /// An environment variable, KEY=VALUE (repeatable).
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// An input mounted read-only, CID:/path (repeatable; `kiln data add`
    /// prints the CID).
    #[arg(long = "input")]
    inputs: Vec<String>,
    /// Let the job use the network (if the provider allows it).
    #[arg(long)]
    network: bool,
    /// A name shown in `kiln job list`.
    #[arg(long)]
    label: Option<String>,
    /// Print the job id and return without waiting.
    #[arg(short, long)]
    detach: bool,
    /// The image by digest (`sha256:…`, as `docker images --no-trunc` shows it).
    image: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

impl RunArgs {
    /// The job spec these flags ask for, checked as a spec file is.
    fn spec(&self) -> anyhow::Result<kiln_protocol::JobSpec> {
        let mut spec = kiln_protocol::JobSpec::new(self.image.clone(), self.command.clone());
        anyhow::ensure!(
            self.cpus.is_finite() && self.cpus > 0.0 && self.cpus <= 4096.0,
            "--cpus {} is not a number of cores",
            self.cpus
        );
        let r = &mut spec.resources;
        r.cpus = kiln_protocol::MilliCpu((self.cpus * 1000.0).round() as u32);
        r.memory = self.memory;
        r.gpus = self.gpus;
        r.gang = self.gang;
        r.timeout = self.timeout;
        r.max_price_per_hour = self.max_price;
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--env {kv}: write KEY=VALUE"))?;
            spec.env.insert(k.to_string(), v.to_string());
        }
        for i in &self.inputs {
            let (cid, path) = i
                .split_once(':')
                .with_context(|| format!("--input {i}: write CID:/path"))?;
            let cid = cid
                .parse()
                .map_err(|e| anyhow::anyhow!("--input {i}: {e}"))?;
            spec.inputs
                .push(kiln_protocol::spec::InputSpec::new(cid, path));
        }
        if self.network {
            spec.network = kiln_protocol::NetworkMode::Full;
        }
        spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(spec)
    }
}

#[derive(Subcommand)]
enum OperatorCmd {
    /// Credit a buyer's (or provider's) account with money you received.
    Deposit(TransferArgs),
    /// Debit a provider's (or buyer's) account for money you paid out;
    /// refused when the account holds less.
    Payout(TransferArgs),
}

#[derive(clap::Args)]
struct TransferArgs {
    /// `buyer:kb…` (as `kiln account balance` shows it) or
    /// `provider:12D3…`.
    #[arg(long)]
    account: String,
    /// Credits: `25`, `12.5`, `12.5cr`, or micro-credits `2500000µcr`.
    #[arg(long)]
    amount: kiln_protocol::Credits,
    /// The payment's own id (a bank transfer number, an invoice): each is
    /// recorded once, so running the command again moves nothing twice.
    #[arg(long)]
    reference: String,
}

#[derive(Subcommand)]
enum OffersCmd {
    /// e.g. `kiln offers search 'gpu_name=H100 num_gpus>=2 vram>=80GiB price<=2.5'`
    Search {
        /// Terms that must all hold: `gpu_name=H100 num_gpus>=2 vram>=80GiB
        /// price<=2.5 region=eu` (price in credits per GPU-hour, or per
        /// CPU-hour for CPU-only nodes); empty: every provider.
        #[arg(default_value = "")]
        query: String,
        /// price | tflops_per_price | reputation
        #[arg(long, default_value = "price")]
        sort: String,
        /// Most rows shown.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// Replay the whole chain from genesis: signatures, links, effects, balances.
    Verify {
        /// The coordinator's public key (hex); by default the one it
        /// publishes. (Not `--key`: that is the buyer key file.)
        #[arg(long)]
        coordinator_key: Option<kiln_protocol::PublicKey>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Placement decisions per second of the scheduler on a simulated fleet.
    Scheduler {
        /// Simulated providers.
        #[arg(long, default_value_t = 10_000)]
        providers: usize,
        /// Jobs to place.
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        /// Seed of the simulated fleet and jobs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Directory for the JSON report.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// The data plane: verification vs raw blake3, one-peer fetch vs a raw
    /// libp2p stream and vs curl from nginx, three-peer fetch.
    Data {
        /// Blob size, e.g. 1GiB.
        #[arg(long, default_value = "1GiB")]
        size: kiln_protocol::ByteSize,
        /// Runs of each measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Directory for the JSON report.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// Job start from an image the provider must fetch (kiln:<cid> from 3
    /// peers and the coordinator) against `docker pull` + `docker run` from
    /// a loopback registry, cold and warm (needs Debian's docker-registry).
    Image {
        /// Bytes of the image's data layers, e.g. 1GiB.
        #[arg(long, default_value = "1GiB")]
        size: kiln_protocol::ByteSize,
        /// Data layers the bytes are split into.
        #[arg(long, default_value_t = 4)]
        layers: usize,
        /// Directory for the JSON and markdown reports.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// The API under a flood of unauthenticated requests: honest buyers'
    /// latency unloaded and loaded, and throughput against a bare axum
    /// route (loopback only).
    Api(kiln_cli::bench_api::ApiArgs),
    /// Jobs through a real coordinator on SQLite and PostgreSQL: scripted
    /// providers over libp2p accept and answer at once, buyers submit over
    /// REST; settled jobs/s against a plain sqlx loop of the same writes.
    Coordinator(kiln_cli::bench_coordinator::CoordinatorArgs),
    /// Submit-to-completed on devnet vs plain `docker run --rm`.
    Devnet {
        /// Jobs to time each way.
        #[arg(long, default_value_t = 20)]
        jobs: usize,
        /// Directory for the JSON report.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
}

/// JSON, or text made terminal-safe as a whole ([`term::text`]); fields
/// that must stay on one line are neutralized with [`term::line`] too.
fn print<T: Serialize + ?Sized>(json: bool, v: &T, text: impl FnOnce(&T) -> String) {
    if json {
        term::out(&serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        term::out(&term::text(&text(v)));
    }
}

/// `kiln data clear-cache --json`.
#[derive(Serialize)]
struct CacheCleared<'a> {
    dir: &'a std::path::Path,
    freed: u64,
}

/// `kiln job get --json`.
#[derive(Serialize)]
struct JobGetReport<'a> {
    job_id: JobId,
    dir: &'a std::path::Path,
    nodes: &'a [kiln_cli::NodeOutputs],
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let json = cli.json;
    if let Err(e) = run(cli).await {
        let code = e.downcast_ref::<Exit>().map_or(1, |x| x.code);
        if json {
            // For programs: one JSON object on stderr, as every answer is.
            let v = ErrorOut {
                error: format!("{e:#}"),
                exit_code: code,
            };
            eprintln!("{}", serde_json::to_string(&v).unwrap_or_default());
        } else {
            // Error messages carry the coordinator's (and through it others') text.
            eprintln!("error: {}", term::text(&format!("{e:#}")));
        }
        std::process::exit(code);
    }
}

/// Waits for job `id` to end, calling `on_change` on each new state;
/// Ctrl-C stops waiting (the job goes on) with exit status 130.
async fn wait_or_interrupt(
    client: &Client,
    id: JobId,
    on_change: impl FnMut(&kiln_protocol::views::JobView),
) -> anyhow::Result<kiln_protocol::views::JobView> {
    let waiting = kiln_cli::wait_for(client, &id, Duration::from_secs(7 * 24 * 3600), on_change);
    tokio::select! {
        r = waiting => r,
        r = tokio::signal::ctrl_c() => {
            r.context("waiting for Ctrl-C")?;
            Err(Exit {
                code: 130,
                message: format!(
                    "stopped waiting; job {id} goes on without you: `kiln job status {id}` shows it, `kiln job cancel {id}` stops it"
                ),
            }
            .into())
        }
    }
}

/// A job that ended: `Ok` if it completed with exit code 0; otherwise an
/// error exiting with its exit code (like `docker run`), or 1 when it
/// ended without one.
fn exit_with_job(done: &kiln_protocol::views::JobView) -> anyhow::Result<()> {
    let code = done.exit_code.unwrap_or(0);
    if done.state == JobState::Completed && code == 0 {
        return Ok(());
    }
    Err(Exit {
        code: i32::try_from(code)
            .ok()
            .filter(|c| (1..=255).contains(c))
            .unwrap_or(1),
        message: format!(
            "job {} ended {}{}{}",
            done.job_id,
            done.state,
            done.exit_code
                .map(|c| format!(" with exit code {c}"))
                .unwrap_or_default(),
            done.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
    }
    .into())
}

/// An error under `--json`.
#[derive(Serialize)]
struct ErrorOut {
    error: String,
    exit_code: i32,
}

/// An error that ends the program with its own exit status (a waited-for
/// job's exit code; 130 when waiting was interrupted).
#[derive(Debug)]
struct Exit {
    code: i32,
    message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Completions { shell } = cli.cmd {
        let mut out = Vec::new();
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "kiln", &mut out);
        term::out_raw(&String::from_utf8_lossy(&out));
        return Ok(());
    }
    let key_path = cli.key.clone().unwrap_or_else(default_key_path);
    let key = buyer_key(&key_path)?;
    kiln_cli::client::check_url(&cli.coordinator)?;
    let mut client = Client::new(&cli.coordinator, key.clone());
    if let Some(id) = cli.coordinator_id {
        client = client.with_coordinator_id(id);
    }
    let json = cli.json;
    match cli.cmd {
        Cmd::Job(JobCmd::Submit { spec, wait, label }) => {
            let spec = kiln_cli::read_spec(&spec)?;
            let v = client.submit(spec, label).await?;
            if !wait {
                print(json, &v, job_line);
                return Ok(());
            }
            let done = wait_or_interrupt(&client, v.job_id, |v| {
                if !json {
                    term::out(&job_line(v));
                }
            })
            .await?;
            if json {
                print(true, &done, job_line);
            }
            exit_with_job(&done)?;
        }
        Cmd::Run(args) => {
            let spec = args.spec()?;
            let v = client.submit(spec, args.label.clone()).await?;
            let id = v.job_id;
            if args.detach {
                print(json, &v, |v| v.job_id.to_string());
                return Ok(());
            }
            eprintln!("job {id} submitted (Ctrl-C stops following it, not the job)");
            if json {
                let done = wait_or_interrupt(&client, id, |_| {}).await?;
                print(true, &done, job_line);
                return exit_with_job(&done);
            }
            // The job's stdout to ours and its stderr to ours as it runs,
            // made terminal-safe where they are terminals.
            use std::io::IsTerminal;
            let (tty_out, tty_err) = (
                std::io::stdout().is_terminal(),
                std::io::stderr().is_terminal(),
            );
            let follow = kiln_cli::follow_logs(
                &client,
                &id,
                0,
                Duration::from_secs(1),
                |s| {
                    if tty_out {
                        term::out_raw(&term::text(s));
                    } else {
                        term::out_raw(s);
                    }
                },
                |s| {
                    if tty_err {
                        eprint!("{}", term::text(s));
                    } else {
                        eprint!("{s}");
                    }
                },
            );
            let done = tokio::select! {
                r = follow => r?,
                r = tokio::signal::ctrl_c() => {
                    r.context("waiting for Ctrl-C")?;
                    return Err(Exit {
                        code: 130,
                        message: format!(
                            "stopped following; job {id} goes on without you: `kiln job logs --follow {id}` picks it up again, `kiln job cancel {id}` stops it"
                        ),
                    }
                    .into());
                }
            };
            exit_with_job(&done)?;
        }
        Cmd::Job(JobCmd::List) => print(json, &client.jobs().await?, |v| {
            kiln_cli::show::jobs_table(v, kiln_protocol::UnixMillis::now())
        }),
        Cmd::Job(JobCmd::Status { id }) => {
            let id = kiln_cli::resolve_job(&client, &id).await?;
            print(json, &client.job(&id).await?, kiln_cli::show::job_text);
        }
        Cmd::Job(JobCmd::Cancel { id }) => {
            let id = kiln_cli::resolve_job(&client, &id).await?;
            print(json, &client.cancel(&id).await?, |v| {
                format!("{}  {}", v.job_id, v.outcome)
            });
        }
        Cmd::Job(JobCmd::Logs {
            id,
            rank,
            raw,
            follow,
        }) => {
            let id = kiln_cli::resolve_job(&client, &id).await?;
            if follow {
                let safe = |s: &str| {
                    if raw {
                        s.to_string()
                    } else {
                        term::text(s).into_owned()
                    }
                };
                let done = kiln_cli::follow_logs(
                    &client,
                    &id,
                    rank.unwrap_or(0),
                    Duration::from_secs(1),
                    |s| term::out_raw(&safe(s)),
                    |s| eprint!("{}", safe(s)),
                )
                .await?;
                return exit_with_job(&done);
            }
            let logs = match rank {
                Some(r) => client.rank_logs(&id, r).await?,
                None => {
                    let gang = client.job(&id).await?.spec.resources.gang;
                    if gang > 1 {
                        eprintln!(
                            "(rank 0 of a gang of {gang}; `--rank 1` … `--rank {}` show the others)",
                            gang - 1
                        );
                    }
                    client.logs(&id).await?
                }
            };
            if raw {
                term::out_raw(&logs.stdout);
                term::out_raw(&logs.stderr);
            } else {
                print(json, &logs, kiln_cli::logs_text);
            }
        }
        Cmd::Job(JobCmd::Get { id, output }) => {
            let id = kiln_cli::resolve_job(&client, &id).await?;
            let cache = kiln_cli::data::open_cache(&key_path)?;
            let nodes =
                kiln_cli::fetch_outputs_verified(&client, &cache, &id, &output, !json).await?;
            let v = JobGetReport {
                job_id: id,
                dir: &output,
                nodes: &nodes,
            };
            print(json, &v, |_| {
                nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "{}{} files ({}) from {} verified into {}",
                            n.rank.map(|r| format!("rank {r}: ")).unwrap_or_default(),
                            n.report.files,
                            kiln_cli::data::human(n.report.size),
                            n.provider.short(),
                            n.dir.display()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Data(DataCmd::Add { path, quiet }) => {
            let r = kiln_cli::data::add(&client, &path, !quiet && !json).await?;
            print(json, &r, |r| {
                format!(
                    "{}\n{} {}: {} file(s), {}; uploaded {}, already there {} ({} ms)",
                    r.cid,
                    r.kind,
                    path.display(),
                    r.files,
                    kiln_cli::data::human(r.size),
                    kiln_cli::data::human(r.uploaded_bytes),
                    kiln_cli::data::human(r.skipped_bytes),
                    r.elapsed_ms
                )
            });
        }
        Cmd::Image(ImageCmd::Push { image, quiet }) => {
            let r = kiln_cli::image::push(&client, &image, !quiet && !json).await?;
            print(json, &r, |r| {
                format!(
                    "{}\npushed {image} ({}): {} layer(s), {}; uploaded {}, already there {} ({} ms)\nname it in a job spec as: image = \"{}\"",
                    r.image,
                    r.image_id,
                    r.layers,
                    kiln_cli::data::human(r.size),
                    kiln_cli::data::human(r.uploaded_bytes),
                    kiln_cli::data::human(r.skipped_bytes),
                    r.elapsed_ms,
                    r.image
                )
            });
        }
        Cmd::Image(ImageCmd::GpuWorkload { kiln_node }) => {
            let bin = match kiln_node {
                Some(p) => p,
                None => kiln_cli::image::find_kiln_node()?,
            };
            let docker = kiln_docker::connect().await?;
            let img = kiln_docker::build_gpu_workload_image(&docker, &bin).await?;
            print(json, &(&img.id, &img.tag), |_| {
                format!(
                    "{}
built {} from {}
run it as a job with gpus = 1 and command = [\"8192\", \"42\"] (n, seed): the product's BLAKE3 lands in gemm.txt",
                    img.id,
                    img.tag,
                    bin.display()
                )
            })
        }
        Cmd::Image(ImageCmd::Ls) => {
            let mut v = client.blobs().await?;
            v.blobs.retain(|b| b.kind == kiln_protocol::BlobKind::Image);
            print(json, &v.blobs, |blobs| {
                let mut t = kiln_cli::table::Table::new(&[
                    ("IMAGE", kiln_cli::table::Align::Left),
                    ("SIZE", kiln_cli::table::Align::Right),
                    ("LAYERS", kiln_cli::table::Align::Right),
                    ("NAME", kiln_cli::table::Align::Left),
                ]);
                for b in blobs {
                    t.row(vec![
                        format!("kiln:{}", b.cid),
                        kiln_cli::data::human(b.content_size.unwrap_or(b.size)),
                        // Its blobs less the config.
                        b.files
                            .map_or_else(|| "?".into(), |n| n.saturating_sub(1).to_string()),
                        b.name.clone(),
                    ]);
                }
                t.render_or("no images yet: `kiln image push <image>` uploads one")
            });
        }
        Cmd::Data(DataCmd::Get { cid, output, quiet }) => {
            let cache = kiln_cli::data::open_cache(&key_path)?;
            let cancel = tokio_util::sync::CancellationToken::new();
            let c = cancel.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    c.cancel();
                }
            });
            let r = kiln_cli::data::get(&client, &cache, cid, &output, !quiet && !json, &cancel)
                .await?;
            print(json, &r, |r| {
                let reused = if r.resumed_bytes > 0 {
                    format!(
                        "{} reused from the download cache, ",
                        kiln_cli::data::human(r.resumed_bytes)
                    )
                } else {
                    String::new()
                };
                format!(
                    "{cid}: {} file(s), {} verified into {} ({reused}{} transferred, {} ms)",
                    r.files,
                    kiln_cli::data::human(r.size),
                    output.display(),
                    kiln_cli::data::human(r.bytes_transferred),
                    r.elapsed_ms
                )
            });
        }
        Cmd::Data(DataCmd::Ls) => print(json, &client.blobs().await?, |v| {
            let mut t = kiln_cli::table::Table::new(&[
                ("CID", kiln_cli::table::Align::Left),
                ("SIZE", kiln_cli::table::Align::Right),
                ("KIND", kiln_cli::table::Align::Left),
                ("NAME", kiln_cli::table::Align::Left),
            ]);
            for b in &v.blobs {
                // A directory: its files' bytes, not its manifest's.
                let size = match (b.content_size, b.files) {
                    (Some(s), Some(n)) => format!("{} in {n} files", kiln_cli::data::human(s)),
                    _ => kiln_cli::data::human(b.size),
                };
                t.row(vec![
                    b.cid.to_string(),
                    size,
                    b.kind.as_str().to_string(),
                    b.name.clone(),
                ]);
            }
            let mut lines = vec![t.render_or("nothing yet: `kiln data add <path>` uploads")];
            lines.push(match v.quota {
                Some(q) => format!(
                    "using {} of your {} quota",
                    kiln_cli::data::human(v.used),
                    kiln_cli::data::human(q)
                ),
                None => format!("using {} (no quota)", kiln_cli::data::human(v.used)),
            });
            lines.join("\n")
        }),
        Cmd::Data(DataCmd::ClearCache) => {
            let dir = key_path
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default()
                .join("cache");
            let freed = kiln_cli::data::dir_size(&dir);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing the download cache {}", dir.display()))?;
            }
            let r = CacheCleared { dir: &dir, freed };
            print(json, &r, |r| {
                format!(
                    "download cache {} emptied ({} freed)",
                    r.dir.display(),
                    kiln_cli::data::human(r.freed)
                )
            });
        }
        Cmd::Data(DataCmd::Rm { cid }) => print(json, &client.delete_blob(&cid).await?, |v| {
            format!(
                "removed {} ({}){}; using {} now",
                v.cid,
                kiln_cli::data::human(v.size),
                if v.erased {
                    ""
                } else {
                    ", still held by someone else or a job in flight"
                },
                kiln_cli::data::human(v.used)
            )
        }),
        Cmd::Bench(BenchCmd::Image { size, layers, out }) => {
            let r = kiln_cli::bench_image::run(size.0, layers, &out).await?;
            print(json, &r, |r| {
                format!(
                    "{}(reports in {})",
                    kiln_cli::bench_image::markdown(r),
                    out.display()
                )
            });
        }
        Cmd::Bench(BenchCmd::Data { size, runs, out }) => {
            std::fs::create_dir_all(&out)?;
            let opts = kiln_blobs::bench::Options {
                runs,
                ..Default::default()
            };
            let r = kiln_blobs::bench::run_with(size.0, &out, &opts).await?;
            print(json, &r, |v| {
                let mut s = format!(
                    "{} MiB blob, {} CPUs (report in {}):\n\
                     (a) verify {:.0} MiB/s vs blake3 {:.0} MiB/s: {:.2}x (goal >= 0.8)\n\
                     (b) 1-peer fetch {:.0} MiB/s vs raw libp2p stream {:.0} MiB/s: {:.2}x (goal >= 0.9); vs raw file-to-file stream {:.0} MiB/s: {:.2}x",
                    size.0 >> 20,
                    v.cpus,
                    out.display(),
                    v.bao_verify_mib_s,
                    v.blake3_mib_s,
                    v.verify_ratio,
                    v.fetch_1_peer_mib_s,
                    v.raw_stream_mib_s,
                    v.fetch_1_ratio,
                    v.raw_file_to_file_mib_s,
                    v.fetch_1_ratio_vs_file_to_file,
                );
                if let Some(c) = v.curl_nginx_mib_s {
                    s.push_str(&format!(
                        "\n    curl from nginx {c:.0} MiB/s: Kiln 1-peer fetch is {:.2}x of it",
                        v.fetch_1_peer_mib_s / c.max(1e-9)
                    ));
                }
                s.push_str(&format!(
                    "\n(c) 3-peer fetch {:.0} MiB/s: {:.2}x of the raw stream",
                    v.fetch_3_peers_mib_s, v.fetch_3_ratio
                ));
                s
            });
        }
        Cmd::Providers => print(json, &client.providers().await?, |v| {
            kiln_cli::show::providers_table(v, kiln_protocol::UnixMillis::now())
        }),
        Cmd::Account(AccountCmd::Balance) => print(json, &client.account().await?, |v| {
            format!(
                "{}\nbalance   {}\nescrowed  {} (held for your jobs until they settle)",
                v.account, v.balance, v.escrowed
            )
        }),
        Cmd::Account(AccountCmd::Statement { account }) => {
            let account = account
                .unwrap_or_else(|| format!("buyer:{}", kiln_protocol::BuyerId::new(key.public())));
            print(json, &client.statement(&account).await?, |v| {
                let mut t = kiln_cli::table::Table::new(&[
                    ("SEQ", kiln_cli::table::Align::Right),
                    ("OP", kiln_cli::table::Align::Left),
                    ("AMOUNT", kiln_cli::table::Align::Right),
                    ("WHAT", kiln_cli::table::Align::Left),
                    ("KEY", kiln_cli::table::Align::Left),
                ]);
                for e in &v.entries {
                    t.row(vec![
                        e.seq.to_string(),
                        e.op.clone(),
                        kiln_cli::show::delta(e.delta),
                        kiln_cli::show::effect(&e.effect),
                        e.key.clone(),
                    ]);
                }
                format!(
                    "{}  balance {}\n{}",
                    v.account,
                    v.balance,
                    t.render_or("no entries")
                )
            });
        }
        Cmd::Operator(cmd) => {
            let (kind, a) = match cmd {
                OperatorCmd::Deposit(a) => (kiln_protocol::views::TransferKind::Deposit, a),
                OperatorCmd::Payout(a) => (kiln_protocol::views::TransferKind::Payout, a),
            };
            let req = kiln_protocol::views::TransferRequest {
                kind,
                account: a.account,
                amount: a.amount,
                reference: a.reference,
            };
            print(json, &client.transfer(&req).await?, |v| {
                format!(
                    "{} {} {} {} (reference {}); balance {}",
                    if v.applied {
                        "recorded"
                    } else {
                        "already recorded:"
                    },
                    v.kind.as_str(),
                    v.amount,
                    if v.kind == kiln_protocol::views::TransferKind::Deposit {
                        format!("to {}", term::line(&v.account))
                    } else {
                        format!("from {}", term::line(&v.account))
                    },
                    term::line(&v.reference),
                    v.balance
                )
            });
        }
        Cmd::Ledger(LedgerCmd::Verify { coordinator_key }) => {
            match kiln_cli::ledger::verify(&client, coordinator_key).await? {
                Ok(v) => print(json, &v, |v| {
                    format!(
                        "ledger verified: {} entries, head {}, {} accounts match",
                        v.entries,
                        v.head.as_deref().unwrap_or("-"),
                        v.accounts
                    )
                }),
                Err(e) => anyhow::bail!("ledger verification failed: {e}"),
            }
        }
        Cmd::Devnet {
            providers,
            exit_after_demo,
            port,
            db,
        } => {
            let dn = Devnet::start(DevnetOptions {
                providers,
                http_port: port,
                // Parsed here, not by clap, whose error would echo a password.
                database: db
                    .as_deref()
                    .map(kiln_coordinator::db::DbLocation::parse)
                    .transpose()?,
                // A live marketplace audits its providers: every 5 minutes
                // on average here (6 hours by default in production).
                audit_interval: Some(std::time::Duration::from_secs(300)),
                // ... and verifies results by re-executing a sample of them.
                verification: true,
                // A local marketplace: its nodes may fetch URL inputs served
                // from this machine (real providers refuse non-public hosts).
                allow_private_urls: true,
                ..Default::default()
            })
            .await?;
            let demo = run_demo(&dn, &Client::new(&dn.url(), key)).await;
            let demo = match demo {
                Ok(d) => d,
                Err(e) => {
                    dn.shutdown().await;
                    return Err(e);
                }
            };
            print(json, &demo, |d| {
                format!(
                    "demo job {} {} on {}; output {}; receipt verified: {}",
                    d.job_id,
                    d.state,
                    d.provider
                        .map_or_else(|| "?".to_string(), |p| p.to_string()),
                    d.output_cid
                        .map_or_else(|| "-".to_string(), |c| c.to_string()),
                    d.receipt_verified
                )
            });
            let ok = demo.state == JobState::Completed && demo.receipt_verified;
            if !exit_after_demo {
                eprintln!(
                    "devnet is up with {providers} providers; the demo workload image is {}.\nIn another terminal:\nexport KILN_COORDINATOR={}",
                    dn.image_id,
                    dn.url()
                );
                kiln_net::signal::stop_requested()
                    .await
                    .context("waiting for a stop signal")?;
            }
            dn.shutdown().await;
            if !ok {
                anyhow::bail!("the demo job did not complete with a verified receipt");
            }
        }
        Cmd::Offers(OffersCmd::Search { query, sort, limit }) => print(
            json,
            &client.offers(&query, &sort, limit).await?,
            kiln_cli::show::offers_table,
        ),
        Cmd::Bench(BenchCmd::Scheduler {
            providers,
            jobs,
            seed,
            out,
        }) => {
            let r = tokio::task::spawn_blocking(move || {
                kiln_coordinator::bench::bench_scheduler(providers, jobs, seed)
            })
            .await?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(
                out.join("scheduler.json"),
                serde_json::to_string_pretty(&r)?,
            )?;
            print(json, &r, |v| {
                format!(
                    "{} providers, {} jobs: {:.0} placement decisions/s ({} placed), peak RSS {} MiB (report in {})",
                    v.providers,
                    v.jobs,
                    v.decisions_per_sec,
                    v.placed,
                    v.peak_rss_bytes >> 20,
                    out.display()
                )
            });
        }
        // Answered before any key or URL is touched (see above).
        Cmd::Completions { .. } => {}
        Cmd::Sim(cmd) => {
            tokio::task::spawn_blocking(move || kiln_cli::sim::run(cmd, json)).await??
        }
        Cmd::Bench(BenchCmd::Coordinator(args)) => {
            let out = args.out.clone();
            let r = kiln_cli::bench_coordinator::run(args).await?;
            print(json, &r, |r| kiln_cli::bench_coordinator::summary(r, &out));
        }
        Cmd::Bench(BenchCmd::Api(args)) => {
            let out = args.out.clone();
            let r = kiln_cli::bench_api::api(args.into()).await?;
            print(json, &r, |r| kiln_cli::bench_api::summary(r, &out));
        }
        Cmd::Bench(BenchCmd::Devnet { jobs, out }) => {
            let r = kiln_cli::bench::devnet(jobs, &out).await?;
            print(json, &r, |r| {
                format!(
                    "kiln devnet median {:.1} ms, docker run --rm median {:.1} ms, ratio {:.2}× (report in {})",
                    r.kiln_devnet.median_ms,
                    r.docker_run_rm.median_ms,
                    r.ratio_median,
                    out.display()
                )
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command and every flag says what it is for in `--help`.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in c.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "kiln", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
