//! `rest_json`: the REST API's JSON bodies, parsed with `serde_json` as
//! the `kiln` client reads answers and the coordinator reads requests, and
//! the JSON the coordinator stores in its database (ledger ops, specs) and a
//! node its benchmark cache (`ProvenReport`).
//!
//! Input: a selector byte (which body), then the JSON text. A parsed body
//! must serialize and parse back equal (bodies with floats, the offers
//! list, only to a fixed point: `serde_json` parses floats to the nearest
//! representable value only within an ulp).
//!
//! `POST /v1/jobs` is parsed as the coordinator does (`serde_path_to_error`
//! over `Signed<JobSubmission>`); a submission that verifies must verify
//! in its canonical binary form too (the two forms carry one signature).

use kiln_contracts::{AccountId, Applied, Op};
use kiln_protocol::bench::{BenchmarkReport, ProvenReport};
use kiln_protocol::views::{
    AccountView, AuditView, BalancesView, BlobDeletedView, BlobKind, BlobListView, BlobView,
    CancelOutcome, CancelView, ErrorView, EventView, InfoView, JobListView, JobState, JobView,
    LedgerPageView, LedgerRowView, LogsView, MemberState, MemberView, MissingRequest, MissingView,
    OfferSort, OfferView, OffersView, OutputsView, ProviderAuditsView, ProviderView, ProvidersView,
    Role, StatementLineView, StatementView, UploadView, VerificationStatus, VerificationView,
};
use kiln_protocol::{
    ByteSize, ContentId, Credits, JobSpec, JobSubmission, Manifest, MilliCpu, Signed, UnixMillis,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Outcome, Target, Verdict, json_round_trip, short_name, tagged};
use crate::samples as s;

pub static TARGET: Target = Target {
    name: "rest_json",
    about: "serde_json of every kiln_protocol::views body, Signed<JobSubmission> as POST /v1/jobs parses it, stored JSON (ops, specs, manifests)",
    max_len: 16 * 1024,
    seeds,
    dict: &[
        b"null",
        b"true",
        b"\"state\":",
        b"\"job_id\":",
        b"\"spec\":",
        b"\"payload\":",
        b"\"signature\":",
        b"\"receipt\":",
        b"\"members\":",
        b"\"cids\":",
        b"\"entries\":",
        b"\"delta\":\"-1\"",
        b"1e308",
        b"-0",
        b"0.1",
        b"\"bafkr4i",
        b"\"12D3KooW",
        b"\\u0000",
        b"\\ud800",
        "é".as_bytes(),
        "😀".as_bytes(),
    ],
    run,
};

type Check = fn(&[u8]) -> Outcome;

/// Parses `T`, checks the round trip.
fn rt<T>(b: &[u8]) -> Outcome
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(v) = serde_json::from_slice::<T>(b) else {
        return Ok(Verdict::Rejected);
    };
    json_round_trip(&v)?;
    Ok(Verdict::Accepted)
}

/// For bodies with floats: serialize ∘ parse reaches a fixed point.
fn fixed_point<T>(b: &[u8]) -> Outcome
where
    T: Serialize + DeserializeOwned,
{
    let Ok(v) = serde_json::from_slice::<T>(b) else {
        return Ok(Verdict::Rejected);
    };
    let name = short_name::<T>();
    let one = serde_json::to_string(&v).map_err(|e| format!("{name}: {e}"))?;
    let w: T = serde_json::from_str(&one)
        .map_err(|e| format!("{name}: its own JSON does not parse: {e}\n json = {one}"))?;
    let two = serde_json::to_string(&w).map_err(|e| format!("{name}: {e}"))?;
    if one != two {
        return Ok(Verdict::Note(format!(
            "{name}: JSON is not stable under a round trip (a float off by an ulp?)\n one = {one}\n two = {two}"
        )));
    }
    Ok(Verdict::Accepted)
}

/// `POST /v1/jobs`, as `kiln_coordinator::api::submit_job` parses it.
fn submission(b: &[u8]) -> Outcome {
    let de = &mut serde_json::Deserializer::from_slice(b);
    let Ok(signed) = serde_path_to_error::deserialize::<_, Signed<JobSubmission>>(de) else {
        return Ok(Verdict::Rejected);
    };
    json_round_trip(&signed)?;
    let _ = signed.payload.spec.validate();
    if signed.verify(s::NOW).is_err() {
        return Ok(Verdict::Rejected);
    }
    let bytes = signed.to_bytes().map_err(|e| e.to_string())?;
    let bin = Signed::<JobSubmission>::from_bytes(&bytes)
        .map_err(|e| format!("a verified JSON submission's binary form does not decode: {e}"))?;
    if bin.verify(s::NOW).is_err() {
        return Err("a submission verifies from JSON but not in its binary form".into());
    }
    Ok(Verdict::Accepted)
}

/// `GET /v1/ledger`: rows are hex of signed entries (the auditor decodes
/// them one by one).
fn ledger_page(b: &[u8]) -> Outcome {
    let Ok(page) = serde_json::from_slice::<LedgerPageView>(b) else {
        return Ok(Verdict::Rejected);
    };
    json_round_trip(&page)?;
    for row in &page.entries {
        if let Ok(bytes) = row.bytes() {
            let _ = Signed::<kiln_contracts::LedgerEntry>::from_bytes(&bytes);
        }
    }
    Ok(Verdict::Accepted)
}

/// `GET /v1/jobs/{id}/outputs`: the client rebuilds the manifest.
fn outputs(b: &[u8]) -> Outcome {
    let Ok(v) = serde_json::from_slice::<OutputsView>(b) else {
        return Ok(Verdict::Rejected);
    };
    json_round_trip(&v)?;
    if let Ok(m) = v.manifest() {
        let _ = m.cid();
    }
    Ok(Verdict::Accepted)
}

fn job(b: &[u8]) -> Outcome {
    let Ok(v) = serde_json::from_slice::<JobView>(b) else {
        return Ok(Verdict::Rejected);
    };
    json_round_trip(&v)?;
    let _ = v.gang_members();
    let _ = v.state.is_terminal();
    Ok(Verdict::Accepted)
}

const TYPES: &[(&str, Check)] = &[
    ("JobView", job),
    ("JobListView", rt::<JobListView>),
    ("CancelView", rt::<CancelView>),
    ("LogsView", rt::<LogsView>),
    ("OutputsView", outputs),
    ("AccountView", rt::<AccountView<AccountId>>),
    ("LedgerPageView", ledger_page),
    ("BalancesView", rt::<BalancesView<AccountId>>),
    ("StatementView", rt::<StatementView<AccountId, Applied>>),
    ("ProvidersView", rt::<ProvidersView>),
    ("OffersView", fixed_point::<OffersView>),
    ("ProviderAuditsView", rt::<ProviderAuditsView>),
    ("InfoView", rt::<InfoView>),
    ("MissingRequest", rt::<MissingRequest>),
    ("MissingView", rt::<MissingView>),
    ("UploadView", rt::<UploadView>),
    ("BlobListView", rt::<BlobListView>),
    ("BlobDeletedView", rt::<BlobDeletedView>),
    ("ErrorView", rt::<ErrorView>),
    (
        "TransferRequest",
        rt::<kiln_protocol::views::TransferRequest>,
    ),
    ("TransferView", rt::<kiln_protocol::views::TransferView>),
    ("LiveLogsView", rt::<kiln_protocol::views::LiveLogsView>),
    ("Signed<JobSubmission>", submission),
    ("Op", rt::<Op>),
    ("JobSpec", rt::<JobSpec>),
    ("Manifest", rt::<Manifest>),
    // A node's benchmark cache (`benchmark.json`, read back at start-up).
    ("ProvenReport", rt::<ProvenReport>),
    ("BenchmarkReport", rt::<BenchmarkReport>),
];

fn run(data: &[u8]) -> Outcome {
    let Some((&sel, body)) = data.split_first() else {
        return Ok(Verdict::Rejected);
    };
    let (_, check) = TYPES[sel as usize % TYPES.len()];
    check(body)
}

fn index(name: &str) -> u8 {
    TYPES.iter().position(|(n, _)| *n == name).unwrap_or(0) as u8
}

fn member(rank: u32) -> MemberView {
    let r = s::receipt(1);
    MemberView {
        attempt: 1,
        rank,
        provider: s::provider(1),
        offer_id: s::offer_id(1),
        role: if rank == 0 { Role::Run } else { Role::Verify },
        state: MemberState::Delivered,
        outcome: Some(r.outcome),
        reason: None,
        price_per_hour: Credits(2_000_000),
        paid: Credits(33_889),
        cost: Some(Credits(33_889)),
        output_cid: Some(r.output_cid),
        stdout_cid: Some(r.stdout_cid),
        receipt: Some(s::sign(3, r)),
        manifest: Some(s::manifest()),
        started_at: Some(s::NOW),
        observed_ms: Some(61_000),
    }
}

fn job_view() -> JobView {
    let r = s::receipt(1);
    JobView {
        job_id: s::job_id(),
        owner: s::buyer(),
        label: Some("nightly".into()),
        state: JobState::Completed,
        reason: None,
        provider: Some(s::provider(1)),
        attempts: 1,
        price_per_hour: Some(Credits(2_000_000)),
        max_cost: Credits(8_000_000),
        cost: Some(Credits(33_889)),
        exit_code: Some(0),
        output_cid: Some(r.output_cid),
        stdout_cid: Some(r.stdout_cid),
        stderr_cid: Some(r.stderr_cid),
        receipt_verified: true,
        logs_truncated: Some(false),
        usage: Some(r.usage.clone()),
        receipt: Some(s::sign(3, r)),
        spec: s::spec(),
        created_at: s::NOW,
        updated_at: UnixMillis(s::NOW.0 + 70_000),
        events: vec![
            EventView {
                at: s::NOW,
                state: JobState::Queued,
                detail: None,
            },
            EventView {
                at: UnixMillis(s::NOW.0 + 70_000),
                state: JobState::Completed,
                detail: Some("exit 0".into()),
            },
        ],
        members: vec![member(0)],
        gang: Some(vec![member(0), member(1)]),
        verification: Some(VerificationView {
            status: VerificationStatus::Verified,
            p_ppm: 50_000,
            detail: "verified by re-execution".into(),
            verifiers: vec![s::provider(2)],
            record: "{}".into(),
            signature: "00".repeat(64),
            signer: s::coordinator(),
        }),
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut add = |name: &str, v: Result<Vec<u8>, serde_json::Error>| {
        if let Ok(body) = v {
            out.push(tagged(index(name), &body));
        }
    };
    fn j<T: Serialize>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(v)
    }
    let job = job_view();
    let acct = AccountId::Buyer(s::buyer());
    add("JobView", j(&job));
    let mut queued = job.clone();
    queued.state = JobState::Queued;
    queued.events.clear();
    queued.members.clear();
    queued.gang = None;
    queued.verification = None;
    queued.receipt = None;
    add(
        "JobListView",
        j(&JobListView {
            jobs: vec![queued, job.clone()],
        }),
    );
    for outcome in [
        CancelOutcome::Cancelled,
        CancelOutcome::AlreadyEnded(JobState::Failed),
    ] {
        add(
            "CancelView",
            j(&CancelView {
                job_id: s::job_id(),
                outcome,
            }),
        );
    }
    add(
        "LogsView",
        j(&LogsView {
            job_id: s::job_id(),
            rank: Some(0),
            provider: s::provider(1),
            stdout: "hello\n".into(),
            stderr: String::new(),
            stdout_cid: ContentId::of_bytes(b"hello\n"),
            stderr_cid: ContentId::of_bytes(b""),
            truncated: false,
            clipped: false,
        }),
    );
    add(
        "OutputsView",
        j(&OutputsView {
            job_id: s::job_id(),
            output_cid: s::manifest().cid(),
            entries: s::manifest().entries,
        }),
    );
    add(
        "AccountView",
        j(&AccountView {
            account: acct,
            balance: Credits(7_000_000),
            escrowed: Credits(2_000_000),
        }),
    );
    add(
        "LedgerPageView",
        j(&LedgerPageView {
            entries: s::ledger_chain()
                .iter()
                .enumerate()
                .take(3)
                .map(|(i, e)| LedgerRowView {
                    seq: i as u64,
                    entry: hex::encode(e.to_bytes().unwrap_or_default()),
                })
                .collect(),
            next: Some(3),
        }),
    );
    add(
        "BalancesView",
        j(&BalancesView {
            balances: [(acct, Credits(7)), (AccountId::Fee, Credits(1))]
                .into_iter()
                .collect(),
        }),
    );
    add(
        "StatementView",
        j(&StatementView {
            account: acct,
            balance: Credits(7_000_000),
            entries: vec![StatementLineView {
                seq: 0,
                at: s::NOW,
                op: "deposit".into(),
                key: "deposit:1".into(),
                delta: -170_141_183_460_469_231_731_687_303_715_884_105_728,
                effect: s::applied(),
            }],
            next: Some(1),
        }),
    );
    let advert = s::advert(1);
    add(
        "ProvidersView",
        j(&ProvidersView {
            providers: vec![ProviderView {
                provider: advert.provider,
                last_seen: s::NOW,
                cpu: advert.cpu.clone(),
                memory: advert.memory,
                gpus: advert.gpus.clone(),
                slots: advert.slots,
                price_per_cpu_hour: advert.price_per_cpu_hour,
                price_per_gpu_hour: advert.price_per_gpu_hour,
                benchmark: advert.benchmark.clone(),
                reputation: 700,
                earned: Credits(1),
                addrs: advert.listen_addrs.clone(),
                cached: advert.cached.clone(),
                verified_tflops: Some(512),
            }],
        }),
    );
    add(
        "OffersView",
        j(&OffersView {
            query: "gpu=H100 region=eu".into(),
            sort: OfferSort::TflopsPerPrice,
            offers: vec![OfferView {
                provider: s::provider(1),
                region: Some("eu-west-1".into()),
                gpu_name: Some("NVIDIA H100 80GB HBM3".into()),
                num_gpus: 8,
                free_gpus: 2,
                vram: ByteSize(80 << 30),
                compute_capability: Some("9.0".into()),
                tflops: Some(780),
                price_per_gpu_hour: Credits(2_000_000),
                price_per_cpu_hour: Credits(10_000),
                tflops_per_price: 0.39,
                cpus: MilliCpu(64_000),
                free_cpus: MilliCpu(12_500),
                memory: ByteSize(512 << 30),
                free_memory: ByteSize(100 << 30),
                disk: ByteSize(1 << 40),
                free_disk: ByteSize(1 << 39),
                slots: 8,
                free_slots: 2,
                reputation: 650,
                allows_network: false,
                cached: 12,
            }],
        }),
    );
    add(
        "ProviderAuditsView",
        j(&ProviderAuditsView {
            provider: s::provider(1),
            reputation: 650,
            audits: vec![AuditView {
                at: s::NOW,
                challenge_id: s::challenge().challenge_id,
                outcome: kiln_protocol::views::AuditOutcome::Flagged,
                detail: "bf16 at 61% of the advert".into(),
            }],
        }),
    );
    add(
        "InfoView",
        j(&InfoView {
            peer_id: s::coordinator(),
            public_key: s::key(2).public(),
            p2p_addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            version: "0.2.0".into(),
            faucet: Some(Credits(10_000_000)),
        }),
    );
    add(
        "TransferRequest",
        j(&kiln_protocol::views::TransferRequest {
            kind: kiln_protocol::views::TransferKind::Deposit,
            account: format!("buyer:{}", s::buyer()),
            amount: Credits(25_000_000),
            reference: "wire-2041".into(),
        }),
    );
    add(
        "TransferView",
        j(&kiln_protocol::views::TransferView {
            kind: kiln_protocol::views::TransferKind::Payout,
            account: format!("provider:{}", s::provider(1)),
            amount: Credits(3_200_000),
            reference: "payout-77".into(),
            applied: true,
            balance: Credits(0),
        }),
    );
    add(
        "LiveLogsView",
        j(&kiln_protocol::views::LiveLogsView {
            job_id: s::job_id(),
            rank: 0,
            state: kiln_protocol::JobState::Running,
            stdout: "tick 1\n".into(),
            stderr: String::new(),
            stdout_next: 7,
            stderr_next: 0,
            live: true,
        }),
    );
    add(
        "MissingRequest",
        j(&MissingRequest {
            cids: vec![s::cid(1), s::manifest().cid()],
        }),
    );
    add(
        "MissingView",
        j(&MissingView {
            missing: vec![s::cid(1)],
        }),
    );
    add(
        "UploadView",
        j(&UploadView {
            cid: s::cid(1),
            size: 7,
            stored: Some(true),
        }),
    );
    add(
        "BlobListView",
        j(&BlobListView {
            blobs: vec![BlobView {
                cid: s::manifest().cid(),
                size: 1 << 20,
                name: "results/".into(),
                kind: BlobKind::Directory,
                created_at: s::NOW,
                held: true,
                files: Some(3),
                content_size: Some(3 << 20),
            }],
            used: 1 << 20,
            quota: Some(1 << 30),
        }),
    );
    add(
        "BlobDeletedView",
        j(&BlobDeletedView {
            cid: s::cid(1),
            size: 7,
            erased: false,
            used: 0,
        }),
    );
    add(
        "ErrorView",
        j(&ErrorView {
            error: "invalid job spec: resources.memory: must be at least 8 MiB".into(),
            field: Some("spec.resources.memory".into()),
        }),
    );
    add("Signed<JobSubmission>", j(&s::sign(1, s::submission())));
    for e in s::ledger_chain() {
        add("Op", j(&e.payload.op));
    }
    for spec in s::specs() {
        add("JobSpec", j(&spec));
    }
    add("Manifest", j(&s::manifest()));
    add("ProvenReport", j(&s::challenge_response().report));
    add("BenchmarkReport", j(&s::benchmark()));
    out
}
