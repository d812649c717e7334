//! Settlement as the coordinator runs it.
//!
//! The pure `kiln_contracts::Ledger` lives in memory; every operation that
//! applies under a new idempotency key becomes a signed, hash-chained
//! `LedgerEntry` row, updates the materialized `balances` rows and indexes
//! the accounts it moves (`ledger_accounts`, read by statements), in the
//! *same* database transaction as the job change that caused it. Memory
//! never runs ahead of disk: a change that does not commit is undone before
//! anyone else can read the ledger, so a crash at any point loses or
//! doubles nothing.
//!
//! A change costs what its operations cost, not the ledger's length: it is
//! applied in place, and a second copy one step behind (the last committed
//! state) catches up at commit by applying the same few operations. Only a
//! change abandoned after an operation applied (its transaction failed)
//! copies the whole ledger, to restore the live one.
//!
//! At start-up the whole chain is verified from genesis with the
//! coordinator's own public key, and the stored balances are compared with
//! the replay: a tampered database stops the coordinator with the first bad
//! entry named, rather than being served.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_contracts::chain::{ChainBuilder, LedgerEntry, verify_chain};
use kiln_contracts::{AccountId, Applied, ContractError, Ledger, Op, compare_balances};
use kiln_protocol::{BuyerId, Credits, JobId, Keypair, Signed, UnixMillis};
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

/// The ledger, the chain's head, and each buyer's open escrows (so a
/// balance query does not walk every escrow ever opened).
#[derive(Clone)]
struct State {
    ledger: Ledger,
    chain: ChainBuilder,
    open: HashMap<BuyerId, BTreeSet<JobId>>,
}

impl State {
    fn new(ledger: Ledger, chain: ChainBuilder) -> Self {
        let mut open: HashMap<BuyerId, BTreeSet<JobId>> = HashMap::new();
        for (job, e) in ledger.escrows() {
            if e.is_open() {
                open.entry(e.buyer).or_default().insert(*job);
            }
        }
        Self {
            ledger,
            chain,
            open,
        }
    }

    /// Keeps `open` in step with an effect that just applied.
    fn note(&mut self, effect: &Applied) {
        match effect {
            Applied::Locked { job, buyer, .. } => {
                self.open.entry(*buyer).or_default().insert(*job);
            }
            Applied::Released { job, buyer, .. } | Applied::Refunded { job, buyer, .. } => {
                if let Some(jobs) = self.open.get_mut(buyer) {
                    jobs.remove(job);
                    if jobs.is_empty() {
                        self.open.remove(buyer);
                    }
                }
            }
            _ => {}
        }
    }
}

/// What the lock guards: the live state, which a change in progress
/// mutates, and the state as last committed.
struct Books {
    live: State,
    committed: State,
}

pub struct Bank {
    state: Mutex<Books>,
    pub fee_bps: u16,
    /// Bumped by every commit that changed the ledger (see [`Bank::version`]).
    version: AtomicU64,
}

/// A change in progress inside a transaction; `commit` publishes it, and
/// dropping it uncommitted undoes it.
pub struct Pending<'a> {
    guard: MutexGuard<'a, Books>,
    /// Operations applied under new keys, in order: what `committed`
    /// replays at commit.
    new_ops: Vec<Op>,
    /// Whether `live` may differ from `committed` (set before the fallible
    /// steps that follow an apply).
    dirty: bool,
    version: &'a AtomicU64,
}

impl Bank {
    /// Loads and verifies the chain; migrates a pre-chain database by
    /// replaying its `ledger_ops` into signed entries once; indexes the
    /// accounts of entries written before statements were indexed.
    pub async fn load(db: &Db, key: &Keypair, fee_bps: u16) -> Result<Self, BankError> {
        let mut entries = db.ledger_entries(0, u32::MAX).await?;
        if entries.is_empty() {
            let ops = db.ledger_ops().await?;
            if !ops.is_empty() {
                let bank = Self::with(Ledger::new(), ChainBuilder::genesis(key.clone()), fee_bps);
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
        index_accounts(db, &decoded).await?;
        let chain = match decoded.last() {
            Some(last) => ChainBuilder::after(key.clone(), last),
            None => ChainBuilder::genesis(key.clone()),
        };
        Ok(Self::with(ledger, chain, fee_bps))
    }

    fn with(ledger: Ledger, chain: ChainBuilder, fee_bps: u16) -> Self {
        let state = State::new(ledger, chain);
        Self {
            state: Mutex::new(Books {
                committed: state.clone(),
                live: state,
            }),
            fee_bps,
            version: AtomicU64::new(0),
        }
    }

    /// Starts a change. Holding the returned value serializes settlement.
    /// Copies nothing: the change is applied in place.
    pub async fn begin(&self) -> Pending<'_> {
        Pending {
            guard: self.state.lock().await,
            new_ops: Vec::new(),
            dirty: false,
            version: &self.version,
        }
    }

    /// A copy of the whole ledger: for tests and tools, never per request
    /// (it is as long as the ledger; see [`Self::read`]).
    pub async fn snapshot(&self) -> Ledger {
        self.state.lock().await.live.ledger.clone()
    }

    /// `f` over the ledger as committed, without copying it.
    pub async fn read<T>(&self, f: impl FnOnce(&Ledger) -> T) -> T {
        f(&self.state.lock().await.live.ledger)
    }

    /// An account's balance now.
    pub async fn balance(&self, account: &AccountId) -> Credits {
        self.state.lock().await.live.ledger.balance(account)
    }

    /// What `buyer`'s open escrows hold now (walks its open escrows only).
    pub async fn escrowed(&self, buyer: &BuyerId) -> Credits {
        let books = self.state.lock().await;
        let s = &books.live;
        let held = s
            .open
            .get(buyer)
            .into_iter()
            .flatten()
            .map(|job| s.ledger.escrow(job).map_or(0, |e| u128::from(e.held().0)));
        Credits(u64::try_from(held.sum::<u128>()).unwrap_or(u64::MAX))
    }

    /// A provider's stake bond now (without copying the ledger).
    pub async fn bond(&self, provider: &kiln_protocol::ProviderId) -> kiln_protocol::Credits {
        self.state.lock().await.live.ledger.bond(provider)
    }

    /// A number that changes whenever a change commits: what caches of
    /// views over balances compare to know they are stale.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

impl Pending<'_> {
    /// Applies `op` and stages its signed entry, balance rows and account
    /// index rows in `tx`. An operation whose key was already applied
    /// changes and writes nothing.
    pub async fn apply(&mut self, tx: &mut Tx<'_>, op: Op) -> Result<Applied, BankError> {
        let live = &mut self.guard.live;
        let already = live.ledger.applied(op.key()).is_some();
        // On error the ledger is unchanged (the contract's rule).
        let applied = live.ledger.apply(op.clone())?;
        if already {
            return Ok(applied);
        }
        self.dirty = true;
        self.new_ops.push(op.clone());
        live.note(&applied);
        let entry = live
            .chain
            .append(op, applied.clone(), UnixMillis::now())
            .map_err(|e| BankError::Encode(e.to_string()))?;
        let bytes = entry
            .to_bytes()
            .map_err(|e| BankError::Encode(e.to_string()))?;
        let seq = entry.payload.seq;
        Db::append_ledger_entry(tx, seq, &bytes, entry.payload.at).await?;
        let accounts: BTreeSet<AccountId> = applied
            .balance_deltas()
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        for account in &accounts {
            let name = account.to_string();
            Db::set_balance(tx, &name, live.ledger.balance(account).0).await?;
            Db::index_ledger_account(tx, &name, seq).await?;
        }
        Ok(applied)
    }

    pub fn ledger(&self) -> &Ledger {
        &self.guard.live.ledger
    }

    /// Publishes the pending state; call right after the transaction commits.
    pub fn commit(mut self) {
        if !self.dirty {
            return;
        }
        let books = &mut *self.guard;
        let mut caught_up = true;
        for op in self.new_ops.drain(..) {
            match books.committed.ledger.apply(op) {
                Ok(effect) => books.committed.note(&effect),
                Err(e) => {
                    // Cannot happen (the same ops on the same state); if
                    // it did, the live state is the one on disk.
                    tracing::error!(
                        "the committed ledger copy refused an op the live one applied: {e}; copying the live ledger"
                    );
                    caught_up = false;
                    break;
                }
            }
        }
        books.committed.chain = books.live.chain.clone();
        if !caught_up {
            books.committed = books.live.clone();
        }
        self.dirty = false;
        self.version.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Pending<'_> {
    /// An uncommitted change is undone before the lock is released.
    fn drop(&mut self) {
        if self.dirty {
            tracing::debug!(
                ops = self.new_ops.len(),
                "a settlement change was abandoned after an op applied; restoring the committed ledger"
            );
            let books = &mut *self.guard;
            books.live = books.committed.clone();
        }
    }
}

/// Indexes the accounts of every entry after the last one indexed (all of
/// them, the first time a database from before the index is opened).
async fn index_accounts(db: &Db, entries: &[Signed<LedgerEntry>]) -> Result<(), BankError> {
    let after = db.ledger_indexed_through().await?;
    let todo: Vec<&Signed<LedgerEntry>> = entries
        .iter()
        .filter(|e| after.is_none_or(|a| e.payload.seq > a))
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let mut tx = db.begin().await?;
    for e in &todo {
        let accounts: BTreeSet<AccountId> = e
            .payload
            .effect
            .balance_deltas()
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        for a in accounts {
            Db::index_ledger_account(&mut tx, &a.to_string(), e.payload.seq).await?;
        }
    }
    tx.commit().await.map_err(DbError::from)?;
    tracing::info!(
        entries = todo.len(),
        "indexed ledger entries by account for statements"
    );
    Ok(())
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

    use kiln_contracts::OpKey;

    async fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("kiln.db")).await.unwrap();
        (dir, db)
    }

    fn buyer(n: u8) -> BuyerId {
        BuyerId::new(Keypair::from_secret_bytes([n; 32]).public())
    }

    fn deposit(key: &str, to: BuyerId, amount: u64) -> Op {
        Op::Deposit {
            key: OpKey::new(key),
            account: AccountId::Buyer(to),
            amount: Credits(amount),
        }
    }

    fn lock(job: JobId, by: BuyerId, amount: u64) -> Op {
        Op::Lock {
            key: OpKey::new(format!("lock:{job}")),
            job,
            buyer: by,
            amount: Credits(amount),
        }
    }

    /// Applies `ops` in one change and commits it.
    async fn commit(bank: &Bank, db: &Db, ops: Vec<Op>) {
        let mut tx = db.begin().await.unwrap();
        let mut p = bank.begin().await;
        for op in ops {
            p.apply(&mut tx, op).await.unwrap();
        }
        tx.commit().await.unwrap();
        p.commit();
    }

    #[tokio::test]
    async fn an_abandoned_change_is_undone_and_the_chain_stays_whole() {
        let (_dir, db) = db().await;
        let key = Keypair::from_secret_bytes([7; 32]);
        let bank = Bank::load(&db, &key, 100).await.unwrap();
        let (a, b) = (buyer(1), buyer(2));
        commit(&bank, &db, vec![deposit("d:a", a, 1_000)]).await;
        let v = bank.version();

        // A change that applied an op, then its transaction was dropped.
        {
            let mut tx = db.begin().await.unwrap();
            let mut p = bank.begin().await;
            p.apply(&mut tx, deposit("d:b", b, 500)).await.unwrap();
            let job = JobId::derive(&a, &Nonce::from_bytes([1; 16]));
            p.apply(&mut tx, lock(job, a, 300)).await.unwrap();
            assert_eq!(p.ledger().balance(&AccountId::Buyer(a)), Credits(700));
        }
        assert_eq!(bank.balance(&AccountId::Buyer(a)).await, Credits(1_000));
        assert_eq!(bank.balance(&AccountId::Buyer(b)).await, Credits(0));
        assert_eq!(bank.escrowed(&a).await, Credits(0));
        assert_eq!(bank.version(), v, "nothing committed");
        assert!(bank.read(|l| l.applied(&OpKey::new("d:b")).is_none()).await);

        // The same ops again, committed: they chain on from the last
        // committed entry, and the whole chain verifies from genesis.
        let job = JobId::derive(&a, &Nonce::from_bytes([1; 16]));
        commit(&bank, &db, vec![deposit("d:b", b, 500), lock(job, a, 300)]).await;
        assert!(bank.version() > v);
        assert_eq!(bank.escrowed(&a).await, Credits(300));
        assert_eq!(bank.balance(&AccountId::Buyer(a)).await, Credits(700));
        // A retried key changes nothing, and commits as nothing new.
        commit(&bank, &db, vec![deposit("d:b", b, 500)]).await;
        assert_eq!(bank.balance(&AccountId::Buyer(b)).await, Credits(500));
        let again = Bank::load(&db, &key, 100).await.unwrap();
        assert_eq!(again.snapshot().await, bank.snapshot().await);
        assert_eq!(again.escrowed(&a).await, Credits(300));
        // An escrow closed is no longer counted.
        commit(
            &bank,
            &db,
            vec![Op::Refund {
                key: OpKey::new(format!("close:{job}")),
                job,
            }],
        )
        .await;
        assert_eq!(bank.escrowed(&a).await, Credits(0));
        assert_eq!(bank.balance(&AccountId::Buyer(a)).await, Credits(1_000));
    }

    #[tokio::test]
    async fn entries_are_indexed_by_account_and_an_old_database_is_indexed_at_start() {
        let (_dir, db) = db().await;
        let key = Keypair::from_secret_bytes([7; 32]);
        let bank = Bank::load(&db, &key, 100).await.unwrap();
        let (a, b) = (buyer(1), buyer(2));
        let n = 5u64;
        for i in 0..n {
            commit(&bank, &db, vec![deposit(&format!("a{i}"), a, 10)]).await;
            commit(&bank, &db, vec![deposit(&format!("b{i}"), b, 10)]).await;
        }
        let of = |who: BuyerId| AccountId::Buyer(who).to_string();
        let page = db.statement_page(&of(a), 0, 100).await.unwrap();
        assert_eq!(page.len() as u64, n);
        assert!(
            page.iter().all(|(seq, _)| seq % 2 == 0),
            "a's are the even entries"
        );
        // Paged: from the seq after a page's last.
        let first = db.statement_page(&of(b), 0, 2).await.unwrap();
        let rest = db
            .statement_page(&of(b), first[1].0 + 1, 100)
            .await
            .unwrap();
        assert_eq!((first.len() + rest.len()) as u64, n);

        // A database written before the index: indexed when loaded.
        sqlx::query("DELETE FROM ledger_accounts")
            .execute(&db.pool)
            .await
            .unwrap();
        assert!(db.statement_page(&of(a), 0, 100).await.unwrap().is_empty());
        Bank::load(&db, &key, 100).await.unwrap();
        assert_eq!(db.statement_page(&of(a), 0, 100).await.unwrap(), page);
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
