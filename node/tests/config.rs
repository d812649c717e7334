#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
//! `kiln-node config init` and `kiln-node run --config` as operators run them.

use std::process::Command;

fn node() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln-node"));
    c.env_remove("KILN_COORDINATOR_ADDR")
        .env_remove("KILN_NODE_STATE");
    c
}

/// `kiln-node run --config <file>`: it must fail; returns its stderr.
fn run_refused(file: &std::path::Path) -> String {
    let out = node().args(["run", "--config"]).arg(file).output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn config_init_writes_every_default_and_run_reads_it_back() {
    let out = node().args(["config", "init"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let table: toml::Table = text.parse().unwrap();
    assert_eq!(table["image-cache"].as_str(), Some("20GiB"), "{text}");
    assert_eq!(table["pull-timeout"].as_integer(), Some(600));
    assert!(text.contains("# (environment: KILN_NODE_STATE)"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    // A file with a typo: refused, naming the key and the file.
    std::fs::write(&file, "registry-allowed = [\"ghcr.io\"]\n").unwrap();
    let err = run_refused(&file);
    assert!(
        err.contains("`registry-allowed`")
            && err.contains("registry-allow")
            && err.contains("node.toml"),
        "{err}"
    );
    // The generated file, with the coordinator still missing: clap says so.
    std::fs::write(&file, &text).unwrap();
    assert!(run_refused(&file).contains("--coordinator"));
}
