//! A node behind NAT serves through a relay: network namespaces made by
//! the test (see [`NatLab`]), nftables masquerade on the router, no packet
//! leaves them.
//!
//! The public node (bootstrap and relay, `--external-addr`) serves 0..15;
//! the home node behind the NAT serves 15..30 with `--bootstrap` and
//! `--relay` naming the public node: it reserves a slot there and
//! announces its `<relay>/p2p-circuit` address. An asker in a second home,
//! behind a symmetric NAT, gets the whole model's text, with the home
//! node (the last hop) reached through the relay. The second test's homes have only `--bootstrap`:
//! they find themselves unreachable and reserve on the bootstrap relay on
//! their own, then punch a hole between them. The third is the issue's
//! topology: a cone-NAT home serves the middle of the model, an asker
//! behind a symmetric NAT is served through the relay, an asker behind a
//! second cone NAT through a punched hole. The fourth fetches a slice's
//! pieces through the relay from a home behind a symmetric NAT.

use std::process::Output;
use std::time::{Duration, Instant};

use nakshatra_e2e::*;

const PROMPT: &str = "The capital of France is";
const GREEDY: &[&str] = &["--raw", "--temperature", "0", "--max-tokens", "24"];
/// The public node's fixed port (TCP, and UDP for its QUIC twin): its
/// `--external-addr` names it.
const PUBLIC_PORT: u16 = 41000;
/// The home nodes' fixed port: a hole punch dials from the listen port.
const HOME_PORT: u16 = 42000;
/// How long the home node may take to be found unreachable, reserve on the
/// relay and announce the circuit address (AutoNAT probes every 5 s).
const ANNOUNCE_WITHIN: Duration = Duration::from_secs(60);

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn node_args<'a>(model: &'a str, layers: &'a str, listen: &'a str) -> Vec<&'a str> {
    vec![
        "--model",
        model,
        "--layers",
        layers,
        "--listen",
        listen,
        "--no-mdns",
        "--threads",
        "1",
        "--max-sessions",
        "4",
        "--ctx-size",
        "256",
        "--record-ttl",
        "8",
        "--refresh",
        "2",
    ]
}

/// `swarm status --json` run on the public side.
fn status_in(lab: &NatLab, bootstrap: &str) -> Option<serde_json::Value> {
    status_json_in(&lab.public.prefix(), bootstrap)
}

/// Whether `peer` announces an address through the relay (`relay_part`:
/// `/p2p/<relay id>/p2p-circuit`) in a status view.
fn announces_circuit(view: &serde_json::Value, peer: &str, relay_part: &str) -> bool {
    peer_entry(view, peer).is_some_and(|p| {
        p["listen_addrs"].as_array().is_some_and(|a| {
            a.iter()
                .any(|s| s.as_str().is_some_and(|s| s.contains(relay_part)))
        })
    })
}

/// The entry of `peer` in the first model's `peers` of a status view.
fn peer_entry<'v>(view: &'v serde_json::Value, peer: &str) -> Option<&'v serde_json::Value> {
    view["models"][0]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["peer_id"].as_str() == Some(peer))
}

#[test]
fn node_behind_nat_serves_through_the_relay() {
    // Home 1 (symmetric NAT) is the asker's: no hole can be punched from
    // it, so the relay carries the last hop's tokens back.
    let lab = match NatLab::with_nats("nat", &[Nat::Cone, Nat::Symmetric]) {
        Ok(lab) => lab,
        Err(why) => {
            eprintln!(
                "SKIPPED node_behind_nat_serves_through_the_relay: cannot build the NAT lab \
                 (network namespaces, veth, nftables): {why}"
            );
            return;
        }
    };
    let t0 = Instant::now();
    let model = test_model();
    let model = model.to_str().unwrap();
    let (dp, dh) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    let listen = format!("/ip4/{}/tcp/{PUBLIC_PORT}", NatLab::PUBLIC_IP);
    let external_tcp = listen.clone();
    let external_quic = format!("/ip4/{}/udp/{PUBLIC_PORT}/quic-v1", NatLab::PUBLIC_IP);
    let mut args = node_args(model, "0..15", &listen);
    args.extend_from_slice(&[
        "--external-addr",
        &external_tcp,
        "--external-addr",
        &external_quic,
    ]);
    let public = Proc::join_in(&lab.public.prefix(), dp.path(), &args);
    let boot = format!("{external_tcp}/p2p/{}", public.peer_id());

    let home_listen = format!("/ip4/{}/tcp/{HOME_PORT}", NatLab::home_ip(0));
    let mut args = node_args(model, "15..30", &home_listen);
    args.extend_from_slice(&["--bootstrap", &boot, "--relay", &boot]);
    let home = Proc::join_in(&lab.homes[0].prefix(), dh.path(), &args);
    let home_id = home.peer_id();

    // The home node announces a circuit address through the public node.
    let relay_part = format!("/p2p/{}/p2p-circuit", public.peer_id());
    let view = wait_for(ANNOUNCE_WITHIN, || {
        status_in(&lab, &boot).filter(|v| {
            covered_blocks(v).len() == 30 && announces_circuit(v, &home_id, &relay_part)
        })
    });
    let Some(view) = view else {
        panic!(
            "the home node never announced a circuit address through the relay; \
             last view: {:?}\nhome stderr:\n{}\npublic stderr:\n{}",
            status_in(&lab, &boot),
            home.stderr(),
            public.stderr()
        );
    };
    let entry = peer_entry(&view, &home_id).expect("home in the view");
    eprintln!(
        "home node announced {} and is reached via {} (rtt {} ms) after {:.1} s",
        entry["listen_addrs"],
        entry["via"],
        entry["rtt_ms"],
        t0.elapsed().as_secs_f64()
    );
    // `swarm status` has no listener and the home's router forwards
    // nothing unsolicited: no hole can be punched, the relay carries it.
    assert_eq!(entry["via"], "relay", "{entry}");
    assert!(entry["rtt_ms"].as_f64().is_some(), "{entry}");
    let public_entry = peer_entry(&view, &public.peer_id()).expect("public node in the view");
    assert_eq!(public_entry["via"], "direct", "{public_entry}");

    // The chain through the relay gives exactly the whole model's text.
    let want = run_reference(model, GREEDY, PROMPT);
    let asker = tempfile::tempdir().unwrap();
    let d = asker.path().to_str().unwrap();
    let mut ask = vec!["--data-dir", d, "node", "ask", "--no-mdns", "--bootstrap"];
    ask.push(&boot);
    ask.extend_from_slice(GREEDY);
    ask.push(PROMPT);
    let o = nakshatra_in(&lab.homes[1].prefix(), &ask);
    assert!(
        o.status.success(),
        "ask failed: {}\nhome stderr:\n{}",
        err(&o),
        home.stderr()
    );
    assert_eq!(
        text(&o),
        want,
        "relayed chain text differs from the whole model"
    );
    let e = err(&o);
    let chain = e
        .lines()
        .find(|l| l.starts_with("chain:"))
        .expect("a chain: line");
    let hops: Vec<&str> = chain["chain:".len()..].split(" -> ").collect();
    assert_eq!(hops.len(), 2, "{chain}");
    assert!(
        hops[0].trim().starts_with(&public.peer_id()) && !hops[0].contains("(relayed)"),
        "{chain}"
    );
    assert!(
        hops[1].trim().starts_with(&home_id) && hops[1].trim().ends_with("[15..30) (relayed)"),
        "{chain}"
    );
    eprintln!(
        "relayed chain answered: {chain} ({:.1} s in all)",
        t0.elapsed().as_secs_f64()
    );
}

/// Two homes behind two NAT routers (endpoint-independent mapping,
/// filtering that lets a simultaneous open through): the first home's
/// node, measuring its next hop (the second home's node), reaches it
/// through the relay, and DCUtR upgrades that to a direct connection; the
/// routers' counters show packets going home to home. An asker on the
/// public side gets the whole model's text over public → home 0 → home 1.
#[test]
fn two_homes_punch_a_direct_connection() {
    let lab = match NatLab::new("punch", 2) {
        Ok(lab) => lab,
        Err(why) => {
            eprintln!(
                "SKIPPED two_homes_punch_a_direct_connection: cannot build the NAT lab \
                 (network namespaces, veth, bridge, nftables): {why}"
            );
            return;
        }
    };
    let t0 = Instant::now();
    let model = test_model();
    let model = model.to_str().unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();

    let listen = format!("/ip4/{}/tcp/{PUBLIC_PORT}", NatLab::PUBLIC_IP);
    let external_quic = format!("/ip4/{}/udp/{PUBLIC_PORT}/quic-v1", NatLab::PUBLIC_IP);
    let mut args = node_args(model, "0..10", &listen);
    args.extend_from_slice(&[
        "--external-addr",
        &listen,
        "--external-addr",
        &external_quic,
    ]);
    let public = Proc::join_in(&lab.public.prefix(), dirs[0].path(), &args);
    let boot = format!("{listen}/p2p/{}", public.peer_id());

    let listens: Vec<String> = (0..2)
        .map(|i| format!("/ip4/{}/tcp/{HOME_PORT}", NatLab::home_ip(i)))
        .collect();
    let mut homes = Vec::new();
    for (i, layers) in ["10..20", "20..30"].into_iter().enumerate() {
        let mut args = node_args(model, layers, &listens[i]);
        args.extend_from_slice(&["--bootstrap", &boot]);
        homes.push(Proc::join_in(
            &lab.homes[i].prefix(),
            dirs[i + 1].path(),
            &args,
        ));
    }

    // Both homes reachable through the relay, the model covered.
    let relay_part = format!("/p2p/{}/p2p-circuit", public.peer_id());
    let ids: Vec<String> = homes.iter().map(Proc::peer_id).collect();
    let view = wait_for(ANNOUNCE_WITHIN, || {
        status_in(&lab, &boot).filter(|v| {
            covered_blocks(v).len() == 30
                && ids.iter().all(|id| announces_circuit(v, id, &relay_part))
        })
    });
    assert!(
        view.is_some(),
        "the homes never announced circuit addresses; home 0:\n{}\nhome 1:\n{}",
        homes[0].stderr(),
        homes[1].stderr()
    );

    // Home 0 measures its next hop (home 1) through the relay; DCUtR
    // punches a direct connection between them.
    let punched = wait_for(ANNOUNCE_WITHIN, || {
        homes
            .iter()
            .any(|h| h.stderr().contains("hole punch: direct connection"))
            .then_some(())
    });
    assert!(
        punched.is_some(),
        "no hole punch between the homes; home 0:\n{}\nhome 1:\n{}",
        homes[0].stderr(),
        homes[1].stderr()
    );
    let direct = (lab.packets_to_other_homes(0), lab.packets_to_other_homes(1));
    eprintln!(
        "hole punched after {:.1} s; packets home 0 → home 1: {}, home 1 → home 0: {}",
        t0.elapsed().as_secs_f64(),
        direct.0,
        direct.1
    );
    assert!(direct.0 > 0 && direct.1 > 0, "{direct:?}");

    // The chain public → home 0 → home 1 gives the whole model's text.
    let want = run_reference(model, GREEDY, PROMPT);
    let asker = tempfile::tempdir().unwrap();
    let d = asker.path().to_str().unwrap();
    let mut ask = vec!["--data-dir", d, "node", "ask", "--no-mdns", "--bootstrap"];
    ask.push(&boot);
    ask.extend_from_slice(GREEDY);
    ask.push(PROMPT);
    let before = lab.packets_to_other_homes(0);
    let o = nakshatra_in(&lab.public.prefix(), &ask);
    assert!(
        o.status.success(),
        "ask failed: {}\nhome 0:\n{}\nhome 1:\n{}",
        err(&o),
        homes[0].stderr(),
        homes[1].stderr()
    );
    assert_eq!(text(&o), want, "chain text differs from the whole model");
    let e = err(&o);
    let chain = e
        .lines()
        .find(|l| l.starts_with("chain:"))
        .expect("a chain: line");
    assert!(
        chain.contains("[10..20)") && chain.contains("[20..30)"),
        "{chain}"
    );
    // The activations went home 0 → home 1 directly.
    let after = lab.packets_to_other_homes(0);
    eprintln!(
        "chain {chain}: {} packets home 0 → home 1 during the ask ({:.1} s in all)",
        after - before,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        after > before,
        "no direct packets between the homes during the ask"
    );
}

/// The chain hop of `peer` on an ask's `chain:` line.
fn hop_of<'c>(chain: &'c str, peer: &str) -> Option<&'c str> {
    chain["chain:".len()..]
        .split(" -> ")
        .map(str::trim)
        .find(|h| h.starts_with(peer))
}

/// Lines of `log` that say a hole punch ended, either way.
fn punch_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("hole punch: direct connection") || l.contains("hole punch failed"))
        .map(str::to_string)
        .collect()
}

/// The topology. The public side has the bootstrap and relay node
/// (0..10) and a second public node (20..30); home A, behind a cone NAT,
/// serves 10..20 with only `--bootstrap`; askers sit in home B, behind a
/// symmetric NAT, and in home C, behind a cone NAT.
///
/// - Every link between a public node and a home is direct: the home
///   dialled out (the reservation, the Kademlia lookups, its next-hop
///   probes).
/// - The asker in home B reaches A only through the relay: DCUtR is tried
///   and fails (B's router gives A's direction a port nobody observed),
///   no packet from B gets into home A, and the `chain:` line marks A
///   `(relayed)`. The answer is the whole model's text all the same.
/// - The asker in home C reaches A through the relay first and DCUtR
///   upgrades that to a direct connection: packets from C get into home
///   A. Its answer is the whole model's text too.
#[test]
fn cone_home_serves_and_a_symmetric_home_asks_through_the_relay() {
    let lab = match NatLab::with_nats("topo", &[Nat::Cone, Nat::Symmetric, Nat::Cone]) {
        Ok(lab) => lab,
        Err(why) => {
            eprintln!(
                "SKIPPED cone_home_serves_and_a_symmetric_home_asks_through_the_relay: cannot \
                 build the NAT lab (network namespaces, veth, bridge, nftables): {why}"
            );
            return;
        }
    };
    let (a, b, c) = (0, 1, 2);
    let t0 = Instant::now();
    let model = test_model();
    let model = model.to_str().unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();

    let public_args = |port: u16| {
        let tcp = format!("/ip4/{}/tcp/{port}", NatLab::PUBLIC_IP);
        let quic = format!("/ip4/{}/udp/{port}/quic-v1", NatLab::PUBLIC_IP);
        (tcp, quic)
    };
    let (r_tcp, r_quic) = public_args(PUBLIC_PORT);
    let mut args = node_args(model, "0..10", &r_tcp);
    args.extend_from_slice(&["--external-addr", &r_tcp, "--external-addr", &r_quic]);
    let relay = Proc::join_in(&lab.public.prefix(), dirs[0].path(), &args);
    let boot = format!("{r_tcp}/p2p/{}", relay.peer_id());
    let (p_tcp, p_quic) = public_args(PUBLIC_PORT + 1);
    let mut args = node_args(model, "20..30", &p_tcp);
    args.extend_from_slice(&["--external-addr", &p_tcp, "--external-addr", &p_quic]);
    args.extend_from_slice(&["--bootstrap", &boot]);
    let public = Proc::join_in(&lab.public.prefix(), dirs[1].path(), &args);

    let home_listen = format!("/ip4/{}/tcp/{HOME_PORT}", NatLab::home_ip(a));
    let mut args = node_args(model, "10..20", &home_listen);
    args.extend_from_slice(&["--bootstrap", &boot]);
    let home = Proc::join_in(&lab.homes[a].prefix(), dirs[2].path(), &args);
    let home_id = home.peer_id();

    // Home A finds itself unreachable, reserves on the relay and announces
    // its circuit address; the model is covered.
    let relay_part = format!("/p2p/{}/p2p-circuit", relay.peer_id());
    let view = wait_for(ANNOUNCE_WITHIN, || {
        status_in(&lab, &boot).filter(|v| {
            covered_blocks(v).len() == 30 && announces_circuit(v, &home_id, &relay_part)
        })
    });
    assert!(
        view.is_some(),
        "home A never announced a circuit address; home A:\n{}\nrelay:\n{}",
        home.stderr(),
        relay.stderr()
    );
    eprintln!(
        "home A reachable through the relay after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let want = run_reference(model, GREEDY, PROMPT);
    let ask_from = |i: usize| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let mut ask = vec!["--data-dir", &d, "node", "ask", "--no-mdns", "--bootstrap"];
        ask.push(&boot);
        ask.extend_from_slice(GREEDY);
        ask.push(PROMPT);
        let from_home = lab.packets_from_other_homes(a);
        let punches = punch_lines(&home.stderr()).len();
        let o = nakshatra_in(&lab.homes[i].prefix(), &ask);
        assert!(
            o.status.success(),
            "ask from home {i} failed: {}\nhome A:\n{}\nPUBLIC:\n{}",
            err(&o),
            home.stderr(),
            public.stderr()
        );
        assert_eq!(
            text(&o),
            want,
            "ask from home {i}: text differs from the whole model"
        );
        let e = err(&o);
        let chain = e
            .lines()
            .find(|l| l.starts_with("chain:"))
            .expect("a chain: line")
            .to_string();
        if std::env::var_os("NAKSHATRA_TEST_ASK_LOG").is_some() {
            eprintln!("ask from home {i} stderr:\n{e}");
        }
        let into_home = lab.packets_from_other_homes(a) - from_home;
        let punches: Vec<String> = punch_lines(&home.stderr()).split_off(punches);
        eprintln!(
            "ask from home {i}: {chain}\n  packets from other homes into home A: {into_home}\n  \
             home A's hole punches: {punches:?}"
        );
        (chain, into_home, punches)
    };

    // Symmetric home B: the relay carries A's link, and it answers.
    let (chain, into_home, punches) = ask_from(b);
    for (peer, range) in [(relay.peer_id(), "[0..10)"), (public.peer_id(), "[20..30)")] {
        let hop = hop_of(&chain, &peer).unwrap_or_else(|| panic!("{peer} not in {chain}"));
        assert!(hop.ends_with(range), "public hop reached directly: {chain}");
    }
    let hop = hop_of(&chain, &home_id).unwrap_or_else(|| panic!("home A not in {chain}"));
    assert!(
        hop.ends_with("[10..20) (relayed)"),
        "home A must be reached through the relay from the symmetric home: {chain}"
    );
    assert_eq!(
        into_home, 0,
        "no packet from the symmetric home may get into home A directly"
    );
    assert!(
        punches.iter().all(|l| !l.contains("direct connection")),
        "no hole punch can succeed with a symmetric NAT: {punches:?}"
    );

    // Cone home C: DCUtR upgrades the relayed link to a direct one.
    let (chain, into_home, punches) = ask_from(c);
    // The asker waited for the punch before opening the chain.
    assert!(
        hop_of(&chain, &home_id).is_some_and(|h| h.ends_with("[10..20)")),
        "home A must be reached directly once punched: {chain}"
    );
    assert!(
        punches
            .iter()
            .any(|l| l.contains("hole punch: direct connection")),
        "home A and home C must punch a hole: {punches:?}\nhome A:\n{}",
        home.stderr()
    );
    assert!(
        into_home > 0,
        "packets from home C must get into home A directly once punched"
    );
    eprintln!("topology checked in {:.1} s", t0.elapsed().as_secs_f64());
    drop(public);
}

/// Slice pieces come through the relay when the only holder that serves
/// them right is behind a NAT no hole can be punched through, and the
/// fetcher says so. The public node (bootstrap and relay) serves 0..15
/// from the whole model file, which holds every piece, so it serves them
/// corrupt (`--fault corrupt-pieces`): otherwise a fetcher, ranking
/// relayed peers last, would take every piece from it directly. The home
/// node, behind a symmetric NAT with only `--bootstrap`, serves 15..30 and
/// announces a circuit address. A node in a second symmetric home joins
/// with `--model-id` and `--layers 15..30` and no model file: once the
/// public node's first bad pieces are caught, the pieces come from the
/// home node through the relay, the fetcher prints the relay line once,
/// and it serves; an ask afterwards gives the whole model's text.
#[test]
fn pieces_come_through_the_relay_from_a_home_behind_nat() {
    let lab = match NatLab::with_nats("relf", &[Nat::Symmetric, Nat::Symmetric]) {
        Ok(lab) => lab,
        Err(why) => {
            eprintln!(
                "SKIPPED pieces_come_through_the_relay_from_a_home_behind_nat: cannot build \
                 the NAT lab (network namespaces, veth, bridge, nftables): {why}"
            );
            return;
        }
    };
    let t0 = Instant::now();
    let model = test_model();
    let model = model.to_str().unwrap();
    let info = nakshatra(&["model", "inspect", model, "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("inspect --json");
    let id = info["id"].as_str().expect("model id").to_string();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();

    let listen = format!("/ip4/{}/tcp/{PUBLIC_PORT}", NatLab::PUBLIC_IP);
    let external_quic = format!("/ip4/{}/udp/{PUBLIC_PORT}/quic-v1", NatLab::PUBLIC_IP);
    let mut args = node_args(model, "0..15", &listen);
    args.extend_from_slice(&[
        "--external-addr",
        &listen,
        "--external-addr",
        &external_quic,
        "--fault",
        "corrupt-pieces",
    ]);
    let public = Proc::join_in(&lab.public.prefix(), dirs[0].path(), &args);
    let boot = format!("{listen}/p2p/{}", public.peer_id());

    let home_listen = format!("/ip4/{}/tcp/{HOME_PORT}", NatLab::home_ip(0));
    let mut args = node_args(model, "15..30", &home_listen);
    args.extend_from_slice(&["--bootstrap", &boot]);
    let home = Proc::join_in(&lab.homes[0].prefix(), dirs[1].path(), &args);
    let home_id = home.peer_id();

    // The home node finds itself unreachable, reserves on the relay and
    // announces its circuit address.
    let relay_part = format!("/p2p/{}/p2p-circuit", public.peer_id());
    let announced = wait_for(ANNOUNCE_WITHIN, || {
        status_in(&lab, &boot).filter(|v| {
            covered_blocks(v).len() == 30 && announces_circuit(v, &home_id, &relay_part)
        })
    });
    assert!(
        announced.is_some(),
        "the home node never announced a circuit address; home:\n{}\npublic:\n{}",
        home.stderr(),
        public.stderr()
    );
    eprintln!(
        "home node reachable through the relay after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // The fetcher has no model file: `--model-id` in place of `--model`.
    let fetch_listen = format!("/ip4/{}/tcp/{HOME_PORT}", NatLab::home_ip(1));
    let mut args = node_args(&id, "15..30", &fetch_listen);
    args[0] = "--model-id";
    args.extend_from_slice(&["--bootstrap", &boot]);
    let t1 = Instant::now();
    let fetcher = Proc::join_in(&lab.homes[1].prefix(), dirs[2].path(), &args);
    let log = wait_for(Duration::from_secs(10), || {
        let l = fetcher.stderr();
        l.contains("serving layers 15..30").then_some(l)
    })
    .unwrap_or_else(|| panic!("the fetcher does not serve; stderr:\n{}", fetcher.stderr()));
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    let (summary, relayed) = (
        line("corrupt piece(s) refetched"),
        line("came through a relay from"),
    );
    eprintln!(
        "fetcher serving after {:.1} s:\n  {summary}\n  {relayed}",
        t1.elapsed().as_secs_f64()
    );
    assert!(
        log.contains("failed verification") && log.contains(&public.peer_id()),
        "the public node's corrupt pieces were not caught: {log}"
    );
    let notice = format!("fetching from {home_id} through a relay: no direct connection");
    assert_eq!(
        log.lines().filter(|l| l.trim() == notice).count(),
        1,
        "the fetcher must say once that it fetches through the relay: {log}"
    );
    assert!(
        relayed.contains(&home_id) && !relayed.contains(&public.peer_id()),
        "pieces must come through the relay from the home node only: {log}"
    );

    // The fetched slice answers: the whole model's text over the relay.
    let want = run_reference(model, GREEDY, PROMPT);
    let asker = tempfile::tempdir().unwrap();
    let d = asker.path().to_str().unwrap();
    let mut ask = vec!["--data-dir", d, "node", "ask", "--no-mdns", "--bootstrap"];
    ask.push(&boot);
    ask.extend_from_slice(GREEDY);
    ask.push(PROMPT);
    let o = nakshatra_in(&lab.public.prefix(), &ask);
    assert!(
        o.status.success(),
        "ask failed: {}\nfetcher:\n{}",
        err(&o),
        fetcher.stderr()
    );
    assert_eq!(text(&o), want, "chain text differs from the whole model");
    eprintln!(
        "ask answered over {} ({:.1} s in all)",
        err(&o)
            .lines()
            .find(|l| l.starts_with("chain:"))
            .unwrap_or_default(),
        t0.elapsed().as_secs_f64()
    );
}
