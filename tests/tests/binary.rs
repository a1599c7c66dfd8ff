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
