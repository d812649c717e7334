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
//!
//! **No window.** A round walks the whole queue, so no number of jobs
//! ahead of a job can hide it from the scheduler. What keeps that cheap
//! under a flood of jobs nothing can run: a job whose resources and network
//! mode equal those of a job that already failed this round is not matched
//! again (a round only ever fills the fleet, so it would fail too) and gets
//! the same why-not line; a round costs one match per distinct shape plus a
//! hash lookup per job. And a job that could not fit even on an idle fleet
//! holds nothing, so an unplaceable job that has waited long cannot idle
//! providers for everyone after it. The queue itself stays in memory
//! between rounds ([`Backlog`]), in order, kept up to date by the caller.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kiln_protocol::{JobId, JobSpec, UnixMillis};

use super::fleet::Fleet;
use super::fleet::Placement;
use super::{Constraint, NotPlaced, place_gang};
use crate::jobs::{JobRecord, JobState};

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
    round(queue, fleet, now, policy, true)
}

/// [`run_round`]; `share` off matches every job afresh (tests compare).
fn round<T: QueueItem>(
    queue: &[T],
    fleet: &mut Fleet,
    now: UnixMillis,
    policy: &RoundPolicy,
    share: bool,
) -> Vec<Decision> {
    fleet.next_round();
    let starve_ms = u64::try_from(policy.starve_after.as_millis()).unwrap_or(u64::MAX);
    let mut holding_jobs = 0;
    // Why each shape that did not fit failed this round. Reservations and
    // holds only accumulate within a round, so the same shape fails again.
    let mut failed: HashMap<Vec<u8>, NotPlaced> = HashMap::new();
    let out = queue
        .iter()
        .enumerate()
        .map(|(i, job)| {
            let spec = job.spec();
            if deadline_passed(spec, job.queued_at(), now) {
                return Decision::Expired;
            }
            let key = if share { fit_key(spec) } else { None };
            let mut why = match key.as_ref().and_then(|k| failed.get(k)) {
                Some(why) => why.clone(),
                None => match place_gang(spec, fleet) {
                    Ok(p) => return Decision::Placed(p),
                    Err(why) => {
                        if let Some(k) = key {
                            failed.insert(k, why.clone());
                        }
                        why
                    }
                },
            };
            let waited = now.0.saturating_sub(job.queued_at().0);
            if waited >= starve_ms && holding_jobs < policy.max_holding_jobs && could_ever_fit(&why)
            {
                let token = u32::try_from(i + 1).unwrap_or(u32::MAX);
                why.holding = fleet.hold(spec, token);
                if why.holding > 0 {
                    holding_jobs += 1;
                }
            }
            Decision::Waiting(why)
        })
        .collect();
    // Holds last one round only.
    fleet.next_round();
    out
}

/// What placement reads of a job: its resources, network mode and image
/// registry (inputs only break ties among providers that fit). Jobs with
/// equal keys fit the same providers. `None` (never in practice) opts the
/// job out of sharing.
fn fit_key(spec: &JobSpec) -> Option<Vec<u8>> {
    kiln_protocol::encoding::encode(&(&spec.resources, spec.network, spec.image.registry_host()))
        .ok()
}

/// Whether enough providers would take the job once their running work
/// ends: those that fit now plus those excluded only by what is booked or
/// held (a provider is counted against the first constraint it fails, and
/// the dynamic ones are checked last). Holding for a job that could not
/// fit even then would idle providers for nothing.
fn could_ever_fit(why: &NotPlaced) -> bool {
    let later: usize = why
        .excluded()
        .filter(|(c, _)| Constraint::is_dynamic(*c))
        .map(|(_, n)| n)
        .sum();
    why.fit + later >= why.gang.max(1) as usize
}

/// Where a job sits in the queue: priority (highest first), then
/// submission, then id (so equal submission times still have one order).
type OrderKey = (Reverse<i32>, UnixMillis, JobId);

fn order_key(job: &JobRecord) -> OrderKey {
    (
        Reverse(job.spec.resources.priority),
        job.queued_at(),
        job.id,
    )
}

/// Every queued job, kept between rounds in [`order`], so a round neither
/// sorts nor reads the database for jobs it already knows. The caller
/// feeds it the jobs' state changes ([`Backlog::apply`]) and reads back
/// the ones that entered the queue; see [`crate::schedule`].
#[derive(Debug, Default)]
pub struct Backlog {
    jobs: BTreeMap<OrderKey, JobRecord>,
    keys: HashMap<JobId, OrderKey>,
}

impl Backlog {
    pub fn new(jobs: impl IntoIterator<Item = JobRecord>) -> Self {
        let mut b = Self::default();
        for j in jobs {
            b.upsert(j);
        }
        b
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The jobs in scheduling order.
    pub fn iter(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values()
    }

    /// Keeps `job` as read now if it is queued, drops it otherwise.
    pub fn upsert(&mut self, job: JobRecord) {
        self.remove(&job.id);
        if job.state == JobState::Queued {
            let k = order_key(&job);
            self.keys.insert(job.id, k);
            self.jobs.insert(k, job);
        }
    }

    pub fn remove(&mut self, id: &JobId) -> Option<JobRecord> {
        let k = self.keys.remove(id)?;
        self.jobs.remove(&k)
    }

    /// Records the why-not line the scheduler stored for a queued job.
    pub fn set_reason(&mut self, id: &JobId, reason: String) {
        if let Some(j) = self.keys.get(id).and_then(|k| self.jobs.get_mut(k)) {
            j.reason = Some(reason);
        }
    }

    /// Applies state changes, oldest first (each: a job and the state it
    /// entered). Every job named is dropped; those whose latest change put
    /// them in the queue are returned (by id) for the caller to read again
    /// and [`upsert`](Self::upsert), so one that moved on meanwhile is
    /// not kept.
    pub fn apply(&mut self, changes: &[(JobId, JobState)]) -> Vec<JobId> {
        let mut latest: HashMap<JobId, JobState> = HashMap::with_capacity(changes.len());
        for (id, s) in changes {
            latest.insert(*id, *s);
        }
        let mut reread: Vec<JobId> = latest
            .into_iter()
            .filter_map(|(id, s)| {
                self.remove(&id);
                (s == JobState::Queued).then_some(id)
            })
            .collect();
        reread.sort_unstable();
        reread
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use kiln_protocol::{
        BuyerId, ByteSize, CapabilityAdvert, CpuInfo, Credits, GpuInfo, Keypair, MilliCpu,
        ProviderId,
    };

    use super::*;
    use crate::sched::ProviderView;

    const GIB: u64 = 1 << 30;

    /// A provider with `cores` cores, 32 GiB, `slots` slots and `gpus` H100s.
    fn prov(n: u8, cores: u32, slots: u32, gpus: u32) -> ProviderView {
        let id = ProviderId::from_public_key(&Keypair::from_secret_bytes([n; 32]).public());
        ProviderView::new(CapabilityAdvert {
            provider: id,
            protocol_version: 1,
            node_version: "test".into(),
            listen_addrs: vec![],
            cpu: CpuInfo {
                model: "t".into(),
                logical_cores: cores,
                matmul_mflops: 1,
            },
            memory: ByteSize(32 * GIB),
            gpus: (0..gpus)
                .map(|i| GpuInfo {
                    index: i,
                    uuid: format!("GPU-{n}-{i}"),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    memory_total: ByteSize(80 * GIB),
                    compute_capability: (9, 0),
                    driver_version: "580".into(),
                    mig: None,
                })
                .collect(),
            slots,
            price_per_cpu_hour: Credits(1_000_000),
            price_per_gpu_hour: Credits(2_000_000),
            runtime: "runc".into(),
            allows_network: false,
            issued_at: UnixMillis(0),
            benchmark: None,
            region: None,
            disk: ByteSize(100 * GIB),
            cached: vec![],
            registries: Vec::new(),
        })
    }

    /// `cpus` CPUs, 1 GiB, `gpus` GPUs on `gang` nodes, up to 100 cr/h.
    fn job(cpus: u32, gpus: u32, gang: u32) -> JobSpec {
        let mut s = JobSpec::new(format!("sha256:{}", "0".repeat(64)), vec![]);
        s.resources.cpus = MilliCpu(cpus * 1000);
        s.resources.memory = ByteSize(GIB);
        s.resources.gpus = gpus;
        s.resources.gang = gang;
        s.resources.max_price_per_hour = Credits(100_000_000);
        s
    }

    fn queued(spec: JobSpec, at: u64, priority: i32) -> (JobSpec, UnixMillis) {
        let mut spec = spec;
        spec.resources.priority = priority;
        (spec, UnixMillis(at))
    }

    #[test]
    fn a_flood_of_unplaceable_jobs_hides_nothing() {
        let mut fleet = Fleet::from_views([prov(1, 8, 4, 0), prov(2, 8, 4, 0)]);
        // A thousand jobs nothing can run, ahead of everything (top priority).
        let mut q: Vec<_> = (0..1000).map(|i| queued(job(1, 1, 1), i, 1000)).collect();
        q.push(queued(job(1, 0, 1), 5000, 0));
        order(&mut q);
        let d = run_round(&q, &mut fleet, UnixMillis(10_000), &RoundPolicy::default());
        assert!(
            matches!(&d[1000], Decision::Placed(p) if p.len() == 1),
            "{:?}",
            d[1000]
        );
        for x in &d[..1000] {
            match x {
                Decision::Waiting(np) => {
                    assert_eq!(np.to_string(), "waiting: 2 online; 2 excluded by gpus=1");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_job_that_could_never_fit_holds_nothing() {
        let policy = RoundPolicy {
            starve_after: Duration::from_secs(1),
            max_holding_jobs: 16,
        };
        // gang = 3 on two providers: it fits nowhere even with both idle.
        // Before, having waited, it held both and nothing after it ran.
        let mut fleet = Fleet::from_views([prov(1, 8, 4, 0), prov(2, 8, 4, 0)]);
        let q = vec![queued(job(1, 0, 3), 0, 1000), queued(job(1, 0, 1), 1, 0)];
        let d = run_round(&q, &mut fleet, UnixMillis(600_000), &policy);
        assert!(
            matches!(&d[0], Decision::Waiting(np) if np.holding == 0),
            "{:?}",
            d[0]
        );
        assert!(matches!(&d[1], Decision::Placed(_)), "{:?}", d[1]);
        // Needing more CPUs than any provider has: never fits, holds nothing.
        let mut fleet = Fleet::from_views([prov(1, 8, 4, 0)]);
        let q = vec![queued(job(16, 0, 1), 0, 0), queued(job(1, 0, 1), 1, 0)];
        let d = run_round(&q, &mut fleet, UnixMillis(600_000), &policy);
        assert!(
            matches!(&d[0], Decision::Waiting(np) if np.holding == 0),
            "{:?}",
            d[0]
        );
        assert!(matches!(&d[1], Decision::Placed(_)), "{:?}", d[1]);
        // A job that fits once the running work ends still holds (a gang of
        // two whose second node is busy).
        let mut fleet = Fleet::from_views([prov(1, 8, 1, 0), prov(2, 8, 1, 0)]);
        let busy = fleet.view(1).id;
        fleet.book(&busy, &job(1, 0, 1)).unwrap();
        let q = vec![queued(job(1, 0, 2), 0, 0), queued(job(1, 0, 1), 1, 0)];
        let d = run_round(&q, &mut fleet, UnixMillis(600_000), &policy);
        assert!(
            matches!(&d[0], Decision::Waiting(np) if np.holding == 2),
            "{:?}",
            d[0]
        );
        assert!(matches!(&d[1], Decision::Waiting(_)), "{:?}", d[1]);
    }

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    #[test]
    fn sharing_a_failed_shape_changes_no_decision() {
        let shapes = [
            job(1, 0, 1),
            job(4, 0, 1),
            job(1, 1, 1),
            job(2, 2, 1),
            job(1, 0, 2),
            job(1, 4, 2),
            job(12, 0, 1),
        ];
        let policy = RoundPolicy {
            starve_after: Duration::from_secs(60),
            max_holding_jobs: 3,
        };
        for seed in 1..=200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let views: Vec<ProviderView> = (1..=6u8)
                .map(|n| {
                    prov(
                        n,
                        4 + 4 * rng.below(3) as u32,
                        1 + rng.below(3) as u32,
                        rng.below(5) as u32,
                    )
                })
                .collect();
            let busy: Vec<(usize, JobSpec)> = (0..rng.below(8))
                .map(|_| {
                    let s = &shapes[rng.below(4) as usize];
                    (rng.below(6) as usize, s.clone())
                })
                .collect();
            let mut q: Vec<(JobSpec, UnixMillis)> = (0..40)
                .map(|_| {
                    let s = shapes[rng.below(shapes.len() as u64) as usize].clone();
                    queued(s, rng.below(200_000), rng.below(3) as i32)
                })
                .collect();
            order(&mut q);
            let now = UnixMillis(150_000);
            let run = |share: bool| {
                let mut fleet = Fleet::from_views(views.clone());
                for (i, spec) in &busy {
                    let id = fleet.view(*i).id;
                    let _ = fleet.book(&id, spec);
                }
                round(&q, &mut fleet, now, &policy, share)
            };
            let (shared, fresh) = (run(true), run(false));
            for (i, (a, b)) in shared.iter().zip(&fresh).enumerate() {
                let same = match (a, b) {
                    (Decision::Placed(x), Decision::Placed(y)) => x
                        .iter()
                        .zip(y)
                        .all(|(x, y)| (x.index, &x.gpus) == (y.index, &y.gpus)),
                    (Decision::Waiting(x), Decision::Waiting(y)) => x.holding == y.holding,
                    (Decision::Expired, Decision::Expired) => true,
                    _ => false,
                };
                assert!(same, "seed {seed}, job {i}: shared {a:?}, fresh {b:?}");
            }
        }
    }

    /// A job that fits is placed in every round behind 1,000 unplaceable
    /// ones, whether they share one shape (answered once per round) or are
    /// all different, on 1,000 providers. (How long a round takes is a
    /// benchmark's business: `kiln bench scheduler`.)
    #[test]
    fn a_fitting_job_is_placed_behind_a_thousand_unplaceable_ones() {
        let views: Vec<ProviderView> = (0..1_000u32)
            .map(|n| {
                let mut v = prov(0, 8, 4, 0);
                let mut secret = [7u8; 32];
                secret[..4].copy_from_slice(&n.to_le_bytes());
                v.id = ProviderId::from_public_key(&Keypair::from_secret_bytes(secret).public());
                v.advert.provider = v.id;
                v
            })
            .collect();
        let mut fleet = Fleet::from_views(views);
        let policy = RoundPolicy::default();
        for distinct in [false, true] {
            let mut q: Vec<_> = (0..1000u64)
                .map(|i| {
                    let mut s = job(1, 0, 1);
                    // More memory than any provider has.
                    s.resources.memory = ByteSize(64 * GIB + if distinct { i } else { 0 });
                    queued(s, i, 1000)
                })
                .collect();
            q.push(queued(job(1, 0, 1), 5000, 0));
            order(&mut q);
            for r in 0..3u64 {
                let d = run_round(&q, &mut fleet, UnixMillis(10_000 + r), &policy);
                let Some(Decision::Placed(p)) = d.last() else {
                    panic!("distinct={distinct}, round {r}: {:?}", d.last())
                };
                assert_eq!(d.len(), 1001, "every job has an answer");
                for p in p {
                    fleet.release(p);
                }
            }
        }
    }

    fn rec(n: u8, priority: i32, at: u64, state: JobState) -> JobRecord {
        let mut spec = job(1, 0, 1);
        spec.resources.priority = priority;
        JobRecord {
            id: JobId::from_bytes([n; 16]),
            owner: BuyerId::new(Keypair::from_secret_bytes([1; 32]).public()),
            spec,
            label: None,
            state,
            reason: None,
            provider: None,
            offer_id: None,
            attempts: 0,
            price_per_hour: None,
            max_cost: Credits(1),
            cost: None,
            exit_code: None,
            receipt: None,
            manifest: None,
            created_at: UnixMillis(at),
            updated_at: UnixMillis(at),
        }
    }

    fn ids(b: &Backlog) -> Vec<u8> {
        b.iter().map(|j| j.id.as_bytes()[0]).collect()
    }

    #[test]
    fn the_backlog_is_in_queue_order() {
        use JobState::*;
        let b = Backlog::new([
            rec(1, 0, 30, Queued),
            rec(2, 5, 90, Queued),
            rec(3, 0, 10, Queued),
            rec(4, 0, 30, Queued),
            rec(5, 9, 0, Running),
        ]);
        // Priority, then submission, then id; a job not queued is not kept.
        assert_eq!(ids(&b), vec![2, 3, 1, 4]);
    }

    #[test]
    fn state_changes_drop_jobs_and_name_those_to_read_again() {
        use JobState::*;
        // What, the changes (job, state entered), read again, kept.
        type Case = (&'static str, Vec<(u8, JobState)>, Vec<u8>, Vec<u8>);
        let cases: Vec<Case> = vec![
            ("placed", vec![(1, Dispatched)], vec![], vec![2, 3]),
            ("submitted", vec![(9, Queued)], vec![9], vec![1, 2, 3]),
            (
                "requeued, then placed again: the last change counts",
                vec![(1, Queued), (1, Dispatched)],
                vec![],
                vec![2, 3],
            ),
            (
                "placed, then requeued: dropped until read again",
                vec![(2, Dispatched), (2, Queued)],
                vec![2],
                vec![1, 3],
            ),
            ("cancelled", vec![(3, Cancelled)], vec![], vec![1, 2]),
            (
                "another job's change",
                vec![(7, Completed)],
                vec![],
                vec![1, 2, 3],
            ),
        ];
        for (what, changes, reread, kept) in cases {
            let mut b = Backlog::new([
                rec(1, 0, 1, Queued),
                rec(2, 0, 2, Queued),
                rec(3, 0, 3, Queued),
            ]);
            let changes: Vec<(JobId, JobState)> = changes
                .into_iter()
                .map(|(n, s)| (JobId::from_bytes([n; 16]), s))
                .collect();
            let got: Vec<u8> = b.apply(&changes).iter().map(|j| j.as_bytes()[0]).collect();
            assert_eq!(got, reread, "{what}: read again");
            assert_eq!(ids(&b), kept, "{what}: kept");
        }
    }

    #[test]
    fn a_reread_job_replaces_what_was_known() {
        let mut b = Backlog::new([rec(1, 0, 1, JobState::Queued)]);
        b.set_reason(&JobId::from_bytes([1; 16]), "waiting: x".into());
        assert_eq!(
            b.iter().next().unwrap().reason.as_deref(),
            Some("waiting: x")
        );
        let mut again = rec(1, 0, 1, JobState::Queued);
        again.attempts = 2;
        b.upsert(again);
        assert_eq!((b.len(), b.iter().next().unwrap().attempts), (1, 2));
        b.upsert(rec(1, 0, 1, JobState::Dispatched));
        assert!(b.is_empty());
    }
}
