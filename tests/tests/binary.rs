//! The built binary answers as a user expects.

use std::process::Command;

use nakshatra_e2e::{nakshatra_bin, test_model};

#[test]
fn help_lists_the_commands() {
    let o = Command::new(nakshatra_bin())
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for cmd in ["model", "slice", "run"] {
        assert!(s.contains(cmd), "--help lacks {cmd}: {s}");
    }
}

#[test]
fn unknown_model_file_is_a_clear_error() {
    let _ = test_model();
    let o = Command::new(nakshatra_bin())
        .args(["model", "inspect", "/definitely/not/here.gguf"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("/definitely/not/here.gguf"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// `nakshatra model inspect ... | head -1`: once the reader is gone the
/// command ends quietly (exit 0), it does not panic on the closed pipe.
#[test]
fn a_closed_stdout_ends_quietly() {
    let model = test_model();
    let mut child = Command::new(nakshatra_bin())
        .args(["model", "inspect", model.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the child has written anything (it parses
    // the whole model first): every write it makes gets EPIPE.
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!e.contains("panicked"), "{e}");
    assert_eq!(o.status.code(), Some(0), "{e}");
}
