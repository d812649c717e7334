//! The scheduler's [`Fleet`], kept in memory across rounds.
//!
//! A round no longer reads every provider, reputation and active job from the
//! database: registrations (heartbeats) upsert their provider, a provider
//! not heard from within its lease is taken out at the start of a round,
//! each dispatch keeps the reservations the round made (by job), and a job
//! leaving `dispatched`/`running` (result, requeue, failure) gives them back.
//! As a safety net against any drift the fleet is rebuilt from the database
//! at start-up and every [`RESYNC`].
//!
//! A provider's TFLOP/s is never its own: it is what its last checked
//! challenge showed ([`verified_tflops`] over `gpu_speed`, see
//! [`crate::audit`]), refreshed here as soon as an audit records it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kiln_protocol::{CapabilityAdvert, GpuInfo, JobId, ProviderId, UnixMillis};

use crate::AppState;
use crate::db::{DbError, GpuSpeedRecord};

use crate::sched::{Fleet, Placement, ProviderView, ReservationId};

/// How often the in-memory fleet is rebuilt from the database anyway.
pub const RESYNC: Duration = Duration::from_secs(60);

/// The fleet and what the coordinator knows about it between rounds.
#[derive(Debug, Default)]
pub struct LiveFleet {
    pub fleet: Fleet,
    /// When each provider last registered (the lease clock).
    last_seen: HashMap<ProviderId, UnixMillis>,
    /// Providers online but not offered work (stake bond below the
    /// minimum), with when they last registered: why-not lines count them.
    unbonded: HashMap<ProviderId, UnixMillis>,
    /// Reservations held by each dispatched or running job, with the
    /// attempt they were made for.
    booked: HashMap<JobId, (u32, Vec<ReservationId>)>,
    synced: Option<Instant>,
}

impl LiveFleet {
    pub fn new() -> Self {
        Self {
            fleet: Fleet::new(),
            ..Self::default()
        }
    }

    /// Whether a rebuild from the database is due.
    pub fn needs_resync(&self) -> bool {
        self.synced.is_none_or(|t| t.elapsed() >= RESYNC)
    }

    /// Replaces everything with a fleet rebuilt from the database.
    pub fn replace(
        &mut self,
        fleet: Fleet,
        last_seen: HashMap<ProviderId, UnixMillis>,
        unbonded: HashMap<ProviderId, UnixMillis>,
        booked: HashMap<JobId, (u32, Vec<ReservationId>)>,
    ) {
        self.fleet = fleet;
        self.last_seen = last_seen;
        self.unbonded = unbonded;
        self.booked = booked;
        self.synced = Some(Instant::now());
    }

    /// A provider registered at `now`: `Some(view)` if it may be offered
    /// work (eligible), `None` if not (e.g. its stake bond is too small).
    pub fn observe(&mut self, id: ProviderId, view: Option<ProviderView>, now: UnixMillis) {
        match view {
            Some(v) => {
                self.fleet.upsert(v);
                self.last_seen.insert(id, now);
                self.unbonded.remove(&id);
            }
            None => {
                self.fleet.remove(&id);
                self.last_seen.remove(&id);
                self.unbonded.insert(id, now);
            }
        }
    }

    /// Replaces what the scheduler knows of a provider that is online (a new
    /// verified figure), leaving its lease alone. `false` if it is not online.
    pub fn refresh(&mut self, view: ProviderView) -> bool {
        if self.fleet.index_of(&view.id).is_none() {
            return false;
        }
        self.fleet.upsert(view);
        true
    }

    /// Takes a provider out until it registers again (it did not answer an
    /// offer: offering it more work before it heartbeats would only fail).
    pub fn suspend(&mut self, id: &ProviderId) {
        self.last_seen.remove(id);
        self.fleet.remove(id);
    }

    /// Takes out providers not heard from since `since`. Returns how many.
    pub fn expire(&mut self, since: UnixMillis) -> usize {
        self.unbonded.retain(|_, t| t.0 >= since.0);
        let gone: Vec<ProviderId> = self
            .last_seen
            .iter()
            .filter(|(_, t)| t.0 < since.0)
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            self.last_seen.remove(p);
            self.fleet.remove(p);
        }
        gone.len()
    }

    /// Keeps `placements` reserved for attempt `attempt` of `job` until
    /// [`Self::release_job`] (a booking of an older attempt is given back).
    pub fn book(&mut self, job: JobId, attempt: u32, placements: &[Placement]) {
        if self.booked.get(&job).is_some_and(|(a, _)| *a != attempt) {
            self.release_job(&job);
        }
        self.booked
            .entry(job)
            .or_insert_with(|| (attempt, Vec::new()))
            .1
            .extend(placements.iter().map(|p| p.reservation));
    }

    /// Gives back everything `job` holds (idempotent).
    pub fn release_job(&mut self, job: &JobId) {
        if let Some((_, ids)) = self.booked.remove(job) {
            for id in ids {
                self.fleet.release_id(id);
            }
        }
    }

    /// [`Self::release_job`], but only if the booking is for `attempt`: an
    /// attempt that ended must not free the next attempt's placement, which
    /// a round may have booked before the end was noticed.
    pub fn release_attempt(&mut self, job: &JobId, attempt: u32) {
        if self.booked.get(job).is_some_and(|(a, _)| *a == attempt) {
            self.release_job(job);
        }
    }

    /// Providers online but below the minimum stake.
    pub fn unbonded(&self) -> usize {
        self.unbonded.len()
    }

    /// Jobs holding reservations.
    pub fn booked_jobs(&self) -> usize {
        self.booked.len()
    }
}

/// The coordinator's live fleet, locked (a poisoned lock is taken over:
/// every update leaves the fleet consistent).
pub fn lock(state: &AppState) -> std::sync::MutexGuard<'_, LiveFleet> {
    state
        .live
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Start of the current lease window.
pub(crate) fn lease_start(state: &AppState) -> UnixMillis {
    UnixMillis(
        UnixMillis::now()
            .0
            .saturating_sub(state.config.provider_lease.as_millis() as u64),
    )
}

/// A provider's TFLOP/s per GPU for the scheduler: the verified figure of
/// its slowest advertised GPU, rounded down to whole TFLOP/s (`min_tflops`
/// is whole, so matching loses nothing). `None` if any advertised GPU has
/// no verified figure (a job could land on that one), or it has no GPUs.
pub fn verified_tflops(gpus: &[GpuInfo], speeds: &[GpuSpeedRecord]) -> Option<u32> {
    let slowest = gpus
        .iter()
        .take(crate::sched::MAX_GPUS_PER_NODE)
        .map(|g| {
            speeds
                .iter()
                .find(|s| s.gpu_uuid == g.uuid)
                .map(|s| s.verified_mflops)
                .filter(|m| *m > 0)
        })
        .collect::<Option<Vec<u64>>>()?
        .into_iter()
        .min()?;
    Some(u32::try_from(slowest / 1_000_000).unwrap_or(u32::MAX))
}

/// What the scheduler sees of a provider: its advert, its reputation, its
/// verified TFLOP/s, and whether it may be offered work at all (it holds
/// the minimum stake bond).
async fn view_of(
    state: &AppState,
    advert: CapabilityAdvert,
) -> Result<Option<ProviderView>, DbError> {
    if state.bank.bond(&advert.provider).await < state.config.min_stake {
        return Ok(None);
    }
    let mut v = ProviderView::new(advert);
    v.reputation = state.db.reputation(&v.id).await?;
    if !v.advert.gpus.is_empty() {
        v.tflops = verified_tflops(&v.advert.gpus, &state.db.gpu_speeds(&v.id).await?);
    }
    Ok(Some(v))
}

/// An audit changed what is verified about `provider`: if it is online,
/// the scheduler sees it now (its lease is left alone).
pub async fn refresh(state: &AppState, provider: &ProviderId) -> Result<(), DbError> {
    let Some(record) = state.db.provider(provider).await? else {
        return Ok(());
    };
    if let Some(view) = view_of(state, record.advert.payload).await? {
        lock(state).refresh(view);
    }
    Ok(())
}

/// A provider (re-)registered: update the live fleet.
pub async fn observe(state: &AppState, advert: &CapabilityAdvert) -> Result<(), DbError> {
    let id = advert.provider;
    let view = view_of(state, advert.clone()).await?;
    lock(state).observe(id, view, UnixMillis::now());
    Ok(())
}

/// Builds the fleet from the database: providers within their lease, and
/// reservations for every dispatched or running job (gang members included).
pub async fn rebuild(state: &AppState) -> Result<LiveFleet, DbError> {
    let mut views = Vec::new();
    let (mut last_seen, mut unbonded) = (HashMap::new(), HashMap::new());
    for p in state.db.providers_seen_since(lease_start(state)).await? {
        let id = p.advert.payload.provider;
        if let Some(v) = view_of(state, p.advert.payload).await? {
            views.push(v);
            last_seen.insert(id, p.last_seen);
        } else {
            unbonded.insert(id, p.last_seen);
        }
    }
    let mut fleet = Fleet::from_views(views);
    let mut booked: HashMap<JobId, (u32, Vec<ReservationId>)> = HashMap::new();
    // Every member that may still be executing holds capacity, booked
    // under its job with the attempt it belongs to.
    let mut jobs = HashMap::new();
    for m in state.db.pending_members().await? {
        if let std::collections::hash_map::Entry::Vacant(e) = jobs.entry(m.job_id) {
            e.insert(state.db.job(&m.job_id).await?);
        }
        let Some(Some(j)) = jobs.get(&m.job_id) else {
            continue;
        };
        // A verifying job's pending members are its verifiers: they hold
        // capacity like any execution.
        if (j.state.is_active() || j.state == kiln_protocol::views::JobState::Verifying)
            && j.attempts == m.attempt
            && let Some(pl) = fleet.book(&m.provider, &j.spec)
        {
            booked
                .entry(j.id)
                .or_insert_with(|| (j.attempts, Vec::new()))
                .1
                .push(pl.reservation);
        }
    }
    let mut live = LiveFleet::new();
    live.replace(fleet, last_seen, unbonded, booked);
    Ok(live)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kiln_protocol::{ByteSize, CapabilityAdvert, CpuInfo, Credits, JobSpec, Keypair};

    fn view(slots: u32) -> ProviderView {
        let id = ProviderId::from_public_key(&Keypair::generate().public());
        ProviderView::new(CapabilityAdvert {
            provider: id,
            protocol_version: kiln_protocol::PROTOCOL_VERSION,
            node_version: "t".into(),
            listen_addrs: vec![],
            cpu: CpuInfo {
                model: "t".into(),
                logical_cores: 4,
                matmul_mflops: 1,
            },
            memory: ByteSize(8 << 30),
            gpus: vec![],
            slots,
            price_per_cpu_hour: Credits(1),
            price_per_gpu_hour: Credits(1),
            runtime: "runc".into(),
            allows_network: false,
            issued_at: UnixMillis(0),
            benchmark: None,
            region: None,
            disk: ByteSize(0),
            cached: vec![],
            registries: Vec::new(),
        })
    }

    fn spec() -> JobSpec {
        let mut s = JobSpec::new(format!("sha256:{}", "a".repeat(64)), vec!["x".into()]);
        s.resources.max_price_per_hour = Credits(1_000_000);
        s
    }

    fn gpu(uuid: &str) -> GpuInfo {
        GpuInfo {
            index: 0,
            uuid: uuid.into(),
            name: "GPU".into(),
            memory_total: ByteSize(80 << 30),
            compute_capability: (9, 0),
            driver_version: "580".into(),
            mig: None,
        }
    }

    fn speed(uuid: &str, verified_mflops: u64) -> GpuSpeedRecord {
        GpuSpeedRecord {
            gpu_uuid: uuid.into(),
            gpu_name: "GPU".into(),
            verified_mflops,
            observed_mflops: verified_mflops,
            advertised_mflops: verified_mflops,
            proven_flops: 1,
            round_trip_us: 1,
            challenge_id: "c".into(),
            at: UnixMillis(0),
        }
    }

    #[test]
    fn a_providers_tflops_is_its_slowest_gpus_verified_figure() {
        let (a, b) = (gpu("GPU-a"), gpu("GPU-b"));
        // (GPUs, speeds) → TFLOP/s
        let cases: Vec<(Vec<GpuInfo>, Vec<GpuSpeedRecord>, Option<u32>)> = vec![
            (vec![a.clone()], vec![], None),
            (
                vec![a.clone()],
                vec![speed("GPU-a", 400_999_999)],
                Some(400),
            ),
            // Under 1 TFLOP/s is 0, not unmeasured: it fails any min_tflops.
            (vec![a.clone()], vec![speed("GPU-a", 999_999)], Some(0)),
            (vec![a.clone()], vec![speed("GPU-a", 0)], None),
            (
                vec![a.clone(), b.clone()],
                vec![speed("GPU-a", 700_000_000), speed("GPU-b", 300_000_000)],
                Some(300),
            ),
            // A GPU without a figure: the job could land on it.
            (
                vec![a.clone(), b.clone()],
                vec![speed("GPU-a", 700_000_000)],
                None,
            ),
            // Figures of GPUs it no longer advertises do not count.
            (vec![b], vec![speed("GPU-a", 700_000_000)], None),
            (vec![], vec![speed("GPU-a", 700_000_000)], None),
            (vec![a], vec![speed("GPU-a", u64::MAX)], Some(u32::MAX)),
        ];
        for (i, (gpus, speeds, want)) in cases.into_iter().enumerate() {
            assert_eq!(verified_tflops(&gpus, &speeds), want, "case {i}");
        }
    }

    #[test]
    fn a_refresh_changes_an_online_provider_only() {
        let mut live = LiveFleet::new();
        let registered = view(1);
        let id = registered.id;
        let mut measured = registered.clone();
        measured.tflops = Some(5);
        assert!(!live.refresh(measured.clone()), "not online: not added");
        assert_eq!(live.fleet.online(), 0);
        live.observe(id, Some(registered), UnixMillis(1_000));
        assert!(live.refresh(measured));
        let i = live.fleet.index_of(&id).unwrap();
        assert_eq!(live.fleet.view(i).tflops, Some(5));
        // The lease is still the registration's.
        assert_eq!(live.expire(UnixMillis(1_001)), 1);
    }

    #[test]
    fn bookings_survive_rounds_until_released_and_expiry_takes_providers_out() {
        let mut live = LiveFleet::new();
        let v = view(1);
        let id = v.id;
        live.observe(id, Some(v.clone()), UnixMillis(1_000));
        assert_eq!(live.fleet.online(), 1);
        let job = JobId::random();
        let p = crate::sched::place(&spec(), &mut live.fleet).unwrap();
        live.book(job, 1, &[p]);
        // A heartbeat keeps the booking; the one slot stays taken.
        live.observe(id, Some(v.clone()), UnixMillis(2_000));
        assert!(crate::sched::place(&spec(), &mut live.fleet).is_err());
        live.release_job(&job);
        live.release_job(&job);
        assert_eq!(live.booked_jobs(), 0);
        let p = crate::sched::place(&spec(), &mut live.fleet).unwrap();
        live.fleet.release(&p);
        // Not heard from since 2 000: out at 2 001.
        assert_eq!(live.expire(UnixMillis(2_000)), 0);
        assert_eq!(live.expire(UnixMillis(2_001)), 1);
        assert_eq!(live.fleet.online(), 0);
        // An ineligible registration takes it out too.
        live.observe(id, Some(v.clone()), UnixMillis(3_000));
        live.observe(id, None, UnixMillis(3_001));
        assert_eq!(live.fleet.online(), 0);
        // … but it is still counted, as unbonded, until its lease runs out.
        assert_eq!(live.unbonded(), 1);
        live.expire(UnixMillis(3_001));
        assert_eq!(live.unbonded(), 1);
        live.expire(UnixMillis(3_002));
        assert_eq!(live.unbonded(), 0);
        // An ended attempt frees only its own booking, not the next one's.
        live.observe(id, Some(v.clone()), UnixMillis(3_500));
        let job = JobId::random();
        let p = crate::sched::place(&spec(), &mut live.fleet).unwrap();
        live.book(job, 1, &[p]);
        live.release_job(&job);
        let p = crate::sched::place(&spec(), &mut live.fleet).unwrap();
        live.book(job, 2, &[p]);
        live.release_attempt(&job, 1);
        assert_eq!(live.booked_jobs(), 1, "attempt 2 keeps its booking");
        assert!(crate::sched::place(&spec(), &mut live.fleet).is_err());
        live.release_attempt(&job, 2);
        assert_eq!(live.booked_jobs(), 0);
        // Bonding brings it back as eligible, no longer unbonded.
        live.observe(id, None, UnixMillis(4_000));
        live.observe(id, Some(v), UnixMillis(4_001));
        assert_eq!((live.unbonded(), live.fleet.online()), (0, 1));
    }
}
