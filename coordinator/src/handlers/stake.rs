//! `Stake`: provider stake bonds. A provider sets the bond it wants to hold; the
//! coordinator stakes from (or unstakes to) its balance to reach it. The
//! scheduler offers work only to providers whose bond meets `min_stake`, and
//! the bond is what slashing takes from, so unstaking is refused while the
//! provider holds jobs or any verification of its results is open: it
//! cannot pull its stake out from under a dispute.

use kiln_contracts::{AccountId, Op, OpKey};
use kiln_protocol::{Credits, ProviderId, SetStake, Signed, UnixMillis};

use super::{Handled, refuse};
use crate::AppState;
use crate::jobs::keys;

/// What to do to move a bond from `bond` to `target`: a pure decision.
pub fn stake_op(provider: ProviderId, bond: Credits, target: Credits, key: OpKey) -> Option<Op> {
    if target > bond {
        Some(Op::Stake {
            key: key.clone(),
            provider,
            amount: Credits(target.0 - bond.0),
        })
    } else if target < bond {
        Some(Op::Unstake {
            key: key.clone(),
            provider,
            amount: Credits(bond.0 - target.0),
        })
    } else {
        None
    }
}

pub async fn handle(state: &AppState, peer: ProviderId, signed: &Signed<SetStake>) -> Handled {
    let req = signed
        .verify(UnixMillis::now())
        .map_err(|e| refuse(format!("stake request refused: {e}")))?;
    if ProviderId::from_public_key(&signed.signer) != peer || req.provider != peer {
        return Err(refuse(
            "stake request refused: not signed and sent by the provider it names",
        ));
    }
    let key = keys::stake(&peer, &signed.nonce);
    // Every check that can refuse comes before the database's write lock
    // and the bank: a peer asking for nothing new, for more than it has,
    // or to unstake while it must not, costs a few reads, never a place
    // in the queue of writers that settlement waits in.
    let bond = state.bank.bond(&peer).await;
    let Some(op) = stake_op(peer, bond, req.target, key.clone()) else {
        return Ok(());
    };
    match &op {
        Op::Stake { amount, .. } => {
            let balance = state.bank.balance(&AccountId::Provider(peer)).await;
            if balance < *amount {
                return Err(refuse(format!(
                    "stake refused: a bond of {} needs {} more, and this provider's balance is {}; \
                     earn it by running jobs (or ask for a smaller bond)",
                    req.target, amount, balance
                )));
            }
        }
        _ => may_unstake(state, &peer).await?,
    }
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    // Again under the lock: another request may have moved the bond, or a
    // job been placed on this provider, since the checks above.
    let bond = pending.ledger().bond(&peer);
    let Some(op) = stake_op(peer, bond, req.target, key) else {
        return Ok(());
    };
    if matches!(op, Op::Unstake { .. }) {
        may_unstake(state, &peer).await?;
    }
    match pending.apply(&mut tx, op).await {
        Ok(_) => {
            tx.commit().await.map_err(crate::db::DbError::from)?;
            pending.commit();
            tracing::info!(provider = %peer.short(), target = %req.target, "stake bond set");
            Ok(())
        }
        Err(e) => Err(refuse(format!("stake change refused: {e}"))),
    }
}

/// Refuses an unstake while the bond still backs something: a job
/// assigned to the provider, or an open verification of its results (the
/// unbonding delay: a slash must always find the bond; each such wait
/// ends with its audit window).
async fn may_unstake(state: &AppState, peer: &ProviderId) -> Result<(), super::HandlerError> {
    let holding = state.db.jobs_held_by(peer).await?.len();
    if holding > 0 {
        return Err(refuse(format!(
            "unstake refused: {holding} {} assigned to this provider; drain it first",
            if holding == 1 { "job is" } else { "jobs are" }
        )));
    }
    let open = state.db.open_audits_of(peer).await?;
    if open > 0 {
        return Err(refuse(format!(
            "unstake refused: {open} verification{} of results this provider delivered or re-executed {} still open; \
             the bond stays until {} judged (at most the audit window, {} minutes, plus twice the job's timeout)",
            if open == 1 { "" } else { "s" },
            if open == 1 { "is" } else { "are" },
            if open == 1 { "it is" } else { "they are" },
            state.config.verification.window.as_secs() / 60
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stake_op_table() {
        let p = ProviderId::from_public_key(&kiln_protocol::Keypair::generate().public());
        let kind = |o: Option<Op>| {
            o.map(|o| {
                (
                    o.name(),
                    match o {
                        Op::Stake { amount, .. } | Op::Unstake { amount, .. } => amount.0,
                        _ => 0,
                    },
                )
            })
        };
        assert_eq!(
            kind(stake_op(p, Credits(0), Credits(100), OpKey::new("k"))),
            Some(("stake", 100))
        );
        assert_eq!(
            kind(stake_op(p, Credits(150), Credits(100), OpKey::new("k"))),
            Some(("unstake", 50))
        );
        assert_eq!(
            kind(stake_op(p, Credits(100), Credits(100), OpKey::new("k"))),
            None
        );
    }
}
