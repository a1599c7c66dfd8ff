//! The swarm simulator's table (`docs/scale.md`): for each node count,
//! a fresh node's time to the full coverage map, planning time, and the
//! DHT cost per serving node per simulated minute, plus the initial
//! placement's balance. See `nakshatra_e2e::sim` for what runs.
//!
//! Run: `cargo bench -p nakshatra-e2e --bench scale` (all four sizes,
//! about 20 minutes on 2 cores), or
//! `NAKSHATRA_SIM_NODES=50,100 cargo bench -p nakshatra-e2e --bench scale`.
//! `NAKSHATRA_SIM_SCALE=2` forces one time scale for every size (default:
//! [`default_scale`]).

use nakshatra_e2e::sim::{run, table_row, SimConfig, TABLE_HEADER};

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
        println!(
            "{row}   (time scale {scale}, incomplete fresh views {:?}, walks max {:.0}, walks by kind (bootstrap, closest, get record, put record, get providers, provide) {:.1?}, requests in max {:.0}, KiB max {:.1}, connections trimmed /node/min {:.1}, serving caches complete min {:.3} mean {:.3}, gossip received /node/min {:.0} dropped {:.1}, event loop answers p50 {:.3} s p99 {:.3} s, event loops died {}, failed plans {:?})",
            r.coverage_incomplete,
            r.walks.max,
            r.walks_by_kind,
            r.requests_in.max,
            r.bytes.max / 1024.0,
            r.trimmed.mean,
            r.cache_complete.0,
            r.cache_complete.1,
            r.gossip_received.mean,
            r.gossip_dropped.mean,
            r.loop_lag.p50,
            r.loop_lag.p99,
            r.loops_died,
            r.plan_errors
        );
        rows.push(row);
    }
    println!("\n{TABLE_HEADER}");
    for r in rows {
        println!("{r}");
    }
}
