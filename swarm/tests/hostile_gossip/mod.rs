//! A hostile node (a bare libp2p swarm, not our code) on the info gossip
//! topic and the view protocol: it publishes, and answers every view
//! request with, infos that are forged, tampered, expired, oversized,
//! impossible, junk, or a Sybil's. Honest nodes must keep only what
//! verifies, never forward the rest, keep the honest view intact, and not
//! panic. And a peer that stops reading costs a node a bounded gossip
//! queue.

use std::time::Duration;

use futures::StreamExt;
use libp2p::{
    gossipsub, identify, noise, request_response,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux, Multiaddr, PeerId, StreamProtocol, SwarmBuilder,
};
use nakshatra_swarm::{
    protocol::{
        self,
        keys::INFOS_TOPIC,
        now_ms,
        rpc::{ViewResponse, VIEW_PROTOCOL},
        SignedServerInfo,
    },
    signing_key, IdentityKeypair, Role, ViewCodec, GOSSIP_QUEUE_LEN,
};

use crate::common::*;

#[derive(NetworkBehaviour)]
struct Evil {
    gossip: gossipsub::Behaviour,
    view: request_response::Behaviour<ViewCodec>,
    identify: identify::Behaviour,
}

/// Every bad info the hostile node has, for `model`, and one valid info of
/// a Sybil identity (valid, so it must be kept: a Sybil is a peer like
/// any).
fn bad_infos(model: &str) -> (Vec<Vec<u8>>, Vec<u8>, PeerId) {
    let evil_sk = signing_key(&IdentityKeypair::generate_ed25519()).unwrap();
    let now = now_ms();
    let mut info = fake_info(model, 0, 30);
    info.issued_at_ms = now;
    info.expires_at_ms = now + 60_000;
    let mut bad = Vec::new();
    // Tampered after signing.
    let mut tampered = protocol::sign(&evil_sk, &info).unwrap();
    tampered.payload[3] ^= 0x40;
    bad.push(tampered.to_bytes());
    // Expired.
    let mut old = info.clone();
    old.issued_at_ms = now - 120_000;
    old.expires_at_ms = now - 60_000;
    bad.push(protocol::sign(&evil_sk, &old).unwrap().to_bytes());
    // Impossible figures (refused by every record check).
    let mut fast = info.clone();
    fast.throughput = 1e9;
    bad.push(
        SignedServerInfo::sign_raw(
            &evil_sk,
            protocol::PROTOCOL_VERSION,
            protocol::encode(&fast).unwrap(),
        )
        .to_bytes(),
    );
    // Oversized, validly signed.
    bad.push(
        SignedServerInfo::sign_raw(&evil_sk, protocol::PROTOCOL_VERSION, vec![7; 20_000])
            .to_bytes(),
    );
    // Junk.
    bad.push(vec![0xde, 0xad, 0xbe, 0xef]);
    // A Sybil's valid info for blocks 0..5.
    let (sybil_info, sybil) = sybil_info(model);
    (bad, sybil_info, sybil)
}

/// A bare libp2p swarm (not our code) speaking the info topic, the view
/// protocol and identify, on TCP.
fn bare_swarm() -> libp2p::Swarm<Evil> {
    let key = IdentityKeypair::generate_ed25519();
    SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|k| {
            let cfg = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Anonymous)
                .max_transmit_size(64 * 1024)
                .message_id_fn(|m: &gossipsub::Message| {
                    gossipsub::MessageId::from(&blake3::hash(&m.data).as_bytes()[..20])
                })
                .build()
                .unwrap();
            Evil {
                gossip: gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, cfg)
                    .unwrap(),
                view: request_response::Behaviour::with_codec(
                    ViewCodec::default(),
                    [(
                        StreamProtocol::new(VIEW_PROTOCOL),
                        request_response::ProtocolSupport::Full,
                    )],
                    request_response::Config::default(),
                ),
                identify: identify::Behaviour::new(identify::Config::new(
                    "/nakshatra/1".into(),
                    k.public(),
                )),
            }
        })
        .unwrap()
        .build()
}

/// Starts the hostile node connected to `targets`; it publishes every bad
/// info on the topic every 300 ms and answers view requests with all of
/// them (and the Sybil's). Returns its address.
async fn spawn_evil(targets: Vec<Multiaddr>, model: String) -> (Multiaddr, PeerId) {
    let mut swarm = bare_swarm();
    let me = *swarm.local_peer_id();
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let topic = gossipsub::IdentTopic::new(INFOS_TOPIC);
    swarm.behaviour_mut().gossip.subscribe(&topic).unwrap();
    for t in targets {
        swarm.dial(t).unwrap();
    }
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Fresh bad infos each round (new bytes, new ids).
                    let (bad, sybil, _) = bad_infos(&model);
                    for b in bad.into_iter().chain([sybil]) {
                        let _ = swarm.behaviour_mut().gossip.publish(topic.clone(), b);
                    }
                }
                e = swarm.select_next_some() => {
                    if let SwarmEvent::Behaviour(EvilEvent::View(request_response::Event::Message {
                        message: request_response::Message::Request { channel, .. },
                        ..
                    })) = e
                    {
                        let (mut infos, sybil, _) = bad_infos(&model);
                        infos.push(sybil);
                        let _ = swarm
                            .behaviour_mut()
                            .view
                            .send_response(channel, ViewResponse { infos, more: false });
                    }
                }
            }
        }
    });
    (addr.with(libp2p::multiaddr::Protocol::P2p(me)), me)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_gossip_and_view_answers_change_nothing() {
    init_tracing();
    let model = model_id(0x77);
    let s0 = start(Role::Server, vec![]).await;
    let s1 = start(Role::Server, vec![s0.addr.clone().unwrap()]).await;
    s0.client.announce(fake_info(&model, 0, 15)).await.unwrap();
    s1.client.announce(fake_info(&model, 15, 30)).await.unwrap();
    let (evil_addr, evil) = spawn_evil(
        vec![s0.addr.clone().unwrap(), s1.addr.clone().unwrap()],
        model.clone(),
    )
    .await;
    // The asker knows the hostile node first: its view syncs ask it.
    let client = start(Role::Client, vec![evil_addr, s0.addr.clone().unwrap()]).await;

    // The honest view, with the valid Sybils (a Sybil is a peer like any)
    // and nothing else of the hostile node's.
    let view = wait_for(Duration::from_secs(15), "the honest view", || async {
        let v = client.client.model_view(&model).await.unwrap();
        (v.is_fully_covered() && v.peers.iter().any(|p| p.peer_id == s1.peer())).then_some(v)
    })
    .await;
    assert!(
        view.peers.iter().all(|p| p.peer_id != evil),
        "{:?}",
        view.peers
    );
    let s0_view = view.peers.iter().find(|p| p.peer_id == s0.peer()).unwrap();
    assert_eq!(s0_view.range, [0, 15]);
    for p in &view.peers {
        assert!(p.throughput < 1e5, "{p:?}");
        if p.peer_id != s0.peer() && p.peer_id != s1.peer() {
            assert_eq!(p.range, [0, 5], "only the Sybils' valid infos: {p:?}");
        }
    }

    // The servers rejected the gossip's bad infos (and penalised its
    // sender) and kept running.
    wait_for(Duration::from_secs(10), "gossip rejections", || async {
        let a = s0.client.stats().await.unwrap();
        let b = s1.client.stats().await.unwrap();
        (a.gossip_rejected + b.gossip_rejected >= 5).then_some(())
    })
    .await;
    let stats = s0.client.stats().await.unwrap();
    assert!(stats.cached_infos >= 2, "{stats:?}");
    for n in [&s0, &s1, &client] {
        assert!(!n.task.is_finished());
    }
}

/// A valid info for blocks 0..5 of `model` in a fresh identity's name,
/// and that identity: every one is news to a node, so it is accepted and
/// forwarded.
fn sybil_info(model: &str) -> (Vec<u8>, PeerId) {
    let key = IdentityKeypair::generate_ed25519();
    let now = now_ms();
    let mut s = fake_info(model, 0, 5);
    s.issued_at_ms = now;
    s.expires_at_ms = now + 60_000;
    let signed = protocol::sign(&signing_key(&key).unwrap(), &s)
        .unwrap()
        .to_bytes();
    (signed, key.public().to_peer_id())
}

/// A peer in a node's gossip mesh that stops reading (a stopped process,
/// a saturated link) costs the node a bounded queue: what the node would
/// forward to it beyond [`GOSSIP_QUEUE_LEN`] messages and what the
/// stream's flow-control window let through is dropped and counted, never
/// held. (gossipsub's default queue, 5,000 messages a connection, is what
/// ran the 500-node simulation out of memory: see docs/scale.md.) A
/// flooder publishes valid infos of fresh identities through the node,
/// each one news that the node forwards to its mesh, the stalled peer
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_gossip_peer_costs_a_node_a_bounded_queue() {
    /// Infos flooded through the node once the peer stalls: far more than
    /// the queue and the stream window together hold.
    const FLOOD: usize = 3000;
    init_tracing();
    let model = model_id(0x5a);
    let node = start(Role::Server, vec![]).await;
    let target = node.addr.clone().unwrap();
    let topic = gossipsub::IdentTopic::new(INFOS_TOPIC);

    // The flooder publishes what it is told to, 50 infos every 10 ms.
    let (flood, mut to_flood) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let mut flooder = bare_swarm();
    flooder.behaviour_mut().gossip.subscribe(&topic).unwrap();
    flooder.dial(target.clone()).unwrap();
    {
        let (model, topic) = (model.clone(), topic.clone());
        tokio::spawn(async move {
            let mut pending = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tokio::select! {
                    Some(n) = to_flood.recv() => pending += n,
                    _ = tick.tick() => {
                        let n = pending.min(50);
                        for _ in 0..n {
                            let _ = flooder
                                .behaviour_mut()
                                .gossip
                                .publish(topic.clone(), sybil_info(&model).0);
                        }
                        pending -= n;
                    }
                    _ = flooder.select_next_some() => {}
                }
            }
        });
    }

    // The stalled peer takes forwarded infos for a while (so that it is
    // in the node's mesh: grafted within a heartbeat of subscribing),
    // then is never polled again: it reads nothing more, acknowledges
    // nothing, and its connection stays open.
    let mut stalled = bare_swarm();
    stalled.behaviour_mut().gossip.subscribe(&topic).unwrap();
    stalled.dial(target).unwrap();
    let mut prod = tokio::time::interval(Duration::from_millis(200));
    let warm = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(warm);
    let mut first: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = &mut warm => panic!("the stalled peer got no forwarded info in 20 s"),
            _ = prod.tick() => {
                let _ = flood.send(1);
                // Three heartbeats after the first forwarded info.
                if first.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
                    break;
                }
            }
            e = stalled.select_next_some() => {
                if let SwarmEvent::Behaviour(EvilEvent::Gossip(gossipsub::Event::Message { .. })) = e {
                    first.get_or_insert_with(tokio::time::Instant::now);
                }
            }
        }
    }
    let before = node.client.stats().await.unwrap();

    flood.send(FLOOD).unwrap();
    // Every flooded info reached the node; its drops are counted at its
    // next heartbeat (1 s).
    wait_for(
        Duration::from_secs(60),
        "the flood through the node",
        || async {
            let s = node.client.stats().await.unwrap();
            (s.gossip_received >= before.gossip_received + FLOOD as u64).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = node.client.stats().await.unwrap();
    // Data messages only (the control queue has its own bound).
    let data = |s: &nakshatra_swarm::SwarmStats| s.gossip_dropped - s.gossip_dropped_control;
    let dropped = (data(&s) - data(&before)) as usize;
    // What is not dropped is queued for the peer or in its stream's
    // flow-control window (yamux: 256 KiB a stream, no more without the
    // reader's acknowledgement).
    let info_bytes = sybil_info(&model).0.len();
    let window = 256 * 1024 / info_bytes + 1;
    let held = FLOOD.saturating_sub(dropped);
    eprintln!(
        "stalled peer: {FLOOD} infos of {info_bytes} bytes forwarded to it, {dropped} dropped, \
         {held} held (queue cap {GOSSIP_QUEUE_LEN}, window about {window} infos)"
    );
    assert!(
        held <= GOSSIP_QUEUE_LEN + window,
        "the node holds {held} infos for a peer that reads nothing \
         (cap {GOSSIP_QUEUE_LEN} + window {window})"
    );
    // The node still answers, and its loop is alive.
    assert!(!node.task.is_finished());
    drop(stalled);
}
