//! What the swarm's benchmark examples share: a node on 127.0.0.1 and a
//! runtime of its own per node (as two processes would have).

use nakshatra_swarm::{Multiaddr, SwarmConfig};

/// A serving node's configuration on an ephemeral loopback TCP port,
/// bootstrapping from `bootstrap`, mDNS off.
pub fn config(bootstrap: Option<Multiaddr>) -> SwarmConfig {
    let mut c = SwarmConfig::server();
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    c.bootstrap = bootstrap.into_iter().collect();
    c.mdns = false;
    c
}

/// A multi-threaded tokio runtime of two workers (what `nakshatra`
/// gives a node).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
