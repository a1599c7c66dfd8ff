//! How a node joins the swarm: role, addresses, timings.

use std::time::Duration;

use libp2p::Multiaddr;
use nakshatra_protocol::MAX_RECORD_LIFETIME_MS;

/// Whether the node serves the DHT (and announces), or only asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A serving node: Kademlia server mode (answers DHT queries, stores
    /// records and provider records), answers `/nakshatra/info/1`, may
    /// announce.
    Server,
    /// A short-lived asker (`swarm status`, `ask`): Kademlia client mode,
    /// serves nothing, cannot announce.
    Client,
}

/// Configuration of one swarm node. Start from [`SwarmConfig::server`] or
/// [`SwarmConfig::client`] and adjust the fields.
///
/// **Swarm-wide settings.** `record_ttl` is applied by the nodes that
/// *store* provider records (Kademlia's `provider_record_ttl` is a receiver
/// setting), so every node of one swarm must use the same `record_ttl`;
/// `refresh` must be well below it (the defaults, 90 s and 30 s, leave
/// room for two lost refreshes).
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// Server or client.
    pub role: Role,
    /// Addresses to listen on (`/ip4/0.0.0.0/tcp/0` for a server by
    /// default, none for a client).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (`.../p2p/<peer id>` optional). Unreachable
    /// ones are retried in the background with exponential backoff.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// How often mDNS queries the network when nothing was heard (any mDNS
    /// packet resets the timer). Default 30 s.
    pub mdns_query_interval: Duration,
    /// Lifetime of announcements: provider records expire this long after
    /// their last refresh, signed infos carry `expires_at = issued_at +
    /// record_ttl`. Default 90 s; at most one hour.
    pub record_ttl: Duration,
    /// How often a serving node re-announces (provider records and a
    /// freshly signed info). Default 30 s.
    pub refresh: Duration,
    /// Timeout of one Kademlia query (lookup, put). Default 30 s.
    pub query_timeout: Duration,
    /// Timeout of one `/nakshatra/info/1` request. Default 10 s.
    pub request_timeout: Duration,
    /// Interval between pings on each connection (RTT measurement).
    /// Default 15 s.
    pub ping_interval: Duration,
    /// Longest one `/nakshatra/probe/1` measurement takes, dial and
    /// stream set-up included ([`crate::Client::probe_rtt`]): a chain's
    /// first or last hop that stays silent this long is left out of a
    /// plan. Default 3 s.
    pub probe_timeout: Duration,
    /// Longest a connection may take from dial (or accept) to a ready
    /// noise + yamux session, on TCP and the in-process transport (a host
    /// that drops SYNs would otherwise hold a dial for minutes). Default
    /// 10 s.
    pub dial_timeout: Duration,
    /// How long a peer that did not answer this node's last RTT probe
    /// stays out of its plans ([`crate::Client::plan`]). Default
    /// [`crate::SILENT_PEER_MEMORY`] (60 s).
    pub silent_peer_memory: Duration,
    /// How long an idle connection is kept open. Default 60 s.
    pub idle_connection_timeout: Duration,
    /// Gossipsub's heartbeat (mesh upkeep, gossip of message ids to
    /// non-mesh peers). Default 1 s (gossipsub's).
    pub gossip_heartbeat: Duration,
    /// When the connection manager closes connections that are not idle
    /// (kept open by a DHT walk's peer, gossip, a view sync): see
    /// [`Watermarks`].
    pub connections: Watermarks,
    /// First retry delay when no bootstrap peer is reachable; doubles up to
    /// `bootstrap_backoff_max`. Default 1 s.
    pub bootstrap_backoff_initial: Duration,
    /// Longest delay between bootstrap retries. Default 30 s.
    pub bootstrap_backoff_max: Duration,
    /// Also dial and listen on libp2p's in-process transport (`/memory/N`
    /// addresses, noise and yamux on top as on TCP). For simulations of
    /// hundreds of nodes in one process: no file descriptor per
    /// connection (a process gets 20,000 here; 200 TCP stacks that meet
    /// each other need more) and no kernel in the way. Default off.
    pub memory_transport: bool,
    /// Addresses at which this node is reachable from the internet, as
    /// the operator knows them (`--external-addr`): confirmed at start
    /// (no AutoNAT test), announced, and they make a serving node a relay.
    pub external_addrs: Vec<Multiaddr>,
    /// Relays to reserve a slot on while this node has no confirmed
    /// public address (`--relay`, `.../p2p/<relay id>`). They are dialled
    /// like bootstrap peers. Without any, a node found unreachable by
    /// AutoNAT reserves on bootstrap peers that offer the relay protocol.
    pub relays: Vec<Multiaddr>,
    /// The `agent_version` identify reports.
    pub agent_version: String,
    /// The TCP port of the direct-stream listener (`0`: any free port;
    /// `None`: no listener, and no direct streams opened either). Direct
    /// streams carry a chain's activations and tokens on TCP connections
    /// of their own (`stream::direct`). The listener binds the IP of the
    /// first IP listen address, or `0.0.0.0` for a node that listens on
    /// nothing (an asker: the last hop sends it tokens). Default `Some(0)`.
    pub direct_port: Option<u16>,
    /// **Test-only fault: simulates a slow link.** When set, this node
    /// sleeps this long before echoing each `/nakshatra/probe/1` probe, so
    /// every RTT measured *to* it (by askers, and by servers filling in
    /// their `next_rtts`) is inflated by it. The node applies the same delay
    /// to its activation frames ([`crate::Client::test_link_delay`]). This
    /// sandbox has no tc/netem. Only with the `fault-injection` feature
    /// (tests); a production build has no such field. Default `None`.
    #[cfg(feature = "fault-injection")]
    pub test_link_delay: Option<Duration>,
}

/// The connection manager's bounds, as kubo's (IPFS) connection manager
/// (with higher defaults): once more than `high` peers are connected, the
/// oldest connections not protected are closed until `low` peers remain.
/// Protected: gossip mesh peers, peers with a stream of ours open (hop sessions, fetches), relays
/// this node holds a reservation on or is reserving, peers being hole
/// punched, peers reached through a relay, peers this node relays for,
/// peers it waits on (an RTT, a connection), and any connection made or
/// used (an info or view request either way) within `grace`; of the rest
/// the least recently used go first. A node in a big swarm otherwise stays
/// connected to every peer its DHT walks met within the idle timeout:
/// nearly all of 200 (docs/scale.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    /// Peers kept when trimming. Default 64.
    pub low: usize,
    /// Peers beyond which trimming starts. Default 160: well under the
    /// usual 1,024 file descriptors of a process, and above the ~100
    /// peers a node of a swarm of up to ~150 talks to. At kubo's 32 / 96,
    /// a node of a 100-node swarm closed 27 connections a simulated minute
    /// and made 25 of them again within it, for as many connections held
    /// (76 against 74-78) and twice the bytes of 64 / 160, which closes
    /// none (docs/scale.md).
    pub high: usize,
    /// Age under which a connection is never closed by trimming. Default
    /// 20 s (kubo's).
    pub grace: Duration,
}

impl Default for Watermarks {
    fn default() -> Self {
        Self {
            low: 64,
            high: 160,
            grace: Duration::from_secs(20),
        }
    }
}

impl SwarmConfig {
    /// The simulated link delay (test builds only; `None` otherwise).
    pub(crate) fn link_delay(&self) -> Option<Duration> {
        #[cfg(feature = "fault-injection")]
        return self.test_link_delay;
        #[cfg(not(feature = "fault-injection"))]
        None
    }

    /// Where the direct-stream listener binds (see
    /// [`SwarmConfig::direct_port`]); `None` for none (no port asked for,
    /// or listen addresses none of which is an IP one: a simulation's
    /// in-memory nodes).
    pub(crate) fn direct_bind(&self) -> Option<std::net::SocketAddr> {
        let port = self.direct_port?;
        let ip = self.listen.iter().find_map(crate::addrs::leading_ip);
        match ip {
            Some(ip) => Some(std::net::SocketAddr::new(ip, port)),
            None if self.listen.is_empty() => {
                Some(std::net::SocketAddr::from(([0, 0, 0, 0], port)))
            }
            None => None,
        }
    }

    /// Defaults for a serving node: listens on `/ip4/0.0.0.0/tcp/0`, mDNS
    /// on, 90 s TTL refreshed every 30 s.
    pub fn server() -> Self {
        SwarmConfig {
            role: Role::Server,
            listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("static multiaddr")],
            bootstrap: Vec::new(),
            mdns: true,
            mdns_query_interval: Duration::from_secs(30),
            record_ttl: Duration::from_secs(90),
            refresh: Duration::from_secs(30),
            query_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(15),
            probe_timeout: Duration::from_secs(3),
            dial_timeout: crate::transport::TCP_DIAL_TIMEOUT,
            silent_peer_memory: crate::client::SILENT_PEER_MEMORY,
            idle_connection_timeout: Duration::from_secs(60),
            gossip_heartbeat: Duration::from_secs(1),
            connections: Watermarks::default(),
            bootstrap_backoff_initial: Duration::from_secs(1),
            bootstrap_backoff_max: Duration::from_secs(30),
            memory_transport: false,
            external_addrs: Vec::new(),
            relays: Vec::new(),
            agent_version: format!("nakshatra/{}", env!("CARGO_PKG_VERSION")),
            direct_port: Some(0),
            #[cfg(feature = "fault-injection")]
            test_link_delay: None,
        }
    }

    /// Defaults for an asking node: no listener, mDNS on, client mode.
    pub fn client() -> Self {
        SwarmConfig {
            role: Role::Client,
            listen: Vec::new(),
            ..SwarmConfig::server()
        }
    }

    /// Checks the timings: non-zero, `refresh < record_ttl`, `record_ttl`
    /// at most the protocol's longest record lifetime.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("record_ttl", self.record_ttl),
            ("refresh", self.refresh),
            ("query_timeout", self.query_timeout),
            ("request_timeout", self.request_timeout),
            ("ping_interval", self.ping_interval),
            ("probe_timeout", self.probe_timeout),
            ("dial_timeout", self.dial_timeout),
            ("silent_peer_memory", self.silent_peer_memory),
            ("gossip_heartbeat", self.gossip_heartbeat),
            ("mdns_query_interval", self.mdns_query_interval),
            ("bootstrap_backoff_initial", self.bootstrap_backoff_initial),
        ];
        for (name, d) in nonzero {
            if d.is_zero() {
                return Err(format!("{name} must be > 0"));
            }
        }
        if self.refresh >= self.record_ttl {
            return Err(format!(
                "refresh ({:?}) must be shorter than record_ttl ({:?})",
                self.refresh, self.record_ttl
            ));
        }
        if self.record_ttl > Duration::from_millis(MAX_RECORD_LIFETIME_MS) {
            return Err(format!(
                "record_ttl ({:?}) exceeds the protocol's maximum record lifetime ({} ms)",
                self.record_ttl, MAX_RECORD_LIFETIME_MS
            ));
        }
        if let Some(r) = self
            .relays
            .iter()
            .find(|r| !matches!(r.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))))
        {
            return Err(format!(
                "relay address {r} must end with /p2p/<relay peer id>"
            ));
        }
        if self.bootstrap_backoff_max < self.bootstrap_backoff_initial {
            return Err("bootstrap_backoff_max must be >= bootstrap_backoff_initial".into());
        }
        if self.connections.high == 0 || self.connections.low > self.connections.high {
            return Err(format!(
                "connection watermarks must satisfy 0 < low <= high (low {}, high {})",
                self.connections.low, self.connections.high
            ));
        }
        Ok(())
    }
}

impl Default for SwarmConfig {
    /// [`SwarmConfig::server`].
    fn default() -> Self {
        SwarmConfig::server()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_must_name_its_peer_id() {
        let mut c = SwarmConfig::server();
        c.relays = vec!["/ip4/10.0.0.1/tcp/4001".parse().expect("multiaddr")];
        assert!(c.validate().is_err_and(|e| e.contains("/p2p/")));
        c.relays = vec![
            "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWD6xLenh5WuSzemD8kUgTbfNLNWKXCHgAeyz34M7DSHPj"
                .parse()
                .expect("multiaddr"),
        ];
        assert!(c.validate().is_ok());
    }
}
