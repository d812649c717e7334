//! `kiln bench devnet`: submit-to-completed time of a trivial job through the
//! whole marketplace (REST → scheduler → libp2p offer → sandboxed container →
//! signed receipt → verification → settlement), next to plain
//! `docker run --rm` of the same image and command, in one run.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_protocol::views::JobState;
use serde::Serialize;

use crate::Client;
use crate::devnet::{Devnet, DevnetOptions};

/// Timings of one path, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    pub n: usize,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub min_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: f64,
}

fn stats(mut xs: Vec<f64>) -> Stats {
    xs.sort_by(f64::total_cmp);
    let n = xs.len().max(1);
    let pct = |p: f64| {
        xs.get(((n as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Stats {
        n: xs.len(),
        median_ms: pct(0.5),
        p90_ms: pct(0.9),
        min_ms: xs.first().copied(),
        max_ms: xs.last().copied(),
        mean_ms: xs.iter().sum::<f64>() / n as f64,
    }
}

/// The machine a benchmark ran on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Machine {
    pub cpus: usize,
}

/// `kiln bench devnet`'s report (also written to `devnet.json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DevnetReport {
    pub benchmark: &'static str,
    pub command: String,
    pub job: Vec<String>,
    pub kiln_devnet: Stats,
    pub docker_run_rm: Stats,
    pub ratio_median: f64,
    pub machine: Machine,
}

pub async fn devnet(jobs: usize, out_dir: &Path) -> anyhow::Result<DevnetReport> {
    let dn = Devnet::start(DevnetOptions {
        providers: 1,
        heartbeat: Duration::from_secs(1),
        ..Default::default()
    })
    .await?;
    let client = Client::new(&dn.url(), kiln_protocol::Keypair::generate());
    let args = ["echo", "hello"];
    let mut kiln_ms = Vec::new();
    for i in 0..=jobs {
        let t0 = Instant::now();
        let v = client
            .submit(dn.workload_spec(&args), Some(format!("bench {i}")))
            .await?;
        let id = v.job_id;
        let state = loop {
            let s = client.job(&id).await?.state;
            if s.is_terminal() {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if state != JobState::Completed {
            bail!("benchmark job {id} ended {state}");
        }
        if i > 0 {
            kiln_ms.push(t0.elapsed().as_secs_f64() * 1000.0); // job 0 warms up
        }
    }
    let image = dn.image_id.clone();
    dn.shutdown().await;

    let mut docker_ms = Vec::new();
    for i in 0..=jobs {
        let t0 = Instant::now();
        let out = Command::new("docker")
            .args(["run", "--rm", "--network", "none", &image])
            .args(args)
            .output()
            .context("running `docker run` (is the docker CLI installed?)")?;
        if !out.status.success() {
            bail!(
                "docker run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if i > 0 {
            docker_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let k = stats(kiln_ms);
    let d = stats(docker_ms);
    let ratio = k.median_ms / d.median_ms.max(1e-9);
    let md = format!(
        "# kiln bench devnet\n\n| path | n | median ms | p90 ms |\n|---|---|---|---|\n| kiln devnet (submit→completed) | {} | {:.1} | {:.1} |\n| docker run --rm | {} | {:.1} | {:.1} |\n\nratio (median): **{ratio:.2}×**\n",
        k.n, k.median_ms, k.p90_ms, d.n, d.median_ms, d.p90_ms,
    );
    let report = DevnetReport {
        benchmark: "devnet submit-to-completed vs docker run --rm",
        command: format!("kiln bench devnet --jobs {jobs}"),
        job: args.iter().map(|a| a.to_string()).collect(),
        kiln_devnet: k,
        docker_run_rm: d,
        ratio_median: ratio,
        machine: Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        },
    };
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(
        out_dir.join("devnet.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out_dir.join("devnet.md"), md)?;
    Ok(report)
}
