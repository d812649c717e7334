//! `kiln-fuzz`: list targets, fuzz one, replay inputs, write seeds.
//!
//! Built by `fuzz/run` with coverage instrumentation; it works without it
//! too (blind mutation). Exit status: 0 no finding, 1 findings, 2 usage,
//! 70 a hang, 71 an allocation over the hard limit.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kiln_fuzz::{Config, engine, targets};

#[global_allocator]
static ALLOC: kiln_fuzz::sys::CountingAlloc = kiln_fuzz::sys::CountingAlloc;

#[derive(Parser)]
#[command(
    about = "Coverage-guided fuzzing of Kiln's decoders (stable Rust, SanitizerCoverage counters)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the targets.
    List,
    /// Fuzz one target (or `all`, one after the other).
    Run {
        target: String,
        /// Seconds of fuzzing per target (after the corpus replay).
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Stop after this many mutated executions.
        #[arg(long)]
        runs: Option<u64>,
        /// Parallel workers; only 1 (coverage counters are per process:
        /// run several targets in several processes instead).
        #[arg(long, default_value_t = 1)]
        jobs: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Extra corpus directories to read (besides fuzz/corpus/<target>).
        #[arg(long)]
        corpus: Vec<PathBuf>,
        /// Write inputs that found new coverage here (`<dir>/<target>/`).
        #[arg(long)]
        save_corpus: Option<PathBuf>,
        /// Write the JSON report here (`all`: `<path>` gets `-<target>`).
        #[arg(long)]
        report: Option<PathBuf>,
        /// An execution slower than this many milliseconds is a finding.
        #[arg(long, default_value_t = 1000)]
        slow_ms: u64,
        /// Progress lines every 10 s.
        #[arg(long)]
        verbose: bool,
    },
    /// Run inputs (files or directories) through a target once each.
    Replay {
        target: String,
        inputs: Vec<PathBuf>,
    },
    /// Write every target's seeds into a corpus directory (default
    /// fuzz/corpus).
    Seed { dir: Option<PathBuf> },
}

fn main() -> ExitCode {
    // The counters callbacks must be linked in whatever the link order.
    if !kiln_fuzz::sys::keep_callbacks() {
        return ExitCode::from(2);
    }
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln-fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::List => {
            for t in targets::all() {
                println!("{:<15} {}", t.name, t.about);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Seed { dir } => {
            let dir = dir.unwrap_or_else(|| kiln_fuzz::crate_dir().join("corpus"));
            let n = kiln_fuzz::write_seeds(&dir)
                .with_context(|| format!("writing seeds to {}", dir.display()))?;
            println!("{n} new seed files under {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Replay { target, inputs } => {
            let t = targets::by_name(&target)
                .with_context(|| format!("no target `{target}` (see `kiln-fuzz list`)"))?;
            let mut files = Vec::new();
            for p in inputs {
                if p.is_dir() {
                    files.extend(engine::read_dirs(&[p]));
                } else {
                    files.push(
                        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
                    );
                }
            }
            let mut bad = 0;
            for data in &files {
                let e = engine::execute(t, data);
                println!(
                    "{} bytes: {:?} in {:.3} ms, largest allocation {} bytes",
                    data.len(),
                    e.result,
                    e.elapsed.as_secs_f64() * 1000.0,
                    e.alloc.largest
                );
                bad += usize::from(e.result.is_err());
            }
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Run {
            target,
            seconds,
            runs,
            jobs,
            seed,
            corpus,
            save_corpus,
            report,
            slow_ms,
            verbose,
        } => {
            if jobs != 1 {
                bail!("--jobs {jobs}: only 1 is supported (run targets in separate processes)");
            }
            let chosen = if target == "all" {
                targets::all()
            } else {
                vec![
                    targets::by_name(&target)
                        .with_context(|| format!("no target `{target}` (see `kiln-fuzz list`)"))?,
                ]
            };
            let mut findings = 0;
            for t in chosen {
                let mut cfg = Config::new(kiln_fuzz::artifacts_dir(t.name));
                cfg.seed = seed;
                cfg.time = Duration::from_secs_f64(seconds.max(0.0));
                cfg.max_execs = runs;
                cfg.corpus_dirs = std::iter::once(kiln_fuzz::corpus_dir(t.name))
                    .chain(corpus.iter().cloned())
                    .chain(save_corpus.iter().map(|d| d.join(t.name)))
                    .collect();
                cfg.save_corpus = save_corpus.as_ref().map(|d| d.join(t.name));
                cfg.slow = Duration::from_millis(slow_ms);
                cfg.verbose = verbose;
                let r = engine::run(t, &cfg);
                findings += r.findings.len();
                let json = serde_json::to_string_pretty(&r)?;
                println!("{json}");
                if let Some(path) = &report {
                    let path = if target == "all" {
                        let mut p = path.clone().into_os_string();
                        p.push(format!("-{}", t.name));
                        PathBuf::from(p)
                    } else {
                        path.clone()
                    };
                    std::fs::write(&path, json)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                eprintln!(
                    "{}: {} executions in {:.0} s ({:.0}/s), coverage {}/{} counters, corpus {} (+{}), {} findings, {} notes",
                    t.name,
                    r.executions,
                    r.seconds,
                    r.execs_per_sec,
                    r.coverage.counters_hit,
                    r.coverage.counters_total,
                    r.corpus_size,
                    r.corpus_new,
                    r.findings.len(),
                    r.notes.len()
                );
            }
            Ok(if findings == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
