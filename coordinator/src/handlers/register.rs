//! `Register`: a provider's signed capability advert, sent on every
//! heartbeat. Its signer must be the sending peer and the provider it
//! names; the protocol version must match. Registration refreshes the
//! provider's lease and its place in the scheduler's fleet.

use kiln_contracts::{AccountId, Op};
use kiln_protocol::{CapabilityAdvert, ProviderId, Signed, UnixMillis};

use super::{Handled, refuse};
use crate::AppState;
use crate::jobs::keys;

pub async fn handle(
    state: &AppState,
    peer: ProviderId,
    advert: &Signed<CapabilityAdvert>,
) -> Handled {
    let a = advert
        .verify(UnixMillis::now())
        .map_err(|e| refuse(format!("advert refused: {e}")))?;
    let signer = ProviderId::from_public_key(&advert.signer);
    if signer != peer || a.provider != peer {
        return Err(refuse(format!(
            "advert refused: signed by {signer} for {}, but sent by {peer}",
            a.provider
        )));
    }
    if a.protocol_version != kiln_protocol::PROTOCOL_VERSION {
        return Err(refuse(format!(
            "advert refused: protocol version {} is not {}; upgrade kiln-node",
            a.protocol_version,
            kiln_protocol::PROTOCOL_VERSION
        )));
    }
    let known = state.db.provider_known(&peer).await?;
    state.db.upsert_provider(advert).await?;
    crate::live::observe(state, a).await?;
    if let (false, Some(grant)) = (known, state.config.faucet) {
        // Test networks: a new provider starts funded once, so it can stake.
        let account = AccountId::Provider(peer);
        let mut tx = state.db.begin().await?;
        let mut pending = state.bank.begin().await;
        let op = Op::Deposit {
            key: keys::faucet(&account),
            account,
            amount: grant,
        };
        if pending.apply(&mut tx, op).await.is_ok() {
            tx.commit().await.map_err(crate::db::DbError::from)?;
            pending.commit();
        }
    }
    if !known {
        tracing::info!(provider = %peer, cpus = a.cpu.logical_cores, gpus = a.gpus.len(), "provider registered");
    }
    state.wake.notify_one();
    Ok(())
}
