//! Benchmarks and capability challenges: the figures a provider advertises,
//! the challenge a coordinator sends to check them, and the deterministic
//! input generator both sides share.
//!
//! # Inputs
//!
//! Every benchmark multiplies two `n × n` row-major matrices `C = A · B`
//! whose elements come from a nonce, so that a result cannot be prepared in
//! advance and zero-filled inputs (which inflate an H100's matmul figure by
//! about 11%) are never used:
//!
//! * `seed(nonce, label) = u64::from_le_bytes(blake3("kiln/bench/v1\0" ‖ label ‖ "\0" ‖ nonce)[..8])`,
//!   with labels `"a"`, `"b"` and `"positions"`;
//! * `u(seed, i)` is the `i`-th output (0-based) of SplitMix64 seeded with
//!   `seed`: `splitmix64(seed + (i + 1) · 0x9E3779B97F4A7C15)` ([`stream_u64`]);
//!   it is counter-based, so any element can be computed on its own;
//! * element `i` of `A` (`i = row · n + k`) is `k_i / 2^(b−1)` with the
//!   integer `k_i = (u(seed_a, i) >> (64 − b)) − 2^(b−1)`, where `b` is the
//!   precision's number of significant bits ([`Precision::input_bits`]):
//!   8 for BF16, 11 for FP16, 24 for FP32, 12 for the CPU's FP64. Values lie
//!   in `[−1, 1)`, use every significant bit of the format, and are exactly
//!   representable in it (and in `f64`), so both sides start from
//!   bit-identical inputs. `B` is the same with `seed_b` (`i = k · n + col`).
//!
//! # Proofs
//!
//! Each measured matmul carries a [`MatmulProof`]: the BLAKE3 digest of the
//! whole output (in its own element type, little-endian, row-major) and the
//! exact output values at `samples` positions derived from the nonce
//! ([`sample_positions`]). A verifier recomputes those elements exactly in
//! integers ([`Inputs::exact`]: `2n` generated numbers each) and accepts a
//! value within [`ExactElement::tolerance`]:
//!
//! ```text
//! |got − exact| ≤ 2·u_out·|exact| + (n + 2)·u_acc·Σ_k |a_ik·b_kj|
//! ```
//!
//! with `u_out` the unit roundoff of the output type (2⁻⁸ BF16, 2⁻¹¹ FP16,
//! 2⁻²⁴ FP32, 2⁻⁵³ FP64) and `u_acc` that of the accumulator allowing
//! truncating hardware (2⁻²³ for FP32 accumulation, 2⁻⁵² for FP64): the
//! classic worst-case bound for a dot product summed in any order, so an
//! honest GPU is never rejected, while a skipped or forged product (typical
//! `|C|` ≈ 0.33·√n, ≈ 30 at n = 8192, against a tolerance near 2) fails.
//!
//! The CPU benchmark's inputs have 12 significant bits, so every product and
//! partial sum is exact in `f64` whatever the summation order: its output,
//! and so its digest, is fully determined by the nonce and the verifier
//! recomputes the digest itself ([`cpu_output_digest`]).
//!
//! Figures are integers (signed data has no floats): GFLOP/s for GPUs,
//! MFLOP/s for the CPU, and MB/s (10⁶ bytes per second) for bandwidths.
//! A copy's bandwidth counts the bytes read plus the bytes written (the
//! STREAM convention: a 1 GB device copy moves 2 GB); a host↔device
//! transfer counts the bytes transferred.
//!
//! # What a passed challenge proves, and the speed it shows
//!
//! The inputs come from a nonce the provider first sees in the challenge,
//! so correct samples were computed after the challenge was sent. They
//! show that the sampled elements are right, not that the whole product
//! was computed (the samples alone cost `O(n · samples)`; a GPU output's
//! checksum cannot be recomputed by the verifier), and they say nothing
//! about how fast anything ran: every figure in a report (`*_gflops`,
//! `iterations`, `measured_at`, `finished_at`) is the provider's word.
//!
//! So a verifier derives speed only from what it observes itself: the
//! work the checked proofs stand for ([`matmul_flops`] of each proven
//! product, one per precision per GPU) divided by the round trip it timed
//! from sending the challenge to receiving the answer. For a provider that
//! did that work the quotient is a floor on its speed (it never overstates
//! one), and it is close to the real speed only when the compute dominates
//! the round trip: the challenger sizes the product from the advertised
//! speed, and an answerer should compute each proven product once and
//! answer at once. Anything else it does before answering (timing loops,
//! bandwidth tests) counts against it. A provider that computes only the
//! samples would pass as fast; catching it needs a commitment to the whole
//! output before the sampled positions are known (e.g. a Merkle root that
//! seeds them), or a second provider of the same model recomputing the
//! checksum.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{Nonce, ProviderId};
use crate::signed::SignedMessage;
use crate::units::UnixMillis;

/// Version of the benchmark procedure and of its input generator. Figures
/// measured under another version are not comparable.
pub const BENCHMARK_VERSION: u32 = 1;

/// Largest matrix a challenge may ask a GPU to multiply.
pub const MAX_GPU_MATMUL_N: u32 = 16_384;
/// Largest matrix a challenge may ask a CPU to multiply.
pub const MAX_CPU_MATMUL_N: u32 = 1_024;
/// Largest CPU matrix whose whole output a verifier recomputes for the digest.
pub const MAX_FULL_CPU_RECOMPUTE_N: u32 = 512;
/// Most sampled output elements per proof.
pub const MAX_SAMPLES: u32 = 64;

crate::hex_id!(
    #[derive(Default)]
    Digest32,
    32,
    "digest"
);
crate::hex_id!(ChallengeId, 16, "challenge id");

impl Digest32 {
    /// BLAKE3 of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

/// An incremental BLAKE3 digest, for outputs hashed in pieces.
#[derive(Default)]
pub struct DigestWriter(blake3::Hasher);

impl DigestWriter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update(bytes);
        self
    }
    pub fn finish(&self) -> Digest32 {
        Digest32(*self.0.finalize().as_bytes())
    }
}

// ---------------------------------------------------------------------------
// The generator.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
pub const fn splitmix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `i`-th (0-based) output of SplitMix64 seeded with `seed`.
pub const fn stream_u64(seed: u64, i: u64) -> u64 {
    splitmix64(seed.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// The seed of one stream (`"a"`, `"b"`, `"positions"`) of a nonce.
pub fn seed(nonce: &Nonce, label: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"kiln/bench/v1\0");
    h.update(label.as_bytes());
    h.update(&[0]);
    h.update(nonce.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Element type of a matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// BF16 inputs and output, FP32 accumulation.
    Bf16,
    /// FP16 inputs and output, FP32 accumulation.
    Fp16,
    /// FP32 throughout (no TF32).
    Fp32,
    /// FP64 throughout (the CPU benchmark).
    Fp64,
}

impl Precision {
    pub const GPU: [Precision; 3] = [Precision::Bf16, Precision::Fp16, Precision::Fp32];

    /// Significant bits of each generated input.
    pub const fn input_bits(self) -> u32 {
        match self {
            Precision::Bf16 => 8,
            Precision::Fp16 => 11,
            Precision::Fp32 => 24,
            Precision::Fp64 => 12,
        }
    }

    /// Inputs are `k / 2^frac_bits`.
    pub const fn frac_bits(self) -> u32 {
        self.input_bits() - 1
    }

    /// The integer numerator `k` of an input from one generator output.
    pub const fn numerator(self, u: u64) -> i32 {
        let b = self.input_bits();
        ((u >> (64 - b)) as i64 - (1i64 << (b - 1))) as i32
    }

    /// Bytes per element of the output.
    pub const fn output_bytes(self) -> usize {
        match self {
            Precision::Bf16 | Precision::Fp16 => 2,
            Precision::Fp32 => 4,
            Precision::Fp64 => 8,
        }
    }

    /// Unit roundoff of the output type.
    pub fn output_unit_roundoff(self) -> f64 {
        match self {
            Precision::Bf16 => 2f64.powi(-8),
            Precision::Fp16 => 2f64.powi(-11),
            Precision::Fp32 => 2f64.powi(-24),
            Precision::Fp64 => 2f64.powi(-53),
        }
    }

    /// Unit roundoff of the accumulator, doubled for truncating hardware.
    pub fn accumulator_unit(self) -> f64 {
        match self {
            Precision::Fp64 => 2f64.powi(-52),
            _ => 2f64.powi(-23),
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Fp32 => "fp32",
            Precision::Fp64 => "fp64",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The two input matrices of one matmul, as functions of the nonce.
#[derive(Clone, Copy, Debug)]
pub struct Inputs {
    pub precision: Precision,
    pub n: u32,
    pub seed_a: u64,
    pub seed_b: u64,
}

/// One output element computed exactly: `sum / 2^(2·frac_bits)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExactElement {
    pub sum: i128,
    /// `Σ |a·b|`, same scale.
    pub abs_sum: i128,
    pub frac_bits: u32,
}

impl ExactElement {
    fn scale(&self) -> f64 {
        2f64.powi(-2 * self.frac_bits as i32)
    }
    /// The exact value, rounded once to `f64`.
    pub fn value(&self) -> f64 {
        self.sum as f64 * self.scale()
    }
    /// How far an honest result may lie from [`Self::value`] (module docs).
    pub fn tolerance(&self, precision: Precision, n: u32) -> f64 {
        let exact = self.value().abs();
        let abs_sum = self.abs_sum as f64 * self.scale();
        2.0 * precision.output_unit_roundoff() * exact
            + (f64::from(n) + 2.0) * precision.accumulator_unit() * abs_sum
            + f64::MIN_POSITIVE
    }
    /// Whether `got` is an acceptable result for this element.
    pub fn accepts(&self, precision: Precision, n: u32, got: f64) -> bool {
        got.is_finite() && (got - self.value()).abs() <= self.tolerance(precision, n)
    }
}

impl Inputs {
    pub fn new(nonce: &Nonce, precision: Precision, n: u32) -> Self {
        Self {
            precision,
            n,
            seed_a: seed(nonce, "a"),
            seed_b: seed(nonce, "b"),
        }
    }

    /// Numerator of `A[row][k]`.
    pub fn a(&self, row: u32, k: u32) -> i32 {
        let i = u64::from(row) * u64::from(self.n) + u64::from(k);
        self.precision.numerator(stream_u64(self.seed_a, i))
    }

    /// Numerator of `B[k][col]`.
    pub fn b(&self, k: u32, col: u32) -> i32 {
        let i = u64::from(k) * u64::from(self.n) + u64::from(col);
        self.precision.numerator(stream_u64(self.seed_b, i))
    }

    /// Numerator of element `i` (row-major) of `A` (`which_b = false`) or `B`.
    pub fn element(&self, which_b: bool, i: u64) -> i32 {
        let seed = if which_b { self.seed_b } else { self.seed_a };
        self.precision.numerator(stream_u64(seed, i))
    }

    /// The value of a numerator (exact in `f32` for every GPU precision and
    /// in `f64` for all).
    pub fn value(&self, numerator: i32) -> f64 {
        f64::from(numerator) * 2f64.powi(-(self.precision.frac_bits() as i32))
    }

    /// `C[row][col]`, exactly.
    pub fn exact(&self, row: u32, col: u32) -> ExactElement {
        let mut sum = 0i128;
        let mut abs_sum = 0i128;
        for k in 0..self.n {
            let p = i128::from(self.a(row, k)) * i128::from(self.b(k, col));
            sum += p;
            abs_sum += p.abs();
        }
        ExactElement {
            sum,
            abs_sum,
            frac_bits: self.precision.frac_bits(),
        }
    }
}

/// The `count` output positions `(row, col)` sampled for a nonce.
pub fn sample_positions(nonce: &Nonce, n: u32, count: u32) -> Vec<(u32, u32)> {
    if n == 0 {
        return Vec::new();
    }
    let s = seed(nonce, "positions");
    (0..u64::from(count))
        .map(|i| {
            let u = stream_u64(s, i);
            let row = ((u >> 32) % u64::from(n)) as u32;
            let col = ((u & 0xFFFF_FFFF) % u64::from(n)) as u32;
            (row, col)
        })
        .collect()
}

/// The digest of the CPU benchmark's output for `nonce` and `n`, computed
/// exactly in integers (`O(n³)`: meant for `n ≤ MAX_FULL_CPU_RECOMPUTE_N`).
pub fn cpu_output_digest(nonce: &Nonce, n: u32) -> Digest32 {
    let inputs = Inputs::new(nonce, Precision::Fp64, n);
    let nn = n as usize;
    let a: Vec<i64> = (0..(nn * nn) as u64)
        .map(|i| i64::from(inputs.element(false, i)))
        .collect();
    let b: Vec<i64> = (0..(nn * nn) as u64)
        .map(|i| i64::from(inputs.element(true, i)))
        .collect();
    let scale = 2f64.powi(-2 * Precision::Fp64.frac_bits() as i32);
    let mut h = DigestWriter::new();
    let mut row = vec![0i64; nn];
    let mut bytes = Vec::with_capacity(nn * 8);
    for i in 0..nn {
        row.iter_mut().for_each(|c| *c = 0);
        for k in 0..nn {
            let aik = a[i * nn + k];
            let brow = &b[k * nn..(k + 1) * nn];
            for (c, bkj) in row.iter_mut().zip(brow) {
                *c += aik * bkj;
            }
        }
        bytes.clear();
        for c in &row {
            // |c| < 2^53: exact in f64, and so is the power-of-two scaling.
            bytes.extend_from_slice(&((*c as f64) * scale).to_le_bytes());
        }
        h.update(&bytes);
    }
    h.finish()
}

/// Floating-point operations of one `n × n × n` matmul: `2n³` (a multiply
/// and an add per term), the work a proof of it stands for.
pub const fn matmul_flops(n: u32) -> u128 {
    let n = n as u128;
    2 * n * n * n
}

// ---------------------------------------------------------------------------
// Half-precision bit conversions (no `half` dependency).

/// BF16 bits → `f32` (exact).
pub const fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// FP16 bits → `f32` (exact, subnormals, infinities and NaN included).
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exp = u32::from((bits >> 10) & 0x1F);
    let mant = u32::from(bits & 0x3FF);
    match exp {
        0 => {
            let v = mant as f32 * 2f32.powi(-24);
            if sign != 0 { -v } else { v }
        }
        31 => f32::from_bits(sign | 0x7F80_0000 | (mant << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (mant << 13)),
    }
}

/// An `f32` exactly representable in BF16 → its bits (`None` if it is not).
pub const fn f32_to_bf16_exact(v: f32) -> Option<u16> {
    let b = v.to_bits();
    if b & 0xFFFF != 0 {
        return None;
    }
    Some((b >> 16) as u16)
}

/// An `f32` exactly representable as a normal FP16 number (or zero) → its
/// bits (`None` if it is not).
pub fn f32_to_f16_exact(v: f32) -> Option<u16> {
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    if v == 0.0 {
        return Some(sign);
    }
    let exp = ((b >> 23) & 0xFF) as i32 - 127 + 15;
    let mant = b & 0x7F_FFFF;
    if !(1..=30).contains(&exp) || mant & 0x1FFF != 0 {
        return None;
    }
    Some(sign | ((exp as u16) << 10) | (mant >> 13) as u16)
}

// ---------------------------------------------------------------------------
// Reports.

/// Which code computed a GPU matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GemmEngine {
    /// cuBLAS (`cublasGemmEx` / `cublasSgemm`).
    #[serde(rename = "cublas")]
    Cublas,
    /// Kiln's own PTX kernel through the CUDA driver API (FP32 only).
    #[serde(rename = "driver-kernel")]
    DriverKernel,
}

/// One output element: its position and its value as `f64` bits (BF16, FP16
/// and FP32 outputs widen to `f64` exactly).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub row: u32,
    pub col: u32,
    pub value_bits: u64,
}

impl Sample {
    pub fn new(row: u32, col: u32, value: f64) -> Self {
        Self {
            row,
            col,
            value_bits: value.to_bits(),
        }
    }
    pub fn value(&self) -> f64 {
        f64::from_bits(self.value_bits)
    }
}

/// Evidence that one matmul was computed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatmulProof {
    pub precision: Precision,
    /// Timed iterations of the best of three trials (the provider's word).
    pub iterations: u32,
    /// BLAKE3 of the whole output, in its element type, little-endian, row-major.
    pub checksum: Digest32,
    /// Output values at [`sample_positions`] (same order).
    pub samples: Vec<Sample>,
}

/// CPU figures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuBench {
    pub model: String,
    pub threads: u32,
    pub matmul_n: u32,
    /// FP64 matrix multiply on all `threads`, MFLOP/s.
    pub matmul_mflops: u64,
    /// Memory copy bandwidth on all `threads`, MB/s (read + written).
    pub mem_bandwidth_mbps: u64,
    /// Digest of the FP64 output (recomputable: see [`cpu_output_digest`]).
    pub checksum: Digest32,
    pub samples: Vec<Sample>,
}

/// One GPU's figures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuBench {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub engine: GemmEngine,
    pub matmul_n: u32,
    /// Dense matmul throughput, GFLOP/s (0 = not measured with this engine).
    pub bf16_gflops: u64,
    pub fp16_gflops: u64,
    pub fp32_gflops: u64,
    /// Bytes per copy in the bandwidth tests.
    pub copy_bytes: u64,
    /// Device-to-device copy, MB/s (read + written).
    pub d2d_mbps: u64,
    /// Pinned host → device, MB/s.
    pub h2d_pinned_mbps: u64,
    /// Device → pinned host, MB/s.
    pub d2h_pinned_mbps: u64,
    /// One proof per measured precision.
    pub proofs: Vec<MatmulProof>,
}

impl GpuBench {
    pub fn gflops(&self, p: Precision) -> u64 {
        match p {
            Precision::Bf16 => self.bf16_gflops,
            Precision::Fp16 => self.fp16_gflops,
            Precision::Fp32 => self.fp32_gflops,
            Precision::Fp64 => 0,
        }
    }
    pub fn proof(&self, p: Precision) -> Option<&MatmulProof> {
        self.proofs.iter().find(|q| q.precision == p)
    }
}

/// Everything one benchmark run measured, for one nonce.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchmarkReport {
    pub version: u32,
    pub nonce: Nonce,
    /// Samples per proof.
    pub samples: u32,
    pub cpu: CpuBench,
    pub gpus: Vec<GpuBench>,
    pub measured_at: UnixMillis,
}

// ---------------------------------------------------------------------------
// Challenges.

/// What a challenge asks to be measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeSizes {
    pub gpu_matmul_n: u32,
    pub cpu_matmul_n: u32,
    pub samples: u32,
    pub copy_bytes: u64,
}

impl Default for ChallengeSizes {
    fn default() -> Self {
        Self {
            gpu_matmul_n: 8192,
            cpu_matmul_n: 256,
            samples: 16,
            copy_bytes: 1 << 30,
        }
    }
}

impl ChallengeSizes {
    /// Bounds that keep both the provider's work and the verifier's
    /// recomputation small.
    pub fn validate(&self) -> Result<(), String> {
        if !(16..=MAX_GPU_MATMUL_N).contains(&self.gpu_matmul_n) {
            return Err(format!(
                "gpu_matmul_n {} outside 16..={MAX_GPU_MATMUL_N}",
                self.gpu_matmul_n
            ));
        }
        if !(16..=MAX_CPU_MATMUL_N).contains(&self.cpu_matmul_n) {
            return Err(format!(
                "cpu_matmul_n {} outside 16..={MAX_CPU_MATMUL_N}",
                self.cpu_matmul_n
            ));
        }
        if !(1..=MAX_SAMPLES).contains(&self.samples) {
            return Err(format!(
                "samples {} outside 1..={MAX_SAMPLES}",
                self.samples
            ));
        }
        if !((1 << 20)..=(8u64 << 30)).contains(&self.copy_bytes) {
            return Err(format!(
                "copy_bytes {} outside 1 MiB..=8 GiB",
                self.copy_bytes
            ));
        }
        Ok(())
    }
}

/// The coordinator's request that a provider benchmark itself now, on fresh
/// inputs, and answer before `deadline`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub challenge_id: ChallengeId,
    pub provider: ProviderId,
    /// Seeds the inputs and the sampled positions.
    pub nonce: Nonce,
    pub issued_at: UnixMillis,
    pub deadline: UnixMillis,
    pub sizes: ChallengeSizes,
}

impl SignedMessage for Challenge {
    const DOMAIN: &'static str = "kiln/bench-challenge/v1";
}

/// The provider's signed answer to a [`Challenge`]; the proofs are in the
/// report (one [`MatmulProof`] per measured precision and the CPU's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeResponse {
    pub challenge_id: ChallengeId,
    pub provider: ProviderId,
    pub report: BenchmarkReport,
    pub finished_at: UnixMillis,
}

impl SignedMessage for ChallengeResponse {
    const DOMAIN: &'static str = "kiln/bench-response/v1";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding;

    #[test]
    fn generator_is_splitmix64() {
        // SplitMix64 seeded with 0: the published first outputs.
        assert_eq!(stream_u64(0, 0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(stream_u64(0, 1), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(stream_u64(0, 2), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn inputs_are_exact_in_their_formats_and_cover_the_range() {
        let nonce = Nonce::from_bytes([7; 16]);
        for p in [
            Precision::Bf16,
            Precision::Fp16,
            Precision::Fp32,
            Precision::Fp64,
        ] {
            let inp = Inputs::new(&nonce, p, 64);
            let (mut lo, mut hi) = (i32::MAX, i32::MIN);
            let mut zeros = 0;
            for i in 0..4096u64 {
                let k = inp.element(false, i);
                lo = lo.min(k);
                hi = hi.max(k);
                zeros += usize::from(k == 0);
                let v = inp.value(k);
                assert!((-1.0..1.0).contains(&v));
                let f = v as f32;
                assert_eq!(f64::from(f), v, "{p}: not exact in f32");
                match p {
                    Precision::Bf16 => assert!(f32_to_bf16_exact(f).is_some(), "{v}"),
                    Precision::Fp16 => {
                        let h = f32_to_f16_exact(f).unwrap_or_else(|| panic!("{v}"));
                        assert_eq!(f16_to_f32(h), f);
                    }
                    _ => {}
                }
            }
            let half = 1 << p.frac_bits();
            assert!(lo < -half / 2 && hi > half / 2, "{p}: {lo}..{hi}");
            assert!(zeros < 4096 / 8, "{p}: too many zeros");
        }
        assert_eq!(bf16_to_f32(0x3F80), 1.0);
        assert_eq!(f16_to_f32(0x3C00), 1.0);
        assert_eq!(f16_to_f32(0xC000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7C00).is_infinite());
        assert_eq!(f32_to_f16_exact(0.1), None);
    }

    #[test]
    fn exact_elements_match_a_direct_product_and_tolerance_separates_forgeries() {
        let nonce = Nonce::from_bytes([3; 16]);
        let n = 128;
        for p in Precision::GPU {
            let inp = Inputs::new(&nonce, p, n);
            for (r, c) in sample_positions(&nonce, n, 8) {
                let e = inp.exact(r, c);
                let direct: f64 = (0..n)
                    .map(|k| inp.value(inp.a(r, k)) * inp.value(inp.b(k, c)))
                    .sum();
                assert!((direct - e.value()).abs() < 1e-9);
                // An f32-accumulated result is accepted.
                let f32acc: f32 = (0..n)
                    .map(|k| inp.value(inp.a(r, k)) as f32 * inp.value(inp.b(k, c)) as f32)
                    .sum();
                assert!(e.accepts(p, n, f64::from(f32acc)), "{p}");
                assert!(!e.accepts(p, n, f64::NAN));
                // A result off by one whole product is not (unless tiny).
                let t = e.tolerance(p, n);
                assert!(t < 0.05, "{p}: tolerance {t}");
                assert!(!e.accepts(p, n, e.value() + 0.1));
            }
        }
    }

    #[test]
    fn cpu_digest_is_order_independent() {
        let nonce = Nonce::from_bytes([9; 16]);
        let n = 24u32;
        let inp = Inputs::new(&nonce, Precision::Fp64, n);
        // Sum in reverse order in f64: same bits.
        let mut h = DigestWriter::new();
        for i in 0..n {
            for j in 0..n {
                let mut c = 0.0f64;
                for k in (0..n).rev() {
                    c += inp.value(inp.a(i, k)) * inp.value(inp.b(k, j));
                }
                h.update(&c.to_le_bytes());
            }
        }
        assert_eq!(h.finish(), cpu_output_digest(&nonce, n));
        assert_ne!(
            cpu_output_digest(&nonce, n),
            cpu_output_digest(&Nonce::from_bytes([8; 16]), n)
        );
    }

    #[test]
    fn positions_are_in_range_and_nonce_bound() {
        let a = sample_positions(&Nonce::from_bytes([1; 16]), 100, 32);
        let b = sample_positions(&Nonce::from_bytes([2; 16]), 100, 32);
        assert_eq!(a.len(), 32);
        assert!(a.iter().all(|&(r, c)| r < 100 && c < 100));
        assert_ne!(a, b);
        assert!(sample_positions(&Nonce::from_bytes([1; 16]), 0, 4).is_empty());
    }

    #[test]
    fn reports_round_trip_in_both_encodings() {
        let report = BenchmarkReport {
            version: BENCHMARK_VERSION,
            nonce: Nonce::from_bytes([5; 16]),
            samples: 1,
            cpu: CpuBench {
                model: "cpu".into(),
                threads: 2,
                matmul_n: 64,
                matmul_mflops: 1000,
                mem_bandwidth_mbps: 2000,
                checksum: Digest32::of_bytes(b"x"),
                samples: vec![Sample::new(1, 2, 0.5)],
            },
            gpus: vec![GpuBench {
                index: 0,
                uuid: "GPU-1".into(),
                name: "H100".into(),
                engine: GemmEngine::DriverKernel,
                matmul_n: 8192,
                bf16_gflops: 0,
                fp16_gflops: 0,
                fp32_gflops: 50_000,
                copy_bytes: 1 << 30,
                d2d_mbps: 3_000_000,
                h2d_pinned_mbps: 54_000,
                d2h_pinned_mbps: 50_000,
                proofs: vec![MatmulProof {
                    precision: Precision::Fp32,
                    iterations: 10,
                    checksum: Digest32::of_bytes(b"y"),
                    samples: vec![Sample::new(3, 4, -1.25)],
                }],
            }],
            measured_at: UnixMillis(1),
        };
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("\"engine\":\"driver-kernel\""), "{json}");
        assert!(json.contains("\"precision\":\"fp32\""), "{json}");
        let back: BenchmarkReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        let bin: BenchmarkReport = encoding::decode(&encoding::encode(&report).unwrap()).unwrap();
        assert_eq!(bin, report);
        // Deterministic: encoding twice gives the same bytes.
        assert_eq!(
            encoding::encode(&report).unwrap(),
            encoding::encode(&back).unwrap()
        );
    }

    #[test]
    fn matmul_work_is_two_n_cubed() {
        assert_eq!(matmul_flops(0), 0);
        assert_eq!(matmul_flops(2), 16);
        assert_eq!(matmul_flops(8192), 2 * 8192u128.pow(3));
        // No overflow at the largest size a u32 can name.
        assert_eq!(matmul_flops(u32::MAX), 2 * u128::from(u32::MAX).pow(3));
    }

    #[test]
    fn sizes_are_bounded() {
        assert!(ChallengeSizes::default().validate().is_ok());
        let big = ChallengeSizes {
            gpu_matmul_n: 1 << 20,
            ..ChallengeSizes::default()
        };
        assert!(big.validate().is_err());
        let none = ChallengeSizes {
            samples: 0,
            ..ChallengeSizes::default()
        };
        assert!(none.validate().is_err());
    }
}
