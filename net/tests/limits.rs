//! What a peer in bad faith can make a Kiln peer spend: real libp2p swarms on
//! loopback.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kiln_net::{Limits, NetConfig, NetEvent};
use kiln_protocol::{
    JobId, JobLost, Keypair, NetRequest, NetResponse, OfferId, ProviderId, Signed,
};
use tokio_util::sync::CancellationToken;

/// A peer that accepts every request, with these settings.
async fn server(
    config: NetConfig,
    cancel: &CancellationToken,
) -> (kiln_net::Peer, kiln_net::Addr, kiln_net::Client) {
    let (net, mut events, ev) =
        kiln_net::spawn(Keypair::generate().to_libp2p(), config, cancel.clone())
            .await
            .unwrap();
    tokio::spawn(ev.run());
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if let NetEvent::Request { reply, .. } = e {
                let _ = reply.send(NetResponse::Accepted);
            }
        }
    });
    let addr = net.listen_addrs()[0].clone();
    // The loop stops when its last client is dropped: the caller keeps it.
    (net.local_peer_id(), addr, net)
}

async fn client(key: &Keypair, cancel: &CancellationToken) -> kiln_net::Client {
    let (net, _events, ev) = kiln_net::spawn(
        key.to_libp2p(),
        NetConfig {
            request_timeout: Duration::from_secs(10),
            ..NetConfig::default()
        },
        cancel.clone(),
    )
    .await
    .unwrap();
    tokio::spawn(ev.run());
    net
}

fn lost(key: &Keypair, reason_bytes: usize) -> NetRequest {
    NetRequest::Lost(
        Signed::sign(
            key,
            JobLost {
                job_id: JobId::random(),
                offer_id: OfferId::random(),
                provider: ProviderId::from_public_key(&key.public()),
                reason: "x".repeat(reason_bytes),
            },
            60,
        )
        .unwrap(),
    )
}

async fn ask(
    c: &kiln_net::Client,
    (peer, addr, _): &(kiln_net::Peer, kiln_net::Addr, kiln_net::Client),
    req: NetRequest,
) -> Result<NetResponse, kiln_net::NetError> {
    c.request(*peer, vec![addr.clone()], req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_past_the_limit_is_refused_and_the_connection_goes_on() {
    let cancel = CancellationToken::new();
    let addr = server(
        NetConfig {
            max_message_bytes: 64 * 1024,
            ..NetConfig::default()
        },
        &cancel,
    )
    .await;
    let key = Keypair::generate();
    let c = client(&key, &cancel).await;
    let e = ask(&c, &addr, lost(&key, 100 * 1024)).await;
    assert!(e.is_err(), "a 100 KiB message passed a 64 KiB limit: {e:?}");
    // The same peer's next, honest request is answered.
    let ok = ask(&c, &addr, lost(&key, 1024)).await.unwrap();
    assert!(matches!(ok, NetResponse::Accepted), "{ok:?}");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_hold_more_connections_than_its_share() {
    let cancel = CancellationToken::new();
    let addr = server(
        NetConfig {
            limits: Limits {
                established_per_peer: 2,
                ..Limits::default()
            },
            ..NetConfig::default()
        },
        &cancel,
    )
    .await;
    // Three processes with one key: three connections from one peer.
    let key = Keypair::generate();
    let mut answered = 0;
    let mut refused = 0;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = client(&key, &cancel).await;
        match ask(&c, &addr, lost(&key, 16)).await {
            Ok(NetResponse::Accepted) => answered += 1,
            Ok(other) => panic!("{other:?}"),
            Err(_) => refused += 1,
        }
        clients.push(c); // keep each connection open
    }
    assert_eq!((answered, refused), (2, 1));
    // Another identity is still served.
    let other = Keypair::generate();
    let c = client(&other, &cancel).await;
    let ok = ask(&c, &addr, lost(&other, 16)).await.unwrap();
    assert!(matches!(ok, NetResponse::Accepted), "{ok:?}");
    cancel.cancel();
}
