//! The scheduling loop: every round first applies leases and deadlines
//! ([`crate::lifecycle::expire`]), then places what is queued with the pure
//! matcher ([`crate::sched`]) over the in-memory fleet ([`crate::live`]),
//! and hands each placement to [`crate::lifecycle::place`]; then it moves
//! open verifications on ([`crate::lifecycle::reexec`]). Woken by new
//! jobs, new providers and finished jobs, and at least every
//! `schedule_interval`.
//!
//! Every round considers every queued job: there is no window a flood of
//! jobs could fill (see [`crate::sched::queue`]). The queue is kept in
//! memory between rounds ([`Backlog`]) and brought up to date from the jobs'
//! state changes: every state change writes one `job_events` row in its
//! transaction, so reading the rows after the last one applied is all that
//! happened since, and a round reads only those (and the jobs they put in
//! the queue), never the whole queue. As a safety net the queue is read
//! whole at start-up and every [`QUEUE_RESYNC`].

use std::time::{Duration, Instant};

use kiln_protocol::UnixMillis;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::db::{Db, DbError};
use crate::jobs::{Expect, JobState};
use crate::lifecycle::{expire, place, recover, reexec, settle};
use crate::sched;
use crate::sched::queue::Backlog;

/// How often the queue is read whole from the database anyway.
pub const QUEUE_RESYNC: Duration = Duration::from_secs(300);

/// Rows read per query when catching up or reading the queue.
const PAGE: u32 = 1000;

/// Places queued jobs whenever woken, and at least every `schedule_interval`.
pub async fn schedule_loop(state: AppState, cancel: CancellationToken) {
    if let Err(e) = recover::recover(&state).await {
        tracing::error!("recovering unconfirmed offers failed: {e}");
    }
    let mut queue = QueueFeed::default();
    loop {
        if let Err(e) = expire::expire(&state).await {
            tracing::error!("applying leases and deadlines failed: {e}");
        }
        if let Err(e) = schedule_once(&state, &mut queue).await {
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

/// The queue as the scheduler keeps it between rounds.
#[derive(Default)]
struct QueueFeed {
    backlog: Backlog,
    /// The last `job_events` row applied to `backlog`.
    seq: i64,
    /// When the queue was last read whole (`None`: due).
    synced: Option<Instant>,
}

impl QueueFeed {
    /// Brings the backlog up to date. On any error the next call reads the
    /// queue whole, so a change half applied is never left behind.
    async fn sync(&mut self, db: &Db) -> Result<(), DbError> {
        let r = self.try_sync(db).await;
        if r.is_err() {
            self.synced = None;
        }
        r
    }

    async fn try_sync(&mut self, db: &Db) -> Result<(), DbError> {
        if self.synced.is_none_or(|t| t.elapsed() >= QUEUE_RESYNC) {
            // The position first: what changes while the queue is read is
            // applied again below, which is harmless.
            let seq = db.last_job_change().await?;
            let mut jobs = Vec::new();
            loop {
                let after = jobs
                    .last()
                    .map(|j: &crate::jobs::JobRecord| (j.created_at, j.id));
                let page = db.queued_page(after, PAGE).await?;
                let done = page.len() < PAGE as usize;
                jobs.extend(page);
                if done {
                    break;
                }
            }
            self.backlog = Backlog::new(jobs);
            self.seq = seq;
            self.synced = Some(Instant::now());
        }
        loop {
            let changes = db.job_changes_after(self.seq, PAGE).await?;
            let Some(&(last, _, _)) = changes.last() else {
                return Ok(());
            };
            let changes: Vec<_> = changes.into_iter().map(|(_, j, s)| (j, s)).collect();
            let reread = self.backlog.apply(&changes);
            for job in db.queued_among(&reread).await? {
                self.backlog.upsert(job);
            }
            self.seq = last;
            if changes.len() < PAGE as usize {
                return Ok(());
            }
        }
    }
}

async fn schedule_once(state: &AppState, queue: &mut QueueFeed) -> Result<(), DbError> {
    queue.sync(&state.db).await?;
    if queue.backlog.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    // Priority, then submission order (the backlog keeps that order); every
    // job is tried, so a small job is never blocked behind a large one that
    // does not fit (see sched::queue for the anti-starvation hold that keeps
    // the large one from waiting forever).
    let queued: Vec<&crate::jobs::JobRecord> = queue.backlog.iter().collect();
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
    let matched = started.elapsed();
    let (mut placed, mut expired) = (0usize, 0usize);
    let mut reasons = Vec::new();
    for (job, (decision, addrs)) in queued.iter().zip(decisions) {
        match decision {
            sched::Decision::Placed(placements) => {
                placed += 1;
                if !place::place(state, job, &placements, addrs).await? {
                    crate::live::lock(state).release_job(&job.id);
                }
            }
            sched::Decision::Waiting(why) => {
                let line = why
                    .with_unbonded(unbonded, state.config.min_stake)
                    .to_string();
                if job.reason.as_deref() != Some(line.as_str()) {
                    reasons.push((job.id, line));
                }
            }
            sched::Decision::Expired => {
                expired += 1;
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
    let n = queued.len();
    state.db.set_reasons(&reasons).await?;
    for (id, line) in reasons.iter().cloned() {
        queue.backlog.set_reason(&id, line);
    }
    tracing::debug!(
        queued = n,
        placed,
        expired,
        reasons = reasons.len(),
        match_ms = matched.as_secs_f64() * 1e3,
        round_ms = started.elapsed().as_secs_f64() * 1e3,
        "scheduling round"
    );
    Ok(())
}
