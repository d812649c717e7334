//! What rounds of executions decide, rank by rank: the verdict of an audit
//! of a job of `k ≥ 1` members.
//!
//! An audited job is executed in **rounds**: round 0 is the original (its
//! `k` members, one per rank), round 1 the first verifier round (a whole
//! second gang of the same shape on other providers), then tie-breakers.
//! A job of one is a gang of one: a round is one execution. Each rank's
//! executions are compared with each other (rank `r` of one round against
//! rank `r` of another: a gang's ranks do different work), and each rank
//! is judged by plurality: an output wins when at least two rounds
//! produced it and no other output has as many ([`RankVotes::winner`]).
//!
//! If the original and the first verifier agree on every rank, it is over.
//! Otherwise a third round breaks the tie: whichever side it agrees with
//! is right. If a rank still has no plurality (three different answers),
//! a `tolerance` or `stdout` job is **nondeterministic** (nobody is paid
//! or slashed, the buyer is refunded), while an `exact` job gets a fourth
//! round ([`MAX_ROUNDS_EXACT`]): for a deterministic job three different
//! outputs mean at least two executions lied. Independently fabricated
//! outputs never agree, so the winning output is the honest one unless two
//! cheaters collude on the same wrong bytes, and an honest provider is
//! never outvoted otherwise. `kiln sim verification` judges its simulated
//! executions with this same [`tally`].
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

/// Most rounds (the original included) an audit of an `exact` job runs:
/// three different outputs of a deterministic job mean at least two
/// executions lied, which a fourth answers better than "nondeterministic".
pub const MAX_ROUNDS_EXACT: usize = 4;
/// Most rounds for `tolerance` and `stdout` jobs: three different answers
/// there may be honest nondeterminism beyond the buyer's tolerance.
pub const MAX_ROUNDS: usize = 3;

/// One rank's comparisons: `same[i][j]` (for `i ≠ j`, symmetric) says
/// whether the executions of rounds `i` and `j` agree under the job's
/// comparator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RankVotes {
    pub same: Vec<Vec<bool>>,
}

impl RankVotes {
    /// `rounds` executions, none compared yet.
    pub fn new(rounds: usize) -> Self {
        Self {
            same: vec![vec![false; rounds]; rounds],
        }
    }

    /// Records that rounds `i` and `j` agree (or not).
    pub fn set(&mut self, i: usize, j: usize, same: bool) {
        if let Some(x) = self.same.get_mut(i).and_then(|r| r.get_mut(j)) {
            *x = same;
        }
        if let Some(x) = self.same.get_mut(j).and_then(|r| r.get_mut(i)) {
            *x = same;
        }
    }

    /// The votes of outputs compared for equality (the simulation's and
    /// the tests' executions).
    pub fn of_outputs<T: PartialEq>(outputs: &[T]) -> Self {
        let mut v = Self::new(outputs.len());
        for i in 0..outputs.len() {
            for j in i + 1..outputs.len() {
                v.set(i, j, outputs[i] == outputs[j]);
            }
        }
        v
    }

    fn agree(&self, i: usize, j: usize) -> bool {
        i == j
            || self
                .same
                .get(i)
                .and_then(|r| r.get(j))
                .copied()
                .unwrap_or(false)
    }

    /// The plurality over the first `n` rounds: the first round of the
    /// output that at least two rounds back and more than back any other,
    /// or `None`. Quadratic in `n`, which is a handful.
    pub fn winner(&self, n: usize) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None; // (round, votes)
        let mut tied = false;
        for i in 0..n {
            if (0..i).any(|j| self.agree(j, i)) {
                continue; // counted with its first occurrence
            }
            let votes = (0..n).filter(|&j| self.agree(i, j)).count();
            match best {
                Some((_, b)) if votes < b => {}
                Some((_, b)) if votes == b => tied = true,
                _ => {
                    best = Some((i, votes));
                    tied = false;
                }
            }
        }
        match best {
            Some((w, v)) if v >= 2 && !tied => Some(w),
            _ => None,
        }
    }
}

/// What the verdict says about one execution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// On the plurality of its rank: paid.
    Right,
    /// Outvoted, and its own error (a job of one, or a round on one
    /// provider): not paid, slashed.
    Wrong,
    /// Outvoted, in a gang round that spans several providers: not paid,
    /// its verified record starts again, not slashed (the error cannot be
    /// pinned on one member).
    Unattributed,
    /// No plurality for some rank within the cap: nobody is paid or
    /// slashed.
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
    /// Some rank has no plurality yet: run another round.
    NeedsRound,
    Final(Final),
}

/// A final verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Final {
    /// `marks[round][rank]`, for every round that delivered.
    pub marks: Vec<Vec<Mark>>,
    /// The round whose members' results the buyer gets (`None`: no
    /// plurality somewhere; refunded). The first round that is right on
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

    /// Whether some rank had no plurality.
    pub fn nondeterministic(&self) -> bool {
        self.result_round.is_none()
    }
}

/// Judges the first `rounds` rounds (the original counts), one
/// [`RankVotes`] per rank, allowing at most `cap` rounds; `shared[round]`
/// says whether that round spans several providers.
pub fn tally(ranks: &[RankVotes], rounds: usize, cap: usize, shared: &[bool]) -> Tally {
    if rounds < 2 || ranks.is_empty() {
        return Tally::NeedsRound;
    }
    let winners: Option<Vec<usize>> = ranks.iter().map(|r| r.winner(rounds)).collect();
    let Some(winners) = winners else {
        if rounds < cap {
            return Tally::NeedsRound;
        }
        return Tally::Final(Final {
            marks: vec![vec![Mark::Unjudged; ranks.len()]; rounds],
            result_round: None,
        });
    };
    let mut marks: Vec<Vec<Mark>> = (0..rounds)
        .map(|round| {
            ranks
                .iter()
                .zip(&winners)
                .map(|(r, &w)| {
                    if r.agree(w, round) {
                        Mark::Right
                    } else {
                        Mark::Wrong
                    }
                })
                .collect()
        })
        .collect();
    for (round, row) in marks.iter_mut().enumerate() {
        if row.len() > 1 && shared.get(round).copied().unwrap_or(true) {
            for m in row.iter_mut().filter(|m| **m == Mark::Wrong) {
                *m = Mark::Unattributed;
            }
        }
    }
    let result_round = marks
        .iter()
        .position(|r| r.iter().all(|m| *m == Mark::Right))
        .or_else(|| marks.iter().position(|r| r.first() == Some(&Mark::Right)));
    Tally::Final(Final {
        marks,
        result_round,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Mark::{Right as R, Unattributed as A, Unjudged as U, Wrong as W};

    /// Tallies a job of `outputs[rank][round]`.
    fn judge(outputs: &[&[u8]], cap: usize, shared: bool) -> Tally {
        let rounds = outputs.iter().map(|o| o.len()).min().unwrap_or(0);
        let ranks: Vec<RankVotes> = outputs.iter().map(|o| RankVotes::of_outputs(o)).collect();
        tally(&ranks, rounds, cap, &vec![shared; rounds])
    }

    #[test]
    fn plurality_table() {
        // (outputs, winner)
        let table: [(&[u8], Option<usize>); 12] = [
            (&[], None),
            (&[1], None),
            (&[1, 1], Some(0)),
            (&[1, 2], None),
            (&[1, 2, 2], Some(1)),
            (&[1, 2, 1], Some(0)),
            (&[1, 2, 3], None),
            (&[1, 2, 3, 3], Some(2)),
            (&[1, 2, 3, 1], Some(0)),
            // Two pairs: a tie decides nothing.
            (&[1, 2, 1, 2], None),
            // A larger majority beats a pair.
            (&[7, 7, 9, 9, 9], Some(2)),
            (&[1, 1, 2], Some(0)),
        ];
        for (outputs, want) in table {
            let v = RankVotes::of_outputs(outputs);
            assert_eq!(v.winner(outputs.len()), want, "{outputs:?}");
        }
    }

    #[test]
    fn a_job_of_one_table() {
        // (outputs by round, cap, marks by round, result round; `None`:
        // another round is needed)
        type Row = (&'static [u8], usize, Option<&'static [Mark]>, Option<usize>);
        let table: [Row; 11] = [
            (&[1], 3, None, None),
            (&[1, 1], 3, Some(&[R, R]), Some(0)),
            (&[1, 2], 3, None, None),
            (&[1, 2, 1], 3, Some(&[R, W, R]), Some(0)),
            (&[1, 2, 2], 3, Some(&[W, R, R]), Some(1)),
            // Three answers: nondeterministic at the cap of 3...
            (&[1, 2, 3], 3, Some(&[U, U, U]), None),
            // ...and a fourth round for an exact job.
            (&[1, 2, 3], 4, None, None),
            (&[1, 2, 3, 3], 4, Some(&[W, W, R, R]), Some(2)),
            (&[1, 2, 3, 1], 4, Some(&[R, W, W, R]), Some(0)),
            (&[1, 2, 3, 4], 4, Some(&[U, U, U, U]), None),
            (&[1, 2, 1, 2], 4, Some(&[U, U, U, U]), None),
        ];
        for (outputs, cap, want, result) in table {
            match (judge(&[outputs], cap, false), want) {
                (Tally::NeedsRound, None) => {}
                (Tally::Final(f), Some(w)) => {
                    let got: Vec<Mark> = f.marks.iter().map(|r| r[0]).collect();
                    assert_eq!(got, w, "{outputs:?} cap {cap}");
                    assert_eq!(f.result_round, result, "{outputs:?}");
                    assert_eq!(f.nondeterministic(), result.is_none());
                }
                (got, want) => panic!("{outputs:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_gang_is_judged_rank_by_rank() {
        // Outputs per rank by round, then the marks of each round and the
        // round the buyer gets; `None`: another round is needed.
        type Row = (
            &'static [&'static [u8]],
            Option<&'static [&'static [Mark]]>,
            Option<usize>,
        );
        let table: [Row; 7] = [
            // Every rank agrees at once: verified, two rounds.
            (&[&[1, 1], &[2, 2]], Some(&[&[R, R], &[R, R]]), Some(0)),
            // Rank 1 differs: a tie-breaking round.
            (&[&[1, 1], &[2, 9]], None, None),
            // Rank 1 of the original is outvoted; it may have been fed bad
            // data by rank 0, so it is not slashed.
            (
                &[&[1, 1, 1], &[9, 2, 2]],
                Some(&[&[R, A], &[R, R], &[R, R]]),
                Some(1),
            ),
            // Rank 1 of the first verifier round is outvoted alone.
            (
                &[&[1, 1, 1], &[2, 9, 2]],
                Some(&[&[R, R], &[R, A], &[R, R]]),
                Some(0),
            ),
            // Every rank of the original is outvoted.
            (
                &[&[8, 1, 1], &[9, 2, 2]],
                Some(&[&[A, A], &[R, R], &[R, R]]),
                Some(1),
            ),
            // The tie-breaker is wrong on a rank the first two agreed on,
            // and the original on the other: round 1 is right everywhere.
            (
                &[&[1, 1, 7], &[9, 2, 2]],
                Some(&[&[R, A], &[R, R], &[A, R]]),
                Some(1),
            ),
            // One rank without a plurality at the cap: nobody is blamed.
            (
                &[&[1, 1, 1], &[2, 3, 4]],
                Some(&[&[U, U], &[U, U], &[U, U]]),
                None,
            ),
        ];
        for (outputs, want, result) in table {
            match (judge(outputs, MAX_ROUNDS, true), want) {
                (Tally::NeedsRound, None) => {}
                (Tally::Final(f), Some(w)) => {
                    for (round, row) in f.marks.iter().enumerate() {
                        assert_eq!(row.as_slice(), w[round], "{outputs:?} round {round}");
                    }
                    assert_eq!(f.result_round, result, "{outputs:?}");
                }
                (got, want) => panic!("{outputs:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_round_on_one_provider_is_blamed() {
        let Tally::Final(f) = judge(&[&[8, 1, 1], &[9, 2, 2]], MAX_ROUNDS, false) else {
            panic!("not final")
        };
        assert_eq!(f.marks[0], vec![W, W]);
        assert!(!f.original_right());
    }

    #[test]
    fn a_tolerance_comparison_need_not_be_transitive() {
        // Round 0 agrees with 1 and 2, which disagree with each other
        // (each within the tolerance of the middle, not of one another).
        let mut v = RankVotes::new(3);
        v.set(0, 1, true);
        v.set(0, 2, true);
        assert_eq!(v.winner(3), Some(0));
        let Tally::Final(f) = tally(&[v], 3, MAX_ROUNDS, &[false; 3]) else {
            panic!("not final")
        };
        assert!(f.original_right());
        assert_eq!(f.marks.iter().map(|r| r[0]).collect::<Vec<_>>(), [R, R, R]);
    }

    #[test]
    fn marks_map_to_audit_outcomes() {
        assert_eq!(R.outcome(), AuditOutcome::Passed);
        assert_eq!(W.outcome(), AuditOutcome::Failed);
        assert_eq!(A.outcome(), AuditOutcome::Failed);
        assert_eq!(U.outcome(), AuditOutcome::Inconclusive);
    }
}
