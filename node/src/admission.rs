//! Whether to take an offer, in two steps: [`check_offer`] (pure: who sent
//! it, who it is for, whether its spec is valid) and [`admit`] (capacity
//! now, under the job-table lock, booking the attempt if it fits).
//! [`unadmit`] gives a booking back when the job will not run.

use std::collections::HashSet;

use kiln_net::Peer;
use kiln_protocol::{GpuInfo, JobOffer, OfferId, Signed, UnixMillis};
use tokio_util::sync::CancellationToken;

use crate::hw;
use crate::runner::check_pids;
use crate::state::{Attempt, Jobs, State};

/// Checks that an ordinary offer is signed by this node's coordinator,
/// came from it, is addressed here, carries a valid spec and is not a gang
/// job (those come as gang offers). Returns the offer, or why not.
pub(crate) fn check_offer(
    state: &State,
    peer: Peer,
    signed: &Signed<JobOffer>,
) -> Result<JobOffer, String> {
    let offer = match signed.verify(UnixMillis::now()) {
        Ok(o) => o.clone(),
        Err(e) => return Err(format!("offer from {peer} rejected: {e}")),
    };
    if signed.signer != state.coordinator_key || peer != state.coordinator {
        return Err(format!(
            "offer {} rejected: not from this node's coordinator",
            offer.offer_id.short()
        ));
    }
    if offer.provider != state.provider {
        return Err(format!(
            "offer {} rejected: addressed to provider {}, not this one",
            offer.offer_id.short(),
            offer.provider
        ));
    }
    if let Err(e) = offer.spec.validate() {
        return Err(format!(
            "offer {} rejected: invalid spec: {e}",
            offer.offer_id.short()
        ));
    }
    if offer.spec.resources.gang > 1 {
        return Err(format!(
            "offer {} rejected: job {} is a gang of {} nodes and must come as a gang offer (reserve, then start)",
            offer.offer_id.short(),
            offer.job_id.short(),
            offer.spec.resources.gang
        ));
    }
    Ok(offer)
}

/// What [`admit`] booked for an attempt.
pub(crate) struct Admitted {
    /// The GPUs picked: (index, uuid).
    pub(crate) gpus: Vec<(u32, String)>,
    /// The attempt's token: cancelled to stop it.
    pub(crate) cancel: CancellationToken,
}

/// Checks that `offer` is within this provider's limits (`resources.pids`
/// at most `--max-pids`) and fits now (a slot, not draining, the owner
/// away, no benchmark, enough clean GPUs) and books it under its offer id:
/// a slot, its GPUs, and the offer id as taken. Another attempt of the same
/// job (another offer id) still here is no obstacle: each has its own
/// entry, container and directory. Ordinary and gang offers both come
/// through here, so neither can pass a limit the other checks.
pub(crate) fn admit(state: &State, jobs: &mut Jobs, offer: &JobOffer) -> Result<Admitted, String> {
    let short = offer.offer_id.short();
    check_pids(&state.config.limits, &offer.spec)
        .map_err(|e| format!("offer {short} rejected: {e}"))?;
    if jobs.attempts.len() >= state.config.slots as usize {
        return Err(format!(
            "offer {short} rejected: all {} slots busy",
            state.config.slots
        ));
    }
    if jobs.draining {
        return Err(format!(
            "offer {short} rejected: this provider is shutting down"
        ));
    }
    if let Some(why) = &jobs.owner_busy {
        return Err(format!("offer {short} rejected: {why}"));
    }
    if jobs.benchmarking {
        return Err(format!(
            "offer {short} rejected: a benchmark challenge is running"
        ));
    }
    recheck_dirty_gpus(&state.gpus, &mut jobs.dirty_gpus);
    // Only units of the kind the job asked for (a MIG profile or whole
    // GPUs; the model, capability and memory it accepts): the rule the
    // scheduler placed it by (`GpuInfo::fits`).
    let free: Vec<_> = hw::assignable_gpus(&state.gpus, &jobs.busy_gpus(), &jobs.dirty_gpus)
        .into_iter()
        .filter(|g| g.fits(&offer.spec.resources))
        .collect();
    let want = offer.spec.resources.gpus as usize;
    if free.len() < want {
        let kind = match &offer.spec.resources.mig {
            Some(p) => format!("MIG {p} instances"),
            None => "GPUs".into(),
        };
        return Err(format!(
            "offer {short} rejected: needs {want} {kind} it accepts, {} free",
            free.len()
        ));
    }
    let gpus: Vec<(u32, String)> = free
        .iter()
        .take(want)
        .map(|g| (g.index, g.uuid.clone()))
        .collect();
    let cancel = CancellationToken::new();
    jobs.accepted.insert(offer.offer_id);
    jobs.attempts.insert(
        offer.offer_id,
        Attempt {
            job: offer.job_id,
            cancel: cancel.clone(),
            gpus: gpus.iter().map(|(i, _)| *i).collect(),
            preempted: false,
        },
    );
    Ok(Admitted { gpus, cancel })
}

/// Gives back what [`admit`] booked for an attempt that will not run (a gang
/// member's reservation released). The offer id stays taken, so the same
/// offer is not accepted again.
pub(crate) fn unadmit(jobs: &mut Jobs, offer: &OfferId) {
    jobs.attempts.remove(offer);
}

/// Returns dirty GPUs to service once NVML shows no process on them.
fn recheck_dirty_gpus(gpus: &[GpuInfo], dirty: &mut HashSet<u32>) {
    if dirty.is_empty() {
        return;
    }
    let uuids: Vec<String> = gpus
        .iter()
        .filter(|g| dirty.contains(&g.index))
        .map(|g| g.uuid.clone())
        .collect();
    if let Ok(counts) = hw::gpu_processes(&uuids) {
        for (u, n) in counts {
            if n == 0
                && let Some(g) = gpus.iter().find(|g| g.uuid == u)
            {
                dirty.remove(&g.index);
            }
        }
    }
}
