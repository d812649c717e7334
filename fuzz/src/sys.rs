//! The only unsafe code of the fuzzer: coverage counters and a counting
//! allocator. Everything else reads them through the safe functions here.
//!
//! # Coverage counters
//!
//! Compiled with `-C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=3
//! -C llvm-args=-sanitizer-coverage-inline-8bit-counters` (what `fuzz/run`
//! does for the crates it instruments), LLVM gives every edge of the
//! control-flow graph one byte in the `__sancov_cntrs` section, increments it
//! inline (no call) each time the edge runs, and makes each object's
//! constructor report the section with
//! `__sanitizer_cov_8bit_counters_init(start, end)` before `main`. We keep
//! those ranges; after each execution the engine reads every non-zero byte
//! (which edges ran, and roughly how often) and zeroes it again. Objects of
//! one binary usually report the same whole section, so duplicate ranges
//! are dropped. Without the flags nobody calls us, [`counters`] is empty and
//! the engine fuzzes blind (mutation without feedback).
//!
//! # Allocation accounting
//!
//! [`CountingAlloc`] wraps the system allocator and counts live bytes. While
//! the engine has it [`arm`]ed (during one execution) it also remembers the
//! largest single request and the highest live total, so an input that
//! makes a decoder reserve gigabytes is caught. A request above the hard
//! limit ([`set_hard_limit`]) would likely abort the process, so the hook
//! runs first (it saves the input and exits).

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

// ---------------------------------------------------------------------------
// Coverage

const MAX_REGIONS: usize = 256;
static REGION_START: [AtomicUsize; MAX_REGIONS] = [const { AtomicUsize::new(0) }; MAX_REGIONS];
static REGION_END: [AtomicUsize; MAX_REGIONS] = [const { AtomicUsize::new(0) }; MAX_REGIONS];
static REGIONS: AtomicUsize = AtomicUsize::new(0);

/// Called by the constructor of every instrumented object (before `main`,
/// one thread), with the counters section it uses.
#[unsafe(no_mangle)]
pub extern "C" fn __sanitizer_cov_8bit_counters_init(start: *const u8, end: *const u8) {
    let (s, e) = (start as usize, end as usize);
    if s >= e {
        return;
    }
    let n = REGIONS.load(Relaxed);
    let seen =
        (0..n).any(|i| REGION_START[i].load(Relaxed) == s && REGION_END[i].load(Relaxed) == e);
    if !seen && n < MAX_REGIONS {
        REGION_START[n].store(s, Relaxed);
        REGION_END[n].store(e, Relaxed);
        REGIONS.store(n + 1, Relaxed);
    }
}

/// Called with the PC table when `-sanitizer-coverage-pc-table` is on; we
/// do not use it, but an instrumented binary must be able to link.
#[unsafe(no_mangle)]
pub extern "C" fn __sanitizer_cov_pcs_init(_start: *const usize, _end: *const usize) {}

/// Keeps the callbacks in the final binary whatever the link order (the
/// binary calls this once).
pub fn keep_callbacks() -> bool {
    let init: extern "C" fn(*const u8, *const u8) = __sanitizer_cov_8bit_counters_init;
    let pcs: extern "C" fn(*const usize, *const usize) = __sanitizer_cov_pcs_init;
    std::hint::black_box(init as usize) != 0 && std::hint::black_box(pcs as usize) != 0
}

/// The counters of this process, as disjoint address ranges.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// (start address, length), sorted and merged.
    regions: Vec<(usize, usize)>,
    len: usize,
}

/// The counters registered so far (all of them once `main` runs).
pub fn counters() -> Counters {
    let n = REGIONS.load(Relaxed);
    let mut spans: Vec<(usize, usize)> = (0..n)
        .map(|i| (REGION_START[i].load(Relaxed), REGION_END[i].load(Relaxed)))
        .collect();
    spans.sort_unstable();
    // Merge overlaps so no counter is counted twice.
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let regions: Vec<(usize, usize)> = merged.into_iter().map(|(s, e)| (s, e - s)).collect();
    let len = regions.iter().map(|r| r.1).sum();
    Counters { regions, len }
}

impl Counters {
    /// Number of counters (edges instrumented); 0 in an uninstrumented build.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Zeroes every counter.
    pub fn clear(&self) {
        for &(start, len) in &self.regions {
            // SAFETY: `start..start + len` is a counters section the
            // instrumented code registered: static, writable memory that
            // lives as long as the process. Counters are plain bytes, so
            // any value is valid; a racing increment on another thread
            // (benign, and what libFuzzer tolerates too) at worst leaves
            // one count behind.
            unsafe { ptr::write_bytes(start as *mut u8, 0, len) };
        }
    }

    /// Calls `f(index, count)` for every non-zero counter, in index order,
    /// zeroing each as it goes.
    pub fn drain(&self, mut f: impl FnMut(usize, u8)) {
        let mut base = 0usize;
        for &(start, len) in &self.regions {
            let end = start + len;
            let mut at = start;
            // Unaligned head and tail byte by byte, the body a word at a
            // time: most words are zero.
            let body = start.next_multiple_of(8).min(end);
            let tail = body + (end - body) / 8 * 8;
            let mut byte = |addr: usize| {
                // SAFETY: `addr` is inside a registered counters section
                // (see `clear`); volatile, as other code writes it.
                let v = unsafe { ptr::read_volatile(addr as *const u8) };
                if v != 0 {
                    unsafe { ptr::write_volatile(addr as *mut u8, 0) };
                    f(base + (addr - start), v);
                }
            };
            while at < body {
                byte(at);
                at += 1;
            }
            while at < tail {
                // SAFETY: 8-aligned and inside the section (`at + 8 <= tail`).
                let w = unsafe { ptr::read_volatile(at as *const u64) };
                if w != 0 {
                    for k in 0..8 {
                        byte(at + k);
                    }
                }
                at += 8;
            }
            while at < end {
                byte(at);
                at += 1;
            }
            base += len;
        }
    }
}

// ---------------------------------------------------------------------------
// Allocation accounting

static LIVE: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static HARD_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
static HARD_HOOK: OnceLock<fn(usize)> = OnceLock::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, counted. Install it in a binary with
/// `#[global_allocator] static A: kiln_fuzz::sys::CountingAlloc = kiln_fuzz::sys::CountingAlloc;`.
pub struct CountingAlloc;

impl CountingAlloc {
    #[inline]
    fn request(size: usize) {
        if ARMED.load(Relaxed) {
            LARGEST.fetch_max(size, Relaxed);
            if size > HARD_LIMIT.load(Relaxed) {
                // Disarm first: the hook allocates (a path, a file).
                ARMED.store(false, Relaxed);
                if let Some(hook) = HARD_HOOK.get() {
                    hook(size);
                }
            }
        }
    }

    #[inline]
    fn grew(size: usize) {
        let live = LIVE.fetch_add(size, Relaxed) + size;
        if ARMED.load(Relaxed) {
            PEAK.fetch_max(live, Relaxed);
        }
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged and only updates counters around it (atomics: no allocation, no
// lock, no unwinding).
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Relaxed);
        Self::request(layout.size());
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::request(layout.size());
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::request(new_size);
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                Self::grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// What one armed stretch allocated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// The largest single request (bytes).
    pub largest: usize,
    /// The highest live total above what was live when armed (bytes).
    pub peak_growth: usize,
}

/// Whether this binary counts allocations (it installed [`CountingAlloc`]).
pub fn alloc_counting() -> bool {
    INSTALLED.load(Relaxed)
}

/// Starts recording (one execution).
pub fn arm() -> usize {
    let base = LIVE.load(Relaxed);
    LARGEST.store(0, Relaxed);
    PEAK.store(base, Relaxed);
    ARMED.store(true, Relaxed);
    base
}

/// Stops recording; `base` is what [`arm`] returned.
pub fn disarm(base: usize) -> AllocStats {
    ARMED.store(false, Relaxed);
    AllocStats {
        largest: LARGEST.load(Relaxed),
        peak_growth: PEAK.load(Relaxed).saturating_sub(base),
    }
}

/// Runs `hook(size)` (once set, for the process) when an armed request
/// exceeds `limit` bytes: it should save the input and exit, since the
/// system allocator may abort on such a request.
pub fn set_hard_limit(limit: usize, hook: fn(usize)) {
    HARD_LIMIT.store(limit, Relaxed);
    let _ = HARD_HOOK.set(hook);
}
