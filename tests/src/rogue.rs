//! What a provider acting in bad faith does about money: advertise a price,
//! keep heartbeating, and sign receipts and usage reports claiming any
//! wall time it likes (see `tests/it/billing.rs`).

use std::time::Duration;

use kiln_net::Addr;
use kiln_protocol::{
    CapabilityAdvert, Credits, JobOffer, JobResult, Keypair, NetRequest, NetResponse, ProviderId,
    Signed, UsageReport,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::RogueProvider;

/// A cloneable way to send requests as a rogue provider, from another task.
#[derive(Clone)]
pub struct RogueSender {
    net: kiln_net::Client,
    coordinator: kiln_net::Peer,
    addr: Addr,
}

impl RogueSender {
    pub async fn send(&self, req: NetRequest) -> anyhow::Result<NetResponse> {
        Ok(self
            .net
            .request(self.coordinator, vec![self.addr.clone()], req)
            .await?)
    }
}

impl RogueProvider {
    /// [`RogueProvider::join`], then re-registers advertising
    /// `price_per_cpu_hour` (and the same per GPU).
    pub async fn join_priced(
        addr: &Addr,
        cancel: &CancellationToken,
        price_per_cpu_hour: Credits,
    ) -> anyhow::Result<Self> {
        let me = Self::join(addr, cancel).await?;
        match me
            .send(NetRequest::Register(me.priced_advert(price_per_cpu_hour)?))
            .await?
        {
            NetResponse::Accepted => Ok(me),
            other => anyhow::bail!("registration refused: {other:?}"),
        }
    }

    /// A freshly signed advert at `price` per CPU (and GPU) hour.
    pub fn priced_advert(&self, price: Credits) -> anyhow::Result<Signed<CapabilityAdvert>> {
        let mut a = self.advert()?.payload;
        a.price_per_cpu_hour = price;
        a.price_per_gpu_hour = price;
        Ok(Signed::sign(&self.key, a, 3600)?)
    }

    /// A sender for requests from other tasks.
    pub fn sender(&self) -> RogueSender {
        RogueSender {
            net: self.net.clone(),
            coordinator: self.coordinator,
            addr: self.coordinator_addr.clone(),
        }
    }

    /// Re-registers every `every` until `cancel`, as a live node's
    /// heartbeat would: to the coordinator it is alive and well.
    pub fn keep_registered(
        &self,
        price: Credits,
        every: Duration,
        cancel: &CancellationToken,
    ) -> JoinHandle<()> {
        let sender = self.sender();
        let advert = self.priced_advert(price).map(|a| a.payload);
        let key = self.key.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let Ok(mut advert) = advert else { return };
            loop {
                advert.issued_at = kiln_protocol::UnixMillis::now();
                if let Ok(s) = Signed::sign(&key, advert.clone(), 3600) {
                    let _ = sender.send(NetRequest::Register(s)).await;
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        })
    }

    /// Sends a result the way a node does: again while the coordinator
    /// answers `Retry` (e.g. it has not yet recorded the start the offer's
    /// acceptance told it about), for up to 30 s. Returns the last answer.
    pub async fn deliver(&self, result: JobResult) -> anyhow::Result<NetResponse> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = self
                .send(NetRequest::Result(Box::new(result.clone())))
                .await?;
            if !matches!(r, NetResponse::Retry { .. }) || tokio::time::Instant::now() > deadline {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`RogueProvider::result_for`], its receipt claiming `wall_ms` of run time.
    pub fn result_claiming(
        offer: &JobOffer,
        signer: &Keypair,
        wall_ms: u64,
    ) -> anyhow::Result<JobResult> {
        let mut r = Self::result_for(offer, signer)?;
        let mut receipt = r.receipt.payload.clone();
        receipt.usage.wall_ms = wall_ms;
        r.receipt = Signed::sign(signer, receipt, 600)?;
        Ok(r)
    }

    /// A signed usage report for `offer` claiming `wall_ms` so far.
    pub fn usage_report(
        offer: &JobOffer,
        signer: &Keypair,
        provider: ProviderId,
        interval: u64,
        wall_ms: u64,
    ) -> anyhow::Result<Signed<UsageReport>> {
        Ok(Signed::sign(
            signer,
            UsageReport {
                job_id: offer.job_id,
                offer_id: offer.offer_id,
                provider,
                interval,
                wall_ms,
            },
            600,
        )?)
    }
}
