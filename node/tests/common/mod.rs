//! What the node's integration tests share: a scripted coordinator peer and
//! a look at what the real Docker engine holds.

#![allow(dead_code)] // each test binary uses its own part

use kiln_net::{Addr, NetConfig, NetEvent};
use kiln_protocol::Keypair;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A real libp2p peer for a node to trust as its coordinator: its key,
/// client, where it listens, and the events it receives.
pub struct ScriptedCoordinator {
    pub key: Keypair,
    pub net: kiln_net::Client,
    pub addr: Addr,
    pub events: mpsc::Receiver<NetEvent>,
}

/// Starts a [`ScriptedCoordinator`] on loopback until `cancel`.
pub async fn scripted_coordinator(cancel: &CancellationToken) -> ScriptedCoordinator {
    let key = Keypair::generate();
    let (net, events, ev) = kiln_net::spawn(key.to_libp2p(), NetConfig::default(), cancel.clone())
        .await
        .expect("a libp2p peer on loopback");
    tokio::spawn(ev.run());
    let addr = net.listen_addrs()[0].clone();
    ScriptedCoordinator {
        key,
        net,
        addr,
        events,
    }
}

/// Containers (running or not) labelled `label=value`.
pub async fn containers(docker: &bollard::Docker, label: &str, value: &str) -> usize {
    let filters =
        std::collections::HashMap::from([("label".to_string(), vec![format!("{label}={value}")])]);
    docker
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .expect("list containers")
        .len()
}

/// Sends `req` to a node that has just started. Only a failed dial is
/// retried (for a few seconds: a node that started a moment ago may not
/// accept connections yet on a loaded machine); nothing was sent then, so
/// an offer is never delivered twice. Panics on any other failure.
pub async fn request_new_node(
    net: &kiln_net::Client,
    node: kiln_protocol::ProviderId,
    addrs: Vec<Addr>,
    req: kiln_protocol::NetRequest,
) -> kiln_protocol::NetResponse {
    let mut tries = 0;
    loop {
        match net
            .request(node.peer_id(), addrs.clone(), req.clone())
            .await
        {
            Ok(r) => return r,
            Err(e @ kiln_net::NetError::Unreachable { .. }) if tries < 20 => {
                tries += 1;
                tracing::debug!("node not reachable yet: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => panic!("the node answers: {e:?}"),
        }
    }
}
