//! The job model, pure: what states a job and its member executions can be
//! in, which changes between them are allowed, and what a job's members add
//! up to. No I/O here: [`super::store`] applies these decisions to the
//! database, conditional on the state (and attempt, and member offer id)
//! they were taken from.
//!
//! A job has `k >= 1` **members** per attempt: one execution on one
//! provider, with its own offer id, rank, price, state, observed start and
//! receipt. A single-node job is a gang of one. Every execution Kiln adds
//! later (a verifier's re-run, a tie-breaker) is one more member.

use kiln_protocol::{Outcome, ProviderId};

pub use kiln_protocol::views::{JobState, MemberState, Role};

/// Position within one attempt: a job only moves forward in it, or starts
/// a new attempt from the queue ([`Step::Requeue`]).
#[cfg(test)]
fn job_order(s: JobState) -> u8 {
    match s {
        JobState::Queued => 0,
        JobState::Dispatched => 1,
        JobState::Running => 2,
        JobState::Cancelling | JobState::Verifying => 3,
        _ => 4,
    }
}

#[cfg(test)]
fn member_order(s: MemberState) -> u8 {
    match s {
        MemberState::Offered => 0,
        MemberState::Reserved => 1,
        MemberState::Started => 2,
        MemberState::Stopping => 3,
        MemberState::Released | MemberState::Delivered => 4,
    }
}

/// What kind of change a transition is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Forward within the current attempt.
    Forward,
    /// The current attempt ended without a result; the job waits for a new
    /// one (the next placement counts another attempt).
    Requeue,
}

/// The transition table: `Some(step)` when a job may move `from` → `to`.
/// Everything not listed is refused, so no caller can move a job backwards
/// or out of a terminal state.
pub fn step(from: JobState, to: JobState) -> Option<Step> {
    use JobState::*;
    match (from, to) {
        // Placed; cancelled or expired while waiting.
        (Queued, Dispatched | Cancelled | Failed) => Some(Step::Forward),
        // All members started; a dispatch that failed or was lost requeues.
        (Dispatched, Running) => Some(Step::Forward),
        (Dispatched | Running, Queued) => Some(Step::Requeue),
        // Cancelled by the buyer: at once if nothing started, else stopping.
        (Dispatched, Cancelled) | (Dispatched | Running, Cancelling) => Some(Step::Forward),
        // Results (all members delivered), failures, deadlines.
        (Dispatched | Running | Cancelling, Completed | Failed | TimedOut | Cancelled) => {
            Some(Step::Forward)
        }
        // A sampled result is held while it is re-executed elsewhere; the
        // comparison ends it (failed only when nothing can be paid for).
        (Running, Verifying) | (Verifying, Completed | Failed) => Some(Step::Forward),
        _ => None,
    }
}

/// The member transition table. A member never moves backwards: a new
/// attempt gets new members (new offer ids).
pub fn member_step(from: MemberState, to: MemberState) -> bool {
    use MemberState::*;
    matches!(
        (from, to),
        (Offered, Reserved | Started | Released)
            | (Reserved, Started | Released)
            // A member seen to start is stopped, not released: its receipt
            // is still expected and paid. One never seen to start has no
            // pay clock, so it can only be released.
            | (Started, Stopping)
            | (Started | Stopping, Released | Delivered)
    )
}

pub fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::TimedOut => "timed_out",
        Outcome::Cancelled => "cancelled",
    }
}

pub fn outcome_from(s: &str) -> Option<Outcome> {
    Some(match s {
        "succeeded" => Outcome::Succeeded,
        "failed" => Outcome::Failed,
        "timed_out" => Outcome::TimedOut,
        "cancelled" => Outcome::Cancelled,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Decisions over a job's members
// ---------------------------------------------------------------------------

/// A member's answer to an offer or a start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Accepted,
    Refused(String),
    /// No answer: a transport error or timeout (the node may or may not
    /// have received the message).
    Unreachable(String),
}

/// What to do once every member answered its (gang) offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveVerdict {
    StartAll,
    /// Release every member (those that refused too: releasing is
    /// idempotent, and one that timed out may have reserved after all).
    ReleaseAll {
        reason: String,
    },
}

/// Who a member is in messages: `rank 1 (provider 12D3…)`, or just
/// `provider …` for a job of one.
pub fn who(rank: u32, size: usize, provider: &ProviderId) -> String {
    if size <= 1 {
        format!("provider {}", provider.short())
    } else {
        format!("gang member rank {rank} (provider {})", provider.short())
    }
}

/// Why members failed, one clause per member.
fn failures(replies: &[Reply], providers: &[ProviderId]) -> Vec<String> {
    replies
        .iter()
        .zip(providers)
        .enumerate()
        .filter_map(|(rank, (r, p))| {
            let who = who(rank as u32, providers.len(), p);
            match r {
                Reply::Accepted => None,
                Reply::Refused(why) => Some(format!("{who} refused: {why}")),
                Reply::Unreachable(why) => Some(format!("{who} did not answer: {why}")),
            }
        })
        .collect()
}

/// All reserved: start. Anything else: release all.
pub fn after_reserve(replies: &[Reply], providers: &[ProviderId]) -> ReserveVerdict {
    if replies.is_empty() || replies.len() != providers.len() {
        return ReserveVerdict::ReleaseAll {
            reason: "a job with no members".into(),
        };
    }
    let failed = failures(replies, providers);
    if failed.is_empty() {
        ReserveVerdict::StartAll
    } else {
        ReserveVerdict::ReleaseAll {
            reason: format!(
                "{}; released the other members, nothing started",
                failed.join("; ")
            ),
        }
    }
}

/// What to do once every member answered its start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartVerdict {
    Running,
    /// Some did not start: stop the ranks in `stop` (they may have), release
    /// the rest, requeue.
    Abort {
        stop: Vec<u32>,
        reason: String,
    },
}

/// Every start accepted: running. Otherwise stop every member that might
/// have started (accepted, or no answer) and requeue.
pub fn after_start(replies: &[Reply], providers: &[ProviderId]) -> StartVerdict {
    let failed = failures(replies, providers);
    if failed.is_empty() && !replies.is_empty() {
        return StartVerdict::Running;
    }
    let stop = replies
        .iter()
        .enumerate()
        .filter(|(_, r)| !matches!(r, Reply::Refused(_)))
        .map(|(rank, _)| rank as u32)
        .collect();
    StartVerdict::Abort {
        stop,
        reason: format!("{} at start; stopped the others", failed.join("; ")),
    }
}

/// A member as [`after_results`] sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub state: MemberState,
    pub outcome: Option<Outcome>,
    pub reason: Option<String>,
}

/// What a job's members' results add up to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobVerdict {
    /// Results still to come.
    Wait,
    /// A member failed: stop these ranks (still running), then wait.
    Stop { ranks: Vec<u32>, reason: String },
    /// Every member is done: the job ends in this state.
    Done {
        state: JobState,
        reason: Option<String>,
    },
}

/// The job completes when every member succeeded; the first member to fail
/// (by severity: failed, timed out, cancelled; then rank) decides it, and
/// members still running are stopped. A member released without a result
/// ends the job as `released_as` (cancelled for a stopped job, failed
/// when it vanished or missed its deadline).
pub fn after_results(members: &[Seen], released_as: JobState) -> JobVerdict {
    let severity = |o: Outcome| match o {
        Outcome::Failed => 0,
        Outcome::TimedOut => 1,
        Outcome::Cancelled => 2,
        Outcome::Succeeded => 3,
    };
    let label = |rank: usize| {
        if members.len() > 1 {
            format!("gang member rank {rank}: ")
        } else {
            String::new()
        }
    };
    let worst = members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.state == MemberState::Delivered)
        .filter_map(|(rank, m)| m.outcome.map(|o| (severity(o), rank, o, m.reason.clone())))
        .filter(|(_, _, o, _)| *o != Outcome::Succeeded)
        .min_by_key(|(s, rank, _, _)| (*s, *rank));
    let pending = members.iter().any(|m| m.state.pending());
    let released = members
        .iter()
        .enumerate()
        .find(|(_, m)| m.state == MemberState::Released);
    if !pending {
        return match (worst, released) {
            (Some((_, rank, o, why)), _) => JobVerdict::Done {
                state: JobState::of_outcome(o),
                reason: Some(format!(
                    "{}{}",
                    label(rank),
                    why.unwrap_or_else(|| outcome_str(o).into())
                )),
            },
            (None, Some((rank, m))) => JobVerdict::Done {
                state: released_as,
                reason: Some(format!(
                    "{}{}",
                    label(rank),
                    m.reason
                        .clone()
                        .unwrap_or_else(|| "ended without a result".into())
                )),
            },
            (None, None) => JobVerdict::Done {
                state: JobState::Completed,
                reason: None,
            },
        };
    }
    match worst {
        Some((_, rank, o, why)) => {
            let ranks: Vec<u32> = members
                .iter()
                .enumerate()
                .filter(|(_, m)| matches!(m.state, MemberState::Started | MemberState::Reserved))
                .map(|(r, _)| r as u32)
                .collect();
            if ranks.is_empty() {
                JobVerdict::Wait
            } else {
                JobVerdict::Stop {
                    ranks,
                    reason: format!(
                        "gang member rank {rank} {}: {}; stopping the others",
                        outcome_str(o),
                        why.unwrap_or_default()
                    ),
                }
            }
        }
        None => JobVerdict::Wait,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kiln_protocol::Keypair;

    fn ids(n: usize) -> Vec<ProviderId> {
        (0..n)
            .map(|_| ProviderId::from_public_key(&Keypair::generate().public()))
            .collect()
    }

    #[test]
    fn the_job_table_has_no_backward_step() {
        for from in JobState::ALL {
            for to in JobState::ALL {
                match step(from, to) {
                    None => {}
                    Some(Step::Forward) => assert!(
                        job_order(to) > job_order(from),
                        "{from} -> {to} is called forward but goes back"
                    ),
                    // Back to the queue only as a new attempt, and never
                    // once the buyer cancelled or the job ended.
                    Some(Step::Requeue) => {
                        assert_eq!(to, JobState::Queued);
                        assert!(matches!(from, JobState::Dispatched | JobState::Running));
                    }
                }
                if from.is_terminal() {
                    assert_eq!(step(from, to), None, "{from} is terminal");
                }
            }
        }
        // A cancelled running job never shows running (or queued) again.
        for to in [JobState::Running, JobState::Queued, JobState::Dispatched] {
            assert_eq!(step(JobState::Cancelling, to), None);
        }
    }

    #[test]
    fn the_job_table_lists_every_way_a_job_moves() {
        use JobState::*;
        let allowed = [
            (Queued, Dispatched),
            (Queued, Cancelled),
            (Queued, Failed),
            (Dispatched, Running),
            (Dispatched, Queued),
            (Running, Queued),
            (Dispatched, Cancelled),
            (Running, Cancelling),
            (Dispatched, Cancelling),
            (Running, Completed),
            (Running, Failed),
            (Running, TimedOut),
            (Dispatched, Completed),
            (Cancelling, Cancelled),
            (Cancelling, Completed),
            (Cancelling, Failed),
            (Running, Verifying),
            (Verifying, Completed),
            (Verifying, Failed),
        ];
        for (f, t) in allowed {
            assert!(step(f, t).is_some(), "{f} -> {t} must be allowed");
        }
        let refused = [
            (Queued, Running),
            (Queued, Completed),
            (Cancelling, Running),
            (Cancelling, Queued),
            (Completed, Queued),
            (Cancelled, Running),
            (Running, Dispatched),
            (Verifying, Queued),
            (Verifying, Running),
            (Verifying, Cancelling),
            (Cancelling, Verifying),
            (Dispatched, Verifying),
        ];
        for (f, t) in refused {
            assert!(step(f, t).is_none(), "{f} -> {t} must be refused");
        }
    }

    #[test]
    fn members_never_go_back() {
        for from in MemberState::ALL {
            for to in MemberState::ALL {
                if member_step(from, to) {
                    assert!(member_order(to) > member_order(from), "{from} -> {to}");
                }
            }
            assert!(!member_step(MemberState::Delivered, from));
            assert!(!member_step(MemberState::Released, from));
        }
    }

    #[test]
    fn states_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
        }
        for s in MemberState::ALL {
            assert_eq!(s.as_str().parse::<MemberState>().unwrap(), s);
        }
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("started".parse::<JobState>().is_err());
        for o in [
            Outcome::Succeeded,
            Outcome::Failed,
            Outcome::TimedOut,
            Outcome::Cancelled,
        ] {
            assert_eq!(outcome_from(outcome_str(o)), Some(o));
        }
    }

    #[test]
    fn reserve_starts_only_when_every_member_accepted() {
        use Reply::*;
        let cases: Vec<(Vec<Reply>, Option<&str>)> = vec![
            (vec![Accepted], None),
            (vec![Accepted, Accepted, Accepted, Accepted], None),
            (
                vec![Accepted, Refused("all 2 slots busy".into())],
                Some("rank 1 (provider"),
            ),
            (
                vec![Unreachable("dial failed".into()), Accepted],
                Some("rank 0 (provider"),
            ),
            (
                vec![Refused("owner busy".into()), Unreachable("timeout".into())],
                Some("did not answer: timeout"),
            ),
            (vec![Refused("busy".into())], Some("provider")),
            (vec![], Some("no members")),
        ];
        for (replies, want) in cases {
            let p = ids(replies.len());
            match (want, after_reserve(&replies, &p)) {
                (None, ReserveVerdict::StartAll) => {}
                (Some(w), ReserveVerdict::ReleaseAll { reason }) => {
                    assert!(reason.contains(w), "{replies:?}: {reason}");
                }
                (w, v) => panic!("{replies:?}: wanted {w:?}, got {v:?}"),
            }
        }
    }

    #[test]
    fn a_failed_start_stops_every_member_that_may_have_started() {
        use Reply::*;
        let cases: Vec<(Vec<Reply>, Option<Vec<u32>>)> = vec![
            (vec![Accepted, Accepted], None),
            (vec![Accepted, Refused("released".into())], Some(vec![0])),
            (vec![Accepted, Unreachable("gone".into())], Some(vec![0, 1])),
            (vec![Refused("a".into()), Refused("b".into())], Some(vec![])),
        ];
        for (replies, want) in cases {
            match (want, after_start(&replies, &ids(replies.len()))) {
                (None, StartVerdict::Running) => {}
                (Some(w), StartVerdict::Abort { stop, reason }) => {
                    assert_eq!(stop, w, "{replies:?}");
                    assert!(reason.contains("at start"), "{reason}");
                }
                (w, v) => panic!("{replies:?}: wanted {w:?}, got {v:?}"),
            }
        }
    }

    fn seen(state: MemberState, outcome: Option<Outcome>) -> Seen {
        Seen {
            state,
            outcome,
            reason: outcome
                .filter(|o| *o != Outcome::Succeeded)
                .map(|o| format!("{o:?} here"))
                .or_else(|| (state == MemberState::Released).then(|| "gone".into())),
        }
    }

    #[test]
    fn results_complete_fail_or_stop_the_job() {
        use MemberState::*;
        use Outcome::*;
        let ok = seen(Delivered, Some(Succeeded));
        let failed = seen(Delivered, Some(Failed));
        let cancelled = seen(Delivered, Some(Cancelled));
        let timed_out = seen(Delivered, Some(TimedOut));
        let running = seen(Started, None);
        let stopping = seen(Stopping, None);
        let released = seen(Released, None);
        let done = |state, reason: Option<&str>| JobVerdict::Done {
            state,
            reason: reason.map(str::to_string),
        };
        let cases: Vec<(&str, Vec<Seen>, JobVerdict)> = vec![
            (
                "one member succeeded",
                vec![ok.clone()],
                done(JobState::Completed, None),
            ),
            (
                "one member failed",
                vec![failed.clone()],
                done(JobState::Failed, Some("Failed here")),
            ),
            (
                "one member still running",
                vec![running.clone()],
                JobVerdict::Wait,
            ),
            (
                "one member lost",
                vec![released.clone()],
                done(JobState::Failed, Some("gone")),
            ),
            (
                "all succeeded",
                vec![ok.clone(), ok.clone()],
                done(JobState::Completed, None),
            ),
            (
                "one still running",
                vec![ok.clone(), running.clone()],
                JobVerdict::Wait,
            ),
            (
                "reserved, not yet started",
                vec![ok.clone(), seen(Reserved, None)],
                JobVerdict::Wait,
            ),
            (
                "one failed, one running: stop it",
                vec![running.clone(), failed.clone()],
                JobVerdict::Stop {
                    ranks: vec![0],
                    reason: "gang member rank 1 failed: Failed here; stopping the others".into(),
                },
            ),
            (
                "one failed, the other stopping",
                vec![stopping.clone(), failed.clone()],
                JobVerdict::Wait,
            ),
            (
                "failed beats the cancellation it caused",
                vec![cancelled.clone(), failed.clone()],
                done(JobState::Failed, Some("gang member rank 1: Failed here")),
            ),
            (
                "timed out beats cancelled",
                vec![cancelled.clone(), timed_out.clone(), ok.clone()],
                done(
                    JobState::TimedOut,
                    Some("gang member rank 1: TimedOut here"),
                ),
            ),
            (
                "a member released before it ran",
                vec![ok.clone(), released.clone()],
                done(JobState::Failed, Some("gang member rank 1: gone")),
            ),
        ];
        for (name, members, want) in cases {
            assert_eq!(after_results(&members, JobState::Failed), want, "{name}");
        }
        assert_eq!(
            after_results(&[released], JobState::Cancelled),
            done(JobState::Cancelled, Some("gone"))
        );
    }
}
