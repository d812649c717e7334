#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
//! The `kiln` binary as users run it.

use std::process::Command;

fn kiln(home: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("KILN_HOME", home)
        .env_remove("KILN_COORDINATOR")
        .env_remove("KILN_KEY");
    c
}

/// Runs `c`: its exit code, stdout and stderr.
fn output(c: &mut Command) -> (Option<i32>, String, String) {
    let out = c.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kiln --coordinator <url> ARGS…` as the buyer whose files are in `home`.
fn kiln_at(home: &std::path::Path, url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    output(kiln(home).args(["--coordinator", url]).args(args))
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
    let run = |args: &[&str]| kiln_at(home.path(), &url, args);
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
    assert!(stdout.contains("payment #"), "{stdout}");
    // The buyer's statement says what the job cost and what came back, on
    // the settlement's own line (nothing to work out by subtraction).
    let (code, stdout, _) = run(&["account", "statement"]);
    assert_eq!(code, Some(0));
    let short = &id.to_string()[..12];
    let held = stdout
        .lines()
        .find(|l| l.contains(&format!("job {short}: ")) && l.contains("held in escrow"));
    assert!(held.is_some(), "{stdout}");
    let settled = stdout
        .lines()
        .find(|l| l.contains(&format!("job {short} settled: cost ")))
        .unwrap_or_else(|| panic!("no settlement line: {stdout}"));
    let cost = status["cost"].as_u64().unwrap();
    assert!(
        settled.contains(&kiln_protocol::Credits(cost).to_string()),
        "cost {cost} µcr not on: {settled}"
    );
    assert!(settled.contains(" back"), "{settled}");

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
    sqlx::query("UPDATE ledger_entries SET entry = $1 WHERE seq = 2")
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
    let run = |args: &[&str]| kiln_at(home.path(), &url, args);
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

    // Issue 15, item 11: a directory is listed with its files' bytes, an
    // empty file under its own name; a fresh download claims nothing from
    // the cache, and the cache can be emptied.
    let big_cid = kiln_protocol::ContentId::of_bytes(&vec![9u8; 800 << 10]).to_string();
    let (code, _, _) = run(&["data", "rm", &big_cid]);
    assert_eq!(code, Some(0));
    let dir = home.path().join("dataset");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.bin"), vec![1u8; 100 << 10]).unwrap();
    std::fs::write(dir.join("b.bin"), vec![2u8; 50 << 10]).unwrap();
    let (code, stdout, stderr) = run(&["--json", "data", "add", "--quiet", dir.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let dir_cid = serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["cid"]
        .as_str()
        .unwrap()
        .to_string();
    let empty = home.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let (code, _, stderr) = run(&["data", "add", "--quiet", empty.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let (_, stdout, _) = run(&["data", "ls"]);
    let header: Vec<&str> = stdout.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["CID", "SIZE", "KIND", "NAME"], "{stdout}");
    let dir_line = stdout.lines().find(|l| l.contains(&dir_cid)).unwrap();
    assert!(dir_line.contains("150.0 KiB in 2 files"), "{dir_line}");
    assert!(stdout.lines().any(|l| l.contains("empty.txt")), "{stdout}");
    let out = home.path().join("got");
    let (code, stdout, stderr) = run(&[
        "data",
        "get",
        "--quiet",
        &dir_cid,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stdout.contains("cache"),
        "a fresh download reused nothing: {stdout}"
    );
    assert_eq!(
        std::fs::read(out.join("a.bin")).unwrap(),
        vec![1u8; 100 << 10]
    );
    assert!(home.path().join("cache").exists());
    let (code, stdout, _) = run(&["data", "clear-cache"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("emptied"), "{stdout}");
    assert!(!home.path().join("cache").exists());
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
    let run = |args: &[&str]| kiln_at(home.path(), &url, args);

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

/// A binary of another workspace package, next to `kiln` in the target
/// directory, as `cargo test --workspace` builds it (testing this crate
/// alone, run `cargo build --bins` first: a binary left from an older build
/// would be used as it is; a missing one is built here).
fn sibling(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "--bin", name])
            .status()
            .unwrap();
        assert!(ok.success(), "building {name}");
    }
    path
}

/// A child process killed when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `child`'s stdout lines (in a thread) until one starts with each
/// of `prefixes`; returns the rest of each such line, and every line read.
fn lines_starting(
    child: &mut std::process::Child,
    prefixes: &[&str],
) -> (Vec<String>, Vec<String>) {
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut found: Vec<Option<String>> = vec![None; prefixes.len()];
    let mut seen = Vec::new();
    while found.iter().any(Option::is_none) {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("no line starting with {prefixes:?}: {e}"));
        seen.push(line.clone());
        for (i, p) in prefixes.iter().enumerate() {
            if found[i].is_none()
                && let Some(rest) = line.strip_prefix(p)
            {
                found[i] = Some(rest.trim().to_string());
            }
        }
    }
    (found.into_iter().flatten().collect(), seen)
}

/// README's "Running the pieces separately", as written, with the real
/// binaries from a fresh state: a coordinator, a node joining with the
/// command the coordinator prints, the operator crediting a buyer (once,
/// however often the command is sent; a buyer's key cannot), the buyer
/// running a job, the operator paying the provider out (never more than
/// it holds), and `kiln ledger verify` replaying it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pieces_run_separately_with_money_in_and_out() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let image = kiln_docker::ensure_workload_image(&kiln_docker::connect().await.unwrap())
        .await
        .unwrap();
    let state = dir.path().join("coordinator");
    let mut coordinator = Child(
        Command::new(sibling("kiln-coordinator"))
            .args([
                "run",
                "--http",
                "127.0.0.1:0",
                "--p2p",
                "/ip4/127.0.0.1/tcp/0",
            ])
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (found, seen) = lines_starting(
        &mut coordinator.0,
        &["coordinator API at ", "providers join with: "],
    );
    let (url, join) = (found[0].clone(), found[1].clone());
    // Its log, written to a pipe, has no colour codes.
    assert!(seen.iter().any(|l| l.contains("INFO")), "{seen:#?}");
    assert!(!seen.iter().any(|l| l.contains('\u{1b}')), "{seen:#?}");
    let join: Vec<&str> = join.split_whitespace().collect();
    assert_eq!(
        &join[..3],
        ["kiln-node", "run", "--coordinator"],
        "{join:?}"
    );
    let mut node = Child(
        Command::new(sibling("kiln-node"))
            .args(&join[1..])
            .arg("--state-dir")
            .arg(dir.path().join("node"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let home = dir.path().join("buyer");
    let operator_key = state.join("operator.key");
    let kiln_as = |key: Option<&std::path::Path>, args: &[&str]| {
        let mut c = kiln(&home);
        c.args(["--coordinator", &url]);
        if let Some(k) = key {
            c.arg("--key").arg(k);
        }
        output(c.args(args))
    };
    let (_, out, _) = kiln_as(None, &["--json", "account", "balance"]);
    let account: serde_json::Value = serde_json::from_str(&out).unwrap();
    let buyer = account["account"].as_str().unwrap().to_string();
    assert_eq!(account["balance"], 0);

    // Money in: only an operator key records it, and once per reference.
    let deposit = [
        "operator",
        "deposit",
        "--account",
        &buyer,
        "--amount",
        "5",
        "--reference",
        "wire-1",
    ];
    let (code, _, err) = kiln_as(None, &deposit);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("not one of this coordinator's operator keys"),
        "{err}"
    );
    for again in [false, true] {
        let (code, out, err) = kiln_as(Some(&operator_key), &deposit);
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains("5.000000 cr"), "{out}");
        assert_eq!(out.contains("already recorded"), again, "{out}");
    }
    let (_, out, _) = kiln_as(None, &["--json", "account", "balance"]);
    let account: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(account["balance"], 5_000_000);

    // The buyer runs a job (once the node has registered).
    let mut spec = kiln_protocol::JobSpec::new(image.id.clone(), vec!["echo".into(), "hi".into()]);
    spec.resources.cpus = kiln_protocol::MilliCpu(500);
    spec.resources.memory = kiln_protocol::ByteSize(64 << 20);
    spec.resources.timeout = kiln_protocol::Seconds(60);
    let spec_path = dir.path().join("job.toml");
    std::fs::write(&spec_path, toml::to_string(&spec).unwrap()).unwrap();
    let (code, out, err) = kiln_as(
        None,
        &["job", "submit", "--wait", spec_path.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{out}\n{err}");

    // Money out: the provider's earnings, never more than it holds.
    let (_, out, _) = kiln_as(None, &["--json", "providers"]);
    let providers: serde_json::Value = serde_json::from_str(&out).unwrap();
    let provider = format!(
        "provider:{}",
        providers["providers"][0]["provider"].as_str().unwrap()
    );
    let (_, out, _) = kiln_as(
        None,
        &["--json", "account", "statement", "--account", &provider],
    );
    let earned = serde_json::from_str::<serde_json::Value>(&out).unwrap()["balance"]
        .as_u64()
        .unwrap();
    assert!(earned > 0, "the provider earned nothing: {out}");
    let too_much = format!("{}µcr", earned + 1);
    let (code, _, err) = kiln_as(
        Some(&operator_key),
        &[
            "operator",
            "payout",
            "--account",
            &provider,
            "--amount",
            &too_much,
            "--reference",
            "payout-0",
        ],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("less than the payout"), "{err}");
    let all = format!("{earned}µcr");
    let (code, out, err) = kiln_as(
        Some(&operator_key),
        &[
            "operator",
            "payout",
            "--account",
            &provider,
            "--amount",
            &all,
            "--reference",
            "payout-1",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("balance 0.000000 cr"), "{out}");
    let (_, out, _) = kiln_as(None, &["account", "statement", "--account", &provider]);
    assert!(
        out.contains("withdraw") && out.contains("payout:payout-1"),
        "{out}"
    );

    let (code, out, err) = kiln_as(None, &["ledger", "verify"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ledger verified"), "{out}");
    // The operator's key file as the global --key: the ledger command's
    // own key flag is not confused with it.
    let (code, out, err) = kiln_as(Some(&operator_key), &["ledger", "verify"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ledger verified"), "{out}");

    // A service manager stops both with SIGTERM: each shuts down in order
    // and exits 0.
    for (what, child) in [("node", &mut node.0), ("coordinator", &mut coordinator.0)] {
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what} ignored SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert_eq!(status.code(), Some(0), "{what}: {status:?}");
    }
}

/// Lists are tables with headers, money reads in credits, job ids may be
/// shortened to a unique prefix, and errors under `--json` are JSON
/// (issue 15, items 7 and 8), against the real binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lists_are_tables_and_job_ids_can_be_shortened() {
    use kiln_cli::devnet::{Devnet, DevnetOptions};
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
    let run = |args: &[&str]| kiln_at(home.path(), &url, args);
    let id = client
        .submit(
            dn.workload_spec(&["echo", "tabled"]),
            Some("my-label".into()),
        )
        .await
        .unwrap()
        .job_id;
    let done = kiln_cli::wait_for(&client, &id, std::time::Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, kiln_protocol::JobState::Completed);
    let full = id.to_string();
    let prefix = &full[..8];

    let (code, out, err) = run(&["job", "list"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "LABEL", "STATE", "PROVIDER", "AGE", "COST"],
        "{out}"
    );
    let row = lines.iter().find(|l| l.starts_with(&full[..12])).unwrap();
    for want in ["my-label", "completed", " cr"] {
        assert!(row.contains(want), "{row}");
    }

    // A prefix is as good as the id.
    let (code, out, err) = run(&["job", "status", prefix]);
    assert_eq!(code, Some(0), "{err}");
    for want in [
        &*format!("job       {full}"),
        "state     completed",
        "cost ",
        "events",
        "echo tabled",
    ] {
        assert!(out.contains(want), "expected `{want}` in:\n{out}");
    }
    let (code, out, err) = run(&["job", "logs", prefix]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("tabled"), "{out}");
    let unused = (0u32..)
        .map(|n| format!("{n:06x}"))
        .find(|p| !full.starts_with(p.as_str()))
        .unwrap();
    let (code, _, err) = run(&["job", "status", &unused]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("none of your jobs has an id starting with"),
        "{err}"
    );
    let (code, _, err) = run(&["job", "status", "xyz"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a job id"), "{err}");

    // Errors under --json are JSON.
    let (code, out, err) = run(&["--json", "job", "status", &unused]);
    assert_eq!(code, Some(1));
    assert!(out.is_empty(), "{out}");
    let e: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
    assert!(
        e["error"].as_str().unwrap().contains("starting with"),
        "{e}"
    );
    assert_eq!(e["exit_code"], 1);

    // Providers and offers.
    let (_, out, _) = run(&["providers"]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "PROVIDER",
            "GPU",
            "VRAM",
            "TFLOP/S",
            "CPUS",
            "MEMORY",
            "SLOTS",
            "PRICE",
            "REPUTATION",
            "CACHED",
            "SEEN"
        ],
        "{out}"
    );
    assert!(out.contains(&dn.nodes[0].provider.to_string()), "{out}");
    assert!(out.contains("cr/CPU-h"), "{out}");
    let (_, out, _) = run(&["offers", "search"]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "PROVIDER",
            "REGION",
            "GPU",
            "VRAM",
            "TFLOP/S",
            "PRICE",
            "FREE",
            "REPUTATION",
            "CACHED"
        ],
        "{out}"
    );
    let (code, out, _) = run(&["offers", "search", "num_gpus>=8"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), "no providers match `num_gpus>=8`");

    // Why a job waits: every constraint its providers fail (item 13).
    let mut spec = dn.workload_spec(&["echo", "never"]);
    spec.resources.cpus = kiln_protocol::MilliCpu(64_000);
    spec.resources.max_price_per_hour = kiln_protocol::Credits(10_000);
    spec.resources.region = Some("eu".into());
    let waiting = client.submit(spec, None).await.unwrap().job_id;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while !client
            .job(&waiting)
            .await
            .unwrap()
            .reason
            .is_some_and(|r| r.contains("each constraint"))
        {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    let (_, out, _) = run(&["job", "status", &waiting.to_string()[..8]]);
    for want in ["each constraint:", "region=eu fails 1", "cpus=64 fails 1"] {
        assert!(out.contains(want), "expected `{want}` in:\n{out}");
    }

    // Money reads in credits.
    let (_, out, _) = run(&["account", "balance"]);
    assert!(out.contains("balance ") && out.contains(" cr"), "{out}");
    assert!(!out.contains("µcr"), "{out}");
    dn.shutdown().await;
}

/// `kiln run` as `docker run`: the job's stdout on ours, its stderr on
/// ours, its exit code ours (issue 15), against the real binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kiln_run_prints_the_jobs_output_and_exits_with_its_code() {
    use kiln_cli::devnet::{Devnet, DevnetOptions};
    let home = tempfile::tempdir().unwrap();
    let dn = Devnet::start(DevnetOptions {
        providers: 1,
        http_port: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let url = dn.url();
    let run = |args: &[&str]| {
        output(
            kiln(home.path())
                .args(["--coordinator", &url, "run", "--memory", "64MiB"])
                .args(["--timeout", "60s", "--label", "from-run"])
                .args(args),
        )
    };
    let image = dn.image_id.clone();
    let (code, out, err) = run(&[
        "--cpus", "0.5", &image, "--", "echo", "hello", "from", "kiln",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "hello from kiln\n", "{err}");
    assert!(err.contains("submitted"), "{err}");
    let (code, out, err) = run(&["--cpus", "0.5", &image, "--", "exit", "7", "going", "away"]);
    assert_eq!(code, Some(7), "{out}\n{err}");
    assert!(err.contains("going away"), "{err}");
    assert!(err.contains("exit code 7"), "{err}");
    // Bad flags are refused before anything is submitted, naming them.
    let (code, _, err) = run(&["--cpus", "0", &image, "--", "echo"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--cpus"), "{err}");
    let (code, _, err) = run(&["--cpus", "0.5", "alpine:latest", "--", "echo"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("image"), "{err}");
    let (_, list, _) = kiln_at(home.path(), &url, &["job", "list"]);
    assert_eq!(list.matches("from-run").count(), 2, "{list}");
    dn.shutdown().await;
}

/// README's job.toml example is a valid spec (with a real image id in place
/// of the `sha256:…` placeholder), so what a new user copies works.
#[test]
fn the_readme_job_spec_parses() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme.find("cat > job.toml <<TOML\n").unwrap() + "cat > job.toml <<TOML\n".len();
    let end = start + readme[start..].find("\nTOML\n").unwrap();
    let text = readme[start..end].replace("sha256:…", &format!("sha256:{}", "a".repeat(64)));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    std::fs::write(&path, text).unwrap();
    let spec = kiln_cli::read_spec(&path).unwrap();
    assert_eq!(
        spec.resources.max_price_per_hour,
        kiln_protocol::Credits(1_000_000)
    );
}

/// README lists every command of the demo workload image (as its own
/// usage text names them).
#[test]
fn the_readme_lists_every_workload_command() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let workload = std::fs::read_to_string(format!("{root}/workload/src/main.rs")).unwrap();
    let usage =
        &workload[workload.find("commands:\n").unwrap()..workload.find("environment:").unwrap()];
    let commands: Vec<&str> = usage
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(commands.len() >= 10, "{commands:?}");
    for c in commands {
        assert!(
            readme.contains(&format!("| `{c}")),
            "README does not list `{c}`"
        );
    }
    assert!(readme.contains("`/out`"));
}

/// `kiln job logs --follow` prints what a running job writes while it runs
/// (read from its node through the coordinator), then the rest, each line
/// once, and exits with the job's code (issue 15, item 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn following_logs_shows_lines_before_the_job_ends() {
    use kiln_cli::devnet::{Devnet, DevnetOptions};
    use std::io::BufRead;
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
    let id = client
        .submit(dn.workload_spec(&["tick", "6", "700"]), None)
        .await
        .unwrap()
        .job_id;
    let mut child = kiln(home.path())
        .args([
            "--coordinator",
            &url,
            "job",
            "logs",
            "--follow",
            &id.to_string()[..8],
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Another buyer cannot read this job's live output (it does not exist
    // for them), and a rank it does not have is refused by name.
    let stranger = kiln_cli::Client::new(&url, kiln_protocol::Keypair::generate());
    match stranger.live_logs(&id, 0, 0, 0).await {
        Err(kiln_cli::client::ClientError::Api { status, .. }) => assert_eq!(status, 404),
        other => panic!("a stranger read the logs: {other:?}"),
    }
    match client.live_logs(&id, 3, 0, 0).await {
        Err(kiln_cli::client::ClientError::Api { status, field, .. }) => {
            assert_eq!((status, field.as_deref()), (400, Some("rank")));
        }
        other => panic!("rank 3 of a job of one: {other:?}"),
    }
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let first = tokio::task::spawn_blocking(move || {
        let first = rx.recv_timeout(std::time::Duration::from_secs(90));
        (first, rx)
    })
    .await
    .unwrap();
    let (first, rx) = first;
    let first = first.expect("no line while following");
    // Seen while the job still runs.
    let state = client.job(&id).await.unwrap().state;
    assert!(
        !state.is_terminal(),
        "the first line came only after the end ({state})"
    );
    assert_eq!(first, "tick 1");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let mut lines = vec![first];
    // The child has exited: the reader ends at EOF, and every line is in.
    lines.extend(
        tokio::task::spawn_blocking(move || rx.iter().collect::<Vec<_>>())
            .await
            .unwrap(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<String> = (1..=6).map(|i| format!("tick {i}")).collect();
    assert_eq!(lines, want, "each line once, in order");
    dn.shutdown().await;
}

/// `kiln completions <shell>` prints a script that knows every command,
/// without touching a key or a coordinator.
#[test]
fn shell_completions_name_every_command() {
    let home = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = kiln(home.path())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for cmd in ["run", "job", "logs", "data", "operator", "offers", "ledger"] {
            assert!(script.contains(cmd), "{shell} completion lacks `{cmd}`");
        }
    }
    assert!(
        !home.path().join("buyer.key").exists(),
        "no key was made for completions"
    );
}

/// A gang's `kiln job logs` says it shows rank 0 and how to see the
/// others (issue 15, item 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gangs_logs_say_which_rank_they_show() {
    use kiln_cli::devnet::{Devnet, DevnetOptions};
    let home = tempfile::tempdir().unwrap();
    let dn = Devnet::start(DevnetOptions {
        providers: 2,
        http_port: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let url = dn.url();
    let key = kiln_cli::buyer_key(&home.path().join("buyer.key")).unwrap();
    let client = kiln_cli::Client::new(&url, key);
    let mut spec = dn.workload_spec(&["echo", "from", "a", "rank"]);
    spec.resources.gang = 2;
    let id = client.submit(spec, None).await.unwrap().job_id;
    let done = kiln_cli::wait_for(&client, &id, std::time::Duration::from_secs(90), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, kiln_protocol::JobState::Completed, "{done:#?}");
    let out = kiln(home.path())
        .args(["--coordinator", &url, "job", "logs", &id.to_string()])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("from a rank"), "{stdout}");
    assert!(
        stderr.contains("rank 0 of a gang of 2") && stderr.contains("--rank 1"),
        "{stderr}"
    );
    dn.shutdown().await;
}

/// README's buyer path for an image of their own: `kiln image push`, `kiln
/// image ls`, then `kiln run kiln:<cid>` on a provider that never had it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_of_your_own_is_pushed_listed_and_run() {
    use kiln_cli::devnet::{Devnet, DevnetOptions};
    let home = tempfile::tempdir().unwrap();
    let dn = Devnet::start(DevnetOptions {
        providers: 1,
        http_port: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let url = dn.url();
    let docker = kiln_docker::connect().await.unwrap();
    let tag = format!(
        "kiln-cli-test:{}",
        &blake3::hash(home.path().to_string_lossy().as_bytes()).to_hex()[..12]
    );
    let layers = vec![
        kiln_docker::workload_layer().unwrap(),
        kiln_docker::layer_tar(&[("greeting", 0o444, tag.as_bytes())]).unwrap(),
    ];
    let id = kiln_docker::load_layers(&docker, &tag, &layers, &tag)
        .await
        .unwrap();
    let (code, out, err) = kiln_at(home.path(), &url, &["image", "push", "--quiet", &tag]);
    assert_eq!(code, Some(0), "{err}");
    let image = out.lines().next().unwrap().to_string();
    assert!(image.starts_with("kiln:bafyr"), "{out}");
    assert!(out.contains(&format!("image = \"{image}\"")), "{out}");
    assert!(out.contains(&id), "{out}");
    let (code, out, err) = kiln_at(home.path(), &url, &["image", "ls"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("IMAGE") && out.contains(&image) && out.contains(&tag),
        "{out}"
    );
    // The provider has never seen it: gone from the engine.
    let force = bollard::query_parameters::RemoveImageOptions {
        force: true,
        ..Default::default()
    };
    docker.remove_image(&tag, Some(force), None).await.unwrap();
    let (code, out, err) = kiln_at(
        home.path(),
        &url,
        &[
            "run",
            "--cpus",
            "0.5",
            "--memory",
            "64MiB",
            &image,
            "--",
            "hash",
            "/greeting",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&blake3::hash(tag.as_bytes()).to_hex().to_string()),
        "{out}\n{err}"
    );
    // A name that is not an image manifest is refused with the fix.
    let (code, _, err) = kiln_at(
        home.path(),
        &url,
        &[
            "run",
            "--cpus",
            "0.5",
            "kiln:bafkr4ifwl7loyh723uz52wxyey3bmb7tiymz4dlv54vmrxqvdolwkuwyq4",
            "--",
            "echo",
        ],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("kiln image push"), "{err}");
    dn.remove_cached_images().await.unwrap();
    dn.shutdown().await;
}
