//! `Result`: a member's signed receipt, its output manifest and its small
//! outputs inline.
//!
//! Accepted only from the member's own provider, for a member that the
//! coordinator saw start and that has not been released (a superseded
//! attempt's receipt changes nothing), after [`crate::verify`] checked it
//! and every blob it names is here and verified. Then, in one transaction:
//! the nonce is claimed (no replay), the audit draw is taken (see
//! [`crate::lifecycle::reexec`]), the member is paid for its observed time
//! (see [`crate::jobs::billing`]) unless its result is held for
//! verification, its result recorded, its outputs granted to the job's
//! owner, and the job decided from its members (or held while it is
//! re-executed elsewhere). A verifier's result is held until the
//! comparison, which runs once it is committed.

use kiln_protocol::{BuyerId, ContentId, JobId, JobResult, Outcome, ProviderId, UnixMillis};

use super::{Handled, HandlerError, refuse};
use crate::AppState;
use crate::db::{Db, DbError, Tx};
use crate::jobs::keys::{self, PayPoint};
use crate::jobs::model::{self, JobVerdict};
use crate::jobs::store::Delivery;
use crate::jobs::{MemberState, Role, billing};
use crate::lifecycle::reexec::{self, Sampled};
use crate::lifecycle::{settle, wind_down};
use crate::verification::reputation::Event;
use crate::verify::{self, Expected};

pub async fn handle(state: &AppState, peer: ProviderId, result: JobResult) -> Handled {
    let arrived = UnixMillis::now();
    let offer = result.receipt.payload.offer_id;
    let Some(job) = state.db.job(&result.job_id).await? else {
        return Err(refuse(format!("result for unknown job {}", result.job_id)));
    };
    let Some(m) = state.db.member(&offer).await? else {
        return Err(refuse(format!(
            "result for job {} names offer {offer}, which is not one of its members",
            job.id
        )));
    };
    if m.job_id != job.id {
        return Err(refuse(format!(
            "result for job {} names offer {offer} of another job (a replayed receipt?); refused",
            job.id
        )));
    }
    let who = model::who(m.rank, job.size() as usize, &m.provider);
    // What the receipt says is checked first, whatever the member's state:
    // a forged, foreign or lying receipt is refused outright.
    let expected = Expected::of(job.id, m.offer_id, m.provider, &job.spec);
    let needed = verify::check_result(&result, &expected, peer, arrived)
        .map_err(|e| refuse(format!("result of {who} for job {} refused: {e}", job.id)))?;
    match m.state {
        MemberState::Delivered if m.receipt.as_ref() == Some(&result.receipt) => {
            return Ok(()); // a retried delivery of what we already hold
        }
        MemberState::Delivered => {
            return Err(refuse(format!(
                "{who} of job {} already delivered; replayed receipt refused",
                job.id
            )));
        }
        MemberState::Released => {
            return Err(refuse(format!(
                "offer {} ({who}) of job {} was released ({}); its receipt is refused and changes nothing",
                offer.short(),
                job.id,
                m.reason.as_deref().unwrap_or("superseded")
            )));
        }
        // Not seen to start: nothing ran that could be paid for. (A node
        // that answered its offer a moment ago is told to resend.)
        MemberState::Offered | MemberState::Reserved => {
            return Err(HandlerError::Retry(format!(
                "{who} of job {} has not started as far as the coordinator knows; receipt not accepted",
                job.id
            )));
        }
        MemberState::Started | MemberState::Stopping => {}
    }
    let Some(started) = m.started_at else {
        return Err(refuse(format!(
            "{who} of job {} has no start time; receipt refused",
            job.id
        )));
    };
    // Observed time ends when the verified receipt first arrived, however
    // long the outputs then take to move.
    let result_at = state.db.result_arrived(&m.offer_id, arrived).await?;
    // Every blob the result names must be here, verified, before anything
    // is recorded or paid.
    if let Err(e) = store_result_blobs(state, &job.owner, &m.provider, &result, &needed).await {
        if matches!(e, verify::ReceiptError::NotHeld { .. }) {
            state.db.result_refused(&m.offer_id).await?;
            return Err(refuse(format!(
                "result of {who} for job {} refused: {e}",
                job.id
            )));
        }
        // Sound so far, but the bytes did not all arrive: the provider
        // keeps its outputs pinned and sends the result again.
        return Err(HandlerError::Retry(format!(
            "result of {who} for job {} not accepted yet: {e}",
            job.id
        )));
    }
    let receipt = &result.receipt.payload;
    let earned = billing::earned_by(&job.terms(&m), receipt.usage.wall_ms, started, result_at);
    let reason = receipt.error.clone().or_else(|| match receipt.outcome {
        Outcome::Failed => receipt.exit_code.map(|c| format!("exited with code {c}")),
        _ => None,
    });

    let mut tx = state.db.begin().await?;
    let mut pending = state.bank.begin().await;
    if !Db::claim_nonce(
        &mut tx,
        &result.receipt.signer.to_string(),
        &result.receipt.nonce.to_string(),
        "result-receipt",
        result.receipt.expires_at,
    )
    .await?
    {
        return Err(refuse(format!(
            "receipt for job {} was already used; replay refused",
            job.id
        )));
    }
    // Re-read under the write lock: a loss, a deadline or another
    // member's result may have changed it since.
    match Db::member_in(&mut tx, &m.offer_id).await? {
        Some(now) if matches!(now.state, MemberState::Started | MemberState::Stopping) => {}
        Some(now) => {
            return Err(refuse(format!(
                "{who} of job {} is {}; receipt refused",
                job.id, now.state
            )));
        }
        None => return Err(refuse(format!("offer {offer} vanished"))),
    }
    // A job of one whose result succeeded may be drawn for re-execution:
    // then it is held, unpaid, until the executions are compared. A gang
    // is drawn once its last member delivered, and its members are paid
    // only then (`defers_pay`). A verifier's own result is held until the
    // comparison.
    let job_state = Db::job_state_in(&mut tx, &job.id).await?.map(|(s, _)| s);
    let defer = reexec::defers_pay(state, &job, &m);
    let sampled = match (m.role, job_state) {
        (Role::Verify, _) => Sampled::Hold,
        (Role::Run, Some(js)) if !defer => {
            reexec::sample_in(
                state,
                &mut tx,
                &pending,
                &job,
                js,
                &m,
                &result.receipt,
                earned,
            )
            .await?
        }
        (Role::Run, _) => Sampled::No,
    };
    if sampled != Sampled::Hold && !defer {
        settle::pay_member(
            &mut tx,
            &mut pending,
            state.bank.fee_bps,
            &job.id,
            &m.offer_id,
            m.provider,
            earned,
            keys::pay(&m.offer_id, PayPoint::Result),
        )
        .await?;
    }
    let delivered = Db::deliver_member(
        &mut tx,
        &m.offer_id,
        Delivery {
            outcome: receipt.outcome,
            reason: reason.as_deref(),
            cost: earned,
            receipt: &result.receipt,
            manifest: &result.manifest,
        },
    )
    .await?;
    if !delivered {
        return Err(HandlerError::Retry(format!(
            "{who} of job {} changed state while its result was checked; resend",
            job.id
        )));
    }
    // A verified receipt delivered: good evidence for its provider.
    Db::reputation_event(&mut tx, &m.provider, Event::Delivered).await?;
    grant_result_blobs(state, &mut tx, &job.owner, &job.id, &result).await?;
    let mut held = sampled == Sampled::Hold && m.role == Role::Run;
    let (verdict, ended) = match (m.role, sampled) {
        (Role::Verify, _) => (JobVerdict::Wait, false),
        (Role::Run, Sampled::Hold) => {
            if !reexec::hold_in(&mut tx, &job.id, m.attempt).await? {
                return Err(HandlerError::Retry(format!(
                    "job {} changed state while its result was checked; resend",
                    job.id
                )));
            }
            (JobVerdict::Wait, false)
        }
        (Role::Run, _) => {
            let mut gang = Sampled::No;
            if defer && let Some(js) = job_state {
                let mut members: Vec<_> = Db::attempt_members_in(&mut tx, &job.id, m.attempt)
                    .await?
                    .into_iter()
                    .filter(|o| o.role == Role::Run)
                    .collect();
                members.sort_by_key(|o| o.rank);
                gang = reexec::sample_gang_in(state, &mut tx, &job, js, &members).await?;
            }
            if gang == Sampled::Hold {
                if !reexec::hold_in(&mut tx, &job.id, m.attempt).await? {
                    return Err(HandlerError::Retry(format!(
                        "job {} changed state while its result was checked; resend",
                        job.id
                    )));
                }
                held = true;
                (JobVerdict::Wait, false)
            } else {
                settle::conclude(
                    &mut tx,
                    &mut pending,
                    state.bank.fee_bps,
                    &job.id,
                    m.attempt,
                )
                .await?
            }
        }
    };
    tx.commit().await.map_err(DbError::from)?;
    pending.commit();
    tracing::info!(job = %job.id.short(), rank = m.rank, role = %m.role, provider = %m.provider.short(), earned = %earned, held = (sampled == Sampled::Hold || defer), "result accepted");
    if held || m.role == Role::Verify {
        reexec::kick(state, job.id);
    }
    if ended {
        settle::finished(state, &job.id);
        tracing::info!(job = %job.id.short(), "job ended: {verdict:?}");
    }
    if let JobVerdict::Stop { ranks, reason } = verdict {
        let stop: Vec<_> = state
            .db
            .attempt_members(&job.id, m.attempt)
            .await?
            .into_iter()
            .filter(|o| ranks.contains(&o.rank))
            .collect();
        wind_down(state, true, &[], &stop, &reason).await?;
    }
    Ok(())
}

/// Lets the job's owner read its outputs, logs and manifest (in the
/// transaction that records the result).
async fn grant_result_blobs(
    state: &AppState,
    tx: &mut Tx<'_>,
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
async fn store_result_blobs(
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
