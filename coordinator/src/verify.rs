//! Checking a provider's result before anything is recorded or paid.
//!
//! Pure: the caller supplies what it expects (the job, the offer, the
//! assigned provider) and the clock; this says yes, or exactly why not.

use kiln_protocol::{
    ContentId, JobId, JobResult, JobSpec, OfferId, Outcome, ProviderId, UnixMillis,
};

/// What the coordinator expects a result to be about.
#[derive(Clone, Debug)]
pub struct Expected {
    pub job: JobId,
    pub offer: OfferId,
    pub provider: ProviderId,
    /// The image the job named, as its digest (`sha256:…`: an image id or
    /// a repository digest), or `kiln:<cid>` ([`kiln_protocol::ImageRef::pinned`]).
    pub image: String,
    /// The job's input CIDs, in order.
    pub inputs: Vec<ContentId>,
}

impl Expected {
    /// What a result for member `offer` on `provider` of a job with `spec`
    /// must be about.
    pub fn of(job: JobId, offer: OfferId, provider: ProviderId, spec: &JobSpec) -> Self {
        Self {
            job,
            offer,
            provider,
            image: spec
                .image
                .pinned()
                .map_or_else(|| spec.image.0.clone(), str::to_string),
            inputs: spec.inputs.iter().map(|i| i.cid).collect(),
        }
    }
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
    #[error(
        "receipt says it ran image {got}, but job {job} names {want}; a result must be of the job's own image"
    )]
    WrongImage {
        job: JobId,
        got: String,
        want: String,
    },
    #[error(
        "receipt names inputs [{got}], but job {job} has [{want}]; a result must be of the job's own inputs"
    )]
    WrongInputs {
        job: JobId,
        got: String,
        want: String,
    },
    #[error("output manifest is invalid: {0}")]
    Manifest(String),
    #[error(
        "the result names {count} output files; a result may name at most {max} (write many small files as one archive)"
    )]
    TooManyOutputs { count: usize, max: usize },
    #[error(
        "the result carries blob {cid} inline, which is none of its outputs or logs; send only what the receipt names"
    )]
    UnreferencedBlob { cid: ContentId },
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
/// The most output files one result may name. Nodes stop a job's output
/// at `--max-output-files` (10,000 by default); the coordinator refuses a
/// larger manifest before it fetches, stores or grants anything, so a
/// provider cannot make it hold the write lock for a million grants.
pub const MAX_OUTPUT_FILES: usize = 10_000;

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
    // The receipt is a signed statement of what ran: the job's image and
    // inputs, or it is not a result of this job. (A run that failed before
    // its image was resolved names none.)
    let no_image = receipt.image_digest.is_empty() && receipt.outcome != Outcome::Succeeded;
    if !no_image && receipt.image_digest != expected.image {
        return Err(ReceiptError::WrongImage {
            job: expected.job,
            got: receipt.image_digest.clone(),
            want: expected.image.clone(),
        });
    }
    if receipt.input_cids != expected.inputs {
        let list = |c: &[ContentId]| {
            c.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(ReceiptError::WrongInputs {
            job: expected.job,
            got: list(&receipt.input_cids),
            want: list(&expected.inputs),
        });
    }
    if result.manifest.entries.len() > MAX_OUTPUT_FILES {
        return Err(ReceiptError::TooManyOutputs {
            count: result.manifest.entries.len(),
            max: MAX_OUTPUT_FILES,
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
    // Inline bytes are stored before anything is granted: only what the
    // receipt names may come, or a result would be a way to fill the disk.
    if let Some(b) = result
        .blobs
        .iter()
        .find(|b| b.cid != receipt.output_cid && !needed.iter().any(|n| n.cid == b.cid))
    {
        return Err(ReceiptError::UnreferencedBlob { cid: b.cid });
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kiln_protocol::{BuyerId, Keypair, Manifest, Nonce, ResourceUsage, ResultReceipt, Signed};

    const IMAGE: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn result(
        key: &Keypair,
        expected: &Expected,
        edit: impl FnOnce(&mut ResultReceipt),
    ) -> JobResult {
        let manifest = Manifest::default();
        let mut receipt = ResultReceipt {
            job_id: expected.job,
            offer_id: expected.offer,
            provider: ProviderId::from_public_key(&key.public()),
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            error: None,
            image_digest: expected.image.clone(),
            input_cids: expected.inputs.clone(),
            output_cid: manifest.cid(),
            stdout_cid: ContentId::of_bytes(b""),
            stderr_cid: ContentId::of_bytes(b""),
            started_at: UnixMillis(1),
            finished_at: UnixMillis(2),
            usage: ResourceUsage::default(),
        };
        edit(&mut receipt);
        JobResult {
            job_id: expected.job,
            receipt: Signed::sign(key, receipt, 600).unwrap(),
            manifest,
            blobs: vec![],
        }
    }

    #[test]
    fn a_receipt_must_name_the_jobs_image_and_inputs() {
        let key = Keypair::generate();
        let provider = ProviderId::from_public_key(&key.public());
        let buyer = BuyerId::new(Keypair::generate().public());
        let mut spec = kiln_protocol::JobSpec::new(IMAGE.to_string(), vec!["true".to_string()]);
        let input = ContentId::of_bytes(b"data");
        spec.inputs
            .push(kiln_protocol::spec::InputSpec::new(input, "/in/data"));
        let job = JobId::derive(&buyer, &Nonce::random());
        let expected = Expected::of(job, OfferId::random(), provider, &spec);
        let now = UnixMillis::now();
        let other = "sha256:".to_string() + &"ab".repeat(32);
        // (what the receipt says, accepted?)
        type Case<'a> = (&'a str, Box<dyn FnOnce(&mut ResultReceipt) + 'a>, bool);
        let cases: Vec<Case<'_>> = vec![
            ("honest", Box::new(|_| {}), true),
            (
                "another image",
                Box::new(|r| r.image_digest = other.clone()),
                false,
            ),
            (
                "no image but succeeded",
                Box::new(|r| r.image_digest.clear()),
                false,
            ),
            (
                "no image, failed before start",
                Box::new(|r| {
                    r.image_digest.clear();
                    r.outcome = Outcome::Failed;
                }),
                true,
            ),
            ("no inputs", Box::new(|r| r.input_cids.clear()), false),
            (
                "another input",
                Box::new(|r| r.input_cids = vec![ContentId::of_bytes(b"other")]),
                false,
            ),
        ];
        for (name, edit, ok) in cases {
            let got = check_result(&result(&key, &expected, edit), &expected, provider, now);
            assert_eq!(got.is_ok(), ok, "{name}: {got:?}");
            if let Err(e) = got {
                let text = e.to_string();
                assert!(
                    text.contains("image") || text.contains("inputs"),
                    "{name}: {text}"
                );
            }
        }
    }

    #[test]
    fn a_result_naming_too_many_files_is_refused_before_anything_is_fetched() {
        let key = Keypair::generate();
        let provider = ProviderId::from_public_key(&key.public());
        let buyer = BuyerId::new(Keypair::generate().public());
        let spec = kiln_protocol::JobSpec::new(IMAGE.to_string(), vec!["true".to_string()]);
        let job = JobId::derive(&buyer, &Nonce::random());
        let expected = Expected::of(job, OfferId::random(), provider, &spec);
        let entries = |n: usize| Manifest {
            entries: (0..n)
                .map(|i| kiln_protocol::ManifestEntry {
                    path: format!("f{i:06}"),
                    cid: ContentId::of_bytes(b""),
                    size: 0,
                    executable: false,
                })
                .collect(),
        };
        for (n, ok) in [(MAX_OUTPUT_FILES, true), (MAX_OUTPUT_FILES + 1, false)] {
            let manifest = entries(n);
            let cid = manifest.cid();
            let mut r = result(&key, &expected, |r| r.output_cid = cid);
            r.manifest = manifest;
            let got = check_result(&r, &expected, provider, UnixMillis::now());
            assert_eq!(got.is_ok(), ok, "{n} files: {got:?}");
            if let Err(e) = got {
                assert!(e.to_string().contains("at most 10000"), "{e}");
            }
        }
    }

    #[test]
    fn a_result_may_carry_inline_only_what_it_names() {
        let key = Keypair::generate();
        let provider = ProviderId::from_public_key(&key.public());
        let buyer = BuyerId::new(Keypair::generate().public());
        let spec = kiln_protocol::JobSpec::new(IMAGE.to_string(), vec!["true".to_string()]);
        let job = JobId::derive(&buyer, &Nonce::random());
        let expected = Expected::of(job, OfferId::random(), provider, &spec);
        let blob = |b: &[u8]| kiln_protocol::Blob {
            cid: ContentId::of_bytes(b),
            bytes: b.to_vec(),
        };
        let mut r = result(&key, &expected, |_| {});
        r.blobs = vec![blob(b"")]; // stdout and stderr are empty: named
        assert!(check_result(&r, &expected, provider, UnixMillis::now()).is_ok());
        r.blobs.push(blob(b"a gigabyte of nothing, in spirit"));
        let err = check_result(&r, &expected, provider, UnixMillis::now()).unwrap_err();
        assert!(
            matches!(err, ReceiptError::UnreferencedBlob { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("none of its outputs or logs"),
            "{err}"
        );
    }
}
