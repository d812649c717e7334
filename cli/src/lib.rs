//! # kiln-cli — the `kiln` command
//!
//! Buyers submit jobs, watch them, and fetch verified results; `kiln devnet`
//! runs a whole marketplace (a coordinator and N provider nodes) on loopback.
//! Everything here is a library so the integration tests drive exactly what
//! users run.

pub mod bench;
pub mod client;
pub mod data;
pub mod devnet;
pub mod ledger;
pub mod sim;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_protocol::keys::keyfile;
use kiln_protocol::views::{JobState, JobView, MemberView};
use kiln_protocol::{
    ContentId, JobId, JobSpec, Keypair, Manifest, OfferId, ProviderId, ResultReceipt, Signed,
    UnixMillis,
};

pub use client::{Account, Balances, Client, ClientError, Statement};

/// Default buyer key location: `$KILN_HOME/buyer.key`, else the user's config dir.
pub fn default_key_path() -> PathBuf {
    if let Some(home) = std::env::var_os("KILN_HOME") {
        return PathBuf::from(home).join("buyer.key");
    }
    dirs::config_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("kiln")
        .join("buyer.key")
}

/// Loads the buyer key, creating it (mode 0600) on first use.
pub fn buyer_key(path: &Path) -> anyhow::Result<Keypair> {
    keyfile::load_or_create(path)
        .with_context(|| format!("loading the buyer key at {}", path.display()))
}

/// Reads a TOML job spec; errors name the field.
pub fn read_spec(path: &Path) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading job spec {}", path.display()))?;
    let spec: JobSpec = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("invalid job spec {}: {e}", path.display()))?;
    spec.validate()
        .map_err(|e| anyhow::anyhow!("invalid job spec {}: {e}", path.display()))?;
    Ok(spec)
}

/// Polls a job until it ends or `timeout` passes; calls `on_change` on each new state or reason.
pub async fn wait_for(
    client: &Client,
    id: &JobId,
    timeout: Duration,
    mut on_change: impl FnMut(&JobView),
) -> anyhow::Result<JobView> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<(JobState, Option<String>)> = None;
    loop {
        let v = client.job(id).await?;
        let now = (v.state, v.reason.clone());
        if last.as_ref() != Some(&now) {
            on_change(&v);
            last = Some(now);
        }
        if v.state.is_terminal() {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("job {id} still {} after {}s", v.state, timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks a result receipt on the client side: its signature (as of when it
/// was made: it may be past its delivery expiry by now), that `provider`
/// signed it and is the one it names, that it is for job `id`, and, when
/// given, for `offer`.
pub fn check_receipt(
    receipt: Option<&Signed<ResultReceipt>>,
    id: &JobId,
    provider: &ProviderId,
    offer: Option<&OfferId>,
) -> anyhow::Result<Signed<ResultReceipt>> {
    let receipt = receipt.cloned().context("the job has no receipt")?;
    receipt
        .verify(UnixMillis(
            receipt.payload.finished_at.0.min(receipt.expires_at.0),
        ))
        .context("receipt signature")?;
    let signer = ProviderId::from_public_key(&receipt.signer);
    if signer != *provider || receipt.payload.provider != *provider {
        bail!("receipt signed by {signer}, but the job ran on {provider}");
    }
    if receipt.payload.job_id != *id {
        bail!("receipt is for job {}, not {id}", receipt.payload.job_id);
    }
    if let Some(offer) = offer
        && receipt.payload.offer_id != *offer
    {
        bail!(
            "receipt is for offer {}, not {offer}",
            receipt.payload.offer_id
        );
    }
    Ok(receipt)
}

/// Verifies a job's receipt on the client side: [`check_receipt`] against
/// the job's provider, and that its output CID matches `manifest` when given.
pub fn verify_receipt(
    job: &JobView,
    manifest: Option<&Manifest>,
) -> anyhow::Result<Signed<ResultReceipt>> {
    let provider = job.provider.context("job has no provider")?;
    let receipt = check_receipt(job.receipt.as_ref(), &job.job_id, &provider, None)?;
    if let Some(m) = manifest
        && m.cid() != receipt.payload.output_cid
    {
        bail!(
            "output manifest hashes to {}, receipt says {}",
            m.cid(),
            receipt.payload.output_cid
        );
    }
    Ok(receipt)
}

/// One node's outputs as [`fetch_outputs_verified`] wrote them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeOutputs {
    /// The gang rank; `None` for a single-node job.
    pub rank: Option<u32>,
    pub provider: ProviderId,
    /// The manifest CID its signed receipt names.
    pub output_cid: ContentId,
    pub dir: PathBuf,
    #[serde(flatten)]
    pub report: data::GetReport,
}

/// Fetches a job's outputs into `dir` by CID, trusting only signed
/// receipts: each receipt is checked ([`check_receipt`]), then the manifest
/// it names and every file in it are verified group by group as they
/// arrive (resumable through `cache`). A gang job's members each get
/// `dir/rank-<r>`; members of its last attempt without a receipt (stopped
/// before finishing) are skipped, and a job with no receipt at all is an error.
pub async fn fetch_outputs_verified(
    client: &Client,
    cache: &kiln_blobs::Store,
    id: &JobId,
    dir: &Path,
    show_progress: bool,
) -> anyhow::Result<Vec<NodeOutputs>> {
    let job = client.job(id).await?;
    let members = job.gang_members();
    let wanted: Vec<(Option<u32>, ProviderId, Signed<ResultReceipt>, PathBuf)> = if members
        .is_empty()
    {
        let receipt = verify_receipt(&job, None)?;
        vec![(None, receipt.payload.provider, receipt, dir.to_path_buf())]
    } else {
        let mut wanted = Vec::new();
        for m in members.iter().filter(|m| m.receipt.is_some()) {
            let (rank, provider) = (m.rank, m.provider);
            let receipt = check_receipt(m.receipt.as_ref(), id, &provider, Some(&m.offer_id))
                .with_context(|| format!("gang member rank {rank}"))?;
            wanted.push((
                Some(rank),
                provider,
                receipt,
                dir.join(format!("rank-{rank}")),
            ));
        }
        if wanted.is_empty() {
            bail!(
                "job {id} is {} and no gang member has delivered a receipt yet; nothing to fetch",
                job.state
            );
        }
        wanted
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut fetched = Vec::with_capacity(wanted.len());
    for (rank, provider, receipt, dir) in wanted {
        let output_cid = receipt.payload.output_cid;
        let report = data::get(client, cache, output_cid, &dir, show_progress, &cancel)
            .await
            .with_context(|| match rank {
                Some(r) => format!("fetching the outputs of gang rank {r}"),
                None => format!("fetching the outputs of job {id}"),
            })?;
        fetched.push(NodeOutputs {
            rank,
            provider,
            output_cid,
            dir,
            report,
        });
    }
    Ok(fetched)
}

/// What `kiln job status` says about a job's verification: where it
/// stands (`not sampled`, `verified by re-execution on …`, `disputed`,
/// `failed verification`), the audit probability, and whether the
/// coordinator's signature over the record holds.
pub fn verification_line(v: &kiln_protocol::VerificationView) -> String {
    let p = f64::from(v.p_ppm) / 10_000.0;
    let sealed = if record_signed(v) {
        "record signed by the coordinator"
    } else {
        "RECORD SIGNATURE DOES NOT VERIFY"
    };
    format!("{} [{}; audit p = {p:.4}%; {sealed}]", v.detail, v.status)
}

/// Whether `v.signature` is the coordinator's (`v.signer`) signature over
/// its record.
pub fn record_signed(v: &kiln_protocol::VerificationView) -> bool {
    let Ok(sig) = hex::decode(&v.signature) else {
        return false;
    };
    let Ok(sig) = <[u8; 64]>::try_from(sig.as_slice()) else {
        return false;
    };
    v.signer
        .public_key()
        .is_some_and(|k| k.verify_record("kiln/verification-record/v1", v.record.as_bytes(), &sig))
}

/// The members of a gang job's last attempt, by rank (empty for a
/// single-node job).
pub fn gang_members(job: &JobView) -> Vec<MemberView> {
    job.gang_members().into_iter().cloned().collect()
}

/// The content id of stdout/stderr bytes, for display.
pub fn cid_of(bytes: &[u8]) -> ContentId {
    ContentId::of_bytes(bytes)
}
