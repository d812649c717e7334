//! Who may re-execute a job to verify it: every provider that could run
//! it now, as the matcher would judge it, except those excluded (the
//! provider whose result is checked and every earlier verifier of it).
//! The caller picks among them at random, so a provider cannot arrange
//! to be its own (or its accomplice's) verifier by being the best match.

use kiln_protocol::{JobSpec, ProviderId};

use super::fleet::{Fleet, Need};

impl Fleet {
    /// Every online provider that fits `spec` now (every static and
    /// dynamic constraint of the matcher, within the price limit), except
    /// those in `exclude`, in the matcher's candidate order.
    pub fn eligible(&mut self, spec: &JobSpec, exclude: &[ProviderId]) -> Vec<ProviderId> {
        if spec.resources.gang > 1 {
            return Vec::new();
        }
        let shape = self.shape_for(spec);
        let need = Need::of(spec);
        let max_price = spec.resources.max_price_per_hour.0;
        let round = self.round;
        let filter = self.job_filter(spec);
        let (cands, _) = self.candidates(shape);
        cands
            .iter()
            .filter(|c| c.price <= max_price && filter.violation(c).is_none())
            .filter(|c| {
                self.load[c.idx as usize]
                    .violation(c.qual, &need, round, 0)
                    .is_none()
            })
            .map(|c| self.nodes[c.idx as usize].view.id)
            .filter(|id| !exclude.contains(id))
            .collect()
    }
}
