//! The ring (`/nakshatra/ring/1`, see [`Ring`]): the last hop feeds each
//! token it samples straight to hop 1 as the next step, so that a decoded
//! token costs the hops' links only, not a round trip through the asker.
//!
//! Hop 1 side: a session opened with a ring expects one ring stream, from
//! the peer its chain names as the last hop ([`Rings::expect`]); the
//! stream's frames are read by a task of their own ([`spawn_reader`]) so
//! that the session can wait on them and on upstream's at once without
//! losing a half-read frame. Last hop side: [`open`] opens the stream
//! when the session is set up, before the last hop answers `Ready`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::io::ReadHalf;
use futures::AsyncReadExt;
use nakshatra_swarm::protocol::act::{ActFrame, OpenSession, Ring, RingHello, RING_PROTOCOL};
use nakshatra_swarm::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use super::{HopContext, SessionError, OPEN_TIMEOUT};
use crate::net::{read_frame_into, read_message, FrameError};

/// Frames a reader task may hold read ahead of the session (the last hop
/// feeds one step at a time: more would be a peer racing ahead).
pub(super) const READ_AHEAD: usize = 4;

/// A frame read by a reader task, with its payload, or why the stream
/// ended.
pub(super) type Incoming = Result<(ActFrame, Vec<u8>), FrameError>;

/// The ring streams this node (as hop 1) is waiting for, by session.
/// Entries live as long as their session's [`Expected`]: at most one per
/// open session. (`S`: the stream; generic for the tests.)
pub struct Rings<S = Stream> {
    waiting: Mutex<HashMap<super::resume::Key, Waiting<S>>>,
}

impl<S> Default for Rings<S> {
    fn default() -> Self {
        Rings {
            waiting: Mutex::new(HashMap::new()),
        }
    }
}

struct Waiting<S> {
    /// The peer the session's chain names as its last hop.
    last: PeerId,
    /// Where the stream goes.
    tx: oneshot::Sender<S>,
}

/// A session's claim on its ring stream; the claim ends when it is dropped.
pub(super) struct Expected<S = Stream> {
    rings: Arc<Rings<S>>,
    key: super::resume::Key,
    /// The stream, once the last hop opened it.
    pub(super) rx: oneshot::Receiver<S>,
}

impl<S> Drop for Expected<S> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.rings.waiting.lock() {
            w.remove(&self.key);
        }
    }
}

impl<S> Rings<S> {
    /// Waits for the ring stream of session `key` from `last`, replacing
    /// any earlier claim on it (a resumed session's).
    pub(super) fn expect(self: &Arc<Self>, key: super::resume::Key, last: PeerId) -> Expected<S> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(key, Waiting { last, tx });
        }
        Expected {
            rings: self.clone(),
            key,
            rx,
        }
    }

    /// Hands `stream` from `peer` to the session it names, if that session
    /// waits for one from `peer`. Returns whether it was taken.
    fn deliver(&self, key: super::resume::Key, peer: PeerId, stream: S) -> bool {
        let Ok(mut w) = self.waiting.lock() else {
            return false;
        };
        match w.get(&key) {
            Some(waiting) if waiting.last == peer => {}
            _ => return false,
        }
        w.remove(&key)
            .is_some_and(|waiting| waiting.tx.send(stream).is_ok())
    }
}

/// Serves ring streams: reads the [`RingHello`] (within [`OPEN_TIMEOUT`])
/// and hands the stream to the session it names if the peer is that
/// session's last hop; anything else is dropped.
pub(super) fn spawn_server(
    ctx: Arc<HopContext>,
) -> Result<nakshatra_swarm::Served, nakshatra_swarm::stream::AlreadyRegistered> {
    let per_peer = ctx.engine.max_sessions();
    let swarm = ctx.swarm.clone();
    swarm.serve_protocol(
        StreamProtocol::new(RING_PROTOCOL),
        per_peer,
        move |peer, mut stream| {
            let rings = ctx.rings.clone();
            async move {
                let hello = tokio::time::timeout(OPEN_TIMEOUT, read_message(&mut stream)).await;
                let Ok(Ok(RingHello { asker, session })) = hello else {
                    tracing::debug!(%peer, "ring stream without a hello; dropped");
                    return;
                };
                let Ok(asker) = asker.parse::<PeerId>() else {
                    tracing::debug!(%peer, "ring hello with a bad asker id; dropped");
                    return;
                };
                if !rings.deliver((asker, session), peer, stream) {
                    tracing::debug!(%peer, session, "ring stream for no session waiting for it from this peer; dropped");
                }
            }
        },
    )
}

/// Reads `r`'s frames into a channel until it ends (the last item says
/// why) or the returned task guard is dropped. `max_payload`: the most a
/// frame's payload may hold, by its header.
pub(super) fn spawn_reader(
    mut r: ReadHalf<Stream>,
    max_payload: impl Fn(&ActFrame) -> usize + Send + Sync + 'static,
) -> (mpsc::Receiver<Incoming>, super::AbortOnDrop) {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let task = tokio::spawn(async move {
        loop {
            let mut payload = Vec::new();
            let item = read_frame_into(&mut r, &mut payload, &max_payload)
                .await
                .map(|(frame, n)| {
                    payload.truncate(n);
                    (frame, payload)
                });
            let end = item.is_err();
            if tx.send(item).await.is_err() || end {
                return;
            }
        }
    });
    (rx, super::AbortOnDrop(task))
}

/// The last hop's ring stream to hop 1 of `open`'s chain, hello sent.
pub(super) async fn open(ctx: &HopContext, open: &OpenSession) -> Result<Stream, SessionError> {
    if ctx.faults.no_ring() {
        return Err(SessionError::Refused(
            "fault injection: no ring stream to the first hop",
        ));
    }
    let first = open
        .hops
        .first()
        .and_then(|h| h.peer_id.parse::<PeerId>().ok())
        .ok_or(SessionError::Refused(
            "the chain's first hop id does not parse",
        ))?;
    if !ctx.swarm.is_connected(first).await {
        // Reached at the addresses its own signed record gives (see
        // `connect_downstream`).
        if let Err(e) = ctx.swarm.server_info(first).await {
            tracing::debug!(%first, "first hop's record: {e}");
        }
    }
    let hello = RingHello {
        asker: open.asker.clone(),
        session: open.session,
    };
    super::open_with_hello(ctx, first, RING_PROTOCOL, open.direct, &hello)
        .await
        .map_err(|e| match e {
            nakshatra_swarm::OpenError::Handshake(e) => SessionError::RingGone(e),
            nakshatra_swarm::OpenError::Open(e) => SessionError::NoRingStream(e),
        })
}

/// Whether the last hop feeds step `step + 1` after sampling `token` for
/// step `step`, whose input ended at position `end` (the next step's
/// position): not after an end-of-generation token, not past the asker's
/// step count or the context.
pub(super) fn feeds(ring: &Ring, step: u64, end: u32, token: i32) -> bool {
    !ring.eog.contains(&token) && step.saturating_add(1) < ring.max_steps && end < ring.max_pos
}

/// Splits a stream, keeping the read half for a reader task and the
/// write half unused (a ring stream carries frames one way).
pub(super) fn read_half(s: Stream) -> ReadHalf<Stream> {
    s.split().0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_stream_goes_only_to_its_session_and_from_its_last_hop() {
        let rings: Arc<Rings<u32>> = Arc::new(Rings::default());
        let (asker, last, other) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut expected = rings.expect((asker, 7), last);
        assert!(!rings.deliver((asker, 7), other, 1), "from another peer");
        assert!(!rings.deliver((asker, 8), last, 2), "for another session");
        assert!(!rings.deliver((other, 7), last, 3), "for another asker");
        assert!(expected.rx.try_recv().is_err());
        assert!(rings.deliver((asker, 7), last, 4));
        assert_eq!(expected.rx.try_recv().ok(), Some(4));
        assert!(!rings.deliver((asker, 7), last, 5), "taken once");
        // A claim ends with its session.
        let expected = rings.expect((asker, 9), last);
        drop(expected);
        assert!(!rings.deliver((asker, 9), last, 6));
        assert!(rings.waiting.lock().map(|w| w.is_empty()).unwrap_or(false));
    }

    #[test]
    fn the_ring_stops_where_the_asker_would() {
        let ring = Ring {
            max_steps: 8,
            max_pos: 100,
            eog: vec![2, 7],
        };
        assert!(feeds(&ring, 0, 20, 5));
        assert!(feeds(&ring, 6, 99, 5), "step 7 at position 99 is fed");
        assert!(!feeds(&ring, 7, 50, 5), "no step 8 of 8");
        assert!(!feeds(&ring, 3, 100, 5), "no step at the context limit");
        assert!(
            !feeds(&ring, 3, 50, 7),
            "no step after an end of generation"
        );
    }
}
