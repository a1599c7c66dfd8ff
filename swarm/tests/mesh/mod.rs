//! A serving node stays connected only to what it needs: its gossip mesh
//! and peers it is talking to. Gossipsub's long-lived streams must not
//! keep every connection a server ever made open (rust-libp2p #5190): at
//! 200 simulated nodes that was about 100 connections per node.

use std::time::Duration;

use nakshatra_swarm::Role;

use crate::common::{config, fake_info, init_tracing, model_id, start_with, wait_for, Node};

/// Leaf servers, all bootstrapping from one hub: more than gossipsub's
/// largest mesh (12), so the hub must drop some once they are idle.
const LEAVES: usize = 16;
/// gossipsub's `mesh_n_high` (the default, see `behaviour::gossip_config`).
const MESH_N_HIGH: usize = 12;
/// Idle timeout of these nodes: short, so that the test is.
const IDLE: Duration = Duration::from_secs(2);

fn server(bootstrap: Vec<nakshatra_swarm::Multiaddr>) -> nakshatra_swarm::SwarmConfig {
    let mut c = config(Role::Server, bootstrap);
    c.idle_connection_timeout = IDLE;
    // No re-announcement walks or view syncs during the test: what stays
    // connected is what the mesh keeps.
    c.record_ttl = Duration::from_secs(120);
    c.refresh = Duration::from_secs(60);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_outside_the_gossip_mesh_close() {
    init_tracing();
    let model = model_id(0x51);
    let hub = start_with(
        nakshatra_swarm::IdentityKeypair::generate_ed25519(),
        server(vec![]),
    )
    .await;
    let hub_addr = hub.addr.clone().expect("hub listens");
    let mut leaves: Vec<Node> = Vec::new();
    for i in 0..LEAVES {
        let n = start_with(
            nakshatra_swarm::IdentityKeypair::generate_ed25519(),
            server(vec![hub_addr.clone()]),
        )
        .await;
        let start = (i as u32 * 2) % 30;
        n.client
            .announce(fake_info(&model, start, start + 2))
            .await
            .expect("announce");
        leaves.push(n);
    }
    wait_for(
        Duration::from_secs(30),
        "every leaf to reach the hub",
        || async {
            let c = hub.client.connected_peers().await.ok()?.len();
            (c >= LEAVES).then_some(())
        },
    )
    .await;

    // Once idle, the hub keeps its mesh (at most MESH_N_HIGH peers) and
    // lets the other connections go.
    let kept = wait_for(
        Duration::from_secs(40),
        "the hub to close idle connections outside its mesh",
        || async {
            let c = hub.client.connected_peers().await.ok()?.len();
            (c <= MESH_N_HIGH).then_some(c)
        },
    )
    .await;
    assert!(kept > 0, "the hub dropped its whole mesh");

    // The gossip still reaches every leaf over the meshes that remain: a
    // re-announcement with a new throughput shows in every other leaf's
    // cache, with no view sync (the refresh is a minute away).
    let speaker = &leaves[0];
    let mut info = fake_info(&model, 0, 2);
    info.throughput = 777.0;
    speaker.client.announce(info).await.expect("announce");
    for (i, leaf) in leaves.iter().enumerate().skip(1) {
        wait_for(
            Duration::from_secs(20),
            &format!("leaf {i} to hear the new info by gossip"),
            || async {
                let infos = leaf.client.cached_infos(Some(&model)).await.ok()?;
                infos
                    .iter()
                    .any(|(p, i)| *p == speaker.peer() && i.throughput == 777.0)
                    .then_some(())
            },
        )
        .await;
    }
}

/// The connection manager: clients that stay connected to a server (a
/// long idle timeout) fill it up to its high watermark; one more pushes it
/// past, and it closes the least recently used down to its low watermark:
/// never the connection of a client with a stream open to it (although
/// that one is the oldest), nor one within its grace (the newcomer). A
/// trimmed client that connects again is counted as a reconnection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_high_watermark_the_oldest_unprotected_connections_close() {
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use nakshatra_swarm::{StreamProtocol, Watermarks};

    const ECHO: StreamProtocol = StreamProtocol::new("/nakshatra-test/echo/1");
    let marks = Watermarks {
        low: 4,
        high: 12,
        grace: Duration::from_secs(1),
    };
    init_tracing();
    let mut hub_config = config(Role::Server, vec![]);
    hub_config.connections = marks;
    hub_config.idle_connection_timeout = Duration::from_secs(300);
    let hub = start_with(
        nakshatra_swarm::IdentityKeypair::generate_ed25519(),
        hub_config,
    )
    .await;
    let mut incoming = hub.client.stream_control().accept(ECHO).expect("accept");
    tokio::spawn(async move {
        while let Some((_, stream)) = incoming.next().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = futures::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let hub_addr = hub.addr.clone().expect("hub listens");
    // Clients without a bootstrap peer (one would dial it again at once
    // when cut off), connected by measuring their RTT to the hub. They
    // listen on loopback only so that loopback addresses are in scope.
    let client = || async {
        let mut c = config(Role::Client, vec![]);
        c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
        c.idle_connection_timeout = Duration::from_secs(300);
        let n = start_with(nakshatra_swarm::IdentityKeypair::generate_ed25519(), c).await;
        n.client
            .add_peer_addresses(hub.peer(), vec![hub_addr.clone()])
            .await;
        n.client.rtt(hub.peer()).await.expect("client connects");
        n
    };

    // The oldest client holds a stream open to the hub.
    let keeper = client().await;
    let mut stream = keeper
        .client
        .stream_control()
        .open_stream(hub.peer(), ECHO)
        .await
        .expect("open the echo stream");
    // With the keeper, the high watermark exactly: nothing to trim.
    let mut early = Vec::new();
    for _ in 1..marks.high {
        early.push(client().await);
    }
    // Everyone past the grace (timing of the connections above does not
    // matter), then one more peer.
    tokio::time::sleep(marks.grace + Duration::from_millis(500)).await;
    let s = hub.client.stats().await.expect("stats");
    assert_eq!(s.connections_trimmed, 0, "{s:?}");
    assert_eq!(s.connected_peers, marks.high, "{s:?}");
    let late = client().await;

    let stats = wait_for(
        Duration::from_secs(20),
        "the hub to trim its connections to the low watermark",
        || async {
            let s = hub.client.stats().await.ok()?;
            (s.connected_peers <= marks.low && s.connections_trimmed > 0).then_some(s)
        },
    )
    .await;
    // Down to the low watermark: the keeper (its stream), the newcomer
    // (its grace) and the two most recently used early clients stay.
    assert_eq!(
        stats.connections_trimmed as usize,
        marks.high + 1 - marks.low,
        "{stats:?}"
    );
    let connected = hub.client.connected_peers().await.expect("peers");
    assert!(connected.contains(&keeper.peer()), "{connected:?}");
    assert!(connected.contains(&late.peer()), "{connected:?}");
    // The stream still works.
    stream.write_all(b"still here").await.expect("write");
    let mut back = [0u8; 10];
    stream.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"still here");

    // A trimmed client coming back counts as a reconnection; nothing
    // before it did.
    assert_eq!(stats.reconnections, 0, "{stats:?}");
    let trimmed = early
        .iter()
        .find(|c| !connected.contains(&c.peer()))
        .expect("a trimmed client");
    trimmed.client.rtt(hub.peer()).await.expect("reconnects");
    wait_for(
        Duration::from_secs(20),
        "the hub to count the reconnection",
        || async {
            let s = hub.client.stats().await.ok()?;
            (s.reconnections == 1).then_some(())
        },
    )
    .await;
}
