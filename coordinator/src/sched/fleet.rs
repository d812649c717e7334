//! The fleet: providers, what is reserved on each, and the candidate lists
//! (price classes and shapes, see the parent module) that make a decision
//! cheap.

use std::collections::HashMap;

use kiln_protocol::spec::ComputeCapability;
use kiln_protocol::{CapabilityAdvert, ContentId, Credits, JobSpec, NetworkMode, ProviderId};

use super::Constraint;
use super::names::{region_matches_lower, words, words_match};

/// Reputation of a provider nobody has judged yet (the scale is 0..=1000).
pub const DEFAULT_REPUTATION: u32 = 500;

/// GPUs per node the scheduler tracks (GPU sets are 64-bit masks); GPUs an
/// advert lists beyond this are ignored.
pub const MAX_GPUS_PER_NODE: usize = 64;

/// Shape-cache size (candidate entries over all shapes, 40 bytes each)
/// beyond which the shapes are dropped and rebuilt as needed.
const SHAPE_BUDGET: usize = 1 << 18;
/// Price classes kept (each up to one entry per provider) before they are
/// dropped and rebuilt as needed.
const CLASS_BUDGET: usize = 64;

/// Where (one node of) a job goes, at what price, on which GPUs. The
/// capacity is reserved in the [`Fleet`] until [`Fleet::release`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The provider's index in the fleet.
    pub index: usize,
    pub provider: ProviderId,
    /// The agreed price per hour of this node.
    pub price_per_hour: Credits,
    /// The GPUs reserved, as the provider's advert numbers them (`GpuInfo::index`).
    pub gpus: Vec<u32>,
    pub reservation: ReservationId,
}

/// A fitting candidate during a decision.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pick {
    /// Position in the shape's candidate list (price order, then id).
    pub(super) pos: u32,
    pub(super) group: u32,
    pub(super) idx: u32,
    pub(super) qual: u64,
    pub(super) price: u64,
    pub(super) locality: u32,
    pub(super) load: u64,
}

/// A provider as the scheduler sees it: its advert, plus what the
/// coordinator knows about it that the provider does not claim itself.
#[derive(Clone, Debug)]
pub struct ProviderView {
    pub id: ProviderId,
    pub advert: CapabilityAdvert,
    /// 0..=1000; [`DEFAULT_REPUTATION`] until there is a record.
    pub reputation: u32,
    /// Verified dense matmul TFLOP/s of its slowest GPU, rounded down: what
    /// the coordinator timed a challenge at, never the provider's own
    /// figure (`live::verified_tflops`). `None` when unmeasured (it then
    /// fails any `min_tflops` and scores 0 throughput).
    pub tflops: Option<u32>,
}

impl ProviderView {
    /// A view with the default reputation and no benchmark figure.
    pub fn new(advert: CapabilityAdvert) -> Self {
        Self {
            id: advert.provider,
            advert,
            reputation: DEFAULT_REPUTATION,
            tflops: None,
        }
    }

    /// Whether `other` differs in anything the candidate cache depends on.
    fn same_static(&self, other: &Self) -> bool {
        let (a, b) = (&self.advert, &other.advert);
        self.reputation == other.reputation
            && self.tflops == other.tflops
            && a.allows_network == b.allows_network
            && a.region == b.region
            && a.price_per_cpu_hour == b.price_per_cpu_hour
            && a.price_per_gpu_hour == b.price_per_gpu_hour
            && a.gpus.len() == b.gpus.len()
            && a.gpus.iter().zip(&b.gpus).all(|(x, y)| {
                x.name == y.name
                    && x.memory_total == y.memory_total
                    && x.compute_capability == y.compute_capability
                    && x.index == y.index
            })
    }
}

/// What is free on a provider now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Free {
    pub slots: u32,
    pub gpus: u32,
    pub millicpu: u32,
    pub memory: u64,
    pub disk: u64,
}

/// Names a reservation; releasing it twice is harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReservationId(pub u64);

/// What a provider is (changes only when its advert or record changes).
#[derive(Debug)]
pub(crate) struct Node {
    pub view: ProviderView,
    pub alive: bool,
    /// Sorted, for locality lookups.
    pub cached: Vec<ContentId>,
}

impl Node {
    pub fn gpus(&self) -> &[kiln_protocol::GpuInfo] {
        let g = &self.view.advert.gpus;
        &g[..g.len().min(MAX_GPUS_PER_NODE)]
    }
}

/// GPUs of one node that share a model, compute capability and memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kind {
    /// Their positions in the advert.
    mask: u64,
    /// Interned (model, compute capability, memory).
    id: u16,
}

const NO_REGION: u16 = u16::MAX;

/// The static facts of a node in the compact form the shape filter reads.
#[derive(Clone, Debug)]
pub(crate) struct NodeStatic {
    region: u16,
    network: bool,
    reputation: u32,
    tflops: u32,
    n_gpus: u32,
    kinds: Box<[Kind]>,
    /// Interned multiset of (kind, count): nodes with equal `sig` pass or
    /// fail a job's GPU requirements alike.
    sig: u16,
}

/// What a provider has and what is booked on it: the hot data of a decision.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Load {
    pub slots: u32,
    pub running: u32,
    pub cap_mcpu: u32,
    pub used_mcpu: u32,
    pub gpu_all: u64,
    pub gpu_used: u64,
    pub cap_mem: u64,
    pub used_mem: u64,
    pub cap_disk: u64,
    pub used_disk: u64,
    /// Held during round `held_round` for the job with token `held_for`.
    pub held_round: u32,
    pub held_for: u32,
}

/// What one reservation took.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reservation {
    pub idx: u32,
    pub gpus: u64,
    pub mcpu: u32,
    pub mem: u64,
    pub disk: u64,
}

/// Resources one node of a job needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Need {
    pub k: u32,
    pub mcpu: u32,
    pub mem: u64,
    pub disk: u64,
}

impl Need {
    pub fn of(spec: &JobSpec) -> Self {
        let r = &spec.resources;
        Self {
            k: r.gpus,
            mcpu: r.cpus.0,
            mem: r.memory.0,
            disk: r.disk.0,
        }
    }
}

impl Load {
    /// The first constraint that depends on capacity which `need` fails here.
    #[inline]
    /// Every constraint `need` fails here (for why-not lines: a provider
    /// may fail several), as a mask of `1 << (constraint as usize)`.
    pub fn violations(&self, qual: u64, need: &Need, round: u32, holder: u32) -> u64 {
        let free_gpus = (qual & self.gpu_all & !self.gpu_used).count_ones();
        [
            (Constraint::Cpus, self.cap_mcpu < need.mcpu),
            (Constraint::Memory, self.cap_mem < need.mem),
            (Constraint::Disk, self.cap_disk < need.disk),
            (Constraint::Slots, self.running >= self.slots),
            (Constraint::FreeGpus, need.k > 0 && free_gpus < need.k),
            (
                Constraint::FreeCpus,
                self.cap_mcpu >= need.mcpu
                    && self.cap_mcpu.saturating_sub(self.used_mcpu) < need.mcpu,
            ),
            (
                Constraint::FreeMemory,
                self.cap_mem >= need.mem && self.cap_mem.saturating_sub(self.used_mem) < need.mem,
            ),
            (
                Constraint::FreeDisk,
                self.cap_disk >= need.disk
                    && self.cap_disk.saturating_sub(self.used_disk) < need.disk,
            ),
            (
                Constraint::Held,
                self.held_round == round && self.held_for != holder,
            ),
        ]
        .into_iter()
        .fold(
            0,
            |m, (c, fails)| if fails { m | 1 << (c as usize) } else { m },
        )
    }

    pub fn violation(&self, qual: u64, need: &Need, round: u32, holder: u32) -> Option<Constraint> {
        if self.cap_mcpu < need.mcpu {
            return Some(Constraint::Cpus);
        }
        if self.cap_mem < need.mem {
            return Some(Constraint::Memory);
        }
        if self.cap_disk < need.disk {
            return Some(Constraint::Disk);
        }
        if self.running >= self.slots {
            return Some(Constraint::Slots);
        }
        if need.k > 0 && (qual & self.gpu_all & !self.gpu_used).count_ones() < need.k {
            return Some(Constraint::FreeGpus);
        }
        if self.cap_mcpu.saturating_sub(self.used_mcpu) < need.mcpu {
            return Some(Constraint::FreeCpus);
        }
        if self.cap_mem.saturating_sub(self.used_mem) < need.mem {
            return Some(Constraint::FreeMemory);
        }
        if self.cap_disk.saturating_sub(self.used_disk) < need.disk {
            return Some(Constraint::FreeDisk);
        }
        if self.held_round == round && self.held_for != holder {
            return Some(Constraint::Held);
        }
        None
    }

    /// Whether `need` could ever fit here (capacity, not what is free).
    pub fn could_fit(&self, qual: u64, need: &Need) -> bool {
        self.cap_mcpu >= need.mcpu
            && self.cap_mem >= need.mem
            && self.cap_disk >= need.disk
            && self.slots > 0
            && (qual & self.gpu_all).count_ones() >= need.k
    }

    /// Running jobs per slot, in parts per million.
    pub fn load_ppm(&self) -> u64 {
        u64::from(self.running) * 1_000_000 / u64::from(self.slots.max(1))
    }

    fn capacity_of(advert: &CapabilityAdvert) -> (u32, u32, u64, u64, u64) {
        let n = advert.gpus.len().min(MAX_GPUS_PER_NODE);
        let all = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        (
            advert.slots,
            advert.millicpus(),
            all,
            advert.memory.0,
            advert.disk.0,
        )
    }

    fn set_capacity(&mut self, advert: &CapabilityAdvert) {
        let (slots, mcpu, all, mem, disk) = Self::capacity_of(advert);
        self.slots = slots;
        self.cap_mcpu = mcpu;
        self.gpu_all = all;
        self.cap_mem = mem;
        self.cap_disk = disk;
    }
}

/// Static requirements that define a job's shape (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ShapeKey {
    gpus: u32,
    gpu_models: Vec<String>,
    min_cc: Option<ComputeCapability>,
    min_vram: u64,
    mcpu: u32,
    mig: Option<String>,
}

#[inline]
fn mix(h: u64, v: u64) -> u64 {
    (h.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95)
}

fn mix_str(mut h: u64, s: &str) -> u64 {
    let b = s.as_bytes();
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = mix(h, u64::from_le_bytes(w));
    }
    let mut w = [0u8; 8];
    w[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    mix(mix(h, u64::from_le_bytes(w)), b.len() as u64)
}

impl ShapeKey {
    fn of(spec: &JobSpec) -> Self {
        let r = &spec.resources;
        Self {
            gpus: r.gpus,
            gpu_models: r.gpu_models.clone(),
            min_cc: r.min_compute_capability,
            min_vram: r.min_vram.0,
            mcpu: r.cpus.0,
            mig: r.mig.clone(),
        }
    }

    /// The hash of `ShapeKey::of(spec)`, without building it.
    fn hash_of(spec: &JobSpec) -> u64 {
        let r = &spec.resources;
        let mut h = mix(0, u64::from(r.gpus));
        h = mix(h, r.gpu_models.len() as u64);
        for m in &r.gpu_models {
            h = mix_str(h, m);
        }
        h = match r.min_compute_capability {
            Some(cc) => mix(mix(h, 1), (u64::from(cc.major) << 32) | u64::from(cc.minor)),
            None => mix(h, 0),
        };
        h = mix(h, r.min_vram.0);
        h = match &r.mig {
            Some(p) => mix_str(mix(h, 1), p),
            None => mix(h, 0),
        };
        mix(h, u64::from(r.cpus.0))
    }

    fn matches(&self, spec: &JobSpec) -> bool {
        let r = &spec.resources;
        self.gpus == r.gpus
            && self.gpu_models == r.gpu_models
            && self.min_cc == r.min_compute_capability
            && self.min_vram == r.min_vram.0
            && self.mcpu == r.cpus.0
            && self.mig == r.mig
    }
}

/// A provider in a candidate list, with what a decision reads about it
/// inline (the list is walked sequentially).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cand {
    pub idx: u32,
    /// Equal `group` ⇔ equal (price, TFLOP/s per price, reputation).
    pub group: u32,
    pub price: u64,
    /// The node's GPUs (bit = position in the advert) that qualify.
    pub qual: u64,
    tflops: u32,
    region: u16,
    reputation: u16,
    sig: u16,
    network: bool,
}

/// A job's TFLOP/s, network, region and reputation requirements, checked
/// per candidate during a decision.
pub(crate) struct JobFilter<'a> {
    min_tflops: u32,
    network: bool,
    /// For an image pulled from a registry: which nodes (by index) allow
    /// that registry.
    registry: Option<Vec<bool>>,
    /// Which interned regions match (`None`: any).
    regions: Option<&'a [bool]>,
    min_reputation: u32,
}

impl JobFilter<'_> {
    /// Every one of these constraints `c` fails, as a mask of
    /// `1 << (constraint as usize)`.
    pub fn violations(&self, c: &Cand) -> u64 {
        [
            (Constraint::MinTflops, c.tflops < self.min_tflops),
            (Constraint::Network, self.network && !c.network),
            (Constraint::Registry, !self.registry_ok(c)),
            (
                Constraint::Region,
                self.regions
                    .is_some_and(|ok| !ok.get(c.region as usize).copied().unwrap_or(false)),
            ),
            (
                Constraint::MinReputation,
                u32::from(c.reputation) < self.min_reputation,
            ),
        ]
        .into_iter()
        .fold(
            0,
            |m, (k, fails)| if fails { m | 1 << (k as usize) } else { m },
        )
    }

    #[inline]
    fn registry_ok(&self, c: &Cand) -> bool {
        self.registry
            .as_ref()
            .is_none_or(|ok| ok.get(c.idx as usize).copied().unwrap_or(false))
    }

    #[inline]
    pub fn violation(&self, c: &Cand) -> Option<Constraint> {
        if c.tflops < self.min_tflops {
            return Some(Constraint::MinTflops);
        }
        if self.network && !c.network {
            return Some(Constraint::Network);
        }
        if !self.registry_ok(c) {
            return Some(Constraint::Registry);
        }
        if let Some(ok) = self.regions
            && !ok.get(c.region as usize).copied().unwrap_or(false)
        {
            return Some(Constraint::Region);
        }
        if u32::from(c.reputation) < self.min_reputation {
            return Some(Constraint::MinReputation);
        }
        None
    }
}

/// The providers of a price class that pass a job's GPU model, compute
/// capability and memory requirements.
#[derive(Debug)]
pub(crate) struct Shape {
    key: ShapeKey,
    pub cands: Vec<Cand>,
    /// Providers excluded by each constraint up to `min_vram`.
    pub static_counts: [u32; super::N_CONSTRAINTS],
}

/// Every online provider with at least `gpus` GPUs, sorted by the static
/// score for one (GPUs, milli-CPUs) pair, which fixes the price.
#[derive(Debug)]
pub(crate) struct Class {
    pub cands: Vec<Cand>,
    /// Online providers with fewer GPUs.
    pub too_few_gpus: u32,
}

/// Which candidate list a job walks.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ShapeRef {
    /// A job without GPU filters walks its price class.
    Class(u32),
    Shape(u32),
}

#[derive(Debug, Default)]
pub(crate) struct ShapeCache {
    epoch: u64,
    /// Each node's rank by provider id (for deterministic tie-breaks).
    rank: Vec<u32>,
    class_ids: HashMap<(u32, u32), u32>,
    pub classes: Vec<Class>,
    by_hash: HashMap<u64, Vec<u32>>,
    pub shapes: Vec<Shape>,
    entries: usize,
    /// Which interned regions each requested region matches.
    region_sets: HashMap<String, Box<[bool]>>,
    /// Candidate lists built (classes and shapes), for benchmarks and tests.
    pub builds: u64,
}

/// Interned names (GPU models with their words; lower-cased regions).
#[derive(Debug, Default)]
pub(crate) struct Interner {
    ids: HashMap<String, u16>,
    pub names: Vec<String>,
    pub words: Vec<Vec<String>>,
}

/// Ids stop here: further names share it, and it matches nothing.
const OVERFLOW: u16 = u16::MAX - 1;

impl Interner {
    fn intern(&mut self, name: &str) -> u16 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = u16::try_from(self.names.len()).unwrap_or(OVERFLOW);
        if id >= OVERFLOW {
            return OVERFLOW;
        }
        self.names.push(name.to_string());
        self.words.push(words(name));
        self.ids.insert(name.to_string(), id);
        id
    }
}

/// Interned GPU kinds (model, compute capability, memory) and node GPU
/// signatures (multisets of kinds).
#[derive(Debug, Default)]
pub(crate) struct Kinds {
    ids: HashMap<KindAttrs, u16>,
    /// (model, compute capability, memory, MIG profile) of each kind.
    pub attrs: Vec<KindAttrs>,
    /// Interned MIG profiles: `mig_profiles[p - 1]` for profile id `p`
    /// (0: a whole GPU).
    pub mig_profiles: Vec<String>,
    sig_ids: HashMap<Vec<(u16, u32)>, u16>,
    /// (kind, count) of each signature.
    pub sigs: Vec<Vec<(u16, u32)>>,
}

/// Most distinct MIG profile names the fleet index keeps.
const MAX_MIG_PROFILES: usize = 256;

/// A kind of GPU unit: (model, compute capability, memory, MIG profile id
/// where 0 is a whole GPU).
pub(crate) type KindAttrs = (u16, ComputeCapability, u64, u16);

impl Kinds {
    /// The id of MIG profile `p` (0 for `None`: a whole GPU); `None` if a
    /// profile never seen is asked for (nothing can match it).
    pub(crate) fn mig_id(&self, p: Option<&str>) -> Option<u16> {
        match p {
            None => Some(0),
            Some(p) => self
                .mig_profiles
                .iter()
                .position(|q| q == p)
                .and_then(|i| u16::try_from(i + 1).ok()),
        }
    }

    fn intern_mig(&mut self, p: Option<&str>) -> u16 {
        if let Some(id) = self.mig_id(p) {
            return id;
        }
        // NVIDIA has a few dozen profiles; past this many distinct names
        // (adverts are the providers' word) a new one gets an id that no
        // job's `mig` resolves to, so its units match nothing.
        if self.mig_profiles.len() >= MAX_MIG_PROFILES {
            return u16::MAX;
        }
        self.mig_profiles.push(p.unwrap_or_default().to_string());
        u16::try_from(self.mig_profiles.len()).unwrap_or(u16::MAX)
    }

    /// Whether any provider ever advertised a MIG instance.
    pub(crate) fn any_mig(&self) -> bool {
        !self.mig_profiles.is_empty()
    }

    fn kind(&mut self, attrs: KindAttrs) -> u16 {
        if let Some(&id) = self.ids.get(&attrs) {
            return id;
        }
        let id = u16::try_from(self.attrs.len())
            .unwrap_or(OVERFLOW)
            .min(OVERFLOW);
        if id < OVERFLOW {
            self.attrs.push(attrs);
            self.ids.insert(attrs, id);
        }
        id
    }

    fn sig(&mut self, sig: Vec<(u16, u32)>) -> u16 {
        if let Some(&id) = self.sig_ids.get(&sig) {
            return id;
        }
        let id = u16::try_from(self.sigs.len())
            .unwrap_or(OVERFLOW)
            .min(OVERFLOW);
        if id < OVERFLOW {
            self.sigs.push(sig.clone());
            self.sig_ids.insert(sig, id);
        }
        id
    }
}

/// The providers the scheduler may use and what is reserved on them.
///
/// Indices (`Placement::index`, [`Fleet::view`]) are stable for the life of
/// the fleet: a provider that leaves keeps its index, and comes back to it.
#[derive(Debug, Default)]
pub struct Fleet {
    pub(crate) nodes: Vec<Node>,
    pub(crate) load: Vec<Load>,
    pub(crate) stat: Vec<NodeStatic>,
    by_id: HashMap<ProviderId, u32>,
    models: Interner,
    regions: Interner,
    kinds: Kinds,
    online: usize,
    /// Bumped whenever the candidate cache must be rebuilt.
    epoch: u64,
    pub(crate) cache: ShapeCache,
    reservations: HashMap<u64, Reservation>,
    next_reservation: u64,
    /// Current round (holds are valid within one round).
    pub(crate) round: u32,
    /// Scratch space for a decision (kept to avoid allocating per decision).
    pub(crate) picked: Vec<Pick>,
}

impl Fleet {
    pub fn new() -> Self {
        Self {
            round: 1,
            ..Self::default()
        }
    }

    /// A fleet of `views`, nothing reserved.
    pub fn from_views(views: impl IntoIterator<Item = ProviderView>) -> Self {
        let mut f = Self::new();
        for v in views {
            f.upsert(v);
        }
        f
    }

    /// Adds a provider or updates it (a heartbeat). Its reservations stay;
    /// if its capacity shrank below them, it simply has nothing free.
    /// Returns its index.
    pub fn upsert(&mut self, view: ProviderView) -> usize {
        let stat = self.node_static(&view);
        let mut cached = view.advert.cached.clone();
        cached.sort_unstable();
        cached.dedup();
        match self.by_id.get(&view.id) {
            Some(&i) => {
                let i = i as usize;
                let node = &mut self.nodes[i];
                if !node.alive || !node.view.same_static(&view) {
                    self.epoch += 1;
                }
                if !node.alive {
                    self.online += 1;
                }
                self.load[i].set_capacity(&view.advert);
                self.stat[i] = stat;
                *node = Node {
                    view,
                    alive: true,
                    cached,
                };
                i
            }
            None => {
                let i = self.nodes.len();
                let mut load = Load::default();
                load.set_capacity(&view.advert);
                self.by_id
                    .insert(view.id, u32::try_from(i).unwrap_or(u32::MAX));
                self.nodes.push(Node {
                    view,
                    alive: true,
                    cached,
                });
                self.stat.push(stat);
                self.load.push(load);
                self.online += 1;
                self.epoch += 1;
                i
            }
        }
    }

    fn node_static(&mut self, view: &ProviderView) -> NodeStatic {
        let a = &view.advert;
        let mut kinds: Vec<Kind> = Vec::new();
        for (pos, g) in a.gpus.iter().take(MAX_GPUS_PER_NODE).enumerate() {
            let model = self.models.intern(&g.name);
            let mig = self.kinds.intern_mig(g.mig.as_deref());
            let id = self.kinds.kind((
                model,
                ComputeCapability::from(g.compute_capability),
                g.memory_total.0,
                mig,
            ));
            match kinds.iter_mut().find(|k| k.id == id) {
                Some(k) => k.mask |= 1 << pos,
                None => kinds.push(Kind { mask: 1 << pos, id }),
            }
        }
        kinds.sort_unstable_by_key(|k| k.id);
        let sig = self
            .kinds
            .sig(kinds.iter().map(|k| (k.id, k.mask.count_ones())).collect());
        NodeStatic {
            region: a
                .region
                .as_ref()
                .map_or(NO_REGION, |r| self.regions.intern(&r.to_ascii_lowercase())),
            network: a.allows_network,
            reputation: view.reputation,
            tflops: view.tflops.unwrap_or(0),
            n_gpus: a.gpus.len().min(MAX_GPUS_PER_NODE) as u32,
            kinds: kinds.into_boxed_slice(),
            sig,
        }
    }

    /// Takes a provider out (its lease ran out). Its reservations stay
    /// valid; releasing them later is fine.
    pub fn remove(&mut self, id: &ProviderId) -> bool {
        let Some(&i) = self.by_id.get(id) else {
            return false;
        };
        let node = &mut self.nodes[i as usize];
        if !node.alive {
            return false;
        }
        node.alive = false;
        self.online -= 1;
        self.epoch += 1;
        true
    }

    /// Providers online.
    pub fn online(&self) -> usize {
        self.online
    }

    pub fn index_of(&self, id: &ProviderId) -> Option<usize> {
        self.by_id
            .get(id)
            .map(|&i| i as usize)
            .filter(|&i| self.nodes[i].alive)
    }

    /// The provider at `index` (online or not).
    pub fn view(&self, index: usize) -> &ProviderView {
        &self.nodes[index].view
    }

    /// Online providers with their indices.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &ProviderView)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive)
            .map(|(i, n)| (i, &n.view))
    }

    /// What is free on the provider at `index` now.
    pub fn free(&self, index: usize) -> Free {
        let l = &self.load[index];
        Free {
            slots: l.slots.saturating_sub(l.running),
            gpus: (l.gpu_all & !l.gpu_used).count_ones(),
            millicpu: l.cap_mcpu.saturating_sub(l.used_mcpu),
            memory: l.cap_mem.saturating_sub(l.used_mem),
            disk: l.cap_disk.saturating_sub(l.used_disk),
        }
    }

    /// Jobs running (reserved) on the provider at `index`.
    pub fn running(&self, index: usize) -> u32 {
        self.load[index].running
    }

    /// Live reservations.
    pub fn reservations(&self) -> usize {
        self.reservations.len()
    }

    /// Candidate lists built since the fleet was made (a cache miss each).
    pub fn shapes_built(&self) -> u64 {
        self.cache.builds
    }

    /// Records work already running on `id` (rebuilding the fleet from the
    /// database), whether or not it fits: GPUs are taken lowest index first.
    /// `None` if the provider is unknown.
    pub fn book(&mut self, id: &ProviderId, spec: &JobSpec) -> Option<Placement> {
        let &i = self.by_id.get(id)?;
        let l = &self.load[i as usize];
        let gpus = lowest(l.gpu_all & !l.gpu_used, spec.resources.gpus);
        let price = self.nodes[i as usize]
            .view
            .advert
            .price_per_hour(spec)
            .unwrap_or_default();
        Some(self.reserve(i, gpus, &Need::of(spec), price.0))
    }

    /// Gives a reservation back. `false` if it was already released.
    pub fn release(&mut self, placement: &Placement) -> bool {
        self.release_id(placement.reservation)
    }

    /// Gives a reservation back by id. `false` if it was already released.
    pub fn release_id(&mut self, id: ReservationId) -> bool {
        let Some(r) = self.reservations.remove(&id.0) else {
            return false;
        };
        let l = &mut self.load[r.idx as usize];
        l.running = l.running.saturating_sub(1);
        l.used_mcpu = l.used_mcpu.saturating_sub(r.mcpu);
        l.used_mem = l.used_mem.saturating_sub(r.mem);
        l.used_disk = l.used_disk.saturating_sub(r.disk);
        l.gpu_used &= !r.gpus;
        true
    }

    /// Reserves `need` with GPUs `gpus` (positions) on node `idx`.
    pub(crate) fn reserve(&mut self, idx: u32, gpus: u64, need: &Need, price: u64) -> Placement {
        let l = &mut self.load[idx as usize];
        l.running += 1;
        l.used_mcpu = l.used_mcpu.saturating_add(need.mcpu);
        l.used_mem = l.used_mem.saturating_add(need.mem);
        l.used_disk = l.used_disk.saturating_add(need.disk);
        debug_assert_eq!(l.gpu_used & gpus, 0, "GPU double-booked");
        l.gpu_used |= gpus;
        let id = self.next_reservation;
        self.next_reservation += 1;
        self.reservations.insert(
            id,
            Reservation {
                idx,
                gpus,
                mcpu: need.mcpu,
                mem: need.mem,
                disk: need.disk,
            },
        );
        let node = &self.nodes[idx as usize];
        let adv = node.gpus();
        Placement {
            index: idx as usize,
            provider: node.view.id,
            price_per_hour: kiln_protocol::Credits(price),
            gpus: bits(gpus).map(|b| adv[b].index).collect(),
            reservation: ReservationId(id),
        }
    }

    /// Starts a scheduling round: holds from earlier rounds lapse.
    pub(crate) fn next_round(&mut self) {
        self.round = self.round.wrapping_add(1).max(1);
    }

    /// The candidate list `spec` walks, building it on a miss.
    pub(crate) fn shape_for(&mut self, spec: &JobSpec) -> ShapeRef {
        let c = &mut self.cache;
        if c.epoch != self.epoch || c.classes.len() > CLASS_BUDGET {
            c.class_ids.clear();
            c.classes.clear();
            if c.epoch != self.epoch {
                c.rank.clear();
            }
            c.epoch = self.epoch;
            c.entries = SHAPE_BUDGET + 1;
        }
        if c.entries > SHAPE_BUDGET || c.region_sets.len() > 4096 {
            c.by_hash.clear();
            c.shapes.clear();
            c.region_sets.clear();
            c.entries = 0;
        }
        self.ensure_region(spec);
        let class = self.ensure_class(spec);
        let r = &spec.resources;
        // A price class counts every GPU unit; it serves a job alone only
        // when each unit would qualify: no model, capability or memory
        // filter, and no MIG on either side (a job without MIG must not be
        // given an instance, nor one asking for MIG a whole GPU).
        let unfiltered =
            r.gpu_models.is_empty() && r.min_compute_capability.is_none() && r.min_vram.0 == 0;
        if r.gpus == 0 || (unfiltered && r.mig.is_none() && !self.kinds.any_mig()) {
            return ShapeRef::Class(class);
        }
        let c = &mut self.cache;
        let h = ShapeKey::hash_of(spec);
        if let Some(list) = c.by_hash.get(&h) {
            for &s in list {
                if c.shapes[s as usize].key.matches(spec) {
                    return ShapeRef::Shape(s);
                }
            }
        }
        let shape = self.build_shape(spec, class);
        let c = &mut self.cache;
        let s = u32::try_from(c.shapes.len()).unwrap_or(u32::MAX);
        c.entries += shape.cands.len() + 16;
        c.builds += 1;
        c.shapes.push(shape);
        c.by_hash.entry(h).or_default().push(s);
        ShapeRef::Shape(s)
    }

    /// A candidate list and the providers excluded before it (by the GPU
    /// requirements).
    pub(crate) fn candidates(&self, r: ShapeRef) -> (&[Cand], [u32; super::N_CONSTRAINTS]) {
        match r {
            ShapeRef::Class(c) => {
                let class = &self.cache.classes[c as usize];
                let mut counts = [0; super::N_CONSTRAINTS];
                counts[Constraint::Gpus as usize] = class.too_few_gpus;
                (&class.cands, counts)
            }
            ShapeRef::Shape(s) => {
                let shape = &self.cache.shapes[s as usize];
                (&shape.cands, shape.static_counts)
            }
        }
    }

    /// Makes sure the region set `spec` asks for is cached.
    fn ensure_region(&mut self, spec: &JobSpec) {
        if let Some(want) = &spec.resources.region
            && !self.cache.region_sets.contains_key(want)
        {
            let lower = want.to_ascii_lowercase();
            let set = self
                .regions
                .names
                .iter()
                .map(|have| region_matches_lower(&lower, have))
                .collect();
            self.cache.region_sets.insert(want.clone(), set);
        }
    }

    /// The TFLOP/s, network, region and reputation filter of `spec` (call
    /// after [`Fleet::shape_for`], which caches its region set).
    pub(crate) fn job_filter(&self, spec: &JobSpec) -> JobFilter<'_> {
        let r = &spec.resources;
        JobFilter {
            min_tflops: if r.gpus > 0 { r.min_tflops } else { 0 },
            network: spec.network == NetworkMode::Full,
            registry: spec.image.registry_host().map(|h| {
                self.nodes
                    .iter()
                    .map(|n| n.view.advert.registries.iter().any(|r| r == h))
                    .collect()
            }),
            // A region set missing from the cache (impossible after
            // `shape_for`) matches nothing rather than everything.
            regions: r
                .region
                .as_ref()
                .map(|w| self.cache.region_sets.get(w).map_or(&[][..], |b| &b[..])),
            min_reputation: r.min_reputation,
        }
    }

    /// The price class of `spec` (its GPUs and CPUs), built if missing.
    fn ensure_class(&mut self, spec: &JobSpec) -> u32 {
        let k = spec.resources.gpus;
        let key = (k, spec.resources.cpus.0);
        if let Some(&c) = self.cache.class_ids.get(&key) {
            return c;
        }
        if self.cache.rank.is_empty() {
            let mut order: Vec<u32> = (0..self.nodes.len() as u32).collect();
            order.sort_unstable_by(|&a, &b| {
                self.nodes[a as usize]
                    .view
                    .id
                    .cmp(&self.nodes[b as usize].view.id)
            });
            let mut rank = vec![0u32; self.nodes.len()];
            for (r, &i) in order.iter().enumerate() {
                rank[i as usize] = r as u32;
            }
            self.cache.rank = rank;
        }
        // (price, TFLOP/s per price, reputation, id rank, index)
        let mut keyed: Vec<(u64, u64, u32, u32, u32)> = Vec::with_capacity(self.online);
        let mut too_few_gpus = 0;
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.alive {
                continue;
            }
            let st = &self.stat[i];
            if st.n_gpus < k {
                too_few_gpus += 1;
                continue;
            }
            // An overflowing price is above every limit.
            let price = node
                .view
                .advert
                .price_per_hour(spec)
                .map_or(u64::MAX, |p| p.0);
            let flops = u64::from(st.tflops) * u64::from(k);
            let tpp = flops.saturating_mul(1_000_000_000) / price.max(1);
            keyed.push((price, tpp, st.reputation, self.cache.rank[i], i as u32));
        }
        keyed.sort_unstable_by_key(|&(p, t, r, id, _)| {
            (p, std::cmp::Reverse(t), std::cmp::Reverse(r), id)
        });
        let mut group = 0u32;
        let mut prev = None;
        let cands = keyed
            .into_iter()
            .map(|(price, tpp, rep, _, idx)| {
                if prev.is_some_and(|p| p != (price, tpp, rep)) {
                    group += 1;
                }
                prev = Some((price, tpp, rep));
                let st = &self.stat[idx as usize];
                Cand {
                    idx,
                    group,
                    price,
                    qual: st.kinds.iter().fold(0, |m, k| m | k.mask),
                    tflops: st.tflops,
                    region: st.region,
                    reputation: u16::try_from(st.reputation).unwrap_or(u16::MAX),
                    sig: st.sig,
                    network: st.network,
                }
            })
            .collect();
        let c = &mut self.cache;
        let id = u32::try_from(c.classes.len()).unwrap_or(u32::MAX);
        c.classes.push(Class {
            cands,
            too_few_gpus,
        });
        c.class_ids.insert(key, id);
        c.builds += 1;
        id
    }

    /// Filters price class `class` by `spec`'s GPU model, compute
    /// capability and memory requirements.
    fn build_shape(&self, spec: &JobSpec, class: u32) -> Shape {
        let key = ShapeKey::of(spec);
        let k = key.gpus;
        let models: Option<Vec<bool>> = (!key.gpu_models.is_empty()).then(|| {
            let pats: Vec<Vec<String>> = key.gpu_models.iter().map(|m| words(m)).collect();
            self.models
                .words
                .iter()
                .map(|name| pats.iter().any(|p| words_match(p, name)))
                .collect()
        });
        // Per kind: passes (unit kind, + models, + compute capability, +
        // memory). A profile no provider has matches no kind.
        let mig = self.kinds.mig_id(key.mig.as_deref());
        let kind_ok: Vec<(bool, bool, bool, bool)> = self
            .kinds
            .attrs
            .iter()
            .map(|&(model, cc, vram, profile)| {
                let k = Some(profile) == mig;
                let m = k
                    && models
                        .as_ref()
                        .is_none_or(|ok| ok.get(model as usize).copied().unwrap_or(false));
                let c = m && key.min_cc.is_none_or(|min| cc >= min);
                (k, m, c, c && vram >= key.min_vram)
            })
            .collect();
        // Per signature: the first GPU requirement it fails, or whether all
        // its GPUs qualify.
        let sig_verdict: Vec<Result<bool, Constraint>> = self
            .kinds
            .sigs
            .iter()
            .map(|sig| {
                let count = |f: fn(&(bool, bool, bool, bool)) -> bool| -> u32 {
                    sig.iter()
                        .filter(|(kind, _)| f(&kind_ok[*kind as usize]))
                        .map(|(_, n)| n)
                        .sum()
                };
                if count(|o| o.0) < k {
                    return Err(Constraint::Mig);
                }
                if count(|o| o.1) < k {
                    return Err(Constraint::GpuModels);
                }
                if count(|o| o.2) < k {
                    return Err(Constraint::MinComputeCapability);
                }
                let ok = count(|o| o.3);
                if ok < k {
                    return Err(Constraint::MinVram);
                }
                Ok(ok == sig.iter().map(|(_, n)| n).sum::<u32>())
            })
            .collect();
        let class = &self.cache.classes[class as usize];
        let mut counts = [0u32; super::N_CONSTRAINTS];
        counts[Constraint::Gpus as usize] = class.too_few_gpus;
        let mut cands = Vec::new();
        for c in &class.cands {
            match sig_verdict
                .get(c.sig as usize)
                .copied()
                .unwrap_or(Err(Constraint::GpuModels))
            {
                Err(v) => counts[v as usize] += 1,
                Ok(all) => {
                    let qual = if all {
                        c.qual
                    } else {
                        self.stat[c.idx as usize]
                            .kinds
                            .iter()
                            .filter(|kd| kind_ok[kd.id as usize].3)
                            .fold(0, |m, kd| m | kd.mask)
                    };
                    cands.push(Cand { qual, ..*c });
                }
            }
        }
        Shape {
            key,
            cands,
            static_counts: counts,
        }
    }
}

/// The `k` lowest set bits of `free` (fewer if it has fewer).
pub(crate) fn lowest(mut free: u64, k: u32) -> u64 {
    let mut m = 0;
    for _ in 0..k {
        if free == 0 {
            break;
        }
        let b = free & free.wrapping_neg();
        m |= b;
        free ^= b;
    }
    m
}

/// Positions of the set bits of `m`, lowest first.
pub(crate) fn bits(mut m: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let b = m.trailing_zeros() as usize;
            m &= m - 1;
            b
        })
    })
}
