//! Builds the `kiln-workload` binary, statically linked, so that `src/lib.rs`
//! can embed it (`include_bytes!`) and later ship it in a `FROM scratch` image.
//!
//! How: a nested `cargo build --release -p kiln-workload --target
//! x86_64-unknown-linux-gnu` into its own target dir
//! (`<workspace>/target/workload-static`, so it never contends for the outer
//! build's lock), with `-C target-feature=+crt-static`, which makes a
//! static-pie glibc executable that needs nothing from the image.
//!
//! The environment cargo gives a build script describes *this* crate's build
//! (target, profile, rustflags, jobserver, clippy wrapper...); passed on, it
//! would corrupt the nested build, so it is scrubbed first.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const TARGET: &str = "x86_64-unknown-linux-gnu";
const PT_INTERP: u32 = 3;
const PT_DYNAMIC: u32 = 2;
const DT_NULL: i64 = 0;
const DT_NEEDED: i64 = 1;

/// Environment variables starting with `CARGO_` that the nested cargo may keep:
/// they configure cargo itself (home, network, registries, output style),
/// not the particular build.
const KEEP_CARGO_PREFIXES: &[&str] = &[
    "CARGO_HOME",
    "CARGO_NET_",
    "CARGO_HTTP_",
    "CARGO_REGISTRIES_",
    "CARGO_REGISTRY_",
    "CARGO_SOURCE_",
    "CARGO_TERM_",
    "CARGO_UNSTABLE_",
    "CARGO_LOG",
];

/// Other inherited variables that describe the outer build.
const REMOVE: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    // `cargo clippy` sets this to clippy-driver; the nested build must just compile.
    "RUSTC_WORKSPACE_WRAPPER",
    "MAKEFLAGS",
    "MFLAGS",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "NUM_JOBS",
    "OPT_LEVEL",
    "PROFILE",
    "DEBUG",
    "RUSTC_LINKER",
    "__CARGO_FIX_PLZ",
    "__CARGO_DEFAULT_LIB_METADATA",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("docker/ lives inside the workspace")
        .to_path_buf();
    let workload = workspace.join("workload");
    println!("cargo:rerun-if-changed={}", workload.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        workload.join("Cargo.toml").display()
    );

    let target_dir = workspace.join("target").join("workload-static");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&workspace)
        .arg("build")
        .arg("--release")
        .args(["-p", "kiln-workload", "--bin", "kiln-workload"])
        .args(["--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    if let Some(jobs) = env::var_os("NUM_JOBS") {
        cmd.arg("-j").arg(jobs);
    }
    for (key, _) in env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        let scrub_cargo =
            k.starts_with("CARGO_") && !KEEP_CARGO_PREFIXES.iter().any(|p| k.starts_with(p));
        if scrub_cargo || REMOVE.contains(&k) || k.starts_with("DEP_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
        "-C target-feature=+crt-static",
    )
    // Smaller image; the workload needs no symbols at run time.
    .env("CARGO_PROFILE_RELEASE_STRIP", "symbols");

    let started = Instant::now();
    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "kiln-docker build.rs: could not run nested cargo ({}): {e}",
            Path::new(&cargo).display()
        )
    });
    if !output.status.success() {
        panic!(
            "kiln-docker build.rs: building the static kiln-workload binary failed ({}).\n\
             command: {cmd:?}\n\
             --- nested cargo stderr ---\n{}\n--- end ---\n\
             hint: reproduce with\n  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS='-C target-feature=+crt-static' \
             cargo build --release -p kiln-workload --target {TARGET} --target-dir {}\n\
             A static glibc link needs the glibc static libraries (libc.a, e.g. Debian's libc6-dev) \
             and the {TARGET} target installed (`rustup target add {TARGET}`).",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            target_dir.display(),
        );
    }

    let elf_path = target_dir
        .join(TARGET)
        .join("release")
        .join("kiln-workload");
    let elf = std::fs::read(&elf_path).unwrap_or_else(|e| {
        panic!(
            "kiln-docker build.rs: nested build succeeded but {} is unreadable: {e}",
            elf_path.display()
        )
    });
    if let Err(why) = check_static(&elf) {
        panic!(
            "kiln-docker build.rs: {} is not a statically linked executable: {why}.\n\
             It would not run in a FROM scratch image. Was `-C target-feature=+crt-static` overridden \
             (e.g. by a [target] rustflags entry in .cargo/config.toml)?",
            elf_path.display()
        );
    }
    // Also watch the output: if it is deleted, run again instead of failing
    // in `include_bytes!`. (The nested cargo leaves a fresh binary untouched.)
    println!("cargo:rerun-if-changed={}", elf_path.display());
    println!("cargo:rustc-env=KILN_WORKLOAD_ELF={}", elf_path.display());
    // Visible with `cargo build -vv`.
    eprintln!("nested kiln-workload build took {:?}", started.elapsed());
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, String> {
    b.get(off..off + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or_else(|| format!("truncated ELF at offset {off}"))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, String> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| format!("truncated ELF at offset {off}"))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, String> {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| format!("truncated ELF at offset {off}"))
}

fn usize_at(b: &[u8], off: usize) -> Result<usize, String> {
    usize::try_from(u64_at(b, off)?).map_err(|e| e.to_string())
}

/// A static executable has no `PT_INTERP` (no dynamic loader is asked for) and
/// no `DT_NEEDED` entries (no shared library is required). A static-pie still
/// has a `PT_DYNAMIC` segment (for self-relocation), which is fine.
fn check_static(elf: &[u8]) -> Result<(), String> {
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("not an ELF file".into());
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a little-endian 64-bit ELF".into());
    }
    let phoff = usize_at(elf, 0x20)?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        match u32_at(elf, ph)? {
            PT_INTERP => return Err("it has a PT_INTERP header (needs a dynamic loader)".into()),
            PT_DYNAMIC => {
                let off = usize_at(elf, ph + 0x08)?;
                let size = usize_at(elf, ph + 0x20)?;
                for d in (off..off + size).step_by(16) {
                    match u64_at(elf, d)? as i64 {
                        DT_NULL => break,
                        DT_NEEDED => {
                            return Err("it has DT_NEEDED entries (needs shared libraries)".into());
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}
