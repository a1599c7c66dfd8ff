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
