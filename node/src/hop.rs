//! The serving side of a chain: a hop takes a session's steps from
//! upstream (the asker or the previous hop), runs its range, and pushes the
//! hidden states to the next hop — or, at the last hop, samples and streams
//! the token to the asker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use nakshatra_swarm::protocol::act::{
    tokens_from_bytes, ActFrame, ActReply, OpenSession, StepHeader, StepKind, TokenFrame,
    VocabRequest, VocabResponse, ACT_PROTOCOL, MAX_HOPS, TOKENS_PROTOCOL, VOCAB_PROTOCOL,
};
use nakshatra_swarm::stream::Control;
use nakshatra_swarm::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::Mutex;

use crate::engine::service::{EngineService, OwnedInput};
use crate::engine::{Sampler, SamplerSpec, SessionId, StepOutput};
use crate::net::{decode_hidden, encode_hidden, read_frame, write_frame};

/// The vocabulary-only GGUF and the encoded model hashes a node hands to
/// askers.
pub type VocabOffer = (Arc<Vec<u8>>, Arc<Vec<u8>>);

/// What every session handler of this node shares.
pub struct HopContext {
    /// The range, running.
    pub engine: EngineService,
    /// Opens and accepts streams.
    pub control: Control,
    /// The swarm (to learn peers' addresses).
    pub swarm: nakshatra_swarm::Client,
    /// This node.
    pub me: PeerId,
    /// The model it serves.
    pub model_id: String,
    /// The vocabulary-only GGUF and the encoded model hashes, handed to
    /// askers (`None` when this node cannot give it).
    pub vocab: Option<VocabOffer>,
    /// Test-only: extra delay before handling each inbound frame.
    pub delay: Option<Duration>,
    /// Sessions idle this long are closed.
    pub idle_timeout: Duration,
}

/// Accepts activation and vocabulary streams until the swarm stops.
pub fn spawn_servers(ctx: Arc<HopContext>) -> Result<(), String> {
    let mut control = ctx.control.clone();
    let mut act = control
        .accept(StreamProtocol::new(ACT_PROTOCOL))
        .map_err(|e| e.to_string())?;
    let mut vocab = control
        .accept(StreamProtocol::new(VOCAB_PROTOCOL))
        .map_err(|e| e.to_string())?;
    let c = ctx.clone();
    tokio::spawn(async move {
        while let Some((peer, stream)) = act.next().await {
            let c = c.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_session(c, peer, stream).await {
                    tracing::debug!(%peer, "session ended: {e}");
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Some((peer, stream)) = vocab.next().await {
            let c = ctx.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_vocab(c, stream).await {
                    tracing::debug!(%peer, "vocab request failed: {e}");
                }
            });
        }
    });
    Ok(())
}

async fn serve_vocab(ctx: Arc<HopContext>, mut s: nakshatra_swarm::Stream) -> Result<(), String> {
    let (req, _): (VocabRequest, _) =
        tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
    match &ctx.vocab {
        Some((gguf, hashes)) if req.model_id == ctx.model_id => {
            let h = VocabResponse::Vocab {
                hashes: hashes.as_ref().clone(),
            };
            write_frame(&mut s, &h, gguf)
                .await
                .map_err(|e| e.to_string())?;
        }
        _ => write_frame(&mut s, &VocabResponse::NotHere, &[])
            .await
            .map_err(|e| e.to_string())?,
    }
    let _ = s.close().await;
    Ok(())
}

fn failed(ctx: &HopContext, index: u32, message: impl Into<String>) -> ActReply {
    ActReply::Failed {
        index,
        peer_id: ctx.me.to_string(),
        message: message.into(),
    }
}

fn check_open(ctx: &HopContext, o: &OpenSession) -> Result<(), String> {
    let l = ctx.engine.layout();
    let me = o
        .hops
        .get(o.index as usize)
        .ok_or("hop index outside the chain")?;
    if o.hops.len() > MAX_HOPS {
        return Err(format!("chain of {} hops is too long", o.hops.len()));
    }
    if o.model_id != ctx.model_id {
        return Err(format!(
            "this node serves model {}, not {}",
            ctx.model_id, o.model_id
        ));
    }
    if me.peer_id != ctx.me.to_string() {
        return Err("the chain names another peer at this hop".into());
    }
    if me.start != l.start || me.end != l.end {
        return Err(format!(
            "this node runs layers {}..{}, the chain asks for {}..{}",
            l.start, l.end, me.start, me.end
        ));
    }
    let is_last = o.index as usize + 1 == o.hops.len();
    if is_last != l.is_last() {
        return Err("the chain does not end where the model ends".into());
    }
    Ok(())
}

/// Where a session's results go.
enum Downstream {
    /// The next hop's activation stream.
    Hop(futures::io::WriteHalf<nakshatra_swarm::Stream>),
    /// The asker's token stream (last hop), and the session's sampler.
    Asker(nakshatra_swarm::Stream, Box<Sampler>),
}

type Upstream = Arc<Mutex<futures::io::WriteHalf<nakshatra_swarm::Stream>>>;

async fn reply(up: &Upstream, r: &ActReply) {
    let mut w = up.lock().await;
    if let Err(e) = write_frame(&mut *w, r, &[]).await {
        tracing::debug!("cannot reply upstream: {e}");
    }
}

async fn open_stream(
    ctx: &HopContext,
    peer: &str,
    addrs: &[String],
    proto: &'static str,
) -> Result<nakshatra_swarm::Stream, String> {
    let peer: PeerId = peer.parse().map_err(|_| format!("bad peer id {peer}"))?;
    let addrs: Vec<Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
    if !addrs.is_empty() {
        ctx.swarm.add_peer_addresses(peer, addrs).await;
    }
    let mut control = ctx.control.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        control.open_stream(peer, StreamProtocol::new(proto)),
    )
    .await
    .map_err(|_| format!("no stream to {peer} within 10 s"))?
    .map_err(|e| format!("cannot open a stream to {peer}: {e}"))
}

/// Sets up the rest of the chain from this hop: returns where results go.
async fn connect_downstream(
    ctx: &HopContext,
    open: &OpenSession,
    up: &Upstream,
) -> Result<Downstream, ActReply> {
    let index = open.index;
    if (index as usize) + 1 == open.hops.len() {
        let spec = SamplerSpec {
            temperature: open.sampling.temperature,
            top_k: open.sampling.top_k,
            top_p: open.sampling.top_p,
            seed: open.sampling.seed,
        };
        let sampler = Sampler::new(&spec).map_err(|e| failed(ctx, index, e.to_string()))?;
        // As for the next hop's stream: a new stream the asker dropped
        // before taking it is retried on a fresh one.
        let mut attempt = 0;
        let s = loop {
            attempt += 1;
            let mut s = open_stream(ctx, &open.asker, &[], TOKENS_PROTOCOL)
                .await
                .map_err(|e| failed(ctx, index, format!("token stream to the asker: {e}")))?;
            let hello = TokenFrame::Hello {
                session: open.session,
            };
            match write_frame(&mut s, &hello, &[]).await {
                Ok(()) => break s,
                Err(e) if attempt < 3 => {
                    tracing::debug!("the asker closed the new token stream ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(e) => return Err(failed(ctx, index, format!("token stream: {e}"))),
            }
        };
        return Ok(Downstream::Asker(s, Box::new(sampler)));
    }
    let next = &open.hops[index as usize + 1];
    let fail_next = |message: String| ActReply::Failed {
        index: index + 1,
        peer_id: next.peer_id.clone(),
        message,
    };
    let mut fwd = open.clone();
    fwd.index = index + 1;
    // A fresh inbound stream can be dropped by a busy receiver before its
    // accept loop takes it (libp2p-stream hands streams over with no
    // buffer): an immediate end of stream is retried on a new stream.
    let mut attempt = 0;
    let (mut down_r, down_w, first) = loop {
        attempt += 1;
        let s = open_stream(ctx, &next.peer_id, &next.addrs, ACT_PROTOCOL)
            .await
            .map_err(&fail_next)?;
        let (mut down_r, mut down_w) = s.split();
        write_frame(&mut down_w, &ActFrame::Open(fwd.clone()), &[])
            .await
            .map_err(|e| fail_next(e.to_string()))?;
        match tokio::time::timeout(
            Duration::from_secs(30),
            read_frame::<_, ActReply>(&mut down_r),
        )
        .await
        {
            Ok(Ok((r, _))) => break (down_r, down_w, r),
            Ok(Err(e)) if attempt < 3 => {
                tracing::debug!("next hop closed the new stream ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Ok(Err(e)) => return Err(fail_next(format!("no answer: {e}"))),
            Err(_) => return Err(fail_next("no answer within 30 s".into())),
        }
    };
    if first != ActReply::Ready {
        return Err(first);
    }
    // Later replies from downstream (failures) are relayed upstream.
    let up = up.clone();
    tokio::spawn(async move {
        while let Ok((r, _)) = read_frame::<_, ActReply>(&mut down_r).await {
            reply(&up, &r).await;
        }
    });
    Ok(Downstream::Hop(down_w))
}

async fn serve_session(
    ctx: Arc<HopContext>,
    peer: PeerId,
    stream: nakshatra_swarm::Stream,
) -> Result<(), String> {
    let (mut up_r, up_w) = stream.split();
    let up: Upstream = Arc::new(Mutex::new(up_w));
    let (first, _): (ActFrame, _) =
        tokio::time::timeout(Duration::from_secs(10), read_frame(&mut up_r))
            .await
            .map_err(|_| "no open frame within 10 s".to_string())?
            .map_err(|e| e.to_string())?;
    let ActFrame::Open(open) = first else {
        return Err("first frame is not Open".into());
    };
    let index = open.index;
    if let Err(e) = check_open(&ctx, &open) {
        reply(&up, &failed(&ctx, index, e.clone())).await;
        return Err(e);
    }
    let session = match ctx.engine.open().await {
        Ok(s) => s,
        Err(e) => {
            let m = format!("cannot open a session: {e}");
            reply(&up, &failed(&ctx, index, m.clone())).await;
            return Err(m);
        }
    };
    tracing::debug!(%peer, session = open.session, index, "session open");
    let r = match connect_downstream(&ctx, &open, &up).await {
        Ok(mut down) => {
            reply(&up, &ActReply::Ready).await;
            let r = run_steps(&ctx, &open, session, &mut up_r, &up, &mut down).await;
            match down {
                Downstream::Hop(mut w) => {
                    let _ = write_frame(&mut w, &ActFrame::Close, &[]).await;
                    let _ = w.close().await;
                }
                Downstream::Asker(mut s, _) => {
                    if let Err(e) = &r {
                        let _ =
                            write_frame(&mut s, &TokenFrame::Failed { message: e.clone() }, &[])
                                .await;
                    }
                    let _ = s.close().await;
                }
            }
            r
        }
        Err(f) => {
            reply(&up, &f).await;
            Err(format!("{f:?}"))
        }
    };
    let _ = ctx.engine.close(session).await;
    tracing::debug!(session = open.session, "session closed");
    r
}

async fn run_steps(
    ctx: &HopContext,
    open: &OpenSession,
    session: SessionId,
    up_r: &mut futures::io::ReadHalf<nakshatra_swarm::Stream>,
    up: &Upstream,
    down: &mut Downstream,
) -> Result<(), String> {
    let index = open.index;
    let n_embd = ctx.engine.layout().n_embd as usize;
    let mut pos: u32 = 0;
    loop {
        let frame = tokio::time::timeout(ctx.idle_timeout, read_frame::<_, ActFrame>(up_r)).await;
        let (frame, payload) = match frame {
            Err(_) => return Err(format!("idle for {:?}", ctx.idle_timeout)),
            Ok(Err(e)) => return Err(format!("upstream gone: {e}")),
            Ok(Ok(f)) => f,
        };
        if let Some(d) = ctx.delay {
            tokio::time::sleep(d).await;
        }
        let h = match frame {
            ActFrame::Close => return Ok(()),
            ActFrame::Open(_) => return Err("second Open on a session".into()),
            ActFrame::Step(h) => h,
        };
        let fail = |m: String| async move {
            reply(up, &failed(ctx, index, m.clone())).await;
            Err::<(), String>(m)
        };
        let input = match (h.kind, index) {
            (StepKind::Tokens, 0) => match tokens_from_bytes(&payload) {
                Some(t) if t.len() == h.n_tokens as usize => OwnedInput::Tokens(t),
                _ => return fail("token payload does not match n_tokens".into()).await,
            },
            (StepKind::Hidden, i) if i > 0 => match decode_hidden(&payload, open.wire) {
                Some(v) if v.len() == h.n_tokens as usize * n_embd => OwnedInput::Hidden(v),
                _ => return fail("hidden payload does not match n_tokens × n_embd".into()).await,
            },
            _ => return fail("wrong payload kind for this hop".into()).await,
        };
        // A step may restart from an earlier position (a retry or replay):
        // drop what is past it first, so nothing is applied twice.
        if h.pos < pos {
            if let Err(e) = ctx.engine.truncate(session, h.pos).await {
                return fail(e.to_string()).await;
            }
            pos = h.pos;
        } else if h.pos > pos {
            return fail(format!(
                "step {} starts at {} but the session holds {pos}",
                h.step, h.pos
            ))
            .await;
        }
        let t0 = Instant::now();
        let out = match ctx.engine.forward(session, input).await {
            Ok(o) => o,
            Err(e) => return fail(e.to_string()).await,
        };
        let compute_us = h.compute_us + t0.elapsed().as_micros() as u64;
        pos += h.n_tokens;
        match (out, &mut *down) {
            (StepOutput::Hidden(hidden), Downstream::Hop(w)) => {
                let next = StepHeader {
                    kind: StepKind::Hidden,
                    compute_us,
                    ..h
                };
                let bytes = encode_hidden(&hidden, open.wire);
                if let Err(e) = write_frame(w, &ActFrame::Step(next), &bytes).await {
                    return fail(format!("next hop: {e}")).await;
                }
            }
            (StepOutput::Logits(logits), Downstream::Asker(s, sampler)) => {
                let token = match sampler.sample(&logits) {
                    Ok(t) => t,
                    Err(e) => return fail(e.to_string()).await,
                };
                let t = TokenFrame::Token {
                    step: h.step,
                    token,
                    compute_us,
                };
                if let Err(e) = write_frame(s, &t, &[]).await {
                    return Err(format!("asker gone: {e}"));
                }
            }
            _ => return fail("engine output does not match this hop's place".into()).await,
        }
    }
}
