//! `kiln sim verification`: spot re-execution against cheating providers,
//! driving the coordinator's real audit decision and verdict code
//! ([`kiln_coordinator::verification`]) over a simulated marketplace.
//!
//! # The model
//!
//! * `providers` slots; a `cheat_fraction` of them hold cheaters. Every
//!   provider posts the same bond (`bond`, default 20 credits).
//! * Jobs go to a slot uniformly at random. A job pays `R`, log-uniform
//!   between `payment_min` and `payment_max` (default 0.5–2 credits: a
//!   15-minute to 1-hour job on a GPU priced at 2 credits an hour), so
//!   `p_econ = R/(R+S)` runs from 2.4% to 9.1% (mean 5.1%).
//! * Each result gets a random receipt hash and goes through
//!   [`verification::decide`] with the provider's bond and verified
//!   record, under one coordinator secret.
//! * **Cheaters pass the ramp first**: they compute honestly until they
//!   have `cheat_after` consecutive verified results, then fabricate each
//!   result with probability `q` (`--cheat-rate`; one scenario per value,
//!   default 1 and 0.5). By default they are **patient**: they start once
//!   their own audit probability `p_trust = 1/CV` has fallen to the
//!   economic floor of a typical job (21 verified results for the
//!   defaults), which gets them the most fabricated results per bond they
//!   lose (about 9 against 5 for starting at N). `--cheat-after trusted`
//!   starts as soon as they are trusted (CV = N): they then face `p = 1/N`,
//!   lose a bond every few jobs, and each new identity costs its N ramp
//!   audits, so the fleet's overhead is higher (1.69× the floor at q = 1)
//!   while their slashed bonds pay for more than their audits (net 0.59×).
//!   Neither strategy pays: both lose more in bonds than they save. A
//!   cheater that fabricates from its first job is caught on it (its
//!   first results are audited with certainty), which shows nothing about
//!   the curve.
//! * An audited result is re-executed by a provider drawn at random among
//!   the others. Honest executions of a (deterministic) job agree; every
//!   fabricated output is distinct (no collusion). A cheater in its
//!   cheating phase fabricates a re-execution it runs with the same
//!   probability `q`: it cannot tell a re-run from a job. While no output
//!   is backed by two executions, one more provider (drawn among those not
//!   yet involved) runs it, up to `max_executions` in all (default 4: the
//!   issue's original + verifier + one tie-breaker, and one more for the
//!   rare case where two of the three fabricated, as the coordinator does
//!   for `exact` jobs); the coordinator's own [`verification::tally`]
//!   decides; at the cap nobody is slashed.
//! * **Caught** (outvoted): the identity is slashed (its whole bond) and
//!   leaves. With `rejoin` (the default: the whitewashing worst case) the
//!   same cheater comes back at once as a fresh identity with a fresh bond
//!   and no record, so 5% of the fleet cheats throughout; with
//!   `--cheaters-leave` the slot goes to an honest newcomer. Only a
//!   provider's own audited results build its trust (a verifier's re-run
//!   does not: nobody farms trust by verifying).
//! * **Steady state**: the fleet first runs a warm-up (default 300 jobs
//!   per provider, about two weeks of hour-long jobs) that is not
//!   measured, so established providers' trust has settled; the overhead
//!   is measured over the next `jobs` jobs. The cold-start overhead (over
//!   the warm-up, from an empty marketplace) is reported next to it. The
//!   run then goes on, counting no overhead, until at least
//!   `--detection-identities` (10,000) identities have begun cheating, so
//!   the detection curve rests on enough of them (patient cheaters live
//!   long, so 1M jobs hold only about a thousand).
//!
//! # What it reports
//!
//! * Audit overhead: extra executions (re-runs and tie-breaks) per job,
//!   next to the economic floor's (the mean `p_econ` of the same jobs) and
//!   their ratio, for the whole fleet and split between honest and
//!   cheating slots; and the same in credits, net of the bonds slashed.
//! * For each cheating identity: the fabricated results it was paid for
//!   before it was caught (mean, median, p90), and the detection curve
//!   `P(caught within n results since it began cheating)` against
//!   `1 − (1 − p·q)ⁿ`, with `p` the mean audit probability of the results
//!   cheaters returned while cheating (and against `1 − Π(1 − p_k·q)`
//!   with `p_k` the mean of the k-th results, since `p` drifts at
//!   `q < 1`). The empirical curve is the Kaplan–Meier estimate of being
//!   caught by an audit of its own results, in which an identity still
//!   cheating when the run ends, or caught fabricating a re-run it was
//!   asked to run, counts as having survived the results it returned so
//!   far.
//! * Honest executions outvoted (must be 0).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure};
use clap::{Args, Subcommand};
use kiln_coordinator::verification::{
    self, AuditInputs, AuditOutcome, AuditPolicy, AuditSecret, Mark, Ppm, RankVotes, ReceiptHash,
    Tally, TrustState,
};
use kiln_protocol::Credits;
use serde::Serialize;

/// `kiln sim …`
#[derive(Clone, Debug, Subcommand)]
pub enum SimCmd {
    /// Spot re-execution against cheating providers: audit overhead,
    /// detection, honest providers slashed.
    Verification(VerificationArgs),
}

/// `kiln sim verification` options.
#[derive(Clone, Debug, Args)]
pub struct VerificationArgs {
    /// Simulated providers.
    #[arg(long, default_value_t = 10_000)]
    pub providers: usize,
    /// Fraction of providers that cheat.
    #[arg(long, default_value_t = 0.05)]
    pub cheat_fraction: f64,
    /// Jobs measured (after the warm-up).
    #[arg(long, default_value_t = 1_000_000)]
    pub jobs: u64,
    /// Warm-up jobs per provider before measuring.
    #[arg(long, default_value_t = 300)]
    pub warmup_per_provider: u64,
    /// Seed of the simulation (the same seed gives the same report).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// q: the fraction of its results a cheater fabricates once it
    /// cheats; one scenario per value.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1.0, 0.5])]
    pub cheat_rate: Vec<f64>,
    /// When a cheater starts: `patient` (the default) once its own audit
    /// probability has fallen to the economic floor of a typical job,
    /// which gets it the most fabricated results per bond it loses;
    /// `trusted` as soon as it has N verified results (it faces p = 1/N,
    /// loses a bond every few jobs and costs an N-audit ramp per
    /// identity); or a number of consecutive verified results.
    #[arg(long, default_value = "patient", value_parser = parse_cheat_after)]
    pub cheat_after: CheatAfter,
    /// Cheating identities the detection curve is measured over: the run
    /// goes on past the measured jobs (without counting their overhead)
    /// until this many have begun cheating, so the Kaplan–Meier curve is
    /// good to about ±1 pp.
    #[arg(long, default_value_t = 10_000)]
    pub detection_identities: u64,
    /// A caught cheater is replaced by an honest newcomer instead of
    /// coming back as a fresh identity.
    #[arg(long)]
    pub cheaters_leave: bool,
    /// Executions of an audited job at most, original included (3: one
    /// tie-breaker, then inconclusive).
    #[arg(long, default_value_t = 4)]
    pub max_executions: usize,
    /// N: results audited with certainty until this many consecutive
    /// verified ones.
    #[arg(long, default_value_t = AuditPolicy::DEFAULT.trust_threshold)]
    pub trust_threshold: u32,
    /// p_min, as a fraction.
    #[arg(long, default_value_t = AuditPolicy::DEFAULT.p_min.as_f64())]
    pub p_min: f64,
    /// What a cheater saves, as a fraction of the payment.
    #[arg(long, default_value_t = 1.0)]
    pub cost_fraction: f64,
    /// Each provider's bond, in credits.
    #[arg(long, default_value_t = 20.0)]
    pub bond: f64,
    /// Least job payment, in credits.
    #[arg(long, default_value_t = 0.5)]
    pub payment_min: f64,
    /// Largest job payment, in credits.
    #[arg(long, default_value_t = 2.0)]
    pub payment_max: f64,
    /// Where the report goes (`verification.{json,md}`).
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
}

/// When cheaters begin cheating (`--cheat-after`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheatAfter {
    /// Once p_trust ≤ p_econ of a job at the geometric mean payment.
    Patient,
    /// Once trusted (CV = N).
    Trusted,
    /// After this many consecutive verified results.
    Results(u32),
}

fn parse_cheat_after(s: &str) -> Result<CheatAfter, String> {
    match s {
        "patient" => Ok(CheatAfter::Patient),
        "trusted" => Ok(CheatAfter::Trusted),
        n => n.parse().map(CheatAfter::Results).map_err(|_| {
            format!("`{n}`: say `patient`, `trusted` or a number of verified results")
        }),
    }
}

/// The consecutive verified results after which a cheater's own audit
/// probability is down to the economic floor of a typical job (the one
/// paying the geometric mean of the payment range): cheating any earlier
/// faces `p_trust = 1/CV` above the floor, so fewer fabricated results per
/// bond lost. At least N.
pub fn patient_cheat_after(
    policy: &AuditPolicy,
    bond: Credits,
    payment_min: Credits,
    payment_max: Credits,
) -> u32 {
    let typical = Credits(
        ((payment_min.0 as f64) * (payment_max.0 as f64))
            .sqrt()
            .round() as u64,
    );
    let floor = verification::probabilities(typical, bond, TrustState::NEW, policy).p_econ;
    let mut cv = policy.trust_threshold;
    while cv < 1_000_000 && TrustState::new(cv).p_trust(policy) > floor {
        cv += 1;
    }
    cv
}

/// One scenario's parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimConfig {
    pub providers: usize,
    pub cheat_fraction: f64,
    pub jobs: u64,
    pub warmup_jobs: u64,
    pub seed: u64,
    /// q.
    pub cheat_rate: f64,
    pub cheat_after: u32,
    /// Whether `cheat_after` is the patient start (see
    /// [`patient_cheat_after`]).
    pub patient: bool,
    /// The run goes on past `jobs` until this many identities have begun
    /// cheating (for the detection curve only).
    pub detection_identities: u64,
    pub rejoin: bool,
    /// Executions of an audited job at most (original included) before
    /// it is called inconclusive: 3 is the original, the verifier and one
    /// tie-breaker; more keep adding executions while no output is backed
    /// by two (deterministic jobs).
    pub max_executions: usize,
    pub bond: Credits,
    pub payment_min: Credits,
    pub payment_max: Credits,
    pub policy: AuditPolicy,
}

impl SimConfig {
    /// The documented defaults, at a given size.
    pub fn new(providers: usize, jobs: u64, seed: u64) -> Self {
        let policy = AuditPolicy::DEFAULT;
        Self {
            providers,
            cheat_fraction: 0.05,
            jobs,
            warmup_jobs: 300 * providers as u64,
            seed,
            cheat_rate: 1.0,
            cheat_after: patient_cheat_after(
                &policy,
                Credits(20_000_000),
                Credits(500_000),
                Credits(2_000_000),
            ),
            patient: true,
            detection_identities: 0,
            rejoin: true,
            max_executions: verification::rounds::MAX_ROUNDS_EXACT,
            bond: Credits(20_000_000),
            payment_min: Credits(500_000),
            payment_max: Credits(2_000_000),
            policy,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.providers >= 3,
            "--providers must be at least 3 (an original, a verifier and a tie-breaker)"
        );
        ensure!(
            (0.0..=1.0).contains(&self.cheat_fraction),
            "--cheat-fraction must be between 0 and 1"
        );
        ensure!(
            (0.0..=1.0).contains(&self.cheat_rate) && self.cheat_rate > 0.0,
            "--cheat-rate values must be in (0, 1]"
        );
        ensure!(
            self.payment_min.0 > 0 && self.payment_min <= self.payment_max,
            "need 0 < --payment-min <= --payment-max"
        );
        ensure!(self.jobs > 0, "--jobs must be positive");
        ensure!(
            (3..=self.providers).contains(&self.max_executions),
            "--max-executions must be at least 3 and at most --providers"
        );
        Ok(())
    }
}

fn credits(x: f64, flag: &str) -> anyhow::Result<Credits> {
    if !(0.0..1e12).contains(&x) {
        bail!("{flag} must be a number of credits (got {x})");
    }
    Ok(Credits((x * 1e6).round() as u64))
}

fn ppm(x: f64, flag: &str) -> anyhow::Result<Ppm> {
    if !(0.0..=1.0).contains(&x) {
        bail!("{flag} must be a fraction between 0 and 1 (got {x})");
    }
    Ppm::new((x * 1e6).round() as u32).ok_or_else(|| anyhow::anyhow!("{flag} out of range"))
}

impl VerificationArgs {
    /// One scenario per `--cheat-rate`.
    pub fn scenarios(&self) -> anyhow::Result<Vec<SimConfig>> {
        let policy = AuditPolicy {
            cost_fraction: ppm(self.cost_fraction, "--cost-fraction")?,
            trust_threshold: self.trust_threshold,
            p_min: ppm(self.p_min, "--p-min")?,
            max_slash: None,
        };
        let mut base = SimConfig {
            providers: self.providers,
            cheat_fraction: self.cheat_fraction,
            jobs: self.jobs,
            warmup_jobs: self
                .warmup_per_provider
                .saturating_mul(self.providers as u64),
            seed: self.seed,
            cheat_rate: 1.0,
            cheat_after: 0,
            patient: self.cheat_after == CheatAfter::Patient,
            detection_identities: self.detection_identities,
            rejoin: !self.cheaters_leave,
            max_executions: self.max_executions,
            bond: credits(self.bond, "--bond")?,
            payment_min: credits(self.payment_min, "--payment-min")?,
            payment_max: credits(self.payment_max, "--payment-max")?,
            policy,
        };
        base.cheat_after = match self.cheat_after {
            CheatAfter::Patient => {
                patient_cheat_after(&base.policy, base.bond, base.payment_min, base.payment_max)
            }
            CheatAfter::Trusted => self.trust_threshold,
            CheatAfter::Results(n) => n,
        };
        ensure!(
            !self.cheat_rate.is_empty(),
            "give at least one --cheat-rate"
        );
        self.cheat_rate
            .iter()
            .map(|&q| {
                let c = SimConfig {
                    cheat_rate: q,
                    ..base.clone()
                };
                c.validate()?;
                Ok(c)
            })
            .collect()
    }

    fn command(&self) -> String {
        let mut c = format!(
            "kiln sim verification --providers {} --cheat-fraction {} --jobs {} --seed {}",
            self.providers, self.cheat_fraction, self.jobs, self.seed
        );
        let rates: Vec<String> = self.cheat_rate.iter().map(f64::to_string).collect();
        let _ = write!(c, " --cheat-rate {}", rates.join(","));
        let _ = write!(c, " --warmup-per-provider {}", self.warmup_per_provider);
        let _ = write!(c, " --max-executions {}", self.max_executions);
        let _ = write!(
            c,
            " --cheat-after {}",
            match self.cheat_after {
                CheatAfter::Patient => "patient".to_string(),
                CheatAfter::Trusted => "trusted".to_string(),
                CheatAfter::Results(n) => n.to_string(),
            }
        );
        let _ = write!(c, " --detection-identities {}", self.detection_identities);
        if self.cheaters_leave {
            c.push_str(" --cheaters-leave");
        }
        c
    }
}

/// SplitMix64: seeded and fast; the simulation's only randomness besides
/// the audit draw itself.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `0..n` (n > 0), by multiply-shift.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    fn receipt(&mut self) -> ReceiptHash {
        let mut b = [0u8; 32];
        for chunk in b.chunks_exact_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        ReceiptHash::from_bytes(b)
    }
}

/// One provider identity in a slot.
#[derive(Clone, Copy, Debug, Default)]
struct Identity {
    trust: TrustState,
    /// In its cheating phase.
    cheating: bool,
    /// Results returned since it began cheating.
    n: u32,
    /// Fabricated results accepted without an audit.
    got_away: u32,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    cheater: bool,
    id: Identity,
}

/// Running sums over a set of jobs.
#[derive(Clone, Copy, Debug, Default)]
struct Sums {
    jobs: u64,
    extra: u64,
    p: f64,
    p_econ: f64,
    /// Credits paid for the jobs, for their extra executions (each costs
    /// what the job pays), for the floor's expected audits, and slashed.
    paid: f64,
    extra_cost: f64,
    floor_cost: f64,
    slashed: f64,
}

impl Sums {
    fn add(&mut self, p: Ppm, p_econ: Ppm, extra: u64, payment: Credits, slashed: Credits) {
        let r = payment.0 as f64 / 1e6;
        self.jobs += 1;
        self.extra += extra;
        self.p += p.as_f64();
        self.p_econ += p_econ.as_f64();
        self.paid += r;
        self.extra_cost += extra as f64 * r;
        self.floor_cost += p_econ.as_f64() * r;
        self.slashed += slashed.0 as f64 / 1e6;
    }
    fn view(&self) -> OverheadView {
        let n = self.jobs.max(1) as f64;
        let extra = self.extra as f64 / n;
        let floor = self.p_econ / n;
        OverheadView {
            jobs: self.jobs,
            extra_executions: self.extra,
            extra_per_job: extra,
            expected_audits_per_job: self.p / n,
            econ_floor_per_job: floor,
            ratio_to_floor: (floor > 0.0).then(|| extra / floor),
            paid: self.paid,
            extra_cost: self.extra_cost,
            floor_cost: self.floor_cost,
            slashed: self.slashed,
        }
    }
}

/// Overhead over a set of jobs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OverheadView {
    pub jobs: u64,
    /// Re-executions plus tie-breaks.
    pub extra_executions: u64,
    pub extra_per_job: f64,
    /// The mean audit probability `p` (what `extra_per_job` should be,
    /// less tie-breaks).
    pub expected_audits_per_job: f64,
    /// The mean `p_econ`: the overhead the economic floor alone implies.
    pub econ_floor_per_job: f64,
    /// `extra_per_job / econ_floor_per_job` (none without a floor).
    pub ratio_to_floor: Option<f64>,
    /// Credits paid for these jobs.
    pub paid: f64,
    /// Credits their extra executions cost (each what its job pays).
    pub extra_cost: f64,
    /// Credits the floor's audits would cost (`Σ p_econ × R`).
    pub floor_cost: f64,
    /// Bonds slashed from caught identities while these jobs ran.
    pub slashed: f64,
}

impl OverheadView {
    /// Audit cost per credit of jobs, less what slashed bonds recover,
    /// relative to the floor's cost.
    pub fn net_cost_ratio(&self) -> Option<f64> {
        (self.floor_cost > 0.0).then(|| (self.extra_cost - self.slashed) / self.floor_cost)
    }
}

/// Audit overhead, steady state and cold start.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Overhead {
    /// The measured jobs (after the warm-up).
    pub steady: OverheadView,
    /// Of those, jobs of honest slots.
    pub steady_honest_slots: OverheadView,
    /// Of those, jobs of cheating slots (ramps of re-entering identities
    /// included).
    pub steady_cheater_slots: OverheadView,
    /// The warm-up, from an empty marketplace.
    pub cold_start: OverheadView,
    pub tie_breaks: u64,
    /// Extra executions per job in ten equal windows of the whole run.
    pub by_window: Vec<f64>,
}

/// Summary of a sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Spread {
    pub n: usize,
    pub mean: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
}

fn spread(mut xs: Vec<u32>) -> Spread {
    xs.sort_unstable();
    let n = xs.len();
    if n == 0 {
        return Spread::default();
    }
    let at = |p: f64| f64::from(xs[((n as f64 - 1.0) * p).round() as usize]);
    Spread {
        n,
        mean: xs.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64,
        median: at(0.5),
        p90: at(0.9),
        max: at(1.0),
    }
}

/// What happened to cheating identities.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cheaters {
    /// Identities that began cheating.
    pub identities: u64,
    /// Outvoted on one of their own results.
    pub caught_by_audit: u64,
    /// Outvoted on a re-run they fabricated as verifier.
    pub caught_as_verifier: u64,
    /// Still cheating when the run ended.
    pub at_large_at_end: u64,
    /// Audits of a fabricated result that ended without a majority (the
    /// verifier fabricated too): nobody slashed.
    pub no_majority: u64,
    /// Fabricated results each caught identity was paid for before it was
    /// caught.
    pub got_away: Spread,
    /// The same, for those caught by an audit of their own results.
    pub got_away_caught_by_audit: Spread,
    /// `(1 − p)/p`: the expected number for those, with `p` the mean below.
    pub got_away_expected: Option<f64>,
    /// Mean audit probability of the results cheaters returned while
    /// cheating.
    pub mean_p_while_cheating: f64,
}

/// One point of the detection curve.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CurvePoint {
    pub n: u32,
    /// Identities still cheating at their n-th result.
    pub at_risk: u64,
    pub empirical: f64,
    /// `1 − (1 − p·q)ⁿ` with `p` the mean over all cheating results.
    pub analytic: f64,
    /// `1 − Π_{k≤n} (1 − p_k·q)` with `p_k` the mean `p` of the k-th
    /// results: the same formula when `p` drifts (at q < 1 a cheater's
    /// honest results that pass an audit raise its trust and lower `p`).
    pub analytic_stepwise: f64,
}

/// The detection curve against `1 − (1 − p·q)ⁿ`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Detection {
    pub p: f64,
    pub q: f64,
    /// n from 1 to where the analytic curve reaches 99% (while at least
    /// 100 identities are at risk).
    pub n_max: u32,
    pub max_abs_diff_pp: f64,
    pub at_n_of_max_diff: u32,
    /// The largest gap to the stepwise curve.
    pub max_abs_diff_stepwise_pp: f64,
    pub points: Vec<CurvePoint>,
}

/// Honest providers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Honest {
    /// Honest executions outvoted (the original or the verifier): must be 0.
    pub wrongly_slashed: u64,
    /// Audits where an honest original met a fabricating verifier.
    pub disputes_against_honest: u64,
    /// Of those, decided for the honest original.
    pub disputes_won: u64,
}

/// The acceptance figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Acceptance {
    pub detection_within_2pp: bool,
    pub steady_overhead_at_most_10pct: bool,
    pub within_1_2x_of_floor: bool,
    pub no_honest_slashed: bool,
}

/// One scenario's results.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScenarioReport {
    pub config: SimConfig,
    pub overhead: Overhead,
    pub cheaters: Cheaters,
    pub detection: Detection,
    pub honest: Honest,
    pub acceptance: Acceptance,
}

/// Every identity that began cheating leaves exactly one of these.
#[derive(Default)]
struct Exits {
    /// Caught by an audit of its own n-th cheating-phase result.
    events: Vec<u64>,
    /// Left the risk set after surviving n results.
    censored: Vec<u64>,
}

impl Exits {
    fn bump(v: &mut Vec<u64>, n: u32) {
        let n = n as usize;
        if v.len() <= n {
            v.resize(n + 1, 0);
        }
        v[n] += 1;
    }
    fn event(&mut self, n: u32) {
        Self::bump(&mut self.events, n);
    }
    fn censor(&mut self, n: u32) {
        Self::bump(&mut self.censored, n);
    }
    /// Kaplan–Meier `P(caught within n)` for n = 1..=len, with the number at risk.
    fn curve(&self) -> Vec<(u32, u64, f64)> {
        let len = self.events.len().max(self.censored.len());
        let get = |v: &Vec<u64>, i: usize| v.get(i).copied().unwrap_or(0);
        let mut at_risk: u64 = (1..len)
            .map(|i| get(&self.events, i) + get(&self.censored, i))
            .sum();
        let mut survive = 1.0;
        let mut out = Vec::with_capacity(len);
        for n in 1..len {
            let d = get(&self.events, n);
            if at_risk > 0 {
                survive *= 1.0 - d as f64 / at_risk as f64;
            }
            out.push((n as u32, at_risk, 1.0 - survive));
            at_risk -= d + get(&self.censored, n);
        }
        out
    }
}

/// Runs one scenario.
pub fn simulate(c: &SimConfig) -> anyhow::Result<ScenarioReport> {
    c.validate()?;
    let mut rng = Rng(c.seed ^ 0x6b69_6c6e_5f73_696d);
    let secret = AuditSecret::derive(&c.seed.to_le_bytes(), 0);
    let n_cheaters = (c.providers as f64 * c.cheat_fraction).round() as usize;
    let mut slots: Vec<Slot> = (0..c.providers)
        .map(|i| Slot {
            cheater: i < n_cheaters,
            id: Identity::default(),
        })
        .collect();
    let (ln_lo, ln_hi) = ((c.payment_min.0 as f64).ln(), (c.payment_max.0 as f64).ln());
    let q = c.cheat_rate;
    let total = c.warmup_jobs + c.jobs;
    let window = total.div_ceil(10).max(1);
    let mut windows = vec![Sums::default(); 10];
    let (mut who, mut outputs, mut forged) = (Vec::new(), Vec::<u64>::new(), Vec::new());

    let (mut steady, mut steady_honest, mut steady_cheat, mut cold) = (
        Sums::default(),
        Sums::default(),
        Sums::default(),
        Sums::default(),
    );
    let mut exits = Exits::default();
    let (mut got_away, mut got_away_own) = (Vec::new(), Vec::new());
    let (mut identities, mut by_audit, mut as_verifier, mut no_majority) = (0u64, 0u64, 0u64, 0u64);
    let (mut tie_breaks, mut wrongly, mut disputes, mut won) = (0u64, 0u64, 0u64, 0u64);
    let (mut p_cheating_sum, mut p_cheating_n) = (0.0f64, 0u64);
    // (Σ p, count) of cheating identities' k-th results.
    let mut p_by_n: Vec<(f64, u64)> = Vec::new();

    // Whether slot `s` fabricates this execution (decided per execution).
    let fabricates = |slot: &Slot, rng: &mut Rng| slot.id.cheating && rng.chance(q);
    // A fabricated output: distinct from the honest one (0) and from
    // every other fabrication.
    let fake = |rng: &mut Rng| rng.next() | 1;

    // Past `total`, only the detection curve is still being measured.
    let detection_cap = total.saturating_mul(50);
    let mut j = 0u64;
    loop {
        if j >= total
            && (n_cheaters == 0 || identities >= c.detection_identities || j >= detection_cap)
        {
            break;
        }
        let measured = j < total;
        j += 1;
        let j = j - 1;
        let i = rng.below(c.providers);
        let payment = Credits((ln_lo + rng.unit() * (ln_hi - ln_lo)).exp().round() as u64);
        {
            let s = &mut slots[i];
            if s.cheater && !s.id.cheating && s.id.trust.consecutive_verified >= c.cheat_after {
                s.id.cheating = true;
                identities += 1;
            }
            if s.id.cheating {
                s.id.n += 1;
            }
        }
        let cheats = fabricates(&slots[i], &mut rng);
        let inputs = AuditInputs {
            receipt_hash: rng.receipt(),
            payment,
            bond: c.bond,
            trust: slots[i].id.trust,
        };
        let d = verification::decide(&inputs, &c.policy, &secret);
        if slots[i].id.cheating {
            p_cheating_sum += d.p().as_f64();
            p_cheating_n += 1;
            let k = slots[i].id.n as usize;
            if p_by_n.len() <= k {
                p_by_n.resize(k + 1, (0.0, 0));
            }
            p_by_n[k].0 += d.p().as_f64();
            p_by_n[k].1 += 1;
        }
        let mut extra = 0u64;
        let mut slashed = Credits(0);
        if d.audited {
            // Executions: the original, the verifier, then tie-breakers
            // until an output is backed by two (or the cap).
            who.clear();
            outputs.clear();
            forged.clear();
            who.push(i);
            outputs.push(if cheats { fake(&mut rng) } else { 0 });
            forged.push(cheats);
            let verdict = loop {
                if who.len() >= 2 {
                    let votes = [RankVotes::of_outputs(&outputs)];
                    let t = verification::tally(&votes, outputs.len(), c.max_executions, &[]);
                    if let Tally::Final(f) = t {
                        break f;
                    }
                }
                let next = loop {
                    let t = rng.below(c.providers);
                    if !who.contains(&t) {
                        break t;
                    }
                };
                let f = fabricates(&slots[next], &mut rng);
                who.push(next);
                outputs.push(if f { fake(&mut rng) } else { 0 });
                forged.push(f);
                extra += 1;
            };
            if measured {
                tie_breaks += extra.saturating_sub(1);
            }
            if !cheats && forged[1..].iter().any(|&f| f) {
                disputes += 1;
                won += u64::from(verdict.marks[0][0] == Mark::Right);
            }
            if cheats && verdict.nondeterministic() {
                no_majority += 1;
            }
            slots[i].id.trust = slots[i].id.trust.after(verdict.marks[0][0].outcome());
            for k in 0..who.len() {
                if verdict.marks[k][0].outcome() != AuditOutcome::Failed {
                    continue;
                }
                let own = k == 0;
                let s = &mut slots[who[k]];
                if !forged[k] {
                    wrongly += 1;
                }
                if s.id.cheating {
                    if own {
                        exits.event(s.id.n);
                        by_audit += 1;
                        got_away_own.push(s.id.got_away);
                    } else {
                        exits.censor(s.id.n);
                        as_verifier += 1;
                    }
                    got_away.push(s.id.got_away);
                }
                if s.cheater && !c.rejoin {
                    s.cheater = false;
                }
                s.id = Identity::default();
                slashed = Credits(slashed.0 + c.bond.0);
            }
        } else if cheats {
            slots[i].id.got_away += 1;
        }
        if !measured {
            continue;
        }
        let add =
            |sums: &mut Sums| sums.add(d.p(), d.probabilities.p_econ, extra, payment, slashed);
        add(&mut windows[(j / window) as usize]);
        if j < c.warmup_jobs {
            add(&mut cold);
        } else {
            add(&mut steady);
            // The slot's kind after the job: a caught cheater's slot stays
            // a cheater's slot while it rejoins.
            if slots[i].cheater || (cheats && !c.rejoin) {
                add(&mut steady_cheat);
            } else {
                add(&mut steady_honest);
            }
        }
    }
    let mut at_large = 0;
    for s in &slots {
        if s.id.cheating {
            exits.censor(s.id.n);
            at_large += 1;
        }
    }

    let p = if p_cheating_n > 0 {
        p_cheating_sum / p_cheating_n as f64
    } else {
        0.0
    };
    let analytic = |n: u32| 1.0 - (1.0 - p * q).powi(n as i32);
    let mut points = Vec::new();
    let mut survive_stepwise = 1.0;
    for (n, at_risk, empirical) in exits.curve() {
        if at_risk < 100 {
            break;
        }
        let p_n = match p_by_n.get(n as usize) {
            Some(&(sum, count)) if count > 0 => sum / count as f64,
            _ => p,
        };
        survive_stepwise *= 1.0 - p_n * q;
        points.push(CurvePoint {
            n,
            at_risk,
            empirical,
            analytic: analytic(n),
            analytic_stepwise: 1.0 - survive_stepwise,
        });
        if analytic(n) >= 0.99 {
            break;
        }
    }
    let (max_diff, at_n) = points
        .iter()
        .map(|pt| ((pt.empirical - pt.analytic).abs() * 100.0, pt.n))
        .fold((0.0f64, 0u32), |a, b| if b.0 > a.0 { b } else { a });
    let max_diff_stepwise = points
        .iter()
        .map(|pt| (pt.empirical - pt.analytic_stepwise).abs() * 100.0)
        .fold(0.0f64, f64::max);
    let detection = Detection {
        p,
        q,
        n_max: points.last().map_or(0, |pt| pt.n),
        max_abs_diff_pp: max_diff,
        at_n_of_max_diff: at_n,
        max_abs_diff_stepwise_pp: max_diff_stepwise,
        points,
    };
    let steady_view = steady.view();
    let acceptance = Acceptance {
        detection_within_2pp: !detection.points.is_empty() && detection.max_abs_diff_pp <= 2.0,
        steady_overhead_at_most_10pct: steady_view.extra_per_job <= 0.10,
        within_1_2x_of_floor: steady_view.ratio_to_floor.is_some_and(|r| r <= 1.2),
        no_honest_slashed: wrongly == 0,
    };
    Ok(ScenarioReport {
        config: c.clone(),
        overhead: Overhead {
            steady: steady_view,
            steady_honest_slots: steady_honest.view(),
            steady_cheater_slots: steady_cheat.view(),
            cold_start: cold.view(),
            tie_breaks,
            by_window: windows.iter().map(|w| w.view().extra_per_job).collect(),
        },
        cheaters: Cheaters {
            identities,
            caught_by_audit: by_audit,
            caught_as_verifier: as_verifier,
            at_large_at_end: at_large,
            no_majority,
            got_away: spread(got_away),
            got_away_caught_by_audit: spread(got_away_own),
            got_away_expected: (p > 0.0).then(|| (1.0 - p) / p),
            mean_p_while_cheating: p,
        },
        detection,
        honest: Honest {
            wrongly_slashed: wrongly,
            disputes_against_honest: disputes,
            disputes_won: won,
        },
        acceptance,
    })
}

/// The machine it ran on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Machine {
    pub cpus: usize,
}

/// `kiln sim verification`'s report (`verification.json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VerificationReport {
    pub simulation: &'static str,
    pub command: String,
    pub scenarios: Vec<ScenarioReport>,
    pub elapsed_s: f64,
    pub machine: Machine,
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

fn times(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".to_string(), |x| format!("{x:.2}×"))
}

fn mark(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

/// The markdown report.
pub fn markdown(r: &VerificationReport) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# kiln sim verification\n\n`{}`\n", r.command);
    if let Some(s) = r.scenarios.first() {
        let c = &s.config;
        let _ = writeln!(
            m,
            "{} providers ({} cheating), {} measured jobs after a warm-up of {}; payment {}–{} \
             log-uniform, bond {}; N = {}, p_min = {}, cost fraction {}; cheaters start once they \
             have {} verified results{} and {} when caught; the detection curve is measured over \
             at least {} cheating identities. {:.1} s on {} CPUs.\n",
            c.providers,
            pct(c.cheat_fraction),
            c.jobs,
            c.warmup_jobs,
            c.payment_min,
            c.payment_max,
            c.bond,
            c.policy.trust_threshold,
            c.policy.p_min,
            c.policy.cost_fraction,
            c.cheat_after,
            if c.patient {
                " (patient: from there their own audit probability is the economic floor's, the \
                 most fabricated results per bond lost; `--cheat-after trusted` starts at N)"
            } else {
                ""
            },
            if c.rejoin {
                "come back as a fresh identity"
            } else {
                "are replaced by an honest newcomer"
            },
            c.detection_identities,
            r.elapsed_s,
            r.machine.cpus,
        );
    }
    let _ = writeln!(
        m,
        "## Audit overhead (extra executions per job)\n\n\
         | q | steady state | econ floor | ratio | honest slots (ratio) | cheating slots | cold start | \
         cost net of slashed bonds / floor's cost |\n|---|---|---|---|---|---|---|---|"
    );
    for s in &r.scenarios {
        let o = &s.overhead;
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} ({}) | {} | {} | {} |",
            s.config.cheat_rate,
            pct(o.steady.extra_per_job),
            pct(o.steady.econ_floor_per_job),
            times(o.steady.ratio_to_floor),
            pct(o.steady_honest_slots.extra_per_job),
            times(o.steady_honest_slots.ratio_to_floor),
            pct(o.steady_cheater_slots.extra_per_job),
            pct(o.cold_start.extra_per_job),
            times(o.steady.net_cost_ratio()),
        );
    }
    let _ = writeln!(
        m,
        "\n## Cheaters\n\n| q | identities | caught by audit | caught as verifier | at large | no majority | \
         got away: mean / median / p90 (all caught) | caught by audit ((1 − p)/p: own audits alone) | detection p | \
         max \\|Δ\\| vs 1 − (1 − pq)ⁿ (n ≤) | honest slashed |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in &r.scenarios {
        let ch = &s.cheaters;
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | {:.2} / {} / {} | {:.2} / {} / {} ({}) | {} | {:.2} pp ({}) | {} |",
            s.config.cheat_rate,
            ch.identities,
            ch.caught_by_audit,
            ch.caught_as_verifier,
            ch.at_large_at_end,
            ch.no_majority,
            ch.got_away.mean,
            ch.got_away.median,
            ch.got_away.p90,
            ch.got_away_caught_by_audit.mean,
            ch.got_away_caught_by_audit.median,
            ch.got_away_caught_by_audit.p90,
            ch.got_away_expected
                .map_or_else(|| "n/a".to_string(), |x| format!("{x:.2}")),
            pct(s.detection.p),
            s.detection.max_abs_diff_pp,
            s.detection.n_max,
            s.honest.wrongly_slashed,
        );
    }
    let _ = writeln!(m, "\n## Acceptance\n");
    let _ = writeln!(
        m,
        "| q | detection within ±2 pp | steady overhead ≤ 10% | ≤ 1.2× floor | no honest slashed |\n|---|---|---|---|---|"
    );
    for s in &r.scenarios {
        let a = &s.acceptance;
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} |",
            s.config.cheat_rate,
            mark(a.detection_within_2pp),
            mark(a.steady_overhead_at_most_10pct),
            mark(a.within_1_2x_of_floor),
            mark(a.no_honest_slashed),
        );
    }
    for s in &r.scenarios {
        let d = &s.detection;
        let _ = writeln!(
            m,
            "\n## Detection, q = {} (p = {})\n\nMax |Δ| {:.2} pp against 1 − (1 − pq)ⁿ, {:.2} pp against 1 − Π(1 − p_k q) \
             with p_k the mean p of cheaters' k-th results.\n\n\
             | n | at risk | P(caught within n) | 1 − (1 − pq)ⁿ | 1 − Π(1 − p_k q) |\n|---|---|---|---|---|",
            d.q,
            pct(d.p),
            d.max_abs_diff_pp,
            d.max_abs_diff_stepwise_pp,
        );
        for pt in d.points.iter().filter(|pt| {
            pt.n <= 5 || pt.n % 5 == 0 || pt.n == d.n_max || pt.n == d.at_n_of_max_diff
        }) {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} |",
                pt.n,
                pt.at_risk,
                pct(pt.empirical),
                pct(pt.analytic),
                pct(pt.analytic_stepwise),
            );
        }
        let w: Vec<String> = s.overhead.by_window.iter().map(|x| pct(*x)).collect();
        let _ = writeln!(
            m,
            "\nOverhead in ten windows of the whole run (warm-up first): {}",
            w.join(", ")
        );
    }
    m
}

/// A few lines per scenario, for the terminal.
pub fn summary(r: &VerificationReport, out: &Path) -> String {
    let mut t = String::new();
    for s in &r.scenarios {
        let o = &s.overhead;
        let ch = &s.cheaters;
        let a = &s.acceptance;
        let _ = writeln!(
            t,
            "q={}: steady-state overhead {} extra executions/job; econ floor {}, ratio {} \
             (honest slots {} = {} their floor; cheating slots {}); cold start {}; \
             cost net of slashed bonds {} the floor's",
            s.config.cheat_rate,
            pct(o.steady.extra_per_job),
            pct(o.steady.econ_floor_per_job),
            times(o.steady.ratio_to_floor),
            pct(o.steady_honest_slots.extra_per_job),
            times(o.steady_honest_slots.ratio_to_floor),
            pct(o.steady_cheater_slots.extra_per_job),
            pct(o.cold_start.extra_per_job),
            times(o.steady.net_cost_ratio()),
        );
        let _ = writeln!(
            t,
            "  cheaters: {} identities cheated, {} caught by audit, {} as verifier, {} at large; \
             fabricated results paid before caught: mean {:.2}, median {}, p90 {} \
             (caught by audit: {:.2} / {} / {}; with audits of its own results the only way \
             to be caught, the mean would be (1-p)/p = {})",
            ch.identities,
            ch.caught_by_audit,
            ch.caught_as_verifier,
            ch.at_large_at_end,
            ch.got_away.mean,
            ch.got_away.median,
            ch.got_away.p90,
            ch.got_away_caught_by_audit.mean,
            ch.got_away_caught_by_audit.median,
            ch.got_away_caught_by_audit.p90,
            ch.got_away_expected
                .map_or_else(|| "n/a".to_string(), |x| format!("{x:.2}")),
        );
        let _ = writeln!(
            t,
            "  detection vs 1-(1-pq)^n with p={}, q={}: max |diff| {:.2} pp over n=1..{} (at n={}; \
             {:.2} pp against p's mean at each n); \
             honest slashed {} ({} disputes against honest originals, {} decided for them)",
            pct(s.detection.p),
            s.detection.q,
            s.detection.max_abs_diff_pp,
            s.detection.n_max,
            s.detection.at_n_of_max_diff,
            s.detection.max_abs_diff_stepwise_pp,
            s.honest.wrongly_slashed,
            s.honest.disputes_against_honest,
            s.honest.disputes_won,
        );
        let _ = writeln!(
            t,
            "  acceptance: detection within 2pp {}, overhead <= 10% {}, <= 1.2x floor {}, no honest slashed {}",
            a.detection_within_2pp,
            a.steady_overhead_at_most_10pct,
            a.within_1_2x_of_floor,
            a.no_honest_slashed,
        );
    }
    let _ = write!(
        t,
        "{:.1} s; report in {}",
        r.elapsed_s,
        out.join("verification.{json,md}").display()
    );
    t
}

/// Runs every scenario and writes `verification.{json,md}` under `args.out`.
pub fn verification(args: &VerificationArgs) -> anyhow::Result<VerificationReport> {
    let t0 = Instant::now();
    let scenarios = args
        .scenarios()?
        .iter()
        .map(simulate)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = VerificationReport {
        simulation: "spot re-execution: audit overhead, detection, honest slashes",
        command: args.command(),
        scenarios,
        elapsed_s: t0.elapsed().as_secs_f64(),
        machine: Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        },
    };
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("verification.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("verification.md"), markdown(&report))?;
    Ok(report)
}

/// `kiln sim …`: runs it and prints the summary (or the JSON report).
pub fn run(cmd: SimCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        SimCmd::Verification(args) => {
            let r = verification(&args)?;
            if json {
                crate::term::out(&serde_json::to_string_pretty(&r)?);
            } else {
                crate::term::out(&summary(&r, &args.out));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 200 providers, 50,000 measured jobs after a warm-up of 3,750 jobs
    /// each.
    fn small(q: f64, seed: u64) -> SimConfig {
        SimConfig {
            cheat_rate: q,
            warmup_jobs: 750_000,
            ..SimConfig::new(200, 50_000, seed)
        }
    }

    #[test]
    fn detection_follows_the_analytic_curve_and_no_honest_provider_is_slashed_q1() {
        check_detection(1.0, 7);
    }

    #[test]
    fn detection_follows_the_analytic_curve_and_no_honest_provider_is_slashed_q_half() {
        check_detection(0.5, 8);
    }

    fn check_detection(q: f64, seed: u64) {
        // A tenth of the slots cheat and a longer warm-up, for several
        // thousand cheating identities: a Kaplan–Meier curve good to
        // about ±1 pp.
        // Reckless cheaters (they start once trusted): many identities, and
        // p = 1/N exactly at q = 1.
        let c = SimConfig {
            cheat_fraction: 0.1,
            warmup_jobs: 1_500_000,
            cheat_after: AuditPolicy::DEFAULT.trust_threshold,
            patient: false,
            ..small(q, seed)
        };
        let r = simulate(&c).expect("simulate");
        let d = &r.detection;
        eprintln!(
            "q={q}: {} identities, p={:.4}, max |diff| {:.2} pp at n={} of 1..{}, stepwise {:.2} pp; {}",
            r.cheaters.identities,
            d.p,
            d.max_abs_diff_pp,
            d.at_n_of_max_diff,
            d.n_max,
            d.max_abs_diff_stepwise_pp,
            d.points
                .iter()
                .map(|pt| format!("{:+.2}", (pt.empirical - pt.analytic) * 100.0))
                .collect::<Vec<_>>()
                .join(" ")
        );
        assert!(
            r.cheaters.identities >= 5_000,
            "q={q}: only {} cheating identities",
            r.cheaters.identities
        );
        assert!(d.n_max >= 15, "q={q}: curve only to n={}", d.n_max);
        // Within the acceptance band against p's mean at q = 1 (p is
        // constant: CV stays at N while every result is fabricated) and
        // against p's mean at each n at q < 1 (p drifts down as the
        // honest results it returns pass audits); the constant-p
        // formula stays within 3 pp there.
        assert!(
            d.max_abs_diff_stepwise_pp <= 2.0,
            "q={q}: max |diff| to the stepwise curve {:.2} pp",
            d.max_abs_diff_stepwise_pp
        );
        assert!(
            d.max_abs_diff_pp <= if q < 1.0 { 3.0 } else { 2.0 },
            "q={q}: max |diff| {:.2} pp at n={} ({:?})",
            d.max_abs_diff_pp,
            d.at_n_of_max_diff,
            d.points
        );
        // Cheaters start once trusted: they face p >= 1/N = 10%.
        assert!(d.p >= 0.1 - 1e-9 || q < 1.0, "q={q}: p = {}", d.p);
        assert!(d.p > 0.09, "q={q}: p = {}", d.p);
        assert_eq!(r.honest.wrongly_slashed, 0, "q={q}");
        assert!(r.acceptance.no_honest_slashed);
        // Honest originals that met a fabricating verifier were upheld
        // (the rest stayed undecided at the execution cap: nobody was
        // slashed either way).
        let h = &r.honest;
        assert!(h.disputes_against_honest > 100, "{h:?}");
        assert!(
            h.disputes_won as f64 >= 0.95 * h.disputes_against_honest as f64,
            "{h:?}"
        );
        assert!(r.cheaters.caught_by_audit > 0 && r.cheaters.caught_as_verifier > 0);
        // What audits cost is what the decisions' p says, plus tie-breaks.
        let o = &r.overhead.steady;
        let ties = r.overhead.tie_breaks as f64 / (r.config.jobs + r.config.warmup_jobs) as f64;
        assert!(
            (o.extra_per_job - o.expected_audits_per_job - ties).abs() < 0.01,
            "{o:?} tie-breaks {ties}"
        );
        // Never below the floor; honest slots close to it once settled.
        assert!(o.expected_audits_per_job >= o.econ_floor_per_job, "{o:?}");
        let h = &r.overhead.steady_honest_slots;
        let expected = h.expected_audits_per_job / h.econ_floor_per_job;
        assert!(
            (1.0..1.1).contains(&expected),
            "honest slots at {expected:.3}x the floor"
        );
        let realized = h.ratio_to_floor.expect("a floor");
        assert!(
            (0.9..1.2).contains(&realized),
            "honest slots at {realized:.3}x the floor"
        );
    }

    /// A patient cheater waits until its audit probability is the floor's
    /// (for the defaults: 21 verified results, p_trust = 4.8% against a
    /// typical job's p_econ of 4.8%), so it turns over identities slowly
    /// and the fleet's overhead stays near the floor; its detection curve
    /// still follows the formula once enough identities have cheated.
    #[test]
    fn patient_cheaters_keep_the_overhead_near_the_floor() {
        let p = AuditPolicy::DEFAULT;
        let after = patient_cheat_after(
            &p,
            Credits(20_000_000),
            Credits(500_000),
            Credits(2_000_000),
        );
        assert_eq!(after, 21);
        assert!(TrustState::new(after).p_trust(&p) <= Ppm::new(47_620).expect("ppm"));
        assert!(TrustState::new(after - 1).p_trust(&p) > Ppm::new(47_620).expect("ppm"));
        let c = SimConfig {
            detection_identities: 3_000,
            ..SimConfig::new(400, 200_000, 21)
        };
        assert!(c.patient && c.cheat_after == 21);
        let r = simulate(&c).expect("simulate");
        let o = &r.overhead.steady;
        let ratio = o.ratio_to_floor.expect("a floor");
        assert!(ratio <= 1.2, "{ratio:.3}x the floor: {o:?}");
        assert!(r.cheaters.identities >= 3_000, "{:?}", r.cheaters);
        // They cheat at about the floor, not at 1/N.
        assert!(r.detection.p < 0.07, "p = {}", r.detection.p);
        assert!(
            r.detection.max_abs_diff_pp <= 3.0,
            "max |diff| {:.2} pp",
            r.detection.max_abs_diff_pp
        );
        assert_eq!(r.honest.wrongly_slashed, 0);
        // Reckless cheaters on the same fleet cost far more audits (each
        // identity's ramp of N), which shows what the patient start saves.
        let reckless = SimConfig {
            cheat_after: p.trust_threshold,
            patient: false,
            detection_identities: 0,
            ..c
        };
        let rr = simulate(&reckless).expect("simulate");
        assert!(
            rr.overhead.steady.extra_per_job > o.extra_per_job,
            "{:?} vs {o:?}",
            rr.overhead.steady
        );
    }

    #[test]
    fn without_cheaters_nobody_is_slashed_and_the_overhead_falls_to_the_floor() {
        let c = SimConfig {
            cheat_fraction: 0.0,
            ..small(1.0, 3)
        };
        let r = simulate(&c).expect("simulate");
        assert_eq!(r.cheaters.identities, 0);
        assert_eq!(r.honest.wrongly_slashed, 0);
        assert_eq!(r.overhead.tie_breaks, 0);
        // Every first result of a new provider is audited: the cold start
        // costs more than the steady state.
        assert!(r.overhead.cold_start.extra_per_job > r.overhead.steady.extra_per_job);
        assert!(r.overhead.by_window[0] > r.overhead.by_window[9]);
    }

    #[test]
    fn a_cheater_that_cheats_from_its_first_job_is_caught_on_it() {
        let c = SimConfig {
            cheat_after: 0,
            ..small(1.0, 5)
        };
        let r = simulate(&c).expect("simulate");
        assert!(r.cheaters.caught_by_audit > 100);
        assert_eq!(r.cheaters.got_away.max, 0.0, "{:?}", r.cheaters.got_away);
        assert_eq!(r.honest.wrongly_slashed, 0);
    }

    #[test]
    fn the_same_seed_gives_the_same_report() {
        let c = SimConfig {
            warmup_jobs: 0,
            ..SimConfig::new(50, 5_000, 11)
        };
        assert_eq!(simulate(&c).expect("a"), simulate(&c).expect("b"));
    }

    #[test]
    fn arguments_are_checked() {
        let bad = SimConfig {
            providers: 2,
            ..SimConfig::new(2, 10, 1)
        };
        assert!(simulate(&bad).is_err());
        let bad = SimConfig {
            cheat_rate: 0.0,
            ..SimConfig::new(10, 10, 1)
        };
        assert!(simulate(&bad).is_err());
    }

    #[test]
    fn kaplan_meier_with_censoring() {
        let mut e = Exits::default();
        // 4 at risk at n=1: one caught; one censored after n=1; 2 left at
        // n=2: one caught; the last censored after n=3.
        e.event(1);
        e.censor(1);
        e.event(2);
        e.censor(3);
        let c = e.curve();
        assert_eq!(c[0].0, 1);
        assert_eq!(c[0].1, 4);
        assert!((c[0].2 - 0.25).abs() < 1e-12);
        assert_eq!(c[1].1, 2);
        assert!((c[1].2 - (1.0 - 0.75 * 0.5)).abs() < 1e-12);
        assert_eq!(c[2].1, 1);
        assert!((c[2].2 - 0.625).abs() < 1e-12);
    }
}
