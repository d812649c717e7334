//! Bad results and bad offers are refused, with the job state intact.
//!
//! A `RogueProvider` is a real libp2p peer that registers like a provider and
//! then sends whatever the test scripts; a `TestCoordinatorPeer` is a peer a
//! real node trusts as its coordinator.

use kiln_cli::Client;
use kiln_protocol::views::{JobState, JobView};
use kiln_protocol::{
    JobId, JobOffer, Keypair, NetResponse, Nonce, OfferId, ProviderId, ResultReceipt, Signed,
    UnixMillis, encoding,
};
use kiln_tests::{RogueProvider, TestCoordinatorPeer, devnet};
use tokio_util::sync::CancellationToken;

fn rejected(r: &NetResponse) -> String {
    match r {
        NetResponse::Rejected { reason } => reason.clone(),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

async fn state_of(client: &Client, id: &JobId) -> JobView {
    client.job(id).await.expect("job status")
}

/// Waits until the job is in `want`: the coordinator records an offer's
/// acceptance just after the provider has answered it.
async fn wait_state(client: &Client, id: &JobId, want: JobState) -> JobView {
    kiln_tests::job_until(client, id, |j| j.state == want).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampered_foreign_and_replayed_receipts_are_refused() {
    let dn = devnet(0).await.unwrap();
    let cancel = CancellationToken::new();
    let addr = dn.coordinator.p2p_addrs[0].clone();
    let mut rogue = RogueProvider::join(&addr, &cancel).await.unwrap();
    let mut other = RogueProvider::join(&addr, &cancel).await.unwrap();
    let client = kiln_tests::buyer(&dn);

    // Both peers advertise the same price; whichever gets job A is "assigned".
    let a = client
        .submit(dn.workload_spec(&["echo", "a"]), None)
        .await
        .unwrap();
    let a_id = a.job_id;
    let first = tokio::select! {
        o = rogue.next_offer() => (o.unwrap().payload, true),
        o = other.next_offer() => (o.unwrap().payload, false),
    };
    let (offer_a, mut assigned, mut bystander) = if first.1 {
        (first.0, rogue, other)
    } else {
        (first.0, other, rogue)
    };
    assert_eq!(offer_a.job_id, a_id);
    assert_eq!(offer_a.provider, assigned.id);
    wait_state(&client, &a_id, JobState::Running).await;

    // 1. One flipped byte in the signed receipt: refused, job untouched.
    let honest = RogueProvider::result_for(&offer_a, &assigned.key).unwrap();
    let bytes = encoding::encode(&honest.receipt).unwrap();
    let mut tampered = None;
    for i in (0..bytes.len()).rev() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        if let Ok(r) = encoding::decode::<Signed<ResultReceipt>>(&b)
            && r.payload != honest.receipt.payload
        {
            tampered = Some(r);
            break;
        }
    }
    let mut flipped = honest.clone();
    flipped.receipt = tampered.expect("some single-byte flip still decodes");
    let reason = rejected(
        &assigned
            .send(kiln_protocol::NetRequest::Result(Box::new(flipped)))
            .await
            .unwrap(),
    );
    assert!(reason.contains("signature"), "{reason}");
    let s = state_of(&client, &a_id).await;
    assert_eq!(s.state, JobState::Running, "{s:#?}");
    assert!(!s.receipt_verified);

    // 2. A receipt signed by a provider other than the assigned one: refused.
    let foreign = RogueProvider::result_for(&offer_a, &bystander.key).unwrap();
    let reason = rejected(
        &bystander
            .send(kiln_protocol::NetRequest::Result(Box::new(foreign)))
            .await
            .unwrap(),
    );
    assert!(reason.contains("assigned to"), "{reason}");
    assert_eq!(state_of(&client, &a_id).await.state, JobState::Running);

    // 3. The assigned provider's own receipt, lying about what it ran:
    // another image, or other inputs. Refused, job untouched.
    let lie = |edit: &dyn Fn(&mut ResultReceipt)| {
        let mut r = honest.clone();
        let mut p = r.receipt.payload.clone();
        edit(&mut p);
        r.receipt = Signed::sign(&assigned.key, p, 600).unwrap();
        kiln_protocol::NetRequest::Result(Box::new(r))
    };
    let other_image = lie(&|p| p.image_digest = format!("sha256:{}", "ab".repeat(32)));
    let reason = rejected(&assigned.send(other_image).await.unwrap());
    assert!(reason.contains("image"), "{reason}");
    let other_inputs = lie(&|p| p.input_cids = vec![kiln_protocol::ContentId::of_bytes(b"x")]);
    let reason = rejected(&assigned.send(other_inputs).await.unwrap());
    assert!(reason.contains("inputs"), "{reason}");
    let s = state_of(&client, &a_id).await;
    assert_eq!(s.state, JobState::Running, "{s:#?}");
    assert!(!s.receipt_verified);

    // The honest receipt is accepted and the job completes.
    assert!(matches!(
        assigned.deliver(honest.clone()).await.unwrap(),
        NetResponse::Accepted
    ));
    let s = state_of(&client, &a_id).await;
    assert_eq!(s.state, JobState::Completed, "{s:#?}");

    // 4. Job B: replaying A's (valid) receipt as B's result is refused.
    let b = client
        .submit(dn.workload_spec(&["echo", "b"]), None)
        .await
        .unwrap();
    let b_id = b.job_id;
    let first = tokio::select! {
        o = assigned.next_offer() => (o.unwrap().payload, false),
        o = bystander.next_offer() => (o.unwrap().payload, true),
    };
    let offer_b = first.0;
    if first.1 {
        std::mem::swap(&mut assigned, &mut bystander);
    }
    assert_eq!(offer_b.job_id, b_id);
    wait_state(&client, &b_id, JobState::Running).await;
    let mut replay = honest.clone();
    replay.job_id = b_id;
    let reason = rejected(
        &assigned
            .send(kiln_protocol::NetRequest::Result(Box::new(replay)))
            .await
            .unwrap(),
    );
    assert!(reason.contains("replayed"), "{reason}");
    let s = state_of(&client, &b_id).await;
    assert_eq!(s.state, JobState::Running, "{s:#?}");
    // ...and A is still completed with its original receipt.
    assert_eq!(state_of(&client, &a_id).await.state, JobState::Completed);
    assert!(matches!(
        assigned
            .deliver(RogueProvider::result_for(&offer_b, &assigned.key).unwrap())
            .await
            .unwrap(),
        NetResponse::Accepted
    ));
    assert_eq!(state_of(&client, &b_id).await.state, JobState::Completed);
    cancel.cancel();
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_refuses_expired_misaddressed_and_foreign_offers() {
    kiln_tests::init_tracing();
    let cancel = CancellationToken::new();
    let mut coord = TestCoordinatorPeer::start(&cancel).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut cfg = kiln_node::NodeConfig::new(coord.addr(), state.path().to_path_buf());
    cfg.heartbeat = std::time::Duration::from_secs(1);
    let node = kiln_node::start(cfg, cancel.clone()).await.unwrap();
    let advert = coord.accept_registration().await.unwrap();
    assert_eq!(advert.provider, node.provider);

    let image = format!("sha256:{}", "ab".repeat(32));
    let offer = |provider: ProviderId| JobOffer {
        offer_id: OfferId::random(),
        job_id: JobId::random(),
        provider,
        owner: kiln_protocol::BuyerId::new(Keypair::generate().public()),
        spec: kiln_protocol::JobSpec::new(image.clone(), vec!["echo".into()]),
        price_per_hour: kiln_protocol::Credits(1),
        sources: Vec::new(),
    };

    // Expired: signed by the right coordinator, addressed right, but past its expiry.
    let expired = Signed::sign_with(
        &coord.key,
        offer(node.provider),
        Nonce::random(),
        UnixMillis(UnixMillis::now().0 - 1000),
    )
    .unwrap();
    let reason = rejected(&coord.offer(&advert, expired).await.unwrap());
    assert!(reason.contains("expired"), "{reason}");

    // Addressed to another provider.
    let elsewhere = ProviderId::from_public_key(&Keypair::generate().public());
    let misaddressed = Signed::sign(&coord.key, offer(elsewhere), 30).unwrap();
    let reason = rejected(&coord.offer(&advert, misaddressed).await.unwrap());
    assert!(reason.contains("addressed to"), "{reason}");

    // Signed by a key that is not this node's coordinator.
    let forged = Signed::sign(&Keypair::generate(), offer(node.provider), 30).unwrap();
    let reason = rejected(&coord.offer(&advert, forged).await.unwrap());
    assert!(
        reason.contains("not from this node's coordinator"),
        "{reason}"
    );

    // A running job's live output goes only to this node's coordinator,
    // and only for an attempt that runs here.
    let tail = kiln_protocol::TailLogs {
        job_id: JobId::random(),
        offer_id: OfferId::random(),
        provider: node.provider,
        stdout_from: 0,
        stderr_from: 0,
    };
    let forged = Signed::sign(&Keypair::generate(), tail.clone(), 30).unwrap();
    let a = coord
        .request(&advert, kiln_protocol::NetRequest::TailLogs(forged))
        .await
        .unwrap();
    assert!(
        rejected(&a).contains("not from this node's coordinator"),
        "{a:?}"
    );
    let unknown = Signed::sign(&coord.key, tail, 30).unwrap();
    let a = coord
        .request(&advert, kiln_protocol::NetRequest::TailLogs(unknown))
        .await
        .unwrap();
    assert!(rejected(&a).contains("not running here"), "{a:?}");
    cancel.cancel();
    for t in node.tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_job_is_requeued_and_completes_not_dropped() {
    let dn = devnet(0).await.unwrap();
    let cancel = CancellationToken::new();
    let addr = dn.coordinator.p2p_addrs[0].clone();
    let mut a = RogueProvider::join(&addr, &cancel).await.unwrap();
    let mut b = RogueProvider::join(&addr, &cancel).await.unwrap();
    let client = kiln_tests::buyer(&dn);
    let job = client
        .submit(dn.workload_spec(&["echo", "x"]), None)
        .await
        .unwrap();
    let id = job.job_id;
    let first = tokio::select! {
        o = a.next_offer() => (o.unwrap().payload, true),
        o = b.next_offer() => (o.unwrap().payload, false),
    };
    let (offer, mut assigned, mut bystander) = if first.1 {
        (first.0, a, b)
    } else {
        (first.0, b, a)
    };
    let lost = |by: &RogueProvider| {
        let l = kiln_protocol::JobLost {
            job_id: offer.job_id,
            offer_id: offer.offer_id,
            provider: by.id,
            reason: "daemon restarted".into(),
        };
        kiln_protocol::NetRequest::Lost(Signed::sign(&by.key, l, 60).unwrap())
    };
    // Only the provider holding the job can declare it lost.
    assert_eq!(
        wait_state(&client, &id, JobState::Running).await.state,
        JobState::Running
    );
    let reason = rejected(&bystander.send(lost(&bystander)).await.unwrap());
    assert!(reason.contains("not from the provider holding"), "{reason}");
    assert_eq!(state_of(&client, &id).await.state, JobState::Running);

    assert!(matches!(
        assigned.send(lost(&assigned)).await.unwrap(),
        NetResponse::Accepted
    ));
    // It is offered again (second attempt), and this time it completes.
    let again = tokio::select! {
        o = assigned.next_offer() => (o.unwrap().payload, false),
        o = bystander.next_offer() => (o.unwrap().payload, true),
    };
    if again.1 {
        std::mem::swap(&mut assigned, &mut bystander);
    }
    assert_eq!(again.0.job_id, id);
    assert_ne!(
        again.0.offer_id, offer.offer_id,
        "a new offer for the new attempt"
    );
    // The old offer's receipt is now stale.
    let stale = RogueProvider::result_for(&offer, &assigned.key).unwrap();
    let reason = rejected(
        &assigned
            .send(kiln_protocol::NetRequest::Result(Box::new(stale)))
            .await
            .unwrap(),
    );
    assert!(reason.contains("offer"), "{reason}");
    let fresh = RogueProvider::result_for(&again.0, &assigned.key).unwrap();
    assert!(matches!(
        assigned.deliver(fresh).await.unwrap(),
        NetResponse::Accepted
    ));
    let done = state_of(&client, &id).await;
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.attempts, 2);
    let events: Vec<String> = done
        .events
        .iter()
        .map(|e| e.detail.clone().unwrap_or_default())
        .collect();
    assert!(
        events
            .iter()
            .any(|d| d.contains("requeued: lost on provider")),
        "{events:?}"
    );
    cancel.cancel();
    dn.shutdown().await;
}

/// A provider cannot launder someone else's data through a result: naming a
/// CID the coordinator holds for another buyer as an output grants nothing
/// unless the provider proves it has the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_cannot_claim_another_buyers_blob() {
    let dn = devnet(0).await.unwrap();
    let cancel = CancellationToken::new();
    let addr = dn.coordinator.p2p_addrs[0].clone();
    let mut rogue = RogueProvider::join(&addr, &cancel).await.unwrap();
    let alice = kiln_tests::buyer(&dn);
    let secret = b"alice's private dataset".to_vec();
    let cid = alice.upload(secret.clone()).await.unwrap();

    let bob = kiln_tests::buyer(&dn);
    let v = bob
        .submit(dn.workload_spec(&["echo", "b"]), None)
        .await
        .unwrap();
    let id = v.job_id;
    let offer = rogue.next_offer().await.unwrap().payload;
    assert_eq!(offer.job_id, id);
    // Started as far as the coordinator knows, so the claim is judged on
    // what it names (not sent back for being early).
    wait_state(&bob, &id, JobState::Running).await;
    let loot = kiln_protocol::Manifest::new(vec![kiln_protocol::ManifestEntry {
        path: "loot".into(),
        cid,
        size: secret.len() as u64,
        executable: false,
    }])
    .unwrap();
    let claim = RogueProvider::result_with(&offer, &rogue.key, loot).unwrap();
    let r = rogue
        .send(kiln_protocol::NetRequest::Result(Box::new(claim)))
        .await
        .unwrap();
    // Refused, or sent back until it proves it holds the bytes (this peer
    // does not even serve blobs): never accepted.
    assert!(
        !matches!(r, kiln_protocol::NetResponse::Accepted),
        "a result claiming a blob it cannot serve was accepted: {r:?}"
    );
    let mine = serde_json::to_string(&bob.blobs().await.unwrap()).unwrap();
    assert!(!mine.contains(&cid.to_string()), "{mine}");
    assert_ne!(state_of(&bob, &id).await.state, JobState::Completed);
    cancel.cancel();
    dn.shutdown().await;
}
