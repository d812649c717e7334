//! The JSON bodies of the coordinator's REST API, as types.
//!
//! One place for what `GET /v1/jobs/{id}` and the other routes answer, so
//! the coordinator (which builds them) and the `kiln` client (which reads
//! them) cannot drift apart, and so a job's lifecycle has one
//! [`JobState`] with one [`JobState::is_terminal`].
//!
//! Every type serializes to exactly the keys the API serves: a field that
//! is `null` when unknown is an `Option` without `skip_serializing_if`; a
//! key that only some answers carry (a job's `events` and `gang`, an
//! error's `field`, an upload's `stored`) is `#[serde(default)]` and skipped
//! when empty, so the same type reads a job list entry and a full job.
//! Unknown keys are ignored (no `deny_unknown_fields`), so an older client
//! reads a newer coordinator's answers.
//!
//! | route | body |
//! |---|---|
//! | `POST /v1/jobs`, `GET /v1/jobs/{id}` | [`JobView`] |
//! | `GET /v1/jobs` | [`JobListView`] |
//! | `POST /v1/jobs/{id}/cancel` | [`CancelView`] |
//! | `GET /v1/jobs/{id}/logs[?rank=r]` | [`LogsView`] |
//! | `GET /v1/jobs/{id}/outputs` | [`OutputsView`] |
//! | `GET /v1/account` | [`AccountView`] |
//! | `GET /v1/providers` | [`ProvidersView`] |
//! | `GET /v1/providers/{id}/audits` | [`ProviderAuditsView`] |
//! | `GET /v1/offers` | [`OffersView`] |
//! | `GET /v1/info` | [`InfoView`] |
//! | `GET /v1/ledger` | [`LedgerPageView`] |
//! | `GET /v1/ledger/balances` | [`BalancesView`] |
//! | `GET /v1/accounts/{account}/statement?from=N&limit=M` | [`StatementView`] |
//! | `POST /v1/blobs/missing` | [`MissingRequest`] → [`MissingView`] |
//! | `POST /v1/blobs`, `PUT /v1/blobs/{cid}` | [`UploadView`] |
//! | `GET /v1/blobs` | [`BlobListView`] |
//! | `DELETE /v1/blobs/{cid}` | [`BlobDeletedView`] |
//! | any error | [`ErrorView`] |
//!
//! Ledger accounts and effects are `kiln-contracts` types, which this leaf
//! crate cannot name: the views that carry them are generic
//! ([`AccountView<A>`], [`BalancesView<A>`], [`StatementView<A, E>`]); the
//! coordinator and the client use `AccountId` and `Applied`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bench::{BenchmarkReport, ChallengeId};
use crate::content::{ContentId, Manifest, ManifestEntry, ManifestError};
use crate::ids::{BuyerId, JobId, OfferId, ProviderId};
use crate::keys::PublicKey;
use crate::messages::{CpuInfo, GpuInfo, Outcome, ResourceUsage, ResultReceipt};
use crate::signed::Signed;
use crate::spec::JobSpec;
use crate::units::{ByteSize, Credits, MilliCpu, UnixMillis};

/// A string that names no variant of an enum.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{input}`")]
pub struct UnknownVariant {
    pub kind: &'static str,
    pub input: String,
}

impl UnknownVariant {
    fn new(kind: &'static str, input: &str) -> Self {
        Self {
            kind,
            input: input.chars().take(80).collect(),
        }
    }
}

/// `as_str`, `Display`, `FromStr` and the variant list of a string enum
/// whose serde form is the same snake_case string.
macro_rules! string_enum {
    ($ty:ident, $kind:expr, { $($variant:ident => $s:expr),+ $(,)? }) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: [$ty; [$(stringify!($variant)),+].len()] = [$($ty::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $s),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownVariant;
            fn from_str(s: &str) -> Result<Self, UnknownVariant> {
                match s {
                    $($s => Ok($ty::$variant),)+
                    other => Err(UnknownVariant::new($kind, other)),
                }
            }
        }
    };
}

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------

/// Where a job is in its lifecycle.
///
/// ```text
/// queued → dispatched → running → completed | failed | timed_out
///    ↑          │          │
///    └──────────┴──────────┘ (requeued: lost, refused, gang member gone)
/// queued | dispatched → cancelled          running → cancelling → cancelled (or another end)
///                          running → verifying → completed | failed (a sampled result)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a provider that fits (`reason` says why none does).
    Queued,
    /// Offered to a provider (or a gang reserving); waiting for it to accept.
    Dispatched,
    Running,
    /// Its result arrived and was sampled for verification: it is being
    /// re-executed on another provider, and nobody is paid for it until
    /// the executions are compared (see [`VerificationView`]).
    Verifying,
    /// A running job the buyer cancelled, being stopped: it ends once its
    /// provider(s) deliver, and never goes back to `running`.
    Cancelling,
    Completed,
    Failed,
    TimedOut,
    Cancelled,
}

string_enum!(JobState, "job state", {
    Queued => "queued",
    Dispatched => "dispatched",
    Running => "running",
    Verifying => "verifying",
    Cancelling => "cancelling",
    Completed => "completed",
    Failed => "failed",
    TimedOut => "timed_out",
    Cancelled => "cancelled",
});

impl JobState {
    /// Whether the job has ended: it will never change state again.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::TimedOut | Self::Cancelled
        )
    }

    /// Whether members of its current attempt may be executing.
    pub const fn is_active(self) -> bool {
        matches!(self, Self::Dispatched | Self::Running | Self::Cancelling)
    }

    /// The terminal state for a finished execution's outcome.
    pub const fn of_outcome(o: Outcome) -> Self {
        match o {
            Outcome::Succeeded => Self::Completed,
            Outcome::Failed => Self::Failed,
            Outcome::TimedOut => Self::TimedOut,
            Outcome::Cancelled => Self::Cancelled,
        }
    }
}

/// One recorded state change of a job (`events` of [`JobView`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    pub at: UnixMillis,
    /// The state the job entered.
    pub state: JobState,
    pub detail: Option<String>,
}

/// Where one member of a gang job is in the gang protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Sent a gang offer; no answer yet.
    Offered,
    /// The node reserved its slot and GPUs; nothing started.
    Reserved,
    /// Told to start.
    Started,
    /// Told to stop after it started; its receipt is still expected and paid.
    Stopping,
    /// Released before it started (or lost): it will deliver nothing.
    Released,
    /// Its verified receipt is recorded.
    Delivered,
}

string_enum!(MemberState, "gang member state", {
    Offered => "offered",
    Reserved => "reserved",
    Started => "started",
    Stopping => "stopping",
    Released => "released",
    Delivered => "delivered",
});

impl MemberState {
    /// Whether a result is still expected from it.
    pub const fn pending(self) -> bool {
        matches!(
            self,
            Self::Offered | Self::Reserved | Self::Started | Self::Stopping
        )
    }

    /// Whether the coordinator saw it start (so its time is paid).
    pub const fn ran(self) -> bool {
        matches!(self, Self::Started | Self::Stopping)
    }
}

/// Why a member execution exists.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// It runs the job for the buyer (a single node, or a gang's rank).
    #[default]
    Run,
    /// It re-executes a sampled result on another provider, so the two can
    /// be compared (a second one breaks a tie).
    Verify,
}

string_enum!(Role, "member role", {
    Run => "run",
    Verify => "verify",
});

impl Role {
    pub fn is_run(&self) -> bool {
        *self == Self::Run
    }
}

/// Where a job's verification by re-execution stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationStatus {
    /// The audit draw did not select it: paid and completed at once.
    NotSampled,
    /// Selected: waiting for a re-execution on another provider.
    Pending,
    /// A re-execution agreed with the result (after a dispute, the third
    /// execution agreed with it).
    Verified,
    /// The re-execution disagreed: a third execution decides.
    Disputed,
    /// The majority disagreed with the result: its provider was slashed,
    /// and the buyer got the majority's output.
    FailedVerification,
    /// Three executions, three answers: nobody is slashed, the buyer is
    /// refunded what was not yet paid.
    Nondeterministic,
    /// Selected, but no other provider could re-run it (none eligible, or
    /// the audit window closed first): paid unverified.
    Unverified,
}

string_enum!(VerificationStatus, "verification status", {
    NotSampled => "not_sampled",
    Pending => "pending",
    Verified => "verified",
    Disputed => "disputed",
    FailedVerification => "failed_verification",
    Nondeterministic => "nondeterministic",
    Unverified => "unverified",
});

impl VerificationStatus {
    /// Whether the verification is over.
    pub const fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Disputed)
    }
}

/// A job's audit record, as its buyer reads it (`verification` of
/// [`JobView`]). `record` is the coordinator's decision record as JSON
/// (every input of the audit draw, the probabilities, the draw and the
/// verdict), and `signature` the coordinator's ed25519 signature over
/// `"kiln/verification-record/v1" ‖ record`, so the buyer can keep it and
/// show it to anyone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationView {
    pub status: VerificationStatus,
    /// The audit probability the draw used, in parts per million.
    pub p_ppm: u32,
    /// What happened, in one sentence ("verified by re-execution on …").
    pub detail: String,
    /// The providers that re-executed it, in order.
    pub verifiers: Vec<ProviderId>,
    pub record: String,
    pub signature: String,
    /// The coordinator that signed the record.
    pub signer: ProviderId,
}

/// One member execution of a job: one rank of one attempt (`members` and,
/// for a gang job, `gang` of [`JobView`]; a single-node job has rank 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// The job attempt this member belongs to (1-based).
    pub attempt: u32,
    pub rank: u32,
    pub provider: ProviderId,
    /// This member's own offer (its receipt must name it).
    pub offer_id: OfferId,
    /// Whether it runs the job or re-executes it to verify it (absent:
    /// it runs it).
    #[serde(default, skip_serializing_if = "Role::is_run")]
    pub role: Role,
    pub state: MemberState,
    /// How it ended on its node, once delivered.
    pub outcome: Option<Outcome>,
    pub reason: Option<String>,
    pub price_per_hour: Credits,
    /// Paid to it so far (intervals and the final release).
    pub paid: Credits,
    /// Its total cost, once delivered.
    pub cost: Option<Credits>,
    pub output_cid: Option<ContentId>,
    pub stdout_cid: Option<ContentId>,
    pub receipt: Option<Signed<ResultReceipt>>,
    pub manifest: Option<Manifest>,
    /// When the coordinator saw it start (absent from older coordinators).
    #[serde(default)]
    pub started_at: Option<UnixMillis>,
    /// Wall time the coordinator itself has observed it running, in ms:
    /// from `started_at` to its result, or to now while it runs.
    #[serde(default)]
    pub observed_ms: Option<u64>,
}

/// A job as the buyer sees it: `POST /v1/jobs`, `GET /v1/jobs/{id}`, and
/// each entry of `GET /v1/jobs` (without `events`, `members` and `gang`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub job_id: JobId,
    pub owner: BuyerId,
    pub label: Option<String>,
    pub state: JobState,
    /// Why it is where it is: why-not-placed for a queued job, why it
    /// failed, what requeued it.
    pub reason: Option<String>,
    /// The provider it runs (or ran) on; a gang's lead member.
    pub provider: Option<ProviderId>,
    /// Dispatch attempts so far.
    pub attempts: u32,
    pub price_per_hour: Option<Credits>,
    /// What was locked in escrow at submission.
    pub max_cost: Credits,
    pub cost: Option<Credits>,
    pub exit_code: Option<i64>,
    /// From the receipt (`None` until there is one).
    pub output_cid: Option<ContentId>,
    pub stdout_cid: Option<ContentId>,
    pub stderr_cid: Option<ContentId>,
    /// Whether a verified receipt is recorded (the coordinator records
    /// receipts only after verifying them; clients verify it again).
    pub receipt_verified: bool,
    pub logs_truncated: Option<bool>,
    pub usage: Option<ResourceUsage>,
    pub receipt: Option<Signed<ResultReceipt>>,
    pub spec: JobSpec,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    /// Its state changes, oldest first (`GET /v1/jobs/{id}` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventView>,
    /// Every member execution of every attempt, oldest first
    /// (`GET /v1/jobs/{id}` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberView>,
    /// The same member executions, for a gang job (`resources.gang > 1`)
    /// only: `None` for a single-node job and in answers without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<Vec<MemberView>>,
    /// Its audit record, once its result was accepted (`GET
    /// /v1/jobs/{id}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerificationView>,
}

impl JobView {
    /// The members of a gang job's current (last) attempt, by rank; empty
    /// for a single-node job or an answer without `gang`.
    pub fn gang_members(&self) -> Vec<&MemberView> {
        let mut ms: Vec<&MemberView> = self
            .gang
            .iter()
            .flatten()
            .filter(|m| m.attempt == self.attempts)
            .collect();
        ms.sort_by_key(|m| m.rank);
        ms
    }
}

/// `GET /v1/jobs`: the caller's jobs, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobListView {
    pub jobs: Vec<JobView>,
}

/// What a cancel request did.
///
/// Serialized as a string: `cancelled`, `cancel_requested`, `cancelling`,
/// or `already_<state>` (`already_completed`, …) for a job that had ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CancelOutcome {
    /// It had not started: cancelled now and refunded.
    Cancelled,
    /// It was running and its provider was told to stop (what coordinators
    /// without [`JobState::Cancelling`] answer).
    CancelRequested,
    /// It was running: it is now [`JobState::Cancelling`], its members are
    /// being stopped, and it ends when they deliver, paid for the time they
    /// ran.
    Cancelling,
    /// It had already ended in this state; nothing changed.
    AlreadyEnded(JobState),
}

impl CancelOutcome {
    const ALREADY: &'static str = "already_";

    /// The string the API sends.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::CancelRequested => "cancel_requested",
            Self::Cancelling => "cancelling",
            Self::AlreadyEnded(s) => match s {
                JobState::Queued => "already_queued",
                JobState::Dispatched => "already_dispatched",
                JobState::Running => "already_running",
                JobState::Verifying => "already_verifying",
                JobState::Cancelling => "already_cancelling",
                JobState::Completed => "already_completed",
                JobState::Failed => "already_failed",
                JobState::TimedOut => "already_timed_out",
                JobState::Cancelled => "already_cancelled",
            },
        }
    }
}

impl fmt::Display for CancelOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CancelOutcome {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, UnknownVariant> {
        match s {
            "cancelled" => Ok(Self::Cancelled),
            "cancel_requested" => Ok(Self::CancelRequested),
            "cancelling" => Ok(Self::Cancelling),
            other => other
                .strip_prefix(Self::ALREADY)
                .and_then(|st| st.parse().ok())
                .map(Self::AlreadyEnded)
                .ok_or_else(|| UnknownVariant::new("cancel outcome", other)),
        }
    }
}

impl Serialize for CancelOutcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CancelOutcome {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `POST /v1/jobs/{id}/cancel`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelView {
    pub job_id: JobId,
    pub outcome: CancelOutcome,
}

/// `GET /v1/jobs/{id}/logs/live?rank=r&stdout_from=a&stderr_from=b`:
/// what a running job has written so far (`kiln job logs --follow`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveLogsView {
    pub job_id: JobId,
    pub rank: u32,
    /// The job's state when this was read.
    pub state: JobState,
    /// What the running member wrote from the asked offsets (whole UTF-8
    /// characters only: a character split at the end waits for the next
    /// read).
    pub stdout: String,
    pub stderr: String,
    /// The offsets to ask from next.
    pub stdout_next: u64,
    pub stderr_next: u64,
    /// Whether a running member answered (`false`: not started yet, or
    /// finished: its stored logs are at `GET /v1/jobs/{id}/logs`).
    pub live: bool,
}

/// `GET /v1/jobs/{id}/logs[?rank=r]`: the tail of each stream (at most
/// 1 MiB inline; the whole log is a blob fetched by its CID).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsView {
    pub job_id: JobId,
    /// The gang rank asked for; `None` for the job's own receipt.
    pub rank: Option<u32>,
    pub provider: ProviderId,
    pub stdout: String,
    pub stderr: String,
    pub stdout_cid: ContentId,
    pub stderr_cid: ContentId,
    /// Whether the provider cut the logs at its log cap.
    pub truncated: bool,
    /// Whether this answer holds only the tail of a stream.
    pub clipped: bool,
}

/// `GET /v1/jobs/{id}/outputs`: the output manifest's entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputsView {
    pub job_id: JobId,
    /// The manifest CID the receipt names.
    pub output_cid: ContentId,
    pub entries: Vec<ManifestEntry>,
}

impl OutputsView {
    /// The entries as a checked [`Manifest`] (whose CID should be `output_cid`).
    pub fn manifest(&self) -> Result<Manifest, ManifestError> {
        Manifest::new(self.entries.clone())
    }
}

// ---------------------------------------------------------------------------
// Accounts and the ledger
// ---------------------------------------------------------------------------

/// `GET /v1/account`: the caller's balance and what its escrows hold.
/// `A` is the account id (`kiln_contracts::AccountId`; `buyer:kb<hex>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountView<A = String> {
    pub account: A,
    pub balance: Credits,
    pub escrowed: Credits,
}

/// Which way money moves across the marketplace's edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    /// Money came in (a buyer paid the operator): credits the account.
    Deposit,
    /// Money went out (the operator paid a provider): debits the account;
    /// refused when the account holds less.
    Payout,
}

impl TransferKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Deposit => "deposit",
            Self::Payout => "payout",
        }
    }
}

/// `POST /v1/operator/transfers`, signed by an operator key: records money
/// that crossed the marketplace's edge in the signed ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRequest {
    pub kind: TransferKind,
    /// `buyer:kb…` or `provider:12D3…`.
    pub account: String,
    pub amount: Credits,
    /// The operator's own reference for the payment (a bank transfer id,
    /// an invoice number): each is recorded once, so a retried command
    /// never moves money twice.
    pub reference: String,
}

/// What a transfer did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferView {
    pub kind: TransferKind,
    pub account: String,
    pub amount: Credits,
    pub reference: String,
    /// `false`: this reference was recorded before; nothing moved now.
    pub applied: bool,
    /// The account's balance afterwards.
    pub balance: Credits,
}

/// One row of `GET /v1/ledger`: a `Signed<LedgerEntry>` in its canonical
/// encoding, hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRowView {
    pub seq: u64,
    /// Hex of the canonical bytes (decoded by the auditor, so one bad row
    /// is named rather than failing the page).
    pub entry: String,
}

impl LedgerRowView {
    /// The canonical bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, hex::FromHexError> {
        hex::decode(&self.entry)
    }
}

/// `GET /v1/ledger?from=N&limit=M`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerPageView {
    pub entries: Vec<LedgerRowView>,
    /// The `from` of the next page; `None` when this page is empty.
    pub next: Option<u64>,
}

/// `GET /v1/ledger/balances`: the stored balances the chain must reproduce.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "A: Serialize", deserialize = "A: Deserialize<'de> + Ord"))]
pub struct BalancesView<A = String> {
    pub balances: BTreeMap<A, Credits>,
}

impl<A: Ord> Default for BalancesView<A> {
    fn default() -> Self {
        Self {
            balances: BTreeMap::new(),
        }
    }
}

/// One ledger entry touching an account (`entries` of [`StatementView`]).
/// `E` is what the op did (`kiln_contracts::Applied`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLineView<E> {
    pub seq: u64,
    pub at: UnixMillis,
    /// The op's name (`deposit`, `lock`, `interval settlement`, `release`, …).
    pub op: String,
    /// Its idempotency key.
    pub key: String,
    /// The account's balance change, in micro-credits (a string in JSON:
    /// it may be negative and exceed 2^53).
    #[serde(with = "i128_string")]
    pub delta: i128,
    pub effect: E,
}

/// `GET /v1/accounts/{account}/statement`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementView<A, E> {
    pub account: A,
    pub balance: Credits,
    pub entries: Vec<StatementLineView<E>>,
    /// The `from` of the next page (`?from=N&limit=M`); absent when this
    /// page is the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

mod i128_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &i128, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------
// Providers and offers
// ---------------------------------------------------------------------------

/// One live provider (`providers` of [`ProvidersView`]): its advert's
/// facts, reputation and earnings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderView {
    pub provider: ProviderId,
    pub last_seen: UnixMillis,
    pub cpu: CpuInfo,
    pub memory: ByteSize,
    pub gpus: Vec<GpuInfo>,
    pub slots: u32,
    pub price_per_cpu_hour: Credits,
    pub price_per_gpu_hour: Credits,
    pub benchmark: Option<BenchmarkReport>,
    pub reputation: u32,
    /// Its ledger balance.
    pub earned: Credits,
    /// Its advert's `listen_addrs`.
    pub addrs: Vec<String>,
    /// Content ids it holds.
    pub cached: Vec<ContentId>,
    /// Its GPUs' TFLOP/s as the coordinator verified them (challenges it
    /// timed itself), never its own advert's figure; absent until measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_tflops: Option<u32>,
}

/// `GET /v1/providers`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvidersView {
    pub providers: Vec<ProviderView>,
}

/// How `GET /v1/offers` orders its rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfferSort {
    /// Lowest price per GPU-hour (per CPU-hour for CPU-only nodes) first.
    #[default]
    Price,
    /// Most verified TFLOP/s per credit first.
    TflopsPerPrice,
    /// Highest reputation first.
    Reputation,
}

string_enum!(OfferSort, "sort", {
    Price => "price",
    TflopsPerPrice => "tflops_per_price",
    Reputation => "reputation",
});

/// One provider's offer (`offers` of [`OffersView`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OfferView {
    pub provider: ProviderId,
    pub region: Option<String>,
    /// The first GPU's name (`None` for a CPU-only node).
    pub gpu_name: Option<String>,
    pub num_gpus: u32,
    pub free_gpus: u32,
    /// Memory of the smallest GPU.
    pub vram: ByteSize,
    /// Lowest compute capability of its GPUs (`"9.0"`).
    pub compute_capability: Option<String>,
    pub tflops: Option<u32>,
    pub price_per_gpu_hour: Credits,
    pub price_per_cpu_hour: Credits,
    /// Verified TFLOP/s per credit per GPU-hour (0 when unmeasured).
    pub tflops_per_price: f64,
    pub cpus: MilliCpu,
    pub free_cpus: MilliCpu,
    pub memory: ByteSize,
    pub free_memory: ByteSize,
    pub disk: ByteSize,
    pub free_disk: ByteSize,
    pub slots: u32,
    pub free_slots: u32,
    pub reputation: u32,
    pub allows_network: bool,
    /// How many content ids it holds.
    pub cached: usize,
}

/// `GET /v1/offers?q=…&sort=…&limit=N`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OffersView {
    /// The query as given.
    pub query: String,
    pub sort: OfferSort,
    pub offers: Vec<OfferView>,
}

/// How a capability challenge went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    /// Answered in time, proofs correct, figures as advertised.
    Passed,
    /// Answered correctly, but the figures fell short.
    Flagged,
    /// No valid answer.
    Failed,
}

string_enum!(AuditOutcome, "audit outcome", {
    Passed => "passed",
    Flagged => "flagged",
    Failed => "failed",
});

/// One capability challenge (`audits` of [`ProviderAuditsView`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditView {
    pub at: UnixMillis,
    pub challenge_id: ChallengeId,
    pub outcome: AuditOutcome,
    pub detail: String,
}

/// `GET /v1/providers/{id}/audits`: newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderAuditsView {
    pub provider: ProviderId,
    pub reputation: u32,
    pub audits: Vec<AuditView>,
}

/// `GET /v1/info`: who the coordinator is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoView {
    pub peer_id: ProviderId,
    /// The key its ledger entries and offers are signed with.
    pub public_key: PublicKey,
    pub p2p_addrs: Vec<String>,
    pub version: String,
    /// What a new buyer is granted, if the coordinator runs a faucet.
    pub faucet: Option<Credits>,
}

// ---------------------------------------------------------------------------
// Blobs
// ---------------------------------------------------------------------------

/// `POST /v1/blobs/missing` request body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingRequest {
    pub cids: Vec<ContentId>,
}

/// `POST /v1/blobs/missing`: which of the asked CIDs the caller still has
/// to upload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingView {
    pub missing: Vec<ContentId>,
}

/// `POST /v1/blobs` (no `stored`) and `PUT /v1/blobs/{cid}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadView {
    pub cid: ContentId,
    pub size: u64,
    /// `PUT` only: whether the bytes were stored now (`false`: the store
    /// already held them; the upload only proved possession).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<bool>,
}

/// A raw blob or a directory manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobKind {
    File,
    Directory,
    /// A container image's manifest (`kiln image push`).
    Image,
}

string_enum!(BlobKind, "blob kind", {
    File => "file",
    Directory => "directory",
    Image => "image",
});

impl BlobKind {
    /// By the CID's codec (DAG-CBOR: a directory manifest, unless its
    /// bytes say it is an image: [`crate::DagNode`]).
    pub fn of(cid: &ContentId) -> Self {
        if cid.codec() == crate::content::DAG_CBOR_CODEC {
            Self::Directory
        } else {
            Self::File
        }
    }
}

/// One blob the caller may read (`blobs` of [`BlobListView`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobView {
    pub cid: ContentId,
    pub size: u64,
    /// The name it was uploaded under (`upload` if none).
    pub name: String,
    pub kind: BlobKind,
    pub created_at: UnixMillis,
    /// Whether the coordinator's store holds it now.
    pub held: bool,
    /// A directory's files (an image's config and layers) and their bytes
    /// in all (`size` is its manifest's); absent for a file, or a manifest
    /// not held here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_size: Option<u64>,
}

/// `GET /v1/blobs`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobListView {
    pub blobs: Vec<BlobView>,
    /// Bytes counted against the caller's quota: everything it may read
    /// (uploads and its jobs' outputs), each counted once.
    #[serde(default)]
    pub used: u64,
    /// The caller's quota for uploads, if the coordinator sets one.
    #[serde(default)]
    pub quota: Option<u64>,
}

/// `DELETE /v1/blobs/{cid}`: the caller no longer holds the blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobDeletedView {
    pub cid: ContentId,
    /// Bytes released from the caller's quota.
    pub size: u64,
    /// Whether the bytes left the coordinator's disk (false: another
    /// buyer holds the same content, so only the caller's claim went).
    pub erased: bool,
    /// The caller's usage afterwards.
    pub used: u64,
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Every error answer: `{"error": "...", "field": "..."}`, `field` only
/// when one input is to blame (`spec.resources.memory`, `q`, `rank`, …).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorView {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    use super::*;
    use crate::keys::Keypair;
    use crate::messages::ResultReceipt;

    /// Parses `body` as `T`, serializes it back and requires the very same
    /// JSON (keys, nulls and values); returns the parsed view.
    fn round_trip<T: Serialize + DeserializeOwned>(body: &Value) -> T {
        let view: T =
            serde_json::from_value(body.clone()).unwrap_or_else(|e| panic!("{e}: {body:#}"));
        let back = serde_json::to_value(&view).unwrap();
        assert_eq!(&back, body, "re-serialized differently");
        view
    }

    fn provider() -> ProviderId {
        ProviderId::from_public_key(&Keypair::from_secret_bytes([3; 32]).public())
    }

    fn receipt(job: JobId, offer: OfferId, outcome: Outcome) -> Signed<ResultReceipt> {
        let key = Keypair::from_secret_bytes([3; 32]);
        let r = ResultReceipt {
            job_id: job,
            offer_id: offer,
            provider: ProviderId::from_public_key(&key.public()),
            outcome,
            exit_code: Some(0),
            error: None,
            image_digest: format!("sha256:{}", "ab".repeat(32)),
            input_cids: vec![ContentId::of_bytes(b"in")],
            output_cid: Manifest::default().cid(),
            stdout_cid: ContentId::of_bytes(b"hello\n"),
            stderr_cid: ContentId::of_bytes(b""),
            started_at: UnixMillis(1_700_000_000_000),
            finished_at: UnixMillis(1_700_000_001_500),
            usage: ResourceUsage {
                wall_ms: 1500,
                output_bytes: 0,
                stdout_bytes: 6,
                stderr_bytes: 0,
                logs_truncated: false,
                log_cap_bytes: 1 << 20,
            },
        };
        Signed::sign_with(
            &key,
            r,
            crate::ids::Nonce::from_bytes([9; 16]),
            UnixMillis(1_700_000_600_000),
        )
        .unwrap()
    }

    fn spec() -> JobSpec {
        let mut s = JobSpec::new(
            format!("sha256:{}", "ab".repeat(32)),
            vec!["echo".into(), "hi".into()],
        );
        s.resources.cpus = MilliCpu(500);
        s.resources.memory = ByteSize(64 << 20);
        s
    }

    /// What `api.rs::job_json` builds for a job with (or without) a receipt.
    fn job_json(state: &str, receipt: Option<&Signed<ResultReceipt>>) -> Value {
        let r = receipt.map(|r| &r.payload);
        let owner = BuyerId::new(Keypair::from_secret_bytes([1; 32]).public());
        json!({
            "job_id": JobId::from_bytes([7; 16]),
            "owner": owner,
            "label": "devnet demo",
            "state": state,
            "reason": if r.is_some() { Value::Null } else { json!("1 online; 1 excluded by slots") },
            "provider": r.map(|r| r.provider),
            "attempts": 1,
            "price_per_hour": 500_000,
            "max_cost": 5_000_000,
            "cost": r.map(|_| 209),
            "exit_code": r.and_then(|r| r.exit_code),
            "output_cid": r.map(|r| r.output_cid),
            "stdout_cid": r.map(|r| r.stdout_cid),
            "stderr_cid": r.map(|r| r.stderr_cid),
            "receipt_verified": receipt.is_some(),
            "logs_truncated": r.map(|r| r.usage.logs_truncated),
            "usage": r.map(|r| &r.usage),
            "receipt": receipt,
            "spec": spec(),
            "created_at": 1_700_000_000_000u64,
            "updated_at": 1_700_000_002_000u64,
        })
    }

    #[test]
    fn job_state_strings_round_trip_and_terminal_states_are_the_four_ends() {
        for s in &JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), *s);
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
            assert_eq!(s.to_string(), s.as_str());
        }
        let ends: Vec<JobState> = JobState::ALL
            .iter()
            .copied()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            ends,
            [
                JobState::Completed,
                JobState::Failed,
                JobState::TimedOut,
                JobState::Cancelled
            ]
        );
        assert!(!JobState::Cancelling.is_terminal() && JobState::Cancelling.is_active());
        assert_eq!(JobState::of_outcome(Outcome::TimedOut), JobState::TimedOut);
        let e = "paused".parse::<JobState>().unwrap_err();
        assert_eq!(e.to_string(), "unknown job state `paused`");
        for m in &MemberState::ALL {
            assert_eq!(m.as_str().parse::<MemberState>().unwrap(), *m);
            assert_eq!(serde_json::to_value(m).unwrap(), json!(m.as_str()));
        }
        assert!(MemberState::Stopping.pending() && !MemberState::Delivered.pending());
    }

    #[test]
    fn a_job_list_entry_and_a_submit_answer_parse_without_events_or_gang() {
        let queued = job_json("queued", None);
        let v: JobView = round_trip(&queued);
        assert_eq!(v.state, JobState::Queued);
        assert!(v.events.is_empty() && v.gang.is_none());
        assert!(v.receipt.is_none() && !v.receipt_verified);
        assert_eq!(v.reason.as_deref(), Some("1 online; 1 excluded by slots"));

        let list = json!({ "jobs": [queued, job_json("completed", Some(&receipt(JobId::from_bytes([7; 16]), OfferId::from_bytes([8; 16]), Outcome::Succeeded)))] });
        let l: JobListView = round_trip(&list);
        assert_eq!(l.jobs.len(), 2);
        assert_eq!(l.jobs[1].state, JobState::Completed);
        assert_eq!(l.jobs[1].cost, Some(Credits(209)));
        assert_eq!(l.jobs[1].usage.as_ref().unwrap().wall_ms, 1500);
    }

    #[test]
    fn a_full_job_with_events_and_gang_members_round_trips() {
        let job = JobId::from_bytes([7; 16]);
        let (o0, o1) = (OfferId::from_bytes([1; 16]), OfferId::from_bytes([2; 16]));
        let r0 = receipt(job, o0, Outcome::Succeeded);
        let mut v = job_json("completed", Some(&r0));
        v["attempts"] = json!(2);
        // `get_job` adds these two.
        v["events"] = json!([
            { "at": 1_700_000_000_000u64, "state": "queued", "detail": null },
            { "at": 1_700_000_000_100u64, "state": "dispatched", "detail": "gang of 2: reserving on aaaa, bbbb" },
            { "at": 1_700_000_000_200u64, "state": "queued", "detail": "requeued: gang member rank 1 refused" },
            { "at": 1_700_000_000_300u64, "state": "running", "detail": null },
            { "at": 1_700_000_002_000u64, "state": "completed", "detail": null },
        ]);
        // What `members_json` builds, per member execution.
        let member = |attempt: u32,
                      rank: u32,
                      offer: OfferId,
                      state: &str,
                      r: Option<&Signed<ResultReceipt>>| {
            json!({
                "attempt": attempt,
                "rank": rank,
                "provider": provider(),
                "offer_id": offer,
                "state": state,
                "outcome": r.map(|r| r.payload.outcome),
                "reason": if r.is_none() { json!("released: rank 1 refused") } else { Value::Null },
                "price_per_hour": 250_000,
                "paid": if r.is_some() { 105 } else { 0 },
                "cost": r.map(|_| 105),
                "started_at": r.map(|r| r.payload.started_at),
                "observed_ms": r.map(|_| 1500),
                "output_cid": r.map(|r| r.payload.output_cid),
                "stdout_cid": r.map(|r| r.payload.stdout_cid),
                "receipt": r,
                "manifest": r.map(|_| Manifest::default()),
            })
        };
        let r1 = receipt(job, o1, Outcome::Cancelled);
        let members = json!([
            member(1, 0, OfferId::from_bytes([3; 16]), "released", None),
            member(1, 1, OfferId::from_bytes([4; 16]), "released", None),
            member(2, 1, o1, "delivered", Some(&r1)),
            member(2, 0, o0, "delivered", Some(&r0)),
        ]);
        v["gang"] = members.clone();
        v["members"] = members;
        let j: JobView = round_trip(&v);
        assert_eq!(j.events.len(), 5);
        assert_eq!(j.events[2].state, JobState::Queued);
        assert_eq!(j.gang.as_ref().map(Vec::len), Some(4));
        assert_eq!(j.members.len(), 4);
        let current = j.gang_members();
        assert_eq!(
            current
                .iter()
                .map(|m| (m.attempt, m.rank))
                .collect::<Vec<_>>(),
            [(2, 0), (2, 1)]
        );
        assert_eq!(current[1].outcome, Some(Outcome::Cancelled));
        assert_eq!(current[1].state, MemberState::Delivered);
        assert_eq!(Some(current[1].paid), current[1].cost);
        assert_eq!(current[0].observed_ms, Some(1500));

        // A single-node job lists its executions under `members` only.
        let mut single = job_json("completed", Some(&r0));
        single["members"] = json!([member(1, 0, o0, "delivered", Some(&r0))]);
        let s: JobView = round_trip(&single);
        assert_eq!(s.members[0].state, MemberState::Delivered);
        assert!(s.gang.is_none() && s.gang_members().is_empty());

        // A gang that never got members still says so (`[]`, not absent).
        let mut empty = job_json("failed", None);
        empty["gang"] = json!([]);
        let e: JobView = round_trip(&empty);
        assert_eq!(e.gang.as_ref().map(Vec::len), Some(0));
        assert!(e.gang_members().is_empty());

        // A running member, and one from a coordinator that does not send
        // `started_at`/`observed_ms` (`gang::members_json` before them).
        let mut m = member(2, 0, o0, "started", None);
        m["started_at"] = json!(1_700_000_000_300u64);
        m["observed_ms"] = json!(1200);
        let mv: MemberView = round_trip(&m);
        assert_eq!(mv.started_at, Some(UnixMillis(1_700_000_000_300)));
        assert_eq!(mv.observed_ms, Some(1200));
        let mut old = member(2, 0, o0, "stopping", None);
        let fields = old.as_object_mut().unwrap();
        fields.remove("started_at");
        fields.remove("observed_ms");
        let mv: MemberView = serde_json::from_value(old).unwrap();
        assert_eq!(
            (mv.state, mv.started_at, mv.observed_ms),
            (MemberState::Stopping, None, None)
        );
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let mut v = job_json("running", None);
        v["something_new"] = json!({ "x": 1 });
        let j: JobView = serde_json::from_value(v).unwrap();
        assert_eq!(j.state, JobState::Running);
        let e: ErrorView =
            serde_json::from_value(json!({ "error": "no", "hint": "later" })).unwrap();
        assert_eq!(e.field, None);
    }

    #[test]
    fn cancel_outcomes_parse_every_form_the_coordinator_sends() {
        let job = JobId::from_bytes([7; 16]);
        for (s, want) in [
            ("cancelled", CancelOutcome::Cancelled),
            ("cancel_requested", CancelOutcome::CancelRequested),
            ("cancelling", CancelOutcome::Cancelling),
            (
                "already_completed",
                CancelOutcome::AlreadyEnded(JobState::Completed),
            ),
            (
                "already_timed_out",
                CancelOutcome::AlreadyEnded(JobState::TimedOut),
            ),
            (
                "already_cancelled",
                CancelOutcome::AlreadyEnded(JobState::Cancelled),
            ),
        ] {
            let c: CancelView = round_trip(&json!({ "job_id": job, "outcome": s }));
            assert_eq!(c.outcome, want);
            assert_eq!(c.outcome.as_str(), s);
            assert_eq!(c.outcome.to_string(), s);
        }
        for st in JobState::ALL {
            let o = CancelOutcome::AlreadyEnded(st);
            assert_eq!(o.as_str(), format!("already_{st}"));
            assert_eq!(o.as_str().parse::<CancelOutcome>().unwrap(), o);
        }
        assert!("already_gone".parse::<CancelOutcome>().is_err());
        assert!("stopped".parse::<CancelOutcome>().is_err());
    }

    #[test]
    fn logs_and_outputs_round_trip() {
        let r = receipt(
            JobId::from_bytes([7; 16]),
            OfferId::from_bytes([8; 16]),
            Outcome::Succeeded,
        );
        let logs = json!({
            "job_id": r.payload.job_id,
            "rank": null,
            "provider": r.payload.provider,
            "stdout": "hello\n",
            "stderr": "",
            "stdout_cid": r.payload.stdout_cid,
            "stderr_cid": r.payload.stderr_cid,
            "truncated": false,
            "clipped": false,
        });
        let l: LogsView = round_trip(&logs);
        assert_eq!(l.stdout, "hello\n");
        let mut ranked = logs.clone();
        ranked["rank"] = json!(1);
        assert_eq!(round_trip::<LogsView>(&ranked).rank, Some(1));

        let m = Manifest::new(vec![ManifestEntry {
            path: "result.txt".into(),
            cid: ContentId::of_bytes(b"seed=7"),
            size: 6,
            executable: false,
        }])
        .unwrap();
        let outputs =
            json!({ "job_id": r.payload.job_id, "output_cid": m.cid(), "entries": m.entries });
        let o: OutputsView = round_trip(&outputs);
        assert_eq!(o.manifest().unwrap().cid(), o.output_cid);
    }

    #[test]
    fn account_ledger_and_statement_bodies_round_trip() {
        let buyer = BuyerId::new(Keypair::from_secret_bytes([1; 32]).public());
        let account = format!("buyer:{buyer}");
        let a: AccountView =
            round_trip(&json!({ "account": account, "balance": 999_999_791u64, "escrowed": 0 }));
        assert_eq!(a.balance, Credits(999_999_791));

        let page = json!({
            "entries": [{ "seq": 0, "entry": "00ff" }, { "seq": 1, "entry": "zz" }],
            "next": 2,
        });
        let p: LedgerPageView = round_trip(&page);
        assert_eq!(p.entries[0].bytes().unwrap(), [0, 0xff]);
        assert!(
            p.entries[1].bytes().is_err(),
            "bad hex is the auditor's to name"
        );
        let last: LedgerPageView = round_trip(&json!({ "entries": [], "next": null }));
        assert_eq!(last.next, None);

        let b: BalancesView = round_trip(&json!({
            "balances": { (account.clone()): 999_999_791u64, "fee": 5 },
        }));
        assert_eq!(b.balances["fee"], Credits(5));

        // The effect is the contracts crate's `Applied`; any serde type here.
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Effect {
            Locked { amount: Credits },
        }
        let st = json!({
            "account": account,
            "balance": 995_000_000u64,
            "entries": [{
                "seq": 3,
                "at": 1_700_000_000_000u64,
                "op": "lock",
                "key": format!("lock:{}", JobId::from_bytes([7; 16])),
                "delta": "-5000000",
                "effect": { "locked": { "amount": 5_000_000 } },
            }, {
                "seq": 9,
                "at": 1_700_000_000_000u64,
                "op": "interval settlement",
                "key": "interval:x:1",
                "delta": "170141183460469231731687303715884105727",
                "effect": { "locked": { "amount": 1 } },
            }],
        });
        let s: StatementView<String, Effect> = round_trip(&st);
        assert_eq!(s.entries[0].delta, -5_000_000);
        assert_eq!(s.entries[1].delta, i128::MAX);
        assert_eq!(
            s.entries[0].effect,
            Effect::Locked {
                amount: Credits(5_000_000)
            }
        );
    }

    #[test]
    fn providers_offers_audits_and_info_round_trip() {
        let p = provider();
        let providers = json!({ "providers": [{
            "provider": p,
            "last_seen": 1_700_000_000_000u64,
            "cpu": { "model": "test", "logical_cores": 4, "matmul_mflops": 1 },
            "memory": 8u64 << 30,
            "gpus": [{
                "index": 0, "uuid": "GPU-1", "name": "NVIDIA H100 80GB HBM3",
                "memory_total": 85_899_345_920u64, "compute_capability": [9, 0],
                "driver_version": "580.159.04",
                "mig": null,
            }],
            "slots": 2,
            "price_per_cpu_hour": 100_000,
            "price_per_gpu_hour": 2_000_000,
            "benchmark": null,
            "reputation": 500,
            "earned": 1_000_000_209u64,
            "addrs": ["/ip4/127.0.0.1/tcp/4001"],
            "cached": [ContentId::of_bytes(b"in")],
        }]});
        let ps: ProvidersView = round_trip(&providers);
        assert_eq!(ps.providers[0].gpus[0].compute_capability, (9, 0));

        let offers = json!({
            "query": "cpus>=1 num_gpus=0",
            "sort": "tflops_per_price",
            "offers": [{
                "provider": p, "region": null, "gpu_name": null, "num_gpus": 0, "free_gpus": 0,
                "vram": 0, "compute_capability": null, "tflops": null,
                "price_per_gpu_hour": 2_000_000, "price_per_cpu_hour": 100_000,
                "tflops_per_price": 0.0, "cpus": 4.0, "free_cpus": 3.5,
                "memory": 8u64 << 30, "free_memory": 8u64 << 30, "disk": 0, "free_disk": 0,
                "slots": 2, "free_slots": 1, "reputation": 500, "allows_network": false, "cached": 1,
            }],
        });
        let o: OffersView = round_trip(&offers);
        assert_eq!(o.sort, OfferSort::TflopsPerPrice);
        assert_eq!(o.offers[0].free_cpus, MilliCpu(3500));

        let audits = json!({
            "provider": p,
            "reputation": 250,
            "audits": [{
                "at": 1_700_000_000_000u64,
                "challenge_id": ChallengeId::from_bytes([5; 16]),
                "outcome": "failed",
                "detail": "no answer within 3s",
            }],
        });
        let a: ProviderAuditsView = round_trip(&audits);
        assert_eq!(a.audits[0].outcome, AuditOutcome::Failed);

        let key = Keypair::from_secret_bytes([2; 32]).public();
        let info = json!({
            "peer_id": ProviderId::from_public_key(&key),
            "public_key": key,
            "p2p_addrs": ["/ip4/127.0.0.1/tcp/4001/p2p/x"],
            "version": "0.1.0",
            "faucet": 1_000_000_000u64,
        });
        let i: InfoView = round_trip(&info);
        assert_eq!(i.public_key, key);
        let mut no_faucet = info.clone();
        no_faucet["faucet"] = Value::Null;
        assert_eq!(round_trip::<InfoView>(&no_faucet).faucet, None);
    }

    #[test]
    fn blob_bodies_and_errors_round_trip() {
        let cid = ContentId::of_bytes(b"x");
        let dir = Manifest::default().cid();
        round_trip::<MissingRequest>(&json!({ "cids": [cid, dir] }));
        assert_eq!(
            round_trip::<MissingView>(&json!({ "missing": [cid] })).missing,
            [cid]
        );
        // `POST /v1/blobs` has no `stored`; `PUT /v1/blobs/{cid}` has.
        assert_eq!(
            round_trip::<UploadView>(&json!({ "cid": cid, "size": 1 })).stored,
            None
        );
        assert_eq!(
            round_trip::<UploadView>(&json!({ "cid": cid, "size": 1, "stored": false })).stored,
            Some(false)
        );
        let list = json!({ "blobs": [
            { "cid": cid, "size": 1, "name": "x.bin", "kind": "file", "created_at": 1_700_000_000_000u64, "held": true },
            { "cid": dir, "size": 9, "name": "ds/", "kind": "directory", "created_at": 1_700_000_000_000u64, "held": false },
        ], "used": 10, "quota": 1024 });
        let l: BlobListView = round_trip(&list);
        assert_eq!(l.blobs[0].kind, BlobKind::of(&cid));
        assert_eq!(l.blobs[1].kind, BlobKind::of(&dir));
        assert_eq!((l.used, l.quota), (10, Some(1024)));
        // A coordinator from before quotas sends neither.
        let old: BlobListView = serde_json::from_value(json!({ "blobs": [] })).unwrap();
        assert_eq!((old.used, old.quota), (0, None));
        let d: BlobDeletedView =
            round_trip(&json!({ "cid": cid, "size": 1, "erased": true, "used": 0 }));
        assert!(d.erased);

        let e: ErrorView = round_trip(
            &json!({ "error": "invalid job spec: image: not pinned", "field": "spec.image" }),
        );
        assert_eq!(e.field.as_deref(), Some("spec.image"));
        let e: ErrorView = round_trip(&json!({ "error": "no job" }));
        assert_eq!(e.field, None);
    }
}
