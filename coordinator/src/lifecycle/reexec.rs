//! Verification by spot re-execution, driven: the audit draw when a result
//! is accepted, the verifier's execution as one more member of the job, the
//! comparison, and what the verdict pays, slashes and records.
//!
//! ```text
//! result of a job of one accepted (running)
//!   ├─ draw misses ──────────────► paid, completed        (not_sampled)
//!   ├─ draw hits, nobody else fits ► paid, completed      (unverified)
//!   └─ draw hits ─► verifying: held, unpaid; a `verify` member is placed on
//!        a provider picked at random among the eligible ones
//!          ├─ agrees ─────────────► both paid, completed  (verified)
//!          └─ disagrees ─► a second verifier breaks the tie  (disputed)
//!               ├─ sides with the original ► verifier slashed   (verified)
//!               ├─ sides with the verifier ► original slashed, the buyer
//!               │                            gets the verifier's output
//!               │                            (failed_verification)
//!               └─ three answers ──► nobody paid or slashed, refunded
//!                                    (nondeterministic)
//! ```
//!
//! **Who pays.** Nobody is paid for a sampled job's executions until they
//! are judged. Then the executions on the winning side are paid from the
//! job's escrow, each for the time the coordinator observed it running at
//! its own price (the original first); the rest of the escrow goes back to
//! the buyer. So a buyer pays for the re-execution of its own job when it
//! is sampled, which happens with the probability on its audit record: the
//! price of a provider's verified track record (a trusted, bonded provider
//! is sampled rarely) is visible to the buyer who picks it. A loser is not
//! paid for the judged result, and its bond is slashed: half to the buyer,
//! a quarter to the provider whose execution proved it wrong, the rest
//! burned (see [`VerificationConfig`]).
//!
//! **Window.** A sampled result waits at most `window + 2 × timeout` for
//! its re-executions. Then it is paid unverified if nobody disagreed, or
//! refunded if a dispute is still open: a provider can neither hold the
//! buyer's money forever by refusing to verify, nor be paid for a result
//! that was contradicted and never cleared. While any of its results (or
//! any verification it takes part in) is open, its bond cannot be
//! unstaked, so a slash always finds it.
//!
//! **Records.** Each accepted result of a job of one gets an audit record:
//! the [`Decision`] (every input of the draw, the probabilities, the draw),
//! where the verification stands, and the verifiers, as JSON signed by the
//! coordinator's key under [`RECORD_DOMAIN`]. The buyer reads it in the
//! job's view; [`replay`] re-derives the decision from it.
//!
//! Gang jobs (`gang > 1`) are not sampled yet: re-running a gang needs a
//! second gang of the same shape.

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
use crate::jobs::model::Reply;
use crate::jobs::store::{MemberChange, ResultColumns};
use crate::jobs::verifications::AuditRow;
use crate::jobs::{Change, Expect, JobRecord, JobState, Member, MemberState, Role};
use crate::verification::compare::{self, Agreement, Execution};
use crate::verification::reputation::Event;
use crate::verification::{
    AuditInputs, AuditOutcome, AuditSecret, Decision, ReceiptHash, Verdict, VerificationConfig,
    decide,
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
    /// Not a result that is verified (a gang, a failure, a cancelled job,
    /// verification off): settle as usual, no record.
    No,
    /// Recorded; settle now.
    Settle,
    /// Recorded; hold the result unpaid and re-execute it.
    Hold,
}

/// The spec a verifier must fit (see [`crate::sched::verifier_spec`]),
/// with the original's GPU model from the live fleet.
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
    crate::sched::verifier_spec(&job.spec, model.as_deref())
}

/// Providers that could re-execute `job` now, except `exclude`.
fn eligible(
    state: &AppState,
    job: &JobRecord,
    original: &ProviderId,
    exclude: &[ProviderId],
) -> Vec<ProviderId> {
    let spec = verifier_spec(state, job, original);
    crate::live::lock(state).fleet.eligible(&spec, exclude)
}

/// Inside the transaction that accepts member `m`'s result: takes and
/// records the audit decision for it. `job_state` is the job's state read
/// in that transaction, `earned` what the result pays.
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
    let cfg: &VerificationConfig = &state.config.verification;
    if !cfg.enabled
        || job.size() != 1
        || m.role != Role::Run
        || job_state != JobState::Running
        || receipt.payload.outcome != Outcome::Succeeded
    {
        return Ok(Sampled::No);
    }
    let now = UnixMillis::now();
    let epoch = epoch_of(now);
    let receipt_hash = ReceiptHash::of(receipt).map_err(|e| DbError::Corrupt {
        table: "members",
        reason: e.to_string(),
    })?;
    let inputs = AuditInputs {
        receipt_hash,
        payment: earned,
        bond: pending.ledger().bond(&m.provider),
        trust: Db::trust_in(tx, &m.provider).await?,
    };
    let decision = decide(&inputs, &cfg.policy, &secret(state, epoch));
    let p = decision.p();
    let (status, detail) = if !decision.audited {
        (
            VerificationStatus::NotSampled,
            format!("not sampled: the audit draw (p = {p}) did not select it"),
        )
    } else if eligible(state, job, &m.provider, &[m.provider]).is_empty() {
        (
            VerificationStatus::Unverified,
            format!(
                "sampled (p = {p}), but no other provider that fits the job is online to re-run it; paid unverified"
            ),
        )
    } else {
        (
            VerificationStatus::Pending,
            format!("sampled (p = {p}): being re-executed on another provider before it is paid"),
        )
    };
    let window = cfg.window + Duration::from_millis(job.timeout_ms().saturating_mul(2));
    let mut row = AuditRow {
        job_id: job.id,
        attempt: m.attempt,
        offer_id: m.offer_id,
        provider: m.provider,
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
    tracing::info!(job = %job.id.short(), provider = %m.provider.short(), p = %p, audited = decision.audited, "audit decision");
    Ok(if status == VerificationStatus::Pending {
        Sampled::Hold
    } else {
        Sampled::Settle
    })
}

/// Inside the same transaction: the held job waits for its verifiers.
pub async fn hold_in(tx: &mut Tx<'_>, job: &JobId, attempt: u32) -> Result<bool, DbError> {
    Db::transition(
        tx,
        job,
        Expect::attempt(&[JobState::Running], attempt),
        JobState::Verifying,
        Change {
            reason: Some("result received; re-executing it on another provider to verify it before it is paid"),
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
    original: Member,
    /// Verifiers that delivered, by rank.
    delivered: Vec<Member>,
    /// Verifiers that may still deliver.
    running: Vec<Member>,
    /// Every provider that executed (or was asked to) in this attempt.
    involved: Vec<ProviderId>,
}

async fn standing(state: &AppState, job_id: &JobId) -> Result<Option<Standing>, DbError> {
    let (Some(job), Some(row)) = (state.db.job(job_id).await?, state.db.audit(job_id).await?)
    else {
        return Ok(None);
    };
    if job.state != JobState::Verifying || row.status.is_final() || job.attempts != row.attempt {
        return Ok(None);
    }
    let members = state.db.attempt_members(job_id, row.attempt).await?;
    let Some(original) = members.iter().find(|m| m.offer_id == row.offer_id).cloned() else {
        return Ok(None);
    };
    let involved = members.iter().map(|m| m.provider).collect();
    let verifiers = members.into_iter().filter(|m| m.role == Role::Verify);
    let (delivered, rest): (Vec<Member>, Vec<Member>) =
        verifiers.partition(|m| m.state == MemberState::Delivered);
    let running = rest.into_iter().filter(|m| m.state.pending()).collect();
    Ok(Some(Standing {
        job,
        row,
        original,
        delivered,
        running,
        involved,
    }))
}

/// One step of `job`'s verification (serialized per coordinator, so two
/// steps never place two verifiers at once).
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
    if !s.running.is_empty() {
        return Ok(()); // a verifier is at work
    }
    match judge(state, &s).await {
        Ok(Judged::NeedsExecution) => place_verifier(state, &s).await,
        Ok(Judged::Final(v, why)) => apply(state, &s, &settlement(&s, v, &why), &[]).await,
        Err(e) => {
            tracing::warn!(job = %s.job.id.short(), "comparing executions failed: {e}; retried next round");
            Ok(())
        }
    }
}

/// What the executions so far decide.
enum Judged {
    /// Another verifier must run (none yet, or a tie to break).
    NeedsExecution,
    Final(Verdict, String),
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
async fn agree(
    state: &AppState,
    job: &JobRecord,
    a: &Member,
    b: &Member,
) -> Result<Agreement, String> {
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
        compare::compare(&verify, &ea, &eb, &mut read).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("comparison task failed: {e}"))?
}

async fn judge(state: &AppState, s: &Standing) -> Result<Judged, String> {
    let Some(v) = s.delivered.first() else {
        return Ok(Judged::NeedsExecution);
    };
    let Agreement::Differ(diff) = agree(state, &s.job, &s.original, v).await? else {
        return Ok(Judged::Final(Verdict::Agreed, String::new()));
    };
    let Some(t) = s.delivered.get(1) else {
        return Ok(Judged::NeedsExecution);
    };
    if agree(state, &s.job, t, &s.original).await? == Agreement::Same {
        return Ok(Judged::Final(Verdict::VerifierWrong, diff));
    }
    if agree(state, &s.job, t, v).await? == Agreement::Same {
        return Ok(Judged::Final(Verdict::OriginalWrong, diff));
    }
    Ok(Judged::Final(Verdict::NoMajority, diff))
}

/// Places the next verifier on a provider picked at random among the
/// eligible ones that have not executed this job yet, and offers it the
/// job. Nobody eligible: it waits for the next round (or the window).
async fn place_verifier(state: &AppState, s: &Standing) -> Result<(), DbError> {
    let spec = verifier_spec(state, &s.job, &s.original.provider);
    let placed = {
        let mut live = crate::live::lock(state);
        let candidates = live.fleet.eligible(&spec, &s.involved);
        if candidates.is_empty() {
            None
        } else {
            let r = u64::from_le_bytes(kiln_protocol::ids::random_bytes::<8>());
            let id = candidates[(r % candidates.len() as u64) as usize];
            let placement = live.fleet.book(&id, &s.job.spec);
            let addrs = live
                .fleet
                .index_of(&id)
                .map(|i| live.fleet.view(i).advert.listen_addrs.clone())
                .unwrap_or_default();
            placement.map(|p| {
                live.book(s.job.id, s.row.attempt, std::slice::from_ref(&p));
                (p, addrs)
            })
        }
    };
    let Some((placement, addrs)) = placed else {
        return Ok(());
    };
    let rank = s.involved.len() as u32;
    let m = Member {
        offer_id: OfferId::random(),
        job_id: s.job.id,
        attempt: s.row.attempt,
        rank,
        provider: placement.provider,
        listen_addrs: addrs,
        price_per_hour: placement.price_per_hour,
        state: MemberState::Offered,
        reason: None,
        outcome: None,
        paid: Credits(0),
        cost: None,
        receipt: None,
        manifest: None,
        started_at: None,
        result_at: None,
        paid_at: None,
        role: Role::Verify,
    };
    let tie = !s.delivered.is_empty();
    let mut tx = state.db.begin().await?;
    if Db::job_state_in(&mut tx, &s.job.id).await? != Some((JobState::Verifying, s.row.attempt)) {
        return Ok(());
    }
    Db::insert_member(&mut tx, &m).await?;
    if tie && s.row.status == VerificationStatus::Pending {
        let mut row = s.row.clone();
        row.status = VerificationStatus::Disputed;
        row.detail = format!(
            "disputed: the re-execution on provider {} disagreed ({}); a third execution on provider {} decides",
            s.delivered[0].provider.short(),
            first_line(s),
            m.provider.short()
        );
        let verifiers: Vec<ProviderId> = s
            .delivered
            .iter()
            .map(|v| v.provider)
            .chain([m.provider])
            .collect();
        seal(state, &s.job, &mut row, &verifiers);
        Db::update_audit(&mut tx, &row, VerificationStatus::Pending).await?;
    }
    tx.commit().await?;
    tracing::info!(job = %s.job.id.short(), verifier = %m.provider.short(), tie, "re-executing to verify");
    // The offer goes out in a task of its own: a verifier that does not
    // answer must not hold up the other verifications. The member is
    // recorded (offered), so no second verifier is placed meanwhile.
    let (st, job) = (state.clone(), s.job.clone());
    state.tasks.spawn(async move {
        tokio::select! {
            r = offer(&st, &job, m) => if let Err(e) = r {
                tracing::error!(job = %job.id.short(), "offering the re-execution failed: {e}");
            },
            // At shutdown the member stays offered; the audit window
            // settles the job if nobody answers after the restart.
            () = st.stopping.cancelled() => {}
        }
    });
    Ok(())
}

/// The difference that opened the dispute, for the record (recomputed
/// cheaply from what is stored: the comparator's words are not kept).
fn first_line(s: &Standing) -> String {
    match (
        s.original.receipt.as_ref(),
        s.delivered.first().and_then(|v| v.receipt.as_ref()),
    ) {
        (Some(a), Some(b)) => format!(
            "outputs {} vs {}",
            a.payload.output_cid, b.payload.output_cid
        ),
        _ => "different outputs".into(),
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

/// Who is paid, who is slashed (and who proved it), what the job ends as.
struct Settlement<'a> {
    paid: Vec<&'a Member>,
    slashed: Option<(&'a Member, &'a Member)>,
    /// The result the buyer gets (`None`: refunded, the job fails).
    result: Option<&'a Member>,
    status: VerificationStatus,
    detail: String,
    /// Audit outcomes for the original and the verifiers' providers.
    outcomes: Vec<(&'a Member, AuditOutcome)>,
}

fn settlement<'a>(s: &'a Standing, v: Verdict, diff: &str) -> Settlement<'a> {
    let o = &s.original;
    let short = |m: &Member| m.provider.short();
    match (v, s.delivered.first(), s.delivered.get(1)) {
        (Verdict::Agreed, Some(v1), _) => Settlement {
            paid: vec![o, v1],
            slashed: None,
            result: Some(o),
            status: VerificationStatus::Verified,
            detail: format!(
                "verified by re-execution on provider {} (compare {})",
                short(v1),
                s.job.spec.verify.compare.as_str()
            ),
            outcomes: vec![(o, AuditOutcome::Passed), (v1, AuditOutcome::Passed)],
        },
        (Verdict::VerifierWrong, Some(v1), Some(t)) => Settlement {
            paid: vec![o, t],
            slashed: Some((v1, t)),
            result: Some(o),
            status: VerificationStatus::Verified,
            detail: format!(
                "verified after a dispute: the re-execution on provider {} disagreed ({diff}), the third on provider {} agreed with the result; provider {} was slashed",
                short(v1),
                short(t),
                short(v1)
            ),
            outcomes: vec![
                (o, AuditOutcome::Passed),
                (t, AuditOutcome::Passed),
                (v1, AuditOutcome::Failed),
            ],
        },
        (Verdict::OriginalWrong, Some(v1), Some(t)) => Settlement {
            paid: vec![v1, t],
            slashed: Some((o, v1)),
            result: Some(v1),
            status: VerificationStatus::FailedVerification,
            detail: format!(
                "failed verification: re-executions on providers {} and {} agree with each other, not with provider {}'s result ({diff}); provider {} was slashed and not paid, and the output is provider {}'s",
                short(v1),
                short(t),
                short(o),
                short(o),
                short(v1)
            ),
            outcomes: vec![
                (o, AuditOutcome::Failed),
                (v1, AuditOutcome::Passed),
                (t, AuditOutcome::Passed),
            ],
        },
        _ => Settlement {
            paid: Vec::new(),
            slashed: None,
            result: None,
            status: VerificationStatus::Nondeterministic,
            detail: format!(
                "nondeterministic: three executions gave three different results under `{}` ({diff}); nobody was slashed or paid for them, and the escrow was refunded",
                s.job.spec.verify.compare.as_str()
            ),
            outcomes: s
                .delivered
                .iter()
                .chain([o])
                .map(|m| (m, AuditOutcome::Inconclusive))
                .collect(),
        },
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
    if let Some((loser, proof)) = plan.slashed {
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
    for (m, outcome) in &plan.outcomes {
        let trust = Db::trust_in(tx, &m.provider).await?;
        Db::set_trust(tx, &m.provider, trust.after(*outcome)).await?;
        let event = match outcome {
            AuditOutcome::Passed => Some(Event::AuditPassed),
            AuditOutcome::Failed => Some(Event::AuditFailed),
            AuditOutcome::Inconclusive => None,
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
    let verifiers: Vec<ProviderId> = s.delivered.iter().map(|m| m.provider).collect();
    seal(state, &s.job, &mut row, &verifiers);
    Db::update_audit(tx, &row, from).await?;
    Ok(true)
}

/// The window closed: settle with what is known. Verifiers still running
/// are stopped (and paid for what they reported).
async fn close_window(state: &AppState, s: Standing) -> Result<(), DbError> {
    let disputed = !s.delivered.is_empty();
    let (paid, result, status, detail) = if disputed {
        (
            Vec::new(),
            None,
            VerificationStatus::Unverified,
            format!(
                "disputed and unresolved: the re-execution on provider {} disagreed and no third execution finished within the audit window; nobody was slashed or paid for it, and the escrow was refunded",
                s.delivered[0].provider.short()
            ),
        )
    } else {
        (
            vec![&s.original],
            Some(&s.original),
            VerificationStatus::Unverified,
            "sampled, but no re-execution finished within the audit window; paid unverified"
                .to_string(),
        )
    };
    let plan = Settlement {
        paid,
        slashed: None,
        result,
        status,
        detail,
        outcomes: Vec::new(),
    };
    apply(state, &s, &plan, &s.running).await
}
