//! Who may re-execute a job to verify it: every provider that could run
//! it now, as the matcher would judge it, except those excluded (the
//! provider whose result is checked and every earlier verifier of it).
//! The caller picks among them at random, so a provider cannot arrange
//! to be its own (or its accomplice's) verifier by being the best match.

use kiln_protocol::{Compare, JobSpec, ProviderId};

use super::fleet::{Fleet, Need};

/// The spec a verifier must fit: the job's, and for an `exact` comparison
/// of GPU work only the original's GPU model (bit-identical floating point
/// needs the same hardware; a `tolerance` or `stdout` comparison accepts
/// any model the buyer accepted).
pub fn verifier_spec(spec: &JobSpec, original_gpu_model: Option<&str>) -> JobSpec {
    let mut spec = spec.clone();
    if spec.resources.gpus > 0
        && spec.verify.compare == Compare::Exact
        && let Some(model) = original_gpu_model
    {
        spec.resources.gpu_models = vec![model.to_string()];
    }
    spec
}

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
