//! A buyer's signed submission: verified, validated, its inputs checked
//! (a job may name only data its owner may read), its maximum cost locked
//! in escrow, and the job stored `queued`, all in one transaction.

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
    inputs_readable(state, &owner, &sub.spec).await?;
    let max_cost = sub
        .spec
        .max_cost()
        .ok_or_else(|| kiln_protocol::SpecError {
            field: "resources.max_price_per_hour".into(),
            reason: "price × timeout overflows".into(),
        })?;
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
