//! Settlement as the coordinator runs it.
//!
//! The pure `kiln_contracts::Ledger` lives in memory; every operation that
//! applies under a new idempotency key becomes a signed, hash-chained
//! `LedgerEntry` row and updates the materialized `balances` rows, in the
//! *same* database transaction as the job change that caused it. The
//! in-memory state is replaced only after that transaction commits, so
//! memory never runs ahead of disk, and a crash at any point loses or
//! doubles nothing.
//!
//! At start-up the whole chain is verified from genesis with the
//! coordinator's own public key, and the stored balances are compared with
//! the replay: a tampered database stops the coordinator with the first bad
//! entry named, rather than being served.

use kiln_contracts::chain::{ChainBuilder, LedgerEntry, verify_chain};
use kiln_contracts::{AccountId, Applied, ContractError, Ledger, Op, compare_balances};
use kiln_protocol::{Keypair, Signed, UnixMillis};
use tokio::sync::{Mutex, MutexGuard};

use crate::db::{Db, DbError, Tx};

#[derive(Debug, thiserror::Error)]
pub enum BankError {
    #[error(transparent)]
    Contract(#[from] ContractError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the stored ledger does not verify: {0}; the database was altered or corrupted")]
    Tampered(String),
    #[error(
        "the stored ledger was written under an older fee rule (fees rounded per payment; since this \
         version they are taken on each escrow's cumulative total, so entry {seq} replays with a \
         different fee): it cannot be verified by this version. Keep running the version that wrote \
         it until its jobs settle, or start this one on a fresh --state-dir"
    )]
    OlderFeeRule { seq: u64 },
    #[error("cannot encode a ledger entry: {0}")]
    Encode(String),
}

#[derive(Clone)]
struct State {
    ledger: Ledger,
    chain: ChainBuilder,
}

pub struct Bank {
    state: Mutex<State>,
    pub fee_bps: u16,
}

/// A change in progress inside a transaction; `commit` publishes it.
pub struct Pending<'a> {
    guard: MutexGuard<'a, State>,
    next: State,
}

impl Bank {
    /// Loads and verifies the chain; migrates a pre-chain database by
    /// replaying its `ledger_ops` into signed entries once.
    pub async fn load(db: &Db, key: &Keypair, fee_bps: u16) -> Result<Self, BankError> {
        let mut entries = db.ledger_entries(0, u32::MAX).await?;
        if entries.is_empty() {
            let ops = db.ledger_ops().await?;
            if !ops.is_empty() {
                let bank = Self {
                    state: Mutex::new(State {
                        ledger: Ledger::new(),
                        chain: ChainBuilder::genesis(key.clone()),
                    }),
                    fee_bps,
                };
                let mut tx = db.begin().await?;
                let mut p = bank.begin().await;
                for op in ops {
                    let op: Op = serde_json::from_str(&op)
                        .map_err(|e| BankError::Tampered(e.to_string()))?;
                    p.apply(&mut tx, op).await?;
                }
                tx.commit().await.map_err(DbError::from)?;
                p.commit();
                tracing::info!("migrated the settlement ledger to a signed hash chain");
                entries = db.ledger_entries(0, u32::MAX).await?;
            }
        }
        let decoded: Vec<Signed<LedgerEntry>> = entries
            .iter()
            .map(|(seq, bytes)| {
                Signed::from_bytes(bytes).map_err(|e| {
                    BankError::Tampered(format!("ledger entry {seq} is malformed: {e}"))
                })
            })
            .collect::<Result<_, _>>()?;
        let ledger = verify_chain(&decoded, &key.public()).map_err(|e| {
            if fee_only_mismatch(&e.fault) {
                BankError::OlderFeeRule { seq: e.seq }
            } else {
                BankError::Tampered(e.to_string())
            }
        })?;
        compare_balances(&ledger, &db.balances().await?)
            .map_err(|e| BankError::Tampered(e.to_string()))?;
        let chain = match decoded.last() {
            Some(last) => ChainBuilder::after(key.clone(), last),
            None => ChainBuilder::genesis(key.clone()),
        };
        Ok(Self {
            state: Mutex::new(State { ledger, chain }),
            fee_bps,
        })
    }

    /// Starts a change. Holding the returned value serializes settlement.
    pub async fn begin(&self) -> Pending<'_> {
        let guard = self.state.lock().await;
        let next = guard.clone();
        Pending { guard, next }
    }

    pub async fn snapshot(&self) -> Ledger {
        self.state.lock().await.ledger.clone()
    }

    /// A provider's stake bond now (without copying the ledger).
    pub async fn bond(&self, provider: &kiln_protocol::ProviderId) -> kiln_protocol::Credits {
        self.state.lock().await.ledger.bond(provider)
    }
}

impl Pending<'_> {
    /// Applies `op` and stages its signed entry and balance rows in `tx`.
    /// An operation whose key was already applied changes and writes nothing.
    pub async fn apply(&mut self, tx: &mut Tx<'_>, op: Op) -> Result<Applied, BankError> {
        let already = self.next.ledger.applied(op.key()).is_some();
        let applied = self.next.ledger.apply(op.clone())?;
        if !already {
            let entry = self
                .next
                .chain
                .append(op, applied.clone(), UnixMillis::now())
                .map_err(|e| BankError::Encode(e.to_string()))?;
            let bytes = entry
                .to_bytes()
                .map_err(|e| BankError::Encode(e.to_string()))?;
            Db::append_ledger_entry(tx, entry.payload.seq, &bytes, entry.payload.at).await?;
            for (account, _) in applied.balance_deltas() {
                Db::set_balance(
                    tx,
                    &account.to_string(),
                    self.next.ledger.balance(&account).0,
                )
                .await?;
            }
        }
        Ok(applied)
    }

    pub fn ledger(&self) -> &Ledger {
        &self.next.ledger
    }

    /// Publishes the pending state; call right after the transaction commits.
    pub fn commit(mut self) {
        *self.guard = self.next;
    }
}

/// Whether a replay differs from the record only in how a payment's fee
/// was rounded: what a ledger written before fees became cumulative gives.
fn fee_only_mismatch(fault: &kiln_contracts::chain::ChainFault) -> bool {
    use kiln_contracts::chain::ChainFault;
    let ChainFault::EffectMismatch {
        recorded,
        recomputed,
    } = fault
    else {
        return false;
    };
    let without_fee = |a: &Applied| -> Option<Applied> {
        let mut a = a.clone();
        match &mut a {
            Applied::IntervalSettled { paid, fee, .. } | Applied::Released { paid, fee, .. } => {
                *paid = kiln_protocol::Credits(paid.0.saturating_add(fee.0));
                *fee = kiln_protocol::Credits(0);
            }
            _ => return None,
        }
        Some(a)
    };
    matches!((without_fee(recorded), without_fee(recomputed)), (Some(a), Some(b)) if a == b)
}

/// An account's statement line.
pub fn touches(applied: &Applied, account: &AccountId) -> Option<i128> {
    let d: i128 = applied
        .balance_deltas()
        .iter()
        .filter(|(a, _)| a == account)
        .map(|(_, d)| d)
        .sum();
    let named = applied.balance_deltas().iter().any(|(a, _)| a == account);
    named.then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_contracts::chain::ChainFault;
    use kiln_protocol::{BuyerId, Credits, JobId, Keypair, Nonce, ProviderId};

    fn interval(provider: ProviderId, paid: u64, fee: u64) -> Applied {
        let buyer = BuyerId::new(Keypair::from_secret_bytes([1; 32]).public());
        Applied::IntervalSettled {
            job: JobId::derive(&buyer, &Nonce::from_bytes([2; 16])),
            provider,
            buyer,
            interval: 2,
            cost: Credits(paid + fee),
            paid: Credits(paid),
            fee: Credits(fee),
            remaining: Credits(1000),
        }
    }

    #[test]
    fn a_ledger_from_the_per_payment_fee_rule_is_told_apart_from_tampering() {
        let p = ProviderId::from_public_key(&Keypair::from_secret_bytes([3; 32]).public());
        let q = ProviderId::from_public_key(&Keypair::from_secret_bytes([4; 32]).public());
        let mismatch = |recorded, recomputed| ChainFault::EffectMismatch {
            recorded: Box::new(recorded),
            recomputed: Box::new(recomputed),
        };
        // The same payment with the fee rounded the old way: an older rule.
        assert!(fee_only_mismatch(&mismatch(
            interval(p, 149, 1),
            interval(p, 148, 2)
        )));
        // Anything else that differs is tampering.
        assert!(!fee_only_mismatch(&mismatch(
            interval(p, 149, 1),
            interval(q, 148, 2)
        )));
        assert!(!fee_only_mismatch(&mismatch(
            interval(p, 149, 1),
            interval(p, 150, 2)
        )));
        assert!(!fee_only_mismatch(&ChainFault::Missing { found: 3 }));
    }
}
