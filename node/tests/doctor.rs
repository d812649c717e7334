#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
//! `kiln-node doctor --coordinator`, the real binary, against a real
//! coordinator: its reachability probe leaves nothing in the coordinator's
//! log, and an address whose peer id is not the coordinator's is named as
//! such, with both ids and what to copy instead.

use std::io::Write;
use std::process::Command;
use std::sync::Mutex;

use kiln_coordinator::CoordinatorConfig;
use kiln_net::Addr;
use kiln_net::multiaddr::Protocol;
use tokio_util::sync::CancellationToken;

/// Everything this test process logs (it runs the coordinator).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}

/// Lines of the coordinator's log at WARN or ERROR.
fn complaints() -> Vec<String> {
    log()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(str::to_string)
        .collect()
}

/// Runs `kiln-node doctor --json --coordinator <addr>`; returns its
/// `coordinator` check and its exit code.
async fn doctor(addr: &Addr) -> (serde_json::Value, Option<i32>) {
    let state = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln-node"));
    cmd.args(["doctor", "--json", "--coordinator", &addr.to_string()])
        .arg("--state-dir")
        .arg(state.path())
        .env("RUST_LOG", "warn")
        .env_remove("KILN_COORDINATOR");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}); stderr: {stderr}"));
    let check = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "coordinator")
        .unwrap_or_else(|| panic!("no coordinator check in {v}"))
        .clone();
    (check, out.status.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_probes_the_coordinator_quietly_and_names_a_wrong_peer_id() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut config = CoordinatorConfig::new(dir.path().to_path_buf());
    config.http_listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.audit.mean_interval = None;
    let cancel = CancellationToken::new();
    let coordinator = kiln_coordinator::start(config, cancel.clone())
        .await
        .unwrap();
    let addr = coordinator.p2p_addrs[0].clone();
    let id = kiln_net::peer_of(&addr).unwrap();
    assert!(
        log().contains("coordinator up"),
        "the log is captured: {}",
        log()
    );
    let before = complaints();

    // The right address: reachable, and the coordinator has nothing to say.
    let (check, _) = doctor(&addr).await;
    assert_eq!(check["status"], "ok", "{check}");
    assert!(
        check["detail"].as_str().unwrap().contains("answered in"),
        "{check}"
    );
    // (A refusal is logged before it is sent: the doctor has its answer.)
    assert_eq!(
        complaints(),
        before,
        "the doctor's probe made the coordinator complain"
    );

    // The same host and port with another peer id.
    let other = kiln_protocol::Keypair::generate()
        .to_libp2p()
        .public()
        .to_peer_id();
    let mut wrong: Addr = addr
        .iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect();
    wrong.push(Protocol::P2p(other));
    let (check, code) = doctor(&wrong).await;
    assert_eq!(check["status"], "fail", "{check}");
    assert_eq!(code, Some(1), "{check}");
    let detail = check["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("has peer id {id}, not {other}")),
        "{check}"
    );
    assert!(!detail.contains("dial failed"), "{check}");
    let fix = check["fix"].as_str().unwrap();
    assert!(
        fix.contains("copy the full address the coordinator prints"),
        "{check}"
    );

    // Neither probe left a warning or an error in the coordinator's log.
    coordinator.shutdown().await;
    cancel.cancel();
    let after = complaints();
    assert_eq!(
        after, before,
        "the doctor's probes made the coordinator complain"
    );
}
