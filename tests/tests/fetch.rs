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
    let info = model_info();
    let id = info["id"].as_str().unwrap().to_string();
    let block = info["block_bytes"][10].as_u64().unwrap();
    // Room for ten blocks (and the tiny global tensors), not eleven.
    let ten = (block * 10 + block / 2).to_string();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();

    let mut a = base(None);
    a.extend_from_slice(&["--model", model, "--layers", "0..10"]);
    let seeder = Proc::join(dirs[0].path(), &a);
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
