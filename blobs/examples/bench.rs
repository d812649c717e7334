//! `cargo run --release -p kiln-blobs --example bench -- [SIZE_MIB] [OUT_DIR] [--sync] [--runs N]`
//!
//! Runs the data-plane benchmark (default 1024 MiB into target/bench/data)
//! and prints the Markdown report.

use std::path::PathBuf;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut size_mib: u64 = 1024;
    let mut out = PathBuf::from("target/bench/data");
    let mut opts = kiln_blobs::bench::Options::default();
    let mut args = std::env::args().skip(1);
    let mut positional = 0;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--sync" => opts.sync = true,
            "--only-fetch" => opts.only_fetch = true,
            "--unit-kib" => {
                opts.fetch.unit_bytes = args
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(1024)
                    << 10
            }
            "--per-peer" => {
                opts.fetch.per_peer = args.next().and_then(|n| n.parse().ok()).unwrap_or(4)
            }
            "--runs" => opts.runs = args.next().and_then(|n| n.parse().ok()).unwrap_or(3),
            _ if positional == 0 => {
                size_mib = a.parse().unwrap_or_else(|_| {
                    eprintln!("SIZE_MIB must be a number of MiB, got `{a}`");
                    std::process::exit(2)
                });
                positional += 1;
            }
            _ => out = PathBuf::from(a),
        }
    }
    match kiln_blobs::bench::run_with(size_mib << 20, &out, &opts).await {
        Ok(r) => {
            println!("{}", kiln_blobs::bench::markdown(&r));
            println!("written to {}/data.{{json,md}}", out.display());
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
