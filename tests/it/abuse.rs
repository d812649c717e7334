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
use kiln_protocol::{Credits, JobId, JobSpec, JobState};
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
