#![allow(clippy::unwrap_used)]
//! A dial that reaches a peer other than the one its address names says so,
//! with both peer ids, whether it was a plain dial or a request's: real
//! libp2p swarms on loopback.

use std::time::Duration;

use kiln_net::multiaddr::Protocol;
use kiln_net::{Addr, NetConfig, NetError};
use kiln_protocol::{JobId, JobLost, Keypair, NetRequest, OfferId, ProviderId, Signed};
use tokio_util::sync::CancellationToken;

async fn peer(listen: bool, cancel: &CancellationToken) -> kiln_net::Client {
    let mut config = NetConfig {
        request_timeout: Duration::from_secs(30),
        ..NetConfig::default()
    };
    if !listen {
        config.listen.clear();
    }
    let (net, _events, ev) =
        kiln_net::spawn(Keypair::generate().to_libp2p(), config, cancel.clone())
            .await
            .unwrap();
    tokio::spawn(ev.run());
    net
}

#[tokio::test]
async fn a_wrong_peer_id_is_named_with_the_one_found() {
    let cancel = CancellationToken::new();
    let server = peer(true, &cancel).await;
    let client = peer(false, &cancel).await;
    let real = server.local_peer_id();
    let named = Keypair::generate().to_libp2p().public().to_peer_id();
    let mut wrong: Addr = server.listen_addrs()[0]
        .iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect();
    wrong.push(Protocol::P2p(named));

    let says = |e: &NetError| {
        assert!(
            matches!(e, NetError::WrongPeer { expected, found, .. } if *expected == named && *found == real),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains(&format!("has peer id {real}, not {named}")),
            "{text}"
        );
    };
    let e = client.dial(wrong.clone()).await.unwrap_err();
    says(&e);

    let key = Keypair::generate();
    let lost = NetRequest::Lost(
        Signed::sign(
            &key,
            JobLost {
                job_id: JobId::random(),
                offer_id: OfferId::random(),
                provider: ProviderId::from_public_key(&key.public()),
                reason: "probe".into(),
            },
            60,
        )
        .unwrap(),
    );
    // Twice: the reason is not used up by the first request.
    for _ in 0..2 {
        let e = client
            .request(named, vec![wrong.clone()], lost.clone())
            .await
            .unwrap_err();
        says(&e);
    }

    // The right address still works afterwards.
    assert_eq!(
        client.dial(server.listen_addrs()[0].clone()).await.unwrap(),
        real
    );
    cancel.cancel();
}
