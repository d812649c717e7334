//! Money across the marketplace's edge: an operator records a buyer's
//! deposit (money it received) and a provider's payout (money it sent) in
//! the signed ledger, like every other operation.
//!
//! `POST /v1/operator/transfers` takes a [`TransferRequest`] signed (as any
//! request, see [`crate::auth`]) by one of the coordinator's operator keys
//! ([`crate::CoordinatorConfig::operators`]); any other signer gets 403.
//! Each transfer is keyed by the operator's own reference (`deposit:<ref>`,
//! `payout:<ref>`), so a command sent twice moves money once, and a
//! reference reused for a different transfer is refused. A payout larger
//! than what the account holds (its bond and escrows are not part of that)
//! is refused and changes nothing.
//!
//! The money itself moves outside Kiln (a bank transfer, a card payment);
//! the ledger records that it did. An on-chain escrow would replace this
//! operator with a contract: `kiln_contracts::Settlement` is where it plugs
//! in, and the same `Deposit`/`Withdraw` ops would then record what the
//! chain confirmed.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use kiln_contracts::{AccountId, Applied, ContractError, Op, OpKey};
use kiln_protocol::BuyerId;
use kiln_protocol::views::{TransferKind, TransferRequest, TransferView};

use crate::AppState;
use crate::auth::{ApiError, Buyer};
use crate::bank::BankError;

/// Longest operator reference.
pub const MAX_REFERENCE: usize = 128;

fn bad(field: &str, reason: String) -> ApiError {
    ApiError::BadRequest {
        field: Some(field.into()),
        reason,
    }
}

/// Checks a transfer and returns the account and the ledger op it records.
pub fn plan(req: &TransferRequest) -> Result<(AccountId, Op), ApiError> {
    let account: AccountId = req
        .account
        .parse()
        .map_err(|e: kiln_protocol::IdParseError| bad("account", e.to_string()))?;
    match (&account, req.kind) {
        (AccountId::Buyer(_) | AccountId::Provider(_), _) => {}
        _ => {
            return Err(bad(
                "account",
                format!(
                    "{account} is not a buyer's or a provider's account: only those take deposits and payouts"
                ),
            ));
        }
    }
    if req.amount.0 == 0 {
        return Err(bad("amount", "the amount is zero".into()));
    }
    let r = &req.reference;
    if r.is_empty()
        || r.len() > MAX_REFERENCE
        || !r
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:/#-".contains(c))
    {
        return Err(bad(
            "reference",
            format!(
                "a reference is 1 to {MAX_REFERENCE} characters of letters, digits and . _ : / # - (the payment's own id, e.g. a bank transfer number)"
            ),
        ));
    }
    let key = OpKey::new(format!("{}:{r}", req.kind.as_str()));
    let op = match req.kind {
        TransferKind::Deposit => Op::Deposit {
            key,
            account,
            amount: req.amount,
        },
        TransferKind::Payout => Op::Withdraw {
            key,
            account,
            amount: req.amount,
        },
    };
    Ok((account, op))
}

/// `POST /v1/operator/transfers`.
pub async fn transfer(
    State(state): State<AppState>,
    Buyer(signer): Buyer,
    body: Bytes,
) -> Result<Json<TransferView>, ApiError> {
    if !state
        .config
        .operators
        .iter()
        .any(|k| BuyerId::new(*k) == signer)
    {
        return Err(ApiError::Forbidden(format!(
            "key {} is not one of this coordinator's operator keys; sign with the operator key (`kiln --key <state-dir>/operator.key operator …`)",
            signer.short()
        )));
    }
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let req: TransferRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::BadRequest {
            field: (path != ".").then_some(path.clone()),
            reason: format!("malformed transfer at `{path}`: {}", e.inner()),
        }
    })?;
    let (account, op) = plan(&req)?;
    let key = op.key().clone();
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    let applied = match pending.ledger().applied(&key) {
        Some(done) if done.op == op => false,
        Some(done) => {
            return Err(bad(
                "reference",
                format!(
                    "reference {} was already recorded for another transfer ({}); use the new payment's own reference",
                    req.reference,
                    describe(&done.effect)
                ),
            ));
        }
        None => {
            pending.apply(&mut tx, op).await.map_err(|e| match e {
                BankError::Contract(ContractError::InsufficientFunds {
                    available, needed, ..
                }) => bad(
                    "amount",
                    format!(
                        "{account} holds {available}, less than the payout of {needed}; pay out at most what it holds"
                    ),
                ),
                other => ApiError::Internal(other.to_string()),
            })?;
            true
        }
    };
    tx.commit().await.map_err(crate::db::DbError::from)?;
    pending.commit();
    let balance = state.bank.balance(&account).await;
    tracing::info!(operator = %signer.short(), kind = req.kind.as_str(), account = %account, amount = %req.amount, reference = %req.reference, applied, "transfer");
    Ok(Json(TransferView {
        kind: req.kind,
        account: account.to_string(),
        amount: req.amount,
        reference: req.reference,
        applied,
        balance,
    }))
}

fn describe(effect: &Applied) -> String {
    match effect {
        Applied::Deposited {
            account, amount, ..
        } => format!("a deposit of {amount} to {account}"),
        Applied::Withdrawn {
            account, amount, ..
        } => format!("a payout of {amount} from {account}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::{Credits, Keypair, ProviderId};

    fn req(kind: TransferKind, account: &str, amount: u64, reference: &str) -> TransferRequest {
        TransferRequest {
            kind,
            account: account.into(),
            amount: Credits(amount),
            reference: reference.into(),
        }
    }

    #[test]
    fn transfers_are_checked_before_anything_moves() {
        let buyer = AccountId::Buyer(BuyerId::new(Keypair::generate().public()));
        let provider =
            AccountId::Provider(ProviderId::from_public_key(&Keypair::generate().public()));
        let (b, p) = (buyer.to_string(), provider.to_string());
        use TransferKind::{Deposit as D, Payout as P};
        // (request, refused field)
        let table: [(TransferRequest, Option<&str>); 8] = [
            (req(D, &b, 5, "wire-1"), None),
            (req(P, &p, 5, "payout/2026-12/7"), None),
            (req(D, "fee", 5, "x"), Some("account")),
            (req(D, "buyer:nope", 5, "x"), Some("account")),
            (req(D, &b, 0, "x"), Some("amount")),
            (req(D, &b, 5, ""), Some("reference")),
            (req(D, &b, 5, "has space"), Some("reference")),
            (
                req(D, &b, 5, &"r".repeat(MAX_REFERENCE + 1)),
                Some("reference"),
            ),
        ];
        for (r, refused) in table {
            match (plan(&r), refused) {
                (Ok((account, op)), None) => {
                    assert_eq!(account.to_string(), r.account);
                    assert_eq!(
                        op.key().as_str(),
                        format!("{}:{}", r.kind.as_str(), r.reference)
                    );
                }
                (Err(ApiError::BadRequest { field, .. }), Some(f)) => {
                    assert_eq!(field.as_deref(), Some(f), "{r:?}");
                }
                (got, want) => panic!("{r:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
