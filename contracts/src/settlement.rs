//! The settlement interface, as a trait a blockchain escrow contract could
//! implement. [`Ledger`] is the reference implementation: each method is one
//! [`Op`] through [`Ledger::apply`].
//!
//! ## What an on-chain implementation needs
//!
//! * **Same arithmetic.** Amounts are integer micro-units (`u64`; a token with
//!   6 decimals), fees and shares are basis points rounded down
//!   ([`fee_for`](crate::fee_for)), every sum is checked. The marketplace
//!   fee is cumulative per escrow: a contract stores each escrow's gross
//!   paid and charges each payment
//!   [`fee_on_payment`](crate::fee_on_payment), the difference of the
//!   rounded-down fee on the gross after and before it. An implementation
//!   must return the same [`Applied`] as [`Ledger`] for the same history, so
//!   an auditor can replay chain events through [`Ledger`] and compare.
//! * **Who submits what.** Deposits and withdrawals are the token's own
//!   transfers into and out of the contract (made by buyers, providers and
//!   verifiers themselves). `stake`/`unstake` are sent by the provider from
//!   its own address. `lock` is authorised by the buyer (an allowance or a
//!   signed `JobSubmission` the contract checks) and relayed by the
//!   coordinator. `settle_interval`, `release`, `refund` and `slash` are sent
//!   by the coordinator's operator address; a contract that trusts the
//!   coordinator less would additionally check the provider's signed usage
//!   report (`settle_interval`), the buyer-accepted receipt (`release`) or a
//!   verifier's signed attestation (`slash`), and open a dispute window
//!   before paying out. `unstake` would then also need an unbonding delay
//!   longer than that window, so stake cannot leave ahead of a pending slash.
//! * **Finality.** An op counts as applied only once its block is final.
//!   The coordinator must not dispatch a job before its `lock` is final, and
//!   must treat a reorged-out op as not applied (resubmitting it with the same
//!   key is safe, see below).
//! * **Idempotency keys are not transaction nonces.** An account nonce orders
//!   and de-duplicates *transactions*; a resubmission after a timeout gets a
//!   new nonce, so nonces alone would double-apply. The contract keeps the set
//!   of applied keys (`mapping(bytes32 => bool)`, keyed by a hash of the
//!   [`OpKey`]) and treats a known key as a no-op returning the original
//!   effect, exactly as [`Ledger::apply`] does. Nonces still matter for
//!   throughput: the coordinator should send ops from one address with
//!   increasing nonces so they are applied in the order it chose.
//! * **The ledger chain becomes the block chain.** Signed, hash-chained
//!   [`LedgerEntry`](crate::LedgerEntry)s exist because a coordinator's
//!   database can be rewritten; on-chain, the emitted events (one per
//!   applied op, carrying the op and its effect) play that role, and
//!   `kiln ledger verify` would read them instead.
//! * **Burns** go to the token's burn function or a dead address and are
//!   emitted in the event, so conservation stays checkable.

use kiln_protocol::{BuyerId, Credits, JobId, ProviderId};

use crate::account::OpKey;
use crate::ledger::{Applied, ContractError, Ledger, Op};

/// How a slash is divided: `buyer_share_bps` to the wronged buyer,
/// `verifier_share_bps` to `verifier` (which must be set for a non-zero
/// share), and the rest burned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlashSplit {
    pub buyer_share_bps: u16,
    pub verifier: Option<ProviderId>,
    pub verifier_share_bps: u16,
}

/// Escrow, stake and slashing, keyed for idempotency. Every method records
/// one event under `key`: calling it again with the same key and arguments
/// returns the original effect and changes nothing. See the module docs for
/// what an on-chain implementation needs.
pub trait Settlement {
    type Error;

    /// Moves `amount` of the buyer's funds into `job`'s escrow (maximum price
    /// × maximum duration, at submission).
    fn lock(
        &mut self,
        key: OpKey,
        job: JobId,
        buyer: BuyerId,
        amount: Credits,
    ) -> Result<Applied, Self::Error>;
    /// Pays one interval of a running job from its escrow, less the fee.
    /// Refuses (so the job must stop) when the escrow holds less than `cost`.
    fn settle_interval(
        &mut self,
        key: OpKey,
        job: JobId,
        provider: ProviderId,
        cost: Credits,
        fee_bps: u16,
    ) -> Result<Applied, Self::Error>;
    /// Closes the escrow: pays the part of the total `cost` intervals have
    /// not paid (less the fee), refunds the rest.
    fn release(
        &mut self,
        key: OpKey,
        job: JobId,
        provider: ProviderId,
        cost: Credits,
        fee_bps: u16,
    ) -> Result<Applied, Self::Error>;
    /// Closes the escrow, returning what it still holds to the buyer.
    fn refund(&mut self, key: OpKey, job: JobId) -> Result<Applied, Self::Error>;
    /// Bonds `amount` of the provider's funds.
    fn stake(
        &mut self,
        key: OpKey,
        provider: ProviderId,
        amount: Credits,
    ) -> Result<Applied, Self::Error>;
    /// Returns `amount` of the bond to the provider; never slashed stake.
    fn unstake(
        &mut self,
        key: OpKey,
        provider: ProviderId,
        amount: Credits,
    ) -> Result<Applied, Self::Error>;
    /// Takes up to `amount` of the provider's bond for a wrong on `job`,
    /// divided by `split`.
    fn slash(
        &mut self,
        key: OpKey,
        provider: ProviderId,
        job: JobId,
        amount: Credits,
        split: SlashSplit,
    ) -> Result<Applied, Self::Error>;

    /// What `provider` has bonded now.
    fn bonded(&self, provider: &ProviderId) -> Credits;
    /// What `job`'s escrow still holds (0 if none or closed).
    fn escrow_remaining(&self, job: &JobId) -> Credits;
    /// Whether `provider` has at least `min_stake` bonded.
    fn eligible(&self, provider: &ProviderId, min_stake: Credits) -> bool {
        self.bonded(provider) >= min_stake
    }
}

impl Settlement for Ledger {
    type Error = ContractError;

    fn lock(
        &mut self,
        key: OpKey,
        job: JobId,
        buyer: BuyerId,
        amount: Credits,
    ) -> Result<Applied, ContractError> {
        self.apply(Op::Lock {
            key,
            job,
            buyer,
            amount,
        })
    }
    fn settle_interval(
        &mut self,
        key: OpKey,
        job: JobId,
        provider: ProviderId,
        cost: Credits,
        fee_bps: u16,
    ) -> Result<Applied, ContractError> {
        self.apply(Op::SettleInterval {
            key,
            job,
            provider,
            cost,
            fee_bps,
        })
    }
    fn release(
        &mut self,
        key: OpKey,
        job: JobId,
        provider: ProviderId,
        cost: Credits,
        fee_bps: u16,
    ) -> Result<Applied, ContractError> {
        self.apply(Op::Release {
            key,
            job,
            provider,
            cost,
            fee_bps,
        })
    }
    fn refund(&mut self, key: OpKey, job: JobId) -> Result<Applied, ContractError> {
        self.apply(Op::Refund { key, job })
    }
    fn stake(
        &mut self,
        key: OpKey,
        provider: ProviderId,
        amount: Credits,
    ) -> Result<Applied, ContractError> {
        self.apply(Op::Stake {
            key,
            provider,
            amount,
        })
    }
    fn unstake(
        &mut self,
        key: OpKey,
        provider: ProviderId,
        amount: Credits,
    ) -> Result<Applied, ContractError> {
        self.apply(Op::Unstake {
            key,
            provider,
            amount,
        })
    }
    fn slash(
        &mut self,
        key: OpKey,
        provider: ProviderId,
        job: JobId,
        amount: Credits,
        split: SlashSplit,
    ) -> Result<Applied, ContractError> {
        self.apply(Op::Slash {
            key,
            provider,
            job,
            amount,
            buyer_share_bps: split.buyer_share_bps,
            verifier: split.verifier,
            verifier_share_bps: split.verifier_share_bps,
        })
    }
    fn bonded(&self, provider: &ProviderId) -> Credits {
        self.bond(provider)
    }
    fn escrow_remaining(&self, job: &JobId) -> Credits {
        self.escrow(job).map(|e| e.held()).unwrap_or_default()
    }
}
