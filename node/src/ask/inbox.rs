//! The token streams coming back from last hops, for every ask of one
//! asking process at once.
//!
//! A last hop opens its token stream to the asker and says `Hello` with
//! the session id. One task owns the process's `TOKENS_PROTOCOL`
//! registration (it can be accepted once per swarm); each ask says which
//! session it waits for and from which peer ([`TokenInbox::expect`])
//! *before* it sends `Open`, and gets that stream and no other. A stream
//! from any other peer, for a session nobody waits for, or silent past
//! [`HELLO_TIMEOUT`] is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use nakshatra_swarm::protocol::act::{TokenFrame, TOKENS_PROTOCOL};
use nakshatra_swarm::{PeerId, Stream, StreamProtocol};
use tokio::sync::oneshot;

use super::chain::HELLO_TIMEOUT;
use crate::net::read_message;

/// Sessions waiting for their token stream: session id → (the last hop,
/// where to hand the stream, the claim's own number).
type Waiting = HashMap<u64, (PeerId, oneshot::Sender<Stream>, u64)>;

/// Hands each inbound token stream to the ask that waits for it. Cheap to
/// clone; the accepting task ends when the swarm stops.
#[derive(Clone)]
pub struct TokenInbox {
    waiting: Arc<Mutex<Waiting>>,
    /// Numbers claims, so that a dropped claim never removes a newer one
    /// for the same session (a repaired chain keeps its session id).
    claims: Arc<std::sync::atomic::AtomicU64>,
}

/// An ask's claim on the token stream of one session; unclaimed on drop.
pub(crate) struct Expected {
    inbox: TokenInbox,
    session: u64,
    claim: u64,
    rx: oneshot::Receiver<Stream>,
}

impl Expected {
    /// The stream, once the last hop opened it and said hello (`None`
    /// when the inbox stopped).
    pub(crate) async fn stream(&mut self) -> Option<Stream> {
        (&mut self.rx).await.ok()
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        let mut waiting = self.inbox.lock();
        if waiting
            .get(&self.session)
            .is_some_and(|w| w.2 == self.claim)
        {
            waiting.remove(&self.session);
        }
    }
}

impl TokenInbox {
    /// Takes the swarm's token streams (once per swarm: a second call
    /// fails with `AlreadyRegistered`) and starts handing them out.
    pub fn start(
        swarm: &nakshatra_swarm::Client,
    ) -> Result<TokenInbox, nakshatra_swarm::stream::AlreadyRegistered> {
        let mut incoming = swarm
            .stream_control()
            .accept(StreamProtocol::new(TOKENS_PROTOCOL))?;
        let inbox = TokenInbox {
            waiting: Arc::new(Mutex::new(HashMap::new())),
            claims: Arc::default(),
        };
        let me = inbox.clone();
        tokio::spawn(async move {
            while let Some((peer, s)) = incoming.next().await {
                let me = me.clone();
                tokio::spawn(async move { me.hand_over(peer, s).await });
            }
        });
        Ok(inbox)
    }

    /// Waits for session `session`'s token stream from `last` (the only
    /// peer that may speak for it). Register before sending `Open`.
    pub(crate) fn expect(&self, session: u64, last: PeerId) -> Expected {
        let (tx, rx) = oneshot::channel();
        let claim = self
            .claims
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(session, (last, tx, claim));
        Expected {
            inbox: self.clone(),
            session,
            claim,
            rx,
        }
    }

    /// Reads a new stream's hello and gives the stream to the ask waiting
    /// for it, if the peer is that ask's last hop.
    async fn hand_over(&self, peer: PeerId, mut s: Stream) {
        let hello = tokio::time::timeout(HELLO_TIMEOUT, read_message::<_, TokenFrame>(&mut s));
        let Ok(Ok(TokenFrame::Hello { session })) = hello.await else {
            tracing::debug!(%peer, "token stream without a hello in time; dropped");
            return;
        };
        let mut waiting = self.lock();
        match waiting.get(&session) {
            Some((last, _, _)) if *last == peer => {
                if let Some((_, tx, _)) = waiting.remove(&session) {
                    let _ = tx.send(s);
                }
            }
            _ => {
                tracing::debug!(%peer, "token stream for a session this peer does not end; dropped")
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
