#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
//! The shipped `kiln-coordinator` binary, listening on every interface,
//! prints join commands that another machine can use: the machine's own
//! addresses rather than loopback, and the first one really answers as the
//! coordinator.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kiln_net::multiaddr::Protocol;
use kiln_net::{Addr, NetConfig};
use tokio_util::sync::CancellationToken;

/// Bounds a wait on the child, which may be slow on a loaded machine; it
/// only keeps a broken binary from hanging the test.
const GUARD: Duration = Duration::from_secs(120);

fn ip_of(a: &Addr) -> IpAddr {
    match a.iter().next() {
        Some(Protocol::Ip4(ip)) => IpAddr::V4(ip),
        Some(Protocol::Ip6(ip)) => IpAddr::V6(ip),
        other => panic!("{a}: starts with {other:?}"),
    }
}

#[tokio::test]
async fn a_coordinator_on_every_interface_prints_addresses_other_machines_can_dial() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-coordinator"))
        .args([
            "run",
            "--http",
            "127.0.0.1:0",
            "--p2p",
            "/ip4/0.0.0.0/tcp/0",
        ])
        .args(["--audit-every", "off"])
        .arg("--state-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln-coordinator binary");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.starts_with("providers join with: "))
    {
        match rx.recv_timeout(GUARD) {
            Ok(l) => lines.push(l),
            Err(e) => {
                let _ = child.kill();
                panic!("no join command printed ({e}): {lines:?}");
            }
        }
    }
    let join_of = |l: &str| -> Option<Addr> {
        l.split_once("kiln-node run --coordinator ")
            .map(|(_, a)| a.trim().parse().unwrap())
    };
    let best = lines.iter().find_map(|l| join_of(l)).unwrap();

    // The first address printed reaches the coordinator (the dial
    // completes the Noise handshake with the peer id it names).
    let cancel = CancellationToken::new();
    let (net, _events, ev) = kiln_net::spawn(
        kiln_protocol::Keypair::generate().to_libp2p(),
        NetConfig {
            listen: vec![],
            ..NetConfig::default()
        },
        cancel.clone(),
    )
    .await
    .unwrap();
    tokio::spawn(ev.run());
    let peer = tokio::time::timeout(GUARD, net.dial(best.clone()))
        .await
        .expect("the dial ended")
        .unwrap_or_else(|e| panic!("{best} does not answer: {e}"));
    assert_eq!(Some(peer), kiln_net::peer_of(&best));
    cancel.cancel();

    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    assert!(status.success(), "exit {status:?}: {lines:?}");
    let printed: Vec<IpAddr> = lines
        .iter()
        .filter_map(|l| join_of(l))
        .map(|a| ip_of(&a))
        .collect();

    // What this machine has that another machine could dial (read here
    // apart from the coordinator's own code): up, IPv4, neither loopback
    // nor link-local.
    let real: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| match ip {
            IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
            IpAddr::V6(_) => false,
        })
        .collect();
    if real.is_empty() {
        assert_eq!(printed, [IpAddr::from([127, 0, 0, 1])], "{lines:?}");
    } else {
        assert!(
            printed.iter().all(|ip| !ip.is_loopback()),
            "loopback printed although this machine has {real:?}: {lines:?}"
        );
        for ip in &real {
            assert!(printed.contains(ip), "{ip} not printed: {lines:?}");
        }
        assert_eq!(printed.len(), real.len(), "{lines:?}");
    }
}
