//! Checking a provider's result before anything is recorded or paid.
//!
//! Pure: the caller supplies what it expects (the job, the offer, the
//! assigned provider) and the clock; this says yes, or exactly why not.

use kiln_protocol::{ContentId, JobId, JobResult, OfferId, ProviderId, UnixMillis};

/// What the coordinator expects a result to be about.
#[derive(Clone, Debug)]
pub struct Expected {
    pub job: JobId,
    pub offer: OfferId,
    pub provider: ProviderId,
}

/// Why a result was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("receipt signature invalid: {0}")]
    Signature(String),
    #[error("receipt for job {job} signed by {signer}, but the job is assigned to {assigned}")]
    WrongSigner {
        job: JobId,
        signer: ProviderId,
        assigned: ProviderId,
    },
    #[error("receipt was delivered by peer {peer}, not by its signer {signer}")]
    WrongSender {
        peer: ProviderId,
        signer: ProviderId,
    },
    #[error("receipt names provider {named} but is signed by {signer}")]
    ProviderMismatch {
        named: ProviderId,
        signer: ProviderId,
    },
    #[error("receipt is for job {got}, expected job {want} (a replayed receipt?)")]
    WrongJob { got: JobId, want: JobId },
    #[error(
        "receipt is for offer {got}, but job {job} is on offer {want} (a stale or replayed receipt?)"
    )]
    WrongOffer {
        job: JobId,
        got: OfferId,
        want: OfferId,
    },
    #[error("output manifest is invalid: {0}")]
    Manifest(String),
    #[error("output manifest hashes to {got}, but the receipt names {want}")]
    ManifestCid { got: ContentId, want: ContentId },
    #[error("{what} {cid} could not be received from the provider: {reason}")]
    MissingBlob {
        what: String,
        cid: ContentId,
        reason: String,
    },
    /// The result names a blob stored here for someone else and the
    /// provider could not prove it holds the bytes: it knows only the CID.
    #[error(
        "{what} {cid} is not held by the provider ({reason}); a result may not claim data it does not have"
    )]
    NotHeld {
        what: String,
        cid: ContentId,
        reason: String,
    },
    #[error("blob sent as {cid} hashes to {got}")]
    BlobMismatch { cid: ContentId, got: ContentId },
}

/// Checks signature, expiry, signer, sender, job/offer binding, manifest and
/// the inline blobs; returns every blob the result names (the caller makes
/// sure it holds each before accepting). `peer` is the transport-authenticated
/// sender.
pub fn check_result(
    result: &JobResult,
    expected: &Expected,
    peer: ProviderId,
    now: UnixMillis,
) -> Result<Vec<Needed>, ReceiptError> {
    let receipt = result
        .receipt
        .verify(now)
        .map_err(|e| ReceiptError::Signature(e.to_string()))?;
    let signer = ProviderId::from_public_key(&result.receipt.signer);
    if signer != peer {
        return Err(ReceiptError::WrongSender { peer, signer });
    }
    if receipt.provider != signer {
        return Err(ReceiptError::ProviderMismatch {
            named: receipt.provider,
            signer,
        });
    }
    if receipt.job_id != expected.job {
        return Err(ReceiptError::WrongJob {
            got: receipt.job_id,
            want: expected.job,
        });
    }
    if signer != expected.provider {
        return Err(ReceiptError::WrongSigner {
            job: expected.job,
            signer,
            assigned: expected.provider,
        });
    }
    if receipt.offer_id != expected.offer {
        return Err(ReceiptError::WrongOffer {
            job: expected.job,
            got: receipt.offer_id,
            want: expected.offer,
        });
    }
    result
        .manifest
        .validate()
        .map_err(|e| ReceiptError::Manifest(e.to_string()))?;
    let got = result.manifest.cid();
    if got != receipt.output_cid {
        return Err(ReceiptError::ManifestCid {
            got,
            want: receipt.output_cid,
        });
    }
    // Inline blobs must be what they claim; the rest are fetched by CID
    // and verified as they arrive.
    for b in &result.blobs {
        let actual = ContentId::of_bytes(&b.bytes);
        if actual != b.cid {
            return Err(ReceiptError::BlobMismatch {
                cid: b.cid,
                got: actual,
            });
        }
    }
    let mut needed = vec![
        Needed {
            what: "stdout".into(),
            cid: receipt.stdout_cid,
            size: None,
        },
        Needed {
            what: "stderr".into(),
            cid: receipt.stderr_cid,
            size: None,
        },
    ];
    needed.extend(result.manifest.entries.iter().map(|e| Needed {
        what: format!("output `{}`", e.path),
        cid: e.cid,
        size: Some(e.size),
    }));
    Ok(needed)
}

/// A blob a result names, which the coordinator must hold before the result
/// is accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needed {
    pub what: String,
    pub cid: ContentId,
    /// Declared size (outputs), a hint only: sizes are proven on fetch.
    pub size: Option<u64>,
}
