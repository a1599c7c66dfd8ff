//! The composed libp2p behaviour and how it is configured.

use std::time::Duration;

use libp2p::{
    allow_block_list::{self, BlockedPeers},
    autonat, dcutr, gossipsub, identify,
    identity::Keypair,
    kad::{self, Mode, StoreInserts},
    mdns, ping, relay, request_response,
    swarm::{behaviour::toggle::Toggle, NetworkBehaviour},
    StreamProtocol,
};
use nakshatra_protocol::rpc::{INFO_PROTOCOL, VIEW_PROTOCOL};

use crate::{
    codec::{InfoCodec, ViewCodec},
    config::Role,
    store::{Store, StoreLimits},
    SwarmConfig,
};

/// Kademlia protocol name: a private DHT, apart from the public IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/nakshatra/kad/1.0.0");

/// identify `protocol_version` of nakshatra nodes.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/nakshatra/1";

/// Re-announcements (`SwarmConfig::refresh`) per Kademlia routing-table
/// refresh (its periodic bootstrap).
const KAD_BOOTSTRAP_REFRESHES: u32 = 10;

/// Largest Kademlia message: a 16 KiB signed record plus framing must fit
/// in a PUT_VALUE / GET_VALUE message, and a provider list of up to
/// `MAX_PROVIDERS_PER_KEY` peers with addresses in a GET_PROVIDERS answer.
/// Every node of a swarm must accept this size.
pub(crate) const KAD_MAX_PACKET: usize = 256 * 1024;

/// Providers stored per key (libp2p's default is K = 20; the models key is
/// provided by every serving node).
pub(crate) const MAX_PROVIDERS_PER_KEY: usize = 256;

/// Connections one peer may hold to this node at once (two nodes dialling
/// each other at the same moment make two; more is a peer hoarding
/// connections to get more streams).
pub(crate) const MAX_CONNECTIONS_PER_PEER: usize = 4;
/// Inbound connections still in their handshake at once.
pub(crate) const MAX_PENDING_INCOMING: usize = 128;
/// Established inbound connections at once (a node of a big swarm talks
/// to a few hundred peers).
pub(crate) const MAX_ESTABLISHED_INCOMING: usize = 1024;

/// Reservations a relay holds at once (libp2p's default). A reservation
/// is a few hundred bytes of state; circuits are what cost.
pub const RELAY_MAX_RESERVATIONS: usize = 128;
/// Reservations one peer may hold on this relay (libp2p's default).
pub const RELAY_MAX_RESERVATIONS_PER_PEER: usize = 4;
/// Circuits a relay carries at once. Each may carry a chain's activations
/// for a whole answer (see [`RELAY_MAX_CIRCUIT_BYTES`]), so this bounds
/// the relay's bandwidth, not only its memory (a circuit buffers at most
/// one yamux window each way).
pub const RELAY_MAX_CIRCUITS: usize = 32;
/// Circuits one source peer may open through this relay at once.
pub const RELAY_MAX_CIRCUITS_PER_PEER: usize = 8;
/// Bytes one circuit may carry, both directions summed, before the relay
/// cuts it. libp2p's default (128 KiB) is less than one step's hidden
/// states (a 4096-wide f16 row is 8 KiB per token: a 2048-token prefill
/// is 16 MiB), so a relayed hop would die on its first prompt. 1 GiB
/// carries about 130,000 decode steps of such a row, or a piece of a
/// slice; a longer use opens a new circuit.
pub const RELAY_MAX_CIRCUIT_BYTES: u64 = 1 << 30;
/// How long one circuit may live. libp2p's default (2 min) ends a relayed
/// chain in the middle of a long answer; an hour outlasts any session a
/// hop keeps (their idle eviction is minutes).
pub const RELAY_MAX_CIRCUIT_DURATION: Duration = Duration::from_secs(60 * 60);

/// Every protocol a node speaks, composed into one libp2p behaviour: the
/// private Kademlia DHT, identify, ping, optional mDNS, the info
/// request-response protocol and raw streams.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// Refuses connections over the caps above, before any protocol runs.
    pub(crate) limits: crate::limits::Behaviour,
    /// Peers found dead (see `Client::forget_peer`): no connection to or
    /// from them, so that no lookup waits on a dial to them.
    pub(crate) blocked: allow_block_list::Behaviour<BlockedPeers>,
    /// Peers none of whose addresses answered a dial are not dialled
    /// again for a while (see [`crate::backoff`]).
    pub(crate) backoff: crate::backoff::Behaviour,
    pub(crate) kad: kad::Behaviour<Store>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) info: request_response::Behaviour<InfoCodec>,
    pub(crate) view: request_response::Behaviour<ViewCodec>,
    /// Serving nodes only (an asker or `swarm status` has nothing to
    /// relay). Its streams do not keep a connection open: only the mesh
    /// does (see [`crate::mesh_keep_alive`]).
    pub(crate) gossip: Toggle<crate::mesh_keep_alive::Behaviour<gossipsub::Behaviour>>,
    /// Raw streams (`/nakshatra/probe/1`, and the node's own protocols
    /// through [`crate::Client::stream_control`]).
    pub(crate) stream: crate::stream::Behaviour,
    /// Circuit-relay v2 client: reservations on relays (a node behind
    /// NAT listens on `<relay>/p2p-circuit`) and dials through them.
    pub(crate) relay_client: relay::client::Behaviour,
    /// Circuit-relay v2 server, on serving nodes. Offered (HOP advertised
    /// and accepted) only while this node has a confirmed external address
    /// that is not itself relayed: the event loop sets its status.
    /// Wrapped: see `relay_server.rs` for the panic it guards against.
    pub(crate) relay: Toggle<crate::relay_server::Behaviour>,
    /// Hole punching: upgrades a relayed connection to a direct one.
    pub(crate) dcutr: dcutr::Behaviour,
    /// AutoNAT v2 client: asks peers to dial back each candidate external
    /// address; a success confirms it.
    pub(crate) autonat: autonat::v2::client::Behaviour,
    /// AutoNAT v2 server, on serving nodes: dials back other peers'
    /// candidate addresses.
    pub(crate) autonat_server: Toggle<autonat::v2::server::Behaviour>,
}

impl Behaviour {
    pub(crate) fn new(
        key: &Keypair,
        config: &SwarmConfig,
        relay_client: relay::client::Behaviour,
    ) -> Self {
        let peer_id = key.public().to_peer_id();

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            .set_record_filtering(StoreInserts::FilterBoth)
            .set_record_ttl(Some(config.record_ttl))
            .set_provider_record_ttl(Some(config.record_ttl))
            // Re-announcing is ours (event loop, every `refresh`, with a
            // freshly signed info); kad's own jobs would only duplicate it.
            .set_provider_publication_interval(None)
            .set_publication_interval(None)
            .set_replication_interval(None)
            .set_query_timeout(config.query_timeout)
            // Kademlia's routing-table refresh: every ten re-announcements
            // (5 min by default, kad's own default), so that it keeps its
            // share when the simulator slows every period down.
            .set_periodic_bootstrap_interval(Some(config.refresh * KAD_BOOTSTRAP_REFRESHES))
            .set_max_packet_size(KAD_MAX_PACKET)
            .set_caching(kad::Caching::Disabled);
        let store = Store::new(
            peer_id,
            StoreLimits {
                max_records: 4096,
                max_value_bytes: nakshatra_protocol::MAX_RECORD_BYTES + 1,
                max_providers_per_key: MAX_PROVIDERS_PER_KEY,
                max_remote_provider_keys: 16 * 1024,
            },
        );
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
        kad.set_mode(Some(match config.role {
            // Forced: on a LAN or loopback there is no confirmed external
            // address, and in automatic mode nobody would answer queries.
            Role::Server => Mode::Server,
            Role::Client => Mode::Client,
        }));

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_string(), key.public())
                .with_agent_version(config.agent_version.clone())
                .with_push_listen_addr_updates(true),
        );

        let ping = ping::Behaviour::new(ping::Config::new().with_interval(config.ping_interval));

        let mdns = if config.mdns {
            let mdns_config = mdns::Config {
                query_interval: config.mdns_query_interval,
                ..mdns::Config::default()
            };
            match mdns::tokio::Behaviour::new(mdns_config, peer_id) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(error = %e, "mDNS unavailable, continuing without it");
                    None
                }
            }
        } else {
            None
        };

        let support = match config.role {
            Role::Server => request_response::ProtocolSupport::Full,
            Role::Client => request_response::ProtocolSupport::Outbound,
        };
        let info = request_response::Behaviour::with_codec(
            InfoCodec::default(),
            [(StreamProtocol::new(INFO_PROTOCOL), support.clone())],
            request_response::Config::default()
                .with_request_timeout(config.request_timeout)
                .with_max_concurrent_streams(64),
        );

        let view = request_response::Behaviour::with_codec(
            ViewCodec::default(),
            [(StreamProtocol::new(VIEW_PROTOCOL), support)],
            request_response::Config::default()
                .with_request_timeout(config.request_timeout)
                .with_max_concurrent_streams(VIEW_MAX_CONCURRENT_STREAMS),
        );
        let gossip = (config.role == Role::Server).then(|| {
            crate::mesh_keep_alive::Behaviour::new(
                gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Anonymous,
                    gossip_config(config.gossip_heartbeat),
                )
                .expect("the gossipsub configuration is valid"),
            )
        });

        let limits = crate::limits::Behaviour::new(crate::limits::Caps {
            per_peer: MAX_CONNECTIONS_PER_PEER,
            pending_incoming: MAX_PENDING_INCOMING,
            established_incoming: MAX_ESTABLISHED_INCOMING,
        });

        let server = config.role == Role::Server;
        let relay = server.then(|| {
            let mut relay = relay::Behaviour::new(peer_id, relay_config());
            // Off until the event loop sees a confirmed, non-relayed
            // external address (a relayed one must not make a relay).
            relay.set_status(Some(relay::Status::Disable));
            crate::relay_server::Behaviour::new(relay)
        });

        Behaviour {
            limits,
            blocked: allow_block_list::Behaviour::default(),
            backoff: crate::backoff::Behaviour::default(),
            kad,
            identify,
            ping,
            mdns: Toggle::from(mdns),
            info,
            view,
            gossip: Toggle::from(gossip),
            stream: crate::stream::Behaviour::new(),
            relay_client,
            relay: Toggle::from(relay),
            dcutr: dcutr::Behaviour::new(peer_id),
            autonat: autonat::v2::client::Behaviour::default(),
            autonat_server: Toggle::from(server.then(autonat::v2::server::Behaviour::default)),
        }
    }
}

/// Concurrent view-protocol streams per connection (an answer can be a
/// megabyte: a peer gets a few at a time).
pub(crate) const VIEW_MAX_CONCURRENT_STREAMS: usize = 4;

/// Largest gossip message: one signed info and gossipsub's framing.
pub(crate) const GOSSIP_MAX_MESSAGE: usize = nakshatra_protocol::MAX_RECORD_BYTES + 1024;

/// IDONTWANT for every info (gossipsub's default sends it only for
/// messages over 1000 bytes, and a signed info is about that size): a node
/// that has an info tells its mesh at once, which saves most duplicate
/// copies.
const GOSSIP_IDONTWANT_THRESHOLD: usize = 128;

/// Messages one connection's gossip handler may hold queued (gossipsub's
/// default is 5,000, about 5 MB of infos a connection: at 160 connections
/// a node could hold most of a gigabyte for slow peers, and the 500-node
/// simulation ran out of memory that way). A copy dropped here is
/// redundant (every mesh peer forwards the same info) or repaired by the
/// anti-entropy view sync.
pub const GOSSIP_QUEUE_LEN: usize = 256;

/// The info topic's gossipsub settings: no gossipsub-level signatures
/// (every message is a signed info, verified by the application before it
/// is forwarded: `validate_messages`), message ids from the content (the
/// same info relayed by many peers is one message), messages bounded to one
/// record. Publishing goes to the mesh only (not flooded to every connected
/// subscriber: a serving node is connected to a large part of the swarm),
/// and IDONTWANT is sent for every info
/// ([`GOSSIP_IDONTWANT_THRESHOLD`]); mesh sizes are gossipsub's defaults
/// (6, 5–12), the heartbeat `SwarmConfig::gossip_heartbeat` (1 s, its
/// default). How long a message may wait in a connection's queue before
/// gossipsub drops it is tied to the heartbeat as in gossipsub's defaults
/// (forwarded: one heartbeat, published: five), so that a simulation
/// that slows the heartbeat slows them too. The anti-entropy view sync
/// makes up for what the gossip misses.
fn gossip_config(heartbeat: Duration) -> gossipsub::Config {
    gossipsub::ConfigBuilder::default()
        .heartbeat_interval(heartbeat)
        .forward_queue_duration(heartbeat)
        .publish_queue_duration(heartbeat * 5)
        .flood_publish(false)
        .idontwant_message_size_threshold(GOSSIP_IDONTWANT_THRESHOLD)
        .connection_handler_queue_len(GOSSIP_QUEUE_LEN)
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .validate_messages()
        .max_transmit_size(GOSSIP_MAX_MESSAGE)
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(&blake3::hash(&m.data).as_bytes()[..20])
        })
        .build()
        .expect("the gossipsub configuration is valid")
}

/// The relay server's limits: libp2p's defaults (reservation counts and
/// duration, its per-peer and per-IP rate limiters) except circuits, which
/// must carry a chain's activations (see [`RELAY_MAX_CIRCUIT_BYTES`]).
fn relay_config() -> relay::Config {
    relay::Config {
        max_reservations: RELAY_MAX_RESERVATIONS,
        max_reservations_per_peer: RELAY_MAX_RESERVATIONS_PER_PEER,
        max_circuits: RELAY_MAX_CIRCUITS,
        max_circuits_per_peer: RELAY_MAX_CIRCUITS_PER_PEER,
        max_circuit_duration: RELAY_MAX_CIRCUIT_DURATION,
        max_circuit_bytes: RELAY_MAX_CIRCUIT_BYTES,
        ..relay::Config::default()
    }
}
