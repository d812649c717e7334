//! `kiln-workload`: the deterministic program Kiln runs as its demo job and as
//! the job in its tests.
//!
//! It is linked statically and shipped alone in a `FROM scratch` image, where
//! it runs as uid 65534 with a read-only root filesystem, no network, a
//! writable `/tmp` and an output directory (default `/out`, overridable with
//! `KILN_OUTPUT_DIR`). Inputs, if any, are mounted read-only under `/in`
//! (overridable with `KILN_INPUT_DIR`, used by `demo`).
//!
//! Everything it writes is a pure function of its arguments and inputs, so two
//! providers running the same job must produce byte-identical outputs; that is
//! what makes results checkable. Progress goes to stdout, one line per step;
//! errors go to stderr.
//!
//! Exit codes: 0 success, 1 runtime failure (I/O...), 2 usage error,
//! 42 `connect` could not connect, 99 a `hostile` case breached the sandbox,
//! and whatever `exit <code>` asks for.
//!
//! `hostile <case>` (see `hostile.rs`) is not deterministic: it is the sandbox
//! test suite's probe, attempting escapes and resource abuse for real.
//! Neither is `noisy`, on purpose: it stands in for GPU work whose
//! floating-point reductions differ in their last bits from run to run, which
//! a job verifies with `compare = "tolerance"`.

mod hostile;
mod matmul;
mod prng;

use std::fs;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use prng::Xoshiro256StarStar;

/// Exit status of a successful run.
const EXIT_OK: u8 = 0;
/// Exit status for runtime failures (I/O errors and the like).
const EXIT_FAILURE: u8 = 1;
/// Exit status for an unknown subcommand or bad arguments.
const EXIT_USAGE: u8 = 2;
/// Exit status of `connect` when the connection could not be made.
const EXIT_CONNECT_FAILED: u8 = 42;

/// Default seed of `demo`.
const DEMO_DEFAULT_SEED: u64 = 42;
/// Matrix size used by `demo`.
const DEMO_MATMUL_N: usize = 64;
/// Default timeout of `connect`.
const CONNECT_DEFAULT_TIMEOUT_MS: u64 = 3000;

const USAGE: &str = "\
usage: kiln-workload <command> [args...]

commands:
  echo <words...>                 print the words to stdout
  exit <code> [message...]        print message to stderr, exit with <code> (0-255)
  sleep <seconds>                 sleep (fractions allowed)
  tick <n> <interval_ms>          print `tick 1` … `tick n`, one every interval
  write <relpath> <bytes> [seed]  write deterministic pseudo-random bytes to <outdir>/<relpath>
  hash <path>...                  blake3 every file under the paths (b3sum format),
                                  also written to <outdir>/hashes.txt
  matmul <n> <seed>               C = A*B for seeded random n x n f64 matrices,
                                  checksum written to <outdir>/matmul.txt
  connect <host:port> [timeout_ms]
                                  TCP connect; exit 0 if it works, 42 if not
  gang [fail_rank]                a gang member: rank, size and peers from
                                  KILN_GANG_* into <outdir>/rank.txt; exits 3
                                  if its rank is fail_rank
  noisy <path> <n> <amplitude>    <outdir>/<path> = a NumPy .npy of n float64
                                  values (i+1)*(1+amplitude*u), u uniform in
                                  [-1,1) and different on every run
  demo [seed]                     the devnet demo: hash <indir>, matmul 64 <seed>,
                                  summary in <outdir>/result.txt
  hostile <case> [args...]        sandbox probe: attempt something hostile for real;
                                  last line `HOSTILE <case> contained|BREACHED|done: ...`
                                  (`hostile list`, `hostile help`)

environment:
  KILN_OUTPUT_DIR  output directory (default /out)
  KILN_INPUT_DIR   input directory used by demo (default /in)

exit codes: 0 ok, 1 runtime error, 2 usage error, 42 connect failed,
            99 hostile case breached";

/// Why a command did not succeed.
#[derive(Debug)]
enum Failure {
    /// Bad invocation: the message and the usage go to stderr, exit 2.
    Usage(String),
    /// Something failed while running: message to stderr, exit 1.
    Runtime(String),
    /// Exit with this status; the command already reported why.
    Exit(u8),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Runtime(e.to_string())
    }
}

type CmdResult = Result<(), Failure>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match run(&args) {
        Ok(()) => EXIT_OK,
        Err(Failure::Usage(msg)) => {
            eprintln!("kiln-workload: {msg}");
            eprintln!("{USAGE}");
            EXIT_USAGE
        }
        Err(Failure::Runtime(msg)) => {
            eprintln!("kiln-workload: error: {msg}");
            EXIT_FAILURE
        }
        Err(Failure::Exit(code)) => code,
    };
    let _ = io::stdout().flush();
    ExitCode::from(code)
}

/// Prints one progress line on stdout. A closed stdout is not worth dying for.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

fn run(args: &[String]) -> CmdResult {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(Failure::Usage("missing command".into()));
    };
    match cmd.as_str() {
        "echo" => cmd_echo(rest),
        "exit" => cmd_exit(rest),
        "sleep" => cmd_sleep(rest),
        "tick" => cmd_tick(rest),
        "write" => cmd_write(rest),
        "hash" => cmd_hash(rest),
        "matmul" => cmd_matmul(rest),
        "connect" => cmd_connect(rest),
        "demo" => cmd_demo(rest),
        "noisy" => cmd_noisy(rest),
        "gang" => cmd_gang(rest),
        "hostile" => hostile::run(rest),
        "help" | "--help" | "-h" => {
            say(USAGE);
            Ok(())
        }
        other => Err(Failure::Usage(format!("unknown command `{other}`"))),
    }
}

// ---------------------------------------------------------------- arguments

fn parse<T: std::str::FromStr>(what: &str, s: &str) -> Result<T, Failure> {
    s.parse()
        .map_err(|_| Failure::Usage(format!("invalid {what} `{s}`")))
}

fn arity(cmd: &str, args: &[String], min: usize, max: usize) -> CmdResult {
    if args.len() < min || args.len() > max {
        Err(Failure::Usage(format!(
            "`{cmd}` takes {min}..={max} arguments, got {}",
            args.len()
        )))
    } else {
        Ok(())
    }
}

fn output_dir() -> PathBuf {
    std::env::var_os("KILN_OUTPUT_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/out"), PathBuf::from)
}

fn input_dir() -> PathBuf {
    std::env::var_os("KILN_INPUT_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/in"), PathBuf::from)
}

/// Creates `dir` and its missing parents. New directories are made
/// world-writable: the workload runs as uid 65534, and the provider on the
/// host (another uid) must still be able to clean the output tree up.
fn ensure_dir(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(p) = cur {
        if p.as_os_str().is_empty() || p.is_dir() {
            break;
        }
        missing.push(p);
        cur = p.parent();
    }
    for p in missing.into_iter().rev() {
        match fs::create_dir(p) {
            Ok(()) => fs::set_permissions(p, fs::Permissions::from_mode(0o777))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("mkdir {}: {e}", p.display()),
                ));
            }
        }
    }
    Ok(())
}

fn write_text(path: &Path, text: &str) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        ensure_dir(parent)?;
    }
    fs::write(path, text)
        .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", path.display())))
}

// ---------------------------------------------------------------- commands

fn cmd_echo(args: &[String]) -> CmdResult {
    say(&args.join(" "));
    Ok(())
}

/// One member of a gang job: reports the rank, size and peers Kiln set,
/// writes them to `<outdir>/rank.txt`, and exits with `fail_rank`'s code 3
/// when this member has that rank (to test a failing member).
fn cmd_gang(args: &[String]) -> CmdResult {
    arity("gang", args, 0, 1)?;
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let (rank, size, peers) = (
        var("KILN_GANG_RANK"),
        var("KILN_GANG_SIZE"),
        var("KILN_GANG_PEERS"),
    );
    if rank.is_empty() || size.is_empty() {
        return Err(Failure::Runtime(
            "KILN_GANG_RANK/KILN_GANG_SIZE are not set: not started as a gang member".into(),
        ));
    }
    let line = format!("rank={rank} size={size} peers={peers}");
    say(&format!("gang: {line}"));
    let dir = output_dir();
    ensure_dir(&dir)?;
    fs::write(dir.join("rank.txt"), format!("{line}\n"))?;
    if args.first().is_some_and(|f| *f == rank) {
        eprintln!("gang: rank {rank} fails on purpose");
        return Err(Failure::Exit(3));
    }
    Ok(())
}

fn cmd_exit(args: &[String]) -> CmdResult {
    if args.is_empty() {
        return Err(Failure::Usage("`exit` needs a code".into()));
    }
    let code: u8 = parse("exit code (0-255)", &args[0])?;
    say(&format!("exit: exiting with code {code}"));
    if args.len() > 1 {
        eprintln!("{}", args[1..].join(" "));
    }
    Err(Failure::Exit(code))
}

fn cmd_sleep(args: &[String]) -> CmdResult {
    arity("sleep", args, 1, 1)?;
    let secs: f64 = parse("seconds", &args[0])?;
    let dur = Duration::try_from_secs_f64(secs)
        .map_err(|_| Failure::Usage(format!("invalid seconds `{}`", args[0])))?;
    say(&format!("sleep: sleeping {secs}s"));
    std::thread::sleep(dur);
    say(&format!("sleep: done after {secs}s"));
    Ok(())
}

/// Prints `tick i` every `interval_ms`, `n` times: output that arrives
/// over time (for following logs).
fn cmd_tick(args: &[String]) -> CmdResult {
    arity("tick", args, 2, 2)?;
    let n: u64 = parse("n", &args[0])?;
    let every: u64 = parse("interval_ms", &args[1])?;
    for i in 1..=n {
        say(&format!("tick {i}"));
        if i < n {
            std::thread::sleep(Duration::from_millis(every));
        }
    }
    Ok(())
}

/// Rejects absolute paths and `..` so `write` cannot escape the output dir.
fn safe_relpath(s: &str) -> Result<PathBuf, Failure> {
    let p = PathBuf::from(s);
    let ok = !s.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if ok && p.components().any(|c| matches!(c, Component::Normal(_))) {
        Ok(p)
    } else {
        Err(Failure::Usage(format!(
            "`{s}` must be a relative path inside the output directory (no `..`)"
        )))
    }
}

fn cmd_write(args: &[String]) -> CmdResult {
    arity("write", args, 2, 3)?;
    let rel = safe_relpath(&args[0])?;
    let size: u64 = parse("byte count", &args[1])?;
    let seed: u64 = match args.get(2) {
        Some(s) => parse("seed", s)?,
        None => 0,
    };
    let path = output_dir().join(rel);
    say(&format!(
        "write: writing {} ({size} bytes, seed {seed})",
        path.display()
    ));
    let hex = write_random_file(&path, size, seed)?;
    say(&format!("{hex}  {}", path.display()));
    Ok(())
}

/// Streams `size` seeded pseudo-random bytes into `path`; returns their blake3.
fn write_random_file(path: &Path, size: u64, seed: u64) -> io::Result<String> {
    if let Some(parent) = path.parent() {
        ensure_dir(parent)?;
    }
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("write {}: {e}", path.display()));
    let mut file = fs::File::create(path).map_err(ctx)?;
    let mut rng = Xoshiro256StarStar::seed_from_u64(seed);
    let mut hasher = blake3::Hasher::new();
    // A multiple of 8, so the byte stream does not depend on the chunking.
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let chunk = &mut buf[..n];
        rng.fill_bytes(chunk);
        hasher.update(chunk);
        file.write_all(chunk).map_err(ctx)?;
        left -= n as u64;
    }
    file.sync_all().map_err(ctx)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Collects every regular file under `path` (which may itself be a file).
/// Symlinks to files are followed; symlinks to directories are skipped (with a
/// note on stderr) so a link cycle cannot loop forever.
fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let meta = fs::symlink_metadata(path).map_err(ctx)?;
    let ft = meta.file_type();
    if ft.is_dir() {
        let mut entries = Vec::new();
        for entry in fs::read_dir(path).map_err(ctx)? {
            entries.push(entry.map_err(ctx)?.path());
        }
        entries.sort();
        for e in entries {
            collect_files(&e, out)?;
        }
    } else if ft.is_file() {
        out.push(path.to_path_buf());
    } else if ft.is_symlink() {
        match fs::metadata(path) {
            Ok(m) if m.is_file() => out.push(path.to_path_buf()),
            Ok(_) => eprintln!(
                "hash: skipping symlink {} (not a regular file)",
                path.display()
            ),
            Err(e) => eprintln!("hash: skipping dangling symlink {}: {e}", path.display()),
        }
    } else {
        eprintln!("hash: skipping special file {}", path.display());
    }
    Ok(())
}

fn hash_file(path: &Path) -> io::Result<String> {
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("read {}: {e}", path.display()));
    let file = fs::File::open(path).map_err(ctx)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file).map_err(ctx)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Hashes every file under `roots` in sorted path order and returns the
/// b3sum-format listing (`<hex>  <path>\n` per file). With `relative_to`,
/// paths are shown relative to it, so the listing does not depend on where
/// the inputs happen to be mounted. `skip` (the listing file itself) is left out.
fn hash_listing(
    roots: &[PathBuf],
    relative_to: Option<&Path>,
    skip: &Path,
) -> io::Result<(String, usize)> {
    let mut files = Vec::new();
    for root in roots {
        collect_files(root, &mut files)?;
    }
    files.sort();
    files.dedup();
    files.retain(|f| f != skip);
    let mut listing = String::new();
    for f in &files {
        let hex = hash_file(f)?;
        let shown = relative_to
            .and_then(|base| f.strip_prefix(base).ok())
            .unwrap_or(f);
        let line = format!("{hex}  {}", shown.display());
        say(&line);
        listing.push_str(&line);
        listing.push('\n');
    }
    Ok((listing, files.len()))
}

fn cmd_hash(args: &[String]) -> CmdResult {
    if args.is_empty() {
        return Err(Failure::Usage("`hash` needs at least one path".into()));
    }
    let out = output_dir().join("hashes.txt");
    let roots: Vec<PathBuf> = args.iter().map(PathBuf::from).collect();
    let (listing, count) = hash_listing(&roots, None, &out)?;
    write_text(&out, &listing)?;
    say(&format!(
        "hash: {count} files, listing written to {}",
        out.display()
    ));
    Ok(())
}

/// Runs the matmul job and writes `matmul.txt`; returns the checksum.
fn do_matmul(n: usize, seed: u64) -> io::Result<String> {
    say(&format!("matmul: n={n} seed={seed}: computing C = A*B"));
    let hex = matmul::run(n, seed);
    let text = format!("n={n}\nseed={seed}\nblake3={hex}\n");
    let path = output_dir().join("matmul.txt");
    write_text(&path, &text)?;
    for line in text.lines() {
        say(&format!("matmul: {line}"));
    }
    say(&format!("matmul: written to {}", path.display()));
    Ok(hex)
}

fn cmd_matmul(args: &[String]) -> CmdResult {
    arity("matmul", args, 2, 2)?;
    let n: usize = parse("matrix size", &args[0])?;
    if n == 0 || n > matmul::MAX_N {
        return Err(Failure::Usage(format!(
            "matrix size must be 1..={}",
            matmul::MAX_N
        )));
    }
    let seed: u64 = parse("seed", &args[1])?;
    do_matmul(n, seed)?;
    Ok(())
}

fn cmd_connect(args: &[String]) -> CmdResult {
    arity("connect", args, 1, 2)?;
    let target = &args[0];
    let timeout_ms: u64 = match args.get(1) {
        Some(s) => parse("timeout_ms", s)?,
        None => CONNECT_DEFAULT_TIMEOUT_MS,
    };
    if timeout_ms == 0 {
        return Err(Failure::Usage("timeout_ms must be > 0".into()));
    }
    say(&format!(
        "connect: trying {target} (timeout {timeout_ms} ms)"
    ));
    match try_connect(target, Duration::from_millis(timeout_ms)) {
        Ok(peer) => {
            say(&format!("connect: connected to {peer}"));
            say("connect ok");
            Ok(())
        }
        Err(e) => {
            eprintln!("connect failed: {e}");
            Err(Failure::Exit(EXIT_CONNECT_FAILED))
        }
    }
}

fn try_connect(target: &str, timeout: Duration) -> io::Result<SocketAddr> {
    // Numeric addresses are parsed directly: no resolver (and, in a static
    // binary inside a scratch image, no NSS) is involved.
    let addrs: Vec<SocketAddr> = match target.parse::<SocketAddr>() {
        Ok(a) => vec![a],
        Err(_) => target.to_socket_addrs()?.collect(),
    };
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{target} resolved to no address"),
    );
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(_) => return Ok(a),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn cmd_noisy(args: &[String]) -> CmdResult {
    arity("noisy", args, 3, 3)?;
    let rel = safe_relpath(&args[0])?;
    let n: usize = parse("value count", &args[1])?;
    let amplitude: f64 = parse("amplitude", &args[2])?;
    if n == 0 || n > 1 << 24 || !(amplitude.is_finite() && amplitude >= 0.0) {
        return Err(Failure::Usage(
            "noisy needs 1..=16777216 values and a finite amplitude >= 0".into(),
        ));
    }
    // Seeded from the clock and the process: a different draw every run.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = Xoshiro256StarStar::seed_from_u64(nanos ^ (u64::from(std::process::id()) << 32));
    let values: Vec<f64> = (0..n)
        .map(|i| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            (i as f64 + 1.0) * (1.0 + amplitude * u)
        })
        .collect();
    let path = output_dir().join(rel);
    if let Some(parent) = path.parent() {
        ensure_dir(parent)?;
    }
    fs::write(&path, npy_f64(&values))?;
    say(&format!("noisy: wrote {n} values to {}", path.display()));
    Ok(())
}

/// A NumPy v1.0 `.npy` file of little-endian float64 values, one dimension.
fn npy_f64(values: &[f64]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '<f8', 'fortran_order': False, 'shape': ({},), }}",
        values.len()
    );
    // Magic (6) + version (2) + length (2) + header + '\n', padded to 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + values.len() * 8);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn cmd_demo(args: &[String]) -> CmdResult {
    arity("demo", args, 0, 1)?;
    let seed: u64 = match args.first() {
        Some(s) => parse("seed", s)?,
        None => DEMO_DEFAULT_SEED,
    };
    let out = output_dir();
    let indir = input_dir();
    say(&format!(
        "demo: seed={seed} input={} output={}",
        indir.display(),
        out.display()
    ));

    let (inputs, inputs_digest) = if indir.is_dir() {
        say(&format!(
            "demo: step 1/3: hashing inputs under {}",
            indir.display()
        ));
        let hashes = out.join("hashes.txt");
        let (listing, count) = hash_listing(std::slice::from_ref(&indir), Some(&indir), &hashes)?;
        write_text(&hashes, &listing)?;
        (count, blake3::hash(listing.as_bytes()).to_hex().to_string())
    } else {
        say(&format!(
            "demo: step 1/3: no input directory {}, skipping",
            indir.display()
        ));
        (0, "none".to_string())
    };
    say(&format!(
        "demo: {inputs} input files, inputs digest {inputs_digest}"
    ));

    say(&format!("demo: step 2/3: matmul {DEMO_MATMUL_N} {seed}"));
    let mm = do_matmul(DEMO_MATMUL_N, seed)?;

    say("demo: step 3/3: writing result.txt");
    let body = format!(
        "kiln-workload demo v1\nseed={seed}\ninputs={inputs}\ninputs_blake3={inputs_digest}\n\
         matmul_n={DEMO_MATMUL_N}\nmatmul_blake3={mm}\n"
    );
    let result = blake3::hash(body.as_bytes()).to_hex().to_string();
    let text = format!("{body}result_blake3={result}\n");
    let path = out.join("result.txt");
    write_text(&path, &text)?;
    for line in text.lines() {
        say(&format!("demo: {line}"));
    }
    say(&format!(
        "demo: done, result {result} written to {}",
        path.display()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn relpath_rules() {
        assert!(safe_relpath("a/b.txt").is_ok());
        assert!(safe_relpath("./x").is_ok());
        assert!(safe_relpath("/etc/passwd").is_err());
        assert!(safe_relpath("../x").is_err());
        assert!(safe_relpath("a/../../x").is_err());
        assert!(safe_relpath("").is_err());
        assert!(safe_relpath(".").is_err());
    }

    #[test]
    fn usage_errors() {
        assert!(matches!(run(&[]), Err(Failure::Usage(_))));
        assert!(matches!(run(&strings(&["nope"])), Err(Failure::Usage(_))));
        assert!(matches!(
            run(&strings(&["matmul", "0", "1"])),
            Err(Failure::Usage(_))
        ));
        assert!(matches!(
            run(&strings(&["exit", "300"])),
            Err(Failure::Usage(_))
        ));
        assert!(matches!(
            run(&strings(&["exit", "7", "bye"])),
            Err(Failure::Exit(7))
        ));
        assert!(matches!(
            run(&strings(&["sleep", "-1"])),
            Err(Failure::Usage(_))
        ));
    }

    #[test]
    fn random_file_is_deterministic() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("kiln-workload-test-{}", std::process::id()));
        let a = write_random_file(&dir.join("a/x"), 1000, 1)?;
        let b = write_random_file(&dir.join("b/x"), 1000, 1)?;
        let c = write_random_file(&dir.join("c/x"), 1000, 2)?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(fs::read(dir.join("a/x"))?.len(), 1000);
        assert_eq!(hash_file(&dir.join("a/x"))?, a);
        let big = write_random_file(&dir.join("big"), 200_003, 5)?;
        let mut expect = vec![0u8; 200_003];
        Xoshiro256StarStar::seed_from_u64(5).fill_bytes(&mut expect);
        assert_eq!(big, blake3::hash(&expect).to_hex().to_string());
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn connect_refused_is_an_error() {
        // Port 1 on loopback is essentially never listening.
        assert!(try_connect("127.0.0.1:1", Duration::from_millis(500)).is_err());
    }
}
