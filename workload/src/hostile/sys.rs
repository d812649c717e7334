//! The raw system calls the hostile cases need, each behind a small safe
//! wrapper that returns `io::Result` (errno in `io::Error::raw_os_error`).
//!
//! This is the only module of `kiln-workload` allowed to use `unsafe`. Every
//! block is one libc call whose pointer arguments are either null or point at
//! live locals of the right size for the duration of the call.

#![allow(unsafe_code)]

use std::ffi::{CString, c_int, c_void};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;
use std::time::Duration;

pub use libc::pid_t;

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `-1` means failure with `errno` set (the libc convention).
fn check(ret: c_int) -> io::Result<c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Real and effective user and group ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
}

pub fn ids() -> Ids {
    // SAFETY: argument-less getters that cannot fail and touch no memory of ours.
    unsafe {
        Ids {
            uid: libc::getuid(),
            euid: libc::geteuid(),
            gid: libc::getgid(),
            egid: libc::getegid(),
        }
    }
}

pub fn getpid() -> pid_t {
    // SAFETY: argument-less, cannot fail.
    unsafe { libc::getpid() }
}

/// `fork()`s a child that only waits to be killed (it also dies with us, via
/// `PR_SET_PDEATHSIG`). Returns the child's pid.
pub fn fork_sleeper() -> io::Result<pid_t> {
    let parent = getpid();
    // SAFETY: the hostile cases fork while this program is single-threaded,
    // and the child never returns into Rust code: it only makes the
    // async-signal-safe calls of `sleeper_child` (no allocation, no locks, no
    // unwinding), so the duplicated address space is never observed in an
    // inconsistent state.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => sleeper_child(parent),
        pid => Ok(pid),
    }
}

fn sleeper_child(parent: pid_t) -> ! {
    // SAFETY: async-signal-safe calls with plain integer arguments (see
    // `fork_sleeper`); `_exit` skips atexit handlers and stdio flushing, so
    // nothing buffered by the parent is written twice.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        // The parent died before prctl took effect: nobody would kill us.
        if libc::getppid() != parent {
            libc::_exit(0);
        }
        loop {
            libc::pause();
        }
    }
}

/// `SIGKILL`s `pid` (a child of ours) and reaps it.
pub fn kill_and_reap(pid: pid_t) {
    // SAFETY: kill takes plain integers; waitpid may be given a null status
    // pointer. Errors (already dead, already reaped) are irrelevant here.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, ptr::null_mut(), 0);
    }
}

/// `PTRACE_ATTACH` to `pid`; on success waits for the attach stop and
/// detaches again, leaving the tracee running as before.
pub fn ptrace_attach(pid: pid_t) -> io::Result<()> {
    let none = ptr::null_mut::<c_void>();
    // SAFETY: PTRACE_ATTACH ignores addr and data (null).
    if unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, none, none) } == -1 {
        return Err(io::Error::last_os_error());
    }
    let mut status: c_int = 0;
    // SAFETY: `status` is a live c_int for the duration of the call; __WALL
    // lets us wait for a tracee that is not our child.
    unsafe { libc::waitpid(pid, &raw mut status, libc::__WALL) };
    // SAFETY: PTRACE_DETACH with data 0: resume without delivering a signal.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, none, none) };
    Ok(())
}

/// `process_vm_readv` of `buf.len()` bytes at `addr` in process `pid`;
/// returns how many bytes were read.
pub fn process_vm_read(pid: pid_t, addr: usize, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which we exclusively borrow for the
    // call; `remote` is an address in the *other* process, which the kernel
    // validates (EFAULT) and never dereferences in ours.
    let n = unsafe { libc::process_vm_readv(pid, &raw const local, 1, &raw const remote, 1, 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `mount("none", target, "tmpfs", 0, NULL)`.
pub fn mount_tmpfs(target: &Path) -> io::Result<()> {
    let target = cstring(target)?;
    // SAFETY: three valid NUL-terminated strings that outlive the call; null data.
    check(unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            ptr::null(),
        )
    })
    .map(drop)
}

pub fn umount(target: &Path) -> io::Result<()> {
    let target = cstring(target)?;
    // SAFETY: a valid NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

pub use libc::{CLONE_NEWNS, CLONE_NEWUSER};

pub fn unshare(flags: c_int) -> io::Result<()> {
    // SAFETY: integer argument only.
    check(unsafe { libc::unshare(flags) }).map(drop)
}

pub use libc::{
    AF_INET, AF_INET6, AF_PACKET, ETH_P_ALL, IPPROTO_ICMP, IPPROTO_ICMPV6, SOCK_DGRAM, SOCK_RAW,
};

/// `socket(domain, ty | SOCK_CLOEXEC, protocol)`.
pub fn socket(domain: c_int, ty: c_int, protocol: c_int) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let fd = check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn setuid(uid: u32) -> io::Result<()> {
    // SAFETY: integer argument only.
    check(unsafe { libc::setuid(uid) }).map(drop)
}

pub fn setgid(gid: u32) -> io::Result<()> {
    // SAFETY: integer argument only.
    check(unsafe { libc::setgid(gid) }).map(drop)
}

/// Makes writes past `RLIMIT_FSIZE` fail with `EFBIG` instead of killing us
/// with `SIGXFSZ`, so a file-size limit shows up as an observable error.
pub fn ignore_sigxfsz() {
    // SAFETY: installs the SIG_IGN disposition; no handler code is involved.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}

/// Soft `RLIMIT_NPROC`; `None` when unlimited or unknown.
pub fn rlimit_nproc() -> Option<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a live rlimit for the duration of the call.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NPROC, &raw mut rl) } == 0;
    (ok && rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur)
}

/// User plus system CPU time used so far by all threads of this process.
pub fn cpu_time() -> Duration {
    // SAFETY: rusage is plain old data, all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live rusage for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPUs online on the machine (not the cgroup quota, nor the affinity mask).
pub fn online_cpus() -> usize {
    // SAFETY: integer argument only.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}
