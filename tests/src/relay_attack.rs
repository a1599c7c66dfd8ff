//! The attacker of the relay-abuse tests: real rust-libp2p peers in the
//! test process that speak circuit relay v2 as *clients* (and nothing
//! else) to a node's relay server, asking for more reservations and
//! circuits than its limits allow.
//!
//! Each [`RelayPeer`] is one libp2p swarm (its own identity, or a shared
//! one: [`reserve_one_identity`]) whose TCP dials leave from a chosen
//! loopback address (`127.0.0.0/8` is all loopback on Linux), so that the
//! relay's per-IP rate limiters see several "hosts" from one machine.
//!
//! - [`reserve_many`]: K identities each ask for a reservation.
//! - [`reserve_one_identity`]: one identity asks over several
//!   connections (a relay counts reservations per connection).
//! - [`open_circuits`]: one source opens circuits to a destination that
//!   holds a reservation (a [`RelayPeer`] listening on
//!   `<relay>/p2p-circuit`).
//! - [`Flood`]: fresh identities keep asking for a reservation and a
//!   circuit until stopped.
//!
//! Every wait is bounded by [`ANSWER_TIMEOUT`] or [`HANDSHAKE_TIMEOUT`]:
//! a relay that never answers gives [`Outcome::NoAnswer`], not a hang.

use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::{
    DialOpts as TransportDialOpts, ListenerId, TransportError, TransportEvent,
};
use libp2p::core::upgrade::Version;
use libp2p::core::Transport;
use libp2p::identity::Keypair;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, relay, yamux, Multiaddr, PeerId, Swarm, SwarmBuilder};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Most a TCP connect plus the noise and yamux upgrades may take (loopback:
/// milliseconds; a relay under attack may be slower).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most one request may wait for the relay's answer: a connection to it, a
/// reservation, or a circuit (with the upgrade to the destination over
/// it). Past it the request counts as [`Outcome::NoAnswer`].
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// Idle connections (a relayed one carries no traffic here) stay open this
/// long, so that held reservations and circuits outlive any test.
pub const HOLD: Duration = Duration::from_secs(600);
/// How long a [`Flood`] worker pauses after a request the relay did not
/// answer at all, so that a dead relay is not spun on.
pub const FLOOD_BACKOFF: Duration = Duration::from_millis(100);

/// The swarm of a [`RelayPeer`]: only the relay client behaviour.
type AttackSwarm = Swarm<relay::client::Behaviour>;
/// One command run on the swarm's task.
type Command = Box<dyn FnOnce(&mut AttackSwarm) + Send>;
/// What the swarm's task forwards.
type Event = SwarmEvent<relay::client::Event>;

/// `127.0.0.n`: a loopback source address (Linux routes all of
/// `127.0.0.0/8` to `lo`).
pub fn loopback_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// What the relay answered to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Reservation accepted / circuit established (end to end).
    Accepted,
    /// Refused with `RESOURCE_LIMIT_EXCEEDED` (a count or a rate limiter).
    Limited,
    /// Refused otherwise (connection denied, stream dropped, ...): why.
    Refused(String),
    /// No answer within [`ANSWER_TIMEOUT`].
    NoAnswer,
}

impl Outcome {
    /// `Limited` when a refusal's error says `ResourceLimitExceeded`,
    /// `Refused` with the error otherwise.
    fn refusal(debug: String) -> Outcome {
        if debug.contains("ResourceLimitExceeded") {
            Outcome::Limited
        } else {
            Outcome::Refused(debug)
        }
    }
}

/// Outcomes counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// [`Outcome::Accepted`].
    pub accepted: usize,
    /// [`Outcome::Limited`].
    pub limited: usize,
    /// [`Outcome::Refused`].
    pub refused: usize,
    /// [`Outcome::NoAnswer`].
    pub no_answer: usize,
    /// The first few distinct [`Outcome::Refused`] reasons (for the log).
    pub reasons: Vec<String>,
}

impl Tally {
    /// Counts `o`.
    pub fn add(&mut self, o: &Outcome) {
        match o {
            Outcome::Accepted => self.accepted += 1,
            Outcome::Limited => self.limited += 1,
            Outcome::Refused(why) => {
                self.refused += 1;
                if self.reasons.len() < 4 && !self.reasons.contains(why) {
                    self.reasons.push(why.clone());
                }
            }
            Outcome::NoAnswer => self.no_answer += 1,
        }
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &Tally) {
        self.accepted += other.accepted;
        self.limited += other.limited;
        self.refused += other.refused;
        self.no_answer += other.no_answer;
        for r in &other.reasons {
            if self.reasons.len() < 4 && !self.reasons.contains(r) {
                self.reasons.push(r.clone());
            }
        }
    }

    /// Requests counted.
    pub fn attempts(&self) -> usize {
        self.accepted + self.limited + self.refused + self.no_answer
    }

    /// Requests the relay refused (limited or otherwise).
    pub fn denied(&self) -> usize {
        self.limited + self.refused
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} attempts: {} accepted, {} refused (limit exceeded), {} refused (other), {} unanswered",
            self.attempts(),
            self.accepted,
            self.limited,
            self.refused,
            self.no_answer
        )?;
        if !self.reasons.is_empty() {
            write!(f, "; other refusals: {:?}", self.reasons)?;
        }
        Ok(())
    }
}

/// TCP dials (only: no listener) from a fixed source address, so that
/// attackers on one machine look like several hosts to per-IP limits.
/// libp2p-tcp's port reuse binds the unspecified address, not a chosen
/// one.
#[derive(Debug, Clone, Copy)]
struct BoundTcp {
    source: Ipv4Addr,
}

/// `/ip4/A/tcp/P` with an optional `/p2p/ID`, and nothing more (a
/// `/p2p-circuit` address is the relay transport's).
fn tcp_target(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut it = addr.iter();
    let ip = match it.next()? {
        Protocol::Ip4(ip) => ip,
        _ => return None,
    };
    let port = match it.next()? {
        Protocol::Tcp(port) => port,
        _ => return None,
    };
    match (it.next(), it.next()) {
        (None, _) | (Some(Protocol::P2p(_)), None) => {
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        _ => None,
    }
}

impl Transport for BoundTcp {
    type Output = libp2p::tcp::tokio::TcpStream;
    type Error = std::io::Error;
    type ListenerUpgrade = futures::future::Pending<Result<Self::Output, Self::Error>>;
    type Dial = Pin<Box<dyn Future<Output = Result<Self::Output, Self::Error>> + Send>>;

    fn listen_on(
        &mut self,
        _: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        Err(TransportError::MultiaddrNotSupported(addr))
    }

    fn remove_listener(&mut self, _: ListenerId) -> bool {
        false
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        _: TransportDialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let Some(to) = tcp_target(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let from = SocketAddr::V4(SocketAddrV4::new(self.source, 0));
        Ok(Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(from)?;
            let stream = socket.connect(to).await?;
            stream.set_nodelay(true)?;
            Ok(libp2p::tcp::tokio::TcpStream(stream))
        }))
    }

    fn poll(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        // No listener, so never an event.
        Poll::Pending
    }
}

/// The relay's peer id, from the `/p2p/ID` that ends `relay`.
fn relay_peer(relay: &Multiaddr) -> Option<PeerId> {
    match relay.iter().last()? {
        Protocol::P2p(id) => Some(id),
        _ => None,
    }
}

/// One attacking libp2p peer: a swarm with the relay client behaviour,
/// driven by its own task, its TCP dials from one loopback address. Its
/// connections (and so the reservations and circuits on them) close when
/// it is dropped.
pub struct RelayPeer {
    peer_id: PeerId,
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::UnboundedReceiver<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RelayPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RelayPeer {
    /// A peer with identity `key` dialling from `source` (inside a tokio
    /// runtime).
    pub fn new(key: Keypair, source: Ipv4Addr) -> Result<RelayPeer, String> {
        let peer_id = key.public().to_peer_id();
        let swarm = SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(|key| {
                let noise = noise::Config::new(key)
                    .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })?;
                Ok(BoundTcp { source }
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise)
                    .multiplex(yamux::Config::default())
                    .timeout(HANDSHAKE_TIMEOUT))
            })
            .map_err(|e| format!("transport: {e}"))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| format!("relay client: {e}"))?
            .with_behaviour(|_, relay_client| relay_client)
            .map_err(|e| format!("behaviour: {e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(HOLD))
            .build();
        let (commands, mut command_rx) = mpsc::unbounded_channel::<Command>();
        let (event_tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut swarm = swarm;
            loop {
                tokio::select! {
                    c = command_rx.recv() => match c {
                        Some(c) => c(&mut swarm),
                        None => break,
                    },
                    e = swarm.select_next_some() => {
                        // Nobody listening any more is fine: the swarm
                        // must still be driven to keep its connections.
                        let _ = event_tx.send(e);
                    }
                }
            }
        });
        Ok(RelayPeer {
            peer_id,
            commands,
            events,
            task,
        })
    }

    /// A peer with a fresh identity dialling from `source`.
    pub fn generate(source: Ipv4Addr) -> Result<RelayPeer, String> {
        RelayPeer::new(Keypair::generate_ed25519(), source)
    }

    /// Its peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Runs `f` on the swarm; `None` if its task is gone.
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut AttackSwarm) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Box::new(move |s| {
                let _ = tx.send(f(s));
            }))
            .ok()?;
        tokio::time::timeout(ANSWER_TIMEOUT, rx).await.ok()?.ok()
    }

    /// The next swarm event before `deadline`.
    async fn next_event(&mut self, deadline: Instant) -> Option<Event> {
        tokio::time::timeout_at(deadline, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// Connects directly to `relay` (`/ip4/A/tcp/P/p2p/ID`): every later
    /// reservation and circuit request of this peer goes over this
    /// connection.
    pub async fn connect(&mut self, relay: &Multiaddr) -> Outcome {
        let Some(relay_id) = relay_peer(relay) else {
            return Outcome::Refused(format!("{relay} names no peer"));
        };
        let opts = DialOpts::peer_id(relay_id)
            .addresses(vec![relay.clone()])
            .condition(PeerCondition::Always)
            .build();
        let id = opts.connection_id();
        match self
            .call(move |s| s.dial(opts).map_err(|e| e.to_string()))
            .await
        {
            None => return Outcome::NoAnswer,
            Some(Err(e)) => return Outcome::Refused(e),
            Some(Ok(())) => {}
        }
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while let Some(e) = self.next_event(deadline).await {
            match e {
                SwarmEvent::ConnectionEstablished { connection_id, .. } if connection_id == id => {
                    return Outcome::Accepted
                }
                SwarmEvent::OutgoingConnectionError {
                    connection_id,
                    error,
                    ..
                } if connection_id == id => return Outcome::refusal(format!("{error:?}")),
                _ => {}
            }
        }
        Outcome::NoAnswer
    }

    /// Asks `relay` (`/ip4/A/tcp/P/p2p/ID`) for a reservation by listening
    /// on `<relay>/p2p-circuit` (connecting first if this peer is not
    /// connected yet) and waits for the answer. An accepted reservation
    /// holds until the peer is dropped.
    pub async fn reserve(&mut self, relay: &Multiaddr) -> Outcome {
        let Some(relay_id) = relay_peer(relay) else {
            return Outcome::Refused(format!("{relay} names no peer"));
        };
        let circuit = relay.clone().with(Protocol::P2pCircuit);
        let listener = match self
            .call(move |s| s.listen_on(circuit).map_err(|e| e.to_string()))
            .await
        {
            None => return Outcome::NoAnswer,
            Some(Err(e)) => return Outcome::Refused(e),
            Some(Ok(id)) => id,
        };
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while let Some(e) = self.next_event(deadline).await {
            match e {
                SwarmEvent::Behaviour(relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    ..
                }) if relay_peer_id == relay_id => return Outcome::Accepted,
                SwarmEvent::ListenerClosed {
                    listener_id,
                    reason,
                    ..
                } if listener_id == listener => {
                    return match reason {
                        Err(e) => Outcome::refusal(format!("{e:?}")),
                        Ok(()) => Outcome::Refused("listener closed".into()),
                    }
                }
                SwarmEvent::OutgoingConnectionError {
                    peer_id: Some(p),
                    error,
                    ..
                } if p == relay_id => return Outcome::refusal(format!("{error:?}")),
                SwarmEvent::ConnectionClosed { peer_id, cause, .. } if peer_id == relay_id => {
                    return Outcome::Refused(format!("connection closed by the relay: {cause:?}"))
                }
                _ => {}
            }
        }
        Outcome::NoAnswer
    }

    /// Opens one circuit through `relay` to `dst` (which must listen on
    /// `<relay>/p2p-circuit`) and waits until the connection to `dst`
    /// over it is up or refused. An open circuit holds until this peer or
    /// `dst` is dropped.
    pub async fn dial_circuit(&mut self, relay: &Multiaddr, dst: PeerId) -> Outcome {
        let addr = relay
            .clone()
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(dst));
        let opts = DialOpts::peer_id(dst)
            .addresses(vec![addr])
            .condition(PeerCondition::Always)
            .build();
        let id = opts.connection_id();
        match self
            .call(move |s| s.dial(opts).map_err(|e| e.to_string()))
            .await
        {
            None => return Outcome::NoAnswer,
            Some(Err(e)) => return Outcome::Refused(e),
            Some(Ok(())) => {}
        }
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while let Some(e) = self.next_event(deadline).await {
            match e {
                SwarmEvent::ConnectionEstablished { connection_id, .. } if connection_id == id => {
                    return Outcome::Accepted
                }
                SwarmEvent::OutgoingConnectionError {
                    connection_id,
                    error,
                    ..
                } if connection_id == id => return Outcome::refusal(format!("{error:?}")),
                _ => {}
            }
        }
        Outcome::NoAnswer
    }

    /// Throws away the events queued so far (a destination's inbound
    /// circuits, which nobody reads).
    pub fn drain_events(&mut self) {
        while self.events.try_recv().is_ok() {}
    }
}

/// `identities` fresh identities, the i-th dialling from
/// `sources[i % sources.len()]`, each ask `relay` for one reservation,
/// `parallel` at a time. Returns what the relay answered and the peers
/// whose reservation was accepted (holding it until dropped); the others
/// are dropped at once.
pub async fn reserve_many(
    relay: &Multiaddr,
    sources: &[Ipv4Addr],
    identities: usize,
    parallel: usize,
) -> (Tally, Vec<RelayPeer>) {
    let mut tally = Tally::default();
    if sources.is_empty() {
        return (tally, Vec::new());
    }
    let attempts = futures::stream::iter(0..identities)
        .map(|i| async move {
            match RelayPeer::generate(sources[i % sources.len()]) {
                Ok(mut p) => {
                    let o = p.reserve(relay).await;
                    (o, Some(p))
                }
                Err(e) => (Outcome::Refused(e), None),
            }
        })
        .buffer_unordered(parallel.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut held = Vec::new();
    for (o, p) in attempts {
        tally.add(&o);
        if o == Outcome::Accepted {
            held.extend(p);
        }
    }
    (tally, held)
}

/// One identity asks `relay` for a reservation over `connections`
/// separate connections (one swarm each, the same key), one after the
/// other. Returns the answers and the peers holding an accepted one.
pub async fn reserve_one_identity(
    relay: &Multiaddr,
    source: Ipv4Addr,
    connections: usize,
) -> (Tally, Vec<RelayPeer>) {
    let key = Keypair::generate_ed25519();
    let mut tally = Tally::default();
    let mut held = Vec::new();
    for _ in 0..connections {
        let o = match RelayPeer::new(key.clone(), source) {
            Ok(mut p) => {
                let o = p.reserve(relay).await;
                if o == Outcome::Accepted {
                    held.push(p);
                }
                o
            }
            Err(e) => Outcome::Refused(e),
        };
        tally.add(&o);
    }
    (tally, held)
}

/// `src` (connected to `relay` first, so that every request shares one
/// connection) opens `n` circuits through `relay` to `dst`, one after the
/// other (libp2p's relay client and server each drop requests beyond 10
/// in flight on one connection, which would count as refusals here).
/// Accepted circuits stay open until `src` or `dst` is dropped.
pub async fn open_circuits(src: &mut RelayPeer, relay: &Multiaddr, dst: PeerId, n: usize) -> Tally {
    let mut tally = Tally::default();
    match src.connect(relay).await {
        Outcome::Accepted => {}
        o => {
            for _ in 0..n {
                tally.add(&o);
            }
            return tally;
        }
    }
    for _ in 0..n {
        tally.add(&src.dial_circuit(relay, dst).await);
    }
    tally
}

/// What a [`Flood`] did.
#[derive(Debug, Clone, Default)]
pub struct FloodTally {
    /// Fresh identities used (one connection each).
    pub identities: usize,
    /// Answers to their reservation requests.
    pub reservations: Tally,
    /// Answers to their circuit requests.
    pub circuits: Tally,
}

/// Fresh identities, `workers` at a time, each connecting to the relay,
/// asking for a reservation and for a circuit to a destination, then
/// disconnecting; round-robin over source addresses. Runs on the current
/// tokio runtime until [`Flood::stop`].
pub struct Flood {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<FloodTally>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    /// Starts it against `relay`, with circuits to `dst`.
    pub fn start(relay: &Multiaddr, dst: PeerId, sources: &[Ipv4Addr], workers: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(FloodTally::default()));
        let next = Arc::new(AtomicUsize::new(0));
        let sources: Arc<[Ipv4Addr]> = sources.into();
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (stop, tally, next, sources) =
                (stop.clone(), tally.clone(), next.clone(), sources.clone());
            let relay = relay.clone();
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) && !sources.is_empty() {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let mut peer = match RelayPeer::generate(sources[i % sources.len()]) {
                        Ok(p) => p,
                        Err(_) => {
                            tokio::time::sleep(FLOOD_BACKOFF).await;
                            continue;
                        }
                    };
                    let r = peer.reserve(&relay).await;
                    let c = peer.dial_circuit(&relay, dst).await;
                    drop(peer);
                    let unanswered = r == Outcome::NoAnswer || c == Outcome::NoAnswer;
                    if let Ok(mut t) = tally.lock() {
                        t.identities += 1;
                        t.reservations.add(&r);
                        t.circuits.add(&c);
                    }
                    if unanswered {
                        tokio::time::sleep(FLOOD_BACKOFF).await;
                    }
                }
            }));
        }
        Flood {
            stop,
            tally,
            workers: tasks,
        }
    }

    /// What it did so far.
    pub fn tally(&self) -> FloodTally {
        self.tally.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Stops it (every worker's peer is dropped) and says what it did.
    pub async fn stop(self) -> FloodTally {
        self.stop.store(true, Ordering::Relaxed);
        let tally = self.tally();
        for w in &self.workers {
            w.abort();
        }
        futures::future::join_all(self.workers).await;
        tally
    }
}
