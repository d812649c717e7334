//! Requests from peers, one file per message, and the loop that answers them.
//!
//! | request | file | what it does |
//! |---|---|---|
//! | `Offer` | `offer.rs` | check, admit, launch a one-node job |
//! | `Cancel` | `cancel.rs` | stop one attempt |
//! | `GangOffer` | `gang_offer.rs` | reserve a gang member (starts nothing) |
//! | `GangStart` | `gang_start.rs` | start a reserved member |
//! | `GangRelease` | `gang_release.rs` | give a reservation back / stop a member |
//! | `Challenge` | `challenge.rs` | run a benchmark audit, answer signed |
//! | `TailLogs` | `tail_logs.rs` | what a running job has written so far |
//! | (`/kiln/blobs/1`) | `may_fetch.rs` | who may fetch which blob from here |
//!
//! A handler returns `Result<NetResponse, HandlerError>`; [`common::respond`]
//! turns the error into `Rejected` with its reason, and logs it, in one
//! place. Messages only a coordinator accepts are refused here.

mod cancel;
mod challenge;
pub(crate) mod common;
mod gang_offer;
mod gang_release;
mod gang_start;
pub(crate) mod may_fetch;
mod offer;
mod tail_logs;

use std::sync::Arc;

use kiln_net::{NetEvent, Peer};
use kiln_protocol::{NetRequest, NetResponse};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::state::State;
use common::{HandlerError, respond};

/// Answers requests from `events` until `cancel` fires or the network stops.
pub(crate) async fn serve(
    state: Arc<State>,
    mut events: mpsc::Receiver<NetEvent>,
    cancel: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            () = cancel.cancelled() => break,
            ev = events.recv() => match ev { Some(ev) => ev, None => break },
        };
        let NetEvent::Request {
            peer,
            request,
            reply,
        } = ev
        else {
            continue;
        };
        if let NetRequest::Challenge(ch) = request {
            // Takes seconds: answered from its own task, so offers and
            // cancels are not kept waiting behind it.
            let s = state.clone();
            state.tasks.spawn(async move {
                let _ = reply.send(respond(challenge::handle(&s, peer, ch).await));
            });
            continue;
        }
        let _ = reply.send(respond(dispatch(&state, peer, request)));
    }
}

fn dispatch(
    state: &Arc<State>,
    peer: Peer,
    request: NetRequest,
) -> Result<NetResponse, HandlerError> {
    match request {
        NetRequest::Offer(o) => offer::handle(state, peer, &o),
        NetRequest::Cancel(c) => cancel::handle(state, peer, &c),
        NetRequest::GangOffer(o) => gang_offer::handle(state, peer, &o),
        NetRequest::GangStart(g) => gang_start::handle(state, peer, &g),
        NetRequest::GangRelease(g) => gang_release::handle(state, peer, &g),
        NetRequest::TailLogs(t) => tail_logs::handle(state, peer, &t),
        // Answered from its own task by `serve`.
        NetRequest::Challenge(_) => Err(HandlerError::Internal("challenge not dispatched")),
        NetRequest::Register(_)
        | NetRequest::Result(_)
        | NetRequest::Lost(_)
        | NetRequest::Usage(_)
        | NetRequest::Stake(_)
        | NetRequest::MayFetch { .. } => Err(HandlerError::Refused(format!(
            "peer {peer} sent a request only a coordinator accepts"
        ))),
    }
}
