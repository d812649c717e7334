//! The coordinator's moving parts: answering peers, placing jobs,
//! dispatching offers, and accepting results.

use std::time::Duration;

use kiln_contracts::{AccountId, ContractError, Op, OpKey};
use kiln_net::{NetEvent, Peer};
use kiln_protocol::spec::cost_for;
use kiln_protocol::{
    BuyerId, ContentId, Credits, JobId, JobOffer, JobResult, JobSubmission, NetRequest,
    NetResponse, OfferId, Outcome, ProviderId, Signed, UnixMillis,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::bank::BankError;
use crate::db::{Change, Db, DbError, JobRecord, JobState, ResultColumns};
use crate::sched::{self, Fleet};
use crate::verify::{self, Expected};

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
                    key: OpKey::new(format!("faucet:{owner}")),
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
                    key: OpKey::new(format!("lock:{id}")),
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

/// Receives network events until cancelled.
pub async fn handle_network(
    state: AppState,
    mut events: mpsc::Receiver<NetEvent>,
    cancel: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            () = cancel.cancelled() => break,
            ev = events.recv() => match ev { Some(ev) => ev, None => break },
        };
        match ev {
            NetEvent::Request {
                peer,
                request,
                reply,
            } => {
                // Each request gets its own task: a large result must not
                // hold up registrations behind it.
                let s = state.clone();
                tokio::spawn(async move {
                    let response = answer(&s, peer, request).await;
                    if let NetResponse::Rejected { reason } = &response {
                        tracing::warn!(%peer, "rejected: {reason}");
                    }
                    let _ = reply.send(response);
                });
            }
            NetEvent::Advert { from, advert } => {
                if let Err(e) = advert.verify(UnixMillis::now()) {
                    tracing::debug!(%from, "ignoring gossiped advert: {e}");
                }
            }
            NetEvent::Connected(_) | NetEvent::Disconnected(_) => {}
        }
    }
}

pub(crate) fn rejected(reason: impl Into<String>) -> NetResponse {
    NetResponse::Rejected {
        reason: reason.into(),
    }
}

/// A provider asks whether `asker` may have `cid` from its cache. Answered
/// only to registered providers (what a provider may fetch is nobody
/// else's business).
async fn may_fetch_answer(
    state: &AppState,
    from: ProviderId,
    asker: ProviderId,
    cid: ContentId,
) -> Result<NetResponse, DbError> {
    if !state.db.provider_known(&from).await? {
        return Ok(rejected("only registered providers may ask who may fetch"));
    }
    Ok(
        if crate::blobs::provider_may_fetch(state, asker.peer_id(), cid).await {
            NetResponse::Accepted
        } else {
            rejected(format!("{} may not fetch {cid}", asker.short()))
        },
    )
}

async fn answer(state: &AppState, peer: Peer, request: NetRequest) -> NetResponse {
    let peer = ProviderId::from_peer_id(peer);
    let result = match request {
        NetRequest::Register(advert) => register(state, peer, &advert).await,
        NetRequest::Result(result) => accept_result(state, peer, *result).await,
        NetRequest::Lost(lost) => job_lost(state, peer, &lost).await,
        NetRequest::Usage(report) => settle_usage(state, peer, &report).await,
        NetRequest::Stake(req) => crate::stake::set_stake(state, peer, &req).await,
        NetRequest::MayFetch { peer: asker, cid } => {
            may_fetch_answer(state, peer, asker, cid).await
        }
        NetRequest::Offer(_)
        | NetRequest::Cancel(_)
        | NetRequest::Challenge(_)
        | NetRequest::GangOffer(_)
        | NetRequest::GangStart(_)
        | NetRequest::GangRelease(_) => Ok(rejected(
            "a coordinator does not take offers or cancellations",
        )),
    };
    result.unwrap_or_else(|e| rejected(format!("internal error: {e}")))
}

async fn register(
    state: &AppState,
    peer: ProviderId,
    advert: &Signed<kiln_protocol::CapabilityAdvert>,
) -> Result<NetResponse, DbError> {
    let a = match advert.verify(UnixMillis::now()) {
        Ok(a) => a,
        Err(e) => return Ok(rejected(format!("advert refused: {e}"))),
    };
    let signer = ProviderId::from_public_key(&advert.signer);
    if signer != peer || a.provider != peer {
        return Ok(rejected(format!(
            "advert refused: signed by {signer} for {}, but sent by {peer}",
            a.provider
        )));
    }
    if a.protocol_version != kiln_protocol::PROTOCOL_VERSION {
        return Ok(rejected(format!(
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
        let mut tx = state.db.begin().await?;
        let mut pending = state.bank.begin().await;
        let op = Op::Deposit {
            key: OpKey::new(format!("faucet:{}", AccountId::Provider(peer))),
            account: AccountId::Provider(peer),
            amount: grant,
        };
        if pending.apply(&mut tx, op).await.is_ok() {
            tx.commit().await?;
            pending.commit();
        }
    }
    if !known {
        tracing::info!(provider = %peer, cpus = a.cpu.logical_cores, gpus = a.gpus.len(), "provider registered");
    }
    state.wake.notify_one();
    Ok(NetResponse::Accepted)
}

/// Verifies, stores and settles a finished job.
async fn accept_result(
    state: &AppState,
    peer: ProviderId,
    result: JobResult,
) -> Result<NetResponse, DbError> {
    let claimed = result.job_id;
    let Some(job) = state.db.job(&claimed).await? else {
        return Ok(rejected(format!("result for unknown job {claimed}")));
    };
    if job.spec.resources.gang > 1 {
        return crate::gang::accept_result(state, peer, job, result).await;
    }
    if job.state.is_terminal() {
        if job.receipt.as_ref() == Some(&result.receipt) && result.receipt.payload.job_id == job.id
        {
            return Ok(NetResponse::Accepted); // a retried delivery of what we already hold
        }
        return Ok(rejected(format!(
            "job {} already has a result; replayed receipt refused",
            job.id
        )));
    }
    let (Some(provider), Some(offer)) = (job.provider, job.offer_id) else {
        return Ok(rejected(format!(
            "job {} was never dispatched; receipt refused",
            job.id
        )));
    };
    if !matches!(job.state, JobState::Dispatched | JobState::Running) {
        return Ok(rejected(format!(
            "job {} is {:?}, not running; receipt refused",
            job.id, job.state
        )));
    }
    let expected = Expected {
        job: job.id,
        offer,
        provider,
    };
    let needed = match verify::check_result(&result, &expected, peer, UnixMillis::now()) {
        Ok(n) => n,
        Err(e) => return Ok(rejected(format!("result for job {} refused: {e}", job.id))),
    };
    // Every blob the result names must be here, verified, before anything
    // is recorded or paid: inline ones are imported (already checked against
    // their CIDs), the rest fetched from the provider group by group.
    if let Err(e) = store_result_blobs(state, &job.owner, &provider, &result, &needed).await {
        if matches!(e, verify::ReceiptError::NotHeld { .. }) {
            return Ok(rejected(format!("result for job {} refused: {e}", job.id)));
        }
        // Sound so far, but the bytes did not all arrive: the provider
        // keeps its outputs pinned and sends the result again.
        return Ok(NetResponse::Retry {
            reason: format!("result for job {} not accepted yet: {e}", job.id),
        });
    }
    let receipt = &result.receipt.payload;
    let price = job.price_per_hour.unwrap_or_default();
    let cost = cost_for(price, receipt.usage.wall_ms)
        .unwrap_or(job.max_cost)
        .min(job.max_cost);
    let (to, reason) = match receipt.outcome {
        Outcome::Succeeded => (JobState::Completed, None),
        Outcome::Failed => (
            JobState::Failed,
            Some(match (&receipt.error, receipt.exit_code) {
                (Some(e), _) => e.clone(),
                (None, Some(c)) => format!("exited with code {c}"),
                (None, None) => "failed".into(),
            }),
        ),
        Outcome::TimedOut => (JobState::TimedOut, receipt.error.clone()),
        Outcome::Cancelled => (JobState::Cancelled, receipt.error.clone()),
    };

    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    let signer = result.receipt.signer.to_string();
    if !Db::claim_nonce(
        &mut tx,
        &signer,
        &result.receipt.nonce.to_string(),
        "result-receipt",
        result.receipt.expires_at,
    )
    .await?
    {
        return Ok(rejected(format!(
            "receipt for job {} was already used; replay refused",
            job.id
        )));
    }
    let change = Change {
        reason: reason.as_deref(),
        result: Some(ResultColumns {
            receipt: &result.receipt,
            manifest: &result.manifest,
            cost,
        }),
        ..Default::default()
    };
    if !Db::transition(
        &mut tx,
        &job.id,
        &[JobState::Dispatched, JobState::Running],
        to,
        change,
    )
    .await?
    {
        return Ok(NetResponse::Retry {
            reason: format!(
                "job {} changed state while its result was checked; resend",
                job.id
            ),
        });
    }
    grant_result_blobs(state, &mut tx, &job.owner, &job.id, &result).await?;
    if job.max_cost.0 > 0 {
        let op = if cost.0 > 0 {
            Op::Release {
                key: settle_key(&job.id),
                job: job.id,
                provider,
                cost,
                fee_bps: state.bank.fee_bps,
            }
        } else {
            Op::Refund {
                key: settle_key(&job.id),
                job: job.id,
            }
        };
        if let Err(e) = pending.apply(&mut tx, op).await {
            return Ok(rejected(format!(
                "settlement of job {} failed: {e}",
                job.id
            )));
        }
    }
    tx.commit().await?;
    pending.commit();
    release_booking(state, &job.id);
    tracing::info!(job = %job.id.short(), state = to.as_str(), provider = %provider.short(), cost = %cost, "result accepted");
    state.wake.notify_one();
    Ok(NetResponse::Accepted)
}

/// Lets the job's owner read its outputs, logs and manifest (in the
/// transaction that records the result).
pub(crate) async fn grant_result_blobs(
    state: &AppState,
    tx: &mut crate::db::Tx<'_>,
    owner: &BuyerId,
    job: &JobId,
    result: &JobResult,
) -> Result<(), DbError> {
    let receipt = &result.receipt.payload;
    let manifest_len = result.manifest.to_dag_cbor().len() as u64;
    let size = |c: &ContentId| state.blobs.size(c).unwrap_or(0);
    let mut grants = vec![
        (receipt.output_cid, manifest_len, "manifest".to_string()),
        (
            receipt.stdout_cid,
            size(&receipt.stdout_cid),
            "stdout".into(),
        ),
        (
            receipt.stderr_cid,
            size(&receipt.stderr_cid),
            "stderr".into(),
        ),
    ];
    grants.extend(
        result
            .manifest
            .entries
            .iter()
            .map(|e| (e.cid, e.size, e.path.clone())),
    );
    for (cid, size, what) in grants {
        let name = format!("job {}: {what}", job.short());
        Db::grant_blob(tx, owner, &cid, size, &name).await?;
    }
    Ok(())
}

/// Makes sure the store holds every blob a result names and the manifest.
pub(crate) async fn store_result_blobs(
    state: &AppState,
    owner: &BuyerId,
    provider: &ProviderId,
    result: &JobResult,
    needed: &[verify::Needed],
) -> Result<(), verify::ReceiptError> {
    let import = |cid: ContentId, bytes: Vec<u8>, what: String| {
        let store = state.blobs.clone();
        async move {
            let len = bytes.len() as u64;
            tokio::task::spawn_blocking(move || {
                store.import_reader(&bytes[..], Some(len), Some(cid))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()))
            .map_err(|reason| verify::ReceiptError::MissingBlob { what, cid, reason })
        }
    };
    for b in &result.blobs {
        if !state.blobs.has(&b.cid) {
            import(b.cid, b.bytes.clone(), "inline blob".into()).await?;
        }
    }
    let manifest_cid = result.receipt.payload.output_cid;
    if !state.blobs.has(&manifest_cid) {
        import(
            manifest_cid,
            result.manifest.to_dag_cbor(),
            "output manifest".into(),
        )
        .await?;
    }
    // A named blob already stored here is granted to the owner only if its
    // bytes came with the result (inline), it is the owner's already, or
    // the provider proves it holds them: otherwise naming a CID in a
    // result would be a way to read it.
    let sent: std::collections::HashSet<ContentId> = result
        .blobs
        .iter()
        .map(|b| b.cid)
        .chain([manifest_cid])
        .collect();
    let held: Vec<ContentId> = needed
        .iter()
        .map(|n| n.cid)
        .filter(|c| !sent.contains(c) && state.blobs.has(c))
        .collect();
    let owned =
        if held.is_empty() {
            std::collections::HashSet::new()
        } else {
            state.db.readable_of(owner, &held).await.map_err(|e| {
                verify::ReceiptError::MissingBlob {
                    what: "output".into(),
                    cid: held[0],
                    reason: e.to_string(),
                }
            })?
        };
    let mut source = None;
    for n in needed {
        let held_size = state.blobs.size(&n.cid);
        if held_size.is_some() && (sent.contains(&n.cid) || owned.contains(&n.cid)) {
            continue;
        }
        if source.is_none() {
            // Looked up once per result, and only when something is missing.
            source = Some(
                crate::blobs::provider_source(state, provider)
                    .await
                    .map_err(|reason| verify::ReceiptError::MissingBlob {
                        what: n.what.clone(),
                        cid: n.cid,
                        reason,
                    })?,
            );
        }
        let Some(source) = &source else { continue };
        if let Some(size) = held_size {
            kiln_blobs::wire::prove_possession(&state.net, source, n.cid, size)
                .await
                .map_err(|e| match e {
                    kiln_blobs::wire::ProbeError::Bad(reason) => verify::ReceiptError::NotHeld {
                        what: n.what.clone(),
                        cid: n.cid,
                        reason,
                    },
                    kiln_blobs::wire::ProbeError::Wire(e) => verify::ReceiptError::MissingBlob {
                        what: n.what.clone(),
                        cid: n.cid,
                        reason: e.to_string(),
                    },
                })?;
            continue;
        }
        crate::blobs::fetch_from_provider(state, source, n.cid, n.size)
            .await
            .map_err(|reason| verify::ReceiptError::MissingBlob {
                what: n.what.clone(),
                cid: n.cid,
                reason,
            })?;
    }
    Ok(())
}

/// A provider's signed statement about a job, checked for its signature and
/// expiry: the job and offer it names, and its signer. The refusal names
/// `what` otherwise.
pub(crate) fn statement_ids<T: kiln_protocol::SignedMessage>(
    signed: &Signed<T>,
    what: &str,
    ids: impl Fn(&T) -> (JobId, OfferId),
) -> Result<(JobId, OfferId, ProviderId), NetResponse> {
    let payload = signed
        .verify(UnixMillis::now())
        .map_err(|e| rejected(format!("{what} refused: {e}")))?;
    let (job, offer) = ids(payload);
    Ok((job, offer, ProviderId::from_public_key(&signed.signer)))
}

/// Checks a provider's signed statement about a job: the signature, that the
/// sender is the signer, and that the job is assigned to it under the offer
/// the statement names. Returns the job and the provider, or the refusal.
async fn assigned_job<T: kiln_protocol::SignedMessage>(
    state: &AppState,
    peer: ProviderId,
    signed: &Signed<T>,
    what: &str,
    ids: impl Fn(&T) -> (JobId, OfferId),
) -> Result<Result<(JobRecord, ProviderId), NetResponse>, DbError> {
    let (job_id, offer_id, signer) = match statement_ids(signed, what, ids) {
        Ok(x) => x,
        Err(r) => return Ok(Err(r)),
    };
    let Some(job) = state.db.job(&job_id).await? else {
        return Ok(Err(rejected(format!("{what} for unknown job {job_id}"))));
    };
    if signer != peer || job.provider != Some(signer) || job.offer_id != Some(offer_id) {
        return Ok(Err(rejected(format!(
            "{what} for {} refused: not from the provider holding its current offer",
            job.id
        ))));
    }
    Ok(Ok((job, signer)))
}

/// Pays one interval of a running job from its escrow. The reported wall
/// time is trusted only up to what the coordinator itself has seen: the time
/// since the job started running here, plus a small allowance.
async fn settle_usage(
    state: &AppState,
    peer: ProviderId,
    signed: &Signed<kiln_protocol::UsageReport>,
) -> Result<NetResponse, DbError> {
    if is_gang(state, &signed.payload.job_id).await? {
        return crate::gang::settle_usage(state, peer, signed).await;
    }
    let (job, signer) = match assigned_job(state, peer, signed, "usage report", |r| {
        (r.job_id, r.offer_id)
    })
    .await?
    {
        Ok(x) => x,
        Err(refusal) => return Ok(refusal),
    };
    let report = &signed.payload;
    if job.state != JobState::Running {
        return Ok(rejected(format!(
            "usage report for job {} refused: it is {}, not running",
            job.id,
            job.state.as_str()
        )));
    }
    let seen_ms = UnixMillis::now().0.saturating_sub(job.updated_at.0) + 2_000;
    let wall_ms = report.wall_ms.min(seen_ms);
    let total = cost_for(job.price_per_hour.unwrap_or_default(), wall_ms)
        .unwrap_or(job.max_cost)
        .min(job.max_cost);
    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    let paid = pending
        .ledger()
        .escrow(&job.id)
        .map(|e| e.interval_paid)
        .unwrap_or_default();
    let due = Credits(total.0.saturating_sub(paid.0));
    if due.0 == 0 || job.max_cost.0 == 0 {
        return Ok(NetResponse::Accepted);
    }
    let op = Op::SettleInterval {
        key: OpKey::new(format!("interval:{}:{}", job.id, report.interval)),
        job: job.id,
        provider: signer,
        cost: due,
        fee_bps: state.bank.fee_bps,
    };
    match pending.apply(&mut tx, op).await {
        Ok(_) => {
            tx.commit().await?;
            pending.commit();
            Ok(NetResponse::Accepted)
        }
        Err(crate::bank::BankError::Contract(ContractError::EscrowExhausted {
            needed,
            remaining,
            ..
        })) => {
            drop(tx);
            drop(pending);
            let why = format!(
                "escrow exhausted: interval {} needs {needed}, {remaining} remains",
                report.interval
            );
            tracing::warn!(job = %job.id.short(), "{why}; stopping the job");
            if let Err(e) = cancel(state, &job).await {
                tracing::error!(job = %job.id.short(), "could not stop a job whose escrow ran dry: {e}");
            }
            Ok(rejected(why))
        }
        Err(e) => Ok(rejected(format!(
            "interval settlement for job {} failed: {e}",
            job.id
        ))),
    }
}

/// A provider reports a job it accepted as lost (e.g. its daemon was killed
/// and the container reaped): requeue it, or fail it after `max_attempts`.
async fn job_lost(
    state: &AppState,
    peer: ProviderId,
    signed: &Signed<kiln_protocol::JobLost>,
) -> Result<NetResponse, DbError> {
    if is_gang(state, &signed.payload.job_id).await? {
        return crate::gang::job_lost(state, peer, signed).await;
    }
    let (job, signer) = match assigned_job(state, peer, signed, "lost-job report", |l| {
        (l.job_id, l.offer_id)
    })
    .await?
    {
        Ok(x) => x,
        Err(refusal) => return Ok(refusal),
    };
    let lost = &signed.payload;
    let reason = format!("lost on provider {}: {}", signer.short(), lost.reason);
    requeue_or_fail(state, &job, &reason).await?;
    Ok(NetResponse::Accepted)
}

/// Puts a job that was dispatched or running back in the queue, or fails it
/// (refunding its escrow) once it has used all its attempts.
pub async fn requeue_or_fail(
    state: &AppState,
    job: &JobRecord,
    reason: &str,
) -> Result<(), DbError> {
    let active = [JobState::Dispatched, JobState::Running];
    let mut tx = state.db.begin().await?;
    if job.attempts >= state.config.max_attempts {
        let reason = format!("failed after {} attempts; last: {reason}", job.attempts);
        let mut pending = state.bank.begin().await;
        if Db::transition(
            &mut tx,
            &job.id,
            &active,
            JobState::Failed,
            Change {
                reason: Some(&reason),
                ..Default::default()
            },
        )
        .await?
        {
            refund(&mut pending, &mut tx, &job.id).await;
        }
        tx.commit().await?;
        pending.commit();
    } else {
        let reason = format!("requeued: {reason}");
        Db::transition(
            &mut tx,
            &job.id,
            &active,
            JobState::Queued,
            Change {
                reason: Some(&reason),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
    }
    release_booking(state, &job.id);
    tracing::warn!(job = %job.id.short(), "{reason}");
    state.wake.notify_one();
    Ok(())
}

/// Whether `job` is a multi-node gang job (its members are in `gang_members`).
async fn is_gang(state: &AppState, job: &JobId) -> Result<bool, DbError> {
    Ok(state
        .db
        .job(job)
        .await?
        .is_some_and(|j| j.spec.resources.gang > 1))
}

/// Gives back the scheduler's reservations for a job that stopped running
/// (or will not run).
pub fn release_booking(state: &AppState, job: &JobId) {
    crate::live::lock(state).release_job(job);
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

/// Where to dial a provider: the listen addresses of its last advert (none
/// if it never registered; the swarm may still know a route).
pub(crate) async fn provider_addrs(
    state: &AppState,
    provider: &ProviderId,
) -> Result<Vec<kiln_net::Addr>, DbError> {
    Ok(state
        .db
        .provider(provider)
        .await?
        .map(|p| {
            p.advert
                .payload
                .listen_addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect()
        })
        .unwrap_or_default())
}

/// The idempotency key of a job's final settlement: one per job, so a
/// settlement retried or raced by a cancellation applies once.
pub(crate) fn settle_key(job: &JobId) -> OpKey {
    OpKey::new(format!("settle:{job}"))
}

/// Refunds what is left of a job's escrow, if it is still open.
pub(crate) async fn try_refund(
    pending: &mut crate::bank::Pending<'_>,
    tx: &mut crate::db::Tx<'_>,
    job: &JobId,
) -> Result<(), crate::bank::BankError> {
    if pending.ledger().escrow(job).is_some_and(|e| e.is_open()) {
        let op = Op::Refund {
            key: settle_key(job),
            job: *job,
        };
        pending.apply(tx, op).await?;
    }
    Ok(())
}

/// [`try_refund`], logging a failure (the job's state change goes ahead;
/// the ledger's audit shows the escrow still open).
pub(crate) async fn refund(
    pending: &mut crate::bank::Pending<'_>,
    tx: &mut crate::db::Tx<'_>,
    job: &JobId,
) {
    if let Err(e) = try_refund(pending, tx, job).await {
        tracing::error!(job = %job.short(), "refund failed: {e}");
    }
}

/// What a cancellation did.
pub enum CancelOutcome {
    /// The job had not started; it is cancelled and refunded.
    Cancelled,
    /// The provider was told to stop it; the result settles the time used.
    Requested,
    /// It had already ended.
    AlreadyEnded(JobState),
}

/// Cancels a job for its owner.
pub async fn cancel(state: &AppState, job: &JobRecord) -> Result<CancelOutcome, SubmitError> {
    match job.state {
        s if s.is_terminal() => Ok(CancelOutcome::AlreadyEnded(s)),
        JobState::Queued => {
            let mut tx = state.db.begin().await?;
            let mut pending = state.bank.begin().await;
            let reason = "cancelled by the buyer before it started";
            if Db::transition(
                &mut tx,
                &job.id,
                &[JobState::Queued],
                JobState::Cancelled,
                Change {
                    reason: Some(reason),
                    ..Default::default()
                },
            )
            .await?
            {
                refund(&mut pending, &mut tx, &job.id).await;
                tx.commit().await.map_err(DbError::from)?;
                pending.commit();
                return Ok(CancelOutcome::Cancelled);
            }
            // It was dispatched meanwhile: cancel it on its provider.
            drop(tx);
            drop(pending);
            let fresh = state
                .db
                .job(&job.id)
                .await?
                .ok_or_else(|| SubmitError::Bank("job vanished".into()))?;
            Box::pin(cancel(state, &fresh)).await
        }
        JobState::Dispatched | JobState::Running if job.spec.resources.gang > 1 => {
            if crate::gang::cancel(state, job).await? {
                Ok(CancelOutcome::Cancelled)
            } else {
                Ok(CancelOutcome::Requested)
            }
        }
        JobState::Dispatched | JobState::Running => {
            let (Some(provider), Some(offer_id)) = (job.provider, job.offer_id) else {
                return Err(SubmitError::Bank(format!(
                    "job {} is {:?} without a provider",
                    job.id, job.state
                )));
            };
            let msg = kiln_protocol::CancelJob {
                job_id: job.id,
                offer_id,
                provider,
                reason: "cancelled by the buyer".into(),
            };
            let signed = Signed::sign(&state.key, msg, state.config.offer_ttl.as_secs())
                .map_err(|e| SubmitError::Bank(e.to_string()))?;
            let addrs = provider_addrs(state, &provider).await?;
            match state
                .net
                .request(provider.peer_id(), addrs, NetRequest::Cancel(signed))
                .await
            {
                Ok(NetResponse::Accepted) => Ok(CancelOutcome::Requested),
                Ok(NetResponse::Rejected { reason }) => Err(SubmitError::Bank(format!(
                    "provider {} refused the cancellation: {reason}",
                    provider.short()
                ))),
                Ok(other) => Err(SubmitError::Bank(format!(
                    "unexpected answer to a cancellation: {other:?}"
                ))),
                Err(e) => Err(SubmitError::Bank(format!(
                    "could not reach provider {} to cancel: {e}",
                    provider.short()
                ))),
            }
        }
        _ => Ok(CancelOutcome::AlreadyEnded(job.state)),
    }
}

/// After a restart: jobs that were offered but not confirmed get the *same*
/// offer again (providers accept an offer id once, so this never runs a job
/// twice); their providers answer, or the usual retry/requeue path applies.
pub async fn recover(state: &AppState) -> Result<(), DbError> {
    crate::gang::recover(state).await?;
    let dispatched = state.db.jobs_in(&[JobState::Dispatched], 100_000).await?;
    let providers = state.db.providers_seen_since(UnixMillis(0)).await?;
    for job in dispatched {
        let (Some(provider), Some(offer_id), Some(price)) =
            (job.provider, job.offer_id, job.price_per_hour)
        else {
            continue;
        };
        let addrs = providers
            .iter()
            .find(|p| p.advert.payload.provider == provider)
            .map(|p| p.advert.payload.listen_addrs.clone())
            .unwrap_or_default();
        let offer = JobOffer {
            offer_id,
            job_id: job.id,
            provider,
            owner: job.owner,
            spec: job.spec.clone(),
            price_per_hour: price,
            sources: Vec::new(),
        };
        tracing::info!(job = %job.id.short(), "re-sending an unconfirmed offer after restart");
        tokio::spawn(dispatch(state.clone(), offer, addrs, job.attempts));
    }
    Ok(())
}

/// Churn: a provider not heard from within its lease and no longer connected loses it, and its
/// dispatched or running jobs are requeued (or failed after `max_attempts`).
/// If it was only partitioned and later delivers a result, that result names
/// the old offer and is refused as stale, so a job completes at most once.
pub async fn expire_leases(state: &AppState) -> Result<(), DbError> {
    let since = crate::live::lease_start(state);
    let live: std::collections::HashSet<ProviderId> = state
        .db
        .providers_seen_since(since)
        .await?
        .into_iter()
        .map(|p| p.advert.payload.provider)
        .collect();
    crate::gang::expire_leases(state, &live).await?;
    for job in state
        .db
        .jobs_in(&[JobState::Dispatched, JobState::Running], 100_000)
        .await?
    {
        let Some(p) = job.provider else { continue };
        // A job dispatched moments ago to a provider that registered moments
        // ago is not lost; only judge jobs older than one lease.
        let stale = UnixMillis::now().0.saturating_sub(job.updated_at.0)
            > state.config.provider_lease.as_millis() as u64;
        // A missed heartbeat alone is not proof of death: a provider under
        // heavy load may heartbeat late. Only a provider that has also lost
        // its connection to us has vanished.
        if !live.contains(&p)
            && stale
            && !state.net.is_connected(p.peer_id()).await.unwrap_or(false)
        {
            let reason = format!(
                "provider {} stopped answering (lease of {}s expired)",
                p.short(),
                state.config.provider_lease.as_secs()
            );
            // Out of the scheduler's fleet now, not at the next round's
            // expiry (whose clock may still count its last heartbeat as
            // recent): the requeued job must not go straight back to it.
            crate::live::lock(state).suspend(&p);
            requeue_or_fail(state, &job, &reason).await?;
        }
    }
    Ok(())
}

/// Places queued jobs whenever woken, and at least every `schedule_interval`.
pub async fn schedule_loop(state: AppState, cancel: CancellationToken) {
    if let Err(e) = recover(&state).await {
        tracing::error!("recovering unconfirmed offers failed: {e}");
    }
    loop {
        if let Err(e) = expire_leases(&state).await {
            tracing::error!("expiring provider leases failed: {e}");
        }
        if let Err(e) = schedule_once(&state).await {
            tracing::error!("scheduling round failed: {e}");
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = state.wake.notified() => {}
            () = tokio::time::sleep(state.config.schedule_interval) => {}
        }
    }
}

/// The fleet as the scheduler sees it, rebuilt from the database: live
/// providers and what is booked on them (the offers search uses it; the
/// scheduler keeps its own copy in memory, see [`crate::live`]).
pub async fn fleet(state: &AppState) -> Result<Fleet, DbError> {
    Ok(crate::live::rebuild(state).await?.fleet)
}

async fn schedule_once(state: &AppState) -> Result<(), DbError> {
    let mut queued = state.db.jobs_in(&[JobState::Queued], 500).await?;
    if queued.is_empty() {
        return Ok(());
    }
    // Priority, then submission order; every job is tried, so a small job is
    // never blocked behind a large one that does not fit (see sched::queue
    // for the anti-starvation hold that keeps the large one from waiting forever).
    sched::order(&mut queued);
    if crate::live::lock(state).needs_resync() {
        let rebuilt = crate::live::rebuild(state).await?;
        *crate::live::lock(state) = rebuilt;
    }
    let lease_start = crate::live::lease_start(state);
    // Placements are booked under the job as they are made, so a booking
    // is given back whatever happens to the job afterwards.
    // Each decision with the listen addresses of the providers it placed on.
    type Routed = Vec<(sched::Decision, Vec<Vec<String>>)>;
    let (decisions, unbonded): (Routed, usize) = {
        let mut live = crate::live::lock(state);
        live.expire(lease_start);
        let decisions = sched::run_round(
            &queued,
            &mut live.fleet,
            UnixMillis::now(),
            &sched::RoundPolicy::default(),
        );
        let decisions = queued
            .iter()
            .zip(decisions)
            .map(|(job, d)| {
                let addrs = match &d {
                    sched::Decision::Placed(ps) => {
                        live.book(job.id, job.attempts + 1, ps);
                        ps.iter()
                            .map(|p| live.fleet.view(p.index).advert.listen_addrs.clone())
                            .collect()
                    }
                    _ => Vec::new(),
                };
                (d, addrs)
            })
            .collect();
        (decisions, live.unbonded())
    };
    for (job, (decision, addrs)) in queued.iter().zip(decisions) {
        match decision {
            sched::Decision::Placed(placements) if placements.len() > 1 => {
                if !crate::gang::place(state, job, &placements, addrs).await? {
                    release_booking(state, &job.id);
                }
            }
            sched::Decision::Placed(placements) => {
                let Some(placement) = placements.into_iter().next() else {
                    continue;
                };
                let offer_id = OfferId::random();
                let mut tx = state.db.begin().await?;
                let change = Change {
                    reason: None,
                    provider: Some(placement.provider),
                    offer_id: Some(offer_id),
                    price_per_hour: Some(placement.price_per_hour),
                    bump_attempts: true,
                    result: None,
                };
                if !Db::transition(
                    &mut tx,
                    &job.id,
                    &[JobState::Queued],
                    JobState::Dispatched,
                    change,
                )
                .await?
                {
                    release_booking(state, &job.id);
                    continue;
                }
                tx.commit().await?;
                let offer = JobOffer {
                    offer_id,
                    job_id: job.id,
                    provider: placement.provider,
                    owner: job.owner,
                    spec: job.spec.clone(),
                    price_per_hour: placement.price_per_hour,
                    sources: Vec::new(),
                };
                let addrs = addrs.into_iter().next().unwrap_or_default();
                tracing::info!(job = %job.id.short(), provider = %placement.provider.short(), price = %placement.price_per_hour, "dispatching");
                tokio::spawn(dispatch(state.clone(), offer, addrs, job.attempts + 1));
            }
            sched::Decision::Waiting(why) => {
                let line = why
                    .with_unbonded(unbonded, state.config.min_stake)
                    .to_string();
                if job.reason.as_deref() != Some(line.as_str()) {
                    state.db.set_reason(&job.id, &line).await?;
                }
            }
            sched::Decision::Expired => {
                let reason = format!(
                    "not placed before its queue deadline of {}; last: {}",
                    job.spec
                        .resources
                        .deadline
                        .map(|d| d.to_string())
                        .unwrap_or_default(),
                    job.reason.as_deref().unwrap_or("no provider fitted")
                );
                let mut tx = state.db.begin().await?;
                let mut pending = state.bank.begin().await;
                let change = Change {
                    reason: Some(&reason),
                    ..Default::default()
                };
                if Db::transition(
                    &mut tx,
                    &job.id,
                    &[JobState::Queued],
                    JobState::Failed,
                    change,
                )
                .await?
                {
                    refund(&mut pending, &mut tx, &job.id).await;
                    tx.commit().await?;
                    pending.commit();
                    tracing::info!(job = %job.id.short(), "{reason}");
                }
            }
        }
    }
    Ok(())
}

/// Sends one offer. The same signed offer id is retried on a transport error
/// (the provider dedups by offer id, so a retry never runs a job twice).
async fn dispatch(state: AppState, mut offer: JobOffer, addrs: Vec<String>, attempt: u32) {
    let job = offer.job_id;
    offer.sources = crate::blobs::offer_sources(&state, &offer).await;
    let peer = offer.provider.peer_id();
    let addrs = addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect::<Vec<_>>();
    let signed = match Signed::sign(&state.key, offer.clone(), state.config.offer_ttl.as_secs()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(job = %job.short(), "cannot sign offer: {e}");
            return;
        }
    };
    let mut outcome = Err("not sent".to_string());
    for _ in 0..3 {
        match state
            .net
            .request(peer, addrs.clone(), NetRequest::Offer(signed.clone()))
            .await
        {
            Ok(NetResponse::Accepted) => {
                outcome = Ok(());
                break;
            }
            Ok(NetResponse::Rejected { reason }) => {
                outcome = Err(format!(
                    "provider {} refused the offer: {reason}",
                    offer.provider.short()
                ));
                break;
            }
            Ok(other) => outcome = Err(format!("unexpected answer to an offer: {other:?}")),
            Err(e) => {
                outcome = Err(e.to_string());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let res: Result<(), DbError> = async {
        let mut tx = state.db.begin().await?;
        match outcome {
            Ok(()) => {
                Db::transition(
                    &mut tx,
                    &job,
                    &[JobState::Dispatched],
                    JobState::Running,
                    Change::default(),
                )
                .await?;
                tx.commit().await?;
            }
            Err(reason) if attempt >= state.config.max_attempts => {
                let reason =
                    format!("could not be dispatched after {attempt} attempts; last: {reason}");
                let mut pending = state.bank.begin().await;
                if Db::transition(
                    &mut tx,
                    &job,
                    &[JobState::Dispatched],
                    JobState::Failed,
                    Change {
                        reason: Some(&reason),
                        ..Default::default()
                    },
                )
                .await?
                {
                    refund(&mut pending, &mut tx, &job).await;
                }
                tx.commit().await?;
                pending.commit();
            }
            Err(reason) => {
                tracing::warn!(job = %job.short(), "dispatch failed: {reason}; requeued");
                let reason = format!("requeued: {reason}");
                Db::transition(
                    &mut tx,
                    &job,
                    &[JobState::Dispatched],
                    JobState::Queued,
                    Change {
                        reason: Some(&reason),
                        ..Default::default()
                    },
                )
                .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = res {
        tracing::error!(job = %job.short(), "recording the dispatch outcome failed: {e}");
    }
    if !matches!(state.db.job(&job).await, Ok(Some(j)) if matches!(j.state, JobState::Dispatched | JobState::Running))
    {
        // Only this attempt's booking: once requeued, a round may already
        // have booked the next attempt.
        crate::live::lock(&state).release_attempt(&job, attempt);
    }
    state.wake.notify_one();
}
