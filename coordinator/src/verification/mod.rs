//! Verification by spot re-execution: which results are re-run, and what
//! a re-run decides. Pure: no I/O, no clock, no database; the coordinator
//! (later) feeds these functions what it stored and records what they
//! return, and a verifier's re-run becomes one more member of the job in
//! [`crate::jobs`].
//!
//! * [`decision`]: the audit decision for one accepted result: its
//!   probability (the economic floor and the trust schedule below), the
//!   keyed draw, and the [`Decision`] record anyone can check and the
//!   holder of the secret can replay.
//! * [`trust`]: a provider's run of consecutive verified results and its
//!   transitions (a pass adds one, a failure resets it).
//! * [`reputation`]: a provider's beta reputation with forgetting, from
//!   verifiable events only (delivered, lost, missed deadlines, challenges).
//! * [`rounds`]: what rounds of executions decide, by plurality rank by
//!   rank (a job of one is a gang of one), who is blamed, and when another
//!   round is needed.
//!
//! # The audit probability
//!
//! Each accepted result is re-executed with probability
//!
//! ```text
//! p = clamp(max(p_econ, p_trust), p_min, 1)
//! ```
//!
//! **The economic floor** (Belenkiy et al., "Incentivizing outsourced
//! computation", 2008). A provider that fabricates a result instead of
//! computing it saves the cost `C` of the work. If it is audited (with
//! probability `p`) it is caught: it is not paid (`R`) and its bond is
//! slashed (`S`). Honest work earns `R − C`; cheating earns, in
//! expectation, `(1 − p)·R − p·S`. Cheating does not pay when
//! `R − C ≥ (1 − p)·R − p·S`, i.e. when
//!
//! ```text
//! p ≥ p_econ = C / (R + S)
//! ```
//!
//! Here `R` is what this result pays, `S = min(bond, max_slash)` what one
//! slash can take from the provider's bond, and `C = R × cost_fraction`
//! (default 1: skipping the work saves everything running it costs, the
//! conservative assumption — it makes honest work profitless, so any
//! saving is worth cheating for). With no bond `p_econ = C/R = 1`: an
//! unbonded provider's every result must be checked. With a bond much
//! larger than the job, `p_econ ≈ R/S`: a job worth 1/19 of the bond is
//! audited 5% of the time, and the audit rate scales with what a cheat
//! would gain. The ratio is rounded *up* to the next part per million, so
//! the recorded `p` never falls below the floor.
//!
//! **The trust schedule** (BOINC adaptive replication). A provider with
//! `CV` consecutive *verified* results (audits passed since its last
//! failure) is audited with certainty until `CV ≥ N` (default 10), then
//! with `p_trust = 1/CV`. One failed verification resets `CV` to 0. Only
//! verified results count: an unaudited result proves nothing, so trust
//! grows with evidence (about `√(2j)` audits after `j` results when
//! `1/CV` is what binds), not with volume. The trust term is what catches
//! a new identity that cheats at once (its first cheat is audited with
//! certainty) and what makes a fresh identity expensive: `N` re-runs
//! before it sees a probability below 1.
//!
//! **`p_min`** (default 0.5%) keeps some evidence flowing about every
//! provider even on jobs too cheap for the floor to matter.
//!
//! # Detection
//!
//! A provider that cheats on a fraction `q` of its results, each audited
//! with probability `p`, is caught on any one result with probability
//! `p·q`, and within `n` results with probability
//!
//! ```text
//! P(caught within n) = 1 − (1 − p·q)ⁿ
//! ```
//!
//! (when `p` varies independently from result to result, as it does with
//! the price, the same holds with `p` its mean). The expected number of
//! cheats it gets away with before it is caught is `(1 − p)/p`. At
//! `p = 0.1, q = 1`: 65% are caught within 10 results, 99% within 44.
//!
//! # The draw
//!
//! Whether a result is audited must be unpredictable to the provider (or
//! it would cheat exactly when it will not be checked) and reproducible
//! by anyone who holds the record. The draw is
//!
//! ```text
//! draw = u64_le(first 8 bytes of blake3_keyed(secret, "kiln/audit-draw/v1" ‖ receipt_hash))
//! audited ⇔ draw < p × 2⁶⁴
//! ```
//!
//! where `receipt_hash` is the blake3 of the signed receipt's canonical
//! bytes (it binds the job, the offer, the outputs and the signature). The
//! provider knows its receipt but not the coordinator's secret, so the
//! draw is a uniform 64-bit number to it; a provider cannot re-roll it
//! either, because the decision is taken once, on the first accepted
//! receipt of a member. The [`Decision`] record holds every input, the
//! probabilities, the draw, the outcome and the secret's commitment
//! ([`SecretId`]): anyone can check that `p` follows from the inputs and
//! that the outcome follows from the draw ([`Decision::check`]); whoever
//! holds the secret (the coordinator, or anyone once it reveals an
//! epoch's secret against its published commitment) can re-derive the
//! draw too ([`Decision::replay`]). Probabilities are integer parts per
//! million ([`Ppm`]) and money is integer micro-credits: nothing recorded
//! is a float.

pub mod compare;
pub mod decision;
pub mod reputation;
pub mod rounds;
pub mod trust;

pub use decision::{
    AuditInputs, AuditPolicy, AuditSecret, Decision, Ppm, Probabilities, ReceiptHash, SecretId,
    decide, draw, probabilities,
};
pub use trust::{AuditOutcome, TrustState};

use std::time::Duration;

/// How the coordinator verifies results (see [`crate::lifecycle::reexec`]).
#[derive(Clone, Copy, Debug)]
pub struct VerificationConfig {
    /// Re-execute sampled results at all (on by default).
    pub enabled: bool,
    pub policy: AuditPolicy,
    /// How long a sampled result may wait for its re-executions, on top of
    /// twice the job's timeout; then it is settled with what is known
    /// (paid unverified, or refunded when disputed).
    pub window: Duration,
    /// A slash's share to the buyer of the job (basis points)...
    pub buyer_share_bps: u16,
    /// ... and to the provider whose execution proved it (the rest burns).
    pub verifier_share_bps: u16,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            policy: AuditPolicy::DEFAULT,
            window: Duration::from_secs(30 * 60),
            buyer_share_bps: 5_000,
            verifier_share_bps: 2_500,
        }
    }
}
pub use rounds::{Final, Mark, RankVotes, Tally, tally};
