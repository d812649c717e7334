//! # kiln-net
//!
//! Kiln's libp2p layer, shared by provider nodes and the coordinator, in the
//! shape of rust-libp2p's `file-sharing` example:
//!
//! * one `#[derive(NetworkBehaviour)]` struct, [`Behaviour`]: point-to-point
//!   request-response (`/kiln/rpc/1`) for everything addressed to one peer
//!   (registration, offers, results), plain libp2p streams (`libp2p-stream`)
//!   for bulk protocols whose bytes should not pass through the event loop
//!   (the blob protocol `/kiln/blobs/1`, implemented in `kiln-blobs`),
//!   gossipsub for capability adverts and blob announcements, identify and
//!   ping for liveness;
//! * an [`EventLoop`] task that alone owns the `Swarm`;
//! * a cloneable [`Client`] handle that talks to the loop over a bounded
//!   channel, and a bounded stream of [`NetEvent`]s coming out of it.
//!
//! Connections are encrypted and authenticated by Noise with the peer's
//! ed25519 key, so `peer` in every event is the verified identity of the
//! sender. All payloads are encoded by `kiln_protocol::encoding`.

mod codec;
pub mod signal;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use kiln_protocol::{CapabilityAdvert, NetRequest, NetResponse, Signed};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, gossipsub, identify, noise, ping,
    tcp, yamux,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use codec::RpcCodec;
pub use libp2p::{Multiaddr as Addr, PeerId as Peer, Stream, StreamProtocol as Protocol};
pub use libp2p::{identity, multiaddr};
/// Plain libp2p streams: [`stream::Control`] opens and accepts them.
pub use libp2p_stream as stream;

/// The request-response protocol name.
pub const RPC_PROTOCOL: &str = "/kiln/rpc/1";
/// The gossipsub topic on which providers publish signed adverts.
pub const ADVERT_TOPIC: &str = "kiln/adverts/1";
/// The stream protocol of the blob data plane (served by `kiln-blobs`).
pub const BLOB_PROTOCOL: &str = "/kiln/blobs/1";
/// The gossipsub topic on which peers announce the blobs they hold.
pub const BLOB_TOPIC: &str = "kiln/blobs/have/1";

/// Errors the network layer reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "could not reach peer {peer}: {reason}; check that it is running and that its address is right"
    )]
    Unreachable { peer: PeerId, reason: String },
    /// The dial reached `addr`, but the peer there proved (in the Noise
    /// handshake) to be `found`, not the `expected` peer the address names.
    #[error(
        "the peer at {addr} has peer id {found}, not {expected} as the address says: its /p2p/ part is mistyped or out of date (the peer got a new key); copy the full address the peer prints (a coordinator prints its own at start-up)"
    )]
    WrongPeer {
        expected: PeerId,
        found: PeerId,
        addr: String,
    },
    #[error(
        "peer {peer} did not answer within {secs}s; it may or may not have received the request"
    )]
    Timeout { peer: PeerId, secs: u64 },
    #[error(
        "the connection to {peer} closed before it answered; it may or may not have received the request"
    )]
    ConnectionClosed { peer: PeerId },
    #[error("request to {peer} failed: {reason}")]
    Failed { peer: PeerId, reason: String },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("invalid address `{addr}`: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("could not encode the message: {0}")]
    Encode(String),
    #[error("the network task has stopped (shutting down)")]
    Stopped,
    #[error("setting up libp2p failed: {0}")]
    Setup(String),
    #[error("peer {peer} does not speak {protocol}; it may run an older Kiln")]
    Unsupported { peer: PeerId, protocol: String },
    #[error("protocol {protocol} already has a server in this process")]
    AlreadyServing { protocol: String },
}

/// Everything the node and coordinator use, in one behaviour.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Refuses connections past [`NetConfig::limits`] before any other
    /// behaviour spends anything on them.
    limits: connection_limits::Behaviour,
    rpc: request_response::Behaviour<RpcCodec>,
    /// Plain streams for bulk transfer (blobs, benchmarks).
    stream: libp2p_stream::Behaviour,
    gossip: gossipsub::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// What comes out of the network for the application.
#[derive(Debug)]
pub enum NetEvent {
    /// A peer asks something; answer through `reply` (dropping it answers
    /// `Rejected`).
    Request {
        peer: PeerId,
        request: NetRequest,
        reply: oneshot::Sender<NetResponse>,
    },
    /// A signed advert arrived over gossip (signature not yet checked).
    Advert {
        from: PeerId,
        advert: Box<Signed<CapabilityAdvert>>,
    },
    Connected(PeerId),
    Disconnected(PeerId),
}

/// Settings for [`spawn`].
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    pub request_timeout: Duration,
    /// Largest request or response accepted, in bytes. A frame's buffer
    /// grows with the bytes that actually arrive, never to the length a
    /// peer declares.
    pub max_message_bytes: usize,
    pub subscribe_adverts: bool,
    /// Connection limits.
    pub limits: Limits,
}

/// How many connections a peer (or everyone) may hold. A connection costs
/// buffers and up to [`MAX_STREAMS_PER_CONNECTION`] concurrent RPC streams,
/// and identities are free, so the totals matter as much as the per-peer
/// figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections being set up (Noise handshake) from others at once.
    pub pending_incoming: u32,
    /// Established connections from others, in all.
    pub established_incoming: u32,
    /// Established connections with one peer (either direction): two
    /// peers dialling each other at once make two.
    pub established_per_peer: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            pending_incoming: 256,
            established_incoming: 10_000,
            established_per_peer: 4,
        }
    }
}

/// The default largest message: a result names at most 10,000 output files
/// and carries at most 1 MiB inline, far below this.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;
/// Concurrent inbound RPC requests on one connection (more are refused).
pub const MAX_STREAMS_PER_CONNECTION: usize = 64;

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
            ],
            request_timeout: Duration::from_secs(60),
            max_message_bytes: MAX_MESSAGE_BYTES,
            subscribe_adverts: false,
            limits: Limits::default(),
        }
    }
}

enum Command {
    Dial {
        addr: Multiaddr,
        done: oneshot::Sender<Result<PeerId, NetError>>,
    },
    Request {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: NetRequest,
        done: oneshot::Sender<Result<NetResponse, NetError>>,
    },
    Publish {
        data: Vec<u8>,
    },
    PublishBlobs {
        data: Vec<u8>,
    },
    IsConnected {
        peer: PeerId,
        done: oneshot::Sender<bool>,
    },
}

/// A cheap, cloneable handle to the network task.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    listen_addrs: Vec<Multiaddr>,
    streams: libp2p_stream::Control,
    blob_announcements: broadcast::Sender<(PeerId, Arc<[u8]>)>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("local_peer_id", &self.local_peer_id)
            .field("listen_addrs", &self.listen_addrs)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// The addresses this peer listens on, each ending in `/p2p/<peer id>`.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(make(done))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Dials `addr` (which must end in `/p2p/<peer id>`) and waits until the
    /// connection is up.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NetError> {
        self.call(|done| Command::Dial { addr, done }).await?
    }

    /// Sends one request and waits for its response. `addrs` are tried if
    /// no connection to `peer` is open.
    pub async fn request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: NetRequest,
    ) -> Result<NetResponse, NetError> {
        self.call(|done| Command::Request {
            peer,
            addrs,
            request,
            done,
        })
        .await?
    }

    /// Publishes a signed advert on the advert topic (best effort: gossip is
    /// for discovery, registration goes point-to-point).
    pub async fn publish_advert(&self, advert: &Signed<CapabilityAdvert>) -> Result<(), NetError> {
        let data =
            kiln_protocol::encoding::encode(advert).map_err(|e| NetError::Encode(e.to_string()))?;
        self.tx
            .send(Command::Publish { data })
            .await
            .map_err(|_| NetError::Stopped)
    }

    pub async fn is_connected(&self, peer: PeerId) -> Result<bool, NetError> {
        self.call(|done| Command::IsConnected { peer, done }).await
    }

    /// The handle for plain libp2p streams (open with
    /// [`stream::Control::open_stream`], serve with [`stream::Control::accept`]).
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.streams.clone()
    }

    /// Opens a new stream to `peer` speaking `protocol`, dialing `addrs`
    /// first if no connection is open (each must end in `/p2p/<peer>`).
    pub async fn open_stream(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        protocol: &'static str,
    ) -> Result<Stream, NetError> {
        if !addrs.is_empty() && !self.is_connected(peer).await? {
            let mut last = None;
            for addr in addrs {
                match self.dial(addr).await {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                return Err(e);
            }
        }
        let protocol = StreamProtocol::new(protocol);
        self.streams
            .clone()
            .open_stream(peer, protocol.clone())
            .await
            .map_err(|e| match e {
                libp2p_stream::OpenStreamError::UnsupportedProtocol(p) => NetError::Unsupported {
                    peer,
                    protocol: p.to_string(),
                },
                other => NetError::Unreachable {
                    peer,
                    reason: other.to_string(),
                },
            })
    }

    /// Takes the incoming streams of `protocol`; only one server per
    /// protocol and process.
    pub fn accept_streams(
        &self,
        protocol: &'static str,
    ) -> Result<libp2p_stream::IncomingStreams, NetError> {
        self.streams
            .clone()
            .accept(StreamProtocol::new(protocol))
            .map_err(|_| NetError::AlreadyServing {
                protocol: protocol.to_string(),
            })
    }

    /// Gossips an announcement of held blobs on [`BLOB_TOPIC`] (best effort;
    /// the bytes are `kiln-blobs`'s business).
    pub async fn publish_blob_announcement(&self, data: Vec<u8>) -> Result<(), NetError> {
        self.tx
            .send(Command::PublishBlobs { data })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Blob announcements gossiped by other peers: (publisher, bytes). The
    /// publisher is the gossip message's signed source, not the relaying peer.
    /// A receiver that lags loses the oldest announcements.
    pub fn blob_announcements(&self) -> broadcast::Receiver<(PeerId, Arc<[u8]>)> {
        self.blob_announcements.subscribe()
    }
}

/// Splits `/…/p2p/<peer>` into the peer id and the address.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

/// The owner of the `Swarm`. Runs until the cancellation token fires.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    pending_requests:
        HashMap<OutboundRequestId, (PeerId, oneshot::Sender<Result<NetResponse, NetError>>)>,
    pending_dials: HashMap<PeerId, Vec<oneshot::Sender<Result<PeerId, NetError>>>>,
    /// Why the last dial to a peer with requests waiting failed, when the
    /// reason is worth more than request-response's bare "dial failed" (a
    /// wrong peer id); kept only while requests to that peer are pending.
    dial_failures: HashMap<PeerId, (PeerId, String)>,
    replies: FuturesUnordered<BoxFuture<'static, (ResponseChannel<NetResponse>, NetResponse)>>,
    advert_topic: gossipsub::IdentTopic,
    blob_topic: gossipsub::IdentTopic,
    blob_announcements: broadcast::Sender<(PeerId, Arc<[u8]>)>,
    request_timeout: Duration,
    cancel: CancellationToken,
}

/// Builds the swarm, starts listening, and returns the client, the event
/// stream and the event loop (to be spawned by the caller).
pub async fn spawn(
    keypair: identity::Keypair,
    config: NetConfig,
    cancel: CancellationToken,
) -> Result<(Client, mpsc::Receiver<NetEvent>, EventLoop), NetError> {
    let local_peer_id = keypair.public().to_peer_id();
    let max = config.max_message_bytes;
    let timeout = config.request_timeout;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetError::Setup(e.to_string()))?
        .with_behaviour(|key| {
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_secs(1))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .max_transmit_size(256 * 1024)
                .build()
                .map_err(|e| e.to_string())?;
            let gossip = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            let l = config.limits;
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_pending_incoming(Some(l.pending_incoming))
                        .with_max_established_incoming(Some(l.established_incoming))
                        .with_max_established_per_peer(Some(l.established_per_peer)),
                ),
                rpc: request_response::Behaviour::with_codec(
                    RpcCodec::new(max),
                    [(StreamProtocol::new(RPC_PROTOCOL), ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(timeout)
                        .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION),
                ),
                stream: libp2p_stream::Behaviour::new(),
                gossip,
                identify: identify::Behaviour::new(identify::Config::new(
                    "/kiln/1".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(ping::Config::new()),
            })
        })
        .map_err(|e| NetError::Setup(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build();

    let advert_topic = gossipsub::IdentTopic::new(ADVERT_TOPIC);
    // Everyone subscribes so that gossip meshes form; only subscribers who
    // asked get the events.
    swarm
        .behaviour_mut()
        .gossip
        .subscribe(&advert_topic)
        .map_err(|e| NetError::Setup(e.to_string()))?;
    let blob_topic = gossipsub::IdentTopic::new(BLOB_TOPIC);
    swarm
        .behaviour_mut()
        .gossip
        .subscribe(&blob_topic)
        .map_err(|e| NetError::Setup(e.to_string()))?;
    let streams = swarm.behaviour().stream.new_control();
    let (blob_announcements, _) = broadcast::channel(256);

    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
    }
    // Wait until every listener has an address, so callers can advertise it.
    let mut listen_addrs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while listen_addrs.len() < config.listen.len() {
        let ev = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .map_err(|_| NetError::Listen {
                addr: format!("{:?}", config.listen),
                reason: "no listen address after 10s".into(),
            })?;
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                listen_addrs.push(address.with(multiaddr::Protocol::P2p(local_peer_id)));
            }
            SwarmEvent::ListenerError { error, .. }
            | SwarmEvent::ListenerClosed {
                reason: Err(error), ..
            } => {
                return Err(NetError::Listen {
                    addr: format!("{:?}", config.listen),
                    reason: error.to_string(),
                });
            }
            _ => {}
        }
    }

    let (tx, commands) = mpsc::channel(256);
    let (events, event_rx) = mpsc::channel(256);
    let client = Client {
        tx,
        local_peer_id,
        listen_addrs,
        streams,
        blob_announcements: blob_announcements.clone(),
    };
    let ev = EventLoop {
        swarm,
        commands,
        events,
        pending_requests: HashMap::new(),
        pending_dials: HashMap::new(),
        dial_failures: HashMap::new(),
        replies: FuturesUnordered::new(),
        advert_topic,
        blob_topic,
        blob_announcements,
        request_timeout: timeout,
        cancel,
    };
    let _ = config.subscribe_adverts;
    Ok((client, event_rx, ev))
}

impl EventLoop {
    /// Runs until cancelled. Dropping the swarm closes every connection.
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => break,
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev).await,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                Some((channel, response)) = self.replies.next(), if !self.replies.is_empty() => {
                    // The requester may have gone away; nothing to do then.
                    let _ = self.swarm.behaviour_mut().rpc.send_response(channel, response);
                }
            }
        }
        tracing::debug!(peer = %self.swarm.local_peer_id(), "network event loop stopped");
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { addr, done } => {
                let Some(peer) = peer_of(&addr) else {
                    let _ = done.send(Err(NetError::BadAddress {
                        addr: addr.to_string(),
                        reason: "it must end in /p2p/<peer id>".into(),
                    }));
                    return;
                };
                if self.swarm.is_connected(&peer) {
                    let _ = done.send(Ok(peer));
                    return;
                }
                self.swarm.add_peer_address(peer, addr.clone());
                match self.swarm.dial(addr) {
                    Ok(()) => self.pending_dials.entry(peer).or_default().push(done),
                    Err(e) => {
                        let _ = done.send(Err(NetError::Unreachable {
                            peer,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::Request {
                peer,
                addrs,
                request,
                done,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_request_with_addresses(&peer, request, addrs);
                self.pending_requests.insert(id, (peer, done));
            }
            Command::Publish { data } => {
                let topic = self.advert_topic.clone();
                if let Err(e) = self.swarm.behaviour_mut().gossip.publish(topic, data) {
                    // No subscribed peers yet is normal on a small network.
                    tracing::debug!("advert not gossiped: {e}");
                }
            }
            Command::PublishBlobs { data } => {
                let topic = self.blob_topic.clone();
                if let Err(e) = self.swarm.behaviour_mut().gossip.publish(topic, data) {
                    tracing::debug!("blob announcement not gossiped: {e}");
                }
            }
            Command::IsConnected { peer, done } => {
                let _ = done.send(self.swarm.is_connected(&peer));
            }
        }
    }

    async fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(ev)) => self.on_rpc(ev).await,
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            })) if message.topic == self.blob_topic.hash() => {
                // Strict validation: `source` is the signed publisher.
                if let Some(source) = message.source {
                    let _ = self
                        .blob_announcements
                        .send((source, Arc::from(message.data)));
                } else {
                    tracing::debug!(peer = %propagation_source, "ignoring unsigned blob announcement");
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            })) => {
                match kiln_protocol::encoding::decode::<Signed<CapabilityAdvert>>(&message.data) {
                    Ok(advert) => {
                        emit(
                            &self.events,
                            NetEvent::Advert {
                                from: propagation_source,
                                advert: Box::new(advert),
                            },
                        )
                        .await
                    }
                    Err(e) => {
                        tracing::warn!(peer = %propagation_source, "ignoring malformed advert: {e}")
                    }
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } => {
                self.dial_failures.remove(&peer_id);
                for done in self.pending_dials.remove(&peer_id).unwrap_or_default() {
                    let _ = done.send(Ok(peer_id));
                }
                if num_established.get() == 1 {
                    emit(&self.events, NetEvent::Connected(peer_id)).await;
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => emit(&self.events, NetEvent::Disconnected(peer_id)).await,
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                // Request-response reports this failure to its requests as a
                // bare `DialFailure` right after this event: keep what it
                // does not say for them.
                let wrong = match &error {
                    libp2p::swarm::DialError::WrongPeerId { obtained, address } => {
                        Some((*obtained, address.to_string()))
                    }
                    _ => None,
                };
                match &wrong {
                    Some(w) if self.pending_requests.values().any(|(p, _)| *p == peer) => {
                        self.dial_failures.insert(peer, w.clone());
                    }
                    _ => {
                        self.dial_failures.remove(&peer);
                    }
                }
                for done in self.pending_dials.remove(&peer).unwrap_or_default() {
                    let _ = done.send(Err(dial_error(peer, wrong.as_ref(), || error.to_string())));
                }
            }
            _ => {}
        }
    }

    async fn on_rpc(&mut self, ev: request_response::Event<NetRequest, NetResponse>) {
        use request_response::{Event, Message, OutboundFailure};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let (reply, rx) = oneshot::channel();
                let timeout = self.request_timeout;
                self.replies.push(
                    async move {
                        let response = match tokio::time::timeout(timeout, rx).await {
                            Ok(Ok(r)) => r,
                            Ok(Err(_)) => NetResponse::Rejected {
                                reason: "the receiver dropped the request".into(),
                            },
                            Err(_) => NetResponse::Rejected {
                                reason: "the receiver took too long to answer".into(),
                            },
                        };
                        (channel, response)
                    }
                    .boxed(),
                );
                emit(
                    &self.events,
                    NetEvent::Request {
                        peer,
                        request,
                        reply,
                    },
                )
                .await;
            }
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((_, done)) = self.pending_requests.remove(&request_id) {
                    let _ = done.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, done)) = self.pending_requests.remove(&request_id) {
                    let err = match error {
                        OutboundFailure::DialFailure => {
                            dial_error(peer, self.dial_failures.get(&peer), || "dial failed".into())
                        }
                        OutboundFailure::Timeout => NetError::Timeout {
                            peer,
                            secs: self.request_timeout.as_secs(),
                        },
                        OutboundFailure::ConnectionClosed => NetError::ConnectionClosed { peer },
                        other => NetError::Failed {
                            peer,
                            reason: other.to_string(),
                        },
                    };
                    let _ = done.send(Err(err));
                }
                if !self.pending_requests.values().any(|(p, _)| *p == peer) {
                    self.dial_failures.remove(&peer);
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "inbound request failed: {error}");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

/// Bounded: if the application is slow, the network waits for it instead of
/// buffering without limit.
async fn emit(events: &mpsc::Sender<NetEvent>, ev: NetEvent) {
    let _ = events.send(ev).await;
}

/// Why a dial to `peer` failed: the peer at the address had another
/// identity (`wrong`: the one found and the address), or `reason`.
fn dial_error(
    peer: PeerId,
    wrong: Option<&(PeerId, String)>,
    reason: impl FnOnce() -> String,
) -> NetError {
    match wrong {
        Some((found, addr)) => NetError::WrongPeer {
            expected: peer,
            found: *found,
            addr: addr.clone(),
        },
        None => NetError::Unreachable {
            peer,
            reason: reason(),
        },
    }
}
