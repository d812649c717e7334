//! `kiln-node`: the provider daemon. All logic lives in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
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
    Run(kiln_node::cli::RunArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Cmd::Run(args) = Cli::parse().cmd;
    let cancel = CancellationToken::new();
    let node = kiln_node::start(args.into_config(), cancel.clone())
        .await
        .context("starting the provider node")?;
    println!(
        "provider {} listening on {:?}",
        node.provider, node.listen_addrs
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    // Ordered shutdown: stop running jobs and report them lost while the
    // network is still up; then the token stops the network loop, heartbeats
    // and the request handler, and we wait for each task to finish.
    node.drain(std::time::Duration::from_secs(30)).await;
    cancel.cancel();
    for t in node.tasks {
        let _ = t.await;
    }
    Ok(())
}
