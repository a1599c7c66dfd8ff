//! The swarm with real `nakshatra node join` processes on 127.0.0.1: nodes
//! announce signed layer ranges on Kademlia and find each other with no
//! static config.

use std::time::{Duration, Instant};

use nakshatra_e2e::*;

const TTL: &str = "6";
const REFRESH: &str = "2";

fn join_args<'a>(model: &'a str, layers: &'a str, bootstrap: Option<&'a str>) -> Vec<&'a str> {
    let mut v = loopback_args(bootstrap);
    v.extend_from_slice(&["--model", model, "--layers", layers]);
    v.extend_from_slice(&["--max-sessions", "2", "--ctx-size", "256"]);
    v.extend_from_slice(&["--record-ttl", TTL, "--refresh", REFRESH]);
    v
}

/// Five nodes, each bootstrapped only to the one before, cover all 30
/// blocks; a SIGKILLed node's blocks show uncovered within TTL + refresh;
/// restarted with the same data dir it has the same PeerId and covers them
/// again.
#[test]
fn five_nodes_cover_the_model_and_recover_from_a_crash() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let ranges = ["0..6", "6..12", "12..18", "18..24", "24..30"];
    let t0 = Instant::now();
    let mut nodes: Vec<Proc> = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        let prev = nodes.last().map(|p| p.addr().to_string());
        nodes.push(Proc::join(
            dirs[i].path(),
            &join_args(model, r, prev.as_deref()),
        ));
    }
    let started = t0.elapsed();
    let first = nodes[0].addr().to_string();
    let full = wait_for(Duration::from_secs(15), || {
        status_json(&first).filter(|v| covered_blocks(v).len() == 30)
    });
    let view = full.unwrap_or_else(|| {
        panic!(
            "not all 30 blocks covered within 15 s; last view: {:?}",
            status_json(&first)
        )
    });
    eprintln!(
        "5 nodes up in {started:?}, full coverage after {:?}",
        t0.elapsed()
    );
    let m = &view["models"][0];
    assert_eq!(m["n_layers"], 30);
    assert_eq!(m["arch"], "llama");
    assert_eq!(m["gaps"].as_array().map(Vec::len), Some(0));
    let peers = m["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 5);
    for p in peers {
        assert!(p["throughput"].as_f64().unwrap() > 0.0, "{p}");
        assert_eq!(p["backend"], "CPU");
        assert!(p["range"].as_array().is_some());
    }
    // Block 13 is held by the third node only.
    let victim_id = nodes[2].peer_id();
    assert_eq!(holders(&view, 13), vec![victim_id.clone()]);

    // Crash the third node: 12..18 uncovered within TTL + refresh (+ slack).
    nodes[2].kill();
    let killed = Instant::now();
    let gone = wait_for(Duration::from_secs(6 + 2 + 6), || {
        status_json(&first).filter(|v| {
            let c = covered_blocks(v);
            c.len() == 24 && !c.contains(&12) && !c.contains(&17)
        })
    });
    assert!(
        gone.is_some(),
        "blocks 12..18 still covered {:?} after the crash: {:?}",
        killed.elapsed(),
        status_json(&first)
    );
    let gaps = gone.unwrap()["models"][0]["gaps"].clone();
    assert_eq!(gaps, serde_json::json!([[12, 18]]));
    eprintln!("crash noticed after {:?}", killed.elapsed());

    // Restart with the same data dir: same identity, covered again.
    let back = Proc::join(dirs[2].path(), &join_args(model, "12..18", Some(&first)));
    assert_eq!(
        back.peer_id(),
        victim_id,
        "a restarted node must keep its PeerId"
    );
    let again = wait_for(Duration::from_secs(15), || {
        status_json(&first).filter(|v| covered_blocks(v).len() == 30)
    });
    let again = again.expect("covered again after restart");
    assert_eq!(holders(&again, 13), vec![victim_id]);
    nodes[2] = back;

    // A graceful leave withdraws at once (no TTL wait) and exits 0.
    let status = nodes[4].terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM exit: {status:?}"
    );
    let left = wait_for(Duration::from_secs(4), || {
        status_json(&first).filter(|v| !covered_blocks(v).contains(&24))
    });
    assert!(left.is_some(), "graceful leave not seen quickly");
}

/// Bad input: a range the model does not have fails before any network
/// activity; an unreachable bootstrap is retried, not fatal.
#[test]
fn bad_join_input() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let t0 = Instant::now();
    let o = nakshatra(&[
        "--data-dir",
        d,
        "node",
        "join",
        "--model",
        model,
        "--layers",
        "20..40",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("out of range") && err.contains("30 layers"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("listening"));
    assert!(!err.contains("panicked"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    // Nothing was created for the network side either: no identity yet.
    assert!(!dir.path().join("identity.key").exists());

    // A malformed multiaddr is refused by the parser.
    let o = nakshatra(&[
        "--data-dir",
        d,
        "node",
        "join",
        "--model",
        model,
        "--layers",
        "0..10",
        "--bootstrap",
        "not-a-multiaddr",
    ]);
    assert!(!o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));

    // Nobody listens on the bootstrap: the node still comes up and retries.
    let mut args = join_args(model, "0..10", None);
    args.extend_from_slice(&["--bootstrap", "/ip4/127.0.0.1/tcp/9"]);
    let mut p = Proc::join(dir.path(), &args);
    std::thread::sleep(Duration::from_secs(4));
    assert!(p.is_running(), "node died: {}", p.stderr());
    let err = p.stderr();
    assert!(err.contains("bootstrap"), "no retry logged: {err}");
    assert!(!err.contains("panicked"), "{err}");

    // `swarm status` with nobody to ask is a clear error, not a hang.
    let o = nakshatra(&[
        "swarm",
        "status",
        "--no-mdns",
        "--wait",
        "2",
        "--bootstrap",
        "/ip4/127.0.0.1/tcp/9",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no peer reachable"));
}

/// Two nodes with mDNS on and no bootstrap find each other. mDNS needs a
/// multicast-capable, non-loopback interface: the test makes two network
/// namespaces joined by a veth pair (a private LAN no packet leaves) and
/// skips, saying why, only where it cannot.
#[test]
fn mdns_nodes_find_each_other() {
    let (ns, ns_b) = match NetNs::lan_pair("mdns") {
        Ok(pair) => pair,
        Err(why) => {
            eprintln!("SKIPPED mdns_nodes_find_each_other: cannot make a network namespace with multicast: {why}");
            return;
        }
    };
    let model = test_model();
    let model = model.to_str().unwrap();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = |layers: &'static str, listen: &'static str| {
        vec![
            "--model",
            model,
            "--layers",
            layers,
            "--listen",
            listen,
            "--threads",
            "1",
            "--max-sessions",
            "1",
            "--ctx-size",
            "256",
        ]
    };
    let a = Proc::join_in(
        &ns.prefix(),
        da.path(),
        &args("0..15", "/ip4/10.77.0.1/tcp/0"),
    );
    let b = Proc::join_in(
        &ns_b.prefix(),
        db.path(),
        &args("15..30", "/ip4/10.77.0.2/tcp/0"),
    );
    // Ask A (inside the namespace) who covers what: B is there only if
    // they found each other.
    let seen = wait_for(Duration::from_secs(20), || {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(nakshatra_bin())
            .args([
                "swarm",
                "status",
                "--no-mdns",
                "--json",
                "--wait",
                "5",
                "--bootstrap",
                a.addr(),
            ])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        (covered_blocks(&v).len() == 30).then_some(v)
    });
    assert!(
        seen.is_some(),
        "A never learned of B over mDNS\nA: {}\nB: {}",
        a.stderr(),
        b.stderr()
    );
    let v = seen.unwrap();
    assert_eq!(holders(&v, 20), vec![b.peer_id()]);
}

/// A node that keeps publishing forged records (another peer's info signed
/// by a stranger, a tampered record claiming the whole model, an expired,
/// an oversized and a garbage one) pollutes nobody's view and crashes
/// nobody; honest nodes log why they drop each record.
#[test]
fn forged_records_do_not_pollute_the_swarm() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut a = Proc::join(da.path(), &join_args(model, "0..15", None));
    let first = a.addr().to_string();
    let mut b = Proc::join(db.path(), &join_args(model, "15..30", Some(&first)));
    let mut args = join_args(model, "0..10", Some(&first));
    args.extend_from_slice(&["--fault", "forge-records"]);
    let mut evil = Proc::join(dc.path(), &args);
    // Let a few rounds of forgeries go out (one every 5 s, first at once).
    let published = wait_for(Duration::from_secs(10), || {
        evil.stderr().contains("published").then_some(())
    });
    assert!(
        published.is_some(),
        "faulty node never forged: {}",
        evil.stderr()
    );
    std::thread::sleep(Duration::from_secs(6));

    let view = status_json(&first).expect("status");
    let m = &view["models"][0];
    let ranges: std::collections::BTreeMap<String, serde_json::Value> = m["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["peer_id"].as_str().unwrap().to_string(),
                p["range"].clone(),
            )
        })
        .collect();
    assert_eq!(ranges.get(&a.peer_id()), Some(&serde_json::json!([0, 15])));
    assert_eq!(ranges.get(&b.peer_id()), Some(&serde_json::json!([15, 30])));
    // The faulty node's honest announcement still counts; its lies do not.
    assert_eq!(
        ranges.get(&evil.peer_id()),
        Some(&serde_json::json!([0, 10]))
    );
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert_eq!(holders(&view, 20), vec![b.peer_id()]);
    for p in m["peers"].as_array().unwrap() {
        assert!(
            p["throughput"].as_f64().unwrap() < 1e8,
            "forged throughput shown: {p}"
        );
    }
    // The honest nodes saw and dropped forged records, and are alive.
    let logs = format!("{}{}", a.stderr(), b.stderr());
    assert!(logs.contains("dropping invalid DHT record"), "{logs}");
    for (name, p) in [("a", &mut a), ("b", &mut b), ("evil", &mut evil)] {
        assert!(p.is_running(), "{name} died");
        assert!(!p.stderr().contains("panicked"), "{name} panicked");
    }
}
