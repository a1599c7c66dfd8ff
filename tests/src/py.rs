//! The Python venv the API tests run the official client libraries in
//! (`openai`, `ollama`; pinned in [`REQUIREMENTS`]), made once under
//! `<repo>/.cache/py` (gitignored; `NAKSHATRA_TEST_PY_VENV` names another
//! place) with `python3 -m venv` and pip from PyPI, and reused while its
//! requirements stamp matches. The tests need it: a failure to build it
//! fails them, with pip's output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// What the venv holds (pip requirements; the stamp the venv is checked
/// against).
pub const REQUIREMENTS: &str = "openai==3.57.0\nollama==0.6.3\n";

/// The stamp file inside the venv: a copy of [`REQUIREMENTS`], written
/// last, once pip succeeded.
const STAMP: &str = ".nakshatra-requirements";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv's directory, made (or checked) on first use in this process;
/// other processes that want it at the same time wait on a lock
/// directory beside it.
pub fn python_venv() -> PathBuf {
    static DONE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = done.as_ref() {
        return v.clone();
    }
    let venv = std::env::var("NAKSHATRA_TEST_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".cache/py"));
    if !ready(&venv) {
        let parent = venv.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
        let _lock = DirLock::acquire(&venv.with_extension("lock"));
        if !ready(&venv) {
            build(&venv);
        }
    }
    *done = Some(venv.clone());
    venv
}

/// The venv's `python`.
pub fn python() -> PathBuf {
    python_venv().join("bin/python")
}

/// `tests/py/NAME`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Runs `python tests/py/NAME ARGS` in the venv and returns its output.
pub fn run_script(name: &str, args: &[&str]) -> Output {
    Command::new(python())
        .arg(script(name))
        .args(args)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"))
}

/// Runs `tests/py/NAME ARGS` and parses the one JSON object it prints;
/// panics with its stderr when it fails or prints something else.
pub fn run_json(name: &str, args: &[&str]) -> serde_json::Value {
    let o = run_script(name, args);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "{name} {args:?} failed ({}):\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        panic!("{name}: stdout is not one JSON object ({e}):\n{out}\nstderr:\n{err}")
    })
}

fn ready(venv: &Path) -> bool {
    venv.join("bin/python").exists()
        && std::fs::read_to_string(venv.join(STAMP)).is_ok_and(|s| s == REQUIREMENTS)
}

fn build(venv: &Path) {
    eprintln!(
        "creating the Python venv for the client tests in {} ...",
        venv.display()
    );
    let _ = std::fs::remove_dir_all(venv);
    let python = std::env::var("NAKSHATRA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let o = Command::new(&python)
        .args(["-m", "venv"])
        .arg(venv)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (python3 with venv is needed): {e}"));
    check(&o, &format!("{python} -m venv {}", venv.display()));
    let reqs = venv.join("requirements.txt");
    std::fs::write(&reqs, REQUIREMENTS).expect("write requirements.txt");
    let o = Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-r",
        ])
        .arg(&reqs)
        .stdin(Stdio::null())
        .output()
        .expect("run pip");
    check(
        &o,
        "pip install -r requirements.txt (openai, ollama from PyPI)",
    );
    std::fs::write(venv.join(STAMP), REQUIREMENTS).expect("write the venv stamp");
}

fn check(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A lock held by creating a directory (atomic); removed on drop. One
/// older than [`STALE`] is taken as left by a killed process and removed.
struct DirLock(PathBuf);

/// How old a lock directory may be before it is taken as stale.
const STALE: Duration = Duration::from_secs(15 * 60);

impl DirLock {
    fn acquire(path: &Path) -> DirLock {
        let deadline = Instant::now() + STALE + Duration::from_secs(60);
        loop {
            match std::fs::create_dir(path) {
                Ok(()) => return DirLock(path.to_path_buf()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok());
                    if age.is_some_and(|a| a > STALE) {
                        let _ = std::fs::remove_dir(path);
                        continue;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{} stayed locked: remove it if no test is running",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("create the lock {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
