//! The attacker of the hostile-peer tests and of the `hostile` bench: a
//! real libp2p peer in the test process that floods a node's stream
//! protocols with frames whose length prefixes lie.
//!
//! [`flood`] opens [`FLOOD`] streams of one protocol and keeps them (the
//! test checks that the victim closes every one at once);
//! [`Flooder`] keeps a victim under that attack for as long as it runs,
//! opening a new stream as soon as the victim closes one (the bench
//! measures honest asks meanwhile).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use nakshatra_swarm::protocol::act::{
    ActFrame, StepHeader, StepKind, VocabRequest, ACT_PROTOCOL, VOCAB_PROTOCOL,
};
use nakshatra_swarm::protocol::encode;
use nakshatra_swarm::protocol::fetch::{
    ManifestRequest, PieceRef, PieceRequest, MANIFEST_PROTOCOL, PIECE_PROTOCOL,
};
use nakshatra_swarm::{
    Client, IdentityKeypair, Multiaddr, PeerId, Stream, StreamProtocol, SwarmConfig,
};

/// Streams the attacker opens per protocol.
pub const FLOOD: usize = 64;
/// A payload length just under the global frame cap (256 MiB).
pub const HUGE: u32 = 255 << 20;

/// A libp2p peer of our own, bootstrapped to `bootstrap`: a server (it
/// listens on loopback and announces with the tests' short record TTL) or
/// a client.
pub async fn peer(bootstrap: &str, server: bool) -> (Client, tokio::task::JoinHandle<()>) {
    let mut cfg = if server {
        let mut c = SwarmConfig::server();
        c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        c.record_ttl = Duration::from_secs(8);
        c.refresh = Duration::from_secs(2);
        c
    } else {
        SwarmConfig::client()
    };
    cfg.bootstrap = vec![bootstrap.parse::<Multiaddr>().unwrap()];
    cfg.mdns = false;
    let (client, task) = nakshatra_swarm::spawn(IdentityKeypair::generate_ed25519(), cfg)
        .await
        .unwrap();
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    (client, task)
}

/// A frame whose header is `header` and whose length prefix announces
/// `announced` payload bytes, followed by 1 KiB of them (then nothing).
pub fn lying_frame(h: Vec<u8>, announced: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(h.len() as u32).to_le_bytes());
    v.extend_from_slice(&h);
    v.extend_from_slice(&announced.to_le_bytes());
    v.extend_from_slice(&[0x5a; 1024]);
    v
}

/// One lying frame for each stream protocol a serving node answers (a
/// step, a vocabulary, a manifest and a piece request), each announcing
/// [`HUGE`] payload bytes.
pub fn lying_frames() -> [(&'static str, Vec<u8>); 4] {
    let step = ActFrame::Step(StepHeader {
        step: 0,
        pos: 0,
        n_tokens: 1,
        kind: StepKind::Tokens,
        compute_us: 0,
        draft: vec![],
        ring: false,
    });
    let model_id = "ab".repeat(32);
    [
        (ACT_PROTOCOL, lying_frame(encode(&step).unwrap(), HUGE)),
        (
            VOCAB_PROTOCOL,
            lying_frame(
                encode(&VocabRequest {
                    model_id: model_id.clone(),
                })
                .unwrap(),
                HUGE,
            ),
        ),
        (
            MANIFEST_PROTOCOL,
            lying_frame(
                encode(&ManifestRequest {
                    model_id: model_id.clone(),
                })
                .unwrap(),
                HUGE,
            ),
        ),
        (
            PIECE_PROTOCOL,
            lying_frame(
                encode(&PieceRequest {
                    model_id,
                    piece: PieceRef::Block(0),
                    offset: 0,
                    len: 1 << 20,
                })
                .unwrap(),
                HUGE,
            ),
        ),
    ]
}

/// Opens `FLOOD` streams of `protocol` to `victim`, writes `frame` on each
/// and keeps them open. Streams that cannot even be opened count as
/// refused.
pub async fn flood(
    attacker: &Client,
    victim: PeerId,
    protocol: &'static str,
    frame: &[u8],
) -> Vec<Stream> {
    let mut control = attacker.stream_control();
    let mut streams = Vec::new();
    for _ in 0..FLOOD {
        let open = control.open_stream(victim, StreamProtocol::new(protocol));
        if let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(5), open).await {
            let _ = s.write_all(frame).await;
            let _ = s.flush().await;
            streams.push(s);
        }
    }
    streams
}

/// How many of `streams` the victim closed within `within` (a read ends
/// or fails instead of blocking).
pub async fn closed_by_victim(streams: &mut [Stream], within: Duration) -> usize {
    let reads = streams.iter_mut().map(|s| async move {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(within, s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    });
    futures::future::join_all(reads)
        .await
        .into_iter()
        .filter(|closed| *closed)
        .count()
}

/// What a [`Flooder`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloodCount {
    /// Streams opened and written to.
    pub opened: u64,
    /// Of those, streams the victim closed (within [`Flooder::PATIENCE`]).
    pub closed: u64,
    /// Of those, streams the victim left open for [`Flooder::PATIENCE`]
    /// (then dropped by the attacker). Streams still waiting when the
    /// flood stops count as neither.
    pub hung: u64,
    /// Streams that could not be opened at all.
    pub refused: u64,
}

/// A continuous flood: [`FLOOD`] streams of each of the four protocols to
/// one victim, each sending its [`lying_frames`] frame and, as soon as the
/// victim closes it (or after [`Flooder::PATIENCE`]), replaced by a new
/// one. Runs on the current tokio runtime until [`Flooder::stop`].
pub struct Flooder {
    stop: Arc<AtomicBool>,
    counts: Arc<Counters>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct Counters {
    opened: AtomicU64,
    closed: AtomicU64,
    hung: AtomicU64,
    refused: AtomicU64,
}

impl Flooder {
    /// How long an attacking stream waits for the victim to close it
    /// before it is dropped and replaced.
    pub const PATIENCE: Duration = Duration::from_secs(2);

    /// Starts flooding `victim` from `attacker` (inside a tokio runtime).
    pub fn start(attacker: &Client, victim: PeerId) -> Flooder {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counters::default());
        let mut tasks = Vec::new();
        for (protocol, frame) in lying_frames() {
            let frame: Arc<[u8]> = frame.into();
            for _ in 0..FLOOD {
                let mut control = attacker.stream_control();
                let (stop, frame, n) = (stop.clone(), frame.clone(), counts.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let open = control.open_stream(victim, StreamProtocol::new(protocol));
                        let Ok(Ok(mut s)) = tokio::time::timeout(Flooder::PATIENCE, open).await
                        else {
                            n.refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        let _ = s.write_all(&frame).await;
                        let _ = s.flush().await;
                        n.opened.fetch_add(1, Ordering::Relaxed);
                        let one = std::slice::from_mut(&mut s);
                        if closed_by_victim(one, Flooder::PATIENCE).await == 1 {
                            n.closed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            n.hung.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        Flooder {
            stop,
            counts,
            tasks,
        }
    }

    /// What it did so far.
    pub fn count(&self) -> FloodCount {
        let n = &self.counts;
        FloodCount {
            opened: n.opened.load(Ordering::Relaxed),
            closed: n.closed.load(Ordering::Relaxed),
            hung: n.hung.load(Ordering::Relaxed),
            refused: n.refused.load(Ordering::Relaxed),
        }
    }

    /// Stops it (every stream it holds is dropped) and says what it did.
    pub async fn stop(self) -> FloodCount {
        self.stop.store(true, Ordering::Relaxed);
        let count = self.count();
        for t in &self.tasks {
            t.abort();
        }
        futures::future::join_all(self.tasks).await;
        count
    }
}
