//! Real swarms on 127.0.0.1, several event loops in one runtime.

mod common;
mod hostile;
mod hostile_gossip;
mod mesh;
// One test binary with the rest: each binary compiles its own copy of
// the event loop's async code (about a minute of CI's build).
#[cfg(feature = "fault-injection")]
mod streams;

use std::time::Duration;

use common::*;
use nakshatra_swarm::{
    load_or_create_identity, protocol, spawn, AnnounceError, IdentityKeypair, InfoError, Multiaddr,
    Role, ServerState, SwarmError,
};
use tokio::time::Instant;

/// Five servers in a line (each bootstraps only to the previous one)
/// announce 0..6, 6..12, ..., 24..30; a client bootstrapped to the first
/// sees every block covered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_of_five_covers_the_model() {
    init_tracing();
    let model = model_id(0x11);
    let mut servers: Vec<Node> = Vec::new();
    for i in 0..5u32 {
        let bootstrap: Vec<Multiaddr> = servers
            .last()
            .and_then(|n| n.addr.clone())
            .into_iter()
            .collect();
        let node = start(Role::Server, bootstrap).await;
        node.client
            .announce(fake_info(&model, i * 6, (i + 1) * 6))
            .await
            .unwrap();
        servers.push(node);
    }
    let started = Instant::now();
    let client = start(Role::Client, vec![servers[0].addr.clone().unwrap()]).await;

    let view = wait_for(Duration::from_secs(15), "full coverage", || async {
        let v = client.client.model_view(&model).await.unwrap();
        (v.is_fully_covered() && v.peers.len() == 5).then_some(v)
    })
    .await;
    eprintln!("full coverage after {:?}", started.elapsed());
    assert_eq!(view.n_layers, 30);
    assert_eq!(view.arch, "llama");
    for (b, holders) in view.coverage.iter().enumerate() {
        assert_eq!(holders, &vec![servers[b / 6].peer()], "block {b}");
    }
    for (i, p) in view.peers.iter().enumerate() {
        assert_eq!(p.peer_id, servers[i].peer());
        assert_eq!(p.range, [i as u32 * 6, (i as u32 + 1) * 6]);
        assert_eq!(p.backend, "CPU");
        assert_eq!(p.state, ServerState::Online);
        assert!(!p.listen_addrs.is_empty());
    }

    // Block lookups: one hop away from anyone.
    let holders = client.client.block_holders(&model, 7).await.unwrap();
    assert_eq!(holders, vec![servers[1].peer()]);
    assert!(client
        .client
        .block_holders(&model, 30)
        .await
        .unwrap()
        .is_empty());

    // The swarm-wide view, as `swarm status --json` prints it.
    let sv = client.client.swarm_view().await.unwrap();
    assert_eq!(sv.models.len(), 1);
    let json = serde_json::to_value(&sv).unwrap();
    let m = &json["models"][0];
    assert_eq!(m["id"], serde_json::json!(model));
    assert_eq!(m["n_layers"], serde_json::json!(30));
    assert_eq!(m["gaps"], serde_json::json!([]));
    assert_eq!(m["coverage"].as_array().unwrap().len(), 30);
    assert_eq!(m["peers"].as_array().unwrap().len(), 5);
    for p in m["peers"].as_array().unwrap() {
        for k in ["peer_id", "range", "backend", "throughput", "rtt_ms"] {
            assert!(p.get(k).is_some(), "missing {k}");
        }
    }
    // RTTs come from ping (the views dial every peer).
    assert!(
        sv.models[0].peers.iter().all(|p| p.rtt_ms.is_some()),
        "{:?}",
        sv.models[0].peers
    );

    // A server's info, directly.
    let info = client.client.server_info(servers[2].peer()).await.unwrap();
    assert_eq!(info.range(), 12..18);
    assert!(info.expires_at_ms > info.issued_at_ms);

    // Re-announcing replaces the info (free sessions changed, range shrank).
    let mut smaller = fake_info(&model, 24, 27);
    smaller.free_sessions = 1;
    servers[4].client.announce(smaller).await.unwrap();
    let v = wait_for(Duration::from_secs(10), "re-announcement", || async {
        let v = client.client.model_view(&model).await.unwrap();
        (v.gaps == vec![[27, 30]]).then_some(v)
    })
    .await;
    assert_eq!(v.peers[4].free_sessions, 1);

    // A fresh client asking at once, as `swarm status` does: its lookups
    // wait for identify to fill the routing table instead of coming back
    // empty.
    // Its view comes from the node it asks: complete once that node's
    // cache is (a node that joined less than a refresh ago may still lack
    // infos its gossip mesh had not formed for; the next refresh's
    // republication and view sync bring them).
    let fresh = start(Role::Client, vec![servers[3].addr.clone().unwrap()]).await;
    let t = Instant::now();
    let sv = fresh.client.swarm_view().await.unwrap();
    eprintln!("fresh client's first swarm_view took {:?}", t.elapsed());
    assert_eq!(sv.models.len(), 1);
    assert!(!sv.models[0].peers.is_empty());
    let sv = wait_for(REFRESH * 2, "a fresh client's complete view", || async {
        let sv = fresh.client.swarm_view().await.unwrap();
        (sv.models.len() == 1 && sv.models[0].peers.len() == 5).then_some(sv)
    })
    .await;
    assert_eq!(sv.models[0].gaps, vec![[27, 30]]);

    for s in &servers {
        assert!(!s.task.is_finished());
    }
}

/// A server that disappears without withdrawing: its blocks are uncovered
/// once its records expire (TTL after its last refresh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_server_expires() {
    init_tracing();
    let model = model_id(0x22);
    let s0 = start(Role::Server, vec![]).await;
    let s1 = start(Role::Server, vec![s0.addr.clone().unwrap()]).await;
    let s2 = start(Role::Server, vec![s1.addr.clone().unwrap()]).await;
    for (s, (a, b)) in [&s0, &s1, &s2].iter().zip([(0, 10), (10, 20), (20, 30)]) {
        s.client.announce(fake_info(&model, a, b)).await.unwrap();
    }
    let client = start(Role::Client, vec![s0.addr.clone().unwrap()]).await;
    wait_for(Duration::from_secs(15), "full coverage", || async {
        let v = client.client.model_view(&model).await.unwrap();
        v.is_fully_covered().then_some(())
    })
    .await;

    // Crash: the task is dropped with its swarm, nothing is withdrawn.
    s1.task.abort();
    let crashed = Instant::now();
    let view = wait_for(TTL + REFRESH + Duration::from_secs(6), "expiry", || async {
        let v = client.client.model_view(&model).await.unwrap();
        (v.gaps == vec![[10, 20]]).then_some(v)
    })
    .await;
    eprintln!("uncovered {:?} after the crash", crashed.elapsed());
    assert_eq!(view.peers.len(), 2);
    assert!(view.coverage[15].is_empty());
    assert!(!s0.task.is_finished() && !s2.task.is_finished());
}

/// A graceful withdraw uncovers the blocks at once, and they stay
/// uncovered after the node is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_withdraw_uncovers_quickly() {
    init_tracing();
    let model = model_id(0x33);
    let s0 = start(Role::Server, vec![]).await;
    let s1 = start(Role::Server, vec![s0.addr.clone().unwrap()]).await;
    let s2 = start(Role::Server, vec![s1.addr.clone().unwrap()]).await;
    for (s, (a, b)) in [&s0, &s1, &s2].iter().zip([(0, 10), (10, 20), (20, 30)]) {
        s.client.announce(fake_info(&model, a, b)).await.unwrap();
    }
    let client = start(Role::Client, vec![s0.addr.clone().unwrap()]).await;
    wait_for(Duration::from_secs(15), "full coverage", || async {
        let v = client.client.model_view(&model).await.unwrap();
        v.is_fully_covered().then_some(())
    })
    .await;

    let t = Instant::now();
    s1.client.withdraw().await.unwrap();
    let v = client.client.model_view(&model).await.unwrap();
    eprintln!("withdraw + view took {:?}", t.elapsed());
    assert_eq!(v.gaps, vec![[10, 20]]);
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(matches!(
        client.client.server_info(s1.peer()).await,
        Err(InfoError::NotServing(_))
    ));
    // Its peers hold the tombstone: the withdrawal returns once the put
    // reached its quorum of one, the other copies land a moment later.
    let key = protocol::keys::info_key(&s1.peer());
    wait_for(
        Duration::from_secs(5),
        "the tombstone stored at s0",
        || async {
            let stored = s0.client.local_record(&key).await.unwrap()?;
            let v0 = protocol::verify(&stored, Some(&s1.peer()), protocol::now_ms()).unwrap();
            (v0.info.state == ServerState::Offline).then_some(())
        },
    )
    .await;

    // Leave entirely; the stale provider records do not bring it back.
    s1.client.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), s1.task)
        .await
        .expect("event loop ends after shutdown")
        .unwrap();
    assert!(s1.client.stats().await.is_err());
    let v = client.client.model_view(&model).await.unwrap();
    assert_eq!(v.gaps, vec![[10, 20]]);
    assert_eq!(v.peers.len(), 2);
}

/// The identity file gives the same PeerId across restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_persists_across_restarts() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.key");
    let first = start_with(
        load_or_create_identity(&path).unwrap(),
        config(Role::Server, vec![]),
    )
    .await;
    let id = first.peer();
    first.client.shutdown().await.unwrap();
    first.task.await.unwrap();
    let second = start_with(
        load_or_create_identity(&path).unwrap(),
        config(Role::Server, vec![]),
    )
    .await;
    assert_eq!(second.peer(), id);
    second.client.shutdown().await.unwrap();
}

/// A bootstrap peer that is down at start: spawn succeeds, retries are
/// logged, and the node joins once the peer appears; an announcement made
/// while alone reaches the swarm then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_bootstrap_is_retried() {
    init_tracing();
    let model = model_id(0x44);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let a_key = IdentityKeypair::generate_ed25519();
    let a_peer = a_key.public().to_peer_id();
    let a_addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{a_peer}")
        .parse()
        .unwrap();

    let b = start(Role::Server, vec![a_addr.clone()]).await;
    b.client.announce(fake_info(&model, 0, 30)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(b.client.connected_peers().await.unwrap().is_empty());
    assert!(
        !b.task.is_finished(),
        "a down bootstrap must not kill the node"
    );

    // The bootstrap peer appears.
    let mut a_config = config(Role::Server, vec![]);
    a_config.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()];
    let a = start_with(a_key, a_config).await;
    wait_for(Duration::from_secs(10), "B to join A", || async {
        let peers = b.client.connected_peers().await.unwrap();
        peers.contains(&a_peer).then_some(())
    })
    .await;

    let client = start(Role::Client, vec![a_addr]).await;
    wait_for(Duration::from_secs(15), "B's blocks via A", || async {
        let v = client.client.model_view(&model).await.unwrap();
        (v.is_fully_covered() && v.peers[0].peer_id == b.peer()).then_some(())
    })
    .await;
    assert!(!a.task.is_finished());
}

/// Configuration and argument errors are reported, not panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_reported() {
    init_tracing();
    let mut bad = config(Role::Server, vec![]);
    bad.refresh = bad.record_ttl;
    assert!(matches!(
        spawn(IdentityKeypair::generate_ed25519(), bad).await,
        Err(SwarmError::Config(_))
    ));

    // Port taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = config(Role::Server, vec![]);
    c.listen = vec![
        format!("/ip4/127.0.0.1/tcp/{}", taken.local_addr().unwrap().port())
            .parse()
            .unwrap(),
    ];
    assert!(matches!(
        spawn(IdentityKeypair::generate_ed25519(), c).await,
        Err(SwarmError::Listen { .. })
    ));

    let server = start(Role::Server, vec![]).await;
    let mut info = fake_info(&model_id(0x55), 0, 10);
    info.model_id = "not-a-model-id".into();
    assert!(matches!(
        server.client.announce(info).await,
        Err(AnnounceError::Invalid(_))
    ));
    assert!(server.client.block_holders("nope", 0).await.is_err());

    let client = start(Role::Client, vec![server.addr.clone().unwrap()]).await;
    assert!(matches!(
        client
            .client
            .announce(fake_info(&model_id(0x55), 0, 10))
            .await,
        Err(AnnounceError::NotServer)
    ));
    // Nobody serves this model.
    let v = client.client.model_view(&model_id(0x56)).await.unwrap();
    assert_eq!(v.n_layers, 0);
    // A peer that never announced.
    assert!(matches!(
        client.client.server_info(server.peer()).await,
        Err(InfoError::NotServing(_))
    ));
}

/// With the `quic` feature: a swarm over QUIC only.
#[cfg(feature = "quic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_transport_works() {
    init_tracing();
    let model = model_id(0x88);
    let quic = || {
        let mut c = config(Role::Server, vec![]);
        c.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
        c
    };
    let s0 = start_with(IdentityKeypair::generate_ed25519(), quic()).await;
    assert!(s0.addr.as_ref().unwrap().to_string().contains("quic-v1"));
    let mut c1 = quic();
    c1.bootstrap = vec![s0.addr.clone().unwrap()];
    let s1 = start_with(IdentityKeypair::generate_ed25519(), c1).await;
    s0.client.announce(fake_info(&model, 0, 15)).await.unwrap();
    s1.client.announce(fake_info(&model, 15, 30)).await.unwrap();
    let client = start(Role::Client, vec![s1.addr.clone().unwrap()]).await;
    wait_for(Duration::from_secs(15), "coverage over QUIC", || async {
        let v = client.client.model_view(&model).await.unwrap();
        v.is_fully_covered().then_some(())
    })
    .await;
}
