//! The data plane end to end: datasets added by CID, mounted into real
//! containers, URL sources verified before anything starts, outputs fetched
//! by CID with verification, resumable downloads, owner-only access.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln_cli::devnet::{Devnet, DevnetOptions};
use kiln_protocol::Seconds;
use kiln_protocol::spec::InputSpec;
use kiln_protocol::views::{JobState, ProviderView};
use kiln_protocol::{ContentId, Manifest, ManifestEntry};
use kiln_tests::{buyer, devnet, devnet_with, run_job};
use tokio_util::sync::CancellationToken;

/// Writes `size` pseudo-random bytes (seeded) to `path`.
fn write_random(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let data = kiln_cli::bench_image::pseudo_random(size, seed);
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&data).unwrap();
    data
}

/// The output manifest the workload's `hash` mode produces for `listing`.
fn hash_output_cid(listing: &str) -> ContentId {
    Manifest::new(vec![ManifestEntry {
        path: "hashes.txt".into(),
        cid: ContentId::of_bytes(listing.as_bytes()),
        size: listing.len() as u64,
        executable: false,
    }])
    .unwrap()
    .cid()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_100_mib_dataset_by_cid_produces_the_expected_output_cid() {
    let dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let data = write_random(&path, 100 << 20, 3);

    let added = kiln_cli::data::add(&client, &path, false).await.unwrap();
    // The CID is CIDv1 raw + blake3, its digest exactly `b3sum` of the file.
    assert_eq!(added.cid.digest(), *blake3::hash(&data).as_bytes());
    assert_eq!(added.cid, ContentId::of_bytes(&data));
    assert_eq!(added.uploaded_bytes, 100 << 20);
    // Adding it again uploads nothing.
    let again = kiln_cli::data::add(&client, &path, false).await.unwrap();
    assert_eq!((again.cid, again.uploaded_bytes), (added.cid, 0));

    let mut spec = dn.workload_spec(&["hash", "/in/data.bin"]);
    spec.inputs.push(InputSpec::new(added.cid, "/in/data.bin"));
    spec.resources.timeout = kiln_protocol::Seconds(300);
    let done = run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let listing = format!("{}  /in/data.bin\n", blake3::hash(&data).to_hex());
    assert_eq!(
        done.output_cid.unwrap(),
        hash_output_cid(&listing),
        "the output CID is the manifest of the expected listing"
    );

    // The provider now holds the dataset and says so in its advert.
    let provider = dn.nodes[0].provider.to_string();
    assert!(
        advertises_cached(&client, &provider, &added.cid).await,
        "the provider advertises the dataset as cached"
    );
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_directory_dataset_is_mounted_as_a_tree_and_outputs_come_back_by_cid() {
    let dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(ds.join("sub")).unwrap();
    let a = write_random(&ds.join("a.bin"), 200_000, 1);
    let b = write_random(&ds.join("sub/b.bin"), 70_000, 2);
    std::fs::write(ds.join("sub/empty"), b"").unwrap();
    let added = kiln_cli::data::add(&client, &ds, false).await.unwrap();
    assert_eq!(added.kind, "directory");
    assert_eq!(added.files, 3);
    assert_eq!(
        added.cid.codec(),
        kiln_protocol::content::DAG_CBOR_CODEC,
        "a directory is a DAG-CBOR manifest"
    );

    // The job hashes the mounted tree and writes a large output (fetched
    // from the provider by CID, not inline).
    let mut spec = dn.workload_spec(&["hash", "/in/ds"]);
    spec.inputs.push(InputSpec::new(added.cid, "/in/ds"));
    let done = run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let listing = format!(
        "{}  /in/ds/a.bin\n{}  /in/ds/sub/b.bin\n{}  /in/ds/sub/empty\n",
        blake3::hash(&a).to_hex(),
        blake3::hash(&b).to_hex(),
        blake3::hash(b"").to_hex()
    );
    assert_eq!(done.output_cid.unwrap(), hash_output_cid(&listing));

    let spec = dn.workload_spec(&["write", "big.bin", "3000000", "9"]);
    let done = run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let id = done.job_id;
    let cache = kiln_blobs::Store::open_dir(&dir.path().join("cache"), Default::default()).unwrap();
    let out = dir.path().join("out");
    let nodes = kiln_cli::fetch_outputs_verified(&client, &cache, &id, &out, false)
        .await
        .unwrap();
    let r = &nodes[0].report;
    let bytes = std::fs::read(out.join("big.bin")).unwrap();
    assert_eq!(bytes.len(), 3_000_000);
    assert_eq!(r.files, 1);
    let big = ContentId::of_bytes(&bytes);
    // The job-scoped route streams the same bytes, honouring a range.
    let tail = client.job_blob(&id, &big, 2_999_000).await.unwrap();
    assert_eq!(tail, bytes[2_999_000..]);
    assert!(r.bytes_transferred >= 3_000_000, "{r:?}");
    let logs = client.logs(&id).await.unwrap();
    assert!(
        logs.stdout
            .contains(&blake3::hash(&bytes).to_hex().to_string()),
        "the job's own hash of what it wrote matches what arrived"
    );
    // The owner lists it; another buyer cannot read it, even by CID.
    let listed = client.blobs().await.unwrap();
    assert!(listed.blobs.iter().any(|b| b.cid == big));
    let stranger = buyer(&dn);
    let e = kiln_cli::data::fetch_blob(
        &stranger,
        &cache,
        ContentId::of_bytes(b"not here"),
        None,
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not one of your uploads"), "{e:#}");
    let cache2 =
        kiln_blobs::Store::open_dir(&dir.path().join("cache2"), Default::default()).unwrap();
    let e = kiln_cli::data::fetch_blob(&stranger, &cache2, big, None, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not one of your uploads"), "{e:#}");
    assert_eq!(
        stranger.missing(&[added.cid]).await.unwrap(),
        vec![added.cid],
        "holding it for someone else does not make it yours"
    );
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_download_resumes_with_only_the_remainder() {
    let dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let dir = tempfile::tempdir().unwrap();
    let size = 48 << 20;
    let data = write_random(&dir.path().join("d.bin"), size, 5);
    let added = kiln_cli::data::add(&client, &dir.path().join("d.bin"), false)
        .await
        .unwrap();
    let cache = kiln_blobs::Store::open_dir(&dir.path().join("cache"), Default::default()).unwrap();

    // Stop the first download once a third has arrived.
    let progress = kiln_cli::data::Progress::new("t", size as u64, false);
    let cancel = CancellationToken::new();
    let (p, c) = (progress.clone(), cancel.clone());
    tokio::spawn(async move {
        while p.done() < (size as u64) / 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        c.cancel();
    });
    let e = kiln_cli::data::fetch_blob(&client, &cache, added.cid, Some(&progress), &cancel)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("resume"), "{e:#}");
    assert!(!cache.has(&added.cid), "a partial blob is never visible");

    let out = dir.path().join("got.bin");
    let r = kiln_cli::data::get(
        &client,
        &cache,
        added.cid,
        &out,
        false,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(
        r.resumed_bytes >= (size as u64) / 4,
        "resumed from what was verified: {r:?}"
    );
    assert!(
        r.bytes_transferred < size as u64 - r.resumed_bytes + (size as u64) / 50,
        "only the remainder (plus proofs) was transferred: {r:?}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);
    dn.shutdown().await;
}

/// Serves fixed bytes over plain HTTP/1.1 on loopback (any path).
async fn serve_bytes(body: Vec<u8>) -> String {
    serve(move |_| Reply::Bytes(200, body.clone())).await.url
}

/// What a test URL answers to one request (`Range: bytes=a-b` parsed).
enum Reply {
    Bytes(u16, Vec<u8>),
    /// A 200 declaring this length, then 100 bytes every 50 ms.
    Trickle(u64),
}

/// A loopback HTTP/1.1 server (one request per connection) counting the
/// requests it got and the body bytes it sent.
struct Served {
    url: String,
    port: u16,
    hits: Arc<AtomicUsize>,
    sent: Arc<AtomicU64>,
}

async fn serve(reply: impl Fn(Option<(usize, usize)>) -> Reply + Send + Sync + 'static) -> Served {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (hits, sent) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicU64::new(0)));
    let (h, n) = (hits.clone(), sent.clone());
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (h, n, reply) = (h.clone(), n.clone(), reply.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = vec![0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let range = text
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.trim().split_once('-'))
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                match reply(range) {
                    Reply::Bytes(status, body) => {
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        if s.write_all(&body).await.is_ok() {
                            n.fetch_add(body.len() as u64, Ordering::SeqCst);
                        }
                    }
                    Reply::Trickle(len) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        loop {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            if s.write_all(&[b't'; 100]).await.is_err() {
                                break;
                            }
                            n.fetch_add(100, Ordering::SeqCst);
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Served {
        url: format!("http://{addr}/weights.bin"),
        port: addr.port(),
        hits,
        sent,
    }
}

/// A devnet of one provider that fetches URLs from loopback, where the
/// tests serve them (`kiln-node run --allow-private-urls`).
async fn loopback_devnet() -> Devnet {
    devnet_with(DevnetOptions {
        providers: 1,
        allow_private_urls: true,
        ..DevnetOptions::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_url_input_is_verified_and_a_mismatch_fails_before_the_container_starts() {
    let dn = loopback_devnet().await;
    let client = buyer(&dn);
    let good: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    let url = serve_bytes(good.clone()).await;
    let cid = ContentId::of_bytes(&good);

    let mut spec = dn.workload_spec(&["hash", "/in/w.bin"]);
    let mut input = InputSpec::new(cid, "/in/w.bin");
    input.url = Some(url.clone());
    spec.inputs.push(input);
    let done = run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let listing = format!("{}  /in/w.bin\n", blake3::hash(&good).to_hex());
    assert_eq!(done.output_cid.unwrap(), hash_output_cid(&listing));

    // The same URL claimed to hold other bytes: refused before any container.
    let claimed = ContentId::of_bytes(b"something else entirely");
    let mut spec = dn.workload_spec(&["echo", "must not run"]);
    let mut input = InputSpec::new(claimed, "/in/w.bin");
    input.url = Some(url);
    spec.inputs.push(input);
    let done = run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Failed, "{done:#?}");
    let reason = done.reason.as_deref().unwrap();
    assert!(
        reason.contains(&claimed.to_string()) && reason.contains("does not match"),
        "the wanted CID is named: {reason}"
    );
    assert!(
        !reason.contains(&cid.to_string()),
        "what the URL really serves stays in the provider's log: {reason}"
    );
    assert_eq!(
        done.usage.as_ref().map(|u| u.wall_ms),
        Some(0),
        "no container ran: {done:#?}"
    );
    assert_eq!(
        done.receipt
            .as_ref()
            .map(|r| r.payload.image_digest.as_str()),
        Some(""),
        "{done:#?}"
    );
    let id = done.job_id;
    let logs = client.logs(&id).await.unwrap();
    assert!(!logs.stdout.contains("must not run"));
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_are_checked_against_their_cid() {
    let dn = devnet(1).await.unwrap();
    let client = buyer(&dn);
    let claimed = ContentId::of_bytes(b"the real bytes");
    let e = client
        .put_blob(&claimed, 9, "x", reqwest::Body::from(b"fake data".to_vec()))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&claimed.to_string())
            && msg.contains(&ContentId::of_bytes(b"fake data").to_string()),
        "{msg}"
    );
    assert_eq!(client.missing(&[claimed]).await.unwrap(), vec![claimed]);
    client
        .put_blob(
            &claimed,
            14,
            "x",
            reqwest::Body::from(b"the real bytes".to_vec()),
        )
        .await
        .unwrap();
    assert!(client.missing(&[claimed]).await.unwrap().is_empty());
    dn.shutdown().await;
}

/// Knowing a CID is not permission to use it: a job may name only data its
/// owner may read, directly or as a file of a directory manifest, and a
/// URL does not unlock someone else's cached copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_cannot_name_another_buyers_data() {
    let dn = loopback_devnet().await;
    let (alice, bob) = (buyer(&dn), buyer(&dn));
    let secret = b"alice's private weights".to_vec();
    let cid = alice.upload(secret.clone()).await.unwrap();

    let field_of = |e: kiln_cli::ClientError| match e {
        kiln_cli::ClientError::Api {
            status,
            field,
            message,
        } => (status, field.unwrap_or_default(), message),
        other => panic!("expected a 400, got {other:?}"),
    };
    // 1. Bob names Alice's CID directly.
    let mut spec = dn.workload_spec(&["hash", "/in/w"]);
    spec.inputs.push(InputSpec::new(cid, "/in/w"));
    let (status, field, msg) = field_of(bob.submit(spec.clone(), None).await.unwrap_err());
    assert_eq!(
        (status, field.as_str()),
        (400, "spec.inputs[0].cid"),
        "{msg}"
    );
    assert!(
        msg.contains(&cid.to_string()) && msg.contains("kiln data add"),
        "{msg}"
    );

    // 2. Bob uploads a directory manifest (his own upload) listing her file.
    let m = Manifest::new(vec![ManifestEntry {
        path: "w".into(),
        cid,
        size: secret.len() as u64,
        executable: false,
    }])
    .unwrap();
    let bytes = m.to_dag_cbor();
    let dir_cid = m.cid();
    bob.put_blob(
        &dir_cid,
        bytes.len() as u64,
        "dir",
        reqwest::Body::from(bytes),
    )
    .await
    .unwrap();
    let mut spec = dn.workload_spec(&["hash", "/in/d/w"]);
    spec.inputs.push(InputSpec::new(dir_cid, "/in/d"));
    let (status, field, msg) = field_of(bob.submit(spec, None).await.unwrap_err());
    assert_eq!(
        (status, field.as_str()),
        (400, "spec.inputs[0].cid"),
        "{msg}"
    );
    assert!(msg.contains("lists w"), "{msg}");

    // 3. Alice's job caches her file on the provider; Bob then names it
    //    with a URL that serves other bytes: the job fails before any
    //    container starts, and nothing of hers reaches his outputs.
    let mut spec = dn.workload_spec(&["hash", "/in/w"]);
    spec.inputs.push(InputSpec::new(cid, "/in/w"));
    let done = run_job(&alice, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let url = serve_bytes(vec![b'x'; secret.len()]).await;
    let mut spec = dn.workload_spec(&["hash", "/in/w"]);
    let mut input = InputSpec::new(cid, "/in/w");
    input.url = Some(url);
    spec.inputs.push(input);
    let done = run_job(&bob, spec).await.unwrap();
    assert_eq!(done.state, JobState::Failed, "{done:#?}");
    let reason = done.reason.as_deref().unwrap_or_default();
    assert!(reason.contains(&cid.to_string()), "{reason}");
    assert_eq!(done.exit_code, None, "{done:#?}");
    dn.shutdown().await;
}

/// Issue 13, finding 2: Alice's file is cached on the provider, and Bob
/// knows all of it but the last 16 KiB group (a fine-tune shares most
/// groups with its public base model). His URL answers every range it knows
/// correctly, which passed a one-random-range proof with probability 63/64;
/// now the URL must serve every byte, so his job fails before any
/// container and never sees her copy. An honest URL for the same cached
/// CID still works (and serves the whole file).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_url_that_knows_part_of_a_cached_file_cannot_unlock_it() {
    let dn = loopback_devnet().await;
    let (alice, bob) = (buyer(&dn), buyer(&dn));
    let dir = tempfile::tempdir().unwrap();
    let secret = write_random(&dir.path().join("w.bin"), 64 * 16 * 1024, 77);
    let cid = alice.upload(secret.clone()).await.unwrap();
    let mut spec = dn.workload_spec(&["hash", "/in/w"]);
    spec.inputs.push(InputSpec::new(cid, "/in/w"));
    let done = run_job(&alice, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert!(advertises_cached(&bob, &done.provider.unwrap().to_string(), &cid).await);

    let known = secret.len() - 16 * 1024;
    let partial = {
        let secret = secret.clone();
        serve(move |range| match range {
            Some((a, b)) if a <= b && b < known => Reply::Bytes(206, secret[a..=b].to_vec()),
            _ => {
                let mut guess = secret.clone();
                guess[known..].fill(0);
                Reply::Bytes(200, guess)
            }
        })
        .await
    };
    let bobs = |url: &str| {
        let mut spec = dn.workload_spec(&["hash", "/in/w"]);
        let mut input = InputSpec::new(cid, "/in/w");
        input.url = Some(url.to_string());
        spec.inputs.push(input);
        spec
    };
    let done = run_job(&bob, bobs(&partial.url)).await.unwrap();
    assert_eq!(done.state, JobState::Failed, "{done:#?}");
    let reason = done.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains(&cid.to_string()) && reason.contains("does not match"),
        "{reason}"
    );
    assert_eq!(
        done.usage.as_ref().map(|u| u.wall_ms),
        Some(0),
        "no container ran"
    );
    assert_eq!(done.exit_code, None, "{done:#?}");
    let listing = format!("{}  /in/w\n", blake3::hash(&secret).to_hex());
    assert_ne!(
        done.output_cid,
        Some(hash_output_cid(&listing)),
        "{done:#?}"
    );
    assert!(
        partial.hits.load(Ordering::SeqCst) >= 1,
        "the URL was asked"
    );

    let honest = serve({
        let secret = secret.clone();
        move |_| Reply::Bytes(200, secret.clone())
    })
    .await;
    let done = run_job(&bob, bobs(&honest.url)).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.output_cid.unwrap(), hash_output_cid(&listing));
    assert_eq!(
        honest.sent.load(Ordering::SeqCst),
        secret.len() as u64,
        "the honest URL served the whole file although it was cached"
    );
    dn.shutdown().await;
}

/// Issue 13, finding 4: a provider that does not allow private URLs (the
/// default) never contacts its own loopback, LAN or the metadata address
/// for a buyer, says only what kind of address it was, and keeps working;
/// a provider started with `--allow-private-urls` fetches the same URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_url_on_the_providers_own_network_is_refused_unless_it_allows_them() {
    let mut dn = devnet(0).await.unwrap();
    let strict = kiln_tests::add_node_with(&mut dn, |c| c.region = Some("zone-a".into()))
        .await
        .unwrap();
    let open = kiln_tests::add_node_with(&mut dn, |c| {
        c.region = Some("zone-b".into());
        c.allow_private_urls = true;
    })
    .await
    .unwrap();
    let client = buyer(&dn);
    let body = b"the provider's internal admin page".to_vec();
    let cid = ContentId::of_bytes(&body);
    let inside = serve({
        let body = body.clone();
        move |_| Reply::Bytes(200, body.clone())
    })
    .await;
    let job = |url: String, region: &str| {
        let mut spec = dn.workload_spec(&["hash", "/in/page"]);
        let mut input = InputSpec::new(cid, "/in/page");
        input.url = Some(url);
        spec.inputs.push(input);
        spec.resources.region = Some(region.into());
        spec
    };
    for (url, class) in [
        (
            format!("http://localhost:{}/admin", inside.port),
            "loopback",
        ),
        (inside.url.clone(), "loopback"),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            "link-local",
        ),
    ] {
        let done = run_job(&client, job(url.clone(), "zone-a")).await.unwrap();
        assert_eq!(done.state, JobState::Failed, "{done:#?}");
        assert_eq!(done.provider, Some(strict));
        let reason = done.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains(&format!(
                "{class} address, which this provider does not fetch from"
            )),
            "{url}: {reason}"
        );
        assert!(
            url.contains("127.0.0.1") || !reason.contains("127.0.0.1"),
            "the resolved address is not told: {reason}"
        );
        assert_eq!(
            done.usage.as_ref().map(|u| u.wall_ms),
            Some(0),
            "no container ran"
        );
    }
    assert_eq!(inside.hits.load(Ordering::SeqCst), 0, "never contacted");

    // Honest work goes on on the same provider.
    let mut spec = dn.workload_spec(&["echo", "still here"]);
    spec.resources.region = Some("zone-a".into());
    let done = run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    // The provider that allows private URLs fetches the same one.
    let done = run_job(&client, job(inside.url.clone(), "zone-b"))
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.provider, Some(open));
    assert_eq!(inside.hits.load(Ordering::SeqCst), 1);
    dn.shutdown().await;
}

/// Issue 13, finding 4 (slots): a URL that trickles bytes forever cannot
/// hold the provider's only slot: the fetch ends at the job's timeout and
/// a job queued behind it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trickling_url_gives_its_slot_back_at_the_jobs_timeout() {
    let dn = devnet_with(DevnetOptions {
        providers: 1,
        slots: 1,
        allow_private_urls: true,
        ..DevnetOptions::default()
    })
    .await
    .unwrap();
    let client = buyer(&dn);
    let trickle = serve(|_| Reply::Trickle(10 << 20)).await;
    let mut spec = dn.workload_spec(&["hash", "/in/w"]);
    spec.resources.timeout = Seconds(4);
    let mut input = InputSpec::new(ContentId::of_bytes(b"never arrives"), "/in/w");
    input.url = Some(trickle.url.clone());
    spec.inputs.push(input);
    let started = Instant::now();
    let slow = client.submit(spec, None).await.unwrap();
    let honest = client
        .submit(dn.workload_spec(&["echo", "next in line"]), None)
        .await
        .unwrap();
    let done = kiln_cli::wait_for(&client, &honest.job_id, Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    let slow = kiln_cli::wait_for(&client, &slow.job_id, Duration::from_secs(30), |_| {})
        .await
        .unwrap();
    assert_eq!(slow.state, JobState::Failed, "{slow:#?}");
    let reason = slow.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("did not finish within"), "{reason}");
    assert!(trickle.sent.load(Ordering::SeqCst) > 0, "it was trickling");
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "{:?}",
        started.elapsed()
    );
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_fetches_an_input_from_the_peer_that_cached_it() {
    let mut dn = devnet(0).await.unwrap();
    let a = kiln_tests::add_node_with(&mut dn, |c| c.region = Some("zone-a".into()))
        .await
        .unwrap();
    let b = kiln_tests::add_node_with(&mut dn, |c| c.region = Some("zone-b".into()))
        .await
        .unwrap();
    let client = buyer(&dn);
    let dir = tempfile::tempdir().unwrap();
    let data = write_random(&dir.path().join("x.bin"), 6 << 20, 11);
    let cid = kiln_cli::data::add(&client, &dir.path().join("x.bin"), false)
        .await
        .unwrap()
        .cid;
    let base = dn.workload_spec(&["hash", "/in/x.bin"]);
    let job = |region: &str| {
        let mut spec = base.clone();
        spec.inputs.push(InputSpec::new(cid, "/in/x.bin"));
        spec.resources.region = Some(region.into());
        spec
    };
    let done = run_job(&client, job("zone-a")).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.provider, Some(a));
    // Wait until node A advertises the input as cached.
    assert!(
        advertises_cached(&client, &a.to_string(), &cid).await,
        "node A advertises the input"
    );
    // Node A restarts (new listen port): it still knows the input is
    // shareable, and says so in the advert that carries its new address.
    let restarted = kiln_tests::restart_node(&mut dn, 0, |c| c.region = Some("zone-a".into()))
        .await
        .unwrap();
    assert_eq!(restarted, a, "same state dir, same identity");
    let new_addrs: Vec<String> = dn.nodes[0]
        .listen_addrs
        .iter()
        .map(ToString::to_string)
        .collect();
    let fresh = advert_until(&client, &a.to_string(), |p| {
        p.addrs == new_addrs && p.cached.contains(&cid)
    })
    .await;
    assert!(
        fresh,
        "the restarted node A advertises the input from its new address"
    );
    // The coordinator forgets it: node B can only get it from node A.
    assert!(dn.coordinator.state.blobs.remove(&cid).unwrap());
    let done = run_job(&client, job("zone-b")).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.provider, Some(b));
    let listing = format!("{}  /in/x.bin\n", blake3::hash(&data).to_hex());
    assert_eq!(done.output_cid.unwrap(), hash_output_cid(&listing));

    // A stranger that knows the CID and node A's address gets nothing: no
    // job entitles it, so the coordinator tells A not to serve it.
    let cancel = CancellationToken::new();
    let (stranger, mut events, ev) = kiln_net::spawn(
        kiln_protocol::Keypair::generate().to_libp2p(),
        kiln_net::NetConfig::default(),
        cancel.clone(),
    )
    .await
    .unwrap();
    tokio::spawn(ev.run());
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let scratch = tempfile::tempdir().unwrap();
    let mine = kiln_blobs::Store::open_dir(scratch.path(), Default::default()).unwrap();
    let node_a = kiln_blobs::Source {
        peer: a.peer_id(),
        addrs: dn.nodes[0].listen_addrs.clone(),
    };
    let e = kiln_blobs::fetch(
        &mine,
        &stranger,
        cid,
        None,
        vec![node_a],
        &kiln_blobs::FetchOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("may not fetch"), "{e}");
    assert!(!mine.has(&cid));
    cancel.cancel();
    dn.shutdown().await;
}

/// Whether `provider`'s advert lists `cid` as cached, once it has had
/// time to re-advertise.
async fn advertises_cached(client: &kiln_cli::Client, provider: &str, cid: &ContentId) -> bool {
    advert_until(client, provider, |p| p.cached.contains(cid)).await
}

/// Whether `provider`'s listing (`GET /v1/providers`) comes to satisfy `ok`.
async fn advert_until(
    client: &kiln_cli::Client,
    provider: &str,
    ok: impl Fn(&ProviderView) -> bool,
) -> bool {
    kiln_tests::eventually(
        || async {
            let ps = client.providers().await.unwrap_or_default();
            ps.providers
                .iter()
                .any(|p| p.provider.to_string() == provider && ok(p))
        },
        |c| *c,
    )
    .await
}
