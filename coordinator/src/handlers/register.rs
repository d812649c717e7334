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
    if let Some(g) = a.gpus.iter().find(|g| {
        g.mig
            .as_deref()
            .is_some_and(|p| !kiln_protocol::spec::is_mig_profile(p))
    }) {
        return Err(refuse(format!(
            "advert refused: GPU {} names MIG profile {:?}, which is not NVIDIA's form (such as 1g.10gb)",
            g.uuid,
            g.mig.as_deref().unwrap_or_default()
        )));
    }
    let known = state.db.provider_known(&peer).await?;
    state.db.upsert_provider(advert).await?;
    crate::live::observe(state, a).await?;
    if let Some(grant) = state.config.faucet {
        // Test networks: a provider starts funded once, so it can stake.
        // Keyed by the grant itself, not by "first registration": the
        // provider row is written before this transaction, so a process
        // killed in between would otherwise never fund it; the next
        // heartbeat does. An applied key is checked in memory first, so
        // heartbeats write nothing.
        let account = AccountId::Provider(peer);
        let key = keys::faucet(&account);
        if state.bank.read(|l| l.applied(&key).is_none()).await {
            let mut tx = state.db.begin().await?;
            let mut pending = state.bank.begin().await;
            let op = Op::Deposit {
                key,
                account,
                amount: grant,
            };
            if pending.apply(&mut tx, op).await.is_ok() {
                tx.commit().await.map_err(crate::db::DbError::from)?;
                pending.commit();
            }
        }
    }
    if !known {
        tracing::info!(provider = %peer, cpus = a.cpu.logical_cores, gpus = a.gpus.len(), "provider registered");
    }
    state.wake.notify_one();
    Ok(())
}
