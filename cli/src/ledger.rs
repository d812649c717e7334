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
use serde_json::{Value, json};

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

/// Verifies the ledger of the coordinator behind `client` against `key`
/// (by default the key the coordinator publishes at `/v1/info`).
pub async fn verify(
    client: &Client,
    key: Option<PublicKey>,
) -> anyhow::Result<Result<Value, AuditError>> {
    let key = match key {
        Some(k) => k,
        None => client.info().await?["public_key"]
            .as_str()
            .context("no public_key in /v1/info")?
            .parse()?,
    };
    let mut entries: Vec<Signed<LedgerEntry>> = Vec::new();
    let mut from = 0;
    loop {
        let page = client.ledger_page(from, 1000).await?;
        let rows = page["entries"]
            .as_array()
            .context("malformed ledger page")?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let seq = row["seq"].as_u64().context("ledger row without seq")?;
            let decoded = hex::decode(row["entry"].as_str().unwrap_or(""))
                .map_err(|e| e.to_string())
                .and_then(|b| Signed::<LedgerEntry>::from_bytes(&b).map_err(|e| e.to_string()));
            match decoded {
                Ok(e) => entries.push(e),
                Err(reason) => return Ok(Err(AuditError::Malformed { seq, reason })),
            }
        }
        from = page["next"].as_u64().context("ledger page without next")?;
    }
    let ledger = match verify_chain(&entries, &key) {
        Ok(l) => l,
        Err(e) => return Ok(Err(e.into())),
    };
    let claimed: BTreeMap<AccountId, Credits> =
        serde_json::from_value(client.ledger_balances().await?["balances"].clone())
            .context("malformed balances")?;
    if let Err(e) = compare_balances(&ledger, &claimed) {
        return Ok(Err(e.into()));
    }
    let head = entries
        .last()
        .map(|e| hex::encode(kiln_contracts::chain::entry_hash(e)));
    Ok(Ok(json!({
        "ok": true,
        "entries": entries.len(),
        "head": head,
        "accounts": claimed.len(),
        "coordinator_key": key.to_string(),
        "total_deposited": ledger.total_deposited(),
        "total_burned": ledger.total_burned(),
    })))
}
