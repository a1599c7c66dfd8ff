//! README.md's API section, run as written: its `openai` and `ollama`
//! Python snippets (in the test venv, `tests/src/py.rs`) and its `curl`
//! command, against `nakshatra api` on a 3-node loopback swarm. Only the
//! address changes (the README's `127.0.0.1:11435` becomes the test
//! server's free port).

use std::process::Command;
use std::time::Duration;

use nakshatra_e2e::http::ApiProc;
use nakshatra_e2e::*;

/// The address the README's examples use.
const README_ADDR: &str = "http://127.0.0.1:11435";

/// The fenced code blocks of README.md's section `heading`, as (language,
/// text).
fn readme_blocks(heading: &str) -> Vec<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&path).expect("read README.md");
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("README.md has no section {heading:?}"));
    let rest = &text[start + heading.len()..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(l) = lines.next() {
        if let Some(lang) = l.strip_prefix("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            blocks.push((lang.trim().to_string(), body.join("\n")));
        }
    }
    blocks
}

#[test]
fn the_readmes_api_examples_run_as_written() {
    let blocks = readme_blocks("## The swarm from OpenAI and Ollama clients, curl, and a browser");
    let python: Vec<&String> = blocks
        .iter()
        .filter(|(l, _)| l == "python")
        .map(|(_, b)| b)
        .collect();
    let curl: Vec<&String> = blocks
        .iter()
        .filter(|(l, b)| l == "sh" && b.trim_start().starts_with("curl"))
        .map(|(_, b)| b)
        .collect();
    assert_eq!(python.len(), 2, "the README's openai and ollama snippets");
    assert_eq!(curl.len(), 1, "the README's curl command");
    assert!(
        blocks
            .iter()
            .any(|(_, b)| b.contains("nakshatra api --listen")),
        "the README shows `nakshatra api --listen`"
    );
    let py = py::python();

    let model = test_model();
    let model = model.to_str().unwrap_or_default();
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let join = |dir: &tempfile::TempDir, layers: &str, boot: Option<&str>| {
        let mut args = loopback_args(boot);
        args.extend_from_slice(&["--model", model, "--layers", layers]);
        args.extend_from_slice(&["--max-sessions", "8", "--ctx-size", "1024"]);
        Proc::join(dir.path(), &args)
    };
    let a = join(&dirs[0], "0..10", None);
    let boot = a.addr().to_string();
    let _b = join(&dirs[1], "10..20", Some(&boot));
    let _c = join(&dirs[2], "20..30", Some(&boot));
    wait_for(Duration::from_secs(60), || {
        status_json(&boot).filter(|v| covered_blocks(v).len() == 30)
    })
    .expect("the swarm covers the model");
    let api = ApiProc::spawn(
        dirs[3].path(),
        &[
            "api",
            "--listen",
            "127.0.0.1:0",
            "--no-mdns",
            "--bootstrap",
            &boot,
        ],
        false,
        Duration::from_secs(60),
    );

    for (i, snippet) in python.iter().enumerate() {
        let code = snippet.replace(README_ADDR, &api.base);
        let o = Command::new(&py)
            .args(["-c", &code])
            .output()
            .expect("run python");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && !out.trim().is_empty(),
            "README python snippet {i} failed ({}):\n{code}\nstdout: {out}\nstderr: {}\napi stderr:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            api.stderr()
        );
        println!("snippet {i}: {}", out.trim());
        if i == 0 {
            assert!(out.contains("Paris"), "the openai snippet's answer: {out}");
        }
    }

    let cmd = curl[0].replace(README_ADDR, &api.base);
    let o = Command::new("bash")
        .args(["-c", &cmd])
        .output()
        .expect("run curl (apt-get install curl)");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "the README's curl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text: String = out
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert!(
        out.trim_end().ends_with("data: [DONE]") && !text.trim().is_empty(),
        "the README's curl streams an answer ending in [DONE]:\n{out}"
    );
    println!("curl: {text}");
}
