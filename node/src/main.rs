//! `kiln-node`: the provider daemon. All logic lives in the library.

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::io::IsTerminal;
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
    Benchmark(kiln_node::cli::BenchArgs),
    Gemm(kiln_node::cli::GemmArgs),
    /// Check that this machine is ready to be a provider. Exit code: 0 all
    /// checks ok, 1 any check failed, 2 warnings only.
    Doctor(kiln_node::cli::DoctorArgs),
    /// Settings files for `kiln-node run --config`.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print a commented TOML file with every `run` setting and its
    /// default (`kiln-node config init > /etc/kiln/node.toml`).
    Init,
}

/// The command line, with `run --config FILE`'s settings as defaults.
fn parse_cli() -> anyhow::Result<Cli> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let path = argv.iter().enumerate().find_map(|(i, a)| {
        let a = a.to_string_lossy();
        match a.strip_prefix("--config") {
            Some("") => argv.get(i + 1).cloned(),
            Some(rest) => rest.strip_prefix('=').map(Into::into),
            None => None,
        }
    });
    let mut cmd = Cli::command();
    if let Some(path) = path {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the config file {}", path.to_string_lossy()))?;
        let run = cmd
            .find_subcommand("run")
            .cloned()
            .context("no run command")?;
        let run = kiln_node::config_file::apply(run, &text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.to_string_lossy()))?;
        cmd = cmd.mut_subcommand("run", |_| run);
    }
    let m = cmd.get_matches_from(argv);
    Ok(Cli::from_arg_matches(&m)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter =
        || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let args = match parse_cli()?.cmd {
        Cmd::Run(args) => args,
        Cmd::Config(ConfigCmd::Init) => {
            let cmd = Cli::command();
            let run = cmd.find_subcommand("run").context("no run command")?;
            print!("{}", kiln_node::config_file::render(run));
            return Ok(());
        }
        Cmd::Benchmark(args) => {
            // stdout carries the report; logs go to stderr.
            tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .init();
            let code = tokio::task::spawn_blocking(move || kiln_node::cli::benchmark(args))
                .await
                .context("the benchmark thread")?;
            std::process::exit(code);
        }
        Cmd::Gemm(args) => {
            let code = tokio::task::spawn_blocking(move || kiln_node::cli::gemm(args))
                .await
                .context("the GPU job's thread")?;
            std::process::exit(code);
        }
        Cmd::Doctor(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .init();
            std::process::exit(kiln_node::cli::doctor(args).await);
        }
    };
    // Colour only for a terminal: a log written to a file stays plain.
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let cancel = CancellationToken::new();
    let node = kiln_node::start(args.into_config(), cancel.clone())
        .await
        .context("starting the provider node")?;
    println!(
        "provider {} listening on {:?}",
        node.provider, node.listen_addrs
    );
    let why = kiln_net::signal::stop_requested()
        .await
        .context("waiting for a stop signal")?;
    tracing::info!("{why}: stopping (running jobs are reported, results delivered)");
    // Ordered, bounded shutdown: running jobs are stopped and reported lost
    // while the network is still up, then the network and the rest stop.
    node.shutdown().await;
    cancel.cancel();
    Ok(())
}
