#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
//! Crash safety: the real `kiln-coordinator` binary is SIGKILLed again and
//! again while jobs are submitted, dispatched and settled. After the last
//! restart every job has completed exactly once, the ledger replays from
//! genesis against the coordinator's published key, the stored balances
//! match the replay, and they add up to the work done.
//!
//! It runs on the embedded SQLite database and again on PostgreSQL
//! (`--db postgres://…`, a fresh database on the server named by
//! `KILN_TEST_POSTGRES`, as the integration suite's): a process killed
//! inside a write transaction there holds the writers' advisory lock, which
//! the server must release with the dropped connection.
//!
//! The provider is a scripted libp2p peer (this crate never depends on the
//! node crate): it accepts each offer id once and delivers an honest signed
//! receipt, retrying until the coordinator answers, as a real node does.

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_contracts::chain::{LedgerEntry, verify_chain};
use kiln_contracts::{AccountId, Credits, compare_balances};
use kiln_net::{NetConfig, NetEvent};
use kiln_protocol::{
    Blob, BuyerId, ByteSize, CapabilityAdvert, ContentId, CpuInfo, JobId, JobResult, JobSpec,
    JobSubmission, Keypair, Manifest, MilliCpu, NetRequest, NetResponse, Outcome, ProviderId,
    PublicKey, ResourceUsage, ResultReceipt, Seconds, Signed, UnixMillis,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const FAUCET: u64 = 1_000_000_000;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn spawn(dir: &Path, http: u16, p2p: u16, db: Option<&str>) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln-coordinator"));
    c.args([
        "run",
        "--http",
        &format!("127.0.0.1:{http}"),
        "--p2p",
        &format!("/ip4/127.0.0.1/tcp/{p2p}"),
    ])
    .args(["--faucet", &FAUCET.to_string()])
    .arg("--state-dir")
    .arg(dir)
    .env("RUST_LOG", "error")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Some(db) = db {
        c.args(["--db", db]);
    }
    c.spawn().expect("kiln-coordinator binary")
}

const DEFAULT_POSTGRES: &str = "postgres://kiln:kiln@127.0.0.1:5432/postgres";

/// A fresh database on the test server (`KILN_TEST_POSTGRES`, as the
/// integration suite's) and a guard that drops it.
async fn fresh_postgres(name: &str) -> (String, impl Drop) {
    use sqlx::Connection;
    let server = std::env::var("KILN_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_POSTGRES.into());
    let mut admin = sqlx::PgConnection::connect(&server).await.unwrap_or_else(|e| {
        panic!(
            "this test needs a PostgreSQL server at {server} ({e}): set KILN_TEST_POSTGRES to a URL \
             whose account may CREATE DATABASE; `bash .ci/run` starts one"
        )
    });
    let db = format!("kiln_crash_{}_{name}", std::process::id());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let (base, _) = server.rsplit_once('/').unwrap();
    struct DropDb(String, String);
    impl Drop for DropDb {
        fn drop(&mut self) {
            // Best effort, on a fresh thread with its own runtime (this may
            // run inside the test's runtime).
            let (server, db) = (self.0.clone(), self.1.clone());
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async {
                        use sqlx::Connection;
                        if let Ok(mut c) = sqlx::PgConnection::connect(&server).await {
                            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                                "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
                            )))
                            .execute(&mut c)
                            .await;
                        }
                    });
                }
            })
            .join();
        }
    }
    (format!("{base}/{db}"), DropDb(server, db))
}

/// Waits until the HTTP API answers (the coordinator verifies its whole
/// ledger before it serves anything); returns `/v1/info`.
async fn wait_up(http: &reqwest::Client, base: &str) -> Value {
    for _ in 0..300 {
        if let Ok(r) = http.get(format!("{base}/v1/info")).send().await
            && let Ok(v) = r.json::<Value>().await
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the coordinator did not come back up (did its ledger fail to verify?)");
}

/// A signed request header for `coordinator` (no body).
fn auth(key: &Keypair, coordinator: ProviderId, method: &str, path: &str) -> String {
    kiln_protocol::request_auth::RequestAuth::new(coordinator, method, path, b"")
        .sign_header(key, 60)
        .unwrap()
}

/// A provider that accepts each offer once and delivers its result until the
/// coordinator takes it.
async fn provider(coordinator: kiln_net::Addr, cancel: CancellationToken) {
    let key = Keypair::generate();
    let id = ProviderId::from_public_key(&key.public());
    let (net, mut events, ev) =
        kiln_net::spawn(key.to_libp2p(), NetConfig::default(), cancel.clone())
            .await
            .unwrap();
    tokio::spawn(ev.run());
    let peer = kiln_net::peer_of(&coordinator).unwrap();
    let advert = CapabilityAdvert {
        provider: id,
        protocol_version: kiln_protocol::PROTOCOL_VERSION,
        node_version: "crash-test".into(),
        listen_addrs: net.listen_addrs().iter().map(ToString::to_string).collect(),
        cpu: CpuInfo {
            model: "test".into(),
            logical_cores: 8,
            matmul_mflops: 1,
        },
        memory: ByteSize(16 << 30),
        gpus: vec![],
        slots: 4,
        price_per_cpu_hour: Credits(3_600_000),
        price_per_gpu_hour: Credits(0),
        runtime: "none".into(),
        allows_network: false,
        issued_at: UnixMillis::now(),
        benchmark: None,
        region: None,
        disk: ByteSize(0),
        cached: vec![],
        registries: Vec::new(),
    };
    let mut seen = HashSet::new();
    let mut pending: Vec<JobResult> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {
                let signed = Signed::sign(&key, advert.clone(), 60).unwrap();
                let _ = net.request(peer, vec![coordinator.clone()], NetRequest::Register(signed)).await;
                let mut still = Vec::new();
                for r in pending.drain(..) {
                    match net.request(peer, vec![coordinator.clone()], NetRequest::Result(Box::new(r.clone()))).await {
                        Ok(NetResponse::Accepted) => {}
                        Ok(NetResponse::Rejected { reason }) => panic!("an honest result was refused: {reason}"),
                        _ => still.push(r),
                    }
                }
                pending = still;
            }
            Some(ev) = events.recv() => {
                if let NetEvent::Request { request: NetRequest::Offer(o), reply, .. } = ev {
                    let _ = reply.send(NetResponse::Accepted);
                    if seen.insert(o.payload.offer_id) {
                        pending.push(result_for(&o.payload, &key, id));
                    }
                } else if let NetEvent::Request { reply, .. } = ev {
                    let _ = reply.send(NetResponse::Rejected { reason: "unexpected".into() });
                }
            }
        }
    }
}

fn result_for(offer: &kiln_protocol::JobOffer, key: &Keypair, id: ProviderId) -> JobResult {
    let out = format!("ran {}\n", offer.job_id).into_bytes();
    let manifest = Manifest::default();
    let now = UnixMillis::now();
    let receipt = ResultReceipt {
        job_id: offer.job_id,
        offer_id: offer.offer_id,
        provider: id,
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        error: None,
        image_digest: offer.spec.image.0.clone(),
        input_cids: vec![],
        output_cid: manifest.cid(),
        stdout_cid: ContentId::of_bytes(&out),
        stderr_cid: ContentId::of_bytes(b""),
        started_at: now,
        finished_at: now,
        usage: ResourceUsage {
            wall_ms: 1_500,
            stdout_bytes: out.len() as u64,
            ..Default::default()
        },
    };
    JobResult {
        job_id: offer.job_id,
        receipt: Signed::sign(key, receipt, 3600).unwrap(),
        manifest,
        blobs: vec![
            Blob {
                cid: ContentId::of_bytes(&out),
                bytes: out,
            },
            Blob {
                cid: ContentId::of_bytes(b""),
                bytes: vec![],
            },
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_any_point_never_loses_or_doubles_a_payment() {
    crash_run(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_any_point_never_loses_or_doubles_a_payment_on_postgres() {
    let (url, _drop) = fresh_postgres("sigkill").await;
    crash_run(Some(&url)).await;
}

/// `--db` names what is wrong and what to use, without echoing a password.
#[test]
fn an_unsupported_database_is_refused_naming_what_to_use() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-coordinator"))
        .args([
            "run",
            "--db",
            "mysql://root:hunter2@db.internal/kiln",
            "--state-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("postgres://user:password@host/dbname"),
        "{err}"
    );
    assert!(
        !err.contains("hunter2"),
        "the password is not echoed: {err}"
    );
}

async fn crash_run(db: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let (http_port, p2p_port) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{http_port}");
    let http = reqwest::Client::new();
    let spawn = |dir: &Path, http: u16, p2p: u16| spawn(dir, http, p2p, db);
    let mut coordinator = spawn(dir.path(), http_port, p2p_port);
    let info = wait_up(&http, &base).await;
    let peer = info["peer_id"].as_str().unwrap();
    let coordinator_id: ProviderId = peer.parse().unwrap();
    let addr: kiln_net::Addr = format!("/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{peer}")
        .parse()
        .unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(provider(addr, cancel.clone()));

    let buyer = Keypair::generate();
    let image = format!("sha256:{}", "ab".repeat(32));
    let mut jobs: Vec<JobId> = Vec::new();
    let mut kills = 0;
    for i in 0..12u32 {
        let mut spec = JobSpec::new(image.clone(), vec![format!("job-{i}")]);
        spec.resources.cpus = MilliCpu(1000);
        spec.resources.timeout = Seconds(60);
        spec.resources.max_price_per_hour = Credits(10_000_000);
        let signed = Signed::sign(&buyer, JobSubmission { spec, label: None }, 600).unwrap();
        // Retried until accepted: the same signed submission is the same job.
        let v: Value = loop {
            match http
                .post(format!("{base}/v1/jobs"))
                .json(&signed)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => break r.json().await.unwrap(),
                Ok(r) => panic!("submission refused: {}", r.text().await.unwrap_or_default()),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        jobs.push(v["job_id"].as_str().unwrap().parse().unwrap());
        // Kill at varying points: right after a submission, mid-dispatch, mid-settlement.
        if i % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(u64::from(i) * 40)).await;
            coordinator.kill().unwrap();
            coordinator.wait().unwrap();
            kills += 1;
            coordinator = spawn(dir.path(), http_port, p2p_port);
            wait_up(&http, &base).await;
        }
    }
    assert_eq!(kills, 6);

    // Every job completes exactly once.
    let mut costs = 0u64;
    for id in &jobs {
        let path = format!("/v1/jobs/{id}");
        let mut last = Value::Null;
        for _ in 0..600 {
            if let Ok(r) = http
                .get(format!("{base}{path}"))
                .header("authorization", auth(&buyer, coordinator_id, "GET", &path))
                .send()
                .await
            {
                last = r.json().await.unwrap_or(Value::Null);
                if last["state"] == "completed" {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(last["state"], "completed", "{last:#}");
        let completions = last["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["state"] == "completed")
            .count();
        assert_eq!(completions, 1, "{last:#}");
        costs += last["cost"].as_u64().unwrap();
    }
    assert!(costs > 0);

    // One more kill after everything settled, then audit from the outside.
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    let mut coordinator = spawn(dir.path(), http_port, p2p_port);
    let info = wait_up(&http, &base).await;
    let key: PublicKey = info["public_key"].as_str().unwrap().parse().unwrap();
    let page: Value = http
        .get(format!("{base}/v1/ledger?from=0&limit=10000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries: Vec<Signed<LedgerEntry>> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Signed::from_bytes(&hex::decode(e["entry"].as_str().unwrap()).unwrap()).unwrap())
        .collect();
    let ledger = verify_chain(&entries, &key).expect("the ledger replays from genesis");
    let stored: Value = http
        .get(format!("{base}/v1/ledger/balances"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stored: BTreeMap<AccountId, Credits> =
        serde_json::from_value(stored["balances"].clone()).unwrap();
    compare_balances(&ledger, &stored).expect("stored balances equal the replay");

    // The money adds up to the work done: nothing lost, nothing doubled.
    let buyer_acct = AccountId::Buyer(BuyerId::new(buyer.public()));
    assert_eq!(ledger.balance(&buyer_acct).0, FAUCET - costs);
    let earned: u64 = ledger
        .balances()
        .iter()
        .filter(|(a, _)| !matches!(a, AccountId::Buyer(_)))
        .map(|(_, c)| c.0)
        .sum();
    // The faucet also funds each new provider once (so it can stake): that
    // deposit aside, provider + fee = exactly what the buyer paid.
    assert_eq!(
        ledger.total_deposited().0,
        2 * FAUCET,
        "one buyer and one provider faucet grant"
    );
    assert_eq!(
        earned - FAUCET,
        costs,
        "provider + fee = what the buyer paid"
    );
    assert!(
        ledger.escrows().values().all(|e| !e.is_open()),
        "every escrow is settled"
    );
    assert_eq!(
        ledger.escrows().len(),
        jobs.len(),
        "one escrow per job, none doubled"
    );
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    cancel.cancel();
}
