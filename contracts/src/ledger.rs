//! The ledger state machine: state, operations, effects, errors, invariants.
//!
//! ## Fees are cumulative per escrow
//!
//! The marketplace fee is not rounded per payment. Each escrow records what
//! it has paid out to providers, gross ([`Escrow::gross_paid`]: provider pay
//! plus fee, intervals and final release together) and the fee taken so far
//! ([`Escrow::fee_taken`]). A payment of `cost` out of an escrow that had
//! paid `g` gross takes the fee `fee_for(g + cost) − fee_for(g)`
//! ([`fee_on_payment`]), so with one `fee_bps` (it is constant per
//! coordinator) the fee an escrow has taken after *any* split into
//! `SettleInterval`s and a `Release` is exactly `fee_for(gross_paid)`:
//! 1000 intervals of 1 µcr at 100 bps take 10 µcr, as one payment of 1000
//! does. Before, each payment's fee was rounded down on its own, and a
//! provider reporting tiny intervals paid no fee at all. The rule is per
//! escrow, not per provider: the members of a gang job share their job's
//! escrow, so one member's payment may carry a micro-credit of rounding that
//! another member's payment left over. Should `fee_bps` change while an
//! escrow is open, each payment is charged at the rate it carries, on the
//! increment (never retroactively, never more than its cost).
//!
//! **Compatibility.** This rule replaced per-payment rounding (issue 11,
//! item 6). The encodings of [`Op`], [`Applied`] and signed entries are
//! unchanged (`Escrow::fee_taken` is a new field, `#[serde(default)]`), but
//! replaying a ledger written under the old rule can compute different
//! fees, hence different balances: an escrow that made more than one
//! payment (several intervals, or intervals and a release) may now take a
//! few micro-credits more fee, and [`crate::verify_chain`] reports the
//! first such entry as an effect mismatch (a coordinator then refuses to
//! start on that database). Ledgers whose escrows each made at most one
//! payment (a `Release` alone, or a single interval) replay identically.
//! There is no compatibility mode: an old chain with multi-payment escrows
//! is to be closed and archived, not replayed by this version.

use std::collections::BTreeMap;

use kiln_protocol::{BuyerId, Credits, JobId, ProviderId};
use serde::{Deserialize, Serialize};

use crate::account::{AccountId, OpKey};

/// 100% in basis points.
pub const MAX_FEE_BPS: u16 = 10_000;
/// Longest accepted [`OpKey`], in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// `fee_bps` of `cost`: `cost * fee_bps / 10_000`, rounded down. The
/// marketplace fee an escrow takes in all is this of its cumulative gross
/// payments ([`Escrow::gross_paid`]); a single payment's share of it is
/// [`fee_on_payment`]. `fee_bps` above [`MAX_FEE_BPS`] counts as 100%, so
/// the fee never exceeds the cost (`apply` refuses such a rate outright).
/// Slash shares use the same rule.
pub fn fee_for(cost: Credits, fee_bps: u16) -> Credits {
    let fee = u128::from(cost.0) * u128::from(fee_bps.min(MAX_FEE_BPS)) / u128::from(MAX_FEE_BPS);
    // fee <= cost, so it always fits back into a u64.
    Credits(u64::try_from(fee).unwrap_or(cost.0))
}

/// The fee on a payment of `cost` out of an escrow that has already paid
/// `gross_before` gross: `fee_for(gross_before + cost) − fee_for(gross_before)`
/// (computed without overflow). Summed over an escrow's payments at one rate
/// this is `fee_for` of their total, whatever their sizes: the fee is
/// rounded down once, on the cumulative amount, not once per payment. It is
/// never more than `cost` (nor than `cost`'s fee rounded up).
pub fn fee_on_payment(gross_before: Credits, cost: Credits, fee_bps: u16) -> Credits {
    let bps = u128::from(fee_bps.min(MAX_FEE_BPS));
    let cumulative = |gross: u128| gross * bps / u128::from(MAX_FEE_BPS);
    let before = u128::from(gross_before.0);
    let fee = cumulative(before + u128::from(cost.0)) - cumulative(before);
    // floor(x + y) - floor(x) <= ceil(y) and ceil(cost * bps / 10_000) <= cost:
    // it always fits back into a u64.
    Credits(u64::try_from(fee).unwrap_or(cost.0))
}

/// Where a job's escrow stands. `Locked` is the only state that can change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscrowState {
    /// Open: interval settlements may still pay out of it.
    Locked,
    /// Closed by a final release: `paid` (the final part of the cost, less
    /// fee) to the provider, `fee` to the fee account, `refunded` to the
    /// buyer. With what intervals paid before
    /// ([`Escrow::interval_paid`]) the four sum to `locked`.
    Released {
        to: ProviderId,
        paid: Credits,
        refunded: Credits,
        fee: Credits,
    },
    /// Closed by a refund: everything intervals had not paid went back to the
    /// buyer (`interval_paid + refunded == locked`).
    Refunded { refunded: Credits },
}

/// Credits set aside from a buyer for one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escrow {
    pub job: JobId,
    pub buyer: BuyerId,
    pub locked: Credits,
    pub state: EscrowState,
    /// Gross credits (provider pay plus fee) that
    /// [`Op::SettleInterval`]s paid out of this escrow.
    #[serde(default)]
    pub interval_paid: Credits,
    /// How many intervals were settled.
    #[serde(default)]
    pub intervals: u64,
    /// The marketplace fee taken out of this escrow so far, by intervals
    /// and the final release together. With one fee rate it is always
    /// `fee_for(self.gross_paid(), fee_bps)` (see [`fee_on_payment`]).
    #[serde(default)]
    pub fee_taken: Credits,
}

impl Escrow {
    /// Credits this escrow still holds: `locked` less what intervals paid
    /// while it is open, 0 once closed.
    pub fn held(&self) -> Credits {
        match self.state {
            EscrowState::Locked => Credits(self.locked.0.saturating_sub(self.interval_paid.0)),
            _ => Credits(0),
        }
    }
    /// Whether the escrow can still pay out (it is neither released nor refunded).
    pub fn is_open(&self) -> bool {
        self.state == EscrowState::Locked
    }
    /// Gross credits (provider pay plus fee) this escrow has paid out to
    /// providers: what intervals paid, plus the final release's part once
    /// released. Refunds are not included.
    pub fn gross_paid(&self) -> Credits {
        let released = match self.state {
            EscrowState::Released { paid, fee, .. } => paid.0.saturating_add(fee.0),
            _ => 0,
        };
        Credits(self.interval_paid.0.saturating_add(released))
    }
    /// What providers received from this escrow, fee deducted:
    /// `gross_paid() − fee_taken`.
    pub fn net_paid(&self) -> Credits {
        Credits(self.gross_paid().0.saturating_sub(self.fee_taken.0))
    }
    /// The fee the next payment of `cost` out of this escrow would take
    /// (an interval, or a release's unpaid part): [`fee_on_payment`] after
    /// what it has paid so far. The provider would get `cost` less this.
    pub fn next_fee(&self, cost: Credits, fee_bps: u16) -> Credits {
        fee_on_payment(self.gross_paid(), cost, fee_bps)
    }
}

/// A provider's stake bond. Only `held` is money; the other three are
/// all-time totals kept so that `held == staked - unstaked - slashed` can be
/// checked, which is what makes "a slashed stake cannot be withdrawn" an
/// invariant rather than a hope.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bond {
    /// What is bonded now, and what eligibility and slashing look at.
    pub held: Credits,
    pub staked: Credits,
    pub unstaked: Credits,
    /// Taken by slashes: paid to buyers and verifiers, or burned. Gone.
    pub slashed: Credits,
}

/// A change to the ledger. Each carries the idempotency key of the event it records.
///
/// New variants are only ever appended: the canonical binary encoding names a
/// variant by its index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Money came in from outside (a confirmed payment).
    Deposit {
        key: OpKey,
        account: AccountId,
        amount: Credits,
    },
    /// Money goes out; fails if the account holds less than `amount`.
    Withdraw {
        key: OpKey,
        account: AccountId,
        amount: Credits,
    },
    /// Sets `amount` of the buyer's balance aside for `job` (at submission:
    /// maximum price × maximum duration).
    Lock {
        key: OpKey,
        job: JobId,
        buyer: BuyerId,
        amount: Credits,
    },
    /// Closes the escrow. `cost` is the job's *total* cost; it is capped at
    /// what was locked and raised to what intervals already paid. The part
    /// intervals have not paid goes to `provider` less the fee, the fee to
    /// [`AccountId::Fee`], and the rest of the escrow back to the buyer. The
    /// fee is cumulative ([`fee_on_payment`] after what intervals paid), so
    /// the escrow's fees total `fee_for(cost)`.
    Release {
        key: OpKey,
        job: JobId,
        provider: ProviderId,
        cost: Credits,
        fee_bps: u16,
    },
    /// Closes the escrow, returning all it still holds to the buyer
    /// (intervals already paid stay paid).
    Refund { key: OpKey, job: JobId },
    /// Moves `amount` of the provider's balance into its stake bond.
    Stake {
        key: OpKey,
        provider: ProviderId,
        amount: Credits,
    },
    /// Moves `amount` of the bond back to the provider's balance; fails if
    /// the bond holds less (slashed stake is gone from the bond, so it can
    /// never be unstaked).
    Unstake {
        key: OpKey,
        provider: ProviderId,
        amount: Credits,
    },
    /// Takes `min(amount, bond)` from the provider's bond for a wrong done
    /// on `job`: `buyer_share_bps` of it to the job's buyer,
    /// `verifier_share_bps` to `verifier` (a bounty; needs a verifier), and
    /// burns the rest (rounding included).
    Slash {
        key: OpKey,
        provider: ProviderId,
        job: JobId,
        amount: Credits,
        buyer_share_bps: u16,
        verifier: Option<ProviderId>,
        verifier_share_bps: u16,
    },
    /// Pays one interval of a running job from its escrow, leaving it open:
    /// `cost` less the fee to `provider`, the fee to [`AccountId::Fee`]. The
    /// fee is cumulative per escrow ([`fee_on_payment`] after what the
    /// escrow already paid), not rounded per interval.
    /// Fails with [`ContractError::EscrowExhausted`] when the escrow holds
    /// less than `cost`: the job must stop.
    SettleInterval {
        key: OpKey,
        job: JobId,
        provider: ProviderId,
        cost: Credits,
        fee_bps: u16,
    },
}

impl Op {
    pub fn key(&self) -> &OpKey {
        match self {
            Self::Deposit { key, .. }
            | Self::Withdraw { key, .. }
            | Self::Lock { key, .. }
            | Self::Release { key, .. }
            | Self::Refund { key, .. }
            | Self::Stake { key, .. }
            | Self::Unstake { key, .. }
            | Self::Slash { key, .. }
            | Self::SettleInterval { key, .. } => key,
        }
    }
    /// The op's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Deposit { .. } => "deposit",
            Self::Withdraw { .. } => "withdraw",
            Self::Lock { .. } => "lock",
            Self::Release { .. } => "release",
            Self::Refund { .. } => "refund",
            Self::Stake { .. } => "stake",
            Self::Unstake { .. } => "unstake",
            Self::Slash { .. } => "slash",
            Self::SettleInterval { .. } => "interval settlement",
        }
    }
}

/// What an applied [`Op`] did. Balances are those right after it applied.
///
/// New variants and fields are only ever appended (see [`Op`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    Deposited {
        account: AccountId,
        amount: Credits,
        balance: Credits,
    },
    Withdrawn {
        account: AccountId,
        amount: Credits,
        balance: Credits,
    },
    Locked {
        job: JobId,
        buyer: BuyerId,
        amount: Credits,
        balance: Credits,
    },
    /// `cost` is the job's total charged cost (the requested cost capped at
    /// the escrow, and at least `already_paid`); `already_paid` of it went out
    /// by intervals earlier, `paid + fee` now: `cost == already_paid + paid + fee`.
    Released {
        job: JobId,
        provider: ProviderId,
        buyer: BuyerId,
        cost: Credits,
        paid: Credits,
        fee: Credits,
        refunded: Credits,
        #[serde(default)]
        already_paid: Credits,
    },
    /// `refunded` is what the escrow still held; `already_paid` went out by
    /// intervals earlier.
    Refunded {
        job: JobId,
        buyer: BuyerId,
        refunded: Credits,
        #[serde(default)]
        already_paid: Credits,
    },
    /// `balance` is the provider's balance and `bond` its bond, after.
    Staked {
        provider: ProviderId,
        amount: Credits,
        balance: Credits,
        bond: Credits,
    },
    Unstaked {
        provider: ProviderId,
        amount: Credits,
        balance: Credits,
        bond: Credits,
    },
    /// `taken` left the bond (`bond` is what remains):
    /// `taken == to_buyer + to_verifier + burned`.
    Slashed {
        job: JobId,
        provider: ProviderId,
        buyer: BuyerId,
        taken: Credits,
        to_buyer: Credits,
        verifier: Option<ProviderId>,
        to_verifier: Credits,
        burned: Credits,
        bond: Credits,
    },
    /// Interval number `interval` (1-based) of `job`: `cost == paid + fee`
    /// left the escrow, which still holds `remaining`.
    IntervalSettled {
        job: JobId,
        provider: ProviderId,
        buyer: BuyerId,
        interval: u64,
        cost: Credits,
        paid: Credits,
        fee: Credits,
        remaining: Credits,
    },
}

impl Applied {
    /// How this effect changed each account's available balance (escrows and
    /// bonds are not balances): the lines of an account statement.
    pub fn balance_deltas(&self) -> Vec<(AccountId, i128)> {
        let c = |x: &Credits| i128::from(x.0);
        let mut d = match self {
            Applied::Deposited {
                account, amount, ..
            } => vec![(*account, c(amount))],
            Applied::Withdrawn {
                account, amount, ..
            } => vec![(*account, -c(amount))],
            Applied::Locked { buyer, amount, .. } => vec![(AccountId::Buyer(*buyer), -c(amount))],
            Applied::Released {
                provider,
                buyer,
                paid,
                fee,
                refunded,
                ..
            } => vec![
                (AccountId::Provider(*provider), c(paid)),
                (AccountId::Fee, c(fee)),
                (AccountId::Buyer(*buyer), c(refunded)),
            ],
            Applied::Refunded {
                buyer, refunded, ..
            } => vec![(AccountId::Buyer(*buyer), c(refunded))],
            Applied::Staked {
                provider, amount, ..
            } => vec![(AccountId::Provider(*provider), -c(amount))],
            Applied::Unstaked {
                provider, amount, ..
            } => vec![(AccountId::Provider(*provider), c(amount))],
            Applied::Slashed {
                buyer,
                to_buyer,
                verifier,
                to_verifier,
                ..
            } => {
                let mut v = vec![(AccountId::Buyer(*buyer), c(to_buyer))];
                if let Some(ver) = verifier {
                    v.push((AccountId::Verifier(*ver), c(to_verifier)));
                }
                v
            }
            Applied::IntervalSettled {
                provider,
                paid,
                fee,
                ..
            } => {
                vec![
                    (AccountId::Provider(*provider), c(paid)),
                    (AccountId::Fee, c(fee)),
                ]
            }
        };
        d.retain(|(_, x)| *x != 0);
        d
    }
}

/// An op that was applied, with its effect: what a replay of its key returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedOp {
    pub op: Op,
    pub effect: Applied,
}

/// Why an op was refused. The ledger is unchanged whenever one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    #[error("{account} holds {available} but {needed} is needed; deposit more or ask for less")]
    InsufficientFunds {
        account: Box<AccountId>,
        needed: Credits,
        available: Credits,
    },
    #[error("the {op} is for zero credits, which does nothing; send a positive amount")]
    ZeroAmount { op: &'static str },
    #[error(
        "job {job} already has an escrow; a job is locked once — derive a new job id for a new job"
    )]
    EscrowExists { job: JobId },
    #[error("job {job} has no escrow; lock funds for it before settling, refunding or slashing")]
    NoSuchEscrow { job: JobId },
    #[error(
        "the escrow of job {job} is already settled ({state:?}); \
         if this is a retry, reuse the original op key to get the original effect"
    )]
    AlreadySettled { job: JobId, state: Box<EscrowState> },
    #[error(
        "fee of {fee_bps} basis points is over 100% ({MAX_FEE_BPS}); check the fee configuration"
    )]
    InvalidFeeBps { fee_bps: u16 },
    #[error(
        "op key `{key}` already recorded a different {first}; this {now} needs its own key: \
         derive keys from the event being recorded"
    )]
    KeyReused {
        key: OpKey,
        first: &'static str,
        now: &'static str,
    },
    #[error(
        "op key `{key}` is invalid: {reason}; use 1 to {MAX_KEY_LEN} bytes naming the event, e.g. `lock:<job>`"
    )]
    InvalidKey { key: OpKey, reason: &'static str },
    #[error("{what} would overflow a u64 of micro-credits; the amount is implausibly large")]
    Overflow { what: &'static str },
    #[error(
        "escrow exhausted: the escrow of job {job} holds {remaining} but the interval costs {needed}; \
         stop the job and close the escrow with a release (it pays at most what is left)"
    )]
    EscrowExhausted {
        job: JobId,
        needed: Credits,
        remaining: Credits,
    },
    #[error(
        "provider {provider} has {bonded} staked but {needed} was asked for; \
         stake slashed so far ({slashed}) is gone and can never be unstaked"
    )]
    InsufficientStake {
        provider: Box<ProviderId>,
        needed: Credits,
        bonded: Credits,
        slashed: Credits,
    },
    #[error(
        "provider {provider} has no stake bonded, so there is nothing to slash; \
         check the provider id, or compensate the buyer from the job's escrow"
    )]
    NothingToSlash { provider: Box<ProviderId> },
    #[error(
        "slash split (buyer {buyer_share_bps} bps, verifier {verifier_share_bps} bps) is invalid: \
         {reason}; check the slashing configuration"
    )]
    InvalidSlash {
        buyer_share_bps: u16,
        verifier_share_bps: u16,
        reason: &'static str,
    },
}

/// A broken ledger invariant: a bug in this crate or corrupted storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvariantViolation {
    #[error(
        "credits are not conserved: balances {balances} + escrowed {escrowed} + bonded {bonded} != \
         deposited {deposited} - withdrawn {withdrawn} - burned {burned}; \
         stop settling and audit the op history"
    )]
    NotConserved {
        balances: u128,
        escrowed: u128,
        bonded: u128,
        deposited: Credits,
        withdrawn: Credits,
        burned: Credits,
    },
    #[error("escrow stored under job {key} says it is for job {job}; the stored ledger is corrupt")]
    Misfiled { key: JobId, job: JobId },
    #[error(
        "the escrow of job {job} locked {locked} but its settlement pays out {settled}; audit the op history"
    )]
    SettlementMismatch {
        job: JobId,
        locked: Credits,
        settled: u128,
    },
    #[error(
        "the escrow of job {job} was settled {times} times in the op history; audit the op history"
    )]
    SettledTwice { job: JobId, times: usize },
    #[error(
        "the escrow of job {job} records {recorded} paid by intervals but the op history \
         shows {history}; audit the op history"
    )]
    IntervalsMismatch {
        job: JobId,
        recorded: Credits,
        history: u128,
    },
    #[error(
        "the escrow of job {job} records {recorded} fee taken but the op history shows \
         {history} (of {gross} paid gross); audit the op history"
    )]
    FeeMismatch {
        job: JobId,
        recorded: Credits,
        history: u128,
        gross: Credits,
    },
    #[error(
        "the bond of {provider} holds {held} but staked {staked} - unstaked {unstaked} - \
         slashed {slashed} says otherwise; audit the op history"
    )]
    BondMismatch {
        provider: Box<ProviderId>,
        held: Credits,
        staked: Credits,
        unstaked: Credits,
        slashed: Credits,
    },
    #[error(
        "the bond of {provider} records {recorded} slashed but the op history shows {history}; \
         audit the op history"
    )]
    SlashMismatch {
        provider: Box<ProviderId>,
        recorded: Credits,
        history: u128,
    },
    #[error(
        "the ledger records {recorded} burned but its slashes burned {history}; audit the op history"
    )]
    BurnMismatch { recorded: Credits, history: u128 },
}

/// The settlement state: balances, escrows, stake bonds, totals and applied
/// ops. Fields are private; change it only through [`Ledger::apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    balances: BTreeMap<AccountId, Credits>,
    escrows: BTreeMap<JobId, Escrow>,
    #[serde(default)]
    bonds: BTreeMap<ProviderId, Bond>,
    deposited: Credits,
    withdrawn: Credits,
    #[serde(default)]
    burned: Credits,
    applied: BTreeMap<OpKey, AppliedOp>,
}

fn add(a: Credits, b: Credits, what: &'static str) -> Result<Credits, ContractError> {
    a.0.checked_add(b.0)
        .map(Credits)
        .ok_or(ContractError::Overflow { what })
}

fn sub(a: Credits, b: Credits, what: &'static str) -> Result<Credits, ContractError> {
    a.0.checked_sub(b.0)
        .map(Credits)
        .ok_or(ContractError::Overflow { what })
}

fn nonzero(amount: Credits, op: &'static str) -> Result<(), ContractError> {
    if amount.0 == 0 {
        Err(ContractError::ZeroAmount { op })
    } else {
        Ok(())
    }
}

fn check_fee(fee_bps: u16) -> Result<(), ContractError> {
    if fee_bps > MAX_FEE_BPS {
        Err(ContractError::InvalidFeeBps { fee_bps })
    } else {
        Ok(())
    }
}

fn wide(c: Credits) -> u128 {
    u128::from(c.0)
}

/// An open escrow's buyer, lock, what intervals already paid (gross) and
/// the fee they took.
struct Open {
    buyer: BuyerId,
    locked: Credits,
    already: Credits,
    intervals: u64,
    fee_taken: Credits,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }
    /// The balance of `account` (0 if it never held anything).
    pub fn balance(&self, account: &AccountId) -> Credits {
        self.balances.get(account).copied().unwrap_or_default()
    }
    pub fn balances(&self) -> &BTreeMap<AccountId, Credits> {
        &self.balances
    }
    pub fn escrow(&self, job: &JobId) -> Option<&Escrow> {
        self.escrows.get(job)
    }
    pub fn escrows(&self) -> &BTreeMap<JobId, Escrow> {
        &self.escrows
    }
    /// What `provider` has bonded now (0 if it never staked).
    pub fn bond(&self, provider: &ProviderId) -> Credits {
        self.bonds.get(provider).map(|b| b.held).unwrap_or_default()
    }
    /// Every provider's bond record, including all-time totals.
    pub fn bonds(&self) -> &BTreeMap<ProviderId, Bond> {
        &self.bonds
    }
    /// Whether `provider` has at least `min_stake` bonded, the condition for
    /// being offered jobs. With `min_stake` 0 every provider is eligible.
    pub fn is_eligible(&self, provider: &ProviderId, min_stake: Credits) -> bool {
        self.bond(provider) >= min_stake
    }
    pub fn total_deposited(&self) -> Credits {
        self.deposited
    }
    pub fn total_withdrawn(&self) -> Credits {
        self.withdrawn
    }
    /// Credits destroyed by slashes: the part of each slash that went to
    /// neither the buyer nor a verifier.
    pub fn total_burned(&self) -> Credits {
        self.burned
    }
    /// The op applied under `key`, and its effect, if any.
    pub fn applied(&self, key: &OpKey) -> Option<&AppliedOp> {
        self.applied.get(key)
    }
    pub fn applied_ops(&self) -> &BTreeMap<OpKey, AppliedOp> {
        &self.applied
    }

    /// Applies `op`. A key already applied with the same op returns the
    /// original effect and changes nothing. On error nothing changes.
    pub fn apply(&mut self, op: Op) -> Result<Applied, ContractError> {
        let key = op.key();
        let bad_key = if key.as_str().is_empty() {
            Some("it is empty")
        } else if key.as_str().len() > MAX_KEY_LEN {
            Some("it is longer than 256 bytes")
        } else {
            None
        };
        if let Some(reason) = bad_key {
            return Err(ContractError::InvalidKey {
                key: key.clone(),
                reason,
            });
        }
        if let Some(done) = self.applied.get(key) {
            return if done.op == op {
                Ok(done.effect.clone())
            } else {
                Err(ContractError::KeyReused {
                    key: key.clone(),
                    first: done.op.name(),
                    now: op.name(),
                })
            };
        }
        // Each arm computes every new value first (any of which may fail)
        // and only then writes, so an error leaves the ledger untouched.
        let effect = match op.clone() {
            Op::Deposit {
                account, amount, ..
            } => {
                nonzero(amount, "deposit")?;
                let balance = add(self.balance(&account), amount, "the balance")?;
                let deposited = add(self.deposited, amount, "total deposits")?;
                self.balances.insert(account, balance);
                self.deposited = deposited;
                Applied::Deposited {
                    account,
                    amount,
                    balance,
                }
            }
            Op::Withdraw {
                account, amount, ..
            } => {
                nonzero(amount, "withdraw")?;
                let balance = self.debit(account, amount)?;
                let withdrawn = add(self.withdrawn, amount, "total withdrawals")?;
                self.balances.insert(account, balance);
                self.withdrawn = withdrawn;
                Applied::Withdrawn {
                    account,
                    amount,
                    balance,
                }
            }
            Op::Lock {
                job, buyer, amount, ..
            } => {
                nonzero(amount, "lock")?;
                if self.escrows.contains_key(&job) {
                    return Err(ContractError::EscrowExists { job });
                }
                let balance = self.debit(AccountId::Buyer(buyer), amount)?;
                self.balances.insert(AccountId::Buyer(buyer), balance);
                self.escrows.insert(
                    job,
                    Escrow {
                        job,
                        buyer,
                        locked: amount,
                        state: EscrowState::Locked,
                        interval_paid: Credits(0),
                        intervals: 0,
                        fee_taken: Credits(0),
                    },
                );
                Applied::Locked {
                    job,
                    buyer,
                    amount,
                    balance,
                }
            }
            Op::Release {
                job,
                provider,
                cost,
                fee_bps,
                ..
            } => {
                check_fee(fee_bps)?;
                let Open {
                    buyer,
                    locked,
                    already,
                    fee_taken,
                    ..
                } = self.open_escrow(job)?;
                // Never more than was locked, never less than intervals paid.
                let cost = cost.min(locked).max(already);
                let due = sub(cost, already, "the final payment")?;
                // An open escrow's gross paid is what its intervals paid.
                let fee = fee_on_payment(already, due, fee_bps);
                let paid = sub(due, fee, "the provider's pay")?;
                let refunded = sub(locked, cost, "the refund")?;
                let fee_taken = add(fee_taken, fee, "the escrow's fees")?;
                let new = self.credited(&[
                    (AccountId::Provider(provider), paid),
                    (AccountId::Fee, fee),
                    (AccountId::Buyer(buyer), refunded),
                ])?;
                self.balances.extend(new);
                if let Some(escrow) = self.escrows.get_mut(&job) {
                    escrow.fee_taken = fee_taken;
                }
                self.close(
                    job,
                    EscrowState::Released {
                        to: provider,
                        paid,
                        refunded,
                        fee,
                    },
                );
                Applied::Released {
                    job,
                    provider,
                    buyer,
                    cost,
                    paid,
                    fee,
                    refunded,
                    already_paid: already,
                }
            }
            Op::Refund { job, .. } => {
                let Open {
                    buyer,
                    locked,
                    already,
                    ..
                } = self.open_escrow(job)?;
                let refunded = sub(locked, already, "the refund")?;
                let new = self.credited(&[(AccountId::Buyer(buyer), refunded)])?;
                self.balances.extend(new);
                self.close(job, EscrowState::Refunded { refunded });
                Applied::Refunded {
                    job,
                    buyer,
                    refunded,
                    already_paid: already,
                }
            }
            Op::Stake {
                provider, amount, ..
            } => {
                nonzero(amount, "stake")?;
                let account = AccountId::Provider(provider);
                let balance = self.debit(account, amount)?;
                let mut bond = self.bonds.get(&provider).cloned().unwrap_or_default();
                bond.held = add(bond.held, amount, "the bond")?;
                bond.staked = add(bond.staked, amount, "total staked")?;
                let held = bond.held;
                self.balances.insert(account, balance);
                self.bonds.insert(provider, bond);
                Applied::Staked {
                    provider,
                    amount,
                    balance,
                    bond: held,
                }
            }
            Op::Unstake {
                provider, amount, ..
            } => {
                nonzero(amount, "unstake")?;
                let account = AccountId::Provider(provider);
                let mut bond = self.bonds.get(&provider).cloned().unwrap_or_default();
                bond.held = bond
                    .held
                    .0
                    .checked_sub(amount.0)
                    .map(Credits)
                    .ok_or_else(|| ContractError::InsufficientStake {
                        provider: Box::new(provider),
                        needed: amount,
                        bonded: bond.held,
                        slashed: bond.slashed,
                    })?;
                bond.unstaked = add(bond.unstaked, amount, "total unstaked")?;
                let balance = add(self.balance(&account), amount, "the balance")?;
                let held = bond.held;
                self.balances.insert(account, balance);
                self.bonds.insert(provider, bond);
                Applied::Unstaked {
                    provider,
                    amount,
                    balance,
                    bond: held,
                }
            }
            Op::Slash {
                provider,
                job,
                amount,
                buyer_share_bps,
                verifier,
                verifier_share_bps,
                ..
            } => {
                nonzero(amount, "slash")?;
                let invalid = |reason| ContractError::InvalidSlash {
                    buyer_share_bps,
                    verifier_share_bps,
                    reason,
                };
                if u32::from(buyer_share_bps) + u32::from(verifier_share_bps)
                    > u32::from(MAX_FEE_BPS)
                {
                    return Err(invalid("the shares add up to more than 100% (10000 bps)"));
                }
                if verifier.is_none() && verifier_share_bps > 0 {
                    return Err(invalid(
                        "a verifier share needs a verifier to pay; set it to 0 to burn that part",
                    ));
                }
                if verifier == Some(provider) {
                    return Err(invalid("the slashed provider cannot be its own verifier"));
                }
                let buyer = self
                    .escrows
                    .get(&job)
                    .ok_or(ContractError::NoSuchEscrow { job })?
                    .buyer;
                let mut bond = self.bonds.get(&provider).cloned().unwrap_or_default();
                if bond.held.0 == 0 {
                    return Err(ContractError::NothingToSlash {
                        provider: Box::new(provider),
                    });
                }
                let taken = amount.min(bond.held);
                let to_buyer = fee_for(taken, buyer_share_bps);
                let to_verifier = fee_for(taken, verifier_share_bps);
                let burned = sub(sub(taken, to_buyer, "the burn")?, to_verifier, "the burn")?;
                bond.held = sub(bond.held, taken, "the bond")?;
                bond.slashed = add(bond.slashed, taken, "total slashed")?;
                let total_burned = add(self.burned, burned, "total burned")?;
                let mut credits = vec![(AccountId::Buyer(buyer), to_buyer)];
                if let Some(v) = verifier {
                    credits.push((AccountId::Verifier(v), to_verifier));
                }
                let new = self.credited(&credits)?;
                let held = bond.held;
                self.balances.extend(new);
                self.bonds.insert(provider, bond);
                self.burned = total_burned;
                Applied::Slashed {
                    job,
                    provider,
                    buyer,
                    taken,
                    to_buyer,
                    verifier,
                    to_verifier,
                    burned,
                    bond: held,
                }
            }
            Op::SettleInterval {
                job,
                provider,
                cost,
                fee_bps,
                ..
            } => {
                check_fee(fee_bps)?;
                nonzero(cost, "interval settlement")?;
                let Open {
                    buyer,
                    locked,
                    already,
                    intervals,
                    fee_taken,
                } = self.open_escrow(job)?;
                let remaining = sub(locked, already, "the escrow")?;
                let remaining = remaining.0.checked_sub(cost.0).map(Credits).ok_or(
                    ContractError::EscrowExhausted {
                        job,
                        needed: cost,
                        remaining,
                    },
                )?;
                // An open escrow's gross paid is what its intervals paid.
                let fee = fee_on_payment(already, cost, fee_bps);
                let paid = sub(cost, fee, "the provider's pay")?;
                let interval_paid = add(already, cost, "interval payments")?;
                let fee_taken = add(fee_taken, fee, "the escrow's fees")?;
                let interval = intervals.checked_add(1).ok_or(ContractError::Overflow {
                    what: "the interval count",
                })?;
                let new =
                    self.credited(&[(AccountId::Provider(provider), paid), (AccountId::Fee, fee)])?;
                self.balances.extend(new);
                if let Some(escrow) = self.escrows.get_mut(&job) {
                    escrow.interval_paid = interval_paid;
                    escrow.intervals = interval;
                    escrow.fee_taken = fee_taken;
                }
                Applied::IntervalSettled {
                    job,
                    provider,
                    buyer,
                    interval,
                    cost,
                    paid,
                    fee,
                    remaining,
                }
            }
        };
        self.applied.insert(
            op.key().clone(),
            AppliedOp {
                op,
                effect: effect.clone(),
            },
        );
        Ok(effect)
    }

    /// The balance `account` would have after paying `amount`, if it can.
    fn debit(&self, account: AccountId, amount: Credits) -> Result<Credits, ContractError> {
        let available = self.balance(&account);
        available
            .0
            .checked_sub(amount.0)
            .map(Credits)
            .ok_or_else(|| ContractError::InsufficientFunds {
                account: Box::new(account),
                needed: amount,
                available,
            })
    }

    /// The new balances after crediting each (distinct) account; zero
    /// amounts are skipped so that they create no empty accounts.
    fn credited(
        &self,
        credits: &[(AccountId, Credits)],
    ) -> Result<Vec<(AccountId, Credits)>, ContractError> {
        let mut new = Vec::with_capacity(credits.len());
        for &(account, amount) in credits {
            if amount.0 > 0 {
                new.push((account, add(self.balance(&account), amount, "a balance")?));
            }
        }
        Ok(new)
    }

    /// `job`'s escrow, if it exists and is still open.
    fn open_escrow(&self, job: JobId) -> Result<Open, ContractError> {
        let escrow = self
            .escrows
            .get(&job)
            .ok_or(ContractError::NoSuchEscrow { job })?;
        match escrow.state {
            EscrowState::Locked => Ok(Open {
                buyer: escrow.buyer,
                locked: escrow.locked,
                already: escrow.interval_paid,
                intervals: escrow.intervals,
                fee_taken: escrow.fee_taken,
            }),
            ref state => Err(ContractError::AlreadySettled {
                job,
                state: Box::new(state.clone()),
            }),
        }
    }

    fn close(&mut self, job: JobId, state: EscrowState) {
        if let Some(escrow) = self.escrows.get_mut(&job) {
            escrow.state = state;
        }
    }

    /// Checks, over the state and the whole op history:
    ///
    /// * conservation: balances + what open escrows hold + bonds ==
    ///   deposits − withdrawals − burned;
    /// * every escrow paid out no more than it locked, and a closed one
    ///   exactly what it locked (intervals + final release/refund);
    /// * what each escrow records as paid by intervals, and as fee taken,
    ///   matches the history, and its fee is no more than it paid gross;
    /// * no escrow was closed twice in the history;
    /// * every bond holds exactly staked − unstaked − slashed (so slashed
    ///   stake was never unstaked), and its slashed total matches the history;
    /// * the burned total matches the burns the history records.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        // u128 sums of u64 values cannot overflow.
        let balances: u128 = self.balances.values().map(|c| wide(*c)).sum();
        let escrowed: u128 = self.escrows.values().map(|e| wide(e.held())).sum();
        let bonded: u128 = self.bonds.values().map(|b| wide(b.held)).sum();
        let net = wide(self.deposited)
            .checked_sub(wide(self.withdrawn))
            .and_then(|n| n.checked_sub(wide(self.burned)));
        if net != Some(balances + escrowed + bonded) {
            return Err(InvariantViolation::NotConserved {
                balances,
                escrowed,
                bonded,
                deposited: self.deposited,
                withdrawn: self.withdrawn,
                burned: self.burned,
            });
        }
        for (&key, e) in &self.escrows {
            if e.job != key {
                return Err(InvariantViolation::Misfiled { key, job: e.job });
            }
            let settled = wide(e.interval_paid)
                + match e.state {
                    EscrowState::Locked => 0,
                    EscrowState::Released {
                        paid,
                        refunded,
                        fee,
                        ..
                    } => wide(paid) + wide(refunded) + wide(fee),
                    EscrowState::Refunded { refunded } => wide(refunded),
                };
            let ok = if e.is_open() {
                settled <= wide(e.locked)
            } else {
                settled == wide(e.locked)
            };
            if !ok {
                return Err(InvariantViolation::SettlementMismatch {
                    job: key,
                    locked: e.locked,
                    settled,
                });
            }
        }
        for (provider, b) in &self.bonds {
            if wide(b.held) + wide(b.unstaked) + wide(b.slashed) != wide(b.staked) {
                return Err(InvariantViolation::BondMismatch {
                    provider: Box::new(*provider),
                    held: b.held,
                    staked: b.staked,
                    unstaked: b.unstaked,
                    slashed: b.slashed,
                });
            }
        }
        let mut closes: BTreeMap<JobId, usize> = BTreeMap::new();
        let mut intervals: BTreeMap<JobId, u128> = BTreeMap::new();
        let mut fees: BTreeMap<JobId, u128> = BTreeMap::new();
        let mut slashed: BTreeMap<ProviderId, u128> = BTreeMap::new();
        let mut burned: u128 = 0;
        for done in self.applied.values() {
            match done.effect {
                Applied::Released { job, .. } | Applied::Refunded { job, .. } => {
                    if let Applied::Released { fee, .. } = done.effect {
                        *fees.entry(job).or_default() += wide(fee);
                    }
                    let times = closes.entry(job).or_default();
                    *times += 1;
                    if *times > 1 {
                        return Err(InvariantViolation::SettledTwice { job, times: *times });
                    }
                }
                Applied::IntervalSettled { job, cost, fee, .. } => {
                    *intervals.entry(job).or_default() += wide(cost);
                    *fees.entry(job).or_default() += wide(fee);
                }
                Applied::Slashed {
                    provider,
                    taken,
                    burned: b,
                    ..
                } => {
                    *slashed.entry(provider).or_default() += wide(taken);
                    burned += wide(b);
                }
                _ => {}
            }
        }
        for (&job, e) in &self.escrows {
            let history = intervals.remove(&job).unwrap_or(0);
            if history != wide(e.interval_paid) {
                return Err(InvariantViolation::IntervalsMismatch {
                    job,
                    recorded: e.interval_paid,
                    history,
                });
            }
        }
        if let Some((job, history)) = intervals.pop_first() {
            return Err(InvariantViolation::IntervalsMismatch {
                job,
                recorded: Credits(0),
                history,
            });
        }
        for (&job, e) in &self.escrows {
            let history = fees.remove(&job).unwrap_or(0);
            if history != wide(e.fee_taken) || e.fee_taken > e.gross_paid() {
                return Err(InvariantViolation::FeeMismatch {
                    job,
                    recorded: e.fee_taken,
                    history,
                    gross: e.gross_paid(),
                });
            }
        }
        if let Some((job, history)) = fees.pop_first() {
            return Err(InvariantViolation::FeeMismatch {
                job,
                recorded: Credits(0),
                history,
                gross: Credits(0),
            });
        }
        for (provider, b) in &self.bonds {
            let history = slashed.remove(provider).unwrap_or(0);
            if history != wide(b.slashed) {
                return Err(InvariantViolation::SlashMismatch {
                    provider: Box::new(*provider),
                    recorded: b.slashed,
                    history,
                });
            }
        }
        if let Some((provider, history)) = slashed.pop_first() {
            return Err(InvariantViolation::SlashMismatch {
                provider: Box::new(provider),
                recorded: Credits(0),
                history,
            });
        }
        if burned != wide(self.burned) {
            return Err(InvariantViolation::BurnMismatch {
                recorded: self.burned,
                history: burned,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AccountId::{Buyer, Fee, Provider, Verifier};
    use kiln_protocol::Keypair;

    fn b(i: u8) -> BuyerId {
        BuyerId::new(Keypair::from_secret_bytes([i; 32]).public())
    }
    fn p(i: u8) -> ProviderId {
        ProviderId::from_public_key(&Keypair::from_secret_bytes([100 + i; 32]).public())
    }
    fn j(i: u8) -> JobId {
        JobId::from_bytes([i; 16])
    }
    fn k(s: &str) -> OpKey {
        OpKey::new(s)
    }
    fn dep(key: &str, account: AccountId, n: u64) -> Op {
        Op::Deposit {
            key: k(key),
            account,
            amount: Credits(n),
        }
    }
    fn wd(key: &str, account: AccountId, n: u64) -> Op {
        Op::Withdraw {
            key: k(key),
            account,
            amount: Credits(n),
        }
    }
    fn lock(key: &str, job: u8, n: u64) -> Op {
        Op::Lock {
            key: k(key),
            job: j(job),
            buyer: b(1),
            amount: Credits(n),
        }
    }
    fn rel(key: &str, job: u8, cost: u64, fee_bps: u16) -> Op {
        Op::Release {
            key: k(key),
            job: j(job),
            provider: p(2),
            cost: Credits(cost),
            fee_bps,
        }
    }
    fn refund(key: &str, job: u8) -> Op {
        Op::Refund {
            key: k(key),
            job: j(job),
        }
    }

    /// b1 holds 500; job 1 has 600 locked; job 2 was released to p2 (100); job 3 refunded.
    fn funded() -> Ledger {
        let mut l = Ledger::new();
        for op in [
            dep("d", Buyer(b(1)), 1200),
            lock("l1", 1, 600),
            lock("l2", 2, 100),
            lock("l3", 3, 100),
            rel("r2", 2, 100, 0),
            refund("f3", 3),
        ] {
            l.apply(op).unwrap();
        }
        assert_eq!(l.balance(&Buyer(b(1))), Credits(500));
        l.check_invariants().unwrap();
        l
    }

    #[test]
    fn fee_rounds_down_and_never_exceeds_cost() {
        let max = u64::MAX;
        for (cost, bps, fee) in [
            (0, 250, 0),
            (100, 250, 2),
            (10_000, 250, 250),
            (99, 10_000, 99),
            (99, 60_000, 99),
            (max, 10_000, max),
            (max, 1, max / 10_000),
        ] {
            assert_eq!(
                fee_for(Credits(cost), bps),
                Credits(fee),
                "cost {cost} bps {bps}"
            );
        }
    }

    #[test]
    fn a_payment_takes_the_increment_of_the_cumulative_fee() {
        let max = u64::MAX;
        // (gross paid before, cost, bps, fee of this payment)
        for (before, cost, bps, fee) in [
            (0, 1, 100, 0),
            (98, 1, 100, 0),
            (99, 1, 100, 1),
            (100, 1, 100, 0),
            (0, 1000, 100, 10),
            (999, 1, 100, 1),
            (50, 100, 100, 1),
            (0, 300, 250, 7),
            (300, 300, 250, 8),
            (600, 300, 250, 7),
            (900, 100, 250, 3),
            (0, 0, 250, 0),
            (7, 0, 250, 0),
            (5, 7, 0, 0),
            (5, 7, 10_000, 7),
            (5, 7, 60_000, 7),
            (max, max, 10_000, max),
            (max, max, 1, 1_844_674_407_370_955),
            (max, 1, 10_000, 1),
        ] {
            assert_eq!(
                fee_on_payment(Credits(before), Credits(cost), bps),
                Credits(fee),
                "before {before} cost {cost} bps {bps}"
            );
        }
    }

    /// One step of a fee table case, all on job 1 (b1 locked 1_000_000).
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// `n` intervals of `cost` each, paid to provider `p`.
        Intervals {
            n: u32,
            cost: u64,
            p: u8,
        },
        /// Release with this total cost, to p2.
        Release(u64),
        Refund,
    }

    #[test]
    fn fees_are_cumulative_per_escrow_whatever_the_split() {
        use Step::*;
        let iv = |n, cost| Intervals { n, cost, p: 2 };
        // (name, bps, steps, fee account after, what each provider got)
        type Case = (&'static str, u16, Vec<Step>, u64, Vec<(u8, u64)>);
        let cases: Vec<Case> = vec![
            (
                "1000 intervals of 1 at 1%",
                100,
                vec![iv(1000, 1)],
                10,
                vec![(2, 990)],
            ),
            (
                "one interval of 1000",
                100,
                vec![iv(1, 1000)],
                10,
                vec![(2, 990)],
            ),
            (
                "one release of 1000",
                100,
                vec![Release(1000)],
                10,
                vec![(2, 990)],
            ),
            (
                "999 intervals of 1, release of 1000 in all",
                100,
                vec![iv(999, 1), Release(1000)],
                10,
                vec![(2, 990)],
            ),
            (
                "99 intervals of 1 pay no fee yet, the 100th pays 1",
                100,
                vec![iv(99, 1), Refund],
                0,
                vec![(2, 99)],
            ),
            (
                "100 intervals of 1",
                100,
                vec![iv(100, 1), Refund],
                1,
                vec![(2, 99)],
            ),
            (
                "intervals of 300 at 2.5%, release of 1000",
                250,
                vec![iv(3, 300), Release(1000)],
                25,
                vec![(2, 975)],
            ),
            (
                "intervals then a release below what they paid",
                250,
                vec![iv(3, 300), Release(10)],
                22,
                vec![(2, 878)],
            ),
            (
                "uneven intervals, release pays the rest",
                333,
                vec![iv(7, 13), iv(3, 1), iv(1, 4_000), Release(9_999)],
                332,
                vec![(2, 9_667)],
            ),
            (
                "5000 intervals of 1 µcr at 0.2%",
                20,
                vec![iv(5_000, 1)],
                10,
                vec![(2, 4_990)],
            ),
            (
                "no fee",
                0,
                vec![iv(500, 3), Release(2_000)],
                0,
                vec![(2, 2_000)],
            ),
            (
                "100% fee",
                10_000,
                vec![iv(10, 7), Release(100)],
                100,
                vec![],
            ),
            (
                // A gang: two members share the escrow, so the fee's rounding
                // falls on whichever payment crosses the next whole fee.
                "two members alternating 1 µcr intervals",
                100,
                (0..1000)
                    .map(|i| Intervals {
                        n: 1,
                        cost: 1,
                        p: if i % 2 == 0 { 2 } else { 3 },
                    })
                    .collect(),
                10,
                vec![(2, 500), (3, 490)],
            ),
            (
                "two members, then the lead's release",
                100,
                vec![
                    Intervals {
                        n: 150,
                        cost: 1,
                        p: 3,
                    },
                    Intervals {
                        n: 1,
                        cost: 149,
                        p: 2,
                    },
                    Release(1_000),
                ],
                10,
                // p3: 150 - 1; p2: 149 - 1, then 701 - 8.
                vec![(2, 148 + 693), (3, 149)],
            ),
        ];
        for (name, bps, steps, fee_total, paid) in cases {
            let mut l = Ledger::new();
            l.apply(dep("d", Buyer(b(1)), 1_000_000)).unwrap();
            l.apply(lock("l", 1, 1_000_000)).unwrap();
            let mut n = 0u32;
            let mut op_fees = 0u64;
            for step in steps {
                let mut ops = Vec::new();
                match step {
                    Intervals {
                        n: times,
                        cost,
                        p: provider,
                    } => {
                        for _ in 0..times {
                            n += 1;
                            ops.push(Op::SettleInterval {
                                key: k(&format!("i{n}")),
                                job: j(1),
                                provider: p(provider),
                                cost: Credits(cost),
                                fee_bps: bps,
                            });
                        }
                    }
                    Release(cost) => ops.push(rel("r", 1, cost, bps)),
                    Refund => ops.push(refund("f", 1)),
                }
                for op in ops {
                    let before = l.escrow(&j(1)).unwrap().clone();
                    let effect = l.apply(op).unwrap_or_else(|e| panic!("{name}: {e}"));
                    let e = l.escrow(&j(1)).unwrap();
                    let (cost, fee) = match effect {
                        Applied::IntervalSettled {
                            cost, paid, fee, ..
                        } => {
                            assert_eq!(cost.0, paid.0 + fee.0, "{name}");
                            (cost, fee)
                        }
                        Applied::Released {
                            cost,
                            paid,
                            fee,
                            already_paid,
                            ..
                        } => {
                            assert_eq!(cost.0, already_paid.0 + paid.0 + fee.0, "{name}");
                            (Credits(cost.0 - already_paid.0), fee)
                        }
                        Applied::Refunded { .. } => (Credits(0), Credits(0)),
                        other => panic!("{name}: {other:?}"),
                    };
                    // The op's fee is the step of the cumulative fee.
                    assert_eq!(
                        fee,
                        fee_on_payment(before.gross_paid(), cost, bps),
                        "{name}"
                    );
                    assert_eq!(fee, before.next_fee(cost, bps), "{name}");
                    assert_eq!(e.gross_paid().0, before.gross_paid().0 + cost.0, "{name}");
                    assert_eq!(e.fee_taken, fee_for(e.gross_paid(), bps), "{name}");
                    assert_eq!(e.net_paid().0, e.gross_paid().0 - e.fee_taken.0, "{name}");
                    op_fees += fee.0;
                }
            }
            let e = l.escrow(&j(1)).unwrap();
            assert_eq!(l.balance(&Fee), Credits(fee_total), "{name}: fee account");
            assert_eq!(op_fees, fee_total, "{name}: sum of the ops' fees");
            assert_eq!(e.fee_taken, Credits(fee_total), "{name}: fee taken");
            assert_eq!(e.fee_taken, fee_for(e.gross_paid(), bps), "{name}");
            let mut providers = 0;
            for &(provider, n) in &paid {
                assert_eq!(
                    l.balance(&Provider(p(provider))),
                    Credits(n),
                    "{name}: p{provider}"
                );
                providers += n;
            }
            assert_eq!(providers, e.net_paid().0, "{name}: provider pay");
            assert!(!e.is_open() || e.held().0 + e.gross_paid().0 == e.locked.0);
            l.check_invariants()
                .unwrap_or_else(|err| panic!("{name}: {err}"));
        }
    }

    #[test]
    fn each_operation_moves_the_right_amounts() {
        let released = |cost, paid, fee, refunded| Applied::Released {
            job: j(1),
            provider: p(2),
            buyer: b(1),
            cost: Credits(cost),
            paid: Credits(paid),
            fee: Credits(fee),
            refunded: Credits(refunded),
            already_paid: Credits(0),
        };
        type Case = (&'static str, Op, Applied, Vec<(AccountId, u64)>);
        let cases: Vec<Case> = vec![
            (
                "deposit",
                dep("x", Buyer(b(1)), 250),
                Applied::Deposited {
                    account: Buyer(b(1)),
                    amount: Credits(250),
                    balance: Credits(750),
                },
                vec![(Buyer(b(1)), 750)],
            ),
            (
                "withdraw all",
                wd("x", Buyer(b(1)), 500),
                Applied::Withdrawn {
                    account: Buyer(b(1)),
                    amount: Credits(500),
                    balance: Credits(0),
                },
                vec![(Buyer(b(1)), 0)],
            ),
            (
                "provider withdraws",
                wd("x", Provider(p(2)), 100),
                Applied::Withdrawn {
                    account: Provider(p(2)),
                    amount: Credits(100),
                    balance: Credits(0),
                },
                vec![],
            ),
            (
                "lock all",
                lock("x", 9, 500),
                Applied::Locked {
                    job: j(9),
                    buyer: b(1),
                    amount: Credits(500),
                    balance: Credits(0),
                },
                vec![(Buyer(b(1)), 0)],
            ),
            (
                "release, fee 2.5% rounds down",
                rel("x", 1, 500, 250),
                released(500, 488, 12, 100),
                vec![(Buyer(b(1)), 600), (Provider(p(2)), 588), (Fee, 12)],
            ),
            (
                "release caps cost at locked",
                rel("x", 1, 900, 1000),
                released(600, 540, 60, 0),
                vec![(Buyer(b(1)), 500), (Provider(p(2)), 640), (Fee, 60)],
            ),
            (
                "release of zero cost refunds all",
                rel("x", 1, 0, 250),
                released(0, 0, 0, 600),
                vec![(Buyer(b(1)), 1100), (Provider(p(2)), 100), (Fee, 0)],
            ),
            (
                "release at 100% fee",
                rel("x", 1, 600, 10_000),
                released(600, 0, 600, 0),
                vec![(Provider(p(2)), 100), (Fee, 600)],
            ),
            (
                "refund",
                refund("x", 1),
                Applied::Refunded {
                    job: j(1),
                    buyer: b(1),
                    refunded: Credits(600),
                    already_paid: Credits(0),
                },
                vec![(Buyer(b(1)), 1100)],
            ),
        ];
        for (name, op, effect, balances) in cases {
            let mut l = funded();
            assert_eq!(l.apply(op.clone()), Ok(effect.clone()), "{name}");
            for (account, n) in balances {
                assert_eq!(l.balance(&account), Credits(n), "{name}: {account}");
            }
            l.check_invariants()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let after = l.clone();
            assert_eq!(l.apply(op), Ok(effect), "{name}: replay");
            assert_eq!(l, after, "{name}: replay changed the ledger");
        }
        let mut l = funded();
        l.apply(rel("x", 1, 500, 250)).unwrap();
        let to = p(2);
        assert_eq!(
            l.escrow(&j(1)).unwrap().state,
            EscrowState::Released {
                to,
                paid: Credits(488),
                refunded: Credits(100),
                fee: Credits(12)
            }
        );
    }

    #[test]
    fn refused_operations_say_why_and_change_nothing() {
        use ContractError::*;
        let short = |account, needed, available| InsufficientFunds {
            account: Box::new(account),
            needed: Credits(needed),
            available: Credits(available),
        };
        let j2 = Box::new(EscrowState::Released {
            to: p(2),
            paid: Credits(100),
            refunded: Credits(0),
            fee: Credits(0),
        });
        let cases: Vec<(&str, Op, ContractError)> = vec![
            (
                "withdraw too much",
                wd("x", Buyer(b(1)), 501),
                short(Buyer(b(1)), 501, 500),
            ),
            (
                "withdraw from empty account",
                wd("x", Fee, 1),
                short(Fee, 1, 0),
            ),
            (
                "lock too much",
                lock("x", 9, 501),
                short(Buyer(b(1)), 501, 500),
            ),
            (
                "zero deposit",
                dep("x", Fee, 0),
                ZeroAmount { op: "deposit" },
            ),
            (
                "zero withdraw",
                wd("x", Buyer(b(1)), 0),
                ZeroAmount { op: "withdraw" },
            ),
            ("zero lock", lock("x", 9, 0), ZeroAmount { op: "lock" }),
            (
                "lock a job twice",
                lock("x", 1, 1),
                EscrowExists { job: j(1) },
            ),
            (
                "lock a settled job again",
                lock("x", 3, 1),
                EscrowExists { job: j(3) },
            ),
            (
                "release unknown job",
                rel("x", 9, 1, 0),
                NoSuchEscrow { job: j(9) },
            ),
            (
                "refund unknown job",
                refund("x", 9),
                NoSuchEscrow { job: j(9) },
            ),
            (
                "release a released job",
                rel("x", 2, 1, 0),
                AlreadySettled {
                    job: j(2),
                    state: j2.clone(),
                },
            ),
            (
                "refund a released job",
                refund("x", 2),
                AlreadySettled {
                    job: j(2),
                    state: j2,
                },
            ),
            (
                "release a refunded job",
                rel("x", 3, 1, 0),
                AlreadySettled {
                    job: j(3),
                    state: Box::new(EscrowState::Refunded {
                        refunded: Credits(100),
                    }),
                },
            ),
            (
                "fee over 100%",
                rel("x", 1, 1, 10_001),
                InvalidFeeBps { fee_bps: 10_001 },
            ),
            (
                "key reused",
                dep("d", Buyer(b(1)), 1),
                KeyReused {
                    key: k("d"),
                    first: "deposit",
                    now: "deposit",
                },
            ),
            (
                "key reused across kinds",
                refund("l1", 1),
                KeyReused {
                    key: k("l1"),
                    first: "lock",
                    now: "refund",
                },
            ),
            (
                "empty key",
                dep("", Fee, 1),
                InvalidKey {
                    key: k(""),
                    reason: "it is empty",
                },
            ),
            (
                "deposit overflow",
                dep("x", Buyer(b(1)), u64::MAX),
                Overflow {
                    what: "the balance",
                },
            ),
            (
                "total deposit overflow",
                dep("x", Fee, u64::MAX - 1000),
                Overflow {
                    what: "total deposits",
                },
            ),
        ];
        for (name, op, err) in cases {
            let mut l = funded();
            let before = l.clone();
            assert_eq!(l.apply(op), Err(err.clone()), "{name}");
            assert_eq!(l, before, "{name}: a refused op changed the ledger");
            assert!(!err.to_string().is_empty());
        }
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(matches!(
            Ledger::new().apply(dep(&long, Fee, 1)),
            Err(InvalidKey { .. })
        ));
    }

    #[test]
    fn a_replay_returns_the_original_effect_and_a_refused_op_can_be_retried() {
        let mut l = funded();
        let first = l.apply(dep("top-up", Buyer(b(1)), 100)).unwrap();
        l.apply(wd("w", Buyer(b(1)), 600)).unwrap();
        let after = l.clone();
        assert_eq!(l.apply(dep("top-up", Buyer(b(1)), 100)), Ok(first));
        assert_eq!(l, after);
        // Not enough funds: refused and not recorded, so the same key works later.
        assert!(matches!(
            l.apply(lock("L", 9, 50)),
            Err(ContractError::InsufficientFunds { .. })
        ));
        l.apply(dep("top-up-2", Buyer(b(1)), 50)).unwrap();
        assert!(l.apply(lock("L", 9, 50)).is_ok());
        l.check_invariants().unwrap();
    }

    #[test]
    fn account_ids_round_trip_and_bad_ones_say_why() {
        for a in [Buyer(b(1)), Provider(p(1)), Verifier(p(1)), Fee] {
            assert_eq!(a.to_string().parse::<AccountId>().unwrap(), a);
        }
        assert!(Buyer(b(1)).to_string().starts_with("buyer:kb"));
        assert!(Provider(p(1)).to_string().starts_with("provider:12D3"));
        assert!(Verifier(p(1)).to_string().starts_with("verifier:12D3"));
        assert_ne!(Verifier(p(1)), Provider(p(1)));
        for bad in [
            "",
            "fees",
            "buyer:",
            "buyer:12",
            "provider:xyz",
            "verifier:",
            "burn",
            "kb00:buyer",
        ] {
            let e = bad.parse::<AccountId>().unwrap_err();
            assert_eq!(e.kind, "account id", "{bad}");
        }
    }

    #[test]
    fn the_ledger_round_trips_through_json_and_corruption_is_caught() {
        let l = funded();
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<Ledger>(&json).unwrap(), l);
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["balances"][Buyer(b(1)).to_string()] = 501.into();
        let bad: Ledger = serde_json::from_value(v).unwrap();
        assert!(matches!(
            bad.check_invariants(),
            Err(InvariantViolation::NotConserved { .. })
        ));
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["escrows"][j(3).to_string()]["state"]["refunded"]["refunded"] = 99.into();
        let bad: Ledger = serde_json::from_value(v).unwrap();
        assert!(matches!(
            bad.check_invariants(),
            Err(InvariantViolation::SettlementMismatch { .. })
        ));
    }

    fn stake(key: &str, provider: u8, n: u64) -> Op {
        Op::Stake {
            key: k(key),
            provider: p(provider),
            amount: Credits(n),
        }
    }
    fn unstake(key: &str, provider: u8, n: u64) -> Op {
        Op::Unstake {
            key: k(key),
            provider: p(provider),
            amount: Credits(n),
        }
    }
    fn slash(key: &str, job: u8, n: u64, buyer_bps: u16, verifier: Option<u8>, v_bps: u16) -> Op {
        Op::Slash {
            key: k(key),
            provider: p(2),
            job: j(job),
            amount: Credits(n),
            buyer_share_bps: buyer_bps,
            verifier: verifier.map(p),
            verifier_share_bps: v_bps,
        }
    }
    fn interval(key: &str, job: u8, cost: u64, fee_bps: u16) -> Op {
        Op::SettleInterval {
            key: k(key),
            job: j(job),
            provider: p(2),
            cost: Credits(cost),
            fee_bps,
        }
    }

    /// [`funded`], plus: p2 deposited 900 and staked 800 (balance 200, bond
    /// 800), then job 1 (600 locked) paid one interval of 200 at 2.5% (195 to
    /// p2, 5 fee; 400 left). So p2 holds 395.
    fn bonded() -> Ledger {
        let mut l = funded();
        for op in [
            dep("pd", Provider(p(2)), 900),
            stake("s", 2, 800),
            interval("i1", 1, 200, 250),
        ] {
            l.apply(op).unwrap();
        }
        assert_eq!(l.balance(&Provider(p(2))), Credits(395));
        assert_eq!(l.bond(&p(2)), Credits(800));
        assert_eq!(l.escrow(&j(1)).unwrap().held(), Credits(400));
        l.check_invariants().unwrap();
        l
    }

    #[test]
    fn stake_slash_and_interval_operations_move_the_right_amounts() {
        let released = |cost, paid, fee, refunded, already| Applied::Released {
            job: j(1),
            provider: p(2),
            buyer: b(1),
            cost: Credits(cost),
            paid: Credits(paid),
            fee: Credits(fee),
            refunded: Credits(refunded),
            already_paid: Credits(already),
        };
        let slashed =
            |taken, to_buyer, verifier: Option<u8>, to_verifier, burned, bond| Applied::Slashed {
                job: j(1),
                provider: p(2),
                buyer: b(1),
                taken: Credits(taken),
                to_buyer: Credits(to_buyer),
                verifier: verifier.map(p),
                to_verifier: Credits(to_verifier),
                burned: Credits(burned),
                bond: Credits(bond),
            };
        // (name, op, effect, balances, p2's bond, total burned, job 1 still holds)
        type Case = (
            &'static str,
            Op,
            Applied,
            Vec<(AccountId, u64)>,
            u64,
            u64,
            u64,
        );
        let cases: Vec<Case> = vec![
            (
                "stake the whole balance",
                stake("x", 2, 395),
                Applied::Staked {
                    provider: p(2),
                    amount: Credits(395),
                    balance: Credits(0),
                    bond: Credits(1195),
                },
                vec![(Provider(p(2)), 0)],
                1195,
                0,
                400,
            ),
            (
                "unstake part",
                unstake("x", 2, 300),
                Applied::Unstaked {
                    provider: p(2),
                    amount: Credits(300),
                    balance: Credits(695),
                    bond: Credits(500),
                },
                vec![(Provider(p(2)), 695)],
                500,
                0,
                400,
            ),
            (
                "unstake all",
                unstake("x", 2, 800),
                Applied::Unstaked {
                    provider: p(2),
                    amount: Credits(800),
                    balance: Credits(1195),
                    bond: Credits(0),
                },
                vec![(Provider(p(2)), 1195)],
                0,
                0,
                400,
            ),
            (
                "slash split buyer 50%, verifier 20%, burn 30%",
                slash("x", 1, 500, 5000, Some(3), 2000),
                slashed(500, 250, Some(3), 100, 150, 300),
                vec![
                    (Buyer(b(1)), 750),
                    (Verifier(p(3)), 100),
                    (Provider(p(2)), 395),
                ],
                300,
                150,
                400,
            ),
            (
                "slash is capped at the bond",
                slash("x", 1, 10_000, 0, None, 0),
                slashed(800, 0, None, 0, 800, 0),
                vec![(Buyer(b(1)), 500)],
                0,
                800,
                400,
            ),
            (
                "slash rounding is burned",
                slash("x", 1, 7, 3333, Some(3), 3333),
                slashed(7, 2, Some(3), 2, 3, 793),
                vec![(Buyer(b(1)), 502), (Verifier(p(3)), 2)],
                793,
                3,
                400,
            ),
            (
                "slash all to the buyer burns nothing",
                slash("x", 1, 100, 10_000, Some(3), 0),
                slashed(100, 100, Some(3), 0, 0, 700),
                vec![(Buyer(b(1)), 600), (Verifier(p(3)), 0)],
                700,
                0,
                400,
            ),
            (
                "second interval empties the escrow",
                interval("x", 1, 400, 250),
                Applied::IntervalSettled {
                    job: j(1),
                    provider: p(2),
                    buyer: b(1),
                    interval: 2,
                    cost: Credits(400),
                    paid: Credits(390),
                    fee: Credits(10),
                    remaining: Credits(0),
                },
                vec![(Provider(p(2)), 785), (Fee, 15), (Buyer(b(1)), 500)],
                800,
                0,
                0,
            ),
            (
                "final release pays the total less what intervals paid",
                rel("x", 1, 500, 250),
                released(500, 293, 7, 100, 200),
                vec![(Buyer(b(1)), 600), (Provider(p(2)), 688), (Fee, 12)],
                800,
                0,
                0,
            ),
            (
                "final release below what intervals paid pays nothing more",
                rel("x", 1, 50, 250),
                released(200, 0, 0, 400, 200),
                vec![(Buyer(b(1)), 900), (Provider(p(2)), 395), (Fee, 5)],
                800,
                0,
                0,
            ),
            (
                "final release caps the total at locked",
                rel("x", 1, 5_000, 0),
                released(600, 400, 0, 0, 200),
                vec![(Buyer(b(1)), 500), (Provider(p(2)), 795)],
                800,
                0,
                0,
            ),
            (
                "refund returns what intervals did not pay",
                refund("x", 1),
                Applied::Refunded {
                    job: j(1),
                    buyer: b(1),
                    refunded: Credits(400),
                    already_paid: Credits(200),
                },
                vec![(Buyer(b(1)), 900), (Provider(p(2)), 395), (Fee, 5)],
                800,
                0,
                0,
            ),
        ];
        for (name, op, effect, balances, bond, burned, held) in cases {
            let mut l = bonded();
            assert_eq!(l.apply(op.clone()), Ok(effect.clone()), "{name}");
            for (account, n) in balances {
                assert_eq!(l.balance(&account), Credits(n), "{name}: {account}");
            }
            assert_eq!(l.bond(&p(2)), Credits(bond), "{name}: bond");
            assert_eq!(l.total_burned(), Credits(burned), "{name}: burned");
            assert_eq!(
                l.escrow(&j(1)).unwrap().held(),
                Credits(held),
                "{name}: held"
            );
            l.check_invariants()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let after = l.clone();
            assert_eq!(l.apply(op), Ok(effect), "{name}: replay");
            assert_eq!(l, after, "{name}: replay changed the ledger");
        }
    }

    #[test]
    fn refused_stake_slash_and_interval_operations_say_why_and_change_nothing() {
        use ContractError::*;
        let stake_short = |provider, needed, bonded, slashed| InsufficientStake {
            provider: Box::new(p(provider)),
            needed: Credits(needed),
            bonded: Credits(bonded),
            slashed: Credits(slashed),
        };
        let invalid = |buyer_share_bps, verifier_share_bps, reason| InvalidSlash {
            buyer_share_bps,
            verifier_share_bps,
            reason,
        };
        let cases: Vec<(&str, Op, ContractError)> = vec![
            (
                "stake more than the balance",
                stake("x", 2, 396),
                InsufficientFunds {
                    account: Box::new(Provider(p(2))),
                    needed: Credits(396),
                    available: Credits(395),
                },
            ),
            (
                "stake from a verifier-only provider",
                stake("x", 3, 1),
                InsufficientFunds {
                    account: Box::new(Provider(p(3))),
                    needed: Credits(1),
                    available: Credits(0),
                },
            ),
            ("zero stake", stake("x", 2, 0), ZeroAmount { op: "stake" }),
            (
                "zero unstake",
                unstake("x", 2, 0),
                ZeroAmount { op: "unstake" },
            ),
            (
                "unstake more than bonded",
                unstake("x", 2, 801),
                stake_short(2, 801, 800, 0),
            ),
            (
                "unstake without a bond",
                unstake("x", 3, 1),
                stake_short(3, 1, 0, 0),
            ),
            (
                "zero slash",
                slash("x", 1, 0, 0, None, 0),
                ZeroAmount { op: "slash" },
            ),
            (
                "slash a provider with no bond",
                Op::Slash {
                    key: k("x"),
                    provider: p(3),
                    job: j(1),
                    amount: Credits(1),
                    buyer_share_bps: 0,
                    verifier: None,
                    verifier_share_bps: 0,
                },
                NothingToSlash {
                    provider: Box::new(p(3)),
                },
            ),
            (
                "slash for an unknown job",
                slash("x", 9, 1, 0, None, 0),
                NoSuchEscrow { job: j(9) },
            ),
            (
                "slash shares over 100%",
                slash("x", 1, 1, 6000, Some(3), 4001),
                invalid(
                    6000,
                    4001,
                    "the shares add up to more than 100% (10000 bps)",
                ),
            ),
            (
                "slash shares overflowing u16 sums",
                slash("x", 1, 1, u16::MAX, Some(3), u16::MAX),
                invalid(
                    u16::MAX,
                    u16::MAX,
                    "the shares add up to more than 100% (10000 bps)",
                ),
            ),
            (
                "slash verifier share without a verifier",
                slash("x", 1, 1, 0, None, 1),
                invalid(
                    0,
                    1,
                    "a verifier share needs a verifier to pay; set it to 0 to burn that part",
                ),
            ),
            (
                "slashed provider as its own verifier",
                slash("x", 1, 1, 0, Some(2), 1000),
                invalid(0, 1000, "the slashed provider cannot be its own verifier"),
            ),
            (
                "interval larger than the escrow holds",
                interval("x", 1, 401, 250),
                EscrowExhausted {
                    job: j(1),
                    needed: Credits(401),
                    remaining: Credits(400),
                },
            ),
            (
                "interval huge",
                interval("x", 1, u64::MAX, 0),
                EscrowExhausted {
                    job: j(1),
                    needed: Credits(u64::MAX),
                    remaining: Credits(400),
                },
            ),
            (
                "zero interval",
                interval("x", 1, 0, 250),
                ZeroAmount {
                    op: "interval settlement",
                },
            ),
            (
                "interval on a released job",
                interval("x", 2, 1, 0),
                AlreadySettled {
                    job: j(2),
                    state: Box::new(EscrowState::Released {
                        to: p(2),
                        paid: Credits(100),
                        refunded: Credits(0),
                        fee: Credits(0),
                    }),
                },
            ),
            (
                "interval on an unknown job",
                interval("x", 9, 1, 0),
                NoSuchEscrow { job: j(9) },
            ),
            (
                "interval fee over 100%",
                interval("x", 1, 1, 10_001),
                InvalidFeeBps { fee_bps: 10_001 },
            ),
            (
                "interval key reused",
                interval("i1", 1, 100, 250),
                KeyReused {
                    key: k("i1"),
                    first: "interval settlement",
                    now: "interval settlement",
                },
            ),
            (
                "stake key reused by an unstake",
                unstake("s", 2, 800),
                KeyReused {
                    key: k("s"),
                    first: "stake",
                    now: "unstake",
                },
            ),
        ];
        for (name, op, err) in cases {
            let mut l = bonded();
            let before = l.clone();
            assert_eq!(l.apply(op), Err(err.clone()), "{name}");
            assert_eq!(l, before, "{name}: a refused op changed the ledger");
            assert!(!err.to_string().is_empty());
        }
        let exhausted = interval("x", 1, 401, 250);
        let msg = bonded().apply(exhausted).unwrap_err().to_string();
        assert!(
            msg.contains("escrow exhausted") && msg.contains("stop the job"),
            "{msg}"
        );
    }

    #[test]
    fn slashed_stake_can_never_be_unstaked_and_costs_eligibility() {
        let mut l = bonded();
        assert!(l.is_eligible(&p(2), Credits(800)));
        assert!(!l.is_eligible(&p(2), Credits(801)));
        assert!(l.is_eligible(&p(3), Credits(0)));
        assert!(!l.is_eligible(&p(3), Credits(1)));
        l.apply(slash("sl", 1, 500, 5000, Some(3), 2000)).unwrap();
        assert!(!l.is_eligible(&p(2), Credits(800)));
        assert!(l.is_eligible(&p(2), Credits(300)));
        assert_eq!(
            l.apply(unstake("u", 2, 800)),
            Err(ContractError::InsufficientStake {
                provider: Box::new(p(2)),
                needed: Credits(800),
                bonded: Credits(300),
                slashed: Credits(500),
            })
        );
        l.apply(unstake("u", 2, 300)).unwrap();
        assert!(matches!(
            l.apply(unstake("u2", 2, 1)),
            Err(ContractError::InsufficientStake { .. })
        ));
        // Slashing again with nothing bonded is refused, not a silent no-op.
        assert!(matches!(
            l.apply(slash("sl2", 1, 1, 0, None, 0)),
            Err(ContractError::NothingToSlash { .. })
        ));
        // The verifier can withdraw its bounty, the provider only what it unstaked.
        l.apply(wd("vw", Verifier(p(3)), 100)).unwrap();
        assert_eq!(l.balance(&Provider(p(2))), Credits(695));
        assert!(l.apply(wd("pw", Provider(p(2)), 696)).is_err());
        let bond = &l.bonds()[&p(2)];
        assert_eq!(
            (bond.held, bond.staked, bond.unstaked, bond.slashed),
            (Credits(0), Credits(800), Credits(300), Credits(500))
        );
        assert_eq!(l.total_burned(), Credits(150));
        l.check_invariants().unwrap();
    }

    #[test]
    fn an_escrow_that_runs_dry_stops_the_job_and_release_pays_the_rest() {
        let mut l = Ledger::new();
        l.apply(dep("d", Buyer(b(1)), 1000)).unwrap();
        l.apply(lock("l", 1, 1000)).unwrap();
        for n in 1..=3 {
            let effect = l.apply(interval(&format!("i{n}"), 1, 300, 0)).unwrap();
            assert!(
                matches!(effect, Applied::IntervalSettled { interval, remaining, .. }
                if interval == n && remaining == Credits(1000 - 300 * n))
            );
        }
        assert_eq!(
            l.apply(interval("i4", 1, 300, 0)),
            Err(ContractError::EscrowExhausted {
                job: j(1),
                needed: Credits(300),
                remaining: Credits(100),
            })
        );
        let e = l.escrow(&j(1)).unwrap();
        assert_eq!(
            (e.intervals, e.interval_paid, e.held()),
            (3, Credits(900), Credits(100))
        );
        // The job stopped after 4 intervals' worth; the release pays what is left.
        assert_eq!(
            l.apply(rel("r", 1, 1200, 0)),
            Ok(Applied::Released {
                job: j(1),
                provider: p(2),
                buyer: b(1),
                cost: Credits(1000),
                paid: Credits(100),
                fee: Credits(0),
                refunded: Credits(0),
                already_paid: Credits(900),
            })
        );
        assert_eq!(l.balance(&Provider(p(2))), Credits(1000));
        assert_eq!(l.escrow(&j(1)).unwrap().held(), Credits(0));
        assert!(matches!(
            l.apply(interval("i4", 1, 1, 0)),
            Err(ContractError::AlreadySettled { .. })
        ));
        l.check_invariants().unwrap();
    }

    #[test]
    fn corrupted_bonds_burns_and_interval_records_are_caught() {
        let l = {
            let mut l = bonded();
            l.apply(slash("sl", 1, 100, 5000, None, 0)).unwrap();
            l
        };
        l.check_invariants().unwrap();
        let json = serde_json::to_value(&l).unwrap();
        let p2 = p(2).to_string();
        let j1 = j(1).to_string();
        type Tamper = Box<dyn Fn(&mut serde_json::Value)>;
        type Expect = fn(&InvariantViolation) -> bool;
        fn bump(v: &mut serde_json::Value, n: i64) {
            *v = (v.as_i64().unwrap() + n).into();
        }
        let cases: Vec<(&str, Tamper, Expect)> = vec![
            (
                "bond held changed",
                Box::new(move |v| bump(&mut v["bonds"][&p2]["held"], 1)),
                |e| matches!(e, InvariantViolation::NotConserved { .. }),
            ),
            (
                "bond staked changed",
                {
                    let p2 = p(2).to_string();
                    Box::new(move |v| bump(&mut v["bonds"][&p2]["staked"], 1))
                },
                |e| matches!(e, InvariantViolation::BondMismatch { .. }),
            ),
            (
                "bond slashed rewritten consistently",
                {
                    let p2 = p(2).to_string();
                    Box::new(move |v| {
                        bump(&mut v["bonds"][&p2]["staked"], -50);
                        bump(&mut v["bonds"][&p2]["slashed"], -50);
                    })
                },
                |e| matches!(e, InvariantViolation::SlashMismatch { .. }),
            ),
            (
                "burn total changed",
                Box::new(|v| bump(&mut v["burned"], 1)),
                |e| matches!(e, InvariantViolation::NotConserved { .. }),
            ),
            (
                "burn total rewritten consistently",
                Box::new(|v| {
                    bump(&mut v["burned"], 10);
                    bump(&mut v["deposited"], 10);
                }),
                |e| matches!(e, InvariantViolation::BurnMismatch { .. }),
            ),
            (
                "interval payments rewritten consistently",
                Box::new(move |v| {
                    bump(&mut v["escrows"][&j1]["interval_paid"], 10);
                    bump(&mut v["deposited"], -10);
                }),
                |e| matches!(e, InvariantViolation::IntervalsMismatch { .. }),
            ),
            (
                "fee taken changed",
                {
                    let j1 = j(1).to_string();
                    Box::new(move |v| bump(&mut v["escrows"][&j1]["fee_taken"], 1))
                },
                |e| matches!(e, InvariantViolation::FeeMismatch { .. }),
            ),
            (
                "escrow overpaid",
                {
                    let j1 = j(1).to_string();
                    Box::new(move |v| {
                        // held() saturates: 400 held becomes 0.
                        bump(&mut v["escrows"][&j1]["interval_paid"], 500);
                        bump(&mut v["deposited"], -400);
                    })
                },
                |e| matches!(e, InvariantViolation::SettlementMismatch { .. }),
            ),
        ];
        for (name, tamper, expected) in cases {
            let mut v = json.clone();
            tamper(&mut v);
            let bad: Ledger = serde_json::from_value(v).unwrap();
            let err = bad.check_invariants().unwrap_err();
            assert!(expected(&err), "{name}: {err}");
        }
    }

    #[test]
    fn old_json_without_the_new_fields_still_loads() {
        let l = funded();
        let mut v = serde_json::to_value(&l).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("bonds");
        obj.remove("burned");
        for e in obj["escrows"].as_object_mut().unwrap().values_mut() {
            let e = e.as_object_mut().unwrap();
            e.remove("interval_paid");
            e.remove("intervals");
            e.remove("fee_taken");
        }
        for done in obj["applied"].as_object_mut().unwrap().values_mut() {
            if let Some(effect) = done["effect"].as_object_mut()
                && let Some(inner) = effect.values_mut().next().and_then(|i| i.as_object_mut())
            {
                inner.remove("already_paid");
            }
        }
        let old: Ledger = serde_json::from_value(v).unwrap();
        assert_eq!(old, l);
    }
}
