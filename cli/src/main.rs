//! `kiln`: the buyer's command line. All logic lives in the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_cli::devnet::{Devnet, DevnetOptions, run_demo};
use kiln_cli::{Client, buyer_key, default_key_path};
use kiln_protocol::JobId;
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: run jobs on a decentralized GPU marketplace"
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
    /// Run a coordinator and N providers on loopback, and a demo job.
    Devnet {
        #[arg(long, default_value_t = 2)]
        providers: usize,
        #[arg(long)]
        exit_after_demo: bool,
        /// HTTP port for the devnet coordinator (0 picks a free one).
        #[arg(long, default_value_t = 8730)]
        port: u16,
    },
    /// Benchmarks (reports, not tests).
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum JobCmd {
    /// Submit a job spec (TOML).
    Submit {
        spec: PathBuf,
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        label: Option<String>,
    },
    List,
    Status {
        id: JobId,
    },
    /// Cancel a job (refunded if not started; otherwise stopped and paid for the time used).
    Cancel {
        id: JobId,
    },
    Logs {
        id: JobId,
    },
    /// Download a job's outputs, verifying each file and the receipt.
    Get {
        id: JobId,
        #[arg(short, long)]
        output: PathBuf,
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

#[derive(Subcommand)]
enum OffersCmd {
    /// e.g. `kiln offers search 'gpu_name=H100 num_gpus>=2 vram>=80GiB price<=2.5'`
    Search {
        #[arg(default_value = "")]
        query: String,
        /// price | tflops_per_price | reputation
        #[arg(long, default_value = "price")]
        sort: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// Replay the whole chain from genesis: signatures, links, effects, balances.
    Verify {
        /// The coordinator's public key (hex); by default the one it publishes.
        #[arg(long)]
        key: Option<kiln_protocol::PublicKey>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Placement decisions per second of the scheduler on a simulated fleet.
    Scheduler {
        #[arg(long, default_value_t = 10_000)]
        providers: usize,
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// Submit-to-completed on devnet vs plain `docker run --rm`.
    Devnet {
        #[arg(long, default_value_t = 20)]
        jobs: usize,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
}

fn print(json: bool, v: &Value, text: impl FnOnce(&Value) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        println!("{}", text(v));
    }
}

fn job_line(v: &Value) -> String {
    let reason = v["reason"]
        .as_str()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    format!(
        "{}  {}{}",
        v["job_id"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        reason
    )
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let key = buyer_key(&cli.key.clone().unwrap_or_else(default_key_path))?;
    let client = Client::new(&cli.coordinator, key.clone());
    let json = cli.json;
    match cli.cmd {
        Cmd::Job(JobCmd::Submit { spec, wait, label }) => {
            let spec = kiln_cli::read_spec(&spec)?;
            let v = client.submit(spec, label).await?;
            if !wait {
                print(json, &v, job_line);
                return Ok(());
            }
            let id = kiln_cli::job_id_of(&v)?;
            let done = kiln_cli::wait_for(&client, &id, Duration::from_secs(7 * 24 * 3600), |v| {
                if !json {
                    println!("{}", job_line(v));
                }
            })
            .await?;
            if json {
                print(true, &done, job_line);
            }
            if done["state"] != "completed" {
                anyhow::bail!("job {id} ended {}", done["state"]);
            }
        }
        Cmd::Job(JobCmd::List) => print(json, &client.jobs().await?, |v| {
            v["jobs"]
                .as_array()
                .map(|js| js.iter().map(job_line).collect::<Vec<_>>().join("\n"))
                .unwrap_or_default()
        }),
        Cmd::Job(JobCmd::Status { id }) => print(json, &client.job(&id).await?, job_line),
        Cmd::Job(JobCmd::Cancel { id }) => print(json, &client.cancel(&id).await?, |v| {
            format!(
                "{}  {}",
                v["job_id"].as_str().unwrap_or("?"),
                v["outcome"].as_str().unwrap_or("?")
            )
        }),
        Cmd::Job(JobCmd::Logs { id }) => print(json, &client.logs(&id).await?, |v| {
            format!(
                "{}{}",
                v["stdout"].as_str().unwrap_or(""),
                v["stderr"].as_str().unwrap_or("")
            )
        }),
        Cmd::Job(JobCmd::Get { id, output }) => {
            let m = kiln_cli::fetch_outputs(&client, &id, &output).await?;
            let v = serde_json::json!({ "job_id": id, "output_cid": m.cid(), "files": m.entries.len(), "bytes": m.total_size(), "dir": output });
            print(json, &v, |v| {
                format!(
                    "{} files ({} bytes) verified into {}",
                    v["files"],
                    v["bytes"],
                    output.display()
                )
            });
        }
        Cmd::Providers => print(json, &client.providers().await?, |v| {
            v["providers"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            format!(
                                "{}  cpus={} gpus={} slots={}",
                                p["provider"].as_str().unwrap_or("?"),
                                p["cpu"]["logical_cores"],
                                p["gpus"].as_array().map_or(0, Vec::len),
                                p["slots"]
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default()
        }),
        Cmd::Account(AccountCmd::Balance) => print(json, &client.account().await?, |v| {
            format!(
                "balance {} µcr, escrowed {} µcr",
                v["balance"], v["escrowed"]
            )
        }),
        Cmd::Account(AccountCmd::Statement { account }) => {
            let account = account
                .unwrap_or_else(|| format!("buyer:{}", kiln_protocol::BuyerId::new(key.public())));
            print(json, &client.statement(&account).await?, |v| {
                let mut out = format!(
                    "{}  balance {} µcr\n",
                    v["account"].as_str().unwrap_or("?"),
                    v["balance"]
                );
                for e in v["entries"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "#{:<6} {:<16} {:>14} µcr  {}\n",
                        e["seq"],
                        e["op"].as_str().unwrap_or(""),
                        e["delta"].as_str().unwrap_or(""),
                        e["key"].as_str().unwrap_or("")
                    ));
                }
                out
            });
        }
        Cmd::Ledger(LedgerCmd::Verify { key }) => {
            match kiln_cli::ledger::verify(&client, key).await? {
                Ok(v) => print(json, &v, |v| {
                    format!(
                        "ledger verified: {} entries, head {}, {} accounts match",
                        v["entries"],
                        v["head"].as_str().unwrap_or("-"),
                        v["accounts"]
                    )
                }),
                Err(e) => anyhow::bail!("ledger verification failed: {e}"),
            }
        }
        Cmd::Devnet {
            providers,
            exit_after_demo,
            port,
        } => {
            let dn = Devnet::start(DevnetOptions {
                providers,
                http_port: port,
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
                    d["job_id"].as_str().unwrap_or("?"),
                    d["state"].as_str().unwrap_or("?"),
                    d["provider"].as_str().unwrap_or("?"),
                    d["output_cid"].as_str().unwrap_or("-"),
                    d["receipt_verified"]
                )
            });
            let ok = demo["state"] == "completed" && demo["receipt_verified"] == true;
            if !exit_after_demo {
                eprintln!(
                    "devnet is up with {providers} providers; the demo workload image is {}.\nIn another terminal:\nexport KILN_COORDINATOR={}",
                    dn.image_id,
                    dn.url()
                );
                tokio::signal::ctrl_c()
                    .await
                    .context("waiting for Ctrl-C")?;
            }
            dn.shutdown().await;
            if !ok {
                anyhow::bail!("the demo job did not complete with a verified receipt");
            }
        }
        Cmd::Offers(OffersCmd::Search { query, sort, limit }) => {
            print(json, &client.offers(&query, &sort, limit).await?, |v| {
                v["offers"]
                    .as_array()
                    .map(|rows| {
                        rows.iter()
                            .map(|r| r.to_string())
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default()
            })
        }
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
            let v = serde_json::to_value(&r)?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(
                out.join("scheduler.json"),
                serde_json::to_string_pretty(&v)?,
            )?;
            print(json, &v, |v| {
                format!(
                    "{} providers, {} jobs: {:.0} placement decisions/s ({} placed), peak RSS {} MiB (report in {})",
                    v["providers"],
                    v["jobs"],
                    v["decisions_per_sec"].as_f64().unwrap_or(0.0),
                    v["placed"],
                    v["peak_rss_bytes"].as_u64().unwrap_or(0) >> 20,
                    out.display()
                )
            });
        }
        Cmd::Bench(BenchCmd::Devnet { jobs, out }) => {
            let r = kiln_cli::bench::devnet(jobs, &out).await?;
            print(json, &r, |r| {
                format!(
                    "kiln devnet median {:.1} ms, docker run --rm median {:.1} ms, ratio {:.2}× (report in {})",
                    r["kiln_devnet"]["median_ms"].as_f64().unwrap_or(0.0),
                    r["docker_run_rm"]["median_ms"].as_f64().unwrap_or(0.0),
                    r["ratio_median"].as_f64().unwrap_or(0.0),
                    out.display()
                )
            });
        }
    }
    Ok(())
}
