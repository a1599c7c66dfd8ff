//! One chain, run once: open the session through every hop
//! ([`OpenChain::open`]), then run the steps ([`OpenChain::run`]): the
//! prompt as one prefill step, then one step per token, each token coming
//! back on the last hop's token stream.

use std::time::{Duration, Instant};

use futures::io::WriteHalf;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use nakshatra_swarm::protocol::act::{
    tokens_to_bytes, ActFrame, ActReply, HopSpec, OpenSession, StepHeader, StepKind, TokenFrame,
    ACT_PROTOCOL,
};
use nakshatra_swarm::{Handshake, Multiaddr, PeerId, Reopen, Stream, StreamProtocol};
use tokio::sync::mpsc;

use super::{AskError, AskOptions, AskTimings, HopFault};
use crate::engine::tokenizer::{Tokenizer, Utf8Stream};
use crate::net::{handshake, read_message, write_frame, FrameError};

/// How long the whole chain may take to answer `Open` with `Ready`.
pub const CHAIN_READY_TIMEOUT: Duration = Duration::from_secs(40);
/// How long the last hop may take to open its token stream once the chain
/// is ready.
pub const TOKEN_STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new token stream may take to say which session it is for.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// How a run of one chain ended.
pub(super) enum ChainOutcome<T> {
    /// The answer.
    Done(T),
    /// Failed before any token reached the user: another chain may be
    /// tried.
    NotStarted(AskError),
    /// Failed after tokens were streamed: the ask fails.
    Broken(AskError),
}

/// What one run generated.
pub(super) struct Generated {
    /// The text.
    pub(super) text: String,
    /// The token ids.
    pub(super) tokens: Vec<i32>,
    /// Its timings (setup excluded).
    pub(super) timings: AskTimings,
}

/// A chain whose session is open at every hop.
pub(super) struct OpenChain<'a> {
    hops: &'a [HopSpec],
    /// Steps go to hop 1 here.
    to_first: WriteHalf<Stream>,
    /// Tokens come back here, from the last hop.
    tokens: Stream,
    /// Failures reported upstream by any hop: (hop index, message).
    failures: mpsc::Receiver<(u32, String)>,
}

impl<T> ChainOutcome<T> {
    /// The answer changed by `f`; failures as they are.
    pub(super) fn map<U>(self, f: impl FnOnce(T) -> U) -> ChainOutcome<U> {
        match self {
            ChainOutcome::Done(t) => ChainOutcome::Done(f(t)),
            ChainOutcome::NotStarted(e) => ChainOutcome::NotStarted(e),
            ChainOutcome::Broken(e) => ChainOutcome::Broken(e),
        }
    }
}

impl<'a> OpenChain<'a> {
    /// Opens session `session` through `hops`: the `Open` goes to hop 1,
    /// which forwards it down the chain; once every hop is ready, the last
    /// one opens its token stream to us (taken from `incoming`).
    pub(super) async fn open(
        swarm: &nakshatra_swarm::Client,
        incoming: &mut nakshatra_swarm::stream::IncomingStreams,
        open: OpenSession,
        hops: &'a [HopSpec],
    ) -> Result<OpenChain<'a>, AskError> {
        let hop_err = |index: u32, fault: HopFault| hop_error(hops, index, fault);
        let first = hops.first().ok_or(AskError::EmptyChain)?;
        let last = hops.len() as u32 - 1;
        let first_peer: PeerId = first
            .peer_id
            .parse()
            .map_err(|_| hop_err(0, HopFault::BadPeerId))?;
        connect_last_hop(swarm, hops).await;
        let open = &open;
        let (r, to_first) = swarm
            .open_stream_with(
                first_peer,
                StreamProtocol::new(ACT_PROTOCOL),
                Reopen::DEFAULT,
                |s| async move {
                    let (mut r, mut w) = s.split();
                    if let Err(e) = write_frame(&mut w, &ActFrame::Open(open.clone()), &[]).await {
                        return Err(setup_handshake(e));
                    }
                    let ready = tokio::time::timeout(
                        CHAIN_READY_TIMEOUT,
                        read_message::<_, ActReply>(&mut r),
                    )
                    .await;
                    match ready {
                        Ok(Ok(ActReply::Ready)) => Ok((r, w)),
                        Ok(Ok(ActReply::Failed { index, message, .. })) => {
                            Err(Handshake::Failed(ChainSetup::Failed { index, message }))
                        }
                        Ok(Err(e)) => Err(setup_handshake(e)),
                        Err(_) => Err(Handshake::Failed(ChainSetup::Timeout)),
                    }
                },
            )
            .await
            .map_err(|e| match e {
                nakshatra_swarm::OpenError::Open(e) => hop_err(0, HopFault::NoStream(e)),
                nakshatra_swarm::OpenError::Handshake(ChainSetup::Failed { index, message }) => {
                    hop_err(index, HopFault::Reported(message))
                }
                nakshatra_swarm::OpenError::Handshake(ChainSetup::Stream(e)) => {
                    hop_err(0, HopFault::Stream(e))
                }
                nakshatra_swarm::OpenError::Handshake(ChainSetup::Timeout) => {
                    hop_err(0, HopFault::Timeout(CHAIN_READY_TIMEOUT))
                }
            })?;
        let last_peer: PeerId = hops
            .last()
            .and_then(|h| h.peer_id.parse().ok())
            .ok_or_else(|| hop_err(last, HopFault::BadPeerId))?;
        let tokens = tokio::time::timeout(
            TOKEN_STREAM_TIMEOUT,
            token_stream(incoming, last_peer, open.session),
        )
        .await
        .ok()
        .flatten()
        .ok_or_else(|| hop_err(last, HopFault::NoTokenStream))?;
        Ok(OpenChain {
            hops,
            to_first,
            tokens,
            failures: watch_failures(r),
        })
    }

    /// Runs the steps: `prompt` as one prefill step, then one token at a
    /// time until `max_tokens`, an end-of-generation token or the
    /// context `limit`. `on_text` sees the text as it comes.
    pub(super) async fn run(
        mut self,
        prompt: &[i32],
        tok: &Tokenizer,
        limit: u32,
        opts: &AskOptions,
        on_text: &mut impl FnMut(&str),
    ) -> ChainOutcome<Generated> {
        let n_hops = self.hops.len().max(1) as f64;
        let mut out = Generated {
            text: String::new(),
            tokens: Vec::new(),
            timings: AskTimings {
                prompt_tokens: prompt.len(),
                ..AskTimings::default()
            },
        };
        let mut utf8 = Utf8Stream::default();
        let mut overheads_ms = Vec::new();
        let mut input: Vec<i32> = prompt.to_vec();
        let mut pos: u32 = 0;
        let mut t_decode_start = None;
        for step in 0..opts.max_tokens as u64 {
            let t0 = Instant::now();
            let (token, compute_us) = match self.step(step, pos, &input, opts.step_timeout).await {
                Ok(t) => t,
                Err(e) if out.tokens.is_empty() => return ChainOutcome::NotStarted(e),
                Err(e) => return ChainOutcome::Broken(e),
            };
            let elapsed = t0.elapsed();
            if step == 0 {
                out.timings.prefill_s = elapsed.as_secs_f64();
                t_decode_start = Some(Instant::now());
            } else {
                let overhead = elapsed.as_secs_f64() * 1e3 - compute_us as f64 / 1e3;
                overheads_ms.push(overhead / n_hops);
            }
            pos += input.len() as u32;
            // A token id from the network is checked before llama.cpp
            // renders it (an id out of range would abort the process).
            if usize::try_from(token).map_or(true, |t| t >= tok.n_vocab()) {
                let e = self.hop_err(
                    self.hops.len() as u32 - 1,
                    HopFault::BadToken {
                        token,
                        n_vocab: tok.n_vocab(),
                    },
                );
                return if out.tokens.is_empty() {
                    ChainOutcome::NotStarted(e)
                } else {
                    ChainOutcome::Broken(e)
                };
            }
            if tok.is_eog(token) {
                break;
            }
            out.tokens.push(token);
            let piece = utf8.push(&tok.piece(token));
            on_text(&piece);
            out.text.push_str(&piece);
            if pos >= limit {
                break;
            }
            input = vec![token];
        }
        let rest = utf8.finish();
        on_text(&rest);
        out.text.push_str(&rest);
        let _ = write_frame(&mut self.to_first, &ActFrame::Close, &[]).await;
        let _ = self.to_first.close().await;
        out.timings.finish(
            prompt.len(),
            overheads_ms,
            t_decode_start.map(|t| t.elapsed()),
        );
        ChainOutcome::Done(out)
    }

    /// One step: sends `input` at `pos` into hop 1 and waits for the token
    /// (or a failure any hop reports). Returns the token and the compute
    /// time the hops reported, microseconds.
    async fn step(
        &mut self,
        step: u64,
        pos: u32,
        input: &[i32],
        timeout: Duration,
    ) -> Result<(i32, u64), AskError> {
        let last = self.hops.len() as u32 - 1;
        let header = StepHeader {
            step,
            pos,
            n_tokens: input.len() as u32,
            kind: StepKind::Tokens,
            compute_us: 0,
        };
        write_frame(
            &mut self.to_first,
            &ActFrame::Step(header),
            &tokens_to_bytes(input),
        )
        .await
        .map_err(|e| self.hop_err(0, HopFault::Stream(e)))?;
        let frame = tokio::select! {
            f = tokio::time::timeout(timeout, read_message::<_, TokenFrame>(&mut self.tokens)) => f,
            Some((index, message)) = self.failures.recv() => {
                return Err(self.hop_err(index, HopFault::Reported(message)));
            }
        };
        match frame {
            Ok(Ok(TokenFrame::Token {
                step: s,
                token,
                compute_us,
            })) if s == step => Ok((token, compute_us)),
            Ok(Ok(TokenFrame::Failed { message })) => {
                Err(self.hop_err(last, HopFault::Reported(message)))
            }
            Ok(Ok(_)) => Err(self.hop_err(last, HopFault::UnexpectedFrame)),
            // The token stream broke: a hop may have said why upstream.
            Ok(Err(e)) => Err(match self.failures.try_recv() {
                Ok((index, message)) => self.hop_err(index, HopFault::Reported(message)),
                Err(_) => self.hop_err(last, HopFault::TokenStream(e)),
            }),
            Err(_) => Err(AskError::StepTimeout { step, timeout }),
        }
    }

    fn hop_err(&self, index: u32, fault: HopFault) -> AskError {
        hop_error(self.hops, index, fault)
    }
}

/// How the chain's set-up failed, as seen on hop 1's stream.
#[derive(Debug, thiserror::Error)]
enum ChainSetup {
    /// A hop answered `Failed`.
    #[error("hop {index}: {message}")]
    Failed { index: u32, message: String },
    /// The stream broke.
    #[error(transparent)]
    Stream(FrameError),
    /// No answer within [`CHAIN_READY_TIMEOUT`].
    #[error("chain not ready within {CHAIN_READY_TIMEOUT:?}")]
    Timeout,
}

/// A broken stream during set-up: retried when it broke before any
/// answer (see [`handshake`]).
fn setup_handshake(e: FrameError) -> Handshake<ChainSetup> {
    match handshake(e) {
        Handshake::Dropped(e) => Handshake::Dropped(ChainSetup::Stream(e)),
        Handshake::Failed(e) => Handshake::Failed(ChainSetup::Stream(e)),
    }
}

fn hop_error(hops: &[HopSpec], index: u32, fault: HopFault) -> AskError {
    AskError::Hop {
        index,
        peer: hops
            .get(index as usize)
            .map(|h| h.peer_id.clone())
            .unwrap_or_default(),
        fault,
    }
}

/// The last hop streams tokens back over our connection to it: make sure
/// there is one.
async fn connect_last_hop(swarm: &nakshatra_swarm::Client, hops: &[HopSpec]) {
    let Some(last) = hops.last() else { return };
    let Ok(peer) = last.peer_id.parse::<PeerId>() else {
        return;
    };
    let addrs: Vec<Multiaddr> = last.addrs.iter().filter_map(|a| a.parse().ok()).collect();
    swarm.add_peer_addresses(peer, addrs).await;
    let _ = swarm.probe_rtt(peer).await;
}

/// The first inbound token stream from the chain's last hop, `last`,
/// that says hello for `session`. Streams from any other peer are dropped
/// unread (every hop learns the session id; only the last hop may speak
/// for it), and a stream gets [`HELLO_TIMEOUT`] to say hello.
async fn token_stream(
    incoming: &mut nakshatra_swarm::stream::IncomingStreams,
    last: PeerId,
    session: u64,
) -> Option<Stream> {
    while let Some((peer, mut s)) = incoming.next().await {
        if peer != last {
            tracing::debug!(%peer, "token stream from a peer that is not the last hop; dropped");
            continue;
        }
        let hello = tokio::time::timeout(HELLO_TIMEOUT, read_message::<_, TokenFrame>(&mut s));
        if let Ok(Ok(TokenFrame::Hello { session: id })) = hello.await {
            if id == session {
                return Some(s);
            }
        }
    }
    None
}

/// Reads failures reported upstream on hop 1's stream, until it closes
/// (reported as a failure of hop 0).
fn watch_failures(mut r: futures::io::ReadHalf<Stream>) -> mpsc::Receiver<(u32, String)> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            match read_message::<_, ActReply>(&mut r).await {
                Ok(ActReply::Failed { index, message, .. }) => {
                    let _ = tx.send((index, message)).await;
                }
                Ok(ActReply::Ready) => {}
                Err(e) => {
                    let _ = tx.send((0, format!("stream closed: {e}"))).await;
                    return;
                }
            }
        }
    });
    rx
}
