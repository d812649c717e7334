//! Real libp2p peers on loopback (separate keys, TCP + Noise + yamux):
//! parallel multi-source fetch, a corrupting peer, resume after a dropped
//! transfer and a restart, a peer killed half-way. HTTP sources: `http.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use kiln_blobs::bao_tree::io::outboard::PostOrderMemOutboard;
use kiln_blobs::bao_tree::io::sync::encode_ranges;
use kiln_blobs::wire::{self, Request, Response};
use kiln_blobs::{BLOCK_SIZE, FetchError, FetchOptions, Source, Store, fetch};
use kiln_net::{Client, NetConfig};
use kiln_protocol::ContentId;
use tokio_util::sync::CancellationToken;

mod common;
use common::{MIB, data, store};

struct Peer {
    client: Client,
    cancel: CancellationToken,
}

impl Peer {
    fn source(&self) -> Source {
        Source {
            peer: self.client.local_peer_id(),
            addrs: self.client.listen_addrs().to_vec(),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A kiln-net peer with its own key; serves `store` if given.
async fn peer(serve: Option<Store>) -> Peer {
    peer_with(serve, wire::ServeConfig::default()).await
}

/// [`peer`], serving with `config`.
async fn peer_with(serve: Option<Store>, config: wire::ServeConfig) -> Peer {
    let key = kiln_protocol::Keypair::generate().to_libp2p();
    let cancel = CancellationToken::new();
    let (client, mut events, ev) = kiln_net::spawn(key, NetConfig::default(), cancel.clone())
        .await
        .unwrap();
    tokio::spawn(ev.run());
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    if let Some(store) = serve {
        tokio::spawn(wire::serve_with(
            store,
            client.clone(),
            cancel.clone(),
            config,
        ));
    }
    Peer { client, cancel }
}

/// A serving peer holding `bytes`.
async fn holder(dir: &Path, bytes: &[u8]) -> Peer {
    let s = store(dir);
    s.import_bytes(bytes).unwrap();
    peer(Some(s)).await
}

/// A peer that speaks the protocol but flips one byte in the last 16 KiB
/// group of every range it is asked for (its proofs are honest).
async fn corrupting_peer(bytes: Vec<u8>) -> Peer {
    let p = peer(None).await;
    let mut incoming = p.client.accept_streams(wire::PROTOCOL).unwrap();
    let outboard = Arc::new(PostOrderMemOutboard::create(&bytes, BLOCK_SIZE));
    let bytes = Arc::new(bytes);
    let cancel = p.cancel.clone();
    tokio::spawn(async move {
        loop {
            let (_, mut stream) = tokio::select! {
                () = cancel.cancelled() => return,
                Some(s) = incoming.next() => s,
            };
            let (bytes, outboard) = (bytes.clone(), outboard.clone());
            tokio::spawn(async move {
                let req: Request = wire::read_frame(&mut stream, 1 << 20).await.unwrap();
                let size = bytes.len() as u64;
                match req {
                    Request::Has { cids } => {
                        let sizes = cids.iter().map(|_| Some(size)).collect();
                        wire::write_frame(&mut stream, &Response::Has { sizes })
                            .await
                            .unwrap();
                    }
                    Request::Get { ranges, .. } => {
                        let ranges = wire::ranges_from_wire(&ranges).unwrap();
                        let end = kiln_blobs::range_pairs(&ranges, size)
                            .last()
                            .map(|r| r.1 * 1024)
                            .unwrap_or(size)
                            .min(size);
                        let bad = (end - 1) / 16384 * 16384 + 100;
                        let mut copy = (*bytes).clone();
                        copy[bad.min(size - 1) as usize] ^= 0x55;
                        let mut enc = Vec::new();
                        encode_ranges(&copy[..], &*outboard, &ranges, &mut enc).unwrap();
                        wire::write_frame(&mut stream, &Response::Found { size })
                            .await
                            .unwrap();
                        let _ = stream.write_all(&enc).await;
                    }
                }
                let _ = stream.close().await;
            });
        }
    });
    p
}

fn fetched_bytes(s: &Store, cid: &ContentId) -> Vec<u8> {
    s.get(cid).unwrap().expect("blob stored")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_peers_fetch_in_parallel_and_verify() {
    let d = tempfile::tempdir().unwrap();
    let blob = data(8 * MIB + 12345, 1);
    let cid = ContentId::of_bytes(&blob);
    let a = holder(&d.path().join("a"), &blob).await;
    let b = holder(&d.path().join("b"), &blob).await;
    let c = holder(&d.path().join("c"), &blob).await;
    let me = peer(None).await;
    let mine = store(&d.path().join("me"));
    let report = fetch(
        &mine,
        &me.client,
        cid,
        None,
        vec![a.source(), b.source(), c.source()],
        &FetchOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(fetched_bytes(&mine, &cid), blob);
    assert_eq!(report.size, blob.len() as u64);
    assert_eq!(report.data_bytes, blob.len() as u64);
    assert_eq!(report.per_peer.len(), 3);
    for (peer, stats) in &report.per_peer {
        assert!(stats.data_bytes >= MIB, "{peer} served {stats:?}");
    }
    assert!(report.bad_peers.is_empty() && report.failed_peers.is_empty());
    // Wire bytes: the data, proofs (~0.5%), headers and the size probe.
    let size = blob.len() as u64;
    assert!(report.bytes_transferred >= size);
    assert!(
        report.bytes_transferred < size + size / 50,
        "{}",
        report.bytes_transferred
    );
    // A second fetch is a no-op.
    let again = fetch(
        &mine,
        &me.client,
        cid,
        None,
        vec![a.source()],
        &FetchOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(again.bytes_transferred, 0);
    assert!(mine.partials().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupting_peer_is_dropped_at_its_first_bad_group_and_the_fetch_completes() {
    let d = tempfile::tempdir().unwrap();
    let blob = data(8 * MIB, 2);
    let cid = ContentId::of_bytes(&blob);
    let a = holder(&d.path().join("a"), &blob).await;
    let evil = corrupting_peer(blob.clone()).await;
    let b = holder(&d.path().join("b"), &blob).await;
    let me = peer(None).await;
    let mine = store(&d.path().join("me"));
    let opts = FetchOptions {
        unit_bytes: MIB,
        per_peer: 2,
        ..FetchOptions::default()
    };
    let report = fetch(
        &mine,
        &me.client,
        cid,
        Some(blob.len() as u64),
        vec![a.source(), evil.source(), b.source()],
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(fetched_bytes(&mine, &cid), blob, "no corrupted byte stored");
    let evil_id = evil.client.local_peer_id();
    assert_eq!(report.bad_peers.len(), 1, "{report:?}");
    assert_eq!(report.bad_peers[0].0, evil_id);
    assert!(
        report.bad_peers[0].1.contains("does not match"),
        "{report:?}"
    );
    let es = &report.per_peer[&evil_id];
    // Every response of the evil peer has one bad group at its end: it never
    // completes a unit, and what it delivered before the bad group verified.
    assert_eq!(es.units, 0, "{es:?}");
    assert!(es.data_bytes < 2 * MIB, "{es:?}");
    assert_eq!(report.data_bytes, blob.len() as u64);
    let honest: u64 = report
        .per_peer
        .iter()
        .filter(|(p, _)| **p != evil_id)
        .map(|(_, s)| s.data_bytes)
        .sum();
    assert_eq!(honest + es.data_bytes, blob.len() as u64);
    // Only an evil source: the fetch fails, keeping what verified.
    let d2 = tempfile::tempdir().unwrap();
    let other = store(d2.path());
    let e = fetch(&other, &me.client, cid, None, vec![evil.source()], &opts)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::SizeUnknown { .. }), "{e}");
    assert!(!other.has(&cid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_fetch_resumes_after_restart_and_downloads_only_the_rest() {
    let d = tempfile::tempdir().unwrap();
    let blob = data(8 * MIB, 3);
    let size = blob.len() as u64;
    let cid = ContentId::of_bytes(&blob);
    let a = holder(&d.path().join("a"), &blob).await;
    let me_dir = d.path().join("me");
    let me = peer(None).await;
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    let opts = FetchOptions {
        unit_bytes: 256 * 1024,
        per_peer: 1,
        progress: Some(Arc::new(tx)),
        ..FetchOptions::default()
    };
    {
        let mine = store(&me_dir);
        let f = fetch(&mine, &me.client, cid, None, vec![a.source()], &opts);
        tokio::select! {
            r = f => panic!("finished before it was dropped: {r:?}"),
            _ = rx.wait_for(|v| *v >= size / 2) => {}
        }
        // The fetch future is dropped here, mid-transfer.
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // "Restart": a new store over the same directory, a new network peer.
    let mine = store(&me_dir);
    assert_eq!(mine.partials(), vec![(cid, size)]);
    let me2 = peer(None).await;
    let report = fetch(
        &mine,
        &me2.client,
        cid,
        None,
        vec![a.source()],
        &FetchOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(fetched_bytes(&mine, &cid), blob);
    assert!(report.already_had >= size / 2, "{report:?}");
    assert!(report.already_had < size, "{report:?}");
    assert_eq!(report.already_had % 16384, 0, "whole groups");
    // Exactly the remainder, nothing twice.
    assert_eq!(report.data_bytes, size - report.already_had, "{report:?}");
    let rest = size - report.already_had;
    assert!(
        report.bytes_transferred >= rest && report.bytes_transferred < rest + rest / 50 + 4096,
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_killed_half_way_then_the_rest_comes_from_another() {
    let d = tempfile::tempdir().unwrap();
    let blob = data(6 * MIB, 4);
    let size = blob.len() as u64;
    let cid = ContentId::of_bytes(&blob);
    let a = holder(&d.path().join("a"), &blob).await;
    let me = peer(None).await;
    let mine = store(&d.path().join("me"));
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    let opts = FetchOptions {
        unit_bytes: 256 * 1024,
        per_peer: 1,
        max_failures: 2,
        unit_timeout: Duration::from_secs(5),
        progress: Some(Arc::new(tx)),
    };
    let a_source = a.source();
    let killer = tokio::spawn(async move {
        let _ = rx.wait_for(|v| *v >= size / 2).await;
        drop(a); // the only source goes away
    });
    let e = fetch(&mine, &me.client, cid, None, vec![a_source], &opts)
        .await
        .unwrap_err();
    killer.await.unwrap();
    let FetchError::Exhausted { have, .. } = e else {
        panic!("{e}")
    };
    assert!(have >= size / 2 && have < size, "{have}");
    assert!(!mine.has(&cid));
    let b = holder(&d.path().join("b"), &blob).await;
    let report = fetch(&mine, &me.client, cid, None, vec![b.source()], &opts)
        .await
        .unwrap();
    assert_eq!(fetched_bytes(&mine, &cid), blob);
    assert_eq!(report.already_had, have);
    assert_eq!(report.data_bytes, size - have);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn has_query_and_missing_blob() {
    let d = tempfile::tempdir().unwrap();
    let blob = data(100_000, 5);
    let cid = ContentId::of_bytes(&blob);
    let other = ContentId::of_bytes(b"not there");
    let a = holder(&d.path().join("a"), &blob).await;
    let me = peer(None).await;
    let sizes = wire::has(&me.client, &a.source(), vec![cid, other])
        .await
        .unwrap();
    assert_eq!(sizes, vec![Some(100_000), None]);
    let mine = store(&d.path().join("me"));
    let e = fetch(
        &mine,
        &me.client,
        other,
        None,
        vec![a.source()],
        &FetchOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, FetchError::SizeUnknown { .. }), "{e}");
    // A tiny blob (one group) over the whole path.
    let r = fetch(
        &mine,
        &me.client,
        cid,
        None,
        vec![a.source()],
        &FetchOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(r.data_bytes, 100_000);
    assert_eq!(fetched_bytes(&mine, &cid), blob);
    // The raw response API decodes with bao-tree directly.
    let ranges = kiln_blobs::group_ranges(0, 16384, 100_000);
    let (size, enc) = wire::fetch_range(&me.client, &a.source(), cid, &ranges, 1 << 20)
        .await
        .unwrap();
    assert_eq!(size, 100_000);
    assert!(enc.len() > 16384 && enc.len() < 16384 + 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_reach_other_peers() {
    let d = tempfile::tempdir().unwrap();
    let blob = data(50_000, 6);
    let cid = ContentId::of_bytes(&blob);
    let s = store(&d.path().join("a"));
    s.import_bytes(&blob).unwrap();
    let a = peer(Some(s.clone())).await;
    let b = peer(None).await;
    b.client
        .dial(a.client.listen_addrs()[0].clone())
        .await
        .unwrap();
    let providers = Arc::new(std::sync::Mutex::new(kiln_blobs::announce::Providers::new(
        Duration::from_secs(60),
    )));
    tokio::spawn(kiln_blobs::announce::track(
        b.client.clone(),
        providers.clone(),
        b.cancel.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        kiln_blobs::announce::announce_store(&a.client, &s)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = providers.lock().unwrap().providers(&cid);
        if !got.is_empty() {
            assert_eq!(got, vec![(a.client.local_peer_id(), 50_000)]);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no announcement arrived"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_serves_only_what_its_policy_allows() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d.path().join("srv"));
    let open = s.import_bytes(&data(100_000, 1)).unwrap();
    let secret = s.import_bytes(&data(100_000, 2)).unwrap();
    let allowed = open;
    let authorize: wire::Authorize = Arc::new(move |_peer, cids: Vec<kiln_protocol::ContentId>| {
        Box::pin(std::future::ready(
            cids.into_iter().filter(|c| *c == allowed).collect(),
        ))
    });
    let config = wire::ServeConfig {
        validate: true,
        authorize: Some(authorize),
    };
    let srv = peer_with(Some(s), config).await;
    let server = srv.source();

    let me = peer(None).await;
    // `Has` does not even reveal that the secret blob is held.
    let sizes = wire::has(&me.client, &server, vec![open, secret])
        .await
        .unwrap();
    assert_eq!(sizes, vec![Some(100_000), None]);
    let mine = store(&d.path().join("me"));
    let opts = FetchOptions::default();
    fetch(&mine, &me.client, open, None, vec![server.clone()], &opts)
        .await
        .unwrap();
    assert!(mine.has(&open));
    let e = fetch(&mine, &me.client, secret, None, vec![server], &opts)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("may not fetch"), "{e}");
    assert!(!mine.has(&secret));
    drop(srv);
}
