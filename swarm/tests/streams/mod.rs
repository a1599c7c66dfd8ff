//! Raw streams (`nakshatra_swarm::stream`), the `/nakshatra/probe/1` RTT probe with the
//! test-only link delay, next-hop RTTs in the signed infos, and chain
//! planning over a real swarm on 127.0.0.1. Needs the test-only link
//! delay (`fault-injection`).

use std::time::Duration;

use crate::common::*;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use nakshatra_swarm::{
    plan::{PlanError, PlanOptions},
    IdentityKeypair, PeerId, Role, StreamProtocol, SwarmConfig,
};
use tokio::time::Instant;

const ECHO: StreamProtocol = StreamProtocol::new("/nakshatra-test/echo/1");

async fn start_cfg(cfg: SwarmConfig) -> Node {
    start_with(IdentityKeypair::generate_ed25519(), cfg).await
}

fn server_cfg(bootstrap: Vec<nakshatra_swarm::Multiaddr>, delay: Option<Duration>) -> SwarmConfig {
    let mut c = config(Role::Server, bootstrap);
    c.test_link_delay = delay;
    c
}

/// Serves `ECHO` on `node`: every stream gets its bytes back.
fn serve_echo(node: &Node) {
    let mut incoming = node.client.stream_control().accept(ECHO).unwrap();
    tokio::spawn(async move {
        while let Some((_, stream)) = incoming.next().await {
            tokio::spawn(echo(stream));
        }
    });
}

/// Echoes what `stream` reads, flushing each piece (a direct stream
/// buffers writes until flushed).
async fn echo(mut stream: nakshatra_swarm::stream::Stream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() || stream.flush().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A client that knows a server only through the DHT (bootstrapped to
/// another node; the server's address comes from its signed info and the
/// DHT) opens a raw stream to it with the plain stream control,
/// after every connection to it has closed: the dial by PeerId finds the
/// announced addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_stream_to_a_peer_known_only_through_the_dht() {
    init_tracing();
    let model = model_id(0x61);
    let s0 = start(Role::Server, vec![]).await;
    let s1 = start(Role::Server, vec![s0.addr.clone().unwrap()]).await;
    serve_echo(&s1);
    s0.client.announce(fake_info(&model, 0, 15)).await.unwrap();
    s1.client.announce(fake_info(&model, 15, 30)).await.unwrap();

    let mut cfg = config(Role::Client, vec![s0.addr.clone().unwrap()]);
    cfg.idle_connection_timeout = Duration::from_secs(1);
    let c = start_cfg(cfg).await;
    let view = wait_for(Duration::from_secs(15), "both servers", || async {
        let v = c.client.model_view(&model).await.unwrap();
        v.is_fully_covered().then_some(v)
    })
    .await;
    assert!(view.peers.iter().any(|p| p.peer_id == s1.peer()));

    // Let every connection to s1 close (1 s idle timeout on the client).
    wait_for(Duration::from_secs(20), "disconnect from s1", || async {
        let connected = c.client.connected_peers().await.unwrap();
        (!connected.contains(&s1.peer())).then_some(())
    })
    .await;

    let t = Instant::now();
    let mut control = c.client.stream_control();
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        control.open_stream(s1.peer(), ECHO),
    )
    .await
    .expect("stream within 10 s")
    .expect("stream opens");
    stream.write_all(b"hello, hop").await.unwrap();
    stream.flush().await.unwrap();
    let mut back = [0u8; 10];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello, hop");
    eprintln!("dial + stream + echo took {:?}", t.elapsed());

    // The convenience wrapper connects first; a protocol nobody accepts is
    // refused, not hung.
    let mut s = c.client.open_stream(s1.peer(), ECHO).await.unwrap();
    s.write_all(b"x").await.unwrap();
    s.flush().await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"x");
    let unsupported = tokio::time::timeout(
        Duration::from_secs(10),
        c.client
            .open_stream(s0.peer(), StreamProtocol::new("/nakshatra-test/nobody/1")),
    )
    .await
    .expect("answer within 10 s");
    assert!(unsupported.is_err());
    // A peer nobody knows an address of: an error at once.
    let stranger = PeerId::random();
    let t = Instant::now();
    assert!(c.client.open_stream(stranger, ECHO).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// A hop told another peer's addresses (as the node is, by the chain an
/// asker sends) opens a raw stream to it with the plain control, although
/// nothing else (no DHT, no identify, no connection) ever told it about
/// that peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_stream_with_addresses_given_by_the_node() {
    init_tracing();
    let x = start(Role::Server, vec![]).await;
    serve_echo(&x);
    let y = start(Role::Server, vec![]).await;
    let mut control = y.client.stream_control();
    let unknown =
        tokio::time::timeout(Duration::from_secs(10), control.open_stream(x.peer(), ECHO))
            .await
            .expect("a dial with no address fails at once");
    assert!(unknown.is_err());

    // With `/p2p/<id>` at the end, as printed for bootstrapping.
    let addr = x.addr.clone().unwrap();
    y.client.add_peer_addresses(x.peer(), vec![addr]).await;
    let mut stream =
        tokio::time::timeout(Duration::from_secs(10), control.open_stream(x.peer(), ECHO))
            .await
            .expect("stream within 10 s")
            .expect("stream opens");
    stream.write_all(b"ping").await.unwrap();
    stream.flush().await.unwrap();
    let mut back = [0u8; 4];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
}

/// Probes measure the far side's test-only link delay; every node answers
/// probes (askers too); the delay is exposed to the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_rtt_sees_the_test_link_delay() {
    init_tracing();
    let delay = Duration::from_millis(150);
    let fast = start(Role::Server, vec![]).await;
    let slow = start_cfg(server_cfg(vec![fast.addr.clone().unwrap()], Some(delay))).await;
    let c = start(
        Role::Client,
        vec![fast.addr.clone().unwrap(), slow.addr.clone().unwrap()],
    )
    .await;
    assert_eq!(slow.client.test_link_delay(), Some(delay));
    assert_eq!(c.client.test_link_delay(), None);

    let fast_rtt = c.client.probe_rtt(fast.peer()).await.expect("fast answers");
    let t = Instant::now();
    let slow_rtt = c.client.probe_rtt(slow.peer()).await.expect("slow answers");
    let took = t.elapsed();
    eprintln!("fast {fast_rtt:?}, slow {slow_rtt:?} (probe took {took:?})");
    assert!(fast_rtt < delay, "{fast_rtt:?}");
    assert!(slow_rtt >= delay, "{slow_rtt:?}");
    assert!(slow_rtt < delay + Duration::from_secs(1), "{slow_rtt:?}");
    assert!(took < Duration::from_secs(3));
    // Again, on the kept stream.
    let again = c.client.probe_rtt(slow.peer()).await.unwrap();
    assert!(again >= delay && again < delay + Duration::from_secs(1));

    // Servers probe each other (the delay is the far side's), and the
    // asker answers probes too.
    let s_to_slow = fast.client.probe_rtt(slow.peer()).await.unwrap();
    assert!(s_to_slow >= delay);
    let slow_to_fast = slow.client.probe_rtt(fast.peer()).await.unwrap();
    assert!(slow_to_fast < delay, "{slow_to_fast:?}");
    wait_for(Duration::from_secs(10), "client connected", || async {
        let p = fast.client.connected_peers().await.unwrap();
        p.contains(&c.peer()).then_some(())
    })
    .await;
    let to_client = fast.client.probe_rtt(c.peer()).await;
    assert!(to_client.is_some(), "askers answer probes");

    assert_eq!(c.client.probe_rtt(c.peer()).await, Some(Duration::ZERO));
    let t = Instant::now();
    assert_eq!(c.client.probe_rtt(PeerId::random()).await, None);
    assert!(t.elapsed() <= Duration::from_millis(3500));
}

/// A [0,10) -> {B slow, C fast} [10,20) -> D [20,30): A announces RTTs to
/// both candidates for block 10, B and C to D, D none (last block); the
/// planner picks C, avoids B until C is excluded, and names the gap when
/// both are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_rtts_are_announced_and_steer_the_plan() {
    init_tracing();
    let model = model_id(0x62);
    let delay = Duration::from_millis(200);
    let a = start(Role::Server, vec![]).await;
    let boot = vec![a.addr.clone().unwrap()];
    let b = start_cfg(server_cfg(boot.clone(), Some(delay))).await;
    let c = start_cfg(server_cfg(boot.clone(), None)).await;
    let d = start_cfg(server_cfg(boot.clone(), None)).await;
    a.client.announce(fake_info(&model, 0, 10)).await.unwrap();
    b.client.announce(fake_info(&model, 10, 20)).await.unwrap();
    c.client.announce(fake_info(&model, 10, 20)).await.unwrap();
    d.client.announce(fake_info(&model, 20, 30)).await.unwrap();
    let asker = start(Role::Client, boot.clone()).await;

    let started = Instant::now();
    let info_a = wait_for(Duration::from_secs(30), "A's next_rtts", || async {
        let i = asker.client.server_info(a.peer()).await.ok()?;
        (i.next_rtts.len() == 2).then_some(i)
    })
    .await;
    eprintln!("A announced next_rtts after {:?}", started.elapsed());
    let rtt_of = |info: &nakshatra_swarm::ServerInfo, p: PeerId| {
        info.next_rtts
            .iter()
            .find(|r| r.peer_id == p.to_base58())
            .map(|r| r.rtt_ms)
    };
    let to_b = rtt_of(&info_a, b.peer()).expect("B measured");
    let to_c = rtt_of(&info_a, c.peer()).expect("C measured");
    assert!(to_b >= 200.0, "{to_b}");
    assert!(to_c < to_b, "{to_c} vs {to_b}");
    for mid in [&b, &c] {
        let i = wait_for(Duration::from_secs(20), "B/C next_rtts", || async {
            let i = asker.client.server_info(mid.peer()).await.ok()?;
            (!i.next_rtts.is_empty()).then_some(i)
        })
        .await;
        assert_eq!(i.next_rtts.len(), 1);
        assert!(rtt_of(&i, d.peer()).is_some());
    }
    let info_d = asker.client.server_info(d.peer()).await.unwrap();
    assert!(
        info_d.next_rtts.is_empty(),
        "the last block has no next hop"
    );
    // The view carries them.
    let view = asker.client.model_view(&model).await.unwrap();
    let pa = view.peers.iter().find(|p| p.peer_id == a.peer()).unwrap();
    assert_eq!(pa.next_rtts.len(), 2);

    let t = Instant::now();
    let chain = asker
        .client
        .plan(&model, &PlanOptions::default())
        .await
        .unwrap();
    eprintln!(
        "plan took {:?}: {}",
        t.elapsed(),
        serde_json::to_string(&chain).unwrap()
    );
    let hops: Vec<PeerId> = chain.hops.iter().map(|h| h.peer_id).collect();
    assert_eq!(hops, vec![a.peer(), c.peer(), d.peer()]);
    assert!(chain.hops[0].rtt.is_some(), "first hop probed by the asker");
    assert!(chain.hops[1].rtt.is_some(), "A -> C from A's next_rtts");
    assert!(chain.hops.iter().all(|h| !h.addrs.is_empty()));
    assert!(chain.est_secs_per_token > 0.0);

    // The asker retries without a failed hop.
    let opts = PlanOptions {
        exclude: [c.peer()].into_iter().collect(),
        ..PlanOptions::default()
    };
    let chain = asker.client.plan(&model, &opts).await.unwrap();
    let hops: Vec<PeerId> = chain.hops.iter().map(|h| h.peer_id).collect();
    assert_eq!(hops, vec![a.peer(), b.peer(), d.peer()]);
    assert!(chain.hops[1].rtt.unwrap() >= delay);

    let opts = PlanOptions {
        exclude: [b.peer(), c.peer()].into_iter().collect(),
        ..PlanOptions::default()
    };
    let err = asker.client.plan(&model, &opts).await.unwrap_err();
    match &err {
        PlanError::Uncovered { missing, .. } => assert_eq!(missing, &vec![[10, 20]]),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!("blocks 10..20 of model {model} are not served by any reachable peer")
    );
    // Everybody excluded: the model exists, its blocks are uncovered.
    let opts = PlanOptions {
        exclude: [a.peer(), b.peer(), c.peer(), d.peer()]
            .into_iter()
            .collect(),
        ..PlanOptions::default()
    };
    match asker.client.plan(&model, &opts).await {
        Err(PlanError::Uncovered { missing, .. }) => assert_eq!(missing, vec![[0, 30]]),
        other => panic!("{other:?}"),
    }
    let err = asker
        .client
        .plan(&model_id(0x63), &PlanOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, PlanError::NoModel { .. }), "{err:?}");
    assert!(matches!(
        asker.client.plan("nope", &PlanOptions::default()).await,
        Err(PlanError::Lookup(_))
    ));
}

/// Six crashed holders of the middle range, announcing 400 times the
/// live holder's speed, are still in the view (their infos have not
/// expired). A plan that meets one probes the other holders of its blocks
/// at once and goes through the live holder; peers that did not answer
/// stay out of the next plans without being probed again
/// (`SILENT_PEER_MEMORY`, counted by `Client::probe_stats`). With the
/// live one excluded too, the silent peers are asked again before the
/// blocks are reported uncovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_silent_to_probes_stay_out_of_later_plans() {
    init_tracing();
    let model = model_id(0x64);
    // Long enough that no info expires during the test.
    let cfg = |role, boot: Vec<nakshatra_swarm::Multiaddr>| {
        let mut c = config(role, boot);
        c.record_ttl = Duration::from_secs(120);
        c
    };
    let a = start_cfg(cfg(Role::Server, vec![])).await;
    let boot = vec![a.addr.clone().unwrap()];
    let d = start_cfg(cfg(Role::Server, boot.clone())).await;
    let live = start_cfg(cfg(Role::Server, boot.clone())).await;
    let mut dead = Vec::new();
    for _ in 0..6 {
        dead.push(start_cfg(cfg(Role::Server, boot.clone())).await);
    }
    a.client.announce(fake_info(&model, 0, 10)).await.unwrap();
    d.client.announce(fake_info(&model, 20, 30)).await.unwrap();
    // Slow enough that a crashed holder is preferred even when the first
    // hop's next-hop RTTs no longer list it (an unknown link costs 50 ms).
    let mut slow = fake_info(&model, 10, 20);
    slow.throughput = 5.0;
    live.client.announce(slow).await.unwrap();
    for n in &dead {
        let mut i = fake_info(&model, 10, 20);
        i.throughput = 2000.0;
        n.client.announce(i).await.unwrap();
    }
    let asker = start_cfg(cfg(Role::Client, boot.clone())).await;
    wait_for(Duration::from_secs(30), "all nine in the view", || async {
        let v = asker.client.model_view(&model).await.ok()?;
        (v.peers.len() == 9).then_some(())
    })
    .await;
    for n in &dead {
        n.task.abort();
    }
    let middle = |c: &nakshatra_swarm::plan::Chain| {
        c.hops
            .iter()
            .find(|h| h.start == 10)
            .map(|h| h.peer_id)
            .expect("a hop runs block 10")
    };

    // The first plan meets a crashed holder of 10..20 (they announce
    // more throughput than the live one), and probes every other holder
    // of those blocks at once: each crashed peer once, one round of probe
    // timeouts, and the chain goes through the live one.
    let first = asker
        .client
        .plan(&model, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(
        middle(&first),
        live.peer(),
        "the first plan went through a crashed peer"
    );
    let after_first = asker.client.probe_stats();
    assert_eq!(
        after_first.silent, 6,
        "each crashed peer is probed once: {after_first:?}"
    );
    // Past the probe's reuse window (500 ms), so that a probe made again
    // would be a new one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = asker
        .client
        .plan(&model, &PlanOptions::default())
        .await
        .unwrap();
    assert_eq!(middle(&second), live.peer());
    assert_eq!(
        asker.client.probe_stats().silent,
        after_first.silent,
        "the second plan probed the crashed peers again"
    );
    let v = asker.client.model_view(&model).await.unwrap();
    assert_eq!(v.peers.len(), 9, "the crashed peers' infos are still shown");

    // Without the live holder, only silent peers hold 10..20: they are
    // asked again (one may have come back), and the blocks are reported
    // as not served by any reachable peer.
    let opts = PlanOptions {
        exclude: [live.peer()].into_iter().collect(),
        ..PlanOptions::default()
    };
    match asker.client.plan(&model, &opts).await {
        Err(PlanError::Uncovered { missing, .. }) => assert_eq!(missing, vec![[10, 20]]),
        other => panic!("expected blocks 10..20 uncovered, got {other:?}"),
    }
    assert_eq!(
        asker.client.probe_stats().silent,
        after_first.silent + 6,
        "the silent peers were not asked again"
    );
}

/// A stream opened on a relayed connection outlives the direct connection
/// that replaces it: the relayed connection is closed only once no stream
/// of ours runs on it (a chain's activation stream broke when it was
/// closed a second after the direct one came up). The client knows the
/// server only by its circuit address, so its stream opens on the relayed
/// connection; identify then gives the server's listen address and the
/// client dials it directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_relayed_connection_survives_the_direct_one() {
    init_tracing();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let listen: nakshatra_swarm::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    let mut cfg = config(Role::Server, vec![]);
    cfg.listen = vec![listen.clone()];
    cfg.external_addrs = vec![listen];
    let relay = start_cfg(cfg).await;
    let relay_addr = relay.addr.clone().unwrap();

    let mut cfg = config(Role::Server, vec![relay_addr.clone()]);
    cfg.relays = vec![relay_addr.clone()];
    let server = start_cfg(cfg).await;
    serve_echo(&server);
    let circuit: nakshatra_swarm::Multiaddr = format!("{relay_addr}/p2p-circuit").parse().unwrap();
    wait_for(Duration::from_secs(20), "the relay reservation", || async {
        let addrs = server.client.listen_addrs().await.unwrap();
        addrs
            .iter()
            .any(|a| a.to_string().starts_with(&circuit.to_string()))
            .then_some(())
    })
    .await;

    // No bootstrap (it would learn the server's direct address from the
    // DHT); listening on loopback lets it dial loopback addresses.
    let mut cfg = config(Role::Client, vec![]);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    let client = start_cfg(cfg).await;
    let via_relay: nakshatra_swarm::Multiaddr =
        format!("{circuit}/p2p/{}", server.peer()).parse().unwrap();
    client
        .client
        .add_peer_addresses(server.peer(), vec![via_relay])
        .await;
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .client
            .stream_control()
            .open_stream(server.peer(), ECHO),
    )
    .await
    .expect("stream within 10 s")
    .expect("stream opens through the relay");
    echo_once(&mut stream, b"relayed")
        .await
        .expect("echo through the relay");

    // The direct connection comes up (the client dials the listen address
    // identify gave it)...
    wait_for(Duration::from_secs(15), "a direct connection", || async {
        let via = client.client.via().await.unwrap();
        (via.get(&server.peer()) == Some(&nakshatra_swarm::Via::Direct)).then_some(())
    })
    .await;
    // ...and the relayed one outlives its grace while the stream runs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    echo_once(&mut stream, b"still there")
        .await
        .expect("the stream on the relayed connection still works after the grace");
    // A new stream opens on the direct connection.
    let mut fresh = client
        .client
        .stream_control()
        .open_stream(server.peer(), ECHO)
        .await
        .expect("a new stream opens");
    echo_once(&mut fresh, b"direct")
        .await
        .expect("echo on the new stream");
}

/// Direct streams (`stream::direct`): a node with a direct listener gets
/// one to a peer that has one, authenticated both ways (the receiver's
/// accept loop sees the opener's peer id), carrying the protocol's bytes;
/// a peer without a listener, or a protocol the peer does not serve
/// directly, gets the libp2p stream instead; garbage on the direct port
/// costs the receiver nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_streams_open_where_they_can_and_fall_back_to_libp2p() {
    init_tracing();
    let x = start(Role::Server, vec![]).await;
    let port = x.client.direct_port().expect("x has a direct listener");
    let mut incoming = x.client.stream_control().accept(ECHO).unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let _ = seen_tx.send((peer, stream.is_direct()));
            tokio::spawn(echo(stream));
        }
    });
    let mut no_direct = config(Role::Server, vec![x.addr.clone().unwrap()]);
    no_direct.direct_port = None;
    let z = start_cfg(no_direct).await;
    assert_eq!(z.client.direct_port(), None);
    serve_echo(&z);
    let y = start(
        Role::Server,
        vec![x.addr.clone().unwrap(), z.addr.clone().unwrap()],
    )
    .await;

    // Junk on x's direct port first: closed, and x serves on.
    for junk in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0u8; 4096][..], &[][..]] {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let _ = tcp.write_all(junk).await;
        let _ = tcp.shutdown().await;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "x closes a connection that sent junk");
    }

    let open = |peer: PeerId, client: nakshatra_swarm::Client| async move {
        tokio::time::timeout(
            Duration::from_secs(15),
            client.open_link_with(
                peer,
                ECHO,
                nakshatra_swarm::Reopen::DEFAULT,
                true,
                |s| async move { Ok::<_, nakshatra_swarm::Handshake<std::io::Error>>(s) },
            ),
        )
        .await
        .expect("an answer within 15 s")
    };
    let mut s = open(x.peer(), y.client.clone()).await.expect("stream to x");
    assert!(s.is_direct(), "x and y both have direct listeners");
    echo_once(&mut s, b"direct")
        .await
        .expect("echo on the direct stream");
    let (peer, direct) = seen.recv().await.unwrap();
    assert_eq!(
        (peer, direct),
        (y.peer(), true),
        "x sees y's peer id on a direct stream"
    );
    // A second one opens directly too (the port is remembered).
    let mut s2 = open(x.peer(), y.client.clone()).await.expect("stream to x");
    assert!(s2.is_direct());
    echo_once(&mut s2, &[9u8; 100_000])
        .await
        .expect("a big echo");
    echo_once(&mut s, b"still there")
        .await
        .expect("the first lives on");

    // z has no direct listener: a libp2p stream.
    let mut s = open(z.peer(), y.client.clone()).await.expect("stream to z");
    assert!(!s.is_direct());
    echo_once(&mut s, b"libp2p")
        .await
        .expect("echo on the libp2p stream");

    // y serves no ECHO: x's direct attempt is refused, the libp2p stream
    // is refused too, as it would be without direct streams.
    let refused = open(y.peer(), x.client.clone()).await;
    assert!(refused.is_err(), "y does not serve ECHO");
}

/// Writes `msg` on an `ECHO` stream and checks it comes back.
async fn echo_once(
    stream: &mut nakshatra_swarm::stream::Stream,
    msg: &[u8],
) -> std::io::Result<()> {
    stream.write_all(msg).await?;
    stream.flush().await?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).await?;
    assert_eq!(back, msg);
    Ok(())
}
