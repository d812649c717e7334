//! Bring your own image (issue 14): images pushed as content-addressed
//! data, fetched by providers like datasets (and from each other), loaded
//! into the real engine; registry pulls by digest from a real loopback
//! registry where a provider allows it; and every bad image failing before
//! a container starts, with nothing left in the engine.

use bollard::Docker;
use kiln_cli::devnet::Devnet;
use kiln_protocol::views::{BlobKind, JobState, JobView};
use kiln_protocol::{ContentId, ImageManifest, ImageRef, JobSpec, OciDigest};
use kiln_tests::{LoopbackRegistry, buyer, devnet, reason, run_job};

/// An image no provider has: the workload binary plus a layer holding
/// `/marker`, a file of `size` random bytes. Loaded into the engine as
/// `tag`; returns the marker's bytes and the image id.
async fn buyers_image(docker: &Docker, tag: &str, size: usize) -> (Vec<u8>, String) {
    let seed = u64::from_le_bytes(
        blake3::hash(tag.as_bytes()).as_bytes()[..8]
            .try_into()
            .unwrap(),
    );
    let marker = kiln_cli::bench_image::pseudo_random(size, seed);
    let layers = vec![
        kiln_docker::workload_layer().unwrap(),
        kiln_docker::layer_tar(&[("marker", 0o444, &marker)]).unwrap(),
    ];
    let id = kiln_docker::load_layers(docker, tag, &layers, tag)
        .await
        .unwrap();
    (marker, id)
}

/// A fresh name for a test image.
fn fresh_tag(what: &str) -> String {
    let n: u64 = rand_u64();
    format!("kiln-test-{what}:{n:016x}")
}

fn rand_u64() -> u64 {
    let k = kiln_protocol::Keypair::generate();
    u64::from_le_bytes(k.public().as_bytes()[..8].try_into().unwrap())
}

/// The workload hashing `/marker`, in `image`.
fn hash_marker(dn: &Devnet, image: &str) -> JobSpec {
    let mut spec = dn.workload_spec(&["hash", "/marker"]);
    spec.image = ImageRef(image.to_string());
    spec.resources.timeout = kiln_protocol::Seconds(120);
    spec
}

/// The output manifest of `hash /marker` for these bytes.
fn marker_output(marker: &[u8]) -> ContentId {
    let listing = format!("{}  /marker\n", blake3::hash(marker).to_hex());
    kiln_protocol::Manifest::new(vec![kiln_protocol::ManifestEntry {
        path: "hashes.txt".into(),
        cid: ContentId::of_bytes(listing.as_bytes()),
        size: listing.len() as u64,
        executable: false,
    }])
    .unwrap()
    .cid()
}

/// Runs `image`'s hash job on the provider in `region`; it must fail
/// before its container starts. Returns the job and its reason.
async fn fails(
    dn: &Devnet,
    client: &kiln_cli::Client,
    image: &str,
    region: &str,
) -> (JobView, String) {
    let mut spec = hash_marker(dn, image);
    spec.resources.region = Some(region.into());
    let done = run_job(client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Failed, "{region}: {done:#?}");
    assert_eq!(done.exit_code, None, "no container ran: {done:#?}");
    let why = done.reason.clone().unwrap_or_default();
    (done, why)
}

async fn engine_has(docker: &Docker, reference: &str) -> bool {
    kiln_docker::image_exists(docker, reference)
        .await
        .unwrap()
        .is_some()
}

async fn remove(docker: &Docker, reference: &str) {
    let opts = bollard::query_parameters::RemoveImageOptions {
        force: true,
        ..Default::default()
    };
    let _ = docker.remove_image(reference, Some(opts), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pushed_image_runs_where_it_never_was_and_the_next_provider_fetches_it_from_the_first() {
    let mut dn = devnet(0).await.unwrap();
    let a = kiln_tests::add_node_with(&mut dn, |c| c.region = Some("zone-a".into()))
        .await
        .unwrap();
    let b = kiln_tests::add_node_with(&mut dn, |c| c.region = Some("zone-b".into()))
        .await
        .unwrap();
    let docker = kiln_docker::connect().await.unwrap();
    let tag = fresh_tag("push");
    let (marker, image_id) = buyers_image(&docker, &tag, 3 << 20).await;

    // The buyer pushes it; a second push sends nothing.
    let client = buyer(&dn);
    let pushed = kiln_cli::image::push(&client, &tag, false).await.unwrap();
    assert_eq!(pushed.image_id, image_id);
    assert_eq!(pushed.layers, 2);
    assert_eq!(pushed.uploaded_bytes, pushed.size);
    assert!(pushed.size > 3 << 20);
    let again = kiln_cli::image::push(&client, &tag, false).await.unwrap();
    assert_eq!((again.cid, again.uploaded_bytes), (pushed.cid, 0));
    // `kiln image ls` lists it, as an image.
    let listed = client.blobs().await.unwrap();
    let mine = listed.blobs.iter().find(|b| b.cid == pushed.cid).unwrap();
    assert_eq!(mine.kind, BlobKind::Image);
    assert_eq!(mine.content_size, Some(pushed.size));

    // Gone from the engine: no provider has it.
    remove(&docker, &tag).await;
    assert!(!engine_has(&docker, &image_id).await);

    let mut spec = hash_marker(&dn, &pushed.image);
    spec.resources.region = Some("zone-a".into());
    let done = run_job(&client, spec.clone()).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.provider, Some(a));
    // What ran is the pushed image: it read the buyer's marker.
    assert_eq!(done.output_cid, Some(marker_output(&marker)));
    // The receipt names the image the engine ran: the config digest.
    assert!(engine_has(&docker, &image_id).await);

    // Node A advertises the image; the coordinator then forgets the marker
    // layer, so node B can get that layer only from node A (the config
    // and the other layer it may get from either).
    let manifest = ImageManifest::from_dag_cbor(
        &dn.coordinator
            .state
            .blobs
            .get(&pushed.cid)
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let marker_layer = manifest.layers[1].cid;
    let cached = kiln_tests::eventually(
        || async {
            client
                .providers()
                .await
                .unwrap_or_default()
                .providers
                .iter()
                .any(|p| p.provider == a && p.cached.contains(&pushed.cid))
        },
        |ok| *ok,
    )
    .await;
    assert!(cached, "node A advertises the image");
    assert!(dn.coordinator.state.blobs.remove(&marker_layer).unwrap());
    spec.resources.region = Some("zone-b".into());
    let done = run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.provider, Some(b));
    assert_eq!(done.output_cid, Some(marker_output(&marker)));
    assert_eq!(
        dn.cached_images().await.unwrap().len(),
        2,
        "each node tags it once"
    );

    // Another buyer who knows the CID may not name it.
    let stranger = buyer(&dn);
    let e = stranger
        .submit(hash_marker(&dn, &pushed.image), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("image") && e.contains("kiln image push"), "{e}");
    // Nor run it by the engine id it has on the providers.
    let mut by_id = hash_marker(&dn, &image_id);
    by_id.resources.region = Some("zone-a".into());
    let done = run_job(&stranger, by_id).await.unwrap();
    assert_eq!(done.state, JobState::Failed, "{done:#?}");
    let why = done.reason.clone().unwrap_or_default();
    assert!(why.contains("as kiln:<cid>"), "{why}");

    dn.remove_cached_images().await.unwrap();
    assert!(
        !engine_has(&docker, &image_id).await,
        "the last tag removed, the image goes"
    );
    dn.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_images_fail_before_a_container_starts_and_leave_nothing_in_the_engine() {
    let mut dn = devnet(0).await.unwrap();
    let small = kiln_tests::add_node_with(&mut dn, |c| {
        c.region = Some("small".into());
        c.policy.max_image_bytes = 1 << 20;
    })
    .await
    .unwrap();
    let _roomy = kiln_tests::add_node_with(&mut dn, |c| c.region = Some("roomy".into()))
        .await
        .unwrap();
    // One that loads images as `docker load` archives (as with a remote
    // engine) instead of pulling them from its loopback registry.
    let archive = kiln_tests::add_node_with(&mut dn, |c| {
        c.region = Some("archive".into());
        c.image_load_archive = true;
    })
    .await
    .unwrap();
    let docker = kiln_docker::connect().await.unwrap();
    let client = buyer(&dn);
    let tag = fresh_tag("bad");
    let (marker, image_id) = buyers_image(&docker, &tag, 2 << 20).await;
    let pushed = kiln_cli::image::push(&client, &tag, false).await.unwrap();
    remove(&docker, &tag).await;

    // 1. Over the provider's size limit: named, nothing fetched or loaded.
    let (done, why) = fails(&dn, &client, &pushed.image, "small").await;
    assert_eq!(done.provider, Some(small));
    assert!(
        why.contains(&pushed.image) && why.contains("1048576-byte image limit"),
        "{why}"
    );

    // 2. A manifest whose layer digest is not its bytes' SHA-256 (CIDs
    // right, so every fetch verifies): the load stops at that layer.
    let good = ImageManifest::from_dag_cbor(
        &dn.coordinator
            .state
            .blobs
            .get(&pushed.cid)
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let mut lying = good.clone();
    lying.layers[1].digest = OciDigest([7; 32]);
    let bytes = lying.to_dag_cbor();
    client
        .put_blob(&lying.cid(), bytes.len() as u64, "lying", bytes.into())
        .await
        .unwrap();
    for region in ["roomy", "archive"] {
        let (_, why) = fails(&dn, &client, &format!("kiln:{}", lying.cid()), region).await;
        assert!(
            why.contains(&format!("layer {}", lying.layers[1].digest))
                && why.contains("does not match its OCI digest"),
            "{region}: {why}"
        );
    }
    assert!(!engine_has(&docker, &image_id).await);

    // The honest manifest loads as an archive too, and runs.
    let mut spec = hash_marker(&dn, &pushed.image);
    spec.resources.region = Some("archive".into());
    let done = run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.provider, Some(archive));
    assert_eq!(done.output_cid, Some(marker_output(&marker)));
    dn.remove_cached_images().await.unwrap();

    // 3. A CID that is a directory, not an image: refused at submission.
    let dir = kiln_protocol::Manifest::new(vec![]).unwrap();
    let dbytes = dir.to_dag_cbor();
    client
        .put_blob(&dir.cid(), dbytes.len() as u64, "dir", dbytes.into())
        .await
        .unwrap();
    let e = client
        .submit(hash_marker(&dn, &format!("kiln:{}", dir.cid())), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an image manifest"), "{e}");
    // Nor is a 2 MiB DAG-CBOR blob: refused by its size, before anything
    // reads it into memory.
    let big = kiln_cli::bench_image::pseudo_random(2 << 20, 9);
    let big_cid =
        ContentId::from_blake3(kiln_protocol::content::DAG_CBOR_CODEC, blake3::hash(&big));
    client
        .put_blob(&big_cid, big.len() as u64, "big", big.into())
        .await
        .unwrap();
    let e = client
        .submit(hash_marker(&dn, &format!("kiln:{big_cid}")), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than any image manifest"), "{e}");

    // Nothing of it in the engine: no image, no cache tag.
    assert!(!engine_has(&docker, &image_id).await);
    assert!(dn.cached_images().await.unwrap().is_empty());
    assert!(kiln_tests::leftovers(&dn).await.unwrap().is_empty());
    dn.shutdown().await;
}

/// A registry that serves, for any manifest asked for, the same bytes:
/// which hash to something else than the digest asked for.
async fn lying_registry() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body =
                    r#"{"schemaVersion":2,"config":{"size":1,"digest":"sha256:00"},"layers":[]}"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    host
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_by_digest_is_pulled_where_its_registry_is_allowed_and_nowhere_else() {
    let registry = LoopbackRegistry::start().await.unwrap();
    let liar = lying_registry().await;
    let mut dn = devnet(0).await.unwrap();
    // A registry host nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (reg, lie, gone) = (registry.host.clone(), liar.clone(), dead.clone());
    let allows = kiln_tests::add_node_with(&mut dn, move |c| {
        c.region = Some("allows".into());
        c.policy.registries = vec![reg, lie, gone];
    })
    .await
    .unwrap();
    let _refuses = kiln_tests::add_node_with(&mut dn, |c| c.region = Some("refuses".into()))
        .await
        .unwrap();
    let docker = kiln_docker::connect().await.unwrap();
    let client = buyer(&dn);

    // The buyer publishes an image to the registry and forgets it locally.
    let name = format!("{}/kiln-test-pull", registry.host);
    let tag = format!("{name}:{:016x}", rand_u64());
    let (marker, image_id) = buyers_image(&docker, &tag, 1 << 20).await;
    let (repo, t) = tag.rsplit_once(':').unwrap();
    let opts = bollard::query_parameters::PushImageOptions {
        tag: Some(t.to_string()),
        ..Default::default()
    };
    use futures::StreamExt;
    let mut push = docker.push_image(repo, Some(opts), None);
    while let Some(r) = push.next().await {
        let info = r.unwrap();
        assert!(info.error_detail.is_none(), "{info:?}");
    }
    let digest = docker
        .inspect_image(&tag)
        .await
        .unwrap()
        .repo_digests
        .unwrap_or_default()
        .into_iter()
        .find_map(|d| d.strip_prefix(&format!("{name}@")).map(str::to_string))
        .unwrap();
    remove(&docker, &tag).await;
    assert!(!engine_has(&docker, &image_id).await);
    let by_digest = format!("{name}@{digest}");

    // Where the registry is not allowed, the job is not placed, and says why.
    let mut spec = hash_marker(&dn, &by_digest);
    spec.resources.region = Some("refuses".into());
    let v = client.submit(spec, None).await.unwrap();
    let seen = kiln_tests::job_until(&client, &v.job_id, |j| reason(j).contains("registry")).await;
    assert!(
        reason(&seen).contains(&format!("excluded by registry={}", registry.host)),
        "{seen:#?}"
    );
    client.cancel(&v.job_id).await.unwrap();

    // Where it is allowed, the image is pulled by digest and runs.
    let mut spec = hash_marker(&dn, &by_digest);
    spec.resources.region = Some("allows".into());
    let done = run_job(&client, spec).await.unwrap();
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.provider, Some(allows));
    assert_eq!(done.output_cid, Some(marker_output(&marker)));

    // A registry serving other bytes than the digest names: refused
    // before the engine pulls anything.
    let (_, why) = fails(
        &dn,
        &client,
        &format!("{liar}/x@sha256:{}", "ab".repeat(32)),
        "allows",
    )
    .await;
    assert!(
        why.contains(&format!("registry {liar} served a manifest hashing to")),
        "{why}"
    );

    // A registry that is down: named.
    let (_, why) = fails(
        &dn,
        &client,
        &format!("{dead}/x@sha256:{}", "ef".repeat(32)),
        "allows",
    )
    .await;
    assert!(
        why.contains(&format!("registry {dead} is unreachable")),
        "{why}"
    );

    // A digest the registry does not have: named.
    let (_, why) = fails(
        &dn,
        &client,
        &format!("{name}@sha256:{}", "cd".repeat(32)),
        "allows",
    )
    .await;
    assert!(why.contains("has no manifest"), "{why}");

    // Only the cache's tag holds the pulled image: evicting it frees it.
    dn.remove_cached_images().await.unwrap();
    assert!(
        !engine_has(&docker, &image_id).await,
        "the pulled image is gone"
    );
    dn.shutdown().await;
}
