//! `node ask` through real `nakshatra node join` processes on 127.0.0.1:
//! a chain chosen over the swarm, hidden states pushed hop to hop, tokens
//! streamed back — and exactly the whole model's text.

use std::process::Output;
use std::time::{Duration, Instant};

use nakshatra_e2e::*;

const PROMPT: &str = "The capital of France is";

fn join_args<'a>(
    model: &'a str,
    layers: &'a str,
    bootstrap: Option<&'a str>,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = loopback_args(bootstrap);
    v.extend_from_slice(&["--model", model, "--layers", layers]);
    v.extend_from_slice(&["--max-sessions", "8", "--ctx-size", "512"]);
    v.extend_from_slice(&["--record-ttl", "8", "--refresh", "2"]);
    v.extend_from_slice(extra);
    v
}

/// A TCP port free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Three nodes holding 0..10, 10..20, 20..30, each bootstrapped to the
/// first; the first takes direct streams on a port given with
/// `--direct-port`, the others on any free one.
fn three_nodes(model: &str, dirs: &[tempfile::TempDir]) -> Vec<Proc> {
    let port = free_port().to_string();
    let a = Proc::join(
        dirs[0].path(),
        &join_args(model, "0..10", None, &["--direct-port", &port]),
    );
    // The first hop listens for direct streams where it was told to.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_ok(),
        "no direct-stream listener on --direct-port {port}"
    );
    let first = a.addr().to_string();
    let b = Proc::join(
        dirs[1].path(),
        &join_args(model, "10..20", Some(&first), &[]),
    );
    let c = Proc::join(
        dirs[2].path(),
        &join_args(model, "20..30", Some(&first), &[]),
    );
    let nodes = vec![a, b, c];
    let full = wait_for(Duration::from_secs(15), || {
        status_json(&first).filter(|v| covered_blocks(v).len() == 30)
    });
    assert!(full.is_some(), "swarm never covered the model");
    nodes
}

fn ask(bootstrap: &str, data_dir: &std::path::Path, extra: &[&str], prompt: &str) -> Output {
    node_ask(bootstrap, data_dir, extra, prompt)
}

/// The whole model in one process (the reference).
fn reference(model: &str, extra: &[&str], prompt: &str) -> String {
    run_reference(model, extra, prompt)
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const GREEDY: &[&str] = &["--raw", "--temperature", "0", "--max-tokens", "32"];

#[test]
fn chain_gives_the_whole_models_text_and_more() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = three_nodes(model, &dirs);
    let boot = nodes[0].addr().to_string();
    let asker = tempfile::tempdir().unwrap();

    // Greedy, raw: exactly the whole model's text.
    let want = reference(model, GREEDY, PROMPT);
    assert!(want.contains("Paris"), "reference: {want:?}");
    let o = ask(&boot, asker.path(), GREEDY, PROMPT);
    assert!(o.status.success(), "ask failed: {}", err(&o));
    assert_eq!(text(&o), want, "chain text differs from the whole model");
    let e = err(&o);
    let chain = e
        .lines()
        .find(|l| l.starts_with("chain:"))
        .expect("a chain: line");
    for n in &nodes {
        assert!(chain.contains(&n.peer_id()), "{chain}");
    }
    assert!(
        chain.contains("[0..10)") && chain.contains("[10..20)") && chain.contains("[20..30)"),
        "{chain}"
    );
    let stats = e
        .lines()
        .find(|l| l.starts_with("stats:"))
        .expect("a stats line");
    assert!(
        stats.contains("prefill") && stats.contains("decode"),
        "{stats}"
    );
    // The asker's links (to hop 1, the tokens from hop 3) ran on direct
    // streams; with --no-direct every link is a libp2p stream, and the
    // text is the same.
    assert!(stats.contains("links direct 2, libp2p 0"), "{stats}");
    let mut no_direct = GREEDY.to_vec();
    no_direct.push("--no-direct");
    let o = ask(&boot, asker.path(), &no_direct, PROMPT);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(text(&o), want, "libp2p links give other text");
    let e = err(&o);
    let stats = e.lines().find(|l| l.starts_with("stats:")).expect("stats");
    assert!(stats.contains("links direct 0, libp2p 2"), "{stats}");

    // --json: one object with the text, tokens, chain and timings.
    let mut j = GREEDY.to_vec();
    j.push("--json");
    let o = ask(&boot, asker.path(), &j, PROMPT);
    assert!(o.status.success(), "{}", err(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(format!("{}\n", v["text"].as_str().unwrap()), want);
    assert_eq!(v["tokens"].as_array().map(Vec::len), Some(32));
    assert_eq!(v["chain"].as_array().map(Vec::len), Some(3));
    assert!(v["timings"]["decode_tps"].as_f64().unwrap() > 0.0);
    // The chain fed itself every decode step (the ring: the last hop sent
    // each token to hop 1); with --no-ring the asker sends each step, and
    // the text is the same.
    assert_eq!(v["timings"]["ring_steps"], 31, "{}", v["timings"]);
    j.push("--no-ring");
    let o = ask(&boot, asker.path(), &j, PROMPT);
    assert!(o.status.success(), "{}", err(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(format!("{}\n", v["text"].as_str().unwrap()), want);
    assert_eq!(v["timings"]["ring_steps"], 0, "{}", v["timings"]);

    // The model by name: `swarm status` shows the name its servers
    // announce (from the GGUF's `general.*` entries), and `--model` takes
    // it, its base alone, or an id prefix; a name nobody serves is a clear
    // error.
    let id = inspect_model_id(model);
    let st = nakshatra(&["swarm", "status", "--no-mdns", "--bootstrap", &boot]);
    let line = format!("model {id} (smollm2:135m-8k-lc100k-mix1-ep2-q4_1, llama, 30 layers)");
    assert!(text(&st).contains(&line), "{}", text(&st));
    for name in [
        "smollm2:135m-8k-lc100k-mix1-ep2-q4_1",
        "SmolLM2",
        "smollm2:135m",
        &id[..10],
    ] {
        let mut n = GREEDY.to_vec();
        n.extend_from_slice(&["--model", name]);
        let o = ask(&boot, asker.path(), &n, PROMPT);
        assert!(o.status.success(), "--model {name}: {}", err(&o));
        assert_eq!(text(&o), want, "--model {name}");
    }
    let mut n = GREEDY.to_vec();
    n.extend_from_slice(&["--model", "llama3.2"]);
    let o = ask(&boot, asker.path(), &n, PROMPT);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(
        err(&o).contains("the model `llama3.2` is not served in this swarm"),
        "{}",
        err(&o)
    );

    // f16 on the wire: still a sensible answer.
    let mut h = GREEDY.to_vec();
    h.extend_from_slice(&["--wire", "f16"]);
    let o = ask(&boot, asker.path(), &h, PROMPT);
    assert!(o.status.success(), "{}", err(&o));
    assert!(text(&o).contains("Paris"), "f16: {}", text(&o));

    // The chat template path answers the question.
    let o = ask(
        &boot,
        asker.path(),
        &["--temperature", "0", "--max-tokens", "24"],
        "What is the capital of France?",
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(text(&o).contains("Paris"), "chat answer: {}", text(&o));

    // Seeded sampling is reproducible run to run (and matches `run`).
    let sampled = [
        "--raw",
        "--temperature",
        "0.9",
        "--seed",
        "42",
        "--max-tokens",
        "24",
    ];
    let a = ask(&boot, asker.path(), &sampled, PROMPT);
    let b = ask(&boot, asker.path(), &sampled, PROMPT);
    assert!(a.status.success() && b.status.success(), "{}", err(&a));
    assert_eq!(text(&a), text(&b));
    assert_eq!(text(&a), reference(model, &sampled, PROMPT));

    // A conversation (--chat): a turn a line on stdin, each answered with
    // the conversation so far. The first answer is the one-shot chat
    // answer; the second turn's prompt holds the first turn and its answer
    // (more tokens than both together, the template's markers included); a
    // turn too long for the context is reported and left out, and the
    // conversation goes on. Both runs start with the same system message
    // (--system).
    let terse = [
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--system",
        "You are terse.",
    ];
    let one_shot = ask(
        &boot,
        asker.path(),
        &terse,
        "What is the capital of France?",
    );
    assert!(one_shot.status.success(), "{}", err(&one_shot));
    // `-` takes the prompt from standard input, to its end.
    let mut dash = terse.to_vec();
    dash.push("-");
    let piped = node_ask_with_input(&boot, asker.path(), &dash, "What is the capital of France?");
    assert!(piped.status.success(), "{}", err(&piped));
    assert_eq!(text(&piped), text(&one_shot), "the prompt from stdin");
    let turns = format!(
        "What is the capital of France?\n{}\nAnd what is the capital of Italy?\n",
        "word ".repeat(700)
    );
    let mut chat = terse.to_vec();
    chat.push("--chat");
    let o = node_ask_with_input(&boot, asker.path(), &chat, &turns);
    let (out, e) = (text(&o), err(&o));
    assert_eq!(o.status.code(), Some(1), "one turn failed: {e}");
    assert!(e.contains("longer than the context"), "{e}");
    assert!(e.contains("1 turn(s) of the conversation failed"), "{e}");
    assert!(
        out.starts_with(&text(&one_shot)),
        "first answer {out:?}, one-shot {:?}",
        text(&one_shot)
    );
    let stats: Vec<&str> = e.lines().filter(|l| l.starts_with("stats:")).collect();
    assert_eq!(stats.len(), 2, "{e}");
    let tokens = |l: &str, key: &str| {
        l.split(key)
            .next()
            .and_then(|h| h.split_whitespace().last())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no `{key}` count in {l:?}"))
    };
    let (p1, p2) = (
        tokens(stats[0], " tokens, prefill"),
        tokens(stats[1], " tokens, prefill"),
    );
    let a1 = tokens(
        stats[0].split('|').nth(1).unwrap_or_default(),
        " tokens, decode",
    );
    assert!(
        p2 > p1 + a1,
        "second prompt {p2} tokens, first {p1} + answer {a1}"
    );
    assert!(out.lines().count() >= 2, "{out:?}");

    // A prompt longer than the hops' context: a clear error.
    let long = "word ".repeat(700);
    let o = ask(&boot, asker.path(), GREEDY, &long);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("longer than the context"), "{}", err(&o));
    assert!(!err(&o).contains("panicked"));
}

/// One node with the whole model: its session feeds itself (the ring
/// without a stream), the asker sends the prompt and reads; the text is
/// the whole model's, as with `--no-ring`.
#[test]
fn a_one_hop_chain_feeds_itself() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = Proc::join(dir.path(), &join_args(model, "0..30", None, &[]));
    let boot = node.addr().to_string();
    let want = reference(model, GREEDY, PROMPT);
    let asker = tempfile::tempdir().unwrap();
    for (extra, rang) in [(&[][..], 31), (&["--no-ring"][..], 0)] {
        let mut args = GREEDY.to_vec();
        args.push("--json");
        args.extend_from_slice(extra);
        let o = ask(&boot, asker.path(), &args, PROMPT);
        assert!(o.status.success(), "{extra:?}: {}", err(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(
            format!("{}\n", v["text"].as_str().unwrap()),
            want,
            "{extra:?}"
        );
        assert_eq!(v["chain"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            v["timings"]["ring_steps"], rang,
            "{extra:?}: {}",
            v["timings"]
        );
    }
}

#[test]
fn eight_concurrent_asks_each_match_their_reference() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = three_nodes(model, &dirs);
    let boot = nodes[0].addr().to_string();
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "The best way to learn a language is",
        "def add(a, b):",
        "Water boils at",
        "My favourite colour is",
        "In 1492, Columbus",
        "The three primary colours are",
    ];
    let refs: Vec<String> = prompts
        .iter()
        .map(|p| {
            reference(
                model,
                &["--raw", "--temperature", "0", "--max-tokens", "16"],
                p,
            )
        })
        .collect();
    let asker = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (boot, p, d) = (boot.clone(), p.to_string(), asker.path().to_path_buf());
            std::thread::spawn(move || {
                ask(
                    &boot,
                    &d,
                    &["--raw", "--temperature", "0", "--max-tokens", "16"],
                    &p,
                )
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let o = h.join().unwrap();
        assert!(o.status.success(), "ask {i} failed: {}", err(&o));
        assert_eq!(text(&o), refs[i], "ask {i} ({:?}) differs", prompts[i]);
    }
    eprintln!("8 concurrent asks done in {:?}", t0.elapsed());
}

#[test]
fn chain_prefers_the_faster_replica_and_survives_a_dead_hop() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Proc::join(dirs[0].path(), &join_args(model, "0..15", None, &[]));
    let first = a.addr().to_string();
    let slow = Proc::join(
        dirs[1].path(),
        &join_args(
            model,
            "15..30",
            Some(&first),
            &["--test-link-delay-ms", "40"],
        ),
    );
    let mut fast = Proc::join(
        dirs[2].path(),
        &join_args(model, "15..30", Some(&first), &[]),
    );
    let covered = wait_for(Duration::from_secs(15), || {
        status_json(&first).filter(|v| holders(v, 20).len() == 2)
    });
    assert!(covered.is_some(), "both replicas never showed up");
    let asker = tempfile::tempdir().unwrap();
    let want = reference(model, GREEDY, PROMPT);
    for _ in 0..2 {
        let o = ask(&first, asker.path(), GREEDY, PROMPT);
        assert!(o.status.success(), "{}", err(&o));
        let e = err(&o);
        let chain = e
            .lines()
            .find(|l| l.starts_with("chain:"))
            .unwrap()
            .to_string();
        assert!(
            chain.contains(&fast.peer_id()),
            "did not pick the fast replica: {chain}"
        );
        assert!(!chain.contains(&slow.peer_id()), "{chain}");
        assert_eq!(text(&o), want);
    }

    // The fast replica dies (its records are still fresh): the ask goes
    // through the other one, within seconds.
    fast.kill();
    let t0 = Instant::now();
    let o = ask(&first, asker.path(), GREEDY, PROMPT);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(text(&o), want);
    assert!(err(&o).contains(&slow.peer_id()), "{}", err(&o));
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
    drop(slow);
}

#[test]
fn uncovered_blocks_and_dead_hops_are_clear_errors() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Proc::join(dirs[0].path(), &join_args(model, "0..10", None, &[]));
    let first = a.addr().to_string();
    let mut c = Proc::join(
        dirs[1].path(),
        &join_args(model, "20..30", Some(&first), &[]),
    );
    wait_for(Duration::from_secs(15), || {
        status_json(&first).filter(|v| covered_blocks(v).len() == 20)
    })
    .expect("two ranges announced");
    let asker = tempfile::tempdir().unwrap();
    let o = ask(&first, asker.path(), GREEDY, PROMPT);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(
        err(&o).contains("10..20"),
        "missing blocks not named: {}",
        err(&o)
    );

    // A hop that is gone before the ask (records still fresh): a clear
    // error within seconds, never a hang.
    let db = tempfile::tempdir().unwrap();
    let _b = Proc::join(db.path(), &join_args(model, "10..20", Some(&first), &[]));
    wait_for(Duration::from_secs(15), || {
        status_json(&first).filter(|v| covered_blocks(v).len() == 30)
    })
    .expect("covered");
    c.kill();
    let t0 = Instant::now();
    let o = ask(&first, asker.path(), GREEDY, PROMPT);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
    let e = err(&o);
    assert!(
        e.contains("20..30") || e.contains(&c.peer_id()),
        "unclear error: {e}"
    );
    assert!(!e.contains("panicked"));
}
