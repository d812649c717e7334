//! Matching names: GPU models by whole words, regions by prefix.

// GPU names are matched by the rule the node applies too (kiln-protocol).
pub use kiln_protocol::spec::gpu_model_matches;
pub(crate) use kiln_protocol::spec::{gpu_name_words as words, gpu_words_match as words_match};

/// Whether a job asking for `wanted` may run in `region`: equal, or a
/// prefix ending at a `-` (`eu` matches `eu-west-1`), ignoring case.
pub fn region_matches(wanted: &str, region: &str) -> bool {
    region_matches_lower(&wanted.to_ascii_lowercase(), &region.to_ascii_lowercase())
}

pub(crate) fn region_matches_lower(wanted: &str, region: &str) -> bool {
    region
        .strip_prefix(wanted)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}
