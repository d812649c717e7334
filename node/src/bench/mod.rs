//! `kiln-node benchmark`, the start-up benchmark and challenge answers.
//!
//! [`run`] measures the CPU ([`cpu`]) and every GPU ([`gpu`], through
//! [`cuda`]) on inputs seeded by a nonce and returns a [`ProvenReport`]:
//! a [`BenchmarkReport`] whose proofs commit to each whole output, with the
//! slices proving the sampled elements part of it, which a coordinator can
//! check (see [`kiln_protocol::bench`]). Reports are cached in
//! `<state dir>/benchmark.json`, keyed by [`BENCHMARK_VERSION`] and the
//! hardware identity, so a node restart does not re-measure; adverts carry
//! the report without slices ([`startup_report`]).

pub mod cpu;
pub mod cuda;
pub mod gemm_job;
pub mod gpu;

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_protocol::bench::{
    ChallengeSizes, Digest32, OutputTree, Precision, ProvenReport, Sample, SampleSlices, Slice,
    output_len, prove_samples,
};
use kiln_protocol::{BENCHMARK_VERSION, BenchmarkReport, Nonce, UnixMillis};
use serde::{Deserialize, Serialize};

pub use gpu::EngineChoice;

use crate::gpu::{Discovery, GpuFacts};

/// What one benchmark run measures.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub nonce: Nonce,
    pub cpu: cpu::CpuOptions,
    /// `None`: no GPU benchmark.
    pub gpu: Option<gpu::GpuOptions>,
}

/// Default GPU matmul size (the acceptance comparison uses the same).
pub const DEFAULT_GPU_N: u32 = 8192;
/// Default CPU matmul size for `kiln-node benchmark`.
pub const DEFAULT_CPU_N: u32 = 512;
/// Default sampled elements per proof.
pub const DEFAULT_SAMPLES: u32 = 16;
/// Default bytes per copy in the GPU bandwidth tests.
pub const DEFAULT_COPY_BYTES: u64 = 1 << 30;

impl BenchOptions {
    /// What `kiln-node benchmark` measures by default.
    pub fn full(nonce: Nonce, with_gpus: bool) -> Self {
        Self {
            nonce,
            cpu: cpu::CpuOptions::full(DEFAULT_CPU_N, DEFAULT_SAMPLES),
            gpu: with_gpus.then_some(gpu::GpuOptions {
                matmul_n: DEFAULT_GPU_N,
                engine: EngineChoice::Auto,
                copy_bytes: DEFAULT_COPY_BYTES,
                samples: DEFAULT_SAMPLES,
                prompt: false,
            }),
        }
    }

    /// A node's start-up without a cache: a quick CPU figure, and the full
    /// GPU benchmark only where GPUs exist.
    pub fn startup(nonce: Nonce, with_gpus: bool) -> Self {
        Self {
            cpu: cpu::CpuOptions::quick(DEFAULT_SAMPLES),
            ..Self::full(nonce, with_gpus)
        }
    }

    /// What a challenge asks for.
    pub fn for_challenge(nonce: Nonce, sizes: &ChallengeSizes, with_gpus: bool) -> Self {
        Self {
            nonce,
            cpu: cpu::CpuOptions::full(sizes.cpu_matmul_n, sizes.samples),
            gpu: with_gpus.then_some(gpu::GpuOptions {
                matmul_n: sizes.gpu_matmul_n,
                engine: EngineChoice::Auto,
                copy_bytes: sizes.copy_bytes,
                samples: sizes.samples,
                // The coordinator times the round trip: compute each checked
                // product once and answer.
                prompt: true,
            }),
        }
    }
}

/// What `kiln-node benchmark --json` prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchOutput {
    pub report: ProvenReport,
    /// The cache key: CPU model, cores, GPU UUIDs, driver.
    pub hardware: String,
    pub gpus: Vec<GpuFacts>,
    pub cublas_library: Option<String>,
    /// Why a GPU was not measured, which engine was chosen, … (one line each).
    pub notes: Vec<String>,
    pub elapsed_ms: u64,
}

/// The identity a cached report is valid for.
pub fn hardware_identity(discovery: &Discovery, cpu_model: &str, threads: usize) -> String {
    let gpus: Vec<&str> = discovery.gpus.iter().map(|g| g.uuid.as_str()).collect();
    format!(
        "cpu={cpu_model};threads={threads};gpus={};driver={};node={}",
        gpus.join(","),
        discovery.driver_version.as_deref().unwrap_or("none"),
        env!("CARGO_PKG_VERSION"),
    )
}

/// Runs the benchmarks. Blocking; never panics (GPU failures become notes).
/// The report comes with the slices proving its samples (a challenge's
/// answer); an advert carries the report alone.
pub fn run(opts: &BenchOptions, discovery: &Discovery, cpu_model: &str) -> BenchOutput {
    let started = Instant::now();
    let mut notes = Vec::new();
    if let Some(e) = &discovery.error {
        if discovery.nvml_present() {
            notes.push(e.clone());
        } else {
            notes.push(format!(
                "{e}: running CPU-only. To offer GPUs, {}",
                crate::gpu::NVML_FIX
            ));
        }
    }
    let (cpu, cpu_slices) = cpu::run(&opts.nonce, cpu_model, &opts.cpu);
    let gpu_out = match &opts.gpu {
        Some(g) => gpu::run(&opts.nonce, &discovery.gpus, g),
        None => gpu::GpuOutcome::default(),
    };
    notes.extend(gpu_out.notes);
    let samples = opts
        .gpu
        .as_ref()
        .map(|g| g.samples)
        .unwrap_or(opts.cpu.samples);
    BenchOutput {
        report: ProvenReport {
            report: BenchmarkReport {
                version: BENCHMARK_VERSION,
                nonce: opts.nonce,
                samples: samples.max(opts.cpu.samples),
                cpu,
                gpus: gpu_out.benches,
                measured_at: UnixMillis::now(),
            },
            slices: SampleSlices {
                cpu: cpu_slices,
                gpus: gpu_out.slices,
            },
        },
        hardware: hardware_identity(discovery, cpu_model, opts.cpu.threads),
        gpus: discovery.gpus.clone(),
        cublas_library: gpu_out.cublas_library,
        notes,
        elapsed_ms: started.elapsed().as_millis() as u64,
    }
}

/// An output's checksum, the samples it selects and their slices.
pub(crate) type Committed = (Digest32, Vec<Sample>, Vec<Slice>);

/// Commits to an `n × n` output (its BLAKE3 tree, hashed on all cores:
/// the root is the checksum) and proves the samples the commitment selects
/// (see [`kiln_protocol::bench`]). `le` writes one element's little-endian
/// bytes. Costs about what hashing the output for its checksum alone did.
pub(crate) fn commit<T: Copy + Sync>(
    nonce: &Nonce,
    precision: Precision,
    n: u32,
    samples: u32,
    out: &[T],
    le: impl Fn(T, &mut [u8]) + Sync,
) -> Committed {
    let size = precision.output_bytes();
    // Every read starts and ends on an element boundary: groups, chunks
    // and elements are all multiples of the element size.
    let read = |at: u64, buf: &mut [u8]| {
        let first = usize::try_from(at).unwrap_or(usize::MAX) / size;
        let elems = out.get(first..).unwrap_or_default();
        for (dst, &v) in buf.chunks_exact_mut(size).zip(elems) {
            le(v, dst);
        }
    };
    let tree = OutputTree::build(output_len(precision, n), cpu::threads(), &read);
    let (proven, slices) = prove_samples(nonce, precision, n, samples, &tree, &read);
    (tree.root(), proven, slices)
}

/// The cache file's contents.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheFile {
    pub benchmark_version: u32,
    pub hardware: String,
    pub report: ProvenReport,
}

pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join("benchmark.json")
}

/// The cached report, if it was measured by this benchmark version on this
/// hardware (and has GPU figures where GPUs exist).
pub fn load_cache(state_dir: &Path, hardware: &str, gpus: usize) -> Option<ProvenReport> {
    let bytes = std::fs::read(cache_path(state_dir)).ok()?;
    let c: CacheFile = serde_json::from_slice(&bytes).ok()?;
    (c.benchmark_version == BENCHMARK_VERSION
        && c.report.version == BENCHMARK_VERSION
        && c.hardware == hardware
        && c.report.gpus.len() >= gpus)
        .then_some(c.report)
}

/// Writes the cache atomically (temp file + rename).
pub fn save_cache(state_dir: &Path, hardware: &str, report: &ProvenReport) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let c = CacheFile {
        benchmark_version: BENCHMARK_VERSION,
        hardware: hardware.to_string(),
        report: report.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&c).map_err(std::io::Error::other)?;
    let tmp = state_dir.join(".benchmark.json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, cache_path(state_dir))
}

fn rate(v: u64, unit: &str) -> String {
    format!("{:.1} {unit}", v as f64 / 1000.0)
}

/// The human-readable form of a benchmark.
pub fn render(out: &BenchOutput) -> String {
    let r = &out.report;
    let mut s = format!(
        "Kiln benchmark v{} (nonce {}), {:.1} s\n",
        r.version,
        r.nonce,
        out.elapsed_ms as f64 / 1000.0
    );
    s += &format!(
        "CPU  {} ({} threads): FP64 matmul {} (n={}), memory copy {}\n",
        r.cpu.model,
        r.cpu.threads,
        rate(r.cpu.matmul_mflops, "GFLOP/s"),
        r.cpu.matmul_n,
        rate(r.cpu.mem_bandwidth_mbps, "GB/s"),
    );
    for g in &r.gpus {
        s += &format!(
            "GPU {} {} ({}), {:?}, n={}:\n  BF16 {}  FP16 {}  FP32 {}\n  device copy {}, pinned host→device {}, device→host {}\n",
            g.index,
            g.name,
            g.uuid,
            g.engine,
            g.matmul_n,
            rate(g.bf16_gflops, "TFLOP/s"),
            rate(g.fp16_gflops, "TFLOP/s"),
            rate(g.fp32_gflops, "TFLOP/s"),
            rate(g.d2d_mbps, "GB/s"),
            rate(g.h2d_pinned_mbps, "GB/s"),
            rate(g.d2h_pinned_mbps, "GB/s"),
        );
    }
    if let Some(l) = &out.cublas_library {
        s += &format!("cuBLAS: {l}\n");
    }
    for n in &out.notes {
        s += &format!("note: {n}\n");
    }
    s
}

/// A start-up benchmark for `kiln-node run`: the cache if valid, else a
/// measurement (quick on the CPU; full on GPUs, which exist only where the
/// driver does), which is then cached. Returned as an advert carries it:
/// without slices (see [`ProvenReport`]).
pub fn startup_report(state_dir: &Path, discovery: &Discovery, cpu_model: &str) -> BenchmarkReport {
    let threads = cpu::threads();
    let hardware = hardware_identity(discovery, cpu_model, threads);
    if let Some(r) = load_cache(state_dir, &hardware, discovery.gpus.len()) {
        tracing::info!(
            "using the cached benchmark ({})",
            cache_path(state_dir).display()
        );
        return r.report;
    }
    let with_gpus = !discovery.gpus.is_empty();
    let t = Instant::now();
    let out = run(
        &BenchOptions::startup(Nonce::random(), with_gpus),
        discovery,
        cpu_model,
    );
    for n in &out.notes {
        tracing::info!("benchmark: {n}");
    }
    tracing::info!(
        cpu_mflops = out.report.cpu.matmul_mflops,
        gpus = out.report.gpus.len(),
        took = ?t.elapsed(),
        "benchmarked this machine"
    );
    if let Err(e) = save_cache(state_dir, &out.hardware, &out.report) {
        tracing::warn!("could not cache the benchmark: {e}");
    }
    out.report.report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn no_gpus() -> Discovery {
        Discovery {
            nvml_version: None,
            driver_version: None,
            cuda_driver_version: None,
            gpus: Vec::new(),
            error: Some("NVML is not available".into()),
        }
    }

    #[test]
    fn cache_round_trip_and_invalidation() {
        let dir = tempfile::tempdir().unwrap();
        let d = no_gpus();
        let mut opts = BenchOptions::startup(Nonce::from_bytes([1; 16]), false);
        opts.cpu.matmul_n = 32;
        opts.cpu.matmul_budget = Duration::from_millis(5);
        opts.cpu.copy_budget = Duration::from_millis(5);
        opts.cpu.copy_bytes = 1 << 20;
        let out = run(&opts, &d, "cpu");
        assert!(out.report.gpus.is_empty());
        assert!(out.notes.iter().any(|n| n.contains("NVML")));
        save_cache(dir.path(), &out.hardware, &out.report).unwrap();
        assert_eq!(
            load_cache(dir.path(), &out.hardware, 0),
            Some(out.report.clone())
        );
        assert_eq!(load_cache(dir.path(), "other hardware", 0), None);
        assert_eq!(
            load_cache(dir.path(), &out.hardware, 1),
            None,
            "GPUs appeared"
        );
        std::fs::write(cache_path(dir.path()), b"{garbage").unwrap();
        assert_eq!(load_cache(dir.path(), &out.hardware, 0), None);
        assert!(render(&out).contains("FP64 matmul"));
    }

    #[test]
    fn startup_benchmark_is_quick_on_a_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let r = startup_report(dir.path(), &no_gpus(), "cpu");
        assert!(r.cpu.matmul_mflops > 0);
        // Debug builds are slower than release; the budget-bound loops keep
        // this near 0.4 s either way.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let again = startup_report(dir.path(), &no_gpus(), "cpu");
        assert_eq!(again, r, "second start uses the cache");
    }
}
