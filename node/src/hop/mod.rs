//! The serving side of a chain (`/nakshatra/act/6`): a hop takes a
//! session's steps from upstream (the asker or the previous hop), runs its
//! range, and pushes the hidden states to the next hop — or, at the last
//! hop, samples and streams the token to the asker
//! (`/nakshatra/tokens/4`) and, in a ring ([`ring`]), feeds it to hop 1 as
//! the next step. A session whose chain broke is parked for a replacement
//! chain to resume ([`resume`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt, AsyncWriteExt};
use nakshatra_swarm::protocol::act::{
    tokens_from_bytes, tokens_to_bytes, ActFrame, ActReply, FailureReport, OpenSession,
    ReportError, StepHeader, StepKind, TokenFrame, ACT_PROTOCOL, MAX_HOPS, MAX_RING_EOG,
    TOKENS_PROTOCOL,
};
use nakshatra_swarm::{Handshake, PeerId, PeerQuota, Reopen, Stream, StreamProtocol};
use tokio::sync::{mpsc, Mutex};

pub mod resume;
pub mod ring;
mod sessions;

pub use resume::{Resumable, PARK_GRACE};
pub use ring::Rings;
pub use sessions::{SessionTable, SlotGuard, EVICT_WAIT, OPEN_QUEUE_WAIT, QUEUE_PER_SLOT};

use resume::{Held, History};

use crate::engine::service::{EngineService, OwnedInput, ServiceError, Shape};
use crate::engine::{EngineError, Sampler, SamplerSpec, StepOutput};
use crate::faults::Faults;
use crate::net::{
    decode_hidden, encode_hidden, handshake, read_frame_into, read_message, write_frame, FrameError,
};

/// How long a new activation stream may take to send its `Open`.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the rest of the chain may take to answer a forwarded `Open`
/// (each hop loads nothing: it opens a session and its own next stream).
pub const NEXT_HOP_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What every session handler of this node shares.
pub struct HopContext {
    /// The range, running.
    pub engine: EngineService,
    /// The swarm (streams, peers' addresses).
    pub swarm: nakshatra_swarm::Client,
    /// The model this node serves; an `Open` for another is refused.
    pub model_id: String,
    /// Test-only faults (a slow link).
    pub faults: Faults,
    /// Sessions idle this long are closed and their KV freed.
    pub idle_timeout: Duration,
    /// Each asker's share of this node's sessions (see
    /// [`sessions_per_asker`]).
    pub asker_quota: PeerQuota,
    /// This node's libp2p identity key: signs its failure reports.
    pub signer: ed25519_dalek::SigningKey,
    /// Its sessions and when each last had a step.
    pub sessions: Arc<SessionTable>,
    /// A session with no step for this long gives its slot up to a new
    /// `Open` that finds none free (see [`SessionTable`]).
    pub evict_idle_after: Duration,
    /// Sessions a replacement chain may resume (see [`resume`]).
    pub resumable: Arc<Resumable>,
    /// How long a session whose chain broke is kept for one.
    pub park_grace: Duration,
    /// Where each step's timings go (`--trace-steps`), if anywhere.
    pub trace: Option<Arc<crate::trace::StepTrace>>,
    /// Ring streams this node's sessions (as hop 1) wait for.
    pub rings: Arc<Rings>,
}

/// Sessions one asker may hold on a node with `max_sessions`: half of them
/// (at least one), so that one greedy asker cannot lock every other out.
pub fn sessions_per_asker(max_sessions: usize) -> usize {
    max_sessions.div_ceil(2).max(1)
}

/// Why a session ended badly. The message is what upstream hears in
/// `ActReply::Failed`.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The opener sent nothing in time.
    #[error("no open frame within {OPEN_TIMEOUT:?}")]
    NoOpen,
    /// The first frame was not `Open`.
    #[error("first frame is not Open")]
    NotOpen,
    /// The `Open` does not fit this node.
    #[error("{0}")]
    Refused(&'static str),
    /// The asker already holds its share of this node's sessions.
    #[error("asker {asker} already holds its share of this node's sessions ({share})")]
    AskerShare {
        /// The asker.
        asker: PeerId,
        /// Sessions one asker may hold here.
        share: usize,
    },
    /// The `Open` names another model.
    #[error("this node serves model {ours}, not {asked}")]
    OtherModel {
        /// This node's model.
        ours: String,
        /// The model asked for.
        asked: String,
    },
    /// The `Open` names another range for this hop.
    #[error("this node runs layers {}..{}, the chain asks for {}..{}", ours.0, ours.1, asked.0, asked.1)]
    OtherRange {
        /// This node's range.
        ours: (u32, u32),
        /// The range asked for.
        asked: (u32, u32),
    },
    /// The chain is longer than allowed.
    #[error("chain of {0} hops is too long")]
    TooLong(usize),
    /// The engine refused a session or a step.
    #[error(transparent)]
    Engine(#[from] ServiceError),
    /// The sampler could not be built or failed.
    #[error(transparent)]
    Sampler(#[from] EngineError),
    /// A later hop could not be set up (its own failure was relayed).
    #[error("hop {index} failed: {message}")]
    Downstream {
        /// The failing hop's index.
        index: u32,
        /// Its message.
        message: String,
    },
    /// No step and no `Close` for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// Idle for a while, and its slot was needed by a new session.
    #[error("evicted: idle for {0:?} or more while another session needed the slot")]
    Evicted(Duration),
    /// The upstream stream broke.
    #[error("upstream gone: {0}")]
    UpstreamGone(#[source] FrameError),
    /// A second `Open` on an open session.
    #[error("second Open on a session")]
    SecondOpen,
    /// A step's payload does not match its header or this hop's place.
    #[error("{0}")]
    BadStep(String),
    /// The next hop's stream broke.
    #[error("next hop: {0}")]
    NextHop(#[source] FrameError),
    /// The asker's token stream broke.
    #[error("asker gone: {0}")]
    AskerGone(#[source] FrameError),
    /// No token stream to the asker could be opened.
    #[error("token stream to the asker: {0}")]
    NoTokenStream(#[source] nakshatra_swarm::stream::OpenStreamError),
    /// A replacement chain took the session over.
    #[error("taken over by a replacement chain")]
    Preempted,
    /// The last hop's ring stream to hop 1 broke.
    #[error("ring stream to the first hop: {0}")]
    RingGone(#[source] FrameError),
    /// No ring stream to hop 1 could be opened.
    #[error("ring stream to the first hop: {0}")]
    NoRingStream(#[source] nakshatra_swarm::stream::OpenStreamError),
    /// The last hop fed hop 1 something it did not ask for (hop 1 blames
    /// the last hop).
    #[error("the last hop's ring: {0}")]
    BadRing(String),
}

impl SessionError {
    /// Whether the session is worth keeping for a replacement chain: its
    /// chain broke elsewhere (upstream, downstream or the asker's link),
    /// not through anything this hop refused or failed at.
    fn keeps_session(&self) -> bool {
        matches!(
            self,
            SessionError::UpstreamGone(_)
                | SessionError::NextHop(_)
                | SessionError::AskerGone(_)
                | SessionError::NoTokenStream(_)
                | SessionError::Downstream { .. }
                | SessionError::Preempted
        )
    }
}

/// Serves activation streams until the swarm stops, one task per session,
/// and the ring streams last hops open to this node's sessions
/// ([`ring`]). A peer holds at most as many activation streams as the node
/// has sessions.
pub fn spawn_servers(
    ctx: Arc<HopContext>,
) -> Result<Vec<nakshatra_swarm::Served>, nakshatra_swarm::stream::AlreadyRegistered> {
    let ring = ring::spawn_server(ctx.clone())?;
    let per_peer = ctx.engine.max_sessions();
    let swarm = ctx.swarm.clone();
    let act = swarm.serve_protocol(
        StreamProtocol::new(ACT_PROTOCOL),
        per_peer,
        move |peer, stream| {
            let c = ctx.clone();
            async move {
                if let Err(e) = serve_session(c, peer, stream).await {
                    tracing::debug!(%peer, "session ended: {e}");
                }
            }
        },
    )?;
    Ok(vec![act, ring])
}

/// This hop's signed report of `e`: blaming the next hop for what
/// happened on the link to it, itself for everything else.
fn failed(ctx: &HopContext, open: &OpenSession, e: &SessionError) -> ActReply {
    let blamed = match e {
        SessionError::NextHop(_) => open.index + 1,
        SessionError::BadRing(_) => open.hops.len().saturating_sub(1) as u32,
        _ => open.index,
    };
    let busy = matches!(
        e,
        SessionError::AskerShare { .. }
            | SessionError::Engine(ServiceError::Engine(EngineError::Busy(_)))
    );
    ActReply::Failed(FailureReport::sign_kind(
        &ctx.signer,
        open.session,
        open.index,
        blamed,
        busy,
        e.to_string(),
    ))
}

/// A failure report signed by this hop (hop `open.index`).
fn report(
    signer: &ed25519_dalek::SigningKey,
    open: &OpenSession,
    blamed: u32,
    message: String,
) -> ActReply {
    ActReply::Failed(FailureReport::sign(
        signer,
        open.session,
        open.index,
        blamed,
        message,
    ))
}

/// A reply that came up from the next hop, checked before it is relayed:
/// a failure report must be signed by a hop after this one and blame only
/// what its signer can show. One that is not is replaced by this hop's
/// own report blaming the next hop (which sent it).
fn checked_from_next(
    signer: &ed25519_dalek::SigningKey,
    open: &OpenSession,
    r: ActReply,
) -> ActReply {
    let ActReply::Failed(f) = &r else { return r };
    let check = if f.reporter <= open.index {
        Err(ReportError::NoSuchReporter(f.reporter))
    } else {
        f.check(open.session, &open.hops)
    };
    match check {
        Ok(()) => r,
        Err(e) => report(
            signer,
            open,
            open.index + 1,
            format!("the next hop sent a failure report that does not check: {e}"),
        ),
    }
}

/// Checks an `Open` that `upstream` sent: the chain is well formed, this
/// hop is where the chain says, and `upstream` is who the chain says opens
/// this hop (the asker for hop 1, the previous hop after that), so that a
/// session is counted against the asker who really asked.
fn check_open(ctx: &HopContext, upstream: &PeerId, o: &OpenSession) -> Result<(), SessionError> {
    let l = ctx.engine.layout();
    if o.hops.len() > MAX_HOPS {
        return Err(SessionError::TooLong(o.hops.len()));
    }
    check_chain(o, l.n_layers_total)?;
    let opener = match o.index.checked_sub(1) {
        None => o.asker.as_str(),
        Some(prev) => o
            .hops
            .get(prev as usize)
            .map(|h| h.peer_id.as_str())
            .unwrap_or_default(),
    };
    if opener != upstream.to_string() {
        return Err(SessionError::Refused(
            "the session was opened by another peer than the chain names",
        ));
    }
    let me = o
        .hops
        .get(o.index as usize)
        .ok_or(SessionError::Refused("hop index outside the chain"))?;
    if o.model_id != ctx.model_id {
        return Err(SessionError::OtherModel {
            ours: ctx.model_id.clone(),
            asked: o.model_id.clone(),
        });
    }
    if me.peer_id != ctx.swarm.peer_id().to_string() {
        return Err(SessionError::Refused(
            "the chain names another peer at this hop",
        ));
    }
    if me.start != l.start || me.end != l.end {
        return Err(SessionError::OtherRange {
            ours: (l.start, l.end),
            asked: (me.start, me.end),
        });
    }
    let sm = &o.sampling;
    if !sm.temperature.is_finite() || !(0.0..=1.0).contains(&sm.top_p) {
        return Err(SessionError::Refused(
            "sampling parameters out of range (temperature must be finite, top_p in 0..=1)",
        ));
    }
    if o.ring.as_ref().is_some_and(|r| r.eog.len() > MAX_RING_EOG) {
        return Err(SessionError::Refused(
            "a ring names more than MAX_RING_EOG end tokens",
        ));
    }
    let is_last = o.index as usize + 1 == o.hops.len();
    if is_last != l.is_last() {
        return Err(SessionError::Refused(
            "the chain does not end where the model ends",
        ));
    }
    Ok(())
}

/// A chain covers the model once: ranges join up from layer 0 to the
/// model's end, each hop a different peer.
fn check_chain(o: &OpenSession, n_layers: u32) -> Result<(), SessionError> {
    let mut at = 0;
    let mut peers = std::collections::HashSet::new();
    for h in &o.hops {
        if h.start != at || h.end <= h.start {
            return Err(SessionError::Refused("the chain's ranges do not join up"));
        }
        if !peers.insert(h.peer_id.as_str()) {
            return Err(SessionError::Refused("the chain names a peer twice"));
        }
        at = h.end;
    }
    if at != n_layers {
        return Err(SessionError::Refused(
            "the chain does not end where the model ends",
        ));
    }
    Ok(())
}

/// A task that ends when its owner is dropped (a session's relay of
/// downstream replies lives no longer than the session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where a session's results go.
enum Downstream {
    /// The next hop's activation stream, and the task relaying its
    /// replies upstream.
    Hop(WriteHalf<Stream>, AbortOnDrop),
    /// The asker's token stream (last hop), the session's sampler, and
    /// where the ring feeds hop 1 if the session rings.
    Asker(Stream, Box<Sampler>, Option<Box<RingOut>>),
}

/// Where the last hop feeds the ring's next step.
enum RingOut {
    /// The ring stream to hop 1.
    Stream(Stream),
    /// Itself: the only hop of a one-hop chain, whose session reads the
    /// other end of this channel as its ring.
    Local(mpsc::Sender<ring::Incoming>),
}

/// The write half of the upstream stream, shared with the task that
/// relays downstream failures.
type Upstream = Arc<Mutex<WriteHalf<Stream>>>;

async fn reply(up: &Upstream, r: &ActReply) {
    let mut w = up.lock().await;
    if let Err(e) = write_frame(&mut *w, r, &[]).await {
        tracing::debug!("cannot reply upstream: {e}");
    }
}

/// Sets up the rest of the chain from this hop: returns where results go,
/// what the hops after this one kept of the session and whether the ring
/// is up (see [`ActReply::Ready`]). `Err` is the reply to send upstream.
async fn connect_downstream(
    ctx: &HopContext,
    open: &OpenSession,
    up: &Upstream,
    local_ring: Option<mpsc::Sender<ring::Incoming>>,
) -> Result<(Downstream, Vec<u32>, bool), ActReply> {
    let index = open.index;
    if (index as usize) + 1 == open.hops.len() {
        return match to_asker(ctx, open, local_ring).await {
            Ok(d) => {
                let ring = matches!(&d, Downstream::Asker(_, _, Some(_)));
                Ok((d, Vec::new(), ring))
            }
            Err(e) => Err(failed(ctx, open, &e)),
        };
    }
    let next = &open.hops[index as usize + 1];
    let fail_next = |message: String| report(&ctx.signer, open, index + 1, message);
    let peer: PeerId = next
        .peer_id
        .parse()
        .map_err(|_| fail_next(format!("bad peer id {}", next.peer_id)))?;
    // The addresses in the `Open` are the asker's word: not dialled. A
    // next hop this node is not connected to yet is reached at the
    // addresses its own signed record gives (and only those on networks
    // this node is on: see the swarm's address scope).
    if !ctx.swarm.is_connected(peer).await {
        if let Err(e) = ctx.swarm.server_info(peer).await {
            tracing::debug!(%peer, "next hop's record: {e}");
        }
    }
    let mut fwd = open.clone();
    fwd.index = index + 1;
    let fwd = &fwd;
    let proto = StreamProtocol::new(ACT_PROTOCOL);
    let opened = ctx
        .swarm
        .open_link_with(peer, proto, Reopen::DEFAULT, open.direct, |s| async move {
            let (mut r, mut w) = s.split();
            write_frame(&mut w, &ActFrame::Open(fwd.clone()), &[])
                .await
                .map_err(handshake)?;
            match tokio::time::timeout(NEXT_HOP_READY_TIMEOUT, read_message::<_, ActReply>(&mut r))
                .await
            {
                Ok(Ok(first)) => Ok((r, w, first)),
                Ok(Err(e)) => Err(handshake(e)),
                Err(_) => Err(Handshake::Failed(FrameError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {NEXT_HOP_READY_TIMEOUT:?}"),
                )))),
            }
        })
        .await;
    let (mut down_r, down_w, first) = opened.map_err(|e| fail_next(e.to_string()))?;
    let (mut kept, ring) = match first {
        ActReply::Ready { kept, ring } => (kept, ring),
        other => return Err(checked_from_next(&ctx.signer, open, other)),
    };
    // One entry per later hop (informational: a wrong list misleads
    // nobody but the asker's report).
    kept.resize(open.hops.len() - index as usize - 1, 0);
    // Later replies from downstream (failures) are checked and relayed
    // upstream, for as long as the session lasts. The next hop's stream
    // ending while the session lives means the next hop is gone: said at
    // once (the asker may be waiting on a step that will never come).
    let up = up.clone();
    let (signer, open) = (ctx.signer.clone(), open.clone());
    let relay = tokio::spawn(async move {
        let e = loop {
            match read_message::<_, ActReply>(&mut down_r).await {
                Ok(r) => reply(&up, &checked_from_next(&signer, &open, r)).await,
                Err(e) => break e,
            }
        };
        let gone = format!("the next hop's stream ended: {e}");
        reply(&up, &report(&signer, &open, open.index + 1, gone)).await;
    });
    Ok((Downstream::Hop(down_w, AbortOnDrop(relay)), kept, ring))
}

/// The last hop's token stream back to the asker, over the connection the
/// asker has to it, the session's sampler, and the ring's way to hop 1
/// (`local_ring` when this hop is hop 1 too).
async fn to_asker(
    ctx: &HopContext,
    open: &OpenSession,
    local_ring: Option<mpsc::Sender<ring::Incoming>>,
) -> Result<Downstream, SessionError> {
    let spec = SamplerSpec {
        temperature: open.sampling.temperature,
        top_k: open.sampling.top_k,
        top_p: open.sampling.top_p,
        seed: open.sampling.seed,
    };
    let sampler = Sampler::new(&spec)?;
    let asker: PeerId = open
        .asker
        .parse()
        .map_err(|_| SessionError::Refused("the asker's peer id does not parse"))?;
    let hello = TokenFrame::Hello {
        session: open.session,
    };
    let s = open_with_hello(ctx, asker, TOKENS_PROTOCOL, open.direct, &hello)
        .await
        .map_err(|e| match e {
            nakshatra_swarm::OpenError::Handshake(e) => SessionError::AskerGone(e),
            nakshatra_swarm::OpenError::Open(e) => SessionError::NoTokenStream(e),
        })?;
    // The ring's stream, before `Ready` goes up (which says whether it is
    // open): the asker's first step may ring. A last hop that cannot
    // reach hop 1 still serves the session, the asker driving every step.
    let ring = match (&open.ring, local_ring) {
        (Some(_), Some(tx)) => Some(Box::new(RingOut::Local(tx))),
        (Some(_), None) => match ring::open(ctx, open).await {
            Ok(s) => Some(Box::new(RingOut::Stream(s))),
            Err(e) => {
                tracing::warn!(session = open.session, "no ring: {e}");
                None
            }
        },
        (None, _) => None,
    };
    Ok(Downstream::Asker(s, Box::new(sampler), ring))
}

/// A stream of `protocol` to `peer` on the session's kind of link
/// (`direct`), its first frame `hello` written. A write into a stream the
/// peer dropped at open fails and is retried on a fresh one
/// ([`Reopen::DEFAULT`]).
async fn open_with_hello<H: serde::Serialize + Sync>(
    ctx: &HopContext,
    peer: PeerId,
    protocol: &'static str,
    direct: bool,
    hello: &H,
) -> Result<Stream, nakshatra_swarm::OpenError<FrameError>> {
    ctx.swarm
        .open_link_with(
            peer,
            StreamProtocol::new(protocol),
            Reopen::DEFAULT,
            direct,
            |mut s| async move {
                write_frame(&mut s, hello, &[])
                    .await
                    .map_err(Handshake::Dropped)?;
                Ok(s)
            },
        )
        .await
}

async fn serve_session(
    ctx: Arc<HopContext>,
    peer: PeerId,
    stream: Stream,
) -> Result<(), SessionError> {
    let (mut up_r, up_w) = stream.split();
    let up: Upstream = Arc::new(Mutex::new(up_w));
    let first: ActFrame = tokio::time::timeout(OPEN_TIMEOUT, read_message(&mut up_r))
        .await
        .map_err(|_| SessionError::NoOpen)?
        .map_err(SessionError::UpstreamGone)?;
    let ActFrame::Open(open) = first else {
        return Err(SessionError::NotOpen);
    };
    let index = open.index;
    let (key, mut held) = match admit(&ctx, &peer, &open).await {
        Ok(s) => s,
        Err(e) => {
            reply(&up, &failed(&ctx, &open, &e)).await;
            return Err(e);
        }
    };
    let (live, preempt) = ctx.resumable.live(key);
    tracing::debug!(%peer, session = open.session, index, kept = held.pos, "session open");
    // Hop 1 of a ring waits for the last hop's stream, which the last hop
    // opens while the chain is set up below.
    let last = open
        .hops
        .last()
        .and_then(|h| h.peer_id.parse::<PeerId>().ok());
    // The only hop of a one-hop chain feeds itself through a channel.
    let (frames, local_ring) = match (&open.ring, last) {
        (Some(_), Some(last)) if index == 0 => {
            let cps = ctx.engine.ctx_per_session();
            let limit = move |f: &ActFrame| first_hop_payload(f, cps);
            let (up, up_task) = ring::spawn_reader(up_r, limit);
            let (ring, local) = if open.hops.len() == 1 {
                let (tx, rx) = mpsc::channel(ring::READ_AHEAD);
                (RingIn::Reading { rx, _task: None }, Some(tx))
            } else {
                (RingIn::Waiting(ctx.rings.expect(key, last)), None)
            };
            let frames = Frames::Ring {
                up,
                _up_task: up_task,
                ring,
                next: None,
            };
            (frames, local)
        }
        _ => (Frames::Upstream(up_r), None),
    };
    let r = match connect_downstream(&ctx, &open, &up, local_ring).await {
        Ok((mut down, mut kept, ring)) => {
            kept.insert(0, held.pos);
            reply(&up, &ActReply::Ready { kept, ring }).await;
            let r = run_steps(&ctx, &open, &mut held, preempt, frames, &up, &mut down).await;
            let keep = r.as_ref().err().is_some_and(SessionError::keeps_session);
            held.linger = close_downstream(down, r.as_ref().err(), keep).await;
            r
        }
        Err(f) => {
            reply(&up, &f).await;
            Err(match f {
                ActReply::Failed(r) => SessionError::Downstream {
                    index: r.blamed,
                    message: r.message,
                },
                ActReply::Ready { .. } => {
                    SessionError::Refused("the next hop answered out of turn")
                }
            })
        }
    };
    drop(live);
    let keep = r.as_ref().err().is_some_and(SessionError::keeps_session);
    if keep && held.pos > 0 {
        let grace = ctx.park_grace.min(ctx.idle_timeout);
        let (engine, sessions) = (ctx.engine.clone(), &ctx.sessions);
        ctx.resumable.park(key, held, grace, engine, sessions);
    } else {
        let _ = ctx.engine.close(held.id).await;
        ctx.sessions.slot_freed();
        tracing::debug!(session = open.session, "session closed");
    }
    if let Some(t) = &ctx.trace {
        t.flush();
    }
    r
}

/// Checks the `Open`, then resumes the session if this hop holds it from
/// a chain that broke (same asker, same sampling), else takes one of the
/// asker's share of sessions and opens a fresh engine session; the permit
/// is held for the session's life.
async fn admit(
    ctx: &HopContext,
    upstream: &PeerId,
    open: &OpenSession,
) -> Result<(resume::Key, Held), SessionError> {
    check_open(ctx, upstream, open)?;
    let asker: PeerId = open
        .asker
        .parse()
        .map_err(|_| SessionError::Refused("the asker's peer id does not parse"))?;
    let key = (asker, open.session);
    if let Some(held) = ctx.resumable.take(key).await {
        if held.sampling == open.sampling {
            // The old token stream goes: this chain opens its own.
            let mut held = held;
            held.linger = None;
            tracing::info!(
                session = open.session,
                kept = held.pos,
                "session resumed: positions kept from the chain that broke"
            );
            return Ok((key, held));
        }
        let _ = ctx.engine.close(held.id).await;
        ctx.sessions.slot_freed();
    }
    let permit = ctx
        .asker_quota
        .try_acquire(asker)
        .ok_or(SessionError::AskerShare {
            asker,
            share: sessions_per_asker(ctx.engine.max_sessions()),
        })?;
    let engine = &ctx.engine;
    let free = || engine.free_sessions() > 0;
    if !free() {
        // An evicted session's task closes it: its slot comes within
        // EVICT_WAIT. Else the `Open` queues for a slot (bounded), and
        // says "busy" when none frees in time.
        let (wait, queue) = if ctx.sessions.evict_idlest(ctx.evict_idle_after) {
            (EVICT_WAIT, usize::MAX)
        } else {
            (OPEN_QUEUE_WAIT, QUEUE_PER_SLOT * engine.max_sessions())
        };
        ctx.sessions.wait_for_slot(free, wait, queue).await;
    }
    let id = ctx.engine.open().await?;
    let l = ctx.engine.layout();
    let history = History::new((!l.is_last()).then_some(l.n_embd as usize));
    let held = Held {
        id,
        permit,
        pos: 0,
        history,
        sampling: open.sampling,
        linger: None,
    };
    Ok((key, held))
}

/// Ends the session downstream: `Close` to the next hop (just the end of
/// the stream when the session is `kept` for a replacement chain: the
/// next hop keeps its part too), or the failure (if any) to the asker.
/// The token stream of a `kept` session is returned, open (see
/// [`Held::linger`]).
async fn close_downstream(
    down: Downstream,
    error: Option<&SessionError>,
    kept: bool,
) -> Option<Stream> {
    match down {
        Downstream::Hop(mut w, relay) => {
            // The session ends here: its relay first, so that the next
            // hop closing its stream is not taken for a failure.
            drop(relay);
            if !kept {
                let _ = write_frame(&mut w, &ActFrame::Close, &[]).await;
            }
            let _ = w.close().await;
            None
        }
        Downstream::Asker(s, _, _) if kept => Some(s),
        Downstream::Asker(mut s, _, _) => {
            // Upstream gone is not this hop's failure, and the hop before
            // reports its next hop itself: the stream just ends.
            if let Some(e) = error.filter(|e| !matches!(e, SessionError::UpstreamGone(_))) {
                let f = TokenFrame::Failed {
                    message: e.to_string(),
                };
                let _ = write_frame(&mut s, &f, &[]).await;
            }
            let _ = s.close().await;
            None
        }
    }
}

/// Where a session's frames come from.
enum Frames {
    /// Upstream's stream, read in place (every session but hop 1's in a
    /// ring: the step's path has no task hand-off).
    Upstream(ReadHalf<Stream>),
    /// Hop 1 of a ring: upstream's frames and the last hop's, each read by
    /// a task of its own ([`ring::spawn_reader`]), so that waiting on both
    /// never drops a half-read frame.
    Ring {
        /// Upstream's frames.
        up: mpsc::Receiver<ring::Incoming>,
        /// The task reading them.
        _up_task: AbortOnDrop,
        /// The last hop's.
        ring: RingIn,
        /// The step and position the last hop's next frame must have: the
        /// step after the last one run that rang (`None`: none may come).
        next: Option<(u64, u32)>,
    },
}

/// Hop 1's ring stream.
enum RingIn {
    /// Not opened by the last hop yet.
    Waiting(ring::Expected),
    /// Read by a task (none for a one-hop chain's own channel).
    Reading {
        /// Its frames.
        rx: mpsc::Receiver<ring::Incoming>,
        /// The task.
        _task: Option<AbortOnDrop>,
    },
    /// Ended (the last hop's session ended, or its link broke: the hops
    /// on the chain's path report that themselves).
    Ended,
}

/// Who sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Upstream,
    Ring,
}

impl Frames {
    /// The next frame (its payload in `payload`), and who sent it.
    async fn next(
        &mut self,
        payload: &mut Vec<u8>,
        limit: impl FnOnce(&ActFrame) -> usize,
    ) -> (Origin, Result<(ActFrame, usize), FrameError>) {
        let (up, ring) = match self {
            Frames::Upstream(r) => {
                return (Origin::Upstream, read_frame_into(r, payload, limit).await);
            }
            Frames::Ring { up, ring, .. } => (up, ring),
        };
        let taken = |item: Option<ring::Incoming>, payload: &mut Vec<u8>| match item {
            Some(Ok((frame, bytes))) => {
                *payload = bytes;
                Ok((frame, payload.len()))
            }
            Some(Err(e)) => Err(e),
            None => Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        };
        loop {
            enum Got {
                Up(Option<ring::Incoming>),
                Opened(Option<Stream>),
                Ring(Option<ring::Incoming>),
            }
            let got = match ring {
                RingIn::Waiting(expected) => tokio::select! {
                    item = up.recv() => Got::Up(item),
                    s = &mut expected.rx => Got::Opened(s.ok()),
                },
                RingIn::Reading { rx, .. } => tokio::select! {
                    item = up.recv() => Got::Up(item),
                    item = rx.recv() => Got::Ring(item),
                },
                RingIn::Ended => Got::Up(up.recv().await),
            };
            match got {
                Got::Up(item) => return (Origin::Upstream, taken(item, payload)),
                Got::Opened(Some(s)) => {
                    let limit = |f: &ActFrame| match f {
                        ActFrame::Step(h) if h.n_tokens == 1 => std::mem::size_of::<i32>(),
                        _ => 0,
                    };
                    let (rx, task) = ring::spawn_reader(ring::read_half(s), limit);
                    *ring = RingIn::Reading {
                        rx,
                        _task: Some(task),
                    };
                }
                Got::Opened(None) => *ring = RingIn::Ended,
                Got::Ring(Some(Ok((frame, bytes)))) => {
                    *payload = bytes;
                    return (Origin::Ring, Ok((frame, payload.len())));
                }
                Got::Ring(end) => {
                    if let Some(Err(e)) = end {
                        tracing::debug!("ring stream ended: {e}");
                    }
                    *ring = RingIn::Ended;
                }
            }
        }
    }

    /// Checks a frame the last hop fed: the one-token step after the last
    /// one run that rang, at the position after it.
    fn check_ring(&self, frame: &ActFrame, max_steps: u64) -> Result<(), SessionError> {
        let Frames::Ring { next, .. } = self else {
            return Err(SessionError::BadRing("no ring on this session".into()));
        };
        let ActFrame::Step(h) = frame else {
            return Err(SessionError::BadRing("a frame that is not a step".into()));
        };
        let want = *next;
        let ok = h.ring
            && h.kind == StepKind::Tokens
            && h.n_tokens == 1
            && h.draft.is_empty()
            && h.step < max_steps
            && want == Some((h.step, h.pos));
        if ok {
            Ok(())
        } else {
            Err(SessionError::BadRing(format!(
                "step {} at {} ({} tokens, ring {}), expected {want:?}",
                h.step, h.pos, h.n_tokens, h.ring
            )))
        }
    }

    /// Notes a step run (`(step, end, rang)`: its number, the position
    /// after its input, whether it rang): the last hop's next frame is the
    /// step after it if it rang.
    fn ran(&mut self, (step, end, rang): (u64, u32, bool)) {
        if let Frames::Ring { next, .. } = self {
            *next = rang.then(|| (step.saturating_add(1), end));
        }
    }
}

/// The payload a frame from upstream may carry at hop 1: a step's tokens
/// (i32), at most a context's worth (`ctx_per_session`).
fn first_hop_payload(frame: &ActFrame, ctx_per_session: u32) -> usize {
    let ActFrame::Step(h) = frame else { return 0 };
    (h.n_tokens.min(ctx_per_session) as usize).saturating_mul(std::mem::size_of::<i32>())
}

/// Runs the session's steps until `Close`; a failing step is reported
/// upstream (`ActReply::Failed`) and ends the session.
async fn run_steps(
    ctx: &HopContext,
    open: &OpenSession,
    held: &mut Held,
    mut preempt: tokio::sync::oneshot::Receiver<()>,
    mut frames: Frames,
    up: &Upstream,
    down: &mut Downstream,
) -> Result<(), SessionError> {
    let mut payload = Vec::new();
    let (slot, mut evicted) = ctx.sessions.register();
    let max_steps = open.ring.as_ref().map_or(0, |r| r.max_steps);
    loop {
        let limit = |f: &ActFrame| step_bytes(ctx, open, f);
        let frame = tokio::select! {
            f = tokio::time::timeout(ctx.idle_timeout, frames.next(&mut payload, limit)) => f,
            Ok(()) = &mut evicted => {
                // Upstream hears why (it may still be there, just idle).
                let e = SessionError::Evicted(ctx.evict_idle_after);
                reply(up, &failed(ctx, open, &e)).await;
                return Err(e);
            }
            // A replacement chain resumes the session: this stream's
            // chain is over (its asker gave up on it).
            Ok(()) = &mut preempt => return Err(SessionError::Preempted),
        };
        let (frame, n, over_link) = match frame {
            Err(_) => {
                let e = SessionError::Idle(ctx.idle_timeout);
                reply(up, &failed(ctx, open, &e)).await;
                return Err(e);
            }
            Ok((_, Err(e))) => return Err(SessionError::UpstreamGone(e)),
            Ok((Origin::Ring, Ok((f, n)))) => {
                if let Err(e) = frames.check_ring(&f, max_steps) {
                    reply(up, &failed(ctx, open, &e)).await;
                    return Err(e);
                }
                // A one-hop chain feeds itself over no link.
                (f, n, open.hops.len() > 1)
            }
            Ok((Origin::Upstream, Ok((f, n)))) => (f, n, true),
        };
        let frame_in = ctx.trace.as_ref().map_or(0, |_| crate::trace::now_us());
        slot.touch();
        let payload = payload.get(..n).unwrap_or_default();
        if over_link {
            ctx.faults.link_delay().await;
        }
        let h = match frame {
            ActFrame::Close => return Ok(()),
            ActFrame::Open(_) => return Err(SessionError::SecondOpen),
            ActFrame::Step(h) => h,
        };
        if let Some(forged) = ctx.faults.forged_blame(open, h.step) {
            reply(up, &forged).await;
            return Err(SessionError::Refused(
                "fault injection: forged a failure report",
            ));
        }
        if matches!(down, Downstream::Hop(..)) && ctx.faults.breaks_next_link(h.step) {
            let gone = "the next hop's stream ended: broken by fault injection".to_string();
            reply(up, &report(&ctx.signer, open, open.index + 1, gone)).await;
            // Kept for a replacement chain, as after a real link break.
            return Err(SessionError::NextHop(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "fault injection: broke the link to the next hop",
            ))));
        }
        let ran = (
            h.step,
            h.pos.saturating_add(h.n_tokens),
            h.ring && h.draft.is_empty(),
        );
        match step(ctx, open, held, h, payload, down, frame_in).await {
            Ok(()) => frames.ran(ran),
            // The asker is gone: nobody upstream to tell.
            Err(e @ SessionError::AskerGone(_)) => return Err(e),
            Err(e) => {
                reply(up, &failed(ctx, open, &e)).await;
                return Err(e);
            }
        }
    }
}

/// The payload a frame from upstream may carry: a step's tokens (i32) at
/// the first hop, its hidden states (`n_embd` wide, in the session's wire
/// encoding) later, for at most a context's worth of tokens; nothing for
/// any other frame. A longer payload is refused before it is read.
fn step_bytes(ctx: &HopContext, open: &OpenSession, frame: &ActFrame) -> usize {
    let ActFrame::Step(h) = frame else { return 0 };
    let per_token = if open.index == 0 {
        std::mem::size_of::<i32>()
    } else {
        ctx.engine.layout().n_embd as usize * open.wire.size()
    };
    let n_tokens = h.n_tokens.min(ctx.engine.ctx_per_session()) as usize;
    n_tokens.saturating_mul(per_token)
}

/// One step: checks the input against the header and this hop's place;
/// a step inside what the session holds is answered from its history
/// ([`replayed`]); otherwise rolls the session back when the step
/// restarts earlier, runs the range, and sends the result on. With a step
/// trace, its stages are written there (`frame_in`: when its frame was
/// read).
async fn step(
    ctx: &HopContext,
    open: &OpenSession,
    held: &mut Held,
    h: StepHeader,
    payload: &[u8],
    down: &mut Downstream,
    frame_in: u64,
) -> Result<(), SessionError> {
    let tracing_steps = ctx.trace.is_some();
    let now = || {
        if tracing_steps {
            crate::trace::now_us()
        } else {
            0
        }
    };
    let n_embd = ctx.engine.layout().n_embd as usize;
    let bad = |m: &str| SessionError::BadStep(m.to_string());
    let input = match (h.kind, open.index) {
        (StepKind::Tokens, 0) => match tokens_from_bytes(payload) {
            Some(t) if t.len() == h.n_tokens as usize => OwnedInput::Tokens(t),
            _ => return Err(bad("token payload does not match n_tokens")),
        },
        (StepKind::Hidden, i) if i > 0 => match decode_hidden(payload, open.wire) {
            Some(v) if v.len() == h.n_tokens as usize * n_embd => OwnedInput::Hidden(v),
            _ => return Err(bad("hidden payload does not match n_tokens × n_embd")),
        },
        _ => return Err(bad("wrong payload kind for this hop")),
    };
    if !h.draft_fits() {
        return Err(bad("the draft does not fit the step"));
    }
    if let OwnedInput::Tokens(t) = &input {
        if !t.ends_with(&h.draft) {
            return Err(bad("the drafted tokens are not the step's last tokens"));
        }
    }
    let decoded = now();
    let end = h.pos.saturating_add(h.n_tokens);
    // Whatever precedes this step is the chain's own: drafts it starts
    // past were accepted.
    held.history.confirm(h.pos);
    if h.draft.is_empty() && end <= held.pos && replayed(ctx, open, &held.history, &h, down).await?
    {
        return Ok(());
    }
    // A step may restart from an earlier position (a retry, a replay, or
    // the step after a speculative one whose drafts were not all
    // accepted): drop what is past it first, so nothing is applied twice.
    if h.pos < held.pos {
        ctx.engine.truncate(held.id, h.pos).await?;
        held.history.truncate(h.pos);
        held.pos = h.pos;
    } else if h.pos > held.pos {
        return Err(SessionError::BadStep(format!(
            "step {} starts at {} but the session holds {}",
            h.step, h.pos, held.pos
        )));
    }
    let t0 = Instant::now();
    ctx.faults.step_delay().await;
    // Every step after the prefill stands for one-token steps (a decode,
    // a verify of drafts, a replay of decoded tokens), and must give what
    // they give.
    let shape = Shape {
        rows: h.rows(),
        singles: h.step > 0,
    };
    let (out, picked) = ctx.engine.forward_timed(held.id, input, shape).await?;
    let resumed = now();
    let compute_us = h.compute_us + t0.elapsed().as_micros() as u64;
    held.pos += h.n_tokens;
    // The step's result sent on (`sent`), when it was encoded or sampled,
    // and when its frames were written (the last hop's digests follow
    // them, off the step's path).
    let (sent, encoded, written) = match (out, down) {
        (StepOutput::Hidden(mut hidden), Downstream::Hop(w, _)) => {
            ctx.faults.corrupt_output(&mut hidden);
            held.history.record_hidden(h.pos, &hidden, h.draft.len());
            let next = StepHeader {
                kind: StepKind::Hidden,
                compute_us,
                ..h.clone()
            };
            let bytes = encode_hidden(&hidden, open.wire);
            let encoded = now();
            let sent = write_frame(w, &ActFrame::Step(next), &bytes)
                .await
                .map_err(SessionError::NextHop);
            (sent, encoded, now())
        }
        (StepOutput::Logits(mut logits), Downstream::Asker(s, sampler, ring)) => {
            ctx.faults.corrupt_output(&mut logits);
            let n_vocab = ctx.engine.n_vocab();
            if logits.len() != h.rows() * n_vocab {
                return Err(bad("the engine returned the wrong number of logits"));
            }
            // The token of each drafted position and of the one before,
            // as one-token steps would sample them, up to the first that
            // is not the draft's.
            let mut tokens = Vec::with_capacity(h.rows());
            let rows = logits.chunks_exact(n_vocab.max(1));
            for (i, row) in rows.clone().enumerate() {
                let token = sampler.sample(row, h.step + i as u64)?;
                tokens.push(token);
                if h.draft.get(i) != Some(&token) {
                    break;
                }
            }
            let frames: Vec<TokenFrame> = (h.step..)
                .zip(&tokens)
                .map(|(step, &token)| TokenFrame::Token {
                    step,
                    token,
                    compute_us,
                })
                .collect();
            // The ring's next step first: it is on the decode's path, the
            // asker's token is not.
            if let Some(&token) = tokens.first() {
                feed_ring(ctx, open, &h, end, token, ring.as_deref_mut()).await?;
            }
            let encoded = now();
            ctx.faults.link_delay().await;
            let mut sent = write_frames(s, &frames).await;
            // Then the digests, off the step's path: the asker already
            // has its tokens.
            let written = now();
            let first_end = end - h.rows() as u32 + 1;
            let mut digests = Vec::with_capacity(tokens.len());
            for ((step, at), (row, &token)) in (h.step..).zip(first_end..).zip(rows.zip(&tokens)) {
                let digest = crate::engine::logits_digest(row);
                held.history.record_token(at, token, digest);
                digests.push(TokenFrame::Digest { step, digest });
            }
            if sent.is_ok() {
                sent = write_frames(s, &digests).await;
            }
            (sent, encoded, written)
        }
        _ => return Err(bad("engine output does not match this hop's place")),
    };
    if let Some(trace) = &ctx.trace {
        let times = crate::trace::HopTimes {
            input: frame_in,
            decoded,
            picked: picked.at,
            computed: picked.done,
            resumed,
            encoded,
            sent: written,
        };
        trace.hop(open.session, h.step, h.n_tokens, open.index, &times);
    }
    sent
}

/// At the last hop of a ring, after step `h` (input ending at `end`)
/// sampled `token`: sends hop 1 the next step, unless the step did not
/// ring or the generation ends here ([`ring::feeds`]).
async fn feed_ring(
    ctx: &HopContext,
    open: &OpenSession,
    h: &StepHeader,
    end: u32,
    token: i32,
    ring: Option<&mut RingOut>,
) -> Result<(), SessionError> {
    let (Some(spec), Some(out)) = (&open.ring, ring) else {
        return Ok(());
    };
    if !h.ring || !h.draft.is_empty() || !ring::feeds(spec, h.step, end, token) {
        return Ok(());
    }
    let next = StepHeader {
        step: h.step + 1,
        pos: ctx.faults.ring_pos(end),
        n_tokens: 1,
        kind: StepKind::Tokens,
        compute_us: 0,
        draft: Vec::new(),
        ring: true,
    };
    let payload = tokens_to_bytes(&[token]);
    match out {
        RingOut::Stream(w) => write_frame(w, &ActFrame::Step(next), &payload)
            .await
            .map_err(SessionError::RingGone),
        // One step is fed at a time and read before the next is computed:
        // the channel is never full; closed, the session is ending.
        RingOut::Local(tx) => tx
            .try_send(Ok((ActFrame::Step(next), payload)))
            .map_err(|_| {
                SessionError::RingGone(FrameError::Io(std::io::ErrorKind::BrokenPipe.into()))
            }),
    }
}

/// Writes token frames to the asker, each flushed as it goes.
async fn write_frames(s: &mut Stream, frames: &[TokenFrame]) -> Result<(), SessionError> {
    for t in frames {
        write_frame(s, t, &[])
            .await
            .map_err(SessionError::AskerGone)?;
    }
    Ok(())
}

/// Answers a step inside what the session holds (the replay of a
/// replacement chain) from the history, without computing: the rows this
/// hop sent for those positions, or the token the last hop sampled at the
/// step's end. Returns `false` when the history does not hold them (the
/// step is then computed).
async fn replayed(
    ctx: &HopContext,
    open: &OpenSession,
    history: &History,
    h: &StepHeader,
    down: &mut Downstream,
) -> Result<bool, SessionError> {
    match down {
        Downstream::Hop(w, _) => {
            let Some(rows) = history.hidden(h.pos, h.n_tokens) else {
                return Ok(false);
            };
            let next = StepHeader {
                kind: StepKind::Hidden,
                ..h.clone()
            };
            let bytes = encode_hidden(rows, open.wire);
            write_frame(w, &ActFrame::Step(next), &bytes)
                .await
                .map_err(SessionError::NextHop)?;
        }
        Downstream::Asker(s, _, ring) => {
            let end = h.pos + h.n_tokens;
            let Some(sampled) = history.token(end) else {
                return Ok(false);
            };
            feed_ring(ctx, open, h, end, sampled.token, ring.as_deref_mut()).await?;
            let frames = [
                TokenFrame::Token {
                    step: h.step,
                    token: sampled.token,
                    compute_us: h.compute_us,
                },
                TokenFrame::Digest {
                    step: h.step,
                    digest: sampled.digest,
                },
            ];
            write_frames(s, &frames).await?;
        }
    }
    Ok(true)
}
