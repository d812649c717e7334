//! Benchmark challenges, coordinator side: pure functions only (the service
//! decides when to challenge whom and stores the outcome against the
//! provider's reputation).
//!
//! * [`new_challenge`] builds a challenge (a fresh nonce and a deadline);
//! * [`check_response`] checks a provider's signed answer: signatures,
//!   binding to the challenge, the deadline, the benchmark version, and the
//!   proofs: every sampled output element sits where the nonce and the
//!   output's checksum put it, is proven part of that output by its Bao
//!   slice, and is right by exact recomputation from the nonce (and the
//!   whole CPU output's checksum is recomputed where that is cheap); it
//!   returns the measured figures and the flags against the provider's own
//!   advert;
//! * [`flag`] compares measured figures with the advertised ones (more than
//!   [`FLAG_BELOW_PERCENT`]% below is a shortfall) and a GPU's verified
//!   speed with the median verified speed of its model
//!   ([`verified_fleet_medians`]; more than [`FLAG_BELOW_VERIFIED_PERCENT`]%
//!   below): baselines from peers come only from what the coordinator
//!   timed, never from adverts.
//!
//! "Below the fleet median" means well below it: strictly below the median
//! would flag half of every fleet by definition.
//!
//! # Verified speed
//!
//! The figures in an answer are the provider's word (see
//! [`kiln_protocol::bench`]: proofs show results, not speed). What the
//! coordinator can stand behind is its own clock: [`gpu_speed`] divides the
//! work of each GPU's checked proofs by the round trip the coordinator
//! timed, a floor on the speed of a GPU that did that work. That the work
//! was done is what the commitment shows: a proof's samples are bound to
//! the checksum of the whole output, so an answer that computed only the
//! sampled elements fails (up to the grinding bound of
//! [`kiln_protocol::bench`]'s module docs). The scheduler credits that
//! floor, never more than the advert claims ([`GpuSpeed::verified_mflops`]),
//! for `min_tflops` and throughput per price. [`gpu_matmul_n_for`] sizes
//! the product so that at the advertised speed the compute takes
//! [`AuditConfig::speed_target`](crate::audit::AuditConfig) (long against a
//! network round trip), and [`speed_shortfall`] fails the claim of a
//! provider whose round trip is far longer than its advertised speed needs.
//!
//! # Versions
//!
//! Adverts are the provider's word and are never checked, so an advert
//! whose benchmark is of an older version is accepted as it is (its sizes
//! and claims are used, as any advert's). Challenges are trusted, so they
//! require [`BENCHMARK_VERSION`]'s proofs: an answer of another version
//! fails with [`ChallengeError::WrongVersion`], which names the `kiln-node`
//! release to upgrade to (and `audit` does not even send a challenge to a
//! node whose advert shows an older version: it could not answer it).

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_protocol::bench::{
    Inputs, MAX_FULL_CPU_RECOMPUTE_N, MAX_GPU_MATMUL_N, NODE_VERSION_FOR_BENCHMARK, Precision,
    ProvenReport, Sample, Slice, committed_positions, cpu_output_digest, matmul_flops,
    verify_sample,
};
use kiln_protocol::{
    BENCHMARK_VERSION, CapabilityAdvert, Challenge, ChallengeId, ChallengeResponse, ChallengeSizes,
    CpuBench, Digest32, GpuBench, Nonce, ProviderId, PublicKey, Signed, UnixMillis,
};
use serde::{Deserialize, Serialize};

/// A measured metric more than this many percent below its baseline is a
/// shortfall.
/// Reputation of a provider never audited (0..=1000).
pub const REPUTATION_START: u32 = 500;

pub const FLAG_BELOW_PERCENT: u64 = 15;
/// The same for [`Metric::VerifiedMflops`] against its fleet median:
/// wider, because a verified speed is timed on the coordinator's clock over
/// the whole answer (network and host included), which varies between
/// honest machines of one model; a slower card posing as the model's
/// advertised speed shows far below it.
pub const FLAG_BELOW_VERIFIED_PERCENT: u64 = 50;

/// One benchmark figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    CpuMatmulMflops,
    CpuMemBandwidthMbps,
    Bf16Gflops,
    Fp16Gflops,
    Fp32Gflops,
    D2dMbps,
    H2dPinnedMbps,
    D2hPinnedMbps,
    /// What the coordinator verified of a GPU's speed (`GpuSpeed`), the
    /// one figure its fleet median is taken of.
    VerifiedMflops,
}

impl Metric {
    /// How far below a baseline counts as short, in percent.
    pub const fn flag_below_percent(self) -> u64 {
        match self {
            Self::VerifiedMflops => FLAG_BELOW_VERIFIED_PERCENT,
            _ => FLAG_BELOW_PERCENT,
        }
    }
}

/// Figures by metric (a missing metric was not measured).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures(pub BTreeMap<Metric, u64>);

impl Figures {
    pub fn get(&self, m: Metric) -> u64 {
        self.0.get(&m).copied().unwrap_or(0)
    }
}

pub fn cpu_figures(c: &CpuBench) -> Figures {
    Figures(BTreeMap::from([
        (Metric::CpuMatmulMflops, c.matmul_mflops),
        (Metric::CpuMemBandwidthMbps, c.mem_bandwidth_mbps),
    ]))
}

pub fn gpu_figures(g: &GpuBench) -> Figures {
    Figures(BTreeMap::from([
        (Metric::Bf16Gflops, g.bf16_gflops),
        (Metric::Fp16Gflops, g.fp16_gflops),
        (Metric::Fp32Gflops, g.fp32_gflops),
        (Metric::D2dMbps, g.d2d_mbps),
        (Metric::H2dPinnedMbps, g.h2d_pinned_mbps),
        (Metric::D2hPinnedMbps, g.d2h_pinned_mbps),
    ]))
}

/// What a figure fell short of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// The provider's own advert.
    Advert,
    /// The fleet median of the same GPU model.
    FleetMedian,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortfall {
    pub metric: Metric,
    pub baseline: Baseline,
    pub expected: u64,
    pub measured: u64,
}

/// A provider whose measured figures fall short.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flag {
    /// `cpu` or a GPU's UUID.
    pub subject: String,
    pub shortfalls: Vec<Shortfall>,
}

fn short_of(metric: Metric, expected: u64, measured: u64) -> bool {
    expected > 0
        && u128::from(measured) * 100
            < u128::from(expected) * u128::from(100 - metric.flag_below_percent())
}

/// Flags `measured` if any metric is more than its
/// [`Metric::flag_below_percent`] below the advertised figure or the fleet
/// median (a baseline of 0 means "not measured" and is skipped).
pub fn flag(
    subject: &str,
    advertised: &Figures,
    measured: &Figures,
    fleet_median: Option<&Figures>,
) -> Option<Flag> {
    let mut shortfalls = Vec::new();
    let metrics: std::collections::BTreeSet<Metric> = advertised
        .0
        .keys()
        .chain(fleet_median.map(|f| f.0.keys()).into_iter().flatten())
        .copied()
        .collect();
    for m in metrics {
        let got = measured.get(m);
        let baselines = [
            (Baseline::Advert, advertised.get(m)),
            (
                Baseline::FleetMedian,
                fleet_median.map(|f| f.get(m)).unwrap_or(0),
            ),
        ];
        for (baseline, expected) in baselines {
            if short_of(m, expected, got) {
                shortfalls.push(Shortfall {
                    metric: m,
                    baseline,
                    expected,
                    measured: got,
                });
            }
        }
    }
    (!shortfalls.is_empty()).then(|| Flag {
        subject: subject.to_string(),
        shortfalls,
    })
}

/// The per-metric median (the lower one for an even count) of the non-zero
/// figures of a fleet, e.g. all recent challenge results of one GPU model.
pub fn fleet_median(fleet: &[Figures]) -> Figures {
    let mut by: BTreeMap<Metric, Vec<u64>> = BTreeMap::new();
    for f in fleet {
        for (m, v) in &f.0 {
            if *v > 0 {
                by.entry(*m).or_default().push(*v);
            }
        }
    }
    Figures(
        by.into_iter()
            .map(|(m, mut v)| {
                v.sort_unstable();
                (m, v[(v.len() - 1) / 2])
            })
            .collect(),
    )
}

/// Why a challenge response was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChallengeError {
    #[error("the challenge is not signed by this coordinator: {0}")]
    ChallengeSignature(String),
    #[error("the response's signature does not verify: {0}")]
    ResponseSignature(String),
    #[error("the response is signed by {signer}, but the challenge went to {provider}")]
    WrongSigner { signer: String, provider: String },
    #[error("the response names provider {got}, the challenge went to {want}")]
    WrongProvider { got: String, want: String },
    #[error("the advert is provider {got}'s, the challenge went to {want}")]
    WrongAdvert { got: String, want: String },
    #[error("the response answers challenge {got}, not {want}")]
    WrongChallenge { got: String, want: String },
    #[error("late: received at {received} ms, the deadline was {deadline} ms")]
    Late { deadline: u64, received: u64 },
    #[error("the report was measured with nonce {got}, not the challenge's {want}")]
    WrongNonce { got: String, want: String },
    #[error(
        "the answer's benchmark version is {got}, but challenges are checked at version {want} \
         (samples bound to the whole output by BLAKE3 inclusion proofs): upgrade kiln-node to \
         {NODE_VERSION_FOR_BENCHMARK} or later"
    )]
    WrongVersion { got: u32, want: u32 },
    #[error("{subject}: matmul size {got}, the challenge asked for {want}")]
    WrongSize {
        subject: String,
        got: u32,
        want: u32,
    },
    #[error("advertised GPU {uuid} is missing from the response")]
    MissingGpu { uuid: String },
    #[error("{subject}: {precision} throughput reported without a proof")]
    MissingProof {
        subject: String,
        precision: Precision,
    },
    #[error(
        "{subject}: {precision} proof samples are not the {want} positions the nonce and the output's checksum select"
    )]
    WrongSamples {
        subject: String,
        precision: Precision,
        want: u32,
    },
    #[error("{subject}: {precision} proof carries {got} inclusion proofs for its {want} samples")]
    WrongSliceCount {
        subject: String,
        precision: Precision,
        got: usize,
        want: usize,
    },
    #[error(
        "{subject}: {precision} C[{row}][{col}] is not proven part of the output with checksum {checksum}: {why}"
    )]
    NotCommitted {
        subject: String,
        precision: Precision,
        row: u32,
        col: u32,
        checksum: String,
        why: String,
    },
    #[error(
        "{subject}: {precision} C[{row}][{col}] = {got}, but recomputation gives {expected} (tolerance {tolerance})"
    )]
    SampleMismatch {
        subject: String,
        precision: Precision,
        row: u32,
        col: u32,
        got: f64,
        expected: f64,
        tolerance: f64,
    },
    #[error("CPU output checksum {got} does not match the recomputed {want}")]
    ChecksumMismatch { got: String, want: String },
}

/// A GPU's figures as the challenge measured them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuMeasured {
    pub uuid: String,
    /// The model, e.g. `NVIDIA H100 80GB HBM3` (the fleet-median key).
    pub name: String,
    /// As the provider reported them.
    pub figures: Figures,
    /// As the coordinator observed it.
    pub speed: GpuSpeed,
}

/// What one challenge showed of one GPU's speed. MFLOP/s, which is FLOP
/// per microsecond: fine enough that a slow answer shows as what it is
/// (a CPU posing as a GPU reads as a few thousand), not as 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSpeed {
    /// The work of its checked proofs: `2n³` per proven precision.
    pub proven_flops: u64,
    /// `proven_flops` ÷ the round trip, rounded down: for a GPU that did
    /// the work, a floor on its speed.
    pub observed_mflops: u64,
    /// The advert's figure for this GPU at its fastest precision (0: none).
    pub advertised_mflops: u64,
    /// What may be credited: the floor, never more than the claim; 0 where
    /// nothing was claimed (with no claim to cap it, a floor from an answer
    /// that skipped the work would be unbounded).
    pub verified_mflops: u64,
    /// How long the advertised figures need for the proven products, µs
    /// (`None`: the advert claims nothing for this GPU).
    pub expected_us: Option<u64>,
}

/// An accepted response: what was measured and how it compares with the
/// provider's advert.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeVerdict {
    pub challenge_id: ChallengeId,
    pub provider: ProviderId,
    /// From sending the challenge to receiving the answer, on the
    /// coordinator's own (monotonic) clock.
    pub round_trip_us: u64,
    pub cpu: Figures,
    pub gpus: Vec<GpuMeasured>,
    /// Shortfalls against the advert's own benchmark (see [`assess`] for the
    /// fleet median too).
    pub flags: Vec<Flag>,
}

/// A challenge for `provider`, issued `now`, due within `timeout_ms`.
pub fn new_challenge(
    provider: ProviderId,
    nonce: Nonce,
    challenge_id: ChallengeId,
    now: UnixMillis,
    timeout_ms: u64,
    sizes: ChallengeSizes,
) -> Challenge {
    Challenge {
        challenge_id,
        provider,
        nonce,
        issued_at: now,
        deadline: UnixMillis(now.0.saturating_add(timeout_ms)),
        sizes,
    }
}

/// The time to wait before the next challenge of a provider, spread evenly
/// over `[mean/2, 3·mean/2]` by a random `u64` so providers cannot predict it.
pub fn next_challenge_in_ms(mean_ms: u64, random: u64) -> u64 {
    let half = mean_ms / 2;
    half + random % mean_ms.max(1)
}

/// One proven product, as [`check_product`] checks it.
struct Product<'a> {
    subject: &'a str,
    precision: Precision,
    n: u32,
    checksum: &'a Digest32,
    samples: &'a [Sample],
    slices: &'a [Slice],
}

/// Checks one product's samples: at the positions the nonce and the
/// checksum select, `want` of them, each proven part of the committed
/// output by its slice and right by exact recomputation.
fn check_product(nonce: &Nonce, want: u32, p: &Product<'_>) -> Result<(), ChallengeError> {
    let positions = committed_positions(nonce, p.checksum, p.n, want);
    let at: Vec<(u32, u32)> = p.samples.iter().map(|s| (s.row, s.col)).collect();
    if at != positions {
        return Err(ChallengeError::WrongSamples {
            subject: p.subject.into(),
            precision: p.precision,
            want,
        });
    }
    if p.slices.len() != p.samples.len() {
        return Err(ChallengeError::WrongSliceCount {
            subject: p.subject.into(),
            precision: p.precision,
            got: p.slices.len(),
            want: p.samples.len(),
        });
    }
    let inputs = Inputs::new(nonce, p.precision, p.n);
    for (s, slice) in p.samples.iter().zip(p.slices) {
        verify_sample(p.checksum, p.precision, p.n, s, slice).map_err(|e| {
            ChallengeError::NotCommitted {
                subject: p.subject.into(),
                precision: p.precision,
                row: s.row,
                col: s.col,
                checksum: p.checksum.to_string(),
                why: e.to_string(),
            }
        })?;
        let exact = inputs.exact(s.row, s.col);
        if !exact.accepts(p.precision, p.n, s.value()) {
            return Err(ChallengeError::SampleMismatch {
                subject: p.subject.into(),
                precision: p.precision,
                row: s.row,
                col: s.col,
                got: s.value(),
                expected: exact.value(),
                tolerance: exact.tolerance(p.precision, p.n),
            });
        }
    }
    Ok(())
}

/// Checks every proof of a challenge's answer against the sizes it was
/// measured at (see [`check_product`]), and the CPU output's checksum in
/// full where `n ≤ MAX_FULL_CPU_RECOMPUTE_N`. (An advert's report carries
/// no slices and is never checked.)
pub fn verify_proofs(report: &ProvenReport, sizes: &ChallengeSizes) -> Result<(), ChallengeError> {
    if report.version != BENCHMARK_VERSION {
        return Err(ChallengeError::WrongVersion {
            got: report.version,
            want: BENCHMARK_VERSION,
        });
    }
    let nonce = &report.nonce;
    let cpu = &report.cpu;
    if cpu.matmul_n != sizes.cpu_matmul_n {
        return Err(ChallengeError::WrongSize {
            subject: "cpu".into(),
            got: cpu.matmul_n,
            want: sizes.cpu_matmul_n,
        });
    }
    check_product(
        nonce,
        sizes.samples,
        &Product {
            subject: "cpu",
            precision: Precision::Fp64,
            n: cpu.matmul_n,
            checksum: &cpu.checksum,
            samples: &cpu.samples,
            slices: &report.slices.cpu,
        },
    )?;
    if cpu.matmul_n <= MAX_FULL_CPU_RECOMPUTE_N {
        let want = cpu_output_digest(nonce, cpu.matmul_n);
        if want != cpu.checksum {
            return Err(ChallengeError::ChecksumMismatch {
                got: cpu.checksum.to_string(),
                want: want.to_string(),
            });
        }
    }
    for (i, g) in report.gpus.iter().enumerate() {
        if g.matmul_n != sizes.gpu_matmul_n {
            return Err(ChallengeError::WrongSize {
                subject: g.uuid.clone(),
                got: g.matmul_n,
                want: sizes.gpu_matmul_n,
            });
        }
        // Every proof is checked, claimed figure or not: the work of each
        // counts towards the GPU's observed speed (see `gpu_speed`).
        for p in Precision::GPU {
            match g.proofs.iter().position(|q| q.precision == p) {
                Some(j) => {
                    let proof = &g.proofs[j];
                    check_product(
                        nonce,
                        sizes.samples,
                        &Product {
                            subject: &g.uuid,
                            precision: p,
                            n: g.matmul_n,
                            checksum: &proof.checksum,
                            samples: &proof.samples,
                            slices: report.gpu_slices(i, j),
                        },
                    )?
                }
                None if g.gflops(p) > 0 => {
                    return Err(ChallengeError::MissingProof {
                        subject: g.uuid.clone(),
                        precision: p,
                    });
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// Checks a provider's answer to `challenge` (signed by `coordinator`),
/// received at `received_at`, `round_trip` after it was sent (both on the
/// coordinator's clocks), against the provider's current `advert`.
pub fn check_response(
    challenge: &Signed<Challenge>,
    coordinator: &PublicKey,
    response: &Signed<ChallengeResponse>,
    advert: &CapabilityAdvert,
    received_at: UnixMillis,
    round_trip: Duration,
) -> Result<ChallengeVerdict, ChallengeError> {
    // The coordinator's own record: its signature, not its expiry, matters.
    let ch = challenge
        .verify(UnixMillis(0))
        .map_err(|e| ChallengeError::ChallengeSignature(e.to_string()))?;
    if &challenge.signer != coordinator {
        return Err(ChallengeError::ChallengeSignature(format!(
            "signed by {}",
            challenge.signer
        )));
    }
    let r = response
        .verify(received_at)
        .map_err(|e| ChallengeError::ResponseSignature(e.to_string()))?;
    let signer = ProviderId::from_public_key(&response.signer);
    if signer != ch.provider {
        return Err(ChallengeError::WrongSigner {
            signer: signer.to_string(),
            provider: ch.provider.to_string(),
        });
    }
    if r.provider != ch.provider {
        return Err(ChallengeError::WrongProvider {
            got: r.provider.to_string(),
            want: ch.provider.to_string(),
        });
    }
    if advert.provider != ch.provider {
        return Err(ChallengeError::WrongAdvert {
            got: advert.provider.to_string(),
            want: ch.provider.to_string(),
        });
    }
    if r.challenge_id != ch.challenge_id {
        return Err(ChallengeError::WrongChallenge {
            got: r.challenge_id.to_string(),
            want: ch.challenge_id.to_string(),
        });
    }
    if received_at > ch.deadline {
        return Err(ChallengeError::Late {
            deadline: ch.deadline.0,
            received: received_at.0,
        });
    }
    if r.report.version != BENCHMARK_VERSION {
        return Err(ChallengeError::WrongVersion {
            got: r.report.version,
            want: BENCHMARK_VERSION,
        });
    }
    if r.report.nonce != ch.nonce {
        return Err(ChallengeError::WrongNonce {
            got: r.report.nonce.to_string(),
            want: ch.nonce.to_string(),
        });
    }
    for g in &advert.gpus {
        if !r.report.gpus.iter().any(|b| b.uuid == g.uuid) {
            return Err(ChallengeError::MissingGpu {
                uuid: g.uuid.clone(),
            });
        }
    }
    verify_proofs(&r.report, &ch.sizes)?;

    let cpu = cpu_figures(&r.report.cpu);
    let gpus: Vec<GpuMeasured> = r
        .report
        .gpus
        .iter()
        .map(|g| GpuMeasured {
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            figures: gpu_figures(g),
            speed: gpu_speed(g, advertised_gpu(advert, &g.uuid), round_trip),
        })
        .collect();
    let mut verdict = ChallengeVerdict {
        challenge_id: ch.challenge_id,
        provider: ch.provider,
        round_trip_us: micros(round_trip),
        cpu,
        gpus,
        flags: Vec::new(),
    };
    verdict.flags = assess(&verdict, advert, &BTreeMap::new());
    Ok(verdict)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The advert's benchmark of GPU `uuid`, if the advert lists that GPU.
fn advertised_gpu<'a>(advert: &'a CapabilityAdvert, uuid: &str) -> Option<&'a GpuBench> {
    if !advert.gpus.iter().any(|g| g.uuid == uuid) {
        return None;
    }
    advert
        .benchmark
        .as_ref()?
        .gpus
        .iter()
        .find(|b| b.uuid == uuid)
}

/// GFLOP/s → MFLOP/s.
fn mflops(gflops: u64) -> u64 {
    gflops.saturating_mul(1000)
}

/// What a checked answer `g` shows of its GPU's speed, against the
/// advert's benchmark of the same GPU (`None`: not advertised). Call only
/// on a report that passed [`verify_proofs`]: every proof counts as work.
pub fn gpu_speed(g: &GpuBench, advertised: Option<&GpuBench>, round_trip: Duration) -> GpuSpeed {
    let per = u64::try_from(matmul_flops(g.matmul_n)).unwrap_or(u64::MAX);
    let proven: Vec<Precision> = Precision::GPU
        .into_iter()
        .filter(|p| g.proof(*p).is_some())
        .collect();
    let proven_flops = per.saturating_mul(proven.len() as u64);
    // FLOP per µs is MFLOP/s; rounding down keeps it a floor.
    let observed_mflops = proven_flops / micros(round_trip).max(1);
    let claims: Vec<u64> = advertised
        .map(|a| Precision::GPU.map(|p| mflops(a.gflops(p))).to_vec())
        .unwrap_or_default();
    let advertised_mflops = claims.iter().copied().max().unwrap_or(0);
    let slowest = claims.iter().copied().filter(|c| *c > 0).min();
    // A proven precision the advert gives no figure for is taken at the
    // GPU's slowest advertised one.
    let expected_us = slowest.map(|slowest| {
        proven
            .iter()
            .map(|p| {
                let c = mflops(advertised.map_or(0, |a| a.gflops(*p)));
                per.div_ceil(if c > 0 { c } else { slowest })
            })
            .fold(0u64, u64::saturating_add)
    });
    GpuSpeed {
        proven_flops,
        observed_mflops,
        advertised_mflops,
        verified_mflops: observed_mflops.min(advertised_mflops),
        expected_us,
    }
}

/// When a round trip is too long for the speed a provider advertises:
/// more than `slack` times what its advertised figures need for the proven
/// products, plus the allowances (the network, and whatever else the
/// answer does before it is sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpeedPolicy {
    pub slack: u32,
    pub allowance: Duration,
    pub allowance_per_gpu: Duration,
}

impl Default for SpeedPolicy {
    /// Fits today's `kiln-node`, which answers a challenge with its whole
    /// benchmark: per precision a warm-up and three timed trials of the
    /// same product (at least 19 calls, and at least about a second), then
    /// bandwidth tests and input generation on the host (a few seconds per
    /// GPU). So an honest node needs about 19 times the proven compute plus
    /// seconds per GPU, and only a claim more than 20 times too fast fails.
    /// A node that computed each proven product once and answered at once
    /// could be held to a slack of 2 and about a network round trip.
    fn default() -> Self {
        Self {
            slack: 20,
            allowance: Duration::from_secs(5),
            allowance_per_gpu: Duration::from_secs(20),
        }
    }
}

/// A round trip too long for the advertised speed: the claim fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeedShortfall {
    pub round_trip_us: u64,
    /// What the advertised figures need for the proven products.
    pub expected_us: u64,
    /// The longest round trip that would have passed.
    pub allowed_us: u64,
    pub proven_flops: u64,
}

/// Whether `verdict`'s round trip fails the advertised speed under
/// `policy`. Judged over the advertised GPUs (an extra GPU in the answer
/// is the provider's own time); not at all when the advert claims nothing
/// for one of them (there is no claim to fail, and no figure is credited
/// for it either).
pub fn speed_shortfall(
    verdict: &ChallengeVerdict,
    advert: &CapabilityAdvert,
    policy: &SpeedPolicy,
) -> Option<SpeedShortfall> {
    let judged: Vec<&GpuMeasured> = verdict
        .gpus
        .iter()
        .filter(|g| advert.gpus.iter().any(|a| a.uuid == g.uuid))
        .collect();
    if judged.is_empty() {
        return None;
    }
    let mut expected_us = 0u64;
    let mut proven_flops = 0u64;
    for g in &judged {
        expected_us = expected_us.saturating_add(g.speed.expected_us?);
        proven_flops = proven_flops.saturating_add(g.speed.proven_flops);
    }
    let allowed_us = expected_us
        .saturating_mul(u64::from(policy.slack))
        .saturating_add(micros(policy.allowance))
        .saturating_add(micros(policy.allowance_per_gpu).saturating_mul(judged.len() as u64));
    (verdict.round_trip_us > allowed_us).then_some(SpeedShortfall {
        round_trip_us: verdict.round_trip_us,
        expected_us,
        allowed_us,
        proven_flops,
    })
}

/// The longest round trip `policy` lets a challenge at GPU size `n` take
/// before the advert's speed claim fails, from the advert's own figures
/// (each claimed precision's product at its claimed speed): a challenge's
/// deadline should be no shorter, or an answer the claim check would pass
/// fails as late. Zero where there is no claim to check (no GPU, or one
/// the advert gives no figure for; see [`speed_shortfall`]).
pub fn allowed_round_trip(advert: &CapabilityAdvert, n: u32, policy: &SpeedPolicy) -> Duration {
    if advert.gpus.is_empty() {
        return Duration::ZERO;
    }
    let per = u64::try_from(matmul_flops(n)).unwrap_or(u64::MAX);
    let mut expected_us = 0u64;
    for g in &advert.gpus {
        let claims: Vec<u64> = advertised_gpu(advert, &g.uuid)
            .map(|b| Precision::GPU.map(|p| mflops(b.gflops(p))).to_vec())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| *c > 0)
            .collect();
        if claims.is_empty() {
            return Duration::ZERO;
        }
        for c in claims {
            expected_us = expected_us.saturating_add(per.div_ceil(c));
        }
    }
    let gpus = u32::try_from(advert.gpus.len()).unwrap_or(u32::MAX);
    Duration::from_micros(expected_us.saturating_mul(u64::from(policy.slack)))
        .saturating_add(policy.allowance)
        .saturating_add(policy.allowance_per_gpu.saturating_mul(gpus))
}

/// Matrices are sized in steps of this (GEMM kernels tile by it).
pub const MATMUL_N_STEP: u32 = 64;

/// The GPU matmul size for a challenge to `advert`: the smallest multiple
/// of [`MATMUL_N_STEP`] whose proven products need at least `target` at the
/// advertised speed of its fastest GPU (so every GPU's compute is long
/// against the network round trip), never smaller than `base` (the size the
/// advert was measured at: smaller matrices run below peak), at most
/// [`MAX_GPU_MATMUL_N`] and what leaves half of each GPU's memory free (three
/// FP32 matrices). `base` alone where nothing is advertised.
pub fn gpu_matmul_n_for(advert: &CapabilityAdvert, base: u32, target: Duration) -> u32 {
    let base = base.clamp(16, MAX_GPU_MATMUL_N);
    // Seconds per FLOP of each advertised GPU's proven products (one per
    // precision it claims).
    let fastest = advert
        .gpus
        .iter()
        .filter_map(|g| advertised_gpu(advert, &g.uuid))
        .map(|b| {
            Precision::GPU
                .into_iter()
                .filter(|p| b.gflops(*p) > 0)
                .map(|p| 1.0 / (b.gflops(p) as f64 * 1e9))
                .sum::<f64>()
        })
        .filter(|s| *s > 0.0)
        .min_by(f64::total_cmp);
    let Some(secs_per_flop) = fastest else {
        return base;
    };
    let step = f64::from(MATMUL_N_STEP);
    let want = (target.as_secs_f64() / (2.0 * secs_per_flop)).cbrt();
    let want = ((want / step).ceil() * step).min(f64::from(MAX_GPU_MATMUL_N)) as u32;
    let memory = advert
        .gpus
        .iter()
        .map(|g| {
            let n = (g.memory_total.0 as f64 / 2.0 / 12.0).sqrt();
            ((n / step).floor() * step).min(f64::from(MAX_GPU_MATMUL_N)) as u32
        })
        .min()
        .unwrap_or(MAX_GPU_MATMUL_N);
    want.min(memory).max(base)
}

/// Flags of a verdict: its reported figures against the provider's own
/// advert (claims it does not live up to), and each GPU's verified speed
/// against the fleet median of verified speeds of the same model
/// ([`verified_fleet_medians`]). Nothing a provider says about itself sets
/// a fleet baseline: medians of adverts would let a few inflated adverts
/// make every honest card of the model look short.
pub fn assess(
    verdict: &ChallengeVerdict,
    advert: &CapabilityAdvert,
    fleet: &BTreeMap<String, Figures>,
) -> Vec<Flag> {
    let mut flags = Vec::new();
    let advertised = advert.benchmark.as_ref();
    let cpu_adv = advertised.map(|b| cpu_figures(&b.cpu)).unwrap_or_default();
    flags.extend(flag("cpu", &cpu_adv, &verdict.cpu, None));
    for g in &verdict.gpus {
        let adv = advertised
            .and_then(|b| b.gpus.iter().find(|a| a.uuid == g.uuid))
            .map(gpu_figures)
            .unwrap_or_default();
        let mut measured = g.figures.clone();
        measured
            .0
            .insert(Metric::VerifiedMflops, g.speed.verified_mflops);
        // 0: nothing could be credited (no claim to cap it), which is not
        // a figure to hold against the fleet.
        let peers = fleet.get(&g.name).filter(|_| g.speed.verified_mflops > 0);
        flags.extend(flag(&g.uuid, &adv, &measured, peers));
    }
    flags
}

/// Fleet medians of verified GPU speeds by model, from `(model, verified
/// MFLOP/s)` of recent challenges (each GPU's latest): the only baseline
/// [`assess`] compares a GPU with its peers on.
pub fn verified_fleet_medians(speeds: &[(String, u64)]) -> BTreeMap<String, Figures> {
    let mut by_model: BTreeMap<&str, Vec<Figures>> = BTreeMap::new();
    for (model, mflops) in speeds {
        by_model
            .entry(model)
            .or_default()
            .push(Figures(BTreeMap::from([(Metric::VerifiedMflops, *mflops)])));
    }
    by_model
        .into_iter()
        .map(|(k, v)| (k.to_string(), fleet_median(&v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::bench::{MatmulProof, OutputTree, SampleSlices, prove_samples, read_from};
    use kiln_protocol::{
        BenchmarkReport, ByteSize, CpuInfo, Credits, GemmEngine, GpuInfo, Keypair,
    };

    const SIZES: ChallengeSizes = ChallengeSizes {
        gpu_matmul_n: 64,
        cpu_matmul_n: 32,
        samples: 6,
        copy_bytes: 1 << 20,
    };

    struct World {
        coordinator: Keypair,
        provider: Keypair,
        challenge: Signed<Challenge>,
    }

    fn world() -> World {
        let coordinator = Keypair::generate();
        let provider = Keypair::generate();
        let ch = new_challenge(
            ProviderId::from_public_key(&provider.public()),
            Nonce::from_bytes([7; 16]),
            ChallengeId::from_bytes([1; 16]),
            UnixMillis(1_000_000),
            60_000,
            SIZES,
        );
        let challenge =
            Signed::sign_with(&coordinator, ch, Nonce::random(), UnixMillis(u64::MAX)).unwrap();
        World {
            coordinator,
            provider,
            challenge,
        }
    }

    /// An honest `n × n` output of `p`: exact values rounded to `f32`, then
    /// truncated to BF16 or FP16 (within tolerance), little-endian.
    fn honest_output(nonce: &Nonce, p: Precision, n: u32) -> Vec<u8> {
        let inputs = Inputs::new(nonce, p, n);
        output_of(p, (0..n * n).map(|i| inputs.exact(i / n, i % n).value()))
    }

    /// The bytes of an output of `p` holding `values`.
    fn output_of(p: Precision, values: impl Iterator<Item = f64>) -> Vec<u8> {
        let mut out = Vec::new();
        for v in values {
            let f = v as f32;
            match p {
                Precision::Bf16 => {
                    out.extend_from_slice(&((f.to_bits() >> 16) as u16).to_le_bytes())
                }
                Precision::Fp16 => {
                    let t = f32::from_bits(f.to_bits() & 0xFFFF_E000);
                    let h = kiln_protocol::bench::f32_to_f16_exact(t).unwrap_or(0);
                    out.extend_from_slice(&h.to_le_bytes())
                }
                Precision::Fp32 => out.extend_from_slice(&f.to_le_bytes()),
                Precision::Fp64 => out.extend_from_slice(&v.to_le_bytes()),
            }
        }
        out
    }

    /// Commits to `output` and proves the samples it selects.
    fn commit(
        nonce: &Nonce,
        p: Precision,
        n: u32,
        output: &[u8],
    ) -> (Digest32, Vec<Sample>, Vec<Slice>) {
        let tree = OutputTree::of_bytes(output);
        let (samples, slices) =
            prove_samples(nonce, p, n, SIZES.samples, &tree, &read_from(output));
        (tree.root(), samples, slices)
    }

    /// A report whose products hold `outputs` (CPU first, then BF16, FP16
    /// and FP32), each committed to and proven as an honest node does.
    fn report_of(
        nonce: Nonce,
        fig: &[u64; 6],
        cpu_mflops: u64,
        outputs: [Vec<u8>; 4],
    ) -> ProvenReport {
        let [cpu_out, gpu_outs @ ..] = outputs;
        let (cpu_sum, cpu_samples, cpu_slices) =
            commit(&nonce, Precision::Fp64, SIZES.cpu_matmul_n, &cpu_out);
        let mut proofs = Vec::new();
        let mut slices = Vec::new();
        for (p, out) in Precision::GPU.into_iter().zip(gpu_outs) {
            let (checksum, samples, s) = commit(&nonce, p, SIZES.gpu_matmul_n, &out);
            proofs.push(MatmulProof {
                precision: p,
                iterations: 10,
                checksum,
                samples,
            });
            slices.push(s);
        }
        ProvenReport {
            report: BenchmarkReport {
                version: BENCHMARK_VERSION,
                nonce,
                samples: SIZES.samples,
                cpu: CpuBench {
                    model: "cpu".into(),
                    threads: 8,
                    matmul_n: SIZES.cpu_matmul_n,
                    matmul_mflops: cpu_mflops,
                    mem_bandwidth_mbps: 20_000,
                    checksum: cpu_sum,
                    samples: cpu_samples,
                },
                gpus: vec![GpuBench {
                    index: 0,
                    uuid: "GPU-aaaa".into(),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    engine: GemmEngine::Cublas,
                    matmul_n: SIZES.gpu_matmul_n,
                    bf16_gflops: fig[0],
                    fp16_gflops: fig[1],
                    fp32_gflops: fig[2],
                    copy_bytes: SIZES.copy_bytes,
                    d2d_mbps: fig[3],
                    h2d_pinned_mbps: fig[4],
                    d2h_pinned_mbps: fig[5],
                    proofs,
                }],
                measured_at: UnixMillis(1_000_500),
            },
            slices: SampleSlices {
                cpu: cpu_slices,
                gpus: vec![slices],
            },
        }
    }

    /// The four honest outputs for `nonce` (CPU, BF16, FP16, FP32).
    fn honest_outputs(nonce: &Nonce) -> [Vec<u8>; 4] {
        [
            honest_output(nonce, Precision::Fp64, SIZES.cpu_matmul_n),
            honest_output(nonce, Precision::Bf16, SIZES.gpu_matmul_n),
            honest_output(nonce, Precision::Fp16, SIZES.gpu_matmul_n),
            honest_output(nonce, Precision::Fp32, SIZES.gpu_matmul_n),
        ]
    }

    /// What an honest provider answers: every product computed in full,
    /// committed to and proven.
    fn honest_report(nonce: Nonce, fig: &[u64; 6], cpu_mflops: u64) -> ProvenReport {
        report_of(nonce, fig, cpu_mflops, honest_outputs(&nonce))
    }

    const H100: [u64; 6] = [780_000, 780_000, 51_000, 3_000_000, 54_000, 53_000];

    fn advert(w: &World, report: Option<ProvenReport>) -> CapabilityAdvert {
        CapabilityAdvert {
            provider: ProviderId::from_public_key(&w.provider.public()),
            protocol_version: 1,
            node_version: "0".into(),
            listen_addrs: vec![],
            cpu: CpuInfo {
                model: "cpu".into(),
                logical_cores: 8,
                matmul_mflops: 1,
            },
            memory: ByteSize(1 << 30),
            gpus: vec![GpuInfo {
                index: 0,
                uuid: "GPU-aaaa".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total: ByteSize(80 << 30),
                compute_capability: (9, 0),
                driver_version: "580".into(),
                mig: None,
            }],
            slots: 1,
            price_per_cpu_hour: Credits(1),
            price_per_gpu_hour: Credits(1),
            runtime: "runc".into(),
            allows_network: false,
            issued_at: UnixMillis(0),
            region: None,
            disk: ByteSize(0),
            cached: vec![],
            registries: Vec::new(),
            // As an advert carries it: the report alone.
            benchmark: report.map(|r| r.report),
        }
    }

    fn respond(w: &World, report: ProvenReport) -> Signed<ChallengeResponse> {
        let r = ChallengeResponse {
            challenge_id: w.challenge.payload.challenge_id,
            provider: ProviderId::from_public_key(&w.provider.public()),
            report,
            finished_at: UnixMillis(1_010_000),
        };
        Signed::sign_with(&w.provider, r, Nonce::random(), UnixMillis(u64::MAX)).unwrap()
    }

    fn check(
        w: &World,
        resp: &Signed<ChallengeResponse>,
        adv: &CapabilityAdvert,
    ) -> Result<ChallengeVerdict, ChallengeError> {
        check_response(
            &w.challenge,
            &w.coordinator.public(),
            resp,
            adv,
            UnixMillis(1_020_000),
            Duration::from_secs(20),
        )
    }

    /// Flags against peers rest on verified speeds only: an inflated
    /// advert moves no baseline, a GPU far below its model's verified
    /// median is flagged, and honest spread between machines is not.
    #[test]
    fn fleet_flags_use_verified_speeds_not_adverts() {
        let w = world();
        let nonce = w.challenge.payload.nonce;
        let adv = advert(
            &w,
            Some(honest_report(Nonce::from_bytes([9; 16]), &H100, 10_000)),
        );
        let mut v = check(&w, &respond(&w, honest_report(nonce, &H100, 10_000)), &adv).unwrap();
        let model = v.gpus[0].name.clone();
        // Three peers of the model verified at 1,000,000 MFLOP/s; a fourth
        // of another model is not its baseline.
        let fleet = verified_fleet_medians(&[
            (model.clone(), 1_000_000),
            (model.clone(), 1_100_000),
            (model.clone(), 900_000),
            ("Some Other GPU".into(), 10),
        ]);
        assert_eq!(fleet[&model].get(Metric::VerifiedMflops), 1_000_000);
        // (verified MFLOP/s of this GPU, flagged against the fleet)
        for (speed, flagged) in [
            (1_000_000, false),
            (600_000, false), // honest spread: within 50%
            (510_000, false),
            (490_000, true), // half the model's verified speed
            (0, false),      // nothing verified: no figure to compare
        ] {
            v.gpus[0].speed.verified_mflops = speed;
            let flags = assess(&v, &adv, &fleet);
            let got: Vec<(Metric, Baseline)> = flags
                .iter()
                .flat_map(|f| f.shortfalls.iter().map(|s| (s.metric, s.baseline)))
                .collect();
            if flagged {
                assert_eq!(
                    got,
                    vec![(Metric::VerifiedMflops, Baseline::FleetMedian)],
                    "{speed}"
                );
            } else {
                assert!(
                    got.iter().all(|(m, _)| *m != Metric::VerifiedMflops),
                    "{speed}: {got:?}"
                );
            }
        }
        // Without verified peers there is no fleet baseline at all: the
        // figures a provider reports are held to its own advert only.
        v.gpus[0].speed.verified_mflops = 1;
        assert_eq!(assess(&v, &adv, &verified_fleet_medians(&[])), vec![]);
    }

    #[test]
    fn an_honest_response_passes_unflagged() {
        let w = world();
        let nonce = w.challenge.payload.nonce;
        let adv = advert(
            &w,
            Some(honest_report(Nonce::from_bytes([9; 16]), &H100, 10_000)),
        );
        let v = check(&w, &respond(&w, honest_report(nonce, &H100, 10_000)), &adv).unwrap();
        assert_eq!(v.flags, vec![]);
        assert_eq!(v.round_trip_us, 20_000_000);
        assert_eq!(v.gpus[0].figures.get(Metric::Bf16Gflops), 780_000);
        assert_eq!(v.cpu.get(Metric::CpuMatmulMflops), 10_000);
    }

    #[test]
    fn a_provider_advertising_30_percent_more_than_it_delivers_is_flagged() {
        let w = world();
        let nonce = w.challenge.payload.nonce;
        let inflated = H100.map(|x| x * 130 / 100);
        let adv = advert(
            &w,
            Some(honest_report(Nonce::from_bytes([9; 16]), &inflated, 13_000)),
        );
        let v = check(&w, &respond(&w, honest_report(nonce, &H100, 10_000)), &adv).unwrap();
        let gpu = v
            .flags
            .iter()
            .find(|f| f.subject == "GPU-aaaa")
            .expect("GPU flagged");
        assert_eq!(gpu.shortfalls.len(), 6, "{gpu:?}");
        assert!(
            gpu.shortfalls
                .iter()
                .all(|s| s.baseline == Baseline::Advert)
        );
        let cpu = v
            .flags
            .iter()
            .find(|f| f.subject == "cpu")
            .expect("CPU flagged");
        assert_eq!(cpu.shortfalls[0].metric, Metric::CpuMatmulMflops);
        assert_eq!(
            (cpu.shortfalls[0].expected, cpu.shortfalls[0].measured),
            (13_000, 10_000)
        );
    }

    #[test]
    fn rejections_table() {
        let w = world();
        let nonce = w.challenge.payload.nonce;
        let adv = advert(&w, None);
        let honest = || honest_report(nonce, &H100, 10_000);
        let outputs = honest_outputs(&nonce);
        // A CPU output wrong in one element no sample looks at: only the
        // full recomputation of its checksum shows it.
        let cpu_off_unsampled = {
            let n = SIZES.cpu_matmul_n as usize;
            (0..n * n)
                .map(|i| {
                    let mut o = outputs.clone();
                    o[0][8 * i] ^= 1;
                    o
                })
                .find(|o| {
                    let (_, samples, _) =
                        commit(&nonce, Precision::Fp64, SIZES.cpu_matmul_n, &o[0]);
                    let n = SIZES.cpu_matmul_n;
                    let bad = o[0].iter().zip(&outputs[0]).position(|(a, b)| a != b);
                    bad.is_some_and(|b| {
                        samples
                            .iter()
                            .all(|s| (s.row * n + s.col) as usize != b / 8)
                    })
                })
                .expect("an unsampled element")
        };
        // An FP32 product committed to, but all zero: the slices are
        // valid, the values wrong.
        let mut zero_fp32 = outputs.clone();
        zero_fp32[3].fill(0);
        type Tamper = Box<dyn Fn(&mut ProvenReport)>;
        fn gpu(r: &mut ProvenReport) -> &mut MatmulProof {
            &mut r.report.gpus[0].proofs[0]
        }
        let cases: Vec<(&str, Tamper, &str)> = vec![
            (
                "a GPU sample's value (not what the committed output holds)",
                Box::new(|r| {
                    let s = &mut gpu(r).samples[2];
                    s.value_bits = (s.value() + 1.0).to_bits();
                }),
                "NotCommitted",
            ),
            (
                "a CPU sample's value",
                Box::new(|r| {
                    let s = &mut r.report.cpu.samples[0];
                    s.value_bits = (s.value() + 2f64.powi(-22)).to_bits();
                }),
                "NotCommitted",
            ),
            (
                "a product committed to but wrong",
                Box::new(move |r| *r = report_of(nonce, &H100, 10_000, zero_fp32.clone())),
                "SampleMismatch",
            ),
            (
                "a CPU output wrong where nobody samples",
                Box::new(move |r| *r = report_of(nonce, &H100, 10_000, cpu_off_unsampled.clone())),
                "ChecksumMismatch",
            ),
            (
                "another checksum (its positions are others)",
                Box::new(|r| gpu(r).checksum = Digest32::of_bytes(b"forged")),
                "WrongSamples",
            ),
            (
                "a position not derived from the nonce and the checksum",
                Box::new(|r| r.report.gpus[0].proofs[1].samples[0].row ^= 1),
                "WrongSamples",
            ),
            (
                "too few samples",
                Box::new(|r| {
                    r.report.gpus[0].proofs[1].samples.pop();
                }),
                "WrongSamples",
            ),
            (
                "no slices",
                Box::new(|r| r.slices.gpus.clear()),
                "WrongSliceCount",
            ),
            (
                "a truncated slice",
                Box::new(|r| {
                    r.slices.cpu[3].0.pop();
                }),
                "NotCommitted",
            ),
            (
                "a slice altered",
                Box::new(|r| r.slices.gpus[0][2][1].0[70] ^= 4),
                "NotCommitted",
            ),
            (
                "two samples' slices swapped",
                Box::new(|r| r.slices.gpus[0][1].swap(0, 1)),
                "NotCommitted",
            ),
            (
                "throughput without proof",
                Box::new(|r| {
                    r.report.gpus[0].proofs.remove(0);
                }),
                "MissingProof",
            ),
            (
                "other nonce",
                Box::new(|r| r.report.nonce = Nonce::from_bytes([0; 16])),
                "WrongNonce",
            ),
            (
                "other size",
                Box::new(|r| r.report.gpus[0].matmul_n = 128),
                "WrongSize",
            ),
            (
                "other version",
                Box::new(|r| r.report.version = 1),
                "WrongVersion",
            ),
            (
                "advertised GPU missing",
                Box::new(|r| r.report.gpus.clear()),
                "MissingGpu",
            ),
            (
                // Its work would count towards the GPU's speed: checked too.
                "proof of an unclaimed precision",
                Box::new(|r| {
                    r.report.gpus[0].fp16_gflops = 0;
                    r.slices.gpus[0][1][3].0[0] ^= 1;
                }),
                "NotCommitted",
            ),
        ];
        for (what, tamper, want) in cases {
            let mut r = honest();
            tamper(&mut r);
            let err = check(&w, &respond(&w, r), &adv).expect_err(what);
            assert!(format!("{err:?}").starts_with(want), "{what}: {err:?}");
        }
        // A response altered after signing.
        let mut resp = respond(&w, honest());
        resp.payload.report.report.gpus[0].bf16_gflops *= 2;
        assert!(matches!(
            check(&w, &resp, &adv),
            Err(ChallengeError::ResponseSignature(_))
        ));
        // Signed by someone else.
        let mut other = respond(&w, honest());
        let stranger = Keypair::generate();
        other = Signed::sign_with(
            &stranger,
            other.payload,
            Nonce::random(),
            UnixMillis(u64::MAX),
        )
        .unwrap();
        assert!(matches!(
            check(&w, &other, &adv),
            Err(ChallengeError::WrongSigner { .. })
        ));
        // Late.
        let late = check_response(
            &w.challenge,
            &w.coordinator.public(),
            &respond(&w, honest()),
            &adv,
            UnixMillis(1_060_001),
            Duration::from_secs(60),
        );
        assert!(matches!(late, Err(ChallengeError::Late { .. })));
        // Another challenge's answer.
        let mut wrong = respond(&w, honest()).payload;
        wrong.challenge_id = ChallengeId::from_bytes([2; 16]);
        let wrong =
            Signed::sign_with(&w.provider, wrong, Nonce::random(), UnixMillis(u64::MAX)).unwrap();
        assert!(matches!(
            check(&w, &wrong, &adv),
            Err(ChallengeError::WrongChallenge { .. })
        ));
        // A challenge not signed by this coordinator.
        let forged = check_response(
            &w.challenge,
            &Keypair::generate().public(),
            &respond(&w, honest()),
            &adv,
            UnixMillis(1_020_000),
            Duration::from_secs(20),
        );
        assert!(matches!(forged, Err(ChallengeError::ChallengeSignature(_))));
        // And the honest one passes.
        check(&w, &respond(&w, honest()), &adv).unwrap();
    }

    /// A report whose FP32 proof is built by `cheat` (the others honest).
    fn with_fp32(
        nonce: Nonce,
        cheat: impl Fn(&Nonce, u32) -> (Digest32, Vec<Sample>, Vec<Slice>),
    ) -> ProvenReport {
        let mut r = honest_report(nonce, &H100, 10_000);
        let (checksum, samples, slices) = cheat(&nonce, SIZES.gpu_matmul_n);
        r.report.gpus[0].proofs[2].checksum = checksum;
        r.report.gpus[0].proofs[2].samples = samples;
        r.slices.gpus[0][2] = slices;
        r
    }

    /// The exact FP32 value of `C[r][c]`, as an honest GPU would round it.
    fn exact_fp32(nonce: &Nonce, n: u32, (r, c): (u32, u32)) -> f64 {
        f64::from(Inputs::new(nonce, Precision::Fp32, n).exact(r, c).value() as f32)
    }

    #[test]
    fn computing_only_the_sampled_elements_fails() {
        let w = world();
        let nonce = w.challenge.payload.nonce;
        let adv = advert(&w, None);
        let p = Precision::Fp32;
        let want = SIZES.samples;
        let answer = |r| check(&w, &respond(&w, r), &adv);

        // Version 1's trick: a made-up checksum, the exact values where it
        // says to sample, and slices made up around them (the element's
        // chunk in a zero output under zero hashes). They lead nowhere.
        let made_up = with_fp32(nonce, |nonce, n| {
            let checksum = Digest32::of_bytes(b"not computed");
            let len = kiln_protocol::bench::output_len(p, n);
            let (samples, slices) = committed_positions(nonce, &checksum, n, want)
                .into_iter()
                .map(|at| {
                    let v = exact_fp32(nonce, n, at);
                    let off = kiln_protocol::bench::element_offset(p, n, at.0, at.1);
                    let chunk = off / 1024;
                    let size = kiln_protocol::bench::slice_len(len, chunk).unwrap_or(0);
                    let mut slice = vec![0u8; size];
                    let within =
                        size - (len - chunk * 1024).min(1024) as usize + (off % 1024) as usize;
                    slice[within..within + 4].copy_from_slice(&(v as f32).to_le_bytes());
                    (Sample::new(at.0, at.1, v), Slice(slice))
                })
                .unzip();
            (checksum, samples, slices)
        });
        let err = answer(made_up).expect_err("made-up slices");
        assert!(
            matches!(&err, ChallengeError::NotCommitted { why, .. } if why.contains("depth 0")),
            "{err}"
        );

        // Committing to an output it did not compute (zeros) and claiming
        // the exact values where that commitment samples: the slices prove
        // zeros there.
        let zeros = vec![0u8; kiln_protocol::bench::output_len(p, SIZES.gpu_matmul_n) as usize];
        let claimed = with_fp32(nonce, |nonce, n| {
            let (checksum, samples, slices) = commit(nonce, p, n, &zeros);
            let samples = samples
                .iter()
                .map(|s| Sample::new(s.row, s.col, exact_fp32(nonce, n, (s.row, s.col))))
                .collect();
            (checksum, samples, slices)
        });
        let err = answer(claimed).expect_err("claimed values");
        assert!(
            matches!(&err, ChallengeError::NotCommitted { why, .. } if why.contains("committed output holds 0")),
            "{err}"
        );

        // Patching the exact values in where the samples fell and
        // committing again moves the samples (the checksum changed): after
        // 100 rounds, 600 of 4096 elements computed, the samples still
        // land on made-up ones. Passing takes about (4096/600)⁶ ≈ 10⁵
        // rounds here, and 2⁶⁴ at 64 samples with half the work skipped.
        let ground = with_fp32(nonce, |nonce, n| {
            let mut out = zeros.clone();
            for _ in 0..100 {
                let (_, samples, _) = commit(nonce, p, n, &out);
                for s in samples {
                    let off = kiln_protocol::bench::element_offset(p, n, s.row, s.col) as usize;
                    let v = exact_fp32(nonce, n, (s.row, s.col)) as f32;
                    out[off..off + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            commit(nonce, p, n, &out)
        });
        let err = answer(ground).expect_err("ground");
        assert!(
            matches!(
                err,
                ChallengeError::SampleMismatch {
                    precision: Precision::Fp32,
                    ..
                }
            ),
            "{err}"
        );

        // An honest answer passes, and a version-1 answer is told what to do.
        answer(honest_report(nonce, &H100, 10_000)).expect("honest");
        let mut old = honest_report(nonce, &H100, 10_000);
        old.report.version = 1;
        let err = answer(old).expect_err("version 1").to_string();
        assert!(
            err.contains(&format!(
                "upgrade kiln-node to {NODE_VERSION_FOR_BENCHMARK} or later"
            )),
            "{err}"
        );
    }

    #[test]
    fn flag_table() {
        let f = |v: &[(Metric, u64)]| Figures(v.iter().copied().collect());
        use Metric::{Bf16Gflops as B, D2dMbps as D};
        // (advertised, measured, fleet median, flagged baselines)
        type Case = (Figures, Figures, Option<Figures>, Vec<(Metric, Baseline)>);
        let cases: Vec<Case> = vec![
            (f(&[(B, 100)]), f(&[(B, 100)]), None, vec![]),
            (f(&[(B, 100)]), f(&[(B, 90)]), None, vec![]),
            // Exactly 15% below is not "more than 15%".
            (f(&[(B, 100)]), f(&[(B, 85)]), None, vec![]),
            (
                f(&[(B, 100)]),
                f(&[(B, 84)]),
                None,
                vec![(B, Baseline::Advert)],
            ),
            // Advertised 30% above what is delivered.
            (
                f(&[(B, 130)]),
                f(&[(B, 100)]),
                None,
                vec![(B, Baseline::Advert)],
            ),
            // Not advertised: nothing to fall short of.
            (f(&[]), f(&[(B, 50)]), None, vec![]),
            (f(&[(B, 0)]), f(&[(B, 50)]), None, vec![]),
            // Advertised but not delivered at all.
            (
                f(&[(B, 100), (D, 100)]),
                f(&[(B, 100)]),
                None,
                vec![(D, Baseline::Advert)],
            ),
            // Honest about a slow card, but far below its model's fleet.
            (
                f(&[(B, 150)]),
                f(&[(B, 150)]),
                Some(f(&[(B, 200)])),
                vec![(B, Baseline::FleetMedian)],
            ),
            (f(&[(B, 180)]), f(&[(B, 180)]), Some(f(&[(B, 200)])), vec![]),
            // Both at once.
            (
                f(&[(B, 300)]),
                f(&[(B, 100)]),
                Some(f(&[(B, 200)])),
                vec![(B, Baseline::Advert), (B, Baseline::FleetMedian)],
            ),
            // Huge numbers do not overflow.
            (
                f(&[(B, u64::MAX)]),
                f(&[(B, u64::MAX / 2)]),
                None,
                vec![(B, Baseline::Advert)],
            ),
        ];
        for (i, (adv, got, fleet, want)) in cases.into_iter().enumerate() {
            let flagged: Vec<(Metric, Baseline)> = flag("x", &adv, &got, fleet.as_ref())
                .map(|fl| {
                    fl.shortfalls
                        .iter()
                        .map(|s| (s.metric, s.baseline))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(flagged, want, "case {i}");
        }
    }

    #[test]
    fn medians_and_schedule() {
        let f = |b: u64| {
            Figures(BTreeMap::from([
                (Metric::Bf16Gflops, b),
                (Metric::D2dMbps, 0),
            ]))
        };
        let m = fleet_median(&[f(700), f(780), f(790), f(100)]);
        assert_eq!(m.get(Metric::Bf16Gflops), 700);
        assert_eq!(m.get(Metric::D2dMbps), 0, "zeros are not figures");
        assert_eq!(fleet_median(&[]), Figures::default());
        for r in [0, 1, 12345, u64::MAX] {
            let d = next_challenge_in_ms(60_000, r);
            assert!((30_000..90_000).contains(&d), "{d}");
        }
    }

    /// A GPU bench with proofs (unchecked here) for `proven` and the
    /// given claims, GFLOP/s, in BF16, FP16, FP32 order.
    fn bench(uuid: &str, n: u32, gflops: [u64; 3], proven: &[Precision]) -> GpuBench {
        GpuBench {
            index: 0,
            uuid: uuid.into(),
            name: "GPU".into(),
            engine: GemmEngine::Cublas,
            matmul_n: n,
            bf16_gflops: gflops[0],
            fp16_gflops: gflops[1],
            fp32_gflops: gflops[2],
            copy_bytes: 0,
            d2d_mbps: 0,
            h2d_pinned_mbps: 0,
            d2h_pinned_mbps: 0,
            proofs: proven
                .iter()
                .map(|&precision| MatmulProof {
                    precision,
                    iterations: 1,
                    checksum: Digest32::default(),
                    samples: vec![],
                })
                .collect(),
        }
    }

    #[test]
    fn speed_is_proven_work_over_the_round_trip_capped_by_the_claim() {
        use Precision::{Bf16, Fp16, Fp32};
        let us = Duration::from_micros;
        // n = 1000: 2·10⁹ FLOP per proven product.
        let claim = bench("g", 1000, [1_000, 0, 500], &[]);
        // (proven, claimed?, round trip) → (proven FLOP, observed, advertised, verified, expected µs)
        type Case = (&'static [Precision], bool, Duration, GpuSpeed);
        let speed = |p, o, a, v, e| GpuSpeed {
            proven_flops: p,
            observed_mflops: o,
            advertised_mflops: a,
            verified_mflops: v,
            expected_us: e,
        };
        let cases: Vec<Case> = vec![
            // 2·10⁹ FLOP in 1 s: 2 000 MFLOP/s, far below the 10⁶ claimed.
            (
                &[Bf16],
                true,
                us(1_000_000),
                speed(2_000_000_000, 2_000, 1_000_000, 2_000, Some(2_000)),
            ),
            // In 1 ms: 2·10⁶ MFLOP/s, capped at the claim (an answer can be
            // quicker than its work only by skipping it).
            (
                &[Bf16],
                true,
                us(1_000),
                speed(2_000_000_000, 2_000_000, 1_000_000, 1_000_000, Some(2_000)),
            ),
            // Rounded down: a floor stays a floor.
            (
                &[Bf16],
                true,
                us(3),
                speed(
                    2_000_000_000,
                    666_666_666,
                    1_000_000,
                    1_000_000,
                    Some(2_000),
                ),
            ),
            // A zero round trip counts as 1 µs.
            (
                &[Bf16],
                true,
                Duration::ZERO,
                speed(
                    2_000_000_000,
                    2_000_000_000,
                    1_000_000,
                    1_000_000,
                    Some(2_000),
                ),
            ),
            // Three proven products; FP16, not claimed, is expected at the
            // slowest claim (FP32's 500 GFLOP/s): 2 000 + 4 000 + 4 000 µs.
            (
                &[Bf16, Fp16, Fp32],
                true,
                us(6_000_000),
                speed(6_000_000_000, 1_000, 1_000_000, 1_000, Some(10_000)),
            ),
            // Nothing claimed: observed, but nothing to credit or expect.
            (
                &[Fp32],
                false,
                us(1_000),
                speed(2_000_000_000, 2_000_000, 0, 0, None),
            ),
            // No proof: no work.
            (&[], true, us(1_000), speed(0, 0, 1_000_000, 0, Some(0))),
        ];
        for (i, (proven, claimed, rtt, want)) in cases.into_iter().enumerate() {
            let answer = bench("g", 1000, [1_000, 1_000, 1_000], proven);
            let got = gpu_speed(&answer, claimed.then_some(&claim), rtt);
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn a_round_trip_far_longer_than_the_claim_needs_fails_it() {
        let w = world();
        let provider = ProviderId::from_public_key(&w.provider.public());
        let measured = |uuid: &str, expected_us: Option<u64>| GpuMeasured {
            uuid: uuid.into(),
            name: "GPU".into(),
            figures: Figures::default(),
            speed: GpuSpeed {
                proven_flops: 1_000,
                expected_us,
                ..GpuSpeed::default()
            },
        };
        let verdict = |rtt: u64, gpus: Vec<GpuMeasured>| ChallengeVerdict {
            challenge_id: ChallengeId::from_bytes([1; 16]),
            provider,
            round_trip_us: rtt,
            cpu: Figures::default(),
            gpus,
            flags: vec![],
        };
        let mut two = advert(&w, None);
        let mut second = two.gpus[0].clone();
        second.uuid = "GPU-bbbb".into();
        two.gpus.push(second);
        let one = advert(&w, None);
        let policy = |slack, allowance_us, per_gpu_us| SpeedPolicy {
            slack,
            allowance: Duration::from_micros(allowance_us),
            allowance_per_gpu: Duration::from_micros(per_gpu_us),
        };
        let a = "GPU-aaaa";
        // (advert, round trip, GPUs answered, policy, allowed if flagged)
        type Case = (
            CapabilityAdvert,
            u64,
            Vec<GpuMeasured>,
            SpeedPolicy,
            Option<u64>,
        );
        let cases: Vec<Case> = vec![
            (
                one.clone(),
                200,
                vec![measured(a, Some(100))],
                policy(2, 0, 0),
                None,
            ),
            (
                one.clone(),
                201,
                vec![measured(a, Some(100))],
                policy(2, 0, 0),
                Some(200),
            ),
            (
                one.clone(),
                1_200,
                vec![measured(a, Some(100))],
                policy(2, 1_000, 0),
                None,
            ),
            (
                one.clone(),
                1_201,
                vec![measured(a, Some(100))],
                policy(2, 1_000, 0),
                Some(1_200),
            ),
            // Two GPUs: their expected times add up, and so do the allowances.
            (
                two.clone(),
                2_601,
                vec![measured(a, Some(100)), measured("GPU-bbbb", Some(200))],
                policy(2, 1_000, 500),
                Some(2_600),
            ),
            // An advertised GPU with no claim: nothing to fail.
            (
                two.clone(),
                1_000_000,
                vec![measured(a, Some(100)), measured("GPU-bbbb", None)],
                policy(2, 0, 0),
                None,
            ),
            // A GPU the advert does not list is the provider's own time.
            (
                one.clone(),
                1_000_000,
                vec![measured("GPU-extra", Some(1))],
                policy(2, 0, 0),
                None,
            ),
            (
                one.clone(),
                201,
                vec![measured(a, Some(100)), measured("GPU-extra", None)],
                policy(2, 0, 0),
                Some(200),
            ),
            (one, 1_000_000, vec![], policy(2, 0, 0), None),
        ];
        for (i, (adv, rtt, gpus, policy, want)) in cases.into_iter().enumerate() {
            let got = speed_shortfall(&verdict(rtt, gpus), &adv, &policy);
            assert_eq!(got.map(|s| s.allowed_us), want, "case {i}: {got:?}");
        }
    }

    #[test]
    fn a_correct_answer_slower_than_advertised_passes_the_figures_but_fails_the_claim() {
        // It computed every sample right and reported its advert's figures:
        // the answer alone looks like an H100's. Only the round trip the
        // coordinator timed (20 s for the 1.6 MFLOP of n = 64) says otherwise.
        let w = world();
        let nonce = w.challenge.payload.nonce;
        let adv = advert(
            &w,
            Some(honest_report(Nonce::from_bytes([9; 16]), &H100, 10_000)),
        );
        let v = check(&w, &respond(&w, honest_report(nonce, &H100, 10_000)), &adv).unwrap();
        assert_eq!(v.flags, vec![], "its own figures match its advert");
        let g = &v.gpus[0].speed;
        assert_eq!(g.proven_flops, 3 * 2 * 64 * 64 * 64);
        assert_eq!((g.observed_mflops, g.verified_mflops), (0, 0));
        let strict = SpeedPolicy {
            slack: 2,
            allowance: Duration::from_millis(100),
            allowance_per_gpu: Duration::ZERO,
        };
        let s = speed_shortfall(&v, &adv, &strict).expect("the claim fails");
        assert_eq!(s.round_trip_us, 20_000_000);
        assert!(s.expected_us < 10, "{s:?}");
        // The default, which fits today's node (its full benchmark, 25 s
        // of allowance here), lets it be.
        assert_eq!(speed_shortfall(&v, &adv, &SpeedPolicy::default()), None);
    }

    #[test]
    fn the_deadline_covers_what_the_claim_check_allows() {
        let w = world();
        let policy = SpeedPolicy {
            slack: 2,
            allowance: Duration::from_secs(5),
            allowance_per_gpu: Duration::from_secs(20),
        };
        // An H100 at n = 16 384: 8.8 TFLOP at 780, 780 and 51 TFLOP/s is
        // 11.3 + 11.3 + 172.5 ms; twice that, plus 5 s and 20 s for its GPU.
        let adv = advert(
            &w,
            Some(honest_report(Nonce::from_bytes([9; 16]), &H100, 10_000)),
        );
        let t = allowed_round_trip(&adv, 16_384, &policy);
        assert_eq!(
            t,
            Duration::from_micros(2 * (11_278 + 11_278 + 172_473) + 25_000_000)
        );
        // Nothing claimed, or no GPU: nothing to check, no time to allow.
        let bare = advert(&w, None);
        assert_eq!(allowed_round_trip(&bare, 16_384, &policy), Duration::ZERO);
        let mut none = adv.clone();
        none.gpus.clear();
        assert_eq!(allowed_round_trip(&none, 16_384, &policy), Duration::ZERO);
        // One of two GPUs without a claim: the same.
        let mut half = adv.clone();
        let mut second = half.gpus[0].clone();
        second.uuid = "GPU-unclaimed".into();
        half.gpus.push(second);
        assert_eq!(allowed_round_trip(&half, 16_384, &policy), Duration::ZERO);
    }

    #[test]
    fn challenge_size_follows_the_claim() {
        let w = world();
        let target = Duration::from_secs;
        let with = |figs: &[[u64; 3]], memory_gib: u64| {
            let mut adv = advert(&w, None);
            let template = adv.gpus[0].clone();
            adv.gpus.clear();
            let mut report = honest_report(Nonce::from_bytes([9; 16]), &H100, 10_000).report;
            let bench_template = report.gpus[0].clone();
            report.gpus.clear();
            for (i, f) in figs.iter().enumerate() {
                let uuid = format!("GPU-{i}");
                adv.gpus.push(GpuInfo {
                    uuid: uuid.clone(),
                    memory_total: ByteSize(memory_gib << 30),
                    ..template.clone()
                });
                report.gpus.push(GpuBench {
                    uuid,
                    bf16_gflops: f[0],
                    fp16_gflops: f[1],
                    fp32_gflops: f[2],
                    ..bench_template.clone()
                });
            }
            adv.benchmark = Some(report);
            adv
        };
        let h100 = [780_000, 780_000, 51_000];
        // (advert, base n, target, n)
        let cases: Vec<(CapabilityAdvert, u32, Duration, u32)> = vec![
            // An H100's three products at n = 16 384 take 0.2 s: the cap.
            (with(&[h100], 80), 8192, target(1), 16_384),
            // 4 GiB leave room for three FP32 matrices of 13 376² only.
            (with(&[h100], 4), 8192, target(1), 13_376),
            // … but never below the size the advert was measured at.
            (with(&[h100], 1), 8192, target(1), 8192),
            // 1.5 TFLOP/s in FP32 only, 50 µs: ∛(5·10⁻⁵ · 1.5·10¹² / 2) = 335 → 384.
            (
                with(&[[0, 0, 1_500]], 80),
                64,
                Duration::from_micros(50),
                384,
            ),
            (
                with(&[[0, 0, 1_500]], 80),
                512,
                Duration::from_micros(50),
                512,
            ),
            // The fastest GPU sets the size.
            (
                with(&[[0, 0, 1_500], [0, 0, 12_000]], 80),
                64,
                Duration::from_micros(50),
                704,
            ),
            // Nothing advertised, or no time asked for: the base size.
            (with(&[[0, 0, 0]], 80), 512, target(1), 512),
            (advert(&w, None), 4096, target(1), 4096),
            (with(&[h100], 80), 4096, Duration::ZERO, 4096),
            // Bases out of range are brought into it.
            (with(&[[0, 0, 0]], 80), 1, target(1), 16),
            (
                with(&[[0, 0, 0]], 80),
                u32::MAX,
                target(1),
                MAX_GPU_MATMUL_N,
            ),
        ];
        for (i, (adv, base, t, want)) in cases.into_iter().enumerate() {
            let n = gpu_matmul_n_for(&adv, base, t);
            assert_eq!(n, want, "case {i}");
            let sizes = ChallengeSizes {
                gpu_matmul_n: n,
                ..ChallengeSizes::default()
            };
            assert_eq!(sizes.validate(), Ok(()), "case {i}");
        }
    }
}
