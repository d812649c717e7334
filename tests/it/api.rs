//! The REST API's contract: bad input gets a 400 naming the field, retries
//! are idempotent, and jobs are visible to their owner only.

use kiln_protocol::views::JobState;
use kiln_protocol::{ImageRef, JobSubmission, Signed};
use kiln_tests::{buyer, devnet};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_specs_get_400_with_the_field() {
    let dn = devnet(0).await.unwrap();
    let http = reqwest::Client::new();
    let client = buyer(&dn);

    // Structurally malformed (a size that is not a size): the JSON path is named.
    let mut body = serde_json::to_value(
        Signed::sign(
            client.key(),
            JobSubmission {
                spec: dn.workload_spec(&["echo"]),
                label: None,
            },
            60,
        )
        .unwrap(),
    )
    .unwrap();
    body["payload"]["spec"]["resources"]["memory"] = json!("lots");
    let r = http
        .post(format!("{}/v1/jobs", dn.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: kiln_protocol::ErrorView = r.json().await.unwrap();
    assert_eq!(v.field.as_deref(), Some("spec.resources.memory"), "{v:#?}");
    assert!(v.error.contains("not a size"), "{v:#?}");

    // Well-formed and correctly signed, but semantically invalid: an unpinned image.
    let mut spec = dn.workload_spec(&["echo"]);
    spec.image = ImageRef("kiln-workload:latest".into());
    let err = client.submit(spec, None).await.unwrap_err();
    match err {
        kiln_cli::ClientError::Api {
            status,
            field,
            message,
        } => {
            assert_eq!(status, 400);
            assert_eq!(field.as_deref(), Some("spec.image"));
            assert!(message.contains("not pinned"), "{message}");
        }
        other => panic!("{other}"),
    }

    // A body whose signature does not match its content: 401, nothing stored.
    let mut forged = serde_json::to_value(
        Signed::sign(
            client.key(),
            JobSubmission {
                spec: dn.workload_spec(&["echo"]),
                label: None,
            },
            60,
        )
        .unwrap(),
    )
    .unwrap();
    forged["payload"]["label"] = json!("changed after signing");
    let r = http
        .post(format!("{}/v1/jobs", dn.url()))
        .json(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(client.jobs().await.unwrap().jobs.len(), 0);
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submission_is_idempotent_and_jobs_are_owner_only() {
    let dn = devnet(0).await.unwrap();
    let alice = buyer(&dn);
    let mallory = buyer(&dn);
    let signed = Signed::sign(
        alice.key(),
        JobSubmission {
            spec: dn.workload_spec(&["echo"]),
            label: None,
        },
        60,
    )
    .unwrap();
    let first = alice.submit_signed(&signed).await.unwrap();
    let second = alice.submit_signed(&signed).await.unwrap();
    assert_eq!(first.job_id, second.job_id);
    assert_eq!(alice.jobs().await.unwrap().jobs.len(), 1);
    // With no provider online the job waits and says why.
    assert_eq!(first.state, JobState::Queued);
    let id = first.job_id;
    let j = kiln_tests::job_until(&alice, &id, |j| {
        kiln_tests::reason(j).contains("no provider online")
    })
    .await;
    assert!(
        kiln_tests::reason(&j).contains("no provider online"),
        "{j:#?}"
    );

    // Someone else cannot see it, its logs or its outputs: 404, as if it did not exist.
    for r in [
        mallory.job(&id).await.map(|_| ()),
        mallory.logs(&id).await.map(|_| ()),
        mallory.outputs(&id).await.map(|_| ()),
    ] {
        match r {
            Err(kiln_cli::ClientError::Api { status, .. }) => assert_eq!(status, 404),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(mallory.jobs().await.unwrap().jobs.len(), 0);
    // Unauthenticated requests are refused.
    let r = reqwest::get(format!("{}/v1/jobs/{id}", dn.url()))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offers_can_be_searched_and_bad_queries_name_the_term() {
    let dn = devnet(2).await.unwrap();
    let client = buyer(&dn);
    let all = client
        .offers("cpus>=1 num_gpus=0", "price", 10)
        .await
        .unwrap();
    assert_eq!(all.offers.len(), 2, "{all:#?}");
    let none = client.offers("num_gpus>=1", "price", 10).await.unwrap();
    assert_eq!(none.offers.len(), 0, "CPU-only devnet: {none:#?}");
    match client.offers("vram>=80XB", "price", 10).await {
        Err(kiln_cli::ClientError::Api {
            status,
            field,
            message,
        }) => {
            assert_eq!(status, 400);
            assert_eq!(field.as_deref(), Some("q"));
            assert!(message.contains("vram>=80XB"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_providers_holding_the_minimum_stake_get_work() {
    use kiln_cli::devnet::DevnetOptions;
    use kiln_protocol::Credits;
    // Providers bond 5 credits from the devnet faucet; the coordinator asks for 5.
    let dn = kiln_tests::devnet_with(DevnetOptions {
        providers: 1,
        min_stake: Credits(5_000_000),
        provider_stake: Some(Credits(5_000_000)),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = buyer(&dn);
    let done = kiln_tests::run_job(&client, dn.workload_spec(&["echo", "staked"]))
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let provider = format!("provider:{}", done.provider.unwrap());
    let st = client.statement(&provider).await.unwrap();
    assert!(
        serde_json::to_string(&st.entries)
            .unwrap()
            .contains("\"stake\""),
        "{st:#?}"
    );
    dn.shutdown().await;

    // Without a bond, nobody is offered the job: it waits.
    let dn = kiln_tests::devnet_with(DevnetOptions {
        providers: 1,
        min_stake: Credits(5_000_000),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = buyer(&dn);
    let v = client
        .submit(dn.workload_spec(&["echo", "x"]), None)
        .await
        .unwrap();
    let id = v.job_id;
    let j = kiln_tests::job_until(&client, &id, |j| {
        kiln_tests::reason(j).contains("excluded by min_stake")
    })
    .await;
    assert_eq!(j.state, JobState::Queued, "{j:#?}");
    assert!(
        kiln_tests::reason(&j).contains("1 online; 1 excluded by min_stake=5.000000 cr"),
        "{j:#?}"
    );
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_past_its_queue_deadline_fails_and_is_refunded() {
    let dn = devnet(0).await.unwrap();
    let client = buyer(&dn);
    let mut spec = dn.workload_spec(&["echo"]);
    spec.resources.deadline = Some(kiln_protocol::Seconds(1));
    let v = client.submit(spec, None).await.unwrap();
    let id = v.job_id;
    let done = kiln_cli::wait_for(&client, &id, std::time::Duration::from_secs(30), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Failed, "{done:#?}");
    let reason = done.reason.as_deref().unwrap();
    assert!(
        reason.contains("queue deadline") && reason.contains("no provider online"),
        "{reason}"
    );
    let acct = client.account().await.unwrap();
    assert_eq!(
        (acct.balance.0, acct.escrowed.0),
        (1_000_000_000, 0),
        "refunded: {acct:#?}"
    );

    // A multi-node gang waits like any job, and says why: with no provider
    // online it is not placed, and nothing is reserved anywhere.
    let mut gang = dn.workload_spec(&["echo"]);
    gang.resources.gang = 2;
    gang.resources.deadline = Some(kiln_protocol::Seconds(1));
    let v = client.submit(gang, None).await.unwrap();
    let gang_id = v.job_id;
    let done = kiln_cli::wait_for(
        &client,
        &gang_id,
        std::time::Duration::from_secs(30),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(done.state, JobState::Failed, "{done:#?}");
    assert!(
        done.reason
            .as_deref()
            .unwrap()
            .contains("no provider online"),
        "{done:#?}"
    );
    assert_eq!(done.gang.as_ref().map(Vec::len), Some(0), "{done:#?}");
    let acct = client.account().await.unwrap();
    assert_eq!(acct.escrowed.0, 0, "refunded: {acct:#?}");
    dn.shutdown().await;
}

/// A provider's bond backs the jobs it holds: it cannot unstake while one
/// is assigned to it, and can once the job has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_cannot_unstake_while_it_holds_a_job() {
    use kiln_protocol::{Credits, NetRequest, NetResponse, SetStake};
    let dn = devnet(0).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let addr = dn.coordinator.p2p_addrs[0].clone();
    let mut rogue = kiln_tests::RogueProvider::join(&addr, &cancel)
        .await
        .unwrap();
    let stake = |rogue: &kiln_tests::RogueProvider, target: u64| {
        let req = SetStake {
            provider: rogue.id,
            target: Credits(target),
        };
        NetRequest::Stake(Signed::sign(&rogue.key, req, 300).unwrap())
    };
    // Bond 5 credits from the devnet faucet's grant.
    let r = rogue.send(stake(&rogue, 5_000_000)).await.unwrap();
    assert!(matches!(r, NetResponse::Accepted), "{r:?}");

    let client = buyer(&dn);
    let v = client
        .submit(dn.workload_spec(&["echo", "held"]), None)
        .await
        .unwrap();
    let id = v.job_id;
    let offer = rogue.next_offer().await.unwrap().payload;
    assert_eq!(offer.job_id, id);

    let r = rogue.send(stake(&rogue, 0)).await.unwrap();
    match &r {
        NetResponse::Rejected { reason } => assert!(
            reason.contains("1 job is assigned to this provider; drain it first"),
            "{reason}"
        ),
        other => panic!("unstaking with a job held was not refused: {other:?}"),
    }

    // The job ends (a signed result): now the bond can come back.
    let result = kiln_tests::RogueProvider::result_for(&offer, &rogue.key).unwrap();
    let r = rogue.deliver(result).await.unwrap();
    assert!(matches!(r, NetResponse::Accepted), "{r:?}");
    let r = rogue.send(stake(&rogue, 0)).await.unwrap();
    assert!(matches!(r, NetResponse::Accepted), "{r:?}");
    cancel.cancel();
    dn.shutdown().await;
}
