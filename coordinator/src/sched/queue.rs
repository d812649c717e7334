//! The queue: order, rounds, anti-starvation, deadlines.
//!
//! A round tries every queued job once, in [`order`] (priority, highest
//! first, then submission order). A job that does not fit is skipped, so a
//! small job is never blocked behind a large one that does not fit
//! (no head-of-line blocking).
//!
//! **Anti-starvation.** Skipping alone would let a stream of small jobs keep
//! a large job waiting forever (each time a GPU frees, a small job takes
//! it). So once a job has waited [`RoundPolicy::starve_after`] and still does
//! not fit, it *holds* the providers it could use soonest (fewest missing
//! GPUs, then fewest running jobs; one per node of its gang): for the rest
//! of the round no job after it in the order is placed on them. Their
//! running jobs finish, nothing new lands there, and within the longest
//! running job's timeout the held job fits; a job is never starved by jobs
//! ordered after it. Holds are recomputed every round (they lapse at its
//! end), so a held provider goes back to general use as soon as the job is
//! placed, cancelled or expired. At most [`RoundPolicy::max_holding_jobs`]
//! jobs hold providers in one round, so a backlog of old jobs cannot idle
//! the whole fleet.
//!
//! **Deadlines.** A job whose `resources.deadline` has passed since it was
//! queued is reported [`Decision::Expired`] and not placed; the caller fails
//! it (and refunds its escrow).

use std::cmp::Reverse;
use std::time::Duration;

use kiln_protocol::{JobSpec, UnixMillis};

use super::fleet::Fleet;
use super::fleet::Placement;
use super::{NotPlaced, place_gang};

/// A queued job as the scheduler needs it.
pub trait QueueItem {
    fn spec(&self) -> &JobSpec;
    /// When it entered the queue: the order among equal priorities, and
    /// where its deadline and its waiting time are counted from.
    fn queued_at(&self) -> UnixMillis;
}

impl QueueItem for crate::jobs::JobRecord {
    fn spec(&self) -> &JobSpec {
        &self.spec
    }
    fn queued_at(&self) -> UnixMillis {
        self.created_at
    }
}

impl<T: QueueItem> QueueItem for &T {
    fn spec(&self) -> &JobSpec {
        (**self).spec()
    }
    fn queued_at(&self) -> UnixMillis {
        (**self).queued_at()
    }
}

impl QueueItem for (JobSpec, UnixMillis) {
    fn spec(&self) -> &JobSpec {
        &self.0
    }
    fn queued_at(&self) -> UnixMillis {
        self.1
    }
}

/// Sorts a queue into scheduling order: priority (highest first), then
/// submission order. Stable: equal keys keep their order.
pub fn order<T: QueueItem>(queue: &mut [T]) {
    queue.sort_by_key(|j| (Reverse(j.spec().resources.priority), j.queued_at()));
}

/// Whether a job queued at `queued_at` has passed its queue deadline.
pub fn deadline_passed(spec: &JobSpec, queued_at: UnixMillis, now: UnixMillis) -> bool {
    spec.resources
        .deadline
        .is_some_and(|d| now >= queued_at.plus_secs(d.0))
}

/// How a round treats jobs that have waited long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundPolicy {
    /// Waiting this long makes a job that does not fit hold providers.
    pub starve_after: Duration,
    /// Most jobs holding providers in one round.
    pub max_holding_jobs: usize,
}

impl Default for RoundPolicy {
    fn default() -> Self {
        Self {
            starve_after: Duration::from_secs(300),
            max_holding_jobs: 16,
        }
    }
}

/// What a round decided for one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Reserved: one placement per node of its gang (one for an ordinary
    /// job). The caller dispatches it, or releases every placement.
    Placed(Vec<Placement>),
    /// Still queued; the line says why (and whether it holds providers).
    Waiting(NotPlaced),
    /// Past its queue deadline: fail it. Nothing was reserved.
    Expired,
}

/// Runs one round over `queue`, which must already be in [`order`]:
/// returns one decision per job, in the same order. Reservations of
/// `Placed` jobs stay in `fleet`.
pub fn run_round<T: QueueItem>(
    queue: &[T],
    fleet: &mut Fleet,
    now: UnixMillis,
    policy: &RoundPolicy,
) -> Vec<Decision> {
    fleet.next_round();
    let starve_ms = u64::try_from(policy.starve_after.as_millis()).unwrap_or(u64::MAX);
    let mut holding_jobs = 0;
    let out = queue
        .iter()
        .enumerate()
        .map(|(i, job)| {
            let spec = job.spec();
            if deadline_passed(spec, job.queued_at(), now) {
                return Decision::Expired;
            }
            match place_gang(spec, fleet) {
                Ok(p) => Decision::Placed(p),
                Err(mut why) => {
                    let waited = now.0.saturating_sub(job.queued_at().0);
                    if waited >= starve_ms && holding_jobs < policy.max_holding_jobs {
                        let token = u32::try_from(i + 1).unwrap_or(u32::MAX);
                        why.holding = fleet.hold(spec, token);
                        if why.holding > 0 {
                            holding_jobs += 1;
                        }
                    }
                    Decision::Waiting(why)
                }
            }
        })
        .collect();
    // Holds last one round only.
    fleet.next_round();
    out
}
