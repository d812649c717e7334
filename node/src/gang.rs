//! Gang members on the node: a [`GangOffer`] *reserves* a slot and GPUs
//! (through the same admission checks as an ordinary offer) but starts
//! nothing; a [`GangStart`] starts the container with `KILN_GANG_RANK`,
//! `KILN_GANG_SIZE` and `KILN_GANG_PEERS` set; a [`GangRelease`], a
//! cancellation, a drain, or no start within the offer's hold gives the
//! reservation back. Whoever takes a reservation out of the table decides
//! its fate (start or release), under the job-table lock, so a start that
//! races the hold's expiry either starts the job or is refused — never both.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use kiln_net::Peer;
use kiln_protocol::{
    GangOffer, GangRelease, GangStart, JobId, NetResponse, OfferId, Signed, UnixMillis,
};
use tokio::sync::oneshot;

use crate::{State, admit, launch, reject, unadmit};

/// The longest a node holds a reservation, whatever the offer asks.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(120);
/// Member events kept for inspection.
const HISTORY: usize = 1024;

/// Reservations waiting for their start, and what happened to recent members.
#[derive(Default)]
pub(crate) struct Table {
    held: HashMap<OfferId, Held>,
    history: VecDeque<(JobId, OfferId, MemberEvent)>,
}

struct Held {
    job: JobId,
    go: oneshot::Sender<Go>,
}

enum Go {
    Start,
    Release,
}

/// What happened to one gang member on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    Reserved {
        rank: u32,
        size: u32,
    },
    Started,
    Released(String),
    /// No start came within the hold; released by the node itself.
    Expired,
}

impl fmt::Display for MemberEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reserved { rank, size } => write!(f, "reserved rank {rank} of {size}"),
            Self::Started => f.write_str("started"),
            Self::Released(why) => write!(f, "released: {why}"),
            Self::Expired => f.write_str("expired: no start within the hold"),
        }
    }
}

impl Table {
    fn record(&mut self, job: JobId, offer: OfferId, ev: MemberEvent) {
        if self.history.len() >= HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((job, offer, ev));
    }

    fn last(&self, offer: &OfferId) -> Option<&MemberEvent> {
        self.history
            .iter()
            .rev()
            .find(|(_, o, _)| o == offer)
            .map(|(_, _, e)| e)
    }

    /// Takes a reservation out, recording `ev`; `None` if it is not held
    /// (already started or released by someone else).
    fn take(&mut self, offer: &OfferId, ev: MemberEvent) -> Option<Held> {
        let h = self.held.remove(offer)?;
        self.record(h.job, *offer, ev);
        Some(h)
    }
}

impl crate::Node {
    /// What happened to this node's gang members of `job`, oldest first
    /// (`offer-id: reserved rank 0 of 2`, `…: started`, `…: released: why`).
    pub fn gang_events(&self, job: &JobId) -> Vec<String> {
        self.state
            .jobs
            .lock()
            .map(|j| {
                j.gang
                    .history
                    .iter()
                    .filter(|(jb, _, _)| jb == job)
                    .map(|(_, o, e)| format!("{o}: {e}"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Gang reservations held now (waiting for their start).
    pub fn gang_reservations(&self) -> usize {
        self.state
            .jobs
            .lock()
            .map(|j| j.gang.held.len())
            .unwrap_or(0)
    }
}

/// Checks that a coordinator message came from this node's coordinator and
/// is addressed to this node.
fn from_coordinator<T: kiln_protocol::SignedMessage>(
    state: &State,
    peer: Peer,
    signed: &Signed<T>,
    provider: impl Fn(&T) -> kiln_protocol::ProviderId,
    what: &str,
) -> Result<(), String> {
    let payload = signed
        .verify(UnixMillis::now())
        .map_err(|e| format!("{what} from {peer} rejected: {e}"))?;
    if signed.signer != state.coordinator_key || peer != state.coordinator {
        return Err(format!("{what} rejected: not from this node's coordinator"));
    }
    let to = provider(payload);
    if to != state.provider {
        return Err(format!(
            "{what} rejected: addressed to provider {to}, not this one"
        ));
    }
    Ok(())
}

/// Reserves one member of a gang job; starts nothing.
pub(crate) fn handle_offer(
    state: &Arc<State>,
    peer: Peer,
    signed: &Signed<GangOffer>,
) -> NetResponse {
    if let Err(e) = from_coordinator(state, peer, signed, |g| g.offer.provider, "gang offer") {
        return reject(e);
    }
    let g = signed.payload.clone();
    let short = g.offer.offer_id.short();
    if let Err(e) = g.check_shape() {
        return reject(format!("gang offer {short} rejected: {e}"));
    }
    if let Err(e) = g.offer.spec.validate() {
        return reject(format!("gang offer {short} rejected: invalid spec: {e}"));
    }
    let (rx, gpus, token) = {
        let Ok(mut jobs) = state.jobs.lock() else {
            return reject("internal error: job table poisoned".into());
        };
        if jobs.accepted.contains_key(&g.offer.offer_id) {
            // A retried gang offer: the same answer as the first time.
            return match jobs.gang.last(&g.offer.offer_id) {
                Some(MemberEvent::Reserved { .. } | MemberEvent::Started) => NetResponse::Accepted,
                Some(e) => reject(format!(
                    "gang offer {short} was already reserved and then {e}; not taken again"
                )),
                None => reject(format!(
                    "gang offer {short} reuses the id of an ordinary offer; refused"
                )),
            };
        }
        let gpus = match admit(state, &mut jobs, &g.offer) {
            Ok(p) => p,
            Err(why) => return reject(why),
        };
        let token = jobs
            .running
            .get(&g.offer.job_id)
            .map(|(_, t)| t.clone())
            .unwrap_or_default();
        let (tx, rx) = oneshot::channel();
        jobs.gang.held.insert(
            g.offer.offer_id,
            Held {
                job: g.offer.job_id,
                go: tx,
            },
        );
        jobs.gang.record(
            g.offer.job_id,
            g.offer.offer_id,
            MemberEvent::Reserved {
                rank: g.rank,
                size: g.size,
            },
        );
        (rx, gpus, token)
    };
    let hold = Duration::from_millis(g.hold_ms).min(MAX_HOLD);
    tracing::info!(job = %g.offer.job_id.short(), offer = %short, rank = g.rank, size = g.size, hold_ms = hold.as_millis() as u64, "reserved a gang member; waiting for the start");
    let s = state.clone();
    tokio::spawn(async move {
        let offer_id = g.offer.offer_id;
        let job = g.offer.job_id;
        let mut rx = rx;
        // The hold ran out or the job was cancelled/drained: release it,
        // unless a start or release already took the reservation.
        let timeout = |why: Option<String>| {
            let ev = why.map_or(MemberEvent::Expired, MemberEvent::Released);
            s.jobs
                .lock()
                .ok()
                .and_then(|mut j| j.gang.take(&offer_id, ev))
                .is_some()
        };
        let go = tokio::select! {
            r = &mut rx => r.ok(),
            () = token.cancelled() => {
                if timeout(Some("cancelled on this node".into())) { Some(Go::Release) } else { (&mut rx).await.ok() }
            }
            () = tokio::time::sleep(hold) => {
                if timeout(None) { Some(Go::Release) } else { (&mut rx).await.ok() }
            }
        };
        match go {
            Some(Go::Start) => {
                let mut offer = g.offer.clone();
                for (k, v) in g.env() {
                    offer.spec.env.insert(k, v);
                }
                tracing::info!(job = %job.short(), offer = %offer_id.short(), rank = g.rank, "gang member starting");
                launch(&s, offer, gpus);
            }
            Some(Go::Release) | None => {
                tracing::info!(job = %job.short(), offer = %offer_id.short(), "gang reservation released");
                if let Ok(mut j) = s.jobs.lock() {
                    unadmit(&mut j, &job, &offer_id, &gpus);
                }
            }
        }
    });
    NetResponse::Accepted
}

/// Starts a reserved member.
pub(crate) fn handle_start(
    state: &Arc<State>,
    peer: Peer,
    signed: &Signed<GangStart>,
) -> NetResponse {
    if let Err(e) = from_coordinator(state, peer, signed, |g| g.provider, "gang start") {
        return reject(e);
    }
    let st = &signed.payload;
    let short = st.offer_id.short();
    let Ok(mut jobs) = state.jobs.lock() else {
        return reject("internal error: job table poisoned".into());
    };
    if jobs
        .gang
        .held
        .get(&st.offer_id)
        .is_some_and(|h| h.job != st.job_id)
    {
        return reject(format!(
            "gang start for job {} rejected: offer {short} reserved another job",
            st.job_id.short()
        ));
    }
    if let Some(h) = jobs.gang.take(&st.offer_id, MemberEvent::Started) {
        if h.go.send(Go::Start).is_err() {
            return reject(format!(
                "gang start {short}: the reservation was dropped; not started"
            ));
        }
        return NetResponse::Accepted;
    }
    match jobs.gang.last(&st.offer_id) {
        Some(MemberEvent::Started) => NetResponse::Accepted, // a retried start
        Some(e) => reject(format!(
            "gang start {short} refused: the reservation was already {e}; not started"
        )),
        None => reject(format!(
            "gang start {short} refused: no reservation for this offer on this node"
        )),
    }
}

/// Gives a reservation back (or stops the member if it already started).
pub(crate) fn handle_release(
    state: &Arc<State>,
    peer: Peer,
    signed: &Signed<GangRelease>,
) -> NetResponse {
    if let Err(e) = from_coordinator(state, peer, signed, |g| g.provider, "gang release") {
        return reject(e);
    }
    let r = &signed.payload;
    let Ok(mut jobs) = state.jobs.lock() else {
        return reject("internal error: job table poisoned".into());
    };
    if jobs
        .gang
        .held
        .get(&r.offer_id)
        .is_some_and(|h| h.job != r.job_id)
    {
        return reject(format!(
            "gang release for job {} rejected: offer {} reserved another job",
            r.job_id.short(),
            r.offer_id.short()
        ));
    }
    if let Some(h) = jobs
        .gang
        .take(&r.offer_id, MemberEvent::Released(r.reason.clone()))
    {
        let _ = h.go.send(Go::Release);
        return NetResponse::Accepted;
    }
    if matches!(jobs.gang.last(&r.offer_id), Some(MemberEvent::Started))
        && let Some((offer, token)) = jobs.running.get(&r.job_id)
        && *offer == r.offer_id
    {
        tracing::info!(job = %r.job_id.short(), reason = %r.reason, "gang member released after its start; stopping it");
        token.cancel();
    }
    // Nothing held (already released, expired or never reserved): releasing is idempotent.
    NetResponse::Accepted
}
