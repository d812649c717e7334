//! Issue 13: attacks by buyers in bad faith, performed against the real
//! coordinator and nodes.
//!
//! Finding 1, "queue freeze for free": the scheduler used to look at the 500
//! oldest queued jobs only, and a job asking to pay nothing locked no
//! escrow, so 500 free jobs nothing could run hid every later job.

use std::time::Instant;

use futures::StreamExt;
use kiln_cli::ClientError;
use kiln_protocol::spec::MAX_PRIORITY;
use kiln_protocol::{ContentId, Credits, JobId, JobSpec, JobState};
use kiln_tests::{buyer, devnet, job_until, reason, run_job};

/// What the coordinator queues for one buyer by default.
const PER_BUYER: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_unplaceable_jobs_does_not_hold_up_an_honest_one() {
    let dn = devnet(1).await.unwrap();
    let attacker = buyer(&dn);

    // Queue space is not free: a job that would lock nothing is refused,
    // naming the field and the minimum (1 µcr on a devnet).
    let mut free = dn.workload_spec(&["echo", "free"]);
    free.resources.max_price_per_hour = Credits(0);
    match attacker.submit(free, None).await {
        Err(ClientError::Api {
            status: 400,
            message,
            field,
        }) => {
            assert_eq!(
                field.as_deref(),
                Some("spec.resources.max_price_per_hour"),
                "{message}"
            );
            assert!(
                message.contains("would lock 0.000000 cr in escrow")
                    && message.contains("less than the 0.000001 cr"),
                "{message}"
            );
        }
        other => panic!("a job that locks nothing was not refused: {other:?}"),
    }

    // Jobs nothing here can run (the devnet's node has no GPU), at the top
    // priority so they come first in the queue, with no queue deadline.
    let unplaceable = |i: usize| {
        let mut s: JobSpec = dn.workload_spec(&["echo", &i.to_string()]);
        s.resources.gpus = 1;
        s.resources.priority = MAX_PRIORITY;
        s
    };

    // One key tries 1,000 at once: the per-buyer limit queues 100 and
    // refuses the rest with 429 and a message that says what to do.
    let outcomes: Vec<Result<JobId, ClientError>> = futures::stream::iter(0..1000)
        .map(|i| {
            let (attacker, spec) = (attacker.clone(), unplaceable(i));
            async move { attacker.submit(spec, None).await.map(|v| v.job_id) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut flood: Vec<JobId> = Vec::new();
    let mut refused = 0;
    for o in outcomes {
        match o {
            Ok(id) => flood.push(id),
            Err(ClientError::Api {
                status: 429,
                message,
                ..
            }) => {
                assert!(
                    message.contains("jobs waiting to be placed")
                        && message.contains(&format!("for one buyer ({PER_BUYER})"))
                        && message.contains("kiln job cancel"),
                    "{message}"
                );
                refused += 1;
            }
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }
    assert_eq!((flood.len(), refused), (PER_BUYER, 1000 - PER_BUYER));

    // Fresh keys cost what they lock, but they are not refused: nine more
    // fill the queue to 1,000 unplaceable jobs, twice the window the
    // scheduler used to have.
    let mut last = None;
    for k in 1..10 {
        let sybil = buyer(&dn);
        for i in 0..PER_BUYER {
            let v = sybil.submit(unplaceable(k * PER_BUYER + i), None).await;
            flood.push(v.unwrap().job_id);
        }
        last = Some(sybil);
    }
    assert_eq!(flood.len(), 1000);
    let (last, last_id) = (last.unwrap(), flood[999]);

    // An honest buyer's job, submitted after all of them, completes.
    let honest = buyer(&dn);
    let t = Instant::now();
    let done = run_job(&honest, dn.workload_spec(&["echo", "honest"]))
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    eprintln!(
        "honest job completed {:.1} s after submission, behind 1,000 unplaceable jobs",
        t.elapsed().as_secs_f64()
    );

    // The flood is still queued, and every job of it was looked at, the
    // last one too: it says why it waits (past a window it would still say
    // "waiting for the scheduler").
    let first = attacker.job(&flood[0]).await.unwrap();
    assert_eq!(first.state, JobState::Queued, "{first:#?}");
    assert!(reason(&first).contains("excluded by gpus=1"), "{first:#?}");
    let j = job_until(&last, &last_id, |j| {
        reason(j).contains("excluded by gpus=1")
    })
    .await;
    assert_eq!(j.state, JobState::Queued, "{j:#?}");
    assert!(reason(&j).contains("excluded by gpus=1"), "{j:#?}");

    // Once the attacker's jobs are placed or cancelled, it may queue again.
    attacker.cancel(&flood[0]).await.unwrap();
    attacker.submit(unplaceable(1000), None).await.unwrap();
    dn.shutdown().await;
}

/// Finding 3, "disk filling", per buyer: the coordinator's store holds
/// buyers' only copies and never evicts one buyer's data for another's
/// upload, so each buyer has a quota. A buyer at its quota is refused
/// before its bytes are read (a clear 507 that says how to free space),
/// other buyers are untouched, and deleting gives the space back; bytes
/// another buyer or a live job needs stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_buyer_cannot_fill_the_coordinators_disk_or_erase_another_buyers_data() {
    const KIB: usize = 1024;
    let dn = kiln_tests::devnet_with(kiln_cli::devnet::DevnetOptions {
        providers: 1,
        blob_quota_per_buyer: Some(256 * KIB as u64),
        ..Default::default()
    })
    .await
    .unwrap();
    let (mallory, alice) = (buyer(&dn), buyer(&dn));
    let on_disk = |cid: &ContentId| {
        dn.state_dir
            .join("coordinator/blobs/data")
            .join(cid.to_string())
            .exists()
    };
    let blob = |seed: u8| -> Vec<u8> {
        (0..100 * KIB)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    };
    let put = |who: &kiln_cli::Client, bytes: Vec<u8>| {
        let who = who.clone();
        async move {
            let cid = ContentId::of_bytes(&bytes);
            who.put_blob(&cid, bytes.len() as u64, "f", reqwest::Body::from(bytes))
                .await
                .map(|_| cid)
        }
    };
    let shared = put(&mallory, blob(1)).await.unwrap();
    let input = put(&mallory, blob(2)).await.unwrap();

    // A third 100 KiB upload would pass 256 KiB: refused, whichever way it
    // is sent, with nothing kept.
    let third = blob(3);
    let third_cid = ContentId::of_bytes(&third);
    for e in [
        put(&mallory, third.clone()).await.unwrap_err(),
        mallory.upload(third.clone()).await.unwrap_err(),
    ] {
        match e {
            ClientError::Api {
                status: 507,
                message,
                ..
            } => assert!(
                message.contains("quota is 262144 bytes") && message.contains("kiln data rm"),
                "{message}"
            ),
            other => panic!("an upload past the quota was not refused: {other:?}"),
        }
    }
    assert!(!on_disk(&third_cid), "a refused upload left its bytes");
    let ls = mallory.blobs().await.unwrap();
    assert_eq!(
        (ls.used, ls.quota),
        (200 * KIB as u64, Some(256 * KIB as u64))
    );

    // Alice is untouched, and holds the same content as one of Mallory's.
    assert_eq!(put(&alice, blob(1)).await.unwrap(), shared);
    put(&alice, third.clone()).await.unwrap();

    // A blob an unfinished job of hers uses cannot go.
    let mut spec = dn.workload_spec(&["hash", "/in/x"]);
    spec.inputs
        .push(kiln_protocol::spec::InputSpec::new(input, "/in/x"));
    spec.resources.gpus = 1; // nothing here can run it: it stays queued
    let waiting = mallory.submit(spec, None).await.unwrap().job_id;
    match mallory.delete_blob(&input).await.unwrap_err() {
        ClientError::Api {
            status: 400,
            message,
            ..
        } => assert!(
            message.contains(&waiting.to_string()) && message.contains("kiln job cancel"),
            "{message}"
        ),
        other => panic!("deleting a queued job's input was not refused: {other:?}"),
    }
    assert!(on_disk(&input));

    // Giving up the shared blob frees her quota but not Alice's copy.
    let gone = mallory.delete_blob(&shared).await.unwrap();
    assert_eq!(
        (gone.size, gone.erased, gone.used),
        (100 * KIB as u64, false, 100 * KIB as u64)
    );
    assert!(on_disk(&shared));
    assert!(alice.missing(&[shared]).await.unwrap().is_empty());
    assert!(mallory.missing(&[shared]).await.unwrap() == vec![shared]);

    // Once the job is cancelled, its input goes for good, and the space
    // is hers again.
    mallory.cancel(&waiting).await.unwrap();
    let gone = mallory.delete_blob(&input).await.unwrap();
    assert!(gone.erased && gone.used == 0, "{gone:?}");
    assert!(!on_disk(&input));
    assert_eq!(put(&mallory, third).await.unwrap(), third_cid);
    match mallory.delete_blob(&input).await.unwrap_err() {
        ClientError::Api { status: 404, .. } => {}
        other => panic!("deleting what she does not hold: {other:?}"),
    }

    // Alice's content is still whole after all of Mallory's deletes.
    assert!(
        alice
            .missing(&[shared, third_cid])
            .await
            .unwrap()
            .is_empty()
    );
    dn.shutdown().await;
}
