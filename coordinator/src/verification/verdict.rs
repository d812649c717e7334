//! What the executions of an audited job decide, by majority.
//!
//! The original result and the verifier's re-execution are compared (for
//! `exact` jobs: output manifest CIDs equal). If they agree, the original
//! is verified. If they differ, a third independent execution decides:
//! whichever of the two it agrees with is right and the other is slashed.
//! If all three differ there is no majority ([`judge`]).
//!
//! For a deterministic (`exact`) job, three different outputs mean at
//! least two executions lied, so "no majority" there is better answered
//! with one more execution than with "nondeterministic": [`plurality`]
//! judges any number of executions, and the caller adds executions until
//! an output is backed by two of them or its cap is reached (only then is
//! nobody slashed). Independently fabricated outputs never agree, so the
//! winning output is the honest one unless two cheaters collude on the
//! same wrong bytes, and an honest provider is never outvoted otherwise.

use serde::{Deserialize, Serialize};

use super::trust::AuditOutcome;

/// The result of comparing an audited job's original, verifier and
/// (on disagreement) third execution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The verifier agreed with the original.
    Agreed,
    /// They disagree and no third execution has been given yet.
    NeedsTieBreak,
    /// The third execution agreed with the verifier: the original is wrong.
    OriginalWrong,
    /// The third execution agreed with the original: the verifier is wrong.
    VerifierWrong,
    /// All three differ.
    NoMajority,
}

impl Verdict {
    /// Whether the audit is over.
    pub const fn is_final(self) -> bool {
        !matches!(self, Self::NeedsTieBreak)
    }

    /// What it says about the original provider's result (`None` while a
    /// tie-break is pending).
    pub const fn original(self) -> Option<AuditOutcome> {
        match self {
            Self::Agreed | Self::VerifierWrong => Some(AuditOutcome::Passed),
            Self::OriginalWrong => Some(AuditOutcome::Failed),
            Self::NoMajority => Some(AuditOutcome::Inconclusive),
            Self::NeedsTieBreak => None,
        }
    }

    /// Whether the original provider is slashed.
    pub const fn slashes_original(self) -> bool {
        matches!(self, Self::OriginalWrong)
    }

    /// Whether the verifier is slashed.
    pub const fn slashes_verifier(self) -> bool {
        matches!(self, Self::VerifierWrong)
    }
}

/// Judges an audit from its executions' outputs (whatever the job's
/// comparator reduces them to). `tie_breaker` is consulted only when the
/// first two disagree.
pub fn judge<T: PartialEq + ?Sized>(
    original: &T,
    verifier: &T,
    tie_breaker: Option<&T>,
) -> Verdict {
    if original == verifier {
        return Verdict::Agreed;
    }
    match tie_breaker {
        None => Verdict::NeedsTieBreak,
        Some(t) if t == original => Verdict::VerifierWrong,
        Some(t) if t == verifier => Verdict::OriginalWrong,
        Some(_) => Verdict::NoMajority,
    }
}

/// The plurality over any number of executions of one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plurality {
    /// No output is backed by two executions more than any other: add an
    /// execution (or, at the cap, call it inconclusive).
    Undecided,
    /// The output of execution `winner` (the first that produced it) is
    /// backed by at least two executions and by more than any other.
    Decided { winner: usize },
}

/// Judges `outputs` (the original's first, then the verifier's, then any
/// further executions') by plurality: an output wins when at least two
/// executions produced it and no other output has as many. Quadratic in
/// the number of executions, which is a handful.
pub fn plurality<T: PartialEq>(outputs: &[T]) -> Plurality {
    let votes = |i: usize| outputs.iter().filter(|o| **o == outputs[i]).count();
    let mut best: Option<(usize, usize)> = None; // (winner, votes)
    let mut tied = false;
    for i in 0..outputs.len() {
        if outputs[..i].contains(&outputs[i]) {
            continue; // counted with its first occurrence
        }
        let v = votes(i);
        match best {
            Some((_, b)) if v < b => {}
            Some((_, b)) if v == b => tied = true,
            _ => {
                best = Some((i, v));
                tied = false;
            }
        }
    }
    match best {
        Some((winner, v)) if v >= 2 && !tied => Plurality::Decided { winner },
        _ => Plurality::Undecided,
    }
}

impl Plurality {
    /// What it says about execution `i` of `outputs`.
    pub fn outcome<T: PartialEq>(self, outputs: &[T], i: usize) -> AuditOutcome {
        match self {
            Self::Undecided => AuditOutcome::Inconclusive,
            Self::Decided { winner } => match (outputs.get(i), outputs.get(winner)) {
                (Some(a), Some(w)) if a == w => AuditOutcome::Passed,
                (Some(_), Some(_)) => AuditOutcome::Failed,
                _ => AuditOutcome::Inconclusive,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_table() {
        // (original, verifier, third, verdict, original's outcome)
        type Row = (
            &'static str,
            &'static str,
            Option<&'static str>,
            Verdict,
            Option<AuditOutcome>,
        );
        let table: [Row; 8] = [
            ("a", "a", None, Verdict::Agreed, Some(AuditOutcome::Passed)),
            // A third execution is not needed when the first two agree.
            (
                "a",
                "a",
                Some("b"),
                Verdict::Agreed,
                Some(AuditOutcome::Passed),
            ),
            ("a", "b", None, Verdict::NeedsTieBreak, None),
            (
                "a",
                "b",
                Some("a"),
                Verdict::VerifierWrong,
                Some(AuditOutcome::Passed),
            ),
            (
                "a",
                "b",
                Some("b"),
                Verdict::OriginalWrong,
                Some(AuditOutcome::Failed),
            ),
            (
                "a",
                "b",
                Some("c"),
                Verdict::NoMajority,
                Some(AuditOutcome::Inconclusive),
            ),
            (
                "x",
                "",
                Some(""),
                Verdict::OriginalWrong,
                Some(AuditOutcome::Failed),
            ),
            (
                "",
                "x",
                Some(""),
                Verdict::VerifierWrong,
                Some(AuditOutcome::Passed),
            ),
        ];
        for (o, v, t, verdict, outcome) in table {
            let got = judge(o, v, t);
            assert_eq!(got, verdict, "judge({o:?}, {v:?}, {t:?})");
            assert_eq!(got.original(), outcome, "{verdict:?}");
            assert_eq!(got.is_final(), outcome.is_some());
        }
    }

    #[test]
    fn only_the_outvoted_execution_is_slashed() {
        let all = [
            Verdict::Agreed,
            Verdict::NeedsTieBreak,
            Verdict::OriginalWrong,
            Verdict::VerifierWrong,
            Verdict::NoMajority,
        ];
        for v in all {
            assert_eq!(v.slashes_original(), v == Verdict::OriginalWrong, "{v:?}");
            assert_eq!(v.slashes_verifier(), v == Verdict::VerifierWrong, "{v:?}");
            assert!(!(v.slashes_original() && v.slashes_verifier()));
        }
    }

    #[test]
    fn plurality_table() {
        use AuditOutcome::{Failed as F, Inconclusive as I, Passed as P};
        // (outputs, judgement, each execution's outcome)
        let table: [(&[u8], Plurality, &[AuditOutcome]); 10] = [
            (&[], Plurality::Undecided, &[]),
            (&[1], Plurality::Undecided, &[I]),
            (&[1, 1], Plurality::Decided { winner: 0 }, &[P, P]),
            (&[1, 2], Plurality::Undecided, &[I, I]),
            (&[1, 2, 2], Plurality::Decided { winner: 1 }, &[F, P, P]),
            (&[1, 2, 1], Plurality::Decided { winner: 0 }, &[P, F, P]),
            (&[1, 2, 3], Plurality::Undecided, &[I, I, I]),
            // Three different outputs, then a fourth execution decides.
            (
                &[1, 2, 3, 3],
                Plurality::Decided { winner: 2 },
                &[F, F, P, P],
            ),
            (
                &[1, 2, 3, 1],
                Plurality::Decided { winner: 0 },
                &[P, F, F, P],
            ),
            // Two pairs: a tie decides nothing.
            (&[1, 2, 1, 2], Plurality::Undecided, &[I, I, I, I]),
        ];
        for (outputs, want, outcomes) in table {
            let got = plurality(outputs);
            assert_eq!(got, want, "{outputs:?}");
            for (i, o) in outcomes.iter().enumerate() {
                assert_eq!(got.outcome(outputs, i), *o, "{outputs:?} execution {i}");
            }
        }
        // A larger majority beats a pair.
        assert_eq!(
            plurality(&[7, 7, 9, 9, 9]),
            Plurality::Decided { winner: 2 }
        );
    }

    #[test]
    fn plurality_agrees_with_judge_on_three() {
        let cases: [[u8; 3]; 6] = [
            [1, 1, 1],
            [1, 1, 2],
            [1, 2, 1],
            [1, 2, 2],
            [1, 2, 3],
            [2, 1, 1],
        ];
        for [o, v, t] in cases {
            let verdict = judge(&o, &v, Some(&t));
            let p = plurality(&[o, v, t]);
            assert_eq!(
                Some(p.outcome(&[o, v, t], 0)),
                verdict.original(),
                "{o} {v} {t}"
            );
            assert_eq!(
                p.outcome(&[o, v, t], 1) == AuditOutcome::Failed,
                verdict.slashes_verifier(),
                "{o} {v} {t}"
            );
        }
    }
}
