//! Hostile peers against real `nakshatra node join` processes: a real
//! libp2p peer in this test process speaks the node's protocols wrongly
//! (oversized length prefixes, stream floods, a last hop that sends token
//! ids outside the vocabulary), and the test checks what the victim does:
//! refuses at once, stays within its memory bound, keeps serving honest
//! asks, and never aborts.

use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use nakshatra_e2e::*;
use nakshatra_node::net::{read_frame, read_message, write_frame};
use nakshatra_swarm::protocol::act::{
    ActFrame, ActReply, HopSpec, OpenSession, Sampling, StepHeader, StepKind, TokenFrame,
    VocabRequest, WireDtype, ACT_PROTOCOL, TOKENS_PROTOCOL, VOCAB_PROTOCOL,
};
use nakshatra_swarm::protocol::encode;
use nakshatra_swarm::protocol::fetch::{
    ManifestRequest, PieceRef, PieceRequest, MANIFEST_PROTOCOL, PIECE_PROTOCOL,
};
use nakshatra_swarm::{
    Client, IdentityKeypair, Multiaddr, PeerId, ServerInfo, Stream, StreamProtocol, SwarmConfig,
};

const PROMPT: &str = "The capital of France is";
const GREEDY: &[&str] = &["--raw", "--temperature", "0", "--max-tokens", "8"];
/// Streams the attacker opens per protocol.
const FLOOD: usize = 64;
/// A payload length just under the global frame cap (256 MiB).
const HUGE: u32 = 255 << 20;
/// Most the victim's peak resident memory may grow under the flood. The
/// pre-fix node zero-filled every announced payload: 64 streams × 255 MiB.
const MEMORY_BOUND_KIB: u64 = 64 * 1024;

fn join_args<'a>(model: &'a str, layers: &'a str, bootstrap: Option<&'a str>) -> Vec<&'a str> {
    let mut v = loopback_args(bootstrap);
    v.extend_from_slice(&["--model", model, "--layers", layers]);
    v.extend_from_slice(&["--max-sessions", "4", "--ctx-size", "512"]);
    v.extend_from_slice(&["--record-ttl", "8", "--refresh", "2"]);
    v
}

/// A libp2p peer of our own, bootstrapped to `bootstrap`.
async fn peer(bootstrap: &str, server: bool) -> (Client, tokio::task::JoinHandle<()>) {
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

/// `nakshatra model inspect --json` of `model`.
fn inspect(model: &str) -> serde_json::Value {
    let o = nakshatra(&["model", "inspect", model, "--json"]);
    serde_json::from_slice(&o.stdout).unwrap()
}

/// What a fake node claims: `range` of the inspected model `info`, at
/// `throughput` tok/s, with four free sessions of `context` tokens.
fn claim(
    info: &serde_json::Value,
    range: std::ops::Range<u32>,
    throughput: f64,
    context: u32,
) -> ServerInfo {
    let mut si = ServerInfo::new(
        info["id"].as_str().unwrap(),
        info["arch"].as_str().unwrap(),
        30,
        range,
        info["n_embd"].as_u64().unwrap() as u32,
    );
    si.throughput = throughput;
    si.max_sessions = 4;
    si.free_sessions = 4;
    si.context_per_session = context;
    si
}

/// A frame whose header is `header` and whose length prefix announces
/// `announced` payload bytes, followed by 1 KiB of them (then nothing).
fn lying_frame(h: Vec<u8>, announced: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(h.len() as u32).to_le_bytes());
    v.extend_from_slice(&h);
    v.extend_from_slice(&announced.to_le_bytes());
    v.extend_from_slice(&[0x5a; 1024]);
    v
}

/// Opens `FLOOD` streams of `protocol` to `victim`, writes `frame` on each
/// and keeps them open. Streams that cannot even be opened count as
/// refused.
async fn flood(
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
async fn closed_by_victim(streams: &mut [Stream], within: Duration) -> usize {
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

/// Attack 1: length prefixes that announce 255 MiB, on 64 streams of
/// every protocol the node serves. The node refuses each at once (the
/// streams over the peer's share unread, the others at the length
/// prefix), its peak memory stays flat, and an honest ask during the
/// flood gets the whole model's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_prefix_floods_are_refused_at_once() {
    let model = test_model();
    let model = model.to_str().unwrap().to_string();
    let want = run_reference(&model, GREEDY, PROMPT);
    let dir = tempfile::tempdir().unwrap();
    let node = Proc::join(dir.path(), &join_args(&model, "0..30", None));
    let boot = node.addr().to_string();
    let victim: PeerId = node.peer_id().parse().unwrap();
    let (attacker, _task) = peer(&boot, false).await;
    let (_, peak_before) = node.memory_kib().unwrap();

    let step = ActFrame::Step(StepHeader {
        step: 0,
        pos: 0,
        n_tokens: 1,
        kind: StepKind::Tokens,
        compute_us: 0,
    });
    let model_id = "ab".repeat(32);
    let frames: [(&'static str, Vec<u8>); 4] = [
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
    ];
    let mut held = Vec::new();
    for (protocol, frame) in &frames {
        let mut streams = flood(&attacker, victim, protocol, frame).await;
        let closed = closed_by_victim(&mut streams, Duration::from_secs(3)).await;
        assert_eq!(
            closed,
            streams.len(),
            "{protocol}: {} of {} streams left hanging",
            streams.len() - closed,
            streams.len()
        );
        held.extend(streams);
    }
    assert!(
        node.memory_kib().is_some(),
        "the node died: {}",
        node.stderr()
    );
    let (_, peak_after) = node.memory_kib().unwrap();
    eprintln!("peak resident memory: {peak_before} KiB before the flood, {peak_after} KiB after");
    assert!(
        peak_after < peak_before + MEMORY_BOUND_KIB,
        "peak memory grew from {peak_before} to {peak_after} KiB"
    );

    // An honest ask while the attacker is still connected.
    let asker = tempfile::tempdir().unwrap();
    let o = tokio::task::spawn_blocking(move || node_ask(&boot, asker.path(), GREEDY, PROMPT))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(text.trim(), want.trim());
    drop(held);
}

/// A NaN temperature never reaches llama.cpp: the hop refuses the session
/// with a clear message, and stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_sampling_is_refused_by_the_hop() {
    let model = test_model();
    let model = model.to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut node = Proc::join(dir.path(), &join_args(&model, "0..30", None));
    let boot = node.addr().to_string();
    let asker = tempfile::tempdir().unwrap();
    let b = boot.clone();
    let o = tokio::task::spawn_blocking(move || {
        node_ask(
            &b,
            asker.path(),
            &["--raw", "--temperature", "NaN", "--max-tokens", "4"],
            PROMPT,
        )
    })
    .await
    .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("sampling parameters out of range"), "{e}");
    assert!(node.is_running(), "{}", node.stderr());
}

/// Attack 4: a last hop that answers every step with a token id outside
/// the vocabulary. The asker checks the id before llama.cpp renders it
/// (an out-of-range id makes llama.cpp throw through `extern "C"`, an
/// abort) and fails with a clear error naming the hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_id_is_a_clear_error_not_an_abort() {
    let model = test_model();
    let model = model.to_str().unwrap().to_string();
    let info = inspect(&model);
    let dir = tempfile::tempdir().unwrap();
    let node = Proc::join(dir.path(), &join_args(&model, "0..20", None));
    let boot = node.addr().to_string();

    // The fake last hop: announces 20..30 and serves the activation
    // protocol with garbage tokens.
    let (fake, _task) = peer(&boot, true).await;
    let mut act = fake
        .stream_control()
        .accept(StreamProtocol::new(ACT_PROTOCOL))
        .unwrap();
    let f = fake.clone();
    tokio::spawn(async move {
        while let Some((_, s)) = act.next().await {
            tokio::spawn(serve_garbage_tokens(f.clone(), s));
        }
    });
    fake.announce(claim(&info, 20..30, 1000.0, 512))
        .await
        .unwrap();
    let full = wait_for(Duration::from_secs(15), || {
        status_json(&boot).filter(|v| covered_blocks(v).len() == 30)
    });
    assert!(full.is_some(), "the fake hop never showed up");

    let asker = tempfile::tempdir().unwrap();
    let o = tokio::task::spawn_blocking(move || node_ask(&boot, asker.path(), GREEDY, PROMPT))
        .await
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("outside the vocabulary"), "{e}");
    assert!(e.contains(&fake.peer_id().to_string()), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// Attack 5, in part: a peer announcing the whole model at 10^6 tok/s
/// with a context of one token. The planner picks it, the prompt does
/// not fit, and the asker plans around it instead of failing with "prompt
/// too long": the answer comes from the honest node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_too_small_for_the_prompt_is_planned_around() {
    let model = test_model();
    let model = model.to_str().unwrap().to_string();
    let want = run_reference(&model, GREEDY, PROMPT);
    let info = inspect(&model);
    let dir = tempfile::tempdir().unwrap();
    let node = Proc::join(dir.path(), &join_args(&model, "0..30", None));
    let boot = node.addr().to_string();
    let (liar, _task) = peer(&boot, true).await;
    liar.announce(claim(&info, 0..30, 1e6, 1)).await.unwrap();
    let both = wait_for(Duration::from_secs(15), || {
        status_json(&boot).filter(|v| holders(v, 0).len() == 2)
    });
    assert!(both.is_some(), "the liar never showed up");

    let asker = tempfile::tempdir().unwrap();
    let o = tokio::task::spawn_blocking(move || node_ask(&boot, asker.path(), GREEDY, PROMPT))
        .await
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    let chain = e
        .lines()
        .find(|l| l.starts_with("chain:"))
        .unwrap_or_default();
    assert!(chain.contains(&node.peer_id()), "{e}");
    assert!(!chain.contains(&liar.peer_id().to_string()), "{e}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want.trim());
}

/// Attack 3, in part: a greedy peer opens sessions (as its own asker) and
/// holds them. It gets its share (half of `--max-sessions 4`: two), the
/// next `Open` is refused, as are `Open`s naming another asker or a chain
/// that does not join up, and an honest `node ask` still gets a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_asker_gets_its_share_of_sessions_not_all() {
    let model = test_model();
    let model = model.to_str().unwrap().to_string();
    let want = run_reference(&model, GREEDY, PROMPT);
    let info = inspect(&model);
    let model_id = info["id"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let node = Proc::join(dir.path(), &join_args(&model, "0..30", None));
    let boot = node.addr().to_string();
    let victim: PeerId = node.peer_id().parse().unwrap();
    let (greedy, _task) = peer(&boot, false).await;
    // Takes the token streams the victim opens back (and keeps them).
    let mut back = greedy
        .stream_control()
        .accept(StreamProtocol::new(TOKENS_PROTOCOL))
        .unwrap();
    tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Some((_, s)) = back.next().await {
            kept.push(s);
        }
    });
    let hop = |start, end| HopSpec {
        peer_id: victim.to_string(),
        start,
        end,
        addrs: Vec::new(),
    };
    let open = |hops: Vec<HopSpec>, asker: String| OpenSession {
        session: rand_session(),
        model_id: model_id.clone(),
        hops,
        index: 0,
        sampling: Sampling {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            seed: 0,
        },
        wire: WireDtype::F32,
        asker,
    };
    let me = greedy.peer_id().to_string();
    let mut held = Vec::new();
    for i in 0..3 {
        let (s, reply) = send_open(&greedy, victim, open(vec![hop(0, 30)], me.clone())).await;
        match (i, reply) {
            (0 | 1, ActReply::Ready) => held.push(s),
            (2, ActReply::Failed { message, .. }) => {
                assert!(message.contains("share"), "{message}")
            }
            (i, r) => panic!("open {i}: {r:?}"),
        }
    }
    let stranger = PeerId::random().to_string();
    let (_, r) = send_open(&greedy, victim, open(vec![hop(0, 30)], stranger)).await;
    assert!(
        matches!(&r, ActReply::Failed { message, .. } if message.contains("another peer")),
        "{r:?}"
    );
    let (_, r) = send_open(&greedy, victim, open(vec![hop(0, 20)], me.clone())).await;
    assert!(matches!(&r, ActReply::Failed { .. }), "{r:?}");

    let asker = tempfile::tempdir().unwrap();
    let o = tokio::task::spawn_blocking(move || node_ask(&boot, asker.path(), GREEDY, PROMPT))
        .await
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want.trim());
    drop(held);
}

/// A session id nobody else uses.
fn rand_session() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now())
}

/// Opens an activation stream to `victim`, sends `open`, and returns the
/// stream and the victim's first reply.
async fn send_open(greedy: &Client, victim: PeerId, open: OpenSession) -> (Stream, ActReply) {
    let mut s = greedy
        .open_stream(victim, StreamProtocol::new(ACT_PROTOCOL))
        .await
        .unwrap();
    write_frame(&mut s, &ActFrame::Open(open), &[])
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(20), read_message::<_, ActReply>(&mut s))
        .await
        .expect("a reply in time")
        .expect("a reply");
    (s, reply)
}

/// Plays the last hop of a session: ready at once, then a token id far
/// outside any vocabulary for every step.
async fn serve_garbage_tokens(fake: Client, s: Stream) {
    let (mut r, mut w) = s.split();
    let Ok(ActFrame::Open(open)) = read_message::<_, ActFrame>(&mut r).await else {
        return;
    };
    if write_frame(&mut w, &ActReply::Ready, &[]).await.is_err() {
        return;
    }
    let Ok(asker) = open.asker.parse::<PeerId>() else {
        return;
    };
    let Ok(mut tokens) = fake
        .open_stream(asker, StreamProtocol::new(TOKENS_PROTOCOL))
        .await
    else {
        return;
    };
    let hello = TokenFrame::Hello {
        session: open.session,
    };
    if write_frame(&mut tokens, &hello, &[]).await.is_err() {
        return;
    }
    while let Ok((ActFrame::Step(h), _)) = read_frame::<_, ActFrame>(&mut r, 64 << 20).await {
        let t = TokenFrame::Token {
            step: h.step,
            token: i32::MAX,
            compute_us: 0,
        };
        if write_frame(&mut tokens, &t, &[]).await.is_err() {
            return;
        }
    }
}
