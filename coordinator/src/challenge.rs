//! Benchmark challenges, coordinator side: pure functions only (the service
//! decides when to challenge whom and stores the outcome against the
//! provider's reputation).
//!
//! * [`new_challenge`] builds a challenge (a fresh nonce and a deadline);
//! * [`check_response`] checks a provider's signed answer: signatures,
//!   binding to the challenge, the deadline, and the proofs, by recomputing
//!   a few sampled output elements exactly from the nonce (and the whole CPU
//!   output's checksum, which is exact); it returns the measured figures and
//!   the flags against the provider's own advert;
//! * [`flag`] compares measured figures with the advertised ones and with the
//!   fleet median of the same GPU model: a metric more than
//!   [`FLAG_BELOW_PERCENT`]% below either is a shortfall.
//!
//! "Below the fleet median" is read as "more than 15% below it" as well:
//! strictly below the median would flag half of every fleet by definition.

use std::collections::BTreeMap;

use kiln_protocol::bench::{
    Inputs, MAX_FULL_CPU_RECOMPUTE_N, Precision, Sample, cpu_output_digest, sample_positions,
};
use kiln_protocol::{
    BENCHMARK_VERSION, BenchmarkReport, CapabilityAdvert, Challenge, ChallengeId,
    ChallengeResponse, ChallengeSizes, CpuBench, GpuBench, Nonce, ProviderId, PublicKey, Signed,
    UnixMillis,
};
use serde::{Deserialize, Serialize};

/// A measured metric more than this many percent below its baseline is a
/// shortfall.
/// Reputation of a provider never audited (0..=1000).
pub const REPUTATION_START: u32 = 500;

pub const FLAG_BELOW_PERCENT: u64 = 15;

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

fn short_of(expected: u64, measured: u64) -> bool {
    expected > 0
        && u128::from(measured) * 100 < u128::from(expected) * u128::from(100 - FLAG_BELOW_PERCENT)
}

/// Flags `measured` if any metric is more than [`FLAG_BELOW_PERCENT`]%
/// below the advertised figure or the fleet median (a baseline of 0 means
/// "not measured" and is skipped).
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
            if short_of(expected, got) {
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
    #[error("benchmark version {got}, expected {want}")]
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
    #[error("{subject}: {precision} proof samples are not the {want} nonce-derived positions")]
    WrongSamples {
        subject: String,
        precision: Precision,
        want: u32,
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
    pub figures: Figures,
}

/// An accepted response: what was measured and how it compares with the
/// provider's advert.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeVerdict {
    pub challenge_id: ChallengeId,
    pub provider: ProviderId,
    /// From issuing the challenge to receiving the answer.
    pub elapsed_ms: u64,
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

fn check_samples(
    subject: &str,
    nonce: &Nonce,
    precision: Precision,
    n: u32,
    want: u32,
    samples: &[Sample],
) -> Result<(), ChallengeError> {
    let positions = sample_positions(nonce, n, want);
    let at: Vec<(u32, u32)> = samples.iter().map(|s| (s.row, s.col)).collect();
    if at != positions {
        return Err(ChallengeError::WrongSamples {
            subject: subject.into(),
            precision,
            want,
        });
    }
    let inputs = Inputs::new(nonce, precision, n);
    for s in samples {
        let exact = inputs.exact(s.row, s.col);
        if !exact.accepts(precision, n, s.value()) {
            return Err(ChallengeError::SampleMismatch {
                subject: subject.into(),
                precision,
                row: s.row,
                col: s.col,
                got: s.value(),
                expected: exact.value(),
                tolerance: exact.tolerance(precision, n),
            });
        }
    }
    Ok(())
}

/// Checks every proof of a report against the sizes it was measured at:
/// sampled elements by exact recomputation, and the CPU output's checksum
/// in full where `n ≤ MAX_FULL_CPU_RECOMPUTE_N`. Usable on adverts' reports
/// too.
pub fn verify_proofs(
    report: &BenchmarkReport,
    sizes: &ChallengeSizes,
) -> Result<(), ChallengeError> {
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
    check_samples(
        "cpu",
        nonce,
        Precision::Fp64,
        cpu.matmul_n,
        sizes.samples,
        &cpu.samples,
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
    for g in &report.gpus {
        if g.matmul_n != sizes.gpu_matmul_n {
            return Err(ChallengeError::WrongSize {
                subject: g.uuid.clone(),
                got: g.matmul_n,
                want: sizes.gpu_matmul_n,
            });
        }
        for p in Precision::GPU {
            if g.gflops(p) == 0 {
                continue;
            }
            let proof = g.proof(p).ok_or_else(|| ChallengeError::MissingProof {
                subject: g.uuid.clone(),
                precision: p,
            })?;
            check_samples(&g.uuid, nonce, p, g.matmul_n, sizes.samples, &proof.samples)?;
        }
    }
    Ok(())
}

/// Checks a provider's answer to `challenge` (signed by `coordinator`),
/// received at `received_at`, against the provider's current `advert`.
pub fn check_response(
    challenge: &Signed<Challenge>,
    coordinator: &PublicKey,
    response: &Signed<ChallengeResponse>,
    advert: &CapabilityAdvert,
    received_at: UnixMillis,
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
        })
        .collect();
    let mut verdict = ChallengeVerdict {
        challenge_id: ch.challenge_id,
        provider: ch.provider,
        elapsed_ms: received_at.0.saturating_sub(ch.issued_at.0),
        cpu,
        gpus,
        flags: Vec::new(),
    };
    verdict.flags = assess(&verdict, advert, &BTreeMap::new());
    Ok(verdict)
}

/// Flags of a verdict against the advert's benchmark and the fleet medians
/// (by GPU model name; the key `cpu` for CPU figures, if given).
pub fn assess(
    verdict: &ChallengeVerdict,
    advert: &CapabilityAdvert,
    fleet: &BTreeMap<String, Figures>,
) -> Vec<Flag> {
    let mut flags = Vec::new();
    let advertised = advert.benchmark.as_ref();
    let cpu_adv = advertised.map(|b| cpu_figures(&b.cpu)).unwrap_or_default();
    flags.extend(flag("cpu", &cpu_adv, &verdict.cpu, fleet.get("cpu")));
    for g in &verdict.gpus {
        let adv = advertised
            .and_then(|b| b.gpus.iter().find(|a| a.uuid == g.uuid))
            .map(gpu_figures)
            .unwrap_or_default();
        flags.extend(flag(&g.uuid, &adv, &g.figures, fleet.get(&g.name)));
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::bench::MatmulProof;
    use kiln_protocol::{ByteSize, CpuInfo, Credits, Digest32, GemmEngine, GpuInfo, Keypair};

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

    /// What an honest provider computes: exact values, BF16-rounded for the
    /// BF16 proof, f32 for FP32.
    fn honest_report(nonce: Nonce, fig: &[u64; 6], cpu_mflops: u64) -> BenchmarkReport {
        let cpu_inputs = Inputs::new(&nonce, Precision::Fp64, SIZES.cpu_matmul_n);
        let cpu_samples = sample_positions(&nonce, SIZES.cpu_matmul_n, SIZES.samples)
            .into_iter()
            .map(|(r, c)| Sample::new(r, c, cpu_inputs.exact(r, c).value()))
            .collect();
        let proof = |p: Precision| {
            let inputs = Inputs::new(&nonce, p, SIZES.gpu_matmul_n);
            MatmulProof {
                precision: p,
                iterations: 10,
                checksum: Digest32::of_bytes(p.name().as_bytes()),
                samples: sample_positions(&nonce, SIZES.gpu_matmul_n, SIZES.samples)
                    .into_iter()
                    .map(|(r, c)| {
                        let v = inputs.exact(r, c).value() as f32;
                        let v = match p {
                            // Round to BF16 by truncation (within tolerance).
                            Precision::Bf16 => f32::from_bits(v.to_bits() & 0xFFFF_0000),
                            _ => v,
                        };
                        Sample::new(r, c, f64::from(v))
                    })
                    .collect(),
            }
        };
        BenchmarkReport {
            version: BENCHMARK_VERSION,
            nonce,
            samples: SIZES.samples,
            cpu: CpuBench {
                model: "cpu".into(),
                threads: 8,
                matmul_n: SIZES.cpu_matmul_n,
                matmul_mflops: cpu_mflops,
                mem_bandwidth_mbps: 20_000,
                checksum: cpu_output_digest(&nonce, SIZES.cpu_matmul_n),
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
                proofs: vec![
                    proof(Precision::Bf16),
                    proof(Precision::Fp16),
                    proof(Precision::Fp32),
                ],
            }],
            measured_at: UnixMillis(1_000_500),
        }
    }

    const H100: [u64; 6] = [780_000, 780_000, 51_000, 3_000_000, 54_000, 53_000];

    fn advert(w: &World, report: Option<BenchmarkReport>) -> CapabilityAdvert {
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
            benchmark: report,
        }
    }

    fn respond(w: &World, report: BenchmarkReport) -> Signed<ChallengeResponse> {
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
        )
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
        assert_eq!(v.elapsed_ms, 20_000);
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
        type Tamper = Box<dyn Fn(&mut BenchmarkReport)>;
        let cases: Vec<(&str, Tamper, &str)> = vec![
            (
                "GPU sample value",
                Box::new(|r| {
                    let s = &mut r.gpus[0].proofs[0].samples[2];
                    *s = Sample::new(s.row, s.col, s.value() + 1.0);
                }),
                "SampleMismatch",
            ),
            (
                "FP32 sample zeroed",
                Box::new(|r| {
                    let s = &mut r.gpus[0].proofs[2].samples[0];
                    *s = Sample::new(s.row, s.col, 0.0);
                }),
                "SampleMismatch",
            ),
            (
                "CPU checksum",
                Box::new(|r| r.cpu.checksum = Digest32::of_bytes(b"forged")),
                "ChecksumMismatch",
            ),
            (
                "CPU sample",
                Box::new(|r| {
                    let s = &mut r.cpu.samples[0];
                    *s = Sample::new(s.row, s.col, s.value() + 2f64.powi(-22));
                }),
                "SampleMismatch",
            ),
            (
                "sample positions",
                Box::new(|r| r.gpus[0].proofs[1].samples[0].row ^= 1),
                "WrongSamples",
            ),
            (
                "too few samples",
                Box::new(|r| {
                    r.gpus[0].proofs[1].samples.pop();
                }),
                "WrongSamples",
            ),
            (
                "throughput without proof",
                Box::new(|r| {
                    r.gpus[0].proofs.remove(0);
                }),
                "MissingProof",
            ),
            (
                "other nonce",
                Box::new(|r| r.nonce = Nonce::from_bytes([0; 16])),
                "WrongNonce",
            ),
            (
                "other size",
                Box::new(|r| r.gpus[0].matmul_n = 128),
                "WrongSize",
            ),
            (
                "other version",
                Box::new(|r| r.version += 1),
                "WrongVersion",
            ),
            (
                "advertised GPU missing",
                Box::new(|r| r.gpus.clear()),
                "MissingGpu",
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
        resp.payload.report.gpus[0].bf16_gflops *= 2;
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
        );
        assert!(matches!(forged, Err(ChallengeError::ChallengeSignature(_))));
        // And the honest one passes.
        check(&w, &respond(&w, honest()), &adv).unwrap();
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
}
