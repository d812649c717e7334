//! Jobs through the whole marketplace: real coordinator, real nodes, real containers.

use std::net::TcpStream;
use std::time::Duration;

use kiln_protocol::Seconds;
use kiln_tests::{buyer, devnet, job_until, reason, run_job};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_completes_with_verified_outputs_and_is_paid_for() {
    let dn = devnet(2).await.unwrap();
    let client = buyer(&dn);
    let done = run_job(&client, dn.workload_spec(&["demo", "7"]))
        .await
        .unwrap();
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_eq!(done["exit_code"], 0);
    let id = kiln_cli::job_id_of(&done).unwrap();

    // Outputs come back verified (each file against its CID, the manifest against the receipt).
    let dir = tempfile::tempdir().unwrap();
    let cache = kiln_blobs::Store::open_dir(&dir.path().join("cache"), Default::default()).unwrap();
    let out = dir.path().join("out");
    let nodes = kiln_cli::fetch_outputs_verified(&client, &cache, &id, &out, false)
        .await
        .unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        nodes[0].output_cid.to_string(),
        done["output_cid"].as_str().unwrap()
    );
    let result = std::fs::read_to_string(out.join("result.txt")).unwrap();
    assert!(result.contains("seed=7"), "{result}");
    // Deterministic workload: the same seed gives the same matmul checksum on any provider.
    let again = run_job(&client, dn.workload_spec(&["demo", "7"]))
        .await
        .unwrap();
    assert_eq!(again["output_cid"], done["output_cid"]);

    let logs = client.logs(&id).await.unwrap();
    assert!(
        logs["stdout"].as_str().unwrap().contains("demo: done"),
        "{logs:#}"
    );

    // Settlement: the buyer paid exactly the recorded cost of both jobs; the rest was refunded.
    let acct = client.account().await.unwrap();
    let cost = done["cost"].as_u64().unwrap() + again["cost"].as_u64().unwrap();
    assert!(cost > 0);
    assert_eq!(
        acct["balance"].as_u64().unwrap(),
        1_000_000_000 - cost,
        "{acct:#}"
    );
    assert_eq!(acct["escrowed"], 0);
    let providers = client.providers().await.unwrap();
    let earned: u64 = providers["providers"]
        .as_array()
        .unwrap()
        .iter()
        // Each devnet provider starts with the faucet grant (so it can stake).
        .map(|p| p["earned"].as_u64().unwrap() - 1_000_000_000)
        .sum();
    assert!(earned > 0 && earned <= cost, "earned {earned}, cost {cost}");
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_cannot_reach_the_coordinator_port_from_inside_its_container() {
    let dn = devnet(1).await.unwrap();
    let port = dn.coordinator.http_addr.port();
    // Control: from the host the port is open, so a failure inside is the sandbox's doing.
    TcpStream::connect_timeout(&dn.coordinator.http_addr, Duration::from_secs(2))
        .expect("the coordinator port is reachable from the host");
    let client = buyer(&dn);
    let target = format!("127.0.0.1:{port}");
    let done = run_job(&client, dn.workload_spec(&["connect", &target, "2000"]))
        .await
        .unwrap();
    assert_eq!(done["state"], "failed", "{done:#}");
    assert_eq!(
        done["exit_code"], 42,
        "the workload exits 42 when connect fails"
    );
    let logs = client
        .logs(&kiln_cli::job_id_of(&done).unwrap())
        .await
        .unwrap();
    assert!(
        logs["stderr"].as_str().unwrap().contains("connect failed"),
        "{logs:#}"
    );
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_job_keeps_exit_code_and_logs_and_a_slow_one_times_out() {
    let dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let failed = run_job(&client, dn.workload_spec(&["exit", "3", "something broke"]))
        .await
        .unwrap();
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["exit_code"], 3);
    assert_eq!(failed["reason"], "exited with code 3");
    let logs = client
        .logs(&kiln_cli::job_id_of(&failed).unwrap())
        .await
        .unwrap();
    assert!(
        logs["stderr"].as_str().unwrap().contains("something broke"),
        "{logs:#}"
    );

    let mut slow = dn.workload_spec(&["sleep", "60"]);
    slow.resources.timeout = Seconds(2);
    let t0 = std::time::Instant::now();
    let timed_out = run_job(&client, slow).await.unwrap();
    assert_eq!(timed_out["state"], "timed_out", "{timed_out:#}");
    assert!(
        timed_out["reason"]
            .as_str()
            .unwrap()
            .contains("wall-clock limit"),
        "{timed_out:#}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(40),
        "killed promptly, took {:?}",
        t0.elapsed()
    );
    // The buyer pays for at most the time it was allowed to run.
    assert!(timed_out["cost"].as_u64().unwrap() <= timed_out["max_cost"].as_u64().unwrap());
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inputs_are_fetched_by_cid_and_mounted_read_only() {
    let dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let cid = client.upload(data.clone()).await.unwrap();
    let mut spec = dn.workload_spec(&["hash", "/in/data.bin"]);
    spec.inputs
        .push(kiln_protocol::spec::InputSpec::new(cid, "/in/data.bin"));
    let done = run_job(&client, spec).await.unwrap();
    assert_eq!(done["state"], "completed", "{done:#}");
    let logs = client
        .logs(&kiln_cli::job_id_of(&done).unwrap())
        .await
        .unwrap();
    let expected = blake3::hash(&data).to_hex().to_string();
    assert!(
        logs["stdout"].as_str().unwrap().contains(&expected),
        "{logs:#}"
    );

    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_provider_hands_its_running_job_back() {
    let dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let v = client
        .submit(dn.workload_spec(&["sleep", "30"]), None)
        .await
        .unwrap();
    let id = kiln_cli::job_id_of(&v).unwrap();
    let j = job_until(&client, &id, |j| j["state"] == "running").await;
    assert_eq!(j["state"], "running", "{j:#}");
    dn.nodes[0].drain(Duration::from_secs(20)).await;
    let j = client.job(&id).await.unwrap();
    assert_eq!(j["state"], "queued", "{j:#}");
    let events = j["events"].to_string();
    assert!(
        events.contains("requeued: lost on provider") && events.contains("shut down"),
        "{j:#}"
    );
    // The draining provider advertises no slots, so the job waits rather than bouncing back.
    let j = job_until(&client, &id, |j| reason(j).contains("excluded by slots")).await;
    assert_eq!(j["state"], "queued", "{j:#}");
    assert!(
        j["reason"]
            .as_str()
            .unwrap()
            .contains("1 excluded by slots"),
        "{j:#}"
    );
    assert_eq!(
        kiln_tests::leftovers(&dn).await.unwrap(),
        Vec::<String>::new()
    );
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_that_vanishes_mid_job_loses_it_to_another() {
    let dn = devnet(2).await.unwrap();
    let client = buyer(&dn);
    let v = client
        .submit(dn.workload_spec(&["sleep", "3"]), None)
        .await
        .unwrap();
    let id = kiln_cli::job_id_of(&v).unwrap();
    let j = job_until(&client, &id, |j| j["state"] == "running").await;
    assert_eq!(j["state"], "running", "the job started: {j:#}");
    let first = j["provider"].as_str().unwrap().to_string();
    // The provider vanishes: its network and heartbeats stop; its container is orphaned.
    let i = dn
        .nodes
        .iter()
        .position(|n| n.provider.to_string() == first)
        .unwrap();
    dn.node_cancels[i].cancel();
    let done = kiln_cli::wait_for(&client, &id, Duration::from_secs(90), |_| {})
        .await
        .unwrap();
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_ne!(
        done["provider"].as_str().unwrap(),
        first,
        "completed elsewhere"
    );
    assert_eq!(done["attempts"], 2);
    let events = done["events"].to_string();
    assert!(events.contains("stopped answering (lease of"), "{done:#}");
    // Clean up the vanished node's orphan as its restart would.
    dn.nodes[i].runner.reap_orphans().await.unwrap();
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_with_no_fitting_provider_waits_with_a_reason_and_runs_when_one_joins() {
    let mut dn = devnet(0).await.unwrap();
    let client = buyer(&dn);
    let v = client
        .submit(dn.workload_spec(&["echo", "late"]), None)
        .await
        .unwrap();
    let id = kiln_cli::job_id_of(&v).unwrap();
    // Queued, not failed, and once the scheduler has looked at it, it says why.
    let j = job_until(&client, &id, |j| reason(j).contains("no provider online")).await;
    assert_eq!(j["state"], "queued", "{j:#}");
    assert!(
        reason(&j).contains("no provider online"),
        "why-not-placed says why: {j:#}"
    );

    let provider = kiln_tests::add_node(&mut dn).await.unwrap();
    let done = kiln_cli::wait_for(&client, &id, Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_eq!(done["provider"], provider.to_string());
    dn.shutdown().await;
}

/// The coordinator dies between sending an offer and hearing the answer:
/// on restart it re-sends the *same* offer (same offer id, so a provider
/// that already has it would not run it twice), the job runs once and is
/// settled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unconfirmed_offer_is_resent_unchanged_after_a_coordinator_restart() {
    use kiln_protocol::{NetRequest, NetResponse};
    let mut dn = devnet(0).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let addr = dn.coordinator.p2p_addrs[0].clone();
    let mut rogue = kiln_tests::RogueProvider::join(&addr, &cancel)
        .await
        .unwrap();
    let client = buyer(&dn);
    let v = client
        .submit(dn.workload_spec(&["echo", "once"]), None)
        .await
        .unwrap();
    let id = kiln_cli::job_id_of(&v).unwrap();
    let (first, held) = rogue.hold_offer().await.unwrap();
    assert_eq!(first.payload.job_id, id);

    dn.restart_coordinator().await.unwrap();
    drop(held);
    let again = rogue.next_offer().await.unwrap();
    assert_eq!(again.payload.offer_id, first.payload.offer_id);
    assert_eq!(again.payload.job_id, id);

    let result = kiln_tests::RogueProvider::result_for(&again.payload, &rogue.key).unwrap();
    let r = rogue
        .send(NetRequest::Result(Box::new(result)))
        .await
        .unwrap();
    assert!(matches!(r, NetResponse::Accepted), "{r:?}");
    let done = kiln_cli::wait_for(&client, &id, Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_eq!(done["attempts"], 1, "dispatched once: {done:#}");
    let acct = client.account().await.unwrap();
    assert_eq!(acct["escrowed"], 0, "{acct:#}");
    assert_eq!(
        acct["balance"].as_u64().unwrap() + done["cost"].as_u64().unwrap(),
        1_000_000_000,
        "paid once: {acct:#}"
    );
    cancel.cancel();
    dn.shutdown().await;
}
