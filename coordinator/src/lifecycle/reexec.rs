//! Verification by spot re-execution, driven: the audit draw when a job's
//! result is accepted, the verifiers' executions as more members of the
//! job, the comparison, and what the verdict pays, slashes and records.
//!
//! ```text
//! every member of an attempt delivered a successful result (running)
//!   ├─ draw misses ──────────────► paid, completed        (not_sampled)
//!   ├─ draw hits, too few others fit ► paid, completed   (unverified)
//!   └─ draw hits ─► verifying: held, unpaid; a verifier round (as many
//!        `verify` members as the job has ranks) is placed on providers
//!        picked at random among the eligible ones
//!          ├─ every rank agrees ──► all paid, completed   (verified)
//!          └─ a rank disagrees ─► a third round breaks the tie  (disputed)
//!               ├─ the original is right on every rank ► verified; the
//!               │     outvoted verifiers are not paid (slashed if theirs)
//!               ├─ the original is outvoted on a rank ► the buyer gets
//!               │     the round that is right (failed_verification)
//!               └─ a rank with three answers ► nobody paid or slashed,
//!                                    refunded (nondeterministic)
//! ```
//!
//! A job of one is a gang of one: a round is one execution, and each rank
//! of a gang is judged by majority as a job of one is (see
//! [`crate::verification::rounds`]). What differs is blame: a wrong
//! execution of a job of one is its provider's own and is slashed, while
//! in a gang spanning several providers a member may have been fed bad
//! data by a peer, so a wrong member is not paid and its verified record
//! starts again, but it is not slashed. Nothing in such a gang can be
//! slashed, so its audit draw counts no stake: with the default cost
//! fraction every gang result is re-executed (`p_econ = C/R = 1`).
//!
//! **Who pays.** Nobody is paid for a sampled job's executions until they
//! are judged (a gang's members are paid only once all of them delivered,
//! so no member learns the draw before its peers' results are in). Then
//! the executions on the winning side are paid from the job's escrow,
//! each for the time the coordinator observed it running at its own price
//! (the original round first); the rest of the escrow goes back to the
//! buyer. So a buyer pays for the re-execution of its own job when it is
//! sampled, which happens with the probability on its audit record: the
//! price of a provider's verified track record (a trusted, bonded provider
//! is sampled rarely) is visible to the buyer who picks it. A loser is not
//! paid for the judged result, and (a job of one) its bond is slashed:
//! half to the buyer, a quarter to the provider whose execution proved it
//! wrong, the rest burned (see [`VerificationConfig`]).
//!
//! **Window.** A sampled result waits at most `window + 2 × timeout` for
//! its re-executions. Then it is paid unverified if nobody disagreed, or
//! refunded if a dispute is still open: a provider can neither hold the
//! buyer's money forever by refusing to verify, nor be paid for a result
//! that was contradicted and never cleared. While any of its results (or
//! any verification it takes part in) is open, its bond cannot be
//! unstaked, so a slash always finds it.
//!
//! **Records.** Each accepted result gets an audit record: the
//! [`Decision`] (every input of the draw, the probabilities, the draw),
//! where the verification stands, and the verifiers, as JSON signed by the
//! coordinator's key under [`RECORD_DOMAIN`]. The buyer reads it in the
//! job's view; [`replay`] re-derives the decision from it. A gang's draw
//! is keyed on [`ReceiptHash::of_gang`] of its members' receipts (in the
//! job's view), its payment is the gang's, its trust the least trusted
//! member's.

use std::time::Duration;

use kiln_contracts::Op;
use kiln_protocol::views::VerificationStatus;
use kiln_protocol::{
    Credits, JobId, NetRequest, OfferId, Outcome, ProviderId, ResultReceipt, Signed, UnixMillis,
};
use serde::Serialize;

use super::{notify, send, settle, sign};
use crate::AppState;
use crate::bank::{BankError, Pending};
use crate::db::{Db, DbError, Tx};
use crate::jobs::keys::{self, PayPoint};
use crate::jobs::model::{Reply, ReserveVerdict, StartVerdict, after_reserve, after_start};
use crate::jobs::store::{MemberChange, ResultColumns};
use crate::jobs::verifications::AuditRow;
use crate::jobs::{Change, Expect, JobRecord, JobState, Member, MemberState, Role};
use crate::verification::compare::{self, Agreement, Execution};
use crate::verification::reputation::Event;
use crate::verification::rounds::{
    Final, MAX_ROUNDS, MAX_ROUNDS_EXACT, Mark, RankVotes, Tally, tally,
};
use crate::verification::{
    AuditInputs, AuditSecret, Decision, ReceiptHash, VerificationConfig, decide,
};

/// The domain an audit record is signed under.
pub const RECORD_DOMAIN: &str = "kiln/verification-record/v1";

/// One audit secret per day: derived one-way from the coordinator's key,
/// so revealing a past day's secret (to let anyone replay its draws)
/// reveals neither the key nor another day's secret.
pub fn secret(state: &AppState, epoch: u64) -> AuditSecret {
    AuditSecret::derive(&state.key.secret_bytes(), epoch)
}

/// The secret epoch of an instant (days since the Unix epoch).
pub const fn epoch_of(t: UnixMillis) -> u64 {
    t.0 / 86_400_000
}

/// Whether a stored record's decision replays, with the coordinator's
/// secret of its epoch, to exactly what was recorded.
pub fn replay(state: &AppState, row: &AuditRow) -> bool {
    row.decision.check() && row.decision.replay(&secret(state, row.epoch))
}

/// What the signature covers.
#[derive(Serialize)]
struct Record<'a> {
    job: JobId,
    attempt: u32,
    original: OfferId,
    provider: ProviderId,
    compare: kiln_protocol::Verify,
    epoch: u64,
    decision: &'a Decision,
    status: VerificationStatus,
    detail: &'a str,
    verifiers: &'a [ProviderId],
    opened_at: UnixMillis,
    closes_at: UnixMillis,
    decided_at: Option<UnixMillis>,
}

/// Writes `row`'s signed record (after any change to it).
fn seal(state: &AppState, job: &JobRecord, row: &mut AuditRow, verifiers: &[ProviderId]) {
    let rec = Record {
        job: row.job_id,
        attempt: row.attempt,
        original: row.offer_id,
        provider: row.provider,
        compare: job.spec.verify,
        epoch: row.epoch,
        decision: &row.decision,
        status: row.status,
        detail: &row.detail,
        verifiers,
        opened_at: row.opened_at,
        closes_at: row.closes_at,
        decided_at: row.decided_at,
    };
    // Serializing plain data to JSON cannot fail; an empty record would
    // simply not verify.
    row.record_json = serde_json::to_string(&rec).unwrap_or_default();
    row.signature = hex::encode(
        state
            .key
            .sign_record(RECORD_DOMAIN, row.record_json.as_bytes()),
    );
}

/// What [`sample_in`] decided for an accepted result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampled {
    /// Not a result that is verified (a failure, a cancelled job,
    /// verification off): settle as usual, no record.
    No,
    /// Recorded; settle now.
    Settle,
    /// Recorded; hold the result unpaid and re-execute it.
    Hold,
}

/// Whether member `m`'s pay waits until every member of its attempt has
/// delivered: with verification on, a gang is drawn for audit over all
/// its members' receipts at once, and a member paid at its own delivery
/// would learn from that (or from its peers' pay) before its peers'
/// results were in whether they could still be checked.
pub fn defers_pay(state: &AppState, job: &JobRecord, m: &Member) -> bool {
    state.config.verification.enabled && job.size() > 1 && m.role == Role::Run
}

/// The spec each member of a verifier round must fit (see
/// [`crate::sched::verifier_spec`]): one rank's, with the original lead's
/// GPU model from the live fleet.
fn verifier_spec(
    state: &AppState,
    job: &JobRecord,
    original: &ProviderId,
) -> kiln_protocol::JobSpec {
    let live = crate::live::lock(state);
    let model = live.fleet.index_of(original).and_then(|i| {
        live.fleet
            .view(i)
            .advert
            .gpus
            .first()
            .map(|g| g.name.clone())
    });
    let mut spec = crate::sched::verifier_spec(&job.spec, model.as_deref());
    spec.resources.gang = 1;
    spec
}

/// Providers that could take one rank of a re-execution of `job` now,
/// except `exclude`.
fn eligible(
    state: &AppState,
    job: &JobRecord,
    original: &ProviderId,
    exclude: &[ProviderId],
) -> Vec<ProviderId> {
    let spec = verifier_spec(state, job, original);
    crate::live::lock(state).fleet.eligible(&spec, exclude)
}

/// Inside the transaction that accepts member `m`'s result of a job of
/// one: takes and records the audit decision for it. `job_state` is the
/// job's state read in that transaction, `earned` what the result pays.
#[allow(clippy::too_many_arguments)]
pub async fn sample_in(
    state: &AppState,
    tx: &mut Tx<'_>,
    pending: &Pending<'_>,
    job: &JobRecord,
    job_state: JobState,
    m: &Member,
    receipt: &Signed<ResultReceipt>,
    earned: Credits,
) -> Result<Sampled, DbError> {
    if !state.config.verification.enabled
        || job.size() != 1
        || m.role != Role::Run
        || job_state != JobState::Running
        || receipt.payload.outcome != Outcome::Succeeded
    {
        return Ok(Sampled::No);
    }
    let inputs = AuditInputs {
        receipt_hash: receipt_hash(receipt)?,
        payment: earned,
        bond: pending.ledger().bond(&m.provider),
        trust: Db::trust_in(tx, &m.provider).await?,
    };
    record_decision(state, tx, job, m, &inputs).await
}

/// Inside the transaction that accepted the last result of a gang's
/// attempt: `members` are its run members by rank, each delivered. When
/// every one succeeded, takes and records the audit decision for the whole
/// gang: keyed on all their receipts, for the gang's whole payment, with
/// the least trusted member's record and no stake (a gang's members are
/// never slashed; see the module docs).
pub async fn sample_gang_in(
    state: &AppState,
    tx: &mut Tx<'_>,
    job: &JobRecord,
    job_state: JobState,
    members: &[Member],
) -> Result<Sampled, DbError> {
    let succeeded =
        |m: &Member| m.state == MemberState::Delivered && m.outcome == Some(Outcome::Succeeded);
    if !state.config.verification.enabled
        || members.len() < 2
        || job_state != JobState::Running
        || !members.iter().all(succeeded)
    {
        return Ok(Sampled::No);
    }
    let mut hashes = Vec::with_capacity(members.len());
    let mut payment = Credits(0);
    let mut trust = None;
    for m in members {
        let Some(r) = &m.receipt else {
            return Ok(Sampled::No);
        };
        hashes.push(receipt_hash(r)?);
        payment = Credits(payment.0.saturating_add(m.cost.unwrap_or_default().0));
        let t = Db::trust_in(tx, &m.provider).await?;
        trust = Some(trust.map_or(t, |least: crate::verification::TrustState| least.min(t)));
    }
    let inputs = AuditInputs {
        receipt_hash: ReceiptHash::of_gang(&hashes),
        payment,
        bond: Credits(0),
        trust: trust.unwrap_or_default(),
    };
    record_decision(state, tx, job, &members[0], &inputs).await
}

fn receipt_hash(r: &Signed<ResultReceipt>) -> Result<ReceiptHash, DbError> {
    ReceiptHash::of(r).map_err(|e| DbError::Corrupt {
        table: "members",
        reason: e.to_string(),
    })
}

/// Draws, and records the decision for the attempt whose lead member is
/// `lead`: held when drawn and enough other providers could re-run every
/// rank now.
async fn record_decision(
    state: &AppState,
    tx: &mut Tx<'_>,
    job: &JobRecord,
    lead: &Member,
    inputs: &AuditInputs,
) -> Result<Sampled, DbError> {
    let cfg: &VerificationConfig = &state.config.verification;
    let now = UnixMillis::now();
    let epoch = epoch_of(now);
    let decision = decide(inputs, &cfg.policy, &secret(state, epoch));
    let p = decision.p();
    let ranks = job.size() as usize;
    let (status, detail) = if !decision.audited {
        (
            VerificationStatus::NotSampled,
            format!("not sampled: the audit draw (p = {p}) did not select it"),
        )
    } else if eligible(
        state,
        job,
        &lead.provider,
        &job_providers(tx, job, lead.attempt).await?,
    )
    .len()
        < ranks
    {
        let who = if ranks == 1 {
            "no other provider that fits the job is".to_string()
        } else {
            format!("fewer than {ranks} other providers that fit a rank of the gang are")
        };
        (
            VerificationStatus::Unverified,
            format!("sampled (p = {p}), but {who} online to re-run it; paid unverified"),
        )
    } else {
        (
            VerificationStatus::Pending,
            format!("sampled (p = {p}): being re-executed on other providers before it is paid"),
        )
    };
    let window = cfg.window + Duration::from_millis(job.timeout_ms().saturating_mul(2));
    let mut row = AuditRow {
        job_id: job.id,
        attempt: lead.attempt,
        offer_id: lead.offer_id,
        provider: lead.provider,
        epoch,
        decision,
        status,
        detail,
        record_json: String::new(),
        signature: String::new(),
        opened_at: now,
        closes_at: UnixMillis(
            now.0
                .saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX)),
        ),
        decided_at: status.is_final().then_some(now),
    };
    seal(state, job, &mut row, &[]);
    Db::insert_audit(tx, &row).await?;
    tracing::info!(job = %job.id.short(), provider = %lead.provider.short(), ranks, p = %p, audited = decision.audited, "audit decision");
    Ok(if status == VerificationStatus::Pending {
        Sampled::Hold
    } else {
        Sampled::Settle
    })
}

/// Every provider that took part in `job`'s `attempt`.
async fn job_providers(
    tx: &mut Tx<'_>,
    job: &JobRecord,
    attempt: u32,
) -> Result<Vec<ProviderId>, DbError> {
    Ok(Db::attempt_members_in(tx, &job.id, attempt)
        .await?
        .iter()
        .map(|m| m.provider)
        .collect())
}

/// Inside the same transaction: the held job waits for its verifiers.
pub async fn hold_in(tx: &mut Tx<'_>, job: &JobId, attempt: u32) -> Result<bool, DbError> {
    Db::transition(
        tx,
        job,
        Expect::attempt(&[JobState::Running], attempt),
        JobState::Verifying,
        Change {
            reason: Some("result received; re-executing it on other providers to verify it before it is paid"),
            ..Default::default()
        },
    )
    .await
}

/// Moves `job`'s verification on, in a task of its own (after a held
/// result or a verifier's result committed).
pub fn kick(state: &AppState, job: JobId) {
    let s = state.clone();
    state.tasks.spawn(async move {
        if let Err(e) = advance(&s, &job).await {
            tracing::error!(job = %job.short(), "verification step failed: {e}");
        }
    });
}

/// Every open verification, once per scheduling round: places missing
/// verifiers, judges what delivered, closes windows.
///
/// The steps run in a task of their own, so comparing large outputs never
/// holds up the scheduling loop; a round whose previous steps are still
/// running skips its turn.
pub async fn tick(state: &AppState) -> Result<(), DbError> {
    let rows = state.db.open_audits().await?;
    if rows.is_empty() {
        return Ok(());
    }
    let s = state.clone();
    state.tasks.spawn(async move {
        let Ok(_one_at_a_time) = s.reexec.try_lock() else {
            return;
        };
        for row in rows {
            if let Err(e) = step(&s, &row.job_id).await {
                tracing::error!(job = %row.job_id.short(), "verification step failed: {e}");
            }
        }
    });
    Ok(())
}

/// Where one verification stands, from its members.
struct Standing {
    job: JobRecord,
    row: AuditRow,
    /// Ranks per round (the job's gang size).
    k: usize,
    /// Rounds whose every rank delivered, by relative rank: the original
    /// first, then the verifier rounds in the order they were placed.
    rounds: Vec<Vec<Member>>,
    /// Verifiers of a round that may still deliver.
    running: Vec<Member>,
    /// Verifiers still pending in a round that cannot complete (one of its
    /// members was released): stopped, and another round is placed.
    broken: Vec<Member>,
    /// Every provider that executed (or was asked to) in this attempt.
    involved: Vec<ProviderId>,
    /// The rank the next round starts at (a multiple of `k`).
    next_rank: u32,
}

impl Standing {
    fn original(&self) -> &[Member] {
        self.rounds.first().map_or(&[], Vec::as_slice)
    }

    fn lead(&self) -> Option<&Member> {
        self.original().first()
    }

    /// The providers of round `i`, for messages.
    fn providers(&self, i: usize) -> String {
        self.rounds.get(i).map_or_else(String::new, |r| {
            r.iter()
                .map(|m| m.provider.short())
                .collect::<Vec<_>>()
                .join(", ")
        })
    }
}

async fn standing(state: &AppState, job_id: &JobId) -> Result<Option<Standing>, DbError> {
    let (Some(job), Some(row)) = (state.db.job(job_id).await?, state.db.audit(job_id).await?)
    else {
        return Ok(None);
    };
    if job.state != JobState::Verifying || row.status.is_final() || job.attempts != row.attempt {
        return Ok(None);
    }
    let k = job.size().max(1) as usize;
    let mut members = state.db.attempt_members(job_id, row.attempt).await?;
    members.sort_by_key(|m| m.rank);
    let involved = members.iter().map(|m| m.provider).collect();
    let next_rank = members
        .iter()
        .map(|m| m.rank + 1)
        .max()
        .unwrap_or(0)
        .next_multiple_of(k as u32);
    let (original, verifiers): (Vec<Member>, Vec<Member>) =
        members.into_iter().partition(|m| m.role == Role::Run);
    if original.len() != k || original.iter().any(|m| m.state != MemberState::Delivered) {
        return Ok(None);
    }
    let mut rounds = vec![original];
    let (mut running, mut broken) = (Vec::new(), Vec::new());
    let mut by_round: std::collections::BTreeMap<u32, Vec<Member>> = Default::default();
    for m in verifiers {
        by_round.entry(m.rank / k as u32).or_default().push(m);
    }
    for (_, round) in by_round {
        let delivered = round.iter().all(|m| m.state == MemberState::Delivered);
        if round.len() == k && delivered {
            rounds.push(round);
        } else if round.iter().any(|m| m.state == MemberState::Released) {
            broken.extend(round.into_iter().filter(|m| m.state.pending()));
        } else {
            running.extend(round.into_iter().filter(|m| m.state.pending()));
        }
    }
    Ok(Some(Standing {
        job,
        row,
        k,
        rounds,
        running,
        broken,
        involved,
        next_rank,
    }))
}

/// One step of `job`'s verification (serialized per coordinator, so two
/// steps never place two verifier rounds at once).
pub async fn advance(state: &AppState, job_id: &JobId) -> Result<(), DbError> {
    let _one_at_a_time = state.reexec.lock().await;
    step(state, job_id).await
}

/// [`advance`], with the lock held.
async fn step(state: &AppState, job_id: &JobId) -> Result<(), DbError> {
    let Some(s) = standing(state, job_id).await? else {
        return Ok(());
    };
    let now = UnixMillis::now();
    if now > s.row.closes_at {
        return close_window(state, s).await;
    }
    if !s.broken.is_empty() {
        let (open, started): (Vec<Member>, Vec<Member>) = s
            .broken
            .iter()
            .cloned()
            .partition(|m| matches!(m.state, MemberState::Offered | MemberState::Reserved));
        super::wind_down(
            state,
            s.k > 1,
            &open,
            &started,
            "another member of this verifier round was released",
        )
        .await?;
    }
    if !s.running.is_empty() {
        return Ok(()); // a verifier round is at work
    }
    match judge(state, &s).await {
        Ok(Tally::NeedsRound) => place_round(state, &s).await,
        Ok(Tally::Final(f)) => {
            let plan = settlement(&s, &f);
            apply(state, &s, &plan, &[]).await
        }
        Err(e) => {
            tracing::warn!(job = %s.job.id.short(), "comparing executions failed: {e}; retried next round");
            Ok(())
        }
    }
}

fn execution(m: &Member) -> Option<Execution<'_>> {
    let (r, manifest) = (m.receipt.as_ref()?, m.manifest.as_ref()?);
    Some(Execution {
        outcome: r.payload.outcome,
        exit_code: r.payload.exit_code,
        output_cid: r.payload.output_cid,
        manifest,
        stdout_cid: r.payload.stdout_cid,
    })
}

/// Compares two delivered members under the job's comparator. An error
/// (a blob this coordinator cannot read) is not a verdict about anyone:
/// the step is retried next round, until the window closes.
async fn agree(state: &AppState, job: &JobRecord, a: &Member, b: &Member) -> Result<bool, String> {
    let (a, b, verify, store) = (a.clone(), b.clone(), job.spec.verify, state.blobs.clone());
    tokio::task::spawn_blocking(move || {
        let (Some(ea), Some(eb)) = (execution(&a), execution(&b)) else {
            return Err("an execution has no recorded result".to_string());
        };
        let mut read = |cid: &kiln_protocol::ContentId| -> Result<Vec<u8>, String> {
            store
                .get(cid)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{cid} is not in the coordinator's store"))
        };
        compare::compare(&verify, &ea, &eb, &mut read)
            .map(|a| a == Agreement::Same)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("comparison task failed: {e}"))?
}

/// Compares the delivered rounds rank by rank (every pair: a handful) and
/// tallies them.
async fn judge(state: &AppState, s: &Standing) -> Result<Tally, String> {
    let n = s.rounds.len();
    if n < 2 {
        return Ok(Tally::NeedsRound);
    }
    let mut ranks = Vec::with_capacity(s.k);
    for r in 0..s.k {
        let mut votes = RankVotes::new(n);
        for i in 0..n {
            for j in i + 1..n {
                votes.set(
                    i,
                    j,
                    agree(state, &s.job, &s.rounds[j][r], &s.rounds[i][r]).await?,
                );
            }
        }
        ranks.push(votes);
    }
    let shared: Vec<bool> = s
        .rounds
        .iter()
        .map(|round| round.iter().any(|m| m.provider != round[0].provider))
        .collect();
    let cap = if s.job.spec.verify.compare == kiln_protocol::Compare::Exact {
        MAX_ROUNDS_EXACT
    } else {
        MAX_ROUNDS
    };
    Ok(tally(&ranks, n, cap, &shared))
}

/// Picks `k` distinct providers at random among `candidates`.
fn pick(mut candidates: Vec<ProviderId>, k: usize) -> Option<Vec<ProviderId>> {
    if candidates.len() < k {
        return None;
    }
    let mut picked = Vec::with_capacity(k);
    for _ in 0..k {
        let r = u64::from_le_bytes(kiln_protocol::ids::random_bytes::<8>());
        let i = (r % candidates.len() as u64) as usize;
        picked.push(candidates.swap_remove(i));
    }
    Some(picked)
}

/// Places the next verifier round (one member per rank) on providers
/// picked at random among the eligible ones that have not executed this
/// job yet, and offers it the job. Too few eligible: it waits for the
/// next round (or the window).
async fn place_round(state: &AppState, s: &Standing) -> Result<(), DbError> {
    let Some(lead) = s.lead() else {
        return Ok(());
    };
    let spec = verifier_spec(state, &s.job, &lead.provider);
    let placed = {
        let mut live = crate::live::lock(state);
        let candidates = live.fleet.eligible(&spec, &s.involved);
        pick(candidates, s.k).and_then(|ids| {
            let mut placements = Vec::with_capacity(ids.len());
            let mut addrs = Vec::with_capacity(ids.len());
            for id in &ids {
                let Some(p) = live.fleet.book(id, &spec) else {
                    for p in &placements {
                        live.fleet.release(p);
                    }
                    return None;
                };
                placements.push(p);
                addrs.push(
                    live.fleet
                        .index_of(id)
                        .map(|i| live.fleet.view(i).advert.listen_addrs.clone())
                        .unwrap_or_default(),
                );
            }
            live.book(s.job.id, s.row.attempt, &placements);
            Some((placements, addrs))
        })
    };
    let Some((placements, addrs)) = placed else {
        return Ok(());
    };
    let round: Vec<Member> = placements
        .iter()
        .zip(addrs)
        .enumerate()
        .map(|(i, (p, addrs))| {
            Member::offered(
                s.job.id,
                s.row.attempt,
                s.next_rank + i as u32,
                p,
                addrs,
                Role::Verify,
            )
        })
        .collect();
    let tie = s.rounds.len() > 1;
    let mut tx = state.db.begin().await?;
    if Db::job_state_in(&mut tx, &s.job.id).await? != Some((JobState::Verifying, s.row.attempt)) {
        return Ok(());
    }
    for m in &round {
        Db::insert_member(&mut tx, m).await?;
    }
    let who = round
        .iter()
        .map(|m| m.provider.short())
        .collect::<Vec<_>>()
        .join(", ");
    if tie {
        let mut row = s.row.clone();
        row.status = VerificationStatus::Disputed;
        let nth = ordinal(s.rounds.len() + 1);
        row.detail = if s.k == 1 {
            format!(
                "disputed: the re-execution on provider {} disagreed ({}); a {nth} execution on provider {who} decides",
                s.providers(1),
                first_difference(s),
            )
        } else {
            format!(
                "disputed: the re-execution of the gang on providers {} disagreed ({}); a {nth} round on providers {who} decides",
                s.providers(1),
                first_difference(s),
            )
        };
        let verifiers: Vec<ProviderId> = s.rounds[1..]
            .iter()
            .flatten()
            .chain(&round)
            .map(|m| m.provider)
            .collect();
        seal(state, &s.job, &mut row, &verifiers);
        Db::update_audit(&mut tx, &row, s.row.status).await?;
    }
    tx.commit().await?;
    tracing::info!(job = %s.job.id.short(), verifiers = %who, tie, "re-executing to verify");
    // The offers go out in a task of their own: a verifier that does not
    // answer must not hold up the other verifications. The members are
    // recorded (offered), so no second round is placed meanwhile.
    let (st, job, base) = (state.clone(), s.job.clone(), s.next_rank);
    state.tasks.spawn(async move {
        let work = async {
            if let [m] = round.as_slice() {
                offer(&st, &job, m.clone()).await
            } else {
                offer_round(&st, &job, &round, base).await
            }
        };
        tokio::select! {
            r = work => if let Err(e) = r {
                tracing::error!(job = %job.id.short(), "offering the re-execution failed: {e}");
            },
            // At shutdown the members stay offered; the audit window
            // settles the job if nobody answers after the restart.
            () = st.stopping.cancelled() => {}
        }
    });
    Ok(())
}

fn ordinal(n: usize) -> &'static str {
    match n {
        2 => "second",
        3 => "third",
        4 => "fourth",
        _ => "further",
    }
}

/// The first difference that opened the dispute, for the record
/// (recomputed cheaply from what is stored: the comparator's words are not
/// kept).
fn first_difference(s: &Standing) -> String {
    let (Some(o), Some(v)) = (s.rounds.first(), s.rounds.get(1)) else {
        return "different outputs".into();
    };
    let differ: Vec<(u32, &Member, &Member)> = o
        .iter()
        .zip(v)
        .enumerate()
        .filter(|(_, (a, b))| {
            a.receipt.as_ref().map(|r| r.payload.output_cid)
                != b.receipt.as_ref().map(|r| r.payload.output_cid)
        })
        .map(|(r, (a, b))| (r as u32, a, b))
        .collect();
    match differ.first() {
        Some((rank, a, b)) => {
            let cid = |m: &Member| {
                m.receipt
                    .as_ref()
                    .map_or_else(|| "none".into(), |r| r.payload.output_cid.to_string())
            };
            if s.k == 1 {
                format!("outputs {} vs {}", cid(a), cid(b))
            } else {
                format!("rank {rank}: outputs {} vs {}", cid(a), cid(b))
            }
        }
        None => "outputs differ beyond the comparator's tolerance".into(),
    }
}

/// Offers the job to verifier `m`; accepted: it is started (its pay clock
/// runs); refused or unreachable: released, and its provider not offered
/// work until it registers again.
async fn offer(state: &AppState, job: &JobRecord, m: Member) -> Result<(), DbError> {
    let offer = super::place::offer_for(state, job, &m).await;
    let reply = match sign(state, offer) {
        Some(s) => send(state, &m, NetRequest::Offer(s), 3).await,
        None => Reply::Refused("the coordinator could not sign the offer".into()),
    };
    let mut tx = state.db.begin().await?;
    let still = Db::job_state_in(&mut tx, &job.id).await? == Some((JobState::Verifying, m.attempt));
    match reply {
        Reply::Accepted if still => {
            Db::set_member(
                &mut tx,
                &m.offer_id,
                &[MemberState::Offered],
                MemberState::Started,
                MemberChange {
                    started_at: Some(UnixMillis::now()),
                    ..Default::default()
                },
            )
            .await?;
            tx.commit().await?;
        }
        Reply::Accepted => {
            let why = "the verification ended while the offer was in flight";
            Db::set_member(
                &mut tx,
                &m.offer_id,
                &[MemberState::Offered],
                MemberState::Released,
                MemberChange {
                    reason: Some(why),
                    ..Default::default()
                },
            )
            .await?;
            tx.commit().await?;
            notify(state, Vec::new(), vec![m], why);
        }
        Reply::Refused(why) | Reply::Unreachable(why) => {
            let reason = format!(
                "verifier {} did not take the job: {why}",
                m.provider.short()
            );
            Db::set_member(
                &mut tx,
                &m.offer_id,
                &[MemberState::Offered],
                MemberState::Released,
                MemberChange {
                    reason: Some(&reason),
                    ..Default::default()
                },
            )
            .await?;
            tx.commit().await?;
            crate::live::lock(state).suspend(&m.provider);
            tracing::warn!(job = %job.id.short(), "{reason}");
            state.wake.notify_one();
        }
    }
    Ok(())
}

/// Offers a verifier round of a gang, all or nothing as a gang's own
/// dispatch is (see [`super::place`]): every member reserves (ranks and
/// roster relative to the round, so each rank runs with what its original
/// rank saw), then all start. Any refusal or silence releases (or stops)
/// the whole round; the next step places another.
async fn offer_round(
    state: &AppState,
    job: &JobRecord,
    round: &[Member],
    base: u32,
) -> Result<(), DbError> {
    let size = round.len() as u32;
    let replies = super::place::offer_gang(state, job, round, base).await;
    let still = |s: Option<(JobState, u32)>| s == Some((JobState::Verifying, job.attempts));
    let mut tx = state.db.begin().await?;
    for (m, r) in round.iter().zip(&replies) {
        if *r == Reply::Accepted {
            Db::set_member(
                &mut tx,
                &m.offer_id,
                &[MemberState::Offered],
                MemberState::Reserved,
                MemberChange::default(),
            )
            .await?;
        }
    }
    let live = still(Db::job_state_in(&mut tx, &job.id).await?);
    tx.commit().await?;
    let providers: Vec<ProviderId> = round.iter().map(|m| m.provider).collect();
    let reason = match (live, after_reserve(&replies, &providers)) {
        (false, _) => "the verification ended while its round reserved".to_string(),
        (true, ReserveVerdict::ReleaseAll { reason }) => reason,
        (true, ReserveVerdict::StartAll) => {
            let replies = super::place::start_gang(state, job, round).await;
            let mut tx = state.db.begin().await?;
            let live = still(Db::job_state_in(&mut tx, &job.id).await?);
            let now = UnixMillis::now();
            for (m, r) in round.iter().zip(&replies) {
                if *r == Reply::Accepted && live {
                    Db::set_member(
                        &mut tx,
                        &m.offer_id,
                        &[MemberState::Reserved],
                        MemberState::Started,
                        MemberChange {
                            started_at: Some(now),
                            ..Default::default()
                        },
                    )
                    .await?;
                }
            }
            tx.commit().await?;
            match (live, after_start(&replies, &providers)) {
                (true, StartVerdict::Running) => {
                    tracing::info!(job = %job.id.short(), "all {size} verifiers of the round started");
                    return Ok(());
                }
                (true, StartVerdict::Abort { reason, .. }) => reason,
                (false, _) => "the verification ended while its round started".to_string(),
            }
        }
    };
    {
        let mut live = crate::live::lock(state);
        for (m, r) in round.iter().zip(&replies) {
            if *r != Reply::Accepted {
                live.suspend(&m.provider);
            }
        }
    }
    tracing::warn!(job = %job.id.short(), "verifier round: {reason}");
    let (open, started): (Vec<Member>, Vec<Member>) = round.iter().cloned().partition(|m| {
        m.state == MemberState::Offered
            && replies.get((m.rank - base) as usize) != Some(&Reply::Accepted)
    });
    super::wind_down(state, true, &open, &started, &reason).await?;
    state.wake.notify_one();
    Ok(())
}

/// Who is paid, who is slashed (and who proved it), what the job ends as.
struct Settlement<'a> {
    paid: Vec<&'a Member>,
    /// Each slashed member and a member whose execution proved it wrong.
    slashed: Vec<(&'a Member, &'a Member)>,
    /// The result the buyer gets (`None`: refunded, the job fails).
    result: Option<&'a Member>,
    status: VerificationStatus,
    detail: String,
    /// What the verdict says about each execution.
    marks: Vec<(&'a Member, Mark)>,
}

/// Turns a final tally into payments, slashes, records and words.
fn settlement<'a>(s: &'a Standing, f: &Final) -> Settlement<'a> {
    let compare = s.job.spec.verify.compare.as_str();
    let mut marks = Vec::new();
    for (round, row) in s.rounds.iter().zip(&f.marks) {
        for (m, mark) in round.iter().zip(row) {
            marks.push((m, *mark));
        }
    }
    let Some(result_round) = f.result_round else {
        return Settlement {
            paid: Vec::new(),
            slashed: Vec::new(),
            result: None,
            status: VerificationStatus::Nondeterministic,
            detail: format!(
                "nondeterministic: {} executions gave no result that two of them share under `{compare}` ({}); nobody was slashed or paid for them, and the escrow was refunded",
                s.rounds.len(),
                first_difference(s)
            ),
            marks,
        };
    };
    let paid: Vec<&Member> = marks
        .iter()
        .filter(|(_, mark)| *mark == Mark::Right)
        .map(|(m, _)| *m)
        .collect();
    // A slashed execution's proof: a right one of the same rank from a
    // later round (the one that contradicted it).
    let slashed: Vec<(&Member, &Member)> = marks
        .iter()
        .filter(|(_, mark)| *mark == Mark::Wrong)
        .filter_map(|(loser, _)| {
            let rank = loser.rank as usize % s.k;
            let mine = s
                .rounds
                .iter()
                .position(|r| r.iter().any(|x| x.offer_id == loser.offer_id));
            s.rounds
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(i, _)| Some(*i) != mine)
                .find_map(|(i, r)| (f.marks[i][rank] == Mark::Right).then_some(&r[rank]))
                .map(|proof| (*loser, proof))
        })
        .collect();
    let result = s.rounds[result_round].first();
    // Verifiers' providers by what the verdict says of them.
    let verifiers = |right: bool| -> String {
        let mut names: Vec<String> = marks
            .iter()
            .filter(|(m, mark)| m.role == Role::Verify && (*mark == Mark::Right) == right)
            .map(|(m, _)| m.provider.short())
            .collect();
        names.dedup();
        names.join(", ")
    };
    const NO_GANG_SLASH: &str =
        "a gang's members are not slashed: one may have been fed bad data by a peer";
    let diff = first_difference(s);
    let n = s.rounds.len();
    let (status, detail) = match (f.original_right(), n, s.k) {
        (true, 2, 1) => (
            VerificationStatus::Verified,
            format!(
                "verified by re-execution on provider {} (compare {compare})",
                s.providers(1)
            ),
        ),
        (true, 2, k) => (
            VerificationStatus::Verified,
            format!(
                "verified by re-executing all {k} ranks on providers {} (compare {compare})",
                s.providers(1)
            ),
        ),
        (true, _, k) => (
            VerificationStatus::Verified,
            format!(
                "verified after a dispute ({diff}): {n} executions; those on providers {} agree with the result, those on providers {} do not and were {}",
                verifiers(true),
                verifiers(false),
                if k == 1 {
                    "slashed and not paid".to_string()
                } else {
                    format!("not paid ({NO_GANG_SLASH})")
                },
            ),
        ),
        (false, _, 1) => {
            let o = &s.rounds[0][0];
            (
                VerificationStatus::FailedVerification,
                format!(
                    "failed verification: re-executions on providers {} agree with each other, not with provider {}'s result ({diff}); provider {} was slashed and not paid, and the output is provider {}'s",
                    verifiers(true),
                    o.provider.short(),
                    o.provider.short(),
                    result.map(|m| m.provider.short()).unwrap_or_default()
                ),
            )
        }
        (false, _, _) => {
            let wrong: Vec<String> = f.marks[0]
                .iter()
                .enumerate()
                .filter(|(_, m)| **m != Mark::Right)
                .map(|(rank, _)| {
                    format!(
                        "rank {rank} (provider {})",
                        s.rounds[0][rank].provider.short()
                    )
                })
                .collect();
            (
                VerificationStatus::FailedVerification,
                format!(
                    "failed verification: re-executions of the gang on providers {} outvote the original on {} ({diff}); those members were not paid and start their verified record again ({NO_GANG_SLASH}), and the output is the round on providers {}",
                    verifiers(true),
                    wrong.join(", "),
                    s.providers(result_round)
                ),
            )
        }
    };
    Settlement {
        paid,
        slashed,
        result,
        status,
        detail,
        marks,
    }
}
/// Applies a settlement in one transaction: the members in `stop` (still
/// running when the window closed) released, payments, slash, trust and
/// reputation, the job's end, the escrow's close, the record; then the
/// stopped members' nodes are told.
async fn apply(
    state: &AppState,
    s: &Standing,
    plan: &Settlement<'_>,
    stop: &[Member],
) -> Result<(), DbError> {
    const CLOSED: &str = "the audit window closed";
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    for m in stop {
        Db::set_member(
            &mut tx,
            &m.offer_id,
            &[m.state],
            MemberState::Released,
            MemberChange {
                reason: Some(CLOSED),
                ..Default::default()
            },
        )
        .await?;
    }
    match settle_in(state, &mut tx, &mut pending, s, plan).await {
        Ok(true) => {}
        Ok(false) => return Ok(()),
        Err(e) => {
            tracing::error!(job = %s.job.id.short(), "settling the verification failed: {e}; retried next round");
            return Ok(());
        }
    }
    tx.commit().await?;
    pending.commit();
    settle::finished(state, &s.job.id);
    notify(state, Vec::new(), stop.to_vec(), CLOSED);
    tracing::info!(job = %s.job.id.short(), status = %plan.status, "{}", plan.detail);
    Ok(())
}

async fn settle_in(
    state: &AppState,
    tx: &mut Tx<'_>,
    pending: &mut Pending<'_>,
    s: &Standing,
    plan: &Settlement<'_>,
) -> Result<bool, BankError> {
    let cfg = &state.config.verification;
    if Db::job_state_in(tx, &s.job.id).await? != Some((JobState::Verifying, s.row.attempt)) {
        return Ok(false);
    }
    for m in &plan.paid {
        settle::pay_member(
            tx,
            pending,
            state.bank.fee_bps,
            &s.job.id,
            &m.offer_id,
            m.provider,
            m.cost.unwrap_or_default(),
            keys::pay(&m.offer_id, PayPoint::Result),
        )
        .await?;
    }
    let mut detail = plan.detail.clone();
    for (loser, proof) in &plan.slashed {
        let bond = pending.ledger().bond(&loser.provider);
        let amount = cfg
            .policy
            .max_slash
            .map_or(bond, |cap| Credits(bond.0.min(cap.0)));
        if amount.0 > 0 {
            pending
                .apply(
                    tx,
                    Op::Slash {
                        key: keys::slash(&loser.offer_id),
                        provider: loser.provider,
                        job: s.job.id,
                        amount,
                        buyer_share_bps: cfg.buyer_share_bps,
                        verifier: Some(proof.provider),
                        verifier_share_bps: cfg.verifier_share_bps,
                    },
                )
                .await?;
            detail.push_str(&format!(" (slashed {amount} of its bond)"));
        } else {
            detail.push_str(" (it had no bond to slash)");
        }
    }
    for (m, mark) in &plan.marks {
        let trust = Db::trust_in(tx, &m.provider).await?;
        Db::set_trust(tx, &m.provider, trust.after(mark.outcome())).await?;
        // Reputation moves only on evidence about the provider itself: an
        // unattributed error in a gang says nothing about which member.
        let event = match mark {
            Mark::Right => Some(Event::AuditPassed),
            Mark::Wrong => Some(Event::AuditFailed),
            Mark::Unattributed | Mark::Unjudged => None,
        };
        if let Some(e) = event {
            Db::reputation_event(tx, &m.provider, e).await?;
        }
    }
    let cols = plan.result.and_then(|w| match (&w.receipt, &w.manifest) {
        (Some(r), Some(mf)) => Some(ResultColumns {
            receipt: r,
            manifest: mf,
        }),
        _ => None,
    });
    let cost = Db::paid_in(tx, &s.job.id).await?;
    let to = if plan.result.is_some() {
        JobState::Completed
    } else {
        JobState::Failed
    };
    if !Db::transition(
        tx,
        &s.job.id,
        Expect::attempt(&[JobState::Verifying], s.row.attempt),
        to,
        Change {
            reason: Some(&detail),
            provider: plan.result.map(|w| w.provider),
            offer_id: plan.result.map(|w| w.offer_id),
            result: cols,
            cost: Some(cost),
            ..Default::default()
        },
    )
    .await?
    {
        return Ok(false);
    }
    settle::close(tx, pending, &s.job.id).await?;
    let mut row = s.row.clone();
    let from = row.status;
    row.status = plan.status;
    row.detail = detail;
    row.decided_at = Some(UnixMillis::now());
    let verifiers: Vec<ProviderId> = s.rounds[1..].iter().flatten().map(|m| m.provider).collect();
    seal(state, &s.job, &mut row, &verifiers);
    Db::update_audit(tx, &row, from).await?;
    Ok(true)
}

/// The window closed: settle with what is known. Verifiers still running
/// are stopped (and paid for what they reported).
async fn close_window(state: &AppState, s: Standing) -> Result<(), DbError> {
    let disputed = s.rounds.len() > 1;
    let (paid, result, detail) = if disputed {
        (
            Vec::new(),
            None,
            format!(
                "disputed and unresolved: the re-execution on provider(s) {} disagreed and no execution that decides it finished within the audit window; nobody was slashed or paid for it, and the escrow was refunded",
                s.providers(1)
            ),
        )
    } else {
        (
            s.original().iter().collect(),
            s.lead(),
            "sampled, but no re-execution finished within the audit window; paid unverified"
                .to_string(),
        )
    };
    let plan = Settlement {
        paid,
        slashed: Vec::new(),
        result,
        status: VerificationStatus::Unverified,
        detail,
        marks: Vec::new(),
    };
    let stop: Vec<Member> = s.running.iter().chain(&s.broken).cloned().collect();
    apply(state, &s, &plan, &stop).await
}
