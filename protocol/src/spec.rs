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
//! cid = "bafkr4i…"                # a file (`kiln data add` prints it)
//! path = "/in/data.bin"
//!
//! [[inputs]]                      # or downloaded from a URL, verified against the CID
//! cid = "bafkr4i…"
//! url = "https://example.com/weights.bin"
//! path = "/in/weights.bin"
//!
//! [resources]
//! cpus = 1.5
//! memory = "512MiB"
//! timeout = "10m"
//! max_price_per_hour = 2000000    # micro-credits, per node
//! ```
//!
//! Placement requirements live in the same table; every one is optional:
//!
//! ```toml
//! [resources]
//! gpus = 2                         # on one node
//! mig = "1g.10gb"                  # each GPU a MIG instance of this profile
//! min_vram = "80GiB"               # per GPU
//! gpu_models = ["H100", "A100 80GB"]  # any of these (whole words, case-insensitive)
//! min_compute_capability = "9.0"   # or 9.0
//! min_tflops = 400                 # per GPU, benchmarked; 0 = any
//! disk = "200GiB"                  # per node
//! region = "eu"                    # matches eu, eu-west, eu-west-1 …
//! min_reputation = 600             # 0..=1000
//! priority = 10                    # higher is placed first (-1000..=1000)
//! deadline = "2h"                  # longest wait in the queue, then the job fails
//! gang = 4                         # nodes, all-or-nothing; each gets these resources
//! ```
//!
//! How a sampled re-execution is compared with the original result (the
//! coordinator re-runs a share of jobs on another provider; see
//! [`Verify`]). Optional; `exact` is the default:
//!
//! ```toml
//! [verify]
//! compare = "tolerance"            # exact | tolerance | stdout
//! rtol = 1e-3                      # |a - b| <= atol + rtol * |b|, per number
//! atol = 1e-6
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

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

    /// How a receipt names what ran: a Kiln image as the job names it
    /// (`kiln:<cid>`: the provider checked its content), otherwise the
    /// `sha256:` digest.
    pub fn pinned(&self) -> Option<&str> {
        if self.kiln_image().is_some() {
            Some(&self.0)
        } else {
            self.digest()
        }
    }

    /// The image manifest CID of a Kiln image (`kiln:<cid>`, pushed with
    /// `kiln image push`), fetched like any input.
    pub fn kiln_image(&self) -> Option<ContentId> {
        let cid: ContentId = self.0.strip_prefix(KILN_IMAGE_PREFIX)?.parse().ok()?;
        (cid.codec() == crate::content::DAG_CBOR_CODEC).then_some(cid)
    }

    /// For `name@sha256:…`, the registry host the engine would pull from:
    /// the first path component when it looks like a host (has a `.` or a
    /// `:`, or is `localhost`), else Docker Hub, `docker.io`.
    pub fn registry_host(&self) -> Option<&str> {
        let (name, _) = self.0.rsplit_once('@')?;
        self.digest()?;
        Some(match name.split_once('/') {
            Some((first, _))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                first
            }
            _ => "docker.io",
        })
    }

    /// The repository part of `name[:tag]@sha256:…` without host or tag,
    /// as the registry API names it (`library/x` for a bare Hub name).
    pub fn repository(&self) -> Option<String> {
        let host = self.registry_host()?;
        let (name, _) = self.0.rsplit_once('@')?;
        let path = if name.starts_with(&format!("{host}/")) {
            &name[host.len() + 1..]
        } else {
            name
        };
        // A tag is after the last `:` of the last component.
        let path = match path.rsplit_once('/') {
            Some((dir, last)) => format!("{dir}/{}", last.split(':').next().unwrap_or(last)),
            None => path.split(':').next().unwrap_or(path).to_string(),
        };
        Some(if host == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        })
    }
}

/// How a job names a Kiln image: `kiln:<image manifest CID>`.
pub const KILN_IMAGE_PREFIX: &str = "kiln:";

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A content-addressed input, mounted read-only at `path` inside the job.
///
/// A raw CID (`bafkr…`) is one file; a manifest CID (`bafyr…`, DAG-CBOR) is a
/// directory, mounted as a tree. The provider fetches it from the
/// coordinator and from peers that hold it, or, with `url`, downloads it
/// from there; either way every byte is verified against `cid` before the
/// container starts, and a mismatch fails the job naming the expected CID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub cid: ContentId,
    pub path: String,
    /// The size in bytes, if known (lets a provider reserve cache space and
    /// refuse early; a wrong size fails verification like wrong bytes).
    #[serde(default)]
    pub size: Option<ByteSize>,
    /// An `http://` or `https://` URL the bytes can be downloaded from.
    #[serde(default)]
    pub url: Option<String>,
}

impl InputSpec {
    /// An input held by the coordinator or by peers.
    pub fn new(cid: ContentId, path: impl Into<String>) -> Self {
        Self {
            cid,
            path: path.into(),
            size: None,
            url: None,
        }
    }
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

/// Resources the job needs, where it may run, and the most the buyer will pay.
///
/// Everything is per node: a gang job (`gang > 1`) gets these resources on
/// each of `gang` distinct nodes, and `max_price_per_hour` bounds each node's
/// price (escrow locks `max_price_per_hour × gang × timeout`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    pub cpus: MilliCpu,
    pub memory: ByteSize,
    /// GPUs, all on one node.
    pub gpus: u32,
    /// Wall-clock limit; the container is killed when it is reached.
    pub timeout: Seconds,
    /// Maximum process count inside the container.
    pub pids: u32,
    /// Most the buyer pays per hour of this job on one node, in micro-credits.
    pub max_price_per_hour: Credits,
    /// Disk the job needs on the node (0 = none asked for).
    pub disk: ByteSize,
    /// Least memory of each assigned GPU (0 = any).
    pub min_vram: ByteSize,
    /// GPU models the job accepts (empty = any). A model matches a GPU when
    /// its words (split on spaces, `_` and `-`) appear consecutively, ignoring
    /// case, among the words of the driver's GPU name: `"H100"` and
    /// `"h100_80gb"` match "NVIDIA H100 80GB HBM3", `"RTX_4090"` matches
    /// "NVIDIA GeForce RTX 4090", but `"A10"` does not match "NVIDIA A100".
    pub gpu_models: Vec<String>,
    /// Least CUDA compute capability of each assigned GPU (`"9.0"`).
    pub min_compute_capability: Option<ComputeCapability>,
    /// Least benchmarked dense throughput per GPU, in TFLOP/s (0 = any; a
    /// provider without a benchmark does not satisfy a non-zero figure).
    pub min_tflops: u32,
    /// Region the node must be in: equal to the provider's region or a
    /// prefix of it at a `-` boundary (`"eu"` matches `"eu-west-1"`), ignoring case.
    pub region: Option<String>,
    /// Least provider reputation, 0..=1000 (0 = any).
    pub min_reputation: u32,
    /// Queue priority: higher is placed first; equal priorities go in
    /// submission order.
    pub priority: i32,
    /// Longest time the job may wait in the queue before it fails (none = forever).
    pub deadline: Option<Seconds>,
    /// Number of nodes, placed all-or-nothing (1 = an ordinary job).
    pub gang: u32,
    /// Each of the `gpus` is a MIG instance of this profile (`1g.10gb`,
    /// `3g.40gb`, as `nvidia-smi mig -lgip` names them) instead of a whole
    /// GPU: the job sees only its instances. `None`: whole GPUs.
    pub mig: Option<String>,
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
            disk: ByteSize(0),
            min_vram: ByteSize(0),
            gpu_models: Vec::new(),
            min_compute_capability: None,
            min_tflops: 0,
            region: None,
            min_reputation: 0,
            priority: 0,
            deadline: None,
            gang: 1,
            mig: None,
        }
    }
}

/// A CUDA compute capability, `major.minor` (`"9.0"` for Hopper, `"8.6"`
/// for GA10x). Ordered by major, then minor. People write it as a string
/// (`"8.6"`) or a number (`8.6`, `9`); the canonical binary form is the pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComputeCapability {
    pub major: u32,
    pub minor: u32,
}

impl ComputeCapability {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }
}

impl From<(u32, u32)> for ComputeCapability {
    fn from((major, minor): (u32, u32)) -> Self {
        Self { major, minor }
    }
}

impl fmt::Display for ComputeCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for ComputeCapability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a compute capability; write e.g. \"8.6\" or \"9.0\"");
        let (major, minor) = s.trim().split_once('.').unwrap_or((s.trim(), "0"));
        let num = |p: &str| {
            (!p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u32>().ok())
                .flatten()
        };
        Ok(Self {
            major: num(major).ok_or_else(bad)?,
            minor: num(minor).ok_or_else(bad)?,
        })
    }
}

impl Serialize for ComputeCapability {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            (self.major, self.minor).serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for ComputeCapability {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !d.is_human_readable() {
            return <(u32, u32)>::deserialize(d).map(Self::from);
        }
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ComputeCapability;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a compute capability such as \"8.6\" or 9.0")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                u32::try_from(v)
                    .map(|major| ComputeCapability::new(major, 0))
                    .map_err(|_| E::custom(format!("{v} is not a compute capability")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} must not be negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                // `8.6` prints as "8.6"; the shortest round-trip form is what the person wrote.
                if !(v.is_finite() && v >= 0.0) {
                    return Err(E::custom(format!("{v} is not a compute capability")));
                }
                format!("{v}").parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
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
    /// How a re-execution of this job is compared with its result.
    #[serde(default)]
    pub verify: Verify,
}

/// What two executions of a job must agree on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    /// Byte-identical outputs: the output manifests' CIDs are equal (every
    /// path, size and content), and so are the outcome and exit code.
    #[default]
    Exact,
    /// Numbers may differ within [`Verify::rtol`]/[`Verify::atol`]: float
    /// arrays in `.npy` files and numbers in `.json` files are compared
    /// element by element, files matched by path; every other file, and
    /// every non-numeric part, exactly. For GPU work whose floating-point
    /// reductions are not bit-reproducible.
    Tolerance,
    /// Only the outcome, exit code and standard output must match (for
    /// jobs whose files carry timestamps or other run-specific bytes).
    Stdout,
}

impl Compare {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Tolerance => "tolerance",
            Self::Stdout => "stdout",
        }
    }
}

/// A non-negative, finite tolerance (compared by its bits, so a spec stays
/// `Eq`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tolerance(pub f64);

impl PartialEq for Tolerance {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for Tolerance {}
impl std::hash::Hash for Tolerance {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.to_bits().hash(h);
    }
}

/// How the coordinator compares a sampled re-execution with the original.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    #[serde(default)]
    pub compare: Compare,
    /// Relative tolerance (`tolerance` only).
    #[serde(default)]
    pub rtol: Tolerance,
    /// Absolute tolerance (`tolerance` only).
    #[serde(default)]
    pub atol: Tolerance,
}

impl Verify {
    fn validate(&self) -> Result<(), SpecError> {
        for (name, t) in [("verify.rtol", self.rtol), ("verify.atol", self.atol)] {
            if !(t.0.is_finite() && t.0 >= 0.0) {
                return Err(err(name, format!("{} must be a finite number >= 0", t.0)));
            }
            if t.0 > 0.0 && self.compare != Compare::Tolerance {
                return Err(err(
                    name,
                    format!(
                        "only applies with compare = \"tolerance\" (this job compares `{}`)",
                        self.compare.as_str()
                    ),
                ));
            }
        }
        Ok(())
    }
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
    /// The stored blobs the job reads by CID, each once: its inputs without
    /// a URL, then its Kiln image's manifest. What a job's owner must be
    /// allowed to read, what its provider may fetch, and what locality
    /// scoring counts (a directory's or image's children follow from these).
    pub fn stored_cids(&self) -> Vec<ContentId> {
        let mut out: Vec<ContentId> = Vec::with_capacity(self.inputs.len() + 1);
        for c in self
            .inputs
            .iter()
            .filter(|i| i.url.is_none())
            .map(|i| i.cid)
            .chain(self.image.kiln_image())
        {
            if !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }

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
            verify: Verify::default(),
        }
    }

    /// Checks everything the types do not. The first problem found is returned
    /// with its field path.
    pub fn validate(&self) -> Result<(), SpecError> {
        if let Some(rest) = self.image.0.strip_prefix(KILN_IMAGE_PREFIX) {
            if self.image.kiln_image().is_none() {
                return Err(err(
                    "image",
                    format!(
                        "`{rest}` is not an image manifest CID (bafyr…); `kiln image push <image>` prints one"
                    ),
                ));
            }
        } else if self.image.digest().is_none() {
            return Err(err(
                "image",
                format!(
                    "`{}` is not pinned: use kiln:<cid> (from `kiln image push`), an image id \
                     (sha256:<64 hex>) or name@sha256:<64 hex>; \
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
        self.verify.validate()?;
        if self.inputs.len() > 1024 {
            return Err(err("inputs", "more than 1024 inputs"));
        }
        for (i, input) in self.inputs.iter().enumerate() {
            if let Some(url) = &input.url {
                let ok = (url.starts_with("http://") || url.starts_with("https://"))
                    && url.len() <= 4096
                    && url.len() > "https://".len()
                    && !url.chars().any(|c| c.is_whitespace() || c.is_control());
                if !ok {
                    return Err(err(
                        format!("inputs[{i}].url"),
                        format!(
                            "`{url}` is not an http:// or https:// URL (at most 4096 characters, no spaces)"
                        ),
                    ));
                }
                if input.cid.codec() != crate::content::RAW_CODEC {
                    return Err(err(
                        format!("inputs[{i}].url"),
                        "a URL source must name a raw file CID (bafkr…), not a directory manifest",
                    ));
                }
            }
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
        check_requirements(r)?;
        self.max_cost().ok_or_else(|| {
            err(
                "resources.max_price_per_hour",
                "price × gang × timeout overflows",
            )
        })?;
        Ok(())
    }

    /// The most this job can cost: price per hour × nodes (`gang`) ×
    /// timeout, rounded up to the micro-credit. This is what escrow locks at
    /// submission.
    pub fn max_cost(&self) -> Option<Credits> {
        let per_hour = self
            .resources
            .max_price_per_hour
            .0
            .checked_mul(u64::from(self.resources.gang.max(1)))?;
        cost_for(
            Credits(per_hour),
            self.resources.timeout.0.checked_mul(1000)?,
        )
    }
}

pub const MAX_GANG: u32 = 64;
pub const MAX_REPUTATION: u32 = 1000;
pub const MAX_PRIORITY: i32 = 1000;
pub const MAX_DEADLINE_SECS: u64 = 30 * 24 * 3600;

/// Words of a GPU name or model pattern: lower-cased, split on spaces, `_` and `-`.
pub fn gpu_name_words(s: &str) -> Vec<String> {
    s.split([' ', '_', '-'])
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Whether `pattern`'s words appear consecutively in `name`'s.
pub fn gpu_words_match(pattern: &[String], name: &[String]) -> bool {
    !pattern.is_empty() && name.windows(pattern.len()).any(|w| w == pattern)
}

/// Whether the requested GPU model `pattern` matches a GPU named `name`
/// (whole words, in order, ignoring case and `_`/`-`/space differences):
/// what [`Resources::gpu_models`] means, for the scheduler and the node.
pub fn gpu_model_matches(pattern: &str, name: &str) -> bool {
    gpu_words_match(&gpu_name_words(pattern), &gpu_name_words(name))
}

/// `<n>g.<m>gb`, optionally with NVIDIA's `+me` / `+gfx` suffixes.
pub fn is_mig_profile(s: &str) -> bool {
    let base = s.split('+').next().unwrap_or("");
    let suffixes_ok = s
        .split('+')
        .skip(1)
        .all(|x| !x.is_empty() && x.len() <= 8 && x.bytes().all(|b| b.is_ascii_lowercase()));
    let Some((g, mem)) = base.split_once("g.") else {
        return false;
    };
    let Some(gb) = mem.strip_suffix("gb") else {
        return false;
    };
    s.len() <= 32
        && suffixes_ok
        && !g.is_empty()
        && g.bytes().all(|b| b.is_ascii_digit())
        && !gb.is_empty()
        && gb.bytes().all(|b| b.is_ascii_digit())
}

/// Checks the placement requirements of [`Resources`].
fn check_requirements(r: &Resources) -> Result<(), SpecError> {
    let per_gpu = |field: &str, set: bool| {
        if set && r.gpus == 0 {
            Err(err(
                format!("resources.{field}"),
                "applies to each GPU: set resources.gpus to 1 or more",
            ))
        } else {
            Ok(())
        }
    };
    per_gpu("min_vram", r.min_vram.0 > 0)?;
    per_gpu("gpu_models", !r.gpu_models.is_empty())?;
    per_gpu("min_compute_capability", r.min_compute_capability.is_some())?;
    per_gpu("min_tflops", r.min_tflops > 0)?;
    per_gpu("mig", r.mig.is_some())?;
    if let Some(m) = &r.mig
        && !is_mig_profile(m)
    {
        return Err(err(
            "resources.mig",
            format!(
                "`{m}` is not a MIG profile: use NVIDIA's name, such as \"1g.10gb\", \"3g.40gb\" or \"1g.20gb+me\""
            ),
        ));
    }
    if r.gpu_models.len() > 32 {
        return Err(err("resources.gpu_models", "more than 32 models"));
    }
    for (i, m) in r.gpu_models.iter().enumerate() {
        let words = m.split([' ', '_', '-']).filter(|w| !w.is_empty()).count();
        if words == 0 || m.len() > 64 || m.chars().any(char::is_control) {
            return Err(err(
                format!("resources.gpu_models[{i}]"),
                format!(
                    "`{m}` must be a GPU model such as \"H100\" or \"RTX 4090\" (1 to 64 characters)"
                ),
            ));
        }
    }
    if let Some(region) = &r.region {
        let ok = !region.is_empty()
            && region.len() <= 64
            && region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(err(
                "resources.region",
                format!(
                    "`{region}` must be 1 to 64 letters, digits, `-`, `_` or `.` (e.g. \"eu-west\")"
                ),
            ));
        }
    }
    if r.min_reputation > MAX_REPUTATION {
        return Err(err(
            "resources.min_reputation",
            format!("must be at most {MAX_REPUTATION}"),
        ));
    }
    if r.priority.unsigned_abs() > MAX_PRIORITY.unsigned_abs() {
        return Err(err(
            "resources.priority",
            format!("must be between -{MAX_PRIORITY} and {MAX_PRIORITY}"),
        ));
    }
    if let Some(d) = r.deadline
        && (d.0 == 0 || d.0 > MAX_DEADLINE_SECS)
    {
        return Err(err(
            "resources.deadline",
            "must be between 1s and 30d when given; omit it to wait as long as it takes",
        ));
    }
    if r.gang == 0 || r.gang > MAX_GANG {
        return Err(err(
            "resources.gang",
            format!("must be between 1 and {MAX_GANG} nodes"),
        ));
    }
    Ok(())
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
    fn mig_profiles_are_nvidias_names() {
        for ok in [
            "1g.10gb",
            "3g.40gb",
            "7g.80gb",
            "1g.20gb+me",
            "1g.10gb+me+gfx",
        ] {
            assert!(is_mig_profile(ok), "{ok}");
        }
        for bad in [
            "",
            "1g",
            "g.10gb",
            "1g.gb",
            "1g.10GB",
            "1g.10gb+",
            "1g.10gb+ME",
            "x1g.10gb",
        ] {
            assert!(!is_mig_profile(bad), "{bad}");
        }
        let spec: JobSpec = toml::from_str(
            "image = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n\
             [resources]\ngpus = 2\nmig = \"1g.10gb\"\n",
        )
        .unwrap();
        assert_eq!(spec.resources.mig.as_deref(), Some("1g.10gb"));
        spec.validate().unwrap();
    }

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

    #[test]
    fn verify_table_parses_and_validates() {
        let s: JobSpec = toml::from_str(&format!(
            "image = \"{IMG}\"\n[verify]\ncompare = \"tolerance\"\nrtol = 1e-3\natol = 1e-6\n"
        ))
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.verify.compare, Compare::Tolerance);
        assert_eq!(s.verify.rtol, Tolerance(1e-3));
        assert_eq!(s.verify.atol, Tolerance(1e-6));
        // Absent: exact. It survives the wire (bincode) and JSON.
        let d: JobSpec = toml::from_str(&format!("image = \"{IMG}\"\n")).unwrap();
        assert_eq!(d.verify, Verify::default());
        assert_eq!(d.verify.compare, Compare::Exact);
        let bytes = crate::encoding::encode(&s).unwrap();
        assert_eq!(crate::encoding::decode::<JobSpec>(&bytes).unwrap(), s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), s);
        // A tolerance only means something for `tolerance`; a negative or
        // infinite one means nothing; an unknown comparator is named.
        let mut e = d.clone();
        e.verify.rtol = Tolerance(0.1);
        assert_eq!(e.validate().unwrap_err().field, "verify.rtol");
        let mut e = s.clone();
        e.verify.atol = Tolerance(-1.0);
        assert_eq!(e.validate().unwrap_err().field, "verify.atol");
        let mut e = s.clone();
        e.verify.rtol = Tolerance(f64::INFINITY);
        assert_eq!(e.validate().unwrap_err().field, "verify.rtol");
        let bad = toml::from_str::<JobSpec>(&format!(
            "image = \"{IMG}\"\n[verify]\ncompare = \"roughly\"\n"
        ));
        assert!(bad.unwrap_err().to_string().contains("roughly"));
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
                    s.inputs
                        .push(InputSpec::new(ContentId::of_bytes(b""), "/in/../etc"))
                },
                "clean",
            ),
            (
                "inputs[0].path",
                |s| {
                    s.inputs
                        .push(InputSpec::new(ContentId::of_bytes(b""), "/out/x"))
                },
                "overlaps",
            ),
            (
                "inputs[0].url",
                |s| {
                    let mut i = InputSpec::new(ContentId::of_bytes(b""), "/in/x");
                    i.url = Some("ftp://example.com/x".into());
                    s.inputs.push(i)
                },
                "http:// or https://",
            ),
            (
                "inputs[0].url",
                |s| {
                    let mut i = InputSpec::new(ContentId::of_bytes(b""), "/in/x");
                    i.url = Some("https://example.com/a b".into());
                    s.inputs.push(i)
                },
                "no spaces",
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
            (
                "resources.min_vram",
                |s| s.resources.min_vram = ByteSize(80 << 30),
                "resources.gpus to 1 or more",
            ),
            (
                "resources.mig",
                |s| s.resources.mig = Some("1g.10gb".into()),
                "resources.gpus to 1 or more",
            ),
            (
                "resources.mig",
                |s| {
                    s.resources.gpus = 1;
                    s.resources.mig = Some("half".into())
                },
                "\"1g.10gb\"",
            ),
            (
                "resources.gpu_models",
                |s| s.resources.gpu_models = vec!["H100".into()],
                "each GPU",
            ),
            (
                "resources.min_compute_capability",
                |s| s.resources.min_compute_capability = Some(ComputeCapability::new(9, 0)),
                "each GPU",
            ),
            (
                "resources.min_tflops",
                |s| s.resources.min_tflops = 100,
                "each GPU",
            ),
            (
                "resources.gpu_models[1]",
                |s| {
                    s.resources.gpus = 1;
                    s.resources.gpu_models = vec!["H100".into(), " _-".into()];
                },
                "GPU model",
            ),
            (
                "resources.region",
                |s| s.resources.region = Some("eu west".into()),
                "letters, digits",
            ),
            (
                "resources.region",
                |s| s.resources.region = Some(String::new()),
                "1 to 64",
            ),
            (
                "resources.min_reputation",
                |s| s.resources.min_reputation = 1001,
                "at most 1000",
            ),
            (
                "resources.priority",
                |s| s.resources.priority = -1001,
                "between -1000 and 1000",
            ),
            (
                "resources.deadline",
                |s| s.resources.deadline = Some(Seconds(0)),
                "between 1s and 30d",
            ),
            (
                "resources.deadline",
                |s| s.resources.deadline = Some(Seconds(MAX_DEADLINE_SECS + 1)),
                "between 1s and 30d",
            ),
            (
                "resources.gang",
                |s| s.resources.gang = 0,
                "between 1 and 64",
            ),
            (
                "resources.gang",
                |s| s.resources.gang = 65,
                "between 1 and 64",
            ),
            (
                "resources.max_price_per_hour",
                |s| {
                    s.resources.gang = 64;
                    s.resources.max_price_per_hour = Credits(u64::MAX / 32);
                },
                "overflows",
            ),
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
    fn requirements_parse_from_toml_with_defaults() {
        let s: JobSpec = toml::from_str(&format!(
            r#"image = "{IMG}"
[resources]
gpus = 2
min_vram = "80GiB"
gpu_models = ["H100", "A100 80GB"]
min_compute_capability = "9.0"
min_tflops = 400
disk = "200GiB"
region = "eu"
min_reputation = 600
priority = 10
deadline = "2h"
gang = 4
max_price_per_hour = 5000000
"#
        ))
        .unwrap();
        s.validate().unwrap();
        let r = &s.resources;
        assert_eq!(r.min_vram, ByteSize(80 << 30));
        assert_eq!(r.gpu_models, ["H100", "A100 80GB"]);
        assert_eq!(r.min_compute_capability, Some(ComputeCapability::new(9, 0)));
        assert_eq!(
            (r.min_tflops, r.disk, r.region.as_deref()),
            (400, ByteSize(200 << 30), Some("eu"))
        );
        assert_eq!(
            (r.min_reputation, r.priority, r.deadline, r.gang),
            (600, 10, Some(Seconds(7200)), 4)
        );
        // Escrow covers every node of the gang.
        assert_eq!(
            s.max_cost(),
            Some(Credits((5_000_000 * 4 * 600u64).div_ceil(3600)))
        );

        // Absent requirements take their defaults.
        let d: JobSpec =
            toml::from_str(&format!("image = \"{IMG}\"\n[resources]\ncpus = 1\n")).unwrap();
        let def = Resources::default();
        assert_eq!(d.resources, def);
        assert_eq!((def.gang, def.min_reputation, def.priority), (1, 0, 0));
        assert!(def.gpu_models.is_empty() && def.region.is_none() && def.deadline.is_none());
    }

    #[test]
    fn requirements_round_trip_in_every_encoding() {
        let mut s = JobSpec::new(IMG, vec!["x".into()]);
        s.resources.gpus = 1;
        s.resources.min_compute_capability = Some(ComputeCapability::new(8, 6));
        s.resources.gpu_models = vec!["RTX_4090".into()];
        s.resources.region = Some("us-east".into());
        s.resources.deadline = Some(Seconds(60));
        s.resources.priority = -3;
        s.resources.gang = 2;
        let bin: JobSpec = crate::encoding::decode(&crate::encoding::encode(&s).unwrap()).unwrap();
        assert_eq!(bin, s);
        let js = serde_json::to_string(&s).unwrap();
        assert!(js.contains(r#""min_compute_capability":"8.6""#), "{js}");
        assert_eq!(serde_json::from_str::<JobSpec>(&js).unwrap(), s);
        let t: JobSpec = toml::from_str(&toml::to_string(&s).unwrap()).unwrap();
        assert_eq!(t, s);
    }

    /// Every tolerance survives JSON exactly (found by fuzzing: without
    /// serde_json's exact float parsing, 6e23 came back one ulp off, so a
    /// buyer's signature over the spec failed to verify after the REST
    /// body was parsed).
    #[test]
    fn tolerances_round_trip_exactly_through_json() {
        for x in [
            6e23,
            1e-6,
            0.1,
            1.0 / 3.0,
            f64::MIN_POSITIVE,
            1.7976931348623157e308,
        ] {
            let mut s = JobSpec::new(IMG, vec!["x".into()]);
            s.verify.compare = Compare::Tolerance;
            s.verify.rtol = Tolerance(x);
            s.verify.atol = Tolerance(x / 7.0);
            let back: JobSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            assert_eq!(back, s, "{x:e}");
            assert_eq!(
                crate::encoding::encode(&back).unwrap(),
                crate::encoding::encode(&s).unwrap(),
                "the bytes a signature covers, {x:e}"
            );
        }
    }

    #[test]
    fn compute_capability_forms() {
        #[derive(Deserialize)]
        struct W {
            c: ComputeCapability,
        }
        let cc = |src: &str| {
            toml::from_str::<W>(src)
                .map(|w| w.c)
                .map_err(|e| e.to_string())
        };
        assert_eq!(cc("c = \"8.6\""), Ok(ComputeCapability::new(8, 6)));
        assert_eq!(cc("c = 8.6"), Ok(ComputeCapability::new(8, 6)));
        assert_eq!(cc("c = 9"), Ok(ComputeCapability::new(9, 0)));
        assert_eq!(cc("c = \"12.0\""), Ok(ComputeCapability::new(12, 0)));
        assert!(
            cc("c = \"nine\"")
                .unwrap_err()
                .contains("not a compute capability")
        );
        assert!(cc("c = -1").unwrap_err().contains("negative"));
        assert!(ComputeCapability::new(8, 9) < ComputeCapability::new(9, 0));
        assert!(ComputeCapability::new(9, 0) < ComputeCapability::new(10, 0));
        assert_eq!(ComputeCapability::new(9, 0).to_string(), "9.0");
        assert!("9.".parse::<ComputeCapability>().is_err());
        assert!("9.0.1".parse::<ComputeCapability>().is_err());
    }

    #[test]
    fn image_refs() {
        assert!(ImageRef(IMG.into()).is_image_id());
        let by_digest = ImageRef(format!("registry.example/x:1@{IMG}"));
        assert_eq!(by_digest.digest(), Some(IMG));
        assert!(!by_digest.is_image_id());
        assert!(ImageRef("sha256:ABC".into()).digest().is_none());
        // Registry hosts and repositories, as the engine reads a reference.
        let cases = [
            ("registry.example/x:1", "registry.example", "x"),
            ("127.0.0.1:5000/team/app", "127.0.0.1:5000", "team/app"),
            ("localhost/a/b:t", "localhost", "a/b"),
            ("busybox", "docker.io", "library/busybox"),
            ("user/app:v2", "docker.io", "user/app"),
        ];
        for (name, host, repo) in cases {
            let r = ImageRef(format!("{name}@{IMG}"));
            assert_eq!(r.registry_host(), Some(host), "{name}");
            assert_eq!(r.repository().as_deref(), Some(repo), "{name}");
        }
        assert_eq!(ImageRef(IMG.into()).registry_host(), None);
        // Kiln images: a manifest CID only.
        let m = crate::ImageManifest {
            config: crate::ImageBlob {
                cid: ContentId::of_bytes(b"c"),
                digest: crate::OciDigest([1; 32]),
                size: 1,
            },
            layers: vec![],
        };
        let k = ImageRef(format!("kiln:{}", m.cid()));
        assert_eq!(k.kiln_image(), Some(m.cid()));
        assert_eq!(k.registry_host(), None);
        let mut spec = JobSpec::new(k.0.clone(), vec![]);
        spec.validate().unwrap();
        spec.image = ImageRef(format!("kiln:{}", ContentId::of_bytes(b"c")));
        let e = spec.validate().unwrap_err();
        assert_eq!(e.field, "image");
        assert!(e.reason.contains("kiln image push"), "{e}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = toml::from_str::<JobSpec>(&format!("image = \"{IMG}\"\n[resources]\nmemroy = 5\n"))
            .unwrap_err();
        assert!(e.to_string().contains("memroy"), "{e}");
    }
}
