//! `Challenge`: a coordinator's benchmark audit. Checks that it comes from
//! this node's coordinator, is addressed here and is not past its deadline;
//! runs the benchmark on the challenge's nonce and sizes (no offer is taken
//! meanwhile, and none is refused for it while GPUs are busy: the challenge
//! is); and returns the signed [`ChallengeResponse`]. Takes seconds, so the
//! request loop runs it on its own task.

use kiln_net::Peer;
use kiln_protocol::{Challenge, ChallengeResponse, NetResponse, Signed, UnixMillis};

use super::common::{HandlerError, job_table};
use crate::bench::{self, BenchOptions};
use crate::gpu;
use crate::state::State;

/// How long a signed response stays valid.
const RESPONSE_TTL_SECS: u64 = 600;

pub(crate) async fn handle(
    state: &State,
    peer: Peer,
    signed: Signed<Challenge>,
) -> Result<NetResponse, HandlerError> {
    let ch = signed
        .verify(UnixMillis::now())
        .map_err(|e| format!("challenge from {peer} rejected: {e}"))?
        .clone();
    if signed.signer != state.coordinator_key || peer != state.coordinator {
        return Err(format!(
            "challenge {} rejected: not from this node's coordinator",
            ch.challenge_id
        )
        .into());
    }
    if ch.provider != state.provider {
        return Err(format!(
            "challenge {} rejected: addressed to provider {}, not this one",
            ch.challenge_id, ch.provider
        )
        .into());
    }
    ch.sizes
        .validate()
        .map_err(|e| format!("challenge {} rejected: {e}", ch.challenge_id))?;
    let now = UnixMillis::now();
    if ch.deadline <= now {
        return Err(format!(
            "challenge {} rejected: its deadline {} ms has passed (now {} ms)",
            ch.challenge_id, ch.deadline.0, now.0
        )
        .into());
    }
    {
        let mut jobs = job_table(state)?;
        if jobs.benchmarking {
            return Err(format!(
                "challenge {} rejected: another challenge is running",
                ch.challenge_id
            )
            .into());
        }
        let busy = jobs.busy_gpus().len();
        if busy > 0 {
            return Err(format!(
                "challenge {} rejected: busy: {busy} GPU(s) run jobs now; challenge again when idle",
                ch.challenge_id,
            )
            .into());
        }
        jobs.benchmarking = true;
    }
    tracing::info!(challenge = %ch.challenge_id, "running a benchmark challenge");
    let with_gpus = !state.gpus.is_empty();
    let cpu_model = state.advert_base.cpu.model.clone();
    let sizes = ch.sizes;
    let nonce = ch.nonce;
    let out = tokio::task::spawn_blocking(move || {
        let discovery = gpu::discover();
        bench::run(
            &BenchOptions::for_challenge(nonce, &sizes, with_gpus),
            &discovery,
            &cpu_model,
        )
    })
    .await;
    if let Ok(mut jobs) = state.jobs.lock() {
        jobs.benchmarking = false;
    }
    let out =
        out.map_err(|e| format!("challenge {}: the benchmark crashed: {e}", ch.challenge_id))?;
    for n in &out.notes {
        tracing::info!(challenge = %ch.challenge_id, "benchmark: {n}");
    }
    let response = ChallengeResponse {
        challenge_id: ch.challenge_id,
        provider: state.provider,
        report: out.report,
        finished_at: UnixMillis::now(),
    };
    Signed::sign(&state.key, response, RESPONSE_TTL_SECS)
        .map(NetResponse::ChallengeResponse)
        .map_err(|e| format!("challenge {}: cannot sign the answer: {e}", ch.challenge_id).into())
}
