//! A provider that never runs anything: it accepts every offer and signs a
//! result whose outputs it made up (see `tests/it/verification.rs`). Its
//! receipts are well formed and its bytes arrive intact, so only a
//! re-execution elsewhere can tell that the output is wrong.

use kiln_protocol::{
    Blob, ContentId, JobId, JobOffer, Manifest, ManifestEntry, NetRequest, NetResponse,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::RogueProvider;

/// What the cheater delivered for one offer, and what the coordinator said.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub job_id: JobId,
    pub offer: JobOffer,
    pub answer: NetResponse,
}

/// The files a cheater claims for an offer: `(path, bytes)`.
pub type Fabricate = Box<dyn Fn(&JobOffer) -> Vec<(String, Vec<u8>)> + Send>;

impl RogueProvider {
    /// Serves every offer (and every re-execution it is asked for), of a
    /// job of one or a rank of a gang (reserved, then started when told),
    /// with the files `fabricate` makes up, sent inline with a signed
    /// receipt, until `cancel`; returns what it delivered.
    pub fn cheat(
        mut self,
        fabricate: Fabricate,
        cancel: &CancellationToken,
    ) -> JoinHandle<Vec<Delivered>> {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut delivered = Vec::new();
            loop {
                let offer = tokio::select! {
                    () = cancel.cancelled() => return delivered,
                    o = self.next_job() => o,
                };
                // No offer (or no start of a reserved rank) within the
                // wait: keep waiting.
                let Ok(offer) = offer else { continue };
                let Ok(result) = made_up(&offer, &self, &fabricate(&offer)) else {
                    continue;
                };
                let answer = match self.deliver(result).await {
                    Ok(a) => a,
                    Err(e) => NetResponse::Rejected {
                        reason: format!("not delivered: {e}"),
                    },
                };
                delivered.push(Delivered {
                    job_id: offer.job_id,
                    offer,
                    answer,
                });
            }
        })
    }
}

impl RogueProvider {
    /// Waits for the next offer of a job of one or of a gang's rank and
    /// accepts it; a gang rank is then held until its start arrives (and
    /// accepted). Returns the job offer to deliver for.
    async fn next_job(&mut self) -> anyhow::Result<JobOffer> {
        enum Got {
            One(JobOffer),
            Gang(JobOffer),
        }
        let (got, reply) = self
            .next_request("offer", |req| match req {
                NetRequest::Offer(o) => Ok(Got::One(o.payload)),
                NetRequest::GangOffer(g) => Ok(Got::Gang(g.payload.offer)),
                other => Err(other),
            })
            .await?;
        let _ = reply.send(NetResponse::Accepted);
        match got {
            Got::One(o) => Ok(o),
            Got::Gang(o) => {
                let want = o.offer_id;
                let (_, reply) = self
                    .next_request("gang start", |req| match req {
                        NetRequest::GangStart(s) if s.payload.offer_id == want => Ok(()),
                        other => Err(other),
                    })
                    .await?;
                let _ = reply.send(NetResponse::Accepted);
                Ok(o)
            }
        }
    }
}

/// A signed result claiming `files` as the job's outputs, their bytes inline.
pub fn made_up(
    offer: &JobOffer,
    rogue: &RogueProvider,
    files: &[(String, Vec<u8>)],
) -> anyhow::Result<kiln_protocol::JobResult> {
    let mut entries: Vec<ManifestEntry> = files
        .iter()
        .map(|(path, bytes)| ManifestEntry {
            path: path.clone(),
            cid: ContentId::of_bytes(bytes),
            size: bytes.len() as u64,
            executable: false,
        })
        .collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let mut result = RogueProvider::result_with(offer, &rogue.key, Manifest { entries })?;
    result.blobs.extend(files.iter().map(|(_, bytes)| Blob {
        cid: ContentId::of_bytes(bytes),
        bytes: bytes.clone(),
    }));
    Ok(result)
}

/// A NumPy v1.0 `.npy` file of little-endian float64 values (what the
/// workload's `noisy` writes), for a cheater's made-up numbers.
pub fn npy_f64(values: &[f64]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '<f8', 'fortran_order': False, 'shape': ({},), }}",
        values.len()
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + values.len() * 8);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}
