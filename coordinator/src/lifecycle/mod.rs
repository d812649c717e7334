//! Driving jobs through their lifecycle: everything that changes a job and
//! talks to its providers, built on the pure model in [`crate::jobs`].
//!
//! | file | what |
//! |---|---|
//! | [`submit`] | a buyer's signed submission: checks, escrow, stored `queued` |
//! | [`place`] | a placed job gets its members and their offers (one plain offer for a job of one; reserve → start all for a gang) |
//! | [`settle`] | the one settlement path: pay a member up to what it earned, conclude a job from its members, requeue or fail |
//! | [`lost`] | a member that will deliver nothing (reported lost, lease expired) |
//! | [`cancel`] | the buyer cancels |
//! | [`expire`] | leases and deadlines, checked every scheduling round |
//! | [`recover`] | after a restart |
//!
//! Each operation exists once, for every job whatever its size. Every state
//! change goes through [`crate::jobs::store`], conditional on the state,
//! attempt and member offer id it was decided from; messages to nodes are
//! sent after the change commits.

pub mod cancel;
pub mod expire;
pub mod lost;
pub mod place;
pub mod recover;
pub mod reexec;
pub mod settle;
pub mod submit;

use std::time::Duration;

use futures::future::join_all;
use kiln_protocol::{CancelJob, GangRelease, NetRequest, NetResponse, Signed};

use crate::AppState;
use crate::db::DbError;
use crate::jobs::model::Reply;
use crate::jobs::{Member, MemberState};

/// Where to dial a member: the addresses its provider advertised when it
/// was placed.
pub(crate) fn addrs_of(m: &Member) -> Vec<kiln_net::Addr> {
    m.listen_addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// Sends one request to a member's node; retries transport errors (every
/// message to a node is idempotent there).
pub(crate) async fn send(state: &AppState, m: &Member, req: NetRequest, tries: u32) -> Reply {
    let mut last = Reply::Unreachable("not sent".into());
    for t in 0..tries.max(1) {
        match state
            .net
            .request(m.provider.peer_id(), addrs_of(m), req.clone())
            .await
        {
            Ok(NetResponse::Accepted) => return Reply::Accepted,
            Ok(NetResponse::Rejected { reason }) => return Reply::Refused(reason),
            Ok(other) => return Reply::Refused(format!("unexpected answer: {other:?}")),
            Err(e) => last = Reply::Unreachable(e.to_string()),
        }
        if t + 1 < tries {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    last
}

/// Signs a message to a node with the coordinator's key.
pub(crate) fn sign<T: kiln_protocol::SignedMessage>(state: &AppState, msg: T) -> Option<Signed<T>> {
    match Signed::sign(&state.key, msg, state.config.offer_ttl.as_secs()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("cannot sign a message to a node: {e}");
            None
        }
    }
}

/// Tells members' nodes to stop (those that may have started) or release
/// (gang members only reserved), in the background: a node that hangs
/// must not hold anything up, and one that never hears it stops by itself
/// (a reservation's hold runs out; a job's timeout kills it).
pub(crate) fn notify(state: &AppState, release: Vec<Member>, stop: Vec<Member>, reason: &str) {
    if release.is_empty() && stop.is_empty() {
        return;
    }
    let (s, reason) = (state.clone(), reason.to_string());
    state.tasks.spawn(async move {
        let state = s;
        let tell = |m: &Member, release: bool| {
            let (state, reason) = (&state, reason.clone());
            let (job_id, offer_id, provider) = (m.job_id, m.offer_id, m.provider);
            let (req, tries) = if release {
                let msg = GangRelease { job_id, offer_id, provider, reason };
                (sign(state, msg).map(NetRequest::GangRelease), 1)
            } else {
                let msg = CancelJob { job_id, offer_id, provider, reason };
                (sign(state, msg).map(NetRequest::Cancel), 3)
            };
            let m = m.clone();
            async move {
                let Some(req) = req else { return };
                if let Reply::Refused(why) | Reply::Unreachable(why) =
                    send(state, &m, req, tries).await
                {
                    tracing::debug!(job = %m.job_id.short(), rank = m.rank, release, "notice not confirmed: {why}");
                }
            }
        };
        let all = release
            .iter()
            .map(|m| tell(m, true))
            .chain(stop.iter().map(|m| tell(m, false)));
        tokio::select! {
            _ = join_all(all) => {}
            () = state.stopping.cancelled() => {}
        }
    });
}

/// Marks members released (`release`: not started, or a single-node offer
/// never confirmed) or stopping (`stop`: may have started; released too if
/// the coordinator never saw it start) in one
/// transaction, then tells their nodes (`gang`: members hold gang
/// reservations, released with a `GangRelease`; a single-node offer is
/// cancelled instead, a no-op on a node that never accepted it).
pub(crate) async fn wind_down(
    state: &AppState,
    gang: bool,
    release: &[Member],
    stop: &[Member],
    reason: &str,
) -> Result<(), DbError> {
    let mut tx = state.db.begin().await?;
    let (mut released, mut stopping) = (Vec::new(), Vec::new());
    for m in release {
        if crate::db::Db::set_member(
            &mut tx,
            &m.offer_id,
            &[MemberState::Offered, MemberState::Reserved],
            MemberState::Released,
            crate::jobs::store::MemberChange {
                reason: Some(reason),
                ..Default::default()
            },
        )
        .await?
        {
            released.push(m.clone());
        }
    }
    for m in stop {
        // One seen to start is stopping (its receipt is still paid); one
        // never seen to start is released (nothing it did is paid), but
        // both are told to stop: a node may have started it regardless.
        let changed = crate::db::Db::set_member(
            &mut tx,
            &m.offer_id,
            &[MemberState::Started],
            MemberState::Stopping,
            crate::jobs::store::MemberChange {
                reason: Some(reason),
                ..Default::default()
            },
        )
        .await?
            || crate::db::Db::set_member(
                &mut tx,
                &m.offer_id,
                &[MemberState::Offered, MemberState::Reserved],
                MemberState::Released,
                crate::jobs::store::MemberChange {
                    reason: Some(reason),
                    ..Default::default()
                },
            )
            .await?;
        if changed {
            stopping.push(m.clone());
        }
    }
    tx.commit().await?;
    if !gang {
        stopping.append(&mut released);
    }
    notify(state, released, stopping, reason);
    Ok(())
}
