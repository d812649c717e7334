//! What a buyer asks for: a [`JobSpec`].
//!
//! Specs are written in TOML by people and travel as JSON over the REST API;
//! both forms deserialize into the same struct, and [`JobSpec::validate`]
//! checks what the type system cannot. Every error names the field path
//! (`resources.memory`) and the reason, so a buyer can fix it at once.
//!
//! ```toml
//! image = "sha256:3f5a…"          # pinned: an image id or name@sha256:digest
//! command = ["demo", "42"]
//! env = { RUST_LOG = "info" }
//!
//! [[inputs]]
//! cid = "bafkr4i…"
//! path = "/in/data.bin"
//!
//! [resources]
//! cpus = 1.5
//! memory = "512MiB"
//! timeout = "10m"
//! max_price_per_hour = 2000000    # micro-credits
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::content::ContentId;
use crate::units::{ByteSize, Credits, MilliCpu, Seconds};

/// A container image pinned by content: `sha256:<64 hex>` (a local image id)
/// or `name[:tag]@sha256:<64 hex>` (a repository digest). Mutable tags alone
/// are refused: a buyer must know exactly what runs, and a verifier must be
/// able to re-run the same thing.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ImageRef(pub String);

impl ImageRef {
    /// The `sha256:<hex>` part.
    pub fn digest(&self) -> Option<&str> {
        let d = match self.0.rsplit_once('@') {
            Some((_, d)) => d,
            None => self.0.as_str(),
        };
        let hex = d.strip_prefix("sha256:")?;
        (hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then_some(d)
    }
    /// Whether this names a local image id (as opposed to a repository digest).
    pub fn is_image_id(&self) -> bool {
        !self.0.contains('@') && self.digest().is_some()
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A content-addressed input, mounted read-only at `path` inside the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub cid: ContentId,
    pub path: String,
}

/// Whether a job may use the network. Off unless the buyer asks for it *and*
/// the provider's policy allows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NetworkMode {
    /// No network interface but loopback (the default).
    #[default]
    #[serde(rename = "none")]
    Isolated,
    /// Outbound network through the provider's default bridge.
    #[serde(rename = "full")]
    Full,
}

/// Resources the job needs, and the most the buyer will pay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    pub cpus: MilliCpu,
    pub memory: ByteSize,
    pub gpus: u32,
    /// Wall-clock limit; the container is killed when it is reached.
    pub timeout: Seconds,
    /// Maximum process count inside the container.
    pub pids: u32,
    /// Most the buyer pays per hour of this job, in micro-credits.
    pub max_price_per_hour: Credits,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpus: MilliCpu(1000),
            memory: ByteSize(512 << 20),
            gpus: 0,
            timeout: Seconds(600),
            pids: 256,
            max_price_per_hour: Credits(1_000_000),
        }
    }
}

/// A job: what to run, on what data, with what resources.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub image: ImageRef,
    /// Replaces the image's entrypoint when set.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Arguments (the image's `CMD`).
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    /// Directory inside the container whose contents become the job's output.
    #[serde(default = "default_output_path")]
    pub output_path: String,
    #[serde(default)]
    pub network: NetworkMode,
    #[serde(default)]
    pub resources: Resources,
}

fn default_output_path() -> String {
    "/out".into()
}

/// A spec field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
pub const MIN_MEMORY: u64 = 8 << 20;
const RESERVED_PATHS: [&str; 6] = ["/proc", "/sys", "/dev", "/etc", "/tmp", "/"];

/// A clean absolute container path: `/a/b`, no `.`/`..`, no trailing `/`.
fn check_abs_path(field: &str, p: &str) -> Result<(), SpecError> {
    let clean = p.starts_with('/')
        && p.len() > 1
        && !p.ends_with('/')
        && !p.contains('\0')
        && p[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !clean {
        return Err(err(
            field,
            format!(
                "`{p}` must be a clean absolute path such as /in/data (no `..`, `.`, `//` or trailing `/`)"
            ),
        ));
    }
    if let Some(r) = RESERVED_PATHS
        .iter()
        .find(|r| p == **r || (**r != "/" && p.starts_with(&format!("{r}/"))))
    {
        return Err(err(
            field,
            format!("`{p}` is inside the reserved system path {r}"),
        ));
    }
    Ok(())
}

fn overlaps(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

impl JobSpec {
    /// A minimal spec running `command` in `image` with default resources.
    pub fn new(image: impl Into<String>, command: Vec<String>) -> Self {
        Self {
            image: ImageRef(image.into()),
            entrypoint: None,
            command,
            env: BTreeMap::new(),
            inputs: Vec::new(),
            output_path: default_output_path(),
            network: NetworkMode::Isolated,
            resources: Resources::default(),
        }
    }

    /// Checks everything the types do not. The first problem found is returned
    /// with its field path.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.image.digest().is_none() {
            return Err(err(
                "image",
                format!(
                    "`{}` is not pinned: use an image id (sha256:<64 hex>) or name@sha256:<64 hex>; \
                     `docker image inspect --format '{{{{.Id}}}}' <image>` prints the id",
                    self.image
                ),
            ));
        }
        if let Some(ep) = &self.entrypoint
            && ep.is_empty()
        {
            return Err(err(
                "entrypoint",
                "must not be empty when given; omit it to use the image's",
            ));
        }
        let args = self.entrypoint.iter().flatten().chain(&self.command);
        for (i, a) in args.enumerate() {
            if a.contains('\0') || a.len() > 16 * 1024 {
                return Err(err(
                    format!("command[{i}]"),
                    "contains a NUL byte or is longer than 16 KiB",
                ));
            }
        }
        if self.command.len() > 1024 {
            return Err(err("command", "more than 1024 arguments"));
        }
        if self.env.len() > 256 {
            return Err(err("env", "more than 256 variables"));
        }
        for (k, v) in &self.env {
            let ok_name = !k.is_empty()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !k.as_bytes()[0].is_ascii_digit();
            if !ok_name {
                return Err(err(
                    format!("env.{k}"),
                    "names are letters, digits and `_`, not starting with a digit",
                ));
            }
            if k.starts_with("KILN_") {
                return Err(err(
                    format!("env.{k}"),
                    "the KILN_ prefix is reserved for variables Kiln sets",
                ));
            }
            if v.contains('\0') || v.len() > 32 * 1024 {
                return Err(err(
                    format!("env.{k}"),
                    "value contains a NUL byte or is longer than 32 KiB",
                ));
            }
        }
        check_abs_path("output_path", &self.output_path)?;
        if self.inputs.len() > 1024 {
            return Err(err("inputs", "more than 1024 inputs"));
        }
        for (i, input) in self.inputs.iter().enumerate() {
            let field = format!("inputs[{i}].path");
            check_abs_path(&field, &input.path)?;
            if overlaps(&input.path, &self.output_path) {
                return Err(err(
                    field,
                    format!(
                        "`{}` overlaps the output path `{}`",
                        input.path, self.output_path
                    ),
                ));
            }
            if let Some(j) = self.inputs[..i]
                .iter()
                .position(|o| overlaps(&o.path, &input.path))
            {
                return Err(err(
                    field,
                    format!("`{}` overlaps inputs[{j}].path", input.path),
                ));
            }
        }
        let r = &self.resources;
        if r.cpus.0 == 0 || r.cpus.0 > 1024 * 1000 {
            return Err(err(
                "resources.cpus",
                "must be more than 0 and at most 1024",
            ));
        }
        if r.memory.0 < MIN_MEMORY {
            return Err(err(
                "resources.memory",
                format!("must be at least {}", ByteSize(MIN_MEMORY)),
            ));
        }
        if r.gpus > 64 {
            return Err(err("resources.gpus", "at most 64"));
        }
        if r.timeout.0 == 0 || r.timeout.0 > MAX_TIMEOUT_SECS {
            return Err(err(
                "resources.timeout",
                format!("must be between 1s and {MAX_TIMEOUT_SECS}s (7 days)"),
            ));
        }
        if r.pids < 8 || r.pids > 65_536 {
            return Err(err("resources.pids", "must be between 8 and 65536"));
        }
        self.max_cost()
            .ok_or_else(|| err("resources.max_price_per_hour", "price × timeout overflows"))?;
        Ok(())
    }

    /// The most this job can cost: price per hour × timeout, rounded up to
    /// the micro-credit. This is what escrow locks at submission.
    pub fn max_cost(&self) -> Option<Credits> {
        cost_for(
            self.resources.max_price_per_hour,
            self.resources.timeout.0.checked_mul(1000)?,
        )
    }
}

/// Cost of `millis` of wall time at `price_per_hour`, rounded up.
pub fn cost_for(price_per_hour: Credits, millis: u64) -> Option<Credits> {
    let num = u128::from(price_per_hour.0) * u128::from(millis);
    let c = num.div_ceil(3_600_000);
    u64::try_from(c).ok().map(Credits)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn toml_spec_parses_with_defaults() {
        let s: JobSpec = toml::from_str(&format!(
            "image = \"{IMG}\"\ncommand = [\"demo\"]\n[resources]\ncpus = 0.5\nmemory = \"64MiB\"\ntimeout = \"2m\"\n"
        ))
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.resources.cpus, MilliCpu(500));
        assert_eq!(s.resources.timeout, Seconds(120));
        assert_eq!(s.output_path, "/out");
        assert_eq!(s.max_cost(), Some(Credits(1_000_000 * 120 / 3600 + 1)));
    }

    /// (expected field, how to break the spec, expected words in the reason)
    type Case = (&'static str, fn(&mut JobSpec), &'static str);

    #[test]
    fn validation_names_the_field() {
        let table: &[Case] = &[
            (
                "image",
                |s| s.image = ImageRef("alpine:latest".into()),
                "not pinned",
            ),
            (
                "env.KILN_X",
                |s| {
                    s.env.insert("KILN_X".into(), "1".into());
                },
                "reserved",
            ),
            (
                "env.1A",
                |s| {
                    s.env.insert("1A".into(), "1".into());
                },
                "letters",
            ),
            (
                "output_path",
                |s| s.output_path = "out".into(),
                "clean absolute",
            ),
            (
                "output_path",
                |s| s.output_path = "/etc/x".into(),
                "reserved",
            ),
            (
                "inputs[0].path",
                |s| {
                    s.inputs.push(InputSpec {
                        cid: ContentId::of_bytes(b""),
                        path: "/in/../etc".into(),
                    })
                },
                "clean",
            ),
            (
                "inputs[0].path",
                |s| {
                    s.inputs.push(InputSpec {
                        cid: ContentId::of_bytes(b""),
                        path: "/out/x".into(),
                    })
                },
                "overlaps",
            ),
            (
                "resources.cpus",
                |s| s.resources.cpus = MilliCpu(0),
                "more than 0",
            ),
            (
                "resources.memory",
                |s| s.resources.memory = ByteSize(1),
                "at least",
            ),
            (
                "resources.timeout",
                |s| s.resources.timeout = Seconds(0),
                "between",
            ),
            ("resources.pids", |s| s.resources.pids = 1, "between"),
        ];
        for (field, mutate, reason) in table {
            let mut s = JobSpec::new(IMG, vec![]);
            mutate(&mut s);
            let e = s.validate().unwrap_err();
            assert_eq!(&e.field, field, "{e}");
            assert!(e.reason.contains(reason), "{field}: {e}");
        }
    }

    #[test]
    fn image_refs() {
        assert!(ImageRef(IMG.into()).is_image_id());
        let by_digest = ImageRef(format!("registry.example/x:1@{IMG}"));
        assert_eq!(by_digest.digest(), Some(IMG));
        assert!(!by_digest.is_image_id());
        assert!(ImageRef("sha256:ABC".into()).digest().is_none());
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = toml::from_str::<JobSpec>(&format!("image = \"{IMG}\"\n[resources]\nmemroy = 5\n"))
            .unwrap_err();
        assert!(e.to_string().contains("memroy"), "{e}");
    }
}
