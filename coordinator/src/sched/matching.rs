//! Placing one job (or one gang) on the fleet.

use std::cmp::Reverse;

use kiln_protocol::{Credits, JobSpec};

use super::fleet::{Fleet, Need, Pick, Placement, lowest};
use super::{Constraint, N_CONSTRAINTS, NotPlaced, TflopsSeen, Wanted};

/// Places a single-node job (`gang == 1`) and reserves what it takes.
///
/// A gang job is refused with a why-not line saying so: use [`place_gang`],
/// whose all-or-nothing dispatch the caller must handle.
pub fn place(spec: &JobSpec, fleet: &mut Fleet) -> Result<Placement, NotPlaced> {
    if spec.resources.gang > 1 {
        let mut np = not_placed(fleet.online(), spec);
        np.gang_unsupported = true;
        return Err(np);
    }
    fleet.select(spec, 1, 0)?;
    let p = fleet.picked[0];
    let need = Need::of(spec);
    let gpus = lowest(p.qual & free_gpus(fleet, p.idx), need.k);
    Ok(fleet.reserve(p.idx, gpus, &need, p.price))
}

/// Places all `gang` nodes of a job on distinct providers, or none: on
/// success every node is reserved; on failure nothing is.
pub fn place_gang(spec: &JobSpec, fleet: &mut Fleet) -> Result<Vec<Placement>, NotPlaced> {
    fleet.place_k(spec, 0)
}

fn free_gpus(fleet: &Fleet, idx: u32) -> u64 {
    let l = &fleet.load[idx as usize];
    l.gpu_all & !l.gpu_used
}

fn not_placed(online: usize, spec: &JobSpec) -> NotPlaced {
    NotPlaced {
        online,
        counts: [0; N_CONSTRAINTS],
        fit: 0,
        gang: spec.resources.gang.max(1),
        holding: 0,
        gang_unsupported: false,
        unbonded: 0,
        min_stake: Credits(0),
        tflops_seen: TflopsSeen::default(),
        every: None,
        wanted: Wanted::of(spec),
    }
}

impl Fleet {
    /// Places every node of `spec` (its `gang`, at least 1), as the job
    /// holding token `holder` (0: none) may.
    pub(crate) fn place_k(
        &mut self,
        spec: &JobSpec,
        holder: u32,
    ) -> Result<Vec<Placement>, NotPlaced> {
        let k = spec.resources.gang.max(1);
        self.select(spec, k, holder)?;
        let need = Need::of(spec);
        let mut out = Vec::with_capacity(k as usize);
        for i in 0..k as usize {
            let p = self.picked[i];
            let gpus = lowest(p.qual & free_gpus(self, p.idx), need.k);
            out.push(self.reserve(p.idx, gpus, &need, p.price));
        }
        Ok(out)
    }

    /// Finds the best `k` distinct providers for one node of `spec` each,
    /// leaving them in `self.picked[..k]`, or says why there are not `k`.
    pub(crate) fn select(&mut self, spec: &JobSpec, k: u32, holder: u32) -> Result<(), NotPlaced> {
        let k = k as usize;
        let s = self.shape_for(spec);
        let need = Need::of(spec);
        let max_price = spec.resources.max_price_per_hour.0;
        let round = self.round;
        let online = self.online();
        let mut picked = std::mem::take(&mut self.picked);
        picked.clear();
        let filter = self.job_filter(spec);
        let (cands, static_counts) = self.candidates(s);
        let cut = cands.partition_point(|c| c.price <= max_price);
        let mut dynamic = [0u32; N_CONSTRAINTS];
        let mut seen = TflopsSeen::default();
        let nodes = &self.nodes;
        let mut excluded = |v: Constraint, idx: u32| {
            dynamic[v as usize] += 1;
            if v == Constraint::MinTflops {
                seen.note(nodes[idx as usize].view.tflops);
            }
        };
        let mut boundary: Option<u32> = None;
        for (pos, c) in cands[..cut].iter().enumerate() {
            if boundary.is_some_and(|g| c.group != g) {
                break;
            }
            if let Some(v) = filter.violation(c) {
                excluded(v, c.idx);
                continue;
            }
            let l = &self.load[c.idx as usize];
            match l.violation(c.qual, &need, round, holder) {
                Some(v) => excluded(v, c.idx),
                None => {
                    picked.push(Pick {
                        pos: pos as u32,
                        group: c.group,
                        idx: c.idx,
                        qual: c.qual,
                        price: c.price,
                        locality: 0,
                        load: l.load_ppm(),
                    });
                    if picked.len() == k {
                        boundary = Some(c.group);
                    }
                }
            }
        }
        if picked.len() >= k {
            if picked.len() > k {
                // Ties with the k-th on the static score: locality, load, id.
                // Inputs and the Kiln image count alike.
                let stored = spec.stored_cids();
                if !stored.is_empty() {
                    let last = picked[k - 1].group;
                    for p in picked.iter_mut().filter(|p| p.group == last) {
                        let cached = &self.nodes[p.idx as usize].cached;
                        p.locality = stored
                            .iter()
                            .filter(|c| cached.binary_search(c).is_ok())
                            .count() as u32;
                    }
                }
                picked.sort_unstable_by_key(|p| (p.group, Reverse(p.locality), p.load, p.pos));
            }
            self.picked = picked;
            return Ok(());
        }
        // Beyond the price limit: counted against network, region,
        // reputation (checked before price), else the price.
        for c in &cands[cut..] {
            excluded(filter.violation(c).unwrap_or(Constraint::MaxPrice), c.idx);
        }
        // Every constraint each provider fails, not only the first: a job
        // asking for too many CPUs, too low a price and another region
        // hears about all three.
        let mut every = [0u32; N_CONSTRAINTS];
        let mut several = false;
        for c in cands {
            let mut fails = filter.violations(c)
                | self.load[c.idx as usize].violations(c.qual, &need, round, holder);
            if c.price > max_price {
                fails |= 1 << (Constraint::MaxPrice as usize);
            }
            several |= fails.count_ones() > 1;
            for (i, n) in every.iter_mut().enumerate() {
                *n += u32::from(fails & (1 << i) != 0);
            }
        }
        let mut np = not_placed(online, spec);
        np.every = several.then_some(every);
        np.tflops_seen = seen;
        np.counts = static_counts;
        for (n, d) in np.counts.iter_mut().zip(dynamic) {
            *n += d;
        }
        np.fit = picked.len();
        self.picked = picked;
        Err(np)
    }

    /// Holds up to `gang` providers for a job that has waited too long
    /// (token `holder`) and cannot be placed now: for the rest of this round
    /// no job after it may be placed on them. Prefers providers it could
    /// use soonest: fewest missing GPUs, then fewest running jobs, then the
    /// usual order. Returns how many it holds.
    pub(crate) fn hold(&mut self, spec: &JobSpec, holder: u32) -> u32 {
        let k = spec.resources.gang.max(1) as usize;
        let s = self.shape_for(spec);
        let need = Need::of(spec);
        let max_price = spec.resources.max_price_per_hour.0;
        let round = self.round;
        let filter = self.job_filter(spec);
        let (cands, _) = self.candidates(s);
        let cut = cands.partition_point(|c| c.price <= max_price);
        let mut best: Vec<(u32, u32, usize, u32)> = cands[..cut]
            .iter()
            .enumerate()
            .filter(|(_, c)| filter.violation(c).is_none())
            .filter_map(|(pos, c)| {
                let l = &self.load[c.idx as usize];
                let taken = l.held_round == round && l.held_for != holder;
                (!taken && l.could_fit(c.qual, &need)).then(|| {
                    let free = (c.qual & l.gpu_all & !l.gpu_used).count_ones();
                    (need.k.saturating_sub(free), l.running, pos, c.idx)
                })
            })
            .collect();
        best.sort_unstable();
        best.truncate(k);
        for &(_, _, _, idx) in &best {
            let l = &mut self.load[idx as usize];
            l.held_round = round;
            l.held_for = holder;
        }
        best.len() as u32
    }
}
