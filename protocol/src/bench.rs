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
//! whole output (in its own element type, little-endian, row-major), which
//! commits to every element, and `samples` output elements at positions
//! derived from the nonce *and that digest* ([`committed_positions`]), each
//! with a Bao slice ([`OutputTree::slice`], [`verify_slice`]) proving that
//! its bytes are the ones the digest commits to. A verifier checks each
//! slice against the digest, reads the element from it, recomputes the
//! element exactly in integers ([`Inputs::exact`]: `2n` generated numbers
//! each) and accepts a value within [`ExactElement::tolerance`]:
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
//! and so its digest, is fully determined by the nonce, and a verifier
//! recomputes the digest itself where that is cheap ([`cpu_output_digest`],
//! `n ≤` [`MAX_FULL_CPU_RECOMPUTE_N`]); above that it relies on the samples
//! and their slices, as for a GPU.
//!
//! ## Slices and their size
//!
//! A slice is the standard Bao encoding (as `bao-tree` writes it for the
//! one-chunk range, no length prefix) of the 1 KiB BLAKE3 chunk holding the
//! element: the pair of child hashes of every tree node from the root down
//! (64 bytes each), then the chunk. An element never straddles two chunks
//! (its size divides 1024). For an output of `L` bytes that is at most
//! `1024 + 64·⌈log₂(L / 1024)⌉` bytes ([`max_slice_bytes`]): 2 304 bytes
//! for the largest output (FP32 at n = 16 384, 1 GiB), so a proof is at most
//! [`MAX_SAMPLES`] × 2 304 B = 144 KiB, and a challenge's answer at the
//! default 64 samples about 424 KiB per GPU at n = 16 384 (three products)
//! plus at most 116 KiB for the CPU. Slices travel only in a challenge's
//! answer ([`ProvenReport`]), never in adverts: nothing in an advert is
//! checked.
//!
//! For the provider, building the tree is the hashing it did for the digest
//! (the root *is* the digest), keeping one chaining value per 16 KiB and
//! per node above them (4 MiB for a 1 GiB output), and a slice re-hashes
//! at most one 16 KiB group.
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
//! so correct samples were computed after the challenge was sent. The
//! positions come from the digest of the whole output, so the provider had
//! to commit to all of it before it could know which elements are checked:
//! an answer that computes only some elements (the rest made up) passes
//! only if every sampled position lands on a computed one. Computing a
//! fraction `f` of the output, one commitment passes with probability `fˢ`
//! for `s` samples. A provider can try again by changing an unchecked chunk
//! and re-deriving the root (a few µs a try), so with `T` tries it passes
//! with about `T·fˢ`: at the default `s = 64`, skipping half the work
//! needs about 2⁶⁴ tries, while skipping a fifth (`f = 0.8`) needs about
//! 2²¹ — seconds of one CPU core, which also count in the round trip
//! below (2³⁰ tries, minutes of many cores, skip about 28%). What a passed
//! challenge shows is therefore that the product was computed in full, up
//! to the share grinding can shave within the round trip. Fewer samples
//! shave more (`s = 16`: 2¹⁶ tries skip half); a second message carrying
//! the positions after the digest arrives would remove grinding entirely.
//!
//! Samples say nothing about how fast anything ran: every figure in a
//! report (`*_gflops`, `iterations`, `measured_at`, `finished_at`) is the
//! provider's word. So a verifier derives speed only from what it observes
//! itself: the work the checked proofs stand for ([`matmul_flops`] of each
//! proven product, one per precision per GPU) divided by the round trip it
//! timed from sending the challenge to receiving the answer. For a provider
//! that did that work the quotient is a floor on its speed (it never
//! overstates one), and it is close to the real speed only when the compute
//! dominates the round trip: the challenger sizes the product from the
//! advertised speed, and an answerer should compute each proven product
//! once and answer at once. Anything else it does before answering (timing
//! loops, bandwidth tests) counts against it.
//!
//! # Versions
//!
//! [`BENCHMARK_VERSION`] 2 derives sample positions from the nonce and the
//! digest and proves every sample with a slice; version 1 derived them from
//! the nonce alone, which let a provider compute only the sampled elements.
//! A [`BenchmarkReport`] keeps its wire format, so the advert of a node that
//! still measures version 1 decodes (its figures are its word either way).
//! A challenge is answered with a [`ProvenReport`], which such a node cannot
//! produce: a verifier checks only version-2 answers and tells an older
//! node which `kiln-node` to upgrade to ([`NODE_VERSION_FOR_BENCHMARK`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{Nonce, ProviderId};
use crate::signed::SignedMessage;
use crate::units::UnixMillis;

/// Version of the benchmark procedure, its input generator and its proofs
/// (module docs, "Versions"). Figures measured under another version are
/// not comparable, and a verifier checks only this version's proofs.
pub const BENCHMARK_VERSION: u32 = 2;

/// The first `kiln-node` release whose proofs are [`BENCHMARK_VERSION`]'s,
/// named in the error a verifier gives an older node.
pub const NODE_VERSION_FOR_BENCHMARK: &str = "0.2.0";

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

/// The `count` output positions `(row, col)` checked in the `n × n` output
/// whose digest is `checksum`, for a nonce: the BLAKE3 XOF (derive-key mode,
/// context `"kiln/bench/v2 sample positions"`) of `nonce ‖ checksum ‖ n`
/// (`n` as 4 bytes little-endian), read 8 bytes little-endian per
/// position: `row = (u >> 32) mod n`, `col = (u mod 2³²) mod n`. Bound to the
/// digest so that the provider commits to the whole output before it can
/// know which elements are checked (module docs).
pub fn committed_positions(
    nonce: &Nonce,
    checksum: &Digest32,
    n: u32,
    count: u32,
) -> Vec<(u32, u32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut h = blake3::Hasher::new_derive_key("kiln/bench/v2 sample positions");
    h.update(nonce.as_bytes());
    h.update(checksum.as_bytes());
    h.update(&n.to_le_bytes());
    let mut xof = h.finalize_xof();
    (0..count)
        .map(|_| {
            let mut b = [0u8; 8];
            xof.fill(&mut b);
            let u = u64::from_le_bytes(b);
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
// Commitments: an output's BLAKE3 tree and Bao slices of it.

/// Bytes per BLAKE3 chunk: what one slice opens.
pub const CHUNK_BYTES: u64 = 1024;

/// The chunks whose chaining value [`OutputTree`] keeps together: 16 KiB,
/// what one SIMD pass of BLAKE3 hashes, and the group of `kiln-blobs`.
const GROUP_BYTES: u64 = 16 * CHUNK_BYTES;

/// A BLAKE3 chaining value.
type Cv = [u8; 32];

/// Fills its buffer with the output's bytes from the given offset on.
pub type ReadOutput<'a> = dyn Fn(u64, &mut [u8]) + Sync + 'a;

/// The chaining value of the (non-root) subtree of `bytes` at `offset`.
fn subtree_cv(offset: u64, bytes: &[u8]) -> Cv {
    use blake3::hazmat::HasherExt;
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(bytes);
    h.finalize_non_root()
}

fn parent_cv(left: &Cv, right: &Cv, is_root: bool) -> Cv {
    use blake3::hazmat::{Mode, merge_subtrees_non_root, merge_subtrees_root};
    if is_root {
        *merge_subtrees_root(left, right, Mode::Hash).as_bytes()
    } else {
        merge_subtrees_non_root(left, right, Mode::Hash)
    }
}

/// Where BLAKE3 splits a node of `len > 1024` bytes: the largest power of
/// two below `len` chunks' worth, as `blake3::hazmat::left_subtree_len`
/// computes it, but without its `len + 1`, which overflows for a length
/// near `u64::MAX` that a peer can name (found by fuzzing).
fn left_len(len: u64) -> u64 {
    (len / 2 + (len & 1)).next_power_of_two()
}

/// Bytes of the slice of `chunk` of an output of `len` bytes, or `None` if
/// the output has no such chunk.
pub fn slice_len(len: u64, chunk: u64) -> Option<usize> {
    let at = chunk.checked_mul(CHUNK_BYTES)?;
    if at >= len {
        return None;
    }
    let (mut start, mut end, mut parents) = (0u64, len, 0usize);
    while end - start > CHUNK_BYTES {
        let mid = start + left_len(end - start);
        if at < mid {
            end = mid;
        } else {
            start = mid;
        }
        parents += 1;
    }
    Some(parents * 64 + (end - start) as usize)
}

/// The longest slice of an output of `len` bytes:
/// `1024 + 64·⌈log₂(chunks)⌉` (less for outputs under 1 KiB).
pub fn max_slice_bytes(len: u64) -> usize {
    let chunks = len.div_ceil(CHUNK_BYTES).max(1);
    let depth = chunks.next_power_of_two().trailing_zeros() as usize;
    64 * depth + len.min(CHUNK_BYTES) as usize
}

/// An output's BLAKE3 tree, kept so that any chunk can be proven: the
/// chaining value of every 16 KiB group and of every node above them.
/// The root is the BLAKE3 hash of the output, i.e. its checksum.
pub struct OutputTree {
    len: u64,
    /// `levels[0]` holds the groups' chaining values, `levels[k]` those of
    /// the nodes over `2ᵏ` groups (a last odd node is carried up as it is:
    /// BLAKE3's left-full tree). Empty for an output of one group.
    levels: Vec<Vec<Cv>>,
    root: Digest32,
}

impl OutputTree {
    /// Hashes an output of `len` bytes, read through `read` one group at a
    /// time, on `threads` threads.
    pub fn build(len: u64, threads: usize, read: &ReadOutput<'_>) -> Self {
        let groups = len.div_ceil(GROUP_BYTES);
        if groups <= 1 {
            let mut bytes = vec![0u8; len as usize];
            read(0, &mut bytes);
            return Self {
                len,
                levels: Vec::new(),
                root: Digest32::of_bytes(&bytes),
            };
        }
        let mut cvs = vec![[0u8; 32]; groups as usize];
        let per = cvs.len().div_ceil(threads.max(1));
        std::thread::scope(|s| {
            for (t, part) in cvs.chunks_mut(per).enumerate() {
                s.spawn(move || {
                    let mut buf = vec![0u8; GROUP_BYTES as usize];
                    for (i, cv) in part.iter_mut().enumerate() {
                        let start = (t * per + i) as u64 * GROUP_BYTES;
                        let bytes = &mut buf[..((len - start).min(GROUP_BYTES)) as usize];
                        read(start, bytes);
                        *cv = subtree_cv(start, bytes);
                    }
                });
            }
        });
        let mut levels = vec![cvs];
        loop {
            let below = &levels[levels.len() - 1];
            if below.len() <= 1 {
                break;
            }
            let above = below
                .chunks(2)
                .map(|p| match p {
                    [l, r] => parent_cv(l, r, false),
                    _ => p[0],
                })
                .collect();
            levels.push(above);
        }
        let mut tree = Self {
            len,
            levels,
            root: Digest32::default(),
        };
        let mid = left_len(len);
        let (l, r) = (tree.cv(0, mid, read), tree.cv(mid, len, read));
        tree.root = Digest32(parent_cv(&l, &r, true));
        tree
    }

    /// The tree of bytes held in memory (single-threaded).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self::build(bytes.len() as u64, 1, &read_from(bytes))
    }

    /// The BLAKE3 hash of the output.
    pub fn root(&self) -> Digest32 {
        self.root
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chaining value of the non-root node over bytes `start..end`.
    fn cv(&self, start: u64, end: u64, read: &ReadOutput<'_>) -> Cv {
        if end - start <= GROUP_BYTES {
            // Within one group (a node never crosses a group boundary
            // below group size): re-hash its bytes.
            let mut bytes = vec![0u8; (end - start) as usize];
            read(start, &mut bytes);
            return subtree_cv(start, &bytes);
        }
        let first = start / GROUP_BYTES;
        let groups = end.div_ceil(GROUP_BYTES) - first;
        let level = groups.next_power_of_two().trailing_zeros() as usize;
        self.levels[level][(first >> level) as usize]
    }

    /// The Bao slice proving chunk `chunk` (bytes `1024·chunk..`), or
    /// `None` if the output has no such chunk. `read` must read the same
    /// output the tree was built from.
    pub fn slice(&self, chunk: u64, read: &ReadOutput<'_>) -> Option<Vec<u8>> {
        let want = slice_len(self.len, chunk)?;
        let at = chunk * CHUNK_BYTES;
        let mut out = Vec::with_capacity(want);
        let (mut start, mut end) = (0u64, self.len);
        while end - start > CHUNK_BYTES {
            let mid = start + left_len(end - start);
            out.extend_from_slice(&self.cv(start, mid, read));
            out.extend_from_slice(&self.cv(mid, end, read));
            if at < mid {
                end = mid;
            } else {
                start = mid;
            }
        }
        let from = out.len();
        out.resize(from + (end - start) as usize, 0);
        read(start, &mut out[from..]);
        Some(out)
    }
}

/// A [`ReadOutput`] over bytes in memory.
pub fn read_from(bytes: &[u8]) -> impl Fn(u64, &mut [u8]) + Sync + '_ {
    move |at, buf| {
        let at = at as usize;
        buf.copy_from_slice(&bytes[at..at + buf.len()]);
    }
}

/// Why a slice does not prove a chunk of the output a checksum commits to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SliceError {
    #[error("chunk {chunk} lies outside an output of {len} bytes")]
    OutOfRange { chunk: u64, len: u64 },
    #[error(
        "the slice is {got} bytes, but the slice of chunk {chunk} of a {len}-byte output is {want} (truncated or padded)"
    )]
    Length {
        chunk: u64,
        len: u64,
        got: usize,
        want: usize,
    },
    #[error(
        "the hash pair at depth {depth} does not hash to its parent: not a slice of this checksum's output"
    )]
    Parent { depth: usize },
    #[error(
        "chunk {chunk}'s bytes do not hash to what the slice's tree says: not this output's bytes"
    )]
    Chunk { chunk: u64 },
}

/// Checks that `slice` proves chunk `chunk` of the `len`-byte output whose
/// BLAKE3 hash is `root`, and returns the chunk's bytes. Never panics on
/// any input.
pub fn verify_slice<'a>(
    root: &Digest32,
    len: u64,
    chunk: u64,
    slice: &'a [u8],
) -> Result<&'a [u8], SliceError> {
    let want = slice_len(len, chunk).ok_or(SliceError::OutOfRange { chunk, len })?;
    if slice.len() != want {
        return Err(SliceError::Length {
            chunk,
            len,
            got: slice.len(),
            want,
        });
    }
    let at = chunk * CHUNK_BYTES;
    let (mut start, mut end, mut expected, mut pos) = (0u64, len, *root.as_bytes(), 0usize);
    while end - start > CHUNK_BYTES {
        let mut l = [0u8; 32];
        let mut r = [0u8; 32];
        l.copy_from_slice(&slice[pos..pos + 32]);
        r.copy_from_slice(&slice[pos + 32..pos + 64]);
        if parent_cv(&l, &r, pos == 0) != expected {
            return Err(SliceError::Parent { depth: pos / 64 });
        }
        let mid = start + left_len(end - start);
        if at < mid {
            end = mid;
            expected = l;
        } else {
            start = mid;
            expected = r;
        }
        pos += 64;
    }
    let bytes = &slice[pos..];
    let got = if pos == 0 {
        *blake3::hash(bytes).as_bytes()
    } else {
        subtree_cv(start, bytes)
    };
    if got != expected {
        return Err(SliceError::Chunk { chunk });
    }
    Ok(bytes)
}

/// Bytes of an `n × n` output of `precision`.
pub fn output_len(precision: Precision, n: u32) -> u64 {
    u64::from(n)
        .saturating_mul(u64::from(n))
        .saturating_mul(precision.output_bytes() as u64)
}

/// The byte offset of element `(row, col)` in an `n × n` output.
pub fn element_offset(precision: Precision, n: u32, row: u32, col: u32) -> u64 {
    u64::from(row)
        .saturating_mul(u64::from(n))
        .saturating_add(u64::from(col))
        .saturating_mul(precision.output_bytes() as u64)
}

/// An output element from its little-endian bytes (exactly, as `f64`).
pub fn element_value(precision: Precision, bytes: &[u8]) -> Option<f64> {
    Some(match precision {
        Precision::Bf16 => f64::from(bf16_to_f32(u16::from_le_bytes(bytes.try_into().ok()?))),
        Precision::Fp16 => f64::from(f16_to_f32(u16::from_le_bytes(bytes.try_into().ok()?))),
        Precision::Fp32 => f64::from(f32::from_le_bytes(bytes.try_into().ok()?)),
        Precision::Fp64 => f64::from_le_bytes(bytes.try_into().ok()?),
    })
}

/// The samples an output's commitment selects ([`committed_positions`] of
/// its root), each read from the output, with the slices proving them:
/// what a provider puts in a [`MatmulProof`] (with `tree.root()` as
/// checksum) and its [`SampleSlices`].
pub fn prove_samples(
    nonce: &Nonce,
    precision: Precision,
    n: u32,
    count: u32,
    tree: &OutputTree,
    read: &ReadOutput<'_>,
) -> (Vec<Sample>, Vec<Slice>) {
    let size = precision.output_bytes();
    committed_positions(nonce, &tree.root(), n, count)
        .into_iter()
        .map(|(row, col)| {
            let at = element_offset(precision, n, row, col);
            let slice = tree.slice(at / CHUNK_BYTES, read).unwrap_or_default();
            let mut bytes = vec![0u8; size];
            read(at, &mut bytes);
            let value = element_value(precision, &bytes).unwrap_or(f64::NAN);
            (Sample::new(row, col, value), Slice(slice))
        })
        .unzip()
}

/// Why a sample is not an element of the output its proof's checksum
/// commits to.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InclusionError {
    #[error("position ({row}, {col}) lies outside an {n} × {n} output")]
    OutOfRange { row: u32, col: u32, n: u32 },
    #[error("its slice does not prove it: {0}")]
    Slice(#[from] SliceError),
    #[error("the sample says {claimed}, but the committed output holds {committed} there")]
    Value { claimed: f64, committed: f64 },
}

/// Checks that `sample`'s value is element `(row, col)` of the `n × n`
/// output of `precision` whose BLAKE3 hash is `checksum`, by its slice.
/// (Whether the value is *right* is [`Inputs::exact`]'s business.)
pub fn verify_sample(
    checksum: &Digest32,
    precision: Precision,
    n: u32,
    sample: &Sample,
    slice: &Slice,
) -> Result<(), InclusionError> {
    let (row, col) = (sample.row, sample.col);
    if row >= n || col >= n {
        return Err(InclusionError::OutOfRange { row, col, n });
    }
    let at = element_offset(precision, n, row, col);
    let chunk = verify_slice(
        checksum,
        output_len(precision, n),
        at / CHUNK_BYTES,
        &slice.0,
    )?;
    let within = (at % CHUNK_BYTES) as usize;
    let committed = chunk
        .get(within..within + precision.output_bytes())
        .and_then(|b| element_value(precision, b))
        .unwrap_or(f64::NAN);
    if committed.to_bits() != sample.value_bits {
        return Err(InclusionError::Value {
            claimed: sample.value(),
            committed,
        });
    }
    Ok(())
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

/// A Bao slice ([`OutputTree::slice`]): hex in JSON, raw bytes on the wire.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Slice(pub Vec<u8>);

impl fmt::Debug for Slice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Slice({} bytes)", self.0.len())
    }
}

impl Serialize for Slice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(&self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Slice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            hex::decode(String::deserialize(d)?)
                .map(Slice)
                .map_err(serde::de::Error::custom)
        } else {
            <Vec<u8>>::deserialize(d).map(Slice)
        }
    }
}

/// Evidence that one matmul was computed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatmulProof {
    pub precision: Precision,
    /// Timed iterations of the best of three trials (the provider's word).
    pub iterations: u32,
    /// BLAKE3 of the whole output, in its element type, little-endian,
    /// row-major: the commitment the samples' positions and slices follow.
    pub checksum: Digest32,
    /// Output values at [`committed_positions`] (same order).
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
    /// FP64 output values at [`committed_positions`] (same order).
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

/// The slices proving a report's samples, in the report's shape:
/// `cpu[k]` proves `cpu.samples[k]`, and `gpus[i][j][k]` proves
/// `gpus[i].proofs[j].samples[k]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleSlices {
    pub cpu: Vec<Slice>,
    pub gpus: Vec<Vec<Vec<Slice>>>,
}

/// A report with the slices that prove its samples: what a challenge is
/// answered with (module docs). An advert carries the [`BenchmarkReport`]
/// alone: nothing in it is checked (it is the provider's word until a
/// challenge), and slices would make every heartbeat hundreds of KiB per
/// GPU. In JSON the slices are one more field of the report, `slices`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvenReport {
    pub report: BenchmarkReport,
    pub slices: SampleSlices,
}

impl std::ops::Deref for ProvenReport {
    type Target = BenchmarkReport;
    fn deref(&self) -> &BenchmarkReport {
        &self.report
    }
}

impl ProvenReport {
    /// The slices of GPU `gpu`'s proof `proof` (empty if there are none).
    pub fn gpu_slices(&self, gpu: usize, proof: usize) -> &[Slice] {
        self.slices
            .gpus
            .get(gpu)
            .and_then(|g| g.get(proof))
            .map_or(&[], Vec::as_slice)
    }
}

#[derive(Serialize)]
struct ProvenRef<'a> {
    #[serde(flatten)]
    report: &'a BenchmarkReport,
    slices: &'a SampleSlices,
}

#[derive(Deserialize)]
struct ProvenOwned {
    #[serde(flatten)]
    report: BenchmarkReport,
    slices: SampleSlices,
}

impl Serialize for ProvenReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            ProvenRef {
                report: &self.report,
                slices: &self.slices,
            }
            .serialize(s)
        } else {
            (&self.report, &self.slices).serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for ProvenReport {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let ProvenOwned { report, slices } = ProvenOwned::deserialize(d)?;
            Ok(Self { report, slices })
        } else {
            let (report, slices) = <(BenchmarkReport, SampleSlices)>::deserialize(d)?;
            Ok(Self { report, slices })
        }
    }
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
            // The most allowed: grinding a commitment (module docs) buys
            // a cheater far less at 64 samples than at 16.
            samples: MAX_SAMPLES,
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
/// report (one [`MatmulProof`] per measured precision and the CPU's), with
/// the slices that prove their samples.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeResponse {
    pub challenge_id: ChallengeId,
    pub provider: ProviderId,
    pub report: ProvenReport,
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
            for (r, c) in committed_positions(&nonce, &Digest32::default(), n, 8) {
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
                // A result off by one whole product is not (unless tiny):
                // BF16's tolerance is about 2⁻⁷·|C|, under 0.1 at n = 128.
                let t = e.tolerance(p, n);
                assert!(t < 0.1, "{p}: tolerance {t}");
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
    fn positions_are_in_range_and_bound_to_nonce_checksum_and_size() {
        let (n1, n2) = (Nonce::from_bytes([1; 16]), Nonce::from_bytes([2; 16]));
        let (c1, c2) = (Digest32::of_bytes(b"one"), Digest32::of_bytes(b"two"));
        let a = committed_positions(&n1, &c1, 100, 32);
        assert_eq!(a.len(), 32);
        assert!(a.iter().all(|&(r, c)| r < 100 && c < 100));
        assert_eq!(a, committed_positions(&n1, &c1, 100, 32), "deterministic");
        assert_ne!(a, committed_positions(&n2, &c1, 100, 32), "nonce");
        assert_ne!(a, committed_positions(&n1, &c2, 100, 32), "checksum");
        assert_ne!(a, committed_positions(&n1, &c1, 101, 32), "size");
        // A prefix: asking for fewer gives the first ones.
        assert_eq!(committed_positions(&n1, &c1, 100, 4), a[..4]);
        assert!(committed_positions(&n1, &c1, 0, 4).is_empty());
        // Spread over the whole matrix, not clustered.
        let many = committed_positions(&n1, &c1, 4, 4000);
        for q in 0..16 {
            let hits = many.iter().filter(|&&(r, c)| r * 4 + c == q).count();
            assert!((150..350).contains(&hits), "cell {q}: {hits} of 4000");
        }
    }

    /// Deterministic bytes that differ per position.
    fn bytes(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (splitmix64(i) >> 56) as u8)
            .collect()
    }

    /// Output lengths around every boundary of the tree's shape.
    const LENGTHS: [usize; 13] = [
        1,
        512,
        1023,
        1024,
        1025,
        2048,
        3 * 1024 + 7,
        16 * 1024,
        16 * 1024 + 1,
        33 * 1024,
        100 * 1024 + 3,
        256 * 1024,
        1_000_000,
    ];

    #[test]
    fn the_tree_root_is_the_blake3_hash_whatever_the_threads() {
        for len in LENGTHS {
            let data = bytes(len);
            let want = Digest32::of_bytes(&data);
            for threads in [1, 3, 8] {
                let t = OutputTree::build(len as u64, threads, &read_from(&data));
                assert_eq!(t.root(), want, "{len} bytes, {threads} threads");
            }
        }
    }

    #[test]
    fn slices_are_bao_tree_encodings_and_verify() {
        use bao_tree::io::outboard::PostOrderMemOutboard;
        use bao_tree::io::sync::encode_ranges_validated;
        use bao_tree::{BlockSize, ChunkNum, ChunkRanges};
        for len in LENGTHS {
            let data = bytes(len);
            let tree = OutputTree::of_bytes(&data);
            let ob = PostOrderMemOutboard::create(&data, BlockSize::ZERO);
            let chunks = (len as u64).div_ceil(CHUNK_BYTES);
            let picks = [0, 1, chunks / 2, chunks.saturating_sub(2), chunks - 1];
            for chunk in picks.into_iter().filter(|c| *c < chunks) {
                let slice = tree.slice(chunk, &read_from(&data)).unwrap();
                // Byte for byte what bao-tree encodes for the chunk's range.
                let mut reference = Vec::new();
                let range = ChunkRanges::from(ChunkNum(chunk)..ChunkNum(chunk + 1));
                encode_ranges_validated(&data[..], &ob, &range, &mut reference).unwrap();
                assert_eq!(slice, reference, "{len} bytes, chunk {chunk}");
                assert!(slice.len() <= max_slice_bytes(len as u64), "{len}");
                let at = (chunk * CHUNK_BYTES) as usize;
                let end = (at + CHUNK_BYTES as usize).min(len);
                let got = verify_slice(&tree.root(), len as u64, chunk, &slice);
                assert_eq!(got, Ok(&data[at..end]), "{len} bytes, chunk {chunk}");
            }
            assert_eq!(tree.slice(chunks, &read_from(&data)), None);
        }
        // The bound of the module docs: a 1 GiB output's slices.
        assert_eq!(max_slice_bytes(1 << 30), 2_304);
        assert_eq!(max_slice_bytes(output_len(Precision::Fp64, 1_024)), 1_856);
    }

    #[test]
    fn slice_rejections() {
        let len = 100 * 1024 + 3;
        let data = bytes(len);
        let tree = OutputTree::of_bytes(&data);
        let root = tree.root();
        let chunk = 37;
        let good = tree.slice(chunk, &read_from(&data)).unwrap();
        let parents = (good.len() - 1024) / 64;
        assert_eq!(parents, 7, "100 KiB: seven levels");
        let flip = |at: usize| {
            let mut s = good.clone();
            s[at] ^= 1;
            s
        };
        let mut other = data.clone();
        other[chunk as usize * 1024 + 5] ^= 0x80;
        let other_tree = OutputTree::of_bytes(&other);
        let len = len as u64;
        // (what, checksum, chunk asked for, slice, expected error)
        let cases: Vec<(&str, Digest32, u64, Vec<u8>, SliceError)> = vec![
            (
                "a wrong element in the chunk",
                root,
                chunk,
                flip(good.len() - 1000),
                SliceError::Chunk { chunk },
            ),
            (
                "a hash near the leaves altered",
                root,
                chunk,
                flip(64 * (parents - 1) + 3),
                SliceError::Parent { depth: parents - 1 },
            ),
            (
                "the root's pair altered",
                root,
                chunk,
                flip(40),
                SliceError::Parent { depth: 0 },
            ),
            (
                "another output's checksum",
                other_tree.root(),
                chunk,
                good.clone(),
                SliceError::Parent { depth: 0 },
            ),
            (
                "another output's slice, this checksum",
                root,
                chunk,
                other_tree.slice(chunk, &read_from(&other)).unwrap(),
                SliceError::Parent { depth: 0 },
            ),
            (
                "a slice of another chunk",
                root,
                chunk + 1,
                good.clone(),
                SliceError::Parent { depth: parents - 1 },
            ),
            (
                "truncated",
                root,
                chunk,
                good[..good.len() - 1].to_vec(),
                SliceError::Length {
                    chunk,
                    len,
                    got: good.len() - 1,
                    want: good.len(),
                },
            ),
            (
                "padded",
                root,
                chunk,
                [&good[..], &[0]].concat(),
                SliceError::Length {
                    chunk,
                    len,
                    got: good.len() + 1,
                    want: good.len(),
                },
            ),
            (
                "empty",
                root,
                chunk,
                Vec::new(),
                SliceError::Length {
                    chunk,
                    len,
                    got: 0,
                    want: good.len(),
                },
            ),
            (
                "past the end",
                root,
                101,
                good.clone(),
                SliceError::OutOfRange { chunk: 101, len },
            ),
            (
                "a chunk number that overflows",
                root,
                u64::MAX,
                good.clone(),
                SliceError::OutOfRange {
                    chunk: u64::MAX,
                    len,
                },
            ),
        ];
        for (what, checksum, c, slice, want) in cases {
            assert_eq!(verify_slice(&checksum, len, c, &slice), Err(want), "{what}");
        }
        assert!(verify_slice(&root, len, chunk, &good).is_ok());
        // A one-chunk output: the slice is the chunk, checked against the
        // root hash itself.
        let small = bytes(600);
        let root = Digest32::of_bytes(&small);
        assert_eq!(verify_slice(&root, 600, 0, &small), Ok(&small[..]));
        let mut bad = small.clone();
        bad[0] ^= 1;
        assert_eq!(
            verify_slice(&root, 600, 0, &bad),
            Err(SliceError::Chunk { chunk: 0 })
        );
    }

    /// An honest `n × n` output of `p` (exact values rounded to `f32`, then
    /// truncated to the output type), as little-endian bytes.
    fn honest_output(nonce: &Nonce, p: Precision, n: u32) -> Vec<u8> {
        let inp = Inputs::new(nonce, p, n);
        let mut out = Vec::new();
        for r in 0..n {
            for c in 0..n {
                let v = inp.exact(r, c).value();
                match p {
                    Precision::Bf16 => {
                        out.extend_from_slice(&(((v as f32).to_bits() >> 16) as u16).to_le_bytes())
                    }
                    Precision::Fp16 => {
                        let t = f32::from_bits((v as f32).to_bits() & 0xFFFF_E000);
                        out.extend_from_slice(&f32_to_f16_exact(t).unwrap_or(0).to_le_bytes())
                    }
                    Precision::Fp32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
                    Precision::Fp64 => out.extend_from_slice(&v.to_le_bytes()),
                }
            }
        }
        out
    }

    #[test]
    fn samples_prove_their_elements_and_nothing_else() {
        let nonce = Nonce::from_bytes([4; 16]);
        let n = 48;
        for p in [
            Precision::Bf16,
            Precision::Fp16,
            Precision::Fp32,
            Precision::Fp64,
        ] {
            let out = honest_output(&nonce, p, n);
            assert_eq!(out.len() as u64, output_len(p, n));
            let read = read_from(&out);
            let tree = OutputTree::build(out.len() as u64, 2, &read);
            let (samples, slices) = prove_samples(&nonce, p, n, 8, &tree, &read);
            let at: Vec<(u32, u32)> = samples.iter().map(|s| (s.row, s.col)).collect();
            assert_eq!(at, committed_positions(&nonce, &tree.root(), n, 8), "{p}");
            let inp = Inputs::new(&nonce, p, n);
            let root = tree.root();
            for (s, sl) in samples.iter().zip(&slices) {
                assert_eq!(verify_sample(&root, p, n, s, sl), Ok(()), "{p}");
                assert!(inp.exact(s.row, s.col).accepts(p, n, s.value()), "{p}");
            }
            let (s, sl) = (samples[0], &slices[0]);
            let shifted = |f: &dyn Fn(&mut Sample)| {
                let mut t = s;
                f(&mut t);
                t
            };
            // Another value than the committed one.
            let wrong = shifted(&|t| t.value_bits = (s.value() + 1.0).to_bits());
            assert!(
                matches!(
                    verify_sample(&root, p, n, &wrong, sl),
                    Err(InclusionError::Value { .. })
                ),
                "{p}"
            );
            // The same value and slice claimed for another position: the
            // slice proves another chunk, or another element of it.
            let moved = shifted(&|t| t.row = (s.row + n / 2) % n);
            assert!(verify_sample(&root, p, n, &moved, sl).is_err(), "{p}");
            let moved = shifted(&|t| t.col = (s.col + 1) % n);
            assert!(verify_sample(&root, p, n, &moved, sl).is_err(), "{p}");
            // Outside the matrix, against another checksum, no slice.
            let outside = shifted(&|t| t.row = n);
            assert!(
                matches!(
                    verify_sample(&root, p, n, &outside, sl),
                    Err(InclusionError::OutOfRange { .. })
                ),
                "{p}"
            );
            let other = Digest32::of_bytes(b"another output");
            assert!(
                matches!(
                    verify_sample(&other, p, n, &s, sl),
                    Err(InclusionError::Slice(SliceError::Parent { depth: 0 }))
                ),
                "{p}"
            );
            assert!(
                matches!(
                    verify_sample(&root, p, n, &s, &Slice::default()),
                    Err(InclusionError::Slice(SliceError::Length { got: 0, .. }))
                ),
                "{p}"
            );
        }
    }

    #[test]
    fn one_changed_element_moves_every_position() {
        // Why a made-up output cannot be patched where it is sampled: the
        // patch changes the checksum, and with it where the samples fall.
        let nonce = Nonce::from_bytes([6; 16]);
        let n = 64;
        let mut out = honest_output(&nonce, Precision::Fp32, n);
        let before = OutputTree::of_bytes(&out).root();
        out[4 * (n as usize * n as usize) - 1] ^= 1;
        let after = OutputTree::of_bytes(&out).root();
        let (a, b) = (
            committed_positions(&nonce, &before, n, 16),
            committed_positions(&nonce, &after, n, 16),
        );
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same <= 1, "{same} of 16 positions unchanged");
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

        // A challenge's answer: the report and its slices. In JSON the
        // report's fields stay where they were, slices (hex) beside them.
        let proven = ProvenReport {
            report: report.clone(),
            slices: SampleSlices {
                cpu: vec![Slice(vec![0xAB, 0xCD])],
                gpus: vec![vec![vec![Slice(vec![1, 2, 3])]]],
            },
        };
        let json = serde_json::to_value(&proven).unwrap();
        assert_eq!(json["version"], BENCHMARK_VERSION);
        assert_eq!(json["cpu"]["samples"][0]["row"], 1);
        assert_eq!(json["slices"]["cpu"][0], "abcd");
        assert_eq!(json["slices"]["gpus"][0][0][0], "010203");
        let back: ProvenReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, proven);
        let bin: ProvenReport = encoding::decode(&encoding::encode(&proven).unwrap()).unwrap();
        assert_eq!(bin, proven);
        assert_eq!(proven.gpu_slices(0, 0), &[Slice(vec![1, 2, 3])]);
        assert!(proven.gpu_slices(0, 1).is_empty() && proven.gpu_slices(1, 0).is_empty());
        assert_eq!(proven.gpus[0].uuid, "GPU-1", "reads as its report");
    }

    /// The report of `reports_round_trip_in_both_encodings` at version 1,
    /// as the version-1 code encoded it.
    const V1_REPORT: &str = "010505050505050505050505050505050501036370750240fbe803fbd0073ae7d805f6789a6402ac\
        b70ad4096a85a56bf6804eaf25c0493ac697548d30b5010102fd000000000000e03f0100054750552d310448\
        31303001fb00200000fb50c3fc00000040fcc0c62d00fbf0d2fb50c301020a08112a9e334ce73042b531c256\
        68cf5cb12a1ee040a4326afeac065461079a06010304fd000000000000f4bf01";

    /// Adverts keep their wire format: this report, encoded by the
    /// version-1 code (commit de21eca), still decodes, so a node that has
    /// not upgraded can still register (its challenges fail, saying why).
    #[test]
    fn a_version_1_report_still_decodes() {
        let bytes = hex::decode(V1_REPORT).unwrap();
        let r: BenchmarkReport = encoding::decode(&bytes).unwrap();
        assert_eq!((r.version, r.samples), (1, 1));
        assert_eq!(r.cpu.samples, vec![Sample::new(1, 2, 0.5)]);
        assert_eq!(r.gpus[0].proofs[0].samples, vec![Sample::new(3, 4, -1.25)]);
        assert_eq!(encoding::encode(&r).unwrap(), bytes);
    }

    /// The committed output's root is the plain checksum of its bytes, as
    /// a node builds it (`u16`s converted as they are hashed, on any number
    /// of threads), and its sample slices cover every sampled element.
    /// (What committing costs against hashing alone belongs in a benchmark,
    /// not here.)
    #[test]
    fn the_output_tree_root_is_the_checksum_on_any_thread_count() {
        let n: u32 = 256;
        let out: Vec<u16> = (0..u64::from(n) * u64::from(n))
            .map(|i| splitmix64(i) as u16)
            .collect();
        let mut h = DigestWriter::new();
        let mut buf = Vec::new();
        for v in &out {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        h.update(&buf);
        let digest = h.finish();
        let read = |at: u64, buf: &mut [u8]| {
            let first = at as usize / 2;
            for (d, v) in buf.chunks_exact_mut(2).zip(&out[first..]) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        };
        for threads in [1, 2, 3, 8] {
            let tree = OutputTree::build(output_len(Precision::Bf16, n), threads, &read);
            assert_eq!(tree.root(), digest, "{threads} thread(s)");
            let nonce = Nonce::from_bytes([1; 16]);
            let (_, slices) = prove_samples(&nonce, Precision::Bf16, n, MAX_SAMPLES, &tree, &read);
            assert!(!slices.is_empty() && slices.iter().all(|s| !s.0.is_empty()));
        }
    }

    #[test]
    fn left_len_is_blake3s_and_total() {
        for len in [
            1025u64,
            2048,
            2049,
            4096,
            5000,
            1 << 20,
            (1 << 40) + 7,
            u64::MAX / 2,
        ] {
            assert_eq!(
                left_len(len),
                blake3::hazmat::left_subtree_len(len),
                "{len}"
            );
        }
        // Where blake3's own version overflows: no panic, and the split is
        // still inside the node.
        assert_eq!(left_len(u64::MAX), 1 << 63);
        assert!(slice_len(u64::MAX, u64::MAX / CHUNK_BYTES).is_some());
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
