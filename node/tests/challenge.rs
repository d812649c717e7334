//! A benchmark challenge sent to the real `kiln-node` binary by a libp2p
//! peer playing its coordinator: the node answers with a signed report on
//! the challenge's nonce whose CPU checksum is the exact recomputation and
//! whose samples sit where the nonce and that checksum put them, each with
//! a slice proving it part of the output; and it refuses challenges that
//! are not its coordinator's or are past due. Its advert carries its
//! start-up benchmark, without slices.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_net::NetEvent;
use kiln_protocol::bench::{
    BENCHMARK_VERSION, Inputs, Precision, committed_positions, cpu_output_digest, verify_sample,
};
use kiln_protocol::{
    CapabilityAdvert, Challenge, ChallengeId, ChallengeSizes, Keypair, NetRequest, NetResponse,
    Nonce, ProviderId, Signed, UnixMillis,
};
use tokio_util::sync::CancellationToken;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_answers_its_coordinators_challenge_with_a_verifiable_report() {
    let cancel = CancellationToken::new();
    let common::ScriptedCoordinator {
        key,
        net,
        addr,
        mut events,
    } = common::scripted_coordinator(&cancel).await;
    let coordinator = addr.to_string();
    let state = tempfile::tempdir().unwrap();
    let _node = Killed(
        Command::new(env!("CARGO_BIN_EXE_kiln-node"))
            .args(["run", "--coordinator", &coordinator])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .arg("--state-dir")
            .arg(state.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let advert: CapabilityAdvert = loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("a registration within 60s")
            .expect("network up");
        if let NetEvent::Request { request, reply, .. } = ev {
            let _ = reply.send(NetResponse::Accepted);
            if let NetRequest::Register(a) = request {
                break a.payload;
            }
        }
    };
    // The start-up benchmark is in the advert, and cached.
    let bench = advert
        .benchmark
        .as_ref()
        .expect("advert carries a benchmark");
    assert!(bench.cpu.matmul_mflops > 0);
    assert_eq!(bench.version, BENCHMARK_VERSION);
    assert!(state.path().join("benchmark.json").exists());
    // Keep answering heartbeats in the background.
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let NetEvent::Request { reply, .. } = ev {
                let _ = reply.send(NetResponse::Accepted);
            }
        }
    });

    let addrs: Vec<kiln_net::Addr> = advert
        .listen_addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = ChallengeSizes {
        gpu_matmul_n: 256,
        cpu_matmul_n: 64,
        samples: 8,
        copy_bytes: 1 << 20,
    };
    let challenge = |signer: &Keypair, deadline: UnixMillis| {
        Challenge {
            challenge_id: ChallengeId::random(),
            provider: advert.provider,
            nonce: Nonce::from_bytes([42; 16]),
            issued_at: UnixMillis::now(),
            deadline,
            sizes,
        }
        .clone_signed(signer)
    };
    let send = |c: Signed<Challenge>| {
        let net = net.clone();
        let addrs = addrs.clone();
        async move {
            net.request(advert.provider.peer_id(), addrs, NetRequest::Challenge(c))
                .await
                .unwrap()
        }
    };

    // Not from its coordinator: refused.
    let stranger = Keypair::generate();
    let r = send(challenge(&stranger, UnixMillis::now().plus_secs(60))).await;
    assert!(
        matches!(&r, NetResponse::Rejected { reason } if reason.contains("not from this node's coordinator")),
        "{r:?}"
    );
    // Past its deadline: refused.
    let r = send(challenge(&key, UnixMillis(UnixMillis::now().0 - 1))).await;
    assert!(
        matches!(&r, NetResponse::Rejected { reason } if reason.contains("deadline")),
        "{r:?}"
    );

    // A proper one: answered with a signed, verifiable report.
    let c = challenge(&key, UnixMillis::now().plus_secs(50));
    let id = c.payload.challenge_id;
    let r = send(c).await;
    let NetResponse::ChallengeResponse(resp) = r else {
        panic!("expected a challenge response, got {r:?}");
    };
    let body = resp.verify(UnixMillis::now()).unwrap();
    assert_eq!(ProviderId::from_public_key(&resp.signer), advert.provider);
    assert_eq!(body.challenge_id, id);
    let report = &body.report;
    let nonce = Nonce::from_bytes([42; 16]);
    assert_eq!(report.nonce, nonce);
    assert_eq!(report.cpu.matmul_n, 64);
    assert_eq!(report.version, BENCHMARK_VERSION);
    let checksum = report.cpu.checksum;
    assert_eq!(checksum, cpu_output_digest(&nonce, 64));
    let inputs = Inputs::new(&nonce, Precision::Fp64, 64);
    let positions = committed_positions(&nonce, &checksum, 64, 8);
    assert_eq!(report.cpu.samples.len(), 8);
    assert_eq!(report.slices.cpu.len(), 8);
    for ((s, slice), (r, c)) in report
        .cpu
        .samples
        .iter()
        .zip(&report.slices.cpu)
        .zip(positions)
    {
        assert_eq!((s.row, s.col), (r, c));
        assert_eq!(s.value(), inputs.exact(r, c).value());
        assert_eq!(
            verify_sample(&checksum, Precision::Fp64, 64, s, slice),
            Ok(())
        );
    }
    // One slice per GPU proof's sample (none without a GPU).
    assert_eq!(report.slices.gpus.len(), report.gpus.len());
    cancel.cancel();
}

trait SignAs: Sized + kiln_protocol::SignedMessage {
    fn clone_signed(self, key: &Keypair) -> Signed<Self> {
        Signed::sign(key, self, 120).expect("signing a challenge")
    }
}
impl SignAs for Challenge {}
