//! Gang members on the node: the reservation table.
//!
//! A [`GangOffer`](kiln_protocol::GangOffer) *reserves* a slot and GPUs
//! (through the same admission as an ordinary offer) but starts nothing; a
//! `GangStart` starts the container, and a `GangRelease`, a cancellation, a
//! drain, or no start within the offer's hold gives the reservation back
//! (the handlers are in `handlers/gang_*.rs`).
//!
//! The race that matters is a start arriving as the hold expires. It is
//! settled here: whoever *takes* a reservation out of [`Table`] (under the
//! job-table lock) decides its fate and tells the waiting task through its
//! one-shot [`Go`]. Everyone else finds it gone and answers from the
//! history, so a late start is refused, never half-applied.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use kiln_protocol::{JobId, OfferId};
use tokio::sync::oneshot;

/// The longest a node holds a reservation, whatever the offer asks.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(120);
/// Member events kept for inspection (and for answering retried messages).
const HISTORY: usize = 1024;

/// Reservations waiting for their start, and what happened to recent members.
#[derive(Default)]
pub(crate) struct Table {
    held: HashMap<OfferId, Held>,
    history: VecDeque<(JobId, OfferId, MemberEvent)>,
}

/// One reservation: the job it is for, and the channel to the task holding it.
pub(crate) struct Held {
    pub(crate) job: JobId,
    pub(crate) go: oneshot::Sender<Go>,
}

/// The fate of a reservation, sent to the task holding it.
pub(crate) enum Go {
    Start,
    Release,
}

/// What happened to one gang member on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MemberEvent {
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

    /// Holds a reservation for `offer`; the receiver learns its fate.
    pub(crate) fn reserve(
        &mut self,
        job: JobId,
        offer: OfferId,
        rank: u32,
        size: u32,
    ) -> oneshot::Receiver<Go> {
        let (go, rx) = oneshot::channel();
        self.held.insert(offer, Held { job, go });
        self.record(job, offer, MemberEvent::Reserved { rank, size });
        rx
    }

    /// The job `offer` holds a reservation for, if it is held.
    pub(crate) fn held_job(&self, offer: &OfferId) -> Option<JobId> {
        self.held.get(offer).map(|h| h.job)
    }

    /// The last thing that happened to `offer`'s member, if anything.
    pub(crate) fn last(&self, offer: &OfferId) -> Option<&MemberEvent> {
        self.history
            .iter()
            .rev()
            .find(|(_, o, _)| o == offer)
            .map(|(_, _, e)| e)
    }

    /// Takes a reservation out, recording `ev`; `None` if it is not held
    /// (already started or released by someone else).
    pub(crate) fn take(&mut self, offer: &OfferId, ev: MemberEvent) -> Option<Held> {
        let h = self.held.remove(offer)?;
        self.record(h.job, *offer, ev);
        Some(h)
    }

    /// `offer-id: event` lines for `job`, oldest first.
    pub(crate) fn events(&self, job: &JobId) -> Vec<String> {
        self.history
            .iter()
            .filter(|(jb, _, _)| jb == job)
            .map(|(_, o, e)| format!("{o}: {e}"))
            .collect()
    }

    /// Reservations held now.
    pub(crate) fn held_count(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn whoever_takes_a_reservation_decides_and_later_takers_find_it_gone() {
        let mut t = Table::default();
        let (job, offer) = (JobId::random(), OfferId::random());
        let mut rx = t.reserve(job, offer, 1, 2);
        assert_eq!(t.held_job(&offer), Some(job));
        assert_eq!(t.held_count(), 1);
        // The hold expires first: a start racing it finds nothing to take.
        let h = t.take(&offer, MemberEvent::Expired).unwrap();
        assert!(h.go.send(Go::Release).is_ok());
        assert!(t.take(&offer, MemberEvent::Started).is_none());
        assert!(matches!(rx.try_recv(), Ok(Go::Release)));
        assert_eq!(t.last(&offer), Some(&MemberEvent::Expired));
        assert_eq!(t.held_count(), 0);
        assert_eq!(
            t.events(&job),
            vec![
                format!("{offer}: reserved rank 1 of 2"),
                format!("{offer}: expired: no start within the hold")
            ]
        );
    }
}
