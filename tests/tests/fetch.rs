//! Slices travel between peers: nodes started with only a model id fetch
//! the layers they serve from peers, verified against the signed manifest;
//! `--layers auto` fills the swarm.

use std::path::Path;
use std::time::{Duration, Instant};

use nakshatra_e2e::*;

const PROMPT: &str = "The capital of France is";
const GREEDY: &[&str] = &["--raw", "--temperature", "0", "--max-tokens", "32"];

fn base(bootstrap: Option<&str>) -> Vec<&str> {
    let mut v = loopback_args(bootstrap);
    v.extend_from_slice(&["--max-sessions", "4", "--ctx-size", "512"]);
    v.extend_from_slice(&["--record-ttl", "8", "--refresh", "2"]);
    v
}

fn model_info() -> serde_json::Value {
    let m = test_model();
    let o = nakshatra(&["model", "inspect", m.to_str().unwrap(), "--json"]);
    assert!(o.status.success());
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The test model's id, and a `--max-memory` with room for ten blocks
/// (and the tiny global tensors), not eleven.
fn id_and_ten_blocks() -> (String, String) {
    let info = model_info();
    let id = info["id"].as_str().unwrap().to_string();
    let block = info["block_bytes"][10].as_u64().unwrap();
    (id, (block * 10 + block / 2).to_string())
}

/// A seeder with the model file serving 0..10 (and every piece of it).
fn seeder(model: &str, dir: &Path) -> Proc {
    let mut a = base(None);
    a.extend_from_slice(&["--model", model, "--layers", "0..10"]);
    Proc::join(dir, &a)
}

fn reference(model: &str) -> String {
    run_reference(model, GREEDY, PROMPT)
}

fn ask(boot: &str, dir: &Path) -> std::process::Output {
    node_ask(boot, dir, GREEDY, PROMPT)
}

fn files_named(dir: &Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_named(&p, suffix));
        } else if p.to_string_lossy().ends_with(suffix) {
            out.push(p);
        }
    }
    out
}

/// A seeder with the model file holding 0..10, and two nodes with only the
/// model id and `--layers auto`: the swarm covers all 30 layers and `node
/// ask` through it gives exactly the whole model's greedy text.
#[test]
fn auto_nodes_fetch_and_fill_the_swarm() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let (id, ten) = id_and_ten_blocks();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();

    let seeder = seeder(model, dirs[0].path());
    let boot = seeder.addr().to_string();

    let mut b = base(Some(&boot));
    b.extend_from_slice(&["--model-id", &id, "--layers", "auto", "--max-memory", &ten]);
    let nb = Proc::join(dirs[1].path(), &b);
    let chose = |p: &Proc, r: &str| {
        wait_for(Duration::from_secs(5), || {
            p.stderr().contains(r).then_some(())
        })
        .is_some()
    };
    assert!(chose(&nb, "chose 10..20"), "{}", nb.stderr());
    let mut c = base(Some(&boot));
    c.extend_from_slice(&["--model-id", &id, "--layers", "auto", "--max-memory", "1GB"]);
    let nc = Proc::join(dirs[2].path(), &c);
    assert!(chose(&nc, "chose 20..30"), "{}", nc.stderr());
    // No model file anywhere near them: everything came from peers.
    for d in [&dirs[1], &dirs[2]] {
        assert!(!files_named(d.path(), ".gguf").is_empty());
    }
    let full = wait_for(Duration::from_secs(15), || {
        status_json(&boot).filter(|v| covered_blocks(v).len() == 30)
    });
    assert!(full.is_some(), "not covered: {:?}", status_json(&boot));
    let o = ask(&boot, dirs[3].path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), reference(model));
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        e.contains(&nb.peer_id()) && e.contains(&nc.peer_id()),
        "{e}"
    );

    // Restarted, a fetching node reuses its verified cache: nothing fetched.
    drop(nc);
    let nc = Proc::join(dirs[2].path(), &c);
    assert!(
        chose(&nc, "reusing verified cached slice"),
        "{}",
        nc.stderr()
    );
}

/// Rebalancing in `node join`: a `--layers auto` node moves to blocks
/// that lost their only holder (Petals' rule, three checks in a row),
/// fetching them from a peer, and the swarm answers exactly again.
#[test]
fn an_auto_node_moves_to_cover_a_gap() {
    auto_node_moves(false);
}

/// The same with the model file: the new slice is cut from it.
#[test]
fn an_auto_node_with_the_file_moves_to_cover_a_gap() {
    auto_node_moves(true);
}

/// A seeder (0..10, the file), fixed nodes on 10..20 and 20..30, and an
/// auto node with room for ten blocks (the file too when `with_file`,
/// else only the model id); the fixed node sharing fewest blocks with it
/// crashes, and it must move.
fn auto_node_moves(with_file: bool) {
    let model = test_model();
    let model = model.to_str().unwrap();
    let (id, ten) = id_and_ten_blocks();
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();

    let seeder = seeder(model, dirs[0].path());
    let boot = seeder.addr().to_string();
    let fixed = |range: &str, dir: &Path| {
        let mut args = base(Some(&boot));
        args.extend_from_slice(&["--model-id", &id, "--layers", range]);
        Proc::join(dir, &args)
    };
    let mut b = fixed("10..20", dirs[1].path());
    let mut d = fixed("20..30", dirs[2].path());
    let mut c = base(Some(&boot));
    if with_file {
        c.extend_from_slice(&["--model", model]);
    } else {
        c.extend_from_slice(&["--model-id", &id]);
    }
    c.extend_from_slice(&["--layers", "auto", "--max-memory", &ten]);
    c.extend_from_slice(&["--rebalance-period", "1", "--min-dwell", "0"]);
    let nc = Proc::join(dirs[3].path(), &c);
    // Its range: the one it chose, or the last it moved to (it may move
    // before any crash if the measured speeds are far apart).
    let range_in = |line: &str, key: &str| -> Option<(u32, u32)> {
        let r = line.split(key).nth(1)?.split_whitespace().next()?;
        let (s, t) = r.split_once("..")?;
        Some((s.parse().ok()?, t.parse().ok()?))
    };
    let moves = |e: &str| e.lines().filter(|l| l.contains("moved to layers")).count();
    wait_for(Duration::from_secs(10), || {
        nc.stderr().contains("--layers auto chose").then_some(())
    })
    .unwrap_or_else(|| panic!("no range chosen: {}", nc.stderr()));
    std::thread::sleep(Duration::from_secs(3));
    let e = nc.stderr();
    let before = moves(&e);
    let current = e
        .lines()
        .rev()
        .find_map(|l| range_in(l, "moved to layers ").or_else(|| range_in(l, "chose ")))
        .unwrap_or_else(|| panic!("no range: {e}"));

    // Crash the fixed node that shares the fewest blocks with the auto
    // node: some of its blocks are held by nobody now.
    let overlap = |lo: u32, hi: u32| hi.min(current.1).saturating_sub(lo.max(current.0));
    let gap = if overlap(10, 20) <= overlap(20, 30) {
        b.kill();
        10..20
    } else {
        d.kill();
        20..30
    };
    let moved = wait_for(Duration::from_secs(60), || {
        let e = nc.stderr();
        (moves(&e) > before).then(|| {
            e.lines()
                .rev()
                .find(|l| l.contains("moved to layers"))
                .unwrap_or_default()
                .to_string()
        })
    })
    .unwrap_or_else(|| panic!("no move after losing {gap:?}: {}", nc.stderr()));
    let full = wait_for(Duration::from_secs(20), || {
        status_json(&boot).filter(|v| covered_blocks(v).len() == 30)
    });
    assert!(
        full.is_some(),
        "{moved}; not covered: {:?}",
        status_json(&boot)
    );
    let o = ask(&boot, dirs[4].path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), reference(model));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&nc.peer_id()),
        "the chain does not go through the node that moved"
    );
    // With the file, nothing comes from peers: the slices are cut from it.
    if with_file {
        assert!(!nc.stderr().contains("fetched "), "{}", nc.stderr());
    }
}

/// A peer serving corrupt bytes is caught by verification; the piece comes
/// from another peer; the bad peer is not asked again.
#[test]
fn corrupt_pieces_are_caught_and_refetched_elsewhere() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let id = model_info()["id"].as_str().unwrap().to_string();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut a = base(None);
    a.extend_from_slice(&[
        "--model",
        model,
        "--layers",
        "0..15",
        "--fault",
        "corrupt-pieces",
    ]);
    let bad = Proc::join(dirs[0].path(), &a);
    let boot = bad.addr().to_string();
    let mut b = base(Some(&boot));
    b.extend_from_slice(&["--model", model, "--layers", "15..30"]);
    let good = Proc::join(dirs[1].path(), &b);
    let mut c = base(Some(&boot));
    c.extend_from_slice(&["--model-id", &id, "--layers", "0..15"]);
    let fetcher = Proc::join(dirs[2].path(), &c);
    // stderr is read by another thread: wait for the fetch summary.
    let log = wait_for(Duration::from_secs(10), || {
        let l = fetcher.stderr();
        l.contains("corrupt piece(s) refetched").then_some(l)
    })
    .unwrap_or_else(|| fetcher.stderr());
    assert!(
        log.contains("failed verification"),
        "corruption not caught: {log}"
    );
    assert!(log.contains(&bad.peer_id()), "{log}");
    // Every piece ended up verified, the slice serves, the bad peer was
    // dropped after its first bad piece.
    assert!(log.contains("serving") || !fetcher.addrs.is_empty());
    // The fetcher has two streams to each peer, each with requests for up
    // to two pieces on their way, so at most four pieces from the bad peer
    // can complete (and fail) around the first verdict; after it the peer
    // gets no more requests. (A fetcher that kept asking would fail about
    // half of the 32 pieces.)
    let caught = log
        .lines()
        .filter(|l| l.contains("failed verification"))
        .count();
    assert!((1..=4).contains(&caught), "bad peer asked again: {log}");
    assert!(log.contains("corrupt piece(s) refetched"), "{log}");
    let _ = good;
}

/// Killed mid-fetch and restarted, a node resumes: pieces it verified are
/// not fetched again. While fetching (not on a terminal) it logs progress.
#[test]
fn a_killed_fetch_resumes() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let id = model_info()["id"].as_str().unwrap().to_string();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut a = base(None);
    // A slow seeder (each chunk delayed) so the fetch takes a few seconds.
    a.extend_from_slice(&[
        "--model",
        model,
        "--layers",
        "0..30",
        "--test-link-delay-ms",
        "400",
    ]);
    let seeder = Proc::join(dirs[0].path(), &a);
    let boot = seeder.addr().to_string();
    let mut c = base(Some(&boot));
    c.extend_from_slice(&["--model-id", &id, "--layers", "0..30"]);
    let mut first = Proc::spawn(&[], dirs[1].path(), &{
        let mut v = vec!["node", "join"];
        v.extend_from_slice(&c);
        v
    });
    let pieces = dirs[1].path().join("models").join(&id).join("pieces");
    let some = wait_for(Duration::from_secs(30), || {
        (files_named(&pieces, ".bin").len() >= 3).then_some(())
    });
    assert!(some.is_some(), "fetch never progressed: {}", first.stderr());
    // Not on a terminal: no progress bar, a log line every 2 s instead.
    let progress = wait_for(Duration::from_secs(10), || {
        let l = first.stderr();
        l.lines()
            .find(|l| l.contains("fetched ") && l.contains(" MB (") && l.contains(" pieces)"))
            .map(str::to_string)
    });
    assert!(
        progress.is_some(),
        "no progress line while fetching: {}",
        first.stderr()
    );
    first.kill();
    let verified_before = files_named(&pieces, ".bin").len();
    assert!(verified_before < 32, "fetch finished before the kill");
    let t0 = Instant::now();
    let second = Proc::join(dirs[1].path(), &c);
    let log = wait_for(Duration::from_secs(10), || {
        let l = second.stderr();
        l.contains("already verified on disk").then_some(l)
    })
    .unwrap_or_else(|| second.stderr());
    let line = log
        .lines()
        .find(|l| l.contains("already verified on disk"))
        .unwrap_or_else(|| panic!("no fetch summary: {log}"));
    let reused: f64 = line
        .split(", ")
        .find(|p| p.contains("already verified"))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    assert!(reused > 0.0, "nothing reused: {line}");
    eprintln!("resumed after the kill in {:?}: {line}", t0.elapsed());
}

/// Bad input: an unknown model id, an unwritable slice cache.
#[test]
fn bad_fetch_input() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut a = base(None);
    a.extend_from_slice(&["--model", model, "--layers", "0..30"]);
    let seeder = Proc::join(dirs[0].path(), &a);
    let boot = seeder.addr().to_string();

    let unknown = "ab".repeat(32);
    let d = dirs[1].path().to_str().unwrap();
    let mut args = vec!["--data-dir", d, "node", "join"];
    let b = base(Some(&boot));
    args.extend_from_slice(&b);
    args.extend_from_slice(&["--model-id", &unknown, "--layers", "auto"]);
    let o = nakshatra(&args);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("no peer serves model"), "{e}");
    assert!(!e.contains("panicked"));

    // `slices` is a file: the slice cache cannot be written.
    let id = model_info()["id"].as_str().unwrap().to_string();
    std::fs::write(dirs[2].path().join("slices"), b"in the way").unwrap();
    let d = dirs[2].path().to_str().unwrap();
    let mut args = vec!["--data-dir", d, "node", "join"];
    args.extend_from_slice(&b);
    args.extend_from_slice(&["--model-id", &id, "--layers", "10..20"]);
    let o = nakshatra(&args);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{e}");
    eprintln!("unwritable cache: {e}");
    assert!(e.contains("slices"), "unclear error: {e}");
    assert!(
        files_named(dirs[2].path(), "10-20.gguf").is_empty(),
        "a slice was left"
    );
    let tmp: Vec<_> = files_named(dirs[2].path(), "")
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".tmp"))
        })
        .collect();
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
}

/// A disk that fills up: once while pieces arrive, once while the slice is
/// written from them. Both give a clear error (exit 1, "No space left on
/// device" and the file), and neither leaves a slice under its final name,
/// a temporary file or a half-received piece. Needs a small tmpfs (root);
/// skips, saying why, only where it cannot mount one.
#[test]
fn a_full_disk_is_a_clear_error() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let id = model_info()["id"].as_str().unwrap().to_string();
    let sd = tempfile::tempdir().unwrap();
    let mut a = base(None);
    a.extend_from_slice(&["--model", model, "--layers", "0..30"]);
    let seeder = Proc::join(sd.path(), &a);
    let boot = seeder.addr().to_string();
    // 10..20: about 24 MB of identity, manifest, vocabulary and pieces,
    // then a 22.2 MB slice. 12 MiB fills up during the pieces, 32 MiB
    // while writing the slice.
    for (mib, stage) in [(12, "pieces"), (32, "slice")] {
        let disk = match Tmpfs::new(mib) {
            Ok(d) => d,
            Err(why) => {
                eprintln!(
                    "SKIPPED a_full_disk_is_a_clear_error: cannot mount a small tmpfs: {why}"
                );
                return;
            }
        };
        let d = disk.path().to_str().unwrap();
        let mut args = vec!["--data-dir", d, "node", "join"];
        let b = base(Some(&boot));
        args.extend_from_slice(&b);
        args.extend_from_slice(&["--model-id", &id, "--layers", "10..20"]);
        let o = nakshatra(&args);
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        eprintln!("disk full during the {stage}: {e}");
        assert_eq!(o.status.code(), Some(1), "{stage}: {e}");
        assert!(
            e.contains("No space left on device"),
            "{stage}: unclear error: {e}"
        );
        assert!(!e.contains("panicked"), "{e}");
        if stage == "slice" {
            assert!(e.contains("writing the slice"), "{e}");
            // The verified pieces stay for the next try.
            assert!(!files_named(disk.path(), ".bin").is_empty());
        } else {
            assert!(e.contains(".part"), "the error should name the file: {e}");
        }
        assert!(
            files_named(disk.path(), "10-20.gguf").is_empty(),
            "{stage}: a slice was left under its final name"
        );
        let leftovers: Vec<_> = files_named(disk.path(), "")
            .into_iter()
            .filter(|p| {
                let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
                n.is_some_and(|n| n.contains(".tmp") || n.ends_with(".part"))
            })
            .collect();
        assert!(leftovers.is_empty(), "{stage}: files left: {leftovers:?}");
    }
}

/// The joiner's fetch summary line, and its seconds.
fn fetch_summary(log: &str) -> Option<(String, f64)> {
    let line = log
        .lines()
        .find(|l| l.contains("fetched ") && l.contains(" MB in "))?;
    let secs = line
        .split(" MB in ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((line.to_string(), secs))
}

/// Sybil providers: besides one honest seeder, four nodes announce the
/// model but never answer a manifest or piece request, and two serve
/// pieces at 40 KiB/s (a 2 MiB chunk takes 51 s, under the 60 s read
/// timeout). A joiner fetching the whole model (32 pieces) from all seven
/// finishes in seconds, every piece verified, no `.part` or race file
/// left: the pieces the stalled and trickling peers took are raced on the
/// honest one, mid-fetch once those peers are found stalled or crawling
/// (named in the joiner's log), and at the end; manifest requests go out
/// side by side. Tried one by one, the four silent peers alone would cost
/// 4 × 30 s of manifest timeouts, and every piece they took 60 s or more.
#[test]
fn stalling_and_trickling_providers_do_not_hold_up_a_fetch() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let id = model_info()["id"].as_str().unwrap().to_string();
    let dirs: Vec<_> = (0..8).map(|_| tempfile::tempdir().unwrap()).collect();
    // The honest seeder is slow (400 ms per chunk: about 10 MB/s), so that
    // the fetch lasts past the stall detection's 5 s.
    let mut a = base(None);
    a.extend_from_slice(&[
        "--model",
        model,
        "--layers",
        "0..10",
        "--test-link-delay-ms",
        "400",
    ]);
    let honest = Proc::join(dirs[0].path(), &a);
    let boot = honest.addr().to_string();
    let mut sybils = Vec::new();
    for (i, fault) in [
        "stall",
        "stall",
        "stall",
        "stall",
        "trickle-pieces",
        "trickle-pieces",
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = base(Some(&boot));
        // A one-layer slice is quick to load; pieces are served from the
        // whole model file, so each of them announces and serves them all.
        s.extend_from_slice(&["--model", model, "--layers", "29..30", "--fault", fault]);
        sybils.push(Proc::join(dirs[1 + i].path(), &s));
    }
    // Every Sybil is a provider of the model before the joiner looks.
    let all = wait_for(Duration::from_secs(15), || {
        status_json(&boot).filter(|v| v["models"][0]["peers"].as_array().map_or(0, Vec::len) == 7)
    });
    assert!(
        all.is_some(),
        "not every node announced: {:?}",
        status_json(&boot)
    );

    let mut c = base(Some(&boot));
    c.extend_from_slice(&["--model-id", &id, "--layers", "0..30"]);
    let t0 = Instant::now();
    let joiner = Proc::spawn(&[], dirs[7].path(), &{
        let mut v = vec!["node", "join"];
        v.extend_from_slice(&c);
        v
    });
    let summary = wait_for(Duration::from_secs(150), || fetch_summary(&joiner.stderr()));
    let took = t0.elapsed();
    let log = joiner.stderr();
    let (line, secs) = summary.unwrap_or_else(|| panic!("no fetch summary: {log}"));
    eprintln!(
        "fetched with 4 stalling and 2 trickling providers: fetch {secs:.2} s, {:.1} s from \
         start to summary: {line}",
        took.as_secs_f64()
    );
    assert!(line.contains("0 corrupt piece(s)"), "{line}");
    assert!(!log.contains("failed verification"), "{log}");
    // Far below what the stalls would add up to one after another (a
    // single piece read timeout is 60 s), and generous for a loaded host.
    assert!(secs < 40.0, "the fetch took {secs} s: {line}");
    assert!(
        took < Duration::from_secs(60),
        "joining took {took:?}: {log}"
    );
    // Pieces were taken from stalled or crawling Sybils while the fetch
    // went on, and those Sybils are named.
    let raced = log
        .lines()
        .find(|l| l.contains("raced away from stalled or crawling peers"))
        .unwrap_or_else(|| panic!("nothing raced: {log}"));
    eprintln!("{raced}");
    let n: u32 = raced
        .split("INFO ")
        .nth(1)
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(n >= 1, "no piece raced mid-fetch: {raced}");
    assert!(
        sybils.iter().any(|p| raced.contains(&p.peer_id())),
        "no Sybil named: {raced}"
    );
    assert!(!raced.contains(&honest.peer_id()), "{raced}");
    // The joiner serves the slice it fetched, and nothing half-written is
    // left among its pieces.
    let slice = wait_for(Duration::from_secs(30), || {
        (!files_named(dirs[7].path(), "0-30.gguf").is_empty()).then_some(())
    });
    assert!(slice.is_some(), "no slice: {log}");
    let parts = files_named(dirs[7].path(), ".part");
    assert!(parts.is_empty(), "files left: {parts:?}");
}

/// Liars outnumber honest servers: two nodes announce the model as 10
/// layers (holding "all" of them, 0..10), one honest node serves all 30.
/// A vote of announcers would believe the liars; the asker and a joining
/// node take the layer count from the verified manifest instead: `node
/// ask` plans the honest chain and prints the whole model's text, and a
/// `--layers auto` joiner sees every block served (it would otherwise
/// think 10..30 had no holder).
#[test]
fn the_layer_count_comes_from_the_manifest_not_a_vote() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let info = model_info();
    let id = info["id"].as_str().unwrap().to_string();
    let block = info["block_bytes"][10].as_u64().unwrap();
    let ten = (block * 10 + block / 2).to_string();
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut a = base(None);
    a.extend_from_slice(&["--model", model, "--layers", "0..30"]);
    let honest = Proc::join(dirs[0].path(), &a);
    let boot = honest.addr().to_string();
    let mut liars = Vec::new();
    for d in &dirs[1..3] {
        let mut l = base(Some(&boot));
        l.extend_from_slice(&[
            "--model",
            model,
            "--layers",
            "0..10",
            "--fault",
            "lie-layers",
        ]);
        liars.push(Proc::join(d.path(), &l));
    }
    // `swarm status` knows no manifest: it shows the vote, and the vote is
    // the liars'.
    let voted = wait_for(Duration::from_secs(15), || {
        status_json(&boot).filter(|v| v["models"][0]["n_layers"] == 10)
    });
    assert!(
        voted.is_some(),
        "liars not announced: {:?}",
        status_json(&boot)
    );

    let o = ask(&boot, dirs[3].path());
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{e}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), reference(model));
    let chain = e
        .lines()
        .find(|l| l.starts_with("chain:"))
        .unwrap_or_else(|| panic!("no chain line: {e}"));
    assert!(chain.contains(&honest.peer_id()), "{chain}");
    for l in &liars {
        assert!(!chain.contains(&l.peer_id()), "a liar was planned: {chain}");
    }

    let mut j = base(Some(&boot));
    j.extend_from_slice(&["--model-id", &id, "--layers", "auto", "--max-memory", &ten]);
    let joiner = Proc::join(dirs[4].path(), &j);
    let log = joiner.stderr();
    let chose = log
        .lines()
        .find(|l| l.contains("--layers auto chose"))
        .unwrap_or_else(|| panic!("no choice: {log}"));
    assert!(chose.contains("every block is served"), "{chose}");
}
