//! Reputation from verifiable events only: a beta reputation with
//! forgetting (Jøsang and Ismail's beta reputation system).
//!
//! A provider's record is its evidence of good and bad behaviour, counted
//! only from what the coordinator itself observed or verified: a verified
//! receipt delivered, a job lost or a deadline missed, a capability
//! challenge passed, flagged or failed, a preemption by the machine's owner,
//! a result that a re-execution verified or refuted.
//! Never from anything the provider says about itself.
//!
//! With `g` good and `b` bad evidence, the score is the mean of the
//! Beta(g + 1, b + 1) distribution, `(g + 1) / (g + b + 2)`, scaled to
//! 0..=1000: a newcomer scores 500, and every event moves it less the more
//! evidence there is. Each new event first multiplies the old evidence by
//! [`KEEP_PER_MILLE`]/1000 (forgetting), so the record is about recent
//! behaviour: total evidence saturates near 1/(1 − 0.98) = 50 events, and a
//! provider that reformed is not held to its past forever, nor lives off
//! it. Evidence is kept in thousandths of an event, in integers, so the
//! score is the same on every machine that replays the events.

use serde::{Deserialize, Serialize};

/// Thousandths of the past kept at each new event.
pub const KEEP_PER_MILLE: u64 = 980;
const UNIT: u64 = 1000;

/// Something the coordinator observed or verified about a provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// It delivered a verified receipt for an execution.
    Delivered,
    /// It lost an execution it had accepted (vanished, restarted, gave up).
    Lost,
    /// It stopped an execution because its owner came back (allowed by
    /// policy, but the buyer still waited for nothing).
    Preempted,
    /// It delivered nothing by the execution's deadline.
    MissedDeadline,
    ChallengePassed,
    /// Answered a challenge correctly, but well below what it advertises.
    ChallengeFlagged,
    /// No valid answer to a challenge.
    ChallengeFailed,
    /// A re-execution (or the majority of three) agreed with its result.
    AuditPassed,
    /// The majority of executions disagreed with its result: it was
    /// slashed.
    AuditFailed,
}

impl Event {
    /// (good, bad) evidence of one event, in thousandths.
    pub const fn weight(self) -> (u64, u64) {
        match self {
            Self::Delivered | Self::ChallengePassed => (UNIT, 0),
            Self::AuditPassed => (2 * UNIT, 0),
            Self::AuditFailed => (0, 20 * UNIT),
            Self::Preempted => (0, UNIT / 4),
            Self::Lost => (0, UNIT),
            Self::ChallengeFlagged => (0, 2 * UNIT),
            Self::MissedDeadline => (0, 3 * UNIT),
            Self::ChallengeFailed => (0, 5 * UNIT),
        }
    }
}

/// A provider's evidence, in thousandths of an event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub good: u64,
    pub bad: u64,
}

impl Evidence {
    /// The evidence after `event`: the past, partly forgotten, plus it.
    pub fn after(self, event: Event) -> Self {
        let (g, b) = event.weight();
        let keep = |x: u64| x.saturating_mul(KEEP_PER_MILLE) / 1000;
        Self {
            good: keep(self.good).saturating_add(g),
            bad: keep(self.bad).saturating_add(b),
        }
    }

    /// The score, 0..=1000: `1000 × (g + 1) / (g + b + 2)`.
    pub fn score(self) -> u32 {
        let num = u128::from(self.good) + u128::from(UNIT);
        let den = u128::from(self.good) + u128::from(self.bad) + 2 * u128::from(UNIT);
        u32::try_from(num * 1000 / den).unwrap_or(1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(events: &[Event]) -> Evidence {
        events
            .iter()
            .fold(Evidence::default(), |e, ev| e.after(*ev))
    }

    #[test]
    fn a_newcomer_scores_500_and_events_move_it_the_right_way() {
        use Event::*;
        assert_eq!(
            Evidence::default().score(),
            crate::challenge::REPUTATION_START
        );
        // (events, score)
        let cases: [(&[Event], u32); 6] = [
            (&[Delivered], 666),
            (&[ChallengePassed], 666),
            (&[Preempted], 444),
            (&[Lost], 333),
            (&[ChallengeFlagged], 250),
            (&[ChallengeFailed], 142),
        ];
        for (events, want) in cases {
            assert_eq!(after(events).score(), want, "{events:?}");
        }
    }

    #[test]
    fn one_failure_costs_more_than_one_success_earns_and_the_past_fades() {
        use Event::*;
        let honest = after(&[Delivered; 30]);
        let cheat = after(&[&[Delivered; 29][..], &[ChallengeFailed]].concat());
        assert!(honest.score() > 900, "{}", honest.score());
        assert!(
            cheat.score() < honest.score() - 50,
            "{} {}",
            cheat.score(),
            honest.score()
        );
        // Evidence saturates: 1,000 deliveries weigh about as much as 50.
        let long = after(&[Delivered; 1000]);
        assert!(long.good <= 50 * 1000 + 1000, "{long:?}");
        // A provider that failed long ago and delivered since recovers.
        let reformed = after(&[&[ChallengeFailed; 5][..], &[Delivered; 200]].concat());
        assert!(reformed.score() > 950, "{}", reformed.score());
        // Scores stay within bounds at the extremes.
        assert!(after(&[ChallengeFailed; 500]).score() < 20);
        let best = Evidence {
            good: u64::MAX,
            bad: 0,
        }
        .score();
        assert!((999..=1000).contains(&best), "{best}");
    }
}
