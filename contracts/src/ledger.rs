//! The ledger state machine: state, operations, effects, errors, invariants.

use std::collections::BTreeMap;

use kiln_protocol::{BuyerId, Credits, JobId, ProviderId};
use serde::{Deserialize, Serialize};

use crate::account::{AccountId, OpKey};

/// 100% in basis points.
pub const MAX_FEE_BPS: u16 = 10_000;
/// Longest accepted [`OpKey`], in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// The marketplace fee on `cost`: `cost * fee_bps / 10_000`, rounded down.
/// `fee_bps` above [`MAX_FEE_BPS`] counts as 100%, so the fee never exceeds
/// the cost (`apply` refuses such a rate outright).
pub fn fee_for(cost: Credits, fee_bps: u16) -> Credits {
    let fee = u128::from(cost.0) * u128::from(fee_bps.min(MAX_FEE_BPS)) / u128::from(MAX_FEE_BPS);
    // fee <= cost, so it always fits back into a u64.
    Credits(u64::try_from(fee).unwrap_or(cost.0))
}

/// Where a job's escrow stands. `Locked` is the only state that can change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscrowState {
    Locked,
    /// Settled: `paid` (cost less fee) to the provider, `fee` to the fee
    /// account, `refunded` to the buyer; the three sum to `locked`.
    Released {
        to: ProviderId,
        paid: Credits,
        refunded: Credits,
        fee: Credits,
    },
    /// Settled: everything went back to the buyer.
    Refunded {
        refunded: Credits,
    },
}

/// Credits set aside from a buyer for one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escrow {
    pub job: JobId,
    pub buyer: BuyerId,
    pub locked: Credits,
    pub state: EscrowState,
}

impl Escrow {
    /// Credits this escrow still holds: all of `locked` until settled, then 0.
    pub fn held(&self) -> Credits {
        match self.state {
            EscrowState::Locked => self.locked,
            _ => Credits(0),
        }
    }
}

/// A change to the ledger. Each carries the idempotency key of the event it records.
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
    /// Sets `amount` of the buyer's balance aside for `job`.
    Lock {
        key: OpKey,
        job: JobId,
        buyer: BuyerId,
        amount: Credits,
    },
    /// Pays `min(cost, locked)` less the fee to `provider`, the fee to
    /// [`AccountId::Fee`], and the rest of the escrow back to the buyer.
    Release {
        key: OpKey,
        job: JobId,
        provider: ProviderId,
        cost: Credits,
        fee_bps: u16,
    },
    /// Returns the whole escrow to the buyer.
    Refund { key: OpKey, job: JobId },
}

impl Op {
    pub fn key(&self) -> &OpKey {
        match self {
            Self::Deposit { key, .. }
            | Self::Withdraw { key, .. }
            | Self::Lock { key, .. }
            | Self::Release { key, .. }
            | Self::Refund { key, .. } => key,
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
        }
    }
}

/// What an applied [`Op`] did. Balances are those right after it applied.
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
    /// `cost` is what was charged (the requested cost capped at the escrow).
    Released {
        job: JobId,
        provider: ProviderId,
        buyer: BuyerId,
        cost: Credits,
        paid: Credits,
        fee: Credits,
        refunded: Credits,
    },
    Refunded {
        job: JobId,
        buyer: BuyerId,
        refunded: Credits,
    },
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
    #[error("a {op} of zero credits does nothing; send a positive amount")]
    ZeroAmount { op: &'static str },
    #[error(
        "job {job} already has an escrow; a job is locked once — derive a new job id for a new job"
    )]
    EscrowExists { job: JobId },
    #[error("job {job} has no escrow; lock funds for it before releasing or refunding")]
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
}

/// A broken ledger invariant: a bug in this crate or corrupted storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvariantViolation {
    #[error(
        "credits are not conserved: balances {balances} + escrowed {escrowed} != \
         deposited {deposited} - withdrawn {withdrawn}; stop settling and audit the op history"
    )]
    NotConserved {
        balances: u128,
        escrowed: u128,
        deposited: Credits,
        withdrawn: Credits,
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
}

/// The settlement state: balances, escrows, totals and applied ops. Fields
/// are private; change it only through [`Ledger::apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    balances: BTreeMap<AccountId, Credits>,
    escrows: BTreeMap<JobId, Escrow>,
    deposited: Credits,
    withdrawn: Credits,
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
    pub fn total_deposited(&self) -> Credits {
        self.deposited
    }
    pub fn total_withdrawn(&self) -> Credits {
        self.withdrawn
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
                if fee_bps > MAX_FEE_BPS {
                    return Err(ContractError::InvalidFeeBps { fee_bps });
                }
                let (buyer, locked) = self.locked_escrow(job)?;
                let cost = cost.min(locked);
                let fee = fee_for(cost, fee_bps);
                let paid = sub(cost, fee, "the provider's pay")?;
                let refunded = sub(locked, cost, "the refund")?;
                let credits = [
                    (AccountId::Provider(provider), paid),
                    (AccountId::Fee, fee),
                    (AccountId::Buyer(buyer), refunded),
                ];
                let mut new = Vec::with_capacity(credits.len());
                for (account, amount) in credits {
                    if amount.0 > 0 {
                        new.push((account, add(self.balance(&account), amount, "a balance")?));
                    }
                }
                self.balances.extend(new);
                self.settle(
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
                }
            }
            Op::Refund { job, .. } => {
                let (buyer, locked) = self.locked_escrow(job)?;
                let account = AccountId::Buyer(buyer);
                let balance = add(self.balance(&account), locked, "the buyer's balance")?;
                self.balances.insert(account, balance);
                self.settle(job, EscrowState::Refunded { refunded: locked });
                Applied::Refunded {
                    job,
                    buyer,
                    refunded: locked,
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

    /// The buyer and amount of `job`'s escrow, if it exists and is still locked.
    fn locked_escrow(&self, job: JobId) -> Result<(BuyerId, Credits), ContractError> {
        let escrow = self
            .escrows
            .get(&job)
            .ok_or(ContractError::NoSuchEscrow { job })?;
        match escrow.state {
            EscrowState::Locked => Ok((escrow.buyer, escrow.locked)),
            ref state => Err(ContractError::AlreadySettled {
                job,
                state: Box::new(state.clone()),
            }),
        }
    }

    fn settle(&mut self, job: JobId, state: EscrowState) {
        if let Some(escrow) = self.escrows.get_mut(&job) {
            escrow.state = state;
        }
    }

    /// Checks that credits are conserved (balances + locked escrows ==
    /// deposits − withdrawals), that every settled escrow paid out exactly
    /// what it locked, and that no job was settled twice in the history.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        // u128 sums of u64 values cannot overflow.
        let balances: u128 = self.balances.values().map(|c| u128::from(c.0)).sum();
        let escrowed: u128 = self.escrows.values().map(|e| u128::from(e.held().0)).sum();
        let net = u128::from(self.deposited.0).checked_sub(u128::from(self.withdrawn.0));
        if net.is_none() || balances.checked_add(escrowed) != net {
            return Err(InvariantViolation::NotConserved {
                balances,
                escrowed,
                deposited: self.deposited,
                withdrawn: self.withdrawn,
            });
        }
        for (&key, e) in &self.escrows {
            if e.job != key {
                return Err(InvariantViolation::Misfiled { key, job: e.job });
            }
            let settled = match e.state {
                EscrowState::Locked => continue,
                EscrowState::Released {
                    paid,
                    refunded,
                    fee,
                    ..
                } => u128::from(paid.0) + u128::from(refunded.0) + u128::from(fee.0),
                EscrowState::Refunded { refunded } => u128::from(refunded.0),
            };
            if settled != u128::from(e.locked.0) {
                return Err(InvariantViolation::SettlementMismatch {
                    job: key,
                    locked: e.locked,
                    settled,
                });
            }
        }
        let mut settlements: BTreeMap<JobId, usize> = BTreeMap::new();
        for done in self.applied.values() {
            if let Applied::Released { job, .. } | Applied::Refunded { job, .. } = done.effect {
                let times = settlements.entry(job).or_default();
                *times += 1;
                if *times > 1 {
                    return Err(InvariantViolation::SettledTwice { job, times: *times });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AccountId::{Buyer, Fee, Provider};
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
    fn each_operation_moves_the_right_amounts() {
        let released = |cost, paid, fee, refunded| Applied::Released {
            job: j(1),
            provider: p(2),
            buyer: b(1),
            cost: Credits(cost),
            paid: Credits(paid),
            fee: Credits(fee),
            refunded: Credits(refunded),
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
        for a in [Buyer(b(1)), Provider(p(1)), Fee] {
            assert_eq!(a.to_string().parse::<AccountId>().unwrap(), a);
        }
        assert!(Buyer(b(1)).to_string().starts_with("buyer:kb"));
        assert!(Provider(p(1)).to_string().starts_with("provider:12D3"));
        for bad in [
            "",
            "fees",
            "buyer:",
            "buyer:12",
            "provider:xyz",
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
}
