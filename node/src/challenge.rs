//! Answers a coordinator's benchmark [`Challenge`]: checks that it comes
//! from this node's coordinator, is addressed here and is not past its
//! deadline; runs the benchmark on the challenge's nonce and sizes (no offer
//! is taken meanwhile); and returns the signed [`ChallengeResponse`].

use std::sync::Arc;

use kiln_net::Peer;
use kiln_protocol::{Challenge, ChallengeResponse, NetResponse, Signed, UnixMillis};

use crate::bench::{self, BenchOptions};
use crate::{State, gpu, reject};

/// How long a signed response stays valid.
const RESPONSE_TTL_SECS: u64 = 600;

/// The whole exchange; the caller sends the answer back on the request.
pub(crate) async fn handle(
    state: Arc<State>,
    peer: Peer,
    signed: Signed<Challenge>,
) -> NetResponse {
    let ch = match signed.verify(UnixMillis::now()) {
        Ok(c) => c.clone(),
        Err(e) => return reject(format!("challenge from {peer} rejected: {e}")),
    };
    if signed.signer != state.coordinator_key || peer != state.coordinator {
        return reject(format!(
            "challenge {} rejected: not from this node's coordinator",
            ch.challenge_id
        ));
    }
    if ch.provider != state.provider {
        return reject(format!(
            "challenge {} rejected: addressed to provider {}, not this one",
            ch.challenge_id, ch.provider
        ));
    }
    if let Err(e) = ch.sizes.validate() {
        return reject(format!("challenge {} rejected: {e}", ch.challenge_id));
    }
    let now = UnixMillis::now();
    if ch.deadline <= now {
        return reject(format!(
            "challenge {} rejected: its deadline {} ms has passed (now {} ms)",
            ch.challenge_id, ch.deadline.0, now.0
        ));
    }
    {
        let Ok(mut jobs) = state.jobs.lock() else {
            return reject("internal error: job table poisoned".into());
        };
        if jobs.benchmarking {
            return reject(format!(
                "challenge {} rejected: another challenge is running",
                ch.challenge_id
            ));
        }
        if !jobs.busy_gpus.is_empty() {
            return reject(format!(
                "challenge {} rejected: busy: {} GPU(s) run jobs now; challenge again when idle",
                ch.challenge_id,
                jobs.busy_gpus.len()
            ));
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
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            return reject(format!(
                "challenge {}: the benchmark crashed: {e}",
                ch.challenge_id
            ));
        }
    };
    for n in &out.notes {
        tracing::info!(challenge = %ch.challenge_id, "benchmark: {n}");
    }
    let response = ChallengeResponse {
        challenge_id: ch.challenge_id,
        provider: state.provider,
        report: out.report,
        finished_at: UnixMillis::now(),
    };
    match Signed::sign(&state.key, response, RESPONSE_TTL_SECS) {
        Ok(s) => NetResponse::ChallengeResponse(s),
        Err(e) => reject(format!(
            "challenge {}: cannot sign the answer: {e}",
            ch.challenge_id
        )),
    }
}
