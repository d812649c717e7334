//! Provider stake bonds. A provider sets the bond it wants to hold; the
//! coordinator stakes from (or unstakes to) its balance to reach it. The
//! scheduler offers work only to providers whose bond meets `min_stake`, and
//! the bond is what slashing takes from, so unstaking is refused while the
//! provider holds jobs: it cannot pull its stake out from under a dispute.

use kiln_contracts::{Op, OpKey};
use kiln_protocol::{Credits, NetResponse, ProviderId, SetStake, Signed, UnixMillis};

use crate::AppState;
use crate::db::DbError;

/// What to do to move a bond from `bond` to `target`: a pure decision.
pub fn stake_op(provider: ProviderId, bond: Credits, target: Credits, key: &str) -> Option<Op> {
    if target > bond {
        Some(Op::Stake {
            key: OpKey::new(key),
            provider,
            amount: Credits(target.0 - bond.0),
        })
    } else if target < bond {
        Some(Op::Unstake {
            key: OpKey::new(key),
            provider,
            amount: Credits(bond.0 - target.0),
        })
    } else {
        None
    }
}

pub async fn set_stake(
    state: &AppState,
    peer: ProviderId,
    signed: &Signed<SetStake>,
) -> Result<NetResponse, DbError> {
    let rejected = |r: String| NetResponse::Rejected { reason: r };
    let req = match signed.verify(UnixMillis::now()) {
        Ok(r) => r,
        Err(e) => return Ok(rejected(format!("stake request refused: {e}"))),
    };
    if ProviderId::from_public_key(&signed.signer) != peer || req.provider != peer {
        return Ok(rejected(
            "stake request refused: not signed and sent by the provider it names".into(),
        ));
    }
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    let bond = pending.ledger().bond(&peer);
    let Some(op) = stake_op(
        peer,
        bond,
        req.target,
        &format!("stake:{peer}:{}", signed.nonce),
    ) else {
        return Ok(NetResponse::Accepted);
    };
    if matches!(op, Op::Unstake { .. }) {
        let holding = state.db.active_jobs_of(&peer).await?.len()
            + crate::gang::member_jobs(state, peer).await?.len();
        if holding > 0 {
            return Ok(rejected(format!(
                "unstake refused: {holding} {} assigned to this provider; drain it first",
                if holding == 1 { "job is" } else { "jobs are" }
            )));
        }
    }
    match pending.apply(&mut tx, op).await {
        Ok(_) => {
            tx.commit().await?;
            pending.commit();
            tracing::info!(provider = %peer.short(), target = %req.target, "stake bond set");
            Ok(NetResponse::Accepted)
        }
        Err(e) => Ok(rejected(format!("stake change refused: {e}"))),
    }
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
            kind(stake_op(p, Credits(0), Credits(100), "k")),
            Some(("stake", 100))
        );
        assert_eq!(
            kind(stake_op(p, Credits(150), Credits(100), "k")),
            Some(("unstake", 50))
        );
        assert_eq!(kind(stake_op(p, Credits(100), Credits(100), "k")), None);
    }
}
