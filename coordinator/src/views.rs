//! The coordinator's records as the REST API's typed bodies
//! ([`kiln_protocol::views`], which the `kiln` client reads): one small
//! conversion per record, so [`crate::api`] and [`crate::blob_api`] build
//! no JSON by hand.
//!
//! Uses only the records' modules (`jobs`, `db`, `sched`, `lifecycle`),
//! never the HTTP layer above it.

use kiln_contracts::chain::LedgerEntry;
use kiln_contracts::{AccountId, Applied};
use kiln_protocol::views::{
    BlobKind, BlobView, CancelOutcome, EventView, JobState, JobView, MemberView, OfferSort,
    ProviderView, StatementLineView, VerificationView,
};
use kiln_protocol::{Credits, Signed, UnixMillis};
use serde::Serialize;

use crate::db::{BlobRecord, DbError, ProviderRecord};
use crate::jobs::{JobEvent, JobRecord, Member};
use crate::lifecycle::cancel;
use crate::sched::SortBy;

/// A job without its history (`events`, `members`, `gang` empty): what
/// `POST /v1/jobs` and each entry of `GET /v1/jobs` answer.
pub fn job(j: &JobRecord) -> JobView {
    let r = j.receipt.as_ref().map(|r| &r.payload);
    JobView {
        job_id: j.id,
        owner: j.owner,
        label: j.label.clone(),
        state: j.state,
        reason: j.reason.clone(),
        provider: j.provider,
        attempts: j.attempts,
        price_per_hour: j.price_per_hour,
        max_cost: j.max_cost,
        cost: j.cost,
        exit_code: j.exit_code,
        output_cid: r.map(|r| r.output_cid),
        stdout_cid: r.map(|r| r.stdout_cid),
        stderr_cid: r.map(|r| r.stderr_cid),
        receipt_verified: j.receipt.is_some(),
        logs_truncated: r.map(|r| r.usage.logs_truncated),
        usage: r.map(|r| r.usage.clone()),
        receipt: j.receipt.clone(),
        spec: j.spec.clone(),
        created_at: j.created_at,
        updated_at: j.updated_at,
        events: Vec::new(),
        members: Vec::new(),
        gang: None,
        verification: None,
    }
}

/// A job's audit record, as its buyer reads it (signed by `signer`).
pub fn verification(
    a: &crate::jobs::verifications::AuditRow,
    verifiers: Vec<kiln_protocol::ProviderId>,
    signer: kiln_protocol::ProviderId,
) -> VerificationView {
    VerificationView {
        status: a.status,
        p_ppm: a.decision.p().parts(),
        detail: a.detail.clone(),
        verifiers,
        record: a.record_json.clone(),
        signature: a.signature.clone(),
        signer,
    }
}

/// One member execution; `observed_ms` runs from when the coordinator saw
/// it start to its result, or to `now` while it runs.
pub fn member(m: &Member, now: UnixMillis) -> MemberView {
    let r = m.receipt.as_ref().map(|r| &r.payload);
    MemberView {
        attempt: m.attempt,
        rank: m.rank,
        provider: m.provider,
        offer_id: m.offer_id,
        role: m.role,
        state: m.state,
        outcome: m.outcome,
        reason: m.reason.clone(),
        price_per_hour: m.price_per_hour,
        paid: m.paid,
        cost: m.cost,
        output_cid: r.map(|r| r.output_cid),
        stdout_cid: r.map(|r| r.stdout_cid),
        receipt: m.receipt.clone(),
        manifest: m.manifest.clone(),
        started_at: m.started_at,
        observed_ms: m
            .started_at
            .map(|s| m.result_at.unwrap_or(now).0.saturating_sub(s.0)),
    }
}

/// One recorded state change (its state is stored as the state's string).
pub fn event(e: &JobEvent) -> Result<EventView, DbError> {
    let state: JobState = e
        .state
        .parse()
        .map_err(|e: kiln_protocol::views::UnknownVariant| DbError::Corrupt {
            table: "job_events",
            reason: e.to_string(),
        })?;
    Ok(EventView {
        at: UnixMillis(e.at),
        state,
        detail: e.detail.clone(),
    })
}

/// `GET /v1/jobs/{id}`: a [`JobView`] with its `events`, `gang` (a gang
/// job's members) and `members`. `members` is sent for every job, `[]` for
/// one never placed, as it always was; [`JobView`] alone leaves an empty
/// list out (so that it also reads list entries), hence this wrapper. It
/// reads back as a [`JobView`].
#[derive(Clone, Debug, Serialize)]
pub struct JobDetail {
    #[serde(flatten)]
    job: JobView,
    members: Vec<MemberView>,
}

impl JobDetail {
    /// `job` with its events and every member execution of every attempt
    /// (oldest first); `gang` is set for a gang job (`resources.gang > 1`).
    pub fn new(j: &JobRecord, events: Vec<EventView>, members: Vec<MemberView>) -> Self {
        let mut job = job(j);
        job.events = events;
        job.gang = (j.size() > 1).then(|| members.clone());
        Self { job, members }
    }

    /// With its audit record.
    pub fn with_verification(mut self, v: Option<VerificationView>) -> Self {
        self.job.verification = v;
        self
    }

    /// As the client reads it.
    pub fn into_view(self) -> JobView {
        JobView {
            members: self.members,
            ..self.job
        }
    }
}

/// What the cancel route answers for what [`cancel::cancel`] did.
impl From<cancel::CancelOutcome> for CancelOutcome {
    fn from(o: cancel::CancelOutcome) -> Self {
        match o {
            cancel::CancelOutcome::Cancelled => Self::Cancelled,
            cancel::CancelOutcome::Cancelling => Self::Cancelling,
            cancel::CancelOutcome::AlreadyEnded(s) => Self::AlreadyEnded(s),
        }
    }
}

/// One live provider: its advert's facts, with its reputation and its
/// ledger balance.
/// `verified_tflops`: from the live fleet (what challenges measured).
pub fn provider(
    p: &ProviderRecord,
    reputation: u32,
    earned: Credits,
    verified_tflops: Option<u32>,
) -> ProviderView {
    let a = &p.advert.payload;
    ProviderView {
        provider: a.provider,
        last_seen: p.last_seen,
        cpu: a.cpu.clone(),
        memory: a.memory,
        gpus: a.gpus.clone(),
        slots: a.slots,
        price_per_cpu_hour: a.price_per_cpu_hour,
        price_per_gpu_hour: a.price_per_gpu_hour,
        benchmark: a.benchmark.clone(),
        reputation,
        earned,
        addrs: a.listen_addrs.clone(),
        cached: a.cached.clone(),
        verified_tflops,
    }
}

/// One line of `account`'s statement: ledger entry `seq` (its canonical
/// bytes, as stored) and how it moved the account.
pub fn statement_line(
    seq: u64,
    bytes: &[u8],
    account: &AccountId,
) -> Result<StatementLineView<Applied>, DbError> {
    let entry = Signed::<LedgerEntry>::from_bytes(bytes).map_err(|e| DbError::Corrupt {
        table: "ledger_entries",
        reason: format!("entry {seq} is unreadable: {e}"),
    })?;
    let e = entry.payload;
    let delta = crate::bank::touches(&e.effect, account).ok_or_else(|| DbError::Corrupt {
        table: "ledger_accounts",
        reason: format!("entry {seq} is indexed under {account} but does not move it"),
    })?;
    Ok(StatementLineView {
        seq,
        at: e.at,
        op: e.op.name().to_string(),
        key: e.op.key().as_str().to_string(),
        delta,
        effect: e.effect,
    })
}

pub fn offer_sort(s: SortBy) -> OfferSort {
    match s {
        SortBy::Price => OfferSort::Price,
        SortBy::TflopsPerPrice => OfferSort::TflopsPerPrice,
        SortBy::Reputation => OfferSort::Reputation,
    }
}

/// A blob the caller may read; `held`: whether the store holds it now.
/// `manifest`: a directory's manifest, when it is held here.
pub fn blob(b: BlobRecord, held: bool, node: Option<&kiln_protocol::DagNode>) -> BlobView {
    use kiln_protocol::DagNode;
    BlobView {
        kind: match node {
            Some(DagNode::Image(_)) => BlobKind::Image,
            _ => BlobKind::of(&b.cid),
        },
        cid: b.cid,
        size: b.size,
        name: b.name,
        created_at: b.created_at,
        held,
        files: node.map(|n| n.children().len() as u64),
        content_size: node.map(DagNode::total_size),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use kiln_protocol::views::MemberState;
    use kiln_protocol::{
        ByteSize, ContentId, JobId, JobSpec, Keypair, Manifest, ManifestEntry, MilliCpu, Nonce,
        OfferId, Outcome, ProviderId, ResourceUsage, ResultReceipt, Signed,
    };
    use serde_json::{Value, json};

    use super::*;

    const NOW: UnixMillis = UnixMillis(1_700_000_009_000);

    /// What `api.rs` built by hand before the views (`job_json`), kept
    /// here as the wire format the views must reproduce.
    fn old_job_json(j: &JobRecord) -> Value {
        let r = j.receipt.as_ref().map(|r| &r.payload);
        json!({
            "job_id": j.id,
            "owner": j.owner,
            "label": j.label,
            "state": j.state,
            "reason": j.reason,
            "provider": j.provider,
            "attempts": j.attempts,
            "price_per_hour": j.price_per_hour,
            "max_cost": j.max_cost,
            "cost": j.cost,
            "exit_code": j.exit_code,
            "output_cid": r.map(|r| r.output_cid),
            "stdout_cid": r.map(|r| r.stdout_cid),
            "stderr_cid": r.map(|r| r.stderr_cid),
            "receipt_verified": j.receipt.is_some(),
            "logs_truncated": r.map(|r| r.usage.logs_truncated),
            "usage": r.map(|r| &r.usage),
            "receipt": j.receipt,
            "spec": j.spec,
            "created_at": j.created_at,
            "updated_at": j.updated_at,
        })
    }

    /// The old `members_json`, with `now` fixed.
    fn old_members_json(ms: &[Member], now: UnixMillis) -> Value {
        Value::Array(
            ms.iter()
                .map(|m| {
                    json!({
                        "attempt": m.attempt,
                        "rank": m.rank,
                        "provider": m.provider,
                        "offer_id": m.offer_id,
                        "state": m.state.as_str(),
                        "outcome": m.outcome,
                        "reason": m.reason,
                        "price_per_hour": m.price_per_hour,
                        "paid": m.paid,
                        "cost": m.cost,
                        "started_at": m.started_at,
                        "observed_ms": m.started_at.map(|s| m.result_at.unwrap_or(now).0.saturating_sub(s.0)),
                        "output_cid": m.receipt.as_ref().map(|r| r.payload.output_cid),
                        "stdout_cid": m.receipt.as_ref().map(|r| r.payload.stdout_cid),
                        "receipt": m.receipt,
                        "manifest": m.manifest,
                    })
                })
                .collect(),
        )
    }

    /// The old `get_job` body.
    fn old_get_job(j: &JobRecord, events: &[JobEvent], ms: &[Member]) -> Value {
        let mut v = old_job_json(j);
        v["events"] = json!(events);
        let members = old_members_json(ms, NOW);
        if j.size() > 1 {
            v["gang"] = members.clone();
        }
        v["members"] = members;
        v
    }

    fn key() -> Keypair {
        Keypair::from_secret_bytes([3; 32])
    }

    fn receipt(job: JobId, offer: OfferId) -> Signed<ResultReceipt> {
        let manifest = manifest();
        let r = ResultReceipt {
            job_id: job,
            offer_id: offer,
            provider: ProviderId::from_public_key(&key().public()),
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            error: None,
            image_digest: format!("sha256:{}", "ab".repeat(32)),
            input_cids: vec![ContentId::of_bytes(b"in")],
            output_cid: manifest.cid(),
            stdout_cid: ContentId::of_bytes(b"hello\n"),
            stderr_cid: ContentId::of_bytes(b""),
            started_at: UnixMillis(1_700_000_000_000),
            finished_at: UnixMillis(1_700_000_001_500),
            usage: ResourceUsage {
                wall_ms: 1500,
                output_bytes: 6,
                stdout_bytes: 6,
                stderr_bytes: 0,
                logs_truncated: true,
                log_cap_bytes: 1 << 20,
            },
        };
        Signed::sign_with(
            &key(),
            r,
            Nonce::from_bytes([9; 16]),
            UnixMillis(1_700_000_600_000),
        )
        .unwrap()
    }

    fn manifest() -> Manifest {
        Manifest::new(vec![ManifestEntry {
            path: "result.txt".into(),
            cid: ContentId::of_bytes(b"seed=7"),
            size: 6,
            executable: false,
        }])
        .unwrap()
    }

    fn job(gang: u32, done: bool) -> JobRecord {
        let id = JobId::from_bytes([7; 16]);
        let offer = OfferId::from_bytes([8; 16]);
        let mut spec = JobSpec::new(
            format!("sha256:{}", "ab".repeat(32)),
            vec!["echo".into(), "hi".into()],
        );
        spec.resources.cpus = MilliCpu(500);
        spec.resources.memory = ByteSize(64 << 20);
        spec.resources.gang = gang;
        JobRecord {
            id,
            owner: kiln_protocol::BuyerId::new(Keypair::from_secret_bytes([1; 32]).public()),
            spec,
            label: done.then(|| "demo".into()),
            state: if done {
                JobState::Completed
            } else {
                JobState::Queued
            },
            reason: (!done).then(|| "1 online; 1 excluded by slots".into()),
            provider: done.then(|| ProviderId::from_public_key(&key().public())),
            offer_id: done.then_some(offer),
            attempts: u32::from(done) * 2,
            price_per_hour: done.then_some(Credits(500_000)),
            max_cost: Credits(5_000_000),
            cost: done.then_some(Credits(209)),
            exit_code: done.then_some(0),
            receipt: done.then(|| receipt(id, offer)),
            manifest: done.then(manifest),
            created_at: UnixMillis(1_700_000_000_000),
            updated_at: UnixMillis(1_700_000_002_000),
        }
    }

    fn members(j: &JobRecord) -> Vec<Member> {
        let p = ProviderId::from_public_key(&key().public());
        let base = Member {
            offer_id: OfferId::from_bytes([3; 16]),
            job_id: j.id,
            attempt: 1,
            rank: 0,
            provider: p,
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            price_per_hour: Credits(250_000),
            state: MemberState::Released,
            reason: Some("released: rank 1 refused".into()),
            outcome: None,
            paid: Credits(0),
            cost: None,
            receipt: None,
            manifest: None,
            started_at: None,
            result_at: None,
            paid_at: None,
            role: crate::jobs::Role::Run,
        };
        let offer = OfferId::from_bytes([8; 16]);
        vec![
            base.clone(),
            // Started, no result yet: observed until now.
            Member {
                offer_id: OfferId::from_bytes([4; 16]),
                rank: 1,
                attempt: 2,
                state: MemberState::Started,
                reason: None,
                paid: Credits(40),
                started_at: Some(UnixMillis(1_700_000_000_300)),
                paid_at: Some(UnixMillis(1_700_000_005_000)),
                ..base.clone()
            },
            Member {
                offer_id: offer,
                attempt: 2,
                state: MemberState::Delivered,
                reason: None,
                outcome: Some(Outcome::Succeeded),
                paid: Credits(105),
                cost: Some(Credits(105)),
                receipt: Some(receipt(j.id, offer)),
                manifest: Some(manifest()),
                started_at: Some(UnixMillis(1_700_000_000_300)),
                result_at: Some(UnixMillis(1_700_000_001_800)),
                paid_at: Some(UnixMillis(1_700_000_001_800)),
                ..base
            },
        ]
    }

    fn events() -> Vec<JobEvent> {
        vec![
            JobEvent {
                at: 1_700_000_000_000,
                state: "queued".into(),
                detail: None,
            },
            JobEvent {
                at: 1_700_000_000_100,
                state: "dispatched".into(),
                detail: Some("gang of 2".into()),
            },
            JobEvent {
                at: 1_700_000_002_000,
                state: "completed".into(),
                detail: None,
            },
        ]
    }

    fn detail(j: &JobRecord, evs: &[JobEvent], ms: &[Member]) -> JobDetail {
        JobDetail::new(
            j,
            evs.iter().map(|e| event(e).unwrap()).collect(),
            ms.iter().map(|m| member(m, NOW)).collect(),
        )
    }

    #[test]
    fn job_bodies_are_what_the_api_served_by_hand() {
        for (gang, done) in [(1, false), (1, true), (2, false), (2, true)] {
            let j = job(gang, done);
            // `POST /v1/jobs` and `GET /v1/jobs` entries.
            assert_eq!(
                serde_json::to_value(super::job(&j)).unwrap(),
                old_job_json(&j),
                "gang {gang} done {done}"
            );
            // `GET /v1/jobs/{id}`, with and without members.
            let ms = members(&j);
            for ms in [&ms[..], &[]] {
                let d = detail(&j, &events(), ms);
                let v = serde_json::to_value(&d).unwrap();
                assert_eq!(v, old_get_job(&j, &events(), ms), "gang {gang} done {done}");
                assert!(v["members"].is_array(), "`members` is always sent");
                assert_eq!(v.get("gang").is_some(), gang > 1);
                // And the client reads it as the view it came from.
                let back: JobView = serde_json::from_value(v).unwrap();
                assert_eq!(back, d.clone().into_view());
            }
        }
    }

    #[test]
    fn members_are_observed_from_start_to_result_or_now() {
        let j = job(2, true);
        let ms: Vec<MemberView> = members(&j).iter().map(|m| member(m, NOW)).collect();
        assert_eq!(ms[0].observed_ms, None, "never started");
        assert_eq!(ms[1].observed_ms, Some(NOW.0 - 1_700_000_000_300));
        assert_eq!(ms[2].observed_ms, Some(1500));
    }

    #[test]
    fn an_unknown_event_state_is_a_corrupt_row() {
        let e = JobEvent {
            at: 1,
            state: "paused".into(),
            detail: None,
        };
        assert!(matches!(
            event(&e),
            Err(DbError::Corrupt {
                table: "job_events",
                ..
            })
        ));
    }

    #[test]
    fn cancel_outcomes_keep_their_strings() {
        let old = |o: cancel::CancelOutcome| match o {
            cancel::CancelOutcome::Cancelled | cancel::CancelOutcome::Cancelling => {
                o.as_str().to_string()
            }
            cancel::CancelOutcome::AlreadyEnded(s) => format!("already_{}", s.as_str()),
        };
        let mut all = vec![
            cancel::CancelOutcome::Cancelled,
            cancel::CancelOutcome::Cancelling,
        ];
        all.extend(JobState::ALL.map(cancel::CancelOutcome::AlreadyEnded));
        for o in all {
            assert_eq!(
                serde_json::to_value(CancelOutcome::from(o)).unwrap(),
                json!(old(o))
            );
        }
    }

    #[test]
    fn sorts_serialize_as_their_names() {
        for s in [SortBy::Price, SortBy::TflopsPerPrice, SortBy::Reputation] {
            assert_eq!(
                serde_json::to_value(offer_sort(s)).unwrap(),
                json!(s.to_string())
            );
        }
    }

    #[test]
    fn providers_are_what_the_api_served_by_hand() {
        use kiln_protocol::{CapabilityAdvert, CpuInfo, GpuInfo};
        let advert = CapabilityAdvert {
            provider: ProviderId::from_public_key(&key().public()),
            protocol_version: 1,
            node_version: "test".into(),
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            cpu: CpuInfo {
                model: "t".into(),
                logical_cores: 8,
                matmul_mflops: 1,
            },
            memory: ByteSize(32 << 30),
            gpus: vec![GpuInfo {
                index: 0,
                uuid: "GPU-0".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total: ByteSize(80 << 30),
                compute_capability: (9, 0),
                driver_version: "580".into(),
                mig: None,
            }],
            slots: 4,
            price_per_cpu_hour: Credits(1_000_000),
            price_per_gpu_hour: Credits(2_000_000),
            runtime: "runc".into(),
            allows_network: false,
            issued_at: UnixMillis(0),
            benchmark: None,
            region: None,
            disk: ByteSize(100 << 30),
            cached: vec![ContentId::of_bytes(b"in")],
            registries: Vec::new(),
        };
        let p = ProviderRecord {
            advert: Signed::sign_with(&key(), advert, Nonce::from_bytes([1; 16]), UnixMillis(9))
                .unwrap(),
            last_seen: UnixMillis(1_700_000_000_000),
        };
        let a = &p.advert.payload;
        let old = json!({
            "provider": a.provider,
            "last_seen": p.last_seen,
            "cpu": a.cpu,
            "memory": a.memory,
            "gpus": a.gpus,
            "slots": a.slots,
            "price_per_cpu_hour": a.price_per_cpu_hour,
            "price_per_gpu_hour": a.price_per_gpu_hour,
            "benchmark": a.benchmark,
            "reputation": 510,
            "earned": Credits(1_000_209),
            "addrs": a.listen_addrs,
            "cached": a.cached,
        });
        assert_eq!(
            serde_json::to_value(provider(&p, 510, Credits(1_000_209), None)).unwrap(),
            old
        );
        // A verified figure is one more field; nothing else moves.
        let mut with = old.clone();
        with["verified_tflops"] = json!(400);
        assert_eq!(
            serde_json::to_value(provider(&p, 510, Credits(1_000_209), Some(400))).unwrap(),
            with
        );
    }

    #[test]
    fn blobs_are_files_or_directories_by_codec() {
        let rec = |cid: ContentId| BlobRecord {
            cid,
            size: 9,
            name: "x".into(),
            created_at: UnixMillis(1),
        };
        let file = ContentId::of_bytes(b"x");
        let dir = Manifest::default().cid();
        let v = serde_json::to_value(blob(rec(file), true, None)).unwrap();
        assert_eq!(
            v,
            json!({ "cid": file, "size": 9, "name": "x", "kind": "file", "created_at": 1, "held": true })
        );
        assert_eq!(blob(rec(dir), false, None).kind, BlobKind::Directory);
        // A directory whose manifest is held shows its files' bytes.
        let m = Manifest {
            entries: vec![
                kiln_protocol::ManifestEntry {
                    path: "a".into(),
                    cid: file,
                    size: 100,
                    executable: false,
                },
                kiln_protocol::ManifestEntry {
                    path: "b".into(),
                    cid: file,
                    size: 23,
                    executable: false,
                },
            ],
        };
        let d = blob(
            rec(m.cid()),
            true,
            Some(&kiln_protocol::DagNode::Directory(m.clone())),
        );
        assert_eq!((d.files, d.content_size), (Some(2), Some(123)));
        // An image manifest is listed as an image, with its blobs' bytes.
        let b = |n: u64| kiln_protocol::ImageBlob {
            cid: ContentId::of_bytes(&n.to_le_bytes()),
            digest: kiln_protocol::OciDigest([n as u8; 32]),
            size: n,
        };
        let img = kiln_protocol::ImageManifest {
            config: b(10),
            layers: vec![b(1000), b(1000)],
        };
        let i = blob(
            rec(img.cid()),
            true,
            Some(&kiln_protocol::DagNode::Image(img.clone())),
        );
        assert_eq!(i.kind, BlobKind::Image);
        assert_eq!((i.files, i.content_size), (Some(2), Some(1010)));
    }
}
