//! A provider daemon killed with SIGKILL mid-job: on restart it reaps the
//! orphaned container and tells its coordinator the job was lost.
//!
//! This drives the real `kiln-node` binary against a libp2p peer that plays
//! the coordinator (the node crate never depends on the coordinator crate).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::containers;
use kiln_net::NetEvent;
use kiln_protocol::{
    BuyerId, ByteSize, CapabilityAdvert, Credits, JobId, JobOffer, JobSpec, Keypair, MilliCpu,
    NetRequest, NetResponse, OfferId, ProviderId, Seconds, Signed,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn spawn_node(coordinator: &str, state: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kiln-node"))
        .args([
            "run",
            "--coordinator",
            coordinator,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln-node binary")
}

/// Answers requests until one matches `want`; returns it.
async fn next_request<T>(
    events: &mut mpsc::Receiver<NetEvent>,
    mut want: impl FnMut(&NetRequest) -> Option<T>,
) -> T {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("a request within 60s")
            .expect("network up");
        if let NetEvent::Request { request, reply, .. } = ev {
            let _ = reply.send(NetResponse::Accepted);
            if let Some(t) = want(&request) {
                return t;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_daemon_reaps_its_orphan_and_reports_the_job_lost() {
    let cancel = CancellationToken::new();
    let common::ScriptedCoordinator {
        key,
        net,
        addr,
        mut events,
    } = common::scripted_coordinator(&cancel).await;
    let coordinator = addr.to_string();
    let docker = kiln_docker::connect().await.unwrap();
    let image = kiln_docker::ensure_workload_image(&docker).await.unwrap();
    let state = tempfile::tempdir().unwrap();

    let mut node = spawn_node(&coordinator, state.path());
    let advert: CapabilityAdvert = next_request(&mut events, |r| match r {
        NetRequest::Register(a) => Some(a.payload.clone()),
        _ => None,
    })
    .await;
    let mut spec = JobSpec::new(image.id.clone(), vec!["sleep".into(), "120".into()]);
    spec.resources.cpus = MilliCpu(500);
    spec.resources.memory = ByteSize(64 << 20);
    spec.resources.timeout = Seconds(300);
    let offer = JobOffer {
        offer_id: OfferId::random(),
        job_id: JobId::random(),
        provider: advert.provider,
        owner: BuyerId::new(Keypair::generate().public()),
        spec,
        price_per_hour: Credits(1),
        sources: Vec::new(),
    };
    let addrs = advert
        .listen_addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let answer = net
        .request(
            advert.provider.peer_id(),
            addrs,
            NetRequest::Offer(Signed::sign(&key, offer.clone(), 30).unwrap()),
        )
        .await
        .unwrap();
    assert!(matches!(answer, NetResponse::Accepted), "{answer:?}");
    let mut running = false;
    for _ in 0..100 {
        if containers(&docker, "kiln.job", &offer.job_id.to_string()).await == 1 {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running, "the job's container started");

    // SIGKILL: no chance to clean up. The container is orphaned.
    node.kill().unwrap();
    node.wait().unwrap();
    assert_eq!(
        containers(&docker, "kiln.job", &offer.job_id.to_string()).await,
        1,
        "the orphan outlives the daemon"
    );

    // Restart on the same state: same identity, reaps, and reports the loss.
    let mut node = spawn_node(&coordinator, state.path());
    let lost = next_request(&mut events, |r| match r {
        NetRequest::Lost(l) => Some(l.clone()),
        _ => None,
    })
    .await;
    lost.verify(kiln_protocol::UnixMillis::now()).unwrap();
    assert_eq!(
        ProviderId::from_public_key(&lost.signer),
        advert.provider,
        "signed by the same provider identity"
    );
    assert_eq!(
        (lost.payload.job_id, lost.payload.offer_id),
        (offer.job_id, offer.offer_id)
    );
    assert!(
        lost.payload.reason.contains("restarted"),
        "{}",
        lost.payload.reason
    );
    assert_eq!(
        containers(&docker, "kiln.job", &offer.job_id.to_string()).await,
        0,
        "the orphan was reaped"
    );
    let jobs_dir = state.path().join("jobs");
    assert_eq!(
        std::fs::read_dir(&jobs_dir).map(|d| d.count()).unwrap_or(0),
        0,
        "no job directory left"
    );
    node.kill().unwrap();
    node.wait().unwrap();
    cancel.cancel();
}
