//! What rounds of executions decide, rank by rank: the verdict of an audit
//! of a job of `k ≥ 1` members.
//!
//! An audited job is executed in **rounds**: round 0 is the original (its
//! `k` members, one per rank), round 1 the first verifier round (a whole
//! second gang of the same shape on other providers), round 2 the
//! tie-breaker. Each rank's executions are compared with each other (rank
//! `r` of one round against rank `r` of another: a gang's ranks do
//! different work), and each rank is judged by majority as a job of one
//! is ([`super::judge`]). For `k = 1` this is exactly the job-of-one audit.
//!
//! **Blame.** An execution outvoted by two agreeing ones is wrong. For a
//! job of one (or a round on a single provider) the error is that
//! provider's own: it is slashed. In a gang spanning several providers it
//! is not: a gang's members exchange data, so a member can corrupt what it
//! sends to a peer and keep its own output right, and the outvoted peer is
//! then the honest one. So a wrong member of such a round is
//! [`Mark::Unattributed`]: not paid for the judged result and its verified
//! record starts again, but never slashed. Since nothing can be slashed,
//! the economic floor of a gang counts no stake (`S = 0`, so `p_econ =
//! C/R`: with the default cost fraction every gang result is re-executed;
//! see `lifecycle::reexec`). Signed per-rank transcripts (each member
//! committing to what it received) would make a corrupting member
//! attributable and let gangs be sampled like jobs of one.

use serde::{Deserialize, Serialize};

use super::trust::AuditOutcome;

/// How one rank's executions compared (`true`: the comparator found them
/// the same). `original_third` and `verifier_third` are known once a third
/// round delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ballot {
    /// Round 0 against round 1.
    pub original_verifier: bool,
    /// Round 0 against round 2.
    pub original_third: Option<bool>,
    /// Round 1 against round 2.
    pub verifier_third: Option<bool>,
}

/// What the verdict says about one execution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// On the majority of its rank: paid.
    Right,
    /// Outvoted by two agreeing executions of its rank, and its own error:
    /// not paid, slashed.
    Wrong,
    /// Outvoted, in a gang round that spans several providers: not paid,
    /// its verified record starts again, not slashed (the error cannot be
    /// pinned on one member).
    Unattributed,
    /// No majority for its rank: nobody is paid or slashed.
    Unjudged,
}

impl Mark {
    /// The audit outcome for the provider's verified record.
    pub const fn outcome(self) -> AuditOutcome {
        match self {
            Self::Right => AuditOutcome::Passed,
            Self::Wrong | Self::Unattributed => AuditOutcome::Failed,
            Self::Unjudged => AuditOutcome::Inconclusive,
        }
    }
}

/// The verdict over every round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tally {
    /// Some rank needs another round (the first, or a tie-breaker).
    NeedsRound,
    Final(Final),
}

/// A final verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Final {
    /// `marks[round][rank]`, for every round that delivered.
    pub marks: Vec<Vec<Mark>>,
    /// The round whose members' results the buyer gets (`None`: no
    /// majority somewhere; refunded). The first round that is right on
    /// every rank, else the first right on rank 0.
    pub result_round: Option<usize>,
}

impl Final {
    /// Whether the original round is right on every rank.
    pub fn original_right(&self) -> bool {
        self.marks
            .first()
            .is_some_and(|r| r.iter().all(|m| *m == Mark::Right))
    }

    /// Whether no rank had a majority.
    pub fn nondeterministic(&self) -> bool {
        self.result_round.is_none()
    }
}

/// Judges the rounds that delivered. `ballots` has one entry per rank;
/// `rounds` says how many rounds delivered (the original counts);
/// `shared[round]` whether that round spans several providers.
pub fn tally(ballots: &[Ballot], rounds: usize, shared: &[bool]) -> Tally {
    if rounds < 2 || ballots.is_empty() {
        return Tally::NeedsRound;
    }
    if ballots.iter().all(|b| b.original_verifier) {
        return Tally::Final(Final {
            marks: vec![vec![Mark::Right; ballots.len()]; 2],
            result_round: Some(0),
        });
    }
    if rounds < 3 {
        return Tally::NeedsRound;
    }
    use Mark::{Right, Unjudged, Wrong};
    let per_rank: Vec<[Mark; 3]> = ballots
        .iter()
        .map(|b| {
            let (o3, v3) = (b.original_third, b.verifier_third);
            if b.original_verifier {
                // The first two agree: the third is right only with them.
                [Right, Right, if o3 == Some(true) { Right } else { Wrong }]
            } else if o3 == Some(true) {
                [Right, Wrong, Right]
            } else if v3 == Some(true) {
                [Wrong, Right, Right]
            } else {
                [Unjudged; 3]
            }
        })
        .collect();
    let mut marks: Vec<Vec<Mark>> = (0..3)
        .map(|round| per_rank.iter().map(|m| m[round]).collect())
        .collect();
    if marks.iter().flatten().any(|m| *m == Unjudged) {
        for m in marks.iter_mut().flatten() {
            *m = Unjudged;
        }
        return Tally::Final(Final {
            marks,
            result_round: None,
        });
    }
    for (round, row) in marks.iter_mut().enumerate() {
        if row.len() > 1 && shared.get(round).copied().unwrap_or(true) {
            for m in row.iter_mut().filter(|m| **m == Wrong) {
                *m = Mark::Unattributed;
            }
        }
    }
    let result_round = marks
        .iter()
        .position(|r| r.iter().all(|m| *m == Right))
        .or_else(|| marks.iter().position(|r| r.first() == Some(&Right)));
    Tally::Final(Final {
        marks,
        result_round,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Mark::{Right as R, Unattributed as A, Unjudged as U, Wrong as W};

    /// A rank's ballot from its three outputs (`None`: that round has not
    /// delivered).
    fn ballot(o: u8, v: u8, t: Option<u8>) -> Ballot {
        Ballot {
            original_verifier: o == v,
            original_third: t.map(|t| t == o),
            verifier_third: t.map(|t| t == v),
        }
    }

    #[test]
    fn a_job_of_one_is_judged_as_before() {
        // (original, verifier, third) → marks of the rounds, result round
        type Row = (u8, u8, Option<u8>, Option<[Mark; 3]>, Option<usize>);
        let table: [Row; 6] = [
            (1, 1, None, Some([R, R, R]), Some(0)),
            (1, 2, None, None, None),
            (1, 2, Some(1), Some([R, W, R]), Some(0)),
            (1, 2, Some(2), Some([W, R, R]), Some(1)),
            (1, 2, Some(3), Some([U, U, U]), None),
            // The first two agree: a third is never consulted.
            (1, 1, Some(2), Some([R, R, R]), Some(0)),
        ];
        for (o, v, t, want, result) in table {
            let rounds = 2 + usize::from(t.is_some());
            let got = tally(&[ballot(o, v, t)], rounds, &[false; 3]);
            match (got, want) {
                (Tally::NeedsRound, None) => {}
                (Tally::Final(f), Some(w)) => {
                    for (round, row) in f.marks.iter().enumerate() {
                        assert_eq!(row[0], w[round], "{o} {v} {t:?} round {round}");
                    }
                    assert_eq!(f.result_round, result, "{o} {v} {t:?}");
                }
                (got, want) => panic!("{o} {v} {t:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_gang_is_judged_rank_by_rank() {
        // Outputs per rank: [(original, verifier, third)], then the marks
        // of each round and the round the buyer gets.
        type Row = (
            &'static [(u8, u8, Option<u8>)],
            Option<[&'static [Mark]; 3]>,
            Option<usize>,
        );
        let table: [Row; 7] = [
            // Every rank agrees at once: verified, two rounds.
            (
                &[(1, 1, None), (2, 2, None)],
                Some([&[R, R], &[R, R], &[]]),
                Some(0),
            ),
            // Rank 1 differs: a tie-breaking round.
            (&[(1, 1, None), (2, 9, None)], None, None),
            // Rank 1 of the original is wrong; the others are right. It
            // may have been fed bad data by rank 0: not slashed.
            (
                &[(1, 1, Some(1)), (9, 2, Some(2))],
                Some([&[R, A], &[R, R], &[R, R]]),
                Some(1),
            ),
            // Rank 1 of the first verifier round is outvoted alone.
            (
                &[(1, 1, Some(1)), (2, 9, Some(2))],
                Some([&[R, R], &[R, A], &[R, R]]),
                Some(0),
            ),
            // Every rank of the original is wrong.
            (
                &[(8, 1, Some(1)), (9, 2, Some(2))],
                Some([&[A, A], &[R, R], &[R, R]]),
                Some(1),
            ),
            // One rank without a majority: nondeterministic, no blame.
            (
                &[(1, 1, Some(1)), (2, 3, Some(4))],
                Some([&[U, U], &[U, U], &[U, U]]),
                None,
            ),
            // The tie-breaker is wrong on a rank the first two agreed on,
            // and the original on the other: round 1 is right everywhere.
            (
                &[(1, 1, Some(7)), (9, 2, Some(2))],
                Some([&[R, A], &[R, R], &[A, R]]),
                Some(1),
            ),
        ];
        for (ranks, want, result) in table {
            let rounds = if ranks.iter().any(|r| r.2.is_some()) {
                3
            } else {
                2
            };
            let ballots: Vec<Ballot> = ranks.iter().map(|&(o, v, t)| ballot(o, v, t)).collect();
            match (tally(&ballots, rounds, &[true; 3]), want) {
                (Tally::NeedsRound, None) => {}
                (Tally::Final(f), Some(w)) => {
                    for (round, row) in f.marks.iter().enumerate() {
                        assert_eq!(row.as_slice(), w[round], "{ranks:?} round {round}");
                    }
                    assert_eq!(f.result_round, result, "{ranks:?}");
                }
                (got, want) => panic!("{ranks:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_round_on_one_provider_is_blamed() {
        let ballots = [ballot(8, 1, Some(1)), ballot(9, 2, Some(2))];
        let Tally::Final(f) = tally(&ballots, 3, &[false, true, true]) else {
            panic!("not final")
        };
        assert_eq!(f.marks[0], vec![W, W]);
        assert!(!f.original_right());
    }

    #[test]
    fn marks_map_to_audit_outcomes() {
        assert_eq!(R.outcome(), AuditOutcome::Passed);
        assert_eq!(W.outcome(), AuditOutcome::Failed);
        assert_eq!(A.outcome(), AuditOutcome::Failed);
        assert_eq!(U.outcome(), AuditOutcome::Inconclusive);
    }
}
