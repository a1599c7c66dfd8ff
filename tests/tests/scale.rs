//! The swarm simulator's churn test (issue 15): real swarm stacks in one
//! process, 10 % of them crashing each simulated minute and as many
//! joining, with rebalancing on. See `nakshatra_e2e::sim`.
//!
//! CI runs a reduced form (60 nodes, time scaled by 0.25, 4 simulated
//! minutes: about two real minutes). The full form, 500 nodes for 10
//! simulated minutes with the clock slowed six times (time scale 6, at
//! which 500 stacks keep up on 2 cores; `NAKSHATRA_SIM_SCALE` overrides
//! it). On 2 cores it
//! passes in about 110 real minutes (2026-12-03, 6,557 s: start 12,
//! steady state 17, churn 60, gap and one TTL 16): memory 12.2-13.1 GiB
//! through the churn, crashed nodes gone from the views within 82.6
//! simulated s (TTL 90), the gap closed in 95 s. Earlier runs ran out of
//! memory (before the gossip queue cap), failed the churn asker's plans
//! (an unscaled dial timeout) or stalled (the churn driver queued on a
//! fair async mutex): see docs/scale.md. `NAKSHATRA_SIM_CHURN_MINUTES`
//! shortens the churn; `RUST_LOG` turns on every stack's logs.
//!
//! ```text
//! NAKSHATRA_SIM_FULL=1 cargo test --release -p nakshatra-e2e --features nakshatra/fault-injection --test scale -- --nocapture
//! ```

use nakshatra_e2e::sim::{run, steady_details, table_row, SimConfig, GAP_BLOCK, TABLE_HEADER};

#[test]
fn churn_keeps_the_map_true_and_the_nodes_bounded() {
    // RUST_LOG set: every stack's logs on stderr (for example
    // `nakshatra_swarm::probe=debug` says why probes went unanswered).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let full = std::env::var("NAKSHATRA_SIM_FULL").is_ok_and(|v| v == "1");
    let cfg = if full {
        let scale = std::env::var("NAKSHATRA_SIM_SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(6.0);
        // A shorter run (the gap phase sooner): NAKSHATRA_SIM_CHURN_MINUTES.
        let churn_minutes = std::env::var("NAKSHATRA_SIM_CHURN_MINUTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10);
        SimConfig {
            churn_minutes,
            gap_phase: true,
            fresh_nodes: 2,
            plans: 5,
            ..SimConfig::steady(500, scale)
        }
    } else {
        SimConfig {
            churn_minutes: 4,
            gap_phase: true,
            fresh_nodes: 2,
            plans: 10,
            ..SimConfig::steady(60, 0.25)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = rt.block_on(run(&cfg));
    println!("{TABLE_HEADER}\n{}", table_row(&r));
    println!("steady state: {}", steady_details(&r));
    println!(
        "churn: {} crashed, {} of them seen after their crash, longest {:.1} s (TTL {:.0} s); \
         longest a held block was missing from the view {:.1} s; longest a block had no live \
         holder {:.1} s; chains {} of which {} through a dead node ({} through one crashed before \
         the plan began; plans took p50 {:.1} s p99 {:.1} s real, {} probes, {} of them silent); {} moves (at most {} by one \
         node); replicas per block at the end {}-{}, weakest block {:.1} tok/s (mean {:.1})",
        r.crashed,
        r.seen_after_crash,
        r.max_advertised_after_crash,
        r.ttl_s,
        r.max_hidden_block,
        r.max_uncovered_block,
        r.chains.0,
        r.chains.1,
        r.chains_dead_before,
        r.churn_plan.p50,
        r.churn_plan.p99,
        r.churn_probes.0,
        r.churn_probes.1,
        r.moves,
        r.max_moves_per_node,
        r.end_replicas_min_max.0,
        r.end_replicas_min_max.1,
        r.end_weakest_block_tput.0,
        r.end_weakest_block_tput.1,
    );
    println!(
        "gap: every holder of block {GAP_BLOCK} crashed ({} nodes); covered again by a move after {:?} simulated s",
        r.gap.map_or(0, |g| g.0),
        r.gap.and_then(|g| g.1)
    );
    println!(
        "churn asker: plan errors {:?}; fewest peers connected after a plan {:?}",
        r.churn_plan_errors, r.churn_asker_least_connected
    );
    println!(
        "rebalancing: {} checks run ({:.2} a node a simulated minute), {} timed out, {} skipped \
         (the node's previous check still running)",
        r.rebalance_checks.0, r.checks_per_node_minute, r.rebalance_checks.1, r.rebalance_checks.2
    );
    println!(
        "joins: {} placed and announced, {} given up (not placed within the join deadline)",
        r.joins.0, r.joins.1
    );
    for (m, live, rss, tasks) in &r.samples {
        println!("minute {m}: {live} live nodes, RSS {rss:.0} MiB, {tasks} tasks");
    }

    assert!(r.crashed > 0, "nothing crashed: the churn did not run");
    // The swarm must stay the size it was: a join that cannot place
    // itself (no view, no announcement) within its deadline is the
    // simulator falling behind, and more than a few would shrink the swarm
    // under the churn.
    assert!(
        r.joins.1 * 10 <= r.joins.0 + r.joins.1,
        "{} of {} joins were given up",
        r.joins.1,
        r.joins.0 + r.joins.1
    );
    assert_eq!(r.loops_died, 0, "event loops ended on their own (a panic?)");
    // Slack for the observer's own period (3 simulated seconds) and one
    // view's time.
    let slack = 6.0;
    assert!(
        r.max_advertised_after_crash <= r.ttl_s + slack,
        "a crashed node stayed advertised {:.1} s, over one TTL ({:.0} s)",
        r.max_advertised_after_crash,
        r.ttl_s
    );
    assert!(
        r.max_hidden_block <= r.ttl_s + slack,
        "a block held by a live node was missing from the view for {:.1} s (TTL {:.0} s)",
        r.max_hidden_block,
        r.ttl_s
    );
    assert!(
        r.chains.0 > 0,
        "the asker planned no chain during the churn"
    );
    assert!(
        r.end_replicas_min_max.0 >= 1,
        "a block has no holder at the end"
    );
    // The simulator itself must keep up: a node that is checked less than
    // about once a simulated minute cannot reach its confirmations within
    // the gap's wait, and the gap would stay open for the simulator's
    // sake, not the design's (the 500-node run's checks, one after
    // another, once did).
    assert!(
        r.checks_per_node_minute >= 1.5,
        "rebalancing checks ran {:.2} times a node a simulated minute (aim: 4)",
        r.checks_per_node_minute
    );
    let (killed, healed) = r.gap.expect("the gap phase ran");
    assert!(killed > 0, "nobody held block {GAP_BLOCK}");
    assert!(
        healed.is_some(),
        "block {GAP_BLOCK} stayed uncovered: no node moved to it"
    );
    assert!(
        r.max_moves_per_node <= 3,
        "a node moved {} times: flapping",
        r.max_moves_per_node
    );
    // Bounded: the live node count is constant, so memory and tasks must
    // not grow with the crashes and joins (the first minute's sample is
    // the baseline; allocator slack of half again plus 256 MiB).
    let (_, _, rss0, tasks0) = r.samples[1.min(r.samples.len() - 1)];
    let (_, _, rss1, tasks1) = r.samples[r.samples.len() - 1];
    assert!(
        rss1 <= rss0 * 1.5 + 256.0,
        "process memory grew from {rss0:.0} to {rss1:.0} MiB"
    );
    assert!(
        tasks1 as f64 <= tasks0 as f64 * 1.5 + 64.0,
        "tokio tasks grew from {tasks0} to {tasks1}"
    );
}

/// `--layers auto` (and the simulator's joins) place a node from the
/// model's view; a joining node's first view can come back empty while
/// its peers serve the model, and placing from it put such joins on the
/// first blocks (block 0 held by 237 nodes at the end of a 500-node
/// churn). [`view_for_placement`] reads the view again while peers are
/// known to serve the model and it shows none, within its wait; a model
/// nobody is known to serve is placed from the first view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_waits_for_the_servers_it_knows_of_before_placing() {
    use std::time::{Duration, Instant};

    use nakshatra_e2e::sim::{sim_config, MODEL};
    use nakshatra_node::placement::view_for_placement;
    use nakshatra_swarm::{spawn, IdentityKeypair, ModelShape, ServerInfo};

    let shape = ModelShape {
        n_layers: 80,
        arch: "llama".into(),
    };
    let (server, server_task) = spawn(
        IdentityKeypair::generate_ed25519(),
        sim_config(true, None, 1.0),
    )
    .await
    .expect("server stack");
    let addr = server.listen_addrs().await.expect("listen addrs")[0].clone();
    let boot = format!("{addr}/p2p/{}", server.peer_id())
        .parse()
        .expect("multiaddr");
    let (joiner, joiner_task) = spawn(
        IdentityKeypair::generate_ed25519(),
        sim_config(true, Some(boot), 1.0),
    )
    .await
    .expect("joining stack");
    joiner
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("connected");

    // A view for placement, and how long it took.
    let timed_view = |served: bool, wait: Duration, poll: Duration| {
        let (joiner, shape) = (&joiner, &shape);
        async move {
            let t = Instant::now();
            let view = view_for_placement(joiner, MODEL, shape, served, wait, poll)
                .await
                .expect("view");
            (view, t.elapsed())
        }
    };

    // Nobody serves it yet: not known to be served, the first view is
    // used as it is; known to be served, it is read again for the wait
    // and then used (empty) all the same.
    let poll = Duration::from_millis(100);
    let (view, first_view) = timed_view(false, Duration::from_secs(5), poll).await;
    assert!(view.peers.is_empty(), "{:?}", view.peers);
    let (view, waited) = timed_view(true, Duration::from_secs(1), poll).await;
    assert!(view.peers.is_empty(), "{:?}", view.peers);
    assert!(
        waited >= Duration::from_millis(900) && waited < first_view + Duration::from_secs(5),
        "an empty view of a served model is read again for the wait (1 s), then given up: took {waited:?}"
    );

    // The server announces 1.5 s into a join's wait: the join places from
    // a view that shows it, not from the empty one it read first.
    let announcer = {
        let server = server.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut info = ServerInfo::new(MODEL, "llama", 80, 0..40, 8192);
            info.throughput = 10.0;
            server.announce(info).await
        })
    };
    let (view, took) = timed_view(true, Duration::from_secs(20), Duration::from_millis(250)).await;
    announcer.await.expect("announcer").expect("announce");
    let holders: Vec<_> = view.peers.iter().map(|p| p.peer_id).collect();
    assert_eq!(holders, vec![server.peer_id()], "took {took:?}");
    assert_eq!(view.coverage[39], vec![server.peer_id()]);
    assert!(view.coverage[40].is_empty());
    assert!(
        took >= Duration::from_millis(1400),
        "placed before the server announced: {took:?}"
    );
    eprintln!("empty first view: {first_view:?}; gave up after {waited:?}; the server's announcement seen after {took:?}");

    let _ = joiner.shutdown().await;
    let _ = server.shutdown().await;
    joiner_task.abort();
    server_task.abort();
}
