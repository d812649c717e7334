//! # kiln-fuzz
//!
//! Coverage-guided fuzzing of every Kiln decoder that reads bytes from the
//! network or disk, on stable Rust, without `cargo fuzz` or libFuzzer.
//!
//! ## How coverage works on stable
//!
//! `rustc` can run LLVM's SanitizerCoverage pass itself:
//! `-C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=3
//! -C llvm-args=-sanitizer-coverage-inline-8bit-counters` gives every
//! edge of the control-flow graph a byte counter, incremented inline, and
//! reports the counters to `__sanitizer_cov_8bit_counters_init`, which
//! [`sys`] defines. The fuzz binary reads them after each execution. Only
//! the crates that hold decoding logic are instrumented (`fuzz/rustc-sancov`
//! picks them), so "counters hit / total" means something. A plain build
//! (`cargo test`) has no counters; the same engine then mutates blind.
//!
//! ## Reading order
//!
//! [`targets`] (what is fuzzed and which properties are checked; one module
//! per decoder), [`samples`] (the real values seeds are made of),
//! [`engine`] (the loop: corpus, mutation, feedback, findings), [`mutate`]
//! (the mutations), [`sys`] (the unsafe part: counters and the counting
//! allocator), [`rng`].
//!
//! ## Running
//!
//! `fuzz/run <target> [seconds]` (see `fuzz/README.md`); `cargo test -p
//! kiln-fuzz` replays the corpus (`fuzz/corpus/`) and fuzzes every target
//! briefly.

pub mod engine;
pub mod mutate;
pub mod rng;
pub mod samples;
pub mod sys;
pub mod targets;

pub use engine::{Config, Report};
pub use targets::{Target, Verdict};

use std::path::{Path, PathBuf};

/// The crate's own directory (corpus and artifacts live under it).
pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `fuzz/corpus/<target>`.
pub fn corpus_dir(target: &str) -> PathBuf {
    crate_dir().join("corpus").join(target)
}

/// `fuzz/artifacts/<target>` (git-ignored).
pub fn artifacts_dir(target: &str) -> PathBuf {
    crate_dir().join("artifacts").join(target)
}

/// Writes every target's seeds to `<dir>/<target>/<hash>`; returns how
/// many files were written (existing ones are left alone).
pub fn write_seeds(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for t in targets::all() {
        let d = dir.join(t.name);
        std::fs::create_dir_all(&d)?;
        for s in (t.seeds)() {
            let p = d.join(format!("seed-{}", engine::short_hash(&s)));
            if !p.exists() {
                std::fs::write(p, &s)?;
                n += 1;
            }
        }
    }
    Ok(n)
}
