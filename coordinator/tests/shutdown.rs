#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
//! The shipped `kiln-coordinator` binary stops in order on Ctrl-C (SIGINT):
//! it finishes what is in flight, stops its network, closes its database and
//! exits 0; and its audit and deadline flags refuse nonsense by name.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test]
async fn ctrl_c_stops_the_coordinator_in_order_and_it_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_kiln-coordinator"))
        .args(["run", "--http", &format!("127.0.0.1:{http}")])
        .args(["--p2p", "/ip4/127.0.0.1/tcp/0"])
        .args(["--audit-every", "10m", "--result-grace", "30s"])
        .args(["--verification", "on", "--audit-window", "10m"])
        .args(["--blob-quota", "1GiB", "--blob-quota-per-buyer", "64MiB"])
        .args([
            "--public-rate",
            "50",
            "--buyer-rate",
            "off",
            "--refusal-delay",
            "0s",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln-coordinator binary");
    let base = format!("http://127.0.0.1:{http}");
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..300 {
        if client.get(format!("{base}/v1/info")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the coordinator did not come up");
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    // Logs go to stdout (tracing's default writer).
    let logs =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {logs}", out.status);
    assert!(logs.contains("coordinator stopped"), "{logs}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?} to stop",
        started.elapsed()
    );
    // The database was closed cleanly: it opens again at once.
    let again = Command::new(env!("CARGO_BIN_EXE_kiln-coordinator"))
        .args([
            "run",
            "--http",
            "127.0.0.1:0",
            "--p2p",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-INT", &again.id().to_string()])
        .status();
    let out = again.wait_with_output().unwrap();
    assert!(out.status.success(), "restart on the same state failed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("coordinator API at"));
}

#[test]
fn audit_and_grace_flags_name_what_is_wrong() {
    for (flag, value, says) in [
        ("--audit-every", "0", "give a duration or `off`"),
        ("--audit-every", "often", "is not a duration"),
        ("--result-grace", "soon", "is not a duration"),
        ("--verification", "maybe", "say `on` or `off`"),
        ("--audit-window", "a while", "is not a duration"),
        (
            "--blob-quota",
            "lots",
            "give a size such as 100GiB, or `off`",
        ),
        (
            "--blob-quota-per-buyer",
            "plenty",
            "give a size such as 100GiB, or `off`",
        ),
        ("--public-rate", "fast", "give a positive number, or `off`"),
        ("--public-rate", "0", "0 would refuse everything"),
        ("--buyer-rate", "many", "give a positive number, or `off`"),
        ("--public-in-flight", "0", "0 would refuse everything"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln-coordinator"))
            .args(["run", flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains(says), "{stderr}");
    }
}

/// A faucet pays every fresh key: the shipped binary refuses to run one
/// where strangers can reach it, naming the listener and the way out, and
/// runs one on loopback.
#[test]
fn a_faucet_runs_only_on_loopback() {
    for (http, p2p, says) in [
        (
            "0.0.0.0:0",
            "/ip4/127.0.0.1/tcp/0",
            "the HTTP address is 0.0.0.0:0",
        ),
        (
            "127.0.0.1:0",
            "/ip4/0.0.0.0/tcp/0",
            "the p2p address is /ip4/0.0.0.0/tcp/0",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_kiln-coordinator"))
            .args(["run", "--faucet", "1000", "--http", http, "--p2p", p2p])
            .arg("--state-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{http} {p2p}: started with a faucet");
        assert!(
            stderr.contains(says) && stderr.contains("listen on 127.0.0.1"),
            "{stderr}"
        );
    }
    // On loopback it starts (and stops on Ctrl-C).
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_kiln-coordinator"))
        .args([
            "run",
            "--faucet",
            "1000",
            "--http",
            &format!("127.0.0.1:{http}"),
        ])
        .args(["--p2p", "/ip4/127.0.0.1/tcp/0", "--state-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Up when its HTTP port answers (a loaded machine may take a while).
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The Ctrl-C handler is installed right after the listeners.
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "a loopback faucet did not run");
    assert!(String::from_utf8_lossy(&out.stdout).contains("coordinator API at"));
}
