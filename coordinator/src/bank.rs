//! Settlement as the coordinator runs it: the pure `kiln_contracts::Ledger`
//! in memory, rebuilt at start-up by replaying `ledger_ops`, and every new
//! operation written to `ledger_ops` in the *same* database transaction as
//! the job change that caused it. The in-memory ledger is only replaced
//! after that transaction commits, so memory never runs ahead of disk.

use kiln_contracts::{Applied, ContractError, Ledger, Op};
use tokio::sync::{Mutex, MutexGuard};

use crate::db::{Db, DbError, Tx};

#[derive(Debug, thiserror::Error)]
pub enum BankError {
    #[error(transparent)]
    Contract(#[from] ContractError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("stored ledger operation is unreadable: {0}")]
    Corrupt(String),
}

pub struct Bank {
    ledger: Mutex<Ledger>,
    pub fee_bps: u16,
}

/// A ledger being changed inside a transaction; `commit` publishes it.
pub struct Pending<'a> {
    guard: MutexGuard<'a, Ledger>,
    next: Ledger,
}

impl Bank {
    /// Replays every stored operation from genesis and checks the invariants.
    pub async fn load(db: &Db, fee_bps: u16) -> Result<Self, BankError> {
        let mut ledger = Ledger::new();
        for op in db.ledger_ops().await? {
            let op: Op =
                serde_json::from_str(&op).map_err(|e| BankError::Corrupt(e.to_string()))?;
            ledger.apply(op)?;
        }
        ledger.check_invariants().map_err(|e| {
            BankError::Corrupt(format!("ledger invariant violated after replay: {e}"))
        })?;
        Ok(Self {
            ledger: Mutex::new(ledger),
            fee_bps,
        })
    }

    /// Starts a change. Holding the returned value serializes settlement.
    pub async fn begin(&self) -> Pending<'_> {
        let guard = self.ledger.lock().await;
        let next = guard.clone();
        Pending { guard, next }
    }

    pub async fn snapshot(&self) -> Ledger {
        self.ledger.lock().await.clone()
    }
}

impl Pending<'_> {
    /// Applies `op` to the pending ledger and stages its row in `tx`. An
    /// operation whose key was already applied changes nothing and writes nothing.
    pub async fn apply(&mut self, tx: &mut Tx<'_>, op: Op) -> Result<Applied, BankError> {
        let already = self.next.applied(op.key()).is_some();
        let key = op.key().as_str().to_string();
        let op_json = serde_json::to_string(&op).map_err(|e| BankError::Corrupt(e.to_string()))?;
        let applied = self.next.apply(op)?;
        if !already {
            let applied_json =
                serde_json::to_string(&applied).map_err(|e| BankError::Corrupt(e.to_string()))?;
            Db::append_ledger_op(tx, &key, &op_json, &applied_json).await?;
        }
        Ok(applied)
    }

    pub fn ledger(&self) -> &Ledger {
        &self.next
    }

    /// Publishes the pending ledger; call right after the transaction commits.
    pub fn commit(mut self) {
        *self.guard = self.next;
    }
}
