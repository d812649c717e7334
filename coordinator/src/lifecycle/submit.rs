//! A buyer's signed submission: verified, validated, its inputs checked
//! (a job may name only data its owner may read), its maximum cost locked
//! in escrow, and the job stored `queued`, all in one transaction.
//!
//! Queue space is not free: a job must lock at least
//! `CoordinatorConfig::min_job_escrow` (a job asking for nothing per hour
//! would lock nothing), and one buyer may have at most
//! `CoordinatorConfig::max_queued_per_buyer` jobs waiting to be placed, so
//! a key cannot fill the queue, and many keys cost what they lock.

use kiln_contracts::{AccountId, ContractError, Op};
use kiln_protocol::{BuyerId, ContentId, Credits, JobId, JobSubmission, Signed, UnixMillis};

use crate::AppState;
use crate::bank::BankError;
use crate::db::{Db, DbError};
use crate::jobs::{JobRecord, JobState, keys};

/// Why a submission was refused (mapped to HTTP statuses by the API).
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Signature(String),
    #[error(transparent)]
    Spec(#[from] kiln_protocol::SpecError),
    #[error(
        "insufficient funds: the job may cost up to {needed}, the account holds {available}; deposit more or lower resources.max_price_per_hour or resources.timeout"
    )]
    Funds { needed: Credits, available: Credits },
    #[error(
        "you have {queued} jobs waiting to be placed, the most this coordinator queues for one buyer ({limit}); submit more once some are placed, or cancel some with `kiln job cancel <id>`"
    )]
    QueueFull { queued: u64, limit: u32 },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("settlement error: {0}")]
    Bank(String),
}

impl From<BankError> for SubmitError {
    fn from(e: BankError) -> Self {
        match e {
            BankError::Contract(ContractError::InsufficientFunds {
                needed, available, ..
            }) => Self::Funds { needed, available },
            BankError::Db(e) => Self::Db(e),
            other => Self::Bank(other.to_string()),
        }
    }
}

/// Accepts a signed submission. Idempotent: the same signed submission
/// returns the same job (`created == false` the second time).
pub async fn submit(
    state: &AppState,
    signed: Signed<JobSubmission>,
) -> Result<(JobRecord, bool), SubmitError> {
    let sub = signed
        .verify(UnixMillis::now())
        .map_err(|e| SubmitError::Signature(e.to_string()))?;
    sub.spec.validate()?;
    let owner = BuyerId::new(signed.signer);
    let id = JobId::derive(&owner, &signed.nonce);
    if let Some(existing) = state.db.job(&id).await? {
        return Ok((existing, false));
    }
    let max_cost = sub
        .spec
        .max_cost()
        .ok_or_else(|| kiln_protocol::SpecError {
            field: "resources.max_price_per_hour".into(),
            reason: "price × timeout overflows".into(),
        })?;
    check_escrow(max_cost, state.config.min_job_escrow)?;
    inputs_readable(state, &owner, &sub.spec).await?;
    image_readable(state, &owner, &sub.spec).await?;
    let now = UnixMillis::now();
    let job = JobRecord {
        id,
        owner,
        spec: sub.spec.clone(),
        label: sub.label.clone(),
        state: JobState::Queued,
        reason: Some("waiting for the scheduler".into()),
        provider: None,
        offer_id: None,
        attempts: 0,
        price_per_hour: None,
        max_cost,
        cost: None,
        exit_code: None,
        receipt: None,
        manifest: None,
        created_at: now,
        updated_at: now,
    };
    let bytes = signed
        .to_bytes()
        .map_err(|e| SubmitError::Bank(e.to_string()))?;
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    Db::claim_nonce(
        &mut tx,
        &owner.to_string(),
        &signed.nonce.to_string(),
        "job-submission",
        signed.expires_at,
    )
    .await?;
    check_queue(
        Db::queued_of(&mut tx, &owner).await?,
        state.config.max_queued_per_buyer,
    )?;
    if let Some(grant) = state.config.faucet {
        // Devnet: every new buyer starts funded, once.
        pending
            .apply(
                &mut tx,
                Op::Deposit {
                    key: keys::faucet(&AccountId::Buyer(owner)),
                    account: AccountId::Buyer(owner),
                    amount: grant,
                },
            )
            .await?;
    }
    if max_cost.0 > 0 {
        pending
            .apply(
                &mut tx,
                Op::Lock {
                    key: keys::lock(&id),
                    job: id,
                    buyer: owner,
                    amount: max_cost,
                },
            )
            .await?;
    }
    Db::insert_job(&mut tx, &job, &bytes).await?;
    tx.commit().await.map_err(DbError::from)?;
    pending.commit();
    tracing::info!(job = %id.short(), owner = %owner.short(), max_cost = %max_cost, "job submitted");
    state.wake.notify_one();
    Ok((job, true))
}

/// A job must lock at least `min` in escrow: what it may cost is what
/// holds its place in the queue (it is refunded but for what the job uses).
fn check_escrow(max_cost: Credits, min: Credits) -> Result<(), SubmitError> {
    if max_cost >= min {
        return Ok(());
    }
    Err(SubmitError::Spec(kiln_protocol::SpecError {
        field: "resources.max_price_per_hour".into(),
        reason: format!(
            "the job would lock {max_cost} in escrow (max_price_per_hour × gang × timeout), \
             less than the {min} this coordinator requires of every job to hold a place in the queue; \
             raise resources.max_price_per_hour or resources.timeout (you pay only for the time used, the rest is refunded)"
        ),
    }))
}

/// A buyer with `queued` jobs waiting may add one more if that stays
/// within `limit`.
fn check_queue(queued: u64, limit: u32) -> Result<(), SubmitError> {
    if queued < u64::from(limit) {
        Ok(())
    } else {
        Err(SubmitError::QueueFull { queued, limit })
    }
}

/// Blobs are not capabilities: a job may name an input by CID only if its
/// owner may read it (uploaded it, or it is an output of one of its jobs),
/// and for a directory, every file in it; otherwise knowing a CID would be
/// enough to have a provider fetch someone else's data and copy it out.
/// URL inputs are exempt: they are fetched from their URL and verified,
/// never served from the coordinator's or other providers' stores.
async fn inputs_readable(
    state: &AppState,
    owner: &BuyerId,
    spec: &kiln_protocol::JobSpec,
) -> Result<(), SubmitError> {
    let named: Vec<(usize, ContentId)> = spec
        .inputs
        .iter()
        .enumerate()
        .filter(|(_, i)| i.url.is_none())
        .map(|(n, i)| (n, i.cid))
        .collect();
    let cids: Vec<ContentId> = named.iter().map(|(_, c)| *c).collect();
    let readable = state.db.readable_of(owner, &cids).await?;
    let refuse = |n: usize, reason: String| {
        SubmitError::Spec(kiln_protocol::SpecError {
            field: format!("inputs[{n}].cid"),
            reason,
        })
    };
    for (n, cid) in named {
        if !readable.contains(&cid) {
            return Err(refuse(
                n,
                format!(
                    "{cid} is not among your data: upload it first with `kiln data add`, or give a url"
                ),
            ));
        }
        if cid.codec() != kiln_protocol::content::DAG_CBOR_CODEC {
            continue;
        }
        let manifest = state
            .blobs
            .get(&cid)
            .ok()
            .flatten()
            .and_then(|b| kiln_protocol::Manifest::from_dag_cbor(&b).ok())
            .ok_or_else(|| {
                refuse(
                    n,
                    format!("directory {cid} is not held here as a valid manifest: add it again with `kiln data add`"),
                )
            })?;
        let files: Vec<ContentId> = manifest.entries.iter().map(|e| e.cid).collect();
        let ok = state.db.readable_of(owner, &files).await?;
        if let Some(e) = manifest.entries.iter().find(|e| !ok.contains(&e.cid)) {
            return Err(refuse(
                n,
                format!(
                    "directory {cid} lists {} ({}), which is not among your data: add the directory with `kiln data add`",
                    e.path, e.cid
                ),
            ));
        }
    }
    Ok(())
}

/// A Kiln image is read like an input: its owner must be allowed to read
/// the manifest and every blob it names, and it must be an image.
async fn image_readable(
    state: &AppState,
    owner: &BuyerId,
    spec: &kiln_protocol::JobSpec,
) -> Result<(), SubmitError> {
    let Some(cid) = spec.image.kiln_image() else {
        return Ok(());
    };
    let refuse = |reason: String| {
        SubmitError::Spec(kiln_protocol::SpecError {
            field: "image".into(),
            reason,
        })
    };
    if !state.db.readable_of(owner, &[cid]).await?.contains(&cid) {
        return Err(refuse(format!(
            "image kiln:{cid} is not among your images: push it first with `kiln image push`"
        )));
    }
    let held = state.blobs.size(&cid);
    if held.is_some_and(|n| n > kiln_protocol::image::MAX_MANIFEST_BYTES) {
        return Err(refuse(format!(
            "kiln:{cid} is not an image manifest (it is larger than any image manifest); \
             `kiln image push <image>` prints an image's CID"
        )));
    }
    let store = state.blobs.clone();
    let bytes = tokio::task::spawn_blocking(move || store.get(&cid).ok().flatten())
        .await
        .ok()
        .flatten();
    let image = bytes
        .ok_or_else(|| refuse(format!("image kiln:{cid} is not held here: push it again with `kiln image push`")))
        .and_then(|b| {
            kiln_protocol::ImageManifest::from_dag_cbor(&b).map_err(|e| {
                refuse(format!(
                    "kiln:{cid} is not an image manifest ({e}); `kiln image push <image>` prints an image's CID"
                ))
            })
        })?;
    let blobs = image.blobs();
    let cids: Vec<ContentId> = blobs.iter().map(|b| b.cid).collect();
    let ok = state.db.readable_of(owner, &cids).await?;
    if let Some(b) = blobs.iter().find(|b| !ok.contains(&b.cid)) {
        return Err(refuse(format!(
            "image kiln:{cid} names blob {} ({}), which is not among your data: push the image with `kiln image push`",
            b.cid, b.digest
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_space_costs_escrow() {
        // (max cost, minimum, accepted)
        let cases = [
            (0, 0, true),
            (0, 1, false),
            (9_999, 10_000, false),
            (10_000, 10_000, true),
            (166_667, 10_000, true),
        ];
        for (cost, min, ok) in cases {
            let got = check_escrow(Credits(cost), Credits(min));
            assert_eq!(got.is_ok(), ok, "{cost} against {min}: {got:?}");
            if let Err(e) = got {
                let SubmitError::Spec(s) = &e else {
                    panic!("{e:?}")
                };
                assert_eq!(s.field, "resources.max_price_per_hour");
                // The message names what the job locks and the minimum.
                assert!(s.reason.contains(&Credits(min).to_string()), "{e}");
                assert!(s.reason.contains(&Credits(cost).to_string()), "{e}");
            }
        }
    }

    #[test]
    fn a_buyer_queues_at_most_the_limit() {
        // (already queued, limit, accepted)
        let cases = [
            (0, 1, true),
            (99, 100, true),
            (100, 100, false),
            (250, 100, false),
            (0, 0, false),
        ];
        for (queued, limit, ok) in cases {
            let got = check_queue(queued, limit);
            assert_eq!(got.is_ok(), ok, "{queued} of {limit}: {got:?}");
            if let Err(e) = got {
                let line = e.to_string();
                assert!(
                    line.contains(&format!("you have {queued} jobs waiting")),
                    "{line}"
                );
                assert!(line.contains(&format!("({limit})")), "{line}");
            }
        }
    }
}
