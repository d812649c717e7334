//! Real values of every message type, for seeds.
//!
//! The fuzzer starts from valid encodings of these (structure-aware seeds):
//! a mutation of a valid `JobOffer` reaches the checks deep inside its
//! decoder far sooner than random bytes would. Everything is deterministic
//! (fixed keys, nonces and times), so regenerated seeds are byte-identical.

use std::collections::BTreeMap;

use kiln_contracts::chain::{ChainBuilder, LedgerEntry};
use kiln_contracts::{AccountId, Applied, Ledger, Op, OpKey};
use kiln_protocol::bench::{
    BenchmarkReport, Challenge, ChallengeId, ChallengeResponse, ChallengeSizes, CpuBench, Digest32,
    GemmEngine, GpuBench, MatmulProof, OutputTree, Precision, ProvenReport, Sample, SampleSlices,
    Slice, read_from,
};
use kiln_protocol::gang::{GangMember, GangOffer, GangRelease, GangStart};
use kiln_protocol::request_auth::RequestAuth;
use kiln_protocol::spec::{ComputeCapability, InputSpec};
use kiln_protocol::{
    ApiAuth, Blob, BuyerId, ByteSize, CancelJob, CapabilityAdvert, Compare, ContentId, CpuInfo,
    Credits, GpuInfo, ImageRef, InputSources, JobId, JobLost, JobOffer, JobResult, JobSpec,
    JobSubmission, Keypair, Manifest, ManifestEntry, MilliCpu, NetRequest, NetResponse,
    NetworkMode, Nonce, OfferId, Outcome, PeerSource, ProviderId, ResourceUsage, Resources,
    ResultReceipt, Seconds, SetStake, Signed, SignedMessage, Tolerance, UnixMillis, UsageReport,
    Verify,
};

/// 2026-01-01T00:00:00Z: when every sample was "made".
pub const NOW: UnixMillis = UnixMillis(1_767_225_600_000);
/// Far in the future: samples verify at [`NOW`] and for a long time after.
pub const EXPIRES: UnixMillis = UnixMillis(4_102_444_800_000);

/// Key `n` (fixed secret bytes): 1 = buyer, 2 = coordinator, 3.. = providers.
pub fn key(n: u8) -> Keypair {
    Keypair::from_secret_bytes([n; 32])
}

pub fn buyer() -> BuyerId {
    BuyerId::new(key(1).public())
}

pub fn coordinator() -> ProviderId {
    ProviderId::from_public_key(&key(2).public())
}

pub fn provider(n: u8) -> ProviderId {
    ProviderId::from_public_key(&key(2 + n).public())
}

pub fn nonce(n: u8) -> Nonce {
    Nonce::from_bytes([n; 16])
}

/// Signs `payload` with key `signer`, deterministic nonce, far expiry.
pub fn sign<T: SignedMessage>(signer: u8, payload: T) -> Signed<T> {
    #[allow(clippy::expect_used)]
    Signed::sign_with(&key(signer), payload, nonce(signer), EXPIRES)
        .expect("sample messages always encode")
}

pub fn image() -> String {
    format!("sha256:{}", "3f".repeat(32))
}

pub fn cid(n: u8) -> ContentId {
    ContentId::of_bytes(&[n; 7])
}

pub fn job_id() -> JobId {
    JobId::derive(&buyer(), &nonce(1))
}

pub fn offer_id(n: u8) -> OfferId {
    OfferId::from_bytes([n; 16])
}

/// Specs from minimal to every field set.
pub fn specs() -> Vec<JobSpec> {
    let minimal = JobSpec::new(image(), vec!["demo".into(), "42".into()]);
    let mut full = JobSpec::new(
        format!("registry.example/kiln/workload:1@{}", image()),
        vec!["matmul".into(), "--n".into(), "512".into()],
    );
    full.entrypoint = Some(vec!["/kiln-workload".into()]);
    full.env = BTreeMap::from([
        ("RUST_LOG".to_string(), "info".to_string()),
        ("SEED".to_string(), "7".to_string()),
    ]);
    full.inputs = vec![
        InputSpec::new(cid(1), "/in/data.bin"),
        InputSpec {
            cid: cid(2),
            path: "/in/weights.bin".into(),
            size: Some(ByteSize(7)),
            url: Some("https://example.com/weights.bin".into()),
        },
        InputSpec::new(manifest().cid(), "/in/dir"),
    ];
    full.output_path = "/out/results".into();
    full.network = NetworkMode::Full;
    full.resources = Resources {
        cpus: MilliCpu(1500),
        memory: ByteSize(2 << 30),
        gpus: 2,
        timeout: Seconds(3600),
        pids: 512,
        max_price_per_hour: Credits(2_000_000),
        disk: ByteSize(200 << 30),
        min_vram: ByteSize(80 << 30),
        gpu_models: vec!["H100".into(), "A100 80GB".into()],
        min_compute_capability: Some(ComputeCapability::new(9, 0)),
        min_tflops: 400,
        region: Some("eu-west".into()),
        min_reputation: 600,
        priority: 10,
        deadline: Some(Seconds(7200)),
        gang: 4,
        mig: Some("1g.10gb".into()),
    };
    full.verify = Verify {
        compare: Compare::Tolerance,
        rtol: Tolerance(1e-3),
        atol: Tolerance(1e-6),
    };
    let mut stdout = minimal.clone();
    stdout.verify.compare = Compare::Stdout;
    stdout.resources.gpus = 1;
    vec![minimal, full, stdout]
}

pub fn spec() -> JobSpec {
    specs().swap_remove(1)
}

pub fn submission() -> JobSubmission {
    JobSubmission {
        spec: spec(),
        label: Some("nightly run".into()),
    }
}

pub fn manifest() -> Manifest {
    let e = |path: &str, n: u8, size: u64, executable: bool| ManifestEntry {
        path: path.into(),
        cid: cid(n),
        size,
        executable,
    };
    #[allow(clippy::expect_used)]
    Manifest::new(vec![
        e("result.npy", 3, 4096, false),
        e("logs/run.txt", 4, 70_000, false),
        e("bin/tool", 5, 1 << 20, true),
        e("a/b/c/d.json", 6, 0, false),
    ])
    .expect("sample paths are clean")
}

pub fn manifests() -> Vec<Manifest> {
    let big = Manifest::new(
        (0..40u8)
            .map(|i| ManifestEntry {
                path: format!("shard-{i:03}.bin"),
                cid: cid(i),
                size: u64::from(i) << 20,
                executable: i % 7 == 0,
            })
            .collect(),
    )
    .unwrap_or_default();
    vec![Manifest::default(), manifest(), big]
}

pub fn benchmark() -> BenchmarkReport {
    let samples = vec![Sample::new(0, 0, 1.5), Sample::new(3, 7, -0.25)];
    BenchmarkReport {
        version: kiln_protocol::BENCHMARK_VERSION,
        nonce: nonce(9),
        samples: 2,
        cpu: CpuBench {
            model: "AMD EPYC 9654".into(),
            threads: 16,
            matmul_n: 256,
            matmul_mflops: 120_000,
            mem_bandwidth_mbps: 40_000,
            checksum: Digest32::of_bytes(b"cpu"),
            samples: samples.clone(),
        },
        gpus: vec![GpuBench {
            index: 0,
            uuid: "GPU-0c1d2e3f-aaaa-bbbb-cccc-000000000001".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            engine: GemmEngine::Cublas,
            matmul_n: 8192,
            bf16_gflops: 780_000,
            fp16_gflops: 770_000,
            fp32_gflops: 60_000,
            copy_bytes: 1 << 30,
            d2d_mbps: 3_000_000,
            h2d_pinned_mbps: 54_000,
            d2h_pinned_mbps: 54_000,
            proofs: vec![MatmulProof {
                precision: Precision::Bf16,
                iterations: 20,
                checksum: Digest32::of_bytes(b"gpu"),
                samples,
            }],
        }],
        measured_at: NOW,
    }
}

pub fn advert(n: u8) -> CapabilityAdvert {
    CapabilityAdvert {
        provider: provider(n),
        protocol_version: kiln_protocol::PROTOCOL_VERSION,
        node_version: "0.2.0".into(),
        listen_addrs: vec![
            "/ip4/10.0.0.7/tcp/4001".into(),
            "/ip4/10.0.0.7/udp/4001/quic-v1".into(),
        ],
        cpu: CpuInfo {
            model: "AMD EPYC 9654".into(),
            logical_cores: 16,
            matmul_mflops: 120_000,
        },
        memory: ByteSize(64 << 30),
        gpus: vec![GpuInfo {
            index: 0,
            uuid: "GPU-0c1d2e3f-aaaa-bbbb-cccc-000000000001".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total: ByteSize(80 << 30),
            compute_capability: (9, 0),
            driver_version: "580.159.04".into(),
            mig: None,
        }],
        slots: 4,
        price_per_cpu_hour: Credits(10_000),
        price_per_gpu_hour: Credits(2_000_000),
        runtime: "runsc".into(),
        allows_network: n.is_multiple_of(2),
        issued_at: NOW,
        benchmark: (n == 1).then(benchmark),
        region: Some("eu-west-1".into()),
        disk: ByteSize(500 << 30),
        cached: vec![cid(1), cid(2)],
        registries: vec!["ghcr.io".into()],
    }
}

pub fn offer(n: u8) -> JobOffer {
    JobOffer {
        offer_id: offer_id(n),
        job_id: job_id(),
        provider: provider(n),
        owner: buyer(),
        spec: spec(),
        price_per_hour: Credits(2_000_000),
        sources: vec![InputSources {
            cid: cid(1),
            peers: vec![PeerSource {
                peer: provider(2),
                addrs: vec!["/ip4/10.0.0.8/tcp/4001".into()],
            }],
        }],
    }
}

pub fn receipt(n: u8) -> ResultReceipt {
    ResultReceipt {
        job_id: job_id(),
        offer_id: offer_id(n),
        provider: provider(n),
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        error: None,
        image_digest: image(),
        input_cids: vec![cid(1), cid(2)],
        output_cid: manifest().cid(),
        stdout_cid: ContentId::of_bytes(b"hello\n"),
        stderr_cid: ContentId::of_bytes(b""),
        started_at: NOW,
        finished_at: UnixMillis(NOW.0 + 61_000),
        usage: ResourceUsage {
            wall_ms: 61_000,
            output_bytes: 1 << 20,
            stdout_bytes: 6,
            stderr_bytes: 0,
            logs_truncated: false,
            log_cap_bytes: 1 << 20,
        },
    }
}

pub fn job_result(n: u8) -> JobResult {
    JobResult {
        job_id: job_id(),
        receipt: sign(2 + n, receipt(n)),
        manifest: manifest(),
        blobs: vec![
            Blob {
                cid: ContentId::of_bytes(b"hello\n"),
                bytes: b"hello\n".to_vec(),
            },
            Blob {
                cid: ContentId::of_bytes(b""),
                bytes: Vec::new(),
            },
        ],
    }
}

pub fn cancel() -> CancelJob {
    CancelJob {
        job_id: job_id(),
        offer_id: offer_id(1),
        provider: provider(1),
        reason: "the buyer cancelled".into(),
    }
}

pub fn tail_logs() -> kiln_protocol::TailLogs {
    kiln_protocol::TailLogs {
        job_id: job_id(),
        offer_id: offer_id(1),
        provider: provider(1),
        stdout_from: 12,
        stderr_from: 0,
    }
}

pub fn lost() -> JobLost {
    JobLost {
        job_id: job_id(),
        offer_id: offer_id(1),
        provider: provider(1),
        reason: "daemon restarted; container reaped".into(),
    }
}

pub fn usage() -> UsageReport {
    UsageReport {
        job_id: job_id(),
        offer_id: offer_id(1),
        provider: provider(1),
        interval: 3,
        wall_ms: 180_000,
    }
}

pub fn stake() -> SetStake {
    SetStake {
        provider: provider(1),
        target: Credits(5_000_000),
    }
}

pub fn challenge() -> Challenge {
    Challenge {
        challenge_id: ChallengeId::from_bytes([4; 16]),
        provider: provider(1),
        nonce: nonce(4),
        issued_at: NOW,
        deadline: UnixMillis(NOW.0 + 600_000),
        sizes: ChallengeSizes {
            gpu_matmul_n: 1024,
            cpu_matmul_n: 128,
            samples: 2,
            copy_bytes: 1 << 20,
        },
    }
}

/// A benchmark output of 5000 bytes and its tree, for real slices.
pub fn bench_output() -> Vec<u8> {
    (0..5000u32).map(|i| (i * 7 % 251) as u8).collect()
}

pub fn challenge_response() -> ChallengeResponse {
    let out = bench_output();
    let tree = OutputTree::of_bytes(&out);
    let read = read_from(&out);
    let slice = |c| Slice(tree.slice(c, &read).unwrap_or_default());
    ChallengeResponse {
        challenge_id: ChallengeId::from_bytes([4; 16]),
        provider: provider(1),
        report: ProvenReport {
            report: benchmark(),
            slices: SampleSlices {
                cpu: vec![slice(0), slice(4)],
                gpus: vec![vec![vec![slice(1), slice(2)]]],
            },
        },
        finished_at: UnixMillis(NOW.0 + 30_000),
    }
}

pub fn gang_offer() -> GangOffer {
    GangOffer {
        offer: offer(1),
        rank: 0,
        size: 2,
        members: (0..2u8)
            .map(|r| GangMember {
                rank: u32::from(r),
                provider: provider(1 + r),
                listen_addrs: vec![format!("/ip4/10.0.0.{}/tcp/4001", 7 + r)],
            })
            .collect(),
        hold_ms: 30_000,
    }
}

pub fn gang_start() -> GangStart {
    GangStart {
        job_id: job_id(),
        offer_id: offer_id(1),
        provider: provider(1),
    }
}

pub fn gang_release() -> GangRelease {
    GangRelease {
        job_id: job_id(),
        offer_id: offer_id(1),
        provider: provider(1),
        reason: "member 1 refused".into(),
    }
}

pub fn request_auth() -> RequestAuth {
    let mut a = RequestAuth::new(coordinator(), "POST", "/v1/jobs", b"{}");
    a.issued_at = NOW;
    a
}

pub fn api_auth() -> ApiAuth {
    ApiAuth {
        method: "GET".into(),
        path: "/v1/jobs?limit=10".into(),
    }
}

/// Every request variant.
pub fn net_requests() -> Vec<NetRequest> {
    vec![
        NetRequest::Register(sign(3, advert(1))),
        NetRequest::Register(sign(4, advert(2))),
        NetRequest::Offer(sign(2, offer(1))),
        NetRequest::Result(Box::new(job_result(1))),
        NetRequest::Cancel(sign(2, cancel())),
        NetRequest::Lost(sign(3, lost())),
        NetRequest::Usage(sign(3, usage())),
        NetRequest::Challenge(sign(2, challenge())),
        NetRequest::Stake(sign(3, stake())),
        NetRequest::GangOffer(sign(2, gang_offer())),
        NetRequest::GangStart(sign(2, gang_start())),
        NetRequest::GangRelease(sign(2, gang_release())),
        NetRequest::MayFetch {
            peer: provider(2),
            cid: cid(1),
        },
        NetRequest::TailLogs(sign(2, tail_logs())),
    ]
}

pub fn net_responses() -> Vec<NetResponse> {
    vec![
        NetResponse::Accepted,
        NetResponse::Rejected {
            reason: "offer expired".into(),
        },
        NetResponse::ChallengeResponse(sign(3, challenge_response())),
        NetResponse::Retry {
            reason: "outputs not fetched yet".into(),
        },
        NetResponse::Logs(kiln_protocol::LogChunk {
            stdout: b"tick 1\ntick 2\n".to_vec(),
            stderr: vec![0xe2, 0x82],
            stdout_total: 14,
            stderr_total: 3,
            ended: false,
        }),
    ]
}

/// A real ledger history: ops applied to a ledger, each recorded by the
/// coordinator's chain builder (key 2), so the entries verify as a chain.
pub fn ledger_chain() -> Vec<Signed<LedgerEntry>> {
    let buyer_acct = AccountId::Buyer(buyer());
    let prov = provider(1);
    let job = job_id();
    let key = |s: &str| OpKey::new(s);
    let ops = vec![
        Op::Deposit {
            key: key("deposit:1"),
            account: buyer_acct,
            amount: Credits(10_000_000),
        },
        Op::Lock {
            key: key(&format!("lock:{job}")),
            job,
            buyer: buyer(),
            amount: Credits(2_000_000),
        },
        Op::SettleInterval {
            key: key("interval:1"),
            job,
            provider: prov,
            cost: Credits(100_000),
            fee_bps: 500,
        },
        Op::Release {
            key: key(&format!("release:{job}")),
            job,
            provider: prov,
            cost: Credits(1_000_000),
            fee_bps: 500,
        },
        Op::Stake {
            key: key("stake:1"),
            provider: prov,
            amount: Credits(100_000),
        },
        Op::Slash {
            key: key("slash:1"),
            provider: prov,
            job,
            amount: Credits(50_000),
            buyer_share_bps: 5000,
            verifier: Some(provider(2)),
            verifier_share_bps: 2000,
        },
    ];
    let mut ledger = Ledger::new();
    let mut chain = ChainBuilder::genesis(key_for_ledger());
    let mut out = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        let Ok(effect) = ledger.apply(op.clone()) else {
            continue;
        };
        let at = UnixMillis(NOW.0 + i as u64 * 1000);
        if let Ok(signed) = chain.append(op, effect, at) {
            out.push(signed);
        }
    }
    out
}

/// The coordinator's key (2), which signs the ledger.
pub fn key_for_ledger() -> Keypair {
    key(2)
}

/// One effect, for views.
pub fn applied() -> Applied {
    Applied::Deposited {
        account: AccountId::Buyer(buyer()),
        amount: Credits(10_000_000),
        balance: Credits(10_000_000),
    }
}

pub fn image_ref() -> ImageRef {
    ImageRef(image())
}
