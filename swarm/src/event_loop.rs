//! The task that owns the [`Swarm`]: it runs libp2p, executes the
//! [`crate::Client`]'s commands, re-announces on a timer, filters what
//! other peers try to store here, and retries bootstrap peers.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use ed25519_dalek::SigningKey;
use futures::StreamExt;
use libp2p::{
    autonat,
    core::transport::ListenerId,
    dcutr, gossipsub, identify,
    kad::{
        self, store::RecordStore, GetProvidersOk, GetRecordOk, InboundRequest, ProviderRecord,
        QueryId, QueryResult, Quorum, Record, RecordKey,
    },
    mdns,
    multiaddr::Protocol,
    ping, relay,
    request_response::{self, OutboundRequestId},
    swarm::{dial_opts::DialOpts, ConnectionId, DialError, SwarmEvent},
    Multiaddr, PeerId, Swarm,
};
use nakshatra_protocol::{
    keys::{self, DhtKey},
    now_ms,
    rpc::{
        InfoRequest, InfoResponse, ViewRequest, ViewResponse, MAX_VIEW_INFOS,
        MAX_VIEW_RESPONSE_BYTES, VIEW_PROTOCOL,
    },
    sign, verify, NextRtt, RecordError, ServerInfo, ServerState, PROTOCOL_VERSION,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::addrs::prefer_quic;
use crate::cache::{InfoCache, Inserted};
use crate::scope::Scope;
use crate::transport::BytesSent;
use crate::{
    behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL},
    config::Role,
    error::AnnounceError,
    probe::peer_set,
    view::Via,
    SwarmConfig,
};

/// Most addresses remembered per peer.
const MAX_ADDRS_PER_PEER: usize = 8;
/// Most peers in the address book.
const MAX_ADDR_BOOK: usize = 4096;
/// Trimmed peers remembered to count reconnections to them
/// ([`SwarmStats::reconnections`]); the oldest is forgotten first.
const TRIMMED_REMEMBERED: usize = 1024;
/// Dial attempts for a peer found by mDNS before giving up (mDNS reports
/// it again when its record is refreshed after expiry).
const MDNS_DIAL_ATTEMPTS: u32 = 3;
/// Delay before re-dialling an mDNS peer, times the attempt number.
const MDNS_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Longest a lookup waits for the routing table's first peer.
const DEFER_LOOKUPS_MAX: Duration = Duration::from_secs(5);
/// Most listen addresses put into a signed info.
const MAX_ADVERTISED_ADDRS: usize = 16;
/// Period of the housekeeping tick: bootstrap and mDNS re-dials, deferred
/// lookups, expired-record pruning, and answering listen-address waiters
/// (after a wildcard listener has reported every interface). It bounds how
/// late those run, so it is short next to the 1 s mDNS retry delay and
/// the bootstrap backoff, yet cheap: each tick only scans small maps.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_millis(250);

/// Peers on the info topic a serving node wants to be connected to:
/// gossipsub's `mesh_n`. Connections outside the mesh close when idle
/// (see `mesh_keep_alive`), so a node whose meshes thinned (peers left,
/// or pruned it from theirs) dials more of the servers its cache knows.
const GOSSIP_PEERS_WANTED: usize = 6;
/// How often a serving node checks it has [`GOSSIP_PEERS_WANTED`].
const MESH_TOPUP_PERIOD: Duration = Duration::from_secs(5);
/// Most dials one such check starts (a peer that prunes us is dialled
/// again only after its connection closed, at the earliest).
const MESH_TOPUP_DIALS: usize = 2;

/// Relays a node behind NAT keeps a reservation on at once (two: one
/// relay lost leaves the node reachable while it reserves on another).
const MAX_RELAY_RESERVATIONS: usize = 2;
/// How long a relayed connection stays open once a direct connection to
/// the same peer is up (DCUtR's spec: close the relay after a grace
/// period), and how often it is looked at again while a stream of ours
/// still runs on it: a relayed connection is closed only once it carries
/// none (a chain's activation stream opened on it before the direct
/// connection came lives on). New streams open on the direct one; an
/// asker waits for its ends to be done punching before it opens its
/// long-lived streams ([`crate::Client::wait_for_hole_punches`]).
const RELAY_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Wait before reserving again on a relay whose reservation failed or
/// was lost.
const RELAY_RETRY_DELAY: Duration = Duration::from_secs(10);

/// How long after joining a serving node waits for AutoNAT to confirm a
/// public address before it takes itself to be behind NAT and reserves on
/// bootstrap relays. AutoNAT v2 probes a candidate every 5 s and a
/// dial-back ends within the dial timeouts (10 s), so a reachable node is
/// confirmed well before; one failed candidate is no verdict (another may
/// pass), and a dial-back into a router that drops it may never be
/// answered at all.
const RELAY_FALLBACK_AFTER: Duration = Duration::from_secs(20);

pub(crate) use crate::addrs::is_relayed;

/// A node's reachability: relays it knows of, its reservations, and what
/// AutoNAT said.
#[derive(Default)]
struct Nat {
    /// Peers whose identify lists the circuit-relay v2 HOP protocol.
    offering: HashSet<PeerId>,
    /// Relays whose reservation request is under way (listener made, no
    /// answer yet). Their listener is not removed before the answer:
    /// libp2p-relay 0.22's client panics ("Relay connection exist") when
    /// a reservation is accepted on a listener removed meanwhile (seen
    /// with 100 nodes on 2 cores, where AutoNAT confirms an address while
    /// reservations are in flight).
    reserving: HashSet<PeerId>,
    /// Relays whose listener is to be removed once their pending
    /// reservation is answered.
    drop_when_answered: HashSet<PeerId>,
    /// The direct address this node dialled each peer at (where a
    /// reservation on it would be made).
    dialled_at: HashMap<PeerId, Multiaddr>,
    /// Relays named by `--relay` (reserved on whenever no public address
    /// is confirmed).
    configured: HashSet<PeerId>,
    /// Peers reached by a bootstrap dial.
    bootstrap_peers: HashSet<PeerId>,
    /// No public address was confirmed [`RELAY_FALLBACK_AFTER`] after
    /// joining: this node is taken to be behind NAT.
    unreachable: bool,
    /// When this node first joined through a bootstrap peer.
    joined_at: Option<Instant>,
    /// `<relay>/p2p-circuit` listeners, per relay.
    listeners: HashMap<PeerId, ListenerId>,
    /// Relays not to reserve on before the given time.
    retry_at: HashMap<PeerId, Instant>,
    /// Peers reached only through a relay while DCUtR may still give a
    /// direct connection: from the relayed connection's start until the
    /// hole punch's outcome, a direct connection, or the peer's last
    /// connection closing (see [`crate::Client::wait_for_hole_punches`]).
    punching: HashSet<PeerId>,
    /// Relayed connections to close once their [`RELAY_CLOSE_GRACE`] is
    /// over: a direct connection to the same peer is up.
    closing: HashMap<ConnectionId, (PeerId, Instant)>,
}

/// Counters of what this node did with what it received.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SwarmStats {
    /// Inbound signed-info records verified and stored.
    pub records_accepted: u64,
    /// Inbound records dropped (bad signature, wrong peer, expired,
    /// oversized, foreign key, ...).
    pub records_rejected: u64,
    /// Inbound provider records stored.
    pub providers_accepted: u64,
    /// Inbound provider records dropped (foreign key, store full).
    pub providers_rejected: u64,
    /// Peers with an open connection now.
    pub connected_peers: usize,
    /// Peers the connection manager disconnected (over the high
    /// watermark, see [`crate::config::Watermarks`]).
    pub connections_trimmed: u64,
    /// Connections to a peer the connection manager had trimmed (of the
    /// last 1,024 it trimmed): what trimming a peer the node needs again
    /// costs (a dial, a noise handshake, identify, gossip subscriptions).
    pub reconnections: u64,
    /// Peers in the Kademlia routing table now.
    pub routing_table_peers: usize,
    /// Whether this node currently announces.
    pub announcing: bool,
    /// Records in the local DHT store now (expired ones are swept).
    pub stored_records: usize,
    /// Provider keys in the local DHT store now.
    pub stored_provider_keys: usize,
    /// Kademlia walks this node finished (provide, provider and record
    /// lookups, puts, bootstraps: every query started here).
    pub dht_queries: u64,
    /// [`Self::dht_queries`] by kind: bootstrap, closest peers, record
    /// reads, record puts (republishes included), provider reads, provides
    /// (republishes included).
    pub dht_queries_by_kind: [u64; 6],
    /// Requests those walks sent to other nodes.
    pub dht_requests_out: u64,
    /// Kademlia requests other nodes sent to this one.
    pub dht_requests_in: u64,
    /// Infos received on the gossip topic (duplicates gossipsub dropped
    /// are not counted), and those that did not verify.
    pub gossip_received: u64,
    /// Gossip infos that did not verify (their forwarder is penalised).
    pub gossip_rejected: u64,
    /// Gossip messages gossipsub dropped on their way out: a peer's queue
    /// full, or a message not sent within its queue deadline (a slow peer
    /// or a busy node).
    pub gossip_dropped: u64,
    /// Of those, control messages (GRAFT, PRUNE, IDONTWANT) whose queue
    /// was full; the rest are data (a publish or forward past its queue
    /// deadline or with its queue full, IHAVE, IWANT).
    pub gossip_dropped_control: u64,
    /// Peers in this node's gossip mesh for the infos topic now (each
    /// info it receives first goes on to all of them but its sender).
    pub gossip_mesh: usize,
    /// View requests this node sent, and answered.
    pub view_requests_out: u64,
    /// View requests this node answered.
    pub view_requests_in: u64,
    /// Serving peers in the info cache now.
    pub cached_infos: usize,
    /// Bytes written to this node's TCP connections, encryption and
    /// framing included (QUIC connections are not counted).
    pub bytes_sent: u64,
}

/// What a serving node's next hops are: holders of block `end` of
/// `model_id` (the block right after its range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NextHopTarget {
    pub(crate) model_id: String,
    pub(crate) end: u32,
}

pub(crate) enum Command {
    /// Treat `peer` as dead for `period` (see `Client::forget_peer`).
    Forget {
        peer: PeerId,
        period: Duration,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Announce {
        info: Box<ServerInfo>,
        reply: oneshot::Sender<Result<(), AnnounceError>>,
    },
    Withdraw {
        reply: oneshot::Sender<()>,
    },
    GetProviders {
        key: RecordKey,
        reply: oneshot::Sender<HashSet<PeerId>>,
    },
    GetInfoRecords {
        peer: PeerId,
        reply: oneshot::Sender<Vec<Vec<u8>>>,
    },
    /// The serving peers in the info cache (of one model, or all).
    CachedInfos {
        model: Option<String>,
        reply: oneshot::Sender<Vec<(PeerId, ServerInfo)>>,
    },
    /// Asks up to [`VIEW_SYNC_FANOUT`] peers for the infos the cache lacks
    /// (skipped when the last sync is younger than `max_age`); answers
    /// how many new infos came in, `None` when no peer was connected.
    SyncView {
        model: Option<String>,
        max_age: Duration,
        reply: oneshot::Sender<Option<usize>>,
    },
    RequestInfo {
        peer: PeerId,
        reply: oneshot::Sender<Result<InfoResponse, String>>,
    },
    Rtt {
        peer: PeerId,
        /// Dial the peer if not connected; without it, a peer neither
        /// connected nor measured is answered `None` at once.
        dial: bool,
        reply: oneshot::Sender<Option<Duration>>,
    },
    LearnAddrs {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        /// Answered once the addresses are in the address books.
        reply: oneshot::Sender<()>,
    },
    /// Make sure a connection to `peer` is open (dial it at every known
    /// address if not).
    Connect {
        peer: PeerId,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Whose RTTs the next-hop task should measure (`None`: not announcing,
    /// or holding the model's last block).
    NextHopTarget {
        reply: oneshot::Sender<Option<NextHopTarget>>,
    },
    /// Results of a next-hop round for `target`.
    SetNextRtts {
        target: NextHopTarget,
        rtts: Vec<NextRtt>,
        reply: oneshot::Sender<()>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Stats {
        reply: oneshot::Sender<SwarmStats>,
    },
    /// How each connected peer is reached now.
    Via {
        reply: oneshot::Sender<HashMap<PeerId, Via>>,
    },
    /// Peers whose hole punch is under way.
    Punching {
        reply: oneshot::Sender<HashSet<PeerId>>,
    },
    LocalRecord {
        key: RecordKey,
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    /// Test builds only (`Client::put_raw_record`).
    #[cfg(feature = "fault-injection")]
    PutRaw {
        key: RecordKey,
        value: Vec<u8>,
        reply: oneshot::Sender<bool>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// One view sync: answers awaited, new infos so far, who waits.
struct ViewSync {
    waiting: usize,
    new: usize,
    reply: Option<oneshot::Sender<Option<usize>>>,
}

/// Peers one view sync asks at once.
pub(crate) const VIEW_SYNC_FANOUT: usize = 2;

/// Requests one view sync sends to one peer at most (a peer with more
/// than one answer's worth says `more`, and is asked again).
const VIEW_SYNC_MAX_ROUNDS: u32 = 8;

/// A lookup in progress: what it found so far, and who waits for it.
type Pending<T> = (T, oneshot::Sender<T>);

struct Announcement {
    info: ServerInfo,
    keys: Vec<RecordKey>,
}

struct Bootstrap {
    /// Dials of the current round still in flight.
    round: HashSet<ConnectionId>,
    /// Some dial of the current round connected.
    round_ok: bool,
    /// Connected to a bootstrap peer at some point (and not lost since).
    joined: bool,
    backoff: Duration,
    next_retry: Option<Instant>,
    attempts: u32,
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    config: SwarmConfig,
    signing_key: SigningKey,
    local_peer: PeerId,
    listen_addrs: Vec<Multiaddr>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    announcement: Option<Announcement>,
    /// The last signed info we published (answers `/nakshatra/info/1`).
    current_signed: Option<Vec<u8>>,
    /// The last publication happened with an empty routing table (it only
    /// reached the local store): publish again once a peer shows up.
    published_alone: bool,
    pending_providers: HashMap<QueryId, Pending<HashSet<PeerId>>>,
    pending_records: HashMap<QueryId, Pending<Vec<Vec<u8>>>>,
    pending_withdraw: HashMap<QueryId, oneshot::Sender<()>>,
    pending_info: HashMap<OutboundRequestId, oneshot::Sender<Result<InfoResponse, String>>>,
    /// The newest verified info of every serving peer heard of.
    cache: InfoCache,
    /// View requests in flight: which sync they belong to.
    pending_view: HashMap<OutboundRequestId, (PeerId, Option<String>, u64, u32)>,
    /// Syncs in flight: answers still awaited, new infos so far, waiters.
    syncs: HashMap<u64, ViewSync>,
    next_sync: u64,
    /// When a view sync last got an answer.
    last_sync: Option<Instant>,
    /// Connected peers whose identify lists the view protocol.
    view_peers: HashSet<PeerId>,
    /// Our last info could not be gossiped (no subscribed peer known yet).
    gossip_unsent: bool,
    rtt: HashMap<PeerId, Duration>,
    rtt_waiters: HashMap<PeerId, Vec<oneshot::Sender<Option<Duration>>>>,
    connect_waiters: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>>,
    /// Latest next-hop RTTs (signed into the info when the announced info
    /// carries none itself).
    next_rtts: Vec<NextRtt>,
    /// Wakes the next-hop task (new target, new DHT peer).
    next_hop_trigger: Arc<Notify>,
    /// Dropped with the loop: stops the probe server and next-hop tasks.
    _stop: watch::Sender<()>,
    addr_book: HashMap<PeerId, Vec<Multiaddr>>,
    /// Lookups waiting for the routing table's first peer (deadline).
    deferred_lookups: Vec<(Instant, Command)>,
    /// mDNS-discovered peers whose dial failed: (attempts, next retry).
    mdns_retries: HashMap<PeerId, (u32, Option<Instant>)>,
    bootstrap: Bootstrap,
    stats: SwarmStats,
    /// Bytes written to TCP connections (`SwarmStats::bytes_sent`).
    bytes_sent: BytesSent,
    /// Peers blocked as dead (`Command::Forget`), until when.
    forgotten: HashMap<PeerId, Instant>,
    /// When the gossip mesh was last checked for enough peers, and how
    /// many checks there were (it varies which servers are dialled).
    mesh_topup: (Instant, u64),
    /// Open connections per peer, and whether each is relayed.
    conns: HashMap<PeerId, HashMap<ConnectionId, bool>>,
    /// When each connected peer was last used: connected, or sent or
    /// asked an info or view request. The connection manager closes the
    /// least recently used first, and none used within its grace.
    last_used: HashMap<PeerId, Instant>,
    /// Peers the connection manager disconnected, and when (at most
    /// [`TRIMMED_REMEMBERED`]; for [`SwarmStats::reconnections`]).
    trimmed: HashMap<PeerId, Instant>,
    /// Streams of ours open per peer (they protect a connection).
    open_streams: Arc<crate::stream::OpenStreams>,
    /// Peers this node relays for: reservations and circuits it serves,
    /// per peer (bounded by the relay server's own limits).
    relaying_for: HashMap<PeerId, usize>,
    nat: Nat,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        config: SwarmConfig,
        signing_key: SigningKey,
        next_hop_trigger: Arc<Notify>,
        stop: watch::Sender<()>,
        bytes_sent: BytesSent,
    ) -> Self {
        let local_peer = *swarm.local_peer_id();
        let open_streams = swarm.behaviour().stream.open_streams();
        let backoff = config.bootstrap_backoff_initial;
        let config_relays: HashSet<PeerId> = config
            .relays
            .iter()
            .filter_map(|a| match a.iter().last() {
                Some(Protocol::P2p(p)) => Some(p),
                _ => None,
            })
            .collect();
        EventLoop {
            swarm,
            commands,
            config,
            signing_key,
            local_peer,
            listen_addrs: Vec::new(),
            listen_waiters: Vec::new(),
            announcement: None,
            current_signed: None,
            published_alone: false,
            pending_providers: HashMap::new(),
            pending_records: HashMap::new(),
            pending_withdraw: HashMap::new(),
            pending_info: HashMap::new(),
            cache: InfoCache::default(),
            pending_view: HashMap::new(),
            syncs: HashMap::new(),
            next_sync: 0,
            last_sync: None,
            view_peers: HashSet::new(),
            gossip_unsent: false,
            rtt: HashMap::new(),
            rtt_waiters: HashMap::new(),
            connect_waiters: HashMap::new(),
            next_rtts: Vec::new(),
            next_hop_trigger,
            _stop: stop,
            addr_book: HashMap::new(),
            deferred_lookups: Vec::new(),
            mdns_retries: HashMap::new(),
            bootstrap: Bootstrap {
                round: HashSet::new(),
                round_ok: false,
                joined: false,
                backoff,
                next_retry: None,
                attempts: 0,
            },
            stats: SwarmStats::default(),
            bytes_sent,
            forgotten: HashMap::new(),
            mesh_topup: (Instant::now(), 0),
            trimmed: HashMap::new(),
            conns: HashMap::new(),
            last_used: HashMap::new(),
            open_streams,
            relaying_for: HashMap::new(),
            nat: Nat {
                configured: config_relays,
                ..Nat::default()
            },
        }
    }

    /// Runs until [`Command::Shutdown`] or until every [`crate::Client`] is
    /// dropped (then without withdrawing: like a crash, announcements
    /// expire after the TTL).
    pub(crate) async fn run(mut self) {
        let mut refresh = tokio::time::interval(self.config.refresh);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        refresh.tick().await; // the first tick is immediate
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_PERIOD);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        tracing::info!(peer_id = %self.local_peer, role = ?self.config.role, "swarm node started");
        // `--external-addr` ones were confirmed before the loop ran, and
        // `Swarm::add_external_address` emits no event for them.
        if self.swarm.external_addresses().next().is_some() {
            self.on_external_addrs_changed();
        }
        self.dial_bootstraps();
        // Servers carry the info gossip (clients have no gossipsub at all
        // and sync views on demand).
        if let Some(gossip) = self.swarm.behaviour_mut().gossip.as_mut() {
            let topic = gossipsub::IdentTopic::new(keys::INFOS_TOPIC);
            if let Err(e) = gossip.subscribe(&topic) {
                tracing::warn!(error = %e, "cannot subscribe to the info topic");
            }
        }

        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => {
                        let _ = reply.send(());
                        break;
                    }
                    Some(command) => self.on_command(command),
                    None => {
                        tracing::debug!("every client handle dropped; stopping");
                        break;
                    }
                },
                _ = refresh.tick() => {
                    if let Err(e) = self.publish() {
                        tracing::error!(error = %e, "cannot re-announce");
                    }
                    if self.config.role == Role::Server {
                        // Anti-entropy: what the gossip missed (a mesh
                        // partition, a message lost in a burst) comes in
                        // by one view sync per refresh.
                        self.start_view_sync(None, None);
                    }
                }
                _ = housekeeping.tick() => self.housekeeping(),
            }
        }
        tracing::info!(peer_id = %self.local_peer, "swarm node stopped");
    }

    // ---- commands -------------------------------------------------------

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs { reply } => {
                if !self.listen_addrs.is_empty() || self.config.listen.is_empty() {
                    let _ = reply.send(self.listen_addrs.clone());
                } else {
                    self.listen_waiters.push(reply);
                }
            }
            Command::Announce { info, reply } => {
                let _ = reply.send(self.announce(*info));
            }
            Command::Withdraw { reply } => self.withdraw(reply),
            lookup @ (Command::GetProviders { .. } | Command::GetInfoRecords { .. }) => {
                if self.dht_joining() {
                    // Connected (or dialling) but identify has not filled
                    // the routing table yet: a lookup now would end at once
                    // with nothing. Run it when the first peer is in.
                    self.deferred_lookups
                        .push((Instant::now() + DEFER_LOOKUPS_MAX, lookup));
                } else {
                    self.start_lookup(lookup);
                }
            }
            Command::CachedInfos { model, reply } => {
                let _ = reply.send(self.cache.infos(model.as_deref(), now_ms()));
            }
            Command::SyncView {
                model,
                max_age,
                reply,
            } => {
                if self.last_sync.is_some_and(|t| t.elapsed() < max_age) {
                    let _ = reply.send(Some(0));
                } else {
                    self.start_view_sync(model, Some(reply));
                }
            }
            Command::RequestInfo { peer, reply } => {
                if peer == self.local_peer {
                    let _ = reply.send(Ok(self.info_response()));
                    return;
                }
                self.used(peer);
                let addrs = self.addrs_of(&peer);
                let id = self.swarm.behaviour_mut().info.send_request_with_addresses(
                    &peer,
                    InfoRequest::default(),
                    addrs,
                );
                self.pending_info.insert(id, reply);
            }
            Command::Rtt { peer, dial, reply } => {
                if peer == self.local_peer {
                    let _ = reply.send(Some(Duration::ZERO));
                } else if let Some(rtt) = self.rtt.get(&peer) {
                    let _ = reply.send(Some(*rtt));
                } else if !self.swarm.is_connected(&peer) && (!dial || !self.dial_peer(peer)) {
                    // Not to be dialled, or no address known: nothing to
                    // measure.
                    let _ = reply.send(None);
                } else {
                    self.rtt_waiters.entry(peer).or_default().push(reply);
                }
            }
            Command::LearnAddrs { peer, addrs, reply } => {
                let scope = self.scope();
                for a in addrs.into_iter().filter(|a| scope.allows(a)) {
                    self.remember_addr(peer, a);
                }
                let _ = reply.send(());
            }
            Command::Connect { peer, reply } => {
                if peer == self.local_peer {
                    let _ = reply.send(Err("that is this node".into()));
                } else if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                } else if !self.dial_peer(peer) {
                    let _ = reply.send(Err(format!("no known address of {peer}")));
                } else {
                    self.connect_waiters.entry(peer).or_default().push(reply);
                }
            }
            Command::NextHopTarget { reply } => {
                let _ = reply.send(self.next_hop_target());
            }
            Command::SetNextRtts {
                target,
                rtts,
                reply,
            } => {
                let _ = reply.send(());
                if self.next_hop_target().as_ref() != Some(&target) {
                    return; // measured for an announcement since replaced
                }
                let changed = peer_set(&rtts) != peer_set(&self.next_rtts);
                self.next_rtts = rtts;
                if changed {
                    // New next hops: tell askers now, not at the next
                    // refresh (the gossip only; provider records and the
                    // DHT's info record are fine).
                    if let Err(e) = self.publish_info(false) {
                        tracing::warn!(error = %e, "cannot re-sign the info");
                    }
                }
            }
            Command::Forget { peer, period } => {
                let b = self.swarm.behaviour_mut();
                b.blocked.block_peer(peer);
                b.kad.remove_peer(&peer);
                self.addr_book.remove(&peer);
                self.forgotten.insert(peer, Instant::now() + period);
                tracing::debug!(%peer, ?period, "peer forgotten");
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Punching { reply } => {
                let _ = reply.send(self.nat.punching.clone());
            }
            Command::Via { reply } => {
                let via = self
                    .conns
                    .iter()
                    .filter(|(_, c)| !c.is_empty())
                    .map(|(p, c)| {
                        let kind = if c.values().any(|relayed| !relayed) {
                            Via::Direct
                        } else {
                            Via::Relay
                        };
                        (*p, kind)
                    })
                    .collect();
                let _ = reply.send(via);
            }
            Command::Stats { reply } => {
                let mut stats = self.stats.clone();
                stats.connected_peers = self.swarm.connected_peers().count();
                stats.routing_table_peers = self.routing_table_size();
                stats.announcing = self.announcement.is_some();
                stats.bytes_sent = self.bytes_sent.get();
                stats.cached_infos = self.cache.serving(now_ms());
                let topic = gossipsub::IdentTopic::new(keys::INFOS_TOPIC).hash();
                stats.gossip_mesh = self
                    .swarm
                    .behaviour()
                    .gossip
                    .as_ref()
                    .map_or(0, |g| g.mesh_peers(&topic).count());
                (stats.stored_records, stats.stored_provider_keys) =
                    self.swarm.behaviour_mut().kad.store_mut().sizes();
                let _ = reply.send(stats);
            }
            Command::LocalRecord { key, reply } => {
                let value = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .get(&key)
                    .map(|r| r.value.clone());
                let _ = reply.send(value);
            }
            #[cfg(feature = "fault-injection")]
            Command::PutRaw { key, value, reply } => {
                let record = Record {
                    key,
                    value,
                    publisher: None,
                    expires: Some(Instant::now() + self.config.record_ttl),
                };
                let ok = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .put_record(record, Quorum::One)
                    .is_ok();
                let _ = reply.send(ok);
            }
            // Handled in `run` (it ends the loop); nothing to do here.
            Command::Shutdown { reply } => {
                let _ = reply.send(());
            }
        }
    }

    fn start_lookup(&mut self, lookup: Command) {
        match lookup {
            Command::GetProviders { key, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.pending_providers.insert(id, (HashSet::new(), reply));
            }
            Command::GetInfoRecords { peer, reply } => {
                let key = RecordKey::new(&keys::info_key(&peer));
                let id = self.swarm.behaviour_mut().kad.get_record(key);
                self.pending_records.insert(id, (Vec::new(), reply));
            }
            other => self.on_command(other),
        }
    }

    /// Whether the DHT is about to become usable: the routing table is
    /// empty, but a connection is open or a bootstrap dial is in flight.
    fn dht_joining(&mut self) -> bool {
        self.routing_table_size() == 0
            && (self.swarm.connected_peers().next().is_some() || !self.bootstrap.round.is_empty())
    }

    fn run_deferred_lookups(&mut self, all: bool) {
        if self.deferred_lookups.is_empty() {
            return;
        }
        let now = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred_lookups)
            .into_iter()
            .partition(|(deadline, _)| all || now >= *deadline);
        self.deferred_lookups = keep;
        for (_, lookup) in due {
            self.start_lookup(lookup);
        }
    }

    fn announce(&mut self, mut info: ServerInfo) -> Result<(), AnnounceError> {
        if self.config.role == Role::Client {
            return Err(AnnounceError::NotServer);
        }
        info.protocol_version = PROTOCOL_VERSION;
        info.validate()?;
        let new_keys = announcement_keys(&info);
        // Same keys (a capacity change, say): only the info record is new;
        // the provider records stand (re-providing every block on each
        // session opened or closed would flood the DHT).
        let same_keys = self
            .announcement
            .as_ref()
            .is_some_and(|old| old.keys == new_keys);
        if same_keys {
            if let Some(ann) = self.announcement.as_mut() {
                ann.info = info;
            }
            return Ok(self.publish_info(true)?);
        }
        if let Some(old) = self.announcement.take() {
            for key in old.keys.iter().filter(|k| !new_keys.contains(k)) {
                self.swarm.behaviour_mut().kad.stop_providing(key);
            }
        }
        tracing::info!(
            model = %info.model_id,
            range = ?info.range(),
            keys = new_keys.len(),
            "announcing"
        );
        let old_target = self.next_hop_target();
        self.announcement = Some(Announcement {
            info,
            keys: new_keys,
        });
        let new_target = self.next_hop_target();
        if new_target != old_target {
            self.next_rtts.clear();
            if new_target.is_some() {
                self.next_hop_trigger.notify_one();
            }
        }
        if let Err(e) = self.publish() {
            self.announcement = None;
            self.current_signed = None;
            return Err(e.into());
        }
        Ok(())
    }

    /// Signs a fresh info (new `issued_at` / `expires_at`), (re)starts
    /// providing every key and puts the info record.
    fn publish(&mut self) -> Result<(), RecordError> {
        let Some(ann) = self.announcement.as_ref() else {
            return Ok(());
        };
        let signed = self.sign_fresh(&ann.info, ServerState::Online)?;
        let keys = ann.keys.clone();
        let kad = &mut self.swarm.behaviour_mut().kad;
        for key in keys {
            if let Err(e) = kad.start_providing(key) {
                tracing::warn!(error = ?e, "cannot store a local provider record");
            }
        }
        self.put_info_record(signed.clone());
        self.gossip_info(&signed);
        self.current_signed = Some(signed);
        self.published_alone = self.routing_table_size() == 0;
        tracing::debug!(alone = self.published_alone, "announcement published");
        Ok(())
    }

    /// Re-signs the info (fresh timestamps, current `next_rtts`) and
    /// gossips it, without re-providing the keys; with `put`, puts it in
    /// the DHT too. The DHT record is the fallback of an info request the
    /// peer does not answer ([`crate::Client::info`]); views come from the
    /// gossip and view syncs. So what only the gossip needs (measured next
    /// hops, an info gossiped late) is not put: the record is put again at
    /// each refresh anyway, and each put is a DHT walk that dials the ~20
    /// peers closest to the key (at 100 nodes the puts of changed next
    /// hops doubled the walks a node made, and most of the walks' dials
    /// were reconnections to peers trimmed since: docs/scale.md).
    fn publish_info(&mut self, put: bool) -> Result<(), RecordError> {
        let Some(ann) = self.announcement.as_ref() else {
            return Ok(());
        };
        let signed = self.sign_fresh(&ann.info, ServerState::Online)?;
        if put {
            self.put_info_record(signed.clone());
        }
        self.gossip_info(&signed);
        self.current_signed = Some(signed);
        Ok(())
    }

    /// The block after the announced range, if there is one.
    fn next_hop_target(&self) -> Option<NextHopTarget> {
        let info = &self.announcement.as_ref()?.info;
        (info.end < info.n_layers_total).then(|| NextHopTarget {
            model_id: info.model_id.clone(),
            end: info.end,
        })
    }

    fn sign_fresh(&self, info: &ServerInfo, state: ServerState) -> Result<Vec<u8>, RecordError> {
        let mut info = info.clone();
        let now = now_ms();
        info.state = if info.state == ServerState::Joining && state == ServerState::Online {
            ServerState::Joining
        } else {
            state
        };
        info.issued_at_ms = now;
        info.expires_at_ms = now.saturating_add(self.config.record_ttl.as_millis() as u64);
        if info.listen_addrs.is_empty() {
            info.listen_addrs = self.advertised_addrs();
        }
        if info.next_rtts.is_empty() && state != ServerState::Offline {
            info.next_rtts = self.next_rtts.clone();
        }
        Ok(sign(&self.signing_key, &info)?.to_bytes())
    }

    fn put_info_record(&mut self, value: Vec<u8>) -> Option<QueryId> {
        let record = Record {
            key: RecordKey::new(&keys::info_key(&self.local_peer)),
            value,
            publisher: None,
            expires: Some(Instant::now() + self.config.record_ttl),
        };
        match self
            .swarm
            .behaviour_mut()
            .kad
            .put_record(record, Quorum::One)
        {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(error = ?e, "cannot store the info record locally");
                None
            }
        }
    }

    /// Publishes one of our signed infos (or tombstones) on the gossip
    /// topic, and keeps it in our own cache (our views list us too).
    fn gossip_info(&mut self, signed: &[u8]) {
        match verify(signed, Some(&self.local_peer), now_ms()) {
            Ok(v) => {
                self.cache.insert(self.local_peer, v.info, signed.to_vec());
            }
            Err(e) => tracing::warn!(error = %e, "our own info does not verify"),
        }
        let topic = gossipsub::IdentTopic::new(keys::INFOS_TOPIC);
        let Some(gossip) = self.swarm.behaviour_mut().gossip.as_mut() else {
            return;
        };
        match gossip.publish(topic, signed.to_vec()) {
            Ok(_) => self.gossip_unsent = false,
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                // Announced before any peer's subscription arrived (a node
                // that just joined): published again on the first one.
                tracing::debug!("no gossip peer yet: publishing again on the first subscription");
                self.gossip_unsent = true;
            }
            Err(e) => tracing::debug!(error = %e, "cannot publish the info on the gossip topic"),
        }
    }

    /// Keeps a verified info in the cache; on news, learns the addresses
    /// it announces (later dials by peer id use them). Whether it was news.
    fn cache_info(&mut self, peer: PeerId, info: ServerInfo, signed: Vec<u8>) -> bool {
        if peer == self.local_peer {
            // What others hold of us is at best our previous life's info
            // (a restart under the same identity): only our own
            // announcements describe us (`gossip_info`).
            return false;
        }
        let addrs: Vec<Multiaddr> = info
            .listen_addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        match self.cache.insert(peer, info, signed) {
            Inserted::New | Inserted::Newer => {
                let scope = self.scope();
                for a in addrs.into_iter().filter(|a| scope.allows(a)) {
                    self.remember_addr(peer, a);
                }
                true
            }
            Inserted::Stale => false,
        }
    }

    /// Starts a view sync: a view request to up to [`VIEW_SYNC_FANOUT`]
    /// connected peers (those whose identify lists the view protocol, else
    /// any), each carrying the digest of our cache.
    fn start_view_sync(
        &mut self,
        model: Option<String>,
        reply: Option<oneshot::Sender<Option<usize>>>,
    ) {
        let mut peers: Vec<PeerId> = self
            .view_peers
            .iter()
            .filter(|p| self.swarm.is_connected(p))
            .copied()
            .collect();
        if peers.is_empty() {
            peers = self.swarm.connected_peers().copied().collect();
        }
        if peers.is_empty() {
            // Every connection closed for idleness: the DHT servers this
            // node knows (the request dials them).
            for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
                peers.extend(bucket.iter().map(|e| *e.node.key.preimage()));
            }
        }
        // A different pick each time (no RNG needed: the peer tags are
        // hashes, mixed with a counter).
        let mix = self.next_sync.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        peers.sort_by_key(|p| nakshatra_protocol::rpc::digest_peer(p) ^ mix);
        peers.truncate(VIEW_SYNC_FANOUT);
        if peers.is_empty() {
            if let Some(r) = reply {
                let _ = r.send(None);
            }
            return;
        }
        let id = self.next_sync;
        self.next_sync += 1;
        self.syncs.insert(
            id,
            ViewSync {
                waiting: peers.len(),
                new: 0,
                reply,
            },
        );
        for p in peers {
            self.send_view_request(p, model.clone(), id, 1);
        }
    }

    fn send_view_request(&mut self, peer: PeerId, model: Option<String>, sync: u64, round: u32) {
        self.used(peer);
        let known = self.cache.digest(model.as_deref());
        let id = self.swarm.behaviour_mut().view.send_request(
            &peer,
            ViewRequest {
                version: PROTOCOL_VERSION,
                model: model.clone(),
                known,
            },
        );
        self.stats.view_requests_out += 1;
        tracing::debug!(%peer, round, "view request");
        self.pending_view.insert(id, (peer, model, sync, round));
    }

    /// One peer of sync `sync` is done, with `new` infos.
    fn view_sync_part_done(&mut self, sync: u64, new: usize) {
        let Some(s) = self.syncs.get_mut(&sync) else {
            return;
        };
        s.new += new;
        s.waiting = s.waiting.saturating_sub(1);
        if s.waiting == 0 {
            if let Some(s) = self.syncs.remove(&sync) {
                if let Some(r) = s.reply {
                    let _ = r.send(Some(s.new));
                }
            }
        }
    }

    fn on_view(&mut self, event: request_response::Event<ViewRequest, ViewResponse>) {
        self.used(rr_peer(&event));
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                self.stats.view_requests_in += 1;
                // Room for bincode's length prefixes and the flag.
                let budget = MAX_VIEW_RESPONSE_BYTES - 1024;
                let (infos, more) = self.cache.missing(
                    &request.known,
                    request.model.as_deref(),
                    now_ms(),
                    MAX_VIEW_INFOS,
                    budget,
                );
                if self
                    .swarm
                    .behaviour_mut()
                    .view
                    .send_response(channel, ViewResponse { infos, more })
                    .is_err()
                {
                    tracing::debug!(%peer, "view request gone before the answer");
                }
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((peer, model, sync, round)) = self.pending_view.remove(&request_id) else {
                    return;
                };
                let now = now_ms();
                let mut new = 0;
                let mut bad = 0;
                for bytes in response.infos {
                    match verify(&bytes, None, now) {
                        Ok(v) => {
                            if self.cache_info(v.peer_id, v.info, bytes) {
                                new += 1;
                            }
                        }
                        Err(_) => bad += 1,
                    }
                }
                if bad > 0 {
                    tracing::debug!(%peer, bad, "view answer held infos that do not verify");
                }
                tracing::debug!(%peer, new, more = response.more, "view answer");
                self.last_sync = Some(Instant::now());
                if response.more && round < VIEW_SYNC_MAX_ROUNDS && new > 0 {
                    if let Some(s) = self.syncs.get_mut(&sync) {
                        s.new += new;
                    }
                    self.send_view_request(peer, model, sync, round + 1);
                } else {
                    self.view_sync_part_done(sync, new);
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, _, sync, _)) = self.pending_view.remove(&request_id) {
                    tracing::debug!(%peer, %error, "view request failed");
                    self.view_sync_part_done(sync, 0);
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound view request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        if let gossipsub::Event::SlowPeer {
            peer_id,
            failed_messages,
        } = &event
        {
            let n = failed_messages.priority + failed_messages.non_priority;
            self.stats.gossip_dropped += n as u64;
            self.stats.gossip_dropped_control += failed_messages.priority as u64;
            tracing::debug!(peer = %peer_id, dropped = n, "gossip messages to a slow peer dropped");
            return;
        }
        if let gossipsub::Event::Subscribed { topic, .. } = &event {
            if self.gossip_unsent
                && *topic == gossipsub::IdentTopic::new(keys::INFOS_TOPIC).hash()
                && self.announcement.is_some()
            {
                if let Err(e) = self.publish_info(false) {
                    tracing::warn!(error = %e, "cannot re-sign the info");
                }
            }
            return;
        }
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        self.stats.gossip_received += 1;
        let acceptance = match verify(&message.data, None, now_ms()) {
            Ok(v) => {
                if self.cache_info(v.peer_id, v.info, message.data) {
                    gossipsub::MessageAcceptance::Accept
                } else {
                    // Old news (a replay, or a duplicate under another
                    // id): not forwarded, nobody penalised.
                    gossipsub::MessageAcceptance::Ignore
                }
            }
            Err(e) => {
                self.stats.gossip_rejected += 1;
                tracing::debug!(peer = %propagation_source, error = %e, "gossip message is no valid info");
                gossipsub::MessageAcceptance::Reject
            }
        };
        if let Some(gossip) = self.swarm.behaviour_mut().gossip.as_mut() {
            let _ = gossip.report_message_validation_result(
                &message_id,
                &propagation_source,
                acceptance,
            );
        }
    }

    fn withdraw(&mut self, reply: oneshot::Sender<()>) {
        let Some(ann) = self.announcement.take() else {
            let _ = reply.send(());
            return;
        };
        for key in &ann.keys {
            self.swarm.behaviour_mut().kad.stop_providing(key);
        }
        self.current_signed = None;
        tracing::info!(model = %ann.info.model_id, "withdrawing the announcement");
        // Tombstone: a freshly signed `Offline` info replaces the stored
        // one, so askers drop this node at once although its provider
        // records live on elsewhere until they expire.
        match self.sign_fresh(&ann.info, ServerState::Offline) {
            Ok(tombstone) => {
                self.gossip_info(&tombstone);
                match self.put_info_record(tombstone) {
                    Some(id) => {
                        self.pending_withdraw.insert(id, reply);
                    }
                    None => {
                        let _ = reply.send(());
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot sign the withdrawal");
                let _ = reply.send(());
            }
        }
    }

    fn info_response(&self) -> InfoResponse {
        match &self.current_signed {
            Some(bytes) => InfoResponse::Serving(bytes.clone()),
            None => InfoResponse::NotServing,
        }
    }

    /// The addresses this node's info announces: external ones, then
    /// listen addresses, QUIC first within each (peers that dial them in
    /// order try QUIC first), at most [`MAX_ADVERTISED_ADDRS`].
    fn advertised_addrs(&self) -> Vec<String> {
        let mut external: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        prefer_quic(&mut external);
        let mut listen = self.listen_addrs.clone();
        prefer_quic(&mut listen);
        let mut out: Vec<String> = Vec::new();
        for a in external.iter().chain(listen.iter()) {
            let s = a.to_string();
            if !out.contains(&s) && s.len() <= 256 {
                out.push(s);
            }
        }
        out.truncate(MAX_ADVERTISED_ADDRS);
        out
    }

    // ---- bootstrap and housekeeping ------------------------------------

    fn dial_bootstraps(&mut self) {
        if self.config.bootstrap.is_empty() {
            return;
        }
        self.bootstrap.round.clear();
        self.bootstrap.round_ok = false;
        self.bootstrap.next_retry = None;
        self.bootstrap.attempts += 1;
        for addr in self.config.bootstrap.clone() {
            let peer = match addr.iter().last() {
                Some(Protocol::P2p(p)) => Some(p),
                _ => None,
            };
            if let Some(p) = peer {
                if p == self.local_peer {
                    tracing::debug!(%addr, "bootstrap address is this node; skipping");
                    continue;
                }
                if self.swarm.is_connected(&p) {
                    self.bootstrap.round_ok = true;
                    continue;
                }
            }
            let opts = match peer {
                Some(p) => DialOpts::peer_id(p)
                    .addresses(vec![addr.clone()])
                    .allocate_new_port()
                    .build(),
                None => DialOpts::unknown_peer_id()
                    .address(addr.clone())
                    .allocate_new_port()
                    .build(),
            };
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    self.bootstrap.round.insert(id);
                }
                Err(e) => tracing::debug!(%addr, error = %e, "cannot dial bootstrap peer"),
            }
        }
        if self.bootstrap.round_ok {
            self.on_bootstrap_joined();
        } else if self.bootstrap.round.is_empty() {
            self.schedule_bootstrap_retry();
        }
    }

    fn on_bootstrap_joined(&mut self) {
        if !self.bootstrap.joined {
            tracing::info!(
                attempts = self.bootstrap.attempts,
                "joined the swarm through a bootstrap peer"
            );
        }
        self.bootstrap.joined = true;
        self.bootstrap.round_ok = true;
        self.bootstrap.backoff = self.config.bootstrap_backoff_initial;
        self.bootstrap.next_retry = None;
        self.bootstrap.attempts = 0;
    }

    fn schedule_bootstrap_retry(&mut self) {
        let delay = self.bootstrap.backoff;
        let addrs: Vec<String> = self
            .config
            .bootstrap
            .iter()
            .map(|a| a.to_string())
            .collect();
        tracing::warn!(
            attempt = self.bootstrap.attempts,
            retry_in = ?delay,
            bootstrap = ?addrs,
            "no bootstrap peer reachable; retrying"
        );
        self.bootstrap.next_retry = Some(Instant::now() + delay);
        self.bootstrap.backoff = (delay * 2).min(self.config.bootstrap_backoff_max);
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        let due: Vec<ConnectionId> = self
            .nat
            .closing
            .iter()
            .filter(|(_, (_, at))| now >= *at)
            .map(|(c, _)| *c)
            .collect();
        for c in due {
            if self.open_streams.on_connection(&c) {
                // A stream of ours (a chain's activations, a fetch) still
                // runs on it: closing would break it. Look again later;
                // new streams go to the direct connection meanwhile.
                if let Some((peer, at)) = self.nat.closing.get_mut(&c) {
                    tracing::debug!(%peer, "relayed connection still carries a stream: not closing it yet");
                    *at = now + RELAY_CLOSE_GRACE;
                    // Reached directly, and new streams open there: done
                    // punching, though the relayed connection lingers.
                    self.nat.punching.remove(peer);
                }
                continue;
            }
            self.nat.closing.remove(&c);
            self.swarm.close_connection(c);
        }
        match self.bootstrap.next_retry {
            Some(t) if now >= t => self.dial_bootstraps(),
            None if self.bootstrap.joined
                && self.bootstrap.round.is_empty()
                && self.swarm.connected_peers().next().is_none() =>
            {
                tracing::debug!("no connection left; dialling the bootstrap peers again");
                self.bootstrap.joined = false;
                self.dial_bootstraps();
            }
            _ => {}
        }
        let joining = self.dht_joining();
        self.run_deferred_lookups(!joining);
        let due: Vec<PeerId> = self
            .mdns_retries
            .iter_mut()
            .filter_map(|(peer, (_, next))| match next {
                Some(t) if now >= *t => {
                    *next = None;
                    Some(*peer)
                }
                _ => None,
            })
            .collect();
        for peer in due {
            if !self.swarm.is_connected(&peer) {
                self.dial_peer(peer);
            }
        }
        if !self.nat.retry_at.is_empty() && self.nat.retry_at.values().any(|t| now >= *t) {
            self.reserve_relays();
        }
        if !self.nat.unreachable
            && self.config.role == Role::Server
            && self
                .nat
                .joined_at
                .is_some_and(|t| now >= t + RELAY_FALLBACK_AFTER)
            && !self.publicly_reachable()
        {
            tracing::info!(
                after = ?RELAY_FALLBACK_AFTER,
                "no public address confirmed; taking this node to be behind NAT"
            );
            self.nat.unreachable = true;
            self.reserve_relays();
        }
        self.swarm.behaviour_mut().kad.store_mut().sweep(now);
        self.cache.sweep(now_ms());
        self.trim_connections(now);
        if now >= self.mesh_topup.0 + MESH_TOPUP_PERIOD {
            self.mesh_topup.0 = now;
            self.mesh_topup.1 += 1;
            self.top_up_gossip_peers();
        }
        let back: Vec<PeerId> = self
            .forgotten
            .iter()
            .filter(|(_, until)| now >= **until)
            .map(|(p, _)| *p)
            .collect();
        for peer in back {
            self.forgotten.remove(&peer);
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
        }
        self.rtt_waiters.retain(|_, ws| {
            ws.retain(|w| !w.is_closed());
            !ws.is_empty()
        });
        self.connect_waiters.retain(|_, ws| {
            ws.retain(|w| !w.is_closed());
            !ws.is_empty()
        });
        if !self.listen_addrs.is_empty() {
            for w in self.listen_waiters.drain(..) {
                let _ = w.send(self.listen_addrs.clone());
            }
        }
    }

    /// Counts what this node relays for each peer (a reservation, or a
    /// circuit as either end), to protect those connections from
    /// trimming.
    fn on_relay_served(&mut self, e: relay::Event) {
        let mut add = |p: PeerId| *self.relaying_for.entry(p).or_default() += 1;
        match e {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed: false,
            } => add(src_peer_id),
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                add(src_peer_id);
                add(dst_peer_id);
            }
            relay::Event::ReservationClosed { src_peer_id }
            | relay::Event::ReservationTimedOut { src_peer_id } => {
                self.relayed_less(src_peer_id);
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                ..
            } => {
                self.relayed_less(src_peer_id);
                self.relayed_less(dst_peer_id);
            }
            _ => {}
        }
    }

    fn relayed_less(&mut self, peer: PeerId) {
        if let Some(n) = self.relaying_for.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.relaying_for.remove(&peer);
            }
        }
    }

    /// Marks a connected peer used now (see [`Self::last_used`]).
    fn used(&mut self, peer: PeerId) {
        if let Some(t) = self.last_used.get_mut(&peer) {
            *t = Instant::now();
        }
    }

    /// The connection manager ([`crate::config::Watermarks`]): past `high`
    /// connected peers, closes the least recently used unprotected ones
    /// until `low` remain (fewer if too many are protected).
    fn trim_connections(&mut self, now: Instant) {
        let marks = self.config.connections;
        let connected = self.conns.len();
        if connected <= marks.high {
            return;
        }
        let mesh: HashSet<PeerId> = self
            .swarm
            .behaviour()
            .gossip
            .as_ref()
            .map(|g| g.all_mesh_peers().copied().collect())
            .unwrap_or_default();
        let mut victims: Vec<(Instant, PeerId)> = self
            .last_used
            .iter()
            .filter(|(p, at)| {
                now.saturating_duration_since(**at) >= marks.grace
                    && !mesh.contains(p)
                    && !self.protected(p)
            })
            .map(|(p, at)| (*at, *p))
            .collect();
        if victims.is_empty() {
            return; // every connection protected or in its grace
        }
        victims.sort_unstable();
        let excess = connected - marks.low;
        tracing::debug!(
            connected,
            closing = victims.len().min(excess),
            high = marks.high,
            low = marks.low,
            "over the connection high watermark; closing the least recently used unprotected connections"
        );
        for (_, peer) in victims.into_iter().take(excess) {
            if self.swarm.disconnect_peer_id(peer).is_ok() {
                self.stats.connections_trimmed += 1;
                if self.trimmed.len() >= TRIMMED_REMEMBERED {
                    let oldest = self
                        .trimmed
                        .iter()
                        .min_by_key(|(_, at)| **at)
                        .map(|(p, _)| *p);
                    if let Some(p) = oldest {
                        self.trimmed.remove(&p);
                    }
                }
                self.trimmed.insert(peer, now);
            }
        }
    }

    /// Whether trimming must keep the connection to `peer` (see
    /// [`crate::config::Watermarks`]; gossip mesh peers aside).
    fn protected(&self, peer: &PeerId) -> bool {
        self.open_streams.any(peer)
            || self.relaying_for.contains_key(peer)
            || self.nat.listeners.contains_key(peer)
            || self.nat.reserving.contains(peer)
            || self.nat.punching.contains(peer)
            || self.rtt_waiters.contains_key(peer)
            || self.connect_waiters.contains_key(peer)
            || self.conns.get(peer).is_some_and(|c| c.values().any(|r| *r))
    }

    /// A serving node connected to fewer than [`GOSSIP_PEERS_WANTED`]
    /// peers on the info topic dials up to [`MESH_TOPUP_DIALS`] serving
    /// peers from its cache (verified infos; their announced addresses are
    /// in the address book), a different few each time. Gossipsub grafts
    /// them into the mesh once they are connected.
    fn top_up_gossip_peers(&mut self) {
        let Some(gossip) = self.swarm.behaviour().gossip.as_ref() else {
            return;
        };
        let topic = gossipsub::IdentTopic::new(keys::INFOS_TOPIC).hash();
        let on_topic = gossip
            .all_peers()
            .filter(|(_, topics)| topics.contains(&&topic))
            .count();
        if on_topic >= GOSSIP_PEERS_WANTED {
            return;
        }
        let round = self.mesh_topup.1.to_le_bytes();
        let mut candidates: Vec<([u8; 32], PeerId)> = self
            .cache
            .infos(None, now_ms())
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| {
                *p != self.local_peer
                    && !self.swarm.is_connected(p)
                    && !self.forgotten.contains_key(p)
            })
            .map(|p| {
                let mut h = blake3::Hasher::new();
                h.update(&p.to_bytes());
                h.update(&round);
                (*h.finalize().as_bytes(), p)
            })
            .collect();
        candidates.sort_unstable();
        let want = (GOSSIP_PEERS_WANTED - on_topic).min(MESH_TOPUP_DIALS);
        for (_, peer) in candidates.into_iter().take(want) {
            tracing::debug!(%peer, on_topic, "dialling a server to feed the gossip mesh");
            self.dial_peer(peer);
        }
    }

    /// Dials `peer` at every address we know (ours and the behaviours').
    /// Always from a fresh port: two listening nodes dialling each other at
    /// once from their listen ports would make one TCP simultaneous open,
    /// whose noise handshake fails on both sides.
    /// Returns `false` when no address of `peer` is known at all.
    fn dial_peer(&mut self, peer: PeerId) -> bool {
        let addrs = self.addrs_of(&peer);
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .extend_addresses_through_behaviour()
            .allocate_new_port()
            .build();
        match self.swarm.dial(opts) {
            Ok(()) => true,
            Err(DialError::NoAddresses) => {
                tracing::debug!(%peer, "no known address to dial");
                false
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "not dialling peer");
                true
            }
        }
    }

    /// The addresses of `peer` in this node's address book, QUIC first
    /// (see [`crate::prefer_quic`]). The book itself keeps them in the
    /// order learnt, so that the oldest is the one forgotten.
    fn addrs_of(&self, peer: &PeerId) -> Vec<Multiaddr> {
        let mut addrs = self.addr_book.get(peer).cloned().unwrap_or_default();
        prefer_quic(&mut addrs);
        addrs
    }

    /// The networks this node may dial into (see [`Scope`]); mDNS on
    /// means this node is on a LAN.
    fn scope(&self) -> Scope {
        let mut scope = Scope::of(&self.listen_addrs, &self.config.bootstrap);
        scope.private |= self.config.mdns;
        scope
    }

    fn remember_addr(&mut self, peer: PeerId, addr: Multiaddr) {
        if peer == self.local_peer {
            return;
        }
        // Store addresses without a trailing /p2p.
        let addr = match addr.iter().last() {
            Some(Protocol::P2p(_)) => {
                let mut a = addr;
                a.pop();
                a
            }
            _ => addr,
        };
        if !self.addr_book.contains_key(&peer) && self.addr_book.len() >= MAX_ADDR_BOOK {
            // Crude bound: forget somebody (addresses come back through
            // identify, mDNS, the DHT).
            if let Some(victim) = self.addr_book.keys().next().copied() {
                self.addr_book.remove(&victim);
            }
        }
        let entry = self.addr_book.entry(peer).or_default();
        if !entry.contains(&addr) {
            if entry.len() >= MAX_ADDRS_PER_PEER {
                entry.remove(0);
            }
            entry.push(addr.clone());
            // Into the swarm's address book too, so that dials by peer id
            // alone (`stream::Control::open_stream`) find it.
            self.swarm.add_peer_address(peer, addr);
        }
    }

    // ---- reachability ---------------------------------------------------

    /// Whether this node has a confirmed external address that does not
    /// go through a relay.
    fn publicly_reachable(&self) -> bool {
        self.swarm.external_addresses().any(|a| !is_relayed(a))
    }

    /// A confirmed external address came or went: offer the relay service
    /// only while a non-relayed one is confirmed, and drop reservations
    /// once this node is reachable itself.
    fn on_external_addrs_changed(&mut self) {
        let public = self.publicly_reachable();
        if let Some(relay) = self.swarm.behaviour_mut().relay.as_mut() {
            relay.set_status(Some(if public {
                relay::Status::Enable
            } else {
                relay::Status::Disable
            }));
            tracing::info!(offered = public, "relay service");
        }
        if public {
            let relays: Vec<PeerId> = self.nat.listeners.keys().copied().collect();
            for relay in relays {
                if self.nat.reserving.contains(&relay) {
                    // Removed once answered (see `Nat::reserving`).
                    self.nat.drop_when_answered.insert(relay);
                    continue;
                }
                if let Some(listener) = self.nat.listeners.remove(&relay) {
                    tracing::info!(%relay, "publicly reachable: dropping the relay reservation");
                    self.swarm.remove_listener(listener);
                }
            }
        } else {
            self.reserve_relays();
        }
    }

    /// A serving node without a confirmed public address reserves a slot
    /// on up to [`MAX_RELAY_RESERVATIONS`] relays and listens on
    /// `<relay>/p2p/<relay id>/p2p-circuit`: first the `--relay` ones,
    /// then, once it takes itself to be behind NAT (`Nat::unreachable`),
    /// bootstrap peers that offer the relay protocol. Only relays this node dialled
    /// directly and whose identify has been received qualify.
    fn reserve_relays(&mut self) {
        if self.config.role != Role::Server || self.publicly_reachable() {
            return;
        }
        let now = Instant::now();
        self.nat.retry_at.retain(|_, t| *t > now);
        let mut candidates: Vec<PeerId> = self
            .nat
            .offering
            .iter()
            .filter(|p| {
                self.nat.configured.contains(p)
                    || (self.nat.unreachable && self.nat.bootstrap_peers.contains(p))
            })
            .filter(|p| !self.nat.listeners.contains_key(p) && !self.nat.retry_at.contains_key(p))
            .copied()
            .collect();
        // `--relay` ones first, then a stable order.
        candidates.sort_by_key(|p| (!self.nat.configured.contains(p), *p));
        for relay in candidates {
            if self.nat.listeners.len() >= MAX_RELAY_RESERVATIONS {
                break;
            }
            let Some(addr) = self.nat.dialled_at.get(&relay).cloned() else {
                continue;
            };
            let mut circuit = addr;
            if !matches!(circuit.iter().last(), Some(Protocol::P2p(_))) {
                circuit.push(Protocol::P2p(relay));
            }
            circuit.push(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::info!(%circuit, "reserving a slot on a relay");
                    self.nat.listeners.insert(relay, id);
                    self.nat.reserving.insert(relay);
                }
                Err(e) => {
                    tracing::warn!(%circuit, error = %e, "cannot listen through relay");
                    self.nat.retry_at.insert(relay, now + RELAY_RETRY_DELAY);
                }
            }
        }
    }

    /// Records a new connection. A direct connection to a peer closes the
    /// relayed ones to it (after `RELAY_CLOSE_GRACE`): a relayed one is
    /// slower and capped by the relay's limits, and new streams already
    /// prefer the direct one (see [`crate::stream`]).
    fn on_connection(&mut self, peer: PeerId, id: ConnectionId, relayed: bool) {
        self.last_used.insert(peer, Instant::now());
        if self.trimmed.remove(&peer).is_some() {
            self.stats.reconnections += 1;
        }
        let conns = self.conns.entry(peer).or_default();
        conns.insert(id, relayed);
        let has_direct = conns.values().any(|r| !r);
        if !has_direct {
            // DCUtR starts on every relayed connection.
            self.nat.punching.insert(peer);
            return;
        }
        let doomed: Vec<ConnectionId> =
            conns.iter().filter(|(_, r)| **r).map(|(c, _)| *c).collect();
        if doomed.is_empty() {
            self.nat.punching.remove(&peer);
            return;
        }
        let at = Instant::now() + RELAY_CLOSE_GRACE;
        for c in doomed {
            tracing::debug!(%peer, grace = ?RELAY_CLOSE_GRACE, "direct connection up: closing the relayed one");
            self.nat.closing.entry(c).or_insert((peer, at));
        }
    }

    /// A peer reached only through a relay may listen where this node can
    /// dial it directly (the same LAN, a public address the relayed dial
    /// did not win the race with): dial those of `addrs` (its listen
    /// addresses in scope) that are not circuits. DCUtR tries only the
    /// addresses observed from outside, which a LAN neighbour behind the
    /// same router cannot reach. A direct connection closes the relayed
    /// one ([`Self::on_connection`]).
    fn try_direct(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let relayed_only = self
            .conns
            .get(&peer)
            .is_some_and(|c| !c.is_empty() && c.values().all(|relayed| *relayed));
        let direct: Vec<Multiaddr> = addrs.into_iter().filter(|a| !is_relayed(a)).collect();
        if !relayed_only || direct.is_empty() {
            return;
        }
        tracing::debug!(%peer, addrs = ?direct, "reached through a relay: dialling it directly");
        // From a fresh port: DCUtR's punch dials from the listen port, and
        // when the peer's punch dials ours from its listen port at the
        // same moment, the two SYNs become one TCP connection (simultaneous
        // open) on which both sides start noise as the initiator and fail;
        // the failure then holds off every dial to the peer for
        // `DIAL_BACKOFF`.
        let opts = DialOpts::peer_id(peer)
            .addresses(direct)
            .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
            .allocate_new_port()
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "no direct dial");
        }
    }

    fn routing_table_size(&mut self) -> usize {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum()
    }

    // ---- swarm events ---------------------------------------------------

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let speaks_kad = info.protocols.contains(&KAD_PROTOCOL);
                if info.protocols.iter().any(|p| p.as_ref() == VIEW_PROTOCOL) {
                    self.view_peers.insert(peer_id);
                    if self.last_sync.is_none()
                        && self.config.role == Role::Server
                        && self.syncs.is_empty()
                    {
                        // A server that just joined: its cache now, not at
                        // its first refresh.
                        self.start_view_sync(None, None);
                    }
                } else {
                    self.view_peers.remove(&peer_id);
                }
                if !speaks_kad {
                    // A client (an asker) is no DHT server. Kademlia adds
                    // any peer that opened a DHT stream on a connection
                    // this node dialled, which a hole punch is from both
                    // sides: such an entry would send other nodes' lookups
                    // to an asker gone behind its NAT (a dial timeout each).
                    self.swarm.behaviour_mut().kad.remove_peer(&peer_id);
                }
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
                    self.nat.offering.insert(peer_id);
                } else {
                    self.nat.offering.remove(&peer_id);
                }
                let scope = self.scope();
                // A peer's claims about where it listens: only addresses on
                // networks this node is on (see `scope`), QUIC first.
                let mut addrs = info.listen_addrs;
                prefer_quic(&mut addrs);
                addrs.retain(|a| scope.allows(a));
                for addr in &addrs {
                    self.remember_addr(peer_id, addr.clone());
                    if speaks_kad {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                }
                self.try_direct(peer_id, addrs);
                // Identify has run on the relay's connection: a reservation
                // may now be made on it (rust-libp2p's dcutr example waits
                // for the same).
                self.reserve_relays();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::v2::client::Event {
                tested_addr,
                server,
                result,
                ..
            })) => match result {
                Ok(()) => tracing::info!(addr = %tested_addr, %server, "AutoNAT: reachable"),
                // One failed candidate is no verdict: another may be
                // confirmed in the next probes. The node takes itself to be
                // behind NAT only when nothing was confirmed
                // `RELAY_FALLBACK_AFTER` after joining (`housekeeping`).
                Err(e) => {
                    tracing::info!(addr = %tested_addr, %server, error = %e, "AutoNAT: not reachable")
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => match e {
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. } => {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                    self.nat.reserving.remove(&relay_peer_id);
                    if self.nat.drop_when_answered.remove(&relay_peer_id)
                        && self.publicly_reachable()
                    {
                        if let Some(listener) = self.nat.listeners.remove(&relay_peer_id) {
                            tracing::info!(relay = %relay_peer_id, "publicly reachable: dropping the relay reservation");
                            self.swarm.remove_listener(listener);
                        }
                    }
                }
                other => tracing::debug!(event = ?other, "relay client"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => {
                tracing::debug!(event = ?e, "relay server");
                self.on_relay_served(e);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => {
                // A success leaves the peer punching until the relayed
                // connection's grace is over (`on_connection`).
                if result.is_err() {
                    self.nat.punching.remove(&remote_peer_id);
                }
                match result {
                    Ok(_) => {
                        tracing::info!(peer = %remote_peer_id, "hole punch: direct connection")
                    }
                    Err(e) => {
                        tracing::info!(peer = %remote_peer_id, error = %e, "hole punch failed; staying relayed")
                    }
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
                self.on_external_addrs_changed();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(%address, "external address expired");
                self.on_external_addrs_changed();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                let lost: Vec<PeerId> = self
                    .nat
                    .listeners
                    .iter()
                    .filter(|(_, l)| **l == listener_id)
                    .map(|(p, _)| *p)
                    .collect();
                for relay in lost {
                    tracing::info!(%relay, ?reason, "relay reservation lost; will reserve again");
                    self.nat.listeners.remove(&relay);
                    self.nat.reserving.remove(&relay);
                    self.nat.drop_when_answered.remove(&relay);
                    self.nat
                        .retry_at
                        .insert(relay, Instant::now() + RELAY_RETRY_DELAY);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                self.nat.closing.remove(&connection_id);
                if let Some(c) = self.conns.get_mut(&peer_id) {
                    c.remove(&connection_id);
                    if c.values().any(|relayed| !relayed) && !c.values().any(|relayed| *relayed) {
                        // The last relayed connection is gone: reached
                        // directly, done punching.
                        self.nat.punching.remove(&peer_id);
                    }
                    if c.is_empty() {
                        // Gone: what identify and the dial said of it is
                        // learnt again on the next connection.
                        self.conns.remove(&peer_id);
                        self.last_used.remove(&peer_id);
                        self.relaying_for.remove(&peer_id);
                        self.nat.offering.remove(&peer_id);
                        self.nat.punching.remove(&peer_id);
                        self.nat.dialled_at.remove(&peer_id);
                        self.view_peers.remove(&peer_id);
                        // Pinged again on the next connection; kept, one
                        // entry per peer ever met would grow without bound
                        // (a flood of fresh identities).
                        self.rtt.remove(&peer_id);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if peer == self.local_peer {
                        continue;
                    }
                    tracing::debug!(%peer, %addr, "mDNS discovered a peer");
                    self.remember_addr(peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        // Kademlia learns the peer from identify once
                        // connected (if it speaks our DHT protocol).
                        self.mdns_retries.entry(peer).or_insert((0, None));
                        self.dial_peer(peer);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                for (peer, _) in gone {
                    self.mdns_retries.remove(&peer);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                self.rtt.insert(peer, rtt);
                if let Some(waiters) = self.rtt_waiters.remove(&peer) {
                    for w in waiters {
                        let _ = w.send(Some(rtt));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Info(e)) => self.on_info(e),
            SwarmEvent::Behaviour(BehaviourEvent::View(e)) => self.on_view(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(e)) => self.on_gossip(e),
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
                // Waiters are answered by the next housekeeping tick, so
                // that a wildcard listener has reported every interface.
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(error = %error, "listener error");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let relayed = endpoint.is_relayed();
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), relayed, "connected");
                if endpoint.is_dialer() {
                    self.remember_addr(peer_id, endpoint.get_remote_address().clone());
                    if !relayed {
                        self.nat
                            .dialled_at
                            .insert(peer_id, endpoint.get_remote_address().clone());
                    }
                }
                self.on_connection(peer_id, connection_id, relayed);
                self.mdns_retries.remove(&peer_id);
                if let Some(waiters) = self.connect_waiters.remove(&peer_id) {
                    for w in waiters {
                        let _ = w.send(Ok(()));
                    }
                }
                if self.bootstrap.round.remove(&connection_id) {
                    self.nat.bootstrap_peers.insert(peer_id);
                    self.nat.joined_at.get_or_insert_with(Instant::now);
                    self.on_bootstrap_joined();
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                if self.bootstrap.round.remove(&connection_id) {
                    tracing::debug!(error = %error, "bootstrap dial failed");
                    if self.bootstrap.round.is_empty() && !self.bootstrap.round_ok {
                        self.schedule_bootstrap_retry();
                    }
                } else {
                    tracing::debug!(peer = ?peer_id, error = %error, "dial failed");
                }
                if let Some(peer) = peer_id {
                    if !self.swarm.is_connected(&peer) {
                        if let Some((attempts, next)) = self.mdns_retries.get_mut(&peer) {
                            *attempts += 1;
                            if *attempts > MDNS_DIAL_ATTEMPTS {
                                self.mdns_retries.remove(&peer);
                            } else {
                                *next = Some(Instant::now() + MDNS_RETRY_DELAY * *attempts);
                            }
                        }
                        if let Some(waiters) = self.rtt_waiters.remove(&peer) {
                            for w in waiters {
                                let _ = w.send(None);
                            }
                        }
                        if let Some(waiters) = self.connect_waiters.remove(&peer) {
                            let why = error.to_string();
                            for w in waiters {
                                let _ = w.send(Err(why.clone()));
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn on_info(&mut self, event: request_response::Event<InfoRequest, InfoResponse>) {
        self.used(rr_peer(&event));
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if request.version != PROTOCOL_VERSION {
                    tracing::debug!(%peer, version = request.version, "info request of another protocol version");
                }
                let response = self.info_response();
                if self
                    .swarm
                    .behaviour_mut()
                    .info
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!(%peer, "info request gone before the answer");
                }
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending_info.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(reply) = self.pending_info.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, error = %error, "inbound info request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        match &event {
            kad::Event::InboundRequest { .. } => self.stats.dht_requests_in += 1,
            kad::Event::OutboundQueryProgressed {
                stats,
                step,
                result,
                ..
            } if step.last => {
                self.stats.dht_queries += 1;
                let kind = match result {
                    QueryResult::Bootstrap(_) => 0,
                    QueryResult::GetClosestPeers(_) => 1,
                    QueryResult::GetRecord(_) => 2,
                    QueryResult::PutRecord(_) | QueryResult::RepublishRecord(_) => 3,
                    QueryResult::GetProviders(_) => 4,
                    QueryResult::StartProviding(_) | QueryResult::RepublishProvider(_) => 5,
                };
                self.stats.dht_queries_by_kind[kind] += 1;
                self.stats.dht_requests_out += u64::from(stats.num_requests());
            }
            _ => {}
        }
        match event {
            kad::Event::InboundRequest { request } => match request {
                InboundRequest::PutRecord {
                    source,
                    record: Some(record),
                    ..
                } => self.filter_record(source, record),
                InboundRequest::AddProvider {
                    record: Some(record),
                } => self.filter_provider(record),
                _ => {}
            },
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                QueryResult::GetProviders(result) => {
                    let done = match result {
                        Ok(GetProvidersOk::FoundProviders { providers, .. }) => {
                            if let Some((set, _)) = self.pending_providers.get_mut(&id) {
                                set.extend(providers);
                            }
                            step.last
                        }
                        Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => true,
                        Err(e) => {
                            tracing::debug!(error = %e, "provider lookup ended early");
                            true
                        }
                    };
                    if done {
                        if let Some((set, reply)) = self.pending_providers.remove(&id) {
                            let _ = reply.send(set);
                        }
                    }
                }
                QueryResult::GetRecord(result) => {
                    let done = match result {
                        Ok(GetRecordOk::FoundRecord(r)) => {
                            if let Some((found, _)) = self.pending_records.get_mut(&id) {
                                if found.len() < 64 {
                                    found.push(r.record.value);
                                }
                            }
                            step.last
                        }
                        Ok(GetRecordOk::FinishedWithNoAdditionalRecord { .. }) => true,
                        Err(e) => {
                            tracing::debug!(error = %e, "record lookup ended");
                            true
                        }
                    };
                    if done {
                        if let Some((found, reply)) = self.pending_records.remove(&id) {
                            let _ = reply.send(found);
                        }
                    }
                }
                QueryResult::PutRecord(result) => {
                    if let Err(e) = &result {
                        tracing::debug!(error = %e, "putting the info record did not reach a quorum");
                    }
                    if let Some(reply) = self.pending_withdraw.remove(&id) {
                        let _ = reply.send(());
                    }
                }
                QueryResult::StartProviding(Err(e)) => {
                    tracing::debug!(error = %e, "provider announcement did not complete");
                }
                QueryResult::Bootstrap(Err(e)) => {
                    tracing::debug!(error = %e, "DHT bootstrap query failed");
                }
                _ => {}
            },
            kad::Event::RoutingUpdated {
                peer, is_new_peer, ..
            } => {
                tracing::debug!(%peer, is_new_peer, "routing table updated");
                self.run_deferred_lookups(true);
                if is_new_peer && self.next_hop_target().is_some() {
                    // Maybe a holder of our next block: measure soon.
                    self.next_hop_trigger.notify_one();
                }
                if is_new_peer && self.published_alone && self.announcement.is_some() {
                    // Our last announcement reached nobody: repeat it now
                    // rather than at the next refresh.
                    if let Err(e) = self.publish() {
                        tracing::error!(error = %e, "cannot re-announce");
                    }
                }
            }
            _ => {}
        }
    }

    /// `StoreInserts::FilterBoth`: an inbound PUT_VALUE is stored only if
    /// it is a valid signed info of the peer its key names, and newer than
    /// what we hold.
    fn filter_record(&mut self, source: PeerId, mut record: Record) {
        let key_peer = match DhtKey::parse(record.key.as_ref()) {
            Some(DhtKey::Info(p)) => p,
            _ => {
                self.stats.records_rejected += 1;
                tracing::warn!(
                    %source,
                    key = %printable_key(record.key.as_ref()),
                    "dropping DHT record: not a nakshatra record key"
                );
                return;
            }
        };
        // A node puts only its own info (kad's replication and caching
        // are off), so a record sent by anyone else is a stranger's: one
        // connection cannot fill the store with many identities' records.
        if source != key_peer {
            self.stats.records_rejected += 1;
            tracing::warn!(%source, peer = %key_peer, "dropping DHT record: sent by another peer than the one it describes");
            return;
        }
        let now = now_ms();
        let verified = match verify(&record.value, Some(&key_peer), now) {
            Ok(v) => v,
            Err(e) => {
                self.stats.records_rejected += 1;
                tracing::warn!(%source, peer = %key_peer, reason = %e, "dropping invalid DHT record");
                return;
            }
        };
        let store = self.swarm.behaviour_mut().kad.store_mut();
        if let Some(existing) = store.get(&record.key).map(|r| r.value.clone()) {
            if let Ok(old) = verify(&existing, Some(&key_peer), now) {
                if old.info.issued_at_ms > verified.info.issued_at_ms {
                    tracing::debug!(%source, peer = %key_peer, "ignoring an older info record");
                    return;
                }
            }
        }
        let left = Duration::from_millis(verified.info.expires_at_ms.saturating_sub(now));
        let deadline = Instant::now() + left;
        record.expires = Some(record.expires.map_or(deadline, |e| e.min(deadline)));
        match store.put(record) {
            Ok(()) => {
                self.stats.records_accepted += 1;
                tracing::trace!(%source, peer = %key_peer, "stored info record");
            }
            Err(e) => tracing::warn!(%source, error = ?e, "cannot store info record"),
        }
    }

    /// `StoreInserts::FilterBoth` for ADD_PROVIDER: the provider is the
    /// sender (kad checked that); the key must be one of ours.
    fn filter_provider(&mut self, record: ProviderRecord) {
        match DhtKey::parse(record.key.as_ref()) {
            Some(k) if k.is_provider_key() => {}
            _ => {
                self.stats.providers_rejected += 1;
                tracing::warn!(
                    provider = %record.provider,
                    key = %printable_key(record.key.as_ref()),
                    "dropping provider record: not a nakshatra provider key"
                );
                return;
            }
        }
        let store = self.swarm.behaviour_mut().kad.store_mut();
        let now = Instant::now();
        let expired: Vec<PeerId> = store
            .providers(&record.key)
            .into_iter()
            .filter(|p| p.is_expired(now))
            .map(|p| p.provider)
            .collect();
        for p in expired {
            store.remove_provider(&record.key, &p);
        }
        let provider = record.provider;
        match store.add_provider(record) {
            Ok(()) => self.stats.providers_accepted += 1,
            Err(e) => {
                self.stats.providers_rejected += 1;
                tracing::warn!(%provider, error = ?e, "cannot store provider record");
            }
        }
    }
}

/// Every provider key a server with `info` announces: only its model's
/// key (for fetch sources and "is this model served at all"). Ranges and
/// capacity travel in the signed info, by gossip and view syncs: per-block
/// provider keys cost one DHT walk per block per refresh and gave
/// incomplete holder lists past a few hundred nodes (`docs/scale.md`).
fn announcement_keys(info: &ServerInfo) -> Vec<RecordKey> {
    vec![RecordKey::new(&keys::model_key(&info.model_id))]
}

/// A DHT key for a log line: lossy UTF-8, control characters escaped,
/// truncated.
fn printable_key(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(&raw[..raw.len().min(120)]);
    s.escape_debug().to_string()
}

/// The peer a request-response event is about.
fn rr_peer<Req, Resp>(event: &request_response::Event<Req, Resp>) -> PeerId {
    match event {
        request_response::Event::Message { peer, .. }
        | request_response::Event::OutboundFailure { peer, .. }
        | request_response::Event::InboundFailure { peer, .. }
        | request_response::Event::ResponseSent { peer, .. } => *peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_addresses_are_relayed() {
        let relayed: Multiaddr =
            "/ip4/10.99.0.1/tcp/41000/p2p/12D3KooWD6xLenh5WuSzemD8kUgTbfNLNWKXCHgAeyz34M7DSHPj/p2p-circuit"
                .parse()
                .expect("multiaddr");
        let direct: Multiaddr = "/ip4/10.99.0.1/udp/41000/quic-v1"
            .parse()
            .expect("multiaddr");
        assert!(is_relayed(&relayed));
        assert!(!is_relayed(&direct));
    }
}
