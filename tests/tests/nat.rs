//! A node behind NAT serves through a relay: network namespaces made by
//! the test (see [`NatLab`]), nftables masquerade on the router, no packet
//! leaves them.
//!
//! The public node (bootstrap and relay, `--external-addr`) serves 0..15;
//! the home node behind the NAT serves 15..30 with `--bootstrap` and
//! `--relay` naming the public node: it reserves a slot there and
//! announces its `<relay>/p2p-circuit` address. An asker on the public
//! side gets the whole model's text, and sees the home node reached
//! through the relay. The second test's homes have only `--bootstrap`:
//! they find themselves unreachable and reserve on the bootstrap relay on
//! their own, then punch a hole between them.

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

/// The entry of `peer` in the first model's `peers` of a status view.
fn peer_entry<'v>(view: &'v serde_json::Value, peer: &str) -> Option<&'v serde_json::Value> {
    view["models"][0]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["peer_id"].as_str() == Some(peer))
}

#[test]
fn node_behind_nat_serves_through_the_relay() {
    let lab = match NatLab::new("nat", 1) {
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
            covered_blocks(v).len() == 30
                && peer_entry(v, &home_id).is_some_and(|p| {
                    p["listen_addrs"].as_array().is_some_and(|a| {
                        a.iter()
                            .any(|s| s.as_str().is_some_and(|s| s.contains(&relay_part)))
                    })
                })
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
    // The asker has no listener and the home's router forwards nothing
    // unsolicited: no hole can be punched, the relay carries it.
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
    let o = nakshatra_in(&lab.public.prefix(), &ask);
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
                && ids.iter().all(|id| {
                    peer_entry(v, id).is_some_and(|p| {
                        p["listen_addrs"].as_array().is_some_and(|a| {
                            a.iter()
                                .any(|s| s.as_str().is_some_and(|s| s.contains(&relay_part)))
                        })
                    })
                })
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
