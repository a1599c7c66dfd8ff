//! Hostile peers against real `nakshatra node join` processes: a real
//! libp2p peer in this test process speaks the node's protocols wrongly
//! (oversized length prefixes, stream floods, a last hop that sends token
//! ids outside the vocabulary), and the test checks what the victim does:
//! refuses at once, stays within its memory bound, keeps serving honest
//! asks, and never aborts.

use std::time::Duration;

use futures::{AsyncReadExt, StreamExt};
use nakshatra_e2e::attack::{closed_by_victim, flood, lying_frames, peer};
use nakshatra_e2e::*;
use nakshatra_node::net::{read_frame, read_message, write_frame};
use nakshatra_swarm::protocol::act::{
    ActFrame, ActReply, HopSpec, OpenSession, Sampling, TokenFrame, WireDtype, ACT_PROTOCOL,
    TOKENS_PROTOCOL,
};
use nakshatra_swarm::{Client, PeerId, ServerInfo, Stream, StreamProtocol};

const PROMPT: &str = "The capital of France is";
const GREEDY: &[&str] = &["--raw", "--temperature", "0", "--max-tokens", "8"];
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

    let frames = lying_frames();
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
    let e = ask_through_a_fake_last_hop(i32::MAX).await;
    assert!(e.contains("outside the vocabulary"), "{e}");
}

/// A last hop that sends tokens (valid ones) but never the logits digest
/// owed after each: the asker refuses the second step's token (the first
/// step's digest must come before it) and fails with a clear error naming
/// the hop, instead of keeping tokens it could never verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_hop_withholding_digests_is_a_clear_error() {
    let e = ask_through_a_fake_last_hop(42).await;
    assert!(e.contains("unexpected token frame"), "{e}");
}

/// Runs `node ask` through a node serving 0..20 and a fake last hop
/// answering every step with `token` and no digest; returns the asker's
/// stderr after checking it failed cleanly, naming the fake hop.
async fn ask_through_a_fake_last_hop(token: i32) -> String {
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
            tokio::spawn(serve_garbage_tokens(f.clone(), s, token));
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
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains(&fake.peer_id().to_string()), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    drop(node);
    e
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
    liar.announce(claim(&info, 0..30, 5e4, 1)).await.unwrap();
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
    let (greedy, _task) = greedy_peer(&boot).await;
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
        direct: true,
        ring: None,
    };
    let me = greedy.peer_id().to_string();
    let mut held = Vec::new();
    for i in 0..3 {
        let (s, reply) = send_open(&greedy, victim, open(vec![hop(0, 30)], me.clone())).await;
        match (i, reply) {
            (0 | 1, ActReply::Ready { .. }) => held.push(s),
            (2, ActReply::Failed(f)) => {
                assert!(f.message.contains("share"), "{}", f.message)
            }
            (i, r) => panic!("open {i}: {r:?}"),
        }
    }
    let stranger = PeerId::random().to_string();
    let (_, r) = send_open(&greedy, victim, open(vec![hop(0, 30)], stranger)).await;
    assert!(
        matches!(&r, ActReply::Failed(f) if f.message.contains("another peer")),
        "{r:?}"
    );
    let (_, r) = send_open(&greedy, victim, open(vec![hop(0, 20)], me.clone())).await;
    assert!(matches!(&r, ActReply::Failed(_)), "{r:?}");

    let asker = tempfile::tempdir().unwrap();
    let o = tokio::task::spawn_blocking(move || node_ask(&boot, asker.path(), GREEDY, PROMPT))
        .await
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want.trim());
    drop(held);
}

/// A client peer that takes the token streams a victim opens back to it,
/// and keeps them.
async fn greedy_peer(boot: &str) -> (Client, tokio::task::JoinHandle<()>) {
    let (greedy, task) = peer(boot, false).await;
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
    (greedy, task)
}

/// An `Open` of a one-hop chain: `victim` runs the whole model for
/// `asker`, greedy sampling.
fn whole_model_open(model_id: &str, victim: PeerId, asker: PeerId) -> OpenSession {
    OpenSession {
        session: rand_session(),
        model_id: model_id.to_string(),
        hops: vec![HopSpec {
            peer_id: victim.to_string(),
            start: 0,
            end: 30,
            addrs: Vec::new(),
        }],
        index: 0,
        sampling: Sampling {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            seed: 0,
        },
        wire: WireDtype::F32,
        asker: asker.to_string(),
        direct: true,
        ring: None,
    }
}

/// Attack 3, keep-alive and Sybil askers: two identities each take their
/// share of a two-session node and keep the sessions open without a step
/// (a keep-alive every few minutes would do the same under the idle
/// timeout). Once idle for `--evict-idle-after`, the sessions count as
/// free again, and an honest ask evicts the idlest and is answered; the
/// evicted session's holder hears why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_give_their_slots_up_to_an_honest_ask() {
    let model = test_model();
    let model = model.to_str().unwrap().to_string();
    let want = run_reference(&model, GREEDY, PROMPT);
    let model_id = inspect(&model)["id"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut args = loopback_args(None);
    args.extend_from_slice(&["--model", &model, "--layers", "0..30", "--ctx-size", "512"]);
    args.extend_from_slice(&["--record-ttl", "8", "--refresh", "2"]);
    args.extend_from_slice(&["--max-sessions", "2", "--evict-idle-after", "2"]);
    let node = Proc::join(dir.path(), &args);
    let boot = node.addr().to_string();
    let victim: PeerId = node.peer_id().parse().unwrap();
    let mut held = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (sybil, task) = greedy_peer(&boot).await;
        let open = whole_model_open(&model_id, victim, sybil.peer_id());
        let (s, reply) = send_open(&sybil, victim, open).await;
        assert!(matches!(reply, ActReply::Ready { .. }), "{reply:?}");
        held.push(s);
        tasks.push((sybil, task));
    }
    // Both slots are taken; once idle for `--evict-idle-after` (2 s) they
    // may be evicted, and count as free in the node's announcements.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let asker = tempfile::tempdir().unwrap();
    let o = tokio::task::spawn_blocking(move || node_ask(&boot, asker.path(), GREEDY, PROMPT))
        .await
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want.trim());
    let mut evicted = 0;
    for s in &mut held {
        let r = tokio::time::timeout(Duration::from_secs(1), read_message::<_, ActReply>(s)).await;
        if let Ok(Ok(ActReply::Failed(f))) = r {
            assert!(f.message.contains("evicted"), "{}", f.message);
            evicted += 1;
        }
    }
    assert!(evicted >= 1, "no idle session was evicted");
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

/// Plays the last hop of a session: ready at once, then `token` for every
/// step and no logits digest after it.
async fn serve_garbage_tokens(fake: Client, s: Stream, token: i32) {
    let (mut r, mut w) = s.split();
    let Ok(ActFrame::Open(open)) = read_message::<_, ActFrame>(&mut r).await else {
        return;
    };
    if write_frame(
        &mut w,
        &ActReply::Ready {
            kept: vec![0],
            ring: false,
        },
        &[],
    )
    .await
    .is_err()
    {
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
            token,
            compute_us: 0,
        };
        if write_frame(&mut tokens, &t, &[]).await.is_err() {
            return;
        }
    }
}

/// The last `chain:` line `node ask` printed (the chain that answered).
fn chain_line(stderr: &str) -> String {
    stderr
        .lines()
        .rfind(|l| l.starts_with("chain:"))
        .unwrap_or_default()
        .to_string()
}

/// Attack 5, lies that attract traffic: a node announces the whole model
/// at 20,000 tokens/s (under the cap on impossible figures, far above what
/// it delivers: every step it runs waits 150 ms more, while its probe
/// echoes stay fast). The first ask goes
/// through it (the answer is still right: it computes honestly, slowly),
/// measures it, and says so; the asker's node remembers, so the next ask
/// plans the honest chain. A record announcing an impossible rate is not
/// even taken (see `protocol/tests/record.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_that_overclaims_is_measured_and_demoted() {
    let model = test_model();
    let model = model.to_str().unwrap().to_string();
    let want = run_reference(&model, GREEDY, PROMPT);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Proc::join(dirs[0].path(), &join_args(&model, "0..15", None));
    let boot = a.addr().to_string();
    let b = Proc::join(dirs[1].path(), &join_args(&model, "15..30", Some(&boot)));
    let mut liar_args = join_args(&model, "0..30", Some(&boot));
    liar_args.extend_from_slice(&["--fault", "overclaim"]);
    let liar = Proc::join(dirs[2].path(), &liar_args);
    let all = wait_for(Duration::from_secs(30), || {
        status_json(&boot).filter(|v| holders(v, 0).len() == 2 && holders(v, 29).len() == 2)
    });
    assert!(all.is_some(), "the swarm never formed");

    let asker = tempfile::tempdir().unwrap();
    let ask = |asker: std::path::PathBuf| {
        let boot = boot.clone();
        tokio::task::spawn_blocking(move || node_ask(&boot, &asker, GREEDY, PROMPT))
    };
    let first = ask(asker.path().to_path_buf()).await.unwrap();
    let e1 = String::from_utf8_lossy(&first.stderr).into_owned();
    assert!(first.status.success(), "{e1}");
    assert_eq!(String::from_utf8_lossy(&first.stdout).trim(), want.trim());
    assert!(chain_line(&e1).contains(&liar.peer_id()), "{e1}");
    assert!(e1.contains("marked slower for later asks"), "{e1}");
    let memory = std::fs::read_to_string(asker.path().join("peers.json")).unwrap();
    assert!(memory.contains(&liar.peer_id()), "{memory}");

    let second = ask(asker.path().to_path_buf()).await.unwrap();
    let e2 = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(second.status.success(), "{e2}");
    assert_eq!(String::from_utf8_lossy(&second.stdout).trim(), want.trim());
    let chain = chain_line(&e2);
    assert!(
        chain.contains(&a.peer_id()) && chain.contains(&b.peer_id()),
        "{e2}"
    );
    assert!(!chain.contains(&liar.peer_id()), "{e2}");
}

/// Attack 5, forged blame: the middle hop of a chain, at the prefill,
/// reports that the last hop failed, in a report signed in the last
/// hop's name with a stranger's key. Hop 1 checks it, refuses it, and
/// reports its next hop (the forger) instead; the asker counts that
/// against the forger (and the reporter, who cannot prove it), never
/// against the last hop, and answers through the honest middle node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_failure_report_blames_the_forger_not_its_victim() {
    let model = test_model();
    let model = model.to_str().unwrap().to_string();
    let want = run_reference(&model, GREEDY, PROMPT);
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = Proc::join(dirs[0].path(), &join_args(&model, "0..10", None));
    let boot = first.addr().to_string();
    let last = Proc::join(dirs[1].path(), &join_args(&model, "20..30", Some(&boot)));
    let mut forger_args = join_args(&model, "10..20", Some(&boot));
    // It also announces a great rate, so that it is planned first.
    forger_args.extend_from_slice(&["--fault", "forge-blame"]);
    let forger = Proc::join(dirs[2].path(), &forger_args);
    let honest = Proc::join(dirs[3].path(), &join_args(&model, "10..20", Some(&boot)));
    // Every link of both chains measured: an unmeasured one costs the
    // default 50 ms in a plan, more than the honest node's own step.
    let links = [
        (first.peer_id(), forger.peer_id()),
        (first.peer_id(), honest.peer_id()),
        (forger.peer_id(), last.peer_id()),
        (honest.peer_id(), last.peer_id()),
    ];
    let all = wait_for(Duration::from_secs(30), || {
        status_json(&boot).filter(|v| {
            holders(v, 15).len() == 2
                && holders(v, 25).len() == 1
                && links.iter().all(|(a, b)| link_measured(v, a, b))
        })
    });
    assert!(all.is_some(), "the swarm never formed");

    let asker = tempfile::tempdir().unwrap();
    let dir = asker.path().to_path_buf();
    let o = tokio::task::spawn_blocking(move || node_ask(&boot, &dir, GREEDY, PROMPT))
        .await
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{e}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want.trim());
    let failed = e
        .lines()
        .find(|l| l.contains("attempt 1 failed"))
        .unwrap_or_default();
    assert!(
        failed.contains(&format!("hop 1 ({})", forger.peer_id())),
        "{e}"
    );
    assert!(failed.contains("does not check"), "{e}");
    let chain = chain_line(&e);
    assert!(chain.contains(&honest.peer_id()), "{e}");
    let memory: serde_json::Value =
        serde_json::from_slice(&std::fs::read(asker.path().join("peers.json")).unwrap()).unwrap();
    assert!(memory.get(forger.peer_id()).is_some(), "{memory}");
    let last_failures = memory
        .get(last.peer_id())
        .and_then(|e| e["failures"].as_u64())
        .unwrap_or(0);
    assert_eq!(last_failures, 0, "{memory}");
}

/// Finding 7, the port scanner: an `Open` names a next hop "at" an address
/// of the asker's choosing (here a TCP port this test listens on). The
/// victim never dials addresses an `Open` gives: it looks the next hop up
/// (its own signed record, which this made-up peer has none of), reports
/// it unreachable, and the port sees no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_cannot_make_a_hop_dial_an_address_of_the_askers_choosing() {
    let model = test_model();
    let model = model.to_str().unwrap().to_string();
    let model_id = inspect(&model)["id"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let node = Proc::join(dir.path(), &join_args(&model, "0..10", None));
    let boot = node.addr().to_string();
    let victim: PeerId = node.peer_id().parse().unwrap();
    let (scanner, _task) = peer(&boot, false).await;
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    target.set_nonblocking(true).unwrap();
    let port = target.local_addr().unwrap().port();
    let made_up = PeerId::random();
    let mut open = whole_model_open(&model_id, victim, scanner.peer_id());
    open.hops = vec![
        HopSpec {
            peer_id: victim.to_string(),
            start: 0,
            end: 10,
            addrs: Vec::new(),
        },
        HopSpec {
            peer_id: made_up.to_string(),
            start: 10,
            end: 30,
            addrs: vec![format!("/ip4/127.0.0.1/tcp/{port}/p2p/{made_up}")],
        },
    ];
    let (_s, reply) = send_open(&scanner, victim, open).await;
    match reply {
        ActReply::Failed(f) => assert_eq!((f.reporter, f.blamed), (0, 1), "{f:?}"),
        r => panic!("{r:?}"),
    }
    std::thread::sleep(Duration::from_millis(500));
    match target.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the victim dialled the address the Open gave: {other:?}"),
    }
}

/// Attack 6, wrong results, and `node ask --verify`: layers 0..15 are
/// served by A and A3, 15..30 by B and B2, all honest. An ask with
/// `--verify 0.5` checks its chain on the replica and says so. Then L
/// joins, serving 0..15 and announcing a great rate, and returns wrong
/// hidden states. An ask with `--verify 1` (through L, or past it with L
/// as the replica) finds the mismatch, replays hop by hop, names and bans
/// L; the next ask leaves L out and gives the whole model's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_catches_and_bans_a_hop_returning_wrong_results() {
    let model = test_model();
    let model = model.to_str().unwrap().to_string();
    let want = run_reference(&model, GREEDY, PROMPT);
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Proc::join(dirs[0].path(), &join_args(&model, "0..15", None));
    let boot = a.addr().to_string();
    let _a3 = Proc::join(dirs[1].path(), &join_args(&model, "0..15", Some(&boot)));
    let _b = Proc::join(dirs[2].path(), &join_args(&model, "15..30", Some(&boot)));
    let _b2 = Proc::join(dirs[3].path(), &join_args(&model, "15..30", Some(&boot)));
    let ready = wait_for(Duration::from_secs(30), || {
        status_json(&boot).filter(|v| holders(v, 0).len() == 2 && holders(v, 29).len() == 2)
    });
    assert!(ready.is_some(), "the swarm never formed");
    let asker = tempfile::tempdir().unwrap();
    let ask = |extra: &'static [&'static str]| {
        let (boot, dir) = (boot.clone(), asker.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            let mut args = GREEDY.to_vec();
            args.extend_from_slice(extra);
            node_ask(&boot, &dir, &args, PROMPT)
        })
    };

    let o = ask(&["--verify", "0.5"]).await.unwrap();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{e}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want.trim());
    assert!(
        e.contains("against a replica chain") && e.contains("all equal"),
        "{e}"
    );
    // The chain checked rang (fed itself every step after the first).
    let stats = e
        .lines()
        .find(|l| l.starts_with("stats:"))
        .unwrap_or_default();
    assert!(stats.contains("ring 7 steps"), "{e}");

    let mut liar_args = join_args(&model, "0..15", Some(&boot));
    liar_args.extend_from_slice(&["--fault", "corrupt-output"]);
    let liar = Proc::join(dirs[4].path(), &liar_args);
    let seen = wait_for(Duration::from_secs(30), || {
        status_json(&boot).filter(|v| holders(v, 0).len() == 3)
    });
    assert!(seen.is_some(), "the liar never showed up");
    let o = ask(&["--verify", "1"]).await.unwrap();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("verification failed at step 0"), "{e}");
    // L announces the best rate, so it is planned into the chain, unless
    // its probe was late (3 s; a loaded 2-core machine): then the chain
    // is honest and L is the replica it is checked against. Either way
    // the hybrids and the third peer must name L, on its side.
    let finding = if chain_line(&e).contains(&liar.peer_id()) {
        format!(
            "hop 0 ({}) of the chain returned wrong results; banned",
            liar.peer_id()
        )
    } else {
        format!(
            "the replica of hop 0 ({}) returned wrong results; banned",
            liar.peer_id()
        )
    };
    assert!(e.contains(&finding), "{e}");

    let o = ask(&[]).await.unwrap();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{e}");
    assert!(!chain_line(&e).contains(&liar.peer_id()), "{e}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want.trim());
}
