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
//! A [`Ledger`] holds account balances ([`AccountId`] → [`Credits`]), one
//! [`Escrow`] per job, running totals of deposits and withdrawals, and the set
//! of applied operations. Every change is an [`Op`] applied with
//! [`Ledger::apply`], which returns an [`Applied`] effect or a
//! [`ContractError`] and leaves the ledger exactly as it was. A job's life:
//!
//! 1. `Deposit` credits a buyer (after the payment rail confirmed the money).
//! 2. `Lock` moves the job's maximum cost (`JobSpec::max_cost`) from the buyer
//!    into the job's escrow, before the job is dispatched.
//! 3. `Release` settles it: `cost = kiln_protocol::spec::cost_for(price,
//!    metered_millis)` (capped at what was locked) goes to the provider less
//!    the marketplace fee ([`fee_for`]), the fee to [`AccountId::Fee`], the
//!    rest back to the buyer. Or `Refund` returns everything (the job failed
//!    before starting, or was cancelled). Either happens at most once.
//! 4. `Withdraw` pays a balance out.
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
//! fee rounds down (in the provider's favour), and a buyer never pays more
//! than it locked. [`Ledger::check_invariants`] proves conservation: balances
//! plus locked escrows always equal deposits minus withdrawals.
//!
//! ## Why idempotency keys
//!
//! The coordinator can crash after its database committed but before it
//! answered; a provider can resend a receipt; an HTTP client can retry. Each
//! [`Op`] carries an [`OpKey`] naming the real-world event it records, and
//! applying a key a second time is a no-op that returns the original effect,
//! so a retry can never move money twice. Derive keys from the event, not from
//! the attempt: `deposit:<payment tx id>`, `lock:<job>`, `settle:<job>`,
//! `withdraw:<request id>`. Reusing a key for a *different* op is a bug and
//! fails with [`ContractError::KeyReused`]. Failed ops are not recorded, so an
//! op refused for lack of funds may be retried with the same key later.
//!
//! ## How the coordinator uses it
//!
//! In one database transaction: load the ledger (it is plain serde data; in
//! the walking skeleton, the whole of it), `ledger.apply(op)?`, persist the
//! new ledger and the returned effect, commit. On `Err` roll back — there is
//! nothing to undo, the ledger is unchanged. Fields are private so that state
//! only changes through `apply`; run `check_invariants` after loading from
//! storage to catch corruption early. Later, an op touches at most three
//! accounts, one escrow and one key, so the coordinator can load just those
//! rows plus the totals.
//!
//! ## Where later rules go (not built yet)
//!
//! All are additive: new [`Op`] variants and new fields with `#[serde(default)]`.
//! * **Stake bonds**: an `AccountId::Bond(ProviderId)` account and
//!   `Bond`/`Unbond` ops moving a provider's balance in and out of it.
//! * **Slashing**: a `Slash { provider, amount, to, evidence }` op taking from
//!   the bond to the harmed buyer and/or `Fee`, keyed by the evidence's hash.
//! * **Interval payouts**: `EscrowState::Locked` gains a `paid_so_far`, a
//!   `PayInterval { job, n, cost }` op (key `pay:<job>:<n>`) pays part, and
//!   `Release` settles the remainder; conservation is unchanged.
//! * **Hash-chained ledger**: the applied-op map becomes an index over an
//!   append-only log of `(seq, prev_hash, op, effect)` hashed with blake3 over
//!   the canonical encoding, so an auditor can replay and verify history.

mod account;
mod ledger;

pub use account::{AccountId, OpKey};
pub use kiln_protocol::{BuyerId, Credits, JobId, ProviderId};
pub use ledger::{
    Applied, AppliedOp, ContractError, Escrow, EscrowState, InvariantViolation, Ledger,
    MAX_FEE_BPS, MAX_KEY_LEN, Op, fee_for,
};
