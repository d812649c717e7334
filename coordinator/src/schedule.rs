//! The scheduling loop: every round first applies leases and deadlines
//! ([`crate::lifecycle::expire`]), then places what is queued with the pure
//! matcher ([`crate::sched`]) over the in-memory fleet ([`crate::live`]),
//! and hands each placement to [`crate::lifecycle::place`]; then it moves
//! open verifications on ([`crate::lifecycle::reexec`]). Woken by new
//! jobs, new providers and finished jobs, and at least every
//! `schedule_interval`.

use kiln_protocol::UnixMillis;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::db::DbError;
use crate::jobs::{Expect, JobState};
use crate::lifecycle::{expire, place, recover, reexec, settle};
use crate::sched::{self, Fleet};

/// Places queued jobs whenever woken, and at least every `schedule_interval`.
pub async fn schedule_loop(state: AppState, cancel: CancellationToken) {
    if let Err(e) = recover::recover(&state).await {
        tracing::error!("recovering unconfirmed offers failed: {e}");
    }
    loop {
        if let Err(e) = expire::expire(&state).await {
            tracing::error!("applying leases and deadlines failed: {e}");
        }
        if let Err(e) = schedule_once(&state).await {
            tracing::error!("scheduling round failed: {e}");
        }
        if let Err(e) = reexec::tick(&state).await {
            tracing::error!("verification round failed: {e}");
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = state.wake.notified() => {}
            () = tokio::time::sleep(state.config.schedule_interval) => {}
        }
    }
}

/// The fleet as the scheduler sees it, rebuilt from the database: live
/// providers and what is booked on them (the offers search uses it; the
/// scheduler keeps its own copy in memory, see [`crate::live`]).
pub async fn fleet(state: &AppState) -> Result<Fleet, DbError> {
    Ok(crate::live::rebuild(state).await?.fleet)
}

async fn schedule_once(state: &AppState) -> Result<(), DbError> {
    let mut queued = state.db.jobs_in(&[JobState::Queued], 500).await?;
    if queued.is_empty() {
        return Ok(());
    }
    // Priority, then submission order; every job is tried, so a small job is
    // never blocked behind a large one that does not fit (see sched::queue
    // for the anti-starvation hold that keeps the large one from waiting forever).
    sched::order(&mut queued);
    if crate::live::lock(state).needs_resync() {
        let rebuilt = crate::live::rebuild(state).await?;
        *crate::live::lock(state) = rebuilt;
    }
    let lease_start = crate::live::lease_start(state);
    // Placements are booked under the job as they are made, so a booking
    // is given back whatever happens to the job afterwards.
    // Each decision with the listen addresses of the providers it placed on.
    type Routed = Vec<(sched::Decision, Vec<Vec<String>>)>;
    let (decisions, unbonded): (Routed, usize) = {
        let mut live = crate::live::lock(state);
        live.expire(lease_start);
        let decisions = sched::run_round(
            &queued,
            &mut live.fleet,
            UnixMillis::now(),
            &sched::RoundPolicy::default(),
        );
        let decisions = queued
            .iter()
            .zip(decisions)
            .map(|(job, d)| {
                let addrs = match &d {
                    sched::Decision::Placed(ps) => {
                        live.book(job.id, job.attempts + 1, ps);
                        ps.iter()
                            .map(|p| live.fleet.view(p.index).advert.listen_addrs.clone())
                            .collect()
                    }
                    _ => Vec::new(),
                };
                (d, addrs)
            })
            .collect();
        (decisions, live.unbonded())
    };
    for (job, (decision, addrs)) in queued.iter().zip(decisions) {
        match decision {
            sched::Decision::Placed(placements) => {
                if !place::place(state, job, &placements, addrs).await? {
                    crate::live::lock(state).release_job(&job.id);
                }
            }
            sched::Decision::Waiting(why) => {
                let line = why
                    .with_unbonded(unbonded, state.config.min_stake)
                    .to_string();
                if job.reason.as_deref() != Some(line.as_str()) {
                    state.db.set_reason(&job.id, &line).await?;
                }
            }
            sched::Decision::Expired => {
                let reason = format!(
                    "not placed before its queue deadline of {}; last: {}",
                    job.spec
                        .resources
                        .deadline
                        .map(|d| d.to_string())
                        .unwrap_or_default(),
                    job.reason.as_deref().unwrap_or("no provider fitted")
                );
                settle::end_job(
                    state,
                    &job.id,
                    Expect::attempt(&[JobState::Queued], job.attempts),
                    JobState::Failed,
                    &reason,
                )
                .await?;
            }
        }
    }
    Ok(())
}
