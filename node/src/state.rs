//! What every part of a running node shares: [`State`] (identity, the
//! coordinator, the network client, the runner, the blob cache) and the job
//! table [`Jobs`] behind one mutex.
//!
//! The job table is keyed by **offer id**, not job id: each attempt of a job
//! (each offer) has its own [`Attempt`] with its own slot, GPUs and
//! cancellation token, and its own container and directory on disk. So a new
//! attempt of a job is taken while an old one is still winding down, and
//! cancelling or finishing one attempt never touches another. The lock is
//! only ever held for bookkeeping, never across an `.await`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use kiln_blobs::Store;
use kiln_net::{Addr, Peer};
use kiln_protocol::{
    CapabilityAdvert, ContentId, GpuInfo, JobId, Keypair, NetRequest, NetResponse, OfferId,
    ProviderId, PublicKey,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::NodeConfig;
use crate::gang;
use crate::runner::{Orphan, Runner};
use crate::shared::SharedSet;

pub(crate) struct State {
    pub(crate) key: Keypair,
    pub(crate) provider: ProviderId,
    pub(crate) coordinator: Peer,
    pub(crate) coordinator_addr: Addr,
    pub(crate) coordinator_key: PublicKey,
    pub(crate) client: kiln_net::Client,
    pub(crate) runner: Runner,
    pub(crate) config: NodeConfig,
    pub(crate) gpus: Vec<GpuInfo>,
    /// The advert without its per-heartbeat parts (issue time, free slots,
    /// cached CIDs).
    pub(crate) advert_base: CapabilityAdvert,
    pub(crate) jobs: Mutex<Jobs>,
    /// Inputs and outputs, by CID.
    pub(crate) store: Store,
    /// Blobs fetched as job inputs: the only ones served to peers other
    /// than the coordinator (when it allows), and the ones advertised as
    /// cached.
    pub(crate) shared: SharedSet,
    /// Images this node loaded or pulled into the engine (LRU, pinned
    /// while in use).
    pub(crate) images: std::sync::Arc<crate::images::ImageCache>,
    /// The loopback registry the engine pulls Kiln images from (`None`:
    /// they are loaded as archives; see `images.rs`).
    /// What `/metrics` counts.
    pub(crate) counters: crate::metrics::Counters,
    pub(crate) image_registry: Option<std::sync::Arc<crate::image_serve::LocalRegistry>>,
    /// The coordinator's answers about fetches of cached inputs, by (peer,
    /// CID): when, and whether allowed.
    pub(crate) fetch_grants: Mutex<HashMap<(Peer, ContentId), (Instant, bool)>>,
    /// Every task spawned for one job or request (a job's run and delivery,
    /// a gang reservation's hold, a challenge), so that shutdown can wait
    /// for them instead of cutting them off mid-report.
    pub(crate) tasks: TaskTracker,
    /// Fired when the node stops delivering results: deliveries still
    /// retrying give up and report their jobs lost. Shutdown fires it while
    /// the network is still up; it is a child of the node's token, so a
    /// node simply cancelled does not keep retrying into a dead network.
    pub(crate) give_up: CancellationToken,
}

impl State {
    /// Sends `request` to this node's coordinator (dialling its configured
    /// address if no connection is open) and waits for the answer.
    pub(crate) async fn ask_coordinator(
        &self,
        request: NetRequest,
    ) -> Result<NetResponse, kiln_net::NetError> {
        let addrs = vec![self.coordinator_addr.clone()];
        self.client.request(self.coordinator, addrs, request).await
    }
}

/// One attempt of a job on this node: booked by admission (a running job,
/// a gang member reserved or started, a finished job still delivering) and
/// removed by whoever ends it.
pub(crate) struct Attempt {
    pub(crate) job: JobId,
    /// Stops this attempt: a cancel, a drain, the owner coming back, a gang
    /// release.
    pub(crate) cancel: CancellationToken,
    /// GPU indices it holds.
    pub(crate) gpus: Vec<u32>,
    /// Stopped because the provider's owner came back: reported lost (the
    /// coordinator requeues it), not as a result.
    pub(crate) preempted: bool,
}

#[derive(Default)]
pub(crate) struct Jobs {
    /// Every offer id ever taken: the same offer is accepted once.
    pub(crate) accepted: HashSet<OfferId>,
    /// Attempts holding a slot, by offer id.
    pub(crate) attempts: HashMap<OfferId, Attempt>,
    /// GPUs on which a finished job's process was still found; not assigned
    /// until a later check finds them clean.
    pub(crate) dirty_gpus: HashSet<u32>,
    /// Jobs to report lost to the coordinator (reaped at start-up, stopped
    /// by a drain or the owner, results that could not be delivered).
    pub(crate) lost: Vec<Orphan>,
    /// Set by a drain: take no offers, report running jobs lost.
    pub(crate) draining: bool,
    /// Why the owner sampler keeps offers away (`None`: take them).
    pub(crate) owner_busy: Option<String>,
    /// A benchmark challenge runs: take no offers meanwhile.
    pub(crate) benchmarking: bool,
    /// Gang members reserved and waiting for their start, and what happened to each.
    pub(crate) gang: gang::Table,
}

impl Jobs {
    /// GPUs held by some attempt.
    pub(crate) fn busy_gpus(&self) -> HashSet<u32> {
        self.attempts
            .values()
            .flat_map(|a| a.gpus.iter().copied())
            .collect()
    }

    /// The attempt `offer` of `job`, if it holds a slot here. Both ids must
    /// match: a message naming one job with another job's offer finds nothing.
    pub(crate) fn attempt(&self, job: &JobId, offer: &OfferId) -> Option<&Attempt> {
        self.attempts.get(offer).filter(|a| a.job == *job)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn attempts_of_one_job_are_separate_entries_named_by_both_ids() {
        let mut jobs = Jobs::default();
        let job = JobId::random();
        let (a, b) = (OfferId::random(), OfferId::random());
        for (offer, gpu) in [(a, 0), (b, 1)] {
            let attempt = Attempt {
                job,
                cancel: CancellationToken::new(),
                gpus: vec![gpu],
                preempted: false,
            };
            jobs.attempts.insert(offer, attempt);
        }
        assert!(jobs.attempt(&job, &a).is_some());
        assert!(
            jobs.attempt(&JobId::random(), &a).is_none(),
            "another job's id with this offer finds nothing"
        );
        assert_eq!(jobs.busy_gpus(), HashSet::from([0, 1]));
        // Attempt a is cancelled and ends: b keeps its token, slot and GPU.
        jobs.attempt(&job, &a).unwrap().cancel.cancel();
        jobs.attempts.remove(&a);
        let b_left = jobs.attempt(&job, &b).unwrap();
        assert!(!b_left.cancel.is_cancelled());
        assert_eq!(jobs.busy_gpus(), HashSet::from([1]));
    }
}
