//! The cloneable handle to a running node.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::stream::{Control, OpenStreamError, Stream};
use futures::{stream, StreamExt};
use libp2p::{kad::RecordKey, Multiaddr, PeerId, StreamProtocol};
use nakshatra_protocol::{
    keys, now_ms, rpc::InfoResponse, validate_model_id, verify, RecordError, ServerInfo,
    ServerState, MAX_LAYERS,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    error::{AnnounceError, InfoError, LookupError, Stopped},
    event_loop::{Command, SwarmStats},
    plan::{plan_chain, Chain, PlanError, PlanOptions},
    probe,
    view::{build_model_view_with, ModelShape, ModelView, SwarmView},
};

/// How long [`Client::listen_addrs`] waits for the listeners to come up.
const LISTEN_WAIT: Duration = Duration::from_secs(10);
/// How long [`Client::rtt`] waits for a first ping.
const RTT_WAIT: Duration = Duration::from_secs(5);
/// How long the views wait for each peer's first ping.
const VIEW_RTT_WAIT: Duration = Duration::from_secs(3);
/// Most peers a view dials to measure their RTT (those neither connected
/// nor measured; the fastest announced first). A view of a big swarm
/// shows no RTT for the others rather than connect to every server.
pub const MAX_VIEW_DIALS: usize = 32;
/// Most lookups / info requests a view runs at once.
const CONCURRENCY: usize = 32;
/// Longest [`Client::open_stream`] takes, dial included.
pub(crate) const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(15);
/// Most probe streams kept open for reuse.
const MAX_KEPT_PROBE_STREAMS: usize = 256;
/// Longest [`Client::shutdown`] waits for the withdrawal to be stored.
const WITHDRAW_WAIT: Duration = Duration::from_secs(4);
/// How often [`Client::wait_for_hole_punches`] looks again.
const PUNCH_POLL: Duration = Duration::from_millis(20);
/// How old the last view sync may be before [`Client::block_holders`]
/// syncs again (a serving node's next-hop task asks every refresh; its
/// cache follows the gossip in between). Views and plans sync every time:
/// a client hears no gossip, and a sync only carries news.
pub const VIEW_SYNC_MAX_AGE: Duration = Duration::from_secs(5);
/// Longest [`Client::sync_view`] waits for a first connection.
pub const FIRST_SYNC_WAIT: Duration = Duration::from_secs(5);
/// Most first-hop (and, as many, last-hop) candidates a plan probes: the
/// fastest by announced throughput. A chain's middle hops are probed only
/// once chosen.
pub const MAX_EDGE_PROBES: usize = 16;
/// Plans a [`Client::plan`] makes at most when chosen middle hops do not
/// answer their probe (each round leaves those out).
const PLAN_ROUNDS: usize = 4;
/// How long a peer that did not answer this node's last RTT probe of it
/// stays out of [`Client::plan`]'s chains (unless no chain can be made
/// without it). A crashed peer stays in every view until its info
/// expires (one record TTL); without this memory each plan in that time
/// would choose it again, wait for its probe and plan again, and after
/// [`PLAN_ROUNDS`] of that return a chain through whichever dead peer
/// it had not probed yet (the simulator's churn: 5-6 of 35-38 chains).
pub const SILENT_PEER_MEMORY: Duration = Duration::from_secs(60);

/// Counters of [`Client::probe_rtt`] since the node started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeStats {
    /// Probes made (an answer reused from a probe of the same peer less
    /// than 500 ms before is not a probe).
    pub made: u64,
    /// Of those, the ones that got no answer in time.
    pub silent: u64,
}

/// How a view measures each peer's RTT.
#[derive(Clone, Copy)]
enum RttMode<'a> {
    /// libp2p ping (what `swarm status` shows).
    Ping,
    /// `/nakshatra/probe/1`, only for peers that could be a chain's first
    /// or last hop (at most [`MAX_EDGE_PROBES`] of each).
    Probe { exclude: &'a HashSet<PeerId> },
}

/// What every clone of a [`Client`] shares about raw streams.
pub(crate) struct StreamShared {
    control: Control,
    probe_streams: Mutex<HashMap<PeerId, Stream>>,
    /// Per peer, the last probe's result (see [`crate::probe::PROBE_REUSE`]).
    probe_slots: Mutex<HashMap<PeerId, crate::probe::ProbeSlot>>,
    test_link_delay: Option<Duration>,
    /// [`crate::SwarmConfig::probe_timeout`].
    probe_timeout: Duration,
    /// [`crate::SwarmConfig::silent_peer_memory`].
    silent_peer_memory: Duration,
    /// Probes this node made (answers reused within
    /// [`crate::probe::PROBE_REUSE`] not counted), and of those, the ones
    /// that got no answer: [`Client::probe_stats`].
    probes_made: std::sync::atomic::AtomicU64,
    probes_silent: std::sync::atomic::AtomicU64,
    /// Direct streams (`None`: [`crate::SwarmConfig::direct_port`] off).
    pub(crate) direct: Option<Arc<crate::stream::direct::Direct>>,
}

/// Handle to a running swarm node (see [`crate::spawn`]). Cheap to clone;
/// every method sends a command to the event loop and waits for its
/// answer. Once the event loop has stopped, methods fail with
/// [`Stopped`].
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    streams: Arc<StreamShared>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("peer_id", &self.peer_id)
            .field("test_link_delay", &self.streams.test_link_delay)
            .finish_non_exhaustive()
    }
}

/// A [`Client`] that does not keep the event loop alive (for the swarm's
/// own background tasks).
pub(crate) struct WeakClient {
    tx: mpsc::WeakSender<Command>,
    peer_id: PeerId,
    streams: Arc<StreamShared>,
}

impl WeakClient {
    pub(crate) fn upgrade(&self) -> Option<Client> {
        Some(Client {
            tx: self.tx.upgrade()?,
            peer_id: self.peer_id,
            streams: self.streams.clone(),
        })
    }
}

impl Client {
    pub(crate) fn new(
        tx: mpsc::Sender<Command>,
        peer_id: PeerId,
        control: Control,
        test_link_delay: Option<Duration>,
        probe_timeout: Duration,
        silent_peer_memory: Duration,
        direct: Option<Arc<crate::stream::direct::Direct>>,
    ) -> Self {
        Client {
            tx,
            peer_id,
            streams: Arc::new(StreamShared {
                control,
                probe_streams: Mutex::new(HashMap::new()),
                probe_slots: Mutex::new(HashMap::new()),
                test_link_delay,
                probe_timeout,
                silent_peer_memory,
                probes_made: Default::default(),
                probes_silent: Default::default(),
                direct,
            }),
        }
    }

    pub(crate) fn downgrade(&self) -> WeakClient {
        WeakClient {
            tx: self.tx.downgrade(),
            peer_id: self.peer_id,
            streams: self.streams.clone(),
        }
    }

    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses this node listens on, once at least one listener is
    /// up (waits up to 10 s; empty for a node that listens nowhere).
    /// Wildcard listen addresses (`0.0.0.0`) come back expanded to each
    /// interface. Print them as `<addr>/p2p/<peer id>` for others to
    /// bootstrap from.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::ListenAddrs { reply: tx })
            .await
            .map_err(|_| Stopped)?;
        match tokio::time::timeout(LISTEN_WAIT, rx).await {
            Ok(Ok(addrs)) => Ok(addrs),
            Ok(Err(_)) => Err(Stopped),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// Announces `info` (the node's model, layer range, devices, ...):
    /// publishes the signed info on the gossip topic
    /// (`/nakshatra/1/infos`), provides `/nakshatra/1/model/{id}` and puts
    /// the signed info record at `/nakshatra/1/info/{peer id}`. Then
    /// repeats every `refresh` with fresh `issued_at` / `expires_at`
    /// (`issued_at + record_ttl`): two DHT walks and one gossip message
    /// per refresh, whatever the range's length.
    ///
    /// The event loop fills in `protocol_version`, the timestamps, and
    /// `listen_addrs` when left empty, and signs with the node's own key
    /// (so the record is bound to this PeerId). Calling it again replaces
    /// the announcement (e.g. when free sessions change: the info alone is
    /// re-signed, gossiped and put). Returns once the records are stored
    /// locally and their publication started; other nodes' caches have
    /// them within a gossip round (about a second).
    pub async fn announce(&self, info: ServerInfo) -> Result<(), AnnounceError> {
        self.call(|reply| Command::Announce {
            info: Box::new(info),
            reply,
        })
        .await?
    }

    /// Withdraws the announcement: stops providing every key, stops
    /// answering `/nakshatra/info/1` with an info, and puts a signed
    /// `Offline` tombstone over the info record, waiting until that put
    /// finished. Askers drop the node at once; its provider records on
    /// other nodes expire after `record_ttl`. No-op when not announcing.
    pub async fn withdraw(&self) -> Result<(), Stopped> {
        self.call(|reply| Command::Withdraw { reply }).await
    }

    /// Providers of an arbitrary DHT key (not verified: a provider record
    /// only says that the PeerId who sent it claims the key).
    async fn providers(&self, key: &str) -> Result<HashSet<PeerId>, Stopped> {
        let key = RecordKey::new(&key);
        self.call(|reply| Command::GetProviders { key, reply })
            .await
    }

    /// Nodes serving `model_id`: those in the info cache (verified) and
    /// those providing `/nakshatra/1/model/{model_id}` on the DHT
    /// (unverified: check with [`Client::server_info`]).
    pub async fn model_peers(&self, model_id: &str) -> Result<Vec<PeerId>, LookupError> {
        validate_model_id(model_id)?;
        let mut peers = self.providers(&keys::model_key(model_id)).await?;
        peers.extend(
            self.cached_infos(Some(model_id))
                .await?
                .into_iter()
                .map(|(p, _)| p),
        );
        Ok(sorted(peers))
    }

    /// Holders of block `block` of `model_id` per the info cache (verified
    /// signed infos, synced first if the last sync is older than
    /// [`VIEW_SYNC_MAX_AGE`]).
    pub async fn block_holders(
        &self,
        model_id: &str,
        block: u32,
    ) -> Result<Vec<PeerId>, LookupError> {
        validate_model_id(model_id)?;
        if block >= MAX_LAYERS {
            return Ok(Vec::new());
        }
        self.sync_view(Some(model_id), VIEW_SYNC_MAX_AGE).await?;
        Ok(sorted(
            self.cached_infos(Some(model_id))
                .await?
                .into_iter()
                .filter(|(_, i)| i.state == ServerState::Online && i.holds(block))
                .map(|(p, _)| p)
                .collect(),
        ))
    }

    /// The serving peers in this node's info cache (verified, not expired,
    /// not withdrawn), of `model` or of every model. No network traffic.
    pub async fn cached_infos(
        &self,
        model: Option<&str>,
    ) -> Result<Vec<(PeerId, ServerInfo)>, Stopped> {
        let model = model.map(str::to_string);
        self.call(|reply| Command::CachedInfos { model, reply })
            .await
    }

    /// Brings the info cache up to date from up to two connected peers
    /// (`/nakshatra/view/1`, sending a digest of what the cache holds, so
    /// that only news comes back), unless the last sync is younger than
    /// `max_age`. Returns the number of new infos.
    ///
    /// A node connected to nobody yet (a fresh `swarm status` or `node
    /// ask` whose bootstrap dial is under way) waits up to
    /// [`FIRST_SYNC_WAIT`] for a first connection.
    pub async fn sync_view(
        &self,
        model: Option<&str>,
        max_age: Duration,
    ) -> Result<usize, Stopped> {
        let deadline = tokio::time::Instant::now() + FIRST_SYNC_WAIT;
        loop {
            let m = model.map(str::to_string);
            let got = self
                .call(|reply| Command::SyncView {
                    model: m,
                    max_age,
                    reply,
                })
                .await?;
            match got {
                Some(new) => return Ok(new),
                None if tokio::time::Instant::now() >= deadline => return Ok(0),
                None => tokio::time::sleep(PUNCH_POLL * 5).await,
            }
        }
    }

    /// `peer`'s current info, verified (signature, binding to `peer`,
    /// version, freshness, fields).
    ///
    /// Asks the peer directly over `/nakshatra/info/1` first (freshest, and
    /// it opens the connection RTT is measured on). If the peer cannot be
    /// reached or its answer does not verify, reads the info record from
    /// the DHT and keeps the newest record that verifies. A peer that
    /// answers "not serving", or whose newest record is a withdrawal
    /// tombstone, gives [`InfoError::NotServing`].
    pub async fn server_info(&self, peer: PeerId) -> Result<ServerInfo, InfoError> {
        let mut last: Option<RecordError> = None;
        match self
            .call(|reply| Command::RequestInfo { peer, reply })
            .await?
        {
            Ok(InfoResponse::Serving(bytes)) => match verify(&bytes, Some(&peer), now_ms()) {
                Ok(v) if v.info.state == ServerState::Offline => {
                    return Err(InfoError::NotServing(peer))
                }
                Ok(v) => {
                    self.learn_info_addrs(peer, &v.info).await;
                    return Ok(v.info);
                }
                Err(e) => {
                    tracing::warn!(%peer, reason = %e, "dropping invalid info answered by the peer");
                    last = Some(e);
                }
            },
            Ok(InfoResponse::NotServing) => return Err(InfoError::NotServing(peer)),
            Err(why) => {
                tracing::debug!(%peer, %why, "direct info request failed; reading the DHT");
            }
        }

        let records = self
            .call(|reply| Command::GetInfoRecords { peer, reply })
            .await?;
        let now = now_ms();
        let mut best: Option<ServerInfo> = None;
        for bytes in records {
            match verify(&bytes, Some(&peer), now) {
                Ok(v) => {
                    if best
                        .as_ref()
                        .is_none_or(|b| v.info.issued_at_ms > b.issued_at_ms)
                    {
                        best = Some(v.info);
                    }
                }
                Err(e) => {
                    tracing::warn!(%peer, reason = %e, "dropping invalid DHT record");
                    last = Some(e);
                }
            }
        }
        match best {
            Some(info) if info.state == ServerState::Offline => Err(InfoError::NotServing(peer)),
            Some(info) => {
                self.learn_info_addrs(peer, &info).await;
                Ok(info)
            }
            None => Err(InfoError::NotFound { peer, last }),
        }
    }

    /// Lets later dials (RTT, probes, streams by PeerId) use the addresses
    /// the peer signed.
    async fn learn_info_addrs(&self, peer: PeerId, info: &ServerInfo) {
        let addrs: Vec<Multiaddr> = info
            .listen_addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        self.add_peer_addresses(peer, addrs).await;
    }

    /// Round-trip time to `peer` from libp2p ping: the latest measurement,
    /// or else (dialling the peer if needed) the first one within 5 s.
    /// `None` if the peer cannot be reached or the loop has stopped.
    pub async fn rtt(&self, peer: PeerId) -> Option<Duration> {
        self.rtt_within(peer, true, RTT_WAIT).await
    }

    /// The RTTs of `peers` that answer within [`VIEW_RTT_WAIT`]
    /// ([`Client::rtt_within`], [`CONCURRENCY`] at once).
    async fn view_rtts(&self, peers: Vec<PeerId>, dial: bool) -> Vec<(PeerId, Duration)> {
        stream::iter(peers)
            .map(|p| async move { (p, self.rtt_within(p, dial, VIEW_RTT_WAIT).await) })
            .buffer_unordered(CONCURRENCY)
            .filter_map(|(p, r)| async move { r.map(|r| (p, r)) })
            .collect()
            .await
    }

    /// [`Client::rtt`] waiting at most `wait`; without `dial`, a peer not
    /// connected and not measured gives `None` at once.
    async fn rtt_within(&self, peer: PeerId, dial: bool, wait: Duration) -> Option<Duration> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Rtt {
                peer,
                dial,
                reply: tx,
            })
            .await
            .ok()?;
        tokio::time::timeout(wait, rx).await.ok()?.ok()?
    }

    /// A handle on this node's raw libp2p streams ([`crate::stream`]): open
    /// outbound streams with [`Control::open_stream`], serve a protocol
    /// with [`Control::accept`]. Every call returns a clone of the same
    /// control.
    ///
    /// **Accept loops must keep up.** A protocol nobody has `accept`ed is
    /// refused (the opener gets `UnsupportedProtocol`). At most
    /// [`crate::stream::INBOUND_BACKLOG`] negotiated streams wait for the
    /// accept loop; one more is dropped (the opener's `open_stream`
    /// succeeds, then its reads hit end-of-stream). Call
    /// `accept` before announcing, poll the `IncomingStreams` in a
    /// dedicated task that awaits nothing else, and spawn a task per
    /// stream. `accept` works once per protocol (`AlreadyRegistered` after
    /// that, until the `IncomingStreams` is dropped).
    ///
    /// **Dialling.** `open_stream` dials a peer it is not connected to by
    /// its PeerId alone, with the addresses the swarm knows (identify,
    /// Kademlia, and every address of a verified info or given to
    /// [`Client::add_peer_addresses`]); the request waits for that dial
    /// and fails with it. It has no timeout of its own: wrap it in one, or
    /// use [`Client::open_stream`], which connects first and is bounded.
    pub fn stream_control(&self) -> Control {
        self.streams.control.clone()
    }

    /// Opens a raw stream for `protocol` to `peer`: connects first if
    /// needed (dialling every address this node knows of `peer`, from a
    /// fresh port), then negotiates the stream. Fails if `peer` cannot be
    /// reached, does not accept `protocol`, or all of it takes longer than
    /// 15 s (`TimedOut`).
    pub async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<Stream, OpenStreamError> {
        let io = |kind, why: String| OpenStreamError::Io(std::io::Error::new(kind, why));
        let open = async {
            match self.call(|reply| Command::Connect { peer, reply }).await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(io(std::io::ErrorKind::NotConnected, why)),
                Err(Stopped) => {
                    return Err(io(std::io::ErrorKind::NotConnected, Stopped.to_string()))
                }
            }
            let mut control = self.streams.control.clone();
            control.open_stream(peer, protocol).await
        };
        match tokio::time::timeout(OPEN_STREAM_TIMEOUT, open).await {
            Ok(result) => result,
            Err(_) => Err(io(
                std::io::ErrorKind::TimedOut,
                format!("no stream to {peer} within {OPEN_STREAM_TIMEOUT:?}"),
            )),
        }
    }

    /// Adds `addrs` to what this node knows about `peer` (its own address
    /// book and the swarm's, which every dial by PeerId consults,
    /// [`Control::open_stream`]'s included). Addresses ending in `/p2p/..`
    /// are stored without it. Returns once they are in (a dial right after
    /// uses them). Verified infos' `listen_addrs` are added automatically.
    pub async fn add_peer_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if addrs.is_empty() {
            return;
        }
        let _ = self
            .call(|reply| Command::LearnAddrs { peer, addrs, reply })
            .await;
    }

    /// Application-level round-trip time to `peer` over
    /// `/nakshatra/probe/1`: best of three nonce echoes on one stream (kept
    /// open for the next probe; dialling the peer if needed), within
    /// [`crate::SwarmConfig::probe_timeout`] (3 s by default).
    /// Includes the peer's simulated link delay (test builds). `None`
    /// when no echo came back in time. `Some(0)` for this node itself.
    pub async fn probe_rtt(&self, peer: PeerId) -> Option<Duration> {
        probe::probe_rtt(self, peer).await
    }

    /// How many RTT probes this node has made, and how many of them got
    /// no answer within the probe timeout (diagnostics: what planning
    /// costs in probes, and in probe timeouts waited out).
    pub fn probe_stats(&self) -> ProbeStats {
        use std::sync::atomic::Ordering::Relaxed;
        ProbeStats {
            made: self.streams.probes_made.load(Relaxed),
            silent: self.streams.probes_silent.load(Relaxed),
        }
    }

    /// This node's simulated link delay
    /// ([`crate::SwarmConfig::test_link_delay`]): the node applies it to
    /// its activation frames too. Test builds only.
    #[cfg(feature = "fault-injection")]
    pub fn test_link_delay(&self) -> Option<Duration> {
        self.streams.test_link_delay
    }

    /// The TCP port this node accepts direct streams on (`None`: no
    /// listener, [`crate::SwarmConfig::direct_port`]).
    pub fn direct_port(&self) -> Option<u16> {
        self.direct().map(|d| d.port())
    }

    /// This node's direct streams, if it has a listener.
    pub(crate) fn direct(&self) -> Option<&Arc<crate::stream::direct::Direct>> {
        self.streams.direct.as_ref()
    }

    /// Connects to `peer` if it is not (as [`Client::open_stream`] does
    /// first), within [`OPEN_STREAM_TIMEOUT`]; whether it is connected.
    pub(crate) async fn connect(&self, peer: PeerId) -> bool {
        let connect = self.call(|reply| Command::Connect { peer, reply });
        matches!(
            tokio::time::timeout(OPEN_STREAM_TIMEOUT, connect).await,
            Ok(Ok(Ok(())))
        )
    }

    /// Counts a probe made for [`Client::probe_stats`].
    pub(crate) fn count_probe(&self, answered: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.streams.probes_made.fetch_add(1, Relaxed);
        if !answered {
            self.streams.probes_silent.fetch_add(1, Relaxed);
        }
    }

    /// [`crate::SwarmConfig::probe_timeout`].
    pub(crate) fn probe_timeout(&self) -> Duration {
        self.streams.probe_timeout
    }

    /// The probe slot of `peer`: probes of one peer go one at a time.
    /// Slots nobody holds are dropped once there are more than
    /// [`MAX_KEPT_PROBE_STREAMS`] of them.
    pub(crate) fn probe_slot(&self, peer: PeerId) -> crate::probe::ProbeSlot {
        let mut slots = self
            .streams
            .probe_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if slots.len() > MAX_KEPT_PROBE_STREAMS && !slots.contains_key(&peer) {
            slots.retain(|_, s| Arc::strong_count(s) > 1);
        }
        slots.entry(peer).or_default().clone()
    }

    pub(crate) fn take_probe_stream(&self, peer: PeerId) -> Option<Stream> {
        self.streams
            .probe_streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer)
    }

    pub(crate) fn keep_probe_stream(&self, peer: PeerId, stream: Stream) {
        let mut kept = self
            .streams
            .probe_streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if kept.len() >= MAX_KEPT_PROBE_STREAMS && !kept.contains_key(&peer) {
            if let Some(victim) = kept.keys().next().copied() {
                kept.remove(&victim);
            }
        }
        kept.insert(peer, stream);
    }

    /// Plans the fastest chain of hops through `model_id` from this node:
    /// reads the model's view ([`Client::model_view`], on `opts.shape` when
    /// given: peers that disagree with it are left out), probes the
    /// candidate first and last hops ([`Client::probe_rtt`], concurrently,
    /// the [`MAX_EDGE_PROBES`] fastest of each end: their RTTs are link
    /// costs), runs [`crate::plan::plan_chain`], then probes the chosen
    /// middle hops and plans again without any that stays silent (up to
    /// [`PLAN_ROUNDS`] rounds); with a silent hop, the other holders of
    /// its blocks not probed yet ([`MAX_EDGE_PROBES`] of them, fastest
    /// announced first) are probed in the same round, so that holders
    /// that died together cost one probe timeout rather than a round
    /// each. A plan's probes do not grow with the swarm.
    ///
    /// First and last hops that do not answer the probe within the probe
    /// timeout ([`crate::SwarmConfig::probe_timeout`]) are
    /// left out (this node could not reach them as first hop, nor get
    /// tokens back from them as last hop), so an unreachable range shows
    /// up as [`PlanError::Uncovered`], like a range whose holders are all
    /// excluded. [`PlanError::NoModel`]: nobody announces the model.
    ///
    /// Peers whose last probe from this node got no answer, less than
    /// [`crate::SwarmConfig::silent_peer_memory`] ago
    /// ([`SILENT_PEER_MEMORY`] by default), are left out as if excluded; if no
    /// chain can be made without them, the plan is made again with them.
    pub async fn plan(&self, model_id: &str, opts: &PlanOptions) -> Result<Chain, PlanError> {
        validate_model_id(model_id).map_err(LookupError::from)?;
        let silent: HashSet<PeerId> = self
            .recently_silent(self.streams.silent_peer_memory)
            .into_iter()
            .filter(|p| !opts.exclude.contains(p))
            .collect();
        if !silent.is_empty() {
            let mut without = opts.clone();
            without.exclude.extend(silent.iter().copied());
            match self.plan_probing(model_id, &without).await {
                Err(PlanError::Uncovered { .. }) => tracing::debug!(
                    ?silent,
                    "no chain without the peers silent lately; planning with them"
                ),
                done => return done,
            }
        }
        self.plan_probing(model_id, opts).await
    }

    /// Peers whose last probe from this node, less than `within` ago, got
    /// no answer (a probe under way counts as not known).
    fn recently_silent(&self, within: Duration) -> Vec<PeerId> {
        let slots = self
            .streams
            .probe_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter_map(|(peer, slot)| match *slot.try_lock().ok()? {
                Some((at, None)) if at.elapsed() < within => Some(*peer),
                _ => None,
            })
            .collect()
    }

    /// [`Client::plan`] with `opts` as given: the view, the probes, and
    /// up to [`PLAN_ROUNDS`] plans.
    async fn plan_probing(&self, model_id: &str, opts: &PlanOptions) -> Result<Chain, PlanError> {
        let mut infos = HashMap::new();
        let (view, rtts) = self
            .model_view_impl(
                model_id,
                opts.shape.as_ref(),
                &mut infos,
                RttMode::Probe {
                    exclude: &opts.exclude,
                },
            )
            .await
            .map_err(LookupError::from)?;
        // A first or last hop must answer this node's probe (it sends
        // the tokens, it gets them back); those not probed or silent are
        // left out. A middle hop is probed once a plan chooses it.
        let n = view.n_layers;
        let mut opts = opts.clone();
        opts.exclude.extend(
            view.peers
                .iter()
                .filter(|p| (p.range[0] == 0 || p.range[1] == n) && !rtts.contains_key(&p.peer_id))
                .map(|p| p.peer_id),
        );
        // Middle hops that answered a probe in an earlier round.
        let mut answered: HashSet<PeerId> = HashSet::new();
        for _ in 0..PLAN_ROUNDS {
            let chain = plan_chain(&view, &rtts, &opts)?;
            let unprobed: Vec<PeerId> = chain
                .hops
                .iter()
                .map(|h| h.peer_id)
                .filter(|p| !rtts.contains_key(p) && !answered.contains(p))
                .collect();
            let (ok, silent) = self.probe_all(unprobed).await;
            answered.extend(ok);
            if silent.is_empty() {
                return Ok(chain);
            }
            tracing::debug!(
                ?silent,
                "chosen middle hops did not answer the probe; planning again"
            );
            // The other holders of their blocks are probed now, at once
            // (the fastest MAX_EDGE_PROBES not probed yet): peers that
            // crashed together would otherwise be met one round, and one
            // probe timeout, at a time, and the last round's chain could
            // still go through one.
            let lost: Vec<[u32; 2]> = chain
                .hops
                .iter()
                .filter(|h| silent.contains(&h.peer_id))
                .map(|h| [h.start, h.end])
                .collect();
            opts.exclude.extend(silent);
            let mut others: Vec<&crate::view::PeerView> = view
                .peers
                .iter()
                .filter(|p| {
                    crate::plan::usable(p, n, &opts)
                        && !rtts.contains_key(&p.peer_id)
                        && !answered.contains(&p.peer_id)
                        && lost.iter().any(|r| p.range[0] < r[1] && r[0] < p.range[1])
                })
                .collect();
            others.sort_by(|a, b| {
                b.throughput
                    .total_cmp(&a.throughput)
                    .then(a.peer_id.cmp(&b.peer_id))
            });
            let others: Vec<PeerId> = others
                .into_iter()
                .take(MAX_EDGE_PROBES)
                .map(|p| p.peer_id)
                .collect();
            let (ok, silent) = self.probe_all(others).await;
            answered.extend(ok);
            opts.exclude.extend(silent);
        }
        // Silent hops in every round: plan without them once more (an
        // unprobed middle hop may remain; opening the chain tells).
        plan_chain(&view, &rtts, &opts)
    }

    /// Probes `peers` concurrently: those that answered, and those that
    /// did not.
    async fn probe_all(&self, peers: Vec<PeerId>) -> (Vec<PeerId>, Vec<PeerId>) {
        let results: Vec<(PeerId, bool)> = stream::iter(peers)
            .map(|p| async move { (p, self.probe_rtt(p).await.is_some()) })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let (ok, silent): (Vec<_>, Vec<_>) = results.into_iter().partition(|(_, ok)| *ok);
        (
            ok.into_iter().map(|(p, _)| p).collect(),
            silent.into_iter().map(|(p, _)| p).collect(),
        )
    }

    /// Treats `peer` as dead for `period`: its connections are closed, it
    /// leaves the routing table, and no connection to or from it is made
    /// until then, so that no lookup waits on a dial to it (a QUIC dial to
    /// a killed process waits out the whole handshake timeout). For a peer
    /// this node saw die (a hop lost mid-answer); it may come back after.
    pub async fn forget_peer(&self, peer: PeerId, period: Duration) -> Result<(), Stopped> {
        self.tx
            .send(Command::Forget { peer, period })
            .await
            .map_err(|_| Stopped)
    }

    /// Peers with an open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, Stopped> {
        self.call(|reply| Command::ConnectedPeers { reply }).await
    }

    /// Whether a connection to `peer` is open now (`false` once the loop
    /// has stopped).
    pub async fn is_connected(&self, peer: PeerId) -> bool {
        self.connected_peers()
            .await
            .is_ok_and(|peers| peers.contains(&peer))
    }

    /// How this node reaches each connected peer now: directly, or only
    /// through a relay.
    pub async fn via(&self) -> Result<HashMap<PeerId, crate::view::Via>, Stopped> {
        self.call(|reply| Command::Via { reply }).await
    }

    /// Waits, at most `within`, until none of `peers` has a hole punch
    /// under way: each is then reached directly, or stays relayed because
    /// the punch failed or never started. A caller about to open
    /// long-lived streams waits for this, so that they run on the direct
    /// connection: a stream opened on the relayed one keeps it open
    /// (through the relay's limits and latency) until the stream ends.
    pub async fn wait_for_hole_punches(&self, peers: &[PeerId], within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let Ok(pending) = self.call(|reply| Command::Punching { reply }).await else {
                return;
            };
            let waiting: Vec<&PeerId> = peers.iter().filter(|p| pending.contains(p)).collect();
            if waiting.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::debug!(peers = ?waiting, "hole punch still under way; going on relayed");
                return;
            }
            tokio::time::sleep(PUNCH_POLL).await;
        }
    }

    /// Counters: records accepted/refused, connections, routing table size.
    pub async fn stats(&self) -> Result<SwarmStats, Stopped> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// The value stored under `key` in this node's local DHT store, if any
    /// (diagnostics: what this node would answer for `key`).
    pub async fn local_record(&self, key: &str) -> Result<Option<Vec<u8>>, Stopped> {
        let key = RecordKey::new(&key);
        self.call(|reply| Command::LocalRecord { key, reply }).await
    }

    /// Puts `value` under `key` into the DHT as is: no signing, no checks.
    /// For fault-injection tests only (a node that publishes bad records);
    /// honest code never needs it, and a production build does not have
    /// it. Returns whether the put was started.
    #[cfg(feature = "fault-injection")]
    pub async fn put_raw_record(&self, key: &str, value: Vec<u8>) -> Result<bool, Stopped> {
        let key = RecordKey::new(&key);
        self.call(|reply| Command::PutRaw { key, value, reply })
            .await
    }

    /// The view of one model: holders of every block, each serving peer's
    /// verified info and RTT, and the gaps.
    ///
    /// RTTs: every connected peer's, and of the others at most
    /// [`MAX_VIEW_DIALS`] (the fastest announced) are dialled; the rest
    /// show none. A view's cost does not grow with the swarm.
    ///
    /// Syncs the info cache ([`Client::sync_view`]: one request to up to
    /// two peers, carrying only news) and builds the view from it; only
    /// when the cache knows nobody serving the model does it fall back on
    /// the providers of `/nakshatra/1/model/{id}`, asked directly
    /// ([`Client::server_info`]). Peers whose info does not verify or is
    /// not for this model are left out. A model nobody serves gives
    /// `n_layers == 0` and empty lists.
    ///
    /// The layer count is the announcers' majority vote
    /// ([`crate::build_model_view`]): for display only. A node that knows
    /// the model's verified manifest uses [`Client::model_view_with`].
    pub async fn model_view(&self, model_id: &str) -> Result<ModelView, LookupError> {
        validate_model_id(model_id)?;
        let mut infos = HashMap::new();
        Ok(self
            .model_view_impl(model_id, None, &mut infos, RttMode::Ping)
            .await?
            .0)
    }

    /// [`Client::model_view`] for a model whose shape is known from its
    /// verified manifest: the view has `shape`'s blocks, and peers whose
    /// records disagree with it are left out however many they are.
    pub async fn model_view_with(
        &self,
        model_id: &str,
        shape: &ModelShape,
    ) -> Result<ModelView, LookupError> {
        validate_model_id(model_id)?;
        let mut infos = HashMap::new();
        Ok(self
            .model_view_impl(model_id, Some(shape), &mut infos, RttMode::Ping)
            .await?
            .0)
    }

    /// The view of every model served in the swarm: syncs the info cache
    /// (falling back on the providers of `/nakshatra/1/models` when no
    /// peer answers), then builds
    /// each model's view as [`Client::model_view`] does. This is what
    /// `nakshatra swarm status` prints (serialize it with serde; the JSON
    /// keys are fixed).
    pub async fn swarm_view(&self) -> Result<SwarmView, Stopped> {
        self.sync_view(None, Duration::ZERO).await?;
        let mut infos: HashMap<PeerId, Option<ServerInfo>> = self
            .cached_infos(None)
            .await?
            .into_iter()
            .map(|(p, i)| (p, Some(i)))
            .collect();
        if infos.is_empty() {
            // No view peer answered (yet): the DHT's directory of servers.
            let serving = self.providers(keys::MODELS_KEY).await?;
            self.fetch_infos(serving, &mut infos).await?;
        }
        let ids: BTreeSet<String> = infos
            .values()
            .flatten()
            .map(|i| i.model_id.clone())
            .collect();
        let mut models = Vec::new();
        for id in ids {
            models.push(
                self.model_view_impl(&id, None, &mut infos, RttMode::Ping)
                    .await?
                    .0,
            );
        }
        let via = self.via().await?;
        for p in models.iter_mut().flat_map(|m| m.peers.iter_mut()) {
            p.via = via.get(&p.peer_id).copied();
        }
        Ok(SwarmView { models })
    }

    async fn model_view_impl(
        &self,
        model_id: &str,
        shape: Option<&ModelShape>,
        infos: &mut HashMap<PeerId, Option<ServerInfo>>,
        mode: RttMode<'_>,
    ) -> Result<(ModelView, HashMap<PeerId, Duration>), Stopped> {
        // The info cache (gossip and view syncs): verified infos of every
        // serving peer, no DHT walk.
        // Synced on every view: only news comes back (the digest), and a
        // client hears no gossip.
        self.sync_view(Some(model_id), Duration::ZERO).await?;
        let cached = self.cached_infos(Some(model_id)).await?;
        if cached.is_empty() {
            // Nobody answered a view sync (a swarm of one, or peers still
            // identifying): the model key's providers, asked directly.
            let candidates = self.providers(&keys::model_key(model_id)).await?;
            self.fetch_infos(candidates, infos).await?;
        }
        for (p, i) in cached {
            infos.insert(p, Some(i));
        }

        let known = infos_of(infos, model_id);
        let rtts: HashMap<PeerId, Duration> = match mode {
            RttMode::Ping => {
                // Peers connected or measured answer at once; of the
                // others, only the MAX_VIEW_DIALS fastest announced are
                // dialled, so that a view's cost does not grow with the
                // swarm (the rest show no RTT). Peer ids collected first:
                // a stream over borrowing closures would make this future
                // `!Send` (rustc cannot prove the closures general over
                // lifetimes).
                let peers: Vec<PeerId> = known.iter().map(|(p, _)| *p).collect();
                let mut rtts: HashMap<PeerId, Duration> =
                    self.view_rtts(peers, false).await.into_iter().collect();
                let mut rest: Vec<&(PeerId, ServerInfo)> = known
                    .iter()
                    .filter(|(p, _)| !rtts.contains_key(p))
                    .collect();
                rest.sort_by(fastest_first);
                let dial: Vec<PeerId> = rest
                    .into_iter()
                    .take(MAX_VIEW_DIALS)
                    .map(|(p, _)| *p)
                    .collect();
                rtts.extend(self.view_rtts(dial, true).await);
                rtts
            }
            RttMode::Probe { exclude } => {
                // Only peers that could be a chain's first or last hop (a
                // full one too: its record may be seconds old, and the
                // planner only penalises it), the fastest of each end.
                let n = shape.map_or_else(
                    || build_model_view_with(model_id, None, &known, &HashMap::new()).n_layers,
                    |s| s.n_layers,
                );
                let usable = |(p, i): &&(PeerId, ServerInfo)| {
                    i.state == ServerState::Online && i.throughput > 0.0 && !exclude.contains(p)
                };
                let mut candidates: Vec<PeerId> = Vec::new();
                for edge in [
                    |i: &ServerInfo, _n: u32| i.start == 0,
                    |i: &ServerInfo, n: u32| i.end == n,
                ] {
                    let mut side: Vec<&(PeerId, ServerInfo)> = known
                        .iter()
                        .filter(usable)
                        .filter(|(_, i)| edge(i, n))
                        .collect();
                    side.sort_by(fastest_first);
                    for (p, _) in side.into_iter().take(MAX_EDGE_PROBES) {
                        if !candidates.contains(p) {
                            candidates.push(*p);
                        }
                    }
                }
                stream::iter(candidates)
                    .map(|p| async move { (p, self.probe_rtt(p).await) })
                    .buffer_unordered(CONCURRENCY)
                    .filter_map(|(p, r)| async move {
                        if r.is_none() {
                            tracing::debug!(peer = %p, "no answer to the RTT probe");
                        }
                        r.map(|r| (p, r))
                    })
                    .collect()
                    .await
            }
        };
        Ok((build_model_view_with(model_id, shape, &known, &rtts), rtts))
    }

    /// Fetches (concurrently) the info of every peer not fetched yet.
    async fn fetch_infos(
        &self,
        peers: HashSet<PeerId>,
        infos: &mut HashMap<PeerId, Option<ServerInfo>>,
    ) -> Result<(), Stopped> {
        let new: Vec<PeerId> = peers
            .into_iter()
            .filter(|p| !infos.contains_key(p))
            .collect();
        let results: Vec<(PeerId, Result<ServerInfo, InfoError>)> = stream::iter(new)
            .map(|p| async move { (p, self.server_info(p).await) })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for (peer, result) in results {
            match result {
                Ok(info) => {
                    infos.insert(peer, Some(info));
                }
                Err(InfoError::Stopped(s)) => return Err(s),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "no usable info");
                    infos.insert(peer, None);
                }
            }
        }
        Ok(())
    }

    /// Gracefully leaves: [`Client::withdraw`]s, then stops the event loop
    /// (its `JoinHandle` completes). Other clones fail with [`Stopped`]
    /// afterwards. To simulate a crash instead, abort the `JoinHandle`.
    pub async fn shutdown(&self) -> Result<(), Stopped> {
        // The tombstone put waits for the DHT's answers; a peer that is
        // slow to answer must not hold the process up (the records expire
        // within a TTL anyway).
        if tokio::time::timeout(WITHDRAW_WAIT, self.withdraw())
            .await
            .is_err()
        {
            tracing::info!(wait = ?WITHDRAW_WAIT, "withdrawal still under way; leaving anyway");
        }
        self.call(|reply| Command::Shutdown { reply }).await
    }
}

fn sorted(set: HashSet<PeerId>) -> Vec<PeerId> {
    let mut v: Vec<PeerId> = set.into_iter().collect();
    v.sort_by_key(|p| p.to_base58());
    v
}

fn infos_of(
    infos: &HashMap<PeerId, Option<ServerInfo>>,
    model_id: &str,
) -> Vec<(PeerId, ServerInfo)> {
    infos
        .iter()
        .filter_map(|(p, i)| i.as_ref().map(|i| (*p, i.clone())))
        .filter(|(_, i)| i.model_id == model_id)
        .collect()
}

/// Orders serving peers by announced throughput, fastest first (ties by
/// peer id): whom a view or a plan measures first.
fn fastest_first(a: &&(PeerId, ServerInfo), b: &&(PeerId, ServerInfo)) -> std::cmp::Ordering {
    b.1.throughput
        .total_cmp(&a.1.throughput)
        .then(a.0.cmp(&b.0))
}
