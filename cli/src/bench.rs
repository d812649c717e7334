//! `kiln bench devnet`: submit-to-completed time of a trivial job through the
//! whole marketplace (REST → scheduler → libp2p offer → sandboxed container →
//! signed receipt → verification → settlement), next to plain
//! `docker run --rm` of the same image and command, in one run.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::Client;
use crate::devnet::{Devnet, DevnetOptions};

fn stats(mut xs: Vec<f64>) -> Value {
    xs.sort_by(f64::total_cmp);
    let n = xs.len().max(1);
    let pct = |p: f64| {
        xs.get(((n as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    json!({ "n": xs.len(), "median_ms": pct(0.5), "p90_ms": pct(0.9), "min_ms": xs.first(), "max_ms": xs.last(),
            "mean_ms": xs.iter().sum::<f64>() / n as f64 })
}

pub async fn devnet(jobs: usize, out_dir: &Path) -> anyhow::Result<Value> {
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
        let id = crate::job_id_of(&v)?;
        let state = loop {
            let v = client.job(&id).await?;
            let s = v["state"].as_str().unwrap_or("").to_string();
            if crate::is_terminal(&s) {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if state != "completed" {
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
    let ratio =
        k["median_ms"].as_f64().unwrap_or(0.0) / d["median_ms"].as_f64().unwrap_or(1.0).max(1e-9);
    let report = json!({
        "benchmark": "devnet submit-to-completed vs docker run --rm",
        "command": format!("kiln bench devnet --jobs {jobs}"),
        "job": args,
        "kiln_devnet": k,
        "docker_run_rm": d,
        "ratio_median": ratio,
        "machine": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) },
    });
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(
        out_dir.join("devnet.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = format!(
        "# kiln bench devnet\n\n| path | n | median ms | p90 ms |\n|---|---|---|---|\n| kiln devnet (submit→completed) | {} | {:.1} | {:.1} |\n| docker run --rm | {} | {:.1} | {:.1} |\n\nratio (median): **{ratio:.2}×**\n",
        k["n"],
        k["median_ms"].as_f64().unwrap_or(0.0),
        k["p90_ms"].as_f64().unwrap_or(0.0),
        d["n"],
        d["median_ms"].as_f64().unwrap_or(0.0),
        d["p90_ms"].as_f64().unwrap_or(0.0),
    );
    std::fs::write(out_dir.join("devnet.md"), md)?;
    Ok(report)
}
