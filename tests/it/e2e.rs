//! Jobs through the whole marketplace: real coordinator, real nodes, real containers.

use std::net::TcpStream;
use std::time::Duration;

use kiln_protocol::Seconds;
use kiln_protocol::views::{JobState, MemberState};
use kiln_tests::{buyer, devnet, job_until, reason, run_job};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_completes_with_verified_outputs_and_is_paid_for() {
    let dn = devnet(2).await.unwrap();
    let client = buyer(&dn);
    let done = run_job(&client, dn.workload_spec(&["demo", "7"]))
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.exit_code, Some(0));
    let id = done.job_id;

    // Outputs come back verified (each file against its CID, the manifest against the receipt).
    let dir = tempfile::tempdir().unwrap();
    let cache = kiln_blobs::Store::open_dir(&dir.path().join("cache"), Default::default()).unwrap();
    let out = dir.path().join("out");
    let nodes = kiln_cli::fetch_outputs_verified(&client, &cache, &id, &out, false)
        .await
        .unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].output_cid, done.output_cid.unwrap());
    let result = std::fs::read_to_string(out.join("result.txt")).unwrap();
    assert!(result.contains("seed=7"), "{result}");
    // Deterministic workload: the same seed gives the same matmul checksum on any provider.
    let again = run_job(&client, dn.workload_spec(&["demo", "7"]))
        .await
        .unwrap();
    assert_eq!(again.output_cid, done.output_cid);

    let logs = client.logs(&id).await.unwrap();
    assert!(logs.stdout.contains("demo: done"), "{logs:#?}");

    // Settlement: the buyer paid exactly the recorded cost of both jobs; the rest was refunded.
    let acct = client.account().await.unwrap();
    let cost = done.cost.unwrap().0 + again.cost.unwrap().0;
    assert!(cost > 0);
    assert_eq!(acct.balance.0, 1_000_000_000 - cost, "{acct:#?}");
    assert_eq!(acct.escrowed.0, 0);
    let providers = client.providers().await.unwrap();
    let earned: u64 = providers
        .providers
        .iter()
        // Each devnet provider starts with the faucet grant (so it can stake).
        .map(|p| p.earned.0 - 1_000_000_000)
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
    assert_eq!(done.state, JobState::Failed, "{done:#?}");
    assert_eq!(
        done.exit_code,
        Some(42),
        "the workload exits 42 when connect fails"
    );
    let logs = client.logs(&done.job_id).await.unwrap();
    assert!(logs.stderr.contains("connect failed"), "{logs:#?}");
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_job_keeps_exit_code_and_logs_and_a_slow_one_times_out() {
    let dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let failed = run_job(&client, dn.workload_spec(&["exit", "3", "something broke"]))
        .await
        .unwrap();
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(failed.reason.as_deref(), Some("exited with code 3"));
    let logs = client.logs(&failed.job_id).await.unwrap();
    assert!(logs.stderr.contains("something broke"), "{logs:#?}");

    let mut slow = dn.workload_spec(&["sleep", "60"]);
    slow.resources.timeout = Seconds(2);
    let t0 = std::time::Instant::now();
    let timed_out = run_job(&client, slow).await.unwrap();
    assert_eq!(timed_out.state, JobState::TimedOut, "{timed_out:#?}");
    assert!(
        timed_out
            .reason
            .as_deref()
            .unwrap()
            .contains("wall-clock limit"),
        "{timed_out:#?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(40),
        "killed promptly, took {:?}",
        t0.elapsed()
    );
    // The buyer pays for at most the time it was allowed to run.
    assert!(timed_out.cost.unwrap() <= timed_out.max_cost);
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
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let logs = client.logs(&done.job_id).await.unwrap();
    let expected = blake3::hash(&data).to_hex().to_string();
    assert!(logs.stdout.contains(&expected), "{logs:#?}");

    dn.shutdown().await;
}

/// A devnet of one provider, running a buyer's `sleep 30` job.
async fn running_sleep_job() -> (
    kiln_cli::devnet::Devnet,
    kiln_cli::Client,
    kiln_protocol::JobId,
) {
    let dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let v = client
        .submit(dn.workload_spec(&["sleep", "30"]), None)
        .await
        .unwrap();
    let j = job_until(&client, &v.job_id, |j| j.state == JobState::Running).await;
    assert_eq!(j.state, JobState::Running, "{j:#?}");
    (dn, client, v.job_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_provider_hands_its_running_job_back() {
    let (dn, client, id) = running_sleep_job().await;
    dn.nodes[0].drain(Duration::from_secs(20)).await;
    let j = client.job(&id).await.unwrap();
    assert_eq!(j.state, JobState::Queued, "{j:#?}");
    let events = serde_json::to_string(&j.events).unwrap();
    assert!(
        events.contains("requeued: lost on provider") && events.contains("shut down"),
        "{j:#?}"
    );
    // The draining provider advertises no slots, so the job waits rather than bouncing back.
    let j = job_until(&client, &id, |j| reason(j).contains("excluded by slots")).await;
    assert_eq!(j.state, JobState::Queued, "{j:#?}");
    assert!(
        j.reason.as_deref().unwrap().contains("1 excluded by slots"),
        "{j:#?}"
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
    let id = v.job_id;
    let j = job_until(&client, &id, |j| j.state == JobState::Running).await;
    assert_eq!(j.state, JobState::Running, "the job started: {j:#?}");
    let first = j.provider.unwrap();
    // The provider vanishes: its network and heartbeats stop; its container is orphaned.
    let i = dn.nodes.iter().position(|n| n.provider == first).unwrap();
    dn.node_cancels[i].cancel();
    let done = kiln_cli::wait_for(&client, &id, Duration::from_secs(90), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_ne!(done.provider.unwrap(), first, "completed elsewhere");
    assert_eq!(done.attempts, 2);
    let events = serde_json::to_string(&done.events).unwrap();
    assert!(events.contains("stopped answering (lease of"), "{done:#?}");
    // Each attempt is its own member. The vanished one is released and kept
    // only what its usage reports earned; the second is paid in full for its
    // own run, from zero (nothing the first was paid is deducted), and the
    // buyer paid exactly what the two were paid.
    let (lost, second) = (&done.members[0], &done.members[1]);
    assert_eq!((lost.attempt, second.attempt), (1, 2), "{done:#?}");
    assert_eq!(lost.state, MemberState::Released, "{done:#?}");
    assert_eq!(second.state, MemberState::Delivered, "{done:#?}");
    let wall_ms = second.receipt.as_ref().unwrap().payload.usage.wall_ms;
    let full = kiln_protocol::spec::cost_for(second.price_per_hour, wall_ms).unwrap();
    assert!(full.0 > 0);
    assert_eq!(second.cost, Some(full), "{second:#?}");
    assert_eq!(second.paid, full, "{second:#?}");
    assert_eq!(
        done.cost.unwrap().0,
        lost.paid.0 + second.paid.0,
        "{done:#?}"
    );
    // Reputation comes from what was observed: the one that lost the job
    // falls below a newcomer's 500, the one that delivered rises above it.
    let lost_rep = client
        .provider_audits(&lost.provider)
        .await
        .unwrap()
        .reputation;
    let kept_rep = client
        .provider_audits(&second.provider)
        .await
        .unwrap()
        .reputation;
    assert!(lost_rep < 500 && 500 < kept_rep, "{lost_rep} {kept_rep}");
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
    let id = v.job_id;
    // Queued, not failed, and once the scheduler has looked at it, it says why.
    let j = job_until(&client, &id, |j| reason(j).contains("no provider online")).await;
    assert_eq!(j.state, JobState::Queued, "{j:#?}");
    assert!(
        reason(&j).contains("no provider online"),
        "why-not-placed says why: {j:#?}"
    );

    let provider = kiln_tests::add_node(&mut dn).await.unwrap();
    let done = kiln_cli::wait_for(&client, &id, Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.provider, Some(provider));
    dn.shutdown().await;
}

/// The coordinator dies between sending an offer and hearing the answer:
/// on restart it re-sends the *same* offer (same offer id, so a provider
/// that already has it would not run it twice), the job runs once and is
/// settled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unconfirmed_offer_is_resent_unchanged_after_a_coordinator_restart() {
    use kiln_protocol::NetResponse;
    let (mut dn, cancel, mut rogue) = kiln_tests::devnet_with_rogue().await.unwrap();
    let client = buyer(&dn);
    let v = client
        .submit(dn.workload_spec(&["echo", "once"]), None)
        .await
        .unwrap();
    let id = v.job_id;
    let (first, held) = rogue.hold_offer().await.unwrap();
    assert_eq!(first.payload.job_id, id);

    dn.restart_coordinator().await.unwrap();
    drop(held);
    let again = rogue.next_offer().await.unwrap();
    assert_eq!(again.payload.offer_id, first.payload.offer_id);
    assert_eq!(again.payload.job_id, id);

    let result = kiln_tests::RogueProvider::result_for(&again.payload, &rogue.key).unwrap();
    let r = rogue.deliver(result).await.unwrap();
    assert!(matches!(r, NetResponse::Accepted), "{r:?}");
    let done = kiln_cli::wait_for(&client, &id, Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.attempts, 1, "dispatched once: {done:#?}");
    let acct = client.account().await.unwrap();
    assert_eq!(acct.escrowed.0, 0, "{acct:#?}");
    assert_eq!(
        acct.balance.0 + done.cost.unwrap().0,
        1_000_000_000,
        "paid once: {acct:#?}"
    );
    cancel.cancel();
    dn.shutdown().await;
}

/// The buyer cancels a running job: the answer is `cancelling`, the job
/// never shows `running` again, its container stops, and it ends
/// `cancelled` having paid only for the time its provider was seen running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_running_job_never_shows_running_again() {
    let (dn, client, id) = running_sleep_job().await;
    let answer = client.cancel(&id).await.unwrap();
    assert_eq!(answer.outcome.as_str(), "cancelling", "{answer:?}");
    // Every state seen from now on is cancelling or the end.
    let mut seen = Vec::new();
    let done = job_until(&client, &id, |j| {
        seen.push(j.state);
        j.state.is_terminal()
    })
    .await;
    assert_eq!(done.state, JobState::Cancelled, "{done:#?}");
    assert!(
        seen.iter()
            .all(|s| matches!(s, JobState::Cancelling | JobState::Cancelled)),
        "{seen:?}"
    );
    let states: Vec<JobState> = done.events.iter().map(|e| e.state).collect();
    let at = states
        .iter()
        .position(|s| *s == JobState::Cancelling)
        .expect("a cancelling event");
    assert!(!states[at..].contains(&JobState::Running), "{states:?}");
    let m = &done.members[0];
    assert_eq!(m.state, MemberState::Delivered, "{m:#?}");
    let observed = m.observed_ms.unwrap();
    assert!(observed < 30_000, "stopped early: {m:#?}");
    assert!(
        done.cost.unwrap() <= kiln_protocol::spec::cost_for(m.price_per_hour, observed).unwrap(),
        "{done:#?}"
    );
    assert!(kiln_tests::job_containers(&id).await.unwrap().is_empty());
    dn.shutdown().await;
}
