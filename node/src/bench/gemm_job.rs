//! `kiln-node gemm`: a GPU *job*, not a benchmark of the provider. It is the
//! workload of Kiln's GPU image (see `kiln_docker::build_gpu_workload_image`):
//! a buyer's container runs it on the GPU it was given, and the same binary
//! runs on bare metal to compare.
//!
//! It multiplies two seeded `n × n` FP32 matrices with Kiln's PTX kernel
//! (driver API only: no cuBLAS, no toolkit in the image). The inputs are
//! small integers (−8..=8), so every product and partial sum is an integer
//! below 2^24 while `n ≤ 2^24 / 64`: FP32 holds each exactly, the result does
//! not depend on the order of the additions, and the product's BLAKE3 is the
//! same on every GPU. That makes the job deterministic, so it can be spot
//! re-executed on another provider and compared byte for byte.
//!
//! Output: `<out>/gemm.txt` (`n`, `seed`, the product's BLAKE3: the
//! deterministic result) and one JSON line on stdout with the timing
//! (`best_ms`, `gflops`), which varies between runs and so is not an output.

use std::path::Path;

use serde::Serialize;

use super::cuda::{self, Gpu, PtxGemm};

/// Largest `n` for which the integer-valued FP32 product is exact.
pub const MAX_N: u32 = (1 << 24) / 64;

/// What the job prints on stdout (one JSON line).
#[derive(Clone, Debug, Serialize)]
pub struct GemmReport {
    pub n: u32,
    pub seed: u64,
    /// BLAKE3 of the product, row-major little-endian f32 (also in `gemm.txt`).
    pub blake3: String,
    /// Timed multiplications (after one untimed warm-up).
    pub repeats: u32,
    /// The fastest one, from CUDA events around it.
    pub best_ms: f64,
    pub gflops: f64,
    /// Product entries recomputed on the CPU and found equal.
    pub checked: u32,
    pub gpu_uuid: Option<String>,
}

/// Why the job failed; [`GemmError::exit_code`] tells a buyer's script which.
#[derive(Debug, thiserror::Error)]
pub enum GemmError {
    #[error(
        "no CUDA driver here (libcuda.so.1 is not loadable): run this on a machine with an NVIDIA GPU, or as a Kiln job that asks for `gpus = 1` so the provider maps its GPU and driver into the container"
    )]
    NoDriver,
    #[error("n must be between 16 and {MAX_N} (the product stays exact in FP32), not {0}")]
    BadSize(u32),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error(
        "wrong product at C[{row}][{col}]: GPU {gpu}, CPU {cpu}: this GPU computes incorrectly"
    )]
    Wrong {
        row: usize,
        col: usize,
        gpu: f32,
        cpu: f32,
    },
    #[error("writing {path}: {source}")]
    Output {
        path: String,
        source: std::io::Error,
    },
}

impl GemmError {
    /// 2: no GPU or bad arguments (the job was placed wrong or asked
    /// wrong); 1: the GPU computed a wrong product or failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            GemmError::NoDriver | GemmError::BadSize(_) => 2,
            _ => 1,
        }
    }
}

/// SplitMix64: the seeded input generator (also what the CPU check uses).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element `i` of matrix `which` (0 = A, 1 = B): an integer in −8..=8.
pub fn input(seed: u64, which: u64, i: u64) -> f32 {
    let v = mix(seed ^ mix(which.wrapping_add(1)) ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93)) % 17;
    v as f32 - 8.0
}

fn matrix(seed: u64, which: u64, n: usize) -> Vec<f32> {
    (0..(n * n) as u64).map(|i| input(seed, which, i)).collect()
}

/// `C[row][col]` computed on the CPU, exactly (integers in f64).
pub fn cpu_entry(seed: u64, n: usize, row: usize, col: usize) -> f32 {
    let mut s = 0f64;
    for k in 0..n {
        let a = input(seed, 0, (row * n + k) as u64);
        let b = input(seed, 1, (k * n + col) as u64);
        s += f64::from(a) * f64::from(b);
    }
    s as f32
}

/// BLAKE3 of a product, row-major little-endian.
pub fn product_hash(c: &[f32]) -> String {
    let mut h = blake3::Hasher::new();
    for x in c {
        h.update(&x.to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// Runs the job on CUDA device 0 and writes `<out>/gemm.txt`.
pub fn run(n: u32, seed: u64, repeats: u32, out: &Path) -> Result<GemmReport, GemmError> {
    if !(16..=MAX_N).contains(&n) {
        return Err(GemmError::BadSize(n));
    }
    if !cuda::driver_present() {
        return Err(GemmError::NoDriver);
    }
    let cu = |what: &'static str| {
        move |e: cudarc::driver::DriverError| GemmError::Cuda(format!("{what}: {e}"))
    };
    let ns = n as usize;
    let gpu = Gpu::open(0).map_err(cu("opening CUDA device 0"))?;
    let kernel = PtxGemm::load(&gpu).map_err(GemmError::Cuda)?;
    let a = gpu
        .stream
        .clone_htod(&matrix(seed, 0, ns))
        .map_err(cu("upload A"))?;
    let b = gpu
        .stream
        .clone_htod(&matrix(seed, 1, ns))
        .map_err(cu("upload B"))?;
    let mut c = gpu
        .stream
        .alloc_zeros::<f32>(ns * ns)
        .map_err(cu("allocate C"))?;
    let repeats = repeats.max(1);
    let mut gemm = || kernel.launch(ns, &a, &b, &mut c);
    // One untimed call (JIT, first-touch), then each call timed alone.
    super::gpu::time_calls(&gpu, 1, &mut gemm).map_err(GemmError::Cuda)?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        best = best.min(super::gpu::time_calls(&gpu, 1, &mut gemm).map_err(GemmError::Cuda)?);
    }
    let product = gpu.stream.clone_dtoh(&c).map_err(cu("download C"))?;
    // Check entries spread over the whole product (corners, diagonal and
    // seeded positions) against the CPU.
    let mut checked = 0;
    let picks = (0..32u64).map(|i| {
        let r = mix(seed ^ 0xC0FF_EE00 ^ i);
        (
            (r % u64::from(n)) as usize,
            ((r >> 32) % u64::from(n)) as usize,
        )
    });
    for (row, col) in [(0, 0), (ns - 1, ns - 1), (0, ns - 1), (ns - 1, 0)]
        .into_iter()
        .chain(picks)
    {
        let (g, want) = (product[row * ns + col], cpu_entry(seed, ns, row, col));
        if g.to_bits() != want.to_bits() {
            return Err(GemmError::Wrong {
                row,
                col,
                gpu: g,
                cpu: want,
            });
        }
        checked += 1;
    }
    let blake3 = product_hash(&product);
    let path = out.join("gemm.txt");
    std::fs::write(&path, format!("n={n}\nseed={seed}\nblake3={blake3}\n")).map_err(|source| {
        GemmError::Output {
            path: path.display().to_string(),
            source,
        }
    })?;
    let flop = 2.0 * f64::from(n).powi(3);
    Ok(GemmReport {
        n,
        seed,
        blake3,
        repeats,
        best_ms: best,
        gflops: flop / (best * 1e-3) / 1e9,
        checked,
        gpu_uuid: gpu.uuid(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_small_integers_and_seeded() {
        let a: Vec<f32> = (0..1000).map(|i| input(7, 0, i)).collect();
        assert!(
            a.iter()
                .all(|x| x.fract() == 0.0 && (-8.0..=8.0).contains(x))
        );
        assert!(a.iter().any(|&x| x < 0.0) && a.iter().any(|&x| x > 0.0));
        assert_ne!(a, (0..1000).map(|i| input(8, 0, i)).collect::<Vec<_>>());
        assert_ne!(a, (0..1000).map(|i| input(7, 1, i)).collect::<Vec<_>>());
    }

    #[test]
    fn the_cpu_entry_is_the_exact_dot_product() {
        // A 16 × 16 product on the CPU, summed in a different order (f32,
        // reversed k): integers, so it must agree bit for bit.
        let (seed, n) = (3, 16);
        for (row, col) in [(0, 0), (5, 11), (15, 15)] {
            let mut s = 0f32;
            for k in (0..n).rev() {
                s += input(seed, 0, (row * n + k) as u64) * input(seed, 1, (k * n + col) as u64);
            }
            assert_eq!(s.to_bits(), cpu_entry(seed, n, row, col).to_bits());
        }
        // The largest n stays exact: |sum| <= n * 64 < 2^24.
        assert!(u64::from(MAX_N) * 64 <= 1 << 24);
    }

    #[test]
    fn it_runs_where_a_driver_is_and_says_what_to_ask_for_where_none_is() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(run(8, 1, 1, dir.path()).unwrap_err().exit_code(), 2);
        match run(64, 1, 1, dir.path()) {
            Ok(r) => {
                assert!(cuda::driver_present());
                let text = std::fs::read_to_string(dir.path().join("gemm.txt")).unwrap();
                assert!(text.contains(&r.blake3) && r.checked == 36, "{text}");
            }
            Err(e) => {
                assert!(!cuda::driver_present(), "{e}");
                assert_eq!(e.exit_code(), 2);
                assert!(e.to_string().contains("gpus = 1"), "{e}");
                assert!(!dir.path().join("gemm.txt").exists());
            }
        }
    }
}
