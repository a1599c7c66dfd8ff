//! nakshatra's libp2p layer: identity, transports, the Kademlia DHT that is
//! the swarm's only registry, mDNS, identify, ping, the direct info
//! protocol, raw streams ([`stream`]) with the RTT probe protocol, and
//! chain planning ([`plan`]). Knows bytes and peers, never llama.cpp.
//!
//! # Shape
//!
//! [`spawn`] builds a libp2p [`libp2p::Swarm`] (TCP + noise + yamux, QUIC
//! with the `quic` feature (on by default; see [`with_quic_listeners`] and
//! [`prefer_quic`]), DNS), starts listening and moves the swarm into an
//! event-loop task; it hands back a [`Client`] (cloneable handle; every
//! method is a command sent to the loop, answered over a oneshot channel)
//! and the task's `JoinHandle`.
//!
//! # What a serving node announces
//!
//! - Kademlia **provider records** (bound to the sender's PeerId by the
//!   connection) for `/nakshatra/1/models`, `/nakshatra/1/model/{id}` and
//!   `/nakshatra/1/block/{id}/{b}` for every held block: any block's holders
//!   are one O(log n) lookup away.
//! - A **signed [`ServerInfo`]** record at `/nakshatra/1/info/{peer id}`,
//!   signed with the node's ed25519 identity. Every node stores inbound
//!   records only after [`nakshatra_protocol::verify`] (Kademlia
//!   `StoreInserts::FilterBoth`); askers verify again whatever they read.
//! - Both are refreshed every [`SwarmConfig::refresh`] and expire after
//!   [`SwarmConfig::record_ttl`] (same value on every node!).
//! - In its info, **`next_rtts`**: RTTs to holders of the block right after
//!   its range, measured by a background task of this crate every
//!   `refresh` (and soon after the announcement or new DHT peers) with
//!   `/nakshatra/probe/1`. The node gets it for free; a `next_rtts` set in
//!   the announced info itself takes precedence.
//!
//! # Raw streams
//!
//! [`Client::stream_control`] hands out the [`stream::Control`]
//! for the node's own protocols. Every node answers `/nakshatra/probe/1`
//! ([`Client::probe_rtt`]). Inbound streams of a protocol nobody `accept`ed
//! are refused, and those arriving while its accept loop lags far behind
//! are dropped: see
//! [`Client::stream_control`].
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use nakshatra_swarm::{load_or_create_identity, spawn, ServerInfo, SwarmConfig};
//!
//! let key = load_or_create_identity("data/identity.key".as_ref())?;
//! let mut config = SwarmConfig::server();
//! config.bootstrap = vec!["/ip4/10.0.0.1/tcp/4001".parse()?];
//! let (client, task) = spawn(key, config).await?;
//! for addr in client.listen_addrs().await? {
//!     println!("{addr}/p2p/{}", client.peer_id());
//! }
//! let mut info = ServerInfo::new("ab".repeat(32), "llama", 30, 0..10, 2048);
//! info.max_sessions = 4;
//! info.free_sessions = 4;
//! client.announce(info).await?;
//! // ... serve ...
//! client.shutdown().await?; // withdraws, then stops the loop
//! task.await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod addrs;
mod backoff;
mod behaviour;
mod cache;
mod client;
mod codec;
mod config;
mod connect;
mod error;
mod event_loop;
mod identity;
mod inbound;
mod limits;
mod mesh_keep_alive;
pub mod plan;
mod probe;
mod relay_server;
mod scope;
mod store;
pub mod stream;
mod transport;
mod view;

use std::sync::Arc;

use libp2p::{identity::Keypair, noise, tcp, yamux, Swarm, SwarmBuilder};
use tokio::{
    sync::{mpsc, watch, Notify},
    task::JoinHandle,
};

pub use addrs::{is_quic, prefer_quic, quic_twin, with_quic_listeners};
pub use backoff::DIAL_BACKOFF;
pub use behaviour::{
    GOSSIP_QUEUE_LEN, IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL, RELAY_MAX_CIRCUITS,
    RELAY_MAX_CIRCUITS_PER_PEER, RELAY_MAX_CIRCUIT_BYTES, RELAY_MAX_CIRCUIT_DURATION,
    RELAY_MAX_RESERVATIONS, RELAY_MAX_RESERVATIONS_PER_PEER,
};
pub use client::{Client, ProbeStats, MAX_EDGE_PROBES, SILENT_PEER_MEMORY, VIEW_SYNC_MAX_AGE};
pub use codec::{Frame, FrameCodec, InfoCodec, ViewCodec};
pub use config::{Role, SwarmConfig, Watermarks};
pub use connect::{Handshake, OpenError, Reopen, WaitError};
pub use error::{AnnounceError, InfoError, LookupError, Stopped, SwarmError};
pub use event_loop::SwarmStats;
pub use identity::{load_or_create_identity, signing_key, IdentityError};
pub use inbound::{PeerQuota, QuotaPermit, Served};
pub use plan::{plan_chain, Chain, Hop, PlanError, PlanOptions};
pub use view::{
    build_model_view, build_model_view_with, whole_model_id, ModelShape, ModelView, PeerView,
    ResolveError, SwarmView, Via, MIN_ID_PREFIX,
};

/// The name of a stream protocol (`StreamProtocol::new("/nakshatra/act/2")`).
pub use libp2p::StreamProtocol;
pub use stream::Stream;

/// Multiaddr components (e.g. `Protocol::P2p(peer)` to append `/p2p/<peer id>`).
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{identity::Keypair as IdentityKeypair, Multiaddr, PeerId};
pub use nakshatra_protocol::{
    self as protocol, DeviceInfo, NextRtt, ServerInfo, ServerState, PROTOCOL_VERSION,
};

/// Starts a swarm node with identity `keypair` (must be ed25519; see
/// [`load_or_create_identity`]) and `config`, on the current tokio runtime.
///
/// Listens on every `config.listen` address before returning (a port in
/// use is an error here), then runs the event loop in a spawned task and
/// dials the bootstrap peers from it. Unreachable bootstrap peers are not
/// an error: the loop logs a warning and retries with exponential backoff
/// (`bootstrap_backoff_initial` doubling up to `bootstrap_backoff_max`).
///
/// The `JoinHandle` completes after [`Client::shutdown`], or once every
/// `Client` clone is dropped. Aborting it drops the swarm at once (a
/// crash, as far as the other peers can tell).
pub async fn spawn(
    keypair: Keypair,
    config: SwarmConfig,
) -> Result<(Client, JoinHandle<()>), SwarmError> {
    config.validate().map_err(SwarmError::Config)?;
    let signing_key = signing_key(&keypair).map_err(|_| SwarmError::NotEd25519)?;
    let mut config = config;
    for relay in &config.relays {
        if !config.bootstrap.contains(relay) {
            config.bootstrap.push(relay.clone());
        }
    }
    let bytes_sent = transport::BytesSent::default();
    let direct_key = keypair.clone();
    let mut swarm = build_swarm(keypair, &config, bytes_sent.clone())?;
    for addr in &config.external_addrs {
        // Confirmed at once: the operator vouches for it.
        swarm.add_external_address(addr.clone());
    }
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| SwarmError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    let peer_id = *swarm.local_peer_id();
    let control = swarm.behaviour().stream.new_control();
    // Dropped with the event loop: ends the probe server and next-hop task.
    let (stop_tx, stop_rx) = watch::channel(());
    let direct = match config.direct_bind() {
        None => None,
        Some(bind) => {
            let stream = &swarm.behaviour().stream;
            let port = stream::direct::spawn_listener(
                bind,
                direct_key.clone(),
                stream.accepting(),
                stream.open_streams(),
                stop_rx.clone(),
            )
            .await
            .map_err(|e| SwarmError::Listen {
                addr: Multiaddr::empty()
                    .with(Protocol::from(bind.ip()))
                    .with(Protocol::Tcp(bind.port())),
                reason: format!("direct streams: {e}"),
            })?;
            tracing::debug!(%bind, port, "direct streams listening");
            Some(Arc::new(stream::direct::Direct::new(
                direct_key,
                port,
                stream.peer_ips(),
                stream.open_streams(),
            )))
        }
    };
    let (tx, rx) = mpsc::channel(256);
    let trigger = Arc::new(Notify::new());
    let client = Client::new(
        tx,
        peer_id,
        control.clone(),
        config.link_delay(),
        config.probe_timeout,
        config.silent_peer_memory,
        direct,
    );
    client.serve_direct_port();
    probe::spawn_probe_server(control, config.link_delay(), stop_rx.clone());
    if config.role == Role::Server {
        probe::spawn_next_hop_task(client.downgrade(), trigger.clone(), config.refresh, stop_rx);
    }
    let event_loop =
        event_loop::EventLoop::new(swarm, rx, config, signing_key, trigger, stop_tx, bytes_sent);
    let task = tokio::spawn(event_loop.run());
    Ok((client, task))
}

fn build_swarm(
    keypair: Keypair,
    config: &SwarmConfig,
    bytes_sent: transport::BytesSent,
) -> Result<Swarm<behaviour::Behaviour>, SwarmError> {
    let transport_err = |e: &dyn std::fmt::Display| SwarmError::Transport(e.to_string());
    // TCP + noise + yamux as `SwarmBuilder::with_tcp` builds it, with the
    // raw TCP dials watched for refusals that end QUIC dials early
    // (`transport.rs`).
    use libp2p::core::Transport as _;
    let dial_timeout = config.dial_timeout;
    let refusals = transport::TcpRefusals::default();
    let bytes_sent_memory = bytes_sent.clone();
    let tcp_refusals = refusals.clone();
    let builder = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| {
            let tcp = transport::RecordRefusals::new(
                tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)),
                tcp_refusals,
            )
            .map(move |stream, _| bytes_sent.count(stream));
            let noise = noise::Config::new(key)
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })?;
            Ok(tcp
                .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .timeout(dial_timeout))
        })
        .map_err(|e| transport_err(&e))?;
    // `/memory/N`, only when asked for (simulations).
    let memory_bytes = bytes_sent_memory;
    let builder = builder
        .with_other_transport(|key| {
            let memory = if config.memory_transport {
                libp2p::core::transport::OptionalTransport::some(
                    libp2p::core::transport::MemoryTransport::default(),
                )
            } else {
                libp2p::core::transport::OptionalTransport::none()
            };
            let noise = noise::Config::new(key)
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })?;
            Ok(memory
                .map(move |stream, _| memory_bytes.count(stream))
                .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .timeout(dial_timeout))
        })
        .map_err(|e| transport_err(&e))?;
    #[cfg(feature = "quic")]
    let builder = builder
        .with_other_transport(|key| {
            transport::AbortOnRefusal::new(
                libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key)),
                refusals,
            )
        })
        .map_err(|e| transport_err(&e))?;
    #[cfg(not(feature = "quic"))]
    drop(refusals);
    let idle = config.idle_connection_timeout;
    let swarm = builder
        .with_dns()
        .map_err(|e| transport_err(&e))?
        // Dials and listeners on `<relay>/p2p-circuit` addresses.
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport_err(&e))?
        .with_behaviour(|key, relay_client| behaviour::Behaviour::new(key, config, relay_client))
        .map_err(|e| transport_err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build();
    Ok(swarm)
}
