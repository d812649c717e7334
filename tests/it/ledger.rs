//! Settlement as an auditor sees it: interval payouts while a long job runs,
//! a ledger that replays to the stored balances, and tampering that is
//! caught at the first bad entry.

use std::time::Duration;

use kiln_cli::devnet::DevnetOptions;
use kiln_protocol::views::JobState;
use kiln_tests::{buyer, devnet_with, run_job};

async fn long_job_devnet() -> kiln_cli::devnet::Devnet {
    devnet_with(DevnetOptions {
        providers: 1,
        usage_interval: Duration::from_millis(700),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_job_is_paid_by_intervals_and_the_ledger_verifies() {
    let dn = long_job_devnet().await;
    let client = buyer(&dn);
    let long = run_job(&client, dn.workload_spec(&["sleep", "4"]))
        .await
        .unwrap();
    assert_eq!(long.state, JobState::Completed, "{long:#?}");
    let short = run_job(&client, dn.workload_spec(&["echo", "hi"]))
        .await
        .unwrap();
    assert_eq!(short.state, JobState::Completed);

    // The provider's statement shows the interval payouts, then the final
    // payment for the receipt: every payment is one cumulative settlement
    // from escrow (the rest of the escrow is refunded to the buyer).
    let provider = format!("provider:{}", long.provider.unwrap());
    let st = client.statement(&provider).await.unwrap();
    let ops: Vec<&str> = st.entries.iter().map(|e| e.op.as_str()).collect();
    let intervals = ops.iter().filter(|o| **o == "interval settlement").count();
    assert!(
        intervals >= 3,
        "expected interval payouts for a 4 s job at 0.7 s intervals, then the final one: {ops:?}"
    );
    let keys: Vec<&str> = st.entries.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.iter().any(|k| k.ends_with(":result")), "{keys:?}");

    // Anyone can replay the chain against the published key; balances match.
    let audit = kiln_cli::ledger::verify(&client, None)
        .await
        .unwrap()
        .unwrap();
    assert!(audit.ok);
    // ...and they are the sum of the work done: what the buyer paid is what
    // the provider earned plus the fee, and equals the recorded job costs.
    let costs = long.cost.unwrap().0 + short.cost.unwrap().0;
    let balances = client.ledger_balances().await.unwrap().balances;
    let get = |k: &str| balances.get(k).map_or(0, |c| c.0);
    let buyer_account = format!(
        "buyer:{}",
        kiln_protocol::BuyerId::new(client.key().public())
    );
    assert_eq!(get(&buyer_account), 1_000_000_000 - costs);
    // The provider's balance also holds its one-off devnet faucet grant.
    assert_eq!(get(&provider) - 1_000_000_000 + get("fee"), costs);
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampering_with_one_ledger_row_is_caught_and_named() {
    let dn = long_job_devnet().await;
    let client = buyer(&dn);
    for _ in 0..3 {
        let done = run_job(&client, dn.workload_spec(&["echo", "x"]))
            .await
            .unwrap();
        assert_eq!(done.state, JobState::Completed);
    }
    kiln_cli::ledger::verify(&client, None)
        .await
        .unwrap()
        .expect("an untouched ledger verifies");
    let db = kiln_tests::open_database(&dn.database()).await.unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM ledger_entries")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(n >= 6, "deposit, locks and releases: {n} entries");

    // Flip one byte in the middle of entry 3.
    let (entry,): (Vec<u8>,) = sqlx::query_as("SELECT entry FROM ledger_entries WHERE seq = 3")
        .fetch_one(&db)
        .await
        .unwrap();
    let mut bad = entry.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    sqlx::query("UPDATE ledger_entries SET entry = $1 WHERE seq = 3")
        .bind(&bad)
        .execute(&db)
        .await
        .unwrap();
    let err = kiln_cli::ledger::verify(&client, None)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        err.to_string().contains("entry 3 "),
        "the first bad entry is named: {err}"
    );

    // Restore it; then tamper with a stored balance instead.
    sqlx::query("UPDATE ledger_entries SET entry = $1 WHERE seq = 3")
        .bind(&entry)
        .execute(&db)
        .await
        .unwrap();
    kiln_cli::ledger::verify(&client, None)
        .await
        .unwrap()
        .expect("restored");
    sqlx::query("UPDATE balances SET balance = balance + 1 WHERE account LIKE 'provider:%'")
        .execute(&db)
        .await
        .unwrap();
    let err = kiln_cli::ledger::verify(&client, None)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        err.to_string().contains("provider:"),
        "the mismatching account is named: {err}"
    );
    db.close().await;
    dn.shutdown().await;
}
