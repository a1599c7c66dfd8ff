//! The composed libp2p behaviour and how it is configured.

use libp2p::{
    allow_block_list::{self, BlockedPeers},
    connection_limits::{self, ConnectionLimits},
    identify,
    identity::Keypair,
    kad::{self, Mode, StoreInserts},
    mdns, ping, request_response,
    swarm::{behaviour::toggle::Toggle, NetworkBehaviour},
    StreamProtocol,
};
use nakshatra_protocol::rpc::INFO_PROTOCOL;

use crate::{
    codec::InfoCodec,
    config::Role,
    store::{Store, StoreLimits},
    SwarmConfig,
};

/// Kademlia protocol name: a private DHT, apart from the public IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/nakshatra/kad/1.0.0");

/// identify `protocol_version` of nakshatra nodes.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/nakshatra/1";

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
pub(crate) const MAX_CONNECTIONS_PER_PEER: u32 = 4;
/// Inbound connections still in their handshake at once.
pub(crate) const MAX_PENDING_INCOMING: u32 = 128;
/// Established inbound connections at once (a node of a big swarm talks
/// to a few hundred peers).
pub(crate) const MAX_ESTABLISHED_INCOMING: u32 = 1024;

/// Every protocol a node speaks, composed into one libp2p behaviour: the
/// private Kademlia DHT, identify, ping, optional mDNS, the info
/// request-response protocol and raw streams.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// Refuses connections over the caps above, before any protocol runs.
    pub(crate) limits: connection_limits::Behaviour,
    /// Peers found dead (see `Client::forget_peer`): no connection to or
    /// from them, so that no lookup waits on a dial to them.
    pub(crate) blocked: allow_block_list::Behaviour<BlockedPeers>,
    pub(crate) kad: kad::Behaviour<Store>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) info: request_response::Behaviour<InfoCodec>,
    /// Raw streams (`/nakshatra/probe/1`, and the node's own protocols
    /// through [`crate::Client::stream_control`]).
    pub(crate) stream: libp2p_stream::Behaviour,
}

impl Behaviour {
    pub(crate) fn new(key: &Keypair, config: &SwarmConfig) -> Self {
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
            InfoCodec,
            [(StreamProtocol::new(INFO_PROTOCOL), support)],
            request_response::Config::default()
                .with_request_timeout(config.request_timeout)
                .with_max_concurrent_streams(64),
        );

        let limits = connection_limits::Behaviour::new(
            ConnectionLimits::default()
                .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
                .with_max_established_incoming(Some(MAX_ESTABLISHED_INCOMING)),
        );

        Behaviour {
            limits,
            blocked: allow_block_list::Behaviour::default(),
            kad,
            identify,
            ping,
            mdns: Toggle::from(mdns),
            info,
            stream: libp2p_stream::Behaviour::new(),
        }
    }
}
