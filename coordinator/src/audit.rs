//! Capability audits: at random times the coordinator sends each live
//! provider a benchmark challenge with a fresh nonce and a deadline, checks
//! the signed answer (`challenge::check_response`: signature, deadline,
//! exact recomputation of sampled output elements), compares the measured
//! figures with the provider's advert and with the fleet median for the same
//! GPU model (`challenge::assess`), and records the outcome against the
//! provider's reputation. Reputation arithmetic is the pure
//! [`reputation_after`].

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kiln_protocol::bench::{ChallengeId, ChallengeSizes};
use kiln_protocol::views::AuditView;
use kiln_protocol::{
    CapabilityAdvert, NetRequest, NetResponse, Nonce, ProviderId, Signed, UnixMillis,
};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::challenge::{self, Figures};
use crate::db::{Db, DbError};
use crate::verification::reputation::Event;

/// Starting reputation of a provider (scores run 0..=1000; see
/// `verification::reputation`).
pub use crate::challenge::REPUTATION_START;

/// How an audit ended: `Passed` (answered in time, proofs correct,
/// figures as advertised), `Flagged` (answered correctly, but figures fell
/// more than 15% short of the advert or of the fleet median for the same
/// GPU model) or `Failed` (no valid answer: timeout, bad signature, wrong
/// checksum or sample). Stored, and served, as its string.
pub use kiln_protocol::views::AuditOutcome;

/// The reputation event an audit outcome is.
pub fn reputation_event(outcome: AuditOutcome) -> Event {
    match outcome {
        AuditOutcome::Passed => Event::ChallengePassed,
        AuditOutcome::Flagged => Event::ChallengeFlagged,
        AuditOutcome::Failed => Event::ChallengeFailed,
    }
}

/// Settings of the audit loop.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// Mean time between two challenges of one provider; `None` disables audits.
    pub mean_interval: Option<Duration>,
    pub timeout: Duration,
    pub sizes: ChallengeSizes,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            mean_interval: Some(Duration::from_secs(6 * 3600)),
            timeout: Duration::from_secs(120),
            sizes: ChallengeSizes::default(),
        }
    }
}

/// One audit's result.
#[derive(Clone, Debug)]
pub struct Audit {
    pub provider: ProviderId,
    pub outcome: AuditOutcome,
    pub detail: String,
    pub reputation: u32,
}

fn random_u64() -> u64 {
    u64::from_le_bytes(Nonce::random().as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// Challenges one provider now and records the outcome.
pub async fn challenge_provider(
    state: &AppState,
    cfg: &AuditConfig,
    advert: &CapabilityAdvert,
    fleet: &BTreeMap<String, Figures>,
) -> Result<Audit, DbError> {
    let id = ChallengeId::random();
    // Re-measure at the sizes the advert was measured at: figures at other
    // sizes are not comparable (small matrices run far below peak).
    let mut sizes = cfg.sizes;
    if let Some(b) = &advert.benchmark {
        sizes.cpu_matmul_n = b.cpu.matmul_n;
        if let Some(g) = b.gpus.first() {
            sizes.gpu_matmul_n = g.matmul_n;
        }
    }
    let c = challenge::new_challenge(
        advert.provider,
        Nonce::random(),
        id,
        UnixMillis::now(),
        cfg.timeout.as_millis() as u64,
        sizes,
    );
    let (outcome, detail, verdict) = match Signed::sign(&state.key, c, cfg.timeout.as_secs() + 60) {
        Err(e) => (
            AuditOutcome::Failed,
            format!("could not sign the challenge: {e}"),
            None,
        ),
        Ok(signed) => {
            let addrs = advert
                .listen_addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect();
            let answer = tokio::time::timeout(
                cfg.timeout,
                state.net.request(
                    advert.provider.peer_id(),
                    addrs,
                    NetRequest::Challenge(signed.clone()),
                ),
            )
            .await;
            match answer {
                Err(_) => (
                    AuditOutcome::Failed,
                    format!("no answer within {}s", cfg.timeout.as_secs()),
                    None,
                ),
                Ok(Err(e)) => (
                    AuditOutcome::Failed,
                    format!("challenge not delivered: {e}"),
                    None,
                ),
                Ok(Ok(NetResponse::ChallengeResponse(resp))) => {
                    match challenge::check_response(
                        &signed,
                        &state.key.public(),
                        &resp,
                        advert,
                        UnixMillis::now(),
                    ) {
                        Err(e) => (AuditOutcome::Failed, e.to_string(), None),
                        Ok(mut v) => {
                            v.flags = challenge::assess(&v, advert, fleet);
                            if v.flags.is_empty() {
                                (
                                    AuditOutcome::Passed,
                                    format!(
                                        "answered in {} ms; figures as advertised",
                                        v.elapsed_ms
                                    ),
                                    Some(v),
                                )
                            } else {
                                let d = v
                                    .flags
                                    .iter()
                                    .map(|f| format!("{f:?}"))
                                    .collect::<Vec<_>>()
                                    .join("; ");
                                (AuditOutcome::Flagged, d, Some(v))
                            }
                        }
                    }
                }
                Ok(Ok(NetResponse::Rejected { reason })) => (
                    AuditOutcome::Failed,
                    format!("refused the challenge: {reason}"),
                    None,
                ),
                Ok(Ok(other)) => (
                    AuditOutcome::Failed,
                    format!("answered with {other:?}"),
                    None,
                ),
            }
        }
    };
    let _ = verdict;
    let reputation = record(state, &advert.provider, &id.to_string(), outcome, &detail).await?;
    tracing::info!(provider = %advert.provider.short(), outcome = outcome.as_str(), reputation, "{detail}");
    Ok(Audit {
        provider: advert.provider,
        outcome,
        detail,
        reputation,
    })
}

/// Appends the audit and updates reputation in one transaction.
async fn record(
    state: &AppState,
    provider: &ProviderId,
    challenge_id: &str,
    outcome: AuditOutcome,
    detail: &str,
) -> Result<u32, DbError> {
    let mut tx = state.db.begin().await?;
    sqlx::query("INSERT INTO provider_audits (provider, at, challenge_id, outcome, detail) VALUES (?, ?, ?, ?, ?)")
        .bind(provider.to_string())
        .bind(i64::try_from(UnixMillis::now().0).unwrap_or(i64::MAX))
        .bind(challenge_id)
        .bind(outcome.as_str())
        .bind(detail)
        .execute(&mut *tx)
        .await?;
    let (p, f, x) = match outcome {
        AuditOutcome::Passed => (1, 0, 0),
        AuditOutcome::Flagged => (0, 1, 0),
        AuditOutcome::Failed => (0, 0, 1),
    };
    let after = Db::reputation_event(&mut tx, provider, reputation_event(outcome)).await?;
    sqlx::query(
        "UPDATE reputation SET passed = passed + ?, flagged = flagged + ?, failed = failed + ? WHERE provider = ?",
    )
    .bind(p)
    .bind(f)
    .bind(x)
    .bind(provider.to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(after)
}

/// A provider's reputation (REPUTATION_START if never audited).
pub async fn reputation(state: &AppState, provider: &ProviderId) -> Result<u32, DbError> {
    state.db.reputation(provider).await
}

/// A provider's audit history, newest first.
pub async fn history(
    state: &AppState,
    provider: &ProviderId,
    limit: u32,
) -> Result<Vec<AuditView>, DbError> {
    let rows = sqlx::query("SELECT at, challenge_id, outcome, detail FROM provider_audits WHERE provider = ? ORDER BY seq DESC LIMIT ?")
        .bind(provider.to_string())
        .bind(i64::from(limit))
        .fetch_all(&state.db.pool)
        .await?;
    let corrupt = |reason: String| DbError::Corrupt {
        table: "provider_audits",
        reason,
    };
    rows.iter()
        .map(|r| {
            let at = r.try_get::<i64, _>("at")?;
            Ok(AuditView {
                at: UnixMillis(
                    u64::try_from(at).map_err(|_| corrupt(format!("negative time {at}")))?,
                ),
                challenge_id: r
                    .try_get::<String, _>("challenge_id")?
                    .parse()
                    .map_err(|e: kiln_protocol::IdParseError| corrupt(e.to_string()))?,
                outcome: r
                    .try_get::<String, _>("outcome")?
                    .parse()
                    .map_err(|e: kiln_protocol::views::UnknownVariant| corrupt(e.to_string()))?,
                detail: r.try_get("detail")?,
            })
        })
        .collect()
}

/// Fleet medians by GPU model (and `cpu`), from the providers' adverts.
pub fn fleet_medians(adverts: &[CapabilityAdvert]) -> BTreeMap<String, Figures> {
    let mut by_model: BTreeMap<String, Vec<Figures>> = BTreeMap::new();
    for a in adverts {
        if let Some(b) = &a.benchmark {
            by_model
                .entry("cpu".into())
                .or_default()
                .push(challenge::cpu_figures(&b.cpu));
            for g in &b.gpus {
                by_model
                    .entry(g.name.clone())
                    .or_default()
                    .push(challenge::gpu_figures(g));
            }
        }
    }
    by_model
        .into_iter()
        .map(|(k, v)| (k, challenge::fleet_median(&v)))
        .collect()
}

/// Challenges each live provider at random times until cancelled.
pub async fn audit_loop(state: AppState, cancel: CancellationToken) {
    let Some(mean) = state.config.audit.mean_interval else {
        return;
    };
    let mean_ms = mean.as_millis() as u64;
    let mut due: HashMap<ProviderId, u64> = HashMap::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis((mean_ms / 20).clamp(50, 60_000))) => {}
        }
        let since = crate::live::lease_start(&state);
        let Ok(live) = state.db.providers_seen_since(since).await else {
            continue;
        };
        let adverts: Vec<CapabilityAdvert> = live.into_iter().map(|p| p.advert.payload).collect();
        let fleet = fleet_medians(&adverts);
        let now = UnixMillis::now().0;
        for a in adverts {
            let next = *due
                .entry(a.provider)
                .or_insert_with(|| now + challenge::next_challenge_in_ms(mean_ms, random_u64()));
            if now >= next {
                due.insert(
                    a.provider,
                    now + challenge::next_challenge_in_ms(mean_ms, random_u64()),
                );
                let s = state.clone();
                let f = fleet.clone();
                state.tasks.spawn(async move {
                    if let Err(e) = challenge_provider(&s, &s.config.audit, &a, &f).await {
                        tracing::error!(provider = %a.provider.short(), "recording an audit failed: {e}");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audits_move_reputation_from_the_start() {
        use crate::verification::reputation::Evidence;
        let after = |o| Evidence::default().after(reputation_event(o)).score();
        assert!(after(AuditOutcome::Passed) > REPUTATION_START);
        assert!(after(AuditOutcome::Flagged) < REPUTATION_START);
        assert!(after(AuditOutcome::Failed) < after(AuditOutcome::Flagged));
    }
}
