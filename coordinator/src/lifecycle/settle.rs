//! The one settlement path, for every job and every member.
//!
//! A member is paid through [`pay_member`] only: each usage report and its
//! receipt say what it has earned in all (see [`crate::jobs::billing`]),
//! and the difference to what it was already paid moves from the job's
//! escrow (`SettleInterval`, keyed by the member's offer id). When the
//! job ends, [`conclude`] or [`end_job`] close the escrow: whatever is left
//! goes back to the buyer. So a job of one and a gang of eight are paid
//! the same way, and a requeued job's next member starts from zero.

use kiln_contracts::{Op, OpKey};
use kiln_protocol::{Credits, JobId, OfferId, ProviderId, UnixMillis};

use crate::AppState;
use crate::bank::{BankError, Pending};
use crate::db::{Db, DbError, Tx};
use crate::jobs::model::{JobVerdict, Seen, after_results};
use crate::jobs::store::ResultColumns;
use crate::jobs::{Change, Expect, JobState, MemberState, Role, billing, keys};

/// What one payment did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Payment {
    /// Paid now (gross).
    pub paid: Credits,
    /// The escrow could not cover everything the member earned.
    pub short: bool,
}

/// Pays member `offer` (on `provider`) up to `earned` in all, from `job`'s
/// escrow, inside `tx`. A key already applied pays nothing again.
#[allow(clippy::too_many_arguments)]
pub async fn pay_member(
    tx: &mut Tx<'_>,
    pending: &mut Pending<'_>,
    fee_bps: u16,
    job: &JobId,
    offer: &OfferId,
    provider: ProviderId,
    earned: Credits,
    key: OpKey,
) -> Result<Payment, BankError> {
    if pending.ledger().applied(&key).is_some() {
        return Ok(Payment::default());
    }
    let paid = Db::member_in(tx, offer)
        .await?
        .map(|m| m.paid)
        .unwrap_or_default();
    let held = pending
        .ledger()
        .escrow(job)
        .map(|e| e.held())
        .unwrap_or_default();
    let owed = Credits(earned.0.saturating_sub(paid.0));
    let due = billing::due(earned, paid, held);
    if due.0 > 0 {
        pending
            .apply(
                tx,
                Op::SettleInterval {
                    key,
                    job: *job,
                    provider,
                    cost: due,
                    fee_bps,
                },
            )
            .await?;
        Db::add_paid(tx, offer, due, UnixMillis::now()).await?;
    }
    Ok(Payment {
        paid: due,
        short: owed > due,
    })
}

/// Returns what is left of a job's escrow to its buyer, if it is open.
pub async fn close(
    tx: &mut Tx<'_>,
    pending: &mut Pending<'_>,
    job: &JobId,
) -> Result<(), BankError> {
    if pending.ledger().escrow(job).is_some_and(|e| e.is_open()) {
        pending
            .apply(
                tx,
                Op::Refund {
                    key: keys::close(job),
                    job: *job,
                },
            )
            .await?;
    }
    Ok(())
}

/// Decides a job from its attempt's members (inside `tx`) and, when they
/// are all done, ends it: members whose pay waited for the others (see
/// [`crate::lifecycle::reexec::defers_pay`]) are paid for their results,
/// the job row takes the lead member's receipt and what the buyer paid in
/// all, and the escrow is closed. Returns the verdict and whether this
/// call ended the job.
pub async fn conclude(
    tx: &mut Tx<'_>,
    pending: &mut Pending<'_>,
    fee_bps: u16,
    job: &JobId,
    attempt: u32,
) -> Result<(JobVerdict, bool), BankError> {
    let Some((now, current_attempt)) = Db::job_state_in(tx, job).await? else {
        return Ok((JobVerdict::Wait, false));
    };
    // (A verifying job is not active: it ends through its audit.)
    if current_attempt != attempt || !now.is_active() {
        return Ok((JobVerdict::Wait, false));
    }
    let ms = Db::attempt_members_in(tx, job, attempt).await?;
    let seen: Vec<Seen> = ms
        .iter()
        .map(|m| Seen {
            state: m.state,
            outcome: m.outcome,
            reason: m.reason.clone(),
        })
        .collect();
    // A member that ended without a result ends a job the buyer was
    // cancelling as cancelled; otherwise it failed.
    let released_as = if now == JobState::Cancelling {
        JobState::Cancelled
    } else {
        JobState::Failed
    };
    let verdict = after_results(&seen, released_as);
    let JobVerdict::Done { state: to, reason } = &verdict else {
        return Ok((verdict, false));
    };
    for m in ms
        .iter()
        .filter(|m| m.state == MemberState::Delivered && m.role == Role::Run)
    {
        pay_member(
            tx,
            pending,
            fee_bps,
            job,
            &m.offer_id,
            m.provider,
            m.cost.unwrap_or_default(),
            keys::pay(&m.offer_id, keys::PayPoint::Result),
        )
        .await?;
    }
    let lead = ms
        .iter()
        .find(|m| m.receipt.is_some() && m.manifest.is_some());
    let cols = lead.and_then(|l| match (&l.receipt, &l.manifest) {
        (Some(r), Some(mf)) => Some(ResultColumns {
            receipt: r,
            manifest: mf,
        }),
        _ => None,
    });
    let cost = Db::paid_in(tx, job).await?;
    let ended = Db::transition(
        tx,
        job,
        Expect::attempt(
            &[
                JobState::Dispatched,
                JobState::Running,
                JobState::Cancelling,
            ],
            attempt,
        ),
        *to,
        Change {
            reason: reason.as_deref(),
            provider: lead.map(|l| l.provider),
            offer_id: lead.map(|l| l.offer_id),
            result: cols,
            cost: Some(cost),
            ..Default::default()
        },
    )
    .await?;
    if ended {
        close(tx, pending, job).await?;
    }
    Ok((verdict, ended))
}

/// Ends a job that has no result to wait for (cancelled before it ran,
/// failed to place or dispatch, out of attempts): moves it to `to` if it
/// is still as `expect` says, closes its escrow, commits. `false` if the
/// job had moved on.
pub async fn end_job(
    state: &AppState,
    job: &JobId,
    expect: Expect<'_>,
    to: JobState,
    reason: &str,
) -> Result<bool, DbError> {
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    let cost = Db::paid_in(&mut tx, job).await?;
    if !Db::transition(
        &mut tx,
        job,
        expect,
        to,
        Change {
            reason: Some(reason),
            cost: Some(cost),
            ..Default::default()
        },
    )
    .await?
    {
        return Ok(false);
    }
    if let Err(e) = close(&mut tx, &mut pending, job).await {
        // Nothing is committed: the job stays as it was and the next
        // attempt to end it tries again.
        tracing::error!(job = %job.short(), "closing the escrow failed: {e}; the job stays {}", expect.states.first().map_or("as it was", |s| s.as_str()));
        return Ok(false);
    }
    tx.commit().await?;
    pending.commit();
    finished(state, job);
    tracing::info!(job = %job.short(), state = to.as_str(), "{reason}");
    Ok(true)
}

/// After a job left its active states: give back its capacity, wake the
/// scheduler.
pub fn finished(state: &AppState, job: &JobId) {
    crate::live::lock(state).release_job(job);
    state.wake.notify_one();
}

/// What [`requeue_in`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeued {
    /// Back in the queue for another attempt.
    Queued,
    /// Out of attempts: failed, its escrow closed.
    Failed,
    /// The job had moved on (another path decided it first).
    Moved,
}

/// Inside `tx`: puts a job whose `attempt` ended without a result back in
/// the queue, or fails it (closing its escrow) once it has used all its
/// attempts. The caller commits, then calls [`after_requeue`].
pub async fn requeue_in(
    state: &AppState,
    tx: &mut Tx<'_>,
    pending: &mut Pending<'_>,
    job: &JobId,
    attempt: u32,
    reason: &str,
) -> Result<Requeued, BankError> {
    let active = [JobState::Dispatched, JobState::Running];
    if attempt >= state.config.max_attempts {
        let reason = format!("failed after {attempt} attempts; last: {reason}");
        let cost = Db::paid_in(tx, job).await?;
        let change = Change {
            reason: Some(&reason),
            cost: Some(cost),
            ..Default::default()
        };
        if !Db::transition(
            tx,
            job,
            Expect::attempt(&active, attempt),
            JobState::Failed,
            change,
        )
        .await?
        {
            return Ok(Requeued::Moved);
        }
        close(tx, pending, job).await?;
        return Ok(Requeued::Failed);
    }
    let reason = format!("requeued: {reason}");
    let change = Change {
        reason: Some(&reason),
        ..Default::default()
    };
    Ok(
        if Db::transition(
            tx,
            job,
            Expect::attempt(&active, attempt),
            JobState::Queued,
            change,
        )
        .await?
        {
            Requeued::Queued
        } else {
            Requeued::Moved
        },
    )
}

/// After [`requeue_in`] committed: give back the attempt's capacity.
pub fn after_requeue(state: &AppState, job: &JobId, attempt: u32, r: Requeued, reason: &str) {
    match r {
        Requeued::Queued => {
            crate::live::lock(state).release_attempt(job, attempt);
            state.wake.notify_one();
            tracing::warn!(job = %job.short(), "requeued: {reason}");
        }
        Requeued::Failed => {
            finished(state, job);
            tracing::warn!(job = %job.short(), "failed after {attempt} attempts; last: {reason}");
        }
        Requeued::Moved => {}
    }
}

/// [`requeue_in`] in a transaction of its own.
pub async fn requeue_or_fail(
    state: &AppState,
    job: &JobId,
    attempt: u32,
    reason: &str,
) -> Result<(), DbError> {
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    let r = match requeue_in(state, &mut tx, &mut pending, job, attempt, reason).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(job = %job.short(), "requeueing failed: {e}");
            return Ok(());
        }
    };
    tx.commit().await?;
    pending.commit();
    after_requeue(state, job, attempt, r, reason);
    Ok(())
}
