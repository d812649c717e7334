//! Matching: which provider(s) should run a job. Pure: no I/O, no clock, no
//! randomness; every decision can be tested from a table.
//!
//! * [`Fleet`] holds the providers and what is reserved on each (slots, GPU
//!   indices, milli-CPUs, memory, disk). [`place`] and [`place_gang`]
//!   *reserve* what they pick, so a caller cannot double-book; [`Fleet::release`]
//!   gives a reservation back (idempotent).
//! * Hard constraints are checked in the fixed order of [`Constraint::ALL`];
//!   a provider that fails one is counted against the *first* it fails, which
//!   is what makes the why-not line useful:
//!   `waiting: 12 online; 9 excluded by min_vram=80GiB; 3 by max_price_per_hour=2.000000 cr`.
//!   The order is: the node's GPUs (how many, which model, compute
//!   capability, memory, verified speed), then the provider's policy and
//!   standing (network, region, reputation), then price, then what it has in
//!   total (CPUs, memory, disk), then what is *free now* (a slot, GPUs, CPUs,
//!   memory, disk), and last whether it is held for a job that has waited
//!   longer ([`queue`]).
//! * Among providers that fit, the order is: lower price; then more
//!   verified TFLOP/s per unit of price (see [`crate::live`]); then higher
//!   reputation; then more of the job's input CIDs already cached
//!   (locality); then lower load (running ÷ slots, so work spreads); then
//!   the smaller provider id, so the choice is deterministic.
//! * [`queue`] orders the queue (priority, then submission order), runs a
//!   scheduling round without head-of-line blocking, holds providers for
//!   jobs that have waited too long (anti-starvation) and reports jobs past
//!   their queue deadline. [`search`] lists offers for people.
//!
//! # Speed
//!
//! Providers are sorted once per *price class* — the GPUs and CPUs a job
//! asks for, which fix each provider's price — by the static part of the
//! score (price, TFLOP/s per price, reputation, id); a class keeps only
//! providers with enough GPUs. Each entry carries what a decision reads
//! inline (price, qualifying-GPU mask, TFLOP/s, network policy, region,
//! reputation), so a decision is a binary search for the price limit and a
//! sequential walk that stops at the first fitting provider (and its exact
//! ties). A job with GPU model, compute-capability or VRAM requirements walks
//! its *shape* instead: the class filtered by them, built with one
//! table-lookup pass (providers are grouped by interned GPU signatures) and
//! cached. Only a job that does not fit walks its whole list, to count the
//! why-not line. Classes and shapes are rebuilt only when a provider joins,
//! leaves or changes what it is or charges (a heartbeat that only
//! renews the advert keeps them); both caches are bounded.
//!
//! `kiln bench scheduler` ([`crate::bench`]): 10,000 providers, 100,000
//! queued jobs: about 60,000 decisions/s on a 2-core VM (p99 under 100 µs).

mod fleet;
mod matching;
mod names;
pub mod queue;
pub mod search;
mod verifiers;
pub use verifiers::verifier_spec;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use kiln_protocol::spec::ComputeCapability;
use kiln_protocol::{ByteSize, Credits, JobSpec, MilliCpu};

pub use fleet::Placement;
pub use fleet::{DEFAULT_REPUTATION, Fleet, Free, MAX_GPUS_PER_NODE, ProviderView, ReservationId};
pub use matching::{place, place_gang};
pub use names::{gpu_model_matches, region_matches};
pub use queue::{Decision, QueueItem, RoundPolicy, order, run_round};
pub use search::{Query, QueryError, SortBy, search};

/// A hard constraint, in the order they are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Constraint {
    /// The node has fewer GPUs in all than the job needs.
    Gpus,
    /// Fewer GPUs than needed are of the job's kind: MIG instances of the
    /// profile it asks for, or whole GPUs when it asks for none.
    Mig,
    /// … of those, fewer are of an allowed model.
    GpuModels,
    /// … of those, fewer have the compute capability.
    MinComputeCapability,
    /// … of those, fewer have the memory.
    MinVram,
    /// The provider's verified TFLOP/s per GPU is unknown or too low.
    MinTflops,
    /// The job wants the network and the provider does not allow it.
    Network,
    /// The job's image is pulled from a registry the provider does not allow.
    Registry,
    /// The provider is not in the job's region.
    Region,
    /// The provider's reputation is below the job's minimum.
    MinReputation,
    /// The provider's price for this job is above the job's limit.
    MaxPrice,
    /// The node has fewer CPUs in all than the job needs.
    Cpus,
    /// … less memory in all.
    Memory,
    /// … less disk in all.
    Disk,
    /// Every slot is in use.
    Slots,
    /// Not enough qualifying GPUs are free now.
    FreeGpus,
    /// Not enough CPU is free now.
    FreeCpus,
    /// Not enough memory is free now.
    FreeMemory,
    /// Not enough disk is free now.
    FreeDisk,
    /// It would fit, but it is held for a job that has waited longer.
    Held,
}

/// Number of constraints.
pub const N_CONSTRAINTS: usize = 20;

/// The hard constraints' names, in the order they are checked.
pub const CONSTRAINTS: [&str; N_CONSTRAINTS] = [
    "gpus",
    "mig",
    "gpu_models",
    "min_compute_capability",
    "min_vram",
    "min_tflops",
    "network",
    "registry",
    "region",
    "min_reputation",
    "max_price_per_hour",
    "cpus",
    "memory",
    "disk",
    "slots",
    "free_gpus",
    "free_cpus",
    "free_memory",
    "free_disk",
    "held",
];

impl Constraint {
    pub const ALL: [Constraint; N_CONSTRAINTS] = [
        Self::Gpus,
        Self::Mig,
        Self::GpuModels,
        Self::MinComputeCapability,
        Self::MinVram,
        Self::MinTflops,
        Self::Network,
        Self::Registry,
        Self::Region,
        Self::MinReputation,
        Self::MaxPrice,
        Self::Cpus,
        Self::Memory,
        Self::Disk,
        Self::Slots,
        Self::FreeGpus,
        Self::FreeCpus,
        Self::FreeMemory,
        Self::FreeDisk,
        Self::Held,
    ];

    /// The name used in why-not lines (`min_vram`).
    pub fn name(self) -> &'static str {
        CONSTRAINTS[self as usize]
    }

    /// Whether it depends on what is booked now (as opposed to what the
    /// provider is and charges).
    pub fn is_dynamic(self) -> bool {
        self >= Self::Slots
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The requirement values a why-not line quotes (`min_vram=80GiB`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Wanted {
    pub network: bool,
    pub registry: Option<Arc<str>>,
    pub region: Option<Arc<str>>,
    pub min_reputation: u32,
    pub gpus: u32,
    pub mig: Option<Arc<str>>,
    pub gpu_models: Option<Arc<str>>,
    pub min_compute_capability: Option<ComputeCapability>,
    pub min_vram: ByteSize,
    pub min_tflops: u32,
    pub max_price: Credits,
    pub cpus: MilliCpu,
    pub memory: ByteSize,
    pub disk: ByteSize,
}

impl Wanted {
    pub(crate) fn of(spec: &JobSpec) -> Self {
        let r = &spec.resources;
        Self {
            network: spec.network == kiln_protocol::NetworkMode::Full,
            registry: spec.image.registry_host().map(Arc::from),
            region: r.region.as_deref().map(Arc::from),
            min_reputation: r.min_reputation,
            gpus: r.gpus,
            mig: r.mig.as_deref().map(Arc::from),
            gpu_models: (!r.gpu_models.is_empty()).then(|| Arc::from(r.gpu_models.join(","))),
            min_compute_capability: r.min_compute_capability,
            min_vram: r.min_vram,
            min_tflops: r.min_tflops,
            max_price: r.max_price_per_hour,
            cpus: r.cpus,
            memory: r.memory,
            disk: r.disk,
        }
    }

    fn write_label(&self, c: Constraint, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = c.name();
        match c {
            Constraint::Network => write!(f, "{name}=full"),
            Constraint::Registry => {
                write!(f, "{name}={}", self.registry.as_deref().unwrap_or(""))
            }
            Constraint::Region => write!(f, "{name}={}", self.region.as_deref().unwrap_or("")),
            Constraint::MinReputation => write!(f, "{name}={}", self.min_reputation),
            Constraint::Gpus | Constraint::FreeGpus => write!(f, "{name}={}", self.gpus),
            Constraint::Mig => match self.mig.as_deref() {
                Some(profile) => write!(f, "{name}={profile}"),
                None => write!(f, "{name}=none (whole GPUs)"),
            },
            Constraint::GpuModels => {
                write!(f, "{name}={}", self.gpu_models.as_deref().unwrap_or(""))
            }
            Constraint::MinComputeCapability => match self.min_compute_capability {
                Some(cc) => write!(f, "{name}={cc}"),
                None => f.write_str(name),
            },
            Constraint::MinVram => write!(f, "{name}={}", self.min_vram),
            Constraint::MinTflops => write!(f, "{name}={}", self.min_tflops),
            Constraint::MaxPrice => write!(f, "{name}={}", self.max_price),
            Constraint::Cpus | Constraint::FreeCpus => write!(f, "{name}={}", self.cpus),
            Constraint::Memory | Constraint::FreeMemory => write!(f, "{name}={}", self.memory),
            Constraint::Disk | Constraint::FreeDisk => write!(f, "{name}={}", self.disk),
            Constraint::Slots => f.write_str(name),
            Constraint::Held => write!(f, "{name} for a job waiting longer"),
        }
    }
}

/// What the providers `min_tflops` excluded have been verified at, so the
/// why-not line says what is missing: `(verified figures: none yet)`,
/// `(verified figures: best 120)`, `(verified figures: best <1, 2 none yet)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TflopsSeen {
    /// The best verified figure among them, TFLOP/s per GPU (rounded down).
    pub best: Option<u32>,
    /// How many have no verified figure.
    pub unmeasured: u32,
}

impl TflopsSeen {
    pub(crate) fn note(&mut self, tflops: Option<u32>) {
        match tflops {
            Some(t) => self.best = Some(self.best.map_or(t, |b| b.max(t))),
            None => self.unmeasured += 1,
        }
    }
}

impl fmt::Display for TflopsSeen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.best {
            None => f.write_str("verified figures: none yet"),
            Some(best) => {
                if best == 0 {
                    f.write_str("verified figures: best <1")?;
                } else {
                    write!(f, "verified figures: best {best}")?;
                }
                if self.unmeasured > 0 {
                    write!(f, ", {} none yet", self.unmeasured)?;
                }
                Ok(())
            }
        }
    }
}

/// Why a job could not be placed now. Its `Display` is the job's status line:
///
/// `waiting: 12 online; 9 excluded by min_vram=80GiB; 3 by max_price_per_hour=2.000000 cr`
///
/// Every online provider is counted once: against the first constraint it
/// fails, or in `fit` (a gang job for which too few providers fit). When
/// some provider fails several, the line goes on with every constraint
/// and how many providers fail it:
/// `…; each constraint: cpus=64 fails 3, max_price_per_hour=… fails 2, region=eu fails 3`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotPlaced {
    /// Providers online.
    pub online: usize,
    /// Providers excluded by each constraint, indexed by `Constraint as usize`.
    pub counts: [u32; N_CONSTRAINTS],
    /// Providers that would take one node of a gang (fewer than it needs).
    pub fit: usize,
    /// Nodes the job needs.
    pub gang: u32,
    /// Providers held for this job this round (see [`queue`]).
    pub holding: u32,
    /// `place` was asked to put a gang job on a single node.
    pub gang_unsupported: bool,
    /// Providers online but not in the fleet because their stake bond is
    /// below the marketplace's `min_stake` (the caller knows them, the
    /// fleet does not: see [`NotPlaced::with_unbonded`]).
    pub unbonded: usize,
    pub min_stake: Credits,
    /// The verified figures of the providers `min_tflops` excluded.
    pub tflops_seen: TflopsSeen,
    /// Providers failing each constraint, each counted under every one it
    /// fails (of those checked per provider: price, TFLOP/s, network,
    /// region, reputation, capacity and load), when some fail several.
    pub every: Option<[u32; N_CONSTRAINTS]>,
    pub(crate) wanted: Wanted,
}

impl NotPlaced {
    /// Counts `n` online providers that were left out of the fleet for
    /// holding less than `min_stake` (checked before any job constraint).
    pub fn with_unbonded(mut self, n: usize, min_stake: Credits) -> Self {
        self.unbonded = n;
        self.min_stake = min_stake;
        self
    }

    /// How many providers `c` excluded.
    pub fn count(&self, c: Constraint) -> usize {
        self.counts[c as usize] as usize
    }

    /// The constraints that excluded providers, with their counts, in check order.
    pub fn excluded(&self) -> impl Iterator<Item = (Constraint, usize)> + '_ {
        Constraint::ALL
            .into_iter()
            .map(|c| (c, self.count(c)))
            .filter(|(_, n)| *n > 0)
    }
}

impl fmt::Display for NotPlaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.gang_unsupported {
            return write!(
                f,
                "waiting: a gang={} job needs several nodes, all or none; it is placed with place_gang, not place",
                self.gang
            );
        }
        if self.online + self.unbonded == 0 {
            return f.write_str("waiting: no provider online");
        }
        write!(f, "waiting: {} online", self.online + self.unbonded)?;
        if self.gang > 1 {
            write!(
                f,
                "; {} fit but gang={} needs {} nodes",
                self.fit, self.gang, self.gang
            )?;
        }
        let mut first = true;
        if self.unbonded > 0 {
            write!(
                f,
                "; {} excluded by min_stake={}",
                self.unbonded, self.min_stake
            )?;
            first = false;
        }
        for (c, n) in self.excluded() {
            write!(f, "; {n} {}", if first { "excluded by " } else { "by " })?;
            self.wanted.write_label(c, f)?;
            if c == Constraint::MinTflops {
                write!(f, " ({})", self.tflops_seen)?;
            }
            first = false;
        }
        if let Some(every) = &self.every {
            f.write_str("; each constraint:")?;
            let mut sep = " ";
            for c in Constraint::ALL {
                let n = every[c as usize];
                if n > 0 {
                    f.write_str(sep)?;
                    self.wanted.write_label(c, f)?;
                    write!(f, " fails {n}")?;
                    sep = ", ";
                }
            }
        }
        if self.holding > 0 {
            write!(
                f,
                "; holding {} provider{} for it",
                self.holding,
                if self.holding == 1 { "" } else { "s" }
            )?;
        }
        Ok(())
    }
}
