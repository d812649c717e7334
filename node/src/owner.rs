//! The owner sampler: every few seconds, looks at the GPUs (NVML processes
//! and utilization) and, if the policy asks, at interactive users; applies
//! [`idle::decide`] and records the decision in the job table, where
//! admission and the advert read it. Under the preempt policy it stops
//! running GPU jobs, which the execution task then reports lost with a
//! reason starting with [`idle::PREEMPTED_BY_OWNER`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::gpu;
use crate::idle::{self, Observation};
use crate::state::State;

/// Pids of Kiln's own processes among `candidates`: this daemon and every
/// process inside one of this node's job containers.
async fn kiln_pids(state: &State, candidates: &[u32]) -> HashSet<u32> {
    let me = std::process::id();
    let mut pids: HashSet<u32> = HashSet::from([me]);
    let others: Vec<u32> = candidates.iter().copied().filter(|p| *p != me).collect();
    if others.is_empty() {
        return pids;
    }
    let ids: Vec<String> = state
        .runner
        .containers()
        .await
        .map(|cs| cs.into_iter().filter_map(|c| c.id).collect())
        .unwrap_or_default();
    for pid in others {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if idle::cgroup_in_containers(&cgroup, &ids) {
            pids.insert(pid);
        }
    }
    pids
}

/// Whether the owner sampler is needed: GPUs to watch, or users to watch.
pub(crate) fn needed(state: &State) -> bool {
    !state.gpus.is_empty() || state.config.idle.require_no_user
}

/// Runs until `cancel` fires.
pub(crate) async fn sampler(state: Arc<State>, cancel: CancellationToken) {
    let policy = state.config.idle.clone();
    let nvml = if state.gpus.is_empty() {
        None
    } else {
        tokio::task::spawn_blocking(|| gpu::init_nvml().ok().map(Arc::new))
            .await
            .ok()
            .flatten()
    };
    let epoch = Instant::now();
    // Idle "for a while" must be observed: a fresh daemon waits `idle_for`.
    let mut last_owner: Option<u64> = (!policy.idle_for.is_zero()).then_some(0);
    let mut last_reason: Option<String> = None;
    loop {
        let samples = match &nvml {
            Some(n) => {
                let n = n.clone();
                tokio::task::spawn_blocking(move || gpu::sample(&n))
                    .await
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        let candidates: Vec<u32> = samples
            .iter()
            .flat_map(|s| s.pids.iter().copied())
            .collect();
        let kiln = kiln_pids(&state, &candidates).await;
        let (held, running_gpu_jobs) = state
            .jobs
            .lock()
            .map(|j| {
                // A challenge benchmark uses every GPU: that load is Kiln's.
                let busy = j.busy_gpus();
                let held: HashSet<String> = state
                    .gpus
                    .iter()
                    .filter(|g| j.benchmarking || busy.contains(&g.index))
                    .map(|g| g.uuid.clone())
                    .collect();
                let gpu_jobs = j.attempts.values().filter(|a| !a.gpus.is_empty()).count();
                (held, gpu_jobs)
            })
            .unwrap_or_default();
        let owner_now = idle::owner_activity(&samples, &kiln, &held, policy.utilization_threshold);
        let now_ms = epoch.elapsed().as_millis() as u64;
        if owner_now.is_some() {
            last_owner = Some(now_ms);
        }
        let window = policy.idle_for.max(std::time::Duration::from_secs(60));
        let user_active = policy.require_no_user
            && tokio::task::spawn_blocking(move || idle::user_active(window))
                .await
                .unwrap_or(false);
        let decision = idle::decide(
            &policy,
            &Observation {
                now_ms,
                owner_active_now: owner_now,
                last_owner_activity_ms: last_owner,
                user_active,
                running_gpu_jobs,
            },
        );
        if decision.reason != last_reason {
            match &decision.reason {
                Some(r) => tracing::info!("taking no offers: {r}"),
                None => tracing::info!("the GPUs are idle: taking offers again"),
            }
            last_reason = decision.reason.clone();
        }
        if let Ok(mut j) = state.jobs.lock() {
            j.owner_busy = decision.reason.clone();
            if decision.preempt_running {
                for a in j.attempts.values_mut().filter(|a| !a.gpus.is_empty()) {
                    tracing::warn!(job = %a.job.short(), "the owner is using the GPU: preempting the job");
                    a.cancel.cancel();
                    a.preempted = true;
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(policy.sample_every) => {}
        }
    }
}
