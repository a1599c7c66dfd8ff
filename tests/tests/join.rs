//! Joining with one command, and QUIC: `node join --bootstrap <addr>` and
//! nothing else serves the model the swarm needs most (fetched from
//! peers), a node reached only over QUIC serves and answers, and a swarm
//! with no model to serve is a clear error. Real processes on 127.0.0.1.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nakshatra_e2e::*;
use nakshatra_swarm::{IdentityKeypair, Protocol, SwarmConfig};

const PROMPT: &str = "The capital of France is";
const GREEDY: &[&str] = &["--raw", "--temperature", "0", "--max-tokens", "24"];
/// How long a joining node may take to fetch, load and announce.
const JOIN_WAIT: Duration = Duration::from_secs(120);
/// How long `node join` may take to give up on a swarm serving nothing
/// (its peer wait, then the view it reads for a few seconds).
const NO_MODEL_WAIT: Duration = Duration::from_secs(40);
/// A QUIC-only listen address on loopback.
const QUIC_LOOPBACK: &str = "/ip4/127.0.0.1/udp/0/quic-v1";

/// The model id of `model` (`model inspect --json`).
fn model_id(model: &str) -> String {
    let o = nakshatra(&["model", "inspect", "--json", model]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect json");
    v["id"].as_str().expect("id").to_string()
}

/// A seeding node's flags: loopback, the model file, `layers`.
fn seed_args<'a>(model: &'a str, layers: &'a str, listen: &'a str) -> Vec<&'a str> {
    let mut v = loopback_args(None);
    // `loopback_args` listens on TCP; swap the address when asked.
    v[1] = listen;
    v.extend_from_slice(&["--model", model, "--layers", layers]);
    v
}

/// A port number free on 127.0.0.1 for both TCP and UDP just now.
fn free_port() -> u16 {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("local addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP");
}

/// `node join` with its stdout's `listening on` lines awaited for
/// [`JOIN_WAIT`] (a fetching node prints them once it serves).
fn join_slow(data_dir: &Path, args: &[&str]) -> Proc {
    let mut full = vec!["node", "join"];
    full.extend_from_slice(args);
    let mut p = Proc::spawn(&[], data_dir, &full);
    p.wait_listening(JOIN_WAIT);
    p
}

/// `nakshatra ARGS` with `RUST_LOG=rust_log`, killed after `within`.
fn run_logged(args: &[&str], rust_log: &str, within: Duration) -> Output {
    let mut child = Command::new(nakshatra_bin())
        .args(args)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nakshatra");
    // Read both pipes while it runs (a debug log fills a pipe's buffer).
    let out = child.stdout.take().map(read_all);
    let err = child.stderr.take().map(read_all);
    let deadline = Instant::now() + within;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let collect = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    Output {
        status,
        stdout: collect(out),
        stderr: collect(err),
    }
}

fn read_all(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The design card's usage: a seeder serves blocks 0..15 of the only
/// model; a node started with `--bootstrap` alone (plus the loopback
/// flags every test node gets) says which model it chose and why, takes
/// the uncovered blocks 15..30, fetches them from the seeder, verified,
/// and serves; an ask through the swarm gives the whole model's text.
/// Both listen on TCP and QUIC and announce both.
#[test]
fn bootstrap_alone_serves_the_blocks_the_only_model_lacks() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let id = model_id(model);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // A TCP listen address gets its QUIC twin on the same port number.
    let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let seeder = Proc::join(dirs[0].path(), &seed_args(model, "0..15", &listen));
    let tcp = seeder.addrs.iter().find(|a| a.contains("/tcp/"));
    let quic = seeder.addrs.iter().find(|a| a.contains("/quic-v1/"));
    let (Some(tcp), Some(quic)) = (tcp, quic) else {
        panic!("seeder listens on {:?}", seeder.addrs);
    };
    let port = |a: &str, proto: &str| {
        a.split(&format!("/{proto}/"))
            .nth(1)
            .and_then(|r| r.split('/').next())
            .map(str::to_string)
    };
    assert_eq!(port(tcp, "tcp"), port(quic, "udp"), "{:?}", seeder.addrs);
    let boot = seeder.addr().to_string();
    assert!(boot.contains("/tcp/"), "TCP is printed first: {boot}");

    let joiner = join_slow(dirs[1].path(), &loopback_args(Some(&boot)));
    let e = joiner.stderr();
    let chose = e
        .lines()
        .find(|l| l.starts_with("model: "))
        .unwrap_or_else(|| panic!("no `model:` line; stderr:\n{e}"));
    assert_eq!(
        chose,
        format!("model: {id} (chosen: the only model in the swarm)")
    );
    assert!(
        e.contains(&format!("serving layers 15..30 of model {id}")),
        "{e}"
    );
    assert!(e.contains("fetched"), "the joiner fetched nothing: {e}");

    let view = wait_for(Duration::from_secs(15), || {
        status_json(&boot).filter(|v| covered_blocks(v).len() == 30)
    })
    .unwrap_or_else(|| panic!("not covered: {:?}", status_json(&boot)));
    assert_eq!(holders(&view, 29), vec![joiner.peer_id()]);
    for p in view["models"][0]["peers"].as_array().unwrap() {
        let addrs = p["listen_addrs"].to_string();
        assert!(
            addrs.contains("/quic-v1") && addrs.contains("/tcp/"),
            "announced addresses lack a transport: {p}"
        );
    }

    let want = run_reference(model, GREEDY, PROMPT);
    let asker = tempfile::tempdir().unwrap();
    let o = node_ask(&boot, asker.path(), GREEDY, PROMPT);
    assert!(o.status.success(), "ask failed: {}", err(&o));
    assert_eq!(text(&o), want, "chain text differs from the whole model");
    let chain = err(&o);
    let chain = chain
        .lines()
        .find(|l| l.starts_with("chain:"))
        .expect("a chain: line");
    assert!(chain.contains(&joiner.peer_id()), "{chain}");
    assert!(chain.contains(&seeder.peer_id()), "{chain}");
}

/// Two nodes that listen on QUIC only (0..15 and 15..30, the second
/// bootstrapped from the first's `/udp/.../quic-v1` address, with no model
/// file: it names the model and fetches its blocks from the first) serve a
/// chain, and an ask bootstrapped from a QUIC address gets the whole
/// model's text. The asker's log shows every connection it made, and
/// each is QUIC.
#[test]
fn nodes_reached_only_over_quic_serve_and_answer() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Proc::join(dirs[0].path(), &seed_args(model, "0..15", QUIC_LOOPBACK));
    assert!(
        a.addrs
            .iter()
            .all(|x| x.contains("/udp/") && x.contains("/quic-v1/")),
        "a QUIC-only node listens on {:?}",
        a.addrs
    );
    let boot = a.addr().to_string();
    // The second node has no model file: it names the model as people do
    // (the tag cut at a `-` of the name `a` announces) and fetches its
    // blocks from `a`.
    let mut args = loopback_args(Some(&boot));
    args[1] = QUIC_LOOPBACK;
    args.extend_from_slice(&["--model-id", "smollm2:135m", "--layers", "15..30"]);
    let b = join_slow(dirs[1].path(), &args);
    let id = model_id(model);
    let e = b.stderr();
    assert!(
        e.lines()
            .any(|l| l == format!("model: {id} (named: smollm2:135m)")),
        "no `model:` line naming it; stderr:\n{e}"
    );
    assert!(
        b.addrs.iter().all(|x| x.contains("/quic-v1/")),
        "{:?}",
        b.addrs
    );
    let full = wait_for(Duration::from_secs(15), || {
        status_json(&boot).filter(|v| covered_blocks(v).len() == 30)
    });
    assert!(full.is_some(), "not covered: {:?}", status_json(&boot));

    let want = run_reference(model, GREEDY, PROMPT);
    let d = dirs[2].path().to_str().unwrap();
    let mut ask = vec!["--data-dir", d, "node", "ask", "--no-mdns"];
    ask.extend_from_slice(&["--bootstrap", &boot]);
    ask.extend_from_slice(GREEDY);
    ask.push(PROMPT);
    let o = run_logged(
        &ask,
        "warn,nakshatra_swarm::event_loop=debug,libp2p_kad=error,llama-cpp-2=error",
        Duration::from_secs(120),
    );
    let e = err(&o);
    assert!(o.status.success(), "ask failed: {e}");
    assert_eq!(text(&o), want, "chain text differs from the whole model");
    // The event loop logs `connected peer=<id> addr=<remote address>` for
    // every connection: to both hops, and only over QUIC.
    let connected: Vec<&str> = e
        .lines()
        .filter(|l| l.contains("nakshatra_swarm::event_loop") && l.contains(" connected "))
        .collect();
    for node in [&a, &b] {
        assert!(
            connected
                .iter()
                .any(|l| l.contains(&format!("peer={}", node.peer_id()))),
            "no connection to {} logged: {connected:?}",
            node.peer_id()
        );
    }
    for l in &connected {
        assert!(l.contains("/quic-v1"), "not a QUIC connection: {l}");
    }
}

/// `node join --bootstrap <peer>` into a swarm that serves no model (here
/// a bare libp2p peer of the test's own, serving nothing) fails within
/// seconds, exit code 1, saying how to seed a model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_alone_into_a_swarm_without_a_model_says_how_to_seed() {
    let mut cfg = SwarmConfig::server();
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.mdns = false;
    let (peer, task) = nakshatra_swarm::spawn(IdentityKeypair::generate_ed25519(), cfg)
        .await
        .unwrap();
    let addr = peer.listen_addrs().await.unwrap()[0]
        .clone()
        .with(Protocol::P2p(peer.peer_id()))
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let t0 = Instant::now();
    let o = tokio::task::spawn_blocking(move || {
        let mut args = vec!["--data-dir", &d, "node", "join"];
        args.extend(loopback_args(Some(&addr)));
        run_logged(
            &args,
            "info,libp2p_kad=error,llama-cpp-2=error",
            NO_MODEL_WAIT,
        )
    })
    .await
    .unwrap();
    let took = t0.elapsed();
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(took < NO_MODEL_WAIT, "took {took:?}");
    let last = e.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: no model is served in this swarm yet")
            && last.contains("nakshatra node join --model PATH.gguf"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
    assert!(!text(&o).contains("listening on"));
    eprintln!("gave up after {took:?}");
    let _ = peer.shutdown().await;
    let _ = task.await;
}
