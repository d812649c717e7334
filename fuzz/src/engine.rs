//! The fuzzing loop: a miniature libFuzzer.
//!
//! ```text
//! corpus = seeds (valid encodings of real values) + files in the corpus dirs
//! loop until the time or execution budget is spent:
//!     input = mutate(random corpus entry, another entry for splicing)
//!     clear the coverage counters; run the target on input (caught, timed,
//!     allocations counted); read the counters
//!     a counter that was never non-zero, or reached a new power-of-two
//!     bucket of hits (1, 2, 3, 4-7, 8-15, 16-31, 32-127, 128+)  →  input
//!     joins the corpus (and the output corpus dir, if any)
//!     a panic, a broken property, an execution over the slow limit or an
//!     allocation over the bounds  →  a finding, saved under artifacts/
//! ```
//!
//! Without coverage instrumentation (a plain `cargo test`) there are no
//! counters: nothing joins the corpus and the loop is random mutation of
//! the seeds, still a meaningful smoke test of every decoder.
//!
//! Two limits end the process rather than a single execution, because the
//! execution cannot be stopped from outside: one still running after
//! [`Config::hang`] (a watchdog thread saves the input and exits with
//! status 70), and one allocation request over [`Config::hard_alloc`]
//! (saved, exit 71), which the system allocator might otherwise answer by
//! aborting.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::mutate::mutate;
use crate::rng::Rng;
use crate::sys;
use crate::targets::{Target, Verdict};

/// How a run is bounded and where it writes.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    /// Wall-clock budget for the mutation loop (the corpus replay comes first).
    pub time: Duration,
    /// Execution budget for the mutation loop (`None`: only the time bounds it).
    pub max_execs: Option<u64>,
    /// Directories whose files are replayed and join the corpus.
    pub corpus_dirs: Vec<PathBuf>,
    /// Where inputs that found new coverage are written (`None`: nowhere).
    pub save_corpus: Option<PathBuf>,
    /// Where findings are written (`<dir>/<kind>-<hash>`, plus `.txt`).
    pub artifacts: PathBuf,
    /// An execution slower than this is a finding (a hang).
    pub slow: Duration,
    /// An execution running this long ends the process (watchdog).
    pub hang: Duration,
    /// A single allocation larger than this is a finding.
    pub max_alloc: usize,
    /// Live bytes growing by more than this within one execution is a finding.
    pub max_growth: usize,
    /// A single allocation request larger than this ends the process.
    pub hard_alloc: usize,
    /// Print progress lines to stderr.
    pub verbose: bool,
}

impl Config {
    pub fn new(artifacts: PathBuf) -> Self {
        Self {
            seed: 1,
            time: Duration::from_secs(10),
            max_execs: None,
            corpus_dirs: Vec::new(),
            save_corpus: None,
            artifacts,
            slow: Duration::from_secs(1),
            hang: Duration::from_secs(10),
            max_alloc: 256 << 20,
            max_growth: 1 << 30,
            hard_alloc: 2 << 30,
            verbose: false,
        }
    }
}

/// What kind of problem an input showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The target panicked.
    Panic,
    /// A property the decoder promises failed (e.g. decode ∘ encode ≠ id).
    Property,
    /// One execution took longer than the slow limit (a hang, short of
    /// the watchdog's limit).
    Hang,
    /// One execution allocated more than the bounds allow.
    Alloc,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Panic => "panic",
            Self::Property => "property",
            Self::Hang => "hang",
            Self::Alloc => "alloc",
        }
    }
}

/// One distinct finding (or note), with the first input that showed it.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub kind: Kind,
    pub message: String,
    /// How many inputs showed it.
    pub count: u64,
    pub input_len: usize,
    /// Where the first input was saved.
    pub artifact: Option<PathBuf>,
    #[serde(skip)]
    pub input: Vec<u8>,
}

/// Coverage as the counters saw it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Coverage {
    /// Whether the build was instrumented (`fuzz/run` builds it so).
    pub instrumented: bool,
    /// Counters (edges) that were non-zero at least once.
    pub counters_hit: usize,
    /// Counters in the binary: every edge of every instrumented crate.
    pub counters_total: usize,
    /// Distinct (counter, hit-count bucket) pairs seen: libFuzzer's "ft".
    pub features: usize,
}

/// The summary of one run, written as JSON by `kiln-fuzz run`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub target: String,
    pub seed: u64,
    pub seconds: f64,
    /// Executions in all (corpus replay included).
    pub executions: u64,
    pub execs_per_sec: f64,
    /// Inputs the decoder accepted (every property checked) and refused.
    pub accepted: u64,
    pub rejected: u64,
    pub coverage: Coverage,
    /// Inputs replayed at the start (seeds and corpus files).
    pub corpus_replayed: usize,
    /// Corpus entries at the end (replayed plus new coverage).
    pub corpus_size: usize,
    pub corpus_bytes: usize,
    /// Corpus entries added by this run.
    pub corpus_new: usize,
    pub findings: Vec<Finding>,
    /// Observations that are not failures (e.g. a non-canonical encoding
    /// that still decodes to the same value), with an example.
    pub notes: Vec<Finding>,
    /// The largest single allocation any execution made, and its input size.
    pub largest_alloc_bytes: usize,
    pub largest_alloc_input_len: usize,
    pub slowest_exec_ms: f64,
    pub allocations_counted: bool,
}

// ---------------------------------------------------------------------------
// Process-wide hooks: panic capture, watchdog, hard allocation limit.

thread_local! {
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    static PANIC_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The input being executed, for the watchdog and the allocation hook.
struct Current {
    target: &'static str,
    artifacts: PathBuf,
    data: Vec<u8>,
}

static CURRENT: Mutex<Current> = Mutex::new(Current {
    target: "",
    artifacts: PathBuf::new(),
    data: Vec::new(),
});
/// Milliseconds since `EPOCH` when the running execution started, plus one
/// (0: none running); and the hang limit in ms.
static EXEC_START: AtomicU64 = AtomicU64::new(0);
static HANG_MS: AtomicU64 = AtomicU64::new(10_000);
static HOOKS: Once = Once::new();
static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

fn install_hooks(cfg: &Config) {
    HANG_MS.store(cfg.hang.as_millis() as u64, Relaxed);
    ensure_hooks();
    sys::set_hard_limit(cfg.hard_alloc, over_hard_limit);
}

/// The panic hook and the watchdog, once per process (with the default
/// limits until [`run`] sets its own).
fn ensure_hooks() {
    HOOKS.call_once(|| {
        // Panics on the fuzzing thread are findings: record the message
        // quietly. Any other thread's panic (a test's) goes to the usual hook.
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(Cell::get) {
                PANIC_MESSAGE.with(|m| *m.borrow_mut() = Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
        let _ = now_ms();
        std::thread::Builder::new()
            .name("kiln-fuzz-watchdog".into())
            .spawn(watchdog)
            .ok();
        sys::set_hard_limit(Config::new(PathBuf::new()).hard_alloc, over_hard_limit);
    });
}

fn over_hard_limit(size: usize) {
    die(
        "oom",
        &format!("one allocation request of {size} bytes (over the hard limit)"),
        71,
    )
}

fn watchdog() {
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let started = EXEC_START.load(Relaxed);
        if started == 0 {
            continue;
        }
        let ran = now_ms().saturating_sub(started - 1);
        if ran > HANG_MS.load(Relaxed) {
            die(
                "hang",
                &format!("one execution still running after {ran} ms"),
                70,
            );
        }
    }
}

/// Saves the running input and ends the process.
fn die(kind: &str, why: &str, code: i32) -> ! {
    let cur = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = if cur.artifacts.as_os_str().is_empty() {
        crate::artifacts_dir(cur.target)
    } else {
        cur.artifacts.clone()
    };
    let path = save_artifact(&dir, kind, &cur.data, why);
    eprintln!(
        "kiln-fuzz: {}: {why}; input ({} bytes) saved to {}",
        cur.target,
        cur.data.len(),
        path.map_or_else(|| "<not saved>".into(), |p| p.display().to_string())
    );
    std::process::exit(code);
}

fn save_artifact(dir: &Path, kind: &str, data: &[u8], why: &str) -> Option<PathBuf> {
    std::fs::create_dir_all(dir).ok()?;
    let path = dir.join(format!("{kind}-{}", short_hash(data)));
    std::fs::write(&path, data).ok()?;
    std::fs::write(path.with_extension("txt"), format!("{why}\n")).ok()?;
    Some(path)
}

/// 16 hex digits of the BLAKE3 of `data`: corpus and artifact file names.
pub fn short_hash(data: &[u8]) -> String {
    hex::encode(&blake3::hash(data).as_bytes()[..8])
}

// ---------------------------------------------------------------------------
// Executing one input

/// What one execution did.
#[derive(Debug)]
pub struct Exec {
    pub result: Result<Verdict, (Kind, String)>,
    pub elapsed: Duration,
    pub alloc: sys::AllocStats,
}

/// Runs `target` on `data` once: panics caught, time and allocations measured.
pub fn execute(target: &Target, data: &[u8]) -> Exec {
    ensure_hooks();
    {
        let mut cur = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
        cur.target = target.name;
        cur.data.clear();
        cur.data.extend_from_slice(data);
    }
    EXEC_START.store(now_ms() + 1, Relaxed);
    CAPTURING.with(|c| c.set(true));
    let base = sys::arm();
    let start = Instant::now();
    let r = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(data)));
    let elapsed = start.elapsed();
    let alloc = sys::disarm(base);
    CAPTURING.with(|c| c.set(false));
    EXEC_START.store(0, Relaxed);
    let result = match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(why)) => Err((Kind::Property, why)),
        Err(payload) => {
            let msg = PANIC_MESSAGE
                .with(|m| m.borrow_mut().take())
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic with a non-string payload".into());
            Err((Kind::Panic, msg))
        }
    };
    Exec {
        result,
        elapsed,
        alloc,
    }
}

// ---------------------------------------------------------------------------
// The loop

struct Fuzzer<'a> {
    target: &'a Target,
    cfg: &'a Config,
    rng: Rng,
    counters: sys::Counters,
    /// Per counter, the hit-count buckets seen (one bit each).
    virgin: Vec<u8>,
    corpus: Vec<Vec<u8>>,
    known: HashSet<[u8; 32]>,
    report: Report,
    findings: BTreeMap<(Kind, String), Finding>,
    notes: BTreeMap<String, Finding>,
}

/// The bucket bit of a hit count (AFL's classes).
fn bucket(count: u8) -> u8 {
    match count {
        0 => 0,
        1 => 1,
        2 => 2,
        3 => 4,
        4..=7 => 8,
        8..=15 => 16,
        16..=31 => 32,
        32..=127 => 64,
        _ => 128,
    }
}

/// An allocation at least this large and [`AMPLIFICATION`] times the
/// input is noted.
const AMPLIFIED_ALLOC: usize = 16 << 20;
const AMPLIFICATION: usize = 4096;

/// Most distinct findings (and notes) kept per run; more are counted under
/// the last one's kind.
const MAX_DISTINCT: usize = 64;

impl<'a> Fuzzer<'a> {
    fn new(target: &'a Target, cfg: &'a Config) -> Self {
        let counters = sys::counters();
        let virgin = vec![0u8; counters.len()];
        Self {
            target,
            cfg,
            rng: Rng::new(cfg.seed ^ fnv(target.name)),
            counters,
            virgin,
            corpus: Vec::new(),
            known: HashSet::new(),
            report: Report {
                target: target.name.to_string(),
                seed: cfg.seed,
                allocations_counted: sys::alloc_counting(),
                ..Report::default()
            },
            findings: BTreeMap::new(),
            notes: BTreeMap::new(),
        }
    }

    /// Runs one input; returns whether it found new coverage.
    fn run_one(&mut self, data: &[u8]) -> bool {
        self.counters.clear();
        let exec = execute(self.target, data);
        let mut new = false;
        let virgin = &mut self.virgin;
        let mut hit = 0usize;
        self.counters.drain(|i, count| {
            let b = bucket(count);
            let seen = virgin[i];
            if seen & b == 0 {
                if seen == 0 {
                    hit += 1;
                }
                virgin[i] = seen | b;
                new = true;
            }
        });
        self.report.coverage.counters_hit += hit;
        self.report.executions += 1;
        let ms = exec.elapsed.as_secs_f64() * 1000.0;
        if ms > self.report.slowest_exec_ms {
            self.report.slowest_exec_ms = ms;
        }
        if exec.alloc.largest > self.report.largest_alloc_bytes {
            self.report.largest_alloc_bytes = exec.alloc.largest;
            self.report.largest_alloc_input_len = data.len();
        }
        match exec.result {
            Ok(Verdict::Accepted) => self.report.accepted += 1,
            Ok(Verdict::Rejected) => self.report.rejected += 1,
            Ok(Verdict::Note(why)) => {
                self.report.accepted += 1;
                self.note(why, data);
            }
            Err((kind, why)) => self.find(kind, why, data),
        }
        if exec.elapsed > self.cfg.slow {
            let why = format!(
                "one execution took {ms:.0} ms (limit {} ms)",
                self.cfg.slow.as_millis()
            );
            self.find(Kind::Hang, why, data);
        }
        // Not a failure below the bound, but worth knowing: a few bytes
        // that make the decoder reserve megabytes (per connection, say).
        if exec.alloc.largest >= AMPLIFIED_ALLOC
            && exec.alloc.largest / data.len().max(1) >= AMPLIFICATION
        {
            self.note(
                format!(
                    "allocation amplification: one allocation of {} bytes from a {}-byte input",
                    exec.alloc.largest,
                    data.len()
                ),
                data,
            );
        }
        if exec.alloc.largest > self.cfg.max_alloc {
            let why = format!(
                "one allocation of {} bytes (limit {}) from a {}-byte input",
                exec.alloc.largest,
                self.cfg.max_alloc,
                data.len()
            );
            self.find(Kind::Alloc, why, data);
        } else if exec.alloc.peak_growth > self.cfg.max_growth {
            let why = format!(
                "live memory grew by {} bytes (limit {}) from a {}-byte input",
                exec.alloc.peak_growth,
                self.cfg.max_growth,
                data.len()
            );
            self.find(Kind::Alloc, why, data);
        }
        new
    }

    fn find(&mut self, kind: Kind, why: String, data: &[u8]) {
        // Distinct by kind and the message's first line without numbers
        // (the same bug at another offset is the same finding).
        let first = why.lines().next().unwrap_or("").to_string();
        let sig: String = first
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(160)
            .collect();
        let full = self.findings.len() >= MAX_DISTINCT;
        let key = if full && !self.findings.contains_key(&(kind, sig.clone())) {
            (kind, "<more findings>".to_string())
        } else {
            (kind, sig)
        };
        if let Some(f) = self.findings.get_mut(&key) {
            f.count += 1;
            return;
        }
        let artifact = save_artifact(&self.cfg.artifacts, kind.as_str(), data, &why);
        if self.cfg.verbose {
            eprintln!(
                "#{} {}: {}: {why} ({} bytes, saved to {})",
                self.report.executions,
                self.target.name,
                kind.as_str(),
                data.len(),
                artifact
                    .as_ref()
                    .map_or_else(|| "<not saved>".into(), |p| p.display().to_string())
            );
        }
        self.findings.insert(
            key,
            Finding {
                kind,
                message: why,
                count: 1,
                input_len: data.len(),
                artifact,
                input: data.to_vec(),
            },
        );
    }

    fn note(&mut self, why: String, data: &[u8]) {
        let sig: String = why
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(160)
            .collect();
        if let Some(n) = self.notes.get_mut(&sig) {
            n.count += 1;
            return;
        }
        if self.notes.len() >= MAX_DISTINCT {
            return;
        }
        let artifact = save_artifact(&self.cfg.artifacts, "note", data, &why);
        self.notes.insert(
            sig,
            Finding {
                kind: Kind::Property,
                message: why,
                count: 1,
                input_len: data.len(),
                artifact,
                input: data.to_vec(),
            },
        );
    }

    fn add(&mut self, data: Vec<u8>) -> bool {
        let h = *blake3::hash(&data).as_bytes();
        if !self.known.insert(h) {
            return false;
        }
        self.report.corpus_bytes += data.len();
        self.corpus.push(data);
        true
    }

    fn replay(&mut self, inputs: Vec<Vec<u8>>) {
        for data in inputs {
            let h = *blake3::hash(&data).as_bytes();
            if self.known.contains(&h) {
                continue;
            }
            self.run_one(&data);
            self.report.corpus_replayed += 1;
            // Every replayed input stays (seeds matter even without new
            // coverage: they are the valid shapes mutations start from).
            self.add(data);
        }
    }

    fn fuzz(&mut self) {
        let start = Instant::now();
        let mut last_print = Instant::now();
        let mut input = Vec::new();
        let mut n = 0u64;
        loop {
            if self.cfg.max_execs.is_some_and(|m| n >= m) {
                break;
            }
            // Check the clock every few executions (it costs a syscall-free
            // but not free read).
            if n.is_multiple_of(16) && start.elapsed() >= self.cfg.time {
                break;
            }
            n += 1;
            input.clear();
            let base = self.rng.below(self.corpus.len());
            if let Some(entry) = self.corpus.get(base) {
                input.extend_from_slice(entry);
            }
            let other = self.rng.below(self.corpus.len());
            let other = self.corpus.get(other).map_or(&[][..], Vec::as_slice);
            mutate(
                &mut self.rng,
                &mut input,
                other,
                self.target.dict,
                self.target.max_len,
            );
            if self.run_one(&input) && self.add(input.clone()) {
                self.report.corpus_new += 1;
                if let Some(dir) = &self.cfg.save_corpus {
                    let _ = std::fs::create_dir_all(dir);
                    let _ = std::fs::write(dir.join(short_hash(&input)), &input);
                }
            }
            if self.cfg.verbose && last_print.elapsed() >= Duration::from_secs(10) {
                last_print = Instant::now();
                let secs = start.elapsed().as_secs_f64();
                eprintln!(
                    "#{} {:.0}s {}: cov {}/{} ft {} corp {} exec/s {:.0} findings {}",
                    self.report.executions,
                    secs,
                    self.target.name,
                    self.report.coverage.counters_hit,
                    self.counters.len(),
                    self.features(),
                    self.corpus.len(),
                    n as f64 / secs.max(1e-9),
                    self.findings.len()
                );
                let _ = std::io::stderr().flush();
            }
        }
    }

    fn features(&self) -> usize {
        self.virgin.iter().map(|b| b.count_ones() as usize).sum()
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Reads every file of `dirs` (not recursive), sorted by name; missing
/// directories are skipped.
pub fn read_dirs(dirs: &[PathBuf]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        out.extend(paths.iter().filter_map(|p| std::fs::read(p).ok()));
    }
    out
}

/// Replays the target's seeds and the corpus dirs, then fuzzes within the
/// budget. Findings are saved as they are found and listed in the report.
pub fn run(target: &Target, cfg: &Config) -> Report {
    install_hooks(cfg);
    {
        let mut cur = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
        cur.artifacts = cfg.artifacts.clone();
    }
    let start = Instant::now();
    let mut f = Fuzzer::new(target, cfg);
    let mut inputs = (target.seeds)();
    inputs.extend(read_dirs(&cfg.corpus_dirs));
    f.replay(inputs);
    f.fuzz();
    let secs = start.elapsed().as_secs_f64();
    let features = f.features();
    let Fuzzer {
        mut report,
        findings,
        notes,
        corpus,
        counters,
        ..
    } = f;
    report.seconds = secs;
    report.execs_per_sec = report.executions as f64 / secs.max(1e-9);
    report.coverage.instrumented = !counters.is_empty();
    report.coverage.counters_total = counters.len();
    report.coverage.features = features;
    report.corpus_size = corpus.len();
    report.findings = findings.into_values().collect();
    report.notes = notes.into_values().collect();
    report
}
