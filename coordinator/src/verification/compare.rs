//! Whether two executions of a job agree: the original result and a
//! sampled re-execution on another provider, compared as the job spec's
//! [`Verify`] asks. Pure: the only I/O is the caller's `read` closure,
//! which returns a blob from the coordinator's content store by CID.
//!
//! Every comparator first requires the same [`Outcome`] and exit code.
//! Then:
//!
//! * **`exact`** (the default): the output manifests' CIDs are equal, so
//!   every path, size, executable bit and byte is. For deterministic jobs;
//!   nothing is read, and a difference names the first differing path.
//! * **`stdout`**: only standard output must match (its CID); files are
//!   ignored. For jobs whose files carry timestamps or other run-specific
//!   bytes but whose printed answer is reproducible.
//! * **`tolerance`**: for GPU work whose floating-point reductions are not
//!   bit-reproducible. Files are matched by path and the two path sets must
//!   be equal. A file with equal CIDs agrees without being read. A `.npy`
//!   array must have the same dtype, memory order and shape, and every
//!   float element must be *close* (below); integer elements must be equal.
//!   A `.json` document must have the same structure (keys, array lengths,
//!   strings, booleans, nulls) and every number must be close. Every other
//!   file, and a `.npy`/`.json` that does not parse on either side, must be
//!   byte-identical (equal CIDs).
//!
//! # Close
//!
//! `numpy.isclose` with `equal_nan = True`, the second execution (the
//! verifier) as the reference `b`:
//!
//! ```text
//! |a − b| ≤ atol + rtol · |b|
//! ```
//!
//! `rtol` absorbs rounding that scales with the magnitude (summation
//! order); `atol` absorbs noise around zero, where any relative bound is
//! too strict. NaN matches only NaN at the same position, and an infinity
//! only the same infinity (the formula alone would call `inf` close to any
//! finite number when `rtol > 0`).
//!
//! # Adversarial input
//!
//! The files come from providers, one of which may be lying. Headers are
//! parsed with checked arithmetic and a dimension cap, nothing is indexed
//! without a bounds check, and no file larger than [`MAX_READ_BYTES`]
//! (JSON: [`MAX_JSON_BYTES`], since a parsed document is many times its
//! size) is read: such files are compared by CID only. A file that fails to
//! parse is compared by CID, with the parse failure given as the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use kiln_protocol::{Compare, ContentId, Manifest, ManifestEntry, Outcome, Verify};
use serde_json::{Number, Value};

/// The largest file the comparator reads (per execution); larger files are
/// compared by CID only.
pub const MAX_READ_BYTES: u64 = 256 << 20;

/// The largest `.json` file compared structurally: a parsed
/// `serde_json::Value` takes up to ~16× its text (`[0,0,…]`), so the cap
/// keeps two parsed documents within a few hundred MiB.
pub const MAX_JSON_BYTES: u64 = 16 << 20;

/// NumPy's own limit on array dimensions (`NPY_MAXDIMS` in NumPy 2); it
/// also bounds what a hostile header can make us allocate.
const MAX_DIMS: usize = 64;

/// Longest string shown in a difference (a JSON string can be megabytes).
const MAX_SHOWN_CHARS: usize = 60;

/// One execution's result as the comparator sees it.
#[derive(Clone, Copy, Debug)]
pub struct Execution<'a> {
    pub outcome: Outcome,
    pub exit_code: Option<i64>,
    /// The output manifest's CID (the receipt's output_cid).
    pub output_cid: ContentId,
    pub manifest: &'a Manifest,
    pub stdout_cid: ContentId,
}

/// What the comparison decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Agreement {
    Same,
    /// The first difference found, in words a buyer can read, e.g.
    /// "out/result.npy element 17: 1.25 vs 1.31 (beyond rtol 0.001, atol 0)" or
    /// "out/a.txt differs (bafkr… vs bafkr…)" or "exit code 0 vs 3" or "out/b.bin only in the first".
    Differ(String),
}

/// Which of the two executions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    First,
    Second,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::First => "first",
            Self::Second => "second",
        })
    }
}

/// Why no decision could be made (the coordinator's fault, not a
/// provider's: its store should hold every output of both executions).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompareError {
    #[error(
        "cannot read `{path}` ({cid}) of the {side} execution from the content store: {reason}"
    )]
    Read {
        side: Side,
        path: String,
        cid: ContentId,
        reason: String,
    },
    #[error(
        "the content store returned bytes for `{path}` of the {side} execution that do not hash to {cid}"
    )]
    Corrupt {
        side: Side,
        path: String,
        cid: ContentId,
    },
}

/// Compares two executions under `verify`. `read` returns a blob's bytes by CID
/// (the coordinator's content store holds every output of both executions).
pub fn compare(
    verify: &Verify,
    a: &Execution<'_>,
    b: &Execution<'_>,
    read: &mut dyn FnMut(&ContentId) -> Result<Vec<u8>, String>,
) -> Result<Agreement, CompareError> {
    if a.outcome != b.outcome {
        return Ok(Agreement::Differ(format!(
            "outcome {} vs {}",
            outcome_name(a.outcome),
            outcome_name(b.outcome)
        )));
    }
    if a.exit_code != b.exit_code {
        return Ok(Agreement::Differ(format!(
            "exit code {} vs {}",
            exit_text(a.exit_code),
            exit_text(b.exit_code)
        )));
    }
    match verify.compare {
        Compare::Stdout if a.stdout_cid == b.stdout_cid => Ok(Agreement::Same),
        Compare::Stdout => Ok(Agreement::Differ(format!(
            "standard output differs ({} vs {})",
            a.stdout_cid, b.stdout_cid
        ))),
        Compare::Exact => Ok(exact(a, b)),
        Compare::Tolerance => tolerance(verify, a, b, read),
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::TimedOut => "timed out",
        Outcome::Cancelled => "cancelled",
    }
}

fn exit_text(code: Option<i64>) -> String {
    code.map_or_else(|| "none".to_string(), |c| c.to_string())
}

type Pair<'m> = (
    &'m str,
    Option<&'m ManifestEntry>,
    Option<&'m ManifestEntry>,
);

/// Both manifests' entries, joined by path, in path order. Keyed maps
/// rather than a merge walk, so an unsorted manifest still pairs up.
fn join<'m>(a: &'m Manifest, b: &'m Manifest) -> Vec<Pair<'m>> {
    let mut by_path: BTreeMap<&'m str, Pair<'m>> = BTreeMap::new();
    for e in &a.entries {
        by_path.entry(&e.path).or_insert((&e.path, None, None)).1 = Some(e);
    }
    for e in &b.entries {
        by_path.entry(&e.path).or_insert((&e.path, None, None)).2 = Some(e);
    }
    by_path.into_values().collect()
}

fn only_in(path: &str, x: Option<&ManifestEntry>, y: Option<&ManifestEntry>) -> Option<String> {
    match (x, y) {
        (Some(_), None) => Some(format!("{path} only in the first")),
        (None, Some(_)) => Some(format!("{path} only in the second")),
        _ => None,
    }
}

fn executable_differs(path: &str, x: &ManifestEntry, y: &ManifestEntry) -> Option<String> {
    (x.executable != y.executable).then(|| {
        let which = if x.executable { "first" } else { "second" };
        format!("{path} is executable in the {which} execution only")
    })
}

fn exact(a: &Execution<'_>, b: &Execution<'_>) -> Agreement {
    if a.output_cid == b.output_cid {
        return Agreement::Same;
    }
    for (path, x, y) in join(a.manifest, b.manifest) {
        if let Some(d) = only_in(path, x, y) {
            return Agreement::Differ(d);
        }
        let (Some(x), Some(y)) = (x, y) else { continue };
        if x.cid != y.cid {
            return Agreement::Differ(format!("{path} differs ({} vs {})", x.cid, y.cid));
        }
        if let Some(d) = executable_differs(path, x, y) {
            return Agreement::Differ(d);
        }
        if x.size != y.size {
            return Agreement::Differ(format!(
                "{path} is listed as {} vs {} bytes with the same content",
                x.size, y.size
            ));
        }
    }
    // Only reachable when an output_cid is not its manifest's CID; the
    // definition of `exact` is still the CIDs, so they decide.
    Agreement::Differ(format!(
        "output manifests differ ({} vs {})",
        a.output_cid, b.output_cid
    ))
}

fn tolerance(
    verify: &Verify,
    a: &Execution<'_>,
    b: &Execution<'_>,
    read: &mut dyn FnMut(&ContentId) -> Result<Vec<u8>, String>,
) -> Result<Agreement, CompareError> {
    if a.output_cid == b.output_cid {
        return Ok(Agreement::Same);
    }
    let pairs = join(a.manifest, b.manifest);
    // The path sets first: a missing file is decided without reading anything.
    for &(path, x, y) in &pairs {
        if let Some(d) = only_in(path, x, y) {
            return Ok(Agreement::Differ(d));
        }
    }
    for (path, x, y) in pairs {
        let (Some(x), Some(y)) = (x, y) else { continue };
        if let Some(d) = executable_differs(path, x, y) {
            return Ok(Agreement::Differ(d));
        }
        if x.cid == y.cid {
            continue;
        }
        if let Some(d) = compare_file(verify, path, x, y, read)? {
            return Ok(Agreement::Differ(d));
        }
    }
    Ok(Agreement::Same)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Npy,
    Json,
    Other,
}

impl FileKind {
    fn of(path: &str) -> Self {
        if path.ends_with(".npy") {
            Self::Npy
        } else if path.ends_with(".json") {
            Self::Json
        } else {
            Self::Other
        }
    }
}

/// Compares one file whose CIDs differ: `None` when the numbers are close.
fn compare_file(
    verify: &Verify,
    path: &str,
    x: &ManifestEntry,
    y: &ManifestEntry,
    read: &mut dyn FnMut(&ContentId) -> Result<Vec<u8>, String>,
) -> Result<Option<String>, CompareError> {
    let differs = format!("{path} differs ({} vs {})", x.cid, y.cid);
    let kind = FileKind::of(path);
    let limit = match kind {
        FileKind::Other => return Ok(Some(differs)),
        FileKind::Npy => MAX_READ_BYTES,
        FileKind::Json => MAX_JSON_BYTES,
    };
    let too_big = || {
        format!(
            "{differs}; larger than {} MiB, so compared by content id only",
            limit >> 20
        )
    };
    if x.size > limit || y.size > limit {
        return Ok(Some(too_big()));
    }
    let bytes_a = fetch(read, Side::First, path, x)?;
    let bytes_b = fetch(read, Side::Second, path, y)?;
    // The manifest's size is the provider's word; the bytes are not.
    if bytes_a.len() as u64 > limit || bytes_b.len() as u64 > limit {
        return Ok(Some(too_big()));
    }
    let (rtol, atol) = (verify.rtol.0, verify.atol.0);
    let result = match kind {
        FileKind::Npy => compare_npy(path, &bytes_a, &bytes_b, rtol, atol),
        _ => compare_json(path, &bytes_a, &bytes_b, rtol, atol),
    };
    Ok(match result {
        Ok(d) => d,
        Err(why) => Some(format!("{differs}; not compared numerically: {why}")),
    })
}

fn fetch(
    read: &mut dyn FnMut(&ContentId) -> Result<Vec<u8>, String>,
    side: Side,
    path: &str,
    entry: &ManifestEntry,
) -> Result<Vec<u8>, CompareError> {
    let bytes = read(&entry.cid).map_err(|reason| CompareError::Read {
        side,
        path: path.to_string(),
        cid: entry.cid,
        reason,
    })?;
    // A verdict slashes someone: never decide it on bytes that are not the
    // provider's (a store bug would otherwise look like a cheating provider).
    if !entry.cid.matches(&bytes) {
        return Err(CompareError::Corrupt {
            side,
            path: path.to_string(),
            cid: entry.cid,
        });
    }
    Ok(bytes)
}

/// Why two numbers are not close, or `None` when they are (see the module doc).
fn not_close(a: f64, b: f64, rtol: f64, atol: f64) -> Option<String> {
    if a.is_nan() || b.is_nan() {
        (!(a.is_nan() && b.is_nan())).then(|| "NaN matches only NaN".to_string())
    } else if a.is_infinite() || b.is_infinite() {
        (a != b).then(|| "infinities must match exactly".to_string())
    } else if (a - b).abs() <= atol + rtol * b.abs() {
        None
    } else {
        Some(format!("beyond rtol {rtol}, atol {atol}"))
    }
}

// ---------------------------------------------------------------- .npy

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Float,
    Int,
    Uint,
}

/// A supported element type. One-byte types have no byte order, so `|u1`
/// and `<u1` are the same dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dtype {
    kind: Kind,
    size: usize,
    big_endian: bool,
}

impl Dtype {
    fn parse(descr: &str) -> Result<Self, String> {
        let unsupported = || format!("dtype {descr:?} is not compared numerically");
        let mut chars = descr.chars();
        let order = chars.next().ok_or_else(unsupported)?;
        let kind = match chars.next() {
            Some('f') => Kind::Float,
            Some('i') => Kind::Int,
            Some('u') => Kind::Uint,
            _ => return Err(unsupported()),
        };
        let size = match chars.as_str() {
            "1" => 1,
            "2" => 2,
            "4" => 4,
            "8" => 8,
            _ => return Err(unsupported()),
        };
        if kind == Kind::Float && size == 1 {
            return Err(unsupported());
        }
        // `=` (native) is never written by NumPy and would make the
        // meaning of the bytes depend on our machine.
        let big_endian = match (order, size) {
            ('|' | '<' | '>', 1) => false,
            ('<', _) => false,
            ('>', _) => true,
            _ => return Err(unsupported()),
        };
        Ok(Self {
            kind,
            size,
            big_endian,
        })
    }

    /// The element's bits, zero-extended (`chunk.len() == self.size`).
    fn bits(self, chunk: &[u8]) -> u64 {
        let byte = |acc: u64, &b: &u8| (acc << 8) | u64::from(b);
        if self.big_endian {
            chunk.iter().fold(0, byte)
        } else {
            chunk.iter().rev().fold(0, byte)
        }
    }

    fn float(self, bits: u64) -> f64 {
        match self.size {
            2 => f16_to_f64(bits as u16),
            4 => f64::from(f32::from_bits(bits as u32)),
            _ => f64::from_bits(bits),
        }
    }

    fn int(self, bits: u64) -> i128 {
        match self.kind {
            Kind::Int => {
                // Sign-extend from the element's width.
                let shift = 64 - 8 * self.size as u32;
                i128::from(((bits << shift) as i64) >> shift)
            }
            _ => i128::from(bits),
        }
    }

    /// The element as its own type prints it (an f32 shown as an f64
    /// would grow spurious digits: 1.31 → 1.309999942779541).
    fn show(self, bits: u64) -> String {
        match (self.kind, self.size) {
            (Kind::Float, 8) => f64::from_bits(bits).to_string(),
            (Kind::Float, 4) => f32::from_bits(bits as u32).to_string(),
            // Every f16 is exactly an f32.
            (Kind::Float, _) => (f16_to_f64(bits as u16) as f32).to_string(),
            _ => self.int(bits).to_string(),
        }
    }
}

/// IEEE 754 binary16 → f64, exactly (no `half` dependency for one function).
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 == 0 { 1.0 } else { -1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f64::from(h & 0x3ff);
    let magnitude = match exp {
        0 => frac * 2f64.powi(-24),
        0x1f if frac == 0.0 => f64::INFINITY,
        0x1f => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    };
    sign * magnitude
}

/// A parsed `.npy` file: its header and its data bytes (exactly
/// `product(shape) × size` of them).
#[derive(Debug)]
struct Npy<'b> {
    descr: String,
    dtype: Dtype,
    fortran_order: bool,
    shape: Vec<usize>,
    data: &'b [u8],
}

/// Parses a `.npy` file (format 1.0, 2.0 or 3.0): the magic, the version,
/// a little-endian header length (u16 in 1.0, u32 after), then a Python
/// dict literal with exactly `descr`, `fortran_order` and `shape`, then
/// the data.
fn parse_npy(bytes: &[u8]) -> Result<Npy<'_>, String> {
    let rest = bytes
        .strip_prefix(NPY_MAGIC)
        .ok_or("it does not start with the .npy magic")?;
    let (major, minor) = match rest {
        [major, minor, ..] => (*major, *minor),
        _ => return Err("it ends before the format version".into()),
    };
    let len_bytes: usize = match (major, minor) {
        (1, 0) => 2,
        (2 | 3, 0) => 4,
        _ => return Err(format!("format version {major}.{minor} is not supported")),
    };
    let header_start = NPY_MAGIC.len() + 2 + len_bytes;
    let header_len = match bytes.get(NPY_MAGIC.len() + 2..header_start) {
        Some(&[lo, hi]) => usize::from(u16::from_le_bytes([lo, hi])),
        Some(&[b0, b1, b2, b3]) => usize::try_from(u32::from_le_bytes([b0, b1, b2, b3]))
            .map_err(|_| "the header length does not fit in memory")?,
        _ => return Err("it ends before the header length".into()),
    };
    let data_start = header_start
        .checked_add(header_len)
        .ok_or("the header length overflows")?;
    let header = bytes.get(header_start..data_start).ok_or_else(|| {
        format!(
            "the header length {header_len} runs past the end of the file ({} bytes)",
            bytes.len()
        )
    })?;
    // 1.0/2.0 headers are Latin-1, 3.0 UTF-8; a valid header is ASCII in all.
    let header = std::str::from_utf8(header).map_err(|_| "the header is not text")?;
    let Header {
        descr,
        fortran_order,
        shape,
    } = Header::parse(header)?;
    let dtype = Dtype::parse(&descr)?;
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("shape {} has too many elements", shape_text(&shape)))?;
    let want = count
        .checked_mul(dtype.size)
        .ok_or_else(|| format!("shape {} has too many bytes", shape_text(&shape)))?;
    let data = bytes.get(data_start..).unwrap_or_default();
    if data.len() != want {
        return Err(format!(
            "it holds {} data bytes where shape {} of {descr} needs {want}",
            data.len(),
            shape_text(&shape)
        ));
    }
    Ok(Npy {
        descr,
        dtype,
        fortran_order,
        shape,
        data,
    })
}

/// The header dict, e.g. `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

impl Header {
    /// Parses the subset of Python literal syntax NumPy writes (it reads
    /// headers with `ast.literal_eval`): string keys; string, boolean and
    /// int-tuple values. Anything else (a structured dtype's list, an
    /// unknown key) is refused, and the file is compared by CID.
    fn parse(text: &str) -> Result<Self, String> {
        let mut c = Cursor {
            s: text.as_bytes(),
            at: 0,
        };
        let (mut descr, mut fortran_order, mut shape) = (None, None, None);
        c.expect(b'{')?;
        loop {
            if c.eat(b'}') {
                break;
            }
            let key = c.string()?;
            c.expect(b':')?;
            let slot_taken = match key {
                "descr" => descr.replace(c.string()?.to_string()).is_some(),
                "fortran_order" => fortran_order.replace(c.boolean()?).is_some(),
                "shape" => shape.replace(c.tuple()?).is_some(),
                _ => return Err(format!("the header has an unexpected key {key:?}")),
            };
            if slot_taken {
                return Err(format!("the header repeats the key {key:?}"));
            }
            if !c.eat(b',') {
                c.expect(b'}')?;
                break;
            }
        }
        c.skip_ws();
        if c.at != c.s.len() {
            return Err("the header has text after its dict".into());
        }
        match (descr, fortran_order, shape) {
            (Some(descr), Some(fortran_order), Some(shape)) => Ok(Self {
                descr,
                fortran_order,
                shape,
            }),
            _ => Err("the header lacks descr, fortran_order or shape".into()),
        }
    }
}

struct Cursor<'h> {
    s: &'h [u8],
    at: usize,
}

impl<'h> Cursor<'h> {
    fn skip_ws(&mut self) {
        while self.s.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.at).copied()
    }

    /// Consumes `b` (after whitespace) if it is next.
    fn eat(&mut self, b: u8) -> bool {
        let next = self.peek() == Some(b);
        if next {
            self.at += 1;
        }
        next
    }

    fn expect(&mut self, b: u8) -> Result<(), String> {
        if self.eat(b) {
            Ok(())
        } else {
            Err(format!(
                "the header is not a dict literal (expected `{}` at byte {})",
                char::from(b),
                self.at
            ))
        }
    }

    /// A quoted string without escapes (NumPy never writes any).
    fn string(&mut self) -> Result<&'h str, String> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a string at header byte {}", self.at)),
        };
        let s = self.s;
        let start = self.at + 1;
        let len = s
            .get(start..)
            .and_then(|rest| rest.iter().position(|&b| b == quote))
            .ok_or("the header has an unterminated string")?;
        let body = s.get(start..start + len).unwrap_or_default();
        if body.contains(&b'\\') {
            return Err("the header has an escaped string".into());
        }
        self.at = start + len + 1;
        std::str::from_utf8(body).map_err(|_| "the header is not text".to_string())
    }

    fn boolean(&mut self) -> Result<bool, String> {
        self.skip_ws();
        for (word, value) in [("True", true), ("False", false)] {
            if self
                .s
                .get(self.at..)
                .is_some_and(|r| r.starts_with(word.as_bytes()))
            {
                self.at += word.len();
                return Ok(value);
            }
        }
        Err(format!("expected True or False at header byte {}", self.at))
    }

    /// `()`, `(5,)`, `(3, 4)`: non-negative ints, at most [`MAX_DIMS`].
    fn tuple(&mut self) -> Result<Vec<usize>, String> {
        if self.peek() == Some(b'[') {
            return Err("the header's shape is a list, not a tuple".into());
        }
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            if self.eat(b')') {
                return Ok(dims);
            }
            if dims.len() == MAX_DIMS {
                return Err(format!("the shape has more than {MAX_DIMS} dimensions"));
            }
            dims.push(self.dim()?);
            if !self.eat(b',') {
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }

    fn dim(&mut self) -> Result<usize, String> {
        self.skip_ws();
        let start = self.at;
        while self.s.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        let digits = self.s.get(start..self.at).unwrap_or_default();
        if digits.is_empty() {
            return Err(format!("expected a dimension at header byte {start}"));
        }
        // Python 2 wrote long ints as `3L`.
        if self.s.get(self.at) == Some(&b'L') {
            self.at += 1;
        }
        std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| "a dimension of the shape is too large".to_string())
    }
}

fn shape_text(shape: &[usize]) -> String {
    match shape {
        [d] => format!("({d},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
            format!("({})", dims.join(", "))
        }
    }
}

/// The logical index of the `flat`-th stored element: `element 17` for a
/// 1-d array, `element [4, 1]` above, `value` for a 0-d one.
fn index_text(flat: usize, shape: &[usize], fortran_order: bool) -> String {
    match shape.len() {
        0 => "value".into(),
        1 => format!("element {flat}"),
        n => {
            let mut index = vec![0; n];
            let mut rest = flat;
            // Storage varies the last axis fastest in C order, the first in
            // Fortran order.
            let axes: Vec<usize> = if fortran_order {
                (0..n).collect()
            } else {
                (0..n).rev().collect()
            };
            for axis in axes {
                let d = shape.get(axis).copied().unwrap_or(1);
                if let (Some(slot), Some(i)) = (index.get_mut(axis), rest.checked_rem(d)) {
                    *slot = i;
                }
                rest = rest.checked_div(d).unwrap_or(0);
            }
            let parts: Vec<String> = index.iter().map(ToString::to_string).collect();
            format!("element [{}]", parts.join(", "))
        }
    }
}

/// `Err` when either file is not a readable `.npy` (then the CIDs decide).
fn compare_npy(
    path: &str,
    a: &[u8],
    b: &[u8],
    rtol: f64,
    atol: f64,
) -> Result<Option<String>, String> {
    let x = parse_npy(a)
        .map_err(|e| format!("the first execution's file is not a readable .npy: {e}"))?;
    let y = parse_npy(b)
        .map_err(|e| format!("the second execution's file is not a readable .npy: {e}"))?;
    if x.dtype != y.dtype {
        return Ok(Some(format!("{path} dtype {} vs {}", x.descr, y.descr)));
    }
    if x.fortran_order != y.fortran_order {
        let order = |f: bool| if f { "Fortran" } else { "C" };
        return Ok(Some(format!(
            "{path} memory order {} vs {}",
            order(x.fortran_order),
            order(y.fortran_order)
        )));
    }
    if x.shape != y.shape {
        return Ok(Some(format!(
            "{path} shape {} vs {}",
            shape_text(&x.shape),
            shape_text(&y.shape)
        )));
    }
    let dtype = x.dtype;
    let elements = x
        .data
        .chunks_exact(dtype.size)
        .zip(y.data.chunks_exact(dtype.size));
    for (i, (ea, eb)) in elements.enumerate() {
        let (ba, bb) = (dtype.bits(ea), dtype.bits(eb));
        let why = match dtype.kind {
            Kind::Float => not_close(dtype.float(ba), dtype.float(bb), rtol, atol),
            // Integers count things (labels, indices, tokens): no tolerance.
            Kind::Int | Kind::Uint => (ba != bb).then(|| "integers must match exactly".into()),
        };
        if let Some(why) = why {
            return Ok(Some(format!(
                "{path} {}: {} vs {} ({why})",
                index_text(i, &x.shape, x.fortran_order),
                dtype.show(ba),
                dtype.show(bb)
            )));
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------- .json

/// `Err` when either file is not valid JSON (then the CIDs decide).
fn compare_json(
    path: &str,
    a: &[u8],
    b: &[u8],
    rtol: f64,
    atol: f64,
) -> Result<Option<String>, String> {
    let x: Value = serde_json::from_slice(a)
        .map_err(|e| format!("the first execution's file is not valid JSON: {e}"))?;
    let y: Value = serde_json::from_slice(b)
        .map_err(|e| format!("the second execution's file is not valid JSON: {e}"))?;
    let mut at = String::from("$");
    Ok(json_diff(&x, &y, &mut at, rtol, atol).map(|d| format!("{path} at {d}")))
}

/// The first difference as `<json path>: <what>`. Recursion is bounded by
/// serde_json's nesting limit (128).
fn json_diff(x: &Value, y: &Value, at: &mut String, rtol: f64, atol: f64) -> Option<String> {
    match (x, y) {
        (Value::Null, Value::Null) => None,
        (Value::Bool(p), Value::Bool(q)) => (p != q).then(|| format!("{at}: {p} vs {q}")),
        (Value::String(p), Value::String(q)) => {
            (p != q).then(|| format!("{at}: {} vs {}", shown(p), shown(q)))
        }
        (Value::Number(p), Value::Number(q)) => {
            json_number_diff(p, q, rtol, atol).map(|why| format!("{at}: {p} vs {q} ({why})"))
        }
        (Value::Array(p), Value::Array(q)) => {
            if p.len() != q.len() {
                return Some(format!("{at}: {} elements vs {}", p.len(), q.len()));
            }
            let len = at.len();
            for (i, (u, v)) in p.iter().zip(q).enumerate() {
                at.push_str(&format!("[{i}]"));
                let d = json_diff(u, v, at, rtol, atol);
                at.truncate(len);
                if d.is_some() {
                    return d;
                }
            }
            None
        }
        (Value::Object(p), Value::Object(q)) => {
            let keys: BTreeSet<&String> = p.keys().chain(q.keys()).collect();
            let len = at.len();
            for key in keys {
                let (u, v) = match (p.get(key), q.get(key)) {
                    (Some(u), Some(v)) => (u, v),
                    (_, None) => {
                        return Some(format!("{at}: key {} only in the first", shown(key)));
                    }
                    (None, _) => {
                        return Some(format!("{at}: key {} only in the second", shown(key)));
                    }
                };
                push_key(at, key);
                let d = json_diff(u, v, at, rtol, atol);
                at.truncate(len);
                if d.is_some() {
                    return d;
                }
            }
            None
        }
        _ => Some(format!("{at}: {} vs {}", json_kind(x), json_kind(y))),
    }
}

fn json_number_diff(p: &Number, q: &Number, rtol: f64, atol: f64) -> Option<String> {
    let int = |n: &Number| {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    };
    if let (Some(i), Some(j)) = (int(p), int(q)) {
        // Exact difference: as f64, 2^63 − 1 and 2^63 − 2 would be equal.
        if i == j || (i.abs_diff(j) as f64) <= atol + rtol * (j as f64).abs() {
            return None;
        }
        return Some(format!("beyond rtol {rtol}, atol {atol}"));
    }
    match (p.as_f64(), q.as_f64()) {
        (Some(u), Some(v)) => not_close(u, v, rtol, atol),
        _ => (p != q).then(|| "not comparable as numbers".into()),
    }
}

/// Appends `.key`, or `["key"]` for a key that is not an identifier.
fn push_key(at: &mut String, key: &str) {
    let plain = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        at.push('.');
        at.push_str(key);
    } else {
        at.push_str(&format!("[{}]", shown(key)));
    }
}

/// A string as JSON writes it, cut at [`MAX_SHOWN_CHARS`].
fn shown(s: &str) -> String {
    let mut cut: String = s.chars().take(MAX_SHOWN_CHARS).collect();
    let more = cut.len() < s.len();
    cut = Value::String(cut).to_string();
    if more {
        cut.push('…');
    }
    cut
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use kiln_protocol::Tolerance;

    use super::*;

    // ---- builders

    fn exact_v() -> Verify {
        Verify::default()
    }

    fn stdout_v() -> Verify {
        Verify {
            compare: Compare::Stdout,
            ..Verify::default()
        }
    }

    fn tol(rtol: f64, atol: f64) -> Verify {
        Verify {
            compare: Compare::Tolerance,
            rtol: Tolerance(rtol),
            atol: Tolerance(atol),
        }
    }

    /// A `.npy` file with a header dict written as given, padded as NumPy
    /// pads it (total prelude + header a multiple of 64, ending in `\n`).
    fn npy_with_header(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
        let prelude = NPY_MAGIC.len() + 2 + if version == 1 { 2 } else { 4 };
        let mut header = dict.to_string();
        while !(prelude + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut out = NPY_MAGIC.to_vec();
        out.extend([version, 0]);
        if version == 1 {
            out.extend(u16::try_from(header.len()).unwrap().to_le_bytes());
        } else {
            out.extend(u32::try_from(header.len()).unwrap().to_le_bytes());
        }
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    fn npy_v(version: u8, descr: &str, fortran: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
        let f = if fortran { "True" } else { "False" };
        let dict = format!(
            "{{'descr': '{descr}', 'fortran_order': {f}, 'shape': {}, }}",
            shape_text(shape)
        );
        npy_with_header(version, &dict, data)
    }

    fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
        npy_v(1, descr, false, shape, data)
    }

    fn f4(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn f8(v: &[f64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn f4_npy(v: &[f32]) -> Vec<u8> {
        npy("<f4", &[v.len()], &f4(v))
    }

    fn entry(path: &str, bytes: &[u8]) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            cid: ContentId::of_bytes(bytes),
            size: bytes.len() as u64,
            executable: false,
        }
    }

    /// A succeeded execution with `m` as its output.
    fn exec_of(m: &Manifest) -> Execution<'_> {
        Execution {
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            output_cid: m.cid(),
            manifest: m,
            stdout_cid: ContentId::of_bytes(b""),
        }
    }

    type Files = Vec<(&'static str, Vec<u8>)>;

    struct World {
        store: HashMap<ContentId, Vec<u8>>,
        manifests: [Manifest; 2],
    }

    impl World {
        fn new(a: &Files, b: &Files) -> Self {
            let mut store = HashMap::new();
            let mut manifest = |files: &Files| {
                let entries = files
                    .iter()
                    .map(|(p, bytes)| {
                        store.insert(ContentId::of_bytes(bytes), bytes.clone());
                        entry(p, bytes)
                    })
                    .collect();
                Manifest::new(entries).unwrap()
            };
            let manifests = [manifest(a), manifest(b)];
            Self { store, manifests }
        }

        fn exec(&self, i: usize) -> Execution<'_> {
            let m = &self.manifests[i];
            Execution {
                outcome: Outcome::Succeeded,
                exit_code: Some(0),
                output_cid: m.cid(),
                manifest: m,
                stdout_cid: ContentId::of_bytes(b"done\n"),
            }
        }

        fn compare_execs(
            &self,
            verify: &Verify,
            a: &Execution<'_>,
            b: &Execution<'_>,
        ) -> Result<Agreement, CompareError> {
            let mut read = |cid: &ContentId| {
                self.store
                    .get(cid)
                    .cloned()
                    .ok_or_else(|| "not in the store".to_string())
            };
            compare(verify, a, b, &mut read)
        }

        fn compare(&self, verify: &Verify) -> Agreement {
            self.compare_execs(verify, &self.exec(0), &self.exec(1))
                .unwrap()
        }
    }

    fn check(name: &str, got: &Agreement, want: Option<&[&str]>) {
        match (got, want) {
            (Agreement::Same, None) => {}
            (Agreement::Differ(d), Some(needles)) => {
                for n in needles {
                    assert!(d.contains(n), "{name}: {d:?} lacks {n:?}");
                }
            }
            _ => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }

    // ---- the table

    #[test]
    fn comparison_table() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let txt = |s: &str| s.as_bytes().to_vec();
        let mut bad_len = npy("<f4", &[1], &f4(&[1.0]));
        bad_len[8] = 0xff;
        bad_len[9] = 0xff;
        let mut bad_len_v2 = npy_v(2, "<f4", false, &[1], &f4(&[1.0]));
        bad_len_v2[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let overflow = npy_with_header(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }",
            &[],
        );
        let huge_dim = npy_with_header(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
            &[],
        );
        let many_dims = npy_with_header(
            1,
            &format!(
                "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}",
                "1, ".repeat(100)
            ),
            &f4(&[1.0]),
        );
        let structured = npy_with_header(
            1,
            "{'descr': [('x', '<f4')], 'fortran_order': False, 'shape': (1,), }",
            &f4(&[1.0]),
        );
        let valid = f4_npy(&[1.0, 2.0]);

        #[allow(clippy::type_complexity)]
        let rows: Vec<(&str, Verify, Files, Files, Option<&[&str]>)> = vec![
            // exact
            (
                "exact same",
                exact_v(),
                vec![("a.txt", txt("x"))],
                vec![("a.txt", txt("x"))],
                None,
            ),
            (
                "exact content",
                exact_v(),
                vec![("a.txt", txt("x")), ("b.txt", txt("y"))],
                vec![("a.txt", txt("x")), ("b.txt", txt("z"))],
                Some(&["b.txt differs (", " vs "]),
            ),
            (
                "exact extra path",
                exact_v(),
                vec![("a.txt", txt("x")), ("b.bin", txt("y"))],
                vec![("a.txt", txt("x"))],
                Some(&["b.bin only in the first"]),
            ),
            (
                "exact ignores tolerance-close floats",
                exact_v(),
                vec![("r.npy", f4_npy(&[1.0]))],
                vec![("r.npy", f4_npy(&[1.000_000_1]))],
                Some(&["r.npy differs"]),
            ),
            // stdout
            (
                "stdout ignores files",
                stdout_v(),
                vec![("log.txt", txt("12:00"))],
                vec![("log.txt", txt("12:01")), ("x", txt("y"))],
                None,
            ),
            // tolerance: .npy
            (
                "within rtol",
                tol(1e-3, 0.0),
                vec![("r.npy", f4_npy(&[1.0, 100.0]))],
                vec![("r.npy", f4_npy(&[1.0, 100.05]))],
                None,
            ),
            (
                "beyond rtol",
                tol(1e-3, 0.0),
                vec![("r.npy", f4_npy(&[1.0, 1.25, 3.0]))],
                vec![("r.npy", f4_npy(&[1.0, 1.31, 3.0]))],
                Some(&["r.npy element 1: 1.25 vs 1.31 (beyond rtol 0.001, atol 0)"]),
            ),
            (
                "atol near zero",
                tol(1e-3, 1e-6),
                vec![("r.npy", f4_npy(&[0.0, 1e-7]))],
                vec![("r.npy", f4_npy(&[5e-7, 0.0]))],
                None,
            ),
            (
                "beyond atol",
                tol(1e-3, 1e-6),
                vec![("r.npy", f4_npy(&[0.0]))],
                vec![("r.npy", f4_npy(&[1e-5]))],
                Some(&["element 0: 0 vs 0.00001", "atol 0.000001"]),
            ),
            (
                "NaN matches NaN",
                tol(1e-3, 0.0),
                vec![("r.npy", f4_npy(&[nan, 1.0]))],
                vec![("r.npy", f4_npy(&[nan, 1.0001]))],
                None,
            ),
            (
                "NaN vs number",
                tol(1.0, 1.0),
                vec![("r.npy", f4_npy(&[1.0, nan]))],
                vec![("r.npy", f4_npy(&[1.0, 2.0]))],
                Some(&["element 1: NaN vs 2 (NaN matches only NaN)"]),
            ),
            (
                "inf matches inf",
                tol(1e-3, 0.0),
                vec![("r.npy", f4_npy(&[inf, -inf, 1.0]))],
                vec![("r.npy", f4_npy(&[inf, -inf, 1.0001]))],
                None,
            ),
            (
                "inf vs finite, whatever rtol",
                tol(1e9, 0.0),
                vec![("r.npy", f4_npy(&[inf]))],
                vec![("r.npy", f4_npy(&[1e38]))],
                Some(&[
                    "inf vs 100000000000000000000000000000000000000",
                    "infinities",
                ]),
            ),
            (
                "shape mismatch",
                tol(1.0, 1.0),
                vec![("r.npy", npy("<f4", &[2, 3], &f4(&[0.0; 6])))],
                vec![("r.npy", npy("<f4", &[3, 2], &f4(&[0.0; 6])))],
                Some(&["r.npy shape (2, 3) vs (3, 2)"]),
            ),
            (
                "dtype mismatch",
                tol(1.0, 1.0),
                vec![("r.npy", npy("<f4", &[1], &f4(&[1.0])))],
                vec![("r.npy", npy("<f8", &[1], &f8(&[1.0])))],
                Some(&["r.npy dtype <f4 vs <f8"]),
            ),
            (
                "byte order is part of the dtype",
                tol(1.0, 1.0),
                vec![("r.npy", npy("<f4", &[1], &f4(&[1.0])))],
                vec![("r.npy", npy(">f4", &[1], &1f32.to_be_bytes()))],
                Some(&["dtype <f4 vs >f4"]),
            ),
            (
                "memory order mismatch",
                tol(1.0, 1.0),
                vec![("r.npy", npy_v(1, "<f4", false, &[2, 2], &f4(&[0.0; 4])))],
                vec![("r.npy", npy_v(1, "<f4", true, &[2, 2], &f4(&[0.0; 4])))],
                Some(&["memory order C vs Fortran"]),
            ),
            (
                "C-order index",
                tol(0.0, 0.0),
                vec![("r.npy", npy("<f8", &[2, 3], &f8(&[0.0; 6])))],
                vec![(
                    "r.npy",
                    npy("<f8", &[2, 3], &f8(&[0.0, 0.0, 0.0, 0.0, 0.5, 0.0])),
                )],
                Some(&["r.npy element [1, 1]: 0 vs 0.5"]),
            ),
            (
                "Fortran-order index",
                tol(0.0, 0.0),
                vec![("r.npy", npy_v(1, "<f8", true, &[2, 3], &f8(&[0.0; 6])))],
                vec![(
                    "r.npy",
                    npy_v(
                        1,
                        "<f8",
                        true,
                        &[2, 3],
                        &f8(&[0.0, 0.0, 0.0, 0.5, 0.0, 0.0]),
                    ),
                )],
                Some(&["element [1, 1]: 0 vs 0.5"]),
            ),
            (
                "0-d array",
                tol(0.0, 0.0),
                vec![("r.npy", npy("<f8", &[], &f8(&[1.0])))],
                vec![("r.npy", npy("<f8", &[], &f8(&[2.0])))],
                Some(&["r.npy value: 1 vs 2"]),
            ),
            (
                "big-endian f8 within",
                tol(1e-6, 0.0),
                vec![(
                    "r.npy",
                    npy(
                        ">f8",
                        &[2],
                        &[1.0f64.to_be_bytes(), 2.0f64.to_be_bytes()].concat(),
                    ),
                )],
                vec![(
                    "r.npy",
                    npy(
                        ">f8",
                        &[2],
                        &[1.0f64.to_be_bytes(), 2.000_000_1f64.to_be_bytes()].concat(),
                    ),
                )],
                None,
            ),
            (
                "big-endian f4 beyond",
                tol(0.1, 0.0),
                vec![("r.npy", npy(">f4", &[1], &1.0f32.to_be_bytes()))],
                vec![("r.npy", npy(">f4", &[1], &1.5f32.to_be_bytes()))],
                Some(&["element 0: 1 vs 1.5 (beyond rtol 0.1, atol 0)"]),
            ),
            (
                "f16 within (one ulp at 1.0 is ~9.8e-4)",
                tol(1e-3, 0.0),
                vec![("r.npy", npy("<f2", &[1], &0x3c00u16.to_le_bytes()))],
                vec![("r.npy", npy("<f2", &[1], &0x3c01u16.to_le_bytes()))],
                None,
            ),
            (
                "f16 beyond",
                tol(1e-4, 0.0),
                vec![("r.npy", npy("<f2", &[1], &0x3c00u16.to_le_bytes()))],
                vec![("r.npy", npy("<f2", &[1], &0x3c01u16.to_le_bytes()))],
                Some(&["element 0: 1 vs 1.0009766"]),
            ),
            (
                "f16 big-endian negative",
                tol(0.0, 0.0),
                vec![("r.npy", npy(">f2", &[1], &0xc000u16.to_be_bytes()))],
                vec![("r.npy", npy(">f2", &[1], &0xc200u16.to_be_bytes()))],
                Some(&["element 0: -2 vs -3"]),
            ),
            (
                "integers exact, sign-extended",
                tol(1.0, 1.0),
                vec![("r.npy", npy("|i1", &[2], &[0xff, 2]))],
                vec![("r.npy", npy("|i1", &[2], &[0xff, 3]))],
                Some(&["element 1: 2 vs 3 (integers must match exactly)"]),
            ),
            (
                "signed i4 shown signed",
                tol(1.0, 1.0),
                vec![("r.npy", npy("<i4", &[1], &(-5i32).to_le_bytes()))],
                vec![("r.npy", npy("<i4", &[1], &(-6i32).to_le_bytes()))],
                Some(&["element 0: -5 vs -6"]),
            ),
            (
                "u8 full range",
                tol(1.0, 1.0),
                vec![("r.npy", npy(">u8", &[1], &u64::MAX.to_be_bytes()))],
                vec![("r.npy", npy(">u8", &[1], &(u64::MAX - 1).to_be_bytes()))],
                Some(&["18446744073709551615 vs 18446744073709551614"]),
            ),
            (
                "|u1 and <u1 are one dtype",
                tol(0.0, 0.0),
                vec![("r.npy", npy("|u1", &[1], &[7]))],
                vec![("r.npy", npy("<u1", &[1], &[7]))],
                None,
            ),
            (
                "format 2.0 and 3.0 headers",
                tol(1e-3, 0.0),
                vec![("r.npy", npy_v(2, "<f4", false, &[1], &f4(&[1.0])))],
                vec![("r.npy", npy_v(3, "<f4", false, &[1], &f4(&[1.0001])))],
                None,
            ),
            (
                "unsupported dtype is exact",
                tol(1.0, 1.0),
                vec![("r.npy", npy("<c8", &[1], &f8(&[1.0])))],
                vec![("r.npy", npy("<c8", &[1], &f8(&[1.1])))],
                Some(&[
                    "r.npy differs (",
                    "dtype \"<c8\" is not compared numerically",
                ]),
            ),
            // malformed .npy: exact comparison, never a panic
            (
                "truncated npy",
                tol(1.0, 1.0),
                vec![("r.npy", valid[..9].to_vec())],
                vec![("r.npy", valid.clone())],
                Some(&[
                    "r.npy differs (",
                    "first execution's file is not a readable .npy",
                    "header length",
                ]),
            ),
            (
                "truncated data",
                tol(1.0, 1.0),
                vec![("r.npy", valid.clone())],
                vec![("r.npy", valid[..valid.len() - 1].to_vec())],
                Some(&["second execution's file", "7 data bytes", "needs 8"]),
            ),
            (
                "absurd header length v1",
                tol(1.0, 1.0),
                vec![("r.npy", bad_len)],
                vec![("r.npy", f4_npy(&[1.0]))],
                Some(&["header length 65535 runs past the end"]),
            ),
            (
                "absurd header length v2",
                tol(1.0, 1.0),
                vec![("r.npy", f4_npy(&[1.0]))],
                vec![("r.npy", bad_len_v2)],
                Some(&["header length 4294967295 runs past the end"]),
            ),
            (
                "shape product overflow",
                tol(1.0, 1.0),
                vec![("r.npy", overflow)],
                vec![("r.npy", f4_npy(&[1.0]))],
                Some(&["too many elements"]),
            ),
            (
                "dimension beyond usize",
                tol(1.0, 1.0),
                vec![("r.npy", huge_dim)],
                vec![("r.npy", f4_npy(&[1.0]))],
                Some(&["too large"]),
            ),
            (
                "too many dimensions",
                tol(1.0, 1.0),
                vec![("r.npy", many_dims)],
                vec![("r.npy", f4_npy(&[1.0]))],
                Some(&["more than 64 dimensions"]),
            ),
            (
                "structured dtype",
                tol(1.0, 1.0),
                vec![("r.npy", structured)],
                vec![("r.npy", f4_npy(&[1.0]))],
                Some(&["expected a string"]),
            ),
            (
                "not npy at all",
                tol(1.0, 1.0),
                vec![("r.npy", txt("hello"))],
                vec![("r.npy", txt("hellp"))],
                Some(&["magic"]),
            ),
            // tolerance: .json
            (
                "json within",
                tol(1e-3, 0.0),
                vec![(
                    "m.json",
                    txt(r#"{"loss": 0.5, "steps": [1, 2.0], "name": "x", "ok": true, "n": null}"#),
                )],
                vec![(
                    "m.json",
                    txt(r#"{"name":"x","n":null,"ok":true,"steps":[1.0,2],"loss":0.5004}"#),
                )],
                None,
            ),
            (
                "json beyond",
                tol(1e-3, 0.0),
                vec![("m.json", txt(r#"{"metrics": {"loss": [0.5, 0.51]}}"#))],
                vec![("m.json", txt(r#"{"metrics": {"loss": [0.5, 0.6]}}"#))],
                Some(&["m.json at $.metrics.loss[1]: 0.51 vs 0.6 (beyond rtol 0.001, atol 0)"]),
            ),
            (
                "json big integers exact at zero tolerance",
                tol(0.0, 0.0),
                vec![("m.json", txt("[9223372036854775807]"))],
                vec![("m.json", txt("[9223372036854775806]"))],
                Some(&["$[0]: 9223372036854775807 vs 9223372036854775806"]),
            ),
            (
                "json missing key",
                tol(1.0, 1.0),
                vec![("m.json", txt(r#"{"a": 1, "b": 2}"#))],
                vec![("m.json", txt(r#"{"a": 1}"#))],
                Some(&["m.json at $: key \"b\" only in the first"]),
            ),
            (
                "json array length",
                tol(1.0, 1.0),
                vec![("m.json", txt(r#"{"odd key": [1, 2]}"#))],
                vec![("m.json", txt(r#"{"odd key": [1, 2, 3]}"#))],
                Some(&["$[\"odd key\"]: 2 elements vs 3"]),
            ),
            (
                "json type",
                tol(1.0, 1.0),
                vec![("m.json", txt(r#"{"a": 1}"#))],
                vec![("m.json", txt(r#"{"a": "1"}"#))],
                Some(&["$.a: a number vs a string"]),
            ),
            (
                "json string exact",
                tol(1.0, 1.0),
                vec![("m.json", txt(r#"["cat"]"#))],
                vec![("m.json", txt(r#"["dog"]"#))],
                Some(&["$[0]: \"cat\" vs \"dog\""]),
            ),
            (
                "json invalid is exact",
                tol(1.0, 1.0),
                vec![("m.json", txt("{\"a\": 1"))],
                vec![("m.json", txt("{\"a\": 1}"))],
                Some(&["m.json differs (", "not valid JSON"]),
            ),
            // tolerance: files and paths
            (
                "other file differing",
                tol(1.0, 1.0),
                vec![("a.txt", txt("1.0"))],
                vec![("a.txt", txt("1.0000001"))],
                Some(&["a.txt differs ("]),
            ),
            (
                "path sets differ",
                tol(1.0, 1.0),
                vec![("a.npy", f4_npy(&[1.0]))],
                vec![("a.npy", f4_npy(&[1.1])), ("b.bin", txt("x"))],
                Some(&["b.bin only in the second"]),
            ),
            (
                "first difference by path",
                tol(1e-3, 0.0),
                vec![
                    ("a.npy", f4_npy(&[1.0])),
                    ("b.txt", txt("x")),
                    ("c.npy", f4_npy(&[1.0])),
                ],
                vec![
                    ("a.npy", f4_npy(&[1.0001])),
                    ("b.txt", txt("y")),
                    ("c.npy", f4_npy(&[2.0])),
                ],
                Some(&["b.txt differs"]),
            ),
        ];
        let count = rows.len();
        for (name, verify, a, b, want) in rows {
            let world = World::new(&a, &b);
            check(name, &world.compare(&verify), want);
        }
        assert!(count >= 40);
    }

    #[test]
    fn outcome_and_exit_code_come_first() {
        let files: Files = vec![("a.txt", b"x".to_vec())];
        let world = World::new(&files, &files);
        for verify in [exact_v(), stdout_v(), tol(1.0, 1.0)] {
            let a = world.exec(0);
            let b = Execution {
                exit_code: Some(3),
                outcome: Outcome::Failed,
                ..world.exec(1)
            };
            let got = world.compare_execs(&verify, &a, &b).unwrap();
            check("outcome", &got, Some(&["outcome succeeded vs failed"]));
            let a = Execution {
                outcome: Outcome::Failed,
                ..a
            };
            let got = world.compare_execs(&verify, &a, &b).unwrap();
            assert_eq!(got, Agreement::Differ("exit code 0 vs 3".into()));
            let b = Execution {
                exit_code: None,
                ..b
            };
            let got = world.compare_execs(&verify, &a, &b).unwrap();
            assert_eq!(got, Agreement::Differ("exit code 0 vs none".into()));
        }
    }

    #[test]
    fn stdout_mode_compares_stdout() {
        let files: Files = vec![("a.txt", b"x".to_vec())];
        let world = World::new(&files, &files);
        let b = Execution {
            stdout_cid: ContentId::of_bytes(b"other\n"),
            ..world.exec(1)
        };
        let got = world
            .compare_execs(&stdout_v(), &world.exec(0), &b)
            .unwrap();
        check("stdout", &got, Some(&["standard output differs ("]));
        // The other comparators ignore stdout.
        for verify in [exact_v(), tol(0.0, 0.0)] {
            let got = world.compare_execs(&verify, &world.exec(0), &b).unwrap();
            assert_eq!(got, Agreement::Same);
        }
    }

    #[test]
    fn exact_reports_executable_bit_and_inconsistent_cids() {
        let m1 = Manifest::new(vec![entry("run.sh", b"x")]).unwrap();
        let mut e = entry("run.sh", b"x");
        e.executable = true;
        let m2 = Manifest::new(vec![e]).unwrap();
        let exec = exec_of;
        let mut no_read = |_: &ContentId| -> Result<Vec<u8>, String> { Err("no reads".into()) };
        for verify in [exact_v(), tol(1.0, 1.0)] {
            let got = compare(&verify, &exec(&m1), &exec(&m2), &mut no_read).unwrap();
            check(
                "exec bit",
                &got,
                Some(&["run.sh is executable in the second execution only"]),
            );
        }
        let lying = Execution {
            output_cid: ContentId::of_bytes(b"not a manifest"),
            ..exec(&m1)
        };
        let got = compare(&exact_v(), &exec(&m1), &lying, &mut no_read).unwrap();
        check("cids", &got, Some(&["output manifests differ"]));
    }

    #[test]
    fn equal_files_are_not_read() {
        let a: Files = vec![("same.npy", f4_npy(&[5.0])), ("x.npy", f4_npy(&[1.0]))];
        let b: Files = vec![("same.npy", f4_npy(&[5.0])), ("x.npy", f4_npy(&[1.0001]))];
        let mut world = World::new(&a, &b);
        // Reading same.npy would now fail the comparison with an error.
        world.store.remove(&ContentId::of_bytes(&f4_npy(&[5.0])));
        let mut reads = 0;
        let mut read = |cid: &ContentId| {
            reads += 1;
            world
                .store
                .get(cid)
                .cloned()
                .ok_or_else(|| "missing".to_string())
        };
        let got = compare(&tol(1e-3, 0.0), &world.exec(0), &world.exec(1), &mut read).unwrap();
        assert_eq!(got, Agreement::Same);
        assert_eq!(reads, 2, "only x.npy's two versions are read");
    }

    #[test]
    fn oversized_files_are_compared_by_cid_only() {
        let mut ea = entry("big.npy", &f4_npy(&[1.0]));
        let mut eb = entry("big.npy", &f4_npy(&[1.0001]));
        ea.size = MAX_READ_BYTES + 1;
        eb.size = MAX_READ_BYTES + 1;
        let (ma, mb) = (
            Manifest::new(vec![ea]).unwrap(),
            Manifest::new(vec![eb]).unwrap(),
        );
        let mut j1 = entry("big.json", b"[1]");
        j1.size = MAX_JSON_BYTES + 1;
        let j2 = entry("big.json", b"[1.0]");
        let (mj1, mj2) = (
            Manifest::new(vec![j1]).unwrap(),
            Manifest::new(vec![j2]).unwrap(),
        );
        let exec = exec_of;
        // A read would fail the comparison with an error: none may happen.
        let mut no_read = |_: &ContentId| -> Result<Vec<u8>, String> { Err("no reads".into()) };
        let got = compare(&tol(1.0, 1.0), &exec(&ma), &exec(&mb), &mut no_read).unwrap();
        check(
            "npy",
            &got,
            Some(&["big.npy differs (", "larger than 256 MiB"]),
        );
        let got = compare(&tol(1.0, 1.0), &exec(&mj1), &exec(&mj2), &mut no_read).unwrap();
        check(
            "json",
            &got,
            Some(&["big.json differs (", "larger than 16 MiB"]),
        );
    }

    #[test]
    fn store_failures_are_errors() {
        let a: Files = vec![("r.npy", f4_npy(&[1.0]))];
        let b: Files = vec![("r.npy", f4_npy(&[2.0]))];
        let world = World::new(&a, &b);
        let cid_b = ContentId::of_bytes(&f4_npy(&[2.0]));
        let mut missing = |cid: &ContentId| {
            if *cid == cid_b {
                Err("gone".to_string())
            } else {
                Ok(f4_npy(&[1.0]))
            }
        };
        let err =
            compare(&tol(1.0, 1.0), &world.exec(0), &world.exec(1), &mut missing).unwrap_err();
        assert!(
            matches!(&err, CompareError::Read { side: Side::Second, reason, .. } if reason == "gone"),
            "{err}"
        );
        assert!(err.to_string().contains("`r.npy`"), "{err}");
        let mut wrong = |_: &ContentId| Ok(f4_npy(&[3.0]));
        let err = compare(&tol(1.0, 1.0), &world.exec(0), &world.exec(1), &mut wrong).unwrap_err();
        assert!(
            matches!(
                err,
                CompareError::Corrupt {
                    side: Side::First,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// Every prefix and many single-byte corruptions of valid files parse
    /// or fail cleanly (an adversarial provider writes these bytes).
    #[test]
    fn malformed_npy_never_panics() {
        let samples = [
            npy_v(1, "<f4", false, &[2, 3], &f4(&[1.0; 6])),
            npy_v(
                2,
                ">f8",
                true,
                &[2],
                &[1.0f64.to_be_bytes(), 2.0f64.to_be_bytes()].concat(),
            ),
            npy_v(3, "<f2", false, &[], &[0, 0x3c]),
        ];
        for valid in &samples {
            assert!(parse_npy(valid).is_ok());
            for len in 0..valid.len() {
                assert!(parse_npy(&valid[..len]).is_err(), "prefix {len} parsed");
            }
            for at in 0..valid.len().min(140) {
                for byte in [
                    0u8, b' ', b'\'', b'(', b')', b',', b'9', b'L', b'}', 0x80, 0xff,
                ] {
                    let mut v = valid.clone();
                    v[at] = byte;
                    let _ = parse_npy(&v);
                    let _ = compare_npy("r.npy", &v, valid, 1e-3, 0.0);
                }
            }
        }
    }

    #[test]
    fn f16_conversion() {
        for (bits, want) in [
            (0x0000u16, 0.0),
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x7bff, 65504.0),
            (0x0001, 2f64.powi(-24)),
            (0x0400, 2f64.powi(-14)),
            (0x7c00, f64::INFINITY),
            (0xfc00, f64::NEG_INFINITY),
        ] {
            assert_eq!(f16_to_f64(bits), want, "{bits:#06x}");
        }
        assert!(f16_to_f64(0x7e00).is_nan());
    }

    #[test]
    fn isclose_rule() {
        // (a, b, rtol, atol, close)
        let rows = [
            (1.0, 1.0, 0.0, 0.0, true),
            (1.001, 1.0, 1e-3, 0.0, true),
            (1.0011, 1.0, 1e-3, 0.0, false),
            // b is the reference: the bound scales with |b|, not |a|.
            (0.0, 1.0, 1.0, 0.0, true),
            (1.0, 0.0, 1.0, 0.0, false),
            (1e-9, 0.0, 0.0, 1e-8, true),
            (f64::NAN, f64::NAN, 0.0, 0.0, true),
            (f64::INFINITY, f64::INFINITY, 0.0, 0.0, true),
            (f64::INFINITY, f64::NEG_INFINITY, 1e300, 1e300, false),
            (1e308, -1e308, 1.0, 0.0, false),
        ];
        for (a, b, rtol, atol, close) in rows {
            assert_eq!(not_close(a, b, rtol, atol).is_none(), close, "{a} vs {b}");
        }
    }
}
