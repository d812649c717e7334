//! # kiln-cli — the `kiln` command
//!
//! Buyers submit jobs, watch them, and fetch verified results; `kiln devnet`
//! runs a whole marketplace (a coordinator and N provider nodes) on loopback.
//! Everything here is a library so the integration tests drive exactly what
//! users run.

pub mod bench;
pub mod client;
pub mod devnet;
pub mod ledger;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_protocol::content::check_relative_path;
use kiln_protocol::keys::keyfile;
use kiln_protocol::{
    ContentId, JobId, JobSpec, Keypair, Manifest, ManifestEntry, ProviderId, ResultReceipt, Signed,
    UnixMillis,
};
use serde_json::Value;

pub use client::{Client, ClientError};

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

pub fn job_id_of(v: &Value) -> anyhow::Result<JobId> {
    v["job_id"]
        .as_str()
        .context("response has no job_id")?
        .parse()
        .context("response has a malformed job_id")
}

pub fn is_terminal(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "timed_out" | "cancelled")
}

/// Polls a job until it ends or `timeout` passes; calls `on_change` on each new state or reason.
pub async fn wait_for(
    client: &Client,
    id: &JobId,
    timeout: Duration,
    mut on_change: impl FnMut(&Value),
) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = (String::new(), String::new());
    loop {
        let v = client.job(id).await?;
        let now = (
            v["state"].as_str().unwrap_or("").to_string(),
            v["reason"].as_str().unwrap_or("").to_string(),
        );
        if now != last {
            on_change(&v);
            last = now;
        }
        if is_terminal(&last.0) {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("job {id} still {} after {}s", last.0, timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Verifies a job's receipt on the client side: signature, expiry at
/// signing, that it names this job and the assigned provider, and that its
/// output CID matches the manifest the coordinator serves.
pub fn verify_receipt(
    job: &Value,
    manifest: Option<&Manifest>,
) -> anyhow::Result<Signed<ResultReceipt>> {
    let receipt: Signed<ResultReceipt> =
        serde_json::from_value(job["receipt"].clone()).context("the job has no receipt")?;
    // The receipt may be past its delivery expiry by now; check it as of when it was made.
    receipt
        .verify(UnixMillis(
            receipt.payload.finished_at.0.min(receipt.expires_at.0),
        ))
        .context("receipt signature")?;
    let signer = ProviderId::from_public_key(&receipt.signer);
    let provider: ProviderId = job["provider"]
        .as_str()
        .context("job has no provider")?
        .parse()?;
    if signer != provider || receipt.payload.provider != provider {
        bail!("receipt signed by {signer}, but the job ran on {provider}");
    }
    if receipt.payload.job_id != job_id_of(job)? {
        bail!(
            "receipt is for job {}, not this one",
            receipt.payload.job_id
        );
    }
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

/// Fetches a job's outputs into `dir`, verifying every file and the manifest.
pub async fn fetch_outputs(client: &Client, id: &JobId, dir: &Path) -> anyhow::Result<Manifest> {
    let job = client.job(id).await?;
    let outs = client.outputs(id).await?;
    let entries: Vec<ManifestEntry> =
        serde_json::from_value(outs["entries"].clone()).context("malformed manifest")?;
    let manifest = Manifest::new(entries).context("the output manifest is unsafe")?;
    verify_receipt(&job, Some(&manifest))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for e in &manifest.entries {
        check_relative_path(&e.path)?;
        let bytes = client.blob(id, &e.cid).await?;
        let dest = dir.join(&e.path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&dest, &bytes).with_context(|| format!("writing {}", dest.display()))?;
    }
    Ok(manifest)
}

/// The content id of stdout/stderr bytes, for display.
pub fn cid_of(bytes: &[u8]) -> ContentId {
    ContentId::of_bytes(bytes)
}
