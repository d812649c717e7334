//! Nobody is paid for time the coordinator did not see.
//!
//! Each test is what a provider acting in bad faith would try, through a
//! real coordinator: a `RogueProvider` (a real libp2p peer built on the
//! protocol crate) signs whatever it likes, and the buyer's and provider's
//! balances are read back from the public ledger.

use std::time::{Duration, Instant};

use kiln_cli::Client;
use kiln_cli::devnet::DevnetOptions;
use kiln_protocol::spec::cost_for;
use kiln_protocol::views::{JobState, JobView, MemberState};
use kiln_protocol::{Credits, JobId, JobLost, NetRequest, NetResponse, ProviderId, Signed};
use kiln_tests::{RogueProvider, devnet, devnet_with, job_until};
use tokio_util::sync::CancellationToken;

/// A price high enough that every millisecond shows: 1 credit per second
/// per CPU.
const PRICE: Credits = Credits(3_600_000_000);

fn spec(dn: &kiln_cli::devnet::Devnet, timeout_s: u64) -> kiln_protocol::JobSpec {
    let mut s = dn.workload_spec(&["echo", "billed"]);
    s.resources.timeout = kiln_protocol::Seconds(timeout_s);
    s.resources.max_price_per_hour = PRICE;
    s
}

/// A coordinator whose only provider is a rogue at [`PRICE`], and a buyer.
async fn market(
    dn: kiln_cli::devnet::Devnet,
) -> (
    kiln_cli::devnet::Devnet,
    CancellationToken,
    RogueProvider,
    Client,
) {
    let cancel = CancellationToken::new();
    let addr = dn.coordinator.p2p_addrs[0].clone();
    let rogue = RogueProvider::join_priced(&addr, &cancel, PRICE)
        .await
        .unwrap();
    let client = kiln_tests::buyer(&dn);
    (dn, cancel, rogue, client)
}

async fn balance(client: &Client, provider: &ProviderId) -> u64 {
    client
        .ledger_balances()
        .await
        .unwrap()
        .balances
        .get(&format!("provider:{provider}"))
        .map(|c| c.0)
        .unwrap_or(0)
}

async fn state_is(client: &Client, id: &JobId, want: JobState) -> JobView {
    job_until(client, id, |j| j.state == want).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receipt_claiming_the_whole_timeout_is_paid_only_for_the_time_observed() {
    let (dn, cancel, mut rogue, client) = market(devnet(0).await.unwrap()).await;
    let job = client.submit(spec(&dn, 600), None).await.unwrap();
    let before = balance(&client, &rogue.id).await;

    // Accept, do nothing for a second, then sign a receipt that says the
    // job ran for its whole ten-minute timeout.
    let offer = rogue.next_offer().await.unwrap().payload;
    let accepted = Instant::now();
    state_is(&client, &job.job_id, JobState::Running).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let claim = RogueProvider::result_claiming(&offer, &rogue.key, 600_000).unwrap();
    let answer = rogue
        .send(NetRequest::Result(Box::new(claim)))
        .await
        .unwrap();
    // Everything the coordinator observed lies inside this window.
    let window_ms = accepted.elapsed().as_millis() as u64;
    assert!(matches!(answer, NetResponse::Accepted), "{answer:?}");

    let done = state_is(&client, &job.job_id, JobState::Completed).await;
    let bound = cost_for(offer.price_per_hour, window_ms).unwrap();
    let full = cost_for(offer.price_per_hour, 600_000).unwrap();
    let cost = done.cost.unwrap();
    assert!(
        cost <= bound,
        "paid {cost} for a 10-minute claim after {window_ms} ms (bound {bound}): {done:#?}"
    );
    assert!(cost.0 > 0 && cost < full, "{cost} vs full {full}");
    let m = &done.members[0];
    assert_eq!(m.paid, cost);
    assert!(m.observed_ms.unwrap() <= window_ms, "{m:#?}");
    // The provider's gain is that payment less the marketplace fee.
    let gained = balance(&client, &rogue.id).await - before;
    assert!(
        gained <= cost.0 && gained > 0,
        "gained {gained}, paid {cost}"
    );
    cancel.cancel();
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_sent_before_the_job_started_earns_nothing() {
    let (dn, cancel, mut rogue, client) = market(devnet(0).await.unwrap()).await;
    let job = client.submit(spec(&dn, 600), None).await.unwrap();
    let before = balance(&client, &rogue.id).await;

    // Hold the offer unanswered and send a result claiming the timeout.
    let (offer, reply) = rogue.hold_offer().await.unwrap();
    let claim = RogueProvider::result_claiming(&offer.payload, &rogue.key, 600_000).unwrap();
    let answer = rogue
        .send(NetRequest::Result(Box::new(claim.clone())))
        .await
        .unwrap();
    assert!(
        !matches!(answer, NetResponse::Accepted),
        "a result before the start was accepted: {answer:?}"
    );
    let j = client.job(&job.job_id).await.unwrap();
    assert_eq!(j.state, JobState::Dispatched, "{j:#?}");
    assert_eq!(j.members[0].state, MemberState::Offered);
    assert_eq!(j.members[0].paid, Credits(0));
    assert_eq!(balance(&client, &rogue.id).await, before);

    // Refusing the offer afterwards requeues the job; the early result
    // still earns nothing.
    let _ = reply.send(NetResponse::Rejected {
        reason: "changed my mind".into(),
    });
    let j = job_until(&client, &job.job_id, |j| {
        j.attempts >= 1 && j.state == JobState::Queued
    })
    .await;
    assert_eq!(j.state, JobState::Queued, "{j:#?}");
    assert_eq!(j.members[0].state, MemberState::Released);
    let answer = rogue
        .send(NetRequest::Result(Box::new(claim)))
        .await
        .unwrap();
    assert!(matches!(answer, NetResponse::Rejected { .. }), "{answer:?}");
    assert_eq!(balance(&client, &rogue.id).await, before);
    cancel.cancel();
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_from_a_superseded_attempt_is_refused_and_changes_nothing() {
    let (dn, cancel, mut rogue, client) = market(devnet(0).await.unwrap()).await;
    let job = client.submit(spec(&dn, 600), None).await.unwrap();

    // Attempt 1: accepted, then reported lost: the job is requeued.
    let first = rogue.next_offer().await.unwrap().payload;
    state_is(&client, &job.job_id, JobState::Running).await;
    let lost = JobLost {
        job_id: first.job_id,
        offer_id: first.offer_id,
        provider: rogue.id,
        reason: "the daemon restarted".into(),
    };
    let answer = rogue
        .send(NetRequest::Lost(
            Signed::sign(&rogue.key, lost, 600).unwrap(),
        ))
        .await
        .unwrap();
    assert!(matches!(answer, NetResponse::Accepted), "{answer:?}");

    // Attempt 2 goes to the same (cheapest) provider.
    let second = rogue.next_offer().await.unwrap().payload;
    assert_ne!(second.offer_id, first.offer_id);
    let running = job_until(&client, &job.job_id, |j| {
        j.state == JobState::Running && j.attempts == 2
    })
    .await;
    assert_eq!(running.attempts, 2, "{running:#?}");
    let before = balance(&client, &rogue.id).await;

    // The first attempt's receipt is refused and changes nothing.
    let stale = RogueProvider::result_claiming(&first, &rogue.key, 1_000).unwrap();
    let answer = rogue
        .send(NetRequest::Result(Box::new(stale)))
        .await
        .unwrap();
    match &answer {
        NetResponse::Rejected { reason } => assert!(reason.contains("released"), "{reason}"),
        other => panic!("a superseded attempt's result was not refused: {other:?}"),
    }
    let j = client.job(&job.job_id).await.unwrap();
    assert_eq!(j.state, JobState::Running, "{j:#?}");
    assert_eq!(j.members[0].state, MemberState::Released);
    assert_eq!(j.members[0].paid, Credits(0));
    assert_eq!(balance(&client, &rogue.id).await, before);

    // The current attempt's receipt completes it.
    let good = RogueProvider::result_claiming(&second, &rogue.key, 500).unwrap();
    let answer = rogue
        .send(NetRequest::Result(Box::new(good)))
        .await
        .unwrap();
    assert!(matches!(answer, NetResponse::Accepted), "{answer:?}");
    let done = state_is(&client, &job.job_id, JobState::Completed).await;
    assert_eq!(done.members[1].state, MemberState::Delivered);
    assert_eq!(done.cost, Some(done.members[1].paid));
    cancel.cancel();
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_that_never_delivers_and_ignores_cancel_loses_the_job_at_its_deadline() {
    let dn = devnet_with(DevnetOptions {
        providers: 0,
        result_grace: Duration::from_secs(2),
        min_usage_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap();
    let (dn, cancel, mut rogue, client) = market(dn).await;
    // It stays alive in every way the coordinator can see...
    let _beat = rogue.keep_registered(PRICE, Duration::from_millis(500), &cancel);
    let account = format!(
        "buyer:{}",
        kiln_protocol::BuyerId::new(client.key().public())
    );
    let job = client.submit(spec(&dn, 3), None).await.unwrap();
    let offer = rogue.next_offer().await.unwrap().payload;
    let accepted = Instant::now();
    state_is(&client, &job.job_id, JobState::Running).await;
    // ...reports usage claiming ten hours, every 300 ms...
    let reporter = {
        let (offer, key, id) = (offer.clone(), rogue.key.clone(), rogue.id);
        let cancel = cancel.clone();
        let rogue_net = rogue.sender();
        tokio::spawn(async move {
            for n in 1.. {
                let r = RogueProvider::usage_report(&offer, &key, id, n, 36_000_000).unwrap();
                let _ = rogue_net.send(NetRequest::Usage(r)).await;
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
            }
        })
    };
    // ...and when cancelled, never answers (its event loop is not read).
    let cancelled = client.cancel(&job.job_id).await.unwrap();
    assert_eq!(cancelled.outcome.as_str(), "cancelling", "{cancelled:?}");

    // At timeout (3 s) + grace (2 s) the coordinator gives up on it.
    let done = job_until(&client, &job.job_id, |j| j.state.is_terminal()).await;
    let ended_after = accepted.elapsed();
    assert_eq!(done.state, JobState::Cancelled, "{done:#?}");
    assert!(
        done.reason
            .as_deref()
            .unwrap_or("")
            .contains("delivered no result within its timeout"),
        "{done:#?}"
    );
    assert!(
        ended_after >= Duration::from_secs(5),
        "ended after {ended_after:?}"
    );
    assert_eq!(done.members[0].state, MemberState::Released);
    // It was paid for at most the timeout at its price, however long it
    // said it ran, and nothing after the deadline.
    let cost = done.cost.unwrap();
    assert!(
        cost <= cost_for(offer.price_per_hour, 3_000).unwrap(),
        "{done:#?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(client.job(&job.job_id).await.unwrap().cost, Some(cost));
    // The buyer got everything else back.
    let balances = client.ledger_balances().await.unwrap().balances;
    assert_eq!(
        balances.get(&account).map(|c| c.0),
        Some(1_000_000_000 - cost.0)
    );
    // No backward step: it never showed `running` after `cancelling`.
    let states: Vec<&str> = done.events.iter().map(|e| e.state.as_str()).collect();
    let at = states
        .iter()
        .position(|s| *s == "cancelling")
        .expect("a cancelling event");
    assert!(!states[at..].contains(&"running"), "{states:?}");
    cancel.cancel();
    let _ = reporter.await;
    dn.shutdown().await;
}

/// The buyer cancels while the offer is in flight, and the provider
/// accepts after the cancel committed: the job stays cancelled and fully
/// refunded, the provider is told to stop, and its result earns nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offer_accepted_after_the_buyer_cancelled_is_stopped_and_earns_nothing() {
    let (dn, cancel, mut rogue, client) = market(devnet(0).await.unwrap()).await;
    let account = format!(
        "buyer:{}",
        kiln_protocol::BuyerId::new(client.key().public())
    );
    let job = client.submit(spec(&dn, 600), None).await.unwrap();
    let (offer, reply) = rogue.hold_offer().await.unwrap();
    let answer = client.cancel(&job.job_id).await.unwrap();
    assert_eq!(answer.outcome.as_str(), "cancelled", "{answer:?}");
    // Now the node's acceptance arrives.
    let _ = reply.send(NetResponse::Accepted);
    let (stop, stop_reply) = rogue
        .next_request("cancel", |r| match r {
            NetRequest::Cancel(c) => Ok(c),
            other => Err(other),
        })
        .await
        .unwrap();
    let _ = stop_reply.send(NetResponse::Accepted);
    assert_eq!(stop.payload.offer_id, offer.payload.offer_id);
    let j = client.job(&job.job_id).await.unwrap();
    assert_eq!(j.state, JobState::Cancelled, "{j:#?}");
    assert_eq!(j.members[0].state, MemberState::Released, "{j:#?}");
    let late = RogueProvider::result_claiming(&offer.payload, &rogue.key, 1_000).unwrap();
    let answer = rogue
        .send(NetRequest::Result(Box::new(late)))
        .await
        .unwrap();
    assert!(matches!(answer, NetResponse::Rejected { .. }), "{answer:?}");
    let balances = client.ledger_balances().await.unwrap().balances;
    assert_eq!(balances.get(&account).map(|c| c.0), Some(1_000_000_000));
    assert_eq!(balance(&client, &rogue.id).await, 1_000_000_000);
    cancel.cancel();
    dn.shutdown().await;
}
