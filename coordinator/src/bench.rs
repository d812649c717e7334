//! `kiln bench scheduler`: placement decisions per second on a simulated
//! marketplace.
//!
//! A seeded generator builds a realistic fleet (a third CPU-only nodes, the
//! rest with 1, 2, 4 or 8 GPUs of seven models at model-typical prices,
//! VRAM, compute capabilities and benchmarked TFLOP/s; eight regions;
//! reputations; cached datasets) and a queue of jobs (CPU and GPU jobs with
//! the full range of requirements: models, VRAM, compute capability,
//! TFLOP/s, region, reputation, network, disk, price limits, priorities,
//! inputs, and 2% gangs of 2–8 nodes). The queue is put in scheduling order
//! and every job gets exactly one decision (`place`, or `place_gang` for a
//! gang). While it runs, jobs finish: after each decision a random running
//! job is released with probability 0.45, so the fleet fills up and then
//! stays busy, as a marketplace does. The figure is decisions per second of
//! that loop (ordering, decisions and releases included; generating the
//! fleet and jobs is not).

use std::fmt;
use std::time::Instant;

use kiln_protocol::spec::{ComputeCapability, InputSpec};
use kiln_protocol::{
    ByteSize, CapabilityAdvert, ContentId, CpuInfo, Credits, GpuInfo, JobSpec, Keypair, MilliCpu,
    NetworkMode, ProviderId, UnixMillis,
};
use serde::Serialize;

use crate::sched::{self, Fleet, Placement, ProviderView, QueueItem};

/// What a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub providers: usize,
    pub jobs: usize,
    pub seed: u64,
    /// Placement decisions made (one per job).
    pub decisions: u64,
    pub placed: u64,
    pub not_placed: u64,
    /// Of the placed, gang jobs (all nodes reserved at once).
    pub gangs_placed: u64,
    /// Reservations released as jobs "finished".
    pub released: u64,
    /// Seconds of the measured loop.
    pub seconds: f64,
    pub decisions_per_sec: f64,
    /// Per-decision latency, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Candidate lists (price classes and shapes) built: cache misses.
    pub shapes_built: u64,
    /// Seconds spent generating the fleet and the jobs (not measured).
    pub setup_seconds: f64,
    /// Resident memory after generating the fleet and the queue, before
    /// the first decision (`VmRSS`), bytes; 0 where unknown.
    pub setup_rss_bytes: u64,
    /// Peak resident memory of the process (`VmHWM`), bytes; 0 where
    /// unknown. The scheduler's own share is about `peak − setup`.
    pub peak_rss_bytes: u64,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scheduler: {} providers, {} queued jobs (seed {})",
            self.providers, self.jobs, self.seed
        )?;
        writeln!(
            f,
            "  {} decisions in {:.3} s = {:.0} decisions/s",
            self.decisions, self.seconds, self.decisions_per_sec
        )?;
        writeln!(
            f,
            "  placed {} (gangs {}), not placed {}, released {}",
            self.placed, self.gangs_placed, self.not_placed, self.released
        )?;
        writeln!(
            f,
            "  latency p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs; {} candidate lists built",
            self.p50_us, self.p99_us, self.max_us, self.shapes_built
        )?;
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        write!(
            f,
            "  peak RSS {:.1} MiB (fleet and queue {:.1} MiB, scheduler +{:.1} MiB); setup {:.2} s",
            mib(self.peak_rss_bytes),
            mib(self.setup_rss_bytes),
            mib(self.peak_rss_bytes.saturating_sub(self.setup_rss_bytes)),
            self.setup_seconds
        )
    }
}

/// SplitMix64: small, seeded, good enough for a workload generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

struct Model {
    name: &'static str,
    vram_gib: u64,
    cc: (u32, u32),
    tflops: u64,
    /// Price per GPU-hour, micro-credits, low..high.
    price: (u64, u64),
    /// Relative frequency in the fleet.
    weight: u64,
}

const MODELS: [Model; 7] = [
    Model {
        name: "NVIDIA H100 80GB HBM3",
        vram_gib: 80,
        cc: (9, 0),
        tflops: 750,
        price: (1_800_000, 3_200_000),
        weight: 15,
    },
    Model {
        name: "NVIDIA A100-SXM4-80GB",
        vram_gib: 80,
        cc: (8, 0),
        tflops: 300,
        price: (1_100_000, 1_900_000),
        weight: 15,
    },
    Model {
        name: "NVIDIA A100-SXM4-40GB",
        vram_gib: 40,
        cc: (8, 0),
        tflops: 280,
        price: (900_000, 1_500_000),
        weight: 10,
    },
    Model {
        name: "NVIDIA L40S",
        vram_gib: 48,
        cc: (8, 9),
        tflops: 360,
        price: (700_000, 1_200_000),
        weight: 12,
    },
    Model {
        name: "NVIDIA GeForce RTX 4090",
        vram_gib: 24,
        cc: (8, 9),
        tflops: 160,
        price: (300_000, 600_000),
        weight: 25,
    },
    Model {
        name: "NVIDIA GeForce RTX 3090",
        vram_gib: 24,
        cc: (8, 6),
        tflops: 70,
        price: (150_000, 350_000),
        weight: 13,
    },
    Model {
        name: "NVIDIA A10",
        vram_gib: 24,
        cc: (8, 6),
        tflops: 120,
        price: (350_000, 700_000),
        weight: 10,
    },
];

const REGIONS: [&str; 7] = [
    "us-east-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-south-1",
    "ap-northeast-1",
    "sa-east-1",
];

const GIB: u64 = 1 << 30;
const DATASETS: u64 = 500;

fn dataset(n: u64) -> ContentId {
    ContentId::of_bytes(&n.to_le_bytes())
}

fn pick_model(rng: &mut Rng) -> &'static Model {
    let total: u64 = MODELS.iter().map(|m| m.weight).sum();
    let mut x = rng.below(total);
    for m in &MODELS {
        if x < m.weight {
            return m;
        }
        x -= m.weight;
    }
    &MODELS[0]
}

/// Rounds to 10 000 µcr (0.01 cr): real price lists have steps, so ties happen.
fn cents(x: u64) -> u64 {
    x / 10_000 * 10_000
}

fn provider(rng: &mut Rng, n: usize) -> ProviderView {
    let mut secret = [0u8; 32];
    for (i, chunk) in secret.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(rng.next() ^ (n as u64) << (i * 8)).to_le_bytes());
    }
    let id = ProviderId::from_public_key(&Keypair::from_secret_bytes(secret).public());
    let cpu_only = rng.chance(0.35);
    let (gpus, cores, memory, slots, gpu_price, tflops) = if cpu_only {
        let cores = *rng.pick(&[4u32, 8, 16, 32, 64]);
        let mem = u64::from(cores) * *rng.pick(&[2u64, 4, 8]) * GIB;
        (vec![], cores, mem, (cores / 2).clamp(1, 32), 0, None)
    } else {
        let m = pick_model(rng);
        let k = *rng.pick(&[1u32, 1, 2, 4, 8, 8]);
        let gpus = (0..k)
            .map(|i| GpuInfo {
                index: i,
                uuid: format!("GPU-{n}-{i}"),
                name: m.name.into(),
                memory_total: ByteSize(m.vram_gib * GIB),
                compute_capability: m.cc,
                driver_version: "580.65".into(),
                mig: None,
            })
            .collect();
        let cores = k * *rng.pick(&[8u32, 16, 24]);
        let mem = u64::from(k) * *rng.pick(&[64u64, 128]) * GIB;
        let tflops = rng
            .chance(0.8)
            .then(|| (m.tflops * rng.range(90, 110) / 100) as u32);
        (
            gpus,
            cores,
            mem,
            k + rng.range(0, 2) as u32,
            cents(rng.range(m.price.0, m.price.1)),
            tflops,
        )
    };
    let advert = CapabilityAdvert {
        provider: id,
        protocol_version: kiln_protocol::PROTOCOL_VERSION,
        node_version: "bench".into(),
        listen_addrs: vec![format!("/ip4/10.0.{}.{}/tcp/4731", n / 250, n % 250)],
        cpu: CpuInfo {
            model: "AMD EPYC".into(),
            logical_cores: cores,
            matmul_mflops: 50_000,
        },
        memory: ByteSize(memory),
        gpus,
        slots,
        price_per_cpu_hour: Credits(cents(rng.range(20_000, 100_000))),
        price_per_gpu_hour: Credits(gpu_price),
        runtime: "runc".into(),
        allows_network: rng.chance(0.5),
        issued_at: UnixMillis(0),
        benchmark: None,
        region: (!rng.chance(0.1)).then(|| rng.pick(&REGIONS).to_string()),
        disk: ByteSize(rng.range(1, 16) * 500 * GIB),
        cached: (0..rng.below(5))
            .map(|_| dataset(rng.below(DATASETS)))
            .collect(),
        registries: Vec::new(),
    };
    ProviderView {
        id,
        advert,
        reputation: if rng.chance(0.3) {
            sched::DEFAULT_REPUTATION
        } else {
            rng.range(300, 1000) as u32
        },
        tflops,
    }
}

fn job(rng: &mut Rng, image: &str) -> JobSpec {
    let mut s = JobSpec::new(image, vec!["train".into()]);
    let r = &mut s.resources;
    if rng.chance(0.3) {
        let cpus = *rng.pick(&[500u32, 1000, 2000, 4000, 8000, 16_000]);
        r.cpus = MilliCpu(cpus);
        r.memory = ByteSize(*rng.pick(&[1u64, 2, 4, 8, 16, 32]) * GIB);
        // 0.05 to 0.2 cr per CPU-hour
        r.max_price_per_hour = Credits(u64::from(cpus) * rng.range(50, 200));
    } else {
        let k = *rng.pick(&[1u32, 1, 1, 2, 2, 4, 8]);
        r.gpus = k;
        r.cpus = MilliCpu(k * *rng.pick(&[4000u32, 8000]));
        r.memory = ByteSize(u64::from(k) * *rng.pick(&[32u64, 64]) * GIB);
        if rng.chance(0.5) {
            r.gpu_models = (0..rng.range(1, 2))
                .map(|_| {
                    let name = pick_model(rng).name;
                    // Buyers write short names: "H100", "RTX 4090", "A100 80GB".
                    let w: Vec<&str> = name.split([' ', '-']).skip(1).collect();
                    if w[0] == "GeForce" {
                        format!("{}_{}", w[1], w[2])
                    } else if rng.chance(0.3) && w.len() > 1 {
                        format!("{} {}", w[0], w[1])
                    } else {
                        w[0].to_string()
                    }
                })
                .collect();
        }
        if rng.chance(0.2) {
            r.min_vram = ByteSize(*rng.pick(&[24u64, 40, 48, 80]) * GIB);
        }
        if rng.chance(0.2) {
            r.min_compute_capability = Some(ComputeCapability::from(*rng.pick(&[
                (8, 0),
                (8, 6),
                (8, 9),
                (9, 0),
            ])));
        }
        if rng.chance(0.15) {
            r.min_tflops = *rng.pick(&[100u32, 250, 500]);
        }
        // 0.4 to 4 cr per GPU-hour, plus CPUs.
        r.max_price_per_hour =
            Credits(u64::from(k) * rng.range(400_000, 4_000_000) + u64::from(r.cpus.0) * 100);
        if rng.chance(0.02) {
            r.gang = rng.range(2, 8) as u32;
        }
    }
    if rng.chance(0.15) {
        r.region = Some(
            rng.pick(&["us", "eu", "ap", "eu-west-1", "us-east-1"])
                .to_string(),
        );
    }
    if rng.chance(0.1) {
        r.min_reputation = rng.range(4, 8) as u32 * 100;
    }
    if rng.chance(0.3) {
        r.disk = ByteSize(rng.range(1, 10) * 50 * GIB);
    }
    if rng.chance(0.2) {
        r.priority = rng.range(0, 20) as i32 - 10;
    }
    if rng.chance(0.05) {
        s.network = NetworkMode::Full;
    }
    s.inputs = (0..rng.below(4))
        .map(|i| InputSpec::new(dataset(rng.below(DATASETS)), format!("/in/{i}")))
        .collect();
    s
}

/// A memory figure of this process from `/proc/self/status` (`VmHWM`,
/// `VmRSS`), bytes; 0 where unknown.
fn proc_status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Peak resident memory of this process (`VmHWM`), bytes; 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM")
}

/// Runs the scheduler benchmark: `providers` simulated providers, `jobs`
/// queued jobs, one decision each (see the module docs).
pub fn bench_scheduler(providers: usize, jobs: usize, seed: u64) -> BenchReport {
    let setup = Instant::now();
    let mut rng = Rng(seed);
    let mut fleet = Fleet::new();
    for n in 0..providers {
        fleet.upsert(provider(&mut rng, n));
    }
    let image = format!("sha256:{}", "ab".repeat(32));
    let mut queue: Vec<(JobSpec, UnixMillis)> = (0..jobs)
        .map(|i| (job(&mut rng, &image), UnixMillis(i as u64)))
        .collect();
    let setup_seconds = setup.elapsed().as_secs_f64();
    let setup_rss_bytes = proc_status_bytes("VmRSS");

    let mut running: Vec<Placement> = Vec::new();
    let mut lat_ns: Vec<u32> = Vec::with_capacity(jobs);
    let (mut placed, mut not_placed, mut gangs, mut released) = (0u64, 0u64, 0u64, 0u64);
    let start = Instant::now();
    sched::order(&mut queue);
    for j in &queue {
        let spec = j.spec();
        let t = Instant::now();
        let ok = if spec.resources.gang > 1 {
            match sched::place_gang(spec, &mut fleet) {
                Ok(ps) => {
                    gangs += 1;
                    running.extend(ps);
                    true
                }
                Err(_) => false,
            }
        } else {
            match sched::place(spec, &mut fleet) {
                Ok(p) => {
                    running.push(p);
                    true
                }
                Err(_) => false,
            }
        };
        lat_ns.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
        if ok {
            placed += 1;
        } else {
            not_placed += 1;
        }
        if !running.is_empty() && rng.chance(0.45) {
            let i = rng.below(running.len() as u64) as usize;
            let p = running.swap_remove(i);
            fleet.release(&p);
            released += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    debug_assert_eq!(fleet.reservations(), running.len());
    lat_ns.sort_unstable();
    let q = |f: f64| {
        lat_ns
            .get(((lat_ns.len() as f64 * f) as usize).min(lat_ns.len().saturating_sub(1)))
            .map_or(0.0, |&n| f64::from(n) / 1000.0)
    };
    let decisions = placed + not_placed;
    BenchReport {
        providers,
        jobs,
        seed,
        decisions,
        placed,
        not_placed,
        gangs_placed: gangs,
        released,
        seconds,
        decisions_per_sec: decisions as f64 / seconds.max(1e-9),
        p50_us: q(0.50),
        p99_us: q(0.99),
        max_us: lat_ns.last().map_or(0.0, |&n| f64::from(n) / 1000.0),
        shapes_built: fleet.shapes_built(),
        setup_seconds,
        setup_rss_bytes,
        peak_rss_bytes: peak_rss_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small run (`cargo test --release -p kiln-coordinator bench_smoke -- --nocapture`
    /// prints the figures).
    #[test]
    fn bench_smoke() {
        let r = bench_scheduler(300, 3_000, 7);
        println!("{r}");
        assert_eq!(r.decisions, 3_000);
        assert_eq!(r.placed + r.not_placed, r.decisions);
        assert!(r.placed > 300 && r.not_placed > 0, "{r}");
        assert!(r.decisions_per_sec > 0.0 && r.p50_us <= r.p99_us);
        // Same seed, same decisions.
        let again = bench_scheduler(300, 3_000, 7);
        assert_eq!(
            (again.placed, again.gangs_placed, again.released),
            (r.placed, r.gangs_placed, r.released)
        );
    }
}
