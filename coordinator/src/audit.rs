//! Capability audits: at random times the coordinator sends each live
//! provider a benchmark challenge with a fresh nonce and a deadline, checks
//! the signed answer (`challenge::check_response`: signature, deadline,
//! sampled output elements proven part of the committed output and
//! recomputed exactly), compares the measured
//! figures with the provider's advert, and each GPU's verified speed with
//! the median verified speed of its model ([`fleet_medians`], from
//! `gpu_speed`: what challenges showed, never adverts) (`challenge::assess`),
//! and records the outcome against the
//! provider's reputation. Reputation arithmetic is the pure
//! [`reputation_after`].
//!
//! It also times each round trip on its own clock and keeps, per GPU, the
//! speed that shows (`challenge::gpu_speed`: proven work ÷ round trip,
//! never more than advertised) in `gpu_speed`, which the scheduler reads
//! for `min_tflops` and throughput per price (`live`). A provider whose
//! round trip is far longer than its advertised speed needs is flagged
//! (`challenge::speed_shortfall`) and credited only what it showed.
//!
//! A node whose advert shows an older benchmark version cannot answer in
//! the current format: it is not challenged, the audit fails saying which
//! `kiln-node` to upgrade to, and any speed verified before is cleared
//! ([`outdated`]).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kiln_protocol::bench::{
    BENCHMARK_VERSION, ChallengeId, ChallengeSizes, NODE_VERSION_FOR_BENCHMARK,
};
use kiln_protocol::views::AuditView;
use kiln_protocol::{
    CapabilityAdvert, NetRequest, NetResponse, Nonce, ProviderId, Signed, UnixMillis,
};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::challenge::{self, ChallengeVerdict, Figures, SpeedPolicy, SpeedShortfall};
use crate::db::{Db, DbError, GpuSpeedRecord};
use crate::verification::reputation::Event;

/// Starting reputation of a provider (scores run 0..=1000; see
/// `verification::reputation`).
pub use crate::challenge::REPUTATION_START;

/// How an audit ended: `Passed` (answered in time, proofs correct,
/// figures as advertised), `Flagged` (answered correctly, but figures fell
/// more than 15% short of the advert, or a GPU's verified speed is less
/// than half its model's verified median) or `Failed` (no valid answer: timeout, bad signature, wrong
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
    /// How long the proven products should take at the advertised speed
    /// (`challenge::gpu_matmul_n_for`): long against a network round trip,
    /// so that the round trip is mostly compute.
    pub speed_target: Duration,
    /// When a round trip fails the advertised speed.
    pub speed: SpeedPolicy,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            mean_interval: Some(Duration::from_secs(6 * 3600)),
            timeout: Duration::from_secs(120),
            sizes: ChallengeSizes::default(),
            speed_target: Duration::from_secs(1),
            speed: SpeedPolicy::default(),
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
    /// The checked answer, if there was one.
    pub verdict: Option<ChallengeVerdict>,
    /// The round trip was too long for the advertised speed.
    pub speed_shortfall: Option<SpeedShortfall>,
}

/// What an audit does to a provider's verified GPU speeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpeedUpdate {
    /// A checked answer: these replace them (a GPU credited nothing has none).
    Replace(Vec<GpuSpeedRecord>),
    /// A wrong or late answer: it vouches for nothing any more.
    Clear,
    /// Refused or not delivered: nothing was measured (a node refuses a
    /// challenge while its GPUs run jobs).
    Keep,
}

/// The rows a checked answer leaves: one per advertised GPU credited a
/// speed.
pub fn speed_records(
    verdict: &ChallengeVerdict,
    advert: &CapabilityAdvert,
    at: UnixMillis,
) -> Vec<GpuSpeedRecord> {
    verdict
        .gpus
        .iter()
        .filter(|g| g.speed.verified_mflops > 0 && advert.gpus.iter().any(|a| a.uuid == g.uuid))
        .map(|g| GpuSpeedRecord {
            gpu_uuid: g.uuid.clone(),
            gpu_name: g.name.clone(),
            verified_mflops: g.speed.verified_mflops,
            observed_mflops: g.speed.observed_mflops,
            advertised_mflops: g.speed.advertised_mflops,
            proven_flops: g.speed.proven_flops,
            round_trip_us: verdict.round_trip_us,
            challenge_id: verdict.challenge_id.to_string(),
            at,
        })
        .collect()
}

/// An amount of work or a rate in the largest unit that keeps it at
/// least 1 (`26.39 T`, `113.25 M`), for people.
fn scaled(v: u64) -> String {
    let v = v as f64;
    let (x, unit) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(s, _)| v >= *s)
        .map_or((v, ""), |(s, u)| (v / s, u));
    format!("{x:.2} {unit}")
}

/// MFLOP/s for people (`350.29 TFLOP/s`, `86.55 MFLOP/s`, `none`).
fn rate(mflops: u64) -> String {
    if mflops == 0 {
        return "none".into();
    }
    format!("{}FLOP/s", scaled(mflops.saturating_mul(1_000_000)))
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1e3)
}

/// The audit line of a checked answer: outcome and detail.
pub fn judge(
    verdict: &ChallengeVerdict,
    shortfall: Option<&SpeedShortfall>,
) -> (AuditOutcome, String) {
    let mut parts = vec![format!("answered in {}", ms(verdict.round_trip_us))];
    if let Some(s) = shortfall {
        parts.push(format!(
            "too slow for its advert: the advertised speed needs {} for the {}FLOP proven, at most {} allowed",
            ms(s.expected_us),
            scaled(s.proven_flops),
            ms(s.allowed_us)
        ));
    }
    for g in &verdict.gpus {
        let sp = &g.speed;
        parts.push(format!(
            "{}: at least {} observed ({}FLOP proven), {} advertised, {} verified",
            g.uuid,
            rate(sp.observed_mflops),
            scaled(sp.proven_flops),
            rate(sp.advertised_mflops),
            rate(sp.verified_mflops),
        ));
    }
    parts.extend(verdict.flags.iter().map(|f| format!("{f:?}")));
    let outcome = if shortfall.is_some() || !verdict.flags.is_empty() {
        AuditOutcome::Flagged
    } else {
        parts.push("figures as advertised".into());
        AuditOutcome::Passed
    };
    (outcome, parts.join("; "))
}

/// What one challenge came to, before it is recorded.
struct Done {
    outcome: AuditOutcome,
    detail: String,
    verdict: Option<ChallengeVerdict>,
    shortfall: Option<SpeedShortfall>,
    speeds: SpeedUpdate,
}

impl Done {
    fn failed(detail: String, speeds: SpeedUpdate) -> Self {
        Self {
            outcome: AuditOutcome::Failed,
            detail,
            verdict: None,
            shortfall: None,
            speeds,
        }
    }
}

/// Why `advert`'s node cannot be challenged, if its benchmark is of
/// another version than the one this coordinator checks (an advert
/// without a benchmark is challenged: only the answer can tell).
pub fn outdated(advert: &CapabilityAdvert) -> Option<String> {
    let version = advert.benchmark.as_ref()?.version;
    (version != BENCHMARK_VERSION).then(|| {
        format!(
            "not challenged: its advert's benchmark is version {version}, and challenges are \
             checked at version {BENCHMARK_VERSION} (samples bound to the whole output by BLAKE3 \
             inclusion proofs), which it cannot answer: upgrade kiln-node {} to \
             {NODE_VERSION_FOR_BENCHMARK} or later",
            advert.node_version
        )
    })
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
    // Re-measure the CPU at the size the advert was measured at (figures at
    // other sizes are not comparable); size the GPU product from the
    // advertised speed, never below the advert's size.
    let mut sizes = cfg.sizes;
    if let Some(b) = &advert.benchmark {
        sizes.cpu_matmul_n = b.cpu.matmul_n;
        if let Some(g) = b.gpus.first() {
            sizes.gpu_matmul_n = g.matmul_n;
        }
    }
    sizes.gpu_matmul_n = challenge::gpu_matmul_n_for(advert, sizes.gpu_matmul_n, cfg.speed_target);
    // An answer the speed check would pass is never late.
    let timeout = cfg.timeout.max(challenge::allowed_round_trip(
        advert,
        sizes.gpu_matmul_n,
        &cfg.speed,
    ));
    let c = challenge::new_challenge(
        advert.provider,
        Nonce::random(),
        id,
        UnixMillis::now(),
        u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        sizes,
    );
    let signed = Signed::sign(&state.key, c, timeout.as_secs().saturating_add(60));
    let done = match (outdated(advert), signed) {
        // What it once showed was shown by proofs that can be faked.
        (Some(why), _) => Done::failed(why, SpeedUpdate::Clear),
        (None, Err(e)) => Done::failed(
            format!("could not sign the challenge: {e}"),
            SpeedUpdate::Keep,
        ),
        (None, Ok(signed)) => {
            let addrs = advert
                .listen_addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect();
            // The round trip is timed here, on this clock: nothing the
            // provider reports about time is used.
            let sent = Instant::now();
            let answer = tokio::time::timeout(
                timeout,
                state.net.request(
                    advert.provider.peer_id(),
                    addrs,
                    NetRequest::Challenge(signed.clone()),
                ),
            )
            .await;
            let round_trip = sent.elapsed();
            match answer {
                Err(_) => Done::failed(
                    format!("no answer within {}s", timeout.as_secs()),
                    SpeedUpdate::Clear,
                ),
                Ok(Err(e)) => {
                    Done::failed(format!("challenge not delivered: {e}"), SpeedUpdate::Keep)
                }
                Ok(Ok(NetResponse::ChallengeResponse(resp))) => {
                    match challenge::check_response(
                        &signed,
                        &state.key.public(),
                        &resp,
                        advert,
                        UnixMillis::now(),
                        round_trip,
                    ) {
                        Err(e @ challenge::ChallengeError::WrongVersion { .. }) => Done::failed(
                            format!("{e} (it runs kiln-node {})", advert.node_version),
                            SpeedUpdate::Clear,
                        ),
                        Err(e) => Done::failed(e.to_string(), SpeedUpdate::Clear),
                        Ok(mut v) => {
                            v.flags = challenge::assess(&v, advert, fleet);
                            let shortfall = challenge::speed_shortfall(&v, advert, &cfg.speed);
                            let (outcome, detail) = judge(&v, shortfall.as_ref());
                            let rows = speed_records(&v, advert, UnixMillis::now());
                            Done {
                                outcome,
                                detail,
                                verdict: Some(v),
                                shortfall,
                                speeds: SpeedUpdate::Replace(rows),
                            }
                        }
                    }
                }
                Ok(Ok(NetResponse::Rejected { reason })) => Done::failed(
                    format!("refused the challenge: {reason}"),
                    SpeedUpdate::Keep,
                ),
                Ok(Ok(other)) => {
                    Done::failed(format!("answered with {other:?}"), SpeedUpdate::Clear)
                }
            }
        }
    };
    let Done {
        outcome,
        detail,
        verdict,
        shortfall,
        speeds,
    } = done;
    let reputation = record(
        state,
        &advert.provider,
        &id.to_string(),
        outcome,
        &detail,
        &speeds,
    )
    .await?;
    tracing::info!(provider = %advert.provider.short(), outcome = outcome.as_str(), reputation, "{detail}");
    if speeds != SpeedUpdate::Keep {
        // The scheduler sees the new figures now, not at the next heartbeat.
        crate::live::refresh(state, &advert.provider).await?;
        state.wake.notify_one();
    }
    Ok(Audit {
        provider: advert.provider,
        outcome,
        detail,
        reputation,
        verdict,
        speed_shortfall: shortfall,
    })
}

/// Appends the audit, updates reputation and the verified speeds in one
/// transaction.
async fn record(
    state: &AppState,
    provider: &ProviderId,
    challenge_id: &str,
    outcome: AuditOutcome,
    detail: &str,
    speeds: &SpeedUpdate,
) -> Result<u32, DbError> {
    let mut tx = state.db.begin().await?;
    match speeds {
        SpeedUpdate::Replace(rows) => Db::set_gpu_speeds(&mut tx, provider, rows).await?,
        SpeedUpdate::Clear => Db::set_gpu_speeds(&mut tx, provider, &[]).await?,
        SpeedUpdate::Keep => {}
    }
    sqlx::query("INSERT INTO provider_audits (provider, at, challenge_id, outcome, detail) VALUES ($1, $2, $3, $4, $5)")
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
        "UPDATE reputation SET passed = passed + $1, flagged = flagged + $2, failed = failed + $3 WHERE provider = $4",
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
    let rows = sqlx::query("SELECT at, challenge_id, outcome, detail FROM provider_audits WHERE provider = $1 ORDER BY seq DESC LIMIT $2")
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

/// Fleet medians of verified GPU speeds by model, from every GPU's latest
/// challenge (see [`challenge::verified_fleet_medians`]).
pub async fn fleet_medians(state: &AppState) -> BTreeMap<String, Figures> {
    match state.db.verified_speeds().await {
        Ok(rows) => challenge::verified_fleet_medians(&rows),
        Err(e) => {
            tracing::warn!("cannot read verified speeds for fleet medians: {e}");
            BTreeMap::new()
        }
    }
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
        let fleet = fleet_medians(&state).await;
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
    use crate::challenge::GpuSpeed;

    #[test]
    fn audits_move_reputation_from_the_start() {
        use crate::verification::reputation::Evidence;
        let after = |o| Evidence::default().after(reputation_event(o)).score();
        assert!(after(AuditOutcome::Passed) > REPUTATION_START);
        assert!(after(AuditOutcome::Flagged) < REPUTATION_START);
        assert!(after(AuditOutcome::Failed) < after(AuditOutcome::Flagged));
    }

    fn verdict(gpus: Vec<(&str, GpuSpeed)>) -> ChallengeVerdict {
        ChallengeVerdict {
            challenge_id: ChallengeId::from_bytes([1; 16]),
            provider: ProviderId::from_public_key(&kiln_protocol::Keypair::generate().public()),
            round_trip_us: 12_345,
            cpu: Figures::default(),
            gpus: gpus
                .into_iter()
                .map(|(uuid, speed)| challenge::GpuMeasured {
                    uuid: uuid.into(),
                    name: "GPU".into(),
                    figures: Figures::default(),
                    speed,
                })
                .collect(),
            flags: vec![],
        }
    }

    fn speed(observed: u64, advertised: u64) -> GpuSpeed {
        GpuSpeed {
            proven_flops: 26_400_000_000_000,
            observed_mflops: observed,
            advertised_mflops: advertised,
            verified_mflops: observed.min(advertised),
            expected_us: Some(1),
        }
    }

    #[test]
    fn judging_a_checked_answer() {
        let v = verdict(vec![("GPU-a", speed(2_000_000_000, 50_000_000))]);
        let (o, d) = judge(&v, None);
        assert_eq!(o, AuditOutcome::Passed);
        assert_eq!(
            d,
            "answered in 12.3 ms; GPU-a: at least 2000.00 TFLOP/s observed (26.40 TFLOP proven), \
             50.00 TFLOP/s advertised, 50.00 TFLOP/s verified; figures as advertised"
        );
        let slow = verdict(vec![("GPU-a", speed(86_550, 0))]);
        assert!(
            judge(&slow, None).1.contains("at least 86.55 GFLOP/s observed (26.40 TFLOP proven), none advertised, none verified"),
            "{}",
            judge(&slow, None).1
        );
        let short = SpeedShortfall {
            round_trip_us: 12_345,
            expected_us: 500,
            allowed_us: 1_000,
            proven_flops: 26_400_000_000_000,
        };
        let (o, d) = judge(&v, Some(&short));
        assert_eq!(o, AuditOutcome::Flagged);
        assert!(
            d.contains(
                "too slow for its advert: the advertised speed needs 0.5 ms for the 26.40 TFLOP proven, \
                 at most 1.0 ms allowed"
            ),
            "{d}"
        );
        // A figure shortfall alone flags too.
        let mut f = v.clone();
        f.flags.push(challenge::Flag {
            subject: "cpu".into(),
            shortfalls: vec![],
        });
        assert_eq!(judge(&f, None).0, AuditOutcome::Flagged);
    }

    /// An advert with no GPU and no benchmark.
    fn bare_advert() -> CapabilityAdvert {
        CapabilityAdvert {
            provider: ProviderId::from_public_key(&kiln_protocol::Keypair::generate().public()),
            protocol_version: kiln_protocol::PROTOCOL_VERSION,
            node_version: "t".into(),
            listen_addrs: vec![],
            cpu: kiln_protocol::CpuInfo {
                model: "t".into(),
                logical_cores: 1,
                matmul_mflops: 1,
            },
            memory: kiln_protocol::ByteSize(1 << 30),
            gpus: vec![],
            slots: 1,
            price_per_cpu_hour: kiln_protocol::Credits(1),
            price_per_gpu_hour: kiln_protocol::Credits(1),
            runtime: "runc".into(),
            allows_network: false,
            issued_at: UnixMillis(0),
            benchmark: None,
            region: None,
            disk: kiln_protocol::ByteSize(0),
            cached: vec![],
            registries: Vec::new(),
        }
    }

    #[test]
    fn a_node_measuring_an_older_benchmark_is_told_to_upgrade() {
        let mut advert = bare_advert();
        assert_eq!(outdated(&advert), None, "no benchmark: the answer tells");
        let report = |version| kiln_protocol::BenchmarkReport {
            version,
            nonce: Nonce::from_bytes([1; 16]),
            samples: 1,
            cpu: kiln_protocol::CpuBench {
                model: "t".into(),
                threads: 1,
                matmul_n: 16,
                matmul_mflops: 1,
                mem_bandwidth_mbps: 1,
                checksum: kiln_protocol::Digest32::default(),
                samples: vec![],
            },
            gpus: vec![],
            measured_at: UnixMillis(0),
        };
        advert.benchmark = Some(report(BENCHMARK_VERSION));
        assert_eq!(outdated(&advert), None);
        advert.benchmark = Some(report(1));
        advert.node_version = "0.1.0".into();
        let why = outdated(&advert).expect("version 1 is outdated");
        assert!(
            why.contains("benchmark is version 1")
                && why.contains(&format!(
                    "upgrade kiln-node 0.1.0 to {NODE_VERSION_FOR_BENCHMARK} or later"
                )),
            "{why}"
        );
    }

    #[test]
    fn only_advertised_gpus_credited_a_speed_leave_a_row() {
        let v = verdict(vec![
            ("GPU-a", speed(2_000_000_000, 50_000_000)),
            // Nothing advertised for it: no figure.
            ("GPU-b", speed(2_000_000_000, 0)),
            // Not in the advert at all.
            ("GPU-x", speed(2_000_000_000, 50_000_000)),
        ]);
        let mut advert = kiln_protocol::CapabilityAdvert {
            provider: v.provider,
            ..bare_advert()
        };
        for uuid in ["GPU-a", "GPU-b"] {
            advert.gpus.push(kiln_protocol::GpuInfo {
                index: 0,
                uuid: uuid.into(),
                name: "GPU".into(),
                memory_total: kiln_protocol::ByteSize(1 << 30),
                compute_capability: (9, 0),
                driver_version: "1".into(),
                mig: None,
            });
        }
        let rows = speed_records(&v, &advert, UnixMillis(7));
        assert_eq!(rows.len(), 1, "{rows:?}");
        let r = &rows[0];
        assert_eq!(
            (
                r.gpu_uuid.as_str(),
                r.verified_mflops,
                r.observed_mflops,
                r.round_trip_us
            ),
            ("GPU-a", 50_000_000, 2_000_000_000, 12_345)
        );
        assert_eq!(
            (r.at, r.challenge_id.clone()),
            (UnixMillis(7), v.challenge_id.to_string())
        );
    }
}
