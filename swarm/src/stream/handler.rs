//! One connection's side of [`super::Behaviour`]: negotiates the streams
//! the behaviour asks it to open, and accepts inbound streams for the
//! protocols that have an accept loop.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures::channel::oneshot;
use futures::future::{ready, Ready};
use libp2p::core::upgrade::{InboundUpgrade, OutboundUpgrade, UpgradeInfo};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionHandler, ConnectionHandlerEvent, ConnectionId, StreamUpgradeError, SubstreamProtocol,
};
use libp2p::{PeerId, StreamProtocol};

use super::{Accepting, OpenRequest, OpenStreamError, OpenStreams, Stream};

/// An outbound stream being negotiated: what to answer, and with which
/// protocol (for the error when the peer refuses it).
pub(crate) struct Opening {
    protocol: StreamProtocol,
    reply: oneshot::Sender<Result<Stream, OpenStreamError>>,
}

pub(crate) struct Handler {
    peer: PeerId,
    /// This connection (its streams are counted against it).
    conn: ConnectionId,
    accepting: Arc<Accepting>,
    /// Where the streams handed out are counted.
    open: Arc<OpenStreams>,
    /// Requests not yet turned into substream requests. Every one handed
    /// to this connection is in here or being negotiated; none waits on
    /// another.
    queued: VecDeque<OpenRequest>,
    /// Woken when a request is queued.
    waker: Option<Waker>,
}

impl Handler {
    pub(crate) fn new(
        peer: PeerId,
        conn: ConnectionId,
        accepting: Arc<Accepting>,
        open: Arc<OpenStreams>,
    ) -> Self {
        Self {
            peer,
            conn,
            accepting,
            open,
            queued: VecDeque::new(),
            waker: None,
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = OpenRequest;
    type ToBehaviour = Infallible;
    type InboundProtocol = Negotiate;
    type OutboundProtocol = Negotiate;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Opening;

    fn listen_protocol(&self) -> SubstreamProtocol<Negotiate, ()> {
        SubstreamProtocol::new(Negotiate(self.accepting.protocols()), ())
    }

    fn connection_keep_alive(&self) -> bool {
        !self.queued.is_empty()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Negotiate, Opening, Infallible>> {
        match self.queued.pop_front() {
            Some(request) => Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(
                    Negotiate(vec![request.protocol.clone()]),
                    Opening {
                        protocol: request.protocol,
                        reply: request.reply,
                    },
                ),
            }),
            None => {
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn on_behaviour_event(&mut self, request: OpenRequest) {
        self.queued.push_back(request);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn on_connection_event(&mut self, event: ConnectionEvent<Negotiate, Negotiate, (), Opening>) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: (stream, protocol),
                ..
            }) => {
                let stream = Stream::new(stream, self.peer, self.conn, &self.open);
                self.accepting.deliver(self.peer, protocol, stream)
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: (stream, _),
                info,
            }) => {
                // The opener may have given up (timeout): nothing to do.
                let _ = info
                    .reply
                    .send(Ok(Stream::new(stream, self.peer, self.conn, &self.open)));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info, error }) => {
                let error = match error {
                    StreamUpgradeError::NegotiationFailed => {
                        OpenStreamError::UnsupportedProtocol(info.protocol)
                    }
                    StreamUpgradeError::Timeout => OpenStreamError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{} not negotiated in time", info.protocol),
                    )),
                    StreamUpgradeError::Io(e) => OpenStreamError::Io(e),
                    StreamUpgradeError::Apply(never) => match never {},
                };
                let _ = info.reply.send(Err(error));
            }
            _ => {}
        }
    }
}

/// Multistream-select over a list of protocols, handing back the bare
/// stream and the protocol agreed on.
pub(crate) struct Negotiate(Vec<StreamProtocol>);

impl UpgradeInfo for Negotiate {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<libp2p::Stream> for Negotiate {
    type Output = (libp2p::Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_inbound(self, stream: libp2p::Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

impl OutboundUpgrade<libp2p::Stream> for Negotiate {
    type Output = (libp2p::Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_outbound(self, stream: libp2p::Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}
