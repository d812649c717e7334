//! What a member is paid, pure.
//!
//! **Pay only for observed time.** A member is paid for the time the
//! coordinator itself saw it running: from when its start was accepted
//! (the node answered the offer, or a gang's start) to when its verified
//! receipt first arrived, or to a usage report's arrival while it runs.
//! The provider's own figure (the receipt's or report's `wall_ms`) can
//! only lower that, never raise it; the job's `timeout` caps it (a job is
//! never billed past its timeout, whatever the node says it overshot);
//! the member's price is the provider's advertised price at placement; and
//! one member earns at most its share of the escrow (`max_cost / k`).
//!
//! Payments are cumulative: each report or receipt states what the member
//! has earned *in all* so far, and the coordinator pays the difference to
//! what it already paid (so a lost or skipped report loses nothing, and a
//! replayed one pays nothing). Fees are taken on cumulative amounts by the
//! ledger, so splitting a payment into many tiny reports saves no fee.

use kiln_protocol::spec::cost_for;
use kiln_protocol::{Credits, UnixMillis};

/// What one member is paid against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Terms {
    pub price_per_hour: Credits,
    /// Most this member may earn (its share of the escrow).
    pub cap: Credits,
    pub timeout_ms: u64,
}

/// Milliseconds a member is paid for at `at`: what it claims, bounded by
/// what the coordinator observed since `started_at` and by the timeout.
pub fn billable_ms(
    claimed_ms: u64,
    started_at: UnixMillis,
    at: UnixMillis,
    timeout_ms: u64,
) -> u64 {
    claimed_ms
        .min(at.0.saturating_sub(started_at.0))
        .min(timeout_ms)
}

/// What a member has earned in all for `ms` of billable time.
pub fn earned(terms: &Terms, ms: u64) -> Credits {
    cost_for(terms.price_per_hour, ms)
        .unwrap_or(terms.cap)
        .min(terms.cap)
}

/// What a member started at `started_at` has earned by `at`, claiming
/// `claimed_ms` of run time.
pub fn earned_by(
    terms: &Terms,
    claimed_ms: u64,
    started_at: UnixMillis,
    at: UnixMillis,
) -> Credits {
    earned(
        terms,
        billable_ms(claimed_ms, started_at, at, terms.timeout_ms),
    )
}

/// What to pay now: earned less what was already paid, at most what the
/// escrow still holds.
pub fn due(earned: Credits, paid: Credits, held: Credits) -> Credits {
    Credits(earned.0.saturating_sub(paid.0).min(held.0))
}

/// When a started member that has not delivered is given up on: its
/// timeout plus the grace for stopping, collecting outputs and delivering.
pub fn deadline(started_at: UnixMillis, timeout_ms: u64, grace_ms: u64) -> UnixMillis {
    UnixMillis(
        started_at
            .0
            .saturating_add(timeout_ms)
            .saturating_add(grace_ms),
    )
}

/// `Some(wait_ms)` when a usage report comes sooner than `min_interval_ms`
/// after the member's last payment (or its start).
pub fn too_soon(
    last: Option<UnixMillis>,
    started_at: UnixMillis,
    now: UnixMillis,
    min_interval_ms: u64,
) -> Option<u64> {
    let since = now.0.saturating_sub(last.unwrap_or(started_at).0);
    (since < min_interval_ms).then(|| min_interval_ms - since)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn billable_time_is_the_least_of_claim_observation_and_timeout() {
        let t0 = UnixMillis(1_000_000);
        // (claimed, observed, timeout, billable)
        let cases = [
            (1_000, 5_000, 60_000, 1_000),    // honest, fast reporter
            (60_000, 1_000, 60_000, 1_000),   // claims the timeout after 1 s
            (5_300, 5_400, 3_000, 3_000),     // overshot its 3 s timeout
            (u64::MAX, u64::MAX / 2, 10, 10), // absurd claims
            (0, 10_000, 60_000, 0),           // claims nothing
        ];
        for (claimed, observed, timeout, want) in cases {
            let at = UnixMillis(t0.0 + observed.min(u64::MAX - t0.0));
            assert_eq!(
                billable_ms(claimed, t0, at, timeout),
                want,
                "{claimed} {observed} {timeout}"
            );
        }
        // A clock that went backwards observes nothing.
        assert_eq!(billable_ms(1_000, t0, UnixMillis(t0.0 - 5), 60_000), 0);
    }

    #[test]
    fn earnings_are_capped_and_payments_cumulative() {
        let terms = Terms {
            price_per_hour: Credits(3_600_000),
            cap: Credits(5_000),
            timeout_ms: HOUR,
        };
        assert_eq!(earned(&terms, 1_000), Credits(1_000));
        assert_eq!(earned(&terms, 10_000), Credits(5_000));
        assert_eq!(
            due(Credits(1_000), Credits(400), Credits(10_000)),
            Credits(600)
        );
        assert_eq!(
            due(Credits(1_000), Credits(1_400), Credits(10_000)),
            Credits(0)
        );
        assert_eq!(due(Credits(1_000), Credits(0), Credits(250)), Credits(250));
    }

    #[test]
    fn reports_have_a_minimum_interval() {
        let t0 = UnixMillis(10_000);
        assert_eq!(too_soon(None, t0, UnixMillis(10_300), 5_000), Some(4_700));
        assert_eq!(too_soon(None, t0, UnixMillis(15_000), 5_000), None);
        assert_eq!(
            too_soon(Some(UnixMillis(15_000)), t0, UnixMillis(15_300), 5_000),
            Some(4_700)
        );
        assert_eq!(deadline(t0, 3_000, 500), UnixMillis(13_500));
    }
}
