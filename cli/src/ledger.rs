//! `kiln ledger verify`: audit a coordinator's settlement ledger from the
//! outside, trusting nothing but its published public key.
//!
//! Fetches every entry (canonical bytes), replays the chain from genesis —
//! checking each signature, each `prev` link and each recorded effect — and
//! compares the balances it recomputes with the balances the coordinator
//! says it holds. The first bad entry is named.

use std::collections::BTreeMap;

use anyhow::Context;
use kiln_contracts::chain::{LedgerEntry, verify_chain};
use kiln_contracts::{AccountId, Credits, compare_balances};
use kiln_protocol::{PublicKey, Signed};
use serde::Serialize;

use crate::Client;

/// Why an audit failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("ledger entry {seq} is malformed: {reason}")]
    Malformed { seq: u64, reason: String },
    #[error(transparent)]
    Chain(#[from] kiln_contracts::chain::ChainError),
    #[error(transparent)]
    Balances(#[from] kiln_contracts::chain::Mismatch),
}

/// What a passed audit found (`kiln ledger verify`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    pub ok: bool,
    /// Entries replayed.
    pub entries: usize,
    /// Hex of the last entry's hash (`None` for an empty ledger).
    pub head: Option<String>,
    /// Accounts whose stored balance matched.
    pub accounts: usize,
    pub coordinator_key: String,
    pub total_deposited: Credits,
    pub total_burned: Credits,
}

/// Verifies the ledger of the coordinator behind `client` against `key`
/// (by default the key the coordinator publishes at `/v1/info`).
pub async fn verify(
    client: &Client,
    key: Option<PublicKey>,
) -> anyhow::Result<Result<AuditReport, AuditError>> {
    let key = match key {
        Some(k) => k,
        None => client.info().await?.public_key,
    };
    let mut entries: Vec<Signed<LedgerEntry>> = Vec::new();
    let mut from = 0;
    loop {
        let page = client.ledger_page(from, 1000).await?;
        if page.entries.is_empty() {
            break;
        }
        for row in &page.entries {
            let decoded = row
                .bytes()
                .map_err(|e| e.to_string())
                .and_then(|b| Signed::<LedgerEntry>::from_bytes(&b).map_err(|e| e.to_string()));
            match decoded {
                Ok(e) => entries.push(e),
                Err(reason) => {
                    return Ok(Err(AuditError::Malformed {
                        seq: row.seq,
                        reason,
                    }));
                }
            }
        }
        from = page.next.context("ledger page without next")?;
    }
    let ledger = match verify_chain(&entries, &key) {
        Ok(l) => l,
        Err(e) => return Ok(Err(e.into())),
    };
    let claimed: BTreeMap<AccountId, Credits> = client
        .ledger_balances()
        .await?
        .balances
        .into_iter()
        .map(|(a, c)| a.parse().map(|a| (a, c)))
        .collect::<Result<_, _>>()
        .context("malformed balances")?;
    if let Err(e) = compare_balances(&ledger, &claimed) {
        return Ok(Err(e.into()));
    }
    let head = entries
        .last()
        .map(|e| hex::encode(kiln_contracts::chain::entry_hash(e)));
    Ok(Ok(AuditReport {
        ok: true,
        entries: entries.len(),
        head,
        accounts: claimed.len(),
        coordinator_key: key.to_string(),
        total_deposited: ledger.total_deposited(),
        total_burned: ledger.total_burned(),
    }))
}
