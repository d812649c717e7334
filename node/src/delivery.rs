//! Handing a finished job's result to the coordinator.
//!
//! The coordinator fetches and verifies every output a result names before
//! it accepts it, answering `Retry` meanwhile (and keeping what it already
//! verified), so a result is offered again with backoff for a time in
//! proportion to its size ([`delivery_budget`]). A refusal is final. A
//! result that cannot be delivered is never left hanging: the job is
//! reported lost, so the coordinator requeues it.

use std::time::{Duration, Instant};

use kiln_protocol::{JobId, JobResult, NetRequest, NetResponse, UnixMillis};

use crate::reporting::report_lost_with;
use crate::runner::Orphan;
use crate::state::State;

/// How long to keep offering a result: large outputs get time in
/// proportion, at a pessimistic 8 MiB/s, and never less than ten minutes.
/// Bounded by the signed receipt's own lifetime: past it the coordinator
/// would refuse the result anyway.
pub(crate) fn delivery_budget(result: &JobResult) -> Duration {
    let usage = &result.receipt.payload.usage;
    let logs = usage.stdout_bytes.saturating_add(usage.stderr_bytes);
    let bytes = result
        .manifest
        .total_size()
        .saturating_add(logs.min(usage.log_cap_bytes.saturating_mul(2)));
    let wanted = Duration::from_secs(600).max(Duration::from_secs(bytes / (8 << 20)));
    let left = Duration::from_millis(
        result
            .receipt
            .expires_at
            .0
            .saturating_sub(UnixMillis::now().0),
    );
    wanted.min(left.saturating_sub(Duration::from_secs(30)))
}

/// Sends `result` until the coordinator accepts or refuses it, the budget
/// runs out, or the node stops delivering ([`State::give_up`]); in the last
/// two cases the job is reported lost.
pub(crate) async fn deliver(state: &State, job: JobId, result: JobResult) {
    let mut delay = Duration::from_millis(500);
    let budget = delivery_budget(&result);
    let started = Instant::now();
    let mut attempt = 0u32;
    let mut why = "the result could not be delivered to the coordinator";
    while attempt < 10 || started.elapsed() < budget {
        attempt += 1;
        let send = state.ask_coordinator(NetRequest::Result(Box::new(result.clone())));
        let answer = tokio::select! {
            a = send => a,
            () = state.give_up.cancelled() => {
                why = "the provider shut down before the result was delivered";
                break;
            }
        };
        match answer {
            Ok(NetResponse::Accepted) => {
                tracing::info!(job = %job.short(), "result delivered");
                return;
            }
            Ok(NetResponse::Rejected { reason }) => {
                tracing::error!(job = %job.short(), "the coordinator refused our result: {reason}");
                return;
            }
            Ok(NetResponse::Retry { reason }) => {
                tracing::warn!(job = %job.short(), attempt, "the coordinator asks for the result again: {reason}")
            }
            Ok(other) => {
                tracing::warn!(job = %job.short(), "unexpected answer to a result: {other:?}")
            }
            Err(e) => {
                tracing::warn!(job = %job.short(), attempt, "delivering the result failed: {e}")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = state.give_up.cancelled() => {
                why = "the provider shut down before the result was delivered";
                break;
            }
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    // Never leave the job hanging on the coordinator: hand it back so it
    // is requeued (or failed after its attempts run out).
    tracing::error!(job = %job.short(), attempt, secs = started.elapsed().as_secs(), "gave up delivering the result ({why}); reporting the job lost");
    if let Ok(mut j) = state.jobs.lock() {
        j.lost.push(Orphan {
            job,
            offer: result.receipt.payload.offer_id,
        });
    }
    report_lost_with(state, why).await;
}
