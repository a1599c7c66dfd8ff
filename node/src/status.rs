//! `swarm status`: join as a short-lived client and show, per model, which
//! peers hold which blocks.

use std::time::Duration;

use nakshatra_swarm::{Multiaddr, SwarmConfig, SwarmView};

/// Errors of `swarm status`.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The swarm could not start.
    #[error(transparent)]
    Swarm(#[from] nakshatra_swarm::SwarmError),
    /// Nobody answered.
    #[error(transparent)]
    NoPeers(#[from] nakshatra_swarm::WaitError),
    /// The event loop stopped.
    #[error(transparent)]
    Stopped(#[from] nakshatra_swarm::Stopped),
}

/// Joins as a client (fresh identity, serves nothing), waits for a first
/// peer, and reads the swarm's coverage.
pub async fn swarm_status(
    bootstrap: Vec<Multiaddr>,
    mdns: bool,
    wait: Duration,
) -> Result<SwarmView, StatusError> {
    let mut cfg = SwarmConfig::client();
    // A status reads; no chain link ever comes to it.
    cfg.direct_port = None;
    cfg.bootstrap = bootstrap;
    cfg.mdns = mdns;
    let key = nakshatra_swarm::IdentityKeypair::generate_ed25519();
    let (client, task) = nakshatra_swarm::spawn(key, cfg).await?;
    let view = match client.wait_connected(wait).await {
        Ok(_) => client.swarm_view().await.map_err(StatusError::from),
        Err(e) => Err(e.into()),
    };
    let _ = client.shutdown().await;
    let _ = task.await;
    view
}

/// The view as a table for people.
pub fn render(view: &SwarmView) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if view.models.is_empty() {
        s.push_str("no models announced\n");
    }
    for m in &view.models {
        let covered = m.coverage.iter().filter(|c| !c.is_empty()).count();
        let name = if m.name.is_empty() {
            String::new()
        } else {
            format!("{}, ", m.name)
        };
        let _ = writeln!(
            s,
            "model {} ({name}{}, {} layers): {covered}/{} blocks covered",
            m.id, m.arch, m.n_layers, m.n_layers
        );
        for g in &m.gaps {
            let _ = writeln!(s, "  GAP: blocks {}..{} have no holder", g[0], g[1]);
        }
        for p in &m.peers {
            let rtt = p
                .rtt_ms
                .map(|r| format!("{r:.2} ms"))
                .unwrap_or_else(|| "?".into());
            let via = p.via.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "  {:>3}..{:<3} {}  {}  {:.1} tok/s  {:<6} rtt {}  sessions {}/{}",
                p.range[0],
                p.range[1],
                p.peer_id,
                p.backend,
                p.throughput,
                via,
                rtt,
                p.free_sessions,
                p.max_sessions
            );
        }
    }
    s
}
