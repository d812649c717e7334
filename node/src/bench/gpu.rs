//! GPU benchmarks through the CUDA driver API (cudarc, loaded at run time):
//! dense matmul throughput in BF16, FP16 and FP32 (cuBLAS, or Kiln's PTX
//! kernel for FP32 where cuBLAS is missing), device copy bandwidth, and
//! pinned host↔device bandwidth.
//!
//! Timing (the same procedure as `node/bench/reference.py`): one call, then
//! warm-up calls for at least [`WARMUP`] (3 at least), then three trials of
//! `max(5, ⌈TRIAL / t⌉)` calls each (t = mean warm-up call), each trial
//! timed with CUDA events around the calls on one stream; the best trial is
//! reported.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use cudarc::driver::CudaSlice;
use cudarc::driver::sys::CUevent_flags;
use kiln_protocol::bench::{
    Inputs, MatmulProof, Precision, Slice, f32_to_bf16_exact, f32_to_f16_exact,
};
use kiln_protocol::{GemmEngine, GpuBench, Nonce};
use serde::{Deserialize, Serialize};

use super::cuda::{self, Blas, Gpu, PtxGemm};
use crate::gpu::GpuFacts;

pub const WARMUP: Duration = Duration::from_millis(250);
pub const TRIAL: Duration = Duration::from_millis(250);
pub const TRIALS: u32 = 3;

/// Which matmul code to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// cuBLAS when it can be loaded, else the driver kernel.
    Auto,
    /// cuBLAS only (fails where it is missing).
    Cublas,
    /// Kiln's PTX kernel through the driver API only (FP32).
    Driver,
}

/// What to measure on each GPU.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    pub matmul_n: u32,
    pub engine: EngineChoice,
    pub copy_bytes: u64,
    pub samples: u32,
    /// Answering a challenge: each product is computed once and copies are
    /// not measured. The coordinator credits the work of the checked
    /// products over the round trip it times itself, so repeated timing
    /// runs here would only make an honest GPU look slower.
    pub prompt: bool,
}

/// The outcome of benchmarking every GPU.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GpuOutcome {
    pub benches: Vec<GpuBench>,
    /// The slices proving each bench's samples: `slices[i][j]` those of
    /// `benches[i].proofs[j]`.
    pub slices: Vec<Vec<Vec<Slice>>>,
    /// What went wrong or was chosen, one line each (never fatal).
    pub notes: Vec<String>,
    /// The cuBLAS library used, if any.
    pub cublas_library: Option<String>,
}

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Times `iters` calls of `f` on the GPU's stream, in milliseconds.
pub(crate) fn time_calls(
    gpu: &Gpu,
    iters: u32,
    f: &mut dyn FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    let start = gpu
        .ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(err("cuEventCreate"))?;
    let end = gpu
        .ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(err("cuEventCreate"))?;
    start.record(&gpu.stream).map_err(err("cuEventRecord"))?;
    for _ in 0..iters {
        f()?;
    }
    end.record(&gpu.stream).map_err(err("cuEventRecord"))?;
    end.synchronize().map_err(err("cuEventSynchronize"))?;
    let ms = start.elapsed_ms(&end).map_err(err("cuEventElapsedTime"))?;
    Ok(f64::from(ms).max(1e-6))
}

/// The timing procedure of the module docs: `(iterations, best ms per call)`.
fn measure(gpu: &Gpu, f: &mut dyn FnMut() -> Result<(), String>) -> Result<(u32, f64), String> {
    let first = time_calls(gpu, 1, f)?;
    let warm = ((WARMUP.as_secs_f64() * 1e3 / first).ceil() as u32).clamp(3, 2000);
    let per = time_calls(gpu, warm, f)? / f64::from(warm);
    let iters = ((TRIAL.as_secs_f64() * 1e3 / per).ceil() as u32).clamp(5, 5000);
    let mut best = f64::INFINITY;
    for _ in 0..TRIALS {
        best = best.min(time_calls(gpu, iters, f)? / f64::from(iters));
    }
    Ok((iters, best))
}

/// Fills a host vector with generated inputs on all cores.
fn generate<T: Send + Default + Clone>(
    inputs: &Inputs,
    which_b: bool,
    convert: impl Fn(i32) -> T + Sync,
) -> Vec<T> {
    let len = (inputs.n as usize) * (inputs.n as usize);
    let mut out = vec![T::default(); len];
    let threads = super::cpu::threads();
    let per = len.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(per).enumerate() {
            let convert = &convert;
            s.spawn(move || {
                let base = (t * per) as u64;
                for (i, v) in chunk.iter_mut().enumerate() {
                    *v = convert(inputs.element(which_b, base + i as u64));
                }
            });
        }
    });
    out
}

/// Builds the proof of one output (its commitment and the samples it
/// selects, with their slices: see [`super::commit`]) and checks the
/// samples against the exact result, so a wrong kernel reports an error
/// rather than a wrong proof. `le` writes one element's little-endian bytes.
fn prove<T: Copy + Sync>(
    nonce: &Nonce,
    inputs: &Inputs,
    iterations: u32,
    samples: u32,
    out: &[T],
    le: impl Fn(T, &mut [u8]) + Sync,
) -> Result<(MatmulProof, Vec<Slice>), String> {
    let (n, p) = (inputs.n, inputs.precision);
    let (checksum, picked, slices) = super::commit(nonce, p, n, samples, out, le);
    for s in &picked {
        let (r, c, v) = (s.row, s.col, s.value());
        let exact = inputs.exact(r, c);
        if !exact.accepts(p, n, v) {
            return Err(format!(
                "{p} result failed its self-check: C[{r}][{c}] = {v}, exact {} ± {}",
                exact.value(),
                exact.tolerance(p, n)
            ));
        }
    }
    let proof = MatmulProof {
        precision: p,
        iterations,
        checksum,
        samples: picked,
    };
    Ok((proof, slices))
}

fn gflops(n: u32, ms_per_call: f64) -> u64 {
    let flops = 2.0 * f64::from(n).powi(3);
    (flops / (ms_per_call / 1e3) / 1e9) as u64
}

fn half_input(p: Precision, inputs: &Inputs) -> impl Fn(i32) -> u16 + Sync + '_ {
    move |k| {
        let v = inputs.value(k) as f32;
        match p {
            Precision::Bf16 => f32_to_bf16_exact(v).unwrap_or(0),
            _ => f32_to_f16_exact(v).unwrap_or(0),
        }
    }
}

/// A measured product: GFLOP/s, its proof and the proof's slices.
type Measured = (u64, (MatmulProof, Vec<Slice>));

/// One half-precision matmul on cuBLAS.
fn cublas_half(
    gpu: &Gpu,
    blas: &Blas,
    nonce: &Nonce,
    p: Precision,
    opts: &GpuOptions,
) -> Result<Measured, String> {
    let n = opts.matmul_n;
    let inputs = Inputs::new(nonce, p, n);
    let a = gpu
        .stream
        .clone_htod(&generate(&inputs, false, half_input(p, &inputs)))
        .map_err(err("upload A"))?;
    let b = gpu
        .stream
        .clone_htod(&generate(&inputs, true, half_input(p, &inputs)))
        .map_err(err("upload B"))?;
    let mut c = gpu
        .stream
        .alloc_zeros::<u16>(a.len())
        .map_err(err("allocate C"))?;
    let mut gemm = || blas.gemm_half(p, n as usize, &a, &b, &mut c);
    let (iters, ms) = if opts.prompt {
        (1, time_calls(gpu, 1, &mut gemm)?)
    } else {
        measure(gpu, &mut gemm)?
    };
    let out = gpu.stream.clone_dtoh(&c).map_err(err("download C"))?;
    let proof = prove(nonce, &inputs, iters, opts.samples, &out, |x: u16, b| {
        b.copy_from_slice(&x.to_le_bytes())
    })?;
    Ok((gflops(n, ms), proof))
}

/// `C = A·B` on FP32 device buffers.
type Fp32Gemm<'a> =
    dyn Fn(&CudaSlice<f32>, &CudaSlice<f32>, &mut CudaSlice<f32>) -> Result<(), String> + 'a;

/// The FP32 matmul, on cuBLAS or on the PTX kernel.
fn fp32(
    gpu: &Gpu,
    nonce: &Nonce,
    opts: &GpuOptions,
    run: &Fp32Gemm<'_>,
) -> Result<Measured, String> {
    let n = opts.matmul_n;
    let inputs = Inputs::new(nonce, Precision::Fp32, n);
    let conv = |k: i32| inputs.value(k) as f32;
    let a = gpu
        .stream
        .clone_htod(&generate(&inputs, false, conv))
        .map_err(err("upload A"))?;
    let b = gpu
        .stream
        .clone_htod(&generate(&inputs, true, conv))
        .map_err(err("upload B"))?;
    let mut c = gpu
        .stream
        .alloc_zeros::<f32>(a.len())
        .map_err(err("allocate C"))?;
    let mut gemm = || run(&a, &b, &mut c);
    let (iters, ms) = if opts.prompt {
        (1, time_calls(gpu, 1, &mut gemm)?)
    } else {
        measure(gpu, &mut gemm)?
    };
    let out = gpu.stream.clone_dtoh(&c).map_err(err("download C"))?;
    let proof = prove(nonce, &inputs, iters, opts.samples, &out, |x: f32, b| {
        b.copy_from_slice(&x.to_le_bytes())
    })?;
    Ok((gflops(n, ms), proof))
}

/// Copy bandwidths `(d2d, h2d pinned, d2h pinned)` in MB/s.
fn copies(gpu: &Gpu, bytes: u64) -> Result<(u64, u64, u64), String> {
    let len = usize::try_from(bytes).map_err(|_| "copy size too large".to_string())?;
    let s = &gpu.stream;
    let src = s
        .alloc_zeros::<u8>(len)
        .map_err(err("allocate copy source"))?;
    let mut dst = s
        .alloc_zeros::<u8>(len)
        .map_err(err("allocate copy target"))?;
    let mbps = |moved: f64, ms: f64| (moved / (ms / 1e3) / 1e6) as u64;
    let (_, ms) = measure(gpu, &mut || {
        s.memcpy_dtod(&src, &mut dst).map_err(err("cuMemcpyDtoD"))
    })?;
    let d2d = mbps(2.0 * bytes as f64, ms);
    let mut pinned = gpu.pinned_zeroed(len).map_err(err("cuMemHostAlloc"))?;
    let (_, ms) = measure(gpu, &mut || {
        s.memcpy_htod(&pinned, &mut dst)
            .map_err(err("cuMemcpyHtoD"))
    })?;
    let h2d = mbps(bytes as f64, ms);
    let (_, ms) = measure(gpu, &mut || {
        s.memcpy_dtoh(&src, &mut pinned)
            .map_err(err("cuMemcpyDtoH"))
    })?;
    let d2h = mbps(bytes as f64, ms);
    Ok((d2d, h2d, d2h))
}

/// Benchmarks one opened GPU with one engine.
fn bench_one(
    gpu: &Gpu,
    ordinal: usize,
    facts: Option<&GpuFacts>,
    nonce: &Nonce,
    engine: GemmEngine,
    opts: &GpuOptions,
) -> Result<(GpuBench, Vec<Vec<Slice>>), String> {
    let n = opts.matmul_n as usize;
    let mut slices = Vec::new();
    let mut bench = GpuBench {
        index: facts.map(|f| f.index).unwrap_or(ordinal as u32),
        uuid: facts
            .map(|f| f.uuid.clone())
            .or_else(|| gpu.uuid())
            .unwrap_or_default(),
        name: facts
            .map(|f| f.name.clone())
            .or_else(|| gpu.ctx.name().ok())
            .unwrap_or_default(),
        engine,
        matmul_n: opts.matmul_n,
        bf16_gflops: 0,
        fp16_gflops: 0,
        fp32_gflops: 0,
        copy_bytes: opts.copy_bytes,
        d2d_mbps: 0,
        h2d_pinned_mbps: 0,
        d2h_pinned_mbps: 0,
        proofs: Vec::new(),
    };
    match engine {
        GemmEngine::Cublas => {
            let blas = Blas::new(gpu)?;
            for p in [Precision::Bf16, Precision::Fp16] {
                let (g, (proof, s)) = cublas_half(gpu, &blas, nonce, p, opts)?;
                match p {
                    Precision::Bf16 => bench.bf16_gflops = g,
                    _ => bench.fp16_gflops = g,
                }
                bench.proofs.push(proof);
                slices.push(s);
            }
            let (g, (proof, s)) = fp32(gpu, nonce, opts, &|a, b, c| blas.sgemm(n, a, b, c))?;
            bench.fp32_gflops = g;
            bench.proofs.push(proof);
            slices.push(s);
        }
        GemmEngine::DriverKernel => {
            let kernel = PtxGemm::load(gpu)?;
            let (g, (proof, s)) = fp32(gpu, nonce, opts, &|a, b, c| kernel.launch(n, a, b, c))?;
            bench.fp32_gflops = g;
            bench.proofs.push(proof);
            slices.push(s);
        }
    }
    if !opts.prompt {
        let (d2d, h2d, d2h) = copies(gpu, opts.copy_bytes)?;
        bench.d2d_mbps = d2d;
        bench.h2d_pinned_mbps = h2d;
        bench.d2h_pinned_mbps = d2h;
    }
    gpu.stream
        .synchronize()
        .map_err(err("cuStreamSynchronize"))?;
    Ok((bench, slices))
}

fn run_inner(nonce: &Nonce, facts: &[GpuFacts], opts: &GpuOptions) -> GpuOutcome {
    let mut out = GpuOutcome::default();
    let count = match cuda::device_count() {
        Ok(0) => {
            out.notes.push("the CUDA driver reports no GPU".into());
            return out;
        }
        Ok(n) => n,
        Err(e) => {
            out.notes.push(e);
            return out;
        }
    };
    let engine = match opts.engine {
        EngineChoice::Driver => Ok(GemmEngine::DriverKernel),
        EngineChoice::Cublas => cuda::cublas().map(|_| GemmEngine::Cublas),
        EngineChoice::Auto => Ok(match cuda::cublas() {
            Ok(_) => GemmEngine::Cublas,
            Err(why) => {
                out.notes
                    .push(format!("using the driver-only FP32 kernel: {why}"));
                GemmEngine::DriverKernel
            }
        }),
    };
    let engine = match engine {
        Ok(e) => e,
        Err(why) => {
            out.notes.push(why.to_string());
            return out;
        }
    };
    if engine == GemmEngine::Cublas {
        out.cublas_library = cuda::cublas()
            .ok()
            .map(|l| format!("{} ({})", l.path, l.how));
    }
    for ordinal in 0..count {
        let gpu = match Gpu::open(ordinal) {
            Ok(g) => g,
            Err(e) => {
                out.notes
                    .push(format!("CUDA device {ordinal} could not be opened: {e}"));
                continue;
            }
        };
        let uuid = gpu.uuid();
        let f = facts.iter().find(|f| Some(&f.uuid) == uuid.as_ref());
        match bench_one(&gpu, ordinal, f, nonce, engine, opts) {
            Ok((b, s)) => {
                out.benches.push(b);
                out.slices.push(s);
            }
            Err(e) => out.notes.push(format!(
                "GPU benchmark on CUDA device {ordinal} failed: {e}"
            )),
        }
    }
    out
}

/// Benchmarks every CUDA device. Never panics: a missing driver or library,
/// a CUDA error, or a panic inside cudarc becomes a note.
pub fn run(nonce: &Nonce, facts: &[GpuFacts], opts: &GpuOptions) -> GpuOutcome {
    if !cuda::driver_present() {
        return GpuOutcome {
            notes: vec![
                "the CUDA driver library (libcuda.so.1) is not installed: no GPU benchmark".into(),
            ],
            ..GpuOutcome::default()
        };
    }
    let (nonce, facts, opts) = (*nonce, facts.to_vec(), opts.clone());
    let joined = std::thread::Builder::new()
        .name("kiln-gpu-bench".into())
        .spawn(move || {
            std::panic::catch_unwind(AssertUnwindSafe(|| run_inner(&nonce, &facts, &opts)))
        })
        .map_err(|e| e.to_string())
        .and_then(|h| {
            h.join()
                .map_err(|_| "the benchmark thread died".to_string())
        });
    match joined {
        Ok(Ok(out)) => out,
        Ok(Err(panic)) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            GpuOutcome {
                notes: vec![format!(
                    "the GPU benchmark panicked inside the CUDA bindings: {why}"
                )],
                ..GpuOutcome::default()
            }
        }
        Err(e) => GpuOutcome {
            notes: vec![format!("the GPU benchmark could not run: {e}")],
            ..GpuOutcome::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::bench::{bf16_to_f32, f16_to_f32};

    #[test]
    fn host_inputs_are_the_protocol_inputs() {
        let nonce = Nonce::from_bytes([2; 16]);
        let inp = Inputs::new(&nonce, Precision::Bf16, 32);
        let a = generate(&inp, false, half_input(Precision::Bf16, &inp));
        for (i, &bits) in a.iter().enumerate() {
            assert_eq!(
                f64::from(bf16_to_f32(bits)),
                inp.value(inp.element(false, i as u64))
            );
        }
        let inp = Inputs::new(&nonce, Precision::Fp16, 32);
        let b = generate(&inp, true, half_input(Precision::Fp16, &inp));
        for (i, &bits) in b.iter().enumerate() {
            assert_eq!(
                f64::from(f16_to_f32(bits)),
                inp.value(inp.element(true, i as u64))
            );
        }
    }

    #[test]
    fn proofs_check_themselves() {
        use kiln_protocol::bench::{committed_positions, verify_sample};
        // A CPU stand-in for a GPU output: exact values rounded to f32 pass
        // and are proven against the checksum; a corrupted output fails
        // the self-check wherever the samples fall.
        let nonce = Nonce::from_bytes([8; 16]);
        let n = 80u32;
        let inp = Inputs::new(&nonce, Precision::Fp32, n);
        let mut out: Vec<f32> = (0..n * n)
            .map(|i| inp.exact(i / n, i % n).value() as f32)
            .collect();
        let le = |x: f32, b: &mut [u8]| b.copy_from_slice(&x.to_le_bytes());
        let (proof, slices) = prove(&nonce, &inp, 5, 4, &out, le).unwrap();
        let at: Vec<(u32, u32)> = proof.samples.iter().map(|s| (s.row, s.col)).collect();
        assert_eq!(at, committed_positions(&nonce, &proof.checksum, n, 4));
        assert_eq!(slices.len(), 4);
        for (s, sl) in proof.samples.iter().zip(&slices) {
            assert_eq!(
                verify_sample(&proof.checksum, Precision::Fp32, n, s, sl),
                Ok(())
            );
        }
        out.iter_mut().for_each(|x| *x += 1.0);
        let err = prove(&nonce, &inp, 5, 4, &out, le).unwrap_err();
        assert!(err.contains("failed its self-check"), "{err}");
    }

    #[test]
    fn no_driver_no_panic() {
        let out = run(
            &Nonce::from_bytes([1; 16]),
            &[],
            &GpuOptions {
                matmul_n: 64,
                engine: EngineChoice::Auto,
                copy_bytes: 1 << 20,
                samples: 2,
                prompt: false,
            },
        );
        if !cuda::driver_present() {
            assert!(out.benches.is_empty());
            assert!(out.notes[0].contains("libcuda"), "{:?}", out.notes);
        }
    }

    #[test]
    fn throughput_arithmetic() {
        // 8192³ · 2 flops in 1.4 ms ≈ 785 TFLOP/s.
        assert_eq!(gflops(8192, 1.4) / 1000, 785);
    }
}
