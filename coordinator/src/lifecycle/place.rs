//! A placed job gets its members and their offers.
//!
//! [`place`] records the attempt: the job becomes `dispatched` and gets one
//! member per placement (its own offer id, rank, provider, price), in one
//! transaction. [`run`] then talks to the nodes:
//!
//! * **A job of one** gets a signed [`JobOffer`]. Accepted: the member is
//!   `started` (its pay clock starts now) and the job `running`.
//! * **A gang** (`k > 1`) is all-or-nothing: every member gets a signed
//!   [`GangOffer`] and reserves a slot without starting; when all reserved,
//!   each gets a [`GangStart`] and becomes `started`; when all started the
//!   job is `running`. Any refusal, timeout or disconnect releases (or
//!   stops) every member, and the job is requeued.
//!
//! Either way a member that refused or did not answer is not offered work
//! again until it registers again, and a failed attempt requeues the job
//! (or fails it after `max_attempts`).

use futures::future::join_all;
use kiln_protocol::{
    GangMember, GangOffer, GangStart, JobOffer, NetRequest, ProviderId, UnixMillis,
};

use super::{send, settle, sign, wind_down};
use crate::AppState;
use crate::db::{Db, DbError};
use crate::jobs::model::{Reply, ReserveVerdict, StartVerdict, after_reserve, after_start};
use crate::jobs::store::MemberChange;
use crate::jobs::{Change, Expect, JobRecord, JobState, Member, MemberState};
use crate::sched::Placement;

/// Records a placed job (`placements`, one per rank; `addrs` their listen
/// addresses) and starts its dispatch. `false` if it was no longer queued.
pub async fn place(
    state: &AppState,
    job: &JobRecord,
    placements: &[Placement],
    addrs: Vec<Vec<String>>,
) -> Result<bool, DbError> {
    let attempt = job.attempts + 1;
    let members: Vec<Member> = placements
        .iter()
        .zip(addrs)
        .enumerate()
        .map(|(rank, (p, addrs))| {
            Member::offered(
                job.id,
                attempt,
                rank as u32,
                p,
                addrs,
                crate::jobs::Role::Run,
            )
        })
        .collect();
    let Some(lead) = members.first() else {
        return Ok(false);
    };
    let total = members
        .iter()
        .fold(0u64, |a, m| a.saturating_add(m.price_per_hour.0));
    let gang = members.len() > 1;
    let detail = gang.then(|| {
        format!(
            "gang of {}: reserving on {}",
            members.len(),
            members
                .iter()
                .map(|m| m.provider.short())
                .collect::<Vec<_>>()
                .join(", ")
        )
    });
    let mut tx = state.db.begin().await?;
    let change = Change {
        reason: detail.as_deref(),
        // A job of one shows its provider at once; a gang's row takes its
        // lead member's when it ends (every member is listed meanwhile).
        provider: (!gang).then_some(lead.provider),
        offer_id: (!gang).then_some(lead.offer_id),
        price_per_hour: Some(kiln_protocol::Credits(total)),
        bump_attempts: true,
        ..Default::default()
    };
    if !Db::transition(
        &mut tx,
        &job.id,
        Expect::attempt(&[JobState::Queued], job.attempts),
        JobState::Dispatched,
        change,
    )
    .await?
    {
        return Ok(false);
    }
    for m in &members {
        Db::insert_member(&mut tx, m).await?;
    }
    tx.commit().await?;
    let mut job = job.clone();
    job.attempts = attempt;
    job.state = JobState::Dispatched;
    match &detail {
        Some(d) => tracing::info!(job = %job.id.short(), attempt, "{d}"),
        None => {
            tracing::info!(job = %job.id.short(), provider = %lead.provider.short(), price = %lead.price_per_hour, "dispatching")
        }
    }
    state.tasks.spawn(run(state.clone(), job, members));
    Ok(true)
}

/// The offer a member gets (the data sources for its inputs filled in).
pub(crate) async fn offer_for(state: &AppState, job: &JobRecord, m: &Member) -> JobOffer {
    let mut offer = JobOffer {
        offer_id: m.offer_id,
        job_id: job.id,
        provider: m.provider,
        owner: job.owner,
        spec: job.spec.clone(),
        price_per_hour: m.price_per_hour,
        sources: Vec::new(),
    };
    offer.sources = crate::blobs::offer_sources(state, &offer).await;
    offer
}

/// Talks to the members' nodes until the attempt runs or is given up.
pub async fn run(state: AppState, job: JobRecord, members: Vec<Member>) {
    let work = async {
        if members.len() == 1 {
            run_single(&state, &job, &members).await
        } else {
            run_gang(&state, &job, &members).await
        }
    };
    // At shutdown the attempt stays as recorded: `recover` re-sends an
    // unconfirmed offer, or releases and requeues a reserving gang.
    let res = tokio::select! {
        r = work => r,
        () = state.stopping.cancelled() => Ok(()),
    };
    if let Err(e) = res {
        tracing::error!(job = %job.id.short(), "dispatch failed: {e}");
    }
    state.wake.notify_one();
}

/// Members that refused or did not answer are not offered work again
/// until they register again (their advert then says what changed: owner
/// back, draining, busy): retrying on them now would only spend attempts.
fn suspend_failed(state: &AppState, members: &[Member], replies: &[Reply]) {
    let mut live = crate::live::lock(state);
    for (m, r) in members.iter().zip(replies) {
        if *r != Reply::Accepted {
            live.suspend(&m.provider);
        }
    }
}

/// Marks members started (their pay clock starts now) and, if that makes
/// the whole attempt started, the job running; in one transaction, and
/// only while the job is still this attempt, dispatched (a cancel or a
/// requeue that committed first wins). Returns the members that could not
/// be marked: the attempt moved on meanwhile, and since their nodes
/// accepted, they must be told to stop.
async fn mark_started(
    state: &AppState,
    job: &JobRecord,
    started: &[&Member],
    from: MemberState,
) -> Result<Vec<Member>, DbError> {
    let mut tx = state.db.begin().await?;
    let current = Db::job_state_in(&mut tx, &job.id).await?;
    if current != Some((JobState::Dispatched, job.attempts)) {
        return Ok(started.iter().map(|m| (*m).clone()).collect());
    }
    let now = UnixMillis::now();
    let mut orphaned = Vec::new();
    for m in started {
        if !Db::set_member(
            &mut tx,
            &m.offer_id,
            &[from],
            MemberState::Started,
            MemberChange {
                started_at: Some(now),
                ..Default::default()
            },
        )
        .await?
        {
            orphaned.push((*m).clone());
        }
    }
    let all_started = Db::attempt_members_in(&mut tx, &job.id, job.attempts)
        .await?
        .iter()
        .all(|m| m.state == MemberState::Started);
    if orphaned.is_empty() && all_started {
        let why = (job.size() > 1).then(|| format!("all {} gang members started", job.size()));
        Db::transition(
            &mut tx,
            &job.id,
            Expect::attempt(&[JobState::Dispatched], job.attempts),
            JobState::Running,
            Change {
                reason: why.as_deref(),
                ..Default::default()
            },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(orphaned)
}

async fn run_single(state: &AppState, job: &JobRecord, members: &[Member]) -> Result<(), DbError> {
    let m = &members[0];
    let offer = offer_for(state, job, m).await;
    let reply = match sign(state, offer) {
        Some(s) => send(state, m, NetRequest::Offer(s), 3).await,
        None => Reply::Refused("the coordinator could not sign the offer".into()),
    };
    let why = match &reply {
        Reply::Accepted => {
            let orphaned = mark_started(state, job, &[m], MemberState::Offered).await?;
            if !orphaned.is_empty() {
                // Cancelled (or requeued) while the offer was in flight: the
                // node accepted, so it is told to stop.
                super::notify(
                    state,
                    Vec::new(),
                    orphaned,
                    "the job was cancelled while it was offered",
                );
            }
            return Ok(());
        }
        Reply::Refused(r) => format!("provider {} refused the offer: {r}", m.provider.short()),
        Reply::Unreachable(e) => {
            format!(
                "provider {} did not answer the offer: {e}",
                m.provider.short()
            )
        }
    };
    suspend_failed(state, members, std::slice::from_ref(&reply));
    wind_down(state, false, std::slice::from_ref(m), &[], &why).await?;
    settle::requeue_or_fail(state, &job.id, job.attempts, &why).await
}

/// Sends each member of a gang (ranks `base..`, numbered from 0 in what
/// the nodes see, with a roster of them) its signed [`GangOffer`]; the
/// replies, in member order. A job's first gang and a verifier round of a
/// gang (see [`super::reexec`]) reserve the same way.
pub(crate) async fn offer_gang(
    state: &AppState,
    job: &JobRecord,
    members: &[Member],
    base: u32,
) -> Vec<Reply> {
    let size = members.len() as u32;
    let roster: Vec<GangMember> = members
        .iter()
        .map(|m| GangMember {
            rank: m.rank - base,
            provider: m.provider,
            listen_addrs: m.listen_addrs.clone(),
        })
        .collect();
    let hold_ms = u64::try_from(state.config.offer_ttl.as_millis()).unwrap_or(u64::MAX);
    let offers = members.iter().map(|m| {
        let roster = roster.clone();
        async move {
            let offer = GangOffer {
                offer: offer_for(state, job, m).await,
                rank: m.rank - base,
                size,
                members: roster,
                hold_ms,
            };
            match sign(state, offer) {
                Some(s) => send(state, m, NetRequest::GangOffer(s), 3).await,
                None => Reply::Refused("the coordinator could not sign the offer".into()),
            }
        }
    });
    join_all(offers).await
}

/// Sends each reserved member its signed [`GangStart`]; the replies, in
/// member order.
pub(crate) async fn start_gang(
    state: &AppState,
    job: &JobRecord,
    members: &[Member],
) -> Vec<Reply> {
    let starts = members.iter().map(|m| async move {
        let msg = GangStart {
            job_id: job.id,
            offer_id: m.offer_id,
            provider: m.provider,
        };
        match sign(state, msg) {
            Some(s) => send(state, m, NetRequest::GangStart(s), 3).await,
            None => Reply::Refused("the coordinator could not sign the start".into()),
        }
    });
    join_all(starts).await
}

async fn run_gang(state: &AppState, job: &JobRecord, members: &[Member]) -> Result<(), DbError> {
    let size = members.len() as u32;
    let providers: Vec<ProviderId> = members.iter().map(|m| m.provider).collect();
    // 1. Reserve.
    let replies = offer_gang(state, job, members, 0).await;
    suspend_failed(state, members, &replies);
    let mut tx = state.db.begin().await?;
    for (m, r) in members.iter().zip(&replies) {
        if *r == Reply::Accepted {
            Db::set_member(
                &mut tx,
                &m.offer_id,
                &[MemberState::Offered],
                MemberState::Reserved,
                MemberChange::default(),
            )
            .await?;
        }
    }
    let live = Db::job_state_in(&mut tx, &job.id)
        .await?
        .is_some_and(|(s, a)| s == JobState::Dispatched && a == job.attempts);
    tx.commit().await?;
    let verdict = if live {
        after_reserve(&replies, &providers)
    } else {
        ReserveVerdict::ReleaseAll {
            reason: "the job was cancelled while its gang reserved".into(),
        }
    };
    let reason = match verdict {
        ReserveVerdict::ReleaseAll { reason } => reason,
        ReserveVerdict::StartAll => {
            // 2. Every member reserved: start them all.
            let replies = start_gang(state, job, members).await;
            let accepted: Vec<&Member> = members
                .iter()
                .zip(&replies)
                .filter(|(_, r)| **r == Reply::Accepted)
                .map(|(m, _)| m)
                .collect();
            let orphaned = mark_started(state, job, &accepted, MemberState::Reserved).await?;
            if !orphaned.is_empty() {
                // The job left this attempt while the starts were in flight
                // (cancelled, or requeued): every member that accepted its
                // start is told to stop, whatever the database says of it
                // now, and the others are released.
                let reason = "the job was cancelled or requeued while its gang started";
                tracing::warn!(job = %job.id.short(), "{reason}; stopping {} member(s)", accepted.len());
                let started: Vec<Member> = accepted.iter().map(|m| (*m).clone()).collect();
                wind_down(state, true, members, &started, reason).await?;
                super::notify(state, Vec::new(), started, reason);
                return Ok(());
            }
            match after_start(&replies, &providers) {
                StartVerdict::Running => {
                    tracing::info!(job = %job.id.short(), "all {size} gang members started");
                    return Ok(());
                }
                StartVerdict::Abort { stop, reason } => {
                    let (to_stop, to_release): (Vec<Member>, Vec<Member>) = members
                        .iter()
                        .cloned()
                        .partition(|m| stop.contains(&m.rank));
                    wind_down(state, true, &to_release, &to_stop, &reason).await?;
                    reason
                }
            }
        }
    };
    tracing::warn!(job = %job.id.short(), "{reason}");
    wind_down(state, true, members, &[], &reason).await?;
    if live {
        settle::requeue_or_fail(state, &job.id, job.attempts, &reason).await?;
    }
    Ok(())
}
