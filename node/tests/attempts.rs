//! Attempts, not jobs: two offers of the same job (a requeued job's new
//! attempt beside an old one still winding down) run side by side, each in
//! its own container and directory; cancelling one leaves the other alone;
//! and `Node::shutdown` stops the survivor, reports it lost while the
//! network is still up, and returns with nothing left on the machine.
//!
//! The node runs in-process against a libp2p peer that plays its
//! coordinator (the node crate never depends on the coordinator crate).

mod common;

use std::time::{Duration, Instant};

use common::containers;

use kiln_net::{Addr, NetEvent};
use kiln_protocol::{
    BuyerId, ByteSize, CancelJob, Credits, JobId, JobOffer, JobSpec, Keypair, MilliCpu, NetRequest,
    NetResponse, OfferId, Seconds, Signed,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

async fn until(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if probe().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attempts_of_one_job_run_side_by_side_and_shutdown_reports_the_survivor_lost() {
    let cancel = CancellationToken::new();
    let common::ScriptedCoordinator {
        key,
        net,
        addr: coordinator,
        mut events,
    } = common::scripted_coordinator(&cancel).await;
    // The scripted coordinator accepts everything and shows the test what came.
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<NetRequest>();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let NetEvent::Request { request, reply, .. } = ev {
                // Seen before answered: what the node waited for is visible
                // to the test by the time the node moves on.
                let _ = seen_tx.send(request);
                let _ = reply.send(NetResponse::Accepted);
            }
        }
    });
    let docker = kiln_docker::connect().await.unwrap();
    let image = kiln_docker::ensure_workload_image(&docker).await.unwrap();

    let state = tempfile::tempdir().unwrap();
    let mut config = kiln_node::NodeConfig::new(coordinator, state.path().to_path_buf());
    config.startup_benchmark = false;
    config.heartbeat = Duration::from_secs(1);
    config.drain_grace = Duration::from_secs(15);
    let node = kiln_node::start(config, cancel.child_token())
        .await
        .unwrap();
    let provider = node.provider;
    let addrs: Vec<Addr> = node.listen_addrs.clone();
    let send = |req: NetRequest| {
        let (net, addrs) = (net.clone(), addrs.clone());
        async move { common::request_new_node(&net, provider, addrs, req).await }
    };

    let mut spec = JobSpec::new(image.id.clone(), vec!["sleep".into(), "120".into()]);
    spec.resources.cpus = MilliCpu(500);
    spec.resources.memory = ByteSize(64 << 20);
    spec.resources.timeout = Seconds(300);
    let job = JobId::random();
    let offer = |offer_id| JobOffer {
        offer_id,
        job_id: job,
        provider,
        owner: BuyerId::new(Keypair::generate().public()),
        spec: spec.clone(),
        price_per_hour: Credits(1),
        sources: Vec::new(),
    };
    let (a, b) = (OfferId::random(), OfferId::random());

    // Both attempts are taken and run at once, each in its own container
    // and directory.
    for o in [a, b] {
        let signed = Signed::sign(&key, offer(o), 30).unwrap();
        let answer = send(NetRequest::Offer(signed)).await;
        assert!(matches!(answer, NetResponse::Accepted), "{answer:?}");
    }
    for o in [a, b] {
        until("both containers run", async || {
            containers(&docker, "kiln.offer", &o.to_string()).await == 1
        })
        .await;
    }
    let dir = |o: OfferId| state.path().join(format!("jobs/{job}-{o}"));
    assert!(dir(a).is_dir() && dir(b).is_dir());

    // A cancel must name the attempt: the job with another offer id finds nothing.
    let cancel_msg = |offer_id| CancelJob {
        job_id: job,
        offer_id,
        provider,
        reason: "test".into(),
    };
    let answer = send(NetRequest::Cancel(
        Signed::sign(&key, cancel_msg(OfferId::random()), 30).unwrap(),
    ))
    .await;
    assert!(
        matches!(&answer, NetResponse::Rejected { reason } if reason.contains("not running here")),
        "{answer:?}"
    );
    // Cancelling attempt a stops a only; its result is delivered as cancelled.
    let answer = send(NetRequest::Cancel(
        Signed::sign(&key, cancel_msg(a), 30).unwrap(),
    ))
    .await;
    assert!(matches!(answer, NetResponse::Accepted), "{answer:?}");
    let result = loop {
        match tokio::time::timeout(Duration::from_secs(60), seen.recv())
            .await
            .expect("a result within 60 s")
            .expect("coordinator up")
        {
            NetRequest::Result(r) => break r,
            _ => continue,
        }
    };
    assert_eq!(result.receipt.payload.offer_id, a);
    assert_eq!(
        result.receipt.payload.outcome,
        kiln_protocol::Outcome::Cancelled
    );
    until("attempt a's container and directory are gone", async || {
        containers(&docker, "kiln.offer", &a.to_string()).await == 0 && !dir(a).exists()
    })
    .await;
    assert_eq!(
        containers(&docker, "kiln.offer", &b.to_string()).await,
        1,
        "attempt b still runs"
    );
    assert!(dir(b).is_dir(), "attempt b keeps its directory");

    // Shutdown: b is stopped and reported lost before the network goes down.
    let runner = node.runner.clone();
    let started = Instant::now();
    node.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "shutdown is bounded: {:?}",
        started.elapsed()
    );
    let lost = loop {
        match seen.try_recv() {
            Ok(NetRequest::Lost(l)) => break l.payload,
            Ok(_) => continue,
            Err(e) => panic!("no lost report arrived before shutdown returned: {e}"),
        }
    };
    assert_eq!((lost.job_id, lost.offer_id), (job, b));
    assert!(lost.reason.contains("shut down"), "{}", lost.reason);
    assert_eq!(
        runner.leftovers(&job).await.unwrap(),
        Vec::<String>::new(),
        "nothing of either attempt is left"
    );
    cancel.cancel();
}
