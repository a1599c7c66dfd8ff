//! `/nakshatra/probe/1`: application-level RTT probes over raw
//! streams ([`crate::stream`]), and the background task that measures a serving
//! node's next hops for its `next_rtts`.
//!
//! Wire: the prober writes an 8-byte nonce, the other side reads it, waits
//! [`crate::SwarmConfig::test_link_delay`] if set, and writes the same 8
//! bytes back; the prober checks them. Repeated on the same stream (RTT =
//! best of three); the stream is kept for the next probe of that peer.

use std::{
    collections::{HashMap, HashSet},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use futures::{stream, AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};

use crate::stream::Stream;
use nakshatra_protocol::{
    rpc::{PROBE_NONCE_LEN, PROBE_PROTOCOL},
    NextRtt, MAX_NEXT_RTTS,
};
use tokio::{
    sync::{watch, Notify},
    time::Instant,
};

use crate::{
    client::{Client, WeakClient},
    connect::{Handshake, Reopen},
    event_loop::Command,
    inbound::PeerQuota,
};

/// The probe protocol as a libp2p protocol name.
pub(crate) const PROBE: StreamProtocol = StreamProtocol::new(PROBE_PROTOCOL);
/// How long a probe's result answers other probes of the same peer by
/// this node. Probes of one peer go one at a time: many asks planning at
/// once would otherwise open more probe streams than the peer accepts
/// from one node ([`PROBE_STREAMS_PER_PEER`]) and see it as unreachable.
pub(crate) const PROBE_REUSE: Duration = Duration::from_millis(500);
/// One peer's last probe: when, and what it measured (`None`: no answer).
pub(crate) type ProbeSlot = std::sync::Arc<tokio::sync::Mutex<Option<(Instant, Option<Duration>)>>>;
/// Round trips per probe; the best one counts.
const PROBE_ROUNDS: usize = 3;
/// An echo stream with no probe for this long is closed (the prober opens
/// a new one when it needs it).
const ECHO_IDLE: Duration = Duration::from_secs(300);
/// Most next hops probed per round (Petals pings a handful too).
pub(crate) const MAX_PROBED_NEXT_HOPS: usize = 8;
/// Probe streams one peer may have open at once (a prober keeps one per
/// peer, and may be replacing a dead one).
const PROBE_STREAMS_PER_PEER: usize = 4;
/// Wait after a trigger before a round, so that bursts coalesce.
const TRIGGER_DEBOUNCE: Duration = Duration::from_millis(300);

/// Accepts `/nakshatra/probe/1` streams and echoes each probe, until `stop`
/// changes or its sender is dropped (the event loop ended). Every node runs
/// it, servers and askers alike.
///
/// Each inbound stream gets its own task at once: streams that find the
/// accept loop's backlog full are dropped, so the loop never waits on a
/// stream.
pub(crate) fn spawn_probe_server(
    mut control: crate::stream::Control,
    delay: Option<Duration>,
    mut stop: watch::Receiver<()>,
) {
    let mut incoming = match control.accept(PROBE) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve RTT probes");
            return;
        }
    };
    let quota = PeerQuota::new(PROBE_STREAMS_PER_PEER);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                next = incoming.next() => match next {
                    Some((peer, stream)) => {
                        let Some(permit) = quota.try_acquire(peer) else {
                            tracing::debug!(%peer, "probe stream over the peer's share; dropped");
                            continue;
                        };
                        tokio::spawn(async move {
                            echo(peer, stream, delay).await;
                            drop(permit);
                        });
                    }
                    None => break,
                },
            }
        }
    });
}

async fn echo(peer: PeerId, mut stream: Stream, delay: Option<Duration>) {
    // An idle probe stream must not keep the connection open.
    stream.ignore_for_keep_alive();
    let mut nonce = [0u8; PROBE_NONCE_LEN];
    loop {
        match tokio::time::timeout(ECHO_IDLE, stream.read_exact(&mut nonce)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if stream.write_all(&nonce).await.is_err() || stream.flush().await.is_err() {
            break;
        }
    }
    tracing::trace!(%peer, "probe stream closed");
    let _ = stream.close().await;
}

/// Best of [`PROBE_ROUNDS`] round trips to `peer`, within
/// [`crate::SwarmConfig::probe_timeout`] (on timeout, the best sample so
/// far, if any).
pub(crate) async fn probe_rtt(client: &Client, peer: PeerId) -> Option<Duration> {
    if peer == client.peer_id() {
        return Some(Duration::ZERO);
    }
    let deadline = Instant::now() + client.probe_timeout();
    let slot = client.probe_slot(peer);
    let Ok(mut last) = tokio::time::timeout_at(deadline, slot.lock()).await else {
        return None;
    };
    if let Some((at, rtt)) = *last {
        if at.elapsed() < PROBE_REUSE {
            return rtt;
        }
    }
    let mut best: Option<Duration> = None;
    let _ = tokio::time::timeout_at(deadline, probe_rounds(client, peer, &mut best)).await;
    *last = Some((Instant::now(), best));
    client.count_probe(best.is_some());
    best
}

async fn probe_rounds(client: &Client, peer: PeerId, best: &mut Option<Duration>) {
    let mut record = |rtt: Duration| *best = Some(best.map_or(rtt, |b| b.min(rtt)));
    // A kept stream may have died with its connection: one round tells.
    let mut kept = client.take_probe_stream(peer);
    if let Some(s) = kept.as_mut() {
        match round_trip(s).await {
            Ok(rtt) => record(rtt),
            Err(e) => {
                tracing::trace!(%peer, error = %e, "kept probe stream failed; opening another");
                kept = None;
            }
        }
    }
    let mut stream = match kept {
        Some(s) => s,
        None => {
            let opened = client
                .open_stream_with(peer, PROBE, Reopen::DEFAULT, |mut s| async move {
                    s.ignore_for_keep_alive();
                    match round_trip(&mut s).await {
                        Ok(rtt) => Ok((s, rtt)),
                        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                            Err(Handshake::Failed(e))
                        }
                        Err(e) => Err(Handshake::Dropped(e)),
                    }
                })
                .await;
            match opened {
                Ok((s, rtt)) => {
                    record(rtt);
                    s
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "cannot probe");
                    return;
                }
            }
        }
    };
    for _ in 1..PROBE_ROUNDS {
        match round_trip(&mut stream).await {
            Ok(rtt) => record(rtt),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "probe failed");
                return;
            }
        }
    }
    client.keep_probe_stream(peer, stream);
}

async fn round_trip(stream: &mut Stream) -> std::io::Result<Duration> {
    let nonce = next_nonce();
    let start = Instant::now();
    stream.write_all(&nonce).await?;
    stream.flush().await?;
    let mut echo = [0u8; PROBE_NONCE_LEN];
    stream.read_exact(&mut echo).await?;
    let rtt = start.elapsed();
    if echo != nonce {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "probe echo does not match the nonce",
        ));
    }
    Ok(rtt)
}

fn next_nonce() -> [u8; PROBE_NONCE_LEN] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes()
}

/// The background task of a serving node that keeps its `next_rtts`
/// current: every `refresh`, and soon after a trigger (a new announcement
/// target, a new DHT peer), it looks up the holders of block `end` of the
/// announced model, probes up to [`MAX_PROBED_NEXT_HOPS`] of them and hands
/// the results to the event loop, which signs them into the next
/// announcement. Ends when `stop` changes or its sender is dropped, or when
/// every [`Client`] is gone.
pub(crate) fn spawn_next_hop_task(
    weak: WeakClient,
    trigger: std::sync::Arc<Notify>,
    refresh: Duration,
    mut stop: watch::Receiver<()>,
) {
    let min_gap = (refresh / 4).clamp(Duration::from_millis(500), Duration::from_secs(10));
    tokio::spawn(async move {
        let mut last_round: Option<Instant> = None;
        let mut next_periodic = Instant::now() + refresh;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = trigger.notified() => {
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(TRIGGER_DEBOUNCE) => {}
                    }
                }
                _ = tokio::time::sleep_until(next_periodic) => {}
            }
            if let Some(t) = last_round {
                let earliest = t + min_gap;
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep_until(earliest) => {}
                }
            }
            let Some(client) = weak.upgrade() else {
                return;
            };
            tokio::select! {
                _ = stop.changed() => return,
                _ = next_hop_round(&client) => {}
            }
            last_round = Some(Instant::now());
            next_periodic = Instant::now() + refresh;
        }
    });
}

/// One measurement round (see [`spawn_next_hop_task`]).
async fn next_hop_round(client: &Client) {
    let Ok(Some(target)) = client.call(|reply| Command::NextHopTarget { reply }).await else {
        return;
    };
    let me = client.peer_id();
    // Holders of block `end` with their verified infos, from the cache
    // (`block_holders` syncs it when stale): no request per holder.
    let holders: Vec<PeerId> = match client.block_holders(&target.model_id, target.end).await {
        Ok(h) => h.into_iter().filter(|p| *p != me).collect(),
        Err(_) => return,
    };
    let chosen = if holders.len() <= MAX_PROBED_NEXT_HOPS {
        holders
    } else {
        // More candidates than probes: prefer those whose range starts at
        // our end (a chain can only continue at a range's start), then an
        // order of this node's own (every node picking the same few would
        // crowd them with probes).
        let Ok(infos) = client.cached_infos(Some(&target.model_id)).await else {
            return;
        };
        let starts: HashMap<PeerId, u32> = infos
            .into_iter()
            .filter(|(_, i)| i.holds(target.end))
            .map(|(p, i)| (p, i.start))
            .collect();
        let mut ranked: Vec<(bool, [u8; 32], PeerId)> = holders
            .into_iter()
            .filter_map(|p| {
                let start = starts.get(&p)?;
                let mut h = blake3::Hasher::new();
                h.update(&me.to_bytes());
                h.update(&p.to_bytes());
                Some((*start != target.end, *h.finalize().as_bytes(), p))
            })
            .collect();
        ranked.sort_unstable();
        ranked
            .into_iter()
            .take(MAX_PROBED_NEXT_HOPS)
            .map(|(_, _, p)| p)
            .collect()
    };
    let mut rtts: Vec<NextRtt> = stream::iter(chosen)
        .map(|p| async move { (p, probe_rtt(client, p).await) })
        .buffer_unordered(MAX_PROBED_NEXT_HOPS)
        .filter_map(|(p, rtt)| async move {
            rtt.map(|d| NextRtt {
                peer_id: p.to_base58(),
                rtt_ms: (d.as_secs_f64() * 1000.0) as f32,
            })
        })
        .collect()
        .await;
    rtts.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    rtts.truncate(MAX_NEXT_RTTS);
    tracing::debug!(
        model = %target.model_id,
        block = target.end,
        measured = rtts.len(),
        "next-hop RTTs measured"
    );
    let _ = client
        .call(|reply| Command::SetNextRtts {
            target,
            rtts,
            reply,
        })
        .await;
}

/// Peer ids of a `next_rtts` list, for comparing two lists as sets.
pub(crate) fn peer_set(rtts: &[NextRtt]) -> HashSet<&str> {
    rtts.iter().map(|r| r.peer_id.as_str()).collect()
}
