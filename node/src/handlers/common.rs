//! What every handler shares: the one error type ([`HandlerError`]) and its
//! mapping to a [`NetResponse`] ([`respond`]), the job-table lock, and the
//! check that a coordinator message is really from this node's coordinator
//! and for this node.

use std::sync::MutexGuard;

use kiln_net::Peer;
use kiln_protocol::{NetResponse, ProviderId, Signed, SignedMessage, UnixMillis};

use crate::state::{Jobs, State};

/// Why a request was not done.
#[derive(Debug)]
pub(crate) enum HandlerError {
    /// Not acceptable (signature, sender, addressee, shape, capacity, a
    /// retried message already decided): the reason goes back to the peer.
    Refused(String),
    /// Something broke on this node (a poisoned lock, a task not run).
    Internal(&'static str),
}

impl From<String> for HandlerError {
    fn from(reason: String) -> Self {
        Self::Refused(reason)
    }
}

/// The answer to a request: the handler's, or its error as `Rejected`
/// (logged here, so every refusal is logged once and the same way).
pub(crate) fn respond(result: Result<NetResponse, HandlerError>) -> NetResponse {
    match result {
        Ok(r) => r,
        Err(HandlerError::Refused(reason)) => {
            tracing::warn!("{reason}");
            NetResponse::Rejected { reason }
        }
        Err(HandlerError::Internal(what)) => {
            let reason = format!("internal error: {what}");
            tracing::error!("{reason}");
            NetResponse::Rejected { reason }
        }
    }
}

/// The job table, locked.
pub(crate) fn job_table(state: &State) -> Result<MutexGuard<'_, Jobs>, HandlerError> {
    state
        .jobs
        .lock()
        .map_err(|_| HandlerError::Internal("job table poisoned"))
}

/// Checks that a coordinator message came from this node's coordinator
/// (transport peer and signer), is unexpired, and is addressed to this node
/// (`provider` reads the addressee out of the payload).
pub(crate) fn from_coordinator<'a, T: SignedMessage>(
    state: &State,
    peer: Peer,
    signed: &'a Signed<T>,
    provider: impl Fn(&T) -> ProviderId,
    what: &str,
) -> Result<&'a T, HandlerError> {
    let payload = signed
        .verify(UnixMillis::now())
        .map_err(|e| format!("{what} from {peer} rejected: {e}"))?;
    if signed.signer != state.coordinator_key || peer != state.coordinator {
        return Err(format!("{what} rejected: not from this node's coordinator").into());
    }
    let to = provider(payload);
    if to != state.provider {
        return Err(format!("{what} rejected: addressed to provider {to}, not this one").into());
    }
    Ok(payload)
}
