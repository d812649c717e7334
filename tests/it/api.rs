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
    let (dn, cancel, mut rogue) = kiln_tests::devnet_with_rogue().await.unwrap();
    let stake = |rogue: &kiln_tests::RogueProvider, target: u64| {
        let req = SetStake {
            provider: rogue.id,
            target: Credits(target),
        };
        NetRequest::Stake(Signed::sign(&rogue.key, req, 300).unwrap())
    };
    // A bond it cannot pay for is refused before the coordinator takes any
    // lock (issue 13, finding 5), naming the shortfall.
    let r = rogue.send(stake(&rogue, 1 << 60)).await.unwrap();
    match &r {
        NetResponse::Rejected { reason } => assert!(
            reason.contains("stake refused") && reason.contains("balance is"),
            "{reason}"
        ),
        other => panic!("a bond beyond the balance was not refused: {other:?}"),
    }
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

/// `status` and error text of a raw request's answer.
async fn answer(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    let error = serde_json::from_str::<kiln_protocol::ErrorView>(&body)
        .map(|v| v.error)
        .unwrap_or(body);
    (status, error)
}

/// Finding 7 of issue 13, performed against real coordinators: an
/// `Authorization` header captured off the wire is accepted once, for the
/// exact body it was signed over, by the coordinator it names, and nowhere
/// else; the buyer's own requests go on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_captured_authorization_header_cannot_be_replayed_rebodied_or_taken_elsewhere() {
    use kiln_protocol::request_auth::RequestAuth;
    use kiln_protocol::{ContentId, Keypair};

    let (dn, other) = tokio::join!(devnet(0), devnet(0));
    let (dn, other) = (dn.unwrap(), other.unwrap());
    let http = reqwest::Client::new();
    let alice = buyer(&dn);
    let v = alice
        .submit(dn.workload_spec(&["echo", "mine"]), None)
        .await
        .unwrap();
    let path = format!("/v1/jobs/{}", v.job_id);

    // The same request twice: the second is refused.
    let captured = alice.authorization("GET", &path, b"").await.unwrap();
    let get = |base: String, h: String| {
        http.get(format!("{base}{path}"))
            .header("authorization", h)
            .send()
    };
    let (s, e) = answer(get(dn.url(), captured.clone()).await.unwrap()).await;
    assert_eq!(s, 200, "{e}");
    let (s, e) = answer(get(dn.url(), captured.clone()).await.unwrap()).await;
    assert_eq!(s, 401, "{e}");
    assert!(e.contains("already used"), "{e}");

    // A header captured for one coordinator is refused by another, where
    // alice is a buyer too (her own request there works).
    let alice_there = kiln_cli::Client::new(&other.url(), alice.key().clone());
    assert_eq!(alice_there.jobs().await.unwrap().jobs.len(), 0);
    let fresh = alice.authorization("GET", "/v1/jobs", b"").await.unwrap();
    let r = http
        .get(format!("{}/v1/jobs", other.url()))
        .header("authorization", fresh.clone())
        .send()
        .await
        .unwrap();
    let (s, e) = answer(r).await;
    assert_eq!(s, 401, "{e}");
    assert!(
        e.contains("signed for coordinator")
            && e.contains(&other.coordinator.state.peer.to_string()),
        "{e}"
    );
    // ... and refusing it there did not spend it here.
    let r = http
        .get(format!("{}/v1/jobs", dn.url()))
        .header("authorization", fresh)
        .send()
        .await
        .unwrap();
    assert_eq!(answer(r).await.0, 200);

    // A header captured on an upload carries another body: refused, and
    // nothing is stored or granted. The genuine body still goes through once.
    let genuine = b"alice's data".to_vec();
    let evil = b"mallory's data".to_vec();
    let captured = alice
        .authorization("POST", "/v1/blobs", &genuine)
        .await
        .unwrap();
    let post = |h: String, body: Vec<u8>| {
        http.post(format!("{}/v1/blobs", dn.url()))
            .header("authorization", h)
            .body(body)
            .send()
    };
    let (s, e) = answer(post(captured.clone(), evil.clone()).await.unwrap()).await;
    assert_eq!(s, 401, "{e}");
    assert!(e.contains("not the one that was signed"), "{e}");
    let (s, e) = answer(post(captured.clone(), genuine.clone()).await.unwrap()).await;
    assert_eq!(s, 200, "{e}");
    let (s, e) = answer(post(captured, genuine.clone()).await.unwrap()).await;
    assert_eq!((s, e.contains("already used")), (401, true), "{e}");
    let held: Vec<ContentId> = alice
        .blobs()
        .await
        .unwrap()
        .blobs
        .iter()
        .map(|b| b.cid)
        .collect();
    assert!(held.contains(&ContentId::of_bytes(&genuine)), "{held:?}");
    assert!(!held.contains(&ContentId::of_bytes(&evil)), "{held:?}");

    // A streamed upload is bound by the CID in its path: a captured header
    // for one blob cannot carry other bytes.
    let want = b"streamed".to_vec();
    let coordinator = alice.coordinator_id().await.unwrap();
    let h = RequestAuth::blob_upload(coordinator, &ContentId::of_bytes(&want))
        .sign_header(alice.key(), 60)
        .unwrap();
    let r = http
        .put(format!(
            "{}/v1/blobs/{}",
            dn.url(),
            ContentId::of_bytes(&want)
        ))
        .header("authorization", h)
        .body(b"streamee".to_vec())
        .send()
        .await
        .unwrap();
    let (s, e) = answer(r).await;
    assert_eq!(s, 400, "{e}");
    assert!(e.contains("hash to"), "{e}");
    let uploaded = alice
        .put_blob(
            &ContentId::of_bytes(&want),
            want.len() as u64,
            "streamed",
            want.clone().into(),
        )
        .await
        .unwrap();
    assert_eq!(uploaded.cid, ContentId::of_bytes(&want));

    // A client of the previous release is told what to do.
    let old = kiln_protocol::Signed::sign(
        alice.key(),
        kiln_protocol::ApiAuth {
            method: "GET".into(),
            path: "/v1/jobs".into(),
        },
        60,
    )
    .unwrap();
    let r = http
        .get(format!("{}/v1/jobs", dn.url()))
        .header(
            "authorization",
            format!("Kiln {}", hex::encode(old.to_bytes().unwrap())),
        )
        .send()
        .await
        .unwrap();
    let (s, e) = answer(r).await;
    assert_eq!(s, 401, "{e}");
    assert!(e.contains("upgrade kiln"), "{e}");

    // A header signed with another buyer's key for alice's job reads nothing.
    let mallory = Keypair::generate();
    let h = RequestAuth::new(coordinator, "GET", &path, b"")
        .sign_header(&mallory, 60)
        .unwrap();
    assert_eq!(answer(get(dn.url(), h).await.unwrap()).await.0, 404);
    // And alice's own client works throughout.
    assert_eq!(alice.job(&v.job_id).await.unwrap().job_id, v.job_id);
    tokio::join!(dn.shutdown(), other.shutdown());
}

/// A provider's failure reason and logs carrying terminal escape sequences
/// reach the buyer as sent (JSON, `--raw`) but print neutralized.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn escape_sequences_in_a_jobs_reason_and_logs_print_neutralized() {
    use kiln_protocol::{Blob, ContentId, NetResponse, Outcome};
    let (dn, cancel, mut rogue) = kiln_tests::devnet_with_rogue().await.unwrap();
    let client = buyer(&dn);
    let v = client
        .submit(dn.workload_spec(&["echo", "x"]), None)
        .await
        .unwrap();
    let offer = rogue.next_offer().await.unwrap().payload;
    assert_eq!(offer.job_id, v.job_id);

    let reason = "\x1b]0;you are owned\x07\x1b[2Jcrashed\nJOB 0 completed";
    let stdout = b"step 1\n\x1b[1A\x1b[2Kall good\x1b]52;c;Y3VybCBldmlsfHNo\x07\n".to_vec();
    let mut result = kiln_tests::RogueProvider::result_for(&offer, &rogue.key).unwrap();
    let mut receipt = result.receipt.payload.clone();
    receipt.outcome = Outcome::Failed;
    receipt.exit_code = Some(1);
    receipt.error = Some(reason.into());
    receipt.stdout_cid = ContentId::of_bytes(&stdout);
    receipt.usage.stdout_bytes = stdout.len() as u64;
    result.receipt = kiln_protocol::Signed::sign(&rogue.key, receipt, 600).unwrap();
    result.blobs[0] = Blob {
        cid: ContentId::of_bytes(&stdout),
        bytes: stdout.clone(),
    };
    let r = rogue.deliver(result).await.unwrap();
    assert!(matches!(r, NetResponse::Accepted), "{r:?}");

    let job = kiln_tests::job_until(&client, &v.job_id, |j| j.state == JobState::Failed).await;
    assert_eq!(job.reason.as_deref(), Some(reason), "stored as sent");
    let line = kiln_cli::job_line(&job);
    assert!(
        !line.chars().any(char::is_control),
        "a control character reaches the terminal: {line:?}"
    );
    assert!(
        line.contains("\\x1b]0;you are owned\\x07\\x1b[2Jcrashed\\nJOB 0 completed"),
        "{line}"
    );

    let logs = client.logs(&v.job_id).await.unwrap();
    assert_eq!(
        logs.stdout.as_bytes(),
        &stdout[..],
        "served as the provider sent it (--raw)"
    );
    let text = kiln_cli::logs_text(&logs);
    assert_eq!(
        text,
        "step 1\n\\x1b[1A\\x1b[2Kall good\\x1b]52;c;Y3VybCBldmlsfHNo\\x07\n"
    );
    cancel.cancel();
    dn.shutdown().await;
}

/// A provider whose advert names a MIG profile that is not NVIDIA's form
/// (the scheduler would index any string as a kind of its own) is refused,
/// the profile named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advert_with_a_bogus_mig_profile_is_refused() {
    let (dn, cancel, rogue) = kiln_tests::devnet_with_rogue().await.unwrap();
    let mut a = rogue
        .gpu_advert([0; 3], 1024, kiln_protocol::Credits(1))
        .unwrap()
        .payload;
    a.gpus[0].mig = Some("all-of-it".into());
    let signed = Signed::sign(&rogue.key, a.clone(), 60).unwrap();
    match rogue
        .send(kiln_protocol::NetRequest::Register(signed))
        .await
        .unwrap()
    {
        kiln_protocol::NetResponse::Rejected { reason } => {
            assert!(reason.contains("MIG profile \"all-of-it\""), "{reason}")
        }
        other => panic!("a bogus MIG profile was accepted: {other:?}"),
    }
    // The same advert with a real profile is taken.
    a.gpus[0].mig = Some("1g.10gb".into());
    let signed = Signed::sign(&rogue.key, a, 60).unwrap();
    assert!(matches!(
        rogue
            .send(kiln_protocol::NetRequest::Register(signed))
            .await
            .unwrap(),
        kiln_protocol::NetResponse::Accepted
    ));
    cancel.cancel();
    dn.shutdown().await;
}
