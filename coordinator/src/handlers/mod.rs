//! Answering providers: one file per wire message, one error type, and
//! one place ([`respond`]) where errors become [`NetResponse`]s.
//!
//! | message | file |
//! |---|---|
//! | `Register` (signed advert, every heartbeat) | [`register`] |
//! | `Result` (signed receipt + outputs) | [`result`] |
//! | `Usage` (signed usage report) | [`usage`] |
//! | `Lost` (signed lost-job report) | [`lost`] |
//! | `Stake` (signed bond target) | [`stake`] |
//! | `MayFetch` (may this peer have that cached input?) | [`may_fetch`] |
//!
//! Each request is answered on its own tracked task: a large result must
//! not hold up registrations behind it.

pub mod lost;
pub mod may_fetch;
pub mod register;
pub mod result;
pub mod stake;
pub mod usage;

use kiln_net::{NetEvent, Peer};
use kiln_protocol::{JobId, NetRequest, NetResponse, OfferId, ProviderId, Signed, UnixMillis};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::bank::BankError;
use crate::db::DbError;
use crate::jobs::{JobRecord, Member};

/// Why a request was not simply accepted.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Refused for good: the reason tells the node what was wrong.
    #[error("{0}")]
    Refused(String),
    /// Sound so far but not accepted yet: send it again.
    #[error("{0}")]
    Retry(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Bank(#[from] BankError),
}

pub type Handled = Result<(), HandlerError>;

pub(crate) fn refuse(reason: impl Into<String>) -> HandlerError {
    HandlerError::Refused(reason.into())
}

/// The one mapping from a handler's outcome to the wire.
pub fn respond(outcome: Handled) -> NetResponse {
    match outcome {
        Ok(()) => NetResponse::Accepted,
        Err(HandlerError::Refused(reason)) => NetResponse::Rejected { reason },
        Err(HandlerError::Retry(reason)) => NetResponse::Retry { reason },
        // Our own failure: the node keeps what it has and tries again.
        Err(e @ (HandlerError::Db(_) | HandlerError::Bank(_))) => {
            tracing::error!("answering a provider failed: {e}");
            NetResponse::Retry {
                reason: format!("the coordinator could not take this now ({e}); try again"),
            }
        }
    }
}

/// Receives network events until cancelled.
pub async fn handle_network(
    state: AppState,
    mut events: mpsc::Receiver<NetEvent>,
    cancel: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            () = cancel.cancelled() => break,
            ev = events.recv() => match ev { Some(ev) => ev, None => break },
        };
        match ev {
            NetEvent::Request {
                peer,
                request,
                reply,
            } => {
                let s = state.clone();
                state.tasks.spawn(async move {
                    let response = respond(answer(&s, peer, request).await);
                    if let NetResponse::Rejected { reason } = &response {
                        tracing::warn!(%peer, "rejected: {reason}");
                    }
                    let _ = reply.send(response);
                });
            }
            NetEvent::Advert { from, advert } => {
                if let Err(e) = advert.verify(UnixMillis::now()) {
                    tracing::debug!(%from, "ignoring gossiped advert: {e}");
                }
            }
            NetEvent::Connected(_) | NetEvent::Disconnected(_) => {}
        }
    }
}

async fn answer(state: &AppState, peer: Peer, request: NetRequest) -> Handled {
    let peer = ProviderId::from_peer_id(peer);
    match request {
        NetRequest::Register(advert) => register::handle(state, peer, &advert).await,
        NetRequest::Result(result) => result::handle(state, peer, *result).await,
        NetRequest::Lost(lost) => lost::handle(state, peer, &lost).await,
        NetRequest::Usage(report) => usage::handle(state, peer, &report).await,
        NetRequest::Stake(req) => stake::handle(state, peer, &req).await,
        NetRequest::MayFetch { peer: asker, cid } => {
            may_fetch::handle(state, peer, asker, cid).await
        }
        NetRequest::Offer(_)
        | NetRequest::Cancel(_)
        | NetRequest::Challenge(_)
        | NetRequest::GangOffer(_)
        | NetRequest::GangStart(_)
        | NetRequest::GangRelease(_)
        | NetRequest::TailLogs(_) => Err(refuse(
            "a coordinator does not take offers, starts, releases, challenges, cancellations or log requests",
        )),
    }
}

/// Checks a provider's signed statement about one member of a job: the
/// signature and expiry, that the sender is the signer, that the member
/// (found by the offer id the statement names) belongs to the job it
/// names, and that it is assigned to the signer.
pub(crate) async fn member_statement<T: kiln_protocol::SignedMessage>(
    state: &AppState,
    peer: ProviderId,
    signed: &Signed<T>,
    what: &str,
    ids: impl Fn(&T) -> (JobId, OfferId),
) -> Result<(JobRecord, Member), HandlerError> {
    let payload = signed
        .verify(UnixMillis::now())
        .map_err(|e| refuse(format!("{what} refused: {e}")))?;
    let (job_id, offer_id) = ids(payload);
    let signer = ProviderId::from_public_key(&signed.signer);
    let (Some(job), Some(m)) = (
        state.db.job(&job_id).await?,
        state.db.member(&offer_id).await?,
    ) else {
        return Err(refuse(format!(
            "{what} for job {job_id}, offer {offer_id}: no such job or offer"
        )));
    };
    if m.job_id != job.id || signer != peer || m.provider != signer {
        return Err(refuse(format!(
            "{what} for job {} refused: not from the provider holding offer {}",
            job.id,
            offer_id.short()
        )));
    }
    Ok((job, m))
}
