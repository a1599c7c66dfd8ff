//! The swarm simulator's table (`docs/scale.md`): for each node count,
//! a fresh node's time to the full coverage map, planning time, and the
//! DHT cost per serving node per simulated minute, plus the initial
//! placement's balance. See `nakshatra_e2e::sim` for what runs.
//!
//! Run: `cargo bench -p nakshatra-e2e --bench scale` (all four sizes,
//! about 20 minutes on 2 cores), or
//! `NAKSHATRA_SIM_NODES=50,100 cargo bench -p nakshatra-e2e --bench scale`.
//! `NAKSHATRA_SIM_SCALE=2` forces one time scale for every size (default:
//! [`default_scale`]); `NAKSHATRA_SIM_WARMUP=4` measures 4 refreshes after
//! the announcements instead of 1 (the start's Kademlia bootstraps then
//! fall outside the window: docs/scale.md).

use nakshatra_e2e::sim::{run, steady_details, table_row, SimConfig, TABLE_HEADER};

/// The time scale a size runs at on 2 cores: slow enough that every
/// stack keeps its refresh (see the simulator's module doc).
fn default_scale(nodes: usize) -> f64 {
    match nodes {
        0..=100 => 1.0,
        101..=200 => 2.0,
        _ => 4.0,
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("NAKSHATRA_SIM_NODES")
        .unwrap_or_else(|_| "50,100,200,500".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let forced: Option<f64> = std::env::var("NAKSHATRA_SIM_SCALE")
        .ok()
        .and_then(|s| s.parse().ok());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut rows = Vec::new();
    for n in sizes {
        let scale = forced.unwrap_or_else(|| default_scale(n));
        let cfg = SimConfig::steady(n, scale);
        let r = rt.block_on(run(&cfg));
        let row = table_row(&r);
        println!("{row}   ({})", steady_details(&r));
        rows.push(row);
    }
    println!("\n{TABLE_HEADER}");
    for r in rows {
        println!("{r}");
    }
}
