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

/// Rough edges a new user hit (issue 15, items 2, 3, 4 and 10), against
/// the real binary: output piped into a reader that closes early, `job
/// get` on a job that has not ended, coordinator URLs that are not one,
/// `--wait` returning the job's own exit code, and Ctrl-C while waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn everyday_rough_edges_get_clear_answers() {
    use kiln_cli::devnet::{Devnet, DevnetOptions};
    use std::process::Stdio;
    let home = tempfile::tempdir().unwrap();
    let dn = Devnet::start(DevnetOptions {
        providers: 1,
        http_port: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let url = dn.url();
    let key = kiln_cli::buyer_key(&home.path().join("buyer.key")).unwrap();
    let client = kiln_cli::Client::new(&url, key);
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

    // Item 3: a running job has no outputs yet, and says so.
    let running = client
        .submit(dn.workload_spec(&["sleep", "30"]), None)
        .await
        .unwrap()
        .job_id;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while client.job(&running).await.unwrap().state != kiln_protocol::JobState::Running {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    let out_dir = home.path().join("out");
    let (code, _, err) = run(&[
        "job",
        "get",
        &running.to_string(),
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is running") && err.contains("once it has ended"),
        "{err}"
    );

    // Item 2: a pipe closed early ends the program quietly.
    for _ in 0..3 {
        client
            .submit(dn.workload_spec(&["echo", "x"]), None)
            .await
            .unwrap();
    }
    for args in [&["job", "list"][..], &["--json", "job", "list"][..]] {
        let mut child = kiln(home.path())
            .args(["--coordinator", &url])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader went away before any output
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    // Item 10: --wait exits with the job's exit code.
    let spec = home.path().join("exit7.toml");
    std::fs::write(
        &spec,
        toml::to_string(&dn.workload_spec(&["exit", "7", "bye"])).unwrap(),
    )
    .unwrap();
    let (code, _, err) = run(&["job", "submit", "--wait", spec.to_str().unwrap()]);
    assert_eq!(code, Some(7), "{err}");
    assert!(err.contains("exit code 7"), "{err}");
    // ... and Ctrl-C while waiting says the job goes on, exiting 130.
    let spec = home.path().join("sleep.toml");
    std::fs::write(
        &spec,
        toml::to_string(&dn.workload_spec(&["sleep", "30"])).unwrap(),
    )
    .unwrap();
    let child = kiln(home.path())
        .args(["--coordinator", &url, "job", "submit", "--wait"])
        .arg(&spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    // Interrupt once the submission went through (a job line printed).
    let before = client.jobs().await.unwrap().jobs.len();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while client.jobs().await.unwrap().jobs.len() == before {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let sent = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("goes on") && err.contains("kiln job cancel"),
        "{err}"
    );
    let jobs = client.jobs().await.unwrap().jobs;
    assert!(
        jobs.iter().any(|j| !j.state.is_terminal()),
        "the interrupted wait must not stop the job: {jobs:#?}"
    );

    // Item 4: URLs that are not a coordinator's.
    let not_kiln = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = not_kiln.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for s in not_kiln.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot found",
            );
        }
    });
    let other = format!("http://{addr}");
    let cases: [(&str, &[&str]); 4] = [
        (&other, &["HTTP 404", "a Kiln coordinator", &other]),
        ("/ip4/127.0.0.1/tcp/8731", &["multiaddr", "http://"]),
        ("127.0.0.1:8730", &["did you mean http://127.0.0.1:8730"]),
        ("localhost:8730", &["did you mean http://localhost:8730"]),
    ];
    for (coordinator, want) in cases {
        let out = kiln(home.path())
            .args(["--coordinator", coordinator, "job", "list"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{coordinator}: {err}");
        for w in want {
            assert!(err.contains(w), "{coordinator}: expected `{w}` in: {err}");
        }
        assert!(!err.contains("builder error"), "{err}");
    }
    dn.shutdown().await;
}
