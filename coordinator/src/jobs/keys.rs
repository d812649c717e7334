//! Idempotency keys for ledger operations, one constructor per kind, so a
//! retried or raced settlement applies once and two kinds can never
//! collide. Each member's payments are keyed by its own offer id: a new
//! attempt (a new offer) never collides with, or inherits, an earlier one.

use kiln_contracts::{AccountId, OpKey};
use kiln_protocol::{JobId, Nonce, OfferId, ProviderId};

/// The escrow of a job, locked at submission.
pub fn lock(job: &JobId) -> OpKey {
    OpKey::new(format!("lock:{job}"))
}

/// The escrow's close (the rest refunded to the buyer): once per job.
pub fn close(job: &JobId) -> OpKey {
    OpKey::new(format!("settle:{job}"))
}

/// A devnet faucet grant: once per account.
pub fn faucet(account: &AccountId) -> OpKey {
    OpKey::new(format!("faucet:{account}"))
}

/// Why a member is paid.
#[derive(Clone, Copy, Debug)]
pub enum PayPoint {
    /// Its `n`th usage report.
    Interval(u64),
    /// Its verified receipt.
    Result,
}

/// One payment to one member.
pub fn pay(offer: &OfferId, at: PayPoint) -> OpKey {
    match at {
        PayPoint::Interval(n) => OpKey::new(format!("pay:{offer}:interval:{n}")),
        PayPoint::Result => OpKey::new(format!("pay:{offer}:result")),
    }
}

/// The slash of the member `offer` whose result lost a verification:
/// once per member.
pub fn slash(offer: &OfferId) -> OpKey {
    OpKey::new(format!("slash:{offer}"))
}

/// A stake change, keyed by the signed request's nonce.
pub fn stake(provider: &ProviderId, nonce: &Nonce) -> OpKey {
    OpKey::new(format!("stake:{provider}:{nonce}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::{BuyerId, Keypair};

    #[test]
    fn keys_of_different_kinds_and_members_never_collide() {
        let buyer = BuyerId::new(Keypair::generate().public());
        let job = JobId::derive(&buyer, &Nonce::random());
        let (a, b) = (OfferId::random(), OfferId::random());
        let keys = [
            lock(&job),
            close(&job),
            pay(&a, PayPoint::Interval(1)),
            pay(&a, PayPoint::Interval(2)),
            pay(&a, PayPoint::Result),
            pay(&b, PayPoint::Interval(1)),
            pay(&b, PayPoint::Result),
            slash(&a),
            slash(&b),
        ];
        let unique: std::collections::HashSet<_> = keys.iter().map(|k| format!("{k:?}")).collect();
        assert_eq!(unique.len(), keys.len());
    }
}
