//! `Usage`: a running member's signed usage report, paid as it goes.
//!
//! The report says how long the job has run; the coordinator pays for the
//! least of that, the time it observed since the member started, and the
//! job's timeout (see [`crate::jobs::billing`]), less what the member was
//! already paid. Reports closer together than `min_usage_interval` are
//! refused (nothing is lost: the next report's total catches up). When the
//! escrow cannot cover what the member earned, the job is stopped.

use kiln_protocol::{ProviderId, Signed, UnixMillis, UsageReport};

use super::{Handled, member_statement, refuse};
use crate::AppState;
use crate::db::{Db, DbError};
use crate::jobs::keys::{self, PayPoint};
use crate::jobs::{JobState, MemberState, billing, model};
use crate::lifecycle::{settle, wind_down};

pub async fn handle(state: &AppState, peer: ProviderId, signed: &Signed<UsageReport>) -> Handled {
    let (job, m) = member_statement(state, peer, signed, "usage report", |r| {
        (r.job_id, r.offer_id)
    })
    .await?;
    let who = model::who(m.rank, job.size() as usize, &m.provider);
    let (Some(started), true) = (m.started_at, m.state.ran()) else {
        return Err(refuse(format!(
            "usage report of {who} for job {} refused: it is {}, not running",
            job.id, m.state
        )));
    };
    let now = UnixMillis::now();
    let min_ms = u64::try_from(state.config.min_usage_interval.as_millis()).unwrap_or(u64::MAX);
    if let Some(wait) = billing::too_soon(m.paid_at, started, now, min_ms) {
        return Err(refuse(format!(
            "usage report for job {} came too soon: reports are settled at most every {} ms; the next in {wait} ms settles everything since",
            job.id, min_ms
        )));
    }
    let report = &signed.payload;
    // Observed time ends when its receipt first arrived, if it has.
    let until = m.result_at.map_or(now, |r| r.min(now));
    let earned = billing::earned_by(&job.terms(&m), report.wall_ms, started, until);
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    // Re-read under the write lock: its result may have settled it since.
    let still_running = Db::member_in(&mut tx, &m.offer_id)
        .await?
        .is_some_and(|now| matches!(now.state, MemberState::Started | MemberState::Stopping));
    if !still_running {
        return Err(refuse(format!(
            "usage report of {who} for job {} refused: it is no longer running",
            job.id
        )));
    }
    let payment = settle::pay_member(
        &mut tx,
        &mut pending,
        state.bank.fee_bps,
        &job.id,
        &m.offer_id,
        m.provider,
        earned,
        keys::pay(&m.offer_id, PayPoint::Interval(report.interval)),
    )
    .await?;
    tx.commit().await.map_err(DbError::from)?;
    pending.commit();
    if payment.short && job.state != JobState::Cancelling {
        let why = format!(
            "the escrow of job {} is exhausted: {who} earned more than it holds; stopping the job",
            job.id
        );
        tracing::warn!(job = %job.id.short(), "{why}");
        let members = state.db.attempt_members(&job.id, job.attempts).await?;
        let running: Vec<_> = members.into_iter().filter(|m| m.state.pending()).collect();
        wind_down(state, job.size() > 1, &[], &running, &why).await?;
        return Err(refuse(why));
    }
    Ok(())
}
