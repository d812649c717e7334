//! A provider's verified track record, BOINC style: the number of
//! consecutive results that passed an audit. A pass adds one, a failure
//! resets it to zero, and an audit that settled nothing (no majority, the
//! job is nondeterministic) leaves it as it was. Results that were not
//! audited do not count: trust comes only from verified events.

use serde::{Deserialize, Serialize};

use super::decision::{AuditPolicy, Ppm};

/// What an audit said about one provider's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    /// The re-execution (or the majority) agreed with its output.
    Passed,
    /// The majority disagreed with its output: it is slashed.
    Failed,
    /// No majority: nothing is known about it.
    Inconclusive,
}

/// Consecutive verified results since the last failure (`CV`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct TrustState {
    pub consecutive_verified: u32,
}

impl TrustState {
    /// A provider with no verified results yet.
    pub const NEW: Self = Self {
        consecutive_verified: 0,
    };

    pub const fn new(consecutive_verified: u32) -> Self {
        Self {
            consecutive_verified,
        }
    }

    /// The state after an audit of one of its results.
    #[must_use]
    pub const fn after(self, outcome: AuditOutcome) -> Self {
        match outcome {
            AuditOutcome::Passed => self.after_pass(),
            AuditOutcome::Failed => self.after_failure(),
            AuditOutcome::Inconclusive => self,
        }
    }

    /// One more verified result.
    #[must_use]
    pub const fn after_pass(self) -> Self {
        Self {
            consecutive_verified: self.consecutive_verified.saturating_add(1),
        }
    }

    /// A failed verification: back to a new provider's standing.
    #[must_use]
    pub const fn after_failure(self) -> Self {
        Self::NEW
    }

    /// Whether it has passed the ramp (`CV ≥ N`).
    pub const fn is_trusted(self, policy: &AuditPolicy) -> bool {
        self.consecutive_verified >= policy.trust_threshold
    }

    /// `p_trust`: 1 until `CV ≥ N`, then `1/CV` (rounded up to the part
    /// per million). A threshold of 0 still audits a provider with no
    /// verified result at all with certainty (`1/0`).
    pub fn p_trust(self, policy: &AuditPolicy) -> Ppm {
        if !self.is_trusted(policy) {
            return Ppm::ONE;
        }
        Ppm::ratio_ceil(1, u128::from(self.consecutive_verified))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(n: u32) -> AuditPolicy {
        AuditPolicy {
            trust_threshold: n,
            ..AuditPolicy::default()
        }
    }

    #[test]
    fn the_ramp_audits_everything_until_n_then_one_over_cv() {
        let p = policy(10);
        // (CV, p_trust in ppm)
        let table = [
            (0, 1_000_000),
            (1, 1_000_000),
            (9, 1_000_000),
            (10, 100_000),
            (11, 90_910), // 1/11 = 0.0909090…, rounded up
            (20, 50_000),
            (100, 10_000),
            (3, 1_000_000),
            (1_000_000, 1),
            (u32::MAX, 1), // never rounds down to 0
        ];
        for (cv, ppm) in table {
            assert_eq!(
                TrustState::new(cv).p_trust(&p).parts(),
                ppm,
                "p_trust at CV = {cv}"
            );
        }
        // N is configurable.
        assert_eq!(TrustState::new(3).p_trust(&policy(3)).parts(), 333_334);
        assert_eq!(TrustState::new(3).p_trust(&policy(4)), Ppm::ONE);
        assert_eq!(TrustState::NEW.p_trust(&policy(0)), Ppm::ONE);
        assert_eq!(TrustState::new(1).p_trust(&policy(0)), Ppm::ONE);
        assert_eq!(TrustState::new(2).p_trust(&policy(0)).parts(), 500_000);
    }

    #[test]
    fn a_pass_adds_one_a_failure_resets_and_inconclusive_keeps() {
        let table = [
            (0, AuditOutcome::Passed, 1),
            (9, AuditOutcome::Passed, 10),
            (41, AuditOutcome::Failed, 0),
            (0, AuditOutcome::Failed, 0),
            (41, AuditOutcome::Inconclusive, 41),
            (u32::MAX, AuditOutcome::Passed, u32::MAX),
        ];
        for (cv, outcome, want) in table {
            assert_eq!(
                TrustState::new(cv).after(outcome),
                TrustState::new(want),
                "{cv} after {outcome:?}"
            );
        }
    }

    #[test]
    fn a_failure_sends_a_trusted_provider_back_through_the_ramp() {
        let p = policy(10);
        let mut s = TrustState::NEW;
        for _ in 0..25 {
            s = s.after_pass();
        }
        assert!(s.is_trusted(&p));
        assert_eq!(s.p_trust(&p).parts(), 40_000);
        s = s.after(AuditOutcome::Failed);
        assert!(!s.is_trusted(&p));
        assert_eq!(s.p_trust(&p), Ppm::ONE);
        for i in 1..=10 {
            s = s.after_pass();
            assert_eq!(s.is_trusted(&p), i >= 10, "after {i} passes");
        }
    }
}
