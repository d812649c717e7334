//! Matching: which provider should run a job. A pure function over a
//! snapshot of the fleet, so every decision can be tested from a table.
//!
//! Hard constraints are checked in a fixed order and a provider that fails
//! one is counted against the *first* it fails, which is what makes the
//! "why not placed" line useful: `3 online; 2 excluded by memory; 1 by price`.
//! Among fitting providers the cheapest wins, then the least loaded (so work
//! spreads), then the smallest id (so the choice is deterministic).

use std::collections::BTreeMap;
use std::fmt;

use kiln_protocol::{CapabilityAdvert, Credits, JobSpec, ProviderId};

/// A provider as the scheduler sees it: its advert and what is already booked.
#[derive(Clone, Debug)]
pub struct ProviderView {
    pub id: ProviderId,
    pub advert: CapabilityAdvert,
    pub running: u32,
    pub used_millicpu: u32,
    pub used_memory: u64,
    pub used_gpus: u32,
}

/// The hard constraints, in the order they are checked.
pub const CONSTRAINTS: [&str; 6] = [
    "network",
    "slots",
    "gpus",
    "cpus",
    "memory",
    "max_price_per_hour",
];

/// Why a job could not be placed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotPlaced {
    pub online: usize,
    pub excluded: BTreeMap<&'static str, usize>,
}

impl fmt::Display for NotPlaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.online == 0 {
            return f.write_str("waiting: no provider online");
        }
        write!(f, "waiting: {} online", self.online)?;
        for c in CONSTRAINTS {
            if let Some(n) = self.excluded.get(c) {
                write!(f, "; {n} excluded by {c}")?;
            }
        }
        Ok(())
    }
}

/// The chosen provider and the agreed price per hour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub index: usize,
    pub provider: ProviderId,
    pub price_per_hour: Credits,
}

fn first_violation(spec: &JobSpec, p: &ProviderView) -> Result<Credits, &'static str> {
    let r = &spec.resources;
    let a = &p.advert;
    if spec.network == kiln_protocol::NetworkMode::Full && !a.allows_network {
        return Err("network");
    }
    if p.running >= a.slots {
        return Err("slots");
    }
    if (a.gpus.len() as u32).saturating_sub(p.used_gpus) < r.gpus {
        return Err("gpus");
    }
    if a.millicpus().saturating_sub(p.used_millicpu) < r.cpus.0 {
        return Err("cpus");
    }
    if a.memory.0.saturating_sub(p.used_memory) < r.memory.0 {
        return Err("memory");
    }
    match a.price_per_hour(spec) {
        Some(price) if price <= r.max_price_per_hour => Ok(price),
        _ => Err("max_price_per_hour"),
    }
}

/// Picks a provider for `spec` among `providers`, or says why none fits.
pub fn place(spec: &JobSpec, providers: &[ProviderView]) -> Result<Placement, NotPlaced> {
    let mut excluded = BTreeMap::new();
    let mut best: Option<(Credits, u64, ProviderId, usize)> = None;
    for (i, p) in providers.iter().enumerate() {
        match first_violation(spec, p) {
            Err(c) => *excluded.entry(c).or_insert(0) += 1,
            Ok(price) => {
                // Load as a fraction of slots, in parts per million.
                let load = u64::from(p.running) * 1_000_000 / u64::from(p.advert.slots.max(1));
                let key = (price, load, p.id, i);
                if best
                    .as_ref()
                    .is_none_or(|b| (key.0, key.1, key.2) < (b.0, b.1, b.2))
                {
                    best = Some(key);
                }
            }
        }
    }
    match best {
        Some((price_per_hour, _, provider, index)) => Ok(Placement {
            index,
            provider,
            price_per_hour,
        }),
        None => Err(NotPlaced {
            online: providers.len(),
            excluded,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::{ByteSize, CpuInfo, GpuInfo, Keypair, MilliCpu, UnixMillis};

    fn provider(cores: u32, mem_gib: u64, gpus: u32, cpu_price: u64, slots: u32) -> ProviderView {
        let id = ProviderId::from_public_key(&Keypair::generate().public());
        ProviderView {
            id,
            advert: CapabilityAdvert {
                provider: id,
                protocol_version: 1,
                node_version: "test".into(),
                listen_addrs: vec![],
                cpu: CpuInfo {
                    model: "t".into(),
                    logical_cores: cores,
                    matmul_mflops: 1,
                },
                memory: ByteSize(mem_gib << 30),
                gpus: (0..gpus)
                    .map(|i| GpuInfo {
                        index: i,
                        uuid: format!("GPU-{i}"),
                        name: "H100".into(),
                        memory_total: ByteSize(80 << 30),
                        compute_capability: (9, 0),
                        driver_version: "580".into(),
                    })
                    .collect(),
                slots,
                price_per_cpu_hour: Credits(cpu_price),
                price_per_gpu_hour: Credits(1_000_000),
                runtime: "runc".into(),
                allows_network: false,
                issued_at: UnixMillis(0),
            },
            running: 0,
            used_millicpu: 0,
            used_memory: 0,
            used_gpus: 0,
        }
    }

    fn spec(cpus: u32, mem_gib: u64, gpus: u32, max_price: u64) -> JobSpec {
        let mut s = JobSpec::new(format!("sha256:{}", "0".repeat(64)), vec![]);
        s.resources.cpus = MilliCpu(cpus * 1000);
        s.resources.memory = ByteSize(mem_gib << 30);
        s.resources.gpus = gpus;
        s.resources.max_price_per_hour = Credits(max_price);
        s
    }

    #[test]
    fn table() {
        // (name, fleet, job, expected: Ok(index) or Err(why-not line))
        type Case = (
            &'static str,
            Vec<ProviderView>,
            JobSpec,
            Result<usize, &'static str>,
        );
        let busy = {
            let mut p = provider(8, 32, 0, 100, 1);
            p.running = 1;
            p
        };
        let cases: Vec<Case> = vec![
            (
                "empty fleet",
                vec![],
                spec(1, 1, 0, 10_000_000),
                Err("waiting: no provider online"),
            ),
            (
                "cheapest wins",
                vec![provider(4, 8, 0, 300, 2), provider(4, 8, 0, 100, 2)],
                spec(1, 1, 0, 10_000_000),
                Ok(1),
            ),
            (
                "memory excludes",
                vec![provider(4, 8, 0, 100, 2)],
                spec(1, 16, 0, 10_000_000),
                Err("waiting: 1 online; 1 excluded by memory"),
            ),
            (
                "gpu needed",
                vec![provider(4, 64, 0, 100, 2), provider(4, 64, 2, 100, 2)],
                spec(1, 1, 2, 10_000_000),
                Ok(1),
            ),
            (
                "too expensive",
                vec![provider(4, 8, 0, 5_000_000, 2)],
                spec(1, 1, 0, 1_000_000),
                Err("waiting: 1 online; 1 excluded by max_price_per_hour"),
            ),
            (
                "slots full",
                vec![busy.clone(), provider(4, 1, 0, 100, 2)],
                spec(1, 2, 0, 10_000_000),
                Err("waiting: 2 online; 1 excluded by slots; 1 excluded by memory"),
            ),
            (
                "cpus",
                vec![provider(2, 8, 0, 100, 2)],
                spec(4, 1, 0, 100_000_000),
                Err("waiting: 1 online; 1 excluded by cpus"),
            ),
        ];
        for (name, fleet, job, want) in cases {
            match (place(&job, &fleet), want) {
                (Ok(p), Ok(i)) => assert_eq!(p.index, i, "{name}"),
                (Err(np), Err(line)) => assert_eq!(np.to_string(), line, "{name}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn load_spreads_between_equal_providers() {
        let mut a = provider(4, 8, 0, 100, 4);
        let b = provider(4, 8, 0, 100, 4);
        a.running = 1;
        a.used_millicpu = 1000;
        let fleet = vec![a, b];
        assert_eq!(place(&spec(1, 1, 0, 10_000_000), &fleet).unwrap().index, 1);
    }

    #[test]
    fn price_is_cpu_share_plus_gpus() {
        let p = provider(4, 8, 1, 1_000_000, 2);
        let placed = place(&spec(2, 1, 1, 10_000_000), std::slice::from_ref(&p)).unwrap();
        assert_eq!(placed.price_per_hour, Credits(2 * 1_000_000 + 1_000_000));
    }
}
