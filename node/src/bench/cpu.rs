//! CPU benchmarks: a multi-threaded blocked FP64 matrix multiply on
//! nonce-seeded inputs (see [`kiln_protocol::bench`]: its output is exact,
//! so the checksum is recomputable by anyone) and a multi-threaded memory
//! copy.

use std::time::{Duration, Instant};

use kiln_protocol::bench::{Inputs, Precision, Slice};
use kiln_protocol::{CpuBench, Nonce};

/// How much CPU benchmarking to do.
#[derive(Clone, Debug)]
pub struct CpuOptions {
    pub matmul_n: u32,
    pub threads: usize,
    /// The matmul repeats until this much time has passed (at least once).
    pub matmul_budget: Duration,
    /// Bytes per buffer of the copy test.
    pub copy_bytes: usize,
    pub copy_budget: Duration,
    pub samples: u32,
}

impl CpuOptions {
    /// For `kiln-node benchmark` and challenges: about 1.5 s.
    pub fn full(matmul_n: u32, samples: u32) -> Self {
        Self {
            matmul_n,
            threads: threads(),
            matmul_budget: Duration::from_millis(1000),
            copy_bytes: 256 << 20,
            copy_budget: Duration::from_millis(500),
            samples,
        }
    }

    /// For a node's start-up when nothing is cached: about 0.4 s.
    pub fn quick(samples: u32) -> Self {
        Self {
            matmul_n: 256,
            threads: threads(),
            matmul_budget: Duration::from_millis(250),
            copy_bytes: 64 << 20,
            copy_budget: Duration::from_millis(120),
            samples,
        }
    }
}

/// Logical cores available to this process.
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Rows `row0..` of `C = A·B` into `c` (whole rows), i-k-j order with
/// k blocked so a block of B stays in cache.
fn matmul_rows(a: &[f64], b: &[f64], c: &mut [f64], n: usize, row0: usize) {
    const KB: usize = 64;
    c.fill(0.0);
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + KB).min(n);
        for (r, crow) in c.chunks_mut(n).enumerate() {
            let arow = &a[(row0 + r) * n..(row0 + r + 1) * n];
            for k in k0..k1 {
                let aik = arow[k];
                let brow = &b[k * n..(k + 1) * n];
                for (cj, bj) in crow.iter_mut().zip(brow) {
                    *cj += aik * bj;
                }
            }
        }
        k0 = k1;
    }
}

/// `C = A·B` on `threads` threads.
pub fn matmul(a: &[f64], b: &[f64], c: &mut [f64], n: usize, threads: usize) {
    if n == 0 {
        return;
    }
    let rows_per = n.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (t, chunk) in c.chunks_mut(rows_per * n).enumerate() {
            s.spawn(move || matmul_rows(a, b, chunk, n, t * rows_per));
        }
    });
}

/// The inputs of the CPU matmul for `nonce` (values exact in f64).
pub fn inputs(nonce: &Nonce, n: u32) -> (Vec<f64>, Vec<f64>) {
    let inp = Inputs::new(nonce, Precision::Fp64, n);
    let len = u64::from(n) * u64::from(n);
    let a = (0..len).map(|i| inp.value(inp.element(false, i))).collect();
    let b = (0..len).map(|i| inp.value(inp.element(true, i))).collect();
    (a, b)
}

/// The checksum of an FP64 output, its samples and their slices (see
/// [`super::commit`]); the checksum is what
/// [`kiln_protocol::bench::cpu_output_digest`] recomputes.
pub fn commit_f64(nonce: &Nonce, n: u32, samples: u32, c: &[f64]) -> super::Committed {
    super::commit(nonce, Precision::Fp64, n, samples, c, |v, b| {
        b.copy_from_slice(&v.to_le_bytes())
    })
}

/// Multi-threaded copy bandwidth, MB/s counting bytes read plus written.
pub fn copy_bandwidth_mbps(bytes: usize, threads: usize, budget: Duration) -> u64 {
    let bytes = bytes.max(1 << 20);
    let src: Vec<u8> = (0..bytes)
        .map(|i| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    let mut dst = vec![0u8; bytes];
    let per = bytes.div_ceil(threads.max(1));
    let pass = |dst: &mut [u8]| {
        std::thread::scope(|s| {
            for (d, sc) in dst.chunks_mut(per).zip(src.chunks(per)) {
                s.spawn(move || d.copy_from_slice(sc));
            }
        });
    };
    pass(&mut dst); // fault the pages in
    let start = Instant::now();
    let mut reps = 0u64;
    while reps < 2 || start.elapsed() < budget {
        pass(&mut dst);
        reps += 1;
    }
    std::hint::black_box(&dst);
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    (2.0 * bytes as f64 * reps as f64 / secs / 1e6) as u64
}

/// Runs the CPU benchmarks for `nonce`: the figures, and the slices
/// proving their samples.
pub fn run(nonce: &Nonce, model: &str, opts: &CpuOptions) -> (CpuBench, Vec<Slice>) {
    let n = opts.matmul_n as usize;
    let (a, b) = inputs(nonce, opts.matmul_n);
    let mut c = vec![0.0f64; n * n];
    let start = Instant::now();
    let mut reps = 0u64;
    while reps == 0 || start.elapsed() < opts.matmul_budget {
        matmul(&a, &b, &mut c, n, opts.threads);
        reps += 1;
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let flops = 2.0 * (n as f64).powi(3) * reps as f64;
    let (checksum, samples, slices) = commit_f64(nonce, opts.matmul_n, opts.samples, &c);
    let bench = CpuBench {
        model: model.to_string(),
        threads: opts.threads as u32,
        matmul_n: opts.matmul_n,
        matmul_mflops: (flops / secs / 1e6) as u64,
        mem_bandwidth_mbps: copy_bandwidth_mbps(opts.copy_bytes, opts.threads, opts.copy_budget),
        checksum,
        samples,
    };
    (bench, slices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::bench::{committed_positions, cpu_output_digest, verify_sample};

    #[test]
    fn checksum_is_the_exact_recomputation_whatever_the_thread_count() {
        let nonce = Nonce::from_bytes([4; 16]);
        // 72² FP64 elements: 40.5 KiB, three 16 KiB groups of the tree.
        let n = 72;
        let (a, b) = inputs(&nonce, n as u32);
        let want = cpu_output_digest(&nonce, n as u32);
        for threads in [1, 3, 7] {
            let mut c = vec![0.0; n * n];
            matmul(&a, &b, &mut c, n, threads);
            assert_eq!(
                commit_f64(&nonce, n as u32, 4, &c).0,
                want,
                "{threads} threads"
            );
        }
    }

    #[test]
    fn run_measures_and_proves() {
        let nonce = Nonce::from_bytes([6; 16]);
        let opts = CpuOptions {
            matmul_n: 48,
            threads: 2,
            matmul_budget: Duration::from_millis(10),
            copy_bytes: 1 << 20,
            copy_budget: Duration::from_millis(10),
            samples: 5,
        };
        let (r, slices) = run(&nonce, "test cpu", &opts);
        assert!(r.matmul_mflops > 0 && r.mem_bandwidth_mbps > 0);
        assert_eq!(r.checksum, cpu_output_digest(&nonce, 48));
        let at: Vec<(u32, u32)> = r.samples.iter().map(|s| (s.row, s.col)).collect();
        assert_eq!(at, committed_positions(&nonce, &r.checksum, 48, 5));
        let inp = Inputs::new(&nonce, Precision::Fp64, 48);
        assert_eq!(slices.len(), 5);
        for (s, sl) in r.samples.iter().zip(&slices) {
            assert_eq!(inp.exact(s.row, s.col).value(), s.value());
            assert_eq!(
                verify_sample(&r.checksum, Precision::Fp64, 48, s, sl),
                Ok(())
            );
        }
    }
}
