//! Messages between buyers, the coordinator and providers.
//!
//! Each signed message type has its own domain tag (see [`crate::signed`]).
//! Who signs what:
//!
//! | message | signer | sent over |
//! |---|---|---|
//! | [`JobSubmission`] | buyer | REST `POST /v1/jobs` |
//! | [`ApiAuth`] | buyer | REST `Authorization` header |
//! | [`CapabilityAdvert`] | provider | gossipsub + request-response |
//! | [`JobOffer`] | coordinator | request-response |
//! | [`ResultReceipt`] | provider | request-response |
//! | [`CancelJob`] | coordinator | request-response |
//! | [`JobLost`] | provider | request-response |
//! | [`UsageReport`] | provider | request-response |
//! | [`crate::bench::Challenge`] | coordinator | request-response |
//! | [`crate::bench::ChallengeResponse`] | provider | request-response (the reply) |
//! | [`crate::gang::GangOffer`], [`crate::gang::GangStart`], [`crate::gang::GangRelease`] | coordinator | request-response |
//!
//! The libp2p request-response payloads are [`NetRequest`]/[`NetResponse`].

use serde::{Deserialize, Serialize};

use crate::content::{ContentId, Manifest};
use crate::ids::{BuyerId, JobId, OfferId, ProviderId};
use crate::signed::{Signed, SignedMessage};
use crate::spec::JobSpec;
use crate::units::{ByteSize, Credits, UnixMillis};

/// One GPU as the provider's driver reports it: a whole GPU, or one MIG
/// instance of a GPU in MIG mode (a GPU in MIG mode is advertised only as
/// its instances, each a unit a job can be given alone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// The node's number for this unit: NVML's index of a whole GPU; for a
    /// MIG instance [`MIG_UNIT_BASE`] + parent index × 256 + instance index.
    pub index: u32,
    /// `GPU-…`, or `MIG-…` for an instance.
    pub uuid: String,
    /// The GPU model (the parent's, for an instance).
    pub name: String,
    /// The unit's own memory (an instance's share for MIG).
    pub memory_total: ByteSize,
    /// e.g. (9, 0) for Hopper.
    pub compute_capability: (u32, u32),
    pub driver_version: String,
    /// The MIG profile (`1g.10gb`, `3g.40gb`) for an instance; `None` for a
    /// whole GPU.
    #[serde(default)]
    pub mig: Option<String>,
}

/// Where the unit numbers of MIG instances start (see [`GpuInfo::index`]).
pub const MIG_UNIT_BASE: u32 = 1 << 20;

impl GpuInfo {
    /// Whether this unit is one a job with `r` may be given: the same kind
    /// (a MIG instance of the profile it asks for, or a whole GPU when it
    /// asks for none), a model it accepts, and enough compute capability
    /// and memory. The scheduler counts units by the same rules.
    pub fn fits(&self, r: &crate::spec::Resources) -> bool {
        self.mig == r.mig
            && (r.gpu_models.is_empty()
                || r.gpu_models
                    .iter()
                    .any(|m| crate::spec::gpu_model_matches(m, &self.name)))
            && r.min_compute_capability.is_none_or(|min| {
                crate::spec::ComputeCapability::from(self.compute_capability) >= min
            })
            && self.memory_total.0 >= r.min_vram.0
    }
}

/// CPU facts and a measured figure (integers: signed data has no floats).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    pub model: String,
    pub logical_cores: u32,
    /// Measured f64 matrix-multiply throughput, in MFLOP/s (0 if not measured).
    pub matmul_mflops: u64,
}

/// What a provider offers, signed by the provider's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityAdvert {
    pub provider: ProviderId,
    pub protocol_version: u32,
    pub node_version: String,
    /// Multiaddrs the provider listens on.
    pub listen_addrs: Vec<String>,
    pub cpu: CpuInfo,
    /// Memory the provider lends to jobs.
    pub memory: ByteSize,
    pub gpus: Vec<GpuInfo>,
    /// How many jobs it runs at once.
    pub slots: u32,
    pub price_per_cpu_hour: Credits,
    pub price_per_gpu_hour: Credits,
    /// The OCI runtime jobs run under (e.g. `runc`, `runsc`).
    pub runtime: String,
    /// Whether the provider lets jobs ask for `network = "full"`.
    pub allows_network: bool,
    pub issued_at: UnixMillis,
    /// Measured figures with their proofs (see [`crate::bench`]); `None`
    /// from a provider that has not benchmarked itself.
    pub benchmark: Option<crate::bench::BenchmarkReport>,
    /// Where the provider is, e.g. `eu-west-1` (hierarchical at `-`: a job
    /// asking for `eu` matches it). `None`: matches no region requirement.
    #[serde(default)]
    pub region: Option<String>,
    /// Disk the provider lends to jobs, in total (0 = none stated: jobs that
    /// ask for disk are not placed here).
    #[serde(default)]
    pub disk: ByteSize,
    /// Content ids the provider already holds (inputs it need not fetch);
    /// the scheduler prefers providers holding a job's inputs.
    #[serde(default)]
    pub cached: Vec<ContentId>,
    /// Registry hosts it pulls images from by digest (`name@sha256:…`);
    /// a job naming another registry's image is not placed here.
    #[serde(default)]
    pub registries: Vec<String>,
}

impl SignedMessage for CapabilityAdvert {
    const DOMAIN: &'static str = "kiln/capability-advert/v1";
}

impl CapabilityAdvert {
    /// Milli-CPUs this provider lends (all logical cores).
    pub fn millicpus(&self) -> u32 {
        self.cpu.logical_cores.saturating_mul(1000)
    }
    /// Price per hour of a job with these resources at this provider's rates.
    pub fn price_per_hour(&self, spec: &JobSpec) -> Option<Credits> {
        let cpu = u128::from(self.price_per_cpu_hour.0) * u128::from(spec.resources.cpus.0) / 1000;
        let gpu = u128::from(self.price_per_gpu_hour.0) * u128::from(spec.resources.gpus);
        u64::try_from(cpu + gpu).ok().map(Credits)
    }
}

/// A buyer's signed request to run a job. The envelope's nonce names the job
/// (`JobId::derive(buyer, nonce)`), so a retried submission is the same job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSubmission {
    pub spec: JobSpec,
    /// Optional free-text label shown in listings.
    #[serde(default)]
    pub label: Option<String>,
}

impl SignedMessage for JobSubmission {
    const DOMAIN: &'static str = "kiln/job-submission/v1";
}

/// Proof of key possession for one REST call: the method and the path (with
/// query) it is for, short-lived. Sent hex-encoded in `Authorization: Kiln <hex>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiAuth {
    pub method: String,
    pub path: String,
}

impl SignedMessage for ApiAuth {
    const DOMAIN: &'static str = "kiln/api-auth/v1";
}

/// The coordinator's offer of one job to one provider. Addressed: a provider
/// must refuse an offer whose `provider` is not itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOffer {
    pub offer_id: OfferId,
    pub job_id: JobId,
    pub provider: ProviderId,
    pub owner: BuyerId,
    pub spec: JobSpec,
    /// Agreed price for this job per hour of wall time.
    pub price_per_hour: Credits,
    /// Peers besides the coordinator known to hold the job's inputs: the
    /// provider fetches from all of them at once and verifies every byte.
    #[serde(default)]
    pub sources: Vec<InputSources>,
}

/// Where one input can be fetched from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSources {
    pub cid: ContentId,
    pub peers: Vec<PeerSource>,
}

/// A peer and the multiaddrs it listens on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSource {
    pub peer: ProviderId,
    pub addrs: Vec<String>,
}

impl SignedMessage for JobOffer {
    const DOMAIN: &'static str = "kiln/job-offer/v1";
}

/// The coordinator's instruction to stop a job (the buyer cancelled it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelJob {
    pub job_id: JobId,
    pub offer_id: OfferId,
    pub provider: ProviderId,
    pub reason: String,
}

impl SignedMessage for CancelJob {
    const DOMAIN: &'static str = "kiln/cancel-job/v1";
}

/// The coordinator asks a node for what a running job has written so far
/// (for `kiln job logs --follow`), from these byte offsets of each stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailLogs {
    pub job_id: JobId,
    pub offer_id: OfferId,
    pub provider: ProviderId,
    pub stdout_from: u64,
    pub stderr_from: u64,
}

impl SignedMessage for TailLogs {
    const DOMAIN: &'static str = "kiln/tail-logs/v1";
}

/// What a running job wrote from the asked offsets: at most
/// [`LogChunk::MAX`] bytes of each stream. Only the first `--log-cap` bytes
/// of a stream are kept (as in the receipt's logs); `*_total` counts all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    #[serde(with = "serde_bytes_compat")]
    pub stdout: Vec<u8>,
    #[serde(with = "serde_bytes_compat")]
    pub stderr: Vec<u8>,
    pub stdout_total: u64,
    pub stderr_total: u64,
    /// The container has exited: nothing more will come.
    pub ended: bool,
}

impl LogChunk {
    /// Most bytes of one stream in one chunk.
    pub const MAX: usize = 256 << 10;
}

/// A provider's statement that a job it accepted will produce no result
/// (e.g. the daemon was killed and the container reaped on restart), so the
/// coordinator can requeue it instead of waiting forever.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLost {
    pub job_id: JobId,
    pub offer_id: OfferId,
    pub provider: ProviderId,
    pub reason: String,
}

impl SignedMessage for JobLost {
    const DOMAIN: &'static str = "kiln/job-lost/v1";
}

/// A provider's signed statement of how long a job has been running, sent
/// every settlement interval so the coordinator pays as the job goes: the
/// provider is never owed more than one interval, and the buyer never pays
/// for more than one interval of work not yet reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    pub job_id: JobId,
    pub offer_id: OfferId,
    pub provider: ProviderId,
    /// 1-based interval number; the coordinator settles each number once.
    pub interval: u64,
    /// Wall time the job has run so far.
    pub wall_ms: u64,
}

impl SignedMessage for UsageReport {
    const DOMAIN: &'static str = "kiln/usage-report/v1";
}

/// A provider asks to hold `target` in its stake bond (staking from or
/// unstaking to its balance). Target-based, so a retried or replayed request
/// changes nothing once the bond is there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetStake {
    pub provider: ProviderId,
    pub target: Credits,
}

impl SignedMessage for SetStake {
    const DOMAIN: &'static str = "kiln/set-stake/v1";
}

/// How a job ended on the provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The container exited 0.
    Succeeded,
    /// The container exited non-zero, or the job could not be started.
    Failed,
    /// The wall-clock limit was reached and the container was killed.
    TimedOut,
    /// The buyer cancelled; the container was stopped.
    Cancelled,
}

/// What a job used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    pub wall_ms: u64,
    pub output_bytes: u64,
    /// Bytes the job wrote to stdout/stderr (all of them, kept or not).
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Whether the logs were cut at the provider's log cap.
    pub logs_truncated: bool,
    /// The cap: bytes kept per stream.
    pub log_cap_bytes: u64,
}

/// The provider's signed statement of what it ran and what came out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultReceipt {
    pub job_id: JobId,
    pub offer_id: OfferId,
    pub provider: ProviderId,
    pub outcome: Outcome,
    pub exit_code: Option<i64>,
    /// Why the job failed without an exit code (image missing, input unavailable…).
    pub error: Option<String>,
    /// The image id (`sha256:…`) that actually ran.
    pub image_digest: String,
    pub input_cids: Vec<ContentId>,
    /// Manifest CID of the output directory.
    pub output_cid: ContentId,
    pub stdout_cid: ContentId,
    pub stderr_cid: ContentId,
    pub started_at: UnixMillis,
    pub finished_at: UnixMillis,
    pub usage: ResourceUsage,
}

impl SignedMessage for ResultReceipt {
    const DOMAIN: &'static str = "kiln/result-receipt/v1";
}

/// A blob carried inline in a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub cid: ContentId,
    #[serde(with = "serde_bytes_compat")]
    pub bytes: Vec<u8>,
}

/// Blobs up to this size ride inline in a [`JobResult`] (logs of a short
/// job, a small output), saving a round trip; larger ones stay on the
/// provider and the coordinator fetches them over `/kiln/blobs/1`.
pub const MAX_INLINE_BLOB: u64 = 64 * 1024;
/// At most this many inline bytes in all per result.
pub const MAX_INLINE_TOTAL: u64 = 1024 * 1024;

/// A finished job: the receipt, the output manifest, and the small blobs it
/// names inline. Every blob the receipt names (outputs and logs) is checked
/// against its CID by the receiver, inline or fetched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    /// The job this result claims to settle. Not trusted: the coordinator
    /// looks the job up by it and then requires the signed receipt to name
    /// the same job, so a receipt replayed against another job is refused.
    pub job_id: JobId,
    pub receipt: Signed<ResultReceipt>,
    pub manifest: Manifest,
    /// Blobs of at most [`MAX_INLINE_BLOB`] bytes ([`MAX_INLINE_TOTAL`] in
    /// all); the rest are fetched from the sender by CID.
    pub blobs: Vec<Blob>,
}

/// Requests over Kiln's point-to-point protocol (`/kiln/rpc/1`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NetRequest {
    /// Provider → coordinator: register (or refresh) an advert; also the heartbeat.
    Register(Signed<CapabilityAdvert>),
    /// Coordinator → provider: run this job.
    Offer(Signed<JobOffer>),
    /// Provider → coordinator: a finished job.
    Result(Box<JobResult>),
    /// Coordinator → provider: stop this job.
    Cancel(Signed<CancelJob>),
    /// Provider → coordinator: this job was lost and will produce no result.
    Lost(Signed<JobLost>),
    /// Provider → coordinator: usage so far of a running job (interval settlement).
    Usage(Signed<UsageReport>),
    /// Coordinator → provider: benchmark yourself now on these inputs; the
    /// answer is a [`NetResponse::ChallengeResponse`].
    Challenge(Signed<crate::bench::Challenge>),
    /// Provider → coordinator: set the stake bond.
    Stake(Signed<SetStake>),
    /// Coordinator → provider: reserve (do not start) one member of a gang
    /// job (see [`crate::gang`]).
    GangOffer(Signed<crate::gang::GangOffer>),
    /// Coordinator → provider: every member reserved; start this one.
    GangStart(Signed<crate::gang::GangStart>),
    /// Coordinator → provider: give this member's reservation back.
    GangRelease(Signed<crate::gang::GangRelease>),
    /// Provider → coordinator: may `peer`, which asks this provider for a
    /// cached blob, have `cid`? (`Accepted` or `Rejected`.) Blobs are not
    /// capabilities: only the coordinator knows which jobs entitle whom.
    MayFetch { peer: ProviderId, cid: ContentId },
    /// Coordinator → provider: what a running job has written so far; the
    /// answer is a [`NetResponse::Logs`]. (Appended: variants are encoded
    /// by index.)
    TailLogs(Signed<TailLogs>),
}

/// Responses over `/kiln/rpc/1`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NetResponse {
    Accepted,
    Rejected {
        reason: String,
    },
    /// The provider's answer to a [`NetRequest::Challenge`].
    ChallengeResponse(Signed<crate::bench::ChallengeResponse>),
    /// Not now, but the request was sound: send it again later (e.g. the
    /// coordinator could not yet fetch a result's outputs).
    Retry {
        reason: String,
    },
    /// The provider's answer to a [`NetRequest::TailLogs`].
    Logs(LogChunk),
}

/// Serde of `Vec<u8>` as one byte string in binary encodings (bincode encodes
/// `Vec<u8>` as a length and bytes either way; this keeps JSON compact as hex).
mod serde_bytes_compat {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(v))
        } else {
            s.serialize_bytes(v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if d.is_human_readable() {
            hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
        } else {
            <Vec<u8>>::deserialize(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding;
    use crate::keys::Keypair;

    #[test]
    fn net_messages_round_trip() {
        let k = Keypair::generate();
        let blob = Blob {
            cid: ContentId::of_bytes(b"x"),
            bytes: b"x".to_vec(),
        };
        let r = NetResponse::Rejected {
            reason: "no".into(),
        };
        let back: NetResponse = encoding::decode(&encoding::encode(&r).unwrap()).unwrap();
        assert!(matches!(back, NetResponse::Rejected { reason } if reason == "no"));
        let back: Blob = encoding::decode(&encoding::encode(&blob).unwrap()).unwrap();
        assert_eq!(back, blob);
        let auth = Signed::sign(
            &k,
            ApiAuth {
                method: "GET".into(),
                path: "/v1/jobs".into(),
            },
            60,
        )
        .unwrap();
        let back: Signed<ApiAuth> = encoding::decode(&encoding::encode(&auth).unwrap()).unwrap();
        back.verify(UnixMillis::now()).unwrap();
    }
}
