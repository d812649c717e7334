//! `kiln-node`: the provider daemon. All logic lives in the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_protocol::Credits;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "kiln-node",
    version,
    about = "Kiln provider daemon: lend this machine's GPUs and CPUs to the marketplace"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join a coordinator and run buyers' jobs until Ctrl-C.
    Run {
        /// The coordinator's multiaddr, ending in /p2p/<peer id>.
        #[arg(long, env = "KILN_COORDINATOR_ADDR")]
        coordinator: kiln_net::Addr,
        /// Where the identity key and job directories live.
        #[arg(long, env = "KILN_NODE_STATE", default_value_os_t = default_state_dir())]
        state_dir: PathBuf,
        #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
        listen: kiln_net::Addr,
        /// Jobs to run at once.
        #[arg(long, default_value_t = 2)]
        slots: u32,
        /// Price per CPU-hour in micro-credits.
        #[arg(long, default_value_t = 100_000)]
        price_per_cpu_hour: u64,
        /// Price per GPU-hour in micro-credits.
        #[arg(long, default_value_t = 2_000_000)]
        price_per_gpu_hour: u64,
    },
}

fn default_state_dir() -> PathBuf {
    dirs::data_local_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("kiln-node")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Cmd::Run {
        coordinator,
        state_dir,
        listen,
        slots,
        price_per_cpu_hour,
        price_per_gpu_hour,
    } = Cli::parse().cmd;
    let mut config = kiln_node::NodeConfig::new(coordinator, state_dir);
    config.listen = listen;
    config.slots = slots;
    config.price_per_cpu_hour = Credits(price_per_cpu_hour);
    config.price_per_gpu_hour = Credits(price_per_gpu_hour);
    let cancel = CancellationToken::new();
    let node = kiln_node::start(config, cancel.clone())
        .await
        .context("starting the provider node")?;
    println!(
        "provider {} listening on {:?}",
        node.provider, node.listen_addrs
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    cancel.cancel();
    for t in node.tasks {
        let _ = t.await;
    }
    Ok(())
}
