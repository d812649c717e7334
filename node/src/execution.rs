//! One admitted attempt, from start to delivered result.
//!
//! [`launch`] spawns (on the node's task tracker) a task that fetches the
//! inputs, runs the container while reporting usage, then either reports
//! the job lost (stopped by the owner coming back or by a drain: the
//! coordinator should run it elsewhere) or signs a [`ResultReceipt`] and
//! delivers it with the small blobs inline. Whatever happens, the task ends
//! by giving the attempt's slot and GPUs back, quarantining any GPU a
//! process was left on.

use std::collections::HashSet;
use std::sync::Arc;

use kiln_blobs::Store;
use kiln_protocol::{Blob, ContentId, JobOffer, JobResult, ResourceUsage, ResultReceipt, Signed};
use tokio_util::sync::CancellationToken;

use crate::admission::Admitted;
use crate::delivery::deliver;
use crate::inputs::fetch_inputs;
use crate::reporting::{report_lost_with, report_usage};
use crate::runner::{Orphan, RunReport};
use crate::state::State;
use crate::{hw, idle};

/// Runs an admitted attempt in the background; frees its slot and GPUs when
/// it ends.
pub(crate) fn launch(state: &Arc<State>, offer: JobOffer, admitted: Admitted) {
    let s = state.clone();
    state.tasks.spawn(async move {
        let Admitted { gpus, cancel } = admitted;
        let uuids: Vec<String> = gpus.into_iter().map(|(_, u)| u).collect();
        let (job, offer_id) = (offer.job_id, offer.offer_id);
        run_job(&s, offer, &uuids, cancel).await;
        // GPU hygiene: a GPU the job used must be free of processes before
        // it is given to anyone else.
        let leftover: HashSet<u32> = match hw::gpu_processes(&uuids) {
            Ok(counts) => counts
                .iter()
                .filter(|(_, n)| *n > 0)
                .filter_map(|(u, _)| s.gpus.iter().find(|g| &g.uuid == u).map(|g| g.index))
                .collect(),
            Err(_) => HashSet::new(), // no GPUs, nothing to check
        };
        if !leftover.is_empty() {
            tracing::warn!(job = %job.short(), gpus = ?leftover, "processes left on GPUs after the job; quarantined until clean");
        }
        if let Ok(mut jobs) = s.jobs.lock() {
            jobs.attempts.remove(&offer_id);
            jobs.dirty_gpus.extend(leftover);
        }
    });
}

async fn run_job(
    state: &Arc<State>,
    offer: JobOffer,
    gpu_uuids: &[String],
    cancel: CancellationToken,
) {
    let (job, offer_id) = (offer.job_id, offer.offer_id);
    // The image and the inputs come in together (both may be fetched
    // from the coordinator and peers); either failing fails the job
    // before its container exists.
    let fetched = tokio::select! {
        f = async {
            tokio::try_join!(crate::images::prepare(state, &offer), fetch_inputs(state, &offer))
        } => f,
        () = cancel.cancelled() => Err("cancelled while its image and inputs were being fetched".into()),
    };
    let report = match fetched {
        Ok((image, inputs)) => {
            let run = state.runner.run(
                crate::runner::Launch {
                    job,
                    offer: offer_id,
                    spec: &offer.spec,
                    image: &image.reference,
                    inputs: &inputs.local,
                    gpu_uuids,
                },
                cancel,
            );
            // Usage is reported for settlement while the job runs.
            tokio::select! {
                report = run => report,
                never = report_usage(state, &offer) => match never {},
            }
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(state.runner.attempt_dir(&job, &offer_id));
            tracing::warn!(job = %job.short(), "{e}");
            RunReport::failed_before_start(e, String::new())
        }
    };
    tracing::info!(job = %job.short(), outcome = ?report.outcome, exit = ?report.exit_code, wall_ms = report.wall_ms, "job finished");
    state.counters.finished(report.outcome);
    let (preempted, draining) = state
        .jobs
        .lock()
        .map(|j| {
            let preempted = j.attempts.get(&offer_id).is_some_and(|a| a.preempted);
            (preempted, j.draining)
        })
        .unwrap_or((false, false));
    if preempted || draining {
        // Stopped because the provider's owner came back (preempt policy),
        // or because this provider is shutting down; not because the buyer
        // cancelled: the coordinator should run it elsewhere.
        if let Ok(mut j) = state.jobs.lock() {
            j.lost.push(Orphan {
                job,
                offer: offer_id,
            });
        }
        let why = if preempted {
            format!(
                "{}: the provider's owner started using the GPU",
                idle::PREEMPTED_BY_OWNER
            )
        } else {
            "the provider shut down while the job ran".to_string()
        };
        report_lost_with(state, &why).await;
        return;
    }
    let Some((result, pins)) = sign_result(state, &offer, report) else {
        return;
    };
    deliver(state, job, result).await;
    drop(pins); // delivered (or given up): the cache may evict them now
}

/// The signed receipt for `report` and the result that carries it (small
/// blobs inline), with pins keeping everything it names in the cache
/// until it is delivered. `None` if the receipt could not be signed.
fn sign_result(
    state: &State,
    offer: &JobOffer,
    report: RunReport,
) -> Option<(JobResult, Vec<kiln_blobs::PinGuard>)> {
    let job = offer.job_id;
    let stdout_cid = ContentId::of_bytes(&report.stdout);
    let stderr_cid = ContentId::of_bytes(&report.stderr);
    let receipt = ResultReceipt {
        job_id: job,
        offer_id: offer.offer_id,
        provider: state.provider,
        outcome: report.outcome,
        exit_code: report.exit_code,
        error: report.error.clone(),
        // What ran, as the job named it: the engine resolved the job's
        // image id or repository digest to the image it started.
        image_digest: if report.image_digest.is_empty() {
            String::new()
        } else {
            offer
                .spec
                .image
                .pinned()
                .map_or_else(|| report.image_digest.clone(), str::to_string)
        },
        input_cids: offer.spec.inputs.iter().map(|i| i.cid).collect(),
        output_cid: report.manifest.cid(),
        stdout_cid,
        stderr_cid,
        started_at: report.started_at,
        finished_at: report.finished_at,
        usage: ResourceUsage {
            wall_ms: report.wall_ms,
            output_bytes: report.manifest.total_size(),
            stdout_bytes: report.stdout_total,
            stderr_bytes: report.stderr_total,
            logs_truncated: report.logs_truncated(),
            log_cap_bytes: state.config.limits.log_cap_bytes,
        },
    };
    let Ok(receipt) = Signed::sign(&state.key, receipt, 3600) else {
        tracing::error!(job = %job.short(), "could not sign the receipt");
        return None;
    };
    // Logs go into the cache too, so the coordinator can fetch them when
    // they are too large to send inline.
    let mut pins = report.pins;
    for bytes in [&report.stdout, &report.stderr] {
        if bytes.len() as u64 > kiln_protocol::MAX_INLINE_BLOB {
            match state.store.import_bytes(bytes) {
                Ok(cid) => pins.push(state.store.pin(&cid)),
                Err(e) => tracing::warn!(job = %job.short(), "cannot cache logs: {e}"),
            }
        }
    }
    let blobs = inline_blobs(
        &state.store,
        [(stdout_cid, report.stdout), (stderr_cid, report.stderr)],
        &report.manifest,
    );
    let result = JobResult {
        job_id: job,
        receipt,
        manifest: report.manifest,
        blobs,
    };
    Some((result, pins))
}

/// The blobs small enough to send inline with a result: logs first, then
/// output files, up to [`kiln_protocol::MAX_INLINE_TOTAL`] bytes.
fn inline_blobs(
    store: &Store,
    logs: [(ContentId, Vec<u8>); 2],
    manifest: &kiln_protocol::Manifest,
) -> Vec<Blob> {
    let mut budget = kiln_protocol::MAX_INLINE_TOTAL;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut take = |cid: ContentId, bytes: Vec<u8>, budget: &mut u64, out: &mut Vec<Blob>| {
        let n = bytes.len() as u64;
        if n <= kiln_protocol::MAX_INLINE_BLOB && n <= *budget && seen.insert(cid) {
            *budget -= n;
            out.push(Blob { cid, bytes });
        }
    };
    for (cid, bytes) in logs {
        take(cid, bytes, &mut budget, &mut out);
    }
    for e in &manifest.entries {
        if e.size <= kiln_protocol::MAX_INLINE_BLOB
            && e.size <= budget
            && let Ok(Some(bytes)) = store.get(&e.cid)
        {
            take(e.cid, bytes, &mut budget, &mut out);
        }
    }
    out
}
