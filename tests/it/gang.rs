//! Multi-node gang jobs on a devnet: all nodes or none (reserve, confirm
//! all, start; release and requeue on any failure). Real coordinator, real
//! nodes, real containers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kiln_cli::Client;
use kiln_protocol::views::{JobState, JobView, MemberState, MemberView};
use kiln_protocol::{JobId, Manifest, Outcome, ProviderId, Signed};
use kiln_tests::{add_node, buyer, devnet, job_containers, job_until, leftovers, reason};

const GRANT: u64 = 1_000_000_000;

/// Checks one member's receipt and outputs on the buyer's side and returns
/// (provider, what its rank.txt says, its cost).
fn check_member(
    dn: &kiln_cli::devnet::Devnet,
    id: &JobId,
    m: &MemberView,
) -> (ProviderId, String, u64) {
    let provider = m.provider;
    let receipt =
        kiln_cli::check_receipt(m.receipt.as_ref(), id, &provider, Some(&m.offer_id)).unwrap();
    assert_eq!(receipt.payload.outcome, Outcome::Succeeded, "{m:#?}");
    let manifest: Manifest = m.manifest.clone().unwrap();
    assert_eq!(manifest.cid(), receipt.payload.output_cid);
    let entry = manifest
        .entries
        .iter()
        .find(|e| e.path == "rank.txt")
        .unwrap_or_else(|| panic!("no rank.txt in {manifest:?}"));
    let bytes = dn
        .coordinator
        .state
        .blobs
        .get(&entry.cid)
        .unwrap()
        .expect("the coordinator holds every output blob");
    assert_eq!(kiln_protocol::ContentId::of_bytes(&bytes), entry.cid);
    let cost = m.cost.unwrap().0;
    assert_eq!(m.paid.0, cost, "paid in full: {m:#?}");
    (provider, String::from_utf8(bytes).unwrap(), cost)
}

/// Waits until `ok` holds; panics naming `what` otherwise.
async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let held = kiln_tests::eventually(|| std::future::ready(ok()), |held| *held).await;
    assert!(held, "never: {what}");
}

/// `node` reserved a rank of gang `id`, then released it (the release
/// reaches it after the coordinator moved on) and never started it.
async fn reserved_then_released_without_starting(node: &kiln_node::Node, id: &JobId) {
    eventually("the node released its reservation", || {
        node.gang_reservations() == 0
            && node
                .gang_events(id)
                .iter()
                .any(|e| e.contains("released: "))
    })
    .await;
    let ev = node.gang_events(id);
    assert!(ev.iter().any(|e| e.contains("reserved rank")), "{ev:?}");
    assert!(!ev.iter().any(|e| e.ends_with(": started")), "{ev:?}");
}

/// A node joins: the queued gang `id` runs on node `a` and the newcomer,
/// and completes; then the devnet is shut down.
async fn completes_on_a_and_a_newcomer(
    mut dn: kiln_cli::devnet::Devnet,
    client: &Client,
    id: &JobId,
    a: ProviderId,
) {
    let c = add_node(&mut dn).await.unwrap();
    let done = kiln_cli::wait_for(client, id, Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let providers = check_completed_gang(&dn, client, id).await;
    assert_eq!(providers, BTreeSet::from([a, c]));
    dn.shutdown().await;
}

/// Submits `spec` as a gang of two nodes; returns its id.
async fn submit_gang(client: &Client, mut spec: kiln_protocol::JobSpec) -> JobId {
    spec.resources.gang = 2;
    client.submit(spec, None).await.unwrap().job_id
}

async fn earned(client: &Client, p: &ProviderId) -> u64 {
    let v = client.providers().await.unwrap();
    v.providers
        .iter()
        .find(|x| x.provider == *p)
        .map(|x| x.earned.0)
        .unwrap()
}

/// Both members of a completed 2-gang ran (their rank files), delivered
/// verified receipts, and were each paid for their own time.
async fn check_completed_gang(
    dn: &kiln_cli::devnet::Devnet,
    client: &Client,
    id: &JobId,
) -> BTreeSet<ProviderId> {
    let job = client.job(id).await.unwrap();
    assert_eq!(job.state, JobState::Completed, "{job:#?}");
    let members = kiln_cli::gang_members(&job);
    assert_eq!(members.len(), 2, "{job:#?}");
    let mut providers = BTreeSet::new();
    let mut total = 0;
    for (rank, m) in members.iter().enumerate() {
        assert_eq!(m.rank, rank as u32);
        assert_eq!(m.state, MemberState::Delivered);
        let (p, rank_txt, cost) = check_member(dn, id, m);
        assert!(
            rank_txt.starts_with(&format!("rank={rank} size=2 peers=0=")),
            "{rank_txt}"
        );
        providers.insert(p);
        total += cost;
        // Per-node settlement: each provider got its own cost, less the fee.
        let fee = kiln_contracts::fee_for(kiln_protocol::Credits(cost), 100).0;
        assert!(cost > 0);
        assert!(
            earned(client, &p).await >= GRANT + cost - fee,
            "provider {p} was not paid for rank {rank}"
        );
    }
    assert_eq!(providers.len(), 2, "two distinct nodes");
    // Both ranks name the same two peers, in rank order.
    assert_eq!(job.cost.map(|c| c.0), Some(total), "{job:#?}");
    // The job row carries the lead member's receipt, which the client verifies.
    kiln_cli::verify_receipt(&job, None).unwrap();
    providers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gang_of_two_starts_on_both_nodes_and_each_node_is_paid_for_its_own_time() {
    let dn = devnet(2).await.unwrap();
    let client = buyer(&dn);
    let mut spec = dn.workload_spec(&["gang"]);
    spec.resources.gang = 2;
    let done = kiln_tests::run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let id = done.job_id;
    let providers = check_completed_gang(&dn, &client, &id).await;
    let nodes: BTreeSet<ProviderId> = dn.nodes.iter().map(|n| n.provider).collect();
    assert_eq!(providers, nodes);
    // `kiln job get` brings back every rank's outputs, each verified
    // against its own member's signed receipt.
    let dir = tempfile::tempdir().unwrap();
    let cache = kiln_blobs::Store::open_dir(&dir.path().join("cache"), Default::default()).unwrap();
    let out = dir.path().join("out");
    let got = kiln_cli::fetch_outputs_verified(&client, &cache, &id, &out, false)
        .await
        .unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    for (rank, node) in got.iter().enumerate() {
        assert_eq!(node.rank, Some(rank as u32));
        assert_eq!(node.dir, out.join(format!("rank-{rank}")));
        let txt = std::fs::read_to_string(node.dir.join("rank.txt")).unwrap();
        assert!(txt.starts_with(&format!("rank={rank} size=2 ")), "{txt}");
    }
    assert_ne!(got[0].provider, got[1].provider);
    // Each rank's logs, by rank; a rank the gang does not have is refused.
    for (rank, node) in got.iter().enumerate() {
        let logs = client.rank_logs(&id, rank as u32).await.unwrap();
        assert!(
            logs.stdout.contains(&format!("gang: rank={rank} size=2")),
            "{logs:#?}"
        );
        assert_eq!(logs.provider, node.provider);
    }
    match client.rank_logs(&id, 2).await {
        Err(kiln_cli::ClientError::Api { status, field, .. }) => {
            assert_eq!((status, field.as_deref()), (400, Some("rank")));
        }
        other => panic!("rank 2 of a 2-gang: {other:?}"),
    }
    for n in &dn.nodes {
        let ev = n.gang_events(&id);
        assert!(ev.iter().any(|e| e.contains("reserved rank")), "{ev:?}");
        assert!(ev.iter().any(|e| e.ends_with(": started")), "{ev:?}");
        assert_eq!(n.gang_reservations(), 0);
    }
    // The buyer paid exactly the job's cost; the rest of the escrow (locked
    // for both nodes) came back.
    let acct = client.account().await.unwrap();
    assert_eq!(acct.balance.0, GRANT - done.cost.unwrap().0, "{acct:#?}");
    assert_eq!(acct.escrowed.0, 0);

    // One member failing fails the job (the other is stopped or finishes;
    // either way both are settled).
    let mut spec = dn.workload_spec(&["gang", "1"]);
    spec.resources.gang = 2;
    let failed = kiln_tests::run_job(&client, spec).await.unwrap();
    assert_eq!(failed.state, JobState::Failed, "{failed:#?}");
    assert!(
        failed
            .reason
            .as_deref()
            .unwrap()
            .contains("gang member rank 1"),
        "{failed:#?}"
    );
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gang_whose_member_vanishes_before_the_start_runs_nowhere_and_later_on_a_fitting_pair() {
    let mut dn = devnet(2).await.unwrap();
    let client = buyer(&dn);
    let (a, b) = (dn.nodes[0].provider, dn.nodes[1].provider);
    // Node b's machine vanishes: its network stops at once, but its lease
    // has not run out, so the scheduler still picks it for the gang.
    dn.node_cancels[1].cancel();
    let id = submit_gang(&client, dn.workload_spec(&["gang"])).await;

    // Watch Docker for any container of this job while it is dispatched.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (seen, stop) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(cs) = job_containers(&id).await {
                    seen.lock().unwrap().extend(cs);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // The reservation on a is released and the job goes back to the queue,
    // with the reason in its events.
    let requeued_with_reason = |j: &JobView| {
        let requeued = j.events.iter().any(|e| {
            e.state == JobState::Queued
                && e.detail
                    .as_deref()
                    .is_some_and(|d| d.starts_with("requeued: gang member"))
        });
        requeued && j.state == JobState::Queued && reason(j).contains("gang=2")
    };
    let job = job_until(&client, &id, requeued_with_reason).await;
    assert!(
        requeued_with_reason(&job),
        "not requeued with a why-not line: {job:#?}"
    );
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    assert!(
        seen.lock().unwrap().is_empty(),
        "a container ran for a gang that never started: {:?}",
        seen.lock().unwrap()
    );
    let events = serde_json::to_string(&job.events).unwrap();
    assert!(
        events.contains(&b.short()),
        "names the vanished member: {events}"
    );
    assert!(
        job.reason.as_deref().unwrap().contains("1 fit but gang=2"),
        "{job:#?}"
    );
    // Node a reserved and released; neither node started anything.
    // The release reaches node a (the coordinator does not wait for it).
    reserved_then_released_without_starting(&dn.nodes[0], &id).await;
    assert!(
        !dn.nodes[1]
            .gang_events(&id)
            .iter()
            .any(|e| e.ends_with(": started"))
    );
    let first = &job.gang.as_ref().unwrap()[..2];
    assert!(
        first.iter().all(|m| m.state == MemberState::Released),
        "{first:#?}"
    );
    // Node a's slot is free again: an ordinary job runs there now.
    let solo = kiln_tests::run_job(&client, dn.workload_spec(&["echo", "solo"]))
        .await
        .unwrap();
    assert_eq!(solo.state, JobState::Completed, "{solo:#?}");
    assert_eq!(solo.provider, Some(a));

    // A fitting pair appears: the gang runs on a and the newcomer.
    let c = add_node(&mut dn).await.unwrap();
    let done = kiln_cli::wait_for(&client, &id, Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let providers = check_completed_gang(&dn, &client, &id).await;
    assert_eq!(providers, BTreeSet::from([a, c]));
    assert!(done.attempts >= 2);
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gang_leaves_nothing_behind_on_its_nodes() {
    let dn = devnet(2).await.unwrap();
    let client = buyer(&dn);
    let mut spec = dn.workload_spec(&["gang"]);
    spec.resources.gang = 2;
    let done = kiln_tests::run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let id = done.job_id;
    assert!(job_containers(&id).await.unwrap().is_empty());
    let left = leftovers(&dn).await.unwrap();
    assert!(left.is_empty(), "{left:#?}");
    dn.shutdown().await;
}

/// The node's side of the protocol, driven by a scripted coordinator peer:
/// a gang offer reserves a slot but starts nothing; with no start within
/// the hold the node releases it by itself, and a late start is refused;
/// a start after a reservation runs the member with its rank; a release
/// gives the slot back; a gang job offered as an ordinary offer is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_reserves_gang_members_and_releases_them_by_itself_without_a_start() {
    use kiln_protocol::{
        BuyerId, Credits, GangMember, GangOffer, GangRelease, GangStart, JobOffer, Keypair,
        NetRequest, NetResponse, OfferId,
    };
    use kiln_tests::TestCoordinatorPeer;
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut coord = TestCoordinatorPeer::start(&cancel).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut cfg = kiln_node::NodeConfig::new(coord.addr(), state.path().to_path_buf());
    cfg.heartbeat = Duration::from_secs(1);
    cfg.slots = 1;
    cfg.startup_benchmark = false;
    let node = kiln_node::start(cfg, cancel.clone()).await.unwrap();
    let advert = coord.accept_registration().await.unwrap();
    let docker = kiln_docker::connect().await.unwrap();
    let image = kiln_docker::ensure_workload_image(&docker).await.unwrap();
    let peer = ProviderId::from_public_key(&Keypair::generate().public());
    let gang_offer = |hold_ms: u64| {
        let mut spec = kiln_protocol::JobSpec::new(image.id.clone(), vec!["gang".into()]);
        spec.resources.gang = 2;
        spec.resources.cpus = kiln_protocol::MilliCpu(500);
        spec.resources.memory = kiln_protocol::ByteSize(64 << 20);
        GangOffer {
            offer: JobOffer {
                offer_id: OfferId::random(),
                job_id: JobId::random(),
                provider: node.provider,
                owner: BuyerId::new(Keypair::generate().public()),
                spec,
                price_per_hour: Credits(1),
                sources: Vec::new(),
            },
            rank: 1,
            size: 2,
            members: vec![
                GangMember {
                    rank: 0,
                    provider: peer,
                    listen_addrs: vec![],
                },
                GangMember {
                    rank: 1,
                    provider: node.provider,
                    listen_addrs: vec![],
                },
            ],
            hold_ms,
        }
    };
    let sign = |k: &Keypair, g: GangOffer| Signed::sign(k, g, 60).unwrap();
    let refused = |r: NetResponse| match r {
        NetResponse::Rejected { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };

    // 1. Reserved, never started: released by the node when the hold runs out.
    let g = gang_offer(300);
    let (job, offer_id) = (g.offer.job_id, g.offer.offer_id);
    let r = coord
        .request(&advert, NetRequest::GangOffer(sign(&coord.key, g.clone())))
        .await
        .unwrap();
    assert!(matches!(r, NetResponse::Accepted), "{r:?}");
    assert_eq!(node.gang_reservations(), 1);
    eventually("the node released the expired hold", || {
        node.gang_reservations() == 0
    })
    .await;
    let ev = node.gang_events(&job);
    assert!(ev.iter().any(|e| e.contains("expired")), "{ev:?}");
    let start = GangStart {
        job_id: job,
        offer_id,
        provider: node.provider,
    };
    let why = refused(
        coord
            .request(
                &advert,
                NetRequest::GangStart(Signed::sign(&coord.key, start, 60).unwrap()),
            )
            .await
            .unwrap(),
    );
    assert!(why.contains("expired"), "{why}");
    // The same offer again is not taken again.
    let why = refused(
        coord
            .request(&advert, NetRequest::GangOffer(sign(&coord.key, g)))
            .await
            .unwrap(),
    );
    assert!(why.contains("not taken again"), "{why}");
    assert!(job_containers(&job).await.unwrap().is_empty());
    assert!(
        !node
            .gang_events(&job)
            .iter()
            .any(|e| e.ends_with(": started"))
    );

    // 2. Released by the coordinator: the slot is free again at once.
    let g = gang_offer(60_000);
    let (job2, offer2) = (g.offer.job_id, g.offer.offer_id);
    assert!(matches!(
        coord
            .request(&advert, NetRequest::GangOffer(sign(&coord.key, g)))
            .await
            .unwrap(),
        NetResponse::Accepted
    ));
    // The one slot is reserved: another gang offer does not fit.
    let why = refused(
        coord
            .request(
                &advert,
                NetRequest::GangOffer(sign(&coord.key, gang_offer(60_000))),
            )
            .await
            .unwrap(),
    );
    assert!(why.contains("slots busy"), "{why}");
    // The next attempt of the same job (a new offer id) is not held back by
    // this one (attempts are keyed by offer id); only the one slot is taken.
    let mut next_attempt = gang_offer(60_000);
    next_attempt.offer.job_id = job2;
    let offer3 = next_attempt.offer.offer_id;
    let why = refused(
        coord
            .request(
                &advert,
                NetRequest::GangOffer(sign(&coord.key, next_attempt.clone())),
            )
            .await
            .unwrap(),
    );
    assert!(why.contains("slots busy"), "{why}");
    let release = |offer_id| GangRelease {
        job_id: job2,
        offer_id,
        provider: node.provider,
        reason: "rank 0 refused".into(),
    };
    let released = coord
        .request(
            &advert,
            NetRequest::GangRelease(Signed::sign(&coord.key, release(offer2), 60).unwrap()),
        )
        .await
        .unwrap();
    assert!(matches!(released, NetResponse::Accepted), "{released:?}");
    assert_eq!(node.gang_reservations(), 0);
    let ev = node.gang_events(&job2);
    assert!(
        ev.iter().any(|e| e.contains("released: rank 0 refused")),
        "{ev:?}"
    );
    // Now the next attempt is taken; released too, the slot is free again.
    let r = coord
        .request(
            &advert,
            NetRequest::GangOffer(sign(&coord.key, next_attempt)),
        )
        .await
        .unwrap();
    assert!(matches!(r, NetResponse::Accepted), "{r:?}");
    let released = coord
        .request(
            &advert,
            NetRequest::GangRelease(Signed::sign(&coord.key, release(offer3), 60).unwrap()),
        )
        .await
        .unwrap();
    assert!(matches!(released, NetResponse::Accepted), "{released:?}");
    assert_eq!(node.gang_reservations(), 0);

    // 3. Signed by someone else, or addressed elsewhere: refused.
    let why = refused(
        coord
            .request(
                &advert,
                NetRequest::GangOffer(sign(&Keypair::generate(), gang_offer(1000))),
            )
            .await
            .unwrap(),
    );
    assert!(why.contains("not from this node's coordinator"), "{why}");
    let mut elsewhere = gang_offer(1000);
    elsewhere.offer.provider = peer;
    let why = refused(
        coord
            .request(&advert, NetRequest::GangOffer(sign(&coord.key, elsewhere)))
            .await
            .unwrap(),
    );
    assert!(why.contains("addressed to provider"), "{why}");
    // A gang job as an ordinary offer: refused (it must be reserved first).
    let plain = gang_offer(1000).offer;
    let why = refused(
        coord
            .request(
                &advert,
                NetRequest::Offer(Signed::sign(&coord.key, plain, 60).unwrap()),
            )
            .await
            .unwrap(),
    );
    assert!(why.contains("must come as a gang offer"), "{why}");

    // 4. Reserved, then started: the member runs with its rank.
    let g = gang_offer(60_000);
    let (job3, offer3) = (g.offer.job_id, g.offer.offer_id);
    assert!(matches!(
        coord
            .request(&advert, NetRequest::GangOffer(sign(&coord.key, g)))
            .await
            .unwrap(),
        NetResponse::Accepted
    ));
    let start = GangStart {
        job_id: job3,
        offer_id: offer3,
        provider: node.provider,
    };
    let r = coord
        .request(
            &advert,
            NetRequest::GangStart(Signed::sign(&coord.key, start, 60).unwrap()),
        )
        .await
        .unwrap();
    assert!(matches!(r, NetResponse::Accepted), "{r:?}");
    let ev = node.gang_events(&job3);
    assert!(ev.iter().any(|e| e.ends_with(": started")), "{ev:?}");
    // Its result comes to the (scripted) coordinator, signed by the node.
    let result = coord.next_result().await.unwrap();
    assert_eq!(result.receipt.payload.offer_id, offer3);
    assert_eq!(result.receipt.payload.outcome, Outcome::Succeeded);
    // The workload fails unless KILN_GANG_RANK/SIZE are set; its stdout
    // names the rank and the peers Kiln gave it.
    if let Some(stdout) = result
        .blobs
        .iter()
        .find(|b| b.cid == result.receipt.payload.stdout_cid)
    {
        let out = String::from_utf8_lossy(&stdout.bytes);
        assert!(
            out.contains(&format!("rank=1 size=2 peers=0={peer},1={}", node.provider)),
            "{out}"
        );
    }
    cancel.cancel();
    for t in node.tasks {
        let _ = t.await;
    }
}

/// One chosen node refuses its reservation (its owner came back): the other
/// node's reservation is released, nothing starts anywhere, and the job
/// waits in the queue saying why; a fitting pair later runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gang_member_that_refuses_leaves_the_other_released_and_the_job_queued() {
    let dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let a = dn.nodes[0].provider;
    let cancel = tokio_util::sync::CancellationToken::new();
    let addr = dn.coordinator.p2p_addrs[0].clone();
    let mut rogue = kiln_tests::RogueProvider::join(&addr, &cancel)
        .await
        .unwrap();
    let id = submit_gang(&client, dn.workload_spec(&["gang"])).await;
    let offer = rogue
        .refuse_gang_offer("the owner is using this machine")
        .await
        .unwrap();
    let g = &offer.payload;
    assert_eq!(
        (g.offer.job_id, g.offer.provider, g.size),
        (id, rogue.id, 2)
    );
    assert_eq!(g.members[g.rank as usize].provider, rogue.id);

    let job = job_until(&client, &id, |j| {
        j.state == JobState::Queued && reason(j).contains("1 fit but gang=2")
    })
    .await;
    assert!(
        reason(&job).contains("1 fit but gang=2"),
        "not requeued with a why-not line: {job:#?}"
    );
    let events = serde_json::to_string(&job.events).unwrap();
    assert!(
        events.contains("refused: the owner is using this machine"),
        "{events}"
    );
    // The release reaches node a (the coordinator does not wait for it).
    reserved_then_released_without_starting(&dn.nodes[0], &id).await;
    assert!(job_containers(&id).await.unwrap().is_empty());
    cancel.cancel();

    completes_on_a_and_a_newcomer(dn, &client, &id, a).await;
}

/// The coordinator dies while a gang is reserving (one member has reserved,
/// the other has not answered): on restart it releases the member that
/// reserved, requeues the job saying why, and the gang later runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_restart_while_a_gang_reserves_releases_it_and_requeues() {
    let mut dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let a = dn.nodes[0].provider;
    let cancel = tokio_util::sync::CancellationToken::new();
    let addr = dn.coordinator.p2p_addrs[0].clone();
    let mut rogue = kiln_tests::RogueProvider::join(&addr, &cancel)
        .await
        .unwrap();
    let id = submit_gang(&client, dn.workload_spec(&["gang"])).await;
    // The rogue holds its gang offer unanswered, so the gang stays reserving.
    let (offer, held) = rogue.hold_gang_offer().await.unwrap();
    assert_eq!(offer.payload.offer.job_id, id);
    eventually("node a reserved its rank", || {
        dn.nodes[0].gang_reservations() == 1
    })
    .await;

    dn.restart_coordinator().await.unwrap();
    // The rogue's machine is gone too; only node a remains.
    drop(held);
    cancel.cancel();

    let restarted = "the coordinator restarted while the gang reserved";
    let events_of = |j: &JobView| serde_json::to_string(&j.events).unwrap();
    let job = job_until(&client, &id, |j| events_of(j).contains(restarted)).await;
    assert!(events_of(&job).contains(restarted), "{job:#?}");
    assert_ne!(job.state, JobState::Running, "{job:#?}");
    reserved_then_released_without_starting(&dn.nodes[0], &id).await;
    assert!(job_containers(&id).await.unwrap().is_empty());

    // A second node joins the restarted coordinator: the gang runs on a and it.
    completes_on_a_and_a_newcomer(dn, &client, &id, a).await;
}

/// A member told to stop (the buyer cancelled) vanishes without delivering:
/// once its lease is over it is released unpaid and the job ends cancelled,
/// with the other member paid and the rest of the escrow refunded, instead
/// of staying `running` forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_vanishes_while_stopping_does_not_hold_the_job_open() {
    use kiln_protocol::{NetRequest, NetResponse};
    let dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let cancel = tokio_util::sync::CancellationToken::new();
    let addr = dn.coordinator.p2p_addrs[0].clone();
    let mut rogue = kiln_tests::RogueProvider::join(&addr, &cancel)
        .await
        .unwrap();
    let id = submit_gang(&client, dn.workload_spec(&["sleep", "60"])).await;
    // The rogue reserves and starts like a node would, then goes silent.
    let (_, reply) = rogue.hold_gang_offer().await.unwrap();
    let _ = reply.send(NetResponse::Accepted);
    let (_, reply) = rogue
        .next_request("gang start", |r| match r {
            NetRequest::GangStart(s) => Ok(s),
            other => Err(other),
        })
        .await
        .unwrap();
    let _ = reply.send(NetResponse::Accepted);
    let j = job_until(&client, &id, |j| j.state == JobState::Running).await;
    assert_eq!(j.state, JobState::Running, "{j:#?}");

    client.cancel(&id).await.unwrap();
    cancel.cancel();
    drop(rogue);
    let done = kiln_cli::wait_for(&client, &id, Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Cancelled, "{done:#?}");
    let members = kiln_cli::gang_members(&done);
    let a = dn.nodes[0].provider;
    for m in &members {
        if m.provider == a {
            assert_eq!(m.state, MemberState::Delivered, "{m:#?}");
            assert_eq!(Some(m.paid), m.cost, "{m:#?}");
        } else {
            assert_eq!(m.state, MemberState::Released, "{m:#?}");
            assert!(
                m.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("lost while stopping")),
                "{m:#?}"
            );
        }
    }
    let acct = client.account().await.unwrap();
    assert_eq!(acct.escrowed.0, 0, "{acct:#?}");
    let paid: u64 = members.iter().map(|m| m.paid.0).sum();
    assert_eq!(acct.balance.0, GRANT - paid, "{acct:#?}");
    assert!(job_containers(&id).await.unwrap().is_empty());
    dn.shutdown().await;
}

/// The buyer cancels a running gang: every member is stopped, each is paid
/// for the time it ran, and the rest of the escrow comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_gang_stops_every_member_and_pays_each_for_its_time() {
    let dn = devnet(2).await.unwrap();
    let client = buyer(&dn);
    let id = submit_gang(&client, dn.workload_spec(&["sleep", "60"])).await;
    let j = job_until(&client, &id, |j| j.state == JobState::Running).await;
    assert_eq!(j.state, JobState::Running, "never ran: {j:#?}");
    client.cancel(&id).await.unwrap();
    let done = kiln_cli::wait_for(&client, &id, Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Cancelled, "{done:#?}");
    let members = kiln_cli::gang_members(&done);
    assert_eq!(members.len(), 2);
    let mut total = 0;
    for m in &members {
        assert_eq!(m.state, MemberState::Delivered, "{m:#?}");
        assert_eq!(m.outcome, Some(Outcome::Cancelled), "{m:#?}");
        assert_eq!(Some(m.paid), m.cost, "{m:#?}");
        total += m.cost.unwrap().0;
    }
    assert_eq!(done.cost.map(|c| c.0), Some(total));
    let acct = client.account().await.unwrap();
    assert_eq!(acct.balance.0, GRANT - total, "{acct:#?}");
    assert_eq!(acct.escrowed.0, 0);
    assert!(job_containers(&id).await.unwrap().is_empty());
    dn.shutdown().await;
}

/// A member's machine vanishes while the gang runs: once its lease is over
/// the other member is stopped (and paid for its time) and the job goes
/// back to the queue, never left half-running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gang_that_loses_a_member_mid_run_stops_the_other_and_is_requeued() {
    let dn = devnet(2).await.unwrap();
    let client = buyer(&dn);
    let mut spec = dn.workload_spec(&["sleep", "120"]);
    spec.resources.timeout = kiln_protocol::Seconds(300);
    let id = submit_gang(&client, spec).await;
    let j = job_until(&client, &id, |j| j.state == JobState::Running).await;
    assert_eq!(j.state, JobState::Running, "never ran: {j:#?}");
    dn.node_cancels[1].cancel();
    let a_id = dn.nodes[0].provider;
    let requeued_with_a_stopped = |j: &JobView| {
        let a_done = j.gang.as_ref().is_some_and(|ms| {
            ms.iter()
                .take(2)
                .any(|m| m.provider == a_id && m.state == MemberState::Delivered)
        });
        j.state == JobState::Queued && a_done
    };
    let job = job_until(&client, &id, requeued_with_a_stopped).await;
    assert!(
        requeued_with_a_stopped(&job),
        "not requeued with the other member stopped: {job:#?}"
    );
    let events = serde_json::to_string(&job.events).unwrap();
    assert!(events.contains("lost"), "{events}");
    let a = job
        .gang
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.provider == a_id)
        .unwrap()
        .clone();
    assert_eq!(a.outcome, Some(Outcome::Cancelled), "{a:#?}");
    assert_eq!(Some(a.paid), a.cost, "{a:#?}");
    // Node a's container is gone (node b's "machine" vanished; in this
    // one-process devnet its container lives on until its own timeout).
    let job_label = id.to_string();
    let on_a = dn.nodes[0].runner.containers().await.unwrap();
    assert!(
        !on_a.iter().any(|c| c
            .labels
            .as_ref()
            .and_then(|l| l.get(kiln_node::runner::LABEL_JOB))
            == Some(&job_label)),
        "{on_a:?}"
    );
    dn.shutdown().await;
}
