//! Matching names: GPU models by whole words, regions by prefix.

/// Words of a GPU name or model pattern: lower-cased, split on spaces, `_` and `-`.
pub(crate) fn words(s: &str) -> Vec<String> {
    s.split([' ', '_', '-'])
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Whether `pattern`'s words appear consecutively in `name`'s.
pub(crate) fn words_match(pattern: &[String], name: &[String]) -> bool {
    !pattern.is_empty() && name.windows(pattern.len()).any(|w| w == pattern)
}

/// Whether the requested GPU model `pattern` matches a GPU named `name`
/// (whole words, in order, ignoring case and `_`/`-`/space differences).
pub fn gpu_model_matches(pattern: &str, name: &str) -> bool {
    words_match(&words(pattern), &words(name))
}

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
