//! Multi-node gang jobs (`resources.gang = k > 1`): all `k` nodes or none.
//!
//! Dispatch is reserve → confirm all → start:
//!
//! 1. The scheduler's round reserved `k` distinct providers
//!    ([`crate::sched::place_gang`]). [`place`] moves the job to
//!    `dispatched` and stores one `gang_members` row per node (its own offer
//!    id, rank, provider, price) in one transaction.
//! 2. [`run`] sends every member a signed [`GangOffer`]; a node reserves a
//!    slot and GPUs and answers `Accepted` but starts nothing.
//! 3. If every member reserved, each gets a signed [`GangStart`] and the job
//!    becomes `running`. If any refused, timed out or vanished, every member
//!    gets a signed [`GangRelease`], and the job goes back to the queue (an
//!    attempt counted, the reason in its events) or fails after
//!    `max_attempts`. A node that hears no start within the offer's hold
//!    releases by itself, so a coordinator crash mid-dispatch strands nothing.
//! 4. Each member delivers its own signed receipt, checked like any other
//!    ([`verify::check_result`] against the member's offer and provider),
//!    and is paid for its own wall time from the job's escrow (locked for
//!    all `k` nodes at submission). The job ends when every member has
//!    delivered; if one fails the others are stopped and the job fails.
//!    A member lost while running (its provider vanished, or reported the
//!    job lost) stops the others and requeues the job.
//!
//! The decisions are pure functions ([`after_reserve`], [`after_start`],
//! [`after_results`]) with table-driven tests; the rest is I/O around them.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use futures::future::join_all;
use kiln_contracts::{ContractError, Op, OpKey};
use kiln_protocol::spec::cost_for;
use kiln_protocol::{
    CancelJob, Credits, GangMember, GangOffer, GangRelease, GangStart, JobId, JobLost, JobOffer,
    JobResult, Manifest, NetRequest, NetResponse, OfferId, Outcome, ProviderId, ResultReceipt,
    Signed, UnixMillis, UsageReport,
};
use sqlx::Row;

use crate::AppState;
use crate::db::{Change, Db, DbError, JobRecord, JobState, ResultColumns, Tx};
use crate::sched::Placement;
use crate::service::rejected;
use crate::verify::{self, Expected};

/// Where one member of a gang is in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Sent a gang offer; no answer yet.
    Offered,
    /// The node reserved its slot and GPUs; nothing started.
    Reserved,
    /// Told to start.
    Started,
    /// Released before it started (or lost): it will deliver nothing.
    Released,
    /// Told to stop after it started; its receipt is still expected and paid.
    Stopping,
    /// Its verified receipt is recorded.
    Delivered,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Offered => "offered",
            Self::Reserved => "reserved",
            Self::Started => "started",
            Self::Released => "released",
            Self::Stopping => "stopping",
            Self::Delivered => "delivered",
        }
    }

    /// Whether a result is still expected from it.
    pub fn pending(self) -> bool {
        matches!(
            self,
            Self::Offered | Self::Reserved | Self::Started | Self::Stopping
        )
    }
}

impl FromStr for MemberState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "offered" => Self::Offered,
            "reserved" => Self::Reserved,
            "started" => Self::Started,
            "released" => Self::Released,
            "stopping" => Self::Stopping,
            "delivered" => Self::Delivered,
            other => return Err(format!("unknown gang member state `{other}`")),
        })
    }
}

fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::TimedOut => "timed_out",
        Outcome::Cancelled => "cancelled",
    }
}

fn outcome_from(s: &str) -> Option<Outcome> {
    Some(match s {
        "succeeded" => Outcome::Succeeded,
        "failed" => Outcome::Failed,
        "timed_out" => Outcome::TimedOut,
        "cancelled" => Outcome::Cancelled,
        _ => return None,
    })
}

/// One member as stored.
#[derive(Clone, Debug)]
pub struct Member {
    pub offer_id: OfferId,
    pub job_id: JobId,
    pub attempt: u32,
    pub rank: u32,
    pub provider: ProviderId,
    pub listen_addrs: Vec<String>,
    pub price_per_hour: Credits,
    pub state: MemberState,
    pub reason: Option<String>,
    pub outcome: Option<Outcome>,
    pub paid: Credits,
    pub cost: Option<Credits>,
    pub receipt: Option<Signed<ResultReceipt>>,
    pub manifest: Option<Manifest>,
}

// ---------------------------------------------------------------------------
// Pure decisions
// ---------------------------------------------------------------------------

/// A member's answer to a gang offer or a start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Accepted,
    Refused(String),
    /// No answer: a transport error or timeout (the node may or may not
    /// have received the message).
    Unreachable(String),
}

/// What to do once every member answered its gang offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveVerdict {
    StartAll,
    /// Release every member (those that refused too: releasing is
    /// idempotent, and one that timed out may have reserved after all).
    ReleaseAll {
        reason: String,
    },
}

/// Why members failed, one clause per member: `rank 1 refused: …`.
fn failures(replies: &[Reply], providers: &[ProviderId]) -> Vec<String> {
    replies
        .iter()
        .enumerate()
        .filter_map(|(rank, r)| {
            let who = providers
                .get(rank)
                .map(|p| format!("gang member rank {rank} (provider {})", p.short()))
                .unwrap_or_else(|| format!("gang member rank {rank}"));
            match r {
                Reply::Accepted => None,
                Reply::Refused(why) => Some(format!("{who} refused: {why}")),
                Reply::Unreachable(why) => Some(format!("{who} did not answer: {why}")),
            }
        })
        .collect()
}

/// All reserved: start. Anything else: release all.
pub fn after_reserve(replies: &[Reply], providers: &[ProviderId]) -> ReserveVerdict {
    let failed = failures(replies, providers);
    if replies.is_empty() {
        return ReserveVerdict::ReleaseAll {
            reason: "a gang with no members".into(),
        };
    }
    if failed.is_empty() {
        ReserveVerdict::StartAll
    } else {
        ReserveVerdict::ReleaseAll {
            reason: format!(
                "{}; released the other members, nothing started",
                failed.join("; ")
            ),
        }
    }
}

/// What to do once every member answered its start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartVerdict {
    Running,
    /// Some did not start: stop the ranks in `stop` (they may have), release
    /// the rest, requeue.
    Abort {
        stop: Vec<u32>,
        reason: String,
    },
}

/// Every start accepted: running. Otherwise stop every member that might
/// have started (accepted, or no answer) and requeue.
pub fn after_start(replies: &[Reply], providers: &[ProviderId]) -> StartVerdict {
    let failed = failures(replies, providers);
    if failed.is_empty() && !replies.is_empty() {
        return StartVerdict::Running;
    }
    let stop = replies
        .iter()
        .enumerate()
        .filter(|(_, r)| !matches!(r, Reply::Refused(_)))
        .map(|(rank, _)| rank as u32)
        .collect();
    StartVerdict::Abort {
        stop,
        reason: format!("{} at start; stopped the others", failed.join("; ")),
    }
}

/// A member as [`after_results`] sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub state: MemberState,
    pub outcome: Option<Outcome>,
    pub reason: Option<String>,
}

/// What a job's members' results add up to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobVerdict {
    /// Results still to come.
    Wait,
    /// A member failed: stop these ranks (still running), then wait.
    Stop { ranks: Vec<u32>, reason: String },
    /// Every member is done: the job ends with this outcome.
    Done {
        outcome: Outcome,
        reason: Option<String>,
    },
}

/// The job completes when every member succeeded; the first member to fail
/// (by severity: failed, timed out, cancelled; then rank) fails it, and
/// members still running are stopped.
pub fn after_results(members: &[Seen]) -> JobVerdict {
    let severity = |o: Outcome| match o {
        Outcome::Failed => 0,
        Outcome::TimedOut => 1,
        Outcome::Cancelled => 2,
        Outcome::Succeeded => 3,
    };
    let worst = members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.state == MemberState::Delivered)
        .filter_map(|(rank, m)| m.outcome.map(|o| (severity(o), rank, o, m.reason.clone())))
        .filter(|(_, _, o, _)| *o != Outcome::Succeeded)
        .min_by_key(|(s, rank, _, _)| (*s, *rank));
    let pending = members.iter().any(|m| m.state.pending());
    let released = members
        .iter()
        .position(|m| m.state == MemberState::Released);
    if !pending {
        return match (worst, released) {
            (Some((_, rank, o, why)), _) => JobVerdict::Done {
                outcome: o,
                reason: Some(format!(
                    "gang member rank {rank}: {}",
                    why.unwrap_or_else(|| outcome_str(o).into())
                )),
            },
            (None, Some(rank)) => JobVerdict::Done {
                outcome: Outcome::Cancelled,
                reason: Some(format!(
                    "gang member rank {rank} was released before it ran"
                )),
            },
            (None, None) => JobVerdict::Done {
                outcome: Outcome::Succeeded,
                reason: None,
            },
        };
    }
    match worst {
        Some((_, rank, o, why)) => {
            let ranks: Vec<u32> = members
                .iter()
                .enumerate()
                .filter(|(_, m)| matches!(m.state, MemberState::Started | MemberState::Reserved))
                .map(|(r, _)| r as u32)
                .collect();
            if ranks.is_empty() {
                JobVerdict::Wait
            } else {
                JobVerdict::Stop {
                    ranks,
                    reason: format!(
                        "gang member rank {rank} {}: {}; stopping the others",
                        outcome_str(o),
                        why.unwrap_or_default()
                    ),
                }
            }
        }
        None => JobVerdict::Wait,
    }
}

/// Job state for a gang outcome.
fn job_state(o: Outcome) -> JobState {
    match o {
        Outcome::Succeeded => JobState::Completed,
        Outcome::Failed => JobState::Failed,
        Outcome::TimedOut => JobState::TimedOut,
        Outcome::Cancelled => JobState::Cancelled,
    }
}

// ---------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------

const T: &str = "gang_members";
/// The columns [`member_from_row`] reads (a macro, so queries stay `&'static str`).
macro_rules! select_members {
    ($rest:literal) => {
        concat!(
            "SELECT offer_id, job_id, attempt, rank, provider, listen_addrs, price_per_hour, state, reason, \
             outcome, paid, cost, receipt, manifest_json FROM gang_members ",
            $rest
        )
    };
}

fn corrupt(reason: impl ToString) -> DbError {
    DbError::Corrupt {
        table: T,
        reason: reason.to_string(),
    }
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn member_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Member, DbError> {
    let s = |c: &str| -> Result<String, DbError> { Ok(r.try_get::<String, _>(c)?) };
    let u = |c: &str| -> Result<u64, DbError> {
        Ok(u64::try_from(r.try_get::<i64, _>(c)?).unwrap_or(0))
    };
    Ok(Member {
        offer_id: s("offer_id")?.parse().map_err(corrupt)?,
        job_id: s("job_id")?.parse().map_err(corrupt)?,
        attempt: u32::try_from(u("attempt")?).unwrap_or(0),
        rank: u32::try_from(u("rank")?).unwrap_or(0),
        provider: s("provider")?.parse().map_err(corrupt)?,
        listen_addrs: serde_json::from_str(&s("listen_addrs")?).map_err(corrupt)?,
        price_per_hour: Credits(u("price_per_hour")?),
        state: s("state")?.parse().map_err(corrupt)?,
        reason: r.try_get("reason")?,
        outcome: r
            .try_get::<Option<String>, _>("outcome")?
            .and_then(|o| outcome_from(&o)),
        paid: Credits(u("paid")?),
        cost: r
            .try_get::<Option<i64>, _>("cost")?
            .map(|c| Credits(u64::try_from(c).unwrap_or(0))),
        receipt: r
            .try_get::<Option<Vec<u8>>, _>("receipt")?
            .map(|b| Signed::from_bytes(&b).map_err(corrupt))
            .transpose()?,
        manifest: r
            .try_get::<Option<String>, _>("manifest_json")?
            .map(|m| serde_json::from_str(&m).map_err(corrupt))
            .transpose()?,
    })
}

async fn insert(tx: &mut Tx<'_>, m: &Member) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO gang_members (offer_id, job_id, attempt, rank, provider, listen_addrs, price_per_hour, state, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(m.offer_id.to_string())
    .bind(m.job_id.to_string())
    .bind(i64::from(m.attempt))
    .bind(i64::from(m.rank))
    .bind(m.provider.to_string())
    .bind(serde_json::to_string(&m.listen_addrs).map_err(corrupt)?)
    .bind(i(m.price_per_hour.0))
    .bind(m.state.as_str())
    .bind(i(UnixMillis::now().0))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Moves a member from one of `from` to `to`; false if it was elsewhere.
async fn set_state(
    tx: &mut Tx<'_>,
    offer: &OfferId,
    from: &[MemberState],
    to: MemberState,
    reason: Option<&str>,
) -> Result<bool, DbError> {
    let mut changed = false;
    for f in from {
        let r = sqlx::query(
            "UPDATE gang_members SET state = ?, reason = COALESCE(?, reason), updated_at = ? WHERE offer_id = ? AND state = ?",
        )
        .bind(to.as_str())
        .bind(reason)
        .bind(i(UnixMillis::now().0))
        .bind(offer.to_string())
        .bind(f.as_str())
        .execute(&mut **tx)
        .await?;
        changed |= r.rows_affected() > 0;
    }
    Ok(changed)
}

/// One member by its offer id.
pub async fn member(state: &AppState, offer: &OfferId) -> Result<Option<Member>, DbError> {
    let row = sqlx::query(select_members!("WHERE offer_id = ?"))
        .bind(offer.to_string())
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(member_from_row).transpose()
}

/// Every member of `job`, all attempts, by attempt then rank.
pub async fn members(state: &AppState, job: &JobId) -> Result<Vec<Member>, DbError> {
    let rows = sqlx::query(select_members!("WHERE job_id = ? ORDER BY attempt, rank"))
        .bind(job.to_string())
        .fetch_all(&state.db.pool)
        .await?;
    rows.iter().map(member_from_row).collect()
}

async fn members_in_tx(tx: &mut Tx<'_>, job: &JobId, attempt: u32) -> Result<Vec<Member>, DbError> {
    let rows = sqlx::query(select_members!(
        "WHERE job_id = ? AND attempt = ? ORDER BY rank"
    ))
    .bind(job.to_string())
    .bind(i64::from(attempt))
    .fetch_all(&mut **tx)
    .await?;
    rows.iter().map(member_from_row).collect()
}

/// One member, read inside a write transaction (so it cannot change under us).
async fn member_in_tx(tx: &mut Tx<'_>, offer: &OfferId) -> Result<Option<Member>, DbError> {
    let row = sqlx::query(select_members!("WHERE offer_id = ?"))
        .bind(offer.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(member_from_row).transpose()
}

/// A job's state and attempt count, read inside a write transaction.
async fn job_in_tx(tx: &mut Tx<'_>, job: &JobId) -> Result<Option<(JobState, u32)>, DbError> {
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT state, attempts FROM jobs WHERE id = ?")
            .bind(job.to_string())
            .fetch_optional(&mut **tx)
            .await?;
    row.map(|(s, a)| Ok((s.parse().map_err(corrupt)?, u32::try_from(a).unwrap_or(0))))
        .transpose()
}

/// Members still holding capacity on their nodes (for rebuilding the fleet).
pub async fn active_members(state: &AppState) -> Result<Vec<Member>, DbError> {
    let rows = sqlx::query(select_members!(
        "WHERE state IN ('offered', 'reserved', 'started')"
    ))
    .fetch_all(&state.db.pool)
    .await?;
    rows.iter().map(member_from_row).collect()
}

/// Running (or reserved) gang jobs in which `peer` holds a member: their
/// inputs may be fetched by it.
pub async fn member_jobs(state: &AppState, peer: ProviderId) -> Result<Vec<JobRecord>, DbError> {
    let jobs: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT job_id FROM gang_members WHERE provider = ? AND state IN ('reserved', 'started')",
    )
    .bind(peer.to_string())
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::new();
    for j in jobs {
        let Ok(id) = j.parse::<JobId>() else { continue };
        if let Some(job) = state.db.job(&id).await?
            && matches!(job.state, JobState::Dispatched | JobState::Running)
        {
            out.push(job);
        }
    }
    Ok(out)
}

/// The members of the job's current attempt.
async fn current(state: &AppState, job: &JobRecord) -> Result<Vec<Member>, DbError> {
    Ok(members(state, &job.id)
        .await?
        .into_iter()
        .filter(|m| m.attempt == job.attempts)
        .collect())
}

/// Every member of `job` (all attempts) as the job's API shows them.
pub async fn members_json(state: &AppState, job: &JobId) -> Result<serde_json::Value, DbError> {
    let ms = members(state, job).await?;
    Ok(serde_json::Value::Array(
        ms.iter()
            .map(|m| {
                serde_json::json!({
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
                    "output_cid": m.receipt.as_ref().map(|r| r.payload.output_cid),
                    "stdout_cid": m.receipt.as_ref().map(|r| r.payload.stdout_cid),
                    "receipt": m.receipt,
                    "manifest": m.manifest,
                })
            })
            .collect(),
    ))
}

// ---------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------

/// Records a placed gang (`placements`, one per rank, `addrs` their listen
/// addresses) and starts its dispatch. `false` if the job was no longer queued.
pub async fn place(
    state: &AppState,
    job: &JobRecord,
    placements: &[Placement],
    addrs: Vec<Vec<String>>,
) -> Result<bool, DbError> {
    let attempt = job.attempts + 1;
    let members: Vec<Member> = placements
        .iter()
        .zip(addrs)
        .enumerate()
        .map(|(rank, (p, addrs))| Member {
            offer_id: OfferId::random(),
            job_id: job.id,
            attempt,
            rank: rank as u32,
            provider: p.provider,
            listen_addrs: addrs,
            price_per_hour: p.price_per_hour,
            state: MemberState::Offered,
            reason: None,
            outcome: None,
            paid: Credits(0),
            cost: None,
            receipt: None,
            manifest: None,
        })
        .collect();
    let total = members
        .iter()
        .fold(0u64, |a, m| a.saturating_add(m.price_per_hour.0));
    let detail = format!(
        "gang of {}: reserving on {}",
        members.len(),
        members
            .iter()
            .map(|m| m.provider.short())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut tx = state.db.begin().await?;
    let change = Change {
        reason: Some(&detail),
        price_per_hour: Some(Credits(total)),
        bump_attempts: true,
        ..Default::default()
    };
    if !Db::transition(
        &mut tx,
        &job.id,
        &[JobState::Queued],
        JobState::Dispatched,
        change,
    )
    .await?
    {
        return Ok(false);
    }
    for m in &members {
        insert(&mut tx, m).await?;
    }
    tx.commit().await?;
    let mut job = job.clone();
    job.attempts = attempt;
    job.state = JobState::Dispatched;
    tracing::info!(job = %job.id.short(), attempt, "{detail}");
    tokio::spawn(run(state.clone(), job, members));
    Ok(true)
}

fn addrs_of(m: &Member) -> Vec<kiln_net::Addr> {
    m.listen_addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// Sends one request to a member; retries transport errors (every gang
/// message is idempotent on the node).
async fn send(state: &AppState, m: &Member, req: NetRequest, tries: u32) -> Reply {
    let mut last = Reply::Unreachable("not sent".into());
    for t in 0..tries.max(1) {
        match state
            .net
            .request(m.provider.peer_id(), addrs_of(m), req.clone())
            .await
        {
            Ok(NetResponse::Accepted) => return Reply::Accepted,
            Ok(NetResponse::Rejected { reason }) => return Reply::Refused(reason),
            Ok(other) => return Reply::Refused(format!("unexpected answer: {other:?}")),
            Err(e) => last = Reply::Unreachable(e.to_string()),
        }
        if t + 1 < tries {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    last
}

fn sign<T: kiln_protocol::SignedMessage>(state: &AppState, msg: T) -> Option<Signed<T>> {
    match Signed::sign(&state.key, msg, state.config.offer_ttl.as_secs()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("cannot sign a gang message: {e}");
            None
        }
    }
}

async fn release_members(state: &AppState, ms: &[&Member], reason: &str) {
    let sends = ms.iter().map(|m| async move {
        let msg = GangRelease {
            job_id: m.job_id,
            offer_id: m.offer_id,
            provider: m.provider,
            reason: reason.to_string(),
        };
        if let Some(s) = sign(state, msg)
            && let Reply::Refused(why) | Reply::Unreachable(why) =
                send(state, m, NetRequest::GangRelease(s), 1).await
        {
            // The node releases by itself when its hold runs out.
            tracing::debug!(rank = m.rank, "gang release not confirmed: {why}");
        }
    });
    join_all(sends).await;
}

async fn stop_members(state: &AppState, ms: &[&Member], reason: &str) {
    let sends = ms.iter().map(|m| async move {
        let msg = CancelJob {
            job_id: m.job_id,
            offer_id: m.offer_id,
            provider: m.provider,
            reason: reason.to_string(),
        };
        if let Some(s) = sign(state, msg)
            && let Reply::Refused(why) | Reply::Unreachable(why) =
                send(state, m, NetRequest::Cancel(s), 3).await
        {
            tracing::warn!(job = %m.job_id.short(), rank = m.rank, "could not stop a gang member: {why}");
        }
    });
    join_all(sends).await;
}

/// Marks members released (`to_release`) or stopping (`to_stop`) in one
/// transaction, then tells their nodes.
async fn wind_down(
    state: &AppState,
    to_release: &[&Member],
    to_stop: &[&Member],
    reason: &str,
) -> Result<(), DbError> {
    let mut tx = state.db.begin().await?;
    for m in to_release {
        set_state(
            &mut tx,
            &m.offer_id,
            &[MemberState::Offered, MemberState::Reserved],
            MemberState::Released,
            Some(reason),
        )
        .await?;
    }
    for m in to_stop {
        set_state(
            &mut tx,
            &m.offer_id,
            &[
                MemberState::Offered,
                MemberState::Reserved,
                MemberState::Started,
            ],
            MemberState::Stopping,
            Some(reason),
        )
        .await?;
    }
    tx.commit().await?;
    // Told in the background: a node that hangs must not hold up the
    // requeue (an unreleased reservation expires on the node by itself).
    let (state, reason) = (state.clone(), reason.to_string());
    let to_release: Vec<Member> = to_release.iter().map(|m| (*m).clone()).collect();
    let to_stop: Vec<Member> = to_stop.iter().map(|m| (*m).clone()).collect();
    tokio::spawn(async move {
        let (r, s): (Vec<&Member>, Vec<&Member>) =
            (to_release.iter().collect(), to_stop.iter().collect());
        futures::join!(
            release_members(&state, &r, &reason),
            stop_members(&state, &s, &reason)
        );
    });
    Ok(())
}

/// Reserve, confirm all, start (see the module docs).
async fn run(state: AppState, job: JobRecord, members: Vec<Member>) {
    if let Err(e) = run_inner(&state, &job, &members).await {
        tracing::error!(job = %job.id.short(), "gang dispatch failed: {e}");
    }
    state.wake.notify_one();
}

async fn run_inner(state: &AppState, job: &JobRecord, members: &[Member]) -> Result<(), DbError> {
    let size = members.len() as u32;
    let providers: Vec<ProviderId> = members.iter().map(|m| m.provider).collect();
    let roster: Vec<GangMember> = members
        .iter()
        .map(|m| GangMember {
            rank: m.rank,
            provider: m.provider,
            listen_addrs: m.listen_addrs.clone(),
        })
        .collect();
    let hold_ms = u64::try_from(state.config.offer_ttl.as_millis()).unwrap_or(u64::MAX);
    // 1. Reserve.
    let offers = members.iter().map(|m| {
        let roster = roster.clone();
        async move {
            let mut job_offer = JobOffer {
                offer_id: m.offer_id,
                job_id: job.id,
                provider: m.provider,
                owner: job.owner,
                spec: job.spec.clone(),
                price_per_hour: m.price_per_hour,
                sources: Vec::new(),
            };
            job_offer.sources = crate::blobs::offer_sources(state, &job_offer).await;
            let offer = GangOffer {
                offer: job_offer,
                rank: m.rank,
                size,
                members: roster,
                hold_ms,
            };
            match sign(state, offer) {
                Some(s) => send(state, m, NetRequest::GangOffer(s), 3).await,
                None => Reply::Refused("the coordinator could not sign the offer".into()),
            }
        }
    });
    let replies = join_all(offers).await;
    let mut tx = state.db.begin().await?;
    for (m, r) in members.iter().zip(&replies) {
        match r {
            Reply::Accepted => {
                set_state(
                    &mut tx,
                    &m.offer_id,
                    &[MemberState::Offered],
                    MemberState::Reserved,
                    None,
                )
                .await?;
            }
            // Not offered work again until it registers again (when its
            // advert says what changed: owner back, draining, busy): retrying
            // the gang on it now would only fail again and spend the job's
            // attempts, and the other members' time.
            Reply::Unreachable(_) | Reply::Refused(_) => {
                crate::live::lock(state).suspend(&m.provider)
            }
        }
    }
    tx.commit().await?;
    let all: Vec<&Member> = members.iter().collect();
    let still_dispatched = state
        .db
        .job(&job.id)
        .await?
        .is_some_and(|j| j.state == JobState::Dispatched && j.attempts == job.attempts);
    let verdict = if still_dispatched {
        after_reserve(&replies, &providers)
    } else {
        ReserveVerdict::ReleaseAll {
            reason: "the job was cancelled while its gang reserved".into(),
        }
    };
    match verdict {
        ReserveVerdict::ReleaseAll { reason } => {
            tracing::warn!(job = %job.id.short(), "{reason}");
            wind_down(state, &all, &[], &reason).await?;
            if still_dispatched {
                crate::service::requeue_or_fail(state, job, &reason).await?;
            }
            Ok(())
        }
        ReserveVerdict::StartAll => {
            // 2. Every member reserved: start them all.
            let starts = members.iter().map(|m| async move {
                let msg = GangStart {
                    job_id: job.id,
                    offer_id: m.offer_id,
                    provider: m.provider,
                };
                match sign(state, msg) {
                    Some(s) => send(state, m, NetRequest::GangStart(s), 3).await,
                    None => Reply::Refused("the coordinator could not sign the start".into()),
                }
            });
            let replies = join_all(starts).await;
            let mut tx = state.db.begin().await?;
            // If the job left this attempt while the starts were in flight
            // (the buyer cancelled, or it was requeued), members that
            // accepted the start were released meanwhile and must be
            // stopped, not left running unaccounted. (A member that is
            // merely fast may already have delivered: not an orphan.)
            let attempt_live = job_in_tx(&mut tx, &job.id)
                .await?
                .is_some_and(|(s, a)| s == JobState::Dispatched && a == job.attempts);
            let mut orphaned: Vec<&Member> = Vec::new();
            for (m, r) in members.iter().zip(&replies) {
                if *r == Reply::Accepted
                    && !set_state(
                        &mut tx,
                        &m.offer_id,
                        &[MemberState::Reserved],
                        MemberState::Started,
                        None,
                    )
                    .await?
                    && !attempt_live
                {
                    orphaned.push(m);
                }
            }
            if !orphaned.is_empty() {
                tx.commit().await?;
                let reason = "the job was cancelled or requeued while its gang started";
                tracing::warn!(job = %job.id.short(), "{reason}; stopping {} member(s)", orphaned.len());
                let rest: Vec<&Member> = all
                    .iter()
                    .copied()
                    .filter(|m| !orphaned.iter().any(|o| o.offer_id == m.offer_id))
                    .collect();
                wind_down(state, &rest, &orphaned, reason).await?;
                return Ok(());
            }
            match after_start(&replies, &providers) {
                StartVerdict::Running => {
                    let why = format!("all {size} gang members started");
                    // False if every member already delivered (fast jobs).
                    Db::transition(
                        &mut tx,
                        &job.id,
                        &[JobState::Dispatched],
                        JobState::Running,
                        Change {
                            reason: Some(&why),
                            ..Default::default()
                        },
                    )
                    .await?;
                    tx.commit().await?;
                    tracing::info!(job = %job.id.short(), "{why}");
                    Ok(())
                }
                StartVerdict::Abort { stop, reason } => {
                    tx.commit().await?;
                    tracing::warn!(job = %job.id.short(), "{reason}");
                    let (to_stop, to_release): (Vec<&Member>, Vec<&Member>) =
                        all.iter().partition(|m| stop.contains(&m.rank));
                    wind_down(state, &to_release, &to_stop, &reason).await?;
                    crate::service::requeue_or_fail(state, job, &reason).await
                }
            }
        }
    }
}

/// After a restart: a gang that was still reserving is released and requeued
/// (its nodes release by themselves anyway once their hold runs out).
pub async fn recover(state: &AppState) -> Result<(), DbError> {
    for job in state.db.jobs_in(&[JobState::Dispatched], 100_000).await? {
        if job.spec.resources.gang <= 1 {
            continue;
        }
        let ms = current(state, &job).await?;
        let reason = "the coordinator restarted while the gang reserved; released";
        let open: Vec<&Member> = ms
            .iter()
            .filter(|m| matches!(m.state, MemberState::Offered | MemberState::Reserved))
            .collect();
        let started: Vec<&Member> = ms
            .iter()
            .filter(|m| m.state == MemberState::Started)
            .collect();
        wind_down(state, &open, &started, reason).await?;
        crate::service::requeue_or_fail(state, &job, reason).await?;
    }
    Ok(())
}

/// A member is gone (lease expired, or its node reported the job lost):
/// stop the others and requeue (or fail) the job.
async fn member_lost(
    state: &AppState,
    job: &JobRecord,
    lost: &Member,
    why: &str,
) -> Result<(), DbError> {
    let ms = current(state, job).await?;
    let reason = format!(
        "gang member rank {} (provider {}) lost: {why}",
        lost.rank,
        lost.provider.short()
    );
    let mut tx = state.db.begin().await?;
    set_state(
        &mut tx,
        &lost.offer_id,
        &[
            MemberState::Offered,
            MemberState::Reserved,
            MemberState::Started,
            MemberState::Stopping,
        ],
        MemberState::Released,
        Some(&reason),
    )
    .await?;
    tx.commit().await?;
    let others: Vec<&Member> = ms
        .iter()
        .filter(|m| m.offer_id != lost.offer_id && m.state.pending())
        .collect();
    let (open, started): (Vec<&Member>, Vec<&Member>) = others
        .into_iter()
        .partition(|m| matches!(m.state, MemberState::Offered | MemberState::Reserved));
    wind_down(state, &open, &started, &reason).await?;
    crate::service::requeue_or_fail(state, job, &format!("{reason}; stopped the others")).await
}

/// Decides a gang job from its attempt's members (inside `tx`) and, if the
/// verdict is `Done`, ends it: the job row takes the lead member's receipt
/// and the members' total cost, and what is left of the escrow is refunded.
/// Returns the verdict and whether this call ended the job; `Err` when the
/// refund failed (nothing should be committed then).
async fn conclude(
    tx: &mut Tx<'_>,
    pending: &mut crate::bank::Pending<'_>,
    job: &JobId,
    attempt: u32,
) -> Result<Result<(JobVerdict, bool), crate::bank::BankError>, DbError> {
    let ms = members_in_tx(tx, job, attempt).await?;
    let seen: Vec<Seen> = ms
        .iter()
        .map(|m| Seen {
            state: m.state,
            outcome: m.outcome,
            reason: m.reason.clone(),
        })
        .collect();
    let verdict = after_results(&seen);
    let JobVerdict::Done { outcome, reason } = &verdict else {
        return Ok(Ok((verdict, false)));
    };
    let total = ms
        .iter()
        .fold(0u64, |a, m| a.saturating_add(m.cost.unwrap_or_default().0));
    // The job row shows rank 0's receipt and outputs; every member's
    // receipt is in `gang_members` (GET /v1/jobs/{id} lists them).
    let lead = ms
        .iter()
        .find(|m| m.receipt.is_some() && m.manifest.is_some());
    let cols = lead.and_then(|l| match (&l.receipt, &l.manifest) {
        (Some(r), Some(mf)) => Some(ResultColumns {
            receipt: r,
            manifest: mf,
            cost: Credits(total),
        }),
        _ => None,
    });
    let ended = Db::transition(
        tx,
        job,
        &[JobState::Dispatched, JobState::Running],
        job_state(*outcome),
        Change {
            reason: reason.as_deref(),
            // The lead member's provider and offer, whose receipt the job
            // row carries (so `kiln job get` verifies it).
            provider: lead.map(|l| l.provider),
            offer_id: lead.map(|l| l.offer_id),
            result: cols,
            ..Default::default()
        },
    )
    .await?;
    if ended && let Err(e) = crate::service::try_refund(pending, tx, job).await {
        return Ok(Err(e));
    }
    Ok(Ok((verdict, ended)))
}

/// A member told to stop (cancelled, or another member failed) whose
/// provider then vanished will never deliver: it is released unpaid and
/// the job is decided without it, so the job ends and the rest of its
/// escrow comes back instead of staying `running` forever.
async fn stopping_member_lost(
    state: &AppState,
    job: &JobRecord,
    m: &Member,
    why: &str,
) -> Result<(), DbError> {
    let reason = format!(
        "gang member rank {} (provider {}) lost while stopping: {why}",
        m.rank,
        m.provider.short()
    );
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    set_state(
        &mut tx,
        &m.offer_id,
        &[MemberState::Stopping],
        MemberState::Released,
        Some(&reason),
    )
    .await?;
    let (verdict, ended) = match conclude(&mut tx, &mut pending, &job.id, job.attempts).await? {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(job = %job.id.short(), "closing the escrow failed: {e}");
            return Ok(());
        }
    };
    tx.commit().await?;
    pending.commit();
    tracing::warn!(job = %job.id.short(), "{reason}");
    if ended {
        crate::service::release_booking(state, &job.id);
        tracing::info!(job = %job.id.short(), "gang job ended: {verdict:?}");
        state.wake.notify_one();
    }
    Ok(())
}

/// Lease expiry for running gangs: a member whose provider is not live and
/// not connected is lost (see [`member_lost`], or [`stopping_member_lost`]
/// for one already told to stop).
pub async fn expire_leases(state: &AppState, live: &HashSet<ProviderId>) -> Result<(), DbError> {
    let lease = state.config.provider_lease.as_millis() as u64;
    for job in state.db.jobs_in(&[JobState::Running], 100_000).await? {
        if job.spec.resources.gang <= 1 {
            continue;
        }
        let stale = UnixMillis::now().0.saturating_sub(job.updated_at.0) > lease;
        if !stale {
            continue;
        }
        let why = format!(
            "provider stopped answering (lease of {}s expired)",
            state.config.provider_lease.as_secs()
        );
        for m in current(state, &job).await? {
            if !matches!(m.state, MemberState::Started | MemberState::Stopping)
                || live.contains(&m.provider)
                || state
                    .net
                    .is_connected(m.provider.peer_id())
                    .await
                    .unwrap_or(false)
            {
                continue;
            }
            // Out of the fleet now (see `service::expire_leases`).
            crate::live::lock(state).suspend(&m.provider);
            if m.state == MemberState::Stopping {
                stopping_member_lost(state, &job, &m, &why).await?;
                continue;
            }
            member_lost(state, &job, &m, &why).await?;
            break;
        }
    }
    Ok(())
}

/// Checks a member's signed statement: signature, sender = signer = the
/// member's provider, and the member belongs to the job it names.
async fn member_statement<M: kiln_protocol::SignedMessage>(
    state: &AppState,
    peer: ProviderId,
    signed: &Signed<M>,
    what: &str,
    ids: impl Fn(&M) -> (JobId, OfferId),
) -> Result<Result<(JobRecord, Member), NetResponse>, DbError> {
    let (job_id, offer_id, signer) = match crate::service::statement_ids(signed, what, ids) {
        Ok(x) => x,
        Err(r) => return Ok(Err(r)),
    };
    let (Some(job), Some(m)) = (
        state.db.job(&job_id).await?,
        member(state, &offer_id).await?,
    ) else {
        return Ok(Err(rejected(format!(
            "{what} for job {job_id}, offer {offer_id}: no such gang member"
        ))));
    };
    if m.job_id != job.id || signer != peer || m.provider != signer {
        return Ok(Err(rejected(format!(
            "{what} for job {} refused: not from the provider holding gang offer {}",
            job.id,
            offer_id.short()
        ))));
    }
    Ok(Ok((job, m)))
}

/// A member's node reports its part lost.
pub async fn job_lost(
    state: &AppState,
    peer: ProviderId,
    signed: &Signed<JobLost>,
) -> Result<NetResponse, DbError> {
    let (job, m) = match member_statement(state, peer, signed, "lost-job report", |l| {
        (l.job_id, l.offer_id)
    })
    .await?
    {
        Ok(x) => x,
        Err(r) => return Ok(r),
    };
    if m.attempt == job.attempts
        && matches!(job.state, JobState::Dispatched | JobState::Running)
        && m.state.pending()
    {
        member_lost(state, &job, &m, &signed.payload.reason).await?;
    }
    Ok(NetResponse::Accepted)
}

/// The most one member can cost: the job's escrow split evenly over its nodes.
fn per_node_max(job: &JobRecord) -> Credits {
    Credits(job.max_cost.0 / u64::from(job.spec.resources.gang.max(1)))
}

/// Pays one interval of one running member from the job's escrow.
pub async fn settle_usage(
    state: &AppState,
    peer: ProviderId,
    signed: &Signed<UsageReport>,
) -> Result<NetResponse, DbError> {
    let (job, m) = match member_statement(state, peer, signed, "usage report", |r| {
        (r.job_id, r.offer_id)
    })
    .await?
    {
        Ok(x) => x,
        Err(r) => return Ok(r),
    };
    if !matches!(m.state, MemberState::Started | MemberState::Stopping) {
        return Ok(rejected(format!(
            "usage report for gang member {} of job {} refused: it is {}, not running",
            m.rank,
            job.id,
            m.state.as_str()
        )));
    }
    let report = &signed.payload;
    let seen_ms = UnixMillis::now().0.saturating_sub(job.updated_at.0) + 2_000;
    let total = cost_for(m.price_per_hour, report.wall_ms.min(seen_ms))
        .unwrap_or(per_node_max(&job))
        .min(per_node_max(&job));
    pay_member(
        state,
        &job,
        &m,
        total,
        OpKey::new(format!(
            "interval:{}:{}:{}",
            job.id, m.offer_id, report.interval
        )),
    )
    .await
}

/// Pays `m` up to `total` (what it has earned so far, in all): the part
/// not yet paid, capped by what the escrow still holds.
async fn pay_member(
    state: &AppState,
    job: &JobRecord,
    m: &Member,
    total: Credits,
    key: OpKey,
) -> Result<NetResponse, DbError> {
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    // What it has been paid, read under the write lock.
    let paid = member_in_tx(&mut tx, &m.offer_id)
        .await?
        .map(|m| m.paid)
        .unwrap_or(m.paid);
    let due = Credits(total.0.saturating_sub(paid.0));
    let held = pending
        .ledger()
        .escrow(&job.id)
        .map(|e| e.held())
        .unwrap_or_default();
    let due = Credits(due.0.min(held.0));
    if due.0 == 0 {
        return Ok(NetResponse::Accepted);
    }
    let op = Op::SettleInterval {
        key,
        job: job.id,
        provider: m.provider,
        cost: due,
        fee_bps: state.bank.fee_bps,
    };
    match pending.apply(&mut tx, op).await {
        Ok(_) => {
            sqlx::query("UPDATE gang_members SET paid = paid + ? WHERE offer_id = ?")
                .bind(i(due.0))
                .bind(m.offer_id.to_string())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            pending.commit();
            Ok(NetResponse::Accepted)
        }
        Err(crate::bank::BankError::Contract(ContractError::EscrowExhausted { .. })) => {
            Ok(rejected(format!("escrow of job {} exhausted", job.id)))
        }
        Err(e) => Ok(rejected(format!(
            "settlement of gang member {} of job {} failed: {e}",
            m.rank, job.id
        ))),
    }
}

/// Verifies, stores and pays one member's result; ends the job when every
/// member has delivered, and stops the others when one failed.
pub async fn accept_result(
    state: &AppState,
    peer: ProviderId,
    job: JobRecord,
    result: JobResult,
) -> Result<NetResponse, DbError> {
    let offer = result.receipt.payload.offer_id;
    let Some(m) = member(state, &offer).await? else {
        return Ok(rejected(format!(
            "result for gang job {} names offer {offer}, which is not one of its members",
            job.id
        )));
    };
    if m.job_id != job.id {
        return Ok(rejected(format!(
            "result for job {} names offer {offer} of another job; refused",
            job.id
        )));
    }
    if m.state == MemberState::Delivered {
        if m.receipt.as_ref() == Some(&result.receipt) {
            return Ok(NetResponse::Accepted); // a retried delivery
        }
        return Ok(rejected(format!(
            "gang member {} of job {} already delivered; replayed receipt refused",
            m.rank, job.id
        )));
    }
    if !matches!(
        m.state,
        MemberState::Reserved | MemberState::Started | MemberState::Stopping
    ) {
        return Ok(rejected(format!(
            "gang member {} of job {} is {}, it was never started; receipt refused",
            m.rank,
            job.id,
            m.state.as_str()
        )));
    }
    let expected = Expected {
        job: job.id,
        offer: m.offer_id,
        provider: m.provider,
    };
    let needed = match verify::check_result(&result, &expected, peer, UnixMillis::now()) {
        Ok(n) => n,
        Err(e) => {
            return Ok(rejected(format!(
                "result of gang member {} of job {} refused: {e}",
                m.rank, job.id
            )));
        }
    };
    // As for any job: every blob it names is here and verified first.
    if let Err(e) =
        crate::service::store_result_blobs(state, &job.owner, &m.provider, &result, &needed).await
    {
        if matches!(e, verify::ReceiptError::NotHeld { .. }) {
            return Ok(rejected(format!(
                "result of gang member {} of job {} refused: {e}",
                m.rank, job.id
            )));
        }
        return Ok(NetResponse::Retry {
            reason: format!(
                "result of gang member {} of job {} not accepted yet: {e}",
                m.rank, job.id
            ),
        });
    }
    let receipt = &result.receipt.payload;
    let cost = cost_for(m.price_per_hour, receipt.usage.wall_ms)
        .unwrap_or(per_node_max(&job))
        .min(per_node_max(&job));

    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    if !Db::claim_nonce(
        &mut tx,
        &result.receipt.signer.to_string(),
        &result.receipt.nonce.to_string(),
        "result-receipt",
        result.receipt.expires_at,
    )
    .await?
    {
        return Ok(rejected(format!(
            "receipt for job {} was already used; replay refused",
            job.id
        )));
    }
    // Re-read under the write lock: another member's result (stopping this
    // one), an interval payment or a requeue may have changed things since.
    let Some(m) = member_in_tx(&mut tx, &m.offer_id).await? else {
        return Ok(rejected(format!("gang offer {offer} vanished")));
    };
    if !matches!(
        m.state,
        MemberState::Reserved | MemberState::Started | MemberState::Stopping
    ) {
        return Ok(rejected(format!(
            "gang member {} of job {} is {}; receipt refused",
            m.rank,
            job.id,
            m.state.as_str()
        )));
    }
    let Some((job_state_now, job_attempts)) = job_in_tx(&mut tx, &job.id).await? else {
        return Ok(rejected(format!("job {} vanished", job.id)));
    };
    // Pay the member for its own wall time (less what intervals paid).
    let held = pending
        .ledger()
        .escrow(&job.id)
        .map(|e| e.held())
        .unwrap_or_default();
    let due = Credits(cost.0.saturating_sub(m.paid.0).min(held.0));
    if due.0 > 0 {
        let op = Op::SettleInterval {
            key: OpKey::new(format!("gang-settle:{}:{}", job.id, m.offer_id)),
            job: job.id,
            provider: m.provider,
            cost: due,
            fee_bps: state.bank.fee_bps,
        };
        if let Err(e) = pending.apply(&mut tx, op).await {
            return Ok(rejected(format!(
                "settlement of gang member {} of job {} failed: {e}",
                m.rank, job.id
            )));
        }
    }
    let reason = receipt.error.clone().or_else(|| match receipt.outcome {
        Outcome::Failed => receipt.exit_code.map(|c| format!("exited with code {c}")),
        _ => None,
    });
    let r = sqlx::query(
        "UPDATE gang_members SET state = 'delivered', outcome = ?, reason = COALESCE(?, reason), cost = ?, \
         paid = paid + ?, receipt = ?, manifest_json = ?, updated_at = ? WHERE offer_id = ? AND state = ?",
    )
    .bind(outcome_str(receipt.outcome))
    .bind(reason.as_deref())
    .bind(i(cost.0))
    .bind(i(due.0))
    .bind(result.receipt.to_bytes().map_err(corrupt)?)
    .bind(serde_json::to_string(&result.manifest).map_err(corrupt)?)
    .bind(i(UnixMillis::now().0))
    .bind(m.offer_id.to_string())
    .bind(m.state.as_str())
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() != 1 {
        return Ok(NetResponse::Retry {
            reason: format!(
                "gang member {} of job {} changed state while its result was checked; resend",
                m.rank, job.id
            ),
        });
    }
    crate::service::grant_result_blobs(state, &mut tx, &job.owner, &job.id, &result).await?;
    // Only the current attempt decides the job; an earlier attempt's
    // stopped member is just paid.
    let mut verdict = JobVerdict::Wait;
    let mut ended = false;
    if m.attempt == job_attempts
        && matches!(job_state_now, JobState::Dispatched | JobState::Running)
    {
        match conclude(&mut tx, &mut pending, &job.id, job_attempts).await? {
            Ok((v, e)) => (verdict, ended) = (v, e),
            Err(e) => {
                return Ok(rejected(format!(
                    "closing the escrow of job {} failed: {e}",
                    job.id
                )));
            }
        }
    }
    tx.commit().await?;
    pending.commit();
    tracing::info!(job = %job.id.short(), rank = m.rank, provider = %m.provider.short(), cost = %cost, "gang member result accepted");
    if ended {
        crate::service::release_booking(state, &job.id);
        tracing::info!(job = %job.id.short(), "gang job ended: {verdict:?}");
        state.wake.notify_one();
    }
    if let JobVerdict::Stop { ranks, reason } = verdict {
        let ms: Vec<Member> = members(state, &job.id)
            .await?
            .into_iter()
            .filter(|m| m.attempt == job_attempts)
            .collect();
        let stop: Vec<&Member> = ms.iter().filter(|m| ranks.contains(&m.rank)).collect();
        wind_down(state, &[], &stop, &reason).await?;
    }
    Ok(NetResponse::Accepted)
}

/// The buyer cancels a dispatched or running gang: members not started are
/// released, started ones stopped (and paid for their time when their
/// receipts come). Returns whether the job ended at once (nothing had started).
pub async fn cancel(state: &AppState, job: &JobRecord) -> Result<bool, DbError> {
    let ms = current(state, job).await?;
    let reason = "cancelled by the buyer";
    let (open, started): (Vec<&Member>, Vec<&Member>) = ms
        .iter()
        .filter(|m| m.state.pending())
        .partition(|m| matches!(m.state, MemberState::Offered | MemberState::Reserved));
    let mut ended = false;
    if started.is_empty() && job.state == JobState::Dispatched {
        let mut tx = state.db.begin().await?;
        let mut pending = state.bank.begin().await;
        if Db::transition(
            &mut tx,
            &job.id,
            &[JobState::Dispatched],
            JobState::Cancelled,
            Change {
                reason: Some("cancelled by the buyer while its gang reserved"),
                ..Default::default()
            },
        )
        .await?
        {
            crate::service::refund(&mut pending, &mut tx, &job.id).await;
            tx.commit().await?;
            pending.commit();
            ended = true;
            crate::service::release_booking(state, &job.id);
        }
    }
    wind_down(state, &open, &started, reason).await?;
    Ok(ended)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kiln_protocol::Keypair;

    fn ids(n: usize) -> Vec<ProviderId> {
        (0..n)
            .map(|_| ProviderId::from_public_key(&Keypair::generate().public()))
            .collect()
    }

    #[test]
    fn reserve_starts_only_when_every_member_accepted() {
        use Reply::*;
        let cases: Vec<(Vec<Reply>, Option<&str>)> = vec![
            (vec![Accepted, Accepted], None),
            (vec![Accepted, Accepted, Accepted, Accepted], None),
            (
                vec![Accepted, Refused("all 2 slots busy".into())],
                Some("rank 1 (provider"),
            ),
            (
                vec![Unreachable("dial failed".into()), Accepted],
                Some("rank 0 (provider"),
            ),
            (
                vec![Refused("owner busy".into()), Unreachable("timeout".into())],
                Some("did not answer: timeout"),
            ),
            (vec![], Some("no members")),
        ];
        for (replies, want) in cases {
            let p = ids(replies.len());
            let v = after_reserve(&replies, &p);
            match (want, v) {
                (None, ReserveVerdict::StartAll) => {}
                (Some(w), ReserveVerdict::ReleaseAll { reason }) => {
                    assert!(reason.contains(w), "{replies:?}: {reason}");
                    if !replies.is_empty() {
                        assert!(reason.contains("nothing started"), "{reason}");
                    }
                }
                (w, v) => panic!("{replies:?}: wanted {w:?}, got {v:?}"),
            }
        }
    }

    #[test]
    fn a_failed_start_stops_every_member_that_may_have_started() {
        use Reply::*;
        let cases: Vec<(Vec<Reply>, Option<Vec<u32>>)> = vec![
            (vec![Accepted, Accepted], None),
            (vec![Accepted, Refused("released".into())], Some(vec![0])),
            // No answer: it may have started, so it is stopped too.
            (vec![Accepted, Unreachable("gone".into())], Some(vec![0, 1])),
            (vec![Refused("a".into()), Refused("b".into())], Some(vec![])),
        ];
        for (replies, want) in cases {
            let v = after_start(&replies, &ids(replies.len()));
            match (want, v) {
                (None, StartVerdict::Running) => {}
                (Some(w), StartVerdict::Abort { stop, reason }) => {
                    assert_eq!(stop, w, "{replies:?}");
                    assert!(reason.contains("at start"), "{reason}");
                }
                (w, v) => panic!("{replies:?}: wanted {w:?}, got {v:?}"),
            }
        }
    }

    fn seen(state: MemberState, outcome: Option<Outcome>) -> Seen {
        Seen {
            state,
            outcome,
            reason: outcome
                .filter(|o| *o != Outcome::Succeeded)
                .map(|o| format!("{o:?} here")),
        }
    }

    #[test]
    fn results_complete_fail_or_stop_the_gang() {
        use MemberState::*;
        use Outcome::*;
        let ok = seen(Delivered, Some(Succeeded));
        let failed = seen(Delivered, Some(Failed));
        let cancelled = seen(Delivered, Some(Cancelled));
        let timed_out = seen(Delivered, Some(TimedOut));
        let running = seen(Started, None);
        let stopping = seen(Stopping, None);
        let released = seen(Released, None);
        let cases: Vec<(&str, Vec<Seen>, JobVerdict)> = vec![
            (
                "all succeeded",
                vec![ok.clone(), ok.clone()],
                JobVerdict::Done {
                    outcome: Succeeded,
                    reason: None,
                },
            ),
            (
                "one still running",
                vec![ok.clone(), running.clone()],
                JobVerdict::Wait,
            ),
            (
                "reserved, not yet started",
                vec![ok.clone(), seen(Reserved, None)],
                JobVerdict::Wait,
            ),
            (
                "one failed, one running: stop it",
                vec![running.clone(), failed.clone()],
                JobVerdict::Stop {
                    ranks: vec![0],
                    reason: "gang member rank 1 failed: Failed here; stopping the others".into(),
                },
            ),
            (
                "one failed, the other stopping",
                vec![stopping.clone(), failed.clone()],
                JobVerdict::Wait,
            ),
            (
                "failed beats the cancellation it caused",
                vec![cancelled.clone(), failed.clone()],
                JobVerdict::Done {
                    outcome: Failed,
                    reason: Some("gang member rank 1: Failed here".into()),
                },
            ),
            (
                "timed out beats cancelled",
                vec![cancelled.clone(), timed_out.clone(), ok.clone()],
                JobVerdict::Done {
                    outcome: TimedOut,
                    reason: Some("gang member rank 1: TimedOut here".into()),
                },
            ),
            (
                "buyer cancelled all",
                vec![cancelled.clone(), cancelled.clone()],
                JobVerdict::Done {
                    outcome: Cancelled,
                    reason: Some("gang member rank 0: Cancelled here".into()),
                },
            ),
            (
                "a member released before it ran",
                vec![ok.clone(), released.clone()],
                JobVerdict::Done {
                    outcome: Cancelled,
                    reason: Some("gang member rank 1 was released before it ran".into()),
                },
            ),
        ];
        for (name, members, want) in cases {
            assert_eq!(after_results(&members), want, "{name}");
        }
    }

    #[test]
    fn member_states_round_trip() {
        for s in [
            MemberState::Offered,
            MemberState::Reserved,
            MemberState::Started,
            MemberState::Released,
            MemberState::Stopping,
            MemberState::Delivered,
        ] {
            assert_eq!(s.as_str().parse::<MemberState>().unwrap(), s);
        }
        assert!("running".parse::<MemberState>().is_err());
        for o in [
            Outcome::Succeeded,
            Outcome::Failed,
            Outcome::TimedOut,
            Outcome::Cancelled,
        ] {
            assert_eq!(outcome_from(outcome_str(o)), Some(o));
        }
    }
}
