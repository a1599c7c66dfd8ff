//! The `nakshatra` binary as a user runs it: `model inspect`, `slice` and
//! `run`, good input and bad.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn nakshatra(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nakshatra"))
        .args(args)
        .env("NAKSHATRA_DATA_DIR", data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("spawn nakshatra")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless the command failed cleanly with `needle` in its message.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "expected {needle:?} in stderr: {err}"
    );
}

#[test]
fn inspect_json_has_the_keys() {
    let d = tempfile::tempdir().unwrap();
    let m = model();
    let o = nakshatra(
        d.path(),
        &["model", "inspect", m.to_str().unwrap(), "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["arch"], "llama");
    assert_eq!(v["n_layers"], 30);
    assert_eq!(v["n_embd"], 576);
    assert_eq!(v["n_vocab"], 49152);
    assert_eq!(v["id"].as_str().map(str::len), Some(64));
    assert_eq!(v["block_bytes"].as_array().map(Vec::len), Some(30));
    let human = nakshatra(d.path(), &["model", "inspect", m.to_str().unwrap()]);
    assert!(stdout(&human).contains(v["id"].as_str().unwrap()));
}

#[test]
fn slice_writes_a_loadable_slice() {
    let d = tempfile::tempdir().unwrap();
    let m = model();
    let out = d.path().join("s.gguf");
    let o = nakshatra(
        d.path(),
        &[
            "slice",
            m.to_str().unwrap(),
            "--layers",
            "0..10",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists());
    assert!(d.path().join("s.gguf.embd.gguf").exists());
    let o = nakshatra(
        d.path(),
        &["model", "inspect", out.to_str().unwrap(), "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["n_layers"], 10);
    assert_eq!(v["slice"]["start"], 0);
    assert_eq!(v["slice"]["end"], 10);
}

#[test]
fn slice_bad_input_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let m = model();
    let m = m.to_str().unwrap();
    let out = d.path().join("s.gguf");
    let out = out.to_str().unwrap();
    // A range past the model's layers.
    assert_clean_error(
        &nakshatra(d.path(), &["slice", m, "--layers", "20..40", "-o", out]),
        "30 layers",
    );
    // An empty range (refused by the CLI's parser before any work).
    let o = nakshatra(d.path(), &["slice", m, "--layers", "5..5", "-o", out]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("empty layer range"), "{}", stderr(&o));
    // Not a GGUF.
    let junk = d.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model, just some text").unwrap();
    assert_clean_error(
        &nakshatra(
            d.path(),
            &[
                "slice",
                junk.to_str().unwrap(),
                "--layers",
                "0..1",
                "-o",
                out,
            ],
        ),
        "gguf",
    );
    // A truncated GGUF, cut in several places.
    let bytes = std::fs::read(m).unwrap();
    for cut in [3usize, 100, 5_000, 2_000_000, bytes.len() - 1] {
        let t = d.path().join(format!("trunc-{cut}.gguf"));
        std::fs::write(&t, &bytes[..cut]).unwrap();
        let o = nakshatra(
            d.path(),
            &["slice", t.to_str().unwrap(), "--layers", "0..10", "-o", out],
        );
        assert!(!o.status.success(), "cut at {cut} accepted");
        assert!(
            !stderr(&o).contains("panicked"),
            "cut at {cut}: {}",
            stderr(&o)
        );
        let o = nakshatra(d.path(), &["model", "inspect", t.to_str().unwrap()]);
        assert!(!o.status.success(), "inspect of cut at {cut} accepted");
        assert!(
            !stderr(&o).contains("panicked"),
            "cut at {cut}: {}",
            stderr(&o)
        );
    }
    assert!(
        !Path::new(out).exists(),
        "a failed slice left a file behind"
    );
    // An architecture the slicer cannot split exactly.
    let mut other = bytes.clone();
    let pos = other
        .windows(5)
        .position(|w| w == b"llama")
        .expect("arch string");
    other[pos..pos + 5].copy_from_slice(b"mamba");
    let o_path = d.path().join("mamba.gguf");
    std::fs::write(&o_path, &other).unwrap();
    assert_clean_error(
        &nakshatra(
            d.path(),
            &[
                "slice",
                o_path.to_str().unwrap(),
                "--layers",
                "0..10",
                "-o",
                out,
            ],
        ),
        "mamba",
    );
}

fn run_args<'a>(m: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "run",
        "--model",
        m,
        "--raw",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--threads",
        "2",
    ];
    v.extend_from_slice(extra);
    v.push("The capital of France is");
    v
}

#[test]
fn run_split_prints_the_same_text_as_whole() {
    let _g = heavy();
    let d = tempfile::tempdir().unwrap();
    let m = model();
    let m = m.to_str().unwrap();
    let whole = nakshatra(d.path(), &run_args(m, &[]));
    assert!(whole.status.success(), "{}", stderr(&whole));
    let text = stdout(&whole);
    assert!(text.contains("Paris"), "whole model said {text:?}");
    assert!(stderr(&whole).contains("stats:"), "{}", stderr(&whole));
    for split in ["15", "10,20", "6,12,18,24"] {
        let o = nakshatra(d.path(), &run_args(m, &["--split", split]));
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o), text, "split {split}");
    }
    // The second time the cached slices are verified and reused.
    let o = nakshatra(d.path(), &run_args(m, &["--split", "10,20"]));
    assert_eq!(stdout(&o), text);
    assert!(d.path().join("slices").exists());
}

#[test]
fn run_chat_template_answers() {
    let _g = heavy();
    let d = tempfile::tempdir().unwrap();
    let m = model();
    let o = nakshatra(
        d.path(),
        &[
            "run",
            "--model",
            m.to_str().unwrap(),
            "--split",
            "10,20",
            "--temperature",
            "0",
            "--max-tokens",
            "32",
            "--threads",
            "2",
            "What is the capital of France?",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "answer: {}", stdout(&o));
}

#[test]
fn run_seeded_sampling_is_reproducible() {
    let _g = heavy();
    let d = tempfile::tempdir().unwrap();
    let m = model();
    let m = m.to_str().unwrap();
    let args = |seed: &'static str| {
        let mut v = run_args(m, &["--split", "15", "--seed", seed]);
        let t = v.iter().position(|a| *a == "--temperature").unwrap();
        v[t + 1] = "0.9";
        v
    };
    let a = nakshatra(d.path(), &args("7"));
    let b = nakshatra(d.path(), &args("7"));
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
    let c = nakshatra(d.path(), &args("8"));
    let e = nakshatra(d.path(), &args("9"));
    assert!(
        stdout(&c) != stdout(&a) || stdout(&e) != stdout(&a),
        "three seeds gave the same sample"
    );
}

#[test]
fn run_bad_input_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let m = model();
    let m = m.to_str().unwrap();
    assert_clean_error(
        &nakshatra(d.path(), &run_args(m, &["--split", "10,40"])),
        "split points",
    );
    assert_clean_error(
        &nakshatra(d.path(), &run_args(m, &["--split", "0"])),
        "split points",
    );
    let long = "word ".repeat(400);
    let mut args = run_args(m, &["--ctx-size", "256"]);
    *args.last_mut().unwrap() = &long;
    assert_clean_error(&nakshatra(d.path(), &args), "longer than the context");
    assert_clean_error(
        &nakshatra(d.path(), &run_args("/nonexistent/model.gguf", &[])),
        "/nonexistent/model.gguf",
    );
}

/// `--device` and `--gpu-layers`: `node devices` names what llama.cpp
/// sees (the CPU at least, with the features this build uses); choosing
/// the CPU by name (any case) with no layer offloaded gives the default's
/// text; an unknown device is refused before anything loads or joins,
/// naming the devices there are; a bad layer count is a usage error.
#[test]
fn devices_are_listed_and_chosen_by_name() {
    let _g = heavy();
    let d = tempfile::tempdir().unwrap();
    let m = model();
    let m = m.to_str().unwrap();

    let o = nakshatra(d.path(), &["node", "devices", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let devices: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("a JSON array");
    let cpu = devices
        .as_array()
        .expect("a JSON array")
        .iter()
        .find(|d| d["backend"] == "CPU")
        .unwrap_or_else(|| panic!("no CPU device: {devices}"));
    let cpu_name = cpu["name"].as_str().expect("a name").to_string();
    assert!(
        cpu["features"].as_array().is_some_and(|f| !f.is_empty()),
        "the CPU's features are missing: {cpu}"
    );
    let o = nakshatra(d.path(), &["node", "devices"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with(&format!("{cpu_name}\tCPU\t"))),
        "{}",
        stdout(&o)
    );

    let default = nakshatra(d.path(), &run_args(m, &["--split", "10,20"]));
    assert!(default.status.success(), "{}", stderr(&default));
    let lower = cpu_name.to_lowercase();
    let on_cpu = nakshatra(
        d.path(),
        &run_args(
            m,
            &["--split", "10,20", "--device", &lower, "--gpu-layers", "0"],
        ),
    );
    assert!(on_cpu.status.success(), "{}", stderr(&on_cpu));
    assert_eq!(stdout(&on_cpu), stdout(&default));

    let bad = nakshatra(d.path(), &run_args(m, &["--device", "NoSuchGpu7"]));
    assert_clean_error(&bad, "no device named \"NoSuchGpu7\"");
    assert!(stderr(&bad).contains(&cpu_name), "{}", stderr(&bad));
    let join = nakshatra(
        d.path(),
        &[
            "node",
            "join",
            "--model",
            m,
            "--layers",
            "0..10",
            "--device",
            "NoSuchGpu7",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
    );
    assert_clean_error(&join, "no device named \"NoSuchGpu7\"");

    let o = nakshatra(d.path(), &run_args(m, &["--gpu-layers", "many"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("expected a layer count or `all`"),
        "{}",
        stderr(&o)
    );
}
