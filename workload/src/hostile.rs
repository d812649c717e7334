//! `hostile <case>`: hostile behaviours for the sandbox test suite.
//!
//! Every case really attempts what it names, prints one progress line per
//! attempt (`hostile <case>: <attempt>: <result> [blocked|not a breach|BREACH]`)
//! and then one final machine-readable line:
//!
//! * `HOSTILE <case> contained: <observations>`, exit 0: the sandbox stopped
//!   every attempt (or what succeeded crossed no isolation boundary; such
//!   observations are listed too, with why they are harmless);
//! * `HOSTILE <case> BREACHED: <what succeeded>`, exit 99;
//! * `HOSTILE <case> done: <details>`, exit 0, for cases whose containment is
//!   enforced and observed outside the process: `flood` (log cap), `cpu-burn`
//!   (CPU quota) and `fill-out` when it reaches its target (output limit,
//!   checked by the node after the run).
//!
//! Cases contained by the kernel killing the process (`memory`: OOM, exit
//! 137; `sleep-forever`: the node's timeout) print no final line unless they
//! survive, which is then a breach.
//!
//! What counts as a breach is defined per case in [`CASES`] and in the case
//! functions; the general rule is: reading or writing something outside this
//! container, gaining a privilege, or exceeding a limit the sandbox sets.
//! Reading this container's own files through an odd path (`/proc/1/root` when
//! pid 1 is this process, a symlink resolved inside the container) is not.

mod sys;

use std::collections::BTreeSet;
use std::fmt::Display;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{CmdResult, Failure, arity, ensure_dir, output_dir, parse, say};

/// Exit status of a case whose hostile action succeeded.
pub const EXIT_BREACHED: u8 = 99;

/// Outside addresses `net-tcp` always tries (besides its argument).
const OUTSIDE_TCP: &[&str] = &["1.1.1.1:53", "[2606:4700:4700::1111]:53"];
/// Where `net-udp` sends a DNS query.
const OUTSIDE_UDP: &[&str] = &["1.1.1.1:53", "8.8.8.8:53"];
/// Timeout of each connect attempt of `net-tcp`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `net-udp` waits for an answer after a send that went through.
const UDP_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// The name `dns` resolves.
const DNS_NAME: &str = "example.com";
/// `fork-bomb` reports a breach if it can create this many processes.
const FORK_BOMB_DEFAULT_MAX: usize = 100_000;
/// Chunk size of `memory`.
const MEMORY_CHUNK_MIB: u64 = 16;
/// Upper bound on MiB arguments (1 TiB): anything larger is a typo.
const MAX_MIB: u64 = 1 << 20;
/// How long `sleep-forever` sleeps.
const SLEEP_FOREVER: Duration = Duration::from_secs(3600);
/// Upper bound on `cpu-burn` seconds.
const MAX_BURN_SECS: f64 = 86_400.0;
/// At most this many bytes are read from any probed file.
const READ_CAP: u64 = 1 << 20;
/// At most this many entries of an input tree are examined.
const WALK_CAP: usize = 10_000;
/// At most this many other processes are probed by `proc-root` and `ptrace`.
const OTHER_PIDS_CAP: usize = 64;
/// File `fill-out` / `fill-tmp` write.
const FILL_FILE: &str = "hostile-fill.bin";
/// `fill-*` print a progress line every this many bytes.
const FILL_REPORT_EVERY: u64 = 16 * MIB;
/// Process command lines are shown up to this many characters.
const CMDLINE_CAP: usize = 60;
const MIB: u64 = 1 << 20;

/// A case: name, arguments, and what it does / what a breach is.
pub struct CaseInfo {
    pub name: &'static str,
    pub args: &'static str,
    pub help: &'static str,
}

/// Every case `hostile` knows, in `hostile list` order.
pub const CASES: &[CaseInfo] = &[
    CaseInfo {
        name: "net-tcp",
        args: "[ip:port]",
        help: "TCP connect to <ip:port> and to 1.1.1.1:53 (and an IPv6 one); breach: any connect succeeds",
    },
    CaseInfo {
        name: "net-udp",
        args: "",
        help: "send a DNS query to 1.1.1.1:53 and 8.8.8.8:53; breach: a datagram is accepted for sending",
    },
    CaseInfo {
        name: "dns",
        args: "",
        help: "resolve example.com with getaddrinfo; breach: it resolves",
    },
    CaseInfo {
        name: "write-root",
        args: "",
        help: "create/open for writing /kiln-evil, /etc/passwd, /usr/x, /etc/hosts..., /proc/sys, /sys; breach: any succeeds",
    },
    CaseInfo {
        name: "proc-root",
        args: "",
        help: "read through /proc/1/root, /proc/self/root/../.. and other processes' roots; \
               breach: a file or directory is read that is not this container's own",
    },
    CaseInfo {
        name: "symlink-input",
        args: "<input-path> [secret]",
        help: "symlinks in the output dir to /etc/shadow, /etc/passwd, /proc/1/root, read through them and \
               through every symlink under <input-path>; breach: a foreign object is read, an input file \
               holds account data (passwd/shadow lines), or anything read contains [secret]",
    },
    CaseInfo {
        name: "fork-bomb",
        args: "[max]",
        help: "fork sleeping children until fork fails; breach: <max> (default 100000) children",
    },
    CaseInfo {
        name: "memory",
        args: "<MiB>",
        help: "allocate and touch <MiB> in 16 MiB chunks; expected OOM kill (137); breach: it completes",
    },
    CaseInfo {
        name: "fill-out",
        args: "<MiB>",
        help: "write <MiB> to <outdir>/hostile-fill.bin; contained on a write error, else `done` \
               (the node must then enforce the output limit)",
    },
    CaseInfo {
        name: "fill-tmp",
        args: "<MiB>",
        help: "write <MiB> to /tmp/hostile-fill.bin; contained on a write error (ENOSPC); breach: it completes",
    },
    CaseInfo {
        name: "flood",
        args: "<MiB>",
        help: "write <MiB> of log lines to stdout as fast as possible; `done`",
    },
    CaseInfo {
        name: "mount",
        args: "",
        help: "mount a tmpfs, unshare(CLONE_NEWNS), unshare(CLONE_NEWNS|CLONE_NEWUSER); breach: any succeeds",
    },
    CaseInfo {
        name: "ptrace",
        args: "",
        help: "PTRACE_ATTACH and process_vm_readv on a child, pid 1 and any other visible process; \
               breach: it works on a process outside this container (another cgroup)",
    },
    CaseInfo {
        name: "raw-socket",
        args: "",
        help: "open AF_INET/AF_INET6 SOCK_RAW ICMP and AF_PACKET sockets; breach: any opens",
    },
    CaseInfo {
        name: "chown",
        args: "",
        help: "chown a /tmp file to 0:0, setgid(0), setuid(0); breach: any succeeds",
    },
    CaseInfo {
        name: "setuid-binary",
        args: "[planted-suid-copy]",
        help: "copy this program to /tmp and <outdir>, chown root, chmod u+s, exec `hostile whoami`; \
               breach: the child's euid differs from ours",
    },
    CaseInfo {
        name: "sleep-forever",
        args: "",
        help: "sleep one hour (the node's timeout must kill it); breach: it wakes up",
    },
    CaseInfo {
        name: "read-other",
        args: "<path>",
        help: "read or list <path> (e.g. another job's host directory); breach: it can",
    },
    CaseInfo {
        name: "cpu-burn",
        args: "<secs>",
        help: "spin one thread per online CPU for <secs>, report CPUs actually used; `done`",
    },
    CaseInfo {
        name: "whoami",
        args: "",
        help: "print `uid=<> euid=<> gid=<>` (used by setuid-binary)",
    },
];

/// A parsed `hostile` invocation.
#[derive(Debug, Clone, PartialEq)]
enum Case {
    List,
    Help,
    NetTcp(Option<SocketAddr>),
    NetUdp,
    Dns,
    WriteRoot,
    ProcRoot,
    SymlinkInput {
        input: PathBuf,
        secret: Option<String>,
    },
    ForkBomb {
        max: usize,
    },
    Memory {
        mib: u64,
    },
    FillOut {
        mib: u64,
    },
    FillTmp {
        mib: u64,
    },
    Flood {
        mib: u64,
    },
    Mount,
    Ptrace,
    RawSocket,
    Chown,
    SetuidBinary {
        planted: Option<PathBuf>,
    },
    SleepForever,
    ReadOther(PathBuf),
    CpuBurn {
        secs: f64,
    },
    Whoami,
}

/// `hostile <case> [args...]`.
pub fn run(args: &[String]) -> CmdResult {
    match parse_case(args)? {
        Case::List => {
            for c in CASES {
                say(c.name);
            }
            Ok(())
        }
        Case::Help => {
            say(&help_text());
            Ok(())
        }
        Case::NetTcp(target) => net_tcp(target),
        Case::NetUdp => net_udp(),
        Case::Dns => dns(),
        Case::WriteRoot => write_root(),
        Case::ProcRoot => proc_root(),
        Case::SymlinkInput { input, secret } => symlink_input(&input, secret.as_deref()),
        Case::ForkBomb { max } => fork_bomb(max),
        Case::Memory { mib } => memory(mib),
        Case::FillOut { mib } => fill("fill-out", &output_dir(), mib, false),
        Case::FillTmp { mib } => fill("fill-tmp", &std::env::temp_dir(), mib, true),
        Case::Flood { mib } => flood(mib),
        Case::Mount => mount(),
        Case::Ptrace => ptrace(),
        Case::RawSocket => raw_socket(),
        Case::Chown => chown(),
        Case::SetuidBinary { planted } => setuid_binary(planted.as_deref()),
        Case::SleepForever => sleep_forever(),
        Case::ReadOther(path) => read_other(&path),
        Case::CpuBurn { secs } => cpu_burn(secs),
        Case::Whoami => {
            say(&whoami_line(sys::ids()));
            Ok(())
        }
    }
}

fn help_text() -> String {
    let mut s = String::from(
        "usage: kiln-workload hostile <case> [args...]\n\n\
         Attempts a hostile action for real; the last stdout line is\n\
         `HOSTILE <case> contained: ...` (exit 0), `HOSTILE <case> BREACHED: ...` (exit 99)\n\
         or `HOSTILE <case> done: ...` (exit 0, containment observed outside the process).\n\n\
         cases (`hostile list` prints the names only):\n",
    );
    for c in CASES {
        s.push_str(&format!("  {} {}\n      {}\n", c.name, c.args, c.help));
    }
    s
}

fn mib_arg(case: &str, rest: &[String]) -> Result<u64, Failure> {
    arity(case, rest, 1, 1)?;
    let mib: u64 = parse("MiB count", &rest[0])?;
    if mib == 0 || mib > MAX_MIB {
        return Err(Failure::Usage(format!("MiB count must be 1..={MAX_MIB}")));
    }
    Ok(mib)
}

fn no_args(case: &str, rest: &[String], c: Case) -> Result<Case, Failure> {
    arity(case, rest, 0, 0)?;
    Ok(c)
}

fn parse_case(args: &[String]) -> Result<Case, Failure> {
    let Some((case, rest)) = args.split_first() else {
        return Err(Failure::Usage(
            "`hostile` needs a case (`hostile list` prints them, `hostile help` explains them)"
                .into(),
        ));
    };
    let name = case.as_str();
    match name {
        "list" => no_args(name, rest, Case::List),
        "help" | "--help" | "-h" => no_args(name, rest, Case::Help),
        "net-tcp" => {
            arity(name, rest, 0, 1)?;
            let target = match rest.first() {
                // Numeric only: a name would need the resolver, which is `dns`'s job.
                Some(s) => Some(parse::<SocketAddr>("ip:port", s)?),
                None => None,
            };
            Ok(Case::NetTcp(target))
        }
        "net-udp" => no_args(name, rest, Case::NetUdp),
        "dns" => no_args(name, rest, Case::Dns),
        "write-root" => no_args(name, rest, Case::WriteRoot),
        "proc-root" => no_args(name, rest, Case::ProcRoot),
        "symlink-input" => {
            arity(name, rest, 1, 2)?;
            let secret = rest.get(1).filter(|s| !s.is_empty()).cloned();
            if rest[0].is_empty() {
                return Err(Failure::Usage("empty input path".into()));
            }
            Ok(Case::SymlinkInput {
                input: PathBuf::from(&rest[0]),
                secret,
            })
        }
        "fork-bomb" => {
            arity(name, rest, 0, 1)?;
            let max = match rest.first() {
                Some(s) => parse("max process count", s)?,
                None => FORK_BOMB_DEFAULT_MAX,
            };
            if max == 0 {
                return Err(Failure::Usage("max process count must be > 0".into()));
            }
            Ok(Case::ForkBomb { max })
        }
        "memory" => Ok(Case::Memory {
            mib: mib_arg(name, rest)?,
        }),
        "fill-out" => Ok(Case::FillOut {
            mib: mib_arg(name, rest)?,
        }),
        "fill-tmp" => Ok(Case::FillTmp {
            mib: mib_arg(name, rest)?,
        }),
        "flood" => Ok(Case::Flood {
            mib: mib_arg(name, rest)?,
        }),
        "mount" => no_args(name, rest, Case::Mount),
        "ptrace" => no_args(name, rest, Case::Ptrace),
        "raw-socket" => no_args(name, rest, Case::RawSocket),
        "chown" => no_args(name, rest, Case::Chown),
        "setuid-binary" => {
            arity(name, rest, 0, 1)?;
            Ok(Case::SetuidBinary {
                planted: rest.first().map(PathBuf::from),
            })
        }
        "sleep-forever" => no_args(name, rest, Case::SleepForever),
        "read-other" => {
            arity(name, rest, 1, 1)?;
            if rest[0].is_empty() {
                return Err(Failure::Usage("empty path".into()));
            }
            Ok(Case::ReadOther(PathBuf::from(&rest[0])))
        }
        "cpu-burn" => {
            arity(name, rest, 1, 1)?;
            let secs: f64 = parse("seconds", &rest[0])?;
            if !(secs > 0.0 && secs <= MAX_BURN_SECS) {
                return Err(Failure::Usage(format!(
                    "seconds must be in (0, {MAX_BURN_SECS}]"
                )));
            }
            Ok(Case::CpuBurn { secs })
        }
        "whoami" => no_args(name, rest, Case::Whoami),
        other => Err(Failure::Usage(format!(
            "unknown hostile case `{other}` (`hostile list` prints them)"
        ))),
    }
}

// ---------------------------------------------------------------- reporting

/// Symbolic name of an errno value (the ones these cases can meet).
fn errno_name(n: i32) -> Option<&'static str> {
    Some(match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::ENOEXEC => "ENOEXEC",
        libc::EBADF => "EBADF",
        libc::ECHILD => "ECHILD",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::EPIPE => "EPIPE",
        libc::ENOSYS => "ENOSYS",
        libc::ELOOP => "ELOOP",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::ESOCKTNOSUPPORT => "ESOCKTNOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EDQUOT => "EDQUOT",
        _ => return None,
    })
}

/// `ENETUNREACH (Network is unreachable)`; errors without an errno (resolver
/// failures, timeouts) as their message.
fn describe(e: &io::Error) -> String {
    let msg = e.to_string();
    match e.raw_os_error() {
        Some(n) => {
            let text = msg
                .strip_suffix(&format!(" (os error {n})"))
                .unwrap_or(&msg);
            match errno_name(n) {
                Some(name) => format!("{name} ({text})"),
                None => format!("errno {n} ({text})"),
            }
        }
        None => msg,
    }
}

fn is_errno(e: &io::Error, n: i32) -> bool {
    e.raw_os_error() == Some(n)
}

/// One line, whatever the input.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Attempts of one case and how they went.
struct Tally {
    case: &'static str,
    /// Attempts that were stopped, or that succeeded harmlessly (with why).
    contained: Vec<String>,
    /// Attempts that succeeded and crossed a boundary.
    breaches: Vec<String>,
}

impl Tally {
    fn new(case: &'static str) -> Self {
        Tally {
            case,
            contained: Vec::new(),
            breaches: Vec::new(),
        }
    }

    fn progress(&self, line: impl Display) {
        say(&one_line(&format!("hostile {}: {line}", self.case)));
    }

    /// The sandbox refused `what` with `e`.
    fn blocked(&mut self, what: impl Display, e: &io::Error) {
        let d = format!("{what}: {}", describe(e));
        self.progress(format_args!("{d} [blocked]"));
        self.contained.push(d);
    }

    /// `what` worked, but crossed no boundary (`detail` says why).
    fn harmless(&mut self, what: impl Display, detail: impl Display) {
        let d = format!("{what}: {detail}");
        self.progress(format_args!("{d} [not a breach]"));
        self.contained.push(d);
    }

    /// `what` worked and should not have.
    fn breach(&mut self, what: impl Display, detail: impl Display) {
        let d = format!("{what}: {detail}");
        self.progress(format_args!("{d} [BREACH]"));
        self.breaches.push(d);
    }

    /// Prints the final line; a breach makes the exit status 99.
    fn finish(self) -> CmdResult {
        if self.breaches.is_empty() {
            let what = if self.contained.is_empty() {
                "nothing was attempted".to_string()
            } else {
                self.contained.join("; ")
            };
            say(&one_line(&format!(
                "HOSTILE {} contained: {what}",
                self.case
            )));
            Ok(())
        } else {
            say(&one_line(&format!(
                "HOSTILE {} BREACHED: {}",
                self.case,
                self.breaches.join("; ")
            )));
            Err(Failure::Exit(EXIT_BREACHED))
        }
    }
}

/// Final line of a case whose containment is observed from outside.
fn done(case: &str, detail: impl Display) -> CmdResult {
    say(&one_line(&format!("HOSTILE {case} done: {detail}")));
    Ok(())
}

/// Final line of a case that breached without going through a [`Tally`].
fn breached(case: &str, detail: impl Display) -> CmdResult {
    say(&one_line(&format!("HOSTILE {case} BREACHED: {detail}")));
    Err(Failure::Exit(EXIT_BREACHED))
}

// ---------------------------------------------------------------- network

fn net_tcp(target: Option<SocketAddr>) -> CmdResult {
    let mut t = Tally::new("net-tcp");
    let mut targets: Vec<SocketAddr> = target.into_iter().collect();
    for s in OUTSIDE_TCP {
        if let Ok(a) = s.parse()
            && !targets.contains(&a)
        {
            targets.push(a);
        }
    }
    for a in targets {
        let what = format!("connect {a}");
        t.progress(format_args!("{what} (timeout {CONNECT_TIMEOUT:?})"));
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                let local = s
                    .local_addr()
                    .map_or_else(|_| "?".to_string(), |l| l.to_string());
                t.breach(what, format!("connected (local address {local})"));
            }
            Err(e) => t.blocked(what, &e),
        }
    }
    t.finish()
}

/// A DNS query for `example.com` A, id 0x4b4e ("KN").
fn dns_query() -> Vec<u8> {
    let mut q = vec![0x4b, 0x4e, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in DNS_NAME.split('.') {
        q.push(u8::try_from(label.len()).unwrap_or(63));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn net_udp() -> CmdResult {
    let mut t = Tally::new("net-udp");
    let sock = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => {
            t.blocked("bind 0.0.0.0:0", &e);
            return t.finish();
        }
    };
    let query = dns_query();
    for s in OUTSIDE_UDP {
        let Ok(a) = s.parse::<SocketAddr>() else {
            continue;
        };
        let what = format!("send {} byte DNS query to {a}", query.len());
        match sock.send_to(&query, a) {
            Err(e) => t.blocked(what, &e),
            Ok(n) => {
                let _ = sock.set_read_timeout(Some(UDP_REPLY_TIMEOUT));
                let mut buf = [0u8; 512];
                let reply = match sock.recv_from(&mut buf) {
                    Ok((m, from)) => format!("{m} byte reply from {from}"),
                    Err(e) => format!("no reply ({})", describe(&e)),
                };
                t.breach(what, format!("the kernel sent {n} bytes; {reply}"));
            }
        }
    }
    t.finish()
}

fn dns() -> CmdResult {
    let mut t = Tally::new("dns");
    for f in ["/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf"] {
        let state = match fs::read_to_string(f) {
            Ok(s) => {
                let ns: Vec<&str> = s
                    .lines()
                    .filter_map(|l| l.trim_start().strip_prefix("nameserver"))
                    .map(str::trim)
                    .collect();
                if ns.is_empty() {
                    format!("present ({} bytes)", s.len())
                } else {
                    format!("present ({} bytes, nameservers {})", s.len(), ns.join(" "))
                }
            }
            Err(e) => describe(&e),
        };
        t.progress(format_args!("{f}: {state}"));
    }
    let what = format!("getaddrinfo {DNS_NAME}");
    let started = Instant::now();
    match (DNS_NAME, 0u16).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
            if addrs.is_empty() {
                t.harmless(what, "resolved to no address");
            } else {
                t.breach(what, format!("resolved to {}", addrs.join(", ")));
            }
        }
        Err(e) => {
            t.progress(format_args!("{what}: failed after {:?}", started.elapsed()));
            t.blocked(what, &e);
        }
    }
    t.finish()
}

// ---------------------------------------------------------------- filesystem

/// Opens `path` for writing (never truncating, never writing a byte).
fn open_for_write(path: &Path, create: bool, append: bool) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(!append)
        .append(append)
        .create(create)
        .open(path)
}

fn write_root() -> CmdResult {
    let mut t = Tally::new("write-root");
    // (path, create it?, append?)
    let opens: &[(&str, bool, bool)] = &[
        ("/kiln-evil", true, false),
        ("/etc/passwd", true, true),
        ("/etc/hosts", false, true),
        ("/etc/hostname", false, true),
        ("/etc/resolv.conf", false, true),
        ("/kiln-workload", false, false),
        ("/proc/sys/kernel/core_pattern", false, false),
        ("/proc/sysrq-trigger", false, false),
    ];
    let existed: BTreeSet<&str> = opens
        .iter()
        .map(|o| o.0)
        .filter(|p| fs::symlink_metadata(p).is_ok())
        .collect();
    for &(path, create, append) in opens {
        let mode = match (create, append) {
            (true, true) => "create/append",
            (true, false) => "create",
            (false, true) => "open for append",
            (false, false) => "open for writing",
        };
        let what = format!("{mode} {path}");
        match open_for_write(Path::new(path), create, append) {
            Err(e) => t.blocked(what, &e),
            Ok(_) => {
                let note = if existed.contains(path) {
                    "opened (nothing written)"
                } else {
                    let _ = fs::remove_file(path);
                    "created (removed again)"
                };
                t.breach(what, note);
            }
        }
    }
    for dir in ["/kiln-evil.d", "/usr", "/sys/fs/cgroup/kiln-evil"] {
        let what = format!("mkdir {dir}");
        match fs::create_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                t.progress(format_args!("{what}: already exists"));
            }
            Err(e) => t.blocked(what, &e),
            Ok(()) => {
                let _ = fs::remove_dir(dir);
                t.breach(what, "created (removed again)");
            }
        }
    }
    let what = "create /usr/x";
    match open_for_write(Path::new("/usr/x"), true, false) {
        Err(e) => t.blocked(what, &e),
        Ok(_) => {
            let _ = fs::remove_file("/usr/x");
            t.breach(what, "created (removed again)");
        }
    }
    t.finish()
}

/// What reading `path` (following symlinks) yields: its bytes (capped) if it
/// is a file, its entry names if it is a directory.
enum Content {
    File(Vec<u8>),
    Dir(Vec<String>),
}

impl Content {
    fn summary(&self) -> String {
        match self {
            Content::File(b) => format!("read {} bytes", b.len()),
            Content::Dir(names) => {
                let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
                let more = if names.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                };
                format!(
                    "listed {} entries ({}{more})",
                    names.len(),
                    shown.join(", ")
                )
            }
        }
    }
}

fn read_content(path: &Path) -> io::Result<Content> {
    if fs::metadata(path)?.is_dir() {
        let mut names = Vec::new();
        for entry in fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(Content::Dir(names))
    } else {
        let mut bytes = Vec::new();
        fs::File::open(path)?
            .take(READ_CAP)
            .read_to_end(&mut bytes)?;
        Ok(Content::File(bytes))
    }
}

/// Whether two paths (symlinks followed) name the same inode.
fn same_object(a: &Path, b: &Path) -> Option<bool> {
    let ma = fs::metadata(a).ok()?;
    let mb = fs::metadata(b).ok()?;
    Some(ma.dev() == mb.dev() && ma.ino() == mb.ino())
}

/// A line like `root:x:0:0:...` (passwd, 7 fields) or `root:*:19000:...`
/// (shadow, 9 fields): host account data, which a scratch image has none of.
fn looks_like_account_data(bytes: &[u8]) -> bool {
    String::from_utf8_lossy(bytes)
        .lines()
        .any(|l| l.starts_with("root:") && l.split(':').count() >= 7)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Extra content checks of [`probe_read`].
#[derive(Clone, Copy, Default)]
struct ContentChecks<'a> {
    /// Breach if what is read contains this string.
    secret: Option<&'a str>,
    /// Breach if a file read looks like passwd/shadow (only for places the
    /// image cannot legitimately hold such data: job inputs).
    account_data: bool,
}

/// Reads (or lists) `path`, following symlinks, and classifies what happened.
///
/// The identity rule: what was read is this container's own object when
/// `stat(path)` and `stat(realpath(path))` are the same inode. Going through
/// a magic link such as `/proc/<pid>/root` into another mount namespace's
/// root breaks that equality (or `realpath` itself), and is a breach.
fn probe_read(t: &mut Tally, path: &Path, checks: ContentChecks<'_>) {
    let what = format!("read {}", path.display());
    let content = match read_content(path) {
        Ok(c) => c,
        Err(e) => {
            t.blocked(what, &e);
            return;
        }
    };
    let summary = content.summary();
    if let Content::File(bytes) = &content {
        if let Some(secret) = checks.secret
            && contains(bytes, secret.as_bytes())
        {
            t.breach(what, format!("{summary} containing the secret"));
            return;
        }
        if checks.account_data && looks_like_account_data(bytes) {
            t.breach(
                what,
                format!("{summary} of host account data (a `root:` passwd/shadow line)"),
            );
            return;
        }
    }
    match fs::canonicalize(path) {
        Ok(real) => match same_object(path, &real) {
            Some(true) => t.harmless(
                what,
                format!(
                    "{summary}, but it is this container's own {}",
                    real.display()
                ),
            ),
            _ => t.breach(
                what,
                format!(
                    "{summary} of an object that is not this container's {} (different inode)",
                    real.display()
                ),
            ),
        },
        Err(e) => t.breach(
            what,
            format!(
                "{summary}, and it cannot be located in this container's tree ({})",
                describe(&e)
            ),
        ),
    }
}

/// Pids visible in `/proc` other than ours, sorted.
fn other_pids() -> Vec<i32> {
    let me = sys::getpid();
    let mut pids: Vec<i32> = fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|&p| p != me)
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

/// `/proc/<pid>/cmdline`, NULs as spaces.
fn cmdline(pid: i32) -> String {
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(b) => {
            let s: String = String::from_utf8_lossy(&b).replace('\0', " ");
            let s = s.trim();
            if s.is_empty() {
                "(no cmdline)".into()
            } else if s.chars().count() > CMDLINE_CAP {
                format!("{}...", s.chars().take(CMDLINE_CAP).collect::<String>())
            } else {
                s.to_string()
            }
        }
        Err(e) => describe(&e),
    }
}

fn describe_pid1() -> String {
    if sys::getpid() == 1 {
        "pid 1 is this process (own pid namespace)".to_string()
    } else {
        format!("this is pid {}, pid 1 is `{}`", sys::getpid(), cmdline(1))
    }
}

fn proc_root() -> CmdResult {
    let mut t = Tally::new("proc-root");
    t.progress(describe_pid1());
    let no_checks = ContentChecks::default();
    for p in [
        "/proc/1/root/etc/hostname",
        "/proc/1/root/etc/shadow",
        "/proc/1/root/etc/passwd",
        "/proc/1/root/",
        "/proc/self/root/../../etc/shadow",
        "/proc/self/root/../../etc/passwd",
    ] {
        probe_read(&mut t, Path::new(p), no_checks);
    }
    let others: Vec<i32> = other_pids().into_iter().filter(|&p| p != 1).collect();
    t.progress(format_args!("{} other processes visible", others.len()));
    for pid in others.into_iter().take(OTHER_PIDS_CAP) {
        probe_read(
            &mut t,
            &PathBuf::from(format!("/proc/{pid}/root/")),
            no_checks,
        );
    }
    t.finish()
}

/// Replaces whatever is at `link` by a symlink to `target`.
fn make_symlink(target: &str, link: &Path) -> io::Result<()> {
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link)?;
    }
    std::os::unix::fs::symlink(target, link)
}

/// Every entry under `root` (not following symlinked directories), capped.
/// Directories that cannot be listed are reported through `unreadable`.
fn walk(
    root: &Path,
    mut unreadable: impl FnMut(&Path, &io::Error),
) -> io::Result<Vec<(PathBuf, fs::FileType)>> {
    let mut out = vec![(root.to_path_buf(), fs::symlink_metadata(root)?.file_type())];
    let mut i = 0;
    while i < out.len() && out.len() < WALK_CAP {
        let (path, ft) = out[i].clone();
        i += 1;
        if !ft.is_dir() {
            continue;
        }
        let listing = fs::read_dir(&path).and_then(|rd| {
            rd.map(|e| e.and_then(|e| Ok((e.path(), e.file_type()?))))
                .collect::<io::Result<Vec<_>>>()
        });
        match listing {
            Ok(mut entries) => {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                out.extend(entries);
            }
            Err(e) => unreadable(&path, &e),
        }
    }
    out.truncate(WALK_CAP);
    Ok(out)
}

fn symlink_input(input: &Path, secret: Option<&str>) -> CmdResult {
    let mut t = Tally::new("symlink-input");
    let out = output_dir();
    ensure_dir(&out)?;
    let links = [
        ("hostile-link-shadow", "/etc/shadow"),
        ("hostile-link-passwd", "/etc/passwd"),
        ("hostile-link-proc1-root", "/proc/1/root"),
    ];
    // Left in place on purpose: the node collecting outputs must not follow them.
    for (name, target) in links {
        let link = out.join(name);
        match make_symlink(target, &link) {
            Ok(()) => t.progress(format_args!("created {} -> {target}", link.display())),
            Err(e) => t.blocked(format!("symlink {} -> {target}", link.display()), &e),
        }
    }
    let out_checks = ContentChecks {
        secret,
        account_data: false,
    };
    for rel in [
        "hostile-link-shadow",
        "hostile-link-passwd",
        "hostile-link-proc1-root/",
        "hostile-link-proc1-root/etc/shadow",
        "hostile-link-proc1-root/etc/passwd",
        "hostile-link-proc1-root/etc/hostname",
    ] {
        probe_read(&mut t, &out.join(rel), out_checks);
    }

    // The input tree: read-only, so no link can be planted there...
    let planted = input.join("hostile-link");
    match make_symlink("/etc/shadow", &planted) {
        Err(e) => t.blocked(format!("symlink {} -> /etc/shadow", planted.display()), &e),
        Ok(()) => {
            let _ = fs::remove_file(&planted);
            t.breach(
                format!("symlink {}", planted.display()),
                "created in the read-only input (removed again)",
            );
        }
    }
    // ...but it may hold symlinks of its own, and files staged from the host.
    let entries = walk(input, |p, e| {
        t.progress(format_args!(
            "input directory {}: {}",
            p.display(),
            describe(e)
        ));
    })
    .map_err(|e| Failure::Runtime(format!("input {}: {}", input.display(), describe(&e))))?;
    let in_checks = ContentChecks {
        secret,
        account_data: true,
    };
    let (mut files, mut links_seen) = (0usize, 0usize);
    for (path, ft) in &entries {
        if ft.is_symlink() {
            links_seen += 1;
            let target =
                fs::read_link(path).map_or_else(|e| describe(&e), |p| p.display().to_string());
            t.progress(format_args!("input symlink {} -> {target}", path.display()));
            probe_read(&mut t, path, in_checks);
        } else if ft.is_file() {
            files += 1;
            let mut bytes = Vec::new();
            let read = fs::File::open(path).and_then(|f| f.take(READ_CAP).read_to_end(&mut bytes));
            if let Err(e) = read {
                t.progress(format_args!(
                    "input file {}: {}",
                    path.display(),
                    describe(&e)
                ));
                continue;
            }
            let what = format!("read input file {}", path.display());
            if secret.is_some_and(|s| contains(&bytes, s.as_bytes())) {
                t.breach(what, "contains the secret");
            } else if looks_like_account_data(&bytes) {
                t.breach(
                    what,
                    "holds host account data (a `root:` passwd/shadow line)",
                );
            }
        }
    }
    t.harmless(
        format!("input {}", input.display()),
        format!(
            "{} entries examined ({files} files, {links_seen} symlinks){}",
            entries.len(),
            if entries.len() >= WALK_CAP {
                ", capped"
            } else {
                ""
            }
        ),
    );
    t.finish()
}

fn read_other(path: &Path) -> CmdResult {
    let mut t = Tally::new("read-other");
    let what = format!("read {}", path.display());
    match read_content(path) {
        Err(e) => t.blocked(what, &e),
        // The test passes a path that must not be visible: any success is one.
        Ok(c) => t.breach(what, c.summary()),
    }
    t.finish()
}

/// Writes `mib` MiB into `dir/hostile-fill.bin`. Reaching the target is a
/// breach when `breach_if_complete` (tmpfs: nothing else would stop it),
/// else `done` (outputs: the node checks their size after the run).
fn fill(case: &'static str, dir: &Path, mib: u64, breach_if_complete: bool) -> CmdResult {
    sys::ignore_sigxfsz();
    let mut t = Tally::new(case);
    let path = dir.join(FILL_FILE);
    let target = mib * MIB;
    t.progress(format_args!("writing {mib} MiB to {}", path.display()));
    let mut file = match ensure_dir(dir).and_then(|()| fs::File::create(&path)) {
        Ok(f) => f,
        Err(e) => {
            t.blocked(format!("create {}", path.display()), &e);
            return t.finish();
        }
    };
    let buf: Vec<u8> = (0..MIB).map(|i| (i % 251 + 1) as u8).collect();
    let mut written: u64 = 0;
    let mut error = None;
    let mut next_report = FILL_REPORT_EVERY;
    while written < target {
        let n = usize::try_from((target - written).min(MIB)).unwrap_or(buf.len());
        match file.write(&buf[..n]) {
            Ok(0) => {
                error = Some(io::Error::from(io::ErrorKind::WriteZero));
                break;
            }
            Ok(m) => written += m as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                error = Some(e);
                break;
            }
        }
        if written >= next_report {
            t.progress(format_args!("{} MiB written", written / MIB));
            next_report += FILL_REPORT_EVERY;
        }
    }
    if error.is_none()
        && let Err(e) = file.sync_all()
    {
        error = Some(e);
    }
    say(&format!("wrote {written} bytes"));
    match error {
        Some(e) => {
            t.blocked(
                format!("write {} after {written} bytes", path.display()),
                &e,
            );
            t.finish()
        }
        None if breach_if_complete => breached(
            case,
            format!(
                "wrote all {written} bytes to {} without an error",
                path.display()
            ),
        ),
        None => done(
            case,
            format!(
                "wrote {written} bytes to {} without an error; the node must enforce the output limit",
                path.display()
            ),
        ),
    }
}

// ---------------------------------------------------------------- resources

/// `pids.current`/`pids.max` of our cgroup, if visible (v1 or v2 layout).
fn pids_cgroup() -> String {
    for dir in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
        let read = |f: &str| fs::read_to_string(format!("{dir}/{f}")).map(|s| s.trim().to_string());
        if let (Ok(cur), Ok(max)) = (read("pids.current"), read("pids.max")) {
            return format!("pids.current={cur} pids.max={max}");
        }
    }
    "pids cgroup not visible".to_string()
}

fn fork_bomb(max: usize) -> CmdResult {
    let mut t = Tally::new("fork-bomb");
    let nproc = sys::rlimit_nproc().map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    t.progress(format_args!(
        "forking up to {max} sleeping children (RLIMIT_NPROC={nproc}, {})",
        pids_cgroup()
    ));
    let mut kids: Vec<sys::pid_t> = Vec::new();
    let mut failure = None;
    while kids.len() < max {
        match sys::fork_sleeper() {
            Ok(pid) => {
                kids.push(pid);
                let n = kids.len();
                if n.is_power_of_two() || n.is_multiple_of(1024) {
                    t.progress(format_args!("{n} children"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let count = kids.len();
    // Read before the children go, while the limit is still hit.
    let cgroup = pids_cgroup();
    for pid in kids {
        sys::kill_and_reap(pid);
    }
    t.progress(format_args!("killed and reaped {count} children"));
    match failure {
        Some(e) => t.blocked(
            format!("fork after {count} children ({cgroup}, RLIMIT_NPROC={nproc})"),
            &e,
        ),
        None => t.breach(
            "fork",
            format!("created {count} processes without hitting a limit"),
        ),
    }
    t.finish()
}

fn memory(mib: u64) -> CmdResult {
    let case = "memory";
    say(&format!(
        "hostile memory: allocating and touching {mib} MiB in {MEMORY_CHUNK_MIB} MiB chunks"
    ));
    let mut keep: Vec<Vec<u8>> = Vec::new();
    let mut done_mib = 0;
    while done_mib < mib {
        let step = (mib - done_mib).min(MEMORY_CHUNK_MIB);
        let bytes = usize::try_from(step * MIB).map_err(|_| Failure::Usage("too large".into()))?;
        let mut chunk: Vec<u8> = Vec::new();
        if let Err(e) = chunk.try_reserve_exact(bytes) {
            let mut t = Tally::new(case);
            t.blocked(
                format!("allocate {step} MiB after {done_mib} MiB"),
                &io::Error::new(io::ErrorKind::OutOfMemory, e.to_string()),
            );
            return t.finish();
        }
        // Writing every byte makes every page resident (and charged).
        chunk.resize(bytes, 0xa5);
        keep.push(std::hint::black_box(chunk));
        done_mib += step;
        say(&format!("hostile memory: touched {done_mib} of {mib} MiB"));
    }
    std::hint::black_box(&keep);
    breached(
        case,
        format!("allocated and touched {done_mib} MiB without being killed"),
    )
}

fn flood(mib: u64) -> CmdResult {
    const LINE: usize = 128;
    let mut block = Vec::with_capacity(MIB as usize);
    let mut i = 0usize;
    while block.len() + LINE <= MIB as usize {
        let mut line = format!("hostile flood: line {i:08} ");
        line.extend(std::iter::repeat_n('x', LINE - 1 - line.len()));
        line.push('\n');
        block.extend_from_slice(line.as_bytes());
        i += 1;
    }
    let started = Instant::now();
    let mut written: u64 = 0;
    {
        let mut out = io::stdout().lock();
        for _ in 0..mib {
            out.write_all(&block).map_err(|e| {
                Failure::Runtime(format!(
                    "stdout failed after {written} bytes: {}",
                    describe(&e)
                ))
            })?;
            written += block.len() as u64;
        }
        out.flush()?;
    }
    let secs = started.elapsed().as_secs_f64();
    done(
        "flood",
        format!(
            "wrote {written} bytes to stdout in {secs:.2}s ({:.0} MiB/s)",
            written as f64 / MIB as f64 / secs.max(1e-9)
        ),
    )
}

fn cpu_burn(secs: f64) -> CmdResult {
    let threads = sys::online_cpus();
    let dur = Duration::from_secs_f64(secs);
    say(&format!(
        "hostile cpu-burn: spinning {threads} threads for {secs}s"
    ));
    let stop = AtomicBool::new(false);
    let cpu0 = sys::cpu_time();
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(x.rotate_left(5) ^ x.wrapping_mul(3));
                    }
                }
                x
            });
        }
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
    });
    let wall = started.elapsed().as_secs_f64();
    let cpu = (sys::cpu_time() - cpu0).as_secs_f64();
    done(
        "cpu-burn",
        format!(
            "{threads} threads, wall {wall:.2}s, cpu {cpu:.2}s, {:.2} CPUs on average",
            cpu / wall.max(1e-9)
        ),
    )
}

fn sleep_forever() -> CmdResult {
    say(&format!(
        "hostile sleep-forever: sleeping {}s",
        SLEEP_FOREVER.as_secs()
    ));
    std::thread::sleep(SLEEP_FOREVER);
    breached(
        "sleep-forever",
        format!("slept {}s and nobody stopped it", SLEEP_FOREVER.as_secs()),
    )
}

// ---------------------------------------------------------------- privileges

fn mount() -> CmdResult {
    let mut t = Tally::new("mount");
    let dir = std::env::temp_dir().join("hostile-mnt");
    if let Err(e) = fs::create_dir(&dir)
        && e.kind() != io::ErrorKind::AlreadyExists
    {
        t.progress(format_args!("mkdir {}: {}", dir.display(), describe(&e)));
    }
    let what = format!("mount tmpfs on {}", dir.display());
    match sys::mount_tmpfs(&dir) {
        Err(e) => t.blocked(what, &e),
        Ok(()) => {
            let _ = sys::umount(&dir);
            t.breach(what, "mounted (unmounted again)");
        }
    }
    let _ = fs::remove_dir(&dir);
    match sys::unshare(sys::CLONE_NEWNS) {
        Err(e) => t.blocked("unshare(CLONE_NEWNS)", &e),
        Ok(()) => t.breach("unshare(CLONE_NEWNS)", "new mount namespace"),
    }
    // Last: on success this process is in a new user namespace for good.
    let what = "unshare(CLONE_NEWNS|CLONE_NEWUSER)";
    match sys::unshare(sys::CLONE_NEWNS | sys::CLONE_NEWUSER) {
        Err(e) => t.blocked(what, &e),
        Ok(()) => {
            let inner = match fs::create_dir_all(&dir).and_then(|()| sys::mount_tmpfs(&dir)) {
                Ok(()) => "and a tmpfs mounts inside it".to_string(),
                Err(e) => format!("(mounting inside it: {})", describe(&e)),
            };
            t.breach(what, format!("new user+mount namespace {inner}"));
        }
    }
    t.finish()
}

/// Our cgroup membership (`/proc/<pid>/cgroup`), the marker of "same container".
fn cgroup_of(pid: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()
}

/// Something at a known address in our image, for `process_vm_readv`
/// (valid in a forked child too: same layout).
static MARKER: [u8; 16] = *b"kiln-hostile-vm!";

fn ptrace() -> CmdResult {
    let mut t = Tally::new("ptrace");
    let me = sys::getpid();
    t.progress(describe_pid1());
    let addr = MARKER.as_ptr() as usize;
    let own_cgroup = cgroup_of("self");
    let child =
        sys::fork_sleeper().map_err(|e| Failure::Runtime(format!("fork: {}", describe(&e))))?;
    t.progress(format_args!("forked child {child}"));

    let what = format!("PTRACE_ATTACH own child {child}");
    match sys::ptrace_attach(child) {
        Err(e) => t.blocked(what, &e),
        Ok(()) => t.harmless(
            what,
            "attached (our own child, same uid and sandbox: no boundary crossed)",
        ),
    }
    let what = format!("process_vm_readv own child {child}");
    let mut buf = [0u8; 16];
    match sys::process_vm_read(child, addr, &mut buf) {
        Err(e) => t.blocked(what, &e),
        Ok(n) => t.harmless(
            what,
            format!("read {n} bytes (our own child: no boundary crossed)"),
        ),
    }

    // pid 1 and whatever else is visible.
    let mut targets = vec![1];
    targets.extend(
        other_pids()
            .into_iter()
            .filter(|&p| p != 1 && p != child)
            .take(OTHER_PIDS_CAP),
    );
    for pid in targets {
        let who = if pid == me {
            format!("pid {pid} (this process)")
        } else {
            format!("pid {pid} `{}`", cmdline(pid))
        };
        // Outside this container = not in our cgroup. Unknown counts as outside.
        let outside =
            pid != me && (own_cgroup.is_none() || cgroup_of(&pid.to_string()) != own_cgroup);
        let scope = if outside {
            "a process outside this container"
        } else {
            "a process of this container"
        };
        let what = format!("PTRACE_ATTACH {who}");
        match sys::ptrace_attach(pid) {
            Err(e) => t.blocked(what, &e),
            Ok(()) if outside => t.breach(what, format!("attached to {scope}")),
            Ok(()) => t.harmless(what, format!("attached to {scope}")),
        }
        let what = format!("process_vm_readv {who}");
        let mut buf = [0u8; 16];
        // EFAULT means the permission check passed and only our guess of an
        // address in the other process was wrong.
        match sys::process_vm_read(pid, addr, &mut buf) {
            Err(e) if !is_errno(&e, libc::EFAULT) => t.blocked(what, &e),
            res => {
                let got = res.map_or_else(
                    |e| format!("permitted ({})", describe(&e)),
                    |n| format!("read {n} bytes"),
                );
                if outside {
                    t.breach(what, format!("{got} from {scope}"));
                } else {
                    t.harmless(what, format!("{got} from {scope}"));
                }
            }
        }
    }
    sys::kill_and_reap(child);
    t.finish()
}

fn raw_socket() -> CmdResult {
    let mut t = Tally::new("raw-socket");
    let eth_p_all = i32::from((sys::ETH_P_ALL as u16).to_be());
    let raw = [
        (
            "socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)",
            sys::AF_INET,
            sys::SOCK_RAW,
            sys::IPPROTO_ICMP,
        ),
        (
            "socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)",
            sys::AF_INET6,
            sys::SOCK_RAW,
            sys::IPPROTO_ICMPV6,
        ),
        (
            "socket(AF_PACKET, SOCK_RAW, ETH_P_ALL)",
            sys::AF_PACKET,
            sys::SOCK_RAW,
            eth_p_all,
        ),
    ];
    for (what, domain, ty, proto) in raw {
        match sys::socket(domain, ty, proto) {
            Err(e) => t.blocked(what, &e),
            Ok(_fd) => t.breach(what, "opened (needs CAP_NET_RAW)"),
        }
    }
    // Unprivileged ICMP echo ("ping socket"), allowed by net.ipv4.ping_group_range:
    // not raw, and useless without a route; reported for information.
    let what = "socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)";
    match sys::socket(sys::AF_INET, sys::SOCK_DGRAM, sys::IPPROTO_ICMP) {
        Err(e) => t.blocked(what, &e),
        Ok(_fd) => t.harmless(
            what,
            "opened (unprivileged ping socket: echo only, no raw access)",
        ),
    }
    t.finish()
}

fn chown() -> CmdResult {
    let mut t = Tally::new("chown");
    let path = std::env::temp_dir().join("hostile-chown");
    fs::write(&path, b"kiln")
        .map_err(|e| Failure::Runtime(format!("create {}: {}", path.display(), describe(&e))))?;
    let what = format!("chown {} 0:0", path.display());
    match std::os::unix::fs::chown(&path, Some(0), Some(0)) {
        Err(e) => t.blocked(what, &e),
        Ok(()) => t.breach(what, "now owned by root"),
    }
    let _ = fs::remove_file(&path);
    let before = sys::ids();
    match sys::setgid(0) {
        Err(e) => t.blocked("setgid(0)", &e),
        Ok(()) if before.gid == 0 && before.egid == 0 => t.harmless("setgid(0)", "already gid 0"),
        Ok(()) => t.breach("setgid(0)", whoami_line(sys::ids())),
    }
    match sys::setuid(0) {
        Err(e) => t.blocked("setuid(0)", &e),
        Ok(()) if before.uid == 0 && before.euid == 0 => t.harmless("setuid(0)", "already uid 0"),
        Ok(()) => t.breach("setuid(0)", whoami_line(sys::ids())),
    }
    t.finish()
}

fn whoami_line(ids: sys::Ids) -> String {
    format!("uid={} euid={} gid={}", ids.uid, ids.euid, ids.gid)
}

/// The `euid=` of a `whoami` line.
fn parse_euid(text: &str) -> Option<u32> {
    text.lines().rev().find_map(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("euid="))
            .and_then(|v| v.parse().ok())
    })
}

fn no_new_privs() -> String {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NoNewPrivs:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| "?".into())
}

/// Runs `exe hostile whoami` and classifies the child's euid.
fn exec_whoami(t: &mut Tally, exe: &Path, my_euid: u32) {
    let what = format!("exec {} hostile whoami", exe.display());
    match Command::new(exe).args(["hostile", "whoami"]).output() {
        Err(e) => t.blocked(what, &e),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().last().unwrap_or("").to_string();
            match parse_euid(&text) {
                Some(e) if e != my_euid => {
                    t.breach(what, format!("the setuid bit took effect: {line}"))
                }
                Some(_) => t.harmless(what, format!("ran without any privilege change: {line}")),
                None => t.harmless(
                    what,
                    format!(
                        "ran but printed no euid ({}; stderr: {})",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                ),
            }
        }
    }
}

fn setuid_binary(planted: Option<&Path>) -> CmdResult {
    let mut t = Tally::new("setuid-binary");
    let me = sys::ids();
    t.progress(format_args!(
        "{}; NoNewPrivs={}",
        whoami_line(me),
        no_new_privs()
    ));
    for dir in [std::env::temp_dir(), output_dir()] {
        let copy = dir.join("hostile-suid");
        if let Err(e) = ensure_dir(&dir).and_then(|()| fs::copy("/proc/self/exe", &copy).map(drop))
        {
            t.blocked(format!("copy /proc/self/exe to {}", copy.display()), &e);
            continue;
        }
        let what = format!("chown {} 0:0", copy.display());
        match std::os::unix::fs::chown(&copy, Some(0), Some(0)) {
            Err(e) => t.blocked(what, &e),
            Ok(()) if me.euid == 0 => t.harmless(what, "we are root already"),
            Ok(()) => t.breach(what, "now owned by root"),
        }
        match fs::set_permissions(&copy, fs::Permissions::from_mode(0o4755)) {
            Err(e) => t.blocked(format!("chmod u+s {}", copy.display()), &e),
            Ok(()) => {
                let (mode, uid) = fs::metadata(&copy).map_or((0, 0), |m| (m.mode(), m.uid()));
                t.progress(format_args!(
                    "{}: mode {:o}, owner uid {uid}",
                    copy.display(),
                    mode & 0o7777
                ));
            }
        }
        exec_whoami(&mut t, &copy, me.euid);
        let _ = fs::remove_file(&copy);
    }
    if let Some(p) = planted {
        match fs::metadata(p) {
            Ok(m) => t.progress(format_args!(
                "planted {}: mode {:o}, owner uid {}",
                p.display(),
                m.mode() & 0o7777,
                m.uid()
            )),
            Err(e) => t.progress(format_args!("planted {}: {}", p.display(), describe(&e))),
        }
        exec_whoami(&mut t, p, me.euid);
    }
    t.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn usage(v: &[&str]) -> bool {
        matches!(parse_case(&args(v)), Err(Failure::Usage(_)))
    }

    /// Arguments that make each listed case parse.
    fn sample_args(name: &str) -> Vec<&'static str> {
        match name {
            "net-tcp" => vec!["10.0.0.1:80"],
            "symlink-input" => vec!["/in"],
            "memory" | "fill-out" | "fill-tmp" | "flood" => vec!["64"],
            "read-other" => vec!["/x"],
            "cpu-burn" => vec!["1.5"],
            _ => vec![],
        }
    }

    #[test]
    fn every_listed_case_parses_and_names_are_unique() {
        let mut seen = BTreeSet::new();
        for c in CASES {
            assert!(seen.insert(c.name), "duplicate case {}", c.name);
            let mut a = vec![c.name];
            a.extend(sample_args(c.name));
            assert!(
                parse_case(&args(&a)).is_ok(),
                "case {} does not parse",
                c.name
            );
            assert!(help_text().contains(c.name));
        }
        for name in [
            "net-tcp",
            "net-udp",
            "dns",
            "write-root",
            "proc-root",
            "symlink-input",
            "fork-bomb",
            "memory",
            "fill-out",
            "fill-tmp",
            "flood",
            "mount",
            "ptrace",
            "raw-socket",
            "chown",
            "setuid-binary",
            "sleep-forever",
            "read-other",
            "cpu-burn",
            "whoami",
        ] {
            assert!(seen.contains(name), "{name} missing from the list");
        }
        assert_eq!(seen.len(), 20);
    }

    #[test]
    fn list_and_help_are_not_cases() {
        assert_eq!(parse_case(&args(&["list"])).ok(), Some(Case::List));
        assert_eq!(parse_case(&args(&["help"])).ok(), Some(Case::Help));
        assert!(run(&args(&["list"])).is_ok());
        assert!(usage(&["list", "x"]));
    }

    #[test]
    fn arguments_are_parsed() {
        let p = |v: &[&str]| parse_case(&args(v)).ok();
        assert_eq!(
            p(&["net-tcp", "127.0.0.1:9"]),
            Some(Case::NetTcp("127.0.0.1:9".parse().ok()))
        );
        assert_eq!(p(&["net-tcp"]), Some(Case::NetTcp(None)));
        assert_eq!(
            p(&["net-tcp", "[::1]:53"]),
            Some(Case::NetTcp("[::1]:53".parse().ok()))
        );
        assert_eq!(p(&["memory", "256"]), Some(Case::Memory { mib: 256 }));
        assert_eq!(p(&["fill-out", "3"]), Some(Case::FillOut { mib: 3 }));
        assert_eq!(p(&["fill-tmp", "3"]), Some(Case::FillTmp { mib: 3 }));
        assert_eq!(p(&["flood", "1"]), Some(Case::Flood { mib: 1 }));
        assert_eq!(
            p(&["fork-bomb"]),
            Some(Case::ForkBomb {
                max: FORK_BOMB_DEFAULT_MAX
            })
        );
        assert_eq!(p(&["fork-bomb", "10"]), Some(Case::ForkBomb { max: 10 }));
        assert_eq!(p(&["cpu-burn", "0.5"]), Some(Case::CpuBurn { secs: 0.5 }));
        assert_eq!(
            p(&["symlink-input", "/in/a", "s3cret"]),
            Some(Case::SymlinkInput {
                input: PathBuf::from("/in/a"),
                secret: Some("s3cret".into())
            })
        );
        assert_eq!(
            p(&["symlink-input", "/in/a"]),
            Some(Case::SymlinkInput {
                input: PathBuf::from("/in/a"),
                secret: None
            })
        );
        assert_eq!(
            p(&["read-other", "/srv/jobs/x"]),
            Some(Case::ReadOther(PathBuf::from("/srv/jobs/x")))
        );
        assert_eq!(
            p(&["setuid-binary", "/in/suid"]),
            Some(Case::SetuidBinary {
                planted: Some(PathBuf::from("/in/suid"))
            })
        );
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        assert!(usage(&[]));
        assert!(usage(&["nope"]));
        assert!(usage(&["net-tcp", "example.com:80"])); // numeric only
        assert!(usage(&["net-tcp", "1.2.3.4"])); // no port
        assert!(usage(&["net-tcp", "1.2.3.4:1", "x"]));
        assert!(usage(&["net-udp", "x"]));
        assert!(usage(&["memory"]));
        assert!(usage(&["memory", "0"]));
        assert!(usage(&["memory", "-5"]));
        assert!(usage(&["memory", "2000000"]));
        assert!(usage(&["fill-out", "x"]));
        assert!(usage(&["fork-bomb", "0"]));
        assert!(usage(&["cpu-burn", "0"]));
        assert!(usage(&["cpu-burn", "NaN"]));
        assert!(usage(&["cpu-burn"]));
        assert!(usage(&["symlink-input"]));
        assert!(usage(&["symlink-input", ""]));
        assert!(usage(&["read-other"]));
        assert!(usage(&["whoami", "x"]));
    }

    #[test]
    fn whoami_line_format() {
        let line = whoami_line(sys::Ids {
            uid: 65534,
            euid: 0,
            gid: 65534,
            egid: 65534,
        });
        assert_eq!(line, "uid=65534 euid=0 gid=65534");
        assert_eq!(parse_euid(&line), Some(0));
        assert_eq!(parse_euid("noise\nuid=1 euid=2 gid=3\n"), Some(2));
        assert_eq!(parse_euid("nothing here"), None);
        let me = whoami_line(sys::ids());
        assert!(me.starts_with("uid="), "{me}");
        assert_eq!(parse_euid(&me), Some(sys::ids().euid));
    }

    #[test]
    fn errors_are_described_by_errno_name() {
        let e = io::Error::from_raw_os_error(libc::ENETUNREACH);
        assert_eq!(describe(&e), "ENETUNREACH (Network is unreachable)");
        let e = io::Error::from_raw_os_error(libc::EROFS);
        assert_eq!(describe(&e), "EROFS (Read-only file system)");
        let e = io::Error::other("no errno");
        assert_eq!(describe(&e), "no errno");
        assert!(describe(&io::Error::from_raw_os_error(4000)).starts_with("errno 4000"));
    }

    #[test]
    fn account_data_detection() {
        assert!(looks_like_account_data(
            b"root:x:0:0:root:/root:/bin/bash\n"
        ));
        assert!(looks_like_account_data(
            b"daemon:*:1:\nroot:*:19000:0:99999:7:::\n"
        ));
        assert!(!looks_like_account_data(b"root: not a passwd line\n"));
        assert!(!looks_like_account_data(b"hello\n"));
        assert!(contains(b"abcsecretdef", b"secret"));
        assert!(!contains(b"abc", b""));
    }

    #[test]
    fn tally_verdicts() {
        let mut t = Tally::new("write-root");
        t.blocked("x", &io::Error::from_raw_os_error(libc::EROFS));
        assert!(t.finish().is_ok());
        let mut t = Tally::new("write-root");
        t.blocked("x", &io::Error::from_raw_os_error(libc::EROFS));
        t.breach("y", "opened");
        assert!(matches!(t.finish(), Err(Failure::Exit(EXIT_BREACHED))));
    }

    #[test]
    fn dns_query_is_well_formed() {
        let q = dns_query();
        assert_eq!(q.len(), 12 + 1 + 7 + 1 + 3 + 1 + 4);
        assert_eq!(&q[13..20], b"example");
    }
}
