//! # kiln-contracts
//!
//! The settlement rules of the Kiln marketplace: who holds how many credits,
//! what is locked for which job, and how a job's escrow is paid out or
//! refunded. It is a pure state machine — no I/O, no clock, no randomness, no
//! async — so the coordinator, a test, or an auditor replaying history all
//! compute byte-for-byte the same result from the same inputs.
//!
//! ## The model
//!
//! A [`Ledger`] holds account balances ([`AccountId`] → [`Credits`]: buyers,
//! providers, verifiers and the fee account), one [`Escrow`] per job, one
//! stake [`Bond`] per provider, running totals of deposits, withdrawals and
//! burned credits, and the set of applied operations. Every change is an
//! [`Op`] applied with [`Ledger::apply`], which returns an [`Applied`] effect
//! or a [`ContractError`] and leaves the ledger exactly as it was. A job's life:
//!
//! 1. `Deposit` credits a buyer (after the payment rail confirmed the money).
//! 2. `Lock` moves the job's maximum cost (`JobSpec::max_cost`: maximum price
//!    × maximum duration) from the buyer into the job's escrow, before the
//!    job is dispatched.
//! 3. For a long job, `SettleInterval` pays each interval the provider
//!    reported (`cost` less the fee) out of the escrow, leaving it open. When
//!    the escrow cannot cover an interval it fails with
//!    [`ContractError::EscrowExhausted`]: the coordinator stops the job.
//! 4. `Release` closes the escrow: the job's total `cost =
//!    kiln_protocol::spec::cost_for(price, metered_millis)` (capped at what
//!    was locked, and at least what intervals paid) — its part not yet paid by
//!    intervals goes to the provider less the marketplace fee, the fee to
//!    [`AccountId::Fee`], the rest back to the buyer. The fee is cumulative
//!    per escrow ([`fee_on_payment`]): an escrow's fees always total
//!    [`fee_for`] of what it paid out gross ([`Escrow::gross_paid`]),
//!    however that was split into intervals. Or `Refund`
//!    returns everything the escrow still holds (the job failed or was
//!    cancelled). Either happens at most once.
//! 5. `Withdraw` pays a balance out.
//!
//! Providers `Stake` part of their balance into a bond (eligibility for jobs:
//! [`Ledger::is_eligible`]) and `Unstake` it back. A `Slash` takes from the
//! bond — paying the wronged buyer and a verifier's bounty
//! ([`AccountId::Verifier`]) by basis points and burning the rest
//! ([`Ledger::total_burned`]); slashed stake is gone and can never be
//! unstaked. [`Settlement`] is the same interface as a trait a blockchain
//! escrow contract could implement; [`chain`] records every applied op as a
//! signed, hash-chained [`LedgerEntry`] that anyone can verify.
//!
//! ```
//! use kiln_contracts::{AccountId, Applied, Credits, JobId, Ledger, Op, OpKey};
//! # let buyer = kiln_protocol::BuyerId::new(kiln_protocol::Keypair::from_secret_bytes([1; 32]).public());
//! # let provider = kiln_protocol::ProviderId::from_public_key(&kiln_protocol::Keypair::from_secret_bytes([2; 32]).public());
//! let job = JobId::from_bytes([7; 16]);
//! let mut ledger = Ledger::new();
//! ledger.apply(Op::Deposit { key: OpKey::new("deposit:tx-1"), account: AccountId::Buyer(buyer), amount: Credits(1_000_000) })?;
//! ledger.apply(Op::Lock { key: OpKey::new(format!("lock:{job}")), job, buyer, amount: Credits(600_000) })?;
//! // 30 minutes at 1 credit/hour, 2.5% fee.
//! let cost = kiln_protocol::spec::cost_for(Credits(1_000_000), 30 * 60_000).unwrap();
//! let settle = Op::Release { key: OpKey::new(format!("settle:{job}")), job, provider, cost, fee_bps: 250 };
//! let effect = ledger.apply(settle.clone())?;
//! assert!(matches!(effect, Applied::Released { paid: Credits(487_500), fee: Credits(12_500), refunded: Credits(100_000), .. }));
//! assert_eq!(ledger.apply(settle)?, effect); // a retry moves nothing
//! assert_eq!(ledger.balance(&AccountId::Buyer(buyer)), Credits(500_000));
//! ledger.check_invariants()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Why integers
//!
//! Money is `Credits(u64)` micro-credits. Floats round differently across
//! machines and lose micro-credits silently; two parties checking a settlement
//! must agree exactly. Every sum is checked: overflow is an error, never a
//! wrap. Rounding is stated, not accidental: cost rounds up (`cost_for`), the
//! fee rounds down once per escrow, on its cumulative gross (in the
//! provider's favour, but splitting cannot shave it), slash shares round
//! down (the remainder is burned), and a buyer never pays more than it
//! locked.
//! [`Ledger::check_invariants`] proves conservation: balances plus what open
//! escrows hold plus bonds always equal deposits minus withdrawals minus
//! burns.
//!
//! ## Why idempotency keys
//!
//! The coordinator can crash after its database committed but before it
//! answered; a provider can resend a receipt; an HTTP client can retry. Each
//! [`Op`] carries an [`OpKey`] naming the real-world event it records, and
//! applying a key a second time is a no-op that returns the original effect,
//! so a retry can never move money twice. Derive keys from the event, not from
//! the attempt: `deposit:<payment tx id>`, `lock:<job>`, `settle:<job>`,
//! `withdraw:<request id>`, `interval:<job>:<n>`, `stake:<request id>`,
//! `slash:<job>:<evidence hash>`. Reusing a key for a *different* op is a bug and
//! fails with [`ContractError::KeyReused`]. Failed ops are not recorded, so an
//! op refused for lack of funds may be retried with the same key later.
//!
//! ## Interval settlement
//!
//! For a long job the provider sends a signed usage report every interval;
//! the coordinator checks it and applies `SettleInterval { key:
//! interval:<job>:<n>, cost: cost of that interval }` at once. That bounds
//! both sides' exposure to one interval: the provider has at most the
//! interval in progress unpaid, and the buyer pays only for intervals a
//! signed report covers — if reports stop (or a sampled verification fails),
//! the coordinator stops the job, so at most one interval of unverified work
//! is paid for, and a `Slash` can make the buyer whole from the provider's
//! bond. The contract enforces the money side: an interval is paid only from
//! what the escrow still holds (otherwise
//! [`EscrowExhausted`](ContractError::EscrowExhausted): stop the job), and
//! the final `Release` pays `cost_total − already_paid` and refunds the rest.
//! Fees are rounded down once, on the escrow's cumulative gross, not per
//! payment: each payment takes `fee_for(gross after) − fee_for(gross before)`
//! ([`fee_on_payment`]), so splitting a job into ever smaller intervals
//! cannot shave the fee (a thousand 1 µcr intervals at 1% take 10 µcr, as a
//! single 1000 µcr payment does). See the `ledger` module for the rule and
//! its compatibility note: ledgers written under the earlier per-payment
//! rounding may replay with different fees.
//!
//! ## How the coordinator uses it
//!
//! In one database transaction: load the ledger (it is plain serde data; in
//! the walking skeleton, the whole of it), `ledger.apply(op)?`, persist the
//! new ledger and the returned effect, commit. On `Err` roll back — there is
//! nothing to undo, the ledger is unchanged. Fields are private so that state
//! only changes through `apply`; run `check_invariants` after loading from
//! storage to catch corruption early. With the auditable ledger, each op
//! applied under a new key also gets a [`ChainBuilder::append`]ed entry,
//! stored in the same transaction (see [`chain`]).
//!
//! ## Encodings
//!
//! [`Op`], [`Applied`], [`Ledger`] and signed [`LedgerEntry`]s round-trip
//! through both JSON and the canonical binary encoding
//! ([`kiln_protocol::encoding`], bincode: not self-describing, so no tagged
//! or flattened enums and no skipped fields here). New `Op`/`Applied`
//! variants are only ever appended, since the binary form names a variant by
//! its index; new fields of stored types get `#[serde(default)]` for JSON.

mod account;
pub mod chain;
mod ledger;
pub mod settlement;

pub use account::{AccountId, OpKey};
pub use chain::{
    ChainBuilder, ChainError, ChainFault, GENESIS_PREV, LedgerEntry, Mismatch, NEVER_EXPIRES,
    compare_balances, entry_hash, verify_chain,
};
pub use kiln_protocol::{BuyerId, Credits, JobId, ProviderId};
pub use ledger::{
    Applied, AppliedOp, Bond, ContractError, Escrow, EscrowState, InvariantViolation, Ledger,
    MAX_FEE_BPS, MAX_KEY_LEN, Op, fee_for, fee_on_payment,
};
pub use settlement::{Settlement, SlashSplit};
