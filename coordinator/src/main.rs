//! `kiln-coordinator`: the marketplace's coordinator. All logic lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_coordinator::{CoordinatorConfig, join};
use kiln_protocol::{Credits, Seconds};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "kiln-coordinator",
    version,
    about = "Kiln coordinator: REST API for buyers, matching, dispatch, verification, settlement"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator until Ctrl-C (or SIGTERM).
    Run {
        #[arg(long, env = "KILN_COORDINATOR_STATE", default_value_os_t = default_state_dir())]
        state_dir: PathBuf,
        /// The database: a SQLite file path, or a PostgreSQL URL
        /// (`postgres://user:password@host/dbname`). Default: the embedded
        /// SQLite file `kiln.db` in the state directory.
        #[arg(long, env = "KILN_COORDINATOR_DB", hide_env_values = true)]
        db: Option<String>,
        /// HTTP address for the buyer API.
        #[arg(long, default_value = "127.0.0.1:8730")]
        http: SocketAddr,
        /// libp2p address for providers.
        #[arg(long, default_value = "/ip4/0.0.0.0/tcp/4730")]
        p2p: kiln_net::Addr,
        /// Credits granted once to each new buyer (for test networks).
        #[arg(long)]
        faucet: Option<u64>,
        /// Marketplace fee in basis points.
        #[arg(long, default_value_t = 100)]
        fee_bps: u16,
        /// Mean time between two capability challenges of one provider
        /// (`90s`, `10m`, `6h`), or `off`.
        #[arg(long, default_value = "6h", value_parser = parse_every)]
        audit_every: Every,
        /// How long after its timeout a started job may take to deliver its
        /// result before the coordinator gives up on it.
        #[arg(long, default_value = "2m")]
        result_grace: Seconds,
        /// Re-execute a sample of accepted results on another provider
        /// before paying for them (`on`), or pay every result at once
        /// (`off`).
        #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
        verification: bool,
        /// How long a sampled result may wait for its re-executions (on
        /// top of twice the job's timeout).
        #[arg(long, default_value = "30m")]
        audit_window: Seconds,
        /// Most bytes the blob store holds (inputs, outputs, logs), e.g.
        /// `100GiB`, or `off` for no limit. Nothing is evicted to make room
        /// (they are buyers' only copies): what does not fit is refused.
        #[arg(long, default_value = "100GiB", value_parser = parse_quota)]
        blob_quota: Quota,
        /// Most bytes one buyer may hold (uploads and its jobs' outputs),
        /// e.g. `10GiB`, or `off`; an upload past it is refused until the
        /// buyer frees space with `kiln data rm`.
        #[arg(long, default_value = "10GiB", value_parser = parse_quota)]
        blob_quota_per_buyer: Quota,
        /// Least escrow, in micro-credits, a job must lock (max price per
        /// hour × nodes × timeout) to be queued; `0` queues jobs that ask
        /// to pay nothing.
        #[arg(long, default_value_t = 10_000)]
        min_job_escrow: u64,
        /// Most jobs one buyer may have waiting to be placed; more are
        /// refused with HTTP 429.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        max_queued_per_buyer: u32,
        /// Unauthenticated requests per second one source address (an IPv4
        /// address, an IPv6 /64) may make, sustained, or `off`; more get
        /// HTTP 429 with Retry-After.
        #[arg(long, default_value = "20", value_parser = parse_limit)]
        public_rate: Limit,
        /// Unauthenticated requests one address may make at once above
        /// `--public-rate`.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..))]
        public_burst: u32,
        /// Unauthenticated requests served at once, from everyone, or
        /// `off`; signed requests have their own budget and never wait
        /// for this one.
        #[arg(long, default_value = "8", value_parser = parse_limit)]
        public_in_flight: Limit,
        /// Signed requests (and job submissions) per second one buyer key
        /// may make, sustained, or `off`; more get HTTP 429 with Retry-After.
        #[arg(long, default_value = "200", value_parser = parse_limit)]
        buyer_rate: Limit,
        /// Signed requests one buyer key may make at once above
        /// `--buyer-rate`.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        buyer_burst: u32,
        /// How long a request refused by a rate limit is held before its
        /// 429 is sent (its Retry-After, at most this), so that a client
        /// that retries at once is slowed down; `0s` or `off` answers at
        /// once.
        #[arg(long, default_value = "1s", value_parser = parse_delay)]
        refusal_delay: Delay,
    },
}

/// A delay, or none.
#[derive(Clone, Copy, Debug)]
struct Delay(Option<Seconds>);

fn parse_delay(s: &str) -> Result<Delay, String> {
    match s {
        "off" | "none" => Ok(Delay(None)),
        _ => match s.parse::<Seconds>()? {
            Seconds(0) => Ok(Delay(None)),
            d => Ok(Delay(Some(d))),
        },
    }
}

/// A positive count, or no limit.
#[derive(Clone, Copy, Debug)]
struct Limit(Option<u32>);

fn parse_limit(s: &str) -> Result<Limit, String> {
    match s {
        "off" | "none" => Ok(Limit(None)),
        _ => match s.parse::<u32>() {
            Ok(0) => Err("0 would refuse everything; give a positive number, or `off`".into()),
            Ok(n) => Ok(Limit(Some(n))),
            Err(_) => Err(format!("`{s}`: give a positive number, or `off`")),
        },
    }
}

/// A mean interval, or never.
#[derive(Clone, Copy, Debug)]
struct Every(Option<Seconds>);

fn parse_every(s: &str) -> Result<Every, String> {
    match s {
        "off" | "never" => Ok(Every(None)),
        _ => match s.parse::<Seconds>()? {
            Seconds(0) => Err("0 would challenge without pause; give a duration or `off`".into()),
            d => Ok(Every(Some(d))),
        },
    }
}

/// A size, or no limit.
#[derive(Clone, Copy, Debug)]
struct Quota(Option<u64>);

fn parse_quota(s: &str) -> Result<Quota, String> {
    match s {
        "off" | "none" => Ok(Quota(None)),
        _ => s
            .parse::<kiln_protocol::ByteSize>()
            .map(|b| Quota(Some(b.0)))
            .map_err(|e| format!("{e}; give a size such as 100GiB, or `off`")),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("`{s}`: say `on` or `off`")),
    }
}

fn default_state_dir() -> PathBuf {
    dirs::data_local_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("kiln-coordinator")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Colour only for a terminal: a log written to a file or a pipe
    // stays plain text.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let Cmd::Run {
        state_dir,
        db,
        http,
        p2p,
        faucet,
        fee_bps,
        audit_every,
        result_grace,
        verification,
        audit_window,
        blob_quota,
        blob_quota_per_buyer,
        min_job_escrow,
        max_queued_per_buyer,
        public_rate,
        public_burst,
        public_in_flight,
        buyer_rate,
        buyer_burst,
        refusal_delay,
    } = Cli::parse().cmd;
    let mut config = CoordinatorConfig::new(state_dir);
    // Parsed here, not by clap, whose error would echo the URL's password.
    config.database = db
        .as_deref()
        .map(kiln_coordinator::db::DbLocation::parse)
        .transpose()?;
    config.http_listen = http;
    config.p2p_listen = p2p.clone();
    config.faucet = faucet.map(Credits);
    config.fee_bps = fee_bps;
    config.audit.mean_interval = audit_every.0.map(|s| Duration::from_secs(s.0));
    config.result_grace = Duration::from_secs(result_grace.0);
    config.verification.enabled = verification;
    config.verification.window = Duration::from_secs(audit_window.0);
    config.blob_quota = blob_quota.0;
    config.blob_quota_per_buyer = blob_quota_per_buyer.0;
    config.min_job_escrow = Credits(min_job_escrow);
    config.max_queued_per_buyer = max_queued_per_buyer;
    let rate = |per_second: Limit, burst: u32| {
        per_second
            .0
            .map(|per_second| kiln_coordinator::throttle::Rate { per_second, burst })
    };
    config.api_limits.public_rate = rate(public_rate, public_burst);
    config.api_limits.public_in_flight = public_in_flight.0.map(|n| n as usize);
    config.api_limits.buyer_rate = rate(buyer_rate, buyer_burst);
    config.api_limits.refusal_delay = refusal_delay.0.map(|s| Duration::from_secs(s.0));
    let cancel = CancellationToken::new();
    let c = kiln_coordinator::start(config, cancel.clone())
        .await
        .context("starting the coordinator")?;
    println!("coordinator API at {}", c.url());
    // Listening on every interface: print the machine's real addresses, not
    // the loopback address libp2p reports first.
    let v6 = matches!(
        p2p.iter().next(),
        Some(kiln_net::multiaddr::Protocol::Ip6(_))
    );
    let joins = join::join_addrs(
        &p2p,
        &c.p2p_addrs,
        &join::interfaces(),
        join::default_route_ip(v6),
    );
    for (i, a) in joins.iter().enumerate() {
        if i == 0 {
            println!("providers join with: kiln-node run --coordinator {a}");
        } else {
            println!(
                "  or, where they reach this machine at another address: kiln-node run --coordinator {a}"
            );
        }
    }
    let why = kiln_net::signal::stop_requested()
        .await
        .context("waiting for a stop signal")?;
    tracing::info!("{why}: stopping");
    drop(cancel);
    c.shutdown().await;
    Ok(())
}
