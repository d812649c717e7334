//! `kiln-coordinator`: the marketplace's coordinator. All logic lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_coordinator::CoordinatorConfig;
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
    /// Run the coordinator on an embedded SQLite database until Ctrl-C.
    Run {
        #[arg(long, env = "KILN_COORDINATOR_STATE", default_value_os_t = default_state_dir())]
        state_dir: PathBuf,
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
    },
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Cmd::Run {
        state_dir,
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
    } = Cli::parse().cmd;
    let mut config = CoordinatorConfig::new(state_dir);
    config.http_listen = http;
    config.p2p_listen = p2p;
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
    let cancel = CancellationToken::new();
    let c = kiln_coordinator::start(config, cancel.clone())
        .await
        .context("starting the coordinator")?;
    println!("coordinator API at {}", c.url());
    for a in &c.p2p_addrs {
        println!("providers join with: kiln-node run --coordinator {a}");
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    drop(cancel);
    c.shutdown().await;
    Ok(())
}
