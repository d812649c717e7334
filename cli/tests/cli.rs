//! The `kiln` binary as users run it.

use std::process::Command;

fn kiln(home: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("KILN_HOME", home)
        .env_remove("KILN_COORDINATOR")
        .env_remove("KILN_KEY");
    c
}

#[test]
fn a_malformed_spec_is_reported_with_its_field_and_a_non_zero_exit() {
    let home = tempfile::tempdir().unwrap();
    let spec = home.path().join("bad.toml");
    let cases = [
        ("image = \"alpine:latest\"\ncommand = [\"x\"]\n", "image"),
        (
            &*format!(
                "image = \"sha256:{}\"\n[resources]\nmemory = \"2 parsecs\"\n",
                "a".repeat(64)
            ),
            "memory",
        ),
        (
            &*format!(
                "image = \"sha256:{}\"\n[resources]\ntimeout = 0\n",
                "a".repeat(64)
            ),
            "resources.timeout",
        ),
    ];
    for (text, field) in cases {
        std::fs::write(&spec, text).unwrap();
        let out = kiln(home.path())
            .args(["job", "submit"])
            .arg(&spec)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "expected `{field}` in: {err}");
    }
    // The buyer key was created on first use, readable by the owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(home.path().join("buyer.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn an_unreachable_coordinator_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let out = kiln(home.path())
        .args(["--coordinator", "http://127.0.0.1:9", "job", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the coordinator"), "{err}");
}

#[test]
fn devnet_runs_the_demo_and_prints_one_json_object() {
    let home = tempfile::tempdir().unwrap();
    let out = kiln(home.path())
        .args([
            "devnet",
            "--providers",
            "2",
            "--exit-after-demo",
            "--json",
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&stdout).expect("stdout is exactly one JSON object");
    assert_eq!(v["state"], "completed");
    assert_eq!(v["receipt_verified"], true);
    assert!(v["job_id"].as_str().unwrap().len() == 32);
    assert!(v["output_cid"].as_str().unwrap().starts_with("bafy"));
    let provider = v["provider"].as_str().unwrap();
    assert!(
        v["providers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == provider)
    );
}

/// `kiln account statement` shows a long job's interval payouts, `kiln ledger
/// verify` passes, and after one row is tampered with it fails naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_commands_show_interval_payouts_and_catch_tampering() {
    use kiln_cli::devnet::{Devnet, DevnetOptions};
    let home = tempfile::tempdir().unwrap();
    let dn = Devnet::start(DevnetOptions {
        providers: 1,
        http_port: 0,
        heartbeat: std::time::Duration::from_secs(1),
        usage_interval: std::time::Duration::from_millis(700),
        ..Default::default()
    })
    .await
    .unwrap();
    let key = kiln_cli::buyer_key(&home.path().join("buyer.key")).unwrap();
    let client = kiln_cli::Client::new(&dn.url(), key);
    let job = client
        .submit(dn.workload_spec(&["sleep", "3"]), None)
        .await
        .unwrap();
    let id = job.job_id;
    let done = kiln_cli::wait_for(&client, &id, std::time::Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, kiln_protocol::JobState::Completed);
    let url = dn.url();
    let run = |args: &[&str]| {
        let out = kiln(home.path())
            .args(["--coordinator", &url])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // `kiln job status --json` lists the job's executions: what each
    // provider was seen running and was paid (README: "Using it").
    let (code, stdout, _) = run(&["--json", "job", "status", &id.to_string()]);
    assert_eq!(code, Some(0), "{stdout}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let m = &status["members"][0];
    assert_eq!(m["state"], "delivered", "{stdout}");
    assert!(m["observed_ms"].as_u64().unwrap() >= 3000, "{stdout}");
    assert_eq!(m["paid"], status["cost"], "{stdout}");
    let provider = format!("provider:{}", done.provider.unwrap());
    let (code, stdout, _) = run(&["account", "statement", "--account", &provider]);
    assert_eq!(code, Some(0));
    // Usage intervals, then the final payment for the receipt: every
    // payment is a cumulative settlement keyed by the provider's offer.
    assert!(
        stdout.matches("interval settlement").count() >= 3,
        "{stdout}"
    );
    assert!(stdout.contains(":result"), "{stdout}");

    // Requests pinned to this coordinator's id work; pinned to another,
    // the coordinator refuses them (they were signed for someone else).
    let me = client.info().await.unwrap().peer_id.to_string();
    let other =
        kiln_protocol::ProviderId::from_public_key(&kiln_protocol::Keypair::generate().public())
            .to_string();
    let (code, stdout, stderr) = run(&["--coordinator-id", &me, "job", "status", &id.to_string()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let (code, _, stderr) = run(&["--coordinator-id", &other, "job", "status", &id.to_string()]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("coordinator"), "{stderr}");

    let (code, stdout, stderr) = run(&["ledger", "verify"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("ledger verified"), "{stdout}");

    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dn.state_dir.join("coordinator/kiln.db").display()
    ))
    .await
    .unwrap();
    let (entry,): (Vec<u8>,) = sqlx::query_as("SELECT entry FROM ledger_entries WHERE seq = 2")
        .fetch_one(&db)
        .await
        .unwrap();
    let mut bad = entry;
    let i = bad.len() / 2;
    bad[i] ^= 0x04;
    sqlx::query("UPDATE ledger_entries SET entry = ? WHERE seq = 2")
        .bind(&bad)
        .execute(&db)
        .await
        .unwrap();
    let (code, _, stderr) = run(&["ledger", "verify"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("entry 2 "), "{stderr}");
    db.close().await;
    dn.shutdown().await;
}

/// `kiln data add`, `ls` (with the quota) and `rm`, as README's "Data"
/// shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_commands_add_list_and_remove_within_the_quota() {
    use kiln_cli::devnet::{Devnet, DevnetOptions};
    let home = tempfile::tempdir().unwrap();
    let dn = Devnet::start(DevnetOptions {
        providers: 0,
        blob_quota_per_buyer: Some(1 << 20),
        ..Default::default()
    })
    .await
    .unwrap();
    let url = dn.url();
    let run = |args: &[&str]| {
        let out = kiln(home.path())
            .args(["--coordinator", &url])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let file = home.path().join("weights.bin");
    std::fs::write(&file, vec![7u8; 300 << 10]).unwrap();
    let (code, stdout, stderr) = run(&["data", "add", "--quiet", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let cid = kiln_protocol::ContentId::of_bytes(&vec![7u8; 300 << 10]).to_string();
    assert!(stdout.contains(&cid), "{stdout}");

    let (code, stdout, _) = run(&["data", "ls"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains(&cid) && stdout.contains("using 300.0 KiB of your 1.0 MiB quota"),
        "{stdout}"
    );

    // Four more copies' worth does not fit: refused, saying how to free space.
    let big = home.path().join("big.bin");
    std::fs::write(&big, vec![9u8; 800 << 10]).unwrap();
    let (code, _, stderr) = run(&["data", "add", "--quiet", big.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("kiln data rm"), "{stderr}");

    let (code, stdout, stderr) = run(&["data", "rm", &cid]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("removed {cid}")) && stdout.contains("using 0 B now"),
        "{stdout}"
    );
    let (code, _, stderr) = run(&["data", "add", "--quiet", big.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = run(&["data", "rm", &cid]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not one of your uploads"), "{stderr}");
    dn.shutdown().await;
}
